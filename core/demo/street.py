"""The demo city at street level: street graph, GSV and Flickr sampling, and image rendering.

A street image is drawn from the latents of the cell it was taken in. The facade's colour and
window layout follow the building era; grime, stains and boarded windows follow (low) upkeep;
bright specks on the pavement follow litter; coloured awnings at ground level follow shop
fronts; trees follow greenery. Each facade (a panorama location and heading) keeps its own
structure across capture years, while the nuisances change per capture: daylight, season,
viewpoint, parked cars, blur. Flickr adds scenes that carry little or no facade signal (water,
parks, people, food, interiors) and night shots; some are hard on purpose (people in front of
facades, interiors with windows).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import shapely

from core.demo.city import IMAGERY_YEARS, YEARLY_LATENTS, CityFields, water_geometry
from core.grid import CELL_SIZE, cell_id

IMAGE_PX = 64  # stored size of the JPEG files (the dashboard shows them)
RENDER_PX = 32  # drawn at this size and upsampled: the models read 32..64 px
SCENES = ("building", "street", "water", "park", "people", "food", "interior")
#: Scenes a building-filter should keep, and the outdoor ones.
BUILDING_SCENES = ("building", "street")
OUTDOOR_SCENES = ("building", "street", "water", "park", "people")

# Flickr hot spots: (x, y, spread in m, weight). Real RD coordinates of the tourist centre.
_HOTSPOTS = [
    (121318, 487362, 250, 10),
    (121847, 488026, 200, 6),
    (121855, 487292, 200, 4),
    (121585, 486604, 180, 4),
    (120671, 486365, 200, 5),
    (120720, 487522, 250, 5),
    (120804, 485908, 200, 6),
    (120584, 485676, 220, 4),
    (119671, 485693, 350, 4),
    (122947, 486561, 200, 2),
    (121298, 490467, 250, 2),
    (120873, 488022, 200, 2),
    (121954, 486746, 200, 3),
    (124635, 480798, 250, 1),
    (131457, 479949, 300, 1),
]
_CANAL_CENTRE = (121650.0, 487900.0)
_DISTRICT_ACTIVITY = {
    "Centrum": 1.0,
    "Zuid": 0.5,
    "West": 0.5,
    "Oost": 0.4,
    "Nieuw-West": 0.12,
    "Noord": 0.06,
    "Zuidoost": 0.05,
    "Westpoort": 0.05,
    "Weesp": 0.15,
    "": 0.0,
}


@dataclass
class StreetGraph:
    """Street network: nodes (osmid, x, y) and edges (u, v, length, bearing, LineString)."""

    nodes: pd.DataFrame
    edges: pd.DataFrame


def build_street_graph(fields: CityFields, cell_ids: np.ndarray, seed: int) -> StreetGraph:
    """Streets on a jittered 100 m lattice through the built-up cells of ``cell_ids``.

    Nodes sit near cell corners; an edge joins lattice neighbours when the land between them
    is built up. Crossings of water are kept only as occasional bridges.
    """
    rng = np.random.default_rng([seed, 4])
    cells = fields.lookup(cell_ids)
    built = cells.loc[cells["density"] > 0.08, "cell_id"].to_numpy()
    ix, iy = built // 10_000, built % 10_000
    # The four corners of every built cell are candidate nodes.
    corners = np.unique(
        np.concatenate([(ix + dx) * 10_000 + iy + dy for dx in (0, 1) for dy in (0, 1)])
    )
    cx, cy = corners // 10_000, corners % 10_000
    jitter = rng.uniform(-18, 18, (len(corners), 2))
    nodes = pd.DataFrame(
        {"osmid": corners, "x": cx * CELL_SIZE + jitter[:, 0], "y": cy * CELL_SIZE + jitter[:, 1]}
    )
    position = pd.Series(np.arange(len(corners)), index=corners)
    water = water_geometry()
    shapely.prepare(water)
    edge_parts = []
    for step in (10_000, 1):  # east-west, then north-south neighbours
        u = corners[np.isin(corners + step, corners)]
        v = u + step
        pu, pv = position[u].to_numpy(), position[v].to_numpy()
        mx = (nodes["x"].to_numpy()[pu] + nodes["x"].to_numpy()[pv]) / 2
        my = (nodes["y"].to_numpy()[pu] + nodes["y"].to_numpy()[pv]) / 2
        wet = shapely.contains_xy(water, mx, my)
        keep = (~wet | (rng.random(len(u)) < 0.3)) & (rng.random(len(u)) > 0.08)
        edge_parts.append(
            pd.DataFrame({"u": u[keep], "v": v[keep], "pu": pu[keep], "pv": pv[keep]})
        )
    edges = pd.concat(edge_parts, ignore_index=True)
    x0, y0 = nodes["x"].to_numpy()[edges["pu"]], nodes["y"].to_numpy()[edges["pu"]]
    x1, y1 = nodes["x"].to_numpy()[edges["pv"]], nodes["y"].to_numpy()[edges["pv"]]
    edges["length"] = np.hypot(x1 - x0, y1 - y0).round(2)
    edges["bearing"] = (np.degrees(np.arctan2(x1 - x0, y1 - y0)) % 360).round(1)  # from north
    edges["geometry"] = shapely.linestrings(
        np.stack([np.stack([x0, x1], 1), np.stack([y0, y1], 1)], -1)
    )
    used = np.unique(np.concatenate([edges["u"], edges["v"]]))
    nodes = nodes[nodes["osmid"].isin(used)].reset_index(drop=True)
    return StreetGraph(nodes=nodes, edges=edges.drop(columns=["pu", "pv"]))


def sample_gsv(
    fields: CityFields,
    graph: StreetGraph,
    cell_ids: np.ndarray,
    seed: int,
    max_locations_per_cell: int = 2,
) -> pd.DataFrame:
    """GSV captures: panoramas at street midpoints, two to four headings, in two or three of
    the imagery years.

    Returns:
        One row per image with position, heading, capture date, the facade's structure and
        the cell's latents in the capture year (the renderer's input).
    """
    rng = np.random.default_rng([seed, 5])
    e = graph.edges
    ends = shapely.get_coordinates(e["geometry"].to_numpy()).reshape(-1, 2, 2)
    mx, my = ends.mean(axis=1).T
    shift = rng.uniform(-0.3, 0.3, len(e))  # along the street, so panoramas are not on a lattice
    bearing = e["bearing"].to_numpy()
    px = mx + shift * e["length"].to_numpy() * np.sin(np.radians(bearing))
    py = my + shift * e["length"].to_numpy() * np.cos(np.radians(bearing))
    cand = pd.DataFrame({"x": px, "y": py, "bearing": bearing, "cell_id": cell_id(px, py)})
    cand = cand[cand["cell_id"].isin(cell_ids)]
    cand = cand.assign(order=rng.random(len(cand))).sort_values(["cell_id", "order"])
    dens = fields.lookup(cand["cell_id"].to_numpy())["density"].to_numpy()
    rank = cand.groupby("cell_id").cumcount().to_numpy()
    allowed = np.where(dens > 0.5, max_locations_per_cell, 1)
    locations = cand[(rank < allowed) & (dens > 0.1)].reset_index(drop=True)

    rows = []
    for loc in locations.itertuples():
        headings = [loc.bearing + 90, loc.bearing - 90]
        if rng.random() < 0.2:
            headings += [loc.bearing, loc.bearing + 180]
        n_years = 3 if rng.random() < 0.4 else 2
        years = np.sort(rng.choice(IMAGERY_YEARS, n_years, replace=False))
        for h in headings:
            facade = _facade_structure(rng)
            for year in years:
                month = int(rng.integers(3, 11))
                rows.append(
                    (
                        loc.Index,
                        loc.x,
                        loc.y,
                        round(h % 360, 1),
                        int(year),
                        month,
                        int(rng.integers(1, 28)),
                        loc.cell_id,
                        *facade,
                    )
                )
    table = pd.DataFrame(
        rows,
        columns=[
            "location",
            "x",
            "y",
            "heading",
            "year",
            "month",
            "day",
            "cell_id",
            *FACADE_COLUMNS,
        ],
    )
    table["id"] = [
        f"gsv_{loc:06d}_{int(h):03d}_{y}"
        for loc, h, y in zip(table["location"], table["heading"], table["year"], strict=True)
    ]
    table["pano_id"] = [
        f"pano_{loc:06d}_{y}" for loc, y in zip(table["location"], table["year"], strict=True)
    ]
    table = _street_captures(table, "gsv")
    return _attach_latents(table, fields, rng, framing="gsv")


FACADE_COLUMNS = ("tint", "window_cols", "window_rows", "facade_offset", "awning_hue", "tree_seed")


def _facade_structure(rng: np.random.Generator) -> tuple:
    return (
        float(rng.normal(1, 0.07)),
        int(rng.integers(3, 8)),
        int(rng.integers(3, 6)),
        float(rng.normal(0, 0.45)),
        float(rng.random()),
        int(rng.integers(0, 2**31)),
    )


def sample_flickr(fields: CityFields, cell_ids: np.ndarray, seed: int, count: int) -> pd.DataFrame:
    """Flickr photos: clustered on hot spots and the canal ring, sparse in Noord and Zuidoost.

    ``count`` is for the whole city; an extent keeps the photos that fall in its cells.
    """
    rng = np.random.default_rng([seed, 6])
    spots = np.array(_HOTSPOTS, float)
    n_spot, n_canal = int(count * 0.55), int(count * 0.2)
    which = rng.choice(len(spots), n_spot, p=spots[:, 3] / spots[:, 3].sum())
    sx = spots[which, 0] + rng.normal(0, 1, n_spot) * spots[which, 2]
    sy = spots[which, 1] + rng.normal(0, 1, n_spot) * spots[which, 2]
    angle = np.radians(rng.uniform(150, 345, n_canal))
    radius = rng.choice([480.0, 680.0, 840.0, 1000.0], n_canal) + rng.normal(0, 40, n_canal)
    kx, ky = _CANAL_CENTRE[0] + radius * np.cos(angle), _CANAL_CENTRE[1] + radius * np.sin(angle)
    # Background photos everywhere people go, weighted by district activity and density.
    cells = fields.cells
    weight = cells["district"].map(_DISTRICT_ACTIVITY).fillna(0).to_numpy() * (
        0.2 + cells["density"].to_numpy()
    )
    n_bg = count - n_spot - n_canal
    pick = rng.choice(len(cells), n_bg, p=weight / weight.sum())
    bx = cells["x"].to_numpy()[pick] + rng.uniform(-50, 50, n_bg)
    by = cells["y"].to_numpy()[pick] + rng.uniform(-50, 50, n_bg)
    x, y = np.concatenate([sx, kx, bx]), np.concatenate([sy, ky, by])
    origin = np.repeat(["hotspot", "canal", "local"], [n_spot, n_canal, n_bg])
    table = pd.DataFrame({"x": x, "y": y, "cell_id": cell_id(x, y), "origin": origin})
    table = table[table["cell_id"].isin(fields.cells.index)].reset_index(drop=True)

    near = fields.lookup(table["cell_id"].to_numpy())
    # Scene mix depends on the place and the photographer: boats near water, lawns in parks;
    # tourists at hot spots shoot each other, their food and their hotel rooms, residents their
    # street. So the off-topic share of a cell's photos varies, and dilutes unfiltered averages.
    base = np.array([0.26, 0.18, 0.12, 0.10, 0.14, 0.10, 0.10])
    logits = np.log(base)[None, :].repeat(len(table), 0)
    logits[:, 2] += 2.0 * near["water"].to_numpy() + near["water_near"].to_numpy()
    logits[:, 3] += 3.0 * near["park"].to_numpy()
    tourist = (table["origin"] == "hotspot").to_numpy()
    logits[tourist, 4:7] += np.array([0.9, 0.9, 0.6])
    logits[(table["origin"] == "canal").to_numpy(), 2] += 1.0
    local = (table["origin"] == "local").to_numpy()
    logits[local, :2] += np.array([0.8, 0.6])
    probs = np.exp(logits)
    probs /= probs.sum(1, keepdims=True)
    scene = (probs.cumsum(1) > rng.random((len(table), 1))).argmax(1)
    table["scene"] = np.array(SCENES)[scene]
    # Scene labels are not the whole truth: one photo in seven shows mostly something else than
    # its label says (a facade behind the "people", a boat in front of the "building").
    drawn = table["scene"].to_numpy().copy()
    ambiguous = rng.random(len(table)) < 0.15
    on_topic = np.isin(drawn, BUILDING_SCENES)
    drawn[ambiguous & ~on_topic] = "building"
    drawn[ambiguous & on_topic] = rng.choice(["people", "water"], int((ambiguous & on_topic).sum()))
    table["drawn"] = drawn
    last = IMAGERY_YEARS[-1]
    year = np.clip(np.round(2004 + (last - 2004) * rng.beta(2.2, 1.3, len(table))), 2004, last)
    year = year.astype(int)
    table["year"], table["month"], table["day"] = (
        year,
        rng.integers(1, 13, len(table)),
        rng.integers(1, 28, len(table)),
    )
    table["night"] = (rng.random(len(table)) < 0.12) & (table["drawn"] != "food")
    table["heading"] = np.nan
    structure = [_facade_structure(rng) for _ in range(len(table))]
    table[list(FACADE_COLUMNS)] = pd.DataFrame(structure, index=table.index)
    table["id"] = [f"flickr_{i:07d}" for i in range(len(table))]
    table["pano_id"] = None
    table["source"] = "flickr"
    table = _attach_latents(table, fields, rng, framing="flickr")
    table["title"], table["tags"] = _titles(table, rng)
    return table


def _attach_latents(
    table: pd.DataFrame,
    fields: CityFields,
    rng: np.random.Generator,
    framing: str,
    daylight: tuple[float, float] = (0.55, 1.15),
    blur: float = 0.25,
) -> pd.DataFrame:
    """Add the cell's latents in the capture year and per-capture nuisances.

    A photo taken before the first imagery year shows that year's city. ``daylight`` (the
    range of day shots' brightness) and ``blur`` (the share of blurred captures) set a
    source's image quality.
    """
    cells = fields.lookup(table["cell_id"].to_numpy())
    table["water_near"] = cells["water_near"].to_numpy()
    year = np.clip(table["year"].to_numpy(), IMAGERY_YEARS[0], IMAGERY_YEARS[-1])
    for name in YEARLY_LATENTS:
        values = np.empty(len(table))
        for y in np.unique(year):
            at = year == y
            values[at] = fields.yearly[y].loc[table["cell_id"].to_numpy()[at], name].to_numpy()
        table[name] = values
    n = len(table)
    table["upkeep"] = (
        table["upkeep"] + table["facade_offset"]
    )  # each building differs from its cell
    season = (table["month"].to_numpy() % 12) // 3  # 0 winter, 1 spring, 2 summer, 3 autumn
    table["season"] = season
    table["daylight"] = np.where(
        table["night"], rng.uniform(0.12, 0.3, n), rng.uniform(*daylight, n)
    )
    if framing == "gsv":
        table["horizon"], table["ground"] = rng.uniform(0.12, 0.3, n), rng.uniform(0.76, 0.86, n)
    else:  # photographers frame facades closer and streets wider
        close = table["drawn"].isin(["building", "people"]).to_numpy()
        table["horizon"] = np.where(close, rng.uniform(0.0, 0.12, n), rng.uniform(0.15, 0.35, n))
        table["ground"] = np.where(close, rng.uniform(0.85, 0.97, n), rng.uniform(0.62, 0.8, n))
    table["shift"] = rng.uniform(0, 1, n)
    table["car"] = rng.random(n) < 0.3
    table["blur"] = rng.random(n) < blur
    table["captured_at"] = pd.to_datetime(
        pd.DataFrame({"year": table["year"], "month": table["month"], "day": table["day"]})
    )
    return table


#: Every this many rows and columns of the street lattice is a main street (a through road).
MAIN_STREET_EVERY = 4
#: Share of main and of side streets the panorama car's capture points lie on.
PANORAMA_SHARE = {"main": 0.5, "side": 0.08}
#: Capture years of a panorama location: main streets are driven more often.
PANORAMA_YEARS = {"main": (3, 5), "side": (2, 3)}
#: How far the car's yearly positions and headings at one location scatter (metres, degrees).
PANORAMA_JITTER = (1.0, 3.0)
#: Street cells per Mapillary route (at least :data:`MAPILLARY_MIN_ROUTES` routes).
MAPILLARY_CELLS_PER_ROUTE = 400
MAPILLARY_MIN_ROUTES = 3
#: Street segments walked per route; two images per segment.
MAPILLARY_ROUTE_EDGES = 25
#: Phone and action-camera positions are noisier than a survey car's (metres).
MAPILLARY_GPS_M = 3.0


def main_streets(graph: StreetGraph) -> np.ndarray:
    """Whether each edge of ``graph`` is a main street: on every :data:`MAIN_STREET_EVERY`-th
    row (east-west) or column (north-south) of the street lattice."""
    u = graph.edges["u"].to_numpy()
    east_west = (graph.edges["v"].to_numpy() - u) == 10_000
    line = np.where(east_west, u % 10_000, u // 10_000)
    return line % MAIN_STREET_EVERY == 0


def _edge_points(graph: StreetGraph, at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points at fraction ``at`` along each edge, from ``u`` to ``v``."""
    ends = shapely.get_coordinates(graph.edges["geometry"].to_numpy()).reshape(-1, 2, 2)
    start, end = ends[:, 0], ends[:, 1]
    point = start + (end - start) * at[:, None]
    return point[:, 0], point[:, 1]


