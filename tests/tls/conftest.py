"""Fixtures of the TLS client tests: the test PKI and real peers (tests/peers/servers.py)."""

from tests.peers.servers import server_pki

__all__ = ["server_pki"]
