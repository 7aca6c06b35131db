import json
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from finetune.cli import main
from finetune.data import validation_mask
from finetune.formats import FORMATS
from finetune.packing import IGNORE, best_fit_decreasing, plan_pieces
from finetune.prepare import prepare
from finetune.prepared import load_prepared, load_prepared_tokenizer, load_records
from finetune.recipe import load_recipe

from helpers import corpus_lines, shared_path, write_recipe_file


def make_recipe(tmp_path: Path, tokenizer_dir: Path, train: str, overrides: tuple = (), **data):
    spec = {"name": "t", "output_dir": str(tmp_path / "run"), "model": {"base": "gpt2"},
            "tokenizer": {"path": str(tokenizer_dir)}, "data": {"train": train, "block_size": 64, **data}}
    return load_recipe(write_recipe_file(tmp_path / "recipe.yaml", spec), list(overrides))


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def as_lists(row: dict) -> dict:
    return {key: values.tolist() for key, values in row.items()}


def examples_of(row: dict) -> list[tuple[list[int], list[int]]]:
    """Split a packed row back into its examples at the position-id restarts."""
    row = as_lists(row)
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
    for a, b in zip(starts, starts[1:]):
        assert row["position_ids"][a:b] == list(range(b - a))
    return [(row["input_ids"][a:b], row["labels"][a:b]) for a, b in zip(starts, starts[1:])]


def target_texts(recipe, split="train") -> Counter:
    tokenizer = load_prepared_tokenizer(recipe)
    out = Counter()
    for row in load_prepared(recipe, split):
        for _, labels in examples_of(row):
            assert labels[0] == IGNORE
            out[tokenizer.decode([t for t in labels if t != IGNORE])] += 1
    return out


INSTRUCTIONS = [{"instruction": f"name colour {i}", "input": "" if i % 2 else f"hint {i}",
                 "output": f"colour number {i} is red"} for i in range(40)]


def test_instruction_targets_are_exactly_response_and_eos(tmp_path, tokenizer_dir):
    train = write_jsonl(tmp_path / "ins.jsonl", INSTRUCTIONS)
    recipe = make_recipe(tmp_path, tokenizer_dir, train, format="instruction", validation_fraction=0.25,
                         block_size=512)
    manifest = prepare(recipe)
    got = target_texts(recipe) + target_texts(recipe, "validation")
    assert got == Counter(f"{r['output']}<|endoftext|>" for r in INSTRUCTIONS)
    # whole examples were packed several to a row
    assert manifest["train"]["sequences"] < manifest["train"]["records_kept"]
    prompts = [r["prompt"] for r in load_records(recipe, "validation")]
    assert any("### Input:\nhint" in p for p in prompts) and any("### Input" not in p for p in prompts)


def test_chat_targets_are_assistant_turns_each_closed_by_eos(tmp_path, tokenizer_dir):
    rows = [{"conversations": [{"from": "human", "value": f"hi {i}"}, {"from": "gpt", "value": f"hello {i}"},
                               {"from": "human", "value": "more"}, {"from": "gpt", "value": f"bye {i}"}]}
            for i in range(20)]
    rows.append({"messages": [{"role": "user", "content": "only a question"}]})
    train = write_jsonl(tmp_path / "chat.jsonl", rows)
    recipe = make_recipe(tmp_path, tokenizer_dir, train, format="chat", validation=train)
    manifest = prepare(recipe)
    assert manifest["train"]["records_dropped"] == {"no_assistant_turn": 1}
    tokenizer = load_prepared_tokenizer(recipe)
    for row in load_prepared(recipe, "train"):
        for ids, labels in examples_of(row):
            targets = tokenizer.decode([t for t in labels if t != IGNORE])
            i = tokenizer.decode(ids).split("hi ")[1].split("\n")[0]
            assert targets == f" hello {i}<|endoftext|> bye {i}<|endoftext|>"
            assert "User: hi" in tokenizer.decode(ids)


def test_classification_targets_only_label_words(tmp_path, tokenizer_dir):
    lines = ["text\tlabel"] + [f"{w} review {i}\t{i % 2}" for i, w in enumerate(corpus_lines(30))]
    (tmp_path / "cls.tsv").write_text("\n".join(lines) + "\n")
    recipe = make_recipe(tmp_path, tokenizer_dir, str(tmp_path / "cls.tsv"), format="classification",
                         classification={"labels": {0: "bad", 1: "good"}, "template": "{text}\nVerdict:"})
    manifest = prepare(recipe)
    assert manifest["labels"]["names"] == ["bad", "good"]
    got = target_texts(recipe) + target_texts(recipe, "validation")
    assert got == Counter({" bad": 15, " good": 15})


