"""The DICOM upper-layer requestor behind result delivery: one association on one blocking socket, driven
by the caller's thread alone, optionally over TLS.

pynetdicom's requestor runs a reactor thread beside the caller that, in 3.0, can wake from one C-STORE's
pause after the next request went out and take that request's response off the shared queue as if it
were a new request; the send then waits out the DIMSE timeout (seen in CI on a busy 2-core machine,
pydicom/pynetdicom#875 is the same race with C-FIND). Here no other thread reads the socket: each
response is read by the call that sent the request, so there is nothing to race, however late any thread
runs. pynetdicom still codes the A-ASSOCIATE PDUs and reads the response command set; the C-STORE-RQ
command and the P-DATA framing are the receiver's (`receiver.encode_command`, `pdu_rules.pdv_items`).
"""
from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO

from pynetdicom.dsutils import decode
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext

from lungnode.dicom_node.pdu_rules import (
    ABORT,
    ASSOCIATE_AC,
    ASSOCIATE_RJ,
    HEADER,
    MAX_ASSOCIATE_RQ,
    P_DATA,
    RELEASE_RP,
    RELEASE_RQ,
    ProtocolViolation,
    p_data_pdus,
    pdv_items,
)
from lungnode.dicom_node.receiver import (
    APPLICATION_CONTEXT,
    C_STORE_RQ_FIELD,
    MAX_RECEIVE_PDU,
    encode_command,
    own_user_information,
)


class AssociationFailed(Exception):
    """The peer rejected or aborted the association, or broke the protocol."""


@dataclass(frozen=True)
class StoreResponse:
    status: int
    comment: str = ""


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


