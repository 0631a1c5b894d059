"""Test certificates for DICOM TLS, written as PEM files: the site's CA with a server certificate for the
loopback address and a client certificate, and a second CA that the node does not trust with a client
certificate of its own."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Certificates:
    ca: Path  # the site's CA certificate
    server: KeyPair  # 127.0.0.1 and localhost, issued by `ca`
    client: KeyPair  # issued by `ca`
    other_ca: Path  # a CA the site does not trust
    stranger: KeyPair  # a client certificate issued by `other_ca`


def _issue(ca: trustme.CA, folder: Path, name: str, *identities: str) -> KeyPair:
    issued = ca.issue_cert(*identities, common_name=identities[0])
    pair = KeyPair(folder / f"{name}.crt", folder / f"{name}.key")
    issued.cert_chain_pems[0].write_to_path(str(pair.cert))
    issued.private_key_pem.write_to_path(str(pair.key))
    return pair


def make_certificates(folder: Path) -> Certificates:
    """RSA keys throughout: every DICOM TLS peer (DCMTK's BCP 195 profiles, Orthanc) speaks RSA."""
    folder.mkdir(parents=True, exist_ok=True)
    site, other = (trustme.CA(key_type=trustme.KeyType.RSA, organization_name=name) for name in ("Site", "Other"))
    site.cert_pem.write_to_path(str(folder / "ca.crt"))
    other.cert_pem.write_to_path(str(folder / "other-ca.crt"))
    return Certificates(ca=folder / "ca.crt", server=_issue(site, folder, "server", "127.0.0.1", "localhost"),
                        client=_issue(site, folder, "client", "pacs.test"), other_ca=folder / "other-ca.crt",
                        stranger=_issue(other, folder, "stranger", "stranger.test"))
