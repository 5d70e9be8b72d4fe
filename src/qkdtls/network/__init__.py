"""Operator tooling for QKD networks: topologies in TOML (``topology``), ``qkdtls network init`` (``build``),
``qkdtls network up`` (``runner``), the map for a browser (``map_proxy``, ``map_view``; the page itself is
served by every KME's admin interface: ``qkdtls.kme.admin_map``). docs/network.md describes them."""
