"""QKD keys shorter than 128 bits are never used (RFC 9257 §6: an external PSK carries at least 128 bits).

A KME may hand out shorter keys (ETSI GS QKD 014 lets the caller choose the size; ours allows 64 bits). The
client never offers one; the server treats one like a key its KME refused: ``required`` →
``insufficient_security``, ``preferred`` → the classic hand-off; a rekey with one fails.
"""

from __future__ import annotations

import os

import pytest

from qkdtls.tls import extensions as ext
from qkdtls.tls.alerts import AlertDescription, HandshakeFailure, InsufficientSecurity, InvalidState
from qkdtls.tls.client import TLSClient
from qkdtls.tls.config import ClientConfig, QkdOffer, ServerConfig
from qkdtls.tls.events import HandOff, HandshakeComplete, NeedQkdKey, NeedRekeyKey
from qkdtls.tls.messages import ClientHello
from qkdtls.tls.qkd_secure import MIN_KEY_BYTES
from qkdtls.tls.server import State, TLSServer

KEY_ID = "3a1d2b44-08c5-4f0e-b8a7-6e5d4c3b2a19"
REKEY_ID = "9e8d7c6b-5a49-4382-9170-6f5e4d3c2b1a"


def _client(key: bytes, qkd: str = "preferred", profiles: tuple[str, ...] = ("secure",)) -> TLSClient:
    return TLSClient(ClientConfig(verify=False, qkd=qkd, qkd_profiles=profiles), "localhost",
                     QkdOffer(KEY_ID, key, 3))


@pytest.mark.parametrize("length", [1, 8, MIN_KEY_BYTES - 1])
@pytest.mark.parametrize("profiles", [("secure",), ("secure", "reference")])
def test_client_never_offers_a_short_key(length: int, profiles: tuple[str, ...]) -> None:
    client = _client(os.urandom(length), profiles=profiles)
    client.initiate()
    hello = ClientHello.decode(client.data_to_send()[9:])
    types = {e.type for e in hello.extensions}
    assert not types & {ext.ET.pre_shared_key, ext.ET.psk_key_exchange_modes, ext.ET.qkd_reference_request}
    assert not client.qkd_offered
    with pytest.raises(InvalidState, match="128 bits"):
        _client(os.urandom(length), qkd="required", profiles=profiles)


def test_client_offers_a_128_bit_key() -> None:
    client = _client(os.urandom(MIN_KEY_BYTES))
    client.initiate()
    hello = ClientHello.decode(client.data_to_send()[9:])
    assert hello.extensions[-1].type == ext.ET.pre_shared_key and client.qkd_offered


def _offered(key: bytes, qkd: str) -> tuple[TLSClient, TLSServer]:
    """A client that offered ``key`` (or, when it is too short to offer, a 128-bit key with the same ID:
    the server only learns the length from its KME), and a server asked for the key."""
    client = _client(key if len(key) >= MIN_KEY_BYTES else os.urandom(32), qkd="required")
    server = TLSServer(ServerConfig(qkd=qkd))
    client.initiate()
    server.receive_data(client.data_to_send())
    assert isinstance(server.next_event(), NeedQkdKey)
    return client, server


@pytest.mark.parametrize("length", [1, 8, MIN_KEY_BYTES - 1])
def test_server_refuses_a_short_key_under_required(length: int) -> None:
    _, server = _offered(os.urandom(length), "required")
    with pytest.raises(InsufficientSecurity):
        server.provide_qkd_key(os.urandom(length))
    assert server.data_to_send()[-2:] == bytes((2, AlertDescription.insufficient_security))


@pytest.mark.parametrize("length", [1, 8, MIN_KEY_BYTES - 1])
def test_server_hands_a_short_key_offer_to_openssl_under_preferred(length: int) -> None:
    _, server = _offered(os.urandom(length), "preferred")
    server.provide_qkd_key(os.urandom(length))
    event = server.next_event()
    assert isinstance(event, HandOff) and server.state is State.HANDED_OFF
    assert server.data_to_send() == b""


def test_128_bit_key_completes_the_secure_profile() -> None:
    key = os.urandom(MIN_KEY_BYTES)
    client, server = _offered(key, "required")
    server.provide_qkd_key(key)
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    assert isinstance(server.next_event(), HandshakeComplete)
    assert client.info is not None and client.info.profile == "secure"


def test_rekey_never_uses_a_short_key() -> None:
    key = os.urandom(32)
    client, server = _offered(key, "required")
    server.provide_qkd_key(key)
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    list(iter(server.next_event, None))
    with pytest.raises(InvalidState, match="128 bits"):
        client.rekey(QkdOffer(REKEY_ID, os.urandom(MIN_KEY_BYTES - 1), 3))
    client.rekey(QkdOffer(REKEY_ID, os.urandom(32), 3))
    server.receive_data(client.data_to_send())
    assert isinstance(server.next_event(), NeedRekeyKey)
    with pytest.raises(HandshakeFailure):
        server.provide_rekey_key(os.urandom(MIN_KEY_BYTES - 1))
