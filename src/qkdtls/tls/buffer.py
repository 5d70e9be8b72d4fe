"""Bounds-checked reader and writer for TLS presentation-language structures (RFC 8446 §3).

Every decoder in the TLS core reads through :class:`Reader`, so a short, overlong or out-of-range field
always surfaces as :class:`~qkdtls.tls.alerts.DecodeError` and never as an IndexError or struct.error.
"""

from __future__ import annotations

import struct

from .alerts import DecodeError


class Reader:
    """Consumes a byte string front to back; every read checks the remaining length.

    The fixed-width reads index the bytes directly instead of slicing and converting: every handshake
    message goes through here, and the per-call cost shows in the handshake's CPU time.
    """

    __slots__ = ("_data", "_end", "_pos")

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._data = data if type(data) is bytes else bytes(data)
        self._pos = 0
        self._end = len(self._data)

    @property
    def remaining(self) -> int:
        return self._end - self._pos

    def eof(self) -> bool:
        return self._pos >= self._end

    def expect_end(self, what: str = "structure") -> None:
        if self._pos < self._end:
            raise DecodeError(f"{self.remaining} trailing bytes after {what}")

    def raw(self, n: int) -> bytes:
        pos = self._pos
        if n < 0 or pos + n > self._end:
            raise DecodeError(f"need {n} bytes, {self.remaining} left")
        self._pos = pos + n
        return self._data[pos : pos + n]

    def rest(self) -> bytes:
        return self.raw(self.remaining)

    def _uint(self, size: int) -> int:
        return int.from_bytes(self.raw(size), "big")

    def u8(self) -> int:
        pos = self._pos
        if pos >= self._end:
            raise DecodeError(f"need 1 bytes, {self.remaining} left")
        self._pos = pos + 1
        return self._data[pos]

    def u16(self) -> int:
        pos = self._pos
        if pos + 2 > self._end:
            raise DecodeError(f"need 2 bytes, {self.remaining} left")
        self._pos = pos + 2
        data = self._data
        return data[pos] << 8 | data[pos + 1]

    def u24(self) -> int:
        pos = self._pos
        if pos + 3 > self._end:
            raise DecodeError(f"need 3 bytes, {self.remaining} left")
        self._pos = pos + 3
        data = self._data
        return data[pos] << 16 | data[pos + 1] << 8 | data[pos + 2]

    def u32(self) -> int:
        return self._uint(4)

    def u64(self) -> int:
        return self._uint(8)

    def _opaque(self, prefix: int, min_len: int, max_len: int | None) -> bytes:
        pos, data = self._pos, self._data
        if pos + prefix > self._end:
            raise DecodeError(f"need {prefix} bytes, {self.remaining} left")
        if prefix == 1:
            n = data[pos]
        elif prefix == 2:
            n = data[pos] << 8 | data[pos + 1]
        else:
            n = int.from_bytes(data[pos : pos + prefix], "big")
        if n < min_len or (max_len is not None and n > max_len):
            raise DecodeError(f"vector length {n} outside [{min_len}, {max_len}]")
        start = pos + prefix
        if start + n > self._end:
            self._pos = start
            raise DecodeError(f"need {n} bytes, {self.remaining} left")
        self._pos = start + n
        return data[start : start + n]

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
        if len(body) < 2 * min_items:
            raise DecodeError("vector too short")
        return list(struct.unpack(f">{len(body) // 2}H", body))


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

    def _prefixed(self, data: bytes, size: int) -> Writer:
        n = len(data)
        if n >= 1 << (8 * size):
            raise ValueError(f"{n} does not fit in {size} bytes")
        buf = self._buf
        buf += n.to_bytes(size, "big")
        buf += data
        return self

    def opaque8(self, data: bytes) -> Writer:
        return self._prefixed(data, 1)

    def opaque16(self, data: bytes) -> Writer:
        return self._prefixed(data, 2)

    def opaque24(self, data: bytes) -> Writer:
        return self._prefixed(data, 3)

    def u16_list(self, values: list[int] | tuple[int, ...], prefix: int = 2) -> Writer:
        try:
            body = struct.pack(f">{len(values)}H", *values)
        except struct.error:
            raise ValueError("a uint16 vector item out of range") from None
        return self._prefixed(body, prefix)
