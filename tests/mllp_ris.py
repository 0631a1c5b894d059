"""A RIS's HL7 inbound interface for the tests: python-hl7's MLLP server (hl7.mllp.start_hl7_server)
on a loopback port. Every message received is appended to LOG (one JSON line: the message text) and
then acknowledged with ACK_CODE; with ACK_CODE NONE it never answers (a hung interface).

Usage: python tests/mllp_ris.py PORT LOG [ACK_CODE [MSA-3 TEXT]]   (prints "listening" when ready)
"""
from __future__ import annotations

import asyncio
import json
import sys

from hl7.mllp import start_hl7_server


async def serve(port: int, log: str, ack_code: str, text: str) -> None:
    async def on_client(reader, writer) -> None:
        try:
            while True:
                message = await reader.readmessage()
                with open(log, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"message": str(message)}) + "\n")
                if ack_code == "NONE":
                    continue
                ack = message.create_ack(ack_code, application="RIS", facility="RADIOLOGY")
                if text:
                    ack.segment("MSA").assign_field(text, 3)
                writer.writemessage(ack)
                await writer.drain()
        except asyncio.IncompleteReadError:  # the sender closed the connection
            pass
        finally:
            writer.close()

    server = await start_hl7_server(on_client, "127.0.0.1", port, encoding="utf-8")
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    args = sys.argv[1:] + [""] * 4
    asyncio.run(serve(int(args[0]), args[1], args[2] or "AA", args[3]))
