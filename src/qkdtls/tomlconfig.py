"""Typed reading of TOML tables for the configuration files (KME, tunnel): every value checked for its type
and range, unknown fields refused, and every error naming the file and the field (``kme.toml: quotas.burst:
must be an integer``), which is what an operator needs to fix a hand-edited file."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

I64_MIN, I64_MAX = -(2**63), 2**63 - 1


class ConfigError(ValueError):
    """A configuration mistake; the message names the file and the field path."""


class TableReader:
    """Typed access to one TOML table, with errors naming ``file: path.to.field``."""

    def __init__(self, doc: Mapping[str, Any], where: str, origin: str, base: Path) -> None:
        self.doc, self.where, self.origin, self.base = doc, where, origin, base
        self.seen: set[str] = set()

    def error(self, name: str | None, problem: str) -> ConfigError:
        field = f"{self.where}.{name}" if self.where and name else (name or self.where)
        return ConfigError(f"{self.origin}: {field}: {problem}")

    def has(self, name: str) -> bool:
        return name in self.doc

    def _get(self, name: str, default: Any, required: bool) -> Any:
        self.seen.add(name)
        if name not in self.doc:
            if required:
                raise self.error(name, "missing")
            return default
        return self.doc[name]

    def integer(
        self,
        name: str,
        default: int | None = None,
        *,
        lo: int = I64_MIN,
        hi: int = I64_MAX,
        required: bool = False,
    ) -> int:
        value = self._get(name, default, required or default is None)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.error(name, "must be an integer")
        if not lo <= value <= hi:
            raise self.error(name, f"must be between {lo} and {hi}")
        return value

    def number(self, name: str, default: float, *, lo: float = 0.0, hi: float = 1e9) -> float:
        value = self._get(name, default, False)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise self.error(name, "must be a number")
        if not lo < value <= hi:
            raise self.error(name, f"must be greater than {lo} and at most {hi}")
        return float(value)

    def string(self, name: str, default: str | None = None, *, required: bool = False) -> str:
        value = self._get(name, default, required or default is None)
        if not isinstance(value, str) or (required and not value):
            raise self.error(name, "must be a non-empty string" if required else "must be a string")
        return value

    def optional_string(self, name: str) -> str | None:
        value = self._get(name, None, False)
        if value is not None and not isinstance(value, str):
            raise self.error(name, "must be a string")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self._get(name, default, False)
        if not isinstance(value, bool):
            raise self.error(name, "must be true or false")
        return value

    def path(self, name: str, *, kind: str = "file", must_exist: bool = True) -> Path:
        text = self.string(name, required=True)
        path = Path(text).expanduser()
        if not path.is_absolute():
            path = self.base / path
        if must_exist:
            if kind == "file" and not path.is_file():
                raise self.error(name, f"file does not exist: {path}")
            if kind == "dir" and not path.is_dir():
                raise self.error(name, f"directory does not exist: {path}")
        return path

    def paths(self, name: str) -> tuple[Path, ...]:
        """One path or an array of paths (several CA certificates)."""
        value = self._get(name, None, True)
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items or not all(isinstance(v, str) and v for v in items):
            raise self.error(name, "must be a path or a non-empty array of paths")
        out = []
        for i, text in enumerate(items):
            path = Path(text).expanduser()
            path = path if path.is_absolute() else self.base / path
            if not path.is_file():
                label = name if isinstance(value, str) else f"{name}[{i}]"
                raise self.error(label, f"file does not exist: {path}")
            out.append(path)
        return tuple(out)

    def table(self, name: str, *, required: bool = False) -> TableReader | None:
        value = self._get(name, None, required)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.error(name, "must be a table")
        return self.child(value, name)

    def tables(self, name: str) -> list[TableReader]:
        value = self._get(name, [], False)
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.error(name, "must be an array of tables ([[" + name + "]])")
        prefix = f"{self.where}.{name}" if self.where else name
        return [TableReader(v, f"{prefix}[{i}]", self.origin, self.base) for i, v in enumerate(value)]

    def child(self, doc: Mapping[str, Any], name: str) -> TableReader:
        return TableReader(doc, f"{self.where}.{name}" if self.where else name, self.origin, self.base)

    def finish(self) -> None:
        unknown = sorted(set(self.doc) - self.seen)
        if unknown:
            raise self.error(unknown[0], "unknown field")
