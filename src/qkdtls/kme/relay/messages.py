"""Relay hop messages (``POST /kme/v1/relay``) and their answers: the model and a total decoder.

A hop message travels over one QKD link, from the KME that sends it (``link[0]``) to its neighbour
(``link[1]``), and carries a batch of items. Each item is one relayed request (or one share of it) with its
whole path (a source route), so every hop can check that it is the next element, that the caller is the one
before, and that no KME repeats. The body is authenticated by a one-time Poly1305 tag in the
``QKD-Relay-Tag`` header, keyed by link material the message names (``mac_blocks``); the answer to an accepted
message is authenticated the same way with the second key of that material. Wire format: docs/design.md
(network relay) and kme/openapi.yaml.

Decoding is total: any malformed document raises :class:`BadRequestError` naming the field; nothing here
touches key material beyond carrying ciphertext.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from qkdtls.etsi014.models import canonical_uuid
from qkdtls.kme.errors import BadRequestError

RELAY_PATH = "/kme/v1/relay"
TAG_HEADER = "QKD-Relay-Tag"
VERSION = 1
MODES = ("trusted", "spread")
SCHEMES = ("xor", "shamir")

_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1
# Bounds that keep a hostile document cheap to check; the receiver applies its own, tighter limits.
MAX_ITEMS = 256
MAX_PATH = 64
MAX_KEYS = 4096
MAX_SLAVES = 64
MAX_BLOCKS = 1 << 17
MAX_DATA = 4 << 20
MAX_BUDGET_MS = 3_600_000


def _fail(what: str, problem: str) -> BadRequestError:
    return BadRequestError(f"relay message: {what} {problem}")


def _int(value: Any, what: str, lo: int = _I64_MIN, hi: int = _I64_MAX) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise _fail(what, f"must be an integer in {lo}..{hi}")
    return value


def _ints(value: Any, what: str, limit: int, lo: int = _I64_MIN, *, empty: bool = False) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > limit or (not value and not empty):
        raise _fail(what, f"must be an array of {'0' if empty else '1'} to {limit} integers")
    for item in value:
        if not isinstance(item, int) or isinstance(item, bool) or not lo <= item <= _I64_MAX:
            raise _fail(what, f"must contain integers in {lo}..{_I64_MAX}")
    return tuple(value)


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(what, "must be an object")
    return value


@dataclass(frozen=True, slots=True)
class Share:
    """Which share of the key an item carries (``spread`` only): x-coordinate ``x`` of a ``k``-of-``n``
    sharing (XOR: k = n, x = 1..n)."""

    scheme: str
    x: int
    k: int
    n: int

    def to_json(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "x": self.x, "k": self.k, "n": self.n}

    @classmethod
    def from_json(cls, doc: Any) -> Share:
        doc = _object(doc, "share")
        scheme = doc.get("scheme")
        if scheme not in SCHEMES:
            raise _fail("share.scheme", f"must be one of {', '.join(SCHEMES)}")
        n = _int(doc.get("n"), "share.n", 2, 255)
        k = _int(doc.get("k"), "share.k", 2, n)
        x = _int(doc.get("x"), "share.x", 1, n)
        if scheme == "xor" and k != n:
            raise _fail("share.k", "must equal share.n for XOR sharing")
        return cls(scheme, x, k, n)


@dataclass(frozen=True, slots=True, repr=False)
class RelayItem:
    """One relayed request (or one share of it) inside a hop message.

    Exactly one form: ``blocks`` (first hop of a value taken from this link's own material: the receiver
    holds the same blocks, nothing secret travels) or ``pad`` + ``data`` (the value XOR the pad blocks).
    The value is the concatenation of the keys (or key shares), ``size // 8`` bytes each, in key_IDs order;
    in blocks form each key takes its own ``ceil(size/8/block_size)`` blocks, in order, truncated.
    """

    relay_id: str
    mode: str
    path: tuple[int, ...]
    master_sae: int
    slaves: tuple[int, ...]
    size: int
    key_ids: tuple[str, ...]
    share: Share | None = None
    blocks: tuple[int, ...] = ()
    pad: tuple[int, ...] = ()
    data: bytes = b""

    def __repr__(self) -> str:
        return f"RelayItem(relay_id={self.relay_id!r}, path={self.path}, keys={len(self.key_ids)})"

    @property
    def value_bytes(self) -> int:
        return len(self.key_ids) * (self.size // 8)

    def named_blocks(self) -> tuple[int, ...]:
        return self.blocks or self.pad

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "relay_ID": self.relay_id,
            "mode": self.mode,
            "path": list(self.path),
            "master_SAE_ID": self.master_sae,
            "slave_SAE_IDs": list(self.slaves),
            "size": self.size,
            "key_IDs": list(self.key_ids),
        }
        if self.share is not None:
            doc["share"] = self.share.to_json()
        if self.blocks:
            doc["blocks"] = list(self.blocks)
        else:
            doc["pad"] = list(self.pad)
            doc["data"] = base64.b64encode(self.data).decode("ascii")
        return doc

    @classmethod
    def from_json(cls, doc: Any, where: str) -> RelayItem:
        doc = _object(doc, where)
        relay_id = doc.get("relay_ID")
        relay_id = canonical_uuid(relay_id) if isinstance(relay_id, str) else None
        if relay_id is None:
            raise _fail(f"{where}.relay_ID", "must be a UUID string")
        mode = doc.get("mode")
        if mode not in MODES:
            raise _fail(f"{where}.mode", f"must be one of {', '.join(MODES)}")
        path = _ints(doc.get("path"), f"{where}.path", MAX_PATH)
        if len(path) < 2:
            raise _fail(f"{where}.path", "must name at least the origin and the destination KME")
        slaves = _ints(doc.get("slave_SAE_IDs"), f"{where}.slave_SAE_IDs", MAX_SLAVES)
        size = _int(doc.get("size"), f"{where}.size", 8, 1 << 20)
        if size % 8:
            raise _fail(f"{where}.size", "must be a multiple of 8")
        ids_doc = doc.get("key_IDs")
        if not isinstance(ids_doc, list) or not 1 <= len(ids_doc) <= MAX_KEYS:
            raise _fail(f"{where}.key_IDs", f"must be an array of 1 to {MAX_KEYS} UUID strings")
        key_ids = []
        for text in ids_doc:
            canonical = canonical_uuid(text) if isinstance(text, str) else None
            if canonical is None:
                raise _fail(f"{where}.key_IDs", "must contain UUID strings")
            key_ids.append(canonical)
        if len(set(key_ids)) != len(key_ids):
            raise _fail(f"{where}.key_IDs", "must be distinct")
        share = Share.from_json(doc["share"]) if doc.get("share") is not None else None
        if (share is None) != (mode == "trusted"):
            raise _fail(f"{where}.share", "is required in spread mode and absent in trusted mode")
        has_blocks, has_pad = "blocks" in doc, "pad" in doc or "data" in doc
        if has_blocks == has_pad:
            raise _fail(where, "must carry either blocks or pad and data")
        item = cls(
            relay_id=relay_id,
            mode=mode,
            path=path,
            master_sae=_int(doc.get("master_SAE_ID"), f"{where}.master_SAE_ID"),
            slaves=slaves,
            size=size,
            key_ids=tuple(key_ids),
            share=share,
        )
        if has_blocks:
            blocks = _ints(doc.get("blocks"), f"{where}.blocks", MAX_BLOCKS, 0)
            return dataclasses.replace(item, blocks=blocks)
        pad = _ints(doc.get("pad"), f"{where}.pad", MAX_BLOCKS, 0)
        text = doc.get("data")
        if not isinstance(text, str) or len(text) > MAX_DATA * 4 // 3 + 4:
            raise _fail(f"{where}.data", "must be a base64 string")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise _fail(f"{where}.data", "must be a base64 string") from None
        if len(data) != item.value_bytes:
            raise _fail(f"{where}.data", f"must hold {item.value_bytes} bytes (size/8 per key)")
        return dataclasses.replace(item, pad=pad, data=data)


@dataclass(frozen=True, slots=True)
class HopMessage:
    sender: int
    receiver: int
    mac_blocks: tuple[int, ...]  # the sender's direction: request key, then answer key (64 bytes)
    budget_ms: int  # what the receiver may spend on it, forwarding included
    items: tuple[RelayItem, ...]

    def named_blocks(self) -> list[int]:
        """Every block of the link this message names, MAC blocks first."""
        out = list(self.mac_blocks)
        for item in self.items:
            out.extend(item.named_blocks())
        return out

    def encode(self) -> bytes:
        doc = {
            "version": VERSION,
            "link": [self.sender, self.receiver],
            "mac_blocks": list(self.mac_blocks),
            "budget_ms": self.budget_ms,
            "items": [item.to_json() for item in self.items],
        }
        return _dumps(doc).encode()


_dumps = json.JSONEncoder(separators=(",", ":")).encode


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_loads = json.JSONDecoder(parse_constant=_reject_constant).decode


def _json(body: bytes, what: str) -> Any:
    try:
        return _loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadRequestError(f"{what} is not UTF-8 JSON") from None


def decode_message(body: bytes) -> HopMessage:
    """The hop message in ``body``, or :class:`BadRequestError` naming what is wrong."""
    doc = _object(_json(body, "relay message"), "body")
    if doc.get("version") != VERSION:
        raise _fail("version", f"must be {VERSION}")
    link = _ints(doc.get("link"), "link", 2)
    if len(link) != 2 or link[0] == link[1]:
        raise _fail("link", "must be [sender KME ID, receiver KME ID]")
    items_doc = doc.get("items")
    if not isinstance(items_doc, list) or not 1 <= len(items_doc) <= MAX_ITEMS:
        raise _fail("items", f"must be an array of 1 to {MAX_ITEMS} items")
    items = tuple(RelayItem.from_json(item, f"items[{i}]") for i, item in enumerate(items_doc))
    if len({item.relay_id for item in items}) != len(items):
        raise _fail("items", "must have distinct relay_IDs")
    return HopMessage(
        sender=link[0],
        receiver=link[1],
        mac_blocks=_ints(doc.get("mac_blocks"), "mac_blocks", 64, 0),
        budget_ms=_int(doc.get("budget_ms"), "budget_ms", 1, MAX_BUDGET_MS),
        items=items,
    )


# --- answers ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ItemResult:
    """What happened to one item: 200 stored at the destination; otherwise the status of the hop that
    refused it (400, 409, 429, 503) and a message safe to show."""

    status: int
    message: str

    @property
    def ok(self) -> bool:
        return self.status == 200


STORED = ItemResult(200, "stored")


def encode_answer(results: Sequence[ItemResult]) -> bytes:
    doc = {"results": [{"status": r.status, "message": r.message} for r in results]}
    return _dumps(doc).encode()


class MalformedAnswer(ValueError):
    """An answer that is not a list of one result per item."""


def decode_answer(body: bytes, count: int) -> list[ItemResult]:
    try:
        doc = _json(body, "relay answer")
    except BadRequestError:
        raise MalformedAnswer("not JSON") from None
    results = doc.get("results") if isinstance(doc, dict) else None
    if not isinstance(results, list) or len(results) != count:
        raise MalformedAnswer("not one result per item")
    out = []
    for r in results:
        status = r.get("status") if isinstance(r, dict) else None
        if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
            raise MalformedAnswer("result without a status")
        out.append(ItemResult(status, str(r.get("message", ""))[:200]))
    return out


def answer_message(body: bytes) -> str:
    """The ``message`` of an error answer (ETSI Error body), for logs and the SAE's 503."""
    try:
        doc = _json(body, "answer")
    except BadRequestError:
        return "(no JSON body)"
    if isinstance(doc, dict) and isinstance(doc.get("message"), str):
        return doc["message"][:200]
    return "(no message)"
