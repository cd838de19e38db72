"""FakeEngine: a deterministic, scripted Engine for testing code that calls an engine (the planner, the servicer).

Usage::

    from inference_core import GenerationRequest
    from inference_core.testing import FakeEngine

    engine = FakeEngine(['{"final_answer": "Paris"}', "second call's text"])  # one output per generate() call
    engine = FakeEngine(lambda request: "echo: " + (request.prompt or ""))   # or a function of the request
    engine = FakeEngine([QueueFullError("busy"), "ok"])                       # an exception is raised by that call

    async for chunk in engine.generate(GenerationRequest(prompt="hi", max_tokens=16)):
        ...
    engine.requests   # every GenerationRequest received, in order
    engine.aborted    # request ids whose streams were aborted or closed early

What it does like the real engine: it is ready as soon as it is built (``start()`` is a no-op), streams each
scripted output in small deltas (one fake "token" per chunk: a word with its leading whitespace, so the deltas
concatenate to the output exactly), honours ``stop`` strings (cut before, finish_reason STOP_STRING) and
``max_tokens`` (finish_reason LENGTH), ends with STOP otherwise, fills usage and timings on the last chunk, validates
requests with the same InvalidRequestError messages (empty input, bad sampling, prompt over ``context_length``),
and counts tokens with the same fake tokenizer. It ignores constraints: script outputs that satisfy them.
Closing the iterator or ``abort(request_id)`` ends the stream (CANCELLED for abort) and records the id in ``aborted``.
After ``shutdown()`` every call raises EngineClosedError.

``write_tiny_llama(directory)`` writes a small random-weight Llama with the real SmolLM2 tokenizer as a HF model
directory, for fast tests of the torch engine itself (its outputs are gibberish, but real tokens).
"""

from __future__ import annotations

import asyncio
import re
import time
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

from inference_core.engine import Engine
from inference_core.errors import EngineClosedError, EngineError, InvalidRequestError
from inference_core.stop_strings import StopStringMatcher
from inference_core.types import FinishReason, GenerationChunk, GenerationRequest, ModelInfo, Timings, Usage
from inference_core.validation import validate_sampling

Script = Sequence[str | BaseException] | Callable[[GenerationRequest], str]

_TOKEN_PATTERN = re.compile(r"\s*\S+|\s+")


def fake_tokenize(text: str) -> list[str]:
    """The fake tokenizer: each word with the whitespace before it is one token."""
    return _TOKEN_PATTERN.findall(text)


def fake_token_id(piece: str) -> int:
    return zlib.crc32(piece.encode()) % 50_000


def render_chat(messages: list[dict[str, str]]) -> str:
    """The fake chat template."""
    return "".join(f"<|{m.get('role', '')}|> {m.get('content', '')}\n" for m in messages) + "<|assistant|>"


class FakeEngine(Engine):
    """A scripted Engine; see the module docstring. ``delay_s`` sleeps before each chunk (to test cancellation)."""

    def __init__(
        self,
        outputs: Script = ("Hello from the fake engine.",),
        *,
        model_id: str = "fake-model",
        context_length: int = 4096,
        delay_s: float = 0.0,
    ) -> None:
        self.outputs = outputs
        self.delay_s = delay_s
        self.requests: list[GenerationRequest] = []
        self.aborted: list[str] = []
        self._info = ModelInfo(id=model_id, backend="fake", context_length=context_length, device="cpu", dtype="none")
        self._abort_requested: set[str] = set()
        self._closed = False

    async def start(self) -> None:
        if self._closed:
            raise EngineClosedError("this engine was shut down; create a new one")

    @property
    def is_ready(self) -> bool:
        return not self._closed

    @property
    def info(self) -> ModelInfo:
        self._require_open()
        return self._info

    def count_tokens(self, prompt: str | None = None, messages: list[dict[str, str]] | None = None) -> int:
        self._require_open()
        return len(fake_tokenize(self._render(prompt, messages)))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        self._require_open()
        arrival = time.perf_counter()
        self.requests.append(request)
        if request.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be >= 1, got {request.max_tokens}")
        validate_sampling(request.sampling)
        prompt_tokens = len(fake_tokenize(self._render(request.prompt, request.messages)))
        context = self._info.context_length
        if prompt_tokens >= context:
            raise InvalidRequestError(
                f"prompt has {prompt_tokens} tokens but the model's context is {context}; "
                f"shorten it to at most {context - 1} tokens"
            )
        output = self._next_output(request)
        pieces = fake_tokenize(output)
        limit = min(request.max_tokens, context - prompt_tokens)
        stop = StopStringMatcher(request.stop)
        completion = 0
        finished = False
        try:
            reason = FinishReason.STOP
            text = ""
            ids: list[int] = []
            for index, piece in enumerate(pieces):
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                if request.request_id in self._abort_requested:
                    reason = FinishReason.CANCELLED
                    break
                completion += 1
                ids.append(fake_token_id(piece))
                delta, stopped = stop.feed(piece)
                text += delta
                if stopped:
                    reason = FinishReason.STOP_STRING
                    break
                if completion >= limit:
                    reason = FinishReason.LENGTH
                    break
                if text and index < len(pieces) - 1:
                    yield GenerationChunk(text=text, token_ids=ids)
                    text, ids = "", []
            text += stop.flush()
            now = time.perf_counter()
            usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion)
            total_ms = (now - arrival) * 1000
            timings = Timings(
                queue_ms=0.0, time_to_first_token_ms=total_ms, total_ms=total_ms, decode_tokens_per_second=0.0
            )
            finished = True
            if reason is FinishReason.CANCELLED:
                self.aborted.append(request.request_id)
            yield GenerationChunk(text=text, token_ids=ids, finish_reason=reason, usage=usage, timings=timings)
        finally:
            self._abort_requested.discard(request.request_id)
            if not finished:
                self.aborted.append(request.request_id)

    async def abort(self, request_id: str) -> None:
        self._abort_requested.add(request_id)

    async def shutdown(self) -> None:
        self._closed = True

    def _require_open(self) -> None:
        if self._closed:
            raise EngineClosedError("the engine has shut down; retry on another replica")

    def _render(self, prompt: str | None, messages: list[dict[str, str]] | None) -> str:
        if (prompt is None) == (messages is None):
            raise InvalidRequestError("send exactly one of prompt or messages")
        if prompt is not None:
            if not prompt:
                raise InvalidRequestError("prompt is empty; send some text")
            return prompt
        if not messages:
            raise InvalidRequestError("messages is empty; send at least one message")
        return render_chat(messages)

    def _next_output(self, request: GenerationRequest) -> str:
        if callable(self.outputs):
            return self.outputs(request)
        index = len(self.requests) - 1
        if index >= len(self.outputs):
            raise EngineError(f"FakeEngine was called {index + 1} times but scripted only {len(self.outputs)} outputs")
        item = self.outputs[index]
        if isinstance(item, BaseException):
            raise item
        return item


def write_tiny_llama(
    directory: str | Path, *, context_length: int = 256, layers: int = 2, hidden_size: int = 64, seed: int = 0
) -> Path:
    """Writes a random-weight LlamaForCausalLM (SmolLM2's tokenizer and chat template, ``context_length`` positions)
    to ``directory`` and returns it; loading it with TorchEngine takes well under a second."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from inference_core.model_loading import default_model_path

    directory = Path(directory)
    gguf = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
