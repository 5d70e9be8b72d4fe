"""Link-state adverts: what one KME tells the network about itself, and a total decoder for them.

An advert says, for its ``origin`` KME: its QKD links (the peer, whether the peer is heard from, the free
blocks of each direction) and the SAEs attached to it. ``seq`` orders the adverts of one origin (a higher one
replaces a lower one; origins start at the wall clock in milliseconds, so it grows across restarts).
``boot`` is the first ``seq`` of the origin's process: a neighbour that sees it change knows the origin
restarted with an empty database and sends it everything it holds.
``path`` lists the KMEs the advert travelled through, the origin first and the sender last: a KME never
sends an advert to a KME on its path, so a flooded advert cannot loop, and one that claims to has been
tampered with (docs/design.md, "Network: topology and routing").

Wire format of ``POST /kme/v1/link-state`` (JSON)::

    {"version": 1, "adverts": [
      {"origin": 2, "seq": 1730000000123, "boot": 1730000000001, "path": [2],
       "links": [{"peer": 1, "up": true, "stock_out_blocks": 4096, "stock_in_blocks": 4090}],
       "saes": [2001], "name": "site B"}]}

``stock_out_blocks`` is what the origin draws on that link (its own direction), ``stock_in_blocks`` what
the peer draws. Unknown fields are ignored (a newer KME may add some); everything else is checked here and
any mistake is a typed :class:`AdvertError` (the endpoint answers 400), never another exception.

Pure code: no I/O, no clock.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

VERSION = 1
# Bounds on what one request may make a KME parse and hold.
MAX_BODY_BYTES = 256 << 10  # decoded in about 5 ms; the largest possible advert is about 110 KiB
MAX_BATCH = 64  # adverts per request
MAX_LINKS = 256  # links per advert
MAX_SAES = 4096  # SAE IDs per advert
MAX_PATH = 64  # KMEs an advert may travel through
MAX_NAME = 128  # characters of the origin's nickname

_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1


class AdvertError(ValueError):
    """An advert or batch that cannot be accepted; the message is safe to show the sender."""


class MalformedAdvert(AdvertError):
    """Not valid JSON, a wrong type, a missing field, a value out of range, or a misrouted advert."""


class OversizedAdvert(AdvertError):
    """Beyond the bounds above (or the capacity of the link-state database)."""


class LoopingAdvert(AdvertError):
    """The advert's path repeats a KME or passes through the receiving KME already."""


class StaleAdvert(AdvertError):
    """The sender's own advert is older than (or conflicts with) one already installed: a replay, or a
    sender whose clock went back. ``known_seq`` lets an honest sender continue above it."""

    def __init__(self, message: str, origin: int, known_seq: int) -> None:
        super().__init__(message)
        self.origin = origin
        self.known_seq = known_seq


@dataclass(frozen=True, slots=True)
class LinkState:
    """One QKD link as its origin sees it."""

    peer: int
    up: bool  # the origin heard from this peer within its dead interval
    stock_out_blocks: int  # free blocks the origin draws (its direction)
    stock_in_blocks: int  # free blocks the peer draws

    def to_json(self) -> dict[str, Any]:
        return {
            "peer": self.peer,
            "up": self.up,
            "stock_out_blocks": self.stock_out_blocks,
            "stock_in_blocks": self.stock_in_blocks,
        }


@dataclass(frozen=True, slots=True)
class Advert:
    origin: int
    seq: int
    boot: int  # the first seq of the origin's process (0 <= boot <= seq)
    links: tuple[LinkState, ...]  # sorted by peer, one per peer
    saes: tuple[int, ...]  # sorted, distinct
    path: tuple[int, ...] = ()  # origin first, the sender last; empty until sent
    name: str = ""  # the origin's nickname (for people: maps, logs)

    def same_content(self, other: Advert) -> bool:
        """Same origin, seq, boot, links, SAEs and name (the path says how it came, not what it says)."""
        return dataclasses.replace(self, path=()) == dataclasses.replace(other, path=())

    def sent_by(self, kme_id: int) -> Advert:
        """This advert as ``kme_id`` sends it on (``kme_id`` appended to the path)."""
        return dataclasses.replace(self, path=(*self.path, kme_id))

    def link(self, peer: int) -> LinkState | None:
        for link in self.links:
            if link.peer == peer:
                return link
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "origin": self.origin,
            "seq": self.seq,
            "boot": self.boot,
            "path": list(self.path),
            "links": [link.to_json() for link in self.links],
            "saes": list(self.saes),
            "name": self.name,
        }


def make_advert(
    origin: int,
    seq: int,
    links: Iterable[LinkState],
    saes: Iterable[int],
    path: tuple[int, ...] = (),
    name: str = "",
    boot: int | None = None,
) -> Advert:
    """An advert in canonical form (links sorted by peer, SAEs sorted); checks what the decoder checks."""
    advert = Advert(
        origin,
        seq,
        seq if boot is None else boot,
        tuple(sorted(links, key=lambda link: link.peer)),
        tuple(sorted(set(saes))),
        path,
        name[:MAX_NAME],
    )
    _check_links(advert.links, origin, "advert")
    if not 0 <= advert.boot <= seq:
        raise MalformedAdvert("boot must lie within 0..seq")
    if len(advert.saes) > MAX_SAES:
        raise OversizedAdvert(f"an advert lists at most {MAX_SAES} SAEs")
    return advert


def encode_advert(advert: Advert) -> bytes:
    return json.dumps(advert.to_json(), separators=(",", ":")).encode()


def join_batch(encoded: Iterable[bytes]) -> bytes:
    """A request body from adverts encoded by :func:`encode_advert`."""
    return b'{"version":%d,"adverts":[' % VERSION + b",".join(encoded) + b"]}"


