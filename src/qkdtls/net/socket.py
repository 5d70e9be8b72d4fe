"""QKDSocket: a blocking socket speaking TLS-QKD, shaped like :class:`ssl.SSLSocket`.

The socket owns the I/O only: it moves bytes between the kernel socket and the connection
(:class:`~qkdtls.net.session.Session`), and makes the KME calls the connection's events ask for. Locks keep
it usable from one reader and one writer thread at once (a duplex relay, ``makefile`` in two threads): the
session lock is never held across a blocking socket call, and bytes leave in the order the engine produced
them because taking them and writing them happen under one write lock.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from qkdtls.net.errors import (
    QKDConnectionError,
    QKDError,
    QKDHandshakeError,
    QKDHandshakeTimeout,
    QKDKeyReplayed,
    QKDKeyUnavailable,
)
from qkdtls.net.session import Session, encode_plaintext_alert
from qkdtls.tls.alerts import AlertDescription, InvalidState
from qkdtls.tls.events import (
    ApplicationData,
    ConnectionClosed,
    ConnectionInfo,
    Event,
    HandshakeComplete,
    KeysAnnounced,
    NeedQkdKey,
    NeedRekeyKey,
    QkdRekeyed,
)

if TYPE_CHECKING:
    from qkdtls.net.context import PreparedOffer, QKDContext
    from qkdtls.net.qkd_keys import OfferAdmission

log = logging.getLogger(__name__)

# Large reads: per-call overhead (syscall, engine entry, event dispatch) dominates small reads in bulk
# transfers; 256 KiB (about 16 records) measured fastest on loopback (bench/bulk.py).
_READ_SIZE = 256 * 1024
# Handshake flights are a few KiB; a smaller read keeps allocation cheap there.
_HANDSHAKE_READ_SIZE = 64 * 1024
# sendall() hands the engine this much at a time, so a huge buffer is never doubled in memory.
_SEND_CHUNK = 16 * 16384
# Buffers per sendmsg call, well below the kernel's IOV_MAX (1024).
_IOV_MAX = 512
# close()/unwrap() never wait longer than this for the socket to accept the close_notify or the peer's answer.
_CLOSE_TIMEOUT = 2.0
# After our close_notify, close() waits this long at most for the peer's close_notify or end of stream
# before it closes the socket, as OpenSSL-based servers do (a "lingering close"): closing at once would make
# the kernel answer whatever the peer still sends (its own close_notify) with a TCP reset, and a reset can
# destroy data the peer has received but not read yet.
CLOSE_LINGER = 2.0


def set_nodelay(sock: socket.socket) -> None:
    """TLS flights are small and latency-bound: never let Nagle hold them back."""
    if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def send_buffers(sock: socket.socket, buffers: list[bytes | bytearray]) -> None:
    """``sendall`` of the buffers' concatenation without concatenating them: scatter/gather writes."""
    views = [memoryview(b) for b in buffers if b]
    # Bounded: every pass sends at least one byte (or raises, e.g. on the socket's timeout).
    while views:
        sent = sock.sendmsg(views[:_IOV_MAX])
        while views and sent >= len(views[0]):
            sent -= len(views.pop(0))
        if sent:
            views[0] = views[0][sent:]


def provide_admitted_key(session: Session, admission: OfferAdmission | None, key: bytes | None) -> None:
    """Server: hand the engine the key of an offer (None: refuse the offer), then settle the admission.

    The engine raises ``decrypt_error`` from ``provide_qkd_key`` only for a PSK binder that does not verify:
    then the key was not used and goes back to the server's cache for the client that holds it. Any other
    outcome used the key (its binder verified, or the reference handshake started with it).
    """
    binder_ok = True
    try:
        session.provide_qkd_key(key)
    except QKDHandshakeError as exc:
        binder_ok = exc.alert != AlertDescription.decrypt_error
        raise
    finally:
        if admission is not None and key is not None:
            admission.settle(binder_ok)


def serve_qkd_key(event: NeedQkdKey, session: Session, context: QKDContext, source: str) -> None:
    """Server: the key a ClientHello names, within the context's access control and bounds (blocking)."""
    admission = context.keys.admit(event.master_sae_id, event.key_id, source)
    key = context.keys.obtain(admission) if admission is not None else None
    provide_admitted_key(session, admission, key)


