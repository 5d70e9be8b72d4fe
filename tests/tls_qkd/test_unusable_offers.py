"""A QKD offer the server cannot use is answered exactly as a classic ClientHello, by OpenSSL, at once.

Through the real server adapters (QKDSocket in a thread, and asyncio's ``start_server``) keyed by the real
slave KME, against ``openssl s_server`` with the same certificate:

* mutated first flights that name a ``qkd1:`` key the KME never issued (so it refuses it): the first thing
  our server sends back — a ServerHello, an alert and which one, or nothing — is what OpenSSL sends, and no
  ERROR is logged (the hand-off used to fail inside the KME step, log a traceback and close without
  flushing OpenSSL's alert);
* a first flight cut short by the client's EOF: ``decode_error`` at once, like OpenSSL (the asyncio adapter
  used to wait for its handshake deadline);
* a reference-profile client that closes before its ChallengeAck: the ServerHello, then ``decode_error``
  at once;
* a key the KME hands over that is shorter than 128 bits (our KME issues 64-bit keys on request):
  ``required`` refuses with ``insufficient_security``, ``preferred`` answers like OpenSSL (classic).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tests.peers.servers import ServerProcess, openssl_server
from tests.tls_qkd.conftest import CLIENT_SAE, HOST, SERVER_SAE, Site, server_context

from qkdtls.etsi014.client import KmeClient
from qkdtls.net import aio
from qkdtls.net.context import QKDContext
from qkdtls.tls import extensions as ext
from qkdtls.tls.client import TLSClient
from qkdtls.tls.config import ClientConfig, QkdOffer
from qkdtls.tls.messages import HRR_RANDOM, ClientHello
from qkdtls.tls.records import HANDSHAKE, PlaintextProtection

pytestmark = pytest.mark.peers

# Our servers' handshake deadline; every answer checked here must come long before it.
DEADLINE = 10.0
READ_BOUND = DEADLINE * 0.6


class ErrorLog(logging.Handler):
    """Collects ERROR records from every thread (the servers log from theirs)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def errors() -> Iterator[ErrorLog]:
    handler = ErrorLog()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


class SocketServer:
    """QKDSocket server side: each connection's handshake in its own thread, then close."""

    def __init__(self, context: QKDContext) -> None:
        self.context = context
        self.listener = socket.create_server((HOST, 0))
        self.port = self.listener.getsockname()[1]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return   # closed by stop()
            threading.Thread(target=self._handle, args=(sock,), daemon=True).start()

    def _handle(self, sock: socket.socket) -> None:
        with contextlib.suppress(OSError):   # QKDError is an OSError: failures are what is being tested
            self.context.wrap_socket(sock, server_side=True).close()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)   # wakes the accept() (close() alone does not)
        self.listener.close()
        self._thread.join(5)


