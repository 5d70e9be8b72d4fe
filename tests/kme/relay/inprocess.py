"""KME services of a small network wired in-process (real SQLite stores, no HTTP) for the relay logic.

The transport calls the neighbour's ``accept_relay`` directly, turning its KmeError into the HTTP status the
inter-KME listener would answer. It records every message (and can tamper with, drop or replay them), so
tests can see what each KME received. Routing is a static graph (``StaticRouter``); the real router is
exercised by the multi-process tests.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qkdtls.kme.errors import (
    BlocksTakenError,
    KmeError,
    PeerQuotaExceeded,
    PeerRejected,
    PeerUnavailable,
    UncollectedQuotaError,
)
from qkdtls.kme.relay.node import HopReply
from qkdtls.kme.relay.policy import RelaySettings
from qkdtls.kme.reservation import Reservation
from qkdtls.kme.service import KmeService, SaeEntry, ServiceSettings
from qkdtls.kme.store import open_store

BS = 32


class StaticRouter:
    """Shortest paths (fewest hops, then lowest IDs) over a fixed graph; links can be marked down."""

    def __init__(self, me: int, links: Sequence[tuple[int, int]], sae_kmes: dict[int, int]) -> None:
        self.me = me
        self.adj: dict[int, set[int]] = {}
        for a, b in links:
            self.adj.setdefault(a, set()).add(b)
            self.adj.setdefault(b, set()).add(a)
        self.sae_kmes = sae_kmes
        self.down: set[frozenset[int]] = set()
        self.max_hops = 8

    def kme_of(self, sae_id: int) -> int | None:
        return self.sae_kmes.get(sae_id)

    def _bfs(self, dst: int, banned: set[int], direct: bool = True) -> tuple[int, ...] | None:
        prev: dict[int, int] = {self.me: self.me}
        frontier = [self.me]
        while frontier:
            nxt = []
            for node in frontier:
                for peer in sorted(self.adj.get(node, ())):
                    if peer in prev or (peer in banned and peer != dst):
                        continue
                    if frozenset((node, peer)) in self.down or (
                        not direct and {node, peer} == {self.me, dst}
                    ):
                        continue
                    prev[peer] = node
                    nxt.append(peer)
            frontier = nxt
        if dst not in prev:
            return None
        path = [dst]
        while path[-1] != self.me:
            path.append(prev[path[-1]])
        return tuple(reversed(path))

    def path(self, dst_kme: int, *, need_blocks: int = 0) -> tuple[int, ...] | None:
        return self._bfs(dst_kme, set())

    def disjoint_paths(self, dst_kme: int, n: int, *, need_blocks: int = 0) -> list[tuple[int, ...]]:
        """The direct link first (if any), then greedy shortest paths avoiding the KMEs already used:
        good enough for the small graphs of these tests."""
        paths: list[tuple[int, ...]] = []
        if dst_kme in self.adj.get(self.me, ()) and frozenset((self.me, dst_kme)) not in self.down:
            paths.append((self.me, dst_kme))
        banned: set[int] = set()
        while len(paths) < n:
            path = self._bfs(dst_kme, banned, direct=False)
            if path is None:
                break
            paths.append(path)
            banned |= set(path[1:-1])
        return paths[:n]

    def usable(self, path: Sequence[int]) -> bool:
        return all(frozenset(p) not in self.down for p in itertools.pairwise(path))


@dataclass
class Sent:
    sender: int
    receiver: int
    body: bytes
    tag: bytes
    status: int = 0


@dataclass
class Net:
    tmp: Path
    links: list[tuple[int, int]]
    saes: dict[int, int]  # SAE ID -> KME ID
    services: dict[int, KmeService] = field(default_factory=dict)
    routers: dict[int, StaticRouter] = field(default_factory=dict)
    streams: dict[tuple[int, int], bytes] = field(default_factory=dict)
    sent: list[Sent] = field(default_factory=list)
    # (sender, receiver, body, tag) -> (body, tag): change a message on its way (None: deliver as is)
    tamper: Callable[[int, int, bytes, bytes], tuple[bytes, bytes]] | None = None
    down: set[int] = field(default_factory=set)  # KMEs that answer nothing (a network failure)

    def neighbours(self, kme: int) -> list[int]:
        return sorted({b if a == kme else a for a, b in self.links if kme in (a, b)})

    def open(self, kme: int, relay: RelaySettings | None = None, **settings: object) -> KmeService:
        store = open_store(f"sqlite://{self.tmp / f'kme{kme}.sqlite3'}")
        entries = {s: SaeEntry(s, k) for s, k in self.saes.items() if k == kme or k in self.neighbours(kme)}
        router = self.routers.setdefault(kme, StaticRouter(kme, self.links, self.saes))
        svc = KmeService(
            ServiceSettings(kme_id=kme, peer_timeout=2.0, relay=relay or RelaySettings(), **settings),  # type: ignore[arg-type]
            store,
            entries,
            Transport(self, kme),
            [*self.neighbours(kme), kme],
            router=router,
        )
        self.services[kme] = svc
        return svc

    async def feed(self, a: int, b: int, nbytes: int) -> bytes:
        """Identical key material on both ends of link a-b."""
        data = os.urandom(nbytes)
        key = (min(a, b), max(a, b))
        old = self.streams.get(key, b"")
        self.streams[key] = old + data
        name = f"{len(old):012d}.key"
        digest = hashlib.sha256(data).hexdigest()
        for kme, peer in ((a, b), (b, a)):
            await self.services[kme].store.import_file(peer, name, data, digest, BS, local=False)
        return data

    def block(self, a: int, b: int, seq: int) -> bytes:
        stream = self.streams[(min(a, b), max(a, b))]
        return stream[seq * BS : (seq + 1) * BS]

    async def close(self) -> None:
        for svc in self.services.values():
            await svc.close()


class Transport:
    def __init__(self, net: Net, me: int) -> None:
        self.net = net
        self.me = me

    async def reserve(self, peer_kme_id: int, reservation: Reservation) -> None:
        if peer_kme_id in self.net.down:
            raise PeerUnavailable("down")
        try:
            await self.net.services[peer_kme_id].accept_reservation(self.me, reservation)
        except BlocksTakenError:
            raise PeerRejected("blocks used") from None
        except UncollectedQuotaError as exc:
            raise PeerQuotaExceeded(exc.message) from None
        except KmeError as exc:
            raise PeerUnavailable(exc.message) from None

    async def relay(self, peer_kme_id: int, body: bytes, tag: bytes, timeout: float) -> HopReply:
        if self.net.tamper is not None:
            body, tag = self.net.tamper(self.me, peer_kme_id, body, tag)
        record = Sent(self.me, peer_kme_id, body, tag)
        self.net.sent.append(record)
        if peer_kme_id in self.net.down:
            raise PeerUnavailable("down")
        try:
            async with asyncio.timeout(timeout):
                reply = await self.net.services[peer_kme_id].accept_relay(
                    self.me, body, base64.b64encode(tag).decode()
                )
        except KmeError as exc:
            record.status = exc.status
            return HopReply(exc.status, json.dumps(exc.to_json()).encode())
        except TimeoutError:
            raise PeerUnavailable("timeout") from None
        record.status = reply.status
        return reply


async def chain(tmp: Path, kmes: Sequence[int], *, stock: int = 32 * 4096, **settings: object) -> Net:
    """A chain of KMEs, SAE <kme>001 on each, ``stock`` bytes on every link."""
    links = list(itertools.pairwise(kmes))
    return await network(tmp, links, stock=stock, **settings)


async def network(
    tmp: Path,
    links: Sequence[tuple[int, int]],
    *,
    stock: int = 32 * 4096,
    saes: dict[int, int] | None = None,
    relay: RelaySettings | None = None,
    **settings: object,
) -> Net:
    kmes = sorted({k for link in links for k in link})
    net = Net(tmp, list(links), saes or {k * 1000 + 1: k for k in kmes})
    for kme in kmes:
        net.open(kme, relay, **settings)
    for a, b in links:
        await net.feed(a, b, stock)
    return net
