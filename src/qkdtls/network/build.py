"""``qkdtls network init``: a topology turned into a network folder — the PKI, every KME configuration
(through :mod:`qkdtls.provision`, never by hand), the key folders with their first key material, and the
manifest ``network.json`` that ``qkdtls network up`` runs. Every generated configuration is loaded with the
KME's own configuration loader before the folder is declared ready, so what ``init`` accepts the KMEs accept.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from cryptography import x509

from qkdtls import link_sim, provision
from qkdtls.kme.config import ConfigError, load_config
from qkdtls.network.layout import LinkLayout, NetworkLayout, SiteLayout
from qkdtls.network.topology import Topology
from qkdtls.pki import LOOPBACK, PkiError

TOPOLOGY_COPY = "topology.toml"
Progress = Callable[[str], None]


class BuildError(ValueError):
    """The network folder could not be written, or a generated configuration was refused."""


def build_network(
    topology: Topology, root: Path, *, topology_text: str | None = None, progress: Progress | None = None
) -> NetworkLayout:
    """Write the network of ``topology`` into ``root`` (new or empty) and return its layout."""
    say = progress or (lambda _text: None)
    root = Path(root).resolve()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise BuildError(f"{root} is not an empty folder: choose a new or empty one for the network")
    sites = [
        provision.Site(
            kme_id=s.kme_id,
            saes={sae: x509.random_serial_number() for sae in s.saes},
            nickname=s.name,
            host=topology.host,
            sae_port=s.sae_port,
            inter_kme_port=s.inter_kme_port,
            extra=s.kme,
        )
        for s in topology.sites
    ]
    store: str | dict[int, str] = topology.store
    if store not in ("sqlite", "memory"):
        store = {s.kme_id: topology.store_url(s.kme_id) for s in topology.sites}
    settings = provision.KmeSettings(
        store=store,
        block_size=topology.block_size,
        # The simulated links write files without end: KMEs delete what they imported.
        delete_after_import=True,
        extra=topology.kme,
    )
    say(f"issuing the PKI of {len(sites)} sites ({topology.key_type}) into {root / 'pki'}")
    try:
        net = provision.provision(
            root,
            sites,
            [link.pair for link in topology.links],
            settings,
            key_type=topology.key_type,
            days=topology.days,
            hostname="localhost" if topology.host == LOOPBACK else topology.host,
        )
    except (provision.ProvisionError, PkiError, OSError) as exc:
        raise BuildError(f"cannot provision the network: {exc}") from None
    for kme_id, path in net.configs.items():
        try:
            load_config(path)
        except ConfigError as exc:
            raise BuildError(
                f"the generated configuration of KME {kme_id} is refused: {exc} (check the [kme] and "
                "[sites.kme] tables of the topology: they are copied into it)"
            ) from None

    links = []
    for link in topology.links:
        a_end, b_end = net.folder(link.a, link.b), net.folder(link.b, link.a)
        if link.initial_key:
            link_sim.QkdLink(a_end, b_end).emit(link.initial_key)
        links.append(LinkLayout(link.a, link.b, link.rate, (a_end, b_end)))
    if topology.local_key:
        for s in topology.sites:
            if (s.kme_id, s.kme_id) in net.folders:
                write_local_key(net.folder(s.kme_id, s.kme_id), topology.local_key)
    total = sum(link.initial_key for link in topology.links)
    say(f"wrote {len(links)} link(s) with {total // 1024} KiB of key material in all, and the local links")

    layout = NetworkLayout(
        root=root,
        name=topology.name,
        description=topology.description,
        sites=tuple(
            SiteLayout(
                kme_id=s.kme_id,
                name=s.name,
                saes=s.saes,
                host=topology.host,
                sae_port=s.sae_port,
                inter_kme_port=s.inter_kme_port,
                config=net.configs[s.kme_id],
            )
            for s in topology.sites
        ),
        links=tuple(links),
    )
    if topology_text is not None:
        (root / TOPOLOGY_COPY).write_text(topology_text, encoding="utf-8")
    layout.logs.mkdir(exist_ok=True)
    layout.save()
    return layout


def write_local_key(folder: Path, nbytes: int) -> Path:
    """One key file for a KME's local link (the folder rule: written aside, then renamed to ``*.key``)."""
    name = f"{0:0{link_sim.NAME_DIGITS}d}{link_sim.KEY_SUFFIX}"
    part = folder / f".{name}.part"
    part.write_bytes(os.urandom(nbytes))
    part.replace(folder / name)
    return folder / name
