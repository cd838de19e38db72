"""Fair share between tenants on the inference service: does a flooding tenant leave another tenant's TTFT alone?

Tenant "steady" runs a modest load (2 clients, one short chat call after another, 32 output tokens). Tenant "flood"
runs 12x as many clients (24) with longer generations (128 tokens) and retries 0.25 s after a RESOURCE_EXHAUSTED. Both
name their tenant in x-meshpilot-tenant metadata, as the planner does. The inference service runs as a real process
(`meshpilot serve inference`, the default model) once with `inference.fair_share: true` and once with false; each
run alternates windows of steady alone and steady under the flood (alone first in even rounds, flood first in odd
ones), so a change in the machine's background load hits both. Steady's TTFT is measured by the client (send to first token) and by the engine (arrival to first token, from the
call's timings); a steady call still without its first token after --steady-timeout seconds is cancelled and counts
as longer than that.

Writes docs/bench/fair_share.md; prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from inference_bench import pct, wait_ready  # benchmarks/ is the script's directory

from meshpilot.inference.v1 import inference_pb2, inference_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
TENANT_METADATA = "x-meshpilot-tenant"
STEADY, FLOOD = "steady", "flood"
QUESTIONS = ["capital of France", "currency of Japan", "largest city of Brazil", "region of Kenya", "language of Peru"]
RETRY_AFTER_S = 0.25
QUANTILES = ("p50", "p90", "p99")
MODEL_LABEL = 'model="smollm2-135m-instruct"'
STEPS = f"meshpilot_engine_steps_total{{{MODEL_LABEL}}}"


@dataclass
class Tally:
    """What one tenant's clients saw in one window."""

    ttfts_s: list[float] = field(default_factory=list)
    engine_ttfts_s: list[float] = field(default_factory=list)
    calls: int = 0
    tokens: int = 0
    refused: int = 0
    engine_steps: float = 0.0
    seconds: float = 0.0


def steady_request(index: int, max_tokens: int) -> inference_pb2.GenerateRequest:
    request = inference_pb2.GenerateRequest(max_tokens=max_tokens)
    question = f"In one sentence, what is the {QUESTIONS[index % len(QUESTIONS)]}? (question {index})"
    request.chat.messages.append(inference_pb2.ChatMessage(role="user", content=question))
    request.sampling.temperature = 0.0
    return request


def flood_request(index: int, max_tokens: int) -> inference_pb2.GenerateRequest:
    request = inference_pb2.GenerateRequest(max_tokens=max_tokens)
    story = f"Write a long story about a lighthouse keeper and a storm, chapter {index}."
    request.chat.messages.append(inference_pb2.ChatMessage(role="user", content=story))
    request.sampling.temperature = 0.0
    return request


async def call(
    stub: inference_pb2_grpc.InferenceServiceStub,
    request: inference_pb2.GenerateRequest,
    tenant: str,
    tally: Tally,
    first_token_timeout: float | None = None,
) -> None:
    began = time.perf_counter()
    first = None
    stream = stub.Generate(request, metadata=((TENANT_METADATA, tenant),))
    try:
        async with asyncio.timeout(first_token_timeout) as timeout:
            async for response in stream:
                if response.token_ids and first is None:
                    first = time.perf_counter()
                    timeout.reschedule(None)
                tally.tokens += len(response.token_ids)
                if response.HasField("timings"):
                    tally.engine_ttfts_s.append(response.timings.time_to_first_token_ms / 1000)
    except TimeoutError:
        stream.cancel()
        tally.ttfts_s.append(math.inf)
        tally.engine_ttfts_s.append(math.inf)
        return
    except grpc.aio.AioRpcError as e:
        if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise
        tally.refused += 1
        await asyncio.sleep(RETRY_AFTER_S)
        return
    tally.calls += 1
    if first is not None:
        tally.ttfts_s.append(first - began)


