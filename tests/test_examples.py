"""Every example in examples/ runs (in its --quick form) and does what it says, so none can rot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(name: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(EXAMPLES / name), "--quick", *args],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_api_end_to_end_polygons_cover_the_predicted_raster(tmp_path):
    out = _run("01_api_end_to_end.py", "--out", str(tmp_path))
    polygons = gpd.read_file(tmp_path / "landcover.gpkg", layer="landcover")
    assert f"{len(polygons)} polygons" in out
    with rasterio.open(tmp_path / "classes.tif") as src:
        classes = src.read(1)
        pixel_area = abs(src.transform.a * src.transform.e)
    # Polygons tile the valid pixels: their total area is the valid raster area.
    assert polygons.area.sum() == pytest.approx((classes != 255).sum() * pixel_area, rel=1e-6)


@pytest.mark.slow
def test_folder_prediction_merges_every_scene(tmp_path):
    _run("02_predict_folder.py", "--out", str(tmp_path))
    merged = gpd.read_file(tmp_path / "merged.gpkg", layer="landcover")
    assert set(merged["scene"]) == {"tile_0", "tile_1"}
    for stem in ("tile_0", "tile_1"):
        single = gpd.read_file(tmp_path / f"{stem}.gpkg", layer=stem)
        assert (merged["scene"] == stem).sum() == len(single)


@pytest.mark.slow
def test_evaluation_example_writes_scores_and_names_the_weakest_class(tmp_path):
    import json

    out = _run("03_evaluate_and_plot.py", "--out", str(tmp_path))
    scores = json.loads((tmp_path / "scores.json").read_text())
    ious = {k: v["iou"] for k, v in scores["per_class"].items() if v["iou"] is not None}
    assert f"weakest class: {min(ious, key=ious.get)}" in out
    assert (tmp_path / "evaluation.png").stat().st_size > 10_000


@pytest.mark.slow
def test_plain_pytorch_example_matches_rsseg_predict(tmp_path):
    out = _run("04_plain_pytorch.py", "--out", str(tmp_path))
    assert "pixels per class" in out
    import rsseg

    bundle = tmp_path / "runs" / "quick" / "best.safetensors"
    rsseg.predict(tmp_path / "scene.tif", tmp_path / "classes.tif", model=bundle, tile=256, overlap=0)
    sys.path.insert(0, str(EXAMPLES))
    try:
        from importlib import import_module

        classify_window = import_module("04_plain_pytorch").classify_window
    finally:
        sys.path.remove(str(EXAMPLES))
    from rasterio.windows import Window

    classes, probabilities = classify_window(bundle, tmp_path / "scene.tif", Window(0, 0, 256, 256))
    with rasterio.open(tmp_path / "classes.tif") as src:
        predicted = src.read(1)
    # One 256 px window equals the whole scene: the plain-PyTorch classes are rsseg's.
    valid = predicted != 255
    assert (classes[valid] == predicted[valid]).mean() > 0.999
    np.testing.assert_allclose(probabilities.sum(0), 1.0, atol=1e-5)
