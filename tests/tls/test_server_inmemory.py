"""TLSClient ↔ TLSServer in memory (no sockets): both profiles, every policy pair, HRR, KeyUpdate, rekey,
tampering, replay and the (key, nonce) pairs each side seals under."""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from tests.peers.clients import PeerPki, server_ssl_context, tls_pki

from qkdtls.net.handoff import ClassicSession
from qkdtls.tls import extensions as ext
from qkdtls.tls import qkd_reference, records
from qkdtls.tls import server as server_module
from qkdtls.tls.alerts import AlertDescription, PeerAlert, TLSAlert
from qkdtls.tls.client import TLSClient
from qkdtls.tls.config import ClientConfig, QkdOffer, ServerConfig
from qkdtls.tls.events import (
    ApplicationData,
    ConnectionClosed,
    ConnectionInfo,
    HandOff,
    HandshakeComplete,
    KeyUpdated,
    NeedQkdKey,
    NeedRekeyKey,
    QkdRekeyed,
)
from qkdtls.tls.extensions import ExtensionType as ET
from qkdtls.tls.key_schedule import KeySchedule
from qkdtls.tls.messages import ClientHello, ServerHello
from qkdtls.tls.server import TLSServer
from qkdtls.tls.suites import CipherSuite

__all__ = ["tls_pki"]

KEY_ID = "7b848ade-8cff-3d54-a9b8-53a215e6ee77"
REKEY_ID = "8844cba7-29e1-3251-a50a-25da13e65eea"
MASTER = 5


@dataclass
class Pki:
    trust: list[x509.Certificate]
    chain: list[x509.Certificate]
    key: object
    peer: PeerPki


@pytest.fixture(scope="module")
def pki_objects(tls_pki: PeerPki) -> Pki:
    ca = x509.load_pem_x509_certificate(tls_pki.ca_cert.read_bytes())
    leaf = x509.load_pem_x509_certificate(tls_pki.server_cert.read_bytes())
    key = serialization.load_pem_private_key(tls_pki.server_key.read_bytes(), None)
    return Pki([ca], [leaf], key, tls_pki)


@dataclass
class Kme:
    """Plays the slave's KME: ``dec_keys`` answers from ``keys`` and, like ours, erases a collected key."""

    keys: dict[str, bytes]
    consume: bool = True
    asked: list[str] = field(default_factory=list)

    def collect(self, key_id: str) -> bytes | None:
        self.asked.append(key_id)
        return self.keys.pop(key_id, None) if self.consume else self.keys.get(key_id)


@dataclass
class Run:
    client_events: list[object] = field(default_factory=list)
    server_events: list[object] = field(default_factory=list)
    client_error: BaseException | None = None
    server_error: BaseException | None = None
    classic: ClassicSession | None = None

    def info(self, side: str) -> ConnectionInfo:
        events = self.client_events if side == "client" else self.server_events
        done = [e for e in events if isinstance(e, HandshakeComplete)]
        assert done, (self.client_error, self.server_error, events)
        return done[0].info

    def data(self, side: str) -> bytes:
        events = self.client_events if side == "client" else self.server_events
        return b"".join(e.data for e in events if isinstance(e, ApplicationData))


