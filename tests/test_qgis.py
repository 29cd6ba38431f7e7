"""rsseg's outputs as real QGIS shows them: PyQGIS run by the system python in a subprocess.

The project's virtual environment has no PyQGIS; Debian's ``python3-qgis`` gives it to
``/usr/bin/python3`` (``.ci/run`` installs it where it can). Each test writes outputs through
rsseg's API, runs :data:`QGIS_SCRIPT` on them, and checks what QGIS reports: style, legend
entries, CRS, extent, GDAL warnings, and a render to PNG compared pixel by pixel with the classes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from torch import nn

from rsseg.inference.predict import InputSpec, PredictOptions, predict_scene
from rsseg.inference.qgis_style import is_light
from rsseg.inference.vectorize import vectorize_to_file

SYSTEM_PYTHON = os.environ.get("RSSEG_QGIS_PYTHON", "/usr/bin/python3")
# Vaihingen's classes: a white class and a yellow one, the hard cases for a legend swatch.
NAMES = ["impervious surfaces", "building", "low vegetation", "tree", "car", "clutter"]
COLORS = [(255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0), (255, 0, 0)]
# Image pixels per raster pixel (each way) in the test renders.
RENDER_SCALE = 4
# Enough time for QGIS to start on a busy 2-core machine.
QGIS_TIMEOUT_S = 300


@lru_cache(maxsize=1)
def _qgis_unavailable() -> str | None:
    """Why PyQGIS cannot run here, or None when it can."""
    if not Path(SYSTEM_PYTHON).exists():
        return f"{SYSTEM_PYTHON} not found (PyQGIS comes with Debian's python3-qgis)"
    try:
        r = subprocess.run([SYSTEM_PYTHON, "-c", "import qgis.core"], capture_output=True, text=True,
                           timeout=120, env=_qgis_env())
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"{SYSTEM_PYTHON} could not be run: {err}"
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        return f"{SYSTEM_PYTHON} cannot import qgis ({last}); apt-get install python3-qgis"
    return None


@pytest.fixture(autouse=True)
def need_qgis() -> None:
    reason = _qgis_unavailable()
    if reason:
        pytest.skip(reason)


def _qgis_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["QT_QPA_PLATFORM"] = "offscreen"  # headless
    env.setdefault("XDG_RUNTIME_DIR", _private_runtime_dir())  # Qt wants one of mode 0700
    return env


@lru_cache(maxsize=1)
def _private_runtime_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="rsseg-qgis-xdg-")  # mkdtemp creates it 0700


QGIS_SCRIPT = r'''
import json, os, sys
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
from qgis.core import (Qgis, QgsApplication, QgsLayerTreeLayer, QgsMapRendererParallelJob,
                       QgsMapSettings, QgsRasterLayer, QgsRasterSymbolLegendNode, QgsRectangle,
                       QgsVectorLayer)
from qgis.PyQt.QtCore import QSize, Qt
from qgis.PyQt.QtGui import QColor

job = json.load(open(sys.argv[1]))
app = QgsApplication([], False)
app.initQgis()
log = []
QgsApplication.messageLog().messageReceived.connect(lambda msg, tag, level: log.append([tag, int(level), msg]))


def rect(e):
    return [e.xMinimum(), e.yMinimum(), e.xMaximum(), e.yMaximum()]


def icon_inked(node):
    """Pixels of a legend swatch that differ from a white legend background."""
    icon = node.data(Qt.DecorationRole)
    if icon is None:
        return -1
    img = (icon.pixmap(QSize(16, 16)) if hasattr(icon, "pixmap") else icon).toImage()
    inked = 0
    for y in range(img.height()):
        for x in range(img.width()):
            c = QColor(img.pixelColor(x, y))
            if c.alpha() > 0 and (c.red(), c.green(), c.blue()) != (255, 255, 255):
                inked += 1
    return inked


out = {"qgis": Qgis.QGIS_VERSION}
r = QgsRasterLayer(job["raster"], "classes")
v = QgsVectorLayer(job["vector"], "landcover", "ogr")
out["raster"] = {"valid": r.isValid(), "crs": r.crs().authid(), "crs_valid": r.crs().isValid(),
                 "extent": rect(r.extent()), "renderer": r.renderer().type(),
                 "size": [r.width(), r.height()]}
nodes = r.legend().createLayerTreeModelLegendNodes(QgsLayerTreeLayer(r))
out["raster"]["legend"] = [[n.data(Qt.DisplayRole), isinstance(n, QgsRasterSymbolLegendNode)] for n in nodes]
if r.renderer().type() == "paletted":
    out["raster"]["classes"] = [[c.value, c.label, c.color.name(), c.color.alpha()]
                                for c in r.renderer().classes()]
out["vector"] = {"valid": v.isValid(), "crs": v.crs().authid(), "extent": rect(v.extent()),
                 "features": v.featureCount(), "renderer": v.renderer().type()}
if v.renderer().type() == "categorizedSymbol":
    out["vector"]["categories"] = [
        [c.value(), c.label(), c.symbol().color().name(), c.symbol().symbolLayer(0).strokeStyle(),
         c.symbol().symbolLayer(0).strokeColor().name()] for c in v.renderer().categories()]
vnodes = v.legend().createLayerTreeModelLegendNodes(QgsLayerTreeLayer(v))
out["vector"]["legend"] = [[n.data(Qt.DisplayRole), icon_inked(n)] for n in vnodes]

# Render each layer alone over the raster's extent, k x k image pixels per raster pixel (so that a
# raster pixel's centre is clear of polygon outlines and antialiasing).
k = job["scale"]
width, height = r.width() * k, r.height() * k
for name, layer in (("raster", r), ("vector", v)):
    settings = QgsMapSettings()
    settings.setLayers([layer])
    settings.setDestinationCrs(r.crs())
    settings.setOutputSize(QSize(width, height))
    settings.setExtent(r.extent())
    settings.setBackgroundColor(QColor(255, 255, 255))
    settings.setOutputDpi(96)
    render = QgsMapRendererParallelJob(settings)
    render.start()
    render.waitForFinished()
    png = os.path.join(job["out_dir"], name + ".png")
    render.renderedImage().save(png, "PNG")
    out[name]["png"] = png
    out[name]["render_extent"] = rect(settings.visibleExtent())
app.processEvents()
out["log"] = log
with open(job["result"], "w") as f:
    json.dump(out, f)
sys.stdout.flush()
sys.stderr.flush()
# QGIS 3.22 may crash in exitQgis()/interpreter teardown with layers still alive; the results are
# written, so leave without either.
os._exit(0)
'''


def run_qgis(tmp_path: Path, raster: Path, vector: Path, layer: str) -> tuple[dict, str]:
    """QGIS's view of a class raster and a GeoPackage layer; also returns GDAL's stderr."""
    script = tmp_path / "qgis_check.py"
    script.write_text(QGIS_SCRIPT, encoding="utf-8")
    job = {"raster": str(raster), "vector": f"{vector}|layername={layer}", "out_dir": str(tmp_path),
           "result": str(tmp_path / "qgis.json"), "scale": RENDER_SCALE}
    (tmp_path / "job.json").write_text(json.dumps(job))
    r = subprocess.run([SYSTEM_PYTHON, str(script), str(tmp_path / "job.json")], capture_output=True,
                       text=True, timeout=QGIS_TIMEOUT_S, env=_qgis_env(), cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads((tmp_path / "qgis.json").read_text()), r.stderr


def gdal_warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if re.match(r"(Warning|ERROR) \d+:", line)]


def model() -> nn.Module:
    """Per-pixel classes from the bands: spatially coherent on a real image, fast on a CPU."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU(), nn.Conv2d(16, len(NAMES), 1)).eval()


