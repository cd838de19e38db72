"""The inference service as a real process on the real model: health, a streamed Generate, a short sustained load
with its memory sampled (the small configuration of `make soak-memory`), SIGTERM drain."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.memory_soak import soak
from meshpilot.inference.v1 import inference_pb2, inference_pb2_grpc
from tests.conftest import TEST_ENV, free_port

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
COMMAND = "import asyncio, services.inference as s; from services.common import load_config; asyncio.run(s.main(load_config()))"


async def wait_serving(address: str, process: subprocess.Popen, timeout: float = 180.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while loop.time() < deadline:
            assert process.poll() is None, f"server exited early with {process.returncode}"
            try:
                response = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.5)
    raise AssertionError(f"{address} did not become SERVING within {timeout}s")


async def test_inference_process_serves_and_drains_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        **TEST_ENV,
        "MESHPILOT_INFERENCE__SERVER__PORT": str(port),
        "MESHPILOT_DATA_DIR": str(tmp_path),
    }
    env.pop("MESHPILOT_CONFIG", None)
    log_path = tmp_path / "inference.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-c", COMMAND], cwd=REPO, env=env, stdout=log, stderr=log)
    try:
        address = f"127.0.0.1:{port}"
        await wait_serving(address, process)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            request = inference_pb2.GenerateRequest(
                chat=inference_pb2.ChatInput(
                    messages=[inference_pb2.ChatMessage(role="user", content="What is the capital of France?")]
                ),
                max_tokens=24,
                sampling=inference_pb2.SamplingParams(temperature=0),
            )
            responses = [r async for r in stub.Generate(request, timeout=120)]
        text = "".join(r.text for r in responses)
        assert "Paris" in text
        assert responses[-1].finish_reason in (inference_pb2.FINISH_REASON_STOP, inference_pb2.FINISH_REASON_LENGTH)
        assert responses[-1].usage.completion_tokens == sum(len(r.token_ids) for r in responses)
        # `make soak-memory` runs this for 10 minutes; here a few seconds show that it drives the real service and
        # reads the real process's memory (flatness needs the long run: caches fill during the first minute).
        result = await soak(address, process.pid, seconds=8, clients=3, warmup_s=2, sample_every=0.5)
        assert result.failed == 0 and result.calls >= 3 and result.output_tokens > 0
        assert len(result.samples) >= 8 and all(rss > 200 for _, rss in result.samples), result.samples
        assert result.verdict()["peak_rss_mb"] == max(rss for _, rss in result.samples)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 60) == 0, log_path.read_text(errors="replace")[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