async def steady_window(stub, args: argparse.Namespace, seconds: float, start_index: int) -> Tally:
    """Steady's clients, each calling one call after another until ``seconds`` have passed (the last one finishes)."""
    tally = Tally()
    deadline = time.monotonic() + seconds

    async def client(number: int) -> None:
        index = start_index + number
        while time.monotonic() < deadline:
            await call(stub, steady_request(index, args.steady_tokens), STEADY, tally, args.steady_timeout)
            index += args.steady_clients

    await asyncio.gather(*(client(n) for n in range(args.steady_clients)))
    return tally


async def measured_window(stub, args: argparse.Namespace, metrics_url: str, start_index: int) -> tuple[Tally, dict]:
    """A steady window, with the engine steps taken meanwhile; also the metrics at its end."""
    before = await asyncio.to_thread(scrape, metrics_url)
    began = time.perf_counter()
    tally = await steady_window(stub, args, args.window, start_index)
    tally.seconds = time.perf_counter() - began
    after = await asyncio.to_thread(scrape, metrics_url)
    tally.engine_steps = after.get(STEPS, 0.0) - before.get(STEPS, 0.0)
    return tally, after


class Flood:
    """The flooding tenant's clients, running until ``stop``."""

    def __init__(self, stub, args: argparse.Namespace) -> None:
        self.tally = Tally()
        self._stub = stub
        self._args = args
        self._tasks: list[asyncio.Task] = []
        self._began = self._ended = 0.0

    async def _client(self, number: int) -> None:
        index = number
        while True:
            await call(self._stub, flood_request(index, self._args.flood_tokens), FLOOD, self.tally)
            index += self._args.flood_clients

    def start(self) -> None:
        self._began = time.perf_counter()
        self._tasks = [asyncio.create_task(self._client(n)) for n in range(self._args.flood_clients)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._ended = time.perf_counter()

    @property
    def seconds(self) -> float:
        return self._ended - self._began


def scrape(metrics_url: str) -> dict[str, float]:
    """Engine and inference samples, keyed by name and labels as exposed."""
    body = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    values = {}
    for line in body.splitlines():
        match = re.match(r"^(meshpilot_(?:engine|inference)_[a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)$", line)
        if match:
            values[match.group(1)] = float(match.group(2))
    return values


def tenant_seen(values: dict[str, float], tenant: str) -> bool:
    return any(f'tenant="{tenant}"' in key and value > 0 for key, value in values.items())


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(args: argparse.Namespace, fair: bool) -> dict:
    port = args.port
    target = f"127.0.0.1:{port}"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "MESHPILOT_INFERENCE__SERVER__PORT": str(port),
        "MESHPILOT_INFERENCE__SERVER__METRICS_PORT": str(port + 1000),
        "MESHPILOT_INFERENCE__MAX_SEQ_LEN": "1024",
        "MESHPILOT_INFERENCE__FAIR_SHARE": "true" if fair else "false",
    }
    with tempfile.TemporaryFile() as log:
        service = subprocess.Popen(
            [sys.executable, "-m", "meshpilot", "serve", "inference"], cwd=ROOT, env=env, stdout=log, stderr=log
        )
        try:
            await wait_ready(target)
            metrics_url = f"http://127.0.0.1:{port + 1000}/metrics"
            alone, flooded, flood_tallies, loads, flood_seconds = Tally(), Tally(), Tally(), [], 0.0
            tenants_reached_engine = False
            cpu_before = cpu_seconds(service.pid)
            own_cpu_before = own_cpu_seconds()
            async with grpc.aio.insecure_channel(target) as channel:
                stub = inference_pb2_grpc.InferenceServiceStub(channel)
                await steady_window(stub, args, 2, 10_000)  # warm-up
                for round_ in range(args.rounds):
                    loads.append(os.getloadavg()[0])
                    # Odd rounds measure under the flood first, so a drift in the machine's load hits both alike.
                    for flooded_now in (False, True) if round_ % 2 == 0 else (True, False):
                        start_index = 100 * round_ + 50 * flooded_now
                        if not flooded_now:
                            merge(alone, (await measured_window(stub, args, metrics_url, start_index))[0])
                            continue
                        flood = Flood(stub, args)
                        flood.start()
                        await asyncio.sleep(args.ramp)
                        window, values = await measured_window(stub, args, metrics_url, start_index)
                        tenants_reached_engine |= tenant_seen(values, FLOOD)
                        await flood.stop()
                        merge(flooded, window)
                        merge(flood_tallies, flood.tally)
                        flood_seconds += flood.seconds
                        await asyncio.sleep(1)  # the flood's aborted calls leave the engine
                loads.append(os.getloadavg()[0])
            values = await asyncio.to_thread(scrape, metrics_url)
            service_cpu = cpu_seconds(service.pid) - cpu_before
            own_cpu = own_cpu_seconds() - own_cpu_before
        finally:
            service.terminate()
            service.wait(timeout=60)
            if service.returncode not in (0, -15):
                log.seek(0)
                sys.stderr.write(log.read().decode(errors="replace")[-4000:])
    return {
        "fair_share": fair,
        "alone": summary(alone),
        "flood": summary(flooded),
        "flood_tenant": {
            "calls": flood_tallies.calls,
            "refused": flood_tallies.refused,
            "tokens_per_s": round(flood_tallies.tokens / flood_seconds, 1) if flood_seconds else 0.0,
        },
        "preemptions": int(values.get(f"meshpilot_engine_preemptions_total{{{MODEL_LABEL}}}", 0)),
        "tenants_reached_engine": tenants_reached_engine,
        "load_1min": [round(load, 2) for load in loads],
        "service_cpu_s": round(service_cpu, 1),
        "clients_cpu_s": round(own_cpu, 1),
    }


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def merge(into: Tally, other: Tally) -> None:
    into.ttfts_s += other.ttfts_s
    into.engine_ttfts_s += other.engine_ttfts_s
    into.calls += other.calls
    into.tokens += other.tokens
    into.refused += other.refused
    into.engine_steps += other.engine_steps
    into.seconds += other.seconds