class Pair:
    """Moves bytes between a client and a server until neither has anything to say (bounded)."""

    def __init__(self, client: TLSClient, server: TLSServer, kme: Kme, pki: Pki | None = None) -> None:
        self.client, self.server, self.kme, self.pki = client, server, kme, pki
        self.run = Run()
        self.tamper_to_server: list[object] = []  # callables bytes -> bytes, applied once each

    def _server_feed(self, data: bytes) -> None:
        if self.run.classic is not None:
            self.run.classic.receive_data(data)
            self.run.classic.handshake()
            if self.run.classic.handshake_done and not any(
                isinstance(e, HandshakeComplete) for e in self.run.server_events
            ):
                self.run.server_events.append(HandshakeComplete(self.run.classic.info()))
            while chunk := self.run.classic.read():
                self.run.server_events.append(ApplicationData(chunk))
            return
        self.server.receive_data(data)
        self._server_events()

    def _server_events(self) -> None:
        while (event := self.server.next_event()) is not None:
            self.run.server_events.append(event)
            if isinstance(event, NeedQkdKey):
                self.server.provide_qkd_key(self.kme.collect(event.key_id))
            elif isinstance(event, NeedRekeyKey):
                self.server.provide_rekey_key(self.kme.collect(event.key_id))
            elif isinstance(event, HandOff):
                assert self.pki is not None
                self.run.classic = ClassicSession(server_ssl_context(self.pki.peer), b"")
                self._server_feed(event.initial_data)
                return

    def _server_out(self) -> bytes:
        if self.run.classic is not None:
            return self.run.classic.data_to_send()
        return self.server.data_to_send()

    def pump(self) -> Run:
        for _ in range(50):
            to_server = self.client.data_to_send()
            if to_server and self.tamper_to_server:
                to_server = self.tamper_to_server.pop(0)(to_server)  # type: ignore[operator]
            if to_server and self.run.server_error is None:
                try:
                    self._server_feed(to_server)
                except (TLSAlert, PeerAlert, ssl.SSLError) as exc:
                    self.run.server_error = exc
            to_client = self._server_out()
            if to_client and self.run.client_error is None:
                try:
                    self.client.receive_data(to_client)
                except (TLSAlert, PeerAlert) as exc:
                    self.run.client_error = exc
            while (event := self.client.next_event()) is not None:
                self.run.client_events.append(event)
            if not to_server and not to_client:
                return self.run
        raise AssertionError("the peers kept talking")


def make_pair(
    pki: Pki,
    *,
    client_qkd: str = "preferred",
    server_qkd: str = "preferred",
    client_profiles: tuple[str, ...] = ("secure",),
    server_profiles: tuple[str, ...] = ("secure",),
    key: bytes | None = None,
    kme: Kme | None = None,
    offer: bool = True,
    client_kw: dict[str, object] | None = None,
    server_kw: dict[str, object] | None = None,
) -> Pair:
    key = key if key is not None else os.urandom(32)
    qkd_offer = QkdOffer(KEY_ID, key, MASTER, client_profiles) if offer and client_qkd != "off" else None
    client = TLSClient(
        ClientConfig(trust=pki.trust, qkd=client_qkd, qkd_profiles=client_profiles, **(client_kw or {})),
        "localhost",
        qkd_offer,
    )
    server = TLSServer(
        ServerConfig(
            certificate_chain=pki.chain,
            private_key=pki.key,
            qkd=server_qkd,
            qkd_profiles=server_profiles,
            **(server_kw or {}),
        )
    )
    client.initiate()
    return Pair(client, server, kme if kme is not None else Kme({KEY_ID: key}), pki)


def exchange(pair: Pair, message: bytes = b"ping") -> None:
    pair.client.send_data(message)
    pair.pump()
    assert pair.run.data("server").endswith(message)
    pair.server.send_data(b"pong:" + message)
    pair.pump()
    assert pair.run.data("client").endswith(b"pong:" + message)


# -------------------------------------------------------------------------------------------------------


def test_secure_profile_handshake_and_data(pki_objects: Pki) -> None:
    pair = make_pair(pki_objects, client_qkd="required", server_qkd="required")
    run = pair.pump()
    assert run.server_error is None and run.client_error is None
    server_info, client_info = run.info("server"), run.info("client")
    assert (server_info.mode, server_info.profile, server_info.key_id) == ("qkd", "secure", KEY_ID)
    assert server_info.peer_sae_id == MASTER and server_info.server_name == "localhost"
    assert (client_info.mode, client_info.profile) == ("qkd", "secure")
    assert client_info.cipher == server_info.cipher == "TLS_AES_256_GCM_SHA384"
    assert client_info.peer_certificate is None  # PSK mode: no certificate at all
    assert pair.kme.asked == [KEY_ID]
    exchange(pair)
    big = os.urandom(3 * records.MAX_PLAINTEXT + 5)
    exchange(pair, big)


