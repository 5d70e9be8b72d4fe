"""Shannon entropy, in bits per byte, of the key material imported on a link.

The byte histogram is kept in the store (``streams.histogram``) and updated in the same transaction as each
import, so the figure survives restarts and costs nothing per request. Like the reference KME's monitoring
value it is cumulative over everything imported, not over the blocks still in stock: it is a health signal
about the QKD stack's output (a stuck or biased source shows up well below 8), not a proof of randomness.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence


def histogram(data: bytes) -> list[int]:
    counts = [0] * 256
    for value, n in Counter(data).items():
        counts[value] = n
    return counts


def shannon_entropy(counts: Sequence[int]) -> float:
    """Entropy of a 256-bin byte histogram; 0.0 for an empty one."""
    if len(counts) != 256:
        raise ValueError("a byte histogram has 256 bins")
    total = sum(counts)
    if total == 0:
        return 0.0
    entropy = -sum(n / total * math.log2(n / total) for n in counts if n)
    return entropy if entropy > 0 else 0.0  # not -0.0 for a single-valued histogram


def merge(a: Sequence[int], b: Sequence[int]) -> list[int]:
    return [x + y for x, y in zip(a, b, strict=True)]
