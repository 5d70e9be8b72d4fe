"""The whole network's map document, merged from the ``GET /api/v1/admin/network`` documents of its KMEs
(pure: no I/O). Used by the loopback map proxy of ``qkdtls network up`` / ``qkdtls network map``.

- ``routing``: the link-state view of the first KME (lowest ID) that has one; sites of the network it does not
  list are added, down when the proxy could not reach them. Without any router (KMEs of plain point-to-point
  links) the view is built from the KMEs' own link reports: a site is up when it answered, a link when both
  its ends did, and its stock is what its ends report.
- ``relay``: relay counts added over the KMEs (each relay is counted by the KME it started from),
  ``last_paths`` of every KME (newest first, duplicates dropped), bytes consumed per link, purpose and mode
  added over the KMEs (each KME counts what it spent as the sender of a hop, on either end of a link) and the
  hop message counters added.
- ``names``, ``title``, ``sources`` (which KME answered, or why not).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from qkdtls.kme.admin_map import link_stock

LAST_PATHS = 20


def merge_documents(
    docs: Mapping[int, Mapping[str, Any] | str],
    *,
    sites: Sequence[tuple[int, str, Sequence[int]]],
    links: Sequence[tuple[int, int]],
    title: str,
) -> dict[str, Any]:
    """``docs``: KME ID -> its document, or the reason it could not be fetched. ``sites``: (KME ID, name,
    SAE IDs); ``links``: the network's links (from its manifest)."""
    answered = {k: d for k, d in docs.items() if isinstance(d, Mapping)}
    routing = _routing(answered, sites, links)
    return {
        "kme_id": None,
        "title": title,
        "at": round(time.time(), 3),
        "names": {str(k): name for k, name, _ in sites},
        "routing": routing,
        "relay": _relay([answered[k].get("relay") for k in sorted(answered)]),
        "links": [],
        "sources": {
            str(k): {"ok": True} if isinstance(d, Mapping) else {"ok": False, "error": str(d)}
            for k, d in sorted(docs.items())
        },
    }


def _routing(
    answered: Mapping[int, Mapping[str, Any]],
    sites: Sequence[tuple[int, str, Sequence[int]]],
    links: Sequence[tuple[int, int]],
) -> dict[str, Any]:
    saes = {k: list(s) for k, _, s in sites}
    for kme_id in sorted(answered):
        snapshot = answered[kme_id].get("routing")
        if isinstance(snapshot, Mapping) and isinstance(snapshot.get("nodes"), list):
            out = dict(snapshot)
            nodes = [dict(n) for n in snapshot["nodes"] if isinstance(n, Mapping)]
            listed = {n.get("kme_id") for n in nodes}
            for k, _, _ in sites:
                if k not in listed:
                    nodes.append(
                        {
                            "kme_id": k,
                            "up": False if k not in answered else None,
                            "saes": saes[k],
                            "age_s": None,
                        }
                    )
            for n in nodes:
                if not n.get("saes") and n.get("kme_id") in saes:
                    n["saes"] = saes[n["kme_id"]]
            out["nodes"] = nodes
            return out
    stock: dict[tuple[int, int], dict[str, int]] = {}
    for kme_id, doc in answered.items():
        reports = doc.get("links")
        for report in reports if isinstance(reports, list) else []:
            found = link_stock(kme_id, report) if isinstance(report, Mapping) else None
            if found is not None:
                # The lower end's count first; the other end's only where it is missing.
                pair, counts = found
                here = stock.setdefault(pair, {})
                for key, value in counts.items():
                    if kme_id == pair[0] or key not in here:
                        here[key] = value
    return {
        "kme_id": None,
        "nodes": [{"kme_id": k, "up": k in answered, "saes": saes[k], "age_s": None} for k, _, _ in sites],
        "links": [
            {
                "a": min(a, b),
                "b": max(a, b),
                "up": a in answered and b in answered,
                "stock_blocks": stock.get((min(a, b), max(a, b)), {}),
            }
            for a, b in links
        ],
    }


def _relay(stats: Sequence[Any]) -> dict[str, Any] | None:
    stats = [s for s in stats if isinstance(s, Mapping)]
    if not stats:
        return None
    relays: dict[str, int] = {}
    paths: dict[str, Mapping[str, Any]] = {}
    consumed: dict[tuple[int, int, str, str], int] = {}
    hops: dict[str, int] = {}
    for s in stats:
        counts = s.get("relays")
        for name, n in counts.items() if isinstance(counts, Mapping) else ():
            if isinstance(n, int) and not isinstance(n, bool):
                relays[str(name)] = relays.get(str(name), 0) + n
        for entry in s.get("last_paths") or ():
            if isinstance(entry, Mapping):
                paths.setdefault(repr((entry.get("at"), entry.get("mode"), entry.get("paths"))), entry)
        for c in s.get("consumed_bytes") or ():
            if not isinstance(c, Mapping):
                continue
            link, n = c.get("link"), c.get("bytes")
            if (
                not isinstance(link, list)
                or len(link) != 2
                or not all(isinstance(k, int) for k in link)
                or not isinstance(n, int)
            ):
                continue
            key = (min(link), max(link), str(c.get("purpose")), str(c.get("mode")))
            consumed[key] = consumed.get(key, 0) + n
        counters = s.get("hops")
        for name, n in (counters.items() if isinstance(counters, Mapping) else ()):
            if isinstance(n, int) and not isinstance(n, bool):
                hops[str(name)] = hops.get(str(name), 0) + n

    def newest(entry: Mapping[str, Any]) -> float:
        at = entry.get("at")
        return float(at) if isinstance(at, (int, float)) else 0.0

    return {
        "relays": relays,
        "last_paths": sorted(paths.values(), key=newest, reverse=True)[:LAST_PATHS],
        "consumed_bytes": [
            {"link": [a, b], "purpose": purpose, "mode": mode, "bytes": n}
            for (a, b, purpose, mode), n in sorted(consumed.items())
        ],
        "hops": dict(sorted(hops.items())),
    }
