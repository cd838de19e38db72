"""Recording fakes of the planner's LLM and tool clients, shared by the planner's unit tests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import grpc

from meshpilot.planner.v1 import agents_pb2_grpc, planner_pb2, planner_pb2_grpc
from services.common import InvalidArgumentError, MeshError, NotFoundError
from services.planner import Generation, Sampling, Timings, ToolOutcome, ToolSpec, Usage, create_server
from services.planner.types import GREEDY

COUNTRY_FACTS = ToolSpec(
    "country_facts",
    "Facts about a country.",
    {"type": "object", "properties": {"country": {"type": "string"}}, "required": ["country"]},
)
CALCULATOR = ToolSpec(
    "calculator",
    "Evaluates arithmetic.",
    {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
)
STEP_USAGE = Usage(100, 10, 110)
FACTS = {
    "France": {"country": "France", "capital": "Paris", "currency": "Euro (EUR, €)", "region": "Europe"},
    "Japan": {"country": "Japan", "capital": "Tokyo", "currency": "Japanese yen (JPY, ¥)", "region": "Asia"},
}


def call(tool: str, **arguments: Any) -> str:
    return json.dumps({"tool": tool, "arguments": arguments})


def answer(text: str) -> str:
    return json.dumps({"final_answer": text})


class UnconsumedModelSteps(AssertionError):
    """A test scripted more model outputs than the agent asked for."""


class ScriptedLLM:
    """Returns the scripted outputs in order (an exception in the script is raised instead); records every request.

    ``assert_consumed()`` fails when scripted outputs were left unused, so a test cannot pass on a run that stopped
    early. ``gate``, when set, holds every call until it is set; ``holds[i]`` holds only the i-th call.
    """

    def __init__(
        self, outputs: list[str | MeshError], usage: Usage = STEP_USAGE, models: tuple[str, ...] = ("tiny",)
    ) -> None:
        self.outputs = list(outputs)
        self.usage = usage
        self.models = list(models)
        self.requests: list[dict[str, Any]] = []
        self.gate: asyncio.Event | None = None
        # Calls by index (0 = the first) that wait for their event: a model that hangs on one particular step.
        self.holds: dict[int, asyncio.Event] = {}

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
        self.requests.append(
            {
                "messages": messages,
                "schema": json_schema,
                "max_tokens": max_tokens,
                "timeout": timeout,
                "model": model,
                "sampling": sampling,
            }
        )
        if self.gate is not None:
            await self.gate.wait()
        if (hold := self.holds.get(len(self.requests) - 1)) is not None:
            await hold.wait()
        if not self.outputs:
            raise AssertionError("the agent asked the model more often than the test scripted")
        output = self.outputs.pop(0)
        if isinstance(output, MeshError):
            raise output
        return Generation(output, self.usage, Timings(total_ms=5.0))

    async def list_models(self, *, timeout: float | None = None) -> list[str]:
        return list(self.models)

    def assert_consumed(self) -> None:
        if self.outputs:
            raise UnconsumedModelSteps(
                f"{len(self.outputs)} scripted model outputs were never asked for: {self.outputs}"
            )


class FakeTools:
    """country_facts and calculator over fixed data; NOT_FOUND for other tools, INVALID_ARGUMENT for missing args."""

    def __init__(self, tools: list[ToolSpec] | None = None) -> None:
        self.tools = tools if tools is not None else [COUNTRY_FACTS, CALCULATOR]
        self.calls: list[tuple[str, str, dict[str, Any], float | None]] = []
        self.requests: list[dict[str, Any]] = []
        self.list_error: MeshError | None = None
        self.execute_hook: Callable[[str, dict[str, Any]], Any] | None = None
        # Outcomes by idempotency key, as the tools service keeps them: a repeated key is replayed, not run.
        self.stored: dict[str, ToolOutcome] = {}

    async def list_tools(self, *, timeout: float | None = None) -> list[ToolSpec]:
        if self.list_error is not None:
            raise self.list_error
        return list(self.tools)

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
        self.requests.append(
            {"call_id": call_id, "name": name, "arguments": arguments, "idempotency_key": idempotency_key,
             "approval_token": approval_token, "run_id": run_id}
        )  # fmt: skip
        if idempotency_key in self.stored:
            stored = self.stored[idempotency_key]
            return ToolOutcome(stored.result, stored.error, stored.duration_s, replayed=True)
        self.calls.append((call_id, name, arguments, timeout))
        outcome = await self._run(name, arguments)
        if idempotency_key:
            self.stored[idempotency_key] = outcome
        return outcome

    async def _run(self, name: str, arguments: dict[str, Any]) -> ToolOutcome:
        if self.execute_hook is not None:
            return await self.execute_hook(name, arguments)
        if name == "country_facts":
            if "country" not in arguments:
                raise InvalidArgumentError("arguments.country is required")
            facts = FACTS.get(arguments["country"])
            if facts is None:
                return ToolOutcome(error=f"no country named {arguments['country']!r}", duration_s=0.01)
            return ToolOutcome(result=facts, duration_s=0.01)
        if name == "calculator":
            return ToolOutcome(result={"result": 391}, duration_s=0.01)
        raise NotFoundError(f"no tool named {name!r}; call ListTools for the registered names")


class Planner:
    """A running in-process planner (create_server on port 0) with stubs of PlannerService and AgentService.

    ``restart()`` stops it the way SIGTERM does (runs in flight are left as journaled) and starts a new one on the
    same database, resuming them, as a restarted planner process would.
    """

    def __init__(self, config: Any, llm: ScriptedLLM, tools: FakeTools, signer: Any = None) -> None:
        self.config, self.llm, self.tools, self.signer = config, llm, tools, signer

    async def _start(self) -> None:
        self.server = create_server(self.config, llm=self.llm, tools=self.tools, signer=self.signer)
        self.servicer = self.server.bindings[0].servicer
        await self.servicer.store.open()
        await self.server.start()
        await self.servicer.runs.resume()
        await self.server.set_serving()
        self.channel = grpc.aio.insecure_channel(self.server.address)
        self.stub = planner_pb2_grpc.PlannerServiceStub(self.channel)
        self.agents = agents_pb2_grpc.AgentServiceStub(self.channel)

    async def _stop(self) -> None:
        await self.channel.close()
        await self.server.stop(0)
        await self.servicer.close()

    async def __aenter__(self) -> Planner:
        await self._start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stop()

    async def restart(self) -> None:
        await self._stop()
        await self._start()

    async def run(
        self, task: str = "What is the capital of France?", session_id: str = "", agent: str = "", **budget: Any
    ) -> list:
        request = planner_pb2.RunRequest(
            task=task, session_id=session_id, agent=agent, budget=planner_pb2.RunBudget(**budget)
        )
        return [event async for event in self.stub.Run(request)]
