"""Pure relay code: secret sharing over GF(2^8), one-time pads and one-time MAC keys, mode choice."""

from __future__ import annotations

import itertools
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkdtls.etsi014.models import MSG_EXT_MANDATORY_UNMET, MSG_EXT_MANDATORY_UNSUPPORTED
from qkdtls.kme.errors import BadRequestError
from qkdtls.kme.relay import sharing
from qkdtls.kme.relay.otp import KeyReused, OneTimeKey, mac_keys, xor
from qkdtls.kme.relay.policy import RelayChoice, RelayPolicy, choose


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=1, max_size=64), st.integers(2, 6), st.data())
def test_any_k_shamir_shares_rebuild_the_secret(secret: bytes, n: int, data: st.DataObject) -> None:
    k = data.draw(st.integers(2, n))
    shares = sharing.shamir_split(secret, k, n)
    assert sharing.shamir_consistent(shares, k)
    for subset in itertools.combinations(shares, k):
        assert sharing.shamir_combine(list(subset)) == secret


def test_one_share_of_two_is_independent_of_the_secret() -> None:
    """Perfect secrecy of our split, by enumeration (k = 2): for a share seen, every secret byte is produced
    by exactly one of the 256 random coefficients, so the share says nothing about the secret."""
    seen_x, seen_y = 2, 0x5A
    counts = dict.fromkeys(range(256), 0)
    for secret in range(256):
        for coefficient in range(256):
            shares = sharing.shamir_split(
                bytes([secret]), 2, 3, random_bytes=lambda n, c=coefficient: bytes([c])
            )
            if dict(shares)[seen_x] == bytes([seen_y]):
                counts[secret] += 1
    assert set(counts.values()) == {1}


def test_xor_sharing() -> None:
    parts = [os.urandom(16) for _ in range(3)]
    secret = sharing.xor_combine(parts)
    assert sharing.xor_complete(secret, parts[:2]) == parts[2]
    with pytest.raises(sharing.ShareError):
        sharing.xor_combine([b"a", b"bc"])


def test_invalid_shares_are_typed_errors() -> None:
    with pytest.raises(sharing.ShareError):
        sharing.shamir_split(b"x", 1, 3)
    with pytest.raises(sharing.ShareError):
        sharing.shamir_combine([(1, b"a"), (1, b"b")])
    with pytest.raises(sharing.ShareError):
        sharing.shamir_combine([(0, b"a")])
    with pytest.raises(sharing.ShareError):
        sharing.shamir_combine([(1, b"a"), (2, b"bc")])


def test_gf_arithmetic_is_a_field() -> None:
    for a in range(1, 256):
        assert sharing.gf_mul(a, sharing.gf_div(1, a)) == 1
    assert sharing.gf_mul(0x57, 0x83) == 0xC1  # FIPS-197 example


def test_a_one_time_key_authenticates_once() -> None:
    key = OneTimeKey(os.urandom(32))
    tag = key.tag(b"message")
    with pytest.raises(KeyReused):
        key.tag(b"another")
    material = os.urandom(64)
    request, answer = mac_keys(material)
    assert repr(request) == "OneTimeKey(used=False)" and material[:32].hex() not in repr(request)
    assert not answer.verify(b"message", tag)  # another key
    with pytest.raises(KeyReused):
        answer.verify(b"message", tag)
    with pytest.raises(ValueError):
        OneTimeKey(b"short")
    assert xor(b"\x0f\xf0", b"\xff\xff") == b"\xf0\x0f"


def test_mode_choice_follows_policy_and_extensions() -> None:
    trusted, spread = RelayPolicy(), RelayPolicy(mode="spread", paths=3, threshold=2)
    assert choose(trusted) == RelayChoice("trusted")
    assert choose(spread) == RelayChoice("spread", 3, 2, fallback=False)
    ask = [{"qkdtls_relay_mode": "spread", "qkdtls_relay_paths": 4}]
    assert choose(trusted, optional=ask) == RelayChoice("spread", 4, 4)
    assert choose(RelayPolicy(fallback=True), optional=ask).fallback
    assert not choose(RelayPolicy(fallback=True), mandatory=ask).fallback  # mandatory: never downgraded
    assert choose(RelayPolicy(mode="spread"), optional=[{"qkdtls_relay_mode": "trusted"}]).mode == "spread"
    assert choose(
        RelayPolicy(mode="spread", fallback=True), mandatory=[{"qkdtls_relay_mode": "trusted"}]
    ).mode == ("trusted")
    with pytest.raises(BadRequestError, match=MSG_EXT_MANDATORY_UNMET):
        choose(RelayPolicy(mode="spread"), mandatory=[{"qkdtls_relay_mode": "trusted"}])
    with pytest.raises(BadRequestError, match=MSG_EXT_MANDATORY_UNSUPPORTED):
        choose(trusted, mandatory=[{"abc_route": 1}])
    for bad in ({"qkdtls_relay_mode": "fast"}, {"qkdtls_relay_mode": "spread", "qkdtls_relay_paths": 1}):
        with pytest.raises(BadRequestError):
            choose(trusted, optional=[bad])
    with pytest.raises(BadRequestError):
        choose(
            trusted,
            mandatory=[{"qkdtls_relay_mode": "spread", "qkdtls_relay_paths": 2, "qkdtls_relay_threshold": 3}],
        )