def test_reference_profile_handshake_and_data(pki_objects: Pki) -> None:
    pair = make_pair(
        pki_objects, client_qkd="required", server_qkd="required",
        client_profiles=("reference",), server_profiles=("reference",),
    )
    run = pair.pump()
    assert run.server_error is None and run.client_error is None, (run.server_error, run.client_error)
    assert run.info("server").profile == run.info("client").profile == "reference"
    exchange(pair)
    with pytest.raises(Exception, match="reference"):
        pair.client.update_key()


def test_both_profiles_offered_server_prefers_secure(pki_objects: Pki) -> None:
    pair = make_pair(
        pki_objects, client_profiles=("secure", "reference"), server_profiles=("secure", "reference")
    )
    assert pair.pump().info("server").profile == "secure"
    pair = make_pair(pki_objects, client_profiles=("secure", "reference"), server_profiles=("reference",))
    assert pair.pump().info("client").profile == "reference"


POLICIES = ("required", "preferred", "off")


@pytest.mark.parametrize("client_qkd", POLICIES)
@pytest.mark.parametrize("server_qkd", POLICIES)
def test_policy_matrix(pki_objects: Pki, client_qkd: str, server_qkd: str) -> None:
    pair = make_pair(pki_objects, client_qkd=client_qkd, server_qkd=server_qkd)
    run = pair.pump()
    client_offers = client_qkd != "off"
    if client_offers and server_qkd != "off":
        assert run.info("client").mode == run.info("server").mode == "qkd"
    elif client_qkd == "required":  # server off: OpenSSL answers classically, the client refuses
        assert run.client_error is not None
        assert run.client_error.description == AlertDescription.insufficient_security  # type: ignore[union-attr]
        assert run.classic is not None
        assert "INSUFFICIENT_SECURITY" in str(run.server_error)  # OpenSSL received the client's alert
    elif server_qkd == "required":  # client offers nothing
        assert isinstance(run.server_error, TLSAlert)
        assert run.server_error.description == AlertDescription.insufficient_security
        assert isinstance(run.client_error, PeerAlert)
        assert run.client_error.description == AlertDescription.insufficient_security
    else:  # classic TLS 1.3 through OpenSSL, certificate checked by the client
        assert run.info("client").mode == "classic" and run.classic is not None
        assert run.info("client").peer_certificate is not None
        pair.client.send_data(b"hello")
        pair.pump()
        assert run.data("server") == b"hello"


def test_kme_refusal_under_preferred_falls_back_to_classic(pki_objects: Pki) -> None:
    pair = make_pair(pki_objects, kme=Kme({}))
    run = pair.pump()
    assert run.classic is not None and run.info("client").mode == "classic"
    assert run.info("client").peer_certificate is not None


def test_kme_refusal_under_required_is_insufficient_security(pki_objects: Pki) -> None:
    pair = make_pair(pki_objects, server_qkd="required", kme=Kme({}))
    run = pair.pump()
    assert run.server_error is not None
    assert run.server_error.description == AlertDescription.insufficient_security  # type: ignore[union-attr]
    assert not any(isinstance(e, HandshakeComplete) for e in run.client_events)


def test_hello_retry_request_when_no_share_fits(pki_objects: Pki) -> None:
    pair = make_pair(pki_objects, server_qkd="required", server_kw={"groups": ("secp256r1",)})
    run = pair.pump()
    assert run.server_error is None and run.client_error is None
    assert run.info("server").group == run.info("client").group == "secp256r1"
    assert run.info("client").profile == "secure"
    assert pair.kme.asked == [KEY_ID]  # one key for both ClientHellos
    exchange(pair)


