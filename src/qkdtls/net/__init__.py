"""Thin I/O adapters around the sans-I/O TLS core: blocking sockets, asyncio streams, the OpenSSL hand-off."""
