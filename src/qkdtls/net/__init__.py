"""Thin I/O adapters around the sans-I/O TLS core: blocking sockets, asyncio streams, the OpenSSL hand-off.

The application-facing API mirrors :mod:`ssl`: a :class:`QKDContext` wraps sockets into :class:`QKDSocket`
objects, and :func:`open_connection` / :func:`start_server` give asyncio streams.
"""

from qkdtls.net.aio import open_connection, start_server
from qkdtls.net.context import QKDContext
from qkdtls.net.directory import SaeDirectory
from qkdtls.net.errors import (
    QKDConfigurationError,
    QKDConnectionError,
    QKDError,
    QKDHandshakeError,
    QKDHandshakeTimeout,
    QKDKeyUnavailable,
    QKDPolicyError,
)
from qkdtls.net.socket import QKDSocket

__all__ = [
    "QKDConfigurationError",
    "QKDConnectionError",
    "QKDContext",
    "QKDError",
    "QKDHandshakeError",
    "QKDHandshakeTimeout",
    "QKDKeyUnavailable",
    "QKDPolicyError",
    "QKDSocket",
    "SaeDirectory",
    "open_connection",
    "start_server",
]
