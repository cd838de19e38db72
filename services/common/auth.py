"""Who is calling: API keys (stored hashed) and JWTs checked against a JWKS, resolved to a tenant at the front door.

A key is ``mpk_<id>_<secret>``: the id finds its row, the secret is compared with the stored SHA-256 digest in
constant time (keys are 256 random bits, so a plain digest is enough; a slow hash protects guessable passwords).
``AuthInterceptor`` puts the caller's ``Principal`` in a context variable for the handler (``current_principal``)
and writes one audit line per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
import psycopg

from services.common.config import AuthConfig, ConfigError, MeshConfig
from services.common.errors import MeshError

audit = logging.getLogger("meshpilot.audit")

KEY_PREFIX = "mpk"
KEY_PATTERN = re.compile(rf"^{KEY_PREFIX}_([0-9a-f]{{12}})_([A-Za-z0-9_-]{{20,100}})$")
TENANT_PATTERN = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
# The tenant of every call when authentication is off (a local mesh): one tenant, as before tenants existed.
DEFAULT_TENANT = "default"
# Always answered without a token: load balancers and kubelets probe health without credentials.
OPEN_SERVICES = ("grpc.health.v1.Health",)
REFLECTION_SERVICES = ("grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection")
# Request fields that name the resource a call is about, for the audit line.
_RESOURCE_FIELDS = ("run_id", "session_id", "name", "agent")
_MAX_RESOURCE_CHARS = 80

PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    digest TEXT NOT NULL,
    create_time DOUBLE PRECISION NOT NULL,
    revoke_time DOUBLE PRECISION
)
"""
SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    digest TEXT NOT NULL,
    create_time REAL NOT NULL,
    revoke_time REAL
);
"""


@dataclass(frozen=True)
class Principal:
    """The caller: its tenant and the id of the credential it used ("" when authentication is off)."""

    tenant: str
    key_id: str = ""


ANONYMOUS = Principal(DEFAULT_TENANT)
_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("meshpilot_principal", default=ANONYMOUS)


def current_principal() -> Principal:
    """The caller of the RPC being handled (ANONYMOUS outside an authenticated call or with authentication off)."""
    return _principal.get()


# The tenant a service's outgoing calls act for (the planner's model calls for a run): the inference service shares
# its capacity between tenants by it. Internal metadata, trusted only between the mesh's own services.
TENANT_METADATA = "x-meshpilot-tenant"


def tenant_of(metadata: Iterable[tuple[str, Any]] | None) -> str:
    """The tenant an internal call acts for: its x-meshpilot-tenant metadata (the planner sends the tenant of the run
    it acts for) when that is a tenant name, else the default tenant."""
    for key, value in metadata or ():
        if key == TENANT_METADATA and isinstance(value, str) and TENANT_PATTERN.match(value):
            return value
    return DEFAULT_TENANT


@contextlib.contextmanager
def acting_as(tenant: str) -> Iterator[None]:
    """Makes ``tenant`` the current principal's tenant for the calls made inside (in this task)."""
    token = _principal.set(Principal(tenant))
    try:
        yield
    finally:
        _principal.reset(token)


@dataclass(frozen=True)
class ApiKey:
    """A key as listed (never its secret)."""

    key_id: str
    tenant: str
    name: str
    create_time: float
    revoke_time: float | None


