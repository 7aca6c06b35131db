"""Figures computed in the project: language-model sums -> loss / perplexity / bits per byte, classification
accuracy, macro-F1 and confusion matrix, exact match and BLEU (sacrebleu) for generations.

Language-model figures are built from sums (total NLL, scored tokens, scored bytes) so that batches, windows
and processes can be added up before dividing: the loss is token-weighted, never a mean of per-batch means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import sacrebleu
import torch
from tokenizers import decoders

from finetune.collate import PackedCollator
from finetune.loss import final_hidden, output_weight, target_nll
from finetune.packing import IGNORE


@dataclass
class NllSums:
    """Running sums over scored target tokens."""

    nll: float = 0.0
    tokens: int = 0
    bytes: int = 0

    def add(self, other: "NllSums") -> None:
        self.nll += other.nll
        self.tokens += other.tokens
        self.bytes += other.bytes

    def as_tensor(self, device: torch.device) -> torch.Tensor:
        return torch.tensor([self.nll, self.tokens, self.bytes], dtype=torch.float64, device=device)

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor) -> "NllSums":
        nll, tokens, n_bytes = tensor.tolist()
        return cls(nll, round(tokens), round(n_bytes))

    def figures(self) -> dict:
        """loss (mean NLL per target token, nats), perplexity = exp(loss), bits per byte = NLL / ln 2 / bytes."""
        loss = self.nll / self.tokens if self.tokens else float("nan")
        return {
            "loss": loss,
            "perplexity": math.exp(loss) if self.tokens else float("nan"),
            "bits_per_byte": self.nll / math.log(2) / self.bytes if self.bytes else float("nan"),
            "tokens": self.tokens,
            "bytes": self.bytes,
            "nll_sum": self.nll,
        }


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for; special tokens (EOS) stand for no text and count 0 bytes.

    For byte-level BPE (GPT-2's scheme) every character of a token's string is one byte, so the sum over any
    run of tokens is exactly the byte length of the text they decode to, wherever the run is cut."""
    size = len(tokenizer)
    lengths = np.zeros(size, dtype=np.int64)
    special = set(tokenizer.all_special_ids)
    added = set(tokenizer.added_tokens_decoder)
    byte_level = isinstance(tokenizer.backend_tokenizer.decoder, decoders.ByteLevel)
    for i, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(size)))):
        if i in special:
            continue
        if byte_level and i not in added:
            lengths[i] = len(token)
        else:
            lengths[i] = len(tokenizer.decode([i]).encode("utf-8"))
    return lengths


def batch_sums(model: torch.nn.Module, batch: dict[str, torch.Tensor], byte_lengths: torch.Tensor,
               chunk: int | None) -> NllSums:
    """NLL, token and byte sums of a batch's target tokens; logits are computed `chunk` positions at a time
    (None: all target positions at once)."""
    nll, counts = target_nll(model, batch, chunk)
    labels = batch["labels"][:, 1:]
    targets = labels[labels != IGNORE]
    return NllSums(nll.sum().item(), int(counts.sum()), int(byte_lengths[targets].sum()))


def scoring_row(context: list[int], target: list[int]) -> dict[str, list[int]]:
    """One unpacked row: `context` then `target`, with only the target tokens scored."""
    ids = context + target
    return {"input_ids": ids, "labels": [IGNORE] * len(context) + target, "position_ids": list(range(len(ids)))}


def label_loglikelihoods(model: torch.nn.Module, contexts: list[list[int]], label_ids: list[list[int]],
                         pad_token_id: int) -> torch.Tensor:
    """[contexts, labels] total log-likelihood of each label's tokens as the continuation of each context.

    All labels of all contexts go through one forward pass: single-token labels are read off the next-token
    distribution after the context (one row per context), longer labels get one row per (context, label)."""
    device = next(model.parameters()).device
    collate = PackedCollator(pad_token_id)
    if all(len(ids) == 1 for ids in label_ids):
        batch = {k: v.to(device) for k, v in collate([scoring_row(c, []) for c in contexts]).items()}
        last = torch.tensor([len(c) - 1 for c in contexts], device=device)
        states = final_hidden(model, batch)[torch.arange(len(contexts), device=device), last]
        logprobs = (states @ output_weight(model).T).float().log_softmax(-1)
        return logprobs[:, [ids[0] for ids in label_ids]].cpu()
    rows = [scoring_row(c, target) for c in contexts for target in label_ids]
    nll, _ = target_nll(model, {k: v.to(device) for k, v in collate(rows).items()}, chunk=None)
    return -nll.float().view(len(contexts), len(label_ids)).cpu()


def macro_f1(truth: list[int], predicted: list[int]) -> float:
    """Unweighted mean of per-label F1 over the labels that occur in `truth` or `predicted` (as scikit-learn)."""
    labels = sorted(set(truth) | set(predicted))
    scores = []
    for label in labels:
        tp = sum(1 for t, p in zip(truth, predicted) if t == label and p == label)
        fp = sum(1 for t, p in zip(truth, predicted) if t != label and p == label)
        fn = sum(1 for t, p in zip(truth, predicted) if t == label and p != label)
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores) if scores else float("nan")


def confusion_matrix(truth: list[int], predicted: list[int], n_labels: int) -> list[list[int]]:
    """matrix[true label][predicted label] = count."""
    matrix = [[0] * n_labels for _ in range(n_labels)]
    for t, p in zip(truth, predicted):
        matrix[t][p] += 1
    return matrix


def classification_figures(truth: list[int], predicted: list[int], names: list[str]) -> dict:
    correct = sum(1 for t, p in zip(truth, predicted) if t == p)
    return {
        "accuracy": correct / len(truth) if truth else float("nan"),
        "macro_f1": macro_f1(truth, predicted),
        "examples": len(truth),
        "confusion_matrix": {"labels": names, "rows_true_columns_predicted": confusion_matrix(truth, predicted,
                                                                                              len(names))},
    }


def generation_figures(hypotheses: list[str], references: list[str]) -> dict:
    """Exact match (after stripping whitespace) and corpus BLEU (sacrebleu defaults, 0-100)."""
    exact = sum(1 for h, r in zip(hypotheses, references) if h.strip() == r.strip())
    return {
        "exact_match": exact / len(references) if references else float("nan"),
        "bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score if references else float("nan"),
        "samples": len(references),
    }
