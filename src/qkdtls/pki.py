"""Testbed PKI: one CA per KME zone and every certificate a two-site testbed needs (``qkdtls pki``).

The authors' generator took SAE certificate serials as raw bytes, so a serial whose first byte is >= 0x80
was encoded differently from what the KME configuration said (DER adds a 0x00). Here serials are integers
and pyca/cryptography writes them as DER INTEGERs, so what the configuration says is what the certificate
holds.

Layout of a zone folder (``ROOT/kme-<id>/``)::

    ca.crt ca.key                       the zone CA (self-signed, pathlen 0)
    kme-server.crt/.key                 the KME's SAE interface (SAN hostname + 127.0.0.1)
    inter-kme-server.crt/.key           the KME's inter-KME interface
    kme-<id>-to-kme-<peer>.crt/.key     client certificate this KME presents to <peer>
    sae-<sae>.crt/.key                  SAE client certificate (configured serial)
    app-<sae>.crt/.key                  TLS server certificate of that SAE's application
    admin.crt/.key                      administrator client certificate

Private keys are PKCS#8 PEM, mode 0600. ``ROOT/layout.json`` records it all; ``ROOT/trust-bundle.pem`` holds
every zone CA.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KEY_TYPES = ("ec-p256", "ec-p384", "ed25519", "rsa-2048")
# RFC 5280 §4.1.2.2: at most 20 octets; cryptography requires a positive value below 2**159 so the DER
# INTEGER never needs a 21st (sign) octet.
MAX_SERIAL = 2**159 - 1
LOOPBACK = "127.0.0.1"
LAYOUT_FILE = "layout.json"
TRUST_BUNDLE = "trust-bundle.pem"
# Certificates start slightly in the past so a peer whose clock is a little behind still accepts them.
_BACKDATE = dt.timedelta(minutes=5)

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey


class PkiError(ValueError):
    """A PKI request that cannot be satisfied (unknown key type, serial out of range, unreadable layout)."""


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key on disk."""

    cert: Path
    key: Path
    serial: int
    fingerprint_sha256: str  # hex of SHA-256(DER)

    @property
    def serial_hex(self) -> str:
        return format(self.serial, "x")

    def to_json(self, root: Path) -> dict[str, Any]:
        return {
            "cert": _relative(self.cert, root),
            "key": _relative(self.key, root),
            "serial": self.serial_hex,
            "fingerprint_sha256": self.fingerprint_sha256,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], root: Path) -> Issued:
        return cls(
            cert=root / doc["cert"],
            key=root / doc["key"],
            serial=int(doc["serial"], 16),
            fingerprint_sha256=str(doc["fingerprint_sha256"]),
        )


@dataclass(frozen=True)
class ZoneSpec:
    """What to issue for one KME zone: the KME ID and its SAEs with the serials their certificates carry."""

    kme_id: int
    saes: Mapping[int, int] = field(default_factory=dict)  # SAE ID -> certificate serial to issue
    hostname: str = "localhost"  # SAN of the KME and application server certificates (plus IP 127.0.0.1)


@dataclass(frozen=True)
class Zone:
    kme_id: int
    ca: Path  # this zone's CA certificate (self-signed): signs everything below
    kme_server: Issued
    inter_kme_server: Issued
    # peer KME ID -> client certificate this KME presents when calling that peer
    inter_kme_clients: dict[int, Issued]
    saes: dict[int, Issued]  # SAE ID -> SAE client certificate
    app_servers: dict[int, Issued]  # SAE ID -> TLS server certificate for that SAE's application
    admin: Issued

    @property
    def ca_key(self) -> Path:
        """The zone CA's private key, kept next to its certificate (tests issue extra certificates)."""
        return self.ca.with_suffix(".key")

    def to_json(self, root: Path) -> dict[str, Any]:
        return {
            "kme_id": self.kme_id,
            "ca": _relative(self.ca, root),
            "kme_server": self.kme_server.to_json(root),
            "inter_kme_server": self.inter_kme_server.to_json(root),
            "inter_kme_clients": {str(k): v.to_json(root) for k, v in self.inter_kme_clients.items()},
            "saes": {str(k): v.to_json(root) for k, v in self.saes.items()},
            "app_servers": {str(k): v.to_json(root) for k, v in self.app_servers.items()},
            "admin": self.admin.to_json(root),
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], root: Path) -> Zone:
        def issued_map(name: str) -> dict[int, Issued]:
            return {int(k): Issued.from_json(v, root) for k, v in doc[name].items()}

        return cls(
            kme_id=int(doc["kme_id"]),
            ca=root / doc["ca"],
            kme_server=Issued.from_json(doc["kme_server"], root),
            inter_kme_server=Issued.from_json(doc["inter_kme_server"], root),
            inter_kme_clients=issued_map("inter_kme_clients"),
            saes=issued_map("saes"),
            app_servers=issued_map("app_servers"),
            admin=Issued.from_json(doc["admin"], root),
        )


