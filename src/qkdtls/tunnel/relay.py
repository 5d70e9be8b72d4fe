"""One tunnelled connection: two transports (plaintext TCP and TLS-QKD) joined byte for byte.

The relay is a pair of asyncio protocols, no streams and no task per direction: bytes read on one side are
written to the other at once. What a trustworthy relay needs besides copying:

- **back-pressure**: when a side's transport holds more than its high-water mark (the peer reads slowly),
  the other side stops being read until it drains; the tunnel then holds at most the two transports' buffers
  plus one read per direction, however slow the reader (``WRITE_HIGH``);
- **half-close**: an end of stream on one side becomes an end of stream on the other (TCP FIN, or TLS
  close_notify followed by FIN), and the other direction keeps flowing until it ends too;
- **timeouts**: an idle connection (no byte either way for ``idle_timeout``) is closed;
- **accounting**: bytes each way, duration, the TLS side's facts and why it ended, for the one log line and
  the metrics written when both transports are gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any, cast

from qkdtls.tls.events import ConnectionInfo

# Per transport: the tunnel stops reading the other side when this much is waiting to be written.
WRITE_HIGH = 256 * 1024
WRITE_LOW = 64 * 1024


class Side(asyncio.Protocol):
    """One transport of a relay: ``index`` 0 is the accepted connection, 1 the one the tunnel opened."""

    __slots__ = ("_blocked", "_pending", "_pending_eof", "index", "relay", "transport")

    def __init__(self, relay: Relay, index: int) -> None:
        self.relay = relay
        self.index = index
        self.transport: asyncio.Transport | None = None
        self._blocked: set[str] = (
            set()
        )  # why this side is not read: "peer" (not ready), "full" (peer's buffer)
        self._pending: list[bytes] = []  # written to this side before its transport existed
        self._pending_eof = False

    # -- asyncio.Protocol ------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports do not derive from asyncio.Transport.
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)
        self.relay.side_ready(self)
        # uvloop starts reading after connection_made returns, whatever was paused in it: apply the state
        # again on the next turn (until then at most one read arrives, which is held in ``_pending``).
        asyncio.get_running_loop().call_soon(self._sync_reading)

    def data_received(self, data: bytes) -> None:
        self.relay.forward(self, data)

    def eof_received(self) -> bool:
        self.relay.end_of_stream(self)
        return True  # keep the transport: the other direction may still be flowing

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.side_lost(self, exc)

    def pause_writing(self) -> None:
        self.relay.other(self).block("full")

    def resume_writing(self) -> None:
        self.relay.other(self).unblock("full")

    # -- used by the relay -----------------------------------------------------------------------------------

    def block(self, why: str) -> None:
        if why not in self._blocked:
            self._blocked.add(why)
            if len(self._blocked) == 1:
                self._sync_reading()

    def unblock(self, why: str) -> None:
        if why in self._blocked:
            self._blocked.discard(why)
            if not self._blocked:
                self._sync_reading()

    def _sync_reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        with contextlib.suppress(RuntimeError, AttributeError):
            if self._blocked:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None:
            self._pending.append(data)
        elif not transport.is_closing():
            transport.write(data)

    def write_eof(self) -> None:
        transport = self.transport
        if transport is None:
            self._pending_eof = True
        elif not transport.is_closing():
            try:
                transport.write_eof()
            except (OSError, RuntimeError):
                transport.close()

    def flush_pending(self) -> None:
        pending, self._pending = self._pending, []
        for data in pending:
            self.write(data)
        if self._pending_eof:
            self._pending_eof = False
            self.write_eof()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class Relay:
    """Both sides of one tunnelled connection and what is known about it."""

    def __init__(
        self,
        *,
        service: str,
        peer: str,
        target: str,
        tls_index: int,
        idle_timeout: float,
        on_done: Callable[[Relay], None],
    ) -> None:
        self.service = service
        self.peer = peer  # address of the accepted connection's peer
        self.target = target  # where the tunnel connects
        self.tls_index = tls_index  # which side is TLS-QKD (0: the accepted one, server mode)
        self.sides = (Side(self, 0), Side(self, 1))
        self.sides[1].block("peer")  # nothing is read from the opened side before the accepted one is read
        self.bytes = [0, 0]  # [0]: accepted side → opened side ("upstream"), [1]: the other way
        self.eof = [False, False]
        self.lost = [False, False]
        self.started = time.monotonic()
        self.info: ConnectionInfo | None = None
        self.handshake_seconds: float | None = None
        self.tls: Any = None  # the TLSProtocol once its handshake completed (rekeys are read from it)
        self.reason: str | None = None  # why it ended: see ``finish``; None while running
        self.error: str | None = None
        self.established = False  # both sides are up and bytes flow
        self._loop = asyncio.get_running_loop()
        self._idle = idle_timeout
        self._last = self._loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._on_done = on_done
        self._done = False

    def __repr__(self) -> str:
        return f"Relay({self.service}, {self.peer} -> {self.target}, reason={self.reason})"

    def other(self, side: Side) -> Side:
        return self.sides[1 - side.index]

    # -- life cycle ------------------------------------------------------------------------------------------

    def side_ready(self, side: Side) -> None:
        """A transport exists: the accepted one waits until the other side is up."""
        if side.index == 0 and self.peer == "?":
            peer = side.transport.get_extra_info("peername") if side.transport is not None else None
            self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        side.flush_pending()
        other = self.other(side)
        if other.transport is None:
            side.block("peer")
            return
        side.unblock("peer")
        other.unblock("peer")
        if not self.established:
            self.established = True
            self._last = self._loop.time()
            self._timer = self._loop.call_later(self._idle, self._check_idle)

    def forward(self, side: Side, data: bytes) -> None:
        self.bytes[side.index] += len(data)
        self._last = self._loop.time()
        self.other(side).write(data)

    def end_of_stream(self, side: Side) -> None:
        self.eof[side.index] = True
        self.other(side).write_eof()
        if all(self.eof):
            self.finish("closed")

    def side_lost(self, side: Side, exc: Exception | None) -> None:
        self.lost[side.index] = True
        if self.reason is None:
            if exc is not None:
                which = "tls" if side.index == self.tls_index else "plain"
                self.finish("tls_error" if which == "tls" else "reset", f"{exc}")
            elif not self.eof[side.index] or not self.eof[1 - side.index]:
                # Gone without (or after only one) end of stream: nothing more can be relayed either way.
                self.finish("closed")
        other = self.other(side)
        if other.transport is None:
            self.lost[other.index] = True  # never connected
        if all(self.lost):
            self._complete()

    def fail(self, reason: str, error: str | None = None) -> None:
        """Setting up failed (handshake, KME, connect): close what exists."""
        self.finish(reason, error)

    def finish(self, reason: str, error: str | None = None) -> None:
        """Close both sides (once); the record is written when both transports are gone."""
        if self.reason is None:
            self.reason, self.error = reason, error
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for side in self.sides:
            if side.transport is None:
                self.lost[side.index] = True
            else:
                side.close()  # TLS: close_notify and a bounded linger
        if all(self.lost):
            self._complete()

    def _complete(self) -> None:
        if self._done:
            return
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
        self._on_done(self)

    def _check_idle(self) -> None:
        self._timer = None
        if self.reason is not None:
            return
        quiet = self._loop.time() - self._last
        if quiet >= self._idle:
            self.finish("idle_timeout", f"no data for {self._idle:g} s")
        else:
            self._timer = self._loop.call_later(self._idle - quiet, self._check_idle)

    # -- the record ------------------------------------------------------------------------------------------

    @property
    def peer_sae_id(self) -> int | None:
        """The SAE at the other end of a QKD connection: from the key (server), or the target (client)."""
        info = self.info
        if info is None or info.mode != "qkd":
            return None
        if info.peer_sae_id is not None:
            return info.peer_sae_id
        return getattr(self.tls, "target_sae_id", None)

    @property
    def duration(self) -> float:
        return time.monotonic() - self.started

    def record(self) -> dict[str, Any]:
        info = self.info
        return {
            "event": "tunnel.connection",
            "service": self.service,
            "peer": self.peer,
            "target": self.target,
            "mode": info.mode if info is not None else None,
            "profile": info.profile if info is not None else None,
            "key_ID": info.key_id if info is not None else None,
            "peer_SAE_ID": self.peer_sae_id,
            "cipher": info.cipher if info is not None else None,
            "alpn": info.alpn if info is not None else None,
            "server_name": info.server_name if info is not None else None,
            "rekeys": len(self.tls.rekeyed_key_ids) if self.tls is not None else 0,
            "bytes_up": self.bytes[0],
            "bytes_down": self.bytes[1],
            "duration": round(self.duration, 3),
            "handshake_ms": round(self.handshake_seconds * 1000, 2) if self.handshake_seconds else None,
            "reason": self.reason,
            "error": self.error,
        }
