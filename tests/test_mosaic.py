"""Several tiles predicted as one scene: same result as the scene they were cut from."""

from __future__ import annotations

import warnings
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
import torch
from rasterio.windows import Window
from torch import nn

from rsseg.errors import DataError, UsageError
from rsseg.inference.mosaic import expand_scenes, mosaic_scene, plan_mosaic
from rsseg.inference.predict import InputSpec, PredictOptions
from rsseg.inference.run import plan_outputs, predict_scenes

from _predict_helpers import CLASSES, COLORS, one_torch_thread  # noqa: F401

GSD = 0.5
ORIGIN = (500000.0, 4000000.0)


def spec() -> InputSpec:
    return InputSpec(bands=[1, 2, 3], mean=[100.0] * 3, std=[50.0] * 3, class_names=CLASSES,
                     class_colors=COLORS)


def context_model() -> nn.Module:
    """5x5 convolutions: a pixel's class depends on its neighbours, so a window cut at a tile
    border would change the result; only windows that see across the border reproduce it."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 8, 5, padding=2), nn.ReLU(), nn.Conv2d(8, 4, 5, padding=2)).eval()


def write(path: Path, data: np.ndarray, *, col: float = 0, row: float = 0, gsd: float = GSD,
          nodata: float | None = 0, crs: str = "EPSG:32618") -> Path:
    transform = rasterio.Affine(gsd, 0, ORIGIN[0] + col * GSD, 0, -gsd, ORIGIN[1] - row * GSD)
    with rasterio.open(path, "w", driver="GTiff", height=data.shape[1], width=data.shape[2],
                       count=data.shape[0], dtype=data.dtype.name, nodata=nodata, crs=crs,
                       transform=transform) as dst:
        dst.write(data)
    return path


def smooth_scene(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Blobs a few pixels wide, so that the classes form regions that cross tile borders."""
    from scipy import ndimage

    noise = np.random.default_rng(seed).random((3, h, w))
    smooth = np.stack([ndimage.gaussian_filter(b, 3) for b in noise])
    smooth = (smooth - smooth.min()) / (np.ptp(smooth) + 1e-9)
    return (1 + smooth * 254).astype(np.uint8)


def cut(tmp: Path, data: np.ndarray, rows: list[int], cols: list[int]) -> list[Path]:
    """Tiles of ``data`` cut at these rows/cols, each with its own georeferencing."""
    tiles = []
    r_edges, c_edges = [0, *rows, data.shape[1]], [0, *cols, data.shape[2]]
    for i in range(len(r_edges) - 1):
        for j in range(len(c_edges) - 1):
            r0, r1, c0, c1 = r_edges[i], r_edges[i + 1], c_edges[j], c_edges[j + 1]
            tiles.append(write(tmp / f"tile_{i}_{j}.tif", data[:, r0:r1, c0:c1], col=c0, row=r0))
    return tiles


def opts(**kw) -> PredictOptions:
    kw.setdefault("progress", False)
    kw.setdefault("tile", 48)
    kw.setdefault("overlap", 12)
    return PredictOptions(**kw)


def normalized(gdf: gpd.GeoDataFrame) -> list[tuple[int, bytes]]:
    return sorted(zip(gdf["class_id"].tolist(), shapely.to_wkb(shapely.normalize(gdf.geometry.to_numpy()))))


def test_four_tiles_predicted_together_equal_the_scene(tmp_path: Path) -> None:
    data = smooth_scene(131, 117)
    data[:, 60:75, 10:30] = 0  # nodata that straddles a tile border
    scene = write(tmp_path / "scene.tif", data)
    tiles = cut(tmp_path, data, rows=[70], cols=[50])
    model = context_model()
    predict_scenes([scene], tmp_path / "one.gpkg", model, spec(), options=opts(), simplify=0,
                   raster=tmp_path / "one.tif", echo=lambda s: None)
    plans = predict_scenes(tiles, tmp_path / "city.gpkg", model, spec(), options=opts(), simplify=0,
                           raster=tmp_path / "city.tif", echo=lambda s: None)
    assert len(plans) == 1 and plans[0].vectors == tmp_path / "city.gpkg"
    with rasterio.open(tmp_path / "one.tif") as a, rasterio.open(tmp_path / "city.tif") as b:
        np.testing.assert_array_equal(a.read(1), b.read(1))
        assert a.transform == b.transform and a.crs == b.crs
    one, city = gpd.read_file(tmp_path / "one.gpkg", layer="one"), gpd.read_file(tmp_path / "city.gpkg", layer="city")
    # Polygons are whole across tile borders: exactly the scene's polygons.
    assert normalized(one) == normalized(city)
    # Regions crossing the tile borders exist (otherwise the test proves little).
    borders = shapely.union_all([shapely.LineString([(ORIGIN[0] + 50 * GSD, 0), (ORIGIN[0] + 50 * GSD, 1e8)]),
                                 shapely.LineString([(0, ORIGIN[1] - 70 * GSD), (1e7, ORIGIN[1] - 70 * GSD)])])
    assert (shapely.crosses(city.geometry.to_numpy(), borders)).sum() >= 5
    # The per-tile way cuts them: a tile's own prediction differs from the scene's near the border.
    predict_scenes([tiles[0]], tmp_path / "alone.tif", model, spec(), options=opts(), echo=lambda s: None)
    with rasterio.open(tmp_path / "alone.tif") as alone, rasterio.open(tmp_path / "one.tif") as a:
        assert (alone.read(1) != a.read(1, window=Window(0, 0, 50, 70))).any()


