"""Audit messages to a syslog collector (an IHE ATNA audit record repository): RFC 5424 messages in
RFC 5425 octet-counting frames over TLS (or, when asked, plain TCP).

`submit` never blocks: messages wait in a bounded queue that one background thread sends, reconnecting
with backoff while the collector is away. A full queue drops the newest message and logs it; the local
audit log (lungnode.audit) has every message regardless."""
from __future__ import annotations

import logging
import os
import queue
import socket
import ssl
import threading
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger(__name__)

FACILITY_AUTHPRIV, SEVERITY_NOTICE = 10, 5  # IHE ITI-20: security/authorization messages
APP_NAME = "lungnode"
MSG_ID = "IHE+RFC-3881"  # IHE ITI TF-2 3.20.4.2.1: the MSG is a DICOM / RFC 3881 audit message
BOM = "\ufeff"  # RFC 5424 6.4: a UTF-8 MSG starts with the byte order mark


def rfc5424(payload: str, hostname: str, when: datetime | None = None) -> bytes:
    """One syslog message: <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - BOM payload."""
    stamp = (when or datetime.now(timezone.utc)).isoformat(timespec="microseconds").replace("+00:00", "Z")
    priority = FACILITY_AUTHPRIV * 8 + SEVERITY_NOTICE
    header = f"<{priority}>1 {stamp} {hostname[:255]} {APP_NAME} {os.getpid()} {MSG_ID} -"
    return f"{header} {BOM}{payload}".encode()


def octet_counted(message: bytes) -> bytes:
    """RFC 5425 section 4.3 (and RFC 6587 3.4.1 for TCP): MSG-LEN SP SYSLOG-MSG."""
    return b"%d " % len(message) + message


def client_context(ca: Path | None, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    """TLS 1.2+, the collector's certificate checked against `ca` (else the system CAs) and its name; our
    own certificate presented when the node has one (ATNA node authentication)."""
    context = ssl.create_default_context(cafile=str(ca) if ca else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert and key:
        context.load_cert_chain(cert, key)
    return context


class SyslogSender:
    """Sends framed messages to host:port from a background thread, in order, retried until sent."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext | None, queue_size: int = 10_000,
                 retry_max_seconds: float = 60.0) -> None:
        self.host, self.port, self._context = host, port, context
        self._queue: queue.Queue[bytes] = queue.Queue(queue_size)
        self._retry_max = retry_max_seconds
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)
        self._thread.start()

    def submit(self, message: bytes) -> None:
        try:
            self._queue.put_nowait(octet_counted(message))
        except queue.Full:
            log.error("audit syslog queue full (collector %s:%d away): message kept in the local log only",
                      self.host, self.port)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (for up to `timeout` seconds), then stop."""
        self._closing.set()
        self._thread.join(timeout)

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=10)
        if self._context is None:
            return sock
        try:
            return self._context.wrap_socket(sock, server_hostname=self.host)
        except (OSError, ssl.SSLError):
            sock.close()
            raise

    def _run(self) -> None:
        sock: socket.socket | None = None
        frame: bytes | None = None
        delay = 1.0
        while True:
            if frame is None:
                try:
                    frame = self._queue.get(timeout=0.2)
                except queue.Empty:
                    if self._closing.is_set():
                        break
                    continue
            try:
                sock = sock or self._connect()
                sock.sendall(frame)
                frame, delay = None, 1.0
            except (OSError, ssl.SSLError) as exc:
                log.warning("audit syslog to %s:%d failed, retry in %.0f s: %s", self.host, self.port, delay, exc)
                if sock is not None:
                    sock.close()
                    sock = None
                if self._closing.wait(delay):
                    break
                delay = min(delay * 2, self._retry_max)
        if sock is not None:
            sock.close()