def _street_captures(table: pd.DataFrame, source: str) -> pd.DataFrame:
    """The columns every street-level source shares: a street scene by day, of ``source``."""
    table["scene"] = table["drawn"] = "street"
    table["source"] = source
    table["night"] = False
    return table


def sample_panorama(
    fields: CityFields, graph: StreetGraph, cell_ids: np.ndarray, seed: int
) -> pd.DataFrame:
    """City of Amsterdam style panorama views: the city's car drives the streets in several
    years, and each capture point gives one perspective view facing a facade.

    Capture points lie on half the main streets (:func:`main_streets`) and few side streets;
    main streets are driven in three or four of the imagery years, side streets in two. The
    car's yearly positions at a point scatter by about a metre and its views by a few degrees,
    so the same place in another year is a temporal pair without any id. Good quality: few
    blurred views, bright daylight.

    Returns:
        One row per view, in :func:`sample_gsv`'s columns plus ``main_street``.
    """
    rng = np.random.default_rng([seed, 10])
    main = main_streets(graph)
    driven = rng.random(len(main)) < np.where(main, PANORAMA_SHARE["main"], PANORAMA_SHARE["side"])
    x, y = _edge_points(graph, rng.uniform(0.3, 0.7, len(main)))
    side = np.where(rng.random(len(main)) < 0.5, 90.0, -90.0)  # the facade the view faces
    heading = (graph.edges["bearing"].to_numpy() + side) % 360
    spots = pd.DataFrame({"x": x, "y": y, "heading": heading, "main": main})
    spots["cell_id"] = cell_id(x, y)
    spots = spots[driven & spots["cell_id"].isin(cell_ids).to_numpy()]
    density = fields.lookup(spots["cell_id"].to_numpy())["density"].to_numpy()
    spots = spots[density > 0.1].reset_index(drop=True)
    low = np.where(spots["main"], PANORAMA_YEARS["main"][0], PANORAMA_YEARS["side"][0])
    high = np.where(spots["main"], PANORAMA_YEARS["main"][1], PANORAMA_YEARS["side"][1])
    n_years = rng.integers(low, high)
    order = rng.random((len(spots), len(IMAGERY_YEARS))).argsort(1)
    chosen = np.arange(len(IMAGERY_YEARS))[None, :] < n_years[:, None]
    location, slot = np.nonzero(chosen)
    year = np.asarray(IMAGERY_YEARS)[order[location, slot]]
    n = len(location)
    metres, degrees = PANORAMA_JITTER
    table = pd.DataFrame(
        {
            "location": location,
            "x": spots["x"].to_numpy()[location] + rng.normal(0, metres, n),
            "y": spots["y"].to_numpy()[location] + rng.normal(0, metres, n),
            "heading": (
                (spots["heading"].to_numpy()[location] + rng.normal(0, degrees, n)) % 360
            ).round(1),
            "year": year,
            "month": rng.integers(3, 11, n),
            "day": rng.integers(1, 28, n),
            "main_street": spots["main"].to_numpy()[location],
        }
    )
    table["cell_id"] = cell_id(table["x"].to_numpy(), table["y"].to_numpy())
    table = table[table["cell_id"].isin(cell_ids)].reset_index(drop=True)
    facades = pd.DataFrame(
        [_facade_structure(rng) for _ in range(len(spots))], columns=list(FACADE_COLUMNS)
    )
    table[list(FACADE_COLUMNS)] = facades.iloc[table["location"].to_numpy()].to_numpy()
    table["pano_id"] = [
        f"TMX_demo_{year}_pano_{loc:06d}"
        for loc, year in zip(table["location"], table["year"], strict=True)
    ]
    table["id"] = [
        f"amsterdam_panorama_{pano}_{int(h) % 360:03d}"
        for pano, h in zip(table["pano_id"], table["heading"], strict=True)
    ]
    table = _street_captures(table, "amsterdam_panorama")
    return _attach_latents(table, fields, rng, framing="gsv", daylight=(0.75, 1.15), blur=0.05)


