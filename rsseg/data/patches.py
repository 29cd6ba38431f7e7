"""Torch dataset over the patches written by :func:`rsseg.data.prepare.prepare_dataset`.

Samples are ``{"image": float32 (C, H, W) in source units, "mask": int64 (H, W)}``;
normalisation happens on the device in the training module, with the same mean/std that the
model bundle records, so training and prediction normalise identically.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.errors import NotGeoreferencedWarning
from torch.utils.data import Dataset

from rsseg.config import AugmentConfig
from rsseg.data.augment import mosaic, train_transform
from rsseg.data.prepare import read_manifest
from rsseg.errors import UsageError

SPLITS = ("train", "val", "test")


def read_patch(path: str | os.PathLike[str]) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as src:
            return src.read()


class PatchDataset(Dataset):
    """Patches of one split of a prepared folder; with ``augment`` the GeoSeg train transforms."""

    def __init__(self, root: str | os.PathLike[str], split: str = "train",
                 augment: AugmentConfig | None = None, crop_size: int | None = None) -> None:
        if split not in SPLITS:
            raise UsageError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.split = split
        self.ignore_index = int(self.manifest["ignore_index"])
        self.augment = augment
        self.crop_size = crop_size or int(self.manifest["patch"])
        self.items: list[tuple[Path, Path]] = []
        for tile_id in self.manifest["splits"].get(split, []):
            entry = self.manifest["tiles"].get(tile_id, {})
            for patch in entry.get("patches", []):
                self.items.append((self.root / patch["image"], self.root / patch["label"]))

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image in its source dtype where torch has it, uint8 label); augmentation works on
        these compact types and converts to float only at the end."""
        image_path, label_path = self.items[index]
        image = read_patch(image_path)
        if image.dtype not in (np.uint8, np.int16, np.int32, np.float32, np.float64):
            image = image.astype(np.float32)  # e.g. uint16, which torch barely supports
        mask = read_patch(label_path)[0].astype(np.uint8, copy=False)
        return torch.from_numpy(image), torch.from_numpy(mask)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image, mask = self.load(index)
        cfg = self.augment
        if cfg is not None:
            if cfg.mosaic_p > 0 and len(self) > 1 and torch.rand(()) < cfg.mosaic_p:
                others = torch.randint(len(self), (3,)).tolist()
                image, mask = mosaic([(image, mask)] + [self.load(i) for i in others], self.ignore_index)
            return dict(zip(("image", "mask"),
                            train_transform(image, mask, cfg, self.crop_size, self.ignore_index)))
        return {"image": image.float(), "mask": mask.long()}
