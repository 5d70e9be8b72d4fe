"""Exceptions of the socket-level API, shaped like :mod:`ssl`'s: all are :class:`OSError` subclasses.

Applications that already catch ``OSError``/``ssl.SSLError`` around their network code keep working; the
subclasses say which decision failed (policy, KME, handshake) so a caller can react to each. Messages say
what to do and never carry key material.
"""

from __future__ import annotations

from qkdtls.tls.alerts import AlertDescription


class QKDError(OSError):
    """Base of everything :mod:`qkdtls.net` raises."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class QKDConfigurationError(QKDError):
    """The context cannot honour the policy as configured (no KME, no target SAE ID, missing certificate)."""


class QKDKeyUnavailable(QKDError):
    """The KME gave no key in time (unreachable, refusing, exhausted) and the policy forbids fallback."""


class QKDHandshakeError(QKDError):
    """The TLS handshake failed; ``alert`` is the TLS alert involved, ``sent_by_peer`` tells who sent it."""

    def __init__(self, message: str, alert: int | None = None, *, sent_by_peer: bool = False) -> None:
        super().__init__(message)
        self.alert = alert
        self.sent_by_peer = sent_by_peer

    @property
    def alert_name(self) -> str | None:
        if self.alert is None:
            return None
        try:
            return AlertDescription(self.alert).name
        except ValueError:
            return f"alert {self.alert}"


class QKDPolicyError(QKDHandshakeError):
    """Policy ``required`` and the peer does not speak TLS-QKD (``insufficient_security``)."""


class QKDKeyReplayed(QKDHandshakeError):
    """Server: the ClientHello names a QKD key this server already used (or is using): a replayed ClientHello.

    Refused with an ``illegal_parameter`` alert under every policy, never handed to classic TLS: a replay
    must not turn an honest client's connection into a classic one it would learn from.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, AlertDescription.illegal_parameter)


class QKDHandshakeTimeout(QKDError, TimeoutError):
    """The handshake did not complete within the context's ``handshake_timeout``."""


class QKDConnectionError(QKDError):
    """The established connection failed (a fatal alert, a bad record, an unexpected EOF)."""

    def __init__(self, message: str, alert: int | None = None) -> None:
        super().__init__(message)
        self.alert = alert
