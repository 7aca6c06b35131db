"""Batches of prepared rows for the model.

Rows are right-padded to the longest in the batch; padded labels are -100 (by length, never by token id, so
EOS stays a target even though it doubles as the pad token). No attention mask is sent: with `position_ids`
restarting at each example and no KV cache, transformers builds a block-diagonal causal mask from the
position ids, so packed examples cannot attend to each other. Models must run with `use_cache=False` for
that (see `modeling.without_kv_cache`); tests/test_collate.py proves the equivalence.
"""

from __future__ import annotations

import torch

from finetune.packing import IGNORE


class PackedCollator:
    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(row["input_ids"]) for row in rows)
        batch = {
            "input_ids": torch.full((len(rows), length), self.pad_token_id, dtype=torch.long),
            "labels": torch.full((len(rows), length), IGNORE, dtype=torch.long),
            "position_ids": torch.zeros((len(rows), length), dtype=torch.long),
        }
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            for key in batch:
                batch[key][i, :n] = torch.as_tensor(row[key], dtype=torch.long)
        return batch
