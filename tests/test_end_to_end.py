"""End to end through the real CLI, for every paper model and one smp baseline:
``rsseg train --dataset synthetic --model X`` (one tiny step) -> bundle metadata -> ``rsseg predict``
of a georeferenced scene with a nodata border into a class GeoTIFF and a GeoPackage, checked
against a direct forward of the bundle's model; and, for the baseline only, ``rsseg eval`` against
a confusion matrix built from ``rsseg predict`` output (test_train.py already checks eval against
stitched direct forwards through the Python API, so this test checks the two CLI paths agree).

Everything is kept as small as the models accept (64 px synthetic tiles, one training step, a
90 x 70 scene that one window, padded to 96 x 96, covers) so the whole module fits its time budget.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import torch
from click.testing import CliRunner

from _fake_layouts import decode_rgb_label
from rsseg.bundle import load_bundle, read_bundle_meta
from rsseg.cli import main
from rsseg.data.prepare import prepare_dataset, read_manifest
from rsseg.data.specs import ISPRS_COLORS, get_spec
from rsseg.data.synthetic import write_scene, write_vaihingen_layout
from rsseg.models.registry import list_models, model_info

DATASET = "synthetic"
TILE_PX = 64  # synthetic tile = patch = crop: every model here accepts 64 px (five /2 stages)
SCENE_H, SCENE_W = 70, 90  # not multiples of 32, so the predictor's padding is exercised
PREDICT_TILE = 96  # one window covers the whole scene
NODATA_BORDER = 6
IMAGENET_MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
IMAGENET_STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]
# Softmax gap under which two classes count as tied: the predictor scales the probabilities of
# its single window by a blend weight and divides by it again, which may flip an exact near-tie.
TIE_GAP = 1e-5


def _models_under_test() -> list[str]:
    """The first name each model file registers (the paper's default or smallest size; for the
    smp baselines that is unet-r18), plus every registered tiny CPU preset."""
    first_per_module: dict[str, str] = {}
    for name in list_models():
        first_per_module.setdefault(model_info(name).builder.__module__, name)
    names = list(first_per_module.values())
    names += [n for n in list_models() if "tiny" in n and n not in names]
    return names


MODELS = _models_under_test()
BASELINE = next(n for n in MODELS if model_info(n).builder.__module__.endswith(".baselines"))


def _invoke(args: list[str]):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, f"rsseg {' '.join(map(str, args))}\n{result.output}"
    return result


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """Synthetic areas 1, 3, 5 (two train, one val) and 2 (test) of 64 px, prepared once."""
    root = tmp_path_factory.mktemp("synthetic")
    raw = write_vaihingen_layout(root / "raw", areas=[1, 3, 5, 2], size=TILE_PX, seed=0)
    return prepare_dataset(DATASET, raw, root / "prepared", patch=TILE_PX, progress=False)


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scene") / "scene.tif"
    return write_scene(path, SCENE_H, SCENE_W, seed=1, nodata_border=NODATA_BORDER)


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    """``train(name) -> bundle path``, each model trained once per module run with the command
    the issues promise (the bare synthetic run, i.e. the cpu-tiny preset) cut down by flags to
    one step at batch 2 on 64 px crops. (Batch 1 at 64 px fails in MAFMamba: its MSAF strided
    conv makes the deepest 2 x 2 level 1 x 1, and BatchNorm refuses one value per channel.)"""
    runs = tmp_path_factory.mktemp("runs")
    bundles: dict[str, Path] = {}

    def train(name: str) -> Path:
        if name not in bundles:
            torch.manual_seed(0)
            result = _invoke([
                "train", "--dataset", DATASET, "--model", name, "--data", prepared,
                "--epochs", 1, "--max-steps", 1, "--crop-size", TILE_PX, "--batch-size", 2,
                "--workers", 0, "--accelerator", "cpu", "-o", runs, "--name", name,
            ])  # fmt: skip
            bundle = runs / name / "best.safetensors"
            assert bundle.is_file() and str(bundle) in result.output
            bundles[name] = bundle
        return bundles[name]

    return train


def test_every_paper_model_and_a_baseline_is_under_test():
    # The issues promise these end to end; a renamed or unregistered model must not drop out.
    for name in ("mafmamba", "reload-mamba", "segman-v2-n", "segret-t", "unet-r18"):
        assert name in MODELS


def _direct_probs(model, meta, scene: Path) -> tuple[torch.Tensor, np.ndarray]:
    """Softmax of one forward on the whole scene, normalised with the bundle's statistics, nodata
    set to the band mean (0 after normalisation) and zero-padded to a multiple of 32."""
    with rasterio.open(scene) as src:
        data = src.read(meta.bands).astype(np.float32)
        valid = src.dataset_mask() > 0
    mean = np.asarray(meta.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(meta.std, dtype=np.float32)[:, None, None]
    x = np.where(valid[None], (data - mean) / std, 0.0).astype(np.float32)
    ph, pw = -(-SCENE_H // 32) * 32, -(-SCENE_W // 32) * 32
    padded = np.zeros((1, x.shape[0], ph, pw), dtype=np.float32)
    padded[0, :, :SCENE_H, :SCENE_W] = x
    with torch.inference_mode():
        logits = model(torch.from_numpy(padded))
    return torch.softmax(logits.float(), dim=1)[0, :, :SCENE_H, :SCENE_W], valid


@pytest.mark.parametrize("name", MODELS)
def test_train_then_predict_through_the_cli(name, trained, prepared, scene, tmp_path):
    spec = get_spec(DATASET)
    bundle = trained(name)

    # 1. The bundle says what predict needs: model, classes, bands and normalisation.
    meta = read_bundle_meta(bundle)
    assert meta.model_name == name and meta.dataset == DATASET
    assert meta.class_names == list(spec.classes) and meta.num_classes == 6
    assert meta.class_colors == [list(c) for c in ISPRS_COLORS] and meta.ignore_index == 6
    assert meta.bands == [1, 2, 3] and meta.band_names == ["NIR", "R", "G"]
    assert meta.mean == pytest.approx(IMAGENET_MEAN) and meta.std == pytest.approx(IMAGENET_STD)
    assert meta.patch_size == TILE_PX and meta.gsd_m == pytest.approx(0.09)
    assert meta.extra["data_dir"] == str(prepared.resolve())

    # 2. One predict run writes both the GeoPackage and the class raster.
    gpkg, tif, conf = tmp_path / "landcover.gpkg", tmp_path / "classes.tif", tmp_path / "conf.tif"
    _invoke([
        "predict", scene, "-o", gpkg, "--raster", tif, "--confidence", conf, "--model", bundle,
        "--tile", PREDICT_TILE, "--overlap", 0, "--batch-size", 1, "--simplify", 0, "-q",
    ])  # fmt: skip
    with rasterio.open(scene) as src, rasterio.open(tif) as out:
        assert (out.crs, out.transform, out.width, out.height) == (src.crs, src.transform, src.width, src.height)
        assert out.count == 1 and out.dtypes[0] == "uint8"
        pred, scene_crs = out.read(1), src.crs
    with rasterio.open(conf) as src:
        confidence = src.read(1)

    model, loaded_meta = load_bundle(bundle)
    assert not model.training
    probs, valid = _direct_probs(model, loaded_meta, scene)
    assert 0 < valid.sum() < valid.size  # the scene does have a nodata border
    assert (pred[~valid] == 255).all()
    assert (pred[valid] < 6).all()
    # Same model, same input, one window: the confidence is the direct forward's top softmax
    # probability and the classes its argmax (wherever two classes are not tied).
    top2 = probs.topk(2, dim=0).values
    np.testing.assert_allclose(confidence[valid], top2[0].numpy()[valid], rtol=1e-5, atol=1e-6)
    reference = probs.argmax(0).numpy()
    tied = ((top2[0] - top2[1]) < TIE_GAP).numpy()
    differ = valid & (pred != reference)
    assert not (differ & ~tied).any(), f"{int((differ & ~tied).sum())} pixels differ from the forward"
    assert tied[valid].mean() < 0.5  # the class comparison covers most pixels

    # The polygons cover exactly the classified pixels (no simplification): per-class areas.
    polygons = gpd.read_file(gpkg, layer=gpkg.stem)  # the other layer is the QGIS style table
    assert polygons.crs == scene_crs
    pixel_m2 = 0.09 * 0.09
    areas = polygons.geometry.area.groupby(polygons["class_id"]).sum()
    counts = {c: int((pred == c).sum()) for c in range(6) if (pred == c).any()}
    assert sorted(areas.index) == sorted(counts)
    for c, n in counts.items():
        assert areas[c] == pytest.approx(n * pixel_m2, rel=1e-6)  # UTM coordinates ~5e6 m
        assert set(polygons.loc[polygons["class_id"] == c, "class_name"]) == {spec.classes[c]}


def test_cli_eval_equals_a_confusion_matrix_of_cli_predict_output(trained, prepared, tmp_path):
    bundle = trained(BASELINE)
    scores_json = tmp_path / "scores.json"
    result = _invoke(["eval", "--model", bundle, "--data", prepared, "--json", scores_json])
    scores = json.loads(scores_json.read_text())

    manifest = read_manifest(prepared)
    cm = np.zeros((6, 6), dtype=np.int64)
    assert manifest["splits"]["test"] == ["2"]
    for tile in manifest["splits"]["test"]:
        entry = manifest["tiles"][tile]
        truth = decode_rgb_label(Path(entry["label"]))
        out = tmp_path / f"pred-{tile}.tif"
        _invoke(["predict", entry["image"], "-o", out, "--model", bundle, "--tile", TILE_PX,
                 "--overlap", 0, "--batch-size", 1, "-q"])  # fmt: skip
        with rasterio.open(out) as src:
            pred = src.read(1).astype(np.int64)
        assert pred.shape == truth.shape and (pred < 6).all()
        keep = truth != 6
        cm += np.bincount(truth[keep] * 6 + pred[keep], minlength=36).reshape(6, 6)

    assert np.array_equal(np.asarray(scores["confusion_matrix"]), cm)
    assert scores["pixels"] == cm.sum() > 0
    tp = np.diag(cm)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (cm.sum(0) + cm.sum(1) - tp)
    miou, oa = np.nanmean(iou[:5]), tp.sum() / cm.sum()  # synthetic = ISPRS: clutter left out
    assert scores["mIoU"] == pytest.approx(miou) and scores["OA"] == pytest.approx(oa)
    printed = dict(re.findall(r"^(mIoU|OA)\s+([\d.]+)\s*$", result.output, flags=re.M))
    assert float(printed["mIoU"]) == pytest.approx(100 * miou, abs=0.006)
    assert float(printed["OA"]) == pytest.approx(100 * oa, abs=0.006)
