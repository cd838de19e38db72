"""One mesh service's gRPC channel, callable from plain threads and from any event loop, with errors made ours."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import grpc

from services.common import MeshError, create_channel, rpc_error_to_mesh_error
from services.common.errors import bounded
from services.common.tls import TlsIdentity

T = TypeVar("T")
# Guards lazy opening (the shared loop, each component's connection): a module lock rather than one per instance, so
# that components stay copyable (LangChain and LangGraph copy runnables; a lock cannot be deep-copied).
OPENING = threading.Lock()


class AuthenticationError(MeshError):
    """The service refused the call's credentials (UNAUTHENTICATED): pass a valid ``api_key``."""

    code = grpc.StatusCode.UNAUTHENTICATED


def mesh_error(error: grpc.aio.AioRpcError, service: str, target: str) -> MeshError:
    """A gRPC failure as one of our MeshErrors, naming the service, its address and what to change."""
    where = f"{service} at {target}"
    if error.code() == grpc.StatusCode.UNAUTHENTICATED:
        return AuthenticationError(
            bounded(f"{where}: {error.details()}; pass api_key= (a key from `meshpilot keys create`)")
        )
    translated = rpc_error_to_mesh_error(error, where)
    if error.code() == grpc.StatusCode.UNAVAILABLE:
        hint = f"; is the mesh up (`meshpilot up`) and is {target} the address of its {service} service?"
        return type(translated)(bounded(f"{translated}{hint}"))
    return type(translated)(bounded(str(translated)))


class _SharedLoop:
    """The event loop every MeshConnection of this process runs its channel on: one daemon thread, started on first
    use (again in a forked child, whose copy of the thread does not run)."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pid = 0

    def get(self) -> asyncio.AbstractEventLoop:
        with OPENING:
            if self._loop is None or self._pid != os.getpid():
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="meshpilot-langchain", daemon=True).start()
                self._loop, self._pid = loop, os.getpid()
            return self._loop


_LOOP = _SharedLoop()


class MeshConnection:
    """A channel to one service (``create_channel``: the mesh's retry policy, API key, TLS), opened on first use.

    grpc.aio channels belong to the event loop that made them, while LangChain calls a component from plain threads
    (``invoke``, LangGraph's worker threads) and from whichever loop the caller runs (``ainvoke``). So channels live on
    an event loop of their own on a daemon thread, shared by the process's connections, and every call runs there;
    callers wait on it (sync) or await it (async). A gRPC failure surfaces as a MeshError (``mesh_error``).
    """

    def __init__(
        self,
        service: str,
        target: str,
        *,
        api_key: str | None = None,
        tls: TlsIdentity | None = None,
        server_name: str | None = None,
    ) -> None:
        self.service = service
        self.target = target
        self._api_key = api_key
        self._tls = tls
        self._server_name = server_name
        self._channel: grpc.aio.Channel | None = None

    def __deepcopy__(self, memo: dict[int, Any]) -> MeshConnection:
        # A copy of a component shares its channel: the channel holds no per-call state.
        return self

    async def _on_channel(self, call: Callable[[grpc.aio.Channel], Awaitable[T]]) -> T:
        # Runs on the shared loop only, so opening and closing the channel never race.
        if self._channel is None:
            self._channel = create_channel(self.target, api_key=self._api_key, tls=self._tls, server=self._server_name)
        try:
            return await call(self._channel)
        except grpc.aio.AioRpcError as e:
            raise mesh_error(e, self.service, self.target) from e

    def call(self, call: Callable[[grpc.aio.Channel], Awaitable[T]]) -> T:
        """Runs ``call(channel)`` on the channels' loop and waits for its result."""
        return asyncio.run_coroutine_threadsafe(self._on_channel(call), _LOOP.get()).result()

    async def acall(self, call: Callable[[grpc.aio.Channel], Awaitable[T]]) -> T:
        """Runs ``call(channel)`` on the channels' loop; cancelling the awaiting task cancels the call."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._on_channel(call), _LOOP.get()))

    def stream(self, open_stream: Callable[[grpc.aio.Channel], AsyncIterator[T]]) -> Iterator[T]:
        """The items of ``open_stream(channel)``, one at a time; leaving the loop early cancels the call."""
        stream = _Stream(open_stream)
        loop = _LOOP.get()
        try:
            while True:
                found, item = asyncio.run_coroutine_threadsafe(self._on_channel(stream.next), loop).result()
                if not found:
                    return
                yield item
        finally:
            asyncio.run_coroutine_threadsafe(stream.close(), loop).result()

    async def astream(self, open_stream: Callable[[grpc.aio.Channel], AsyncIterator[T]]) -> AsyncIterator[T]:
        """``stream`` for async callers."""
        stream = _Stream(open_stream)
        loop = _LOOP.get()
        try:
            while True:
                future = asyncio.run_coroutine_threadsafe(self._on_channel(stream.next), loop)
                found, item = await asyncio.wrap_future(future)
                if not found:
                    return
                yield item
        finally:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(stream.close(), loop))

    def close(self) -> None:
        """Closes the channel; a later call opens it again."""
        asyncio.run_coroutine_threadsafe(self._close(), _LOOP.get()).result()

    async def _close(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()


class _Stream:
    """A server stream opened on the connection's loop at the first ``next`` and advanced one item per ``next``."""

    def __init__(self, open_stream: Callable[[grpc.aio.Channel], AsyncIterator[Any]]) -> None:
        self._open = open_stream
        self._call: AsyncIterator[Any] | None = None
        self._iterator: AsyncIterator[Any] | None = None

    async def next(self, channel: grpc.aio.Channel) -> tuple[bool, Any]:
        if self._iterator is None:
            self._call = self._open(channel)
            self._iterator = aiter(self._call)
        try:
            return True, await anext(self._iterator)
        except StopAsyncIteration:
            return False, None

    async def close(self) -> None:
        # A gRPC call is cancelled (a no-op once it ended) so an abandoned stream stops the work on the server too.
        cancel = getattr(self._call, "cancel", None)
        if cancel is not None:
            cancel()
        aclose = getattr(self._iterator, "aclose", None)
        if aclose is not None:
            await aclose()
