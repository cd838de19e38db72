"""The hostile suite: programs that try to break out of the python tool's sandbox, each with what must contain it.

A program prints ESCAPED when its attack worked; ``contained`` also checks what the sandbox must have done (killed it,
cut its output, refused a call). The program's stdin carries ``HostileInput`` as JSON: the canary secret planted in the
service's environment, the service's pid and the tools server's port.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from dataclasses import dataclass

from services.common.config import SandboxConfig
from services.tools.sandbox import SandboxResult

# Small limits keep the suite quick; the containment is the same at the defaults.
HOSTILE_LIMITS = SandboxConfig(
    timeout_seconds=4, cpu_seconds=2, memory_mib=256, max_processes=16, max_file_mib=8, max_output_bytes=65_536
)
CANARY_ENV = "MESHPILOT_SANDBOX_CANARY"


@dataclass(frozen=True)
class HostileProgram:
    name: str
    expected: str
    code: str
    contained: Callable[[SandboxResult], bool]


def _no_escape(result: SandboxResult) -> bool:
    return "ESCAPED" not in result.stdout and "ESCAPED" not in result.stderr


def _refused(*needles: str) -> Callable[[SandboxResult], bool]:
    """No ESCAPED, and stdout or stderr names one of the expected refusals."""

    def check(result: SandboxResult) -> bool:
        text = result.stdout + result.stderr
        return _no_escape(result) and any(n in text for n in needles)

    return check


def _all(*checks: Callable[[SandboxResult], bool]) -> Callable[[SandboxResult], bool]:
    return lambda result: all(check(result) for check in checks)


def _program(code: str) -> str:
    prelude = "import json, os, socket, sys\nINPUT = json.loads(sys.stdin.read() or '{}')\n"
    return prelude + textwrap.dedent(code)


_TRY = """
def attempt(label, action):
    try:
        action()
    except BaseException as e:
        print("blocked", label, type(e).__name__, e)
    else:
        print("ESCAPED", label)
"""

_LIBC = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"

PROGRAMS: list[HostileProgram] = [
    HostileProgram(
        "fork bomb",
        "fork refused at RLIMIT_NPROC, run ends",
        "while True:\n    os.fork()\n",
        _all(_no_escape, _refused("Resource temporarily unavailable")),
    ),
    HostileProgram(
        "thread bomb",
        "thread creation refused (NPROC / address space)",
        """
        import threading, time
        n = 0
        try:
            while True:
                threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
                n += 1
        except BaseException as e:
            print("threads", n, type(e).__name__)
        if n > 64:
            print("ESCAPED", n)
        sys.stdout.flush()
        os._exit(0)
        """,
        _refused("threads"),
    ),
    HostileProgram(
        "4 GiB allocation",
        "MemoryError at RLIMIT_AS",
        "x = bytearray(4 * 2**30)\nprint('ESCAPED')\n",
        _all(_no_escape, _refused("MemoryError")),
    ),
    HostileProgram(
        "gradual allocation",
        "MemoryError before the address-space limit",
        """
        chunks = []
        try:
            while True:
                chunks.append(bytearray(32 * 2**20))
        except MemoryError:
            print("allocated MiB", 32 * len(chunks))
        if 32 * len(chunks) > 256:
            print("ESCAPED")
        """,
        _refused("allocated MiB"),
    ),
    HostileProgram(
        "busy loop",
        "killed by RLIMIT_CPU before the deadline",
        "while True:\n    pass\n",
        lambda r: r.exit_code != 0 and not r.timed_out,
    ),
    HostileProgram(
        "sleep past the deadline",
        "process group killed at the wall-clock limit",
        "import time\ntime.sleep(60)\nprint('ESCAPED')\n",
        lambda r: r.timed_out and _no_escape(r),
    ),
    HostileProgram(
        "orphan in its own session",
        "killed with the pid namespace when the program exits",
        "import time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(2)\n    print('ESCAPED')\n",
        _no_escape,
    ),
    HostileProgram(
        "write to /etc",
        "no /etc, read-only root",
        _TRY + "attempt('/etc/passwd', lambda: open('/etc/passwd', 'a').write('x'))\n",
        _refused("blocked"),
    ),
    HostileProgram(
        "write to the root and /usr",
        "read-only",
        _TRY
        + "attempt('/evil', lambda: open('/evil', 'w'))\n"
        + "attempt('/usr/evil', lambda: open('/usr/lib/evil', 'w'))\n",
        _refused("Read-only file system"),
    ),
    HostileProgram(
        "write outside the work dir via ..",
        "resolves inside the read-only sandbox root",
        _TRY + "attempt('../', lambda: open('/tmp/../../../evil', 'w'))\n",
        _refused("blocked"),
    ),
    HostileProgram(
        "read /proc of other processes",
        "only the sandbox's own pids",
        """
        pids = [p for p in os.listdir('/proc') if p.isdigit()]
        names = {open(f'/proc/{p}/comm').read().strip() for p in pids}
        print('pids', pids, names)
        if len(pids) > 4 or names - {'bwrap', 'python3', 'prlimit'} or str(INPUT['service_pid']) in pids:
            print('ESCAPED')
        """,
        _refused("pids"),
    ),
    HostileProgram(
        "read the service's environment",
        "cleared environment, canary absent",
        """
        seen = repr(dict(os.environ))
        for p in [p for p in os.listdir('/proc') if p.isdigit()]:
            try:
                seen += open(f'/proc/{p}/environ').read()
            except OSError:
                pass
        print('env', sorted(os.environ))
        if INPUT['canary'] in seen:
            print('ESCAPED')
        """,
        _refused("env"),
    ),
    HostileProgram(
        "connect to the mesh ports",
        "no network: 127.0.0.1:50051-50054 and the tools server unreachable",
        _TRY
        + """
