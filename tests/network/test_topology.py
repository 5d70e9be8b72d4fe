"""Topology files: the shipped examples describe the networks they claim, and every mistake is reported with
the file and the field that holds it."""

from __future__ import annotations

from pathlib import Path

import pytest

from qkdtls.network.topology import EXAMPLES, TopologyError, example_path, load_topology, parse_topology

PAPER_LINKS = {
    (1, 2), (1, 3), (1, 4), (2, 5), (2, 6), (3, 5), (3, 6), (3, 7), (4, 6), (4, 7), (5, 8), (6, 8), (7, 8),
}  # fmt: skip


def _links(name: str) -> set[tuple[int, int]]:
    return {link.pair for link in load_topology(example_path(name)).links}


def test_the_examples_are_the_networks_they_name() -> None:
    assert sorted(EXAMPLES) == ["chain-4", "ring-5", "spread-8"]
    chain = load_topology(example_path("chain-4"))
    assert [s.kme_id for s in chain.sites] == [1, 2, 3, 4]
    assert _links("chain-4") == {(1, 2), (2, 3), (3, 4)}
    assert chain.hops(1)[4] == 3  # the end sites are three links apart
    assert {link.pair: link.rate for link in chain.links} == {(1, 2): 16384, (2, 3): 32768, (3, 4): 16384}
    assert [(s.sae_port, s.inter_kme_port) for s in chain.sites] == [(8440, 8441), (8442, 8443), (8444, 8445),
                                                                     (8446, 8447)]  # fmt: skip
    assert _links("ring-5") == {(1, 2), (2, 3), (3, 4), (4, 5), (1, 5)}
    assert _links("spread-8") == PAPER_LINKS
    paper = load_topology(example_path("spread-8"))
    assert paper.hops(1)[8] == 3 and paper.islands() == [list(range(1, 9))]
    # Every example has SAEs at every site and its own ports: all three can run side by side.
    ports = [p for name in EXAMPLES for s in load_topology(example_path(name)).sites
             for p in (s.sae_port, s.inter_kme_port)]  # fmt: skip
    assert len(ports) == len(set(ports))
    assert all(s.saes for name in EXAMPLES for s in load_topology(example_path(name)).sites)


GOOD = """
name = "t"
[defaults]
rate = "8K"
[[sites]]
kme_id = 1
saes = [1001]
[[sites]]
kme_id = 2
saes = [2001]
[[links]]
between = [1, 2]
"""


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (('rate = "8K"', 'rate = "fast"'), "t.toml: defaults.rate: 'fast' is not a size"),
        (('rate = "8K"', "rate = 0"), "t.toml: defaults.rate: must be between 1 and"),
        (('rate = "8K"', "speed = 1"), "t.toml: defaults.speed: unknown field"),
        (("kme_id = 2", "kme_id = 1"), "t.toml: sites[1].kme_id: KME 1 is also sites[0]"),
        (("kme_id = 2", 'kme_id = "2"'), "t.toml: sites[1].kme_id: must be an integer"),
        (("saes = [2001]", "saes = [1001]"), "t.toml: sites[1].saes[0]: SAE 1001 is also listed at sites[0]"),
        (("saes = [2001]", "saes = 2001"), "t.toml: sites[1].saes: must be an array of SAE IDs"),
        (("saes = [2001]", "saes = [2001]\nport = 1"), "t.toml: sites[1].port: unknown field"),
        (("between = [1, 2]", "between = [1, 3]"), "t.toml: links[0].between: KME 3 is not one of the sites"),
        (("between = [1, 2]", "between = [2, 2]"), "t.toml: links[0].between: a link joins two different"),
        (
            ("between = [1, 2]", "between = [1, 2]\n[[links]]\nbetween = [2, 1]"),
            "t.toml: links[1].between: the link 1-2 is also links[0]",
        ),
        (("between = [1, 2]", "between = [1]"), "t.toml: links[0].between: must be two KME IDs"),
        (("between = [1, 2]", "a = 1"), "t.toml: links[0].between: missing"),
        (("between = [1, 2]", "between = [1, 2]\ninitial_key = -1"), "t.toml: links[0].initial_key: must be"),
        (("saes = [1001]", "saes = [1001]\nsae_port = 8442"), "t.toml: sites[1].sae_port: port 8442 is also"),
        (("[defaults]", '[defaults]\nstore = "mysql"'), 't.toml: defaults.store: must be "sqlite"'),
        (("[defaults]", '[defaults]\nkey_type = "dsa"'), "t.toml: defaults.key_type: must be one of"),
        (("[defaults]", "[defaults]\nbase_port = 65535"), "t.toml: defaults.base_port: leaves no port"),
        (('name = "t"', 'name = "t"\nkme = 3'), "t.toml: kme: must be a table"),
        (("saes = [1001]", "saes = [1001]\nkme = { service = 1 }"), "t.toml: sites[0].kme.service: must be"),
        (('name = "t"', 'name = ["t"]'), "t.toml: name: must be a non-empty string"),
        (("[[links]]", "[links]"), "t.toml: not valid TOML|t.toml: links: must be an array of tables"),
    ],
)
def test_mistakes_name_the_file_and_the_field(change: tuple[str, str], message: str) -> None:
    old, new = change
    assert old in GOOD
    with pytest.raises(TopologyError) as caught:
        parse_topology(GOOD.replace(old, new, 1), origin="t.toml")
    assert any(m in str(caught.value) for m in message.split("|")), str(caught.value)


def test_a_good_topology_and_its_defaults(tmp_path: Path) -> None:
    topology = parse_topology(GOOD, origin="t.toml")
    assert topology.name == "t" and topology.links[0].rate == 8192 and topology.store == "sqlite"
    assert topology.site(2).name == "site 2" and topology.sae_site() == {1001: 1, 2001: 2}
    assert parse_topology(GOOD, base_port_override=30000).site(2).sae_port == 30002
    with pytest.raises(TopologyError, match=r"t.toml: sites: missing"):
        parse_topology('name = "empty"', origin="t.toml")
    with pytest.raises(TopologyError, match="cannot read"):
        load_topology(tmp_path / "missing.toml")
    islands = parse_topology(GOOD.replace("[[links]]\nbetween = [1, 2]\n", ""))
    assert islands.islands() == [[1], [2]]
