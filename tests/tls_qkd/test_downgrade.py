"""One tampered connection never switches TLS-QKD off for the next ones.

A client stops offering keys to a server only on authenticated evidence that it cannot use them: a classic
handshake with the server's certificate verified, from a server that has not proven TLS-QKD recently. A
``required`` client never stops (it has no classic handshake to fall back to). Attacks replayed here:

(a) any classic TLS server answering one connection of a ``required`` client;
(b) a replayed ClientHello of a ``preferred`` client reaching the server first (the server then refuses the
    honest connection's key as already used - with an alert, never with a classic handshake to learn from);
and a TLS-QKD server answering classically once (its KME failed) after it proved TLS-QKD.
"""

from __future__ import annotations

import dataclasses
import socket
import ssl
import threading
from collections.abc import Callable

import pytest
from tests.peers.clients import OneShotServer
from tests.tls_qkd.conftest import (
    HOST,
    SERVER_SAE,
    TIMEOUT,
    AioServer,
    Site,
    client_context,
    echo_once,
    ping_echo,
    server_context,
)

from qkdtls.etsi014.client import KmeClient
from qkdtls.net.errors import QKDHandshakeError, QKDPolicyError
from qkdtls.testbed import free_port
from qkdtls.tls.alerts import AlertDescription


def _classic_server(site_b: Site) -> Callable[[socket.socket], object]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(site_b.app_cert, site_b.app_key)

    def handle(raw: socket.socket) -> object:
        with ctx.wrap_socket(raw, server_side=True) as tls:
            return tls.recv(100)

    return handle


def _in_turn(*handlers: Callable[[socket.socket], object]) -> Callable[[socket.socket], object]:
    """A server whose n-th connection is answered by the n-th handler (what sits behind the address)."""
    queue = list(handlers)
    return lambda raw: queue.pop(0)(raw)


def test_a_classic_answer_never_locks_a_required_client_out(
    site_b: Site, kme_a: KmeClient, kme_b: KmeClient
) -> None:
    client = client_context(site_b, kme_a, qkd="required")
    genuine = echo_once(server_context(site_b, kme_b, qkd="required"))
    with OneShotServer(_in_turn(_classic_server(site_b), genuine), connections=2) as srv:
        raw = socket.create_connection((HOST, srv.port), timeout=TIMEOUT)
        with pytest.raises(QKDPolicyError) as refused:  # (a): someone answers with any TLS server
            client.wrap_socket(raw, server_hostname="localhost", target_sae_id=SERVER_SAE)
        raw.close()
        assert not refused.value.sent_by_peer
        info = ping_echo(client, srv.port)  # the next connection offers a key again
        srv.join()
    assert info.mode == "qkd"
    assert ("localhost", srv.port) not in client.non_qkd_peers


class ReplayFirst:
    """A man in the middle: the first ClientHello it relays is replayed to the server on a connection of its
    own, and forwarded only once the server has answered the replay (the key is then used). Later
    connections are relayed untouched."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server((HOST, 0))
        self.port = self.listener.getsockname()[1]
        self.replayed_answer = b""
        self._first = True
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    @staticmethod
    def _client_hello(sock: socket.socket) -> bytes:
        data = b""
        while len(data) < 5 or len(data) < 5 + int.from_bytes(data[3:5], "big"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        return data

    def _relay(self, client: socket.socket) -> None:
        client.settimeout(TIMEOUT)
        hello = b""
        if self._first:
            self._first = False
            hello = self._client_hello(client)
            replay = socket.create_connection(self.target, timeout=TIMEOUT)
            replay.sendall(hello)
            self.replayed_answer = replay.recv(65536)  # the server answered the replay: the key is used
            self._held.append(replay)  # never finished
        upstream = socket.create_connection(self.target, timeout=TIMEOUT)
        upstream.sendall(hello)

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

        down = threading.Thread(target=pump, args=(upstream, client), daemon=True)
        down.start()
        pump(client, upstream)
        down.join(TIMEOUT)
        client.close()
        upstream.close()

    def __enter__(self) -> ReplayFirst:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the relay's thread
        except OSError:
            pass
        self.listener.close()
        for sock in self._held:
            sock.close()
        self._thread.join(TIMEOUT)


def test_a_replayed_client_hello_does_not_switch_qkd_off(
    site_b: Site, site_a: Site, kme_b: KmeClient
) -> None:
    client = client_context(site_b, site_a.kme, qkd="preferred")  # a fresh client: never did TLS-QKD yet
    with AioServer(server_context(site_b, kme_b, qkd="preferred")) as server, ReplayFirst(
        (HOST, server.port)
    ) as mitm:
        raw = socket.create_connection((HOST, mitm.port), timeout=TIMEOUT)
        with pytest.raises(QKDHandshakeError) as refused:  # (b): the honest connection's key was used
            client.wrap_socket(raw, server_hostname="localhost", target_sae_id=SERVER_SAE)
        raw.close()
        # The replay got the server's QKD answer (ServerHello), the honest connection a clear-text alert.
        assert mitm.replayed_answer[:1] == b"\x16"
        assert refused.value.sent_by_peer and refused.value.alert == AlertDescription.illegal_parameter
        assert ("localhost", mitm.port) not in client.non_qkd_peers
        info = ping_echo(client, mitm.port)
    client.close()
    assert info.mode == "qkd"
    assert [i.mode for i in server.infos] == ["qkd"]  # no classic connection was ever served


def test_a_server_that_proved_qkd_is_not_forgotten_after_one_classic_answer(
    site_b: Site, kme_a: KmeClient, kme_b: KmeClient
) -> None:
    dead = dataclasses.replace(site_b.kme, url=f"https://{HOST}:{free_port()}", timeout=1.0)
    qkd = echo_once(server_context(site_b, kme_b, qkd="preferred"))
    kme_down = echo_once(server_context(site_b, dead, qkd="preferred"))  # answers classically
    client = client_context(site_b, kme_a, qkd="preferred")
    with OneShotServer(_in_turn(qkd, kme_down, qkd), connections=3) as srv:
        modes = [ping_echo(client, srv.port).mode for _ in range(3)]
        srv.join()
    assert not srv.errors, srv.errors
    assert modes == ["qkd", "classic", "qkd"]


def test_a_verified_classic_server_is_offered_no_key_for_a_while(
    site_b: Site, kme_a: KmeClient
) -> None:
    """What the memory is for: a server that never did TLS-QKD costs one key, not one per connection."""
    client = client_context(site_b, kme_a, qkd="preferred")

    def echo_classic(raw: socket.socket) -> object:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(site_b.app_cert, site_b.app_key)
        with ctx.wrap_socket(raw, server_side=True) as tls:
            tls.sendall(b"echo:" + tls.recv(100))
        return None

    with OneShotServer(echo_classic, connections=2) as srv:
        before = kme_a.requests_sent
        assert ping_echo(client, srv.port).mode == "classic"
        assert ("localhost", srv.port) in client.non_qkd_peers
        spent = kme_a.requests_sent - before
        assert ping_echo(client, srv.port).mode == "classic"
        assert kme_a.requests_sent - before == spent
        srv.join()
    # Without a verified certificate it proves nothing.
    unverified = client_context(site_b, kme_a, qkd="preferred", check_hostname=False)
    with OneShotServer(echo_classic) as srv:
        assert ping_echo(unverified, srv.port).mode == "classic"
        srv.join()
    assert ("localhost", srv.port) not in unverified.non_qkd_peers
