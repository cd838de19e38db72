"""ToolsService over a ToolRegistry: proto Struct/Value <-> Python values, nothing else."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2

from meshpilot.tools.v1 import tools_pb2, tools_pb2_grpc
from services.tools.registry import Tool, ToolErrorKind, ToolOutcome, ToolRegistry

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


def outcome_to_proto(call_id: str, outcome: ToolOutcome) -> tools_pb2.ExecuteToolResponse:
    response = tools_pb2.ExecuteToolResponse(call_id=call_id, name=outcome.name)
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


class ToolsServicer(tools_pb2_grpc.ToolsServiceServicer):
    """Lists and executes the registry's tools; errors are raised as MeshError and mapped by the shared interceptor."""

    def __init__(self, registry: ToolRegistry) -> None:
        self.registry = registry

    async def ListTools(
        self, request: tools_pb2.ListToolsRequest, context: grpc.aio.ServicerContext
    ) -> tools_pb2.ListToolsResponse:
        return tools_pb2.ListToolsResponse(tools=[tool_to_proto(tool) for tool in self.registry.list()])

    async def ExecuteTool(
        self, request: tools_pb2.ExecuteToolRequest, context: grpc.aio.ServicerContext
    ) -> tools_pb2.ExecuteToolResponse:
        arguments: dict[str, Any] = (
            json_format.MessageToDict(request.arguments) if request.HasField("arguments") else {}
        )
        outcome = await self.registry.execute(request.name, arguments, request_timeout(request))
        return outcome_to_proto(request.call_id, outcome)
