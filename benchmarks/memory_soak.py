"""Sustained agent-shaped load on the inference service while its memory is sampled: is RSS flat?

`make soak-memory` runs `meshpilot serve inference` (one backend per run, shipped defaults otherwise), then C clients
send the inference benchmark's calls one after another without pause for SECONDS (shared ~650-token prefix plus a
unique question, half JSON-constrained, greedy, 64 tokens at most; the questions cycle, so prompts keep changing). The
resident memory of the service and its child processes is read from /proc every few seconds.

The first WARMUP seconds are left out of the verdict: caches (prefix cache, grammar cache, allocator pools) fill
then. Both backends reserve KV memory at start (the torch engine's slots, inference_core/kv_cache.py; the openvino
pipeline's inference.openvino_kv_cache_gb), but a page of it counts in RSS only once first written. The torch engine's
slots page in within the first calls (120 s warm-up by default, then 480 s measured). OpenVINO's block allocator hands
out unused blocks before it reuses freed ones, so its RSS climbs by up to the reservation over the first minutes of
load (measured: ~500 s at 16 clients on 2 cores) and then stays put (480 s warm-up by default, then 720 s measured).
After it, memory is flat when the last quarter's median RSS is within TOLERANCE (default 3% and at least 32 MB)
of the first quarter's, and the least-squares slope is reported in MB per minute. Writes
docs/bench/memory_soak.{json,md}; `soak()` is also what tests/integration/test_inference_process.py runs for a few
seconds against its service.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

import inference_core  # noqa: F401  (sets the OpenMP policy before torch loads, as the service does)
from benchmarks.inference_bench import (
    ACTION_SCHEMA,
    OUT_DIR,
    chat,
    free_port,
    make_calls,
    system_prompt,
    wait_serving,
)
from meshpilot.inference.v1 import inference_pb2, inference_pb2_grpc


def tree_rss_mb(pid: int) -> float:
    """Current resident memory of ``pid`` and its descendants, MB (0 for a process that is gone)."""
    total = 0.0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) / 1024
        for task in Path(f"/proc/{pid}/task").iterdir():
            children = task / "children"
            for child in children.read_text().split() if children.is_file() else ():
                total += tree_rss_mb(int(child))
    except OSError:
        pass
    return total


@dataclass
class SoakResult:
    seconds: float
    warmup_s: float
    clients: int
    calls: int
    failed: int
    output_tokens: int
    samples: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, RSS MB)

    def verdict(self, tolerance: float = 0.03, floor_mb: float = 32.0) -> dict[str, object]:
        """Flatness after the warm-up: first and last quarter medians, the slope, and whether it is flat."""
        after = [(t, rss) for t, rss in self.samples if t >= self.warmup_s]
        if len(after) < 4:
            raise ValueError(f"{len(after)} samples after the warm-up: run longer than the warm-up")
        quarter = max(1, len(after) // 4)
        first = statistics.median(rss for _, rss in after[:quarter])
        last = statistics.median(rss for _, rss in after[-quarter:])
        mean_t = statistics.fmean(t for t, _ in after)
        mean_r = statistics.fmean(rss for _, rss in after)
        spread = sum((t - mean_t) ** 2 for t, _ in after)
        slope = sum((t - mean_t) * (rss - mean_r) for t, rss in after) / spread if spread else 0.0
        allowed = max(floor_mb, tolerance * first)
        return {
            "rss_first_quarter_mb": round(first, 1),
            "rss_last_quarter_mb": round(last, 1),
            "growth_mb": round(last - first, 1),
            "allowed_mb": round(allowed, 1),
            "slope_mb_per_min": round(slope * 60, 2),
            "peak_rss_mb": round(max(rss for _, rss in self.samples), 1),
            "flat": last - first <= allowed,
        }


async def soak(
    target: str, pid: int, *, seconds: float, clients: int, warmup_s: float, sample_every: float = 2.0
) -> SoakResult:
    """Drives ``clients`` clients against the service at ``target`` for ``seconds``, sampling ``pid``'s RSS."""
    system = system_prompt()
    result = SoakResult(seconds, warmup_s, clients, 0, 0, 0)
    began = time.monotonic()
    deadline = began + seconds
    calls = make_calls(clients, 64)  # 64 distinct questions per client, cycled

    async with grpc.aio.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)

        async def client(number: int) -> None:
            own = [c for c in calls if c.client == number]
            k = 0
            while time.monotonic() < deadline:
                call = own[k % len(own)]
                k += 1
                request = inference_pb2.GenerateRequest(max_tokens=64)
                request.chat.messages.extend(inference_pb2.ChatMessage(**m) for m in chat(call, system))
                request.sampling.temperature = 0.0
                if call.constrained:
                    request.constraint.json_schema = json.dumps(ACTION_SCHEMA)
                try:
                    async for response in stub.Generate(request, timeout=120):
                        result.output_tokens += len(response.token_ids)
                    result.calls += 1
                except grpc.aio.AioRpcError:
                    result.failed += 1

        async def sampler() -> None:
            while time.monotonic() < deadline:
                result.samples.append((round(time.monotonic() - began, 1), round(tree_rss_mb(pid), 1)))
                await asyncio.sleep(sample_every)

        await asyncio.gather(sampler(), *(client(c) for c in range(clients)))
    result.samples.append((round(time.monotonic() - began, 1), round(tree_rss_mb(pid), 1)))
    return result


