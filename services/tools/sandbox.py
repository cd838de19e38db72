"""Untrusted Python run in a bubblewrap sandbox: no network, a read-only system, rlimits, a wall-clock kill, capped output."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services.common.config import SandboxConfig

SYSTEM_PYTHON = "/usr/bin/python3"
# The wrapper that sets the rlimits inside the sandbox, after bubblewrap made its user namespace: RLIMIT_NPROC then
# counts the processes of this run only, not every process of the service's user on the host.
PRLIMIT = "/usr/bin/prlimit"
SETPRIV = "/usr/bin/setpriv"
WORK_DIR = "/tmp"
# bubblewrap ignores RLIMIT_NPROC for the host's root user: a root service runs the sandbox as nobody instead.
NOBODY = 65534
_READ_CHUNK = 65_536
# How long a killed sandbox gets to be reaped before run() returns regardless.
_REAP_SECONDS = 5.0


@dataclass(frozen=True)
class SandboxResult:
    """What one run produced. ``exit_code`` is the program's status (negative: killed by that signal, e.g. at the
    deadline); ``timed_out`` says the wall-clock limit killed it, ``truncated`` that stdout or stderr passed the cap
    (the run was killed there and the text is cut)."""

    stdout: str
    stderr: str
    exit_code: int
    timed_out: bool
    truncated: bool


@dataclass(frozen=True)
class SandboxProbe:
    """Whether a sandbox can run code on this host; ``reason`` says why not and what to change."""

    ok: bool
    reason: str = ""


class SandboxUnavailableError(RuntimeError):
    """The sandbox could not be started (not a failure of the program it was given)."""


class ToolSandbox(abc.ABC):
    """Runs a short untrusted Python program in isolation.

    Contract: ``run`` never runs code outside the isolation the implementation promises; whatever the program does
    (loop, allocate, fork, print without end) comes back as a SandboxResult within ``limits.timeout_seconds`` plus a
    few seconds, with at most ``limits.max_output_bytes`` of each stream held in memory. It raises
    SandboxUnavailableError only when the sandbox itself cannot start. ``probe`` says whether it can on this host;
    a caller offers the sandbox only when it does. ``limits`` are the limits of a run that names none.
    """

    limits: SandboxConfig

    @abc.abstractmethod
    def probe(self) -> SandboxProbe:
        """Whether runs can start here (may take a moment: call it once, at registration)."""

    @abc.abstractmethod
    async def run(self, code: str, stdin: str = "", limits: SandboxConfig | None = None) -> SandboxResult:
        """Runs ``code`` with ``stdin`` under ``limits`` (the sandbox's own when None)."""


class BubblewrapSandbox(ToolSandbox):
    """The system's python3 (-I -S) under bubblewrap.

    Every namespace unshared (network, pid, ipc, uts, user, cgroup) and no nested user namespaces, all capabilities
    dropped, a read-only /usr and nothing else of the host (no /etc, /home, /root, the service's tree or venv), a
    private size-capped tmpfs at /tmp as the work dir, a fresh /proc and minimal /dev, an empty environment, no
    inherited file descriptors, a new session, and rlimits (CPU, address space, processes, file size, open files).
    ``user`` is the host uid the sandbox runs as: nobody when the service is root (the default), else the service's.
    """

    def __init__(
        self,
        limits: SandboxConfig,
        *,
        bwrap: str | None = None,
        user: int | None = None,
        probe_timeout_seconds: float = 10.0,
    ) -> None:
        self.limits = limits
        self.probe_timeout_seconds = probe_timeout_seconds
        self.bwrap = bwrap if bwrap is not None else (shutil.which("bwrap") or "bwrap")
        self.user = user if user is not None else (NOBODY if os.geteuid() == 0 else None)

    def command(self, limits: SandboxConfig, program: list[str]) -> list[str]:
        """The bubblewrap command line running ``program`` (absolute path first) under ``limits``."""
        isolation = [
            "--unshare-all",
            "--unshare-user",
            "--disable-userns",
            "--die-with-parent",
            "--new-session",
            "--cap-drop",
            "ALL",
            "--clearenv",
            "--setenv",
            "HOME",
            WORK_DIR,
            "--setenv",
            "PATH",
            "/usr/bin:/bin",
        ]
        filesystem = [
            "--ro-bind",
            "/usr",
            "/usr",
            *(arg for name in ("bin", "lib", "lib64", "sbin") for arg in _usr_link(name)),
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--size",
            str(limits.max_file_mib * 1024 * 1024),
            "--tmpfs",
            WORK_DIR,
            "--remount-ro",
            "/",
            "--chdir",
            WORK_DIR,
        ]
        rlimits = [
            PRLIMIT,
            f"--cpu={limits.cpu_seconds}",
            f"--as={limits.memory_mib * 1024 * 1024}",
            f"--nproc={limits.max_processes}",
            f"--fsize={limits.max_file_mib * 1024 * 1024}",
            f"--nofile={limits.max_open_files}",
            "--",
        ]
        return [self.bwrap, *isolation, *filesystem, *rlimits, *program]

    def _spawn(self, command: list[str]) -> list[str]:
        """``command`` run as ``self.user`` when that is not the service's uid.

        setpriv rather than Popen's user=/group=: those make CPython fork instead of vfork, and a forked child of a
        process running gRPC runs gRPC's fork handlers (seen crashing with SIGSEGV before exec).
        """
        if self.user is None or self.user == os.geteuid():
            return command
        return [SETPRIV, f"--reuid={self.user}", f"--regid={self.user}", "--clear-groups", "--", *command]

    def probe(self) -> SandboxProbe:
        if shutil.which(self.bwrap) is None:
            return SandboxProbe(False, f"bubblewrap not found ({self.bwrap}); install it: apt-get install bubblewrap")
        try:
            done = subprocess.run(
                self._spawn(self.command(self.limits, ["/bin/true"])),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=self.probe_timeout_seconds,
                close_fds=True,
                pass_fds=(),
                env={},
                start_new_session=True,
            )
        except subprocess.TimeoutExpired:
            return SandboxProbe(False, f"bubblewrap did not finish a trivial run in {self.probe_timeout_seconds:g}s")
        except OSError as e:
            return SandboxProbe(False, f"bubblewrap ({self.bwrap}) could not be started: {e}")
        if done.returncode != 0:
            detail = done.stderr.decode(errors="replace").strip()[:300] or f"exit status {done.returncode}"
            return SandboxProbe(
                False,
                f"bubblewrap cannot create its namespaces on this host ({detail}); allow unprivileged user "
                "namespaces (sysctl user.max_user_namespaces, kernel.unprivileged_userns_clone) or run the "
                "container with them",
            )
        return SandboxProbe(True)

    async def run(self, code: str, stdin: str = "", limits: SandboxConfig | None = None) -> SandboxResult:
        limits = limits or self.limits
        if shutil.which(self.bwrap) is None:
            raise SandboxUnavailableError(f"the sandbox could not start: bubblewrap not found ({self.bwrap})")
        try:
            process = await asyncio.create_subprocess_exec(
                *self._spawn(self.command(limits, [SYSTEM_PYTHON, "-I", "-S", "-c", code])),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                close_fds=True,
                pass_fds=(),
                env={},
                start_new_session=True,
            )
        except OSError as e:
            raise SandboxUnavailableError(f"the sandbox could not start: {e}") from e
        return await _supervise(process, stdin.encode(), limits)


def _usr_link(name: str) -> list[str]:
    return ["--symlink", f"usr/{name}", f"/{name}"] if os.path.islink(f"/{name}") else []


async def _supervise(process: asyncio.subprocess.Process, stdin: bytes, limits: SandboxConfig) -> SandboxResult:
    """Feeds stdin, reads both streams up to the cap and waits, killing the process group at the deadline or cap."""
    assert process.stdin is not None and process.stdout is not None and process.stderr is not None

    def kill() -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)

    cap = limits.max_output_bytes
    out = asyncio.ensure_future(_read_capped(process.stdout, cap, kill))
    err = asyncio.ensure_future(_read_capped(process.stderr, cap, kill))
    tasks: list[asyncio.Future[Any]] = [
        asyncio.ensure_future(_feed(process.stdin, stdin)),
        out,
        err,
        asyncio.ensure_future(process.wait()),
    ]
    timed_out = False
    try:
        _, pending = await asyncio.wait(tasks, timeout=limits.timeout_seconds)
        if pending:
            timed_out = True
            kill()
            await asyncio.wait(pending, timeout=_REAP_SECONDS)
    finally:
        # Also on cancellation (the registry's own limit): nothing of the run may outlive the call.
        kill()
        for task in tasks:
            task.cancel()
    (stdout, out_cut), (stderr, err_cut) = (_done_or(out), _done_or(err))
    return SandboxResult(
        stdout=stdout.decode(errors="replace"),
        stderr=stderr.decode(errors="replace"),
        exit_code=process.returncode if process.returncode is not None else -signal.SIGKILL,
        timed_out=timed_out,
        truncated=out_cut or err_cut,
    )


def _done_or(task: asyncio.Future[tuple[bytes, bool]]) -> tuple[bytes, bool]:
    if task.done() and not task.cancelled() and task.exception() is None:
        return task.result()
    return b"", False


async def _feed(writer: asyncio.StreamWriter, data: bytes) -> None:
    # A program that exits without reading its stdin closes the pipe: that is not an error of the run.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        if data:
            writer.write(data)
            await writer.drain()
        writer.close()
        await writer.wait_closed()


async def _read_capped(stream: asyncio.StreamReader, cap: int, on_overflow: Callable[[], None]) -> tuple[bytes, bool]:
    """Up to ``cap`` bytes of ``stream`` and whether it had more; past the cap it calls ``on_overflow`` (the kill) and
    keeps nothing more, so an endless writer never costs more than ``cap`` bytes of memory."""
    buffer = bytearray()
    while chunk := await stream.read(_READ_CHUNK):
        room = cap - len(buffer)
        if len(chunk) > room:
            buffer += chunk[:room]
            on_overflow()
            # Drained, not kept, until the killed run closes the pipe: the pipe's transport then closes cleanly.
            while await stream.read(_READ_CHUNK):
                pass
            return bytes(buffer), True
        buffer += chunk
    return bytes(buffer), False
