"""Mutual TLS: `meshpilot certs init`, services that refuse plaintext and callers of the wrong identity, the CLI's
client certificate at the planner, and the planner's metrics behind its API keys."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import shutil
import stat
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from typer.testing import CliRunner

from meshpilot.cli.certs import issue_mesh_certificates
from meshpilot.cli.main import app
from meshpilot.cli.options import CREDENTIALS
from meshpilot.inference.v1 import inference_pb2, inference_pb2_grpc
from services.common import ConfigError, MeshConfig, MeshServer, ServerConfig, create_channel, load_config
from services.common.auth import ApiKeyStore
from services.common.server import ServiceBinding
from services.common.tls import SERVICES, ServerTls, TlsIdentity, server_tls, tls_identity
from services.planner.server import create_server as create_planner
from tests.unit.planner_fakes import FakeTools, ScriptedLLM, answer

INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
runner = CliRunner()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("mesh") / "certs"
    issue_mesh_certificates(directory)
    return directory


@pytest.fixture(scope="module")
def stranger_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Certificates with the same names, from another CA."""
    directory = tmp_path_factory.mktemp("stranger") / "certs"
    issue_mesh_certificates(directory)
    return directory


@pytest.fixture(autouse=True)
def _forget_cli_certificate() -> Iterator[None]:
    yield
    CREDENTIALS.tls = None  # a CLI invocation remembers it for the process; other tests dial plaintext


def tls_config(cert_dir: Path, *, tls: dict[str, Any] | None = None, **sections: Any) -> MeshConfig:
    tls = {"enabled": True, "cert_dir": str(cert_dir), **(tls or {})}
    return load_config(data_dir=str(cert_dir.parent), tls=tls, **sections)


