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


class PairCollator(PackedCollator):
    """PackedCollator batches of preference rows (whole pairs, chosen then rejected, see packing.plan_pieces), with
    `sequence_ids`: for each token, the number of its sequence in the batch (-1 for padding). Sequence 2k is pair
    k's chosen response, 2k + 1 its rejected one. Rows that carry `reference_logps` (one value per sequence,
    finetune/reference_logps.py) give the batch `reference_logps` in the same sequence order."""

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = super().__call__(rows)
        batch["sequence_ids"] = torch.full_like(batch["input_ids"], -1)
        before = 0
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            starts = batch["position_ids"][i, :n].eq(0).cumsum(0)
            batch["sequence_ids"][i, :n] = before + starts - 1
            before += int(starts[-1])
        if "reference_logps" in rows[0]:
            batch["reference_logps"] = torch.cat([torch.as_tensor(row["reference_logps"], dtype=torch.float32)
                                                  for row in rows])
        return batch
