"""``make fuzz``: the fuzzer against the real services, started as ``meshpilot serve`` starts them (the real model
included), with a budget per method; prints calls per method and status codes, health and memory afterwards.

    python -m tests.fuzz --budget 200 [--seed N] [--out docs/bench/fuzz.md]

Exits 1 when a call broke a rule (UNKNOWN, INTERNAL, an unbounded message), a service is not SERVING afterwards
or a service's RSS grew by more than --max-rss-growth-mb.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from services.common import InferenceConfig, create_channel
from tests.fuzz.campaign import Campaign, run_campaign
from tests.fuzz.fuzzer import MAX_DETAILS_CHARS, MethodReport, table
from tests.fuzz.mesh import SERVICES, hints
from tests.integration.processes import ServiceProcesses

# Small step and token budgets, so that a fuzzed Run or Generate that is valid finishes in seconds on a CPU; every
# other setting is the default a user gets.
FUZZ_SETTINGS = {
    "MESHPILOT_PLANNER__MAX_STEPS": "2",
    "MESHPILOT_PLANNER__STEP_MAX_TOKENS": "32",
    "MESHPILOT_PLANNER__RUN_TIMEOUT_SECONDS": "30",
    "MESHPILOT_INFERENCE__DEFAULT_MAX_TOKENS": "32",
}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _campaign(mesh: ServiceProcesses, budget: int, seed: int, timeout: float) -> Campaign:
    channels = {name: create_channel(mesh.target(name)) for name in SERVICES}

    def progress(report: MethodReport) -> None:
        codes = ", ".join(f"{code} {n}" for code, n in sorted(report.codes.items()))
        print(f"  {report.method}: {report.calls} calls in {report.seconds:.0f}s ({codes})", flush=True)

    try:
        model_id = InferenceConfig().model_id
        return await run_campaign(
            channels, budget=budget, seed=seed, hints=hints(model_id), timeout=timeout, progress=progress
        )
    finally:
        for channel in channels.values():
            await channel.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=200, help="calls per method")
    parser.add_argument("--seed", type=int, default=None, help="seed of the request maker (default: random)")
    parser.add_argument("--timeout", type=float, default=15.0, help="deadline of each call, seconds")
    parser.add_argument("--max-rss-growth-mb", type=float, default=64.0)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as Markdown here")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1_000_000)

    with tempfile.TemporaryDirectory(prefix="meshpilot-fuzz-") as data_dir:
        mesh = ServiceProcesses(Path(data_dir), SERVICES, env=FUZZ_SETTINGS)
        print(f"starting {', '.join(SERVICES)} (logs in {data_dir}) ...", flush=True)
        try:
            mesh.start_all()
            before = {name: rss_mb(mesh.processes[name].pid) for name in SERVICES}
            started = time.monotonic()
            print(f"fuzzing every method with {args.budget} calls, seed {seed}", flush=True)
            campaign = asyncio.run(_campaign(mesh, args.budget, seed, args.timeout))
            after = {name: rss_mb(mesh.processes[name].pid) for name in SERVICES}
        finally:
            codes = mesh.stop_all()
        minutes = (time.monotonic() - started) / 60

    growth = {name: after[name] - before[name] for name in SERVICES}
    rss = "\n".join(f"| {name} | {before[name]:.0f} | {after[name]:.0f} | {growth[name]:+.0f} |" for name in SERVICES)
    report = "\n\n".join(
        [
            f"Seed {seed}, {args.budget} calls per method, {sum(r.calls for r in campaign.reports)} calls in "
            f"{minutes:.1f} min; each call's deadline {args.timeout:g} s.",
            table(campaign.reports),
            "Status codes seen: " + ", ".join(f"{code} {n}" for code, n in campaign.codes().items()),
            "Health afterwards: " + ", ".join(f"{name} {status}" for name, status in campaign.health.items()),
            "| service | RSS before (MB) | RSS after (MB) | growth |\n|---|---:|---:|---:|\n" + rss,
            f"Exit codes after SIGTERM: {codes}",
        ]
    )
    print(report)
    problems = list(campaign.violations)
    problems += [f"{name} is {status} after fuzzing" for name, status in campaign.health.items() if status != "SERVING"]
    problems += [f"{name}'s RSS grew by {mb:.0f} MB" for name, mb in growth.items() if mb > args.max_rss_growth_mb]
    for problem in problems:
        print("PROBLEM:", problem)
    if args.out is not None:
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        settings = ", ".join(f"{k}={v}" for k, v in FUZZ_SETTINGS.items())
        args.out.write_text(
            f"""# Fuzzing the mesh (`make fuzz`)

`make fuzz FUZZ_BUDGET=N` starts the four services as processes (`meshpilot serve`, the real model and store) and
sends N fuzzed requests to every method of every service found in the descriptors of `meshpilot/*/v1` (and to the
stock health and reflection services): plausible requests built from hints, one field set to a hostile value,
strings of 100 KB to 1 MB, NaN and ±Infinity in doubles and in Struct/Value, extreme integers and Durations, and
random, bit-flipped, truncated, over-nested or non-UTF-8 bytes sent as the raw request (`tests/fuzz/fuzzer.py`).
A call breaks a rule when it ends UNKNOWN or INTERNAL, or its message is over {MAX_DETAILS_CHARS} characters (a message
that copies input comes back as RESOURCE_EXHAUSTED about metadata size, which breaks the rule too); afterwards every
service must be SERVING and its RSS within {args.max_rss_growth_mb:g} MB of where it started. `make test` runs the same
fuzzer with 40 calls per method against the mesh in-process (`tests/fuzz/test_fuzz.py`).

Run {stamp}: `python -m tests.fuzz --budget {args.budget} --seed {seed}`, with small step and token budgets so that a
valid Run or Generate ends in seconds on a CPU ({settings}).

{report}

Rules broken: {len(problems)}.
"""
        )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
