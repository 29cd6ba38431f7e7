"""Find the source tiles of each dataset in its official layout, zipped or extracted.

The layouts are those torchgeo's Vaihingen2D / Potsdam2D / LoveDA expect:

- Vaihingen: ``ISPRS_semantic_labeling_Vaihingen.zip`` -> ``top/top_mosaic_09cm_areaN.tif``;
  ``ISPRS_semantic_labeling_Vaihingen_ground_truth_COMPLETE.zip`` -> ``top_mosaic_09cm_areaN.tif``
  (same file name as the image, outside ``top/``); optional eroded labels
  ``..._ground_truth_eroded_COMPLETE.zip`` -> ``top_mosaic_09cm_areaN_noBoundary.tif``.
- Potsdam: ``4_Ortho_RGBIR.zip`` -> ``4_Ortho_RGBIR/top_potsdam_X_Y_RGBIR.tif`` (``2_Ortho_RGB`` /
  ``3_Ortho_IRRG`` are accepted when they hold the chosen bands); ``5_Labels_all.zip`` ->
  ``top_potsdam_X_Y_label.tif``; optional ``5_Labels_all_noBoundary.zip`` ->
  ``top_potsdam_X_Y_label_noBoundary.tif``.
- LoveDA: ``Train.zip`` / ``Val.zip`` (/ ``Test.zip``) -> ``{Train,Val,Test}/{Urban,Rural}/
  {images_png,masks_png}/N.png``. The official Val set is the scored split (rsseg's ``test``,
  named "official Val" in outputs); the official Test set has images only (its labels are kept
  by the challenge server) and is read by :func:`find_loveda_test_images` for a submission.

Files are found by name anywhere below the data root (so an archive extracted into a folder of
its own name works too); archives are extracted once into a work folder, refusing any member
whose path would escape it.
"""

from __future__ import annotations

import json
import os
import re
import stat
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rsseg.data.specs import get_spec
from rsseg.errors import DataError, RssegWarning


class DataWarning(RssegWarning):
    """Something in the input data was repaired or skipped; the message says what. An
    :class:`RssegWarning`, so the CLI shows it as one ``rsseg: warning:`` line; its own class
    lets callers filter data warnings alone."""


@dataclass(frozen=True)
class SourceTile:
    """One source image with its label, as found in an official layout."""

    tile_id: str
    split: str  # official split: "train" or "test"
    image: Path
    label: Path
    label_kind: str  # "rgb": colour-coded RGB label; "loveda": index PNG, 0 = no-data
    band_indexes: tuple[int, ...]  # 1-based indexes into ``image`` for the chosen bands


# What to put where, per dataset: the one-line hint of a missing-data error.
EXPECTED_FILES = {
    "vaihingen": (
        "ISPRS_semantic_labeling_Vaihingen.zip and "
        "ISPRS_semantic_labeling_Vaihingen_ground_truth_COMPLETE.zip (optionally "
        "ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE.zip), or their extracted "
        "top/top_mosaic_09cm_areaN.tif and top_mosaic_09cm_areaN.tif"
    ),
    "potsdam": (
        "4_Ortho_RGBIR.zip and 5_Labels_all.zip (optionally 5_Labels_all_noBoundary.zip), or their "
        "extracted 4_Ortho_RGBIR/top_potsdam_X_Y_RGBIR.tif and top_potsdam_X_Y_label.tif"
    ),
    "loveda": (
        "Train.zip and Val.zip, or their extracted "
        "{Train,Val}/{Urban,Rural}/{images_png,masks_png}/N.png"
    ),
}
EXPECTED_FILES["synthetic"] = EXPECTED_FILES["vaihingen"]

_ZIP_MARKER = ".rsseg-extracted.json"


