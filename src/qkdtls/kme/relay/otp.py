"""One-time pads and one-time MACs over QKD link material (docs/design.md, network relay).

A pad is ``len(data)`` link bytes XORed onto the data; a MAC is Poly1305 (pyca/cryptography) keyed with 32
fresh link bytes: a Wegman-Carter authenticator whose security does not rest on any computational assumption,
provided the key is never used for a second message. :class:`OneTimeKey` enforces that in this
process: it computes or checks exactly one tag and then refuses. The store enforces it across processes and
crashes (the blocks are deleted, durably, before a tag or ciphertext made with them leaves the process).
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.poly1305 import Poly1305

MAC_KEY_BYTES = 32
TAG_BYTES = 16
# A hop message names the key of its own tag and the key of the answer's tag: two one-time keys.
MAC_MATERIAL_BYTES = 2 * MAC_KEY_BYTES


class KeyReused(RuntimeError):
    """A one-time key was asked for a second tag: a bug, never a peer's doing."""


def xor(data: bytes, pad: bytes) -> bytes:
    """``data`` XOR ``pad`` (same length): the one-time pad, in C speed through Python integers."""
    if len(data) != len(pad):
        raise ValueError("a pad must be exactly as long as the data")
    n = len(data)
    return (int.from_bytes(data, "little") ^ int.from_bytes(pad, "little")).to_bytes(n, "little")


def pad_bytes(blocks: Sequence[bytes], length: int) -> bytes:
    """The first ``length`` bytes of the concatenated blocks (the rest of the last block is burnt unused)."""
    material = b"".join(blocks)
    if len(material) < length:
        raise ValueError("not enough pad material")
    return material[:length]


def blocks_for(length: int, block_size: int) -> int:
    """Blocks a pad (or key) of ``length`` bytes takes."""
    return -(-length // block_size)


class OneTimeKey:
    """A 32-byte Poly1305 key that authenticates one message: :meth:`tag` or :meth:`verify`, once."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) != MAC_KEY_BYTES:
            raise ValueError("a one-time MAC key is 32 bytes")
        self._key: bytes | None = bytes(key)

    def __repr__(self) -> str:
        return f"OneTimeKey(used={self._key is None})"

    def _take(self) -> bytes:
        key, self._key = self._key, None
        if key is None:
            raise KeyReused("one-time MAC key used twice")
        return key

    def tag(self, data: bytes) -> bytes:
        return Poly1305.generate_tag(self._take(), data)

    def verify(self, data: bytes, tag: bytes) -> bool:
        """True when ``tag`` authenticates ``data`` (checked in constant time)."""
        key = self._take()
        if len(tag) != TAG_BYTES:
            return False
        try:
            Poly1305.verify_tag(key, data, tag)
        except InvalidSignature:
            return False
        return True


def mac_keys(material: bytes) -> tuple[OneTimeKey, OneTimeKey]:
    """The request key and the answer key from a hop message's MAC material (64 link bytes)."""
    if len(material) < MAC_MATERIAL_BYTES:
        raise ValueError("not enough MAC material")
    return OneTimeKey(material[:MAC_KEY_BYTES]), OneTimeKey(material[MAC_KEY_BYTES:MAC_MATERIAL_BYTES])
