"""The fuzzer over every method of every service of an in-process mesh (a small budget; ``make fuzz`` runs a large
one against real processes): no UNKNOWN, no INTERNAL, bounded messages, every service SERVING afterwards."""

from __future__ import annotations

import random
from pathlib import Path

import grpc
import pytest

from meshpilot.knowledge.v1 import knowledge_pb2
from meshpilot.planner.v1 import planner_pb2
from tests.fuzz.campaign import run_campaign
from tests.fuzz.fuzzer import (
    MAX_DETAILS_CHARS,
    Method,
    RequestMaker,
    call_raw,
    discover_services,
    methods_of,
    table,
    violation_of,
)
from tests.fuzz.mesh import SERVICES, InProcessMesh, hints, host_of

BUDGET = 40
SEED = 10


@pytest.mark.slow
async def test_every_method_survives_fuzzing(tmp_path: Path) -> None:
    async with InProcessMesh(tmp_path) as mesh:
        campaign = await run_campaign(mesh.channels, budget=BUDGET, seed=SEED, hints=hints("fake-model"))
    print(table(campaign.reports))
    assert not campaign.violations, "\n".join(campaign.violations)
    assert "UNKNOWN" not in campaign.codes() and "INTERNAL" not in campaign.codes()
    assert campaign.health == dict.fromkeys(SERVICES, "SERVING")
    assert {r.method for r in campaign.reports} >= {
        f"/{s.full_name}/{m.name}" for s in discover_services() for m in s.methods
    }
    assert all(r.calls == BUDGET for r in campaign.reports)
    assert campaign.codes()["OK"] > 0 and campaign.codes()["INVALID_ARGUMENT"] > 0, "some calls get through"


def test_every_service_of_the_protos_is_found_and_hosted() -> None:
    names = {service.full_name for service in discover_services()}
    assert {
        "meshpilot.knowledge.v1.KnowledgeService",
        "meshpilot.tools.v1.ToolsService",
        "meshpilot.inference.v1.InferenceService",
        "meshpilot.planner.v1.PlannerService",
        "meshpilot.planner.v1.AgentService",
    } <= names
    assert {host_of(name) for name in names} <= set(SERVICES)
    assert host_of("grpc.health.v1.Health") in SERVICES


def test_requests_are_reproducible_from_the_seed() -> None:
    method = next(m for s in discover_services() for m in methods_of(s) if m.name == "Run")

    def first(seed: int) -> list[bytes]:
        cases = RequestMaker(random.Random(seed), hints("m")).cases(method)
        return [next(cases).payload for _ in range(30)]

    assert first(1) == first(1)
    assert first(1) != first(2)


def test_the_maker_produces_every_kind_of_case_and_mostly_decodable_requests() -> None:
    method = next(m for s in discover_services() for m in methods_of(s) if m.name == "ApproveToolCall")
    maker = RequestMaker(random.Random(3), hints("m"))
    cases = [case for case, _ in zip(maker.cases(method), range(300), strict=False)]
    assert {case.kind for case in cases} == {"plausible", "field", "oversized", "non_finite", "bytes"}
    decoded = 0
    for case in cases:
        try:
            planner_pb2.ApproveToolCallRequest.FromString(case.payload)
            decoded += 1
        except Exception:
            assert case.kind == "bytes"
    assert decoded > 200
    assert any("JSON holding" in case.note for case in cases)
    assert max(len(case.payload) for case in cases) >= 100_000, "oversized strings are sent"


def test_a_duration_outside_the_apis_range_is_still_sent() -> None:
    fd = planner_pb2.RunBudget.DESCRIPTOR.fields_by_name["timeout"]
    maker = RequestMaker(random.Random(0))
    seconds = {maker.hostile_value(fd)[0].seconds for _ in range(200)}
    assert 2**63 - 1 in seconds and -(2**63) in seconds


@pytest.mark.parametrize(
    ("code", "details", "broken"),
    [
        (grpc.StatusCode.UNKNOWN, "Unexpected DecodeError", True),
        (grpc.StatusCode.INTERNAL, "incident 1", True),
        (grpc.StatusCode.NOT_FOUND, "x" * (MAX_DETAILS_CHARS + 1), True),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "received metadata size exceeds hard limit", True),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "grpc: received message larger than max", False),
        (grpc.StatusCode.INVALID_ARGUMENT, "label is empty", False),
        (grpc.StatusCode.OK, "", False),
    ],
)
def test_the_rules_a_call_can_break(code: grpc.StatusCode, details: str, broken: bool) -> None:
    assert (violation_of(code, details) is not None) == broken


async def test_raw_bytes_reach_the_server_as_they_are(tmp_path: Path) -> None:
    """call_raw sends bytes unserialized: a corrupt request reaches the handler's decoding, a valid one is served."""
    from services.common import KnowledgeConfig, MeshConfig, ServerConfig, create_channel
    from services.knowledge import create_server
    from tests.unit.test_knowledge_server import RecordingStore

    config = MeshConfig(data_dir=tmp_path, knowledge=KnowledgeConfig(server=ServerConfig(port=0, metrics=False)))
    store = RecordingStore()
    server = create_server(config, store)
    await server.start()
    method = Method(
        "meshpilot.knowledge.v1.KnowledgeService", "Query", knowledge_pb2.QueryRequest.DESCRIPTOR, False, False
    )
    try:
        async with create_channel(server.address) as channel:
            good = await call_raw(
                channel, method, knowledge_pb2.QueryRequest(sparql="ASK {}").SerializeToString(), timeout=5
            )
            bad = await call_raw(channel, method, b"\x0a\xff", timeout=5)
    finally:
        await server.stop(0)
    assert good == (grpc.StatusCode.OK, "")
    assert bad[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert store.calls == [("query", {"sparql": "ASK {}", "limit": None, "timeout": None})]
