"""The spans of one run: the run, a span per step, and in a step its model call and tool calls (OpenTelemetry GenAI
semantic conventions), so that the inference and tools calls made inside carry the run's trace in their metadata."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from services.common import tracing
from services.planner.state import CallRecord, RunSnapshot
from services.planner.types import Generation, Sampling

# Where a run keeps its trace context (W3C traceparent) in ``RunSnapshot.memory``: a run driven again (after an
# approval, or resumed by another planner process) continues the same trace under its first run span.
TRACE_MEMORY_KEY = "trace_context"
_W3C = TraceContextTextMapPropagator()


class RunSpans:
    """Makes the spans of one run's drives with ``tracer`` (default: the mesh's; while tracing is off, none at all:
    every method then only runs its body).

    ``run()`` wraps a drive in a ``run`` span: the first continues the caller's context (the RPC that started the
    run) and its context is kept in the snapshot's memory; later drives are children of that first span (same
    trace), linked to the context they were started from. ``step(n)`` makes step n's span current (one span per step
    however often it is entered, ended when the next step begins or the drive ends); ``model_call`` and
    ``tool_call`` are children of the current step.
    """

    def __init__(self, snapshot: RunSnapshot, tenant: str, tracer: trace.Tracer | None = None) -> None:
        self.snapshot = snapshot
        self.tenant = tenant
        self.tracer = tracer if tracer is not None else tracing.tracer() if tracing.enabled() else None
        self._run: trace.Span | None = None
        self._step: tuple[int, trace.Span] | None = None

    @contextmanager
    def run(self) -> Iterator[trace.Span]:
        if self.tracer is None:
            yield trace.INVALID_SPAN
            return
        snapshot = self.snapshot
        stored = snapshot.memory.get(TRACE_MEMORY_KEY)
        parent, links = None, []
        if isinstance(stored, dict):
            parent = _W3C.extract(stored)
            caller = trace.get_current_span().get_span_context()
            links = [trace.Link(caller)] if caller.is_valid else []
        attributes: dict[str, Any] = {
            tracing.GEN_AI_OPERATION: "invoke_agent",
            tracing.GEN_AI_AGENT_NAME: snapshot.agent.name,
            tracing.GEN_AI_CONVERSATION_ID: snapshot.session_id,
            "meshpilot.run.id": snapshot.run_id,
            "meshpilot.agent.version": snapshot.agent.version,
            "meshpilot.tenant": self.tenant,
            "meshpilot.run.resumed": parent is not None,
        }
        with self.tracer.start_as_current_span("run", context=parent, attributes=attributes, links=links) as span:
            if parent is None and span.is_recording():
                carrier: dict[str, str] = {}
                _W3C.inject(carrier, context=trace.set_span_in_context(span))
                snapshot.memory[TRACE_MEMORY_KEY] = carrier
            self._run = span
            try:
                yield span
            finally:
                self._end_step()
                self._run = None
                if span.is_recording():
                    span.set_attributes(_usage(snapshot))

    @contextmanager
    def step(self, step: int) -> Iterator[None]:
        if self.tracer is None:
            yield
            return
        if self._step is None or self._step[0] != step:
            self._end_step()
            parent = trace.set_span_in_context(self._run) if self._run is not None else None
            span = self.tracer.start_span("step", context=parent, attributes={"meshpilot.run.step": step})
            self._step = (step, span)
        with trace.use_span(self._step[1], end_on_exit=False):
            yield

    def _end_step(self) -> None:
        if self._step is not None:
            self._step[1].end()
            self._step = None

    @contextmanager
    def model_call(self, model: str, max_tokens: int, sampling: Sampling) -> Iterator[Callable[[Generation], None]]:
        """A ``chat`` span around one model call (its retries included); call the yielded function with what the
        model returned."""
        if self.tracer is None:
            yield _ignore
            return
        attributes: dict[str, Any] = {
            tracing.GEN_AI_OPERATION: "chat",
            tracing.GEN_AI_PROVIDER: tracing.PROVIDER,
            tracing.GEN_AI_REQUEST_MAX_TOKENS: max_tokens,
            tracing.GEN_AI_REQUEST_TEMPERATURE: sampling.temperature,
            tracing.GEN_AI_REQUEST_TOP_P: sampling.top_p,
        }
        if model:  # empty: the inference service's default, which its Generate span names
            attributes[tracing.GEN_AI_REQUEST_MODEL] = model
        if sampling.seed is not None:
            attributes[tracing.GEN_AI_REQUEST_SEED] = sampling.seed
        name = f"chat {model}" if model else "chat"
        with self.tracer.start_as_current_span(name, kind=trace.SpanKind.CLIENT, attributes=attributes) as span:

            def record(generation: Generation) -> None:
                if span.is_recording():
                    usage, timings = generation.usage, generation.timings
                    span.set_attributes(
                        tracing.usage_attributes(
                            usage.prompt_tokens,
                            usage.completion_tokens,
                            usage.cached_prompt_tokens,
                            timings.time_to_first_token_ms,
                        )
                    )

            yield record

    @contextmanager
    def tool_call(self, call: CallRecord) -> Iterator[None]:
        """An ``execute_tool`` span around one tool call; its outcome (ok or error) is read from ``call`` after."""
        if self.tracer is None:
            yield
            return
        attributes: dict[str, Any] = {
            tracing.GEN_AI_OPERATION: "execute_tool",
            tracing.GEN_AI_TOOL_NAME: call.tool,
            tracing.GEN_AI_TOOL_CALL_ID: call.call_id,
            tracing.GEN_AI_TOOL_TYPE: "function",
        }
        with self.tracer.start_as_current_span(f"execute_tool {call.tool}", attributes=attributes) as span:
            yield
            if span.is_recording():
                span.set_attribute("meshpilot.tool.outcome", "ok" if call.error is None else "error")
                if call.error is not None:
                    span.set_attribute("error.type", "tool_error")


def _usage(snapshot: RunSnapshot) -> dict[str, Any]:
    return {
        tracing.GEN_AI_INPUT_TOKENS: snapshot.usage.prompt_tokens,
        tracing.GEN_AI_OUTPUT_TOKENS: snapshot.usage.completion_tokens,
        "meshpilot.run.steps": snapshot.step,
    }


def _ignore(generation: Generation) -> None:
    pass
