"""Does the guided policy's optional-argument rule (prompt.asked_arguments) help on BFCL simple? One constrained,
greedy call per task through the torch engine in-process, with the planner's own prompt and action schema, once with
every argument offered and once with only the optional arguments the task asks for; the call is judged as
`meshpilot eval` judges it. The model alone, without the mesh: it isolates the schema from everything else.

    python -m benchmarks.bfcl_arguments --split train --limit 60 [--model DIR] [--lean-prompt]
Writes docs/bench/bfcl_arguments.json (or --out)."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from inference_core import Constraint, GenerationRequest, SamplingParams
from inference_core.torch_engine import TorchEngine
from services.eval.bfcl import SOURCE, bfcl_agent_spec
from services.eval.checks import ToolCallRecord, Trajectory
from services.eval.suite import judge, load_suite
from services.planner.policies.guided import MAX_ARGUMENT_CHARS
from services.planner.prompt import action_schema, build_messages, tool_call_options
from services.planner.types import ToolSpec


async def run(args: argparse.Namespace) -> dict:
    tasks = [t for t in load_suite("bfcl-simple").tasks if t.split == args.split][: args.limit or None]
    engine = TorchEngine(args.model)
    await engine.start()
    results: dict = {"split": args.split, "tasks": len(tasks), "model": args.model or "default", "modes": {}}
    try:
        for mode in ("all", "asked"):
            passed, started = 0, time.perf_counter()
            for task in tasks:
                tool = task.meta["tool"]
                spec = ToolSpec(f"{SOURCE}.{tool['name']}", tool["description"], tool["input_schema"])
                messages = build_messages(
                    [spec],
                    [],
                    task.task,
                    [],
                    bfcl_agent_spec(task)["instructions"],
                    builtin_examples=not args.lean_prompt,
                )
                asked_in = task.task if mode == "asked" else None
                schema = action_schema(tool_call_options([spec], MAX_ARGUMENT_CHARS, asked_in=asked_in))
                request = GenerationRequest(
                    messages=messages, max_tokens=200, sampling=SamplingParams(temperature=0.0),
                    constraint=Constraint("json_schema", json.dumps(schema)),
                )  # fmt: skip
                text = "".join([chunk.text async for chunk in engine.generate(request)])
                try:
                    action = json.loads(text)
                except ValueError:
                    continue
                call = ToolCallRecord(str(action.get("tool", "")), action.get("arguments") or {})
                passed += judge(task, Trajectory(answer="", tool_calls=(call,))).passed
            seconds = round(time.perf_counter() - started, 1)
            results["modes"][mode] = {"passed": passed, "seconds": seconds}
            print(f"{mode}: {passed}/{len(tasks)} ({seconds} s)", flush=True)
    finally:
        await engine.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=("train", "test"), default="train")
    parser.add_argument("--limit", type=int, default=60, help="first N tasks of the split; 0: all")
    parser.add_argument("--model", default=None, help="HF directory; default: the packaged default model")
    parser.add_argument("--lean-prompt", action="store_true", help="no built-in examples (a --lean-prompt model)")
    parser.add_argument("--out", type=Path, default=Path("docs/bench/bfcl_arguments.json"))
    args = parser.parse_args()
    if args.limit < 0:
        parser.error("--limit must be >= 0 (0: all)")
    args.out.write_text(json.dumps(asyncio.run(run(args)), indent=1) + "\n")


if __name__ == "__main__":
    main()
