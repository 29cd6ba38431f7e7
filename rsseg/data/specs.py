"""What rsseg knows about each dataset: classes, colours, bands, splits, conventions.

Constants follow the GeoSeg protocol that the seed papers use (see shared DESIGN notes):
the ignore index equals the number of classes, ISPRS means leave Clutter out, and the
official Vaihingen/Potsdam test tiles are the ones listed here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rsseg.errors import DataError, unknown_name

# The dataset spec a folder prepared from the user's own data carries (rsseg.data.own).
SPEC_FILE = "dataset.json"

# ImageNet statistics in 0..255 source units; the papers normalise every band set with them.
IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
IMAGENET_STD_255 = (58.395, 57.12, 57.375)

ISPRS_CLASSES = ("impervious_surface", "building", "low_vegetation", "tree", "car", "clutter")
ISPRS_COLORS = (
    (255, 255, 255),
    (0, 0, 255),
    (0, 255, 255),
    (0, 255, 0),
    (255, 255, 0),
    (255, 0, 0),
)


# What each prepared split is, in the benchmark's own terms; outputs (eval tables, JSON) use these.
# rsseg's split roles stay train / val (held out for model selection) / test (scored).
ISPRS_SPLIT_NAMES = {
    "train": "official training tiles less the held-out ones",
    "val": "held-out training tiles (rsseg model selection)",
    "test": "official test tiles",
}
LOVEDA_SPLIT_NAMES = {
    "train": "official Train less the held-out scenes",
    "val": "held-out official Train scenes (rsseg model selection)",
    # LoveDA's official Test labels are not public (scored by the challenge server), so the scored
    # split here is the official Val set, and says so.
    "test": "official Val",
}


@dataclass(frozen=True)
class BandSet:
    """A choice of input bands: their names and 1-based indices into the source image file."""

    names: tuple[str, ...]
    source_indexes: tuple[int, ...]


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    title: str
    classes: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    band_sets: dict[str, BandSet]
    default_bands: str
    gsd_m: float
    # Classes left out of mean IoU / mean F1 (OA always keeps every class).
    mean_excludes: tuple[str, ...] = ()
    train_tiles: tuple[str, ...] = ()
    test_tiles: tuple[str, ...] = ()
    mean: tuple[float, ...] = IMAGENET_MEAN_255
    std: tuple[float, ...] = IMAGENET_STD_255
    notes: str = ""
    extra: dict[str, object] = field(default_factory=dict)
    split_names: dict[str, str] = field(default_factory=lambda: dict(ISPRS_SPLIT_NAMES))

    def split_name(self, split: str) -> str:
        """The benchmark's name for rsseg's prepared ``split`` (e.g. LoveDA test -> "official Val")."""
        return self.split_names.get(split, split)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def ignore_index(self) -> int:
        """GeoSeg convention: the label one past the last class."""
        return len(self.classes)

    @property
    def mean_class_indices(self) -> tuple[int, ...]:
        """Indices of the classes that enter mIoU / mF1."""
        return tuple(i for i, c in enumerate(self.classes) if c not in self.mean_excludes)

    def bands(self, choice: str | None = None) -> BandSet:
        key = choice or self.default_bands
        if key not in self.band_sets:
            raise unknown_name(f"band set for {self.name}", key, list(self.band_sets))
        return self.band_sets[key]


_VAIHINGEN_TEST = (2, 4, 6, 8, 10, 12, 14, 16, 20, 22, 24, 27, 29, 31, 33, 35, 38)
_VAIHINGEN_TRAIN = (1, 3, 5, 7, 11, 13, 15, 17, 21, 23, 26, 28, 30, 32, 34, 37)

_POTSDAM_TEST = (
    "2_13", "2_14", "3_13", "3_14", "4_13", "4_14", "4_15",
    "5_13", "5_14", "5_15", "6_13", "6_14", "6_15", "7_13",
)  # fmt: skip
_POTSDAM_TRAIN = (
    "2_10", "2_11", "2_12", "3_10", "3_11", "3_12", "4_10", "4_11", "4_12", "5_10", "5_11",
    "5_12", "6_7", "6_8", "6_9", "6_10", "6_11", "6_12", "7_7", "7_8", "7_9", "7_10", "7_11",
    "7_12",
)  # fmt: skip

DATASETS: dict[str, DatasetSpec] = {
    "vaihingen": DatasetSpec(
        name="vaihingen",
        title="ISPRS Vaihingen 2D semantic labeling (9 cm, IRRG true orthophotos)",
        classes=ISPRS_CLASSES,
        colors=ISPRS_COLORS,
        band_sets={"irrg": BandSet(("NIR", "R", "G"), (1, 2, 3))},
        default_bands="irrg",
        gsd_m=0.09,
        mean_excludes=("clutter",),
        train_tiles=tuple(str(i) for i in _VAIHINGEN_TRAIN),
        test_tiles=tuple(str(i) for i in _VAIHINGEN_TEST),
        notes="tiles top/top_mosaic_09cm_areaN.tif; test on *_noBoundary (eroded) labels",
    ),
    "potsdam": DatasetSpec(
        name="potsdam",
        title="ISPRS Potsdam 2D semantic labeling (5 cm, 6000 x 6000 tiles)",
        classes=ISPRS_CLASSES,
        colors=ISPRS_COLORS,
        # Indices into 4_Ortho_RGBIR/top_potsdam_X_Y_RGBIR.tif (R, G, B, IR).
        band_sets={
            "rgb": BandSet(("R", "G", "B"), (1, 2, 3)),
            "irrg": BandSet(("NIR", "R", "G"), (4, 1, 2)),
            "rgbir": BandSet(("R", "G", "B", "NIR"), (1, 2, 3, 4)),
        },
        default_bands="rgb",
        gsd_m=0.05,
        mean_excludes=("clutter",),
        train_tiles=_POTSDAM_TRAIN,
        test_tiles=_POTSDAM_TEST,
        mean=IMAGENET_MEAN_255 + (IMAGENET_MEAN_255[0],),
        std=IMAGENET_STD_255 + (IMAGENET_STD_255[0],),
        notes="tiles 4_Ortho_RGBIR/top_potsdam_X_Y_RGBIR.tif; labels top_potsdam_X_Y_label.tif",
    ),
    "loveda": DatasetSpec(
        name="loveda",
        title="LoveDA land-cover (0.3 m, 1024 x 1024 RGB, urban and rural)",
        classes=("background", "building", "road", "water", "barren", "forest", "agriculture"),
        colors=(
            (255, 255, 255),
            (255, 0, 0),
            (255, 255, 0),
            (0, 0, 255),
            (159, 129, 183),
            (0, 255, 0),
            (255, 195, 128),
        ),
        band_sets={"rgb": BandSet(("R", "G", "B"), (1, 2, 3))},
        default_bands="rgb",
        gsd_m=0.3,
        notes="{Train,Val,Test}/{Urban,Rural}/{images_png,masks_png}; mask 0 = no-data -> ignore; "
        "scored on the official Val set (rsseg's test split); the official Test set has no public "
        "labels: `rsseg predict --format loveda` writes its challenge-server submission",
        split_names=dict(LOVEDA_SPLIT_NAMES),
    ),
    "synthetic": DatasetSpec(
        name="synthetic",
        title="Procedural Vaihingen-like scenes (9 cm, NIR-R-G), generated on the fly",
        classes=ISPRS_CLASSES,
        colors=ISPRS_COLORS,
        band_sets={"irrg": BandSet(("NIR", "R", "G"), (1, 2, 3))},
        default_bands="irrg",
        gsd_m=0.09,
        mean_excludes=("clutter",),
        notes="written in the official Vaihingen layout by rsseg.data.synthetic",
        split_names={"train": "synthetic training tiles", "val": "held-out synthetic tiles",
                     "test": "synthetic test tiles"},
    ),
}


def list_datasets() -> list[str]:
    return list(DATASETS)


def get_spec(name: str) -> DatasetSpec:
    """The spec for ``name``; an unknown name is a one-line UsageError listing the valid ones."""
    if name not in DATASETS:
        raise unknown_name("dataset", name, list(DATASETS))
    return DATASETS[name]


def spec_from_dict(data: dict[str, Any], where: str = "dataset spec") -> DatasetSpec:
    """The DatasetSpec of a ``dataset.json`` document (``rsseg prepare --images`` writes one; training
    straight from scenes builds it in memory): the user's classes, colours, bands and value
    statistics; one band set "all" of the images' bands, in order."""
    try:
        band_names = tuple(str(b) for b in data["band_names"])
        return DatasetSpec(
            name=str(data["name"]),
            title=str(data.get("title", data["name"])),
            classes=tuple(str(c) for c in data["classes"]),
            colors=tuple(tuple(int(v) for v in c[:3]) for c in data["colors"]),  # type: ignore[misc]
            band_sets={"all": BandSet(band_names, tuple(int(i) for i in data["band_indexes"]))},
            default_bands="all",
            gsd_m=float(data["gsd_m"]) if data.get("gsd_m") else 0.0,
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
            notes="prepared from your own scenes (rsseg prepare --images)",
            extra={"dtype": data.get("dtype"), "band_stats": data.get("band_stats"), "own_data": True},
            split_names=dict(data.get("split_names") or {}),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{where}: unreadable dataset spec ({exc.__class__.__name__}: {exc})") from None


def spec_from_file(path: str | os.PathLike[str]) -> DatasetSpec:
    """The DatasetSpec written by ``rsseg prepare --images`` (``dataset.json``)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable dataset spec ({exc.__class__.__name__}: {exc})") from None
    return spec_from_dict(data, where=str(path))


def spec_for(dataset: str, data_dir: str | os.PathLike[str] | None = None) -> DatasetSpec:
    """The spec a run uses: the folder's own ``dataset.json`` when ``data_dir`` has one (a folder
    prepared from the user's data defines its dataset), else the built-in ``dataset``."""
    if data_dir is not None:
        path = Path(data_dir).expanduser() / SPEC_FILE
        if path.is_file():
            return spec_from_file(path)
    return get_spec(dataset)
