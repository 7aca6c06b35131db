"""`finetune export RECIPE --to onnx`: the trained GPT-2 as one ONNX graph with a KV cache, in the layout that
onnxruntime's ORTModelForCausalLM and transformers.js load: `<run>/onnx/` holds `onnx/model.onnx`, config.json,
generation_config.json and the tokenizer with the recipe's chat template. The graph is checked in onnxruntime
against transformers (one pass, token by token through the cache, greedy tokens) before the folder is kept."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache, PretrainedConfig

from finetune.chat_template import save_tokenizer
from finetune.errors import UserError
from finetune.export import trained_model
from finetune.recipe import Recipe
from finetune.shareable import write_shareable_recipe

GRAPH = Path("onnx") / "model.onnx"  # where transformers.js looks (ORTModelForCausalLM: subfolder="onnx")
EXTERNAL_DATA = "model.onnx_data"  # transformers.js's name for the weights of a graph over protobuf's 2 GB
PROTOBUF_LIMIT = 2 * 1024**3
CHECK_TEXT = ("The quick brown fox jumps over the lazy dog. A model exported for another runtime must give the "
              "same next-token scores as the one that was trained, one token at a time as well as all at once.")
CHECK_NEW_TOKENS = 8
# Largest |logit difference| accepted between onnxruntime and transformers, as a fraction of the largest |logit|
# (rounding grows with the logits' scale). Measured: 3e-7 on tiny random and trained models, 1.0e-6 at GPT-2 small's
# shape (2.9e-6 absolute), as transformers differs from itself between one pass and its cache (1.7e-6 there);
# 1 vs 2 threads: 0. 1e-4 leaves 60x headroom; a graph with other weights is off by 1e-2 of it or more.
TOLERANCE = 1e-4


class CheckFailed(RuntimeError):
    """The exported graph does not compute what the trained model computes: nothing is kept."""


class _WithCache(torch.nn.Module):
    """The LM as onnxruntime calls it: past keys and values as flat tensors in, logits and the grown ones out."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        cache = DynamicCache(list(zip(past[0::2], past[1::2])))
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         use_cache=True)
        return out.logits, *(t for layer in out.cache.layers for t in (layer.keys, layer.values))


def past_names(config: PretrainedConfig, prefix: str = "past_key_values") -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(config.n_layer) for kind in ("key", "value")]


def export_onnx(recipe: Recipe) -> Path:
    """Write `<run>/onnx/` (under onnx.tmp until it passed its check) and return it."""
    model, tokenizer, trained = trained_model(recipe)
    refuse_unsupported(model.config, recipe.run.final)
    out = recipe.run.onnx
    with recipe.run.staged(out) as staging:
        started = time.perf_counter()
        external = write_graph(model, staging / GRAPH)
        seconds = time.perf_counter() - started
        if external:
            model.config.update({"transformers.js_config": {"use_external_data_format": True}})
        model.config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        save_tokenizer(tokenizer, trained.data, staging, portable=True)
        write_shareable_recipe(recipe.run.final, staging)
        figures = check_graph(staging / GRAPH, model, tokenizer)
    size = sum(path.stat().st_size for path in (out / GRAPH.parent).iterdir())
    print(f"onnx: exported in {seconds:.1f} s, {size / 1e6:.1f} MB; onnxruntime vs transformers: max |logit diff| "
          f"{figures['one_pass']:.2g} in one pass, {figures['cached']:.2g} through the cache (allowed "
          f"{figures['allowed']:.2g}), greedy tokens {figures['greedy']} identical")
    print(f"onnx model written to {out}")
    return out


def refuse_unsupported(config: PretrainedConfig, final: Path) -> None:
    """What this export (GPT-2's KV-cache layout, a decoder without cross-attention) cannot write faithfully."""
    if config.model_type != "gpt2":
        raise UserError(f"{final} is a {config.model_type!r} model: the ONNX export writes GPT-2 models "
                        "(model.base must be a GPT-2 checkpoint)")
    if config.add_cross_attention:
        raise UserError(f"{final}: 'model.init.add_cross_attention' is on: the ONNX export writes decoder-only "
                        "GPT-2 models (no encoder states to attend to)")


