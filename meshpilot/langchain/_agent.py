"""MeshPilotAgent: an agent of the planner as a LangChain runnable over the planner's Run RPC."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import timedelta
from typing import Any

import grpc
from google.protobuf import json_format
from langchain_core.messages import BaseMessage, HumanMessage
from langchain_core.runnables import RunnableConfig, RunnableSerializable
from pydantic import ConfigDict, Field, PrivateAttr, SecretStr

from meshpilot.langchain._connection import OPENING, MeshConnection
from meshpilot.planner.v1 import planner_pb2, planner_pb2_grpc
from services.common import MeshError, UnavailableError
from services.common.config import load_config
from services.common.errors import bounded
from services.common.json_values import plain_numbers
from services.common.tls import TlsIdentity

# The stream may outlive the run's own timeout by this much: the planner ends a timed-out run with an error event.
STREAM_GRACE_S = 30.0
_TERMINAL = ("final_answer", "error")


class AgentRunError(MeshError):
    """The run ended with an error event (its code, e.g. RESOURCE_EXHAUSTED or CANCELLED, and message)."""

    def __init__(self, code: str, message: str, run_id: str) -> None:
        super().__init__(bounded(f"run {run_id} failed: {code}: {message}"))
        self.code = grpc.StatusCode[code] if code in grpc.StatusCode.__members__ else grpc.StatusCode.UNKNOWN
        self.run_id = run_id


class MeshPilotAgent(RunnableSerializable[Any, str]):
    """An agent of the planner (``agent``: its name, empty for the built-in "default") as a runnable.

    Input: the task as a string, a message (or a list of them: the last human one), or a dict with "task" and
    optionally "session_id". ``invoke``/``ainvoke`` start a run through the planner's Run RPC and return its final
    answer; a run that waits for a human's approval waits with them (``meshpilot approve``), bounded by ``timeout``.
    ``stream``/``astream`` yield every RunEvent as a dict (proto field names, "type" naming the event, "sequence" an
    int). A run that ends with an error raises AgentRunError; a gRPC failure a MeshError naming what to change.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    agent: str = ""
    """The agent's name (AgentService); empty selects the built-in "default" agent."""
    agent_version: int = Field(0, ge=0)
    """0 selects the agent's latest version."""
    planner: str = Field(default_factory=lambda: load_config().planner.server.target())
    """The planner's address (host:port or dns:///name:port); default: the mesh config's."""
    api_key: SecretStr | None = None
    """An API key (`meshpilot keys create`) or JWT, sent as a bearer token; the planner needs one off loopback."""
    tls: TlsIdentity | None = None
    """The mesh CA to trust (and a certificate to present) when the planner serves TLS."""
    tls_server_name: str | None = None
    session_id: str | None = None
    """Continue this session; None starts a new one per run (a dict input may name its own)."""
    max_steps: int = Field(0, ge=0)
    """0 keeps the agent's budget."""
    timeout: float | None = Field(None, gt=0)
    """Wall-clock limit of a run, seconds; None keeps the agent's budget (and the stream has no deadline)."""

    _connection: MeshConnection | None = PrivateAttr(default=None)

    def connection(self) -> MeshConnection:
        """The channel to the planner, opened on first use."""
        with OPENING:
            if self._connection is None:
                self._connection = MeshConnection(
                    "planner",
                    self.planner,
                    api_key=self.api_key.get_secret_value() if self.api_key else None,
                    tls=self.tls,
                    server_name=self.tls_server_name,
                )
            return self._connection

    def close(self) -> None:
        """Closes the channel (a later run opens it again)."""
        if self._connection is not None:
            self._connection.close()

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> str:
        return self._call_with_config(self._answer, input, config)

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> str:
        return await self._acall_with_config(self._aanswer, input, config)

    # stream yields RunEvents, not pieces of the answer: the run's steps are what a caller follows.
    def stream(  # type: ignore[override]
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[dict[str, Any]]:
        request = self.run_request(input)
        yield from _checked(event_dict(e) for e in self.connection().stream(self._open(request)))

    async def astream(  # type: ignore[override]
        self, input: Any, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[dict[str, Any]]:
        request = self.run_request(input)
        run_id = ""
        async for event in self.connection().astream(self._open(request)):
            found = event_dict(event)
            run_id = found["run_id"] or run_id
            yield found
            if found["type"] in _TERMINAL:
                return
        raise _cut_short(run_id)

    def _answer(self, input: Any) -> str:
        return _final_answer(list(self.stream(input)))

    async def _aanswer(self, input: Any) -> str:
        return _final_answer([event async for event in self.astream(input)])

    def run_request(self, input: Any) -> planner_pb2.RunRequest:
        """The RunRequest of ``input``; ValueError for an input that holds no task."""
        task, session_id = _task_of(input)
        if not task.strip():
            raise ValueError("the task is empty; pass the question or instruction for the agent")
        request = planner_pb2.RunRequest(
            task=task,
            session_id=session_id or self.session_id or "",
            agent=self.agent,
            agent_version=self.agent_version,
        )
        request.budget.max_steps = self.max_steps
        if self.timeout is not None:
            request.budget.timeout.FromTimedelta(timedelta(seconds=self.timeout))
        return request

    def _open(self, request: planner_pb2.RunRequest) -> Any:
        deadline = self.timeout + STREAM_GRACE_S if self.timeout is not None else None
        return lambda channel: planner_pb2_grpc.PlannerServiceStub(channel).Run(request, timeout=deadline)


def event_dict(event: planner_pb2.RunEvent) -> dict[str, Any]:
    """A RunEvent as a dict: the proto's JSON with its field names, "type" the event's kind, "sequence" an int."""
    found: dict[str, Any] = plain_numbers(json_format.MessageToDict(event, preserving_proto_field_name=True))
    found.setdefault("run_id", "")
    found["sequence"] = event.sequence
    found["type"] = event.WhichOneof("event") or ""
    return found


def _checked(events: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    run_id = ""
    for event in events:
        run_id = event["run_id"] or run_id
        yield event
        if event["type"] in _TERMINAL:
            return
    raise _cut_short(run_id)


def _cut_short(run_id: str) -> UnavailableError:
    return UnavailableError(
        f"the planner's stream of run {run_id or '(not started)'} ended before the run's last event; "
        f"follow it with `meshpilot runs watch {run_id or 'RUN_ID'}`"
    )


def _final_answer(events: Sequence[dict[str, Any]]) -> str:
    last = events[-1]
    if last["type"] == "error":
        raise AgentRunError(last["error"].get("code", "UNKNOWN"), last["error"].get("message", ""), last["run_id"])
    return str(last["final_answer"].get("answer", ""))


def _task_of(input: Any) -> tuple[str, str | None]:
    if isinstance(input, str):
        return input, None
    if isinstance(input, BaseMessage):
        return input.text, None
    if isinstance(input, dict) and isinstance(input.get("task"), str):
        session_id = input.get("session_id")
        return input["task"], session_id if isinstance(session_id, str) else None
    if isinstance(input, list) and (humans := [m for m in input if isinstance(m, HumanMessage)]):
        return humans[-1].text, None
    raise ValueError(
        f"MeshPilotAgent takes a task: a string, a message, a list of messages or {{'task': ...}}, "
        f"not {type(input).__name__}"
    )
