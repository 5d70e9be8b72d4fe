"""The [network] configuration: defaults, every field, and errors that name the bad field."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qkdtls.kme.config import ConfigError, parse_config
from qkdtls.kme.routing import NetworkSettings, StaticRoute, Timers
from qkdtls.testbed import Testbed, chain, sites_saes


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Testbed:
    # KME 2 of a chain 1-2-3: two peers, so routes through either are possible.
    return Testbed.create(
        tmp_path_factory.mktemp("netcfg"), saes=sites_saes(3), links=chain(3), initial_key_bytes=0
    )


def _doc(bed: Testbed, network: dict[str, Any] | None = None) -> dict[str, Any]:
    doc = tomllib.loads(bed.config_path(2).read_text())
    if network is not None:
        doc["network"] = network
    return doc


def _parse(bed: Testbed, doc: dict[str, Any]) -> NetworkSettings:
    return parse_config(doc, origin="kme.toml", base=bed.root).network


def test_defaults_turn_the_exchange_on_with_peers_only(bed: Testbed) -> None:
    assert _parse(bed, _doc(bed)) == NetworkSettings(enabled=True, timers=Timers(), max_hops=8, routes=())
    alone = _doc(bed)
    for name in ("peers", "inter_kme"):
        alone.pop(name)
    alone["saes"] = [s for s in alone["saes"] if s["kme_id"] == 2]
    assert _parse(bed, alone).enabled is False


def test_every_field(bed: Testbed) -> None:
    network = {
        "enabled": True,
        "hello_interval": 0.25,
        "dead_interval": 0.75,
        "max_age": 10,
        "max_hops": 3,
        "routes": [
            {"destination": 7, "path": [2, 3, 5, 7]},
            {"destination": 7, "path": [2, 1, 7]},
            {"destination": 1, "path": [2, 1]},
        ],
    }
    settings = _parse(bed, _doc(bed, network))
    assert settings.timers == Timers(hello_interval=0.25, dead_interval=0.75, max_age=10.0)
    assert settings.max_hops == 3
    assert settings.routes == (
        StaticRoute(7, (2, 3, 5, 7)),
        StaticRoute(7, (2, 1, 7)),
        StaticRoute(1, (2, 1)),
    )
    off = _parse(bed, _doc(bed, {"enabled": False, "routes": [{"destination": 3, "path": [2, 3]}]}))
    assert off.enabled is False and off.routes == (StaticRoute(3, (2, 3)),)


def _route(path: Any, destination: Any = 4) -> dict[str, Any]:
    return {"routes": [{"destination": destination, "path": path}]}


@pytest.mark.parametrize(
    ("network", "expected"),
    [
        ({"enabled": 1}, "network.enabled: must be true or false"),
        ({"hello_interval": "1"}, "network.hello_interval: must be a number"),
        ({"hello_interval": 0}, "network.hello_interval: must be greater than 0.01"),
        ({"dead_interval": 1.5}, "network.dead_interval: must be at least twice hello_interval"),
        ({"max_age": 11}, "network.max_age: must be at least four times dead_interval"),
        ({"max_hops": 0}, "network.max_hops: must be between 1 and 32"),
        ({"max_hops": 33}, "network.max_hops: must be between 1 and 32"),
        ({"colour": "red"}, "network.colour: unknown field"),
        ({"routes": {"destination": 4}}, "network.routes: must be an array of tables"),
        ({"routes": [{"path": [2, 3, 4]}]}, "network.routes[0].destination: missing"),
        ({"routes": [{"destination": 4}]}, "network.routes[0].path: missing"),
        (_route([2, "3", 4]), "network.routes[0].path: must be an array of KME IDs"),
        (_route([2, True, 4]), "network.routes[0].path: must be an array of KME IDs"),
        (_route([2], destination=2), "network.routes[0].destination: is this KME's own ID"),
        (_route([3, 4]), "network.routes[0].path: must start with this KME (2) and end with"),
        (_route([2, 3]), "network.routes[0].path: must start with this KME (2) and end with"),
        (_route([2, 3, 2, 4]), "network.routes[0].path: names a KME twice"),
        (_route([2, 5, 4]), "network.routes[0].path: KME 5 is not a configured peer"),
        (
            _route([2, 3, 10, 11, 12, 13, 4]) | {"max_hops": 4},
            "network.routes[0].path: has more than max_hops = 4",
        ),
        (
            {"routes": [{"destination": 4, "path": [2, 3, 4]}, {"destination": 4, "path": [2, 3, 4]}]},
            "network.routes[1].path: is listed twice",
        ),
        (
            {"routes": [{"destination": 4, "path": [2, 3, 4], "via": 3}]},
            "network.routes[0].via: unknown field",
        ),
    ],
)
def test_errors_name_the_field(bed: Testbed, network: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        _parse(bed, _doc(bed, network))
    assert str(info.value).startswith("kme.toml: ")
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("network", "allowed"),
    [(None, True), ({"enabled": False}, False), ({"enabled": False, **_route([2, 3, 4])}, True)],
)
def test_remote_saes_may_name_any_kme_when_routing(
    bed: Testbed, network: dict[str, Any] | None, allowed: bool
) -> None:
    doc = _doc(bed, network)
    doc["saes"].append({"id": 9001, "kme_id": 9})
    parse: Callable[[], Any] = lambda: parse_config(doc, origin="kme.toml", base=bed.root)  # noqa: E731
    if allowed:
        assert parse().sae_entries()[9001].kme_id == 9
    else:
        with pytest.raises(ConfigError, match=r"saes\[\d+\]\.kme_id: KME 9 is neither"):
            parse()


def test_documented_example_network(tmp_path: Path) -> None:
    example = Path(__file__).parents[3] / "docs" / "kme.example.toml"
    doc = tomllib.loads(example.read_text())
    assert doc["network"] == {
        "enabled": True,
        "hello_interval": 1.0,
        "dead_interval": 3.0,
        "max_age": 60.0,
        "max_hops": 8,
    }
