"""Errors of the KME domain, each carrying the HTTP status and an ETSI 014 ``Error`` message safe to show.

The HTTP layer turns a :class:`KmeError` into ``status`` with body ``{"message": ..., "details": ...}``.
Messages never contain key material. :class:`PeerUnavailable` and :class:`PeerRejected` are raised by a peer
gateway (the inter-KME client) and mapped by the service to 503 after releasing or burning the held blocks.
On the callee side, :class:`BlocksTakenError` (HTTP 409) is what a gateway turns back into
:class:`PeerRejected`, and :class:`UncollectedQuotaError` (HTTP 429) into :class:`PeerQuotaExceeded`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar


class KmeError(Exception):
    """A refused request; ``message`` and ``details`` go to the caller as an ETSI 014 ``Error`` object."""

    status: ClassVar[int] = 500

    def __init__(self, message: str, details: Sequence[Mapping[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: list[dict[str, Any]] | None = [dict(d) for d in details] if details else None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"message": self.message}
        if self.details:
            doc["details"] = self.details
        return doc


class BadRequestError(KmeError):
    status = 400


class UnauthorizedError(KmeError):
    status = 401


class UnavailableError(KmeError):
    """Not enough key material, the peer KME is down or slow, or the store is busy; the caller may retry."""

    status = 503


class BlocksTakenError(KmeError):
    """Inter-KME only: some blocks of a reservation are not free here (used, burnt or never imported)."""

    status = 409


class UncollectedQuotaError(KmeError):
    """Inter-KME only: the master SAE of a reservation has too many keys not collected at this KME.

    The SAE interface never shows 429 (ETSI 014 allows 400, 401, 503): the master KME answers its SAE 503
    with this message."""

    status = 429


class PeerUnavailable(Exception):
    """The peer KME could not be reached or answered with an error that says nothing about the blocks."""


class PeerRejected(Exception):
    """The peer KME refused the reservation because some blocks are not free there: they must be burnt."""


class PeerQuotaExceeded(Exception):
    """The peer KME refused the reservation for a quota (its 429); the blocks are released, and the message
    (safe to show the master SAE) says which."""
