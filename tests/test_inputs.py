"""Real inputs, nothing lost (issue 15): inputs are never outputs, killed runs leave nothing,
ungeoreferenced and rotated scenes, one-line warnings, remote and virtual GDAL inputs."""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from click.testing import CliRunner

from rsseg.errors import OutputError, RssegWarning
from rsseg.inference.paths import gdal_path, remove_stale_partials, scene_stem
from rsseg.inference.predict import InputSpec, PredictOptions, open_scene, predict_scene, scene_gsd_m
from rsseg.inference.run import predict_scenes

from _predict_helpers import CLASSES, COLORS, one_torch_thread, per_pixel_model  # noqa: F401
TESTS = Path(__file__).parent




def spec(gsd_m=None) -> InputSpec:
    return InputSpec(bands=[1, 2, 3], mean=[120.0] * 3, std=[60.0] * 3, class_names=CLASSES,
                     class_colors=COLORS, gsd_m=gsd_m)


def write(path: Path, data: np.ndarray, transform=None, crs="EPSG:32618") -> Path:
    profile = dict(driver="GTiff", height=data.shape[1], width=data.shape[2], count=data.shape[0],
                   dtype=data.dtype.name, photometric="MINISBLACK")
    if transform is not None:
        profile.update(transform=transform, crs=crs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data)
    return path


