"""Typer commands of the Triton path: `triton repo`, `triton serve-cpu` and `trtllm build`.

The meshpilot CLI mounts ``triton_app`` and ``trtllm_app``; ``python -m services.triton`` runs ``triton_app`` alone.
"""

from __future__ import annotations

import ast
import inspect
import itertools
import signal
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import MISSING, fields, replace
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from services.common.errors import InvalidArgumentError
from services.triton.options import DEFAULT_MODEL_FILE, DEFAULT_MODEL_PACKAGE, TritonRepoOptions
from services.triton.repo import TemplateError, write_model_repository
from services.triton.server import DEFAULT_VENV, LocalTritonServer, TritonPorts, TritonServerError
from services.triton.trtllm import EngineBuildOptions, TrtllmUnavailableError, build_engines

triton_app = typer.Typer(
    help="Triton model repositories in TensorRT-LLM's inflight_batcher_llm layout, and a local CPU tritonserver.",
    no_args_is_help=True,
)
trtllm_app = typer.Typer(
    help="TensorRT-LLM engines for GPU nodes (needs the trtllm extra and a GPU).", no_args_is_help=True
)
EXIT_USAGE = 2
# Options of the engine step that a twin-only or build-owned command sets itself.
TWIN_ONLY = ("twin_device", "twin_dtype", "twin_threads")


def _field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass (the string literal under each field), for --help."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, following in itertools.pairwise(body):
        is_doc = isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and is_doc:
            text = str(following.value.value).replace("``", "")  # type: ignore[attr-defined]
            docs[node.target.id] = " ".join(text.split())
    return docs