class QKDSocket:
    """A connected TCP socket carrying TLS-QKD (or classic TLS 1.3 after a fallback)."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        context: QKDContext,
        server_side: bool,
        server_hostname: str | None = None,
        target_sae_id: int | None = None,
        do_handshake_on_connect: bool = True,
        prepared_offer: PreparedOffer | None = None,
    ) -> None:
        self._sock = sock
        self.context = context
        self.server_side = server_side
        self.server_hostname = server_hostname
        self.target_sae_id = target_sae_id
        self.do_handshake_on_connect = do_handshake_on_connect
        self._session: Session | None = None
        self._prepared = prepared_offer
        self._peer: tuple[str | None, int | None] = (None, None)
        self._offered_key_id: str | None = None
        self._offered_announced = False  # the key offered was announced to this server earlier
        self._plain: deque[bytes | bytearray] = deque()
        self._plain_offset = 0
        self._rview: memoryview | None = None  # read buffer, allocated on the first read after the handshake
        self._eof = False
        self._lock = threading.RLock()  # the session
        self._read_lock = threading.Lock()  # one reader at a time
        self._write_lock = threading.Lock()  # bytes leave in engine order
        self._io_refs = 0  # makefile() objects alive (socket.SocketIO protocol)
        self._closed = False
        self._bytes_since_rekey = 0
        self._rekeyed_at = time.monotonic()
        self._rekey_disabled = False
        self._rekey_pending = False  # a QkdRekey is out, its acknowledgement not yet in
        self.handshake_seconds: float | None = None
        self.rekeyed_key_ids: list[str] = []  # QKD keys switched to after the handshake, in order
        set_nodelay(sock)
        if do_handshake_on_connect and self._connected():
            try:
                self.do_handshake()
            except BaseException:
                # As ssl.SSLContext.wrap_socket does: a socket whose handshake failed is closed.
                self._closed = True
                sock.close()
                raise

    def __repr__(self) -> str:
        info = self.info
        state = f"mode={info.mode}" if info else "handshake pending"
        return f"<QKDSocket fd={self.fileno()} {'server' if self.server_side else 'client'} {state}>"

    # -- socket plumbing ---------------------------------------------------------------------------------

    def _connected(self) -> bool:
        try:
            self._sock.getpeername()
        except OSError:
            return False
        return True

    def connect(self, address: Any) -> None:
        """Connect and (by default) run the handshake. A client asks its KME for everything it needs
        *before* the TCP connection is opened (:meth:`QKDContext.prepare_offer`)."""
        prepare = not self.server_side and self._session is None and self._prepared is None
        if prepare and isinstance(address, tuple):
            self._prepared = self.context.prepare_offer(
                address[0],
                address[1],
                server_hostname=self.server_hostname,
                target_sae_id=self.target_sae_id,
            )
        self._sock.connect(address)
        if self.do_handshake_on_connect:
            self.do_handshake()

    def fileno(self) -> int:
        return self._sock.fileno()

    def settimeout(self, value: float | None) -> None:
        self._sock.settimeout(value)

    def gettimeout(self) -> float | None:
        return self._sock.gettimeout()

    def setblocking(self, flag: bool) -> None:
        if not flag:
            raise ValueError("QKDSocket is blocking (use settimeout, or qkdtls.net.aio for non-blocking I/O)")
        self._sock.setblocking(True)

    def getpeername(self) -> Any:
        return self._sock.getpeername()

    def getsockname(self) -> Any:
        return self._sock.getsockname()

    def setsockopt(self, *args: Any) -> None:
        self._sock.setsockopt(*args)

    def getsockopt(self, *args: Any) -> Any:
        return self._sock.getsockopt(*args)

    @property
    def family(self) -> int:
        return self._sock.family

    @property
    def type(self) -> int:
        return self._sock.type

    # -- facts ---------------------------------------------------------------------------------------------

    @property
    def info(self) -> ConnectionInfo | None:
        return self._session.info if self._session is not None else None

    def version(self) -> str | None:
        info = self.info
        return info.version if info else None

    def cipher(self) -> tuple[str, str, int] | None:
        info = self.info
        if info is None:
            return None
        bits = 128 if "AES_128" in info.cipher else 256
        return (info.cipher, info.version, bits)

    def selected_alpn_protocol(self) -> str | None:
        info = self.info
        return info.alpn if info else None

    def getpeercert(self, binary_form: bool = False) -> Any:
        """The peer's certificate: DER with ``binary_form``, else a dict like ``ssl``'s (None in PSK mode)."""
        info = self.info
        if info is None:
            raise ValueError("handshake not done yet")
        der = info.peer_certificate
        if binary_form or der is None:
            return der
        return _cert_dict(der)

    # -- handshake -----------------------------------------------------------------------------------------

    def _new_session(self) -> Session:
        ctx = self.context
        if self.server_side:
            from qkdtls.tls.server import TLSServer

            return Session(TLSServer(ctx.server_config()), classic_context=ctx.classic_context())
        from qkdtls.tls.client import TLSClient

        prepared = self._prepared
        if prepared is not None and prepared.resolved:
            self._peer = (prepared.host, prepared.port)
            self.target_sae_id = prepared.target_sae_id
            offer = prepared.take()
        else:  # a socket connected before it was wrapped: the KME requests happen now
            peer_host, peer_port = self._sock.getpeername()[:2]
            host = self.server_hostname or peer_host
            self._peer = (host, peer_port)
            self.target_sae_id = ctx.resolve_target(host, peer_port, self.target_sae_id, peer_ip=peer_host)
            offer = ctx.client_offer(host, peer_port, self.target_sae_id)
        if offer is not None:
            self._offered_key_id = offer.key_id
            self._offered_announced = offer.announced
        session = Session(TLSClient(ctx.client_config(), self.server_hostname, offer))
        session.start()
        return session

    def do_handshake(self) -> None:
        """Run the handshake to completion within ``context.handshake_timeout`` (KME calls included)."""
        if self._session is not None and self._session.established:
            return
        started = time.monotonic()
        deadline = started + self.context.handshake_timeout
        saved_timeout = self._sock.gettimeout()
        try:
            if self._session is None:
                self._session = self._new_session()
            session = self._session
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise QKDHandshakeTimeout(
                        f"TLS handshake not complete after {self.context.handshake_timeout:g} s"
                    )
                self._sock.settimeout(left)  # bounds the writes below as well as the read
                # Events first: a client's key announcement then leaves in one write with its Finished.
                self._dispatch_handshake_events(session)
                self._flush()
                if session.established:
                    break
                if session.closed_by_peer:
                    raise QKDHandshakeError("peer closed the connection during the handshake")
                try:
                    data = self._sock.recv(_HANDSHAKE_READ_SIZE)
                except TimeoutError:
                    continue  # the deadline check above raises
                self._feed(data)
        except QKDError as exc:
            self._handshake_failed(exc)
            raise
        except OSError as exc:
            raise QKDHandshakeError(f"connection failed during the TLS handshake: {exc}") from exc
        finally:
            if not self._closed:
                self._sock.settimeout(saved_timeout)
        self.handshake_seconds = time.monotonic() - started
        self._rekeyed_at = time.monotonic()
        info = session.info
        assert info is not None
        if not self.server_side:
            self.context.note_outcome(
                *self._peer, self._offered_key_id is not None, info.mode, self._offered_announced
            )
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

    def _handshake_failed(self, exc: QKDError) -> None:
        # A failed handshake is no evidence about the server (anyone on the path can make it fail), except
        # that an announced key it did not take is lost, like the keys announced with it.
        if not self.server_side and self._offered_announced:
            self.context.note_outcome(*self._peer, True, "failed", announced=True)
        try:
            self._flush()  # the alert the engine queued
        except OSError:
            pass

    def _dispatch_handshake_events(self, session: Session) -> None:
        while True:
            with self._lock:
                event = session.next_event()
            if event is None:
                return
            if isinstance(event, NeedQkdKey):
                try:
                    serve_qkd_key(event, session, self.context, self._source())
                except QKDKeyReplayed:
                    # No keys were agreed: the alert goes in clear, as for any refused ClientHello.
                    with contextlib.suppress(OSError):
                        self._sock.sendall(encode_plaintext_alert(AlertDescription.illegal_parameter))
                    raise
            elif isinstance(event, ApplicationData):
                self._plain.append(event.data)
            elif isinstance(event, ConnectionClosed):
                self._eof = True
            elif isinstance(event, HandshakeComplete):
                if not self.server_side:
                    self._announce(session)
            else:
                self._after_event(event)

    def _source(self) -> str:
        """The peer's address, which the server's KME lookup bounds are counted by."""
        try:
            return str(self._sock.getpeername()[0])
        except (OSError, IndexError):
            return "unknown"

    def _announce(self, session: Session) -> None:
        """Client: name the keys the next connections to this server will offer (0xFEA9 negotiated)."""
        if not session.can_announce:
            return
        key_ids = self.context.announce_after_handshake(*self._peer, self.target_sae_id)
        if key_ids:
            with self._lock:
                try:
                    session.announce_keys(key_ids)
                except InvalidState:
                    pass  # cannot send any more: the queued keys are offered unannounced (collected directly)

    # -- bytes ---------------------------------------------------------------------------------------------

    def _feed(self, data: bytes | memoryview) -> None:
        session = self._session
        assert session is not None
        with self._lock:
            try:
                session.receive_data(data)
            except QKDError:
                pass
        if session.failed is not None:
            try:
                self._flush()
            except OSError:
                pass
            raise session.failed

    def _flush(self) -> None:
        session = self._session
        if session is None:
            return
        with self._write_lock:
            with self._lock:
                out = session.data_to_send_buffers()
            if out:
                send_buffers(self._sock, out)

    def _established(self) -> Session:
        if self._closed:
            raise OSError("socket is closed")
        if self._session is None or not self._session.established:
            self.do_handshake()
        assert self._session is not None
        return self._session

    def _after_event(self, event: Event) -> None:
        """Post-handshake events other than data."""
        session = self._session
        assert session is not None
        if isinstance(event, NeedRekeyKey):
            key = self.context.keys.collect_rekey(event.master_sae_id, event.key_id)
            with self._lock:
                session.provide_rekey_key(key)
        elif isinstance(event, KeysAnnounced):
            self.context.keys.collect_announced(event.master_sae_id, event.key_ids)
        elif isinstance(event, QkdRekeyed):
            self._rekey_pending = False
            self.rekeyed_key_ids.append(event.key_id)
            log.info("QKD rekey complete", extra={"event": "tls.qkd_rekeyed", "key_ID": event.key_id})

    def _read_more(self, exact_records: bool = False) -> None:
        session = self._established()
        if exact_records:
            data: bytes | memoryview = self._recv_records()
        else:
            # Into a buffer kept for the connection: allocating a fresh 256 KiB object per read cost more
            # than the decryption (bench/bulk.py). The engine copies what it keeps before the next read.
            if self._rview is None:
                self._rview = memoryview(bytearray(_READ_SIZE))
            n = self._sock.recv_into(self._rview)
            data = self._rview[:n]
        self._feed(data)
        # Bounded: answering an event (a rekey key) may release records that were waiting for it, but each
        # round consumes buffered input, which only a socket read refills.
        while True:
            with self._lock:
                events = session.take_events()
            if not events:
                break
            for event in events:
                if type(event) is ApplicationData:
                    self._plain.append(event.data)
                    self._bytes_since_rekey += len(event.data)
                elif isinstance(event, ConnectionClosed):
                    self._eof = True
                    if event.alert is not None:
                        raise QKDConnectionError(f"peer closed with alert {event.alert}", event.alert)
                else:
                    self._after_event(event)
        self._flush()
        if not data:
            self._eof = True

    def _recv_records(self) -> bytes:
        """Receive TLS records and not one byte beyond: after close_notify the peer may speak plain TCP."""
        peeked = self._sock.recv(_READ_SIZE, socket.MSG_PEEK)
        if not peeked:
            return b""
        end = 0
        while end + 5 <= len(peeked):
            record_end = end + 5 + int.from_bytes(peeked[end + 3 : end + 5], "big")
            if record_end > len(peeked):
                break
            end = record_end
        # A record not complete yet: take what has arrived of it (never more than the record).
        return self._sock.recv(end or len(peeked))

    def _take(self, limit: int) -> bytes | bytearray:
        first = self._plain[0]
        start = self._plain_offset
        if start == 0 and len(first) <= limit:
            self._plain.popleft()
            return first
        chunk = first[start : start + limit]
        if start + len(chunk) >= len(first):
            self._plain.popleft()
            self._plain_offset = 0
        else:
            self._plain_offset = start + len(chunk)
        return chunk

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if flags:
            raise ValueError("flags are not supported on a QKDSocket")
        if bufsize <= 0:
            return b""
        with self._read_lock:
            while not self._plain:
                if self._eof:
                    return b""
                self._read_more()
            data = self._take(bufsize)
        self._maybe_rekey()
        return bytes(data) if type(data) is not bytes else data  # as ssl.SSLSocket.recv

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        if flags:
            raise ValueError("flags are not supported on a QKDSocket")
        view = memoryview(buffer).cast("B")
        limit = nbytes or len(view)
        if limit <= 0:
            return 0
        filled = 0
        with self._read_lock:
            while not self._plain:
                if self._eof:
                    return 0
                self._read_more()
            while self._plain and filled < limit:
                chunk = self._take(limit - filled)
                view[filled : filled + len(chunk)] = chunk
                filled += len(chunk)
        self._maybe_rekey()
        return filled

    def read(self, n: int = 1024) -> bytes:
        return self.recv(n)

    def sendall(self, data: Any, flags: int = 0) -> None:
        if flags:
            raise ValueError("flags are not supported on a QKDSocket")
        session = self._established()
        view = memoryview(data).cast("B")
        for start in range(0, len(view), _SEND_CHUNK):
            piece = view[start : start + _SEND_CHUNK]
            with self._write_lock:
                with self._lock:
                    session.send_data(piece)  # sealed at once: the caller's buffer is not kept
                    out = session.data_to_send_buffers()
                send_buffers(self._sock, out)
            self._bytes_since_rekey += len(piece)
            self._maybe_rekey()

    def send(self, data: Any, flags: int = 0) -> int:
        self.sendall(data, flags)
        return len(memoryview(data).cast("B"))

    write = send

    def pending(self) -> int:
        return sum(len(c) for c in self._plain) - self._plain_offset

    # -- QKD rekey and KeyUpdate ---------------------------------------------------------------------------

    def _maybe_rekey(self) -> None:
        ctx = self.context
        if self.server_side or self._rekey_disabled or self._rekey_pending:
            return
        by_bytes = ctx.rekey_after_bytes is not None and self._bytes_since_rekey >= ctx.rekey_after_bytes
        by_time = (
            ctx.rekey_after_seconds is not None
            and time.monotonic() - self._rekeyed_at >= ctx.rekey_after_seconds
        )
        if by_bytes or by_time:
            self.rekey()

    def rekey(self) -> bool:
        """Client: switch both directions to a fresh QKD key (secure profile). False if it is not possible."""
        session = self._established()
        self._bytes_since_rekey = 0
        self._rekeyed_at = time.monotonic()
        if self.server_side or not session.can_rekey or self.target_sae_id is None:
            self._rekey_disabled = True
            return False
        if self._rekey_pending:
            return False
        try:
            offer = self.context.rekey_offer(self.target_sae_id)
        except QKDKeyUnavailable as exc:
            log.warning(
                "QKD rekey postponed: no key", extra={"event": "tls.rekey_postponed", "reason": str(exc)}
            )
            return False
        with self._lock:
            session.rekey(offer)
            self._rekey_pending = True
        self._flush()
        log.info("QKD rekey started", extra={"event": "tls.rekey", "key_ID": offer.key_id})
        return True

    def update_key(self, request_peer: bool = True) -> None:
        """TLS 1.3 KeyUpdate (RFC 8446 §4.6.3)."""
        session = self._established()
        with self._lock:
            session.update_key(request_peer)
        self._flush()

    # -- closing -------------------------------------------------------------------------------------------

    def _send_close_notify(self) -> None:
        session = self._session
        if session is None or not session.established or session.failed is not None:
            return
        with self._lock:
            session.close()
        saved = self._sock.gettimeout()
        try:
            self._sock.settimeout(_CLOSE_TIMEOUT)
            self._flush()
        except OSError:
            pass  # the peer is gone; nothing more to tell it
        finally:
            try:
                self._sock.settimeout(saved)
            except OSError:
                pass

    def unwrap(self) -> socket.socket:
        """Send close_notify, wait (bounded) for the peer's, and return the plain socket."""
        self._send_close_notify()
        session = self._session
        deadline = time.monotonic() + _CLOSE_TIMEOUT
        with self._read_lock:
            while session is not None and session.established and not self._eof:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._sock.settimeout(left)
                try:
                    self._read_more(exact_records=True)
                except (OSError, QKDError):
                    break
        sock = self._sock
        sock.settimeout(None)
        self._closed = True
        return sock

    def shutdown(self, how: int) -> None:
        if how in (socket.SHUT_WR, socket.SHUT_RDWR):
            self._send_close_notify()
        self._sock.shutdown(how)

    def close(self) -> None:
        """Send close_notify (best effort, bounded) and close; open makefile() objects delay the close."""
        if self._closed:
            return
        self._closed = True
        if self._io_refs <= 0:
            self._real_close()

    def _real_close(self) -> None:
        self._send_close_notify()
        self._linger()
        self._sock.close()

    def _linger(self) -> None:
        """After our close_notify: end our half of TCP and read until the peer's close_notify or end of
        stream, at most CLOSE_LINGER seconds, so what the peer still sends never meets a closed socket."""
        session = self._session
        if session is None or not session.established or session.failed is not None:
            return
        if self._eof or session.closed_by_peer:
            return  # the peer has finished sending: closing now cannot cause a reset
        deadline = time.monotonic() + CLOSE_LINGER
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            return
        # Another thread reading this socket gets the peer's end itself; then there is nothing to wait for.
        if not self._read_lock.acquire(timeout=CLOSE_LINGER):
            return
        try:
            scratch = bytearray(_HANDSHAKE_READ_SIZE)
            while not session.closed_by_peer:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._sock.settimeout(left)
                n = self._sock.recv_into(scratch)
                if not n:
                    return
                with self._lock:
                    try:
                        session.receive_data(bytes(scratch[:n]))
                    except QKDError:
                        return
                    session.take_events()  # data after our close is not read by anyone
        except OSError:
            return
        finally:
            self._read_lock.release()

    def _decref_socketios(self) -> None:
        if self._io_refs > 0:
            self._io_refs -= 1
        if self._closed and self._io_refs <= 0:
            self._real_close()

    def makefile(
        self,
        mode: str = "r",
        buffering: int | None = None,
        *,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
    ) -> Any:
        if self._closed:
            raise OSError("socket is closed")
        # socket.socket.makefile only needs recv_into/send/fileno/_io_refs/_decref_socketios from its self.
        return socket.socket.makefile(
            self,
            mode,
            buffering,
            encoding=encoding,
            errors=errors,  # type: ignore[arg-type]
            newline=newline,
        )

    def __enter__(self) -> QKDSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cert_dict(der: bytes) -> dict[str, Any]:
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)

    def name(n: x509.Name) -> tuple[tuple[tuple[str, str], ...], ...]:
        return tuple(((attr.rfc4514_attribute_name, str(attr.value)),) for attr in n)

    doc: dict[str, Any] = {
        "subject": name(cert.subject),
        "issuer": name(cert.issuer),
        "serialNumber": format(cert.serial_number, "X"),
        "notBefore": cert.not_valid_before_utc.strftime("%b %d %H:%M:%S %Y GMT"),
        "notAfter": cert.not_valid_after_utc.strftime("%b %d %H:%M:%S %Y GMT"),
    }
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return doc
    doc["subjectAltName"] = tuple(("DNS", d) for d in san.get_values_for_type(x509.DNSName)) + tuple(
        ("IP Address", str(ip)) for ip in san.get_values_for_type(x509.IPAddress)
    )
    return doc
