"""Coverage-guided fuzzing (atheris) of the DICOM upper layer: whatever bytes a peer sends, from the
A-ASSOCIATE-RQ on, the acceptor ends the association cleanly (released, aborted, rejected, timed out)
and never with an internal error, and acknowledges only data sets that arrived whole.

Run: python tests/fuzz/fuzz_upper_layer.py [libFuzzer options] [corpus folders]
(`tests/test_fuzz.py` runs it in `make test` with a small budget, seeded from `seeds.py`)."""
from __future__ import annotations

import logging
import sys

import atheris

with atheris.instrument_imports():
    from pynetdicom.presentation import build_context
    from pynetdicom.sop_class import CTImageStorage, Verification

    from lungnode.dicom_node.receiver import AcceptorPolicy, StoreStatus, _Association

POLICY = AcceptorPolicy(contexts=[build_context(CTImageStorage), build_context(Verification)],
                        called_ae_titles=frozenset({"LUNGNODE"}), request_timeout=5, message_timeout=5)


class Wire:
    """The acceptor's socket: reads come from the fuzzer's bytes, writes go nowhere."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def settimeout(self, _: float) -> None:
        pass

    def recv_into(self, view, n: int) -> int:
        k = min(n, len(self.data) - self.pos)
        view[:k] = self.data[self.pos:self.pos + k]
        self.pos += k
        return k

    def sendall(self, _: bytes) -> None:
        pass


def on_store(request) -> StoreStatus:
    # The acceptor hands over only whole data sets: the file meta it wrote, then what the PDVs carried.
    if not request.file_bytes.startswith(b"\0" * 128 + b"DICM"):
        raise AssertionError("a store without its file meta")
    return StoreStatus(0x0000)


def test_one_input(data: bytes) -> None:
    record = _Association(Wire(data), POLICY, on_store, None, peer_ip="fuzz").run()
    if record.outcome.startswith("internal error"):
        raise AssertionError(record.outcome)


if __name__ == "__main__":
    logging.disable(logging.CRITICAL)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
