"""One connection as an adapter sees it: the sans-I/O TLS-QKD engine, or OpenSSL after a classic hand-off.

The blocking socket and the asyncio transport share this object so that the decisions (hand-off, error
mapping, who sent which alert) are made once; the adapters only move bytes and make the KME calls the events
ask for. Every core error is translated into a :mod:`qkdtls.net.errors` exception *after* the alert the core
queued is left in :meth:`data_to_send`, so an adapter flushes, then raises.
"""

from __future__ import annotations

import ssl
from collections import deque
from typing import Any, Protocol

from qkdtls.net.errors import (
    QKDConnectionError,
    QKDError,
    QKDHandshakeError,
    QKDPolicyError,
)
from qkdtls.net.handoff import ClassicSession
from qkdtls.tls.alerts import AlertDescription, AlertLevel, PeerAlert, TLSAlert, TLSError, encode_alert
from qkdtls.tls.client import TLSClient
from qkdtls.tls.events import (
    ApplicationData,
    ConnectionClosed,
    ConnectionInfo,
    Event,
    HandOff,
    HandshakeComplete,
)


class SansIOConnection(Protocol):
    """What TLSClient and TLSServer offer (docs/design.md)."""

    def receive_data(self, data: bytes | memoryview) -> None: ...
    def next_event(self) -> Event | None: ...
    def data_to_send(self) -> bytes: ...
    def data_to_send_buffers(self) -> list[bytes | bytearray]: ...
    def send_data(self, data: bytes | memoryview) -> None: ...
    def close(self) -> None: ...


