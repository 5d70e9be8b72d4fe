"""The TLS 1.3 client (RFC 8446) as a sans-I/O state machine, with the TLS-QKD offers.

Written here rather than borrowed because no Python TLS engine lets a client put an external PSK named
after a KME key, or the reference profile's 0xFEA6, into an otherwise standard ClientHello and still
finish a standard handshake on the same connection when the server ignores the offer.

States and the only transitions allowed between them (``_TRANSITIONS``) are explicit, in the style of h11:
a message that does not fit the current state is unexpected_message. Every error is a
:class:`~qkdtls.tls.alerts.TLSAlert`; the connection queues that alert in :meth:`TLSClient.data_to_send`
before the exception reaches the caller, and then refuses further use.

QKD offers (docs/design.md "Profiles", "Policy"):

* ``secure``: the QKD key is an external PSK (identity ``qkd1:<master_SAE_ID>:<key_ID>``) offered in
  ``psk_dhe_ke`` mode with its binder, last in the ClientHello. If the server selects it there is no
  Certificate/CertificateVerify; the server Finished proves it knows the key. 0xFEA8 offers QKD rekeying.
* ``reference`` (opt-in, insecure): 0xFEA6 before server_name/key_share; on a ServerHello carrying 0xFEA7
  the client answers the challenge with a plaintext 0x50/0x0E00 record at once, sends no CCS and no
  Finished, and switches both directions to the reference record protection after the server Finished.
  Unlike the fork, the server's certificate chain and name are checked as in classic TLS. Offered together
  with ``secure``, the 0xFEA6 IV is derived from the key (the server then knows a stripped PSK when it sees
  one), and a reference answer the client cannot authenticate by certificate is insufficient_security.
* A key shorter than 128 bits is never offered.
* A server that ignores the offer gets a standard handshake with full certificate validation, unless the
  policy is ``required`` (insufficient_security).
"""

from __future__ import annotations

import functools
import ipaddress
import os
from collections import deque
from enum import Enum, auto
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from . import extensions as ext
from . import qkd_reference, qkd_secure
from .alerts import (
    AlertDescription,
    AlertLevel,
    DecodeError,
    DecryptError,
    IllegalParameter,
    InsufficientSecurity,
    InternalError,
    InvalidState,
    MissingExtension,
    PeerAlert,
    ProtocolVersion,
    TLSAlert,
    TLSError,
    UnexpectedMessage,
    UnsupportedCertificate,
    UnsupportedExtension,
    encode_alert,
)
from .certificates import load_chain, verify_server_chain
from .config import ClientConfig, QkdOffer
from .events import (
    ApplicationData,
    ConnectionClosed,
    ConnectionInfo,
    Event,
    HandshakeComplete,
    KeyUpdated,
    QkdRekeyed,
)
from .groups import KeyShare, NamedGroup, parse_group
from .key_schedule import KeySchedule, Transcript, constant_time_equal
from .messages import (
    DOWNGRADE_TLS11,
    DOWNGRADE_TLS12,
    Certificate,
    CertificateEntry,
    CertificateRequest,
    CertificateVerify,
    ClientHello,
    EncryptedExtensions,
    Finished,
    HandshakeMessage,
    HandshakeType,
    KeyUpdate,
    KeyUpdateRequest,
    NewSessionTicket,
    ServerHello,
)
from .records import (
    ALERT,
    APPLICATION_DATA,
    COMPAT_CCS_RECORD,
    HANDSHAKE,
    TLS10,
    AeadProtection,
    HandshakeBuffer,
    Outgoing,
    PlaintextProtection,
    RecordLayer,
    encode_handshake,
    record_header,
)
from .signatures import choose_scheme, sign, verify
from .suites import CipherSuite, params

TLS13 = 0x0304
ET = ext.ExtensionType


class ClientState(Enum):
    START = auto()
    WAIT_SERVER_HELLO = auto()
    WAIT_ENCRYPTED_EXTENSIONS = auto()
    WAIT_CERTIFICATE_OR_REQUEST = auto()
    WAIT_CERTIFICATE = auto()
    WAIT_CERTIFICATE_VERIFY = auto()
    WAIT_FINISHED = auto()
    CONNECTED = auto()
    CLOSED = auto()
    FAILED = auto()


