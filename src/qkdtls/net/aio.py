"""asyncio streams over TLS-QKD: ``open_connection`` / ``start_server`` like :mod:`asyncio`'s.

A protocol on the plain TCP transport drives the connection (:class:`~qkdtls.net.session.Session`) and shows
the application an ordinary transport, so ``StreamReader``/``StreamWriter`` (and any ``asyncio.Protocol``)
work unchanged. asyncio's own TLS transport is not used: in Python 3.11 it drops fatal alerts on handshake
failure (CPython gh-98078). KME calls are blocking HTTPS requests, so they run in a worker thread while the
connection stops reading; the event loop never waits for a KME. Each connection has its own handshake
deadline, so an idle or hostile peer never holds up another.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

from qkdtls.logs import LogLimiter
from qkdtls.net.context import PreparedOffer, QKDContext
from qkdtls.net.errors import (
    QKDError,
    QKDHandshakeError,
    QKDHandshakeTimeout,
    QKDKeyReplayed,
    QKDKeyUnavailable,
)
from qkdtls.net.qkd_keys import OfferAdmission
from qkdtls.net.session import Session, encode_plaintext_alert
from qkdtls.net.socket import CLOSE_LINGER, provide_admitted_key
from qkdtls.tls.alerts import AlertDescription, InvalidState
from qkdtls.tls.events import (
    ApplicationData,
    ConnectionClosed,
    ConnectionInfo,
    HandshakeComplete,
    KeysAnnounced,
    NeedQkdKey,
    NeedRekeyKey,
    QkdRekeyed,
)

log = logging.getLogger(__name__)
# Failed handshakes are logged by the server; strangers can cause any number of them.
_limited = LogLimiter(log)

ClientConnectedCallback = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None]
_STREAM_LIMIT = 2**16


class QKDTransport(asyncio.Transport):
    """What the application writes to: plaintext in, TLS records out on the TCP transport."""

    def __init__(self, proto: TLSProtocol) -> None:
        super().__init__()
        self._proto = proto
        self._closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        proto = self._proto
        info = proto.session.info if proto.session is not None else None
        if name == "qkd":
            return info
        if name == "cipher" and info is not None:
            return (info.cipher, info.version, 128 if "AES_128" in info.cipher else 256)
        if name == "peercert" and info is not None:
            return info.peer_certificate
        if name == "handshake_seconds":
            return proto.handshake_seconds
        if name == "qkd_rekeys":
            return tuple(proto.rekeyed_key_ids)
        return proto.raw.get_extra_info(name, default) if proto.raw is not None else default

    def is_closing(self) -> bool:
        return self._closing or (self._proto.raw is None or self._proto.raw.is_closing())

    def close(self) -> None:
        """Send close_notify, then close TCP once the buffer is flushed."""
        if self._closing:
            return
        self._closing = True
        self._proto.close_notify()

    def abort(self) -> None:
        self._closing = True
        if self._proto.raw is not None:
            self._proto.raw.abort()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing:
            raise RuntimeError("write() after close()")
        self._proto.send(data)

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """TLS 1.3 half-close: close_notify and the end of our TCP half; the peer's data still arrives
        until its own close_notify (``eof_received``). ``close()`` then ends the connection."""
        if self._closing:
            raise RuntimeError("write_eof() after close()")
        self._proto.write_eof()

    def pause_reading(self) -> None:
        self._proto.app_paused = True
        self._proto.update_reading()

    def resume_reading(self) -> None:
        self._proto.app_paused = False
        self._proto.update_reading()

    def is_reading(self) -> bool:
        return not self._proto.app_paused

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._proto.raw is not None:
            self._proto.raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._proto.raw.get_write_buffer_size() if self._proto.raw is not None else 0

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._proto.app_protocol = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._proto.app_protocol  # type: ignore[return-value]


class TLSProtocol(asyncio.Protocol):
    """Drives one TLS-QKD connection on a TCP transport (client or server side).

    ``open_connection`` and ``start_server`` use it; a program that manages its own connections (accept
    caps, relays) can hand it to ``loop.create_server`` / ``loop.create_connection`` itself: once
    ``on_established(protocol)`` runs, ``protocol.attach(app_protocol)`` gives ``app_protocol`` the
    plaintext transport (:class:`QKDTransport`); ``on_failed(exc)`` reports a failed handshake.
    """

    def __init__(
        self,
        context: QKDContext,
        *,
        server_side: bool,
        handshake_timeout: float,
        on_established: Callable[[TLSProtocol], None],
        on_failed: Callable[[BaseException], None],
        server_hostname: str | None = None,
        target_sae_id: int | None = None,
        prepared_offer: PreparedOffer | None = None,
    ) -> None:
        self.context = context
        self.server_side = server_side
        self.server_hostname = server_hostname
        self.target_sae_id = target_sae_id
        self._handshake_timeout = handshake_timeout
        self._on_established = on_established
        self._on_failed = on_failed
        self.raw: asyncio.Transport | None = None
        self.session: Session | None = None
        self.app_transport = QKDTransport(self)
        self.app_protocol: asyncio.Protocol | None = None
        self.app_paused = False
        self.handshake_seconds: float | None = None
        self.rekeyed_key_ids: list[str] = []
        self._loop = asyncio.get_running_loop()
        self._started = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._backlog: list[bytes] = []  # input that arrived while a KME call was running
        self._kme_busy = False
        self._app_pending: list[Any] = []  # data/EOF that came before the application protocol was attached
        self._failed: BaseException | None = None
        self._done = False  # handshake finished (either way)
        self._peer: tuple[str | None, int | None] = (None, None)
        self._offered = False
        self._offered_announced = False  # the key offered was announced to this server earlier
        self._bytes_since_rekey = 0
        self._rekeyed_at = 0.0
        self._rekeying = False
        self._rekey_disabled = False
        # While the key for a due rekey is being fetched, application writes wait here (and the application
        # is paused), so no more than the limit (plus what was in flight) is ever sent under one key.
        self._held: list[bytes] = []
        self._holding = False
        self._raw_write_paused = False
        self._app_write_paused = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._prepared = prepared_offer
        self._lingering = False  # our close_notify is out; waiting (bounded) for the peer's end
        self._eof_sent = False  # write_eof(): close_notify and FIN are out; the peer's data is still read
        # write_eof()/close() while writes are held for a rekey: done once the held data has gone out.
        self._deferred_end: Callable[[], None] | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self._admission: OfferAdmission | None = None  # server: the offer whose key the KME is asked for

    # -- TCP side ------------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's transports do not derive from asyncio.Transport.
        self.raw = cast(asyncio.Transport, transport)
        self._started = time.monotonic()
        self._timer = self._loop.call_later(self._handshake_timeout, self._handshake_expired)
        if self.server_side:
            from qkdtls.tls.server import TLSServer

            self.session = Session(
                TLSServer(self.context.server_config()), classic_context=self.context.classic_context()
            )
        else:
            self._spawn(self._start_client())

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            # A defect in a KME step must still end the connection visibly, never leave it hanging.
            log.error("TLS-QKD connection step failed", exc_info=exc, extra={"event": "tls.internal_error"})
            self._fail(exc)

    async def _start_client(self) -> None:
        from qkdtls.tls.client import TLSClient

        assert self.raw is not None
        prepared = self._prepared
        if prepared is not None and prepared.resolved:
            self._peer = (prepared.host, prepared.port)
            self.target_sae_id = prepared.target_sae_id
            offer = prepared.take()
        else:  # the target is known by the peer's address only: the KME requests happen now
            peer = self.raw.get_extra_info("peername")
            peer_ip = peer[0] if peer else None
            host = self.server_hostname or peer_ip
            port = peer[1] if peer else None
            self._peer = (host, port)
            self.target_sae_id = self.context.resolve_target(host, port, self.target_sae_id, peer_ip=peer_ip)
            self._kme_busy = True
            try:
                offer = await asyncio.to_thread(self.context.client_offer, host, port, self.target_sae_id)
            except QKDError as exc:
                self._fail(exc)
                return
            finally:
                self._kme_busy = False
            if self._done:
                return  # timed out while the KME answered
        self._offered = offer is not None
        self._offered_announced = offer is not None and offer.announced
        self.session = Session(TLSClient(self.context.client_config(), self.server_hostname, offer))
        try:
            self.session.start()
        except QKDError as exc:
            self._fail(exc)
            return
        self._flush()
        self._drain_backlog()

    def data_received(self, data: bytes) -> None:
        if self._kme_busy or self.session is None:
            self._backlog.append(data)
            self.update_reading()
            return
        self._feed(data)

    def eof_received(self) -> bool:
        if self._lingering:
            self._end_linger()
            return True
        self.data_received(b"")
        return True  # we close TCP ourselves once close_notify went out

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._admission is not None:
            self._admission.abandon()
            self._admission = None
        if not self._done:
            self._fail(exc or QKDHandshakeError("connection closed during the TLS handshake"))
            return
        self.app_transport._closing = True
        # Before the application attached (open_connection between handshake and streams): delivered then.
        self._to_app(("lost", exc if self._failed is None else self._failed_as_exception()))

    def _failed_as_exception(self) -> Exception | None:
        return self._failed if isinstance(self._failed, Exception) else None

    def pause_writing(self) -> None:
        self._raw_write_paused = True
        self._update_app_writing()

    def resume_writing(self) -> None:
        self._raw_write_paused = False
        self._update_app_writing()

    def _update_app_writing(self) -> None:
        """One pause/resume state towards the application for two causes: TCP buffer full, rekey pending."""
        app = self.app_protocol
        if app is None:
            return
        want_pause = self._raw_write_paused or self._holding
        if want_pause and not self._app_write_paused:
            self._app_write_paused = True
            app.pause_writing()
        elif not want_pause and self._app_write_paused:
            self._app_write_paused = False
            app.resume_writing()

    def update_reading(self) -> None:
        """Read from TCP unless a KME call is running or the application paused us."""
        raw = self.raw
        if raw is None or raw.is_closing():
            return
        want = self._lingering or not (self._kme_busy or self.app_paused)
        if want and not raw.is_reading():
            raw.resume_reading()
        elif not want and raw.is_reading():
            raw.pause_reading()

    # -- engine --------------------------------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        session = self.session
        assert session is not None
        try:
            session.receive_data(data)
        except QKDError as exc:
            self._flush()
            self._fail(exc)
            return
        self._process()

    def _process(self) -> None:
        session = self.session
        assert session is not None
        while not self._kme_busy:
            event = session.next_event()
            if event is None:
                break
            if isinstance(event, NeedQkdKey):
                try:
                    admission = self.context.keys.admit(event.master_sae_id, event.key_id, self._source())
                except QKDKeyReplayed as exc:
                    self._refuse_replay(exc)
                    return
                # Refused at once, or a key collected ahead (announced): served without leaving the loop.
                key = admission.take_cached() if admission is not None else None
                if admission is None or key is not None:
                    try:
                        provide_admitted_key(session, admission, key)
                    except QKDError as exc:
                        self._flush()
                        self._fail(exc)
                        return
                    continue
                self._admission = admission  # given back if the connection ends while the KME answers
                self._kme_call(self.context.keys.obtain, self._provide_key, admission)
            elif isinstance(event, KeysAnnounced):
                self.context.keys.collect_announced(event.master_sae_id, event.key_ids)
            elif isinstance(event, NeedRekeyKey):
                self._kme_call(
                    self.context.keys.collect_rekey,
                    session.provide_rekey_key,
                    event.master_sae_id,
                    event.key_id,
                )
            elif isinstance(event, HandshakeComplete):
                self._established(event.info)
            elif isinstance(event, ApplicationData):
                if self._lingering:
                    continue  # after our close nobody reads: the bytes are dropped, not reset
                self._bytes_since_rekey += len(event.data)
                self._to_app(("data", bytes(event.data)))  # asyncio protocols are given bytes
            elif isinstance(event, ConnectionClosed):
                if self._lingering:
                    self._end_linger()
                    break
                self._to_app(("eof", None))
            elif isinstance(event, QkdRekeyed):
                self._rekeying = False
                self.rekeyed_key_ids.append(event.key_id)
                log.info("QKD rekey complete", extra={"event": "tls.qkd_rekeyed", "key_ID": event.key_id})
        self._flush()
        self._maybe_rekey()

    def _kme_call(self, fetch: Callable[..., Any], provide: Callable[[Any], None], *args: Any) -> None:
        self._kme_busy = True
        self.update_reading()

        async def run() -> None:
            try:
                result = await asyncio.to_thread(fetch, *args)
                provide(result)
            except QKDKeyReplayed as exc:
                self._refuse_replay(exc)
                return
            except QKDError as exc:
                self._flush()
                self._fail(exc)
                return
            finally:
                self._kme_busy = False
            self.update_reading()
            self._process()
            self._drain_backlog()

        self._spawn(run())

    def _provide_key(self, key: bytes | None) -> None:
        admission, self._admission = self._admission, None
        assert self.session is not None
        provide_admitted_key(self.session, admission, key)

    def _refuse_replay(self, exc: QKDKeyReplayed) -> None:
        """A replayed ClientHello: a clear-text illegal_parameter alert (no keys were agreed), then close."""
        if self.raw is not None and not self.raw.is_closing():
            self.raw.write(encode_plaintext_alert(AlertDescription.illegal_parameter))
        self._fail(exc)

    def _source(self) -> str:
        peer = self.raw.get_extra_info("peername") if self.raw is not None else None
        return str(peer[0]) if peer else "unknown"

    def _drain_backlog(self) -> None:
        while self._backlog and not self._kme_busy and self.session is not None and self._failed is None:
            self._feed(self._backlog.pop(0))
        self.update_reading()

    def _flush(self) -> None:
        if self.session is None or self.raw is None or self.raw.is_closing():
            return
        out = self.session.data_to_send()
        if out:
            self.raw.write(out)

    def _established(self, info: ConnectionInfo) -> None:
        self._done = True
        self.handshake_seconds = time.monotonic() - self._started
        self._rekeyed_at = time.monotonic()
        if self._timer is not None:
            self._timer.cancel()
        if not self.server_side:
            self.context.note_outcome(*self._peer, self._offered, info.mode, self._offered_announced)
            self._announce()
        log.info(
            "TLS handshake complete",
            extra={
                "event": "tls.handshake",
                "mode": info.mode,
                "profile": info.profile,
                "key_ID": info.key_id,
                "cipher": info.cipher,
                "ms": round(self.handshake_seconds * 1000, 3),
            },
        )
        self._on_established(self)

    def _handshake_expired(self) -> None:
        if not self._done:
            self._fail(QKDHandshakeTimeout(f"TLS handshake not complete after {self._handshake_timeout:g} s"))

    def _fail(self, exc: BaseException) -> None:
        if self._failed is not None:
            return
        self._failed = exc
        # A failed handshake is no evidence about the server (see QKDSocket._handshake_failed).
        if not self.server_side and not self._done and self._offered_announced:
            self.context.note_outcome(*self._peer, True, "failed", announced=True)
        if self.raw is not None:
            self.raw.close()  # what is buffered (the alert) still goes out
        if not self._done:
            self._done = True
            if self._timer is not None:
                self._timer.cancel()
            self._on_failed(exc)

    def _announce(self) -> None:
        """Client: name the keys the next connections to this server will offer (0xFEA9 negotiated).

        On the event loop: the keys come from the prefetch pool in memory (KeySource never asks the KME
        here), and the message leaves with the client Finished, before the application can close.
        """
        session = self.session
        if session is None or not session.can_announce:
            return
        key_ids = self.context.announce_after_handshake(*self._peer, self.target_sae_id)
        if not key_ids:
            return
        try:
            session.announce_keys(key_ids)
        except (QKDError, InvalidState):
            return  # cannot send any more: the queued keys are then offered unannounced (collected directly)
        self._flush()

    # -- application side ----------------------------------------------------------------------------------

    def attach(self, app_protocol: asyncio.Protocol) -> None:
        self.app_protocol = app_protocol
        app_protocol.connection_made(self.app_transport)
        pending, self._app_pending = self._app_pending, []
        for item in pending:
            self._to_app(item)

    def _to_app(self, item: tuple[str, Any]) -> None:
        app = self.app_protocol
        if app is None:
            self._app_pending.append(item)
            return
        kind, value = item
        if kind == "data":
            app.data_received(value)
        elif kind == "lost":
            app.connection_lost(value)
        elif not app.eof_received():
            self.app_transport.close()

    def send(self, data: bytes | bytearray | memoryview) -> None:
        session = self.session
        if session is None or not session.established:
            raise RuntimeError("write() before the TLS handshake completed")
        if self._failed is not None:
            return  # like asyncio transports: writes after a failure are dropped, connection_lost says why
        if self._holding:
            self._held.append(bytes(data))
            return
        try:
            session.send_data(bytes(data))
        except QKDError as exc:
            # Like asyncio's transports after a lost connection: the write is dropped, the reason logged.
            log.info("write dropped", extra={"event": "tls.write_dropped", "reason": str(exc)})
            self._flush()
            return
        self._flush()
        self._bytes_since_rekey += len(data)
        self._maybe_rekey()

    def write_eof(self) -> None:
        """Half-close: close_notify and TCP FIN; reading goes on until the peer's close_notify."""
        raw = self.raw
        session = self.session
        if raw is None or session is None or not session.established or self._failed is not None:
            return
        if self._eof_sent:
            return
        if self._holding:
            self._deferred_end = self.write_eof
            return
        self._eof_sent = True
        session.close()
        self._flush()
        if not raw.is_closing() and raw.can_write_eof():
            raw.write_eof()

    def close_notify(self) -> None:
        """close_notify, then end TCP - after the peer's close_notify or end of stream (at most
        CLOSE_LINGER seconds), so what it still sends never meets a closed socket (a TCP reset)."""
        raw = self.raw
        session = self.session
        if raw is None:
            return
        if self._holding and self._failed is None:
            self._deferred_end = self.close_notify
            return
        if session is not None and session.established and self._failed is None:
            session.close()
            self._flush()
            if not session.closed_by_peer and not raw.is_closing() and raw.can_write_eof():
                self._lingering = True
                if not self._eof_sent:
                    raw.write_eof()
                self._linger_timer = self._loop.call_later(CLOSE_LINGER, self._end_linger)
                self.update_reading()
                return
        raw.close()

    def _end_linger(self) -> None:
        self._lingering = False
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        if self.raw is not None:
            self.raw.close()

    # -- QKD rekey (client) --------------------------------------------------------------------------------

    def _maybe_rekey(self) -> None:
        ctx = self.context
        if self.server_side or self._rekeying or self._rekey_disabled or not self._done or self._failed:
            return
        if self._eof_sent or self.app_transport._closing:
            return  # nothing more is sent on this connection: no key is spent on it
        by_bytes = ctx.rekey_after_bytes is not None and self._bytes_since_rekey >= ctx.rekey_after_bytes
        by_time = (
            ctx.rekey_after_seconds is not None
            and time.monotonic() - self._rekeyed_at >= ctx.rekey_after_seconds
        )
        if not (by_bytes or by_time):
            return
        if self.session is None or not self.session.can_rekey or self.target_sae_id is None:
            self._rekey_disabled = True
            return
        self._rekeying = True  # until the server's acknowledgement (QkdRekeyed)
        self._bytes_since_rekey = 0
        self._rekeyed_at = time.monotonic()
        self._holding = True
        self._update_app_writing()
        self._spawn(self._rekey(self.target_sae_id))

    def _release_held(self) -> None:
        self._holding = False
        held, self._held = self._held, []
        session = self.session
        if held and session is not None and self._failed is None:
            session.send_data(b"".join(held))
            self._flush()
        self._update_app_writing()
        end, self._deferred_end = self._deferred_end, None
        if end is not None:
            end()

    async def _rekey(self, target: int) -> None:
        try:
            offer = await asyncio.to_thread(self.context.rekey_offer, target)
        except QKDKeyUnavailable as exc:
            log.warning(
                "QKD rekey postponed: no key", extra={"event": "tls.rekey_postponed", "reason": str(exc)}
            )
            self._rekeying = False
            self._release_held()
            return
        session = self.session
        if session is None or self._failed is not None or self.raw is None or self.raw.is_closing():
            return
        try:
            session.rekey(offer)
        except QKDError as exc:
            self._flush()
            self._fail(exc)
            return
        log.info("QKD rekey started", extra={"event": "tls.rekey", "key_ID": offer.key_id})
        self._flush()
        self._release_held()


