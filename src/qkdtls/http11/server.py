"""A lean HTTP/1.1 server for JSON APIs over (mutual) TLS: asyncio protocols plus the httptools parser.

Why not a web framework: the KME answers three requests per key cycle (the master's ``enc_keys``, the
peer KME's reservation, the slave's ``dec_keys``) and its CPU per cycle is what operators size hardware by.
aiohttp's request, router, middleware and response objects cost about 90 µs of CPU per kept-alive mTLS
request on this hardware; a protocol that parses with httptools (the maintained binding of llhttp, the
parser of Node.js) and writes the answer in one buffer costs about a third of that. What a JSON API needs
is small, and it is all here:

- HTTP/1.1 keep-alive and pipelining (answers in request order), HTTP/1.0, ``Expect: 100-continue``,
  chunked request bodies (decoded by the parser), origin- and absolute-form request targets;
- limits on the request head (line plus headers), the header count and the body, each answered with 400
  and the connection closed; malformed HTTP answered with 400 (never a traceback, never a hang);
- a deadline for reading each request (slow or stalled senders), an idle timeout for kept-alive
  connections, back-pressure (a client that does not read its answers stops being read), TCP_NODELAY;
- connection caps: a global cap, and caps on connections that have not authenticated yet, globally and
  per client address, each full cap closing the oldest such connection to make room; a short idle timeout
  for those connections (see ``ServerLimits``);
- clean shutdown: stop accepting, let requests in progress answer (bounded), close the rest.

The statuses the server chooses itself are 400 (the client's fault: malformed, no such route, method not
allowed, too large) and 503 (a handler failed); the error bodies come from the application
(``error_response``) so that every answer of an API has that API's format.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import cast
from urllib.parse import parse_qsl, unquote

import httptools

from qkdtls.serving import listening_socket

log = logging.getLogger("qkdtls.http11.server")

UNMATCHED = "unmatched"
MSG_MALFORMED = "malformed HTTP request"
MSG_TOO_LARGE = "request body too large"
MSG_URL_TOO_LONG = "request target too long"
MSG_FIELD_TOO_LONG = "header field too long"
MSG_HEAD_TOO_LARGE = "request headers too large"
MSG_INTERNAL = "internal error of the server; the request can be retried"

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
# Per connection: a full TLS record's plaintext fits; longer messages arrive in several reads.
READ_BUFFER = 16384
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Status line and fixed fields up to the Content-Length value, per (status, content type) answered.
_PREFIXES: dict[tuple[int, str], bytes] = {}


def _prefix(status: int, content_type: str) -> bytes:
    prefix = b"HTTP/1.1 %d %s\r\nServer: qkdtls\r\nContent-Type: %s\r\nContent-Length: " % (
        status,
        _REASONS.get(status, b"Unknown"),
        content_type.encode("latin-1"),
    )
    if len(_PREFIXES) < 256:  # statuses and types come from this process, but stay bounded anyway
        _PREFIXES[(status, content_type)] = prefix
    return prefix


@dataclass(slots=True)
class Request:
    """One complete request. ``params`` holds the route's ``{name}`` segments, percent-decoded."""

    method: str
    path: str
    query_string: str
    raw_headers: list[tuple[bytes, bytes]]  # as received; see ``headers``
    body: bytes
    transport: asyncio.BaseTransport
    route: str = UNMATCHED
    params: dict[str, str] = field(default_factory=dict)

    @property
    def headers(self) -> dict[str, str]:
        """Header fields by lower-case name, repeated fields joined with ", " (built on each access)."""
        out: dict[str, str] = {}
        for name, value in self.raw_headers:
            key, text = name.decode("latin-1").lower(), value.decode("latin-1")
            out[key] = f"{out[key]}, {text}" if key in out else text
        return out

    def query(self) -> list[tuple[str, str]]:
        """Query parameters in order, repeated names kept, blank values kept."""
        if not self.query_string:
            return []
        return parse_qsl(self.query_string, keep_blank_values=True)

    @property
    def remote(self) -> str | None:
        peer = self.transport.get_extra_info("peername")
        return str(peer[0]) if peer else None


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    # Extra header fields (name, value): the handler's own, never CR or LF in them.
    headers: tuple[tuple[str, str], ...] = ()


Handler = Callable[[Request], Awaitable[Response]]
ErrorResponder = Callable[[int, str], Response]
# Turns what a handler raised into the answer; the default logs it and answers 503.
ExceptionResponder = Callable[[Request, Exception], Response]
# Called once per answer (access log, metrics): the request (None for unparseable input), status, seconds.
ResponseObserver = Callable[[Request | None, int, float], None]


