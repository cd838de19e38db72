"""The inference service's /metrics: engine gauges read at scrape time and per-request latency histograms."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import pytest

from inference_core import TorchEngine
from inference_core.testing import write_tiny_llama
from meshpilot.inference.v1 import inference_pb2, inference_pb2_grpc
from services.common import create_channel, load_config
from services.inference import create_server


@pytest.fixture
async def served(tmp_path: Path):
    model_dir = write_tiny_llama(tmp_path / "tiny")
    config = load_config(None, inference={"server": {"port": 0}, "model_path": str(model_dir), "model_id": "tiny"})
    server = create_server(config, engine=TorchEngine(str(model_dir), model_id="tiny"))
    await server.start()
    await server.bindings[0].servicer.start_engines()
    await server.set_serving()
    yield server
    await server.stop(0)
    await server.bindings[0].servicer.shutdown_engines()


def _scrape(port: int) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


async def test_metrics_follow_the_requests_served(served) -> None:
    async with create_channel(served.address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        for prompt in ("Hello there", "Hello there, friend"):
            request = inference_pb2.GenerateRequest(prompt=prompt, max_tokens=6)
            request.sampling.temperature = 0
            responses = [r async for r in stub.Generate(request)]
            assert responses[-1].finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED
    values = await asyncio.to_thread(_scrape, served.metrics_port)
    model = 'model="tiny"'
    assert values[f"meshpilot_inference_time_to_first_token_seconds_count{{{model}}}"] == 2
    assert (
        values[f"meshpilot_inference_output_tokens_total{{{model}}}"]
        == values[f"meshpilot_engine_generated_tokens_total{{{model}}}"]
    )
    assert values[f"meshpilot_inference_inter_token_seconds_count{{{model}}}"] > 0
    assert values[f"meshpilot_engine_running_batch_size{{{model}}}"] == 0
    assert values[f"meshpilot_engine_queue_depth{{{model}}}"] == 0
    assert values[f"meshpilot_engine_kv_cache_tokens_capacity{{{model}}}"] > 0
    assert 0 <= values[f"meshpilot_engine_prefix_cache_hit_rate{{{model}}}"] <= 1
    drafted = values[f"meshpilot_engine_draft_tokens_total{{{model}}}"]
    assert 0 <= values[f"meshpilot_engine_accepted_draft_tokens_total{{{model}}}"] <= drafted
