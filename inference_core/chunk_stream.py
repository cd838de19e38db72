"""One request's chunks, handed from an engine's loop thread to the asyncio task that streams them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable

from inference_core.errors import EngineError
from inference_core.types import GenerationChunk


class ChunkStream:
    """Made on the event loop that reads it: ``sink`` may be called from any thread (the engine's loop puts each chunk
    or the request's EngineError there), ``follow`` yields the chunks up to the final one."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[GenerationChunk | EngineError] = asyncio.Queue()

    def sink(self, item: GenerationChunk | EngineError) -> None:
        # RuntimeError: the event loop is gone, so nobody is left to read this stream.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    async def follow(self, abort: Callable[[], None]) -> AsyncGenerator[GenerationChunk, None]:
        """The chunks to the one with a finish reason (an EngineError is raised); ``abort`` is called when the reader
        stops before that (a cancelled or closed stream), so the engine frees the request within a step."""
        done = False
        try:
            while True:
                item = await self._queue.get()
                if isinstance(item, EngineError):
                    done = True
                    raise item
                done = item.finish_reason is not None
                yield item
                if done:
                    return
        finally:
            if not done:
                abort()
