"""Latent fields and Leefbaarometer-style scores of the synthetic Amsterdam.

Every latent is a field on the 100 m grid of the whole municipality, so a district extent
shows exactly the values the whole-city build shows for the same seed. The map is hand-drawn
from real coordinates (RD New): the IJ, the Amstel, the canal ring, the lakes and parks, the
A10 ring road, and the urban cores that give each district its era and character.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import shapely
from rasterio import features
from rasterio.transform import from_origin
from scipy import ndimage
from shapely.geometry.base import BaseGeometry

from core.grid import CELL_SIZE, cell_index, grid_for_boundary
from core.sources.boundaries import assign_buurten, municipality_outline, read_buurten

#: Leefbaarometer releases: the years with labels.
LABEL_YEARS = (2016, 2018, 2020, 2022)
#: Years with imagery: a yearly aerial mosaic and street captures. The years after the last
#: release have no labels: what monitoring predicts.
IMAGERY_YEARS = tuple(range(2016, 2025))
#: The year the latent fields' standardisation (and the mosaic ``aerial.tif``) refer to.
REFERENCE_YEAR = LABEL_YEARS[-1]
NATIONAL_MEAN = 4.1

# -- the hand-drawn map (RD New metres) ---------------------------------------------------------

_CANAL_CENTRE = (121650.0, 487900.0)
_CANAL_RADII = (480.0, 680.0, 840.0, 1000.0, 1500.0)  # Singel .. Singelgracht


def _arc(
    centre: tuple[float, float], radius: float, start_deg: float, end_deg: float
) -> BaseGeometry:
    angles = np.radians(np.linspace(start_deg, end_deg, 60))
    return shapely.linestrings(
        centre[0] + radius * np.cos(angles), centre[1] + radius * np.sin(angles)
    )


def _ellipse(x: float, y: float, rx: float, ry: float) -> BaseGeometry:
    return shapely.affinity.scale(shapely.Point(x, y).buffer(1.0, 32), rx, ry)


def water_geometry() -> BaseGeometry:
    """The IJ, IJmeer, Amstel, canal ring, lakes and harbour basins as one geometry."""
    ij = shapely.LineString(
        [
            (110000, 489700),
            (114000, 489500),
            (117000, 489200),
            (119500, 488800),
            (121000, 488450),
            (122500, 488420),
            (124500, 488250),
            (126500, 487700),
            (128000, 487600),
        ]
    ).buffer(220)
    ijmeer = shapely.box(127500, 483400, 138000, 492500).difference(
        shapely.box(127300, 484300, 130800, 486300).union(_ellipse(133000, 480500, 2500, 3000))
    )
    amstel = shapely.LineString(
        [
            (121650, 487050),
            (122050, 486450),
            (122550, 485400),
            (123050, 484300),
            (123300, 482500),
            (123800, 480500),
            (124000, 478000),
        ]
    ).buffer(40)
    canals = shapely.union_all(
        [_arc(_CANAL_CENTRE, r, 150, 345).buffer(13 if r < 1400 else 22) for r in _CANAL_RADII]
    )
    kanaal = shapely.LineString([(122300, 488600), (122500, 490500), (122900, 493500)]).buffer(25)
    lakes = [
        _ellipse(115278, 486617, 650, 330),  # Sloterplas
        _ellipse(115300, 484300, 900, 450),  # Nieuwe Meer
        _ellipse(128800, 478700, 450, 400),  # Gaasperplas
    ]
    harbours = [
        shapely.box(112500, 489900, 113400, 491200),
        shapely.box(114300, 489900, 115100, 490900),
        shapely.box(116200, 489800, 116900, 490600),
    ]
    return shapely.union_all([ij, ijmeer, amstel, canals, kanaal, *lakes, *harbours])


def park_geometry() -> BaseGeometry:
    """Parks and woods, without the water inside them."""
    vondelpark = shapely.LineString([(118800, 485520), (120350, 485880)]).buffer(130)
    parks = [
        vondelpark,
        _ellipse(120171, 488894, 300, 180),  # Westerpark
        _ellipse(123174, 485892, 200, 170),  # Oosterpark
        _ellipse(121900, 485650, 90, 90),  # Sarphatipark
        _ellipse(117900, 486300, 330, 220),  # Rembrandtpark
        _ellipse(125600, 486300, 300, 250),  # Flevopark
        _ellipse(123332, 489229, 280, 350),  # Noorderpark
        _ellipse(115278, 486617, 950, 600),  # Sloterpark around the plas
        _ellipse(120800, 482100, 320, 260),  # Amstelpark
        _ellipse(121100, 483600, 220, 160),  # Beatrixpark
        _ellipse(128800, 478700, 800, 650),  # Gaasperpark
        _ellipse(116300, 482600, 1400, 900),  # Amsterdamse Bos
        _ellipse(124200, 485300, 150, 130),  # Frankendael
        _ellipse(117900, 487900, 150, 200),  # Erasmuspark
    ]
    return shapely.union_all(parks).difference(water_geometry())


A10 = shapely.LinearRing(
    [
        (116900, 485000),
        (117300, 488500),
        (119000, 489600),
        (122000, 489700),
        (124600, 489300),
        (125100, 486500),
        (123900, 483500),
        (121000, 483000),
        (118000, 483300),
    ]
)

# Urban cores: (name, x, y, reach in m, era at the core, era gained per km, density at core).
# Era 0 = 17th-century canal houses, 0.3 = 19th-century belt and interwar Zuid,
# 0.6 = post-war garden cities, 0.75 = 1970s Bijlmer, 1 = 21st-century.
_CORES = [
    ("Centrum", 121350, 487300, 4200, 0.02, 0.11, 1.00),
    ("Nieuw-West", 116200, 486300, 2300, 0.58, 0.02, 0.70),
    ("Noord", 122600, 490600, 1900, 0.52, 0.03, 0.60),
    ("Bijlmer", 125000, 479300, 1700, 0.74, 0.02, 0.75),
    ("IJburg", 128900, 485300, 1100, 0.97, 0.00, 0.75),
    ("Zuidas", 119900, 483400, 700, 0.95, 0.00, 0.85),
    ("Weesp", 131450, 479900, 900, 0.12, 0.15, 0.65),
    ("Westpoort", 114800, 490200, 2200, 0.85, 0.00, 0.80),
]

#: District mean of facade upkeep (standard units), and its trend per 4 years.
_UPKEEP_DISTRICT = {
    "Centrum": 0.6,
    "Zuid": 0.8,
    "West": 0.2,
    "Oost": 0.2,
    "Nieuw-West": -0.5,
    "Noord": -0.4,
    "Zuidoost": -0.6,
    "Westpoort": -0.3,
    "Weesp": 0.3,
    "": 0.0,
}
_UPKEEP_TREND = {"Noord": 0.35, "Oost": 0.2, "West": 0.2, "Nieuw-West": 0.1, "Zuidoost": 0.15}
_SHOPS_DISTRICT = {"Centrum": 0.9, "West": 0.3, "Oost": 0.2, "Zuid": 0.3}

#: Latents that change from year to year: facade upkeep, litter and shops (street-only) in every
#: cell, building density, era and greenery (visible from the air) on the change sites.
YEARLY_LATENTS = ("upkeep", "litter", "shops", "density", "era", "greenery")


@dataclass(frozen=True)
class ChangeSite:
    """A place whose buildings or trees change between imagery years (real RD New positions).

    Between ``first`` and ``last`` the change ramps linearly from nothing to all of it; it is
    whole within ``radius`` metres of the centre and fades out over the next 30%.
    """

    name: str
    x: float
    y: float
    radius: float
    first: int
    last: int
    density: float = 0.0
    """Added building density (clipped to 0..1)."""
    era: float | None = None
    """The era the changed buildings reach (new building: about 1)."""
    greenery: float = 0.0
    """Added greenery (clipped to 0..1)."""

    def weight(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """How much of the change reaches points ``x, y``: 1 inside, fading to 0."""
        distance = np.hypot(x - self.x, y - self.y)
        return np.clip((1.3 * self.radius - distance) / (0.3 * self.radius), 0, 1)

    def progress(self, year: int) -> float:
        """Share of the change done by ``year``."""
        return float(np.clip((year - self.first) / (self.last - self.first), 0, 1))


#: Redevelopment and greening, in years that straddle the releases (density, era, greenery):
#: Buiksloterham is done by 2021 (between releases), the Houthavens and the Bijlmer renewal run
#: past the last release, the Sluisbuurt is built mostly after it (what only monitoring sees),
#: and Slotervaart's streets get trees (visible from the air and the street). In ``lbm`` the
#: sites gain 0.03 (Houthavens) to 0.17 (Bijlmer) more than the rest of their district from
#: 2016 to 2024, against a city-wide spread of change of 0.05.
CHANGE_SITES = (
    ChangeSite("Buiksloterham", 122074, 489516, 450, 2017, 2021, 0.3, 0.98, 0.2),
    ChangeSite("Houthavens", 120100, 489418, 350, 2019, 2023, 0.3, 0.98, 0.2),
    ChangeSite("Sluisbuurt", 125637, 487713, 300, 2021, 2024, 0.4, 1.0, 0.15),
    ChangeSite("Bijlmer renewal", 125000, 479300, 500, 2019, 2023, -0.1, 0.95, 0.25),
    ChangeSite("Slotervaart trees", 117177, 485601, 900, 2018, 2022, greenery=0.35),
)

#: Score model: each dimension is a weighted sum of standardised components; the weights of
#: the street-only components are about as large as the aerial ones (see README).
SCORE_WEIGHTS: dict[str, dict[str, float]] = {
    "fys": {"greenery": 0.6, "water_near": 0.4, "density": -0.3, "litter": -0.4, "noise": -0.5},
    "onv": {"upkeep": 0.6, "litter": -0.7, "density": -0.3, "noise": -0.5},
    "soc": {"upkeep": 0.5, "era_value": 0.3, "social": 0.8},
    "vrz": {"density": 0.7, "shops": 0.7, "greenery": 0.1},
    "won": {
        "era_value": 1.0,
        "greenery": 0.6,
        "density": -0.3,
        "upkeep": 0.8,
        "social": 0.3,
        "noise": -0.2,
    },
}
#: (mean, spread) of each dimension in Amsterdam, in LBM units.
SCORE_SCALE = {
    "fys": (-0.02, 0.05),
    "onv": (-0.07, 0.08),
    "soc": (-0.03, 0.05),
    "vrz": (0.12, 0.05),
    "won": (0.03, 0.08),
}

#: Which latent shows where: the generative story of README.md, used by tests and docs.
VISIBILITY = {
    "aerial": ("density", "greenery", "water", "park", "era"),
    "street": ("upkeep", "litter", "shops", "greenery", "era"),
    "neither": ("noise", "social"),
}


@dataclass
class CityFields:
    """Per-cell latents of the whole municipality, one row per cell id (sorted)."""

    cells: pd.DataFrame  # cell_id, buurt/district columns, latents, labelled flag
    yearly: dict[int, pd.DataFrame]  # imagery year -> cell_id-indexed YEARLY_LATENTS

    def lookup(self, ids: np.ndarray) -> pd.DataFrame:
        """Rows of ``cells`` for the given cell ids (error if an id is outside the city)."""
        return self.cells.loc[np.asarray(ids, dtype=np.int64)]


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    return (field - field.mean()) / field.std()


def _standardise(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return (values - values[mask].mean()) / values[mask].std()


def _fraction_on_lattice(
    geometry: BaseGeometry, ix0: int, iy1: int, shape: tuple[int, int]
) -> np.ndarray:
    """Share of each 100 m cell covered by a geometry, from a 10 m rasterisation."""
    fine = 10
    transform = from_origin(ix0 * CELL_SIZE, iy1 * CELL_SIZE, CELL_SIZE / fine, CELL_SIZE / fine)
    mask = features.rasterize(
        [(geometry, 1)],
        out_shape=(shape[0] * fine, shape[1] * fine),
        transform=transform,
        dtype="uint8",
    )
    return mask.reshape(shape[0], fine, shape[1], fine).mean(axis=(1, 3))[::-1]  # row 0 = south


def build_fields(seed: int) -> CityFields:
    """All latents and the label mask of the whole city for one seed."""
    rng = np.random.default_rng([seed, 1])
    buurten = read_buurten()
    ids = grid_for_boundary(municipality_outline(buurten))
    ix, iy = cell_index(ids)
    ix0, iy0 = ix.min(), iy.min()
    shape = (iy.max() - iy0 + 1, ix.max() - ix0 + 1)  # rows = northing index from the south
    rows, cols = iy - iy0, ix - ix0
    cx, cy = (ix + 0.5) * CELL_SIZE, (iy + 0.5) * CELL_SIZE

    water = _fraction_on_lattice(water_geometry(), ix0, iy0 + shape[0], shape)[rows, cols]
    park = _fraction_on_lattice(park_geometry(), ix0, iy0 + shape[0], shape)[rows, cols]
    places = assign_buurten(ids, buurten)
    district = places["district"].to_numpy()

    def field(sigma: float) -> np.ndarray:
        return _smooth_noise(rng, shape, sigma)[rows, cols]

    # Urban intensity and era: a soft mixture of the cores.
    distances = np.stack([np.hypot(cx - x, cy - y) for _, x, y, *_ in _CORES])
    reach = np.array([c[3] for c in _CORES])[:, None]
    weights = np.exp(-((distances / reach) ** 2)) + 1e-9
    era_at = np.stack(
        [np.clip(c[4] + c[5] * distances[k] / 1000, 0, 1) for k, c in enumerate(_CORES)]
    )
    era = np.clip((weights * era_at).sum(0) / weights.sum(0) + 0.06 * field(2.0), 0, 1)
    intensity = (weights * np.array([c[6] for c in _CORES])[:, None]).max(0)
    land = np.clip(1 - water - park, 0, 1)
    density = np.clip(intensity * land * (1 + 0.25 * field(2.5)), 0, 1)
    industrial = (district == "Westpoort") | (np.hypot(cx - 125600, cy - 480600) < 700)
    greenery = np.clip(
        0.25
        + 0.35 * np.exp(-(((era - 0.6) / 0.25) ** 2))
        + 0.3 * park
        + 0.12 * field(3.0)
        - 0.15 * density
        + 0.1 * (district == "Zuid"),
        0,
        1,
    )
    water_lattice = np.zeros(shape)
    water_lattice[rows, cols] = water
    water_near = ndimage.gaussian_filter(water_lattice, 2.0)[rows, cols]
    noise = (
        np.exp(-shapely.distance(A10, shapely.points(cx, cy)) / 350)
        + 0.6 * density
        + 0.3 * field(1.5)
    )

    upkeep = (
        np.vectorize(_UPKEEP_DISTRICT.get)(district, 0.0)
        + 0.75 * field(3.0)
        + 0.5 * rng.standard_normal(len(ids))
    )
    litter = -0.45 * upkeep + 0.5 * density + 0.6 * field(2.0) + 0.5 * rng.standard_normal(len(ids))
    shops = (
        np.vectorize(_SHOPS_DISTRICT.get)(district, -0.2)
        + 1.2 * density
        + 0.7 * field(1.0)
        + 0.5 * rng.standard_normal(len(ids))
    )
    social = 0.8 * field(4.0) + 0.6 * rng.standard_normal(len(ids))

    labelled = (density > 0.12) & ~industrial & (water < 0.6)
    cells = pd.DataFrame(
        {
            "cell_id": ids,
            "x": cx,
            "y": cy,
            **{c: places[c].to_numpy() for c in places.columns},
            "water": water,
            "park": park,
            "density": density,
            "era": era,
            "greenery": greenery,
            "water_near": water_near,
            "industrial": industrial,
            "noise": noise,
            "social": social,
            "upkeep": upkeep,
            "litter": litter,
            "shops": shops,
            "labelled": labelled,
        }
    ).set_index("cell_id", drop=False)

    yearly = {year: _year_latents(cells, year, seed) for year in IMAGERY_YEARS}
    return CityFields(cells=cells, yearly=yearly)


def _year_latents(cells: pd.DataFrame, year: int, seed: int) -> pd.DataFrame:
    """The :data:`YEARLY_LATENTS` of every cell in ``year``.

    Upkeep drifts by district (:data:`_UPKEEP_TREND`, relative to the reference year) plus a
    little noise per year; the change sites move density, era and greenery.
    """
    district = cells["district"].to_numpy()
    drift = np.vectorize(_UPKEEP_TREND.get)(district, 0.0) * (year - REFERENCE_YEAR) / 4
    year_rng = np.random.default_rng([seed, 2, year])
    noise = 0.15 * year_rng.standard_normal(len(cells)) if year != REFERENCE_YEAR else 0
    latents = {
        "upkeep": cells["upkeep"].to_numpy() + drift + noise,
        "litter": cells["litter"].to_numpy() - 0.5 * drift,
        "shops": cells["shops"].to_numpy(),
        **{
            name: cells[name].to_numpy(dtype=float).copy()
            for name in ("density", "era", "greenery")
        },
    }
    x, y = cells["x"].to_numpy(), cells["y"].to_numpy()
    for site in CHANGE_SITES:
        reach = site.weight(x, y) * site.progress(year)
        latents["density"] = np.clip(latents["density"] + site.density * reach, 0, 1)
        latents["greenery"] = np.clip(latents["greenery"] + site.greenery * reach, 0, 1)
        if site.era is not None:
            latents["era"] = latents["era"] + (site.era - latents["era"]) * reach
    return pd.DataFrame(latents, index=cells.index)


def change_site(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The name of the change site that reaches each point, or ``""``."""
    names = np.full(len(np.atleast_1d(x)), "", dtype=object)
    for site in CHANGE_SITES:
        names[(site.weight(np.asarray(x), np.asarray(y)) > 0) & (names == "")] = site.name
    return names


