"""Reader/Writer: every short or overlong field is a DecodeError."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qkdtls.tls.alerts import DecodeError
from qkdtls.tls.buffer import Reader, Writer


def test_roundtrip_of_every_width() -> None:
    data = (Writer().u8(1).u16(2).u24(3).u32(4).u64(5).opaque8(b"a").opaque16(b"bc").opaque24(b"def")
            .u16_list([7, 8]).getvalue())
    r = Reader(data)
    assert (r.u8(), r.u16(), r.u24(), r.u32(), r.u64()) == (1, 2, 3, 4, 5)
    assert (r.opaque8(), r.opaque16(), r.opaque24(), r.u16_list()) == (b"a", b"bc", b"def", [7, 8])
    r.expect_end()


@pytest.mark.parametrize(
    ("data", "read"),
    [
        (b"", Reader.u8),
        (b"\x00", Reader.u16),
        (b"\x05abc", Reader.opaque8),
        (b"\x00\x03\x00\x01\x00", lambda r: r.u16_list()),
    ],
)
def test_short_input(data: bytes, read) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(DecodeError):
        read(Reader(data))


def test_bounds_and_trailing_bytes() -> None:
    with pytest.raises(DecodeError):
        Reader(b"\x00").opaque8(min_len=1)
    with pytest.raises(DecodeError):
        Reader(b"\x02ab").opaque8(max_len=1)
    with pytest.raises(DecodeError):
        Reader(b"\x01").expect_end()
    with pytest.raises(ValueError):
        Writer().u8(256)


@given(st.binary(max_size=64))
def test_reader_never_raises_anything_else(data: bytes) -> None:
    r = Reader(data)
    try:
        r.sub16().u16_list(prefix=1)
        r.opaque24()
    except DecodeError:
        pass
