"""The coverage-guided fuzzers (atheris, libFuzzer) over the upper layer and the instance checks, at a
small budget in every `make test` (LUNGNODE_FUZZ_SECONDS, default 20 s each), seeded with well-formed
associations and a small CT image. A crash fails the test with the input that caused it."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import Verification

from tests.conftest import REPO
from tests.test_hostile_input import associate_rq, command_set, pdu, pdv

pytest.importorskip("atheris", reason="atheris is not installed (pip install atheris)")
SECONDS = int(os.environ.get("LUNGNODE_FUZZ_SECONDS", "20"))


def tiny_ct(path: Path) -> pydicom.Dataset:
    """A real CT slice of the test series, cut to 8 x 8 pixels so that the fuzzer's inputs stay small."""
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = 8
    ds.PixelData = bytes(range(128))
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def run_fuzzer(script: str, seeds: dict[str, bytes], tmp_path: Path, max_len: int) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, data in seeds.items():
        (corpus / name).write_bytes(data)
    done = subprocess.run([sys.executable, str(REPO / "tests" / "fuzz" / script), f"-max_total_time={SECONDS}",
                           f"-max_len={max_len}", "-timeout=20", "-rss_limit_mb=2048",
                           f"-artifact_prefix={tmp_path}/", str(corpus)],
                          capture_output=True, text=True, timeout=SECONDS + 120, cwd=REPO)
    crashes = sorted(p.name for p in tmp_path.glob("crash-*"))
    assert done.returncode == 0 and not crashes, f"{script} found {crashes}:\n{done.stderr[-4000:]}"
    assert "Done" in done.stderr and "runs in" in done.stderr, done.stderr[-2000:]


def test_upper_layer_survives_the_fuzzer(small_ct_series, tmp_path):
    ds = tiny_ct(small_ct_series[0])
    store = pdu(4, pdv(1, 0x03, command_set(str(ds.SOPInstanceUID)))) + pdu(4, pdv(1, 0x02, encode(ds, False, True)))
    echo = pdu(4, pdv(5, 0x03, command_set("", 0x0030, str(Verification), with_data=False)))
    release = pdu(5, b"\0" * 4)
    seeds = {"echo": associate_rq() + echo + release, "store": associate_rq() + store + release,
             "store-echo": associate_rq() + store + echo + release}
    run_fuzzer("fuzz_upper_layer.py", seeds, tmp_path, max_len=4096)


def test_instance_checks_survive_the_fuzzer(small_ct_series, tmp_path):
    seeds = {}
    for name, syntax in (("explicit", ExplicitVRLittleEndian), ("implicit", "1.2.840.10008.1.2")):
        ds = tiny_ct(small_ct_series[0])
        ds.file_meta.TransferSyntaxUID = syntax
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        seeds[name] = out.getvalue()
    run_fuzzer("fuzz_instance_check.py", seeds, tmp_path, max_len=4096)
