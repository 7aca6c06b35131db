"""Long texts are tokenized in pieces (finetune/long_texts.py): the ids are exactly those of the whole text, for the
project's trained BPE and the real GPT-2 tokenizer, tokenizer training counts the same words, a tokenizer for
which cutting would change the ids gets its texts whole, and one long text costs the memory of many short ones
(bench/long_records.py measures a whole prepare)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import yaml
from tokenizers import AddedToken, Tokenizer
from tokenizers.pre_tokenizers import ByteLevel
from transformers import PreTrainedTokenizerFast

from finetune.formats import encode_texts
from finetune.long_texts import CUT, PIECE_CHARS, cuts_keep_ids, pieces
from finetune.prepare import prepare
from finetune.prepared import load_prepared
from finetune.recipe import TokenizerTrainConfig, load_recipe
from finetune.tokenizer import load_tokenizer, train_tokenizer
from helpers import corpus_lines, shared_path, subprocess_env

# What a pre-tokenizer might split differently: whitespace runs of every kind, contractions, digits, punctuation,
# CJK, emoji sequences, combining marks, Unicode spaces the regex knows (U+00A0, U+3000, U+2028, U+0085) and
# ones it does not (U+001F, U+180E, U+200B, U+FEFF), and a special token's text.
FRAGMENTS = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", "\r", " \n ", "\t ", "word", "Word", "it's", "'ll", "'",
             "'s", "123", "4.5", "007", "!!", "?", "...", "--", "中文", "字符。", "😀", "👍🏽", "👨‍👩‍👧", "e\u0301",
             "\u00a0", "\u3000", "\u2028", "\x85", "\x1f", "\u180e", "\u200b", "\ufeff", "<|endoftext|>", "ﬁ", "٣"]


def adversarial_texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 300))) for _ in range(count)]


def whole_ids(tokenizer, text: str) -> list[int]:
    """The ids of `text` tokenized in one call, special-token strings as plain text (as the project encodes data)."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


@pytest.fixture(scope="module", params=["trained", "gpt2"])
def tokenizer(request):
    """The real GPT-2 tokenizer, or the project's byte-level BPE trained on adversarial texts: its merges of
    whitespace runs, digits and punctuation make a wrong cut change ids (cutting after whitespace, or inside a run
    of it, changes those of most of the texts below)."""
    if request.param == "trained":
        return train_tokenizer(adversarial_texts(300, seed=5), TokenizerTrainConfig(vocab_size=600, min_frequency=2))
    return load_tokenizer(str(shared_path("gpt2-tokenizer")))


def ids_cut_everywhere(tokenizer, text: str) -> list[int]:
    """The ids of `text` cut at every CUT, each part tokenized alone."""
    cuts = [match.start() for match in CUT.finditer(text)]
    return [i for a, b in zip([0, *cuts], [*cuts, len(text)]) for i in whole_ids(tokenizer, text[a:b])]


def test_cutting_at_every_cut_keeps_the_ids(tokenizer) -> None:
    assert cuts_keep_ids(tokenizer.backend_tokenizer)
    for text in adversarial_texts(200, seed=0):
        assert ids_cut_everywhere(tokenizer, text) == whole_ids(tokenizer, text), repr(text)


def test_long_texts_encode_to_the_ids_of_the_whole_text(tokenizer) -> None:
    long = "".join(adversarial_texts(400, seed=1))
    assert len(list(pieces(long))) > 2
    texts = ["short one", long, "", long[:PIECE_CHARS]]
    assert [list(ids) for ids in encode_texts(tokenizer, texts)] == [whole_ids(tokenizer, t) for t in texts]


def test_the_cut_rule_sees_all_the_tokenizer_sees_as_whitespace(tokenizer_dir: Path) -> None:
    """CUT's `\\S` (Python's whitespace) must hold every character the pre-tokenizer's `\\s` matches: after "a ", a
    character the pre-tokenizer takes for whitespace leaves the space a pre-token of its own. Every assigned
    character is tried (the whole of Unicode gives the same 25 characters, but takes 10 s)."""
    pre = load_tokenizer(str(tokenizer_dir)).backend_tokenizer.pre_tokenizer
    chars = [chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) not in ("Cn", "Co", "Cs")]
    regex_whitespace = []
    for start in range(0, len(chars), 4096):
        part = chars[start:start + 4096]
        ends = {begin: end for _, (begin, end) in pre.pre_tokenize_str("".join("a " + c for c in part) + "a")}
        regex_whitespace += [c for i, c in enumerate(part) if ends[3 * i + 1] == 3 * i + 2]
    assert len(regex_whitespace) == 25  # Unicode's White_Space property
    assert all(c.isspace() for c in regex_whitespace)


