"""Helpers for relay tests with real KME processes: a testbed of N sites with fast link-state timers, SAE
callers, the link material as the KMEs hold it, and the test-only relay ledgers (kme/relay/ledger.py)."""

from __future__ import annotations

import asyncio
import base64
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qkdtls.kme.relay.ledger import LEDGER_ENV
from qkdtls.testbed import Testbed

from ..conftest import Caller, tls_client_context

# Adverts every 0.2 s, a neighbour dead after 1 s of silence: a restarted KME is routed through again
# within about a second.
FAST_NETWORK = {"network": {"hello_interval": 0.2, "dead_interval": 1.0, "max_age": 4.0}}
CONVERGE = 30.0  # seconds a test waits for routing (bounded; the loaded CI machine takes a few)


def make_bed(
    root: Path,
    saes: Mapping[int, Sequence[int]],
    links: Sequence[tuple[int, int]],
    *,
    key_bytes: int,
    site_config: Mapping[int, Mapping[str, Any]] | None = None,
    service: Mapping[str, Any] | None = None,
) -> Testbed:
    return Testbed.create(
        root,
        saes=saes,
        links=links,
        initial_key_bytes=key_bytes,
        local_key_bytes=0,
        peer_timeout=3.0,
        sweep_interval=0.5,
        kme_config=FAST_NETWORK,
        site_config=site_config,
        service=service,
    )


def caller(bed: Testbed, sae: int, timeout: float = 15.0) -> Caller:
    return Caller(
        bed.sae_url(bed.kme_of(sae)), tls_client_context(*bed.sae_credentials(sae)), timeout=timeout
    )


def admin(bed: Testbed, kme: int) -> Caller:
    return Caller(bed.sae_url(kme), tls_client_context(*bed.admin_credentials(kme)))


def ids(keys: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {"key_IDs": [{"key_ID": k["key_ID"]} for k in keys]}


async def routed(master: Caller, slave: int, deadline: float = CONVERGE) -> None:
    """Wait until the master's KME has a path to the slave's KME (status answers with stock)."""
    end = time.monotonic() + deadline
    while True:
        reply = await master.get(f"/api/v1/keys/{slave}/status")
        if reply.status == 200 and reply.json["stored_key_count"] > 0:
            return
        assert time.monotonic() < end, f"no route to SAE {slave}: {reply.status} {reply.body[:200]!r}"
        await asyncio.sleep(0.1)


async def relay_until_ok(master: Caller, slave: int, doc: dict[str, Any], deadline: float = CONVERGE) -> Any:
    """enc_keys, retried while the network converges (503: no path yet, nothing consumed)."""
    end = time.monotonic() + deadline
    while True:
        try:
            reply = await master.post(f"/api/v1/keys/{slave}/enc_keys", doc)
        except Exception:  # the master's KME restarting
            reply = None
        if reply is not None and reply.status == 200:
            return reply.json["keys"]
        assert time.monotonic() < end, f"enc_keys for {slave} kept failing: {reply and reply.body[:300]!r}"
        await asyncio.sleep(0.1)


async def reserved_keys(bed: Testbed, kme: int) -> int:
    """Keys stored at KME ``kme`` and not yet collected (the admin links page, summed over its links)."""
    who = admin(bed, kme)
    try:
        links = (await who.get("/api/v1/admin/links")).json["links"]
    finally:
        await who.close()
    return sum(link["reserved_keys"] for link in links)


def link_stream(bed: Testbed, a: int, b: int) -> bytes:
    """Every byte written to link a-b so far (both ends hold the same), in import order."""
    folder = bed.links[(min(a, b), max(a, b))].folders[0]
    return b"".join(p.read_bytes() for p in sorted(folder.glob("*.key")))


@dataclass
class Ledgers:
    """What every KME wrote to its relay ledger (a kill may leave a partial last line: ignored)."""

    spends: Counter[tuple[int, int, int]] = field(default_factory=Counter)  # (sender, receiver, seq)
    purposes: dict[tuple[int, int, int], str] = field(default_factory=dict)
    takes: Counter[tuple[int, int, int]] = field(default_factory=Counter)  # (sender, receiver, seq)
    received: list[tuple[int, int, bytes]] = field(default_factory=list)  # (sender, receiver, body)

    @classmethod
    def read(cls, directory: Path) -> Ledgers:
        out = cls()
        for path in sorted(directory.glob("kme*.ledger")):
            me = int(path.stem.removeprefix("kme"))
            for line in path.read_text().splitlines():
                parts = line.split(" ")
                try:
                    if parts[0] == "spend" and len(parts) == 4:
                        key = (me, int(parts[1]), int(parts[3]))
                        out.spends[key] += 1
                        out.purposes[key] = parts[2]
                    elif parts[0] == "take" and len(parts) == 3:
                        out.takes[(int(parts[1]), me, int(parts[2]))] += 1
                    elif parts[0] == "recv" and len(parts) == 3:
                        out.received.append((int(parts[1]), me, base64.b64decode(parts[2], validate=True)))
                except ValueError:
                    continue  # a line cut by a kill
        return out

    def reused(self) -> list[tuple[int, int, int]]:
        return [k for k, n in self.spends.items() if n > 1] + [k for k, n in self.takes.items() if n > 1]


def ledger_env(directory: Path) -> dict[str, str]:
    directory.mkdir(parents=True, exist_ok=True)
    return {LEDGER_ENV: str(directory)}


class Tally:
    """Keys the master SAE received and the slave SAE collected: duplicates and mismatches counted."""

    def __init__(self) -> None:
        self.delivered: dict[str, bytes] = {}
        self.values: set[bytes] = set()
        self.collected: dict[str, bytes] = {}
        self.duplicated = 0
        self.mismatched = 0

    def deliver(self, keys: list[dict[str, Any]]) -> None:
        for key in keys:
            value = base64.b64decode(key["key"])
            if key["key_ID"] in self.delivered or value in self.values:
                self.duplicated += 1
            self.delivered[key["key_ID"]] = value
            self.values.add(value)

    def collect(self, keys: list[dict[str, Any]]) -> None:
        for key in keys:
            value = base64.b64decode(key["key"])
            self.mismatched += value != self.delivered.get(key["key_ID"])
            self.collected[key["key_ID"]] = value
