"""The HTTP/1.1 client against real servers on loopback.

aiohttp servers play the well-behaved peer (plain and mutual TLS); scripted ``asyncio.start_server`` servers
play the misbehaving ones (never answering, dropping connections, malformed or close-delimited responses).
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from qkdtls import pki
from qkdtls.http11.client import HttpClient, HttpClientError, HttpResponse, HttpTimeout

LOOPBACK = "127.0.0.1"


# --- certificates -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    ca: pki.Issued
    server: pki.Issued
    client: pki.Issued
    foreign_ca: pki.Issued

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.ca.cert))
        ctx.load_cert_chain(self.server.cert, self.server.key)
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_context(self, *, cafile: Path | None = None, with_cert: bool = True) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(cafile or self.ca.cert))
        if with_cert:
            ctx.load_cert_chain(self.client.cert, self.client.key)
        return ctx


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    root = tmp_path_factory.mktemp("pki")
    ca = pki.create_ca(root, "HTTP test CA")
    server = pki.issue_server_cert(
        ca.cert, ca.key, root, "http-test-server", hostnames=("localhost", LOOPBACK)
    )
    client = pki.issue_client_cert(ca.cert, ca.key, root, "http-test-client")
    foreign_ca, _ = pki.build_foreign_client(root / "foreign")
    return Certs(ca, server, client, foreign_ca)


# --- a well-behaved aiohttp server --------------------------------------------------------------------------


@dataclass
class Seen:
    """What the aiohttp server observed: client ports (one per connection) and peak concurrency."""

    ports: set[int]
    in_flight: int = 0
    peak: int = 0


def _app(seen: Seen) -> web.Application:
    def note(request: web.Request) -> None:
        assert request.transport is not None
        seen.ports.add(request.transport.get_extra_info("peername")[1])

    async def echo(request: web.Request) -> web.Response:
        note(request)
        body = await request.read()
        doc = {"method": request.method, "path": request.path_qs, "headers": dict(request.headers)}
        resp = web.Response(body=json.dumps(doc).encode() + b"\n" + body, content_type="application/json")
        resp.headers.add("X-Rep", "a")
        resp.headers.add("X-Rep", "b")
        return resp

    async def slow(request: web.Request) -> web.Response:
        note(request)
        seen.in_flight += 1
        seen.peak = max(seen.peak, seen.in_flight)
        try:
            await asyncio.sleep(0.05)
        finally:
            seen.in_flight -= 1
        return web.Response(text="slow")

    async def chunked(request: web.Request) -> web.StreamResponse:
        note(request)
        size = int(request.query.get("size", "0"))
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        if size:
            await resp.write(b"x" * size)
        else:
            for piece in (b"one,", b"two,", b"three"):
                await resp.write(piece)
                await asyncio.sleep(0.01)  # separate TCP segments: the parser must join chunks
        await resp.write_eof()
        return resp

    async def big(request: web.Request) -> web.Response:
        note(request)
        return web.Response(body=b"y" * int(request.query["size"]))

    async def close(request: web.Request) -> web.Response:
        note(request)
        resp = web.Response(text="bye")
        resp.force_close()
        return resp

    async def cert(request: web.Request) -> web.Response:
        note(request)
        assert request.transport is not None
        peer = request.transport.get_extra_info("peercert") or {}
        names = dict(pair[0] for pair in peer.get("subject", ()))
        return web.Response(text=names.get("commonName", "-"))

    app = web.Application()
    app.router.add_route("*", "/echo", echo)
    app.router.add_get("/slow", slow)
    app.router.add_get("/chunked", chunked)
    app.router.add_get("/big", big)
    app.router.add_get("/close", close)
    app.router.add_get("/cert", cert)
    return app


@dataclass
class AioServer:
    port: int
    seen: Seen


StartServer = Callable[..., Awaitable[AioServer]]


@pytest.fixture
async def aio_server() -> AsyncIterator[StartServer]:
    runners: list[web.AppRunner] = []

    async def start(ssl_context: ssl.SSLContext | None = None) -> AioServer:
        seen = Seen(set())
        runner = web.AppRunner(_app(seen), shutdown_timeout=0.5)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, LOOPBACK, 0, ssl_context=ssl_context)
        await site.start()
        port = runner.addresses[0][1]
        return AioServer(port, seen)

    yield start
    for runner in runners:
        await runner.cleanup()


# --- scripted servers ---------------------------------------------------------------------------------------


class Scripted:
    """An asyncio server that runs ``script(server, reader, writer)`` for every connection it accepts."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []  # request lines, in arrival order
        self.eofs = 0  # connections the client closed
        self.port = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Scripted:
        self._server = await asyncio.start_server(self._serve, LOOPBACK, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        # Dropping the transports ends every script at its next read; cancelling them instead makes
        # asyncio log the cancellation of a connection callback as an error.
        for writer in self._writers:
            writer.transport.abort()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=2.0)
            for task in pending:
                task.cancel()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        try:
            await self.script(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        """The request line of the next request (its body consumed), or None at EOF."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            self.eofs += 1
            return None
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length:
            await reader.readexactly(length)
        request_line = head.split(b"\r\n", 1)[0]
        self.requests.append(request_line)
        return request_line

    async def wait_eof(self, reader: asyncio.StreamReader) -> None:
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass
        self.eofs += 1

    async def until(self, condition: Callable[[], bool], timeout: float = 2.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError("the scripted server did not reach the expected state")
            await asyncio.sleep(0.005)


Script = Callable[[Scripted, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def keep_alive(srv: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers every request ``200 ok`` on the same connection, except /hang which it never answers."""
    while (line := await srv.read_request(reader)) is not None:
        if line.startswith(b"GET /hang "):
            await srv.wait_eof(reader)
            return
        writer.write(OK)
        await writer.drain()


def _client(port: int, **kwargs: object) -> HttpClient:
    return HttpClient(LOOPBACK, port, **kwargs)  # type: ignore[arg-type]


def _doc(response: HttpResponse) -> tuple[dict[str, object], bytes]:
    head, _, body = response.body.partition(b"\n")
    return json.loads(head), body


# --- round trips --------------------------------------------------------------------------------------------


async def test_get_and_post_round_trip(aio_server: StartServer) -> None:
    srv = await aio_server()
    client = _client(srv.port, default_headers={"User-Agent": "qkdtls-test", "X-Default": "d"})
    try:
        payload = bytes(range(256)) * 4
        resp = await client.request(
            "POST", "/echo?x=1", payload, {"Content-Type": "application/octet-stream"}
        )
        assert resp.status == 200
        assert resp.headers["content-type"] == "application/json"
        assert resp.headers["x-rep"] == "a, b"  # repeated names joined
        assert all(name == name.lower() for name in resp.headers)
        doc, echoed = _doc(resp)
        assert echoed == payload
        assert doc["method"] == "POST" and doc["path"] == "/echo?x=1"
        seen = doc["headers"]
        assert isinstance(seen, dict)
        assert seen["Host"] == f"{LOOPBACK}:{srv.port}"
        assert seen["Content-Length"] == str(len(payload))
        assert seen["X-Default"] == "d" and seen["User-Agent"] == "qkdtls-test"
        assert seen["Content-Type"] == "application/octet-stream"

        doc, echoed = _doc(await client.request("POST", "/echo"))
        assert echoed == b"" and doc["headers"]["Content-Length"] == "0"  # type: ignore[index]

        resp = await client.request("GET", "/echo")
        doc, echoed = _doc(resp)
        assert resp.status == 200 and doc["method"] == "GET" and echoed == b""
        assert "Transfer-Encoding" not in doc["headers"]  # type: ignore[operator]

        missing = await client.request("GET", "/nowhere")
        assert missing.status == 404  # any status is a response, not an error
    finally:
        await client.close()


async def test_keep_alive_reuses_one_connection(aio_server: StartServer) -> None:
    srv = await aio_server()
    client = _client(srv.port)
    try:
        for i in range(50):
            resp = await client.request("POST", "/echo", b"%d" % i)
            assert _doc(resp)[1] == b"%d" % i
        assert client.connections_opened == 1
        assert len(srv.seen.ports) == 1
    finally:
        await client.close()


async def test_concurrency_is_capped_at_max_connections(aio_server: StartServer) -> None:
    srv = await aio_server()
    client = _client(srv.port, max_connections=3)
    try:
        responses = await asyncio.gather(*(client.request("GET", "/slow") for _ in range(20)))
        assert [r.body for r in responses] == [b"slow"] * 20
        assert len(srv.seen.ports) == 3  # server side: three client connections, no more
        assert srv.seen.peak == 3  # and all three were used at once
        assert client.connections_opened == 3
    finally:
        await client.close()


async def test_chunked_response(aio_server: StartServer) -> None:
    srv = await aio_server()
    client = _client(srv.port)
    try:
        for _ in range(2):
            resp = await client.request("GET", "/chunked")
            assert resp.status == 200
            assert resp.headers["transfer-encoding"] == "chunked"
            assert resp.body == b"one,two,three"
        assert client.connections_opened == 1  # a chunked response keeps the connection
    finally:
        await client.close()


async def test_close_delimited_response() -> None:
    async def script(srv: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhello, ")
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(b"world")
        await writer.drain()

    async with Scripted(script) as srv:
        client = _client(srv.port)
        try:
            for _ in range(2):
                resp = await client.request("GET", "/")
                assert (resp.status, resp.body) == (200, b"hello, world")
            assert client.connections_opened == 2
        finally:
            await client.close()


async def test_connection_close_response_is_not_reused(aio_server: StartServer) -> None:
    srv = await aio_server()
    client = _client(srv.port)
    try:
        for _ in range(3):
            resp = await client.request("GET", "/close")
            assert resp.body == b"bye" and resp.headers["connection"] == "close"
        assert client.connections_opened == 3
        assert len(srv.seen.ports) == 3
    finally:
        await client.close()


async def test_http10_response_without_keep_alive_is_not_reused() -> None:
    async def script(srv: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Keeps the connection open and would answer again: only the client's rule prevents reuse.
        while await srv.read_request(reader) is not None:
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    async with Scripted(script) as srv:
        client = _client(srv.port)
        try:
            for _ in range(2):
                assert (await client.request("GET", "/")).body == b"ok"
            assert client.connections_opened == 2 and srv.connections == 2
        finally:
            await client.close()


async def test_interim_100_continue_is_skipped() -> None:
    async def script(srv: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await srv.read_request(reader) is not None:
            writer.write(b"HTTP/1.1 100 Continue\r\nX-Interim: yes\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.01)
            writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\nX-Final: yes\r\n\r\ndone")
            await writer.drain()

    async with Scripted(script) as srv:
        client = _client(srv.port)
        try:
            for _ in range(2):
                resp = await client.request("POST", "/", b"body")
                assert (resp.status, resp.body) == (201, b"done")
                assert resp.headers["x-final"] == "yes" and "x-interim" not in resp.headers
            assert client.connections_opened == 1
        finally:
            await client.close()


# --- keep-alive hazards -------------------------------------------------------------------------------------


async def test_idle_connection_closed_by_server_is_not_reused() -> None:
    async def script(srv: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.read_request(reader)
        writer.write(OK)  # keep-alive by HTTP/1.1 default, then dropped at once
        await writer.drain()

    async with Scripted(script) as srv:
        client = _client(srv.port)
        try:
            assert (await client.request("GET", "/")).body == b"ok"
            await asyncio.sleep(0.05)  # the server's FIN reaches the idle connection
            assert (await client.request("GET", "/")).body == b"ok"
            assert client.connections_opened == 2 and len(srv.requests) == 2
        finally:
            await client.close()


async def test_reused_connection_dropped_before_response_is_retried_once() -> None:
    async def script(srv: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.read_request(reader)
        writer.write(OK)
        await writer.drain()
        # The keep-alive race: the next request arrives as the server gives up on the connection.
        await srv.read_request(reader)

    async with Scripted(script) as srv:
        client = _client(srv.port)
        try:
            assert (await client.request("POST", "/a", b"1")).body == b"ok"
            assert (await client.request("POST", "/b", b"2")).body == b"ok"
            assert srv.requests == [b"POST /a HTTP/1.1", b"POST /b HTTP/1.1", b"POST /b HTTP/1.1"]
            assert client.connections_opened == 2
        finally:
            await client.close()


async def test_fresh_connection_dropped_is_not_retried() -> None:
    async def script(srv: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.read_request(reader)

    async with Scripted(script) as srv:
        client = _client(srv.port)
        try:
            with pytest.raises(HttpClientError, match="before responding"):
                await client.request("POST", "/", b"secret-key-material")
            assert len(srv.requests) == 1 and client.connections_opened == 1
        finally:
            await client.close()


async def test_no_retry_once_a_response_byte_arrived() -> None:
    async def script(srv: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.read_request(reader)
        writer.write(OK)
        await writer.drain()
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
        await writer.drain()

    async with Scripted(script) as srv:
        client = _client(srv.port)
        try:
            await client.request("GET", "/")
            with pytest.raises(HttpClientError, match="mid-response") as caught:
                await client.request("POST", "/", b"secret-key-material")
            assert "secret" not in str(caught.value)
            assert len(srv.requests) == 2 and client.connections_opened == 1
        finally:
            await client.close()


async def test_idle_connections_expire() -> None:
    async with Scripted(keep_alive) as srv:
        client = _client(srv.port, idle_timeout=0.2)
        try:
            await client.request("GET", "/")
            # Closed by the client's sweep even though no request comes to notice the age.
            await srv.until(lambda: srv.eofs == 1)
            await client.request("GET", "/")
            assert client.connections_opened == 2
        finally:
            await client.close()


# --- timeouts and cancellation ------------------------------------------------------------------------------


async def test_timeout_against_a_silent_server_releases_the_slot() -> None:
    async with Scripted(keep_alive) as srv:
        client = _client(srv.port, max_connections=1, timeout=0.3)
        try:
            started = time.monotonic()
            with pytest.raises(HttpTimeout) as caught:
                await client.request("GET", "/hang")
            elapsed = time.monotonic() - started
            assert 0.25 <= elapsed < 1.0
            assert isinstance(caught.value, TimeoutError) and isinstance(caught.value, HttpClientError)
            await srv.until(lambda: srv.eofs == 1)  # the timed-out connection was closed, not pooled
            # The only slot is free again.
            assert (await client.request("GET", "/ok")).body == b"ok"
            assert client.connections_opened == 2

            # A per-request timeout overrides the client's.
            started = time.monotonic()
            with pytest.raises(HttpTimeout):
                await client.request("GET", "/hang", timeout=0.1)
            assert time.monotonic() - started < 0.25
        finally:
            await client.close()


async def test_waiting_for_a_connection_counts_against_the_timeout() -> None:
    async with Scripted(keep_alive) as srv:
        client = _client(srv.port, max_connections=1, timeout=5.0)
        try:
            holder = asyncio.create_task(client.request("GET", "/hang"))
            await srv.until(lambda: len(srv.requests) == 1)
            started = time.monotonic()
            with pytest.raises(HttpTimeout):
                await client.request("GET", "/ok", timeout=0.2)
            assert time.monotonic() - started < 0.5
            assert client.connections_opened == 1  # it never got a connection
            holder.cancel()
            with pytest.raises(asyncio.CancelledError):
                await holder
            assert (await client.request("GET", "/ok", timeout=2.0)).body == b"ok"
        finally:
            await client.close()


async def test_cancellation_releases_the_slot() -> None:
    async with Scripted(keep_alive) as srv:
        client = _client(srv.port, max_connections=1)
        try:
            # Cancelled while waiting for the response.
            task = asyncio.create_task(client.request("GET", "/hang"))
            await srv.until(lambda: len(srv.requests) == 1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await srv.until(lambda: srv.eofs == 1)  # its connection was closed
            assert (await client.request("GET", "/ok", timeout=2.0)).body == b"ok"

            # Cancelled while queued for the only connection.
            holder = asyncio.create_task(client.request("GET", "/hang"))
            await srv.until(lambda: len(srv.requests) == 3)
            queued = asyncio.create_task(client.request("GET", "/ok"))
            await asyncio.sleep(0.02)
            queued.cancel()
            with pytest.raises(asyncio.CancelledError):
                await queued
            holder.cancel()
            with pytest.raises(asyncio.CancelledError):
                await holder
            assert (await client.request("GET", "/ok", timeout=2.0)).body == b"ok"
            assert (await client.request("GET", "/ok", timeout=2.0)).body == b"ok"
        finally:
            await client.close()


@pytest.mark.parametrize("handover", ["connection", "slot"])
async def test_cancelled_just_after_being_handed_a_connection(handover: str) -> None:
    async def script(srv: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (line := await srv.read_request(reader)) is not None:
            await asyncio.sleep(0.05 if line.startswith(b"GET /slow") else 0)
            # "slot": the connection cannot be reused, so the queued caller gets a slot to connect in.
            close = b"Connection: close\r\n" if handover == "slot" else b""
            writer.write(b"HTTP/1.1 200 OK\r\n" + close + b"Content-Length: 2\r\n\r\nok")
            await writer.drain()

    async with Scripted(script) as srv:
        client = _client(srv.port, max_connections=1)
        try:
            holder = asyncio.create_task(client.request("GET", "/slow"))
            await srv.until(lambda: len(srv.requests) == 1)
            queued = asyncio.create_task(client.request("GET", "/ok"))
            # The holder's last step hands its connection (or slot) to the queued caller; cancel that
            # caller before it runs, so it must pass on what it was given.
            while not holder.done():
                await asyncio.sleep(0)
            queued.cancel()
            with pytest.raises(asyncio.CancelledError):
                await queued
            assert (await holder).body == b"ok"
            for _ in range(2):
                assert (await client.request("GET", "/ok", timeout=1.0)).body == b"ok"
        finally:
            await client.close()


# --- bad responses ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
    ids=["not-http", "bad-length", "bad-chunk"],
)
async def test_malformed_response(answer: bytes) -> None:
    async def script(srv: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.read_request(reader)
        writer.write(answer)
        await writer.drain()
        await srv.wait_eof(reader)

    async with Scripted(script) as srv:
        client = _client(srv.port)
        try:
            with pytest.raises(HttpClientError, match="malformed response"):
                await client.request("GET", "/")
            await srv.until(lambda: srv.eofs == 1)  # the client dropped the connection
        finally:
            await client.close()


async def test_oversized_body(aio_server: StartServer) -> None:
    srv = await aio_server()
    client = _client(srv.port, max_body_bytes=1024)
    try:
        assert len((await client.request("GET", "/big?size=1024")).body) == 1024
        with pytest.raises(HttpClientError, match="over 1024 bytes"):
            await client.request("GET", "/big?size=1025")
        with pytest.raises(HttpClientError, match="over 1024 bytes"):
            await client.request("GET", "/chunked?size=2048")  # refused while reading chunks
        assert (await client.request("GET", "/big?size=10")).body == b"y" * 10
    finally:
        await client.close()


async def test_head_response_has_no_body(aio_server: StartServer) -> None:
    srv = await aio_server()
    client = _client(srv.port, max_body_bytes=1024, timeout=2.0)
    try:
        # The announced length is over max_body_bytes, but a HEAD response carries no body.
        resp = await client.request("HEAD", "/big?size=5000")
        assert (resp.status, resp.headers["content-length"], resp.body) == (200, "5000", b"")
        assert (await client.request("GET", "/big?size=3")).body == b"yyy"
    finally:
        await client.close()


async def test_oversized_content_length_is_refused_before_the_body() -> None:
    async def script(srv: Scripted, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n")  # and no body follows
        await writer.drain()
        await srv.wait_eof(reader)

    async with Scripted(script) as srv:
        client = _client(srv.port, max_body_bytes=1024, timeout=2.0)
        try:
            with pytest.raises(HttpClientError, match="over 1024 bytes"):
                await client.request("GET", "/")
        finally:
            await client.close()


# --- TLS and connection failures ----------------------------------------------------------------------------


async def test_mutual_tls_presents_the_client_certificate(aio_server: StartServer, certs: Certs) -> None:
    srv = await aio_server(certs.server_context())
    client = _client(srv.port, ssl=certs.client_context())
    try:
        for _ in range(3):
            resp = await client.request("GET", "/cert")
            assert (resp.status, resp.body) == (200, b"http-test-client")
        assert client.connections_opened == 1
    finally:
        await client.close()

    # The server really demands it: without a client certificate the request fails.
    bare = _client(srv.port, ssl=certs.client_context(with_cert=False))
    try:
        with pytest.raises(HttpClientError):
            await bare.request("GET", "/cert")
    finally:
        await bare.close()


async def test_server_certificate_from_an_unknown_ca(aio_server: StartServer, certs: Certs) -> None:
    srv = await aio_server(certs.server_context())
    client = _client(srv.port, ssl=certs.client_context(cafile=certs.foreign_ca.cert))
    try:
        with pytest.raises(HttpClientError, match=rf"{LOOPBACK}:{srv.port}: TLS handshake failed") as caught:
            await client.request("GET", "/cert")
        assert "SSLCertVerificationError" in str(caught.value)
    finally:
        await client.close()


async def test_connection_refused() -> None:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        port = probe.getsockname()[1]
    # Nobody listens on the port any more.
    client = _client(port)
    try:
        with pytest.raises(HttpClientError, match=rf"{LOOPBACK}:{port}: cannot connect \(ConnectionRefused"):
            await client.request("GET", "/")
        assert client.connections_opened == 0
    finally:
        await client.close()


async def test_close_closes_connections_and_refuses_requests() -> None:
    async with Scripted(keep_alive) as srv:
        client = _client(srv.port, max_connections=2)
        in_flight = asyncio.create_task(client.request("GET", "/hang"))
        await srv.until(lambda: len(srv.requests) == 1)
        await client.request("GET", "/")  # a second connection, left idle
        await client.close()
        with pytest.raises(HttpClientError, match="closed"):
            await in_flight
        await srv.until(lambda: srv.eofs == 2)  # the idle and the busy connection
        with pytest.raises(HttpClientError, match="client is closed"):
            await client.request("GET", "/")
        assert client.connections_opened == 2


# --- uvloop -------------------------------------------------------------------------------------------------


def test_runs_on_uvloop(certs: Certs) -> None:
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
        seen = Seen(set())
        runner = web.AppRunner(_app(seen), shutdown_timeout=0.5)
        await runner.setup()
        await web.TCPSite(runner, LOOPBACK, 0, ssl_context=certs.server_context()).start()
        port = runner.addresses[0][1]
        client = _client(port, ssl=certs.client_context(), max_connections=2)
        try:
            for i in range(10):
                assert _doc(await client.request("POST", "/echo", b"%d" % i))[1] == b"%d" % i
            assert (await client.request("GET", "/chunked")).body == b"one,two,three"
            assert (await client.request("GET", "/cert")).body == b"http-test-client"
            assert client.connections_opened == 1
            await asyncio.gather(*(client.request("GET", "/slow") for _ in range(6)))
            assert client.connections_opened == 2 and seen.peak == 2
        finally:
            await client.close()
            await runner.cleanup()
        async with Scripted(keep_alive) as srv:
            client = _client(srv.port, timeout=0.2, max_connections=1)
            try:
                with pytest.raises(HttpTimeout):
                    await client.request("GET", "/hang")
                assert (await client.request("GET", "/ok")).body == b"ok"
            finally:
                await client.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())
