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
    """pydeck's own serialisation, with serialised records decoded where they sit."""

    def serialise(value: object) -> object:
        return (
            json.loads(value.json) if isinstance(value, maps.Records) else default_serialize(value)
        )

    return json.loads(json.dumps(deck, default=serialise))


def _deck(records: maps.Records | list[dict]) -> maps.CompactDeck:
    view = pdk.ViewState(latitude=52.37, longitude=4.9, zoom=11)
    return maps.deck([maps.cell_layer(records), maps.highlight_layer([3])], "score", view)


def test_the_compact_json_is_pydecks_json_of_the_same_records_without_indentation():
    records = _records(1_005, 10)
    compact = _deck(maps.Records(json.dumps(records), len(records))).to_json()
    assert "\n" not in compact and '"data":[{' in compact
    assert json.loads(compact) == _plain(_deck(records))  # pydeck given the plain list


def test_each_layer_gets_its_own_records():
    first, second = (maps.Records(json.dumps(_records(3, k)), 3) for k in (10, 99))
    view = pdk.ViewState(latitude=52.37, longitude=4.9, zoom=11)
    layers = [maps.cell_layer(first, "a"), maps.cell_layer(second, "b")]
    decoded = json.loads(maps.deck(layers, "score", view).to_json())
    assert [layer["data"][0]["c"][0] for layer in decoded["layers"]] == [10, 99]


def test_cell_payload_holds_position_colour_and_tooltip_fields():
    cells = pd.DataFrame(
        {
            "cell_id": [12134872, 12134873],
            "lon": [4.8912345678, 4.9],
            "lat": [52.3712345678, 52.38],
            "buurt_naam": ["Jordaan", None],
            "district": ["Centrum", "West"],
        }
    )
    details = pd.DataFrame({"true": [4.12345, np.nan], "gsv": [3.0, np.nan]})
    payload = maps.cell_payload(
        cells, np.array([[1, 2, 3], [4, 5, 6]]), pd.Series([4.56789, np.nan]), details
    )
    assert len(payload) == 2
    assert json.loads(payload.json) == [
        {"p": [4.89123, 52.37123], "c": [1, 2, 3], "i": 12134872, "b": "Jordaan",
         "d": "Centrum", "v": 4.568, "t": 4.123, "y": "–", "r": "–", "g": 3, "f": "–"},
        {"p": [4.9, 52.38], "c": [4, 5, 6], "i": 12134873, "b": "", "d": "West",
         "v": "–", "t": "–", "y": "–", "r": "–", "g": "–", "f": "–"},
    ]  # fmt: skip


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


def test_decks_share_their_settings_but_not_their_layers():
    view = pdk.ViewState(latitude=52.37, longitude=4.9, zoom=11)
    records = maps.Records(json.dumps(_records(2, 5)), 2)
    first = maps.deck([maps.cell_layer(records)], "score", view)
    second = maps.deck([maps.highlight_layer([3])], "score", view)
    assert [layer["id"] for layer in json.loads(first.to_json())["layers"]] == ["cells"]
    assert [layer["id"] for layer in json.loads(second.to_json())["layers"]] == ["selected"]
    other_view = maps.deck([], "residual", pdk.ViewState(latitude=52.0, longitude=5.0, zoom=9))
    spec = json.loads(other_view.to_json())
    assert (
        spec["initialViewState"]["latitude"] == 52.0 and "residual" in other_view._tooltip["html"]
    )
