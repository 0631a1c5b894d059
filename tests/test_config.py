"""Settings: the YAML file and the documented LUNGNODE_* environment variables."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from lungnode.config import DEFAULT_CONFIG, Settings, dump_yaml
from lungnode.training.fit import load_config
from tests.conftest import REPO


def test_documented_environment_variables_override_the_yaml(monkeypatch, tmp_path):
    env = {
        "LUNGNODE_AE_TITLE": "AI_NODE", "LUNGNODE_DICOM_PORT": "104", "LUNGNODE_HTTP_PORT": "8080",
        "LUNGNODE_DATA_DIR": str(tmp_path), "LUNGNODE_ALLOWED_CALLERS": "PACS1, PACS2,",
        "LUNGNODE_PACS": "ORTHANC@10.1.2.3:4242", "LUNGNODE_ORTHANC_URL": "http://10.1.2.3:8042",
        "LUNGNODE_STABLE_SECONDS": "12.5",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = Settings()
    assert (s.ae_title, s.dicom_port, s.http_port, s.data_dir) == ("AI_NODE", 104, 8080, tmp_path)
    assert s.allowed_callers == ["PACS1", "PACS2"]
    assert (s.pacs.ae_title, s.pacs.host, s.pacs.port) == ("ORTHANC", "10.1.2.3", 4242)
    assert s.orthanc_url == "http://10.1.2.3:8042" and s.stable_seconds == 12.5


def test_shipped_yaml_gives_the_documented_defaults(monkeypatch):
    monkeypatch.delenv("LUNGNODE_CONFIG", raising=False)
    assert DEFAULT_CONFIG.is_file()
    s = Settings()
    assert (s.ae_title, s.dicom_port, s.http_port, s.http_host) == ("LUNGNODE", 11112, 8000, "127.0.0.1")
    assert s.allowed_callers == [] and s.pacs is None
    assert s.allowed_hosts == ["127.0.0.1", "localhost"] and s.tls_cert is None and s.audit_syslog is None


def test_web_security_settings_from_the_environment(monkeypatch, tmp_path):
    env = {"LUNGNODE_ALLOWED_HOSTS": "lungnode.hospital.lan, 10.0.0.5,", "LUNGNODE_AUDIT_SYSLOG": "arr.hospital.lan:6514",
           "LUNGNODE_TLS_CERT": str(tmp_path / "node.pem"), "LUNGNODE_TLS_KEY": str(tmp_path / "node.key"),
           "LUNGNODE_ADMIN_PASSWORD": "first admin secret"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = Settings()
    assert s.allowed_hosts == ["lungnode.hospital.lan", "10.0.0.5"]
    assert (s.audit_syslog.host, s.audit_syslog.port, s.audit_syslog_tls) == ("arr.hospital.lan", 6514, True)
    assert (s.tls_cert, s.tls_key) == (tmp_path / "node.pem", tmp_path / "node.key")
    printed = dump_yaml(s)  # what `lungnode config` shows
    assert "arr.hospital.lan:6514" in printed and "first admin secret" not in printed


def test_yaml_file_named_by_lungnode_config(monkeypatch, tmp_path):
    cfg = tmp_path / "site.yaml"
    cfg.write_text("ae_title: SITE_AI\nallowed_callers: [PACS]\npacs: PACS@pacs.local:104\n")
    monkeypatch.setenv("LUNGNODE_CONFIG", str(cfg))
    s = Settings()
    assert s.ae_title == "SITE_AI" and s.allowed_callers == ["PACS"] and s.pacs.port == 104


@pytest.mark.parametrize("bad", ["ORTHANC", "ORTHANC@host", "@host:104", "A@h:notaport"])
def test_malformed_pacs_address_is_a_clear_error(monkeypatch, bad):
    monkeypatch.setenv("LUNGNODE_PACS", bad)
    with pytest.raises(ValidationError, match="AET@host:port"):
        Settings()


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("train_*.yaml")), ids=lambda p: p.name)
def test_every_shipped_training_config_is_valid(path):
    """The recipes the README and the model cards point to parse, and each trains on something."""
    cfg = load_config(path)
    assert cfg.seeds() or cfg.datalists
    assert cfg.init_weights is None or (REPO / cfg.init_weights).is_file()


def test_dicom_tls_settings_and_a_tls_port_without_its_certificate_is_refused(monkeypatch, tmp_path):
    for k, v in {"LUNGNODE_TLS_CERT": tmp_path / "node.crt", "LUNGNODE_TLS_KEY": tmp_path / "node.key",
                 "LUNGNODE_TLS_CA": tmp_path / "ca.crt", "LUNGNODE_DICOM_TLS_PORT": "2762",
                 "LUNGNODE_PACS_TLS": "true"}.items():
        monkeypatch.setenv(k, str(v))
    s = Settings()
    assert (s.tls_cert, s.tls_key, s.tls_ca) == (tmp_path / "node.crt", tmp_path / "node.key", tmp_path / "ca.crt")
    assert s.dicom_tls_port == 2762 and s.pacs_tls is True
    monkeypatch.delenv("LUNGNODE_TLS_KEY")
    with pytest.raises(ValidationError, match="LUNGNODE_DICOM_TLS_PORT needs LUNGNODE_TLS_CERT and LUNGNODE_TLS_KEY"):
        Settings()
