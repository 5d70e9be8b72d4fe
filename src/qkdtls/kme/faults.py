"""Test-only fault injection: a KME kills itself (SIGKILL) at a named point of its work.

``QKDTLS_KME_FAULT`` holds comma-separated points, each optionally ``@N`` (die at the N-th time the point is
reached instead of the first), e.g. ``relay-kill-after-accept@3``. Read once, when the service starts.
The points (docs/design.md, crash safety): ``kill-after-collect`` (a ``dec_keys`` committed, not answered),
``relay-kill-after-spend`` (a relay sender's material durably consumed, the message not sent),
``relay-kill-before-commit`` (an intermediate forwarded a message, what it named not yet consumed),
``relay-kill-after-accept`` (a received hop message committed, its caller not answered),
``relay-kill-after-forward`` (the next hop answered, the previous one not yet) and
``relay-kill-before-answer`` (the relay succeeded, the master SAE not answered, or for a refill of keys
relayed ahead, the keys not yet in the buffer).
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "QKDTLS_KME_FAULT"


class Faults:
    def __init__(self, spec: str = "") -> None:
        self._left: dict[str, int] = {}
        for part in spec.split(","):
            name, _, count = part.strip().partition("@")
            if name:
                self._left[name] = int(count) if count.isdigit() and int(count) > 0 else 1

    @classmethod
    def from_env(cls) -> Faults:
        return cls(os.environ.get(FAULT_ENV, ""))

    def __bool__(self) -> bool:
        return bool(self._left)

    def hit(self, point: str) -> None:
        """Die here if ``point`` is armed and this is its N-th visit."""
        left = self._left.get(point)
        if left is None:
            return
        if left > 1:
            self._left[point] = left - 1
            return
        os.kill(os.getpid(), signal.SIGKILL)
