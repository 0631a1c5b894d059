"""TLS contexts for DICOM over TLS, to the BCP 195 profile (DICOM PS3.15 B.9, RFC 9325), for both sides.

TLS 1.2 or 1.3 only (RFC 8996 retired 1.0 and 1.1). Under TLS 1.2 only the AEAD suites with forward
secrecy that RFC 9325 recommends; TLS 1.3's own suites are all acceptable. No TLS compression, no
renegotiation. The receiving side checks client certificates against `ca` when one is given (and then
requires one); the sending side always checks the peer's certificate and its host name, against `ca` or
else the system's trusted authorities.
"""
from __future__ import annotations

import ssl
from pathlib import Path

BCP195_TLS12_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384",
))


def _bcp195(protocol: ssl._SSLMethod) -> ssl.SSLContext:
    context = ssl.SSLContext(protocol)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(BCP195_TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


def server_context(cert: Path, key: Path, ca: Path | None = None) -> ssl.SSLContext:
    """For the listener: our certificate and key; with `ca`, a client certificate it issued is required."""
    context = _bcp195(ssl.PROTOCOL_TLS_SERVER)
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    context.load_cert_chain(cert, key)
    if ca is not None:
        context.load_verify_locations(ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(cert: Path | None = None, key: Path | None = None, ca: Path | None = None) -> ssl.SSLContext:
    """For sending: the peer's certificate is checked against `ca` (else the system's authorities) and must
    name the host connected to; our certificate and key are shown when given."""
    context = _bcp195(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and host name checks by default
    if ca is not None:
        context.load_verify_locations(ca)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context
