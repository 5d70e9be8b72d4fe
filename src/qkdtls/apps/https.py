"""HTTPS over TLS-QKD: a small HTTP/1.1 server and client (h11 does the HTTP parsing).

Both sides take either a :class:`qkdtls.net.context.QKDContext` or a Python :class:`ssl.SSLContext`, so the
same server answers TLS-QKD clients and, through the QKD server's hand-off to OpenSSL, ordinary ones such as
curl. The server is threaded: every connection gets a thread (bounded in number) that runs the handshake
under a timeout, then serves keep-alive requests until the peer closes or goes idle.

``GET /`` returns a small HTML page and ``GET /status`` a JSON object describing the connection the request
came on: mode (qkd or classic), profile, key ID, the peer's SAE ID, cipher suite and TLS version.
"""

from __future__ import annotations

import contextlib
import html
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import h11

if TYPE_CHECKING:
    from qkdtls.net.context import QKDContext

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
READ_SIZE = 65536
MAX_HEADER_BYTES = 16 * 1024
MAX_BODY_BYTES = 64 * 1024
SERVER_NAME = "qkdtls-https"


class TLSStream(Protocol):
    """What the applications need from a TLS socket (``ssl.SSLSocket`` and ``QKDSocket`` both qualify)."""

    def sendall(self, data: bytes, /) -> Any: ...
    def recv(self, bufsize: int, /) -> bytes: ...
    def settimeout(self, value: float | None, /) -> None: ...
    def close(self) -> None: ...



def _is_qkd_context(context: object) -> bool:
    return not isinstance(context, ssl.SSLContext)


def _nodelay(sock: socket.socket) -> None:
    # Handshake flights and media frames are latency-bound: Nagle must not hold them back.
    if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def tls_connect(
    context: ssl.SSLContext | QKDContext,
    address: tuple[str, int],
    *,
    server_hostname: str | None = None,
    target_sae_id: int | None = None,
    timeout: float = 10.0,
) -> TLSStream:
    """A TCP connection to ``address`` with the TLS handshake done (TLS-QKD when the context offers it).

    A TLS-QKD client asks its KME for the key before connecting, so the server never waits for it.
    """
    hostname = server_hostname if server_hostname is not None else address[0]
    prepared = None
    if _is_qkd_context(context):
        prepared = context.prepare_offer(  # type: ignore[union-attr]
            address[0], address[1], server_hostname=hostname, target_sae_id=target_sae_id
        )
    raw = socket.create_connection(address, timeout=timeout)
    try:
        _nodelay(raw)
        if _is_qkd_context(context):
            stream: TLSStream = context.wrap_socket(  # type: ignore[union-attr]
                raw, server_hostname=hostname, target_sae_id=target_sae_id, prepared_offer=prepared
            )
        else:
            stream = context.wrap_socket(raw, server_hostname=hostname)  # type: ignore[union-attr]
    except BaseException:
        raw.close()
        raise
    return stream


def tls_accept(context: ssl.SSLContext | QKDContext, raw: socket.socket, timeout: float = 10.0) -> TLSStream:
    """The server side of :func:`tls_connect`: wraps an accepted socket and runs the handshake."""
    _nodelay(raw)
    raw.settimeout(timeout)
    return context.wrap_socket(raw, server_side=True)  # type: ignore[union-attr,no-any-return]


def connection_status(stream: object) -> dict[str, Any]:
    """What was negotiated on a TLS stream, as JSON-ready ETSI-style names."""
    info = getattr(stream, "info", None)
    if info is not None:
        return {
            "mode": info.mode,
            "profile": info.profile,
            "key_ID": info.key_id,
            "peer_SAE_ID": info.peer_sae_id,
            "cipher": info.cipher,
            "version": info.version,
        }
    if isinstance(stream, ssl.SSLSocket):
        cipher = stream.cipher()
        return {
            "mode": "classic",
            "profile": None,
            "key_ID": None,
            "peer_SAE_ID": None,
            "cipher": cipher[0] if cipher else None,
            "version": stream.version(),
        }
    return {"mode": "unknown", "profile": None, "key_ID": None, "peer_SAE_ID": None}


