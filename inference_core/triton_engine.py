"""The triton backend: generations streamed from a Triton server serving TensorRT-LLM's ensemble or BLS contract."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import random
import re
import struct
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from inference_core.engine import Engine
from inference_core.errors import EngineClosedError, EngineError, InvalidRequestError, QueueFullError
from inference_core.stop_strings import StopStringMatcher
from inference_core.types import (
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    ModelInfo,
    Timings,
    Usage,
)
from inference_core.validation import validate_sampling

log = logging.getLogger(__name__)
# How gRPC words a Triton server that went away (rather than a model that refused): which one arrives depends on
# timing ("failed to connect", "Socket closed", "Connection reset", or the "Cancelling all calls" of its GOAWAY).
_TRANSPORT_GONE = re.compile(
    r"connect|socket|goaway|cancelling all calls|broken pipe|stream removed|reset|shutdown|endpoint|eof", re.IGNORECASE
)

# Our name for an input -> the names TensorRT-LLM has used for it, newest first (renamed in mid-2025).
INPUT_NAMES = {"seed": ("seed", "random_seed"), "min_tokens": ("min_tokens", "min_length")}
GUIDE_TYPES = {"json_schema": "json_schema", "regex": "regex", "ebnf": "ebnf_grammar"}
VALID_ROLES = ("system", "user", "assistant", "tool")
# Triton ends the stream with the error's status code instead of an error_message the stream survives.
ERROR_METADATA = (("triton_grpc_error", "true"),)
MAX_INT32 = 2**31 - 1
T = model_config_pb2.DataType
WIRE_TYPES: dict[int, tuple[str, str]] = {
    T.TYPE_BOOL: ("BOOL", "<?"),
    T.TYPE_INT32: ("INT32", "<i"),
    T.TYPE_INT64: ("INT64", "<q"),
    T.TYPE_UINT32: ("UINT32", "<I"),
    T.TYPE_UINT64: ("UINT64", "<Q"),
    T.TYPE_FP32: ("FP32", "<f"),
    T.TYPE_STRING: ("BYTES", ""),
}
_XGRAMMAR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


@dataclass(frozen=True)
class TritonModelSpec:
    """What the served Triton model declares, read from its config (and its steps' configs) at start-up."""

    name: str
    inputs: dict[str, model_config_pb2.ModelInput]
    outputs: frozenset[str]
    batched: bool
    streams: bool
    """Decoupled (or an ensemble over a decoupled engine step): responses arrive as deltas, then a final one."""
    stop_model: str | None = None
    """An ensemble's engine step that takes TensorRT-LLM's ``stop`` input: Triton's ensemble does not pass a client's
    cancellation to a step already running, so a cancelled request is stopped there by its request id."""
    guided_decoding: bool | None = None
    """False when the engine step says guided decoding is off; None when it does not say."""
    tokenizer_dir: str = ""
    add_special_tokens: bool = True
    dtype: str = "unknown"

    def input_name(self, name: str) -> str | None:
        """The declared name of our input ``name`` (current or older TensorRT-LLM spelling), None if undeclared."""
        return next((n for n in INPUT_NAMES.get(name, (name,)) if n in self.inputs), None)


@dataclass
class _InFlight:
    call: Any
    triton_id: str
    aborted: bool = False


@dataclass
class _Progress:
    generated: list[str] = field(default_factory=list)
    input_tokens: int | None = None
    output_tokens: int | None = None
    first_token_at: float | None = None


class TritonEngine(Engine):
    """Streams generations from ``model`` (``ensemble`` or ``tensorrt_llm_bls``) on the Triton server at ``url``.

    ``start()`` waits up to ``start_timeout_s`` for the model to be ready, reads its config so requests use the input
    names it declares (older ``min_length``/``random_seed`` or newer ``min_tokens``/``seed``), and loads the
    tokenizer: ``tokenizer_path`` (a HF directory or .gguf file), else the model's ``tokenizer_dir`` when that path
    exists here, else the default SmolLM2. The tokenizer renders chat messages, counts tokens and stands in for
    ``num_input_tokens``/``num_output_tokens`` on models that do not return them. Requests asking for what the model
    does not declare raise InvalidRequestError; prompts of ``context_length`` tokens or more are refused as by the
    torch engine.

    Triton streams text, so chunks carry ``token_ids=[]``. Stop strings are sent as ``stop_words`` and matched here
    too: the stream ends before the stop string, which is never returned (as with the torch engine). Closing the
    iterator or ``abort()`` cancels the gRPC call; through an ensemble it also sends ``stop`` to the engine step.
    ``is_ready`` follows Triton's readiness of the model, polled every ``health_interval_s``. Triton INVALID_ARG
    becomes InvalidRequestError, a full queue QueueFullError, UNAVAILABLE or an unreachable server EngineClosedError,
    anything else EngineError carrying Triton's message.
    """

    def __init__(
        self,
        url: str,
        model: str = "ensemble",
        *,
        model_id: str = "smollm2-135m-instruct",
        tokenizer_path: str | os.PathLike[str] | None = None,
        context_length: int = 4096,
        start_timeout_s: float = 600.0,
        health_interval_s: float = 1.0,
    ) -> None:
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2, got {context_length}")
        self._url = url
        self._model = model
        self._model_id = model_id
        self._tokenizer_path = tokenizer_path
        self._context = context_length
        self._start_timeout_s = start_timeout_s
        self._health_interval_s = health_interval_s
        self._channel: grpc.aio.Channel | None = None
        self._stub: service_pb2_grpc.GRPCInferenceServiceStub | None = None
        self._spec: TritonModelSpec | None = None
        self._tokenizer: Any = None
        self._info: ModelInfo | None = None
        self._model_ready = False
        self._closed = False
        self._health_task: asyncio.Task[None] | None = None
        self._inflight: dict[str, _InFlight] = {}
        self._stops: set[asyncio.Task[None]] = set()

    @property
    def spec(self) -> TritonModelSpec:
        """The model's declared contract (after start)."""
        self._require_started()
        assert self._spec is not None
        return self._spec

    async def start(self) -> None:
        if self._closed:
            raise EngineClosedError("this engine was shut down; create a new one")
        if self._spec is not None:
            return
        self._channel = grpc.aio.insecure_channel(self._url)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        deadline = time.monotonic() + self._start_timeout_s
        while not await self._probe():
            if time.monotonic() > deadline:
                raise EngineClosedError(
                    f"Triton at {self._url} did not report model {self._model!r} ready within "
                    f"{self._start_timeout_s:.0f}s; start tritonserver (make triton-cpu) or fix inference.triton_url "
                    "and inference.triton_model"
                )
            await asyncio.sleep(0.5)
        spec = await read_model_spec(self._stub, self._model)
        self._tokenizer = await asyncio.to_thread(_load_tokenizer, self._tokenizer_source(spec))
        if spec.inputs.get("guided_decoding_guide") is not None and spec.guided_decoding is not False:
            await asyncio.to_thread(_import_xgrammar)
        self._spec = spec
        self._info = ModelInfo(
            id=self._model_id,
            backend="triton",
            context_length=self._context,
            device=f"grpc://{self._url}/{self._model}",
            dtype=spec.dtype,
        )
        self._model_ready = True
        self._health_task = asyncio.create_task(self._watch_health())
        log.info(
            "Triton model %s at %s ready (streams=%s, inputs: %s)",
            self._model,
            self._url,
            spec.streams,
            ", ".join(sorted(spec.inputs)),
        )

    @property
    def is_ready(self) -> bool:
        return self._spec is not None and not self._closed and self._model_ready

    @property
    def info(self) -> ModelInfo:
        self._require_started()
        assert self._info is not None
        return self._info

    def count_tokens(self, prompt: str | None = None, messages: list[dict[str, str]] | None = None) -> int:
        self._require_started()
        return self._count(self._render(prompt, messages))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        self._require_ready()
        began = time.perf_counter()
        if request.request_id in self._inflight:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in flight; use a unique id")
        text = await self._checked_text(request)
        spec, stub = self._spec, self._stub
        assert spec is not None and stub is not None
        triton_id = str(random.getrandbits(63))
        message = self._infer_request(request, text, triton_id)
        done = asyncio.Event()

        async def requests() -> AsyncIterator[service_pb2.ModelInferRequest]:
            yield message
            # Half-closing before the final response would let Triton end the stream early.
            await done.wait()

        call = stub.ModelStreamInfer(requests(), metadata=ERROR_METADATA)
        inflight = self._inflight[request.request_id] = _InFlight(call, triton_id)
        progress = _Progress()
        stops = StopStringMatcher(request.stop)
        triton_done = False
        try:
            try:
                async for response in call:
                    if response.error_message:  # servers that ignore triton_grpc_error
                        raise EngineError(f"Triton model {self._model!r} failed: {response.error_message}")
                    delta, final = self._read(response.infer_response, progress)
                    emit, stopped = stops.feed(delta)
                    triton_done = final or not spec.streams
                    if triton_done or stopped:
                        tail = "" if stopped else stops.flush()
                        reason = FinishReason.STOP_STRING if stopped else None
                        yield await self._final(request, text, emit + tail, progress, began, reason)
                        return
                    if emit:
                        yield GenerationChunk(text=emit)
            except (asyncio.CancelledError, grpc.aio.AioRpcError) as e:
                task = asyncio.current_task()
                if not inflight.aborted or (task is not None and task.cancelling()):
                    if isinstance(e, grpc.aio.AioRpcError):
                        raise self._error(e) from e
                    raise
            if not inflight.aborted:
                raise EngineError(f"Triton ended the stream of {self._model!r} without a final response; retry")
            yield GenerationChunk(text="", finish_reason=FinishReason.CANCELLED)
        finally:
            done.set()
            self._inflight.pop(request.request_id, None)
            if not triton_done:
                self._cancel(inflight)

    async def abort(self, request_id: str) -> None:
        inflight = self._inflight.get(request_id)
        if inflight is not None and not inflight.aborted:
            inflight.aborted = True
            inflight.call.cancel()

    async def shutdown(self) -> None:
        self._closed = True
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
            self._health_task = None
        for request_id in list(self._inflight):
            await self.abort(request_id)
        if self._stops:
            await asyncio.wait(self._stops, timeout=5)
        if self._channel is not None:
            await self._channel.close()
        self._channel = self._stub = None
        self._tokenizer = None

    def _require_started(self) -> None:
        if self._closed:
            raise EngineClosedError("the engine has shut down; retry on another replica")
        if self._spec is None:
            raise EngineClosedError("the Triton model is not connected yet; retry when health reports SERVING")

    def _require_ready(self) -> None:
        self._require_started()
        if not self._model_ready:
            raise EngineClosedError(
                f"Triton at {self._url} does not report model {self._model!r} ready; retry when it is back"
            )

    async def _probe(self) -> bool:
        assert self._stub is not None
        try:
            reply = await self._stub.ModelReady(service_pb2.ModelReadyRequest(name=self._model), timeout=2.0)
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.ready)

    async def _watch_health(self) -> None:
        while True:
            await asyncio.sleep(self._health_interval_s)
            ready = await self._probe()
            if ready != self._model_ready:
                log.warning("Triton model %s at %s is %s", self._model, self._url, "ready" if ready else "NOT ready")
            self._model_ready = ready

    def _tokenizer_source(self, spec: TritonModelSpec) -> str | os.PathLike[str]:
        if self._tokenizer_path:
            return self._tokenizer_path
        if spec.tokenizer_dir and Path(spec.tokenizer_dir).exists():
            return spec.tokenizer_dir
        from inference_core import default_model_path

        log.warning(
            "tokenizer_dir %r of the Triton model is not on this machine; using the default model's tokenizer "
            "(set inference.model_path to the served model's tokenizer if that differs)",
            spec.tokenizer_dir,
        )
        return default_model_path()

    def _render(self, prompt: str | None, messages: list[dict[str, str]] | None) -> str:
        """The text sent as text_input: the prompt, or the messages through the tokenizer's chat template."""
        if (prompt is None) == (messages is None):
            raise InvalidRequestError("send exactly one of prompt or messages")
        if prompt is not None:
            if not prompt:
                raise InvalidRequestError("prompt is empty; send some text")
            return prompt
        if not messages:
            raise InvalidRequestError("messages is empty; send at least one message")
        for i, message in enumerate(messages):
            if message.get("role") not in VALID_ROLES:
                raise InvalidRequestError(
                    f"message {i} has role {message.get('role')!r}; use one of {', '.join(VALID_ROLES)}"
                )
        tokenizer = self._tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidRequestError(f"model {self._model_id} has no chat template; send a raw prompt instead")
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja errors from the template, e.g. roles it does not accept
            raise InvalidRequestError(f"the chat template of {self._model_id} rejected the messages: {e}") from e
        # Triton's preprocessing adds the tokenizer's special prefix itself; a template that writes it too would
        # double it.
        bos = getattr(tokenizer, "bos_token", None)
        if bos and text.startswith(bos) and self._special_prefix():
            text = text[len(bos) :]
        return text

    def _special_prefix(self) -> list[int]:
        tokenizer = self._tokenizer
        with_special = tokenizer.encode("a", add_special_tokens=True)
        plain = tokenizer.encode("a", add_special_tokens=False)
        return list(with_special[: len(with_special) - len(plain)])

    def _count(self, text: str) -> int:
        assert self._spec is not None
        return len(self._tokenizer.encode(text, add_special_tokens=self._spec.add_special_tokens))

    async def _checked_text(self, request: GenerationRequest) -> str:
        """Validates the request against the engine and the model's declared inputs; returns the text_input."""
        spec = self._spec
        assert spec is not None
        if not 1 <= request.max_tokens <= MAX_INT32:
            raise InvalidRequestError(f"max_tokens must be in [1, {MAX_INT32}], got {request.max_tokens}")
        validate_sampling(request.sampling)
        text = self._render(request.prompt, request.messages)
        for name in self._needed_inputs(request):
            if spec.input_name(name) is None:
                raise InvalidRequestError(
                    f"the Triton model {spec.name!r} declares no input {name!r} (of a type this client sends), "
                    f"needed for this request; {_how_to_avoid(name)}"
                )
        if request.constraint is not None:
            if spec.guided_decoding is False:
                raise InvalidRequestError(
                    f"guided decoding is off in the Triton model repository of {spec.name!r}; drop the constraint "
                    "or regenerate the repository with guided_decoding_backend=xgrammar"
                )
            _check_constraint(request.constraint.kind, request.constraint.value)
        # A token covers at least one byte, so a short text cannot reach the context without tokenizing it.
        if len(text.encode("utf-8")) + 8 >= self._context:
            count = await asyncio.to_thread(self._count, text)
            if count >= self._context:
                raise InvalidRequestError(
                    f"prompt has {count} tokens but the model's context is {self._context}; "
                    f"shorten it to at most {self._context - 1} tokens"
                )
        return text

    @staticmethod
    def _needed_inputs(request: GenerationRequest) -> list[str]:
        sampling = request.sampling
        needed = []
        if not sampling.is_greedy:
            if sampling.temperature != 1.0:
                needed.append("temperature")
            if sampling.top_k > 0:
                needed.append("top_k")
            if sampling.top_p < 1.0 or sampling.top_k == 0:
                needed.append("top_p")
            if sampling.seed is not None:
                needed.append("seed")
        if sampling.repetition_penalty != 1.0:
            needed.append("repetition_penalty")
        if request.constraint is not None:
            needed += ["guided_decoding_guide_type", "guided_decoding_guide"]
        return needed

    def _infer_request(self, request: GenerationRequest, text: str, triton_id: str) -> service_pb2.ModelInferRequest:
        spec = self._spec
        assert spec is not None
        values: dict[str, Any] = {"text_input": [text], "max_tokens": request.max_tokens}
        optional: dict[str, Any] = {
            "stream": spec.streams,
            "exclude_input_in_output": True,
            "return_num_input_tokens": True,
            "return_num_output_tokens": True,
        }
        sampling = request.sampling
        if sampling.is_greedy:
            # TensorRT-LLM decodes greedily with top_k 1 (and with neither top_k nor top_p).
            optional["top_k"] = 1
        else:
            values["temperature"] = sampling.temperature
            values["top_p"] = sampling.top_p
            if sampling.top_k > 0 or spec.input_name("top_k"):
                values["top_k"] = sampling.top_k
            if sampling.seed is not None:
                values["seed"] = sampling.seed
        if sampling.repetition_penalty != 1.0:
            values["repetition_penalty"] = sampling.repetition_penalty
        if request.stop:
            optional["stop_words"] = list(request.stop)
        if request.constraint is not None:
            values["guided_decoding_guide_type"] = [GUIDE_TYPES[request.constraint.kind]]
            values["guided_decoding_guide"] = [request.constraint.value]
        values.update({k: v for k, v in optional.items() if spec.input_name(k) and k not in values})
        message = service_pb2.ModelInferRequest(model_name=spec.name, id=triton_id)
        for name, value in values.items():
            declared = spec.input_name(name)
            if declared is not None:
                _add_input(message, spec.inputs[declared], value, spec.batched)
        for output in ("text_output", "num_input_tokens", "num_output_tokens"):
            if output in spec.outputs:
                message.outputs.add(name=output)
        message.parameters["triton_enable_empty_final_response"].bool_param = True
        return message

    def _read(self, response: service_pb2.ModelInferResponse, progress: _Progress) -> tuple[str, bool]:
        """One response's text (counts go into ``progress``) and whether it is the final one."""
        delta = ""
        for i, output in enumerate(response.outputs):
            raw = response.raw_output_contents[i] if i < len(response.raw_output_contents) else b""
            if len(raw) < 4:
                continue
            if output.name == "text_output":
                (length,) = struct.unpack_from("<I", raw)
                delta = raw[4 : 4 + length].decode("utf-8", errors="replace")
            elif output.name == "num_input_tokens":
                (progress.input_tokens,) = struct.unpack_from("<i", raw)
            elif output.name == "num_output_tokens":
                (progress.output_tokens,) = struct.unpack_from("<i", raw)
        if delta:
            progress.generated.append(delta)
            if progress.first_token_at is None:
                progress.first_token_at = time.perf_counter()
        return delta, response.parameters["triton_final_response"].bool_param

    async def _final(
        self,
        request: GenerationRequest,
        prompt_text: str,
        text: str,
        progress: _Progress,
        began: float,
        stopped: FinishReason | None,
    ) -> GenerationChunk:
        prompt_tokens = progress.input_tokens
        if prompt_tokens is None:
            prompt_tokens = await asyncio.to_thread(self._count, prompt_text)
        completion = progress.output_tokens
        if completion is None:
            generated = "".join(progress.generated)
            completion = len(self._tokenizer.encode(generated, add_special_tokens=False)) if generated else 0
        reason = stopped or (FinishReason.LENGTH if completion >= request.max_tokens else FinishReason.STOP)
        now = time.perf_counter()
        first = progress.first_token_at or now
        decode_s = now - first
        return GenerationChunk(
            text=text,
            finish_reason=reason,
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion),
            timings=Timings(
                queue_ms=0.0,
                time_to_first_token_ms=(first - began) * 1000,
                total_ms=(now - began) * 1000,
                decode_tokens_per_second=(completion - 1) / decode_s if completion > 1 and decode_s > 0 else 0.0,
            ),
        )

    def _cancel(self, inflight: _InFlight) -> None:
        inflight.call.cancel()
        spec = self._spec
        if spec is not None and spec.stop_model and self._stub is not None:
            task = asyncio.get_running_loop().create_task(self._send_stop(spec.stop_model, inflight.triton_id))
            self._stops.add(task)
            task.add_done_callback(self._stops.discard)

    async def _send_stop(self, model: str, triton_id: str) -> None:
        """Asks the ensemble's engine step to stop request ``triton_id`` (as TensorRT-LLM's own BLS does)."""
        assert self._stub is not None
        message = service_pb2.ModelInferRequest(model_name=model, id=triton_id)
        for name in ("input_ids", "input_lengths", "request_output_len"):
            _add_raw(message, name, "INT32", [1, 1], struct.pack("<i", 1))
        _add_raw(message, "stop", "BOOL", [1, 1], b"\x01")
        message.parameters["triton_enable_empty_final_response"].bool_param = True

        async def requests() -> AsyncIterator[service_pb2.ModelInferRequest]:
            yield message
            await asyncio.sleep(5)

        call = self._stub.ModelStreamInfer(requests(), timeout=5)
        try:
            async for response in call:
                if response.error_message or response.infer_response.parameters["triton_final_response"].bool_param:
                    break
        except grpc.aio.AioRpcError as e:
            log.warning("could not stop request %s on %s: %s", triton_id, model, e.details())
        finally:
            call.cancel()

    def _error(self, error: grpc.aio.AioRpcError) -> EngineError:
        code, details = error.code(), error.details() or ""
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidRequestError(details)
        if code == grpc.StatusCode.UNAVAILABLE and "queue" in details.lower():
            return QueueFullError(f"Triton's queue for {self._model!r} is full ({details}); retry later")
        if code == grpc.StatusCode.UNAVAILABLE or code == grpc.StatusCode.NOT_FOUND:
            if code == grpc.StatusCode.NOT_FOUND or _TRANSPORT_GONE.search(details):
                self._model_ready = False
            return EngineClosedError(
                f"Triton at {self._url} cannot serve {self._model!r} ({details}); check that tritonserver runs "
                "and inference.triton_url / triton_model name it"
            )
        return EngineError(f"Triton model {self._model!r} failed ({code.name}): {details}")


