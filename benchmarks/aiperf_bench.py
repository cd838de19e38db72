"""aiperf (NVIDIA's load generator for OpenAI-compatible servers) against the edge's /v1/chat/completions, streaming.

The inference service (the default model, --threads torch threads) and the edge run as real processes (`meshpilot
serve inference`, `meshpilot serve edge`) on free ports. aiperf runs from its own virtualenv (its pins clash with
ours; `make bench-aiperf` creates it) once per --concurrency, --requests requests each after --warmup warm-up
requests, with synthetic prompts of --input-tokens and --output-tokens output tokens; its tokenizer is the model's
own, written from the GGUF file into a temporary directory (no model hub). aiperf's figures (TTFT, inter-token
latency, output token throughput, request latency) are read from its JSON export.

Writes docs/bench/aiperf.md (--out); prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
# aiperf's metric tags and how the table names them.
METRICS = (
    ("time_to_first_token", "TTFT (ms)"),
    ("inter_token_latency", "ITL (ms)"),
    ("request_latency", "request latency (ms)"),
    ("output_token_throughput_per_user", "output tok/s per request"),
)
THROUGHPUT = (("output_token_throughput", "output tok/s"), ("request_throughput", "requests/s"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_tokenizer(directory: Path) -> Path:
    """The default model's tokenizer as a HF directory (aiperf counts tokens with it)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from inference_core.model_loading import default_model_path

    gguf = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    tokenizer.save_pretrained(directory)
    return directory


def wait_healthy(url: str, process: subprocess.Popen[bytes], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"a service exited with {process.returncode}; see its log")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} did not answer within {timeout:g}s")


def start_mesh(work: Path, threads: int) -> tuple[list[subprocess.Popen[bytes]], str]:
    """Inference and edge as processes; the edge's URL once a completion goes through."""
    edge_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHPILOT_")}
    env.update(
        {
            "MESHPILOT_DATA_DIR": str(work / "data"),
            "MESHPILOT_INFERENCE__SERVER__PORT": str(free_port()),
            "MESHPILOT_INFERENCE__THREADS": str(threads),
            "MESHPILOT_EDGE__PORT": str(edge_port),
        }
    )
    processes = []
    for name in ("inference", "edge"):
        log = (work / f"{name}.log").open("ab")
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "meshpilot", "serve", name], cwd=ROOT, env=env, stdout=log, stderr=log
            )
        )
    url = f"http://127.0.0.1:{edge_port}"
    wait_healthy(f"{url}/healthz", processes[1])
    # /healthz answers before the model has loaded: wait for the inference service to list it.
    wait_healthy(f"{url}/v1/models", processes[0])
    return processes, url


def run_aiperf(
    aiperf: str, url: str, tokenizer: Path, concurrency: int, args: argparse.Namespace, out: Path
) -> dict[str, Any]:
    command = [
        aiperf, "profile",
        "--model", MODEL, "--url", url, "--endpoint-type", "chat", "--streaming",
        "--tokenizer", str(tokenizer),
        "--concurrency", str(concurrency),
        "--request-count", str(args.requests),
        "--prompt-input-tokens-mean", str(args.input_tokens), "--prompt-input-tokens-stddev", "0",
        "--prompt-output-tokens-mean", str(args.output_tokens), "--prompt-output-tokens-stddev", "0",
        "--extra-inputs", "ignore_eos:true", "--extra-inputs", "temperature:0",
        *(["--warmup-request-count", str(args.warmup)] if args.warmup else []),
        "--random-seed", "7",
        # Token counts from the responses' usage (stream_options.include_usage), the model's own count.
        "--use-server-token-count",
        "--output-artifact-dir", str(out),
        "--no-auto-plot",
        "--ui-type", "none",
    ]  # fmt: skip
    print("$", " ".join(command), flush=True)
    started = time.monotonic()
    # aiperf's offline mode looks a tokenizer up in the hub cache only, never at a local path; online, a local path
    # is read as it is (nothing is fetched).
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["COLUMNS"] = "150"  # aiperf's table as wide as its metric names need
    done = subprocess.run(command, cwd=out.parent, env=env, capture_output=True, text=True, check=False)
    print(done.stdout[-20_000:], done.stderr[-5_000:], sep="\n", flush=True)
    if done.returncode != 0:
        raise SystemExit(f"aiperf exited with {done.returncode}; its log is under {out}/logs")
    exports = sorted(out.rglob("profile_export_aiperf.json"))
    if not exports:
        raise SystemExit(f"aiperf wrote no profile_export_aiperf.json under {out}")
    result: dict[str, Any] = json.loads(exports[-1].read_text())
    result["_wall_s"] = time.monotonic() - started
    result["_table"] = printed_table(done.stdout)
    return result


