"""What a relay node counts: relays by mode and outcome, the last paths used, the link material it
consumed as a sender, per link, purpose and mode, and keys relayed ahead by outcome (``relay_stats()`` and
the Prometheus metrics)."""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any

LAST_PATHS = 20
PURPOSES = ("key", "pad", "mac")


class RelayStats:
    def __init__(self, kme_id: int) -> None:
        self.kme_id = kme_id
        self.relays: Counter[tuple[str, str]] = Counter()  # (mode, outcome: delivered | failed)
        self.consumed: Counter[tuple[int, str, str]] = Counter()  # (peer KME, purpose, mode) -> bytes
        self.hops: Counter[str] = Counter()  # hop messages received: accepted, malformed, replay, ...
        self.last_paths: deque[dict[str, Any]] = deque(maxlen=LAST_PATHS)
        # Keys of enc_keys for remote SAEs by how they were served (kme/relay/prefetch.py): hit (relayed
        # ahead), miss (relayed on demand while prefetch is on); relayed: keys relayed ahead; expired: dropped
        # unused.
        self.prefetch: Counter[str] = Counter()

    def consume(self, peer: int, purpose: str, mode: str, nbytes: int) -> None:
        if nbytes:
            self.consumed[(peer, purpose, mode)] += nbytes

    def relay(self, mode: str, ok: bool, paths: Sequence[Sequence[int]], keys: int) -> None:
        self.relays[(mode, "delivered" if ok else "failed")] += 1
        self.last_paths.append(
            {"at": time.time(), "mode": mode, "ok": ok, "paths": [list(p) for p in paths], "keys": keys}
        )

    def snapshot(self) -> dict[str, Any]:
        """The JSON-ready ``relay_stats()`` of the network design (admin API and map)."""
        return {
            "relays": {
                "trusted": self.relays[("trusted", "delivered")],
                "spread": self.relays[("spread", "delivered")],
                "failed": sum(n for (_, outcome), n in self.relays.items() if outcome == "failed"),
            },
            "last_paths": list(self.last_paths),
            "consumed_bytes": [
                {"link": [self.kme_id, peer], "purpose": purpose, "mode": mode, "bytes": nbytes}
                for (peer, purpose, mode), nbytes in sorted(self.consumed.items())
            ],
            "hops": dict(sorted(self.hops.items())),
            "prefetch": dict(sorted(self.prefetch.items())),
        }
