"""The lean HTTP/1.1 server over real loopback sockets: framing, limits, timeouts, back-pressure, shutdown."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from qkdtls.http11.server import HttpServer, Request, Response, Router, ServerLimits
from qkdtls.pki import ZoneSpec, build_testbed_pki


def _error(status: int, message: str) -> Response:
    return Response(status, json.dumps({"message": message}).encode())


class App:
    def __init__(self) -> None:
        self.seen: list[tuple[str | None, int]] = []
        self.release = asyncio.Event()

    def router(self) -> Router:
        r = Router()
        r.add("GET", "/hello", self.hello)
        r.add("POST", "/echo", self.echo)
        r.add("GET", "/items/{name}/info", self.item)
        r.add("GET", "/slow", self.slow)
        r.add("GET", "/boom", self.boom)
        r.add("GET", "/headers", self.headers)
        return r

    async def headers(self, request: Request) -> Response:
        return Response(200, json.dumps(request.headers).encode())

    async def hello(self, request: Request) -> Response:
        return Response(200, b'{"hello":"world"}')

    async def echo(self, request: Request) -> Response:
        return Response(200, request.body, "application/octet-stream")

    async def item(self, request: Request) -> Response:
        doc = {"name": request.params["name"], "query": request.query(), "route": request.route}
        return Response(200, json.dumps(doc).encode())

    async def slow(self, request: Request) -> Response:
        await self.release.wait()
        return Response(200, b'{"slow":true}')

    async def boom(self, request: Request) -> Response:
        raise RuntimeError("secret detail that must not leak")

    def observe(self, request: Request | None, status: int, seconds: float) -> None:
        self.seen.append((request.route if request is not None else None, status))


LIMITS = ServerLimits(max_body_bytes=1024, request_timeout=1.5, keepalive_timeout=1.5, max_pipelined=4)


@pytest.fixture
async def served() -> AsyncIterator[tuple[App, HttpServer]]:
    app = App()
    server = HttpServer(app.router(), error_response=_error, observer=app.observe, limits=LIMITS)
    await server.start("127.0.0.1", 0)
    try:
        yield app, server
    finally:
        app.release.set()
        await server.close(2.0)


async def _exchange(port: int, raw: bytes, *, timeout: float = 5.0) -> bytes:
    """Send ``raw``, then read until the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


async def _read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await asyncio.wait_for(reader.readexactly(length), 5)


def _messages(raw: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        out.append((head, rest[:length]))
        raw = rest[length:]
    return out


async def test_keep_alive_and_pipelined_requests_answer_in_order(served: tuple[App, HttpServer]) -> None:
    app, server = served
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        for _ in range(3):
            writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
            head, body = await _read_response(reader)
            assert head.startswith(b"HTTP/1.1 200 OK\r\n") and body == b'{"hello":"world"}'
            assert b"Date: " in head and b"Connection: close" not in head
        # Three requests in one segment, the middle one with a body: answers come back in order.
        writer.write(
            b"GET /items/a%2Fb/info?x=1&x=2&y= HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
            b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        answers = [await _read_response(reader) for _ in range(3)]
    finally:
        writer.close()
    item = json.loads(answers[0][1])
    assert item == {
        "name": "a/b",
        "query": [["x", "1"], ["x", "2"], ["y", ""]],
        "route": "/items/{name}/info",
    }
    assert answers[1][1] == b"hello" and b"application/octet-stream" in answers[1][0]
    assert answers[2][1] == b'{"hello":"world"}'
    assert len(server.connections) <= 1
    assert [status for _, status in app.seen] == [200] * 6


async def test_chunked_body_expect_continue_and_absolute_target(served: tuple[App, HttpServer]) -> None:
    _, server = served
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"abc")
        assert (await _read_response(reader))[1] == b"abc"
        writer.write(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        )
        assert (await _read_response(reader))[1] == b"abcde"
        writer.write(b"GET http://example.test/hello HTTP/1.1\r\nHost: example.test\r\n\r\n")
        assert (await _read_response(reader))[1] == b'{"hello":"world"}'
    finally:
        writer.close()


async def test_http10_closes_unless_keep_alive_is_asked(served: tuple[App, HttpServer]) -> None:
    _, server = served
    answer = await _exchange(server.port, b"GET /hello HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200") and b"Connection: close" in answer
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"GET /hello HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        head, _ = await _read_response(reader)
        assert b"Connection: keep-alive" in head
        writer.write(b"GET /hello HTTP/1.0\r\n\r\n")
        await _read_response(reader)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # then closed
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n", "no such route: /nowhere"),
        (b"DELETE /hello HTTP/1.1\r\nHost: x\r\n\r\n", "method DELETE is not allowed on /hello"),
        (b"GET /items//info HTTP/1.1\r\nHost: x\r\n\r\n", "no such route: /items//info"),
    ],
)
async def test_routing_errors_are_400_and_keep_the_connection(
    served: tuple[App, HttpServer], raw: bytes, message: str
) -> None:
    _, server = served
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(raw)
        head, body = await _read_response(reader)
        assert head.startswith(b"HTTP/1.1 400 Bad Request") and json.loads(body) == {"message": message}
        writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await _read_response(reader))[0].startswith(b"HTTP/1.1 200")
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40), "malformed HTTP request"),
        (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n", "request body too large"),
        (
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"200\r\n"
            + b"a" * 512
            + b"\r\n"
            + b"200\r\n"
            + b"a" * 512
            + b"\r\n200\r\n"
            + b"a" * 512
            + b"\r\n",
            "request body too large",
        ),
        (
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            "malformed HTTP request",
        ),
    ],
    ids=["tls-to-plain", "content-length", "chunked", "two-lengths"],
)
async def test_bad_input_gets_400_json_then_close(
    served: tuple[App, HttpServer], raw: bytes, message: str
) -> None:
    app, server = served
    answer = await _exchange(server.port, raw)
    [(head, body)] = _messages(answer)
    assert head.startswith(b"HTTP/1.1 400") and b"Connection: close" in head
    assert json.loads(body) == {"message": message}
    assert app.seen == [(None, 400)]


