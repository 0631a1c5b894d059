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
import time
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
from lungnode.dicom_node.pdu_rules import (
    ABORT,
    ASSOCIATE_RQ,
    HEADER,
    RELEASE_RP,
    RELEASE_RQ,
    ProtocolViolation,
    check_associate_rq,
    check_header,
    p_data_pdus,
    pdv_items,
)

log = logging.getLogger(__name__)

IMPLEMENTATION_UID = generate_uid(prefix=PYDICOM_ROOT_UID, entropy_srcs=["lungnode DICOM node"])
IMPLEMENTATION_VERSION = f"LUNGNODE_{__version__}"[:16]
APPLICATION_CONTEXT = UID("1.2.840.10008.3.1.1.1")
MAX_RECEIVE_PDU = 4 * 2**20  # advertised: whole CT slices in a few PDUs
MAX_COMMAND_BYTES = 64 * 2**10  # a command set is a few hundred bytes
_ELEMENT = struct.Struct("<HHI")  # command set element header: group, element, value length

C_STORE_RQ_FIELD, C_ECHO_RQ_FIELD = 0x0001, 0x0030
C_STORE_RSP_FIELD, C_ECHO_RSP_FIELD = 0x8001, 0x8030
NO_DATA_SET = 0x0101
SOP_CLASS_NOT_SUPPORTED = 0x0122
SERVED = {(C_ECHO_RQ_FIELD, False), (C_STORE_RQ_FIELD, True)}  # (command, with a data set)
SUCCESS_STATUSES = (0x0000, 0xB000, 0xB006, 0xB007)  # success and the warnings (the instance is kept)

# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
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


def own_user_information() -> list:
    """The user information this node sends in its A-ASSOCIATE-RQ and -AC: the largest P-DATA-TF it takes,
    its implementation class UID and version name (PS3.7 D.3.3)."""
    max_len = MaximumLengthNotification()
    max_len.maximum_length_received = MAX_RECEIVE_PDU
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = IMPLEMENTATION_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = IMPLEMENTATION_VERSION
    return [max_len, impl, version]


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


class DeadlinePassed(Exception):
    """A whole-message, whole-association or association-request deadline passed."""


@dataclass(frozen=True)
class StoreRequest:
    """One received C-STORE: the instance as a DICOM file (preamble + file meta + data set as sent)."""

    calling_ae: str
    sop_instance_uid: str  # the request's Affected SOP Instance UID (the data set must carry the same)
    file_bytes: bytes
    sop_class_uid: str = ""  # the request's Affected SOP Class UID (the data set must carry the same)


@dataclass(frozen=True)
class StoreStatus:
    status: int
    comment: str = ""
    study_uid: str = ""  # the stored instance's study, for the association's audit record


StoreHandler = Callable[[StoreRequest], StoreStatus]


@dataclass(frozen=True)
class AssociationRecord:
    """What one connection did, for the audit trail: who, from where, what was stored, how it ended."""

    calling_ae: str
    called_ae: str
    peer_ip: str
    tls: bool
    accepted: bool
    instances_stored: int
    instances_refused: int
    study_uids: tuple[str, ...]
    outcome: str  # "released", or why it ended otherwise


AssociationHandler = Callable[[AssociationRecord], None]


@dataclass(frozen=True)
class AcceptorPolicy:
    contexts: Sequence[PresentationContext]
    called_ae_titles: frozenset[str] = frozenset()  # Called AE titles answered to; empty: any
    allowed_callers: frozenset[str] = frozenset()  # empty: anyone
    max_associations: int = 16
    max_connections: int = 64  # open connections, associated or not; more are closed at once
    max_connections_per_host: int = 24
    network_timeout: float = 60.0  # seconds of silence before an association is aborted
    request_timeout: float = 10.0  # connect to a whole A-ASSOCIATE-RQ (PS3.8's ARTIM)
    message_timeout: float = 120.0  # first to last byte of one DIMSE message ...
    message_min_rate: float = 256 * 2**10  # ... plus a second for each this many bytes of it
    association_timeout: float = 3600.0  # connect to release
    max_data_set_bytes: int = 2**30  # one received data set, held in memory until it is journalled


