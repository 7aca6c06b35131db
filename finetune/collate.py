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
    k's chosen response, 2k + 1 its rejected one."""

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = super().__call__(rows)
        batch["sequence_ids"] = torch.full_like(batch["input_ids"], -1)
        before = 0
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            starts = batch["position_ids"][i, :n].eq(0).cumsum(0)
            batch["sequence_ids"][i, :n] = before + starts - 1
            before += int(starts[-1])
        return batch


class FeedbackCollator(PairCollator):
    """PackedCollator batches of rated completions (feedback data), with `sequence_ids` as PairCollator's,
    `desirable` (each sequence's label) and `kl`: the batch's mismatched sequences, from which KTO estimates its
    KL term. Sequence k's prompt is followed by sequence k - 1's completion (the last completion goes to the first
    prompt), as TRL's KTOTrainer pairs them; each is cut to `block_size` and they are packed in order into rows of
    at most `block_size`, positions restarting per sequence, with their own `sequence_ids`."""

    def __init__(self, pad_token_id: int, block_size: int) -> None:
        super().__init__(pad_token_id)
        self.block_size = block_size

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = super().__call__(rows)
        batch["desirable"] = torch.as_tensor([bool(d) for row in rows for d in row["desirable"]])
        prompts, completions = zip(*(split for row in rows for split in prompt_and_completion(row)))
        mismatched = []
        for prompt, completion in zip(prompts, completions[-1:] + completions[:-1]):
            ids = (prompt + completion)[:self.block_size]
            head = min(max(len(prompt), 1), len(ids))  # the first token of a packed sequence is never a target
            mismatched.append({"input_ids": ids, "labels": [IGNORE] * head + ids[head:],
                               "position_ids": list(range(len(ids)))})
        batch["kl"] = super().__call__(pack_in_order(mismatched, self.block_size))
        return batch


def prompt_and_completion(row: dict) -> list[tuple[list[int], list[int]]]:
    """Each sequence of a packed row as (prompt, completion) token ids: the completion begins at its first target."""
    positions = list(row["position_ids"])
    starts = [i for i, position in enumerate(positions) if position == 0] + [len(positions)]
    out = []
    for begin, end in zip(starts, starts[1:]):
        ids = [int(token) for token in row["input_ids"][begin:end]]
        targets = [label != IGNORE for label in row["labels"][begin:end]]
        cut = targets.index(True) if True in targets else len(ids)
        out.append((ids[:cut], ids[cut:]))
    return out


def pack_in_order(sequences: list[dict], block_size: int) -> list[dict]:
    """Sequences (each at most `block_size` long) packed in their order into rows of at most `block_size`."""
    rows: list[dict] = []
    for sequence in sequences:
        if not rows or len(rows[-1]["input_ids"]) + len(sequence["input_ids"]) > block_size:
            rows.append({key: [] for key in sequence})
        for key, values in sequence.items():
            rows[-1][key] += values
    return rows
