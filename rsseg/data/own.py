"""The user's own scenes as training data: GeoTIFFs plus vector or raster labels.

``prepare_own`` turns a set of scenes (anything GDAL reads; any CRS each; one band layout and
dtype) and their labels into the same prepared-folder layout as the built-in datasets
(:mod:`rsseg.data.prepare`): georeferenced patches, ``manifest.json`` with checksums, a seeded
validation split, plus ``dataset.json`` (:data:`rsseg.data.specs.SPEC_FILE`), the dataset spec
that ``rsseg train --data DIR`` reads so the bundle carries the user's classes, bands and
radiometry.

Conventions
-----------
- **Class ids** are the order of the classes: the ``--classes`` file's order, else the distinct
  label values sorted (numbers numerically, text alphabetically). ``ignore`` is the number of
  classes (GeoSeg), as for the built-in datasets.
- **Unlabelled is ignore, never class 0**: pixels no polygon covers, outside every class raster,
  on a raster's nodata, equal to ``--ignore-value``, outside ``--aoi``, or without image data.
  Where polygons overlap, the later feature in the layer wins (GDAL's burn order).
- **Labels live on each image's own grid**: polygons are rasterized at pixel centres (GDAL's
  default rule) in the image's CRS; class rasters are warped to it with nearest neighbour.
  Imagery is never resampled, so training sees what ``predict`` sees.
- **Split by area**: every scene is cut into square blocks (``block`` pixels); whole blocks are
  drawn for validation with a seeded draw, patches never cross a block edge, and a training
  block that overlaps a validation block of another (overlapping) scene is left out. Train and
  validation therefore share no ground.

Where torchgeo is used and where rsseg writes its own: not in this module, on purpose.
torchgeo's ``RasterDataset`` / ``VectorDataset`` put every file on one dataset-wide CRS and
resolution (warping the imagery of every other CRS), ``VectorDataset`` burns unlabelled pixels as
0 (a real class), takes integer labels only and re-reads the layer on every query. Prepared
patches must stay on each scene's own grid (what ``predict`` reads) with unlabelled = ignore, so
the per-image rasterization (``rasterio.features.rasterize``) and nearest-neighbour label warping
(``rasterio.warp.reproject``) here are rsseg's own. Training straight from scenes, without a
patch folder, is where torchgeo fits: :mod:`rsseg.data.scene_sampling` reads each scene through
its own torchgeo ``RasterDataset`` (the file's own CRS and resolution, so nothing is resampled)
and draws windows with ``RandomGeoSampler`` over the training blocks and ``GridGeoSampler`` over
the validation blocks, labelling each window with this module's rules.
"""

from __future__ import annotations

import glob
import json
import math
import os
import random
import shutil
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import rasterio
import rasterio.features
import rasterio.warp
import shapely
import yaml
from rasterio.crs import CRS
from rasterio.windows import Window
from rasterio.windows import transform as window_transform
from tqdm import tqdm

from rsseg.data.layouts import DataWarning, SourceTile
from rsseg.data.prepare import (
    MANIFEST,
    MANIFEST_FORMAT,
    read_manifest,
    sha256_file,
    training_radiometry,
    window_origins,
)
from rsseg.data.radiometry import band_label, decide_alpha, read_valid
from rsseg.data.specs import SPEC_FILE, list_datasets
from rsseg.errors import DataError, OutputError, UsageError

VECTOR_SUFFIXES = {".gpkg", ".shp", ".geojson", ".json", ".fgb", ".parquet", ".geoparquet", ".gml",
                   ".kml", ".sqlite"}
RASTER_SUFFIXES = {".tif", ".tiff", ".vrt", ".jp2", ".img", ".png", ".nc", ".hdf"}
# Label patches are uint8 with ignore = number of classes, so at most 254 classes.
MAX_CLASSES = 254
# Qualitative palette for classes without colours (distinct on a map, none black or white).
PALETTE = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (219, 219, 141), (158, 218, 229), (57, 59, 121),
)  # fmt: skip
# Sentinel for "no label raster here" while warping class rasters (outside any real class value).
_NO_SOURCE = -(2**31) + 1


def _warn(message: str) -> None:
    warnings.warn(message, DataWarning, stacklevel=3)


# ----------------------------------------------------------------------------- inputs


