"""Sans-I/O TLS-QKD server: serves QKD ClientHellos itself and hands classic ones to OpenSSL.

The server reads the first flight, decides, then either runs a QKD handshake or emits :class:`HandOff` with
every byte read so far (the adapter gives them to Python ``ssl``, see :mod:`qkdtls.net.handoff`). So the only
TLS 1.3 server code here is the part OpenSSL cannot do:

* ``secure`` profile: PSK-only handshake (RFC 8446 §4.2.11, ``psk_dhe_ke``) keyed by the QKD key named in the
  identity ``qkd1:<master>:<key_ID>``; no Certificate/CertificateVerify; HelloRetryRequest when no key share
  fits; KeyUpdate; the QKD rekey of :mod:`qkdtls.tls.qkd_secure`.
* ``reference`` profile: the authors' rustls server sequence (ServerHello + 0xFEA7 challenge, wait for the
  0x50 ChallengeAck, then EncryptedExtensions, Certificate, CertificateVerify, Finished under handshake keys,
  no client Finished, then the insecure raw-key records of :mod:`qkdtls.tls.qkd_reference`).

Anything that is not a well-formed TLS 1.3 ClientHello is not ours either: under ``preferred``/``off`` it is
handed off too, so OpenSSL answers with the RFC-correct alert. Under ``required`` the server refuses.
Every protocol failure queues a fatal alert in :meth:`TLSServer.data_to_send` and raises a ``TLSAlert``.
"""

from __future__ import annotations

import enum
import logging
import os
from collections import deque
from collections.abc import Callable

from cryptography.hazmat.primitives.serialization import Encoding

from qkdtls.logs import LogLimiter

from . import extensions as ext
from .alerts import (
    AlertDescription,
    AlertLevel,
    DecodeError,
    DecryptError,
    HandshakeFailure,
    IllegalParameter,
    InsufficientSecurity,
    InternalError,
    InvalidState,
    MissingExtension,
    NoApplicationProtocol,
    PeerAlert,
    TLSAlert,
    UnexpectedMessage,
    encode_alert,
)
from .config import ServerConfig
from .events import (
    ApplicationData,
    ConnectionClosed,
    ConnectionInfo,
    Event,
    HandOff,
    HandshakeComplete,
    KeysAnnounced,
    KeyUpdated,
    NeedQkdKey,
    NeedRekeyKey,
    QkdRekeyed,
)
from .groups import NamedGroup, parse_group, server_exchange
from .key_schedule import KeySchedule, Transcript, constant_time_equal, hmac_digest
from .messages import (
    HRR_RANDOM,
    Certificate,
    CertificateEntry,
    CertificateVerify,
    ClientHello,
    EncryptedExtensions,
    Finished,
    HandshakeType,
    KeyUpdate,
    KeyUpdateRequest,
    ServerHello,
)
from .qkd_reference import (
    CONTENT_TYPE_CHALLENGE,
    KEY_LEN,
    RECORD_VERSION_QKD,
    Challenge,
    QkdRequest,
    ReferenceProtection,
    open_challenge,
    seal_challenge,
    secure_offer_iv,
)
from .qkd_secure import (
    EXT_QKD_KEY_ANNOUNCE,
    EXT_QKD_REKEY,
    HANDSHAKE_QKD_KEY_ANNOUNCE,
    QkdKeyAnnounce,
    QkdRekey,
    key_long_enough,
    parse_psk_identity,
    rekeyed_secret,
)
from .records import (
    ALERT,
    APPLICATION_DATA,
    COMPAT_CCS_RECORD,
    HANDSHAKE,
    HEADER_LENGTH,
    MAX_PLAINTEXT,
    AeadProtection,
    HandshakeBuffer,
    Outgoing,
    RecordLayer,
    encode_handshake,
)
from .signatures import choose_scheme, sign
from .suites import CipherSuite, params

log = logging.getLogger(__name__)
# Refused handshakes are logged at a bounded rate: anyone who can connect can cause them.
_limited = LogLimiter(log)

# The first flight is read before anything is decided; a ClientHello (even with an ML-KEM share) fits
# easily, and the bound keeps a peer from making the server buffer without limit.
MAX_FIRST_FLIGHT = 1 << 16
TLS13 = 0x0304
_SUPPORTED_VERSIONS = ext.Extension(ext.ET.supported_versions, ext.encode_supported_versions_server(TLS13))
_QKD_REKEY = ext.Extension(EXT_QKD_REKEY, b"")
_QKD_KEY_ANNOUNCE = ext.Extension(EXT_QKD_KEY_ANNOUNCE, b"")


class State(enum.Enum):
    FIRST_FLIGHT = "first flight"
    WAIT_QKD_KEY = "waiting for the QKD key"
    WAIT_CLIENT_HELLO2 = "waiting for the second ClientHello"
    WAIT_CHALLENGE_ACK = "waiting for the ChallengeAck"
    WAIT_FINISHED = "waiting for the client Finished"
    CONNECTED = "connected"
    HANDED_OFF = "handed off"
    CLOSED = "closed"
    FAILED = "failed"


