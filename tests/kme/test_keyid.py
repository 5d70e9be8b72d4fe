"""Key IDs: random UUIDv4 and the reference KME's SHA-1 derivation."""

from __future__ import annotations

import uuid

import pytest

from qkdtls.kme.keyid import key_id_factory, random_key_id, reference_key_id
from qkdtls.kme.service import ServiceSettings


def test_reference_ids_match_the_rust_kme() -> None:
    assert reference_key_id(bytes(32)) == "7b848ade-8cff-3d54-a9b8-53a215e6ee77"
    assert reference_key_id(b"this_is_secret_key_1_of_32_bytes") == "8844cba7-29e1-3251-a50a-25da13e65eea"


def test_random_ids_are_uuid4() -> None:
    ids = {random_key_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(uuid.UUID(i).version == 4 for i in ids)


def test_factory() -> None:
    assert key_id_factory("reference") is reference_key_id
    assert key_id_factory("random") is random_key_id
    with pytest.raises(ValueError):
        key_id_factory("sha1")


def test_reference_ids_need_keys_of_at_least_128_bits() -> None:
    with pytest.raises(ValueError, match="min_key_size >= 128"):
        ServiceSettings(kme_id=1, key_id_mode="reference")  # min_key_size 64: 2^64 guesses find a key
    assert ServiceSettings(kme_id=1, key_id_mode="reference", min_key_size=128).min_key_size == 128