def expand_inputs(spec: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], option: str,
                  suffixes: set[str] | None = None) -> list[Path]:
    """Files named by a glob, a folder (its files with ``suffixes``), a file, or a list of these.
    Nothing found is one DataError naming the option."""
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    found: list[Path] = []
    for item in items:
        text = os.path.expanduser(str(item))
        path = Path(text)
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                            and (suffixes is None or p.suffix.lower() in suffixes))
        elif glob.has_magic(text):
            found += sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        elif path.is_file() or text.startswith("/vsi"):
            found.append(path)
    if not found:
        raise DataError(f"{option} {', '.join(str(i) for i in items)!r} matches no files")
    return list(dict.fromkeys(found))


def is_vector(path: Path) -> bool:
    """Vector layer or raster? By suffix; an unknown suffix is tried as a raster first."""
    suffix = path.suffix.lower()
    if suffix in VECTOR_SUFFIXES:
        return True
    if suffix in RASTER_SUFFIXES:
        return False
    try:
        with rasterio.open(path):
            return False
    except rasterio.errors.RasterioIOError:
        return True


def _value_key(value: Any) -> str | None:
    """Field / raster values compared as text, integral numbers without decimals ("3" == 3 == 3.0)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (bool, np.bool_)):
        return str(int(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    text = str(value).strip()
    try:
        number = float(text)
        return str(int(number)) if number.is_integer() else repr(number)
    except ValueError:
        return text


def _sort_values(values: Iterable[Any]) -> list[Any]:
    """Numbers numerically, else text alphabetically."""
    values = list(values)
    try:
        return sorted(values, key=float)
    except (TypeError, ValueError):
        return sorted(values, key=str)


# ----------------------------------------------------------------------------- classes


@dataclass(frozen=True)
class ClassTable:
    """Class names, their label values (field values or raster values) and colours; the class id
    is the position."""

    names: tuple[str, ...]
    values: tuple[str, ...]  # _value_key of the label value of each class
    colors: tuple[tuple[int, int, int], ...]

    @property
    def ignore_index(self) -> int:
        return len(self.names)

    def lookup(self) -> dict[str, int]:
        return {v: i for i, v in enumerate(self.values)}


def _parse_color(value: Any, where: str) -> tuple[int, int, int]:
    if isinstance(value, str) and value.startswith("#") and len(value) == 7:
        return tuple(int(value[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]
    if isinstance(value, (list, tuple)) and len(value) >= 3 and all(isinstance(c, int) and 0 <= c <= 255
                                                                      for c in value[:3]):
        return (int(value[0]), int(value[1]), int(value[2]))
    raise UsageError(f"{where}: colour {value!r} is neither [r, g, b] (0..255) nor '#rrggbb'")


def read_classes_file(path: str | os.PathLike[str]) -> ClassTable:
    """Classes from a YAML/JSON file: a list of ``{name, value, color}`` (``value``: the label
    field's or raster's value, default the name; ``color``: ``[r, g, b]`` or ``"#rrggbb"``,
    default a palette), optionally under a ``classes`` key, or a mapping ``name: value``."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"--classes {path}: cannot read ({exc.__class__.__name__})") from None
    if isinstance(data, dict) and "classes" in data:
        data = data["classes"]
    if isinstance(data, dict):
        data = [{"name": k, "value": v} for k, v in data.items()]
    if not isinstance(data, list) or not data:
        raise UsageError(f"--classes {path}: expected a list of {{name, value, color}} entries")
    names, values, colors = [], [], []
    for i, entry in enumerate(data):
        if isinstance(entry, str):
            entry = {"name": entry}
        if not isinstance(entry, dict) or "name" not in entry:
            raise UsageError(f"--classes {path}: entry {i + 1} has no name")
        names.append(str(entry["name"]))
        values.append(_value_key(entry.get("value", entry.get("id", entry["name"]))))
        colors.append(_parse_color(entry["color"], f"--classes {path}") if "color" in entry
                      else PALETTE[i % len(PALETTE)])
    if len(set(values)) != len(values):
        raise UsageError(f"--classes {path}: two classes share a value")
    if len(names) > MAX_CLASSES:
        raise UsageError(f"--classes {path}: {len(names)} classes; at most {MAX_CLASSES}")
    return ClassTable(tuple(names), tuple(values), tuple(colors))


def table_from_values(values: Iterable[Any]) -> ClassTable:
    """Classes = the distinct label values, sorted, with the palette."""
    ordered = _sort_values(set(values))
    if len(ordered) > MAX_CLASSES:
        raise DataError(f"the labels hold {len(ordered)} distinct values; at most {MAX_CLASSES} "
                        "classes (use --classes to name the ones to train)")
    keys = [_value_key(v) for v in ordered]
    return ClassTable(tuple(str(k) for k in keys), tuple(keys),
                      tuple(PALETTE[i % len(PALETTE)] for i in range(len(keys))))


# ----------------------------------------------------------------------------- scenes


