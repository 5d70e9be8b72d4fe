"""Routing in a network of KMEs: link-state adverts (``lsa``), the link-state database (``lsdb``), path
computation (``paths``), the :class:`Router` the key service asks, and the exchange of adverts with the
peers over the inter-KME interface (``exchange``). docs/design.md, "Network: topology and routing"."""

from qkdtls.kme.routing.lsdb import LinkStateDb, Timers
from qkdtls.kme.routing.router import Router
from qkdtls.kme.routing.settings import NetworkSettings, StaticRoute

__all__ = ["LinkStateDb", "NetworkSettings", "Router", "StaticRoute", "Timers"]