async def read_model_spec(stub: service_pb2_grpc.GRPCInferenceServiceStub, model: str) -> TritonModelSpec:
    """Reads ``model``'s config, and for an ensemble or BLS its steps', into a TritonModelSpec.

    Raises EngineError naming what is missing when the model lacks TensorRT-LLM's text_input/max_tokens/text_output.
    """
    config = await _model_config(stub, model)
    # An input of a type this client cannot encode counts as undeclared: requests needing it are refused.
    inputs = {t.name: t for t in config.input if t.data_type in WIRE_TYPES}
    outputs = frozenset(t.name for t in config.output)
    missing = [n for n in ("text_input", "max_tokens") if n not in inputs] + [
        n for n in ("text_output",) if n not in outputs
    ]
    if missing:
        raise EngineError(
            f"Triton model {model!r} lacks {', '.join(missing)}; point inference.triton_model at the ensemble or "
            "tensorrt_llm_bls of a TensorRT-LLM model repository"
        )
    params = _parameters(config)
    if params.get("accumulate_tokens", "").strip().lower() in ("true", "1", "yes"):
        raise EngineError(
            f"Triton model {model!r} streams cumulative text (accumulate_tokens); regenerate the repository with "
            "accumulate_tokens=false so it streams deltas"
        )
    steps = {name: await _model_config(stub, name) for name in _step_names(config, params)}
    engine_step = next((c for c in steps.values() if any(t.name == "request_output_len" for t in c.input)), None)
    engine_params = _parameters(engine_step) if engine_step is not None else {}
    decoupled = config.model_transaction_policy.decoupled
    is_ensemble = config.platform == "ensemble"
    if is_ensemble and engine_step is not None:
        decoupled = engine_step.model_transaction_policy.decoupled
    stop_model = None
    if is_ensemble and engine_step is not None and any(t.name == "stop" for t in engine_step.input):
        stop_model = engine_step.name
    tokenizer_dir = params.get("tokenizer_dir") or next(
        (_parameters(c).get("tokenizer_dir") for c in steps.values() if _parameters(c).get("tokenizer_dir")), ""
    )
    preprocessing = steps.get("preprocessing")
    add_special = _parameters(preprocessing).get("add_special_tokens", "true") if preprocessing else "true"
    backend = engine_params.get("guided_decoding_backend")
    return TritonModelSpec(
        name=model,
        inputs=inputs,
        outputs=outputs,
        batched=config.max_batch_size > 0,
        streams=decoupled,
        stop_model=stop_model,
        guided_decoding=None if backend is None else bool(backend),
        tokenizer_dir=tokenizer_dir or "",
        add_special_tokens=add_special.strip().lower() in ("true", "1", "yes"),
        dtype=engine_params.get("dtype") or "unknown",
    )


