"""The DICOM listener with real DCMTK tools and pynetdicom as senders."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEG2000Lossless, RLELossless
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from lungnode.config import Settings
from lungnode.dicom_node.db import QUEUED, RECEIVING, JobDB
from lungnode.dicom_node.scp import StorageSCP
from lungnode.dicom_node.storage import InstanceStore
from lungnode.inference.series_selection import select_series
from lungnode.inference.volume import load_volume
from lungnode.peers import PEER_ENV, free_port, wait_for
from tests.conftest import need_tool


def storescu(scp: StorageSCP, files: list[Path], aet: str = "STORESCU", *options: str) -> subprocess.CompletedProcess:
    """Send with DCMTK, then wait until the node has filed what it acknowledged."""
    done = subprocess.run([need_tool("storescu"), *options, "-aet", aet, "-aec", scp.settings.ae_title, "127.0.0.1",
                           str(scp.settings.dicom_port), *map(str, files)], capture_output=True, text=True,
                          env=PEER_ENV, timeout=120)
    scp.journal.flush()
    return done


def stored_files(scp: StorageSCP) -> list[Path]:
    scp.journal.flush()
    return sorted(scp.settings.incoming_dir.glob("*/*/*.dcm"))


def test_echo_from_allowed_caller_and_unknown_caller_rejected(scp):
    echoscu = need_tool("echoscu")
    port = str(scp.settings.dicom_port)
    ok = subprocess.run([echoscu, "-aet", "PACS", "-aec", "LUNGNODE", "127.0.0.1", port], capture_output=True,
                        text=True, env=PEER_ENV)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([echoscu, "-aet", "INTRUDER", "-aec", "LUNGNODE", "127.0.0.1", port],
                         capture_output=True, text=True, env=PEER_ENV)
    assert bad.returncode != 0
    assert "Rejected" in bad.stderr or "rejected" in bad.stderr.lower()
    assert stored_files(scp) == []


def test_storescu_series_is_stored_durably_and_indexed(scp, small_ct_series):
    done = storescu(scp, small_ct_series)
    assert done.returncode == 0, done.stderr
    files = stored_files(scp)
    assert len(files) == len(small_ct_series)
    # Byte for byte what was sent (the data set part), and every file parses.
    sent = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p).PixelData for p in small_ct_series}
    for f in files:
        ds = pydicom.dcmread(f)
        assert ds.PixelData == sent[ds.SOPInstanceUID]
    studies = scp.db.studies()
    assert len(studies) == 1 and studies[0].state == RECEIVING
    assert studies[0].patient_id == "RX-TEST" and studies[0].accession == "ACC1"
    assert not list(scp.settings.incoming_dir.rglob("*.tmp"))


def test_resend_is_idempotent_and_late_instance_reopens(scp, small_ct_series):
    assert storescu(scp, small_ct_series).returncode == 0
    assert scp.db.queue_stable_studies(0.0, now=time.time() + 1)  # study complete
    assert storescu(scp, small_ct_series[:3]).returncode == 0  # the same instances again
    assert len(stored_files(scp)) == len(small_ct_series)
    study_uid = scp.db.studies()[0].study_uid
    assert scp.db.study(study_uid).state == QUEUED  # identical resend: nothing changes
    changed = pydicom.dcmread(small_ct_series[0])
    changed.ImageComments = "corrected after the scan"
    changed.save_as(small_ct_series[0].parent / "changed.dcm")
    assert storescu(scp, [small_ct_series[0].parent / "changed.dcm"]).returncode == 0
    assert scp.db.study(study_uid).state == RECEIVING  # a changed instance reopens the study
    assert len(stored_files(scp)) == len(small_ct_series)


def test_corrupt_file_gets_failure_status_is_quarantined_and_node_keeps_serving(scp, small_ct_series, tmp_path):
    good = pydicom.dcmread(small_ct_series[0])
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage, good.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", scp.settings.dicom_port, ae_title="LUNGNODE")
    assert assoc.is_established
    broken = pydicom.Dataset()
    broken.SOPClassUID = CTImageStorage
    broken.SOPInstanceUID = "1.2.3.4.5.6.7"
    broken.PatientID = "NO-UIDS"  # no study/series UIDs, no pixels
    broken.file_meta = pydicom.dataset.FileMetaDataset()
    broken.file_meta.TransferSyntaxUID = good.file_meta.TransferSyntaxUID
    status = assoc.send_c_store(broken)
    assert status.Status != 0x0000
    assert "cannot parse" in status.ErrorComment  # the reason shows in the PACS's log
    ok = assoc.send_c_store(good)  # the same association still works
    assert ok.Status == 0x0000
    assoc.release()
    kept = list(scp.settings.quarantine_dir.glob("*.dcm"))
    assert len(kept) == 1 and "cannot parse" in kept[0].with_suffix(".txt").read_text()
    assert storescu(scp, small_ct_series[1:3]).returncode == 0


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, DeflatedExplicitVRLittleEndian])
def test_compressed_transfer_syntaxes_are_received_and_decoded(scp, small_ct_series, syntax):
    sources = sorted(small_ct_series)[:4]
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage, syntax)
    assoc = ae.associate("127.0.0.1", scp.settings.dicom_port, ae_title="LUNGNODE")
    assert assoc.is_established
    originals = {}
    for p in sources:
        ds = pydicom.dcmread(p)
        originals[ds.SOPInstanceUID] = ds.pixel_array.copy()
        if syntax == DeflatedExplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = syntax
        else:
            ds.compress(syntax, generate_instance_uid=False)
        assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    for f in stored_files(scp):
        ds = pydicom.dcmread(f)
        assert ds.file_meta.TransferSyntaxUID == syntax
        assert np.array_equal(ds.pixel_array, originals[ds.SOPInstanceUID])


@pytest.mark.parametrize("tool,args,propose,syntax", [
    ("dcmcjpeg", ["+e1"], "-xs", "1.2.840.10008.1.2.4.70"),  # JPEG lossless SV1
    ("dcmcjpls", ["+el"], "-xt", "1.2.840.10008.1.2.4.80"),  # JPEG-LS lossless
    ("dcmcrle", [], "-xr", "1.2.840.10008.1.2.5"),  # RLE lossless
    ("dcmcjpeg", ["+ee", "+q", "95", "+un"], "-xx", "1.2.840.10008.1.2.4.51"),  # JPEG extended 12-bit (lossy)
])
def test_dcmtk_compressed_series_is_received_and_decoded(scp, small_ct_series, tmp_path, tool, args,
                                                                      propose, syntax):
    """The PACS sends images as it stores them: compressed by DCMTK, decoded here with pylibjpeg."""
    exe = need_tool(tool)
    originals, compressed = {}, []
    for p in sorted(small_ct_series)[:3]:
        ds = pydicom.dcmread(p)
        originals[ds.SOPInstanceUID] = apply_modality_lut(ds.pixel_array, ds)
        out = tmp_path / p.name
        subprocess.run([exe, *args, str(p), str(out)], check=True, capture_output=True)
        compressed.append(out)
    # Propose the files' own compressed transfer syntax, as a PACS storing them so would.
    assert storescu(scp, compressed, "STORESCU", "-R", propose).returncode == 0
    files = stored_files(scp)
    assert len(files) == 3
    for f in files:
        ds = pydicom.dcmread(f)
        assert ds.file_meta.TransferSyntaxUID == syntax
        error = np.abs(apply_modality_lut(ds.pixel_array, ds) - originals[ds.SOPInstanceUID])  # in HU
        assert error.max() == 0 if ds.get("LossyImageCompression") != "01" else error.mean() < 5


def test_disk_full_answers_out_of_resources_and_keeps_nothing_half_written(scp, small_ct_series, monkeypatch):
    import errno
    import os

    def no_space(fd, buffers):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "writev", no_space)
    ds = pydicom.dcmread(small_ct_series[0])
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", scp.settings.dicom_port, ae_title="LUNGNODE")
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0xA700  # the PACS keeps the image and retries later
    assert stored_files(scp) == [] and not list(scp.settings.incoming_dir.rglob("*.tmp"))
    assert scp.db.studies() == []


@pytest.fixture()
def small_disk(tmp_path):
    """A 12 MB filesystem of its own (tmpfs), to be filled for real; skips where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 2**16)
                f.flush()
        except OSError:
            pass
    return filler


