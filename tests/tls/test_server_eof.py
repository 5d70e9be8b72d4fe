"""The server answers a client that stops early at once, as OpenSSL does, and checks the ChallengeAck's
record version.

* a first flight cut short by the end of the stream (even an empty one): ``decode_error`` under
  ``required``; otherwise the bytes and the EOF go to OpenSSL, which answers ``decode_error`` itself;
* an EOF in the middle of a QKD handshake (the reference profile waiting for the ChallengeAck, the secure
  profile waiting for the client Finished): ``decode_error`` at once, not the adapter's deadline;
* the ChallengeAck must be a 0x50 record of version 0x0E00, as the fork sends it: anything else is
  ``decode_error`` (rustls' answer to a record version it does not accept).
"""

from __future__ import annotations

import os
import ssl

import pytest
from tests.peers.clients import PeerPki, server_ssl_context, tls_pki
from tests.peers.servers import ServerPki

from qkdtls.net.errors import QKDHandshakeError
from qkdtls.net.session import Session
from qkdtls.tls.alerts import AlertDescription, DecodeError
from qkdtls.tls.client import ClientState, TLSClient
from qkdtls.tls.config import ClientConfig, QkdOffer, ServerConfig
from qkdtls.tls.events import HandOff, NeedQkdKey
from qkdtls.tls.server import State, TLSServer

__all__ = ["tls_pki"]

KEY_ID = "5f0c3b52-3c1e-4a8e-8d5c-2b4f7a0e9c31"
DECODE_ERROR = bytes.fromhex("15030300020232")   # a plaintext fatal decode_error alert


def _hello(profiles: tuple[str, ...] = ("secure",), key: bytes = bytes(32)) -> tuple[TLSClient, bytes]:
    client = TLSClient(ClientConfig(verify=False, qkd="required", qkd_profiles=profiles), "localhost",
                       QkdOffer(KEY_ID, key, 7))
    client.initiate()
    return client, client.data_to_send()


def _server(pki: ServerPki | None = None, qkd: str = "required",
            profiles: tuple[str, ...] = ("secure",)) -> TLSServer:
    if pki is None:
        return TLSServer(ServerConfig(qkd=qkd, qkd_profiles=profiles))
    ident = pki.servers["ec-p256"]
    return TLSServer(ServerConfig(certificate_chain=[ident.certificate()], private_key=ident.private_key(),
                                  qkd=qkd, qkd_profiles=profiles))


CUTS = [0, 1, 4, 5, 9, 60, -1]


@pytest.mark.parametrize("cut", CUTS)
def test_truncated_first_flight_then_eof_is_decode_error_under_required(cut: int) -> None:
    _, hello = _hello()
    server = _server()
    if cut:   # b"" would be the EOF itself
        server.receive_data(hello[:cut])
    assert server.next_event() is None and server.data_to_send() == b""   # waits for more
    with pytest.raises(DecodeError):
        server.receive_data(b"")
    assert server.data_to_send() == DECODE_ERROR and server.state is State.FAILED


@pytest.mark.parametrize("cut", CUTS)
def test_truncated_first_flight_then_eof_goes_to_openssl(cut: int, tls_pki: PeerPki) -> None:
    """OpenSSL gets the bytes and the EOF together, and answers decode_error at once."""
    _, hello = _hello()
    server = _server(qkd="preferred")
    if cut:
        server.receive_data(hello[:cut])
    server.receive_data(b"")
    event = server.next_event()
    assert event == HandOff(hello[:cut], eof=True)
    session = Session(_server(qkd="preferred"), classic_context=server_ssl_context(tls_pki))
    if cut:
        session.receive_data(hello[:cut])
    with pytest.raises(QKDHandshakeError, match="UNEXPECTED_EOF"):
        session.receive_data(b"")
    assert session.data_to_send() == DECODE_ERROR


