"""Mutual TLS between services: a real post-processor started with a throwaway CA's
certificate answers only clients whose certificate that CA signed. The certificates are
made here with `cryptography`, for this run only."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.postprocessor.server import start as start_postprocessor
from services.postprocessor.settings import PostprocessorSettings
from shared.grpc_client import blocking_channel, channel
from shared.grpc_server import RunningServer, start_server
from shared.pb import postprocess_pb2 as pb
from shared.pb import postprocess_pb2_grpc as pb_grpc
from shared.settings import BaseServiceSettings
from shared.tls import TlsMisconfigured, TlsSettings
from tests.conftest import MODEL
from tests.reliability import Observed

# --- a throwaway PKI ---------------------------------------------------------------------


@dataclass(frozen=True)
class Issuer:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: str, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def make_ca(common_name: str) -> Issuer:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(common_name, _name(common_name), key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return Issuer(cert, key)


def issue(ca: Issuer, common_name: str) -> Issuer:
    """A leaf for loopback, good as a server and as a client certificate (each infermesh
    process is both)."""
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.DNSName("infermesh.internal"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    cert = (
        _builder(common_name, ca.cert.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    return Issuer(cert, key)


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_identity(folder: Path, ca: Issuer, leaf: Issuer) -> TlsSettings:
    """The files a process would get from its Secret, and the settings naming them."""
    folder.mkdir(parents=True)
    (folder / "ca.crt").write_bytes(pem(ca.cert))
    (folder / "tls.crt").write_bytes(pem(leaf.cert))
    (folder / "tls.key").write_bytes(key_pem(leaf.key))
    return TlsSettings(ca_file=folder / "ca.crt", cert_file=folder / "tls.crt", key_file=folder / "tls.key")


@dataclass(frozen=True)
class Pki:
    folder: Path
    ca: Issuer
    server: TlsSettings
    client: TlsSettings
    rogue_ca: Issuer
    rogue: Issuer
    rogue_settings: TlsSettings


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = make_ca("infermesh test CA")
    rogue_ca = make_ca("some other CA")
    rogue = issue(rogue_ca, "intruder")
    return Pki(
        folder=folder,
        ca=ca,
        server=write_identity(folder / "postprocessor", ca, issue(ca, "postprocessor")),
        client=write_identity(folder / "gateway", ca, issue(ca, "gateway")),
        rogue_ca=rogue_ca,
        rogue=rogue,
        rogue_settings=write_identity(folder / "intruder", ca, rogue),
    )


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def tls_postprocessor(pki: Pki, model_repository: Path) -> AsyncIterator[RunningServer]:
    settings = PostprocessorSettings(grpc_port=0, model_repository=model_repository, tls=pki.server)
    running = await start_postprocessor(settings)
    yield running
    await running.stop(0)


def request() -> pb.PostprocessRequest:
    return pb.PostprocessRequest(model_name=MODEL, model_version="1", logits=[2.0, 0.5, -1.0], num_labels=3)


async def postprocess(opened: grpc.aio.Channel) -> pb.PostprocessResponse:
    reply: pb.PostprocessResponse = await pb_grpc.PostprocessServiceStub(opened).Postprocess(request(), timeout=5)
    return reply


# --- the cases ------------------------------------------------------------------------------


@pytest.mark.reliability(
    "Security", "mTLS: client certificate signed by the mesh CA", "the call is answered (TLS 1.2+, both ends verified)"
)
async def test_a_client_with_a_certificate_from_the_ca_is_answered(
    tls_postprocessor: RunningServer, pki: Pki, observed: Observed
) -> None:
    # 127.0.0.1 checks the certificate's IP SAN; the override checks a mesh-wide DNS name.
    for target, tls in (
        (f"127.0.0.1:{tls_postprocessor.port}", pki.client),
        (
            f"127.0.0.1:{tls_postprocessor.port}",
            pki.client.model_copy(update={"server_name_override": "infermesh.internal"}),
        ),
        (f"localhost:{tls_postprocessor.port}", pki.client),
    ):
        async with channel(target, tls=tls) as opened:
            reply = await postprocess(opened)
            assert [r.label for r in reply.results] == ["negative"]
            health = await health_pb2_grpc.HealthStub(opened).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    observed.record(f"OK: Postprocess answered ({reply.results[0].label}), health SERVING")


def _no_client_cert(pki: Pki) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=pem(pki.ca.cert))


def _other_ca_client_cert(pki: Pki) -> grpc.ChannelCredentials:
    # Trusts the real server, so only the client's certificate is wrong.
    return grpc.ssl_channel_credentials(
        root_certificates=pem(pki.ca.cert), private_key=key_pem(pki.rogue.key), certificate_chain=pem(pki.rogue.cert)
    )


REFUSED = {
    "no client certificate": _no_client_cert,
    "client certificate from another CA": _other_ca_client_cert,
    "plaintext client": None,
}


@pytest.mark.reliability("Security", "mTLS: a client without a valid certificate", "refused before any RPC runs")
@pytest.mark.parametrize("client", list(REFUSED))
async def test_clients_without_a_certificate_from_the_ca_are_refused(
    tls_postprocessor: RunningServer, pki: Pki, client: str, observed: Observed
) -> None:
    target = f"127.0.0.1:{tls_postprocessor.port}"
    make = REFUSED[client]
    opened = grpc.aio.insecure_channel(target) if make is None else grpc.aio.secure_channel(target, make(pki))
    async with opened:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await postprocess(opened)
    # The server ends the handshake; the client only sees its connection closed.
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "failed to connect to all addresses" in str(refused.value.details())
    observed.record(f"{client}: {refused.value.code().name} (connection closed in the handshake), no response")


@pytest.mark.reliability(
    "Security", "mTLS: a server with a certificate from another CA", "our client refuses it (UNAVAILABLE)"
)
async def test_our_client_refuses_a_server_the_ca_did_not_sign(pki: Pki, observed: Observed) -> None:
    intruder = await start_server(BaseServiceSettings(grpc_port=0, tls=pki.rogue_settings), lambda server: None, [])
    await intruder.set_serving(True)
    try:
        async with channel(f"127.0.0.1:{intruder.port}", tls=pki.client) as opened:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await health_pb2_grpc.HealthStub(opened).Check(health_pb2.HealthCheckRequest(), timeout=5)
    finally:
        await intruder.stop(0)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "CERTIFICATE_VERIFY_FAILED" in str(refused.value.details())
    observed.record(f"{refused.value.code().name} (CERTIFICATE_VERIFY_FAILED in the handshake), no response")


async def test_blocking_channels_use_mutual_tls_too(tls_postprocessor: RunningServer, pki: Pki) -> None:
    """The CLI waits for its child services over a synchronous channel."""

    def check() -> int:
        with blocking_channel(f"127.0.0.1:{tls_postprocessor.port}", tls=pki.client) as opened:
            reply = health_pb2_grpc.HealthStub(opened).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return int(reply.status)

    # In a thread: the server answers on this event loop.
    assert await asyncio.to_thread(check) == health_pb2.HealthCheckResponse.SERVING


async def test_the_servers_health_checks_of_downstreams_use_its_certificate(
    tls_postprocessor: RunningServer, pki: Pki
) -> None:
    """serve_while_healthy dials downstreams with the server's own TLS settings."""
    caller = await start_server(BaseServiceSettings(grpc_port=0, tls=pki.client), lambda server: None, [])
    try:
        await caller.serve_while_healthy([f"127.0.0.1:{tls_postprocessor.port}"], interval_seconds=60)
        async with channel(f"127.0.0.1:{caller.port}", tls=pki.client) as opened:
            health = await health_pb2_grpc.HealthStub(opened).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await caller.stop(0)


