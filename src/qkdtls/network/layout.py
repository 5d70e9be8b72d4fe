"""What ``qkdtls network init`` wrote into a network folder, as ``network.json``: the sites with their ports
and configurations, the links with their key folders and simulated rates. ``qkdtls network up`` reads it.

    DIR/network.json         this manifest (paths relative to DIR)
    DIR/topology.toml        the topology it was made from (a copy, for reference)
    DIR/kme<ID>.toml         generated KME configurations (``qkdtls kme check-config`` passes on each)
    DIR/pki/                 certificates (pki/layout.json lists them; pki/trust-bundle.pem has every CA)
    DIR/keys/kme<ID>/...     key folders: link-<PEER> per link end, local
    DIR/logs/kme<ID>.log     KME logs (``network up``)
    DIR/run/                 ready files and run.json of a running ``network up``
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qkdtls.pki import PkiLayout

MANIFEST = "network.json"
FORMAT = 1


class LayoutError(ValueError):
    """The folder holds no network made by ``qkdtls network init``, or a damaged one."""


@dataclass(frozen=True)
class SiteLayout:
    kme_id: int
    name: str
    saes: tuple[int, ...]
    host: str
    sae_port: int
    inter_kme_port: int
    config: Path

    @property
    def sae_url(self) -> str:
        return f"https://{self.host}:{self.sae_port}"

    @property
    def inter_kme_url(self) -> str:
        return f"https://{self.host}:{self.inter_kme_port}"


@dataclass(frozen=True)
class LinkLayout:
    a: int
    b: int
    rate: int  # bytes per second written by the simulated link
    folders: tuple[Path, Path]  # a's end, b's end


@dataclass(frozen=True)
class NetworkLayout:
    root: Path
    name: str
    description: str
    sites: tuple[SiteLayout, ...]
    links: tuple[LinkLayout, ...]

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def run(self) -> Path:
        return self.root / "run"

    def site(self, kme_id: int) -> SiteLayout:
        for site in self.sites:
            if site.kme_id == kme_id:
                return site
        raise KeyError(kme_id)

    def pki(self) -> PkiLayout:
        return PkiLayout.load(self.root)

    def sae_site(self) -> dict[int, int]:
        return {sae: site.kme_id for site in self.sites for sae in site.saes}

    def to_json(self) -> dict[str, Any]:
        def rel(path: Path) -> str:
            return str(path.relative_to(self.root))

        return {
            "format": FORMAT,
            "name": self.name,
            "description": self.description,
            "sites": [
                {
                    "kme_id": s.kme_id,
                    "name": s.name,
                    "saes": list(s.saes),
                    "host": s.host,
                    "sae_port": s.sae_port,
                    "inter_kme_port": s.inter_kme_port,
                    "config": rel(s.config),
                }
                for s in self.sites
            ],
            "links": [
                {"between": [link.a, link.b], "rate": link.rate, "folders": [rel(f) for f in link.folders]}
                for link in self.links
            ],
        }

    def save(self) -> Path:
        path = self.root / MANIFEST
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, root: Path) -> NetworkLayout:
        root = Path(root).resolve()
        path = root / MANIFEST
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LayoutError(
                f"{root} holds no network ({MANIFEST} is missing): create one with "
                "`qkdtls network init TOPOLOGY.toml DIR`"
            ) from None
        except (OSError, ValueError) as exc:
            raise LayoutError(f"{path}: unreadable: {exc}") from None
        try:
            if doc.get("format") != FORMAT:
                raise LayoutError(f"{path}: format {doc.get('format')!r}, this qkdtls reads {FORMAT}")
            sites = tuple(
                SiteLayout(
                    kme_id=int(s["kme_id"]),
                    name=str(s["name"]),
                    saes=tuple(int(x) for x in s["saes"]),
                    host=str(s["host"]),
                    sae_port=int(s["sae_port"]),
                    inter_kme_port=int(s["inter_kme_port"]),
                    config=root / s["config"],
                )
                for s in doc["sites"]
            )
            links = tuple(
                LinkLayout(
                    a=int(link["between"][0]),
                    b=int(link["between"][1]),
                    rate=int(link["rate"]),
                    folders=(root / link["folders"][0], root / link["folders"][1]),
                )
                for link in doc["links"]
            )
            return cls(root, str(doc["name"]), str(doc.get("description", "")), sites, links)
        except LayoutError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise LayoutError(f"{path}: damaged ({type(exc).__name__}: {exc})") from None