def era_value(era: np.ndarray) -> np.ndarray:
    """How the housing market values a building era: historic and new high, post-war low."""
    return ((np.asarray(era) - 0.62) / 0.35) ** 2


def scores(fields: CityFields, year: int) -> pd.DataFrame:
    """LBM 3.0 scores of the labelled cells for one year (grid_id = cell_id).

    ``afw`` is the sum of the five dimensions and ``lbm`` the national mean plus ``afw``.
    Standardisation constants come from the latest year so that change between years shows.
    """
    cells = fields.cells
    mask = cells["labelled"].to_numpy()
    reference = {
        **{c: cells[c].to_numpy() for c in cells.columns},
        **fields.yearly[REFERENCE_YEAR],
    }
    current = {**{c: cells[c].to_numpy() for c in cells.columns}, **fields.yearly[year]}
    for comps in (reference, current):
        comps["era_value"] = era_value(comps["era"])

    def standardised(comps: dict[str, np.ndarray], name: str) -> np.ndarray:
        ref = np.asarray(reference[name], dtype=float)[mask]
        return (np.asarray(comps[name], dtype=float)[mask] - ref.mean()) / ref.std()

    table = {"grid_id": cells.index.to_numpy()[mask], "jaar": np.full(mask.sum(), year)}
    for dim, weights in SCORE_WEIGHTS.items():
        ref_raw = sum(w * standardised(reference, c) for c, w in weights.items())
        raw = sum(w * standardised(current, c) for c, w in weights.items())
        mean, spread = SCORE_SCALE[dim]
        table[dim] = mean + spread * (raw - ref_raw.mean()) / ref_raw.std()
    frame = pd.DataFrame(table)
    dims = list(SCORE_WEIGHTS)
    frame[dims] = frame[dims].round(4)
    frame["afw"] = frame[dims].sum(axis=1).round(4)
    frame["lbm"] = (NATIONAL_MEAN + frame["afw"]).round(4)
    return frame[["grid_id", "jaar", "lbm", "afw", *dims]]
