"""Configuration of the sans-I/O TLS connections and the QKD key offer a client brings to one."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from .groups import DEFAULT_GROUPS
from .signatures import DEFAULT_SCHEMES
from .suites import ALL_SUITES, CipherSuite

QKD_POLICIES = ("required", "preferred", "off")
QKD_PROFILES = ("secure", "reference")


@dataclass(frozen=True)
class QkdOffer:
    """A key the client's KME handed out with enc_keys, named in the ClientHello."""

    key_id: str
    key: bytes = field(repr=False)
    master_sae_id: int
    profiles: tuple[str, ...] | None = None   # None: the config's qkd_profiles
    announced: bool = False   # the key was announced to this server earlier (0xFEA9)

    def __post_init__(self) -> None:
        if not self.key:
            raise ValueError("empty QKD key")
        if self.profiles is not None:
            for profile in self.profiles:
                if profile not in QKD_PROFILES:
                    raise ValueError(f"unknown QKD profile {profile!r}")


def _check_common(qkd: str, profiles: Sequence[str]) -> None:
    if qkd not in QKD_POLICIES:
        raise ValueError(f"qkd must be one of {QKD_POLICIES}, not {qkd!r}")
    for profile in profiles:
        if profile not in QKD_PROFILES:
            raise ValueError(f"unknown QKD profile {profile!r}")


@dataclass
class ClientConfig:
    trust: list[x509.Certificate] | None = None       # None: nothing is trusted (verify=True then fails)
    check_hostname: bool = True
    verify: bool = True
    alpn_protocols: Sequence[str] = ()
    cipher_suites: Sequence[CipherSuite] = ALL_SUITES
    groups: Sequence[str] = DEFAULT_GROUPS
    signature_algorithms: Sequence[int] = DEFAULT_SCHEMES
    certificate_chain: Sequence[x509.Certificate] = ()   # sent on CertificateRequest
    private_key: Any = field(default=None, repr=False)
    qkd: str = "preferred"
    qkd_profiles: Sequence[str] = ("secure",)
    qkd_cipher_suite: CipherSuite = CipherSuite.TLS_AES_256_GCM_SHA384   # PSK hash follows it
    rekey: bool = True
    key_announce: bool = False          # offer 0xFEA9: the client can announce keys for its next connections
    keylog: Callable[[str], None] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        _check_common(self.qkd, self.qkd_profiles)
        self.cipher_suites = tuple(CipherSuite(s) for s in self.cipher_suites)
        self.qkd_cipher_suite = CipherSuite(self.qkd_cipher_suite)
        if not self.cipher_suites:
            raise ValueError("no cipher suite enabled")


@dataclass
class ServerConfig:
    certificate_chain: Sequence[x509.Certificate] = ()
    private_key: Any = field(default=None, repr=False)
    qkd: str = "preferred"
    qkd_profiles: Sequence[str] = ("secure",)
    alpn_protocols: Sequence[str] = ()
    cipher_suites: Sequence[CipherSuite] = ALL_SUITES
    groups: Sequence[str] = DEFAULT_GROUPS
    signature_algorithms: Sequence[int] = DEFAULT_SCHEMES
    # set: send CertificateRequest and require a client certificate chaining to it
    client_trust: list[x509.Certificate] | None = None
    rekey: bool = True
    # Echo 0xFEA9 and report QkdKeyAnnounce as KeysAnnounced: only where one server process serves its SAE ID.
    accept_key_announcements: bool = False
    keylog: Callable[[str], None] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        _check_common(self.qkd, self.qkd_profiles)
        self.cipher_suites = tuple(CipherSuite(s) for s in self.cipher_suites)


# The names docs/design.md uses.
TLSClientConfig = ClientConfig
TLSServerConfig = ServerConfig
