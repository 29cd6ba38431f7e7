"""Training straight from the user's scenes: no patch folder, windows sampled on the fly.

``rsseg train --images GLOB --labels FILE --label-field NAME [--classes FILE]`` builds the same
classes, block split and dataset spec as ``rsseg prepare --images`` (:mod:`rsseg.data.own`,
whose functions are reused), but nothing is written: each scene is a torchgeo
:class:`~torchgeo.datasets.RasterDataset` configured with the scene's own CRS and resolution (so
nothing is resampled), torchgeo's :class:`~torchgeo.samplers.RandomGeoSampler` draws training
boxes inside each training block (a fresh box for every training sample; the boxes drawn at
construction, seeded, give the epoch length and the mean/std sample) and :class:`~torchgeo.samplers.GridGeoSampler` tiles each
validation block. Every box is snapped to the scene's pixel grid, the image window is read by
the torchgeo dataset, and the label of that window is rasterized by own.py's label source on the
same grid (unlabelled and pixels without image data = ignore).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from rasterio.windows import Window
from torch.utils.data import Dataset
from torchgeo.datasets import RasterDataset
from torchgeo.samplers import GridGeoSampler, RandomGeoSampler

from rsseg.data.augment import train_transform
from rsseg.data.own import (
    RASTER_SUFFIXES,
    ClassTable,
    Scene,
    _Block,
    _gsd_m,
    _pad,
    expand_inputs,
    labelled_scenes,
    open_labels,
    read_scenes,
    spec_document,
    split_blocks,
)
from rsseg.data.radiometry import band_label, band_statistics, decide_alpha, read_valid
from rsseg.errors import DataError, UsageError

# Training windows drawn per epoch per training block, and windows used for mean/std/radiometry.
WINDOWS_PER_BLOCK = 16
STAT_WINDOWS = 64


class SceneRaster(RasterDataset):
    """One scene as a torchgeo dataset on the scene's own CRS and resolution."""

    filename_glob = "*"
    is_image = True
    separate_files = False

    def __init__(self, scene: Scene) -> None:
        self.scene = scene
        super().__init__(paths=[str(scene.path)], crs=scene.crs,
                         res=(abs(scene.transform.a), abs(scene.transform.e)))


def block_polygon(b: _Block):
    import shapely
    from rasterio.windows import bounds as window_bounds

    return shapely.box(*window_bounds(b.window, b.scene.transform))


def _snap(scene: Scene, box: Any, size: int) -> Window:
    """The pixel window of ``size`` on the scene's grid whose origin is nearest the box's."""
    x, y = box[0], box[1]
    col, row = ~scene.transform * (x.start, y.stop)  # upper-left corner
    return Window(int(round(col)), int(round(row)), size, size)


@dataclass
class SceneWindow:
    block: _Block
    window: Window  # in scene pixels, inside the block