def test_text_stream_keeps_every_target_and_restarts_positions(tmp_path, tokenizer_dir):
    lines = corpus_lines(60)
    (tmp_path / "c.txt").write_text("\n".join(lines) + "\n")
    recipe = make_recipe(tmp_path, tokenizer_dir, str(tmp_path / "c.txt"), block_size=16, validation_fraction=0.1)
    manifest = prepare(recipe)
    tokenizer = load_prepared_tokenizer(recipe)
    rows = [as_lists(row) for row in load_prepared(recipe, "train")]
    stream = [t for row in rows for t in row["input_ids"]]
    kept = [line for line, carved in zip(lines, validation_mask(60, 0.1, 42)) if not carved]
    expected = [t for text in kept for t in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
    assert stream == expected  # nothing lost, order kept, EOS between documents
    doc_starts = sum(1 for row in rows for p in row["position_ids"] if p == 0)
    targets = sum(1 for row in rows for t in row["labels"] if t != IGNORE)
    assert targets == len(stream) - doc_starts == manifest["train"]["target_tokens"]
    assert all(len(r["input_ids"]) == 16 for r in rows[:-1])
    assert manifest["train"]["packing_efficiency"] > 0.9


def rows_of(ids: list[int], lengths: list[int], block: int, fmt: str, packing: bool) -> list[list[list[int]]]:
    """Each row of the plan as its pieces' token ids."""
    parts = list(plan_pieces([np.array(lengths)], block, FORMATS[fmt].every_token_target, packing))
    pieces = np.concatenate([np.zeros((0, 2), np.int64)] + [p for p, _ in parts])
    rows = np.concatenate([np.zeros(0, np.int64)] + [f for _, f in parts] + [[len(pieces)]]).astype(np.int64)
    return [[ids[a:a + n] for a, n in pieces[rows[r]:rows[r + 1]].tolist()] for r in range(len(rows) - 1)]


def test_stream_plan_cuts_every_block_and_restarts_pieces_at_documents():
    assert rows_of(list(range(1, 9)), [3, 5], 4, "text", True) == [[[1, 2, 3], [4]], [[5, 6, 7, 8]]]
    assert rows_of(list(range(1, 11)), [3, 7], 4, "text", True) == [[[1, 2, 3], [4]], [[5, 6, 7, 8]], [[9, 10]]]


def test_example_plans_keep_examples_whole_or_cut_long_documents_at_blocks():
    ids, lengths = list(range(1, 11)), [3, 2, 5]
    assert rows_of(ids, lengths, 5, "instruction", True) == [[[6, 7, 8, 9, 10]], [[1, 2, 3], [4, 5]]]
    assert rows_of(ids, lengths, 5, "instruction", False) == [[[1, 2, 3]], [[4, 5]], [[6, 7, 8, 9, 10]]]
    assert rows_of(ids, lengths, 2, "text", False) == [[[1, 2]], [[3]], [[4, 5]], [[6, 7]], [[8, 9]], [[10]]]


def test_best_fit_decreasing_fills_bins_and_loses_nothing():
    lengths = [5, 3, 3, 2, 7, 1, 4, 4, 1]
    bins = best_fit_decreasing(lengths, capacity=8)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 8 for b in bins)
    assert len(bins) == 4  # 30 tokens need at least 4 bins of 8


def test_no_packing_keeps_one_example_per_row(tmp_path, tokenizer_dir):
    train = write_jsonl(tmp_path / "ins.jsonl", INSTRUCTIONS)
    recipe = make_recipe(tmp_path, tokenizer_dir, train, format="instruction", packing=False, block_size=512)
    manifest = prepare(recipe)
    assert manifest["train"]["sequences"] == manifest["train"]["records_kept"]
    assert all((row["position_ids"] == 0).sum() == 1 for row in load_prepared(recipe, "train"))


def test_long_examples_truncated_or_dropped_and_counted(tmp_path, tokenizer_dir):
    rows = INSTRUCTIONS[:10] + [{"instruction": "x " * 400, "output": "too long"}]
    train = write_jsonl(tmp_path / "ins.jsonl", rows)
    recipe = make_recipe(tmp_path, tokenizer_dir, train, format="instruction", validation=train, block_size=512)
    assert prepare(recipe)["train"]["records_dropped"] == {"no_target_after_truncation": 1}
    recipe = make_recipe(tmp_path, tokenizer_dir, train, ("data.overflow=drop",), format="instruction",
                         validation=train, block_size=512)
    assert prepare(recipe)["train"]["records_dropped"] == {"too_long": 1}


