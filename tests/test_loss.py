"""The chunked causal-LM loss equals the transformers loss, values and gradients, on packed rows with prompt and
padding positions ignored; and a train run with it logs the losses of a run without it."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from finetune.collate import PackedCollator
from finetune.loss import chunked_nll_sum
from finetune.modeling import apply_lora, without_kv_cache
from finetune.packing import IGNORE
from finetune.recipe import LoraConfig

VOCAB = 1000


def packed_batch() -> dict[str, torch.Tensor]:
    """Two rows, three examples, prompts not targets, the second row padded."""
    generator = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(1, VOCAB, (n,), generator=generator).tolist()

    a, b, c = ids(9), ids(7), ids(12)
    rows = [{"input_ids": a + b, "labels": [IGNORE] * 4 + a[4:] + [IGNORE] + b[1:],
             "position_ids": list(range(9)) + list(range(7))},
            {"input_ids": c, "labels": [IGNORE] * 3 + c[3:], "position_ids": list(range(12))}]
    return PackedCollator(0)(rows)


def model(lora: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=VOCAB, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    net = GPT2LMHeadModel(config)
    if lora:
        net, _ = apply_lora(net, LoraConfig(r=4, dropout=0.0, targets="all"))
        for name, param in net.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.1)
    return without_kv_cache(net).train()


def gradients(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}
    net.zero_grad()
    return out


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_chunked_loss_equals_transformers_loss_and_gradients(lora: bool, chunk: int) -> None:
    """Bound: the two sum the same float32 terms in another order; measured at 1 and 2 threads, losses (~6)
    differ by at most 9.5e-7 and gradients (up to 0.3) by at most 1.5e-7, so 1e-5 has 10x headroom."""
    net, batch = model(lora), packed_batch()
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    items = int(batch["labels"][:, 1:].ne(IGNORE).sum()) + 3  # as if the accumulated batch held more targets
    reference = net(**inputs, labels=batch["labels"], num_items_in_batch=items).loss
    reference.backward()
    expected = gradients(net)
    outputs = net(**inputs, output_hidden_states=True, logits_to_keep=1)
    assert outputs.logits.shape[1] == 1  # the full logits are never computed
    total, count = chunked_nll_sum(outputs.hidden_states[-1], net.get_output_embeddings().weight, batch["labels"],
                                   chunk)
    loss = (total / items).float()
    loss.backward()
    assert count == items - 3
    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=0)
    got = gradients(net)
    assert got.keys() == expected.keys() and expected
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=0)


def test_a_run_with_the_chunked_loss_logs_the_losses_of_one_without(tmp_path, tokenizer_dir):
    """Bound: the runs differ only in float summation order; over these 20 Adam steps the logged losses differ
    by at most 9.5e-7 (the same run at 2 threads instead of 1: 4.8e-7), so 1e-4 has 100x headroom."""
    from test_train import SCRATCH, train_losses, write_recipe

    from finetune.recipe import load_recipe
    from finetune.train import train

    model_spec = {"model": {"init": SCRATCH}, "tokenizer": {"path": str(tokenizer_dir)}}
    train(load_recipe(write_recipe(tmp_path, model_spec, name="chunked", train={"loss_chunk": 64})))
    train(load_recipe(write_recipe(tmp_path, model_spec, name="plain", train={"loss_chunk": None})))
    chunked, plain = train_losses(tmp_path / "chunked"), train_losses(tmp_path / "plain")
    assert len(chunked) == len(plain) == 20
    torch.testing.assert_close(torch.tensor(chunked), torch.tensor(plain), atol=1e-4, rtol=0)
    assert json.loads((tmp_path / "chunked" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 20
