"""Idempotency keys: outcomes stored and replayed, key reuse refused, one run per key, runs outliving their caller."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from meshpilot.tools.v1 import tools_pb2
from services.common import FailedPreconditionError, InvalidArgumentError, NotFoundError
from services.common.approval import arguments_digest
from services.tools import OutcomeStore, Tool, ToolCall, ToolErrorKind, ToolOutcome, builtin_tools
from services.tools.builtin.notes import append_note_tool
from services.tools.idempotency import decode_outcome, encode_outcome
from services.tools.registry import ToolCallError
from tests.unit.tools_fakes import (
    ECHO_SCHEMA,
    CountingHandler,
    eventually,
    execute_request,
    make_executor,
    make_registry,
    mesh_config,
    serving,
)


def keyed(name: str = "echo", text: str = "hi", key: str = "key-1", timeout_seconds: float | None = None) -> ToolCall:
    return ToolCall(name, {"text": text}, call_id="call-1", timeout_seconds=timeout_seconds, idempotency_key=key)


async def test_replay_returns_stored_outcome_without_running_again(tmp_path: Path) -> None:
    handler = CountingHandler()
    executor = make_executor(tmp_path / "tools.db", make_registry(("echo", handler)))
    first = await executor.execute(keyed())
    again = await executor.execute(keyed())
    assert handler.calls == 1
    assert (first.replayed, again.replayed) == (False, True)
    assert first.outcome.result == again.outcome.result == {"text": "hi", "run": 1}
    assert again.outcome.duration_seconds == first.outcome.duration_seconds
    await executor.close()


async def test_error_observation_is_stored_and_replayed(tmp_path: Path) -> None:
    handler = CountingHandler(fail=True)
    executor = make_executor(tmp_path / "tools.db", make_registry(("echo", handler)))
    first = await executor.execute(keyed())
    again = await executor.execute(keyed())
    assert handler.calls == 1
    assert first.outcome.error == again.outcome.error == ToolCallError(ToolErrorKind.FAILED, "failed on hi")
    assert again.replayed
    await executor.close()


async def test_calls_without_key_run_every_time(tmp_path: Path) -> None:
    handler = CountingHandler()
    executor = make_executor(tmp_path / "tools.db", make_registry(("echo", handler)))
    results = [await executor.execute(keyed(key="")) for _ in range(2)]
    assert handler.calls == 2
    assert [r.replayed for r in results] == [False, False]
    assert [r.outcome.result["run"] for r in results] == [1, 2]
    await executor.close()
    assert not (tmp_path / "tools.db").exists()


async def test_key_reused_for_other_arguments_or_tool_is_failed_precondition(tmp_path: Path) -> None:
    echo, other = CountingHandler(), CountingHandler()
    executor = make_executor(tmp_path / "tools.db", make_registry(("echo", echo), ("other", other)))
    await executor.execute(keyed(text="hi"))
    with pytest.raises(FailedPreconditionError, match=r"'key-1' was used for another call \(tool 'echo' with other"):
        await executor.execute(keyed(text="bye"))
    with pytest.raises(FailedPreconditionError, match=r"'key-1' was used for another call \(of tool 'echo'\)"):
        await executor.execute(keyed(name="other", text="hi"))
    assert (echo.calls, other.calls) == (1, 0)
    await executor.close()


async def test_key_reused_while_the_first_call_runs_is_failed_precondition(tmp_path: Path) -> None:
    handler = CountingHandler(hold=True)
    executor = make_executor(tmp_path / "tools.db", make_registry(("echo", handler)))
    first = asyncio.create_task(executor.execute(keyed(text="hi")))
    await handler.started.wait()
    with pytest.raises(FailedPreconditionError, match="with other arguments"):
        await executor.execute(keyed(text="bye"))
    handler.release()
    assert (await first).outcome.result == {"text": "hi", "run": 1}
    await executor.close()


async def test_key_longer_than_128_characters_is_invalid_argument(tmp_path: Path) -> None:
    handler = CountingHandler()
    executor = make_executor(tmp_path / "tools.db", make_registry(("echo", handler)))
    with pytest.raises(InvalidArgumentError, match="idempotency_key is 129 characters long; use at most 128"):
        await executor.execute(keyed(key="k" * 129))
    assert (await executor.execute(keyed(key="k" * 128))).outcome.ok
    assert handler.calls == 1
    await executor.close()


async def test_validation_failures_are_not_stored(tmp_path: Path) -> None:
    handler = CountingHandler()
    executor = make_executor(tmp_path / "tools.db", make_registry(("echo", handler)))
    with pytest.raises(NotFoundError):
        await executor.execute(keyed(name="ehco"))
    with pytest.raises(InvalidArgumentError):
        await executor.execute(ToolCall("echo", {"text": 1}, idempotency_key="key-1"))
    with pytest.raises(InvalidArgumentError, match="timeout must be positive"):
        await executor.execute(keyed(timeout_seconds=-1.0))
    assert await executor.store.get("key-1") is None
    corrected = await executor.execute(keyed())
    assert (corrected.replayed, handler.calls) == (False, 1)
    await executor.close()


async def test_concurrent_calls_with_one_key_run_once(tmp_path: Path) -> None:
    handler = CountingHandler(hold=True)
    executor = make_executor(tmp_path / "tools.db", make_registry(("echo", handler)))
    calls = [asyncio.create_task(executor.execute(keyed())) for _ in range(3)]
    await handler.started.wait()
    await asyncio.sleep(0.01)  # let the other two reach the running call
    handler.release()
    executions = await asyncio.gather(*calls)
    assert handler.calls == 1
    assert sorted(e.replayed for e in executions) == [False, True, True]
    assert all(e.outcome.result == {"text": "hi", "run": 1} for e in executions)
    await executor.close()


async def test_cancelled_caller_does_not_cancel_the_run_and_the_retry_gets_its_outcome(tmp_path: Path) -> None:
    handler = CountingHandler(hold=True)
    registry = make_registry(("echo", handler))
    executor = make_executor(tmp_path / "tools.db", registry)
    caller = asyncio.create_task(executor.execute(keyed()))
    await handler.started.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    handler.release()
    await executor.close()  # waits for the run the caller left behind
    assert handler.finished == 1
    retry = make_executor(tmp_path / "tools.db", registry)
    execution = await retry.execute(keyed())
    assert (execution.replayed, execution.outcome.result, handler.calls) == (True, {"text": "hi", "run": 1}, 1)
    await retry.close()


async def test_interrupted_started_call_is_an_error_observation_not_a_rerun(tmp_path: Path) -> None:
    store = OutcomeStore(tmp_path / "tools.db")
    assert await store.claim("key-1", "echo", arguments_digest({"text": "hi"})) is None
    await store.close()  # the tools service died while the call ran: no outcome was recorded
    handler = CountingHandler()
    executor = make_executor(tmp_path / "tools.db", make_registry(("echo", handler)))
    for _ in range(2):
        execution = await executor.execute(keyed())
        assert execution.replayed
        assert execution.outcome.error is not None
        assert execution.outcome.error.kind == ToolErrorKind.FAILED
        assert "with idempotency key 'key-1' was interrupted" in execution.outcome.error.message
        assert "whether it took effect is unknown; it is not run again" in execution.outcome.error.message
    assert handler.calls == 0
    with pytest.raises(FailedPreconditionError):
        await executor.execute(keyed(text="other"))
    await executor.close()


async def test_an_interrupted_call_of_a_tool_that_only_reads_is_run_again_once(tmp_path: Path) -> None:
    store = OutcomeStore(tmp_path / "tools.db")
    assert await store.claim("key-1", "echo", arguments_digest({"text": "hi"})) is None
    await store.close()  # the tools service died while the call ran
    handler = CountingHandler()
    reader = Tool("echo", "Echoes; no side effects.", ECHO_SCHEMA, handler, idempotent=True)
    executor = make_executor(tmp_path / "tools.db", make_registry(reader))
    first = await executor.execute(keyed())
    again = await executor.execute(keyed())
    await executor.close()
    assert (first.replayed, first.outcome.result) == (False, {"text": "hi", "run": 1})
    assert (again.replayed, again.outcome.result, handler.calls) == (True, {"text": "hi", "run": 1}, 1)


def test_the_read_only_built_ins_are_idempotent_and_append_note_is_not(tmp_path: Path) -> None:
    tools = {tool.name: tool for tool in builtin_tools(None, notes_dir=tmp_path)}
    assert {name for name, tool in tools.items() if tool.idempotent} == {
        "calculator",
        "current_time",
        "country_facts",
        "entity_facts",
        "sparql_query",
    } & set(tools)
    assert not tools["append_note"].idempotent


async def test_outcomes_survive_reopening_the_store(tmp_path: Path) -> None:
    handler = CountingHandler()
    registry = make_registry(("echo", handler))
    first = make_executor(tmp_path / "tools.db", registry)
    await first.execute(keyed())
    await first.close()
    second = make_executor(tmp_path / "tools.db", registry)
    execution = await second.execute(keyed())
    assert (execution.replayed, execution.outcome.result, handler.calls) == (True, {"text": "hi", "run": 1}, 1)
    await second.close()


async def test_append_note_runs_once_per_key(tmp_path: Path) -> None:
    registry = make_registry(append_note_tool(tmp_path / "notes"))
    executor = make_executor(tmp_path / "tools.db", registry)
    call = ToolCall("append_note", {"text": "buy milk"}, idempotency_key="note-1")
    executions = await asyncio.gather(*(executor.execute(call) for _ in range(3)))
    executions.append(await executor.execute(call))
    assert all(e.outcome.result == {"notebook": "notes", "line": 1, "text": "buy milk"} for e in executions)
    assert (tmp_path / "notes" / "notes.txt").read_text() == "buy milk\n"
    await executor.close()


def test_outcome_encoding_round_trips() -> None:
    outcomes = [
        ToolOutcome("echo", 0.25, result={"a": [1, 2.5, None, "é"]}),
        ToolOutcome("echo", 0.5, result=None),
        ToolOutcome("echo", 1.0, error=ToolCallError(ToolErrorKind.TIMEOUT, "ran past its time limit")),
    ]
    assert [decode_outcome(encode_outcome(o)) for o in outcomes] == outcomes


async def test_store_refuses_an_outcome_for_an_unclaimed_key_and_use_after_close(tmp_path: Path) -> None:
    store = OutcomeStore(tmp_path / "tools.db")
    with pytest.raises(ValueError, match="no started call under idempotency key 'nope'"):
        await store.record("nope", ToolOutcome("echo", 0.1, result=1))
    assert await store.claim("k", "echo", "digest") is None
    await store.record("k", ToolOutcome("echo", 0.1, result=1))
    with pytest.raises(ValueError, match="no started call"):
        await store.record("k", ToolOutcome("echo", 0.1, result=2))
    stored = await store.get("k")
    assert stored is not None and stored.outcome == ToolOutcome("echo", 0.1, result=1)
    await store.close()
    with pytest.raises(RuntimeError, match="the tools-outcomes database is closed"):
        await store.get("k")


def test_config_puts_the_store_in_the_data_dir(tmp_path: Path) -> None:
    config = mesh_config(tmp_path)
    assert config.tools.db_path == tmp_path / "tools.db"
    assert config.tools.approval_required == []


async def test_replayed_flag_and_codes_over_grpc(tmp_path: Path) -> None:
    handler = CountingHandler()
    async with serving(mesh_config(tmp_path), make_registry(("echo", handler))) as stub:
        first = await stub.ExecuteTool(execute_request("echo", {"text": "hi"}, idempotency_key="key-1"))
        again = await stub.ExecuteTool(execute_request("echo", {"text": "hi"}, idempotency_key="key-1"))
        assert (first.replayed, again.replayed, handler.calls) == (False, True, 1)
        assert again.result == first.result
        assert again.duration == first.duration
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ExecuteTool(execute_request("echo", {"text": "bye"}, idempotency_key="key-1"))
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ExecuteTool(execute_request("echo", {"text": "hi"}, idempotency_key="k" * 129))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (tmp_path / "tools.db").exists()


async def test_client_cancelling_mid_call_over_grpc_still_stores_the_outcome(tmp_path: Path) -> None:
    handler = CountingHandler(hold=True)
    async with serving(mesh_config(tmp_path), make_registry(("echo", handler))) as stub:
        request = execute_request("echo", {"text": "hi"}, idempotency_key="key-1")
        call = stub.ExecuteTool(request)
        await handler.started.wait()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        handler.release()
        store = OutcomeStore(tmp_path / "tools.db")

        async def stored() -> bool:
            record = await store.get("key-1")
            return record is not None and record.outcome is not None

        await eventually(stored)
        await store.close()
        retry = await stub.ExecuteTool(request)
    assert (retry.replayed, handler.calls, handler.finished) == (True, 1, 1)
    assert retry.WhichOneof("outcome") == "result"
    assert retry.result.struct_value["run"] == 1
    assert retry.error == tools_pb2.ToolError()


def test_openapi_get_operations_are_idempotent_and_post_is_not() -> None:
    from services.tools.openapi import OpenApiSource, parse_document

    document = parse_document(
        "openapi: 3.1.0\ninfo: {title: t, version: '1'}\nservers: [{url: 'http://127.0.0.1:9'}]\npaths:\n"
        "  /items:\n    get: {operationId: listItems, responses: {'200': {description: ok}}}\n"
        "    post: {operationId: addItem, responses: {'201': {description: ok}}}\n"
    )
    tools = {tool.name: tool.idempotent for tool in OpenApiSource("shop", document).tools()}
    assert tools == {"shop.list_items": True, "shop.add_item": False}
