"""A full-duplex call between two sites, as in the paper: each site runs a receiver (TLS server) and a
sender (TLS client to the other site), so every direction is its own TLS-QKD connection keyed by its own
QKD key, with the sending SAE as master.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qkdtls.apps.https import LOOPBACK, TLSStream, connection_status, tls_accept, tls_connect
from qkdtls.apps.video.receiver import MediaReceiver
from qkdtls.apps.video.sender import MediaSender
from qkdtls.apps.video.sources import (
    MediaUnavailable,
    WindowDisplay,
    open_audio_sink,
    open_audio_source,
    open_video_source,
)

if TYPE_CHECKING:
    from qkdtls.net.context import QKDContext

log = logging.getLogger(__name__)

ACCEPT_TIMEOUT = 15.0


class CallError(RuntimeError):
    """A direction of the call could not be set up (no connection, failed handshake)."""


@dataclass
class CallSite:
    """One participant: its SAE ID, a server context (receiving) and a client context (sending)."""

    name: str
    sae_id: int | None
    server_context: ssl.SSLContext | QKDContext
    client_context: ssl.SSLContext | QKDContext
    server_hostname: str = "localhost"


@dataclass
class CallSettings:
    duration: float = 5.0
    fps: float = 30.0
    quality: int = 70
    width: int = 1280
    height: int = 720
    video: str = "pattern"  # pattern | camera | auto
    audio: str = "tone"  # tone | mic | auto | none
    speaker: str = "count"  # count | speaker | auto
    display: str = "none"  # window | auto (a window when there is a display) | none


@dataclass
class Direction:
    """One way of the call: sender at ``source`` site, receiver at ``destination``."""

    source: str
    destination: str
    sender: MediaSender
    receiver: MediaReceiver
    sender_connection: dict[str, Any]
    receiver_connection: dict[str, Any]
    handshake_ms: float
    streams: list[TLSStream] = field(default_factory=list, repr=False)
    window: WindowDisplay | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return f"{self.source}-to-{self.destination}"

    def to_json(self) -> dict[str, Any]:
        return {
            "direction": self.name,
            "connection": self.sender_connection,
            "handshake_ms": round(self.handshake_ms, 2),
            "sender": self.sender.stats.to_json(),
            "receiver": self.receiver.stats.to_json(),
        }


class _Acceptor:
    """Accepts the one connection of a call direction in a thread (bounded by a timeout)."""

    def __init__(self, context: ssl.SSLContext | QKDContext) -> None:
        self.context = context
        self.listener = socket.create_server((LOOPBACK, 0))
        self.listener.settimeout(ACCEPT_TIMEOUT)
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self.stream: TLSStream | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._accept, name="video-accept", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        try:
            raw, _ = self.listener.accept()
            try:
                self.stream = tls_accept(self.context, raw, timeout=ACCEPT_TIMEOUT)
            except BaseException:
                raw.close()
                raise
        except BaseException as exc:  # handed to result(): the caller decides
            self.error = exc
        finally:
            self.listener.close()

    def result(self) -> TLSStream:
        self._thread.join(ACCEPT_TIMEOUT + 1)
        if self.stream is None:
            raise CallError(f"the receiving side did not get a connection: {self.error}")
        return self.stream


def open_direction(
    source: CallSite, destination: CallSite, settings: CallSettings, name_prefix: str = ""
) -> Direction:
    """Connects ``source``'s sender to a fresh receiver at ``destination`` and starts both."""
    acceptor = _Acceptor(destination.server_context)
    start = time.perf_counter()
    try:
        out = tls_connect(
            source.client_context, acceptor.address, server_hostname=destination.server_hostname,
            target_sae_id=destination.sae_id, timeout=ACCEPT_TIMEOUT,
        )
    except OSError as exc:
        with contextlib.suppress(OSError):
            acceptor.listener.close()
        raise CallError(f"{source.name} could not call {destination.name}: {exc}") from exc
    handshake_ms = (time.perf_counter() - start) * 1000
    incoming = acceptor.result()
    name = f"{name_prefix}{source.name}-to-{destination.name}"
    window = _window(settings.display, name)
    receiver = MediaReceiver(incoming, sink=open_audio_sink(settings.speaker), name=name,
                             on_picture=window.show if window is not None else None)
    sender = MediaSender(
        out,
        open_video_source(settings.video, settings.width, settings.height, int(settings.fps)),
        open_audio_source(settings.audio) if settings.audio != "none" else None,
        fps=settings.fps,
        quality=settings.quality,
    )
    direction = Direction(
        source=source.name, destination=destination.name, sender=sender, receiver=receiver,
        sender_connection=connection_status(out), receiver_connection=connection_status(incoming),
        handshake_ms=handshake_ms, streams=[out, incoming], window=window,
    )
    receiver.start()
    sender.start()
    return direction


def _window(display: str, title: str) -> WindowDisplay | None:
    if display == "none":
        return None
    try:
        return WindowDisplay(title)
    except MediaUnavailable:
        if display == "window":
            raise
        return None


def close_direction(direction: Direction, timeout: float = 5.0) -> None:
    """Ends the sender with BYE, lets the receiver drain, then closes both connections."""
    direction.sender.stop(timeout)
    if not direction.receiver.wait(timeout):
        direction.receiver.stop(timeout)
    for stream in direction.streams:
        with contextlib.suppress(OSError, ValueError):
            stream.close()
    direction.sender.video.close()
    if direction.sender.audio is not None:
        direction.sender.audio.close()
    direction.receiver.sink.close()
    if direction.window is not None:
        direction.window.close()


