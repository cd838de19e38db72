"""A2A over gRPC against a real mesh (inference with the default model, tools, planner as processes), driven by the
a2a-sdk's own client: a task streamed to completion, a stream broken mid-task and picked up with SubscribeToTask
without a gap or a repeat, and an approval answered with a message."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from a2a.client import Client, ClientConfig, ClientFactory
from a2a.client.transports.grpc import GrpcTransport
from a2a.types import a2a_pb2

from meshpilot.planner.v1 import agents_pb2, agents_pb2_grpc
from tests.integration.processes import ServiceProcesses

pytestmark = [pytest.mark.slow, pytest.mark.integration]

NOTES = agents_pb2.AgentSpec(
    instructions="You keep notebooks: you add the line the user gives, word for word, with the append_note tool.",
    tools=["append_note"],
    policy=agents_pb2.PolicySpec(name="guided"),
    sampling=agents_pb2.AgentSampling(step_max_tokens=512),
)
CAREFUL_NOTES = agents_pb2.AgentSpec()
CAREFUL_NOTES.CopyFrom(NOTES)
CAREFUL_NOTES.approval_required.append("append_note")
TIMEOUT = 300.0


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcesses]:
    """Inference (the default model), tools and planner as processes, with the agents "notes" and "careful-notes"
    (append_note, which the second runs only once approved)."""
    processes = ServiceProcesses(tmp_path_factory.mktemp("a2a"), ("inference", "tools", "planner"))
    try:
        processes.start_all()
        asyncio.run(_create_agents(processes.target("planner")))
        yield processes
    finally:
        processes.stop_all()


async def _create_agents(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        agents = agents_pb2_grpc.AgentServiceStub(channel)
        for name, spec in (("notes", NOTES), ("careful-notes", CAREFUL_NOTES)):
            await agents.CreateAgent(agents_pb2.CreateAgentRequest(name=name, spec=spec), timeout=30)


async def a2a_client(target: str) -> Client:
    """The a2a-sdk's client for the planner, from the card the planner serves (GetExtendedAgentCard)."""
    card = await GrpcTransport(grpc.aio.insecure_channel(target), None).get_extended_agent_card(
        a2a_pb2.GetExtendedAgentCardRequest()
    )
    config = ClientConfig(streaming=True, grpc_channel_factory=grpc.aio.insecure_channel)
    config.supported_protocol_bindings = ["GRPC"]
    return ClientFactory(config).create(card)


def message(text: str, *, agent: str = "", task_id: str = "") -> a2a_pb2.SendMessageRequest:
    request = a2a_pb2.SendMessageRequest(
        message=a2a_pb2.Message(
            message_id=uuid.uuid4().hex, role=a2a_pb2.ROLE_USER, parts=[a2a_pb2.Part(text=text)], task_id=task_id
        )
    )
    if agent:
        request.metadata.update({"agent": agent})
    return request


def sequences(responses: list[a2a_pb2.StreamResponse]) -> list[int]:
    """The journal sequences of a stream's updates, one per event (an answer's artifact shares its event's)."""
    return [int(r.status_update.metadata["sequence"]) for r in responses if r.HasField("status_update")]


def note_lines(data_dir: Path) -> list[str]:
    return [line for path in sorted((data_dir / "notes").glob("*.txt")) for line in path.read_text().splitlines()]


async def collect(stream: AsyncIterator[a2a_pb2.StreamResponse]) -> list[a2a_pb2.StreamResponse]:
    return [response async for response in stream]


async def test_a2a_sdk_client_streams_resubscribes_and_approves(mesh: ServiceProcesses) -> None:
    client = await a2a_client(mesh.target("planner"))
    try:
        card = await client.get_extended_agent_card(a2a_pb2.GetExtendedAgentCardRequest())
        assert {"default", "notes", "careful-notes"} <= {skill.id for skill in card.skills}

        # 1. One task streamed to completion.
        first = await asyncio.wait_for(
            collect(client.send_message(message("Add the line 'first entry' to the notebook.", agent="notes"))),
            TIMEOUT,
        )
        assert first[0].HasField("task")
        assert sequences(first) == list(range(1, len(sequences(first)) + 1))
        assert first[-1].status_update.status.state == a2a_pb2.TASK_STATE_COMPLETED, first[-1]
        assert any(r.HasField("artifact_update") for r in first)

        # 2. A stream broken after its first event, then SubscribeToTask: every event once, in order.
        stream = client.send_message(message("Add the line 'second entry' to the notebook.", agent="notes"))
        seen = [await anext(stream), await anext(stream)]
        await stream.aclose()  # the client goes away mid-task; the run goes on
        task_id = seen[0].task.id
        resubscribed = await asyncio.wait_for(
            collect(client.subscribe(a2a_pb2.SubscribeToTaskRequest(id=task_id))), TIMEOUT
        )
        snapshot = resubscribed[0].task
        assert snapshot.id == task_id and snapshot.status.state == a2a_pb2.TASK_STATE_WORKING
        before = sequences(seen)
        caught_up = [int(m.metadata["sequence"]) for m in snapshot.history[1:]]
        after = sequences(resubscribed[1:])
        assert caught_up[: len(before)] == before
        assert caught_up + after == list(range(1, len(caught_up) + len(after) + 1))
        assert resubscribed[-1].status_update.status.state == a2a_pb2.TASK_STATE_COMPLETED
        done = await client.get_task(a2a_pb2.GetTaskRequest(id=task_id))
        assert done.status.state == a2a_pb2.TASK_STATE_COMPLETED
        assert [int(m.metadata["sequence"]) for m in done.history] == list(range(0, caught_up[-1] + len(after) + 1))
        assert done.artifacts[0].parts[0].text

        # 3. An approval: the task waits as INPUT_REQUIRED and an approving message completes it.
        notes_before = len(note_lines(mesh.data_dir))
        waiting = await asyncio.wait_for(
            collect(client.send_message(message("Add the line 'third entry' to the notebook.", agent="careful-notes"))),
            TIMEOUT,
        )
        status = waiting[-1].status_update.status
        assert status.state == a2a_pb2.TASK_STATE_INPUT_REQUIRED, waiting[-1]
        assert "append_note" in status.message.parts[0].text
        assert len(note_lines(mesh.data_dir)) == notes_before
        approved = await asyncio.wait_for(
            collect(client.send_message(message("approve", task_id=waiting[0].task.id))), TIMEOUT
        )
        assert approved[-1].status_update.status.state == a2a_pb2.TASK_STATE_COMPLETED, approved[-1]
        assert len(note_lines(mesh.data_dir)) == notes_before + 1
    finally:
        await client.close()
