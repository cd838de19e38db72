"""The mesh a fuzz run aims at: the four services in this process (over a fake engine) or as real processes, and
the values a real client would send (hints), so fuzzed requests get past the first check."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inference_core.testing import FakeEngine
from services.common import MeshConfig, MeshServer, create_channel, load_config
from services.inference import create_server as inference_server
from services.inference import servicer_of
from services.knowledge import OxigraphStore
from services.knowledge import create_server as knowledge_server
from services.knowledge.dataset import NAMESPACE, DatasetSpec
from services.planner import create_server as planner_server
from services.tools import create_server as tools_server

SERVICES = ("knowledge", "tools", "inference", "planner")
# Health and reflection are the same stock services on every server; they are fuzzed on this one.
STOCK_HOST = "planner"


def host_of(service: str) -> str:
    """The mesh service that serves the gRPC service named ``service``: meshpilot.<name>.v1.* is <name>'s, the A2A
    binding (lf.a2a.v1.*) the planner's."""
    parts = service.split(".")
    if parts[:2] == ["lf", "a2a"]:
        return "planner"
    return parts[1] if parts[0] == "meshpilot" and len(parts) == 4 else STOCK_HOST


SUBSET = DatasetSpec(countries=frozenset({"FR", "DE", "JP", "CI"}))
FAKE_ANSWER = json.dumps({"final_answer": "Paris"})


def hints(model_id: str) -> dict[str, Sequence[Any]]:
    """Values real clients send, by field name (or full field name); ``campaign.seed_hints`` adds a real run."""
    return {
        "sparql": [
            "SELECT ?s WHERE { ?s a mp:Country } LIMIT 3",
            "ASK { mp:country/FR rdfs:label ?l }",
            "SELECT * WHERE { ?s ?p ?o",
            "INSERT DATA { <a:b> <a:c> <a:d> }",
            "SELECT * WHERE { SERVICE <http://example.org/> { ?s ?p ?o } }",
            "CONSTRUCT WHERE { mp:country/JP ?p ?o }",
        ],
        "label": ["France", "japan", "日本", "Côte d’Ivoire", "!!!"],
        "iri": ["mp:country/FR", f"{NAMESPACE}country/JP", "<mp:country/DE>", "not an iri", "mp:nothing/here"],
        "type": ["Country", "City", "NoSuchType"],
        "model": [model_id, "no-such-model"],
        "prompt": ["What is the capital of France?", "Say hi."],
        "role": ["user", "system", "assistant", "robot"],
        "content": ["Hello", "What is 2+2?"],
        "json_schema": ['{"type": "object"}', '{"type": "no-such-type"}', "{not json"],
        "regex": ["[0-9]+", "[unclosed"],
        "ebnf_grammar": ['root ::= "yes" | "no"', "root ::= undefined_rule"],
        "meshpilot.tools.v1.ExecuteToolRequest.name": [
            "calculator",
            "current_time",
            "country_facts",
            "entity_facts",
            "sparql_query",
            "append_note",
            "python",
            "no_such_tool",
        ],
        "arguments": [
            {"expression": "2+2"},
            {"expression": "1/0"},
            {"name": "France"},
            {"name": "Bavaria"},
            {"timezone": "Asia/Tokyo"},
            {"query": "SELECT ?s WHERE { ?s a mp:Country } LIMIT 2"},
            {"notebook": "fuzz", "text": "hello"},
            {"code": "print(6 * 7)"},
            {},
        ],
        "task": ["What is the capital of France?", "Compute 2+2."],
        "meshpilot.planner.v1.CreateAgentRequest.name": ["fuzz-agent", "Bad Name!", "default"],
        "meshpilot.planner.v1.UpdateAgentRequest.name": ["fuzz-agent", "no-such-agent"],
        "meshpilot.planner.v1.GetAgentRequest.name": ["fuzz-agent", "default", ""],
        "meshpilot.planner.v1.DeleteAgentRequest.name": ["no-such-agent", "default"],
        "meshpilot.planner.v1.RunRequest.agent": ["", "default", "fuzz-agent"],
        "instructions": ["You answer questions about countries."],
        "tools": ["*", "calculator", "no_such_tool"],
        "run_id": ["0" * 32],
        "session_id": [""],
    }


class InProcessMesh:
    """The four services on port 0 in this process: knowledge over a small on-disk store, tools with the built-in
    tools (no python sandbox) over that knowledge service, inference over a FakeEngine that always answers, and a
    planner over those two (through real gRPC clients)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.config: MeshConfig = load_config(
            data_dir=str(data_dir),
            knowledge={"server": {"port": 0, "metrics": False}},
            tools={"server": {"port": 0, "metrics": False}, "sandbox": {"enabled": False}},
            inference={"server": {"port": 0, "metrics": False}, "model_id": "fake-model"},
            planner={"server": {"port": 0, "metrics": False}},
        )
        self.servers: dict[str, MeshServer] = {}
        self.channels: dict[str, grpc.aio.Channel] = {}
        self.store = OxigraphStore(data_dir / "knowledge", dataset=SUBSET, max_limit=50)
        self.engine = FakeEngine(lambda request: FAKE_ANSWER)

    def target(self, name: str) -> str:
        return self.servers[name].address

    async def __aenter__(self) -> InProcessMesh:
        await self.store.start()
        self.servers["knowledge"] = knowledge_server(self.config, self.store)
        await self._start("knowledge")
        self.config.knowledge.server.port = self.servers["knowledge"].port
        self.channels["knowledge"] = create_channel(self.target("knowledge"))
        from meshpilot.knowledge.v1 import knowledge_pb2_grpc

        self.servers["tools"] = tools_server(
            self.config, knowledge_stub=knowledge_pb2_grpc.KnowledgeServiceStub(self.channels["knowledge"])
        )
        await self._start("tools")
        self.servers["inference"] = inference_server(self.config, engine=self.engine)
        await self.servers["inference"].start()
        await servicer_of(self.servers["inference"]).start_engines()
        await self.servers["inference"].set_serving()
        self.config.tools.server.port = self.servers["tools"].port
        self.config.inference.server.port = self.servers["inference"].port
        self.servers["planner"] = planner_server(self.config)
        await self._start("planner")
        for name in ("tools", "inference", "planner"):
            self.channels[name] = create_channel(self.target(name))
        return self

    async def _start(self, name: str) -> None:
        await self.servers[name].start()
        await self.servers[name].set_serving()

    async def __aexit__(self, *exc: object) -> None:
        for channel in self.channels.values():
            await channel.close()
        for name in reversed(list(self.servers)):
            await self.servers[name].stop(0)
        await self.servers["planner"].bindings[0].servicer.close()
        await self.store.close()


async def health_statuses(channels: Mapping[str, grpc.aio.Channel]) -> dict[str, str]:
    """Each service's overall health status name (SERVING, NOT_SERVING...) or the error that answered instead."""
    statuses = {}
    for name, channel in channels.items():
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            statuses[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.aio.AioRpcError as e:
            statuses[name] = f"{e.code().name}: {e.details()}"
    return statuses
