"""Tunnel configuration: every mistake names the field (file and path, or the flag in quick mode)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tests.tunnel.conftest import to_toml

from qkdtls.cli.main import main
from qkdtls.tunnel.config import ConfigError, load_config, parse_config


@pytest.fixture
def files(tmp_path: Path) -> Path:
    for name in ("sae.crt", "sae.key", "kme-ca.crt", "app.crt", "app.key", "app-ca.crt"):
        (tmp_path / name).write_text("x")
    return tmp_path


def _doc(**service: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "mode": "client",
        "accept": "127.0.0.1:15432",
        "connect": "db.site-b.example:5433",
        "target_sae_id": 2001,
    }
    base.update(service)
    return {
        "kme": {"url": "https://kme-a:8443", "cert": "sae.crt", "key": "sae.key", "ca": "kme-ca.crt"},
        "services": {"pg": {k: v for k, v in base.items() if v is not None}},
    }


def _error(files: Path, doc: dict[str, Any]) -> str:
    path = files / "tunnel.toml"
    path.write_text(to_toml(doc))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return str(info.value)


def test_a_valid_file(files: Path) -> None:
    path = files / "tunnel.toml"
    doc = _doc(rekey_after_bytes=1 << 30, alpn=["postgresql"], prefetch=4)
    doc["tunnel"] = {"grace_period": 10.0, "metrics": "127.0.0.1:9464"}
    doc["services"]["pg-in"] = {
        "mode": "server", "accept": "0.0.0.0:5433", "connect": "127.0.0.1:5432", "cert": "app.crt",
        "key": "app.key", "allowed_peer_sae_ids": [1001], "qkd": "preferred",
    }  # fmt: skip
    path.write_text(to_toml(doc))
    config = load_config(path)
    client, server = config.services
    assert client.mode == "client" and client.connect == ("db.site-b.example", 5433)
    assert client.server_hostname == "db.site-b.example" and client.profiles == ("secure",)
    assert client.qkd == "required" and client.kme is not None and client.kme.cert == files / "sae.crt"
    assert server.allowed_peer_sae_ids == (1001,) and server.kme == client.kme
    assert config.grace_period == 10.0 and config.metrics == ("127.0.0.1", 9464)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mode": "sideways"}, "services.pg.mode: must be"),
        ({"connect": "nowhere"}, "services.pg.connect: must be HOST:PORT"),
        ({"accept": "127.0.0.1:70000"}, "services.pg.accept: must be HOST:PORT"),
        ({"qkd": "maybe"}, "services.pg.qkd: must be one of required, preferred, off"),
        ({"profiles": ["secure", "fast"]}, "services.pg.profiles[1]: must be one of"),
        ({"target_sae_id": None}, 'services.pg.target_sae_id: qkd = "required" needs target_sae_id'),
        ({"target_sae_id": "2001"}, "services.pg.target_sae_id: must be an integer"),
        ({"allowed_peer_sae_ids": [1001]}, 'services.pg.allowed_peer_sae_ids: only for mode = "server"'),
        ({"rekey_after_bytes": 0}, "services.pg.rekey_after_bytes: must be between 1"),
        ({"idle_timeout": -1}, "services.pg.idle_timeout: must be greater than 0"),
        ({"max_connections": 0}, "services.pg.max_connections: must be between 1"),
        ({"cafile": "missing.pem"}, "services.pg.cafile: file does not exist"),
        ({"key": "sae.key"}, "services.pg.key: given without cert"),
        ({"colour": "blue"}, "services.pg.colour: unknown field"),
        ({"announce_keys": 17}, "services.pg.announce_keys: must be between 0 and 16"),
    ],
)
def test_errors_name_the_field(files: Path, change: dict[str, Any], message: str) -> None:
    assert message in _error(files, _doc(**change))


def test_server_side_errors(files: Path) -> None:
    server = {
        "mode": "server",
        "accept": "127.0.0.1:5433",
        "connect": "127.0.0.1:5432",
        "target_sae_id": None,
    }
    assert 'services.pg.cert: qkd = "preferred"' in _error(files, _doc(**server, qkd="preferred"))
    err = _error(files, _doc(**server, allowed_peer_sae_ids=[0]))
    assert "services.pg.allowed_peer_sae_ids[0]: must be an SAE ID" in err
    err = _error(files, _doc(**server, cafile="app-ca.crt"))
    assert 'services.pg.allowed_peer_sae_ids: qkd = "required" with cafile' in err
    assert 'services.pg.sni: only for mode = "client"' in _error(files, _doc(**server, sni="x"))


def test_file_level_errors(files: Path) -> None:
    doc = _doc()
    del doc["kme"]
    assert 'services.pg.kme: qkd = "required" needs a KME' in _error(files, doc)
    doc = _doc()
    doc["kme"]["url"] = "http://kme-a:8443"
    assert "kme.url: must be an https:// URL" in _error(files, doc)
    doc = _doc()
    doc["services"]["pg2"] = dict(doc["services"]["pg"])
    assert "services.pg2.accept: 127.0.0.1:15432 is already service pg's" in _error(files, doc)
    assert "services: no service defined" in _error(files, {"services": {}})
    doc = _doc()
    doc["tunnel"] = {"grace": 3}
    assert "tunnel.grace: unknown field" in _error(files, doc)
    path = files / "bad.toml"
    path.write_text("[services\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


def test_qkd_off_needs_no_kme() -> None:
    doc = {"services": {"plain": {"mode": "client", "accept": "127.0.0.1:0", "connect": "h:1", "qkd": "off"}}}
    (service,) = parse_config(doc).services
    assert service.kme is None and service.accept == ("127.0.0.1", 0)


def test_quick_mode_errors_name_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["tunnel", "--client", "--accept", "127.0.0.1:0", "--connect", "x:1", "--target-sae", "2"]) == 2
    )
    assert '--kme: qkd = "required" needs a KME' in capsys.readouterr().err
    argv = ["tunnel", "--client", "--accept", "127.0.0.1:0", "--connect", "nowhere", "--qkd", "off"]
    assert main(argv) == 2
    assert "--connect: must be HOST:PORT" in capsys.readouterr().err
    argv = ["tunnel", "--server", "--accept", "127.0.0.1:0", "--connect", "h:1", "--qkd", "off"]
    assert main(argv) == 2
    assert '--cert: qkd = "off"' in capsys.readouterr().err
    assert main(["tunnel"]) == 2
    assert "give --config FILE, or --client/--server" in capsys.readouterr().err


def test_check_command(files: Path) -> None:
    path = files / "tunnel.toml"
    path.write_text(to_toml(_doc()))
    ok = subprocess.run(
        [sys.executable, "-m", "qkdtls", "tunnel", "--config", str(path), "--check"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert ok.returncode == 0 and "configuration OK: pg (client)" in ok.stderr
    path.write_text(to_toml(_doc(connect="bad")))
    bad = subprocess.run(
        [sys.executable, "-m", "qkdtls", "tunnel", "--config", str(path), "--check"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert bad.returncode == 2 and f"{path}: services.pg.connect: must be HOST:PORT" in bad.stderr
