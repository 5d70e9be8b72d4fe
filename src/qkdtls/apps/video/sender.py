"""The sending half of a call: capture, encode and stream without waiting for the receiver.

Three threads: the capture thread grabs and JPEG-encodes frames at the target rate into a one-frame slot,
the audio thread reads chunks in real time into a short queue, and the writer thread sends whatever is
there. When the link is slower than the camera, the slot is overwritten before the writer takes it: the
stale frame is dropped at the sender (counted) instead of queueing up latency.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from qkdtls.apps.https import TLSStream
from qkdtls.apps.video.protocol import FrameType, encode_frame, encode_header, hello
from qkdtls.apps.video.sources import AudioSource, JpegEncoder, VideoSource

log = logging.getLogger(__name__)

AUDIO_QUEUE = 25  # chunks (0.5 s at 20 ms): older ones are dropped if the link stalls
WRITE_TIMEOUT = 5.0


@dataclass
class SenderStats:
    frames_captured: int = 0
    frames_sent: int = 0
    frames_dropped: int = 0  # encoded, then replaced by a newer frame before the link took it
    frames_late: int = 0  # capture instants skipped because capture + encode fell behind the clock
    audio_sent: int = 0
    audio_dropped: int = 0
    bytes_sent: int = 0
    encode_ms_total: float = 0.0
    error: str | None = None

    @property
    def encode_ms_mean(self) -> float:
        return self.encode_ms_total / self.frames_captured if self.frames_captured else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "frames_captured": self.frames_captured,
            "frames_sent": self.frames_sent,
            "frames_dropped": self.frames_dropped,
            "frames_late": self.frames_late,
            "audio_sent": self.audio_sent,
            "audio_dropped": self.audio_dropped,
            "bytes_sent": self.bytes_sent,
            "encode_ms_mean": round(self.encode_ms_mean, 2),
            "error": self.error,
        }


@dataclass
class MediaSender:
    """Streams ``video`` (and ``audio`` if given) over ``stream`` until :meth:`stop`."""

    stream: TLSStream
    video: VideoSource
    audio: AudioSource | None = None
    fps: float = 30.0
    quality: int = 70
    stats: SenderStats = field(default_factory=SenderStats)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _cond: threading.Condition = field(default_factory=threading.Condition, repr=False)
    _slot: tuple[int, int, bytes] | None = field(default=None, repr=False)
    _audio: collections.deque[tuple[int, bytes]] = field(default_factory=collections.deque, repr=False)
    _threads: list[threading.Thread] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.fps <= 120:
            raise ValueError("fps must be in (0, 120]")
        self._encoder = JpegEncoder(self.quality)

    def description(self) -> dict[str, Any]:
        return {
            "video": "jpeg", "width": self.video.width, "height": self.video.height, "fps": self.fps,
            "audio": "pcm16le" if self.audio is not None else None,
            "audio_rate": self.audio.rate if self.audio is not None else None, "channels": 1,
        }

    def start(self) -> MediaSender:
        self.stream.settimeout(WRITE_TIMEOUT)
        targets = [self._capture_loop, self._write_loop]
        if self.audio is not None:
            targets.append(self._audio_loop)
        for target in targets:
            thread = threading.Thread(target=self._guard, args=(target,), daemon=True,
                                      name=f"video-{target.__name__.strip('_')}")
            self._threads.append(thread)
            thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> SenderStats:
        """Ends the stream with BYE and waits (bounded) for the threads."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return self.stats

    @property
    def failed(self) -> bool:
        return self.stats.error is not None

    def _guard(self, target: Any) -> None:
        try:
            target()
        except Exception as exc:  # any failure ends the whole sender, and is reported in the stats
            if self.stats.error is None:
                self.stats.error = f"{type(exc).__name__}: {exc}"
            log.warning("video sender stopped", extra={"event": "video.sender_error", "error": str(exc)})
            self._stop.set()
            with self._cond:
                self._cond.notify_all()

    def _capture_loop(self) -> None:
        period = 1.0 / self.fps
        start = time.monotonic()
        index = 0
        while not self._stop.is_set():
            due = start + index * period
            now = time.monotonic()
            if now < due:
                self._stop.wait(due - now)
                continue
            if now - due > period:  # fell behind: skip to the current instant rather than burst
                skipped = int((now - due) / period)
                self.stats.frames_late += skipped
                index += skipped
            capture_us = time.time_ns() // 1000
            begin = time.perf_counter()
            jpeg = self._encoder.encode(self.video.grab(index, capture_us / 1e6))
            self.stats.encode_ms_total += (time.perf_counter() - begin) * 1000
            self.stats.frames_captured += 1
            with self._cond:
                if self._slot is not None:
                    self.stats.frames_dropped += 1
                self._slot = (index, capture_us, jpeg)
                self._cond.notify()
            index += 1

    def _audio_loop(self) -> None:
        assert self.audio is not None
        while not self._stop.is_set():
            pcm = self.audio.read()
            capture_us = time.time_ns() // 1000
            with self._cond:
                if len(self._audio) >= AUDIO_QUEUE:
                    self._audio.popleft()
                    self.stats.audio_dropped += 1
                self._audio.append((capture_us, pcm))
                self._cond.notify()

    def _write_loop(self) -> None:
        self._send(hello(self.description()))
        video_seq = audio_seq = 0
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: self._stop.is_set() or self._slot is not None or bool(self._audio), timeout=1.0
                )
                slot, self._slot = self._slot, None
                chunks = list(self._audio)
                self._audio.clear()
            if self._stop.is_set():
                break
            out = bytearray()
            for capture_us, pcm in chunks:
                out += encode_frame(FrameType.AUDIO, audio_seq, capture_us, pcm)
                audio_seq += 1
            if slot is not None:
                _, capture_us, jpeg = slot
                out += encode_header(FrameType.VIDEO, video_seq, capture_us, len(jpeg))
                out += jpeg
                video_seq += 1
            if out:
                self._send(bytes(out))
                self.stats.audio_sent += len(chunks)
                self.stats.frames_sent += slot is not None
        self._send(encode_frame(FrameType.BYE, 0, time.time_ns() // 1000))

    def _send(self, data: bytes) -> None:
        self.stream.sendall(data)
        self.stats.bytes_sent += len(data)
