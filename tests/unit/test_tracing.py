"""Tracing: the OTEL_* variables that turn it on, the trace context carried across real gRPC calls, the span tree of
a planner run (fake model and tools), and nothing at all while it is off. Spans go to the SDK's in-memory exporter."""

from __future__ import annotations

import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from typer.testing import CliRunner

from inference_core.testing import FakeEngine
from meshpilot.cli.main import app
from meshpilot.inference.v1 import inference_pb2, inference_pb2_grpc
from meshpilot.planner.v1 import planner_pb2
from meshpilot.tools.v1 import tools_pb2, tools_pb2_grpc
from services.common import ConfigError, MeshServer, NotFoundError, ServerConfig, create_channel, load_config, tracing
from services.common.approval import ApprovalSigner
from services.common.config import TracingSettings, tracing_settings
from services.common.server import ServiceBinding
from services.inference import create_server as create_inference_server
from services.inference import servicer_of
from services.planner.run_spans import TRACE_MEMORY_KEY
from services.planner.state import RunSnapshot
from services.tools.server import create_server as create_tools_server
from tests.unit.planner_fakes import FakeTools, Planner, ScriptedLLM
from tests.unit.test_planner_runtime import create_agent, react, react_answer, start, wait_state
from tests.unit.test_tools_service import config as tools_config
from tests.unit.test_tools_service import execute_request, make_registry

TOOLS_SERVICE = tools_pb2.DESCRIPTOR.services_by_name["ToolsService"].full_name