def test_stem_still_gives_one_output_per_scene(tmp_path: Path) -> None:
    tiles = cut(tmp_path, smooth_scene(40, 60), rows=[], cols=[30])
    plans = predict_scenes(tiles, tmp_path / "{stem}_classes.tif", context_model(), spec(),
                           options=opts(), echo=lambda s: None)
    assert [p.classes.name for p in plans] == ["tile_0_0_classes.tif", "tile_0_1_classes.tif"]
    with pytest.raises(UsageError, match="mosaic"):
        plan_outputs(tiles, tmp_path / "city.gpkg", tmp_path / "{stem}.tif", None, False)


def test_overlaps_take_the_first_valid_pixel_and_gaps_are_nodata(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    a = rng.integers(1, 256, (3, 20, 30)).astype(np.uint8)
    b = rng.integers(1, 256, (3, 20, 30)).astype(np.uint8)
    a[:, :5, 25:] = 0  # a's nodata inside the overlap: b shows through there
    first = write(tmp_path / "a.tif", a)
    second = write(tmp_path / "b.tif", b, col=20, row=10)  # overlaps a's lower right corner
    with mosaic_scene([str(first), str(second)]) as vrt, rasterio.open(vrt) as m:
        assert (m.height, m.width) == (30, 50)
        got, mask = m.read(), m.dataset_mask()
    want = np.zeros((3, 30, 50), np.uint8)
    want_mask = np.zeros((30, 50), np.uint8)
    want[:, 10:, 20:] = b
    want_mask[10:, 20:] = 255
    valid_a = (a != 0).all(axis=0)
    want[:, :20, :30] = np.where(valid_a, a, want[:, :20, :30])
    want_mask[:20, :30] |= np.where(valid_a, 255, 0).astype(np.uint8)
    np.testing.assert_array_equal(mask, want_mask)
    np.testing.assert_array_equal(got[:, mask > 0], want[:, want_mask > 0])
    # The same tiles in the other order: b wins the overlap.
    with mosaic_scene([str(second), str(first)]) as vrt, rasterio.open(vrt) as m:
        np.testing.assert_array_equal(m.read()[:, 10:20, 20:30], b[:, :10, :10])


def test_a_coarser_tile_is_resampled_onto_the_finest_grid(tmp_path: Path) -> None:
    fine = write(tmp_path / "fine.tif", np.full((3, 20, 20), 50, np.uint8))
    coarse = write(tmp_path / "coarse.tif", np.full((3, 10, 10), 200, np.uint8), col=20, gsd=2 * GSD)
    grid = plan_mosaic([str(fine), str(coarse)])
    assert (grid.width, grid.height) == (40, 20)
    assert grid.transform.a == GSD and grid.transform.e == -GSD
    with mosaic_scene([str(fine), str(coarse)]) as vrt, rasterio.open(vrt) as m:
        band = m.read(1)
        assert (band[:, :20] == 50).all() and (band[:, 20:] == 200).all()
        assert m.dataset_mask().all()


def test_different_crs_and_band_counts_are_refused_in_one_line(tmp_path: Path) -> None:
    a = write(tmp_path / "a.tif", np.ones((3, 8, 8), np.uint8))
    b = write(tmp_path / "b.tif", np.ones((3, 8, 8), np.uint8), col=8, crs="EPSG:32619")
    with pytest.raises(DataError, match=r"a.tif is in EPSG:32618 but b.tif in EPSG:32619") as err:
        plan_mosaic([str(a), str(b)])
    assert "\n" not in str(err.value)
    c = write(tmp_path / "c.tif", np.ones((4, 8, 8), np.uint8), col=8)
    with pytest.raises(DataError, match="same bands"):
        plan_mosaic([str(a), str(c)])


def test_folders_and_globs_expand_to_their_rasters_in_name_order(tmp_path: Path) -> None:
    tiles = cut(tmp_path, smooth_scene(20, 20), rows=[10], cols=[10])
    (tmp_path / "notes.txt").write_text("not a raster")
    assert expand_scenes([str(tmp_path)]) == sorted(str(t) for t in tiles)
    assert expand_scenes([str(tmp_path / "tile_1_*.tif")]) == [str(tiles[2]), str(tiles[3])]
    with pytest.raises(DataError, match="no file matches"):
        expand_scenes([str(tmp_path / "nothing_*.tif")])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no raster"):
        expand_scenes([str(empty)])


def test_cli_predicts_a_folder_of_tiles_into_one_geopackage(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from rsseg import create_model
    from rsseg.bundle import save_bundle
    from rsseg.cli import main

    from test_predict import spec_meta

    torch.manual_seed(0)
    bundle = tmp_path / "model.safetensors"
    save_bundle(bundle, create_model("unet-r18", num_classes=4, in_channels=3), spec_meta())
    folder = tmp_path / "tiles"
    folder.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cut(folder, smooth_scene(70, 90), rows=[40], cols=[45])
    r = CliRunner().invoke(main, ["predict", str(folder), "-o", str(tmp_path / "city.gpkg"),
                                  "--model", str(bundle), "--tile", "64", "--overlap", "16", "-q",
                                  "--rescale", "none"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["city.gpkg", "model.safetensors", "tiles"]
    gdf = gpd.read_file(tmp_path / "city.gpkg", layer="city")
    # The polygons cover exactly the mosaic's 70 x 90 pixels.
    assert gdf.geometry.area.sum() == pytest.approx(70 * 90 * GSD * GSD, rel=1e-6)


# ----------------------------------------------------------------------------- column stripes


@pytest.mark.parametrize("width,tile,overlap,max_width", [
    (1000, 64, 16, 200), (1000, 64, 0, 130), (777, 100, 60, 250), (300, 64, 16, 10), (50, 64, 16, 10),
])
def test_column_stripes_own_every_column_once_with_all_its_windows(width, tile, overlap, max_width) -> None:
    from rsseg.inference.predict import column_stripes
    from rsseg.inference.windows import window_grid

    columns = window_grid(tile, width, tile, overlap)[0]
    stripes = column_stripes(columns, width, max_width)
    assert stripes[0].left == 0 and stripes[-1].right == width
    assert all(a.right == b.left for a, b in zip(stripes, stripes[1:]))
    for s in stripes:
        assert s.left < s.right
        for x in range(s.left, s.right):
            covering = [j for j, w in enumerate(columns) if w.col <= x < w.col + w.width]
            assert covering and s.first <= min(covering) and max(covering) <= s.last


def test_a_scene_wider_than_the_buffer_budget_is_predicted_in_stripes_identically(tmp_path, monkeypatch) -> None:
    import rsseg.inference.predict as predict

    data = smooth_scene(70, 400, seed=2)
    data[:, 30:40, 100:300] = 0
    scene = write(tmp_path / "wide.tif", data)
    model = context_model()
    predict_scenes([scene], tmp_path / "one.tif", model, spec(), options=opts(),
                   confidence=tmp_path / "one_p.tif", echo=lambda s: None)
    widths = []
    real = predict._RowBuffer

    class Recording(real):
        def __init__(self, num_classes, height, width, *args, **kw):
            widths.append(width)
            super().__init__(num_classes, height, width, *args, **kw)

    monkeypatch.setattr(predict, "_RowBuffer", Recording)
    monkeypatch.setattr(predict, "stripe_width_limit", lambda classes, tile: 100)
    predict_scenes([scene], tmp_path / "striped.tif", model, spec(), options=opts(),
                   confidence=tmp_path / "striped_p.tif", echo=lambda s: None)
    assert len(widths) >= 4 and max(widths) <= 100
    for a, b in (("one.tif", "striped.tif"), ("one_p.tif", "striped_p.tif")):
        with rasterio.open(tmp_path / a) as x, rasterio.open(tmp_path / b) as y:
            np.testing.assert_array_equal(x.read(1), y.read(1))


def test_alpha_tagged_tiles_mask_like_the_scene_they_were_cut_from(tmp_path: Path) -> None:
    """RGBA tiles (alpha 0 = no data): the mosaic keeps the alpha as a mask, as the scene does."""
    from rasterio.enums import ColorInterp

    rgb = smooth_scene(60, 80, seed=4)
    alpha = np.full((1, 60, 80), 255, np.uint8)
    alpha[0, 20:45, 30:55] = 0  # straddles both tile borders
    data = np.concatenate([rgb, alpha])

    def rgba(path: Path, part: np.ndarray, col: int = 0, row: int = 0) -> Path:
        write(path, part, col=col, row=row, nodata=None)
        with rasterio.open(path, "r+") as ds:
            ds.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha]
        return path

    scene = rgba(tmp_path / "scene.tif", data)
    tiles = [rgba(tmp_path / f"t{i}{j}.tif", data[:, r0:r1, c0:c1], c0, r0)
             for i, (r0, r1) in enumerate(((0, 30), (30, 60))) for j, (c0, c1) in enumerate(((0, 40), (40, 80)))]
    model = context_model()
    predict_scenes([scene], tmp_path / "one.tif", model, spec(), options=opts(), echo=lambda s: None)
    predict_scenes(tiles, tmp_path / "city.tif", model, spec(), options=opts(), echo=lambda s: None)
    with rasterio.open(tmp_path / "one.tif") as a, rasterio.open(tmp_path / "city.tif") as b:
        one, city = a.read(1), b.read(1)
    assert (one[20:45, 30:55] == 255).all()
    np.testing.assert_array_equal(one, city)
