"""Tests for core.grid: the 100 m Leefbaarometer grid in EPSG:28992."""

from __future__ import annotations

import re
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely

from core import grid
from core.grid import (
    CELL_SIZE,
    RD_NEW,
    block_id,
    cell_center,
    cell_id,
    cell_index,
    cell_origin,
    cell_polygons,
    cells_in_bounds,
    clip_cells,
    grid_for_boundary,
    ids_from_index,
    neighbours,
    read_grid,
    spatial_split,
    to_geodataframe,
    write_grid,
)

# The hand-computed cell: lower-left corner (121300, 487200) -> 1213 * 10_000 + 4872.
HAND_ID = 12134872
# A local origin in central Amsterdam, so the small shapes below are real RD coordinates.
X0, Y0 = 121_000.0, 487_000.0


@pytest.fixture(scope="module")
def amsterdam() -> np.ndarray:
    """Cell ids of the whole municipality (about 24k cells)."""
    from core.sources.boundaries import municipality_outline

    return grid_for_boundary(municipality_outline())


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


class TestCellIds:
    def test_hand_computed_cell(self) -> None:
        ident = cell_id(121350.0, 487250.0)
        assert ident.dtype == np.int64
        assert int(ident) == HAND_ID
        assert tuple(map(float, cell_origin(HAND_ID))) == (121300.0, 487200.0)
        assert tuple(map(float, cell_center(HAND_ID))) == (121350.0, 487250.0)
        assert tuple(map(int, cell_index(HAND_ID))) == (1213, 4872)
        assert int(ids_from_index(1213, 4872)) == HAND_ID

    def test_round_trip_random_points(self) -> None:
        rng = np.random.default_rng(0)
        x = rng.uniform(110_000, 136_000, 10_000)
        y = rng.uniform(476_000, 494_000, 10_000)
        ids = cell_id(x, y)
        x0, y0 = cell_origin(ids)
        assert np.all((x0 <= x) & (x < x0 + CELL_SIZE))
        assert np.all((y0 <= y) & (y < y0 + CELL_SIZE))
        np.testing.assert_array_equal(cell_id(*cell_origin(ids)), ids)
        np.testing.assert_array_equal(cell_id(*cell_center(ids)), ids)
        np.testing.assert_array_equal(ids_from_index(*cell_index(ids)), ids)

    def test_broadcasts_and_keeps_shape(self) -> None:
        ids = cell_id(np.array([[121350.0, 121450.0]]), 487250.0)
        assert ids.shape == (1, 2)
        np.testing.assert_array_equal(ids, [[HAND_ID, HAND_ID + 10_000]])

    def test_edges_go_above_and_right(self) -> None:
        # The lower-left corner and the left/bottom edges belong to the cell itself...
        assert int(cell_id(121300.0, 487200.0)) == HAND_ID
        assert int(cell_id(121300.0, 487250.0)) == HAND_ID
        assert int(cell_id(121350.0, 487200.0)) == HAND_ID
        # ...the right/top edges to the neighbour east/north.
        assert int(cell_id(121400.0, 487250.0)) == HAND_ID + 10_000
        assert int(cell_id(121350.0, 487300.0)) == HAND_ID + 1
        assert int(cell_id(121400.0, 487300.0)) == HAND_ID + 10_001
        # Just below an edge stays in the cell below/left.
        below = np.nextafter(121300.0, 0.0)
        assert int(cell_id(below, 487250.0)) == HAND_ID - 10_000

    @pytest.mark.parametrize(
        ("x", "y", "match"),
        [
            (-1.0, 487250.0, "outside the RD New id range"),
            (121350.0, -0.5, "outside the RD New id range"),
            (121350.0, 1_000_000.0, "outside the RD New id range"),
            (np.nan, 487250.0, "finite"),
            (121350.0, np.inf, "finite"),
            (4.9041, 52.3676, "lon/lat"),  # Amsterdam, Dam square, in degrees
            (52.3676, 4.9041, "lon/lat"),  # the same, swapped
        ],
    )
    def test_bad_coordinates_raise(self, x: float, y: float, match: str) -> None:
        with pytest.raises(ValueError, match=match):
            cell_id(x, y)

    def test_one_bad_point_fails_the_array(self) -> None:
        with pytest.raises(ValueError, match="finite"):
            cell_id(np.array([121350.0, np.nan]), np.array([487250.0, 487250.0]))

    def test_cell_polygons_are_the_squares(self) -> None:
        (square,) = cell_polygons(np.array([HAND_ID]))
        assert square.equals(shapely.box(121300, 487200, 121400, 487300))
        assert square.area == CELL_SIZE**2