def identity(cert_dir: Path, name: str) -> TlsIdentity:
    loaded = tls_identity(tls_config(cert_dir), name)
    assert loaded is not None
    return loaded


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def alt_names(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


# --- meshpilot certs init ----------------------------------------------------------------------------------------------


def test_certs_init_writes_a_ca_and_a_certificate_for_each_service_and_the_client(tmp_path: Path) -> None:
    done = runner.invoke(
        app, ["certs", "init", "--dir", str(tmp_path), "--host", "mesh.example.com", "--host", "10.0.0.7"]
    )
    assert done.exit_code == 0, done.output

    ca = load_cert(tmp_path / "ca.crt")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for name in (*SERVICES, "client"):
        cert = load_cert(tmp_path / f"{name}.crt")
        cert.verify_directly_issued_by(ca)
        key = serialization.load_pem_private_key((tmp_path / f"{name}.key").read_bytes(), password=None)
        assert key.public_key() == cert.public_key()
        sans = alt_names(cert)
        assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://meshpilot/{name}"]
        usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        if name == "client":
            assert sans.get_values_for_type(x509.DNSName) == []
            assert usages == {ExtendedKeyUsageOID.CLIENT_AUTH}
        else:
            assert sans.get_values_for_type(x509.DNSName) == [
                name,
                f"{name}.meshpilot",
                "localhost",
                "mesh.example.com",
            ]
            assert sans.get_values_for_type(x509.IPAddress) == [
                ipaddress.ip_address("127.0.0.1"),
                ipaddress.ip_address("10.0.0.7"),
            ]
            assert usages == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    for key_file in tmp_path.glob("*.key"):
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600, key_file
    assert not list(tmp_path.glob("*.partial"))


def test_certs_init_refuses_to_replace_a_ca_unless_forced(tmp_path: Path) -> None:
    assert runner.invoke(app, ["certs", "init", "--dir", str(tmp_path)]).exit_code == 0
    first_ca = (tmp_path / "ca.crt").read_bytes()

    again = runner.invoke(app, ["certs", "init", "--dir", str(tmp_path)])
    assert again.exit_code == 1
    assert "ca.crt exists" in again.output and "--force" in again.output
    assert (tmp_path / "ca.crt").read_bytes() == first_ca

    forced = runner.invoke(app, ["certs", "init", "--dir", str(tmp_path), "--force"])
    assert forced.exit_code == 0, forced.output
    assert (tmp_path / "ca.crt").read_bytes() != first_ca
    load_cert(tmp_path / "planner.crt").verify_directly_issued_by(load_cert(tmp_path / "ca.crt"))


def test_certs_init_writes_to_the_configured_directory(tmp_path: Path) -> None:
    done = runner.invoke(app, ["certs", "init"], env={"MESHPILOT_DATA_DIR": str(tmp_path)})
    assert done.exit_code == 0, done.output
    assert (tmp_path / "certs" / "ca.crt").exists() and (tmp_path / "certs" / "inference.key").exists()


# --- configuration -----------------------------------------------------------------------------------------------------


def test_with_tls_off_nothing_is_loaded(tmp_path: Path) -> None:
    config = load_config(data_dir=str(tmp_path))
    assert tls_identity(config, "planner") is None and server_tls(config, "inference") is None


def test_internal_services_ask_for_certificates_and_the_planner_does_not(certs: Path) -> None:
    config = tls_config(certs)
    inference, planner = server_tls(config, "inference"), server_tls(config, "planner")
    assert inference is not None and inference.allowed_callers == ("planner", "edge")
    assert planner is not None and planner.allowed_callers is None and planner.interceptor() is None
    assert server_tls(config, "knowledge").allowed_callers == ("tools",)  # type: ignore[union-attr]


def test_allowed_callers_override_one_service_and_keep_the_others(certs: Path) -> None:
    config = load_config(
        data_dir=str(certs.parent), tls={"enabled": True, "allowed_callers": {"tools": ["planner", "client"]}}
    )
    assert config.tls.allowed_callers == {
        "inference": ["planner", "edge"],
        "tools": ["planner", "client"],
        "knowledge": ["tools"],
    }


@pytest.mark.parametrize(
    ("allowed", "message"),
    [
        ({"planner": ["client"]}, "'planner' is not an internal service"),
        ({"tools": ["Planner!"]}, "caller 'Planner!' must be an identity name"),
    ],
)
def test_allowed_callers_name_internal_services_and_identities(allowed: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=r"tls\.allowed_callers") as error:
        load_config(tls={"allowed_callers": allowed})
    assert message in str(error.value)


def _replace(directory: Path, name: str, source: str, *, key: bool = True, cert: bool = True) -> None:
    if key:
        shutil.copy(directory.parent / "source" / f"{source}.key", directory / f"{name}.key")
    if cert:
        shutil.copy(directory.parent / "source" / f"{source}.crt", directory / f"{name}.crt")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "inference.crt").unlink(), "tls.cert_dir: cannot read {dir}/inference.crt"),
        (lambda d: (d / "ca.crt").unlink(), "tls.ca_file: cannot read {dir}/ca.crt"),
        (lambda d: (d / "inference.key").write_text("not a key"), "{dir}/inference.key is not an unencrypted PEM"),
        (lambda d: (d / "inference.crt").write_text("not a cert"), "{dir}/inference.crt is not a PEM certificate"),
        (lambda d: (d / "ca.crt").write_text("not a cert"), "tls.ca_file: {dir}/ca.crt is not a PEM certificate"),
        (lambda d: _replace(d, "inference", "expired"), "{dir}/inference.crt expired on"),
        (lambda d: _replace(d, "inference", "tools", cert=False), "{dir}/inference.key is not the key of"),
        (lambda d: _replace(d, "inference", "tools"), "{dir}/inference.crt does not name spiffe://meshpilot/inference"),
    ],
)
def test_a_missing_or_wrong_file_fails_at_start_naming_it(tmp_path: Path, damage, message: str) -> None:
    issue_mesh_certificates(tmp_path / "source")
    shutil.copytree(tmp_path / "source", tmp_path / "certs")
    issue_mesh_certificates(
        tmp_path / "old", days=1, now=datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=3)
    )
    for suffix in ("crt", "key"):
        shutil.copy(tmp_path / "old" / f"inference.{suffix}", tmp_path / "source" / f"expired.{suffix}")
    damage(tmp_path / "certs")
    with pytest.raises(ConfigError) as error:
        server_tls(tls_config(tmp_path / "certs"), "inference")
    assert message.format(dir=tmp_path / "certs") in str(error.value)


# --- an internal service with TLS --------------------------------------------------------------------------------------


class FakeInference(inference_pb2_grpc.InferenceServiceServicer):
    async def ListModels(self, request, context):
        return inference_pb2.ListModelsResponse(models=[inference_pb2.Model(id="tiny")])

    async def Generate(self, request, context):
        for text in ("Par", "is"):
            yield inference_pb2.GenerateResponse(text=text)


def _inference_binding() -> ServiceBinding:
    return ServiceBinding(INFERENCE_SERVICE, FakeInference(), inference_pb2_grpc.add_InferenceServiceServicer_to_server)


