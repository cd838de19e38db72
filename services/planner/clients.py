"""The planner's clients of the inference and tools services, over their generated gRPC stubs."""

from __future__ import annotations

import json
import weakref
from typing import Any

import grpc

from meshpilot.inference.v1 import inference_pb2, inference_pb2_grpc
from meshpilot.tools.v1 import tools_pb2, tools_pb2_grpc
from services.common import rpc_error_to_mesh_error
from services.common.auth import TENANT_METADATA, current_principal
from services.common.json_values import message_to_json
from services.common.routing import ReplicaSet, routing_key
from services.planner.convert import duration, json_to_struct, timings_from_proto, usage_from_proto
from services.planner.types import GREEDY, Generation, Sampling, ToolOutcome, ToolSpec

# The deadline of listings made without one (the checks of an agent definition).
LOOKUP_TIMEOUT_S = 10.0
# ListModels starts an engine for each model registered since its last look (meshpilot train's), before it answers:
# seconds each on 2 cores, and more than LOOKUP_TIMEOUT_S while they are busy (a training job's CreateAgent hit it).
MODEL_LIST_TIMEOUT_S = 120.0


class InferenceLLMClient:
    """Schema-constrained chat completions from the inference service (the planner's LLMClient).

    Over a ReplicaSet, each Generate is routed by the routing_key in context, else by its tenant, model and system
    prompt (the prefix every step of one agent shares, so its replica keeps that prefix's KV cached), and a replica
    that refuses it (UNAVAILABLE, RESOURCE_EXHAUSTED) hands it to the next. A channel is one replica.
    """

    def __init__(self, channel: grpc.aio.Channel | ReplicaSet) -> None:
        self.replicas = (
            channel if isinstance(channel, ReplicaSet) else ReplicaSet({"inference": channel}, watch_health=False)
        )
        # Per channel, made on first use: a discovered ReplicaSet gains and loses channels as replicas come and go.
        self._stubs: weakref.WeakKeyDictionary[grpc.aio.Channel, inference_pb2_grpc.InferenceServiceStub] = (
            weakref.WeakKeyDictionary()
        )

    def _stub(self, channel: grpc.aio.Channel) -> inference_pb2_grpc.InferenceServiceStub:
        if (stub := self._stubs.get(channel)) is None:
            stub = self._stubs[channel] = inference_pb2_grpc.InferenceServiceStub(channel)
        return stub

    async def generate(
        self,
        messages: list[dict[str, str]],
        json_schema: dict[str, Any],
        max_tokens: int,
        *,
        timeout: float | None = None,
        model: str = "",
        sampling: Sampling = GREEDY,
    ) -> Generation:
        params = inference_pb2.SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p)
        if sampling.seed is not None:
            params.seed = sampling.seed
        request = inference_pb2.GenerateRequest(
            model=model,
            chat=inference_pb2.ChatInput(
                messages=[inference_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages]
            ),
            max_tokens=max_tokens,
            sampling=params,
            constraint=inference_pb2.OutputConstraint(json_schema=json.dumps(json_schema, ensure_ascii=False)),
        )
        metadata = _tenant_metadata()
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
        key = routing_key.get() or f"{metadata[0][1]}\x00{model}\x00{system}"
        parts: list[str] = []
        last = inference_pb2.GenerateResponse()
        try:
            async for response in self.replicas.stream(
                key, lambda channel: self._stub(channel).Generate(request, timeout=timeout, metadata=metadata)
            ):
                parts.append(response.text)
                last = response
        except grpc.aio.AioRpcError as e:
            raise rpc_error_to_mesh_error(e, "inference") from e
        return Generation("".join(parts), usage_from_proto(last.usage), timings_from_proto(last.timings))

    async def list_models(self, *, timeout: float | None = None) -> list[str]:
        """The models of the first healthy replica (replicas serve the same ones); it may load new ones first, so it
        waits up to MODEL_LIST_TIMEOUT_S."""
        request = inference_pb2.ListModelsRequest()
        try:
            response = await self.replicas.unary(
                "", lambda channel: self._stub(channel).ListModels(request, timeout=timeout or MODEL_LIST_TIMEOUT_S)
            )
        except grpc.aio.AioRpcError as e:
            raise rpc_error_to_mesh_error(e, "inference") from e
        return [model.id for model in response.models]


def _tenant_metadata() -> tuple[tuple[str, str], ...]:
    """Whom a call acts for: the tenant of the RPC being handled, or the run's (``acting_as``)."""
    return ((TENANT_METADATA, current_principal().tenant),)


class ToolsServiceClient:
    """The tools service as the planner's ToolClient: NOT_FOUND and INVALID_ARGUMENT surface as those MeshErrors.
    Calls carry the tenant they act for: a tenant sees and runs the tools of its own sources, and everyone's."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = tools_pb2_grpc.ToolsServiceStub(channel)

    async def list_tools(self, *, timeout: float | None = None) -> list[ToolSpec]:
        try:
            response = await self._stub.ListTools(
                tools_pb2.ListToolsRequest(), timeout=timeout or LOOKUP_TIMEOUT_S, metadata=_tenant_metadata()
            )
        except grpc.aio.AioRpcError as e:
            raise rpc_error_to_mesh_error(e, "tools") from e
        return [
            ToolSpec(
                tool.name,
                tool.description,
                message_to_json(tool.input_schema),
                tool.requires_approval,
            )
            for tool in response.tools
        ]

    async def execute(
        self,
        call_id: str,
        name: str,
        arguments: dict[str, Any],
        *,
        timeout: float | None = None,
        idempotency_key: str = "",
        approval_token: str = "",
        run_id: str = "",
    ) -> ToolOutcome:
        request = tools_pb2.ExecuteToolRequest(
            call_id=call_id,
            name=name,
            arguments=json_to_struct(arguments),
            idempotency_key=idempotency_key,
            approval_token=approval_token,
            run_id=run_id,
        )
        if timeout is not None:
            request.timeout.CopyFrom(duration(timeout))
        try:
            response = await self._stub.ExecuteTool(request, timeout=timeout, metadata=_tenant_metadata())
        except grpc.aio.AioRpcError as e:
            raise rpc_error_to_mesh_error(e, "tools") from e
        seconds = response.duration.ToNanoseconds() / 1e9
        if response.WhichOneof("outcome") == "error":
            message = response.error.message or "the tool failed"
            return ToolOutcome(error=message, duration_s=seconds, replayed=response.replayed)
        result = message_to_json(response.result)
        return ToolOutcome(result=result, duration_s=seconds, replayed=response.replayed)