class RouteError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(slots=True)
class _Pattern:
    pattern: str
    literals: tuple[tuple[int, str], ...]  # (segment index, text) that must match exactly
    params: tuple[tuple[int, str], ...]  # (segment index, parameter name)
    methods: dict[str, Handler]


class Router:
    """Method + path → handler. Patterns are literal segments and ``{name}`` segments (one whole segment).

    Patterns with parameters are indexed by segment count and last segment, so that resolving a path
    compares it with one or two candidates, not every route.
    """

    def __init__(self) -> None:
        self._static: dict[str, dict[str, Handler]] = {}
        self._dynamic: dict[tuple[int, str], list[_Pattern]] = {}

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        segments = pattern.split("/")
        if not any(s.startswith("{") for s in segments):
            self._static.setdefault(pattern, {})[method] = handler
            return
        candidates = self._dynamic.setdefault((len(segments), _last_key(segments[-1])), [])
        for known in candidates:
            if known.pattern == pattern:
                known.methods[method] = handler
                return
        candidates.append(
            _Pattern(
                pattern,
                tuple((i, s) for i, s in enumerate(segments) if not s.startswith("{")),
                tuple((i, s[1:-1]) for i, s in enumerate(segments) if s.startswith("{")),
                {method: handler},
            )
        )

    def resolve(self, request: Request) -> Handler:
        """The handler for ``request`` (sets ``route`` and ``params``); :class:`RouteError` if none."""
        path = request.path
        methods = self._static.get(path)
        if methods is not None:
            request.route = path
        else:
            segments = path.split("/")
            n = len(segments)
            for candidates in (self._dynamic.get((n, segments[-1])), self._dynamic.get((n, ""))):
                for p in candidates or ():
                    if _matches(p, segments):
                        request.route = p.pattern
                        request.params = {name: unquote(segments[i]) for i, name in p.params}
                        methods = p.methods
                        break
                if methods is not None:
                    break
        if methods is None:
            raise RouteError(f"no such route: {path[:200]}")
        handler = methods.get(request.method)
        if handler is None:
            raise RouteError(f"method {request.method[:16]} is not allowed on {path[:200]}")
        return handler


def _matches(pattern: _Pattern, segments: list[str]) -> bool:
    for i, text in pattern.literals:
        if segments[i] != text:
            return False
    return all(segments[i] for i, _ in pattern.params)


def _last_key(segment: str) -> str:
    # A pattern ending in a parameter matches any last segment: indexed under "".
    return "" if segment.startswith("{") else segment


@dataclass(frozen=True, slots=True)
class ServerLimits:
    max_target_bytes: int = 8190
    max_field_bytes: int = 8190
    max_head_bytes: int = 32768
    max_headers: int = 100
    max_body_bytes: int = 65536
    # From a request's first byte to its last: bounds what a slow or stalled sender can hold.
    request_timeout: float = 30.0
    keepalive_timeout: float = 75.0
    max_pipelined: int = 16
    # Connection caps (0: none). A connection is *unauthenticated* from its accept (TLS handshake included)
    # until one of its requests is answered with a status other than 401 and 403, after a TLS handshake
    # that gave a verified client certificate when ``require_client_certificate``. Strangers can open
    # connections for free, so they are what the caps bound: when the cap on unauthenticated connections,
    # overall or from the new connection's address, is full, the oldest such connection is closed to make
    # room (a client that goes on to authenticate is rarely the oldest); when ``max_connections`` is full
    # and no connection is unauthenticated, the new one is closed at once.
    max_connections: int = 0
    max_unauthenticated: int = 0
    max_unauthenticated_per_address: int = 0
    # Idle (or request-reading) seconds an unauthenticated connection may last; None: like any other.
    unauthenticated_timeout: float | None = None
    require_client_certificate: bool = False


# Why a connection was closed by the caps or timeouts: the keys of ``HttpServer.closed``.
CLOSED_FULL = "full"  # max_connections reached, nothing to evict: closed at accept
CLOSED_EVICTED = "evicted"  # oldest unauthenticated connection, for a new one
CLOSED_EVICTED_ADDRESS = "evicted_per_address"  # the same, among those of one address
CLOSED_UNAUTHENTICATED_TIMEOUT = "unauthenticated_timeout"
CLOSED_HANDSHAKE = "handshake_failed"  # TLS handshake failed or timed out


