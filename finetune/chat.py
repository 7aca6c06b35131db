"""`finetune chat RECIPE`: a dialogue loop with the run's model and the recipe's chat template.

History is trimmed from the oldest turns to fit the context window (a system prompt is always kept). Typed
commands: /reset (forget the conversation) and /exit. Piped stdin is read line by line, without prompts.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace

from finetune.errors import UserError
from finetune.generation.generator import Generator, Message
from finetune.generation.loading import load_generator
from finetune.generation.params import SEED_RANGE, SamplingParams
from finetune.recipe import Recipe


class ChatSession:
    """A conversation: the system prompt, the turns kept so far, and how replies are sampled."""

    def __init__(self, generator: Generator, params: SamplingParams, system: str | None = None):
        self.generator = generator
        self.params = params
        self.system = system
        self.turns: list[Message] = []
        self.replies = 0

    def reset(self) -> None:
        self.turns = []

    def messages(self) -> list[Message]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.turns

    def reply(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """Answer one user message; turns that no longer fit the context window are dropped for good."""
        ids, kept = self.generator.fit_chat([*self.messages(), {"role": "user", "content": text}],
                                            self.params.max_new_tokens)
        self.turns = kept[1:] if self.system else kept
        seed = (self.params.seed + self.replies) % SEED_RANGE if self.params.seed is not None else None
        request = self.generator.generate(ids, replace(self.params, seed=seed), on_text=on_text)
        self.replies += 1
        answer = request.text.strip()
        self.turns.append({"role": "assistant", "content": answer})
        return answer


def _without_leading_space() -> Callable[[str], None]:
    """Stream a reply to the terminal without the space the template puts after "Assistant:"."""
    started = False

    def show(piece: str) -> None:
        nonlocal started
        if not started:
            piece = piece.lstrip()
            started = bool(piece)
        print(piece, end="", flush=True)

    return show


def chat(recipe: Recipe, params: SamplingParams, system: str | None = None, base: bool = False) -> None:
    """The dialogue loop on stdin and stdout; replies also stop where the model starts the user's next turn."""
    generator = load_generator(recipe, base=base)
    params = params.merged({}, generator.chat_stops())
    session = ChatSession(generator, params, system)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {generator.name} ({generator.context}-token window); /reset, /exit", file=sys.stderr)
    while True:
        try:
            line = input("you> ") if interactive else sys.stdin.readline()
            line.encode("utf-8")  # undecodable input arrives as lone surrogates, which no tokenizer takes
        except EOFError:
            break
        except (UnicodeDecodeError, UnicodeEncodeError):
            print("error: that line is not valid UTF-8; skipped", file=sys.stderr)
            continue
        if not line and not interactive:
            break
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            session.reset()
            print("(conversation reset)", file=sys.stderr)
            continue
        if not text:
            continue
        try:
            session.reply(text, on_text=_without_leading_space())
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
        print()