@pytest.fixture
def spans():
    """Tracing on for the test, every finished span in the yielded exporter."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "meshpilot-test"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use(provider)
    yield exporter
    tracing.use(None)
    provider.shutdown()


@pytest.fixture
def config(tmp_path):
    return load_config(data_dir=str(tmp_path), planner={"server": {"port": 0}})


def by_name(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def parent_of(span: ReadableSpan, spans: list[ReadableSpan]) -> ReadableSpan:
    assert span.parent is not None, f"{span.name} has no parent"
    return next(s for s in spans if s.context.span_id == span.parent.span_id)


# -- the variables ------------------------------------------------------------------------------------------------


def test_tracing_is_off_unless_the_variables_ask_for_it() -> None:
    assert not tracing_settings({}).enabled
    assert not tracing_settings({"OTEL_SERVICE_NAME": "x", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}).enabled
    on = tracing_settings({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"})
    assert on.exporters == ("otlp",) and on.protocol == "grpc" and on.service_name is None
    named = tracing_settings({"OTEL_TRACES_EXPORTER": "console,otlp", "OTEL_SERVICE_NAME": "planner-eu"})
    assert named.exporters == ("console", "otlp") and named.service_name == "planner-eu"
    http = tracing_settings(
        {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        }
    )
    assert http.protocol == "http/protobuf"


def test_sdk_disabled_and_exporter_none_win_over_an_endpoint() -> None:
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}
    assert not tracing_settings({**endpoint, "OTEL_SDK_DISABLED": "true"}).enabled
    assert not tracing_settings({**endpoint, "OTEL_TRACES_EXPORTER": "none"}).enabled


def test_an_exporter_or_protocol_we_do_not_have_is_refused_naming_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"OTEL_TRACES_EXPORTER=zipkin: zipkin is not an exporter.*otlp, console"):
        tracing_settings({"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(ConfigError, match=r"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/json: .*grpc or http/protobuf"):
        tracing_settings({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"})


def test_meshpilot_serve_stops_at_start_naming_a_bad_otel_variable(tmp_path) -> None:
    env = {"OTEL_TRACES_EXPORTER": "jaeger", "MESHPILOT_DATA_DIR": str(tmp_path)}
    result = CliRunner().invoke(app, ["serve", "knowledge"], env=env)
    assert result.exit_code == 2
    assert "OTEL_TRACES_EXPORTER=jaeger: jaeger is not an exporter of this mesh" in result.output
    assert not tracing.enabled()


def test_a_service_is_named_meshpilot_service_unless_otel_service_name_says_otherwise() -> None:
    for settings, expected in (
        (TracingSettings(exporters=("console",)), "meshpilot-tools"),
        (TracingSettings(exporters=("console",), service_name="tools-eu"), "tools-eu"),
    ):
        provider = tracing.provider_for("tools", settings)
        assert provider is not None
        assert provider.resource.attributes["service.name"] == expected
        provider.shutdown()


def test_off_costs_nothing_no_provider_interceptor_or_exporter_thread() -> None:
    threads = {t.name for t in threading.enumerate()}
    assert tracing.configure("planner", TracingSettings()) is None
    assert not tracing.enabled()
    assert tracing.server_interceptors() == [] and tracing.client_interceptors() == []
    span = tracing.tracer().start_span("run")
    assert not span.is_recording()
    assert {t.name for t in threading.enumerate()} == threads


# -- across a real gRPC call ---------------------------------------------------------------------------------------


class RecordingTools(tools_pb2_grpc.ToolsServiceServicer):
    def __init__(self) -> None:
        self.metadata: dict[str, str] = {}

    async def ListTools(self, request, context):
        self.metadata = dict(context.invocation_metadata())
        return tools_pb2.ListToolsResponse(tools=[tools_pb2.Tool(name="calculator")])

    async def ExecuteTool(self, request, context):
        raise NotFoundError(f"no tool named {request.name!r}")


async def test_the_trace_context_crosses_a_real_grpc_call_next_to_the_bearer_token(spans) -> None:
    servicer = RecordingTools()
    server = MeshServer(
        ServerConfig(port=0, metrics=False),
        [ServiceBinding(TOOLS_SERVICE, servicer, tools_pb2_grpc.add_ToolsServiceServicer_to_server)],
    )
    await server.start()
    try:
        async with create_channel(server.address, api_key="secret-key") as channel:
            stub = tools_pb2_grpc.ToolsServiceStub(channel)
            with tracing.tracer().start_as_current_span("caller") as caller:
                await stub.ListTools(tools_pb2.ListToolsRequest())
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.ExecuteTool(tools_pb2.ExecuteToolRequest(name="nope"))
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    finally:
        await server.stop(0)

    finished = list(spans.get_finished_spans())
    assert servicer.metadata["authorization"] == "Bearer secret-key"
    assert servicer.metadata["traceparent"].split("-")[1] == f"{caller.get_span_context().trace_id:032x}"
    assert {s.context.trace_id for s in finished} == {caller.get_span_context().trace_id}
    listed = [s for s in by_name(finished, f"/{TOOLS_SERVICE}/ListTools") if s.kind is SpanKind.SERVER]
    assert len(listed) == 1
    client = parent_of(listed[0], finished)
    assert client.kind is SpanKind.CLIENT and parent_of(client, finished).name == "caller"
    refused = next(s for s in by_name(finished, f"/{TOOLS_SERVICE}/ExecuteTool") if s.kind is SpanKind.SERVER)
    assert refused.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert not [s for s in finished if "Health" in s.name]  # probes are not traced


# -- a planner run ------------------------------------------------------------------------------------------------


async def test_a_run_is_one_trace_of_steps_with_their_model_and_tool_calls(config, spans) -> None:
    llm = ScriptedLLM([react(("country_facts", {"country": "France"})), react_answer("Paris.")])
    async with Planner(config, llm, FakeTools()) as planner:
        await create_agent(planner, "geo", model="tiny")
        events = await planner.run("What is the capital of France?", agent="geo")
        stored = await planner.servicer.store.get_run(events[0].run_id, with_events=False)
    llm.assert_consumed()

    finished = list(spans.get_finished_spans())
    [run] = by_name(finished, "run")
    run_rpc = parent_of(run, finished)
    assert run_rpc.name == "/meshpilot.planner.v1.PlannerService/Run" and run_rpc.kind is SpanKind.SERVER
    assert {s.context.trace_id for s in finished if not s.name.endswith("/CreateAgent")} == {run.context.trace_id}
    assert run.attributes["meshpilot.run.id"] == events[0].run_id
    assert run.attributes["gen_ai.agent.name"] == "geo" and run.attributes["meshpilot.tenant"] == "default"
    assert run.attributes["gen_ai.operation.name"] == "invoke_agent"
    assert run.attributes["meshpilot.run.state"] == "SUCCEEDED" and run.attributes["meshpilot.run.resumed"] is False
    assert (run.attributes["gen_ai.usage.input_tokens"], run.attributes["gen_ai.usage.output_tokens"]) == (200, 20)

    steps = by_name(finished, "step")
    assert sorted(s.attributes["meshpilot.run.step"] for s in steps) == [1, 2]
    assert all(parent_of(s, finished) is run for s in steps)
    chats = by_name(finished, "chat tiny")
    assert len(chats) == 2 and {c.parent.span_id for c in chats} == {s.context.span_id for s in steps}
    chat = chats[0]
    assert chat.kind is SpanKind.CLIENT and chat.attributes["gen_ai.operation.name"] == "chat"
    assert chat.attributes["gen_ai.request.model"] == "tiny"
    assert (chat.attributes["gen_ai.usage.input_tokens"], chat.attributes["gen_ai.usage.output_tokens"]) == (100, 10)
    assert "gen_ai.server.time_to_first_token" in chat.attributes
    [tool] = by_name(finished, "execute_tool country_facts")
    assert parent_of(tool, finished).attributes["meshpilot.run.step"] == 1
    assert tool.attributes["gen_ai.tool.name"] == "country_facts"
    assert tool.attributes["gen_ai.tool.call.id"] == "call-1"
    assert tool.attributes["meshpilot.tool.outcome"] == "ok"
    # The run keeps its trace: a run driven again (approval, another planner) continues it.
    memory = RunSnapshot.from_json(stored.snapshot).memory
    assert memory[TRACE_MEMORY_KEY]["traceparent"].split("-")[1] == f"{run.context.trace_id:032x}"


async def test_a_run_driven_again_after_an_approval_and_a_restart_continues_its_trace(config, spans) -> None:
    signer = ApprovalSigner(b"k" * 64)
    llm = ScriptedLLM([react(("calculator", {"expression": "17 * 23"})), react_answer("391")])
    async with Planner(config, llm, FakeTools(), signer=signer) as planner:
        await create_agent(planner, "careful", approval_required=["calculator"])
        run_id = (await start(planner, "What is 17 * 23?", "careful"))[0].run_id
        await wait_state(planner, run_id, planner_pb2.RUN_STATE_WAITING_FOR_APPROVAL)
        await planner.restart()
        await planner.stub.ApproveToolCall(planner_pb2.ApproveToolCallRequest(run_id=run_id, call_id="call-1"))
        await wait_state(planner, run_id, planner_pb2.RUN_STATE_SUCCEEDED)

    finished = list(spans.get_finished_spans())
    first, again = sorted(by_name(finished, "run"), key=lambda s: s.start_time)
    assert first.attributes["meshpilot.run.state"] == "WAITING_FOR_APPROVAL"
    assert again.context.trace_id == first.context.trace_id and again.parent.span_id == first.context.span_id
    assert again.attributes["meshpilot.run.resumed"] is True and again.attributes["meshpilot.run.state"] == "SUCCEEDED"
    approve = next(s for s in finished if s.name.endswith("/ApproveToolCall"))
    assert [link.context.span_id for link in again.links] == [approve.context.span_id]
    [tool] = by_name(finished, "execute_tool calculator")
    assert parent_of(parent_of(tool, finished), finished) is again


async def test_with_tracing_off_a_run_records_nothing_and_keeps_no_trace_context(config) -> None:
    assert not tracing.enabled()
    llm = ScriptedLLM([react(("country_facts", {"country": "France"})), react_answer("Paris.")])
    async with Planner(config, llm, FakeTools()) as planner:
        await create_agent(planner, "geo")
        events = await planner.run("What is the capital of France?", agent="geo")
        stored = await planner.servicer.store.get_run(events[0].run_id, with_events=False)
    assert events[-1].final_answer.answer == "Paris."
    assert TRACE_MEMORY_KEY not in RunSnapshot.from_json(stored.snapshot).memory


# -- the spans of inference and tools -----------------------------------------------------------------------------


async def test_a_generate_span_carries_the_model_token_counts_and_time_to_first_token(spans) -> None:
    config = load_config(inference={"server": {"port": 0, "metrics": False}, "model_id": "fake-model"})
    server = create_inference_server(config, engine=FakeEngine(["The capital of France is Paris."]))
    await server.start()
    await servicer_of(server).start_engines()
    try:
        async with create_channel(server.address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            chat = inference_pb2.ChatInput(messages=[inference_pb2.ChatMessage(role="user", content="Capital?")])
            responses = [r async for r in stub.Generate(inference_pb2.GenerateRequest(chat=chat, max_tokens=50))]
    finally:
        await server.stop(0)

    usage = responses[-1].usage
    [span] = [s for s in spans.get_finished_spans() if s.kind is SpanKind.SERVER]
    assert span.name == "/meshpilot.inference.v1.InferenceService/Generate"
    assert span.attributes["gen_ai.operation.name"] == "chat"
    assert span.attributes["gen_ai.request.model"] == span.attributes["gen_ai.response.model"] == "fake-model"
    assert span.attributes["gen_ai.request.max_tokens"] == 50
    assert span.attributes["gen_ai.usage.input_tokens"] == usage.prompt_tokens > 0
    assert span.attributes["gen_ai.usage.output_tokens"] == usage.completion_tokens > 0
    ttft = responses[-1].timings.time_to_first_token_ms / 1000
    assert span.attributes["gen_ai.server.time_to_first_token"] == pytest.approx(ttft)
    assert span.attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert span.attributes["meshpilot.tenant"] == "default"


async def test_an_execute_tool_span_names_the_tool_the_call_and_its_outcome(spans, tmp_path) -> None:
    server = create_tools_server(tools_config(tmp_path), registry=make_registry())
    await server.start()
    try:
        async with create_channel(server.address) as channel:
            stub = tools_pb2_grpc.ToolsServiceStub(channel)
            await stub.ExecuteTool(execute_request("count", {"n": 3}, run_id="run-7"))
            await stub.ExecuteTool(execute_request("boom"))
    finally:
        await server.stop(0)

    ok, failed = sorted(
        (s for s in spans.get_finished_spans() if s.kind is SpanKind.SERVER), key=lambda s: s.start_time
    )
    assert ok.attributes["gen_ai.tool.name"] == "count" and ok.attributes["gen_ai.tool.call.id"] == "call-1"
    assert ok.attributes["meshpilot.run.id"] == "run-7" and ok.attributes["meshpilot.tool.outcome"] == "ok"
    assert failed.attributes["gen_ai.tool.name"] == "boom" and failed.attributes["meshpilot.tool.outcome"] == "error"
