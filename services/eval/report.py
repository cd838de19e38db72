"""Evaluation reports: completion rate, valid-tool-call rate, steps, tokens and latency per category, for one agent or
several side by side, as JSON, a markdown table and a PNG chart."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from services.eval.runner import ResultLine

OVERALL = "overall"


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by nearest rank; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


@dataclass(frozen=True)
class Metrics:
    """The figures of a set of tasks. ``valid_tool_call_rate``: the share of tool calls the tools service ran
    (a known tool, arguments its schema accepts, no failure); 1.0 when no call was made."""

    tasks: int
    completed: int
    completion_rate: float
    tool_calls: int
    valid_tool_call_rate: float
    mean_steps: float
    mean_tokens: float
    latency_p50_s: float
    latency_p95_s: float
    errors: int

    @classmethod
    def of(cls, results: list[ResultLine]) -> Metrics:
        n = len(results)
        calls = sum(r.tool_calls for r in results)
        latencies = [r.latency_s for r in results]
        return cls(
            tasks=n,
            completed=sum(r.passed for r in results),
            completion_rate=round(sum(r.passed for r in results) / n, 4) if n else 0.0,
            tool_calls=calls,
            valid_tool_call_rate=round(sum(r.valid_tool_calls for r in results) / calls, 4) if calls else 1.0,
            mean_steps=round(sum(r.steps for r in results) / n, 2) if n else 0.0,
            mean_tokens=round(sum(r.total_tokens for r in results) / n, 1) if n else 0.0,
            latency_p50_s=round(percentile(latencies, 50), 3),
            latency_p95_s=round(percentile(latencies, 95), 3),
            errors=sum(bool(r.error) for r in results),
        )


@dataclass(frozen=True)
class Report:
    """One agent's figures on one suite: overall and per category (sorted by name)."""

    suite: str
    agent: str
    overall: Metrics
    categories: Mapping[str, Metrics]

    def to_json(self) -> dict[str, Any]:
        return {
            "suite": self.suite,
            "agent": self.agent,
            OVERALL: asdict(self.overall),
            "categories": {name: asdict(m) for name, m in self.categories.items()},
        }


def summarize(suite: str, agent: str, results: Iterable[ResultLine]) -> Report:
    chosen = list(results)
    by_category: dict[str, list[ResultLine]] = {}
    for result in chosen:
        by_category.setdefault(result.category, []).append(result)
    categories = {name: Metrics.of(by_category[name]) for name in sorted(by_category)}
    return Report(suite, agent, Metrics.of(chosen), categories)


def _percent(value: float) -> str:
    return f"{value * 100:.0f}%"


def by_suite(reports: Iterable[Report]) -> dict[str, list[Report]]:
    """The reports grouped by suite, suites in the order they first come."""
    groups: dict[str, list[Report]] = {}
    for report in reports:
        groups.setdefault(report.suite, []).append(report)
    return groups


def render_markdown(reports: list[Report]) -> str:
    """A table per suite: one row per category (and overall), one column group per agent, side by side."""
    if not reports:
        return "No results.\n"
    return "\n".join(_table(suite, chosen) for suite, chosen in by_suite(reports).items())


def _table(suite: str, reports: list[Report]) -> str:
    agents = [r.agent or "default" for r in reports]
    rows = [OVERALL, *sorted({name for r in reports for name in r.categories})]
    lines = [f"Suite `{suite}`", ""]
    header = ["category", "tasks", *(f"{a}: completed" for a in agents), *(f"{a}: valid calls" for a in agents)]
    header += [*(f"{a}: steps" for a in agents), *(f"{a}: tokens" for a in agents)]
    header += [*(f"{a}: p50 / p95 s" for a in agents)]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        metrics = [r.overall if row == OVERALL else r.categories.get(row) for r in reports]
        tasks = max((m.tasks for m in metrics if m is not None), default=0)
        cells = [f"**{row}**" if row == OVERALL else row, str(tasks)]
        cells += [f"{_percent(m.completion_rate)} ({m.completed}/{m.tasks})" if m else "–" for m in metrics]
        cells += [_percent(m.valid_tool_call_rate) if m else "–" for m in metrics]
        cells += [f"{m.mean_steps:.2f}" if m else "–" for m in metrics]
        cells += [f"{m.mean_tokens:.0f}" if m else "–" for m in metrics]
        cells += [f"{m.latency_p50_s:.2f} / {m.latency_p95_s:.2f}" if m else "–" for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_chart(reports: list[Report], path: Path) -> None:
    """A PNG bar chart of the completion rate per category, one bar per agent; one panel per suite."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a server; the chart is only written to a file
    from matplotlib import pyplot

    groups = by_suite(reports) or {"": []}
    widest = max(len({name for r in chosen for name in r.categories}) + 1 for chosen in groups.values())
    figure, panels = pyplot.subplots(
        len(groups), 1, figsize=(max(6.0, 1.1 * widest + 2), 4.5 * len(groups)), squeeze=False
    )
    for axes, (suite, chosen) in zip(panels[:, 0], groups.items(), strict=True):
        rows = [OVERALL, *sorted({name for r in chosen for name in r.categories})]
        width = 0.8 / max(1, len(chosen))
        for index, report in enumerate(chosen):
            values = [
                (report.overall if row == OVERALL else report.categories.get(row, Metrics.of([]))).completion_rate * 100
                for row in rows
            ]
            positions = [i + (index - (len(chosen) - 1) / 2) * width for i in range(len(rows))]
            axes.bar(positions, values, width, label=report.agent or "default")
        axes.set_xticks(range(len(rows)), rows, rotation=30, ha="right")
        axes.set_ylabel("tasks completed (%)")
        axes.set_ylim(0, 100)
        axes.set_title(f"{suite}: task completion by category")
        if chosen:
            axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def write_reports(reports: list[Report], folder: Path, stem: str = "report") -> dict[str, Path]:
    """``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` in ``folder``; their paths by format."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / f"{stem}.json", "markdown": folder / f"{stem}.md", "chart": folder / f"{stem}.png"}
    paths["json"].write_text(
        json.dumps([r.to_json() for r in reports], indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    paths["markdown"].write_text(render_markdown(reports), encoding="utf-8")
    render_chart(reports, paths["chart"])
    return paths
