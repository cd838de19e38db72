"""A small lab of "hosts" for multi-host tests: Linux network namespaces on one bridge, each with its own address,
reached from the test over the bridge; a host's link can be cut and restored and its packets dropped at random.

Everything lives in a private 10.213.N.0/24 the lab creates and removes (N chosen among those no route uses, so two
labs can run at once): no traffic leaves this machine. It needs root
(CI and these machines run as root), iproute2 and, for packet loss, nftables; ``unavailable()`` says why not.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass


def _free_subnet() -> str:
    routes = subprocess.run(["ip", "-4", "route", "show"], check=True, capture_output=True, text=True).stdout
    for third in random.sample(range(256), 256):
        if f"10.213.{third}." not in routes:
            return f"10.213.{third}"
    raise RuntimeError("every 10.213.N.0/24 is in use")


def _ip(*args: str, netns: str | None = None) -> str:
    command = ["ip", *(["netns", "exec", netns, "ip"] if netns else []), *args]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def unavailable() -> str | None:
    """Why this machine cannot run the lab (None: it can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install {package})"
    probe = f"mp-probe-{uuid.uuid4().hex[:6]}"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as e:
        return f"cannot create a network namespace: {e.stderr.strip()[:200]}"
    _ip("netns", "del", probe)
    return None


@dataclass
class Host:
    """One namespace: ``address`` on the lab's bridge through the veth pair ``inside``/``outside``."""

    name: str
    netns: str
    address: str
    inside: str
    outside: str

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def cut(self) -> None:
        """Takes the host's link down: nothing reaches it or leaves it until ``restore``."""
        _ip("link", "set", self.inside, "down", netns=self.netns)

    def restore(self) -> None:
        _ip("link", "set", self.inside, "up", netns=self.netns)

    def drop_packets(self, percent: int) -> None:
        """Drops ``percent``% of the packets the host receives and sends, chosen at random (nftables' numgen)."""
        table = "table inet chaos"
        rules = "\n".join(
            [
                f"{table} {{",
                f"  chain inbound {{ type filter hook input priority 0; numgen random mod 100 < {percent} counter drop; }}",
                f"  chain outbound {{ type filter hook output priority 0; numgen random mod 100 < {percent} counter drop; }}",
                "}",
            ]
        )
        subprocess.run(self.command(["nft", "-f", "-"]), input=rules, check=True, capture_output=True, text=True)

    def dropped_packets(self) -> int:
        """Packets the ``drop_packets`` rules have dropped so far."""
        ruleset = subprocess.run(
            self.command(["nft", "list", "table", "inet", "chaos"]), check=True, capture_output=True, text=True
        ).stdout
        return sum(int(part.split()[0]) for part in ruleset.split("packets ")[1:])


class Lab:
    """A bridge in this namespace (the test's side, ``gateway``) and hosts plugged into it; ``close`` removes all."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:5]
        self.bridge = f"mpbr{self.tag}"
        self.subnet = _free_subnet()
        self.gateway = f"{self.subnet}.1"
        self.hosts: list[Host] = []
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def add_host(self, name: str) -> Host:
        index = len(self.hosts) + 1
        host = Host(
            name=name,
            netns=f"mp-{self.tag}-{name}",
            address=f"{self.subnet}.{10 + index}",
            inside=f"mpi{self.tag}{index}",
            outside=f"mpo{self.tag}{index}",
        )
        _ip("netns", "add", host.netns)
        self.hosts.append(host)
        _ip("link", "add", host.outside, "type", "veth", "peer", "name", host.inside)
        _ip("link", "set", host.inside, "netns", host.netns)
        _ip("link", "set", host.outside, "master", self.bridge)
        _ip("link", "set", host.outside, "up")
        _ip("addr", "add", f"{host.address}/24", "dev", host.inside, netns=host.netns)
        _ip("link", "set", host.inside, "up", netns=host.netns)
        _ip("link", "set", "lo", "up", netns=host.netns)
        return host

    def close(self) -> None:
        for host in self.hosts:
            subprocess.run(["ip", "netns", "del", host.netns], capture_output=True)
            subprocess.run(["ip", "link", "del", host.outside], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


class TcpForwarder:
    """Accepts on ``listen`` (host, port) and pipes each connection to ``upstream``: lets the hosts reach a server
    that listens on this namespace's loopback only (the machine's PostgreSQL). Runs its own event loop in a thread."""

    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int]) -> None:
        self.listen = listen
        self.upstream = upstream
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._server: asyncio.Server | None = None
        self._thread.start()
        if not self._ready.wait(10) or self._server is None:
            raise RuntimeError(f"the forwarder could not listen on {listen}")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._server = self._loop.run_until_complete(asyncio.start_server(self._pipe, *self.listen))
        finally:
            self._ready.set()
        self._loop.run_forever()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_copy(reader, up_writer), _copy(up_reader, writer))

    def close(self) -> None:
        if self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()