def check_tenant(tenant: str) -> str:
    if not TENANT_PATTERN.match(tenant):
        raise ValueError(
            f"tenant {tenant[:64]!r} must be lowercase letters, digits and '-', start with a letter, at most 63 "
            "characters"
        )
    return tenant


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class ApiKeyStore:
    """API keys in one SQLite file (created on first use, mode 0600), or in PostgreSQL (``postgres``: the planner
    replicas' shared database). Synchronous: the CLI writes keys, and the interceptor reads one row by primary key
    behind a short cache (off the event loop)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._dsn: str | None = None
        self._lock = threading.Lock()
        self._conn: Any = None

    @classmethod
    def postgres(cls, dsn: str) -> ApiKeyStore:
        store = cls(Path(""))
        store._dsn = dsn
        return store

    def _db(self) -> Any:
        if self._conn is None:
            if self._dsn is not None:
                pg = psycopg.connect(self._dsn, autocommit=True, connect_timeout=10)
                pg.execute(PG_SCHEMA)
                self._conn = pg
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.path.touch(mode=0o600, exist_ok=True)
                lite = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
                lite.execute("PRAGMA journal_mode=WAL")
                lite.executescript(SCHEMA)
                self._conn = lite
        return self._conn

    def _execute(self, query: str, params: tuple[Any, ...] = ()) -> Any:
        """Runs ``query`` (written with ? placeholders) on either database; the cursor."""
        if self._dsn is not None:
            query = query.replace("?", "%s")
        return self._db().execute(query, params)

    def create(self, tenant: str, name: str = "") -> tuple[ApiKey, str]:
        """A new key of ``tenant``: its record and the token, which is shown once and never stored."""
        check_tenant(tenant)
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        now = time.time()
        with self._lock:
            self._execute(
                "INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, NULL)", (key_id, tenant, name[:200], _digest(secret), now)
            )
        return ApiKey(key_id, tenant, name[:200], now, None), f"{KEY_PREFIX}_{key_id}_{secret}"

    def revoke(self, key_id: str) -> bool:
        """Revokes the key; False when there is no such key or it was revoked already."""
        with self._lock:
            cursor = self._execute(
                "UPDATE api_keys SET revoke_time = ? WHERE key_id = ? AND revoke_time IS NULL", (time.time(), key_id)
            )
        return bool(cursor.rowcount == 1)

    def list(self, tenant: str | None = None) -> list[ApiKey]:
        query = "SELECT key_id, tenant, name, create_time, revoke_time FROM api_keys"
        args: tuple[str, ...] = ()
        if tenant is not None:
            query, args = query + " WHERE tenant = ?", (tenant,)
        with self._lock:
            rows = self._execute(query + " ORDER BY create_time", args).fetchall()
        return [ApiKey(*row) for row in rows]

    def verify(self, token: str) -> Principal | None:
        """The key's principal, or None for a malformed, unknown, wrong or revoked key."""
        match = KEY_PATTERN.match(token)
        if match is None:
            return None
        key_id, secret = match.groups()
        with self._lock:
            row = self._execute(
                "SELECT tenant, digest, revoke_time FROM api_keys WHERE key_id = ?", (key_id,)
            ).fetchone()
        if row is None or row[2] is not None or not hmac.compare_digest(row[1], _digest(secret)):
            return None
        return Principal(row[0], key_id)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class JwtVerifier:
    """JWTs signed by a key of a JWKS file, with the mesh's issuer and audience, unexpired, naming a tenant."""

    def __init__(self, config: AuthConfig) -> None:
        assert config.jwks_file is not None and config.jwt_issuer and config.jwt_audience
        try:
            self._keys = jwt.PyJWKSet.from_dict(json.loads(Path(config.jwks_file).read_text()))
        except (OSError, ValueError, jwt.PyJWKSetError) as e:
            raise ConfigError(f"auth.jwks_file {str(config.jwks_file)!r} is not a readable JWKS: {e}") from e
        self._issuer = config.jwt_issuer
        self._audience = config.jwt_audience
        self._claim = config.tenant_claim

    def verify(self, token: str) -> Principal | None:
        try:
            header = jwt.get_unverified_header(token)
            key = next((k for k in self._keys.keys if k.key_id == header.get("kid")), None)
            if key is None:
                return None
            claims = jwt.decode(
                token,
                key,
                algorithms=[key.algorithm_name],
                issuer=self._issuer,
                audience=self._audience,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.PyJWTError:
            return None
        tenant = claims.get(self._claim)
        if not isinstance(tenant, str) or not TENANT_PATTERN.match(tenant):
            return None
        return Principal(tenant, f"jwt:{str(claims.get('sub', ''))[:64]}")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address to bind) is a loopback address or localhost."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def key_store(config: MeshConfig) -> ApiKeyStore:
    """Where the planner's API keys live: its PostgreSQL database when it has one (every replica reads the same
    keys), else auth.keys_path."""
    if config.planner.database_url:
        return ApiKeyStore.postgres(config.planner.database_url)
    assert config.auth.keys_path is not None  # filled in by MeshConfig
    return ApiKeyStore(config.auth.keys_path)


def auth_required(config: MeshConfig) -> bool:
    """auth.enabled, or (unset) whether the planner binds a non-loopback address."""
    if config.auth.enabled is not None:
        return config.auth.enabled
    return not is_loopback(config.planner.server.host)


