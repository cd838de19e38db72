"""ChatMeshPilot against a scripted in-process inference service: generation, streaming, tools, structured output and
the errors of each."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from concurrent import futures
from typing import Any, TypedDict

import grpc
import pytest
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.tools import tool
from pydantic import BaseModel

import meshpilot.langchain
from meshpilot.common.v1 import common_pb2
from meshpilot.inference.v1 import inference_pb2, inference_pb2_grpc
from meshpilot.langchain import AuthenticationError, ChatMeshPilot
from services.common import InvalidArgumentError, UnavailableError
from tests.conftest import free_port


class ScriptedInference(inference_pb2_grpc.InferenceServiceServicer):
    """Answers each Generate with the next scripted text, in 4-character deltas; a model name picks a refusal.
    Scripted replies left unused fail the test that scripted them (``expect_all_used``)."""

    def __init__(self) -> None:
        self.replies: list[str] = []
        self.requests: list[inference_pb2.GenerateRequest] = []
        self.metadata: list[dict[str, str]] = []

    def Generate(self, request: inference_pb2.GenerateRequest, context: grpc.ServicerContext) -> Iterator[Any]:
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()))
        if request.model == "refused":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "constraint.json_schema is not supported: 'not'")
        if request.model == "locked":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing bearer token")
        if not self.replies:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no reply scripted for this call")
        text = self.replies.pop(0)
        for i in range(0, len(text), 4):
            yield inference_pb2.GenerateResponse(text=text[i : i + 4], model="smol")
        yield inference_pb2.GenerateResponse(
            finish_reason=inference_pb2.FINISH_REASON_STOP,
            usage=common_pb2.Usage(prompt_tokens=30, completion_tokens=5, total_tokens=35, cached_prompt_tokens=20),
            model="smol",
        )


@pytest.fixture(scope="module")
def service() -> Iterator[tuple[ScriptedInference, str]]:
    # A thread-pool server: sync tests block their thread in invoke, so the fake cannot share their event loop.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    fake = ScriptedInference()
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield fake, f"127.0.0.1:{port}"
    server.stop(0)


@pytest.fixture
def inference(service: tuple[ScriptedInference, str]) -> Iterator[ScriptedInference]:
    fake = service[0]
    fake.replies.clear()
    fake.requests.clear()
    fake.metadata.clear()
    yield fake
    assert not fake.replies, f"scripted replies left unused: {fake.replies}"


@pytest.fixture
def model(service: tuple[ScriptedInference, str]) -> Iterator[ChatMeshPilot]:
    chat = ChatMeshPilot(target=service[1], temperature=0, max_tokens=64, stop=["\n\n"])
    yield chat
    chat.close()


@tool
def country_facts(name: str) -> dict[str, Any]:
    """Facts about a country: capital, currency, region."""
    return {}


@tool
def calculator(expression: str) -> dict[str, Any]:
    """Arithmetic on numbers."""
    return {}


def chat_of(request: inference_pb2.GenerateRequest) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in request.chat.messages]


def test_exports_are_the_public_names_of_the_package() -> None:
    public = {name for name in vars(meshpilot.langchain) if not name.startswith("_")}
    assert set(meshpilot.langchain.__all__) == public
    assert set(meshpilot.langchain.__all__) == {
        "AgentRunError",
        "AuthenticationError",
        "ChatMeshPilot",
        "MeshPilotAgent",
        "ToolApprovalRequiredError",
        "ameshpilot_tools",
        "meshpilot_tools",
    }


def test_invoke_sends_the_chat_and_settings_and_reports_usage(
    model: ChatMeshPilot, inference: ScriptedInference
) -> None:
    inference.replies.append("Paris is the capital.")
    reply = model.invoke([SystemMessage("Be brief."), HumanMessage("Capital of France?")], stop=["END"])

    assert isinstance(reply, AIMessage)
    assert reply.content == "Paris is the capital."
    assert reply.usage_metadata == {
        "input_tokens": 30,
        "output_tokens": 5,
        "total_tokens": 35,
        "input_token_details": {"cache_read": 20},
    }
    assert reply.response_metadata["finish_reason"] == "stop"
    assert reply.response_metadata["model_name"] == "smol"
    request = inference.requests[0]
    assert chat_of(request) == [("system", "Be brief."), ("user", "Capital of France?")]
    assert request.sampling.HasField("temperature") and request.sampling.temperature == 0
    assert not request.sampling.HasField("top_p")
    assert request.max_tokens == 64
    assert list(request.stop) == ["\n\n", "END"]
    assert not request.HasField("constraint")


def test_stream_yields_the_deltas_then_a_last_chunk_with_usage(
    model: ChatMeshPilot, inference: ScriptedInference
) -> None:
    inference.replies.append("Paris, France")
    chunks = list(model.stream("Capital of France?"))

    assert all(isinstance(chunk, AIMessageChunk) for chunk in chunks)
    assert [chunk.content for chunk in chunks] == ["Pari", "s, F", "ranc", "e", ""]
    assert chunks[-1].usage_metadata is not None and chunks[-1].usage_metadata["total_tokens"] == 35
    assert chunks[-1].chunk_position == "last"
    assert all(chunk.usage_metadata is None for chunk in chunks[:-1])


async def test_astream_and_ainvoke(model: ChatMeshPilot, inference: ScriptedInference) -> None:
    inference.replies += ["Hello there", "Bonjour"]
    chunks = [chunk async for chunk in model.astream("Say hello")]
    reply = await model.ainvoke("Say bonjour")

    assert "".join(str(chunk.content) for chunk in chunks) == "Hello there"
    assert chunks[-1].usage_metadata is not None
    assert reply.content == "Bonjour"
    assert reply.usage_metadata is not None and reply.usage_metadata["output_tokens"] == 5


def test_a_stream_left_early_is_cancelled_and_the_model_still_works(
    model: ChatMeshPilot, inference: ScriptedInference
) -> None:
    inference.replies += ["a long reply that is not read to its end", "next"]
    stream = model.stream("Tell me a story")
    assert next(stream).content == "a lo"
    stream.close()

    assert model.invoke("Again").content == "next"


def test_a_copied_model_shares_the_channel_and_a_closed_one_reopens(
    model: ChatMeshPilot, inference: ScriptedInference
) -> None:
    inference.replies += ["one", "two"]
    copied = copy.deepcopy(model)
    assert copied.invoke("hi").content == "one"
    model.close()
    assert model.invoke("hi").content == "two"


def test_bind_tools_returns_a_tool_call_constrained_by_the_tools_schemas(
    model: ChatMeshPilot, inference: ScriptedInference
) -> None:
    inference.replies.append('{"tool": "country_facts", "arguments": {"name": "France"}}')
    reply = model.bind_tools([country_facts, calculator]).invoke("What is the capital of France?")

    assert reply.content == ""
    assert len(reply.tool_calls) == 1
    call = reply.tool_calls[0]
    assert (call["name"], call["args"]) == ("country_facts", {"name": "France"})
    assert call["id"] and call["id"].startswith("call_")
    assert reply.response_metadata["finish_reason"] == "tool_calls"
    assert reply.usage_metadata is not None and reply.usage_metadata["total_tokens"] == 35
    schema = json.loads(inference.requests[0].constraint.json_schema)
    options = schema["anyOf"]
    assert [option["properties"].get("tool") for option in options] == [
        {"const": "country_facts"},
        {"const": "calculator"},
        None,
    ]
    assert options[0]["properties"]["arguments"]["properties"]["name"]["type"] == "string"
    assert "final_answer" in options[2]["properties"]
    system = inference.requests[0].chat.messages[0]
    assert system.role == "system" and "- country_facts" in system.content and "- calculator" in system.content


@pytest.mark.parametrize(
    ("choice", "offered"),
    [
        ("required", ["country_facts", "calculator"]),
        ("any", ["country_facts", "calculator"]),
        ("calculator", ["calculator"]),
        ({"type": "function", "function": {"name": "calculator"}}, ["calculator"]),
        ("none", []),
    ],
)
def test_tool_choice_narrows_the_offered_actions(
    model: ChatMeshPilot, inference: ScriptedInference, choice: Any, offered: list[str]
) -> None:
    inference.replies.append('{"final_answer": "done"}' if not offered else '{"tool": "calculator", "arguments": {}}')
    model.bind_tools([country_facts, calculator], tool_choice=choice).invoke("2+2?")

    options = json.loads(inference.requests[0].constraint.json_schema)["anyOf"]
    assert [o["properties"]["tool"]["const"] for o in options if "tool" in o["properties"]] == offered
    assert any("final_answer" in o["properties"] for o in options) == (not offered)


def test_a_final_answer_with_tools_bound_is_the_reply_text(model: ChatMeshPilot, inference: ScriptedInference) -> None:
    inference.replies.append('{"final_answer": "The capital of France is Paris."}')
    chunks = list(model.bind_tools([country_facts]).stream("What is the capital of France?"))

    assert [chunk.content for chunk in chunks] == ["The capital of France is Paris."]
    assert not chunks[0].tool_call_chunks


def test_tool_results_are_fenced_observations_in_the_planners_format(
    model: ChatMeshPilot, inference: ScriptedInference
) -> None:
    inference.replies.append('{"final_answer": "The capital of France is Paris."}')
    messages = [
        SystemMessage("You answer geography questions."),
        HumanMessage("Capital of Peru?"),
        AIMessage("The capital of Peru is Lima."),
        HumanMessage("Capital of France?"),
        AIMessage("", tool_calls=[{"name": "country_facts", "args": {"name": "France"}, "id": "c1"}]),
        ToolMessage('{"capital": "Paris"}', tool_call_id="c1"),
    ]
    reply = model.bind_tools([country_facts]).invoke(messages)

    assert reply.content == "The capital of France is Paris."
    chat = chat_of(inference.requests[0])
    assert chat[0][0] == "system" and chat[0][1].startswith("You answer geography questions.")
    assert chat[1:] == [
        ("user", "Capital of Peru?"),
        ("assistant", '{"final_answer": "The capital of Peru is Lima."}'),
        ("user", "Capital of France?"),
        ("assistant", '{"tool": "country_facts", "arguments": {"name": "France"}}'),
        ("user", f'Observation: <data-{model._nonce}>{{"capital": "Paris"}}</data-{model._nonce}>\n'
         "The question was: Capital of France?"),
    ]  # fmt: skip


def test_a_failed_tool_result_is_an_error_observation(model: ChatMeshPilot, inference: ScriptedInference) -> None:
    inference.replies.append('{"final_answer": "I could not find the answer."}')
    messages = [
        HumanMessage("Capital of Atlantis?"),
        AIMessage("", tool_calls=[{"name": "country_facts", "args": {"name": "Atlantis"}, "id": "c1"}]),
        ToolMessage("no country named Atlantis", tool_call_id="c1", status="error"),
    ]
    model.bind_tools([country_facts]).invoke(messages)

    assert '{"error": "no country named Atlantis"}' in chat_of(inference.requests[0])[-1][1]


def test_an_action_cut_short_stays_text(model: ChatMeshPilot, inference: ScriptedInference) -> None:
    inference.replies.append('{"tool": "country_facts", "argu')
    reply = model.bind_tools([country_facts]).invoke("Capital of France?")

    assert reply.content == '{"tool": "country_facts", "argu'
    assert reply.tool_calls == []


def test_plain_chat_renders_tool_calls_and_results_as_turns(model: ChatMeshPilot, inference: ScriptedInference) -> None:
    inference.replies.append("Paris.")
    model.invoke(
        [
            HumanMessage("Capital of France?"),
            AIMessage("", tool_calls=[{"name": "country_facts", "args": {"name": "France"}, "id": "c1"}]),
            ToolMessage('{"capital": "Paris"}', tool_call_id="c1"),
        ]
    )

    assert chat_of(inference.requests[0]) == [
        ("user", "Capital of France?"),
        ("assistant", '{"tool": "country_facts", "arguments": {"name": "France"}}'),
        ("tool", '{"capital": "Paris"}'),
    ]


class City(BaseModel):
    name: str
    country: str


def test_structured_output_returns_a_validated_pydantic_object(
    model: ChatMeshPilot, inference: ScriptedInference
) -> None:
    inference.replies.append('{"name": "Paris", "country": "France"}')
    city = model.with_structured_output(City).invoke("Name a city")

    assert city == City(name="Paris", country="France")
    schema = json.loads(inference.requests[0].constraint.json_schema)
    assert schema["required"] == ["name", "country"] and schema["type"] == "object"


def test_structured_output_from_a_json_schema_is_a_dict(model: ChatMeshPilot, inference: ScriptedInference) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    inference.replies.append('{"answer": 4}')

    assert model.with_structured_output(schema).invoke("2+2?") == {"answer": 4}
    assert json.loads(inference.requests[0].constraint.json_schema) == schema


def test_structured_output_include_raw(model: ChatMeshPilot, inference: ScriptedInference) -> None:
    inference.replies += ['{"name": "Paris", "country": "France"}', '{"name": "Paris"}']
    structured = model.with_structured_output(City, include_raw=True)
    good = structured.invoke("Name a city")
    bad = structured.invoke("Name a city")

    assert isinstance(good, dict)
    assert good["parsed"] == City(name="Paris", country="France") and good["parsing_error"] is None
    assert isinstance(good["raw"], AIMessage) and good["raw"].usage_metadata is not None
    assert isinstance(bad, dict)
    assert bad["parsed"] is None and "country" in str(bad["parsing_error"])


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "array", "items": {"type": "string"}}, "must describe a JSON object"),
        ({"type": "object", "properties": {"a": {"type": 5}}}, "not a valid JSON Schema"),
        (42, "takes a pydantic model, a JSON Schema or a TypedDict"),
    ],
)
def test_structured_output_refuses_a_schema_that_is_not_an_object(
    model: ChatMeshPilot, schema: Any, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        model.with_structured_output(schema)


def test_structured_output_refuses_unknown_methods_and_arguments(model: ChatMeshPilot) -> None:
    with pytest.raises(ValueError, match="method 'xml'"):
        model.with_structured_output(City, method="xml")
    with pytest.raises(ValueError, match="unsupported arguments: colour"):
        model.with_structured_output(City, colour="red")
    with pytest.raises(ValueError, match="always strict"):
        model.with_structured_output(City, strict=False)


def test_bind_tools_refuses_bad_arguments_at_bind_time(model: ChatMeshPilot) -> None:
    with pytest.raises(ValueError, match="tool_choice 'sometimes' is not one of auto, required, any, none"):
        model.bind_tools([country_facts], tool_choice="sometimes")
    with pytest.raises(ValueError, match=r"tool_choice 'weather'.*country_facts"):
        model.bind_tools([country_facts], tool_choice="weather")
    with pytest.raises(ValueError, match="at least one tool"):
        model.bind_tools([])
    with pytest.raises(ValueError, match="distinct names"):
        model.bind_tools([country_facts, country_facts])
    not_object = {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}
    with pytest.raises(ValueError, match="tool 'f' must describe a JSON object"):
        model.bind_tools([not_object])


def test_messages_the_service_cannot_take_are_refused_before_calling(
    model: ChatMeshPilot, inference: ScriptedInference
) -> None:
    image = HumanMessage(content=[{"type": "image", "url": "https://example.com/a.png"}])
    with pytest.raises(ValueError, match="message 0 has a 'image' content block; ChatMeshPilot takes text only"):
        model.invoke([image])
    with pytest.raises(ValueError, match="no HumanMessage"):
        model.bind_tools([country_facts]).invoke([SystemMessage("hi")])
    with pytest.raises(ValueError, match=r"message 1 \(ai\) follows the last human message without calling a tool"):
        model.bind_tools([country_facts]).invoke([HumanMessage("hi"), AIMessage("hello")])
    with pytest.raises(ValueError, match="does not take colour"):
        model.bind(colour="red").invoke("hi")
    with pytest.raises(ValueError, match="not both"):
        model.bind_tools([country_facts]).bind(response_format={"type": "object"}).invoke("hi")
    assert inference.requests == []


def test_a_refused_request_raises_invalid_argument_naming_the_service(service: tuple[ScriptedInference, str]) -> None:
    model = ChatMeshPilot(target=service[1], model="refused")
    with pytest.raises(InvalidArgumentError, match=rf"^inference at {service[1]}: constraint.json_schema"):
        model.invoke("hi")


async def test_unauthenticated_says_to_pass_an_api_key(service: tuple[ScriptedInference, str]) -> None:
    model = ChatMeshPilot(target=service[1], model="locked", api_key="mpk_wrong")
    with pytest.raises(AuthenticationError, match="missing bearer token; pass api_key="):
        await model.ainvoke("hi")
    assert service[0].metadata[-1]["authorization"] == "Bearer mpk_wrong"


def test_an_unreachable_service_says_to_start_the_mesh() -> None:
    target = f"127.0.0.1:{free_port()}"
    model = ChatMeshPilot(target=target, timeout=5)
    with pytest.raises(UnavailableError, match=rf"is the mesh up \(`meshpilot up`\) and is {target} the address"):
        model.invoke("hi")


def test_the_default_target_is_the_mesh_configs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHPILOT_INFERENCE__SERVER__PORT", "50154")
    assert ChatMeshPilot().target == "127.0.0.1:50154"


def test_bind_tools_refuses_what_is_not_a_tool(model: ChatMeshPilot) -> None:
    with pytest.raises(ValueError, match="cannot bind int '42' as a tool; pass a BaseTool"):
        model.bind_tools([42])
    with pytest.raises(ValueError, match=r"cannot bind str 'aaa.*\(100000 characters\)") as cut:
        model.bind_tools(["a" * 100_000])
    assert len(str(cut.value)) < 300
    huge = {"type": "function", "function": {"name": "f", "parameters": {"type": "x" * 100_000}}}
    with pytest.raises(ValueError, match=r"not 'xxx.*\(100000 characters\)") as caught:
        model.bind_tools([huge])
    assert len(str(caught.value)) < 300


def test_bind_tools_takes_the_options_agents_pass(model: ChatMeshPilot, inference: ScriptedInference) -> None:
    inference.replies.append('{"tool": "calculator", "arguments": {"expression": "1+1"}}')
    reply = model.bind_tools([calculator], parallel_tool_calls=False, strict=True).invoke("1+1?")
    assert reply.tool_calls[0]["args"] == {"expression": "1+1"}


def test_a_tool_call_without_its_result_is_an_error_observation(
    model: ChatMeshPilot, inference: ScriptedInference
) -> None:
    inference.replies.append('{"final_answer": "unknown"}')
    messages = [
        HumanMessage("Capital of France?"),
        AIMessage("", tool_calls=[{"name": "country_facts", "args": {"name": "France"}, "id": "c1"}]),
    ]
    model.bind_tools([country_facts]).invoke(messages)

    assert '{"error": "no result"}' in chat_of(inference.requests[0])[-1][1]


def test_a_message_of_another_kind_is_refused(model: ChatMeshPilot, inference: ScriptedInference) -> None:
    with pytest.raises(ValueError, match="message 0 is a 'chat' message; use system, human, ai or tool messages"):
        model.invoke([ChatMessage("hello", role="critic")])
    assert inference.requests == []


class CityDict(TypedDict):
    """A city."""

    name: str


@pytest.mark.parametrize(
    "schema",
    [
        CityDict,
        {"type": "function", "function": {"name": "city", "parameters": {"type": "object", "properties": {}}}},
    ],
)
def test_structured_output_takes_typed_dicts_and_openai_tools(
    model: ChatMeshPilot, inference: ScriptedInference, schema: Any
) -> None:
    inference.replies.append('{"name": "Paris"}')
    assert model.with_structured_output(schema).invoke("Name a city") == {"name": "Paris"}
    assert json.loads(inference.requests[0].constraint.json_schema)["type"] == "object"


def test_structured_output_json_mode_asks_for_any_object(model: ChatMeshPilot, inference: ScriptedInference) -> None:
    inference.replies.append('{"anything": [1, 2]}')
    assert model.with_structured_output(None, method="json_mode").invoke("Some JSON") == {"anything": [1, 2]}
    assert json.loads(inference.requests[0].constraint.json_schema) == {"type": "object"}
