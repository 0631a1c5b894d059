"""The DICOM upper-layer acceptor behind the SCP: one thread per association, blocking socket reads.

pynetdicom's own acceptor runs two polling loops per association (its DUL and its Association
reactor), each sleeping 1 ms between checks and handing PDUs, primitives and DIMSE messages between
threads through queues. A CT slice then spends more time waiting than being received: 261 slices took
1.4 s into pynetdicom's storescp where DCMTK's storescp takes 0.3 s. Here each PDU is read straight
off the socket and the response leaves as soon as the handler returns. pynetdicom still does the parts
a hand-written copy would get wrong: A-ASSOCIATE PDU coding, presentation-context and role
negotiation. The DIMSE command sets (read: C-ECHO-RQ, C-STORE-RQ; sent: their responses) and the Part
10 file meta of each received instance are coded below directly: a command set is a flat list of
group-0000 elements in Implicit VR Little Endian, and through pydicom each cost more per instance than
everything else on this path except the disk flush. A received data set is copied once, from the PDUs
it came in straight behind its file meta.

Only the acceptor side of C-ECHO and C-STORE with synchronous operations is spoken (the only services
a PACS pushing studies uses); anything else is refused by negotiation or answered with an A-ABORT.
"""
from __future__ import annotations

import logging
import socket
import socketserver
import ssl
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydicom.uid import PYDICOM_ROOT_UID, UID, generate_uid
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from lungnode import __version__

log = logging.getLogger(__name__)

IMPLEMENTATION_UID = generate_uid(prefix=PYDICOM_ROOT_UID, entropy_srcs=["lungnode DICOM node"])
IMPLEMENTATION_VERSION = f"LUNGNODE_{__version__}"[:16]
APPLICATION_CONTEXT = UID("1.2.840.10008.3.1.1.1")
MAX_RECEIVE_PDU = 4 * 2**20  # advertised: whole CT slices in a few PDUs
MAX_OTHER_PDU = 2**20  # an A-ASSOCIATE-RQ with every presentation context there is fits in far less
_HEADER = struct.Struct(">BxI")  # PDU type, reserved, length
_PDV = struct.Struct(">IBB")  # item length, presentation context ID, message control header
_P_DATA_HEAD = struct.Struct(">BxIIBB")  # P-DATA-TF header + one PDV item header
_ELEMENT = struct.Struct("<HHI")  # command set element header: group, element, value length

# PDU types (PS3.8 9.3.1)
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA, RELEASE_RQ, RELEASE_RP, ABORT = range(1, 8)
C_STORE_RQ_FIELD, C_ECHO_RQ_FIELD = 0x0001, 0x0030
C_STORE_RSP_FIELD, C_ECHO_RSP_FIELD = 0x8001, 0x8030
NO_DATA_SET = 0x0101

# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_APPLICATION_CONTEXT = (0x01, 0x01, 0x02)
REJECT_BUSY = (0x02, 0x03, 0x02)


