"""Small fake copies of the official dataset layouts (zipped or extracted) for the data tests.

Images are made so that the class can be read off the pixel colour (plus noise), which lets a
tiny network learn them in a few steps; labels are colour-coded like the real ones.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import rasterio
from PIL import Image
from rasterio.transform import from_origin

from rsseg.data.specs import ISPRS_COLORS

# Image colour per ISPRS class (distinct enough to learn from the pixel alone).
CLASS_TONES = np.array(
    [[200, 200, 200], [40, 40, 160], [60, 200, 200], [30, 120, 30], [220, 220, 40], [160, 30, 30]],
    dtype=np.int32,
)


def class_map(height: int, width: int, seed: int, num_classes: int = 6) -> np.ndarray:
    """Random axis-aligned rectangles of classes: a blocky land-cover map."""
    rng = np.random.default_rng(seed)
    cls = np.zeros((height, width), dtype=np.uint8)
    for _ in range(12):
        c = rng.integers(num_classes)
        y0, x0 = rng.integers(0, height), rng.integers(0, width)
        h, w = rng.integers(height // 8 + 1, height // 2 + 2), rng.integers(width // 8 + 1, width // 2 + 2)
        cls[y0 : y0 + h, x0 : x0 + w] = c
    return cls


def image_for(cls: np.ndarray, seed: int, bands: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed + 1000)
    tones = CLASS_TONES[cls % len(CLASS_TONES)]  # H, W, 3
    if bands > 3:
        tones = np.concatenate([tones, tones[..., :1][..., ::-1]], axis=-1)
    noisy = tones.transpose(2, 0, 1) + rng.normal(0, 12, size=(tones.shape[2],) + cls.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def rgb_label(cls: np.ndarray, colors=ISPRS_COLORS) -> np.ndarray:
    return np.asarray(colors, dtype=np.uint8)[cls].transpose(2, 0, 1)


def decode_rgb_label(path: Path, ignore: int = 6) -> np.ndarray:
    """ISPRS colour-coded label file -> class indices, any other colour (the eroded black
    boundary) -> ``ignore``; written here, apart from rsseg's decoder, so tests can check it."""
    with rasterio.open(path) as src:
        rgb = src.read()
    labels = np.full(rgb.shape[1:], ignore, dtype=np.int64)
    for index, color in enumerate(ISPRS_COLORS):
        labels[np.all(rgb == np.array(color)[:, None, None], axis=0)] = index
    return labels


def write_tif(path: Path, data: np.ndarray, origin=(500000.0, 5400000.0), gsd=0.09, crs="EPSG:32632"):
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(
        path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
        dtype=data.dtype, crs=crs, transform=from_origin(origin[0], origin[1], gsd, gsd),
    ) as dst:
        dst.write(data)


def zip_folder(folder: Path, archive: Path, arc_prefix: str = "") -> Path:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, arc_prefix + str(path.relative_to(folder)))
    return archive


def make_vaihingen(root: Path, areas=(1, 3, 5, 7, 2, 4), size=(300, 260), zipped=False,
                   eroded=True, crs="EPSG:32632") -> dict[str, np.ndarray]:
    """Vaihingen layout: top/top_mosaic_09cm_areaN.tif + label top_mosaic_09cm_areaN.tif
    (+ eroded ..._noBoundary.tif with a black boundary). Returns class maps per area."""
    stage = root / "_stage" if zipped else root
    maps = {}
    for i, area in enumerate(areas):
        h, w = size
        cls = class_map(h, w, seed=area)
        maps[str(area)] = cls
        origin = (500000.0 + 100 * area, 5400000.0)
        write_tif(stage / "images" / "top" / f"top_mosaic_09cm_area{area}.tif", image_for(cls, area),
                  origin=origin, crs=crs)
        write_tif(stage / "gt" / f"top_mosaic_09cm_area{area}.tif", rgb_label(cls), origin=origin, crs=crs)
        if eroded:
            lab = rgb_label(cls)
            lab[:, :, 10:12] = 0  # a black "boundary" stripe
            write_tif(stage / "eroded" / f"top_mosaic_09cm_area{area}_noBoundary.tif", lab,
                      origin=origin, crs=crs)
    if zipped:
        zip_folder(stage / "images", root / "ISPRS_semantic_labeling_Vaihingen.zip")
        zip_folder(stage / "gt", root / "ISPRS_semantic_labeling_Vaihingen_ground_truth_COMPLETE.zip")
        if eroded:
            zip_folder(stage / "eroded",
                       root / "ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE.zip")
        import shutil

        shutil.rmtree(stage)
    else:
        # Extracted: images in top/, labels beside it at the root (as the COMPLETE zip extracts).
        for sub in ("gt", "eroded"):
            if (stage / sub).is_dir():
                for f in (stage / sub).iterdir():
                    f.rename(root / f.name)
                (stage / sub).rmdir()
        (stage / "images" / "top").rename(root / "top")
        (stage / "images").rmdir()
    return maps


