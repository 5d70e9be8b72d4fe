"""The record layer's bulk paths: batches sealed record by record, records framed in place from lent bytes."""

from __future__ import annotations

import os

import pytest

from qkdtls.tls.alerts import BadRecordMac, RecordOverflow
from qkdtls.tls.records import (
    APPLICATION_DATA,
    HANDSHAKE,
    MAX_PLAINTEXT,
    AeadProtection,
    Outgoing,
    RecordLayer,
    record_header,
)
from qkdtls.tls.suites import CipherSuite

SUITE = CipherSuite.TLS_AES_256_GCM_SHA384


def _pair(suite: CipherSuite = SUITE) -> tuple[RecordLayer, RecordLayer]:
    key = os.urandom(16 if suite == CipherSuite.TLS_AES_128_GCM_SHA256 else 32)
    iv = os.urandom(12)
    sender, receiver = RecordLayer(), RecordLayer()
    sender.write = AeadProtection(suite, key, iv)
    receiver.read = AeadProtection(suite, key, iv)
    return sender, receiver


def _drain(layer: RecordLayer) -> list[tuple[int, bytes]]:
    """Every record available now: the bulk run first, then the general path, as the engines do."""
    out: list[tuple[int, bytes]] = []
    for _ in range(10_000):  # bounded: each pass consumes at least one record or stops
        out += [(APPLICATION_DATA, bytes(p)) for p in layer.application_data_run()]
        record = layer.next_record()
        if record is None:
            return out
        out.append((record[0], bytes(record[1])))
    raise AssertionError("record loop did not end")


@pytest.mark.parametrize("suite", list(CipherSuite))
def test_batch_is_sealed_record_by_record_with_consecutive_nonces(suite: CipherSuite) -> None:
    sender, receiver = _pair(suite)
    data = os.urandom(3 * MAX_PLAINTEXT + 77)
    records = sender.seal_each(APPLICATION_DATA, memoryview(data))
    assert [len(r) for r in records] == [MAX_PLAINTEXT + 22] * 3 + [77 + 22]
    assert sender.write.sequence == 4  # type: ignore[attr-defined]
    with receiver.borrowing(b"".join(records)):
        got = _drain(receiver)
    assert b"".join(p for _, p in got) == data and len(got) == 4


def test_lent_bytes_may_be_reused_after_the_loan() -> None:
    """A record split across reads is copied when the loan ends, so the reader can refill its buffer."""
    sender, receiver = _pair()
    data = os.urandom(2 * MAX_PLAINTEXT + 5)
    wire = sender.seal(APPLICATION_DATA, data)
    buffer = bytearray(7000)  # the reader's reusable buffer: cuts inside headers and bodies
    got = b""
    for start in range(0, len(wire), len(buffer)):
        piece = wire[start : start + len(buffer)]
        buffer[: len(piece)] = piece
        with receiver.borrowing(memoryview(buffer)[: len(piece)]):
            got += b"".join(p for _, p in _drain(receiver))
        buffer[:] = bytes(len(buffer))  # the next read overwrites everything
    assert got == data and receiver.buffered == 0


def test_every_cut_point_of_a_two_record_stream() -> None:
    key, iv = os.urandom(32), os.urandom(12)
    sender = RecordLayer()
    sender.write = AeadProtection(SUITE, key, iv)
    wire = sender.seal(APPLICATION_DATA, b"first") + sender.seal(HANDSHAKE, b"\x18\x00\x00\x01\x00")
    for cut in range(len(wire) + 1):
        receiver = RecordLayer()
        receiver.read = AeadProtection(SUITE, key, iv)
        got = []
        for part in (wire[:cut], wire[cut:]):
            with receiver.borrowing(part):
                got += _drain(receiver)
        assert got == [(APPLICATION_DATA, b"first"), (HANDSHAKE, b"\x18\x00\x00\x01\x00")], cut


def test_run_stops_at_a_record_of_another_type_and_keeps_it_for_next_record() -> None:
    sender, receiver = _pair()
    wire = b"".join(
        [
            sender.seal(APPLICATION_DATA, b"a"),
            sender.seal(APPLICATION_DATA, b"b"),
            sender.seal(HANDSHAKE, b"\x18\x00\x00\x01\x00"),  # e.g. a KeyUpdate: later keys may change
            sender.seal(APPLICATION_DATA, b"c"),
        ]
    )
    with receiver.borrowing(wire):
        assert [bytes(p) for p in receiver.application_data_run()] == [b"a", b"b"]
        assert receiver.next_record() == (HANDSHAKE, b"\x18\x00\x00\x01\x00")
        # Not decrypted ahead: the record after the handshake message is still undecrypted wire bytes.
        assert receiver.read.sequence == 3  # type: ignore[attr-defined]
        assert [bytes(p) for p in receiver.application_data_run()] == [b"c"]


def test_padded_and_empty_records_in_a_run() -> None:
    key, iv = os.urandom(32), os.urandom(12)
    sealer = AeadProtection(SUITE, key, iv)
    receiver = RecordLayer()
    receiver.read = AeadProtection(SUITE, key, iv)
    records = []
    for inner in (b"data" + bytes([APPLICATION_DATA]) + bytes(9), bytes([APPLICATION_DATA]), b"x\x17"):
        header = record_header(APPLICATION_DATA, 0x0303, len(inner) + 16)
        records.append(header + sealer._aead.encrypt(sealer._next_nonce(), inner, header))
    with receiver.borrowing(b"".join(records)):
        assert [bytes(p) for p in receiver.application_data_run()] == [b"data", b"", b"x"]


def test_tampering_inside_a_run_is_bad_record_mac() -> None:
    sender, receiver = _pair()
    wire = bytearray(sender.seal(APPLICATION_DATA, b"one") + sender.seal(APPLICATION_DATA, b"two"))
    wire[-1] ^= 1
    with receiver.borrowing(wire), pytest.raises(BadRecordMac):
        _drain(receiver)


def test_oversized_record_in_lent_bytes_is_record_overflow() -> None:
    _, receiver = _pair()
    wire = record_header(APPLICATION_DATA, 0x0303, MAX_PLAINTEXT + 257) + bytes(MAX_PLAINTEXT + 257)
    with receiver.borrowing(wire), pytest.raises(RecordOverflow):
        _drain(receiver)


def test_outgoing_hands_over_buffers_without_joining() -> None:
    out = Outgoing()
    first, second = bytearray(b"abc"), b"def"
    out += first
    out += b""
    out.extend([second])
    assert out
    parts = out.take()
    assert parts[0] is first and parts[1] is second and not out
    out += memoryview(b"gh")
    assert out.take_joined() == b"gh" and not out
