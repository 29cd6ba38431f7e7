"""`rsseg demo` end to end, shrunk (--quick): every artefact is written and consistent."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner
from PIL import Image

from rsseg.inference.demo import _scene_miou, write_preview


@pytest.mark.slow
def test_quick_demo_writes_qgis_ready_outputs(tmp_path):
    from rsseg.cli import main

    out = tmp_path / "demo"
    r = CliRunner().invoke(main, ["demo", "--quick", "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert lines[-1].startswith("Open in QGIS:") and "landcover.gpkg" in lines[-1]
    assert any(line.startswith("mIoU") for line in lines)  # the evaluation table
    with rasterio.open(out / "scene.tif") as scene, rasterio.open(out / "landcover.tif") as cls:
        assert cls.crs == scene.crs and cls.transform == scene.transform
        assert cls.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert ((cls.read(1) == 255) == (scene.dataset_mask() == 0)).all()
    con = sqlite3.connect(out / "landcover.gpkg")
    assert con.execute("SELECT f_table_name, useAsDefault FROM layer_styles").fetchall() == [("landcover", 1)]
    con.close()
    # The bundle is the final step's (last.ckpt), which was validated too.
    import torch

    from rsseg.bundle import load_bundle

    model, meta = load_bundle(out / "runs" / "demo" / "best.safetensors")
    assert meta.extra["bundle_from"] == "last"
    last = torch.load(out / "runs" / "demo" / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=True)
    assert last["global_step"] == 2  # --quick trains 2 steps
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, last["state_dict"]["model." + key])
    preview = Image.open(out / "preview.png")
    # scene | ground truth | prediction, and a legend of the six classes in two rows underneath.
    assert preview.size == (3 * 200 + 2 * 8, 96 + 8 + 2 * 16)
    # Running it again into the same folder needs --overwrite.
    r = CliRunner().invoke(main, ["demo", "--quick", "--out", str(out), "-q"])
    assert r.exit_code != 0 and "--overwrite" in r.output


def _write(path, array, colormap=None):
    profile = dict(driver="GTiff", height=array.shape[-2], width=array.shape[-1],
                   count=1 if array.ndim == 2 else array.shape[0], dtype="uint8", crs="EPSG:32632",
                   transform=rasterio.Affine(1, 0, 0, 0, -1, 100))
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array if array.ndim == 3 else array[None])
        if colormap:
            dst.write_colormap(1, colormap)
    return path


def test_scene_miou_matches_a_direct_count(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, (40, 50)).astype(np.uint8)
    pred = labels.copy()
    pred[:10] = (pred[:10] + 1) % 3
    pred[30:, :5] = 255  # nodata in the prediction is left out
    lab, prd = _write(tmp_path / "l.tif", labels), _write(tmp_path / "p.tif", pred)
    keep = pred != 255
    ious = []
    for c in (0, 1):  # class 2 left out of the mean, as clutter is for ISPRS
        tp = ((pred == c) & (labels == c) & keep).sum()
        union = (((pred == c) | (labels == c)) & keep).sum()
        ious.append(tp / union)
    assert _scene_miou(prd, lab, 3, (0, 1)) == pytest.approx(np.mean(ious))


def test_preview_puts_image_and_class_colours_side_by_side(tmp_path):
    image = np.zeros((3, 20, 30), np.uint8)
    image[0] = 200
    classes = np.zeros((20, 30), np.uint8)
    classes[:, 15:] = 1
    scene = _write(tmp_path / "s.tif", image)
    cls = _write(tmp_path / "c.tif", classes, {0: (0, 0, 255, 255), 1: (255, 255, 0, 255)})
    png = np.asarray(Image.open(write_preview(scene, cls, tmp_path / "p.png")))
    assert png.shape == (20, 68, 3)
    assert (png[:, :30] == [200, 0, 0]).all()
    assert (png[:, 38:53] == [0, 0, 255]).all() and (png[:, 53:] == [255, 255, 0]).all()


def test_preview_with_ground_truth_and_legend(tmp_path):
    image = np.zeros((3, 20, 30), np.uint8)
    classes = np.zeros((20, 30), np.uint8)
    classes[:, 15:] = 1
    truth = np.ones((20, 30), np.uint8)
    colours = {0: (0, 0, 255, 255), 1: (255, 255, 0, 255)}
    scene = _write(tmp_path / "s.tif", image)
    cls = _write(tmp_path / "c.tif", classes, colours)
    lab = _write(tmp_path / "l.tif", truth)
    png = np.asarray(Image.open(write_preview(scene, cls, tmp_path / "p.png", labels=lab,
                                              class_names=["water", "sand"])))
    assert png.shape == (20 + 8 + 16, 3 * 30 + 2 * 8, 3)
    assert (png[:20, 38:68] == [255, 255, 0]).all()  # ground truth: all class 1
    assert (png[:20, 76:91] == [0, 0, 255]).all() and (png[:20, 91:106] == [255, 255, 0]).all()
    legend = png[20:]
    column = png.shape[1] // 3
    swatch = legend[8 + 5, 4 + 5]
    assert tuple(swatch) == (0, 0, 255)  # the first class's swatch in its colour
    assert tuple(legend[8 + 5, column + 4 + 5]) == (255, 255, 0)
    assert (legend[8:, 4 + 14 :column] < 128).any()  # its name is written beside it


def test_progress_line_estimates_the_time_left_from_the_stage_shares():
    from rsseg.inference.demo import STAGE_SHARES, progress_line

    assert sum(STAGE_SHARES) == pytest.approx(1.0)
    # Training (94 % of a demo) took 188 s: about 12 s are left.
    assert progress_line(1, 188.0) == "elapsed 188 s, about 12 s left"
    assert progress_line(4, 200.0) == "elapsed 200 s, about 0 s left"