def test_eof_while_the_kme_is_asked_hands_off_with_the_eof(tls_pki: PeerPki) -> None:
    _, hello = _hello()
    session = Session(_server(qkd="preferred"), classic_context=server_ssl_context(tls_pki))
    session.receive_data(hello)
    session.receive_data(b"")
    assert isinstance(session.next_event(), NeedQkdKey)
    with pytest.raises(QKDHandshakeError):
        session.provide_qkd_key(None)   # refused: OpenSSL answers the hello, then sees the EOF
    out = session.data_to_send()
    assert out[:1] == b"\x16" and out[5] == 2   # OpenSSL's ServerHello went out, then its alert
    assert session.failed is not None


def _reference_started(pki: ServerPki) -> tuple[TLSClient, TLSServer]:
    key = os.urandom(32)
    client, hello = _hello(("reference",), key)
    server = _server(pki, profiles=("reference",))
    server.receive_data(hello)
    for event in iter(server.next_event, None):
        if isinstance(event, NeedQkdKey):
            server.provide_qkd_key(key)
    client.receive_data(server.data_to_send())   # the ServerHello with the challenge
    assert server.state is State.WAIT_CHALLENGE_ACK
    return client, server


def test_eof_while_waiting_for_the_challenge_ack_fails_at_once(server_pki: ServerPki) -> None:
    _client, server = _reference_started(server_pki)
    with pytest.raises(DecodeError):
        server.receive_data(b"")
    assert server.state is State.FAILED
    assert server.data_to_send()[:3] == b"\x15\x03\x03"   # the alert, in plaintext: no key was in use


def test_eof_while_waiting_for_the_client_finished_fails_at_once() -> None:
    key = os.urandom(32)
    _client, hello = _hello(key=key)
    server = _server()
    server.receive_data(hello)
    for event in iter(server.next_event, None):
        if isinstance(event, NeedQkdKey):
            server.provide_qkd_key(key)
    assert server.state is State.WAIT_FINISHED
    server.data_to_send()
    with pytest.raises(DecodeError):
        server.receive_data(b"")
    alert = server.data_to_send()
    assert alert[:1] == b"\x17" and server.state is State.FAILED   # under the handshake key


@pytest.mark.parametrize("version", [0x0303, 0x0301, 0x0E01, 0x0F00, 0x0000])
def test_challenge_ack_needs_version_0e00(server_pki: ServerPki, version: int) -> None:
    client, server = _reference_started(server_pki)
    ack = bytearray(client.data_to_send())
    assert ack[:3] == b"\x50\x0e\x00"
    ack[1:3] = version.to_bytes(2, "big")
    with pytest.raises(DecodeError):
        server.receive_data(bytes(ack))
    assert server.data_to_send()[-2:] == bytes((2, AlertDescription.decode_error))
    assert server.info is None


def test_challenge_ack_with_0e00_is_accepted(server_pki: ServerPki) -> None:
    client, server = _reference_started(server_pki)
    server.receive_data(client.data_to_send())
    assert server.state is State.CONNECTED
    client.receive_data(server.data_to_send())
    assert client.state is ClientState.CONNECTED


def test_session_turns_an_openssl_failure_after_a_refused_key_into_a_handshake_error(
    tls_pki: PeerPki,
) -> None:
    """A QKD hello OpenSSL cannot accept (no signature_algorithms): when the KME refuses the key, the
    hand-off fails inside provide_qkd_key. That is a QKDHandshakeError with OpenSSL's alert queued, never an
    ssl.SSLError escaping to the adapter."""
    from qkdtls.tls import extensions as ext
    from qkdtls.tls.messages import ClientHello
    from qkdtls.tls.records import HANDSHAKE, PlaintextProtection

    _, wire = _hello()
    hello = ClientHello.decode(wire[9:])
    hello.extensions = [e for e in hello.extensions if e.type != ext.ET.signature_algorithms]
    flight = PlaintextProtection().seal(HANDSHAKE, hello.to_bytes())
    session = Session(_server(qkd="preferred"), classic_context=server_ssl_context(tls_pki))
    session.receive_data(flight)
    assert isinstance(session.next_event(), NeedQkdKey)
    with pytest.raises(QKDHandshakeError) as failure:
        session.provide_qkd_key(None)
    assert not isinstance(failure.value, ssl.SSLError)
    assert "MISSING_SIGALGS" in str(failure.value)
    assert session.failed is failure.value
    assert session.data_to_send()[-2:] == bytes((2, AlertDescription.missing_extension))
