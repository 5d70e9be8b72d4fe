"""Client state-machine rules checked without sockets: API misuse, ServerHello checks, half-close, keylog."""

from __future__ import annotations

import os
import uuid

import pytest
from tests.peers.servers import ServerPki

from qkdtls.tls import extensions as ext
from qkdtls.tls.alerts import (
    IllegalParameter,
    InvalidState,
    MissingExtension,
    ProtocolVersion,
    TLSAlert,
    UnexpectedMessage,
    UnsupportedExtension,
)
from qkdtls.tls.client import ClientState, TLSClient
from qkdtls.tls.config import ClientConfig, QkdOffer, ServerConfig
from qkdtls.tls.events import ApplicationData, ConnectionClosed, HandshakeComplete, NeedQkdKey
from qkdtls.tls.messages import HRR_RANDOM, ClientHello, ServerHello
from qkdtls.tls.records import HANDSHAKE, RecordLayer
from qkdtls.tls.server import TLSServer


def _started(**kwargs) -> tuple[TLSClient, ClientHello]:  # type: ignore[no-untyped-def]
    client = TLSClient(ClientConfig(qkd="off", **kwargs), "localhost")
    client.initiate()
    wire = client.data_to_send()
    return client, ClientHello.decode(wire[9:])


def _server_hello(hello: ClientHello, **changes) -> bytes:  # type: ignore[no-untyped-def]
    share = ext.decode_key_share_client(ext.find(hello.extensions, ext.ET.key_share) or b"")[0]
    extensions = changes.pop("extensions", [
        ext.Extension(ext.ET.supported_versions, ext.encode_supported_versions_server(0x0304)),
        ext.Extension(ext.ET.key_share, ext.encode_key_share_server(share[0], os.urandom(32))),
    ])
    fields = {"random": os.urandom(32), "legacy_session_id_echo": hello.legacy_session_id,
              "cipher_suite": 0x1301, "extensions": extensions, **changes}
    return RecordLayer().seal(HANDSHAKE, ServerHello(**fields).to_bytes())


def test_api_misuse() -> None:
    client = TLSClient(ClientConfig(qkd="off"), "localhost")
    with pytest.raises(InvalidState):
        client.send_data(b"x")
    client.initiate()
    with pytest.raises(InvalidState):
        client.initiate()
    with pytest.raises(InvalidState):
        client.update_key()


def test_client_hello_shape() -> None:
    _, hello = _started(alpn_protocols=("h2",))
    types = [e.type for e in hello.extensions]
    assert types[0] == ext.ET.supported_versions and ext.ET.pre_shared_key not in types
    assert len(hello.legacy_session_id) == 32
    assert ext.decode_server_name(ext.find(hello.extensions, ext.ET.server_name) or b"") == "localhost"


def test_sni_omitted_for_ip_address() -> None:
    client = TLSClient(ClientConfig(qkd="off"), "127.0.0.1")
    client.initiate()
    hello = ClientHello.decode(client.data_to_send()[9:])
    assert ext.find(hello.extensions, ext.ET.server_name) is None


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"extensions": []}, ProtocolVersion),
        ({"legacy_session_id_echo": b"\x00" * 32}, IllegalParameter),
        ({"cipher_suite": 0x00FF}, IllegalParameter),
        ({"legacy_compression_method": 1}, IllegalParameter),
        ({"random": os.urandom(24) + bytes.fromhex("444f574e47524401"), "extensions": []}, IllegalParameter),
        ({"extensions": [ext.Extension(ext.ET.supported_versions, b"\x03\x03")]}, IllegalParameter),
        ({"extensions": [ext.Extension(ext.ET.supported_versions, b"\x03\x04")]}, MissingExtension),
        ({"extensions": [ext.Extension(ext.ET.supported_versions, b"\x03\x04"),
                         ext.Extension(0x1234, b"")]}, UnsupportedExtension),
        ({"extensions": [ext.Extension(ext.ET.supported_versions, b"\x03\x04"),
                         ext.Extension(ext.ET.signature_algorithms, b"\x00\x02\x04\x03")]}, IllegalParameter),
    ],
)
def test_server_hello_checks(changes: dict[str, object], error: type[TLSAlert]) -> None:
    client, hello = _started()
    with pytest.raises(error):
        client.receive_data(_server_hello(hello, **changes))
    assert client.state is ClientState.FAILED
    assert client.data_to_send()[:1] == b"\x15"   # the alert, in plaintext before any key exists


def test_handshake_message_out_of_order() -> None:
    client, _ = _started()
    with pytest.raises(UnexpectedMessage):
        client.receive_data(RecordLayer().seal(HANDSHAKE, b"\x14\x00\x00\x20" + bytes(32)))


def test_eof_during_handshake_is_reported() -> None:
    client, _ = _started()
    client.receive_data(b"")
    assert client.next_event() == ConnectionClosed(None)
    assert client.state is ClientState.CLOSED


def _psk_pair(pki: ServerPki, lines: list[str]) -> tuple[TLSClient, TLSServer]:
    key, key_id = os.urandom(32), str(uuid.uuid4())
    offer = QkdOffer(key_id, key, 4)
    client = TLSClient(ClientConfig(qkd="required", keylog=lines.append), "localhost", offer)
    ident = pki.servers["ec-p256"]
    server = TLSServer(ServerConfig(certificate_chain=[ident.certificate()], private_key=ident.private_key()))
    client.initiate()
    for _ in range(10):   # bounded: a PSK handshake needs two round trips
        to_server = client.data_to_send()
        if to_server:   # b"" would mean EOF
            server.receive_data(to_server)
        while (event := server.next_event()) is not None:
            if isinstance(event, NeedQkdKey):
                server.provide_qkd_key(key)
        to_client = server.data_to_send()
        if to_client:
            client.receive_data(to_client)
        if not to_server and not to_client:
            break
    return client, server


