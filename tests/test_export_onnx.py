"""`finetune export --to onnx`: the exported graph loads in onnxruntime and computes the trained model's logits in
one pass, token by token through its KV cache and for left-padded batches; LoRA runs export merged; the folder has
what ORTModelForCausalLM / transformers.js load; a graph that fails its check leaves nothing; refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from helpers import RECITAL, ROOT, save_tiny_gpt2, shared_path
from finished_runs import write_recipe
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig, PreTrainedTokenizerFast

from finetune.chat_template import chat_template
from finetune.cli import main
from finetune.export import onnx as onnx_export
from finetune.modeling import load_final
from finetune.recipe import load_recipe, save_recipe
from finetune.tokenizer import load_tokenizer

# onnxruntime vs transformers measured here, as a fraction of the largest |logit|: 3e-7 on these tiny models (the
# trained one's logits reach 15: 4.9e-6 absolute), as transformers one pass vs through its own cache (5.4e-6); 1 vs 2
# threads: 0. 1e-5 of it leaves 30x headroom for other CPUs; a graph with other weights is off by far more.
RELATIVE = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


def session(folder: Path) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    return onnxruntime.InferenceSession(str(folder / "onnx" / "model.onnx"), options)


def run(graph: onnxruntime.InferenceSession, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray,
        past: list[np.ndarray] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """One call of the graph with the inputs ORTModelForCausalLM / transformers.js feed (an empty cache by default)."""
    names = [i.name for i in graph.get_inputs()]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    if past is None:
        shape = graph.get_inputs()[3].shape
        past = [np.zeros((ids.shape[0], shape[1], 0, shape[3]), np.float32) for _ in names[3:]]
    logits, *present = graph.run(None, {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                                        **dict(zip(names[3:], past))})
    return logits, present


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    assert np.abs(actual - expected).max() <= RELATIVE * max(1.0, np.abs(expected).max())


def reference_logits(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


@pytest.fixture(scope="module")
def lora_export(finished_runs: dict[str, Path]) -> Path:
    assert main(["export", str(finished_runs["lora"]), "--to", "onnx"]) == 0
    return load_recipe(finished_runs["lora"]).run.onnx


@pytest.fixture(scope="module")
def adapter_model(finished_runs: dict[str, Path]) -> torch.nn.Module:
    """The LoRA run as trained: the PEFT adapter over its base, not merged."""
    return load_final(load_recipe(finished_runs["lora"]).run.final).eval()


def test_lora_export_matches_the_adapter_in_one_pass_and_through_the_cache(lora_export: Path, adapter_model) -> None:
    assert sorted(p.name for p in (lora_export / "onnx").iterdir()) == ["model.onnx"]
    for name in ("config.json", "generation_config.json", "tokenizer.json", "recipe.yaml"):
        assert (lora_export / name).is_file()
    assert not lora_export.with_name("onnx.tmp").exists()
    # the trained tokenizer under a class transformers 4 (optimum's onnxruntime classes) and transformers.js know
    tokenizer_config = json.loads((lora_export / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    tokenizer = PreTrainedTokenizerFast.from_pretrained(lora_export)
    assert tokenizer(RECITAL) == AutoTokenizer.from_pretrained(lora_export.with_name("final"))(RECITAL)
    graph = session(lora_export)
    # transformers.js sizes the first, empty cache from the names: "batch_size" is the batch, any other name 0
    assert [i.shape for i in graph.get_inputs()][:4] == [
        ["batch_size", "sequence_length"], ["batch_size", "total_sequence_length"],
        ["batch_size", "sequence_length"], ["batch_size", 2, "past_sequence_length", 16]]
    ids = tokenizer(RECITAL)["input_ids"][:40]
    expected = reference_logits(adapter_model, ids)
    row = np.array([ids])
    one_pass = run(graph, row, np.ones_like(row), np.arange(len(ids))[None])[0][0]
    assert_close(one_pass, expected)
    logits, past = run(graph, row[:, :5], np.ones((1, 5), np.int64), np.arange(5)[None])
    cached = [logits[0]]
    for i in range(5, len(ids)):
        logits, past = run(graph, row[:, i:i + 1], np.ones((1, i + 1), np.int64), np.array([[i]]), past)
        cached.append(logits[0])
    assert past[0].shape[2] == len(ids)
    assert_close(np.concatenate(cached), expected)


def test_greedy_decoding_through_the_cache_recites_like_transformers(lora_export: Path, adapter_model) -> None:
    tokenizer = AutoTokenizer.from_pretrained(lora_export)
    prompt = tokenizer("alpha beta gamma")["input_ids"]
    with torch.inference_mode():
        expected = adapter_model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                                          max_new_tokens=10, do_sample=False)[0, len(prompt):].tolist()
    tokens = onnx_export.OnnxLM(lora_export / "onnx" / "model.onnx", adapter_model.config, threads=1).greedy(
        prompt, len(expected))
    assert tokens == expected


def test_the_readme_onnxruntime_snippet_generates_what_transformers_generates(lora_export: Path, adapter_model,
                                                                            capsys: pytest.CaptureFixture) -> None:
    code = (ROOT / "README.md").read_text().split("### ONNX")[1].split("```python\n")[1].split("```")[0]
    assert '"outputs/my-run/onnx"' in code
    capsys.readouterr()
    exec(compile(code.replace('"outputs/my-run/onnx"', repr(str(lora_export))), "README.md", "exec"), {})
    tokenizer = AutoTokenizer.from_pretrained(lora_export)
    prompt = tokenizer("alpha beta gamma")["input_ids"]
    with torch.inference_mode():
        generated = adapter_model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                                           max_new_tokens=20, do_sample=False)[0, len(prompt):].tolist()
    expected = tokenizer.decode([t for t in generated if t != tokenizer.eos_token_id])
    assert capsys.readouterr().out == expected + "\n"


def test_left_padded_rows_give_the_unpadded_logits(lora_export: Path, adapter_model) -> None:
    graph = session(lora_export)
    ids = AutoTokenizer.from_pretrained(lora_export)(RECITAL)["input_ids"]
    long, short = ids[:12], ids[3:10]
    pad = 12 - len(short)
    batch = np.array([long, [0] * pad + short])
    mask = np.array([[1] * 12, [0] * pad + [1] * len(short)])
    positions = np.array([list(range(12)), [0] * pad + list(range(len(short)))])
    logits, past = run(graph, batch, mask, positions)
    assert_close(logits[0], reference_logits(adapter_model, long))
    assert_close(logits[1, pad:], reference_logits(adapter_model, short))
    step = np.array([[ids[12]], [ids[10]]])  # one more token each, through the cache
    logits, _ = run(graph, step, np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1),
                    np.array([[12], [len(short)]]), past)
    assert_close(logits[0, 0], reference_logits(adapter_model, ids[:13])[-1])
    assert_close(logits[1, 0], reference_logits(adapter_model, ids[3:11])[-1])


def test_real_tokenizer_chat_run_exports_its_template_and_weights_beyond_the_protobuf_limit_separately(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer = load_tokenizer(str(shared_path("gpt2-tokenizer")))
    base = save_tiny_gpt2(tokenizer, tmp_path / "base", n_layer=1, n_head=2, n_embd=32, n_positions=128)
    path = write_recipe(tmp_path, "real-chat", base, fmt="chat", lora=False)
    recipe = load_recipe(path)
    model = AutoModelForCausalLM.from_pretrained(base)
    model.save_pretrained(recipe.run.final)
    tokenizer.save_pretrained(recipe.run.final)
    save_recipe(recipe, recipe.run.final / "recipe.yaml")
    monkeypatch.setattr(onnx_export, "PROTOBUF_LIMIT", 0)  # as for GPT-2 large and up: weights in model.onnx_data

    assert main(["export", str(path), "--to", "onnx"]) == 0
    out = recipe.run.onnx
    assert sorted(p.name for p in (out / "onnx").iterdir()) == ["model.onnx", "model.onnx_data"]
    assert json.loads((out / "config.json").read_text())["transformers.js_config"] == {"use_external_data_format": True}
    exported = AutoTokenizer.from_pretrained(out)
    assert exported.chat_template == chat_template(recipe.data)
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == chat_template(recipe.data)  # transformers.js reads it from there only
    text = "Hello there! How are you today?"
    ids = exported(text)["input_ids"]
    assert ids == tokenizer(text)["input_ids"] and len(exported) == 50257
    row = np.array([ids])
    logits = run(session(out), row, np.ones_like(row), np.arange(len(ids))[None])[0][0]
    assert_close(logits, reference_logits(model.eval(), ids))


def test_a_graph_that_fails_its_check_leaves_no_onnx_folder(finished_runs: dict[str, Path], lora_export: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    """The full run (the recital base) gets the LoRA run's graph: same shapes, other weights."""
    def write_other_graph(model: torch.nn.Module, path: Path) -> bool:
        path.parent.mkdir(parents=True)
        shutil.copy(lora_export / "onnx" / "model.onnx", path)
        return False

    monkeypatch.setattr(onnx_export, "write_graph", write_other_graph)
    run_folder = load_recipe(finished_runs["full"]).run
    with pytest.raises(onnx_export.CheckFailed, match="disagrees with transformers"):
        main(["export", str(finished_runs["full"]), "--to", "onnx"])
    assert not run_folder.onnx.exists() and not run_folder.onnx.with_name("onnx.tmp").exists()


@pytest.mark.parametrize("config, named", [
    (LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=2), "'llama' model"),
    (GPT2Config(vocab_size=300, n_layer=1, n_head=2, n_embd=16, add_cross_attention=True),
     "'model.init.add_cross_attention'"),
], ids=["llama", "cross-attention"])
def test_models_the_export_would_get_wrong_are_refused(tmp_path: Path, tokenizer_dir: Path, config, named: str,
                                                       capsys: pytest.CaptureFixture) -> None:
    path = write_recipe(tmp_path, "other", tokenizer_dir, lora=False)
    recipe = load_recipe(path)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(recipe.run.final)
    load_tokenizer(str(tokenizer_dir)).save_pretrained(recipe.run.final)
    save_recipe(recipe, recipe.run.final / "recipe.yaml")
    assert main(["export", str(path), "--to", "onnx"]) == 2
    assert named in capsys.readouterr().err
    assert not recipe.run.onnx.exists()