@pytest.fixture
async def inference(certs: Path):
    """An inference-like MeshServer serving TLS as inference, with health on port + 1 in plaintext."""
    tls = server_tls(tls_config(certs, tls={"health_port_offset": 1}), "inference")
    server = MeshServer(ServerConfig(port=0, metrics=False), [_inference_binding()], tls=tls)
    await server.start()
    await server.set_serving()
    yield server
    await server.stop(0)


async def _models(channel: grpc.aio.Channel) -> list[str]:
    response = await inference_pb2_grpc.InferenceServiceStub(channel).ListModels(
        inference_pb2.ListModelsRequest(), timeout=5
    )
    return [model.id for model in response.models]


async def _generated(channel: grpc.aio.Channel) -> str:
    stream = inference_pb2_grpc.InferenceServiceStub(channel).Generate(inference_pb2.GenerateRequest(), timeout=5)
    return "".join([response.text async for response in stream])


async def test_a_plaintext_call_to_a_tls_service_fails(inference: MeshServer) -> None:
    async with create_channel(inference.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await _models(channel)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_the_planner_may_call_inference(inference: MeshServer, certs: Path) -> None:
    async with create_channel(inference.address, tls=identity(certs, "planner"), server="inference") as channel:
        assert await _models(channel) == ["tiny"]
        assert await _generated(channel) == "Paris"


@pytest.mark.parametrize("caller", ["knowledge", "tools", "client"])
async def test_a_certificate_of_another_identity_is_permission_denied(
    inference: MeshServer, certs: Path, caller: str
) -> None:
    async with create_channel(inference.address, tls=identity(certs, caller), server="inference") as channel:
        for call in (_models, _generated):
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await call(channel)
            assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert error.value.details() == (
                f"caller '{caller}' (spiffe://meshpilot/{caller}) may not call inference; it accepts edge, planner "
                "(tls.allowed_callers.inference)"
            )


async def test_a_certificate_of_another_ca_fails_the_handshake(
    inference: MeshServer, certs: Path, stranger_certs: Path
) -> None:
    stranger = identity(stranger_certs, "planner")
    trusting_ours = TlsIdentity("planner", identity(certs, "planner").ca, stranger.certificate, stranger.key)
    async with create_channel(inference.address, tls=trusting_ours, server="inference") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await _models(channel)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_caller_accepts_only_the_service_it_meant_to_reach(inference: MeshServer, certs: Path) -> None:
    async with create_channel(inference.address, tls=identity(certs, "planner"), server="tools") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await _models(channel)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_health_and_reflection_answer_any_certificate_of_the_mesh(inference: MeshServer, certs: Path) -> None:
    async with create_channel(inference.address, tls=identity(certs, "client")) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        services = [s.name async for response in stream for s in response.list_services_response.service]
    assert INFERENCE_SERVICE in services


async def test_health_alone_is_served_in_plaintext_on_the_offset_port(inference: MeshServer) -> None:
    assert inference.health_port not in (None, inference.port)  # port 0: a free one (else port + offset)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{inference.health_port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await _models(channel)
    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_meshpilot_up_probes_health_with_the_client_certificate(inference: MeshServer, certs: Path) -> None:
    from meshpilot.cli.mesh import wait_serving

    assert await wait_serving(inference.address, timeout=5, tls=identity(certs, "client"))
    assert not await wait_serving(inference.address, timeout=1)


async def test_a_client_streaming_method_is_checked_too(certs: Path) -> None:
    async def count(requests, context):
        return str(len([r async for r in requests])).encode()

    def add(servicer: Any, server: grpc.aio.Server) -> None:
        handler = grpc.stream_unary_rpc_method_handler(count)
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Counter", {"Count": handler})])

    tls = ServerTls(identity(certs, "inference"), ("planner",))
    server = MeshServer(ServerConfig(port=0, metrics=False), [ServiceBinding("test.Counter", None, add)], tls=tls)
    await server.start()
    try:
        for caller, expected in (("planner", b"2"), ("knowledge", None)):
            async with create_channel(server.address, tls=identity(certs, caller), server="inference") as channel:
                call = channel.stream_unary("/test.Counter/Count")(iter([b"a", b"b"]), timeout=5)
                if expected is not None:
                    assert await call == expected
                    continue
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await call
                assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await server.stop(0)


# --- the planner: TLS for everyone, API keys for tenants ----------------------------------------------------------------


class PlannerThread:
    """The real planner (fake model and tools) with TLS and authentication on, its event loop in a thread, so CLI
    commands (which call asyncio.run themselves) can be invoked against it."""

    def __init__(self, config: MeshConfig, llm: ScriptedLLM) -> None:
        self.config, self.llm = config, llm
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=30)

    async def _start(self) -> None:
        self.server = create_planner(self.config, llm=self.llm, tools=FakeTools())
        await self.server.start()
        await self.server.set_serving()

    async def _stop(self) -> None:
        await self.server.stop(0)
        await self.server.bindings[0].servicer.close()

    def __enter__(self) -> PlannerThread:
        self.thread.start()
        self._call(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        self._call(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


def test_the_cli_calls_a_tls_planner_with_its_client_certificate_and_an_api_key(certs: Path, tmp_path: Path) -> None:
    config = tls_config(
        certs,
        planner={"server": {"port": 0, "metrics": False}},
        auth={"enabled": True, "keys_path": str(tmp_path / "keys.db")},
    )
    keys = ApiKeyStore(tmp_path / "keys.db")
    _, token = keys.create("acme")
    keys.close()
    tls_env = {"MESHPILOT_TLS__ENABLED": "true", "MESHPILOT_TLS__CERT_DIR": str(certs)}
    with PlannerThread(config, ScriptedLLM([answer("Paris")])) as planner:
        target = planner.server.address
        asked = runner.invoke(app, ["--api-key", token, "ask", "Capital of France?", "--planner", target], env=tls_env)
        assert asked.exit_code == 0, asked.output
        assert "Paris" in asked.output
        listed = runner.invoke(app, ["--api-key", token, "runs", "list", "--planner", target, "--json"], env=tls_env)
        assert listed.exit_code == 0, listed.output
        assert [(run["state"], run["answer"]) for run in json.loads(listed.output)] == [
            ("RUN_STATE_SUCCEEDED", "Paris")
        ]

        without_key = runner.invoke(app, ["runs", "list", "--planner", target], env=tls_env)
        assert without_key.exit_code == 1 and "UNAUTHENTICATED" in without_key.output
        plaintext = runner.invoke(
            app, ["--api-key", token, "runs", "list", "--planner", target], env={"MESHPILOT_TLS__ENABLED": "false"}
        )
        assert plaintext.exit_code == 1 and "UNAVAILABLE" in plaintext.output


def test_the_cli_names_a_missing_client_certificate(certs: Path, tmp_path: Path) -> None:
    env = {"MESHPILOT_TLS__ENABLED": "true", "MESHPILOT_TLS__CERT_DIR": str(tmp_path)}
    done = runner.invoke(app, ["runs", "list", "--planner", "127.0.0.1:1"], env=env)
    assert done.exit_code == 2
    assert f"cannot read {tmp_path}" in done.output and "meshpilot certs init" in done.output


async def test_the_planners_metrics_need_an_api_key_when_authentication_is_on(tmp_path: Path) -> None:
    config = load_config(data_dir=str(tmp_path), planner={"server": {"port": 0}}, auth={"enabled": True})
    server = create_planner(config, llm=ScriptedLLM([]), tools=FakeTools())
    await server.start()
    try:
        assert config.auth.keys_path is not None
        _, token = ApiKeyStore(config.auth.keys_path).create("acme")
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"

        def scrape(headers: dict[str, str]) -> tuple[int, bytes]:
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
                    return response.status, response.read()
            except urllib.error.HTTPError as refused:
                return refused.code, refused.read()

        status, body = await asyncio.to_thread(scrape, {})
        assert status == 401 and b"meshpilot_rpc" not in body
        assert (await asyncio.to_thread(scrape, {"Authorization": "Bearer mpk_000000000000_wrongwrongwrongwrong"}))[
            0
        ] == 401
        status, body = await asyncio.to_thread(scrape, {"Authorization": f"Bearer {token}"})
        assert status == 200 and b"meshpilot_tenant_tokens" in body
    finally:
        await server.stop(0)
        await server.bindings[0].servicer.close()


async def test_the_planners_metrics_stay_open_without_authentication(tmp_path: Path) -> None:
    config = load_config(data_dir=str(tmp_path), planner={"server": {"port": 0}})
    server = create_planner(config, llm=ScriptedLLM([]), tools=FakeTools())
    await server.start()
    try:
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        with await asyncio.to_thread(urllib.request.urlopen, url, None, 10) as response:
            assert response.status == 200
    finally:
        await server.stop(0)
        await server.bindings[0].servicer.close()
