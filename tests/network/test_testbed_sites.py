"""The testbed with N sites: a chain of three KMEs from `Testbed.create(saes=..., links=...)`, extra TOML
tables merged into the generated configurations, and key cycles over both links of the middle KME."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from qkdtls.etsi014.client import KmeClient, KmeClientSettings
from qkdtls.kme.config import load_config
from qkdtls.provision import ProvisionError, dump_toml, merge_tables
from qkdtls.testbed import Testbed, TestbedError, chain, ring, sites_saes


def _client(bed: Testbed, sae: int) -> KmeClient:
    cert, key, ca = bed.sae_credentials(sae)
    return KmeClient(KmeClientSettings(bed.sae_url(bed.kme_of(sae)), cert, key, ca, timeout=10.0))


def test_a_chain_of_three_sites_serves_keys_on_both_links(tmp_path: Path) -> None:
    bed = Testbed.create(
        tmp_path / "bed",
        saes=sites_saes(3),
        links=chain(3),
        initial_key_bytes=8192,
        local_key_bytes=0,
        kme_config={"service": {"reservation_ttl": 42.0}},
        site_config={2: {"kme": {"nickname": "the middle"}}},
    )
    configs = {k: load_config(bed.config_path(k)) for k in (1, 2, 3)}
    assert [sorted(p.kme_id for p in c.peers) for c in configs.values()] == [[2], [1, 3], [2]]
    assert {c.service.reservation_ttl for c in configs.values()} == {42.0}
    assert [c.nickname for c in configs.values()] == ["site A", "the middle", "site C"]
    assert sorted(bed.links) == [(1, 1), (1, 2), (2, 2), (2, 3), (3, 3)]
    files = {link: [len(list(f.glob("*.key"))) for f in ends.folders] for link, ends in bed.links.items()}
    assert files == {(1, 2): [1, 1], (2, 3): [1, 1], (1, 1): [0], (2, 2): [0], (3, 3): [0]}
    ready: list[int] = []
    bed.start(on_ready=ready.append)
    try:
        assert sorted(ready) == [1, 2, 3]
        for master, slave in ((1001, 2001), (3001, 2001), (2001, 3001)):
            with _client(bed, master) as m, _client(bed, slave) as s:
                got = m.enc_keys(str(slave), number=2)
                again = s.dec_keys(str(master), [k.key_ID for k in got.keys])
                assert [k.key for k in again.keys] == [k.key for k in got.keys]
    finally:
        bed.stop()
    assert all(bed.pid(k) is None for k in (1, 2, 3))


def test_networks_need_their_links_named(tmp_path: Path) -> None:
    with pytest.raises(TestbedError, match="say which pairs share a QKD link"):
        Testbed.create(tmp_path / "a", saes=sites_saes(3), initial_key_bytes=0)
    with pytest.raises(TestbedError, match="site_config names KME 9"):
        Testbed.create(tmp_path / "b", saes=sites_saes(2), site_config={9: {}}, initial_key_bytes=0)
    bed = Testbed.create(tmp_path / "c", saes=sites_saes(3), links=chain(3), initial_key_bytes=0)
    with pytest.raises(TestbedError, match="no link 1-3"):
        bed.add_key_material(32, link=(1, 3))
    assert ring(5)[-1] == (1, 5) and len(ring(5)) == 5


def test_extra_tables_merge_into_the_generated_ones() -> None:
    doc = {"service": {"block_size": 32}, "peers": [{"kme_id": 2}]}
    merge_tables(doc, {"service": {"max_key_per_request": 8}, "network": {"routes": [{"destination": 3}]}})
    merge_tables(doc, {"network": {"routes": [{"destination": 4, "path": [1, 2, 4]}], "hello": 0.5}})
    text = dump_toml(doc)
    assert tomllib.loads(text) == {
        "service": {"block_size": 32, "max_key_per_request": 8},
        "peers": [{"kme_id": 2}],
        "network": {"routes": [{"destination": 3}, {"destination": 4, "path": [1, 2, 4]}], "hello": 0.5},
    }
    with pytest.raises(ProvisionError, match=r"service: a value cannot replace a table"):
        merge_tables(doc, {"service": 3})
    with pytest.raises(ProvisionError, match=r"service.block_size: a table cannot replace a value"):
        merge_tables(doc, {"service": {"block_size": {"x": 1}}})
    odd = {"odd key": 'x"y', "t": True}
    assert tomllib.loads(dump_toml({"a": odd}))["a"] == odd