S = ClientState
_TRANSITIONS: dict[ClientState, frozenset[ClientState]] = {
    S.START: frozenset({S.WAIT_SERVER_HELLO}),
    S.WAIT_SERVER_HELLO: frozenset({S.WAIT_SERVER_HELLO, S.WAIT_ENCRYPTED_EXTENSIONS}),
    S.WAIT_ENCRYPTED_EXTENSIONS: frozenset({S.WAIT_CERTIFICATE_OR_REQUEST, S.WAIT_FINISHED}),
    S.WAIT_CERTIFICATE_OR_REQUEST: frozenset({S.WAIT_CERTIFICATE, S.WAIT_CERTIFICATE_VERIFY}),
    S.WAIT_CERTIFICATE: frozenset({S.WAIT_CERTIFICATE_VERIFY}),
    S.WAIT_CERTIFICATE_VERIFY: frozenset({S.WAIT_FINISHED}),
    S.WAIT_FINISHED: frozenset({S.CONNECTED}),
    S.CONNECTED: frozenset(),
    S.CLOSED: frozenset(),
    S.FAILED: frozenset(),
}
_EXPECTED: dict[ClientState, tuple[int, ...]] = {
    S.WAIT_SERVER_HELLO: (HandshakeType.server_hello,),
    S.WAIT_ENCRYPTED_EXTENSIONS: (HandshakeType.encrypted_extensions,),
    S.WAIT_CERTIFICATE_OR_REQUEST: (HandshakeType.certificate, HandshakeType.certificate_request),
    S.WAIT_CERTIFICATE: (HandshakeType.certificate,),
    S.WAIT_CERTIFICATE_VERIFY: (HandshakeType.certificate_verify,),
    S.WAIT_FINISHED: (HandshakeType.finished,),
    S.CONNECTED: (HandshakeType.new_session_ticket, HandshakeType.key_update, HandshakeType.qkd_rekey),
}
# Extensions a TLS 1.3 server may put in each message (RFC 8446 §4.2 table); others it recognises are
# illegal_parameter there, ones we never offered unsupported_extension.
_SERVER_HELLO_EXTS = frozenset({ET.key_share, ET.supported_versions, ET.pre_shared_key, ET.qkd_reference_ack})
_HRR_EXTS = frozenset({ET.key_share, ET.supported_versions, ET.cookie})
_EE_EXTS = frozenset({
    ET.server_name, ET.max_fragment_length, ET.supported_groups, ET.use_srtp, ET.heartbeat,
    ET.application_layer_protocol_negotiation, ET.record_size_limit, ET.early_data, ET.qkd_rekey,
    ET.qkd_reference_ack, ET.qkd_key_announce,
})
_PSK_DHE_KE_MODES = ext.Extension(ET.psk_key_exchange_modes, ext.encode_psk_modes([ext.PSK_DHE_KE]))
_QKD_REKEY = ext.Extension(ET.qkd_rekey, b"")
_QKD_KEY_ANNOUNCE = ext.Extension(ET.qkd_key_announce, b"")
# Bound on the handshake messages taken from one record: 2^14 bytes hold at most 3277 of the smallest, so
# a legitimate peer never reaches it, and the loop stays visibly finite.
_MAX_MESSAGES_PER_CALL = 4096


class _Offer:
    """What the ClientHello offered for QKD (kept off the repr: it holds the key)."""

    def __init__(self, offer: QkdOffer, profiles: tuple[str, ...], suite: CipherSuite) -> None:
        self.key_id = offer.key_id
        self.master_sae_id = offer.master_sae_id
        self.key = offer.key
        self.secure = "secure" in profiles
        # Whether the first ClientHello offered the secure profile (``secure`` may drop after a retry).
        self.offered_secure = self.secure
        self.reference: qkd_reference.QkdRequest | None = None
        if "reference" in profiles:
            # Offered with the secure profile, the IV tells the server so (qkd_reference.secure_offer_iv).
            iv = qkd_reference.secure_offer_iv(offer.key) if self.secure else None
            self.reference = qkd_reference.QkdRequest.create(offer.key_id, offer.master_sae_id, iv)
        self.psk_suite = suite
        self.identity = qkd_secure.psk_identity(offer.master_sae_id, offer.key_id) if self.secure else b""

    def __repr__(self) -> str:
        return f"_Offer(key_id={self.key_id!r}, secure={self.secure}, reference={self.reference is not None})"


