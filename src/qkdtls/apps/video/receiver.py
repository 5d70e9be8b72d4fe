"""The receiving half of a call: read frames, check their order, decode, measure, show and play.

The reader thread keeps the connection drained (audio goes straight to the sink); JPEG decoding runs in a
second thread from a one-frame slot, so a slow decoder drops frames here (counted) rather than stalling the
link. Glass-to-glass latency is the time from the sender's capture timestamp to the end of decoding; both
ends read the wall clock, so across machines it is only as good as their clock synchronisation.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from qkdtls.apps.https import TLSStream
from qkdtls.apps.video.protocol import Frame, FrameDecoder, FrameType, VideoProtocolError
from qkdtls.apps.video.sources import CountingSink, decode_jpeg

log = logging.getLogger(__name__)

READ_SIZE = 256 * 1024
LIVE_WINDOW = 2.0  # seconds over which the live frame rate and bit rate are computed
MAX_LATENCY_SAMPLES = 100_000
IDLE_TIMEOUT = 10.0  # no byte for this long ends the call


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


@dataclass
class ReceiverStats:
    frames_received: int = 0
    frames_decoded: int = 0
    frames_skipped: int = 0  # replaced by a newer frame before the decoder got to them
    decode_errors: int = 0
    order_errors: int = 0  # a sequence number that was not the previous one + 1
    size_errors: int = 0  # decoded picture not of the announced size
    audio_chunks: int = 0
    audio_bytes: int = 0
    bytes_received: int = 0
    width: int | None = None
    height: int | None = None
    hello: dict[str, Any] | None = None
    bye: bool = False
    error: str | None = None
    first_decoded: float | None = None
    last_decoded: float | None = None
    latencies_ms: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=MAX_LATENCY_SAMPLES), repr=False
    )

    def fps(self) -> float:
        """Decoded frames per second over the whole call."""
        if self.first_decoded is None or self.last_decoded is None or self.frames_decoded < 2:
            return 0.0
        span = self.last_decoded - self.first_decoded
        return (self.frames_decoded - 1) / span if span > 0 else 0.0

    def latency_ms(self, p: float) -> float | None:
        return percentile(list(self.latencies_ms), p)

    def to_json(self) -> dict[str, Any]:
        def rounded(value: float | None) -> float | None:
            return None if value is None else round(value, 1)

        return {
            "frames_received": self.frames_received,
            "frames_decoded": self.frames_decoded,
            "frames_skipped": self.frames_skipped,
            "decode_errors": self.decode_errors,
            "order_errors": self.order_errors,
            "size_errors": self.size_errors,
            "audio_chunks": self.audio_chunks,
            "audio_bytes": self.audio_bytes,
            "bytes_received": self.bytes_received,
            "resolution": f"{self.width}x{self.height}" if self.width else None,
            "fps": round(self.fps(), 1),
            "latency_ms_p50": rounded(self.latency_ms(50)),
            "latency_ms_p95": rounded(self.latency_ms(95)),
            "latency_ms_max": rounded(max(self.latencies_ms, default=None) if self.latencies_ms else None),
            "bye": self.bye,
            "error": self.error,
        }


@dataclass
class MediaReceiver:
    """Reads one call direction from ``stream`` until BYE, EOF, an error or :meth:`stop`."""

    stream: TLSStream
    sink: CountingSink = field(default_factory=CountingSink)
    on_picture: Callable[[Image.Image], None] | None = None
    name: str = "call"
    stats: ReceiverStats = field(default_factory=ReceiverStats)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _cond: threading.Condition = field(default_factory=threading.Condition, repr=False)
    _slot: Frame | None = field(default=None, repr=False)
    _reading_done: bool = field(default=False, repr=False)
    _threads: list[threading.Thread] = field(default_factory=list, repr=False)
    _live: collections.deque[tuple[float, int]] = field(default_factory=collections.deque, repr=False)
    _latest: tuple[int, bytes] | None = field(default=None, repr=False)
    _next_seq: dict[FrameType, int] = field(default_factory=dict, repr=False)
    _last_decoded_seq: int = field(default=-1, repr=False)

    def start(self) -> MediaReceiver:
        self.stream.settimeout(IDLE_TIMEOUT)
        for target in (self._read_loop, self._decode_loop):
            thread = threading.Thread(target=self._guard, args=(target,), daemon=True,
                                      name=f"video-{target.__name__.strip('_')}")
            self._threads.append(thread)
            thread.start()
        return self

    def wait(self, timeout: float) -> bool:
        """Waits until the stream ended; True if it did within ``timeout``."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def stop(self, timeout: float = 5.0) -> ReceiverStats:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self.wait(timeout)
        return self.stats

    @property
    def latest_jpeg(self) -> tuple[int, bytes] | None:
        """(sequence, JPEG) of the last decoded frame, for the web view."""
        return self._latest

    def live(self) -> dict[str, Any]:
        """Frame rate and bit rate over the last seconds, with the totals."""
        now = time.monotonic()
        with self._cond:
            while self._live and self._live[0][0] < now - LIVE_WINDOW:
                self._live.popleft()
            frames = len(self._live)
            nbytes = sum(size for _, size in self._live)
        return {
            "name": self.name,
            "live_fps": round(frames / LIVE_WINDOW, 1),
            "live_mbit_s": round(nbytes * 8 / LIVE_WINDOW / 1e6, 2),
            "latency_ms_last": round(self.stats.latencies_ms[-1], 1) if self.stats.latencies_ms else None,
            **self.stats.to_json(),
        }

    def _guard(self, target: Any) -> None:
        try:
            target()
        except Exception as exc:  # ends this direction; reported in the stats
            if self.stats.error is None:
                self.stats.error = f"{type(exc).__name__}: {exc}"
            log.warning("video receiver stopped", extra={"event": "video.receiver_error", "error": str(exc)})
        finally:
            if target == self._read_loop:
                with self._cond:
                    self._reading_done = True
                    self._cond.notify_all()

    def _read_loop(self) -> None:
        decoder = FrameDecoder()
        while not self._stop.is_set() and not self.stats.bye:
            data = self.stream.recv(READ_SIZE)
            if not data:
                return
            self.stats.bytes_received += len(data)
            try:
                frames = decoder.feed(data)
            except VideoProtocolError as exc:
                self.stats.error = f"protocol error: {exc}"
                return
            for frame in frames:
                self._handle(frame)

    def _check_order(self, frame: Frame) -> None:
        expected = self._next_seq.get(frame.type, 0)
        if frame.sequence != expected:
            self.stats.order_errors += 1
        self._next_seq[frame.type] = (frame.sequence + 1) & 0xFFFFFFFF

    def _handle(self, frame: Frame) -> None:
        if frame.type is FrameType.HELLO:
            self.stats.hello = frame.json()
        elif frame.type is FrameType.BYE:
            self.stats.bye = True
        elif frame.type is FrameType.AUDIO:
            self._check_order(frame)
            self.stats.audio_chunks += 1
            self.stats.audio_bytes += len(frame.payload)
            self.sink.play(frame.payload)
        else:
            self._check_order(frame)
            self.stats.frames_received += 1
            with self._cond:
                if self._slot is not None:
                    self.stats.frames_skipped += 1
                self._slot = frame
                self._cond.notify()

    def _decode_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: self._slot is not None or self._reading_done or self._stop.is_set(), timeout=1.0
                )
                frame, self._slot = self._slot, None
                if frame is None and (self._reading_done or self._stop.is_set()):
                    return
            if frame is None:
                continue
            try:
                picture = decode_jpeg(frame.payload)
            except ValueError:
                self.stats.decode_errors += 1
                continue
            done = time.monotonic()
            self.stats.latencies_ms.append((time.time_ns() // 1000 - frame.capture_us) / 1000)
            if frame.sequence <= self._last_decoded_seq:
                self.stats.order_errors += 1
            self._last_decoded_seq = frame.sequence
            hello = self.stats.hello or {}
            if hello.get("width") and (picture.width, picture.height) != (hello["width"], hello["height"]):
                self.stats.size_errors += 1
            self.stats.width, self.stats.height = picture.size
            self.stats.frames_decoded += 1
            if self.stats.first_decoded is None:
                self.stats.first_decoded = done
            self.stats.last_decoded = done
            with self._cond:
                self._live.append((done, len(frame.payload)))
            self._latest = (frame.sequence, frame.payload)
            if self.on_picture is not None:
                self.on_picture(picture)