class _Abort(Exception):
    """Raised inside parser callbacks to stop parsing this connection with a 400."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _Date:
    """The Date header value, formatted once per second."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def value(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True).encode()
        return self._value


class HttpConnection(asyncio.BufferedProtocol):
    """One client connection: parses requests, runs their handlers one at a time, writes answers in order.

    A buffered protocol: the TLS layer decrypts straight into this connection's buffer. With a plain
    protocol, uvloop (and asyncio) asks OpenSSL for up to 256 KiB per read, and allocating and trimming that
    much for every record took a fifth of the server's CPU in mmap/mremap/munmap system calls.
    """

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._buffer = memoryview(bytearray(READ_BUFFER))
        self._limits = server.limits
        self._parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        # (request, keep the connection alive after it, the request was HTTP/1.0)
        self._pending: collections.deque[tuple[Request, bool, bool]] = collections.deque()
        self._busy = False
        self._closing = False
        self._close_when_answered = False
        self._ignore_input = False
        self._write_paused = False
        self._read_paused = False
        # Deadlines checked by the server's timer: reading a request, or idling between requests.
        self.reading_since: float | None = None
        self.idle_since = time.monotonic()
        # Connection caps (see ServerLimits): the client's address, whether it has authenticated, whether
        # its TLS handshake gave a client certificate. ``_sock``: the accepted socket during the handshake.
        self.address = ""
        self.authenticated = False
        self.admitted = False
        self._has_certificate = False
        self._sock: socket.socket | None = None
        self._reset_message()

    def _reset_message(self) -> None:
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._body: list[bytes] = []
        self._body_bytes = 0
        self._length: bytes | None = None
        self._expect: bytes | None = None

    # --- transport callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self._server
        if not self.admitted and not server.admit(self, transport):  # plain TCP: admitted here
            self._closing = True
            transport.abort()
            return
        self._sock = None
        if self._closing:  # evicted or shut down while its TLS handshake completed
            transport.abort()
            return
        # uvloop's TLS transport is not an asyncio.Transport subclass, though it has the same methods.
        self.transport = cast(asyncio.Transport, transport)
        # Looked up once per connection: get_running_loop() costs a getpid() system call.
        self._loop = asyncio.get_running_loop()
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ssl_object = transport.get_extra_info("ssl_object")
        self._has_certificate = ssl_object is not None and bool(ssl_object.getpeercert(binary_form=True))
        self.idle_since = time.monotonic()
        server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._server.connections.discard(self)
        self._server.release(self)
        self._pending.clear()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        # The parser copies what it hands to the callbacks, so the buffer can be reused at once.
        self.data_received(self._buffer[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        if self._closing or self._ignore_input:
            return
        try:
            self._parser.feed_data(data)
        except _Abort as exc:
            self._fail(exc.message)
        except httptools.HttpParserUpgrade:
            # The request asking for the upgrade is complete and queued: answer it (ignoring the Upgrade,
            # as RFC 9110 §7.8 allows) and close, since what follows it is not HTTP/1.1.
            self._ignore_input = True
            self._close_when_answered = True
            if not self._busy and not self._pending:
                self._close()
        except httptools.HttpParserError as exc:
            # httptools wraps what a callback raises (our limits) in HttpParserCallbackError.
            cause = exc.__cause__ or exc.__context__
            self._fail(cause.message if isinstance(cause, _Abort) else MSG_MALFORMED)

    def eof_received(self) -> bool | None:
        # A client may half-close after its last request; answer what is in progress, then close.
        if not self._busy and not self._pending:
            return None  # the transport closes itself
        self._close_when_answered = True
        # Over TLS the transport closes after close_notify whatever we return (and warns about True).
        return None if self.transport is None or self.transport.get_extra_info("sslcontext") else True

    def pause_writing(self) -> None:
        self._write_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._maybe_resume_reading()
        if not self._busy and self._pending:
            self._start_next()

    # --- parser callbacks

    def on_message_begin(self) -> None:
        # The message state was reset when the previous message completed (or the connection opened).
        self.reading_since = time.monotonic()

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self._limits.max_target_bytes:
            raise _Abort(MSG_URL_TOO_LONG)

    def on_header(self, name: bytes, value: bytes) -> None:
        limits = self._limits
        field = len(name) + len(value) + 4
        if field > limits.max_field_bytes:
            raise _Abort(MSG_FIELD_TOO_LONG)
        self._head_bytes += field
        if self._head_bytes > limits.max_head_bytes:
            raise _Abort(MSG_HEAD_TOO_LARGE)
        headers = self._headers
        if len(headers) >= limits.max_headers:
            raise _Abort("too many header fields")
        headers.append((name, value))
        # The two fields the server itself reads; the length check avoids lower-casing every name.
        if len(name) == 14 and name.lower() == b"content-length":
            self._length = value
        elif len(name) == 6 and name.lower() == b"expect":
            self._expect = value

    def on_headers_complete(self) -> None:
        length = self._length
        if length is not None and length.isdigit() and int(length) > self._limits.max_body_bytes:
            raise _Abort(MSG_TOO_LARGE)
        if (
            self._expect is not None
            and self._expect.lower() == b"100-continue"
            and self._parser.get_http_version() == "1.1"
            and self.transport is not None
        ):
            self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self._limits.max_body_bytes:
            raise _Abort(MSG_TOO_LARGE)
        self._body.append(body)

    def on_message_complete(self) -> None:
        self.reading_since = None
        assert self.transport is not None
        url = self._url
        if url[:1] == b"/":
            path, _, query = url.partition(b"?")
            path_text, query_text = path.decode("utf-8", "replace"), query.decode("utf-8", "replace")
        else:
            try:
                parsed = httptools.parse_url(url)
            except httptools.HttpParserInvalidURLError:
                raise _Abort("malformed request target") from None
            path_text = (parsed.path or b"/").decode("utf-8", "replace")
            query_text = (parsed.query or b"").decode("utf-8", "replace")
        body = b"".join(self._body) if len(self._body) != 1 else self._body[0]
        request = Request(
            self._parser.get_method().decode("ascii", "replace"),
            path_text,
            query_text,
            self._headers,
            body,
            self.transport,
        )
        self._reset_message()
        parser = self._parser
        self._pending.append((request, parser.should_keep_alive(), parser.get_http_version() == "1.0"))
        if len(self._pending) > self._limits.max_pipelined:
            self._pause_reading()
        if not self._busy and not self._write_paused:
            self._start_next()

    # --- answering

    def _start_next(self) -> None:
        request, keep_alive, http10 = self._pending.popleft()
        self._busy = True
        self._maybe_resume_reading()
        task = self._loop.create_task(self._answer(request, keep_alive, http10))
        self._server.tasks.add(task)
        task.add_done_callback(self._server.tasks.discard)

    async def _answer(self, request: Request, keep_alive: bool, http10: bool) -> None:
        server = self._server
        started = time.perf_counter()
        try:
            handler = server.router.resolve(request)
            response = await handler(request)
        except RouteError as exc:
            response = server.error_response(400, exc.message)
        except asyncio.CancelledError:
            # Shutdown ran out of time for this request: answer it rather than drop the connection silently.
            response = server.error_response(503, MSG_INTERNAL)
            keep_alive = False
        except Exception as exc:
            response = server.exception_response(request, exc)
        last = self._close_when_answered and not self._pending
        keep_alive = keep_alive and not server.closing and not last
        self._write(response, keep_alive, http10=http10, head_only=request.method == "HEAD")
        if (
            not self.authenticated
            and response.status not in (401, 403)
            and (self._has_certificate or not server.limits.require_client_certificate)
        ):
            server.authenticated(self)
        if server.observer is not None:
            server.observer(request, response.status, time.perf_counter() - started)
        self._busy = False
        self.idle_since = time.monotonic()
        if not keep_alive:
            self._close()
        elif self._pending and not self._write_paused:
            self._start_next()

    def _write(
        self, response: Response, keep_alive: bool, *, http10: bool = False, head_only: bool = False
    ) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        body = response.body
        prefix = _PREFIXES.get((response.status, response.content_type))
        if prefix is None:
            prefix = _prefix(response.status, response.content_type)
        head = prefix + b"%d\r\nDate: %s\r\n" % (len(body), self._server.date.value())
        if response.headers:
            head += "".join(f"{name}: {value}\r\n" for name, value in response.headers).encode("latin-1")
        if not keep_alive:
            head += b"Connection: close\r\n"
        elif http10:
            head += b"Connection: keep-alive\r\n"
        transport.write(head + b"\r\n" if head_only else head + b"\r\n" + body)

    def _fail(self, message: str) -> None:
        """Answer unparseable input with 400 and close: after it the byte stream cannot be trusted."""
        self._closing = True
        self.reading_since = None
        self._pending.clear()
        server = self._server
        if not self._busy:
            response = server.error_response(400, message)
            self._write(response, keep_alive=False)
            if server.observer is not None:
                server.observer(None, response.status, 0.0)
        self._close()

    def _close(self) -> None:
        self._closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _pause_reading(self) -> None:
        if not self._read_paused and self.transport is not None and not self.transport.is_closing():
            self._read_paused = True
            self.transport.pause_reading()

    def _maybe_resume_reading(self) -> None:
        if (
            self._read_paused
            and not self._write_paused
            and len(self._pending) <= self._limits.max_pipelined
            and self.transport is not None
            and not self.transport.is_closing()
        ):
            self._read_paused = False
            self.transport.resume_reading()

    # --- used by the server

    @property
    def busy(self) -> bool:
        return self._busy or bool(self._pending)

    def close_if_idle(self) -> None:
        if not self.busy:
            self._close()

    def abort(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.abort()
        elif self._sock is not None:  # TLS handshake in progress: make it fail now
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)


class _Accepted:
    """What ``admit`` reads of a connection accepted by ``HttpServer._accept``: its peer address."""

    __slots__ = ("_sock",)

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def get_extra_info(self, name: str, default: object = None) -> object:
        if name == "peername":
            try:
                return self._sock.getpeername()
            except OSError:
                return default
        return default


class HttpServer:
    """Serves ``router`` on one listening socket; :meth:`start` binds, :meth:`close` shuts down cleanly."""

    def __init__(
        self,
        router: Router,
        *,
        error_response: ErrorResponder,
        exception_response: ExceptionResponder | None = None,
        observer: ResponseObserver | None = None,
        limits: ServerLimits | None = None,
    ) -> None:
        self.router = router
        self.error_response = error_response
        self.exception_response = exception_response or self._internal_error
        self.observer = observer
        self.limits = limits or ServerLimits()
        self.connections: set[HttpConnection] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.date = _Date()
        self.closing = False
        # Every admitted connection, TLS handshakes included, oldest first; those not authenticated yet,
        # overall and per client address (oldest first); counts of connections closed by caps and timeouts.
        self._admitted: dict[HttpConnection, None] = {}
        self._unauthenticated: dict[HttpConnection, None] = {}
        self._by_address: dict[str, dict[HttpConnection, None]] = {}
        self.closed: collections.Counter[str] = collections.Counter()
        self._handshakes: set[asyncio.Task[None]] = set()
        self._ssl: ssl.SSLContext | None = None
        self._handshake_timeout: float | None = None
        self._listener: socket.socket | None = None
        self._acceptor: asyncio.Task[None] | None = None
        self._server: asyncio.Server | None = None
        self._timer: asyncio.Task[None] | None = None
        self._port = 0

    def _internal_error(self, request: Request, exc: Exception) -> Response:
        log.error(
            "request handler failed",
            exc_info=exc,
            extra={"event": "http.error", "route": request.route},
        )
        return self.error_response(503, MSG_INTERNAL)

    async def start(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        handshake_timeout: float | None = None,
        backlog: int = 512,
    ) -> None:
        loop = asyncio.get_running_loop()
        self._ssl, self._handshake_timeout = ssl_context, handshake_timeout
        if ssl_context is None:
            self._server = await loop.create_server(
                lambda: HttpConnection(self), host, port, backlog=backlog, reuse_address=True
            )
            self._port = int(self._server.sockets[0].getsockname()[1]) if self._server.sockets else port
        else:
            # Over TLS, connections are accepted here and handed to the loop's TLS layer one by one
            # (``connect_accepted_socket``) rather than by a TLS listener, so that each is counted, and
            # capped, from its accept on: a TLS listener tells the application nothing about connections
            # whose handshake never completes.
            listener = await listening_socket(host, port, backlog)
            self._listener = listener
            self._port = int(listener.getsockname()[1])
            self._acceptor = asyncio.create_task(self._accept(listener), name="http11-accept")
        self._timer = asyncio.create_task(self._enforce_timeouts(), name="http11-timeouts")

    @property
    def port(self) -> int:
        """The bound port (also after :meth:`close`)."""
        return self._port

    # --- connection caps

    @property
    def open_connections(self) -> int:
        """Admitted connections, TLS handshakes in progress included."""
        return len(self._admitted)

    @property
    def unauthenticated_connections(self) -> int:
        return len(self._unauthenticated)

    def admit(self, conn: HttpConnection, transport: asyncio.BaseTransport | _Accepted) -> bool:
        """Count a new connection under the caps, closing the oldest unauthenticated one(s) to make room;
        False when it must be closed at once (``max_connections`` full of authenticated connections)."""
        if self.closing:
            return False
        limits = self.limits
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        full = limits.max_connections and len(self._admitted) >= limits.max_connections
        if full and not self._evict_oldest(self._unauthenticated, CLOSED_EVICTED):
            self.closed[CLOSED_FULL] += 1
            return False
        if limits.max_unauthenticated and len(self._unauthenticated) >= limits.max_unauthenticated:
            self._evict_oldest(self._unauthenticated, CLOSED_EVICTED)
        same = self._by_address.get(address)
        per_address = limits.max_unauthenticated_per_address
        if per_address and same is not None and len(same) >= per_address:
            self._evict_oldest(same, CLOSED_EVICTED_ADDRESS)
        conn.address = address
        conn.admitted = True
        self._admitted[conn] = None
        self._unauthenticated[conn] = None
        self._by_address.setdefault(address, {})[conn] = None
        return True

    def authenticated(self, conn: HttpConnection) -> None:
        """The connection has authenticated: the caps and the short timeout no longer apply to it."""
        conn.authenticated = True
        self._forget_unauthenticated(conn)

    def release(self, conn: HttpConnection) -> None:
        """The connection is closed (or being closed): it no longer counts."""
        if self._admitted.pop(conn, 0) is None:
            self._forget_unauthenticated(conn)

    def _forget_unauthenticated(self, conn: HttpConnection) -> None:
        if self._unauthenticated.pop(conn, 0) is None:
            same = self._by_address.get(conn.address)
            if same is not None:
                same.pop(conn, None)
                if not same:
                    del self._by_address[conn.address]

    def _evict_oldest(self, group: dict[HttpConnection, None], reason: str) -> bool:
        if not group:
            return False
        oldest = next(iter(group))
        self.release(oldest)
        oldest.abort()
        self.closed[reason] += 1
        return True

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(listener)
            except (ConnectionAbortedError, InterruptedError):
                continue
            except OSError as exc:
                # Out of file descriptors or memory: what is open must close first. Retry shortly.
                log.warning("accept failed", extra={"event": "http.accept_failed", "error": str(exc)})
                await asyncio.sleep(0.1)
                continue
            conn = HttpConnection(self)
            if not self.admit(conn, _Accepted(sock)):
                sock.close()
                continue
            conn._sock = sock
            task = loop.create_task(self._handshake(conn, sock))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, conn: HttpConnection, sock: socket.socket) -> None:
        assert self._ssl is not None
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(
                lambda: conn, sock, ssl=self._ssl, ssl_handshake_timeout=self._handshake_timeout
            )
        except asyncio.CancelledError:
            sock.close()
            self.release(conn)
            raise
        except Exception:
            # Failed, timed out or cut short (evicted): OpenSSL has sent its alert where it had one to send.
            sock.close()
            if conn in self._admitted:
                self.closed[CLOSED_HANDSHAKE] += 1
            self.release(conn)

    async def _enforce_timeouts(self) -> None:
        # One sweep a second, not a timer per request: the deadlines are seconds, timers cost CPU.
        limits = self.limits
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for conn in list(self.connections):
                if conn.reading_since is not None:
                    if now - conn.reading_since > limits.request_timeout:
                        conn.abort()
                elif not conn.busy and now - conn.idle_since > limits.keepalive_timeout:
                    conn.close_if_idle()
            short = limits.unauthenticated_timeout
            if short is not None:
                # Those in a TLS handshake have no transport yet: the handshake timeout bounds them.
                for conn in list(self._unauthenticated):
                    if conn.transport is None or conn.busy:
                        continue
                    since = conn.reading_since if conn.reading_since is not None else conn.idle_since
                    if now - since > short:
                        self.release(conn)
                        conn.abort()
                        self.closed[CLOSED_UNAUTHENTICATED_TIMEOUT] += 1

    async def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, let requests in progress answer for up to ``timeout`` seconds, close everything."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        if self._acceptor is not None:
            self._acceptor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._acceptor
            self._acceptor = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
        for task in list(self._handshakes):
            task.cancel()
        for conn in list(self.connections):
            conn.close_if_idle()
        deadline = time.monotonic() + timeout
        while self.tasks and time.monotonic() < deadline:
            await asyncio.wait(set(self.tasks), timeout=max(deadline - time.monotonic(), 0))
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=1.0)
        for conn in [*self.connections, *self._admitted]:
            conn.abort()
        if self._handshakes:
            await asyncio.wait(set(self._handshakes), timeout=1.0)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None