class TLSClient:
    """One client connection. ``initiate()``, then feed bytes with ``receive_data`` and drain
    ``next_event()`` / ``data_to_send()``."""

    def __init__(
        self, config: ClientConfig, server_name: str | None = None, qkd: QkdOffer | None = None
    ) -> None:
        self.config = config
        self.server_name = server_name
        self.state = ClientState.START
        self.info: ConnectionInfo | None = None
        self._records = RecordLayer()
        self._handshake = HandshakeBuffer()
        self._events: deque[Event] = deque()
        self._outgoing = Outgoing()
        self._transcript = Transcript()
        self._random = os.urandom(32)
        self._session_id = os.urandom(32)   # middlebox compatibility mode (§D.4)
        self._shares: dict[NamedGroup, KeyShare] = {}
        self._groups = [parse_group(g) for g in config.groups]
        self._hello: ClientHello | None = None
        self._answerable: set[int] | None = None   # extension types the server may send back to _hello
        self._retried = False
        self._cookie: bytes | None = None
        self._ccs_sent = False
        self._suite: CipherSuite | None = None
        self._group: NamedGroup | None = None
        self._schedule: KeySchedule | None = None
        self._psk_schedule: KeySchedule | None = None   # the binder's, at the PSK's early secret
        self._client_hs = b""
        self._server_hs = b""
        self._client_ap = b""
        self._server_ap = b""
        self._mode = "classic"
        self._profile: str | None = None
        self._rekey_negotiated = False
        self._rekey_pending: QkdOffer | None = None
        self._announce_negotiated = False
        self._announced = False
        self._alpn: str | None = None
        self._cert_request: CertificateRequest | None = None
        self._peer_leaf: x509.Certificate | None = None
        self._close_sent = False
        self._peer_closed = False   # close_notify or EOF seen; we may still send (half-close, §6.1)
        self._offer: _Offer | None = None
        if qkd is not None and config.qkd != "off" and not qkd_secure.key_long_enough(qkd.key):
            # Never offered: under 'preferred' the ClientHello is a classic one (see qkd_offered).
            if config.qkd == "required":
                raise InvalidState("a QKD key shorter than 128 bits is never offered")
            qkd = None
        if qkd is not None and config.qkd != "off":
            profiles = tuple(qkd.profiles or config.qkd_profiles)
            if "reference" in profiles and len(qkd.key) != qkd_reference.KEY_LEN:
                raise InvalidState("the reference profile needs a 256-bit QKD key")
            try:
                self._offer = _Offer(qkd, profiles, config.qkd_cipher_suite)
            except ValueError as exc:   # a key ID or SAE ID the identity cannot carry
                raise InvalidState(f"QKD offer cannot be named: {exc}") from None
        elif config.qkd == "required":
            raise InvalidState("QKD policy 'required' needs a QKD key offer")
        if not self._groups:
            raise InvalidState("no key-exchange group configured")

    def __repr__(self) -> str:
        return f"TLSClient(state={self.state.name}, server_name={self.server_name!r}, mode={self._mode})"

    # -- public API -------------------------------------------------------------------------------------

    @property
    def rekey_negotiated(self) -> bool:
        """The server accepted in-connection QKD rekeying (0xFEA8) in its EncryptedExtensions."""
        return self._rekey_negotiated

    @property
    def qkd_offered(self) -> bool:
        """The ClientHello names a QKD key (False under 'off', without an offer, or for a key too short)."""
        return self._offer is not None

    @property
    def announce_negotiated(self) -> bool:
        """The server accepted key announcements (0xFEA9) and none was sent yet on this connection."""
        return self._announce_negotiated and not self._announced

    def initiate(self) -> None:
        """Queue the ClientHello."""
        if self.state is not ClientState.START:
            raise InvalidState("initiate() called twice")
        first = self._groups[0]
        self._shares[first] = KeyShare(first)
        # A hybrid first choice also carries a plain X25519 share so classical-only servers need no HRR.
        if first is NamedGroup.X25519MLKEM768 and NamedGroup.x25519 in self._groups:
            self._shares[NamedGroup.x25519] = KeyShare(NamedGroup.x25519)
        self._records.write = PlaintextProtection(TLS10)
        self._send_client_hello()
        self._records.write = PlaintextProtection()
        self._records.allow_ccs = True
        self._transition(ClientState.WAIT_SERVER_HELLO)

    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer; ``b""`` is end of stream."""
        if self.state is ClientState.FAILED:
            raise InvalidState("connection failed earlier")
        if self.state is ClientState.CLOSED or self._peer_closed:
            return
        if not data:
            self._peer_closed = True
            if self.state is not ClientState.CONNECTED:
                self._state_closed()
            self._events.append(ConnectionClosed(None))
            return
        self._guarded(self._receive, data)

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def data_to_send(self) -> bytes:
        return self._outgoing.take_joined()

    def data_to_send_buffers(self) -> list[bytes | bytearray]:
        """What :meth:`data_to_send` would return, as the separate buffers it was sealed in (no copy)."""
        return self._outgoing.take()

    def send_data(self, data: bytes | bytearray | memoryview) -> None:
        if self.state is not ClientState.CONNECTED or self._close_sent:
            raise InvalidState("application data before the handshake completed or after close")
        if data:
            self._outgoing.extend(self._records.seal_each(APPLICATION_DATA, data))

    def close(self) -> None:
        """Queue close_notify (once)."""
        if self._close_sent or self.state in (ClientState.FAILED, ClientState.START):
            return
        self._close_sent = True
        try:
            self._outgoing += self._records.seal(ALERT, encode_alert(AlertDescription.close_notify,
                                                                     AlertLevel.warning))
        except TLSAlert:
            pass

    def update_key(self, request_peer: bool = True) -> None:
        """Send a KeyUpdate and switch our sending key (RFC 8446 §4.6.3)."""
        self._require_standard_connected("KeyUpdate")
        request = KeyUpdateRequest.update_requested if request_peer else KeyUpdateRequest.update_not_requested
        self._guarded(self._send_key_update, request)

    def rekey(self, offer: QkdOffer) -> None:
        """Start a QKD rekey with a fresh key (secure profile, 0xFEA8 negotiated)."""
        self._require_standard_connected("QKD rekey")
        if not self._rekey_negotiated:
            raise InvalidState("the server did not accept QKD rekeying")
        if self._rekey_pending is not None:
            raise InvalidState("a QKD rekey is already in progress")
        if not qkd_secure.key_long_enough(offer.key):
            raise InvalidState("a QKD key shorter than 128 bits is never used")
        message = qkd_secure.QkdRekey(offer.key_id)
        self._guarded(self._start_rekey, message, offer)

    def announce_keys(self, key_ids: tuple[str, ...] | list[str]) -> None:
        """Send the one QkdKeyAnnounce of this connection: keys the next connections will offer, in order."""
        self._require_standard_connected("QkdKeyAnnounce")
        if not self._announce_negotiated:
            raise InvalidState("the server did not accept key announcements")
        if self._announced:
            raise InvalidState("keys were already announced on this connection")
        try:
            message = qkd_secure.QkdKeyAnnounce(tuple(key_ids))
        except ValueError as exc:
            raise InvalidState(f"cannot announce these keys: {exc}") from None
        self._announced = True
        raw = encode_handshake(qkd_secure.HANDSHAKE_QKD_KEY_ANNOUNCE, message.encode())
        self._guarded(self._send_post_handshake, raw)

    # -- plumbing ---------------------------------------------------------------------------------------

    def _require_standard_connected(self, what: str) -> None:
        if self.state is not ClientState.CONNECTED or self._close_sent:
            raise InvalidState(f"{what} needs an established connection")
        if self._profile == "reference":
            raise InvalidState(f"{what} is not available in the reference profile")

    def _guarded(self, func: Any, *args: Any) -> None:
        try:
            func(*args)
        except TLSAlert as alert:
            self._fail(alert)
            raise
        except PeerAlert:
            self._state_closed()
            raise
        except TLSError:
            raise
        except Exception as exc:
            # Defence in depth: whatever escaped the typed checks still ends the connection with an
            # alert. Only the type is kept: library messages are not vetted for secrets.
            alert = InternalError(f"unexpected {type(exc).__name__}")
            self._fail(alert)
            raise alert from None

    def _fail(self, alert: TLSAlert) -> None:
        if self.state is ClientState.FAILED:
            return
        try:
            self._outgoing += self._records.seal(ALERT, encode_alert(alert.description))
        except TLSAlert:
            pass
        self.state = ClientState.FAILED

    def _state_closed(self) -> None:
        if self.state is not ClientState.FAILED:
            self.state = ClientState.CLOSED

    def _transition(self, new: ClientState) -> None:
        if new not in _TRANSITIONS[self.state]:
            raise InternalError(f"illegal transition {self.state.name} -> {new.name}")
        self.state = new

    def _keylog(self, label: str, secret: bytes) -> None:
        if self.config.keylog is not None:
            self.config.keylog(f"{label} {self._random.hex()} {secret.hex()}")

    def _send_handshake(self, message: HandshakeMessage) -> bytes:
        raw = message.to_bytes()
        self._transcript.update(raw)
        self._outgoing += self._records.seal(HANDSHAKE, raw)
        return raw

    def _send_compat_ccs(self) -> None:
        if not self._ccs_sent and self._profile != "reference":
            self._ccs_sent = True
            self._outgoing += COMPAT_CCS_RECORD

    # -- ClientHello ------------------------------------------------------------------------------------

    def _offered_suites(self) -> list[int]:
        suites = [int(s) for s in self.config.cipher_suites]
        if self._offer is not None and self._offer.secure:
            # The PSK's hash follows qkd_cipher_suite: put it first so the server can select the PSK.
            first = int(self._offer.psk_suite)
            suites = [first] + [s for s in suites if s != first]
        return suites

    def _psk_usable(self) -> bool:
        if self._offer is None or not self._offer.secure:
            return False
        if self._suite is None:
            return True
        # After a HelloRetryRequest only a PSK whose hash matches the chosen suite may stay (§4.1.4).
        return params(self._suite).hash_name == params(self._offer.psk_suite).hash_name

    def _build_extensions(self, binders: list[bytes] | None) -> list[ext.Extension]:
        cfg = self.config
        out = list(_constant_extensions(tuple(self._groups), tuple(cfg.signature_algorithms)))
        if self._offer is not None and self._offer.reference is not None:
            out.append(ext.Extension(ET.qkd_reference_request, self._offer.reference.encode()))
        if self.server_name:
            server_name = _server_name_extension(self.server_name)
            if server_name is not None:
                out.append(server_name)
        shares = [(int(g), s.public) for g, s in self._shares.items()]
        out.append(ext.Extension(ET.key_share, ext.encode_key_share_client(shares)))
        if cfg.alpn_protocols:
            out.append(ext.Extension(ET.application_layer_protocol_negotiation,
                                     ext.encode_alpn(list(cfg.alpn_protocols))))
        if self._cookie is not None:
            out.append(ext.Extension(ET.cookie, ext.encode_cookie(self._cookie)))
        if binders is not None:
            out.append(_PSK_DHE_KE_MODES)
            if cfg.rekey:
                out.append(_QKD_REKEY)
            if cfg.key_announce:
                out.append(_QKD_KEY_ANNOUNCE)
            assert self._offer is not None
            offered = ext.OfferedPsks((ext.PskIdentity(self._offer.identity, 0),), tuple(binders))
            out.append(ext.Extension(ET.pre_shared_key, offered.encode()))   # must be last (§4.2.11)
        return out

    def _send_client_hello(self) -> None:
        use_psk = self._psk_usable()
        # The second ClientHello repeats the first one's cipher suites (§4.1.2).
        suites = self._hello.cipher_suites if self._hello is not None else self._offered_suites()
        if not use_psk:
            self._psk_schedule = None
            hello = ClientHello(self._random, self._session_id, suites, self._build_extensions(None))
            self._hello, self._answerable = hello, None
            self._send_handshake(hello)
            return
        assert self._offer is not None
        psk_params = params(self._offer.psk_suite)
        placeholder = [bytes(psk_params.hash_length)]
        extensions = self._build_extensions(placeholder)
        raw = ClientHello(self._random, self._session_id, suites, extensions).to_bytes()
        truncated = raw[: len(raw) - ext.binders_length(placeholder)]
        schedule = KeySchedule(self._offer.psk_suite)
        schedule.extract_early(self._offer.key)
        self._psk_schedule = schedule
        binder_key = schedule.binder_key(external=True)
        binder = schedule.finished_verify_data(binder_key, self._binder_hash(psk_params.hash_algorithm(),
                                                                             truncated))
        # The single binder is the message's last bytes and has the placeholder's length: patch it in
        # rather than encoding the whole ClientHello a second time.
        raw = raw[: len(raw) - len(binder)] + binder
        psk = extensions[-1]
        extensions[-1] = ext.Extension(psk.type, psk.data[: len(psk.data) - len(binder)] + binder)
        self._hello, self._answerable = ClientHello(self._random, self._session_id, suites, extensions), None
        self._transcript.update(raw)
        self._outgoing += self._records.seal(HANDSHAKE, raw)

    def _binder_hash(self, algorithm: hashes.HashAlgorithm, truncated: bytes) -> bytes:
        if self._suite is not None:
            return self._transcript.digest_with(truncated)
        h = hashes.Hash(algorithm)
        h.update(truncated)
        return h.finalize()

    # -- receiving --------------------------------------------------------------------------------------

    def _receive(self, data: bytes) -> None:
        with self._records.borrowing(data):
            self._process_records()

    def _process_records(self) -> None:
        # Bounded: each pass consumes one whole record or returns.
        while self.state not in (ClientState.CLOSED, ClientState.FAILED) and not self._peer_closed:
            if self.state is ClientState.CONNECTED and not self._handshake.pending:
                # The bulk path: a run of application-data records in one call.
                for plaintext in self._records.application_data_run():
                    if plaintext:
                        self._events.append(ApplicationData(plaintext))
            record = self._records.next_record()
            if record is None:
                return
            content_type, payload = record
            if content_type == APPLICATION_DATA:
                self._require_no_partial_handshake()
                if self.state is not ClientState.CONNECTED:
                    raise UnexpectedMessage("application data before the handshake completed")
                if payload:
                    self._events.append(ApplicationData(payload))
            elif content_type == HANDSHAKE:
                self._handshake.add(payload)
                self._drain_handshake()
            elif content_type == ALERT:
                self._require_no_partial_handshake()
                self._on_alert(payload)
            else:
                raise UnexpectedMessage(f"unexpected content type {content_type}")

    def _require_no_partial_handshake(self) -> None:
        if self._handshake.pending:
            raise UnexpectedMessage("record interleaved with a fragmented handshake message")

    def _on_alert(self, payload: bytes) -> None:
        if len(payload) != 2:
            raise DecodeError("alert of the wrong length")
        level, description = payload
        if description == AlertDescription.close_notify:
            self._peer_closed = True
            if self.state is not ClientState.CONNECTED:
                self._state_closed()   # a handshake cut short by the peer
            self._events.append(ConnectionClosed(None))
            return
        if description == AlertDescription.user_canceled and level == AlertLevel.warning:
            return   # a close_notify follows (§6.1)
        self._events.append(ConnectionClosed(description))
        raise PeerAlert(description, level)

    def _drain_handshake(self) -> None:
        for _ in range(_MAX_MESSAGES_PER_CALL):
            if self.state in (ClientState.CLOSED, ClientState.FAILED) or self._peer_closed:
                return
            message = self._handshake.next_message()
            if message is None:
                return
            msg_type, body, raw = message
            if msg_type not in _EXPECTED.get(self.state, ()):
                raise UnexpectedMessage(f"handshake message {msg_type} in state {self.state.name}")
            self._dispatch(msg_type, body, raw)
        raise UnexpectedMessage("too many handshake messages at once")

    def _dispatch(self, msg_type: int, body: bytes, raw: bytes) -> None:
        if msg_type == HandshakeType.server_hello:
            self._on_server_hello(ServerHello.decode(body), raw)
        elif msg_type == HandshakeType.encrypted_extensions:
            self._on_encrypted_extensions(EncryptedExtensions.decode(body), raw)
        elif msg_type == HandshakeType.certificate_request:
            self._on_certificate_request(CertificateRequest.decode(body), raw)
        elif msg_type == HandshakeType.certificate:
            self._on_certificate(Certificate.decode(body), raw)
        elif msg_type == HandshakeType.certificate_verify:
            self._on_certificate_verify(CertificateVerify.decode(body), raw)
        elif msg_type == HandshakeType.finished:
            assert self._schedule is not None
            self._on_finished(Finished.decode(body, self._schedule.hash_length), raw)
        elif msg_type == HandshakeType.new_session_ticket:
            # Tickets are decoded for well-formedness and dropped: this client does not resume.
            self._require_standard_post_handshake()
            NewSessionTicket.decode(body)
        elif msg_type == HandshakeType.key_update:
            self._require_standard_post_handshake()
            self._on_key_update(KeyUpdate.decode(body))
        else:
            self._on_qkd_rekey(qkd_secure.QkdRekey.decode(body))

    def _require_standard_post_handshake(self) -> None:
        if self._profile == "reference":
            raise UnexpectedMessage("handshake messages are not allowed after the reference QKD switch")

    # -- ServerHello / HelloRetryRequest ----------------------------------------------------------------

    def _check_extensions(self, extensions: list[ext.Extension], allowed: frozenset[int]) -> None:
        assert self._hello is not None
        offered = self._answerable
        if offered is None:
            offered = {e.type for e in self._hello.extensions} | {ET.cookie}   # a server may start a cookie
            if ET.qkd_reference_request in offered:
                offered.add(ET.qkd_reference_ack)   # the reference server answers 0xFEA6 with 0xFEA7
            self._answerable = offered
        for extension in extensions:
            if extension.type not in offered:
                raise UnsupportedExtension(f"extension {extension.type:#x} was not offered")
            if extension.type not in allowed:
                raise IllegalParameter(f"extension {extension.type:#x} not allowed here")

    def _on_server_hello(self, hello: ServerHello, raw: bytes) -> None:
        assert self._hello is not None
        versions = ext.find(hello.extensions, ET.supported_versions)
        if versions is None:
            if hello.random[-8:] in (DOWNGRADE_TLS12, DOWNGRADE_TLS11):
                raise IllegalParameter("downgrade sentinel in ServerHello.random")
            raise ProtocolVersion("server did not negotiate TLS 1.3")
        if ext.decode_supported_versions_server(versions) != TLS13 or hello.legacy_version != 0x0303:
            raise IllegalParameter("server selected a version that was not offered")
        if hello.legacy_session_id_echo != self._session_id:
            raise IllegalParameter("legacy_session_id_echo does not match")
        if hello.legacy_compression_method != 0:
            raise IllegalParameter("compression method must be null")
        if hello.cipher_suite not in self._hello.cipher_suites:
            raise IllegalParameter("server selected a cipher suite that was not offered")
        suite = CipherSuite(hello.cipher_suite)
        if hello.is_hello_retry_request:
            self._on_hello_retry_request(hello, raw, suite)
            return
        self._check_extensions(hello.extensions, _SERVER_HELLO_EXTS)
        if self._suite is not None and suite != self._suite:
            raise IllegalParameter("ServerHello cipher suite differs from the HelloRetryRequest's")
        share_data = ext.find(hello.extensions, ET.key_share)
        if share_data is None:
            raise MissingExtension("ServerHello without key_share (psk_ke was not offered)")
        group_value, server_share = ext.decode_key_share_server(share_data)
        try:
            group = NamedGroup(group_value)
        except ValueError:
            raise IllegalParameter("server key share for a group we did not offer") from None
        share = self._shares.get(group)
        if share is None:
            raise IllegalParameter("server key share for a group we did not send")

        psk: bytes | None = None
        psk_data = ext.find(hello.extensions, ET.pre_shared_key)
        challenge = ext.find(hello.extensions, ET.qkd_reference_ack)
        if psk_data is not None:
            if ext.decode_selected_identity(psk_data) != 0:
                raise IllegalParameter("server selected a PSK identity we did not offer")
            assert self._offer is not None
            if params(suite).hash_name != params(self._offer.psk_suite).hash_name:
                raise IllegalParameter("PSK selected with a cipher suite of another hash")
            if challenge is not None:
                raise IllegalParameter("server accepted both QKD profiles")
            psk = self._offer.key
            self._mode, self._profile = "qkd", "secure"
        elif challenge is not None:
            assert self._offer is not None   # 0xFEA7 is answerable only to our 0xFEA6
            if self._offer.offered_secure and not self._server_authenticated_by_certificate():
                # Nothing else authenticates the server's choice: the challenge is not bound to the
                # transcript, so an attacker who stripped our PSK could relay it over its own key exchange.
                raise InsufficientSecurity(
                    "the server chose the reference profile although the secure one was offered, and its "
                    "certificate cannot be checked here (verification off or no trusted CAs)"
                )
            self._mode, self._profile = "qkd", "reference"
        elif self.config.qkd == "required":
            raise InsufficientSecurity("server did not accept the QKD key (policy 'required')")

        self._suite, self._group = suite, group
        if not self._retried:
            self._transcript.set_algorithm(params(suite).hash_algorithm())
        self._transcript.update(raw)
        if psk is not None and self._psk_schedule is not None:
            schedule = self._psk_schedule.with_suite(suite)   # hash checked above
        else:
            schedule = KeySchedule(suite)
            schedule.extract_early(psk)
        self._psk_schedule = None
        schedule.extract_handshake(share.exchange(server_share))
        self._schedule = schedule
        self._client_hs, self._server_hs = schedule.handshake_traffic_secrets(self._transcript.digest())
        self._keylog("CLIENT_HANDSHAKE_TRAFFIC_SECRET", self._client_hs)
        self._keylog("SERVER_HANDSHAKE_TRAFFIC_SECRET", self._server_hs)
        self._handshake.require_empty()
        self._records.read = AeadProtection(suite, *schedule.traffic_keys(self._server_hs))
        if challenge is not None:
            self._answer_reference_challenge(challenge)
        else:
            # Alerts from now on are protected with our handshake key, as the server expects.
            self._records.write = AeadProtection(suite, *schedule.traffic_keys(self._client_hs))
        self._transition(ClientState.WAIT_ENCRYPTED_EXTENSIONS)

    def _answer_reference_challenge(self, sealed: bytes) -> None:
        assert self._offer is not None and self._offer.reference is not None
        iv = self._offer.reference.iv
        received = qkd_reference.open_challenge(self._offer.key, iv, 0, sealed)
        answer = qkd_reference.seal_challenge(self._offer.key, iv, 1, received.answer())
        # The server waits for this record before it sends the rest of its flight (reference §2.12).
        header = record_header(
            qkd_reference.CONTENT_TYPE_CHALLENGE, qkd_reference.RECORD_VERSION_QKD, len(answer)
        )
        self._outgoing += header + answer
        self._records.write = qkd_reference.ReferenceProtection(self._offer.key, iv)

    def _on_hello_retry_request(self, hrr: ServerHello, raw: bytes, suite: CipherSuite) -> None:
        if self._retried:
            raise UnexpectedMessage("second HelloRetryRequest")
        self._check_extensions(hrr.extensions, _HRR_EXTS)
        group_data = ext.find(hrr.extensions, ET.key_share)
        cookie = ext.find(hrr.extensions, ET.cookie)
        if group_data is None and cookie is None:
            raise IllegalParameter("HelloRetryRequest would not change the ClientHello")
        self._retried = True
        self._suite = suite
        self._transcript.set_algorithm(params(suite).hash_algorithm())
        self._transcript.replace_with_message_hash()
        self._transcript.update(raw)
        if group_data is not None:
            try:
                group = NamedGroup(ext.decode_key_share_hrr(group_data))
            except ValueError:
                raise IllegalParameter("HelloRetryRequest names an unknown group") from None
            if group not in self._groups or group in self._shares:
                raise IllegalParameter("HelloRetryRequest names a group not offered or already shared")
            self._shares = {group: KeyShare(group)}
        if cookie is not None:
            self._cookie = ext.decode_cookie(cookie)
        if self._offer is not None and self._offer.secure and not self._psk_usable():
            self._offer.secure = False
            if self.config.qkd == "required" and self._offer.reference is None:
                raise InsufficientSecurity("server's cipher suite cannot use the QKD key (policy 'required')")
        self._send_compat_ccs()
        self._send_client_hello()

    # -- server's encrypted flight ----------------------------------------------------------------------

    def _on_encrypted_extensions(self, message: EncryptedExtensions, raw: bytes) -> None:
        self._check_extensions(message.extensions, _EE_EXTS)
        alpn = ext.find(message.extensions, ET.application_layer_protocol_negotiation)
        if alpn is not None:
            names = ext.decode_alpn(alpn)
            offered = [p.encode("utf-8") for p in self.config.alpn_protocols]
            if len(names) != 1 or names[0] not in offered:
                raise IllegalParameter("server selected an ALPN protocol we did not offer")
            self._alpn = names[0].decode("utf-8")
        if ext.find(message.extensions, ET.early_data) is not None:
            raise IllegalParameter("early_data accepted but never offered")
        self._rekey_negotiated = (
            self._profile == "secure" and ext.find(message.extensions, ET.qkd_rekey) is not None
        )
        self._announce_negotiated = (
            self._profile == "secure" and ext.find(message.extensions, ET.qkd_key_announce) is not None
        )
        self._transcript.update(raw)
        if self._profile == "secure":
            self._transition(ClientState.WAIT_FINISHED)   # PSK: no certificate (§2.2)
        else:
            self._transition(ClientState.WAIT_CERTIFICATE_OR_REQUEST)

    def _on_certificate_request(self, message: CertificateRequest, raw: bytes) -> None:
        if message.certificate_request_context:
            raise IllegalParameter("certificate_request_context must be empty during the handshake")
        if ext.find(message.extensions, ET.signature_algorithms) is None:
            raise MissingExtension("CertificateRequest without signature_algorithms")
        ext.decode_u16_list(ext.find(message.extensions, ET.signature_algorithms) or b"")
        self._cert_request = message
        self._transcript.update(raw)
        self._transition(ClientState.WAIT_CERTIFICATE)

    def _on_certificate(self, message: Certificate, raw: bytes) -> None:
        if message.certificate_request_context:
            raise IllegalParameter("server Certificate with a request context")
        if not message.entries:
            raise DecodeError("server sent an empty Certificate")
        chain = [entry.cert_data for entry in message.entries]
        # The reference profile too: the fork skips this check (reference §2.9), but without it nothing binds
        # the server's choice of that profile, or its key exchange, to this connection (docs/tls-qkd.md §5).
        if self.config.verify:   # without trusted CAs this is unknown_ca, never a silent acceptance
            self._peer_leaf = verify_server_chain(chain, self.config.trust, self.server_name,
                                                  check_hostname=self.config.check_hostname)
        else:
            self._peer_leaf = load_chain(chain[:1])[0]
        self._transcript.update(raw)
        self._transition(ClientState.WAIT_CERTIFICATE_VERIFY)

    def _server_authenticated_by_certificate(self) -> bool:
        return self.config.verify and bool(self.config.trust)

    def _on_certificate_verify(self, message: CertificateVerify, raw: bytes) -> None:
        assert self._peer_leaf is not None
        try:
            public_key = self._peer_leaf.public_key()
        except (ValueError, UnsupportedAlgorithm):
            raise UnsupportedCertificate("server certificate key is not usable") from None
        verify(public_key, message.algorithm, message.signature, self._transcript.digest(), server=True,
               offered=list(self.config.signature_algorithms))
        self._transcript.update(raw)
        self._transition(ClientState.WAIT_FINISHED)

    def _on_finished(self, message: Finished, raw: bytes) -> None:
        schedule = self._schedule
        assert schedule is not None and self._suite is not None
        expected = schedule.finished_verify_data(self._server_hs, self._transcript.digest())
        if not constant_time_equal(expected, message.verify_data):
            raise DecryptError("server Finished does not verify")
        self._transcript.update(raw)
        self._handshake.require_empty()
        self._records.allow_ccs = False
        schedule.extract_master()
        self._client_ap, self._server_ap = schedule.application_traffic_secrets(self._transcript.digest())
        self._keylog("CLIENT_TRAFFIC_SECRET_0", self._client_ap)
        self._keylog("SERVER_TRAFFIC_SECRET_0", self._server_ap)
        if self.config.keylog is not None:  # one HKDF and a hash nobody else uses
            self._keylog("EXPORTER_SECRET", schedule.exporter_master_secret(self._transcript.digest()))
        if self._profile == "reference":
            assert self._offer is not None and self._offer.reference is not None
            # No client Finished: both directions switch to the raw QKD key (reference §2.9 step 7).
            self._records.read = qkd_reference.ReferenceProtection(self._offer.key, self._offer.reference.iv)
        else:
            self._send_compat_ccs()
            if self._cert_request is not None:
                self._send_client_certificate()
            verify_data = schedule.finished_verify_data(self._client_hs, self._transcript.digest())
            self._send_handshake(Finished(verify_data))
            self._records.read = AeadProtection(self._suite, *schedule.traffic_keys(self._server_ap))
            self._records.write = AeadProtection(self._suite, *schedule.traffic_keys(self._client_ap))
        self._transition(ClientState.CONNECTED)
        self.info = self._connection_info()
        self._events.append(HandshakeComplete(self.info))

    def _send_client_certificate(self) -> None:
        chain = list(self.config.certificate_chain)
        key = self.config.private_key
        if not chain or key is None:
            self._send_handshake(Certificate(b"", []))   # no certificate: the server decides (§4.4.2.4)
            return
        assert self._cert_request is not None
        schemes = ext.decode_u16_list(ext.find(self._cert_request.extensions, ET.signature_algorithms) or b"")
        scheme = choose_scheme(key, schemes)
        entries = [CertificateEntry(cert.public_bytes(Encoding.DER)) for cert in chain]
        self._send_handshake(Certificate(b"", entries))
        signature = sign(key, scheme, self._transcript.digest(), server=False)
        self._send_handshake(CertificateVerify(int(scheme), signature))

    def _connection_info(self) -> ConnectionInfo:
        assert self._suite is not None and self._group is not None
        key_id = self._offer.key_id if self._mode == "qkd" and self._offer is not None else None
        return ConnectionInfo(
            mode=self._mode,
            profile=self._profile,
            key_id=key_id,
            peer_sae_id=None,
            cipher=self._suite.name,
            group=self._group.name,
            version="TLSv1.3",
            alpn=self._alpn,
            server_name=self.server_name,
            peer_certificate=self._peer_leaf.public_bytes(Encoding.DER) if self._peer_leaf else None,
        )

    # -- post-handshake ---------------------------------------------------------------------------------

    def _on_key_update(self, message: KeyUpdate) -> None:
        schedule = self._schedule
        assert schedule is not None and self._suite is not None
        self._handshake.require_empty()
        self._server_ap = schedule.next_traffic_secret(self._server_ap)
        self._records.read = AeadProtection(self._suite, *schedule.traffic_keys(self._server_ap))
        self._events.append(KeyUpdated("receive"))
        if message.request_update is KeyUpdateRequest.update_requested and not self._close_sent:
            self._send_key_update(KeyUpdateRequest.update_not_requested)

    def _send_key_update(self, request: KeyUpdateRequest) -> None:
        schedule = self._schedule
        assert schedule is not None and self._suite is not None
        self._outgoing += self._records.seal(HANDSHAKE, KeyUpdate(request).to_bytes())
        self._client_ap = schedule.next_traffic_secret(self._client_ap)
        self._records.write = AeadProtection(self._suite, *schedule.traffic_keys(self._client_ap))
        self._events.append(KeyUpdated("send"))

    def _send_post_handshake(self, raw: bytes) -> None:
        self._outgoing += self._records.seal(HANDSHAKE, raw)

    def _start_rekey(self, message: qkd_secure.QkdRekey, offer: QkdOffer) -> None:
        schedule = self._schedule
        assert schedule is not None and self._suite is not None
        raw = encode_handshake(HandshakeType.qkd_rekey, message.encode())
        self._outgoing += self._records.seal(HANDSHAKE, raw)
        self._client_ap = qkd_secure.rekeyed_secret(schedule.algorithm, self._client_ap, offer.key, True)
        self._records.write = AeadProtection(self._suite, *schedule.traffic_keys(self._client_ap))
        self._rekey_pending = offer

    def _on_qkd_rekey(self, message: qkd_secure.QkdRekey) -> None:
        schedule = self._schedule
        offer = self._rekey_pending
        if not self._rekey_negotiated or offer is None or not message.is_ack:
            raise UnexpectedMessage("QkdRekey without a rekey in progress")
        assert schedule is not None and self._suite is not None
        self._handshake.require_empty()
        self._server_ap = qkd_secure.rekeyed_secret(schedule.algorithm, self._server_ap, offer.key, False)
        self._records.read = AeadProtection(self._suite, *schedule.traffic_keys(self._server_ap))
        self._rekey_pending = None
        self._events.append(QkdRekeyed(offer.key_id))


@functools.lru_cache(maxsize=32)
def _constant_extensions(
    groups: tuple[NamedGroup, ...], schemes: tuple[int, ...]
) -> tuple[ext.Extension, ...]:
    """The ClientHello extensions that depend on the configuration only, encoded once per configuration."""
    return (
        ext.Extension(ET.supported_versions, ext.encode_supported_versions_client([TLS13])),
        ext.Extension(ET.supported_groups, ext.encode_u16_list([int(g) for g in groups])),
        ext.Extension(ET.signature_algorithms, ext.encode_u16_list(list(schemes))),
    )


@functools.lru_cache(maxsize=256)
def _server_name_extension(name: str) -> ext.Extension | None:
    """server_name for a host name, None for an IP address (RFC 6066 §3 forbids literal addresses);
    clients connect to the same few names again and again, so each is encoded once."""
    if _is_ip_address(name):
        return None
    return ext.Extension(ET.server_name, ext.encode_server_name(name))


def _is_ip_address(name: str) -> bool:
    # A host name ends in a letter (its top-level label); only that common case skips the parser's
    # exception path, which costs more than the rest of building the extension.
    if ":" not in name and name[-1:].isalpha():
        return False
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
