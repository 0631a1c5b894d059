"""A syslog collector for the tests, as an ATNA audit repository is: TCP on a loopback port, TLS with a
certificate from a test CA (trustme) when given a server context, RFC 5425 octet-counted frames."""
from __future__ import annotations

import re
import socket
import ssl
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass

# RFC 5424: <PRI>VERSION TIMESTAMP HOSTNAME APP-NAME PROCID MSGID STRUCTURED-DATA MSG
HEADER = re.compile(rb"^<(?P<pri>\d{1,3})>1 (?P<time>\S+) (?P<host>\S+) (?P<app>\S+) (?P<procid>\S+) "
                    rb"(?P<msgid>\S+) - \xef\xbb\xbf(?P<msg>.*)$", re.DOTALL)


@dataclass(frozen=True)
class SyslogMessage:
    priority: int
    app: str
    msgid: str
    audit: ET.Element  # the MSG, parsed


def parse(frame: bytes) -> SyslogMessage:
    m = HEADER.match(frame)
    assert m, f"not an RFC 5424 message: {frame[:120]!r}"
    return SyslogMessage(int(m["pri"]), m["app"].decode(), m["msgid"].decode(), ET.fromstring(m["msg"].decode()))


class Collector:
    def __init__(self, context: ssl.SSLContext | None, port: int = 0) -> None:
        self.context = context
        self.server = socket.create_server(("127.0.0.1", port))
        self.port = self.server.getsockname()[1]
        self.frames: list[bytes] = []
        self.peer_certificates: list[dict] = []  # the client certificate of each TLS connection
        self.connections = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def messages(self) -> list[SyslogMessage]:
        with self._lock:
            return [parse(f) for f in self.frames]

    def close(self) -> None:
        self.server.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:  # closed
                return
            self.connections += 1
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        try:
            if self.context is not None:
                conn = self.context.wrap_socket(conn, server_side=True)
                self.peer_certificates.append(conn.getpeercert() or {})
            stream = conn.makefile("rb")
            while True:
                length = b""
                while (c := stream.read(1)) != b" ":
                    if not c:
                        return
                    length += c
                frame = stream.read(int(length))
                with self._lock:
                    self.frames.append(frame)
        except (OSError, ssl.SSLError):
            return
        finally:
            conn.close()
