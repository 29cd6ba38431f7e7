"""Patch preparation from the official layouts (zipped and extracted) of all three datasets."""

from __future__ import annotations

import json
import shutil
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

from _fake_layouts import make_loveda, make_potsdam, make_vaihingen, rgb_label, write_tif
from rsseg.data.layouts import DataWarning, safe_extract_zip
from rsseg.data.patches import PatchDataset
from rsseg.data.prepare import decode_rgb_label, prepare_dataset, read_manifest, window_origins
from rsseg.data.specs import ISPRS_COLORS, get_spec
from rsseg.errors import DataError

IGNORE = 6


def _prepare(*args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        return prepare_dataset(*args, progress=False, **kw)


def _read(path: Path):
    with rasterio.open(path) as src:
        return src.read(), src.transform, src.crs


@pytest.mark.parametrize("zipped", [False, True])
def test_vaihingen_patches_keep_the_source_window_georeferencing_and_pixels(tmp_path, zipped):
    maps = make_vaihingen(tmp_path / "raw", size=(150, 130), zipped=zipped)
    out = _prepare("vaihingen", tmp_path / "raw", tmp_path / "out", patch=64)
    m = read_manifest(out)
    # Official split: 2 and 4 are test tiles; one of the four training tiles is held out.
    assert m["splits"]["test"] == ["2", "4"]
    assert len(m["splits"]["val"]) == 1 and set(m["splits"]["train"]) | set(m["splits"]["val"]) == {"1", "3", "5", "7"}
    assert m["train_stride"] == 32 and m["test_stride"] == 64
    for tile, entry in m["tiles"].items():
        stride = 32 if entry["split"] == "train" else 64
        assert len(entry["patches"]) == len(window_origins(150, 64, stride)) * len(window_origins(130, 64, stride))
        with rasterio.open(entry["image"]) as src:
            src_img, src_transform, src_crs = src.read(), src.transform, src.crs
        truth = maps[tile]
        for patch in entry["patches"][:: max(1, len(entry["patches"]) // 4)] + entry["patches"][-1:]:
            col, row = patch["window"][:2]
            img, transform, crs = _read(out / patch["image"])
            lab, lab_transform, _ = _read(out / patch["label"])
            assert crs == src_crs and transform == lab_transform
            assert transform == window_transform(Window(col, row, 64, 64), src_transform)
            h, w = min(64, 150 - row), min(64, 130 - col)
            np.testing.assert_array_equal(img[:, :h, :w], src_img[:, row : row + h, col : col + w])
            expected = truth[row : row + h, col : col + w].astype(np.int64)
            if entry["split"] == "test":  # eroded labels: the black stripe is ignore
                stripe = np.zeros_like(truth, dtype=bool)
                stripe[:, 10:12] = True
                expected = np.where(stripe[row : row + h, col : col + w], IGNORE, expected)
            np.testing.assert_array_equal(lab[0, :h, :w], expected)
            # Padding past the tile edge: ignore in labels, 0 in the image.
            assert (lab[0, h:, :] == IGNORE).all() and (lab[0, :, w:] == IGNORE).all()
            assert (img[:, h:, :] == 0).all() and (img[:, :, w:] == 0).all()


def test_splits_are_disjoint_and_the_validation_draw_is_seeded(tmp_path):
    make_vaihingen(tmp_path / "raw", areas=(1, 3, 5, 7, 11, 13, 2), size=(64, 64))
    a = read_manifest(_prepare("vaihingen", tmp_path / "raw", tmp_path / "a", patch=64, seed=1))
    b = read_manifest(_prepare("vaihingen", tmp_path / "raw", tmp_path / "b", patch=64, seed=1))
    assert a["splits"] == b["splits"]
    sets = [set(a["splits"][s]) for s in ("train", "val", "test")]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert sets[2] == {"2"} and len(sets[1]) == 1  # 20% of 6 training tiles
    names = [PatchDataset(tmp_path / "a", s).items for s in ("train", "val", "test")]
    assert not set(names[0]) & set(names[1])


def test_label_decoding_unknown_colours_become_ignore_and_are_counted():
    rgb = np.array(ISPRS_COLORS + ((0, 0, 0), (12, 34, 56)), dtype=np.uint8).T[:, None, :]  # 3 x 1 x 8
    labels, unmatched, examples = decode_rgb_label(rgb, ISPRS_COLORS, IGNORE)
    np.testing.assert_array_equal(labels[0], [0, 1, 2, 3, 4, 5, IGNORE, IGNORE])
    assert unmatched == 1 and examples == {(12, 34, 56)}  # black boundary is expected, not counted


def test_an_odd_label_colour_is_warned_about_not_made_class_zero(tmp_path):
    make_vaihingen(tmp_path / "raw", areas=(1, 2), size=(64, 64), eroded=False)
    label = tmp_path / "raw" / "top_mosaic_09cm_area1.tif"
    data, transform, crs = _read(label)
    data[:, :2, :5] = np.array([1, 2, 3], dtype=np.uint8)[:, None, None]
    with rasterio.open(label, "r+") as dst:
        dst.write(data)
    with pytest.warns(DataWarning, match=r"10 label pixels in 1 file\(s\) match no class"):
        out = prepare_dataset("vaihingen", tmp_path / "raw", tmp_path / "out", patch=64, progress=False)
    patch = read_manifest(out)["tiles"]["1"]["patches"][0]
    lab, _, _ = _read(out / patch["label"])
    assert (lab[0, :2, :5] == IGNORE).all()


def test_zip_members_escaping_the_target_are_refused(tmp_path):
    archive = tmp_path / "ISPRS_semantic_labeling_Vaihingen.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("top/top_mosaic_09cm_area1.tif", "fine")
        zf.writestr("../../top_mosaic_09cm_area1.tif", "escaped")
    with pytest.raises(DataError, match="outside"):
        safe_extract_zip(archive, tmp_path / "x" / "y")
    assert not (tmp_path / "top_mosaic_09cm_area1.tif").exists()
    assert not (tmp_path / "x" / "y" / "top").exists()  # nothing extracted at all
    with pytest.raises(DataError, match="outside"):
        prepare_dataset("vaihingen", tmp_path, tmp_path / "out", progress=False)


def test_missing_or_incomplete_layouts_say_which_file_was_expected_where(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no vaihingen data under .*empty: expected ISPRS_semantic_labeling_Vaihingen\.zip"):
        prepare_dataset("vaihingen", tmp_path / "empty", tmp_path / "out", progress=False)
    make_vaihingen(tmp_path / "raw", areas=(1, 2), size=(32, 32), eroded=False)
    (tmp_path / "raw" / "top_mosaic_09cm_area1.tif").unlink()
    with pytest.raises(DataError, match=r"missing label top_mosaic_09cm_area1\.tif \(outside top/, from .*_ground_truth_COMPLETE\.zip\) for .*top/top_mosaic_09cm_area1\.tif"):
        prepare_dataset("vaihingen", tmp_path / "raw", tmp_path / "out", progress=False)


def test_rerun_skips_finished_tiles_and_redoes_changed_inputs(tmp_path):
    make_vaihingen(tmp_path / "raw", areas=(1, 3, 2), size=(64, 64))
    out = _prepare("vaihingen", tmp_path / "raw", tmp_path / "out", patch=64)
    first = read_manifest(out)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.tif")}
    _prepare("vaihingen", tmp_path / "raw", tmp_path / "out", patch=64)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.tif")} == stamps
    assert read_manifest(out)["tiles"] == first["tiles"]
    # Change one source image: only that tile is redone and its checksum updated.
    image = tmp_path / "raw" / "top" / "top_mosaic_09cm_area3.tif"
    data, _, _ = _read(image)
    with rasterio.open(image, "r+") as dst:
        dst.write(255 - data)
    _prepare("vaihingen", tmp_path / "raw", tmp_path / "out", patch=64)
    second = read_manifest(out)
    assert second["tiles"]["3"]["params"]["image_sha256"] != first["tiles"]["3"]["params"]["image_sha256"]
    assert second["tiles"]["1"] == first["tiles"]["1"]
    patch = out / second["tiles"]["3"]["patches"][0]["image"]
    np.testing.assert_array_equal(_read(patch)[0], 255 - data)
    unchanged = out / second["tiles"]["1"]["patches"][0]["image"]
    assert unchanged.stat().st_mtime_ns == stamps[unchanged]


def test_source_without_crs_gives_pixel_coordinates_and_one_warning(tmp_path):
    make_vaihingen(tmp_path / "raw", areas=(1, 3, 2), size=(40, 40), crs=None)
    with pytest.warns(DataWarning) as record:
        out = prepare_dataset("vaihingen", tmp_path / "raw", tmp_path / "out", patch=32, progress=False)
    crs_warnings = [w for w in record if "no CRS" in str(w.message)]
    assert len(crs_warnings) == 1 and "3 source image(s)" in str(crs_warnings[0].message)


def test_real_geotiff_patch_georeferencing_equals_the_source_window(tmp_path, rgb_byte_tif):
    """RGB.byte.tif (EPSG:32618, 791 x 718) as a Vaihingen tile: patches sit where their window is."""
    raw = tmp_path / "raw"
    (raw / "top").mkdir(parents=True)
    shutil.copy(rgb_byte_tif, raw / "top" / "top_mosaic_09cm_area2.tif")
    with rasterio.open(rgb_byte_tif) as src:
        profile, image, nodata = src.profile, src.read(), src.dataset_mask() == 0
    classes = (image[0] // 64).astype(np.uint8)  # some label aligned with the image
    profile.update(nodata=None)
    with rasterio.open(raw / "top_mosaic_09cm_area2.tif", "w", **profile) as dst:
        dst.write(rgb_label(classes))
    out = _prepare("vaihingen", raw, tmp_path / "out", patch=256)
    entry = read_manifest(out)["tiles"]["2"]
    assert len(entry["patches"]) == 4 * 3  # 718 rows -> 3 windows, 791 columns -> 4
    with rasterio.open(rgb_byte_tif) as src:
        for patch in entry["patches"]:
            col, row = patch["window"][:2]
            img, transform, crs = _read(out / patch["image"])
            assert crs == src.crs and transform == src.window_transform(Window(col, row, 256, 256))
            # The patch's own geotransform maps its pixel (0, 0) to the source pixel (row, col).
            assert src.index(*(transform * (0.5, 0.5))) == (row, col)
            h, w = min(256, 718 - row), min(256, 791 - col)
            np.testing.assert_array_equal(img[:, :h, :w], image[:, row : row + h, col : col + w])
            lab, _, _ = _read(out / patch["label"])
            # Nodata pixels (value 0 around the footprint) are ignore (6), never a class.
            expected = np.where(nodata, 6, classes)[row : row + h, col : col + w]
            np.testing.assert_array_equal(lab[0, :h, :w], expected)


@pytest.mark.parametrize("zipped", [False, True])
def test_potsdam_layout_and_band_choice(tmp_path, zipped):
    maps = make_potsdam(tmp_path / "raw", zipped=zipped)
    out = _prepare("potsdam", tmp_path / "raw", tmp_path / "out", patch=128, bands="irrg")
    m = read_manifest(out)
    assert m["splits"]["test"] == ["2_13"] and m["band_indexes"] == [4, 1, 2]
    assert m["band_names"] == ["NIR", "R", "G"] and len(m["mean"]) == 3
    entry = m["tiles"]["2_10"]
    with rasterio.open(entry["image"]) as src:
        rgbir = src.read()
    img, _, _ = _read(out / entry["patches"][0]["image"])
    np.testing.assert_array_equal(img[:, :128, :128], rgbir[[3, 0, 1], :128, :128])
    lab, _, _ = _read(out / entry["patches"][0]["label"])
    np.testing.assert_array_equal(lab[0], maps["2_10"][:128, :128])
    rgbir_out = _prepare("potsdam", tmp_path / "raw", tmp_path / "out4", patch=128, bands="rgbir")
    assert read_manifest(rgbir_out)["band_indexes"] == [1, 2, 3, 4]
    img4, _, _ = _read(rgbir_out / read_manifest(rgbir_out)["tiles"]["2_10"]["patches"][0]["image"])
    assert img4.shape[0] == 4


@pytest.mark.parametrize("zipped", [False, True])
def test_loveda_layout_nodata_and_split_mapping(tmp_path, zipped):
    masks = make_loveda(tmp_path / "raw", zipped=zipped)
    out = _prepare("loveda", tmp_path / "raw", tmp_path / "out", patch=64)
    m = read_manifest(out)
    # Official Val is our test split (test masks are not public); validation comes from Train.
    assert set(m["splits"]["test"]) == {"val-urban-3", "val-rural-4"}
    assert len(m["splits"]["val"]) == 1 and len(m["splits"]["train"]) == 2
    assert m["ignore_index"] == 7
    for tile, mask in masks.items():
        lab, transform, crs = _read(out / m["tiles"][tile]["patches"][0]["label"])
        expected = np.where(mask == 0, 7, mask.astype(np.int64) - 1)
        np.testing.assert_array_equal(lab[0], expected)
        assert crs is None and transform.c == 0 and transform.f == 0  # pixel coordinates


def test_dataset_items_match_the_manifest(tmp_path):
    make_vaihingen(tmp_path / "raw", areas=(1, 3, 2), size=(64, 64))
    out = _prepare("vaihingen", tmp_path / "raw", tmp_path / "out", patch=32)
    ds = PatchDataset(out, "test")
    sample = ds[0]
    assert sample["image"].dtype.is_floating_point and sample["image"].shape == (3, 32, 32)
    assert sample["mask"].shape == (32, 32) and int(sample["mask"].max()) <= IGNORE
    assert len(ds) == sum(len(read_manifest(out)["tiles"][t]["patches"]) for t in ["2"])
    assert json.loads((out / "manifest.json").read_text())["classes"] == list(get_spec("vaihingen").classes)


def test_archives_inside_a_download_archive_are_found(tmp_path):
    """The ISPRS download (e.g. Potsdam.zip) holds the official zips one level down."""
    make_potsdam(tmp_path / "stage", tiles=("2_10", "2_13"), size=(64, 64), zipped=True)
    with zipfile.ZipFile(tmp_path / "Potsdam.zip", "w") as zf:
        for inner in ("4_Ortho_RGBIR.zip", "5_Labels_all.zip"):
            zf.write(tmp_path / "stage" / inner, f"Potsdam/{inner}")
    (tmp_path / "raw").mkdir()
    shutil.move(tmp_path / "Potsdam.zip", tmp_path / "raw" / "Potsdam.zip")
    m = read_manifest(_prepare("potsdam", tmp_path / "raw", tmp_path / "out", patch=64))
    assert m["splits"]["test"] == ["2_13"] and m["splits"]["train"] == ["2_10"]
    assert m["bands"] == "rgb" and m["band_indexes"] == [1, 2, 3]


def test_only_dataset_members_are_extracted(tmp_path):
    make_vaihingen(tmp_path / "raw", areas=(1, 2), size=(32, 32), zipped=True)
    with zipfile.ZipFile(tmp_path / "raw" / "ISPRS_semantic_labeling_Vaihingen.zip", "a") as zf:
        zf.writestr("dsm/dsm_09cm_matching_area1.tif", "not needed")
    with zipfile.ZipFile(tmp_path / "raw" / "unrelated.zip", "w") as zf:
        zf.writestr("notes.txt", "nothing for us")
    out = _prepare("vaihingen", tmp_path / "raw", tmp_path / "out", patch=32)
    extracted = {p.name for p in (out / ".extracted").rglob("*") if p.is_file()}
    assert "top_mosaic_09cm_area1.tif" in extracted
    assert "dsm_09cm_matching_area1.tif" not in extracted and "notes.txt" not in extracted


def test_prepare_command_reports_the_splits(tmp_path):
    from click.testing import CliRunner

    from rsseg.cli import main

    make_vaihingen(tmp_path / "raw", areas=(1, 3, 2), size=(64, 64), zipped=True)
    res = CliRunner().invoke(main, ["prepare", "--dataset", "vaihingen", "--data-root", str(tmp_path / "raw"),
                                    "--patch", "32", "--stride", "16"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "raw" / "prepared-irrg-32"
    assert f"prepared vaihingen (irrg) in {out}: train 1 tiles / 9 patches, val 1 tiles / 4 patches, " \
           "test 1 tiles / 4 patches" in res.output
    res = CliRunner().invoke(main, ["prepare", "--dataset", "potsdam", "--data-root", str(tmp_path / "raw")])
    assert res.exit_code == 1 and res.output.startswith("rsseg: error: no potsdam data under")
