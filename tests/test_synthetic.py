"""Synthetic Vaihingen-like data: determinism, georeference, label coding, layout, scenes."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image

from rsseg.data import synthetic as syn
from rsseg.errors import OutputError, UsageError

# Written out here, independently of the module: ISPRS label colours -> class index.
COLOUR_TO_CLASS = {
    (255, 255, 255): 0,
    (0, 0, 255): 1,
    (0, 255, 255): 2,
    (0, 255, 0): 3,
    (255, 255, 0): 4,
    (255, 0, 0): 5,
}


def decode_rgb(rgb: np.ndarray) -> np.ndarray:
    """(3, H, W) colour label -> class indices; black -> 255; any other colour fails."""
    out = np.full(rgb.shape[1:], 254, dtype=np.uint8)
    for colour, cls in list(COLOUR_TO_CLASS.items()) + [((0, 0, 0), 255)]:
        out[np.all(rgb == np.array(colour, dtype=np.uint8)[:, None, None], axis=0)] = cls
    assert not (out == 254).any(), "label holds a colour outside the ISPRS palette"
    return out


def boundary_band(labels: np.ndarray, radius: int) -> np.ndarray:
    """Pixels with another class within a disc of ``radius``: by explicit shifts (no filters)."""
    h, w = labels.shape
    padded = np.pad(labels, radius, mode="edge")
    band = np.zeros((h, w), dtype=bool)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dx * dx + dy * dy <= radius * radius:
                shifted = padded[radius + dy : radius + dy + h, radius + dx : radius + dx + w]
                band |= shifted != labels
    return band


def test_tile_is_deterministic_and_seeded():
    img, lab = syn.generate_tile((160, 200), seed=3)
    assert img.shape == (3, 160, 200) and img.dtype == np.uint8
    assert lab.shape == (160, 200) and lab.dtype == np.uint8
    img2, lab2 = syn.generate_tile((160, 200), seed=3)
    assert img.tobytes() == img2.tobytes() and lab.tobytes() == lab2.tobytes()
    img3, lab3 = syn.generate_tile((160, 200), seed=4)
    assert not np.array_equal(img, img3)
    assert not np.array_equal(lab, lab3)


def test_tile_has_all_six_classes_and_irrg_colours():
    img, lab = syn.generate_tile(1024, seed=0)
    counts = np.bincount(lab.ravel(), minlength=7)
    assert counts[6:].sum() == 0
    assert (counts[:6] > 0).all(), counts
    nir, red = img[0].astype(float), img[1].astype(float)
    veg = (lab == 2) | (lab == 3)
    # Vegetation is bright in NIR and dark in red (red-ish in an IRRG display) ...
    assert nir[veg].mean() > red[veg].mean() + 50
    # ... impervious surfaces are grey: NIR close to red.
    imp = lab == 0
    assert abs(nir[imp].mean() - red[imp].mean()) < 15
    # Trees are textured: neighbouring pixels differ more than on low vegetation.
    same = lab[:, 1:] == lab[:, :-1]
    step = np.abs(np.diff(nir, axis=1))
    assert step[same & (lab[:, 1:] == 3)].mean() > 1.3 * step[same & (lab[:, 1:] == 2)].mean()


@pytest.mark.parametrize("seed", [1, 2])
def test_all_classes_over_seeds(seed):
    _, lab = syn.generate_tile(1024, seed=seed)
    assert set(np.unique(lab)) == set(range(6))


def test_window_matches_crop_of_larger_rendering():
    big_img, big_lab = syn.render_window(11, -100, 50, 300, 360)
    img, lab = syn.render_window(11, 37, 171, 90, 110)
    assert np.array_equal(img, big_img[:, 137:227, 121:231])
    assert np.array_equal(lab, big_lab[137:227, 121:231])


def test_eroded_band_matches_independent_reference():
    _, lab = syn.generate_tile(256, seed=5)
    band = syn.erode_boundaries(lab, 3)
    assert np.array_equal(band, boundary_band(lab, 3))
    assert band.any() and not band.all()


def test_vaihingen_layout_extracted(tmp_path: Path):
    areas, sizes = [1, 2], {1: (150, 170), 2: 130}
    root = syn.write_vaihingen_layout(tmp_path / "vh", areas=areas, size=sizes, seed=7)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert files == [
        "gts_for_participants/top_mosaic_09cm_area1.tif",  # area 1 is a training area
        "top/top_mosaic_09cm_area1.tif",
        "top/top_mosaic_09cm_area2.tif",
        "top_mosaic_09cm_area1.tif",
        "top_mosaic_09cm_area1_noBoundary.tif",
        "top_mosaic_09cm_area2.tif",
        "top_mosaic_09cm_area2_noBoundary.tif",
    ]
    assert files == syn.vaihingen_relative_paths(areas)
    origins = set()
    for a, (h, w) in ((1, (150, 170)), (2, (130, 130))):
        ref_img, ref_lab = syn.generate_tile((h, w), syn.area_seed(7, a))
        east, north = syn.area_origin(a)
        origins.add((east, north))
        paths = [
            root / "top" / f"top_mosaic_09cm_area{a}.tif",
            root / f"top_mosaic_09cm_area{a}.tif",
            root / f"top_mosaic_09cm_area{a}_noBoundary.tif",
        ]
        for p in paths:
            with rasterio.open(p) as src:
                assert src.crs.to_epsg() == 32632
                assert src.res == pytest.approx((0.09, 0.09))
                assert (src.transform.c, src.transform.f) == pytest.approx((east, north))
                assert (src.count, src.dtypes[0], src.shape) == (3, "uint8", (h, w))
        with rasterio.open(paths[0]) as src:
            assert np.array_equal(src.read(), ref_img)
        with rasterio.open(paths[1]) as src:
            full = decode_rgb(src.read())
        assert np.array_equal(full, ref_lab)
        with rasterio.open(paths[2]) as src:
            eroded = decode_rgb(src.read())
        band = boundary_band(ref_lab, 3)
        assert np.array_equal(eroded[~band], ref_lab[~band])
        assert (eroded[band] == 255).all() and band.any()
        # The way torchgeo's Vaihingen2D loads files (PIL, RGB) sees the same pixels.
        with Image.open(paths[0]) as im:
            assert np.array_equal(np.moveaxis(np.array(im.convert("RGB")), -1, 0), ref_img)
    assert len(origins) == 2


def test_all_six_classes_in_written_labels(tmp_path: Path):
    root = syn.write_vaihingen_layout(tmp_path, areas=[5], size=1024, seed=0)
    with rasterio.open(root / "top_mosaic_09cm_area5.tif") as src:
        assert set(np.unique(decode_rgb(src.read()))) == set(range(6))


def test_vaihingen_layout_zipped(tmp_path: Path):
    syn.write_vaihingen_layout(tmp_path / "z", areas=[3, 4], size=96, seed=1, as_zip=True)
    syn.write_vaihingen_layout(tmp_path / "x", areas=[3, 4], size=96, seed=1)
    assert sorted(p.name for p in (tmp_path / "z").iterdir()) == sorted(
        [syn.IMAGE_ARCHIVE, syn.LABEL_ARCHIVE, syn.ERODED_ARCHIVE]
    )
    expected = {
        syn.IMAGE_ARCHIVE: [
            "gts_for_participants/top_mosaic_09cm_area3.tif",
            "top/top_mosaic_09cm_area3.tif",
            "top/top_mosaic_09cm_area4.tif",
        ],
        syn.LABEL_ARCHIVE: ["top_mosaic_09cm_area3.tif", "top_mosaic_09cm_area4.tif"],
        syn.ERODED_ARCHIVE: [
            "top_mosaic_09cm_area3_noBoundary.tif",
            "top_mosaic_09cm_area4_noBoundary.tif",
        ],
    }
    for archive, members in expected.items():
        with zipfile.ZipFile(tmp_path / "z" / archive) as zf:
            assert sorted(zf.namelist()) == members
            for m in members:  # same content as the extracted layout
                with rasterio.open(zf.open(m)) as a, rasterio.open(tmp_path / "x" / m) as b:
                    assert np.array_equal(a.read(), b.read())
                    assert a.transform == b.transform and a.crs == b.crs


def test_scene_is_seamless_across_window_sizes(tmp_path: Path):
    h, w = 700, 530
    a = syn.write_scene(tmp_path / "a.tif", h, w, seed=2, tile=256, labels_path=tmp_path / "la.tif")
    b = syn.write_scene(tmp_path / "b.tif", h, w, seed=2, tile=384, labels_path=tmp_path / "lb.tif")
    c = syn.write_scene(tmp_path / "c.tif", h, w, seed=2, blockwise=False)
    with rasterio.open(a) as sa, rasterio.open(b) as sb, rasterio.open(c) as sc:
        assert sa.crs.to_epsg() == 32632 and sa.res == pytest.approx((0.09, 0.09))
        assert sa.transform == sb.transform == sc.transform
        assert sa.block_shapes[0] == (256, 256) and sa.compression is not None
        pa = sa.read()
        assert np.array_equal(pa, sb.read()) and np.array_equal(pa, sc.read())
        assert sa.nodata is None
    with rasterio.open(tmp_path / "la.tif") as la, rasterio.open(tmp_path / "lb.tif") as lb:
        labels = la.read(1)
        assert np.array_equal(labels, lb.read(1))
        assert la.colormap(1)[1][:3] == (0, 0, 255)
    # A window of the scene equals a crop: content comes from global coordinates only.
    img, lab = syn.render_window(syn.scene_seed(2), 300, 200, 80, 90)
    assert np.array_equal(img, pa[:, 300:380, 200:290]) and np.array_equal(
        lab, labels[300:380, 200:290]
    )


def test_scene_nodata_border_and_dtypes(tmp_path: Path):
    h, w, border = 300, 260, 30
    p8 = syn.write_scene(
        tmp_path / "s8.tif",
        h,
        w,
        seed=4,
        tile=128,
        nodata_border=border,
        labels_path=tmp_path / "l.tif",
    )
    p16 = syn.write_scene(
        tmp_path / "s16.tif", h, w, seed=4, tile=200, nodata_border=border, dtype="uint16"
    )
    pf = syn.write_scene(tmp_path / "sf.tif", h, w, seed=4, nodata_border=border, dtype="float32")
    with rasterio.open(p8) as s8, rasterio.open(p16) as s16, rasterio.open(pf) as sf:
        assert s8.nodata == 0 and s16.nodata == 0 and sf.nodata == 0
        a8, a16, af = s8.read(), s16.read(), sf.read()
        masks = s8.read_masks()
    assert a16.dtype == np.uint16 and af.dtype == np.float32
    invalid = (a8 == 0).all(axis=0)
    assert np.array_equal(invalid, (a8 == 0).any(axis=0))  # all bands or none
    assert np.array_equal(masks[0] == 0, invalid)  # GDAL sees exactly these as nodata
    # The border is there on every side, irregular, and leaves the centre valid.
    assert invalid[0].all() and invalid[-1].all() and invalid[:, 0].all() and invalid[:, -1].all()
    assert not invalid[h // 2, w // 2]
    assert len({int(invalid[:, c].argmin()) for c in range(w // 3, 2 * w // 3)}) > 3
    assert 0.2 < invalid.mean() < 0.6
    assert np.array_equal(a16, a8.astype(np.uint16) * 16)
    np.testing.assert_allclose(af, a8.astype(np.float32) / 255.0, rtol=1e-6)
    with rasterio.open(tmp_path / "l.tif") as lab:
        assert lab.nodata == 255
        assert np.array_equal(lab.read(1) == 255, invalid)


def test_user_errors(tmp_path: Path):
    with pytest.raises(UsageError):
        syn.write_scene(tmp_path / "never.tif", 10, 10, dtype="int8")
    with pytest.raises(UsageError):
        syn.generate_tile(0, seed=1)
    with pytest.raises(UsageError):
        syn.write_vaihingen_layout(tmp_path / "never", areas=[0])
    with pytest.raises(UsageError):
        syn.write_vaihingen_layout(tmp_path / "never", areas=[1, 2], size={1: 32})
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match="a_file"):
        syn.write_scene(blocker / "scene.tif", 10, 10)
    with pytest.raises(OutputError, match="a_file"):
        syn.write_vaihingen_layout(blocker / "root", areas=[1], size=8)
    assert not (tmp_path / "never").exists()


def test_scene_is_rendered_window_by_window(tmp_path: Path, monkeypatch):
    seen = []
    real = syn.render_window

    def spy(seed, r0, c0, h, w, **kw):
        seen.append((r0, c0, h, w))
        return real(seed, r0, c0, h, w, **kw)

    monkeypatch.setattr(syn, "render_window", spy)
    syn.write_scene(tmp_path / "s.tif", 300, 200, seed=0, tile=128)
    # Never more than one tile in memory; the windows cover the scene exactly once.
    assert max(h for *_, h, _ in seen) <= 128 and max(w for *_, w in seen) <= 128
    cover = np.zeros((300, 200), dtype=int)
    for r0, c0, h, w in seen:
        cover[r0 : r0 + h, c0 : c0 + w] += 1
    assert (cover == 1).all()
    syn.write_scene_labels(tmp_path / "l.tif", 300, 200, seed=0, tile=128)
    with rasterio.open(tmp_path / "s.tif") as s, rasterio.open(tmp_path / "l.tif") as lab:
        img, labels = real(syn.scene_seed(0), 0, 0, 300, 200)
        assert np.array_equal(s.read(), img) and np.array_equal(lab.read(1), labels)


def test_default_areas_are_the_33_official_ones(tmp_path: Path):
    root = syn.write_vaihingen_layout(tmp_path, size=8, seed=0)
    official = [
        1,
        2,
        3,
        4,
        5,
        6,
        7,
        8,
        10,
        11,
        12,
        13,
        14,
        15,
        16,
        17,
        20,
        21,
        22,
        23,
        24,
        26,
        27,
        28,
        29,
        30,
        31,
        32,
        33,
        34,
        35,
        37,
        38,
    ]
    images = sorted(
        int(p.stem.removeprefix("top_mosaic_09cm_area")) for p in (root / "top").iterdir()
    )
    assert images == official
    assert len(list((root / "gts_for_participants").iterdir())) == 16
    assert len(list(root.glob("*_noBoundary.tif"))) == 33


def test_realistic_area_sizes_are_seeded_and_in_range():
    sizes = syn.area_sizes([1, 2, 3, 4, 5], seed=3)
    assert sizes == syn.area_sizes([1, 2, 3, 4, 5], seed=3)
    assert sizes != syn.area_sizes([1, 2, 3, 4, 5], seed=4)
    assert all(1900 <= s <= 3800 for hw in sizes.values() for s in hw)
    assert len(set(sizes.values())) == 5


def test_project_loader_finds_the_layout(tmp_path: Path):
    layouts = pytest.importorskip("rsseg.data.layouts")
    syn.write_vaihingen_layout(tmp_path / "raw", areas=[1, 2], size=64, seed=0, as_zip=True)
    tiles = {
        t.tile_id: t
        for t in layouts.find_source_tiles("vaihingen", tmp_path / "raw", tmp_path / "work")
    }
    assert sorted(tiles) == ["1", "2"]
    assert tiles["1"].split == "train" and tiles["2"].split == "test"
    assert tiles["2"].label.name == "top_mosaic_09cm_area2_noBoundary.tif"
