"""The delay relay adds the configured latency, keeps order, counts traffic and shuts down cleanly."""

from __future__ import annotations

import asyncio
import socket
import statistics
import threading
import time
from collections.abc import Iterator

import pytest

from qkdtls.apps.relay import DelayRelay, RelayError, RelayProcess, measure_rtt


class EchoServer:
    """A threaded TCP echo service on loopback."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.address = self.sock.getsockname()[:2]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(10)
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.mark.parametrize("delay_ms", [0.5, 5.0])
def test_added_rtt_matches_configuration(echo: EchoServer, delay_ms: float) -> None:
    base = statistics.median(measure_rtt(echo.address, count=10))
    with RelayProcess({"link": echo.address}, delay_ms=delay_ms) as relay:
        rtts = measure_rtt(relay.addresses["link"], count=30)
        counters = relay.counters()["link"]
    added = statistics.median(rtts) - base
    # The relay's own forwarding costs some tens of microseconds per hop on top of the delay.
    assert 2 * delay_ms / 1000 <= added + 50e-6
    assert added <= 2 * delay_ms / 1000 + 0.8e-3
    assert counters.connections == 1
    assert counters.up_chunks == counters.down_chunks == 30
    assert counters.up_bytes == counters.down_bytes == 30
    assert counters.flights == 60


def test_delays_overlap_and_order_is_kept(echo: EchoServer) -> None:
    delay = 0.05
    with (
        RelayProcess({"link": echo.address}, delay_ms=delay * 1000) as relay,
        socket.create_connection(relay.addresses["link"], timeout=5) as sock,
    ):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start = time.perf_counter()
        for i in range(20):
            sock.sendall(b"%03d;" % i)
            time.sleep(0.002)
        received = b""
        while len(received) < 80:
            received += sock.recv(1024)
        elapsed = time.perf_counter() - start
    assert received == b"".join(b"%03d;" % i for i in range(20))
    # Serialised delays would take 20 x 2 x 50 ms; overlapping ones take one RTT after the last chunk.
    assert 2 * delay <= elapsed < 2 * delay + 20 * 0.002 + 0.1


def test_bulk_transfer_is_bounded_and_complete(echo: EchoServer) -> None:
    payload = bytes(range(256)) * 8192  # 2 MiB, more than the relay queues in one direction

    async def run() -> tuple[bytes, int]:
        async with DelayRelay({"link": echo.address}, delay=0.001) as relay:
            reader, writer = await asyncio.open_connection(*relay.addresses["link"])

            async def send() -> None:
                writer.write(payload)
                await writer.drain()
                writer.write_eof()

            sender = asyncio.create_task(send())
            data = await asyncio.wait_for(reader.read(-1), 20)
            await sender
            writer.close()
            return data, relay.counters()["link"].down_bytes

    data, down = asyncio.run(run())
    assert data == payload
    assert down == len(payload)


def test_unreachable_target_is_refused_and_counted() -> None:
    spare = socket.create_server(("127.0.0.1", 0))
    closed_port = spare.getsockname()[1]
    spare.close()

    async def run() -> tuple[bytes, int]:
        async with DelayRelay({"a": ("127.0.0.1", closed_port), "b": None}, delay=0) as relay:
            for name in ("a", "b"):
                reader, writer = await asyncio.open_connection(*relay.addresses[name])
                assert await asyncio.wait_for(reader.read(), 5) == b""
                writer.close()
            counters = relay.counters()
            return b"", counters["a"].refused + counters["b"].refused

    _, refused = asyncio.run(run())
    assert refused == 2


def test_target_can_be_set_after_start(echo: EchoServer) -> None:
    with RelayProcess({"late": None}, delay_ms=0) as relay:
        relay.set_target("late", echo.address)
        assert len(measure_rtt(relay.addresses["late"], count=2)) == 2
        with pytest.raises(RelayError, match="no route"):
            relay.set_target("missing", echo.address)


def test_close_with_open_connections_is_prompt(echo: EchoServer) -> None:
    relay = RelayProcess({"link": echo.address}, delay_ms=1)
    relay.start()
    sock = socket.create_connection(relay.addresses["link"], timeout=5)
    start = time.perf_counter()
    relay.close()
    assert time.perf_counter() - start < 3
    sock.settimeout(5)
    assert sock.recv(10) == b""
    sock.close()


def test_delay_can_change_and_connections_can_be_dropped(echo: EchoServer) -> None:
    with RelayProcess({"link": echo.address}, delay_ms=0) as relay:
        fast = statistics.median(measure_rtt(relay.addresses["link"], count=5))
        relay.set_delay(10)
        slow = statistics.median(measure_rtt(relay.addresses["link"], count=5))
        assert fast < 0.005 and 0.020 <= slow < 0.025
        with pytest.raises(RelayError, match="bad delay"):
            relay.set_delay(float("nan"))
        sock = socket.create_connection(relay.addresses["link"], timeout=5)
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"
        assert relay.drop("link") == 1
        assert sock.recv(1) == b""
        sock.close()
        assert relay.counters()["link"].connections == 3


def test_emulated_tcp_handshake_holds_the_first_bytes_one_more_round_trip(echo: EchoServer) -> None:
    delay = 0.02
    with RelayProcess({"link": echo.address}, delay_ms=delay * 1000, emulate_tcp_handshake=True) as relay:
        with socket.create_connection(relay.addresses["link"], timeout=5) as sock:
            start = time.perf_counter()
            sock.sendall(b"x")
            assert sock.recv(1) == b"x"
            first = time.perf_counter() - start
        later = statistics.median(measure_rtt(relay.addresses["link"], count=5)[1:])
    # SYN/SYN-ACK, then the data's own round trip; afterwards only the data's. The relay counts from its
    # accept(), which may come a little before this process took its start time.
    assert 4 * delay - 0.002 <= first < 6 * delay
    assert 2 * delay <= later < 3 * delay
