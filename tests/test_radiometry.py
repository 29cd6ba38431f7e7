"""Radiometry is part of the bundle's contract; masks mean what they say (issue 15, items 1-2)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio

from rsseg.bundle import BundleMeta, read_bundle_meta, save_bundle
from rsseg.data.radiometry import AlphaRule, band_statistics, decide_alpha, sample_scene
from rsseg.errors import BundleError, DataError, RssegWarning, UsageError
from rsseg.inference.predict import InputSpec, PredictOptions, predict_scene

from _predict_helpers import CLASSES, COLORS, one_torch_thread, per_pixel_model  # noqa: F401


def write(path: Path, data: np.ndarray, **extra) -> Path:
    profile = dict(driver="GTiff", height=data.shape[1], width=data.shape[2], count=data.shape[0],
                   dtype=data.dtype.name, crs="EPSG:32618",
                   transform=rasterio.Affine(0.5, 0, 500000, 0, -0.5, 4000000))
    profile.update(extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data)
    return path


def scene8(h: int = 48, w: int = 40, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).integers(10, 240, (3, h, w)).astype(np.uint8)


def trained_on(path: Path, bands=(1, 2, 3)) -> InputSpec:
    """The spec of a bundle trained on images like ``path`` (stats as prepare records them)."""
    with rasterio.open(path) as src:
        stats = band_statistics(sample_scene(src, list(bands), AlphaRule()))
        dtype, count = src.dtypes[0], src.count
    return InputSpec(bands=list(bands), mean=[120.0] * len(bands), std=[60.0] * len(bands),
                     class_names=CLASSES, class_colors=COLORS, band_names=["R", "G", "B"][: len(bands)],
                     source_dtype=dtype, source_band_count=count,
                     source_band_labels=[""] * len(bands), band_stats=stats)


def run(scene: Path, spec: InputSpec, out: Path, **kw) -> np.ndarray:
    kw.setdefault("progress", False)
    predict_scene(scene, per_pixel_model(len(spec.bands)), spec, out, None,
                  PredictOptions(tile=32, overlap=8, **kw))
    with rasterio.open(out) as ds:
        return ds.read(1)


# ----------------------------------------------------------------------------- value range


def test_uint8_scene_matches_a_uint8_bundle(tmp_path):
    a = write(tmp_path / "a.tif", scene8())
    b = write(tmp_path / "b.tif", scene8(seed=8))  # another scene, same radiometry
    classes = run(b, trained_on(a), tmp_path / "c.tif")
    assert (classes != 255).all()


def test_12_bit_scene_into_an_8_bit_bundle_is_refused_then_rescaled(tmp_path):
    data = scene8()
    a = write(tmp_path / "a.tif", data)
    twelve = write(tmp_path / "u16.tif", (data.astype(np.uint16) * 16))  # 12-bit in 16
    spec = trained_on(a)
    with pytest.raises(DataError, match=r"u16\.tif does not match .*outside the training uint8 range"
                                         r".*--rescale auto"):
        run(twelve, spec, tmp_path / "c.tif")
    assert not (tmp_path / "c.tif").exists()
    reference = run(a, spec, tmp_path / "ref.tif")
    auto = run(twelve, spec, tmp_path / "auto.tif", rescale="auto")
    factor = run(twelve, spec, tmp_path / "f.tif", rescale="0.0625")
    assert (factor == reference).mean() > 0.999
    # auto maps the scene's 1st..99th percentiles onto the training ones: here x/16 exactly.
    assert (auto == reference).mean() > 0.99


def test_16_bit_bundle_refuses_full_16_bit_scene_by_percentiles(tmp_path):
    data = scene8().astype(np.uint16) * 16  # trained on 12-bit-in-16
    a = write(tmp_path / "a.tif", data)
    full = write(tmp_path / "full.tif", data * 16)  # same dtype, 16x the values
    with pytest.raises(DataError, match=r"99th percentile of .* 16(\.0)?x apart"):
        run(full, trained_on(a), tmp_path / "c.tif")


def test_float_reflectance_into_an_8_bit_bundle(tmp_path):
    data = scene8()
    a = write(tmp_path / "a.tif", data)
    refl = write(tmp_path / "refl.tif", (data / 255.0).astype(np.float32))
    spec = trained_on(a)
    with pytest.raises(DataError, match=r"refl\.tif .*band R has a 99th percentile of 0\.9.*float32"):
        run(refl, spec, tmp_path / "c.tif")
    reference = run(a, spec, tmp_path / "ref.tif")
    assert (run(refl, spec, tmp_path / "x255.tif", rescale="255") == reference).mean() > 0.999
    # none: the user takes responsibility; it runs without a check.
    assert (run(refl, spec, tmp_path / "none.tif", rescale="none") != 255).all()


def test_rescale_values_are_checked():
    from rsseg.data.radiometry import parse_rescale

    assert parse_rescale(None) == "check" and parse_rescale("auto") == "auto"
    assert parse_rescale("0.25") == 0.25
    for bad in ("0", "-2", "x", "nan"):
        with pytest.raises(UsageError, match="--rescale"):
            parse_rescale(bad)


def test_old_bundle_without_radiometry_is_not_checked(tmp_path):
    a = write(tmp_path / "a.tif", scene8())
    spec = trained_on(a)
    old = InputSpec(bands=spec.bands, mean=spec.mean, std=spec.std, class_names=CLASSES,
                    class_colors=COLORS)
    twelve = write(tmp_path / "u16.tif", scene8().astype(np.uint16) * 16)
    assert run(twelve, old, tmp_path / "c.tif").shape == (48, 40)  # as before: no refusal
    with pytest.raises(UsageError, match="--rescale auto needs"):
        run(twelve, old, tmp_path / "d.tif", rescale="auto")


# ----------------------------------------------------------------------------- band count / names


def test_4_band_scene_into_a_3_band_bundle_needs_bands(tmp_path):
    data = scene8()
    a = write(tmp_path / "a.tif", data)
    four = write(tmp_path / "four.tif", np.concatenate([data[2:3], data]))  # X, R, G, B
    spec = trained_on(a)
    with pytest.raises(DataError, match=r"four\.tif .* has 4 bands, the training images had 3 .*"
                                        r"--bands"):
        run(four, spec, tmp_path / "c.tif")
    reference = run(a, spec, tmp_path / "ref.tif")
    np.testing.assert_array_equal(run(four, spec, tmp_path / "b.tif", bands=[2, 3, 4]), reference)
    with pytest.raises(UsageError, match="--bands lists 2"):
        run(four, spec, tmp_path / "d.tif", bands=[1, 2])


def test_band_names_that_disagree_are_refused_with_the_right_bands(tmp_path):
    data = scene8()
    a = write(tmp_path / "a.tif", data, photometric="RGB")
    spec = trained_on(a)
    spec.source_band_labels = ["red", "green", "blue"]
    bgr = write(tmp_path / "bgr.tif", data[::-1].copy())
    with rasterio.open(bgr, "r+") as ds:
        ds.descriptions = ("blue", "green", "red")
    with pytest.raises(DataError, match=r"band 1 is blue where the training images had red.*"
                                        r"--bands 3,2,1"):
        run(bgr, spec, tmp_path / "c.tif")
    np.testing.assert_array_equal(run(bgr, spec, tmp_path / "b.tif", bands=[3, 2, 1]),
                                  run(a, spec, tmp_path / "ref.tif"))


def test_bundle_records_radiometry_and_old_bundles_load(tmp_path):
    from rsseg import create_model

    kw = dict(model_name="unet-r18", class_names=CLASSES, class_colors=[list(c) for c in COLORS],
              ignore_index=4, bands=[1, 2, 3], band_names=["R", "G", "B"], mean=[1.0] * 3,
              std=[1.0] * 3, patch_size=64)
    model = create_model("unet-r18", num_classes=4, in_channels=3)
    stats = [{"p1": 3.0, "p99": 250.0, "min": 0.0, "max": 255.0}] * 3
    path = save_bundle(tmp_path / "m.safetensors", model,
                       BundleMeta(**kw, source_dtype="uint8", source_band_count=4,
                                  source_band_labels=["red", "green", "blue"], band_stats=stats))
    meta = read_bundle_meta(path)
    assert meta.source_dtype == "uint8" and meta.band_stats[0]["p99"] == 250.0
    assert meta.source_band_count == 4
    old = BundleMeta.from_dict(kw)  # metadata written before these fields existed
    assert old.band_stats is None and old.source_dtype is None
    with pytest.raises(BundleError, match="band_stats"):
        BundleMeta(**kw, band_stats=stats[:2]).validate()
    with pytest.raises(BundleError, match="source_dtype"):
        BundleMeta(**kw, source_dtype="bytes-ish").validate()


# ----------------------------------------------------------------------------- alpha


def rgbir_with_ir_tagged_alpha(path: Path) -> tuple[Path, np.ndarray]:
    """Potsdam's RGBIR as torchgeo ships it: band 4 (IR) tagged alpha, IR == 0 in places."""
    data = np.random.default_rng(3).integers(1, 256, (4, 40, 50)).astype(np.uint8)
    data[3, 5:15, 5:25] = 0
    write(path, data, photometric="RGB", alpha="YES")
    with rasterio.open(path) as ds:
        assert ds.colorinterp[3].name == "alpha"
    return path, data


