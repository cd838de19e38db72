"""Per-tenant quotas: the arithmetic on a fake clock, then over gRPC with two tenants' keys (RESOURCE_EXHAUSTED with
google.rpc.RetryInfo, and one tenant's limits never touching another's), and GetUsage."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from meshpilot.planner.v1 import planner_pb2, planner_pb2_grpc
from services.common import load_config
from services.common.approval import ApprovalSigner
from services.common.auth import ApiKeyStore
from services.common.clients import create_channel
from services.common.config import QuotaConfig, QuotaLimits
from services.planner.quotas import QuotaExceededError, TenantQuotas
from services.planner.types import ToolSpec, Usage
from tests.unit.planner_fakes import FakeTools, Planner, ScriptedLLM, answer, call


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def quotas(clock: Clock, **limits: int) -> TenantQuotas:
    config = QuotaConfig(tenants={"acme": QuotaLimits(**limits)})
    return TenantQuotas(config, clock=clock)


def test_requests_per_minute_is_a_bucket_that_refills_and_names_the_wait() -> None:
    clock = Clock()
    limited = quotas(clock, requests_per_minute=3)
    for _ in range(3):
        limited.admit_request("acme")
    with pytest.raises(QuotaExceededError, match="over its quota of 3 requests per minute") as refused:
        limited.admit_request("acme")
    assert refused.value.retry_after_seconds == pytest.approx(20.0)
    limited.admit_request("globex")  # the default tenant limits: unlimited
    clock.now += 20
    limited.admit_request("acme")
    with pytest.raises(QuotaExceededError):
        limited.admit_request("acme")


def test_concurrent_runs_and_tokens_per_minute_gate_new_runs() -> None:
    clock = Clock()
    limited = quotas(clock, max_concurrent_runs=2, tokens_per_minute=1000)
    limited.admit_run("acme", active_runs=1)
    with pytest.raises(QuotaExceededError, match="has 2 runs going"):
        limited.admit_run("acme", active_runs=2)
    limited.charge("acme", Usage(700, 100, 800))
    clock.now += 30
    limited.charge("acme", Usage(150, 50, 200))
    assert limited.tokens_last_minute("acme") == 1000
    with pytest.raises(QuotaExceededError, match="used 1000 model tokens in the last minute") as refused:
        limited.admit_run("acme", active_runs=0)
    assert refused.value.retry_after_seconds == pytest.approx(30.0)  # when the first charge leaves the window
    clock.now += 30
    assert limited.tokens_last_minute("acme") == 200
    limited.admit_run("acme", active_runs=0)


def test_charged_tokens_are_exported_per_tenant_and_kind() -> None:
    limited = quotas(Clock())
    limited.charge("acme", Usage(70, 30, 100))
    limited.charge("acme", Usage(5, 5, 10))
    assert limited.tokens_total.labels("acme", "prompt")._value.get() == 75
    assert limited.tokens_total.labels("acme", "completion")._value.get() == 35


NOTES = ToolSpec(
    "append_note",
    "Appends a note.",
    {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
    requires_approval=True,
)


@asynccontextmanager
async def planner_with(tmp_path, llm: ScriptedLLM, **acme: int) -> AsyncIterator[tuple[Planner, list]]:
    config = load_config(
        data_dir=str(tmp_path),
        planner={
            "server": {"port": 0, "metrics": False},
            "quotas": {"tenants": {"acme": acme}},
            "default_agent_tools": ["append_note"],
        },
        auth={"enabled": True},
    )
    async with Planner(config, llm, FakeTools([NOTES]), ApprovalSigner(b"k" * 32)) as planner:
        keys = ApiKeyStore(config.auth.keys_path)
        channels = [create_channel(planner.server.address, api_key=keys.create(t)[1]) for t in ("acme", "globex")]
        try:
            yield planner, [planner_pb2_grpc.PlannerServiceStub(channel) for channel in channels]
        finally:
            for channel in channels:
                await channel.close()
            keys.close()


def retry_delay(error: grpc.aio.AioRpcError) -> float:
    details = dict(error.trailing_metadata() or ())["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(details)
    info = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info)
    return info.retry_delay.ToNanoseconds() / 1e9


async def test_a_tenant_over_its_call_rate_gets_resource_exhausted_with_retry_info(tmp_path) -> None:
    async with planner_with(tmp_path, ScriptedLLM([]), requests_per_minute=2) as (_, (acme, globex)):
        for _ in range(2):
            await acme.ListRuns(planner_pb2.ListRunsRequest())
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await acme.ListRuns(planner_pb2.ListRunsRequest())
        for _ in range(5):  # another tenant is not held back
            await globex.ListRuns(planner_pb2.ListRunsRequest())
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "over its quota of 2 requests per minute" in (refused.value.details() or "")
    assert 0 < retry_delay(refused.value) <= 30


async def test_a_tenant_at_its_concurrent_runs_cannot_start_another_and_usage_reports_it(tmp_path) -> None:
    llm = ScriptedLLM([call("append_note", text="wait for me"), answer("Paris.")])
    async with planner_with(tmp_path, llm, max_concurrent_runs=1) as (_, (acme, globex)):
        stream = acme.Run(planner_pb2.RunRequest(task="Note something."))
        async for event in stream:
            if event.HasField("approval_requested"):
                break
        stream.cancel()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in acme.Run(planner_pb2.RunRequest(task="What is the capital of France?")):
                pass
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "has 1 runs going" in (refused.value.details() or "")
        assert retry_delay(refused.value) == 1.0
        finished = [event async for event in globex.Run(planner_pb2.RunRequest(task="What is the capital of France?"))]
        assert finished[-1].final_answer.answer == "Paris."
        usage = await acme.GetUsage(planner_pb2.GetUsageRequest())
        other = await globex.GetUsage(planner_pb2.GetUsageRequest(window_seconds=60))
    assert (usage.tenant, usage.runs, usage.active_runs, usage.max_concurrent_runs) == ("acme", 1, 1, 1)
    assert usage.total_tokens > 0 and usage.tokens_last_minute == usage.total_tokens
    assert (other.tenant, other.runs, other.active_runs, other.window_seconds) == ("globex", 1, 0, 60)


@pytest.mark.parametrize("window", [-1, 30 * 86_400 + 1])
async def test_a_usage_window_out_of_range_is_invalid(tmp_path, window: int) -> None:
    async with planner_with(tmp_path, ScriptedLLM([])) as (_, (acme, _globex)):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await acme.GetUsage(planner_pb2.GetUsageRequest(window_seconds=window))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "window_seconds" in (refused.value.details() or "")