def summary(tally: Tally) -> dict:
    return {
        "calls": tally.calls,
        "refused": tally.refused,
        "timed_out": sum(1 for ttft in tally.ttfts_s if math.isinf(ttft)),
        **{f"ttft_{q}_ms": round(pct(tally.ttfts_s, int(q[1:])) * 1000, 1) for q in QUANTILES},
        **{f"engine_ttft_{q}_ms": round(pct(tally.engine_ttfts_s, int(q[1:])) * 1000, 1) for q in QUANTILES},
        "ttfts_ms": sorted(round(ttft * 1000) for ttft in tally.ttfts_s if not math.isinf(ttft)),
        "ms_per_step": round(tally.seconds * 1000 / tally.engine_steps, 1) if tally.engine_steps else 0.0,
    }


def pair(summary: dict, key: str, timeout_s: float) -> str:
    return " / ".join(
        f"> {timeout_s * 1000:.0f}" if math.isinf(summary[f"{key}_{q}_ms"]) else f"{summary[f'{key}_{q}_ms']:.0f}"
        for q in QUANTILES
    )


def ratios(run: dict, key: str, timeout_s: float) -> str:
    cells = []
    for q in QUANTILES:
        alone, flood = run["alone"][f"{key}_{q}_ms"], run["flood"][f"{key}_{q}_ms"]
        if not alone:
            cells.append("-")
        elif math.isinf(flood):
            cells.append(f"> {timeout_s * 1000 / alone:.0f}")
        else:
            cells.append(f"{flood / alone:.2f}")
    return " / ".join(cells)


def policy_name(run: dict) -> str:
    return "fair share" if run["fair_share"] else "first come, first served"