def test_ir_band_tagged_alpha_is_data_for_an_rgb_bundle(tmp_path):
    path, data = rgbir_with_ir_tagged_alpha(tmp_path / "rgbir.tif")
    spec = InputSpec(bands=[1, 2, 3], mean=[120.0] * 3, std=[60.0] * 3, class_names=CLASSES,
                     class_colors=COLORS)
    with pytest.warns(RssegWarning, match=r"band 4 is tagged alpha but holds values other than 0 "
                                          r"and 255") as record:
        classes = run(path, spec, tmp_path / "c.tif")
    assert len([w for w in record if "tagged alpha" in str(w.message)]) == 1
    assert (classes != 255).all()  # IR == 0 pixels are not nodata


def test_alpha_band_the_model_reads_is_data(tmp_path):
    path, data = rgbir_with_ir_tagged_alpha(tmp_path / "rgbir.tif")
    spec = InputSpec(bands=[4, 1, 2], mean=[120.0] * 3, std=[60.0] * 3, class_names=CLASSES,
                     class_colors=COLORS)
    with pytest.warns(RssegWarning, match="the model reads it as data"):
        assert (run(path, spec, tmp_path / "c.tif") != 255).all()


def test_real_alpha_mask_still_masks(tmp_path):
    data = scene8(40, 50)
    alpha = np.full((1, 40, 50), 255, np.uint8)
    alpha[0, 10:20, 10:30] = 0
    path = write(tmp_path / "rgba.tif", np.concatenate([data, alpha]), photometric="RGB", alpha="YES")
    with rasterio.open(path) as src:
        rule = decide_alpha(src, [1, 2, 3], "rgba.tif")
    assert rule.is_mask and rule.note is None
    spec = InputSpec(bands=[1, 2, 3], mean=[120.0] * 3, std=[60.0] * 3, class_names=CLASSES,
                     class_colors=COLORS)
    np.testing.assert_array_equal(run(path, spec, tmp_path / "c.tif") == 255, alpha[0] == 0)