def write_graph(model: torch.nn.Module, path: Path) -> bool:
    """Export `model` with the dynamo exporter (TorchScript's tracer bakes the example's attention path in: its graph
    was off by 0.23 here) and save it; returns whether the weights went to EXTERNAL_DATA beside it."""
    config = model.config
    head_dim = config.n_embd // config.n_head
    batch, length, past_length = 2, 3, 4  # not 0 or 1, which the exporter would specialize on
    example = (torch.zeros(batch, length, dtype=torch.long), torch.ones(batch, past_length + length, dtype=torch.long),
               torch.arange(past_length, past_length + length).expand(batch, -1),
               tuple(torch.zeros(batch, config.n_head, past_length, head_dim) for _ in past_names(config)))
    # transformers.js builds the first, empty cache from these names: "batch_size" is the batch, any other name 0
    shapes = ({0: "batch_size", 1: "sequence_length"}, {0: "batch_size", 1: "total_sequence_length"},
              {0: "batch_size", 1: "sequence_length"},
              tuple({0: "batch_size", 2: "past_sequence_length"} for _ in past_names(config)))
    with _quiet_exporter():
        program = torch.onnx.export(_WithCache(model).eval(), example, dynamo=True, dynamic_shapes=shapes,
                                    input_names=["input_ids", "attention_mask", "position_ids", *past_names(config)],
                                    output_names=["logits", *past_names(config, "present")], verbose=False)
    path.parent.mkdir(parents=True)
    external = sum(p.numel() * p.element_size() for p in model.parameters()) >= PROTOBUF_LIMIT
    if external:
        import onnx_ir

        onnx_ir.save(program.model, path, external_data=EXTERNAL_DATA)
    else:
        program.save(path, external_data=False)
    return external


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Without the exporter's notes that say nothing about this export: the torchvision ops it skips, the axis
    names that several inputs share (the same axis), torch's deprecation inside its own pytree code."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="# The axis name")
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
            yield
    finally:
        registration.setLevel(level)


class OnnxLM:
    """An exported graph in onnxruntime: logits and the grown cache for the next tokens of a batch."""

    def __init__(self, path: Path, config: PretrainedConfig, threads: int = 0) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.config = config

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.config.n_head, 0, self.config.n_embd // self.config.n_head)
        return [np.zeros(shape, np.float32) for _ in past_names(self.config)]

    def step(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray,
             cache: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """`ids` (batch x new tokens) after `cache`; `mask` covers the cached and the new tokens."""
        feeds = {"input_ids": ids.astype(np.int64), "attention_mask": mask.astype(np.int64),
                 "position_ids": positions.astype(np.int64), **dict(zip(past_names(self.config), cache))}
        logits, *present = self.session.run(None, feeds)
        return logits, present

    def greedy(self, prompt: list[int], new_tokens: int) -> list[int]:
        """`new_tokens` argmax tokens after `prompt`, each step feeding one token through the cache."""
        ids, cache, tokens = np.array([prompt]), self.empty_cache(1), []
        for _ in range(new_tokens):
            start = len(prompt) + len(tokens) - ids.shape[1]
            logits, cache = self.step(ids, np.ones((1, start + ids.shape[1])),
                                      np.arange(start, start + ids.shape[1])[None], cache)
            tokens.append(int(logits[0, -1].argmax()))
            ids = np.array([[tokens[-1]]])
        return tokens


def torch_greedy(model: torch.nn.Module, prompt: list[int], new_tokens: int) -> list[int]:
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(new_tokens):
            ids.append(int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    return ids[len(prompt):]


def check_graph(path: Path, model: torch.nn.Module, tokenizer) -> dict:
    """Score CHECK_TEXT in onnxruntime in one pass and token by token through the cache, and greedy-generate from
    its first half; raise CheckFailed unless the logits are within TOLERANCE of transformers' and the tokens equal."""
    config = model.config
    ids = tokenizer(CHECK_TEXT)["input_ids"][:config.n_positions]
    with torch.inference_mode():
        expected = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].numpy()
    lm = OnnxLM(path, config)
    row = np.array([ids])
    one_pass = lm.step(row, np.ones_like(row), np.arange(len(ids))[None], lm.empty_cache(1))[0][0]
    half = max(1, len(ids) // 2)
    logits, cache = lm.step(row[:, :half], np.ones((1, half)), np.arange(half)[None], lm.empty_cache(1))
    cached = [logits[0]]
    for i in range(half, len(ids)):
        logits, cache = lm.step(row[:, i:i + 1], np.ones((1, i + 1)), np.array([[i]]), cache)
        cached.append(logits[0])
    prompt = ids[:half]
    new_tokens = min(CHECK_NEW_TOKENS, config.n_positions - len(prompt))
    greedy, reference = lm.greedy(prompt, new_tokens), torch_greedy(model, prompt, new_tokens)
    scale = max(1.0, float(np.abs(expected).max()))
    figures = {"one_pass": float(np.abs(one_pass - expected).max()),
               "cached": float(np.abs(np.concatenate(cached) - expected).max()), "allowed": TOLERANCE * scale,
               "greedy": f"{sum(a == b for a, b in zip(greedy, reference))}/{len(reference)}"}
    if max(figures["one_pass"], figures["cached"]) > figures["allowed"] or greedy != reference:
        raise CheckFailed(f"the exported graph disagrees with transformers on {len(ids)} tokens of a fixed text: "
                          f"max |logit diff| {figures['one_pass']:.3g} in one pass, {figures['cached']:.3g} through "
                          f"the cache (allowed {figures['allowed']:.3g}); greedy tokens {greedy} vs transformers' "
                          f"{reference}")
    return figures
