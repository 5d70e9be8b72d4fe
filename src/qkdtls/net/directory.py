"""Which SAE answers at which address: host[:port] → SAE ID, for clients that only know where they connect.

ETSI GS QKD 014 leaves the SAE addressing out of scope, and the authors' client had to be told the target SAE
ID by hand. A directory keeps that knowledge in one place (a mapping or a TOML file)::

    # sae-directory.toml
    [hosts]
    "app.site-b.example:8443" = 2002     # this port only
    "app.site-b.example" = 2002          # any port
    "127.0.0.1:9443" = 2002

A lookup tries ``host:port`` first, then ``host``. Host names compare case-insensitively; IPv6 literals are
written in brackets (``"[::1]:8443"``).
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path

_INT64 = range(-(2**63), 2**63)


class DirectoryError(ValueError):
    """The directory file or mapping is malformed; the message names the entry."""


def _normalise(address: str) -> str:
    address = address.strip().lower()
    if not address:
        raise DirectoryError("empty address in the SAE directory")
    return address


def _key(host: str, port: int | None) -> str:
    host = host.lower()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # a bare IPv6 literal
    return host if port is None else f"{host}:{port}"


class SaeDirectory(Mapping[str, int]):
    """An immutable host[:port] → SAE ID table."""

    def __init__(self, entries: Mapping[str, int] | None = None) -> None:
        table: dict[str, int] = {}
        for address, sae in (entries or {}).items():
            if not isinstance(address, str):
                raise DirectoryError(f"SAE directory address {address!r} must be a string")
            if isinstance(sae, bool) or not isinstance(sae, int) or sae not in _INT64:
                raise DirectoryError(
                    f"SAE directory entry {address!r}: SAE ID must be a signed 64-bit integer"
                )
            table[_normalise(address)] = sae
        self._table = table

    @classmethod
    def load(cls, path: Path) -> SaeDirectory:
        """Read a TOML file: a ``[hosts]`` table (or top-level keys) of address = SAE ID."""
        try:
            doc = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise DirectoryError(f"cannot read SAE directory {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise DirectoryError(f"SAE directory {path} is not valid TOML: {exc}") from None
        hosts = doc.get("hosts", doc)
        if not isinstance(hosts, dict):
            raise DirectoryError(f"SAE directory {path}: [hosts] must be a table")
        return cls(hosts)

    @classmethod
    def coerce(cls, value: Mapping[str, int] | Path | str | None) -> SaeDirectory:
        if isinstance(value, SaeDirectory):
            return value
        if isinstance(value, (str, Path)):
            return cls.load(Path(value))
        return cls(value)

    def resolve(self, host: str | None, port: int | None = None) -> int | None:
        """The SAE ID serving ``host:port`` (or any port of ``host``); None if unknown."""
        if not host:
            return None
        if port is not None:
            sae = self._table.get(_key(host, port))
            if sae is not None:
                return sae
        return self._table.get(_key(host, None))

    def __getitem__(self, address: str) -> int:
        return self._table[_normalise(address)]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table)

    def __len__(self) -> int:
        return len(self._table)

    def __repr__(self) -> str:
        return f"SaeDirectory({self._table!r})"