def printed_table(stdout: str) -> str:
    """aiperf's main metrics table as it printed it (the "NVIDIA AIPerf | LLM Metrics" box)."""
    lines = stdout.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "NVIDIA AIPerf | LLM Metrics"), None)
    if start is None:
        return ""
    end = next((i for i in range(start, len(lines)) if lines[i].lstrip().startswith("└")), len(lines) - 1)
    return "\n".join(line.rstrip() for line in lines[start : end + 1])


def metric(result: dict[str, Any], tag: str) -> dict[str, Any]:
    """aiperf's record of one metric (avg, p50, p90, p99, ...), wherever this version keeps it."""
    for container in (result, result.get("records", {}), result.get("metrics", {})):
        if isinstance(container, dict) and isinstance(container.get(tag), dict):
            return dict(container[tag])
    return {}


def fmt(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, int | float) else "-"


def report(results: dict[int, dict[str, Any]], args: argparse.Namespace, load: list[tuple[float, ...]]) -> str:
    lines = [
        "# aiperf against the edge's OpenAI API",
        "",
        f"`make bench-aiperf` ({' '.join(sys.argv[1:]) or 'defaults'}): aiperf {args.aiperf_version} drives "
        f"`POST /v1/chat/completions` (stream: true) of the edge, which calls the inference service (SmolLM2-135M, "
        f"torch on CPU, {args.threads} torch thread(s)); both are real processes on this machine. Synthetic prompts "
        f"of {args.input_tokens} tokens, {args.output_tokens} output tokens (ignore_eos, temperature 0), "
        f"{args.requests} requests per concurrency after {args.warmup} warm-up requests.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()} {platform.release()}; "
        "**shared with five other engineers' work while measured**: load average "
        + ", ".join(f"{a:.1f}" for a, *_ in load)
        + " (1-minute, at each run's start and at the end), so absolute figures are indicative, not a capacity "
        "statement.",
        "",
        "| concurrency | "
        + " | ".join(f"{name} p50 / p90 / p99 (avg)" for _, name in METRICS)
        + " | "
        + " | ".join(name for _, name in THROUGHPUT)
        + " | output tokens (avg) | requests ok |",
        "|---" * (3 + len(METRICS) + len(THROUGHPUT)) + "|",
    ]
    for concurrency, result in results.items():
        cells = [str(concurrency)]
        for tag, _ in METRICS:
            m = metric(result, tag)
            cells.append(f"{fmt(m.get('p50'))} / {fmt(m.get('p90'))} / {fmt(m.get('p99'))} ({fmt(m.get('avg'))})")
        for tag, _ in THROUGHPUT:
            cells.append(fmt(metric(result, tag).get("avg")))
        cells.append(fmt(metric(result, "output_sequence_length").get("avg")))
        cells.append(fmt(metric(result, "request_count").get("avg")).removesuffix(".0"))
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "TTFT is from aiperf sending the request to the first content chunk: the edge answers only once the "
        "inference service has the first token (a refused request is then a 4xx, not a broken stream). ITL is "
        "between content chunks, per output token (the counts are the server's usage). The edge has no ignore_eos "
        "(aiperf sends it; it is ignored), so a reply may end before the requested length at the model's end of "
        "sequence: the output tokens column says how long replies were.",
    ]
    for concurrency, result in results.items():
        if result.get("_table"):
            lines += ["", f"### What aiperf printed, concurrency {concurrency}", "", "```", result["_table"], "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--aiperf", default=str(ROOT / ".venv-aiperf" / "bin" / "aiperf"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--requests", type=int, default=24, help="measured requests per concurrency")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--input-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the inference service")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "aiperf.md")
    args = parser.parse_args()
    version = subprocess.run([args.aiperf, "--version"], capture_output=True, text=True, check=False)
    args.aiperf_version = (version.stdout.strip().split() or ["?"])[-1]
    with tempfile.TemporaryDirectory(prefix="aiperf-bench-") as tmp:
        work = Path(tmp)
        tokenizer = write_tokenizer(work / "tokenizer")
        processes, url = start_mesh(work, args.threads)
        results: dict[int, dict[str, Any]] = {}
        load: list[tuple[float, ...]] = []
        try:
            for concurrency in args.concurrency:
                load.append(os.getloadavg())
                results[concurrency] = run_aiperf(
                    args.aiperf, url, tokenizer, concurrency, args, work / f"aiperf-c{concurrency}"
                )
            load.append(os.getloadavg())
        finally:
            for process in reversed(processes):
                process.send_signal(signal.SIGTERM)
            for process in processes:
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
        text = report(results, args, load)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
