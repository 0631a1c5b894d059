"""All settings in one place: defaults < configs/lungnode.yaml < LUNGNODE_* environment variables."""
from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from lungnode.dicom_node.feedback import FEEDBACK_FILE
from lungnode.inference.onnx_runtime import Precision, Provider

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "lungnode.yaml"
_AE_RE = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>[^:]+):(?P<port>\d{1,5})$")
_HOST_PORT_RE = re.compile(r"^(?P<host>[^:@\s]+):(?P<port>\d{1,5})$")


class DicomPeer(BaseModel):
    """A remote DICOM application entity, written `AET@host:port`."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "DicomPeer":
        m = _AE_RE.match(text.strip())
        if not m:
            raise ValueError(f"expected AET@host:port (for example ORTHANC@10.0.0.5:4242), got {text!r}")
        return cls(ae_title=m["aet"], host=m["host"], port=int(m["port"]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class HostPort(BaseModel):
    """A TCP endpoint written `host:port` (the RIS's HL7 MLLP listener)."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "HostPort":
        m = _HOST_PORT_RE.match(text.strip())
        if not m:
            raise ValueError(f"expected host:port (for example ris.hospital.lan:2575), got {text!r}")
        return cls(host=m["host"], port=int(m["port"]))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class Settings(BaseSettings):
    """lungnode settings. Every field can be set as LUNGNODE_<NAME> in the environment."""

    model_config = SettingsConfigDict(env_prefix="LUNGNODE_", extra="ignore")

    ae_title: str = "LUNGNODE"
    dicom_host: str = "0.0.0.0"
    dicom_port: int = 11112
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    dicom_tls_port: int | None = None  # DICOM TLS listener (BCP 195), off when unset; needs tls_cert and tls_key
    pacs_tls: bool = False  # send results to the PACS over DICOM TLS
    data_dir: Path = Path("var")
    allowed_callers: Annotated[list[str], NoDecode] = []
    called_ae_titles: Annotated[list[str], NoDecode] = []  # Called AE titles answered to; empty: ae_title only
    pacs: Annotated[DicomPeer | None, NoDecode] = None
    orthanc_url: str | None = None
    dicom_timeout_seconds: float = 60.0  # an association silent this long is aborted
    dicom_message_timeout_seconds: float = 120.0  # one C-STORE's bytes, plus 1 s per 256 KiB of it
    dicom_association_timeout_seconds: float = 3600.0  # one association, connect to release
    max_associations: int = 16  # more at once are refused ("busy, try later")
    max_connections: int = 64  # open DICOM connections, associated or not; more are closed at once
    stable_seconds: float = 30.0
    retain_images_days: float = 30.0  # received and quarantined images are deleted after this; 0: kept
    # Series selection: what a chest CT series must look like to be read.
    min_slices: int = 40
    max_slice_spacing_mm: float = 3.0
    max_pixel_spacing_mm: float = 1.5
    # Detection.
    model: str = "default"
    backend: str = "onnxruntime"  # or "torch" (the PyTorch state dict; for comparison)
    onnx_provider: Provider = "auto"  # auto: CUDA, else OpenVINO, else ONNX Runtime's CPU provider
    onnx_precision: Precision = "auto"  # auto: bf16 where native; f32: never; int8: the card's 8-bit network
    torch_device: Literal["auto", "cpu", "cuda"] = "auto"  # backend torch: auto takes a CUDA GPU when PyTorch sees one
    threads: int = 0  # 0 = all cores
    # Delivery of results.
    send_retry_first_seconds: float = 5.0
    send_retry_max_seconds: float = 600.0
    poll_seconds: float = 0.5
    # Reports to the RIS, off unless set: HL7 v2.5.1 ORU^R01 over MLLP and/or a FHIR R4 transaction.
    ris_hl7: Annotated[HostPort | None, NoDecode] = None
    hl7_sending_application: str = "LUNGNODE"  # MSH-3
    hl7_sending_facility: str = "RADIOLOGY"  # MSH-4
    hl7_receiving_application: str = "RIS"  # MSH-5
    hl7_receiving_facility: str = "RADIOLOGY"  # MSH-6
    fhir_url: str | None = None
    fhir_patient_system: str = "urn:lungnode:patient-id"  # Identifier.system of the DICOM Patient ID
    ris_timeout_seconds: float = 30.0
    # A radiologist's completed review goes back as a verified results version (SR VERIFIED, overlays, RIS).
    send_verified_results: bool = False
    # Web security: who may reach the page and API, and the audit trail (README, "For the security officer").
    allowed_hosts: Annotated[list[str], NoDecode] = ["127.0.0.1", "localhost"]  # others get 400 (Host header)
    session_minutes: float = 480.0  # a login lasts this long, then the page asks again
    admin_password: str | None = None  # the first admin's password when no user exists yet (else random, printed)
    audit_syslog: Annotated[HostPort | None, NoDecode] = None  # ATNA audit repository (syslog, RFC 5424)
    audit_syslog_tls: bool = True  # RFC 5425 syslog over TLS; false: plain TCP (RFC 6587 octet counting)
    audit_syslog_ca: Path | None = None  # CA that signed the collector's certificate (default: system CAs)
    # Sign-in with the hospital's OpenID Connect provider, offered on the login page when oidc_issuer is set.
    oidc_issuer: str | None = None  # e.g. https://sso.hospital.lan/realms/radiology
    oidc_client_id: str | None = None
    oidc_client_secret: str | None = None
    oidc_roles_claim: str = "groups"  # the ID token claim that lists the user's groups or roles
    oidc_admin_group: str = "lungnode-admin"  # in that claim: the admin role
    oidc_radiologist_group: str = "lungnode-radiologist"  # in that claim: the radiologist role

    @field_validator("ae_title")
    @classmethod
    def _check_aet(cls, v: str) -> str:
        v = v.strip()
        if not 1 <= len(v) <= 16 or "\\" in v:
            raise ValueError("AE title must be 1-16 characters without backslash")
        return v

    @field_validator("allowed_callers", "called_ae_titles", "allowed_hosts", mode="before")
    @classmethod
    def _split_list(cls, v: Any) -> list[str]:
        if v is None:
            return []
        if isinstance(v, str):
            return [p.strip() for p in v.split(",") if p.strip()]
        return [str(p).strip() for p in v if str(p).strip()]

    @field_validator("pacs", mode="before")
    @classmethod
    def _parse_pacs(cls, v: Any) -> Any:
        if v is None or (isinstance(v, str) and not v.strip()):
            return None
        if isinstance(v, str):
            return DicomPeer.parse(v)
        return v

    @field_validator("ris_hl7", "audit_syslog", mode="before")
    @classmethod
    def _parse_ris_hl7(cls, v: Any) -> Any:
        if v is None or (isinstance(v, str) and not v.strip()):
            return None
        return HostPort.parse(v) if isinstance(v, str) else v

    @field_validator("orthanc_url", "fhir_url", "oidc_issuer", mode="before")
    @classmethod
    def _blank_is_none(cls, v: Any) -> Any:
        return None if isinstance(v, str) and not v.strip() else v

    @model_validator(mode="after")
    def _tls_listener_has_its_certificate(self) -> "Settings":
        if self.dicom_tls_port is not None and (self.tls_cert is None or self.tls_key is None):
            raise ValueError("LUNGNODE_DICOM_TLS_PORT needs LUNGNODE_TLS_CERT and LUNGNODE_TLS_KEY")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = Path(os.environ.get("LUNGNODE_CONFIG", DEFAULT_CONFIG))
        yaml_source = YamlConfigSettingsSource(settings_cls, yaml_file=path if path.is_file() else None)
        return (init_settings, env_settings, yaml_source)

    # Derived locations under data_dir.
    @property
    def incoming_dir(self) -> Path:
        return self.data_dir / "incoming"

    @property
    def quarantine_dir(self) -> Path:
        return self.data_dir / "quarantine"

    @property
    def results_dir(self) -> Path:
        return self.data_dir / "results"

    @property
    def answered_ae_titles(self) -> list[str]:
        """The Called AE titles an association may name: the configured list, else the node's own."""
        return self.called_ae_titles or [self.ae_title]

    @property
    def db_path(self) -> Path:
        return self.data_dir / "lungnode.sqlite3"

    @property
    def feedback_path(self) -> Path:
        return self.data_dir / FEEDBACK_FILE

    @property
    def accounts_path(self) -> Path:
        return self.data_dir / "accounts.sqlite3"

    @property
    def audit_dir(self) -> Path:
        return self.data_dir / "audit"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def dump_yaml(settings: Settings) -> str:
    """The effective settings, for `lungnode config`."""
    data = settings.model_dump(mode="json")
    data["pacs"] = str(settings.pacs) if settings.pacs else None
    data["ris_hl7"] = str(settings.ris_hl7) if settings.ris_hl7 else None
    data["audit_syslog"] = str(settings.audit_syslog) if settings.audit_syslog else None
    for secret in ("admin_password", "oidc_client_secret"):
        if data[secret]:
            data[secret] = "(set)"
    return yaml.safe_dump(data, sort_keys=False)
