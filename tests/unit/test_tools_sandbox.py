"""The python tool's sandbox: the hostile suite contained through a live tools server, the probe that keeps the tool
out where bubblewrap cannot run, and the tool's arguments and failures."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meshpilot.tools.v1 import tools_pb2, tools_pb2_grpc
from services.common import InvalidArgumentError, MeshConfig, ServerConfig, ToolsConfig
from services.common.config import SandboxConfig
from services.tools import ToolErrorKind, ToolRegistry, builtin_tools, create_server, default_registry
from services.tools.builtin.python_tool import python_tool
from services.tools.sandbox import (
    BubblewrapSandbox,
    SandboxProbe,
    SandboxResult,
    SandboxUnavailableError,
    ToolSandbox,
)
from tests.unit.sandbox_hostile import CANARY_ENV, HOSTILE_LIMITS, PROGRAMS

FAST = SandboxConfig(timeout_seconds=5, cpu_seconds=2)
_AVAILABLE = BubblewrapSandbox(FAST).probe()
needs_bwrap = pytest.mark.skipif(not _AVAILABLE.ok, reason=f"no sandbox on this host: {_AVAILABLE.reason}")


class FakeSandbox(ToolSandbox):
    """Records the programs it is given and answers with ``result`` (or raises ``error``)."""

    def __init__(self, probe: SandboxProbe, result: SandboxResult | None = None, error: Exception | None = None):
        self.limits = FAST
        self._probe = probe
        self._result = result
        self._error = error
        self.runs: list[tuple[str, str]] = []

    def probe(self) -> SandboxProbe:
        return self._probe

    async def run(self, code: str, stdin: str = "", limits: SandboxConfig | None = None) -> SandboxResult:
        self.runs.append((code, stdin))
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


def sandbox_processes(marker: str = "--disable-userns") -> list[str]:
    """Command lines of live processes that are (part of) a sandbox run."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in cmdline and b"bwrap" in cmdline:
            found.append(cmdline.replace(b"\0", b" ").decode(errors="replace")[:120])
    return found


@needs_bwrap
@pytest.mark.slow
async def test_hostile_suite_is_contained_by_a_live_tools_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    canary = f"canary-{uuid.uuid4()}"
    monkeypatch.setenv(CANARY_ENV, canary)
    registry = ToolRegistry(default_timeout_seconds=30, max_timeout_seconds=30)
    registry.register(python_tool(BubblewrapSandbox(HOSTILE_LIMITS)))
    config = MeshConfig(data_dir=tmp_path, tools=ToolsConfig(server=ServerConfig(port=0)))
    server = create_server(config, registry=registry)
    await server.start()
    await server.set_serving()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = tools_pb2_grpc.ToolsServiceStub(channel)
            stdin = json.dumps({"canary": canary, "service_pid": os.getpid(), "tools_port": server.port})

            async def run(index: int, code: str) -> SandboxResult:
                request = tools_pb2.ExecuteToolRequest(call_id=f"hostile-{index}", name="python")
                json_format.ParseDict({"code": code, "stdin": stdin}, request.arguments)
                response = await stub.ExecuteTool(request)
                assert response.HasField("result"), response.error
                value: dict[str, Any] = json_format.MessageToDict(response.result)
                return SandboxResult(**{**value, "exit_code": int(value["exit_code"])})

            await run(-1, "print(1)")  # warm-up: the first gRPC call and subprocess allocate once
            before = rss_kib()
            escaped = []
            for index, program in enumerate(PROGRAMS):
                result = await run(index, program.code)
                if not program.contained(result):
                    escaped.append((program.name, result))
            grown_kib = rss_kib() - before
            health = health_pb2_grpc.HealthStub(channel)
            status = (await health.Check(health_pb2.HealthCheckRequest(service=""))).status
    finally:
        await server.stop(0)
    assert len(PROGRAMS) >= 30
    assert escaped == []
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert grown_kib < 20 * 1024
    assert sandbox_processes() == []


@needs_bwrap
async def test_runs_the_system_python_with_stdin_in_an_empty_environment() -> None:
    code = "import os, sys\nprint(input()[::-1], sys.executable, sys.flags.isolated, sorted(os.environ), os.getcwd())"
    result = await BubblewrapSandbox(FAST).run(code, stdin="olleh\n")
    assert result == SandboxResult(
        stdout="hello /usr/bin/python3 1 ['HOME', 'LC_CTYPE', 'PATH', 'PWD'] /tmp\n",
        stderr="",
        exit_code=0,
        timed_out=False,
        truncated=False,
    )


@needs_bwrap
async def test_a_failing_program_reports_its_exit_code_and_traceback() -> None:
    result = await BubblewrapSandbox(FAST).run("import sys\nprint('partial')\nsys.exit(3)")
    assert (result.stdout, result.exit_code, result.timed_out) == ("partial\n", 3, False)
    result = await BubblewrapSandbox(FAST).run("1 / 0")
    assert result.exit_code == 1
    assert result.stderr.endswith("ZeroDivisionError: division by zero\n")


@needs_bwrap
async def test_the_limits_given_to_run_replace_the_sandbox_defaults() -> None:
    small = FAST.model_copy(update={"max_output_bytes": 1024})
    result = await BubblewrapSandbox(FAST).run("print('x' * 5000)", limits=small)
    assert result.truncated
    assert result.stdout == "x" * 1024


@needs_bwrap
async def test_cancelling_a_run_kills_its_processes() -> None:
    marker = f"sandbox-cancel-{uuid.uuid4()}"
    run = asyncio.ensure_future(BubblewrapSandbox(FAST).run(f"# {marker}\nimport time\ntime.sleep(30)"))
    for _ in range(100):
        if sandbox_processes(marker):
            break
        await asyncio.sleep(0.05)
    assert sandbox_processes(marker)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    for _ in range(100):
        if not sandbox_processes(marker):
            break
        await asyncio.sleep(0.05)
    assert sandbox_processes(marker) == []


