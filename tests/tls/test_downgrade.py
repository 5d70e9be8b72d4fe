"""An active attacker between our client and our server cannot force the insecure reference profile.

The attack: both sides enable the secure and the reference profile. The man in the middle strips the
``pre_shared_key`` (and its ``psk_key_exchange_modes``) from the ClientHello and runs its own ECDHE with each
side: the server, seeing only 0xFEA6, would choose the reference profile and seal its challenge; the attacker
relays that challenge to the client inside its own ServerHello, relays the client's answer back, and
authenticates itself to the client with a certificate of its own. If both ends accepted, both would report
``profile: reference`` and encrypt under the same (QKD key, IV, sequence), so the attacker would learn
c1 xor c2 = p1 xor p2 of their first records.

What stops it (docs/tls-qkd.md §3 and §5):

* the server: a client that offers the secure profile derives its 0xFEA6 IV from the key
  (:func:`qkd_reference.secure_offer_iv`); a server that serves the secure profile and finds that IV in a
  ClientHello without a usable PSK knows the offer was stripped and never answers with the reference profile;
* the client: the reference profile's server is authenticated by its certificate chain and host name, as in
  classic TLS (its CertificateVerify signs the client's own transcript, so the attacker's key exchange cannot
  complete), and a client that offered the secure profile refuses a reference answer it cannot authenticate
  (verification off or no trust anchors) with ``insufficient_security``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from tests.peers.servers import Identity, ServerPki

from qkdtls.tls import extensions as ext
from qkdtls.tls import qkd_reference
from qkdtls.tls.alerts import AlertDescription, PeerAlert, TLSAlert
from qkdtls.tls.client import ClientState, TLSClient
from qkdtls.tls.config import ClientConfig, QkdOffer, ServerConfig
from qkdtls.tls.events import ApplicationData, HandOff, NeedQkdKey
from qkdtls.tls.extensions import ExtensionType as ET
from qkdtls.tls.groups import KeyShare, NamedGroup, server_exchange
from qkdtls.tls.key_schedule import KeySchedule, Transcript
from qkdtls.tls.messages import (
    Certificate,
    CertificateEntry,
    CertificateVerify,
    ClientHello,
    EncryptedExtensions,
    Finished,
    ServerHello,
)
from qkdtls.tls.records import HANDSHAKE, AeadProtection, PlaintextProtection
from qkdtls.tls.server import State, TLSServer
from qkdtls.tls.signatures import choose_scheme, sign
from qkdtls.tls.suites import CipherSuite

KEY_ID = "0b5c3f3e-6a4e-4d35-9a34-7a1c0c9f2d11"
MASTER = 1001
BOTH = ("secure", "reference")


def _records(wire: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    while pos < len(wire):
        length = int.from_bytes(wire[pos + 3 : pos + 5], "big")
        out.append((wire[pos], wire[pos + 5 : pos + 5 + length]))
        pos += 5 + length
    return out


def _plain_record(message: bytes) -> bytes:
    return PlaintextProtection().seal(HANDSHAKE, message)


@dataclass
class Mitm:
    """Sits on the wire; holds no QKD key, only a certificate of its own for the server's name."""

    identity: Identity

    def rewrite_client_hello(self, wire: bytes) -> bytes:
        """Strip the secure offer and put the attacker's key share in; keep 0xFEA6 (key ID, IV) as it is."""
        (_, raw), = _records(wire)
        self.client_hello_raw = raw
        hello = ClientHello.decode(raw[4:])
        self.client_hello = hello
        share = dict(ext.decode_key_share_client(ext.find(hello.extensions, ET.key_share) or b""))
        self.client_share = share[int(NamedGroup.x25519)]
        self.own_share = KeyShare(NamedGroup.x25519)   # towards the server
        stripped = {ET.pre_shared_key, ET.psk_key_exchange_modes, ET.qkd_rekey, ET.qkd_key_announce}
        extensions = [
            ext.Extension(ET.key_share, ext.encode_key_share_client([(int(NamedGroup.x25519),
                                                                       self.own_share.public)]))
            if e.type == ET.key_share else e
            for e in hello.extensions if e.type not in stripped
        ]
        forged = ClientHello(hello.random, hello.legacy_session_id, hello.cipher_suites, extensions)
        return _plain_record(forged.to_bytes())

    def rewrite_server_hello(self, wire: bytes) -> bytes:
        """The server's sealed challenge in the attacker's own ServerHello, then the attacker's certificate
        flight under the handshake keys it shares with the client."""
        records = _records(wire)
        server_hello = ServerHello.decode(records[0][1][4:])
        sealed = ext.find(server_hello.extensions, ET.qkd_reference_ack)
        assert sealed is not None, "the server did not answer with the reference profile"
        suite = CipherSuite(server_hello.cipher_suite)
        public, shared = server_exchange(NamedGroup.x25519, self.client_share)
        own_hello = ServerHello(os.urandom(32), self.client_hello.legacy_session_id, int(suite), [
            ext.Extension(ET.key_share, ext.encode_key_share_server(int(NamedGroup.x25519), public)),
            ext.Extension(ET.supported_versions, ext.encode_supported_versions_server(0x0304)),
            ext.Extension(ET.qkd_reference_ack, sealed),
        ]).to_bytes()
        schedule = KeySchedule(suite)
        schedule.extract_early(None)
        transcript = Transcript(schedule.algorithm)
        transcript.update(self.client_hello_raw)
        transcript.update(own_hello)
        schedule.extract_handshake(shared)
        _client_hs, server_hs = schedule.handshake_traffic_secrets(transcript.digest())
        protection = AeadProtection(suite, *schedule.traffic_keys(server_hs))
        flight = _plain_record(own_hello)

        def send(message: bytes) -> None:
            nonlocal flight
            transcript.update(message)
            flight += protection.seal(HANDSHAKE, message)

        send(EncryptedExtensions([]).to_bytes())
        own_cert = self.identity.certificate().public_bytes(Encoding.DER)
        send(Certificate(b"", [CertificateEntry(own_cert)]).to_bytes())
        key = self.identity.private_key()
        offered = ext.decode_u16_list(ext.find(self.client_hello.extensions, ET.signature_algorithms) or b"")
        scheme = choose_scheme(key, offered)
        send(CertificateVerify(int(scheme), sign(key, scheme, transcript.digest(), server=True)).to_bytes())
        send(Finished(schedule.finished_verify_data(server_hs, transcript.digest())).to_bytes())
        return flight


