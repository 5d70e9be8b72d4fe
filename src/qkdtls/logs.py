"""Structured logging: every record carries ``event`` and its fields; ``json`` format for log shippers.

Call sites log with ``log.info("key reserved", extra={"event": "key.reserved", "key_ID": ...})``.
Key bytes are never passed to a logger. Lines that strangers can trigger (refused handshakes, forged
requests) go through a ``LogLimiter``.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import Any

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update(_fields(record))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {record.levelname:<7} "
        base += f"{record.name}: {record.getMessage()}"
        extra = _fields(record)
        if extra:
            base += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        if record.exc_info:
            base += "\n" + self.formatException(record.exc_info)
        return base


def configure_logging(verbosity: int = 0, fmt: str = "text") -> None:
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class LogLimiter:
    """At most ``burst`` records per event name per ``interval`` seconds; the next record emitted after a
    quiet spell says how many were left out (``suppressed``). For log lines strangers can trigger."""

    def __init__(self, logger: logging.Logger, burst: int = 5, interval: float = 10.0) -> None:
        self._log = logger
        self._burst = burst
        self._interval = interval
        self._state: dict[str, list[float]] = {}  # event -> [window start, emitted, suppressed]
        self._lock = threading.Lock()

    def __call__(self, level: int, message: str, extra: dict[str, Any]) -> None:
        if not self._log.isEnabledFor(level):
            return
        event = str(extra.get("event", message))
        now = time.monotonic()
        with self._lock:
            state = self._state.get(event)
            if state is None:
                if len(self._state) >= 256:  # event names are ours, but stay bounded anyway
                    self._state.clear()
                state = self._state[event] = [now, 0, 0]
            if now - state[0] >= self._interval:
                state[0], state[1] = now, 0
            if state[1] >= self._burst:
                state[2] += 1
                return
            state[1] += 1
            suppressed, state[2] = int(state[2]), 0
        if suppressed:
            extra = {**extra, "suppressed": suppressed}
        self._log.log(level, message, extra=extra)