def blocky(h: int, w: int, seed: int = 0) -> np.ndarray:
    small = np.random.default_rng(seed).integers(1, 256, (3, h // 8 + 1, w // 8 + 1)).astype(np.uint8)
    return np.repeat(np.repeat(small, 8, axis=1), 8, axis=2)[:, :h, :w].copy()


def north_up(gsd: float = 0.5) -> rasterio.Affine:
    return rasterio.Affine(gsd, 0, 500000, 0, -gsd, 4000000)


def opts(**kw) -> PredictOptions:
    kw.setdefault("progress", False)
    kw.setdefault("tile", 32)
    kw.setdefault("overlap", 8)
    return PredictOptions(**kw)


def run_cli(*args: str):
    from rsseg.cli import main

    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from rsseg import create_model
    from rsseg.bundle import BundleMeta, save_bundle

    torch.manual_seed(0)
    model = create_model("unet-r18", num_classes=4, in_channels=3)
    meta = BundleMeta(model_name="unet-r18", class_names=CLASSES, class_colors=[list(c) for c in COLORS],
                      ignore_index=4, bands=[1, 2, 3], band_names=["r", "g", "b"], mean=[100.0] * 3,
                      std=[50.0] * 3, patch_size=64, gsd_m=0.5)
    path = tmp_path_factory.mktemp("bundle") / "model.safetensors"
    save_bundle(path, model, meta)
    return path


# ----------------------------------------------------------------------------- inputs are never outputs


def test_output_that_is_the_input_is_refused_even_with_overwrite(tmp_path, bundle, monkeypatch):
    scene = write(tmp_path / "scene.tif", blocky(40, 40), north_up())
    before = scene.read_bytes()
    (tmp_path / "link.tif").symlink_to(scene)
    monkeypatch.chdir(tmp_path)
    cases = [
        ["-o", str(scene)],  # the same path
        ["-o", "scene.tif"],  # relative
        ["-o", str(tmp_path / "link.tif")],  # a symlink to it
        ["-o", str(tmp_path / "sub" / ".." / "scene.tif")],
        ["-o", str(tmp_path / "x.gpkg"), "--raster", "./scene.tif"],
        ["-o", str(tmp_path / "y.tif"), "--confidence", str(scene)],
    ]
    (tmp_path / "sub").mkdir()
    for extra in cases:
        r = run_cli("predict", "scene.tif", "--model", str(bundle), "--overwrite", "-q", *extra)
        assert r.exit_code != 0 and "is an input of this run" in r.output, (extra, r.output)
        assert r.output.count("\n") == 1
    assert scene.read_bytes() == before
    from rsseg.inference.run import plan_outputs

    weights = tmp_path / "weights.tif"  # the model bundle is an input too, whatever its name
    weights.write_bytes(b"x")
    with pytest.raises(OutputError, match="is an input"):
        plan_outputs(["scene.tif"], weights, None, None, True, inputs=[weights])
    assert plan_outputs(["scene.tif"], tmp_path / "new.tif", None, None, True, inputs=[weights])


# ----------------------------------------------------------------------------- killed runs

_SLOW_RUN = """
import sys, time, torch
from torch import nn
sys.path.insert(0, {tests!r})
from test_inputs import per_pixel_model, spec, opts
from rsseg.inference.run import predict_scenes

class Slow(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = per_pixel_model()
    def forward(self, x):
        time.sleep({delay})
        return self.inner(x)

torch.set_num_threads(1)
predict_scenes([{scene!r}], {out!r}, Slow(), spec(), options=opts(tile=16, overlap=0, batch_size=1),
               confidence={conf!r}, echo=lambda s: None)
"""


def _start(tmp_path: Path, scene: Path, out: Path, delay: float) -> subprocess.Popen:
    script = tmp_path / "slow.py"
    script.write_text(_SLOW_RUN.format(tests=str(TESTS), scene=str(scene), out=str(out),
                                       conf=str(out.parent / "conf.tif"), delay=delay))
    return subprocess.Popen([sys.executable, str(script)], env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_partials(proc: subprocess.Popen, folder: Path, timeout: float = 60) -> list[str]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        hidden = sorted(p.name for p in folder.iterdir() if f"-{proc.pid}" in p.name)
        if any(".partial-" in n for n in hidden) and any(n.startswith(".rsseg-") for n in hidden):
            return hidden  # this run's own partials (a scratch folder and the confidence raster)
        if proc.poll() is not None:
            raise AssertionError(f"run ended before writing: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no partial outputs appeared")


def test_sigkill_twice_then_a_run_leaves_only_the_outputs(tmp_path):
    scene = write(tmp_path / "s.tif", blocky(64, 64), north_up())
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / ".notes.partial-x.txt").write_text("not ours")  # no pid: never touched
    left = []
    for _ in range(2):
        proc = _start(tmp_path, scene, out_dir / "lc.gpkg", delay=0.5)
        left.append(_wait_for_partials(proc, out_dir))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    # The second run removed what the first left (its process is gone) before writing its own.
    now = {p.name for p in out_dir.iterdir()}
    assert not now & set(left[0])
    assert set(left[1]) <= now and any(n.startswith(".rsseg-") for n in now)
    proc = _start(tmp_path, scene, out_dir / "lc.gpkg", delay=0.0)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()[-3000:]
    assert sorted(p.name for p in out_dir.iterdir()) == [".notes.partial-x.txt", "conf.tif", "lc.gpkg"]


def test_sigterm_cleans_up_like_ctrl_c(tmp_path):
    scene = write(tmp_path / "s.tif", blocky(64, 64), north_up())
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = _start(tmp_path, scene, out_dir / "lc.gpkg", delay=0.5)
    _wait_for_partials(proc, out_dir)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    assert list(out_dir.iterdir()) == []


def test_partials_of_live_processes_are_kept(tmp_path):
    mine = tmp_path / f".x.partial-{os.getpid()}.tif"
    mine.write_bytes(b"")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = tmp_path / f".x.partial-{dead.pid}.tif"
    gone.write_bytes(b"")
    (tmp_path / f".x.partial-{dead.pid}.tif.aux.xml").write_text("<x/>")
    (tmp_path / f".rsseg-{dead.pid}-abc").mkdir()
    (tmp_path / "x.tif").write_bytes(b"")
    removed = remove_stale_partials(tmp_path)
    assert len(removed) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [mine.name, "x.tif"]


# ----------------------------------------------------------------------------- no georeferencing


def test_scene_without_georeferencing_lands_where_qgis_draws_it(tmp_path):
    import geopandas as gpd
    from rasterio.features import rasterize

    data = blocky(40, 56)
    scene = write(tmp_path / "tile.tif", data)  # no CRS, no geotransform (a Vaihingen tile)
    with pytest.warns(RssegWarning, match="no CRS and no geotransform") as record:
        predict_scenes([scene], tmp_path / "lc.gpkg", per_pixel_model(), spec(), options=opts(),
                       raster=tmp_path / "c.tif", simplify=0, echo=lambda s: None)
    georef = [w for w in record if "no CRS" in str(w.message)]
    assert len(georef) == 1  # one line per scene (not one more from vectorize)
    assert not [w for w in record if not issubclass(w.category, RssegWarning)]
    with rasterio.open(tmp_path / "c.tif") as cls:
        # QGIS draws a raster without a geotransform with pixel (col, row) at (col, -row).
        assert cls.transform == rasterio.Affine(1, 0, 0, 0, -1, 0) and cls.crs is None
        classes = cls.read(1)
    gdf = gpd.read_file(tmp_path / "lc.gpkg", layer="lc")
    minx, miny, maxx, maxy = gdf.total_bounds
    assert (minx, miny, maxx, maxy) == (0, -40, 56, 0)
    back = rasterize(zip(gdf.geometry, gdf.class_id), out_shape=classes.shape,
                     transform=rasterio.Affine(1, 0, 0, 0, -1, 0), fill=255, dtype="uint8")
    np.testing.assert_array_equal(back, classes)


# ----------------------------------------------------------------------------- rotated grids


def rotated(angle: float, gsd: float = 0.09) -> rasterio.Affine:
    return (rasterio.Affine.translation(500000, 4000000) * rasterio.Affine.rotation(angle)
            * rasterio.Affine.scale(gsd, -gsd))


@pytest.mark.parametrize("angle", [0, 30, 90, 217])
def test_rotated_scene_gsd_and_grid(tmp_path, angle):
    scene = write(tmp_path / "r.tif", blocky(40, 48), rotated(angle))
    with open_scene(scene) as src:
        assert scene_gsd_m(src) == pytest.approx(0.09, rel=1e-9)
    result = predict_scene(scene, per_pixel_model(), spec(gsd_m=0.09), tmp_path / "c.tif", None, opts())
    assert result.model_scale == 1.0  # no needless resampling
    with rasterio.open(scene) as src, rasterio.open(tmp_path / "c.tif") as out:
        assert out.transform.almost_equals(src.transform) and out.shape == src.shape


def test_no_resample_far_from_training_gsd_warns_once_with_both_figures(tmp_path):
    scene = write(tmp_path / "far.tif", blocky(24, 24), north_up(0.5))
    with pytest.warns(RssegWarning) as record:
        predict_scene(scene, per_pixel_model(), spec(gsd_m=0.09), tmp_path / "c.tif", None,
                      opts(resample=False))
    lines = [str(w.message) for w in record if "trained at" in str(w.message)]
    assert len(lines) == 1 and "0.5 m" in lines[0] and "0.09 m" in lines[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RssegWarning)  # 1.5x off: nothing to say
        predict_scene(write(tmp_path / "near.tif", blocky(24, 24), north_up(0.135)), per_pixel_model(),
                      spec(gsd_m=0.09), tmp_path / "d.tif", None, opts(resample=False))


# ----------------------------------------------------------------------------- warnings as one line


def test_cli_warnings_are_single_rsseg_lines(tmp_path, bundle):
    scene = write(tmp_path / "nogeo.tif", blocky(32, 32))
    r = run_cli("predict", str(scene), "-o", str(tmp_path / "lc.gpkg"), "--model", str(bundle),
                "--tile", "32", "--overlap", "0", "-q")
    assert r.exit_code == 0, r.output
    warning_lines = [line for line in r.output.splitlines() if "warning:" in line.lower()]
    assert len(warning_lines) == 1 and warning_lines[0].startswith("rsseg: warning: nogeo.tif has no CRS")
    assert ".py:" not in r.output


def test_vectorize_to_a_tif_says_why_without_listing_tif(tmp_path):
    classes = write(tmp_path / "c.tif", np.zeros((1, 8, 8), np.uint8), north_up())
    r = run_cli("vectorize", str(classes), "-o", str(tmp_path / "x.tif"))
    assert r.exit_code != 0 and "writes polygons, not a raster" in r.output
    assert ".gpkg" in r.output and ".tif" not in r.output.split("use one of")[1]


# ----------------------------------------------------------------------------- remote and virtual


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with HTTP Range support (what GDAL's /vsicurl/ reads with)."""

    def log_message(self, *args) -> None:
        pass

    def send_head(self):
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return None
        data = path.read_bytes()
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            start, end = int(a), min(int(b) if b else len(data) - 1, len(data) - 1)
            body = data[start : end + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        self.send_header("Content-Type", "image/tiff")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        import io

        return io.BytesIO(body)


def test_predict_a_geotiff_served_over_http(tmp_path, monkeypatch):
    served = tmp_path / "www"
    served.mkdir()
    data = blocky(40, 48)
    write(served / "remote.tif", data, north_up())
    write(tmp_path / "local.tif", data, north_up())
    handler = lambda *a, **kw: _RangeHandler(*a, directory=str(served), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.timeout = 1
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/remote.tif"
        with rasterio.Env(GDAL_DISABLE_READDIR_ON_OPEN="EMPTY_DIR", GDAL_HTTP_TIMEOUT="20"):
            plans = predict_scenes([url], tmp_path / "{stem}.tif", per_pixel_model(), spec(),
                                   options=opts(), echo=lambda s: None)
            with pytest.raises(Exception, match="not a raster GDAL can read"):
                open_scene(url.replace("remote", "missing"))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert plans[0].classes == tmp_path / "remote.tif"
    predict_scene(tmp_path / "local.tif", per_pixel_model(), spec(), tmp_path / "ref.tif", None, opts())
    with rasterio.open(tmp_path / "remote.tif") as a, rasterio.open(tmp_path / "ref.tif") as b:
        np.testing.assert_array_equal(a.read(1), b.read(1))
        assert a.transform == b.transform and a.crs == b.crs


def test_virtual_inputs_reach_gdal(tmp_path):
    data = blocky(24, 24)
    tif = write(tmp_path / "a.tif", data, north_up())
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as zf:
        zf.write(tif, "inner/a.tif")
    vrt = tmp_path / "a.vrt"
    subprocess.run(["gdalbuildvrt", "-q", str(vrt), str(tif)], check=True) if _has("gdalbuildvrt") \
        else _write_vrt(vrt, tif)
    predict_scene(tif, per_pixel_model(), spec(), tmp_path / "ref.tif", None, opts())
    for i, source in enumerate([f"/vsizip/{tmp_path / 'a.zip'}/inner/a.tif", str(vrt),
                                f"vrt://{tif}?bands=1,2,3"]):
        out = tmp_path / f"o{i}.tif"
        predict_scenes([source], out, per_pixel_model(), spec(), options=opts(), echo=lambda s: None)
        with rasterio.open(out) as a, rasterio.open(tmp_path / "ref.tif") as b:
            np.testing.assert_array_equal(a.read(1), b.read(1))
    # The .vrt's source file is an input too: writing over it is refused.
    with pytest.raises(OutputError, match="is an input"):
        predict_scenes([str(vrt)], tif, per_pixel_model(), spec(), options=opts(), overwrite=True,
                       echo=lambda s: None)


def _has(tool: str) -> bool:
    import shutil

    return shutil.which(tool) is not None


def _write_vrt(vrt: Path, tif: Path) -> None:
    from rasterio.shutil import copy

    copy(tif, vrt, driver="VRT")


def test_urls_map_to_gdal_virtual_paths():
    assert gdal_path("s3://bucket/key/a.tif") == "/vsis3/bucket/key/a.tif"
    assert gdal_path("https://host/a.tif?x=1") == "/vsicurl/https://host/a.tif?x=1"
    assert gdal_path("gs://b/a.tif") == "/vsigs/b/a.tif"
    assert gdal_path("/vsis3/b/a.tif") == "/vsis3/b/a.tif"
    assert gdal_path("/data/a.tif") == "/data/a.tif"
    assert scene_stem("https://host/dir/scene.tif?sig=abc") == "scene"
    assert scene_stem("/vsicurl/https://host/x/y.tif") == "y"
