"""Blockwise polygonization with exact merging, coverage simplification, QGIS-ready files."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import warnings
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import rasterio.features
import shapely
import shapely.geometry
from click.testing import CliRunner
from rasterio.features import rasterize
from scipy import ndimage

from rsseg.errors import DataError, OutputError
from rsseg.inference import vectorize
from rsseg.inference.vectorize import (
    ClassInfo,
    class_info_from_raster,
    polygonize_pixels,
    polygonize_whole,
    read_classes_file,
    vectorize_raster,
    vectorize_to_file,
    write_vectors,
)

NAMES = ["road", "roof", "grass", "tree", "car"]
COLORS = [(128, 128, 128), (200, 0, 0), (0, 255, 255), (0, 150, 0), (255, 255, 0)]


def blobs(h: int, w: int, seed: int = 0, classes: int = 5) -> np.ndarray:
    """A class map with many regions of every size, including ones that wind across rows."""
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).random((h, w)), 2.5)
    return (noise * 80).astype(np.uint8) % classes


def write_classes(path: Path, classes: np.ndarray, *, crs="EPSG:32618", gsd=0.5, tags=True) -> Path:
    profile = dict(driver="GTiff", height=classes.shape[0], width=classes.shape[1], count=1,
                   dtype="uint8", nodata=255, crs=crs,
                   transform=rasterio.Affine(gsd, 0, 400000, 0, -gsd, 5000000))
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(classes, 1)
        if tags:
            dst.update_tags(RSSEG_CLASS_NAMES=json.dumps(NAMES),
                            RSSEG_CLASS_COLORS=json.dumps([list(c) for c in COLORS]))
    return path


def canonical(geoms, ids):
    """Polygons keyed so that the same set compares equal whatever the order."""
    keyed = sorted(zip(ids, geoms), key=lambda p: (p[0], p[1].area, p[1].centroid.x, p[1].centroid.y))
    return [k for k, _ in keyed], [g for _, g in keyed]


def salt_and_pepper(h: int, w: int, seed: int) -> np.ndarray:
    """Three classes of independent pixels: pinches (same class on diagonal corners) everywhere."""
    rng = np.random.default_rng(seed)
    return ((rng.random((h, w)) < 0.5).astype(np.uint8) + (rng.random((h, w)) < 0.2)).astype(np.uint8)


def normalized(geoms, ids):
    """(class, normalized WKB) pairs, sorted: equal only when every vertex is equal."""
    return sorted(zip(ids, shapely.to_wkb(shapely.normalize(np.asarray(geoms, dtype=object)))))


@pytest.mark.parametrize("kind", ["blobs", "salt_and_pepper"])
@pytest.mark.parametrize("block_rows, block_cols", [(2, None), (3, None), (16, None), (16, 16), (7, 11), (1, 1),
                                                    (50, 2)])
def test_seam_merge_gives_gdal_polygons_vertex_for_vertex(tmp_path, monkeypatch, kind, block_rows, block_cols):
    """The hand-written seam merge alone (GEOS's union, its fallback, is forbidden here) gives
    valid polygons equal, vertex for vertex, to whole-raster GDAL polygonization, across seam rows
    and seam columns (blocks down to one pixel, where four blocks meet at every corner), also
    where merging makes pinches between pieces that touched only at a corner."""
    seed = block_rows + (block_cols or 0)
    classes = blobs(110, 95, seed=seed) if kind == "blobs" else salt_and_pepper(61, 53, seed)
    classes[20:29, 5:20] = 255
    path = write_classes(tmp_path / "c.tif", classes)

    def no_union(*args, **kwargs):
        raise AssertionError("the seam merge fell back to shapely.union_all")

    monkeypatch.setattr(shapely, "union_all", no_union)
    monkeypatch.setattr(vectorize, "SMALL_MERGE_VERTICES", 0)  # small groups go to GEOS otherwise
    geoms_b, ids_b = polygonize_pixels(path, block_rows=block_rows, block_cols=block_cols)
    geoms_w, ids_w = polygonize_whole(path)
    assert shapely.is_valid(np.asarray(geoms_b, dtype=object)).all()
    assert normalized(geoms_b, ids_b) == normalized(geoms_w, ids_w)


def test_seam_merge_closes_a_hole_across_a_seam_and_splits_a_pinch():
    from rsseg.inference.seam_merge import merge_seam_pieces

    # Strips meet at row 2. Neither strip alone has a hole; the union has two: the 2 x 2 one
    # across the seam, and pixel (row 1, col 5), which touches the outside at one corner
    # (x 6, y 1), where the piece at (row 1, col 6) meets the upper piece only diagonally.
    picture = ["######.",
               "#..##.#",
               "#..####",
               "####..."]
    region = np.array([[c == "#" for c in row] for row in picture])
    pieces = []
    for top, bottom in [(0, 2), (2, 4)]:
        strip = np.zeros_like(region)
        strip[top:bottom] = region[top:bottom]
        labels, n = ndimage.label(strip)
        for geom, k in rasterio.features.shapes(labels.astype(np.int32), mask=labels > 0):
            pieces.append(shapely.geometry.shape(geom))
    assert len(pieces) == 3

    merged = merge_seam_pieces(pieces, [2])
    assert merged.is_valid and len(merged.interiors) == 2
    assert shapely.equals(merged, shapely.union_all(pieces))
    assert merged.area == region.sum()


def test_seam_merge_declines_pieces_that_are_not_one_region():
    """Two pieces that do not share a seam edge are not one region: the merge says so (None) and
    the caller falls back to a general union instead of inventing a polygon."""
    from rsseg.inference.seam_merge import merge_seam_pieces

    apart = [shapely.box(0, 0, 2, 2), shapely.box(3, 2, 5, 4)]
    corner = [shapely.box(0, 0, 2, 2), shapely.box(2, 2, 4, 4)]  # diagonal: 4-connectivity splits
    assert merge_seam_pieces(apart, [2]) is None
    assert merge_seam_pieces(corner, [2]) is None


@pytest.mark.parametrize("block_rows", [1, 7, 32, 1000])
def test_blockwise_polygons_equal_whole_raster_polygons(tmp_path, block_rows):
    classes = blobs(120, 90, seed=block_rows)
    classes[40:60, 10:30] = 255  # nodata inside, straddling block edges
    path = write_classes(tmp_path / "c.tif", classes)
    ids_b, geoms_b = canonical(*polygonize_pixels(path, block_rows=block_rows))
    ids_w, geoms_w = canonical(*polygonize_whole(path))
    assert ids_b == ids_w
    assert len(geoms_b) == len(geoms_w) > 50
    assert all(a.geom_type == "Polygon" for a in geoms_b)
    assert shapely.equals(np.array(geoms_b), np.array(geoms_w)).all()


def test_unsimplified_polygons_rasterize_back_exactly(tmp_path):
    classes = blobs(101, 77, seed=3)
    classes[:5, :] = 255
    path = write_classes(tmp_path / "c.tif", classes)
    gdf = vectorize_raster(path, simplify=0, block_rows=16)
    with rasterio.open(path) as ds:
        back = rasterize(zip(gdf.geometry, gdf.class_id), out_shape=classes.shape, transform=ds.transform,
                         fill=255, dtype="uint8")
        assert gdf.crs == ds.crs
    np.testing.assert_array_equal(back, classes)
    assert list(gdf.columns) == ["class_id", "class_name", "geometry", "area_m2"]
    assert (gdf.class_name == [NAMES[c] for c in gdf.class_id]).all()
    np.testing.assert_allclose(gdf.area_m2, gdf.geometry.area)


def test_simplification_keeps_shared_borders(tmp_path):
    classes = blobs(96, 80, seed=5)
    path = write_classes(tmp_path / "c.tif", classes)
    raw = vectorize_raster(path, simplify=0)
    simple = vectorize_raster(path, simplify=1.0, block_rows=30)
    assert len(simple) == len(raw)
    assert shapely.get_num_coordinates(simple.geometry).sum() < 0.9 * shapely.get_num_coordinates(raw.geometry).sum()
    union = shapely.union_all(simple.geometry.to_numpy())
    full = 96 * 80 * 0.25
    # No overlaps: the parts add up to the union. No gaps: the union is still the whole rectangle
    # (the outer boundary is not simplified).
    assert simple.area.sum() == pytest.approx(union.area, rel=1e-9)
    assert union.area == pytest.approx(full, rel=1e-9)
    assert union.geom_type == "Polygon" and len(union.interiors) == 0
    assert shapely.is_valid(simple.geometry.to_numpy()).all()


def test_min_area_in_square_metres_projected_and_geographic(tmp_path):
    classes = np.zeros((40, 40), np.uint8)
    classes[5:7, 5:7] = 1  # 4 px
    classes[20:30, 20:30] = 2  # 100 px
    path = write_classes(tmp_path / "utm.tif", classes, gsd=2.0)  # 4 m² per pixel
    gdf = vectorize_raster(path, simplify=0, min_area=100.0)
    assert sorted(gdf.class_id) == [0, 2]  # the 16 m² square is dropped, the 400 m² one kept
    assert gdf.set_index("class_id").area_m2[2] == pytest.approx(400.0)
    # Geographic: 1e-4 degree pixels near the equator are about 11.1 m x 11.1 m.
    geo = tmp_path / "geo.tif"
    with rasterio.open(geo, "w", driver="GTiff", height=40, width=40, count=1, dtype="uint8", nodata=255,
                       crs="EPSG:4326", transform=rasterio.Affine(1e-4, 0, 10.0, 0, -1e-4, 0.002)) as d:
        d.write(classes, 1)
    gdf = vectorize_raster(geo, simplify=0, min_area=1000.0)
    assert sorted(gdf.class_id) == [0, 2]
    assert gdf.set_index("class_id").area_m2[2] == pytest.approx(100 * 11.13 * 11.06, rel=0.01)


def test_geopackage_default_style_and_qml_beside_other_formats(tmp_path):
    path = write_classes(tmp_path / "c.tif", blobs(40, 40))
    info = class_info_from_raster(path)
    assert info.names == NAMES and info.colors == COLORS
    gdf = vectorize_raster(path, classes=info)
    write_vectors(gdf, tmp_path / "lc.gpkg", info)
    con = sqlite3.connect(tmp_path / "lc.gpkg")
    row = con.execute("SELECT f_table_catalog, f_table_schema, f_table_name, f_geometry_column, useAsDefault,"
                      " styleQML FROM layer_styles").fetchone()
    geom_col = con.execute("SELECT column_name FROM gpkg_geometry_columns WHERE table_name='lc'").fetchone()[0]
    con.close()
    assert row[:5] == ("", "", "lc", geom_col, 1)
    assert 'type="categorizedSymbol"' in row[5] and 'attr="class_id"' in row[5]
    for i, (r, g, b) in enumerate(COLORS):
        assert f'value="{i}" label="{NAMES[i]}"' in row[5] and f"{r},{g},{b},255" in row[5]
    back = gpd.read_file(tmp_path / "lc.gpkg", layer="lc")
    assert len(back) == len(gdf) and back.crs == gdf.crs
    files = write_vectors(gdf, tmp_path / "lc.geojson", info)
    assert files == [tmp_path / "lc.geojson", tmp_path / "lc.qml"] and "categorizedSymbol" in files[1].read_text()
    write_vectors(gdf, tmp_path / "lc.parquet", info)
    assert len(gpd.read_parquet(tmp_path / "lc.parquet")) == len(gdf)
    with pytest.raises(OutputError, match="--overwrite"):
        write_vectors(gdf, tmp_path / "lc.gpkg", info)
    with pytest.raises(OutputError, match="unknown output suffix"):
        write_vectors(gdf, tmp_path / "lc.shp", info)


def test_classes_file_and_raster_without_metadata(tmp_path):
    classes = blobs(30, 30, classes=3)
    path = write_classes(tmp_path / "plain.tif", classes, tags=False)
    info = class_info_from_raster(path)
    assert info.names == ["class_0", "class_1", "class_2"] and len(info.colors) == 3
    txt = tmp_path / "classes.txt"
    txt.write_text("water,0,0,255\nforest,0,128,0\nfield,255,255,0\n")
    assert read_classes_file(txt) == ClassInfo(["water", "forest", "field"], [(0, 0, 255), (0, 128, 0), (255, 255, 0)])
    js = tmp_path / "classes.json"
    js.write_text(json.dumps([{"name": "a", "color": [1, 2, 3]}, {"name": "b", "color": [4, 5, 6]}]))
    assert read_classes_file(js) == ClassInfo(["a", "b"], [(1, 2, 3), (4, 5, 6)])


def test_cli_vectorize_does_not_import_torch(tmp_path):
    """torch costs ~0.6 GB of RSS that `rsseg vectorize` does not need (issue 19)."""
    path = write_classes(tmp_path / "c.tif", blobs(50, 60))
    code = ("import sys; from click.testing import CliRunner; from rsseg.cli import main; "
            f"r = CliRunner().invoke(main, ['vectorize', {str(path)!r}, '-o', {str(tmp_path / 'v.gpkg')!r}, '-q']); "
            "assert r.exit_code == 0, r.output; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"
    assert (tmp_path / "v.gpkg").exists()


def test_cli_vectorize(tmp_path):
    from rsseg.cli import main

    path = write_classes(tmp_path / "c.tif", blobs(50, 60))
    r = CliRunner().invoke(main, ["vectorize", str(path), "-o", str(tmp_path / "v.fgb"), "--block-rows", "8", "-q"])
    assert r.exit_code == 0, r.output
    gdf = gpd.read_file(tmp_path / "v.fgb")
    assert set(gdf.class_name) <= set(NAMES) and (tmp_path / "v.qml").exists()
    (tmp_path / "not.tif").write_text("hello")
    r = CliRunner().invoke(main, ["vectorize", str(tmp_path / "not.tif"), "-o", str(tmp_path / "w.gpkg")])
    assert r.exit_code != 0 and r.output.startswith("rsseg: error:") and r.output.count("\n") == 1
    assert not (tmp_path / "w.gpkg").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(tmp_path / "f.tif", "w", driver="GTiff", height=4, width=4, count=1,
                           dtype="float32") as d:
            d.write(np.zeros((1, 4, 4), np.float32))
    with pytest.raises(DataError, match="not a uint8 class raster"):
        vectorize_raster(tmp_path / "f.tif")


def test_geopackage_version_iso_style_time_and_light_class_outline(tmp_path):
    """GPKG 1.2 (no version warning in QGIS 3.22's GDAL 3.6), ISO 8601 layer_styles.update_time,
    and an outline on light classes so that their legend swatch is not white on white."""
    import re

    from rsseg.inference.qgis_style import is_light

    path = write_classes(tmp_path / "c.tif", blobs(30, 30))
    info = ClassInfo(["impervious", "building", "car"], [(255, 255, 255), (0, 0, 255), (255, 255, 0)])
    write_vectors(vectorize_raster(path, classes=info), tmp_path / "lc.gpkg", info)
    con = sqlite3.connect(tmp_path / "lc.gpkg")
    (app_id,), (user_version,) = con.execute("PRAGMA application_id").fetchone(), con.execute("PRAGMA user_version").fetchone()
    (stamp, qml), = con.execute("SELECT update_time, styleQML FROM layer_styles").fetchall()
    con.close()
    assert app_id == 0x47504B47 and user_version == 10200
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", stamp), stamp
    assert [is_light(c) for c in info.colors] == [True, False, True]
    symbols = re.findall(r'<symbol type="fill" name="(\d)".*?</symbol>', qml)
    assert symbols == ["0", "1", "2"]
    blocks = qml.split('<symbol type="fill"')[1:]
    assert 'name="outline_style" value="solid"' in blocks[0] and 'name="outline_color" value="127,127,127,255"' in blocks[0]
    assert 'name="outline_style" value="no"' in blocks[1]
    assert 'name="outline_style" value="solid"' in blocks[2] and "127,127,0,255" in blocks[2]


def test_vector_style_beside_a_class_raster_of_the_same_name_warns(tmp_path):
    from rsseg.inference.rasterio_out import write_raster_style

    path = write_classes(tmp_path / "lc.tif", blobs(20, 20))
    write_raster_style(path, NAMES, COLORS)
    assert "<rasterrenderer" in (tmp_path / "lc.qml").read_text()
    gdf = vectorize_raster(path)
    with pytest.warns(UserWarning, match="lc.qml held the QGIS style of a class raster"):
        write_vectors(gdf, tmp_path / "lc.fgb", class_info_from_raster(path))
    assert "categorizedSymbol" in (tmp_path / "lc.qml").read_text()


def test_an_ungeoreferenced_class_raster_gives_polygons_where_qgis_draws_it(tmp_path):
    """No CRS, no geotransform: QGIS draws pixel (col, row) at (col, -row); so do the polygons."""
    import warnings as _warnings

    from rsseg.inference.vectorize import vectorize_raster

    classes = np.zeros((12, 20), np.uint8)
    classes[:4, :5] = 1  # the top-left block
    path = tmp_path / "plain.tif"
    with _warnings.catch_warnings():
        _warnings.simplefilter("ignore")
        with rasterio.open(path, "w", driver="GTiff", height=12, width=20, count=1, dtype="uint8") as dst:
            dst.write(classes, 1)
        gdf = vectorize_raster(path, simplify=0)
    block = gdf[gdf.class_id == 1].geometry.union_all()
    assert block.bounds == (0.0, -4.0, 5.0, 0.0)
    assert gdf.geometry.union_all().bounds == (0.0, -12.0, 20.0, 0.0)


# ----------------------------------------------------------------------------- streaming


def _read_back(path: Path) -> gpd.GeoDataFrame:
    if path.suffix == ".parquet":
        return gpd.read_parquet(path)
    return gpd.read_file(path, layer=path.stem) if path.suffix == ".gpkg" else gpd.read_file(path)


def _whole_in_map_units(path: Path):
    """Whole-raster polygonization moved to the raster's map coordinates (exact for these grids)."""
    geoms, ids = polygonize_whole(path)
    with rasterio.open(path) as ds:
        t = ds.transform
    return shapely.transform(np.asarray(geoms, dtype=object), lambda xy: xy * [t.a, t.e] + [t.c, t.f]), ids


@pytest.mark.parametrize("kind", ["blobs", "salt_and_pepper"])
@pytest.mark.parametrize("block_rows, block_cols", [(1, None), (2, None), (5, None), (16, None), (1000, None),
                                                    (16, 16), (5, 9), (1000, 8)])
def test_streamed_file_equals_whole_raster_polygonization(tmp_path, kind, block_rows, block_cols):
    """Unsimplified, the file written block by block holds exactly GDAL's whole-raster polygons
    (normalized WKB), with nodata holes inside, strips down to one row and blocks cut in columns."""
    seed = block_rows + (block_cols or 0)
    classes = blobs(90, 70, seed=seed) if kind == "blobs" else salt_and_pepper(57, 49, seed)
    classes[10:25, 5:30] = 255
    classes[40:44, 40:] = 255
    path = write_classes(tmp_path / "c.tif", classes)
    files, n = vectorize_to_file(path, tmp_path / "v.gpkg", simplify=0, block_rows=block_rows,
                                 block_cols=block_cols)
    back = _read_back(tmp_path / "v.gpkg")
    geoms, ids = _whole_in_map_units(path)
    assert n == len(back) == len(geoms)
    assert normalized(back.geometry.to_numpy(), back.class_id.tolist()) == normalized(geoms, ids)
    np.testing.assert_allclose(back.area_m2, back.geometry.area)


def _assert_valid_coverage(geoms: np.ndarray, valid_area: float, exact_union=None) -> None:
    assert shapely.is_valid(geoms).all()
    assert (shapely.get_type_id(geoms) == 3).all()  # polygons, none collapsed
    union = shapely.union_all(geoms)
    # No overlaps: the parts add up to their union; no gaps: the union is the valid area.
    assert shapely.area(geoms).sum() == pytest.approx(union.area, rel=1e-9)
    assert union.area == pytest.approx(valid_area, rel=1e-9)
    assert shapely.coverage_is_valid(geoms)  # neighbours share their vertices (noded)
    if exact_union is not None:  # nodata and scene edges are not simplified
        assert shapely.equals(union, exact_union)


@pytest.mark.parametrize("kind", ["blobs", "salt_and_pepper", "speckle"])
@pytest.mark.parametrize("block_rows, block_cols", [(1, None), (3, None), (16, None), (1000, None), (16, 16),
                                                    (3, 7), (1000, 12)])
def test_simplified_output_is_a_valid_coverage(tmp_path, kind, block_rows, block_cols):
    if kind == "blobs":
        classes = blobs(100, 80, seed=block_rows)
    elif kind == "salt_and_pepper":
        classes = salt_and_pepper(60, 50, block_rows)
    else:  # above the percolation threshold: one region with holes and pinches everywhere
        classes = (np.random.default_rng(block_rows).random((70, 60)) < 0.7).astype(np.uint8)
    classes[15:30, 10:35] = 255
    classes[:, :3] = 255
    path = write_classes(tmp_path / "c.tif", classes)
    raw = vectorize_raster(path, simplify=0)
    files, n = vectorize_to_file(path, tmp_path / "s.gpkg", block_rows=block_rows, block_cols=block_cols)
    simple = _read_back(tmp_path / "s.gpkg")
    assert n == len(simple) == len(raw)
    geoms = simple.geometry.to_numpy()
    _assert_valid_coverage(geoms, (classes != 255).sum() * 0.25, shapely.union_all(raw.geometry.to_numpy()))
    # Tiny blocks simplify a little less (a chain shared with a region still open keeps a vertex).
    kept = shapely.get_num_coordinates(geoms).sum() / shapely.get_num_coordinates(raw.geometry.to_numpy()).sum()
    assert kept < (0.9 if min(block_rows, block_cols or 1000) >= 12 else 0.96)
    np.testing.assert_allclose(simple.area_m2, simple.geometry.area)
    # The GeoDataFrame API runs the same pipeline.
    same = vectorize_raster(path, block_rows=block_rows, block_cols=block_cols)
    assert normalized(same.geometry.to_numpy(), same.class_id.tolist()) == normalized(geoms, simple.class_id.tolist())


@pytest.mark.parametrize("tolerance", [0.5, 1.0, 2.5])
def test_larger_tolerances_and_rectangular_pixels_keep_a_valid_coverage(tmp_path, tolerance):
    """Tolerances of several pixels (triangles that can hold lattice points inside, not only on
    their base) on pixels 0.5 m x 0.8 m."""
    classes = blobs(90, 90, seed=7, classes=3)
    classes[30:50, 30:50] = 255
    path = tmp_path / "c.tif"
    with rasterio.open(path, "w", driver="GTiff", height=90, width=90, count=1, dtype="uint8", nodata=255,
                       crs="EPSG:32618", transform=rasterio.Affine(0.5, 0, 400000, 0, -0.8, 5000000)) as dst:
        dst.write(classes, 1)
    raw = vectorize_raster(path, simplify=0)
    simple = vectorize_raster(path, simplify=tolerance, block_rows=11)
    geoms = simple.geometry.to_numpy()
    _assert_valid_coverage(geoms, (classes != 255).sum() * 0.4, shapely.union_all(raw.geometry.to_numpy()))
    assert len(simple) == len(raw)


def test_streamed_writer_holds_a_bounded_number_of_polygons(tmp_path, monkeypatch):
    """Polygons reach the writer strip by strip while the raster is still being read, in batches
    of about one strip's polygons; the pieces held open do not grow with the raster's height."""
    from rsseg.inference import vectorize as v

    events: list[tuple[str, int]] = []
    real_read, real_write = v._BlockPolygonizer._read_block, v._write_stream

    def read_block(self, top, left, n, m):
        events.append(("read", len(self.pieces)))
        return real_read(self, top, left, n, m)

    def write_stream(staged, driver, layer, crs_wkt, batches):
        def counted():
            for batch in batches:
                events.append(("write", batch.num_rows))
                yield batch
        real_write(staged, driver, layer, crs_wkt, counted())

    monkeypatch.setattr(v._BlockPolygonizer, "_read_block", read_block)
    monkeypatch.setattr(v, "_write_stream", write_stream)
    peaks = {}
    for height in (160, 640):
        events.clear()
        path = write_classes(tmp_path / f"c{height}.tif", blobs(height, 60, seed=1))
        _, n = vectorize_to_file(path, tmp_path / f"v{height}.gpkg", block_rows=8)
        reads = [held for what, held in events if what == "read"]
        writes = [rows for what, rows in events if what == "write"]
        assert len(reads) == height // 8 and sum(writes) == n
        assert len(writes) >= len(reads) - 2  # a batch after (nearly) every strip
        first_write = next(i for i, (what, _) in enumerate(events) if what == "write")
        assert sum(what == "read" for what, _ in events[first_write:]) >= len(reads) - 2  # streamed
        assert max(writes) <= 3 * n / len(reads)  # never much more than a strip's polygons at once
        peaks[height] = max(reads)
    assert peaks[640] <= 1.5 * peaks[160] + 10  # open pieces: bounded by the width, not the height


@pytest.mark.parametrize("suffix", [".gpkg", ".fgb", ".parquet"])
def test_an_error_midway_leaves_no_output_and_no_partial(tmp_path, monkeypatch, suffix):
    from rsseg.inference import vectorize as v

    path = write_classes(tmp_path / "c.tif", blobs(120, 60, seed=2))
    real_read = v._BlockPolygonizer._read_block
    calls = []

    def failing_read(self, top, left, n, m):
        calls.append(top)
        if len(calls) == 5:
            raise DataError("the disk went away")
        return real_read(self, top, left, n, m)

    monkeypatch.setattr(v._BlockPolygonizer, "_read_block", failing_read)
    out = tmp_path / f"v{suffix}"
    with pytest.raises(DataError, match="disk went away"):
        vectorize_to_file(path, out, block_rows=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.tif"]  # no output, no partial, no .qml
    monkeypatch.setattr(v._BlockPolygonizer, "_read_block", real_read)
    files, n = vectorize_to_file(path, out, block_rows=10)
    assert files[0] == out and len(_read_back(out)) == n > 0


def test_default_blocks_are_about_16_mpx_and_square_on_wide_rasters():
    """Up to 4096 columns, full-width strips; wider rasters are cut into columns too, so a
    block's working set stays that of a 4096 x 4096 block however wide the raster."""
    from rsseg.inference.vectorize import auto_block_shape

    assert auto_block_shape(1000) == (16777, 1000)
    assert auto_block_shape(4096) == (4096, 4096)
    assert auto_block_shape(16384) == (4096, 4096)
    assert auto_block_shape(5000) == (6710, 2500)  # two equal columns, not 4096 + 904
    assert auto_block_shape(10) == (1677721, 10)