async def test_handler_failure_is_503_without_details(
    served: tuple[App, HttpServer], caplog: pytest.LogCaptureFixture
) -> None:
    _, server = served
    answer = await _exchange(server.port, b"GET /boom HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    [(head, body)] = _messages(answer)
    assert head.startswith(b"HTTP/1.1 503") and b"secret detail" not in body
    assert "request handler failed" in caplog.text


async def test_head_gets_headers_only(served: tuple[App, HttpServer]) -> None:
    _, server = served
    answer = await _exchange(server.port, b"HEAD /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and rest == b""  # HEAD is not a route method here


async def test_slow_sender_and_idle_connection_are_closed(served: tuple[App, HttpServer]) -> None:
    _, server = served
    # A request head that never completes: cut off after request_timeout (checked once a second).
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    started = time.monotonic()
    writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n")
    assert await asyncio.wait_for(reader.read(), 6) == b""
    assert 1.4 < time.monotonic() - started < 4.5
    writer.close()
    # An idle kept-alive connection: closed after keepalive_timeout.
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    await _read_response(reader)
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(), 6) == b""
    assert 1.4 < time.monotonic() - started < 4.5
    writer.close()


async def test_a_slow_request_does_not_block_other_connections(served: tuple[App, HttpServer]) -> None:
    app, server = served
    slow_reader, slow_writer = await asyncio.open_connection("127.0.0.1", server.port)
    slow_writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = await _exchange(server.port, b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200")
    app.release.set()
    assert (await _read_response(slow_reader))[1] == b'{"slow":true}'
    slow_writer.close()


async def test_a_client_that_does_not_read_is_not_read_either(served: tuple[App, HttpServer]) -> None:
    _, server = served
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    request = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"z" * 1000
    sent = 0
    # Pipeline requests without reading answers; the server stops reading once its buffers fill, so the
    # client's writes stall instead of the server queueing answers without bound.
    with pytest.raises(TimeoutError):
        for _ in range(20000):
            writer.write(request)
            sent += 1
            await asyncio.wait_for(writer.drain(), 2)
    assert sent < 20000
    conn = next(iter(server.connections))
    assert len(conn._pending) <= LIMITS.max_pipelined + 1
    writer.transport.abort()
    del reader


async def test_shutdown_lets_a_request_in_progress_answer(served: tuple[App, HttpServer]) -> None:
    app, server = served
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.sleep(0.1)
    closing = asyncio.create_task(server.close(3.0))
    await asyncio.sleep(0.2)
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", server.port)
    app.release.set()
    head, body = await _read_response(reader)
    assert head.startswith(b"HTTP/1.1 200") and b"Connection: close" in head and body == b'{"slow":true}'
    await asyncio.wait_for(closing, 5)
    assert not server.connections
    writer.close()


async def test_shutdown_bounds_a_request_that_never_ends(served: tuple[App, HttpServer]) -> None:
    _, server = served
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.sleep(0.1)
    started = time.monotonic()
    await server.close(0.5)
    assert time.monotonic() - started < 3
    answer = await asyncio.wait_for(reader.read(), 5)
    assert answer.startswith(b"HTTP/1.1 503")
    writer.close()


async def test_over_tls_with_a_client_certificate(tmp_path: Path) -> None:
    zone = build_testbed_pki(tmp_path / "pki", [ZoneSpec(1, {1001: 0x1001})]).zones[1]
    sae = zone.saes[1001]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(zone.kme_server.cert, zone.kme_server.key)
    ctx.load_verify_locations(cafile=str(zone.ca))
    ctx.verify_mode = ssl.CERT_REQUIRED

    async def whoami(request: Request) -> Response:
        der = request.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return Response(200, json.dumps({"cert_bytes": len(der)}).encode())

    router = Router()
    router.add("GET", "/whoami", whoami)
    server = HttpServer(router, error_response=_error)
    await server.start("127.0.0.1", 0, ssl_context=ctx, handshake_timeout=2.0)
    try:
        client = ssl.create_default_context(cafile=str(zone.ca))
        client.load_cert_chain(sae.cert, sae.key)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port, ssl=client)
        writer.write(b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")
        head, body = await _read_response(reader)
        assert head.startswith(b"HTTP/1.1 200") and json.loads(body)["cert_bytes"] > 100
        writer.close()
        # A TCP client that never starts the handshake is dropped after the handshake timeout.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 6) == b""
        assert time.monotonic() - started < 5
        writer.close()
    finally:
        await server.close(1.0)


async def test_header_fields_by_lower_case_name_repeats_joined(served: tuple[App, HttpServer]) -> None:
    _, server = served
    answer = await _exchange(
        server.port,
        b"GET /headers HTTP/1.1\r\nHost: x\r\nX-Thing: a\r\nx-thing: b\r\nAccept: */*\r\n"
        b"Connection: close\r\n\r\n",
    )
    [(_, body)] = _messages(answer)
    assert json.loads(body) == {"host": "x", "x-thing": "a, b", "accept": "*/*", "connection": "close"}