def markdown(runs: list[dict], args: argparse.Namespace) -> str:
    timeout = args.steady_timeout
    lines = [
        f"# Fair share between tenants ({time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()}, "
        f"{os.cpu_count()} cores shared with other work)",
        "",
        f"`make bench-fair-share` (benchmarks/fair_share_bench.py). Tenant *steady*: {args.steady_clients} clients, "
        f"short chat calls one after another, {args.steady_tokens} output tokens, greedy. Tenant *flood*: "
        f"{args.flood_clients} clients, {args.flood_tokens} output tokens, a retry {RETRY_AFTER_S} s after "
        f"RESOURCE_EXHAUSTED. Default model and batching (8 slots, queue 64, 16 per tenant). {args.rounds} rounds "
        f"per policy of {args.window:g} s steady alone and {args.window:g} s of steady under the flood (after a "
        f"{args.ramp:g} s ramp), alone first in even rounds and the flood first in odd ones. Client TTFT: from "
        f"sending the call to its first token; engine TTFT: from the engine's receipt to its first token (the call's "
        f"timings). A steady call without a first token after {timeout:g} s is cancelled and counts as longer.",
        "",
        "| policy | TTFT measured by | steady alone p50 / p90 / p99 (ms) | steady under flood p50 / p90 / p99 (ms) "
        "| ratio p50 / p90 / p99 |",
        "|---|---|---|---|---|",
    ]
    for run in runs:
        for key, where in (("ttft", "client"), ("engine_ttft", "engine")):
            lines.append(
                f"| {policy_name(run)} | {where} | {pair(run['alone'], key, timeout)} "
                f"| {pair(run['flood'], key, timeout)} | {ratios(run, key, timeout)} |"
            )
    lines += [
        "",
        "| policy | steady calls alone / under flood (timed out) | flood tokens/s | flood calls / refused "
        "| preemptions | ms per engine step alone / under flood | 1-min load at each round's start and the end "
        "| CPU s: service / clients |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        heavy = run["flood_tenant"]
        lines.append(
            f"| {policy_name(run)} | {run['alone']['calls']} / {run['flood']['calls']} ({run['flood']['timed_out']}) "
            f"| {heavy['tokens_per_s']} | {heavy['calls']} / {heavy['refused']} | {run['preemptions']} "
            f"| {run['alone']['ms_per_step']} / {run['flood']['ms_per_step']} "
            f"| {', '.join(map(str, run['load_1min']))} | {run['service_cpu_s']} / {run['clients_cpu_s']} |"
        )
    if not all(run["tenants_reached_engine"] for run in runs if run["fair_share"]):
        lines += [
            "",
            "**The engine never saw tenant 'flood'**: every call was served as tenant 'default', so both runs are "
            "first come, first served. TorchEngine must hand GenerationRequest.tenant to its Sequence.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steady-clients", type=int, default=2)
    parser.add_argument("--steady-tokens", type=int, default=32)
    parser.add_argument("--flood-clients", type=int, default=24)
    parser.add_argument("--flood-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--window", type=float, default=25.0, help="Seconds of each steady window.")
    parser.add_argument("--ramp", type=float, default=4.0, help="Seconds the flood runs before steady is measured.")
    parser.add_argument(
        "--steady-timeout", type=float, default=30.0, help="A steady call without a first token by then is cancelled."
    )
    parser.add_argument("--policies", default="fair,fifo", help="Which runs, in order: fair, fifo or both.")
    parser.add_argument("--port", type=int, default=50164)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "fair_share.md")
    parser.add_argument("--raw", type=Path, help="Also write every run's numbers, each TTFT too, as JSON here.")
    args = parser.parse_args()
    runs = [asyncio.run(measure(args, fair=policy == "fair")) for policy in args.policies.split(",")]
    report = markdown(runs, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    if args.raw:
        args.raw.write_text(json.dumps(runs, indent=1) + "\n")
    print(report)


if __name__ == "__main__":
    main()
