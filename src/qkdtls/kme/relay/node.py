"""The relay node: the adapter that drives the key store and the inter-KME transport for relayed keys.

Roles (docs/design.md, network relay):

- **origin** (the master SAE's KME): plans the path(s), takes the key (or the shares) from its first links'
  material or the OS CSPRNG, and hands one item per path to the outbox of the path's first neighbour. An
  outbox batches the items of concurrent requests into one hop message per neighbour and mode: one MAC, one
  commit. Every block a message names is deleted durably before the message leaves (burn before send).
- **intermediate** (nothing in the message ends here): checks the message (route, blocks), reads the named
  blocks, verifies the tag and opens the items, re-encrypts each under a pad of the next link taken from
  that link's pool (deleted durably before it was handed out, as at the origin) and forwards at once; the
  commit that consumes the named blocks runs while the next hops work, and the caller is answered with the
  next hop's results only after it. A message that also ends here is handled in one transaction instead
  (holds for the next hops, consumption and delivery together).
- **destination**: in one transaction consumes what the message named and records the keys (or shares) for
  the local slaves, then answers 200.

Answers to accepted messages are authenticated with the second one-time key the message named. Anything
that fails leaves every consumed block consumed: a half-finished relay burns material, never reuses it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol

from qkdtls.kme.errors import BadRequestError, BlocksTakenError, PeerUnavailable, UnavailableError
from qkdtls.kme.faults import Faults
from qkdtls.kme.relay import sharing
from qkdtls.kme.relay.hop import (
    Opened,
    check_message,
    key_block_count,
    mac_block_count,
    open_answer,
    open_message,
    pad_block_count,
    seal,
    seal_answer,
    sender_direction,
    with_pad,
)
from qkdtls.kme.relay.ledger import Ledger
from qkdtls.kme.relay.messages import (
    STORED,
    HopMessage,
    ItemResult,
    RelayItem,
    Share,
    answer_message,
    decode_message,
)
from qkdtls.kme.relay.otp import TAG_BYTES
from qkdtls.kme.relay.policy import DEFAULT_MAX_HOPS, RelayChoice, RelaySettings
from qkdtls.kme.relay.pool import SpentPool
from qkdtls.kme.relay.stats import RelayStats
from qkdtls.kme.store import (
    DELIVERED,
    EXISTS,
    INCONSISTENT,
    QUOTA,
    Block,
    BlocksTaken,
    KeyStore,
    RelayDecision,
    RelayIntake,
    RelayKeys,
    RelayShares,
    ShortStock,
    StoredKey,
    StoreError,
)

log = logging.getLogger("qkdtls.kme.relay")

# Items per hop message and an estimate of its body size: far below the inter-KME body limit (4 MiB).
MAX_ITEMS = 64
MAX_MESSAGE_BYTES = 1 << 20
# Hop messages on the wire at once per (path, mode) from one origin; later items queue for the next. A
# second sender starts only once MIN_NEXT_BATCH items wait (then both drain the outbox until it is empty):
# every message costs each KME of the path a commit and two HTTPS exchanges whatever it carries, so a
# second message only pays when load has built up. Measured (bench.relay, 3 hops, concurrency 8, four
# alternating pairs): 1,655-1,706 cycles/s against 1,540-1,583 with one message in flight.
MAX_IN_FLIGHT = 2
MIN_NEXT_BATCH = 4
# What a hop keeps for itself of the time budget it was given, so its answer arrives before the caller's
# timeout: 5 % of it, at least this many seconds.
MIN_MARGIN = 0.02
ANSWER_STATUSES = frozenset({400, 401, 409, 429, 503})


@dataclass(frozen=True, slots=True, repr=False)
class HopReply:
    """What the next hop answered: its status, body and ``QKD-Relay-Tag`` header (200 only)."""

    status: int
    body: bytes
    tag: bytes | None = None

    def __repr__(self) -> str:
        return f"HopReply(status={self.status})"


class RelayTransport(Protocol):
    """Sends one hop message to a neighbour; PeerUnavailable for network errors and timeouts."""

    async def relay(self, peer_kme_id: int, body: bytes, tag: bytes, timeout: float) -> HopReply: ...


class Router(Protocol):
    """What the relay needs of ``qkdtls.kme.routing.Router`` (and its ``max_hops``, if it has one)."""

    def kme_of(self, sae_id: int) -> int | None: ...
    def path(self, dst_kme: int, *, need_blocks: int = 0) -> tuple[int, ...] | None: ...
    def disjoint_paths(self, dst_kme: int, n: int, *, need_blocks: int = 0) -> list[tuple[int, ...]]: ...
    def usable(self, path: Sequence[int]) -> bool: ...


class DirectLinks:
    """The router of a KME without routing: a destination is reachable only over a direct link."""

    max_hops = DEFAULT_MAX_HOPS

    def __init__(self, kme_id: int, neighbours: frozenset[int]) -> None:
        self.kme_id = kme_id
        self.neighbours = neighbours

    def kme_of(self, sae_id: int) -> int | None:
        return None

    def path(self, dst_kme: int, *, need_blocks: int = 0) -> tuple[int, ...] | None:
        return (self.kme_id, dst_kme) if dst_kme in self.neighbours else None

    def disjoint_paths(self, dst_kme: int, n: int, *, need_blocks: int = 0) -> list[tuple[int, ...]]:
        path = self.path(dst_kme)
        return [path] if path is not None else []

    def usable(self, path: Sequence[int]) -> bool:
        return True


@dataclass(frozen=True, slots=True)
class Destination:
    """What the destination KME's service decided about an item before any material is consumed."""

    pending: tuple[int, ...]  # the slaves of this KME: the keys wait for them
    max_uncollected: int
    expires_at: float


