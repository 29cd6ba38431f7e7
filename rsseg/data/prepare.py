"""Raw dataset layouts -> georeferenced patches ready for training and evaluation.

``prepare_dataset`` cuts every source tile into ``patch`` x ``patch`` GeoTIFFs (train stride 512,
test stride = patch, GeoSeg), each carrying the CRS and the transform of its source window, with
labels decoded to class indices (ignore = number of classes for unknown colours, the black
boundary of eroded labels and the padding past a tile's edge). A validation split is held out
*by tile* from the training tiles with a seeded draw, so checkpoints are never chosen on test data.

Output layout::

    OUT/manifest.json
    OUT/{train,val,test}/images/<tile>_<row>_<col>.tif   (chosen bands, source dtype)
    OUT/{train,val,test}/labels/<tile>_<row>_<col>.tif   (uint8 class indices)

Pixels without data (GDAL's mask: internal mask, nodata values, an alpha band that is a mask by
:func:`rsseg.data.radiometry.decide_alpha`, the same rule ``predict`` uses; and NaN) are labelled
ignore, so the model never learns from what prediction will treat as nodata.

The manifest's ``radiometry`` records what the training images' values are (source dtype, band
count and labels, per-band 1st/99th percentiles, min, max over the training patches' labelled
pixels); bundles carry it so that ``predict`` can refuse a scene in another value range.

The manifest records parameters and SHA-256 checksums of inputs and outputs, so a re-run skips
finished tiles and redoes any whose input or parameters changed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window
from rasterio.windows import transform as window_transform
from tqdm import tqdm

from rsseg.data.layouts import DataWarning, SourceTile, find_source_tiles
from rsseg.data.radiometry import band_label, band_statistics, decide_alpha, read_valid
from rsseg.data.specs import DatasetSpec, get_spec
from rsseg.errors import DataError, UsageError

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
TRAIN_STRIDE_FRACTION = 0.5  # GeoSeg: 1024 patches with stride 512 for training


def default_data_root(dataset: str) -> Path:
    """Where a dataset's raw archives live by default: $RSSEG_DATA/<dataset> or
    ~/.cache/rsseg/data/<dataset>."""
    base = os.environ.get("RSSEG_DATA")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "rsseg" / "data"
    return root / dataset


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def window_origins(length: int, patch: int, stride: int) -> list[int]:
    """Offsets of windows along one axis: every ``stride`` until a window reaches the end.

    The last window may run past the edge; that part is padding (ignore in labels).
    """
    if length <= patch:
        return [0]
    count = math.ceil((length - patch) / stride) + 1
    return [i * stride for i in range(count)]


def decode_rgb_label(
    rgb: np.ndarray, colors: tuple[tuple[int, int, int], ...], ignore_index: int
) -> tuple[np.ndarray, int, set[tuple[int, int, int]]]:
    """RGB label (3, H, W) -> class indices (H, W) uint8.

    Black (0, 0, 0), the boundary of ISPRS eroded labels, becomes ignore. Any other colour that
    matches no class also becomes ignore and is counted (never silently class 0).
    Returns (labels, number of unmatched pixels, a few unmatched colours).
    """
    rgb = rgb.astype(np.uint32)
    code = (rgb[0] << 16) | (rgb[1] << 8) | rgb[2]
    labels = np.full(code.shape, ignore_index, dtype=np.uint8)
    matched = code == 0
    for index, (r, g, b) in enumerate(colors):
        hit = code == ((r << 16) | (g << 8) | b)
        labels[hit] = index
        matched |= hit
    unmatched = int((~matched).sum())
    examples: set[tuple[int, int, int]] = set()
    if unmatched:
        for value in np.unique(code[~matched])[:5]:
            examples.add((int(value >> 16), int((value >> 8) & 255), int(value & 255)))
    return labels, unmatched, examples


def decode_loveda_mask(mask: np.ndarray, num_classes: int, ignore_index: int) -> tuple[np.ndarray, int]:
    """LoveDA mask: 0 = no-data -> ignore; 1..num_classes -> 0..num_classes-1; others counted."""
    mask = mask.astype(np.int32)
    labels = np.full(mask.shape, ignore_index, dtype=np.uint8)
    valid = (mask >= 1) & (mask <= num_classes)
    labels[valid] = (mask[valid] - 1).astype(np.uint8)
    unmatched = int(((mask != 0) & ~valid).sum())
    return labels, unmatched


def _read_label_window(src: rasterio.DatasetReader, window: Window, tile: SourceTile,
                       spec: DatasetSpec) -> tuple[np.ndarray, int, set]:
    if tile.label_kind == "loveda":
        labels, unmatched = decode_loveda_mask(
            src.read(1, window=window), spec.num_classes, spec.ignore_index
        )
        return labels, unmatched, set()
    if src.count >= 3:
        rgb = src.read((1, 2, 3), window=window)
    else:
        # A single-band label with a palette: look its indices up in the colour table.
        band = src.read(1, window=window)
        try:
            cmap = src.colormap(1)
        except ValueError as exc:
            raise DataError(
                f"{tile.label}: label has {src.count} band(s) and no colour table; "
                "expected an RGB colour-coded label"
            ) from exc
        lut = np.zeros((3, 256), dtype=np.uint8)
        for value, color in cmap.items():
            lut[:, value] = color[:3]
        rgb = lut[:, band]
    return decode_rgb_label(rgb, spec.colors, spec.ignore_index)


def _pad(array: np.ndarray, patch: int, fill: int) -> np.ndarray:
    """Pad the last two axes of ``array`` at the bottom/right to ``patch`` x ``patch``."""
    h, w = array.shape[-2:]
    if h == patch and w == patch:
        return array
    pad = [(0, 0)] * (array.ndim - 2) + [(0, patch - h), (0, patch - w)]
    return np.pad(array, pad, constant_values=fill)


def _assign_val_tiles(train_tiles: list[str], val_fraction: float, seed: int) -> set[str]:
    """Seeded choice of training tiles held out for validation (at least one if possible)."""
    if val_fraction <= 0 or len(train_tiles) < 2:
        return set()
    count = min(len(train_tiles) - 1, max(1, round(len(train_tiles) * val_fraction)))
    return set(random.Random(seed).sample(sorted(train_tiles), count))


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    tmp.replace(out / MANIFEST)


def split_names_of(manifest: dict[str, Any]) -> dict[str, str]:
    """The benchmark names of a prepared folder's splits (e.g. LoveDA ``test`` -> "official Val").

    Folders prepared before the manifest recorded them are read by checking where their tiles
    came from; one that does not match today's mapping is a DataError asking to prepare again.
    """
    recorded = manifest.get("split_names")
    if isinstance(recorded, dict):
        return {str(k): str(v) for k, v in recorded.items()}
    dataset = manifest.get("dataset")
    spec = get_spec(dataset) if dataset else None
    if dataset == "loveda":
        # LoveDA tile ids start with their official split: the scored split must be official Val.
        origins = {t.split("-", 1)[0] for t in manifest.get("splits", {}).get("test", [])}
        if origins - {"val"}:
            raise DataError(
                f"this prepared LoveDA folder scores {', '.join(sorted(origins))} tiles, not the "
                "official Val set; run rsseg prepare --dataset loveda again"
            )
    return dict(spec.split_names) if spec else {}


def read_manifest(prepared: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a prepared folder; DataError if the folder was not made by prepare."""
    path = Path(prepared) / MANIFEST
    if not path.is_file():
        raise DataError(f"{prepared} is not a prepared dataset (no {MANIFEST}); run rsseg prepare")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise DataError(f"{path}: unreadable manifest ({exc})") from exc


