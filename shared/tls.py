"""Optional mutual TLS between infermesh processes: one CA, and one certificate per
process that it shows both as a server and as a client. Off unless configured, so the
mesh keeps working in plain text on loopback.

`shared.grpc_server.start_server` and `shared.grpc_client.channel` are the only places that
turn these settings into gRPC credentials."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import grpc
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.errors import InfermeshError

ENV_PREFIX = "INFERMESH_TLS_"


class TlsMisconfigured(InfermeshError):
    """Mutual TLS is half configured or its files cannot be used; raised at startup, and
    the process says why in one line and exits rather than fall back to plain text."""

    title = "Mutual TLS misconfigured"


class TlsSettings(BaseSettings):
    """Mutual TLS for every gRPC server and client of the process (env prefix
    INFERMESH_TLS_, shared by all processes). Either all three files or none."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", env_ignore_empty=True)

    ca_file: Path | None = None
    """PEM bundle of the CA(s) whose certificates peers must present (as clients and as servers)."""

    cert_file: Path | None = None
    """PEM certificate chain this process presents, as a server and as a client."""

    key_file: Path | None = None
    """PEM private key of `cert_file` (unencrypted; gRPC cannot prompt for a passphrase)."""

    server_name_override: str = ""
    """Name to check servers' certificates against instead of the target's host name
    (one mesh-wide name on every certificate, or tests dialling 127.0.0.1); empty = the host."""

    @property
    def enabled(self) -> bool:
        return any((self.ca_file, self.cert_file, self.key_file))

    def load(self) -> TlsMaterial | None:
        """The certificates read from disk, or None when TLS is off; TlsMisconfigured if only
        some files are set, or one is missing, unreadable, not PEM, or the key does not
        belong to the certificate (caught here rather than as failed handshakes later)."""
        if not self.enabled:
            if self.server_name_override:  # someone meant TLS on: never serve plain text by surprise
                raise TlsMisconfigured(
                    f"{_env('server_name_override')} is set but no certificates are: set "
                    f"{_env('ca_file')}, {_env('cert_file')} and {_env('key_file')}, or unset it"
                )
            return None
        files = {"ca_file": self.ca_file, "cert_file": self.cert_file, "key_file": self.key_file}
        unset = [_env(name) for name, path in files.items() if path is None]
        if unset:
            raise TlsMisconfigured(f"mutual TLS is half configured: {', '.join(unset)} not set (set all three or none)")
        contents = {name: _read(name, path) for name, path in files.items() if path is not None}
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            context.load_verify_locations(cadata=contents["ca_file"].decode("ascii", "replace"))
        except ssl.SSLError as error:
            raise TlsMisconfigured(f"{_env('ca_file')} {self.ca_file}: no usable CA certificate ({error})") from None
        try:
            context.load_cert_chain(str(self.cert_file), str(self.key_file), password=_no_passphrase)
        except (ssl.SSLError, _EncryptedKey) as error:
            raise TlsMisconfigured(
                f"{_env('cert_file')} {self.cert_file} with {_env('key_file')} {self.key_file}: {error}"
            ) from None
        return TlsMaterial(
            ca=contents["ca_file"],
            cert=contents["cert_file"],
            key=contents["key_file"],
            server_name_override=self.server_name_override,
        )


@dataclass(frozen=True)
class TlsMaterial:
    """The PEM bytes of a process's TLS identity and the CA it trusts."""

    ca: bytes
    cert: bytes
    key: bytes
    server_name_override: str = ""

    def server_credentials(self) -> grpc.ServerCredentials:
        """Requires every client to present a certificate signed by the CA."""
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca, require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Checks the server against the CA and presents this process's certificate."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )

    def channel_options(self) -> list[tuple[str, str]]:
        if not self.server_name_override:
            return []
        return [("grpc.ssl_target_name_override", self.server_name_override)]


@cache
def environment_tls() -> TlsMaterial | None:
    """The process's TLS material from INFERMESH_TLS_*, read once (a rotated certificate
    takes a restart); TlsMisconfigured, raised again on every call, if it is unusable."""
    return TlsSettings().load()


class _EncryptedKey(Exception):
    def __str__(self) -> str:
        return "the private key is encrypted; gRPC needs an unencrypted key"


def _no_passphrase() -> str:
    # Without a callback OpenSSL would prompt on the terminal (or block without one).
    raise _EncryptedKey


def _env(field: str) -> str:
    return f"{ENV_PREFIX}{field}".upper()


def _read(field: str, path: Path) -> bytes:
    try:
        content = path.read_bytes()
    except OSError as error:
        raise TlsMisconfigured(f"{_env(field)} {path}: {error.strerror or error}") from None
    if b"-----BEGIN " not in content:
        raise TlsMisconfigured(f"{_env(field)} {path}: not a PEM file")
    return content
