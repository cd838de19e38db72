"""Tool sources: MCP servers and OpenAPI documents, declared in the configuration or registered at runtime.

Each source offers its tools as <source>.<tool>. Those registered through the API are kept in the tools database
and come back when the service restarts (and, with a shared database, appear on every replica); those in the YAML
are the configuration's to change.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import json
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.common import (
    AlreadyExistsError,
    ConfigError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
)
from services.common.config import McpServerConfig, OpenApiSourceConfig, ToolsConfig
from services.common.sqlite import SqliteThread, migrate
from services.tools.mcp_client import CONNECT_TIMEOUT_SECONDS, McpServerConnection, McpToolset
from services.tools.openapi import OpenApiError, OpenApiSource, parse_document
from services.tools.registry import ToolDefinitionError, ToolNameTakenError, ToolRegistry

log = logging.getLogger(__name__)

MIGRATIONS = (
    """
    CREATE TABLE tool_sources (
        name TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        spec TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    """,
    # Sources belong to the tenant that registered them; those from before tenants to the default one.
    """
    CREATE TABLE tool_sources_by_tenant (
        tenant TEXT NOT NULL,
        name TEXT NOT NULL,
        kind TEXT NOT NULL,
        spec TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (tenant, name)
    );
    INSERT INTO tool_sources_by_tenant SELECT 'default', name, kind, spec, created_at FROM tool_sources;
    DROP TABLE tool_sources;
    ALTER TABLE tool_sources_by_tenant RENAME TO tool_sources;
    """,
    # Counts changes, so a replica sharing the database tells with one read whether it has missed any.
    """
    CREATE TABLE tool_sources_revision (value INTEGER NOT NULL);
    INSERT INTO tool_sources_revision VALUES (0);
    """,
)
# The tenant of calls and registrations that name none (a mesh without authentication).
DEFAULT_TENANT = "default"
_MAX_MESSAGE_CHARS = 500
# How often a replica on a shared database checks for sources registered or unregistered elsewhere when no change
# notification came (one single-row read): only what a lost notification can delay.
REFRESH_SECONDS = 30.0

M = TypeVar("M", bound=BaseModel)


class OpenApiSpec(BaseModel):
    """An OpenAPI source with its document's text (what the API registers and the database keeps)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=r"^[a-z][a-z0-9_]{0,30}$")
    document: str = Field(..., min_length=1)
    base_url: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    timeout_seconds: float | None = Field(None, gt=0)
    max_response_bytes: int = Field(1_048_576, ge=1024, le=16_777_216)
    approval_required: list[str] = Field(default_factory=list)

    @classmethod
    def from_config(cls, config: OpenApiSourceConfig) -> OpenApiSpec:
        """The spec of a configured source, its document read from disk; ConfigError when it cannot be read."""
        try:
            text = Path(config.document).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(
                f"tools.openapi {config.name!r}: cannot read document {config.document!r}: {e.__class__.__name__}: "
                f"{getattr(e, 'strerror', None) or e}"
            ) from e
        return cls(document=text, **config.model_dump(exclude={"document"}))


SourceSpec = McpServerConfig | OpenApiSpec


class Origin(enum.Enum):
    CONFIG = "config"
    API = "api"


class SourceState(enum.Enum):
    CONNECTING = "connecting"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True)
class SourceInfo:
    """A source as ListToolSources shows it."""

    spec: SourceSpec
    origin: Origin
    state: SourceState
    error: str | None = None
    tools: list[str] = field(default_factory=list)


