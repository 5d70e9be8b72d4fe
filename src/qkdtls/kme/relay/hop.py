"""The relay logic of one hop, sans I/O: check a hop message's route, open it with the link material it
names, and build (seal) the next one. The adapter (``node.py``) fetches and consumes the material.

Rules (docs/design.md, network relay):

- A hop message from KME ``a`` to its neighbour ``b`` names only blocks of ``a``'s direction on the link
  (``a`` draws them; the lower KME ID owns direction 0), each at most once: the MAC material first (64 bytes:
  the key of this message's tag, then the key of the answer's tag), then per item its blocks (first hop of a
  value taken from that link) or its pad.
- Every item carries its whole path. The receiver must be ``path[i]`` for some i >= 1 with the caller
  ``path[i-1]``; no KME may appear twice; at most ``max_hops`` links; the next KME (if any) must be a
  neighbour. The blocks form is allowed only on the first hop (the caller is the origin), so a later hop
  can never make a receiver adopt its own link material as the key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from qkdtls.kme.errors import BadRequestError
from qkdtls.kme.relay.messages import HopMessage, ItemResult, MalformedAnswer, RelayItem, decode_answer
from qkdtls.kme.relay.messages import encode_answer as _encode_answer
from qkdtls.kme.relay.otp import MAC_MATERIAL_BYTES, OneTimeKey, blocks_for, mac_keys, pad_bytes, xor
from qkdtls.kme.store.base import Block


def sender_direction(sender: int, receiver: int) -> int:
    """The direction a KME draws on its link to ``receiver`` (the lower KME ID owns 0)."""
    return 0 if sender < receiver else 1


def mac_block_count(block_size: int) -> int:
    return blocks_for(MAC_MATERIAL_BYTES, block_size)


def key_block_count(size_bits: int, block_size: int) -> int:
    return blocks_for(size_bits // 8, block_size)


def pad_block_count(item: RelayItem, block_size: int) -> int:
    return blocks_for(item.value_bytes, block_size)


@dataclass(frozen=True, slots=True)
class Route:
    """Where the receiving KME stands on an item's path."""

    position: int
    previous: int
    next: int | None  # None: this KME is the destination

    @property
    def final(self) -> bool:
        return self.next is None


def _bad(where: str, problem: str) -> BadRequestError:
    return BadRequestError(f"relay message: {where} {problem}")


def check_route(
    item: RelayItem, where: str, caller: int, me: int, neighbours: Collection[int], max_hops: int
) -> Route:
    path = item.path
    if len(set(path)) != len(path):
        raise _bad(f"{where}.path", "names a KME twice (a loop)")
    if len(path) - 1 > max_hops:
        raise _bad(f"{where}.path", f"has more than {max_hops} hops")
    try:
        position = path.index(me)
    except ValueError:
        raise _bad(f"{where}.path", f"does not pass through KME {me}") from None
    if position == 0 or path[position - 1] != caller:
        raise _bad(f"{where}.path", f"does not reach KME {me} from KME {caller}")
    nxt = path[position + 1] if position + 1 < len(path) else None
    if nxt is not None and nxt not in neighbours:
        raise _bad(f"{where}.path", f"continues to KME {nxt}, which has no link with KME {me}")
    if item.blocks and position != 1:
        raise _bad(where, "may carry link blocks only on the first hop of its path")
    return Route(position, caller, nxt)


