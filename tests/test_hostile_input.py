"""What a hostile or broken sender can do to the DICOM listener: identifiers that are really paths,
PDUs that break PS3.8's length rules, trickles and floods, impossible images. Each must be refused with
a reason, acknowledge nothing half-received, touch nothing outside the data folder, and leave the node
serving the next sender.

The PDUs are written byte by byte here (the project's own corpus), so that each breaks exactly one rule."""
from __future__ import annotations

import socket
import struct
import subprocess
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dsutils import decode, encode
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import CTImageStorage, Verification

from lungnode.dicom_node.instance_check import Refused, check_instance
from lungnode.dicom_node.image_check import ImageProblem, check_image
from lungnode.dicom_node.pdu_rules import ProtocolViolation, check_associate_rq, pdv_items
from lungnode.dicom_node.receiver import Acceptor, AcceptorPolicy, StoreStatus
from lungnode.dicom_node.scp import StorageSCP
from lungnode.dicom_node.storage import InstanceStore
from lungnode.dicom_node.uids import InvalidUID, checked_uid
from lungnode.peers import PEER_ENV, free_port, wait_for
from lungnode.pipeline import results_dir_for
from tests.conftest import need_tool

CT = str(CTImageStorage)
# pydicom warns of each invalid UID this module writes on purpose
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore:The value length")
HOSTILE_UIDS = ["..", "/tmp/lungnode-hostile", "../../x", "1." * 32 + "1", "1..2", ".1.2", "1.2.", "", "1.2.a"]


# --- a raw DICOM requestor ---------------------------------------------------------------------------
def item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BxH", item_type, len(payload)) + payload


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BxI", pdu_type, len(body)) + body


def pdv(context_id: int, control: int, data: bytes) -> bytes:
    return struct.pack(">IBB", len(data) + 2, context_id, control) + data


def associate_rq(called: str = "LUNGNODE", calling: str = "PACS", version: int = 1,
                 contexts=((1, CT, (str(ExplicitVRLittleEndian),)), (3, CT, (str(ImplicitVRLittleEndian),)),
                           (5, str(Verification), (str(ImplicitVRLittleEndian),))),
                 extra: bytes = b"", user_info: bytes | None = None) -> bytes:
    body = struct.pack(">H2x16s16s32x", version, called.ljust(16).encode(), calling.ljust(16).encode())
    body += item(0x10, b"1.2.840.10008.3.1.1.1") + extra
    for cid, abstract, syntaxes in contexts:
        body += item(0x20, bytes([cid, 0, 0, 0]) + item(0x30, abstract.encode())
                     + b"".join(item(0x40, ts.encode()) for ts in syntaxes))
    body += item(0x50, user_info if user_info is not None else
                 item(0x51, struct.pack(">I", 16384)) + item(0x52, b"1.2.826.0.1.3680043.9.7777"))
    return pdu(1, body)


def command_set(sop_instance: str, field: int = 0x0001, sop_class: str = CT, with_data: bool = True) -> bytes:
    cmd = pydicom.Dataset()
    cmd.AffectedSOPClassUID = sop_class
    cmd.CommandField = field
    cmd.MessageID = 1
    if field == 0x0001:
        cmd.Priority = 0
        cmd.AffectedSOPInstanceUID = sop_instance
    cmd.CommandDataSetType = 0x0000 if with_data else 0x0101
    body = encode(cmd, True, True)
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def data_set(path: Path) -> bytes:
    """The instance's data set as it goes on the wire on context 1 (Explicit VR Little Endian)."""
    ds = pydicom.dcmread(path)
    return encode(ds, False, True)