async def run(args: argparse.Namespace) -> dict[str, object]:
    port = free_port()
    env = {
        **os.environ,
        "MESHPILOT_INFERENCE__BACKEND": args.backend,
        "MESHPILOT_INFERENCE__SERVER__PORT": str(port),
        "MESHPILOT_INFERENCE__SERVER__METRICS_PORT": str(free_port()),
    }
    process = subprocess.Popen([sys.executable, "-m", "meshpilot", "serve", "inference"], env=env)
    target = f"127.0.0.1:{port}"
    try:
        await wait_serving(target, process)
        result = await soak(target, process.pid, seconds=args.seconds, clients=args.clients, warmup_s=args.warmup)
    finally:
        process.terminate()
        process.wait(timeout=60)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "backend": args.backend,
        "load_after": round(os.getloadavg()[0], 2),
        **{k: v for k, v in asdict(result).items() if k != "samples"},
        **result.verdict(),
        "samples": result.samples,
    }


def markdown(report: dict[str, object]) -> str:
    samples = report["samples"]
    assert isinstance(samples, list)
    step = max(1, len(samples) // 12)
    lines = [
        f"# Inference memory under sustained load ({report['date']}, {report['machine']})",
        "",
        f"`make soak-memory` (benchmarks/memory_soak.py): backend **{report['backend']}**, shipped defaults, "
        f"{report['clients']} clients calling without pause for {report['seconds']} s; the first "
        f"{report['warmup_s']} s are the warm-up. RSS is the service process and its children."
        + (
            " The reserved KV memory counts in RSS as its pages are first written: RSS climbs by up to the reservation"
            " (torch: its slots; openvino: `openvino_kv_cache_gb`) during the first minutes of load, hence"
            " the long warm-up."
        ),
        "",
        "| calls | failed | output tokens | RSS first quarter MB | RSS last quarter MB | growth MB (allowed) |"
        " slope MB/min | peak RSS MB | flat |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {report['calls']} | {report['failed']} | {report['output_tokens']} | {report['rss_first_quarter_mb']} | "
        f"{report['rss_last_quarter_mb']} | {report['growth_mb']} ({report['allowed_mb']}) | "
        f"{report['slope_mb_per_min']} | {report['peak_rss_mb']} | {'yes' if report['flat'] else 'NO'} |",
        "",
        "RSS over time (every few samples):",
        "",
        "| s | RSS MB |",
        "|---|---|",
        *(f"| {t} | {rss} |" for t, rss in samples[::step]),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="torch", choices=("torch", "openvino", "auto"))
    parser.add_argument("--seconds", type=float, help="the whole soak; default 1200")
    parser.add_argument(
        "--warmup", type=float, help="left out of the verdict (the KV reservation paging in); default 480"
    )
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    openvino = args.backend == "openvino"
    args.warmup = args.warmup if args.warmup is not None else (480.0 if openvino else 120.0)
    args.seconds = args.seconds if args.seconds is not None else (1200.0 if openvino else 600.0)
    if args.seconds <= args.warmup:
        parser.error(f"--seconds {args.seconds} must be longer than --warmup {args.warmup}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    report = asyncio.run(run(args))
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"memory_soak_{args.backend}"
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (args.out / f"{name}.md").write_text(text)
    print(text)
    sys.exit(0 if report["flat"] else 1)


if __name__ == "__main__":
    main()
