"""OpenTelemetry traces across the mesh: a tracer provider when the OTEL_* variables ask for one, and the gRPC
interceptors that carry the trace context in call metadata; with tracing off, no provider, exporter or interceptor.

A service calls ``configure(name)`` once at start, before it builds its server and channels (``meshpilot serve``
does). ``MeshServer`` then adds ``server_interceptors()`` (a span per call, continuing the caller's trace from the
``traceparent`` metadata) and ``create_channel`` adds ``client_interceptors()`` (a client span per call, its context
injected into the call's metadata); both come from the OpenTelemetry gRPC instrumentation. Code that makes spans of
its own takes ``tracer()``, a no-op tracer while tracing is off.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import trace

from services.common.config import TracingSettings, tracing_settings

# The SDK, the exporters and the gRPC instrumentation load only when tracing is on (~75 ms of imports otherwise).
if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger(__name__)

INSTRUMENTATION = "meshpilot"
SERVICE_NAME_PREFIX = "meshpilot-"
# Probes and tooling, not work: a span per health check (every few seconds from each prober) would bury the runs.
UNTRACED_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.")

# GenAI semantic-convention attribute names (https://opentelemetry.io/docs/specs/semconv/gen-ai/), written once.
GEN_AI_OPERATION = "gen_ai.operation.name"
GEN_AI_PROVIDER = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
GEN_AI_REQUEST_TOP_P = "gen_ai.request.top_p"
GEN_AI_REQUEST_SEED = "gen_ai.request.seed"
GEN_AI_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_CACHED_INPUT_TOKENS = "gen_ai.usage.cache_read.input_tokens"
GEN_AI_FINISH_REASONS = "gen_ai.response.finish_reasons"
# Seconds; named after the conventions' metric of the same quantity (they define no span attribute for it).
GEN_AI_TIME_TO_FIRST_TOKEN = "gen_ai.server.time_to_first_token"
GEN_AI_AGENT_NAME = "gen_ai.agent.name"
GEN_AI_CONVERSATION_ID = "gen_ai.conversation.id"
GEN_AI_TOOL_NAME = "gen_ai.tool.name"
GEN_AI_TOOL_CALL_ID = "gen_ai.tool.call.id"
GEN_AI_TOOL_TYPE = "gen_ai.tool.type"
PROVIDER = "meshpilot"
_SERVICE_NAME = "service.name"

_provider: TracerProvider | None = None


def configure(service: str, settings: TracingSettings | None = None) -> TracerProvider | None:
    """Sets up this process's tracing for ``service`` (planner, tools, knowledge, inference) as ``settings`` (default:
    the OTEL_* variables) ask; None, and nothing set up, when tracing is off. ConfigError for an exporter or protocol
    we do not have."""
    settings = settings if settings is not None else tracing_settings()
    provider = provider_for(service, settings)
    use(provider)
    if provider is not None:
        # Libraries that trace through the global API (none of ours) find the same provider.
        trace.set_tracer_provider(provider)
        log.info("tracing on: %s as %s", " and ".join(settings.exporters), provider.resource.attributes[_SERVICE_NAME])
    return provider


def provider_for(service: str, settings: TracingSettings) -> TracerProvider | None:
    """The tracer provider ``settings`` ask for, named meshpilot-``service`` unless OTEL_SERVICE_NAME names it; None
    when tracing is off. It exports in batches from a thread of its own and flushes when the process exits."""
    if not settings.enabled:
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    name = settings.service_name or SERVICE_NAME_PREFIX + service
    provider = TracerProvider(resource=Resource.create({_SERVICE_NAME: name}))
    for exporter in settings.exporters:
        provider.add_span_processor(BatchSpanProcessor(_exporter(exporter, settings.protocol)))
    return provider


def _exporter(name: str, protocol: str) -> SpanExporter:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    # Endpoint, headers, timeout, TLS and compression come from the OTEL_EXPORTER_OTLP_* variables (the SDK reads them).
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        return HttpExporter()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

    return GrpcExporter()


def use(provider: TracerProvider | None) -> None:
    """Traces with ``provider`` from now on (None: tracing off). ``configure`` calls it; tests pass a provider with an
    in-memory exporter. Servers and channels built before keep the interceptors they had."""
    global _provider
    _provider = provider


def enabled() -> bool:
    return _provider is not None


def tracer() -> trace.Tracer:
    """The mesh's tracer: a no-op one (spans that record nothing) while tracing is off."""
    return _provider.get_tracer(INSTRUMENTATION) if _provider is not None else trace.NoOpTracer()


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """A span per call (health and reflection excepted) continuing the caller's trace; none while tracing is off."""
    if _provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor(tracer_provider=_provider, filter_=_traced)]


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """A client span per call with its context in the call's metadata; none while tracing is off."""
    if _provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    interceptors: list[grpc.aio.ClientInterceptor] = aio_client_interceptors(tracer_provider=_provider, filter_=_traced)
    return interceptors


def _traced(details: grpc.HandlerCallDetails | grpc.aio.ClientCallDetails) -> bool:
    method = details.method
    name = method.decode() if isinstance(method, bytes) else str(method)
    return not name.lstrip("/").startswith(UNTRACED_SERVICES)


def current_span() -> trace.Span:
    """The span of the code running now (a non-recording one outside any, or while tracing is off)."""
    return trace.get_current_span()


def usage_attributes(
    prompt_tokens: int, completion_tokens: int, cached_prompt_tokens: int, time_to_first_token_ms: float
) -> Mapping[str, Any]:
    """A model call's token counts and time to first token as GenAI attributes."""
    return {
        GEN_AI_INPUT_TOKENS: prompt_tokens,
        GEN_AI_OUTPUT_TOKENS: completion_tokens,
        GEN_AI_CACHED_INPUT_TOKENS: cached_prompt_tokens,
        GEN_AI_TIME_TO_FIRST_TOKEN: time_to_first_token_ms / 1000,
    }