async def _model_config(stub: service_pb2_grpc.GRPCInferenceServiceStub, model: str) -> model_config_pb2.ModelConfig:
    try:
        reply = await stub.ModelConfig(service_pb2.ModelConfigRequest(name=model), timeout=10)
    except grpc.aio.AioRpcError as e:
        raise EngineError(f"could not read the config of Triton model {model!r}: {e.details()}") from e
    return reply.config


def _step_names(config: model_config_pb2.ModelConfig, params: dict[str, str]) -> list[str]:
    if config.platform == "ensemble":
        return list(dict.fromkeys(step.model_name for step in config.ensemble_scheduling.step))
    engine = params.get("tensorrt_llm_model_name")
    return [engine] if engine else []


def _parameters(config: model_config_pb2.ModelConfig) -> dict[str, str]:
    return {key: value.string_value for key, value in config.parameters.items()}


def _add_input(
    message: service_pb2.ModelInferRequest, declared: model_config_pb2.ModelInput, value: Any, batched: bool
) -> None:
    wire, fmt = WIRE_TYPES[declared.data_type]
    items = value if isinstance(value, list) else [value]
    if wire == "BYTES":
        raw = b"".join(struct.pack("<I", len(b)) + b for b in (str(v).encode("utf-8") for v in items))
    else:
        raw = b"".join(struct.pack(fmt, v) for v in items)
    _add_raw(message, declared.name, wire, ([1] if batched else []) + [len(items)], raw)