BATCH_OVERHEAD = len(join_batch([]))


def encode_batch(adverts: Iterable[Advert]) -> bytes:
    return join_batch(encode_advert(a) for a in adverts)


# --- decoding -----------------------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_decode = json.JSONDecoder(parse_constant=_reject_constant).decode


def decode_batch(raw: bytes) -> list[Advert]:
    """The adverts of one request body; :class:`AdvertError` for anything wrong, nothing else."""
    if len(raw) > MAX_BODY_BYTES:
        raise OversizedAdvert(f"a link-state request carries at most {MAX_BODY_BYTES} bytes")
    try:
        doc = _decode(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise MalformedAdvert("the body must be UTF-8 encoded JSON") from None
    except (ValueError, RecursionError):
        # ValueError also covers integers beyond Python's digit limit; RecursionError very deep nesting.
        raise MalformedAdvert("the body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise MalformedAdvert("the body must be a JSON object")
    if doc.get("version") != VERSION or isinstance(doc.get("version"), bool):
        raise MalformedAdvert(f"version must be {VERSION}")
    items = doc.get("adverts")
    if not isinstance(items, list) or not items:
        raise MalformedAdvert("adverts must be a non-empty array")
    if len(items) > MAX_BATCH:
        raise OversizedAdvert(f"a request carries at most {MAX_BATCH} adverts")
    adverts = [decode_advert(item, f"adverts[{i}]") for i, item in enumerate(items)]
    origins = [a.origin for a in adverts]
    if len(set(origins)) != len(origins):
        raise MalformedAdvert("a request carries at most one advert per origin")
    return adverts


def decode_advert(doc: Any, where: str = "advert") -> Advert:
    if not isinstance(doc, dict):
        raise MalformedAdvert(f"{where} must be a JSON object")
    origin = _int(doc, "origin", where)
    seq = _int(doc, "seq", where, lo=0)
    boot = _int(doc, "boot", where, lo=0)
    if boot > seq:
        raise MalformedAdvert(f"{where}.boot must not exceed seq")
    path = _path(doc.get("path"), origin, where)
    links = _links(doc.get("links"), origin, where)
    saes = _saes(doc.get("saes"), where)
    name = doc.get("name", "")
    if not isinstance(name, str) or len(name) > MAX_NAME:
        raise MalformedAdvert(f"{where}.name must be a string of at most {MAX_NAME} characters")
    return Advert(origin, seq, boot, links, saes, path, name)


def _int(doc: dict[str, Any], name: str, where: str, *, lo: int = _I64_MIN) -> int:
    value = doc.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= _I64_MAX:
        raise MalformedAdvert(f"{where}.{name} must be an integer within {lo}..{_I64_MAX}")
    return value


def _ids(value: Any, field: str, what: str, limit: int, kind: str) -> list[int]:
    """A JSON array of at most ``limit`` 64-bit IDs (``field`` names it in errors, ``what`` the bound)."""
    if not isinstance(value, list):
        raise MalformedAdvert(f"{field} must be an array of {kind}")
    if len(value) > limit:
        raise OversizedAdvert(f"{field}: {what.format(limit)}")
    for item in value:
        if not isinstance(item, int) or isinstance(item, bool) or not _I64_MIN <= item <= _I64_MAX:
            raise MalformedAdvert(f"{field} must be an array of 64-bit {kind}")
    return value


def _path(value: Any, origin: int, where: str) -> tuple[int, ...]:
    path = _ids(value, f"{where}.path", "an advert travels through at most {} KMEs", MAX_PATH, "KME IDs")
    if not path:
        raise MalformedAdvert(f"{where}.path must be a non-empty array of KME IDs")
    if path[0] != origin:
        raise MalformedAdvert(f"{where}.path must start with the origin")
    if len(set(path)) != len(path):
        raise LoopingAdvert(f"{where}.path passes through a KME twice")
    return tuple(path)


def _links(value: Any, origin: int, where: str) -> tuple[LinkState, ...]:
    if not isinstance(value, list):
        raise MalformedAdvert(f"{where}.links must be an array")
    if len(value) > MAX_LINKS:
        raise OversizedAdvert(f"{where}.links: an advert lists at most {MAX_LINKS} links")
    links = []
    for i, item in enumerate(value):
        here = f"{where}.links[{i}]"
        if not isinstance(item, dict):
            raise MalformedAdvert(f"{here} must be a JSON object")
        up = item.get("up")
        if not isinstance(up, bool):
            raise MalformedAdvert(f"{here}.up must be true or false")
        links.append(
            LinkState(
                peer=_int(item, "peer", here),
                up=up,
                stock_out_blocks=_int(item, "stock_out_blocks", here, lo=0),
                stock_in_blocks=_int(item, "stock_in_blocks", here, lo=0),
            )
        )
    links.sort(key=lambda link: link.peer)
    _check_links(links, origin, f"{where}.links")
    return tuple(links)


def _check_links(links: Iterable[LinkState], origin: int, where: str) -> None:
    peers = [link.peer for link in links]
    if len(peers) > MAX_LINKS:
        raise OversizedAdvert(f"{where}: an advert lists at most {MAX_LINKS} links")
    if origin in peers:
        raise MalformedAdvert(f"{where}: a KME has no QKD link to itself")
    if len(set(peers)) != len(peers):
        raise MalformedAdvert(f"{where}: one entry per peer")


def _saes(value: Any, where: str) -> tuple[int, ...]:
    listed = _ids(value, f"{where}.saes", "an advert lists at most {} SAEs", MAX_SAES, "SAE IDs")
    saes = tuple(sorted(set(listed)))
    if len(saes) != len(listed):
        raise MalformedAdvert(f"{where}.saes lists an SAE twice")
    return saes
