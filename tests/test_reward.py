"""Reward models (issue 22, `train.objective: reward`): GPT-2 with a scalar head trained on preference pairs with
the Bradley-Terry loss. The loss against TRL's RewardTrainer, packed pair rows against sequences scored one by one
(and by plain transformers), and a tiny model trained through `finetune train` / `finetune eval`.

Bounds: REWARD_ABSOLUTE is float32 rounding of a reward, TRL_RELATIVE float32 noise in the loss and gradients, each
measured where it is used. A wrong position (one token off), sign or pairing moves these figures by > 1e-2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import trl_deprecations
from preference_pairs import pair_rows, separable_pairs, train_and_evaluate, write_run
from finetune.collate import PairCollator
from finetune.modeling import without_kv_cache
from finetune.preference_trainer import disable_dropout
from finetune.recipe import PreferenceConfig, load_recipe
from finetune.reward import reward_losses, sequence_rewards
from finetune.tokenizer import load_tokenizer

REWARD_ABSOLUTE = 6e-6  # measured in test_packed_pair_rows_give_the_rewards_of_sequences_run_one_by_one
TRL_RELATIVE = 5e-6  # measured in test_reward_loss_and_gradients_equal_trls


def reward_model(model_dir: Path, pad_token_id: int | None):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, pad_token_id=pad_token_id)
    return without_kv_cache(model)


def unused_token(rows: list[dict], vocab_size: int) -> int:
    """A token id in no sequence: TRL (GPT-2's own lookup) pads with it, so its last non-pad token is each
    sequence's last token, as ours (the EOS that closes the response; pad == EOS would hide it)."""
    used = {token for row in rows for token in row["input_ids"]}
    return next(i for i in range(vocab_size) if i not in used)


@trl_deprecations
def test_reward_loss_and_gradients_equal_trls(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The same pairs, tokenized once, through TRL 1.16's RewardTrainer.compute_loss (its collator: chosen
    sequences then rejected ones, right-padded, attention mask; GPT-2's pooling at the last non-pad token) and
    through ours (all pairs packed in one row, the last token of each sequence read by position), on the same
    model, with TRL's centring term on. TRL runs with bf16=False (its configs default to bf16, which autocasts on
    CPU; see test_preference's DPO comparison).

    Measured on this machine, the same at 1 and 2 threads: the losses agree bitwise (1.0464995) and the gradients
    within 2.6e-7 (relative to the largest, 7.2); against a float64 run of TRL's computation, TRL's float32 side is
    off by 5.2e-8 (loss) and 4.8e-7 (gradients), ours by 5.2e-8 and 3.6e-7. TRL_RELATIVE is 10x the largest."""
    trl = pytest.importorskip("trl", minversion="1.16", reason="TRL is the reward-model reference")
    from datasets import Dataset
    from trl.trainer.reward_trainer import DataCollatorForPreference

    tokenizer = load_tokenizer(str(tiny_model_dir))
    pairs = separable_pairs(4, seed=3)
    examples, rows = pair_rows(tokenizer, pairs)
    pad = unused_token(rows, len(tokenizer))
    model = reward_model(tiny_model_dir, pad).train()
    disable_dropout(model)
    with torch.no_grad():  # a head that separates the rewards, so the loss is not at log 2
        model.score.weight.mul_(20)
    args = trl.RewardConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, bf16=False,
                            per_device_train_batch_size=4, center_rewards_coefficient=0.01)
    trainer = trl.RewardTrainer(model=model, args=args, processing_class=tokenizer,
                                train_dataset=Dataset.from_list(pairs))
    model.config.pad_token_id = pad  # TRL sets the tokenizer's (EOS)
    sequences = [{"chosen_ids": e["prompt_ids"] + e["chosen_ids"], "rejected_ids": e["prompt_ids"] + e["rejected_ids"]}
                 for e in examples]
    trl_batch = trainer._prepare_inputs(DataCollatorForPreference(pad_token_id=pad)(sequences))
    trl_loss = trainer.compute_loss(model, trl_batch)
    trl_loss.backward()
    trl_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    rewards = sequence_rewards(model, PairCollator(pad)(rows))
    ours = reward_losses(PreferenceConfig(center_rewards_coefficient=0.01), rewards).losses.mean()
    ours.backward()
    assert abs(ours.item() - trl_loss.item()) <= TRL_RELATIVE * abs(trl_loss.item())
    assert abs(trl_loss.item() - 0.6931) > 1e-2  # not the trivial point
    largest = max(g.abs().max().item() for g in trl_grads)
    assert model.score.weight.grad.abs().max() > 0
    for parameter, expected in zip(model.parameters(), trl_grads):
        assert (parameter.grad - expected).abs().max().item() <= TRL_RELATIVE * largest


def test_packed_pair_rows_give_the_rewards_of_sequences_run_one_by_one(tiny_model_dir: Path) -> None:
    """Pairs packed in one row, against each sequence alone through plain transformers (pad id unset: GPT-2 then
    pools the last token, as final/ is saved). Measured, the same at 1 and 2 threads: up to 4.8e-7 apart (rewards
    0.05 to 1.0); packed float32 rewards up to 5.8e-7 from float64. REWARD_ABSOLUTE is 10x that; reading the token
    before EOS instead moves a reward by at least 7.3e-2."""
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = reward_model(tiny_model_dir, tokenizer.pad_token_id).eval()
    with torch.no_grad():
        model.score.weight.mul_(20)
    pairs = separable_pairs(3, seed=4)
    examples, rows = pair_rows(tokenizer, pairs)
    with torch.no_grad():
        packed = sequence_rewards(model, PairCollator(tokenizer.pad_token_id)(rows))
        model.config.pad_token_id = None
        alone = torch.tensor([model(input_ids=torch.tensor([e["prompt_ids"] + e[side]])).logits.item()
                              for e in examples for side in ("chosen_ids", "rejected_ids")])
        one_off = torch.tensor([model(input_ids=torch.tensor([e["prompt_ids"] + e[side][:-1]])).logits.item()
                                for e in examples for side in ("chosen_ids", "rejected_ids")])
    assert len(packed) == 6
    assert (packed - alone).abs().max() <= REWARD_ABSOLUTE
    assert (one_off - alone).abs().min() > 1e-2  # the position matters: reading the token before EOS is caught


def test_lora_reward_model_trains_the_head_in_full_and_merges(tmp_path: Path, tiny_model_dir: Path) -> None:
    """With LoRA the head is trained in full (modules_to_save) beside the adapter; final/ (the adapter) merges
    into a plain model that scores as the adapter did."""
    from transformers import AutoModelForSequenceClassification

    from finetune.merge import merge
    from finetune.prepare import prepare
    from finetune.prepared import load_prepared_tokenizer
    from finetune.train import build_model, build_trainer, save_final

    recipe = load_recipe(write_run(tmp_path, tiny_model_dir, separable_pairs(40, seed=5), {"r": 4, "alpha": 8},
                                   objective="reward"))
    prepare(recipe)
    tokenizer = load_prepared_tokenizer(recipe)
    model = build_model(recipe, tokenizer)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any("score" in name and "modules_to_save" in name for name in trained)
    assert any("lora_A" in name for name in trained) and not any("wte" in name for name in trained)
    trainer = build_trainer(recipe, model, tokenizer)
    with torch.no_grad():  # a trained-looking adapter and head
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                parameter.add_(torch.randn_like(parameter) * 0.5)
    recipe.run.claim(recipe.run.final, recipe.run.final.with_name("final.tmp"))  # as the train stage does
    save_final(recipe, trainer, tokenizer)
    merged = AutoModelForSequenceClassification.from_pretrained(merge(recipe)).eval()
    examples, rows = pair_rows(tokenizer, separable_pairs(3, seed=8))
    with torch.no_grad():
        expected = sequence_rewards(model.eval(), PairCollator(tokenizer.pad_token_id)(rows))
        plain = torch.tensor([merged(input_ids=torch.tensor([e["prompt_ids"] + e[side]])).logits.item()
                              for e in examples for side in ("chosen_ids", "rejected_ids")])
    assert (plain - expected).abs().max() <= REWARD_ABSOLUTE


def test_a_reward_model_has_no_next_token_figures(tmp_path: Path, tiny_model_dir: Path) -> None:
    from finetune.errors import UserError

    text = tmp_path / "held_out.txt"
    text.write_text("alpha beta\n")
    path = write_run(tmp_path, tiny_model_dir, separable_pairs(4, seed=9), objective="reward")
    load_recipe(path)
    with pytest.raises(UserError, match="reward model .* 'eval.files' and 'eval.harness' do not apply"):
        load_recipe(path, [f"eval.files=[{text}]"])


def test_tiny_reward_model_learns_separable_pairs(tmp_path: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    from finetune.errors import UserError
    from finetune.generation.loading import load_generator

    recipe = write_run(tmp_path, tiny_model_dir, separable_pairs(200, seed=6), objective="reward", max_steps=30,
                       lr=1e-3, save_steps=30)
    results, metrics = train_and_evaluate(recipe, tmp_path / "pref")
    assert results["pairs"] >= 40
    assert results["pair_accuracy"] > 0.9 and results["pair_margin"] > 0
    assert results["baseline"]["pair_accuracy"] < 0.9  # the untrained head
    assert not {"kl_to_reference", "policy_samples", "heldout_text"} & (set(results) | set(results["baseline"]))
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(metrics[0])
    # final/ loads with plain transformers and scores text: the pairs' sequences one at a time, ending in EOS
    final = tmp_path / "pref" / "final"
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    tokenizer = load_tokenizer(str(final))
    examples, _ = pair_rows(tokenizer, separable_pairs(10, seed=7))
    with torch.no_grad():
        scores = [[model(input_ids=torch.tensor([e["prompt_ids"] + e[side]])).logits.item()
                   for side in ("chosen_ids", "rejected_ids")] for e in examples]
    assert sum(chosen > rejected for chosen, rejected in scores) >= 9
    with pytest.raises(UserError, match="is a reward model .* does not generate"):  # generate, chat, serve
        load_generator(load_recipe(recipe))
