"""A simulated QKD link: identical key material written into the key folders of the two KMEs it joins.

A real QKD stack hands each end the same secret bits; here ``os.urandom`` stands in for the quantum channel
and both folders receive byte-identical files under identical names. Files follow the file rule of
docs/design.md so a KME never imports a half-written file: write ``.NAME.part``, fsync, ``rename()`` to
``NNNNNNNNN.key``, fsync the folder. Names are sequence numbers in write order, continuing after the
highest number either folder has seen (a hidden ``.qkd-link.next`` file remembers it when KMEs delete files
after import, so a name is never reused).

``qber`` simulates a link whose error correction or privacy amplification failed: each bit is 0 with
probability 0.5 + qber, so the material has less than 8 bits of entropy per byte and the KME's entropy
alarm should fire. Both ends still receive identical files.
"""

from __future__ import annotations

import math
import os
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

NAME_DIGITS = 9
KEY_SUFFIX = ".key"
STATE_FILE = ".qkd-link.next"
FAIL_QBER = 0.45  # --fail: 2.3 bits of entropy per byte
MAX_FILE_SIZE = 64 * 1024 * 1024
_KEY_NAME = re.compile(rf"^(\d{{{NAME_DIGITS},}}){re.escape(KEY_SUFFIX)}$")


class LinkError(ValueError):
    """A link that cannot run as asked (same folder twice, bad size or rate)."""


@dataclass(frozen=True)
class Progress:
    """What the link has written so far; passed to the progress callback after each file."""

    files: int
    bytes: int
    elapsed: float
    last_name: str

    @property
    def rate(self) -> float:
        return self.bytes / self.elapsed if self.elapsed > 0 else 0.0


def shannon_entropy_per_byte(bits_zero_probability: float) -> float:
    """Entropy in bits per byte of material whose bits are independently 0 with this probability."""
    p = bits_zero_probability
    if p in (0.0, 1.0):
        return 0.0
    return 8 * -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def material_source(qber: float = 0.0) -> Callable[[int], bytes]:
    """``os.urandom`` for a healthy link; for ``qber`` > 0, bytes whose bits are biased towards 0."""
    if not 0.0 <= qber <= 0.5:
        raise LinkError(f"qber must lie within 0..0.5, got {qber}")
    if qber == 0.0:
        return os.urandom
    p_zero = 0.5 + qber
    # The distribution of a byte with 8 independent biased bits; sampling whole bytes keeps it fast.
    weights = [p_zero ** (8 - bin(b).count("1")) * (1 - p_zero) ** bin(b).count("1") for b in range(256)]
    # A deliberately broken source: a seeded PRNG is enough, the material is never meant to be secret.
    rng = random.Random(os.urandom(16))
    values = range(256)

    def biased(n: int) -> bytes:
        return bytes(rng.choices(values, weights, k=n))

    return biased


@dataclass(frozen=True)
class RateSchedule:
    """When the next file may be written so that the average rate never exceeds ``rate`` bytes/s.

    Pure arithmetic (no clock): the caller passes elapsed seconds and bytes written.
    """

    rate: float

    def delay(self, elapsed: float, written: int, next_size: int) -> float:
        """Seconds to wait before writing ``next_size`` more bytes (0 if it may be written now)."""
        return max(0.0, (written + next_size) / self.rate - elapsed)


def default_file_size(rate: float | None) -> int:
    """64 KiB per file when writing once; about four files per second at a rate (multiples of 32 bytes)."""
    if rate is None:
        return 64 * 1024
    size = int(rate / 4) // 32 * 32
    return min(max(size, 32), 1024 * 1024)