def run_call(
    a: CallSite,
    b: CallSite,
    settings: CallSettings,
    *,
    receivers: MutableMapping[str, MediaReceiver] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[Direction]:
    """Runs a call A <-> B for ``settings.duration`` seconds; returns both directions with their stats.

    ``receivers`` (e.g. the mapping a :class:`VideoWebServer` shows) gets each receiver as it starts.
    """
    directions: list[Direction] = []
    try:
        for source, destination in ((a, b), (b, a)):
            direction = open_direction(source, destination, settings)
            directions.append(direction)
            if receivers is not None:
                receivers[direction.receiver.name] = direction.receiver
            if progress:
                c = direction.sender_connection
                progress(
                    f"{direction.name}: connected in {direction.handshake_ms:.1f} ms "
                    f"(mode {c['mode']}, profile {c.get('profile')}, key {c.get('key_ID')})"
                )
        deadline = time.monotonic() + settings.duration
        next_report = time.monotonic() + 1.0
        while (now := time.monotonic()) < deadline:
            if any(d.sender.failed for d in directions):
                break
            time.sleep(min(0.1, deadline - now))
            if progress and time.monotonic() >= next_report:
                next_report += 1.0
                progress("  ".join(
                    f"{d.name}: {d.receiver.live()['live_fps']} fps, "
                    f"{d.receiver.stats.latency_ms(50) or 0:.0f} ms" for d in directions
                ))
    finally:
        for direction in directions:
            close_direction(direction)
    return directions


# --- one side of a call between two machines ----------------------------------------------------------------


class CallServer:
    """The receiving side on its own: accepts calls (one at a time per connection thread) on ``port``.

    Every accepted call becomes a :class:`MediaReceiver` in ``receivers`` (for the web view) and is
    reported to ``on_end`` when it ends.
    """

    def __init__(
        self,
        context: ssl.SSLContext | QKDContext,
        receivers: MutableMapping[str, MediaReceiver],
        settings: CallSettings,
        *,
        host: str = LOOPBACK,
        port: int = 0,
        on_end: Callable[[MediaReceiver, dict[str, Any]], None] | None = None,
        max_calls: int = 8,
    ) -> None:
        self.context = context
        self.receivers = receivers
        self.settings = settings
        self.on_end = on_end
        self.listener = socket.create_server((host, port))
        self.listener.settimeout(0.2)  # accept() wakes up to notice close()
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self._slots = threading.BoundedSemaphore(max_calls)
        self._stop = threading.Event()
        self._count = 0
        self._threads: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._accept_loop, name="video-server", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                raw.close()
                continue
            self._count += 1
            thread = threading.Thread(target=self._call, args=(raw, self._count), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _call(self, raw: socket.socket, number: int) -> None:
        stream: TLSStream | None = None
        try:
            stream = tls_accept(self.context, raw, timeout=ACCEPT_TIMEOUT)
            status = connection_status(stream)
            peer = status.get("peer_SAE_ID")
            name = f"call{number}" + (f"-from-SAE-{peer}" if peer is not None else "")
            window = _window(self.settings.display, name)
            receiver = MediaReceiver(stream, sink=open_audio_sink(self.settings.speaker), name=name,
                                     on_picture=window.show if window is not None else None)
            self.receivers[name] = receiver
            receiver.start()
            while not receiver.wait(0.5) and not self._stop.is_set():
                pass
            receiver.stop()
            receiver.sink.close()
            if window is not None:
                window.close()
            if self.on_end is not None:
                self.on_end(receiver, status)
        except (OSError, ValueError, MediaUnavailable) as exc:
            log.warning("incoming call failed", extra={"event": "video.call_failed", "error": str(exc)})
        finally:
            if stream is not None:
                with contextlib.suppress(OSError, ValueError):
                    stream.close()
            raw.close()
            self._slots.release()

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        self.listener.close()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def send_call(
    context: ssl.SSLContext | QKDContext,
    address: tuple[str, int],
    settings: CallSettings,
    *,
    target_sae_id: int | None = None,
    server_hostname: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[MediaSender, dict[str, Any]]:
    """The sending side on its own: streams to a :class:`CallServer` for ``settings.duration`` seconds."""
    stream = tls_connect(context, address, server_hostname=server_hostname or address[0],
                         target_sae_id=target_sae_id, timeout=ACCEPT_TIMEOUT)
    status = connection_status(stream)
    if progress:
        progress(f"connected to {address[0]}:{address[1]}: mode {status['mode']}, "
                 f"profile {status['profile']}, key {status['key_ID']}")
    sender = MediaSender(
        stream,
        open_video_source(settings.video, settings.width, settings.height, int(settings.fps)),
        open_audio_source(settings.audio) if settings.audio != "none" else None,
        fps=settings.fps, quality=settings.quality,
    ).start()
    try:
        deadline = time.monotonic() + settings.duration
        while time.monotonic() < deadline and not sender.failed:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
    finally:
        sender.stop()
        with contextlib.suppress(OSError, ValueError):
            stream.close()
        sender.video.close()
        if sender.audio is not None:
            sender.audio.close()
    return sender, status
