"""The InferenceService servicer: a thin adapter from gRPC to one or more injected engines."""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import grpc

from inference_core import (
    Engine,
    EngineClosedError,
    EngineError,
    GenerationChunk,
    GenerationRequest,
    InvalidRequestError,
    QueueFullError,
)
from meshpilot.inference.v1 import inference_pb2, inference_pb2_grpc
from services.common import (
    InvalidArgumentError,
    MeshError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
    tracing,
)
from services.common.auth import tenant_of
from services.common.errors import quoted
from services.inference.convert import input_of, to_generate_response, to_generation_request, to_model
from services.inference.metrics import InferenceMetrics
from services.inference.models_dir import ModelDirectory

# xgrammar prefixes its parser errors with a time and its C++ source file ("[02:05:17]
# /project/cpp/regex_converter.cc:94: Regex parsing error..."): noise to a caller, and a look at our internals.
_SOURCE_LOCATION = re.compile(
    r"(?:\[\d{2}:\d{2}:\d{2}\]\s*)?(?:[\w.-]*/)+[\w.-]+\.(?:cc|cpp|cxx|c|h|hpp|cu|py):\d+:?\s*"
)


def public_message(error: BaseException) -> str:
    """An engine error's message as a client sees it: without source file locations."""
    return _SOURCE_LOCATION.sub("", str(error))


@contextlib.contextmanager
def engine_errors() -> Iterator[None]:
    """Re-raises engine errors as the mesh errors the interceptor maps to status codes."""
    try:
        yield
    except InvalidRequestError as e:
        raise InvalidArgumentError(public_message(e)) from e
    except QueueFullError as e:
        raise ResourceExhaustedError(public_message(e)) from e
    except EngineClosedError as e:
        raise UnavailableError(public_message(e)) from e
    except EngineError as e:
        # The engine's own account of a failure (e.g. a Triton server's message): INTERNAL, but with what it said.
        raise MeshError(public_message(e)) from e


def request_attributes(generation: GenerationRequest, requested: str, model_id: str) -> dict[str, Any]:
    """A Generate's request as GenAI attributes of its span."""
    sampling = generation.sampling
    attributes: dict[str, Any] = {
        tracing.GEN_AI_OPERATION: "chat" if generation.messages is not None else "text_completion",
        tracing.GEN_AI_PROVIDER: tracing.PROVIDER,
        tracing.GEN_AI_REQUEST_MODEL: requested or model_id,
        tracing.GEN_AI_RESPONSE_MODEL: model_id,
        tracing.GEN_AI_REQUEST_MAX_TOKENS: generation.max_tokens,
        tracing.GEN_AI_REQUEST_TEMPERATURE: sampling.temperature,
        tracing.GEN_AI_REQUEST_TOP_P: sampling.top_p,
        "meshpilot.tenant": generation.tenant,
    }
    if sampling.seed is not None:
        attributes[tracing.GEN_AI_REQUEST_SEED] = sampling.seed
    return attributes


