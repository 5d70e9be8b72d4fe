"""Secret sharing for multi-path key spreading (pure code, no I/O).

- XOR n-of-n: the key is the XOR of n shares; any n-1 shares are uniformly random and independent of it.
  The relay takes n-1 (or all n) shares from QKD link material, so no other randomness is involved.
- Shamir k-of-n over GF(2^8) (polynomial x^8 + x^4 + x^3 + x + 1), bytewise: share ``x`` of a byte ``s`` is
  ``f(x)`` for a random polynomial ``f`` of degree k-1 with ``f(0) = s``. Any k-1 shares are uniformly
  random whatever the key; any k rebuild it; more than k can be checked against each other. The coefficients
  come from the caller (``random_bytes``; the relay passes ``os.urandom``, the OS CSPRNG).

Multiplication by a constant is a 256-byte translation table, so ``bytes.translate`` does the field arithmetic
of a whole share in C.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence

from qkdtls.kme.relay.otp import xor

MAX_SHARES = 255  # distinct non-zero x coordinates in GF(2^8)

_EXP = [0] * 510
_LOG = [0] * 256


def _init_tables() -> None:
    value = 1
    for power in range(255):
        _EXP[power] = value
        _LOG[value] = power
        # multiply by the generator 0x03: value * 2 (reduced) XOR value
        doubled = value << 1
        if doubled & 0x100:
            doubled ^= 0x11B
        value = doubled ^ value
    for power in range(255, 510):
        _EXP[power] = _EXP[power - 255]


_init_tables()


def gf_mul(a: int, b: int) -> int:
    if a == 0 or b == 0:
        return 0
    return _EXP[_LOG[a] + _LOG[b]]


def gf_div(a: int, b: int) -> int:
    if b == 0:
        raise ZeroDivisionError("division by zero in GF(2^8)")
    if a == 0:
        return 0
    return _EXP[_LOG[a] + 255 - _LOG[b]]


@functools.cache
def _times(c: int) -> bytes:
    """Translation table of multiplication by ``c``."""
    return bytes(gf_mul(c, v) for v in range(256))


def _scale(data: bytes, c: int) -> bytes:
    if c == 1:
        return data
    return data.translate(_times(c))


def _xor_all(parts: Sequence[bytes], length: int) -> bytes:
    acc = 0
    for part in parts:
        acc ^= int.from_bytes(part, "little")
    return acc.to_bytes(length, "little")


class ShareError(ValueError):
    """Shares that cannot form a key: wrong count, duplicate or invalid x, different lengths."""


# --- XOR n-of-n -------------------------------------------------------------------------------------------


def xor_combine(shares: Sequence[bytes]) -> bytes:
    if not shares or len({len(s) for s in shares}) != 1:
        raise ShareError("XOR shares must be non-empty and of equal length")
    return _xor_all(shares, len(shares[0]))


def xor_complete(secret: bytes, others: Sequence[bytes]) -> bytes:
    """The last share, given the key and the other n-1 shares."""
    return xor(secret, xor_combine(others)) if others else secret


# --- Shamir k-of-n over GF(2^8) -------------------------------------------------------------------------


def shamir_split(
    secret: bytes, k: int, n: int, random_bytes: Callable[[int], bytes] = os.urandom
) -> list[tuple[int, bytes]]:
    """Shares ``(x, y)`` for x = 1..n; any k of them rebuild ``secret``."""
    if not 2 <= k <= n <= MAX_SHARES:
        raise ShareError(f"need 2 <= k <= n <= {MAX_SHARES}")
    coefficients = [random_bytes(len(secret)) for _ in range(k - 1)]
    if any(len(c) != len(secret) for c in coefficients):
        raise ShareError("random_bytes returned the wrong length")
    shares = []
    for x in range(1, n + 1):
        terms = [secret]
        power = 1
        for c in coefficients:
            power = gf_mul(power, x)
            terms.append(_scale(c, power))
        shares.append((x, _xor_all(terms, len(secret))))
    return shares


def _check(shares: Sequence[tuple[int, bytes]]) -> int:
    xs = [x for x, _ in shares]
    if not shares or len(set(xs)) != len(xs) or not all(1 <= x <= MAX_SHARES for x in xs):
        raise ShareError("shares need distinct x in 1..255")
    lengths = {len(y) for _, y in shares}
    if len(lengths) != 1:
        raise ShareError("shares differ in length")
    return lengths.pop()


def _interpolate(shares: Sequence[tuple[int, bytes]], at: int, length: int) -> bytes:
    terms = []
    for i, (xi, yi) in enumerate(shares):
        weight = 1
        for j, (xj, _) in enumerate(shares):
            if i != j:
                weight = gf_mul(weight, gf_div(at ^ xj, xi ^ xj))
        terms.append(_scale(yi, weight))
    return _xor_all(terms, length)


def shamir_combine(shares: Sequence[tuple[int, bytes]]) -> bytes:
    """The secret from k (or more: all are used) shares of one polynomial."""
    length = _check(shares)
    return _interpolate(shares, 0, length)


def shamir_consistent(shares: Sequence[tuple[int, bytes]], k: int) -> bool:
    """True when every share beyond the first ``k`` lies on the polynomial the first ``k`` define."""
    length = _check(shares)
    if len(shares) < k:
        raise ShareError(f"need at least {k} shares")
    base = list(shares[:k])
    return all(_interpolate(base, x, length) == y for x, y in shares[k:])
