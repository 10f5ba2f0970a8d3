"""Deck JSON of the dashboard's maps (dashboard.maps), checked against pydeck's own serialiser."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pydeck as pdk
import pytest
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


def test_a_view_within_the_limit_stays_at_100_m():
    ids = np.array([12134872, 12134873])
    assert maps.view_block_size(ids, max_cells=2) == 100.0


def test_a_big_view_takes_the_smallest_block_size_within_the_limit():
    # a 20 x 20 km square of 100 m cells: 40,000 cells, 1,600 blocks of 500 m, 400 of 1 km
    ix, iy = np.meshgrid(np.arange(1200, 1400), np.arange(4800, 5000))
    ids = ix.ravel() * 10_000 + iy.ravel()
    assert maps.view_block_size(ids, max_cells=1_600) == 500.0
    assert maps.view_block_size(ids, max_cells=1_000) == 1000.0


def test_blocks_hold_the_mean_the_sum_the_count_and_the_most_common_value():
    # cells (x0, y0) in metres; the first three in the 500 m block at (121000, 487000)
    corners = [(121000, 487000), (121400, 487400), (121100, 487200), (121500, 487000)]
    ids = np.array([x // 100 * 10_000 + y // 100 for x, y in corners])
    shown = pd.DataFrame(
        {
            "cell_id": ids,
            "value": [1.0, 2.0, 6.0, 10.0],
            "true": [0.0, 1.0, 2.0, 3.0],
            "gsv": [1, 2, 3, 4],
            "district": ["Zuid", "Oost", "Oost", "Zuid"],
        }
    )
    blocks = maps.aggregate_blocks(shown, 500.0).set_index("cell_id")
    first = blocks.loc[121000 // 100 * 10_000 + 487000 // 100]
    assert first["cells"] == 3 and first["value"] == 3.0 and first["true"] == 1.0
    assert first["gsv"] == 6 and first["district"] == "Oost"
    second = blocks.loc[121500 // 100 * 10_000 + 487000 // 100]
    assert second["cells"] == 1 and second["value"] == 10.0
    lon, lat = maps.to_lon_lat(np.array([121000.0]), np.array([487000.0]))
    assert first["lon"] == pytest.approx(lon[0]) and first["lat"] == pytest.approx(lat[0])
    classes = maps.aggregate_blocks(shown.assign(value=[7, 3, 3, 1]), 500.0, categorical=True)
    assert classes.set_index("cell_id").loc[first.name, "value"] == 3