def check_message(
    msg: HopMessage,
    caller: int,
    me: int,
    *,
    neighbours: Collection[int],
    max_hops: int,
    block_size: int,
) -> list[Route]:
    """The route of every item, or :class:`BadRequestError` (the whole message is refused, nothing is
    consumed)."""
    if msg.sender != caller or msg.receiver != me:
        raise _bad("link", f"must be [{caller}, {me}] on this connection")
    direction = sender_direction(caller, me)
    if len(msg.mac_blocks) != mac_block_count(block_size):
        raise _bad("mac_blocks", f"must name {mac_block_count(block_size)} blocks")
    named = msg.named_blocks()
    if len(set(named)) != len(named):
        raise _bad("body", "names a block twice")
    if any(seq % 2 != direction for seq in named):
        raise _bad("body", f"names blocks outside KME {caller}'s direction ({direction}) of the link")
    routes = []
    for i, item in enumerate(msg.items):
        where = f"items[{i}]"
        routes.append(check_route(item, where, caller, me, neighbours, max_hops))
        if item.blocks:
            need = len(item.key_ids) * key_block_count(item.size, block_size)
            if len(item.blocks) != need:
                raise _bad(f"{where}.blocks", f"must name {need} blocks")
        elif len(item.pad) != pad_block_count(item, block_size):
            raise _bad(f"{where}.pad", f"must name {pad_block_count(item, block_size)} blocks")
    return routes


# --- opening a received message -------------------------------------------------------------------------


def item_value(item: RelayItem, data: Mapping[int, bytes], block_size: int) -> bytes:
    """The value an item carries (keys or key shares, concatenated), from the link material it names."""
    nbytes = item.size // 8
    if item.blocks:
        per_key = key_block_count(item.size, block_size)
        parts = [
            pad_bytes([data[s] for s in item.blocks[i * per_key : (i + 1) * per_key]], nbytes)
            for i in range(len(item.key_ids))
        ]
        return b"".join(parts)
    return xor(item.data, pad_bytes([data[s] for s in item.pad], item.value_bytes))


@dataclass(frozen=True, slots=True, repr=False)
class Opened:
    values: list[bytes]  # per item
    answer_key: OneTimeKey

    def __repr__(self) -> str:
        return f"Opened(items={len(self.values)})"


def open_message(
    msg: HopMessage, body: bytes, tag: bytes, data: Mapping[int, bytes], block_size: int
) -> Opened | None:
    """Verify the tag with the message's MAC material and open every item; None when the tag is wrong."""
    request_key, answer_key = mac_keys(pad_bytes([data[s] for s in msg.mac_blocks], MAC_MATERIAL_BYTES))
    if not request_key.verify(body, tag):
        return None
    return Opened([item_value(item, data, block_size) for item in msg.items], answer_key)


# --- building the next message ----------------------------------------------------------------------------


def with_pad(item: RelayItem, value: bytes, pad: Sequence[Block]) -> RelayItem:
    """``item`` carrying ``value`` under a one-time pad of fresh blocks of the next link."""
    return dataclasses.replace(
        item,
        blocks=(),
        pad=tuple(b.seq for b in pad),
        data=xor(value, pad_bytes([b.data for b in pad], len(value))),
    )


@dataclass(frozen=True, slots=True, repr=False)
class Sealed:
    body: bytes
    tag: bytes
    answer_key: OneTimeKey

    def __repr__(self) -> str:
        return f"Sealed(bytes={len(self.body)})"


def seal(
    sender: int, receiver: int, mac: Sequence[Block], budget_ms: int, items: Sequence[RelayItem]
) -> Sealed:
    msg = HopMessage(sender, receiver, tuple(b.seq for b in mac), budget_ms, tuple(items))
    body = msg.encode()
    request_key, answer_key = mac_keys(pad_bytes([b.data for b in mac], MAC_MATERIAL_BYTES))
    return Sealed(body, request_key.tag(body), answer_key)


def seal_answer(answer_key: OneTimeKey, results: Sequence[ItemResult]) -> tuple[bytes, bytes]:
    body = _encode_answer(results)
    return body, answer_key.tag(body)


def open_answer(answer_key: OneTimeKey, body: bytes, tag: bytes, count: int) -> list[ItemResult] | None:
    """The per-item results of an accepted message, or None if the answer is not authentic or malformed."""
    if not answer_key.verify(body, tag):
        return None
    try:
        return decode_answer(body, count)
    except MalformedAnswer:
        return None
