"""Mutual TLS of the mesh: the certificate each service presents, the CA it trusts, and who may call it.

Every certificate of the mesh names its holder with a URI SAN ``spiffe://meshpilot/<name>`` (planner, tools, knowledge,
inference, or client for the CLI). An internal service asks every caller for a certificate of the mesh CA and serves
only the identities ``tls.allowed_callers`` names; the planner, the front door, serves TLS without asking for one
(its callers authenticate with API keys).
"""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from services.common.auth import OPEN_SERVICES, REFLECTION_SERVICES
from services.common.config import ConfigError, MeshConfig
from services.common.errors import rewrap_handler

IDENTITY_PREFIX = "spiffe://meshpilot/"
# Identities `meshpilot certs init` issues: the four gRPC services and the HTTP edge (a client of planner and inference).
SERVICES = ("planner", "tools", "knowledge", "inference", "edge")
CLIENT_IDENTITY = "client"
"""The identity of the CLI and of operators (`meshpilot ask`, `meshpilot tools`, health checks of `meshpilot up`)."""
# Answered for any certificate of the mesh CA: health (`meshpilot up`, operators) and reflection (grpcurl).
MESH_OPEN_SERVICES = OPEN_SERVICES + REFLECTION_SERVICES


def identity_uri(name: str) -> str:
    """The URI SAN that names ``name`` in its certificate."""
    return IDENTITY_PREFIX + name


@dataclass(frozen=True)
class TlsIdentity:
    """One identity's certificate and private key, and the mesh CA's certificate it trusts (PEM bytes)."""

    name: str
    ca: bytes
    certificate: bytes
    key: bytes

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Credentials of a client presenting this identity and trusting only the mesh CA."""
        return grpc.ssl_channel_credentials(self.ca, self.key, self.certificate)


@dataclass(frozen=True)
class ServerTls:
    """How a service serves TLS: as ``identity``, asking callers for a certificate of the mesh CA and serving only
    ``allowed_callers`` (None: no certificate is asked for, as at the front door). ``health_port_offset``: gRPC health
    is also served in plaintext on the service's port + this, for probes that cannot present a certificate."""

    identity: TlsIdentity
    allowed_callers: tuple[str, ...] | None
    health_port_offset: int | None = None

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.identity.key, self.identity.certificate)],
            root_certificates=self.identity.ca,
            require_client_auth=self.allowed_callers is not None,
        )

    def interceptor(self) -> CallerCheckInterceptor | None:
        """The check of the caller's identity, or None where certificates are not asked for."""
        if self.allowed_callers is None:
            return None
        return CallerCheckInterceptor(self.identity.name, self.allowed_callers)


def tls_identity(config: MeshConfig, name: str) -> TlsIdentity | None:
    """``name``'s certificate and key (<cert_dir>/<name>.crt and .key) and the mesh CA when config.tls.enabled, else
    None. Raises ConfigError naming the file when one is missing, unreadable, not PEM, expired, does not name ``name``,
    or when the key is not the certificate's."""
    if not config.tls.enabled:
        return None
    directory = config.tls.directory(config.data_dir)
    ca_path = config.tls.ca_path(config.data_dir)
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    ca = _read(ca_path, "ca_file")
    certificate = _read(cert_path, "cert_dir")
    key = _read(key_path, "cert_dir")
    _check_pair(name, cert_path, certificate, key_path, key)
    try:
        x509.load_pem_x509_certificate(ca)
    except ValueError as e:
        raise ConfigError(f"tls.ca_file: {ca_path} is not a PEM certificate ({e}); run `meshpilot certs init`") from e
    return TlsIdentity(name, ca, certificate, key)


def server_tls(config: MeshConfig, service: str) -> ServerTls | None:
    """How ``service`` serves TLS (None when config.tls is off): internal services ask for certificates and serve
    tls.allowed_callers[service]; a service not in it (the planner) serves any TLS client."""
    identity = tls_identity(config, service)
    if identity is None:
        return None
    callers = config.tls.allowed_callers.get(service)
    return ServerTls(identity, tuple(callers) if callers is not None else None, config.tls.health_port_offset)