def test_keylog_and_half_close(server_pki: ServerPki) -> None:
    lines: list[str] = []
    client, server = _psk_pair(server_pki, lines)
    assert any(isinstance(e, HandshakeComplete) for e in iter(client.next_event, None))
    labels = [line.split()[0] for line in lines]
    assert labels == ["CLIENT_HANDSHAKE_TRAFFIC_SECRET", "SERVER_HANDSHAKE_TRAFFIC_SECRET",
                      "CLIENT_TRAFFIC_SECRET_0", "SERVER_TRAFFIC_SECRET_0", "EXPORTER_SECRET"]
    assert "key=" not in repr(client) and "QkdOffer" not in repr(client)

    assert server.state.value == "connected", server
    server.close()
    client.receive_data(server.data_to_send())
    assert client.next_event() == ConnectionClosed(None)
    client.send_data(b"after the server's close_notify")   # half-close: we may still write
    server.receive_data(client.data_to_send())
    events = list(iter(server.next_event, None))
    got = [e for e in events if isinstance(e, ApplicationData)]
    assert got == [ApplicationData(b"after the server's close_notify")], (events, server)
    client.close()
    server.receive_data(client.data_to_send())
    assert ConnectionClosed(None) in list(iter(server.next_event, None))


def test_reference_profile_wire_format(server_pki: ServerPki) -> None:
    """0xFEA6 before server_name/key_share; the ChallengeAck right after the ServerHello; no CCS, no
    client Finished (reference §2.4, §2.6, §2.12)."""
    key, key_id = os.urandom(32), str(uuid.uuid4())
    cfg = ClientConfig(trust=server_pki.trust(), qkd="required", qkd_profiles=("reference",))
    client = TLSClient(cfg, "localhost", QkdOffer(key_id, key, 1))
    ident = server_pki.servers["ec-p256"]
    server = TLSServer(ServerConfig(certificate_chain=[ident.certificate()], private_key=ident.private_key(),
                                    qkd="required", qkd_profiles=("reference",)))
    client.initiate()
    hello_wire = client.data_to_send()
    types = [e.type for e in ClientHello.decode(hello_wire[9:]).extensions]
    assert types.index(0xFEA6) < types.index(ext.ET.server_name) < types.index(ext.ET.key_share)
    assert ext.ET.pre_shared_key not in types

    server.receive_data(hello_wire)
    for event in iter(server.next_event, None):
        if isinstance(event, NeedQkdKey):
            assert (event.key_id, event.master_sae_id, event.profile) == (key_id, 1, "reference")
            server.provide_qkd_key(key)
    client.receive_data(server.data_to_send())   # the ServerHello alone: the server awaits the answer
    ack = client.data_to_send()
    assert ack[:5] == b"\x50\x0e\x00\x00\x51" and len(ack) == 5 + 81
    server.receive_data(ack)
    client.receive_data(server.data_to_send())   # EE, Certificate, CertificateVerify, Finished
    assert client.state is ClientState.CONNECTED and client.data_to_send() == b""
    assert client.info is not None and (client.info.mode, client.info.profile) == ("qkd", "reference")
    client.send_data(b"ref")
    record = client.data_to_send()
    assert record[:3] == b"\x17\x0e\x00"   # reference record protection
    server.receive_data(record)
    assert ApplicationData(b"ref") in list(iter(server.next_event, None))


def test_offers_that_cannot_be_sent_are_refused_up_front() -> None:
    with pytest.raises(InvalidState):
        TLSClient(ClientConfig(), "localhost", QkdOffer("NOT-A-UUID", os.urandom(32), 1))
    with pytest.raises(InvalidState):
        TLSClient(ClientConfig(qkd_profiles=("reference",)), "localhost",
                  QkdOffer(str(uuid.uuid4()), os.urandom(16), 1))


def test_second_client_hello_changes_only_what_the_retry_asks() -> None:
    client, first = _started()
    hrr = [
        ext.Extension(ext.ET.supported_versions, ext.encode_supported_versions_server(0x0304)),
        ext.Extension(ext.ET.key_share, ext.encode_key_share_hrr(0x0017)),
        ext.Extension(ext.ET.cookie, ext.encode_cookie(b"opaque state")),
    ]
    client.receive_data(_server_hello(first, random=HRR_RANDOM, cipher_suite=0x1302, extensions=hrr))
    wire = client.data_to_send()
    assert wire[:6] == b"\x14\x03\x03\x00\x01\x01"   # the one compatibility CCS precedes ClientHello2
    second = ClientHello.decode(wire[6 + 9 :])
    assert (second.random, second.legacy_session_id, second.cipher_suites) == (
        first.random, first.legacy_session_id, first.cipher_suites)
    changed = {ext.ET.key_share, ext.ET.cookie}
    assert [e for e in first.extensions if e.type not in changed] == [
        e for e in second.extensions if e.type not in changed]
    shares = ext.decode_key_share_client(ext.find(second.extensions, ext.ET.key_share) or b"")
    assert [group for group, _ in shares] == [0x0017]
    assert ext.decode_cookie(ext.find(second.extensions, ext.ET.cookie) or b"") == b"opaque state"
    with pytest.raises(UnexpectedMessage):   # a second HelloRetryRequest
        client.receive_data(_server_hello(second, random=HRR_RANDOM, cipher_suite=0x1302, extensions=hrr))
