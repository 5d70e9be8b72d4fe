from __future__ import annotations

import base64
import json
import os
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkdtls.etsi014.models import (
    BadRequest,
    Error,
    Key,
    KeyContainer,
    KeyIDs,
    KeyRequest,
    SaeInfo,
    Status,
    parse_key_id,
)


def _status_doc(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "source_KME_ID": "1",
        "target_KME_ID": "2",
        "master_SAE_ID": "1001",
        "slave_SAE_ID": "2001",
        "key_size": 256,
        "stored_key_count": 10,
        "max_key_count": 100,
        "max_key_per_request": 10,
        "max_key_size": 1024,
        "min_key_size": 64,
        "max_SAE_ID_count": 0,
    }
    doc.update(changes)
    return doc


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
# Documents shaped like the real ones, with any value in each field, reach deeper into the decoders.
FIELDS = [
    "number",
    "size",
    "additional_slave_SAE_IDs",
    "extension_mandatory",
    "extension_optional",
    "keys",
    "key_ID",
    "key",
    "key_IDs",
    "SAE_ID",
    "KME_ID",
    "key_container_extension",
]
shaped = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6)
# A Status with every field present and one replaced by anything reaches its per-field checks.
status_shaped = st.builds(
    lambda name, value: {**_status_doc(), name: value},
    st.sampled_from(sorted(_status_doc())),
    json_values | st.just(float("inf")),
)
DECODERS = [
    KeyRequest.from_json,
    KeyContainer.from_json,
    KeyIDs.from_json,
    Key.from_json,
    SaeInfo.from_json,
    Status.from_json,
]


@settings(max_examples=300, deadline=None)
@given(doc=json_values | shaped | status_shaped)
def test_decoders_are_total(doc: Any) -> None:
    for decode in DECODERS:
        try:
            decode(doc)
        except BadRequest as exc:
            assert exc.message


@settings(max_examples=100, deadline=None)
@given(query=st.dictionaries(st.sampled_from(["number", "size", "other"]), st.text(max_size=25), max_size=3))
def test_query_decoder_is_total(query: dict[str, str]) -> None:
    try:
        request = KeyRequest.from_query(query)
    except BadRequest:
        return
    assert request.number is None or request.number >= 1


def _key() -> Key:
    return Key(key_ID=str(uuid.uuid4()), key=os.urandom(32))


def test_key_container_round_trip() -> None:
    container = KeyContainer(keys=(_key(), _key()), key_container_extension={"x": 1})
    doc = json.loads(json.dumps(container.to_json()))
    assert KeyContainer.from_json(doc) == container
    assert doc["keys"][0]["key"] == base64.b64encode(container.keys[0].key).decode()


def test_key_repr_hides_the_bytes() -> None:
    key = _key()
    assert key.key.hex() not in repr(key)
    assert base64.b64encode(key.key).decode() not in repr(key)
    assert "256 bits" in repr(key)
    assert key.key.hex() not in repr(KeyContainer(keys=(key,)))


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"number": True}, "number must be an integer"),
        ({"number": 0}, "number must be between"),
        ({"size": 2**63}, "size must be between"),
        ({"size": "256"}, "size must be an integer"),
        ({"additional_slave_SAE_IDs": "2001"}, "additional_slave_SAE_IDs"),
        ({"additional_slave_SAE_IDs": [True]}, "additional_slave_SAE_IDs"),
        ({"extension_mandatory": {"a": 1}}, "extension_mandatory must be an array"),
        ([], "must be a JSON object"),
    ],
)
def test_key_request_rejects(doc: Any, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        KeyRequest.from_json(doc)


def test_key_request_accepts_and_round_trips() -> None:
    doc = {
        "number": 2,
        "size": 512,
        "additional_slave_SAE_IDs": [2002, "2003"],
        "extension_optional": [{"a": 1}],
    }
    request = KeyRequest.from_json(doc)
    assert request.additional_slave_SAE_IDs == ("2002", "2003")
    assert KeyRequest.from_json(request.to_json()) == request
    assert KeyRequest.from_json(None) == KeyRequest()
    assert KeyRequest().to_json() == {}


def test_key_request_from_query() -> None:
    assert KeyRequest.from_query({"number": "3", "size": "128"}) == KeyRequest(number=3, size=128)
    for bad in ({"number": "-1"}, {"number": "1e3"}, {"size": "٣"}, {"number": "9" * 20}):
        with pytest.raises(BadRequest, match="positive integer"):
            KeyRequest.from_query(bad)
    with pytest.raises(BadRequest, match="use POST"):
        KeyRequest.from_query({"additional_slave_SAE_IDs": "1"})


def test_key_ids_parse_and_canonicalise() -> None:
    upper = str(uuid.uuid4()).upper()
    ids = KeyIDs.from_json({"key_IDs": [{"key_ID": upper}]})
    assert ids.key_IDs == (upper.lower(),)
    assert KeyIDs.from_json(ids.to_json()) == ids
    for bad in ({"key_IDs": []}, {"key_IDs": ["x"]}, {"key_IDs": [{"key_ID": "nope"}]}, {}):
        with pytest.raises(BadRequest):
            KeyIDs.from_json(bad)


def test_parse_key_id_limits() -> None:
    value = uuid.uuid4()
    assert parse_key_id(value.hex) == str(value)
    for bad in (None, 5, "", "x" * 65, "{" + str(value) + "}x"):
        with pytest.raises(BadRequest, match="UUID"):
            parse_key_id(bad)


def test_key_rejects_bad_base64() -> None:
    key_id = str(uuid.uuid4())
    with pytest.raises(BadRequest, match="base64"):
        Key.from_json({"key_ID": key_id, "key": "not base64!"})
    with pytest.raises(BadRequest, match="base64"):
        Key.from_json({"key_ID": key_id, "key": 5})


def test_status_round_trip_and_invariants() -> None:
    status = Status.from_json(_status_doc(status_extension={"a": 1}))
    assert Status.from_json(status.to_json()) == status
    with pytest.raises(BadRequest, match="lacks key_size"):
        Status.from_json({k: v for k, v in _status_doc().items() if k != "key_size"})
    with pytest.raises(BadRequest, match="inconsistent"):
        Status.from_json(_status_doc(stored_key_count=101))
    with pytest.raises(BadRequest, match="inconsistent"):
        Status.from_json(_status_doc(key_size=32))
    for bad in ("256", 256.5, True, float("inf"), -1):
        with pytest.raises(BadRequest, match="key_size must be"):
            Status.from_json(_status_doc(key_size=bad))
    with pytest.raises(BadRequest, match="slave_SAE_ID must be a string"):
        Status.from_json(_status_doc(slave_SAE_ID={"id": 1}))
    assert Status.from_json(_status_doc(slave_SAE_ID=2001)).slave_SAE_ID == "2001"


def test_sae_info_and_error() -> None:
    assert SaeInfo.from_json({"SAE_ID": 1001, "KME_ID": 1}) == SaeInfo(1001, 1)
    assert SaeInfo.from_json({"SAE_ID": -(2**63), "KME_ID": 2**63 - 1}).SAE_ID == -(2**63)
    for bad in (
        {"SAE_ID": "1001", "KME_ID": 1},
        {"SAE_ID": 1, "KME_ID": True},
        {"SAE_ID": 2**63, "KME_ID": 1},
        [],
    ):
        with pytest.raises(BadRequest):
            SaeInfo.from_json(bad)
    assert Error("no").to_json() == {"message": "no"}
    assert Error("no", [{"a": 1}]).to_json() == {"message": "no", "details": [{"a": 1}]}
