"""What the client refuses: bad certificates, tampered records; and that no AEAD nonce repeats."""

from __future__ import annotations

import pytest
from tests.peers.servers import Driver, Identity, ServerPki, openssl_server

from qkdtls.tls import records
from qkdtls.tls.alerts import BadCertificate, BadRecordMac, CertificateExpired, UnknownCA
from qkdtls.tls.client import TLSClient
from qkdtls.tls.config import ClientConfig
from qkdtls.tls.events import ApplicationData, KeyUpdated

pytestmark = pytest.mark.peers


def _client(pki: ServerPki, server_name: str = "localhost") -> TLSClient:
    return TLSClient(ClientConfig(trust=pki.trust(), qkd="off"), server_name)


def _server_args(ident: Identity, *extra: str) -> tuple[str, ...]:
    return ("-cert", str(ident.cert), "-key", str(ident.key), *extra)


@pytest.mark.parametrize(
    ("which", "server_name", "error", "alert_name"),
    [
        ("wrong_name", "localhost", BadCertificate, b"bad certificate"),
        ("foreign", "localhost", UnknownCA, b"unknown ca"),
        ("expired", "localhost", CertificateExpired, b"certificate expired"),
        ("good", "elsewhere.example", BadCertificate, b"bad certificate"),
    ],
)
def test_certificate_rejections(server_pki: ServerPki, which: str, server_name: str, error: type,
                                alert_name: bytes) -> None:
    ident = server_pki.servers["ec-p256"] if which == "good" else getattr(server_pki, which)
    with openssl_server(*_server_args(ident, "-rev")) as server:
        drv = Driver(server.connect(), _client(server_pki, server_name))
        with pytest.raises(error):
            drv.handshake()
        server.wait_output(alert_name)   # the alert reached the server
        drv.close()


def test_check_hostname_off_still_checks_chain(server_pki: ServerPki) -> None:
    with openssl_server(*_server_args(server_pki.wrong_name, "-rev")) as server:
        cfg = ClientConfig(trust=server_pki.trust(), qkd="off", check_hostname=False)
        drv = Driver(server.connect(), TLSClient(cfg, "localhost"))
        drv.handshake()
        drv.close()
    with openssl_server(*_server_args(server_pki.foreign, "-rev")) as server:
        drv = Driver(server.connect(), TLSClient(cfg, "localhost"))
        with pytest.raises(UnknownCA):
            drv.handshake()
        drv.close()


class FlipProtectedRecord:
    """Flips the last byte of the n-th protected (type 23) record the server sends."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.seen = 0
        self._buffer = bytearray()

    def __call__(self, data: bytes) -> bytes:
        self._buffer += data
        out = bytearray()
        while len(self._buffer) >= 5:
            length = int.from_bytes(self._buffer[3:5], "big")
            if len(self._buffer) < 5 + length:
                break
            record = bytearray(self._buffer[: 5 + length])
            del self._buffer[: 5 + length]
            if record[0] == records.APPLICATION_DATA:
                if self.seen == self.target:
                    record[-1] ^= 0x01
                self.seen += 1
            out += record
        return bytes(out)


@pytest.mark.parametrize("target", range(5))   # EE, Certificate, CertificateVerify, Finished, app data
def test_tampered_server_record_is_bad_record_mac(server_pki: ServerPki, target: int) -> None:
    with openssl_server(*_server_args(server_pki.servers["ec-p256"], "-rev")) as server:
        flip = FlipProtectedRecord(target)
        drv = Driver(server.connect(), _client(server_pki),
                     incoming=flip)
        with pytest.raises(BadRecordMac):
            drv.handshake()
            drv.send(b"payload\n")
            drv.expect(b"daolyap")
        assert flip.seen > target
        assert not any(isinstance(e, ApplicationData) for e in drv.events)
        # s_server reports alerts only during the handshake; afterwards it just closes.
        server.wait_output(b"bad record mac" if target < 4 else b"CONNECTION CLOSED")
        drv.close()


def test_no_aead_nonce_repeats_under_one_key(server_pki: ServerPki, monkeypatch: pytest.MonkeyPatch) -> None:
    used: list[tuple[bytes, bytes]] = []
    original_init = records.AeadProtection.__init__
    original_nonce = records.AeadProtection._next_nonce

    def init(self, suite, key, iv):  # type: ignore[no-untyped-def]
        original_init(self, suite, key, iv)
        self._observed_key = key

    def next_nonce(self):  # type: ignore[no-untyped-def]
        nonce = original_nonce(self)
        used.append((self._observed_key, nonce))
        return nonce

    monkeypatch.setattr(records.AeadProtection, "__init__", init)
    monkeypatch.setattr(records.AeadProtection, "_next_nonce", next_nonce)
    with openssl_server(*_server_args(server_pki.servers["ec-p256"])) as server:
        drv = Driver(server.connect(), _client(server_pki))
        drv.handshake()
        for round_ in range(3):
            for i in range(3):
                drv.send(b"c%d-%d\n" % (round_, i))
                server.write(b"s%d-%d\n" % (round_, i))
                drv.expect(b"s%d-%d" % (round_, i))
            drv.conn.update_key(request_peer=True)
            drv.send(b"u%d\n" % round_)
            server.wait_output(b"u%d" % round_)
            server.write(b"a%d\n" % round_)   # OpenSSL sends the requested KeyUpdate with its next write
            drv.expect(b"a%d" % round_)
            before = len(drv.events)
            server.write(b"K\n")
            # s_server drops whatever else came in the same stdin read as "K": wait for its KeyUpdate first.
            drv.pump_until(lambda start=before: any(isinstance(e, KeyUpdated) for e in drv.events[start:]))
            server.write(b"r%d\n" % round_)
            drv.expect(b"r%d" % round_)
        drv.close()
    assert sum(isinstance(e, KeyUpdated) for e in drv.events) >= 9
    keys = {key for key, _ in used}
    assert len(keys) >= 8   # handshake keys + several application key generations per direction
    assert len(set(used)) == len(used)
