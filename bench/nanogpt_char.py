"""The baseline of bench.quality_per_time: a character-level GPT written the way nanoGPT writes its own, trained
with nanoGPT's CPU "baby GPT" settings on the first 90 % of a text, scored on the last 10 %.

    python -m bench.nanogpt_char TRAIN.txt VALIDATION.txt   # prints {"bits_per_byte", "train_seconds"} as JSON

Model: token + position embeddings, pre-LayerNorm blocks (causal sdpa attention, GELU MLP), no biases, tied
head; 4 layers, 4 heads, 128 wide, block 64, no dropout. Training: batch 12 of random windows, AdamW lr 1e-3,
betas 0.9/0.99, weight decay 0.1 on matrices, clip 1.0, 100 warm-up iterations, cosine to 1e-4 over 2000.
Scoring: the validation text in windows of 64 characters without overlap, each character after a window's
first scored (as `finetune eval` with eval.stride = block); a character is one byte here, so bits per byte =
mean NLL / ln 2. `train_seconds` counts from process start to the end of training.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

STARTED = time.perf_counter()
LAYERS, HEADS, WIDTH, BLOCK, BATCH = 4, 4, 128, 64, 12
ITERATIONS, WARMUP, LR, MIN_LR = 2000, 100, 1e-3, 1e-4


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(WIDTH, bias=False), nn.LayerNorm(WIDTH, bias=False)
        self.qkv, self.proj = nn.Linear(WIDTH, 3 * WIDTH, bias=False), nn.Linear(WIDTH, WIDTH, bias=False)
        self.fc, self.out = nn.Linear(WIDTH, 4 * WIDTH, bias=False), nn.Linear(4 * WIDTH, WIDTH, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time_, _ = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(WIDTH, dim=2)
        q, k, v = (t.view(batch, time_, HEADS, WIDTH // HEADS).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(batch, time_, WIDTH)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, WIDTH), nn.Embedding(BLOCK, WIDTH)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(WIDTH, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, 0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.T


def lr_at(step: int) -> float:
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    progress = min((step - WARMUP) / (ITERATIONS - WARMUP), 1.0)
    return MIN_LR + 0.5 * (1 + math.cos(math.pi * progress)) * (LR - MIN_LR)


def main() -> None:
    train_text, validation_text = (Path(p).read_text(encoding="utf-8") for p in sys.argv[1:3])
    chars = sorted(set(train_text + validation_text))
    index = {c: i for i, c in enumerate(chars)}
    train = torch.tensor([index[c] for c in train_text])
    validation = torch.tensor([index[c] for c in validation_text])
    torch.manual_seed(1337)
    model = GPT(len(chars))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=LR, betas=(0.9, 0.99), fused=True)
    for step in range(ITERATIONS):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        starts = torch.randint(len(train) - BLOCK - 1, (BATCH,))
        x = torch.stack([train[s:s + BLOCK] for s in starts])
        y = torch.stack([train[s + 1:s + BLOCK + 1] for s in starts])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    train_seconds = time.perf_counter() - STARTED
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        windows = [validation[s:s + BLOCK] for s in range(0, len(validation) - 1, BLOCK)]
        for begin in range(0, len(windows), 64):
            for window in windows[begin:begin + 64]:
                if len(window) < 2:
                    continue
                logits = model(window[None, :-1])[0]
                total += F.cross_entropy(logits, window[1:], reduction="sum").item()
                count += len(window) - 1
    print(json.dumps({"bits_per_byte": total / count / math.log(2), "train_seconds": train_seconds}))


if __name__ == "__main__":
    main()
