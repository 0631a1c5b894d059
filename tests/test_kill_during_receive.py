"""Received data is durable before it is acknowledged: the listener is killed (SIGKILL, as a crash or a
power cut of the process would) at a random moment in the middle of a study, again and again; after the
last restart every image that was ever answered Success is there, whole and indexed."""
from __future__ import annotations

import random
import subprocess
import sys
import threading

import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from lungnode.dicom_node.db import JobDB
from lungnode.peers import PEER_ENV, free_port
from tests.conftest import REPO

ROUNDS = 8


def start_listener(data_dir, port) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "listener_process.py"), str(data_dir), str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=PEER_ENV, cwd=REPO)
    assert proc.stdout.readline().strip() == "listening"
    return proc


def send_until_killed(files, port, acknowledged: dict, after: int, reached: threading.Event) -> None:
    """C-STORE the files in order over one association, noting each Success; `reached` is set after
    `after` of them, for the test to kill the listener then."""
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage, pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="LUNGNODE")
    try:
        for n, path in enumerate(files, 1):
            ds = pydicom.dcmread(path)
            status = assoc.send_c_store(ds)
            if status.get("Status") != 0x0000:
                return
            acknowledged[str(ds.SOPInstanceUID)] = ds.PixelData
            if n == after:
                reached.set()
    except RuntimeError:  # the association is gone: the listener was killed
        return
    finally:
        reached.set()
        if assoc.is_established:
            assoc.abort()


def test_sigkill_at_random_moments_during_receive_loses_nothing_that_was_acknowledged(small_ct_series, tmp_path):
    rng = random.Random(29)
    data_dir, port = tmp_path / "var", free_port()
    acknowledged: dict[str, bytes] = {}
    for _ in range(ROUNDS):
        proc = start_listener(data_dir, port)
        files = rng.sample(small_ct_series, len(small_ct_series))
        reached = threading.Event()
        sender = threading.Thread(target=send_until_killed,
                                  args=(files, port, acknowledged, rng.randint(1, len(files) - 1), reached))
        sender.start()
        reached.wait(120)
        proc.kill()
        proc.wait(10)
        sender.join(60)
    proc = start_listener(data_dir, port)  # files whatever the last crash left in the journal
    proc.terminate()
    proc.wait(30)
    db = JobDB(data_dir / "lungnode.sqlite3")
    indexed = {str(pydicom.dcmread(p).SOPInstanceUID): p for study in {s.study_uid for s in db.studies()}
               for p in db.instance_paths(study)}
    db.close()
    assert len(acknowledged) > ROUNDS and set(acknowledged) <= set(indexed)
    assert all(pydicom.dcmread(indexed[uid]).PixelData == pixels for uid, pixels in acknowledged.items())
