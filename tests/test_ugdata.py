"""UGData: spatial graph, captions, reasoning paths, exports and the held-out split."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest

from core.grid import cell_id, read_grid
from core.sources.boundaries import read_landmarks
from core.ugdata import (
    PAIR_CAPTION,
    PAIR_GRAPH,
    PAIR_REASONING,
    GraphRecord,
    KeyedRng,
    SpatialGraph,
    TemplateCaptioner,
    UGDataFormatError,
    build_samples,
    build_ugdata,
    compass,
    edge_features,
    format_distance,
    graph_record,
    load_city,
    nearest_landmarks,
    read_graph,
    read_samples,
    read_ugdata,
    reasoning_path,
    split_by_district,
    to_networkx,
    write_graph,
)

WORDS = ("north", "north-east", "east", "south-east", "south", "south-west", "west", "north-west")


def _direction(dx: float, dy: float) -> str:
    """Independent 8-point direction: the nearest of the eight unit vectors."""
    units = [(math.sin(math.radians(45 * k)), math.cos(math.radians(45 * k))) for k in range(8)]
    return WORDS[int(np.argmax([dx * ux + dy * uy for ux, uy in units]))]


@pytest.fixture(scope="module")
def city(tiny_demo):
    return load_city(tiny_demo)


@pytest.fixture(scope="module")
def grid(tiny_demo):
    return read_grid(tiny_demo / "grid.parquet").set_index("cell_id")


@pytest.fixture(scope="module")
def samples(city, tmp_path_factory):
    out = tmp_path_factory.mktemp("ugd") / "out"
    return build_samples(city, out, seed=0, max_images=400).samples


# -- graph ---------------------------------------------------------------------------------------


def test_edge_features_on_a_hand_built_graph():
    nodes = pd.DataFrame(
        {"osmid": [1, 2, 3], "x": [1000.0, 1000.0, 1250.0], "y": [1000.0, 1100.0, 1000.0]}
    )
    # osmnx writes both directions, parallel edges and loops: one undirected edge per pair.
    edges = pd.DataFrame({"u": [2, 1, 1, 3, 1], "v": [1, 2, 1, 1, 9]})
    graph = SpatialGraph.from_frames(nodes, edges)
    assert len(graph.edges) == 2
    assert graph.degree.tolist() == [2, 1, 1]
    expected = {
        (0, 1): (100, 0, 0, 100),
        (1, 0): (100, 180, 0, -100),
        (0, 2): (250, 90, 250, 0),
        (2, 0): (250, 270, -250, 0),
    }
    for (a, b), (length, bearing, dx, dy) in expected.items():
        step = graph.step(a, b)
        assert step["length"] == pytest.approx(length)
        assert step["bearing"] == pytest.approx(bearing)
        assert (step["dx"], step["dy"]) == pytest.approx((dx, dy))
    with pytest.raises(KeyError):
        graph.step(1, 2)
    feats = edge_features(np.array([[0.0, 0.0]] * 4), np.array([[0, 5], [5, 0], [0, -5], [-5, 0]]))
    assert feats["bearing"].tolist() == pytest.approx([0, 90, 180, 270])
    assert feats["length"].tolist() == pytest.approx([5, 5, 5, 5])

    # A length column (metres along the street) wins over the straight line.
    curved = SpatialGraph.from_frames(nodes, pd.DataFrame({"u": [1], "v": [2], "length": [130.0]}))
    assert curved.step(1, 0)["length"] == pytest.approx(130.0)
    assert curved.step(1, 0)["bearing"] == pytest.approx(180.0)

    assert sorted(graph.subgraph(1, hops=1).nodes.tolist()) == [0, 1]
    sub = graph.subgraph(1, hops=2)
    assert sub.nodes.tolist() == [1, 0, 2] and sub.hops.tolist() == [0, 1, 2]
    assert len(sub.edges) == 2
    assert len(graph.subgraph(1, hops=2, max_nodes=2).nodes) == 2


def test_anchoring_to_the_nearest_node(city):
    graph = city.graph
    node, dist = graph.nearest(city.images[["x", "y"]].to_numpy())
    brute = np.hypot(*(city.images[["x", "y"]].to_numpy()[:, None, :] - graph.xy[None]).T)
    assert (node == brute.argmin(axis=0)).all()
    assert (graph.image_node == node).all() and dist == pytest.approx(graph.image_distance)
    assert len(graph.cell_node) == len(city.cells)


# -- captions ------------------------------------------------------------------------------------


def test_compass_and_distances_on_hand_cases():
    cases = {
        0: "north",
        22.4: "north",
        22.6: "north-east",
        45: "north-east",
        90: "east",
        135: "south-east",
        180: "south",
        225: "south-west",
        270: "west",
        315: "north-west",
        359: "north",
        -90: "west",
    }
    assert {b: compass(b) for b in cases} == cases
    assert [format_distance(m) for m in (3, 84, 996, 1234)] == ["10 m", "80 m", "1.0 km", "1.2 km"]
    marks = pd.DataFrame(
        {
            "name": ["N", "SE", "far"],
            "kind": ["square"] * 3,
            "x": [1000.0, 1300.0, 1000.0],
            "y": [2000.0, 600.0, 9000.0],
        }
    )
    [found] = nearest_landmarks(np.array([[1000.0, 1000.0]]), marks, k=3)
    assert [m.name for m in found] == ["SE", "N"]  # "far" is beyond MAX_LANDMARK_M
    assert found[0].distance_m == pytest.approx(500.0)
    assert found[0].bearing_deg == pytest.approx(143.1, abs=0.05)
    assert found[0].direction == "south-east" and found[1].direction == "north"


def test_caption_names_the_right_place(city, grid):
    # The image nearest to Sarphatipark (De Pijp): park around it, known buurt and landmarks.
    xy = city.images[["x", "y"]].to_numpy()
    i = int(np.hypot(xy[:, 0] - 121900, xy[:, 1] - 485650).argmin())
    image = city.images.iloc[[i]]
    [facts] = city.facts(image["id"].tolist(), xy[[i]], image["node"].to_numpy(), image)
    cell = grid.loc[int(cell_id(xy[i, 0], xy[i, 1]))]
    marks = read_landmarks()
    dist = np.hypot(marks.geometry.x - xy[i, 0], marks.geometry.y - xy[i, 1]).to_numpy()
    j = int(dist.argmin())
    name = marks["name"].iloc[j]
    direction = _direction(marks.geometry.x.iloc[j] - xy[i, 0], marks.geometry.y.iloc[j] - xy[i, 1])
    assert (facts.buurt, facts.district) == (cell["buurt_naam"], cell["district"])
    assert (facts.landmarks[0].name, facts.landmarks[0].direction) == (name, direction)
    assert facts.park_share is not None and facts.park_share > 0.05

    text = TemplateCaptioner(seed=0).caption(facts)
    assert cell["buurt_naam"] in text and cell["district"] in text
    sentence = next(s for s in re.split(r"(?<=\.) ", text) if name in s)
    assert direction in sentence and format_distance(dist[j]) in sentence
    assert "park (" in text


def test_templates_are_deterministic_per_seed_and_varied(city):
    images = city.images.iloc[:200]
    facts = city.facts(
        images["id"].tolist(), images[["x", "y"]].to_numpy(), images["node"].to_numpy(), images
    )
    first = [TemplateCaptioner(seed=0).caption(f) for f in facts]
    assert first == [TemplateCaptioner(seed=0).caption(f) for f in facts]
    assert first != [TemplateCaptioner(seed=1).caption(f) for f in facts]
    openings = {
        t.split(". ")[0].replace(f.buurt, "B").replace(f.district, "D")
        for t, f in zip(first, facts, strict=True)
    }
    assert len(openings) >= 3
    assert len({t.split(". ")[1][:12] for t in first}) >= 4  # the other facts come in many orders


# -- reasoning paths -----------------------------------------------------------------------------


def test_reasoning_paths_replay_to_their_answer(city, grid):
    graph = city.graph
    marks = read_landmarks()
    kinds = set()
    for start in range(0, len(graph.node_ids), max(1, len(graph.node_ids) // 60)):
        path = reasoning_path(city, start, KeyedRng(f"test|{start}"))
        assert path == reasoning_path(city, start, KeyedRng(f"test|{start}"))
        assert 1 <= len(path.steps) <= 3 and len(set(path.nodes)) == len(path.nodes)
        position = graph.xy[start].copy()
        moves = []
        for a, b, step in zip(path.nodes[:-1], path.nodes[1:], path.steps, strict=True):
            assert b in graph.neighbours(a)
            position += (step["dx_m"], step["dy_m"])
            assert step["direction"] == _direction(step["dx_m"], step["dy_m"])
            moves.append(f"{format_distance(step['length_m'])} {step['direction']}")
        end = path.nodes[-1]
        assert position == pytest.approx(graph.xy[end], abs=0.05)
        assert re.search(r",? then ".join(map(re.escape, moves)) + r"\.", path.question)
        kinds.add(path.kind)
        if path.kind == "buurt":
            cell = cell_id(*graph.xy[end])
            if cell in grid.index:
                assert grid.loc[cell, "buurt_naam"] in path.answer
                assert path.facts["buurt"] == grid.loc[cell, "buurt_naam"]
        elif path.kind == "displacement":
            d = graph.xy[end] - graph.xy[start]
            assert f"{format_distance(float(np.hypot(*d)))} {_direction(*d)}" in path.answer
        else:
            x, y = graph.xy[end]
            dist = np.hypot(marks.geometry.x - x, marks.geometry.y - y)
            assert path.facts["landmark"] == marks["name"].iloc[int(dist.argmin())]
            assert format_distance(float(dist.min())) in path.answer
    assert kinds == {"buurt", "landmark", "displacement"}


def test_reasoning_samples_match_their_graph(city, samples):
    paths = [s for s in samples if s.pair_type == PAIR_REASONING]
    assert paths
    for s in paths:
        ids = s.meta["path"]
        assert ids[0] == s.meta["node_id"] and ids[-1] == s.meta["answer"]["node_id"]
        for a, b, step in zip(ids[:-1], ids[1:], s.meta["steps"], strict=True):
            walked = city.graph.step(city.graph.index_of(a), city.graph.index_of(b))
            assert step["length_m"] == pytest.approx(walked["length"], abs=0.05)
        assert s.positive and s.query.count("<image>") == len(s.images) == 1


# -- files ---------------------------------------------------------------------------------------


def test_export_round_trip(tiny_demo, city, tmp_path):
    out = tmp_path / "ugdata"
    manifest = build_ugdata(str(tiny_demo), str(out), seed=3, max_images=250, hops=2)
    data = read_ugdata(out)
    expected = build_samples(city, out, seed=3, max_images=250, hops=2).samples
    assert [s.to_json() for s in data.files["train.jsonl"]] == [s.to_json() for s in expected]
    assert manifest["files"]["train.jsonl"] == len(expected)
    assert {s.pair_type for s in expected} == {PAIR_CAPTION, PAIR_GRAPH, PAIR_REASONING}
    assert [p.name for p in tmp_path.iterdir()] == ["ugdata"]  # no temporary folder left
    for s in data.files["train.jsonl"][:40]:
        assert data.image_path(s).is_file()
        if s.pair_type == PAIR_GRAPH:
            graph = data.graph(s)
            assert graph.center_node == s.meta["node_id"]
            record = graph_record(city, city.graph.index_of(graph.center_node), hops=2)
            assert graph.to_json() == json.loads(json.dumps(record.to_json()))
            assert len(to_networkx(graph)) == len(graph.nodes)
    with pytest.raises(FileExistsError):
        build_ugdata(str(tiny_demo), str(out))


def test_ugdata_anchors_the_images_of_any_chosen_source(tiny_demo, city, tmp_path):
    out = tmp_path / "ugdata"
    manifest = build_ugdata(str(tiny_demo), str(out), sources=["mapillary"])
    mapillary = city.images[city.images["source"] == "mapillary"]
    assert manifest["images"] == len(mapillary) > 0
    assert manifest["images_per_source"] == {"mapillary": len(mapillary)}
    assert manifest["options"]["sources"] == ["mapillary"]
    data = read_ugdata(out)
    captions = [s for s in data.files["train.jsonl"] if s.pair_type == PAIR_CAPTION]
    assert {s.meta["source"] for s in captions} == {"mapillary"}
    assert {s.meta["image_id"] for s in captions} == set(mapillary["id"])
    for sample in captions:
        node = city.graph.index_of(sample.meta["node_id"])
        image = mapillary.set_index("id").loc[sample.meta["image_id"]]
        assert node == image["node"]  # anchored to its nearest street node
        assert data.image_path(sample).is_file()
    text = " ".join(s.positive_messages[0][0]["content"] for s in captions)
    assert "Mapillary" in text and "Flickr photo from" not in text
    with pytest.raises(ValueError, match=r"no usable images of the sources \['kartaview'\]"):
        build_ugdata(str(tiny_demo), str(tmp_path / "none"), sources=["kartaview"])


def test_malformed_input_names_file_and_line(tmp_path, samples):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(samples[0].to_json())
    path.write_text(good + "\n" + good[:-5] + "\n")
    with pytest.raises(UGDataFormatError, match=r"bad\.jsonl:2: not valid JSON"):
        read_samples(path)
    broken = {k: v for k, v in samples[0].to_json().items() if k != "positive_messages"}
    path.write_text(good + "\n\n" + json.dumps(broken) + "\n")
    with pytest.raises(UGDataFormatError, match=r"bad\.jsonl:3: missing fields \['positive_"):
        read_samples(path)
    two = {**samples[0].to_json(), "images": ["a.jpg", "b.jpg"]}
    path.write_text(json.dumps(two) + "\n")
    with pytest.raises(UGDataFormatError, match=r"bad\.jsonl:1: 1 <image> tags but 2 images"):
        read_samples(path)

    graph = tmp_path / "g.json"
    node = {"node_id": "7", "coords": [4.9, 52.35], "node_text": "Category: street node"}
    write_graph(GraphRecord(center_node="7", nodes=[node], edges=[]), graph)
    assert read_graph(graph).nodes == [node]
    obj = json.loads(graph.read_text())
    obj["edges"].append({"source": obj["center_node"], "target": "nowhere"})
    graph.write_text(json.dumps(obj))
    with pytest.raises(UGDataFormatError, match=r"g\.json: edge \d+ must join two listed nodes"):
        read_graph(graph)


# -- held-out districts --------------------------------------------------------------------------


def test_heldout_district_leaves_nothing_of_it_in_training(samples, tiny_demo, tmp_path):
    split = split_by_district(samples, "centrum")
    assert split.heldout and split.train
    assert all(s.meta["district"] == "Centrum" for s in split.heldout)
    assert not any(
        "Centrum" in s.meta["districts"] or s.meta["district"] == "Centrum" for s in split.train
    )
    assert len(split.train) + len(split.heldout) + len(split.dropped) == len(samples)
    with pytest.raises(ValueError, match="Atlantis"):
        split_by_district(samples, "Atlantis")

    out = tmp_path / "held"
    manifest = build_ugdata(str(tiny_demo), str(out), max_images=200, holdout_district="Centrum")
    data = read_ugdata(out, check_graphs=False)
    assert manifest["files"]["heldout.jsonl"] == len(data.files["heldout.jsonl"]) > 0
    for s in data.files["train.jsonl"]:
        assert "Centrum" not in s.meta["districts"]
        for g in s.graphs:  # nor any node of a training graph
            assert "Centrum" not in read_graph(out / g).districts