class TestCellsInBounds:
    @pytest.mark.parametrize(
        ("bounds", "count"),
        [
            ((X0, Y0, X0 + 100, Y0 + 100), 1),  # exactly one cell
            ((X0, Y0, X0 + 300, Y0 + 200), 6),  # edges on the grid: 3 x 2
            ((X0 + 50, Y0 + 50, X0 + 150, Y0 + 150), 4),  # straddles a corner: 2 x 2
            ((X0 + 1, Y0 + 1, X0 + 2, Y0 + 2), 1),  # a tiny box inside one cell
            ((X0 - 0.5, Y0, X0 + 1000, Y0 + 1000.5), 11 * 11),
        ],
    )
    def test_counts(self, bounds: tuple[float, float, float, float], count: int) -> None:
        ids = cells_in_bounds(bounds)
        assert len(ids) == count
        assert len(np.unique(ids)) == count

    def test_row_major_order(self) -> None:
        ids = cells_in_bounds((X0, Y0, X0 + 200, Y0 + 200))
        ix, iy = cell_index(ids)
        np.testing.assert_array_equal(ix - ix.min(), [0, 1, 0, 1])
        np.testing.assert_array_equal(iy - iy.min(), [0, 0, 1, 1])

    def test_every_cell_intersects_the_box(self) -> None:
        box = (X0 + 30, Y0 + 70, X0 + 420, Y0 + 260)
        polygons = cell_polygons(cells_in_bounds(box))
        overlap = shapely.area(shapely.intersection(polygons, shapely.box(*box)))
        assert np.all(overlap > 0)
        assert np.isclose(overlap.sum(), 390 * 190)

    @pytest.mark.parametrize("bounds", [(X0, Y0, X0, Y0 + 100), (X0, Y0, X0 - 1, Y0 + 100)])
    def test_empty_bounds_raise(self, bounds: tuple[float, float, float, float]) -> None:
        with pytest.raises(ValueError, match="empty bounds"):
            cells_in_bounds(bounds)