def with_repo_options(exclude: tuple[str, ...] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Gives a command one --option per TritonRepoOptions field (minus ``exclude``); the command receives them as
    ``options: TritonRepoOptions`` (its last parameter)."""
    docs = _field_docs(TritonRepoOptions)
    extra = []
    for field in fields(TritonRepoOptions):
        if field.name in exclude:
            continue
        default = field.default if field.default is not MISSING else None
        kind: Any = Optional[int] if default is None else type(default)  # noqa: UP045 (typer reads Optional)
        option = typer.Option(help=docs.get(field.name, ""), rich_help_panel="Repository options")
        extra.append(
            inspect.Parameter(
                field.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, option]
            )
        )

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != "options"]

        def wrapper(**kwargs: Any) -> Any:
            values = {p.name: kwargs.pop(p.name) for p in extra}
            return command(**kwargs, options=TritonRepoOptions(**values))

        wrapper.__name__ = command.__name__
        wrapper.__doc__ = command.__doc__
        wrapper.__signature__ = inspect.Signature([*own, *extra])  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in [*own, *extra]}
        return wrapper

    return decorate


@trtllm_app.callback()
def _trtllm() -> None:
    """TensorRT-LLM engines for GPU nodes (needs the trtllm extra and a GPU)."""


def _fail(error: Exception) -> typer.Exit:
    typer.echo(f"error: {error}", err=True)
    return typer.Exit(EXIT_USAGE)


@triton_app.command("repo")
@with_repo_options()
def repo(
    out: Annotated[Path, typer.Option("--out", help="Directory to write the five models into.")],
    *,
    options: TritonRepoOptions,
) -> None:
    """Write an inflight_batcher_llm model repository (GPU, or --cpu-twin), every config.pbtxt validated."""
    try:
        written = write_model_repository(out, options)
    except (InvalidArgumentError, TemplateError) as e:
        raise _fail(e) from e
    typer.echo(f"wrote {', '.join(written.configs)} to {written.path}")


@triton_app.command("serve-cpu")
@with_repo_options(exclude=("cpu_twin",))
def serve_cpu(
    venv: Annotated[Path, typer.Option(help="Virtual environment holding nvidia-pytriton.")] = DEFAULT_VENV,
    workdir: Annotated[Path, typer.Option(help="Repository, backends and log go here.")] = Path(".meshpilot/triton"),
    log: Annotated[Optional[Path], typer.Option(help="tritonserver log (default: WORKDIR/tritonserver.log).")] = None,  # noqa: UP045
    http_port: int = 8000,
    grpc_port: int = 8001,
    metrics_port: int = 8002,
    ready_timeout: Annotated[float, typer.Option(help="Seconds to wait for every model to load.")] = 600.0,
    *,
    options: TritonRepoOptions,
) -> None:
    """Write the CPU-twin repository and run a real tritonserver on it until Ctrl-C/SIGTERM."""
    venv = venv.resolve()
    workdir = workdir.resolve()
    engine_dir = options.engine_dir or _venv_model(venv)
    started = time.monotonic()
    try:
        written = write_model_repository(workdir / "repository", replace(options, cpu_twin=True, engine_dir=engine_dir))
        ports = TritonPorts(http=http_port, grpc=grpc_port, metrics=metrics_port)
        server = LocalTritonServer(written.path, venv, workdir, ports=ports, log_path=log)
    except (InvalidArgumentError, TemplateError, TritonServerError) as e:
        raise _fail(e) from e
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    try:
        server.wait_ready(ready_timeout)
        typer.echo(
            f"tritonserver ready in {time.monotonic() - started:.1f}s (model repository {written.path}): "
            f"gRPC {server.grpc_url}, HTTP {server.http_url}, metrics :{ports.metrics}; log {server.log_path}"
        )
        while not stop.is_set() and server.process is not None and server.process.poll() is None:
            stop.wait(1.0)
    except TritonServerError as e:
        raise _fail(e) from e
    finally:
        code = server.stop()
    if not stop.is_set():
        typer.echo(f"error: tritonserver exited with code {code}; see {server.log_path}", err=True)
        raise typer.Exit(code or 1)


@trtllm_app.command("build")
@with_repo_options(exclude=("cpu_twin", "engine_dir", "tokenizer_dir", "max_batch_size", *TWIN_ONLY))
def build(
    model: Annotated[str, typer.Option(help="HF Llama-family model directory, or a .gguf file (de-quantized first).")],
    out: Annotated[Path, typer.Option("--out", help="Directory for the engines (rank*.engine, config.json).")],
    repository: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Also write the GPU model repository here, its engine_dir and tokenizer_dir filled."),
    ] = None,
    served_engine_dir: Annotated[str, typer.Option(help="OUT as the Triton container sees it.")] = "",
    served_tokenizer_dir: Annotated[str, typer.Option(help="The tokenizer dir as the Triton container sees it.")] = "",
    dtype: Annotated[str, typer.Option(help="float16, bfloat16 or float32.")] = "float16",
    max_batch_size: int = 64,
    max_input_len: int = 2048,
    max_seq_len: int = 4096,
    max_num_tokens: int = 8192,
    tp_size: Annotated[int, typer.Option(help="Tensor-parallel GPUs.")] = 1,
    *,
    options: TritonRepoOptions,
) -> None:
    """Build TensorRT-LLM engines of MODEL into OUT (and optionally the Triton repository serving them)."""
    build_options = EngineBuildOptions(
        dtype=dtype,
        max_batch_size=max_batch_size,
        max_input_len=max_input_len,
        max_seq_len=max_seq_len,
        max_num_tokens=max_num_tokens,
        tp_size=tp_size,
        kv_cache_reuse=options.enable_kv_cache_reuse,
    )
    try:
        result = build_engines(
            model,
            out,
            build_options,
            repository=repository,
            repo_options=options,
            served_engine_dir=served_engine_dir,
            served_tokenizer_dir=served_tokenizer_dir,
        )
    except (TrtllmUnavailableError, InvalidArgumentError, TemplateError) as e:
        raise _fail(e) from e
    typer.echo(f"engines in {result.engine_dir} (TensorRT-LLM {result.tensorrt_llm_version}; serve with the same)")
    if result.repository is not None:
        typer.echo(f"model repository in {result.repository.path}")


def _venv_model(venv: Path) -> str:
    """The default GGUF as installed in the Triton venv, so the stub reads it from its own environment."""
    found = sorted(venv.glob(f"lib/python3*/site-packages/{DEFAULT_MODEL_PACKAGE}/{DEFAULT_MODEL_FILE}"))
    return str(found[0]) if found else ""
