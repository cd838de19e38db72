"""One `meshpilot ask` through the four services as processes, exporting with OTLP (the OTEL_* variables) to a real
OTLP/gRPC receiver in this test: one trace whose spans cover planner, inference, tools and knowledge, in the tree
run -> step -> chat -> Generate (inference) and step -> execute_tool -> ExecuteTool (tools) -> knowledge."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from tests.integration.processes import ROOT, ServiceProcesses

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SERVICES = ("knowledge", "inference", "tools", "planner")
QUESTION = "What is the capital of France?"


@dataclass
class Span:
    service: str
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: str
    attributes: dict[str, Any]


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver (the collector's TraceService) that keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self._lock = threading.Lock()

    def Export(self, request, context):
        with self._lock:
            for resource_spans in request.resource_spans:
                resource = _attributes(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend(
                        Span(
                            resource["service.name"],
                            span.trace_id.hex(),
                            span.span_id.hex(),
                            span.parent_span_id.hex(),
                            span.name,
                            trace_pb2.Span.SpanKind.Name(span.kind),
                            _attributes(span.attributes),
                        )
                        for span in scope_spans.spans
                    )
        return trace_service_pb2.ExportTraceServiceResponse()


def _attributes(pairs: list[common_pb2.KeyValue]) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


def _value(value: common_pb2.AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[Receiver, int]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(0)


def _children(span: Span, spans: list[Span], name: str | None = None, kind: str | None = None) -> list[Span]:
    return [
        s
        for s in spans
        if s.parent_id == span.span_id and (name is None or s.name == name) and (kind is None or s.kind == kind)
    ]


def _descendants(span: Span, spans: list[Span]) -> Iterator[Span]:
    for child in _children(span, spans):
        yield child
        yield from _descendants(child, spans)


def render(spans: list[Span]) -> str:
    """The span tree, one span a line: service, name, and the attributes that say what it did."""
    shown = ("meshpilot.run.step", "gen_ai.request.model", "gen_ai.usage.output_tokens", "gen_ai.tool.name")
    ids = {s.span_id for s in spans}
    lines: list[str] = []

    def walk(span: Span, depth: int) -> None:
        notes = " ".join(f"{k}={span.attributes[k]}" for k in shown if k in span.attributes)
        lines.append(f"{'  ' * depth}{span.service.removeprefix('meshpilot-')}: {span.name} {notes}".rstrip())
        for child in _children(span, spans):
            walk(child, depth + 1)

    for root in (s for s in spans if s.parent_id not in ids):
        walk(root, 0)
    return "\n".join(lines)


def test_one_ask_is_one_trace_across_planner_inference_tools_and_knowledge(tmp_path, receiver) -> None:
    collected, port = receiver
    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    processes = ServiceProcesses(tmp_path, SERVICES, env=otel)
    try:
        processes.start_all()
        cli_env = {k: v for k, v in processes.env.items() if not k.startswith("OTEL_")}
        ask = subprocess.run(
            [sys.executable, "-m", "meshpilot", "ask", QUESTION, "--planner", processes.target("planner"), "--json"],
            cwd=ROOT, env=cli_env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        # SIGTERM: each service drains, then its tracer provider flushes what it still holds as the process exits.
        codes = processes.stop_all()
    assert ask.returncode == 0, ask.stderr
    assert codes == dict.fromkeys(SERVICES, 0), codes
    result = json.loads(ask.stdout)
    assert "Paris" in result["answer"]

    spans = list(collected.spans)
    [run] = [s for s in spans if s.name == "run"]
    trace = [s for s in spans if s.trace_id == run.trace_id]
    tree = render(trace)
    print(tree)
    assert {s.service for s in trace} == {f"meshpilot-{name}" for name in SERVICES}, tree
    # Every model call and tool call the mesh served belongs to this run's trace.
    for method in ("/meshpilot.inference.v1.InferenceService/Generate", "/meshpilot.tools.v1.ToolsService/ExecuteTool"):
        assert {s.trace_id for s in spans if s.name == method} == {run.trace_id}, tree

    assert run.service == "meshpilot-planner" and run.attributes["meshpilot.run.id"] == result["run_id"]
    assert run.attributes["meshpilot.run.state"] == "SUCCEEDED" and run.attributes["meshpilot.tenant"] == "default"
    [run_rpc] = [s for s in trace if s.span_id == run.parent_id]
    assert (run_rpc.name, run_rpc.kind) == ("/meshpilot.planner.v1.PlannerService/Run", "SPAN_KIND_SERVER")

    steps = _children(run, trace, "step")
    assert steps and sorted(s.attributes["meshpilot.run.step"] for s in steps) == list(range(1, len(steps) + 1))
    for step in steps:
        [chat] = [s for s in _children(step, trace) if s.name.startswith("chat")]
        assert chat.attributes["gen_ai.operation.name"] == "chat" and chat.attributes["gen_ai.usage.output_tokens"] > 0
        [client] = _children(chat, trace, "/meshpilot.inference.v1.InferenceService/Generate", "SPAN_KIND_CLIENT")
        [generate] = _children(client, trace, kind="SPAN_KIND_SERVER")
        assert generate.service == "meshpilot-inference", tree
        assert generate.attributes["gen_ai.usage.output_tokens"] == chat.attributes["gen_ai.usage.output_tokens"]
        assert generate.attributes["gen_ai.server.time_to_first_token"] > 0
        assert generate.attributes["gen_ai.response.model"] == generate.attributes["gen_ai.request.model"] != ""

    [lookup] = [s for s in trace if s.name == "execute_tool country_facts"]
    assert lookup.parent_id in {step.span_id for step in steps} and lookup.attributes["meshpilot.tool.outcome"] == "ok"
    [client] = _children(lookup, trace, "/meshpilot.tools.v1.ToolsService/ExecuteTool", "SPAN_KIND_CLIENT")
    [execute] = _children(client, trace, kind="SPAN_KIND_SERVER")
    assert execute.service == "meshpilot-tools" and execute.attributes["gen_ai.tool.name"] == "country_facts", tree
    knowledge = [s for s in _descendants(execute, trace) if s.service == "meshpilot-knowledge"]
    assert knowledge and all(s.kind == "SPAN_KIND_SERVER" for s in knowledge), tree
    assert all(s.name.startswith("/meshpilot.knowledge.v1.KnowledgeService/") for s in knowledge), tree
