"""ToolsService over a ToolExecutor: proto Struct/Value <-> Python values, nothing else."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2

from meshpilot.tools.v1 import tools_pb2, tools_pb2_grpc
from services.tools.executor import Execution, ToolCall, ToolExecutor
from services.tools.registry import Tool, ToolErrorKind

_ERROR_KINDS = {
    ToolErrorKind.FAILED: tools_pb2.ToolError.KIND_FAILED,
    ToolErrorKind.TIMEOUT: tools_pb2.ToolError.KIND_TIMEOUT,
}


def tool_to_proto(tool: Tool) -> tools_pb2.Tool:
    schema = struct_pb2.Struct()
    schema.update(tool.input_schema)
    return tools_pb2.Tool(
        name=tool.name,
        description=tool.description,
        input_schema=schema,
        requires_approval=tool.requires_approval,
    )


def execution_to_proto(call_id: str, execution: Execution) -> tools_pb2.ExecuteToolResponse:
    outcome = execution.outcome
    response = tools_pb2.ExecuteToolResponse(call_id=call_id, name=outcome.name, replayed=execution.replayed)
    if outcome.error is not None:
        response.error.kind = _ERROR_KINDS[outcome.error.kind]
        response.error.message = outcome.error.message
    else:
        json_format.ParseDict(outcome.result, response.result)
    response.duration.FromNanoseconds(round(outcome.duration_seconds * 1e9))
    return response


def request_timeout(request: tools_pb2.ExecuteToolRequest) -> float | None:
    """The caller's limit in seconds; None when unset or zero (the service default applies)."""
    if not request.HasField("timeout"):
        return None
    seconds = request.timeout.ToNanoseconds() / 1e9
    return seconds if seconds != 0 else None


def call_from_proto(request: tools_pb2.ExecuteToolRequest) -> ToolCall:
    arguments: dict[str, Any] = json_format.MessageToDict(request.arguments) if request.HasField("arguments") else {}
    return ToolCall(
        name=request.name,
        arguments=arguments,
        call_id=request.call_id,
        run_id=request.run_id,
        timeout_seconds=request_timeout(request),
        idempotency_key=request.idempotency_key,
        approval_token=request.approval_token,
    )


class ToolsServicer(tools_pb2_grpc.ToolsServiceServicer):
    """Lists and executes the executor's tools; errors are raised as MeshError and mapped by the shared interceptor."""

    def __init__(self, executor: ToolExecutor) -> None:
        self.executor = executor

    async def ListTools(
        self, request: tools_pb2.ListToolsRequest, context: grpc.aio.ServicerContext
    ) -> tools_pb2.ListToolsResponse:
        return tools_pb2.ListToolsResponse(tools=[tool_to_proto(tool) for tool in self.executor.tools()])

    async def ExecuteTool(
        self, request: tools_pb2.ExecuteToolRequest, context: grpc.aio.ServicerContext
    ) -> tools_pb2.ExecuteToolResponse:
        execution = await self.executor.execute(call_from_proto(request))
        return execution_to_proto(request.call_id, execution)
