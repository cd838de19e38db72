"""Routing over inference replicas: rendezvous ranking with bounded load, health watches and failover, against
in-process servers on port 0 with a recording fake inference service."""

from __future__ import annotations

import asyncio
import socket

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from meshpilot.common.v1 import common_pb2
from meshpilot.inference.v1 import inference_pb2, inference_pb2_grpc
from services.common import InvalidArgumentError, MeshError, ResourceExhaustedError, create_channel, routing
from services.common.config import ConfigError, load_config
from services.common.routing import ReplicaSet, routed_by
from services.planner import InferenceLLMClient
from tests.unit.tools_fakes import eventually

SYSTEM = [{"role": "system", "content": "You are the travel agent."}, {"role": "user", "content": "Hi"}]


class Replica(inference_pb2_grpc.InferenceServiceServicer):
    """A fake inference replica: answers, or aborts every call with ``fail`` (after one response if ``partial``)."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail: grpc.StatusCode | None = None
        self.partial = False
        self.loading_s = 0.0  # how long ListModels takes (it loads newly registered models first)

    async def Generate(self, request, context):
        self.calls += 1
        if self.fail is not None and not self.partial:
            await context.abort(self.fail, "refused")
        yield inference_pb2.GenerateResponse(text='{"final_answer": "ok"}')
        if self.fail is not None:
            await context.abort(self.fail, "broke mid-stream")
        yield inference_pb2.GenerateResponse(usage=common_pb2.Usage(prompt_tokens=5, completion_tokens=3))

    async def ListModels(self, request, context):
        await asyncio.sleep(self.loading_s)
        return inference_pb2.ListModelsResponse(models=[inference_pb2.Model(id="m")])


class Served:
    def __init__(self) -> None:
        self.fake = Replica()
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server()
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(self.fake, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.target = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"

    async def serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", status)


@pytest.fixture
async def mesh():
    replicas = [Served() for _ in range(3)]
    for replica in replicas:
        await replica.serving(True)
        await replica.server.start()
    routes = ReplicaSet.connect([r.target for r in replicas])
    yield routes, {r.target: r for r in replicas}
    await routes.close()
    for replica in replicas:
        await replica.server.stop(0)


def offline(n: int = 3, **options) -> ReplicaSet:
    """Replicas nobody listens at, for ranking alone (no health watch, no calls)."""
    return ReplicaSet(
        {f"10.0.0.{i}:1": create_channel(f"10.0.0.{i}:1") for i in range(n)}, watch_health=False, **options
    )


def key_first_on(routes: ReplicaSet, target: str) -> str:
    return next(key for key in (f"agent-{i}" for i in range(1000)) if routes.ranked(key)[0].target == target)


async def until(condition, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_ranking_is_stable_per_key_and_spreads_keys() -> None:
    routes = offline()
    assert [r.target for r in routes.ranked("tenant/agent")] == [r.target for r in routes.ranked("tenant/agent")]
    firsts = [routes.ranked(f"agent-{i}")[0].target for i in range(300)]
    assert {target: firsts.count(target) > 60 for target in set(firsts)} == {r.target: True for r in routes.replicas}
    await routes.close()


async def test_round_robin_takes_replicas_in_turn_whatever_the_key() -> None:
    routes = offline(policy="round_robin")
    firsts = [routes.ranked("same key")[0].target for _ in range(6)]
    assert firsts == [r.target for r in routes.replicas] * 2
    await routes.close()


async def test_bounded_load_moves_a_key_off_an_overloaded_replica_and_back() -> None:
    routes = offline(2)
    home, other = routes.ranked("hot agent")
    home.in_flight = 2  # this call makes 3 against 0: over the cap of ceil(1.25 x (2 + 0 + 1) / 2) = 2
    assert routes.ranked("hot agent") == [other, home]
    home.in_flight, other.in_flight = 3, 2  # cap ceil(1.25 x 6 / 2) = 4
    assert routes.ranked("hot agent") == [home, other]
    await routes.close()


async def test_an_unhealthy_replica_is_skipped_at_once_and_back_when_serving(mesh) -> None:
    routes, served = mesh
    client = InferenceLLMClient(routes)
    key = key_first_on(routes, routes.replicas[1].target)
    home = routes.replicas[1]
    with routed_by(key):
        await client.generate(SYSTEM, {}, 8, model="m")
    await until(lambda: all(r.healthy for r in routes.replicas))  # the watches have their first answer
    assert served[home.target].fake.calls == 1

    await served[home.target].serving(False)
    await until(lambda: not home.healthy)
    with routed_by(key):
        await client.generate(SYSTEM, {}, 8, model="m")
    assert served[home.target].fake.calls == 1
    assert sum(r.fake.calls for r in served.values()) == 2

    await served[home.target].serving(True)
    await until(lambda: home.healthy)
    with routed_by(key):
        await client.generate(SYSTEM, {}, 8, model="m")
    assert served[home.target].fake.calls == 2


async def test_a_stopped_replica_is_skipped(mesh) -> None:
    routes, served = mesh
    key = key_first_on(routes, routes.replicas[0].target)
    routes.ranked(key)  # starts the watches
    await until(lambda: all(r.healthy for r in routes.replicas))
    await served[routes.replicas[0].target].server.stop(0)
    await until(lambda: not routes.replicas[0].healthy)
    assert routes.ranked(key)[-1] is routes.replicas[0]
    with routed_by(key):
        assert (await InferenceLLMClient(routes).generate(SYSTEM, {}, 8)).text == '{"final_answer": "ok"}'


@pytest.mark.parametrize("code", [grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE])
async def test_a_refused_call_fails_over_to_the_next_replica(mesh, code) -> None:
    routes, served = mesh
    key = key_first_on(routes, routes.replicas[0].target)
    first, second, _ = routes.ranked(key)
    served[first.target].fake.fail = code
    with routed_by(key):
        generation = await InferenceLLMClient(routes).generate(SYSTEM, {}, 8)
    assert generation.text == '{"final_answer": "ok"}'
    assert served[first.target].fake.calls >= 1 and served[second.target].fake.calls == 1
    assert all(r.in_flight == 0 for r in routes.replicas)


async def test_every_replica_refusing_raises_the_last_refusal(mesh) -> None:
    routes, served = mesh
    for replica in served.values():
        replica.fake.fail = grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(ResourceExhaustedError):
        await InferenceLLMClient(routes).generate(SYSTEM, {}, 8)
    assert [r.fake.calls for r in served.values()] == [1, 1, 1]


async def test_other_errors_and_errors_after_a_response_do_not_fail_over(mesh) -> None:
    routes, served = mesh
    key = key_first_on(routes, routes.replicas[0].target)
    first = served[routes.replicas[0].target].fake
    first.fail = grpc.StatusCode.INVALID_ARGUMENT
    with routed_by(key), pytest.raises(InvalidArgumentError):
        await InferenceLLMClient(routes).generate(SYSTEM, {}, 8)
    first.fail, first.partial = grpc.StatusCode.RESOURCE_EXHAUSTED, True  # the caller already has text
    with routed_by(key), pytest.raises(ResourceExhaustedError):
        await InferenceLLMClient(routes).generate(SYSTEM, {}, 8)
    assert first.calls == 2 and sum(r.fake.calls for r in served.values()) == 2


async def test_agents_keep_their_replica_and_list_models_answers(mesh) -> None:
    routes, served = mesh
    client = InferenceLLMClient(routes)
    for agent in ("travel", "weather", "math", "news"):
        messages = [{"role": "system", "content": f"You are the {agent} agent."}, {"role": "user", "content": "q"}]
        before = {t: r.fake.calls for t, r in served.items()}
        for _ in range(3):
            await client.generate(messages, {}, 8, model="m")
        assert sorted(r.fake.calls - before[t] for t, r in served.items()) == [0, 0, 3]
    assert await client.list_models() == ["m"]


async def test_list_models_waits_for_models_loading_longer_than_a_lookup(mesh, monkeypatch) -> None:
    from services.planner import clients

    routes, served = mesh
    for replica in served.values():
        replica.fake.loading_s = 0.5
    monkeypatch.setattr(clients, "LOOKUP_TIMEOUT_S", 0.1)
    assert await InferenceLLMClient(routes).list_models() == ["m"]
    monkeypatch.setattr(clients, "MODEL_LIST_TIMEOUT_S", 0.1)
    with pytest.raises(MeshError, match=r"DEADLINE_EXCEEDED|Deadline"):
        await InferenceLLMClient(routes).list_models()


@pytest.mark.parametrize("bad", ["nohost", "host:99999", "http://x", "host:0", ""])
def test_a_bad_replica_address_is_refused_at_config_load(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"inference\.replicas\[1\]"):
        load_config(None, inference={"replicas": ["127.0.0.1:50054", bad]})


def test_replicas_default_to_the_server_and_accept_targets() -> None:
    assert load_config(None).inference.replica_targets() == ["127.0.0.1:50054"]
    targets = ["10.0.0.1:50054", "dns:///inference-1:50054", "[::1]:6000"]
    config = load_config(None, inference={"replicas": targets, "routing": "round_robin"})
    assert config.inference.replica_targets() == targets and config.inference.routing == "round_robin"
    with pytest.raises(ConfigError, match="twice"):
        load_config(None, inference={"replicas": ["a:1", "a:1"]})
    with pytest.raises(ConfigError, match="routing"):
        load_config(None, inference={"routing": "random"})


class Dns:
    """A resolver whose answer the test sets: a set of targets, or an error."""

    def __init__(self, targets: set[str]) -> None:
        self.targets = targets
        self.error: OSError | None = None
        self.asked: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> set[str]:
        self.asked.append((host, port))
        if self.error is not None:
            raise self.error
        return set(self.targets)


async def test_discovered_replicas_follow_dns_as_replicas_come_and_go(mesh, monkeypatch) -> None:
    _, served = mesh
    monkeypatch.setattr(routing, "RETIRE_GRACE_S", 0.0)
    first, second, third = served
    dns = Dns({first, second})
    routes = ReplicaSet.discover("inference-headless", 50054, every=3600, resolve=dns)
    try:
        # Before the first answer the name itself is the one replica (gRPC resolves it), so no call waits for DNS.
        assert [r.target for r in routes.replicas] == ["dns:///inference-headless:50054"]
        await routes.refresh()
        assert dns.asked == [("inference-headless", 50054)]
        assert sorted(r.target for r in routes.replicas) == sorted([first, second])
        client = InferenceLLMClient(routes)
        await client.generate(SYSTEM, {}, 8, model="m")
        assert served[first].fake.calls + served[second].fake.calls == 1

        dns.targets = {second, third}  # scaled: first left, third joined
        gone = next(r.channel for r in routes.replicas if r.target == first)
        await routes.refresh()
        assert sorted(r.target for r in routes.replicas) == sorted([second, third])
        await eventually(lambda: gone.get_state() == grpc.ChannelConnectivity.SHUTDOWN)
        for agent in range(12):
            await client.generate([{"role": "system", "content": f"agent {agent}"}, SYSTEM[1]], {}, 8, model="m")
        assert served[first].fake.calls <= 1 and served[second].fake.calls + served[third].fake.calls >= 12

        # DNS trouble or an empty answer never empties a working set.
        dns.error = socket.gaierror(-2, "Name or service not known")
        await routes.refresh()
        dns.error, dns.targets = None, set()
        await routes.refresh()
        assert sorted(r.target for r in routes.replicas) == sorted([second, third])
    finally:
        await routes.close()


async def test_discovery_resolves_again_in_the_background_from_the_first_call(mesh) -> None:
    _, served = mesh
    first, second, _ = served
    dns = Dns({first})
    routes = ReplicaSet.discover("inference-headless", 50054, every=0.05, resolve=dns)
    try:
        assert dns.asked == []  # nothing runs before the first call
        routes.ranked("k")
        await eventually(lambda: [r.target for r in routes.replicas] == [first])
        dns.targets = {first, second}
        await eventually(lambda: sorted(r.target for r in routes.replicas) == sorted([first, second]))
    finally:
        await routes.close()
    asked = len(dns.asked)
    await asyncio.sleep(0.2)
    assert len(dns.asked) == asked, "discovery went on after close()"


async def test_the_system_resolver_gives_every_address_of_a_name() -> None:
    assert "127.0.0.1:50054" in await routing.resolve_addresses("localhost", 50054)


async def test_a_name_not_yet_resolved_is_reached_through_grpc_dns(mesh) -> None:
    _, served = mesh
    port = int(next(iter(served)).rpartition(":")[2])
    routes = ReplicaSet.discover("localhost", port, every=3600, resolve=Dns(set()))
    try:
        assert await InferenceLLMClient(routes).list_models() == ["m"]
    finally:
        await routes.close()


def test_discover_takes_a_host_and_port_and_refuses_anything_else() -> None:
    config = load_config(None, inference={"discover": "inference-headless.meshpilot.svc:50054"})
    assert config.inference.discover_address() == ("inference-headless.meshpilot.svc", 50054)
    assert load_config(None).inference.discover_address() is None
    for bad in ("dns:///x:1", "x", "x:0", "x:70000", "a b:1"):
        with pytest.raises(ConfigError, match=r"inference\.discover"):
            load_config(None, inference={"discover": bad})
    with pytest.raises(ConfigError, match="discover_seconds"):
        load_config(None, inference={"discover": "x:1", "discover_seconds": 0})
