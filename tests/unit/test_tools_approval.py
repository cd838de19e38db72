"""Approval enforcement: tools that require approval run only with a token for exactly this call, on replays too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

from meshpilot.tools.v1 import tools_pb2
from services.common import ConfigError, PermissionDeniedError
from services.common.approval import ApprovalSigner, load_or_create_key
from services.tools import Tool, ToolCall, create_server
from services.tools.registry import ToolRegistry
from tests.unit.tools_fakes import (
    ECHO_SCHEMA,
    SIGNING_KEY,
    CountingHandler,
    execute_request,
    make_executor,
    make_registry,
    mesh_config,
    serving,
)

ARGUMENTS = {"text": "hi", "n": 3}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def guarded_registry(handler: CountingHandler, plain: CountingHandler | None = None) -> ToolRegistry:
    """``guarded`` requires approval by its definition; ``plain`` does not (unless the config marks it)."""
    return make_registry(
        Tool("guarded", "Needs approval.", ECHO_SCHEMA, handler, requires_approval=True),
        ("plain", plain or CountingHandler()),
    )


def call(token: str = "", *, key: str = "", arguments: dict[str, Any] | None = None, name: str = "guarded") -> ToolCall:
    return ToolCall(
        name,
        arguments or ARGUMENTS,
        call_id="call-1",
        run_id="run-1",
        idempotency_key=key,
        approval_token=token,
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def signer(clock: FakeClock) -> ApprovalSigner:
    return ApprovalSigner(SIGNING_KEY, ttl_seconds=60, clock=clock)


async def test_valid_token_runs_the_tool(tmp_path: Path, signer: ApprovalSigner) -> None:
    handler = CountingHandler()
    executor = make_executor(tmp_path / "tools.db", guarded_registry(handler), signer=signer)
    execution = await executor.execute(call(signer.mint("run-1", "call-1", "guarded", ARGUMENTS)))
    assert execution.outcome.result == {"text": "hi", "run": 1}
    assert handler.calls == 1
    await executor.close()


async def test_no_token_is_permission_denied(tmp_path: Path, signer: ApprovalSigner) -> None:
    handler = CountingHandler()
    executor = make_executor(tmp_path / "tools.db", guarded_registry(handler), signer=signer)
    with pytest.raises(PermissionDeniedError, match="tool 'guarded' requires approval"):
        await executor.execute(call())
    assert handler.calls == 0
    await executor.close()


async def test_expired_token_is_permission_denied(tmp_path: Path, signer: ApprovalSigner, clock: FakeClock) -> None:
    handler = CountingHandler()
    executor = make_executor(tmp_path / "tools.db", guarded_registry(handler), signer=signer)
    token = signer.mint("run-1", "call-1", "guarded", ARGUMENTS)
    clock.now += 61
    with pytest.raises(PermissionDeniedError, match="has expired"):
        await executor.execute(call(token))
    assert handler.calls == 0
    await executor.close()


@pytest.mark.parametrize(
    ("run_id", "call_id", "arguments", "mismatch"),
    [
        ("run-2", "call-1", ARGUMENTS, "run_id"),
        ("run-1", "call-2", ARGUMENTS, "call_id"),
        ("run-1", "call-1", {"text": "hi", "n": 4}, "arguments"),
    ],
)
async def test_token_for_another_call_is_permission_denied(
    tmp_path: Path, signer: ApprovalSigner, run_id: str, call_id: str, arguments: dict[str, Any], mismatch: str
) -> None:
    handler = CountingHandler()
    executor = make_executor(tmp_path / "tools.db", guarded_registry(handler), signer=signer)
    token = signer.mint(run_id, call_id, "guarded", arguments)
    with pytest.raises(PermissionDeniedError, match=f"issued for another {mismatch};"):
        await executor.execute(call(token))
    assert handler.calls == 0
    await executor.close()


async def test_token_for_another_tool_is_permission_denied(tmp_path: Path, signer: ApprovalSigner) -> None:
    handler = CountingHandler()
    executor = make_executor(
        tmp_path / "tools.db", guarded_registry(handler), signer=signer, approval_required=["plain"]
    )
    token = signer.mint("run-1", "call-1", "plain", ARGUMENTS)
    with pytest.raises(PermissionDeniedError, match="issued for another tool;"):
        await executor.execute(call(token))
    assert handler.calls == 0
    await executor.close()


async def test_token_is_checked_before_a_replay(tmp_path: Path, signer: ApprovalSigner, clock: FakeClock) -> None:
    handler = CountingHandler()
    executor = make_executor(tmp_path / "tools.db", guarded_registry(handler), signer=signer)
    token = signer.mint("run-1", "call-1", "guarded", ARGUMENTS)
    assert not (await executor.execute(call(token, key="key-1"))).replayed
    with pytest.raises(PermissionDeniedError, match="requires approval"):
        await executor.execute(call(key="key-1"))
    assert (await executor.execute(call(token, key="key-1"))).replayed
    clock.now += 61
    with pytest.raises(PermissionDeniedError, match="has expired"):
        await executor.execute(call(token, key="key-1"))
    assert handler.calls == 1
    await executor.close()


async def test_config_marks_tools_as_requiring_approval(tmp_path: Path, signer: ApprovalSigner) -> None:
    plain = CountingHandler()
    executor = make_executor(
        tmp_path / "tools.db", guarded_registry(CountingHandler(), plain), signer=signer, approval_required=["plain"]
    )
    assert [(t.name, t.requires_approval) for t in executor.tools()] == [("guarded", True), ("plain", True)]
    with pytest.raises(PermissionDeniedError, match="tool 'plain' requires approval"):
        await executor.execute(call(name="plain"))
    token = signer.mint("run-1", "call-1", "plain", ARGUMENTS)
    assert (await executor.execute(call(token, name="plain"))).outcome.ok
    assert plain.calls == 1
    await executor.close()


async def test_tools_without_approval_ignore_tokens(tmp_path: Path, signer: ApprovalSigner) -> None:
    plain = CountingHandler()
    executor = make_executor(tmp_path / "tools.db", guarded_registry(CountingHandler(), plain), signer=signer)
    assert [t.requires_approval for t in executor.tools()] == [True, False]
    assert (await executor.execute(call(name="plain"))).outcome.ok
    assert (await executor.execute(call("garbage", name="plain"))).outcome.ok
    assert plain.calls == 2
    await executor.close()


def test_unknown_tool_in_approval_required_fails_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tools.approval_required names 'nope', 'plane', which no registered tool"):
        make_executor(tmp_path / "tools.db", guarded_registry(CountingHandler()), approval_required=["nope", "plane"])
    config = mesh_config(tmp_path, approval_required=["apend_note"])
    with pytest.raises(
        ConfigError, match=r"names 'apend_note'.*registered tools: calculator, current_time, .*append_note"
    ):
        create_server(config)


async def test_permission_denied_and_listing_over_grpc(tmp_path: Path) -> None:
    guarded, plain = CountingHandler(), CountingHandler()
    config = mesh_config(tmp_path, approval_required=["plain"])
    async with serving(config, guarded_registry(guarded, plain)) as stub:
        listed = await stub.ListTools(tools_pb2.ListToolsRequest())
        assert [(t.name, t.requires_approval) for t in listed.tools] == [("guarded", True), ("plain", True)]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ExecuteTool(execute_request("plain", ARGUMENTS, run_id="run-1"))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert caught.value.details().startswith("tool 'plain' requires approval")
        # The planner signs with the key file the service created at start; Struct turns n=3 into 3.0 on the way.
        assert config.approvals.key_file is not None
        signer = ApprovalSigner(load_or_create_key(config.approvals.key_file))
        token = signer.mint("run-1", "call-1", "guarded", ARGUMENTS)
        response = await stub.ExecuteTool(execute_request("guarded", ARGUMENTS, run_id="run-1", approval_token=token))
        assert response.WhichOneof("outcome") == "result"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ExecuteTool(execute_request("guarded", ARGUMENTS, run_id="run-2", approval_token=token))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (guarded.calls, plain.calls) == (1, 0)
    assert config.approvals.key_file.stat().st_mode & 0o777 == 0o600
