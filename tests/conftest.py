"""Shared fixtures: where the real test data is, and a small CT series written as real DICOM files."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from lungnode.dicom_node.db import DONE, NOT_PROCESSED
from lungnode.peers import PEER_ENV, NodeProcess, wait_for

REPO = Path(__file__).resolve().parent.parent


def shared_data() -> Path | None:
    """The real LIDC-IDRI data: $LUNGNODE_TEST_DATA, else ../shared/data beside the repository."""
    root = Path(os.environ.get("LUNGNODE_TEST_DATA", REPO.parent / "shared" / "data"))
    return root if (root / "LIDC-IDRI-0001").is_dir() else None


def lidc_series(case: str) -> list[Path]:
    root = shared_data()
    if root is None:
        pytest.skip("real LIDC-IDRI data not found: set LUNGNODE_TEST_DATA or put it in ../shared/data")
    return sorted((root / case).glob("*/*.dcm"))


def need_tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
    if path is None:
        pytest.skip(f"{name} is not installed (apt-get install orthanc dcmtk dicom3tools)")
    return path


def send_to_node(node: NodeProcess, files: list[Path]) -> str:
    """C-STORE the files to the node with DCMTK's storescu; returns their Study Instance UID."""
    out = subprocess.run([need_tool("storescu"), "-aet", "MODALITY", "-aec", "LUNGNODE", "127.0.0.1",
                          str(node.dicom_port), *map(str, files)], env=PEER_ENV, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def wait_processed(node: NodeProcess, study_uid: str, version: int = 1, timeout: float = 300) -> dict:
    """The study once its results `version` are made (done, or not processed and why)."""
    wait_for(lambda: (s := node.study(study_uid)) and s["version"] >= version and s["state"] in (DONE, NOT_PROCESSED),
             timeout, f"study {study_uid} v{version} to be processed", interval=0.5)
    return node.study(study_uid)


@pytest.fixture(scope="session")
def small_ct_series(tmp_path_factory) -> list[Path]:
    """A small synthetic chest CT (coarse, 48 slices) as shuffled DICOM files."""
    from lungnode.training.synth import make_phantom, write_dicom_series

    phantom = make_phantom(7, spacing=(1.4, 1.4, 2.5), field_of_view_mm=(358.0, 358.0, 120.0), n_nodules=(1, 1))
    out = tmp_path_factory.mktemp("small_ct")
    return write_dicom_series(phantom, out, patient_id="RX-TEST", accession_number="ACC1")


@pytest.fixture()
def scp(tmp_path):
    """The node's DICOM listener alone (no processing), on a free loopback port, for PACS and STORESCU."""
    from lungnode.config import Settings
    from lungnode.dicom_node.db import JobDB
    from lungnode.dicom_node.scp import StorageSCP
    from lungnode.dicom_node.storage import InstanceStore
    from lungnode.peers import free_port

    settings = Settings(data_dir=tmp_path / "var", dicom_host="127.0.0.1", dicom_port=free_port(),
                        allowed_callers=["PACS", "STORESCU"], _env_file=None)
    settings.data_dir.mkdir()
    db = JobDB(settings.db_path)
    server = StorageSCP(settings, InstanceStore(settings.incoming_dir, settings.quarantine_dir), db)
    server.start()
    yield server
    server.stop()
    db.close()