def test_alpn_negotiated_and_mismatch_refused(pki_objects: Pki) -> None:
    pair = make_pair(pki_objects, client_kw={"alpn_protocols": ("h2", "http/1.1")},
                     server_kw={"alpn_protocols": ("http/1.1",)})
    assert pair.pump().info("client").alpn == "http/1.1"
    pair = make_pair(pki_objects, client_kw={"alpn_protocols": ("h2",)}, server_kw={"alpn_protocols": ("x",)})
    run = pair.pump()
    assert run.server_error is not None
    assert run.server_error.description == AlertDescription.no_application_protocol  # type: ignore[union-attr]


def test_key_update_both_directions(pki_objects: Pki) -> None:
    pair = make_pair(pki_objects)
    pair.pump()
    pair.client.update_key(request_peer=True)
    exchange(pair, b"after client update")
    pair.server.update_key(request_peer=False)
    exchange(pair, b"after server update")
    kinds = [e.direction for e in pair.run.server_events if isinstance(e, KeyUpdated)]
    assert kinds == ["receive", "send", "send"]


def test_qkd_rekey(pki_objects: Pki) -> None:
    pair = make_pair(pki_objects)
    pair.pump()
    new_key = os.urandom(32)
    pair.kme.keys[REKEY_ID] = new_key
    pair.client.rekey(QkdOffer(REKEY_ID, new_key, MASTER))
    pair.client.send_data(b"under the new key")  # sent right behind the QkdRekey
    pair.pump()
    assert pair.run.data("server") == b"under the new key"
    assert [e for e in pair.run.server_events if isinstance(e, QkdRekeyed)] == [QkdRekeyed(REKEY_ID)]
    assert [e for e in pair.run.client_events if isinstance(e, QkdRekeyed)] == [QkdRekeyed(REKEY_ID)]
    exchange(pair, b"both ways")


def test_rekey_refused_by_kme_fails_the_connection(pki_objects: Pki) -> None:
    pair = make_pair(pki_objects)
    pair.pump()
    pair.client.rekey(QkdOffer(REKEY_ID, os.urandom(32), MASTER))
    run = pair.pump()
    assert run.server_error is not None and isinstance(run.client_error, PeerAlert)


def test_rekey_not_negotiated_when_server_disables_it(pki_objects: Pki) -> None:
    pair = make_pair(pki_objects, server_kw={"rekey": False})
    pair.pump()
    with pytest.raises(Exception, match="rekey"):
        pair.client.rekey(QkdOffer(REKEY_ID, os.urandom(32), MASTER))


def test_close_notify_both_ways(pki_objects: Pki) -> None:
    pair = make_pair(pki_objects)
    pair.pump()
    pair.client.close()
    pair.pump()
    assert pair.run.server_events[-1] == ConnectionClosed(None)
    pair.server.send_data(b"answer after the client's close_notify")  # TLS 1.3 half-close
    pair.server.close()
    pair.pump()
    assert pair.run.data("client") == b"answer after the client's close_notify"
    assert pair.run.client_events[-1] == ConnectionClosed(None)
    assert pair.server.state.name == "CLOSED"


def test_server_close_first_still_reads_until_peer_close(pki_objects: Pki) -> None:
    pair = make_pair(pki_objects)
    pair.pump()
    pair.server.close()
    in_flight = pair.server.data_to_send()
    with pytest.raises(Exception, match="cannot send"):
        pair.server.send_data(b"late")
    pair.client.send_data(b"last words")  # crossed the server's close_notify on the wire
    pair.client.close()
    pair.server.receive_data(pair.client.data_to_send())
    events = list(iter(pair.server.next_event, None))
    assert events == [ApplicationData(b"last words"), ConnectionClosed(None)]
    pair.client.receive_data(in_flight)
    assert pair.client.next_event() == ConnectionClosed(None)


def test_eof_while_the_kme_is_asked_still_hands_off(pki_objects: Pki) -> None:
    pair = make_pair(pki_objects)
    hello = pair.client.data_to_send()
    pair.server.receive_data(hello)
    pair.server.receive_data(b"")
    assert isinstance(pair.server.next_event(), NeedQkdKey)
    pair.server.provide_qkd_key(None)
    event = pair.server.next_event()
    assert isinstance(event, HandOff) and event.initial_data == hello