class TestClip:
    # Right triangle with legs of 350 m: x + y < 350 in local metres. No cell centre or corner
    # lies on the hypotenuse, so the counts do not depend on tie-breaking.
    TRIANGLE = shapely.Polygon([(X0, Y0), (X0 + 350, Y0), (X0, Y0 + 350)])

    def _local(self, ids: np.ndarray) -> set[tuple[int, int]]:
        ix, iy = cell_index(ids)
        return set(zip((ix - int(X0 // 100)).tolist(), (iy - int(Y0 // 100)).tolist(), strict=True))

    def test_triangle_center(self) -> None:
        candidates = cells_in_bounds(self.TRIANGLE.bounds)
        assert len(candidates) == 16
        kept = clip_cells(candidates, self.TRIANGLE, "center")
        # centre (50 + 100 i, 50 + 100 j) inside  <=>  100 (i + j + 1) < 350  <=>  i + j <= 2
        assert self._local(kept) == {(i, j) for i in range(4) for j in range(4) if i + j <= 2}
        assert len(kept) == 6

    def test_triangle_intersects(self) -> None:
        candidates = cells_in_bounds(self.TRIANGLE.bounds)
        kept = clip_cells(candidates, self.TRIANGLE, "intersects")
        # interior overlaps  <=>  lower-left corner 100 (i + j) < 350  <=>  i + j <= 3
        assert self._local(kept) == {(i, j) for i in range(4) for j in range(4) if i + j <= 3}
        assert len(kept) == 10

    def test_intersects_ignores_cells_that_only_touch(self) -> None:
        square = shapely.box(X0, Y0, X0 + 200, Y0 + 200)
        candidates = cells_in_bounds((X0 - 100, Y0 - 100, X0 + 300, Y0 + 300))  # 4 x 4
        assert len(clip_cells(candidates, square, "intersects")) == 4
        assert len(clip_cells(candidates, square, "center")) == 4

    def test_keeps_input_order(self) -> None:
        candidates = cells_in_bounds(self.TRIANGLE.bounds)[::-1]
        kept = clip_cells(candidates, self.TRIANGLE, "center")
        np.testing.assert_array_equal(kept, candidates[np.isin(candidates, kept)])

    def test_center_is_a_partition(self) -> None:
        # Two polygons sharing a diagonal edge: every cell goes to exactly one of them.
        square = shapely.box(X0, Y0, X0 + 350, Y0 + 350)
        other = square.difference(self.TRIANGLE)
        candidates = cells_in_bounds(square.bounds)
        a = clip_cells(candidates, self.TRIANGLE, "center")
        b = clip_cells(candidates, other, "center")
        assert len(np.intersect1d(a, b)) == 0
        assert len(a) + len(b) == len(clip_cells(candidates, square, "center"))

    def test_bad_predicate_raises(self) -> None:
        with pytest.raises(ValueError, match="predicate"):
            clip_cells(cells_in_bounds(self.TRIANGLE.bounds), self.TRIANGLE, "within")

    def test_grid_for_boundary_triangle(self) -> None:
        ids = grid_for_boundary(self.TRIANGLE)
        assert len(ids) == 6
        assert np.all(np.diff(ids) > 0)

    def test_grid_for_amsterdam(self, amsterdam: np.ndarray) -> None:
        # The municipality is about 219 km2 of land + 24 km2 of water: ~24.3k cells.
        assert 24_000 <= len(amsterdam) <= 24_700
        assert amsterdam.dtype == np.int64
        assert np.all(np.diff(amsterdam) > 0)  # sorted and unique
        # The hand-computed cell is in the Jordaan, inside the city.
        assert HAND_ID in amsterdam
        # Dam square (121 400, 487 400) is in; Haarlem (104 000, 488 000) is not.
        assert int(cell_id(121_400.0, 487_400.0)) in amsterdam
        assert int(cell_id(104_000.0, 488_000.0)) not in amsterdam


class TestNeighbours:
    W, E, S, N = HAND_ID - 10_000, HAND_ID + 10_000, HAND_ID - 1, HAND_ID + 1
    SW, SE, NW, NE = HAND_ID - 10_001, HAND_ID + 9_999, HAND_ID - 9_999, HAND_ID + 10_001

    def test_rook_order(self) -> None:
        out = neighbours(np.array([HAND_ID]), queen=False)
        assert out.shape == (1, 4)
        np.testing.assert_array_equal(out[0], [self.W, self.E, self.S, self.N])

    def test_queen_order(self) -> None:
        out = neighbours(np.array([HAND_ID]), queen=True)
        assert out.shape == (1, 8)
        np.testing.assert_array_equal(
            out[0], [self.W, self.E, self.S, self.N, self.SW, self.SE, self.NW, self.NE]
        )

    def test_neighbours_are_adjacent_squares(self) -> None:
        around = neighbours(np.array([HAND_ID]))[0]
        (centre,) = cell_polygons(np.array([HAND_ID]))
        assert np.all(shapely.touches(centre, cell_polygons(around)))
        cx, cy = cell_center(around)
        dx, dy = cx - 121350, cy - 487250
        np.testing.assert_array_equal(dx, [-100, 100, 0, 0, -100, 100, -100, 100])
        np.testing.assert_array_equal(dy, [0, 0, -100, 100, -100, -100, 100, 100])

    def test_within_masks_to_minus_one(self) -> None:
        within = np.array([HAND_ID, self.E, self.N, self.NE])  # a 2 x 2 block
        out = neighbours(np.array([HAND_ID, self.NE]), queen=True, within=within)
        np.testing.assert_array_equal(out[0], [-1, self.E, -1, self.N, -1, -1, -1, self.NE])
        np.testing.assert_array_equal(out[1], [self.N, -1, self.E, -1, HAND_ID, -1, -1, -1])
        assert out.dtype == np.int64

    def test_interior_city_cells_have_all_neighbours(self, amsterdam: np.ndarray) -> None:
        out = neighbours(amsterdam, queen=False, within=amsterdam)
        full = (out >= 0).all(axis=1)
        assert full.mean() > 0.9  # most of the city is interior
        assert not full.all()  # but the border cells lose some


class TestBlocks:
    @pytest.mark.parametrize(
        ("size", "expected"), [(1000, 1210487), (500, 2420974), (100, HAND_ID)]
    )
    def test_block_id(self, size: float, expected: int) -> None:
        assert int(block_id(np.array([HAND_ID]), size)[0]) == expected

    def test_block_of_1000_holds_100_cells(self) -> None:
        ids = cells_in_bounds((X0, Y0, X0 + 2000, Y0 + 1000))
        blocks, counts = np.unique(block_id(ids, 1000), return_counts=True)
        assert len(blocks) == 2
        np.testing.assert_array_equal(counts, [100, 100])
        blocks, counts = np.unique(block_id(ids, 500), return_counts=True)
        assert len(blocks) == 8
        assert np.all(counts == 25)

    @pytest.mark.parametrize("size", [150, 0, -1000, 1050])
    def test_bad_block_size_raises(self, size: float) -> None:
        with pytest.raises(ValueError, match="multiple of 100"):
            block_id(np.array([HAND_ID]), size)


class TestSpatialSplit:
    @pytest.mark.parametrize(
        ("fractions", "block_size"), [((0.7, 0.15, 0.15), 1000), ((0.6, 0.2, 0.2), 500)]
    )
    def test_blocks_whole_and_shares(
        self, amsterdam: np.ndarray, fractions: tuple[float, float, float], block_size: float
    ) -> None:
        split = spatial_split(amsterdam, fractions, block_size=block_size, seed=3)
        assert split.shape == amsterdam.shape
        assert set(np.unique(split)) == {"train", "val", "test"}
        per_block = pd.Series(split).groupby(block_id(amsterdam, block_size)).nunique()
        assert per_block.max() == 1, "a block was cut across splits"
        for name, fraction in zip(("train", "val", "test"), fractions, strict=True):
            assert abs((split == name).mean() - fraction) < 0.02, name

    def test_deterministic_per_seed(self, amsterdam: np.ndarray) -> None:
        a = spatial_split(amsterdam, seed=1)
        np.testing.assert_array_equal(a, spatial_split(amsterdam, seed=1))
        assert (a != spatial_split(amsterdam, seed=2)).any()

    def test_aligned_with_input_order(self, amsterdam: np.ndarray) -> None:
        order = np.random.default_rng(0).permutation(len(amsterdam))
        np.testing.assert_array_equal(
            spatial_split(amsterdam[order], seed=5), spatial_split(amsterdam, seed=5)[order]
        )

    def test_empty_split_allowed(self, amsterdam: np.ndarray) -> None:
        split = spatial_split(amsterdam, (0.8, 0.2, 0.0))
        assert "test" not in split
        assert np.all(spatial_split(amsterdam, (1.0, 0.0, 0.0)) == "train")

    @pytest.mark.parametrize(
        "fractions", [(0.5, 0.3, 0.1), (0.8, 0.3, -0.1), (0.5, 0.5), (0.25, 0.25, 0.25, 0.25)]
    )
    def test_bad_fractions_raise(self, fractions: tuple[float, ...]) -> None:
        with pytest.raises(ValueError, match="fractions"):
            spatial_split(np.array([HAND_ID]), fractions)  # type: ignore[arg-type]


class TestGeoParquet:
    @pytest.fixture
    def cells(self) -> gpd.GeoDataFrame:
        ids = cells_in_bounds((X0, Y0, X0 + 300, Y0 + 200))
        return to_geodataframe(ids, score=np.linspace(3.5, 4.5, len(ids)))

    def test_round_trip(self, tmp_path: Path, cells: gpd.GeoDataFrame) -> None:
        path = write_grid(cells, tmp_path / "sub" / "grid.parquet")
        assert path == tmp_path / "sub" / "grid.parquet"
        back = read_grid(path)
        assert back.crs == RD_NEW
        assert back["cell_id"].dtype == np.int64
        np.testing.assert_array_equal(back["cell_id"], cells["cell_id"])
        np.testing.assert_allclose(back["score"], cells["score"])
        assert back.geometry.geom_equals_exact(cells.geometry, tolerance=0).all()
        assert _files(path.parent) == ["grid.parquet"]  # no temp file left

    def test_overwrite(self, tmp_path: Path, cells: gpd.GeoDataFrame) -> None:
        path = tmp_path / "grid.parquet"
        write_grid(cells, path)
        write_grid(cells.iloc[:2], path)
        assert len(read_grid(path)) == 2
        assert _files(tmp_path) == ["grid.parquet"]

    def test_failed_write_keeps_old_file(self, tmp_path: Path, cells: gpd.GeoDataFrame) -> None:
        path = write_grid(cells, tmp_path / "grid.parquet")
        before = path.read_bytes()
        with pytest.raises(ValueError, match=re.escape(str(path))):
            write_grid(cells.drop(columns="cell_id"), path)
        assert path.read_bytes() == before
        assert _files(tmp_path) == ["grid.parquet"]

    def test_crash_mid_write_keeps_old_file(
        self, tmp_path: Path, cells: gpd.GeoDataFrame, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        path = write_grid(cells, tmp_path / "grid.parquet")
        before = path.read_bytes()

        def half_write(self: gpd.GeoDataFrame, target: Path, **kwargs: object) -> None:
            Path(target).write_bytes(b"PAR1 truncated")
            raise OSError("disk full")

        monkeypatch.setattr(gpd.GeoDataFrame, "to_parquet", half_write)
        with pytest.raises(OSError, match="disk full"):
            write_grid(cells.iloc[:1], path)
        assert path.read_bytes() == before
        assert _files(tmp_path) == ["grid.parquet"]

    def test_missing_file(self, tmp_path: Path) -> None:
        path = tmp_path / "nope.parquet"
        with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
            read_grid(path)

    def test_wrong_crs(self, tmp_path: Path, cells: gpd.GeoDataFrame) -> None:
        path = tmp_path / "wgs84.parquet"
        cells.to_crs("EPSG:4326").to_parquet(path)
        with pytest.raises(ValueError, match=re.escape(str(path)) + ".*EPSG:28992"):
            read_grid(path)

    def test_no_crs(self, tmp_path: Path, cells: gpd.GeoDataFrame) -> None:
        path = tmp_path / "nocrs.parquet"
        cells.set_crs(None, allow_override=True).to_parquet(path)
        with pytest.raises(ValueError, match=re.escape(str(path)) + ".*EPSG:28992"):
            read_grid(path)

    def test_missing_cell_id(self, tmp_path: Path, cells: gpd.GeoDataFrame) -> None:
        path = tmp_path / "noid.parquet"
        cells.rename(columns={"cell_id": "grid_id"}).to_parquet(path)
        with pytest.raises(ValueError, match=re.escape(str(path)) + ".*cell_id"):
            read_grid(path)

    @pytest.mark.parametrize("content", [b"grid_id,lbm\n1,4.1\n", b""], ids=["csv-text", "empty"])
    def test_not_parquet(self, tmp_path: Path, content: bytes) -> None:
        path = tmp_path / "grid.parquet"
        path.write_bytes(content)
        with pytest.raises(ValueError, match=re.escape(str(path)) + ".*not a readable GeoParquet"):
            read_grid(path)

    def test_plain_parquet_without_geometry(self, tmp_path: Path) -> None:
        path = tmp_path / "plain.parquet"
        pd.DataFrame({"cell_id": [HAND_ID]}).to_parquet(path)
        with pytest.raises(ValueError, match=re.escape(str(path))):
            read_grid(path)


def test_module_constants() -> None:
    assert grid.CELL_SIZE == 100.0
    assert grid.RD_NEW == "EPSG:28992"