async def test_run_raises_when_bubblewrap_cannot_start(tmp_path: Path) -> None:
    sandbox = BubblewrapSandbox(FAST, bwrap=str(tmp_path / "missing-bwrap"))
    with pytest.raises(SandboxUnavailableError, match=r"the sandbox could not start: .*missing-bwrap"):
        await sandbox.run("print(1)")


def test_probe_says_to_install_a_missing_bubblewrap(tmp_path: Path) -> None:
    probe = BubblewrapSandbox(FAST, bwrap=str(tmp_path / "bwrap")).probe()
    assert probe == SandboxProbe(
        False, f"bubblewrap not found ({tmp_path / 'bwrap'}); install it: apt-get install bubblewrap"
    )


def fake_bwrap(tmp_path: Path, body: str) -> str:
    path = tmp_path / "bwrap"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


def test_probe_reports_a_host_without_user_namespaces(tmp_path: Path) -> None:
    bwrap = fake_bwrap(tmp_path, "echo 'bwrap: No permissions to creating new namespace' >&2; exit 1")
    probe = BubblewrapSandbox(FAST, bwrap=bwrap, user=os.geteuid()).probe()
    assert not probe.ok
    assert probe.reason.startswith(
        "bubblewrap cannot create its namespaces on this host (bwrap: No permissions to creating new namespace); "
        "allow unprivileged user namespaces"
    )


def test_probe_reports_a_bubblewrap_that_cannot_be_executed(tmp_path: Path) -> None:
    bwrap = str(tmp_path / "bwrap")
    Path(bwrap).write_bytes(b"\x7fELF not really")
    Path(bwrap).chmod(0o755)
    probe = BubblewrapSandbox(FAST, bwrap=bwrap, user=os.geteuid()).probe()
    assert not probe.ok
    assert probe.reason.startswith(f"bubblewrap ({bwrap}) could not be started: ")


def test_probe_reports_a_bubblewrap_that_hangs(tmp_path: Path) -> None:
    bwrap = fake_bwrap(tmp_path, "exec sleep 30")
    probe = BubblewrapSandbox(FAST, bwrap=bwrap, user=os.geteuid(), probe_timeout_seconds=0.2).probe()
    assert probe == SandboxProbe(False, "bubblewrap did not finish a trivial run in 0.2s")


def test_builtin_tools_leave_python_out_with_a_warning_when_the_probe_fails(caplog: pytest.LogCaptureFixture) -> None:
    refused = FakeSandbox(SandboxProbe(False, "bubblewrap not found (bwrap); install it"))
    with caplog.at_level(logging.WARNING):
        names = [tool.name for tool in builtin_tools(None, sandbox=refused)]
    assert names == ["calculator", "current_time"]
    assert "the python tool is not offered: bubblewrap not found (bwrap); install it" in caplog.text
    assert refused.runs == []
    passing = FakeSandbox(SandboxProbe(True))
    assert [tool.name for tool in builtin_tools(None, sandbox=passing)] == ["calculator", "current_time", "python"]


def test_default_registry_offers_python_only_when_enabled_and_bubblewrap_runs(tmp_path: Path) -> None:
    enabled = MeshConfig(data_dir=tmp_path)
    assert ("python" in default_registry(enabled, None)) == _AVAILABLE.ok
    disabled = MeshConfig(data_dir=tmp_path, tools=ToolsConfig(sandbox=SandboxConfig(enabled=False)))
    assert "python" not in default_registry(disabled, None)


def fake_registry(sandbox: FakeSandbox) -> ToolRegistry:
    registry = ToolRegistry()
    registry.register(python_tool(sandbox))
    return registry


async def test_the_tool_returns_the_sandbox_result() -> None:
    result = SandboxResult(stdout="1\n", stderr="warn\n", exit_code=2, timed_out=True, truncated=True)
    sandbox = FakeSandbox(SandboxProbe(True), result=result)
    outcome = await fake_registry(sandbox).execute("python", {"code": "print(1)", "stdin": "in"})
    assert outcome.result == {"stdout": "1\n", "stderr": "warn\n", "exit_code": 2, "timed_out": True, "truncated": True}
    assert sandbox.runs == [("print(1)", "in")]
    assert fake_registry(sandbox).get("python").timeout_seconds == FAST.timeout_seconds + 5


async def test_a_sandbox_that_cannot_start_is_an_error_observation() -> None:
    sandbox = FakeSandbox(SandboxProbe(True), error=SandboxUnavailableError("the sandbox could not start: gone"))
    outcome = await fake_registry(sandbox).execute("python", {"code": "print(1)"})
    assert outcome.error is not None
    assert (outcome.error.kind, outcome.error.message) == (ToolErrorKind.FAILED, "the sandbox could not start: gone")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({}, "arguments: 'code' is a required property"),
        ({"code": ""}, "arguments.code: '' should be non-empty"),
        ({"code": "x" * 20_001}, "arguments.code: 'xxxxxxxx"),
        ({"code": "print(1)", "stdin": 3}, "arguments.stdin: 3 is not of type 'string'"),
        ({"code": "print(1)", "env": {}}, "Additional properties are not allowed ('env' was unexpected)"),
    ],
)
async def test_arguments_are_validated_before_anything_runs(arguments: dict[str, Any], message: str) -> None:
    sandbox = FakeSandbox(SandboxProbe(True))
    with pytest.raises(InvalidArgumentError, match="invalid arguments for tool 'python'") as caught:
        await fake_registry(sandbox).execute("python", arguments)
    assert message in str(caught.value)
    assert sandbox.runs == []
