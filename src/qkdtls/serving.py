"""Plumbing every long-running qkdtls server shares: the event loop it runs on and its listening socket.

Used by the KME (``kme/server.py``), its lean HTTP layer (``http11/server.py``), ``qkdtls tunnel`` and the
benchmarks that drive them, so that all of them choose the loop, and bind, the same way.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

EVENT_LOOPS = ("auto", "uvloop", "asyncio")


def run(main: Coroutine[Any, Any, T], event_loop: str = "auto") -> T:
    """Run ``main`` on a new event loop: uvloop when installed (``auto``) or asked for, else asyncio.

    libuv's TCP and TLS paths cost about a third less CPU per KME request than asyncio's (measured when the
    KME adopted it); ``asyncio`` stays selectable for comparison and for platforms without uvloop."""
    if event_loop not in EVENT_LOOPS:
        raise ValueError(f"event loop {event_loop!r}: choose one of {', '.join(EVENT_LOOPS)}")
    if event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if event_loop == "uvloop":
                main.close()
                raise ValueError("--event-loop uvloop: the uvloop package is not installed") from None
        else:
            return uvloop.run(main)
    return asyncio.run(main)


async def listening_socket(host: str, port: int, backlog: int) -> socket.socket:
    """A bound, listening, non-blocking TCP socket (SO_REUSEADDR) for ``host:port`` (port 0: any free one),
    for servers that accept connections themselves or hand the socket to ``loop.create_server``."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = infos[0]
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(backlog)
        listener.setblocking(False)
    except BaseException:
        listener.close()
        raise
    return listener
