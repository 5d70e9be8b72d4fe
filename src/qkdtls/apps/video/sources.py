"""Media sources and sinks: camera and microphone when present, otherwise a synthetic picture and tone.

OpenCV (camera, window) and sounddevice (microphone, speaker) are optional and imported only when asked for,
so the call runs headless with numpy and Pillow alone. The synthetic picture is a test pattern whose colour
bars stay put (a receiver or a screenshot can check them) under a moving box, the frame counter and the
capture time.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
from PIL import Image, ImageDraw, ImageFont

log = logging.getLogger(__name__)

# 75 % colour bars (ITU-R BT.801 order): what the pattern shows in its upper two thirds.
BARS: tuple[tuple[int, int, int], ...] = (
    (191, 191, 191),
    (191, 191, 0),
    (0, 191, 191),
    (0, 191, 0),
    (191, 0, 191),
    (191, 0, 0),
    (0, 0, 191),
)
BAR_HEIGHT_FRACTION = 2 / 3


class MediaUnavailable(RuntimeError):
    """The camera, microphone, speaker or display (or the library to drive it) is not there."""


class VideoSource(Protocol):
    width: int
    height: int

    def grab(self, index: int, capture_time: float) -> Image.Image: ...
    def close(self) -> None: ...


class TestPattern:
    """A moving test pattern: colour bars, a box sweeping across, frame counter and capture time."""

    __test__ = False  # not a pytest test class

    def __init__(self, width: int = 1280, height: int = 720) -> None:
        if width < 160 or height < 90:
            raise ValueError("test pattern needs at least 160x90 pixels")
        self.width, self.height = width, height
        self._bars_bottom = int(height * BAR_HEIGHT_FRACTION)
        base = Image.new("RGB", (width, height), (16, 16, 16))
        draw = ImageDraw.Draw(base)
        for i, colour in enumerate(BARS):
            draw.rectangle([i * width // 7, 0, (i + 1) * width // 7 - 1, self._bars_bottom - 1], fill=colour)
        # A grey ramp under the bars gives the encoder some detail, as a real picture would.
        ramp = np.tile(np.linspace(0, 255, width, dtype=np.uint8), (height // 12, 1))
        base.paste(Image.fromarray(np.dstack([ramp] * 3)), (0, self._bars_bottom))
        self._base = base
        self._font = ImageFont.load_default(size=max(12, height // 16))
        self._box = max(8, height // 9)

    def bar_centres(self) -> list[tuple[int, int]]:
        """Pixel positions (x, y) in the middle of each colour bar."""
        y = self._bars_bottom // 2
        return [((2 * i + 1) * self.width // 14, y) for i in range(len(BARS))]

    def grab(self, index: int, capture_time: float) -> Image.Image:
        frame = self._base.copy()
        draw = ImageDraw.Draw(frame)
        span = self.width - self._box
        x = (index * 8) % (2 * span)
        x = x if x < span else 2 * span - x  # back and forth
        top = self._bars_bottom + self.height // 12 + 4
        draw.rectangle([x, top, x + self._box - 1, top + self._box - 1], fill=(255, 255, 255))
        millis = int(capture_time * 1000) % 1000
        stamp = time.strftime("%H:%M:%S", time.localtime(capture_time)) + f".{millis:03d}"
        draw.text((12, self.height - self._font.size - 12), f"frame {index:06d}  {stamp}", font=self._font,
                  fill=(255, 255, 255))
        return frame

    def close(self) -> None:
        pass


class CameraSource:
    """A V4L2 camera through OpenCV (``pip install opencv-python-headless``)."""

    def __init__(self, device: int | str = 0, width: int = 1280, height: int = 720, fps: int = 30) -> None:
        try:
            import cv2  # type: ignore[import-not-found]  # optional
        except ImportError:
            raise MediaUnavailable("camera needs OpenCV: pip install opencv-python-headless") from None
        self._cv2 = cv2
        self._cap = cv2.VideoCapture(device)
        if not self._cap.isOpened():
            raise MediaUnavailable(f"cannot open camera {device!r}")
        self._cap.set(cv2.CAP_PROP_FRAME_WIDTH, width)
        self._cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
        self._cap.set(cv2.CAP_PROP_FPS, fps)
        self.width = int(self._cap.get(cv2.CAP_PROP_FRAME_WIDTH))
        self.height = int(self._cap.get(cv2.CAP_PROP_FRAME_HEIGHT))

    def grab(self, index: int, capture_time: float) -> Image.Image:
        ok, bgr = self._cap.read()
        if not ok:
            raise MediaUnavailable("camera stopped delivering frames")
        return Image.fromarray(self._cv2.cvtColor(bgr, self._cv2.COLOR_BGR2RGB))

    def close(self) -> None:
        self._cap.release()


def open_video_source(kind: str = "auto", width: int = 1280, height: int = 720, fps: int = 30) -> VideoSource:
    """``pattern``, ``camera`` or ``auto`` (the camera if /dev/video0 and OpenCV are there)."""
    if kind == "camera" or (kind == "auto" and os.path.exists("/dev/video0")):
        try:
            return CameraSource(0, width, height, fps)
        except MediaUnavailable:
            if kind == "camera":
                raise
            log.info("no usable camera; sending the test pattern", extra={"event": "video.no_camera"})
    elif kind not in ("auto", "pattern"):
        raise ValueError(f"unknown video source {kind!r}")
    return TestPattern(width, height)


class JpegEncoder:
    """Pillow JPEG encoding with one reused buffer; 4:2:0 subsampling as the reference client used."""

    def __init__(self, quality: int = 70) -> None:
        if not 1 <= quality <= 95:
            raise ValueError("JPEG quality must be 1..95")
        self.quality = quality
        self._buffer = io.BytesIO()

    def encode(self, image: Image.Image) -> bytes:
        self._buffer.seek(0)
        self._buffer.truncate()
        image.save(self._buffer, "JPEG", quality=self.quality, subsampling=2, optimize=False)
        return self._buffer.getvalue()


def decode_jpeg(data: bytes) -> Image.Image:
    """Fully decodes one JPEG; raises ``ValueError`` for data that is not one."""
    try:
        image = Image.open(io.BytesIO(data), formats=("JPEG",))
        image.load()
    except (OSError, SyntaxError) as exc:  # Pillow reports truncated or corrupt data as OSError/SyntaxError
        raise ValueError(f"not a decodable JPEG: {exc}") from None
    return image


# --- audio -------------------------------------------------------------------------------------------------


class AudioSource(Protocol):
    rate: int
    chunk_samples: int

    def read(self) -> bytes: ...
    def close(self) -> None: ...


class ToneSource:
    """A sine tone in real time: :meth:`read` returns the next chunk of PCM16 when it is due."""

    def __init__(self, frequency: float = 440.0, rate: int = 48000, chunk_ms: int = 20, level: float = 0.2):
        self.rate = rate
        self.chunk_samples = rate * chunk_ms // 1000
        self._step = 2 * np.pi * frequency / rate
        self._level = level
        self._index = 0
        self._start = time.monotonic()

    def read(self) -> bytes:
        due = self._start + (self._index + 1) * self.chunk_samples / self.rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        n = np.arange(self._index * self.chunk_samples, (self._index + 1) * self.chunk_samples)
        self._index += 1
        samples = (np.sin(n * self._step) * self._level * 32767).astype("<i2")
        return samples.tobytes()

    def close(self) -> None:
        pass


class MicrophoneSource:
    """The default microphone through sounddevice (``pip install sounddevice``), mono PCM16."""

    def __init__(self, rate: int = 48000, chunk_ms: int = 20) -> None:
        sd = _sounddevice()
        self.rate = rate
        self.chunk_samples = rate * chunk_ms // 1000
        try:
            self._stream = sd.RawInputStream(samplerate=rate, channels=1, dtype="int16",
                                             blocksize=self.chunk_samples)
            self._stream.start()
        except Exception as exc:  # PortAudio reports a missing device with its own exception types
            raise MediaUnavailable(f"no microphone: {exc}") from None

    def read(self) -> bytes:
        data, _overflowed = self._stream.read(self.chunk_samples)
        return bytes(data)

    def close(self) -> None:
        self._stream.close()


def open_audio_source(kind: str = "auto", rate: int = 48000) -> AudioSource | None:
    """``tone``, ``mic``, ``none`` or ``auto`` (the microphone if there is one, else the tone)."""
    if kind == "none":
        return None
    if kind in ("mic", "auto"):
        try:
            return MicrophoneSource(rate)
        except MediaUnavailable:
            if kind == "mic":
                raise
    elif kind != "tone":
        raise ValueError(f"unknown audio source {kind!r}")
    return ToneSource(rate=rate)


class AudioSink(Protocol):
    def play(self, pcm: bytes) -> None: ...
    def close(self) -> None: ...


class CountingSink:
    """Where audio goes when there is no output device: it is counted (and its level measured)."""

    def __init__(self) -> None:
        self.chunks = 0
        self.bytes = 0
        self.peak = 0

    def play(self, pcm: bytes) -> None:
        self.chunks += 1
        self.bytes += len(pcm)
        if pcm:
            samples = np.frombuffer(pcm[: len(pcm) // 2 * 2], dtype="<i2")
            self.peak = max(self.peak, int(np.abs(samples.astype(np.int32)).max(initial=0)))

    def close(self) -> None:
        pass


class SpeakerSink(CountingSink):
    """Plays PCM16 mono on the default output device (sounddevice); counts it as well."""

    def __init__(self, rate: int = 48000) -> None:
        super().__init__()
        sd = _sounddevice()
        try:
            self._stream = sd.RawOutputStream(samplerate=rate, channels=1, dtype="int16")
            self._stream.start()
        except Exception as exc:  # PortAudio reports a missing device with its own exception types
            raise MediaUnavailable(f"no audio output: {exc}") from None

    def play(self, pcm: bytes) -> None:
        super().play(pcm)
        self._stream.write(pcm)

    def close(self) -> None:
        self._stream.close()


def open_audio_sink(kind: str = "auto", rate: int = 48000) -> CountingSink:
    """``speaker``, ``count`` or ``auto`` (the speaker if there is one)."""
    if kind in ("speaker", "auto"):
        try:
            return SpeakerSink(rate)
        except MediaUnavailable:
            if kind == "speaker":
                raise
    return CountingSink()


def _sounddevice() -> Any:
    try:
        import sounddevice  # type: ignore[import-not-found]  # optional
    except (ImportError, OSError):  # OSError: the module is there but PortAudio is not
        raise MediaUnavailable("audio devices need sounddevice: pip install sounddevice") from None
    return sounddevice


class WindowDisplay:
    """Shows decoded pictures in an OpenCV window (needs a display and ``opencv-python``)."""

    @staticmethod
    def available() -> bool:
        if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
            return False
        try:
            import cv2  # type: ignore[import-not-found]  # noqa: F401  # optional
        except ImportError:
            return False
        return True

    def __init__(self, title: str) -> None:
        if not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
            raise MediaUnavailable("no display")
        try:
            import cv2  # type: ignore[import-not-found]  # optional
        except ImportError:
            raise MediaUnavailable("a window needs OpenCV: pip install opencv-python") from None
        self._cv2 = cv2
        self.title = title
        self._lock = threading.Lock()

    def show(self, image: Image.Image) -> None:
        with self._lock:
            self._cv2.imshow(self.title, self._cv2.cvtColor(np.asarray(image), self._cv2.COLOR_RGB2BGR))
            self._cv2.waitKey(1)

    def close(self) -> None:
        self._cv2.destroyWindow(self.title)


FrameCallback = Callable[[Image.Image], None]
