"""Real servers on loopback ports, started as processes: an Orthanc PACS and a lungnode node.

Shared by `make demo`, `make bench` and the tests, so all three exercise the same real set-up.
The Debian builds of Orthanc and DCMTK need TCP_NODELAY=1 in their environment, or they wait for the
40 ms delayed ACK after every instance on loopback.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import requests

PEER_ENV = {**os.environ, "TCP_NODELAY": "1"}


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free loopback port not handed out before in this process: a port given to a server that has not
    bound it yet is free again to the kernel, and was once given twice (Orthanc's DICOM port and a node's
    web port)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def wait_for(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (requests.RequestException, OSError):
            pass
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def _http_ok(url: str, verify: bool | str = True) -> bool:
    return requests.get(url, timeout=2, verify=verify).ok


def _terminate(proc: subprocess.Popen | None, log, timeout: float) -> None:
    """SIGTERM, then SIGKILL if it does not exit in time; close its log."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    log.close()


@dataclass(frozen=True)
class OrthancTls:
    """Orthanc's DICOM TLS: its certificate and key, the certificates (or CA) it trusts, and whether callers
    must show a certificate. With it, Orthanc's DICOM port and every modality it sends to speak TLS only."""

    cert: Path
    key: Path
    trusted: Path
    remote_certificate_required: bool = True


class OrthancServer:
    """A throw-away Orthanc (Debian package) with its own storage, on free loopback ports."""

    def __init__(self, workdir: Path, aet: str = "ORTHANC", modalities: dict[str, tuple[str, str, int]] | None = None,
                 binary: str | None = None, dicom_port: int | None = None, plugins: Sequence[str] = (),
                 tls: OrthancTls | None = None) -> None:
        self.binary = binary or shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        if not Path(self.binary).exists():
            raise FileNotFoundError("Orthanc is not installed: apt-get install orthanc")
        self.workdir = workdir
        self.aet = aet
        self.dicom_port = dicom_port or free_port()
        self.http_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.modalities = modalities or {}
        self.plugins = list(plugins)  # shared libraries (e.g. the Web Viewer's .so) Orthanc loads at start
        self.tls = tls
        self.proc: subprocess.Popen | None = None

    def start(self) -> "OrthancServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "lungnode-test-pacs", "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "storage"), "HttpPort": self.http_port,
            "DicomPort": self.dicom_port, "DicomAet": self.aet, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomCheckCalledAet": False, "Plugins": self.plugins,
            "StorageCompression": False,
            "DicomModalities": {name: list(v) for name, v in self.modalities.items()},
            "StableAge": 2, "OverwriteInstances": True, "ConcurrentJobs": 2,
        }
        if self.tls is not None:
            config |= {
                "DicomTlsEnabled": True, "DicomTlsCertificate": str(self.tls.cert),
                "DicomTlsPrivateKey": str(self.tls.key), "DicomTlsTrustedCertificates": str(self.tls.trusted),
                "DicomTlsRemoteCertificateRequired": self.tls.remote_certificate_required,
                "DicomModalities": {name: {"AET": aet, "Host": host, "Port": port, "UseDicomTls": True}
                                    for name, (aet, host, port) in self.modalities.items()},
            }
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(config, indent=2))
        self.log = open(self.workdir / "orthanc.log", "wb")
        self.proc = subprocess.Popen([self.binary, str(cfg)], stdout=self.log, stderr=subprocess.STDOUT,
                                     env=PEER_ENV)
        wait_for(lambda: _http_ok(f"{self.url}/system"), 30, "Orthanc to start")
        return self

    def stop(self) -> None:
        _terminate(self.proc, getattr(self, "log", None), 10)

    def __enter__(self) -> "OrthancServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- REST helpers --------------------------------------------------------------------------
    def upload(self, paths: list[Path]) -> set[str]:
        """Upload files; returns the Orthanc study IDs they belong to."""
        studies = set()
        with requests.Session() as http:
            for p in paths:
                r = http.post(f"{self.url}/instances", data=p.read_bytes(), timeout=30)
                r.raise_for_status()
                studies.add(r.json()["ParentStudy"])
        return studies

    def send_to_modality(self, modality: str, orthanc_study_id: str) -> None:
        """What a PACS routing rule does: C-STORE the study to a configured modality."""
        r = requests.post(f"{self.url}/modalities/{modality}/store",
                          json={"Resources": [orthanc_study_id], "Synchronous": True}, timeout=300)
        r.raise_for_status()

    def study_id(self, study_uid: str) -> str | None:
        r = requests.post(f"{self.url}/tools/lookup", data=study_uid, timeout=10)
        r.raise_for_status()
        return next((h["ID"] for h in r.json() if h["Type"] == "Study"), None)

    def series_of_study(self, study_uid: str) -> list[dict]:
        sid = self.study_id(study_uid)
        if sid is None:
            return []
        return requests.get(f"{self.url}/studies/{sid}/series", timeout=10).json()

    def instance_files(self, series: dict) -> list[bytes]:
        """The series' instance files; one deleted since the series was listed (the node replacing its
        superseded results) is left out."""
        files = []
        for i in series["Instances"]:
            r = requests.get(f"{self.url}/instances/{i}/file", timeout=30)
            if r.status_code == 404:
                continue
            r.raise_for_status()
            files.append(r.content)
        return files