class StoreAssociation:
    """An established association for C-STORE requests; `with` releases it, or aborts it on an error."""

    def __init__(self, sock: socket.socket, contexts: dict[tuple[str, str], int], peer_max_pdu: int) -> None:
        self.sock = sock
        self.contexts = contexts  # (SOP class, transfer syntax) -> accepted presentation context ID
        self.peer_max_pdu = peer_max_pdu
        self._message_id = 0

    @classmethod
    def open(cls, host: str, port: int, calling_ae: str, called_ae: str, syntaxes: Sequence[tuple[str, str]],
             timeout: float, tls: ssl.SSLContext | None = None) -> "StoreAssociation":
        """Connect (TLS handshake included, the host name checked against the peer's certificate) and
        negotiate one presentation context per (SOP class, transfer syntax)."""
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                sock = tls.wrap_socket(sock, server_hostname=host)
            proposed = {2 * i + 1: pair for i, pair in enumerate(syntaxes)}
            sock.sendall(_associate_rq(calling_ae, called_ae, proposed))
            pdu_type, body = _read_pdu(sock)
            if pdu_type == ASSOCIATE_RJ:
                rj = A_ASSOCIATE_RJ()
                rj.decode(HEADER.pack(pdu_type, len(body)) + body)
                raise AssociationFailed(f"association rejected ({rj.result_str}, {rj.source_str}: {rj.reason_str})")
            if pdu_type != ASSOCIATE_AC:
                raise AssociationFailed(f"expected A-ASSOCIATE-AC, got PDU type {pdu_type}")
            ac = A_ASSOCIATE_AC()
            ac.decode(HEADER.pack(pdu_type, len(body)) + body)
            accepted = ac.to_primitive()
        except BaseException:
            sock.close()
            raise
        contexts = {(proposed[cx.context_id][0], str(cx.transfer_syntax[0])): cx.context_id
                    for cx in accepted.presentation_context_definition_results_list
                    if cx.result == 0x00 and cx.context_id in proposed}
        peer_max = next((item.maximum_length_received for item in accepted.user_information
                         if isinstance(item, MaximumLengthNotification)), 0)
        return cls(sock, contexts, peer_max or MAX_RECEIVE_PDU)

    def store(self, sop_class: str, sop_instance: str, transfer_syntax: str, data_set: bytes) -> StoreResponse:
        """One C-STORE: the request, then its response read off the socket by this same call."""
        context_id = self.contexts.get((sop_class, transfer_syntax))
        if context_id is None:
            raise AssociationFailed(f"the peer did not accept {sop_class} in transfer syntax {transfer_syntax}")
        self._message_id = self._message_id % 0xFFFF + 1
        command = encode_command([
            (0x0002, _uid(sop_class)), (0x0100, struct.pack("<H", C_STORE_RQ_FIELD)),
            (0x0110, struct.pack("<H", self._message_id)), (0x0700, struct.pack("<H", 0)),
            (0x0800, struct.pack("<H", 0x0000)), (0x1000, _uid(sop_instance))])
        self._send_fragments(context_id, command, is_command=True)
        self._send_fragments(context_id, data_set, is_command=False)
        response = decode(BytesIO(self._read_command()), True, True)
        if response.get("MessageIDBeingRespondedTo") != self._message_id:
            raise AssociationFailed(f"a response to message {response.get('MessageIDBeingRespondedTo')}, "
                                    f"not to {self._message_id}")
        return StoreResponse(int(response.Status), str(response.get("ErrorComment", "")))

    def release(self) -> None:
        with self.sock:
            self.sock.sendall(HEADER.pack(RELEASE_RQ, 4) + b"\0" * 4)
            while (pdu_type := _read_pdu(self.sock)[0]) != RELEASE_RP:
                if pdu_type == ABORT:
                    raise AssociationFailed("A-ABORT instead of A-RELEASE-RP")

    def abort(self) -> None:
        try:
            self.sock.sendall(HEADER.pack(ABORT, 4) + b"\0" * 4)
        except OSError:
            pass
        self.sock.close()

    def __enter__(self) -> "StoreAssociation":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.release()
        else:
            self.abort()

    # --- wire ---------------------------------------------------------------------------------
    def _send_fragments(self, context_id: int, payload: bytes, is_command: bool) -> None:
        for pdu in p_data_pdus(context_id, payload, is_command, self.peer_max_pdu):
            self.sock.sendall(pdu)

    def _read_command(self) -> bytes:
        """The next command set the peer sends (a response), from its P-DATA fragments."""
        command = bytearray()
        while True:
            pdu_type, body = _read_pdu(self.sock)
            if pdu_type == ABORT:
                raise AssociationFailed("A-ABORT from the peer")
            if pdu_type != P_DATA:
                raise AssociationFailed(f"unexpected PDU type {pdu_type} while waiting for a response")
            try:
                for fragment in pdv_items(body):
                    if not fragment.is_command:
                        raise AssociationFailed("a data set where a response command was expected")
                    command += body[fragment.start:fragment.end]
                    if fragment.is_last:
                        return bytes(command)
            except ProtocolViolation as exc:
                raise AssociationFailed(f"protocol violation: {exc}") from exc


def _associate_rq(calling_ae: str, called_ae: str, proposed: dict[int, tuple[str, str]]) -> bytes:
    rq = A_ASSOCIATE()
    rq.application_context_name = APPLICATION_CONTEXT
    rq.calling_ae_title, rq.called_ae_title = calling_ae, called_ae
    for context_id, (sop_class, syntax) in proposed.items():
        cx = PresentationContext()
        cx.context_id, cx.abstract_syntax = context_id, sop_class
        cx.add_transfer_syntax(syntax)
        rq.presentation_context_definition_list.append(cx)
    rq.user_information = own_user_information()
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(rq)
    return pdu.encode()


def _read_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise AssociationFailed("connection closed by the peer")
        got += k
    return bytes(buf)


def _read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    pdu_type, length = HEADER.unpack(_read_exact(sock, HEADER.size))
    if length > (MAX_RECEIVE_PDU if pdu_type == P_DATA else MAX_ASSOCIATE_RQ):
        raise AssociationFailed(f"a PDU of type {pdu_type} and {length} bytes: more than this node accepts")
    return pdu_type, _read_exact(sock, length)