class _Offer:
    """What the first ClientHello offered, as far as the QKD decision needs it."""

    def __init__(self) -> None:
        self.profile: str | None = None
        self.key_id = ""
        self.master_sae_id = 0
        self.psk_index = 0
        self.suite: CipherSuite | None = None
        self.reference: QkdRequest | None = None
        self.psks: ext.OfferedPsks | None = None   # the first ClientHello's, decoded once


class TLSServer:
    """One server-side connection. See docs/design.md for the event protocol."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.state = State.FIRST_FLIGHT
        self._first = bytearray()
        self._records = RecordLayer()
        self._handshake = HandshakeBuffer()
        self._out = Outgoing()
        self._events: deque[Event] = deque()
        self._offer = _Offer()
        self._client_hello: ClientHello | None = None
        self._client_hello_raw = b""
        self._transcript = Transcript()
        self._schedule: KeySchedule | None = None
        self._qkd_key: bytes | None = None
        self._group: NamedGroup | None = None
        self._retried = False
        self._alpn: str | None = None
        self._rekey = False
        self._announce = False       # 0xFEA9 negotiated
        self._announced = False      # the one QkdKeyAnnounce of this connection was received
        self._client_secret = b""
        self._server_secret = b""
        self._client_hs_secret = b""
        self._server_hs_secret = b""
        self._challenge: Challenge | None = None
        self._pending_rekey: str | None = None
        self._eof = False
        self._close_sent = False
        self._peer_closed = False
        self.server_name: str | None = None
        self.info: ConnectionInfo | None = None

    def __repr__(self) -> str:
        return f"TLSServer(state={self.state.value!r}, profile={self._offer.profile!r})"

    # ------------------------------------------------------------------------------------------------------
    # Public interface

    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer; ``b""`` is EOF. Anything after the peer's close_notify is ignored (§6.1)."""
        if self.state in (State.FAILED, State.CLOSED, State.HANDED_OFF) or self._peer_closed:
            return
        self._guard(self._receive, data)

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def data_to_send(self) -> bytes:
        return self._out.take_joined()

    def data_to_send_buffers(self) -> list[bytes | bytearray]:
        """What :meth:`data_to_send` would return, as the separate buffers it was sealed in (no copy)."""
        return self._out.take()

    def send_data(self, data: bytes | bytearray | memoryview) -> None:
        if self.state is not State.CONNECTED or self._close_sent:
            raise InvalidState(f"cannot send application data while {self.state.value}")
        if data:
            self._out.extend(self._records.seal_each(APPLICATION_DATA, data))

    def close(self) -> None:
        """Queue close_notify (once; also after the peer's own close_notify, RFC 8446 §6.1).

        An established connection stays readable until the peer's close_notify (half-close); a handshake in
        progress is abandoned.
        """
        if self._close_sent or self.state in (State.FAILED, State.HANDED_OFF):
            return
        self._close_sent = True
        if self.state is not State.FIRST_FLIGHT:
            self._out += self._records.seal(
                ALERT, encode_alert(AlertDescription.close_notify, AlertLevel.warning)
            )
        if self.state is not State.CONNECTED or self._peer_closed:
            self.state = State.CLOSED

    def update_key(self, request_peer: bool = True) -> None:
        if self.state is not State.CONNECTED or self._offer.profile != "secure" or self._close_sent:
            raise InvalidState("KeyUpdate needs an established secure-profile connection")
        request = KeyUpdateRequest.update_requested if request_peer else KeyUpdateRequest.update_not_requested
        self._guard(self._send_key_update, request)

    def provide_qkd_key(self, key: bytes | None) -> None:
        """Answer to :class:`NeedQkdKey`: the key from dec_keys, or None when the KME refused."""
        if self.state is not State.WAIT_QKD_KEY:
            raise InvalidState("no QKD key was asked for")
        self._guard(self._on_qkd_key, key)

    def provide_rekey_key(self, key: bytes | None) -> None:
        """Answer to :class:`NeedRekeyKey`."""
        if self._pending_rekey is None or self.state is not State.CONNECTED:
            raise InvalidState("no rekey key was asked for")
        self._guard(self._on_rekey_key, key)

    # ------------------------------------------------------------------------------------------------------
    # Error handling: every failure becomes one fatal alert

    def _guard(self, step: Callable[..., None], *args: object) -> None:
        try:
            step(*args)
        except TLSAlert as alert:
            self._fail(alert)
            raise
        except (InvalidState, PeerAlert):
            raise
        except Exception as exc:  # a defect must still end in an alert, never in a half-open connection
            log.exception("TLS server internal error")
            alert = InternalError("internal error")
            self._fail(alert)
            raise alert from exc

    def _fail(self, alert: TLSAlert) -> None:
        if self.state in (State.FAILED, State.HANDED_OFF):
            return
        body = encode_alert(alert.description, AlertLevel.fatal)
        try:
            self._out += self._records.seal(ALERT, body)
        except Exception:  # the write protection itself failed: send nothing rather than garbage
            log.debug("could not seal the fatal alert")
        self.state = State.FAILED
        _limited(
            logging.INFO,
            "TLS-QKD connection failed",
            {"event": "tls.alert_sent", "alert": alert.description.name},
        )

    # ------------------------------------------------------------------------------------------------------
    # Input

    def _receive(self, data: bytes) -> None:
        if not data:
            self._eof = True
        if self.state is State.FIRST_FLIGHT:
            if data:
                self._first += data
            self._read_first_flight()
            return
        if self.state is State.WAIT_QKD_KEY:
            self._first += data  # a KME refusal may still hand every byte to OpenSSL
        with self._records.borrowing(data):
            self._process_records()

    def _process_records(self) -> None:
        # Bounded by the buffered input: each pass consumes a record or returns.
        while (
            self.state not in (State.WAIT_QKD_KEY, State.FAILED, State.CLOSED)
            and self._pending_rekey is None
            and not self._peer_closed
        ):
            if self.state is State.CONNECTED and not self._handshake.pending:
                # The bulk path: a run of application-data records in one call.
                for plaintext in self._records.application_data_run():
                    if plaintext:
                        self._events.append(ApplicationData(plaintext))
            record = self._records.next_record()
            if record is None:
                break
            content_type, payload = record
            if content_type == ALERT:
                self._on_alert(payload)
            elif content_type == CONTENT_TYPE_CHALLENGE:
                self._on_challenge_ack(payload)
            elif content_type == HANDSHAKE:
                self._handshake.add(payload)
                self._process_handshake()
            elif content_type == APPLICATION_DATA:
                if self.state is not State.CONNECTED or self._handshake.pending:
                    raise UnexpectedMessage("application data before the handshake completed")
                if payload:
                    self._events.append(ApplicationData(payload))
            else:
                raise UnexpectedMessage(f"unexpected record type {content_type}")
        # EOF while the KME is asked is reported once the answer was processed (it may still hand off).
        waiting = self.state is State.WAIT_QKD_KEY or self._pending_rekey is not None
        if (
            self._eof
            and not waiting
            and not self._peer_closed
            and self.state not in (State.FAILED, State.CLOSED)
        ):
            if self.state is not State.CONNECTED:
                # A handshake the client abandoned (e.g. before its ChallengeAck): fail now, as OpenSSL does
                # with decode_error, rather than wait for the adapter's handshake deadline.
                raise DecodeError(f"the client closed the connection while {self.state.value}")
            self._peer_closed_read()

    def _on_alert(self, payload: bytes) -> None:
        if len(payload) != 2:
            raise DecodeError("malformed alert")
        level, description = payload
        if description == AlertDescription.close_notify:
            self._peer_closed_read()
            return
        if description == AlertDescription.user_canceled and level == AlertLevel.warning:
            return
        self.state = State.FAILED
        self._events.append(ConnectionClosed(description))
        raise PeerAlert(description, level)

    def _peer_closed_read(self) -> None:
        """The peer finished sending. An established connection stays writable until :meth:`close`
        (TLS 1.3 half-close); a handshake in progress is over."""
        self._peer_closed = True
        if self.state is not State.CONNECTED or self._close_sent:
            self.state = State.CLOSED
        self._events.append(ConnectionClosed(None))

    def _process_handshake(self) -> None:
        while self.state not in (State.FAILED, State.CLOSED) and self._pending_rekey is None:
            message = self._handshake.next_message()
            if message is None:
                return
            msg_type, body, raw = message
            if self.state is State.WAIT_CLIENT_HELLO2 and msg_type == HandshakeType.client_hello:
                self._on_client_hello2(body, raw)
            elif self.state is State.WAIT_FINISHED and msg_type == HandshakeType.finished:
                self._on_client_finished(body, raw)
            elif self.state is State.CONNECTED and self._offer.profile == "secure":
                self._on_post_handshake(msg_type, body)
            else:
                raise UnexpectedMessage(f"handshake message {msg_type} while {self.state.value}")

    # ------------------------------------------------------------------------------------------------------
    # First flight: framing by hand, because the raw bytes may have to go to OpenSSL untouched

    def _read_first_flight(self) -> None:
        try:
            framed = _frame_client_hello(bytes(self._first))
        except TLSAlert as error:
            self._not_ours(error)
            return
        if framed is None:
            if len(self._first) > MAX_FIRST_FLIGHT:
                self._not_ours(DecodeError("first flight too large"))
            elif self._eof:
                # OpenSSL answers a first flight cut short by the end of the stream (even an empty one) with
                # decode_error at once; so do we, or OpenSSL itself after the hand-off.
                self._not_ours(DecodeError("the client closed before its ClientHello was complete"))
            return
        body, raw, consumed = framed
        try:
            hello = ClientHello.decode(body)
            server_name = self._server_name(hello)
        except TLSAlert as error:
            self._not_ours(error)
            return
        self._records.feed(bytes(self._first[consumed:]))
        self._client_hello, self._client_hello_raw = hello, raw
        self.server_name = server_name
        try:
            offered = self.config.qkd != "off" and self._find_offer(hello)
        except TLSAlert as error:
            if not self._offer.key_id:  # malformed, but not in a QKD element: OpenSSL may judge it
                self._not_ours(error)
                return
            raise
        if offered:
            self.state = State.WAIT_QKD_KEY
            self._events.append(
                NeedQkdKey(self._offer.key_id, self._offer.master_sae_id, self._offer.profile or "")
            )
            return
        self._not_ours(InsufficientSecurity("the client offered no usable QKD key"))

    def _not_ours(self, reason: TLSAlert) -> None:
        """Not a usable QKD ClientHello: refuse under ``required``, otherwise let OpenSSL serve it."""
        if self.config.qkd == "required":
            raise reason
        self.state = State.HANDED_OFF
        self._events.append(HandOff(bytes(self._first), eof=self._eof))

    @staticmethod
    def _server_name(hello: ClientHello) -> str | None:
        data = ext.find(hello.extensions, ext.ET.server_name)
        return ext.decode_server_name(data) if data is not None else None

    def _find_offer(self, hello: ClientHello) -> bool:
        """Fill ``self._offer`` from the ClientHello; False if no profile we serve is offered."""
        if hello.legacy_compression_methods != b"\x00":
            return False
        versions_data = ext.find(hello.extensions, ext.ET.supported_versions)
        if versions_data is None or TLS13 not in ext.decode_supported_versions_client(versions_data):
            return False
        if "secure" in self.config.qkd_profiles and self._find_secure_offer(hello):
            self._offer.profile = "secure"
            return True
        data = ext.find(hello.extensions, ext.ET.qkd_reference_request)
        if "reference" in self.config.qkd_profiles and data is not None:
            request = QkdRequest.decode(data)
            self._offer.profile = "reference"
            self._offer.reference = request
            self._offer.key_id, self._offer.master_sae_id = request.key_uuid, request.origin_sae_id
            return True
        return False

    def _find_secure_offer(self, hello: ClientHello) -> bool:
        psk_data = ext.find(hello.extensions, ext.ET.pre_shared_key)
        if psk_data is None:
            return False
        if hello.extensions[-1].type != ext.ET.pre_shared_key:
            raise IllegalParameter("pre_shared_key is not the last extension")
        modes_data = ext.find(hello.extensions, ext.ET.psk_key_exchange_modes)
        if modes_data is None:
            raise MissingExtension("pre_shared_key without psk_key_exchange_modes")
        if ext.PSK_DHE_KE not in ext.decode_psk_modes(modes_data):
            return False  # psk_ke alone gives no forward secrecy: never accepted
        offered = ext.OfferedPsks.decode(psk_data)
        self._offer.psks = offered
        for index, psk in enumerate(offered.identities):
            parsed = parse_psk_identity(psk.identity)
            if parsed is None:
                continue
            suite = self._psk_suite(hello, len(offered.binders[index]))
            if suite is None:
                continue
            self._offer.master_sae_id, self._offer.key_id = parsed
            self._offer.psk_index, self._offer.suite = index, suite
            return True
        return False

    def _psk_suite(self, hello: ClientHello, binder_length: int) -> CipherSuite | None:
        """The client's first suite we enable whose hash is the PSK's (the binder length tells which)."""
        enabled = set(self.config.cipher_suites)
        for value in hello.cipher_suites:
            if value in enabled and params(value).hash_length == binder_length:
                return CipherSuite(value)
        return None

    # ------------------------------------------------------------------------------------------------------
    # The QKD key arrives

    def _on_qkd_key(self, key: bytes | None) -> None:
        profile = self._offer.profile
        if key is None:
            _limited(
                logging.INFO,
                "QKD key unavailable",
                {"event": "tls.qkd_key_unavailable", "key_ID": self._offer.key_id},
            )
            self._not_ours(InsufficientSecurity("the KME did not deliver the QKD key"))
            return
        if not key_long_enough(key) or (profile == "reference" and len(key) != KEY_LEN):
            # A key the profile cannot use is one the KME did not give: classic or refused, never weak.
            _limited(
                logging.WARNING,
                "QKD key of an unusable length",
                {"event": "tls.qkd_key_unusable", "key_ID": self._offer.key_id, "bits": 8 * len(key)},
            )
            self._not_ours(InsufficientSecurity("the QKD key is too short for this profile"))
            return
        request = self._offer.reference
        if (
            profile == "reference"
            and request is not None
            and "secure" in self.config.qkd_profiles
            and constant_time_equal(request.iv, secure_offer_iv(key))
        ):
            # The client offered this key as a secure-profile PSK too, and we serve that profile: had the PSK
            # arrived we would have chosen it. Someone removed or spoiled it; the reference profile is exactly
            # what such an attacker wants (docs/tls-qkd.md §5), so it is never the answer.
            _limited(
                logging.WARNING,
                "reference offer refused: the ClientHello lost its secure-profile offer",
                {"event": "tls.qkd_downgrade_refused", "key_ID": self._offer.key_id},
            )
            self._not_ours(InsufficientSecurity("the secure-profile offer was removed from the ClientHello"))
            return
        self._qkd_key = key
        assert self._client_hello is not None
        if profile == "secure":
            self._start_secure(self._client_hello, self._client_hello_raw)
        else:
            self._start_reference(self._client_hello, self._client_hello_raw)
        self._process_records()

    def _choose_group(self, hello: ClientHello) -> tuple[NamedGroup, bytes] | NamedGroup:
        """(group, client share) for a share we support, else the group to ask for in a HelloRetryRequest."""
        share_data = ext.find(hello.extensions, ext.ET.key_share)
        groups_data = ext.find(hello.extensions, ext.ET.supported_groups)
        if share_data is None or groups_data is None:
            # psk_dhe_ke and certificate handshakes both need the pair (RFC 8446 §4.2.9, §9.2)
            raise MissingExtension("key_share and supported_groups are required")
        shares = dict(ext.decode_key_share_client(share_data))
        ours = [parse_group(g) for g in self.config.groups]
        for group in ours:
            if int(group) in shares:
                return group, shares[int(group)]
        supported = ext.decode_u16_list(groups_data)
        for group in ours:
            if int(group) in supported:
                return group
        raise HandshakeFailure("no common key exchange group")

    def _choose_alpn(self, hello: ClientHello) -> None:
        data = ext.find(hello.extensions, ext.ET.application_layer_protocol_negotiation)
        if data is None or not self.config.alpn_protocols:
            return
        offered = ext.decode_alpn(data)
        for protocol in self.config.alpn_protocols:
            if protocol.encode("utf-8") in offered:
                self._alpn = protocol
                return
        raise NoApplicationProtocol("no common application protocol")

    # -- secure profile ---------------------------------------------------------------------------------

    def _verify_binder(self, hello: ClientHello, raw: bytes) -> None:
        """RFC 8446 §4.2.11.2, in constant time, before anything of the ClientHello is trusted."""
        assert self._schedule is not None
        index = self._offer.psk_index
        if hello is self._client_hello and self._offer.psks is not None:
            offered = self._offer.psks  # decoded and its identity checked by _find_secure_offer
        else:
            psk_data = ext.find(hello.extensions, ext.ET.pre_shared_key)
            if psk_data is None:
                raise IllegalParameter("the second ClientHello dropped the PSK")
            offered = ext.OfferedPsks.decode(psk_data)
            if index >= len(offered.identities) or parse_psk_identity(
                offered.identities[index].identity
            ) != (self._offer.master_sae_id, self._offer.key_id):
                raise IllegalParameter("the second ClientHello changed the PSK")
        truncated = raw[: len(raw) - ext.binders_length(offered.binders)]
        binder_key = self._schedule.binder_key(external=True)
        expected = hmac_digest(
            self._schedule.algorithm,
            self._schedule.finished_key(binder_key),
            self._transcript.digest_with(truncated),
        )
        if not constant_time_equal(expected, offered.binders[index]):
            raise DecryptError("PSK binder does not verify")

    def _start_secure(self, hello: ClientHello, raw: bytes) -> None:
        suite = self._offer.suite
        assert suite is not None and self._qkd_key is not None
        self._schedule = KeySchedule(suite)
        self._transcript.set_algorithm(self._schedule.algorithm)
        self._schedule.extract_early(self._qkd_key)
        self._verify_binder(hello, raw)
        self._choose_alpn(hello)
        self._rekey = self.config.rekey and ext.find(hello.extensions, EXT_QKD_REKEY) is not None
        self._announce = (
            self.config.accept_key_announcements
            and ext.find(hello.extensions, EXT_QKD_KEY_ANNOUNCE) is not None
        )
        choice = self._choose_group(hello)
        if isinstance(choice, NamedGroup):
            self._send_hello_retry_request(hello, raw, suite, choice)
            return
        self._transcript.update(raw)
        self._send_secure_flight(hello, suite, *choice)

    def _send_hello_retry_request(
        self, hello: ClientHello, raw: bytes, suite: CipherSuite, group: NamedGroup
    ) -> None:
        self._transcript.update(raw)
        self._transcript.replace_with_message_hash()
        hrr = ServerHello(
            HRR_RANDOM,
            hello.legacy_session_id,
            int(suite),
            [
                ext.Extension(ext.ET.supported_versions, ext.encode_supported_versions_server(TLS13)),
                ext.Extension(ext.ET.key_share, ext.encode_key_share_hrr(int(group))),
            ],
        )
        message = hrr.to_bytes()
        self._transcript.update(message)
        self._out += self._records.seal(HANDSHAKE, message)
        if hello.legacy_session_id:
            self._out += COMPAT_CCS_RECORD
        self._group, self._retried = group, True
        self._records.allow_ccs = True
        self.state = State.WAIT_CLIENT_HELLO2

    def _on_client_hello2(self, body: bytes, raw: bytes) -> None:
        hello = ClientHello.decode(body)
        first = self._client_hello
        assert first is not None and self._offer.suite is not None and self._group is not None
        if (
            hello.legacy_session_id != first.legacy_session_id
            or int(self._offer.suite) not in hello.cipher_suites
        ):
            raise IllegalParameter("the second ClientHello is inconsistent with the first")
        if hello.extensions[-1].type != ext.ET.pre_shared_key:
            raise IllegalParameter("pre_shared_key is not the last extension")
        self._verify_binder(hello, raw)
        share_data = ext.find(hello.extensions, ext.ET.key_share)
        shares = ext.decode_key_share_client(share_data) if share_data is not None else []
        if len(shares) != 1 or shares[0][0] != int(self._group):
            raise IllegalParameter("the second ClientHello must offer exactly the requested key share")
        self._client_hello = hello
        self._transcript.update(raw)
        self._send_secure_flight(hello, self._offer.suite, self._group, shares[0][1])

    def _send_secure_flight(
        self, hello: ClientHello, suite: CipherSuite, group: NamedGroup, share: bytes
    ) -> None:
        assert self._schedule is not None
        self._group = group
        server_share, shared_secret = server_exchange(group, share)
        server_hello = ServerHello(
            os.urandom(32),
            hello.legacy_session_id,
            int(suite),
            [
                _SUPPORTED_VERSIONS,
                ext.Extension(ext.ET.key_share, ext.encode_key_share_server(int(group), server_share)),
                ext.Extension(ext.ET.pre_shared_key, ext.encode_selected_identity(self._offer.psk_index)),
            ],
        )
        self._send_plain_handshake(server_hello.to_bytes())
        if hello.legacy_session_id and not self._retried:
            self._out += COMPAT_CCS_RECORD
        self._enter_handshake_keys(hello, shared_secret)
        extensions = self._common_encrypted_extensions()
        if self._rekey:
            extensions.append(_QKD_REKEY)
        if self._announce:
            extensions.append(_QKD_KEY_ANNOUNCE)
        self._send_protected_handshake(EncryptedExtensions(extensions).to_bytes())
        self._send_server_finished()
        self._records.allow_ccs = True
        self.state = State.WAIT_FINISHED

    def _on_client_finished(self, body: bytes, raw: bytes) -> None:
        assert self._schedule is not None
        finished = Finished.decode(body, self._schedule.hash_length)
        expected = self._schedule.finished_verify_data(self._client_hs_secret, self._transcript.digest())
        if not constant_time_equal(expected, finished.verify_data):
            raise DecryptError("client Finished does not verify")
        self._transcript.update(raw)
        self._handshake.require_empty()
        self._records.read = self._aead(self._client_secret)
        self._records.allow_ccs = False
        self._complete()

    # -- reference profile ------------------------------------------------------------------------------

    def _start_reference(self, hello: ClientHello, raw: bytes) -> None:
        request = self._offer.reference
        assert request is not None and self._qkd_key is not None
        if not self.config.certificate_chain or self.config.private_key is None:
            raise HandshakeFailure("the reference profile needs a server certificate")
        suite = self._negotiate_suite(hello)
        self._offer.suite = suite
        self._schedule = KeySchedule(suite)
        self._transcript.set_algorithm(self._schedule.algorithm)
        self._schedule.extract_early(None)
        self._choose_alpn(hello)
        choice = self._choose_group(hello)
        if isinstance(choice, NamedGroup):
            # The fork never retries; a reference client that offers no usable share cannot be served.
            raise HandshakeFailure("the reference profile needs a key share we support")
        group, share = choice
        self._group = group
        server_share, shared_secret = server_exchange(group, share)
        self._challenge = Challenge.random()
        sealed = seal_challenge(self._qkd_key, request.iv, 0, self._challenge)
        server_hello = ServerHello(
            os.urandom(32),
            hello.legacy_session_id,
            int(suite),
            [  # the fork's order: key_share, supported_versions, 0xFEA7
                ext.Extension(ext.ET.key_share, ext.encode_key_share_server(int(group), server_share)),
                ext.Extension(ext.ET.supported_versions, ext.encode_supported_versions_server(TLS13)),
                ext.Extension(ext.ET.qkd_reference_ack, sealed),
            ],
        )
        self._transcript.update(raw)
        self._send_plain_handshake(server_hello.to_bytes())
        self._enter_handshake_keys(hello, shared_secret, switch_write=False)
        # The fork's client answers the challenge in a 0x50 record; a compatibility CCS before it is harmless.
        self._records.raw_types = {CONTENT_TYPE_CHALLENGE: RECORD_VERSION_QKD}   # the fork sends 0x0E00
        self._records.allow_ccs = True
        self.state = State.WAIT_CHALLENGE_ACK

    def _negotiate_suite(self, hello: ClientHello) -> CipherSuite:
        offered = set(hello.cipher_suites)
        for suite in self.config.cipher_suites:
            if int(suite) in offered:
                return CipherSuite(suite)
        raise HandshakeFailure("no common cipher suite")

    def _on_challenge_ack(self, body: bytes) -> None:
        request = self._offer.reference
        if self.state is not State.WAIT_CHALLENGE_ACK or request is None or self._challenge is None:
            raise UnexpectedMessage("unexpected QKD ChallengeAck")
        assert self._qkd_key is not None and self._schedule is not None
        answer = open_challenge(self._qkd_key, request.iv, 1, body)
        if not self._challenge.is_answered_by(answer):
            raise DecryptError("the QKD challenge was not answered")
        self._records.raw_types = {}
        self._handshake.require_empty()
        self._records.write = self._aead(self._server_hs_secret)
        self._send_protected_handshake(EncryptedExtensions(self._common_encrypted_extensions()).to_bytes())
        chain = [CertificateEntry(cert.public_bytes(Encoding.DER)) for cert in self.config.certificate_chain]
        self._send_protected_handshake(Certificate(b"", chain).to_bytes())
        hello = self._client_hello
        assert hello is not None
        schemes_data = ext.find(hello.extensions, ext.ET.signature_algorithms)
        if schemes_data is None:
            raise MissingExtension("certificate authentication needs signature_algorithms")
        scheme = choose_scheme(self.config.private_key, ext.decode_u16_list(schemes_data))
        signature = sign(self.config.private_key, scheme, self._transcript.digest(), server=True)
        self._send_protected_handshake(CertificateVerify(int(scheme), signature).to_bytes())
        self._send_server_finished(switch_write=False)
        # From here the fork protects both directions with the raw key and one IV (the insecure part).
        self._records.write = ReferenceProtection(self._qkd_key, request.iv)
        self._records.read = ReferenceProtection(self._qkd_key, request.iv)
        self._records.allow_ccs = False
        self._complete()

    # -- shared handshake steps ------------------------------------------------------------------------

    def _send_plain_handshake(self, message: bytes) -> None:
        self._transcript.update(message)
        self._out += self._records.seal(HANDSHAKE, message)

    def _send_protected_handshake(self, message: bytes) -> None:
        self._transcript.update(message)
        self._out += self._records.seal(HANDSHAKE, message)

    def _enter_handshake_keys(
        self, hello: ClientHello, shared_secret: bytes, switch_write: bool = True
    ) -> None:
        assert self._schedule is not None
        self._schedule.extract_handshake(shared_secret)
        client_hs, server_hs = self._schedule.handshake_traffic_secrets(self._transcript.digest())
        self._client_hs_secret, self._server_hs_secret = client_hs, server_hs
        self._keylog("CLIENT_HANDSHAKE_TRAFFIC_SECRET", hello.random, client_hs)
        self._keylog("SERVER_HANDSHAKE_TRAFFIC_SECRET", hello.random, server_hs)
        self._handshake.require_empty()
        self._records.read = self._aead(client_hs)
        if switch_write:
            self._records.write = self._aead(server_hs)

    def _send_server_finished(self, switch_write: bool = True) -> None:
        assert self._schedule is not None and self._client_hello is not None
        verify_data = self._schedule.finished_verify_data(self._server_hs_secret, self._transcript.digest())
        self._send_protected_handshake(Finished(verify_data).to_bytes())
        self._schedule.extract_master()
        client_ap, server_ap = self._schedule.application_traffic_secrets(self._transcript.digest())
        self._client_secret, self._server_secret = client_ap, server_ap
        self._keylog("CLIENT_TRAFFIC_SECRET_0", self._client_hello.random, client_ap)
        self._keylog("SERVER_TRAFFIC_SECRET_0", self._client_hello.random, server_ap)
        if switch_write:
            self._records.write = self._aead(server_ap)

    def _common_encrypted_extensions(self) -> list[ext.Extension]:
        extensions: list[ext.Extension] = []
        if self._alpn is not None:
            extensions.append(
                ext.Extension(ext.ET.application_layer_protocol_negotiation, ext.encode_alpn([self._alpn]))
            )
        return extensions

    def _aead(self, secret: bytes) -> AeadProtection:
        assert self._schedule is not None
        key, iv = self._schedule.traffic_keys(secret)
        return AeadProtection(self._schedule.suite, key, iv)

    def _keylog(self, label: str, client_random: bytes, secret: bytes) -> None:
        if self.config.keylog is not None:
            self.config.keylog(f"{label} {client_random.hex()} {secret.hex()}")

    def _complete(self) -> None:
        assert self._offer.suite is not None
        self.state = State.CONNECTED
        self._qkd_key = None if self._offer.profile == "secure" else self._qkd_key
        self.info = ConnectionInfo(
            mode="qkd",
            profile=self._offer.profile,
            key_id=self._offer.key_id,
            peer_sae_id=self._offer.master_sae_id,
            cipher=self._offer.suite.name,
            group=self._group.name if self._group is not None else None,
            version="TLSv1.3",
            alpn=self._alpn,
            server_name=self.server_name,
        )
        if log.isEnabledFor(logging.INFO):   # the record's extra dict is built only when it is emitted
            log.info(
                "TLS-QKD handshake complete",
                extra={
                    "event": "tls.qkd_handshake",
                    "profile": self._offer.profile,
                    "key_ID": self._offer.key_id,
                },
            )
        self._events.append(HandshakeComplete(self.info))

    # ------------------------------------------------------------------------------------------------------
    # After the handshake (secure profile): KeyUpdate and the QKD rekey

    def _on_post_handshake(self, msg_type: int, body: bytes) -> None:
        assert self._schedule is not None
        if msg_type == HandshakeType.key_update:
            request = KeyUpdate.decode(body).request_update
            self._handshake.require_empty()
            self._client_secret = self._schedule.next_traffic_secret(self._client_secret)
            self._records.read = self._aead(self._client_secret)
            self._events.append(KeyUpdated("receive"))
            if request is KeyUpdateRequest.update_requested and not self._close_sent:
                self._send_key_update(KeyUpdateRequest.update_not_requested)
        elif msg_type == HandshakeType.qkd_rekey and self._rekey:
            message = QkdRekey.decode(body)
            if message.is_ack:
                raise UnexpectedMessage("a QkdRekey ack from the client")
            self._handshake.require_empty()
            self._pending_rekey = message.key_id
            self._events.append(NeedRekeyKey(message.key_id, self._offer.master_sae_id))
        elif msg_type == HANDSHAKE_QKD_KEY_ANNOUNCE and self._announce and not self._announced:
            # One per connection: with at most 16 IDs each, a client cannot make the server collect more.
            announcement = QkdKeyAnnounce.decode(body)
            self._announced = True
            self._events.append(KeysAnnounced(self._offer.master_sae_id, announcement.key_ids))
        else:
            raise UnexpectedMessage(f"handshake message {msg_type} after the handshake")

    def _send_key_update(self, request: KeyUpdateRequest) -> None:
        assert self._schedule is not None
        self._out += self._records.seal(HANDSHAKE, KeyUpdate(request).to_bytes())
        self._server_secret = self._schedule.next_traffic_secret(self._server_secret)
        self._records.write = self._aead(self._server_secret)
        self._events.append(KeyUpdated("send"))

    def _on_rekey_key(self, key: bytes | None) -> None:
        assert self._schedule is not None and self._pending_rekey is not None
        if not key_long_enough(key):
            raise HandshakeFailure("the KME did not deliver a usable rekey key")
        algorithm = self._schedule.algorithm
        self._client_secret = rekeyed_secret(algorithm, self._client_secret, key, client=True)
        self._records.read = self._aead(self._client_secret)
        # The ack goes under the old write key; the client switches its read key when it sees it.
        self._out += self._records.seal(
            HANDSHAKE, encode_handshake(HandshakeType.qkd_rekey, QkdRekey().encode())
        )
        self._server_secret = rekeyed_secret(algorithm, self._server_secret, key, client=False)
        self._records.write = self._aead(self._server_secret)
        key_id, self._pending_rekey = self._pending_rekey, None
        self._events.append(QkdRekeyed(key_id))
        log.info("QKD rekey", extra={"event": "tls.qkd_rekey", "key_ID": key_id})
        self._process_records()


