"""OpenAI response objects (completions, chat completions, their streamed chunks) and server-sent events."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from finetune.generation.engine import Request
from finetune.serve.schemas import StreamOptions
from finetune.serve.worker import GenerationFailed, Pending


def sse(events: AsyncIterator[dict]) -> StreamingResponse:
    async def lines() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield f"data: {json.dumps(event)}\n\n"
        except GenerationFailed as exc:  # the status line is sent already: report in the stream, as OpenAI does
            yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'server_error'}})}\n\n"
            return
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class Reply:
    """OpenAI response objects for one request."""

    def __init__(self, model: str, prefix: str, kind: str, prompt_tokens: int):
        self.head = {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": model}
        self.prompt_tokens = prompt_tokens

    def usage(self, results: list[Request]) -> dict:
        completion = sum(len(r.token_ids) for r in results)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def completion(self, results: list[Request]) -> dict:
        return {**self.head, "choices": [{"index": i, "text": r.text, "finish_reason": r.finish_reason,
                                          "logprobs": None} for i, r in enumerate(results)],
                "usage": self.usage(results)}

    def chat(self, results: list[Request]) -> dict:
        """The reply without the template's space after "Assistant:", but with any whitespace it ends in (as
        OpenAI and vLLM return it, and as chat_stream sends it)."""
        return {**self.head, "choices": [{"index": i, "message": {"role": "assistant", "content": r.text.lstrip()},
                                          "finish_reason": r.finish_reason, "logprobs": None}
                                         for i, r in enumerate(results)],
                "usage": self.usage(results)}

    async def completion_stream(self, pending: Pending, options: StreamOptions | None) -> AsyncIterator[dict]:
        head = {**self.head, "object": "text_completion"}
        async for index, text in pending.events_until_done():
            finish = pending.requests[index].finish_reason if text is None else None
            yield {**head, "choices": [{"index": index, "text": text or "", "finish_reason": finish,
                                        "logprobs": None}]}
        if options and options.include_usage:
            yield {**head, "choices": [], "usage": self.usage(pending.requests)}

    async def chat_stream(self, pending: Pending, options: StreamOptions | None) -> AsyncIterator[dict]:
        head = {**self.head, "object": "chat.completion.chunk"}
        started: set[int] = set()
        for index in range(len(pending.requests)):
            yield {**head, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                        "finish_reason": None}]}
        async for index, text in pending.events_until_done():
            if text is None:
                yield {**head, "choices": [{"index": index, "delta": {},
                                            "finish_reason": pending.requests[index].finish_reason}]}
                continue
            if index not in started:  # the template's space after "Assistant:" is not part of the answer
                text = text.lstrip()
                if not text:
                    continue
                started.add(index)
            yield {**head, "choices": [{"index": index, "delta": {"content": text}, "finish_reason": None}]}
        if options and options.include_usage:
            yield {**head, "choices": [], "usage": self.usage(pending.requests)}