def _read(path: Path, field: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(
            f"tls.{field}: cannot read {path} ({e.strerror}); write the mesh's certificates with "
            f"`meshpilot certs init --dir {path.parent}` or point tls.{field} at them"
        ) from e


def _check_pair(name: str, cert_path: Path, certificate: bytes, key_path: Path, key: bytes) -> None:
    """Fails at start, naming the file, on what gRPC would otherwise report as a failed bind or handshake."""
    try:
        cert = x509.load_pem_x509_certificate(certificate)
    except ValueError as e:
        raise ConfigError(f"tls.cert_dir: {cert_path} is not a PEM certificate ({e})") from e
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"tls.cert_dir: {key_path} is not an unencrypted PEM private key ({e})") from e
    if private.public_key() != cert.public_key():
        raise ConfigError(f"tls.cert_dir: {key_path} is not the key of {cert_path}; issue them again together")
    if cert.not_valid_after_utc < datetime.datetime.now(datetime.UTC):
        raise ConfigError(
            f"tls.cert_dir: {cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}; issue a new one "
            "(`meshpilot certs init --force` issues every certificate anew)"
        )
    if identity_uri(name) not in certificate_uris(cert):
        raise ConfigError(
            f"tls.cert_dir: {cert_path} does not name {identity_uri(name)} (a URI SAN); it is not {name}'s certificate"
        )


def certificate_uris(cert: x509.Certificate) -> list[str]:
    """The URI SANs of a certificate (where a mesh certificate names its identity)."""
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return names.get_values_for_type(x509.UniformResourceIdentifier)


def peer_identity(context: grpc.aio.ServicerContext) -> str | None:
    """The caller's identity: the <name> of the one spiffe://meshpilot/<name> URI in its verified certificate (None
    without a certificate, or with no such URI, or several)."""
    properties = context.auth_context()
    # The URI SANs; without that property, every SAN (a DNS name or an address never starts with spiffe://).
    uris = properties.get("peer_uri") or properties.get("x509_subject_alternative_name") or []
    prefix = IDENTITY_PREFIX.encode()
    names = [uri[len(prefix) :].decode(errors="replace") for uri in uris if uri.startswith(prefix)]
    return names[0] if len(names) == 1 else None


class CallerCheckInterceptor(grpc.aio.ServerInterceptor):
    """Refuses, with PERMISSION_DENIED naming the caller and who may call, every call whose certificate names none of
    ``allowed`` (the handshake already verified it was issued by the mesh CA). Health and reflection are answered
    for any certificate of the mesh CA."""

    def __init__(self, service: str, allowed: Iterable[str]) -> None:
        self.service = service
        self.allowed = frozenset(allowed)

    async def check(self, context: grpc.aio.ServicerContext) -> None:
        """Returns when the caller may call; else ends the call with PERMISSION_DENIED."""
        caller = peer_identity(context)
        if caller in self.allowed:
            return
        who = (
            f"caller {caller!r} ({identity_uri(caller)})"
            if caller
            else f"a caller whose certificate names no single {IDENTITY_PREFIX}<name> identity"
        )
        accepted = ", ".join(sorted(self.allowed)) or "nobody"
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{who} may not call {self.service}; it accepts {accepted} (tls.allowed_callers.{self.service})",
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.lstrip("/").startswith(MESH_OPEN_SERVICES):
            return handler
        if handler.request_streaming:
            return self._checked_request_streaming(handler)
        check = self.check

        def wrap_unary(behavior: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]) -> Any:
            async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await check(context)
                return await behavior(request, context)

            return checked

        def wrap_stream(behavior: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]) -> Any:
            async def checked(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                await check(context)
                async for response in behavior(request, context):
                    yield response

            return checked

        return rewrap_handler(handler, wrap_unary, wrap_stream)

    def _checked_request_streaming(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        # The mesh's own services take single requests; this keeps a client-streaming method added later covered.
        check = self.check
        if handler.stream_unary is not None:
            stream_unary = handler.stream_unary

            async def checked_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
                await check(context)
                return await stream_unary(requests, context)

            return grpc.stream_unary_rpc_method_handler(
                checked_unary, handler.request_deserializer, handler.response_serializer
            )
        stream_stream = handler.stream_stream
        assert stream_stream is not None

        async def checked_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await check(context)
            async for response in stream_stream(requests, context):
                yield response

        return grpc.stream_stream_rpc_method_handler(
            checked_stream, handler.request_deserializer, handler.response_serializer
        )
