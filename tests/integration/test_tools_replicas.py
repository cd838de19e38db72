"""Two tools replicas as real processes (`meshpilot serve tools`) on one PostgreSQL schema and nothing else shared: a
call key sent to both at once takes effect once, and a tool source registered on one is listed and callable on the
other (and gone from both once unregistered on either)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format

from meshpilot.tools.v1 import tools_pb2, tools_pb2_grpc
from tests.integration.processes import ServiceProcesses
from tests.postgres import fresh_schema, needs_postgres
from tests.unit.test_tools_sources import COUNTER_DOCUMENT, CounterHandler
from tests.unit.tools_fakes import eventually

pytestmark = [pytest.mark.slow, pytest.mark.integration, needs_postgres]

KEYS = 5
CALLS_PER_REPLICA = 3


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServiceProcesses, ServiceProcesses]]:
    """Tools replicas A and B, each with its own port and data directory (so its own notebooks), one schema."""
    with fresh_schema() as dsn:
        shared = {"MESHPILOT_TOOLS__DATABASE_URL": dsn}
        first = ServiceProcesses(tmp_path_factory.mktemp("tools-a"), ("tools",), shared)
        second = ServiceProcesses(tmp_path_factory.mktemp("tools-b"), ("tools",), shared)
        try:
            first.start_all(timeout=120)
            second.start_all(timeout=120)
            yield first, second
        finally:
            codes = [*second.stop_all().values(), *first.stop_all().values()]
            assert codes == [0, 0], f"SIGTERM exit codes {codes}; logs in {first.data_dir}, {second.data_dir}"


def note_lines(*replicas: ServiceProcesses) -> list[str]:
    lines: list[str] = []
    for replica in replicas:
        notebook = replica.data_dir / "notes" / "notes.txt"
        if notebook.exists():
            lines += notebook.read_text().splitlines()
    return lines


async def test_one_call_key_sent_to_both_replicas_at_once_takes_effect_once(replicas) -> None:
    first, second = replicas
    async with (
        grpc.aio.insecure_channel(first.target("tools")) as a,
        grpc.aio.insecure_channel(second.target("tools")) as b,
    ):
        stubs = [tools_pb2_grpc.ToolsServiceStub(a), tools_pb2_grpc.ToolsServiceStub(b)]

        async def call(stub: tools_pb2_grpc.ToolsServiceStub, key: int) -> tools_pb2.ExecuteToolResponse:
            request = tools_pb2.ExecuteToolRequest(call_id=f"c{key}", name="append_note", idempotency_key=f"note-{key}")
            request.arguments.update({"text": f"entry {key}"})
            return await stub.ExecuteTool(request, timeout=60)

        responses = await asyncio.gather(
            *(call(stub, key) for key in range(KEYS) for stub in stubs for _ in range(CALLS_PER_REPLICA))
        )
    for key in range(KEYS):
        mine = responses[key * 2 * CALLS_PER_REPLICA : (key + 1) * 2 * CALLS_PER_REPLICA]
        assert sorted(r.replayed for r in mine) == [False] + [True] * (2 * CALLS_PER_REPLICA - 1)
        assert all(r.WhichOneof("outcome") == "result" for r in mine)
        assert len({r.result.SerializeToString(deterministic=True) for r in mine}) == 1
    assert sorted(note_lines(first, second)) == sorted(f"entry {key}" for key in range(KEYS))
    assert not any(Path(replica.data_dir, "tools.db").exists() for replica in replicas)  # all of it in PostgreSQL


@pytest.fixture
def counter_document() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), CounterHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield COUNTER_DOCUMENT.replace("PORT", str(server.server_address[1]))
    finally:
        server.shutdown()
        server.server_close()


async def test_a_source_registered_on_one_replica_is_listed_and_callable_on_the_other(
    replicas, counter_document: str
) -> None:
    first, second = replicas
    async with (
        grpc.aio.insecure_channel(first.target("tools")) as a,
        grpc.aio.insecure_channel(second.target("tools")) as b,
    ):
        on_first, on_second = tools_pb2_grpc.ToolsServiceStub(a), tools_pb2_grpc.ToolsServiceStub(b)

        async def tools(stub: tools_pb2_grpc.ToolsServiceStub) -> list[str]:
            return [tool.name for tool in (await stub.ListTools(tools_pb2.ListToolsRequest())).tools]

        source = tools_pb2.ToolSource(name="counter")
        source.openapi.document = counter_document
        await on_first.RegisterToolSource(tools_pb2.RegisterToolSourceRequest(source=source), timeout=30)

        async def listed_on_second() -> bool:
            return "counter.count_letters" in await tools(on_second)

        await eventually(listed_on_second, timeout=30)
        sources = await on_second.ListToolSources(tools_pb2.ListToolSourcesRequest())
        assert [(s.name, s.origin) for s in sources.sources] == [("counter", tools_pb2.ToolSource.ORIGIN_API)]
        request = tools_pb2.ExecuteToolRequest(call_id="c", name="counter.count_letters")
        request.arguments.update({"word": "replica"})
        counted = await on_second.ExecuteTool(request, timeout=30)
        assert json_format.MessageToDict(counted.result) == {"word": "replica", "letters": 7.0}
        # A second registration of the name on the other replica is refused: the name is taken everywhere.
        with pytest.raises(grpc.aio.AioRpcError) as taken:
            await on_second.RegisterToolSource(tools_pb2.RegisterToolSourceRequest(source=source), timeout=30)
        assert taken.value.code() == grpc.StatusCode.ALREADY_EXISTS

        await on_second.UnregisterToolSource(tools_pb2.UnregisterToolSourceRequest(name="counter"), timeout=30)

        async def gone_from_first() -> bool:
            return "counter.count_letters" not in await tools(on_first)

        await eventually(gone_from_first, timeout=30)
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await on_first.ExecuteTool(request, timeout=30)
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
