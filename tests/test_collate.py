"""Packed rows through PackedCollator give each example exactly the per-token losses it has when run alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from finetune.collate import PackedCollator
from finetune.modeling import without_kv_cache
from finetune.packing import IGNORE
from finetune.store import ShardData, TokenStore, finish_split, write_shard

PAD = 0


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position loss of predicting labels[t + 1] from position t (0 where the label is ignored)."""
    targets = labels[:, 1:]
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE, reduction="none")
    return losses * targets.ne(IGNORE)


def tiny_model(attn_implementation: str) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=97)
    config._attn_implementation = attn_implementation
    return without_kv_cache(GPT2LMHeadModel(config)).eval()


def examples() -> list[tuple[list[int], list[int]]]:
    generator = torch.Generator().manual_seed(1)
    out = []
    for length in (7, 12, 5, 9, 16, 3):
        ids = torch.randint(1, 97, (length,), generator=generator).tolist()
        labels = [IGNORE] + ids[1:]  # the first token of an example is never a target
        out.append((ids, labels))
    return out


def packed_rows(items: list[tuple[list[int], list[int]]], folder) -> list[dict]:
    """The examples written as a prepared store (instruction-style target mask), bin-packed into rows of 24 and
    read back as the trainer reads them."""
    shard = ShardData(tokens=[np.array(ids, dtype=np.uint16) for ids, _ in items],
                      docs=[np.array([len(ids) for ids, _ in items], dtype=np.uint32)],
                      targets=[np.array([label != IGNORE for label in labels], dtype=np.uint8) for _, labels in items])
    entry = write_shard(folder, "shard-00000", shard)
    finish_split(folder, [entry], np.dtype(np.uint16), 24, stream=False, packing=True)
    return list(TokenStore(folder))


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_packed_batch_matches_examples_run_one_by_one(attn_implementation: str, tmp_path) -> None:
    model = tiny_model(attn_implementation)
    items = examples()
    rows = packed_rows(items, tmp_path)
    assert len(rows) < len(items)  # several examples share a row
    batch = PackedCollator(PAD)(rows)
    assert "attention_mask" not in batch
    assert batch["labels"].eq(IGNORE).any()  # rows of different lengths: padding is present too
    with torch.no_grad():
        packed = token_losses(model(**{k: v for k, v in batch.items() if k != "labels"}).logits, batch["labels"])
        alone = {}
        for ids, labels in items:
            ids_t = torch.tensor([ids])
            alone[tuple(ids)] = token_losses(model(input_ids=ids_t).logits, torch.tensor([labels]))[0]
    checked = 0
    for r, positions in enumerate(batch["position_ids"]):
        starts = [i for i, p in enumerate(positions.tolist()) if p == 0]
        for start, end in zip(starts, starts[1:] + [len(positions)]):
            ids = tuple(batch["input_ids"][r, start:end].tolist())
            if ids not in alone:  # padding
                continue
            piece = packed[r, start:end - 1]
            torch.testing.assert_close(piece, alone[ids], atol=1e-5, rtol=0)
            checked += 1
    assert checked == len(items)


def test_plain_causal_mask_would_leak_across_examples(tmp_path) -> None:
    """Control: the same packed batch with an explicit all-ones attention mask (one causal mask over the row)
    gives different losses, so the test above is sensitive to leakage."""
    model = tiny_model("sdpa")
    rows = packed_rows(examples(), tmp_path)
    batch = PackedCollator(PAD)(rows)
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    with torch.no_grad():
        separated = token_losses(model(**inputs).logits, batch["labels"])
        leaking = token_losses(model(**inputs, attention_mask=torch.ones_like(batch["input_ids"])).logits,
                               batch["labels"])
    assert (separated - leaking).abs().max() > 1e-3