@pytest.mark.parametrize("band4", ["ir", "mask"])
def test_prepare_and_predict_share_the_alpha_rule(tmp_path, band4):
    """Potsdam RGBIR with band 4 tagged alpha, RGB bands chosen. IR data: prepare keeps the
    labels of IR == 0 pixels (predict reads them too); a 0/255 mask: their labels are ignore
    (predict masks them). The manifest records the training radiometry."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from _fake_layouts import make_potsdam

    from rsseg.data.prepare import prepare_dataset, read_manifest

    maps = make_potsdam(tmp_path / "raw", tiles=("2_10", "2_11", "2_13"), size=(64, 64))
    image_path = tmp_path / "raw" / "4_Ortho_RGBIR" / "top_potsdam_2_10_RGBIR.tif"
    with rasterio.open(image_path) as src:
        data, profile = src.read(), src.profile
    hole = np.zeros((64, 64), bool)
    hole[5:20, 5:30] = True
    if band4 == "ir":
        data[3] = np.maximum(data[3], 1)
        data[3][hole] = 0
    else:
        data[3] = np.where(hole, 0, 255)
    profile.update(photometric="RGB", alpha="YES")
    with rasterio.open(image_path, "w", **profile) as dst:
        dst.write(data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = prepare_dataset("potsdam", tmp_path / "raw", tmp_path / "out", patch=64, progress=False)
    # (make_potsdam's other tiles are 4-band files that GDAL tags band 4 alpha by default too.)
    notes = [str(w.message) for w in caught if "tagged alpha" in str(w.message)]
    about_2_10 = [n for n in notes if "2_10" in n]
    manifest = read_manifest(out)
    entry = manifest["tiles"]["2_10"]
    with rasterio.open(out / entry["patches"][0]["label"]) as lab:
        labels = lab.read(1)
    if band4 == "ir":
        assert len(notes) == 1 and "read as data" in notes[0]  # one line for all images
        np.testing.assert_array_equal(labels, maps["2_10"])
    else:
        assert about_2_10 == []
        np.testing.assert_array_equal(labels, np.where(hole, 6, maps["2_10"]))
    # predict, under the same rule, masks exactly what prepare ignored.
    with rasterio.open(image_path) as src:
        rule = decide_alpha(src, [1, 2, 3], image_path.name)
        from rsseg.data.radiometry import read_valid
        from rasterio.windows import Window

        valid = read_valid(src, Window(0, 0, 64, 64), rule)
    np.testing.assert_array_equal(~valid, hole if band4 == "mask" else np.zeros_like(hole))
    rad = manifest["radiometry"]
    assert rad["source_dtype"] == "uint8" and rad["source_band_count"] == 4
    assert len(rad["band_stats"]) == 3 and 0 < rad["band_stats"][0]["p1"] < rad["band_stats"][0]["p99"] <= 255
