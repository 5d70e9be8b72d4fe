"""Shannon entropy of byte histograms, and its persistence in the store across restarts."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import pytest

from qkdtls.kme.entropy import histogram, merge, shannon_entropy
from qkdtls.kme.store import open_store


def test_known_values() -> None:
    assert shannon_entropy([0] * 256) == 0.0
    assert shannon_entropy(histogram(b"\x00" * 100)) == 0.0
    assert shannon_entropy(histogram(bytes(range(256)))) == 8.0
    assert shannon_entropy(histogram(b"ab" * 10)) == 1.0
    assert math.isclose(shannon_entropy(histogram(b"aab")), 0.9182958340544896)
    assert shannon_entropy(merge(histogram(b"a"), histogram(b"b"))) == 1.0
    with pytest.raises(ValueError):
        shannon_entropy([1, 2])


async def test_histogram_survives_restart(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'e.sqlite3'}"
    first, second = os.urandom(4000), b"\x00" * 4000
    store = open_store(url)
    await store.import_file(2, "1.key", first, hashlib.sha256(first).hexdigest(), 32, local=False)
    await store.close()
    store = open_store(url)
    try:
        await store.import_file(2, "2.key", second, hashlib.sha256(second).hexdigest(), 32, local=False)
        stats = await store.link_stats(2)
        assert list(stats.histogram) == merge(histogram(first), histogram(second))
    finally:
        await store.close()