def spec() -> InputSpec:
    return InputSpec(bands=[1, 2, 3], mean=[100.0] * 3, std=[50.0] * 3, class_names=NAMES,
                     class_colors=COLORS, gsd_m=None)


def predict_and_vectorize(scene: Path, out_dir: Path) -> tuple[Path, Path]:
    classes = out_dir / "classes.tif"
    predict_scene(scene, model(), spec(), classes, None, PredictOptions(tile=256, overlap=32, progress=False))
    gpkg = out_dir / "landcover.gpkg"
    vectorize_to_file(classes, gpkg, simplify=0)  # unsimplified: polygons re-rasterize exactly
    return classes, gpkg


def expected_image(classes: np.ndarray) -> np.ndarray:
    """What the classes should look like on a white background (nodata stays white)."""
    lut = np.full((256, 3), 255, np.uint8)
    lut[: len(COLORS)] = COLORS
    return lut[classes]


def rendered(path: str) -> np.ndarray:
    """The rendered colour at the centre of each raster pixel (RENDER_SCALE image pixels each way)."""
    from PIL import Image

    k = RENDER_SCALE
    return np.asarray(Image.open(path).convert("RGB"))[k // 2::k, k // 2::k]


def test_qgis_shows_styled_georeferenced_outputs(tmp_path, rgb_byte_tif):
    classes_path, gpkg = predict_and_vectorize(rgb_byte_tif, tmp_path)
    q, stderr = run_qgis(tmp_path, classes_path, gpkg, "landcover")
    with rasterio.open(rgb_byte_tif) as src, rasterio.open(classes_path) as cls:
        bounds, classes = list(src.bounds), cls.read(1)

    # No GDAL warnings on load (GeoPackage version, layer_styles.update_time, ...).
    assert gdal_warnings(stderr) == [], stderr[-3000:]

    # The class COG: the scene's CRS and extent; a legend of exactly the classes and nodata.
    ras = q["raster"]
    assert ras["valid"] and ras["crs"] == "EPSG:32618" and ras["size"] == [791, 718]
    np.testing.assert_allclose(ras["extent"], bounds, atol=1e-6)
    assert ras["renderer"] == "paletted"
    assert [label for label, is_entry in ras["legend"] if is_entry] == NAMES + ["nodata"]
    assert len(ras["legend"]) <= len(NAMES) + 2  # at most a band title besides the entries
    hexes = ["#%02x%02x%02x" % c for c in COLORS]
    assert ras["classes"] == [[i, n, h, 255] for i, (n, h) in enumerate(zip(NAMES, hexes))] + [
        [255, "nodata", "#000000", 0]]

    # The GeoPackage: its default categorized style with names and colours, same CRS, extent
    # inside the scene and equal to the bounds of the valid (non-nodata) pixels.
    vec = q["vector"]
    assert vec["valid"] and vec["crs"] == "EPSG:32618" and vec["renderer"] == "categorizedSymbol"
    assert vec["features"] > 100
    assert [[int(c[0]), c[1], c[2]] for c in vec["categories"]] == [
        [i, n, h] for i, (n, h) in enumerate(zip(NAMES, hexes))]
    for (_, _, _, stroke, stroke_color), color in zip(vec["categories"], COLORS):
        if is_light(color):  # white and yellow: a visible darker outline
            assert stroke == 1 and stroke_color != "#%02x%02x%02x" % color
    rows, cols = np.nonzero(classes != 255)
    t = rasterio.transform.from_bounds(*bounds, 791, 718)
    x0, y1 = t * (cols.min(), rows.min())
    x1, y0 = t * (cols.max() + 1, rows.max() + 1)
    np.testing.assert_allclose(vec["extent"], [x0, y0, x1, y1], atol=1e-6)
    # Legend swatches: every class, including white, draws something on a white legend.
    assert [label for label, _ in vec["legend"]] == NAMES
    assert all(inked > 0 for _, inked in vec["legend"]), vec["legend"]

    # Renders: the class colours where the classes are.
    # QGIS keeps square map pixels: the visible extent may grow by a fraction of a pixel.
    np.testing.assert_allclose(ras["render_extent"], bounds, atol=0.1 * (bounds[2] - bounds[0]) / 791)
    want = expected_image(classes)
    got, got_v = rendered(ras["png"]), rendered(vec["png"])
    assert got.shape == got_v.shape == want.shape
    assert (got == want).all(axis=-1).mean() > 0.999
    valid = classes != 255
    assert (got_v[valid] == want[valid]).all(axis=-1).mean() > 0.995
    assert (got_v[~valid] == 255).all(axis=-1).mean() > 0.995  # no polygon over nodata


def test_qgis_overlays_an_ungeoreferenced_scenes_polygons_on_its_raster(tmp_path, rgb_byte_tif):
    with rasterio.open(rgb_byte_tif) as src:
        data = src.read(window=rasterio.windows.Window(300, 300, 160, 120))
    scene = tmp_path / "nocrs.tif"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(scene, "w", driver="GTiff", height=120, width=160, count=3, dtype="uint8") as d:
            d.write(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no CRS" warnings are other tests' business
        classes_path, gpkg = predict_and_vectorize(scene, tmp_path)
    q, _ = run_qgis(tmp_path, classes_path, gpkg, "landcover")
    with rasterio.open(classes_path) as cls:
        classes = cls.read(1)
    ras, vec = q["raster"], q["vector"]
    assert ras["valid"] and vec["valid"] and vec["features"] > 10
    assert [label for label, is_entry in ras["legend"] if is_entry] == NAMES + ["nodata"]
    # Overlap in QGIS's display coordinates, whatever the convention for ungeoreferenced outputs.
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = ras["extent"], vec["extent"]
    overlap = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - overlap
    assert overlap / union > 0.99, (ras["extent"], vec["extent"])
    # Same map, same place: the polygon render agrees with the raster render pixel by pixel
    # (the raster render itself is whatever QGIS shows, e.g. flipped without a geotransform).
    got_r, got_v = rendered(ras["png"]), rendered(vec["png"])
    assert got_r.shape == got_v.shape == classes.shape + (3,)
    palette = np.array(COLORS)
    shown = np.argmin(((got_r[..., None, :].astype(int) - palette) ** 2).sum(-1), axis=-1)
    assert np.bincount(shown.ravel(), minlength=len(NAMES)).tolist() == np.bincount(
        classes.ravel(), minlength=len(NAMES)).tolist()  # the raster render shows every class pixel
    assert (got_v == got_r).all(axis=-1).mean() > 0.995
