"""Key announcement (0xFEA9 / QkdKeyAnnounce 0xFD) between TLSClient and TLSServer in memory.

Negotiation both ways, the event the server reports, the alerts for malformed, unsolicited and repeated
announcements, and the (key, nonce) pairs of a connection that announced keys.
"""

from __future__ import annotations

import os
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.peers.clients import tls_pki
from tests.tls.test_server_inmemory import Pair, Pki, exchange, make_pair, pki_objects, seals

from qkdtls.tls import extensions as ext
from qkdtls.tls.alerts import AlertDescription, DecodeError, InvalidState, PeerAlert, TLSAlert
from qkdtls.tls.config import QkdOffer
from qkdtls.tls.events import KeysAnnounced
from qkdtls.tls.qkd_secure import (
    EXT_QKD_KEY_ANNOUNCE,
    HANDSHAKE_QKD_KEY_ANNOUNCE,
    MAX_ANNOUNCED_KEYS,
    QkdKeyAnnounce,
)
from qkdtls.tls.records import encode_handshake

__all__ = ["pki_objects", "seals", "tls_pki"]

MASTER = 5
IDS = tuple(str(uuid.uuid4()) for _ in range(3))
ANNOUNCING = {"client_kw": {"key_announce": True}, "server_kw": {"accept_key_announcements": True}}


def _announced(pair: Pair) -> list[KeysAnnounced]:
    # Events queued before a failure stay in the engine (the pump stops draining on the error).
    while (event := pair.server.next_event()) is not None:
        pair.run.server_events.append(event)
    return [e for e in pair.run.server_events if isinstance(e, KeysAnnounced)]


def _force_announcement(pair: Pair, body: bytes) -> None:
    """Seal a 0xFD message whatever was negotiated (what a misbehaving client could send)."""
    pair.client._send_post_handshake(encode_handshake(HANDSHAKE_QKD_KEY_ANNOUNCE, body))


def test_wire_format_round_trip() -> None:
    message = QkdKeyAnnounce(IDS)
    body = message.encode()
    assert body[:2] == (len(body) - 2).to_bytes(2, "big")
    assert body[2] == 36 and body[3:39] == IDS[0].encode("ascii")
    assert QkdKeyAnnounce.decode(body) == message
    assert EXT_QKD_KEY_ANNOUNCE == ext.ExtensionType.qkd_key_announce == 0xFEA9


def test_announcement_negotiated_and_reported(pki_objects: Pki) -> None:
    pair = make_pair(pki_objects, **ANNOUNCING)  # type: ignore[arg-type]
    pair.pump()
    assert pair.run.info("client").mode == "qkd"
    assert pair.client.announce_negotiated
    pair.client.announce_keys(list(IDS))
    assert not pair.client.announce_negotiated  # one announcement per connection
    exchange(pair)
    assert [(e.master_sae_id, e.key_ids) for e in _announced(pair)] == [(MASTER, IDS)]
    with pytest.raises(InvalidState):
        pair.client.announce_keys([str(uuid.uuid4())])


@pytest.mark.parametrize(
    ("client_on", "server_on"),
    [(True, False), (False, True), (False, False)],
    ids=["server-off", "client-off", "off"],
)
def test_not_negotiated_unless_both_opt_in(pki_objects: Pki, client_on: bool, server_on: bool) -> None:
    pair = make_pair(
        pki_objects,
        client_kw={"key_announce": client_on},
        server_kw={"accept_key_announcements": server_on},
    )
    pair.pump()
    assert pair.run.info("client").mode == "qkd"
    assert not pair.client.announce_negotiated
    with pytest.raises(InvalidState):
        pair.client.announce_keys(list(IDS))
    exchange(pair)


def test_classic_connection_never_negotiates(pki_objects: Pki) -> None:
    pair = make_pair(pki_objects, offer=False, **ANNOUNCING)  # type: ignore[arg-type]
    pair.pump()
    assert pair.run.info("client").mode == "classic"
    assert not pair.client.announce_negotiated


def test_unsolicited_announcement_is_unexpected_message(pki_objects: Pki) -> None:
    pair = make_pair(pki_objects, client_kw={"key_announce": True})  # the server does not accept them
    pair.pump()
    _force_announcement(pair, QkdKeyAnnounce(IDS).encode())
    pair.pump()
    assert isinstance(pair.run.server_error, TLSAlert)
    assert pair.run.server_error.description == AlertDescription.unexpected_message
    assert isinstance(pair.run.client_error, PeerAlert)
    assert pair.run.client_error.description == AlertDescription.unexpected_message
    assert not _announced(pair)