def test_empty_records_are_dropped_and_counted(tmp_path, tokenizer_dir):
    (tmp_path / "c.txt").write_text("one two\n   \nthree four\n\nfive six\n")
    recipe = make_recipe(tmp_path, tokenizer_dir, str(tmp_path / "c.txt"), validation=str(tmp_path / "c.txt"))
    manifest = prepare(recipe)
    assert manifest["train"]["records_in"] == 5
    assert manifest["train"]["records_kept"] == 3
    assert manifest["train"]["records_dropped"] == {"empty": 2}


def test_cache_hit_and_miss(tmp_path, tokenizer_dir, capsys):
    train = write_jsonl(tmp_path / "ins.jsonl", INSTRUCTIONS)
    recipe = make_recipe(tmp_path, tokenizer_dir, train, format="instruction", block_size=512)
    first = prepare(recipe)
    assert prepare(recipe)["fingerprint"] == first["fingerprint"]
    assert "up to date" in capsys.readouterr().out
    template = 'data.instruction.template_no_input="Q: {instruction}\\nA:"'
    changed = make_recipe(tmp_path, tokenizer_dir, train, (template,),
                          format="instruction", block_size=512)
    assert prepare(changed)["fingerprint"] != first["fingerprint"]
    assert "up to date" not in capsys.readouterr().out
    write_jsonl(tmp_path / "ins.jsonl", INSTRUCTIONS[:-1])
    assert prepare(recipe)["fingerprint"] not in (first["fingerprint"],)


def test_trained_tokenizer_is_saved_with_eos(tmp_path):
    (tmp_path / "c.txt").write_text("\n".join(corpus_lines(80)) + "\n")
    spec = {"name": "s", "output_dir": str(tmp_path / "run"), "model": {"init": {"n_layer": 1}},
            "tokenizer": {"train": {"vocab_size": 280, "min_frequency": 1}}, "data": {"train": "c.txt"}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(spec))
    recipe = load_recipe(tmp_path / "r.yaml")
    manifest = prepare(recipe)
    tokenizer = load_prepared_tokenizer(recipe)
    assert tokenizer.eos_token == "<|endoftext|>" and manifest["tokenizer"]["vocab_size"] == len(tokenizer) <= 280
    assert tokenizer("<|endoftext|>")["input_ids"] == [tokenizer.eos_token_id]


