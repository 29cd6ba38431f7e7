"""``rsseg demo``: the whole path from data to a styled QGIS map, on a laptop CPU in minutes.

Synthetic Vaihingen-like tiles -> a short training run of a small model -> the evaluation table
on held-out test tiles -> prediction of a held-out synthetic scene several tiles wide -> a class
COG, a styled GeoPackage and a PNG preview. The scene is generated with a different seed and at
a place the training tiles do not cover, and its true labels are written beside it, so the
printed scene mIoU is a held-out score as well.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import rasterio

from rsseg.errors import OutputError


@dataclass
class DemoConfig:
    out: Path = Path("rsseg-demo")
    model: str = "unet-r18"
    # Synthetic training data: Vaihingen area numbers (train + test split as in the real dataset).
    train_areas: list[int] = field(default_factory=lambda: [1, 3, 5, 7, 11, 13, 15, 17])
    test_areas: list[int] = field(default_factory=lambda: [2, 4])
    area_size: int = 1024
    # Prepared (and evaluated) patches; training crops are smaller: a U-Net-ResNet18 step on
    # 8 x 128 px costs about 1.25 CPU-seconds, on 8 x 256 px about 5.2 (measured on one core).
    patch_size: int = 256
    crop_size: int = 128
    batch_size: int = 8
    max_steps: int = 300
    val_every: int = 3  # epochs (about 36 steps each); the final step is validated too
    lr: float = 2e-3
    # Held-out scene, predicted with the streaming predictor.
    scene_height: int = 1024
    scene_width: int = 2560
    tile: int = 512
    overlap: int = 64
    seed: int = 0
    progress: bool = True
    overwrite: bool = False

    @classmethod
    def quick(cls, out: Path) -> "DemoConfig":
        """A seconds-long variant for tests: same steps, tiny sizes (the score means nothing)."""
        return cls(out=out, train_areas=[1, 3], test_areas=[2], area_size=128, patch_size=64,
                   crop_size=64, batch_size=2, max_steps=2, val_every=1, scene_height=96,
                   scene_width=200, tile=64, overlap=16)


@dataclass
class DemoResult:
    bundle: Path
    test_miou: float
    scene_miou: float
    scene: Path
    classes: Path
    vectors: Path
    preview: Path
    seconds: float


def _scene_miou(pred_path: Path, label_path: Path, num_classes: int, mean_classes: tuple[int, ...]) -> float:
    """mIoU of a predicted class raster against a label raster, block by block."""
    import torch  # here, not at the top: the CLI reads DemoConfig's defaults without torch

    from rsseg.train.metrics import confusion_matrix, scores_from_confusion

    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    with rasterio.open(pred_path) as pred, rasterio.open(label_path) as lab:
        for _, win in pred.block_windows(1):
            p = torch.from_numpy(pred.read(1, window=win).astype(np.int64))
            t = torch.from_numpy(lab.read(1, window=win).astype(np.int64))
            t[p == 255] = 255  # nodata in the prediction is nodata in the labels too
            cm += confusion_matrix(p, t, num_classes, ignore_index=255)
    return scores_from_confusion(cm, mean_classes).miou


GAP = 8  # pixels between the panels of the preview
# Share of the demo's time each stage took on a 2-core CPU (360 of 380 s trained); used only for the
# progress line's estimate of the time left.
STAGE_SHARES = (0.94, 0.015, 0.04, 0.005)


def progress_line(stage: int, elapsed: float) -> str:
    """``elapsed 190 s, about 40 s left`` once ``stage`` (1-based) stages have finished."""
    done = sum(STAGE_SHARES[:stage])
    left = elapsed * (1 - done) / done if done > 0 else 0.0
    return f"elapsed {elapsed:.0f} s, about {left:.0f} s left"
LEGEND_ROW = 16  # height of one legend row


def write_preview(scene: Path, classes: Path, out: Path, max_width: int = 1600, *,
                  labels: Path | None = None, class_names: list[str] | None = None) -> Path:
    """PNG: the scene (first three bands), the ground truth (when ``labels`` is given) and the
    prediction in class colours side by side; with ``class_names``, a legend underneath
    (a colour swatch and the name of each class)."""
    from PIL import Image, ImageDraw

    panels = 3 if labels is not None else 2
    with rasterio.open(scene) as src, rasterio.open(classes) as cls:
        scale = min(1.0, max_width / (panels * src.width))
        h, w = max(1, round(src.height * scale)), max(1, round(src.width * scale))
        nearest = rasterio.enums.Resampling.nearest
        image = src.read([1, 2, 3], out_shape=(3, h, w), resampling=rasterio.enums.Resampling.average)
        predicted = cls.read(1, out_shape=(h, w), resampling=nearest)
        cmap = cls.colormap(1)
    palette = np.zeros((256, 3), np.uint8)
    for k, rgba in cmap.items():
        palette[k] = rgba[:3]
    maps = [predicted]
    if labels is not None:
        with rasterio.open(labels) as lab:
            truth = lab.read(1, out_shape=(h, w), resampling=nearest)
        truth[predicted == 255] = 255  # the scene's nodata is nodata in both panels
        maps.insert(0, truth)
    rows = 0 if not class_names else -(-len(class_names) // 3)
    legend_height = rows * LEGEND_ROW + (GAP if rows else 0)
    canvas = np.full((h + legend_height, panels * w + (panels - 1) * GAP, 3), 255, np.uint8)
    canvas[:h] = 0
    canvas[:h, :w] = np.moveaxis(image, 0, -1)
    for i, classes_map in enumerate(maps, start=1):
        left = i * (w + GAP)
        canvas[:h, left : left + w] = palette[classes_map]
    picture = Image.fromarray(canvas)
    if class_names:
        draw = ImageDraw.Draw(picture)
        column = canvas.shape[1] // 3
        for k, name in enumerate(class_names):
            x, y = (k % 3) * column + 4, h + GAP + (k // 3) * LEGEND_ROW
            draw.rectangle([x, y + 2, x + 10, y + 12], fill=tuple(int(c) for c in palette[k]),
                           outline=(0, 0, 0))
            draw.text((x + 14, y + 1), name, fill=(0, 0, 0))
    picture.save(out)
    return out


def run_demo(cfg: DemoConfig, echo: Callable[[str], None] = print) -> DemoResult:
    from rsseg.bundle import load_bundle
    from rsseg.config import AugmentConfig, TrainConfig
    from rsseg.data.specs import get_spec
    from rsseg.data.synthetic import write_scene
    from rsseg.inference.predict import PredictOptions
    from rsseg.inference.run import predict_scenes
    from rsseg.train.evaluate import evaluate
    from rsseg.train.fit import train

    start = time.perf_counter()
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise OutputError(f"{out} exists and is not empty; pass --overwrite or another --out")
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise OutputError(f"output folder {out} is not writable")
    spec = get_spec("synthetic")

    echo(f"[1/4] synthetic data and a {cfg.model} training run ({cfg.max_steps} steps, "
         f"{cfg.batch_size} x {cfg.crop_size} px crops) ...")
    train_cfg = TrainConfig(
        dataset="synthetic",
        data_dir=str(out / "data"),
        synthetic_areas=sorted(cfg.train_areas + cfg.test_areas),
        synthetic_tile_size=cfg.area_size,
        patch_size=cfg.patch_size,
        crop_size=cfg.crop_size,
        # A few hundred steps learn faster without the scale jitter and mosaics of long runs.
        augment=AugmentConfig(scales=(1.0,), mosaic_p=0.0),
        val_every=cfg.val_every,
        model=cfg.model,
        epochs=-1,
        max_steps=cfg.max_steps,
        batch_size=cfg.batch_size,
        val_batch_size=4,
        lr=cfg.lr,
        pretrained=None,  # synthetic data, trained from scratch: the encoder learns at the full rate
        backbone_lr=None,
        # The bundle is the final step's: a short cosine run ends at its best-annealed weights,
        # and the held-out scores below are then the final model's.
        bundle_from="last",
        scheduler="cosine",
        workers=0,
        seed=cfg.seed,
        output_dir=str(out / "runs"),
        run_name="demo",
        progress=cfg.progress,
    )
    trained = train(train_cfg)
    bundle = trained.bundle_path
    echo(f"      trained in {time.perf_counter() - start:.0f} s -> {bundle}")

    echo(f"[2/4] evaluation on the held-out test tiles ({progress_line(1, time.perf_counter() - start)})")
    result = evaluate(bundle, "synthetic", data_dir=trained.data_dir, split="test", progress=False)
    echo(result.format_table())

    echo(f"[3/4] a held-out scene, predicted window by window "
         f"({progress_line(2, time.perf_counter() - start)})")
    scene = out / "scene.tif"
    labels = out / "scene_labels.tif"
    write_scene(scene, cfg.scene_height, cfg.scene_width, seed=cfg.seed + 1, tile=512,
                nodata_border=max(8, cfg.scene_height // 20), labels_path=labels)
    model, meta = load_bundle(bundle)
    classes, vectors = out / "landcover.tif", out / "landcover.gpkg"
    predict_scenes([scene], vectors, model, meta, raster=classes, overwrite=cfg.overwrite,
                   options=PredictOptions(tile=cfg.tile, overlap=cfg.overlap, batch_size=2,
                                          progress=cfg.progress),
                   echo=lambda s: echo("      " + s))
    scene_miou = _scene_miou(classes, labels, spec.num_classes, spec.mean_class_indices)
    echo(f"      held-out scene mIoU {100 * scene_miou:.2f} (without clutter, ISPRS convention)")

    echo(f"[4/4] preview ({progress_line(3, time.perf_counter() - start)})")
    preview = write_preview(scene, classes, out / "preview.png", labels=labels,
                            class_names=list(spec.classes))
    seconds = time.perf_counter() - start
    echo(f"held-out test mIoU {100 * result.miou:.2f}, scene mIoU {100 * scene_miou:.2f}, "
         f"{seconds:.0f} s in all")
    echo(f"Open in QGIS: {vectors} (styled polygons) and {classes} (class COG) over {scene}; "
         f"preview: {preview}")
    return DemoResult(bundle, result.miou, scene_miou, scene, classes, vectors, preview, seconds)
