"""The check every GGUF file passes before the export reports it: loaded in llama.cpp, it tokenizes a fixed text
as transformers does, gives the same next-token log-probs at every position of it, greedily continues a prompt
with the tokens transformers chooses, and its chat template renders the prompt the recipe's format renders."""

from __future__ import annotations

from pathlib import Path

import torch

from finetune.export.llama_cpp import LlamaCpp
from finetune.formats import data_format, encode_segments, encode_texts
from finetune.recipe import DataConfig

CHECK_TEXT = ("The quick brown fox jumps over the lazy dog. At 3:45 pm, \"why not?\" she asked -- twice!\n"
              "alpha beta gamma delta")
GREEDY_PROMPT = "alpha beta gamma"
GREEDY_TOKENS = 8
CHECK_CONVERSATION = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "red green?"},
                      {"role": "assistant", "content": "blue"}, {"role": "user", "content": "and after blue?"}]
TOP = 8  # log-probs compared per position: llama.cpp's 8 most likely tokens
# Largest |log-prob difference| allowed between llama.cpp and transformers, as a share of the log-prob range
# (max - min over the vocabulary) at that position: the errors grow with the logits' scale (a trained tiny GPT-2
# with logits 24 apart differs 100x more than a random one with logits 1.5 apart; both are the same share).
# Measured over CHECK_TEXT on the tests' tiny GPT-2s (trained and random, trained and real tokenizer, a LoRA
# merge) and a random one with 15x GPT-2's init scale: f32 <= 9.8e-4, f16 <= 6.1e-4 (llama.cpp's CPU kernels
# round intermediates to f16 even for f32 weights), q8_0 <= 4.0e-2. A mapping mistake (two layer norms swapped)
# measured 0.49.
TOLERANCE = {"f32": 5e-3, "f16": 5e-3, "q8_0": 0.15}


def check_gguf(path: Path, type_name: str, model: torch.nn.Module, tokenizer, data: DataConfig) -> None:
    """Compare the GGUF file at `path` (tensors in `type_name`) with `model` in transformers; print the figures.
    Raises RuntimeError naming the first disagreement beyond the type's tolerance."""
    tolerance = TOLERANCE[type_name]
    context = model.config.n_positions
    fmt = data_format(data)
    full_text_ids = encode_texts(tokenizer, [CHECK_TEXT])[0]
    text_ids = full_text_ids[:context - 1]  # room for the one token llama.cpp samples
    prompt_ids = encode_segments(tokenizer, [fmt.user_prompt(GREEDY_PROMPT)])[0][0][-(context - GREEDY_TOKENS - 1):]
    with LlamaCpp(path, context) as llama:
        problems = []
        if (llama_ids := llama.tokenize(CHECK_TEXT)) != full_text_ids:
            problems.append(f"llama.cpp tokenizes the check text as {llama_ids}, transformers as {full_text_ids}")
        scored = [llama.next_logprobs(text_ids[:n], TOP) for n in range(1, len(text_ids) + 1)]
        greedy = llama.greedy(prompt_ids, GREEDY_TOKENS, TOP)
        chat = None
        if fmt.chat_template() is not None:
            chat = llama.tokenize(llama.chat_prompt(CHECK_CONVERSATION))
    reference = transformers_logprobs(model, text_ids)
    text_gap, text_agree = compare(scored, reference, range(len(text_ids)), problems, tolerance, "check text")
    greedy_ids = [step[0]["id"] for step in greedy]
    reference = transformers_logprobs(model, prompt_ids + greedy_ids)
    positions = range(len(prompt_ids) - 1, len(prompt_ids) + len(greedy_ids) - 1)
    greedy_gap, greedy_agree = compare(greedy, reference, positions, problems, tolerance, "greedy continuation")
    figures = (f"{path.name}: next-token log-probs within {max(text_gap, greedy_gap):.1e} of their range of "
               f"transformers' (tolerance {tolerance:.2g}); top token as transformers at {text_agree}/"
               f"{len(text_ids)} positions of the check text; greedy {greedy_agree}/{len(greedy_ids)} tokens as "
               "transformers")
    if chat is not None:
        expected = encode_segments(tokenizer, [fmt.chat_prompt(CHECK_CONVERSATION)])[0][0]
        if chat != expected:
            problems.append(f"the embedded chat template gives prompt tokens {chat}; the recipe's format {expected}")
        else:
            figures += f"; chat template renders the recipe's prompt ({len(chat)} tokens)"
    print(figures)
    if problems:
        raise RuntimeError(f"{path.name} does not compute what transformers computes: {problems[0]}"
                           + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))


def transformers_logprobs(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([ids]), use_cache=False).logits[0]
    return torch.log_softmax(logits.double(), dim=-1)


def compare(steps: list[list[dict]], reference: torch.Tensor, positions: range, problems: list[str], tolerance: float,
            what: str) -> tuple[float, int]:
    """The largest log-prob gap over llama.cpp's top tokens at `positions` as a share of transformers' log-prob
    range there, and how many of llama.cpp's top-1 tokens are transformers' argmax. A share over `tolerance`, or
    an argmax llama.cpp does not rank in its top, is a problem (an argmax that differs within the tolerance is a
    tie at the type's precision)."""
    worst, agree = 0.0, 0
    for top, position in zip(steps, positions, strict=True):
        expected = reference[position]
        spread = (expected.max() - expected.min()).item()
        share = max(abs(entry["logprob"] - expected[entry["id"]].item()) for entry in top) / spread
        worst = max(worst, share)
        argmax = int(expected.argmax())
        agree += top[0]["id"] == argmax
        if share > tolerance:
            problems.append(f"{what} position {position}: log-probs differ by {share:.1e} of their range "
                            f"(tolerance {tolerance:.2g})")
        elif argmax not in [entry["id"] for entry in top]:
            problems.append(f"{what} position {position}: transformers' most likely token {argmax} is not among "
                            f"llama.cpp's top {len(top)}")
    return worst, agree
