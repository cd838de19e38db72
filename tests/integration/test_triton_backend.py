"""The inference service with `backend: triton` on a real tritonserver serving the CPU twin: the torch engine's greedy
text, cancellation that frees the twin's slot, constrained output, and a whole agent run through the mesh."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import jsonschema
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inference_core import GenerationRequest, SamplingParams, TorchEngine
from inference_core.triton_engine import TritonEngine
from meshpilot.inference.v1 import inference_pb2, inference_pb2_grpc
from services.triton import LocalTritonServer
from tests.conftest import clean_env, free_port

pytestmark = [pytest.mark.slow, pytest.mark.integration]
pb = inference_pb2
ROOT = Path(__file__).resolve().parents[2]
CANCELLED = 'meshpilot_twin_requests_total{outcome="cancelled"}'
TOKENS = "meshpilot_twin_generated_tokens_total"
QUESTIONS = ["What is the capital of France?", "Write the French words for coffee and Christmas tree."]
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "is_capital": {"type": "boolean"}},
    "required": ["city", "is_capital"],
    "additionalProperties": False,
}


def chat(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


class Service:
    """One `python -m meshpilot serve NAME` process, its log in ``log_path``."""

    def __init__(self, name: str, env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.port = int(env[f"MESHPILOT_{name.upper()}__SERVER__PORT"])
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "meshpilot", "serve", name], cwd=ROOT, env=env, stdout=log, stderr=log
            )

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def serving(self) -> bool:
        with grpc.insecure_channel(self.target) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            except grpc.RpcError:
                return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def wait_serving(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while not self.serving():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"{self.name} did not become SERVING:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def twin(triton_twin: LocalTritonServer) -> LocalTritonServer:
    return triton_twin


@pytest.fixture(scope="module")
def mesh_env(tmp_path_factory: pytest.TempPathFactory, twin: LocalTritonServer) -> dict[str, str]:
    env = clean_env()
    env["MESHPILOT_DATA_DIR"] = str(tmp_path_factory.mktemp("data"))
    for name in ("planner", "tools", "knowledge", "inference"):
        env[f"MESHPILOT_{name.upper()}__SERVER__PORT"] = str(free_port())
        env[f"MESHPILOT_{name.upper()}__SERVER__METRICS_PORT"] = str(free_port())
    env["MESHPILOT_TOOLS__MCP_ENDPOINT__PORT"] = str(free_port())
    env["MESHPILOT_INFERENCE__BACKEND"] = "triton"
    env["MESHPILOT_INFERENCE__TRITON_URL"] = twin.grpc_url
    env["MESHPILOT_INFERENCE__TRITON_MODEL"] = "ensemble"
    return env


@pytest.fixture(scope="module")
def inference(mesh_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    service = Service("inference", mesh_env, tmp_path_factory.mktemp("logs") / "inference.log")
    try:
        service.wait_serving()
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="module")
def reference() -> dict[str, object]:
    """What the in-process torch engine answers: greedy texts, a stop-string cut and token counts."""

    async def run() -> dict[str, object]:
        engine = TorchEngine(threads=2)
        await engine.start()
        try:
            out: dict[str, object] = {}
            for question in QUESTIONS:
                request = GenerationRequest(messages=chat(question), max_tokens=32, sampling=SamplingParams(0.0))
                out[question] = "".join([c.text async for c in engine.generate(request)])
                out[f"count:{question}"] = engine.count_tokens(messages=chat(question))
            stop = GenerationRequest(
                messages=chat(QUESTIONS[0]), max_tokens=32, sampling=SamplingParams(0.0), stop=["Paris"]
            )
            out["stop"] = "".join([c.text async for c in engine.generate(stop)])
            return out
        finally:
            await engine.shutdown()

    return asyncio.run(run())


@pytest.fixture
async def stub(inference: Service) -> AsyncIterator[inference_pb2_grpc.InferenceServiceStub]:
    async with grpc.aio.insecure_channel(inference.target) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


def chat_request(question: str, max_tokens: int = 32, **fields: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        chat=pb.ChatInput(messages=[pb.ChatMessage(role="user", content=question)]),
        max_tokens=max_tokens,
        sampling=pb.SamplingParams(temperature=0.0),
        **fields,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("question", QUESTIONS)
async def test_service_streams_the_torch_engine_greedy_text(stub, reference, question: str) -> None:
    responses = [r async for r in stub.Generate(chat_request(question))]
    assert "".join(r.text for r in responses) == reference[question]
    assert len([r for r in responses if r.text]) > 2, "text arrives in several deltas"
    last = responses[-1]
    assert last.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert last.usage.prompt_tokens == reference[f"count:{question}"]
    assert 0 < last.usage.completion_tokens <= 32
    models = await stub.ListModels(pb.ListModelsRequest())
    assert models.models[0].backend == "triton"


async def test_bls_front_gives_the_same_text(twin: LocalTritonServer, reference) -> None:
    engine = TritonEngine(twin.grpc_url, "tensorrt_llm_bls")
    await engine.start()
    try:
        request = GenerationRequest(messages=chat(QUESTIONS[1]), max_tokens=32, sampling=SamplingParams(0.0))
        chunks = [c async for c in engine.generate(request)]
    finally:
        await engine.shutdown()
    assert "".join(c.text for c in chunks) == reference[QUESTIONS[1]]


async def test_stop_string_is_cut_as_by_the_torch_engine(stub, reference) -> None:
    responses = [r async for r in stub.Generate(chat_request(QUESTIONS[0], stop=["Paris"]))]
    assert "".join(r.text for r in responses) == reference["stop"]
    assert responses[-1].finish_reason == pb.FINISH_REASON_STOP_STRING


async def test_constrained_output_validates(stub) -> None:
    request = chat_request(
        "Give the largest city of Japan as JSON, and whether it is the capital.",
        max_tokens=64,
        constraint=pb.OutputConstraint(json_schema=json.dumps(SCHEMA)),
    )
    text = "".join([r.text async for r in stub.Generate(request)])
    jsonschema.validate(json.loads(text), SCHEMA)
    regex = chat_request("Pick a number.", max_tokens=8, constraint=pb.OutputConstraint(regex="[0-9]{3}"))
    assert len("".join([r.text async for r in stub.Generate(regex)])) == 3


async def test_invalid_constraint_is_invalid_argument(stub) -> None:
    request = chat_request("Hi", constraint=pb.OutputConstraint(regex="[a-z"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        [r async for r in stub.Generate(request)]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "the regex is invalid" in caught.value.details()


async def test_cancel_frees_the_twin_slot(stub, twin: LocalTritonServer) -> None:
    before = twin.metrics()
    call = stub.Generate(chat_request("Tell me a very long story about a dragon who learns to cook.", max_tokens=400))
    for _ in range(2):
        assert (await call.read()).text is not None
    call.cancel()
    for _ in range(240):
        after = twin.metrics()
        if after[CANCELLED] > before[CANCELLED]:
            break
        await asyncio.sleep(0.25)
    assert after[CANCELLED] == before[CANCELLED] + 1, "the ensemble's engine step was stopped"
    assert after[TOKENS] - before[TOKENS] < 100
    assert twin.is_ready()
    follow_up = [r async for r in stub.Generate(chat_request(QUESTIONS[0], max_tokens=8))]
    assert "".join(r.text for r in follow_up)


def test_agent_run_answers_through_triton(
    inference: Service, mesh_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    logs = tmp_path_factory.mktemp("mesh-logs")
    services = [Service(name, mesh_env, logs / f"{name}.log") for name in ("knowledge", "tools", "planner")]
    try:
        for service in services:
            service.wait_serving()
        planner = services[-1].target
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "meshpilot",
                "ask",
                "--json",
                "--planner",
                planner,
                "What is the capital of France?",
            ],
            cwd=ROOT,
            env=mesh_env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        for service in reversed(services):
            service.stop()
    assert done.returncode == 0, done.stdout + done.stderr
    answer = json.loads(done.stdout)
    assert "Paris" in answer["answer"], answer
    assert answer["usage"]["total_tokens"] > 0