def test_node_starts_on_a_full_disk_with_unfiled_images_answers_out_of_resources_then_files_them(
        small_disk, small_ct_series):
    """A crash left three acknowledged images in the journal, and the disk is full at the next start: the
    listener starts, answers echo and "out of resources"; once there is room the three are filed."""
    from lungnode.dicom_node.journal import IngestJournal

    settings = Settings(data_dir=small_disk / "var", dicom_host="127.0.0.1", dicom_port=free_port(),
                        allowed_callers=["PACS"], _env_file=None)
    crashed = IngestJournal(settings.data_dir / "journal", lambda d, c, f: None)
    for path in small_ct_series[:3]:
        crashed.append(path.read_bytes(), "PACS")
    db = JobDB(settings.db_path)
    filler = fill(small_disk)
    server = StorageSCP(settings, InstanceStore(settings.incoming_dir, settings.quarantine_dir), db)
    server.start()
    try:
        ae = AE(ae_title="PACS")
        ae.add_requested_context(CTImageStorage, pydicom.dcmread(small_ct_series[3]).file_meta.TransferSyntaxUID)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", settings.dicom_port, ae_title="LUNGNODE")
        assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
        assert assoc.send_c_store(pydicom.dcmread(small_ct_series[3])).Status == 0xA700
        assoc.release()
        filler.unlink()
        study = str(pydicom.dcmread(small_ct_series[0]).StudyInstanceUID)
        assert server.journal.wait_filed(study, timeout=120)
        assert len(db.instance_paths(study)) == 3 and all(p.exists() for p in db.instance_paths(study))
        assert storescu(server, small_ct_series[3:4], "PACS").returncode == 0
        assert len(db.instance_paths(study)) == 4
    finally:
        server.stop()
        db.close()


