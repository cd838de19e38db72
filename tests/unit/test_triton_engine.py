"""TritonEngine against a scripted in-process Triton gRPC server: request mapping to the declared inputs, streaming,
stop strings, cancellation, readiness and error codes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from tritonclient.grpc import model_config_pb2

from inference_core import (
    Constraint,
    EngineClosedError,
    EngineError,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    InvalidRequestError,
    QueueFullError,
    SamplingParams,
)
from inference_core.triton_engine import TritonEngine
from tests.conftest import free_port
from tests.unit.triton_fakes import (
    Close,
    Fail,
    FakeTriton,
    Hang,
    decode_inputs,
    drop_inputs,
    rename_inputs,
    repository_configs,
    start_fake,
    write_word_tokenizer,
)

GREEDY = SamplingParams(temperature=0.0)
SCHEMA = '{"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}'


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_word_tokenizer(tmp_path_factory.mktemp("tokenizer"))


Connect = Callable[..., Awaitable[tuple[TritonEngine, FakeTriton]]]


@pytest.fixture
async def connect(tokenizer_dir: Path) -> AsyncIterator[Connect]:
    """Starts a FakeTriton (configs of our repository unless given) and a started TritonEngine on it."""
    servers: list[grpc.aio.Server] = []
    engines: list[TritonEngine] = []

    async def make(
        model: str = "ensemble", configs: dict | None = None, health_interval_s: float = 0.02, **fake_args: object
    ):
        fake = FakeTriton(configs or repository_configs(), **fake_args)  # type: ignore[arg-type]
        server, url = await start_fake(fake)
        servers.append(server)
        engine = TritonEngine(
            url, model, tokenizer_path=tokenizer_dir, context_length=64, health_interval_s=health_interval_s
        )
        engines.append(engine)
        await engine.start()
        return engine, fake

    yield make
    for engine in engines:
        await engine.shutdown()
    for server in servers:
        await server.stop(None)


async def collect(engine: TritonEngine, request: GenerationRequest) -> list[GenerationChunk]:
    return [chunk async for chunk in engine.generate(request)]


async def wait_for(condition: Callable[[], bool]) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
async def test_prompt_streams_deltas_and_ends_with_usage_from_triton(connect: Connect, model: str) -> None:
    engine, fake = await connect(model, script=lambda r: ["Hello", " wor", "ld"])
    chunks = await collect(engine, GenerationRequest(prompt="Hello world", max_tokens=8, sampling=GREEDY))
    assert [c.text for c in chunks] == ["Hello", " wor", "ld", ""]
    last = chunks[-1]
    assert last.finish_reason is FinishReason.STOP
    assert last.usage is not None and (last.usage.prompt_tokens, last.usage.completion_tokens) == (2, 3)
    assert last.timings is not None and last.timings.total_ms >= last.timings.time_to_first_token_ms > 0
    sent = decode_inputs(fake.requests[0])
    assert fake.requests[0].model_name == model
    assert sent["text_input"] == ["Hello world"] and sent["max_tokens"] == 8
    assert sent["stream"] is True and sent["exclude_input_in_output"] is True and sent["top_k"] == 1
    assert sent["return_num_input_tokens"] is True and sent["return_num_output_tokens"] is True
    assert "temperature" not in sent and "seed" not in sent
    assert sent["_shapes"]["text_input"] == [1, 1]
    assert {o.name for o in fake.requests[0].outputs} == {"text_output", "num_input_tokens", "num_output_tokens"}
    assert fake.requests[0].parameters["triton_enable_empty_final_response"].bool_param
    assert fake.metadata[0]["triton_grpc_error"] == "true"


async def test_length_when_triton_generated_max_tokens(connect: Connect) -> None:
    engine, _ = await connect(script=lambda r: ["a", " b"])
    chunks = await collect(engine, GenerationRequest(prompt="Hello", max_tokens=2, sampling=GREEDY))
    assert chunks[-1].finish_reason is FinishReason.LENGTH


async def test_chat_messages_are_rendered_with_the_tokenizer_template(connect: Connect) -> None:
    engine, fake = await connect()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"}]
    await collect(engine, GenerationRequest(messages=messages, max_tokens=4, sampling=GREEDY))
    assert decode_inputs(fake.requests[0])["text_input"] == [
        "<s>system: Be brief.\n<s>user: Hello world\n<s>assistant:"
    ]
    assert (
        engine.count_tokens(messages=messages) == 14
    )  # <s> system : Be brief . <s> user : Hello world <s> assistant :
    assert engine.count_tokens(prompt="Hello world") == 2


async def test_sampling_maps_to_the_declared_inputs_and_types(connect: Connect) -> None:
    engine, fake = await connect()
    sampling = SamplingParams(temperature=0.7, top_p=0.9, top_k=40, seed=2**63 + 5, repetition_penalty=1.1)
    await collect(engine, GenerationRequest(prompt="Hello", max_tokens=4, sampling=sampling, stop=["</s>", "END"]))
    sent = decode_inputs(fake.requests[0])
    assert sent["temperature"] == pytest.approx(0.7) and sent["top_p"] == pytest.approx(0.9)
    assert sent["top_k"] == 40 and sent["seed"] == 2**63 + 5
    assert sent["repetition_penalty"] == pytest.approx(1.1)
    assert sent["stop_words"] == ["</s>", "END"] and sent["_shapes"]["stop_words"] == [1, 2]
    datatypes = {t.name: t.datatype for t in fake.requests[0].inputs}
    assert datatypes["seed"] == "UINT64" and datatypes["top_p"] == "FP32" and datatypes["top_k"] == "INT32"


async def test_older_input_names_and_no_counts_are_handled(connect: Connect) -> None:
    configs = repository_configs()
    old = rename_inputs(configs["ensemble"], seed="random_seed", min_tokens="min_length")
    old = drop_inputs(old, "return_num_input_tokens", "return_num_output_tokens")
    del old.output[:]
    old.output.add(name="text_output", data_type=configs["ensemble"].output[0].data_type, dims=[-1])
    configs["ensemble"] = old
    engine, fake = await connect(configs=configs, script=lambda r: ["Hello", " world", " Hello"])
    assert engine.spec.input_name("seed") == "random_seed" and engine.spec.input_name("min_tokens") == "min_length"
    sampling = SamplingParams(temperature=1.0, seed=7)
    chunks = await collect(engine, GenerationRequest(prompt="Hello Hello world", max_tokens=8, sampling=sampling))
    sent = decode_inputs(fake.requests[0])
    assert sent["random_seed"] == 7 and "seed" not in sent and "return_num_output_tokens" not in sent
    assert {o.name for o in fake.requests[0].outputs} == {"text_output"}
    usage = chunks[-1].usage
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (3, 3), "counted by the tokenizer"


async def test_a_feature_the_model_does_not_declare_is_refused_before_sending(connect: Connect) -> None:
    configs = repository_configs()
    configs["ensemble"] = drop_inputs(configs["ensemble"], "temperature", "guided_decoding_guide_type")
    engine, fake = await connect(configs=configs)
    with pytest.raises(InvalidRequestError, match=r"declares no input 'temperature'.*send temperature 0"):
        await collect(engine, GenerationRequest(prompt="Hello", sampling=SamplingParams(temperature=0.5)))
    constraint = Constraint(kind="json_schema", value=SCHEMA)
    with pytest.raises(InvalidRequestError, match=r"'guided_decoding_guide_type'.*drop the constraint"):
        await collect(engine, GenerationRequest(prompt="Hello", sampling=GREEDY, constraint=constraint))
    assert fake.requests == []


@pytest.mark.parametrize(
    ("kind", "value", "guide_type"),
    [("json_schema", SCHEMA, "json_schema"), ("regex", "[a-z]+", "regex"), ("ebnf", 'root ::= "yes"', "ebnf_grammar")],
)
async def test_constraints_become_guided_decoding_inputs(
    connect: Connect, kind: str, value: str, guide_type: str
) -> None:
    engine, fake = await connect()
    request = GenerationRequest(prompt="Hello", sampling=GREEDY, constraint=Constraint(kind=kind, value=value))  # type: ignore[arg-type]
    await collect(engine, request)
    sent = decode_inputs(fake.requests[0])
    assert sent["guided_decoding_guide_type"] == [guide_type] and sent["guided_decoding_guide"] == [value]


@pytest.mark.parametrize(
    ("kind", "value", "message"),
    [
        ("json_schema", "{not json", "the JSON schema is not valid JSON"),
        ("json_schema", '{"type": "nope"}', 'the JSON schema is invalid: Unsupported type "nope"; fix it'),
        ("regex", "[a-z", "the regex is invalid: Regex parsing error"),
        ("ebnf", "root ::= foo", 'the EBNF grammar is invalid: .*Rule "foo" is not defined'),
    ],
)
async def test_invalid_constraints_are_refused_before_sending(
    connect: Connect, kind: str, value: str, message: str
) -> None:
    engine, fake = await connect("tensorrt_llm_bls")
    request = GenerationRequest(prompt="Hello", sampling=GREEDY, constraint=Constraint(kind=kind, value=value))  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match=message):
        await collect(engine, request)
    assert fake.requests == []


async def test_constraint_refused_when_the_repository_turned_guided_decoding_off(connect: Connect) -> None:
    engine, fake = await connect(configs=repository_configs(guided_decoding_backend=""))
    request = GenerationRequest(prompt="Hello", sampling=GREEDY, constraint=Constraint(kind="regex", value="a+"))
    with pytest.raises(InvalidRequestError, match=r"guided decoding is off.*guided_decoding_backend=xgrammar"):
        await collect(engine, request)
    assert fake.requests == []


async def test_stop_string_is_cut_and_the_triton_request_stopped(connect: Connect) -> None:
    engine, fake = await connect(script=lambda r: ["Hello wor", "ld EN", "D and more", Hang()])
    chunks = await collect(engine, GenerationRequest(prompt="Hello", max_tokens=50, sampling=GREEDY, stop=["END"]))
    assert "".join(c.text for c in chunks) == "Hello world "
    assert chunks[-1].finish_reason is FinishReason.STOP_STRING
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    await wait_for(lambda: bool(fake.cancelled) and bool(fake.stops))
    assert fake.stops == [("tensorrt_llm", fake.requests[0].id)]


@pytest.mark.parametrize(("model", "stops"), [("ensemble", 1), ("tensorrt_llm_bls", 0)])
async def test_closing_the_stream_cancels_the_triton_request(connect: Connect, model: str, stops: int) -> None:
    engine, fake = await connect(model, script=lambda r: ["Hello", Hang()])
    stream = engine.generate(GenerationRequest(prompt="Hello", max_tokens=50, sampling=GREEDY))
    assert (await anext(stream)).text == "Hello"
    await stream.aclose()  # type: ignore[attr-defined]
    await wait_for(lambda: fake.cancelled == [fake.requests[0].id])
    await asyncio.sleep(0.05)
    # The ensemble does not pass cancellation on to a running step: its engine step is told to stop by request id.
    assert fake.stops == [("tensorrt_llm", fake.requests[0].id)] * stops
    assert fake.requests[0].id.isdigit()


async def test_cancelling_the_consuming_task_cancels_the_triton_request(connect: Connect) -> None:
    engine, fake = await connect(script=lambda r: [Hang()])
    task = asyncio.create_task(collect(engine, GenerationRequest(prompt="Hello", sampling=GREEDY)))
    await wait_for(lambda: bool(fake.requests))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_for(lambda: bool(fake.cancelled) and bool(fake.stops))


async def test_abort_ends_the_stream_with_cancelled(connect: Connect) -> None:
    engine, fake = await connect(script=lambda r: ["Hello", Hang()])
    request = GenerationRequest(prompt="Hello", sampling=GREEDY)
    stream = engine.generate(request)
    assert (await anext(stream)).text == "Hello"
    await engine.abort(request.request_id)
    rest = [chunk async for chunk in stream]
    assert [c.finish_reason for c in rest] == [FinishReason.CANCELLED]
    await wait_for(lambda: bool(fake.cancelled) and bool(fake.stops))
    await engine.abort("unknown-id")


@pytest.mark.parametrize(
    ("code", "message", "error", "shown"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, "beam_width > 1 is not supported; send 1", InvalidRequestError, "send 1"),
        (grpc.StatusCode.UNAVAILABLE, "Exceeds maximum queue size", QueueFullError, "queue .* is full.*retry later"),
        (grpc.StatusCode.UNAVAILABLE, "the engine is not running", EngineClosedError, "check that tritonserver runs"),
        (grpc.StatusCode.INTERNAL, "min_tokens above 1 is not supported", EngineError, "INTERNAL.*min_tokens above"),
    ],
)
async def test_triton_errors_map_to_engine_errors(
    connect: Connect, code: grpc.StatusCode, message: str, error: type, shown: str
) -> None:
    engine, _ = await connect(script=lambda r: [Fail(code, message)])
    with pytest.raises(error, match=shown) as caught:
        await collect(engine, GenerationRequest(prompt="Hello", sampling=GREEDY))
    if error is EngineError:
        assert type(caught.value) is EngineError
    assert engine.is_ready


async def test_error_message_on_the_stream_is_an_engine_error(connect: Connect) -> None:
    engine, _ = await connect(script=lambda r: [Fail(grpc.StatusCode.INTERNAL, "stub crashed")], error_header=False)
    with pytest.raises(EngineError, match=r"failed: stub crashed"):
        await collect(engine, GenerationRequest(prompt="Hello", sampling=GREEDY))


async def test_non_decoupled_model_takes_one_response(connect: Connect) -> None:
    configs = repository_configs(decoupled=False)
    engine, fake = await connect(configs=configs, script=lambda r: ["Hello world", "never read"])
    assert not engine.spec.streams
    chunks = await collect(engine, GenerationRequest(prompt="Hello", sampling=GREEDY))
    assert [c.text for c in chunks] == ["Hello world"] and chunks[-1].finish_reason is FinishReason.STOP
    assert decode_inputs(fake.requests[0])["stream"] is False


async def test_prompt_over_the_context_is_refused(connect: Connect) -> None:
    engine, fake = await connect()
    with pytest.raises(InvalidRequestError, match=r"prompt has 70 tokens but the model's context is 64; shorten"):
        await collect(engine, GenerationRequest(prompt="Hello " * 70, sampling=GREEDY))
    chunks = await collect(engine, GenerationRequest(prompt="Hello" * 70, sampling=GREEDY))
    assert chunks[-1].finish_reason is FinishReason.STOP, "one long word is one token here"
    assert len(fake.requests) == 1


@pytest.mark.parametrize(
    ("request_args", "message"),
    [
        ({"prompt": ""}, "prompt is empty"),
        ({"prompt": "a", "messages": [{"role": "user", "content": "a"}]}, "exactly one of prompt or messages"),
        ({"messages": []}, "messages is empty"),
        ({"messages": [{"role": "robot", "content": "a"}]}, "role 'robot'; use one of"),
        ({"prompt": "a", "max_tokens": 0}, r"max_tokens must be in \[1, "),
        ({"prompt": "a", "sampling": SamplingParams(top_p=0.0)}, r"top_p must be in \(0, 1\]"),
    ],
)
async def test_bad_requests_are_refused(connect: Connect, request_args: dict, message: str) -> None:
    engine, fake = await connect()
    with pytest.raises(InvalidRequestError, match=message):
        await collect(engine, GenerationRequest(**request_args))
    assert fake.requests == []


async def test_readiness_follows_the_triton_model(connect: Connect) -> None:
    engine, fake = await connect()
    assert engine.is_ready
    info = engine.info
    assert info.backend == "triton" and info.context_length == 64 and info.device.endswith("/ensemble")
    fake.ready["ensemble"] = False
    await wait_for(lambda: not engine.is_ready)
    with pytest.raises(EngineClosedError, match=r"does not report model 'ensemble' ready; retry"):
        await collect(engine, GenerationRequest(prompt="Hello", sampling=GREEDY))
    fake.ready["ensemble"] = True
    await wait_for(lambda: engine.is_ready)


async def test_a_server_that_went_away_is_unavailable(tokenizer_dir: Path) -> None:
    fake = FakeTriton(repository_configs())
    server, url = await start_fake(fake)
    engine = TritonEngine(url, tokenizer_path=tokenizer_dir, health_interval_s=3600)
    await engine.start()
    try:
        await server.stop(None)
        with pytest.raises(EngineClosedError, match=f"Triton at {url} cannot serve 'ensemble'.*tritonserver runs"):
            await collect(engine, GenerationRequest(prompt="Hello", sampling=GREEDY))
        await wait_for(lambda: not engine.is_ready)
    finally:
        await engine.shutdown()
    with pytest.raises(EngineClosedError, match=r"shut down"):
        await collect(engine, GenerationRequest(prompt="Hello", sampling=GREEDY))


async def test_start_times_out_naming_the_server_and_model(tokenizer_dir: Path) -> None:
    url = f"127.0.0.1:{free_port()}"
    engine = TritonEngine(url, "tensorrt_llm_bls", tokenizer_path=tokenizer_dir, start_timeout_s=0.3)
    with pytest.raises(EngineClosedError, match=f"Triton at {url} did not report model 'tensorrt_llm_bls' ready"):
        await engine.start()
    assert not engine.is_ready
    with pytest.raises(EngineClosedError, match=r"not connected yet"):
        engine.count_tokens(prompt="Hello")
    await engine.shutdown()


async def test_a_model_without_the_tensorrt_llm_contract_is_refused_at_start(tokenizer_dir: Path) -> None:
    configs = repository_configs()
    fake = FakeTriton(configs)
    server, url = await start_fake(fake)
    try:
        engine = TritonEngine(url, "preprocessing", tokenizer_path=tokenizer_dir)
        with pytest.raises(
            EngineError, match=r"lacks text_input, max_tokens, text_output; point inference.triton_model"
        ):
            await engine.start()
        await engine.shutdown()
        fake.configs = repository_configs(accumulate_tokens=True)
        cumulative = TritonEngine(url, "tensorrt_llm_bls", tokenizer_path=tokenizer_dir)
        with pytest.raises(EngineError, match=r"streams cumulative text .*accumulate_tokens=false"):
            await cumulative.start()
        await cumulative.shutdown()
        fake.configs = configs
        missing = TritonEngine(url, "ensemble", tokenizer_path=tokenizer_dir / "absent")
        with pytest.raises(EngineError, match=r"tokenizer path .*absent does not exist; set inference.model_path"):
            await missing.start()
        await missing.shutdown()
    finally:
        await server.stop(None)


async def test_spec_reads_the_repository_contract(connect: Connect) -> None:
    engine, _ = await connect()
    spec = engine.spec
    assert spec.streams and spec.batched and spec.stop_model == "tensorrt_llm" and spec.guided_decoding is True
    assert spec.tokenizer_dir == "/nowhere/tokenizer" and spec.add_special_tokens
    bls, _ = await connect("tensorrt_llm_bls")
    assert bls.spec.stop_model is None and bls.spec.guided_decoding is True


async def test_tokenizer_comes_from_the_model_repository_when_it_is_local(
    tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeTriton(repository_configs(tokenizer_dir=str(tokenizer_dir)))
    server, url = await start_fake(fake)
    try:
        engine = TritonEngine(url)
        await engine.start()
        assert engine.count_tokens(prompt="Hello world") == 2
        await engine.shutdown()
        fake.configs = repository_configs(tokenizer_dir="/only/on/the/triton/host")
        import inference_core.model_loading

        monkeypatch.setattr(inference_core.model_loading, "default_model_path", lambda: tokenizer_dir)
        fallback = TritonEngine(url)
        await fallback.start()
        assert fallback.count_tokens(prompt="Hello world") == 2
        assert "is not on this machine; using the default model's tokenizer" in caplog.text
        await fallback.shutdown()
    finally:
        await server.stop(None)


async def test_a_stream_without_a_final_response_is_an_error(connect: Connect) -> None:
    engine, _ = await connect(script=lambda r: ["Hello", Close()])
    with pytest.raises(EngineError, match=r"ended the stream of 'ensemble' without a final response; retry"):
        await collect(engine, GenerationRequest(prompt="Hello", sampling=GREEDY))


async def test_an_unloaded_model_is_unavailable_and_not_ready(connect: Connect) -> None:
    message = "Request for unknown model: 'ensemble' is not found"
    engine, _ = await connect(script=lambda r: [Fail(grpc.StatusCode.NOT_FOUND, message)], health_interval_s=3600)
    with pytest.raises(EngineClosedError, match=r"cannot serve 'ensemble' \(Request for unknown model"):
        await collect(engine, GenerationRequest(prompt="Hello", sampling=GREEDY))
    assert not engine.is_ready


async def test_a_request_id_in_flight_is_refused(connect: Connect) -> None:
    engine, fake = await connect(script=lambda r: ["Hello", Hang()])
    request = GenerationRequest(prompt="Hello", sampling=GREEDY)
    first = engine.generate(request)
    assert (await anext(first)).text == "Hello"
    with pytest.raises(InvalidRequestError, match=r"request id .* is already in flight; use a unique id"):
        await collect(engine, request)
    await first.aclose()  # type: ignore[attr-defined]
    assert len(fake.requests) == 1


async def test_an_input_of_a_type_the_client_cannot_send_counts_as_undeclared(connect: Connect) -> None:
    configs = repository_configs()
    for tensor in configs["ensemble"].input:
        if tensor.name == "temperature":
            tensor.data_type = model_config_pb2.DataType.TYPE_FP16
    engine, fake = await connect(configs=configs)
    with pytest.raises(InvalidRequestError, match=r"declares no input 'temperature' \(of a type this client sends\)"):
        await collect(engine, GenerationRequest(prompt="Hello", sampling=SamplingParams(temperature=0.5)))
    assert fake.requests == []
