"""Delaying TCP relay: emulates the latency of the link between two sites.

This kernel has no netem qdisc, so the delay is added in user space: every chunk read from one side is held
until its due time (time read + one-way delay) and then written to the other side. Chunks keep their order,
and the delays of consecutive chunks overlap as they would on a real link (a chunk does not wait for the one
before it to have waited). The event loop runs on ``select()``, whose timeout has microsecond resolution;
epoll's is one millisecond, which would add up to a millisecond per hop to a 0.5 ms delay.

One relay serves several named routes (e.g. the SAE link and the inter-KME link of one site pair), each with
its own listening port and counters. :class:`RelayProcess` runs a relay in a child process, so that the
Python code being measured cannot delay it by holding the GIL; it is controlled by lines on stdin/stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import select
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import IO, Any

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
READ_SIZE = 16 * 1024
# At most this many chunks wait in one direction of one connection (READ_SIZE each), so a slow receiver
# stops the relay reading from the sender instead of growing a buffer without bound.
QUEUE_CHUNKS = 256
# Waking from a sleep takes 0.1-0.2 ms on a virtual machine; the last SPIN seconds are busy-waited instead.
SPIN = 0.0003
UP, DOWN = "up", "down"
MAX_DELAY = 10.0  # seconds, one way  # up: from the connecting side to the target


@dataclass
class RouteCounters:
    """What crossed one route since the last reset. A chunk is what one ``recv()`` returned."""

    connections: int = 0
    refused: int = 0
    up_chunks: int = 0
    up_bytes: int = 0
    down_chunks: int = 0
    down_bytes: int = 0
    flights: int = 0  # runs of chunks in one direction: a request/answer exchange is two flights
    _last: str = field(default="", repr=False)

    def count(self, direction: str, size: int) -> None:
        if direction == UP:
            self.up_chunks += 1
            self.up_bytes += size
        else:
            self.down_chunks += 1
            self.down_bytes += size
        if direction != self._last:
            self.flights += 1
            self._last = direction

    def __add__(self, other: RouteCounters) -> RouteCounters:
        """Both routes' traffic together (flights add up: the routes are separate connections)."""
        fields = [k for k in self.__dataclass_fields__ if k != "_last"]
        return RouteCounters(**{k: getattr(self, k) + getattr(other, k) for k in fields})

    @property
    def chunks(self) -> int:
        return self.up_chunks + self.down_chunks

    @property
    def round_trips(self) -> float:
        return self.flights / 2

    def to_json(self) -> dict[str, int]:
        doc = asdict(self)
        doc.pop("_last")
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> RouteCounters:
        return cls(**{k: int(doc[k]) for k in cls.__dataclass_fields__ if k != "_last"})


@dataclass
class _Route:
    name: str
    target: tuple[str, int] | None
    counters: RouteCounters = field(default_factory=RouteCounters)
    server: asyncio.Server | None = None
    address: tuple[str, int] | None = None
    writers: set[asyncio.StreamWriter] = field(default_factory=set)


def _check_delay(delay: float) -> float:
    if not 0 <= delay <= MAX_DELAY:  # also refuses NaN
        raise ValueError(f"delay must be between 0 and {MAX_DELAY} s")
    return delay


