"""Shared pytest configuration. Fixture modules for real peers live in tests/peers/ and are listed here."""

pytest_plugins: list[str] = ["tests.peers.postgres"]
