"""Client-side routing over N replicas of a service: health watched per replica, rendezvous hashing with bounded load
(so one prefix keeps landing where its KV is cached), failover of calls a replica refused, and replicas discovered
from DNS (a Kubernetes headless Service) as they come and go."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.clients import create_channel
from services.common.tls import TlsIdentity

T = TypeVar("T")
RoutingPolicy = Literal["affinity", "round_robin"]

# Codes that mean the call never ran on that replica (down, draining, or its queue full), so another may serve it.
FAILOVER_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
# A bounded-load cap of ceil(1.25 x the average in flight): a hot key spills over only when its replica is clearly
# busier than the rest, not at the first imbalance (Mirrokni et al., "Consistent Hashing with Bounded Loads").
DEFAULT_LOAD_FACTOR = 1.25
# How soon a replica whose health watch broke is watched again (it is skipped meanwhile).
REWATCH_BACKOFF_S = (0.5, 2.0)
# How long a replica that left DNS keeps serving the calls already sent to it before its channel closes.
RETIRE_GRACE_S = 60.0

Resolver = Callable[[str, int], Awaitable[set[str]]]


async def resolve_addresses(host: str, port: int) -> set[str]:
    """The gRPC targets (``ip:port``, ``[ipv6]:port``) of every address ``host`` resolves to (a headless Service's
    name resolves to its ready pods)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return {f"[{info[4][0]}]:{port}" if info[0] == socket.AF_INET6 else f"{info[4][0]}:{port}" for info in infos}


routing_key: ContextVar[str] = ContextVar("meshpilot_routing_key", default="")


@contextlib.contextmanager
def routed_by(key: str) -> Iterator[None]:
    """Calls made inside route by ``key`` (e.g. a session), overriding the key a client derives itself."""
    token = routing_key.set(key)
    try:
        yield
    finally:
        routing_key.reset(token)


@dataclass
class Replica:
    """One replica: its channel, what its health watch last said, and the calls in flight to it."""

    target: str
    channel: grpc.aio.Channel
    healthy: bool = True  # until its health watch says otherwise: a fresh set routes before the first answer
    in_flight: int = 0


def _score(key: str, target: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}\x00{target}".encode(), digest_size=8).digest(), "big")


