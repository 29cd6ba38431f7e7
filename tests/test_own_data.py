"""Own data: scenes in two CRSs (uint16, 4 bands) with a GeoPackage of polygons (with holes) in a
third CRS, or a class raster at another resolution -> prepared patches, a dataset spec, a spatial
validation split, training and prediction of a held-out scene; bad input is one line."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
import yaml
from pyproj import Transformer
from rasterio.transform import from_origin
from torch import nn

from rsseg.data.layouts import DataWarning
from rsseg.data.own import prepare_own
from rsseg.data.prepare import read_manifest
from rsseg.data.specs import SPEC_FILE, spec_for
from rsseg.errors import DataError, UsageError

CLASSES = ["field", "forest", "water"]  # sorted names = class ids 0, 1, 2; ignore = 3
IGNORE = 3
SIZE = 128  # scene side in pixels (1 m)
PATCH = 32
# Scene origins (upper-left) in UTM 33N; scene B is written in ETRS89-LAEA (EPSG:3035).
ORIGINS = {"a": (400000.0, 5800000.0 + SIZE), "b": (400400.0, 5800000.0 + SIZE),
           "c": (400800.0, 5800000.0 + SIZE)}
CRS_OF = {"a": "EPSG:32633", "b": "EPSG:3035", "c": "EPSG:32633"}


def _polygons_utm(x0: float, y0: float) -> list[tuple[shapely.Geometry, str]]:
    """Label polygons of one scene in UTM metres (y0 = bottom edge), in burn order."""
    field = shapely.Polygon(
        [(x0 + 8, y0 + 8), (x0 + 120, y0 + 8), (x0 + 120, y0 + 120), (x0 + 8, y0 + 120)],
        holes=[[(x0 + 40, y0 + 40), (x0 + 88, y0 + 40), (x0 + 88, y0 + 88), (x0 + 40, y0 + 88)]],
    )
    water = shapely.box(x0 + 52, y0 + 52, x0 + 76, y0 + 76)  # inside the hole; a ring stays unlabelled
    forest = shapely.Polygon([(x0 + 90, y0 + 10), (x0 + 126, y0 + 14), (x0 + 118, y0 + 60), (x0 + 92, y0 + 50)],
                             holes=[[(x0 + 100, y0 + 20), (x0 + 110, y0 + 20), (x0 + 110, y0 + 30), (x0 + 100, y0 + 30)]])
    return [(field, "field"), (water, "water"), (forest, "forest")]  # forest over field where both


def _to_crs(geom: shapely.Geometry, src: str, dst: str) -> shapely.Geometry:
    t = Transformer.from_crs(src, dst, always_xy=True)
    # Densify first: edges stay straight in metres, so the 4326 copy bends with them.
    return shapely.transform(shapely.segmentize(geom, 1.0), lambda xy: np.column_stack(t.transform(xy[:, 0], xy[:, 1])))


def _scene_grid(key: str):
    """(crs, transform) of a scene: 1 m pixels; B's origin is A's neighbour moved into EPSG:3035."""
    x, y = ORIGINS[key]
    if CRS_OF[key] != "EPSG:32633":
        x, y = Transformer.from_crs("EPSG:32633", CRS_OF[key], always_xy=True).transform(x, y)
        x, y = round(x), round(y)
    return CRS_OF[key], from_origin(x, y, 1.0, 1.0)


def truth_labels(crs: str, transform, shape, polygons_4326) -> tuple[np.ndarray, np.ndarray]:
    """Independent rasterization: pixel centres to EPSG:4326, point-in-polygon in burn order.
    Also flags centres within 0.75 m of a polygon edge, where any rasterizer may differ."""
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    xs, ys = rasterio.transform.xy(transform, rows.ravel(), cols.ravel(), offset="center")
    lon, lat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform(np.asarray(xs), np.asarray(ys))
    to_m = Transformer.from_crs(crs, "EPSG:32633", always_xy=True)
    mx, my = to_m.transform(np.asarray(xs), np.asarray(ys))
    labels = np.full(rows.size, IGNORE, np.uint8)
    near_edge = np.zeros(rows.size, bool)
    for geom, name in polygons_4326:
        labels[shapely.contains_xy(geom, lon, lat)] = CLASSES.index(name)
        edge_m = _to_crs(geom, "EPSG:4326", "EPSG:32633").boundary
        near_edge |= shapely.distance(edge_m, shapely.points(mx, my)) < 0.75
    return labels.reshape(shape), near_edge.reshape(shape)


def _paint(labels: np.ndarray, seed: int) -> np.ndarray:
    """uint16 4-band image whose values say the class (12-bit-like range), unlabelled darker."""
    rng = np.random.default_rng(seed)
    base = np.array([[900, 1100, 1300, 1500], [2400, 2100, 1800, 3000],
                     [3200, 3500, 2600, 1200], [400, 400, 400, 400]], np.float64)
    image = base[labels].transpose(2, 0, 1) + rng.normal(0, 60, (4,) + labels.shape)
    return np.clip(image, 0, 4095).astype(np.uint16)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("own")
    polys_4326 = []
    for key in "ab":
        x, top = ORIGINS[key]
        polys_4326 += [(_to_crs(g, "EPSG:32633", "EPSG:4326"), n) for g, n in _polygons_utm(x, top - SIZE)]
    truth = {}
    for key in "abc":
        crs, transform = _scene_grid(key)
        if key == "c":  # the held-out scene has its own polygons, only used to paint and score
            x, top = ORIGINS[key]
            polys = [(_to_crs(g, "EPSG:32633", "EPSG:4326"), n) for g, n in _polygons_utm(x, top - SIZE)]
        else:
            polys = polys_4326
        labels, edge = truth_labels(crs, transform, (SIZE, SIZE), polys)
        truth[key] = (labels, edge)
        folder = root / ("holdout" if key == "c" else "images")
        folder.mkdir(exist_ok=True)
        with rasterio.open(folder / f"scene_{key}.tif", "w", driver="GTiff", width=SIZE, height=SIZE, count=4,
                           dtype="uint16", crs=crs, transform=transform) as dst:
            dst.write(_paint(labels, seed=ord(key)))
    frame = gpd.GeoDataFrame({"landcover": [n for _, n in polys_4326]},
                             geometry=[g for g, _ in polys_4326], crs="EPSG:4326")
    frame.to_file(root / "labels.gpkg", driver="GPKG")
    return {"root": root, "truth": truth, "polygons": polys_4326}


def _prepare(scenes, out: Path, **kw) -> Path:
    args = dict(label_field="landcover", patch=PATCH, block=64, val_fraction=0.25, seed=3, progress=False)
    args.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        return prepare_own(str(scenes["root"] / "images" / "*.tif"), scenes["root"] / "labels.gpkg", out, **args)


@pytest.fixture(scope="module")
def prepared(scenes) -> Path:
    return _prepare(scenes, scenes["root"] / "prepared")


def _patches(manifest, split=None):
    for tile_id, entry in manifest["tiles"].items():
        if split is None or entry["split"] == split:
            for p in entry["patches"]:
                yield tile_id, entry, p


def test_patch_labels_equal_an_independent_rasterization(prepared, scenes):
    manifest = read_manifest(prepared)
    assert manifest["classes"] == CLASSES and manifest["ignore_index"] == IGNORE
    checked = edge_mismatch = 0
    for _, entry, p in _patches(manifest):
        key = Path(entry["image"]).stem[-1]
        labels, edge = scenes["truth"][key]
        col, row, w, h = p["window"]
        with rasterio.open(prepared / p["label"]) as src:
            got = src.read(1)
            assert src.crs == rasterio.crs.CRS.from_string(CRS_OF[key])
            assert src.transform == _scene_grid(key)[1] * rasterio.Affine.translation(col, row)
        with rasterio.open(prepared / p["image"]) as src:
            assert src.count == 4 and src.dtypes[0] == "uint16"
        want = labels[row : row + h, col : col + w]
        off = got[:h, :w] != want
        assert not off[~edge[row : row + h, col : col + w]].any()  # away from edges: identical
        edge_mismatch += int(off.sum())
        checked += w * h
        assert (got[h:, :] == IGNORE).all() and (got[:, w:] == IGNORE).all()  # padding is ignore
    assert checked > 2 * SIZE * SIZE * 0.5 and edge_mismatch < 0.01 * checked
    # Unlabelled ring inside the hole, hole of the forest: ignore, never class 0.
    labels_a = scenes["truth"]["a"][0]
    assert labels_a[SIZE - 46, 46] == IGNORE and labels_a[SIZE - 64, 64] == CLASSES.index("water")


def test_dataset_spec_file_carries_classes_bands_and_statistics(prepared):
    spec = spec_for("vaihingen", prepared)  # the folder's spec wins over the default dataset
    assert spec.name == "prepared" and list(spec.classes) == CLASSES
    assert spec.ignore_index == IGNORE and spec.bands().source_indexes == (1, 2, 3, 4)
    data = json.loads((prepared / SPEC_FILE).read_text())
    assert data["dtype"] == "uint16" and data["gsd_m"] == pytest.approx(1.0)
    # Mean of band 1 over labelled training pixels lies between the class values 900..3200.
    assert 900 < data["mean"][0] < 3200 and data["std"][0] > 100
    assert len(data["band_stats"]) == 4 and data["band_stats"][3]["max"] <= 4095


def test_validation_split_is_held_out_by_area(prepared, scenes):
    manifest = read_manifest(prepared)
    boxes = {"train": [], "val": []}
    for split in boxes:
        for _, entry, p in _patches(manifest, split):
            key = Path(entry["image"]).stem[-1]
            crs, transform = _scene_grid(key)
            col, row, w, h = p["window"]
            bc, br, bw, bh = entry["block_window"]
            assert bc <= col and col + w <= bc + bw and br <= row and row + h <= br + bh  # inside its block
            x0, y1 = transform * (col, row)
            x1, y0 = transform * (col + w, row + h)
            # The footprint itself (not its bounding box) in one CRS for both scenes.
            boxes[split].append(_to_crs(shapely.box(x0, y0, x1, y1), crs, "EPSG:4326"))
    assert len(boxes["val"]) >= 4 and len(boxes["train"]) > len(boxes["val"])
    val = shapely.union_all(boxes["val"])
    for box in boxes["train"]:
        # Touching is fine; a shared pixel row would be 3 % of a patch.
        assert box.intersection(val).area < 1e-4 * box.area
    # Seeded: the same seed draws the same blocks.
    again = _prepare(scenes, scenes["root"] / "again")
    assert read_manifest(again)["splits"] == manifest["splits"]


def test_class_raster_at_another_resolution_is_warped_nearest(scenes, tmp_path):
    # 2 m class raster over part of scene A (values 10, 20, 30; 0 = nodata; 99 = --ignore-value).
    crs, transform = _scene_grid("a")
    ox, oy = transform.c + 10, transform.f - 6
    values = np.zeros((50, 50), np.uint8)
    values[:, :20], values[:, 20:35], values[:, 35:] = 10, 20, 30
    values[5:10, 5:10] = 0
    values[30:35, 30:40] = 99
    path = tmp_path / "classes.tif"
    with rasterio.open(path, "w", driver="GTiff", width=50, height=50, count=1, dtype="uint8", crs=crs,
                       transform=from_origin(ox, oy, 2.0, 2.0), nodata=0) as dst:
        dst.write(values[None])
    out = tmp_path / "raster"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        prepare_own(str(scenes["root"] / "images" / "scene_a.tif"), path, out, ignore_value=99,
                    patch=PATCH, block=64, val_fraction=0.25, progress=False)
    manifest = read_manifest(out)
    assert manifest["classes"] == ["10", "20", "30"]
    rows, cols = np.mgrid[0:SIZE, 0:SIZE]
    x = transform.c + cols + 0.5
    y = transform.f - rows - 0.5
    r, c = np.floor((oy - y) / 2).astype(int), np.floor((x - ox) / 2).astype(int)
    inside = (r >= 0) & (r < 50) & (c >= 0) & (c < 50)
    source = np.where(inside, values[r.clip(0, 49), c.clip(0, 49)], 0)
    want = np.select([source == 10, source == 20, source == 30], [0, 1, 2], IGNORE).astype(np.uint8)
    covered = np.zeros_like(want, bool)
    for _, entry, p in _patches(manifest):
        col, row, w, h = p["window"]
        with rasterio.open(out / p["label"]) as src:
            np.testing.assert_array_equal(src.read(1)[:h, :w], want[row : row + h, col : col + w])
        covered[row : row + h, col : col + w] = True
    assert (want != IGNORE).sum() > 5000 and covered[want != IGNORE].all()  # every labelled pixel is in a patch


def _warnings_of(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught if issubclass(w.category, DataWarning)]


def test_crs_repairs_and_empty_classes_are_one_warning_line_each(scenes, tmp_path):
    to_4326 = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)
    bowtie = shapely.Polygon([to_4326.transform(x, y) for x, y in
                              [(400010, 5800010), (400030, 5800030), (400030, 5800010), (400010, 5800030)]])
    assert not bowtie.is_valid  # self-intersecting
    frame = gpd.GeoDataFrame({"landcover": [n for _, n in scenes["polygons"]] + ["water"]},
                             geometry=[g for g, _ in scenes["polygons"]] + [bowtie], crs="EPSG:4326")
    frame.to_file(tmp_path / "bad.gpkg", driver="GPKG")
    (tmp_path / "classes.yaml").write_text(yaml.safe_dump(
        [{"name": "field", "color": "#ffff00"}, {"name": "forest", "color": [0, 128, 0]},
         {"name": "water", "color": [0, 0, 255]}, {"name": "snow", "color": [250, 250, 250]}]))
    messages = _warnings_of(lambda: prepare_own(
        str(scenes["root"] / "images"), tmp_path / "bad.gpkg", tmp_path / "out", label_field="landcover",
        classes=tmp_path / "classes.yaml", patch=PATCH, block=64, progress=False))
    assert any("reprojected" in m and "EPSG:4326" in m for m in messages)
    assert any("1 invalid label polygon(s) repaired" in m for m in messages)
    assert any("snow" in m and "no labelled pixels" in m for m in messages)
    assert all("\n" not in m for m in messages)
    spec = spec_for("vaihingen", tmp_path / "out")
    assert spec.classes == ("field", "forest", "water", "snow") and spec.colors[1] == (0, 128, 0)


@pytest.mark.parametrize("case", ["empty-glob", "no-field", "mixed-bands", "no-overlap"])
def test_bad_input_is_one_line_and_writes_nothing(scenes, tmp_path, case):
    images, labels, kw = str(scenes["root"] / "images" / "*.tif"), scenes["root"] / "labels.gpkg", {}
    kw["label_field"] = "landcover"
    error, words = DataError, ""
    if case == "empty-glob":
        images, words = str(tmp_path / "nothing" / "*.tif"), "matches no files"
    elif case == "no-field":
        kw["label_field"], error, words = "klass", UsageError, "no field 'klass'; its fields: landcover"
    elif case == "mixed-bands":
        with rasterio.open(tmp_path / "three.tif", "w", driver="GTiff", width=8, height=8, count=3, dtype="uint16",
                           crs="EPSG:32633", transform=_scene_grid("a")[1]) as dst:
            dst.write(np.zeros((3, 8, 8), np.uint16))
        images, words = [images, str(tmp_path / "three.tif")], "mixed band counts"
    else:
        images, words = str(scenes["root"] / "holdout" / "*.tif"), "do not overlap any image"
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        with pytest.raises(error, match=words) as info:
            prepare_own(images, labels, out, patch=PATCH, progress=False, **kw)
    assert "\n" not in str(info.value)
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def tiny_fcn(num_classes: int, in_channels: int, width: int = 16) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(width, num_classes, 1))


@pytest.fixture
def tiny_model():
    from rsseg.models import registry

    registry.register_model("test-own-fcn", paper="test fixture")(tiny_fcn)
    yield "test-own-fcn"
    registry._REGISTRY.pop("test-own-fcn", None)


def test_train_on_own_folder_and_predict_a_held_out_scene(prepared, scenes, tmp_path, tiny_model):
    import rsseg
    from rsseg.bundle import read_bundle_meta
    from rsseg.train.fit import train

    cfg = rsseg.train_config(None, data=str(prepared), model=tiny_model, max_steps=40, epochs=100,
                             batch_size=8, crop_size=PATCH, patch_size=PATCH, lr=2e-2, backbone_lr=2e-2,
                             scheduler="none", workers=0, out=str(tmp_path / "runs"), progress=False,
                             pretrained="", set_items=["augment.scales=[1.0]", "augment.mosaic_p=0"])
    result = train(cfg)
    meta = read_bundle_meta(result.bundle_path)
    assert meta.class_names == CLASSES and meta.ignore_index == IGNORE
    assert meta.bands == [1, 2, 3, 4] and meta.source_dtype == "uint16" and meta.dataset == "prepared"
    assert result.run_dir.name == f"{tiny_model}-prepared"
    out = tmp_path / "c.tif"
    rsseg.predict(scenes["root"] / "holdout" / "scene_c.tif", out, model=result.bundle_path, tile=64,
                  overlap=16)
    with rasterio.open(out) as src:
        predicted = src.read(1)
        assert src.crs == rasterio.crs.CRS.from_string(CRS_OF["c"])
    truth, edge = scenes["truth"]["c"]
    scored = (truth != IGNORE) & ~edge
    accuracy = float((predicted[scored] == truth[scored]).mean())
    assert accuracy > 0.9, accuracy
    # rsseg eval scores the user's dataset with the user's classes (its own spec file).
    scores = rsseg.evaluate(result.bundle_path, data_dir=prepared, split="val")
    assert scores.class_names == CLASSES and scores.pixels > 0 and scores.oa > 0.8


def test_cli_prepare_own_data_and_its_one_line_errors(scenes, tmp_path):
    from click.testing import CliRunner

    from rsseg.cli import main

    runner = CliRunner()
    images, labels = str(scenes["root"] / "images" / "*.tif"), str(scenes["root"] / "labels.gpkg")
    result = runner.invoke(main, ["prepare", "--images", images, "--labels", labels, "--label-field",
                                  "landcover", "--patch", "32", "--block", "64", "-o", str(tmp_path / "mine")])
    assert result.exit_code == 0, result.output
    assert "prepared mine (3 classes: field, forest, water; 4 bands)" in result.output
    assert "rsseg train --data" in result.output
    assert json.loads((tmp_path / "mine" / SPEC_FILE).read_text())["name"] == "mine"
    result = runner.invoke(main, ["prepare", "--images", images, "--labels", labels, "--label-field", "kind",
                                  "-o", str(tmp_path / "bad")])
    assert result.exit_code == 2 and "rsseg: error: " in result.output and "its fields: landcover" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "bad").exists()
    result = runner.invoke(main, ["prepare", "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--dataset NAME" in result.output


# ----------------------------------------------------------------------------- straight from scenes


def _scene_data(scenes, **kw):
    from rsseg.data.scene_sampling import scene_data

    args = dict(label_field="landcover", patch=PATCH, block=64, val_fraction=0.25, seed=3)
    args.update(kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        return scene_data(str(scenes["root"] / "images" / "*.tif"), scenes["root"] / "labels.gpkg", **args)


def test_scene_windows_use_torchgeo_and_match_own_rasterization(scenes, monkeypatch):
    import torchgeo.datasets
    import torchgeo.samplers

    from rsseg.data import scene_sampling
    from rsseg.data.own import VectorLabels

    assert scene_sampling.RandomGeoSampler is torchgeo.samplers.RandomGeoSampler
    assert scene_sampling.GridGeoSampler is torchgeo.samplers.GridGeoSampler
    assert issubclass(scene_sampling.SceneRaster, torchgeo.datasets.RasterDataset)
    calls = {"random": 0, "grid": 0, "read": 0}
    for cls, key in ((torchgeo.samplers.RandomGeoSampler, "random"), (torchgeo.samplers.GridGeoSampler, "grid")):
        original = cls.__iter__

        def counted(self, _original=original, _key=key):
            calls[_key] += 1
            return _original(self)

        monkeypatch.setattr(cls, "__iter__", counted)
    original_get = torchgeo.datasets.RasterDataset.__getitem__

    def counted_get(self, query):
        calls["read"] += 1
        return original_get(self, query)

    monkeypatch.setattr(torchgeo.datasets.RasterDataset, "__getitem__", counted_get)
    data = _scene_data(scenes)
    assert calls["random"] > 0 and calls["grid"] > 0 and calls["read"] > 0

    # Sampled training windows: image = the file's pixels (nothing resampled), label = own.py's
    # rasterization of the whole scene cut to the window, and the independent truth off edges.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        labels = VectorLabels([scenes["root"] / "labels.gpkg"], "landcover", None)
    assert len(data.train) > 0
    offsets = set()
    for i in range(0, len(data.train), 5):
        item = data.train.windows[i]
        scene, win = item.block.scene, item.window
        offsets.add((int(win.col_off) % 16, int(win.row_off) % 16))
        image, label = data.train.read(i)
        assert label.shape == (PATCH, PATCH) and image.shape == (4, PATCH, PATCH)
        full = labels.burn(rasterio.windows.Window(0, 0, scene.width, scene.height), scene)
        rows = slice(int(win.row_off), int(win.row_off) + PATCH)
        cols = slice(int(win.col_off), int(win.col_off) + PATCH)
        np.testing.assert_array_equal(label, full[rows, cols])
        with rasterio.open(scene.path) as src:
            np.testing.assert_array_equal(image, src.read(window=win).astype(np.float32))
        truth, edge = scenes["truth"][scene.path.stem[-1]]
        sure = ~edge[rows, cols]
        np.testing.assert_array_equal(label[sure], truth[rows, cols][sure])
    assert len(offsets) > 1  # random boxes, not a fixed patch grid
    # Every training sample is a fresh box inside the same training block.
    redrawn = [data.train.window_of(0) for _ in range(8)]
    assert all(w.block is data.train.windows[0].block for w in redrawn)
    assert len({(int(w.window.col_off), int(w.window.row_off)) for w in redrawn}) > 1
    item = redrawn[0]
    image, label = data.train.read(0, item)
    full = labels.burn(rasterio.windows.Window(0, 0, item.block.scene.width, item.block.scene.height),
                       item.block.scene)
    np.testing.assert_array_equal(label, full[int(item.window.row_off):int(item.window.row_off) + PATCH,
                                              int(item.window.col_off):int(item.window.col_off) + PATCH])
    sample = data.train[0]
    assert sample["image"].dtype.is_floating_point and sample["mask"].max() <= IGNORE


def test_scene_validation_windows_lie_only_in_validation_blocks(scenes, tmp_path):
    import shapely
    from rasterio.windows import bounds as window_bounds

    data = _scene_data(scenes)
    # The same block split as prepare_own with the same settings.
    prepared = _prepare(scenes, tmp_path / "same")
    manifest = read_manifest(prepared)
    val_blocks = {w.block.block_id for w in data.val.windows}
    assert val_blocks == set(manifest["splits"]["val"]) and val_blocks
    assert {w.block.block_id for w in data.train.windows} <= set(manifest["splits"]["train"])

    def footprint(w):
        return _to_crs(shapely.box(*window_bounds(w.window, w.block.scene.transform)),
                       w.block.scene.crs.to_string(), "EPSG:32633")

    for w in data.val.windows:
        b = w.block
        assert b.split == "val"
        assert b.window.col_off <= w.window.col_off and w.window.col_off + w.window.width <= \
            b.window.col_off + b.window.width
        assert b.window.row_off <= w.window.row_off and w.window.row_off + w.window.height <= \
            b.window.row_off + b.window.height
    val_area = shapely.union_all([footprint(w) for w in data.val.windows])
    for w in data.train.windows:
        assert w.block.split == "train"
        assert footprint(w).intersection(val_area).area < 1e-6


def test_train_straight_from_scenes_without_a_patch_folder(scenes, tmp_path, tiny_model):
    from click.testing import CliRunner

    from rsseg.bundle import read_bundle_meta
    from rsseg.cli import main

    before = sorted(p for p in scenes["root"].rglob("*") if "prepared" not in p.parts)
    classes = tmp_path / "classes.yaml"
    classes.write_text(yaml.safe_dump([{"name": "Water", "value": "water", "color": "#0000ff"},
                                       {"name": "Field", "value": "field"},
                                       {"name": "Forest", "value": "forest"}]))
    runner = CliRunner()
    result = runner.invoke(main, [
        "train", "--images", str(scenes["root"] / "images" / "*.tif"), "--labels",
        str(scenes["root"] / "labels.gpkg"), "--label-field", "landcover", "--classes", str(classes),
        "--model", tiny_model, "--max-steps", "3", "--epochs", "1", "--batch-size", "4",
        "--crop-size", str(PATCH), "--patch-size", str(PATCH), "--workers", "0", "--no-pretrained",
        "-o", str(tmp_path / "runs"), "--set", "augment.mosaic_p=0", "--set", "progress=false"])
    assert result.exit_code == 0, result.output
    bundles = list((tmp_path / "runs").rglob("best.safetensors"))
    assert len(bundles) == 1
    meta = read_bundle_meta(bundles[0])
    assert meta.class_names == ["Water", "Field", "Forest"] and meta.ignore_index == 3
    assert meta.class_colors[0] == [0, 0, 255]
    assert meta.bands == [1, 2, 3, 4] and len(meta.band_names) == 4 and len(meta.mean) == 4
    assert meta.source_dtype == "uint16" and meta.source_band_count == 4 and meta.band_stats
    assert 300 < min(meta.mean) and max(meta.mean) < 4096
    # Nothing was written next to the scenes: no patch folder, no manifest.
    after = sorted(p for p in scenes["root"].rglob("*") if "prepared" not in p.parts)
    assert after == before
    assert not list((tmp_path / "runs").rglob("manifest.json"))