class _Association:
    """One association, from A-ASSOCIATE-RQ to release or abort."""

    def __init__(self, sock: socket.socket, policy: AcceptorPolicy, on_store: StoreHandler,
                 slots: threading.BoundedSemaphore | None, peer_ip: str = "", tls: bool = False) -> None:
        self.sock = sock
        self.policy = policy
        self.on_store = on_store
        self.slots = slots
        self.peer_ip = peer_ip
        self.tls = tls
        self.calling_ae = ""
        self.called_ae = ""
        self.accepted = False
        self.stored = 0
        self.refused = 0
        self.studies: dict[str, None] = {}  # in the order first stored
        self.contexts: dict[int, PresentationContext] = {}
        self.peer_max_pdu = 16384
        self.started = time.monotonic()

    # --- wire ---------------------------------------------------------------------------------
    def _read_exact(self, n: int, deadline: float, what: str) -> bytearray:
        """n bytes, each read waiting at most the network timeout and all of them done by ``deadline``
        (so a peer trickling a byte at a time cannot hold the association)."""
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlinePassed(what)
            self.sock.settimeout(min(left, self.policy.network_timeout))
            k = self.sock.recv_into(view[got:], n - got)
            if k == 0:
                raise PeerGone("connection closed by the peer")
            got += k
        return buf

    def _read_pdu(self, deadline: float, what: str) -> tuple[int, bytearray]:
        pdu_type, length = HEADER.unpack(self._read_exact(HEADER.size, deadline, what))
        check_header(pdu_type, length, MAX_RECEIVE_PDU, associated=self.accepted)
        return pdu_type, self._read_exact(length, deadline, what)

    def _abort(self) -> None:
        try:
            self.sock.sendall(bytes([ABORT, 0, 0, 0, 0, 4, 0, 0, 0, 0]))  # source: service user
        except OSError:
            pass

    # --- association ---------------------------------------------------------------------------
    def run(self) -> AssociationRecord:
        outcome = "released"
        try:
            self._run()
        except (DeadlinePassed, TimeoutError) as exc:
            outcome = (f"{exc} took too long" if isinstance(exc, DeadlinePassed)
                       else f"no data for {self.policy.network_timeout:.0f} s")
            log.warning("association from %s: %s, aborted", self.calling_ae or self.peer_ip, outcome)
            if self.accepted:
                self._abort()
        except ProtocolViolation as exc:
            outcome = f"protocol violation: {exc}"
            log.warning("association from %s: %s, aborted", self.calling_ae or self.peer_ip, outcome)
            self._abort()
        except PeerGone as exc:
            outcome = str(exc)
            log.info("association from %s ended: %s", self.calling_ae or self.peer_ip, exc)
        except OSError as exc:
            outcome = f"network error: {exc}"
            log.warning("association from %s: %s", self.calling_ae or self.peer_ip, outcome)
        except Exception as exc:  # a bug must end this association only; the node serves on
            outcome = f"internal error: {type(exc).__name__}"
            log.exception("association from %s: internal error, aborted", self.calling_ae or self.peer_ip)
            self._abort()
        return AssociationRecord(self.calling_ae, self.called_ae, self.peer_ip, self.tls, self.accepted, self.stored,
                                 self.refused, tuple(self.studies), outcome)

    def _run(self) -> None:
        _, body = self._read_pdu(self.started + self.policy.request_timeout, "the association request")
        if self.slots is not None and not self.slots.acquire(blocking=False):
            self._reject(REJECT_BUSY, "too many associations")
            return
        try:
            if self._associate(bytes(body)):
                self._serve()
        finally:
            if self.slots is not None:
                self.slots.release()

    def _associate(self, body: bytes) -> bool:
        check_associate_rq(body)
        pdu = A_ASSOCIATE_RQ()
        try:
            pdu.decode(HEADER.pack(ASSOCIATE_RQ, len(body)) + body)
            rq = pdu.to_primitive()
        except Exception as exc:  # pynetdicom raises assorted errors on garbage
            raise ProtocolViolation(f"unreadable A-ASSOCIATE-RQ: {exc}") from exc
        self.calling_ae = rq.calling_ae_title.strip()
        self.called_ae = rq.called_ae_title.strip()
        if self.policy.called_ae_titles and self.called_ae not in self.policy.called_ae_titles:
            self._reject(REJECT_CALLED_AE, f"called AE title {self.called_ae!r} is not this node's")
            return False
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
        ac.user_information = [*own_user_information(), *roles]
        out = A_ASSOCIATE_AC()
        out.from_primitive(ac)
        self.sock.sendall(out.encode())
        self.accepted = True
        log.info("association from %s (%s%s) accepted (%d of %d presentation contexts)", self.calling_ae,
                 self.peer_ip, ", TLS" if self.tls else "", len(self.contexts), len(results))
        return True

    def _reject(self, rsd: tuple[int, int, int], why: str) -> None:
        rj = A_ASSOCIATE()
        rj.result, rj.result_source, rj.diagnostic = rsd
        pdu = A_ASSOCIATE_RJ()
        pdu.from_primitive(rj)
        self.sock.sendall(pdu.encode())
        log.warning("association from %s (%s) rejected: %s", self.calling_ae or "?", self.peer_ip, why)
        raise PeerGone(f"rejected: {why}")

    def _deadline(self, message_started: float | None, message_bytes: int) -> tuple[float, str]:
        """When the next PDU must be in: the association's end, and the current message's if one is
        under way (its allowance grows with its size, so a large data set on a slow link still fits)."""
        whole = self.started + self.policy.association_timeout
        if message_started is None:
            return whole, "the association"
        message = (message_started + self.policy.message_timeout
                   + message_bytes / self.policy.message_min_rate)
        return (message, "one message") if message < whole else (whole, "the association")

    def _serve(self) -> None:
        command = bytearray()
        context_id: int | None = None  # the presentation context of the message under way
        cmd: Command | None = None  # the decoded command set, once its last fragment is in
        parts: list[memoryview | bytes] = []  # the file meta, then the data set fragments as received
        size = 0  # bytes of the message under way
        started: float | None = None  # when its first fragment came
        while True:
            pdu_type, body = self._read_pdu(*self._deadline(started, size))
            if pdu_type == RELEASE_RQ:
                if context_id is not None:
                    raise ProtocolViolation("A-RELEASE-RQ in the middle of a message")
                self.sock.sendall(bytes([RELEASE_RP, 0, 0, 0, 0, 4, 0, 0, 0, 0]))
                return
            if pdu_type == ABORT:
                raise PeerGone("A-ABORT from the peer" + (" in the middle of a message" if context_id else ""))
            view = memoryview(body)
            for item in list(pdv_items(view)):  # the whole PDU checked before any of it is acted on
                if item.context_id not in self.contexts:
                    raise ProtocolViolation(f"data on presentation context {item.context_id}, which was not accepted")
                if context_id is None:
                    context_id, started = item.context_id, time.monotonic()
                elif item.context_id != context_id:
                    raise ProtocolViolation(f"a fragment on presentation context {item.context_id} inside a message "
                                            f"on {context_id}")
                fragment = view[item.start:item.end]
                size += len(fragment)
                if item.is_command:
                    if cmd is not None:
                        raise ProtocolViolation("a command fragment where the data set belongs")
                    command += fragment
                    if len(command) > MAX_COMMAND_BYTES:
                        raise ProtocolViolation(f"a command set over {MAX_COMMAND_BYTES} bytes")
                    if not item.is_last:
                        continue
                    try:
                        cmd = decode_command(bytes(command))
                    except ValueError as exc:
                        raise ProtocolViolation(f"malformed command set: {exc}") from exc
                    if (cmd.field, cmd.has_data_set) not in SERVED:
                        raise ProtocolViolation(f"DIMSE command 0x{cmd.field:04X} "
                                                f"{'with' if cmd.has_data_set else 'without'} a data set is not "
                                                "served here")
                    if cmd.has_data_set:
                        syntax = str(self.contexts[context_id].transfer_syntax[0])
                        parts = [part10_header(cmd.sop_class, cmd.sop_instance, syntax)]
                        continue  # its data set follows
                elif cmd is None:
                    raise ProtocolViolation("a data set fragment before its command")
                elif not cmd.has_data_set:
                    raise ProtocolViolation("a data set after a command that announced none")
                else:
                    if size > self.policy.max_data_set_bytes:
                        raise ProtocolViolation(f"a data set over {self.policy.max_data_set_bytes} bytes")
                    parts.append(fragment)  # a view into this PDU's own buffer: no copy yet
                    if not item.is_last:
                        continue
                self._dispatch(context_id, cmd, b"".join(parts))
                command.clear()
                parts, cmd, context_id, started, size = [], None, None, None, 0

    # --- DIMSE ---------------------------------------------------------------------------------
    def _dispatch(self, context_id: int, cmd: Command, file_bytes: bytes) -> None:
        abstract_syntax = str(self.contexts[context_id].abstract_syntax)
        if cmd.field == C_ECHO_RQ_FIELD:
            self._send_command(context_id, response_command(C_ECHO_RSP_FIELD, cmd.message_id, cmd.sop_class,
                                                            0x0000))
            return
        if cmd.sop_class != abstract_syntax:
            outcome = StoreStatus(SOP_CLASS_NOT_SUPPORTED, f"SOP class {cmd.sop_class[:40]} on a context for another")
        else:
            outcome = self._store(StoreRequest(self.calling_ae, cmd.sop_instance, file_bytes, cmd.sop_class))
        self._send_command(context_id, response_command(C_STORE_RSP_FIELD, cmd.message_id, cmd.sop_class,
                                                        outcome.status, cmd.sop_instance, outcome.comment))

    def _store(self, request: StoreRequest) -> StoreStatus:
        try:
            outcome = self.on_store(request)
        except Exception:  # a bug must not take the association (or the node) down
            log.exception("C-STORE handler failed")
            outcome = StoreStatus(0xC001, "internal error in the receiving node")
        if outcome.status in SUCCESS_STATUSES:
            self.stored += 1
            if outcome.study_uid:
                self.studies.setdefault(outcome.study_uid)
        else:
            self.refused += 1
        return outcome

    def _send_command(self, context_id: int, command: bytes) -> None:
        for pdu in p_data_pdus(context_id, command, True, self.peer_max_pdu):
            self.sock.sendall(pdu)


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: Acceptor = self.server  # type: ignore[assignment]
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer_ip = self.client_address[0]
        if server.ssl_context is None:
            record = _Association(self.request, server.policy, server.on_store, server.slots, peer_ip=peer_ip).run()
        else:
            record = self._run_over_tls(server, peer_ip)
        if server.on_association is not None:
            try:
                server.on_association(record)
            except Exception:  # the audit hook must not take the acceptor down
                log.exception("association handler failed")

    def _run_over_tls(self, server: "Acceptor", peer_ip: str) -> AssociationRecord:
        """The TLS handshake, here on the association's own thread (never in the accept loop) and all of it
        within the policy's request timeout (a socket timeout bounds the whole handshake), then the
        association over it. A failed handshake is logged and ends the connection, with a record."""
        self.request.settimeout(server.policy.request_timeout)
        try:
            sock = server.ssl_context.wrap_socket(self.request, server_side=True)
        except (ssl.SSLError, OSError) as exc:  # TimeoutError too: a caller that connects and says nothing
            outcome = f"TLS handshake failed: {exc or type(exc).__name__}"
            log.warning("TLS handshake with %s failed: %s", peer_ip, exc or type(exc).__name__)
            return AssociationRecord("", "", peer_ip, True, False, 0, 0, (), outcome)
        subject = dict(item for rdn in (sock.getpeercert() or {}).get("subject", ()) for item in rdn)
        log.info("TLS from %s: %s %s, client certificate %s", peer_ip, sock.version(), sock.cipher()[0],
                 subject.get("commonName", "none"))
        try:
            return _Association(sock, server.policy, server.on_store, server.slots, peer_ip=peer_ip, tls=True).run()
        finally:  # socketserver shuts down and closes the plain socket, which the TLS one took over
            server.shutdown_request(sock)