def _add_raw(
    message: service_pb2.ModelInferRequest, name: str, datatype: str, shape: Iterable[int], raw: bytes
) -> None:
    tensor = message.inputs.add(name=name, datatype=datatype)
    tensor.shape.extend(shape)
    message.raw_input_contents.append(raw)


def _how_to_avoid(name: str) -> str:
    if name.startswith("guided_decoding"):
        return "drop the constraint or serve a repository with guided decoding"
    if name in ("temperature", "top_k", "top_p", "seed"):
        return "send temperature 0 (greedy) or serve a repository that declares it"
    return f"leave {name} at its default or serve a repository that declares it"


def _load_tokenizer(source: str | os.PathLike[str]) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    path = Path(source)
    if not path.exists():
        raise EngineError(
            f"tokenizer path {path} does not exist; set inference.model_path to the served model's tokenizer "
            "(a HF directory or .gguf file)"
        )
    try:
        if path.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise EngineError(f"could not load the tokenizer from {path}: {e}; set inference.model_path to it") from e


def _import_xgrammar() -> None:
    import xgrammar  # noqa: F401


@functools.lru_cache(maxsize=256)
def _check_constraint(kind: str, value: str) -> None:
    """Parses the constraint as Triton's xgrammar will, so a bad one is refused with INVALID_ARGUMENT before it is sent
    (a BLS reports the engine step's refusal as INTERNAL). Raises InvalidRequestError with the parser's message."""
    import xgrammar as xgr

    names = {"json_schema": "JSON schema", "regex": "regex", "ebnf": "EBNF grammar"}
    if kind not in names:
        raise InvalidRequestError(f"constraint kind {kind!r} is unknown; use one of {', '.join(names)}")
    if kind == "json_schema":
        try:
            schema = json.loads(value)
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"the JSON schema is not valid JSON: {e}; send the schema as JSON text") from e
        if not isinstance(schema, dict | bool):
            raise InvalidRequestError("the JSON schema must be a JSON object (or true/false)")
    try:
        if kind == "json_schema":
            xgr.Grammar.from_json_schema(value, any_whitespace=False)
        elif kind == "regex":
            xgr.Grammar.from_regex(value)
        else:
            xgr.Grammar.from_ebnf(value)
    except RuntimeError as e:
        message = _XGRAMMAR_PREFIX.sub("", str(e).strip())
        raise InvalidRequestError(f"the {names[kind]} is invalid: {message}; fix it") from e