def _nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class DelayRelay:
    """Relays TCP connections on each route to its target, holding every chunk for ``delay`` seconds.

    ``delay`` is one-way: the round-trip time grows by twice that. Targets may be given later with
    :meth:`set_target` (a route without a target refuses connections), which lets a relay start before the
    server behind it. With ``emulate_tcp_handshake`` the client's first bytes are held for one more round
    trip, which the TCP handshake would have cost on a real link (here the kernel completes it locally).
    """

    def __init__(
        self,
        routes: Mapping[str, tuple[str, int] | None],
        delay: float,
        *,
        host: str = LOOPBACK,
        connect_timeout: float = 5.0,
        emulate_tcp_handshake: bool = False,
    ) -> None:
        self.delay = _check_delay(delay)
        self.emulate_tcp_handshake = emulate_tcp_handshake
        self.host = host
        self.connect_timeout = connect_timeout
        self._routes = {name: _Route(name, target) for name, target in routes.items()}
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> dict[str, tuple[str, int]]:
        for route in self._routes.values():
            route.server = await asyncio.start_server(
                lambda r, w, route=route: self._accept(route, r, w), self.host, 0
            )
            host, port = route.server.sockets[0].getsockname()[:2]
            route.address = (host, port)
        return self.addresses

    @property
    def addresses(self) -> dict[str, tuple[str, int]]:
        return {name: r.address for name, r in self._routes.items() if r.address is not None}

    def set_target(self, name: str, target: tuple[str, int]) -> None:
        self._routes[name].target = target

    def set_delay(self, delay: float) -> None:
        """Changes the one-way delay for chunks read from now on."""
        self.delay = _check_delay(delay)

    def drop(self, name: str) -> int:
        """Aborts every connection of a route (as a link failure would); returns how many."""
        writers = list(self._routes[name].writers)
        for writer in writers:
            writer.transport.abort()
        return len(writers) // 2

    def counters(self) -> dict[str, RouteCounters]:
        return {name: r.counters for name, r in self._routes.items()}

    def reset(self) -> None:
        for route in self._routes.values():
            route.counters = RouteCounters()

    async def close(self) -> None:
        for route in self._routes.values():
            if route.server is not None:
                route.server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self.connect_timeout)
        for route in self._routes.values():
            if route.server is not None:
                await route.server.wait_closed()

    async def __aenter__(self) -> DelayRelay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _accept(self, route: _Route, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._connection(route, reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connection(
        self, route: _Route, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter
    ) -> None:
        accepted = asyncio.get_running_loop().time()
        self._writers.add(c_writer)
        route.writers.add(c_writer)
        t_writer: asyncio.StreamWriter | None = None
        try:
            if route.target is None:
                route.counters.refused += 1
                return
            try:
                t_reader, t_writer = await asyncio.wait_for(
                    asyncio.open_connection(*route.target), self.connect_timeout
                )
            except (OSError, TimeoutError) as exc:
                route.counters.refused += 1
                log.warning(
                    "relay target unreachable",
                    extra={"event": "relay.refused", "route": route.name, "error": str(exc)},
                )
                return
            self._writers.add(t_writer)
            route.writers.add(t_writer)
            _nodelay(c_writer)
            _nodelay(t_writer)
            route.counters.connections += 1
            # The kernel completed the client's TCP handshake locally; a link would have delayed the
            # client's first bytes by the SYN/SYN-ACK round trip as well.
            not_before = accepted + 2 * self.delay if self.emulate_tcp_handshake else 0.0
            await asyncio.gather(
                self._direction(route, UP, c_reader, t_writer, c_writer, not_before),
                self._direction(route, DOWN, t_reader, c_writer, t_writer),
            )
        finally:
            for w in (c_writer, t_writer):
                if w is not None:
                    self._writers.discard(w)
                    route.writers.discard(w)
                    w.close()

    async def _direction(
        self,
        route: _Route,
        direction: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        source: asyncio.StreamWriter,
        not_before: float = 0.0,
    ) -> None:
        """Copies one direction; the reader stamps due times and a second task writes at those times.

        No chunk leaves before ``not_before`` + delay (the emulated TCP handshake).
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE_CHUNKS)

        async def read() -> None:
            try:
                while chunk := await reader.read(READ_SIZE):
                    await queue.put((max(loop.time(), not_before) + self.delay, chunk))
            except OSError:
                pass
            await queue.put((max(loop.time(), not_before) + self.delay, b""))

        async def write() -> None:
            while True:
                due, chunk = await queue.get()
                wait = due - loop.time()
                if wait > SPIN:
                    await asyncio.sleep(wait - SPIN)
                while loop.time() < due:  # bounded by SPIN: the wake-up latency the sleep would add
                    pass
                try:
                    if not chunk:  # EOF travels with the same delay, as a FIN would
                        if writer.can_write_eof():
                            writer.write_eof()
                        return
                    route.counters.count(direction, len(chunk))
                    writer.write(chunk)
                    await writer.drain()
                except (OSError, RuntimeError):  # reset, or shut down under us by drop()/close()
                    source.transport.abort()  # the far side is gone: stop the near side as well
                    return

        reader_task = loop.create_task(read())
        try:
            await write()
        finally:
            reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader_task


def precise_event_loop() -> asyncio.AbstractEventLoop:
    """An event loop whose timers fire within tens of microseconds (select() instead of epoll)."""
    return asyncio.SelectorEventLoop(selectors.SelectSelector())


# --- child process -----------------------------------------------------------------------------------------


async def _serve_control(relay: DelayRelay, out: IO[str]) -> None:
    """Control protocol on stdin/stdout, one line each: ``stats``, ``reset``, ``target NAME HOST PORT``,
    ``delay MS`` (one-way), ``drop NAME`` (abort the route's connections).

    EOF on stdin shuts the relay down, so the relay never outlives its parent.
    """
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def reply(doc: dict[str, Any]) -> None:
        out.write(json.dumps(doc) + "\n")
        out.flush()

    reply({"addresses": relay.addresses})
    while line := await reader.readline():
        words = line.decode("ascii", "replace").split()
        if words == ["stats"]:
            reply({"counters": {n: c.to_json() for n, c in relay.counters().items()}})
        elif words == ["reset"]:
            relay.reset()
            reply({"ok": True})
        elif len(words) == 2 and words[0] == "delay":
            try:
                relay.set_delay(float(words[1]) / 1000)
                reply({"ok": True})
            except ValueError:
                reply({"error": f"bad delay {words[1]!r}"})
        elif len(words) == 2 and words[0] == "drop":
            if words[1] in relay.counters():
                reply({"dropped": relay.drop(words[1])})
            else:
                reply({"error": f"no route {words[1]}"})
        elif len(words) == 4 and words[0] == "target" and words[3].isdigit():
            try:
                relay.set_target(words[1], (words[2], int(words[3])))
                reply({"ok": True})
            except KeyError:
                reply({"error": f"no route {words[1]}"})
        else:
            reply({"error": "unknown command"})


def _parse_route(text: str) -> tuple[str, tuple[str, int] | None]:
    name, _, target = text.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"route {text!r}: expected NAME[=HOST:PORT]")
    if not target:
        return name, None
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"route {text!r}: expected NAME=HOST:PORT")
    return name, (host, int(port))


def child_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qkdtls.apps.relay")
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay in milliseconds")
    parser.add_argument("--route", type=_parse_route, action="append", required=True, help="NAME[=HOST:PORT]")
    parser.add_argument("--tcp-handshake", action="store_true", help="emulate the TCP handshake's round trip")
    args = parser.parse_args(argv)

    async def run() -> None:
        relay = DelayRelay(dict(args.route), args.delay_ms / 1000, emulate_tcp_handshake=args.tcp_handshake)
        await relay.start()
        try:
            await _serve_control(relay, sys.stdout)
        finally:
            await relay.close()

    loop = precise_event_loop()
    try:
        loop.run_until_complete(run())
    finally:
        loop.close()
    return 0


class RelayError(RuntimeError):
    """The relay process did not start or did not answer in time."""


class RelayProcess:
    """A :class:`DelayRelay` in a child process, driven synchronously.

    ``with RelayProcess({"sae": (host, port)}, delay_ms=0.5) as relay: relay.addresses["sae"]`` …
    """

    def __init__(
        self,
        routes: Mapping[str, tuple[str, int] | None],
        delay_ms: float,
        *,
        timeout: float = 10.0,
        emulate_tcp_handshake: bool = False,
    ) -> None:
        self.routes = dict(routes)
        self.delay_ms = delay_ms
        self.emulate_tcp_handshake = emulate_tcp_handshake
        self.timeout = timeout
        self.addresses: dict[str, tuple[str, int]] = {}
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> dict[str, tuple[str, int]]:
        cmd = [sys.executable, "-m", "qkdtls.apps.relay", "--delay-ms", str(self.delay_ms)]
        for name, target in self.routes.items():
            cmd += ["--route", name if target is None else f"{name}={target[0]}:{target[1]}"]
        if self.emulate_tcp_handshake:
            cmd.append("--tcp-handshake")
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        doc = self._read()
        self.addresses = {n: (a[0], int(a[1])) for n, a in doc["addresses"].items()}
        return self.addresses

    def _read(self) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], self.timeout)
        if not ready:
            self.close()
            raise RelayError(f"relay did not answer within {self.timeout} s")
        line = self._proc.stdout.readline()
        if not line:
            code = self._proc.wait(self.timeout)
            raise RelayError(f"relay exited with status {code}")
        doc: dict[str, Any] = json.loads(line)
        if "error" in doc:
            raise RelayError(doc["error"])
        return doc

    def _command(self, line: str) -> dict[str, Any]:
        if self._proc is None or self._proc.stdin is None:
            raise RelayError("relay not started")
        self._proc.stdin.write(line + "\n")
        self._proc.stdin.flush()
        return self._read()

    def counters(self) -> dict[str, RouteCounters]:
        doc = self._command("stats")
        return {n: RouteCounters.from_json(c) for n, c in doc["counters"].items()}

    def reset(self) -> None:
        self._command("reset")

    def set_target(self, name: str, target: tuple[str, int]) -> None:
        self._command(f"target {name} {target[0]} {target[1]}")

    def set_delay(self, delay_ms: float) -> None:
        self._command(f"delay {delay_ms!r}")
        self.delay_ms = delay_ms

    def drop(self, name: str) -> int:
        return int(self._command(f"drop {name}")["dropped"])

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            proc.wait(self.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(self.timeout)
        if proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> RelayProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def measure_rtt(address: tuple[str, int], count: int = 20, timeout: float = 5.0) -> list[float]:
    """Round-trip times (seconds) of one-byte pings to an echo service at ``address``."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rtts = []
        for _ in range(count):
            start = time.perf_counter()
            sock.sendall(b"x")
            if sock.recv(1) != b"x":
                raise ConnectionError("echo service closed the connection")
            rtts.append(time.perf_counter() - start)
        return rtts


if __name__ == "__main__":
    sys.exit(child_main())