# -- tampering and replay --------------------------------------------------------------------------------


def _flip_last(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0x01])


def test_tampered_binder_is_decrypt_error(pki_objects: Pki) -> None:
    pair = make_pair(pki_objects)
    pair.tamper_to_server.append(_flip_last)  # the binder is the last byte of the ClientHello
    run = pair.pump()
    assert run.server_error is not None
    assert run.server_error.description == AlertDescription.decrypt_error  # type: ignore[union-attr]
    assert isinstance(run.client_error, PeerAlert) and run.client_error.description == 51


def test_tampered_client_record_is_bad_record_mac(pki_objects: Pki) -> None:
    pair = make_pair(pki_objects)
    pair.pump()
    pair.client.send_data(b"secret")
    pair.tamper_to_server.append(_flip_last)
    run = pair.pump()
    assert run.server_error is not None
    assert run.server_error.description == AlertDescription.bad_record_mac  # type: ignore[union-attr]
    assert isinstance(run.client_error, PeerAlert) and run.client_error.description == 20


def test_tampered_client_finished_is_refused(pki_objects: Pki) -> None:
    pair = make_pair(pki_objects)
    pair.tamper_to_server.append(lambda data: data)  # let the ClientHello through
    pair.tamper_to_server.append(_flip_last)  # the client's Finished record
    run = pair.pump()
    assert run.server_error is not None
    assert run.server_error.description == AlertDescription.bad_record_mac  # type: ignore[union-attr]


def test_replayed_client_hello_gets_no_handshake(pki_objects: Pki) -> None:
    key = os.urandom(32)
    kme = Kme({KEY_ID: key})
    pair = make_pair(pki_objects, server_qkd="required", key=key, kme=kme)
    hello = pair.client.data_to_send()
    pair.server.receive_data(hello)
    first = pair.server.next_event()
    assert isinstance(first, NeedQkdKey)
    pair.server.provide_qkd_key(kme.collect(first.key_id))
    assert pair.server.data_to_send()
    # The attacker replays the captured ClientHello: the key was collected, the KME refuses.
    replay = TLSServer(ServerConfig(qkd="required"))
    replay.receive_data(hello)
    event = replay.next_event()
    assert isinstance(event, NeedQkdKey)
    with pytest.raises(TLSAlert) as info:
        replay.provide_qkd_key(kme.collect(event.key_id))
    assert info.value.description == AlertDescription.insufficient_security
    assert replay.data_to_send() == bytes.fromhex("15030300020247")  # only the alert; no ServerHello


# -- (key, nonce) bookkeeping ----------------------------------------------------------------------------


