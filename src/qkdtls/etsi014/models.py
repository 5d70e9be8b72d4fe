"""The JSON objects of ETSI GS QKD 014 v1.1.1 §6 (Status, Key request, Key container, Key IDs, Error).

Decoding is total: any malformed document raises :class:`BadRequest` naming the offending field, which the
KME turns into an HTTP 400 with an ETSI ``Error`` body. Sizes are in bits, as in the specification.
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# The normative 400 messages of ETSI GS QKD 014 §5 (Tables 4, 6, 8).
MSG_SIZE_MULTIPLE_OF_8 = "size shall be a multiple of 8"
MSG_EXT_MANDATORY_UNSUPPORTED = "not all extension_mandatory parameters are supported"
MSG_EXT_MANDATORY_UNMET = "not all extension_mandatory request options could be met"
MSG_EXT_OPTIONAL_UNHANDLED = "not all extension_optional request options handled"
MSG_KEYS_NOT_FOUND = "one or more keys specified are not found on KME"

# JSON numbers beyond this cannot be a key count or a size; rejecting them early keeps arithmetic bounded.
_MAX_JSON_INT = 2**63 - 1


class BadRequest(ValueError):
    """A request document that does not follow ETSI 014 §6; ``message`` is safe to show to the caller."""

    def __init__(self, message: str, details: Sequence[Mapping[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = list(details) if details else None


def _int_field(doc: Mapping[str, Any], name: str, *, minimum: int) -> int | None:
    if name not in doc:
        return None
    value = doc[name]
    # bool is an int subclass in Python; JSON true is not a number.
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequest(f"{name} must be an integer")
    if value < minimum or value > _MAX_JSON_INT:
        raise BadRequest(f"{name} must be between {minimum} and {_MAX_JSON_INT}")
    return value


def _object_list(doc: Mapping[str, Any], name: str) -> list[dict[str, Any]]:
    value = doc.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise BadRequest(f"{name} must be an array of objects")
    return value


def _optional_object(doc: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    value = doc.get(name)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadRequest(f"{name} must be an object")
    return value


_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def canonical_uuid(text: str) -> str | None:
    """The canonical lower-case hyphenated form of a UUID string (any form ``uuid.UUID`` reads), or None."""
    if _CANONICAL_UUID.fullmatch(text):
        return text  # the form every KME and client sends: no UUID object needed
    if len(text) > 64:
        return None
    try:
        return str(uuid.UUID(text))
    except ValueError:
        return None


def parse_key_id(text: Any, name: str = "key_ID") -> str:
    """Canonical lower-case hyphenated form of a key ID, or :class:`BadRequest`."""
    canonical = canonical_uuid(text) if isinstance(text, str) else None
    if canonical is None:
        raise BadRequest(f"{name} must be a UUID string")
    return canonical


@dataclass(frozen=True, slots=True)
class Status:
    """ETSI 014 Table 9. IDs are strings on the wire; sizes in bits."""

    source_KME_ID: str
    target_KME_ID: str
    master_SAE_ID: str
    slave_SAE_ID: str
    key_size: int
    stored_key_count: int
    max_key_count: int
    max_key_per_request: int
    max_key_size: int
    min_key_size: int
    max_SAE_ID_count: int
    status_extension: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.stored_key_count <= self.max_key_count:
            raise ValueError("stored_key_count must lie within 0..max_key_count")
        if not self.min_key_size <= self.key_size <= self.max_key_size:
            raise ValueError("key_size must lie within min_key_size..max_key_size")

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "source_KME_ID": self.source_KME_ID,
            "target_KME_ID": self.target_KME_ID,
            "master_SAE_ID": self.master_SAE_ID,
            "slave_SAE_ID": self.slave_SAE_ID,
            "key_size": self.key_size,
            "stored_key_count": self.stored_key_count,
            "max_key_count": self.max_key_count,
            "max_key_per_request": self.max_key_per_request,
            "max_key_size": self.max_key_size,
            "min_key_size": self.min_key_size,
            "max_SAE_ID_count": self.max_SAE_ID_count,
        }
        if self.status_extension is not None:
            doc["status_extension"] = self.status_extension
        return doc

    @classmethod
    def from_json(cls, doc: Any) -> Status:
        if not isinstance(doc, dict):
            raise BadRequest("Status must be a JSON object")
        for name in _STATUS_IDS + _STATUS_INTS:
            if name not in doc:
                raise BadRequest(f"Status lacks {name}")
        ids: dict[str, Any] = {}
        for name in _STATUS_IDS:
            value = doc[name]
            # IDs are strings on the wire; a JSON number is tolerated, anything else is not an ID.
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise BadRequest(f"{name} must be a string")
            ids[name] = str(value)
        # Strict integers: int() would also take 256.7, "256" or a float infinity (OverflowError).
        ints = {name: _int_field(doc, name, minimum=0) for name in _STATUS_INTS}
        try:
            return cls(**ids, **ints, status_extension=_optional_object(doc, "status_extension"))
        except ValueError as exc:
            raise BadRequest(f"Status is inconsistent: {exc}") from None


_STATUS_IDS = ("source_KME_ID", "target_KME_ID", "master_SAE_ID", "slave_SAE_ID")
_STATUS_INTS = (
    "key_size",
    "stored_key_count",
    "max_key_count",
    "max_key_per_request",
    "max_key_size",
    "min_key_size",
    "max_SAE_ID_count",
)


@dataclass(frozen=True, slots=True)
class KeyRequest:
    """ETSI 014 Table 10. ``number``/``size`` are None when the caller left them to the KME's defaults."""

    number: int | None = None
    size: int | None = None
    additional_slave_SAE_IDs: tuple[str, ...] = ()
    extension_mandatory: tuple[dict[str, Any], ...] = ()
    extension_optional: tuple[dict[str, Any], ...] = ()

    @classmethod
    def from_json(cls, doc: Any) -> KeyRequest:
        if doc is None:
            return cls()
        if not isinstance(doc, dict):
            raise BadRequest("Key request must be a JSON object")
        slaves = doc.get("additional_slave_SAE_IDs")
        if slaves is None:
            slaves = []
        if not isinstance(slaves, list) or not all(
            isinstance(s, (str, int)) and not isinstance(s, bool) for s in slaves
        ):
            raise BadRequest("additional_slave_SAE_IDs must be an array of SAE IDs")
        return cls(
            number=_int_field(doc, "number", minimum=1),
            size=_int_field(doc, "size", minimum=1),
            additional_slave_SAE_IDs=tuple(str(s) for s in slaves),
            extension_mandatory=tuple(_object_list(doc, "extension_mandatory")),
            extension_optional=tuple(_object_list(doc, "extension_optional")),
        )

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> KeyRequest:
        """The GET form (§5.2): only ``number`` and ``size`` may travel as query parameters."""
        extra = sorted(set(query) - {"number", "size"})
        if extra:
            raise BadRequest(f"GET enc_keys takes only number and size; use POST for {', '.join(extra)}")
        doc: dict[str, Any] = {}
        for name in ("number", "size"):
            if name in query:
                text = query[name]
                if not text.isascii() or not text.isdigit() or len(text) > 19:
                    raise BadRequest(f"{name} must be a positive integer")
                doc[name] = int(text)
        return cls.from_json(doc)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        if self.number is not None:
            doc["number"] = self.number
        if self.size is not None:
            doc["size"] = self.size
        if self.additional_slave_SAE_IDs:
            doc["additional_slave_SAE_IDs"] = list(self.additional_slave_SAE_IDs)
        if self.extension_mandatory:
            doc["extension_mandatory"] = list(self.extension_mandatory)
        if self.extension_optional:
            doc["extension_optional"] = list(self.extension_optional)
        return doc


