"""The host → SAE ID directory: lookups, TOML files, and the errors that name the bad entry."""

from __future__ import annotations

from pathlib import Path

import pytest

from qkdtls.net.directory import DirectoryError, SaeDirectory


def test_port_specific_entry_wins_over_host_entry() -> None:
    d = SaeDirectory({"App.Example": 7, "app.example:8443": 9})
    assert d.resolve("app.example", 8443) == 9
    assert d.resolve("APP.example", 443) == 7
    assert d.resolve("app.example") == 7
    assert d.resolve("other.example", 8443) is None
    assert d.resolve(None, 1) is None


def test_ipv6_literals_are_bracketed() -> None:
    d = SaeDirectory({"[::1]:9443": 5, "[fe80::2]": 6})
    assert d.resolve("::1", 9443) == 5
    assert d.resolve("fe80::2", 1) == 6


def test_toml_file_with_hosts_table(tmp_path: Path) -> None:
    path = tmp_path / "saes.toml"
    path.write_text('[hosts]\n"127.0.0.1:9443" = 2001\n"localhost" = -3\n', encoding="utf-8")
    d = SaeDirectory.coerce(path)
    assert d.resolve("127.0.0.1", 9443) == 2001
    assert d.resolve("localhost", 1) == -3
    assert dict(d) == {"127.0.0.1:9443": 2001, "localhost": -3}


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('"a" = "two"', "'a'"),
        ('"a" = 9223372036854775808', "64-bit"),
        ('"a" = true', "'a'"),
        ("hosts = 3", "[hosts]"),
        ("not toml [", "not valid TOML"),
    ],
)
def test_bad_files_name_the_problem(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DirectoryError, match=None) as info:
        SaeDirectory.load(path)
    assert fragment in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DirectoryError, match="cannot read"):
        SaeDirectory.load(tmp_path / "absent.toml")
