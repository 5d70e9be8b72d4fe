"""The inter-KME reservation: the master KME tells the slave KME which blocks form which keys.

``POST /kme/v1/reservations`` carries :meth:`Reservation.to_json`. Decoding is total: any malformed
document raises :class:`BadRequestError` naming the field. No key bytes travel: both KMEs hold the same
blocks, so block sequence numbers are enough.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qkdtls.etsi014.models import canonical_uuid
from qkdtls.kme.errors import BadRequestError

_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1
# Bounds that keep a hostile document cheap to check; a real request needs at most
# max_key_per_request keys of max_key_size bits, far below these.
MAX_KEYS = 4096
MAX_BLOCKS_PER_KEY = 4096
MAX_SLAVES = 64


def _int(doc: dict[str, Any], name: str, lo: int = _I64_MIN, hi: int = _I64_MAX) -> int:
    value = doc.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise BadRequestError(f"reservation {name} must be an integer in {lo}..{hi}")
    return value


def _int_list(value: Any, name: str, limit: int, lo: int = _I64_MIN) -> tuple[int, ...]:
    if not isinstance(value, list) or not 1 <= len(value) <= limit:
        raise BadRequestError(f"reservation {name} must be a non-empty array of at most {limit} integers")
    for item in value:
        if not isinstance(item, int) or isinstance(item, bool) or not lo <= item <= _I64_MAX:
            raise BadRequestError(f"reservation {name} must contain integers in {lo}..{_I64_MAX}")
    return tuple(value)


@dataclass(frozen=True, slots=True)
class ReservedKey:
    key_ID: str
    blocks: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Reservation:
    master_KME_ID: int
    direction: int
    master_SAE_ID: int
    slave_SAE_IDs: tuple[int, ...]
    size: int  # bits
    keys: tuple[ReservedKey, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "master_KME_ID": self.master_KME_ID,
            "direction": self.direction,
            "master_SAE_ID": self.master_SAE_ID,
            "slave_SAE_IDs": list(self.slave_SAE_IDs),
            "size": self.size,
            "keys": [{"key_ID": k.key_ID, "blocks": list(k.blocks)} for k in self.keys],
        }

    @classmethod
    def from_json(cls, doc: Any) -> Reservation:
        if not isinstance(doc, dict):
            raise BadRequestError("reservation must be a JSON object")
        keys_doc = doc.get("keys")
        if not isinstance(keys_doc, list) or not 1 <= len(keys_doc) <= MAX_KEYS:
            raise BadRequestError(f"reservation keys must be a non-empty array of at most {MAX_KEYS} objects")
        keys: list[ReservedKey] = []
        for item in keys_doc:
            if not isinstance(item, dict):
                raise BadRequestError("each reserved key must be an object with key_ID and blocks")
            key_id = item.get("key_ID")
            canonical = canonical_uuid(key_id) if isinstance(key_id, str) else None
            if canonical is None:
                raise BadRequestError("reserved key_ID must be a UUID string")
            blocks = _int_list(item.get("blocks"), "blocks", MAX_BLOCKS_PER_KEY, 0)
            keys.append(ReservedKey(canonical, blocks))
        return cls(
            master_KME_ID=_int(doc, "master_KME_ID"),
            direction=_int(doc, "direction", 0, 1),
            master_SAE_ID=_int(doc, "master_SAE_ID"),
            slave_SAE_IDs=_int_list(doc.get("slave_SAE_IDs"), "slave_SAE_IDs", MAX_SLAVES),
            size=_int(doc, "size", 8, 2**31 - 1),
            keys=tuple(keys),
        )
