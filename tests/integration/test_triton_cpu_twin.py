"""A real tritonserver on the CPU-twin repository: streamed and whole text equal the torch engine's, cancellation stops
generation, refusals arrive as stream errors and the server stays ready."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as grpcclient
from tritonclient.grpc import InferInput, InferResult, service_pb2, service_pb2_grpc
from tritonclient.grpc._utils import _get_inference_request
from tritonclient.utils import InferenceServerException

from inference_core import GenerationRequest, SamplingParams, TorchEngine
from services.triton import LocalTritonServer, TritonRepoOptions, cpu_twin_server

pytestmark = [pytest.mark.slow, pytest.mark.integration]
FRONTS = ["ensemble", "tensorrt_llm_bls"]
CANCELLED = 'meshpilot_twin_requests_total{outcome="cancelled"}'
TOKENS = "meshpilot_twin_generated_tokens_total"


def chat(question: str) -> str:
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


PROMPTS = [chat("What is the capital of France?"), chat("Write the French words for coffee and Christmas tree.")]


def _serve(workdir: Path, decoupled: bool) -> Iterator[LocalTritonServer]:
    options = TritonRepoOptions(twin_threads=2, max_batch_size=8, decoupled=decoupled)
    instance = cpu_twin_server(workdir, options)
    instance.start()
    try:
        instance.wait_ready(timeout=600)
        yield instance
    finally:
        instance.stop()


@pytest.fixture(scope="module")
def server(triton_twin: LocalTritonServer) -> LocalTritonServer:
    return triton_twin


@pytest.fixture(scope="module")
def unary_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTritonServer]:
    """The same repository with decoupled=False: ModelInfer, one response per request."""
    yield from _serve(tmp_path_factory.mktemp("triton-unary"), decoupled=False)


@pytest.fixture(scope="module")
def reference() -> dict[tuple[str, int], str]:
    """The torch engine's greedy text for each prompt, in this process."""

    async def run() -> dict[tuple[str, int], str]:
        engine = TorchEngine(threads=2)
        await engine.start()
        try:
            texts = {}
            for prompt in PROMPTS:
                request = GenerationRequest(prompt=prompt, max_tokens=24, sampling=SamplingParams(temperature=0.0))
                texts[(prompt, 24)] = "".join([chunk.text async for chunk in engine.generate(request)])
            return texts
        finally:
            await engine.shutdown()

    return asyncio.run(run())


def _tensor(name: str, value: Any, datatype: str) -> InferInput:
    array = np.array([[value]], dtype=np.object_ if datatype == "BYTES" else None)
    if datatype == "BOOL":
        array = array.astype(np.bool_)
    elif datatype == "INT32":
        array = array.astype(np.int32)
    tensor = InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def front_inputs(prompt: str, max_tokens: int, stream: bool, **flags: Any) -> list[InferInput]:
    inputs = [
        _tensor("text_input", prompt.encode(), "BYTES"),
        _tensor("max_tokens", max_tokens, "INT32"),
        _tensor("stream", stream, "BOOL"),
    ]
    for name, value in flags.items():
        inputs.append(
            _tensor(name, value, "INT32" if isinstance(value, int) and not isinstance(value, bool) else "BOOL")
        )
    return inputs


@dataclass
class Streamed:
    texts: list[str] = field(default_factory=list)
    finals: list[bool] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    num_output_tokens: int | None = None

    @property
    def text(self) -> str:
        return "".join(self.texts)


async def stream(url: str, model: str, inputs: list[InferInput], stop_after: int | None = None) -> Streamed:
    """One request over ModelStreamInfer, read until the response flagged triton_final_response; with ``stop_after``
    the call is cancelled after that many responses.

    tritonclient.grpc.aio's stream_infer cannot ask for the flags-only final response (it drops
    enable_empty_final_response and refuses triton_* parameters), so the request goes through the generated stub.
    """
    request = _get_inference_request(model, inputs, "", "", None, 0, False, False, 0, None, None)
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    done = asyncio.Event()

    async def requests() -> AsyncIterator[service_pb2.ModelInferRequest]:
        yield request
        # Half-closing the stream before the final response lets Triton end it early.
        await done.wait()

    out = Streamed()
    async with grpc.aio.insecure_channel(url) as channel:
        call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(requests())
        async for response in call:
            if response.error_message:
                out.errors.append(response.error_message)
                break
            result = InferResult(response.infer_response)
            final = response.infer_response.parameters["triton_final_response"].bool_param
            text = result.as_numpy("text_output")
            if text is not None:
                out.texts.append(text.reshape(-1)[0].decode("utf-8"))
            count = result.as_numpy("num_output_tokens")
            if count is not None:
                out.num_output_tokens = int(count.reshape(-1)[0])
            out.finals.append(final)
            if final:
                break
            if stop_after is not None and len(out.finals) >= stop_after:
                call.cancel()
                break
        done.set()
    return out