@dataclass(frozen=True)
class PkiLayout:
    root: Path
    zones: dict[int, Zone]
    trust_bundle: Path  # all zone CAs concatenated

    def save(self) -> None:
        doc = {
            "zones": [zone.to_json(self.root) for zone in self.zones.values()],
            "trust_bundle": _relative(self.trust_bundle, self.root),
        }
        (self.root / LAYOUT_FILE).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, root: Path) -> PkiLayout:
        """The layout in ``root``, or in ``root/pki`` (where ``qkdtls pki init`` puts it next to configs)."""
        root = Path(root).resolve()
        if not (root / LAYOUT_FILE).exists() and (root / "pki" / LAYOUT_FILE).exists():
            root = root / "pki"
        path = root / LAYOUT_FILE
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            zones = [Zone.from_json(z, root) for z in doc["zones"]]
            bundle = root / doc["trust_bundle"]
        except OSError as exc:
            hint = f"run `qkdtls pki init {root}` first"
            raise PkiError(f"cannot read {path}: {exc.strerror}; {hint}") from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PkiError(f"{path} is not a qkdtls PKI layout ({type(exc).__name__}: {exc})") from None
        return cls(root=root, zones={z.kme_id: z for z in zones}, trust_bundle=bundle)


# --- building blocks ----------------------------------------------------------------------------------------


def generate_private_key(key_type: str = "ec-p256") -> PrivateKey:
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if key_type == "rsa-2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise PkiError(f"unknown key type {key_type!r}; choose one of {', '.join(KEY_TYPES)}")


def check_serial(serial: int) -> int:
    if isinstance(serial, bool) or not isinstance(serial, int) or not 0 < serial <= MAX_SERIAL:
        raise PkiError(f"certificate serial must be an integer in 1..2**159-1, got {serial!r}")
    return serial


def fingerprint_sha256(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def load_certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def load_private_key(path: Path) -> PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, (ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, rsa.RSAPrivateKey)):
        raise PkiError(f"{path}: unsupported private key type {type(key).__name__}")
    return key


def create_ca(
    directory: Path,
    common_name: str,
    *,
    key_type: str = "ec-p256",
    days: int = 365,
    stem: str = "ca",
) -> Issued:
    """A self-signed CA that may sign end-entity certificates only (pathlen 0)."""
    key = generate_private_key(key_type)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(_aki(ski), critical=False)
    )
    cert = builder.sign(key, _hash_for(key))
    return _write(Path(directory), stem, cert, key)


def issue_client_cert(
    ca_cert: Path,
    ca_key: Path,
    directory: Path,
    common_name: str,
    *,
    serial: int | None = None,
    key_type: str = "ec-p256",
    days: int = 365,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    stem: str | None = None,
    identity: str | None = None,
) -> Issued:
    """A TLS client certificate (clientAuth). ``not_after`` in the past gives an expired certificate.

    The SAN holds the URI ``identity`` (default ``urn:qkdtls:<common name>``): RFC 5280 verifiers such as
    ``cryptography.x509.verification`` require a SAN on every end-entity certificate. KMEs identify callers
    by serial or fingerprint, not by this name.
    """
    stem = stem or _stem(common_name)
    uri = x509.UniformResourceIdentifier(identity or f"urn:qkdtls:{_stem(common_name)}")
    return _issue(
        ca_cert,
        ca_key,
        directory,
        stem,
        common_name,
        eku=ExtendedKeyUsageOID.CLIENT_AUTH,
        names=[uri],
        serial=serial,
        key_type=key_type,
        days=days,
        not_before=not_before,
        not_after=not_after,
    )


def issue_server_cert(
    ca_cert: Path,
    ca_key: Path,
    directory: Path,
    common_name: str,
    hostnames: Sequence[str] = ("localhost", LOOPBACK),
    *,
    serial: int | None = None,
    key_type: str = "ec-p256",
    days: int = 365,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    stem: str | None = None,
) -> Issued:
    """A TLS server certificate (serverAuth) whose SAN lists ``hostnames`` (DNS names or IP addresses)."""
    return _issue(
        ca_cert,
        ca_key,
        directory,
        stem or _stem(common_name),
        common_name,
        eku=ExtendedKeyUsageOID.SERVER_AUTH,
        names=_general_names(hostnames),
        serial=serial,
        key_type=key_type,
        days=days,
        not_before=not_before,
        not_after=not_after,
    )


def build_foreign_client(
    directory: Path,
    common_name: str = "SAE-foreign",
    *,
    serial: int | None = None,
    key_type: str = "ec-p256",
) -> tuple[Issued, Issued]:
    """A CA no KME trusts and a client certificate it signed: ``(ca, client)``, for wrong-CA tests.

    Give the client the serial of a registered SAE to check that a KME identifies callers only after the chain
    verified.
    """
    directory = Path(directory)
    ca = create_ca(directory, "Foreign CA", key_type=key_type, stem="foreign-ca")
    client = issue_client_cert(ca.cert, ca.key, directory, common_name, serial=serial, key_type=key_type)
    return ca, client


