"""The tools service's tools as LangChain StructuredTools that run through ExecuteTool."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import grpc
from langchain_core.tools import StructuredTool, ToolException

from meshpilot.langchain._connection import MeshConnection
from meshpilot.tools.v1 import tools_pb2, tools_pb2_grpc
from services.common import InvalidArgumentError, PermissionDeniedError
from services.common.config import load_config
from services.common.errors import quoted
from services.common.json_values import message_to_json
from services.common.tls import TlsIdentity

# The deadline of ListTools.
LIST_TIMEOUT_S = 10.0


class ToolApprovalRequiredError(PermissionDeniedError):
    """The tool runs only with a human's approval, which a call outside an agent run cannot get: it was not run."""


def meshpilot_tools(
    target: str | None = None,
    *,
    names: Sequence[str] | None = None,
    api_key: str | None = None,
    tls: TlsIdentity | None = None,
    tls_server_name: str | None = None,
    timeout: float | None = None,
) -> list[StructuredTool]:
    """The tools of the tools service at ``target`` (default: the config's tools address), or only ``names``, as
    StructuredTools whose ``args_schema`` is the tool's JSON Schema and that run through ExecuteTool.

    A tool that fails (or is given arguments its schema refuses) returns its error as the tool's message, with
    status "error", as the planner shows a failure to its model; a tool that requires approval raises
    ToolApprovalRequiredError without running. ``timeout``: per call, seconds (None: the service's default).
    ValueError for a name the service does not have.
    """
    connection = _connection(target, api_key, tls, tls_server_name)
    response = connection.call(_list_tools)
    return _structured_tools(connection, response, names, timeout)


async def ameshpilot_tools(
    target: str | None = None,
    *,
    names: Sequence[str] | None = None,
    api_key: str | None = None,
    tls: TlsIdentity | None = None,
    tls_server_name: str | None = None,
    timeout: float | None = None,
) -> list[StructuredTool]:
    """``meshpilot_tools`` for async callers."""
    connection = _connection(target, api_key, tls, tls_server_name)
    response = await connection.acall(_list_tools)
    return _structured_tools(connection, response, names, timeout)


def _connection(
    target: str | None, api_key: str | None, tls: TlsIdentity | None, tls_server_name: str | None
) -> MeshConnection:
    address = target or load_config().tools.server.target()
    return MeshConnection("tools", address, api_key=api_key, tls=tls, server_name=tls_server_name)


async def _list_tools(channel: grpc.aio.Channel) -> tools_pb2.ListToolsResponse:
    stub = tools_pb2_grpc.ToolsServiceStub(channel)
    response: tools_pb2.ListToolsResponse = await stub.ListTools(tools_pb2.ListToolsRequest(), timeout=LIST_TIMEOUT_S)
    return response


def _structured_tools(
    connection: MeshConnection,
    response: tools_pb2.ListToolsResponse,
    names: Sequence[str] | None,
    timeout: float | None,
) -> list[StructuredTool]:
    by_name = {tool.name: tool for tool in response.tools}
    missing = [name for name in names or () if name not in by_name]
    if missing:
        raise ValueError(
            f"the tools service at {connection.target} has no tool {', '.join(quoted(n) for n in missing)}; "
            f"it has {', '.join(sorted(by_name)) or 'none'}"
        )
    chosen = [by_name[name] for name in names] if names is not None else list(response.tools)
    return [_structured_tool(connection, tool, timeout) for tool in chosen]


def _structured_tool(connection: MeshConnection, tool: tools_pb2.Tool, timeout: float | None) -> StructuredTool:
    call = _ToolCall(connection, tool.name, bool(tool.requires_approval), timeout)
    schema = message_to_json(tool.input_schema) or {"type": "object", "properties": {}}
    return StructuredTool(
        name=tool.name,
        description=tool.description or tool.name,
        args_schema=schema,
        func=call.run,
        coroutine=call.arun,
        handle_tool_error=True,
        metadata={"requires_approval": tool.requires_approval},
    )


class _ToolCall:
    """Runs one tool through ExecuteTool: its result as JSON, its failure as a ToolException (the tool's message)."""

    def __init__(self, connection: MeshConnection, name: str, requires_approval: bool, timeout: float | None) -> None:
        self._connection = connection
        self.name = name
        self._requires_approval = requires_approval
        self._timeout = timeout

    def run(self, **arguments: Any) -> Any:
        request = self._request(arguments)
        try:
            response = self._connection.call(lambda channel: self._execute(channel, request))
        except InvalidArgumentError as e:
            raise ToolException(str(e)) from e
        return _outcome(response)

    async def arun(self, **arguments: Any) -> Any:
        request = self._request(arguments)
        try:
            response = await self._connection.acall(lambda channel: self._execute(channel, request))
        except InvalidArgumentError as e:
            raise ToolException(str(e)) from e
        return _outcome(response)

    def _request(self, arguments: dict[str, Any]) -> tools_pb2.ExecuteToolRequest:
        if self._requires_approval:
            raise ToolApprovalRequiredError(
                f"the tool {quoted(self.name)} runs only with a human's approval, which a call outside an agent run "
                "cannot get, so it was not run; call it inside a MeshPilot agent (MeshPilotAgent), where the planner "
                "asks for approval, or leave it out with meshpilot_tools(names=[...])"
            )
        request = tools_pb2.ExecuteToolRequest(call_id=uuid.uuid4().hex, name=self.name)
        try:
            request.arguments.update(arguments)
        except (TypeError, ValueError) as e:
            raise ToolException(f"the arguments of {self.name} are not JSON: {str(e)[:200]}") from e
        if self._timeout is not None:
            request.timeout.FromNanoseconds(round(self._timeout * 1e9))
        return request

    async def _execute(
        self, channel: grpc.aio.Channel, request: tools_pb2.ExecuteToolRequest
    ) -> tools_pb2.ExecuteToolResponse:
        # The RPC's deadline leaves the service time to report the tool's own timeout as an error observation.
        deadline = self._timeout + 5.0 if self._timeout is not None else None
        stub = tools_pb2_grpc.ToolsServiceStub(channel)
        response: tools_pb2.ExecuteToolResponse = await stub.ExecuteTool(request, timeout=deadline)
        return response


def _outcome(response: tools_pb2.ExecuteToolResponse) -> Any:
    if response.WhichOneof("outcome") == "error":
        raise ToolException(response.error.message or f"the tool {response.name} failed")
    return message_to_json(response.result)
