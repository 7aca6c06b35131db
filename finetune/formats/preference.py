"""`preference`: pairs of responses to one prompt, the chosen one preferred over the rejected one (DPO and its
family). Three shapes are read:

- explicit: {prompt, chosen, rejected}, the prompt a string (one user turn) or a list of messages;
- whole dialogues (Anthropic HH-RLHF): {chosen, rejected}, each "\\n\\nHuman: ...\\n\\nAssistant: ..."; the prompt
  is everything up to and including the last "\\n\\nAssistant:" (split on the turn structure, and the same in both);
- conversations: {conversations | messages, chosen, rejected}, ShareGPT or OpenAI messages, each response a
  string, a message or a list ending in one.

The prompt is rendered with the recipe's chat template (`data.chat`) exactly as chat training renders a
conversation up to an assistant turn; each response is a target closed by EOS.

Record: {"prompt": [messages], "chosen": text, "rejected": text}.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from finetune.errors import UserError
from finetune.fields import ranged
from finetune.formats.base import EOS, Message, Segment
from finetune.formats.chat import Chat, ChatFormat, chat_segments, parse_messages

ASSISTANT = "\n\nAssistant:"
TURN = re.compile(r"\n\n(Human|Assistant):")


@dataclass
class PreferenceFormat:
    """`data.preference`: the pair's field names and the prompt's share of a sequence."""
    prompt_field: str = "prompt"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    messages_field: str | None = None  # the conversations shape; default: `messages` or `conversations`
    max_prompt_tokens: int | None = ranged(None, 1)  # prompts cut from the left; default: a quarter of the block


class Preference(Chat):
    name = "preference"
    paired = True
    objectives = ("dpo", "ipo", "simpo", "reward")
    has_reference = False

    def normalize(self, row: dict, where: Any) -> tuple[dict | None, str | None]:
        cfg = self.data.preference
        responses = [row.get(cfg.chosen_field), row.get(cfg.rejected_field)]
        messages_field = cfg.messages_field or next((f for f in ("messages", "conversations") if f in row), None)
        if row.get(cfg.prompt_field) is not None:
            prompt = prompt_messages(row[cfg.prompt_field], f"{where}: field '{cfg.prompt_field}'")
        elif messages_field is not None and row.get(messages_field) is not None:
            prompt = parse_messages(row[messages_field], where)
        elif all(isinstance(text, str) for text in responses):
            return split_dialogues(*responses)
        else:
            return None, "missing_field"
        if any(r is None for r in responses):
            return None, "missing_field"
        chosen, rejected = (response_text(r, f"{where}: field '{name}'")
                            for r, name in zip(responses, (cfg.chosen_field, cfg.rejected_field)))
        return pair_record(prompt, chosen, rejected)

    def pair_segments(self, record: dict) -> tuple[list[Segment], list[Segment], list[Segment]]:
        prompt = chat_segments(record["prompt"], self.data.chat, add_generation_prompt=True)
        return prompt, self._response(record["chosen"]), self._response(record["rejected"])

    def _response(self, text: str) -> list[Segment]:
        return response_segments(self.data.chat, text)

    def segments(self, record: dict) -> list[Segment]:
        """The prompt and the chosen response (the conversation the pair prefers)."""
        prompt, chosen, _ = self.pair_segments(record)
        return prompt + chosen

    def prompt_segments(self, record: dict) -> list[Segment]:
        return self.pair_segments(record)[0]


def response_segments(chat: ChatFormat, text: str) -> list[Segment]:
    """A response as a target closed by EOS, written as the chat template writes an assistant reply."""
    return [(chat.assistant_content.format(content=text), True), (EOS, True)]


def pair_record(prompt: list[Message], chosen: str, rejected: str) -> tuple[dict | None, str | None]:
    if not chosen.strip() or not rejected.strip():
        return None, "empty_response"
    if chosen == rejected:
        return None, "identical"
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}, None


def prompt_messages(value: Any, where: str) -> list[Message]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return parse_messages(value, where)


def response_text(value: Any, where: str) -> str:
    """A response: a string, one message, or a list of messages whose last one is the assistant's reply."""
    if isinstance(value, str):
        return value
    messages = parse_messages([value] if isinstance(value, dict) else value, where)
    if not messages or messages[-1]["role"] != "assistant":
        raise UserError(f"{where}: a response must be a string or end with an assistant message")
    return messages[-1]["content"]


def split_dialogues(chosen: str, rejected: str) -> tuple[dict | None, str | None]:
    """HH-RLHF: the shared prompt is each dialogue up to its last assistant marker, and must be the same in both."""
    cut_chosen, cut_rejected = chosen.rfind(ASSISTANT), rejected.rfind(ASSISTANT)
    if cut_chosen < 0 or cut_rejected < 0:
        return None, "not_a_dialogue"
    head = chosen[:cut_chosen]
    if head != rejected[:cut_rejected]:
        return None, "prompts_differ"
    turns = TURN.split(head)
    if turns[0].strip():  # text before the first turn marker
        return None, "not_a_dialogue"
    prompt = [{"role": "user" if role == "Human" else "assistant", "content": text.strip()}
              for role, text in zip(turns[1::2], turns[2::2])]
    if not prompt:
        return None, "not_a_dialogue"
    return pair_record(prompt, chosen[cut_chosen + len(ASSISTANT):].strip(),
                       rejected[cut_rejected + len(ASSISTANT):].strip())
