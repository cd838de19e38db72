"""The Triton path under load: concurrent gRPC streams to a real tritonserver serving the CPU twin, (a) straight from a
tritonclient stub and (b) through the MeshPilot inference service (`backend: triton`), with genai-perf's metrics.

Workload: agent-shaped prompts (a shared system prompt listing the tools, then a short question), greedy, the same
requests in both modes; the direct client sends exactly the inputs the service's TritonEngine sends. A latency phase
(one stream at a time, the two modes alternating request by request) measures TTFT without queueing; a load phase
(``--concurrency`` streams) measures throughput, run ``--rounds`` times per mode, alternating A and B. The service hop's
TTFT cost is also measured per request: the client's TTFT minus the TTFT the service's engine saw (both durations).

Writes docs/bench/triton.json and docs/bench/triton.md; prints the markdown table. perf_analyzer/genai-perf cannot be
installed on these machines (see deploy/triton/README.md for their commands against the same repository).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from meshpilot.inference.v1 import inference_pb2, inference_pb2_grpc
from services.triton import LocalTritonServer, TritonRepoOptions, cpu_twin_server

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "docs" / "bench"
# The latency phase needs only the first token; a few more keep ITL defined.
LATENCY_TOKENS = 4
SYSTEM = (
    "You are MeshPilot, an agent that answers questions about countries. You can call these tools: "
    "country_facts(name) for a country's capital, currency, region, phone code and time zones; "
    "entity_facts(name) for any entity of the knowledge graph; sparql_query(query) for read-only SPARQL; "
    "calculator(expression) for arithmetic; current_time(timezone) for the time in an IANA zone. "
    "Never invent facts the tools did not give you."
)
QUESTIONS = [
    "Describe the capital of France and what it is known for.",
    "Explain which currency Japan uses and how it came to be.",
    "Tell me about the region Kenya is in and its neighbours.",
    "Describe how phone codes work, taking Brazil as the example.",
    "Tell me about Ottawa and why it became the capital of Canada.",
    "Explain the time zone Iceland uses and why it does not change in summer.",
    "Describe the currency of Switzerland and where it is used.",
    "Explain step by step how to multiply 17 by 23.",
]


def chatml(question: str) -> str:
    """SmolLM2's chat template, rendered here so both modes send identical text."""
    return f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


@dataclass
class Sample:
    ttft_s: float
    e2e_s: float
    output_tokens: int
    hop_ms: float | None = None
    """Service only: the client's TTFT minus the TTFT measured inside the service's engine."""


@dataclass
class Phase:
    mode: str
    samples: list[Sample] = field(default_factory=list)
    wall_s: float = 0.0
    service_cpu_s: float | None = None


