"""Property tests of the server state machine: whatever arrives, the server answers with a TLS alert (never
another exception, never internal_error), hands off, or waits for more input."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkdtls.tls.alerts import AlertDescription, PeerAlert, TLSAlert
from qkdtls.tls.client import TLSClient
from qkdtls.tls.config import ClientConfig, QkdOffer, ServerConfig
from qkdtls.tls.events import HandOff, HandshakeComplete, NeedQkdKey
from qkdtls.tls.server import TLSServer

KEY_ID = "7b848ade-8cff-3d54-a9b8-53a215e6ee77"
KEY = bytes(range(32))
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def client_hello(profiles: tuple[str, ...] = ("secure",)) -> bytes:
    client = TLSClient(ClientConfig(trust=[]), "localhost", QkdOffer(KEY_ID, KEY, 3, profiles))
    client.initiate()
    return client.data_to_send()


SECURE_HELLO = client_hello()
REFERENCE_HELLO = client_hello(("reference",))


def drive(server: TLSServer, chunks: list[bytes]) -> list[object]:
    """Feed chunks, answer NeedQkdKey with KEY; returns the events, or the alert that ended it."""
    seen: list[object] = []
    try:
        for chunk in chunks:
            server.receive_data(chunk)
            while (event := server.next_event()) is not None:
                seen.append(event)
                if isinstance(event, NeedQkdKey):
                    server.provide_qkd_key(KEY)
                if isinstance(event, HandOff):
                    return seen
    except TLSAlert as alert:
        assert alert.description != AlertDescription.internal_error, alert
        out = server.data_to_send()
        assert out.endswith(bytes((2, alert.description))) or len(out) >= 7  # an alert record was queued
        seen.append(alert)
    except PeerAlert as alert:
        seen.append(alert)
    return seen


@FUZZ
@given(st.binary(max_size=600), st.sampled_from(["required", "preferred"]))
def test_random_first_flight(data: bytes, policy: str) -> None:
    server = TLSServer(ServerConfig(qkd=policy, qkd_profiles=("secure", "reference")))
    seen = drive(server, [data, b""])
    if policy == "preferred":
        assert not any(isinstance(e, TLSAlert) and e.description == AlertDescription.insufficient_security
                       for e in seen)


def _mutate(data: bytes, position: int, value: int, cut: int) -> bytes:
    position %= len(data)
    mutated = data[:position] + bytes([value]) + data[position + 1 :]
    return mutated[: len(mutated) - cut]


@FUZZ
@given(
    st.sampled_from([SECURE_HELLO, REFERENCE_HELLO]),
    st.integers(min_value=0),
    st.integers(0, 255),
    st.integers(0, 3),
    st.sampled_from(["required", "preferred"]),
)
def test_mutated_client_hello(hello: bytes, position: int, value: int, cut: int, policy: str) -> None:
    server = TLSServer(ServerConfig(qkd=policy, qkd_profiles=("secure", "reference")))
    # Without a certificate the reference profile refuses with handshake_failure: still an alert.
    drive(server, [_mutate(hello, position, value, cut)])


@FUZZ
@given(st.data())
def test_split_delivery_is_equivalent(data: st.DataObject) -> None:
    cuts = sorted(data.draw(st.lists(st.integers(1, len(SECURE_HELLO) - 1), max_size=6, unique=True)))
    pieces = [SECURE_HELLO[a:b] for a, b in zip([0, *cuts], [*cuts, len(SECURE_HELLO)], strict=True)]
    server = TLSServer(ServerConfig(qkd="required"))
    seen = drive(server, pieces)
    assert [type(e) for e in seen] == [NeedQkdKey]
    assert server.data_to_send()[:1] == b"\x16"  # the ServerHello


def _connected() -> tuple[TLSClient, TLSServer]:
    client = TLSClient(ClientConfig(trust=[]), "localhost", QkdOffer(KEY_ID, KEY, 3))
    server = TLSServer(ServerConfig(qkd="required"))
    client.initiate()
    drive(server, [client.data_to_send()])
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    assert isinstance(server.next_event(), HandshakeComplete)
    return client, server


@FUZZ
@given(st.lists(st.binary(max_size=80), max_size=4), st.booleans())
def test_garbage_after_the_handshake(chunks: list[bytes], as_record: bool) -> None:
    _client, server = _connected()
    if as_record:
        chunks = [bytes([23, 3, 3]) + len(c).to_bytes(2, "big") + c for c in chunks]
    drive(server, chunks)


@FUZZ
@given(st.integers(min_value=0), st.integers(1, 255))
def test_tampered_application_record(position: int, flip: int) -> None:
    client, server = _connected()
    client.send_data(os.urandom(40))
    record = bytearray(client.data_to_send())
    record[5 + position % (len(record) - 5)] ^= flip
    seen = drive(server, [bytes(record)])
    assert isinstance(seen[-1], TLSAlert) and seen[-1].description == AlertDescription.bad_record_mac


def test_first_flight_is_bounded() -> None:
    # A ClientHello claiming 2^20 bytes: refused (required) or handed to OpenSSL (preferred) at once,
    # instead of buffering until the claimed length arrived.
    header = bytes.fromhex("1603034000") + bytes.fromhex("01100000")
    record = header + bytes(0x4000 - 4)
    strict = TLSServer(ServerConfig(qkd="required"))
    seen = drive(strict, [record])
    assert isinstance(seen[-1], TLSAlert) and seen[-1].description == AlertDescription.decode_error
    lenient = TLSServer(ServerConfig(qkd="preferred"))
    seen = drive(lenient, [record])
    assert isinstance(seen[-1], HandOff) and seen[-1].initial_data == record
