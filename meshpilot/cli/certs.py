"""`meshpilot certs init`: a CA of the mesh and one certificate per service (and one for the CLI), for mutual TLS."""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from rich.console import Console
from rich.table import Table

from meshpilot.cli.options import ConfigOption, fail, load_config
from services.common.tls import CLIENT_IDENTITY, SERVICES, identity_uri

certs_app = typer.Typer(help="Certificates for mutual TLS between the services.", no_args_is_help=True)

CA_DAYS = 3650
DEFAULT_DAYS = 365


@dataclass(frozen=True)
class IssuedFile:
    """A file ``init`` wrote: what it holds and its path."""

    name: str
    path: Path


class CertificateExistsError(Exception):
    """The directory already holds a CA; issuing a new one would orphan every certificate it signed."""


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "MeshPilot"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _alt_names(identity: str, hosts: Sequence[str]) -> list[x509.GeneralName]:
    """A service's names: its DNS names and loopback (what it is dialled by) and its identity URI; the client's:
    its identity URI only."""
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity_uri(identity))]
    if identity == CLIENT_IDENTITY:
        return names
    for host in [identity, f"{identity}.meshpilot", "localhost", "127.0.0.1", *hosts]:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return list(dict.fromkeys(names))


def _write(path: Path, data: bytes, mode: int) -> None:
    """Writes ``data`` to ``path`` with ``mode`` from the start (a key is never readable by others, not even briefly),
    replacing the file in one step."""
    partial = path.with_name(path.name + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(partial, path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def issue_mesh_certificates(
    directory: Path,
    *,
    hosts: Sequence[str] = (),
    days: int = DEFAULT_DAYS,
    force: bool = False,
    now: datetime.datetime | None = None,
) -> list[IssuedFile]:
    """Writes a CA (ca.crt, ca.key) and, signed by it, <name>.crt and <name>.key for each service and the client:
    EC P-256 keys (mode 0600), certificates valid ``days`` (the CA ten years) naming ``spiffe://meshpilot/<name>``.
    Service certificates also name <name>, <name>.meshpilot, localhost, 127.0.0.1 and ``hosts``.

    ``now``: when they are issued (tests issue certificates that have expired). Raises CertificateExistsError when ``directory`` holds a CA already, unless ``force``.
    """
    ca_cert_path, ca_key_path = directory / "ca.crt", directory / "ca.key"
    existing = [path for path in (ca_cert_path, ca_key_path) if path.exists()]
    if existing and not force:
        raise CertificateExistsError(
            f"{existing[0]} exists; a new CA would invalidate every certificate the old one signed. Pass --force to "
            "issue a new CA and new certificates for every service (then restart them all)"
        )
    directory.mkdir(parents=True, exist_ok=True)
    now = now or datetime.datetime.now(datetime.UTC)
    # An hour back: a peer whose clock is a little behind still accepts the certificates at once.
    not_before = now - datetime.timedelta(hours=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("MeshPilot CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(ca_key_path, _pem_key(ca_key), 0o600)
    _write(ca_cert_path, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    issued = [IssuedFile("CA certificate", ca_cert_path), IssuedFile("CA key", ca_key_path)]
    for identity in (*SERVICES, CLIENT_IDENTITY):
        key = ec.generate_private_key(ec.SECP256R1())
        # Services serve and call; the client only calls.
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if identity != CLIENT_IDENTITY:
            usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(identity))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(_alt_names(identity, hosts)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        _write(directory / f"{identity}.key", _pem_key(key), 0o600)
        _write(directory / f"{identity}.crt", cert.public_bytes(serialization.Encoding.PEM), 0o644)
        issued.append(IssuedFile(identity_uri(identity), directory / f"{identity}.crt"))
    return issued


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


@certs_app.command()
def init(
    directory: Annotated[
        Path | None, typer.Option("--dir", help="Where to write them (default: tls.cert_dir, else <data_dir>/certs).")
    ] = None,
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="Another DNS name or IP address of every service certificate (repeatable)."),
    ] = None,
    days: Annotated[int, typer.Option(min=1, max=3650, help="Validity of the service and client certificates.")] = (
        DEFAULT_DAYS
    ),
    force: Annotated[bool, typer.Option(help="Replace an existing CA and every certificate.")] = False,
    config: ConfigOption = None,
) -> None:
    """Write a CA and a certificate and key for each service (planner, tools, knowledge, inference) and for the CLI
    (client); then set tls.enabled (MESHPILOT_TLS__ENABLED=true) for the services and the CLI."""
    if directory is None:
        cfg = load_config(config)
        directory = cfg.tls.directory(cfg.data_dir)
    try:
        issued = issue_mesh_certificates(directory, hosts=host or [], days=days, force=force)
    except CertificateExistsError as e:
        fail(str(e), 1)
    except OSError as e:
        fail(f"cannot write certificates to {directory}: {e.strerror}", 1)
    table = Table("NAME", "FILE", box=None)
    for item in issued:
        table.add_row(item.name, str(item.path))
    console = Console()
    console.print(table)
    console.print(
        f"Keys are mode 0600; keep ca.key offline once the certificates are issued. Turn TLS on with "
        f"tls.enabled: true and tls.cert_dir: {directory} (or MESHPILOT_TLS__ENABLED=true).",
        soft_wrap=True,
        highlight=False,
    )