@dataclass
class Scene:
    """One input image: where it is and its grid."""

    path: Path
    scene_id: str
    crs: CRS
    transform: Any
    width: int
    height: int
    count: int
    dtype: str

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        return _grid_bounds(self.transform, self.width, self.height)


def _grid_bounds(transform: Any, width: int, height: int) -> tuple[float, float, float, float]:
    xs = [transform.c, transform.c + transform.a * width]
    ys = [transform.f, transform.f + transform.e * height]
    return min(xs), min(ys), max(xs), max(ys)


def read_scenes(paths: Sequence[Path]) -> list[Scene]:
    """Open every image once; mixed band counts or dtypes, or a missing CRS, are one DataError."""
    scenes: list[Scene] = []
    used: Counter[str] = Counter()
    for path in paths:
        try:
            with rasterio.open(path) as src:
                if src.crs is None:
                    raise DataError(f"{path}: image has no CRS; own data needs georeferenced images")
                stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in path.stem)
                used[stem] += 1
                scene_id = stem if used[stem] == 1 else f"{stem}-{used[stem]}"
                scenes.append(Scene(path, scene_id, src.crs, src.transform, src.width, src.height,
                                    src.count, src.dtypes[0]))
        except rasterio.errors.RasterioIOError as exc:
            raise DataError(f"{path}: not an image GDAL can read ({exc})") from None
    counts = {s.count for s in scenes}
    if len(counts) > 1:
        shown = ", ".join(f"{s.path.name} {s.count}" for s in scenes[:6])
        raise DataError(f"images have mixed band counts ({shown}); give images of one band layout")
    dtypes = {s.dtype for s in scenes}
    if len(dtypes) > 1:
        shown = ", ".join(f"{s.path.name} {s.dtype}" for s in scenes[:6])
        raise DataError(f"images have mixed data types ({shown}); give images of one radiometry")
    return scenes


def _footprint(bounds: tuple[float, float, float, float], src_crs: CRS, dst_crs: CRS) -> shapely.Geometry:
    if src_crs == dst_crs:
        return shapely.box(*bounds)
    return shapely.box(*rasterio.warp.transform_bounds(src_crs, dst_crs, *bounds, densify_pts=21))


# ----------------------------------------------------------------------------- labels


class VectorLabels:
    """A vector layer (or several) with a class field, rasterized on any image grid."""

    def __init__(self, paths: Sequence[Path], label_field: str | None, table: ClassTable | None,
                 ignore_value: Any = None) -> None:
        import geopandas as gpd
        import pandas as pd

        if not label_field:
            raise UsageError("vector labels need --label-field NAME (the attribute holding classes)")
        frames = []
        for path in paths:
            try:
                if path.suffix.lower() in (".parquet", ".geoparquet"):
                    frame = gpd.read_parquet(path)
                else:
                    frame = gpd.read_file(path)
            except Exception as exc:  # noqa: BLE001 - any reader failure is one line about the file
                raise DataError(f"{path}: not a vector layer GDAL can read ({exc.__class__.__name__})") from None
            if label_field not in frame.columns:
                fields = [c for c in frame.columns if c != frame.geometry.name]
                raise UsageError(f"{path}: no field {label_field!r}; its fields: {', '.join(fields) or 'none'}")
            if frame.crs is None:
                raise DataError(f"{path}: label layer has no CRS")
            if frames and frame.crs != frames[0].crs:
                frame = frame.to_crs(frames[0].crs)
            part = frame[[label_field, frame.geometry.name]]
            if frame.geometry.name != "geometry":
                part = part.rename_geometry("geometry")
            frames.append(part)
        gdf = gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), geometry="geometry", crs=frames[0].crs)
        gdf = gdf[~(gdf.geometry.isna() | gdf.geometry.is_empty)]
        gdf = gdf[gdf.geometry.geom_type.isin(["Polygon", "MultiPolygon", "GeometryCollection"])]
        invalid = ~shapely.is_valid(gdf.geometry.values)
        if invalid.any():
            # make_valid keeps every part; only the polygonal ones are areas to label.
            repaired = shapely.make_valid(gdf.geometry.values[invalid])
            gdf.loc[invalid, "geometry"] = [_polygonal(g) for g in repaired]
            _warn(f"{int(invalid.sum())} invalid label polygon(s) repaired (e.g. self-intersections); "
                  "check them in a GIS")
            gdf = gdf[~gdf.geometry.is_empty]
        if gdf.empty:
            raise DataError(f"{paths[0]}: no polygons to label with")
        keys = [_value_key(v) for v in gdf[label_field]]
        ignore_key = _value_key(ignore_value) if ignore_value is not None else None
        self.table = table or table_from_values(
            v for v, k in zip(gdf[label_field], keys) if k is not None and k != ignore_key)
        lookup = self.table.lookup()
        ids, unknown = [], Counter()
        for key in keys:
            if key is None:
                ids.append(-1)
            elif key == ignore_key:
                ids.append(self.table.ignore_index)  # burnt as ignore over what lies below
            elif key in lookup:
                ids.append(lookup[key])
            else:
                ids.append(-1)
                unknown[key] += 1
        if unknown:
            shown = ", ".join(sorted(unknown)[:5])
            _warn(f"{sum(unknown.values())} polygon(s) have {label_field} values that name no class "
                  f"({shown}); they are left unlabelled (ignore)")
        gdf = gdf.assign(_class_id=ids)
        self.gdf = gdf[gdf["_class_id"] >= 0]
        self.crs = gdf.crs
        self.paths = list(paths)
        self._by_crs: dict[str, Any] = {}

    def in_crs(self, crs: CRS) -> Any:
        key = crs.to_wkt()
        if key not in self._by_crs:
            self._by_crs[key] = self.gdf if self.gdf.crs == crs else self.gdf.to_crs(crs)
        return self._by_crs[key]

    def extent(self, crs: CRS) -> shapely.Geometry:
        return shapely.box(*self.in_crs(crs).total_bounds)

    def burn(self, window: Window, scene: Scene) -> np.ndarray:
        """uint8 class ids on ``window`` of ``scene``'s grid; unlabelled = ignore."""
        gdf = self.in_crs(scene.crs)
        transform = window_transform(window, scene.transform)
        box = shapely.box(*_grid_bounds(transform, int(window.width), int(window.height)))
        hits = gdf.sindex.query(box)
        out = np.full((int(window.height), int(window.width)), self.table.ignore_index, np.uint8)
        if len(hits):
            shapes = [(g, int(v)) for g, v in zip(gdf.geometry.values[np.sort(hits)],
                                                 gdf["_class_id"].values[np.sort(hits)])]
            rasterio.features.rasterize(shapes, out=out, transform=transform)
        return out