# --- misconfiguration ---------------------------------------------------------------------------


def test_tls_is_off_unless_configured() -> None:
    assert TlsSettings(ca_file=None, cert_file=None, key_file=None).load() is None


def test_half_a_configuration_is_refused(pki: Pki) -> None:
    with pytest.raises(TlsMisconfigured) as refused:
        TlsSettings(ca_file=pki.server.ca_file, cert_file=pki.server.cert_file, key_file=None).load()
    assert refused.value.detail == (
        "mutual TLS is half configured: INFERMESH_TLS_KEY_FILE not set (set all three or none)"
    )
    with pytest.raises(TlsMisconfigured, match="SERVER_NAME_OVERRIDE is set but no certificates are"):
        TlsSettings(ca_file=None, cert_file=None, key_file=None, server_name_override="infermesh.internal").load()


def test_unusable_files_are_refused(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "missing.crt"
    with pytest.raises(TlsMisconfigured) as refused:
        pki.server.model_copy(update={"cert_file": missing}).load()
    assert refused.value.detail == f"INFERMESH_TLS_CERT_FILE {missing}: No such file or directory"

    not_pem = tmp_path / "ca.der"
    not_pem.write_bytes(pki.ca.cert.public_bytes(serialization.Encoding.DER))
    with pytest.raises(TlsMisconfigured) as refused:
        pki.server.model_copy(update={"ca_file": not_pem}).load()
    assert refused.value.detail == f"INFERMESH_TLS_CA_FILE {not_pem}: not a PEM file"

    # Another process's key with this process's certificate.
    with pytest.raises(TlsMisconfigured) as refused:
        pki.server.model_copy(update={"key_file": pki.client.key_file}).load()
    assert refused.value.detail.startswith(
        f"INFERMESH_TLS_CERT_FILE {pki.server.cert_file} with INFERMESH_TLS_KEY_FILE {pki.client.key_file}: "
    )


@pytest.mark.reliability(
    "Security",
    "mTLS misconfigured (a file missing)",
    "the service exits 1 at startup with one error line, no traceback, never serves plain text",
)
def test_a_service_with_a_missing_certificate_exits_with_one_line(
    pki: Pki, model_repository: Path, tmp_path: Path, observed: Observed
) -> None:
    env = dict(os.environ) | {
        "INFERMESH_POSTPROCESSOR_MODEL_REPOSITORY": str(model_repository),
        "INFERMESH_POSTPROCESSOR_GRPC_PORT": "0",
        "INFERMESH_POSTPROCESSOR_METRICS_ENABLED": "false",
        "INFERMESH_TLS_CA_FILE": str(pki.server.ca_file),
        "INFERMESH_TLS_CERT_FILE": str(tmp_path / "tls.crt"),
        "INFERMESH_TLS_KEY_FILE": str(pki.server.key_file),
    }
    done = subprocess.run(
        [sys.executable, "-m", "services.postprocessor"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    expected = f"post-processor cannot serve: INFERMESH_TLS_CERT_FILE {tmp_path / 'tls.crt'}: No such file or directory"
    assert [line for line in lines if "cannot serve" in line] == [lines[-1]]
    assert lines[-1].endswith(expected)
    observed.record(
        f"exit {done.returncode}; stderr ends: {lines[-1].split('cannot serve: ')[-1]}".replace(str(tmp_path), "<tmp>")
    )