def _even(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


@dataclass(frozen=True)
class Command:
    """What this acceptor acts on in a DIMSE request's command set (PS3.7 E.1-1)."""

    field: int  # (0000,0100) Command Field
    message_id: int  # (0000,0110)
    sop_class: str  # (0000,0002) Affected SOP Class UID
    sop_instance: str  # (0000,1000) Affected SOP Instance UID ("" in a C-ECHO-RQ)
    has_data_set: bool  # (0000,0800) Command Data Set Type other than 0x0101


def decode_command(raw: bytes) -> Command:
    """Read a command set; ValueError when it is malformed or lacks a required element."""
    values: dict[int, bytes] = {}
    pos = 0
    while pos < len(raw):
        if pos + _ELEMENT.size > len(raw):
            raise ValueError("command set ends inside an element header")
        group, elem, length = _ELEMENT.unpack_from(raw, pos)
        pos += _ELEMENT.size
        if group != 0x0000 or pos + length > len(raw):
            raise ValueError(f"element ({group:04X},{elem:04X}) of {length} bytes does not belong in it")
        values[elem] = raw[pos:pos + length]
        pos += length

    def us(elem: int, default: int | None = None) -> int:
        value = values.get(elem)
        if value is None and default is not None:
            return default
        if value is None or len(value) != 2:
            raise ValueError(f"command set without a valid (0000,{elem:04X})")
        return struct.unpack("<H", value)[0]

    def ui(elem: int) -> str:
        return values.get(elem, b"").rstrip(b"\0 ").decode("ascii", "replace")

    return Command(field=us(0x0100), message_id=us(0x0110), sop_class=ui(0x0002), sop_instance=ui(0x1000),
                   has_data_set=us(0x0800, NO_DATA_SET) != NO_DATA_SET)


def encode_command(elements: list[tuple[int, bytes]]) -> bytes:
    """A DIMSE command set (group 0000, Implicit VR Little Endian) from (element, value) pairs in order."""
    body = b"".join(struct.pack("<HHI", 0x0000, elem, len(value)) + value for elem, value in elements)
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


def response_command(field: int, message_id: int, sop_class: str, status: int, sop_instance: str = "",
                     comment: str = "") -> bytes:
    """C-ECHO-RSP / C-STORE-RSP command set (PS3.7 9.3.1.2, 9.3.5.2)."""
    elements = [(0x0002, _even(sop_class.encode(), b"\0")), (0x0100, struct.pack("<H", field)),
                (0x0120, struct.pack("<H", message_id)), (0x0800, struct.pack("<H", NO_DATA_SET)),
                (0x0900, struct.pack("<H", status))]
    if comment:
        elements.append((0x0902, _even(comment[:64].encode("ascii", "replace"), b" ")))
    if sop_instance:
        elements.append((0x1000, _even(sop_instance.encode(), b"\0")))
    return encode_command(elements)


def part10_header(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Preamble, DICM prefix and File Meta Information (Explicit VR Little Endian) for a received data set."""
    def short(elem: int, vr: bytes, value: bytes) -> bytes:
        return struct.pack("<HH2sH", 0x0002, elem, vr, len(value)) + value

    body = b"".join((
        struct.pack("<HH2sxxI", 0x0002, 0x0001, b"OB", 2) + b"\x00\x01",
        short(0x0002, b"UI", _even(sop_class.encode(), b"\0")),
        short(0x0003, b"UI", _even(sop_instance.encode(), b"\0")),
        short(0x0010, b"UI", _even(transfer_syntax.encode(), b"\0")),
        short(0x0012, b"UI", _even(IMPLEMENTATION_UID.encode(), b"\0")),
        short(0x0013, b"SH", _even(IMPLEMENTATION_VERSION.encode(), b" ")),
    ))
    return b"\x00" * 128 + b"DICM" + struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body)) + body


class PeerGone(Exception):
    """The peer closed the connection, aborted, or broke the protocol; the association is over."""


@dataclass(frozen=True)
class StoreRequest:
    """One received C-STORE: the instance as a DICOM file (preamble + file meta + data set as sent)."""

    calling_ae: str
    sop_instance_uid: str  # the request's Affected SOP Instance UID (the data set must carry the same)
    file_bytes: bytes


@dataclass(frozen=True)
class StoreStatus:
    status: int
    comment: str = ""


StoreHandler = Callable[[StoreRequest], StoreStatus]


@dataclass(frozen=True)
class AcceptorPolicy:
    contexts: Sequence[PresentationContext]
    allowed_callers: frozenset[str] = frozenset()  # empty: anyone
    max_associations: int = 16
    network_timeout: float = 60.0  # seconds of silence before an association is aborted


class _Association:
    """One association, from A-ASSOCIATE-RQ to release or abort."""

    tls: bool = False  # it came over TLS (set by the handler, for the audit trail)

    def __init__(self, sock: socket.socket, policy: AcceptorPolicy, on_store: StoreHandler,
                 slots: threading.BoundedSemaphore) -> None:
        self.sock = sock
        self.policy = policy
        self.on_store = on_store
        self.slots = slots
        self.calling_ae = ""
        self.contexts: dict[int, PresentationContext] = {}
        self.peer_max_pdu = 16384

    # --- wire ---------------------------------------------------------------------------------
    def _read_exact(self, n: int) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:], n - got)
            if k == 0:
                raise PeerGone("connection closed by the peer")
            got += k
        return buf

    def _read_pdu(self) -> tuple[int, bytearray]:
        pdu_type, length = _HEADER.unpack(self._read_exact(_HEADER.size))
        if length > (MAX_RECEIVE_PDU if pdu_type == P_DATA else MAX_OTHER_PDU):
            raise PeerGone(f"a PDU of type {pdu_type} and {length} bytes: more than this node accepts")
        return pdu_type, self._read_exact(length)

    def _abort(self) -> None:
        try:
            self.sock.sendall(bytes([ABORT, 0, 0, 0, 0, 4, 0, 0, 0, 0]))  # source: service user
        except OSError:
            pass

    # --- association ---------------------------------------------------------------------------
    def run(self) -> None:
        self.sock.settimeout(self.policy.network_timeout)
        try:
            pdu_type, body = self._read_pdu()
            if pdu_type != ASSOCIATE_RQ:
                raise PeerGone(f"expected A-ASSOCIATE-RQ, got PDU type {pdu_type}")
            if not self.slots.acquire(blocking=False):
                self._reject(REJECT_BUSY, "too many associations")
                return
            try:
                if self._associate(_HEADER.pack(pdu_type, len(body)) + bytes(body)):
                    self._serve()
            finally:
                self.slots.release()
        except TimeoutError:
            log.warning("association from %s: no data for %.0f s, aborted", self.calling_ae or "?",
                        self.policy.network_timeout)
            self._abort()
        except PeerGone as exc:
            log.info("association from %s ended: %s", self.calling_ae or "?", exc)
        except OSError as exc:
            log.warning("association from %s: network error: %s", self.calling_ae or "?", exc)
        except Exception:  # a malformed command set or the like: this association ends, the node serves on
            log.exception("association from %s: protocol error, aborted", self.calling_ae or "?")
            self._abort()

    def _associate(self, pdu_bytes: bytes) -> bool:
        pdu = A_ASSOCIATE_RQ()
        try:
            pdu.decode(pdu_bytes)
            rq = pdu.to_primitive()
        except Exception as exc:  # pynetdicom raises assorted errors on garbage
            self._abort()
            raise PeerGone(f"unreadable A-ASSOCIATE-RQ: {exc}") from exc
        self.calling_ae = rq.calling_ae_title.strip()
        if self.policy.allowed_callers and self.calling_ae not in self.policy.allowed_callers:
            self._reject(REJECT_CALLING_AE, f"calling AE title {self.calling_ae!r} is not allowed")
            return False
        if rq.application_context_name != APPLICATION_CONTEXT:
            self._reject(REJECT_APPLICATION_CONTEXT, f"application context {rq.application_context_name}")
            return False
        for item in rq.user_information:
            if isinstance(item, MaximumLengthNotification) and item.maximum_length_received:
                self.peer_max_pdu = item.maximum_length_received
        rq_roles = {item.sop_class_uid: (item.scu_role, item.scp_role)
                    for item in rq.user_information if isinstance(item, SCP_SCU_RoleSelectionNegotiation)}
        results, roles = negotiate_as_acceptor(rq.presentation_context_definition_list,
                                               list(self.policy.contexts), rq_roles)
        self.contexts = {cx.context_id: cx for cx in results if cx.result == 0x00}

        ac = A_ASSOCIATE()
        ac.application_context_name = APPLICATION_CONTEXT
        ac.calling_ae_title = rq.calling_ae_title
        ac.called_ae_title = rq.called_ae_title
        ac.result, ac.result_source = 0x00, 0x01
        ac.presentation_context_definition_results_list = results
        max_len = MaximumLengthNotification()
        max_len.maximum_length_received = MAX_RECEIVE_PDU
        impl = ImplementationClassUIDNotification()
        impl.implementation_class_uid = IMPLEMENTATION_UID
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = IMPLEMENTATION_VERSION
        ac.user_information = [max_len, impl, version, *roles]
        out = A_ASSOCIATE_AC()
        out.from_primitive(ac)
        self.sock.sendall(out.encode())
        log.info("association from %s accepted (%d of %d presentation contexts)", self.calling_ae,
                 len(self.contexts), len(results))
        return True

    def _reject(self, rsd: tuple[int, int, int], why: str) -> None:
        rj = A_ASSOCIATE()
        rj.result, rj.result_source, rj.diagnostic = rsd
        pdu = A_ASSOCIATE_RJ()
        pdu.from_primitive(rj)
        self.sock.sendall(pdu.encode())
        log.warning("association from %s rejected: %s", self.calling_ae or "?", why)

    def _serve(self) -> None:
        command = bytearray()
        cmd: Command | None = None  # the decoded command set, once its last fragment is in
        parts: list[memoryview | bytes] = []  # the file meta, then the data set fragments as received
        while True:
            pdu_type, body = self._read_pdu()
            if pdu_type == RELEASE_RQ:
                self.sock.sendall(bytes([RELEASE_RP, 0, 0, 0, 0, 4, 0, 0, 0, 0]))
                return
            if pdu_type == ABORT:
                raise PeerGone("A-ABORT from the peer")
            if pdu_type != P_DATA:
                self._abort()
                raise PeerGone(f"unexpected PDU type {pdu_type}")
            view = memoryview(body)
            pos = 0
            while pos < len(view):
                item_len, context_id, control = _PDV.unpack_from(view, pos)
                fragment = view[pos + _PDV.size:pos + 4 + item_len]
                pos += 4 + item_len
                if context_id not in self.contexts:
                    self._abort()
                    raise PeerGone(f"data on presentation context {context_id}, which was not accepted")
                is_command, is_last = bool(control & 0x01), bool(control & 0x02)
                if is_command:
                    command += fragment
                    if not is_last:
                        continue
                    try:
                        cmd = decode_command(bytes(command))
                    except ValueError as exc:
                        self._abort()
                        raise PeerGone(f"malformed command set: {exc}") from exc
                    if cmd.has_data_set:
                        syntax = str(self.contexts[context_id].transfer_syntax[0])
                        parts = [part10_header(cmd.sop_class, cmd.sop_instance, syntax)]
                        continue  # its data set follows
                elif cmd is None:
                    self._abort()
                    raise PeerGone("a data set fragment arrived before its command")
                else:
                    parts.append(fragment)  # a view into this PDU's own buffer: no copy yet
                    if not is_last:
                        continue
                self._dispatch(context_id, cmd, b"".join(parts))
                command.clear()
                parts = []
                cmd = None

    # --- DIMSE ---------------------------------------------------------------------------------
    def _dispatch(self, context_id: int, cmd: Command, file_bytes: bytes) -> None:
        if cmd.field == C_ECHO_RQ_FIELD:
            self._send_command(context_id, response_command(C_ECHO_RSP_FIELD, cmd.message_id, cmd.sop_class,
                                                            0x0000))
        elif cmd.field == C_STORE_RQ_FIELD and file_bytes:
            request = StoreRequest(self.calling_ae, cmd.sop_instance, file_bytes)
            try:
                outcome = self.on_store(request)
            except Exception:  # a bug must not take the association (or the node) down
                log.exception("C-STORE handler failed")
                outcome = StoreStatus(0xC001, "internal error in the receiving node")
            self._send_command(context_id, response_command(C_STORE_RSP_FIELD, cmd.message_id, cmd.sop_class,
                                                            outcome.status, cmd.sop_instance, outcome.comment))
        else:
            self._abort()
            raise PeerGone(f"DIMSE command 0x{cmd.field:04X} is not served here"
                           + (" without a data set" if cmd.field == C_STORE_RQ_FIELD else ""))

    def _send_command(self, context_id: int, command: bytes) -> None:
        """Send a command set as P-DATA-TF PDUs no larger than the peer accepts (last fragment flagged)."""
        step = max(self.peer_max_pdu - 6, 1)
        for start in range(0, len(command), step):
            part = command[start:start + step]
            control = 0x03 if start + step >= len(command) else 0x01
            self.sock.sendall(_P_DATA_HEAD.pack(P_DATA, len(part) + 6, len(part) + 2, context_id, control) + part)


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: Acceptor = self.server  # type: ignore[assignment]
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = self.request
        if server.ssl_context is not None:
            sock = self._handshake(server.ssl_context, server.policy.network_timeout)
            if sock is None:
                return
        association = _Association(sock, server.policy, server.on_store, server.slots)
        association.tls = sock is not self.request
        try:
            association.run()
        finally:
            if association.tls:  # socketserver shuts down and closes the plain socket, which TLS took over
                server.shutdown_request(sock)

    def _handshake(self, context: ssl.SSLContext, limit: float) -> ssl.SSLSocket | None:
        """The TLS handshake, here on the association's own thread, all of it within `limit` seconds (the
        socket timeout bounds the whole handshake); None, logged, when it fails or runs out of time."""
        peer = self.client_address[0]
        self.request.settimeout(limit)
        try:
            sock = context.wrap_socket(self.request, server_side=True)
        except (ssl.SSLError, OSError) as exc:  # TimeoutError too: a caller that connects and says nothing
            log.warning("TLS handshake with %s failed: %s", peer, exc or type(exc).__name__)
            return None
        subject = dict(item for rdn in (sock.getpeercert() or {}).get("subject", ()) for item in rdn)
        log.info("TLS from %s: %s %s, client certificate %s", peer, sock.version(), sock.cipher()[0],
                 subject.get("commonName", "none"))
        return sock


class Acceptor(socketserver.ThreadingTCPServer):
    """Listens on (host, port); each connection is an association served on its own thread, over TLS
    when given an SSL context (the handshake then runs on that thread too, never in the accept loop)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], policy: AcceptorPolicy, on_store: StoreHandler,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.policy = policy
        self.on_store = on_store
        self.ssl_context = ssl_context
        self.slots = threading.BoundedSemaphore(policy.max_associations)
        super().__init__(address, _Handler)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, daemon=True,
                                        name="dicom-tls-acceptor" if self.ssl_context else "dicom-acceptor")
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join()
