"""The OpenAPI 3.0.3 description of the SAE interface (``openapi.yaml``, shipped as package data).

It is written by hand from the ETSI GS QKD 014 tables rather than generated from the handlers, so that tests
(schemathesis) check the handlers against the specification and not against themselves.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

OPENAPI_PATH = "/api/v1/openapi.yaml"


@cache
def openapi_bytes() -> bytes:
    return resources.files("qkdtls.kme").joinpath("openapi.yaml").read_bytes()


def openapi_document() -> dict[str, Any]:
    """The parsed document (needs PyYAML, which schemathesis brings; the KME itself serves the bytes)."""
    import yaml

    doc = yaml.safe_load(openapi_bytes())
    assert isinstance(doc, dict)
    return doc