def validated(model: type[M], data: dict[str, Any], where: str) -> M:
    """``model`` built from ``data``; InvalidArgumentError naming the field (``where``.<field>) otherwise."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join([where, *map(str, err['loc'])])}: {_shorten(err['msg'], 200)}" for err in e.errors()[:3]
        )
        raise InvalidArgumentError(_shorten(problems, _MAX_MESSAGE_CHARS)) from e


def _shorten(text: str, limit: int = _MAX_MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ToolSourceStore(Protocol):
    """The runtime-registered sources by tenant and name, shared by the replicas that use one database.

    ``put`` raises AlreadyExistsError when the tenant has a source of that name (whichever replica stored it);
    ``delete`` says whether there was one; ``all`` lists every tenant's, oldest first. ``revision`` changes with every
    put and delete, so a replica knows from it whether it has all it should. ``on_change`` callbacks are told of
    other replicas' changes where the database can say so (never for SQLite: one process uses it). ``open`` connects
    (ConfigError naming the setting when it cannot); after ``close`` every method raises RuntimeError.
    """

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def put(self, tenant: str, spec: SourceSpec) -> None: ...

    async def delete(self, tenant: str, name: str) -> bool: ...

    async def all(self) -> list[tuple[str, SourceSpec]]: ...

    async def revision(self) -> int: ...

    def on_change(self, callback: Callable[[], None]) -> None: ...


def source_kind(spec: SourceSpec) -> str:
    """How a spec is stored: 'mcp' or 'openapi'."""
    return "mcp" if isinstance(spec, McpServerConfig) else "openapi"


def stored_spec(kind: str, text: str) -> SourceSpec:
    """The inverse of storing ``spec.model_dump_json()`` under ``source_kind(spec)``."""
    data = json.loads(text)
    return McpServerConfig.model_validate(data) if kind == "mcp" else OpenApiSpec.model_validate(data)


def taken(tenant: str, name: str) -> AlreadyExistsError:
    return AlreadyExistsError(
        f"a tool source named {name!r} is already registered; unregister it first or pick another name"
    )


class SourceStore:
    """Runtime-registered sources by tenant and name, in the tools database (next to the idempotency outcomes); a
    ``ToolSourceStore`` for one process."""

    def __init__(self, path: Path | str) -> None:
        self._db = SqliteThread(path, lambda conn: migrate(conn, MIGRATIONS), name="tools-sources")

    async def open(self) -> None:
        """Nothing to connect: the file is created on first use."""

    async def put(self, tenant: str, spec: SourceSpec) -> None:
        row = (tenant, spec.name, source_kind(spec), spec.model_dump_json(), time.time())

        def put(c: sqlite3.Connection) -> None:
            inserted = c.execute(
                "INSERT INTO tool_sources VALUES (?, ?, ?, ?, ?) ON CONFLICT (tenant, name) DO NOTHING", row
            ).rowcount
            if not inserted:
                raise taken(tenant, spec.name)
            c.execute("UPDATE tool_sources_revision SET value = value + 1")

        await self._db.call(put)

    async def delete(self, tenant: str, name: str) -> bool:
        def delete(c: sqlite3.Connection) -> bool:
            deleted = c.execute("DELETE FROM tool_sources WHERE tenant = ? AND name = ?", (tenant, name)).rowcount
            if deleted:
                c.execute("UPDATE tool_sources_revision SET value = value + 1")
            return bool(deleted)

        return await self._db.call(delete)

    async def all(self) -> list[tuple[str, SourceSpec]]:
        """Every stored source with its tenant, oldest first."""

        def read(c: sqlite3.Connection) -> list[tuple[str, str, str]]:
            return c.execute("SELECT tenant, kind, spec FROM tool_sources ORDER BY created_at").fetchall()

        return [(tenant, stored_spec(kind, text)) for tenant, kind, text in await self._db.call(read)]

    async def revision(self) -> int:
        return int(await self._db.call(lambda c: c.execute("SELECT value FROM tool_sources_revision").fetchone()[0]))

    def on_change(self, callback: Callable[[], None]) -> None:
        """Never called back: no other process writes this file."""

    async def close(self) -> None:
        await self._db.close()


@dataclass
class _OpenApiEntry:
    source: OpenApiSource | None
    error: str | None = None


class _Scope:
    """The sources of one scope and the registry their tools go into: the configuration's (with the built-ins, seen
    by every tenant) or one tenant's (registered through the API, seen by that tenant only)."""

    def __init__(self, registry: ToolRegistry) -> None:
        self.registry = registry
        self.mcp = McpToolset([], registry)
        self.openapi: dict[str, _OpenApiEntry] = {}
        self.origins: dict[str, tuple[SourceSpec, Origin]] = {}

    async def close(self) -> None:
        await self.mcp.close()
        await asyncio.gather(*(e.source.close() for e in self.openapi.values() if e.source is not None))


