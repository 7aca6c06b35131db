"""The context window a prompt and its reply share: the one policy for fitting a prompt into it (the prompt keeps
its end) and for how long a reply may run (to the end of the window at most)."""

from __future__ import annotations

from finetune.errors import UserError


class PromptTooLong(UserError):
    """A prompt that leaves no room in the context window."""


def reply_reserve(context: int, max_new_tokens: int) -> int:
    """Room a fitted prompt leaves for an open-ended reply: max_new_tokens, at most half the window."""
    return min(max_new_tokens, context // 2)


def fit_prompt(ids: list[int], context: int, reserve: int) -> list[int]:
    """The end of a prompt that leaves `reserve` tokens of the window free (the whole prompt when it fits)."""
    keep = context - reserve
    return ids[-keep:] if len(ids) > keep else ids


def reply_budget(prompt_tokens: int, context: int, max_new_tokens: int) -> int:
    """New tokens a reply may have after the prompt: max_new_tokens, up to the end of the window (below 1: none)."""
    return min(max_new_tokens, context - prompt_tokens)


def check_room(prompt_tokens: int, context: int, model: str) -> None:
    """Refuse a prompt after which not even one new token fits."""
    if reply_budget(prompt_tokens, context, 1) < 1:
        raise PromptTooLong(f"the prompt is {prompt_tokens} tokens, but model {model!r} has a context window of "
                            f"{context} tokens, which must also hold at least one new token")
