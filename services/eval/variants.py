"""Agents that differ from another only in their model: how `meshpilot eval --model` compares models side by side."""

from __future__ import annotations

import dataclasses
import re

import grpc

from meshpilot.planner.v1 import agents_pb2, agents_pb2_grpc
from services.eval.suite import Suite

DEFAULT_AGENT = "default"


def variant_name(agent: str, model: str) -> str:
    """The agent that runs ``agent``'s spec on ``model``: "geo" + "SmolLM2-135M" -> "geo-on-smollm2-135m"."""
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-") or "model"
    return f"{agent or DEFAULT_AGENT}-on-{slug}"[:63].rstrip("-")


async def agent_on_model(
    channel: grpc.aio.Channel,
    agent: str,
    model: str,
    *,
    builtin_examples: bool | None = None,
    timeout_s: float = 30.0,
) -> str:
    """Makes (or brings up to date) the caller's agent ``variant_name(agent, model)``: ``agent``'s latest spec with
    ``model`` (and the planner's built-in examples as ``builtin_examples`` says; None: as ``agent``); returns its
    name. The planner checks the model against the inference service's ListModels."""
    stub = agents_pb2_grpc.AgentServiceStub(channel)
    base = await stub.GetAgent(agents_pb2.GetAgentRequest(name=agent or DEFAULT_AGENT), timeout=timeout_s)
    spec = agents_pb2.AgentSpec()
    spec.CopyFrom(base.spec)
    spec.model = model
    if builtin_examples is not None:
        spec.builtin_examples = builtin_examples
    name = variant_name(agent, model)
    try:
        await stub.CreateAgent(agents_pb2.CreateAgentRequest(name=name, spec=spec), timeout=timeout_s)
    except grpc.aio.AioRpcError as e:
        if e.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise
        current = await stub.GetAgent(agents_pb2.GetAgentRequest(name=name), timeout=timeout_s)
        if current.spec != spec:
            await stub.UpdateAgent(agents_pb2.UpdateAgentRequest(name=name, spec=spec), timeout=timeout_s)
    return name


async def suite_on_model(
    channel: grpc.aio.Channel, suite: Suite, model: str, *, builtin_examples: bool | None = None
) -> Suite:
    """``suite`` with each task that runs as its own agent (a BFCL task's) run as ``<that agent>-on-<model>`` instead,
    made by ``agent_on_model``."""
    variants = {
        agent: await agent_on_model(channel, agent, model, builtin_examples=builtin_examples)
        for agent in dict.fromkeys(task.agent for task in suite.tasks if task.agent)
    }
    tasks = (dataclasses.replace(task, agent=variants[task.agent]) if task.agent else task for task in suite.tasks)
    return Suite(suite.name, tuple(tasks), suite.path)
