"""The length and structure rules of PS3.8 9.3 for the PDUs an acceptor receives.

Pure functions over bytes, so the association code stays short and a fuzzer can drive them directly.
Any breach is a `ProtocolViolation`: the association answers it with an A-ABORT and keeps nothing of
the message it was in (PS3.8 9.3.1: an invalid PDU is an A-ABORT, never a guess).
"""
from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

# PDU types (PS3.8 9.3.1)
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA, RELEASE_RQ, RELEASE_RP, ABORT = range(1, 8)
HEADER = struct.Struct(">BxI")  # PDU type, reserved, length
MAX_ASSOCIATE_RQ = 256 * 2**10  # 128 presentation contexts with every transfer syntax and a user identity fit
_PDV = struct.Struct(">IBB")  # item length, presentation context ID, message control header
_P_DATA_HEAD = struct.Struct(">BxIIBB")  # P-DATA-TF header + one PDV item header
_ITEM = struct.Struct(">BxH")  # item type, reserved, item length
_FIXED_RQ = 68  # protocol version, reserved, called AE, calling AE, 32 reserved bytes (PS3.8 table 9-11)
APPLICATION_CONTEXT_ITEM, PRESENTATION_CONTEXT_ITEM, USER_INFORMATION_ITEM = 0x10, 0x20, 0x50
ABSTRACT_SYNTAX_ITEM, TRANSFER_SYNTAX_ITEM, MAXIMUM_LENGTH_ITEM = 0x30, 0x40, 0x51
MAX_UID = 64


class ProtocolViolation(ValueError):
    """A PDU that breaks PS3.8; the message says which rule."""


def check_header(pdu_type: int, length: int, max_p_data: int, associated: bool) -> None:
    """The PDU type and length from its 6-byte header, before any of its body is read."""
    if not associated:
        if pdu_type != ASSOCIATE_RQ:
            raise ProtocolViolation(f"PDU type {pdu_type} before A-ASSOCIATE-RQ")
        if not _FIXED_RQ <= length <= MAX_ASSOCIATE_RQ:
            raise ProtocolViolation(f"A-ASSOCIATE-RQ of {length} bytes (allowed {_FIXED_RQ}..{MAX_ASSOCIATE_RQ})")
        return
    if pdu_type == P_DATA:
        if not _PDV.size <= length <= max_p_data:
            raise ProtocolViolation(f"P-DATA-TF of {length} bytes (allowed {_PDV.size}..{max_p_data})")
    elif pdu_type in (RELEASE_RQ, ABORT):
        if length != 4:
            raise ProtocolViolation(f"PDU type {pdu_type} of {length} bytes (it has exactly 4)")
    else:
        raise ProtocolViolation(f"PDU type {pdu_type} is not expected on an established association")


@dataclass(frozen=True)
class Fragment:
    """One PDV item of a P-DATA-TF: where its fragment lies in the PDU body."""

    context_id: int
    is_command: bool
    is_last: bool
    start: int
    end: int


def p_data_pdus(context_id: int, payload: bytes, is_command: bool, max_pdu: int) -> Iterator[bytes]:
    """A command set or data set as P-DATA-TF PDUs, one PDV each, none longer than the peer's maximum
    length (``max_pdu``, 0: no limit), the last fragment flagged (PS3.8 9.3.5, E.2)."""
    step = max(max_pdu - 6, 1) if max_pdu else max(len(payload), 1)
    flag = 0x01 if is_command else 0x00
    view = memoryview(payload)
    for start in range(0, max(len(payload), 1), step):
        part = view[start:start + step]
        control = flag | (0x02 if start + step >= len(payload) else 0x00)
        yield _P_DATA_HEAD.pack(P_DATA, len(part) + 6, len(part) + 2, context_id, control) + part


def pdv_items(body: bytes | bytearray | memoryview) -> Iterator[Fragment]:
    """The PDV items of a P-DATA-TF body, each checked to lie wholly inside it (PS3.8 9.3.5.1): at
    least one, none shorter than its own header, none running past the PDU, nothing left over."""
    pos, end = 0, len(body)
    if end == 0:
        raise ProtocolViolation("P-DATA-TF without a PDV item")
    while pos < end:
        if pos + _PDV.size > end:
            raise ProtocolViolation(f"{end - pos} byte(s) after the last PDV item, too few for another")
        item_length, context_id, control = _PDV.unpack_from(body, pos)
        if item_length < 2:
            raise ProtocolViolation(f"PDV item of length {item_length} (at least 2)")
        if pos + 4 + item_length > end:
            raise ProtocolViolation(f"PDV item of {item_length} bytes runs {pos + 4 + item_length - end} bytes "
                                    f"past its P-DATA-TF")
        if context_id % 2 == 0:
            raise ProtocolViolation(f"presentation context ID {context_id} is even")
        yield Fragment(context_id, bool(control & 0x01), bool(control & 0x02), pos + _PDV.size, pos + 4 + item_length)
        pos += 4 + item_length


