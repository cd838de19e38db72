"""The inference service over gRPC on the real SmolLM2-135M-Instruct, the same cases for every in-process backend
(torch and openvino): a sane greedy answer, JSON-schema and regex constraints that parse and validate, stop strings,
cancellation that frees the request, a full queue, bad constraints. Slow: loads the model once per backend.

Then the openvino engine alone, whose pipeline runs in a child process: its greedy tokens are those of OpenVINO GenAI's
pipeline driven in this process, its shutdown leaves no process behind, and the child's death fails every request in
flight and takes the engine out of service.

The openvino cases skip, saying why, where openvino-genai or the exported model (and an exporter to make it) is absent:
`make install-openvino` provides both."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import signal
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pytest
import pytest_asyncio

from inference_core import Constraint, Engine, EngineClosedError, GenerationRequest, SamplingParams, TorchEngine
from meshpilot.inference.v1 import inference_pb2, inference_pb2_grpc
from services.common import load_config
from services.inference import create_server, servicer_of

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]
pb = inference_pb2
REPO = Path(__file__).resolve().parents[2]
OPENVINO_CACHE = REPO / ".meshpilot" / "openvino"
"""Shared with `make install-openvino` and the benchmark, so the model is exported once per checkout."""
GREEDY = pb.SamplingParams(temperature=0.0)


def openvino_missing() -> str | None:
    if importlib.util.find_spec("openvino_genai") is None:
        return "openvino-genai is not installed (make install-openvino)"
    from inference_core.openvino_export import find_exporter, ir_directory, is_exported

    if not is_exported(ir_directory(None, OPENVINO_CACHE, "fp32")) and find_exporter() is None:
        return "the model has no OpenVINO IR and optimum-cli is absent (make install-openvino)"
    return None


def make_engine(backend: str) -> Engine:
    if backend == "torch":
        return TorchEngine(max_queue=1)
    from inference_core.openvino_engine import OpenVINOConfig, OpenVINOEngine

    return OpenVINOEngine(
        config=OpenVINOConfig(cache_dir=OPENVINO_CACHE, max_num_seqs=1, max_queue=1, fair_share=False)
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["torch", "openvino"])
async def service(request):
    backend = request.param
    if backend == "openvino" and (reason := openvino_missing()):
        pytest.skip(reason)
    engine = make_engine(backend)
    config = load_config()
    config.inference.server.port = 0
    server = create_server(config, engine=engine)
    await server.start()
    await servicer_of(server).start_engines()
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield backend, engine, inference_pb2_grpc.InferenceServiceStub(channel)
    await server.stop(0)
    child = pipeline_pid(engine) if backend == "openvino" else None
    await engine.shutdown()
    if child is not None:
        assert not alive(child), "the pipeline's process outlived the engine's shutdown"


def chat(content: str) -> pb.ChatInput:
    return pb.ChatInput(messages=[pb.ChatMessage(role="user", content=content)])


async def collect(stub, request: pb.GenerateRequest) -> tuple[str, pb.GenerateResponse]:
    responses = [r async for r in stub.Generate(request)]
    return "".join(r.text for r in responses), responses[-1]


async def test_models_name_the_backend(service) -> None:
    backend, engine, stub = service
    models = await stub.ListModels(pb.ListModelsRequest())
    assert [(m.id, m.backend) for m in models.models] == [("smollm2-135m-instruct", backend)]
    assert engine.info.backend == backend


async def test_greedy_answer_is_sane(service) -> None:
    _, _, stub = service
    text, last = await collect(
        stub, pb.GenerateRequest(chat=chat("What is the capital of France?"), max_tokens=30, sampling=GREEDY)
    )
    assert "Paris" in text
    assert last.finish_reason == pb.FINISH_REASON_STOP
    assert last.usage.completion_tokens > 3 and last.usage.prompt_tokens > 10


SCHEMA = {
    "type": "object",
    "properties": {
        "tool": {"enum": ["search", "calculator", "final_answer"]},
        "arguments": {
            "type": "object",
            "properties": {"query": {"type": "string", "maxLength": 40}},
            "required": ["query"],
            "additionalProperties": False,
        },
    },
    "required": ["tool", "arguments"],
    "additionalProperties": False,
}


async def test_json_schema_output_parses_and_validates(service) -> None:
    _, _, stub = service
    text, last = await collect(
        stub,
        pb.GenerateRequest(
            chat=chat("Which tool finds the capital of Spain? Answer in JSON."),
            max_tokens=80,
            sampling=GREEDY,
            constraint=pb.OutputConstraint(json_schema=json.dumps(SCHEMA)),
        ),
    )
    assert last.finish_reason == pb.FINISH_REASON_STOP, text
    jsonschema.validate(json.loads(text), SCHEMA)


async def test_regex_output_matches(service) -> None:
    _, _, stub = service
    regex = r"(yes|no), because [a-z ]{5,40}\."
    text, last = await collect(
        stub,
        pb.GenerateRequest(
            chat=chat("Is the sky blue?"), max_tokens=40, sampling=GREEDY, constraint=pb.OutputConstraint(regex=regex)
        ),
    )
    assert re.fullmatch(regex, text), text
    assert last.finish_reason == pb.FINISH_REASON_STOP


async def test_stop_string_ends_before_it(service) -> None:
    _, _, stub = service
    request = pb.GenerateRequest(chat=chat("List three fruits, one per line."), max_tokens=40, sampling=GREEDY)
    full, _ = await collect(stub, request)
    lines = full.split("\n")
    assert len(lines) >= 2, full
    stop = lines[1][:4]
    request.stop.append(stop)
    text, last = await collect(stub, request)
    assert text == full[: full.index(stop)]
    assert last.finish_reason == pb.FINISH_REASON_STOP_STRING


async def test_cancel_frees_the_request_and_a_full_queue_refuses(service) -> None:
    _, engine, stub = service
    # 4000 digits and no end-of-sequence allowed: the request runs until it is cancelled.
    endless = pb.GenerateRequest(prompt="Digits:", max_tokens=4000, constraint=pb.OutputConstraint(regex="[0-9]{4000}"))
    running = stub.Generate(endless)
    assert (await running.read()).token_ids
    queued = stub.Generate(pb.GenerateRequest(prompt="Hello", max_tokens=3))
    queued_first = asyncio.ensure_future(queued.read())
    while engine.stats().waiting < 1:  # type: ignore[attr-defined]
        await asyncio.sleep(0.01)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Generate(pb.GenerateRequest(prompt="Hello", max_tokens=3)).read()
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue is full" in info.value.details()
    running.cancel()
    await asyncio.wait_for(queued_first, 120)
    last = queued_first.result()
    while (response := await queued.read()) != grpc.aio.EOF:
        last = response
    assert last.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP)
    deadline = asyncio.get_running_loop().time() + 5  # the stream ends on another thread than the bookkeeping
    while engine.stats().running and asyncio.get_running_loop().time() < deadline:  # type: ignore[attr-defined]
        await asyncio.sleep(0.01)
    assert engine.stats().running == 0  # type: ignore[attr-defined]


async def test_invalid_constraints_are_invalid_argument(service) -> None:
    _, _, stub = service
    for constraint, message in [
        (pb.OutputConstraint(json_schema='{"type": 5}'), "invalid JSON schema"),
        (pb.OutputConstraint(regex="([a-"), "invalid regex"),
        (pb.OutputConstraint(ebnf_grammar="root ::= "), "invalid EBNF grammar"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Generate(pb.GenerateRequest(prompt="x", constraint=constraint)).read()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in info.value.details()


async def test_ebnf_output_follows_the_grammar(service) -> None:
    _, _, stub = service
    grammar = 'root ::= "The answer is " ("yes" | "no") "."'
    text, last = await collect(
        stub,
        pb.GenerateRequest(
            chat=chat("Is water wet?"),
            max_tokens=20,
            sampling=GREEDY,
            constraint=pb.OutputConstraint(ebnf_grammar=grammar),
        ),
    )
    assert text in ("The answer is yes.", "The answer is no.")
    assert last.finish_reason == pb.FINISH_REASON_STOP


async def test_a_seed_repeats_its_sample(service) -> None:
    _, _, stub = service

    def request(seed: int) -> pb.GenerateRequest:
        return pb.GenerateRequest(
            chat=chat("Tell me a story."), max_tokens=16, sampling=pb.SamplingParams(temperature=1.0, seed=seed)
        )

    first, _ = await collect(stub, request(11))
    assert (await collect(stub, request(11)))[0] == first
    assert (await collect(stub, request(12)))[0] != first


def pipeline_pid(engine: Any) -> int:
    return engine._model.stepper.pid


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest_asyncio.fixture(loop_scope="module")
async def openvino_engine():
    if reason := openvino_missing():
        pytest.skip(reason)
    from inference_core.openvino_engine import OpenVINOConfig, OpenVINOEngine

    engine = OpenVINOEngine(config=OpenVINOConfig(cache_dir=OPENVINO_CACHE, max_num_seqs=4))
    await engine.start()
    yield engine
    await engine.shutdown()


PARITY_PROMPTS = ["What is the capital of France?", "List three fruits.", "Write a haiku about the sea."]


def in_process_greedy(prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """OpenVINO GenAI's pipeline driven in this process, as before it had a process of its own: add_request each
    prompt, step() until done, read() the tokens."""
    import numpy as np
    import openvino as ov
    import openvino_genai as ov_genai

    from inference_core.openvino_export import ensure_ir

    scheduler = ov_genai.SchedulerConfig()
    scheduler.cache_size = 1
    scheduler.max_num_seqs = 4
    scheduler.max_num_batched_tokens = 256
    scheduler.dynamic_split_fuse = True
    pipeline = ov_genai.ContinuousBatchingPipeline(str(ensure_ir(None, OPENVINO_CACHE, "fp32")), scheduler, "CPU", {})
    config = pipeline.get_config()
    config.max_new_tokens = max_new_tokens
    config.do_sample = False
    handles = [
        pipeline.add_request(i, ov.Tensor(np.asarray([ids], dtype=np.int64)), config) for i, ids in enumerate(prompts)
    ]
    outputs: list[list[int]] = [[] for _ in prompts]
    while pipeline.has_non_finished_requests():
        pipeline.step()
        for i, handle in enumerate(handles):
            while handle.can_read():
                for output in handle.read().values():
                    outputs[i] += list(output.generated_ids)
    return outputs


async def test_greedy_tokens_are_the_in_process_pipelines(openvino_engine) -> None:
    from inference_core.prompts import encode_prompt

    engine = openvino_engine
    requests = [
        GenerationRequest(
            messages=[{"role": "user", "content": prompt}], max_tokens=40, sampling=SamplingParams(temperature=0.0)
        )
        for prompt in PARITY_PROMPTS
    ]

    async def stream(request: GenerationRequest) -> list[Any]:
        return [chunk async for chunk in engine.generate(request)]

    streams = await asyncio.gather(*(stream(request) for request in requests))  # batched in the pipeline
    tokenizer = engine._model.tokenizer
    prompts = [encode_prompt(tokenizer, engine.info.id, None, request.messages) for request in requests]
    expected = await asyncio.to_thread(in_process_greedy, prompts, 40)
    for chunks, ids in zip(streams, expected, strict=True):
        assert len(chunks) > 3, "the text was not streamed"
        assert [t for chunk in chunks for t in chunk.token_ids] == ids
        assert "".join(chunk.text for chunk in chunks) == tokenizer.decode(ids, skip_special_tokens=True)


async def test_prompt_lookup_keeps_the_greedy_tokens_and_the_constraint() -> None:
    """A pipeline built with prompt lookup (drafts checked by the model) writes what the plain one writes, including
    under a JSON schema, and its warm-up request passes the pipeline's demand for a draft length."""
    if reason := openvino_missing():
        pytest.skip(reason)
    from inference_core.openvino_engine import OpenVINOConfig, OpenVINOEngine
    from inference_core.prompts import encode_prompt

    engine = OpenVINOEngine(config=OpenVINOConfig(cache_dir=OPENVINO_CACHE, max_num_seqs=4, prompt_lookup_tokens=3))
    await engine.start()
    try:
        requests = [
            GenerationRequest(
                messages=[{"role": "user", "content": prompt}], max_tokens=40, sampling=SamplingParams(temperature=0.0)
            )
            for prompt in PARITY_PROMPTS
        ]
        streams = await asyncio.gather(*(engine_chunks(engine, request) for request in requests))
        tokenizer = engine._model.tokenizer
        prompts = [encode_prompt(tokenizer, engine.info.id, None, request.messages) for request in requests]
        expected = await asyncio.to_thread(in_process_greedy, prompts, 40)
        for chunks, ids in zip(streams, expected, strict=True):
            assert [t for chunk in chunks for t in chunk.token_ids] == ids
        schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
        constrained = GenerationRequest(
            messages=[{"role": "user", "content": "Name the capital of France as JSON with a key city."}],
            max_tokens=40,
            sampling=SamplingParams(temperature=0.0),
            constraint=Constraint(kind="json_schema", value=json.dumps(schema)),
        )
        chunks = await engine_chunks(engine, constrained)
        jsonschema.validate(json.loads("".join(chunk.text for chunk in chunks)), schema)
    finally:
        await engine.shutdown()


async def engine_chunks(engine: Engine, request: GenerationRequest) -> list[Any]:
    return [chunk async for chunk in engine.generate(request)]


async def test_a_dead_pipeline_process_fails_what_is_in_flight_and_the_engine_is_not_ready(openvino_engine) -> None:
    engine = openvino_engine
    # 4000 digits and no end-of-sequence allowed: the request runs until the process dies.
    endless = GenerationRequest(prompt="Digits:", max_tokens=4000, constraint=Constraint("regex", "[0-9]{4000}"))
    running = engine.generate(endless)
    await running.__anext__()
    child = pipeline_pid(engine)
    os.kill(child, signal.SIGKILL)
    with pytest.raises(EngineClosedError, match="the OpenVINO pipeline's process was killed by SIGKILL"):
        async for _ in running:
            pass
    assert not engine.is_ready
    with pytest.raises(EngineClosedError, match="killed by SIGKILL"):
        await engine.generate(GenerationRequest(prompt="Hello", max_tokens=3)).__anext__()
    await engine.shutdown()
    assert not alive(child)