class Authenticator:
    """Resolves a bearer token to a principal: API keys first, then JWTs when a JWKS is configured; checked keys are
    cached for ``auth.key_cache_seconds``."""

    def __init__(self, config: AuthConfig, keys: ApiKeyStore) -> None:
        self.keys = keys
        self._jwt = JwtVerifier(config) if config.jwks_file is not None else None
        self._ttl = config.key_cache_seconds
        self._cache: dict[str, tuple[float, Principal]] = {}

    def cached(self, token: str) -> Principal | None:
        """The principal of a token checked within the cache time, else None (``authenticate`` reads the store)."""
        entry = self._cache.get(token)
        return entry[1] if entry is not None and time.monotonic() - entry[0] < self._ttl else None

    def authenticate(self, token: str) -> Principal | None:
        now = time.monotonic()
        if (cached := self.cached(token)) is not None:
            return cached
        principal = self.keys.verify(token) if token.startswith(f"{KEY_PREFIX}_") else None
        if principal is None and self._jwt is not None:
            principal = self._jwt.verify(token)
        if principal is not None and self._ttl:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[token] = (now, principal)
        return principal


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


def _resource(request: Any) -> str:
    for field in _RESOURCE_FIELDS:
        value = getattr(request, field, None)
        if isinstance(value, str) and value:
            return f"{field}={value[:_MAX_RESOURCE_CHARS]}"
    return "-"


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call (health always open; reflection open when ``open_reflection``), runs the handler
    with the caller as ``current_principal()``, and logs one audit line per call: tenant, key id, method,
    resource, status code. ``authenticator`` None: authentication is off, every call is the default tenant's."""

    def __init__(self, authenticator: Authenticator | None, *, open_reflection: bool) -> None:
        self._authenticator = authenticator
        self._open = OPEN_SERVICES + (REFLECTION_SERVICES if open_reflection else ())

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.lstrip("/").startswith(self._open):
            return handler
        principal: Principal | None = ANONYMOUS
        if self._authenticator is not None:
            token = bearer_token(handler_call_details.invocation_metadata)
            principal = None
            if token:
                # A cache miss reads the key store (a database round trip for PostgreSQL): off the event loop.
                principal = self._authenticator.cached(token) or await asyncio.to_thread(
                    self._authenticator.authenticate, token
                )
        return _wrapped(handler, method, principal)


def _refuse_message() -> str:
    return (
        "send a valid API key as 'authorization: Bearer mpk_...' metadata (create one with "
        "`meshpilot keys create --tenant NAME`) or a JWT this mesh accepts"
    )


def _code(error: BaseException, context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The status a call that raised ``error`` ends with (the error mapping outside turns a MeshError into its code)."""
    if isinstance(error, MeshError):
        return error.code
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return context.code() or grpc.StatusCode.INTERNAL


def _wrapped(handler: grpc.RpcMethodHandler, method: str, principal: Principal | None) -> grpc.RpcMethodHandler:
    def log(request: Any, code: grpc.StatusCode | None) -> None:
        who = principal or Principal("-", "-")
        audit.info(
            "tenant=%s key=%s method=%s resource=%s code=%s",
            who.tenant,
            who.key_id or "-",
            method,
            _resource(request) if request is not None else "-",
            (code or grpc.StatusCode.OK).name,
        )

    async def refuse(context: grpc.aio.ServicerContext, request: Any) -> None:
        log(request, grpc.StatusCode.UNAUTHENTICATED)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _refuse_message())

    if handler.unary_unary is not None:
        behavior = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if principal is None:
                await refuse(context, request)
            _principal.set(principal)  # type: ignore[arg-type]  # each RPC runs in its own task and context
            try:
                response = await behavior(request, context)
            except BaseException as e:
                log(request, _code(e, context))
                raise
            log(request, context.code())
            return response

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream is not None:
        stream_behavior = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if principal is None:
                await refuse(context, request)
            _principal.set(principal)  # type: ignore[arg-type]
            try:
                async for response in stream_behavior(request, context):
                    yield response
            except BaseException as e:
                log(request, _code(e, context))
                raise
            log(request, context.code())

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, handler.request_deserializer, handler.response_serializer
        )
    raise NotImplementedError(f"{method}: client-streaming methods are not served by the mesh")