@dataclass(frozen=True, slots=True, repr=False)
class Key:
    """One element of a Key container. ``repr`` never shows the key bytes."""

    key_ID: str
    key: bytes
    key_ID_extension: dict[str, Any] | None = None
    key_extension: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"Key(key_ID={self.key_ID!r}, size={len(self.key) * 8} bits)"

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"key_ID": self.key_ID, "key": base64.b64encode(self.key).decode("ascii")}
        if self.key_ID_extension is not None:
            doc["key_ID_extension"] = self.key_ID_extension
        if self.key_extension is not None:
            doc["key_extension"] = self.key_extension
        return doc

    @classmethod
    def from_json(cls, doc: Any) -> Key:
        if not isinstance(doc, dict):
            raise BadRequest("each key must be a JSON object")
        key_id = parse_key_id(doc.get("key_ID"))
        encoded = doc.get("key")
        if not isinstance(encoded, str):
            raise BadRequest("key must be a base64 string")
        try:
            material = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("key must be a base64 string") from None
        return cls(
            key_ID=key_id,
            key=material,
            key_ID_extension=_optional_object(doc, "key_ID_extension"),
            key_extension=_optional_object(doc, "key_extension"),
        )


@dataclass(frozen=True, slots=True)
class KeyContainer:
    """ETSI 014 Table 11 (the field is ``keys``, as in the specification's examples)."""

    keys: tuple[Key, ...]
    key_container_extension: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"keys": [k.to_json() for k in self.keys]}
        if self.key_container_extension is not None:
            doc["key_container_extension"] = self.key_container_extension
        return doc

    @classmethod
    def from_json(cls, doc: Any) -> KeyContainer:
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise BadRequest("Key container must be an object with a keys array")
        return cls(
            keys=tuple(Key.from_json(k) for k in doc["keys"]),
            key_container_extension=_optional_object(doc, "key_container_extension"),
        )


