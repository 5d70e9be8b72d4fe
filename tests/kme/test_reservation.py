"""The inter-KME reservation document: round trip and total decoding."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qkdtls.kme.errors import BadRequestError
from qkdtls.kme.reservation import Reservation, ReservedKey

GOOD = Reservation(
    master_KME_ID=1,
    direction=0,
    master_SAE_ID=-5,
    slave_SAE_IDs=(21, 22),
    size=512,
    keys=(ReservedKey("6f0c8a7e-3d1b-4c55-9a51-0b2a1f4c9e11", (0, 2)),),
)


def test_round_trip() -> None:
    doc = json.loads(json.dumps(GOOD.to_json()))
    assert Reservation.from_json(doc) == GOOD


def test_key_ids_are_canonicalised() -> None:
    doc = GOOD.to_json()
    doc["keys"][0]["key_ID"] = doc["keys"][0]["key_ID"].upper()
    assert Reservation.from_json(doc) == GOOD


@pytest.mark.parametrize(
    "change",
    [
        {"direction": 2},
        {"direction": True},
        {"size": "512"},
        {"size": 0},
        {"master_KME_ID": 2**63},
        {"slave_SAE_IDs": []},
        {"slave_SAE_IDs": [1.5]},
        {"keys": []},
        {"keys": [{"key_ID": "nope", "blocks": [0]}]},
        {"keys": [{"key_ID": GOOD.keys[0].key_ID, "blocks": []}]},
        {"keys": [{"key_ID": GOOD.keys[0].key_ID, "blocks": [-1]}]},
        {"keys": [{"key_ID": GOOD.keys[0].key_ID}]},
        {"keys": [[]]},
        {"keys": [{"key_ID": GOOD.keys[0].key_ID, "blocks": list(range(5000))}]},
    ],
)
def test_bad_documents(change: dict[str, Any]) -> None:
    with pytest.raises(BadRequestError):
        Reservation.from_json({**GOOD.to_json(), **change})


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=6),
    )
)
def test_decoding_is_total(doc: Any) -> None:
    try:
        Reservation.from_json(doc)
    except BadRequestError:
        pass
