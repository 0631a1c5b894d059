"""Send one HL7 v2 message to the RIS over MLLP and insist on a positive acknowledgement.

A message counts as delivered only when the RIS answers with an ACK whose MSA-1 is AA (original
mode: application accept) or CA (enhanced mode: commit accept) and whose MSA-2 names our message.
Anything else - no connection, no answer in time, AE/AR, an ACK for another message - raises
`SendError` with what the RIS said, so the outbox keeps the message and retries it later.
"""
from __future__ import annotations

import asyncio

import hl7
from hl7.exceptions import HL7Exception
from hl7.mllp import InvalidBlockError, open_hl7_connection

from lungnode.config import HostPort
from lungnode.reports.send import SendError

ACCEPTED = ("AA", "CA")


def send_hl7(peer: HostPort, message: str, timeout: float = 30.0) -> str:
    """Send ``message`` (segments ended by CR) and return the ACK text; raises `SendError`."""
    try:
        ack_text = asyncio.run(asyncio.wait_for(_exchange(peer, message), timeout))
    except TimeoutError:
        raise SendError(f"HL7 {peer}: no acknowledgement within {timeout:.0f} s") from None
    except (OSError, EOFError, InvalidBlockError, ValueError) as exc:
        raise SendError(f"HL7 {peer}: connection failed or closed before an acknowledgement: {exc}") from exc
    check_ack(ack_text, str(hl7.parse(message).segment("MSH")(10)), peer)
    return ack_text


def check_ack(ack_text: str, control_id: str, peer: HostPort) -> None:
    """Raise `SendError` unless the ACK accepts the message with MSH-10 ``control_id``."""
    try:
        ack = hl7.parse(ack_text)
        msa = ack.segment("MSA")
    except (HL7Exception, KeyError, IndexError):
        raise SendError(f"HL7 {peer}: the answer is not an HL7 ACK: {ack_text!r}") from None
    code, acked_id = str(msa(1)), str(msa(2))
    if code not in ACCEPTED:
        said = [ack.unescape(str(msa(3)))] if len(msa) > 3 else []  # MSA-3: text message
        said += [str(s) for s in ack if str(s[0]) == "ERR"]
        raise SendError(f"HL7 {peer} refused the message with {code}: {' | '.join(t for t in said if t) or '-'}")
    if acked_id != control_id:
        raise SendError(f"HL7 {peer}: acknowledgement is for message {acked_id!r}, not {control_id!r}")


async def _exchange(peer: HostPort, message: str) -> str:
    reader, writer = await open_hl7_connection(peer.host, peer.port)
    try:
        writer.writeblock(message.encode("utf-8"))
        await writer.drain()
        return (await reader.readblock()).decode("utf-8", "replace")
    finally:
        writer.close()