class Session:
    """A TLS connection whose engine may switch from our TLS core to OpenSSL (server side, classic peer)."""

    def __init__(self, conn: Any, *, classic_context: ssl.SSLContext | None = None) -> None:
        self.conn = conn
        self._classic_context = classic_context
        self._classic: ClassicSession | None = None
        self._events: deque[Event] = deque()
        self._alert_out = b""
        self.info: ConnectionInfo | None = None
        self.closed_by_peer = False
        self.failed: QKDError | None = None

    def __repr__(self) -> str:
        engine = "classic" if self._classic is not None else type(self.conn).__name__
        return f"Session(engine={engine}, established={self.established})"

    @property
    def established(self) -> bool:
        return self.info is not None

    @property
    def classic(self) -> ClassicSession | None:
        return self._classic

    # -- bytes in -----------------------------------------------------------------------------------------

    def receive_data(self, data: bytes | memoryview) -> None:
        """Feed bytes from the peer (``b""``: EOF). Raises a :class:`QKDError` once the alert is queued."""
        if self.failed is not None:
            raise self.failed
        try:
            if self._classic is not None:
                self._classic.receive_data(data)
                self._advance_classic()
            else:
                self.conn.receive_data(data)
                self._drain_core()
        except QKDError as exc:
            self.failed = exc
            raise
        except TLSAlert as exc:
            self.failed = self._local_alert(exc)
            raise self.failed from None
        except PeerAlert as exc:
            self.failed = self._peer_alert(exc)
            raise self.failed from None
        except TLSError as exc:
            self.failed = QKDConnectionError(f"TLS error: {exc}")
            raise self.failed from None
        except ssl.SSLError as exc:
            self.failed = self._ssl_error(exc)
            raise self.failed from None

    def _drain_core(self) -> None:
        while True:
            event = self.conn.next_event()
            if event is None:
                return
            if type(event) is ApplicationData:  # the bulk case, checked first
                self._events.append(event)
                continue
            if isinstance(event, HandOff):
                self._hand_off(event.initial_data, event.eof)
                return
            if isinstance(event, HandshakeComplete):
                self.info = event.info
            elif isinstance(event, ConnectionClosed):
                self.closed_by_peer = True
                if not self.established:
                    if event.alert is not None:
                        raise PeerAlert(event.alert)
                    # Both adapters fail the handshake now instead of at their deadline.
                    raise QKDHandshakeError("peer closed the connection during the handshake")
            self._events.append(event)

    def _hand_off(self, initial_data: bytes, eof: bool = False) -> None:
        if self._classic_context is None:
            # A server without a certificate cannot serve classic clients: a plaintext handshake_failure
            # alert tells the peer, as OpenSSL would.
            self._alert_out = encode_plaintext_alert(AlertDescription.handshake_failure)
            raise QKDHandshakeError(
                "classic client, but this server has no certificate for classic TLS",
                AlertDescription.handshake_failure,
            )
        self._classic = ClassicSession(self._classic_context, initial_data)
        if eof:
            self._classic.receive_data(b"")   # the adapter already saw the end of the stream
        self._advance_classic()

    def _advance_classic(self) -> None:
        classic = self._classic
        assert classic is not None
        if not classic.handshake_done:
            if not classic.handshake():
                return
            self.info = classic.info(self._server_name())
            self._events.append(HandshakeComplete(self.info))
        # read() returns what is decrypted so far, None when it needs input, b"" at the end of the stream
        # (close_notify or EOF); a close_notify that came with data shows on the next call.
        while not self.closed_by_peer:
            data = classic.read()
            if data is None:
                return
            if data:
                self._events.append(ApplicationData(data))
                continue
            self.closed_by_peer = True
            self._events.append(ConnectionClosed(None))

    def _server_name(self) -> str | None:
        for name in ("server_name", "sni"):
            value = getattr(self.conn, name, None)
            if isinstance(value, str):
                return value
        return None

    # -- errors ------------------------------------------------------------------------------------------

    def _local_alert(self, exc: TLSAlert) -> QKDError:
        desc = int(exc.description)
        if not self.established:
            cls = QKDPolicyError if desc == AlertDescription.insufficient_security else QKDHandshakeError
            return cls(f"TLS handshake failed: {exc} (sent {exc.description.name})", desc)
        return QKDConnectionError(f"TLS connection failed: {exc} (sent {exc.description.name})", desc)

    def _peer_alert(self, exc: PeerAlert) -> QKDError:
        desc = int(exc.description)
        if not self.established:
            cls = QKDPolicyError if desc == AlertDescription.insufficient_security else QKDHandshakeError
            return cls(f"TLS handshake failed: {exc}", desc, sent_by_peer=True)
        return QKDConnectionError(f"TLS connection failed: {exc}", desc)

    def _ssl_error(self, exc: ssl.SSLError) -> QKDError:
        reason = exc.reason or exc.strerror or str(exc)
        if not self.established:
            return QKDHandshakeError(f"classic TLS handshake failed: {reason}")
        return QKDConnectionError(f"classic TLS connection failed: {reason}")

    # -- events and bytes out ----------------------------------------------------------------------------

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def take_events(self) -> list[Event]:
        """Every pending event, in order (one call instead of one per record)."""
        events = list(self._events)
        self._events.clear()
        return events

    def data_to_send(self) -> bytes:
        if self._classic is not None:
            return self._classic.data_to_send()
        out, self._alert_out = self.conn.data_to_send() + self._alert_out, b""
        return out

    def data_to_send_buffers(self) -> list[bytes | bytearray]:
        """:meth:`data_to_send` as separate buffers (our engine seals bulk data record by record)."""
        if self._classic is not None or self._alert_out:
            out = self.data_to_send()
            return [out] if out else []
        return self.conn.data_to_send_buffers()  # type: ignore[no-any-return]

    def send_data(self, data: bytes | memoryview) -> None:
        """Queue application data; :class:`QKDConnectionError` if the connection can no longer send."""
        if self.failed is not None:
            raise self.failed
        try:
            if self._classic is not None:
                self._classic.send_data(data)
            else:
                self.conn.send_data(data)
        except TLSAlert as exc:
            self.failed = self._local_alert(exc)
            raise self.failed from None
        except TLSError as exc:
            raise QKDConnectionError(f"cannot send: {exc}") from None
        except ssl.SSLError as exc:
            raise QKDConnectionError(f"cannot send: {exc.reason or exc}") from None

    def close(self) -> None:
        """Queue close_notify (never raises for a connection that already failed)."""
        try:
            if self._classic is not None:
                self._classic.close()
            else:
                self.conn.close()
        except (TLSError, ssl.SSLError, ValueError):
            pass

    # -- QKD-specific calls (only on our engine) ---------------------------------------------------------

    def _guarded(self, name: str, *args: Any) -> None:
        """Every failure here, the hand-off's included (a refused key can pass the ClientHello to OpenSSL,
        which may reject it at once), becomes a QKDError after the alert is queued; adapters flush, then
        raise."""
        try:
            getattr(self.conn, name)(*args)
            self._drain_core()
        except QKDError as exc:
            self.failed = exc
            raise
        except TLSAlert as exc:
            self.failed = self._local_alert(exc)
            raise self.failed from None
        except PeerAlert as exc:
            self.failed = self._peer_alert(exc)
            raise self.failed from None
        except ssl.SSLError as exc:
            self.failed = self._ssl_error(exc)
            raise self.failed from None

    @property
    def can_rekey(self) -> bool:
        """Client: the server accepted in-connection QKD rekeying (0xFEA8), so a fresh key will be used.

        Checked before a key is fetched, so no key is spent on a connection that cannot switch to it.
        """
        info = self.info
        if self._classic is not None or info is None or info.mode != "qkd" or info.profile != "secure":
            return False
        return isinstance(self.conn, TLSClient) and self.conn.rekey_negotiated

    @property
    def can_announce(self) -> bool:
        """Client: the server accepts key announcements (0xFEA9) and none was sent on this connection."""
        if self._classic is not None or self.info is None or self.info.mode != "qkd":
            return False
        return isinstance(self.conn, TLSClient) and self.conn.announce_negotiated

    def announce_keys(self, key_ids: list[str]) -> None:
        """Client: send the QkdKeyAnnounce naming ``key_ids``."""
        self._guarded("announce_keys", key_ids)

    def start(self) -> None:
        """Client: queue the ClientHello."""
        self._guarded("initiate")

    def provide_qkd_key(self, key: bytes | None) -> None:
        self._guarded("provide_qkd_key", key)

    def provide_rekey_key(self, key: bytes | None) -> None:
        self._guarded("provide_rekey_key", key)

    def rekey(self, offer: Any) -> None:
        self._guarded("rekey", offer)

    def update_key(self, request_peer: bool = True) -> None:
        if self._classic is not None:
            return  # Python ssl has no KeyUpdate API; OpenSSL updates keys itself when limits require
        self._guarded("update_key", request_peer)


def encode_plaintext_alert(description: AlertDescription) -> bytes:
    """A whole unprotected fatal alert record (for a peer we never shared keys with)."""
    return bytes((21, 3, 3, 0, 2)) + encode_alert(description, AlertLevel.fatal)
