"""The request bodies of the HTTP API (pydantic): strict types, unknown fields refused, sampling fields optional
(unset ones come from the recipe's `generate` section) and bounded as the recipe's `generate` keys are."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from finetune.generation.generator import Message
from finetune.recipe import MAX_STOP_LENGTH, MAX_STOPS, bound

MAX_CHOICES = 16
MAX_PROMPTS = 32


def _encodable(text: str) -> str:
    """JSON may carry lone surrogates ("\\ud800"), which no tokenizer can take: reject them as bad input."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"contains a lone surrogate (\\u{ord(text[exc.start]):04x}) at character {exc.start}; "
                         "send valid Unicode") from None
    return text


def bounded(key: str) -> Any:
    """The recipe's bound of `key` as a pydantic constraint: recipe, command line and HTTP API share one set."""
    limits = bound(key)
    constraints = {"ge" if limits.low_ok else "gt": limits.low}
    if limits.high is not None:
        constraints["le" if limits.high_ok else "lt"] = limits.high
    return Field(**constraints)


Text = Annotated[str, AfterValidator(_encodable)]
Temperature = Annotated[float, bounded("generate.temperature")]
TopP = Annotated[float, bounded("generate.top_p")]
TopK = Annotated[int, bounded("generate.top_k")]
Penalty = Annotated[float, bounded("generate.repetition_penalty")]
Seed = Annotated[int, bounded("generate.seed")]
StopText = Annotated[Text, Field(min_length=1, max_length=MAX_STOP_LENGTH)]
Stop = StopText | Annotated[list[StopText], Field(max_length=MAX_STOPS)]
Count = Annotated[int, bounded("generate.max_new_tokens")]

# fields whose type is a union: pydantic reports one error per member, so a bad value is described as a whole
UNION_FIELDS = {"prompt": f"a string or a list of 1 to {MAX_PROMPTS} strings",
                "stop": f"a non-empty string or a list of up to {MAX_STOPS} non-empty strings",
                "content": "a string or a list of text parts"}


class Body(BaseModel):
    """Sampling fields shared by every endpoint."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    repetition_penalty: Penalty | None = None
    stop: Stop | None = None
    seed: Seed | None = None

    def sampling_settings(self) -> dict[str, Any]:
        """The sampling settings this request gives, as SamplingParams fields (None: not given)."""
        stop = None if self.stop is None else tuple([self.stop] if isinstance(self.stop, str) else self.stop)
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "repetition_penalty": self.repetition_penalty, "stop": stop, "seed": self.seed}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


UNSUPPORTED = {"presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {}),
               "echo": (None, False), "logprobs": (None, False, 0), "best_of": (None, 1), "suffix": (None, ""),
               "top_logprobs": (None, 0)}


class OpenAIBody(Body):
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    max_tokens: Count | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, options: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if options is not None and info.data.get("stream") is not True:
            raise ValueError("only allowed when 'stream' is true")
        return options

    @model_validator(mode="after")
    def _neutral_only(self) -> OpenAIBody:
        """Fields clients send with neutral values are accepted; real use of them is refused, not ignored."""
        for name, value in self.model_dump(exclude_unset=True).items():
            if name in UNSUPPORTED and value not in UNSUPPORTED[name]:
                raise ValueError(f"'{name}' = {value!r} is not supported by this server")
        return self


class GenerateBody(Body):
    prompt: Text
    max_new_tokens: Count | None = None
    raw: bool = False


class CompletionBody(OpenAIBody):
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)]
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]
    name: str | None = None

    def plain(self) -> Message:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatBody(OpenAIBody):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Count | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