class SceneWindows(Dataset):
    """Windows of the scenes' blocks: image read by torchgeo, label rasterized by own.py."""

    def __init__(self, windows: list[SceneWindow], rasters: dict[str, SceneRaster], source: Any,
                 table: ClassTable, patch: int, augment: Any = None, crop_size: int | None = None) -> None:
        self.windows = windows
        self.patch = patch
        self.samplers: dict[str, RandomGeoSampler] = {}  # per training block, to redraw windows
        self.rasters = rasters
        self.source = source
        self.table = table
        self.ignore_index = table.ignore_index
        self.augment = augment
        self.crop_size = crop_size

    def __len__(self) -> int:
        return len(self.windows)

    def window_of(self, index: int) -> SceneWindow:
        """Training: a fresh box from the block's RandomGeoSampler on every call (torch's global
        generator, seeded per worker and epoch by the loader); validation: the fixed grid window."""
        item = self.windows[index]
        sampler = self.samplers.get(item.block.block_id)
        if sampler is None:
            return item
        box = next(iter(sampler))
        size = int(item.window.width)
        return SceneWindow(item.block, _window_in_block(item.block, _snap(item.block.scene, box, size)))

    def query(self, scene: Scene, window: Window) -> tuple[slice, slice, slice]:
        from rasterio.windows import bounds as window_bounds

        x0, y0, x1, y1 = window_bounds(window, scene.transform)
        res = self.rasters[scene.scene_id].res
        return (slice(x0, x1, res[0]), slice(y0, y1, res[1]), slice(None, None))

    def read(self, index: int, item: SceneWindow | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(image in source units, float32 (C, H, W); uint8 label (H, W)) of ``item``, default
        the ``index``-th window drawn at construction."""
        item = item or self.windows[index]
        scene, window = item.block.scene, item.window
        raster = self.rasters[scene.scene_id]
        sample = raster[self.query(scene, window)]
        image = sample["image"].numpy()
        label = self.source.burn(window, scene)
        with rasterio.open(scene.path) as src:
            alpha = decide_alpha(src, list(range(1, scene.count + 1)), scene.path.name)
            valid = read_valid(src, window, alpha)
        if image.dtype.kind == "f":
            valid &= np.isfinite(image).all(axis=0)
        label[~valid] = self.ignore_index
        # A window of a block smaller than the patch is padded as prepared patches are.
        return (_pad(image.astype(np.float32, copy=False), self.patch, 0),
                _pad(label, self.patch, self.ignore_index))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image, label = self.read(index, self.window_of(index))
        image_t, mask_t = torch.from_numpy(image), torch.from_numpy(label)
        if self.augment is not None:
            return dict(zip(("image", "mask"), train_transform(image_t, mask_t, self.augment,
                                                               self.crop_size or image.shape[-1],
                                                               self.ignore_index)))
        return {"image": image_t.float(), "mask": mask_t.long()}


@dataclass
class SceneData:
    """What ``train`` needs from the scenes: spec (as dataset.json would hold), a manifest-like
    dict (bands, mean/std, radiometry), the datasets and where the scenes are."""

    spec: dict[str, Any]
    manifest: dict[str, Any]
    train: SceneWindows
    val: SceneWindows
    root: Path


def _window_in_block(b: _Block, window: Window) -> Window:
    """Clamp ``window``'s origin so it lies inside the block (blocks are at least a window)."""
    col = min(max(window.col_off, b.window.col_off), b.window.col_off + b.window.width - window.width)
    row = min(max(window.row_off, b.window.row_off), b.window.row_off + b.window.height - window.height)
    return Window(int(col), int(row), int(window.width), int(window.height))


def scene_data(images: Any, labels: Any, *, label_field: str | None, classes: Any = None,
               patch: int = 512, block: int | None = None, val_fraction: float = 0.2, seed: int = 0,
               augment: Any = None, crop_size: int | None = None, name: str = "scenes") -> SceneData:
    """Classes, block split, spec and on-the-fly datasets of the user's scenes (see module doc)."""
    if patch < 16:
        raise UsageError(f"--patch-size must be at least 16, got {patch}")
    block = math.ceil((block or 4 * patch) / patch) * patch
    scenes = read_scenes(expand_inputs(images, "--images", RASTER_SUFFIXES))
    label_paths, source = open_labels(labels, label_field, classes)
    table = source.table
    labelled = labelled_scenes(scenes, source, label_paths)
    blocks = split_blocks(labelled, lambda scene, window: source.burn(window, scene), table, block, val_fraction, seed, scenes[0].crs)
    rasters = {s.scene_id: SceneRaster(s) for s in labelled}

    generator = torch.Generator().manual_seed(seed)
    train_windows: list[SceneWindow] = []
    val_windows: list[SceneWindow] = []
    for b in sorted(blocks, key=lambda b: b.block_id):
        raster = rasters[b.scene.scene_id]
        size = min(patch, int(b.window.width), int(b.window.height))
        if b.split == "train":
            sampler = RandomGeoSampler(raster, size, length=WINDOWS_PER_BLOCK, roi=block_polygon(b),
                                       generator=generator)
            boxes, target = list(sampler), train_windows
        else:
            sampler = GridGeoSampler(raster, size, stride=size, roi=block_polygon(b))
            boxes, target = list(sampler), val_windows
        for box in boxes:
            target.append(SceneWindow(b, _window_in_block(b, _snap(b.scene, box, size))))
    train_ds = SceneWindows(train_windows, rasters, source, table, patch, augment, crop_size)
    for b in blocks:
        if b.split == "train":
            size = min(patch, int(b.window.width), int(b.window.height))
            train_ds.samplers[b.block_id] = RandomGeoSampler(rasters[b.scene.scene_id], size, length=1,
                                                             roi=block_polygon(b))
    val_ds = SceneWindows(val_windows, rasters, source, table, patch)
    if not train_windows:
        raise DataError("no training blocks with labelled pixels; lower --val-fraction or add labels")

    # mean / std / radiometry from labelled pixels of a sample of training windows.
    count = scenes[0].count
    values = []
    for i in range(0, len(train_windows), max(1, len(train_windows) // STAT_WINDOWS)):
        image, label = train_ds.read(i)
        values.append(image[:, label != table.ignore_index].astype(np.float64))
    sample = np.concatenate(values, axis=1) if values else np.zeros((count, 0))
    mean = sample.mean(axis=1) if sample.shape[1] else np.zeros(count)
    std = sample.std(axis=1) if sample.shape[1] else np.ones(count)
    std[std == 0] = 1.0
    with rasterio.open(scenes[0].path) as src:
        labels_of_bands = [band_label(src, b) for b in range(1, count + 1)]
    band_names = [lab.upper() if lab else f"band{b}" for b, lab in enumerate(labels_of_bands, 1)]
    gsd = [g for g in (_gsd_m(s) for s in labelled) if g]
    split_names = {"train": "training blocks of your scenes (sampled on the fly)",
                   "val": "held-out blocks of your scenes (rsseg model selection)",
                   "test": "none (predict held-out scenes)"}
    manifest = {
        "own_data": True,
        "bands": "all",
        "band_names": band_names,
        "band_indexes": list(range(1, count + 1)),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "gsd_m": float(np.median(gsd)) if gsd else None,
        "ignore_index": table.ignore_index,
        "classes": list(table.names),
        "block": block,
        "radiometry": {
            "source_dtype": scenes[0].dtype,
            "source_band_count": count,
            "source_band_labels": labels_of_bands,
            "band_stats": band_statistics(sample) if sample.shape[1] else None,
            "band_stats_note": "labelled pixels of sampled training windows",
        },
    }
    spec = spec_document(name, len(labelled), table, band_names, scenes[0].dtype, manifest, split_names)
    root = Path(os.path.commonpath([str(s.path.resolve().parent) for s in labelled]))
    return SceneData(spec, manifest, train_ds, val_ds, root)


__all__ = ["SceneData", "SceneRaster", "SceneWindows", "scene_data"]
