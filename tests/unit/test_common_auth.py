"""Authentication at the front door: API keys stored hashed, JWTs against a JWKS, the interceptor that refuses,
admits and audits, the client's bearer token, and `meshpilot keys`."""

from __future__ import annotations

import json
import logging
import stat
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from typer.testing import CliRunner

from meshpilot.cli import app
from services.common import NotFoundError, load_config
from services.common.auth import (
    ApiKeyStore,
    Authenticator,
    AuthInterceptor,
    JwtVerifier,
    Principal,
    auth_required,
    bearer_token,
    current_principal,
    key_store,
)
from services.common.clients import create_channel
from services.common.config import AuthConfig, ConfigError
from services.common.errors import ErrorMappingInterceptor
from tests.postgres import fresh_schema, needs_postgres

ISSUER, AUDIENCE = "https://idp.example.com", "meshpilot"


@pytest.fixture
def keys(tmp_path: Path) -> ApiKeyStore:
    store = ApiKeyStore(tmp_path / "keys.db")
    yield store
    store.close()


def test_a_created_key_verifies_as_its_tenant_and_only_its_digest_is_stored(keys: ApiKeyStore) -> None:
    key, token = keys.create("acme", "ci")
    assert keys.verify(token) == Principal("acme", key.key_id)
    stored = keys.path.read_bytes() + Path(f"{keys.path}-wal").read_bytes()
    assert token.rsplit("_", 1)[1].encode() not in stored
    assert stat.S_IMODE(keys.path.stat().st_mode) == 0o600
    assert [(k.key_id, k.tenant, k.name) for k in keys.list()] == [(key.key_id, "acme", "ci")]


@pytest.mark.parametrize(
    "forge", [lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"), lambda t: "mpk_000000000000_" + t.split("_", 2)[2]]
)
def test_a_wrong_secret_or_unknown_id_does_not_verify(keys: ApiKeyStore, forge: Any) -> None:
    _, token = keys.create("acme")
    assert keys.verify(forge(token)) is None


@pytest.mark.parametrize("token", ["", "mpk_", "Bearer x", "mpk_abc_def", "x" * 10_000])
def test_a_malformed_key_does_not_verify(keys: ApiKeyStore, token: str) -> None:
    assert keys.verify(token) is None


def test_a_revoked_key_does_not_verify(keys: ApiKeyStore) -> None:
    key, token = keys.create("acme")
    assert keys.revoke(key.key_id)
    assert keys.verify(token) is None
    assert not keys.revoke(key.key_id)
    assert keys.list()[0].revoke_time is not None


@pytest.mark.parametrize("tenant", ["", "Acme", "9lives", "a" * 64, "a b"])
def test_a_bad_tenant_name_is_refused(keys: ApiKeyStore, tenant: str) -> None:
    with pytest.raises(ValueError, match="must be lowercase letters"):
        keys.create(tenant)


def test_the_authenticator_caches_a_key_for_the_configured_time(keys: ApiKeyStore) -> None:
    key, token = keys.create("acme")
    cached = Authenticator(AuthConfig(key_cache_seconds=300), keys)
    fresh = Authenticator(AuthConfig(key_cache_seconds=0), keys)
    assert cached.authenticate(token) == fresh.authenticate(token) == Principal("acme", key.key_id)
    keys.revoke(key.key_id)
    assert cached.authenticate(token) == Principal("acme", key.key_id)  # within the cache time
    assert fresh.authenticate(token) is None


@pytest.mark.parametrize(
    ("host", "enabled", "required"),
    [("127.0.0.1", None, False), ("localhost", None, False), ("0.0.0.0", None, True), ("10.0.0.5", None, True),
     ("0.0.0.0", False, False), ("127.0.0.1", True, True)],
)  # fmt: skip
def test_auth_is_on_by_default_off_loopback(host: str, enabled: bool | None, required: bool) -> None:
    config = load_config(planner={"server": {"host": host, "port": 0}}, auth={"enabled": enabled})
    assert auth_required(config) is required


def test_a_jwks_without_issuer_and_audience_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="jwks_file needs jwt_issuer and jwt_audience"):
        load_config(auth={"jwks_file": str(tmp_path / "jwks.json")})