class RelayFailed(UnavailableError):
    """A relay that could not deliver (503 to the master SAE); ``reason`` "uncollected" for the slave KME's
    quota on keys not collected, "no_path" when nothing was consumed for lack of a path, else "relay"."""

    def __init__(self, message: str, reason: str = "relay") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Plan:
    """How the keys reach one destination KME: the mode and the path(s), this KME first."""

    destination: int
    choice: RelayChoice
    paths: tuple[tuple[int, ...], ...]


@dataclass(slots=True, repr=False)
class _Entry:
    """An item waiting in an outbox: blocks form (``blocks``: taken from the link's pool, already deleted
    from the store) or a value to send under a pad."""

    item: RelayItem
    value: bytes | None
    blocks: list[Block]
    deadline: float
    future: asyncio.Future[ItemResult]
    claimed: bool = False  # taken into a batch: the outbox sends its blocks or gives them back


@dataclass(slots=True)
class _Outbox:
    waiting: list[_Entry] = field(default_factory=list)
    senders: int = 0


def _whole(status: int, message: str, count: int) -> list[ItemResult]:
    return [ItemResult(status, message)] * count


class RelayNode:
    def __init__(
        self,
        *,
        kme_id: int,
        block_size: int,
        settings: RelaySettings,
        store: KeyStore,
        transport: RelayTransport | None,
        router: Router,
        neighbours: frozenset[int],
        check_destination: Callable[[RelayItem], Destination],
        faults: Faults | None = None,
        ledger: Ledger | None = None,
    ) -> None:
        self.kme_id = kme_id
        self.block_size = block_size
        self.settings = settings
        self.store = store
        self.transport = transport
        self.router = router
        # The bound on path length is the network's ([network] max_hops): every KME checks the same one.
        self.max_hops = int(getattr(router, "max_hops", DEFAULT_MAX_HOPS))
        self.neighbours = neighbours
        self.check_destination = check_destination
        self.faults = faults or Faults()
        self.ledger = ledger if ledger is not None else Ledger(kme_id)
        self.stats = RelayStats(kme_id)
        self._outboxes: dict[tuple[tuple[int, ...], str], _Outbox] = {}
        self._pools: dict[int, SpentPool] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        # (sender, block) named by messages this KME is passing on and has not committed yet.
        self._passing: set[tuple[int, int]] = set()
        self._closed = False

    # -- planning (origin) -----------------------------------------------------------------------------------

    def _need(self, number: int, size: int) -> int:
        """Blocks a relay of ``number`` keys takes on each link it crosses (key or pad, plus MAC keys)."""
        return number * key_block_count(size, self.block_size) + mac_block_count(self.block_size)

    def _checked(self, path: Sequence[int] | None, destination: int) -> tuple[int, ...] | None:
        if path is None or len(path) < 2 or path[0] != self.kme_id or path[-1] != destination:
            return None
        if len(set(path)) != len(path) or len(path) - 1 > self.max_hops:
            return None
        if path[1] not in self.neighbours or not self.router.usable(path):
            return None
        return tuple(path)

    def plan(self, destination: int, choice: RelayChoice, number: int, size: int) -> Plan:
        """The path(s) to ``destination``; RelayFailed (nothing consumed) when there are not enough."""
        need = self._need(number, size)
        if choice.mode == "spread":
            found = self.router.disjoint_paths(destination, choice.paths, need_blocks=need)
            paths = [p for p in (self._checked(p, destination) for p in found) if p is not None]
            if len(set(paths)) == choice.paths and _disjoint(paths):
                return Plan(destination, choice, tuple(paths))
            if not choice.fallback:
                raise RelayFailed(
                    f"spread relay to KME {destination} needs {choice.paths} node-disjoint paths; "
                    f"{len(paths)} available now",
                    "no_path",
                )
            choice = choice.trusted()
        path = self._checked(self.router.path(destination, need_blocks=need), destination)
        if path is None:
            raise RelayFailed(f"no path to KME {destination} (within {self.max_hops} hops)", "no_path")
        return Plan(destination, choice, (path,))

    # -- origin ----------------------------------------------------------------------------------------------

    async def originate(
        self,
        master: int,
        slaves: tuple[int, ...],
        size: int,
        number: int,
        plans: Sequence[Plan],
        make_id: Callable[[bytes], str],
    ) -> list[tuple[str, bytes]]:
        """Relay ``number`` keys of ``size`` bits to every planned destination; the (key ID, key) pairs once
        every destination stored them durably. RelayFailed otherwise (what was spent stays spent)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.timeout
        nbytes = size // 8
        taken: list[tuple[int, list[Block]]] = []
        try:
            key, specs = await self._material(plans, number, size, taken)
        except BaseException:
            for link, blocks in taken:  # named in nothing sent yet: back to the pool, not burnt
                self._pool(link).give_back(blocks)
            raise
        key_ids = tuple(make_id(key[i * nbytes : (i + 1) * nbytes]) for i in range(number))
        # From here on each entry owns its blocks: the origin gives them back until an outbox claims the
        # entry, the outbox after that (it sends them, or gives them back if it fails before sending).
        entries: list[tuple[Plan, _Entry]] = []
        for plan, index, share, blocks, value in specs:
            item = RelayItem(
                relay_id=str(uuid.uuid4()),
                mode=plan.choice.mode,
                path=plan.paths[index],
                master_sae=master,
                slaves=slaves,
                size=size,
                key_ids=key_ids,
                share=share,
                blocks=tuple(b.seq for b in blocks) if blocks else (),
            )
            entries.append((plan, _Entry(item, value, blocks or [], deadline, loop.create_future())))
        try:
            for _, entry in entries:
                self._submit(entry)
            async with asyncio.timeout(max(deadline - loop.time(), 0.001) + 1.0):
                results = await asyncio.gather(*(e.future for _, e in entries))
        except TimeoutError:
            results = [
                e.future.result() if e.future.done() else ItemResult(503, "relay timed out")
                for _, e in entries
            ]
        finally:
            for _, entry in entries:
                if not entry.future.done():
                    entry.future.cancel()
                if not entry.claimed and entry.blocks:
                    self._pool(entry.item.path[1]).give_back(entry.blocks)
        failure = self._verdict(plans, [plan for plan, _ in entries], results)
        for plan in plans:
            self.stats.relay(plan.choice.mode, failure is None, plan.paths, number)
        if failure is not None:
            raise failure
        self.faults.hit("relay-kill-before-answer")
        return [(key_ids[i], key[i * nbytes : (i + 1) * nbytes]) for i in range(number)]

    async def _material(
        self, plans: Sequence[Plan], number: int, size: int, taken: list[tuple[int, list[Block]]]
    ) -> tuple[bytes, list[tuple[Plan, int, Share | None, list[Block] | None, bytes | None]]]:
        """The keys (concatenated) and, per path, what its first hop carries: (plan, path index, share,
        blocks of the first link | None, value to send under a pad | None).

        The first destination's keys come from QKD material where the mode allows (trusted: the first link's
        blocks; XOR spread: the XOR of every path's first-link blocks); Shamir sharing draws the key and the
        coefficients from the OS CSPRNG. Later destinations of a multicast get the same keys under pads."""
        bpk = key_block_count(size, self.block_size)
        nbytes = size // 8
        key: bytes | None = None
        specs: list[tuple[Plan, int, Share | None, list[Block] | None, bytes | None]] = []

        async def hold(link: int) -> tuple[list[Block], bytes]:
            try:
                blocks = await self._pool(link).take(number * bpk)
            except ShortStock:
                raise RelayFailed(f"not enough key material on the link to KME {link}", "stock") from None
            except StoreError:
                raise RelayFailed("key store unavailable") from None
            taken.append((link, blocks))
            per_key = [
                b"".join(b.data for b in blocks[i * bpk : (i + 1) * bpk])[:nbytes] for i in range(number)
            ]
            return blocks, b"".join(per_key)

        for plan in plans:
            choice = plan.choice
            if choice.mode == "trusted":
                if key is None:
                    blocks, key = await hold(plan.paths[0][1])
                    specs.append((plan, 0, None, blocks, None))
                else:
                    specs.append((plan, 0, None, None, key))
                continue
            n, k = len(plan.paths), choice.threshold
            if choice.scheme == "xor":
                drawn = [await hold(p[1]) for p in plan.paths[: n if key is None else n - 1]]
                for index, (blocks, _) in enumerate(drawn):
                    specs.append((plan, index, Share("xor", index + 1, n, n), blocks, None))
                values = [v for _, v in drawn]
                if key is None:
                    key = sharing.xor_combine(values)
                else:
                    specs.append(
                        (plan, n - 1, Share("xor", n, n, n), None, sharing.xor_complete(key, values))
                    )
                continue
            if key is None:
                key = os.urandom(number * nbytes)
            for index, (x, value) in enumerate(sharing.shamir_split(key, k, n)):
                specs.append((plan, index, Share("shamir", x, k, n), None, value))
        assert key is not None
        return key, specs

    def _verdict(
        self, plans: Sequence[Plan], owners: Sequence[Plan], results: Sequence[ItemResult]
    ) -> RelayFailed | None:
        by_plan: dict[int, list[ItemResult]] = {}
        for plan, result in zip(owners, results, strict=True):
            by_plan.setdefault(plan.destination, []).append(result)
        for plan in plans:
            got = by_plan.get(plan.destination, [])
            ok = sum(1 for r in got if r.ok)
            needed = plan.choice.threshold if plan.choice.mode == "spread" else 1
            refused = [r for r in got if not r.ok]
            if ok >= needed and not any(r.status == 409 for r in refused):
                continue
            first = refused[0] if refused else ItemResult(503, "no answer")
            reason = "uncollected" if any(r.status == 429 for r in refused) else "relay"
            return RelayFailed(f"relay to KME {plan.destination} failed: {first.message}", reason)
        return None

    # -- outboxes (origin) ---------------------------------------------------------------------------------

    def _pool(self, peer: int) -> SpentPool:
        pool = self._pools.get(peer)
        if pool is None:
            pool = self._pools[peer] = SpentPool(
                self.store, peer, sender_direction(self.kme_id, peer), self.ledger
            )
        return pool

    def _submit(self, entry: _Entry) -> None:
        if self._closed:
            entry.future.set_result(ItemResult(503, "the KME is shutting down"))
            return
        peer = entry.item.path[1]
        key = (entry.item.path, entry.item.mode)
        box = self._outboxes.setdefault(key, _Outbox())
        box.waiting.append(entry)
        if box.senders == 0 or (box.senders < MAX_IN_FLIGHT and len(box.waiting) >= MIN_NEXT_BATCH):
            box.senders += 1
            task = asyncio.get_running_loop().create_task(
                self._drain(peer, key, box), name=f"kme-relay-{peer}"
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _drain(self, peer: int, key: tuple[tuple[int, ...], str], box: _Outbox) -> None:
        try:
            await asyncio.sleep(0)  # let the items of this loop iteration join the batch
            while box.waiting:
                batch: list[_Entry] = []
                size = 0
                while box.waiting and len(batch) < MAX_ITEMS:
                    entry = box.waiting[0]
                    cost = entry.item.value_bytes * 2 + 512
                    if batch and size + cost > MAX_MESSAGE_BYTES:
                        break
                    del box.waiting[0]
                    if not entry.future.done():
                        entry.claimed = True
                        batch.append(entry)
                        size += cost
                if not batch:
                    continue
                try:
                    results = await self._send_batch(peer, batch)
                except Exception:
                    log.exception("relay batch failed", extra={"event": "relay.failed", "peer_KME_ID": peer})
                    results = _whole(503, "internal error of the KME", len(batch))
                for entry, result in zip(batch, results, strict=True):
                    if not entry.future.done():
                        entry.future.set_result(result)
        finally:
            box.senders -= 1
            if not box.senders and not box.waiting and self._outboxes.get(key) is box:
                del self._outboxes[key]

    async def _send_batch(self, peer: int, batch: list[_Entry]) -> list[ItemResult]:
        loop = asyncio.get_running_loop()
        mode = batch[0].item.mode
        bs = self.block_size
        pads = [pad_block_count(e.item, bs) if e.value is not None else 0 for e in batch]
        mac_count = mac_block_count(bs)
        named = [seq for e in batch for seq in e.item.blocks]
        pool = self._pool(peer)
        try:
            # Burn before send: the pool's blocks were deleted durably before it handed them out.
            fresh = await pool.take(mac_count + sum(pads))
        except (ShortStock, StoreError, RuntimeError) as exc:
            for entry in batch:
                pool.give_back(entry.blocks)
            if isinstance(exc, ShortStock):
                return _whole(503, f"not enough key material on the link to KME {peer}", len(batch))
            return _whole(503, "key store unavailable", len(batch))
        mac, rest = fresh[:mac_count], fresh[mac_count:]
        items = []
        offset = 0
        for entry, count in zip(batch, pads, strict=True):
            if entry.value is None:
                items.append(entry.item)
            else:
                items.append(with_pad(entry.item, entry.value, rest[offset : offset + count]))
                offset += count
        self._account(peer, mode, mac, rest, named, ledger=False)  # the pool wrote the ledger at its refill
        self.faults.hit("relay-kill-after-spend")
        budget = min(e.deadline for e in batch) - loop.time()
        if budget <= 0:
            return _whole(503, "relay timed out", len(batch))
        sealed = seal(self.kme_id, peer, mac, int(budget * 1000) or 1, items)
        return await self._exchange(peer, sealed.body, sealed.tag, sealed.answer_key, len(items), budget)

    def _account(
        self,
        peer: int,
        mode: str,
        mac: Sequence[Block],
        pads: Sequence[Block],
        keys: Sequence[int],
        *,
        ledger: bool = True,
    ) -> None:
        bs = self.block_size
        self.stats.consume(peer, "mac", mode, len(mac) * bs)
        self.stats.consume(peer, "pad", mode, len(pads) * bs)
        self.stats.consume(peer, "key", mode, len(keys) * bs)
        if ledger and self.ledger:
            self.ledger.spent(
                [(peer, "mac", b.seq) for b in mac]
                + [(peer, "pad", b.seq) for b in pads]
                + [(peer, "key", seq) for seq in keys]
            )

    async def _exchange(
        self, peer: int, body: bytes, tag: bytes, answer_key: Any, count: int, timeout: float
    ) -> list[ItemResult]:
        if self.transport is None:
            return _whole(503, f"no connection to KME {peer} is configured", count)
        try:
            reply = await self.transport.relay(peer, body, tag, timeout)
        except (PeerUnavailable, TimeoutError) as exc:
            return _whole(503, f"KME {peer} unavailable ({exc})", count)
        if reply.status == 200:
            results = open_answer(answer_key, reply.body, reply.tag or b"", count)
            if results is None:
                log.warning(
                    "relay answer failed authentication",
                    extra={"event": "relay.bad_answer", "peer_KME_ID": peer},
                )
                return _whole(503, f"the answer of KME {peer} failed authentication", count)
            return results
        status = reply.status if reply.status in ANSWER_STATUSES else 503
        return _whole(status, f"KME {peer} answered {reply.status}: {answer_message(reply.body)}", count)

    # -- receiving (intermediate and destination) ------------------------------------------------------------

    async def receive(self, caller: int, body: bytes, tag_text: str | None) -> HopReply:
        """A hop message from neighbour ``caller``: a 200 HopReply with the per-item results, or a KmeError
        for the whole message (400 malformed/looping/misrouted/not authentic, 409 blocks not free, 503)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        if self.ledger:
            self.ledger.received(caller, body)
        tag = _parse_tag(tag_text)
        if caller not in self.neighbours:
            self.stats.hops["malformed"] += 1
            raise BadRequestError(f"KME {caller} has no link with KME {self.kme_id}")
        try:
            msg = decode_message(body)
            routes = check_message(
                msg,
                caller,
                self.kme_id,
                neighbours=self.neighbours,
                max_hops=self.max_hops,
                block_size=self.block_size,
            )
            destinations = {
                i: self.check_destination(item)
                for i, (item, route) in enumerate(zip(msg.items, routes, strict=True))
                if route.final
            }
        except BadRequestError:
            self.stats.hops["malformed"] += 1
            raise
        groups: dict[tuple[int, str], list[int]] = {}
        for i, route in enumerate(routes):
            if route.next is not None:
                groups.setdefault((route.next, msg.items[i].mode), []).append(i)
        for nxt, _ in groups:
            if not self.router.usable((self.kme_id, nxt)):
                self.stats.hops["unavailable"] += 1
                raise UnavailableError(f"the link from KME {self.kme_id} to KME {nxt} is down")
        if not destinations:
            return await self._pass_on(caller, msg, body, tag, groups, started)
        held: dict[tuple[int, str], list[Block]] = {}
        try:
            for (nxt, mode), indexes in groups.items():
                count = mac_block_count(self.block_size) + sum(
                    pad_block_count(msg.items[i], self.block_size) for i in indexes
                )
                held[(nxt, mode)] = await self.store.hold_blocks(
                    nxt, sender_direction(self.kme_id, nxt), count
                )
        except (ShortStock, StoreError):
            await self._release_held(held)
            self.stats.hops["unavailable"] += 1
            raise UnavailableError("not enough key material to forward this relay message") from None
        spend: dict[int, list[int]] = {}
        for (nxt, _), blocks in held.items():
            spend.setdefault(nxt, []).extend(b.seq for b in blocks)
        intake = RelayIntake(caller, sender_direction(caller, self.kme_id), msg.named_blocks(), spend)

        def decide(data: dict[int, bytes]) -> RelayDecision | None:
            opened = open_message(msg, body, tag, data, self.block_size)
            if opened is None:
                return None
            deliveries = [self._delivery(msg.items[i], opened.values[i], d) for i, d in destinations.items()]
            return RelayDecision(deliveries, opened)

        try:
            decision, outcomes = await self.store.relay_accept(intake, decide)
        except BlocksTaken:
            await self._release_held(held)
            raise self._replayed() from None
        except StoreError:
            await self._release_held(held)
            raise self._store_down() from None
        if decision is None:
            await self._release_held(held)
            self._tampered(caller, intake)
        self.stats.hops["accepted"] += 1
        if self.ledger:
            self.ledger.taken(caller, intake.seqs)
        for (nxt, mode), blocks in held.items():
            mac_count = mac_block_count(self.block_size)
            self._account(nxt, mode, blocks[:mac_count], blocks[mac_count:], ())
        self.faults.hit("relay-kill-after-accept")
        opened: Opened = decision.opened
        results: list[ItemResult] = [STORED] * len(msg.items)
        for i, outcome in zip(destinations, outcomes, strict=True):
            results[i] = self._outcome(msg.items[i], outcome)
        forwarded = await asyncio.gather(*self._forwards(msg, opened.values, groups, held, started))
        _merge(results, groups, forwarded)
        self.faults.hit("relay-kill-after-forward")
        answer, answer_tag = seal_answer(opened.answer_key, results)
        return HopReply(200, answer, answer_tag)

    async def _pass_on(
        self,
        caller: int,
        msg: HopMessage,
        body: bytes,
        tag: bytes,
        groups: Mapping[tuple[int, str], list[int]],
        started: float,
    ) -> HopReply:
        """A message with nothing for this KME: verify and open it with the named blocks as read, forward it
        at once under pads and MAC keys from the pools (deleted durably before they were handed out), and
        commit the consumption of the named blocks while the next hops work. The caller is answered only
        after that commit: a replay then finds the blocks taken, so the answer key signs one answer."""
        loop = asyncio.get_running_loop()
        direction = sender_direction(caller, self.kme_id)
        named = msg.named_blocks()
        intake = RelayIntake(caller, direction, named)
        marks = [(caller, seq) for seq in named]
        if not self._passing.isdisjoint(marks):  # the same blocks in a message still in flight here
            raise self._replayed()
        self._passing.update(marks)
        commit: asyncio.Task[tuple[RelayDecision | None, list[str]]] | None = None
        try:
            try:
                data = await self.store.read_named(caller, direction, named)
            except BlocksTaken:
                raise self._replayed() from None
            except StoreError:
                raise self._store_down() from None
            opened = open_message(msg, body, tag, data, self.block_size)
            if opened is None:
                await self._burn(intake)
            assert opened is not None
            mac_count = mac_block_count(self.block_size)
            taken: dict[tuple[int, str], list[Block]] = {}
            try:
                for (nxt, mode), indexes in groups.items():
                    count = mac_count + sum(pad_block_count(msg.items[i], self.block_size) for i in indexes)
                    taken[(nxt, mode)] = await self._pool(nxt).take(count)
            except (ShortStock, StoreError, RuntimeError):
                for (nxt, _), blocks in taken.items():
                    self._pool(nxt).give_back(blocks)
                self.stats.hops["unavailable"] += 1
                raise UnavailableError("not enough key material to forward this relay message") from None
            for (nxt, mode), blocks in taken.items():  # the pool wrote the ledger at its refill
                self._account(nxt, mode, blocks[:mac_count], blocks[mac_count:], (), ledger=False)
            # The forwards are scheduled first, so that their messages are written before the commit (an
            # fsync, inline on this loop for SQLite) runs.
            forwards = [self._spawn(f) for f in self._forwards(msg, opened.values, groups, taken, started)]

            def decide(got: dict[int, bytes]) -> RelayDecision | None:
                self.faults.hit("relay-kill-before-commit")  # forwarded, the named blocks not yet consumed
                return RelayDecision((), opened) if got == data else None

            commit = loop.create_task(self.store.relay_accept(intake, decide))
            commit.add_done_callback(lambda _: self._passing.difference_update(marks))
            try:
                decision, _ = await asyncio.shield(commit)
            except BlocksTaken:
                raise self._replayed() from None
            except StoreError:
                raise self._store_down() from None
            if decision is None:  # the blocks changed between reading and consuming them: burnt
                self._tampered(caller, intake)
            self.stats.hops["accepted"] += 1
            if self.ledger:
                self.ledger.taken(caller, intake.seqs)
            self.faults.hit("relay-kill-after-accept")
            forwarded = await asyncio.gather(*forwards)
        finally:
            if commit is None:
                self._passing.difference_update(marks)
        results: list[ItemResult] = [STORED] * len(msg.items)
        _merge(results, groups, forwarded)
        self.faults.hit("relay-kill-after-forward")
        answer, answer_tag = seal_answer(opened.answer_key, results)
        return HopReply(200, answer, answer_tag)

    def _forwards(
        self,
        msg: HopMessage,
        values: Sequence[bytes],
        groups: Mapping[tuple[int, str], list[int]],
        material: Mapping[tuple[int, str], list[Block]],
        started: float,
    ) -> list[Coroutine[Any, Any, list[ItemResult]]]:
        """One forward per next KME and mode, within what is left of the message's budget."""
        margin = max(MIN_MARGIN, msg.budget_ms / 1000 * 0.05)
        remaining = msg.budget_ms / 1000 - (asyncio.get_running_loop().time() - started) - margin
        return [
            self._forward(
                nxt,
                [msg.items[i] for i in indexes],
                [values[i] for i in indexes],
                material[(nxt, mode)],
                remaining,
            )
            for (nxt, mode), indexes in groups.items()
        ]

    def _spawn(self, coro: Coroutine[Any, Any, list[ItemResult]]) -> asyncio.Task[list[ItemResult]]:
        """A task the node tracks (cancelled at close) whose failure is logged if nobody awaits it."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)
        return task

    async def _burn(self, intake: RelayIntake) -> None:
        """Consume what a message that failed authentication named (burnt), then refuse it (400)."""
        try:
            await self.store.relay_accept(intake, lambda _: None)
        except BlocksTaken:
            raise self._replayed() from None
        except StoreError:
            raise self._store_down() from None
        self._tampered(intake.link, intake)

    def _replayed(self) -> BlocksTakenError:
        self.stats.hops["replay"] += 1
        return BlocksTakenError("blocks named by this relay message are not free (used already)")

    def _store_down(self) -> UnavailableError:
        self.stats.hops["unavailable"] += 1
        return UnavailableError("key store unavailable")

    def _tampered(self, caller: int, intake: RelayIntake) -> NoReturn:
        self.stats.hops["tampered"] += 1
        log.warning(
            "relay message failed authentication; the blocks it named are burnt",
            extra={"event": "relay.tampered", "peer_KME_ID": caller, "blocks": len(intake.seqs)},
        )
        raise BadRequestError("relay message failed authentication; the blocks it named are burnt")

    async def _forward(
        self, nxt: int, items: list[RelayItem], values: list[bytes], blocks: list[Block], budget: float
    ) -> list[ItemResult]:
        if budget <= 0:
            return _whole(503, f"relay timed out at KME {self.kme_id}", len(items))
        mac_count = mac_block_count(self.block_size)
        mac, pads = blocks[:mac_count], blocks[mac_count:]
        out = []
        offset = 0
        for item, value in zip(items, values, strict=True):
            count = pad_block_count(item, self.block_size)
            out.append(with_pad(item, value, pads[offset : offset + count]))
            offset += count
        sealed = seal(self.kme_id, nxt, mac, int(budget * 1000) or 1, out)
        return await self._exchange(nxt, sealed.body, sealed.tag, sealed.answer_key, len(out), budget)

    def _delivery(self, item: RelayItem, value: bytes, d: Destination) -> RelayKeys | RelayShares:
        nbytes = item.size // 8
        parts = [value[i * nbytes : (i + 1) * nbytes] for i in range(len(item.key_ids))]
        if item.share is None:
            return RelayKeys(
                keys=[StoredKey(k, p) for k, p in zip(item.key_ids, parts, strict=True)],
                master_sae=item.master_sae,
                slaves=item.slaves,
                pending=d.pending,
                size_bits=item.size,
                expires_at=d.expires_at,
                max_uncollected=d.max_uncollected,
            )
        share = item.share
        combine, consistent = _share_functions(share)
        return RelayShares(
            key_ids=item.key_ids,
            values=parts,
            x=share.x,
            k=share.k,
            n=share.n,
            scheme=share.scheme,
            master_sae=item.master_sae,
            slaves=item.slaves,
            pending=d.pending,
            size_bits=item.size,
            expires_at=d.expires_at,
            combine=combine,
            consistent=consistent,
            max_uncollected=d.max_uncollected,
        )

    def _outcome(self, item: RelayItem, outcome: str) -> ItemResult:
        if outcome == DELIVERED:
            return STORED
        if outcome == QUOTA:
            return ItemResult(
                429,
                f"SAE {item.master_sae} has too many keys its slaves have not collected at KME "
                f"{self.kme_id}; retry when they have",
            )
        if outcome == EXISTS:
            return ItemResult(409, f"a key of this relay is already stored at KME {self.kme_id}")
        if outcome == INCONSISTENT:
            log.warning(
                "relayed key shares disagree; key erased",
                extra={"event": "relay.inconsistent", "relay_ID": item.relay_id},
            )
            return ItemResult(409, f"the shares of a key disagree at KME {self.kme_id}: the key is erased")
        return ItemResult(409, f"a share of this relay does not match its siblings at KME {self.kme_id}")

    async def _release_held(self, held: Mapping[tuple[int, str], Sequence[Block]]) -> None:
        for (nxt, _), blocks in held.items():
            await _release(self.store, nxt, [b.seq for b in blocks])

    # -- housekeeping --------------------------------------------------------------------------------------

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        for box in self._outboxes.values():
            for entry in box.waiting:
                if not entry.future.done():
                    entry.future.set_result(ItemResult(503, "the KME is shutting down"))
            box.waiting.clear()
        for pool in self._pools.values():
            await pool.close()
        self.ledger.close()


def _disjoint(paths: Sequence[Sequence[int]]) -> bool:
    """No KME but the two ends appears on two paths."""
    inner = [kme for p in paths for kme in p[1:-1]]
    return len(inner) == len(set(inner))


def _share_functions(
    share: Share,
) -> tuple[Callable[[list[tuple[int, bytes]]], bytes], Callable[[list[tuple[int, bytes]]], bool]]:
    if share.scheme == "xor":
        return (lambda shares: sharing.xor_combine([v for _, v in shares])), (lambda shares: True)
    k = share.k
    return (lambda shares: sharing.shamir_combine(shares[:k])), (
        lambda shares: sharing.shamir_consistent(shares, k)
    )


def _merge(
    results: list[ItemResult],
    groups: Mapping[tuple[int, str], list[int]],
    forwarded: Sequence[list[ItemResult]],
) -> None:
    """Put each forward's per-item results in the places of its items."""
    for indexes, group_results in zip(groups.values(), forwarded, strict=True):
        for i, result in zip(indexes, group_results, strict=True):
            results[i] = result


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("relay forward failed", exc_info=task.exception(), extra={"event": "relay.failed"})


def _parse_tag(text: str | None) -> bytes:
    if text is None:
        raise BadRequestError("relay message: the QKD-Relay-Tag header is missing")
    try:
        tag = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        tag = b""
    if len(tag) != TAG_BYTES:
        raise BadRequestError(f"relay message: QKD-Relay-Tag must be {TAG_BYTES} bytes in base64")
    return tag


async def _release(store: KeyStore, link: int, seqs: list[int]) -> None:
    if not seqs:
        return
    try:
        await asyncio.shield(store.release_blocks(link, seqs))
    except Exception:
        pass  # store down: stale-hold recovery frees them later
