"""Time of a trivial print(1) in the python tool's sandbox (p50/p95) and the hostile suite's table, as markdown.

Usage: python benchmarks/sandbox_bench.py [--runs 30] [--out docs/bench/sandbox.md]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.common.config import SandboxConfig
from services.tools.sandbox import BubblewrapSandbox
from tests.unit.sandbox_hostile import CANARY_ENV, HOSTILE_LIMITS, PROGRAMS, observed


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def bench(runs: int) -> str:
    sandbox = BubblewrapSandbox(SandboxConfig())
    probe = sandbox.probe()
    if not probe.ok:
        raise SystemExit(f"no sandbox on this host: {probe.reason}")
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        result = await sandbox.run("print(1)")
        times.append((time.perf_counter() - started) * 1000)
        assert result.stdout == "1\n", result
    lines = [
        "# Sandbox (python tool) benchmark",
        "",
        f"Host: {platform.platform()}, {os.cpu_count()} CPUs; bubblewrap + /usr/bin/python3 -I -S; "
        f"`python benchmarks/sandbox_bench.py --runs {runs}`.",
        "",
        "| program | runs | p50 ms | p95 ms | min ms | max ms |",
        "|---|---|---|---|---|---|",
        f"| `print(1)` | {runs} | {statistics.median(times):.1f} | {percentile(times, 0.95):.1f} | "
        f"{min(times):.1f} | {max(times):.1f} |",
        "",
        "## Hostile suite",
        "",
        f"Limits: {HOSTILE_LIMITS.model_dump()}. A canary secret is planted in the service's environment.",
        "",
        "| # | program | expected containment | observed | contained |",
        "|---|---|---|---|---|",
    ]
    canary = "canary-bench-secret"
    os.environ[CANARY_ENV] = canary
    stdin = json.dumps({"canary": canary, "service_pid": os.getpid(), "tools_port": 50052})
    hostile = BubblewrapSandbox(HOSTILE_LIMITS)
    contained = 0
    for index, program in enumerate(PROGRAMS, 1):
        result = await hostile.run(program.code, stdin)
        ok = program.contained(result)
        contained += ok
        lines.append(
            f"| {index} | {program.name} | {program.expected} | {observed(result)} | {'yes' if ok else 'NO'} |"
        )
    lines += ["", f"Contained: {contained}/{len(PROGRAMS)}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--out", type=Path, help="also write the markdown here")
    args = parser.parse_args()
    report = asyncio.run(bench(args.runs))
    print(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
