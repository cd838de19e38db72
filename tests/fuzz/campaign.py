"""One fuzz campaign over a running mesh: every method of every service, a budget each, then health and memory."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from a2a.types import a2a_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from meshpilot.planner.v1 import planner_pb2, planner_pb2_grpc
from tests.fuzz.fuzzer import MethodReport, discover_services, fuzz_method, methods_of
from tests.fuzz.mesh import health_statuses, host_of


@dataclass
class Campaign:
    """What a campaign found: a report per method and each service's health afterwards."""

    reports: list[MethodReport] = field(default_factory=list)
    health: dict[str, str] = field(default_factory=dict)

    @property
    def violations(self) -> list[str]:
        return [str(v) for r in self.reports for v in r.violations]

    def codes(self) -> dict[str, int]:
        seen: dict[str, int] = {}
        for report in self.reports:
            for code, count in report.codes.items():
                seen[code] = seen.get(code, 0) + count
        return dict(sorted(seen.items()))


async def seed_hints(channel: grpc.aio.Channel, hints: dict[str, Sequence[Any]]) -> None:
    """Runs one real task so that fuzzed requests can aim at a run and a session that exist."""
    stub = planner_pb2_grpc.PlannerServiceStub(channel)
    async for event in stub.Run(planner_pb2.RunRequest(task="What is the capital of France?"), timeout=120):
        run_id, session_id = event.run_id, event.session_id
    hints["run_id"] = [*hints.get("run_id", []), run_id]
    hints["session_id"] = [*hints.get("session_id", []), session_id]


async def run_campaign(
    channels: Mapping[str, grpc.aio.Channel],
    *,
    budget: int,
    seed: int,
    hints: dict[str, Sequence[Any]],
    timeout: float = 15.0,
    progress: Any = None,
) -> Campaign:
    """Fuzzes every method of every meshpilot service (and the A2A binding, the stock health and reflection services) with ``budget``
    calls each, on the channel of the service that hosts it; then asks each service for its health."""
    campaign = Campaign()
    await seed_hints(channels["planner"], hints)
    for service in discover_services([health_pb2, reflection_pb2, a2a_pb2]):
        channel = channels[host_of(service.full_name)]
        for method in methods_of(service):
            report = await fuzz_method(channel, method, budget=budget, seed=seed, hints=hints, timeout=timeout)
            campaign.reports.append(report)
            if progress is not None:
                progress(report)
    campaign.health = await health_statuses(channels)
    return campaign
