"""Mutual TLS through real processes: the four services run with tls.enabled and the certificates of `meshpilot certs
init`; one task goes through planner, inference, tools and knowledge, while plaintext calls and callers of the wrong
identity are refused."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from meshpilot.cli.certs import issue_mesh_certificates
from meshpilot.inference.v1 import inference_pb2, inference_pb2_grpc
from meshpilot.knowledge.v1 import knowledge_pb2, knowledge_pb2_grpc
from meshpilot.planner.v1 import planner_pb2, planner_pb2_grpc
from services.common import create_channel, load_config
from services.common.tls import TlsIdentity, tls_identity
from tests.integration.processes import ServiceProcesses

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SERVICES = ("knowledge", "inference", "tools", "planner")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServiceProcesses, dict[str, TlsIdentity]]]:
    data_dir = tmp_path_factory.mktemp("tls-mesh")
    issue_mesh_certificates(data_dir / "certs")
    config = load_config(data_dir=str(data_dir), tls={"enabled": True})
    identities = {name: tls_identity(config, name) for name in (*SERVICES, "client")}
    client = identities["client"]
    assert client is not None
    processes = ServiceProcesses(
        data_dir, SERVICES, env={"MESHPILOT_TLS__ENABLED": "true"}, credentials=client.channel_credentials()
    )
    try:
        processes.start_all()
        yield processes, {name: identity for name, identity in identities.items() if identity is not None}
    finally:
        processes.stop_all()


async def _code(call) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def test_a_task_runs_through_the_mesh_over_mutual_tls_and_strangers_are_refused(mesh) -> None:
    processes, identities = mesh
    async with create_channel(processes.target("planner"), tls=identities["client"]) as channel:
        request = planner_pb2.RunRequest(task="What is the capital of France?")
        events = [event async for event in planner_pb2_grpc.PlannerServiceStub(channel).Run(request, timeout=300)]
    tools = [event.tool_call.tool for event in events if event.HasField("tool_call")]
    results = [event.tool_result for event in events if event.HasField("tool_result")]
    assert events[-1].HasField("final_answer"), events[-1]
    assert "Paris" in events[-1].final_answer.answer
    # country_facts: the tools service called knowledge with its own certificate.
    assert "country_facts" in tools and not any(result.HasField("error") for result in results), events

    models = inference_pb2.ListModelsRequest()
    async with create_channel(processes.target("inference")) as plaintext:
        assert await _code(inference_pb2_grpc.InferenceServiceStub(plaintext).ListModels(models, timeout=10)) == (
            grpc.StatusCode.UNAVAILABLE
        )
    async with create_channel(processes.target("inference"), tls=identities["tools"], server="inference") as wrong:
        assert await _code(inference_pb2_grpc.InferenceServiceStub(wrong).ListModels(models, timeout=10)) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
    lookup = knowledge_pb2.LookupEntitiesRequest(label="France")
    async with create_channel(processes.target("knowledge"), tls=identities["planner"], server="knowledge") as wrong:
        assert await _code(knowledge_pb2_grpc.KnowledgeServiceStub(wrong).LookupEntities(lookup, timeout=10)) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
