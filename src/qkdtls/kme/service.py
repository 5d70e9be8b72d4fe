"""KmeService: the ETSI GS QKD 014 key logic of one KME, without HTTP.

Lifecycle of a cross-KME key (docs/design.md): the master KME holds blocks of its own direction, asks the
peer to reserve them (the peer commits before answering), then deletes them and answers. The two directions
of a link use disjoint blocks, so concurrent masters on both sides never draw the same block.

Crash safety: a hold lives only as long as the process that made it. A restarted SQLite store frees every
held block (one process owns the file); PostgreSQL frees holds older than ``stale_hold_after``. Freeing is
safe because blocks the peer had already taken are refused by the peer the next time they are offered
(``PeerRejected``) and this service then burns them: a block reaches at most one SAE pair. A key is answered
to the master only after its blocks are deleted here and recorded at the peer, so a crash never delivers a
key twice nor forgets a reservation. A slave's collection commits before its answer, and that slave may
collect the key again within its re-collection window, in case the answer never arrived.

Quotas (``quotas.py``): rate limits per master SAE and SAE pair here, and a cap on keys not yet collected per
master SAE wherever the keys wait (local keys here, cross-KME keys at the peer, which answers 429).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from qkdtls.etsi014.models import (
    MSG_EXT_MANDATORY_UNSUPPORTED,
    MSG_KEYS_NOT_FOUND,
    MSG_SIZE_MULTIPLE_OF_8,
    BadRequest,
    Key,
    KeyContainer,
    KeyRequest,
    SaeInfo,
    Status,
    parse_key_id,
)
from qkdtls.kme import entropy
from qkdtls.kme.errors import (
    BadRequestError,
    BlocksTakenError,
    PeerQuotaExceeded,
    PeerRejected,
    UnauthorizedError,
    UnavailableError,
    UncollectedQuotaError,
)
from qkdtls.kme.faults import FAULT_ENV, Faults
from qkdtls.kme.keyid import REFERENCE_MIN_KEY_SIZE, key_id_factory
from qkdtls.kme.quotas import QuotaRefused, QuotaSettings, RateLimiter
from qkdtls.kme.relay.hop import key_block_count, mac_block_count
from qkdtls.kme.relay.messages import RelayItem
from qkdtls.kme.relay.node import Destination, DirectLinks, HopReply, Plan, RelayFailed, RelayNode, Router
from qkdtls.kme.relay.policy import RelayChoice, RelaySettings, choose, unsupported_mandatory
from qkdtls.kme.relay.prefetch import BufferKey, Prefetcher
from qkdtls.kme.reservation import Reservation, ReservedKey
from qkdtls.kme.store import (
    Block,
    BlocksTaken,
    KeysNotFound,
    KeyStore,
    LostHold,
    MulticastRefused,
    NewKeySpec,
    NotASlave,
    ShortStock,
    StoreError,
    UncollectedQuota,
)

log = logging.getLogger(__name__)

_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1
MAX_RECOLLECT_WINDOW = 3600.0
# Keys erased per transaction by the sweeper. On SQLite a transaction runs on the event loop: about 15 µs
# per erased key (secure_delete), so a chunk pauses requests for a few milliseconds at most.
SWEEP_CHUNK = 256
# Test-only fault injection (docs/design.md, crash safety; kme/faults.py): "kill-after-collect" makes the
# process SIGKILL itself after a dec_keys commit and before its answer leaves. Read once, at construction.
__all__ = ["FAULT_ENV", "KmeService", "LinkReport", "SaeEntry", "ServiceSettings", "key_holders"]


@dataclass(frozen=True, slots=True)
class ServiceSettings:
    kme_id: int
    key_size: int = 256
    min_key_size: int = 64
    max_key_size: int = 8192
    max_key_per_request: int = 128
    max_key_count: int = 1_000_000_000
    max_SAE_ID_count: int = 8
    block_size: int = 32
    reservation_ttl: float = 600.0
    key_id_mode: str = "random"  # or "reference"
    # Upper bound on one peer reservation, on top of the gateway's own timeouts.
    peer_timeout: float = 10.0
    # Holds older than this belong to a dead process (must exceed peer_timeout by far).
    stale_hold_after: float = 120.0
    # Seconds a slave may collect a key again after its first collection (its answer may have been lost);
    # 0: a key is erased at its last slave's collection. SaeEntry.recollect_window overrides it per slave.
    recollect_window: float = 60.0
    quotas: QuotaSettings = field(default_factory=QuotaSettings)
    # Keys for SAEs on KMEs without a direct link: modes, paths, bounds (docs/design.md, network relay).
    relay: RelaySettings = field(default_factory=RelaySettings)

    def __post_init__(self) -> None:
        key_id_factory(self.key_id_mode)
        if self.key_size % 8 or not 8 <= self.min_key_size <= self.key_size <= self.max_key_size:
            raise ValueError("need 8 <= min_key_size <= key_size <= max_key_size, key_size a multiple of 8")
        if self.key_id_mode == "reference" and self.min_key_size < REFERENCE_MIN_KEY_SIZE:
            raise ValueError(
                f'key_id_mode = "reference" needs min_key_size >= {REFERENCE_MIN_KEY_SIZE}: the key ID is a '
                "hash of the key and travels in clear"
            )
        if not 0 <= self.recollect_window <= MAX_RECOLLECT_WINDOW:
            raise ValueError(f"recollect_window must lie within 0..{MAX_RECOLLECT_WINDOW:g} seconds")
        if self.block_size <= 0 or self.max_key_per_request <= 0 or self.max_SAE_ID_count < 0:
            raise ValueError("block_size and max_key_per_request must be positive")
        if self.stale_hold_after <= self.peer_timeout:
            raise ValueError("stale_hold_after must exceed peer_timeout")


@dataclass(frozen=True, slots=True)
class SaeEntry:
    sae_id: int
    kme_id: int
    # False: this SAE takes part in no key with more than one slave, as master or as slave. A TLS-QKD
    # endpoint trusts a key because only the master and itself hold it; a co-slave could impersonate either.
    multicast: bool = True
    # As a slave: seconds it may collect a key again (None: ServiceSettings.recollect_window).
    recollect_window: float | None = None


def key_holders(master: int, slaves: Sequence[int]) -> dict[str, Any]:
    """The ``key_extension`` of every delivered key: who holds it (docs/design.md, key holders)."""
    return {"master_SAE_ID": master, "slave_SAE_IDs": list(slaves)}


@dataclass(frozen=True, slots=True)
class LinkReport:
    peer_kme_id: int
    direction_blocks: dict[int, int]
    stock_bytes: int
    reserved_keys: int
    entropy_bits_per_byte: float
    imported_bytes: int
    recollectable_keys: int = 0


class PeerGateway(Protocol):
    async def reserve(self, peer_kme_id: int, reservation: Reservation) -> None: ...

    # Relay hop messages (kme/relay/node.py RelayTransport); a gateway without it relays nothing.
    async def relay(self, peer_kme_id: int, body: bytes, tag: bytes, timeout: float) -> HopReply: ...


def _parse_sae_id(text: str, what: str) -> int:
    if not isinstance(text, str) or not 1 <= len(text) <= 20:
        raise BadRequestError(f"{what} must be a 64-bit integer")
    body = text[1:] if text[:1] in "+-" else text
    if not body.isascii() or not body.isdigit():
        raise BadRequestError(f"{what} must be a 64-bit integer")
    value = int(text)
    if not _I64_MIN <= value <= _I64_MAX:
        raise BadRequestError(f"{what} must be a 64-bit integer")
    return value


class KmeService:
    """All key decisions of one KME. Callers (the HTTP layer) pass already-authenticated SAE/KME IDs."""

    def __init__(
        self,
        settings: ServiceSettings,
        store: KeyStore,
        saes: Mapping[int, SaeEntry],
        peers: PeerGateway | None,
        linked_kmes: Collection[int],
        router: Router | None = None,  # qkdtls.kme.routing.Router; None: direct links only
    ) -> None:
        self.settings = settings
        self.store = store
        self.saes = dict(saes)
        self.peers = peers
        # The local link (pairs of SAEs on this KME) always exists; its stock may be empty.
        self.links = frozenset(linked_kmes) | {settings.kme_id}
        self._make_id = key_id_factory(settings.key_id_mode)
        self._limiter = RateLimiter(settings.quotas)
        # Refused enc_keys and reservations by reason (metrics): master_rate, pair_rate, uncollected (this
        # master's keys not collected, here or at the peer), reservation_uncollected (a peer's reservation
        # refused here for that reason), stock, no_path (no relay path: nothing consumed), relay (a relay
        # failed on its way).
        self.refusals: Counter[str] = Counter()
        self._faults = Faults.from_env()
        neighbours = frozenset(linked_kmes) - {settings.kme_id}
        self.router: Router = router if router is not None else DirectLinks(settings.kme_id, neighbours)
        self.relay = RelayNode(
            kme_id=settings.kme_id,
            block_size=settings.block_size,
            settings=settings.relay,
            store=store,
            transport=peers if peers is not None and hasattr(peers, "relay") else None,
            router=self.router,
            neighbours=neighbours,
            check_destination=self._relay_destination,
            faults=self._faults,
        )
        self.prefetch = Prefetcher(
            self._relay_ahead,
            max_age=settings.relay.prefetch_max_age,
            idle=settings.relay.prefetch_idle,
            counts=self.relay.stats.prefetch,
        )

    # -- helpers --------------------------------------------------------------------------------------------

    def _caller(self, caller_sae: int) -> SaeEntry:
        entry = self.saes.get(caller_sae)
        if entry is None or entry.kme_id != self.settings.kme_id:
            raise UnauthorizedError(f"SAE {caller_sae} is not registered at this KME")
        return entry

    def _sae_entry(self, sae_id: int) -> SaeEntry | None:
        """An SAE's entry: this KME's configuration first, then where routing learnt it is attached."""
        entry = self.saes.get(sae_id)
        if entry is not None:
            return entry
        kme_id = self.router.kme_of(sae_id)
        return SaeEntry(sae_id=sae_id, kme_id=kme_id) if kme_id is not None else None

    def _known_sae(self, text: str, what: str) -> SaeEntry:
        sae_id = _parse_sae_id(text, what)
        entry = self._sae_entry(sae_id)
        if entry is None:
            raise BadRequestError(f"{what} {sae_id} is unknown")
        return entry

    def _relay_choices(self, destinations: Collection[int], request: KeyRequest) -> dict[int, RelayChoice]:
        policy = self.settings.relay
        return {
            dst: choose(policy.policy(dst), request.extension_mandatory, request.extension_optional)
            for dst in destinations
        }

    def _link_to(self, kme_id: int) -> int:
        if kme_id not in self.links:
            raise BadRequestError(f"KME {kme_id} has no QKD link with this KME")
        return kme_id

    def direction_of(self, master_kme: int, link: int) -> int:
        """Direction a master KME draws on a link: the lower KME ID owns 0; the local link uses 0 only."""
        if link == master_kme:
            return 0
        return 0 if master_kme < link else 1

    def _blocks_per_key(self, size_bits: int) -> int:
        return math.ceil(size_bits / 8 / self.settings.block_size)

    def _refuse(self, reason: str, message: str) -> UnavailableError:
        self.refusals[reason] += 1
        return UnavailableError(message)

    def _uncollected_message(self, master: int, exc: UncollectedQuota) -> str:
        return (
            f"SAE {master} has {exc.uncollected} keys its slaves have not collected at KME "
            f"{self.settings.kme_id} (limit {exc.limit}); retry when they have"
        )

    def _check_size(self, size: int) -> None:
        s = self.settings
        if size % 8:
            raise BadRequestError(MSG_SIZE_MULTIPLE_OF_8)
        if not s.min_key_size <= size <= s.max_key_size:
            raise BadRequestError(f"size must be between {s.min_key_size} and {s.max_key_size} bits")

    # -- SAE interface --------------------------------------------------------------------------------------

    async def status(self, caller_sae: int, slave_sae: str) -> Status:
        s = self.settings
        self._caller(caller_sae)
        slave = self._known_sae(slave_sae, "slave SAE ID")
        if self._relayed(slave.kme_id, RelayChoice(self.settings.relay.policy(slave.kme_id).mode)):
            count = await self._relay_capacity(slave.kme_id, s.key_size, (caller_sae, slave.sae_id))
        else:
            link = self._link_to(slave.kme_id)
            try:
                free = await self.store.free_blocks(link, self.direction_of(s.kme_id, link))
            except StoreError:
                raise UnavailableError("key store unavailable") from None
            count = max(free, 0) // self._blocks_per_key(s.key_size)
        return Status(
            source_KME_ID=str(s.kme_id),
            target_KME_ID=str(slave.kme_id),
            master_SAE_ID=str(caller_sae),
            slave_SAE_ID=str(slave.sae_id),
            key_size=s.key_size,
            stored_key_count=min(count, s.max_key_count),
            max_key_count=s.max_key_count,
            max_key_per_request=s.max_key_per_request,
            max_key_size=s.max_key_size,
            min_key_size=s.min_key_size,
            max_SAE_ID_count=s.max_SAE_ID_count,
        )

    def _slaves(self, primary: SaeEntry, additional: Sequence[str]) -> tuple[int, ...]:
        s = self.settings
        if len(additional) > s.max_SAE_ID_count:
            raise BadRequestError(f"at most {s.max_SAE_ID_count} additional_slave_SAE_IDs are allowed")
        slaves = [primary.sae_id]
        local = self.settings.kme_id
        for text in additional:
            entry = self._known_sae(str(text), "additional slave SAE ID")
            if entry.kme_id != primary.kme_id and local in (entry.kme_id, primary.kme_id):
                # The relay delivers to other KMEs only; a key kept here too would need a second store path.
                raise BadRequestError(
                    "all slave SAEs of one request must belong to the same KME, or all to other KMEs"
                )
            if entry.sae_id not in slaves:
                slaves.append(entry.sae_id)
        return tuple(slaves)

    def _check_multicast(self, master: int, slaves: Sequence[int]) -> None:
        """Refuse a key with several slaves when one of its holders is configured ``multicast = false``."""
        if len(slaves) < 2:
            return
        for sae in (master, *slaves):
            entry = self.saes.get(sae)
            if entry is not None and not entry.multicast:
                raise BadRequestError(f"SAE {sae} takes no keys with more than one slave (multicast)")

    async def enc_keys(self, caller_sae: int, slave_sae: str, request: KeyRequest) -> KeyContainer:
        s = self.settings
        self._caller(caller_sae)
        slave = self._known_sae(slave_sae, "slave SAE ID")
        number = 1 if request.number is None else request.number
        size = s.key_size if request.size is None else request.size
        unsupported = unsupported_mandatory(request.extension_mandatory)
        if unsupported:
            raise BadRequestError(MSG_EXT_MANDATORY_UNSUPPORTED, [{"unsupported": unsupported}])
        self._check_size(size)
        if not 1 <= number <= s.max_key_per_request:
            raise BadRequestError(f"number must be between 1 and {s.max_key_per_request}")
        slaves = self._slaves(slave, request.additional_slave_SAE_IDs)
        if caller_sae in slaves:
            # A key an SAE shares with itself proves nothing to anyone, and it would let a TLS-QKD offer be
            # reflected back to its sender: the slave's collection is what binds the direction.
            raise BadRequestError("the master SAE cannot also be a slave of its keys")
        self._check_multicast(caller_sae, slaves)
        destinations: dict[int, None] = {}
        for sae in slaves:
            entry = self._sae_entry(sae)
            assert entry is not None  # _slaves checked every one
            destinations[entry.kme_id] = None
        choices = self._relay_choices(destinations, request) if slave.kme_id != s.kme_id else {}
        plans: list[Plan] = []
        if len(destinations) > 1 or self._relayed(slave.kme_id, choices.get(slave.kme_id)):
            try:
                plans = [self.relay.plan(dst, choice, number, size) for dst, choice in choices.items()]
            except RelayFailed as exc:
                raise self._refuse(exc.reason, exc.message) from None
            link = slave.kme_id
        else:
            link = self._link_to(slave.kme_id)
        try:
            self._limiter.admit(caller_sae, slave.sae_id, number, time.monotonic())
        except QuotaRefused as exc:
            raise self._refuse(exc.reason, exc.message) from None
        bpk = self._blocks_per_key(size)
        expires_at = time.time() + s.reservation_ttl
        if link == s.kme_id:
            try:
                stored = await self.store.take_local(
                    link, number, bpk, size, self._make_id, caller_sae, slaves, expires_at,
                    max_uncollected=s.quotas.of(caller_sae).max_uncollected,
                )  # fmt: skip
            except ShortStock:
                raise self._refuse("stock", "not enough key material for this SAE pair") from None
            except UncollectedQuota as exc:
                raise self._refuse("uncollected", self._uncollected_message(caller_sae, exc)) from None
            except StoreError as exc:
                log.warning(
                    "local keys failed", extra={"event": "key.failed", "link": link, "error": str(exc)}
                )
                raise UnavailableError("key store unavailable") from None
            holders = key_holders(caller_sae, slaves)
            keys = [Key(key_ID=k.key_id, key=k.data, key_extension=holders) for k in stored]
        elif plans:
            keys = await self._enc_relay(caller_sae, slaves, number, size, plans)
        else:
            keys = await self._enc_cross(caller_sae, slaves, link, number, size, bpk)
        if log.isEnabledFor(logging.INFO):  # the record lists every key ID: skip building it
            log.info(
                "keys delivered to master",
                extra={
                    "event": "key.delivered",
                    "link": link,
                    "master_SAE_ID": caller_sae,
                    "slave_SAE_IDs": list(slaves),
                    "size": size,
                    "key_IDs": [k.key_ID for k in keys],
                },
            )
        return KeyContainer(keys=tuple(keys))

    async def _enc_cross(
        self, master: int, slaves: tuple[int, ...], link: int, number: int, size: int, bpk: int
    ) -> list[Key]:
        s = self.settings
        if self.peers is None:
            raise UnavailableError(f"no connection to KME {link} is configured")
        direction = self.direction_of(s.kme_id, link)
        try:
            held = await self.store.hold_blocks(link, direction, number * bpk)
        except ShortStock:
            raise self._refuse("stock", "not enough key material for this SAE pair") from None
        except StoreError:
            raise UnavailableError("key store unavailable") from None
        seqs = [b.seq for b in held]
        try:
            return await self._reserve_at_peer(link, direction, master, slaves, size, bpk, number, held)
        except BaseException as exc:
            # Failed or cancelled after holding: give back whatever is still ours (burnt or consumed blocks
            # are no longer held, so this is a no-op for them). Shielded so a cancelled request releases too.
            try:
                await asyncio.shield(self.store.release_blocks(link, seqs))
            except Exception:
                pass  # store down: stale-hold recovery frees them later
            if isinstance(exc, StoreError):
                raise UnavailableError("key store unavailable") from None
            raise

    async def _reserve_at_peer(
        self,
        link: int,
        direction: int,
        master: int,
        slaves: tuple[int, ...],
        size: int,
        bpk: int,
        number: int,
        held: Sequence[Block],
    ) -> list[Key]:
        assert self.peers is not None
        seqs = [b.seq for b in held]
        keys = self._build_keys(held, number, bpk, size, key_holders(master, slaves))
        reservation = Reservation(
            master_KME_ID=self.settings.kme_id,
            direction=direction,
            master_SAE_ID=master,
            slave_SAE_IDs=slaves,
            size=size,
            keys=tuple(
                ReservedKey(k.key_ID, tuple(seqs[i * bpk : (i + 1) * bpk])) for i, k in enumerate(keys)
            ),
        )
        try:
            async with asyncio.timeout(self.settings.peer_timeout):
                await self.peers.reserve(link, reservation)
        except PeerRejected:
            burnt = await self.store.burn_held(link, seqs)
            log.warning(
                "peer refused blocks; burnt",
                extra={"event": "blocks.burnt", "link": link, "blocks": burnt, "first_seq": seqs[0]},
            )
            raise UnavailableError(f"KME {link} refused the key reservation; retry") from None
        except PeerQuotaExceeded as exc:
            await self.store.release_blocks(link, seqs)
            raise self._refuse("uncollected", str(exc)) from None
        except Exception as exc:  # PeerUnavailable, timeouts, anything the gateway let through
            await self.store.release_blocks(link, seqs)
            log.warning(
                "peer reservation failed; blocks released",
                extra={"event": "blocks.released", "link": link, "blocks": len(seqs), "error": repr(exc)},
            )
            raise UnavailableError(f"KME {link} is unavailable") from None
        try:
            await self.store.consume_held(link, seqs)
        except LostHold:
            raise UnavailableError("key reservation timed out locally; retry") from None
        return keys

    def _build_keys(
        self, held: Sequence[Block], number: int, bpk: int, size: int, holders: dict[str, Any]
    ) -> list[Key]:
        nbytes = size // 8
        keys = []
        for i in range(number):
            material = b"".join(b.data for b in held[i * bpk : (i + 1) * bpk])[:nbytes]
            keys.append(Key(key_ID=self._make_id(material), key=material, key_extension=holders))
        return keys

    # -- relayed keys (kme/relay; docs/design.md, network relay) ---------------------------------------------

    def _relayed(self, kme_id: int, choice: RelayChoice | None) -> bool:
        """Keys for an SAE of ``kme_id`` go through the relay (not a local key nor a direct reservation)."""
        if kme_id == self.settings.kme_id:
            return False
        return kme_id not in self.links or (choice is not None and choice.mode == "spread")

    async def _enc_relay(
        self, master: int, slaves: tuple[int, ...], number: int, size: int, plans: Sequence[Plan]
    ) -> list[Key]:
        holders = key_holders(master, slaves)
        target = self.settings.relay.policy(plans[0].destination).prefetch if len(plans) == 1 else 0
        if target and len(slaves) == 1:
            ready = self.prefetch.take(BufferKey(master, slaves[0], size, plans[0].choice), target, number)
            if ready is not None:
                return [Key(key_ID=key_id, key=data, key_extension=holders) for key_id, data in ready]
        try:
            pairs = await self.relay.originate(master, slaves, size, number, plans, self._make_id)
        except RelayFailed as exc:
            log.warning(
                "relay failed",
                extra={"event": "relay.failed", "master_SAE_ID": master, "reason": exc.message},
            )
            raise self._refuse(exc.reason, exc.message) from None
        except StoreError:
            raise UnavailableError("key store unavailable") from None
        return [Key(key_ID=key_id, key=data, key_extension=holders) for key_id, data in pairs]

    async def _relay_ahead(self, key: BufferKey, number: int) -> list[tuple[str, bytes]]:
        """Relay ``number`` keys for a prefetch buffer (kme/relay/prefetch.py) on today's path(s)."""
        slave = self._sae_entry(key.slave)
        if slave is None:
            raise RelayFailed(f"SAE {key.slave} is unknown")
        plan = self.relay.plan(slave.kme_id, key.choice, number, key.size)
        if plan.choice != key.choice:  # a spread that would fall back to trusted now: not for this buffer
            raise RelayFailed(f"a {key.choice.mode} relay to KME {slave.kme_id} is not possible now")
        return await self.relay.originate(key.master, (key.slave,), key.size, number, [plan], self._make_id)

    async def _relay_capacity(self, destination: int, size: int, pair: tuple[int, int] | None = None) -> int:
        """Keys of ``size`` bits one enc_keys could relay to ``destination`` now: the fewest any link of the
        path(s) the default mode would use can pay for (this KME's links from its store, others as
        advertised; a link whose stock is not advertised does not limit the count), plus the keys ready for
        ``pair`` (master SAE, slave SAE) when keys are relayed ahead."""
        choice = choose(self.settings.relay.policy(destination))
        try:
            plan = self.relay.plan(destination, choice, 1, size)
        except RelayFailed:
            return 0
        ready = self.prefetch.ready(BufferKey(*pair, size, plan.choice)) if pair is not None else 0
        bs = self.settings.block_size
        mac, bpk, nbytes = mac_block_count(bs), key_block_count(size, bs), size // 8
        first_blocks = plan.choice.mode == "trusted" or plan.choice.scheme == "xor"
        best: int | None = None
        for path in plan.paths:
            for hop, (a, b) in enumerate(itertools.pairwise(path)):
                if a == self.settings.kme_id:
                    try:
                        stock: int | None = await self.store.free_blocks(b, self.direction_of(a, b))
                    except StoreError:
                        raise UnavailableError("key store unavailable") from None
                else:
                    stock = _advertised_stock(self.router, a, b)
                if stock is None:
                    continue
                usable = max(stock - mac, 0)
                keys = usable // bpk if hop == 0 and first_blocks else usable * bs // nbytes
                best = keys if best is None else min(best, keys)
        return (best or 0) + ready

    def _relay_destination(self, item: RelayItem) -> Destination:
        """Checks of a relay item that ends here, before anything is consumed (BadRequestError: 400)."""
        s = self.settings
        master = self._sae_entry(item.master_sae)
        if master is None or master.kme_id != item.path[0]:
            raise BadRequestError(f"master SAE {item.master_sae} does not belong to KME {item.path[0]}")
        if len(set(item.slaves)) != len(item.slaves) or len(item.slaves) > 1 + s.max_SAE_ID_count:
            raise BadRequestError("slave_SAE_IDs must be distinct and within max_SAE_ID_count")
        if item.master_sae in item.slaves:
            raise BadRequestError("the master SAE cannot also be a slave of its keys")
        pending = []
        for sae in item.slaves:
            entry = self.saes.get(sae)
            if entry is not None and entry.kme_id == s.kme_id:
                pending.append(sae)
        if not pending:
            raise BadRequestError(f"no slave SAE of this relay belongs to KME {s.kme_id}")
        self._check_multicast(item.master_sae, item.slaves)
        self._check_size(item.size)
        if len(item.key_ids) > s.max_key_per_request:
            raise BadRequestError(f"at most {s.max_key_per_request} keys per relay item")
        return Destination(
            pending=tuple(pending),
            max_uncollected=s.quotas.of(item.master_sae).max_uncollected,
            expires_at=time.time() + s.reservation_ttl,
        )

    async def accept_relay(self, caller_kme: int, body: bytes, tag: str | None) -> HopReply:
        """A relay hop message from neighbour ``caller_kme`` (kme/relay/node.py)."""
        return await self.relay.receive(caller_kme, body, tag)

    def relay_stats(self) -> dict[str, Any]:
        """Relays by mode, the last paths used and the link material consumed (admin API, map)."""
        return self.relay.stats.snapshot()

    async def dec_keys(self, caller_sae: int, master_sae: str, key_ids: Sequence[str]) -> KeyContainer:
        s = self.settings
        me = self._caller(caller_sae)
        master = self._known_sae(master_sae, "master SAE ID")
        if not key_ids:
            raise BadRequestError("key_IDs must name at least one key")
        if len(key_ids) > s.max_key_per_request:
            raise BadRequestError(f"at most {s.max_key_per_request} key IDs per request")
        try:
            ids = [parse_key_id(k) for k in key_ids]
        except BadRequest as exc:
            raise BadRequestError(exc.message) from None
        window = s.recollect_window if me.recollect_window is None else me.recollect_window
        try:
            stored = await self.store.collect(
                master.sae_id, caller_sae, ids, unicast_only=not me.multicast, recollect_window=window
            )
        except NotASlave:
            raise UnauthorizedError(f"SAE {caller_sae} is not a slave of these keys") from None
        except MulticastRefused:
            raise UnauthorizedError(
                f"SAE {caller_sae} takes no keys with more than one slave (multicast)"
            ) from None
        except KeysNotFound:
            raise BadRequestError(MSG_KEYS_NOT_FOUND) from None
        except StoreError:
            raise UnavailableError("key store unavailable") from None
        self._faults.hit("kill-after-collect")  # committed, not answered: a crash at the worst moment
        if log.isEnabledFor(logging.INFO):  # the record lists every key ID: skip building it
            log.info(
                "keys collected by slave",
                extra={
                    "event": "key.collected",
                    "master_SAE_ID": master.sae_id,
                    "slave_SAE_ID": caller_sae,
                    "key_IDs": ids,
                },
            )
        again = [k.key_id for k in stored if k.again]
        if again:  # within the window; worth seeing: the slave lost an answer, or its key cache
            log.warning(
                "keys collected again by their slave",
                extra={
                    "event": "key.recollected",
                    "master_SAE_ID": master.sae_id,
                    "slave_SAE_ID": caller_sae,
                    "key_IDs": again,
                },
            )
        return KeyContainer(
            keys=tuple(
                Key(key_ID=k.key_id, key=k.data, key_extension=key_holders(master.sae_id, k.slaves))
                for k in stored
            )
        )

    def sae_info(self, caller_sae: int) -> SaeInfo:
        entry = self._caller(caller_sae)
        return SaeInfo(SAE_ID=entry.sae_id, KME_ID=entry.kme_id)

    # -- inter-KME interface --------------------------------------------------------------------------------

    async def accept_reservation(self, caller_kme: int, reservation: Reservation) -> None:
        s = self.settings
        r = reservation
        if caller_kme == s.kme_id or caller_kme not in self.links or r.master_KME_ID != caller_kme:
            raise UnauthorizedError(f"KME {caller_kme} may not reserve keys on this KME")
        link = caller_kme  # this KME files the link under the peer's ID
        expected = self.direction_of(caller_kme, s.kme_id)
        if r.direction != expected:
            raise BadRequestError(f"KME {caller_kme} draws only direction {expected}")
        master = self.saes.get(r.master_SAE_ID)
        if master is None or master.kme_id != caller_kme:
            raise BadRequestError(f"master SAE {r.master_SAE_ID} does not belong to KME {caller_kme}")
        if len(set(r.slave_SAE_IDs)) != len(r.slave_SAE_IDs) or len(r.slave_SAE_IDs) > 1 + s.max_SAE_ID_count:
            raise BadRequestError("slave_SAE_IDs must be distinct and within max_SAE_ID_count")
        for sae in r.slave_SAE_IDs:
            entry = self.saes.get(sae)
            if entry is None or entry.kme_id != s.kme_id:
                raise BadRequestError(f"slave SAE {sae} does not belong to this KME")
        self._check_multicast(r.master_SAE_ID, r.slave_SAE_IDs)
        self._check_size(r.size)
        if len(r.keys) > s.max_key_per_request:
            raise BadRequestError(f"at most {s.max_key_per_request} keys per reservation")
        bpk = self._blocks_per_key(r.size)
        for k in r.keys:
            if len(k.blocks) != bpk or any(seq % 2 != r.direction for seq in k.blocks):
                raise BadRequestError(f"each key needs {bpk} blocks of direction {r.direction}")
        try:
            await self.store.take_reserved(
                link,
                r.direction,
                [NewKeySpec(k.key_ID, k.blocks) for k in r.keys],
                r.master_SAE_ID,
                r.slave_SAE_IDs,
                r.size,
                time.time() + s.reservation_ttl,
                max_uncollected=s.quotas.of(r.master_SAE_ID).max_uncollected,
            )
        except UncollectedQuota as exc:
            self.refusals["reservation_uncollected"] += 1
            raise UncollectedQuotaError(self._uncollected_message(r.master_SAE_ID, exc)) from None
        except BlocksTaken as exc:
            log.warning(
                "reservation refused",
                extra={"event": "reservation.refused", "link": link, "reason": str(exc)},
            )
            raise BlocksTakenError("one or more blocks of the reservation are not available") from None
        except StoreError:
            raise UnavailableError("key store unavailable") from None
        if log.isEnabledFor(logging.INFO):  # the record lists every key ID: skip building it
            log.info(
                "keys reserved for slaves",
                extra={
                    "event": "key.reserved",
                    "link": link,
                    "master_SAE_ID": r.master_SAE_ID,
                    "slave_SAE_IDs": list(r.slave_SAE_IDs),
                    "size": r.size,
                    "key_IDs": [k.key_ID for k in r.keys],
                },
            )

    # -- housekeeping ---------------------------------------------------------------------------------------

    async def link_reports(self) -> list[LinkReport]:
        reports = []
        for link in sorted(self.links):
            try:
                stats = await self.store.link_stats(link)
            except StoreError:
                raise UnavailableError("key store unavailable") from None
            free = sum(max(n, 0) for n in stats.free_blocks.values())
            reports.append(
                LinkReport(
                    peer_kme_id=link,
                    direction_blocks=dict(stats.free_blocks),
                    stock_bytes=free * self.settings.block_size,
                    reserved_keys=stats.reserved_keys,
                    entropy_bits_per_byte=entropy.shannon_entropy(stats.histogram),
                    imported_bytes=stats.imported_bytes,
                    recollectable_keys=stats.recollectable_keys,
                )
            )
        return reports

    async def expire_reservations(self) -> int:
        """Erase keys past their reservation TTL or re-collection window and free holds of dead processes;
        returns how many keys expired uncollected."""
        now = time.time()
        expired = 0
        for _ in range(1000):  # bounded; each round is one short transaction
            swept = await self.store.expire(now, SWEEP_CHUNK)
            expired += len(swept.expired)
            if swept.expired:
                log.info(
                    "reserved keys expired",
                    extra={
                        "event": "key.expired",
                        "count": len(swept.expired),
                        "key_IDs": [k for _, k in swept.expired],
                    },
                )
            if swept.erased:
                log.debug(
                    "collected keys erased after their re-collection window",
                    extra={"event": "key.erased", "count": len(swept.erased)},
                )
            if len(swept.expired) + len(swept.erased) < SWEEP_CHUNK:
                break
        freed = await self.store.release_stale_holds(now - self.settings.stale_hold_after)
        if freed:
            log.warning("stale holds released", extra={"event": "blocks.released", "blocks": freed})
        return expired

    async def uncollected_by_master(self) -> dict[int, int]:
        """Keys stored at this KME that some slave has not collected yet, per master SAE."""
        try:
            return await self.store.uncollected_by_master()
        except StoreError:
            raise UnavailableError("key store unavailable") from None

    async def close(self) -> None:
        """Close the store (the service owns it from construction on)."""
        await self.prefetch.close()
        await self.relay.close()
        await self.store.close()


def _advertised_stock(router: Router, a: int, b: int) -> int | None:
    """Free blocks of ``a``'s direction on the link a-b as the routing database last heard them."""
    stock = getattr(router, "stock", None)
    if callable(stock):
        value = stock(a, b)
        return value if isinstance(value, int) else None
    snapshot = getattr(router, "snapshot", None)
    if not callable(snapshot):
        return None
    for link in snapshot().get("links", []):
        if {link.get("a"), link.get("b")} == {a, b}:
            value = link.get("stock_blocks", {}).get(f"{a}->{b}")
            return value if isinstance(value, int) else None
    return None
