"""Write-ahead journal for received instances.

A C-STORE is acknowledged once its bytes are in the journal and flushed: the segment is opened
O_DSYNC, so one writev both writes and flushes the record's data, where a durable temp-file + rename
costs a file sync and a directory sync (several ms per instance on ext4). The receiver's reading of the
instance's header (`append`'s ``check``) runs on a helper thread meanwhile: the two take about as long,
and the writev releases the GIL. An instance the check refuses has its record voided, never filed.

A background thread then files each instance (the receiver indexed it already) and makes the filed
copies durable a batch at a time (`sync`: one flush when the queue runs dry or every SYNC_BATCH
instances). Filing waits for a pause in receiving: on ext4 (data=ordered) every journal flush would
otherwise also flush the data of the files being filed beside it, doubling the time each C-STORE
waits. A segment is let go only when everything in it is filed and flushed. After a crash, `replay`
files (and indexes) whatever the last run had not.

A segment let go is kept as the spare the next segment is written over: flushing data written over
blocks a file already has needs no filesystem journal commit (0.34 ms a slice here, against 0.62 ms
appended). Each record carries its segment's number, so the stale records after the last new one are
never read as new.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import google_crc32c

log = logging.getLogger(__name__)

MAGIC = b"LNJ3"
HEAD = struct.Struct("<4sIIQI")  # magic, segment number, meta length, data length, CRC-32C(segment, meta, data)
# Records of earlier versions, still replayed after an upgrade: LNJ2 is LNJ3 with zlib's CRC-32 (0.1-0.2 ms
# a CT slice, against 0.02 ms for CRC-32C in hardware); LNJ1 had no segment number (segments not reused).
MAGIC_V2 = b"LNJ2"
VOID = b"LNJV"  # written over the magic of a record whose instance was refused
MAGIC_V1, HEAD_V1 = b"LNJ1", struct.Struct("<4sIQI")
SPARE = "spare.log"
SEGMENT_BYTES = 512 * 2**20
SYNC_BATCH = 256
QUIET_SECONDS = 0.3  # filing waits for a pause in receiving this long ...
BACKLOG = 512  # ... unless this many instances wait

# (encoded file bytes, calling AE, what `append` was given as ``facts`` or None after a restart) -> filed
FileInstance = Callable[[bytes, str, object | None], None]


@dataclass
class _Segment:
    path: Path
    appended: int = 0
    filed: int = 0  # filed and flushed
    closed: bool = False


def _segment_number(path: Path) -> int:
    return int(path.stem.split("-")[1])


def _crc(seg_id: int, meta: bytes, data: bytes) -> int:
    return google_crc32c.extend(google_crc32c.extend(google_crc32c.value(struct.pack("<I", seg_id)), meta), data)


def _crc_v2(seg_id: int, meta: bytes, data: bytes) -> int:
    return zlib.crc32(data, zlib.crc32(meta, zlib.crc32(struct.pack("<I", seg_id))))


def _write_all(fd: int, parts: list[bytes]) -> None:
    """One writev for the whole record (a short write, e.g. on a nearly full disk, goes on from where it stopped)."""
    views = [memoryview(p) for p in parts if len(p)]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views:
            views[0] = views[0][written:]


def read_records(path: Path) -> Iterator[tuple[bytes, str]]:
    """Complete records of a segment; stops at a torn or corrupt tail (never acknowledged) and at a
    record of an earlier use of the file."""
    seg_id = _segment_number(path)
    with open(path, "rb") as f:
        while True:
            head = f.read(HEAD.size)
            if head[:4] == MAGIC_V1 and len(head) >= HEAD_V1.size:  # a journal left by an older version
                f.seek(HEAD_V1.size - len(head), os.SEEK_CUR)
                _, meta_len, data_len, crc = HEAD_V1.unpack(head[:HEAD_V1.size])
                meta, data = f.read(meta_len), f.read(data_len)
                ok = len(data) == data_len and zlib.crc32(data, zlib.crc32(meta)) == crc
            elif len(head) == HEAD.size and head[:4] in (MAGIC, MAGIC_V2, VOID):
                magic, rec_seg, meta_len, data_len, crc = HEAD.unpack(head)
                if rec_seg != seg_id:
                    return  # the rest is from the file's earlier use as another segment
                meta, data = f.read(meta_len), f.read(data_len)
                check = _crc_v2 if magic == MAGIC_V2 else _crc
                ok = len(data) == data_len and check(seg_id, meta, data) == crc
                if ok and magic == VOID:
                    continue
            else:  # the end: the file's end, a torn header, or what an earlier use of the file left
                return
            if not ok:
                log.warning("journal %s: torn record at the end, ignored", path.name)
                return
            yield data, json.loads(meta)["caller"]


class IngestJournal:
    def __init__(self, directory: Path, file_instance: FileInstance, sync: Callable[[], None] = lambda: None,
                 segment_bytes: int = SEGMENT_BYTES,
                 retryable: tuple[type[Exception], ...] = (OSError,)) -> None:
        """``sync`` makes everything ``file_instance`` wrote so far durable (the default: it already is);
        ``retryable``: what ``file_instance`` raises when it cannot file now but may later (a full disk)."""
        self.retryable = retryable
        self._left_from_last_run: list[Path] = []  # segments `replay` could not file yet
        self._replayer: threading.Thread | None = None
        self._replayed = threading.Event()
        self._replayed.set()
        self._stopping = threading.Event()
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.file_instance = file_instance
        self.sync = sync
        self._unsynced: dict[int, int] = {}  # segment -> instances filed since the last sync
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(maxsize=1024)  # back-pressure if filing falls behind
        self._segments: dict[int, _Segment] = {}
        self._current: int | None = None
        self._fd: int | None = None
        self._offset = 0
        self._next_id = max((_segment_number(p) for p in self.dir.glob("seg-*.log")), default=0) + 1
        self._thread: threading.Thread | None = None
        self._last_append = 0.0
        self._unfiled: dict[str, int] = {}  # key (the study) -> instances appended, not yet filed
        self._filed = threading.Condition(self._lock)
        self._checker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-check")

    # --- startup -----------------------------------------------------------------------------
    def replay(self) -> int:
        """File every record left by a previous run, then drop its segments. Call before receiving.

        When filing fails for want of space (one of ``retryable``), the node must still start and answer
        "out of resources" rather than not at all: the segments left are kept and filed by a background
        thread once they can be (`start`), and `wait_filed` waits for that too."""
        paths = sorted(self.dir.glob("seg-*.log"))
        try:
            n = self._file_segments(paths)
        except self.retryable as exc:
            self._left_from_last_run = [p for p in paths if p.exists()]
            self._replayed.clear()
            log.error("journal: cannot file what was received before the last stop yet (%s); %d segment(s) "
                      "kept, filed once there is room", exc, len(self._left_from_last_run))
            return 0
        if n:
            log.warning("journal: filed %d instance(s) received before the last stop", n)
        return n

    def _file_segments(self, paths: list[Path]) -> int:
        n = 0
        done: list[Path] = []
        for path in paths:
            try:
                for data, caller in read_records(path):
                    self.file_instance(data, caller, None)
                    n += 1
            except self.retryable:
                raise
            except (ValueError, KeyError, AttributeError) as exc:
                kept = path.with_suffix(".failed")
                path.rename(kept)
                log.error("journal %s could not be filed completely (%s): kept as %s", path.name, exc, kept)
                continue
            done.append(path)
        self.sync()
        with self._lock:
            for path in done:
                self._let_go(path)
        return n

    def _replay_later(self) -> None:
        delay = 0.5
        while self._left_from_last_run and not self._stopping.wait(delay):
            try:
                n = self._file_segments(self._left_from_last_run)
            except self.retryable as exc:
                delay = min(delay * 2, 30)
                log.error("journal: still cannot file what was received before the last stop (%s); retrying in "
                          "%.0f s", exc, delay)
                continue
            log.warning("journal: filed %d instance(s) received before the last stop", n)
            self._left_from_last_run = []
        self._replayed.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="journal", daemon=True)
        self._thread.start()
        if self._left_from_last_run:
            self._replayer = threading.Thread(target=self._replay_later, name="journal-replay", daemon=True)
            self._replayer.start()

    def flush(self) -> None:
        """Wait until everything appended so far is filed and indexed."""
        self._queue.join()

    def stop(self) -> None:
        """File what is queued, then stop."""
        self._stopping.set()
        if self._replayer is not None:
            self._replayer.join()
            self._replayer = None
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        with self._lock:
            self._close_current()

    # --- receiving ---------------------------------------------------------------------------
    def wait_filed(self, key: str, timeout: float | None = None) -> bool:
        """Wait until every instance appended under ``key`` is filed (readable in the store), and what
        the last run left too (its studies are not known until then)."""
        started = time.monotonic()
        if not self._replayed.wait(timeout):
            return False
        timeout = None if timeout is None else max(timeout - (time.monotonic() - started), 0)
        with self._filed:
            return self._filed.wait_for(lambda: not self._unfiled.get(key), timeout)

    def append(self, data: bytes, caller: str,
               check: Callable[[], tuple[str, object | None]] = lambda: ("", None)) -> object | None:
        """Durably record one instance and return the facts ``check`` found; raises OSError (e.g. disk
        full) with nothing half-written.

        ``check`` reads the instance while its record is flushed and returns (key, facts): the key (the
        study) lets `wait_filed` wait for just its instances; the facts are handed to ``file_instance``
        so it need not work them out again. When ``check`` raises, the record is voided and the
        exception propagates."""
        meta = json.dumps({"caller": caller}).encode()
        with self._lock:
            if self._fd is None:
                self._open_segment()
            seg_id, fd, start = self._current, self._fd, self._offset
            head = HEAD.pack(MAGIC, seg_id, len(meta), len(data), _crc(seg_id, meta, data))
            # The check runs on the helper thread while this one is in writev: the segment is opened
            # O_DSYNC, so the one call writes and flushes without the GIL. (Two calls, write then fdatasync,
            # would wait for the GIL between them, until the check is done.)
            checking = self._checker.submit(check)
            try:
                _write_all(fd, [head, meta, data])
            except OSError:
                wait([checking])
                self._take_back(start)
                raise
            self._offset = start + len(head) + len(meta) + len(data)
            refused = checking.exception()
            if refused is not None:
                os.pwrite(fd, VOID, start)  # should the crash lose it, replay refuses the instance again
            else:
                key, facts = checking.result()
                self._last_append = time.monotonic()
                self._segments[seg_id].appended += 1
                self._unfiled[key] = self._unfiled.get(key, 0) + 1
            if self._offset >= self.segment_bytes:
                self._close_current()
        if refused is not None:
            raise refused
        self._queue.put((seg_id, data, caller, key, facts))
        return facts

    def _take_back(self, start: int) -> None:
        os.ftruncate(self._fd, start)
        os.lseek(self._fd, start, os.SEEK_SET)

    def _open_segment(self) -> None:
        seg_id = self._next_id
        self._next_id += 1
        path = self.dir / f"seg-{seg_id:08d}.log"
        spare = self.dir / SPARE
        if spare.exists():
            spare.rename(path)  # written over from the start; see the module docstring
            self._fd = os.open(path, os.O_WRONLY | os.O_DSYNC)
        else:
            self._fd = os.open(path, os.O_WRONLY | os.O_DSYNC | os.O_CREAT | os.O_EXCL, 0o600)
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)  # the new segment's name must survive too
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._current, self._offset = seg_id, 0
        self._segments[seg_id] = _Segment(path)

    def _close_current(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._segments[self._current].closed = True
            self._drop_finished()

    def _drop_finished(self) -> None:
        for seg_id, seg in list(self._segments.items()):
            if seg.closed and seg.filed == seg.appended:
                self._let_go(seg.path)
                del self._segments[seg_id]

    def _let_go(self, path: Path) -> None:
        """A finished segment becomes the spare (one is enough; others are deleted)."""
        if (self.dir / SPARE).exists():
            path.unlink(missing_ok=True)
        else:
            path.rename(self.dir / SPARE)

    # --- filing ------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.task_done()
                return
            seg_id, data, caller, key, facts = item
            self._wait_for_a_pause()
            delay = 0.5
            while True:
                try:
                    self.file_instance(data, caller, facts)
                    self._unsynced[seg_id] = self._unsynced.get(seg_id, 0) + 1
                    break
                except self.retryable as exc:  # e.g. disk full: the journal still holds it; try again
                    log.error("cannot file a received instance yet (%s); retrying in %.0f s", exc, delay)
                    time.sleep(delay)
                    delay = min(delay * 2, 30)
                except Exception:  # a bug: keep the segment, the next start retries it
                    log.exception("cannot file a journalled instance; its journal segment is kept")
                    with self._lock:
                        self._segments[seg_id].appended += 1  # never reaches filed == appended
                    break
            with self._filed:
                self._unfiled[key] -= 1
                if not self._unfiled[key]:
                    del self._unfiled[key]
                self._filed.notify_all()
            if self._queue.empty() or sum(self._unsynced.values()) >= SYNC_BATCH:
                self._flush_filed()
            self._queue.task_done()

    def _wait_for_a_pause(self) -> None:
        while self._queue.qsize() < BACKLOG:
            quiet_for = time.monotonic() - self._last_append
            if quiet_for >= QUIET_SECONDS:
                return
            time.sleep(QUIET_SECONDS - quiet_for)

    def _flush_filed(self) -> None:
        """Make the filed copies durable, then let go of the journal segments they came from."""
        delay = 0.5
        while True:
            try:
                self.sync()
                break
            except OSError as exc:  # the segments stay until a flush succeeds
                log.error("cannot flush filed instances yet (%s); retrying in %.0f s", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 30)
        with self._lock:
            for seg_id, n in self._unsynced.items():
                self._segments[seg_id].filed += n
            self._unsynced.clear()
            if self._queue.empty() and self._current is not None:
                self._close_current()  # idle: the next instance starts a fresh segment
            else:
                self._drop_finished()
