"""Tool sources: MCP servers and OpenAPI documents, declared in the configuration or registered at runtime.

Each source offers its tools as <source>.<tool>. Those registered through the API are kept in the tools database
and come back when the service restarts; those in the YAML are the configuration's to change.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import logging
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

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
)
_MAX_MESSAGE_CHARS = 500

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


class SourceStore:
    """Runtime-registered sources by name, in the tools database (a table next to the idempotency outcomes)."""

    def __init__(self, path: Path | str) -> None:
        self._db = SqliteThread(path, lambda conn: migrate(conn, MIGRATIONS), name="tools-sources")

    async def put(self, spec: SourceSpec) -> None:
        kind = "mcp" if isinstance(spec, McpServerConfig) else "openapi"
        row = (spec.name, kind, spec.model_dump_json(), time.time())
        await self._db.call(lambda c: c.execute("INSERT INTO tool_sources VALUES (?, ?, ?, ?)", row))

    async def delete(self, name: str) -> None:
        await self._db.call(lambda c: c.execute("DELETE FROM tool_sources WHERE name = ?", (name,)))

    async def all(self) -> list[SourceSpec]:
        def read(c: sqlite3.Connection) -> list[tuple[str, str]]:
            return c.execute("SELECT kind, spec FROM tool_sources ORDER BY created_at").fetchall()

        specs: list[SourceSpec] = []
        for kind, text in await self._db.call(read):
            data = json.loads(text)
            specs.append(McpServerConfig.model_validate(data) if kind == "mcp" else OpenApiSpec.model_validate(data))
        return specs

    async def close(self) -> None:
        await self._db.close()


@dataclass
class _OpenApiEntry:
    source: OpenApiSource | None
    error: str | None = None


class ToolSources:
    """The MCP servers and OpenAPI documents whose tools ``registry`` offers.

    ``start`` adds the configured sources, then those registered earlier (kept in ``store``); MCP servers connect in
    the background. A configured OpenAPI document that cannot be used stops the service (ConfigError); a stored one
    that no longer loads is shown as failed. ``register`` and ``unregister`` change the sources at runtime.
    ``allow_commands``: whether ``register`` may start stdio MCP servers.
    """

    def __init__(
        self, config: ToolsConfig, registry: ToolRegistry, store: SourceStore, *, allow_commands: bool
    ) -> None:
        self.registry = registry
        self.allow_commands = allow_commands
        self._config = config
        self._store = store
        self._mcp = McpToolset([], registry)
        self._openapi: dict[str, _OpenApiEntry] = {}
        self._origins: dict[str, tuple[SourceSpec, Origin]] = {}
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        for server in self._config.mcp_servers:
            self._add_mcp(server, Origin.CONFIG)
        for document in self._config.openapi:
            spec = OpenApiSpec.from_config(document)
            try:
                await self._add_openapi(spec, Origin.CONFIG)
            except (OpenApiError, ToolDefinitionError) as e:
                raise ConfigError(f"tools.openapi {spec.name!r}: {_shorten(str(e))}") from e
        for stored in await self._store.all():
            if stored.name in self._origins:
                log.warning("tool source %r is declared in the configuration; its registration is ignored", stored.name)
                continue
            if isinstance(stored, McpServerConfig):
                self._add_mcp(stored, Origin.API)
                continue
            try:
                await self._add_openapi(stored, Origin.API)
            except (OpenApiError, ToolDefinitionError) as e:
                log.warning("registered OpenAPI source %r no longer loads: %s", stored.name, e)
                self._openapi[stored.name] = _OpenApiEntry(None, _shorten(str(e)))
                self._origins[stored.name] = (stored, Origin.API)
        await self._mcp.start()

    async def wait_connected(self) -> None:
        """Returns once every MCP server has listed its tools or failed its first attempt."""
        await self._mcp.wait_attempted()

    async def close(self) -> None:
        try:
            await self._mcp.close()
            await asyncio.gather(*(e.source.close() for e in self._openapi.values() if e.source is not None))
        finally:
            await self._store.close()

    def list_sources(self) -> list[SourceInfo]:
        return [self._info(name) for name in self._origins]

    def get(self, name: str) -> SourceInfo:
        if name not in self._origins:
            raise NotFoundError(f"no tool source named {_shorten(repr(name), 80)}; {self._known()}")
        return self._info(name)

    async def register(self, spec: SourceSpec) -> SourceInfo:
        """Adds ``spec`` and keeps it; see RegisterToolSource in tools.proto for what raises."""
        async with self._lock:
            if spec.name in self._origins:
                origin = self._origins[spec.name][1]
                where = "in the configuration" if origin is Origin.CONFIG else "through the API"
                raise AlreadyExistsError(
                    f"a tool source named {spec.name!r} is already registered ({where}); unregister it first or "
                    "pick another name"
                )
            if isinstance(spec, McpServerConfig):
                await self._register_mcp(spec)
            else:
                try:
                    await self._add_openapi(spec, Origin.API)
                except ToolNameTakenError as e:
                    raise AlreadyExistsError(f"source.openapi: {_shorten(str(e))}") from e
                except (OpenApiError, ToolDefinitionError) as e:
                    raise InvalidArgumentError(f"source.openapi: {_shorten(str(e))}") from e
            try:
                await self._store.put(spec)
            except BaseException:
                await self._drop(spec.name)
                raise
            log.info("tool source %r registered: %s", spec.name, ", ".join(self._info(spec.name).tools))
            return self._info(spec.name)

    async def unregister(self, name: str) -> None:
        async with self._lock:
            _, origin = self._origins.get(name, (None, None))
            if origin is None:
                raise NotFoundError(f"no tool source named {_shorten(repr(name), 80)}; {self._known()}")
            if origin is Origin.CONFIG:
                raise FailedPreconditionError(
                    f"tool source {name!r} is declared in the configuration; remove it from tools.mcp_servers or "
                    "tools.openapi and restart the tools service"
                )
            await self._store.delete(name)
            await self._drop(name)
            log.info("tool source %r unregistered", name)

    async def _register_mcp(self, spec: McpServerConfig) -> None:
        if spec.command is not None and not self.allow_commands:
            raise PermissionDeniedError(
                "this tools service does not start registered stdio MCP servers (a command run on its host): "
                "register a url instead, declare the server in tools.mcp_servers, or set "
                "tools.allow_registered_commands"
            )
        connection = self._add_mcp(spec, Origin.API)
        await asyncio.wait_for(connection.attempted.wait(), CONNECT_TIMEOUT_SECONDS + 5)
        if connection.error is not None:
            await self._drop(spec.name)
            raise FailedPreconditionError(
                f"MCP server {spec.name!r} could not be reached: {connection.error}; nothing was registered"
            )
        if not self._mcp.tool_names(connection):
            log.warning("MCP server %r was registered but offers no tool the registry accepts", spec.name)

    def _add_mcp(self, spec: McpServerConfig, origin: Origin) -> McpServerConnection:
        self._origins[spec.name] = (spec, origin)
        return self._mcp.add(spec)

    async def _add_openapi(self, spec: OpenApiSpec, origin: Origin) -> None:
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
                self.registry.register(tool)
                registered.append(tool.name)
        except ToolDefinitionError:
            for name in registered:
                self.registry.unregister(name)
            await source.close()
            raise
        self._openapi[spec.name] = _OpenApiEntry(source)
        self._origins[spec.name] = (spec, origin)

    async def _drop(self, name: str) -> None:
        spec, _ = self._origins.pop(name)
        if isinstance(spec, McpServerConfig):
            await self._mcp.remove(name)
            return
        entry = self._openapi.pop(name)
        for tool in self._openapi_tools(name):
            self.registry.unregister(tool)
        if entry.source is not None:
            await entry.source.close()

    def _openapi_tools(self, name: str) -> list[str]:
        return [tool.name for tool in self.registry.list() if tool.name.startswith(f"{name}.")]

    def _info(self, name: str) -> SourceInfo:
        spec, origin = self._origins[name]
        if isinstance(spec, McpServerConfig):
            connection = self._mcp.connections[name]
            tools = self._mcp.tool_names(connection)
            if connection.error is not None:
                return SourceInfo(spec, origin, SourceState.FAILED, connection.error, tools)
            state = SourceState.READY if connection.attempted.is_set() else SourceState.CONNECTING
            return SourceInfo(spec, origin, state, None, tools)
        entry = self._openapi[name]
        if entry.source is None:
            return SourceInfo(spec, origin, SourceState.FAILED, entry.error)
        return SourceInfo(spec, origin, SourceState.READY, None, self._openapi_tools(name))

    def _known(self) -> str:
        return f"tool sources: {', '.join(self._origins) or 'none'}"