def result_attributes(last: GenerationChunk) -> dict[str, Any]:
    """A generation's last chunk as GenAI attributes: token counts, time to first token, why it ended."""
    attributes: dict[str, Any] = {
        tracing.GEN_AI_FINISH_REASONS: [last.finish_reason.value] if last.finish_reason else []
    }
    if last.usage is not None:
        ttft_ms = last.timings.time_to_first_token_ms if last.timings is not None else 0.0
        usage = last.usage
        attributes.update(
            tracing.usage_attributes(usage.prompt_tokens, usage.completion_tokens, usage.cached_prompt_tokens, ttft_ms)
        )
    if last.timings is not None:
        attributes["meshpilot.queue_ms"] = last.timings.queue_ms
    return attributes


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    """Serves ``engines`` (the first is the default model), keyed by their ``info.id``.

    Engines are started by ``start_engines()`` (the server's startup hook) and shut down by ``shutdown_engines()``.
    A Generate whose client cancels or disconnects aborts its engine request. A Generate is served for the tenant its
    x-meshpilot-tenant metadata names (see services.common.auth.tenant_of); engines share their capacity between tenants.
    With ``models``, the models registered in its directory are served too, each loaded when ListModels runs or a
    request names it.
    """

    def __init__(
        self,
        engines: Sequence[Engine],
        *,
        default_max_tokens: int,
        model_ids: Sequence[str],
        metrics: InferenceMetrics | None = None,
        models: ModelDirectory | None = None,
    ) -> None:
        if len(engines) != len(model_ids) or not engines:
            raise ValueError("give one model id per engine, and at least one engine")
        self._engines = dict(zip(model_ids, engines, strict=True))
        self._metrics = metrics
        self._default_id = model_ids[0]
        self._default_max_tokens = default_max_tokens
        self._models = models
        self._loading = asyncio.Lock()

    @property
    def engines(self) -> dict[str, Engine]:
        """Served engines by model id."""
        return self._engines

    async def start_engines(self) -> None:
        for engine in self._engines.values():
            await engine.start()

    async def shutdown_engines(self) -> None:
        for engine in self._engines.values():
            await engine.shutdown()

    async def _load_registered(self, model: str | None = None) -> None:
        """Starts an engine for each model registered since the last look; with ``model`` (a request's), only when it
        names a model not served yet (the default model, "", never waits for a look at the directory)."""
        if self._models is None or (model is not None and (not model or model in self._engines)):
            return
        async with self._loading:
            for model_id, path in self._models.new_models(self._engines).items():
                engine = await self._models.load(model_id, path)
                if engine is not None:
                    self._engines[model_id] = engine

    def _engine_for(self, model: str) -> tuple[str, Engine]:
        model_id = model or self._default_id
        engine = self._engines.get(model_id)
        if engine is None:
            raise NotFoundError(f"model {quoted(model)} is not served; ListModels shows: {', '.join(self._engines)}")
        if not engine.is_ready:
            raise UnavailableError(
                f"model '{model_id}' is not ready (loading or shutting down); retry when health reports SERVING"
            )
        return model_id, engine

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        await self._load_registered(request.model)
        model_id, engine = self._engine_for(request.model)
        with engine_errors():
            context_length = engine.info.context_length
        tenant = tenant_of(context.invocation_metadata())
        generation = to_generation_request(
            request,
            default_max_tokens=self._default_max_tokens,
            request_id=uuid.uuid4().hex,
            context_length=context_length,
            tenant=tenant,
        )
        stream = engine.generate(generation)
        tracker = self._metrics.track(model_id) if self._metrics else None
        span = tracing.current_span()  # the call's (MeshServer's tracing interceptor), or a no-op one
        if span.is_recording():
            span.set_attributes(request_attributes(generation, request.model, model_id))
        try:
            with engine_errors():
                async for chunk in stream:
                    if tracker is not None:
                        tracker.observe(chunk)
                    if chunk.finish_reason is not None and span.is_recording():
                        span.set_attributes(result_attributes(chunk))
                    yield to_generate_response(chunk, model_id)
        except ResourceExhaustedError:
            if self._metrics is not None:
                self._metrics.refused(model_id, tenant)
            raise
        finally:
            # Reached on client cancel too (the handler task is cancelled): closing the stream aborts the request.
            await stream.aclose()  # type: ignore[attr-defined]

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.ListModelsResponse:
        await self._load_registered()
        models = []
        for model_id in self._engines:
            _, engine = self._engine_for(model_id)
            with engine_errors():
                models.append(to_model(engine.info, is_default=model_id == self._default_id))
        return inference_pb2.ListModelsResponse(models=models)

    async def CountTokens(
        self, request: inference_pb2.CountTokensRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.CountTokensResponse:
        await self._load_registered(request.model)
        model_id, engine = self._engine_for(request.model)
        prompt, messages = input_of(request)
        with engine_errors():
            # Tokenizing a long prompt takes milliseconds: keep it off the event loop.
            count = await asyncio.to_thread(engine.count_tokens, prompt=prompt, messages=messages)
            context_length = engine.info.context_length
        return inference_pb2.CountTokensResponse(token_count=count, context_length=context_length, model=model_id)