@pytest.fixture
def jwks(tmp_path: Path) -> tuple[AuthConfig, Any]:
    private = ec.generate_private_key(ec.SECP256R1())
    public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private.public_key()))
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [{**public, "kid": "k1", "alg": "ES256", "use": "sig"}]}))
    return AuthConfig(jwks_file=path, jwt_issuer=ISSUER, jwt_audience=AUDIENCE), private


def token_for(private: Any, kid: str = "k1", **claims: Any) -> str:
    body = {"iss": ISSUER, "aud": AUDIENCE, "exp": time.time() + 60, "sub": "alice", "tenant": "acme", **claims}
    return jwt.encode({k: v for k, v in body.items() if v is not None}, private, "ES256", headers={"kid": kid})


def test_a_jwt_of_the_jwks_names_its_tenant(jwks: tuple[AuthConfig, Any]) -> None:
    config, private = jwks
    assert JwtVerifier(config).verify(token_for(private)) == Principal("acme", "jwt:alice")


@pytest.mark.parametrize(
    "claims",
    [{"exp": 1.0}, {"aud": "other"}, {"iss": "https://evil"}, {"tenant": None}, {"tenant": "Not A Tenant"},
     {"exp": None}, {"kid": "unknown"}],
    ids=["expired", "audience", "issuer", "no-tenant", "bad-tenant", "no-exp", "unknown-kid"],
)  # fmt: skip
def test_a_jwt_that_does_not_fit_is_refused(jwks: tuple[AuthConfig, Any], claims: dict[str, Any]) -> None:
    config, private = jwks
    kid = claims.pop("kid", "k1")
    assert JwtVerifier(config).verify(token_for(private, kid, **claims)) is None


def test_a_jwt_signed_by_another_key_is_refused(jwks: tuple[AuthConfig, Any]) -> None:
    config, _ = jwks
    assert JwtVerifier(config).verify(token_for(ec.generate_private_key(ec.SECP256R1()))) is None


def test_an_unreadable_jwks_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "jwks.json").write_text("not json")
    config = AuthConfig(jwks_file=tmp_path / "jwks.json", jwt_issuer=ISSUER, jwt_audience=AUDIENCE)
    with pytest.raises(ConfigError, match="is not a readable JWKS"):
        JwtVerifier(config)


@pytest.mark.parametrize(
    ("metadata", "token"),
    [([("authorization", "Bearer abc")], "abc"), ([("authorization", "bearer  abc ")], "abc"),
     ([("authorization", "Basic abc")], None), ([("authorization", "Bearer ")], None), ([], None), (None, None)],
)  # fmt: skip
def test_the_bearer_token_is_read_from_the_metadata(metadata: Any, token: str | None) -> None:
    assert bearer_token(metadata) == token


