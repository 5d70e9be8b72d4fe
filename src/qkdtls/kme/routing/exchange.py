"""The link-state exchange: adverts to and from the peer KMEs over the inter-KME interface (the adapter).

Every ``hello_interval`` this KME reads its links' free blocks from the store (two counter reads per link,
no scan), lets the database decide whether its advert changed (``LinkStateDb.originate``), and wakes one
sender per peer. A sender posts ``{"version": 1, "adverts": [...]}`` to ``POST /kme/v1/link-state``: this
KME's own advert first (the hello), then whatever the database asked to flood to that peer. Adverts wait in
a per-peer outbox holding the newest advert per origin (bounded by the number of KMEs), one request is in
flight per peer, at least ``MIN_SEND_GAP`` apart, each bounded by ``dead_interval``; a slow or dead peer
delays only its own outbox. A request that fails puts its adverts back (unless newer ones are queued).

Callee side (:meth:`LinkStateExchange.handle`): the caller must present the client certificate of a
configured peer (401 otherwise), stay within ``MAX_BYTE_RATE`` (429), and send a batch the decoder and
the database accept; malformed, oversized, looping, misrouted or replayed batches are answered 400 with an
ETSI-style ``{"message", "details"}`` body and change nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qkdtls.http11.client import HttpClient, HttpClientError
from qkdtls.http11.server import Request, Response
from qkdtls.http11.server import Router as HttpRouter
from qkdtls.kme.auth import IdentityMap, client_context, peer_certificate
from qkdtls.kme.config import Peer
from qkdtls.kme.errors import BadRequestError, KmeError, UnauthorizedError, UnavailableError
from qkdtls.kme.quotas import RateLimit, TokenBucket
from qkdtls.kme.routes import json_response, parse_json_body
from qkdtls.kme.routing.lsa import (
    BATCH_OVERHEAD,
    MAX_BATCH,
    MAX_BODY_BYTES,
    Advert,
    AdvertError,
    StaleAdvert,
    decode_batch,
    encode_advert,
    join_batch,
)
from qkdtls.kme.routing.lsdb import LinkStateDb, NotANeighbour
from qkdtls.kme.store import KeyStore
from qkdtls.logs import LogLimiter

log = logging.getLogger("qkdtls.kme.routing")

LINK_STATE_PATH = "/kme/v1/link-state"
MSG_NOT_A_PEER = "the client certificate does not identify a peer KME of this KME"
# A sender waits this long between two requests to one peer: adverts arriving meanwhile travel together.
MIN_SEND_GAP = 0.02
# What one peer may make this KME parse: bytes per second (a request counts at least REQUEST_COST bytes),
# far above what an honest sender needs (adverts change rarely, MIN_SEND_GAP spaces its requests), and
# bounding the decoding work (about 20 ns a byte) to a few per cent of a core per peer.
MAX_BYTE_RATE = RateLimit(rate=1 << 20, burst=2 * MAX_BODY_BYTES)
REQUEST_COST = 4096

StockSource = Callable[[], Awaitable[Mapping[int, tuple[int, int]]]]


class TooManyAdverts(KmeError):
    status = 429


@dataclass
class ExchangeStats:
    """Counters for the metrics (read at scrape time)."""

    received: dict[str, int] = field(default_factory=dict)  # installed, known, ignored
    refused: dict[str, int] = field(default_factory=dict)  # by reason
    sent_requests: int = 0
    failed_requests: int = 0
    originated: int = 0

    def add(self, table: dict[str, int], key: str, n: int = 1) -> None:
        table[key] = table.get(key, 0) + n


@dataclass
class _Outbox:
    peer: Peer
    pending: dict[int, Advert] = field(default_factory=dict)  # origin -> newest advert to send
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    client: HttpClient | None = None
    path: str = LINK_STATE_PATH

    def queue(self, adverts: Sequence[Advert]) -> None:
        for advert in adverts:
            queued = self.pending.get(advert.origin)
            if queued is None or queued.seq < advert.seq:
                self.pending[advert.origin] = advert
        if adverts:
            self.wake.set()


class LinkStateExchange:
    def __init__(
        self,
        db: LinkStateDb,
        peers: Sequence[Peer],
        identities: IdentityMap[int],
        stock: StockSource,
        saes: Sequence[int],
        *,
        name: str = "",
        enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.identities = identities
        self.enabled = enabled
        self.stats = ExchangeStats()
        self._stock = stock
        self._stocks: Mapping[int, tuple[int, int]] = {}
        self._saes = tuple(saes)
        self._name = name
        self._clock = clock
        self._wall = wall_clock
        self._outboxes = {p.kme_id: _Outbox(p) for p in peers if p.kme_id in db.neighbours}
        self._buckets: dict[int, TokenBucket] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._limited = LogLimiter(log)
        self._up: set[int] = set()  # peers up at the last tick (for the peer_down log)

    # -- running ---------------------------------------------------------------------------------------------

    def register(self, router: HttpRouter) -> None:
        router.add("POST", LINK_STATE_PATH, self.handle)

    async def start(self) -> None:
        """Originate the first advert (before the listeners answer) and start the timer and the senders."""
        if not self.enabled:
            return
        await self._read_stock()
        self._originate()
        self._tasks.append(asyncio.create_task(self._tick(), name="kme-link-state"))
        for peer_id, outbox in sorted(self._outboxes.items()):
            outbox.wake.set()  # the first hello at once: a peer already running learns of us now
            self._tasks.append(asyncio.create_task(self._send(outbox), name=f"kme-link-state-{peer_id}"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        for outbox in self._outboxes.values():
            if outbox.client is not None:
                await outbox.client.close()
                outbox.client = None

    async def _tick(self) -> None:
        interval = self.db.timers.hello_interval
        while True:
            await asyncio.sleep(interval)
            try:
                gone = self.db.expire(self._clock())
                if gone:
                    log.info("adverts expired", extra={"event": "routing.expired", "origins": list(gone)})
                await self._read_stock()
                self._originate()
                self._log_liveness()
                for outbox in self._outboxes.values():
                    outbox.wake.set()  # the hello: our own advert goes with every request, new or not
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("link-state timer failed", extra={"event": "routing.tick_failed"})

    def _log_liveness(self) -> None:
        now = self._clock()
        up = {n for n in self.db.neighbours if self.db.neighbour_up(n, now)}
        for peer_id in sorted(self._up - up):
            log.warning(
                "peer KME down: nothing heard within dead_interval",
                extra={"event": "routing.peer_down", "peer_KME_ID": peer_id},
            )
        self._up = up

    async def _read_stock(self) -> None:
        try:
            self._stocks = await self._stock()
        except Exception as exc:  # the store is busy or down: advertise the last known stock
            self._limited(
                logging.WARNING,
                "link stock unavailable",
                {"event": "routing.stock_unavailable", "error": type(exc).__name__},
            )

    def _originate(self) -> None:
        advert = self.db.originate(
            self._clock(), int(self._wall() * 1000), self._stocks, self._saes, self._name
        )
        if advert is not None:
            self.stats.originated += 1
            for outbox in self._outboxes.values():
                outbox.wake.set()  # every request carries our own advert: send the new one now

    # -- caller side -----------------------------------------------------------------------------------------

    def _client(self, outbox: _Outbox) -> HttpClient:
        if outbox.client is None:
            peer = outbox.peer
            url = urllib.parse.urlsplit(peer.url)
            outbox.client = HttpClient(
                url.hostname or "",
                url.port or 443,
                ssl=client_context(peer.client_cert, peer.client_key, peer.ca),
                server_hostname=peer.server_name,
                max_connections=1,
                # A request that takes longer than dead_interval makes us look dead anyway.
                timeout=min(peer.timeout, self.db.timers.dead_interval),
                default_headers={"Content-Type": "application/json"},
            )
            outbox.path = url.path.rstrip("/") + LINK_STATE_PATH
        return outbox.client

    async def _send(self, outbox: _Outbox) -> None:
        me = self.db.me
        while True:
            await outbox.wake.wait()
            outbox.wake.clear()
            own = self.db.own
            if own is None:
                continue
            parts = [encode_advert(own.sent_by(me))]
            size = BATCH_OVERHEAD + len(parts[0])
            taken: list[Advert] = []
            for origin in sorted(outbox.pending):
                if len(parts) == MAX_BATCH:
                    break
                advert = outbox.pending[origin]
                if origin == me:  # our own goes first, in its newest version
                    del outbox.pending[origin]
                    continue
                encoded = encode_advert(advert)
                if size + 1 + len(encoded) > MAX_BODY_BYTES:
                    break
                del outbox.pending[origin]
                taken.append(advert)
                parts.append(encoded)
                size += 1 + len(encoded)
            if outbox.pending:
                outbox.wake.set()  # the rest goes in the next request
            try:
                await self._post(outbox, join_batch(parts))
            except asyncio.CancelledError:
                raise
            except Exception:
                outbox.queue(taken)  # try again with the next hello, unless newer ones come first
                outbox.wake.clear()
            await asyncio.sleep(MIN_SEND_GAP)

    async def _post(self, outbox: _Outbox, body: bytes) -> None:
        peer_id = outbox.peer.kme_id
        self.stats.sent_requests += 1
        try:
            client = self._client(outbox)
            response = await client.request("POST", outbox.path, body)
        except (HttpClientError, TimeoutError, OSError, ssl.SSLError) as exc:
            self.stats.failed_requests += 1
            self._limited(
                logging.INFO,
                "peer KME unreachable for link state",
                {"event": "routing.peer_unreachable", "peer_KME_ID": peer_id, "error": type(exc).__name__},
            )
            raise
        if response.status == 200:
            return
        self.stats.failed_requests += 1
        doc = _json(response.body)
        details = doc.get("details") if isinstance(doc, dict) else None
        for item in details if isinstance(details, list) else []:
            # Our own advert is older than one the peer holds: we restarted with a clock that went back.
            if isinstance(item, dict) and item.get("origin") == self.db.me:
                known = item.get("known_seq")
                if isinstance(known, int) and not isinstance(known, bool) and 0 <= known < 2**63 - 1:
                    self.db.raise_seq(known)
                    self._originate()
        message = doc.get("message") if isinstance(doc, dict) else None
        self._limited(
            logging.WARNING,
            "peer KME refused link state",
            {
                "event": "routing.peer_refused",
                "peer_KME_ID": peer_id,
                "status": response.status,
                "reason": str(message)[:200],
            },
        )
        raise HttpClientError(f"KME {peer_id} answered {response.status}")

    # -- callee side -----------------------------------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        caller = self.identities.lookup(peer_certificate(request))
        if caller is None:
            self.stats.add(self.stats.refused, "not_a_peer")
            raise UnauthorizedError(MSG_NOT_A_PEER)
        if not self.enabled:
            raise UnavailableError("the link-state exchange is off at this KME")
        now = self._clock()
        bucket = self._buckets.get(caller)
        if bucket is None:
            bucket = self._buckets[caller] = TokenBucket(MAX_BYTE_RATE, now)
        if bucket.wait_for(max(REQUEST_COST, min(len(request.body), MAX_BODY_BYTES)), now) > 0:
            self.stats.add(self.stats.refused, "rate")
            raise TooManyAdverts(f"too many link-state requests from KME {caller}")
        try:
            adverts = decode_batch(request.body)
            accepted = self.db.receive(caller, adverts, now)
        except NotANeighbour as exc:
            self.stats.add(self.stats.refused, "not_a_peer")
            raise UnauthorizedError(str(exc)) from None
        except StaleAdvert as exc:
            self._refused(caller, "stale", exc)
            raise BadRequestError(str(exc), [{"origin": exc.origin, "known_seq": exc.known_seq}]) from None
        except AdvertError as exc:
            self._refused(caller, type(exc).__name__, exc)
            raise BadRequestError(str(exc)) from None
        stats = self.stats
        stats.add(stats.received, "installed", len(accepted.installed))
        stats.add(stats.received, "known", accepted.known)
        stats.add(stats.received, "ignored", accepted.ignored)
        for peer_id, adverts_out in accepted.flood.items():
            outbox = self._outboxes.get(peer_id)
            if outbox is not None:
                outbox.queue(adverts_out)
        if accepted.came_up:
            log.info("peer KME up", extra={"event": "routing.peer_up", "peer_KME_ID": caller})
            self._up.add(caller)
            self._originate()  # our link to it is up now
            outbox = self._outboxes.get(caller)
            if outbox is not None:
                outbox.queue(self.db.sync(caller))
                outbox.wake.set()
        return json_response(
            {"installed": len(accepted.installed), "known": accepted.known, "ignored": accepted.ignored}
        )

    def _refused(self, caller: int, reason: str, exc: Exception) -> None:
        self.stats.add(self.stats.refused, reason)
        self._limited(
            logging.WARNING,
            "link-state request refused",
            {"event": "routing.refused", "peer_KME_ID": caller, "reason": str(exc)[:200]},
        )


def _json(body: bytes) -> Any:
    try:
        return parse_json_body(body)
    except BadRequestError:
        return None


def store_stock(
    store: KeyStore, kme_id: int, peers: Sequence[int], direction_of: Callable[[int, int], int]
) -> StockSource:
    """Reads, per peer, (free blocks this KME draws, free blocks the peer draws) from the store's counters."""

    async def read() -> dict[int, tuple[int, int]]:
        out: dict[int, tuple[int, int]] = {}
        for peer in peers:
            mine = direction_of(kme_id, peer)
            out[peer] = (await store.free_blocks(peer, mine), await store.free_blocks(peer, 1 - mine))
        return out

    return read
