from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import socket
import ssl
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from qkdtls import pki
from qkdtls.cli import pki as pki_cli

# 19 octets whose first is >= 0x80: DER needs a 20th, leading 0x00 (what the Rust generator got wrong).
TOP_BIT_SERIAL = 0x80F44F560C3F27D4B211A47813AFD03C03813B


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> pki.PkiLayout:
    root = tmp_path_factory.mktemp("pki")
    return pki.build_testbed_pki(
        root,
        [
            pki.ZoneSpec(1, {1001: TOP_BIT_SERIAL, 1002: 1}),
            pki.ZoneSpec(2, {2001: pki.MAX_SERIAL}),
        ],
    )


def _cert(path: Path) -> x509.Certificate:
    return pki.load_certificate(path)


def _store(*cas: Path) -> Store:
    return Store([_cert(ca) for ca in cas])


def _verify_client(ca: Path, issued: pki.Issued, when: dt.datetime | None = None) -> None:
    policy = PolicyBuilder().store(_store(ca))
    if when is not None:
        policy = policy.time(when)
    policy.build_client_verifier().verify(_cert(issued.cert), [])


def _verify_server(ca: Path, issued: pki.Issued, name: x509.GeneralName) -> None:
    subject: x509.DNSName | x509.IPAddress = name  # type: ignore[assignment]
    PolicyBuilder().store(_store(ca)).build_server_verifier(subject).verify(_cert(issued.cert), [])


def test_every_certificate_chains_to_its_zone_ca(layout: pki.PkiLayout) -> None:
    for zone in layout.zones.values():
        for client in [*zone.saes.values(), *zone.inter_kme_clients.values(), zone.admin]:
            _verify_client(zone.ca, client)
        for server in [zone.kme_server, zone.inter_kme_server, *zone.app_servers.values()]:
            _verify_server(zone.ca, server, x509.DNSName("localhost"))
            _verify_server(zone.ca, server, x509.IPAddress(ipaddress.ip_address("127.0.0.1")))


def test_certificates_do_not_chain_to_another_zone(layout: pki.PkiLayout) -> None:
    with pytest.raises(VerificationError):
        _verify_client(layout.zones[2].ca, layout.zones[1].saes[1001])
    with pytest.raises(VerificationError):
        _verify_server(layout.zones[1].ca, layout.zones[2].kme_server, x509.DNSName("localhost"))


def test_server_certificate_is_not_valid_for_other_names(layout: pki.PkiLayout) -> None:
    zone = layout.zones[1]
    with pytest.raises(VerificationError):
        _verify_server(zone.ca, zone.kme_server, x509.DNSName("example.org"))
    with pytest.raises(VerificationError):
        _verify_server(zone.ca, zone.kme_server, x509.IPAddress(ipaddress.ip_address("127.0.0.2")))


def test_configured_serials_are_issued_der_correct(layout: pki.PkiLayout) -> None:
    sae = layout.zones[1].saes[1001]
    cert = _cert(sae.cert)
    assert sae.serial == cert.serial_number == TOP_BIT_SERIAL
    # The DER INTEGER keeps its sign octet: 02 14 00 80 f4 ...
    der = cert.tbs_certificate_bytes
    assert bytes.fromhex("021400") + TOP_BIT_SERIAL.to_bytes(19, "big") in der
    assert _cert(layout.zones[1].saes[1002].cert).serial_number == 1
    assert _cert(layout.zones[2].saes[2001].cert).serial_number == pki.MAX_SERIAL


