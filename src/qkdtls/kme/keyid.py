"""Key IDs: random UUIDv4 (default) or the reference KME's derivation from the key bytes.

The reference KME names a key by SHA-1 of its bytes shaped as a version-5 UUID and then written with
Microsoft's little-endian field order (``uuid::Uuid::to_bytes_le``); ``reference_key_id`` reproduces that
string exactly so that TLS-QKD peers built on the reference code see the IDs they expect.

Such an ID is 122 bits of SHA-1 of the key, and TLS-QKD sends key IDs in clear: whoever watches the network
can test key guesses against it. A k-bit key then costs 2^k SHA-1 evaluations to recover (2^k / N with N
IDs seen). ``REFERENCE_MIN_KEY_SIZE`` = 128 keeps that at the generic security of AES-128 (the weakest TLS
suite these keys feed); the configuration refuses reference IDs with a smaller ``min_key_size``.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable

KEY_ID_MODES = ("random", "reference")
REFERENCE_MIN_KEY_SIZE = 128  # bits; see the module docstring


def random_key_id(_key: bytes = b"") -> str:
    return str(uuid.uuid4())


def reference_key_id(key: bytes) -> str:
    b = bytearray(hashlib.sha1(key).digest()[:16])
    b[6] = (b[6] & 0x0F) | 0x50
    b[8] = (b[8] & 0x3F) | 0x80
    return str(uuid.UUID(bytes_le=bytes(b)))


def key_id_factory(mode: str) -> Callable[[bytes], str]:
    if mode == "random":
        return random_key_id
    if mode == "reference":
        return reference_key_id
    raise ValueError(f"key_id_mode must be one of {', '.join(KEY_ID_MODES)}, not {mode!r}")