def test_real_lidc_series_is_received_and_builds_its_volume(scp):
    from tests.conftest import lidc_series

    files = lidc_series("LIDC-IDRI-0001")
    assert storescu(scp, files).returncode == 0
    selection = select_series(stored_files(scp))
    assert selection.chosen is not None, selection.why_not
    volume = load_volume(selection.chosen.paths)
    assert volume.hu.shape == (133, 512, 512)
    # The LUNA16 nodule centre lands in soft tissue on the slice the dataset README names.
    i, j, k = np.round(volume.world_to_index([56.20840547, 86.34341278, -115.8675792])).astype(int)
    assert (i, j) == (316, 367)
    assert volume.slices[k].path.name == f"{volume.slices[k].sop_instance_uid}.dcm"
    assert volume.hu[k, j, i] > -300


def test_multiframe_enhanced_ct_is_received_selected_and_loaded(scp, small_ct_series):
    """A PACS that stores multi-frame CT sends one instance per series; the volume is the same."""
    import highdicom as hd
    from pydicom.uid import generate_uid
    from pynetdicom.sop_class import LegacyConvertedEnhancedCTImageStorage

    slices = [pydicom.dcmread(p) for p in small_ct_series]
    multi = hd.legacy.LegacyConvertedEnhancedCTImage(slices, generate_uid(), 2, generate_uid(), 1)
    ae = AE(ae_title="PACS")
    ae.add_requested_context(LegacyConvertedEnhancedCTImageStorage, multi.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", scp.settings.dicom_port, ae_title="LUNGNODE")
    assert assoc.send_c_store(multi).Status == 0x0000
    assoc.release()
    (stored,) = stored_files(scp)
    selection = select_series([stored])
    assert selection.chosen is not None, selection.why_not
    volume = load_volume(selection.chosen.paths)
    reference = load_volume(small_ct_series)
    assert volume.hu.shape == reference.hu.shape
    assert np.allclose(volume.index_to_world([3, 5, 7]), reference.index_to_world([3, 5, 7]), atol=1e-3)
    assert np.array_equal(volume.hu, reference.hu)
    assert volume.slices[7].frame_number is not None


def _associate(scp: StorageSCP, aet: str = "PACS", evt_handlers=()):
    ae = AE(ae_title=aet)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", scp.settings.dicom_port, ae_title="LUNGNODE",
                         evt_handlers=list(evt_handlers))
    assert assoc.is_established
    return assoc