def test_ca_and_leaf_extensions(layout: pki.PkiLayout) -> None:
    zone = layout.zones[1]
    ca = _cert(zone.ca)
    basic = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert ca.subject == ca.issuer
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest

    sae = _cert(zone.saes[1001].cert)
    assert sae.subject.rfc4514_string() == "CN=SAE-1001"
    assert list(sae.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    aki = sae.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca_ski
    assert not sae.extensions.get_extension_for_class(x509.BasicConstraints).value.ca

    server = _cert(zone.kme_server.cert)
    assert server.subject.rfc4514_string() == "CN=KME-1"
    assert list(server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]

    names = {_cert(c.cert).subject.rfc4514_string() for c in zone.inter_kme_clients.values()}
    assert names == {"CN=KME-1-to-KME-2"}
    assert _cert(zone.admin.cert).subject.rfc4514_string() == "CN=admin-1"


def test_fingerprints_and_serials_match_the_files(layout: pki.PkiLayout) -> None:
    zone = layout.zones[2]
    for issued in [*zone.saes.values(), zone.admin, zone.kme_server, *zone.inter_kme_clients.values()]:
        cert = _cert(issued.cert)
        assert issued.fingerprint_sha256 == pki.fingerprint_sha256(cert)
        assert len(issued.fingerprint_sha256) == 64
        assert issued.serial == cert.serial_number


def test_private_keys_are_pkcs8_and_private(layout: pki.PkiLayout) -> None:
    keys = [p for p in layout.root.rglob("*.key")]
    # 2 zones x (CA, KME, inter-KME, admin) + 2 inter-KME clients + 3 SAEs + 3 application servers
    assert len(keys) == 2 * 4 + 2 + 3 + 3
    for path in keys:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted
        assert isinstance(pki.load_private_key(path), ec.EllipticCurvePrivateKey)


def test_trust_bundle_holds_every_zone_ca(layout: pki.PkiLayout) -> None:
    bundle = x509.load_pem_x509_certificates(layout.trust_bundle.read_bytes())
    assert {c.fingerprint(c.signature_hash_algorithm) for c in bundle} == {  # type: ignore[arg-type]
        _cert(z.ca).fingerprint(_cert(z.ca).signature_hash_algorithm)  # type: ignore[arg-type]
        for z in layout.zones.values()
    }


def test_layout_round_trips_through_layout_json(layout: pki.PkiLayout) -> None:
    assert pki.PkiLayout.load(layout.root) == layout
    assert layout.zones[1].ca_key.exists()


def test_load_of_missing_or_corrupt_layout_is_a_pki_error(tmp_path: Path) -> None:
    with pytest.raises(pki.PkiError, match="pki init"):
        pki.PkiLayout.load(tmp_path)
    (tmp_path / pki.LAYOUT_FILE).write_text('{"zones": [{"kme_id": 1}]}')
    with pytest.raises(pki.PkiError, match="not a qkdtls PKI layout"):
        pki.PkiLayout.load(tmp_path)


def test_expired_client_certificate_fails_verification(layout: pki.PkiLayout, tmp_path: Path) -> None:
    zone = layout.zones[1]
    past = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    expired = pki.issue_client_cert(
        zone.ca, zone.ca_key, tmp_path, "SAE-1001", serial=TOP_BIT_SERIAL, not_after=past
    )
    assert _cert(expired.cert).not_valid_after_utc < dt.datetime.now(dt.UTC)
    with pytest.raises(VerificationError):
        _verify_client(zone.ca, expired)
    _verify_client(zone.ca, expired, when=past - dt.timedelta(minutes=1))  # the chain itself is sound


def test_foreign_client_does_not_verify_against_zone_ca(layout: pki.PkiLayout, tmp_path: Path) -> None:
    foreign_ca, client = pki.build_foreign_client(tmp_path, serial=TOP_BIT_SERIAL)
    assert client.serial == TOP_BIT_SERIAL
    _verify_client(foreign_ca.cert, client)
    with pytest.raises(VerificationError):
        _verify_client(layout.zones[1].ca, client)


@pytest.mark.parametrize(
    ("key_type", "key_class"),
    [("ed25519", ed25519.Ed25519PrivateKey), ("rsa-2048", rsa.RSAPrivateKey)],
)
def test_other_key_types(tmp_path: Path, key_type: str, key_class: type) -> None:
    ca = pki.create_ca(tmp_path, "Test CA", key_type=key_type)
    client = pki.issue_client_cert(ca.cert, ca.key, tmp_path, "SAE-7", serial=7, key_type=key_type)
    server = pki.issue_server_cert(ca.cert, ca.key, tmp_path, "KME-7", key_type=key_type)
    assert isinstance(pki.load_private_key(client.key), key_class)
    # cryptography's verifier follows the Web PKI profile, which forbids Ed25519: ask OpenSSL instead.
    for issued, purpose in ((client, "sslclient"), (server, "sslserver")):
        result = subprocess.run(
            ["openssl", "verify", "-purpose", purpose, "-CAfile", str(ca.cert), str(issued.cert)],
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("serial", [0, -1, 2**159, True])
def test_out_of_range_serials_are_refused(tmp_path: Path, serial: int) -> None:
    with pytest.raises(pki.PkiError, match="serial"):
        pki.build_testbed_pki(tmp_path, [pki.ZoneSpec(1, {1: serial})])
    assert not (tmp_path / pki.LAYOUT_FILE).exists()


def test_bad_testbed_specs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(pki.PkiError, match="distinct"):
        pki.build_testbed_pki(tmp_path, [pki.ZoneSpec(1), pki.ZoneSpec(1)])
    with pytest.raises(pki.PkiError, match="distinct"):
        pki.build_testbed_pki(tmp_path, [pki.ZoneSpec(1, {5: 5}), pki.ZoneSpec(2, {5: 6})])
    with pytest.raises(pki.PkiError, match="key type"):
        pki.build_testbed_pki(tmp_path, [pki.ZoneSpec(1)], key_type="dsa")


def test_python_ssl_completes_mutual_tls_with_the_issued_files(layout: pki.PkiLayout) -> None:
    zone = layout.zones[1]
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(zone.kme_server.cert, zone.kme_server.key)
    server_ctx.load_verify_locations(zone.ca)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.create_default_context(cafile=str(zone.ca))
    client_ctx.load_cert_chain(zone.saes[1001].cert, zone.saes[1001].key)

    seen: list[int] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(5)

        def serve() -> None:
            conn, _ = listener.accept()
            conn.settimeout(5)
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                der = tls.getpeercert(binary_form=True)
                assert der is not None
                seen.append(x509.load_der_x509_certificate(der).serial_number)
                tls.sendall(b"ok")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with (
            socket.create_connection(listener.getsockname(), timeout=5) as raw,
            client_ctx.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            assert tls.recv(2) == b"ok"
        thread.join(5)
    assert seen == [TOP_BIT_SERIAL]


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    pki_cli.register(parser.add_subparsers())
    args = parser.parse_args(list(argv))
    return int(args.func(args))


def test_cli_init_writes_layout_and_prints_serials(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "certs"
    assert _cli("pki", "init", str(root), "--zone", "7:70=0x80ff,71", "--zone", "8:80=12") == 0
    out = capsys.readouterr().out
    layout = pki.PkiLayout.load(root)
    assert layout.zones[7].saes[70].serial == 0x80FF
    assert layout.zones[8].saes[80].serial == 12
    assert 'serial = "80ff"' in out and layout.zones[7].saes[70].fingerprint_sha256 in out
    assert "kme-7-to-kme-8.crt" in out
    # A configuration per zone and the key folders of the link 7-8 and of the local links.
    assert (root / "kme7.toml").is_file() and (root / "kme8.toml").is_file()
    for folder in ("kme7/link-8", "kme8/link-7", "kme7/local", "kme8/local"):
        assert (root / "keys" / folder).is_dir()

    from qkdtls.cli.main import UserError

    with pytest.raises(UserError, match="--force"):
        _cli("pki", "init", str(root))
    assert _cli("pki", "show", str(root)) == 0
    assert layout.zones[8].admin.fingerprint_sha256 in capsys.readouterr().out


@pytest.mark.parametrize("zone", ["x:1", "1:a=1", "1:2=0", "1:2=1,2=3"])
def test_cli_rejects_bad_zone_specs(tmp_path: Path, zone: str) -> None:
    from qkdtls.cli.main import UserError

    with pytest.raises(UserError, match="--zone"):
        _cli("pki", "init", str(tmp_path), "--zone", zone)
