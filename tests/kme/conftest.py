"""Fixtures for the KME tests: a testbed on disk, in-process KMEs on loopback, mutual-TLS HTTP callers."""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from qkdtls.kme.config import KmeConfig, load_config
from qkdtls.kme.server import KmeServer
from qkdtls.kme.store import KeyStore, open_store
from qkdtls.testbed import Testbed

SMALL_STOCK = 64 * 1024  # 2048 blocks of 32 bytes per link: enough for every functional test


def tls_client_context(cert: Path | None, key: Path | None, ca: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None and key is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


@dataclass
class Reply:
    status: int
    content_type: str
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class Caller:
    """A kept-alive mutual-TLS HTTP client for one identity; returns status, content type and body."""

    def __init__(self, base: str, ctx: ssl.SSLContext, timeout: float = 10.0) -> None:
        self.base = base
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ctx), timeout=aiohttp.ClientTimeout(total=timeout)
        )

    async def request(self, method: str, path: str, **kwargs: Any) -> Reply:
        async with self.session.request(method, self.base + path, **kwargs) as resp:
            return Reply(resp.status, resp.content_type, await resp.read())

    async def get(self, path: str, **kwargs: Any) -> Reply:
        return await self.request("GET", path, **kwargs)

    async def post(self, path: str, doc: Any = None, **kwargs: Any) -> Reply:
        if doc is not None:
            kwargs["data"] = json.dumps(doc)
            kwargs.setdefault("headers", {"Content-Type": "application/json"})
        return await self.request("POST", path, **kwargs)

    async def close(self) -> None:
        await self.session.close()


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A key store on a SQLite file, then on a fresh PostgreSQL database (same tests for both)."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'kme.sqlite3'}"
    return str(request.getfixturevalue("postgres_dsn"))


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[KeyStore]:
    s = open_store(store_url)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
def two_databases(postgres_server: str) -> Iterator[dict[int, str]]:
    """A fresh PostgreSQL database for each KME of a testbed (store URLs by KME ID); dropped afterwards."""
    import psycopg

    names = {k: f"kme{k}_{os.getpid()}" for k in (1, 2)}
    with psycopg.connect(postgres_server, autocommit=True, connect_timeout=10) as conn:
        for name in names.values():
            conn.execute(f"CREATE DATABASE {name}")
    base = postgres_server.rsplit("/", 1)[0]
    try:
        yield {k: f"{base}/{name}" for k, name in names.items()}
    finally:
        with psycopg.connect(postgres_server, autocommit=True, connect_timeout=10) as conn:
            for name in names.values():
                conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def stores(request: pytest.FixtureRequest) -> Any:
    """``store=`` of Testbed.create: a SQLite file per KME, then a PostgreSQL database per KME."""
    if request.param == "sqlite":
        return "sqlite"
    return request.getfixturevalue("two_databases")


@pytest.fixture
def testbed(tmp_path: Path) -> Iterator[Testbed]:
    """Files only (PKI, configs, key folders); tests start KMEs in-process or as subprocesses."""
    bed = Testbed.create(tmp_path / "bed", initial_key_bytes=SMALL_STOCK)
    yield bed
    bed.stop()


@dataclass
class Pair:
    """Two in-process KMEs of a testbed and callers for every SAE and administrator."""

    testbed: Testbed
    servers: dict[int, KmeServer]
    callers: dict[int, Caller]
    admins: dict[int, Caller]

    def config(self, kme_id: int) -> KmeConfig:
        return self.servers[kme_id].config

    def caller(self, sae_id: int) -> Caller:
        return self.callers[sae_id]


async def start_pair(bed: Testbed) -> Pair:
    servers: dict[int, KmeServer] = {}
    try:
        for kme_id in bed.kmes:
            server = KmeServer(load_config(bed.config_path(kme_id)))
            await server.start()
            servers[kme_id] = server
    except BaseException:
        for server in servers.values():
            await server.stop()
        raise
    callers = {
        sae: Caller(bed.sae_url(bed.kme_of(sae)), tls_client_context(*bed.sae_credentials(sae)))
        for sae in bed.sae_kme
    }
    admins = {k: Caller(bed.sae_url(k), tls_client_context(*bed.admin_credentials(k))) for k in bed.kmes}
    return Pair(bed, servers, callers, admins)


async def stop_pair(pair: Pair) -> None:
    for caller in [*pair.callers.values(), *pair.admins.values()]:
        await caller.close()
    for server in pair.servers.values():
        await server.stop()


@pytest.fixture
async def pair(testbed: Testbed) -> AsyncIterator[Pair]:
    p = await start_pair(testbed)
    try:
        yield p
    finally:
        await stop_pair(p)