def variants(tokenizer_dir: Path) -> dict[str, Tokenizer]:
    """The trained BPE changed so that cutting before whitespace changes its ids."""
    json_text = load_tokenizer(str(tokenizer_dir)).backend_tokenizer.to_str()
    prefix_space, added_token = Tokenizer.from_str(json_text), Tokenizer.from_str(json_text)
    prefix_space.pre_tokenizer = ByteLevel(add_prefix_space=True)
    added_token.add_tokens([AddedToken("alpha\nbeta", special=False)])
    return {"add_prefix_space": prefix_space, "added token with whitespace": added_token}


@pytest.mark.parametrize("variant", ["add_prefix_space", "added token with whitespace"])
def test_a_tokenizer_that_cuts_would_change_gets_its_texts_whole(tokenizer_dir: Path, variant: str) -> None:
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=variants(tokenizer_dir)[variant])
    assert not cuts_keep_ids(tokenizer.backend_tokenizer)
    sample = "delta\nalpha\nbeta gamma"
    assert ids_cut_everywhere(tokenizer, sample) != whole_ids(tokenizer, sample)  # the guard matters
    long = "\n".join(corpus_lines(4000)) + "\n" + sample
    assert len(long) > PIECE_CHARS
    assert list(encode_texts(tokenizer, [long])[0]) == whole_ids(tokenizer, long)


def test_training_on_long_texts_counts_the_same_words(tokenizer_dir: Path) -> None:
    from tokenizers import ByteLevelBPETokenizer

    long = "".join(adversarial_texts(1000, seed=2)) + " ".join(corpus_lines(3000))
    assert len(list(pieces(long))) > 2
    cfg = TokenizerTrainConfig(vocab_size=400, min_frequency=1)
    whole = ByteLevelBPETokenizer()
    whole.train_from_iterator([long], vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                              special_tokens=["<|endoftext|>"], show_progress=False)
    trained = train_tokenizer([long], cfg).backend_tokenizer
    assert cuts_keep_ids(trained)
    assert json.loads(trained.to_str())["model"] == json.loads(whole._tokenizer.to_str())["model"]


PEAKS = r"""
import sys
from finetune.formats import encode_texts
from finetune.tokenizer import load_tokenizer


def status_mb(key):
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) / 1024 for line in handle if line.startswith(key + ":"))


def growth_mb(encode):
    # the kernel's high-water mark of this process's RSS (VmHWM), reset first
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    before = status_mb("VmRSS")
    encode()
    return status_mb("VmHWM") - before


def in_lines():  # one record a line, in batches of 1 MB as prepare reads them
    batch, size = [], 0
    for line in lines:
        batch.append(line)
        size += len(line)
        if size >= 1 << 20:
            encode_texts(tokenizer, batch)
            batch, size = [], 0
    encode_texts(tokenizer, batch)


tokenizer = load_tokenizer(sys.argv[1])
text = open(sys.argv[2], encoding="utf-8").read()
lines = text.split("\n")
print(growth_mb(in_lines), growth_mb(lambda: encode_texts(tokenizer, [text])))
"""


def test_one_long_text_costs_the_memory_of_the_same_text_in_lines(tokenizer_dir: Path, tmp_path: Path) -> None:
    """Peak RSS growth (the kernel's VmHWM, reset before each) while a 2.5 MB text is encoded as one record, against
    the same text a line a record. Measured here: +5 to +6 MB against +81 to +82 MB (3 runs); one tokenizer call
    for the whole text, as before, +370 MB."""
    path = tmp_path / "text.txt"
    path.write_text("\n".join(corpus_lines(60000, seed=3)), encoding="utf-8")
    out = subprocess.run([sys.executable, "-c", PEAKS, str(tokenizer_dir), str(path)], check=True,
                         env={**subprocess_env(), "RAYON_NUM_THREADS": "1"}, capture_output=True, text=True)
    lines_growth, one_record_growth = map(float, out.stdout.split())
    assert one_record_growth < lines_growth, (lines_growth, one_record_growth)


def test_prepare_stores_the_ids_of_a_long_record(tmp_path: Path, tokenizer_dir: Path) -> None:
    long = " ".join(corpus_lines(4000)) + "\n\n" + "".join(adversarial_texts(100, seed=3))
    assert len(list(pieces(long))) > 2
    texts = [long, "a short one"]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (tmp_path / "validation.jsonl").write_text(json.dumps({"text": "held out"}) + "\n")
    spec = {"name": "t", "output_dir": str(tmp_path / "run"), "model": {"base": "gpt2"},
            "tokenizer": {"path": str(tokenizer_dir)},
            "data": {"train": str(tmp_path / "train.jsonl"), "validation": str(tmp_path / "validation.jsonl"),
                     "block_size": 64}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(spec))
    recipe = load_recipe(tmp_path / "recipe.yaml")
    prepare(recipe)
    tokenizer = load_tokenizer(str(tokenizer_dir))
    stream = [t for row in load_prepared(recipe, "train") for t in row["input_ids"].tolist()]
    assert stream == [t for text in texts for t in whole_ids(tokenizer, text) + [tokenizer.eos_token_id]]