@pytest.mark.parametrize("front", FRONTS)
@pytest.mark.parametrize("prompt", PROMPTS)
async def test_streamed_deltas_equal_the_engine_text(
    server: LocalTritonServer, reference: dict[tuple[str, int], str], front: str, prompt: str
) -> None:
    result = await stream(server.grpc_url, front, front_inputs(prompt, 24, True, return_num_output_tokens=True))
    assert not result.errors
    assert result.text == reference[(prompt, 24)]
    assert "\ufffd" not in "".join(result.texts)
    assert result.finals[-1] and not any(result.finals[:-1])
    assert len(result.texts) > 2, "text arrives in several deltas, not at the end"
    assert result.num_output_tokens is not None and 0 < result.num_output_tokens <= 24


@pytest.mark.parametrize("front", FRONTS)
async def test_whole_text_includes_the_prompt_unless_excluded(
    server: LocalTritonServer, reference: dict[tuple[str, int], str], front: str
) -> None:
    prompt = PROMPTS[0]
    excluded = await stream(server.grpc_url, front, front_inputs(prompt, 24, False, exclude_input_in_output=True))
    assert not excluded.errors
    assert excluded.text == reference[(prompt, 24)]
    whole = await stream(server.grpc_url, front, front_inputs(prompt, 24, False))
    assert whole.text == "user\nWhat is the capital of France?\nassistant\n" + reference[(prompt, 24)]
    assert whole.finals[-1]


@pytest.mark.parametrize("model", ["tensorrt_llm_bls", "tensorrt_llm"])
async def test_cancelling_a_stream_stops_generation(server: LocalTritonServer, model: str) -> None:
    before = server.metrics()
    prompt = chat("Tell me a very long story about a dragon who learns to cook.")
    if model == "tensorrt_llm":
        ids = [int(i) for i in _tokenizer_ids(server, prompt)]
        inputs = [
            _ids_tensor("input_ids", ids),
            _ids_tensor("input_lengths", [len(ids)]),
            _ids_tensor("request_output_len", [400]),
            _tensor("streaming", True, "BOOL"),
        ]
    else:
        inputs = front_inputs(prompt, 400, True)
    result = await stream(server.grpc_url, model, inputs, stop_after=2)
    assert not result.errors and len(result.finals) == 2 and not any(result.finals)
    for _ in range(240):
        after = server.metrics()
        if after[CANCELLED] > before[CANCELLED]:
            break
        await asyncio.sleep(0.25)
    assert after[CANCELLED] == before[CANCELLED] + 1
    assert after[TOKENS] - before[TOKENS] < 400, "the engine stopped before max_tokens"
    assert server.is_ready()
    follow_up = await stream(server.grpc_url, "ensemble", front_inputs(PROMPTS[0], 4, True))
    assert not follow_up.errors and follow_up.text


@pytest.mark.parametrize("front", FRONTS)
async def test_unsupported_input_arrives_as_a_stream_error(server: LocalTritonServer, front: str) -> None:
    result = await stream(server.grpc_url, front, front_inputs(PROMPTS[0], 8, True, beam_width=2))
    assert len(result.errors) == 1
    assert "beam_width > 1 is not supported by the CPU twin" in result.errors[0]
    assert server.is_ready()


@pytest.mark.parametrize("front", FRONTS)
async def test_non_decoupled_repository_answers_unary_calls(
    unary_server: LocalTritonServer, reference: dict[tuple[str, int], str], front: str
) -> None:
    prompt = PROMPTS[1]
    async with grpcclient.InferenceServerClient(unary_server.grpc_url) as client:
        result = await client.infer(front, front_inputs(prompt, 24, False, exclude_input_in_output=True))
        assert result.as_numpy("text_output").reshape(-1)[0].decode("utf-8") == reference[(prompt, 24)]
        with pytest.raises(InferenceServerException) as refused:
            await client.infer(front, front_inputs(prompt, 24, False, min_tokens=5))
    assert "min_tokens above 1 is not supported" in refused.value.message()
    # Triton 2.51 keeps a step's error code through the ensemble; an error a BLS call returns arrives as INTERNAL.
    assert refused.value.status() == ("StatusCode.INVALID_ARGUMENT" if front == "ensemble" else "StatusCode.INTERNAL")


def _ids_tensor(name: str, values: list[int]) -> InferInput:
    array = np.array([values], dtype=np.int32)
    tensor = InferInput(name, list(array.shape), "INT32")
    tensor.set_data_from_numpy(array)
    return tensor


def _tokenizer_ids(server: LocalTritonServer, prompt: str) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(Path(server.repository) / "preprocessing" / "1" / "tokenizer")
    return list(tokenizer.encode(prompt))