@pytest.fixture
def seals(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, bytes, bytes]]]:
    """Every (who, key, nonce) any record protection or challenge seal uses, in order."""
    used: list[tuple[str, bytes, bytes]] = []
    # Every AEAD record is sealed by seal_records (fragmented data) or seal (one record, its own path).
    aead_init, aead_seal = records.AeadProtection.__init__, records.AeadProtection.seal_records
    aead_seal_one = records.AeadProtection.seal
    ref_init, ref_seal = qkd_reference.ReferenceProtection.__init__, qkd_reference.ReferenceProtection.seal
    challenge_seal = qkd_reference.seal_challenge

    def a_init(self, suite, key, iv):  # type: ignore[no-untyped-def]
        aead_init(self, suite, key, iv)
        self.recorded_key = key

    def a_seal(self, content_type, data):  # type: ignore[no-untyped-def]
        count = max(1, -(-len(data) // records.MAX_PLAINTEXT))
        for sequence in range(self.sequence, self.sequence + count):
            nonce = (self._iv ^ sequence).to_bytes(self._iv_length, "big")
            used.append(("record", self.recorded_key, nonce))
        return aead_seal(self, content_type, data)

    def a_seal_one(self, content_type, data):  # type: ignore[no-untyped-def]
        nonce = (self._iv ^ self.sequence).to_bytes(self._iv_length, "big")
        used.append(("record", self.recorded_key, nonce))
        return aead_seal_one(self, content_type, data)

    def r_init(self, key, iv):  # type: ignore[no-untyped-def]
        ref_init(self, key, iv)
        self.recorded_key = key

    def r_seal(self, content_type, data):  # type: ignore[no-untyped-def]
        nonce = (int.from_bytes(self._iv, "big") ^ self._seq).to_bytes(12, "big")
        used.append(("reference record", self.recorded_key, nonce))
        return ref_seal(self, content_type, data)

    def c_seal(key, iv, seq, challenge):  # type: ignore[no-untyped-def]
        used.append(("challenge", key, (int.from_bytes(iv, "big") ^ seq).to_bytes(12, "big")))
        return challenge_seal(key, iv, seq, challenge)

    monkeypatch.setattr(records.AeadProtection, "__init__", a_init)
    monkeypatch.setattr(records.AeadProtection, "seal_records", a_seal)
    monkeypatch.setattr(records.AeadProtection, "seal", a_seal_one)
    monkeypatch.setattr(qkd_reference.ReferenceProtection, "__init__", r_init)
    monkeypatch.setattr(qkd_reference.ReferenceProtection, "seal", r_seal)
    monkeypatch.setattr(qkd_reference, "seal_challenge", c_seal)
    monkeypatch.setattr(server_module, "seal_challenge", c_seal)
    yield used


def _busy_connection(pair: Pair) -> None:
    pair.pump()
    for i in range(3):
        exchange(pair, b"round %d" % i)
    pair.client.update_key()
    exchange(pair, b"after key update")


def test_secure_profile_never_repeats_a_key_nonce_pair(
    pki_objects: Pki, seals: list[tuple[str, bytes, bytes]]
) -> None:
    pair = make_pair(pki_objects, server_kw={"groups": ("secp256r1",)})  # with an HRR
    _busy_connection(pair)
    new_key = os.urandom(32)
    pair.kme.keys[REKEY_ID] = new_key
    pair.client.rekey(QkdOffer(REKEY_ID, new_key, MASTER))
    exchange(pair, b"after rekey")
    pair.server.update_key()
    exchange(pair, b"after server update")
    pairs = [(key, nonce) for _, key, nonce in seals]
    assert len(pairs) > 20
    assert len(set(pairs)) == len(pairs)
    # A replay of the same ClientHello to a server whose KME does not erase keys (the reference KME)
    # still gives fresh traffic keys: the server's ECDHE share is new each time.
    key = os.urandom(32)
    first = make_pair(pki_objects, key=key, kme=Kme({KEY_ID: key}, consume=False))
    hello = first.client.data_to_send()
    first.client.initiate = lambda: None  # type: ignore[method-assign]
    before = len(seals)
    for _ in range(2):
        server = TLSServer(ServerConfig(qkd="required"))
        server.receive_data(hello)
        server.next_event()
        server.provide_qkd_key(key)
    replayed = [(k, n) for _, k, n in seals[before:]]
    assert len(replayed) == 4 and len(set(replayed)) == 4  # EE + Finished per server, never shared


def test_reference_profile_reuses_nonces_as_documented(
    pki_objects: Pki, seals: list[tuple[str, bytes, bytes]]
) -> None:
    pair = make_pair(
        pki_objects, client_profiles=("reference",), server_profiles=("reference",), client_qkd="required"
    )
    pair.pump()
    for i in range(3):
        exchange(pair, b"round %d" % i)
    qkd_key = next(key for who, key, _ in seals if who == "challenge")
    under_qkd_key = [(who, nonce) for who, key, nonce in seals if key == qkd_key]
    nonces = [nonce for _, nonce in under_qkd_key]
    # challenge (seq 0), answer (seq 1), then each direction restarts at 0: the fork's nonce reuse.
    assert [who for who, _ in under_qkd_key[:2]] == ["challenge", "challenge"]
    assert len(set(nonces)) < len(nonces)
    assert nonces.count(nonces[0]) >= 3  # seq 0: the challenge, the first record of each direction


def test_reference_wire_format_matches_the_fork(pki_objects: Pki) -> None:
    pair = make_pair(
        pki_objects, client_profiles=("reference",), server_profiles=("reference",), client_qkd="required"
    )
    pair.server.receive_data(pair.client.data_to_send())
    pair._server_events()
    flight = pair.server.data_to_send()
    # Only the ServerHello (no CCS): the rest waits for the ChallengeAck.
    assert flight[:3] == bytes.fromhex("160303") and len(flight) == 5 + int.from_bytes(flight[3:5], "big")
    hello = ServerHello.decode(flight[9:])
    assert [e.type for e in hello.extensions] == [ET.key_share, ET.supported_versions, ET.qkd_reference_ack]
    assert len(hello.extensions[2].data) == 81
    pair.client.receive_data(flight)
    ack = pair.client.data_to_send()
    assert ack[:5] == bytes.fromhex("500e000051") and len(ack) == 86
    pair.server.receive_data(ack)
    rest = pair.server.data_to_send()
    assert rest[:3] == bytes.fromhex("170303")  # EE, Certificate, CertificateVerify, Finished
    assert isinstance(pair.server.next_event(), HandshakeComplete)  # no client Finished awaited
    pair.client.receive_data(rest)
    pair.server.send_data(b"x")
    assert pair.server.data_to_send()[:5] == bytes.fromhex("170e000012")


def test_repeated_rekeys_with_data_in_flight(pki_objects: Pki) -> None:
    pair = make_pair(pki_objects)
    pair.pump()
    for i in range(3):
        key_id = f"00000000-0000-4000-8000-00000000000{i}"
        new_key = os.urandom(32)
        pair.kme.keys[key_id] = new_key
        pair.server.send_data(b"server before %d" % i)  # crosses the QkdRekey on the wire
        pair.client.send_data(b"client before %d" % i)
        pair.client.rekey(QkdOffer(key_id, new_key, MASTER))
        pair.client.send_data(b"client after %d" % i)
        pair.pump()
        exchange(pair, b"round %d" % i)
    assert len([e for e in pair.run.client_events if isinstance(e, QkdRekeyed)]) == 3
    assert len([e for e in pair.run.server_events if isinstance(e, QkdRekeyed)]) == 3
    assert b"server before 2" in pair.run.data("client")
    assert b"client after 2" in pair.run.data("server")


def _without(hello_record: bytes, ext_type: int, key: bytes) -> bytes:
    """The client's ClientHello record minus one extension, with the binder recomputed for ``key``."""
    hello = ClientHello.decode(hello_record[9:])
    hello.extensions = [e for e in hello.extensions if e.type != ext_type]
    raw = hello.to_bytes()
    offered = ext.OfferedPsks.decode(hello.extensions[-1].data)
    truncated = raw[: len(raw) - ext.binders_length(offered.binders)]
    schedule = KeySchedule(CipherSuite.TLS_AES_256_GCM_SHA384)
    schedule.extract_early(key)
    digest = hashes.Hash(schedule.algorithm)
    digest.update(truncated)
    binder = schedule.finished_verify_data(schedule.binder_key(), digest.finalize())
    psk = ext.OfferedPsks(offered.identities, (binder,)).encode()
    hello.extensions[-1] = ext.Extension(ext.ET.pre_shared_key, psk)
    body = hello.to_bytes()
    return bytes.fromhex("160301") + len(body).to_bytes(2, "big") + body


def test_psk_offer_without_key_share_is_missing_extension(pki_objects: Pki) -> None:
    key = os.urandom(32)
    pair = make_pair(pki_objects, server_qkd="required", key=key)
    record = _without(pair.client.data_to_send(), ET.key_share, key)
    pair.server.receive_data(record)
    assert isinstance(pair.server.next_event(), NeedQkdKey)
    with pytest.raises(TLSAlert) as info:
        pair.server.provide_qkd_key(key)
    assert info.value.description == AlertDescription.missing_extension
