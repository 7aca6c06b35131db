"""The causal-LM loss without the batch's full logits.

At the real GPT-2 vocabulary (50,257) the logits of a batch are large: 411 MB at batch 16 x 128 on a CPU,
1.6 GB of fp32 for gpt2 at batch 8 x 1024 on a GPU, twice with their gradient. Here the final hidden states of
the target positions are multiplied by the output embedding a chunk of positions at a time; each chunk's
cross-entropy and its gradients (softmax minus one-hot, multiplied back) are computed together, as fused
linear cross-entropy kernels do, so at most one chunk of logits exists at any moment and nothing is recomputed.
The result is the transformers loss: the sum of next-token NLL over target positions, divided
by the target count (or Trainer's `num_items_in_batch`, the targets of the whole accumulated batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from finetune.packing import IGNORE


def _chunk_nll(states: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy((states @ weight.T).float(), targets, reduction="sum")


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(states @ weight.T, targets), with the gradients computed in the forward
    pass a chunk at a time (softmax minus one-hot, times the chunk's states / the weight), so backward only
    scales them: one chunk of logits alive at any moment and no recomputation."""

    @staticmethod
    def forward(ctx, states: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        need_states, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_states = torch.empty_like(states) if need_states else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        total = torch.zeros((), dtype=torch.float64, device=states.device)
        for start in range(0, len(targets), chunk):
            rows, picked = states[start:start + chunk], targets[start:start + chunk]
            logits = (rows @ weight.T).float()
            norm = torch.logsumexp(logits, dim=-1)
            total += (norm - logits.gather(1, picked[:, None]).squeeze(1)).sum()
            if need_states or need_weight:
                grad = logits.sub_(norm[:, None]).exp_()  # softmax, in place of the logits
                grad[torch.arange(len(picked), device=grad.device), picked] -= 1
                grad = grad.to(states.dtype)
                if need_states:
                    grad_states[start:start + chunk] = grad @ weight
                if need_weight:
                    grad_weight += (grad.T @ rows).float()
        ctx.save_for_backward(grad_states, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_states, grad_weight = ctx.saved_tensors
        scale = grad_total.float()
        return (None if grad_states is None else grad_states * scale.to(grad_states.dtype),
                None if grad_weight is None else (grad_weight * scale).to(ctx.weight_dtype), None, None)


def chunked_nll_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int
                    ) -> tuple[torch.Tensor, int]:
    """The training loss's numerator, with gradients: (sum of the NLL of `labels[:, 1:]` predicted from
    `hidden[:, :-1]` over target positions, target count).

    `hidden` is the model's final hidden state (batch, time, width), `weight` its output embedding (vocab,
    width); positions whose label is IGNORE are never multiplied out. The sum is float64 (each chunk's terms
    are summed in float32, as in transformers' loss)."""
    states, targets, _ = _target_positions(hidden, labels)
    return _LinearCrossEntropy.apply(states, weight, targets, chunk), len(targets)


@torch.no_grad()
def target_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk: int | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scoring (no gradients): per row of a PackedCollator batch, the summed NLL (float64) of its target tokens
    and their count. The one NLL of eval, of validation during training and of label scoring. With `chunk`,
    logits exist for that many target positions at a time; without, they come from the model's own forward
    (as they must when FSDP or DeepSpeed shard the output embedding)."""
    labels = batch["labels"]
    counts = labels[:, 1:].ne(IGNORE).sum(1)
    if chunk is None:
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=IGNORE,
                              reduction="none")
        return nll.double().sum(1), counts
    hidden = final_hidden(model, batch)
    weight = output_weight(getattr(model, "module", model))  # under DDP, the wrapped model's
    states, targets, rows = _target_positions(hidden, labels)
    sums = torch.zeros(len(hidden), dtype=torch.float64, device=hidden.device)
    for start in range(0, len(targets), chunk):
        nll = F.cross_entropy((states[start:start + chunk] @ weight.T).float(), targets[start:start + chunk],
                              reduction="none")
        sums.index_add_(0, rows[start:start + chunk], nll.double())
    return sums, counts


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk: int | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence of a PairCollator batch: the summed log-probability of its target tokens (float32, with
    gradients when they are enabled) and their count. With `chunk`, logits exist for that many target positions
    at a time, in the forward pass and again in the backward pass, which recomputes them; without, they come from
    the model's own forward (FSDP, DeepSpeed)."""
    labels, sequence_ids = batch["labels"], batch["sequence_ids"]
    count = int(sequence_ids.max()) + 1
    if chunk is None:
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        hidden, weight = logits, None
    else:
        hidden, weight = final_hidden(model, batch), output_weight(getattr(model, "module", model))
    states, targets, _ = _target_positions(hidden, labels)
    owner = sequence_ids[:, 1:].reshape(-1)[labels[:, 1:].reshape(-1).ne(IGNORE)]
    if weight is None:
        nll = F.cross_entropy(states.float(), targets, reduction="none")
    else:
        nll = torch.cat([_token_nll(states[start:start + chunk], weight, targets[start:start + chunk])
                         for start in range(0, len(targets), chunk)])
    logps = torch.zeros(count, dtype=torch.float32, device=nll.device).index_add(0, owner, -nll)
    return logps, sequence_target_counts(batch)


def sequence_target_counts(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per sequence of a PairCollator batch: the number of its target tokens."""
    labels, sequence_ids = batch["labels"], batch["sequence_ids"]
    owner = sequence_ids[:, 1:][labels[:, 1:].ne(IGNORE)]
    return torch.bincount(owner, minlength=int(sequence_ids.max()) + 1)


def _token_nll(states: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token NLL of one chunk; with gradients, its logits are recomputed in backward instead of kept."""
    def nll(states: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy((states @ weight.T).float(), targets, reduction="none")

    if torch.is_grad_enabled():
        return checkpoint(nll, states, weight, use_reentrant=False)
    return nll(states, weight)


def _target_positions(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hidden states that predict a target token, the targets, and the row each is in."""
    targets = labels[:, 1:].reshape(-1)
    keep = targets.ne(IGNORE).nonzero().squeeze(1)
    states = hidden[:, :-1].reshape(-1, hidden.size(-1)).index_select(0, keep)
    return states, targets.index_select(0, keep), keep // (labels.size(1) - 1)


def final_hidden(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's last hidden state (after the final layer norm), computing logits for one position only.
    `batch` comes from PackedCollator (no attention mask; position ids restart per packed example)."""
    outputs = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                    output_hidden_states=True, logits_to_keep=1)
    return outputs.hidden_states[-1]


def output_weight(model: torch.nn.Module) -> torch.Tensor:
    return model.get_output_embeddings().weight


def token_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk: int | None, entropy: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per row of a padded batch with an attention mask (`input_ids`, `attention_mask`, `position_ids`, `labels`):
    the log-probability of each target token, laid out as `labels[:, 1:]` (0 where there is no target; float32,
    with gradients when they are enabled), and with `entropy` the entropy of the model's next-token distribution
    there (no gradients). With `chunk`, logits exist for that many target positions at a time; without, they come
    from the model's own forward (FSDP, DeepSpeed)."""
    labels = batch["labels"]
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids")}
    if chunk is None:
        hidden, weight = model(**inputs, use_cache=False).logits, None
    else:
        hidden = model(**inputs, use_cache=False, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
        weight = output_weight(getattr(model, "module", model))
    states, targets, _ = _target_positions(hidden, labels)
    step = chunk or max(len(targets), 1)
    pieces = [(states[start:start + step], targets[start:start + step]) for start in range(0, len(targets), step)]
    if weight is None:
        nll = F.cross_entropy(states.float(), targets, reduction="none")
    else:
        nll = torch.cat([states.new_zeros(0)] + [_token_nll(rows, weight, picked) for rows, picked in pieces])
    keep = labels[:, 1:].ne(IGNORE)
    logps = torch.zeros(keep.shape, dtype=torch.float32, device=nll.device).masked_scatter(keep, -nll.float())
    if not entropy:
        return logps, None
    with torch.no_grad():
        values = []
        for rows, _ in pieces:
            logits = (rows if weight is None else rows @ weight.T).float()
            values.append(torch.logsumexp(logits, -1) - (logits.softmax(-1) * logits).sum(-1))
        flat = torch.cat([logps.new_zeros(0), *values])
        entropies = torch.zeros_like(logps).masked_scatter(keep, flat)
    return logps, entropies