def test_association_dropped_mid_instance_keeps_nothing_and_node_keeps_serving(scp, small_ct_series):
    import struct

    assoc = _associate(scp)
    raw = assoc.dul.socket.socket
    # A C-STORE command, then the start of a data set PDU whose sender dies 1 kB into 100 kB.
    ds = pydicom.dcmread(small_ct_series[0])
    command = _c_store_command(ds)
    raw.sendall(struct.pack(">BxIIBB", 4, len(command) + 6, len(command) + 2, 1, 0x03) + command)
    raw.sendall(struct.pack(">BxIIBB", 4, 100_006, 100_002, 1, 0x02) + b"\0" * 1000)
    raw.shutdown(2)
    assoc.abort()
    assert storescu(scp, small_ct_series[1:3]).returncode == 0
    stored = {pydicom.dcmread(f).SOPInstanceUID for f in stored_files(scp)}
    assert len(stored) == 2 and ds.SOPInstanceUID not in stored  # only what was acknowledged
    assert not list(scp.settings.quarantine_dir.glob("*.dcm"))


def _c_store_command(ds) -> bytes:
    from lungnode.dicom_node.receiver import encode_command

    def ui(v):
        b = str(v).encode()
        return b + b"\0" if len(b) % 2 else b

    import struct
    return encode_command([(0x0002, ui(ds.SOPClassUID)), (0x0100, struct.pack("<H", 1)),
                           (0x0110, struct.pack("<H", 1)), (0x0700, struct.pack("<H", 0)),
                           (0x0800, struct.pack("<H", 0)), (0x1000, ui(ds.SOPInstanceUID))])


def test_command_sets_are_read_as_pynetdicom_writes_them(small_ct_series):
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode

    from lungnode.dicom_node.receiver import decode_command

    ds = pydicom.dcmread(small_ct_series[0])
    primitive = C_STORE()
    primitive.MessageID, primitive.Priority = 7, 2
    primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    message.command_set.CommandDataSetType = 0x0001
    cmd = decode_command(encode(message.command_set, True, True))
    assert (cmd.field, cmd.message_id, cmd.sop_class, cmd.sop_instance, cmd.has_data_set) == (
        0x0001, 7, ds.SOPClassUID, ds.SOPInstanceUID, True)


def test_malformed_command_set_is_aborted_and_node_keeps_serving(scp, small_ct_series):
    import struct

    from pynetdicom import evt
    from pynetdicom.pdu import A_ABORT_RQ

    received = []  # the PDUs the node sends back, as the requestor's own reader sees them
    assoc = _associate(scp, evt_handlers=[(evt.EVT_PDU_RECV, lambda event: received.append(event.pdu))])
    command = _c_store_command(pydicom.dcmread(small_ct_series[0]))[:-5]  # cut inside its last element
    assoc.dul.socket.socket.sendall(
        struct.pack(">BxIIBB", 4, len(command) + 6, len(command) + 2, 1, 0x03) + command)
    wait_for(lambda: any(isinstance(pdu, A_ABORT_RQ) for pdu in received), 10, "the node's A-ABORT", 0.05)
    assert storescu(scp, small_ct_series[:2]).returncode == 0
    assert len(stored_files(scp)) == 2


def test_silent_association_is_aborted_and_busy_node_refuses_more(small_ct_series):
    import socket

    from pynetdicom.presentation import build_context

    from lungnode.dicom_node.receiver import Acceptor, AcceptorPolicy, StoreStatus

    policy = AcceptorPolicy(contexts=[build_context(CTImageStorage)], max_associations=1,
                            network_timeout=1.0)
    server = Acceptor(("127.0.0.1", free_port()), policy, lambda request: StoreStatus(0x0000))
    server.start()
    try:
        port = server.server_address[1]
        ae = AE(ae_title="PACS")
        ae.add_requested_context(CTImageStorage)
        first = ae.associate("127.0.0.1", port, ae_title="LUNGNODE")
        assert first.is_established
        second = ae.associate("127.0.0.1", port, ae_title="LUNGNODE")
        assert second.is_rejected  # one association at most: "local limit exceeded", try later
        first.release()
        silent = socket.create_connection(("127.0.0.1", port))  # connects, never speaks
        silent.settimeout(10)
        started = time.monotonic()
        assert silent.recv(16) == b""  # closed after the network timeout (no association: PS3.8's ARTIM)
        assert 0.9 < time.monotonic() - started < 5
        third = ae.associate("127.0.0.1", port, ae_title="LUNGNODE")
        assert third.is_established  # the slots were given back
        third.release()
    finally:
        server.stop()