def _frame_client_hello(data: bytes) -> tuple[bytes, bytes, int] | None:
    """(ClientHello body, whole handshake message, bytes consumed) from the first records, or None if more
    input is needed. Raises DecodeError/UnexpectedMessage for anything that is not a TLS ClientHello."""
    buffer = HandshakeBuffer(max_message=MAX_FIRST_FLIGHT)
    pos = 0
    # Bounded: each pass consumes one record of at least one byte.
    while len(data) - pos >= HEADER_LENGTH:
        content_type, major = data[pos], data[pos + 1]
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        if content_type != HANDSHAKE or major != 3:
            raise UnexpectedMessage("the first record is not a TLS handshake record")
        if length == 0 or length > MAX_PLAINTEXT:
            raise DecodeError("bad first record length")
        if len(data) - pos < HEADER_LENGTH + length:
            return None
        if pos == 0 and data[HEADER_LENGTH] != HandshakeType.client_hello:
            raise UnexpectedMessage("the first handshake message is not a ClientHello")
        buffer.add(data[pos + HEADER_LENGTH : pos + HEADER_LENGTH + length])
        pos += HEADER_LENGTH + length
        message = buffer.next_message()
        if message is not None:
            if buffer.pending:
                raise UnexpectedMessage("data after the ClientHello in its record")
            msg_type, body, raw = message
            if msg_type != HandshakeType.client_hello:
                raise UnexpectedMessage("the first handshake message is not a ClientHello")
            return body, raw, pos
    return None