def sample_mapillary(
    fields: CityFields, graph: StreetGraph, cell_ids: np.ndarray, seed: int
) -> pd.DataFrame:
    """Mapillary style crowd-sourced images: a few routes (one sequence each) walked through
    busy streets, two images per street segment facing the way of travel.

    One route per :data:`MAPILLARY_CELLS_PER_ROUTE` street cells (at least
    :data:`MAPILLARY_MIN_ROUTES`), starting where the city is dense, so coverage is patchy and
    clustered. Capture years are mostly recent (one date per sequence), positions carry phone
    GPS noise, and quality varies: half the images are blurred, daylight is duller.

    Returns:
        One row per image, in :func:`sample_gsv`'s columns plus ``sequence``.
    """
    rng = np.random.default_rng([seed, 11])
    edges = graph.edges
    # each edge both ways: a walk leaves a node along any of its streets
    ends = np.concatenate([edges["u"].to_numpy(), edges["v"].to_numpy()])
    others = np.concatenate([edges["v"].to_numpy(), edges["u"].to_numpy()])
    edge_of = np.tile(np.arange(len(edges)), 2)
    forward = np.repeat([True, False], len(edges))
    by_node = pd.Series(np.arange(len(ends))).groupby(ends).apply(np.asarray).to_dict()
    nodes = graph.nodes["osmid"].to_numpy()
    node_cells = cell_id(graph.nodes["x"].to_numpy(), graph.nodes["y"].to_numpy())
    near = fields.cells.reindex(node_cells)
    weight = (
        near["district"].map(_DISTRICT_ACTIVITY).fillna(0).to_numpy()
        * np.nan_to_num(near["density"].to_numpy())
        * np.isin(node_cells, cell_ids)
    )
    routes = max(MAPILLARY_MIN_ROUTES, round(len(cell_ids) / MAPILLARY_CELLS_PER_ROUTE))
    starts = rng.choice(len(nodes), routes, p=weight / weight.sum())
    steps = []
    for route, start in enumerate(starts):
        node, came = nodes[start], -1
        for _ in range(MAPILLARY_ROUTE_EDGES):
            ways = by_node.get(node)
            if ways is None:
                break
            onward = ways[edge_of[ways] != came] if len(ways) > 1 else ways
            way = onward[rng.integers(len(onward))]
            steps.append((route, edge_of[way], forward[way]))
            node, came = others[way], edge_of[way]
    route, edge, ahead = (np.array(c) for c in zip(*steps, strict=True))
    route, edge, ahead = (np.repeat(c, 2) for c in (route, edge, ahead))
    along = np.tile([0.3, 0.8], len(route) // 2)
    x, y = _edge_points(
        StreetGraph(graph.nodes, edges.iloc[edge]), np.where(ahead, along, 1 - along)
    )
    n = len(route)
    bearing = edges["bearing"].to_numpy()[edge] + np.where(ahead, 0.0, 180.0)
    first, last = IMAGERY_YEARS[0], IMAGERY_YEARS[-1]
    route_year = np.round(first + (last - first) * rng.beta(4.0, 1.3, len(starts))).astype(int)
    route_month, route_day = rng.integers(1, 13, len(starts)), rng.integers(1, 28, len(starts))
    table = pd.DataFrame(
        {
            "x": x + rng.normal(0, MAPILLARY_GPS_M, n),
            "y": y + rng.normal(0, MAPILLARY_GPS_M, n),
            "heading": ((bearing + rng.normal(0, 8.0, n)) % 360).round(1),
            "year": route_year[route],
            "month": route_month[route],
            "day": route_day[route],
            "sequence": [f"demo_sequence_{seed}_{r:04d}" for r in route],
        }
    )
    table["cell_id"] = cell_id(table["x"].to_numpy(), table["y"].to_numpy())
    table = table[table["cell_id"].isin(cell_ids)].reset_index(drop=True)
    table[list(FACADE_COLUMNS)] = pd.DataFrame(
        [_facade_structure(rng) for _ in range(len(table))], index=table.index
    )
    table["id"] = [f"mapillary_{seed}{i:07d}" for i in range(len(table))]
    table["pano_id"] = None
    table = _street_captures(table, "mapillary")
    return _attach_latents(table, fields, rng, framing="gsv", daylight=(0.4, 0.95), blur=0.55)


_TITLE_WORDS = {
    "building": ["Canal house", "Facade", "Architecture", "Old house", "Gable"],
    "street": ["Street view", "Our street", "Walking around", "Bikes everywhere"],
    "water": ["Canal boat", "On the IJ", "Houseboats", "Canal cruise"],
    "park": ["Sunday in the park", "Spring", "Picnic", "Trees"],
    "people": ["Friends", "Us", "Street performer", "King's Day"],
    "food": ["Lunch", "Stroopwafel", "Dinner", "Coffee"],
    "interior": ["Hotel room", "Cafe", "Museum hall", "Our apartment"],
}


def _titles(table: pd.DataFrame, rng: np.random.Generator) -> tuple[list[str], list[str]]:
    # Tags are noisy: a third of them come from another scene, as real tags do.
    titles, tags = [], []
    for scene in table["scene"]:
        told = scene if rng.random() > 0.33 else SCENES[rng.integers(len(SCENES))]
        words = _TITLE_WORDS[told]
        titles.append(str(words[rng.integers(len(words))]))
        tags.append(f"amsterdam,{told},holland")
    return titles, tags


# -- rendering -----------------------------------------------------------------------------------

_ERA_STOPS = np.array([0.0, 0.3, 0.6, 0.75, 1.0])
_FACADE = np.array(
    [[150, 72, 52], [118, 78, 60], [162, 160, 154], [192, 180, 156], [205, 214, 222]], float
)
_LEAVES = np.array(
    [[110, 90, 70], [92, 150, 70], [60, 118, 48], [172, 112, 42]], float
)  # by season


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def _hue(h: np.ndarray) -> np.ndarray:
    """Saturated RGB colours for hues in [0, 1)."""
    k = (np.asarray(h)[..., None] * 6 + np.array([5, 3, 1])) % 6
    return 255 * (1 - np.clip(np.minimum(k, 4 - k), 0, 1)) * 0.85 + 30


def render(table: pd.DataFrame, seed: int, px: int = RENDER_PX) -> np.ndarray:
    """Render the images of a sampled table as uint8 (n, px, px, 3), deterministically per seed."""
    rng = np.random.default_rng([seed, 7])
    n = len(table)
    col = lambda name: table[name].to_numpy(dtype=np.float32)[:, None, None]  # noqa: E731
    v, u = np.meshgrid(
        (np.arange(px, dtype=np.float32) + 0.5) / px,
        (np.arange(px, dtype=np.float32) + 0.5) / px,
        indexing="ij",
    )
    v, u = v[None], u[None]
    day = col("daylight")
    horizon, ground = col("horizon"), col("ground")
    dirt = _sigmoid(-1.3 * col("upkeep"))

    sky = np.where(day[..., None] > 0.4, np.array([120, 165, 215]), np.array([22, 28, 52]))
    # float64 throughout, painted in place: each layer writes only the pixels it covers
    img = np.broadcast_to(sky, (n, px, px, 3)).astype(np.float64)

    facade_rgb = np.stack(
        [np.interp(table["era"], _ERA_STOPS, _FACADE[:, c]) for c in range(3)], -1
    )
    facade_rgb = facade_rgb * table["tint"].to_numpy()[:, None]
    grime = dirt[..., 0, 0][:, None]
    facade_rgb = facade_rgb * (1 - 0.45 * grime) + 90 * 0.45 * grime
    blotch = px // 8
    stains = (
        rng.random((n, 9, 9), dtype=np.float32).repeat(blotch, 1).repeat(blotch, 2)[:, :px, :px]
        < 0.55 * dirt
    )
    in_facade = (v >= horizon) & (v < ground)
    face = facade_rgb[:, None, None, :] * np.where(stains, 0.72, 1.0)[..., None]
    np.copyto(img, face, where=in_facade[..., None])

    # Windows: old facades have few tall windows, post-war ones long bands of glass.
    era = col("era")
    cols_n, rows_n = col("window_cols") + np.round(3 * era), col("window_rows")
    fu = ((u + col("shift")) * cols_n) % 1
    fv = ((v - horizon) / np.maximum(ground - horizon, 1e-3) * rows_n) % 1
    half_w = 0.16 + 0.3 * np.clip((era - 0.4) * 2, 0, 1)
    window = in_facade & (np.abs(fu - 0.5) < half_w) & (fv > 0.2) & (fv < 0.72) & (v < ground - 0.1)
    window_id = np.floor((u + col("shift")) * cols_n) * 17 + np.floor(
        (v - horizon) / np.maximum(ground - horizon, 1e-3) * rows_n
    )
    broken = (np.sin(window_id * 12.9898 + col("tree_seed") % 1000) * 43758.5453) % 1 < 0.45 * dirt
    lit = (np.cos(window_id * 78.233 + col("tree_seed") % 997) * 12345.678) % 1 < 0.5
    glass = np.where(
        (day < 0.4)[..., None] & lit[..., None], np.array([235, 205, 120]), np.array([62, 78, 98])
    )
    glass = np.where(broken[..., None], np.array([112, 88, 58]), glass)
    np.copyto(img, glass, where=window[..., None])

    # Shop fronts: a band of awnings above the pavement.
    shop_band = in_facade & (v >= ground - 0.1)
    shop_here = (
        (np.floor((u + col("shift")) * 4) * 7.1 + col("tree_seed") % 101) * 0.618 % 1
    ) < _sigmoid(1.4 * col("shops") - 0.6)
    # Four awnings across the frame: colour the four, then spread them over their quarters.
    quarters = np.arange(4, dtype=np.float32) * 0.21
    quarter_hues = _hue((table["awning_hue"].to_numpy()[:, None] + quarters) % 1)
    awning = quarter_hues[:, np.floor(u[0] * 4).astype(int)]
    np.copyto(img, awning, where=(shop_band & shop_here)[..., None])

    # Pavement and litter.
    pavement = v >= ground
    np.copyto(img, np.array([118, 116, 112], np.float32), where=pavement[..., None])
    litter = pavement & (
        rng.random((n, px, px), dtype=np.float32)
        < 0.015 + 0.14 * _sigmoid(1.5 * col("litter") - 0.5)
    )
    # Only the litter pixels need a colour; the draw covers every pixel to keep the stream.
    litter_hue = rng.random((n, px, px), dtype=np.float32)
    img[litter] = _hue(litter_hue[litter])

    # Trees: up to three crowns; leaves follow the season.
    leaf = _LEAVES[table["season"].to_numpy()][:, None, None, :]
    tree_rng = rng.random((n, 3, 4))
    for k in range(3):
        present = (tree_rng[:, k, 0] < table["greenery"].to_numpy() * 1.2)[:, None, None]
        tu, tv, r = (
            tree_rng[:, k, 1:2, None],
            ground - 0.12 - 0.1 * tree_rng[:, k, 2:3, None],
            0.08 + 0.1 * tree_rng[:, k, 3:4, None],
        )
        crown = present & ((u - tu) ** 2 + (v - tv) ** 2 < r**2)
        if k == 0:
            crown &= (table["season"].to_numpy() != 0)[:, None, None]
        np.copyto(img, leaf, where=crown[..., None])

    off_topic = ~table["drawn"].isin(BUILDING_SCENES).to_numpy()
    if off_topic.any():
        img[off_topic] = _scenes(img[off_topic], table[off_topic], rng, u, v)

    outdoor = table["drawn"].isin(OUTDOOR_SCENES).to_numpy()[:, None, None]
    car = (
        outdoor
        & col("car").astype(bool)
        & (np.abs(u - col("shift")) < 0.18)
        & (v > ground - 0.06)
        & (v < ground + 0.08)
    )
    np.copyto(img, _hue(table["shift"].to_numpy()[:, None, None] * 3 % 1), where=car[..., None])
    img = img * day[..., None] + rng.standard_normal(img.shape, dtype=np.float32) * 4
    blurred = (
        img + np.roll(img, 1, 1) + np.roll(img, 1, 2) + np.roll(img, -1, 1) + np.roll(img, -1, 2)
    ) / 5
    np.copyto(img, blurred, where=col("blur").astype(bool)[..., None])
    return np.clip(img, 0, 255).astype(np.uint8)


def _scenes(
    img: np.ndarray, table: pd.DataFrame, rng: np.random.Generator, u: np.ndarray, v: np.ndarray
) -> np.ndarray:
    """Paint the off-topic Flickr scenes over the rendered facades ``img`` (float64), in place."""
    scene = table["drawn"].to_numpy()[:, None, None]
    n = len(table)
    r = rng.random((n, 6))[:, :, None, None]
    # Water: sky, a thin row of distant facades, water with ripples, a boat.
    water = (scene == "water") & (v > 0.42)
    ripples = 55 + 18 * np.sin(v * 90 + r[:, 0] * 6)
    np.copyto(
        img, np.stack([ripples * 0.7, ripples * 1.25, ripples * 1.6], -1), where=water[..., None]
    )
    boat = (
        (scene == "water")
        & (np.abs(u - r[:, 1]) < 0.22)
        & (np.abs(v - 0.62 - 0.2 * r[:, 2]) < 0.05)
    )
    np.copyto(img, np.array([150, 40, 30]), where=boat[..., None])
    # Park: lawn and a wall of trees.
    park = scene == "park"
    np.copyto(img, np.array([90, 140, 60]), where=(park & (v > 0.55))[..., None])
    np.copyto(img, np.array([52, 100, 44]), where=(park & (v > 0.2) & (v <= 0.55))[..., None])
    # People in front of a facade: heads and bodies over a third of the frame.
    for k in range(3):
        cu = (r[:, k] + 0.3 * k) % 1
        body = (scene == "people") & (np.abs(u - cu) < 0.11) & (v > 0.45)
        head = (scene == "people") & ((u - cu) ** 2 + (v - 0.36) ** 2 < 0.07**2)
        np.copyto(img, _hue(r[:, 3 + k % 3, :, :] % 1), where=body[..., None])
        np.copyto(img, np.array([222, 180, 150]), where=head[..., None])
    # Food: a plate on a table, nothing of the street.
    food = scene == "food"
    plate = (u - 0.5) ** 2 + (v - 0.55) ** 2 < 0.3**2
    np.copyto(img, np.array([120, 82, 50]), where=food[..., None])
    np.copyto(img, np.array([235, 232, 225]), where=(food & plate)[..., None])
    bits = (
        food & ((u - 0.5) ** 2 + (v - 0.55) ** 2 < 0.17**2) & (rng.random((n, *u.shape[1:])) < 0.5)
    )
    np.copyto(img, _hue(r[:, 4] % 1), where=bits[..., None])
    # Interior: a warm wall with windows onto bright sky; at a glance, a facade.
    inside = scene == "interior"
    wall = np.stack([170 + 60 * r[:, 5], 140 + 40 * r[:, 5], np.full_like(r[:, 5], 110.0)], -1)
    np.copyto(img, wall, where=inside[..., None])
    pane = inside & ((np.abs(u - 0.3) < 0.12) | (np.abs(u - 0.72) < 0.12)) & (v > 0.2) & (v < 0.6)
    np.copyto(img, np.array([200, 220, 240]), where=pane[..., None])
    sofa = inside & (v > 0.75) & (np.abs(u - r[:, 2]) < 0.3)
    np.copyto(img, np.array([70, 50, 60]), where=sofa[..., None])
    return img
