"""Link-state adverts: the wire format round-trips, and the decoder is total (typed errors, bounded sizes)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkdtls.kme.routing.lsa import (
    MAX_BATCH,
    MAX_BODY_BYTES,
    MAX_LINKS,
    MAX_PATH,
    MAX_SAES,
    AdvertError,
    LinkState,
    LoopingAdvert,
    MalformedAdvert,
    OversizedAdvert,
    decode_batch,
    encode_batch,
    make_advert,
)


def _advert(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "origin": 2,
        "seq": 1730000000123,
        "boot": 1730000000001,
        "path": [2],
        "links": [{"peer": 1, "up": True, "stock_out_blocks": 4096, "stock_in_blocks": 4090}],
        "saes": [2001],
    }
    doc.update(changes)
    return doc


def _body(*adverts: dict[str, Any], version: Any = 1) -> bytes:
    return json.dumps({"version": version, "adverts": list(adverts)}).encode()


def test_round_trip_is_canonical() -> None:
    advert = make_advert(
        2,
        7,
        [LinkState(3, False, 0, 5), LinkState(1, True, 10, 9)],
        [2002, 2001],
        path=(2,),
        name="site B",
        boot=3,
    )
    assert [link.peer for link in advert.links] == [1, 3] and advert.saes == (2001, 2002)
    (decoded,) = decode_batch(encode_batch([advert]))
    assert decoded == advert
    onward = decoded.sent_by(5)
    assert onward.path == (2, 5) and onward.same_content(advert) and onward != advert


def test_the_documented_example_decodes() -> None:
    (advert,) = decode_batch(_body(_advert(name="site B")))
    assert advert.origin == 2 and advert.link(1) == LinkState(1, True, 4096, 4090)
    assert advert.name == "site B" and advert.link(3) is None


def test_unknown_fields_are_ignored() -> None:
    (advert,) = decode_batch(_body(_advert(colour="red", links=[{**_advert()["links"][0], "x": 1}])))
    assert advert.origin == 2


@pytest.mark.parametrize(
    ("body", "error", "words"),
    [
        (b"", MalformedAdvert, "not valid JSON"),
        (b"\xff\xfe", MalformedAdvert, "UTF-8"),
        (b"[]", MalformedAdvert, "JSON object"),
        (b'{"version": 1, "adverts": [NaN]}', MalformedAdvert, "not valid JSON"),
        (b"[" * 100_000, MalformedAdvert, "not valid JSON"),
        (_body(_advert(), version=2), MalformedAdvert, "version must be 1"),
        (_body(_advert(), version=True), MalformedAdvert, "version must be 1"),
        (b'{"version": 1, "adverts": []}', MalformedAdvert, "non-empty array"),
        (_body(_advert(), _advert()), MalformedAdvert, "one advert per origin"),
        (_body(_advert(origin="2")), MalformedAdvert, "adverts[0].origin"),
        (_body(_advert(origin=2**63)), MalformedAdvert, "adverts[0].origin"),
        (_body(_advert(seq=-1)), MalformedAdvert, "adverts[0].seq"),
        (_body(_advert(seq=True)), MalformedAdvert, "adverts[0].seq"),
        (_body(_advert(boot=1730000000124)), MalformedAdvert, "boot must not exceed seq"),
        (_body(_advert(boot=None)), MalformedAdvert, "adverts[0].boot"),
        (_body(_advert(path=[])), MalformedAdvert, "path must be a non-empty"),
        (_body(_advert(path=[3])), MalformedAdvert, "start with the origin"),
        (_body(_advert(path=[2, 1.5])), MalformedAdvert, "64-bit KME IDs"),
        (_body(_advert(path=[2, 3, 2])), LoopingAdvert, "passes through a KME twice"),
        (_body(_advert(links={})), MalformedAdvert, "links must be an array"),
        (_body(_advert(links=[1])), MalformedAdvert, "links[0] must be a JSON object"),
        (_body(_advert(links=[{"peer": 1, "up": 1, "stock_out_blocks": 0, "stock_in_blocks": 0}])),
         MalformedAdvert, "links[0].up"),
        (_body(_advert(links=[{"peer": 1, "up": True, "stock_out_blocks": -1, "stock_in_blocks": 0}])),
         MalformedAdvert, "stock_out_blocks"),
        (_body(_advert(links=[{"peer": 2, "up": True, "stock_out_blocks": 0, "stock_in_blocks": 0}])),
         MalformedAdvert, "no QKD link to itself"),
        (_body(_advert(links=[_advert()["links"][0]] * 2)), MalformedAdvert, "one entry per peer"),
        (_body(_advert(saes=[1, 1])), MalformedAdvert, "an SAE twice"),
        (_body(_advert(saes=["1"])), MalformedAdvert, "64-bit SAE IDs"),
        (_body(_advert(saes=None)), MalformedAdvert, "saes must be an array"),
        (_body(_advert(name=5)), MalformedAdvert, "name must be a string"),
        (_body(_advert(name="x" * 129)), MalformedAdvert, "name must be a string"),
        (_body(*[_advert(origin=i, path=[i]) for i in range(MAX_BATCH + 1)]), OversizedAdvert, "at most 64"),
        (_body(_advert(path=list(range(2, 3 + MAX_PATH)))), OversizedAdvert, "at most 64 KMEs"),
        (_body(_advert(saes=list(range(MAX_SAES + 1)))), OversizedAdvert, "at most 4096 SAEs"),
        (_body(_advert(links=[{"peer": 100 + i, "up": True, "stock_out_blocks": 0, "stock_in_blocks": 0}
                              for i in range(MAX_LINKS + 1)])), OversizedAdvert, "at most 256 links"),
        (b" " * (MAX_BODY_BYTES + 1), OversizedAdvert, "at most"),
    ],
)  # fmt: skip
def test_malformed_batches_raise_typed_errors(body: bytes, error: type[AdvertError], words: str) -> None:
    with pytest.raises(error) as info:
        decode_batch(body)
    assert words in str(info.value)


_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
_json_values = st.recursive(
    _scalars | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=20,
)
_fields = st.sampled_from(
    [
        "origin",
        "seq",
        "boot",
        "path",
        "links",
        "saes",
        "name",
        "peer",
        "up",
        "stock_out_blocks",
        "stock_in_blocks",
    ]
)


@st.composite
def _mutated_bodies(draw: st.DrawFn) -> bytes:
    """Valid batches with one field somewhere replaced by arbitrary JSON."""
    advert = _advert()
    target = draw(st.sampled_from(["advert", "link", "batch"]))
    value = draw(_json_values)
    if target == "advert":
        advert[draw(_fields)] = value
    elif target == "link":
        advert["links"][0][draw(_fields)] = value
    else:
        return json.dumps({"version": 1, draw(st.sampled_from(["adverts", "version"])): value}).encode()
    return _body(advert)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=200), _mutated_bodies()))
def test_the_decoder_is_total(body: bytes) -> None:
    try:
        adverts = decode_batch(body)
    except AdvertError:
        return
    for advert in adverts:  # whatever it accepts re-encodes to itself
        assert decode_batch(encode_batch([advert])) == [advert]