class QkdLink:
    """Writes identical key files into two folders (the two ends of one QKD link)."""

    def __init__(
        self,
        folder_a: Path,
        folder_b: Path,
        *,
        qber: float = 0.0,
        material: Callable[[int], bytes] | None = None,
    ) -> None:
        self.folders = (Path(folder_a), Path(folder_b))
        for folder in self.folders:
            folder.mkdir(parents=True, exist_ok=True)
        if os.path.samefile(*self.folders):
            raise LinkError("the two ends of a link need two different folders")
        self._material = material or material_source(qber)
        self._next = self._first_sequence()

    @property
    def next_name(self) -> str:
        return _name(self._next)

    def write_file(self, size: int) -> str:
        """Write one file of ``size`` bytes to both ends; return its name."""
        if not 0 < size <= MAX_FILE_SIZE:
            raise LinkError(f"file size must lie within 1..{MAX_FILE_SIZE} bytes, got {size}")
        data = self._material(size)
        name = _name(self._next)
        self._next += 1
        # Remember the number first: if we crash after the rename, the name is still never reused.
        for folder in self.folders:
            _atomic_write(folder, STATE_FILE, str(self._next).encode("ascii"))
        for folder in self.folders:
            _atomic_write(folder, name, data)
        return name

    def emit(
        self,
        total: int,
        file_size: int | None = None,
        *,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> Progress:
        """Write ``total`` bytes at once, cut into files of ``file_size`` (the last one may be shorter)."""
        if total < 1:
            raise LinkError(f"the number of bytes must be positive, got {total}")
        size = file_size or default_file_size(None)
        start = time.monotonic()
        written, files, name = 0, 0, ""
        while written < total:
            chunk = min(size, total - written)
            name = self.write_file(chunk)
            written += chunk
            files += 1
            progress = Progress(files, written, time.monotonic() - start, name)
            if on_progress:
                on_progress(progress)
        return Progress(files, written, time.monotonic() - start, name)

    def run(
        self,
        rate: float,
        *,
        duration: float | None = None,
        total: int | None = None,
        file_size: int | None = None,
        stop: threading.Event | None = None,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> Progress:
        """Write at ``rate`` bytes/s until ``duration`` seconds, ``total`` bytes, or ``stop`` is set."""
        if not rate > 0:
            raise LinkError(f"rate must be positive, got {rate}")
        size = file_size or default_file_size(rate)
        schedule = RateSchedule(rate)
        stop = stop or threading.Event()
        start = time.monotonic()
        deadline = None if duration is None else start + duration
        written, files, name = 0, 0, ""
        while not stop.is_set():
            chunk = size if total is None else min(size, total - written)
            if chunk <= 0:
                break
            now = time.monotonic()
            wait = schedule.delay(now - start, written, chunk)
            if deadline is not None and now + wait > deadline:
                # The next file would be late: stop at the deadline instead of overrunning it.
                stop.wait(max(0.0, deadline - now))
                break
            if wait > 0 and stop.wait(wait):
                break
            name = self.write_file(chunk)
            written += chunk
            files += 1
            if on_progress:
                on_progress(Progress(files, written, time.monotonic() - start, name))
        return Progress(files, written, time.monotonic() - start, name)

    def _first_sequence(self) -> int:
        highest = -1
        for folder in self.folders:
            for entry in os.scandir(folder):
                match = _KEY_NAME.match(entry.name)
                if match:
                    highest = max(highest, int(match.group(1)))
            try:
                highest = max(highest, int((folder / STATE_FILE).read_text("ascii").strip()) - 1)
            except (OSError, ValueError):
                pass  # no state yet, or a damaged one: the file names are the record
        return highest + 1


def existing_key_files(folder: Path) -> Sequence[str]:
    """The ``*.key`` names in ``folder`` in import (name) order."""
    return sorted(entry.name for entry in os.scandir(folder) if _KEY_NAME.match(entry.name))


def _name(sequence: int) -> str:
    return f"{sequence:0{NAME_DIGITS}d}{KEY_SUFFIX}"


def _atomic_write(folder: Path, name: str, data: bytes) -> None:
    part = folder / f".{name}.part"
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(part, folder / name)
    except BaseException:
        # Also on Ctrl-C: never leave a half-written part file behind.
        part.unlink(missing_ok=True)
        raise
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