def _default_server_hostname(host: str | None) -> str | None:
    if host is None:
        return None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    return None


async def open_connection(
    host: str,
    port: int,
    *,
    context: QKDContext,
    server_hostname: str | None = None,
    target_sae_id: int | None = None,
    ssl_handshake_timeout: float | None = None,
    limit: int = _STREAM_LIMIT,
    prepared_offer: PreparedOffer | None = None,
    **kwargs: Any,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect, run the TLS-QKD handshake (bounded), and return streams; raises :class:`QKDError` on failure.

    ``server_hostname`` defaults to ``host`` when it is a name (SNI and certificate check); the target SAE ID
    is explicit or looked up in the context's directory. The KME requests (this SAE's ID, the key) are made
    before the TCP connection is opened (in a worker thread), unless ``prepared_offer`` brings them; the
    handshake timeout covers them.
    """
    if context.purpose != "client":
        raise ValueError("open_connection needs a client context")
    loop = asyncio.get_running_loop()
    timeout = ssl_handshake_timeout or context.handshake_timeout
    if server_hostname is None:
        server_hostname = _default_server_hostname(host)
    started = time.monotonic()
    if prepared_offer is None and context.qkd != "off":
        try:
            prepared_offer = await asyncio.wait_for(
                asyncio.to_thread(
                    context.prepare_offer,
                    host,
                    port,
                    server_hostname=server_hostname,
                    target_sae_id=target_sae_id,
                ),
                timeout,
            )
        except TimeoutError:
            raise QKDHandshakeTimeout(f"no key from the KME within {timeout:g} s") from None
    timeout = max(0.001, timeout - (time.monotonic() - started))
    waiter: asyncio.Future[TLSProtocol] = loop.create_future()

    def established(proto: TLSProtocol) -> None:
        if not waiter.done():
            waiter.set_result(proto)

    def failed(exc: BaseException) -> None:
        if not waiter.done():
            waiter.set_exception(exc)

    def factory() -> TLSProtocol:
        return TLSProtocol(
            context,
            server_side=False,
            handshake_timeout=timeout,
            on_established=established,
            on_failed=failed,
            server_hostname=server_hostname,
            target_sae_id=target_sae_id,
            prepared_offer=prepared_offer,
        )

    raw, _ = await asyncio.wait_for(loop.create_connection(factory, host, port, **kwargs), timeout)
    try:
        # The protocol enforces the deadline itself; this outer bound only guards against a lost callback.
        proto = await asyncio.wait_for(waiter, timeout + 1.0)
    except BaseException:
        raw.abort()
        raise
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    stream_proto = asyncio.StreamReaderProtocol(reader, loop=loop)
    proto.attach(stream_proto)
    writer = asyncio.StreamWriter(proto.app_transport, stream_proto, reader, loop)
    return reader, writer


async def start_server(
    client_connected_cb: ClientConnectedCallback,
    host: str | None = None,
    port: int | None = None,
    *,
    context: QKDContext,
    ssl_handshake_timeout: float | None = None,
    limit: int = _STREAM_LIMIT,
    **kwargs: Any,
) -> asyncio.Server:
    """Serve TLS-QKD (and classic TLS 1.3 per policy); ``client_connected_cb`` runs after each handshake.

    Handshakes run concurrently, each with its own deadline; failures are logged and the peer gets the alert.
    ``writer.get_extra_info("qkd")`` is the :class:`~qkdtls.tls.events.ConnectionInfo`.
    """
    if context.purpose != "server":
        raise ValueError("start_server needs a server context")
    context.check_server_access()
    loop = asyncio.get_running_loop()
    timeout = ssl_handshake_timeout or context.handshake_timeout

    def established(proto: TLSProtocol) -> None:
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        proto.attach(asyncio.StreamReaderProtocol(reader, client_connected_cb, loop=loop))  # type: ignore[arg-type]

    def failed(exc: BaseException) -> None:
        extra: dict[str, Any] = {"event": "tls.handshake_failed", "reason": str(exc)}
        if isinstance(exc, QKDHandshakeError):
            extra["alert"] = exc.alert_name
        _limited(logging.INFO, "TLS handshake failed", extra)

    def factory() -> TLSProtocol:
        return TLSProtocol(
            context, server_side=True, handshake_timeout=timeout, on_established=established, on_failed=failed
        )

    return await loop.create_server(factory, host, port, **kwargs)


async def close_writer(writer: asyncio.StreamWriter, timeout: float = CLOSE_LINGER + 1.0) -> None:
    """Close a stream (close_notify) and wait, bounded, until the transport is gone (the peer's close_notify
    or end of stream, at most CLOSE_LINGER seconds)."""
    writer.close()
    with contextlib.suppress(OSError, QKDError, asyncio.TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), timeout)