# A service of two methods that report who called them, and one that fails, served with the interceptors.
async def _whoami(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    principal = current_principal()
    return f"{principal.tenant}/{principal.key_id}".encode()


async def _whoami_stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    for _ in range(2):
        yield await _whoami(request, context)


async def _missing(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise NotFoundError("no such run")


@asynccontextmanager
async def serving(authenticator: Authenticator | None, *, open_reflection: bool = False) -> AsyncIterator[str]:
    server = grpc.aio.server(
        interceptors=[ErrorMappingInterceptor(), AuthInterceptor(authenticator, open_reflection=open_reflection)]
    )
    handlers = {
        "Whoami": grpc.unary_unary_rpc_method_handler(_whoami),
        "WhoamiStream": grpc.unary_stream_rpc_method_handler(_whoami_stream),
        "Missing": grpc.unary_unary_rpc_method_handler(_missing),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Echo", handlers)])
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


async def whoami(target: str, api_key: str | None, method: str = "Whoami") -> bytes:
    async with create_channel(target, api_key=api_key) as channel:
        if method == "WhoamiStream":
            return b",".join([r async for r in channel.unary_stream(f"/test.Echo/{method}")(b"")])
        return await channel.unary_unary(f"/test.Echo/{method}")(b"")


async def test_calls_with_a_valid_key_run_as_its_tenant_others_are_unauthenticated(keys: ApiKeyStore, caplog) -> None:
    key, token = keys.create("acme")
    caplog.set_level(logging.INFO, logger="meshpilot.audit")
    async with serving(Authenticator(AuthConfig(), keys)) as target:
        assert await whoami(target, token) == f"acme/{key.key_id}".encode()
        assert await whoami(target, token, "WhoamiStream") == f"acme/{key.key_id},acme/{key.key_id}".encode()
        for credential in (None, "mpk_nope", token + "x"):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await whoami(target, credential)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "meshpilot keys create --tenant" in (refused.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await whoami(target, token, "Missing")
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        # Health answers without a token (probes carry none).
        async with grpc.aio.insecure_channel(target) as channel:
            checked = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert checked.status == health_pb2.HealthCheckResponse.SERVING
    lines = [record.getMessage() for record in caplog.records if record.name == "meshpilot.audit"]
    assert f"tenant=acme key={key.key_id} method=/test.Echo/Whoami resource=- code=OK" in lines
    assert "tenant=- key=- method=/test.Echo/Whoami resource=- code=UNAUTHENTICATED" in lines
    assert f"tenant=acme key={key.key_id} method=/test.Echo/Missing resource=- code=NOT_FOUND" in lines
    assert not any(token in line for line in lines)


async def test_with_authentication_off_every_call_is_the_default_tenants() -> None:
    async with serving(None) as target:
        assert await whoami(target, None) == b"default/"
        assert await whoami(target, "anything") == b"default/"


def test_keys_cli_creates_lists_and_revokes(tmp_path: Path) -> None:
    config = tmp_path / "mesh.yaml"
    config.write_text(f"data_dir: {tmp_path}\n")
    runner = CliRunner()
    created = runner.invoke(app, ["keys", "create", "--tenant", "acme", "--name", "ci", "--json", "-c", str(config)])
    assert created.exit_code == 0, created.output
    made = json.loads(created.output)
    store = ApiKeyStore(tmp_path / "keys.db")
    assert store.verify(made["key"]) == Principal("acme", made["key_id"])
    listed = runner.invoke(app, ["keys", "list", "-c", str(config)])
    assert made["key_id"] in listed.output and made["key"] not in listed.output
    assert runner.invoke(app, ["keys", "revoke", made["key_id"], "-c", str(config)]).exit_code == 0
    assert store.verify(made["key"]) is None
    again = runner.invoke(app, ["keys", "revoke", made["key_id"], "-c", str(config)])
    assert again.exit_code == 1 and "no active key" in again.output
    bad = runner.invoke(app, ["keys", "create", "--tenant", "Bad Tenant", "-c", str(config)])
    assert bad.exit_code == 2 and "must be lowercase letters" in bad.output
    store.close()


def test_metrics_with_an_authorizer_need_a_bearer_token_it_accepts() -> None:
    import urllib.error
    import urllib.request

    from prometheus_client import CollectorRegistry, Counter

    from services.common.metrics import MetricsEndpoint

    registry = CollectorRegistry()
    Counter("meshpilot_probe", "A metric to find.", registry=registry).inc()
    endpoint = MetricsEndpoint("127.0.0.1", 0, registry, authorize=lambda token: token == "good")
    url = f"http://127.0.0.1:{endpoint.port}/metrics"
    try:
        for headers in ({}, {"Authorization": "Bearer bad"}, {"Authorization": "Basic good"}):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10)
            assert refused.value.code == 401
            assert b"meshpilot_probe" not in refused.value.read()
        with urllib.request.urlopen(urllib.request.Request(url, headers={"Authorization": "Bearer good"})) as ok:
            assert b"meshpilot_probe_total 1.0" in ok.read()
    finally:
        endpoint.close()


@needs_postgres
def test_with_a_database_url_keys_live_in_postgresql_for_every_replica(tmp_path: Path) -> None:
    with fresh_schema() as dsn:
        config = load_config(data_dir=str(tmp_path), planner={"database_url": dsn})
        first, second = key_store(config), key_store(config)
        try:
            key, token = first.create("acme", "ci")
            assert second.verify(token) == Principal("acme", key.key_id)  # another replica reads it
            assert [k.key_id for k in second.list("acme")] == [key.key_id]
            assert second.revoke(key.key_id) and first.verify(token) is None
            assert not (tmp_path / "keys.db").exists()
        finally:
            first.close()
            second.close()
