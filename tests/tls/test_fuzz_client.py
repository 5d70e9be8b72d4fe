"""The client state machine under random and mutated server flights: only TLSError, never a hang.

Real flights come from two servers run in memory: Python ``ssl`` (OpenSSL) over MemoryBIOs for a classic
certificate handshake, and our TLSServer for the secure QKD profile (PSK flight).
"""

from __future__ import annotations

import os
import ssl
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.peers.servers import ServerPki

from qkdtls.tls.alerts import TLSAlert, TLSError
from qkdtls.tls.client import ClientState, TLSClient
from qkdtls.tls.config import ClientConfig, QkdOffer, ServerConfig
from qkdtls.tls.events import HandshakeComplete, NeedQkdKey
from qkdtls.tls.server import TLSServer

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _classic_flight(pki: ServerPki) -> tuple[TLSClient, bytes]:
    client = TLSClient(ClientConfig(trust=pki.trust(), qkd="off"), "localhost")
    client.initiate()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ident = pki.servers["ec-p256"]
    ctx.load_cert_chain(ident.cert, ident.key)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = ctx.wrap_bio(incoming, outgoing, server_side=True)
    incoming.write(client.data_to_send())
    with pytest.raises(ssl.SSLWantReadError):
        server.do_handshake()
    return client, outgoing.read()


def _psk_flight(pki: ServerPki) -> tuple[TLSClient, bytes]:
    key, key_id = os.urandom(32), str(uuid.uuid4())
    client = TLSClient(ClientConfig(trust=pki.trust(), qkd="required"), "localhost", QkdOffer(key_id, key, 9))
    client.initiate()
    ident = pki.servers["ec-p256"]
    server = TLSServer(ServerConfig(certificate_chain=[ident.certificate()], private_key=ident.private_key(),
                                    qkd="required"))
    server.receive_data(client.data_to_send())
    while (event := server.next_event()) is not None:
        if isinstance(event, NeedQkdKey):
            server.provide_qkd_key(key)
    return client, server.data_to_send()


FLIGHTS = {"classic": _classic_flight, "psk": _psk_flight}


def _feed(client: TLSClient, data: bytes, chunk: int) -> None:
    """Feed in chunks; a TLS error must leave the alert queued and the connection unusable."""
    try:
        for start in range(0, len(data), chunk):
            client.receive_data(data[start : start + chunk])
            while client.next_event() is not None:
                pass
    except TLSAlert:
        assert client.state is ClientState.FAILED
        assert client.data_to_send()   # the alert
    except TLSError:
        pass


@pytest.mark.parametrize("kind", list(FLIGHTS))
def test_unmodified_flights_complete(server_pki: ServerPki, kind: str) -> None:
    client, flight = FLIGHTS[kind](server_pki)
    client.receive_data(flight)
    events = []
    while (event := client.next_event()) is not None:
        events.append(event)
    assert any(isinstance(e, HandshakeComplete) for e in events)


@pytest.mark.parametrize("kind", list(FLIGHTS))
@FUZZ
@given(
    position=st.integers(min_value=0, max_value=1 << 16),
    xor=st.integers(min_value=1, max_value=255),
    cut=st.integers(min_value=0, max_value=64),
    insert=st.binary(max_size=8),
    chunk=st.integers(min_value=1, max_value=4096),
)
def test_mutated_flights(server_pki: ServerPki, kind: str, position: int, xor: int, cut: int, insert: bytes,
                         chunk: int) -> None:
    client, flight = FLIGHTS[kind](server_pki)
    data = bytearray(flight)
    index = position % len(data)
    data[index] ^= xor
    data[index:index] = insert
    mutated = bytes(data[: len(data) - cut])
    # Some mutations are harmless (record-header versions are ignored, RFC 8446 §5.1); what matters is
    # that nothing but a TLSError escapes and every failure leaves its alert queued.
    _feed(client, mutated, chunk)


@FUZZ
@given(data=st.binary(max_size=2000), chunk=st.integers(min_value=1, max_value=512))
def test_random_server_bytes(data: bytes, chunk: int) -> None:
    client = TLSClient(ClientConfig(qkd="off"), "localhost")
    client.initiate()
    client.data_to_send()
    _feed(client, data, chunk)
    assert client.state is not ClientState.CONNECTED


@FUZZ
@given(record_type=st.sampled_from([20, 21, 22, 23]), body=st.binary(max_size=64))
def test_random_records_after_a_valid_server_hello(
    server_pki: ServerPki, record_type: int, body: bytes
) -> None:
    client, flight = _classic_flight(server_pki)
    server_hello_len = 5 + int.from_bytes(flight[3:5], "big")
    record = bytes([record_type, 3, 3]) + len(body).to_bytes(2, "big") + body
    _feed(client, flight[:server_hello_len] + record, 1 << 16)
    assert client.state is not ClientState.CONNECTED
