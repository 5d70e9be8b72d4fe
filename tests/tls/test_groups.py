"""Key exchange groups: both sides agree; malformed shares are illegal_parameter."""

from __future__ import annotations

import pytest

from qkdtls.tls.alerts import IllegalParameter
from qkdtls.tls.groups import KeyShare, NamedGroup, parse_group, server_exchange


@pytest.mark.parametrize("group", list(NamedGroup))
def test_client_and_server_agree(group: NamedGroup) -> None:
    share = KeyShare(group)
    server_share, server_secret = server_exchange(group, share.public)
    assert share.exchange(server_share) == server_secret
    expected = {NamedGroup.X25519MLKEM768: 64, NamedGroup.secp384r1: 48}.get(group, 32)
    assert len(server_secret) == expected


@pytest.mark.parametrize("group", list(NamedGroup))
def test_malformed_shares(group: NamedGroup) -> None:
    share = KeyShare(group)
    for bad in (b"", b"\x04" + bytes(10), share.public[:-1]):
        with pytest.raises(IllegalParameter):
            server_exchange(group, bad)
        with pytest.raises(IllegalParameter):
            share.exchange(bad)


def test_low_order_x25519_point_refused() -> None:
    with pytest.raises(IllegalParameter):
        KeyShare(NamedGroup.x25519).exchange(bytes(32))


def test_point_not_on_curve() -> None:
    with pytest.raises(IllegalParameter):
        server_exchange(NamedGroup.secp256r1, b"\x04" + b"\x01" * 64)


def test_names() -> None:
    assert parse_group("P-256") is NamedGroup.secp256r1
    assert parse_group(0x11EC) is NamedGroup.X25519MLKEM768
    with pytest.raises(ValueError):
        parse_group("ffdhe2048")
