"""The A2A agent card over HTTP (``/.well-known/agent-card.json``): the planner's agents as the skills of one agent."""

from __future__ import annotations

from typing import Annotated, Any

import grpc
from a2a.types import a2a_pb2, a2a_pb2_grpc
from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from google.protobuf import json_format

from services.common.errors import bounded
from services.edge.deps import call_metadata, planner_channel

WELL_KNOWN_PATH = "/.well-known/agent-card.json"
CARD_TIMEOUT_SECONDS = 10.0
# A2A's HTTP errors (AIP-193 bodies) for what the planner can answer; anything else is a bad gateway.
_HTTP_STATUS = {
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

router = APIRouter()


def error_body(status: int, code: grpc.StatusCode, message: str) -> dict[str, Any]:
    return {"error": {"code": status, "status": code.name, "message": bounded(message, 1000)}}


@router.get(WELL_KNOWN_PATH, response_model=None)
async def get_agent_card(
    channel: Annotated[grpc.aio.Channel, Depends(planner_channel)],
    metadata: Annotated[tuple[tuple[str, str], ...], Depends(call_metadata)],
) -> JSONResponse:
    """The planner's agent card in A2A's JSON (camelCase): its gRPC interface, security scheme, and the caller's
    tenant's agents as skills (the planner's GetExtendedAgentCard, called with the caller's credentials)."""
    stub = a2a_pb2_grpc.A2AServiceStub(channel)
    try:
        card = await stub.GetExtendedAgentCard(
            a2a_pb2.GetExtendedAgentCardRequest(), metadata=metadata, timeout=CARD_TIMEOUT_SECONDS
        )
    except grpc.aio.AioRpcError as error:
        code = error.code()
        status = _HTTP_STATUS.get(code, 502)
        message = error.details() or code.name
        if status == 502:
            message = f"the planner answered {code.name}: {message}"
        return JSONResponse(error_body(status, code, message), status_code=status)
    return JSONResponse(json_format.MessageToDict(card), headers={"Cache-Control": "no-store"})
