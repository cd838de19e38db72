"""Command line: `python -m services.triton write-repo OUT ...` and `python -m services.triton serve-cpu ...`."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from dataclasses import MISSING, fields
from pathlib import Path

from services.common.errors import InvalidArgumentError
from services.triton.options import DEFAULT_MODEL_FILE, DEFAULT_MODEL_PACKAGE, TritonRepoOptions
from services.triton.repo import write_model_repository
from services.triton.server import LocalTritonServer, TritonPorts, TritonServerError


def _add_option_flags(parser: argparse.ArgumentParser) -> None:
    for field in fields(TritonRepoOptions):
        flag = "--" + field.name.replace("_", "-")
        default = field.default if field.default is not MISSING else None
        if isinstance(default, bool):
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=default)
        elif field.name == "max_tokens_in_paged_kv_cache":
            parser.add_argument(flag, dest=field.name, type=int, default=None)
        else:
            parser.add_argument(flag, dest=field.name, type=type(default), default=default)


def _options(args: argparse.Namespace, **overrides: object) -> TritonRepoOptions:
    values = {f.name: getattr(args, f.name) for f in fields(TritonRepoOptions)}
    values.update(overrides)
    return TritonRepoOptions(**values)  # type: ignore[arg-type]


def _venv_model(venv: Path) -> str:
    """The default GGUF as installed in the Triton venv, so the stub reads it from its own environment."""
    found = sorted(venv.glob(f"lib/python3*/site-packages/{DEFAULT_MODEL_PACKAGE}/{DEFAULT_MODEL_FILE}"))
    return str(found[0]) if found else ""


def write_repo(args: argparse.Namespace) -> int:
    repo = write_model_repository(args.out, _options(args))
    print(f"wrote {', '.join(repo.configs)} to {repo.path}")
    return 0


def serve_cpu(args: argparse.Namespace) -> int:
    venv = Path(args.venv).resolve()
    workdir = Path(args.workdir).resolve()
    engine_dir = args.engine_dir or _venv_model(venv)
    started = time.monotonic()
    repo = write_model_repository(workdir / "repository", _options(args, cpu_twin=True, engine_dir=engine_dir))
    ports = TritonPorts(http=args.http_port, grpc=args.grpc_port, metrics=args.metrics_port)
    server = LocalTritonServer(repo.path, venv, workdir, ports=ports, log_path=args.log)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    try:
        server.wait_ready(args.ready_timeout)
        print(
            f"tritonserver ready in {time.monotonic() - started:.1f}s (model repository {repo.path}): "
            f"gRPC {server.grpc_url}, HTTP {server.http_url}, metrics :{ports.metrics}; log {server.log_path}",
            flush=True,
        )
        while not stop.is_set() and server.process is not None and server.process.poll() is None:
            stop.wait(1.0)
    finally:
        code = server.stop()
    return 0 if stop.is_set() else (code or 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.triton", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write-repo", help="write an inflight_batcher_llm model repository")
    write.add_argument("out", help="directory to write the models into")
    _add_option_flags(write)
    write.set_defaults(run=write_repo)
    serve = commands.add_parser("serve-cpu", help="write the CPU-twin repository and run tritonserver on it")
    serve.add_argument("--venv", default=".venv-triton", help="virtual environment holding nvidia-pytriton")
    serve.add_argument("--workdir", default=".meshpilot/triton", help="repository, backends and log go here")
    serve.add_argument("--log", default=None, help="tritonserver log file (default: <workdir>/tritonserver.log)")
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--grpc-port", type=int, default=8001)
    serve.add_argument("--metrics-port", type=int, default=8002)
    serve.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for every model to load")
    _add_option_flags(serve)
    serve.set_defaults(run=serve_cpu)
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except (InvalidArgumentError, TritonServerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
