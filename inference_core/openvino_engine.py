"""The openvino backend: OpenVINO GenAI's ContinuousBatchingPipeline behind the Engine interface."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from inference_core.chunk_stream import ChunkStream
from inference_core.continuous import EngineStats
from inference_core.detokenizer import IncrementalDetokenizer
from inference_core.engine import Engine
from inference_core.errors import EngineClosedError, EngineError, InvalidRequestError
from inference_core.openvino_export import WeightFormat, ensure_ir
from inference_core.openvino_loop import OpenVINOStepLoop, PipelineConfig, PrefixIndex
from inference_core.openvino_stepper import PipelineLoader, StepperProcess
from inference_core.prompts import encode_prompt
from inference_core.sampling import RowSampler
from inference_core.sequence import Sequence
from inference_core.stop_strings import StopStringMatcher
from inference_core.structured import GrammarCache
from inference_core.types import GenerationChunk, GenerationRequest, ModelInfo
from inference_core.validation import validate_sampling

log = logging.getLogger(__name__)

PRECISIONS = ("", "f32", "bf16", "f16")


@dataclass(frozen=True)
class OpenVINOConfig:
    """How the openvino backend exports and runs the model.

    cache_dir: where exported IR is kept (the service passes <data_dir>/openvino).
    weight_format: fp32 (exact weights), fp16, int8 or int4 (optimum-intel's weight compression: smaller and faster
        to read, at a measured quality cost, see docs/bench/inference.md).
    exporter: the optimum-cli to export with; empty finds the one `make install-openvino` installs.
    max_num_seqs: requests the pipeline decodes together; more wait in our admission queue.
    max_num_batched_tokens: tokens one step computes (prompt chunks and decode tokens together).
    kv_cache_gb: KV cache size; the prefix cache lives in it.
    prefix_caching: reuse KV of prompt prefixes seen before (agents resend the same system prompt and tools).
    inference_precision: OpenVINO's INFERENCE_PRECISION_HINT on CPU; empty keeps its default (bf16 where the CPU has
        AVX512-BF16 or AMX, else f32).
    threads: INFERENCE_NUM_THREADS; None keeps OpenVINO's default (every core).
    prompt_lookup_tokens: draft tokens per request and step from OpenVINO's prompt lookup (speculative decoding
        without a draft model; greedy output is unchanged); 0 is off. The pipeline drafts this many tokens for every
        running request on every step, matched or not, so it pays only with few requests at once: measured in
        docs/bench/inference.md, faster for one client, much slower for 16.
    """

    cache_dir: Path = Path(".meshpilot/openvino")
    weight_format: WeightFormat = "fp32"
    exporter: str = ""
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 256
    kv_cache_gb: float = 1.0
    prefix_caching: bool = True
    inference_precision: str = ""
    threads: int | None = None
    prompt_lookup_tokens: int = 0
    max_queue: int = 64
    fair_share: bool = True
    max_queue_per_tenant: int = 16
    tenant_weights: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least max_num_seqs "
                f"({self.max_num_seqs}): every running request decodes one token per step"
            )
        if self.kv_cache_gb <= 0:
            raise ValueError(f"kv_cache_gb must be > 0, got {self.kv_cache_gb}")
        if self.prompt_lookup_tokens < 0:
            raise ValueError(f"prompt_lookup_tokens must be >= 0 (0 is off), got {self.prompt_lookup_tokens}")
        if self.inference_precision not in PRECISIONS:
            raise ValueError(
                f"inference_precision {self.inference_precision!r} is unknown; use one of f32, bf16, f16 or empty"
            )

    def waiting_queue(self) -> Any:
        from inference_core.admission import FairQueue, FifoQueue

        if self.fair_share:
            return FairQueue(self.max_queue, self.max_queue_per_tenant, self.tenant_weights)
        return FifoQueue(self.max_queue)


@dataclass
class _Model:
    stepper: StepperProcess
    tokenizer: Any
    eos_token_ids: frozenset[int]
    vocab_size: int
    context_length: int
    kv_bytes_per_token: int


class OpenVINOEngine(Engine):
    """Runs one model with OpenVINO GenAI (see Engine for the contract).

    The pipeline runs in a child process of its own (openvino_stepper), which dies with this one; this process
    admits, tokenizes, detokenizes and streams. If the child dies, every request in flight fails with
    EngineClosedError and the engine is no longer ready.

    The prompt is tokenized and detokenized with the model's HF tokenizer, exactly as TorchEngine does, so token
    counts, chat templates, streamed text and stop strings behave alike; OpenVINO schedules, computes and samples.
    Constraints are compiled once by us (xgrammar, to reject bad ones with a clear error before they reach the
    pipeline) and applied by the pipeline's structured-output config.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        model_id: str = "smollm2-135m-instruct",
        config: OpenVINOConfig | None = None,
        max_seq_len: int = 4096,
        grammar_cache_size: int = 64,
    ) -> None:
        self._model_path = model_path
        self._model_id = model_id
        self._config = config or OpenVINOConfig()
        self._max_seq_len = max_seq_len
        self._grammar_cache_size = grammar_cache_size
        self._model: _Model | None = None
        self._grammars: GrammarCache | None = None
        self._loop: OpenVINOStepLoop | None = None
        self._info: ModelInfo | None = None
        self._closed = False

    async def start(self) -> None:
        if self._closed:
            raise EngineClosedError("this engine was shut down; create a new one")
        if self._loop is not None:
            return
        model = await asyncio.to_thread(self._load)
        config = self._config
        try:
            self._grammars = await asyncio.to_thread(
                GrammarCache, model.tokenizer, model.vocab_size, model.eos_token_ids, self._grammar_cache_size
            )
            block_tokens = 32  # the CPU plugin's KV block; prefix reuse happens in whole blocks
            prefix = PrefixIndex(block_tokens, int(config.kv_cache_gb * 2**30) // model.kv_bytes_per_token)
            loop = OpenVINOStepLoop(model.stepper, config.waiting_queue(), config.max_num_seqs, prefix)
            await asyncio.to_thread(loop.start)
        except BaseException:
            await asyncio.to_thread(model.stepper.close)
            raise
        self._model = model
        self._loop = loop
        self._info = ModelInfo(
            id=self._model_id,
            backend="openvino",
            context_length=model.context_length,
            device="cpu",
            dtype=config.weight_format,
        )
        log.info(
            "model %s ready (openvino, %s weights, context %d)",
            self._model_id,
            config.weight_format,
            model.context_length,
        )

    def _load(self) -> _Model:
        """Exports the model if needed, starts the pipeline's process, and reads the tokenizer meanwhile."""
        # The parent needs only to know the runtime is there; the child imports it.
        if importlib.util.find_spec("openvino_genai") is None:
            raise EngineError(
                "inference.backend 'openvino' needs openvino-genai (it is not installed); run `make install-openvino`"
            )
        config = self._config
        started = time.monotonic()
        ir_dir = ensure_ir(self._model_path, config.cache_dir, config.weight_format, config.exporter or None)
        scheduler = {
            "enable_prefix_caching": config.prefix_caching,
            "cache_size": max(1, round(config.kv_cache_gb)),
            "max_num_seqs": config.max_num_seqs,
            "max_num_batched_tokens": config.max_num_batched_tokens,
            "dynamic_split_fuse": True,
        }
        properties: dict[str, Any] = {}
        if config.inference_precision:
            properties["INFERENCE_PRECISION_HINT"] = config.inference_precision
        if config.threads is not None:
            properties["INFERENCE_NUM_THREADS"] = config.threads
        stepper = StepperProcess(PipelineLoader(str(ir_dir), scheduler, properties, config.prompt_lookup_tokens))
        try:
            return self._read_model(ir_dir, stepper, started)
        except BaseException:
            stepper.kill()
            raise

    def _read_model(self, ir_dir: Path, stepper: StepperProcess, started: float) -> _Model:
        from transformers import AutoConfig, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(ir_dir, local_files_only=True)
            hf_config = AutoConfig.from_pretrained(ir_dir, local_files_only=True)
        except (OSError, ValueError) as e:
            raise EngineError(
                f"the exported model in {ir_dir} lacks a readable tokenizer or config ({str(e)[:300]}); "
                "delete that directory to export it again"
            ) from e
        ready = stepper.wait_ready()
        eos: set[int] = set(ready.stop_token_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        context = int(getattr(hf_config, "max_position_embeddings", 0) or 2048)
        layers = int(hf_config.num_hidden_layers)
        kv_heads = int(getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads)
        head_dim = int(getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads)
        log.info(
            "OpenVINO pipeline loaded from %s in %.1f s (process %d)", ir_dir, time.monotonic() - started, stepper.pid
        )
        return _Model(
            stepper=stepper,
            tokenizer=tokenizer,
            eos_token_ids=frozenset(eos),
            vocab_size=int(hf_config.vocab_size),
            context_length=min(context, self._max_seq_len),
            # The CPU plugin keeps the KV cache in u8 by default: one byte per element.
            kv_bytes_per_token=2 * layers * kv_heads * head_dim,
        )

    def stats(self) -> EngineStats:
        """A snapshot for metrics; zeros before start."""
        return self._loop.stats() if self._loop is not None else EngineStats()

    @property
    def is_ready(self) -> bool:
        return self._loop is not None and not self._closed and self._loop.failure is None

    @property
    def info(self) -> ModelInfo:
        self._require_ready()
        assert self._info is not None
        return self._info

    def count_tokens(self, prompt: str | None = None, messages: list[dict[str, str]] | None = None) -> int:
        self._require_ready()
        return len(self._encode(prompt, messages))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        self._require_ready()
        loop_ = self._loop
        assert loop_ is not None
        arrival = time.perf_counter()
        stream = ChunkStream()
        seq, pipeline_config = await asyncio.to_thread(self._prepare, request, stream.sink, arrival)
        loop_.submit(seq, pipeline_config)
        async with contextlib.aclosing(stream.follow(lambda: loop_.abort(seq.request_id))) as chunks:
            async for chunk in chunks:
                yield chunk

    async def abort(self, request_id: str) -> None:
        if self._loop is not None:
            self._loop.abort(request_id)

    async def shutdown(self) -> None:
        self._closed = True
        if self._loop is not None:
            await asyncio.to_thread(self._loop.close)
        self._loop = None
        self._model = None
        self._grammars = None

    def _require_ready(self) -> None:
        if self._closed:
            raise EngineClosedError("the engine has shut down; retry on another replica")
        if self._loop is None:
            raise EngineClosedError("the model is still loading; retry when health reports SERVING")
        if self._loop.failure is not None:
            raise self._loop.failure

    def _encode(self, prompt: str | None, messages: list[dict[str, str]] | None) -> list[int]:
        assert self._model is not None
        return encode_prompt(self._model.tokenizer, self._model_id, prompt, messages)

    def _prepare(self, request: GenerationRequest, sink: Any, arrival: float) -> tuple[Sequence, PipelineConfig]:
        """Validates and tokenizes a request into a Sequence and the pipeline's config as plain data (in a worker
        thread: tokenizing and compiling a grammar can take milliseconds)."""
        from inference_core.openvino_convert import generation_fields, structured_fields

        model = self._model
        grammars = self._grammars
        if model is None or grammars is None:
            raise EngineClosedError("the engine has shut down; retry on another replica")
        if request.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be >= 1, got {request.max_tokens}")
        validate_sampling(request.sampling)
        prompt_ids = self._encode(request.prompt, request.messages)
        context = model.context_length
        if len(prompt_ids) >= context:
            raise InvalidRequestError(
                f"prompt has {len(prompt_ids)} tokens but the model's context is {context}; "
                f"shorten it to at most {context - 1} tokens"
            )
        if request.constraint is not None:
            grammars.get(request.constraint)  # raises InvalidRequestError with the parser's message
        max_new_tokens = min(request.max_tokens, context - len(prompt_ids))
        seq = Sequence(
            request_id=request.request_id,
            prompt_ids=prompt_ids,
            max_new_tokens=max_new_tokens,
            sampler=RowSampler(request.sampling, model.vocab_size, torch.device("cpu")),
            detokenizer=IncrementalDetokenizer(model.tokenizer, prompt_ids),
            stop=StopStringMatcher(request.stop),
            constraint=None,  # the pipeline applies it
            eos_token_ids=model.eos_token_ids,
            sink=sink,
            arrival=arrival,
            tenant=request.tenant,
        )
        structured = structured_fields(request.constraint) if request.constraint is not None else None
        fields = generation_fields(request, max_new_tokens, model.eos_token_ids, self._config.prompt_lookup_tokens)
        return seq, (fields, structured)