def make_potsdam(root: Path, tiles=("2_10", "2_11", "2_13"), size=(200, 180), zipped=False
                 ) -> dict[str, np.ndarray]:
    """Potsdam layout: 4_Ortho_RGBIR/top_potsdam_X_Y_RGBIR.tif (R,G,B,IR) + top_potsdam_X_Y_label.tif."""
    stage = root / "_stage" if zipped else root
    maps = {}
    for k, tile in enumerate(tiles):
        cls = class_map(*size, seed=50 + k)
        maps[tile] = cls
        origin = (360000.0 + 50 * k, 5810000.0)
        write_tif(stage / "4_Ortho_RGBIR" / f"top_potsdam_{tile}_RGBIR.tif", image_for(cls, k, bands=4),
                  origin=origin, gsd=0.05, crs="EPSG:32633")
        write_tif(stage / "labels" / f"top_potsdam_{tile}_label.tif", rgb_label(cls),
                  origin=origin, gsd=0.05, crs="EPSG:32633")
    if zipped:
        # The official 4_Ortho_RGBIR.zip holds the 4_Ortho_RGBIR/ folder; 5_Labels_all.zip is flat.
        zip_folder(stage / "4_Ortho_RGBIR", root / "4_Ortho_RGBIR.zip", arc_prefix="4_Ortho_RGBIR/")
        zip_folder(stage / "labels", root / "5_Labels_all.zip")
        import shutil

        shutil.rmtree(stage)
    else:
        for f in (stage / "labels").iterdir():
            f.rename(root / f.name)
        (stage / "labels").rmdir()
    return maps


def make_loveda(root: Path, counts=None, size=64, zipped=False) -> dict[str, np.ndarray]:
    """LoveDA layout: {Train,Val}/{Urban,Rural}/{images_png,masks_png}/N.png; mask 0 = no-data.
    A "Test" entry in ``counts`` writes images only, as the official Test set has no masks."""
    counts = counts or {"Train": 3, "Val": 2}
    stage = root / "_stage" if zipped else root
    maps = {}
    number = 0
    for split, n in counts.items():
        for i in range(n):
            scene = "Urban" if i % 2 == 0 else "Rural"
            cls = class_map(size, size, seed=200 + number, num_classes=7)
            mask = cls.astype(np.uint8) + 1
            mask[:4, :4] = 0  # no-data corner
            base = stage / split / scene
            (base / "images_png").mkdir(parents=True, exist_ok=True)
            Image.fromarray(image_for(cls, number).transpose(1, 2, 0)).save(base / "images_png" / f"{number}.png")
            if split != "Test":
                (base / "masks_png").mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(base / "masks_png" / f"{number}.png")
            maps[f"{split.lower()}-{scene.lower()}-{number}"] = mask
            number += 1
    if zipped:
        import shutil

        for split in counts:
            zip_folder(stage / split, root / f"{split}.zip", arc_prefix=f"{split}/")
        shutil.rmtree(stage)
    return maps