def _server(pki: ServerPki, qkd: str, profiles: tuple[str, ...]) -> TLSServer:
    real = pki.servers["ec-p256"]
    return TLSServer(ServerConfig(certificate_chain=[real.certificate()], private_key=real.private_key(),
                                  qkd=qkd, qkd_profiles=profiles))


@dataclass
class Outcome:
    client: TLSClient
    server: TLSServer
    client_error: BaseException | None = None
    server_error: BaseException | None = None
    handed_off: bool = False
    keystream_xor: bytes | None = None   # c1 xor c2 as the attacker sees it, if the attack got that far


def _attack(pki: ServerPki, *, server_profiles: tuple[str, ...] = BOTH, server_qkd: str = "required",
            client: dict[str, object] | None = None) -> Outcome:
    key = os.urandom(32)
    client_config = {"trust": pki.trust(), "qkd": "required", "qkd_profiles": BOTH, **(client or {})}
    tls_client = TLSClient(ClientConfig(**client_config), "localhost",   # type: ignore[arg-type]
                           QkdOffer(KEY_ID, key, MASTER))
    tls_server = _server(pki, server_qkd, server_profiles)
    mitm = Mitm(pki.foreign)
    outcome = Outcome(tls_client, tls_server)
    tls_client.initiate()
    try:
        tls_server.receive_data(mitm.rewrite_client_hello(tls_client.data_to_send()))
        events = []
        for event in iter(tls_server.next_event, None):
            events.append(event)
            if isinstance(event, NeedQkdKey):
                tls_server.provide_qkd_key(key)    # the real KME gives the server the real key
        if any(isinstance(e, HandOff) for e in events):
            outcome.handed_off = True
            return outcome
    except TLSAlert as exc:
        outcome.server_error = exc
        return outcome
    try:
        tls_client.receive_data(mitm.rewrite_server_hello(tls_server.data_to_send()))
    except TLSAlert as exc:
        outcome.client_error = exc
        return outcome
    # The client's ChallengeAck (a plaintext 0x50 record) is all it sends: relay it unchanged.
    tls_server.receive_data(tls_client.data_to_send())
    tls_server.data_to_send()   # the server's certificate flight, meant for the attacker: dropped
    if tls_client.state is ClientState.CONNECTED and tls_server.state is State.CONNECTED:
        tls_client.send_data(b"client secret #1")
        c1 = tls_client.data_to_send()
        tls_server.send_data(b"server secret #2")
        c2 = tls_server.data_to_send()
        tls_server.receive_data(c1)   # relayed: the server accepts the client's record
        assert ApplicationData(b"client secret #1") in list(iter(tls_server.next_event, None))
        outcome.keystream_xor = bytes(a ^ b for a, b in zip(c1[5:21], c2[5:21], strict=True))
    return outcome


def _reference_reported(outcome: Outcome) -> bool:
    return any(info is not None and info.profile == "reference"
               for info in (outcome.client.info, outcome.server.info))


def test_stripped_psk_does_not_downgrade_to_reference(server_pki: ServerPki) -> None:
    """The attack as described: both sides S+R, policy required. The server refuses at once."""
    outcome = _attack(server_pki)
    leaked = outcome.keystream_xor
    assert leaked is None, f"c1 xor c2 = {leaked.hex()} = p1 xor p2: the attacker reads the plaintexts' xor"
    assert not _reference_reported(outcome)
    assert isinstance(outcome.server_error, TLSAlert)
    assert outcome.server_error.description == AlertDescription.insufficient_security
    assert outcome.server.data_to_send()[-2:] == bytes((2, AlertDescription.insufficient_security))


