"""A local tritonserver on CPU: the binary, python backend and 3.11 stub shipped in the nvidia-pytriton wheel."""

from __future__ import annotations

import ctypes
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

from services.triton.options import TritonRepoOptions
from services.triton.repo import write_model_repository

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_VENV = REPO_ROOT / ".venv-triton"
INSTALL_SCRIPT = REPO_ROOT / "scripts" / "triton_cpu.sh"
STUB_PYTHON = "3.11"
# The only package of this repository the python models may import (they run inside Triton's stub process).
STUB_IMPORTABLE = ("inference_core",)
PR_SET_PDEATHSIG = 1


class TritonServerError(RuntimeError):
    """tritonserver could not be found, started or made ready; the message says what to do."""


@dataclass(frozen=True)
class TritonPorts:
    """The three ports tritonserver listens on."""

    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    @classmethod
    def free(cls) -> TritonPorts:
        """Three ports free right now on 127.0.0.1 (tritonserver cannot bind port 0 and report it)."""
        sockets = [socket.socket() for _ in range(3)]
        try:
            for s in sockets:
                s.bind(("127.0.0.1", 0))
            http, grpc, metrics = (s.getsockname()[1] for s in sockets)
        finally:
            for s in sockets:
                s.close()
        return cls(http=http, grpc=grpc, metrics=metrics)


@dataclass(frozen=True)
class TritonInstall:
    """Where the pieces of the pytriton wheel are inside a virtual environment."""

    venv: Path
    binary: Path
    python_backend: Path
    stub: Path
    libs: Path

    @classmethod
    def find(cls, venv: str | Path) -> TritonInstall:
        """Locates tritonserver in ``venv``; TritonServerError saying how to install it when absent."""
        venv = Path(venv).resolve()
        candidates = sorted(venv.glob("lib/python3*/site-packages/pytriton/tritonserver/bin/tritonserver"))
        if not candidates:
            raise TritonServerError(
                f"no tritonserver in {venv}; run `make triton-cpu` (scripts/triton_cpu.sh) to create it"
            )
        server_dir = candidates[0].parents[1]
        site = server_dir.parents[1]
        install = cls(
            venv=venv,
            binary=candidates[0],
            python_backend=server_dir / "backends" / "python",
            stub=server_dir / "python_backend_stubs" / STUB_PYTHON / "triton_python_backend_stub",
            libs=site / "nvidia_pytriton.libs",
        )
        for path in (install.python_backend, install.stub, install.libs):
            if not path.exists():
                raise TritonServerError(f"{path} is missing from the nvidia-pytriton install in {venv}; reinstall it")
        return install

    def site_packages(self) -> Path:
        return self.libs.parent


def prepare_backends(install: TritonInstall, dest: str | Path) -> Path:
    """A backends directory holding the python backend with the Python 3.11 stub in it (idempotent)."""
    python_dir = Path(dest) / "python"
    if not (python_dir / "triton_python_backend_stub").is_file():
        shutil.rmtree(python_dir, ignore_errors=True)
        shutil.copytree(install.python_backend, python_dir)
        shutil.copy2(install.stub, python_dir / "triton_python_backend_stub")
    return Path(dest)


def stub_pythonpath(dest: str | Path, repo_root: Path = REPO_ROOT) -> Path:
    """A directory with links to the packages the python models may import, for the stub's PYTHONPATH."""
    path = Path(dest)
    path.mkdir(parents=True, exist_ok=True)
    for package in STUB_IMPORTABLE:
        link = path / package
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(repo_root / package, target_is_directory=True)
    return path


