"""The engine interface every backend (torch, triton, the test fake) implements."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator

from inference_core.types import GenerationChunk, GenerationRequest, ModelInfo


class Engine(abc.ABC):
    """Serves one model. All methods are called from one asyncio event loop; none of them blocks it.

    Contract:
    - ``await start()`` loads the model; afterwards ``is_ready`` is True and ``info`` is available. Calling anything
      else before start (or after shutdown) raises EngineClosedError.
    - ``generate(request)`` returns an async iterator of GenerationChunk: text deltas whose concatenation is the whole
      output, the last chunk carrying finish_reason, usage and timings. Bad requests raise InvalidRequestError and a
      full admission queue raises QueueFullError, both from the first ``__anext__`` before any chunk. Closing the
      iterator (``aclose()``, or cancelling the task iterating it) aborts the request and frees its slot.
    - ``await abort(request_id)`` ends a running or queued request; its stream ends with finish_reason CANCELLED.
      Unknown or finished ids are ignored.
    - ``count_tokens(prompt=..., messages=...)`` counts tokens exactly as ``generate`` would feed them (chat template
      and generation prompt applied for messages).
    - ``await shutdown()`` aborts what is in flight, frees the model and makes ``is_ready`` False. Idempotent.
    """

    @abc.abstractmethod
    async def start(self) -> None: ...

    @property
    @abc.abstractmethod
    def is_ready(self) -> bool: ...

    @property
    @abc.abstractmethod
    def info(self) -> ModelInfo: ...

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]: ...

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None: ...

    @abc.abstractmethod
    def count_tokens(self, prompt: str | None = None, messages: list[dict[str, str]] | None = None) -> int: ...

    @abc.abstractmethod
    async def shutdown(self) -> None: ...
