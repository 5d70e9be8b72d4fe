"""Configuration: the testbed's files load; every mistake is reported with the file and the field path."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from qkdtls.kme.config import ConfigError, load_config, parse_config, parse_fingerprint, parse_serial
from qkdtls.kme.quotas import DEFAULT_MAX_UNCOLLECTED, QuotaSettings, RateLimit, SaeQuota
from qkdtls.testbed import Testbed


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Testbed:
    return Testbed.create(tmp_path_factory.mktemp("cfg"), initial_key_bytes=1024)


def _doc(bed: Testbed, kme_id: int = 1) -> dict[str, Any]:
    return tomllib.loads(bed.config_path(kme_id).read_text())


def _error(bed: Testbed, doc: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(doc, origin="kme.toml", base=bed.root)
    return str(info.value)


def test_testbed_config_loads(bed: Testbed) -> None:
    cfg = load_config(bed.config_path(1))
    assert cfg.kme_id == 1 and cfg.nickname == "site A"
    assert [p.kme_id for p in cfg.peers] == [2]
    assert cfg.peers[0].identity.fingerprint is not None
    assert {s.sae_id for s in cfg.saes} == {1001, 1002, 2001}
    local = {s.sae_id: s.identity for s in cfg.saes}
    assert local[1001] is not None and local[1001].serial == bed.pki.zones[1].saes[1001].serial
    assert local[2001] is None
    assert cfg.service.kme_id == 1 and cfg.service.block_size == 32
    assert cfg.store_url.startswith("sqlite:///")
    assert cfg.sae_interface.listen.host == "127.0.0.1"


def test_relative_paths_resolve_against_the_file(bed: Testbed, tmp_path: Path) -> None:
    doc = _doc(bed)
    doc["store"]["url"] = "sqlite://db/kme.sqlite3"
    cfg = parse_config(doc, origin="kme.toml", base=tmp_path)
    assert cfg.store_url == f"sqlite://{tmp_path}/db/kme.sqlite3"


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d.pop("kme"), "kme: missing"),
        (lambda d: d["kme"].update(id="one"), "kme.id: must be an integer"),
        (lambda d: d["kme"].update(id=2**63), "kme.id: must be between"),
        (lambda d: d["kme"].update(colour="red"), "kme.colour: unknown field"),
        (lambda d: d["sae_interface"].update(listen="nowhere"), "sae_interface.listen: must be HOST:PORT"),
        (lambda d: d["sae_interface"].update(cert="/no/such.pem"), "sae_interface.cert: file does not exist"),
        (lambda d: d["peers"][0].update(folder="/no/such/dir"), "peers[0].folder: directory does not exist"),
        (lambda d: d["peers"][0].update(url="http://x"), "peers[0].url: must be an https:// URL"),
        (lambda d: d["peers"][0].update(kme_id=1), "peers[0].kme_id: is this KME's own ID"),
        (lambda d: d["peers"][0].pop("fingerprint"), "peers[0].serial: missing"),
        (lambda d: d["peers"][0].update(timeout=-1), "peers[0].timeout: must be greater than 0"),
        (lambda d: d["saes"][0].update(serial="xyz"), "saes[0].serial: must be an integer or a hex"),
        (lambda d: d["saes"][0].pop("serial"), "saes[0].serial: missing"),
        (lambda d: d["saes"][2].update(serial=5), "saes[2].serial: only SAEs of this KME"),
        (
            lambda d: (d.update(network={"enabled": False}), d["saes"][2].update(kme_id=7)),
            "saes[2].kme_id: KME 7 is neither",
        ),
        (lambda d: d["saes"].append(dict(d["saes"][2])), "saes[3].id: duplicate SAE 2001"),
        (
            lambda d: d["saes"][1].update(serial=d["saes"][0]["serial"]),
            "saes[1].serial: same certificate identity as saes[0]",
        ),
        (lambda d: d["saes"][2].update(multicast="no"), "saes[2].multicast: must be true or false"),
        (
            lambda d: d["service"].update(key_id_mode="reference"),
            'service.min_key_size: must be at least 128 with key_id_mode = "reference"',
        ),
        (lambda d: d["service"].update(recollect_window=-1), "service.recollect_window: must be a number"),
        (lambda d: d["service"].update(recollect_window=7200), "service.recollect_window: must be a number"),
        (lambda d: d["saes"][2].update(recollect_window="1m"), "saes[2].recollect_window: must be a number"),
        (lambda d: d["saes"][0].update(max_uncollected=-1), "saes[0].max_uncollected: must be between"),
        (lambda d: d.update(quotas={"master_rate": -1.0}), "quotas.master_rate: must be a number"),
        (lambda d: d.update(quotas={"pair_burst": 0}), "quotas.pair_burst: must be between 1"),
        (lambda d: d.update(quotas={"colour": 1}), "quotas.colour: unknown field"),
        (
            lambda d: d.update(quotas={"pairs": [{"master": 1001, "slave": 9, "rate": 1.0}]}),
            "quotas.pairs[0].slave: SAE 9 is not in [[saes]]",
        ),
        (
            lambda d: d.update(quotas={"pairs": [{"master": 1001, "slave": 2001}]}),
            "quotas.pairs[0].rate: must be greater than 0",
        ),
        (lambda d: d["service"].update(key_size=100), "service.key_size: must be a multiple of 8"),
        (lambda d: d["service"].update(key_id_mode="sha1"), "service.key_id_mode: must be"),
        (lambda d: d["store"].update(url="mysql://x"), "store.url: must start with"),
        (lambda d: d.update(peers={"a": 1}), "peers: must be an array of tables"),
        (lambda d: d["admins"][0].update(fingerprint="00"), "admins[0].fingerprint: must be 64 hex"),
    ],
)
def test_errors_name_the_field(bed: Testbed, mutate: Any, expected: str) -> None:
    doc = _doc(bed)
    mutate(doc)
    assert "kme.toml: " + expected in _error(bed, doc)


def test_key_delivery_policy(bed: Testbed) -> None:
    doc = _doc(bed)
    doc["service"].update(recollect_window=0, key_id_mode="reference", min_key_size=128)
    doc["quotas"] = {
        "master_rate": 100.0,
        "max_uncollected": 500,
        "pairs": [{"master": 1002, "slave": 2001, "rate": 5.5, "burst": 11}],
    }
    doc["saes"][1].update(master_burst=50, pair_rate=2.0, multicast=False)  # 1002
    doc["saes"][2].update(recollect_window=30, max_uncollected=0)  # 2001 at the peer
    cfg = parse_config(doc, origin="kme.toml", base=bed.root)
    service = cfg.service
    assert service.recollect_window == 0.0 and service.key_id_mode == "reference"
    quotas = service.quotas
    assert quotas.default == SaeQuota(master_rate=RateLimit(100.0, 128), max_uncollected=500)
    assert quotas.of(1001) == quotas.default
    assert quotas.of(1002) == SaeQuota(RateLimit(100.0, 50), RateLimit(2.0, 128), 500)
    assert quotas.of(2001) == SaeQuota(master_rate=RateLimit(100.0, 128), max_uncollected=0)
    assert quotas.pairs == {(1002, 2001): RateLimit(5.5, 11)}
    entries = cfg.sae_entries()
    assert entries[2001].recollect_window == 30.0 and entries[1001].recollect_window is None
    assert entries[1002].multicast is False
    defaults = load_config(bed.config_path(1)).service
    assert defaults.recollect_window == 60.0 and defaults.quotas == QuotaSettings()
    assert defaults.quotas.default.max_uncollected == DEFAULT_MAX_UNCOLLECTED


def test_reference_key_ids_with_keys_of_128_bits_and_more(bed: Testbed) -> None:
    doc = _doc(bed)
    doc["service"].update(key_id_mode="reference", min_key_size=128)
    assert parse_config(doc, origin="kme.toml", base=bed.root).service.key_id_mode == "reference"


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[kme\nid = 1\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: invalid TOML"):
        load_config(bad)


def test_identity_parsers() -> None:
    assert parse_serial("0x1F") == 31 == parse_serial("1f") == parse_serial("00:1f") == parse_serial(31)
    with pytest.raises(ValueError):
        parse_serial(-1)
    with pytest.raises(ValueError):
        parse_serial(True)
    assert parse_fingerprint("AB" * 32) == bytes([0xAB]) * 32
    assert parse_fingerprint(":".join(["ab"] * 32)) == bytes([0xAB]) * 32


def test_documented_example_is_complete_and_valid(tmp_path: Path) -> None:
    example = Path(__file__).parents[2] / "docs" / "kme.example.toml"
    doc = tomllib.loads(example.read_text())
    # The example's relative files only need to exist for validation.
    for name in (
        "kme-1/kme-server.crt",
        "kme-1/kme-server.key",
        "kme-1/ca.crt",
        "kme-1/inter-kme-server.crt",
        "kme-1/inter-kme-server.key",
        "kme-2/ca.crt",
        "kme-1/inter-kme-client-2.crt",
        "kme-1/inter-kme-client-2.key",
    ):
        (tmp_path / "pki" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pki" / name).touch()
    for folder in ("keys/local", "keys/kme-2"):
        (tmp_path / folder).mkdir(parents=True)
    cfg = parse_config(doc, origin="kme.example.toml", base=tmp_path)
    assert cfg.kme_id == 1 and cfg.peers[0].timeout == 5.0 and cfg.service.max_SAE_ID_count == 8
    assert cfg.store_url == f"sqlite://{tmp_path}/kme.sqlite3"
    assert cfg.saes[1].identity is not None and cfg.saes[1].identity.fingerprint is not None
    assert [s.multicast for s in cfg.saes] == [False, True, True]
    assert cfg.sae_entries()[1001].multicast is False
    assert cfg.service.recollect_window == 60.0 and cfg.sae_entries()[1002].recollect_window == 0.0
    quotas = cfg.service.quotas
    assert quotas.default == SaeQuota() and quotas.pairs == {(1002, 2001): RateLimit(50.0, 100)}
    assert quotas.of(1002) == SaeQuota(master_rate=RateLimit(200.0, 128), max_uncollected=1000)


def test_qkdtls_command_validates_a_config(bed: Testbed) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "qkdtls", "kme", "check-config", "--config", str(bed.config_path(1))],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "KME 1 (site A)" in ok.stdout
    broken = bed.root / "broken.toml"
    broken.write_text(bed.config_path(1).read_text().replace("[kme]\nid = 1", "[kme]\nid = 'x'"))
    bad = subprocess.run(
        [sys.executable, "-m", "qkdtls", "kme", "check-config", "--config", str(broken)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "broken.toml: kme.id: must be an integer" in bad.stderr
    assert "Traceback" not in bad.stderr
