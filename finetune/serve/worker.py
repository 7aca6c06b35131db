"""Continuous batching: one thread per model decodes all waiting requests as one batch, and the event loop
receives each request's text and completion (or gives up on them when the client hangs up). Prompts are tokenized
off the event loop too."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from finetune.generation.engine import Batch, Request
from finetune.generation.generator import Generator
from finetune.generation.params import SamplingParams

JOIN_RATIO = 0.3  # newcomers join a running batch once they are this fraction of it...
JOIN_AFTER_STEPS = 8  # ...or after this many decode steps


class GenerationFailed(Exception):
    """Decoding a request raised (the server's failure, not the client's)."""


class ClientGone(Exception):
    """The client hung up before its requests finished; they were cancelled."""


class ModelWorker:
    """One model's request queue, and the thread that decodes the waiting requests as one batch. Requests that
    arrive while a batch is running join it at the next step (continuous batching), up to max_batch_size rows."""

    def __init__(self, generator: Generator, defaults: SamplingParams, max_batch_size: int = 32,
                 gather_seconds: float = 0.002):
        self.generator = generator
        self.defaults = defaults
        self.max_batch_size = max_batch_size
        self.gather_seconds = gather_seconds
        self.stats = {"requests": 0, "steps": 0, "largest_batch": 0, "mean_batch": 0.0}
        self._queue: queue.Queue[Request | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._tokenizing = threading.Lock()

    @property
    def name(self) -> str:
        return self.generator.name

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=f"decode-{self.name}", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    async def tokenize(self, build: Callable[[], list[int]]) -> list[int]:
        """`build()`, a prompt's token ids, made on a worker thread so that the event loop stays free (the Rust
        tokenizer releases the GIL); one prompt at a time, as encoding switches a setting of the shared tokenizer."""
        def locked() -> list[int]:
            with self._tokenizing:
                return build()

        return await asyncio.to_thread(locked)

    def submit(self, requests: list[Request]) -> None:
        for request in requests:
            self._queue.put(request)

    def _take(self, room: int, wait: bool) -> list[Request] | None:
        """Up to `room` waiting requests; with `wait`, block for the first and gather briefly. None = stop."""
        taken: list[Request] = []
        deadline = None
        while len(taken) < room:
            try:
                if wait and not taken:
                    item = self._queue.get()
                    deadline = time.monotonic() + self.gather_seconds
                elif deadline is not None:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                else:
                    item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return None
            taken.append(item)
        return taken

    def _admit(self, running: int, steps_waited: int) -> int:
        """How many waiting requests may join now. Each admission costs a prefill pass, so while a batch runs,
        newcomers join in groups (like TGI's waiting_served_ratio), or after a few steps at the latest."""
        room = self.max_batch_size - running
        waiting = self._queue.qsize()
        if not running or waiting >= max(1.0, JOIN_RATIO * running) or (waiting and steps_waited >= JOIN_AFTER_STEPS):
            return room
        return 0

    def _loop(self) -> None:
        batch = Batch(self.generator.engine)
        steps_waited = 0
        while (waiting := self._take(self._admit(len(batch.rows), steps_waited), wait=not batch.rows)) is not None:
            steps_waited = 0 if waiting else steps_waited + 1
            self.stats["requests"] += len(waiting)
            try:
                batch.add(waiting)
            except Exception as exc:  # noqa: BLE001 - report to the waiting clients instead of hanging them
                _fail(waiting, exc)
            if not batch.rows:
                continue
            steps = self.stats["steps"]
            self.stats["mean_batch"] = (self.stats["mean_batch"] * steps + len(batch.rows)) / (steps + 1)
            self.stats["steps"] = steps + 1
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch.rows))
            try:
                batch.step()
            except Exception as exc:  # noqa: BLE001
                _fail(batch.rows, exc)
                batch = Batch(self.generator.engine)


def _fail(requests: list[Request], exc: Exception) -> None:
    for request in requests:
        if request.finish_reason is None:
            request.fail(f"{type(exc).__name__}: {exc}")


class Pending:
    """Requests handed to a worker; their text and completion arrive on the event loop as (index, text|None)."""

    def __init__(self, worker: ModelWorker, prompts: list[list[int]], params: list[SamplingParams], stream: bool):
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[int, str | None]] = asyncio.Queue()

        def push(item: tuple[int, str | None]) -> None:
            try:
                loop.call_soon_threadsafe(self.events.put_nowait, item)
            except RuntimeError:  # the event loop closed (server shutting down)
                pass

        self.requests = [
            Request(ids, p, on_text=(lambda text, i=i: push((i, text))) if stream else None,
                    on_finish=lambda _, i=i: push((i, None)))
            for i, (ids, p) in enumerate(zip(prompts, params))
        ]
        worker.submit(self.requests)

    async def events_until_done(self) -> AsyncIterator[tuple[int, str | None]]:
        """Each request's text as it comes (with `stream`) and its completion (text None); GenerationFailed when
        one fails."""
        remaining = len(self.requests)
        try:
            while remaining:
                index, text = await self.events.get()
                if text is None and self.requests[index].finish_reason == "error":
                    raise GenerationFailed(f"generation failed: {self.requests[index].error}")
                remaining -= text is None
                yield index, text
        finally:
            self.cancel()

    async def results(self, hangup: Awaitable[None] | None = None) -> list[Request]:
        """The finished requests (GenerationFailed when one fails). When `hangup` (the client closing its connection)
        completes first, the requests are cancelled, so the decoding thread drops them, and ClientGone is raised."""
        waiting = [asyncio.ensure_future(self._finished())]
        if hangup is not None:
            waiting.append(asyncio.ensure_future(hangup))
        try:
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waiting:
                task.cancel()
        if waiting[0] not in done:
            self.cancel()
            raise ClientGone
        return waiting[0].result()

    async def _finished(self) -> list[Request]:
        async for _ in self.events_until_done():
            pass
        return self.requests

    def cancel(self) -> None:
        for request in self.requests:
            if request.finish_reason is None:
                request.cancelled = True