class NodeProcess:
    """`lungnode serve` as a real process (so tests can kill and restart it). Its first admin account
    (`admin`) gets a random password, `admin_password`; `http` is a session logged in as that admin."""

    def __init__(self, data_dir: Path, **settings: str | int | float | Path) -> None:
        self.data_dir = data_dir
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.url = f"{'https' if 'tls_cert' in settings else 'http'}://127.0.0.1:{self.http_port}"
        self.verify: bool | str = str(settings["tls_ca"]) if "tls_ca" in settings else True  # HTTPS: trust its CA
        self.admin_password = str(settings.pop("admin_password", secrets.token_urlsafe(16)))
        self.env = {**os.environ, "LUNGNODE_DATA_DIR": str(data_dir), "LUNGNODE_DICOM_PORT": str(self.dicom_port),
                    "LUNGNODE_HTTP_PORT": str(self.http_port), "LUNGNODE_DICOM_HOST": "127.0.0.1",
                    "LUNGNODE_ADMIN_PASSWORD": self.admin_password}
        self.env.update({f"LUNGNODE_{k.upper()}": str(v) for k, v in settings.items()})
        self.proc: subprocess.Popen | None = None
        self._http: requests.Session | None = None

    def start(self, timeout: float = 120) -> "NodeProcess":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log = open(self.data_dir / "node.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "lungnode.cli", "serve"], env=self.env,
                                     stdout=self.log, stderr=subprocess.STDOUT)

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lungnode exited with {self.proc.returncode}; see {self.data_dir / 'node.log'}")
            return _http_ok(f"{self.url}/health", self.verify)

        wait_for(ready, timeout, "lungnode to start")
        return self

    def kill(self) -> None:
        """Hard stop (SIGKILL), as a crash or power cut would."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.log.close()

    def stop(self) -> None:
        _terminate(self.proc, getattr(self, "log", None), 30)

    def login(self, user: str = "admin", password: str | None = None) -> requests.Session:
        """A session logged in through the login form, as a browser would, that sends the session's CSRF
        token and this server's Origin with every request (so its POSTs pass the CSRF checks)."""
        http = requests.Session()
        http.verify = self.verify
        r = http.post(f"{self.url}/login", data={"username": user, "password": password or self.admin_password},
                      headers={"Origin": self.url}, allow_redirects=False, timeout=30)
        if r.status_code != 303:
            raise PermissionError(f"login as {user} failed: HTTP {r.status_code}")
        me = http.get(f"{self.url}/api/me", timeout=10)
        me.raise_for_status()
        http.headers.update({"X-CSRF-Token": me.json()["csrf_token"], "Origin": self.url})
        return http

    @property
    def http(self) -> requests.Session:
        """Logged in as the admin (once, on first use; the session survives restarts of the node)."""
        if self._http is None:
            self._http = self.login()
        return self._http

    def study(self, study_uid: str) -> dict | None:
        r = self.http.get(f"{self.url}/api/studies/{study_uid}", timeout=10)
        return r.json() if r.ok else None

    def log_text(self) -> str:
        return (self.data_dir / "node.log").read_text(errors="replace")