# --- server ------------------------------------------------------------------------------------------------


def _page(status: Mapping[str, Any]) -> bytes:
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in status.items()
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>qkdtls</title></head><body>"
        "<h1>Hello over TLS-QKD</h1><p>This connection:</p>"
        f"<table>{rows}</table><p><a href='/status'>/status</a> (JSON)</p></body></html>"
    ).encode()


Handler = Callable[[str, Mapping[str, Any]], tuple[int, str, bytes] | None]


@dataclass
class HttpsServer:
    """A threaded HTTPS server on 127.0.0.1 (``port=0``: the kernel picks one).

    ``extra`` answers more paths: ``extra(path, status) -> (code, content_type, body)`` or None for 404.
    """

    context: ssl.SSLContext | QKDContext
    host: str = LOOPBACK
    port: int = 0
    handshake_timeout: float = 10.0
    idle_timeout: float = 15.0
    max_connections: int = 64
    extra: Handler | None = None
    served: int = 0
    handshakes_failed: int = 0
    _listener: socket.socket | None = field(default=None, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _slots: threading.BoundedSemaphore | None = field(default=None, repr=False)
    _active: dict[int, tuple[socket.socket, threading.Thread]] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def address(self) -> tuple[str, int]:
        if self._listener is None:
            raise RuntimeError("server not started")
        host, port = self._listener.getsockname()[:2]
        return host, port

    @property
    def url(self) -> str:
        host, port = self.address
        return f"https://{host}:{port}/"

    def start(self) -> HttpsServer:
        self._listener = socket.create_server((self.host, self.port), backlog=128)
        # accept() wakes up this often to notice close(); closing the socket alone does not wake it.
        self._listener.settimeout(0.2)
        self._slots = threading.BoundedSemaphore(self.max_connections)
        self._thread = threading.Thread(target=self._accept_loop, name="https-accept", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            active = list(self._active.values())
        for raw, _ in active:
            with contextlib.suppress(OSError):
                raw.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for _, thread in active:
            thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> HttpsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        assert self._listener is not None and self._slots is not None
        while not self._stop.is_set():
            try:
                raw, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                log.warning("too many connections; refusing one", extra={"event": "https.busy"})
                raw.close()
                continue
            # Wrapping takes the socket over (ssl detaches it); a duplicate descriptor lets close() shut
            # the connection down whichever object owns it by then.
            control = raw.dup()
            thread = threading.Thread(target=self._serve, args=(raw, control), name="https-conn", daemon=True)
            with self._lock:
                self._active[id(control)] = (control, thread)
            thread.start()

    def _serve(self, raw: socket.socket, control: socket.socket) -> None:
        assert self._slots is not None
        stream: TLSStream | None = None
        try:
            try:
                stream = tls_accept(self.context, raw, self.handshake_timeout)
            except (OSError, ValueError) as exc:
                with self._lock:
                    self.handshakes_failed += 1
                log.info("handshake failed", extra={"event": "https.handshake_failed", "error": str(exc)})
                return
            stream.settimeout(self.idle_timeout)
            self._http(stream)
        except OSError as exc:  # peer reset, idle timeout, a TLS alert after the handshake
            log.debug("connection ended", extra={"event": "https.connection_error", "error": str(exc)})
        finally:
            if stream is not None:
                with contextlib.suppress(OSError, ValueError):
                    stream.close()
            raw.close()
            with self._lock:
                self._active.pop(id(control), None)
            control.close()
            self._slots.release()

    def _http(self, stream: TLSStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        status = connection_status(stream)
        while not self._stop.is_set():
            try:
                event = _next_event(conn, stream)
                if isinstance(event, h11.ConnectionClosed):
                    return
                if not isinstance(event, h11.Request):
                    raise h11.RemoteProtocolError("expected a request", error_status_hint=400)
                body = 0
                while not isinstance(end := _next_event(conn, stream), h11.EndOfMessage):
                    if isinstance(end, h11.Data):
                        body += len(end.data)
                        if body > MAX_BODY_BYTES:
                            raise h11.RemoteProtocolError("request body too large", error_status_hint=413)
                    elif isinstance(end, h11.ConnectionClosed):
                        return
            except h11.RemoteProtocolError as exc:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    _send(stream, conn, exc.error_status_hint, "text/plain", f"{exc}\n".encode(), close=True)
                return
            code, ctype, payload = self._respond(event, status)
            _send(stream, conn, code, ctype, payload, head=event.method == b"HEAD")
            with self._lock:
                self.served += 1
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    def _respond(self, request: h11.Request, status: Mapping[str, Any]) -> tuple[int, str, bytes]:
        path = urlsplit(request.target.decode("ascii", "replace")).path
        if request.method not in (b"GET", b"HEAD"):
            return 405, "text/plain", b"only GET\n"
        if path == "/":
            return 200, "text/html; charset=utf-8", _page(status)
        if path == "/status":
            return 200, "application/json", json.dumps({"server": SERVER_NAME, **status}).encode()
        if self.extra is not None and (answer := self.extra(path, status)) is not None:
            return answer
        return 404, "text/plain", b"not found\n"


def _next_event(conn: h11.Connection, stream: TLSStream) -> Any:
    """The next h11 event, reading from the stream as needed (bounded by h11's size limit and the timeout)."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(stream.recv(READ_SIZE))


def _send(
    stream: TLSStream,
    conn: h11.Connection,
    code: int,
    ctype: str,
    body: bytes,
    *,
    close: bool = False,
    head: bool = False,
) -> None:
    headers = [
        ("Server", SERVER_NAME),
        ("Content-Type", ctype),
        ("Content-Length", str(len(body))),
    ]
    if close:
        headers.append(("Connection", "close"))
    out = conn.send(h11.Response(status_code=code, headers=headers))
    if not head:  # a HEAD answer announces the length of the body it does not carry
        out += conn.send(h11.Data(data=body)) or b""
    out += conn.send(h11.EndOfMessage()) or b""
    stream.sendall(out)


# --- client ------------------------------------------------------------------------------------------------


class HttpsError(OSError):
    """The server's answer was not valid HTTP/1.1, or the URL is not one this client can fetch."""


@dataclass(frozen=True)
class HttpsResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    connection: dict[str, Any]  # this side's view of the TLS connection (see connection_status)
    elapsed: float  # seconds from connect to the last byte of the body

    def json(self) -> Any:
        return json.loads(self.body)


def https_get(
    url: str,
    context: ssl.SSLContext | QKDContext,
    target_sae_id: int | None = None,
    *,
    timeout: float = 10.0,
) -> HttpsResponse:
    """GET ``url`` (https://host:port/path) over TLS-QKD (or classic TLS with an ``ssl.SSLContext``)."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise HttpsError(f"not an https URL: {url!r}")
    port = parts.port or 443
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    start = time.perf_counter()
    stream = tls_connect(
        context, (parts.hostname, port), server_hostname=parts.hostname, target_sae_id=target_sae_id,
        timeout=timeout,
    )
    try:
        stream.settimeout(timeout)
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADER_BYTES)
        host = parts.netloc.rpartition("@")[2]
        request = h11.Request(
            method="GET", target=target,
            headers=[("Host", host), ("User-Agent", SERVER_NAME), ("Connection", "close")],
        )
        stream.sendall(conn.send(request) + (conn.send(h11.EndOfMessage()) or b""))
        try:
            response = _next_event(conn, stream)
            if not isinstance(response, h11.Response):
                raise HttpsError("connection closed before a response")
            body = bytearray()
            while not isinstance(event := _next_event(conn, stream), h11.EndOfMessage):
                if isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.ConnectionClosed):
                    raise HttpsError("connection closed in the middle of the body")
        except h11.RemoteProtocolError as exc:
            raise HttpsError(f"bad HTTP response: {exc}") from None
        return HttpsResponse(
            status=response.status_code,
            headers={k.decode("latin-1"): v.decode("latin-1") for k, v in response.headers},
            body=bytes(body),
            connection=connection_status(stream),
            elapsed=time.perf_counter() - start,
        )
    finally:
        with contextlib.suppress(OSError, ValueError):
            stream.close()
