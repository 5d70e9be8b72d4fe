"""Bounds-checked reader and writer for TLS presentation-language structures (RFC 8446 §3).

Every decoder in the TLS core reads through :class:`Reader`, so a short, overlong or out-of-range field
always surfaces as :class:`~qkdtls.tls.alerts.DecodeError` and never as an IndexError or struct.error.
"""

from __future__ import annotations

from .alerts import DecodeError


class Reader:
    """Consumes a byte string front to back; every read checks the remaining length."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._data = bytes(data)
        self._pos = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def eof(self) -> bool:
        return self._pos >= len(self._data)

    def expect_end(self, what: str = "structure") -> None:
        if not self.eof():
            raise DecodeError(f"{self.remaining} trailing bytes after {what}")

    def raw(self, n: int) -> bytes:
        if n < 0 or self._pos + n > len(self._data):
            raise DecodeError(f"need {n} bytes, {self.remaining} left")
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def rest(self) -> bytes:
        return self.raw(self.remaining)

    def _uint(self, size: int) -> int:
        return int.from_bytes(self.raw(size), "big")

    def u8(self) -> int:
        return self._uint(1)

    def u16(self) -> int:
        return self._uint(2)

    def u24(self) -> int:
        return self._uint(3)

    def u32(self) -> int:
        return self._uint(4)

    def u64(self) -> int:
        return self._uint(8)

    def _opaque(self, prefix: int, min_len: int, max_len: int | None) -> bytes:
        n = self._uint(prefix)
        if n < min_len or (max_len is not None and n > max_len):
            raise DecodeError(f"vector length {n} outside [{min_len}, {max_len}]")
        return self.raw(n)

    def opaque8(self, min_len: int = 0, max_len: int | None = None) -> bytes:
        return self._opaque(1, min_len, max_len)

    def opaque16(self, min_len: int = 0, max_len: int | None = None) -> bytes:
        return self._opaque(2, min_len, max_len)

    def opaque24(self, min_len: int = 0, max_len: int | None = None) -> bytes:
        return self._opaque(3, min_len, max_len)

    def sub8(self, min_len: int = 0) -> Reader:
        return Reader(self.opaque8(min_len))

    def sub16(self, min_len: int = 0) -> Reader:
        return Reader(self.opaque16(min_len))

    def sub24(self, min_len: int = 0) -> Reader:
        return Reader(self.opaque24(min_len))

    def u16_list(self, prefix: int = 2, min_items: int = 0) -> list[int]:
        """A vector of uint16 values (cipher suites, groups, signature schemes)."""
        body = self._opaque(prefix, 0, None)
        if len(body) % 2:
            raise DecodeError("odd length for a uint16 vector")
        items = [int.from_bytes(body[i : i + 2], "big") for i in range(0, len(body), 2)]
        if len(items) < min_items:
            raise DecodeError("vector too short")
        return items


class Writer:
    """Accumulates an encoded structure; length prefixes are checked against their field width."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def getvalue(self) -> bytes:
        return bytes(self._buf)

    def raw(self, data: bytes) -> Writer:
        self._buf += data
        return self

    def _uint(self, value: int, size: int) -> Writer:
        if value < 0 or value >= 1 << (8 * size):
            raise ValueError(f"{value} does not fit in {size} bytes")
        self._buf += value.to_bytes(size, "big")
        return self

    def u8(self, value: int) -> Writer:
        return self._uint(value, 1)

    def u16(self, value: int) -> Writer:
        return self._uint(value, 2)

    def u24(self, value: int) -> Writer:
        return self._uint(value, 3)

    def u32(self, value: int) -> Writer:
        return self._uint(value, 4)

    def u64(self, value: int) -> Writer:
        return self._uint(value, 8)

    def opaque8(self, data: bytes) -> Writer:
        return self._uint(len(data), 1).raw(data)

    def opaque16(self, data: bytes) -> Writer:
        return self._uint(len(data), 2).raw(data)

    def opaque24(self, data: bytes) -> Writer:
        return self._uint(len(data), 3).raw(data)

    def u16_list(self, values: list[int] | tuple[int, ...], prefix: int = 2) -> Writer:
        body = b"".join(int(v).to_bytes(2, "big") for v in values)
        return self._uint(len(body), prefix).raw(body)