def _items(data: bytes, start: int, end: int, where: str) -> Iterator[tuple[int, int, int]]:
    """(type, value start, value end) of the items or sub-items between start and end, each whole."""
    pos = start
    while pos < end:
        if pos + _ITEM.size > end:
            raise ProtocolViolation(f"{where}: {end - pos} byte(s) left, too few for an item header")
        item_type, length = _ITEM.unpack_from(data, pos)
        if pos + _ITEM.size + length > end:
            raise ProtocolViolation(f"{where}: item 0x{item_type:02X} of {length} bytes runs past its end")
        yield item_type, pos + _ITEM.size, pos + _ITEM.size + length
        pos += _ITEM.size + length


def _uid_length(where: str, length: int) -> None:
    if not 1 <= length <= MAX_UID:
        raise ProtocolViolation(f"{where}: a UID of {length} bytes (1..{MAX_UID})")


def check_associate_rq(body: bytes) -> None:
    """The structure of an A-ASSOCIATE-RQ body (PS3.8 9.3.2, PS3.7 D.3.3): protocol version 1, one
    application context, 1-128 presentation contexts with odd unique IDs, each with one abstract syntax
    and at least one transfer syntax, and one user information item with its maximum length."""
    if len(body) < _FIXED_RQ:
        raise ProtocolViolation(f"A-ASSOCIATE-RQ of {len(body)} bytes is shorter than its fixed fields")
    (version,) = struct.unpack_from(">H", body, 0)
    if not version & 0x0001:
        raise ProtocolViolation(f"protocol version 0x{version:04X} (this node speaks version 1)")
    counts = {APPLICATION_CONTEXT_ITEM: 0, USER_INFORMATION_ITEM: 0}
    context_ids: set[int] = set()
    for item_type, start, end in _items(body, _FIXED_RQ, len(body), "A-ASSOCIATE-RQ"):
        if item_type == APPLICATION_CONTEXT_ITEM:
            _uid_length("application context", end - start)
            counts[item_type] += 1
        elif item_type == PRESENTATION_CONTEXT_ITEM:
            if end - start < 4:
                raise ProtocolViolation(f"presentation context item of {end - start} bytes")
            context_id = body[start]
            if context_id % 2 == 0 or context_id in context_ids:
                raise ProtocolViolation(f"presentation context ID {context_id} is even or used twice")
            context_ids.add(context_id)
            subs = []
            for sub, s, e in _items(body, start + 4, end, f"presentation context {context_id}"):
                if sub in (ABSTRACT_SYNTAX_ITEM, TRANSFER_SYNTAX_ITEM):
                    _uid_length(f"presentation context {context_id}", e - s)
                subs.append(sub)
            if subs.count(ABSTRACT_SYNTAX_ITEM) != 1 or subs.count(TRANSFER_SYNTAX_ITEM) < 1:
                raise ProtocolViolation(f"presentation context {context_id}: {subs.count(ABSTRACT_SYNTAX_ITEM)} "
                                        f"abstract and {subs.count(TRANSFER_SYNTAX_ITEM)} transfer syntaxes")
        elif item_type == USER_INFORMATION_ITEM:
            counts[item_type] += 1
            for sub, s, e in _items(body, start, end, "user information"):
                if sub == MAXIMUM_LENGTH_ITEM and e - s != 4:
                    raise ProtocolViolation(f"maximum length sub-item of {e - s} bytes (it has 4)")
        # other item types are reserved: PS3.8 9.3.1 has them ignored
    if counts[APPLICATION_CONTEXT_ITEM] != 1 or counts[USER_INFORMATION_ITEM] != 1 or not context_ids:
        raise ProtocolViolation(f"{counts[APPLICATION_CONTEXT_ITEM]} application context(s), {len(context_ids)} "
                                f"presentation context(s), {counts[USER_INFORMATION_ITEM]} user information item(s)")
