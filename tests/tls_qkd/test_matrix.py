"""The fallback matrix through two real KMEs: every client kind x every server kind (docs/tls-qkd.md).

A QKD side is (policy, profiles); a classic side is Python ``ssl``. Each cell runs one real handshake on
loopback and checks what docs/tls-qkd.md promises: QKD mode with the right profile and key ID when both sides
can, standard TLS 1.3 with certificate checks when one cannot and neither requires QKD, and an
``insufficient_security`` refusal when one side requires QKD and the other cannot give it.
"""

from __future__ import annotations

import itertools
import socket
import ssl
from dataclasses import dataclass

import pytest
from tests.peers.clients import OneShotServer
from tests.tls_qkd.conftest import HOST, SERVER_SAE, TIMEOUT, Site, client_context, echo_once, server_context

from qkdtls.etsi014.client import KmeClient
from qkdtls.net.errors import QKDError, QKDPolicyError
from qkdtls.tls.alerts import AlertDescription

PROFILE_SETS = (("secure",), ("reference",), ("secure", "reference"))
POLICIES = ("required", "preferred", "off")


@dataclass(frozen=True)
class Side:
    policy: str | None  # None: a classic peer (Python ssl)
    profiles: tuple[str, ...] = ()

    def __str__(self) -> str:
        return "classic" if self.policy is None else f"{self.policy}-{'+'.join(self.profiles)}"

    @property
    def offers_qkd(self) -> bool:
        return self.policy not in (None, "off")


SIDES = [Side(p, s) for p, s in itertools.product(POLICIES, PROFILE_SETS)] + [Side(None)]


def expected(client: Side, server: Side) -> tuple[str, str | None] | None:
    """(mode, profile) the cell must negotiate, or None when one side must refuse."""
    if client.policy is None and server.policy is None:
        return ("classic", None)
    common = [p for p in ("secure", "reference") if p in client.profiles and p in server.profiles]
    if client.offers_qkd and server.offers_qkd and common:
        return ("qkd", common[0])  # the server prefers the secure profile
    if "required" in (client.policy, server.policy):
        return None
    return ("classic", None)


def _classic_server(site_b: Site) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(site_b.app_cert, site_b.app_key)
    return ctx


def _classic_echo(ctx: ssl.SSLContext) -> object:
    def handle(raw: socket.socket) -> object:
        with ctx.wrap_socket(raw, server_side=True) as tls:
            data = tls.recv(65536)
            tls.sendall(b"echo:" + data)
            return None

    return handle


def _run_client(client: Side, site_b: Site, kme_a: KmeClient, port: int) -> tuple[object, bytes]:
    raw = socket.create_connection((HOST, port), timeout=TIMEOUT)
    if client.policy is None:
        ctx = ssl.create_default_context(cafile=str(site_b.app_ca))
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"ping")
            return None, tls.recv(65536)
    context = client_context(site_b, kme_a, qkd=client.policy, profiles=client.profiles)
    with context.wrap_socket(raw, server_hostname="localhost", target_sae_id=SERVER_SAE) as tls:
        tls.sendall(b"ping")
        return tls.info, tls.recv(65536)


@pytest.mark.parametrize("server", SIDES, ids=str)
@pytest.mark.parametrize("client", SIDES, ids=str)
def test_cell(client: Side, server: Side, site_b: Site, kme_a: KmeClient, kme_b: KmeClient) -> None:
    outcome = expected(client, server)
    if server.policy is None:
        handler = _classic_echo(_classic_server(site_b))
    else:
        handler = echo_once(server_context(site_b, kme_b, qkd=server.policy, profiles=server.profiles))
    with OneShotServer(handler) as srv:
        if outcome is None:
            with pytest.raises((QKDError, ssl.SSLError, ConnectionError)) as failure:
                _run_client(client, site_b, kme_a, srv.port)
            srv.join()
            _assert_refused(client, server, failure.value, srv.errors)
            return
        client_info, answer = _run_client(client, site_b, kme_a, srv.port)
        srv.join()
    assert not srv.errors, srv.errors
    assert answer == b"echo:ping"
    mode, profile = outcome
    server_info = srv.results[0]
    for info in (client_info, server_info):
        if info is None:
            continue  # the classic side reports nothing of ours
        assert info.mode == mode  # type: ignore[attr-defined]
        assert info.profile == profile  # type: ignore[attr-defined]
        assert info.version == "TLSv1.3"  # type: ignore[attr-defined]
    if mode == "qkd":
        assert client_info is not None and server_info is not None
        assert client_info.key_id and client_info.key_id == server_info.key_id  # type: ignore[attr-defined]
        assert server_info.peer_sae_id == 1001  # type: ignore[attr-defined]


def _assert_refused(
    client: Side, server: Side, exc: BaseException, server_errors: list[BaseException]
) -> None:
    """The server decides first (it sees the ClientHello); a required client refuses what the server chose."""
    insufficient = AlertDescription.insufficient_security
    if server.policy == "required":
        assert any(isinstance(e, QKDPolicyError) and e.alert == insufficient for e in server_errors), (
            server_errors
        )
        if client.policy is not None:
            assert isinstance(exc, QKDPolicyError) and exc.sent_by_peer, exc
        else:
            assert isinstance(exc, ssl.SSLError) and "INSUFFICIENT_SECURITY" in str(exc).upper(), exc
    else:
        assert client.policy == "required"
        assert isinstance(exc, QKDPolicyError) and not exc.sent_by_peer, exc
        assert exc.alert == insufficient
