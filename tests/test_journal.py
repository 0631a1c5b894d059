"""The write-ahead journal: what was acknowledged is filed, even after a crash; torn tails are not."""
from __future__ import annotations

import errno
import os

import pytest

from lungnode.dicom_node.journal import IngestJournal, read_records


def test_records_left_by_a_crash_are_filed_at_the_next_start(tmp_path):
    filed: list[tuple[bytes, str]] = []
    crashed = IngestJournal(tmp_path, lambda d, c, f: None)
    for i in range(5):
        crashed.append(bytes([i]) * 1000, f"AE{i}")  # acknowledged, never filed: the process died
    segment = next(tmp_path.glob("seg-*.log"))
    with open(segment, "ab") as f:
        f.write(b"LNJ1\x10\x00")  # the start of a record whose write the crash cut short
    restarted = IngestJournal(tmp_path, lambda d, c, f: filed.append((d, c)))
    assert restarted.replay() == 5
    assert filed == [(bytes([i]) * 1000, f"AE{i}") for i in range(5)]
    assert list(tmp_path.glob("seg-*")) == []


def test_background_filing_empties_the_journal(tmp_path):
    filed = []
    journal = IngestJournal(tmp_path, lambda d, c, f: filed.append(d))
    journal.start()
    for i in range(20):
        journal.append(os.urandom(10_000), "PACS")
    journal.flush()
    journal.stop()
    assert len(filed) == 20 and list(tmp_path.glob("seg-*")) == []


def test_failed_append_leaves_no_partial_record(tmp_path, monkeypatch):
    journal = IngestJournal(tmp_path, lambda d, c, f: None)
    journal.append(b"first", "PACS")

    real_write, calls = os.write, []

    def fills_the_disk(fd, views):  # the first 100 bytes go in, then the disk is full
        calls.append(fd)
        if len(calls) == 1:
            return real_write(fd, bytes(views[0][:100]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "writev", fills_the_disk)
    with pytest.raises(OSError):
        journal.append(b"x" * 5000, "PACS")
    monkeypatch.undo()
    journal.append(b"third", "PACS")
    records = list(read_records(next(tmp_path.glob("seg-*.log"))))
    assert [d for d, _ in records] == [b"first", b"third"]


def test_corrupt_record_stops_reading(tmp_path):
    journal = IngestJournal(tmp_path, lambda d, c, f: None)
    journal.append(b"a" * 100, "PACS")
    journal.append(b"b" * 100, "PACS")
    segment = next(tmp_path.glob("seg-*.log"))
    raw = bytearray(segment.read_bytes())
    raw[-10] ^= 0xFF  # a flipped bit in the second record
    segment.write_bytes(bytes(raw))
    assert [d for d, _ in read_records(segment)] == [b"a" * 100]


def test_segments_are_kept_until_the_filed_copies_are_flushed(tmp_path):
    import time

    flushes: list[bool] = []
    failing = [True]

    def sync():
        flushes.append(failing[0])
        if failing[0]:
            raise OSError(errno.EIO, "write-back error")

    journal = IngestJournal(tmp_path, lambda d, c, f: None, sync=sync)
    journal.start()
    journal.append(b"x" * 100, "PACS")
    deadline = time.monotonic() + 10
    while not flushes and time.monotonic() < deadline:
        time.sleep(0.05)
    assert flushes == [True] and list(tmp_path.glob("seg-*.log"))  # filed, not yet durable: kept
    failing[0] = False
    journal.flush()
    journal.stop()
    assert flushes[-1] is False and list(tmp_path.glob("seg-*")) == []


def test_a_reused_segment_never_replays_what_its_earlier_use_left(tmp_path):
    first = IngestJournal(tmp_path, lambda d, c, f: None, segment_bytes=10_000)
    first.start()
    for i in range(3):
        first.append(bytes([i]) * 5000, "PACS")
    first.flush()
    first.stop()
    assert list(tmp_path.glob("seg-*")) == [] and (tmp_path / "spare.log").stat().st_size > 10_000

    crashed = IngestJournal(tmp_path, lambda d, c, f: None, segment_bytes=10_000)
    crashed.append(b"new" * 10, "MODALITY")  # written over the spare's first record, then the process dies
    (segment,) = tmp_path.glob("seg-*.log")
    assert segment.stat().st_size > 10_000  # the old records are still in the file after the new one

    filed = []
    assert IngestJournal(tmp_path, lambda d, c, f: filed.append((d, c))).replay() == 1
    assert filed == [(b"new" * 10, "MODALITY")]


@pytest.mark.parametrize("magic", [b"LNJ1", b"LNJ2"])
def test_a_journal_left_by_an_earlier_format_is_still_filed(tmp_path, magic):
    """A node upgraded after a crash replays what the old version journalled (LNJ1: no segment number;
    LNJ2: zlib's CRC-32 where LNJ3 has CRC-32C)."""
    import json
    import struct
    import zlib

    records = [(b"x" * 300, "PACS"), (b"y" * 200, "CT1")]
    with open(tmp_path / "seg-00000007.log", "wb") as f:
        for data, caller in records:
            meta = json.dumps({"caller": caller}).encode()
            if magic == b"LNJ1":
                f.write(struct.pack("<4sIQI", magic, len(meta), len(data), zlib.crc32(data, zlib.crc32(meta))))
            else:
                crc = zlib.crc32(data, zlib.crc32(meta, zlib.crc32(struct.pack("<I", 7))))
                f.write(struct.pack("<4sIIQI", magic, 7, len(meta), len(data), crc))
            f.write(meta + data)
    filed = []
    assert IngestJournal(tmp_path, lambda d, c, f: filed.append((d, c))).replay() == 2
    assert filed == records


def test_a_short_write_goes_on_where_it_stopped(tmp_path, monkeypatch):
    """writev may write less than asked (a nearly full disk, a signal): the record must still be whole."""
    real_write = os.write

    def writev_seven_bytes(fd, views):
        return real_write(fd, bytes(views[0][:7]))

    journal = IngestJournal(tmp_path, lambda d, c, f: None)
    monkeypatch.setattr(os, "writev", writev_seven_bytes)
    journal.append(b"0123456789" * 5, "PACS")
    journal.append(b"second", "CT1")
    monkeypatch.undo()
    records = list(read_records(next(tmp_path.glob("seg-*.log"))))
    assert records == [(b"0123456789" * 5, "PACS"), (b"second", "CT1")]


def test_a_record_whose_check_fails_is_voided_and_never_filed(tmp_path):
    """The record is written (and flushed) while the instance is checked; a refused one must not come back."""
    class Refused(Exception):
        pass

    def refuse():
        raise Refused("no pixel data")

    filed = []
    journal = IngestJournal(tmp_path, lambda d, c, f: filed.append(d))
    journal.start()
    assert journal.append(b"good-1", "PACS", check=lambda: ("study", "facts")) == "facts"
    with pytest.raises(Refused):
        journal.append(b"refused", "PACS", check=refuse)
    journal.append(b"good-2", "PACS")
    assert [d for d, _ in read_records(next(tmp_path.glob("seg-*.log")))] == [b"good-1", b"good-2"]
    journal.flush()
    assert filed == [b"good-1", b"good-2"]
    assert journal.wait_filed("study", timeout=5)
    journal.stop()
    assert IngestJournal(tmp_path, lambda d, c, f: filed.append(d)).replay() == 0  # and the segment was let go