def _bytes(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<I", len(data)) + data


def direct_request(model: str, prompt: str, max_tokens: int) -> service_pb2.ModelInferRequest:
    """The inputs TritonEngine sends for a greedy prompt (same tensors, same requested outputs)."""
    message = service_pb2.ModelInferRequest(model_name=model)
    tensors = [
        ("text_input", "BYTES", _bytes(prompt)),
        ("max_tokens", "INT32", struct.pack("<i", max_tokens)),
        ("stream", "BOOL", b"\x01"),
        ("exclude_input_in_output", "BOOL", b"\x01"),
        ("return_num_input_tokens", "BOOL", b"\x01"),
        ("return_num_output_tokens", "BOOL", b"\x01"),
        ("top_k", "INT32", struct.pack("<i", 1)),
    ]
    for name, datatype, raw in tensors:
        message.inputs.add(name=name, datatype=datatype, shape=[1, 1])
        message.raw_input_contents.append(raw)
    for name in ("text_output", "num_input_tokens", "num_output_tokens"):
        message.outputs.add(name=name)
    message.parameters["triton_enable_empty_final_response"].bool_param = True
    return message


async def direct_stream(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, message: service_pb2.ModelInferRequest
) -> Sample:
    done = asyncio.Event()

    async def requests() -> AsyncIterator[service_pb2.ModelInferRequest]:
        yield message
        await done.wait()

    started = time.perf_counter()
    first = None
    tokens = 0
    call = stub.ModelStreamInfer(requests(), metadata=(("triton_grpc_error", "true"),))
    try:
        async for response in call:
            infer = response.infer_response
            for i, output in enumerate(infer.outputs):
                raw = infer.raw_output_contents[i]
                if output.name == "text_output" and first is None and len(raw) > 4:
                    first = time.perf_counter()
                elif output.name == "num_output_tokens" and len(raw) >= 4:
                    (tokens,) = struct.unpack_from("<i", raw)
            if infer.parameters["triton_final_response"].bool_param:
                break
    finally:
        done.set()
    end = time.perf_counter()
    return Sample(ttft_s=(first or end) - started, e2e_s=end - started, output_tokens=tokens)


async def service_stream(stub: inference_pb2_grpc.InferenceServiceStub, prompt: str, max_tokens: int) -> Sample:
    request = inference_pb2.GenerateRequest(
        prompt=prompt, max_tokens=max_tokens, sampling=inference_pb2.SamplingParams(temperature=0.0)
    )
    started = time.perf_counter()
    first = None
    last = None
    async for response in stub.Generate(request):
        if first is None and response.text:
            first = time.perf_counter()
        last = response
    end = time.perf_counter()
    assert last is not None
    ttft = (first or end) - started
    return Sample(
        ttft_s=ttft,
        e2e_s=end - started,
        output_tokens=last.usage.completion_tokens,
        hop_ms=ttft * 1000 - last.timings.time_to_first_token_ms,
    )


async def run_phase(
    mode: str, call: Callable[[str], Awaitable[Sample]], prompts: list[str], concurrency: int, pid: int | None
) -> Phase:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    phase = Phase(mode)

    async def worker() -> None:
        while not queue.empty():
            phase.samples.append(await call(queue.get_nowait()))

    cpu_before = _cpu_seconds(pid)
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    phase.wall_s = time.perf_counter() - started
    if pid is not None:
        phase.service_cpu_s = _cpu_seconds(pid) - cpu_before
    return phase


def _cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    index = (len(ordered) - 1) * q
    low, high = int(index), min(int(index) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (index - low)


def summarize(phases: list[Phase]) -> dict[str, float]:
    """genai-perf's metrics over the samples of ``phases`` (throughput over their summed wall time)."""
    samples = [s for p in phases for s in p.samples]
    wall = sum(p.wall_s for p in phases)
    itl = [(s.e2e_s - s.ttft_s) / (s.output_tokens - 1) for s in samples if s.output_tokens > 1]
    tokens = sum(s.output_tokens for s in samples)
    out = {
        "requests": len(samples),
        "ttft_p50_ms": _percentile([s.ttft_s for s in samples], 0.5) * 1000,
        "ttft_p95_ms": _percentile([s.ttft_s for s in samples], 0.95) * 1000,
        "itl_p50_ms": _percentile(itl, 0.5) * 1000,
        "itl_p95_ms": _percentile(itl, 0.95) * 1000,
        "e2e_p50_ms": _percentile([s.e2e_s for s in samples], 0.5) * 1000,
        "output_tokens_per_s": tokens / wall if wall else 0.0,
        "requests_per_s": len(samples) / wall if wall else 0.0,
        "mean_output_tokens": tokens / len(samples) if samples else 0.0,
    }
    hops = [s.hop_ms for s in samples if s.hop_ms is not None]
    if hops:
        out["hop_ttft_p50_ms"] = _percentile(hops, 0.5)
        out["hop_ttft_p95_ms"] = _percentile(hops, 0.95)
    cpu = [p.service_cpu_s for p in phases if p.service_cpu_s is not None]
    if cpu:
        out["service_cpu_ms_per_request"] = sum(cpu) * 1000 / len(samples)
    return out


class InferenceProcess:
    """`python -m meshpilot serve inference` with backend triton on free ports."""

    def __init__(self, triton_url: str, model: str, tokenizer: str, workdir: Path) -> None:
        self.port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESHPILOT_")}
        env.update(
            {
                "MESHPILOT_DATA_DIR": str(workdir),
                "MESHPILOT_INFERENCE__SERVER__PORT": str(self.port),
                "MESHPILOT_INFERENCE__SERVER__METRICS_PORT": str(_free_port()),
                "MESHPILOT_INFERENCE__BACKEND": "triton",
                "MESHPILOT_INFERENCE__TRITON_URL": triton_url,
                "MESHPILOT_INFERENCE__TRITON_MODEL": model,
                "MESHPILOT_INFERENCE__MODEL_PATH": tokenizer,
            }
        )
        self.log = workdir / "inference.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "meshpilot", "serve", "inference"], cwd=ROOT, env=env, stdout=log, stderr=log
            )

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def wait_serving(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        async with grpc.aio.insecure_channel(self.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the inference service exited:\n{self.log.read_text()[-3000:]}")
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.5)
        raise RuntimeError(f"the inference service was not SERVING after {timeout}s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def measure(args: argparse.Namespace, triton_url: str, tokenizer: str, workdir: Path) -> dict:
    service = InferenceProcess(triton_url, args.model, tokenizer, workdir)
    try:
        await service.wait_serving()
        async with (
            grpc.aio.insecure_channel(triton_url) as triton_channel,
            grpc.aio.insecure_channel(service.target) as service_channel,
        ):
            triton = service_pb2_grpc.GRPCInferenceServiceStub(triton_channel)
            inference = inference_pb2_grpc.InferenceServiceStub(service_channel)
            prompts = [chatml(q) for q in QUESTIONS]
            requests = {
                (p, m): direct_request(args.model, p, m) for p in prompts for m in (args.max_tokens, LATENCY_TOKENS)
            }

            def direct(max_tokens: int) -> Callable[[str], Awaitable[Sample]]:
                return lambda prompt: direct_stream(triton, requests[(prompt, max_tokens)])

            def through_service(max_tokens: int) -> Callable[[str], Awaitable[Sample]]:
                return lambda prompt: service_stream(inference, prompt, max_tokens)

            pid = service.process.pid
            for mode in (direct, through_service):  # warm-up: every prompt's prefix cached, every path exercised
                await run_phase("warmup", mode(args.max_tokens), prompts, args.concurrency, None)
            latency: dict[str, list[Phase]] = {"direct": [], "service": []}
            for i in range(args.latency_requests):
                prompt = [prompts[i % len(prompts)]]
                latency["direct"].append(await run_phase("direct", direct(LATENCY_TOKENS), prompt, 1, None))
                latency["service"].append(await run_phase("service", through_service(LATENCY_TOKENS), prompt, 1, pid))
            load: dict[str, list[Phase]] = {"direct": [], "service": []}
            batch = [prompts[i % len(prompts)] for i in range(args.requests)]
            for _ in range(args.rounds):
                load["direct"].append(await run_phase("direct", direct(args.max_tokens), batch, args.concurrency, None))
                load["service"].append(
                    await run_phase("service", through_service(args.max_tokens), batch, args.concurrency, pid)
                )
    finally:
        service.stop()
    result: dict[str, Any] = {
        "latency": {mode: summarize(phases) for mode, phases in latency.items()},
        "load": {mode: summarize(phases) for mode, phases in load.items()},
    }
    direct_load, service_load = result["load"]["direct"], result["load"]["service"]
    result["hop"] = {
        "ttft_p50_added_ms_concurrency_1": result["latency"]["service"]["ttft_p50_ms"]
        - result["latency"]["direct"]["ttft_p50_ms"],
        "ttft_p50_added_ms_under_load": service_load["ttft_p50_ms"] - direct_load["ttft_p50_ms"],
        "ttft_p50_added_ms_in_service": result["latency"]["service"]["hop_ttft_p50_ms"],
        "throughput_cost_percent": 100
        * (direct_load["output_tokens_per_s"] - service_load["output_tokens_per_s"])
        / direct_load["output_tokens_per_s"],
    }
    return result


def markdown(result: dict, args: argparse.Namespace) -> str:
    rows = [
        ("TTFT p50 (ms)", "ttft_p50_ms"),
        ("TTFT p95 (ms)", "ttft_p95_ms"),
        ("inter-token latency p50 (ms)", "itl_p50_ms"),
        ("inter-token latency p95 (ms)", "itl_p95_ms"),
        ("output tokens/s", "output_tokens_per_s"),
        ("requests/s", "requests_per_s"),
        ("mean output tokens", "mean_output_tokens"),
    ]
    lat, load, hop = result["latency"], result["load"], result["hop"]
    lines = [
        f"# Triton path: direct tritonclient vs through the inference service ({result['model']}, CPU twin)",
        "",
        f"{result['machine']}; tritonserver {result['tritonserver']} with the CPU twin (torch engine, "
        f"{args.twin_threads} threads); greedy; {len(QUESTIONS)} agent-shaped prompts.",
        f"Load: {args.requests} requests x {args.rounds} rounds per mode at concurrency {args.concurrency}, "
        f"max_tokens {args.max_tokens}. Latency: {args.latency_requests} requests per mode one at a time, "
        f"max_tokens {LATENCY_TOKENS}, modes alternating request by request.",
        "",
        "| metric | direct, c=1 | service, c=1 | direct, load | service, load |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for label, key in rows:
        values = [lat["direct"][key], lat["service"][key], load["direct"][key], load["service"][key]]
        lines.append(f"| {label} | " + " | ".join(f"{v:.1f}" for v in values) + " |")
    lines += [
        "",
        f"Service hop, TTFT p50 added at concurrency 1: **{hop['ttft_p50_added_ms_concurrency_1']:+.2f} ms** "
        f"(paired, per request: client TTFT minus the TTFT the service's engine measured, which leaves out the "
        f"engine's own request preparation: {hop['ttft_p50_added_ms_in_service']:.2f} ms p50, "
        f"{lat['service']['hop_ttft_p95_ms']:.2f} ms p95); under load: {hop['ttft_p50_added_ms_under_load']:+.1f} ms.",
        f"Service hop, output-throughput cost under load: **{hop['throughput_cost_percent']:+.2f} %** "
        f"(the service process used {load['service'].get('service_cpu_ms_per_request', 0):.1f} ms CPU per request).",
        "",
        "The twin, the service and this client share the machine's cores (with whatever else runs there), so the",
        "service's CPU competes with the engine's: repeated runs differ by a few percent in throughput and a few ms",
        "in unpaired TTFT; the paired per-request figure is the steadiest measure of the hop's TTFT.",
        "Run with `make bench-triton` (benchmarks/triton_bench.py).",
    ]
    return "\n".join(lines) + "\n"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=24, help="load-phase requests per round and mode")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--latency-requests", type=int, default=30)
    parser.add_argument("--twin-threads", type=int, default=2)
    parser.add_argument("--model", default="ensemble", help="ensemble or tensorrt_llm_bls")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--triton-url", default="", help="use this running twin instead of starting one")
    parser.add_argument("--tokenizer", default="", help="with --triton-url: the repository's tokenizer directory")
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="triton-bench-") as tmp:
        workdir = Path(tmp)
        if args.triton_url:
            result = await measure(args, args.triton_url, args.tokenizer, workdir)
            return _write(args, result, started)
        options = TritonRepoOptions(twin_threads=args.twin_threads, max_batch_size=max(8, args.concurrency))
        server: LocalTritonServer = cpu_twin_server(workdir / "triton", options)
        server.start()
        try:
            server.wait_ready(600)
            tokenizer = str(server.repository / "preprocessing" / "1" / "tokenizer")
            result = await measure(args, server.grpc_url, tokenizer, workdir)
        finally:
            server.stop()
    _write(args, result, started)


def _write(args: argparse.Namespace, result: dict, started: float) -> None:
    result.update(
        {
            "model": args.model,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            "tritonserver": "2.51 (nvidia-pytriton 0.7.0)",
            "settings": vars(args) | {"out": str(args.out)},
            "run_seconds": round(time.monotonic() - started, 1),
        }
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "triton.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result, args)
    (args.out / "triton.md").write_text(table)
    print(table)
    print(f"wrote {args.out / 'triton.json'} and {args.out / 'triton.md'} in {result['run_seconds']:.0f}s")


if __name__ == "__main__":
    asyncio.run(main())