class Peer:
    """A TCP connection to the listener that speaks raw PDUs."""

    def __init__(self, port: int, source: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self) -> tuple[int, bytes] | None:
        """The next PDU (type, body), or None when the node closed the connection."""
        head = self._exactly(6)
        if head is None:
            return None
        pdu_type, length = struct.unpack(">BxI", head)
        return pdu_type, self._exactly(length) or b""

    def _exactly(self, n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            try:
                chunk = self.sock.recv(n - len(data))
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            data += chunk
        return data

    def associate(self) -> None:
        self.send(associate_rq())
        reply = self.read()
        assert reply is not None and reply[0] == 2, f"association not accepted: {reply}"

    def ends_with_abort(self) -> bool:
        """The node answers with an A-ABORT (or closes) and acknowledges no C-STORE before it does."""
        while (reply := self.read()) is not None:
            if reply[0] == 7:
                return True
            assert reply[0] != 4 or command_field(reply) != 0x8001, f"the node acknowledged a broken store: {reply}"
        return True

    def close(self) -> None:
        self.sock.close()


def command_field(reply: tuple[int, bytes]) -> int:
    return int(decode(pydicom.filebase.DicomBytesIO(reply[1][6:]), True, True).CommandField)


def c_store_status(reply: tuple[int, bytes] | None) -> tuple[int, str]:
    """The Status (0000,0900) and Error Comment of a C-STORE-RSP carried in one P-DATA-TF."""
    assert reply is not None and reply[0] == 4, f"expected a C-STORE-RSP, got {reply}"
    rsp = decode(pydicom.filebase.DicomBytesIO(reply[1][6:]), True, True)
    return int(rsp.Status), str(rsp.get("ErrorComment", ""))


def echo_works(port: int) -> bool:
    done = subprocess.run([need_tool("echoscu"), "-aet", "PACS", "-aec", "LUNGNODE", "127.0.0.1", str(port)],
                          capture_output=True, text=True, env=PEER_ENV, timeout=60)
    return done.returncode == 0


def stored(scp: StorageSCP) -> list[Path]:
    scp.journal.flush()
    return sorted(scp.settings.incoming_dir.rglob("*.dcm"))


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# --- hostile identifiers ----------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
def test_a_uid_that_is_really_a_path_is_refused_and_writes_nothing_outside_the_data_folder(scp, small_ct_series,
                                                                                          field, tmp_path):
    absolute = Path("/tmp/lungnode-hostile")
    assert not absolute.exists()
    outside = lambda: tree(tmp_path) - {str(p.relative_to(tmp_path)) for p in scp.settings.data_dir.rglob("*")}
    before = outside()
    peer = Peer(scp.settings.dicom_port)
    peer.associate()
    for value in HOSTILE_UIDS:
        ds = pydicom.dcmread(small_ct_series[0])
        setattr(ds, field, value)
        sop = value if field == "SOPInstanceUID" else str(ds.SOPInstanceUID)
        for p in _store_pdus(sop, encode(ds, False, True)):
            peer.send(p)
        status, comment = c_store_status(peer.read())
        assert status == 0xC000 and ("not a UID" in comment or f"no {field}" in comment), (value, comment)
    ds = pydicom.dcmread(small_ct_series[1])
    for p in _store_pdus(str(ds.SOPInstanceUID), encode(ds, False, True)):
        peer.send(p)
    assert c_store_status(peer.read())[0] == 0x0000  # the node serves on
    peer.close()
    assert len(stored(scp)) == 1 and outside() == before and not absolute.exists()
    kept = sorted(scp.settings.quarantine_dir.glob("*.txt"))
    assert len(kept) == len(HOSTILE_UIDS) and all(field in k.read_text() for k in kept)


@pytest.mark.parametrize("value", HOSTILE_UIDS)
def test_results_and_instance_paths_refuse_what_is_not_a_uid(tmp_path, value):
    with pytest.raises(InvalidUID):
        results_dir_for(tmp_path / "results", value, 1)
    with pytest.raises(InvalidUID):
        InstanceStore(tmp_path / "in", tmp_path / "q").path_for("1.2.3", value, "1.2.3.4")
    assert checked_uid("StudyInstanceUID", "1.2.840.113619.2.55.3.0123\0") == "1.2.840.113619.2.55.3.0123"


def test_called_ae_title_must_be_the_nodes(scp):
    echoscu = need_tool("echoscu")
    port = str(scp.settings.dicom_port)
    wrong = subprocess.run([echoscu, "-aet", "PACS", "-aec", "WRONGAE", "127.0.0.1", port], capture_output=True,
                           text=True, env=PEER_ENV)
    assert wrong.returncode != 0 and "Called AE Title Not Recognized" in wrong.stderr + wrong.stdout
    assert echo_works(scp.settings.dicom_port)


# --- the PDU corpus --------------------------------------------------------------------------------
def _store_pdus(sop: str, data: bytes) -> tuple[bytes, bytes]:
    return pdu(4, pdv(1, 0x03, command_set(sop))), pdu(4, pdv(1, 0x02, data))


def _corpus(data: bytes, sop: str) -> dict[str, list[bytes]]:
    """Each entry: the PDUs sent after a good association; each breaks one rule of PS3.8 / PS3.7."""
    command, _ = _store_pdus(sop, data)
    half = len(data) // 2
    return {
        # the last fragment claims the whole data set and carries half of it
        "PDV longer than its PDU": [command, struct.pack(">BxI", 4, half + 6)
                                    + struct.pack(">IBB", len(data) + 2, 1, 0x02) + data[:half]],
        # the PDU's length covers half of the PDV that follows it in full
        "PDU shorter than its content": [command, struct.pack(">BxI", 4, 6 + half)
                                         + struct.pack(">IBB", len(data) + 2, 1, 0x02) + data],
        "PDV shorter than its PDU": [command, pdu(4, pdv(1, 0x02, data) + b"\0\0\0")],
        "PDV of length 1": [command, pdu(4, struct.pack(">IB", 1, 1) + b"\0")],
        "data set on another context than its command": [command, pdu(4, pdv(3, 0x02, data))],
        "context never proposed": [pdu(4, pdv(7, 0x03, command_set(sop))), pdu(4, pdv(7, 0x02, data))],
        "even context ID": [pdu(4, pdv(2, 0x03, command_set(sop)))],
        "data set before its command": [pdu(4, pdv(1, 0x02, data))],
        "command inside a data set": [command, pdu(4, pdv(1, 0x00, data[:half])), command],
        "data set after a command that announced none": [
            pdu(4, pdv(5, 0x03, command_set("", 0x0030, str(Verification), with_data=False))),
            pdu(4, pdv(5, 0x02, data[:100]))],
        "A-RELEASE-RQ of 8 bytes": [pdu(5, b"\0" * 8)],
        "A-RELEASE-RQ inside a message": [command, pdu(4, pdv(1, 0x00, data[:half])), pdu(5, b"\0" * 4)],
        "A-ASSOCIATE-RQ on an association": [associate_rq()],
        "PDU type 9": [pdu(9, b"\0" * 4)],
        "empty P-DATA-TF": [pdu(4, b"")],
        "P-DATA-TF over the maximum": [struct.pack(">BxI", 4, 64 * 2**20)],
        "command set over 64 KiB": [pdu(4, pdv(1, 0x01, b"\0" * 70_000))],
        "command set cut inside an element": [pdu(4, pdv(1, 0x03, command_set(sop)[:-5]))],
        "C-STORE without a data set": [pdu(4, pdv(1, 0x03, command_set(sop, with_data=False)))],
        "C-FIND": [pdu(4, pdv(1, 0x03, command_set(sop, field=0x0020)))],
        "dropped mid data set": [command, pdu(4, pdv(1, 0x00, data[:half]))],
    }


def test_every_broken_pdu_is_aborted_with_nothing_stored_and_the_node_serves_on(scp, small_ct_series):
    ds = pydicom.dcmread(small_ct_series[0])
    data, sop = data_set(small_ct_series[0]), str(ds.SOPInstanceUID)
    outcomes = {}
    for name, pdus in _corpus(data, sop).items():
        peer = Peer(scp.settings.dicom_port)
        peer.associate()
        for p in pdus:
            try:
                peer.send(p)
            except (BrokenPipeError, ConnectionResetError):
                break  # the node has already aborted
        if name == "dropped mid data set":
            peer.close()
        else:
            outcomes[name] = peer.ends_with_abort()
            peer.close()
    assert all(outcomes.values()) and len(outcomes) == len(_corpus(data, sop)) - 1
    assert stored(scp) == [] and scp.db.instance_paths(str(ds.StudyInstanceUID)) == []
    # the same bytes, well formed, are stored: the corpus broke the rules, not the data
    peer = Peer(scp.settings.dicom_port)
    peer.associate()
    for p in _store_pdus(sop, data):
        peer.send(p)
    assert c_store_status(peer.read())[0] == 0x0000
    peer.send(pdu(5, b"\0" * 4))
    assert peer.read()[0] == 6  # A-RELEASE-RP
    assert len(stored(scp)) == 1 and echo_works(scp.settings.dicom_port)


@pytest.mark.parametrize("name, rq", [
    ("protocol version 0", associate_rq(version=0)),
    ("item running past the end", associate_rq()[:-3]),
    ("two application contexts", associate_rq(extra=item(0x10, b"1.2.840.10008.3.1.1.1"))),
    ("two user information items", associate_rq(extra=item(0x50, item(0x51, struct.pack(">I", 16384))))),
    ("no presentation context", associate_rq(contexts=())),
    ("even presentation context ID", associate_rq(contexts=((2, CT, (str(ExplicitVRLittleEndian),)),))),
    ("no transfer syntax", associate_rq(contexts=((1, CT, ()),))),
    ("abstract syntax of 65 bytes", associate_rq(contexts=((1, "1." * 32 + "1", (str(ExplicitVRLittleEndian),)),))),
    ("maximum length of 2 bytes", associate_rq(user_info=item(0x51, b"\0\1"))),
    ("no user information", associate_rq()[:-(4 + 4 + 8 + 4 + 26)]),
    ("shorter than its fixed fields", pdu(1, b"\0\1" + b" " * 40)),
    ("P-DATA-TF first", pdu(4, pdv(1, 0x03, b"\0" * 10))),
])
def test_a_broken_association_request_is_refused_and_the_node_serves_on(scp, name, rq):
    peer = Peer(scp.settings.dicom_port)
    peer.send(rq)
    reply = peer.read()
    assert reply is None or reply[0] == 7, f"{name}: {reply}"
    peer.close()
    assert echo_works(scp.settings.dicom_port)


def test_pdv_rules_and_association_request_rules_alone():
    assert [(f.context_id, f.is_command, f.is_last, f.end - f.start)
            for f in pdv_items(pdv(1, 0x03, b"ab") + pdv(3, 0x00, b"cdef"))] == [(1, True, True, 2), (3, False, False, 4)]
    for body in (b"", b"\0\0\0\6\1", struct.pack(">IBB", 10, 1, 2) + b"xy", struct.pack(">IBB", 1, 1, 2)):
        with pytest.raises(ProtocolViolation):
            list(pdv_items(body))
    check_associate_rq(associate_rq()[6:])
    with pytest.raises(ProtocolViolation, match="used twice"):
        check_associate_rq(associate_rq(contexts=((1, CT, ("1.2",)), (1, CT, ("1.2",))))[6:])


# --- deadlines and floods ----------------------------------------------------------------------------
@pytest.fixture()
def acceptor():
    """A bare acceptor with short deadlines, a small connection cap and a store that says Success."""
    stored_uids: list[str] = []
    policy = AcceptorPolicy(contexts=[build_context(CTImageStorage), build_context(Verification)],
                            called_ae_titles=frozenset({"LUNGNODE"}), max_associations=4, max_connections=8,
                            max_connections_per_host=6, network_timeout=2.0, request_timeout=2.0,
                            message_timeout=2.0, association_timeout=30.0)

    def on_store(request):
        stored_uids.append(request.sop_instance_uid)
        return StoreStatus(0x0000)

    server = Acceptor(("127.0.0.1", free_port()), policy, on_store)
    server.start()
    server.stored_uids = stored_uids
    yield server
    server.stop()


def test_a_trickled_store_is_aborted_at_the_message_deadline(acceptor, small_ct_series):
    """One byte every 0.2 s never trips a per-read timeout of 2 s; the message deadline ends it."""
    port = acceptor.server_address[1]
    data = data_set(small_ct_series[0])
    command, store = _store_pdus(str(pydicom.dcmread(small_ct_series[0]).SOPInstanceUID), data)
    peer = Peer(port)
    peer.associate()
    peer.send(command)
    aborted = False
    for byte in store[:200]:  # 40 s of trickle at most; the deadline is 2 s (+ 1 s per 256 KiB)
        try:
            peer.send(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            aborted = True
            break
        peer.sock.settimeout(0.2)
        try:
            reply = peer.sock.recv(10)
        except TimeoutError:
            continue
        aborted = reply == b"" or reply[:1] == b"\x07"
        break
    assert aborted, "the trickle was still being read after 200 bytes"
    assert acceptor.stored_uids == []
    assert echo_works_on(port)


def echo_works_on(port: int, source: str = "127.0.0.1") -> bool:
    ae = AE(ae_title="PACS")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="LUNGNODE", bind_address=(source, 0))
    ok = assoc.is_established and assoc.send_c_echo().Status == 0x0000
    if assoc.is_established:
        assoc.release()
    return ok


def test_a_flood_of_half_open_connections_is_capped_and_released(acceptor):
    """Connections that send a 6-byte header claiming 256 KiB and then nothing: beyond the cap per host
    they are closed at once; the rest are closed at the association-request deadline; a sender on
    another address is served meanwhile."""
    port = acceptor.server_address[1]
    flood = []
    for _ in range(20):
        peer = Peer(port)
        peer.send(struct.pack(">BxI", 1, 256 * 2**10))
        flood.append(peer)
    assert echo_works_on(port, source="127.0.0.2")  # the flood from 127.0.0.1 leaves room for others
    closed = [p.read() is None for p in flood]  # every one ends: at once over the cap, else at the deadline
    assert all(closed)
    for p in flood:
        p.close()
    wait_for(lambda: not acceptor._open, 10, "the flood's connections to be let go", 0.05)
    assert echo_works_on(port)


# --- impossible images -------------------------------------------------------------------------------
def _broken_images(path: Path) -> dict[str, pydicom.Dataset]:
    def variant(**changes) -> pydicom.Dataset:
        ds = pydicom.dcmread(path)
        for k, v in changes.items():
            setattr(ds, k, v)
        return ds

    half = variant()
    half.PixelData = half.PixelData[:len(half.PixelData) // 2]
    return {"Rows 0": variant(Rows=0), "Columns 65535": variant(Columns=65535),
            "BitsAllocated 7": variant(BitsAllocated=7), "pixel data cut in half": half,
            "BitsStored over BitsAllocated": variant(BitsStored=17, HighBit=16),
            "SamplesPerPixel 2": variant(SamplesPerPixel=2)}


def test_impossible_images_are_refused_with_reasons_and_quarantined(scp, small_ct_series):
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", scp.settings.dicom_port, ae_title="LUNGNODE")
    comments = {}
    for name, ds in _broken_images(small_ct_series[0]).items():
        status = assoc.send_c_store(ds)
        assert status.Status == 0xA900, name
        comments[name] = status.ErrorComment
    assert assoc.send_c_store(pydicom.dcmread(small_ct_series[1])).Status == 0x0000
    assoc.release()
    assert "Rows 0" in comments["Rows 0"] and "Columns 65535" in comments["Columns 65535"]
    assert "BitsAllocated 7" in comments["BitsAllocated 7"] and "pixel data is" in comments["pixel data cut in half"]
    assert len(list(scp.settings.quarantine_dir.glob("*.dcm"))) == len(comments) and len(stored(scp)) == 1


def test_a_data_set_cut_short_inside_its_pixel_data_is_refused(scp, small_ct_series):
    """Well-formed PDUs carrying a data set whose pixel data element claims more than follows."""
    ds = pydicom.dcmread(small_ct_series[0])
    data = data_set(small_ct_series[0])
    command, _ = _store_pdus(str(ds.SOPInstanceUID), data)
    peer = Peer(scp.settings.dicom_port)
    peer.associate()
    peer.send(command)
    peer.send(pdu(4, pdv(1, 0x02, data[:len(data) - 1000])))
    assert c_store_status(peer.read())[0] == 0xA900
    peer.close()
    assert stored(scp) == []


def test_encapsulated_pixel_data_is_checked_item_by_item(small_ct_series):
    ds = pydicom.dcmread(small_ct_series[0])
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.5"  # RLE: encapsulated
    good = item_bytes(b"") + item_bytes(b"\0" * 10) + b"\xfe\xff\xdd\xe0\0\0\0\0"
    ds.PixelData = good
    check_image(ds, 0)
    for broken, why in ((item_bytes(b""), "0 fragment"), (item_bytes(b"") + struct.pack("<HHI", 0xFFFE, 0xE000, 99),
                                                           "runs past"), (b"\x08\x00\x05\x00\0\0\0\0", "where an item")):
        ds.PixelData = broken
        with pytest.raises(ImageProblem, match=why):
            check_image(ds, 0)


def test_an_element_pydicom_cannot_convert_is_a_refusal_not_a_crash(small_ct_series, tmp_path):
    """Found by the fuzzer: SOP Class UID with the unknown VR 'UM' raised NotImplementedError past the checks."""
    ds = pydicom.dcmread(small_ct_series[0])
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    data = out.getvalue()
    sop_class = struct.pack("<HH", 0x0008, 0x0016) + b"UI"
    assert data.count(sop_class) == 1
    with pytest.raises(Refused, match="Unknown Value Representation 'UM'") as refused:
        check_instance(data.replace(sop_class, sop_class[:4] + b"UM"), InstanceStore(tmp_path / "in", tmp_path / "q"),
                       "PACS")
    assert refused.value.status == 0xC000


def item_bytes(payload: bytes) -> bytes:
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(payload)) + payload


def test_a_slice_that_passes_the_checks_but_does_not_decode_is_named_in_the_reason(scp, small_ct_series):
    """Encapsulated pixel data can be well formed and still not decode: the study is then not processed
    and the reason names the slice, for the PACS admin to send again."""
    from pydicom.uid import RLELossless

    from lungnode.inference.series_selection import select_series
    from lungnode.inference.volume import VolumeError, load_volume

    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage, RLELossless)
    assoc = ae.associate("127.0.0.1", scp.settings.dicom_port, ae_title="LUNGNODE")
    for i, path in enumerate(sorted(small_ct_series)):
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)
        if i == 5:
            bad = ds
            fragment_at = ds.PixelData.index(b"\xfe\xff\x00\xe0", 8) + 8  # the first fragment, after the table
            # the RLE header's second segment starts far past the fragment's end
            ds.PixelData = (ds.PixelData[:fragment_at] + struct.pack("<III", 2, 64, 0x7FFFFFF0)
                            + ds.PixelData[fragment_at + 12:])
        assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    selection = select_series(stored(scp))
    with pytest.raises(VolumeError, match=f"1 of {len(small_ct_series)} slices cannot be decoded: instance "
                                          f"{bad.InstanceNumber} \\({bad.SOPInstanceUID}\\)"):
        load_volume(selection.chosen.paths)
