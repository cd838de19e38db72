"""ToolsService over a ToolExecutor: proto Struct/Value <-> Python values, nothing else."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2

from meshpilot.tools.v1 import tools_pb2, tools_pb2_grpc
from services.common import FailedPreconditionError, InvalidArgumentError, tracing
from services.common.auth import tenant_of
from services.common.config import McpServerConfig
from services.tools.executor import Execution, ToolCall, ToolExecutor
from services.tools.registry import Tool, ToolErrorKind
from services.tools.sources import (
    DEFAULT_TENANT,
    OpenApiSpec,
    Origin,
    SourceInfo,
    SourceSpec,
    SourceState,
    ToolSources,
    validated,
)

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


def call_from_proto(request: tools_pb2.ExecuteToolRequest, tenant: str = DEFAULT_TENANT) -> ToolCall:
    arguments: dict[str, Any] = json_format.MessageToDict(request.arguments) if request.HasField("arguments") else {}
    return ToolCall(
        name=request.name,
        arguments=arguments,
        call_id=request.call_id,
        run_id=request.run_id,
        timeout_seconds=request_timeout(request),
        idempotency_key=request.idempotency_key,
        approval_token=request.approval_token,
        tenant=tenant,
    )


# What ListToolSources shows instead of the value of an environment variable or header (they hold secrets).
REDACTED = "<redacted>"
_ORIGINS = {Origin.CONFIG: tools_pb2.ToolSource.ORIGIN_CONFIG, Origin.API: tools_pb2.ToolSource.ORIGIN_API}
_STATES = {
    SourceState.CONNECTING: tools_pb2.ToolSource.STATE_CONNECTING,
    SourceState.READY: tools_pb2.ToolSource.STATE_READY,
    SourceState.FAILED: tools_pb2.ToolSource.STATE_FAILED,
}


def spec_from_proto(source: tools_pb2.ToolSource) -> SourceSpec:
    """The source a RegisterToolSource request describes; InvalidArgumentError naming the field otherwise."""
    kind = source.WhichOneof("kind")
    common: dict[str, Any] = {"name": source.name, "approval_required": list(source.approval_required)}
    if source.HasField("timeout"):
        common["timeout_seconds"] = source.timeout.ToNanoseconds() / 1e9
    if kind == "mcp":
        mcp = source.mcp
        data = {
            **common,
            "command": mcp.command or None,
            "args": list(mcp.args),
            "env": dict(mcp.env),
            "url": mcp.url or None,
            "headers": dict(mcp.headers),
        }
        return validated(McpServerConfig, data, "source")
    if kind == "openapi":
        openapi = source.openapi
        data = {**common, "document": openapi.document, "base_url": openapi.base_url or None}
        data["headers"] = dict(openapi.headers)
        if openapi.max_response_bytes:
            data["max_response_bytes"] = openapi.max_response_bytes
        return validated(OpenApiSpec, data, "source")
    raise InvalidArgumentError("source: set mcp (an MCP server) or openapi (an OpenAPI 3 document)")


def source_to_proto(info: SourceInfo) -> tools_pb2.ToolSource:
    """The source as ListToolSources shows it: secrets' values and the OpenAPI document left out."""
    spec = info.spec
    source = tools_pb2.ToolSource(
        name=spec.name,
        approval_required=spec.approval_required,
        origin=_ORIGINS[info.origin],
        state=_STATES[info.state],
        error=info.error or "",
        tools=info.tools,
    )
    if spec.timeout_seconds is not None:
        source.timeout.FromNanoseconds(round(spec.timeout_seconds * 1e9))
    if isinstance(spec, McpServerConfig):
        source.mcp.command = spec.command or ""
        source.mcp.args.extend(spec.args)
        source.mcp.env.update(dict.fromkeys(spec.env, REDACTED))
        source.mcp.url = spec.url or ""
        source.mcp.headers.update(dict.fromkeys(spec.headers, REDACTED))
    else:
        source.openapi.base_url = spec.base_url or ""
        source.openapi.headers.update(dict.fromkeys(spec.headers, REDACTED))
        source.openapi.max_response_bytes = spec.max_response_bytes
    return source


class ToolsServicer(tools_pb2_grpc.ToolsServiceServicer):
    """Lists and executes the executor's tools and manages the tool sources; errors are raised as MeshError and
    mapped by the shared interceptor."""

    def __init__(self, executor: ToolExecutor, sources: ToolSources | None = None) -> None:
        self.executor = executor
        self.sources = sources

    async def ListTools(
        self, request: tools_pb2.ListToolsRequest, context: grpc.aio.ServicerContext
    ) -> tools_pb2.ListToolsResponse:
        tools = self.executor.tools(tenant_of(context.invocation_metadata()))
        return tools_pb2.ListToolsResponse(tools=[tool_to_proto(tool) for tool in tools])

    async def ExecuteTool(
        self, request: tools_pb2.ExecuteToolRequest, context: grpc.aio.ServicerContext
    ) -> tools_pb2.ExecuteToolResponse:
        span = tracing.current_span()  # the call's (MeshServer's tracing interceptor), or a no-op one
        if span.is_recording():
            span.set_attributes(
                {
                    tracing.GEN_AI_OPERATION: "execute_tool",
                    tracing.GEN_AI_TOOL_NAME: request.name,
                    tracing.GEN_AI_TOOL_CALL_ID: request.call_id,
                    "meshpilot.run.id": request.run_id,
                }
            )
        execution = await self.executor.execute(call_from_proto(request, tenant_of(context.invocation_metadata())))
        if span.is_recording():
            span.set_attributes(
                {
                    "meshpilot.tool.outcome": "ok" if execution.outcome.error is None else "error",
                    "meshpilot.tool.replayed": execution.replayed,
                }
            )
        return execution_to_proto(request.call_id, execution)

    def _sources(self) -> ToolSources:
        if self.sources is None:
            raise FailedPreconditionError("this tools service has no tool sources (it was built without them)")
        return self.sources

    async def RegisterToolSource(
        self, request: tools_pb2.RegisterToolSourceRequest, context: grpc.aio.ServicerContext
    ) -> tools_pb2.ToolSource:
        sources = self._sources()
        info = await sources.register(spec_from_proto(request.source), tenant_of(context.invocation_metadata()))
        return source_to_proto(info)

    async def ListToolSources(
        self, request: tools_pb2.ListToolSourcesRequest, context: grpc.aio.ServicerContext
    ) -> tools_pb2.ListToolSourcesResponse:
        sources = (
            self.sources.list_sources(tenant_of(context.invocation_metadata())) if self.sources is not None else []
        )
        return tools_pb2.ListToolSourcesResponse(sources=[source_to_proto(info) for info in sources])

    async def UnregisterToolSource(
        self, request: tools_pb2.UnregisterToolSourceRequest, context: grpc.aio.ServicerContext
    ) -> tools_pb2.UnregisterToolSourceResponse:
        await self._sources().unregister(request.name, tenant_of(context.invocation_metadata()))
        return tools_pb2.UnregisterToolSourceResponse()
