"""TLS contexts for the cluster transport and the HTTP API (stdlib :mod:`ssl`).

Everything here is TLS 1.2 or newer with certificate verification on:

- **Peers** (``peer_tls``): mutual. Each node presents ``tls_cert_file`` both
  when it dials and when it is dialled, and verifies the other side against
  ``tls_ca_file``; the dialler also checks that the certificate names the host
  it dialled. The cluster-secret handshake still runs inside the tunnel, so a
  certificate alone does not make a member.
- **API** (``api_tls``): the node presents ``tls_cert_file``; with
  ``api_client_cert_required`` (default) clients must present a certificate
  signed by ``tls_ca_file`` too. Requests are still signed with the secret.

Files that cannot be loaded, and a node certificate that has expired or is
not yet valid, are :class:`~streambus_consensus.errors.ConfigError` naming the
field, raised when the node starts rather than at the first handshake.
:func:`describe_failure` turns a failed handshake into one line an operator
can act on.
"""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

from .config import NodeConfig
from .errors import ConfigError

__all__ = [
    "api_server_context",
    "client_context",
    "describe_failure",
    "peer_client_context",
    "peer_server_context",
]

_NOT_TLS_REASONS = frozenset({"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL",
                              "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"})


def peer_server_context(config: NodeConfig) -> ssl.SSLContext:
    """The context a node accepts peer connections with (client certificate required)."""
    context = _context(ssl.Purpose.CLIENT_AUTH, config)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def peer_client_context(config: NodeConfig) -> ssl.SSLContext:
    """The context a node dials its peers with (hostname checked, own certificate shown)."""
    return _context(ssl.Purpose.SERVER_AUTH, config)


def api_server_context(config: NodeConfig) -> ssl.SSLContext:
    """The context the HTTP API serves with."""
    context = _context(ssl.Purpose.CLIENT_AUTH, config)
    context.verify_mode = (ssl.CERT_REQUIRED if config.api_client_cert_required
                           else ssl.CERT_NONE)
    return context


def client_context(ca_file: str, cert_file: str | None = None,
                   key_file: str | None = None) -> ssl.SSLContext:
    """A context for API clients (the CLI, :class:`~streambus_consensus.client.ApiClient`):
    trusts ``ca_file`` and, when given, presents ``cert_file``/``key_file``."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_ca(context, ca_file, "ca file")
    if cert_file is not None:
        _load_chain(context, cert_file, key_file or cert_file, "cert file", "key file")
    return context


def describe_failure(exc: ssl.SSLError | ssl.CertificateError) -> str:
    """One line saying why a TLS handshake failed and what usually causes it."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = exc.verify_message or exc.reason or str(exc)
        if "local issuer" in message or "self-signed" in message or "self signed" in message:
            return f"certificate not trusted ({message}): signed by another CA?"
        return f"certificate rejected: {message}"
    if isinstance(exc, ssl.SSLEOFError):
        return ("the other side hung up during the handshake: does it require a client "
                "certificate, or not speak TLS?")
    reason = getattr(exc, "reason", None) or ""
    if reason in _NOT_TLS_REASONS:
        return f"the other side does not speak TLS ({reason.lower()}): is TLS off there?"
    if reason.endswith("ALERT_CERTIFICATE_REQUIRED"):
        return "the other side requires a client certificate signed by its CA"
    if reason.startswith(("SSLV3_ALERT", "TLSV1_ALERT", "TLSV13_ALERT")):
        alert = reason.split("ALERT_", 1)[-1].lower().replace("_", " ")
        return f"the other side rejected our certificate ({alert})"
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return "the other side presented no certificate"
    return f"TLS error: {reason.lower().replace('_', ' ') or exc}"


def _context(purpose: ssl.Purpose, config: NodeConfig) -> ssl.SSLContext:
    cert, key, ca = config.tls_cert_file, config.tls_key_file, config.tls_ca_file
    if cert is None or key is None or ca is None:
        raise ConfigError("tls_cert_file + tls_key_file + tls_ca_file", None,
                          "TLS needs all three files")
    context = ssl.create_default_context(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_ca(context, ca, "tls_ca_file")
    _load_chain(context, cert, key, "tls_cert_file", "tls_key_file")
    return context


def _load_ca(context: ssl.SSLContext, path: str, field_name: str) -> None:
    try:
        context.load_verify_locations(cafile=path)
    except FileNotFoundError:
        raise ConfigError(field_name, path, "no such file") from None
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(field_name, path, f"is not a PEM CA bundle ({_why(exc)})") from None


def _load_chain(context: ssl.SSLContext, cert: str, key: str, cert_field: str,
                key_field: str) -> None:
    for name, path in ((cert_field, cert), (key_field, key)):
        if not Path(path).is_file():
            raise ConfigError(name, path, "no such file")
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{cert_field} + {key_field}", cert,
                          f"cannot be loaded as a certificate and its key ({_why(exc)})") from None
    _check_validity(cert, cert_field)


def _check_validity(path: str, field_name: str) -> None:
    from cryptography import x509

    try:
        certificate = x509.load_pem_x509_certificate(Path(path).read_bytes())
    except ValueError as exc:
        raise ConfigError(field_name, path, f"is not a PEM certificate ({exc})") from None
    now = datetime.datetime.now(datetime.UTC)
    if now > certificate.not_valid_after_utc:
        raise ConfigError(field_name, path,
                          f"expired on {certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if now < certificate.not_valid_before_utc:
        raise ConfigError(field_name, path, "is not valid before "
                          f"{certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")


def _why(exc: BaseException) -> str:
    return str(getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc)