class Acceptor(socketserver.ThreadingTCPServer):
    """Listens on (host, port); each connection is an association served on its own thread, over TLS when
    given an SSL context. Connections beyond ``policy.max_connections`` (or ``max_connections_per_host``
    from one address) are closed at once, before a thread or a buffer is spent on them. ``on_association``
    hears how each one went."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], policy: AcceptorPolicy, on_store: StoreHandler,
                 on_association: AssociationHandler | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        self.policy = policy
        self.on_store = on_store
        self.on_association = on_association
        self.ssl_context = ssl_context
        self.slots = threading.BoundedSemaphore(policy.max_associations)
        self._open: dict[str, int] = {}  # peer address -> open connections
        self._open_lock = threading.Lock()
        super().__init__(address, _Handler)
        self._thread: threading.Thread | None = None

    def verify_request(self, request, client_address) -> bool:
        host = client_address[0]
        with self._open_lock:
            total = sum(self._open.values())
            if total >= self.policy.max_connections or self._open.get(host, 0) >= self.policy.max_connections_per_host:
                refused = True
            else:
                self._open[host] = self._open.get(host, 0) + 1
                refused = False
        if refused:
            log.warning("connection from %s closed: %d connections open (at most %d, %d per host)", host, total,
                        self.policy.max_connections, self.policy.max_connections_per_host)
        return not refused

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._open_lock:
                left = self._open.get(client_address[0], 1) - 1
                if left:
                    self._open[client_address[0]] = left
                else:
                    self._open.pop(client_address[0], None)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, daemon=True,
                                        name="dicom-tls-acceptor" if self.ssl_context else "dicom-acceptor")
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join()
