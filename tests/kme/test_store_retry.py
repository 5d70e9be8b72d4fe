"""PostgreSQL key store: a batch aborted by a deadlock or a serialization failure runs again (bounded)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from qkdtls.kme.store import StoreUnavailable, open_store

from .test_store import LINK

pytestmark = pytest.mark.postgres


async def test_a_deadlock_between_two_processes_is_retried(postgres_dsn: str) -> None:
    """Two stores (two connections, like two KME processes) each lock a counter row in an operation and then
    update the other's row when the batch writes its counters: PostgreSQL aborts one transaction as a
    deadlock. Its batch runs again after a pause and both succeed, each change applied once."""
    a, b = open_store(postgres_dsn), open_store(postgres_dsn)
    try:
        both_hold_one = threading.Barrier(2, timeout=20)
        attempts = {"a": 0, "b": 0}
        lock = "SELECT value FROM counters WHERE link = ? AND name = ? FOR UPDATE"

        def crossing(name: str, locked: str, updated: str) -> Any:
            def op(tx: Any) -> str:
                attempts[name] += 1
                tx.cur.execute(lock, (LINK, locked))
                if attempts[name] == 1:  # only the first run waits: the retry must go through
                    both_hold_one.wait()
                tx.add(LINK, updated, 1)  # written when the batch commits, after every operation
                return name

            return op

        def create(tx: Any) -> None:
            tx.add(LINK, "x", 0)
            for counter in ("x", "y"):
                tx.cur.execute("INSERT INTO counters(link, name, value) VALUES (?, ?, 0)", (LINK, counter))

        await a._do(create)  # type: ignore[attr-defined]
        results = await asyncio.wait_for(
            asyncio.gather(
                a._do(crossing("a", "y", "x")),  # type: ignore[attr-defined]
                b._do(crossing("b", "x", "y")),  # type: ignore[attr-defined]
                return_exceptions=True,
            ),
            timeout=60,
        )
        assert results == ["a", "b"], results
        assert a.retries + b.retries == 1  # type: ignore[attr-defined]
        assert sorted(attempts.values()) == [1, 2]

        def read(tx: Any) -> list[tuple[str, int]]:
            tx.cur.execute("SELECT name, value FROM counters WHERE name IN ('x', 'y') ORDER BY name")
            return [(str(n), int(v)) for n, v in tx.cur.fetchall()]

        assert await a._do(read) == [("x", 1), ("y", 1)]  # type: ignore[attr-defined]
    finally:
        await a.close()
        await b.close()


async def test_retries_are_bounded(postgres_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import psycopg

    from qkdtls.kme.store import postgres

    monkeypatch.setattr(postgres, "RETRY_PAUSE", 0.001)
    store = open_store(postgres_dsn)
    calls = 0

    def always_conflicts(tx: Any) -> None:
        nonlocal calls
        calls += 1
        raise psycopg.errors.SerializationFailure("conflict")

    try:
        with pytest.raises(StoreUnavailable):
            await store._do(always_conflicts)  # type: ignore[attr-defined]
        assert calls == postgres.RETRIES + 1
        assert await store.free_blocks(LINK, 0) == 0  # the store still works
    finally:
        await store.close()
