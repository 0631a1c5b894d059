"""Coverage-guided fuzzing (atheris) of the checks a received instance passes before Success: for any
bytes, `check_instance` returns an index record or raises Refused with a reason, and a record it
returns names a file inside the store.

Run: python tests/fuzz/fuzz_instance_check.py [libFuzzer options] [corpus folders]"""
from __future__ import annotations

import logging
import sys
import tempfile
import warnings
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from lungnode.dicom_node.instance_check import Refused, check_instance
    from lungnode.dicom_node.storage import InstanceStore

ROOT = Path(tempfile.mkdtemp(prefix="lungnode-fuzz-"))
STORE = InstanceStore(ROOT / "incoming", ROOT / "quarantine")


def test_one_input(data: bytes) -> None:
    try:
        record = check_instance(data, STORE, "FUZZ")
    except Refused as refused:
        if not refused.reason:
            raise AssertionError("a refusal without a reason") from refused
        return
    if STORE.root.resolve() not in record.path.resolve().parents:
        raise AssertionError(f"{record.path} is outside the store")


if __name__ == "__main__":
    logging.disable(logging.CRITICAL)
    warnings.simplefilter("ignore")
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