for port in [50051, 50052, 50053, 50054, INPUT['tools_port']]:
    attempt(port, lambda: socket.create_connection(('127.0.0.1', port), timeout=1))
""",
        _refused("blocked"),
    ),
    HostileProgram(
        "connect to an external IP",
        "no route out",
        _TRY
        + "attempt('1.1.1.1', lambda: socket.create_connection(('1.1.1.1', 443), timeout=1))\n"
        + "attempt('8.8.8.8', lambda: socket.create_connection(('8.8.8.8', 53), timeout=1))\n",
        _refused("blocked"),
    ),
    HostileProgram(
        "DNS lookup",
        "no resolver",
        _TRY + "attempt('dns', lambda: socket.getaddrinfo('pypi.org', 443))\n",
        _refused("blocked"),
    ),
    HostileProgram(
        "list network interfaces",
        "loopback only",
        "names = [n for _, n in socket.if_nameindex()]\nprint('interfaces', names)\n"
        "if set(names) - {'lo'}:\n    print('ESCAPED')\n",
        _refused("interfaces"),
    ),
    HostileProgram(
        "ptrace the service",
        "the service's pid does not exist in the sandbox",
        _LIBC
        + "r = libc.ptrace(16, INPUT['service_pid'], 0, 0)\nprint('ptrace', r, os.strerror(ctypes.get_errno()))\n"
        + "if r == 0:\n    print('ESCAPED')\n",
        _refused("ptrace -1"),
    ),
    HostileProgram(
        "mount",
        "mount refused (no capabilities)",
        _LIBC
        + "r = libc.mount(b'none', b'/tmp', b'tmpfs', 0, None)\nprint('mount', r)\nif r == 0:\n    print('ESCAPED')\n",
        _refused("mount -1"),
    ),
    HostileProgram(
        "new user namespace",
        "unshare refused (--disable-userns)",
        _LIBC + "r = libc.unshare(0x10000000)\nprint('unshare', r)\nif r == 0:\n    print('ESCAPED')\n",
        _refused("unshare -1"),
    ),
    HostileProgram(
        "kill -9 -1",
        "kills only the sandbox",
        "os.kill(-1, 9)\nimport time\ntime.sleep(1)\n",
        lambda r: not r.timed_out,
    ),
    HostileProgram(
        "signal the parent and the service",
        "service pid not visible",
        "os.kill(os.getppid(), 9)\nprint('parent is the sandbox init, pid', os.getppid())\n"
        + _TRY
        + "attempt('service', lambda: os.kill(INPUT['service_pid'], 9))\n",
        _refused("blocked service"),
    ),
    HostileProgram(
        "100 MB of stdout",
        "cut at the output cap, run killed",
        "sys.stdout.write('x' * 100_000_000)\n",
        lambda r: r.truncated and len(r.stdout) <= 65_536,
    ),
    HostileProgram(
        "endless stderr",
        "cut at the output cap, run killed",
        "while True:\n    sys.stderr.write('y' * 4096)\n",
        lambda r: r.truncated and len(r.stderr) <= 65_536,
    ),
    HostileProgram(
        "zip bomb",
        "decompression to disk stopped at RLIMIT_FSIZE",
        """
        import zlib
        packer = zlib.compressobj(9)
        bomb = b''.join(packer.compress(bytes(2**20)) for _ in range(200)) + packer.flush()
        print('compressed bytes', len(bomb))
        unpacker = zlib.decompressobj()
        written = 0
        with open('out', 'wb') as f:
            for i in range(0, len(bomb), 1024):
                data = unpacker.decompress(bomb[i : i + 1024])
                f.write(data)
                written += len(data)
        print('ESCAPED', written)
        """,
        _all(_no_escape, _refused("File too large")),
    ),
    HostileProgram(
        "huge sparse file",
        "RLIMIT_FSIZE",
        "f = open('big', 'wb')\nf.seek(2**32)\nf.write(b'x')\nf.close()\nprint('ESCAPED')\n",
        _all(_no_escape, _refused("File too large")),
    ),
    HostileProgram(
        "fill the work dir",
        "tmpfs full (size-capped)",
        """
        for i in range(100):
            with open(f'f{i}', 'wb') as f:
                f.write(bytes(4 * 2**20 - 1))
        print('ESCAPED')
        """,
        _all(_no_escape, _refused("No space left")),
    ),
    HostileProgram(
        "/proc/self/root",
        "the sandbox's root, not the host's",
        "names = os.listdir('/proc/self/root')\nprint('root', names)\n"
        "if {'home', 'root', 'work', 'etc', 'var'} & set(names):\n    print('ESCAPED')\n",
        _refused("root"),
    ),
    HostileProgram(
        "symlink escapes",
        "links resolve inside the sandbox",
        _TRY
        + "os.symlink('/work', 'w')\nos.symlink('../../../../root', 'r')\n"
        + "attempt('link to /work', lambda: os.listdir('w'))\n"
        + "attempt('link to /root', lambda: os.listdir('r'))\n"
        + "attempt('/proc/1/root/work', lambda: os.listdir('/proc/1/root/work'))\n",
        _refused("blocked"),
    ),
    HostileProgram(
        "read /root, /work, /home",
        "not mounted",
        _TRY
        + "for d in ['/root', '/work', '/home', '/work/main/.venv', '/etc/shadow']:\n"
        + "    attempt(d, lambda: os.listdir(d) if d != '/etc/shadow' else open(d).read())\n",
        _refused("blocked"),
    ),
    HostileProgram(
        "import the service's packages",
        "venv not visible, system site off",
        _TRY + "attempt('grpc', lambda: __import__('grpc'))\nattempt('services', lambda: __import__('services'))\n",
        _refused("ModuleNotFoundError"),
    ),
    HostileProgram(
        "open many files",
        "EMFILE at RLIMIT_NOFILE",
        "files = []\ntry:\n    while True:\n        files.append(open('/dev/null'))\n"
        "except OSError as e:\n    print('opened', len(files), e)\nif len(files) > 64:\n    print('ESCAPED')\n",
        _refused("Too many open files"),
    ),
    HostileProgram(
        "setuid(0) and chroot",
        "refused: no capabilities",
        _TRY + "attempt('setuid', lambda: os.setuid(0))\nattempt('chroot', lambda: os.chroot('/tmp'))\n",
        _refused("PermissionError"),
    ),
    HostileProgram(
        "sethostname",
        "refused in its own uts namespace",
        _TRY + "attempt('sethostname', lambda: socket.sethostname('pwned'))\n",
        _refused("blocked"),
    ),
    HostileProgram(
        "write /proc/sys and /sys",
        "read-only /proc/sys, no /sys",
        _TRY
        + "attempt('/proc/sys', lambda: open('/proc/sys/kernel/hostname', 'w').write('x'))\n"
        + "attempt('/sys', lambda: os.listdir('/sys/fs/cgroup'))\n",
        _refused("blocked"),
    ),
    HostileProgram(
        "raw devices",
        "minimal /dev, no disks or memory",
        "names = os.listdir('/dev')\nprint('dev', names)\n"
        "if {'mem', 'kmem', 'sda', 'vda', 'nvme0n1', 'port'} & set(names):\n    print('ESCAPED')\n",
        _refused("dev"),
    ),
    HostileProgram(
        "inherited file descriptors",
        "only stdin, stdout, stderr",
        "fds = sorted(int(f) for f in os.listdir('/proc/self/fd'))\nprint('fds', fds)\n"
        "if [f for f in fds if f > 3]:\n    print('ESCAPED')\n",
        _refused("fds"),
    ),
    HostileProgram(
        "stack overflow",
        "the crash stays in the sandbox",
        "sys.setrecursionlimit(10**7)\ndef f(n):\n    return f(n + 1)\nf(0)\n",
        lambda r: r.exit_code != 0 and not r.timed_out,
    ),
]


def observed(result: SandboxResult) -> str:
    """A one-line summary of a run for the table."""
    parts = [f"exit {result.exit_code}"]
    if result.timed_out:
        parts.append("timed out")
    if result.truncated:
        parts.append("output cut")
    text = (result.stdout.strip().splitlines() or [""])[-1] or (result.stderr.strip().splitlines() or [""])[-1]
    if text:
        parts.append(text[:90].replace("|", "/"))
    return "; ".join(parts)


PROGRAMS = [HostileProgram(p.name, p.expected, _program(p.code), p.contained) for p in PROGRAMS]