def _outputs_intact(out: Path, entry: dict[str, Any]) -> bool:
    for patch in entry.get("patches", []):
        for key in ("image", "label"):
            path = out / patch[key]
            if not path.is_file() or path.stat().st_size != patch[f"{key}_size"]:
                return False
    return bool(entry.get("complete"))


def _remove_outputs(out: Path, entry: dict[str, Any]) -> None:
    for patch in entry.get("patches", []):
        for key in ("image", "label"):
            (out / patch[key]).unlink(missing_ok=True)


def _cut_tile(tile: SourceTile, split: str, spec: DatasetSpec, out: Path, patch: int,
              stride: int, progress: tqdm, stats: dict[str, Any]) -> list[dict[str, Any]]:
    """Write the patches of one tile; returns their manifest records."""
    records = []
    (out / split / "images").mkdir(parents=True, exist_ok=True)
    (out / split / "labels").mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(tile.image) as img, rasterio.open(tile.label) as lab:
            if max(tile.band_indexes) > img.count:
                raise DataError(
                    f"{tile.image}: has {img.count} band(s), the chosen bands need band "
                    f"{max(tile.band_indexes)}"
                )
            height, width = img.height, img.width
            if (lab.height, lab.width) != (height, width):
                # Use the common extent; the rest of the image has no label to learn from.
                warnings.warn(
                    f"{tile.label}: label is {lab.width}x{lab.height}, image {width}x{height}; "
                    "using their common extent",
                    DataWarning,
                    stacklevel=2,
                )
                height, width = min(height, lab.height), min(width, lab.width)
            if img.crs is None:
                stats["no_crs"].append(str(tile.image))
            alpha = decide_alpha(img, tile.band_indexes, tile.image.name)
            if alpha.note:
                stats["alpha_data"].append(alpha)
            for row in window_origins(height, patch, stride):
                for col in window_origins(width, patch, stride):
                    # Read only the part inside the tile; pad the rest (image 0, label ignore).
                    inside = Window(col, row, min(patch, width - col), min(patch, height - row))
                    raw = img.read(tile.band_indexes, window=inside)
                    labels, unmatched, examples = _read_label_window(lab, inside, tile, spec)
                    # No data, no label: what predict will mask is never learnt from.
                    valid = read_valid(img, inside, alpha)
                    if raw.dtype.kind == "f":
                        valid &= np.isfinite(raw).all(axis=0)
                    labels[~valid] = spec.ignore_index
                    image = _pad(raw, patch, 0)
                    labels = _pad(labels, patch, spec.ignore_index)
                    stats["unmatched"] += unmatched
                    if unmatched:
                        stats["unmatched_files"].add(str(tile.label))
                    stats["examples"] |= examples
                    full = Window(col, row, patch, patch)
                    profile = {
                        "driver": "GTiff",
                        "width": patch,
                        "height": patch,
                        "crs": img.crs,
                        "transform": window_transform(full, img.transform),
                        "tiled": True,
                        "blockxsize": min(256, patch) // 16 * 16 or 16,
                        "blockysize": min(256, patch) // 16 * 16 or 16,
                        "compress": "deflate",
                        "zlevel": 1,
                    }
                    name = f"{tile.tile_id}_{row}_{col}.tif"
                    rel_img = f"{split}/images/{name}"
                    rel_lab = f"{split}/labels/{name}"
                    with rasterio.open(out / rel_img, "w", count=image.shape[0],
                                       dtype=image.dtype, **profile) as dst:
                        dst.write(image)
                    with rasterio.open(out / rel_lab, "w", count=1, dtype="uint8",
                                       nodata=spec.ignore_index, **profile) as dst:
                        dst.write(labels[None])
                    records.append(
                        {
                            "image": rel_img,
                            "label": rel_lab,
                            "window": [col, row, patch, patch],
                            "image_size": (out / rel_img).stat().st_size,
                            "label_size": (out / rel_lab).stat().st_size,
                            "image_sha256": sha256_file(out / rel_img),
                            "label_sha256": sha256_file(out / rel_lab),
                        }
                    )
                    progress.update(1)
    return records


