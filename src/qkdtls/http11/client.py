"""A lean HTTP/1.1 client: kept-alive (mutual-TLS) connections to one server, responses parsed by httptools.

aiohttp's client spends ~100+ µs of CPU per request on machinery this project does not need (cookie jars,
redirects, tracing, proxies, stream readers, per-request timers and wrappers). The KME's callers send small
requests to a single known server, many times a second, so this client does only that: one
``asyncio.Protocol`` per connection (it runs on asyncio and uvloop loops alike), responses parsed by
``httptools`` (the maintained binding of llhttp, the parser of Node.js), and a small pool of kept-alive
connections reused last-in first-out.

Rules the pool follows:

* at most ``max_connections`` connections are open (or opening); further callers wait first-in first-out,
  and that wait counts against their timeout;
* one request in flight per connection (no pipelining);
* a connection is reused only when the response allowed it (no ``Connection: close``, no HTTP/1.0 without
  keep-alive, no close-delimited body), the server has not closed it and it has been idle less than
  ``idle_timeout`` seconds;
* after a timeout, a cancellation or any error during a request the connection is closed: its state is
  unknown;
* when a reused idle connection is closed by the server before one byte of the response arrived (the server
  dropped it while the request was on its way), the request is sent once more on a fresh connection. It is
  never repeated once a response byte arrived, nor after a failure on a fresh connection.

Error messages name the server and the cause class only: request and response bodies can carry secret key
material.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl as ssl_module
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

import httptools

__all__ = ["HttpClient", "HttpClientError", "HttpResponse", "HttpTimeout"]

# Read buffer per connection: a full TLS record's plaintext.
_READ_BUFFER = 16384
# Bounds what a misbehaving server can make us buffer before the body starts.
MAX_HEADER_BYTES = 64 << 10
# Closing connections on close() waits this long for the TLS shutdown exchange before aborting them.
_CLOSE_GRACE = 1.0
# Set by this client, so callers must not send them again: a second Content-Length breaks message framing.
_RESERVED = frozenset({"host", "content-length", "transfer-encoding"})
# Control characters in a header (CR, LF above all) would let a value start a new header or request.
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_BAD_TOKEN = re.compile(r"[\x00-\x20\x7f]")
# Requests whose empty body needs no Content-Length: 0 (RFC 9110 §8.6 discourages it on them).
_BODYLESS = frozenset({"GET", "HEAD"})


class HttpClientError(Exception):
    """The request failed: connection refused or reset, TLS failure, malformed or oversized response,
    or a closed client."""


class HttpTimeout(HttpClientError, TimeoutError):
    """No complete response within the timeout (waiting for a connection included)."""


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    headers: dict[str, str]  # lower-case names; repeated names joined with ", "
    body: bytes


class _Connection(asyncio.BufferedProtocol):
    """One kept-alive connection; serves one request at a time through ``exchange``.

    A buffered protocol: TLS decrypts straight into ``_buffer`` instead of into a fresh 256 KiB bytes object
    per read (whose allocation and trimming cost mmap/mremap/munmap system calls every time)."""

    __slots__ = (
        "_body",
        "_body_size",
        "_buffer",
        "_head",
        "_head_size",
        "_headers",
        "_headers_done",
        "_lost_waiter",
        "_max_body",
        "_parser",
        "_pool",
        "_until_eof",
        "_waiter",
        "broken",
        "closed",
        "got_bytes",
        "idle",
        "idle_since",
        "keep_alive",
        "transport",
    )

    def __init__(self, pool: HttpClient) -> None:
        self._pool = pool
        self._max_body = pool._max_body
        self._parser = httptools.HttpResponseParser(self)
        self._buffer = memoryview(bytearray(_READ_BUFFER))
        self._waiter: asyncio.Future[HttpResponse] | None = None
        self._lost_waiter: asyncio.Future[None] | None = None
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._body_size = 0
        self._head_size = 0
        self._headers_done = False
        self._until_eof = False
        self._head = False
        self.transport: asyncio.Transport | None = None
        self.got_bytes = False  # a byte of the current response arrived
        self.keep_alive = False  # the last response allows another request on this connection
        self.broken = False  # bytes nobody asked for, or a parser state we cannot trust
        self.closed = False  # the transport is gone (or going)
        self.idle = False  # sitting in the pool's idle stack
        self.idle_since = 0.0

    # --- asyncio.Protocol ---------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # Registered only now: a protocol whose TLS handshake failed never hears connection_lost.
        self._pool._all.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Requests are written in one piece and answered quickly: Nagle would only add delay.
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):
                pass

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        # The parser copies what it hands to the callbacks, so the buffer can be reused at once.
        self.data_received(self._buffer[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        if self._waiter is None:
            # Unsolicited bytes: whatever they are, the connection is out of step with us.
            self.broken = True
            self._abort()
            return
        self.got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(self._error("unexpected protocol upgrade"))
        except httptools.HttpParserError as exc:
            cause = exc.__context__ if isinstance(exc.__context__, HttpClientError) else None
            self._fail(cause or self._error(f"malformed response ({type(exc).__name__})"))

    def eof_received(self) -> bool | None:
        self._peer_closed(None)
        return None  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._peer_closed(exc)
        self._pool._connection_lost(self)
        lost = self._lost_waiter
        if lost is not None and not lost.done():
            lost.set_result(None)

    # --- httptools callbacks ------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._waiter is None:
            self.broken = True  # a second response in the same read: the server is out of step
        self._headers = {}
        self._head_size = 0
        self._headers_done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value)
        if self._head_size > MAX_HEADER_BYTES:
            raise self._error(f"response headers over {MAX_HEADER_BYTES} bytes")
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers = self._headers
        previous = headers.get(key)
        headers[key] = text if previous is None else f"{previous}, {text}"

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:
            return  # interim response (100 Continue, 103 Early Hints): llhttp ends it without a body
        if self._head:
            # llhttp cannot be told the request was HEAD and would wait for the announced body: answer now
            # and drop the connection, whose parser is out of step.
            self.keep_alive = False
            self._finish(status)
            return
        headers = self._headers
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self._max_body:
            raise self._error(f"response body over {self._max_body} bytes")
        coding = headers.get("transfer-encoding")
        # llhttp reads to EOF when neither framing is given; httptools cannot tell it that EOF came.
        self._until_eof = "chunked" not in coding.lower() if coding is not None else length is None
        self._headers_done = True

    def on_body(self, data: bytes) -> None:
        self._body_size += len(data)
        if self._body_size > self._max_body:
            raise self._error(f"response body over {self._max_body} bytes")
        self._body.append(data)

    def on_message_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200 or self._waiter is None:
            return
        self.keep_alive = self._parser.should_keep_alive()
        self._finish(status)

    # --- used by the client -------------------------------------------------------------------------------

    def exchange(self, data: bytes, head: bool) -> asyncio.Future[HttpResponse]:
        """Send one request; the future resolves with its response."""
        waiter: asyncio.Future[HttpResponse] = self._pool._loop.create_future()
        self.got_bytes = False
        self.keep_alive = False
        self._headers_done = False
        self._body_size = 0
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            # Dropped while it was handed over: as stale as a drop after the write, and as safe to retry.
            waiter.set_exception(self._error("connection closed by the server before responding"))
            return waiter
        self._waiter = waiter
        self._head = head
        transport.write(data)
        return waiter

    def fail(self, exc: HttpClientError) -> None:
        self._fail(exc)

    def abort(self) -> None:
        self._waiter = None
        self._abort()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def lost(self) -> asyncio.Future[None]:
        """Resolves once the transport is gone (only asked for by close(), on live connections)."""
        if self._lost_waiter is None:
            self._lost_waiter = self._pool._loop.create_future()
        return self._lost_waiter

    # --- internals ----------------------------------------------------------------------------------------

    def _finish(self, status: int) -> None:
        waiter = self._waiter
        self._waiter = None
        body = self._body
        # join() of one bytes object returns that object: no copy for single-read bodies.
        response = HttpResponse(status, self._headers, b"".join(body))
        body.clear()
        if waiter is not None and not waiter.done():
            waiter.set_result(response)

    def _peer_closed(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is None:
            return
        if exc is None and self._headers_done and self._until_eof:
            self.keep_alive = False
            self._finish(self._parser.get_status_code())
            return
        if exc is not None:
            reason = f"connection lost ({type(exc).__name__})"
        elif self.got_bytes:
            reason = "connection closed by the server mid-response"
        else:
            reason = "connection closed by the server before responding"
        self._fail(self._error(reason))

    def _fail(self, exc: HttpClientError) -> None:
        waiter = self._waiter
        self._waiter = None
        self._body.clear()
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self._abort()

    def _abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _error(self, reason: str) -> HttpClientError:
        return HttpClientError(f"{self._pool._where}: {reason}")


class HttpClient:
    """HTTP/1.1 client for one server (``host``:``port``), with a pool of kept-alive connections.

    ``ssl`` turns on TLS (load a client certificate into it for mutual TLS); ``server_hostname`` overrides
    the name checked against the server certificate and sent as ``Host``. ``timeout`` bounds a whole
    request: waiting for a connection, connecting, the TLS handshake, sending and the complete response.
    ``default_headers`` go with every request, before the per-request ones. ``Host`` and
    ``Content-Length`` are the client's to write.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl: ssl_module.SSLContext | None = None,
        server_hostname: str | None = None,
        max_connections: int = 4,
        timeout: float = 10.0,
        idle_timeout: float = 30.0,
        max_body_bytes: int = 16 << 20,
        default_headers: Mapping[str, str] | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections}")
        if timeout <= 0 or idle_timeout <= 0:
            raise ValueError("timeout and idle_timeout must be positive")
        if max_body_bytes < 0:
            raise ValueError(f"max_body_bytes must not be negative, got {max_body_bytes}")
        self._host = host
        self._port = port
        self._ssl = ssl
        self._server_hostname = server_hostname if ssl is not None else None
        self._max = max_connections
        self._timeout = timeout
        self._idle_timeout = idle_timeout
        self._max_body = max_body_bytes
        self._where = f"{host}:{port}"
        name = server_hostname or host
        if ":" in name:
            name = f"[{name}]"  # IPv6 literal
        default_port = 443 if ssl is not None else 80
        authority = name if port == default_port else f"{name}:{port}"
        # Everything after the request line that does not change between requests, encoded once.
        fixed = f"Host: {authority}\r\n"
        self._fixed = fixed.encode("latin-1")
        extra = _header_lines(default_headers) if default_headers else ""
        self._defaults = extra.encode("latin-1")
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # bound on first use
        self._idle: list[_Connection] = []  # LIFO: the most recently used connection is on top
        self._all: set[_Connection] = set()
        self._open = 0  # connections open or being opened: at most max_connections
        # Each waiter receives an idle connection, or None: a free slot to open a connection in.
        self._waiters: deque[asyncio.Future[_Connection | None]] = deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._opened = 0
        self._closed = False

    @property
    def connections_opened(self) -> int:
        """Connections opened since the client was created (each one counted once)."""
        return self._opened

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def request(
        self,
        method: str,
        target: str,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
        *,
        timeout: float | None = None,
    ) -> HttpResponse:
        """Send ``method target`` with ``body`` and return the complete response, whatever its status."""
        if self._closed:
            raise HttpClientError(f"{self._where}: client is closed")
        if _BAD_TOKEN.search(method) or _BAD_TOKEN.search(target):
            raise ValueError("request method and target must not contain spaces or control characters")
        line = f"{method} {target} HTTP/1.1\r\n".encode("latin-1")
        length = b"Content-Length: %d\r\n" % len(body) if body or method not in _BODYLESS else b""
        extra = _header_lines(headers).encode("latin-1") if headers else b""
        data = b"".join((line, self._fixed, length, self._defaults, extra, b"\r\n", body))
        limit = self._timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                return await self._send(data, method == "HEAD")
        except HttpTimeout:
            raise
        except TimeoutError:
            raise HttpTimeout(f"{self._where}: no complete response within {limit:g} s") from None

    async def close(self) -> None:
        """Close every connection; requests in flight and later ones fail with HttpClientError."""
        if self._closed:
            return
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        error = HttpClientError(f"{self._where}: client is closed")
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)
        idle, self._idle = self._idle, []
        lost = []
        for conn in list(self._all):
            lost.append(conn.lost())
            if conn in idle:
                conn.idle = False
                conn.close()  # graceful: TLS close_notify
            else:
                conn.fail(error)
        self._open -= len(idle)
        if lost:
            _, pending = await asyncio.wait(lost, timeout=_CLOSE_GRACE)
            if pending:
                for conn in list(self._all):
                    conn.abort()

    # --- internals ----------------------------------------------------------------------------------------

    async def _send(self, data: bytes, head: bool) -> HttpResponse:
        conn = await self._acquire()
        reused = conn is not None
        try:
            if conn is None:
                conn = await self._connect()
            try:
                response = await conn.exchange(data, head)
            except HttpClientError:
                if self._closed:
                    raise HttpClientError(f"{self._where}: client is closed") from None
                # The keep-alive race: the server closed the idle connection while our request travelled.
                if not reused or conn.got_bytes:
                    raise
                conn.abort()
                conn = None
                conn = await self._connect()
                response = await conn.exchange(data, head)
        except BaseException:
            if conn is not None:
                conn.abort()
            self._free_slot()
            raise
        self._release(conn)
        return response

    async def _acquire(self) -> _Connection | None:
        """An idle connection, or None when the caller got a free slot and must open one."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        idle = self._idle
        if idle:
            now = loop.time()
            while idle:
                conn = idle.pop()
                conn.idle = False
                if not conn.closed and not conn.broken and now - conn.idle_since < self._idle_timeout:
                    return conn
                # Nobody waits while connections are idle, so the slot simply goes.
                conn.close()
                self._open -= 1
        if self._open < self._max:
            self._open += 1
            return None
        waiter: asyncio.Future[_Connection | None] = loop.create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # Handed a connection or a slot just as we were cancelled: pass it on.
                conn = waiter.result()
                if conn is None:
                    self._free_slot()
                else:
                    self._release(conn)
            else:
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass
            raise

    async def _connect(self) -> _Connection:
        if self._closed:
            raise HttpClientError(f"{self._where}: client is closed")
        try:
            _, conn = await self._loop.create_connection(
                self._protocol, self._host, self._port, ssl=self._ssl, server_hostname=self._server_hostname
            )
        except ssl_module.SSLError as exc:
            raise HttpClientError(f"{self._where}: TLS handshake failed ({type(exc).__name__})") from exc
        except TimeoutError:
            raise  # the request timeout, or the kernel's: either way a timeout for the caller
        except OSError as exc:
            raise HttpClientError(f"{self._where}: cannot connect ({type(exc).__name__})") from exc
        self._opened += 1
        if self._closed:
            conn.abort()
            raise HttpClientError(f"{self._where}: client is closed")
        return conn

    def _protocol(self) -> _Connection:
        return _Connection(self)

    def _release(self, conn: _Connection) -> None:
        """Back to the pool after a complete response: reuse it if allowed, else close it."""
        if not conn.keep_alive or conn.closed or conn.broken or self._closed:
            conn.close()
            self._free_slot()
            return
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        conn.idle = True
        conn.idle_since = self._loop.time()
        self._idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self._loop.call_at(conn.idle_since + self._idle_timeout, self._sweep)

    def _free_slot(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._open -= 1

    def _connection_lost(self, conn: _Connection) -> None:
        """Forget a dead connection; if it was idle (the server closed it), give its slot back."""
        self._all.discard(conn)
        if not conn.idle:
            return
        conn.idle = False
        try:
            self._idle.remove(conn)
        except ValueError:
            return
        self._free_slot()

    def _sweep(self) -> None:
        """Close idle connections past idle_timeout, so a quiet client does not hold them forever."""
        self._sweeper = None
        idle = self._idle
        deadline = self._loop.time() - self._idle_timeout
        # The stack is ordered by idle_since: the expired ones are at the bottom.
        expired = 0
        while expired < len(idle) and idle[expired].idle_since <= deadline:
            expired += 1
        for conn in idle[:expired]:
            conn.idle = False
            conn.close()
            self._free_slot()
        del idle[:expired]
        if idle:
            self._sweeper = self._loop.call_at(idle[0].idle_since + self._idle_timeout, self._sweep)


def _header_lines(headers: Mapping[str, str]) -> str:
    parts = []
    for name, value in headers.items():
        if _BAD_TOKEN.search(name) or _BAD_VALUE.search(value) or not name:
            raise ValueError(f"header {name!r} has a name or value with control characters")
        if name.lower() in _RESERVED:
            raise ValueError(f"header {name!r} is written by the client itself")
        parts.append(f"{name}: {value}\r\n")
    return "".join(parts)