@pytest.mark.parametrize("content, override, message", [
    (None, (), r"data file .*data.txt: not found"),
    (b"text\n\xff\xfe broken\n", (), r"not valid UTF-8 at byte offset 5"),
    (b'{"instruction": "a", "output": "b"}\n{"output": "c"}\n', ("data.format=instruction",),
     r"line 2: missing field 'instruction'"),
    (b'{"text": "a", "label": 0}\n{"text": "b", "label": 7}\n',
     ("data.format=classification", "data.classification.labels=[no, yes]"),
     r"line 2: label 7 is not in the label set"),
    (b"\n  \n\n", (), "empty after filtering"),
    (b'{"text": "a"}\n{"text": {"nested": 1}}\n', (), r"line 2: field 'text' must be a string, got dict"),
    (b'{"text": "a"}\n{"text": 7}\n', (), r"line 2: field 'text' must be a string, got int"),
    (b"PAR1 not really parquet", (), r"data.parquet: could not be read as parquet"),
])
def test_bad_input_exits_2_with_a_clear_message(tmp_path, tokenizer_dir, capsys, content, override, message):
    suffix = ".txt" if content is None or content.startswith((b"text", b"\n")) else \
        ".parquet" if content.startswith(b"PAR1") else ".jsonl"
    data_file = tmp_path / f"data{suffix}"
    if content is not None:
        data_file.write_bytes(content)
    spec = {"name": "t", "output_dir": str(tmp_path / "run"), "model": {"base": "gpt2"},
            "tokenizer": {"path": str(tokenizer_dir)},
            "data": {"train": str(data_file), "validation": str(data_file)}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(spec))
    assert main(["prepare", str(tmp_path / "r.yaml"), *override]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in err
    assert __import__("re").search(message, err), err


def test_unreachable_hub_data_set_is_a_clear_error(tmp_path, tokenizer_dir, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = {"name": "t", "output_dir": str(tmp_path / "run"), "model": {"base": "gpt2"},
            "tokenizer": {"path": str(tokenizer_dir)}, "data": {"train": {"hub": "nyu-mll/glue", "config": "sst2"}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(spec))
    assert main(["prepare", str(tmp_path / "r.yaml")]) == 2
    assert "could not load Hub data set nyu-mll/glue/sst2 [train]" in capsys.readouterr().err


def test_resolved_recipe_is_written_with_the_prepared_data(tmp_path, tokenizer_dir):
    (tmp_path / "c.txt").write_text("\n".join(corpus_lines(20)) + "\n")
    recipe = make_recipe(tmp_path, tokenizer_dir, str(tmp_path / "c.txt"))
    prepare(recipe)
    written = yaml.safe_load((recipe.run.prepared / "recipe.yaml").read_text())
    assert written == recipe.to_dict() and written["data"]["train"] == str(tmp_path / "c.txt")


def test_real_data_sst2_and_alpaca_pack_efficiently(tmp_path):
    tokenizer = shared_path("gpt2-tokenizer")
    sst2 = make_recipe(tmp_path, tokenizer, str(shared_path("sst2/train.tsv")), ("data.max_records=5000",),
                       format="classification", block_size=128,
                       classification={"text_field": "sentence", "labels": {0: "negative", 1: "positive"}})
    manifest = prepare(sst2)
    assert manifest["train"]["packing_efficiency"] >= 0.95
    assert manifest["train"]["records_in"] + manifest["validation"]["records_in"] == 5000
    alpaca = make_recipe(tmp_path, tokenizer, str(shared_path("alpaca/alpaca_en_demo.json")),
                         format="instruction", block_size=1024)
    manifest = prepare(alpaca)
    assert manifest["train"]["packing_efficiency"] >= 0.95
    assert manifest["train"]["records_kept"] + manifest["validation"]["records_kept"] == 999


def store_rows(recipe, split: str) -> list[dict]:
    return [as_lists(row) for row in load_prepared(recipe, split)]


def big_text_recipe(tmp_path: Path, tokenizer_dir: Path, name: str) -> Path:
    """A text corpus of ~30k tokens written as ~15 shards of 2,000 tokens, tokenized by 2 worker processes."""
    corpus = tmp_path / "corpus.jsonl"
    if not corpus.exists():
        write_jsonl(corpus, [{"text": f"{line} (document {i})"} for i, line in enumerate(corpus_lines(3000, seed=3))])
    return write_recipe_file(tmp_path / f"{name}.yaml", {
        "name": name, "model": {"base": "gpt2"}, "tokenizer": {"path": str(tokenizer_dir)},
        "data": {"train": str(corpus), "block_size": 64, "shard_tokens": 2000, "num_proc": 2}})


@pytest.mark.slow
def test_sigkilled_prepare_continues_from_its_last_complete_shard_and_ends_like_an_uninterrupted_one(
        tmp_path, tokenizer_dir):
    import random
    import time

    straight = load_recipe(big_text_recipe(tmp_path, tokenizer_dir, "straight"))
    expected = prepare(straight)
    assert expected["train"]["tokens"] > 15 * 2000
    killed_path = big_text_recipe(tmp_path, tokenizer_dir, "killed")
    killed = load_recipe(killed_path)
    progress = killed.run.root / "prepared.partial" / "progress"
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    rng = random.Random(0)
    kills = 0
    for _ in range(3):  # kill at a random moment after some shards are complete, then again on the rerun
        process = subprocess.Popen([sys.executable, "-m", "finetune", "prepare", str(killed_path)], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        before = len(list(progress.glob("*.json"))) if progress.is_dir() else 0
        while process.poll() is None and time.monotonic() < deadline and \
                (len(list(progress.glob("*.json"))) if progress.is_dir() else 0) <= before:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.02))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait()
        if read_manifest_or_none(killed) is not None:  # killed after the swap: a complete store
            assert store_problem(killed.run.prepared, checksums=True) is None
    assert kills >= 1, "prepare finished before it could be killed"
    done = list(progress.glob("*.json")) if progress.is_dir() else []
    assert done and not killed.run.prepared.exists(), f"killed too late: {kills} kills, {len(done)} shards done"
    # a shard damaged after it was recorded is detected and redone, never trusted
    victim = json.loads(sorted(done)[0].read_text())["splits"]["train"]
    shard = killed.run.root / "prepared.partial" / "train" / f"{victim['name']}.tokens"
    shard.write_bytes(shard.read_bytes()[:-2] + b"\x00\x00")
    result = subprocess.run([sys.executable, "-m", "finetune", "prepare", str(killed_path)], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "continuing the interrupted prepare" in result.stdout
    manifest = read_manifest_or_none(killed)
    for split in ("train", "validation"):
        for key in ("records_in", "records_kept", "tokens", "target_tokens", "sequences"):
            assert manifest[split][key] == expected[split][key], (split, key)
        assert store_rows(killed, split) == store_rows(straight, split)
    assert not (killed.run.root / "prepared.partial").exists()


@pytest.mark.slow
def test_sigterm_stops_prepare_like_ctrl_c_with_its_workers_and_the_rerun_finishes(tmp_path, tokenizer_dir):
    """kill, systemd and Slurm send SIGTERM: prepare says "interrupted", exits 143, its worker processes end with
    it, and the rerun continues from the complete shards."""
    import time

    import psutil

    path = big_text_recipe(tmp_path, tokenizer_dir, "run")
    progress = load_recipe(path).run.root / "prepared.partial" / "progress"
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen([sys.executable, "-m", "finetune", "prepare", str(path)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline and not list(progress.glob("*.json")):
        time.sleep(0.01)
    workers = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signal.SIGTERM)
    try:
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 143 and "interrupted" in err, (process.returncode, err[-2000:])
    gone, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"worker processes outlived prepare: {alive}"
    assert not load_recipe(path).run.prepared.exists()
    result = subprocess.run([sys.executable, "-m", "finetune", "prepare", str(path)], env=env, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "continuing the interrupted prepare" in result.stdout


@pytest.mark.slow
def test_workers_of_a_sigkilled_prepare_exit_instead_of_living_on(tmp_path, tokenizer_dir):
    """SIGKILL (or the OOM killer) gives prepare no chance to stop its worker processes: they must notice and
    leave by themselves (they used to live on for good, re-parented to PID 1)."""
    import time

    import psutil

    path = big_text_recipe(tmp_path, tokenizer_dir, "run")
    progress = load_recipe(path).run.root / "prepared.partial" / "progress"
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen([sys.executable, "-m", "finetune", "prepare", str(path)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline and not list(progress.glob("*.json")):
        time.sleep(0.01)
    workers = [child for child in psutil.Process(process.pid).children(recursive=True)
               if "multiprocessing" in " ".join(child.cmdline())]
    process.kill()
    process.wait()
    assert workers, "prepare finished before its workers could be seen"
    gone, alive = psutil.wait_procs(workers, timeout=30)
    for survivor in alive:
        survivor.kill()
    assert not alive, f"{len(alive)} worker processes outlived their SIGKILLed prepare"


def read_manifest_or_none(recipe):
    from finetune.prepared import read_manifest

    return read_manifest(recipe)


def store_problem(folder, checksums):
    from finetune.prepared import store_problem as problem

    return problem(folder, checksums)


def test_a_damaged_store_is_never_up_to_date(tmp_path, tokenizer_dir, capsys):
    from finetune.errors import UserError
    from finetune.prepare import ensure_prepared

    recipe = load_recipe(big_text_recipe(tmp_path, tokenizer_dir, "run"))
    prepare(recipe)
    info = json.loads((recipe.run.prepared / "validation" / "split.json").read_text())
    records = recipe.run.prepared / "validation" / f"{info['shards'][0]['name']}.tokens"
    records.write_bytes(records.read_bytes()[:-1] + b"\x01")  # same size, other bytes
    ensure_prepared(recipe, processes=2)  # ranks check sizes only: cheap at any corpus size
    capsys.readouterr()
    prepare(recipe)  # prepare rereads checksums
    assert "up to date" not in capsys.readouterr().out
    records.unlink()
    with pytest.raises(UserError, match="incomplete|stale"):
        ensure_prepared(recipe, processes=2)


def test_replacing_a_store_never_passes_through_a_state_that_looks_complete(tmp_path, tokenizer_dir, monkeypatch):
    """Killed between moving the old store aside and renaming the new one in: no prepared/ at all, and the rerun
    finishes from the complete work folder."""
    from finetune import prepare as stage
    from finetune.errors import UserError

    path = big_text_recipe(tmp_path, tokenizer_dir, "run")
    prepare(load_recipe(path))
    recipe = load_recipe(path, ["data.block_size=32"])
    renames, rename = [], stage.os.rename

    def rename_then_die(src, dst):
        renames.append(dst)
        if len(renames) == 2:
            raise KeyboardInterrupt  # stands for SIGKILL between the two renames
        rename(src, dst)

    monkeypatch.setattr(stage.os, "rename", rename_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare(recipe)
    monkeypatch.undo()
    assert not recipe.run.prepared.exists()
    with pytest.raises(UserError):
        stage.ensure_prepared(recipe, processes=2)
    manifest = prepare(recipe)
    assert manifest["block_size"] == 32 and not list(recipe.run.root.glob("prepared.old-*"))


def test_overrides_may_follow_the_options(tmp_path, tokenizer_dir, capsys):
    """`make prepare ARGS="--force key=value"` and `make generate PROMPT=... ARGS="key=value"` put overrides
    after options: they apply; anything else left over is an error."""
    (tmp_path / "c.txt").write_text("\n".join(corpus_lines(40)) + "\n")
    recipe = make_recipe(tmp_path, tokenizer_dir, str(tmp_path / "c.txt"))
    assert main(["prepare", recipe.source, "--force", "data.block_size=32"]) == 0
    assert json.loads((recipe.run.prepared / "manifest.json").read_text())["block_size"] == 32
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", recipe.source, "--force", "stray"])
    assert exit_info.value.code == 2 and "unrecognized arguments: stray" in capsys.readouterr().err


def test_a_folder_where_the_data_file_should_be_is_named_as_such(tmp_path, tokenizer_dir, capsys):
    (tmp_path / "data.txt").mkdir()
    recipe = make_recipe(tmp_path, tokenizer_dir, str(tmp_path / "data.txt"))
    assert main(["prepare", recipe.source]) == 2
    assert f"data file {tmp_path / 'data.txt'}: is a folder, not a file" in capsys.readouterr().err


def test_an_output_folder_blocked_by_a_file_is_one_line_naming_the_path(tmp_path, tokenizer_dir, capsys):
    (tmp_path / "c.txt").write_text("\n".join(corpus_lines(40)) + "\n")
    recipe = make_recipe(tmp_path, tokenizer_dir, str(tmp_path / "c.txt"))
    (tmp_path / "afile").write_text("")
    for output_dir in (tmp_path / "afile", tmp_path / "afile" / "run"):
        assert main(["prepare", recipe.source, f"output_dir={output_dir}"]) == 1
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'afile'}") and "Traceback" not in err


@pytest.mark.parametrize("names_its_file", [True, False], ids=["named", "nameless"])
def test_a_full_disk_is_one_line_naming_the_path(tmp_path, tokenizer_dir, capsys, monkeypatch, names_its_file):
    """A full disk while writing the store: one line naming the file, or the folder being written when the
    library that failed left the name out (numpy's and Arrow's writes do)."""
    import errno

    from finetune import store

    (tmp_path / "c.txt").write_text("\n".join(corpus_lines(40)) + "\n")
    recipe = make_recipe(tmp_path, tokenizer_dir, str(tmp_path / "c.txt"))

    def full(path, parts):
        raise OSError(errno.ENOSPC, "No space left on device", *([str(path)] if names_its_file else []))

    monkeypatch.setattr(store, "write_parts", full)
    assert main(["prepare", recipe.source]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: ") and "No space left on device" in err
    assert "Traceback" not in err
    assert ".tokens" in err if names_its_file else f"error: {recipe.run.prepared_partial}: No space" in err
    assert not recipe.run.prepared.exists()  # nothing that looks complete was left


def test_a_second_prepare_of_a_run_folder_waits_for_the_first(tmp_path, tokenizer_dir):
    """As when every node of a multi-machine run prepares one run folder on a shared filesystem."""


    train = tmp_path / "train.txt"
    train.write_text("\n".join(corpus_lines(50)) + "\n")
    recipe = make_recipe(tmp_path, tokenizer_dir, str(train))
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with recipe.run.locked("prepare"):  # stands for the first prepare, still running
        second = subprocess.Popen([sys.executable, "-m", "finetune", "prepare", str(tmp_path / "recipe.yaml")],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert second.stdout.readline().startswith("prepare: waiting for another prepare in")
        assert second.poll() is None
    output = second.communicate(timeout=120)[0]
    assert second.returncode == 0 and "prepare: wrote" in output
