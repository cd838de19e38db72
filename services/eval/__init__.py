"""Evaluation of agents: suites of tasks with checks, run through the planner, judged, and reported."""

from services.eval.checks import (
    Check,
    CheckResult,
    Contains,
    Exact,
    Numeric,
    ToolCalled,
    ToolCallRecord,
    Trajectory,
    Unanswerable,
    parse_check,
)
from services.eval.report import Metrics, Report, render_chart, render_markdown, summarize, write_reports
from services.eval.runner import AgentRunner, PlannerRunner, ResultLine, RunUnavailable, evaluate, trajectory_of
from services.eval.suite import EvalTask, Suite, SuiteError, TaskOutcome, judge, load_suite, parse_suite, shipped_suites

__all__ = [
    "AgentRunner",
    "Check",
    "CheckResult",
    "Contains",
    "EvalTask",
    "Exact",
    "Metrics",
    "Numeric",
    "PlannerRunner",
    "Report",
    "ResultLine",
    "RunUnavailable",
    "Suite",
    "SuiteError",
    "TaskOutcome",
    "ToolCallRecord",
    "ToolCalled",
    "Trajectory",
    "Unanswerable",
    "evaluate",
    "judge",
    "load_suite",
    "parse_check",
    "parse_suite",
    "render_chart",
    "render_markdown",
    "shipped_suites",
    "summarize",
    "trajectory_of",
    "write_reports",
]