def _count_windows(tile: SourceTile, patch: int, stride: int) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(tile.image) as src:
            return len(window_origins(src.height, patch, stride)) * len(
                window_origins(src.width, patch, stride)
            )


def prepare_dataset(
    dataset: str,
    data_root: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    patch: int = 1024,
    stride: int | None = None,
    test_stride: int | None = None,
    bands: str | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Cut ``dataset`` found under ``data_root`` into patches in ``out_dir``; returns ``out_dir``.

    ``stride`` is the training stride (default patch/2, GeoSeg's 512 for 1024 patches); validation
    and test windows use ``test_stride`` (default: patch, no overlap, so every test pixel counts
    once). ``bands`` names a band set of the dataset spec (default: the spec's default).
    """
    spec = get_spec(dataset)
    band_set = spec.bands(bands)
    band_key = bands or spec.default_bands
    if patch < 16:
        raise UsageError(f"--patch must be at least 16, got {patch}")
    stride = stride or max(1, int(patch * TRAIN_STRIDE_FRACTION))
    test_stride = test_stride or patch
    if stride < 1 or test_stride < 1:
        raise UsageError("strides must be positive")
    if not 0 <= val_fraction < 1:
        raise UsageError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out = Path(out_dir).expanduser()
    if not Path(data_root).expanduser().is_dir():
        from rsseg.data.layouts import EXPECTED_FILES

        raise DataError(f"data root {data_root} does not exist; put {EXPECTED_FILES[dataset]} there")
    out.mkdir(parents=True, exist_ok=True)

    tiles = find_source_tiles(dataset, data_root, out, bands)
    val_tiles = _assign_val_tiles([t.tile_id for t in tiles if t.split == "train"], val_fraction, seed)
    split_of = {t.tile_id: ("val" if t.tile_id in val_tiles else t.split) for t in tiles}
    if not any(s == "val" for s in split_of.values()):
        warnings.warn(
            "fewer than two training tiles: no validation split; the last checkpoint is kept",
            DataWarning,
            stacklevel=2,
        )

    old: dict[str, Any] = {}
    if (out / MANIFEST).is_file():
        try:
            old = json.loads((out / MANIFEST).read_text())
        except ValueError:
            old = {}
    old_tiles: dict[str, Any] = old.get("tiles", {}) if old.get("format") == MANIFEST_FORMAT else {}

    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "dataset": dataset,
        "bands": band_key,
        "band_names": list(band_set.names),
        "band_indexes": list(band_set.source_indexes),
        "patch": patch,
        "train_stride": stride,
        "test_stride": test_stride,
        "val_fraction": val_fraction,
        "seed": seed,
        "classes": list(spec.classes),
        "colors": [list(c) for c in spec.colors],
        "ignore_index": spec.ignore_index,
        "mean": list(spec.mean[: len(band_set.names)]),
        "std": list(spec.std[: len(band_set.names)]),
        "gsd_m": spec.gsd_m,
        "splits": {s: sorted(t for t, v in split_of.items() if v == s) for s in ("train", "val", "test")},
        # What each split is in the benchmark's terms (LoveDA: test = "official Val"); outputs say it.
        "split_names": dict(spec.split_names),
        "tiles": {},
    }

    # Decide per tile whether finished work can be kept.
    todo: list[tuple[SourceTile, dict[str, Any]]] = []
    for tile in tiles:
        split = split_of[tile.tile_id]
        params = {
            "split": split,
            "patch": patch,
            "stride": stride if split == "train" else test_stride,
            "band_indexes": list(tile.band_indexes),
            "label_kind": tile.label_kind,
            "image_sha256": sha256_file(tile.image),
            "label_sha256": sha256_file(tile.label),
        }
        previous = old_tiles.pop(tile.tile_id, None)
        if previous and previous.get("params") == params and _outputs_intact(out, previous):
            manifest["tiles"][tile.tile_id] = previous
            continue
        if previous:
            _remove_outputs(out, previous)
        todo.append((tile, params))
    for stale in old_tiles.values():  # tiles that disappeared from the input
        _remove_outputs(out, stale)

    stats: dict[str, Any] = {"unmatched": 0, "unmatched_files": set(), "examples": set(), "no_crs": [],
                             "alpha_data": []}
    total = sum(_count_windows(t, patch, p["stride"]) for t, p in todo)
    with tqdm(total=total, desc=f"prepare {dataset}", unit="patch", disable=not progress or not total) as bar:
        _write_manifest(out, manifest)
        for tile, params in todo:
            entry = {
                "split": params["split"],
                "image": str(tile.image),
                "label": str(tile.label),
                "params": params,
                "complete": False,
            }
            entry["patches"] = _cut_tile(tile, params["split"], spec, out, patch, params["stride"], bar, stats)
            entry["complete"] = True
            manifest["tiles"][tile.tile_id] = entry
            _write_manifest(out, manifest)  # after every tile, so an interrupted run resumes
    manifest["radiometry"] = training_radiometry(out, manifest, tiles, old.get("radiometry"))
    _write_manifest(out, manifest)

    if stats["unmatched"]:
        shown = ", ".join(str(c) for c in sorted(stats["examples"])[:5])
        warnings.warn(
            f"{stats['unmatched']} label pixels in {len(stats['unmatched_files'])} file(s) match no "
            f"class and are ignored (colours/values such as {shown or 'out of range'})",
            DataWarning,
            stacklevel=2,
        )
    if stats["alpha_data"]:
        first = stats["alpha_data"][0]
        more = f" (and {len(stats['alpha_data']) - 1} more image(s))" if len(stats["alpha_data"]) > 1 else ""
        warnings.warn(f"{first.note}{more}; its pixels are trained on, as predict will read them",
                      DataWarning, stacklevel=2)
    if stats["no_crs"]:
        warnings.warn(
            f"{len(stats['no_crs'])} source image(s) have no CRS (e.g. {stats['no_crs'][0]}); "
            "their patches carry pixel coordinates",
            DataWarning,
            stacklevel=2,
        )
    return out


# Training patches read for the value statistics (evenly spread) and the pixel stride within them:
# about a million values per band, whatever the dataset's size.
RADIOMETRY_PATCHES = 64
RADIOMETRY_STRIDE = 8


def training_radiometry(out: Path, manifest: dict[str, Any], tiles: list[SourceTile],
                        previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """Source dtype, band count and labels, and per-band value statistics of the training split
    (see the module doc). Reused from ``previous`` when the training patches are unchanged."""
    train_ids = manifest["splits"].get("train", []) or manifest["splits"].get("val", [])
    patches = [p for t in train_ids for p in manifest["tiles"].get(t, {}).get("patches", [])]
    key = hashlib.sha256("".join(sorted(p["image_sha256"] for p in patches)).encode()).hexdigest()
    if previous and previous.get("key") == key:
        return previous
    band_indexes = list(manifest["band_indexes"])
    counts, labels = set(), None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        for tile in tiles:
            if tile.tile_id not in train_ids:
                continue
            with rasterio.open(tile.image) as src:
                counts.add(src.count)
                these = [band_label(src, b) for b in tile.band_indexes]
            # A label the training images disagree on is unknown ("").
            labels = these if labels is None else [a if a == b else "" for a, b in zip(labels, these)]
        chosen = patches[:: max(1, len(patches) // RADIOMETRY_PATCHES)][:RADIOMETRY_PATCHES]
        values, dtype = [], None
        for p in chosen:
            with rasterio.open(out / p["image"]) as img, rasterio.open(out / p["label"]) as lab:
                dtype = dtype or img.dtypes[0]
                image = img.read()[:, ::RADIOMETRY_STRIDE, ::RADIOMETRY_STRIDE]
                labelled = lab.read(1)[::RADIOMETRY_STRIDE, ::RADIOMETRY_STRIDE] != manifest["ignore_index"]
            values.append(image[:, labelled].astype(np.float64))
    sample = np.concatenate(values, axis=1) if values else np.zeros((len(band_indexes), 0))
    return {
        "key": key,
        "source_dtype": dtype,
        "source_band_count": counts.pop() if len(counts) == 1 else None,
        "source_band_labels": labels,
        "band_stats": band_statistics(sample) if sample.shape[1] else None,
    }


def prepared_folder_name(bands: str, patch: int) -> str:
    return f"prepared-{bands}-{patch}"


def ensure_prepared(
    dataset: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    bands: str | None = None,
    patch: int = 1024,
    val_fraction: float = 0.2,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """A prepared folder for ``dataset``, preparing raw data found in place on first use.

    ``data_dir`` is a prepared folder (has a manifest) or a raw data root; None means the default
    place (:func:`default_data_root`). Raw data is prepared into ``<root>/prepared-<bands>-<patch>``.
    """
    spec = get_spec(dataset)
    band_key = bands or spec.default_bands
    spec.bands(band_key)
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_root(dataset)
    if (root / MANIFEST).is_file():
        manifest = read_manifest(root)
        if manifest.get("dataset") != dataset:
            raise DataError(f"{root} holds prepared {manifest.get('dataset')!r} data, not {dataset!r}")
        if bands is not None and manifest.get("bands") != band_key:
            raise DataError(
                f"{root} was prepared with bands {manifest.get('bands')!r}, not {band_key!r}; "
                "prepare it again with --bands"
            )
        return root
    target = root / prepared_folder_name(band_key, patch)
    if (target / MANIFEST).is_file():
        manifest = read_manifest(target)
        if all(t.get("complete") for t in manifest.get("tiles", {}).values()) and manifest["tiles"]:
            return target
    if data_dir is None and not (root.is_dir() and any(root.iterdir())):
        from rsseg.data.layouts import EXPECTED_FILES

        raise DataError(
            f"no {dataset} data found: put {EXPECTED_FILES[dataset]} in {root} "
            "(or set RSSEG_DATA to the folder above it, or pass --data)"
        )
    return prepare_dataset(dataset, root, target, patch=patch, bands=bands,
                           val_fraction=val_fraction, seed=seed, progress=progress)
