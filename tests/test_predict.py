"""Streaming, blended, georeferenced large-scene prediction (rsseg.inference.predict / run)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from click.testing import CliRunner
from torch import nn

from rsseg.errors import BundleError, DataError, OutputError, UsageError
from rsseg.inference.predict import InputSpec, PredictOptions, predict_probs, predict_scene
from rsseg.inference.run import predict_scenes

from _predict_helpers import CLASSES, COLORS, one_torch_thread, per_pixel_model  # noqa: F401


def spec(mean=100.0, std=50.0, bands=(1, 2, 3), gsd_m=None) -> InputSpec:
    return InputSpec(bands=list(bands), mean=[mean] * len(bands), std=[std] * len(bands),
                     class_names=CLASSES, class_colors=COLORS, gsd_m=gsd_m)


def write_tif(path: Path, data: np.ndarray, *, nodata=0, crs="EPSG:32618", gsd=0.5) -> Path:
    profile = dict(driver="GTiff", height=data.shape[1], width=data.shape[2], count=data.shape[0],
                   dtype=data.dtype.name, nodata=nodata, crs=crs,
                   transform=rasterio.Affine(gsd, 0, 500000, 0, -gsd, 4000000))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data)
    return path


def random_scene(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 256, (3, h, w)).astype(np.uint8)


def whole_scene_reference(model: nn.Module, data: np.ndarray, s: InputSpec) -> tuple[np.ndarray, np.ndarray]:
    """The model on the whole scene in one pass (no windows), nodata -> 255."""
    x = (data.astype(np.float32) - np.float32(s.mean[0])) / np.float32(s.std[0])
    with torch.no_grad():
        probs = predict_probs(model, torch.from_numpy(x)[None])[0]
    classes = probs.argmax(0).numpy().astype(np.uint8)
    classes[(data == 0).all(axis=0)] = 255
    return classes, probs.max(0).values.numpy()


def read(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read(1)


def opts(**kw) -> PredictOptions:
    kw.setdefault("progress", False)
    return PredictOptions(**kw)


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("h,w", [(37, 53), (64, 64), (101, 67)])
@pytest.mark.parametrize("tile,overlap", [(16, 0), (16, 5), (32, 31), (128, 10)])
def test_tiled_blended_prediction_equals_one_pass(tmp_path, h, w, tile, overlap):
    data = random_scene(h, w, seed=h + w)
    scene = write_tif(tmp_path / "s.tif", data)
    model, s = per_pixel_model(), spec()
    predict_scene(scene, model, s, tmp_path / "c.tif", tmp_path / "p.tif",
                  opts(tile=tile, overlap=overlap, batch_size=3))
    ref_classes, ref_conf = whole_scene_reference(model, data, s)
    np.testing.assert_array_equal(read(tmp_path / "c.tif"), ref_classes)
    np.testing.assert_allclose(read(tmp_path / "p.tif"), ref_conf, rtol=1e-5, atol=1e-6)


def test_nodata_stays_nodata_and_borders_are_never_nodata(tmp_path):
    data = random_scene(90, 120, seed=3)
    data[:, 30:60, 40:80] = 0  # a nodata hole inside
    data[:, :, :20] = 0  # and a nodata strip that covers whole windows
    scene = write_tif(tmp_path / "s.tif", data)
    result = predict_scene(scene, per_pixel_model(), spec(), tmp_path / "c.tif", tmp_path / "p.tif",
                           opts(tile=16, overlap=4))
    out, conf = read(tmp_path / "c.tif"), read(tmp_path / "p.tif")
    nodata = (data == 0).all(axis=0)
    np.testing.assert_array_equal(out == 255, nodata)
    assert (conf[nodata] == -1).all() and (conf[~nodata] >= 1 / len(CLASSES) - 1e-6).all()
    assert result.windows_skipped > 0  # windows entirely inside the strip were never run
    # Scene border rows/columns that have data are classes, never nodata.
    for edge in (out[0, 20:], out[-1, 20:], out[:, -1]):
        assert (edge != 255).all()


def test_alpha_band_masks_like_nodata(tmp_path):
    data = random_scene(40, 50, seed=5)
    alpha = np.full((1, 40, 50), 255, np.uint8)
    alpha[0, 10:20, 10:30] = 0
    path = tmp_path / "rgba.tif"
    profile = dict(driver="GTiff", height=40, width=50, count=4, dtype="uint8", crs="EPSG:32618",
                   transform=rasterio.Affine(1, 0, 0, 0, -1, 100), photometric="RGB", alpha="YES")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.concatenate([data, alpha]))
    predict_scene(path, per_pixel_model(), spec(), tmp_path / "c.tif", None, opts(tile=16, overlap=4))
    np.testing.assert_array_equal(read(tmp_path / "c.tif") == 255, alpha[0] == 0)


@pytest.mark.parametrize("dtype,factor", [("uint16", 16.0), ("float32", 1 / 255)])
def test_uint16_and_float_inputs_use_the_bundle_normalisation(tmp_path, dtype, factor):
    data = random_scene(48, 40, seed=7)
    scaled = (data.astype(np.float64) * factor).astype(dtype)
    write_tif(tmp_path / "u8.tif", data)
    write_tif(tmp_path / "other.tif", scaled)
    model = per_pixel_model()
    predict_scene(tmp_path / "u8.tif", model, spec(), tmp_path / "a.tif", None, opts(tile=32, overlap=8))
    predict_scene(tmp_path / "other.tif", model, spec(100.0 * factor, 50.0 * factor), tmp_path / "b.tif",
                  None, opts(tile=32, overlap=8))
    a, b = read(tmp_path / "a.tif"), read(tmp_path / "b.tif")
    assert (a != 255).all()
    assert (a == b).mean() > 0.999  # float rounding of the scaled inputs may flip a near-tie


def test_class_raster_is_a_georeferenced_paletted_cog_with_names(tmp_path):
    data = random_scene(300, 280, seed=1)
    scene = write_tif(tmp_path / "s.tif", data)
    predict_scene(scene, per_pixel_model(), spec(), tmp_path / "c.tif", None, opts(tile=64, overlap=16))
    with rasterio.open(scene) as src, rasterio.open(tmp_path / "c.tif") as out:
        assert out.crs == src.crs and out.transform == src.transform
        assert (out.height, out.width) == (src.height, src.width)
        assert out.dtypes[0] == "uint8" and out.nodata == 255
        assert out.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert out.profile["tiled"] and out.compression is not None
        assert out.overviews(1)  # 300 px: at least one level
        assert out.colorinterp[0].name == "palette"
        assert [out.colormap(1)[i][:3] for i in range(4)] == COLORS
        assert json.loads(out.tags()["RSSEG_CLASS_NAMES"]) == CLASSES
    aux = (tmp_path / "c.tif.aux.xml").read_text()
    assert "<Category>forest</Category>" in aux
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch left



def test_class_raster_carries_names_in_the_tiff_and_a_qgis_style_of_only_the_classes(tmp_path):
    import re

    from rsseg.inference.rasterio_out import read_class_metadata

    scene = write_tif(tmp_path / "s.tif", random_scene(40, 30, seed=1))
    predict_scene(scene, per_pixel_model(), spec(), tmp_path / "c.tif", None, opts(tile=32, overlap=8))
    # Band metadata inside the TIFF: what survives a copy of the .tif alone (no .aux.xml).
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "c.tif").write_bytes((tmp_path / "c.tif").read_bytes())
    with rasterio.open(alone / "c.tif") as out:
        band = out.tags(1)
        assert len(out.colormap(1)) == 256  # a TIFF palette always has 256 entries
    assert [band[f"CLASS_{i}"] for i in range(4)] == CLASSES and band["CLASS_255"] == "nodata"
    assert [tuple(map(int, band[f"CLASS_{i}_COLOR"].split(","))) for i in range(4)] == COLORS
    assert read_class_metadata(alone / "c.tif") == (CLASSES, COLORS)
    # The QGIS default style beside it lists exactly the classes and nodata.
    qml = (tmp_path / "c.qml").read_text()
    entries = re.findall(r'<paletteEntry value="(\d+)" color="(#[0-9a-f]{6})" alpha="(\d+)" label="([^"]*)"', qml)
    assert entries == [(str(i), "#%02x%02x%02x" % c, "255", n) for i, (n, c) in enumerate(zip(CLASSES, COLORS))] + [
        ("255", "#000000", "0", "nodata")]
    assert 'type="paletted"' in qml and "nearestNeighbour" in qml


def test_resample_runs_at_training_gsd_and_writes_the_scene_grid(tmp_path):
    # A scene at 0.25 m; the bundle was trained at 0.5 m, so the model sees half as many pixels.
    data = np.repeat(np.repeat(random_scene(8, 10, seed=2), 8, axis=1), 8, axis=2)
    scene = write_tif(tmp_path / "s.tif", data, gsd=0.25)
    model = per_pixel_model()
    r = predict_scene(scene, model, spec(gsd_m=0.5), tmp_path / "c.tif", None, opts(tile=16, overlap=0))
    assert r.model_scale == pytest.approx(0.5)
    out = read(tmp_path / "c.tif")
    assert out.shape == (64, 80)
    r1 = predict_scene(scene, model, spec(gsd_m=0.5), tmp_path / "d.tif", None,
                       opts(tile=16, overlap=0, resample=False))
    assert r1.model_scale == 1.0 and r.windows_run < r1.windows_run
    # Blocky 8x8 content: running at half resolution agrees with full resolution almost everywhere.
    assert (out == read(tmp_path / "d.tif")).mean() > 0.9


def test_resampling_by_an_absurd_factor_is_refused(tmp_path):
    # A 30 m scene with a 9 cm model would be upsampled 333x: one clear line, no output.
    scene = write_tif(tmp_path / "s.tif", random_scene(8, 10, seed=2), gsd=30.0)
    with pytest.raises(UsageError, match="trained at 0.09 m .*--no-resample"):
        predict_scene(scene, per_pixel_model(), spec(gsd_m=0.09), tmp_path / "c.tif", None, opts(tile=16, overlap=0))
    assert not (tmp_path / "c.tif").exists()
    r = predict_scene(scene, per_pixel_model(), spec(gsd_m=0.09), tmp_path / "c.tif", None,
                      opts(tile=16, overlap=0, resample=False))
    assert r.model_scale == 1.0


def test_scene_without_crs_warns_once_and_works(tmp_path):
    data = random_scene(20, 20)
    scene = tmp_path / "nocrs.tif"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(scene, "w", driver="GTiff", height=20, width=20, count=3, dtype="uint8") as d:
            d.write(data)
    with pytest.warns(UserWarning, match="no CRS") as record:
        predict_scene(scene, per_pixel_model(), spec(), tmp_path / "c.tif", None, opts(tile=32, overlap=0))
    assert len([w for w in record if "no CRS" in str(w.message)]) == 1
    np.testing.assert_array_equal(read(tmp_path / "c.tif"), whole_scene_reference(per_pixel_model(), data, spec())[0])


# ----------------------------------------------------------------------------- failures


class _Interrupting(nn.Module):
    def __init__(self, inner: nn.Module, after: int) -> None:
        super().__init__()
        self.inner, self.after, self.calls = inner, after, 0

    def forward(self, x):
        self.calls += 1
        if self.calls > self.after:
            raise KeyboardInterrupt
        return self.inner(x)


def test_interrupted_run_leaves_no_output_that_looks_complete(tmp_path):
    scene = write_tif(tmp_path / "s.tif", random_scene(64, 64))
    with pytest.raises(KeyboardInterrupt):
        predict_scenes([scene], tmp_path / "out.gpkg", _Interrupting(per_pixel_model(), 2), spec_meta(),
                       options=opts(tile=16, overlap=0, batch_size=1), raster=tmp_path / "c.tif",
                       echo=lambda s: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.tif"]


def spec_meta():
    from rsseg.bundle import BundleMeta

    return BundleMeta(model_name="unet-r18", class_names=CLASSES, class_colors=[list(c) for c in COLORS],
                      ignore_index=4, bands=[1, 2, 3], band_names=["r", "g", "b"], mean=[100.0] * 3,
                      std=[50.0] * 3, patch_size=64)


def test_band_count_mismatch_names_both(tmp_path):
    scene = write_tif(tmp_path / "s.tif", random_scene(20, 20))
    s = spec(bands=(1, 2, 3, 4))
    with pytest.raises(DataError, match=r"s\.tif has 3 band\(s\).*4"):
        predict_scene(scene, per_pixel_model(4), s, tmp_path / "c.tif", None, opts())
    assert not (tmp_path / "c.tif").exists()


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from rsseg import create_model
    from rsseg.bundle import save_bundle

    torch.manual_seed(0)
    model = create_model("unet-r18", num_classes=4, in_channels=3)
    path = tmp_path_factory.mktemp("bundle") / "model.safetensors"
    save_bundle(path, model, spec_meta())
    return path


def run_cli(*args: str):
    from rsseg.cli import main

    return CliRunner().invoke(main, list(args))


def test_cli_predict_real_scene_to_styled_geopackage(tmp_path, bundle, rgb_byte_tif):
    import geopandas as gpd
    import sqlite3
    from rasterio.features import rasterize

    out, raster = tmp_path / "landcover.gpkg", tmp_path / "classes.tif"
    r = run_cli("predict", str(rgb_byte_tif), "-o", str(out), "--model", str(bundle), "--tile", "256",
                "--overlap", "32", "--raster", str(raster), "--simplify", "0", "-q")
    assert r.exit_code == 0, r.output
    with rasterio.open(rgb_byte_tif) as src, rasterio.open(raster) as cls:
        assert cls.crs.to_epsg() == 32618 and cls.transform == src.transform
        nodata = src.dataset_mask() == 0
        classes = cls.read(1)
    np.testing.assert_array_equal(classes == 255, nodata)
    gdf = gpd.read_file(out, layer="landcover")
    assert gdf.crs.to_epsg() == 32618
    assert set(gdf.columns) >= {"class_id", "class_name", "area_m2"}
    # Unsimplified polygons give the class raster back exactly, so none lies in the nodata area.
    back = rasterize(zip(gdf.geometry, gdf.class_id), out_shape=classes.shape, transform=cls.transform,
                     fill=255, dtype="uint8")
    np.testing.assert_array_equal(back, classes)
    np.testing.assert_allclose(gdf.area_m2, gdf.geometry.area)  # metres in EPSG:32618
    con = sqlite3.connect(out)
    rows = con.execute("SELECT f_table_name, f_geometry_column, f_table_schema, useAsDefault, styleQML "
                       "FROM layer_styles").fetchall()
    geom_col = con.execute("SELECT column_name FROM gpkg_geometry_columns").fetchone()[0]
    con.close()
    assert len(rows) == 1 and rows[0][:4] == ("landcover", geom_col, "", 1)
    assert 'attr="class_id"' in rows[0][4] and "0,128,0,255" in rows[0][4]


def test_cli_predict_errors_are_one_line(tmp_path, bundle):
    scene = write_tif(tmp_path / "s.tif", random_scene(20, 20))
    (tmp_path / "exists.tif").write_bytes(b"x")
    (tmp_path / "junk.tif").write_text("not a raster")
    bad_bundle = tmp_path / "bad.safetensors"
    bad_bundle.write_bytes(bundle.read_bytes()[:-100])
    four = write_tif(tmp_path / "two.tif", random_scene(20, 20)[:2])
    cases = [
        (["-o", str(tmp_path / "x.shp")], "unknown output suffix"),
        (["-o", str(tmp_path / "exists.tif")], "--overwrite"),
        (["-o", str(tmp_path / "nope" / "x.tif")], "does not exist"),
        (["-o", str(tmp_path / "x.tif"), "--model", str(bad_bundle)], str(bad_bundle.name)),
    ]
    for extra, message in cases:
        args = ["predict", str(scene)] + extra
        if "--model" not in extra:
            args += ["--model", str(bundle)]
        r = run_cli(*args, "-q")
        assert r.exit_code != 0 and message in r.output, (extra, r.output)
        assert r.output.count("\n") == 1 and r.output.startswith("rsseg: error:")
    for bad, message in ((tmp_path / "junk.tif", "not a raster"), (four, "has 2 band(s)")):
        r = run_cli("predict", str(bad), "-o", str(tmp_path / "y.tif"), "--model", str(bundle), "-q")
        assert r.exit_code != 0 and message in r.output, r.output
    assert not (tmp_path / "x.tif").exists() and not (tmp_path / "y.tif").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    if os.geteuid() != 0:  # root can write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        r = run_cli("predict", str(scene), "-o", str(ro / "x.tif"), "--model", str(bundle))
        assert r.exit_code != 0 and "not writable" in r.output


def test_cli_predict_many_scenes_one_model_load(tmp_path, bundle):
    a = write_tif(tmp_path / "a.tif", random_scene(40, 30, 1))
    b = write_tif(tmp_path / "b.tif", random_scene(30, 50, 2))
    r = run_cli("predict", str(a), str(b), "-o", str(tmp_path / "{stem}_classes.tif"), "--model", str(bundle),
                "--tile", "64", "--overlap", "0", "--confidence", str(tmp_path / "{stem}_conf.tif"), "-q")
    assert r.exit_code == 0, r.output
    assert read(tmp_path / "a_classes.tif").shape == (40, 30)
    assert read(tmp_path / "b_conf.tif").shape == (30, 50)


# ----------------------------------------------------------------------------- torchrun


_RANK_SCRIPT = """
import sys, torch
from torch import nn
sys.path.insert(0, {tests!r})
from test_predict import per_pixel_model, spec, opts
from rsseg.inference.predict import predict_scene, distributed_context
rank, world, barrier = distributed_context()
torch.set_num_threads(1)
predict_scene({scene!r}, per_pixel_model(), spec(), {out!r}, {conf!r}, opts(tile=16, overlap=6, batch_size=2),
              rank=rank, world_size=world, barrier=barrier)
"""


def test_torchrun_two_processes_match_one(tmp_path):
    data = random_scene(75, 61, seed=11)
    data[:, :10, :] = 0
    scene = write_tif(tmp_path / "s.tif", data)
    predict_scene(scene, per_pixel_model(), spec(), tmp_path / "one.tif", tmp_path / "one_p.tif",
                  opts(tile=16, overlap=6, batch_size=2))
    script = tmp_path / "ranks.py"
    script.write_text(_RANK_SCRIPT.format(tests=str(Path(__file__).parent), scene=str(scene),
                                          out=str(tmp_path / "two.tif"), conf=str(tmp_path / "two_p.tif")))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc-per-node", "2", str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
        raise
    assert proc.returncode == 0, stderr[-8000:]  # the failing rank's own message, not only torchrun's
    np.testing.assert_array_equal(read(tmp_path / "two.tif"), read(tmp_path / "one.tif"))
    np.testing.assert_array_equal(read(tmp_path / "two_p.tif"), read(tmp_path / "one_p.tif"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