class ToolSources:
    """The MCP servers and OpenAPI documents whose tools the tools service offers.

    Those of the configuration go into ``registry`` (next to the built-ins) and every tenant sees them; those
    registered through the API belong to the tenant that registered them, in a registry of its own (``scoped``),
    seen and callable by that tenant only, so two tenants may each have a source of one name.

    ``start`` adds the configured sources, then those registered earlier (kept in ``store``); MCP servers connect in
    the background. A configured OpenAPI document that cannot be used stops the service (ConfigError); a stored one
    that no longer loads is shown as failed. ``register`` and ``unregister`` change a tenant's sources at runtime.
    ``allow_commands``: whether ``register`` may start stdio MCP servers.

    Replicas sharing ``store``: ``refresh`` brings this one's sources up to what the store holds (loads the sources
    registered elsewhere, drops those unregistered elsewhere); ``follow`` refreshes whenever the store reports a
    change and every REFRESH_SECONDS. Why pushed, not on demand: tools are looked up by ListTools and ExecuteTool
    without awaiting anything, so a source registered on another replica is there once its notification arrives
    (milliseconds after the registration committed), not when a call first asks for it. What it costs: one
    single-row read per replica per change and per REFRESH_SECONDS, and a full read of the sources (documents
    parsed again only for sources new to this replica) per change. ``register`` and ``unregister`` refresh first,
    so they judge names by what every replica stored.
    """

    def __init__(
        self, config: ToolsConfig, registry: ToolRegistry, store: ToolSourceStore, *, allow_commands: bool
    ) -> None:
        self.registry = registry
        self.allow_commands = allow_commands
        self._config = config
        self._store = store
        self._global = _Scope(registry)
        self._tenants: dict[str, _Scope] = {}
        self._started = False
        self._lock = asyncio.Lock()
        self._revision: int | None = None
        self._follower: asyncio.Task[None] | None = None

    def scoped(self, tenant: str) -> ToolRegistry | None:
        """The registry of the tenant's own sources' tools, if it registered any."""
        scope = self._tenants.get(tenant)
        return scope.registry if scope is not None else None

    def _scope(self, tenant: str) -> _Scope:
        scope = self._tenants.get(tenant)
        if scope is None:
            registry = ToolRegistry(
                default_timeout_seconds=self.registry.default_timeout_seconds,
                max_timeout_seconds=self.registry.max_timeout_seconds,
            )
            scope = self._tenants[tenant] = _Scope(registry)
        return scope

    async def start(self) -> None:
        for server in self._config.mcp_servers:
            self._add_mcp(self._global, server, Origin.CONFIG)
        for document in self._config.openapi:
            spec = OpenApiSpec.from_config(document)
            try:
                await self._add_openapi(self._global, spec, Origin.CONFIG)
            except (OpenApiError, ToolDefinitionError) as e:
                raise ConfigError(f"tools.openapi {spec.name!r}: {_shorten(str(e))}") from e
        await self._store.open()
        # Read before the sources: a change made in between is seen by the next refresh, never missed.
        self._revision = await self._store.revision()
        for tenant, stored in await self._store.all():
            await self._load(tenant, stored)
        self._started = True
        for scope in (self._global, *self._tenants.values()):
            await scope.mcp.start()

    async def _load(self, tenant: str, stored: SourceSpec) -> None:
        """Adds a stored source to its tenant's scope; one that no longer loads is kept as failed."""
        scope = self._scope(tenant)
        if stored.name in self._global.origins:
            log.warning("tool source %r is declared in the configuration; its registration is ignored", stored.name)
            return
        if isinstance(stored, McpServerConfig):
            self._add_mcp(scope, stored, Origin.API)
            return
        try:
            await self._add_openapi(scope, stored, Origin.API)
        except (OpenApiError, ToolDefinitionError) as e:
            log.warning("registered OpenAPI source %r of tenant %r no longer loads: %s", stored.name, tenant, e)
            scope.openapi[stored.name] = _OpenApiEntry(None, _shorten(str(e)))
            scope.origins[stored.name] = (stored, Origin.API)

    async def refresh(self) -> None:
        """Loads the sources other replicas registered since the last look and drops those they unregistered."""
        async with self._lock:
            await self._refresh()

    async def _refresh(self) -> None:
        revision = await self._store.revision()
        if revision == self._revision:
            return
        stored = {(tenant, spec.name): spec for tenant, spec in await self._store.all()}
        for tenant, scope in self._tenants.items():
            for name, (spec, origin) in list(scope.origins.items()):
                now = stored.get((tenant, name))
                if origin is Origin.API and (now is None or now.model_dump_json() != spec.model_dump_json()):
                    await _drop(scope, name)
                    log.info("tool source %r of tenant %r changed on another replica; dropped here", name, tenant)
        for (tenant, name), spec in stored.items():
            scope = self._scope(tenant)
            if name not in scope.origins:
                await self._load(tenant, spec)
                await scope.mcp.start()  # connects the new tenant's servers (a started toolset connects at once)
                log.info("tool source %r of tenant %r registered on another replica; loaded here", name, tenant)
        self._revision = revision

    def follow(self, every: float = REFRESH_SECONDS) -> None:
        """Refreshes in the background on each change the store reports and every ``every`` seconds, until ``close``."""
        if self._follower is None:
            changed = asyncio.Event()
            self._store.on_change(changed.set)
            self._follower = asyncio.create_task(self._follow(changed, every), name="tools-sources-follow")

    async def _follow(self, changed: asyncio.Event, every: float) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), every)
            changed.clear()
            try:
                await self.refresh()
            except Exception as e:  # the database is away: keep what is loaded, look again later
                log.warning("could not refresh the tool sources: %s: %s", type(e).__name__, _shorten(str(e), 200))

    async def wait_connected(self) -> None:
        """Returns once every MCP server has listed its tools or failed its first attempt."""
        await asyncio.gather(*(scope.mcp.wait_attempted() for scope in (self._global, *self._tenants.values())))

    async def close(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            await asyncio.gather(self._follower, return_exceptions=True)
        try:
            await asyncio.gather(*(scope.close() for scope in (self._global, *self._tenants.values())))
        finally:
            await self._store.close()

    def list_sources(self, tenant: str = DEFAULT_TENANT) -> list[SourceInfo]:
        """The configuration's sources, then the tenant's."""
        scopes = [self._global, *([self._tenants[tenant]] if tenant in self._tenants else [])]
        return [_info(scope, name) for scope in scopes for name in scope.origins]

    async def register(self, spec: SourceSpec, tenant: str = DEFAULT_TENANT) -> SourceInfo:
        """Adds ``spec`` to the tenant's sources and keeps it; see RegisterToolSource in tools.proto for what raises."""
        async with self._lock:
            if spec.name in self._global.origins:
                raise AlreadyExistsError(
                    f"a tool source named {spec.name!r} is declared in the configuration; pick another name"
                )
            await self._refresh()
            scope = self._scope(tenant)
            await scope.mcp.start()  # a new tenant's toolset: connections added from now on start at once
            if spec.name in scope.origins:
                raise taken(tenant, spec.name)
            if isinstance(spec, McpServerConfig):
                await self._register_mcp(scope, spec)
            else:
                try:
                    await self._add_openapi(scope, spec, Origin.API)
                except ToolNameTakenError as e:
                    raise AlreadyExistsError(f"source.openapi: {_shorten(str(e))}") from e
                except (OpenApiError, ToolDefinitionError) as e:
                    raise InvalidArgumentError(f"source.openapi: {_shorten(str(e))}") from e
            try:
                await self._store.put(tenant, spec)
            except BaseException:
                await _drop(scope, spec.name)
                raise
            info = _info(scope, spec.name)
            log.info("tool source %r of tenant %r registered: %s", spec.name, tenant, ", ".join(info.tools))
            return info

    async def unregister(self, name: str, tenant: str = DEFAULT_TENANT) -> None:
        async with self._lock:
            if name in self._global.origins:
                raise FailedPreconditionError(
                    f"tool source {name!r} is declared in the configuration; remove it from tools.mcp_servers or "
                    "tools.openapi and restart the tools service"
                )
            await self._refresh()
            scope = self._tenants.get(tenant)
            if scope is None or name not in scope.origins:
                known = ", ".join(source.spec.name for source in self.list_sources(tenant)) or "none"
                raise NotFoundError(f"no tool source named {_shorten(repr(name), 80)}; tool sources: {known}")
            deleted = await self._store.delete(tenant, name)
            await _drop(scope, name)
            if not deleted:  # another replica unregistered it since the refresh above
                raise NotFoundError(f"no tool source named {_shorten(repr(name), 80)}: it was just unregistered")
            log.info("tool source %r of tenant %r unregistered", name, tenant)

    async def _register_mcp(self, scope: _Scope, spec: McpServerConfig) -> None:
        if spec.command is not None and not self.allow_commands:
            raise PermissionDeniedError(
                "this tools service does not start registered stdio MCP servers (a command run on its host): "
                "register a url instead, declare the server in tools.mcp_servers, or set "
                "tools.allow_registered_commands"
            )
        connection = self._add_mcp(scope, spec, Origin.API)
        await asyncio.wait_for(connection.attempted.wait(), CONNECT_TIMEOUT_SECONDS + 5)
        if connection.error is not None:
            await _drop(scope, spec.name)
            raise FailedPreconditionError(
                f"MCP server {spec.name!r} could not be reached: {connection.error}; nothing was registered"
            )
        if not scope.mcp.tool_names(connection):
            log.warning("MCP server %r was registered but offers no tool the registry accepts", spec.name)

    @staticmethod
    def _add_mcp(scope: _Scope, spec: McpServerConfig, origin: Origin) -> McpServerConnection:
        scope.origins[spec.name] = (spec, origin)
        return scope.mcp.add(spec)

    @staticmethod
    async def _add_openapi(scope: _Scope, spec: OpenApiSpec, origin: Origin) -> None:
        """Builds the source and registers its tools, all or none; OpenApiError or ToolDefinitionError otherwise."""
        source = OpenApiSource(
            spec.name,
            parse_document(spec.document),
            base_url=spec.base_url,
            headers=spec.headers,
            timeout_seconds=spec.timeout_seconds,
            max_response_bytes=spec.max_response_bytes,
        )
        marked = set(spec.approval_required)
        registered: list[str] = []
        try:
            for tool in source.tools():
                operation = tool.name.partition(".")[2]
                if "*" in marked or operation in marked:
                    tool = dataclasses.replace(tool, requires_approval=True)
                scope.registry.register(tool)
                registered.append(tool.name)
        except ToolDefinitionError:
            for name in registered:
                scope.registry.unregister(name)
            await source.close()
            raise
        scope.openapi[spec.name] = _OpenApiEntry(source)
        scope.origins[spec.name] = (spec, origin)


async def _drop(scope: _Scope, name: str) -> None:
    spec, _ = scope.origins.pop(name)
    if isinstance(spec, McpServerConfig):
        await scope.mcp.remove(name)
        return
    entry = scope.openapi.pop(name)
    for tool in _openapi_tools(scope, name):
        scope.registry.unregister(tool)
    if entry.source is not None:
        await entry.source.close()


def _openapi_tools(scope: _Scope, name: str) -> list[str]:
    return [tool.name for tool in scope.registry.list() if tool.name.startswith(f"{name}.")]


def _info(scope: _Scope, name: str) -> SourceInfo:
    spec, origin = scope.origins[name]
    if isinstance(spec, McpServerConfig):
        connection = scope.mcp.connections[name]
        tools = scope.mcp.tool_names(connection)
        if connection.error is not None:
            return SourceInfo(spec, origin, SourceState.FAILED, connection.error, tools)
        state = SourceState.READY if connection.attempted.is_set() else SourceState.CONNECTING
        return SourceInfo(spec, origin, state, None, tools)
    entry = scope.openapi[name]
    if entry.source is None:
        return SourceInfo(spec, origin, SourceState.FAILED, entry.error)
    return SourceInfo(spec, origin, SourceState.READY, None, _openapi_tools(scope, name))