def build_testbed_pki(
    root: Path,
    zones: Sequence[ZoneSpec],
    *,
    key_type: str = "ec-p256",
    days: int = 365,
    peers: Mapping[int, Sequence[int]] | None = None,
) -> PkiLayout:
    """Issue every certificate of a testbed whose KMEs are ``zones``; writes ``layout.json``, returns it.

    ``peers``: KME ID -> the KMEs it has QKD links to (inter-KME client certificates are issued for those
    only); default: every other zone."""
    root = Path(root).resolve()
    ids = [spec.kme_id for spec in zones]
    if not ids:
        raise PkiError("a testbed needs at least one KME zone")
    if len(set(ids)) != len(ids):
        raise PkiError(f"KME IDs must be distinct, got {ids}")
    sae_ids = [sae for spec in zones for sae in spec.saes]
    if len(set(sae_ids)) != len(sae_ids):
        raise PkiError(f"SAE IDs must be distinct across zones, got {sorted(sae_ids)}")
    for spec in zones:
        for serial in spec.saes.values():
            check_serial(serial)
    if key_type not in KEY_TYPES:
        raise PkiError(f"unknown key type {key_type!r}; choose one of {', '.join(KEY_TYPES)}")
    root.mkdir(parents=True, exist_ok=True)

    built: dict[int, Zone] = {}
    for spec in zones:
        linked = [i for i in ids if i != spec.kme_id] if peers is None else list(peers.get(spec.kme_id, ()))
        built[spec.kme_id] = _build_zone(root, spec, linked, key_type, days)
    bundle = root / TRUST_BUNDLE
    bundle.write_bytes(b"".join(zone.ca.read_bytes() for zone in built.values()))
    layout = PkiLayout(root=root, zones=built, trust_bundle=bundle)
    layout.save()
    return layout


# --- internals ----------------------------------------------------------------------------------------------


def _build_zone(root: Path, spec: ZoneSpec, peers: Iterable[int], key_type: str, days: int) -> Zone:
    directory = root / f"kme-{spec.kme_id}"
    kme = spec.kme_id
    ca = create_ca(directory, f"KME-{kme} CA", key_type=key_type, days=days)
    hosts = _hosts(spec.hostname)

    def server(cn: str, stem: str) -> Issued:
        return issue_server_cert(
            ca.cert, ca.key, directory, cn, hosts, key_type=key_type, days=days, stem=stem
        )

    def client(cn: str, stem: str, serial: int | None = None) -> Issued:
        return issue_client_cert(
            ca.cert, ca.key, directory, cn, serial=serial, key_type=key_type, days=days, stem=stem
        )

    return Zone(
        kme_id=kme,
        ca=ca.cert,
        kme_server=server(f"KME-{kme}", "kme-server"),
        inter_kme_server=server(f"KME-{kme}-inter-kme", "inter-kme-server"),
        inter_kme_clients={p: client(f"KME-{kme}-to-KME-{p}", f"kme-{kme}-to-kme-{p}") for p in peers},
        saes={sae: client(f"SAE-{sae}", f"sae-{sae}", serial) for sae, serial in spec.saes.items()},
        app_servers={sae: server(f"SAE-{sae}-app", f"app-{sae}") for sae in spec.saes},
        admin=client(f"admin-{kme}", "admin"),
    )


def _hosts(hostname: str) -> tuple[str, ...]:
    return (hostname,) if hostname == LOOPBACK else (hostname, LOOPBACK)


def _issue(
    ca_cert: Path,
    ca_key: Path,
    directory: Path,
    stem: str,
    common_name: str,
    *,
    eku: x509.ObjectIdentifier,
    names: Sequence[x509.GeneralName],
    serial: int | None,
    key_type: str,
    days: int,
    not_before: dt.datetime | None,
    not_after: dt.datetime | None,
) -> Issued:
    issuer = load_certificate(ca_cert)
    signer = load_private_key(ca_key)
    key = generate_private_key(key_type)
    now = _now()
    end = not_after or now + dt.timedelta(days=days)
    start = not_before or min(now - _BACKDATE, end - dt.timedelta(days=days))
    if start >= end:
        raise PkiError("not_before must be earlier than not_after")
    issuer_ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(check_serial(serial) if serial is not None else x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False, key_encipherment=isinstance(key, rsa.RSAPrivateKey)), True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_aki(issuer_ski), critical=False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(signer, _hash_for(signer))
    return _write(Path(directory), stem, cert, key)


def _aki(issuer_ski: x509.SubjectKeyIdentifier) -> x509.AuthorityKeyIdentifier:
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski)


def _general_names(hostnames: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hostnames):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _key_usage(*, cert_sign: bool, key_encipherment: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _hash_for(key: PrivateKey) -> hashes.SHA256 | None:
    # Ed25519 signs the message itself; it takes no separate hash.
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _write(directory: Path, stem: str, cert: x509.Certificate, key: PrivateKey) -> Issued:
    directory.mkdir(parents=True, exist_ok=True)
    cert_path = directory / f"{stem}.crt"
    key_path = directory / f"{stem}.key"
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # Create the key file 0600 from the start: a chmod after writing would leave a window with wider rights.
    if key_path.exists():
        key_path.unlink()
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Issued(
        cert=cert_path, key=key_path, serial=cert.serial_number, fingerprint_sha256=fingerprint_sha256(cert)
    )


def _stem(common_name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in common_name.lower())


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)
