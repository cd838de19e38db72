"""Options the commands share, the planner's address, and the one place a failed planner call becomes an exit code."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import grpc
import typer

T = TypeVar("T")

# Unary calls fail fast when the planner is down (no wait_for_ready); this bounds a planner that hangs.
UNARY_TIMEOUT_S = 30.0

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML config file (default: $MESHPILOT_CONFIG or built-in defaults)."),
]
PlannerOption = Annotated[str | None, typer.Option(help="Planner address HOST:PORT (default from config).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of text.")]


class _Credentials:
    """The API key of this invocation (--api-key or $MESHPILOT_API_KEY), sent to the planner as a bearer token, and
    the `client` certificate the CLI presents when the config turns TLS on (read by ``service_target``)."""

    api_key: str | None = None
    tls: Any = None  # TlsIdentity | None


CREDENTIALS = _Credentials()


def fail(message: str, code: int) -> NoReturn:
    """Prints ``error: message`` on stderr and exits with ``code`` (2: the command line is wrong; 1: the call failed)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def load_config(config_path: Path | None) -> Any:  # -> MeshConfig; imported lazily so client commands stay light
    """The mesh config from ``config_path``; a bad file exits 2 with the loader's message."""
    from services.common import ConfigError
    from services.common import load_config as load

    try:
        return load(config_path)
    except ConfigError as e:
        fail(str(e), 2)


def service_target(service: str, flag: str | None, config_path: Path | None) -> str:
    """The ``service`` to dial: ``flag`` (--planner, --tools) when given, else the config's target of it. With
    tls.enabled, ``call_service`` presents the `client` certificate; a missing one exits 2 naming the file."""
    from services.common import ConfigError
    from services.common.tls import CLIENT_IDENTITY, tls_identity

    cfg = load_config(config_path)
    try:
        CREDENTIALS.tls = tls_identity(cfg, CLIENT_IDENTITY)
    except ConfigError as e:
        fail(str(e), 2)
    return flag or getattr(cfg, service).server.target()


def planner_target(planner: str | None, config_path: Path | None) -> str:
    """The planner to dial: ``--planner`` when given, else the config's planner server target."""
    return service_target("planner", planner, config_path)


def rpc_error_message(error: grpc.aio.AioRpcError) -> str:
    """``CODE: details``, with a hint to start the mesh when the planner cannot be reached."""
    hints = {
        grpc.StatusCode.UNAVAILABLE: " (is the mesh up? run `meshpilot up`)",
        grpc.StatusCode.UNAUTHENTICATED: " (pass --api-key or set MESHPILOT_API_KEY)",
    }
    hint = hints.get(error.code(), "")
    return f"{error.code().name}: {error.details() or ''}{hint}"


def connect_ray(address: str) -> None:
    """Joins the Ray cluster at ``address`` (--ray) as its driver; exits 1 naming the address when no cluster answers
    there, 2 when Ray is not installed."""
    try:
        from services.eval.ray_runner import RayClusterError, connect
    except ImportError:
        fail("--ray needs Ray: pip install 'meshpilot[ray]'", 2)
    try:
        connect(address)
    except RayClusterError as e:
        fail(str(e), 1)


def call_service(target: str, call: Callable[[grpc.aio.Channel], Awaitable[T]]) -> T:
    """Runs ``call`` on a channel to ``target``; a gRPC error is printed as ``error: CODE: details`` and exits 1."""
    from services.common import create_channel

    async def on_channel() -> T:
        async with create_channel(target, api_key=CREDENTIALS.api_key, tls=CREDENTIALS.tls) as channel:
            return await call(channel)

    try:
        return asyncio.run(on_channel())
    except grpc.aio.AioRpcError as e:
        fail(rpc_error_message(e), 1)
