"""The eval stage on tiny models: perplexity against plain reference computations, what is (not) counted,
bits per byte, base against tuned accuracy, k-shot prompts, and one run on 2 processes."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from finetune.cli import main
from finetune.collate import PackedCollator
from finetune.evaluation import draw_shots, greedy, sliding_windows
from finetune.metrics import classification_figures, generation_figures, label_loglikelihoods, macro_f1
from finetune.modeling import apply_lora, load_final
from finetune.tokenizer import load_tokenizer
from finetune.prepare import prepare
from finetune.prepared import load_prepared, load_records
from finetune.recipe import LoraConfig, load_recipe, save_recipe
from helpers import corpus_lines, write_recipe_file

ROOT = Path(__file__).resolve().parents[1]
VALIDATION_TEXT = ["alpha beta gamma café naïve", "über die brücke — red green blue", *corpus_lines(10, seed=7)]


def write_recipe(folder: Path, raw: dict) -> Path:
    return write_recipe_file(folder / "recipe.yaml", {"name": "t", "output_dir": str(folder / "run"), **raw})


def save_final(model: torch.nn.Module, recipe_path: Path, tokenizer_dir: Path) -> Path:
    """<run>/final/ as train writes it: the model or adapter, the tokenizer and the resolved recipe."""
    recipe = load_recipe(recipe_path)
    final = recipe.run.final
    model.save_pretrained(final)
    load_tokenizer(str(tokenizer_dir)).save_pretrained(final)
    save_recipe(recipe, final / "recipe.yaml")
    return final


def run_eval(recipe_path: Path, *overrides: str) -> dict:
    assert main(["eval", str(recipe_path), *overrides]) == 0
    return json.loads((load_recipe(recipe_path).run.eval_results).read_text())


def reference_sliding(model: torch.nn.Module, stream: list[int], block: int, stride: int) -> tuple[float, int]:
    """The Hugging Face fixed-length-model loop written out: returns (total NLL, scored tokens)."""
    total, scored, prev_end = 0.0, 0, 0
    for begin in range(0, len(stream), stride):
        end = min(begin + block, len(stream))
        window = stream[begin:end]
        logprobs = model(torch.tensor([window])).logits[0].log_softmax(-1)
        for position in range(max(len(window) - (end - prev_end), 1), len(window)):
            total -= logprobs[position - 1, window[position]].item()
            scored += 1
        prev_end = end
        if end == len(stream):
            break
    return total, scored


@pytest.fixture
def text_run(tmp_path: Path, tiny_model_dir: Path, tokenizer_dir: Path) -> tuple[Path, Path]:
    """A text run whose final/ is a LoRA adapter (with non-zero B, so tuned differs from base)."""
    (tmp_path / "train.txt").write_text("\n".join(corpus_lines(40)) + "\n")
    (tmp_path / "validation.txt").write_text("\n".join(VALIDATION_TEXT) + "\n", encoding="utf-8")
    recipe = write_recipe(tmp_path, {"model": {"base": str(tiny_model_dir)},
                                     "data": {"train": "train.txt", "validation": "validation.txt", "block_size": 32},
                                     "lora": {"r": 4, "targets": "all"}})
    torch.manual_seed(1)
    model, _ = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, targets="all"))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    save_final(model, recipe, tokenizer_dir)
    return recipe, tiny_model_dir


@torch.inference_mode()
def test_sliding_window_perplexity_matches_reference(text_run: tuple[Path, Path]) -> None:
    recipe_path, base_dir = text_run
    recipe = load_recipe(recipe_path)
    prepare(recipe)
    tokenizer = load_tokenizer(str(base_dir))
    eos = tokenizer.eos_token_id
    docs = [tokenizer(text)["input_ids"] + [eos] for text in VALIDATION_TEXT]
    tuned, base = load_final(recipe.run.final).eval(), AutoModelForCausalLM.from_pretrained(base_dir).eval()
    text_bytes = sum(len(text.encode("utf-8")) for text in VALIDATION_TEXT)
    for stride, batch_size in ((32, 1), (32, 4), (8, 1), (8, 5)):
        result = run_eval(recipe_path, f"eval.stride={stride}", f"eval.batch_size={batch_size}")
        for figures, model in ((result, tuned), (result["baseline"], base)):
            # as in training, each document is scored on its own context only
            nll, count = map(sum, zip(*(reference_sliding(model, doc, 32, stride) for doc in docs)))
            assert figures["tokens"] == count
            assert figures["loss"] == pytest.approx(nll / count, rel=1e-5)
            assert figures["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
            assert figures["bits_per_byte"] == pytest.approx(nll / math.log(2) / figures["bytes"], rel=1e-5)
        if stride == 8:  # every token but each document's first is scored; EOS tokens stand for no text
            assert result["tokens"] == sum(len(doc) - 1 for doc in docs)
            # a byte-level BPE token string has one character per byte
            assert result["bytes"] == text_bytes - sum(len(tokenizer.convert_ids_to_tokens(doc[0])) for doc in docs)
    assert abs(result["baseline"]["loss"] - result["loss"]) > 1e-3
    assert "adapter disabled" in result["baseline"]["model"]


def test_sliding_windows_score_each_token_once() -> None:
    stream = list(range(100, 150))
    for block, stride in ((16, 16), (16, 5), (16, 1), (7, 3)):
        scored = [t for row in sliding_windows(stream, block, stride) for t in row["labels"] if t != -100]
        if stride < block:
            assert scored == stream[1:]
        assert len(scored) == len(set(scored))
        assert all(len(row["input_ids"]) <= block for row in sliding_windows(stream, block, stride))


@pytest.fixture
def instruction_run(tmp_path: Path, tiny_model_dir: Path, tokenizer_dir: Path) -> Path:
    rng = random.Random(3)
    rows = [{"instruction": " ".join(rng.sample(corpus_lines(5, seed=i)[0].split(), 3)), "input": "",
             "output": rng.choice(["café au lait", "red blue", "naïve über alpha beta gamma delta"])}
            for i in range(30)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    (tmp_path / "validation.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows[:12]),
                                               encoding="utf-8")
    recipe = write_recipe(tmp_path, {
        "model": {"base": str(tiny_model_dir)}, "lora": None,
        "data": {"train": "train.jsonl", "validation": "validation.jsonl", "format": "instruction", "block_size": 96,
                 "instruction": {"template": "Q: {instruction} {input}\nA:",
                                 "template_no_input": "Q: {instruction}\nA:"}},
        "eval": {"generate_samples": 5, "max_new_tokens": 6}})
    torch.manual_seed(2)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for param in model.parameters():
        param.data += 0.05 * torch.randn_like(param)
    save_final(model, recipe, tokenizer_dir)
    return recipe


@torch.inference_mode()
def test_prompt_and_padding_tokens_are_never_counted(instruction_run: Path) -> None:
    recipe = load_recipe(instruction_run)
    one, four = run_eval(instruction_run, "eval.batch_size=1"), run_eval(instruction_run, "eval.batch_size=4")
    tokenizer = load_tokenizer(str(recipe.run.final))
    model = load_final(recipe.run.final).eval()
    total, count, n_bytes = 0.0, 0, 0
    for record in load_records(recipe, "validation"):  # each example alone, unpadded: response tokens + EOS
        prompt = tokenizer(record["prompt"])["input_ids"]
        response = tokenizer(record["response"])["input_ids"] + [tokenizer.eos_token_id]
        logprobs = model(torch.tensor([prompt + response])).logits[0].log_softmax(-1)
        total -= sum(logprobs[len(prompt) + i - 1, t].item() for i, t in enumerate(response))
        count += len(response)
        n_bytes += len(record["response"].encode("utf-8"))
    assert len(load_prepared(recipe, "validation")) < 12  # examples are packed several to a row
    for result in (one, four):
        assert result["tokens"] == count == json.loads((recipe.run.prepared / "manifest.json").read_text())[
            "validation"]["target_tokens"]
        assert result["loss"] == pytest.approx(total / count, rel=1e-5)
        assert result["bytes"] == n_bytes
        assert result["bits_per_byte"] == pytest.approx(total / math.log(2) / n_bytes, rel=1e-5)
    assert abs(result["baseline"]["loss"] - result["loss"]) > 1e-3
    assert len(result["generations"]) == 5 and {"exact_match", "bleu"} <= set(result)
    assert "## Sample generations" in recipe.run.report.read_text()


@torch.inference_mode()
def test_batched_greedy_equals_one_at_a_time(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = load_tokenizer(str(tiny_model_dir))
    prompts = [tokenizer(text)["input_ids"] for text in ("alpha beta", "red green blue cyan magenta yellow", "pi")]
    assert greedy(model, tokenizer, prompts, 8) == [greedy(model, tokenizer, [p], 8)[0] for p in prompts]


@torch.inference_mode()
def test_label_loglikelihoods_match_reference(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    contexts = [[5, 9, 30, 41], [7, 8], [100, 3, 2, 1, 4, 60]]
    for labels in ([[11], [12], [13]], [[11, 12], [13], [14, 15, 16]]):
        scores = label_loglikelihoods(model, contexts, labels, pad_token_id=0)
        for i, context in enumerate(contexts):
            for j, label in enumerate(labels):
                logprobs = model(torch.tensor([context + label])).logits[0].log_softmax(-1)
                expected = sum(logprobs[len(context) + k - 1, t].item() for k, t in enumerate(label))
                assert scores[i, j].item() == pytest.approx(expected, rel=1e-5, abs=1e-5)


def sentiment_rows(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    fillers = "alpha beta gamma delta red green blue cyan pi rho sigma tau".split()
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = rng.sample(fillers, 4)
        words.insert(rng.randint(0, 4), rng.choice(["great", "good"] if label else ["awful", "bad"]))
        rows.append(f"{' '.join(words)}\t{label}")
    return rows


def train_full(recipe_path: Path, base_dir: Path, steps: int) -> torch.nn.Module:
    """A plain PyTorch loop over the prepared rows: the tuned model, without the train stage."""
    recipe = load_recipe(recipe_path)
    rows = list(load_prepared(recipe, "train"))
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    collate, rng = PackedCollator(0), random.Random(0)
    torch.manual_seed(0)
    for _ in range(steps):
        batch = collate(rng.sample(rows, 8))
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def classification_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tokenizer_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("cls")
    header = "sentence\tlabel\n"
    (folder / "train.tsv").write_text(header + "\n".join(sentiment_rows(300, seed=0)) + "\n")
    (folder / "validation.tsv").write_text(header + "\n".join(sentiment_rows(40, seed=1)) + "\n")
    recipe = write_recipe(folder, {
        "model": {"base": str(tiny_model_dir)}, "lora": None,
        "data": {"train": "train.tsv", "validation": "validation.tsv", "format": "classification", "block_size": 64,
                 "classification": {"text_field": "sentence", "labels": {0: "negative", 1: "positive"}}},
        "eval": {"shots": 2, "calibrate": True, "batch_size": 16}})
    prepare(load_recipe(recipe))
    save_final(train_full(recipe, tiny_model_dir, steps=150), recipe, tokenizer_dir)
    return recipe


def test_classification_goes_from_chance_to_near_perfect(classification_run: Path) -> None:
    result = run_eval(classification_run)
    assert result["accuracy"] >= 0.95
    assert result["baseline"]["accuracy"] <= 0.75
    assert result["shots"] == 0 and result["baseline"]["shots"] == 2 and result["baseline"]["calibrated"]
    validation = {r["text"] for r in load_records(load_recipe(classification_run), "validation")}
    assert len(result["baseline"]["shot_texts"]) == 2 and not validation & set(result["baseline"]["shot_texts"])
    matrix = result["confusion_matrix"]["rows_true_columns_predicted"]
    assert sum(map(sum, matrix)) == result["examples"] == 40
    report = (load_recipe(classification_run).run.report).read_text()
    assert "| accuracy |" in report and "Confusion matrices" in report


def test_two_processes_give_the_same_figures(classification_run: Path) -> None:
    one = run_eval(classification_run, "eval.batch_size=3")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    launcher = Path(sys.executable).with_name("accelerate")
    done = subprocess.run([str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "-m", "finetune", "eval",
                           str(classification_run)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((load_recipe(classification_run).run.eval_results).read_text())
    assert two["processes"] == 2
    for a, b in ((one, two), (one["baseline"], two["baseline"])):
        assert (a["tokens"], a["bytes"], a["examples"]) == (b["tokens"], b["bytes"], b["examples"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["accuracy"] == b["accuracy"]
        assert a["confusion_matrix"] == b["confusion_matrix"]


def test_shots_never_come_from_the_evaluated_split() -> None:
    evaluated = [{"text": f"sentence {i}", "label": i % 3} for i in range(10)]
    train = [{"text": f"sentence {i}", "label": i % 3} for i in range(40)]  # holds copies of all evaluated texts
    train += [{"text": f"sentence {i} ", "label": i % 3} for i in range(5)]  # and copies with trailing spaces
    for seed in range(20):
        demos = draw_shots(train, evaluated, 6, seed)
        assert not {d["text"].strip() for d in demos} & {e["text"] for e in evaluated}
        assert sorted(d["label"] for d in demos) == [0, 0, 1, 1, 2, 2]
    assert draw_shots(train, evaluated, 6, 1) == draw_shots(train, evaluated, 6, 1)
    assert draw_shots(train, evaluated, 6, 1) != draw_shots(train, evaluated, 6, 2)


def test_metric_arithmetic() -> None:
    truth, predicted = [0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 0, 2]
    # per-label F1: 0 -> 2*1/(2+1+1) = 0.5, 1 -> 2*2/(4+1+0) = 0.8, 2 -> 2*1/(2+0+1) = 2/3
    assert macro_f1(truth, predicted) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    figures = classification_figures(truth, predicted, ["a", "b", "c"])
    assert figures["accuracy"] == pytest.approx(4 / 6)
    assert figures["confusion_matrix"]["rows_true_columns_predicted"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    text = ["the cat sat on the mat today", "a dog ran in the park at noon"]
    assert generation_figures(text, text) == {"exact_match": 1.0, "bleu": pytest.approx(100.0), "samples": 2}
    assert generation_figures([" the cat sat on the mat today ", "no"], text)["exact_match"] == 0.5


def test_bad_settings_are_user_errors(text_run: tuple[Path, Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture) -> None:
    recipe_path, _ = text_run
    assert main(["eval", str(recipe_path), "eval.stride=33"]) == 2
    assert "'eval.stride' must be between 1 and data.block_size (32), got 33" in capsys.readouterr().err
    (tmp_path / "not-a-model").mkdir()
    assert main(["eval", str(recipe_path), "--model", str(tmp_path / "not-a-model")]) == 2
    assert "is a folder but not a model (no config.json in it)" in capsys.readouterr().err
    assert main(["eval", str(recipe_path), "eval.files=[missing.txt]"]) == 2
    assert f"eval.files: {Path.cwd() / 'missing.txt'}: not found" in capsys.readouterr().err  # where it looked
    assert main(["eval", str(recipe_path), "--model", str(recipe_path)]) == 2
    assert f"{recipe_path}: is a file, not a folder (a model folder is needed)" in capsys.readouterr().err
    assert main(["eval", str(recipe_path), f"output_dir={tmp_path / 'elsewhere'}"]) == 2
    assert "train the recipe first" in capsys.readouterr().err