def _is_symlink_member(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def safe_extract_zip(archive: Path, target: Path, keep: Callable[[str], bool] | None = None) -> Path:
    """Extract ``archive`` (only members for which ``keep(name)`` holds, if given) into
    ``target``; refuses the archive if any member would land outside ``target``.

    Re-extraction is skipped when the archive's size and modification time are unchanged.
    """
    target = Path(target)
    marker = target / _ZIP_MARKER
    st = archive.stat()
    stamp = {"archive": str(archive.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == stamp:
                return target
        except (OSError, ValueError):
            pass
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:
        raise DataError(f"{archive}: not a readable zip archive ({exc})") from exc
    root = target.resolve()
    with zf:
        members = zf.infolist()
        # Check every member before writing anything.
        for info in members:
            name = info.filename
            dest = (root / name).resolve()
            unsafe = (
                name.startswith(("/", "\\"))
                or re.match(r"^[A-Za-z]:", name) is not None
                or ".." in re.split(r"[\\/]", name)
                or _is_symlink_member(info)
                or (dest != root and root not in dest.parents)
            )
            if unsafe:
                raise DataError(
                    f"{archive}: member {name!r} would be written outside {target}; "
                    "refusing to extract this archive"
                )
        target.mkdir(parents=True, exist_ok=True)
        for info in members:
            if keep is None or keep(info.filename):
                zf.extract(info, root)
    marker.write_text(json.dumps(stamp))
    return target


def _index_files(roots: list[Path], skip: list[Path]) -> dict[str, list[Path]]:
    """Map each file name below ``roots`` to its paths (hidden folders and ``skip`` left out)."""
    skip_resolved = {p.resolve() for p in skip}
    index: dict[str, list[Path]] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            dirnames[:] = sorted(
                d
                for d in dirnames
                if not d.startswith(".") and (here / d).resolve() not in skip_resolved
            )
            for name in filenames:
                index.setdefault(name, []).append(here / name)
    return index


# Members worth extracting, per dataset (plus archives inside archives); everything else in a
# download (DSMs, other products) stays in the zip.
_MEMBER_PATTERNS = {
    "vaihingen": r"top_mosaic_09cm_area\d+(_noBoundary)?\.tif$",
    "potsdam": r"top_potsdam_\d+_\d+_(RGBIR|RGB|IRRG|label|label_noBoundary)\.tif$",
    "loveda": r"(Train|Val)/(Urban|Rural)/(images_png|masks_png)/[^/]+\.png$",
    # The official Test images, for a challenge-server submission (no masks exist).
    "loveda-test": r"Test/(Urban|Rural)/images_png/[^/]+\.png$",
}
_MEMBER_PATTERNS["synthetic"] = _MEMBER_PATTERNS["vaihingen"]


def _member_filter(dataset: str) -> Callable[[str], bool]:
    pattern = re.compile(_MEMBER_PATTERNS[dataset], re.IGNORECASE)

    def keep(name: str) -> bool:
        return name.lower().endswith(".zip") or pattern.search(name) is not None

    return keep


def _zips_below(root: Path, skip: list[Path]) -> list[Path]:
    skip_resolved = {p.resolve() for p in skip}
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and (here / d).resolve() not in skip_resolved
        )
        found += [here / f for f in sorted(filenames) if f.lower().endswith(".zip")]
    return found


def _has_relevant_members(archive: Path, keep: Callable[[str], bool]) -> bool:
    try:
        with zipfile.ZipFile(archive) as zf:
            return any(keep(name) for name in zf.namelist())
    except zipfile.BadZipFile as exc:
        raise DataError(f"{archive}: not a readable zip archive ({exc})") from exc


def _extract_archives(data_root: Path, work_dir: Path, dataset: str, max_depth: int = 3) -> list[Path]:
    """Extract every zip below ``data_root`` into ``work_dir/<relative path>/<zip stem>``.

    Archives inside archives are extracted too (the ISPRS downloads, e.g. ``Potsdam.zip``, hold
    the official ``4_Ortho_RGBIR.zip`` / ``5_Labels_all.zip``), down to ``max_depth`` levels.
    """
    keep = _member_filter(dataset)
    extracted: list[Path] = []
    pending = [(data_root, work_dir, 0)]
    while pending:
        root, target, depth = pending.pop(0)
        for archive in _zips_below(root, skip=[work_dir]):
            rel = archive.relative_to(root).with_suffix("")
            if not _has_relevant_members(archive, keep):
                continue
            folder = safe_extract_zip(archive, target / rel, keep)
            extracted.append(folder)
            if depth + 1 < max_depth:
                pending.append((folder, folder / ".inner", depth + 1))
    return extracted


def _vaihingen_split(tile: str, dataset: str) -> str | None:
    spec = get_spec("vaihingen")
    if tile in spec.test_tiles:
        return "test"
    if tile in spec.train_tiles or dataset == "synthetic":
        return "train"
    return None


def _first(paths: list[Path] | None, keep=lambda p: True) -> Path | None:
    for p in sorted(paths or []):
        if keep(p):
            return p
    return None


def _find_vaihingen(index: dict[str, list[Path]], dataset: str) -> tuple[list[SourceTile], list]:
    pattern = re.compile(r"^top_mosaic_09cm_area(\d+)\.tif$", re.IGNORECASE)
    tiles, missing = [], []
    fallback_eroded = []
    for name, paths in sorted(index.items()):
        m = pattern.match(name)
        if not m:
            continue
        image = _first(paths, lambda p: p.parent.name.lower() == "top")
        if image is None:
            continue
        tile = m.group(1)
        split = _vaihingen_split(tile, dataset)
        if split is None:
            continue
        full = _first(paths, lambda p: p.parent.name.lower() != "top")
        eroded = _first(index.get(f"top_mosaic_09cm_area{tile}_noBoundary.tif"))
        # The test split is scored on eroded labels (GeoSeg); training uses full labels.
        label = (eroded or full) if split == "test" else (full or eroded)
        if label is None:
            missing.append(
                f"label top_mosaic_09cm_area{tile}.tif (outside top/, from "
                f"ISPRS_semantic_labeling_Vaihingen_ground_truth_COMPLETE.zip) for {image}"
            )
            continue
        if split == "test" and eroded is None:
            fallback_eroded.append(tile)
        tiles.append(SourceTile(tile, split, image, label, "rgb", (1, 2, 3)))
    _warn_test_tiles_on_full_labels(fallback_eroded)
    return tiles, missing


def _warn_test_tiles_on_full_labels(tiles: list[str]) -> None:
    """One warning naming the test tiles that lack eroded labels (ISPRS scores on eroded ones)."""
    if tiles:
        warnings.warn(
            f"no eroded (_noBoundary) labels for test tile(s) {', '.join(tiles)}; "
            "they are scored on the full labels",
            DataWarning,
            stacklevel=4,  # the caller of the layout finder, as before this helper existed
        )


def _find_potsdam(index: dict[str, list[Path]], bands: str) -> tuple[list[SourceTile], list]:
    spec = get_spec("potsdam")
    band_indexes = spec.bands(bands).source_indexes
    band_key = bands or spec.default_bands
    # Which image products can deliver the chosen bands, and with which indexes.
    products = [("RGBIR", band_indexes)]
    if band_key == "rgb":
        products.append(("RGB", (1, 2, 3)))
    if band_key == "irrg":
        products.append(("IRRG", (1, 2, 3)))
    tiles, missing = [], []
    fallback_eroded = []
    for tile in sorted(spec.train_tiles + spec.test_tiles):
        split = "test" if tile in spec.test_tiles else "train"
        image, indexes = None, band_indexes
        for product, idx in products:
            image = _first(index.get(f"top_potsdam_{tile}_{product}.tif"))
            if image is not None:
                indexes = idx
                break
        if image is None:
            continue
        full = _first(index.get(f"top_potsdam_{tile}_label.tif"))
        eroded = _first(index.get(f"top_potsdam_{tile}_label_noBoundary.tif"))
        label = (eroded or full) if split == "test" else (full or eroded)
        if label is None:
            missing.append(f"label top_potsdam_{tile}_label.tif (from 5_Labels_all.zip) for {image}")
            continue
        if split == "test" and eroded is None:
            fallback_eroded.append(tile)
        tiles.append(SourceTile(tile, split, image, label, "rgb", tuple(indexes)))
    _warn_test_tiles_on_full_labels(fallback_eroded)
    return tiles, missing


# LoveDA's official Test masks are not public (the challenge server scores Test), so the official
# Val set is what rsseg scores: it goes to the prepared "test" split, which outputs name "official
# Val" (DatasetSpec.split_names); rsseg's own model-selection split ("val") is held out from Train.
_LOVEDA_SPLITS = {"train": "train", "val": "test"}


def _find_loveda(index: dict[str, list[Path]]) -> tuple[list[SourceTile], list]:
    tiles, missing = [], []
    for name, paths in sorted(index.items()):
        if not name.lower().endswith(".png"):
            continue
        for image in sorted(paths):
            if image.parent.name != "images_png":
                continue
            scene, split_dir = image.parent.parent.name, image.parent.parent.parent.name
            split = _LOVEDA_SPLITS.get(split_dir.lower())
            if split is None or scene.lower() not in ("urban", "rural"):
                continue
            label = image.parent.parent / "masks_png" / name
            if not label.is_file():
                missing.append(f"mask {label} for {image}")
                continue
            tile_id = f"{split_dir.lower()}-{scene.lower()}-{image.stem}"
            tiles.append(SourceTile(tile_id, split, image, label, "loveda", (1, 2, 3)))
    return tiles, missing


def find_source_tiles(
    dataset: str,
    data_root: str | os.PathLike[str],
    work_dir: str | os.PathLike[str],
    bands: str | None = None,
) -> list[SourceTile]:
    """All usable tiles of ``dataset`` below ``data_root``, archives extracted into ``work_dir``.

    Raises DataError naming the expected files when nothing (or an image without its label) is
    found. Tiles absent altogether are allowed (a partial copy of a dataset still prepares).
    """
    get_spec(dataset)  # unknown names fail here with the list of valid ones
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist; put {EXPECTED_FILES[dataset]} there")
    work = Path(work_dir)
    extracted = _extract_archives(root, work / ".extracted", dataset)
    index = _index_files([root, *extracted], skip=[work])
    if dataset in ("vaihingen", "synthetic"):
        tiles, missing = _find_vaihingen(index, dataset)
    elif dataset == "potsdam":
        tiles, missing = _find_potsdam(index, bands)
    elif dataset == "loveda":
        tiles, missing = _find_loveda(index)
    else:  # pragma: no cover - every spec has a layout
        raise DataError(f"dataset {dataset!r} has no known file layout")
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"incomplete {dataset} layout under {root}: missing {missing[0]}{more}")
    if not tiles:
        raise DataError(f"no {dataset} data under {root}: expected {EXPECTED_FILES[dataset]}")
    return tiles


def find_loveda_test_images(
    data_root: str | os.PathLike[str], work_dir: str | os.PathLike[str]
) -> list[Path]:
    """The official LoveDA Test images (``Test/{Urban,Rural}/images_png/N.png``) below
    ``data_root``, ``Test.zip`` extracted into ``work_dir``; sorted by file name.

    Raises DataError when there are none, or when two images share a file name (a submission
    holds one mask per image name in a single folder).
    """
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist; put LoveDA's Test.zip or Test/ there")
    work = Path(work_dir)
    # Its own extraction folder: an archive already extracted for prepare (Train/Val members
    # only) carries a marker that would make a second extraction into the same place a no-op.
    extracted = _extract_archives(root, work / ".extracted-test", "loveda-test")
    index = _index_files([root, *extracted], skip=[work])
    images: dict[str, Path] = {}
    for name, paths in sorted(index.items()):
        if not name.lower().endswith(".png"):
            continue
        for image in sorted(paths):
            if image.parent.name != "images_png" or image.parent.parent.name.lower() not in (
                "urban", "rural"
            ) or image.parent.parent.parent.name.lower() != "test":
                continue
            if name in images and images[name].resolve() != image.resolve():
                if images[name].read_bytes() == image.read_bytes():
                    continue  # the same image found twice (an archive and its extracted copy)
                raise DataError(f"two LoveDA Test images are named {name}: {images[name]} and {image}")
            images.setdefault(name, image)
    if not images:
        raise DataError(
            f"no LoveDA Test images under {root}: expected Test.zip or "
            "Test/{Urban,Rural}/images_png/N.png"
        )
    return [images[name] for name in sorted(images)]