def test_stripped_psk_under_preferred_goes_classic_not_reference(server_pki: ServerPki) -> None:
    """A preferred server hands the stripped hello to OpenSSL: certificate-authenticated classic TLS, which
    the attacker cannot complete towards our client without a trusted certificate for its name."""
    outcome = _attack(server_pki, server_qkd="preferred")
    assert outcome.handed_off and not _reference_reported(outcome)


@pytest.mark.parametrize("client", [{}, {"qkd": "preferred"}], ids=["required", "preferred"])
def test_client_authenticates_a_reference_server_by_its_certificate(
    server_pki: ServerPki, client: dict[str, object]
) -> None:
    """Against a server that serves only the reference profile (it cannot tell a stripped offer), the
    attacker's relay reaches the client, which refuses the attacker's certificate."""
    outcome = _attack(server_pki, server_profiles=("reference",), client=client)
    assert outcome.keystream_xor is None and outcome.client.info is None
    assert isinstance(outcome.client_error, TLSAlert)
    assert outcome.client_error.description == AlertDescription.unknown_ca
    assert outcome.client.state is ClientState.FAILED


@pytest.mark.parametrize("client", [{"verify": False}, {"trust": []}, {"trust": None}],
                         ids=["verify-off", "no-anchors", "anchors-none"])
def test_client_that_offered_secure_refuses_an_unauthenticated_reference_answer(
    server_pki: ServerPki, client: dict[str, object]
) -> None:
    outcome = _attack(server_pki, server_profiles=("reference",), client=client)
    assert outcome.keystream_xor is None and outcome.client.info is None
    assert isinstance(outcome.client_error, TLSAlert)
    assert outcome.client_error.description == AlertDescription.insufficient_security
    # Refused at the ServerHello: the challenge was not even answered.
    assert outcome.client.data_to_send()[:1] == b"\x15"


def _direct(pki: ServerPki, client_config: ClientConfig, server_profiles: tuple[str, ...],
            key: bytes | None = None) -> tuple[TLSClient, TLSServer]:
    """Client and server with nobody in between."""
    key = key or os.urandom(32)
    tls_client = TLSClient(client_config, "localhost", QkdOffer(KEY_ID, key, MASTER))
    tls_server = _server(pki, "required", server_profiles)
    tls_client.initiate()
    for _ in range(6):   # bounded: the reference handshake takes two round trips
        to_server = tls_client.data_to_send()
        if to_server:
            tls_server.receive_data(to_server)
        for event in iter(tls_server.next_event, None):
            if isinstance(event, NeedQkdKey):
                tls_server.provide_qkd_key(key)
        to_client = tls_server.data_to_send()
        if to_client:
            try:
                tls_client.receive_data(to_client)
            except (TLSAlert, PeerAlert):
                break
        if not to_server and not to_client:
            break
    return tls_client, tls_server


def test_reference_server_still_serves_a_client_that_offered_both(server_pki: ServerPki) -> None:
    """The legitimate case (a server without the secure profile, e.g. the authors' fork): reference with the
    server certificate checked."""
    config = ClientConfig(trust=server_pki.trust(), qkd="required", qkd_profiles=BOTH)
    client, server = _direct(server_pki, config, ("reference",))
    assert client.info is not None and client.info.profile == "reference"
    real = server_pki.servers["ec-p256"].certificate().public_bytes(Encoding.DER)
    assert client.info.peer_certificate == real
    assert server.info is not None and server.info.profile == "reference"


def test_reference_only_client_checks_the_certificate_too(server_pki: ServerPki) -> None:
    config = ClientConfig(trust=[server_pki.foreign_ca.certificate()], qkd="required",
                          qkd_profiles=("reference",))
    client, _server = _direct(server_pki, config, ("reference",))
    assert client.info is None and client.state is ClientState.FAILED


def test_reference_only_client_without_verification_still_connects(server_pki: ServerPki) -> None:
    """Nothing to downgrade from: such a client accepts what the reference profile gives (documented as
    authenticated by the challenge alone), for interoperability with servers whose certificate it cannot
    check (the fork's demo server makes a fresh self-signed one at each start)."""
    config = ClientConfig(verify=False, qkd="required", qkd_profiles=("reference",))
    client, server = _direct(server_pki, config, ("reference",))
    assert client.info is not None and client.info.profile == "reference"
    assert server.info is not None and server.info.profile == "reference"


def test_secure_offer_iv_binds_the_offer_to_the_key() -> None:
    key = os.urandom(32)
    both = TLSClient(ClientConfig(qkd_profiles=BOTH), "localhost", QkdOffer(KEY_ID, key, MASTER))
    alone = TLSClient(ClientConfig(qkd_profiles=("reference",)), "localhost", QkdOffer(KEY_ID, key, MASTER))
    for client in (both, alone):
        client.initiate()
    ivs = [qkd_reference.QkdRequest.decode(
        ext.find(ClientHello.decode(c.data_to_send()[9:]).extensions, ET.qkd_reference_request) or b"").iv
        for c in (both, alone)]
    assert ivs[0] == qkd_reference.secure_offer_iv(key)
    assert ivs[1] != qkd_reference.secure_offer_iv(key)   # a reference-only client draws a random IV
    assert qkd_reference.secure_offer_iv(os.urandom(32)) != ivs[0]

