"""Deck JSON of the dashboard's maps (dashboard.maps), checked against pydeck's own serialiser."""

from __future__ import annotations

import json

import pydeck as pdk
from pydeck.bindings.json_tools import default_serialize

from dashboard import maps


def _records(n: int, value: int) -> list[dict]:
    return [{"i": i, "p": [4.9 + i * 1e-4, 52.37], "c": [value, 0, 0, 200]} for i in range(n)]


def _plain(deck: pdk.Deck) -> dict:
    return json.loads(json.dumps(deck, default=default_serialize))


def _deck(records: list[dict]) -> maps.CompactDeck:
    view = pdk.ViewState(latitude=52.37, longitude=4.9, zoom=11)
    return maps.deck([maps.cell_layer(records), maps.highlight_layer([3])], "score", view)


def test_the_compact_json_is_pydecks_json_without_indentation():
    records = _records(maps.MEMO_MIN_RECORDS + 5, 10)
    deck = _deck(records)
    text = deck.to_json()
    assert "\n" not in text and '"data":[{' in text
    assert json.loads(text) == _plain(deck)


def test_big_record_lists_are_serialised_once_and_never_stale():
    records = _records(maps.MEMO_MIN_RECORDS, 10)
    first = _deck(records).to_json()
    assert maps._serialised[id(records)][0] is records  # remembered for this list
    assert _deck(records).to_json() == first
    other = _records(maps.MEMO_MIN_RECORDS, 99)  # same shape, other values: its own JSON
    assert json.loads(_deck(other).to_json())["layers"][0]["data"][0]["c"][0] == 99
    small = _records(3, 7)  # below the threshold: serialised inline, not remembered
    assert json.loads(_deck(small).to_json()) == _plain(_deck(small))
    assert id(small) not in maps._serialised


def test_the_memo_is_bounded():
    lists = [_records(maps.MEMO_MIN_RECORDS, k) for k in range(maps.MEMO_ENTRIES + 3)]
    for records in lists:
        _deck(records).to_json()
    assert len(maps._serialised) == maps.MEMO_ENTRIES
    assert id(lists[0]) not in maps._serialised and id(lists[-1]) in maps._serialised
