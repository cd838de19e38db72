"""Mesh services as real processes (`meshpilot serve NAME`) on free ports, for integration tests: start, wait for
SERVING, kill, restart."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from tests.conftest import clean_env, free_port, serving

ROOT = Path(__file__).resolve().parents[2]


class ServiceProcesses:
    """Services of one mesh sharing ``data_dir``, each on its own free port; ``env`` adds MESHPILOT_* settings.
    ``credentials``: health is checked over TLS with them (for services that run with tls.enabled)."""

    def __init__(
        self,
        data_dir: Path,
        names: tuple[str, ...],
        env: dict[str, str] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.ports = {name: free_port() for name in ("knowledge", "inference", "tools", "planner")}
        self.env = clean_env()
        self.env["MESHPILOT_DATA_DIR"] = str(data_dir)
        self.env.update({f"MESHPILOT_{name.upper()}__SERVER__PORT": str(port) for name, port in self.ports.items()})
        # /metrics defaults to the gRPC port + 1000, which nothing checked was free.
        self.env.update({f"MESHPILOT_{name.upper()}__SERVER__METRICS_PORT": str(free_port()) for name in self.ports})
        self.env["MESHPILOT_TOOLS__MCP_ENDPOINT__PORT"] = str(free_port())
        self.env.update(env or {})
        self.names = names
        self.credentials = credentials
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def target(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def start(self, name: str) -> None:
        with (self.data_dir / f"{name}.log").open("ab") as log:
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", "meshpilot", "serve", name], cwd=ROOT, env=self.env, stdout=log, stderr=log
            )

    def start_all(self, timeout: float = 600.0) -> None:
        for name in self.names:
            self.start(name)
        self.wait_serving(*self.names, timeout=timeout)

    def wait_serving(self, *names: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not all(serving(self.target(name), self.credentials) for name in names):
            exited = [name for name in names if self.processes[name].poll() is not None]
            assert not exited, f"{exited} exited early; logs in {self.data_dir}"
            assert time.monotonic() < deadline, f"{names} were not SERVING within {timeout:g}s; logs in {self.data_dir}"
            time.sleep(0.1)

    def kill(self, name: str) -> None:
        """SIGKILL: no drain, no shutdown code runs (a crash)."""
        process = self.processes[name]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)

    def restart(self, name: str, *, kill: bool = True, timeout: float = 120.0) -> None:
        """Kills (or SIGTERMs and waits for) the service, starts it again and waits until it is SERVING."""
        if kill:
            self.kill(name)
        else:
            self.processes[name].send_signal(signal.SIGTERM)
            self.processes[name].wait(timeout=60)
        self.start(name)
        self.wait_serving(name, timeout=timeout)

    def stop_all(self) -> dict[str, int | None]:
        """SIGTERM to every service, then the exit codes (a process that did not stop in 60 s is killed: None)."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for name, process in self.processes.items():
            try:
                codes[name] = process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                codes[name] = None
        return codes