def test_second_announcement_is_unexpected_message(pki_objects: Pki) -> None:
    pair = make_pair(pki_objects, **ANNOUNCING)  # type: ignore[arg-type]
    pair.pump()
    pair.client.announce_keys(list(IDS[:1]))
    _force_announcement(pair, QkdKeyAnnounce(IDS[1:]).encode())
    pair.pump()
    assert isinstance(pair.run.server_error, TLSAlert)
    assert pair.run.server_error.description == AlertDescription.unexpected_message
    assert len(_announced(pair)) == 1


def _vector(*items: bytes) -> bytes:
    inner = b"".join(len(i).to_bytes(1, "big") + i for i in items)
    return len(inner).to_bytes(2, "big") + inner


_UUID = IDS[0].encode("ascii")
MALFORMED = {
    "empty body": b"",
    "empty vector": b"\x00\x00",
    "short length": b"\x00",
    "vector longer than body": b"\x00\x30" + _UUID,
    "trailing byte": _vector(_UUID) + b"\x00",
    "empty key ID": _vector(b""),
    "not ASCII": _vector(b"\xff" * 36),
    "upper-case UUID": _vector(IDS[0].upper().encode("ascii")),
    "not a UUID": _vector(b"x" * 36),
    "duplicate": _vector(_UUID, _UUID),
    "17 key IDs": _vector(*(str(uuid.uuid4()).encode("ascii") for _ in range(MAX_ANNOUNCED_KEYS + 1))),
    "item overruns vector": b"\x00\x05\x24abcd",
}


@pytest.mark.parametrize("body", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_announcement_is_decode_error(pki_objects: Pki, body: bytes) -> None:
    pair = make_pair(pki_objects, **ANNOUNCING)  # type: ignore[arg-type]
    pair.pump()
    _force_announcement(pair, body)
    pair.pump()
    assert isinstance(pair.run.server_error, TLSAlert)
    assert pair.run.server_error.description == AlertDescription.decode_error
    assert isinstance(pair.run.client_error, PeerAlert)
    assert pair.run.client_error.description == AlertDescription.decode_error
    assert not _announced(pair)


def test_announcement_from_the_server_is_unexpected_message(pki_objects: Pki) -> None:
    pair = make_pair(pki_objects, **ANNOUNCING)  # type: ignore[arg-type]
    pair.pump()
    raw = encode_handshake(HANDSHAKE_QKD_KEY_ANNOUNCE, QkdKeyAnnounce(IDS).encode())
    pair.server._out += pair.server._records.seal(22, raw)
    pair.pump()
    assert isinstance(pair.run.client_error, TLSAlert)
    assert pair.run.client_error.description == AlertDescription.unexpected_message


def test_client_refuses_an_echo_it_did_not_offer(pki_objects: Pki) -> None:
    """A server echoing 0xFEA9 to a client that did not offer it: unsupported_extension (RFC 8446 §4.2)."""
    pair = make_pair(pki_objects, server_kw={"accept_key_announcements": True})
    send_flight = pair.server._send_secure_flight

    def echo_anyway(*args):  # type: ignore[no-untyped-def]
        pair.server._announce = True  # a server that ignores what the ClientHello offered
        send_flight(*args)

    pair.server._send_secure_flight = echo_anyway  # type: ignore[method-assign]
    pair.pump()
    assert isinstance(pair.run.client_error, TLSAlert)
    assert pair.run.client_error.description == AlertDescription.unsupported_extension


def test_announcing_connection_never_repeats_a_key_nonce_pair(
    pki_objects: Pki, seals: list[tuple[str, bytes, bytes]]
) -> None:
    pair = make_pair(  # with an HRR
        pki_objects,
        server_kw={"groups": ("secp256r1",), "accept_key_announcements": True},
        client_kw={"key_announce": True},
    )
    pair.pump()
    pair.client.announce_keys(list(IDS))
    exchange(pair, b"after announcement")
    pair.client.update_key()
    new_key = os.urandom(32)
    rekey_id = str(uuid.uuid4())
    pair.kme.keys[rekey_id] = new_key
    pair.client.rekey(QkdOffer(rekey_id, new_key, MASTER))
    exchange(pair, b"after rekey")
    assert _announced(pair)
    pairs = [(key, nonce) for _, key, nonce in seals]
    assert len(pairs) > 10
    assert len(set(pairs)) == len(pairs)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=700))
def test_decoder_is_total(body: bytes) -> None:
    try:
        message = QkdKeyAnnounce.decode(body)
    except DecodeError:
        return
    assert message.encode() == body