class AsyncServer:
    """``aio.start_server`` on an event loop of its own thread."""

    def __init__(self, context: QKDContext) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

        async def served(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await aio.close_writer(writer)

        start = aio.start_server(served, HOST, 0, context=context)
        self.server = asyncio.run_coroutine_threadsafe(start, self.loop).result(10)
        self.port = self.server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        async def close() -> None:
            self.server.close()
            await asyncio.wait_for(self.server.wait_closed(), 5)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


KME_ASKED: list[str] = []   # key IDs our servers asked the slave KME for


def _count_kme_requests(kme: KmeClient) -> None:
    """Record every key ID the server asks its KME for (the real ``dec_keys``, counted once per call)."""
    if getattr(kme, "_requests_counted", False):
        return
    dec_keys = kme.dec_keys

    def counted(master_sae_id: Any, key_ids: Any, *args: Any, **kwargs: Any) -> Any:
        KME_ASKED.extend(key_ids)
        return dec_keys(master_sae_id, key_ids, *args, **kwargs)

    kme.dec_keys = counted  # type: ignore[method-assign]
    kme._requests_counted = True  # type: ignore[attr-defined]


def _contexts(site_b: Site, kme_b: KmeClient, **kwargs: Any) -> QKDContext:
    _count_kme_requests(kme_b)
    return server_context(site_b, kme_b, handshake_timeout=DEADLINE, **kwargs)


@contextlib.contextmanager
def _servers(make: Callable[[], QKDContext]) -> Iterator[dict[str, Any]]:
    running = {"socket": SocketServer(make()), "asyncio": AsyncServer(make())}
    try:
        yield running
    finally:
        for server in running.values():
            server.stop()


@pytest.fixture(scope="module")
def preferred_servers(site_b: Site, kme_b: KmeClient) -> Iterator[dict[str, Any]]:
    with _servers(lambda: _contexts(site_b, kme_b, qkd="preferred", profiles=("secure", "reference"))) as s:
        yield s


@pytest.fixture(scope="module")
def openssl(site_b: Site) -> Iterator[ServerProcess]:
    with openssl_server("-cert", str(site_b.app_cert), "-key", str(site_b.app_key)) as server:
        yield server


# Each exchange comes from its own loopback address: the servers' per-address failure budget
# (net/admission.py) would otherwise refuse this test's refused offers before the KME, after the first few.
_SOURCES = (f"127.0.0.{2 + n % 250}" for n in itertools.count())


def exchange(port: int, flight: bytes) -> tuple[bytes, float]:
    """Send ``flight`` and the EOF; everything the server sends until it closes, and how long it took."""
    started = time.monotonic()
    source = (next(_SOURCES), 0)
    with socket.create_connection((HOST, port), timeout=READ_BOUND, source_address=source) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if flight:
            sock.sendall(flight)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            received += b"<no answer before the bound>"
        except ConnectionResetError:
            pass   # what was received before the reset still counts
    return received, time.monotonic() - started


def first_answer(received: bytes) -> str:
    """What a peer learns first: a ServerHello (or HelloRetryRequest), which alert, or nothing."""
    if received.endswith(b"<no answer before the bound>"):
        return "timeout"
    if len(received) < 6:
        return "nothing" if not received else f"fragment {received.hex()}"
    if received[0] == 21 and len(received) >= 7:
        return f"alert {received[6]}"
    if received[0] == 22 and received[5] == 2:
        return "hello_retry_request" if received[11:43] == HRR_RANDOM else "server_hello"
    return f"record {received[0]}"


def qkd_hello(profiles: tuple[str, ...]) -> ClientHello:
    """A ClientHello naming a fresh key ID, which the slave KME never issued (so it refuses it)."""
    offer = QkdOffer(str(uuid.uuid4()), os.urandom(32), CLIENT_SAE)
    client = TLSClient(ClientConfig(verify=False, qkd="required", qkd_profiles=profiles), "localhost", offer)
    client.initiate()
    return ClientHello.decode(client.data_to_send()[9:])


def record(message: bytes) -> bytes:
    return PlaintextProtection(0x0301).seal(HANDSHAKE, message)


@st.composite
def mutated_flights(draw: st.DrawFn) -> bytes:
    """A QKD ClientHello with extensions dropped, duplicated or emptied (re-encoded, so OpenSSL gets as far
    as judging them), then a few bytes changed and the end cut (anything at all)."""
    hello = qkd_hello(draw(st.sampled_from([("secure",), ("secure", "reference"), ("reference",)])))
    extensions = list(hello.extensions)
    count = len(extensions)
    for index in sorted(draw(st.sets(st.integers(0, count - 1), max_size=3)), reverse=True):
        action = draw(st.sampled_from(["drop", "empty", "duplicate", "garble"]))
        chosen = extensions[index]
        if action == "drop":
            del extensions[index]
        elif action == "empty":
            extensions[index] = ext.Extension(chosen.type, b"")
        elif action == "duplicate":
            extensions.insert(index, chosen)
        else:
            cut = draw(st.integers(0, max(0, len(chosen.data) - 1)))
            extensions[index] = ext.Extension(chosen.type, chosen.data[:cut] + draw(st.binary(max_size=4)))
    hello.extensions = extensions
    if draw(st.booleans()):
        hello.cipher_suites = draw(st.lists(st.sampled_from([0x1301, 0x1302, 0x1303, 0x00FF, 0xC02F]),
                                            max_size=3))
    flight = bytearray(record(hello.to_bytes()))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        flight[draw(st.integers(0, len(flight) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.sampled_from([0, 0, 0, 1, 2, 40]))
    return bytes(flight[: len(flight) - cut])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flight=mutated_flights())
def test_unusable_qkd_offer_is_answered_like_openssl(
    flight: bytes, preferred_servers: dict[str, Any], openssl: ServerProcess, errors: ErrorLog
) -> None:
    expected, _ = exchange(openssl.port, flight)
    event(f"OpenSSL: {first_answer(expected)}")
    for name, server in preferred_servers.items():
        errors.records.clear()
        asked = len(KME_ASKED)
        received, _ = exchange(server.port, flight)
        event(f"{name}: the KME was asked" if len(KME_ASKED) > asked else f"{name}: handed off at once")
        assert first_answer(received) == first_answer(expected), (name, received[:16].hex(),
                                                                  expected[:16].hex())
        assert not errors.records, [r.getMessage() for r in errors.records]


@pytest.mark.parametrize(
    "missing",
    [ext.ET.signature_algorithms, ext.ET.supported_groups, ext.ET.key_share],
    ids=["signature_algorithms", "supported_groups", "key_share"],
)
def test_qkd_hello_missing_an_extension_gets_openssls_alert(
    missing: int, preferred_servers: dict[str, Any], openssl: ServerProcess, errors: ErrorLog
) -> None:
    """The reported cases: OpenSSL's missing_extension, no ERROR traceback, nothing lost."""
    hello = qkd_hello(("secure",))
    hello.extensions = [e for e in hello.extensions if e.type != missing]
    flight = record(hello.to_bytes())
    expected, _ = exchange(openssl.port, flight)
    assert first_answer(expected) == "alert 109"   # missing_extension
    errors.records.clear()
    for name, server in preferred_servers.items():
        asked = len(KME_ASKED)
        received, _ = exchange(server.port, flight)
        assert len(KME_ASKED) == asked + 1, name   # a usable-looking QKD offer: the KME refused the key
        assert first_answer(received) == "alert 109", (name, received.hex())
    assert not errors.records, [r.getMessage() for r in errors.records]


@pytest.mark.parametrize("cut", [0, 3, 5, 50, -1])
def test_truncated_first_flight_and_eof_get_decode_error_at_once(
    cut: int, site_b: Site, kme_b: KmeClient, openssl: ServerProcess, preferred_servers: dict[str, Any]
) -> None:
    flight = record(qkd_hello(("secure",)).to_bytes())[:cut]
    expected, _ = exchange(openssl.port, flight)
    assert first_answer(expected) == "alert 50"
    with _servers(lambda: _contexts(site_b, kme_b, qkd="required")) as required:
        every = [*preferred_servers.items(), *((f"required {k}", v) for k, v in required.items())]
        for name, server in every:
            received, took = exchange(server.port, flight)
            assert first_answer(received) == "alert 50", (name, received.hex())
            assert took < READ_BOUND, (name, took)


def test_reference_client_closing_before_its_challenge_ack_fails_at_once(
    site_b: Site, kme_a: KmeClient, kme_b: KmeClient
) -> None:
    with _servers(lambda: _contexts(site_b, kme_b, qkd="required", profiles=("reference",))) as servers:
        for name, server in servers.items():
            key = kme_a.get_key(SERVER_SAE)
            client = TLSClient(ClientConfig(verify=False, qkd="required", qkd_profiles=("reference",)),
                               "localhost", QkdOffer(key.key_ID, key.key, CLIENT_SAE))
            client.initiate()
            received, took = exchange(server.port, client.data_to_send())
            assert first_answer(received) == "server_hello", (name, received.hex())
            assert received.endswith(bytes.fromhex("15030300020232")), (name, received[-16:].hex())
            assert took < READ_BOUND, (name, took)


@pytest.mark.parametrize("policy", ["required", "preferred"])
def test_key_shorter_than_128_bits_from_the_kme_is_not_used(
    policy: str, site_b: Site, kme_a: KmeClient, kme_b: KmeClient, openssl: ServerProcess, errors: ErrorLog
) -> None:
    with _servers(lambda: _contexts(site_b, kme_b, qkd=policy)) as servers:
        for name, server in servers.items():
            short = kme_a.enc_keys(SERVER_SAE, number=1, size=64).keys[0]
            assert len(short.key) == 8
            # Our client would not offer it: the offer is built around a 256-bit stand-in with the real key
            # ID (the server learns the key's length only from its KME).
            client = TLSClient(ClientConfig(verify=False, qkd="required"), "localhost",
                               QkdOffer(short.key_ID, os.urandom(32), CLIENT_SAE))
            client.initiate()
            flight = client.data_to_send()
            received, took = exchange(server.port, flight)
            if policy == "required":
                assert first_answer(received) == "alert 71", (name, received.hex())   # insufficient_security
            else:
                expected, _ = exchange(openssl.port, flight)
                assert first_answer(received) == first_answer(expected) == "server_hello", name
                assert b"\xfe\xa7" not in received[:200]
            assert took < READ_BOUND
    assert not errors.records, [r.getMessage() for r in errors.records]