def _polygonal(geom: shapely.Geometry) -> shapely.Geometry:
    if geom.geom_type in ("Polygon", "MultiPolygon"):
        return geom
    parts = [g for g in shapely.get_parts(geom) if g.geom_type in ("Polygon", "MultiPolygon")]
    return shapely.union_all(parts) if parts else shapely.Polygon()


class RasterLabels:
    """Class rasters matched to images by footprint and warped (nearest) onto their grids."""

    def __init__(self, paths: Sequence[Path], table: ClassTable | None, ignore_value: Any = None) -> None:
        self.paths = list(paths)
        self.info = []
        values: set[Any] = set()
        for path in self.paths:
            try:
                with rasterio.open(path) as src:
                    if src.crs is None:
                        raise DataError(f"{path}: class raster has no CRS")
                    if src.dtypes[0].startswith("float"):
                        raise DataError(f"{path}: class raster holds floats ({src.dtypes[0]}); "
                                        "expected integer class values")
                    self.info.append((path, src.crs, tuple(src.bounds), src.nodata))
                    if table is None:
                        for _, block in src.block_windows(1):
                            values.update(np.unique(src.read(1, window=block)).tolist())
            except rasterio.errors.RasterioIOError as exc:
                raise DataError(f"{path}: not a raster GDAL can read ({exc})") from None
        self.ignore_key = _value_key(ignore_value) if ignore_value is not None else None
        nodata_keys = {_value_key(n) for _, _, _, n in self.info if n is not None}
        if table is None:
            values = {v for v in values if _value_key(v) not in nodata_keys | {self.ignore_key}}
            if not values:
                raise DataError("the class rasters hold no class values (only nodata / --ignore-value)")
        self.table = table or table_from_values(values)
        self.unknown: Counter[str] = Counter()
        self.crs = self.info[0][1]

    def extent(self, crs: CRS) -> shapely.Geometry:
        return shapely.union_all([_footprint(b, c, crs) for _, c, b, _ in self.info])

    def burn(self, window: Window, scene: Scene) -> np.ndarray:
        transform = window_transform(window, scene.transform)
        shape = (int(window.height), int(window.width))
        box = shapely.box(*_grid_bounds(transform, shape[1], shape[0]))
        raw = np.full(shape, _NO_SOURCE, np.int32)
        for path, crs, bounds, nodata in self.info:
            if not _footprint(bounds, crs, scene.crs).intersects(box):
                continue
            part = np.full(shape, _NO_SOURCE, np.int32)
            with rasterio.open(path) as src:
                # Nearest neighbour: class values must never be blended.
                rasterio.warp.reproject(rasterio.band(src, 1), part, src_nodata=nodata,
                                        dst_transform=transform, dst_crs=scene.crs,
                                        dst_nodata=_NO_SOURCE, init_dest_nodata=True,
                                        resampling=rasterio.warp.Resampling.nearest)
            raw = np.where(part != _NO_SOURCE, part, raw)  # later rasters win where they overlap
        out = np.full(shape, self.table.ignore_index, np.uint8)
        lookup = self.table.lookup()
        for value in np.unique(raw):
            if value == _NO_SOURCE:
                continue
            key = _value_key(int(value))
            if key in lookup:
                out[raw == value] = lookup[key]
            elif key != self.ignore_key:
                self.unknown[key] += int((raw == value).sum())
        return out


