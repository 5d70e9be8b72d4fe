"""The [relay] table: defaults, per-destination policies, errors that name the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from qkdtls.kme.relay.policy import RelayPolicy, RelaySettings, parse_relay
from qkdtls.tomlconfig import ConfigError, TableReader


def parse(doc: dict[str, Any]) -> RelaySettings:
    return parse_relay(TableReader(doc, "relay", "kme.toml", Path.cwd()))


def test_defaults_and_destinations() -> None:
    assert parse_relay(None) == RelaySettings()
    settings = parse(
        {
            "mode": "spread",
            "fallback": "trusted",
            "paths": 3,
            "timeout": 4.5,
            "destinations": [{"kme_id": 8, "threshold": 2}, {"kme_id": 9, "mode": "trusted"}],
        }
    )
    assert settings.default == RelayPolicy(mode="spread", fallback=True, paths=3)
    assert settings.policy(8) == RelayPolicy(mode="spread", fallback=True, paths=3, threshold=2)
    assert settings.policy(9).mode == "trusted" and settings.policy(7) == settings.default
    assert settings.timeout == 4.5
    assert settings.default.prefetch == 0  # on demand unless asked


def test_prefetch_per_destination() -> None:
    settings = parse(
        {
            "prefetch": 64,
            "prefetch_max_age": 30,
            "prefetch_idle": 5.5,
            "destinations": [{"kme_id": 8, "prefetch": 0}],
        }
    )
    assert settings.default.prefetch == 64 and settings.policy(8).prefetch == 0
    assert (settings.prefetch_max_age, settings.prefetch_idle) == (30.0, 5.5)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"mode": "fast"}, "kme.toml: relay.mode: must be one of 'trusted', 'spread'"),
        ({"fallback": "yes"}, 'relay.fallback: must be "none" or "trusted"'),
        ({"paths": 1}, "relay.paths: must be between 2 and 16"),
        ({"paths": 3, "threshold": 4}, "relay.threshold: must be between 0 and 3"),
        ({"threshold": 1}, "relay.threshold: must be 0 (all paths: XOR) or at least 2"),
        ({"timeout": 0}, "relay.timeout: must be greater than 0.0"),
        ({"max_hops": 3}, "relay.max_hops: unknown field"),  # the network's: [network] max_hops
        ({"destinations": [{"mode": "spread"}]}, "relay.destinations[0].kme_id: missing"),
        ({"destinations": [{"kme_id": 4}, {"kme_id": 4}]}, "relay.destinations[1].kme_id: KME 4 has two"),
        ({"destinations": [{"kme_id": 4, "paths": 20}]}, "relay.destinations[0].paths: must be between"),
        ({"prefetch": -1}, "relay.prefetch: must be between 0 and 4096"),
        ({"destinations": [{"kme_id": 4, "prefetch": 5000}]}, "relay.destinations[0].prefetch: must be"),
        ({"prefetch_max_age": 0}, "relay.prefetch_max_age: must be greater than 0.0"),
        ({"prefetch_idle": 7200}, "relay.prefetch_idle: must be greater than 0.0 and at most 3600"),
    ],
)
def test_errors_name_the_field(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(doc)
    assert message in str(info.value)