class LocalTritonServer:
    """One tritonserver process serving ``repository`` on CPU, with the venv's Python for the python backend.

    ``start()`` launches it (log to ``log_path``), ``wait_ready()`` polls /v2/health/ready, ``stop()`` sends SIGTERM
    and waits. Usable as a context manager (start + wait_ready, then stop).
    """

    def __init__(
        self,
        repository: str | Path,
        venv: str | Path,
        workdir: str | Path,
        *,
        ports: TritonPorts | None = None,
        log_path: str | Path | None = None,
        log_verbose: int = 0,
    ) -> None:
        self.install = TritonInstall.find(venv)
        self.repository = Path(repository).resolve()
        self.workdir = Path(workdir).resolve()
        self.ports = ports or TritonPorts()
        self.log_path = Path(log_path) if log_path else self.workdir / "tritonserver.log"
        self.log_verbose = log_verbose
        self.process: subprocess.Popen[bytes] | None = None
        self.ready_after_s: float | None = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports.grpc}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.http}"

    def command(self) -> list[str]:
        return [
            str(self.install.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={self.workdir / 'backends'}",
            f"--http-port={self.ports.http}",
            f"--grpc-port={self.ports.grpc}",
            f"--metrics-port={self.ports.metrics}",
            f"--log-verbose={self.log_verbose}",
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{self.install.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(self.install.libs), env.get("LD_LIBRARY_PATH")]))
        env["PYTHONPATH"] = str(self.workdir / "pythonpath")
        env["HF_HUB_OFFLINE"] = "1"
        env.pop("VIRTUAL_ENV", None)
        return env

    def start(self) -> None:
        if self.process is not None:
            raise TritonServerError("this server was already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        prepare_backends(self.install, self.workdir / "backends")
        stub_pythonpath(self.workdir / "pythonpath")
        self._started_at = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command(),
                env=self.environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    def wait_ready(self, timeout: float = 180.0) -> float:
        """Blocks until every model is loaded; returns the seconds since start. TritonServerError with the log's tail
        if the process exits or the timeout passes first."""
        if self.process is None:
            raise TritonServerError("start() the server before waiting for it")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TritonServerError(
                    f"tritonserver exited with code {self.process.returncode}; log tail:\n{self.log_tail()}"
                )
            if self.is_ready():
                self.ready_after_s = time.monotonic() - self._started_at
                return self.ready_after_s
            time.sleep(0.25)
        raise TritonServerError(f"tritonserver was not ready after {timeout:.0f}s; log tail:\n{self.log_tail()}")

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; returns the exit code."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait(timeout=10)

    def metrics(self, prefix: str = "meshpilot_twin") -> dict[str, float]:
        """The samples of /metrics whose name starts with ``prefix``, keyed by name with labels."""
        url = f"http://127.0.0.1:{self.ports.metrics}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            lines = response.read().decode().splitlines()
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(prefix)}

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def __enter__(self) -> LocalTritonServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def cpu_twin_server(
    workdir: str | Path,
    options: TritonRepoOptions | None = None,
    *,
    venv: str | Path = DEFAULT_VENV,
    ports: TritonPorts | None = None,
    install: bool = True,
) -> LocalTritonServer:
    """A LocalTritonServer (not started) on the CPU-twin repository written to ``workdir/repository`` from
    ``options`` (cpu_twin forced on), on free ports unless given. With ``install``, a missing ``venv`` is created by
    scripts/triton_cpu.sh first (minutes, once); without, TritonServerError says how to create it."""
    try:
        TritonInstall.find(venv)
    except TritonServerError:
        if not install:
            raise
        _install_once(Path(venv))
    workdir = Path(workdir)
    options = replace(options or TritonRepoOptions(), cpu_twin=True)
    repo = write_model_repository(workdir / "repository", options)
    return LocalTritonServer(repo.path, venv, workdir, ports=ports or TritonPorts.free())


def _install_once(venv: Path) -> None:
    """Creates ``venv`` with scripts/triton_cpu.sh, one process at a time (two test workers may ask at once: the
    second waits on the lock, then finds the venv made)."""
    venv.parent.mkdir(parents=True, exist_ok=True)
    # .venv-triton -> .venv-triton.lock (ignored by git), not ..venv-triton.lock
    with open(venv.parent / f".{venv.name.lstrip('.')}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            TritonInstall.find(venv)
            return
        except TritonServerError:
            pass
        env = {**os.environ, "TRITON_VENV": str(venv)}
        done = subprocess.run(["bash", str(INSTALL_SCRIPT), "--install-only"], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise TritonServerError(f"{INSTALL_SCRIPT} --install-only failed:\n{done.stderr[-2000:]}") from None


def _die_with_parent() -> None:
    # A test runner or CLI killed outright must not leave tritonserver (and its model stubs) running.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