def _read_aoi(path: Path) -> Any:
    import geopandas as gpd

    try:
        aoi = gpd.read_parquet(path) if path.suffix.lower() in (".parquet", ".geoparquet") else gpd.read_file(path)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"--aoi {path}: not a vector layer GDAL can read ({exc.__class__.__name__})") from None
    if aoi.crs is None:
        raise DataError(f"--aoi {path}: layer has no CRS")
    geoms = shapely.make_valid(aoi.geometry.values[~aoi.geometry.isna()])
    return gpd.GeoSeries([shapely.union_all([_polygonal(g) for g in geoms])], crs=aoi.crs)


# ----------------------------------------------------------------------------- prepare


@dataclass
class _Block:
    scene: Scene
    window: Window  # in scene pixels
    block_id: str
    split: str = "train"
    class_pixels: Counter = field(default_factory=Counter)


PATCH_PROFILE = dict(driver="GTiff", tiled=True, compress="deflate", zlevel=1)


def _write_tif(path: Path, array: np.ndarray, crs: CRS, transform: Any, nodata: int | None = None) -> None:
    size = array.shape[-1]
    block = max(16, min(256, size) // 16 * 16)
    with rasterio.open(path, "w", width=array.shape[-1], height=array.shape[-2], count=array.shape[0],
                       dtype=array.dtype, crs=crs, transform=transform, nodata=nodata,
                       blockxsize=block, blockysize=block, **PATCH_PROFILE) as dst:
        dst.write(array)


def _pad(array: np.ndarray, patch: int, fill: int) -> np.ndarray:
    h, w = array.shape[-2:]
    pad = [(0, 0)] * (array.ndim - 2) + [(0, patch - h), (0, patch - w)]
    return np.pad(array, pad, constant_values=fill) if (h, w) != (patch, patch) else array


def _gsd_m(scene: Scene) -> float | None:
    res = abs(scene.transform.a)
    if scene.crs.is_projected:
        return res * scene.crs.linear_units_factor[1]
    if scene.crs.is_geographic:
        lat = (scene.bounds[1] + scene.bounds[3]) / 2
        return res * 111_320.0 * math.cos(math.radians(lat))
    return None


def _dataset_name(out: Path, name: str | None) -> str:
    name = name or out.name
    return "custom" if name in list_datasets() or not name else name


def _temporary_folder(out: Path) -> Path:
    """Where the folder is built; renamed to ``out`` only when complete."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise OutputError(f"{out} exists, is not empty and is not a prepared folder; choose another -o")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def open_labels(labels: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], label_field: str | None,
                classes: str | os.PathLike[str] | None, ignore_value: Any = None,
                ) -> tuple[list[Path], VectorLabels | RasterLabels]:
    """The label files and their source (vector layers or class rasters) with its class table."""
    label_paths = expand_inputs(labels, "--labels")
    table = read_classes_file(classes) if classes else None
    kinds = {is_vector(p) for p in label_paths}
    if len(kinds) > 1:
        raise UsageError("--labels mixes vector layers and rasters; give one kind")
    source: VectorLabels | RasterLabels
    if kinds.pop():
        source = VectorLabels(label_paths, label_field, table, ignore_value)
    else:
        source = RasterLabels(label_paths, table, ignore_value)
    return label_paths, source


def labelled_scenes(scenes: list[Scene], source: VectorLabels | RasterLabels,
                    label_paths: Sequence[Path]) -> list[Scene]:
    """The scenes the labels overlap (footprints compared in each scene's CRS)."""
    other_crs = [s for s in scenes if s.crs != source.crs]
    if other_crs:
        _warn(f"labels are in {source.crs.to_string()}, {len(other_crs)} image(s) in another CRS "
              f"(e.g. {other_crs[0].crs.to_string()}); labels are reprojected to each image's grid")
    labelled = [s for s in scenes if source.extent(s.crs).intersects(shapely.box(*s.bounds))]
    if not labelled:
        raise DataError(f"the labels ({label_paths[0].name}) do not overlap any image "
                        f"({len(scenes)} image(s), e.g. {scenes[0].path.name})")
    if len(labelled) < len(scenes):
        _warn(f"{len(scenes) - len(labelled)} image(s) have no labels and are skipped "
              f"(e.g. {next(s for s in scenes if s not in labelled).path.name})")
    return labelled


def split_blocks(labelled: list[Scene], scene_labels: Any, table: ClassTable, block: int,
                 val_fraction: float, seed: int, crs: CRS) -> list[_Block]:
    """Blocks (``block`` pixels) with labelled pixels, a seeded whole-block draw for validation,
    and training blocks over validation ground of another scene left out (see the module doc)."""
    blocks: list[_Block] = []
    for scene in labelled:
        for r0 in range(0, scene.height, block):
            for c0 in range(0, scene.width, block):
                window = Window(c0, r0, min(block, scene.width - c0), min(block, scene.height - r0))
                lab = scene_labels(scene, window)
                ids, counts = np.unique(lab[lab != table.ignore_index], return_counts=True)
                if len(ids):
                    blocks.append(_Block(scene, window, f"{scene.scene_id}_b{r0}_{c0}",
                                         class_pixels=Counter(dict(zip(ids.tolist(), counts.tolist())))))
    if not blocks:
        raise DataError("no labelled pixels inside the images (check --labels, --ignore-value and --aoi)")
    order = sorted(range(len(blocks)), key=lambda i: blocks[i].block_id)
    n_val = min(len(blocks) - 1, max(1, round(len(blocks) * val_fraction))) if val_fraction > 0 else 0
    for i in random.Random(seed).sample(order, n_val):
        blocks[i].split = "val"
    if n_val == 0:
        _warn("fewer than two labelled blocks: no validation split; the last checkpoint is kept")
    _drop_train_overlapping_val(blocks, crs)
    return [b for b in blocks if b.split != "dropped"]


def spec_document(name: str, scene_count: int, table: ClassTable, band_names: list[str], dtype: str,
                  manifest: dict[str, Any], split_names: dict[str, str]) -> dict[str, Any]:
    """The ``dataset.json`` document (:func:`rsseg.data.specs.spec_from_dict` reads it) of a
    dataset made from the user's scenes, from its class table and manifest; written by
    :func:`prepare_own`, built in memory when training straight from the scenes."""
    return {
        "format": 1,
        "name": name,
        "title": f"own data: {scene_count} scene(s), {len(table.names)} classes",
        "classes": list(table.names),
        "colors": [list(c) for c in table.colors],
        "band_names": band_names,
        "band_indexes": manifest["band_indexes"],
        "dtype": dtype,
        "mean": manifest["mean"],
        "std": manifest["std"],
        "band_stats": manifest["radiometry"].get("band_stats"),
        "gsd_m": manifest["gsd_m"],
        "split_names": split_names,
    }


def prepare_own(
    images: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    labels: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    label_field: str | None = None,
    classes: str | os.PathLike[str] | None = None,
    ignore_value: Any = None,
    aoi: str | os.PathLike[str] | None = None,
    patch: int = 512,
    stride: int | None = None,
    test_stride: int | None = None,
    block: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    name: str | None = None,
    progress: bool = True,
) -> Path:
    """Prepare the user's own scenes and labels into ``out_dir`` (see the module doc); returns it.

    ``block``: side of the split blocks in pixels (default 4 patches); rounded up to a multiple of
    ``patch``. Everything is checked before anything is written, and the folder is built under a
    temporary name and renamed when complete.
    """
    if patch < 16:
        raise UsageError(f"--patch must be at least 16, got {patch}")
    stride = stride or max(1, patch // 2)
    test_stride = test_stride or patch
    if stride < 1 or test_stride < 1:
        raise UsageError("strides must be positive")
    if not 0 <= val_fraction < 1:
        raise UsageError(f"val_fraction must be in [0, 1), got {val_fraction}")
    block = math.ceil((block or 4 * patch) / patch) * patch
    out = Path(out_dir).expanduser()

    scenes = read_scenes(expand_inputs(images, "--images", RASTER_SUFFIXES))
    label_paths, source = open_labels(labels, label_field, classes, ignore_value)
    table = source.table
    aoi_series = _read_aoi(Path(aoi)) if aoi else None
    labelled = labelled_scenes(scenes, source, label_paths)

    def scene_labels(scene: Scene, window: Window) -> np.ndarray:
        lab = source.burn(window, scene)
        if aoi_series is not None:
            geom = aoi_series.to_crs(scene.crs).iloc[0]
            inside = rasterio.features.geometry_mask([geom], out_shape=lab.shape, invert=True,
                                                     transform=window_transform(window, scene.transform))
            lab[~inside] = table.ignore_index
        return lab

    blocks = split_blocks(labelled, scene_labels, table, block, val_fraction, seed, scenes[0].crs)
    totals = Counter()
    for b in blocks:
        totals.update(b.class_pixels)
    train_totals = Counter()
    for b in blocks:
        if b.split == "train":
            train_totals.update(b.class_pixels)
    empty = [table.names[i] for i in range(len(table.names)) if not totals[i]]
    if empty:
        _warn(f"class(es) {', '.join(empty)} have no labelled pixels in the images; "
              "the model cannot learn them")
    untrained = [table.names[i] for i in range(len(table.names)) if totals[i] and not train_totals[i]]
    if untrained:
        _warn(f"class(es) {', '.join(untrained)} occur only in validation blocks")

    tmp = _temporary_folder(out)
    try:
        manifest = _write_blocks(tmp, blocks, scenes, scene_labels, table, patch, stride, test_stride,
                                 progress)
        ds_name = _dataset_name(out, name)
        band_count = scenes[0].count
        with rasterio.open(scenes[0].path) as src:
            labels_of_bands = [band_label(src, b) for b in range(1, band_count + 1)]
        band_names = [lab.upper() if lab else f"band{b}" for b, lab in enumerate(labels_of_bands, 1)]
        gsd = [g for g in (_gsd_m(s) for s in labelled) if g]
        manifest.update({
            "format": MANIFEST_FORMAT,
            "dataset": ds_name,
            "own_data": True,
            "bands": "all",
            "band_names": band_names,
            "band_indexes": list(range(1, band_count + 1)),
            "patch": patch,
            "train_stride": stride,
            "test_stride": test_stride,
            "block": block,
            "val_fraction": val_fraction,
            "seed": seed,
            "classes": list(table.names),
            "class_values": list(table.values),
            "colors": [list(c) for c in table.colors],
            "ignore_index": table.ignore_index,
            "gsd_m": float(np.median(gsd)) if gsd else None,
            "split_names": {"train": "training blocks of your scenes",
                            "val": "held-out blocks of your scenes (rsseg model selection)",
                            "test": "none (predict held-out scenes)"},
            "inputs": {str(p): sha256_file(p) for p in [s.path for s in scenes] + label_paths
                       + ([Path(aoi)] if aoi else []) + ([Path(classes)] if classes else [])},
            "class_pixels": {table.names[i]: int(totals[i]) for i in range(len(table.names))},
        })
        tiles = [SourceTile(b.block_id, b.split, b.scene.path, label_paths[0], "own",
                            tuple(range(1, band_count + 1))) for b in blocks]
        manifest["radiometry"] = training_radiometry(tmp, manifest, tiles)
        manifest["radiometry"]["band_stats_note"] = "labelled pixels of training patches"
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        spec = spec_document(ds_name, len(labelled), table, band_names, scenes[0].dtype, manifest,
                             manifest["split_names"])
        (tmp / SPEC_FILE).write_text(json.dumps(spec, indent=1))
        _replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if isinstance(source, RasterLabels) and source.unknown:
        shown = ", ".join(sorted(source.unknown)[:5])
        _warn(f"{sum(source.unknown.values())} label pixels hold values that name no class ({shown}); "
              "they are ignored")
    return out


def _replace_folder(tmp: Path, out: Path) -> None:
    """Swap the finished folder in; an older prepared folder at ``out`` goes only after that."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _drop_train_overlapping_val(blocks: list[_Block], crs: CRS) -> None:
    """Scenes may overlap: a training block over ground of a validation block is left out."""
    val = [b for b in blocks if b.split == "val"]
    if not val:
        return
    def footprint(b: _Block) -> shapely.Geometry:
        bounds = _grid_bounds(window_transform(b.window, b.scene.transform), int(b.window.width),
                              int(b.window.height))
        return _footprint(bounds, b.scene.crs, crs)
    val_boxes = [footprint(b) for b in val]
    tree = shapely.STRtree(val_boxes)
    dropped = 0
    for b in blocks:
        if b.split != "train":
            continue
        box = footprint(b)
        # Touching edges share no ground; any area in common does.
        if any(box.intersection(val_boxes[j]).area > 1e-9 * box.area for j in tree.query(box)):
            b.split = "dropped"
            dropped += 1
    if dropped:
        _warn(f"{dropped} training block(s) overlap validation blocks of another scene and are left out")


def _write_blocks(tmp: Path, blocks: list[_Block], scenes: list[Scene], scene_labels: Any,
                  table: ClassTable, patch: int, stride: int, test_stride: int,
                  progress: bool) -> dict[str, Any]:
    """Write the patches of every block; returns the manifest's tiles/splits and mean/std."""
    for split in ("train", "val"):
        (tmp / split / "images").mkdir(parents=True, exist_ok=True)
        (tmp / split / "labels").mkdir(parents=True, exist_ok=True)
    count = scenes[0].count
    total, sq, n = np.zeros(count), np.zeros(count), 0
    tiles: dict[str, Any] = {}
    with tqdm(total=len(blocks), desc="prepare own data", unit="block", disable=not progress) as bar:
        for b in sorted(blocks, key=lambda b: b.block_id):
            scene, win = b.scene, b.window
            step = stride if b.split == "train" else test_stride
            lab_block = scene_labels(scene, win)
            records = []
            with rasterio.open(scene.path) as src:
                alpha = decide_alpha(src, list(range(1, count + 1)), scene.path.name)
                # Patches stay inside their block (so no patch reaches into another split's ground);
                # the part of a window past the block is padding: image 0, label ignore.
                for r in window_origins(int(win.height), patch, step):
                    for c in window_origins(int(win.width), patch, step):
                        h, w = min(patch, int(win.height) - r), min(patch, int(win.width) - c)
                        inside = Window(win.col_off + c, win.row_off + r, w, h)
                        lab = lab_block[r : r + h, c : c + w].copy()
                        image = src.read(window=inside)
                        valid = read_valid(src, inside, alpha)
                        if image.dtype.kind == "f":
                            valid &= np.isfinite(image).all(axis=0)
                        lab[~valid] = table.ignore_index
                        labelled = lab != table.ignore_index
                        if not labelled.any():
                            continue
                        if b.split == "train":
                            values = image[:, labelled].astype(np.float64)
                            total += values.sum(axis=1)
                            sq += (values**2).sum(axis=1)
                            n += values.shape[1]
                        transform = window_transform(Window(inside.col_off, inside.row_off, patch, patch),
                                                     scene.transform)
                        fname = f"{b.block_id}_{r}_{c}.tif"
                        rel_img, rel_lab = f"{b.split}/images/{fname}", f"{b.split}/labels/{fname}"
                        _write_tif(tmp / rel_img, _pad(image, patch, 0), scene.crs, transform)
                        _write_tif(tmp / rel_lab, _pad(lab, patch, table.ignore_index)[None],
                                   scene.crs, transform, nodata=table.ignore_index)
                        records.append({
                            "image": rel_img, "label": rel_lab,
                            # The data part of the patch, in scene pixels (the rest is padding).
                            "window": [int(inside.col_off), int(inside.row_off), w, h],
                            "image_size": (tmp / rel_img).stat().st_size,
                            "label_size": (tmp / rel_lab).stat().st_size,
                            "image_sha256": sha256_file(tmp / rel_img),
                            "label_sha256": sha256_file(tmp / rel_lab),
                        })
            tiles[b.block_id] = {
                "split": b.split, "image": str(scene.path), "crs": scene.crs.to_string(),
                "block_window": [int(win.col_off), int(win.row_off), int(win.width), int(win.height)],
                "complete": True, "patches": records,
            }
            bar.update(1)
    tiles = {k: v for k, v in tiles.items() if v["patches"]}
    if not any(t["split"] == "train" for t in tiles.values()):
        raise DataError("no training patches with labelled pixels; lower --val-fraction or add labels")
    mean = total / max(n, 1)
    std = np.sqrt(np.maximum(sq / max(n, 1) - mean**2, 0.0))
    std[std == 0] = 1.0  # a constant band: normalise by 1 rather than divide by zero
    return {
        "tiles": tiles,
        "splits": {s: sorted(k for k, v in tiles.items() if v["split"] == s) for s in ("train", "val", "test")},
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
    }


def is_own_folder(path: str | os.PathLike[str] | None) -> bool:
    """True for a folder prepared by :func:`prepare_own` (it has a dataset spec file)."""
    return path is not None and (Path(path).expanduser() / SPEC_FILE).is_file() and \
        (Path(path).expanduser() / MANIFEST).is_file()


__all__ = ["ClassTable", "RasterLabels", "VectorLabels", "expand_inputs", "is_own_folder",
           "prepare_own", "read_classes_file", "read_manifest"]
