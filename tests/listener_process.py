"""The node's DICOM listener alone, in a process of its own, for tests that kill it (SIGKILL) mid-receive.

Usage: python tests/listener_process.py DATA_DIR PORT   (prints "listening" once it accepts associations)
"""
from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

from lungnode.config import Settings
from lungnode.dicom_node.db import JobDB
from lungnode.dicom_node.scp import StorageSCP
from lungnode.dicom_node.storage import InstanceStore


def main(data_dir: str, port: str) -> None:
    settings = Settings(data_dir=Path(data_dir), dicom_host="127.0.0.1", dicom_port=int(port), _env_file=None)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = JobDB(settings.db_path)
    scp = StorageSCP(settings, InstanceStore(settings.incoming_dir, settings.quarantine_dir), db)
    scp.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("listening", flush=True)
    stop.wait()
    scp.stop()
    db.close()


if __name__ == "__main__":
    main(*sys.argv[1:3])