class ReplicaSet:
    """Replicas of one service behind ``ranked(key)``: the order in which to try them for a call routed by ``key``.

    ``affinity``: the healthy replicas in rendezvous (highest-random-weight) order of ``key``, those at or over the
    bounded load (in flight >= ceil(load_factor x average, counting this call)) moved behind the rest; a key keeps
    its replica while that is healthy and not overloaded, and losing a replica moves only the keys it held.
    ``round_robin``: the healthy replicas in turn, whatever the key (the baseline). Unhealthy replicas come last in
    both, so a call still has somewhere to go when every watch is failing.

    Health is watched per replica with grpc.health.v1 Watch on the service name ``health_service`` (the stock
    servicer's overall status by default), starting with the first call; a broken watch marks the replica unhealthy
    at once and is renewed after a short backoff. ``close()`` stops the watches and closes the channels.
    """

    def __init__(
        self,
        channels: Mapping[str, grpc.aio.Channel],
        *,
        policy: RoutingPolicy = "affinity",
        load_factor: float = DEFAULT_LOAD_FACTOR,
        health_service: str = "",
        watch_health: bool = True,
    ) -> None:
        if not channels:
            raise ValueError("a ReplicaSet needs at least one replica")
        if load_factor < 1:
            raise ValueError(f"load_factor is {load_factor}; use 1 or more")
        self.replicas = [Replica(target, channel) for target, channel in channels.items()]
        self.policy: RoutingPolicy = policy
        self.load_factor = load_factor
        self._health_service = health_service
        self._watch_health = watch_health
        self._watches: dict[str, asyncio.Task[None]] = {}
        self._watching = False
        self._background: set[asyncio.Task[None]] = set()
        self._follower: asyncio.Task[None] | None = None
        self._retired: list[grpc.aio.Channel] = []
        self._discovery: tuple[str, int, float, Callable[[str], grpc.aio.Channel], Resolver] | None = None
        self._turn = 0
        self._closed = False

    @classmethod
    def connect(
        cls,
        targets: Sequence[str],
        *,
        api_key: str | None = None,
        tls: TlsIdentity | None = None,
        server: str | None = None,
        policy: RoutingPolicy = "affinity",
        load_factor: float = DEFAULT_LOAD_FACTOR,
    ) -> ReplicaSet:
        """One channel per target made by ``create_channel`` (its retry policy, bearer token and mutual TLS)."""
        channels = {target: create_channel(target, api_key=api_key, tls=tls, server=server) for target in targets}
        return cls(channels, policy=policy, load_factor=load_factor)

    @classmethod
    def discover(
        cls,
        host: str,
        port: int,
        *,
        every: float,
        api_key: str | None = None,
        tls: TlsIdentity | None = None,
        server: str | None = None,
        policy: RoutingPolicy = "affinity",
        load_factor: float = DEFAULT_LOAD_FACTOR,
        resolve: Resolver = resolve_addresses,
    ) -> ReplicaSet:
        """Replicas that follow DNS: every address ``host`` resolves to is one, resolved again every ``every``
        seconds from the first call on. Until the first resolution answers, the name itself is the one replica
        (gRPC's own resolver behind it), so calls never wait for discovery."""

        def connect(target: str) -> grpc.aio.Channel:
            return create_channel(target, api_key=api_key, tls=tls, server=server)

        replicas = cls(
            {f"dns:///{host}:{port}": connect(f"dns:///{host}:{port}")}, policy=policy, load_factor=load_factor
        )
        replicas._discovery = (host, port, every, connect, resolve)
        return replicas

    async def refresh(self) -> None:
        """Resolves the discovered name once and makes the replicas its addresses: new ones join (watched from
        now on), gone ones leave the ranking at once and close after ``RETIRE_GRACE_S`` (their calls in flight
        finish). A failed or empty answer changes nothing: DNS trouble must not empty a working set."""
        assert self._discovery is not None, "refresh() is for a ReplicaSet made by discover()"
        host, port, _, connect, resolve = self._discovery
        try:
            targets = await resolve(host, port)
        except OSError:
            return
        if not targets or self._closed:
            return
        current = {replica.target for replica in self.replicas}
        for target in sorted(targets - current):
            replica = Replica(target, connect(target))
            self.replicas.append(replica)
            if self._watching:
                self._watches[target] = asyncio.create_task(self._watch(replica))
        for replica in [r for r in self.replicas if r.target not in targets]:
            self.replicas.remove(replica)
            if (watch := self._watches.pop(replica.target, None)) is not None:
                watch.cancel()
            self._retired.append(replica.channel)
            self._spawn(replica.channel.close(grace=RETIRE_GRACE_S))

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _follow_dns(self, every: float) -> None:
        while not self._closed:
            await self.refresh()
            await asyncio.sleep(every)

    @property
    def channels(self) -> list[grpc.aio.Channel]:
        return [replica.channel for replica in self.replicas]

    def ranked(self, key: str) -> list[Replica]:
        """The replicas in the order to try for a call routed by ``key`` (see the class docstring)."""
        self._start_watching()
        if self._discovery is not None and self._follower is None and not self._closed:
            self._follower = asyncio.create_task(self._follow_dns(self._discovery[2]))
        healthy = [r for r in self.replicas if r.healthy]
        unhealthy = [r for r in self.replicas if not r.healthy]
        if self.policy == "round_robin":
            if healthy:
                start = self._turn % len(healthy)
                self._turn += 1
                healthy = healthy[start:] + healthy[:start]
            return healthy + unhealthy
        healthy.sort(key=lambda r: _score(key, r.target), reverse=True)
        if healthy:
            cap = math.ceil(self.load_factor * (sum(r.in_flight for r in healthy) + 1) / len(healthy))
            healthy = [r for r in healthy if r.in_flight < cap] + [r for r in healthy if r.in_flight >= cap]
        return healthy + unhealthy

    async def stream(self, key: str, call: Callable[[grpc.aio.Channel], AsyncIterator[T]]) -> AsyncIterator[T]:
        """The responses of ``call`` on the first replica of ``ranked(key)`` that takes it: a replica answering
        UNAVAILABLE or RESOURCE_EXHAUSTED before its first response hands the call to the next; any other error, or
        one after a response was streamed, is raised (the caller already has part of the answer)."""
        replicas = self.ranked(key)
        for attempt, replica in enumerate(replicas):
            streamed = False
            replica.in_flight += 1
            try:
                async for response in call(replica.channel):
                    streamed = True
                    yield response
                return
            except grpc.aio.AioRpcError as e:
                if streamed or e.code() not in FAILOVER_CODES or attempt == len(replicas) - 1:
                    raise
            finally:
                replica.in_flight -= 1

    async def unary(self, key: str, call: Callable[[grpc.aio.Channel], Awaitable[T]]) -> T:
        """The reply of ``call`` on the first replica of ``ranked(key)`` that takes it (failover as ``stream``)."""
        replicas = self.ranked(key)
        for attempt, replica in enumerate(replicas):
            replica.in_flight += 1
            try:
                return await call(replica.channel)
            except grpc.aio.AioRpcError as e:
                if e.code() not in FAILOVER_CODES or attempt == len(replicas) - 1:
                    raise
            finally:
                replica.in_flight -= 1
        raise AssertionError("unreachable: a ReplicaSet has at least one replica")

    async def close(self) -> None:
        self._closed = True
        tasks = [*self._watches.values(), *self._background, *([self._follower] if self._follower else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in [*self._retired, *(replica.channel for replica in self.replicas)]:
            await channel.close()

    def _start_watching(self) -> None:
        # One fixed replica is tried whatever its health; a discovered set may grow, so it is watched from the start.
        if self._watching or not self._watch_health or self._closed:
            return
        if len(self.replicas) < 2 and self._discovery is None:
            return
        self._watching = True
        self._watches = {replica.target: asyncio.create_task(self._watch(replica)) for replica in self.replicas}

    async def _watch(self, replica: Replica) -> None:
        stub = health_pb2_grpc.HealthStub(replica.channel)
        request = health_pb2.HealthCheckRequest(service=self._health_service)
        backoff = REWATCH_BACKOFF_S[0]
        while not self._closed:
            try:
                async for update in stub.Watch(request):
                    replica.healthy = update.status == health_pb2.HealthCheckResponse.SERVING
                    backoff = REWATCH_BACKOFF_S[0]
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                    return  # no health service to watch: calls' failover is all there is
                replica.healthy = False
            except grpc.aio.UsageError:
                return  # the channel was closed under us
            if replica.channel.get_state() == grpc.ChannelConnectivity.SHUTDOWN:
                return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, REWATCH_BACKOFF_S[1])