def test_instance_is_indexed_when_acknowledged_and_filed_soon_after(scp, small_ct_series):
    ds = pydicom.dcmread(small_ct_series[0])
    assoc = _associate(scp)
    assert assoc.send_c_store(ds).Status == 0x0000
    (path,) = scp.db.instance_paths(str(ds.StudyInstanceUID))  # in the index as soon as Success is back
    assoc.release()
    assert scp.journal.wait_filed(str(ds.StudyInstanceUID), timeout=10)
    assert pydicom.dcmread(path).SOPInstanceUID == ds.SOPInstanceUID


def test_garbage_on_the_port_is_aborted_and_node_keeps_serving(scp):
    import os
    import socket
    import struct

    for junk in (struct.pack(">BxI", 1, 40) + os.urandom(40),  # an A-ASSOCIATE-RQ that is not one
                 b"GET / HTTP/1.1\r\nHost: lungnode\r\n\r\n"):  # someone's browser
        with socket.create_connection(("127.0.0.1", scp.settings.dicom_port), timeout=10) as s:
            s.sendall(junk)
            reply = s.recv(16)
            assert reply == b"" or reply[:1] == bytes([7])  # closed, or A-ABORT
    echo = subprocess.run([need_tool("echoscu"), "-aet", "PACS", "-aec", "LUNGNODE", "127.0.0.1",
                           str(scp.settings.dicom_port)], capture_output=True, text=True, env=PEER_ENV)
    assert echo.returncode == 0, echo.stderr


def test_responses_are_split_to_the_peers_maximum_pdu_length():
    import socket
    import struct

    from lungnode.dicom_node.receiver import AcceptorPolicy, _Association, response_command

    ours, theirs = socket.socketpair()
    assoc = _Association(ours, AcceptorPolicy([]), lambda r: None, None)
    assoc.peer_max_pdu = 64
    command = response_command(0x8001, 9, str(CTImageStorage), 0xA700, "1.2.3.4", "disk full: no space left")
    assoc._send_command(5, command)
    ours.close()
    received, flags = b"", []
    stream = theirs.makefile("rb")
    while head := stream.read(6):
        pdu_type, length = struct.unpack(">BxI", head)
        body = stream.read(length)
        item_len, context_id, control = struct.unpack(">IBB", body[:6])
        assert pdu_type == 4 and context_id == 5 and length <= 64 and item_len == length - 4
        received += body[6:]
        flags.append(control)
    assert received == command and flags[-1] == 0x03 and set(flags[:-1]) == {0x01} and len(flags) > 2


def test_refused_instance_journalled_before_a_crash_is_kept_aside_not_filed(tmp_path, small_ct_series):
    """A crash between flushing a refused instance's record and voiding it: the restart checks it again."""
    from lungnode.dicom_node.journal import IngestJournal

    settings = Settings(data_dir=tmp_path / "var", dicom_host="127.0.0.1", dicom_port=free_port(), _env_file=None)
    crashed = IngestJournal(settings.data_dir / "journal", lambda d, c, f: None)
    crashed.append(b"DICM? not a DICOM file at all", "PACS")  # as if the void mark never reached the disk
    crashed.append(small_ct_series[0].read_bytes(), "PACS")
    db = JobDB(settings.db_path)
    server = StorageSCP(settings, InstanceStore(settings.incoming_dir, settings.quarantine_dir), db)
    server.start()
    try:
        assert len(stored_files(server)) == 1
        (kept,) = settings.quarantine_dir.glob("*.dcm")
        assert kept.read_bytes() == b"DICM? not a DICOM file at all"
        assert "cannot parse" in kept.with_suffix(".txt").read_text()
    finally:
        server.stop()
        db.close()