@dataclass(frozen=True, slots=True)
class KeyIDs:
    """ETSI 014 Table 12: the body of a POST dec_keys."""

    key_IDs: tuple[str, ...]
    key_IDs_extension: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"key_IDs": [{"key_ID": k} for k in self.key_IDs]}
        if self.key_IDs_extension is not None:
            doc["key_IDs_extension"] = self.key_IDs_extension
        return doc

    @classmethod
    def from_json(cls, doc: Any) -> KeyIDs:
        if not isinstance(doc, dict):
            raise BadRequest("Key IDs must be a JSON object")
        items = doc.get("key_IDs")
        if not isinstance(items, list) or not items:
            raise BadRequest("key_IDs must be a non-empty array")
        ids: list[str] = []
        for item in items:
            if not isinstance(item, dict):
                raise BadRequest("each element of key_IDs must be an object with key_ID")
            ids.append(parse_key_id(item.get("key_ID")))
        return cls(key_IDs=tuple(ids), key_IDs_extension=_optional_object(doc, "key_IDs_extension"))


@dataclass(frozen=True, slots=True)
class Error:
    """ETSI 014 Table 13."""

    message: str
    details: list[dict[str, Any]] | None = field(default=None)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"message": self.message}
        if self.details:
            doc["details"] = self.details
        return doc


@dataclass(frozen=True, slots=True)
class SaeInfo:
    """The answer of ``GET /api/v1/sae/info/me`` (not in ETSI 014; the reference TLS-QKD client needs it)."""

    SAE_ID: int
    KME_ID: int

    def to_json(self) -> dict[str, Any]:
        return {"SAE_ID": self.SAE_ID, "KME_ID": self.KME_ID}

    @classmethod
    def from_json(cls, doc: Any) -> SaeInfo:
        if not isinstance(doc, dict):
            raise BadRequest("SAE info must be a JSON object")
        sae, kme = doc.get("SAE_ID"), doc.get("KME_ID")
        for name, value in (("SAE_ID", sae), ("KME_ID", kme)):
            # IDs are signed 64-bit integers (docs/design.md, Identities).
            if not isinstance(value, int) or isinstance(value, bool) or not -(2**63) <= value < 2**63:
                raise BadRequest(f"{name} must be a 64-bit integer")
        return cls(SAE_ID=sae, KME_ID=kme)
