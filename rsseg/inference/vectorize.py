"""Class raster -> polygons, block by block, equal to whole-raster polygonization.

``rasterio.features.shapes`` needs the whole array in memory. Here the raster is read in strips
of rows. Inside a strip every 4-connected region of one class gets its own label
(``scipy.ndimage.label``) and is polygonized by label, so each polygon is known by its label.
Regions that continue across the seam between two strips are found by comparing the labels of
the two pixel rows that meet at the seam (same class, same column), joined with a union-find,
and their pieces merged (``rsseg.inference.seam_merge``: shared seam edges dropped, rings
re-linked). Pixel corners are integers in the working coordinates, so the merge is exact and the
result equals whole-raster polygonization vertex for vertex (tests/test_vectorize.py).

Simplification uses ``shapely.coverage_simplify``, which simplifies each shared border once, so
neighbours keep meeting without gaps or overlaps; the outer boundary (scene and nodata edges) is
left unsimplified so that the polygons still cover exactly the valid pixels. GDAL's polygonize does not put a vertex on a
neighbour's edge where a third polygon meets it, which the coverage functions require; every
edge is therefore split at every pixel corner first (``shapely.segmentize``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import geopandas as gpd
import numpy as np
import rasterio
import rasterio.features
import shapely
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from scipy import ndimage
from tqdm.auto import tqdm

from rsseg.errors import DataError, OutputError, UsageError, warn
from rsseg.inference.qgis_style import is_raster_qml, vector_qml
from rsseg.inference.rasterio_out import NODATA_CLASS, read_class_metadata, temporary_path
from rsseg.inference.seam_merge import merge_seam_pieces

VECTOR_DRIVERS = {".gpkg": "GPKG", ".geojson": "GeoJSON", ".fgb": "FlatGeobuf", ".parquet": "Parquet"}
RASTER_SUFFIXES = (".tif", ".tiff")
# GeoPackage 1.2: GDAL >= 3.7 writes 1.4 by default, which QGIS 3.22's GDAL (3.6, Debian 12)
# warns about on every load; 1.2 is read without a warning by every GDAL since 2.2.
GPKG_VERSION = "1.2"
# 4-connectivity, as rasterio.features.shapes uses by default.
_FOUR = ndimage.generate_binary_structure(2, 1)
# Fallback colours for rasters that carry none (a qualitative palette).
_PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]


@dataclass
class ClassInfo:
    names: list[str]
    colors: list[tuple[int, int, int]]


# ----------------------------------------------------------------------------- polygonize


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, a: int) -> int:
        root = a
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while self.parent.get(a, a) != root:  # path compression
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _label_strip(classes: np.ndarray, first_label: int) -> tuple[np.ndarray, dict[int, int]]:
    """Int32 labels of 4-connected same-class regions (0 = nodata), numbered from first_label."""
    labels = np.zeros(classes.shape, dtype=np.int32)
    label_class: dict[int, int] = {}
    next_label = first_label
    for c in np.unique(classes):
        if c == NODATA_CLASS:
            continue
        lab, n = ndimage.label(classes == c, structure=_FOUR)
        if n == 0:
            continue
        inside = lab > 0
        labels[inside] = lab[inside] + (next_label - 1)
        for k in range(next_label, next_label + n):
            label_class[k] = int(c)
        next_label += n
    return labels, label_class


def records_to_polygons(records: list[tuple[dict, float]]) -> tuple[np.ndarray, list[int]]:
    """GeoJSON-like ``(geometry, value)`` pairs from ``rasterio.features.shapes`` -> shapely
    polygons, built in one vectorized call (``shapely.geometry.shape`` per polygon spends most of
    its time creating coordinate objects one by one)."""
    if not records:
        return np.empty(0, dtype=object), []
    coords: list = []
    ring_sizes: list[int] = []
    rings_per_polygon: list[int] = []
    for geom, _ in records:
        rings = geom["coordinates"]
        rings_per_polygon.append(len(rings))
        for ring in rings:
            coords.extend(ring)
            ring_sizes.append(len(ring))
    xy = np.asarray(coords, dtype=np.float64)
    rings = shapely.linearrings(xy, indices=np.repeat(np.arange(len(ring_sizes)), ring_sizes))
    polygons = shapely.polygons(rings, indices=np.repeat(np.arange(len(rings_per_polygon)), rings_per_polygon))
    return polygons, [int(v) for _, v in records]


def auto_block_rows(width: int, pixels: int = 1 << 25) -> int:
    """Rows per block for about ``pixels`` pixels (32 Mpx: 128 MB of int32 labels), at least 256."""
    return max(256, pixels // max(width, 1))


def polygonize_pixels(
    path: Path, block_rows: int | None = None, progress: bool = False
) -> tuple[list[shapely.Polygon], list[int]]:
    """Polygons (in pixel coordinates: x = column, y = row) and their class ids, blockwise.

    ``block_rows`` None picks blocks of about 32 Mpx (see :func:`auto_block_rows`).
    """
    pieces: dict[int, shapely.Polygon] = {}
    label_class: dict[int, int] = {}
    uf = _UnionFind()
    next_label = 1
    prev_bottom_labels: np.ndarray | None = None
    prev_bottom_classes: np.ndarray | None = None
    with _open_class_raster(path) as ds:
        height, width = ds.height, ds.width
        block_rows = block_rows or auto_block_rows(width)
        starts = range(0, height, block_rows)
        seam_rows = list(starts)[1:]
        for top in tqdm(starts, desc=f"vectorize {Path(path).name}", unit="block",
                        disable=not progress, leave=False):
            n = min(block_rows, height - top)
            classes = ds.read(1, window=rasterio.windows.Window(0, top, width, n))
            labels, lc = _label_strip(classes, next_label)
            next_label += len(lc)
            label_class.update(lc)
            shift = rasterio.Affine.translation(0, top)
            records = list(rasterio.features.shapes(labels, mask=labels > 0, connectivity=4,
                                                    transform=shift))
            for geom, value in zip(*records_to_polygons(records)):
                pieces[value] = geom
            if prev_bottom_labels is not None:
                above, below = prev_bottom_labels, labels[0]
                same = (above > 0) & (below > 0) & (prev_bottom_classes == classes[0])
                for a, b in set(zip(above[same].tolist(), below[same].tolist())):
                    uf.union(a, b)
            prev_bottom_labels, prev_bottom_classes = labels[-1].copy(), classes[-1].copy()

    groups: dict[int, list[int]] = {}
    for label in pieces:
        groups.setdefault(uf.find(label), []).append(label)
    polygons: list[shapely.Polygon] = []
    class_ids: list[int] = []
    for root in sorted(groups):
        members = groups[root]
        if len(members) == 1:
            geom = pieces[members[0]]
        else:
            parts = [pieces[m] for m in members]
            # The exact seam merge is linear in the vertices; GEOS's union is the safety net.
            geom = merge_seam_pieces(parts, seam_rows)
            if geom is None:
                geom = shapely.union_all(parts)
        polygons.append(geom)
        class_ids.append(label_class[root])
    return polygons, class_ids


def polygonize_whole(path: Path) -> tuple[list[shapely.Polygon], list[int]]:
    """Reference: whole-raster ``rasterio.features.shapes`` in pixel coordinates."""
    with _open_class_raster(path) as ds:
        classes = ds.read(1)
    records = list(rasterio.features.shapes(classes, mask=classes != NODATA_CLASS))
    polygons, values = records_to_polygons(records)
    return list(polygons), values


def _open_class_raster(path: Path) -> rasterio.DatasetReader:
    path = Path(path)
    if not path.exists():
        raise DataError(f"class raster {path} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            ds = rasterio.open(path)
    except RasterioIOError:
        raise DataError(f"{path} is not a raster GDAL can read") from None
    if ds.count < 1 or ds.dtypes[0] != "uint8":
        ds.close()
        raise DataError(f"{path} is not a uint8 class raster (band 1 is {ds.dtypes[0] if ds.count else 'missing'})")
    return ds


# ----------------------------------------------------------------------------- areas


def _areas_m2(gdf: gpd.GeoDataFrame) -> np.ndarray:
    """Polygon areas in square metres: projected on the fly for a geographic CRS."""
    if gdf.crs is None:
        warn("class raster has no CRS; area_m2 is in squared map units")
        return gdf.geometry.area.to_numpy()
    if gdf.crs.is_geographic:
        if len(gdf) == 0:
            return np.zeros(0)
        return gdf.to_crs(gdf.estimate_utm_crs()).geometry.area.to_numpy()
    unit = 1.0
    try:
        unit = gdf.crs.axis_info[0].unit_conversion_factor or 1.0
    except (AttributeError, IndexError):
        pass
    return gdf.geometry.area.to_numpy() * unit * unit


# ----------------------------------------------------------------------------- public API


def vectorize_raster(
    path: Path,
    *,
    classes: ClassInfo | None = None,
    simplify: float | None = None,
    min_area: float = 0.0,
    block_rows: int | None = None,
    progress: bool = False,
) -> gpd.GeoDataFrame:
    """Polygons of a uint8 class raster with class_id, class_name, area_m2, in the raster's CRS.

    ``simplify`` is a tolerance in map units (None: one pixel; 0: none, the polygons then
    re-rasterize to the raster exactly). ``min_area`` drops polygons under that many m².
    """
    path = Path(path)
    info = classes or class_info_from_raster(path)
    from rsseg.inference.predict import output_transform

    with _open_class_raster(path) as ds:
        # A raster with no georeferencing at all is drawn by QGIS at (col, -row): the polygons
        # take that transform too, so they lie on the raster (predict writes it explicitly).
        transform, crs = output_transform(ds), ds.crs
    polygons, class_ids = polygonize_pixels(path, block_rows=block_rows, progress=progress)
    geoms = np.asarray(polygons, dtype=object)
    pixel = (abs(transform.a) + abs(transform.e)) / 2
    tolerance = pixel if simplify is None else float(simplify)
    if tolerance > 0 and len(geoms):
        # Split edges at every pixel corner so that neighbours share vertices (see module doc).
        geoms = shapely.segmentize(geoms, 1.0)
    coeffs = np.array([[transform.a, transform.b], [transform.d, transform.e]])
    offset = np.array([transform.c, transform.f])
    if len(geoms):
        geoms = shapely.transform(geoms, lambda xy: xy @ coeffs.T + offset)
    gdf = gpd.GeoDataFrame(
        {
            "class_id": np.asarray(class_ids, dtype=np.int32),
            "class_name": [info.names[c] if c < len(info.names) else f"class_{c}" for c in class_ids],
        },
        geometry=list(geoms),
        crs=crs,
    )
    gdf["area_m2"] = _areas_m2(gdf)
    if min_area > 0:
        gdf = gdf[gdf["area_m2"] >= min_area].reset_index(drop=True)
    if tolerance > 0 and len(gdf):
        # The outer boundary of the coverage (scene edge, nodata edge) is kept as is: the union
        # of the polygons stays exactly the raster's valid area, so none reaches into nodata.
        gdf["geometry"] = shapely.coverage_simplify(gdf.geometry.to_numpy(), tolerance,
                                                    simplify_boundary=False)
        gdf["area_m2"] = _areas_m2(gdf)
    return gdf


def class_info_from_raster(path: Path) -> ClassInfo:
    _open_class_raster(path).close()  # a clear DataError for a missing or non-class raster
    names, colors = read_class_metadata(path)
    with _open_class_raster(path) as ds:
        n_meta = max(len(names or []), len(colors or []))
        if n_meta == 0:
            # No metadata: as many classes as the largest value present (read by block).
            top = 0
            for _, win in ds.block_windows(1):
                a = ds.read(1, window=win)
                a = a[a != NODATA_CLASS]
                if a.size:
                    top = max(top, int(a.max()))
            n_meta = top + 1
    return _complete(names, colors, n_meta)


def _complete(names, colors, n: int) -> ClassInfo:
    names = list(names or [])
    colors = [tuple(int(v) for v in c[:3]) for c in (colors or [])]
    n = max(n, len(names), len(colors))
    names += [f"class_{i}" for i in range(len(names), n)]
    colors += [_PALETTE[i % len(_PALETTE)] for i in range(len(colors), n)]
    return ClassInfo(names, colors)


def read_classes_file(path: Path) -> ClassInfo:
    """--classes FILE: a model bundle, JSON ``[{"name":..., "color":[r,g,b]}]`` or
    ``{"names": [...], "colors": [...]}``, or text lines ``name`` / ``name,r,g,b``."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"--classes file {path} does not exist")
    if path.suffix == ".safetensors":
        from rsseg.bundle import read_bundle_meta

        meta = read_bundle_meta(path)
        return _complete(meta.class_names, meta.class_colors, len(meta.class_names))
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            data = json.loads(text)
            if isinstance(data, dict):
                return _complete(data.get("names"), data.get("colors"), 0)
            return _complete([d["name"] for d in data], [d["color"] for d in data if "color" in d], 0)
        names, colors = [], []
        for line in text.splitlines():
            parts = [p.strip() for p in line.split(",")]
            if not parts[0] or parts[0].startswith("#"):
                continue
            names.append(parts[0])
            if len(parts) >= 4:
                colors.append(tuple(int(v) for v in parts[1:4]))
        if colors and len(colors) != len(names):
            raise ValueError("every line needs a colour when one has")
        return _complete(names, colors, 0)
    except (ValueError, KeyError, TypeError) as err:
        raise UsageError(f"cannot read --classes file {path}: {err}") from None


# ----------------------------------------------------------------------------- writing


def check_vector_output(out: Path, overwrite: bool) -> str:
    """Driver for ``out``'s suffix; refuses unknown suffixes and existing files early."""
    out = Path(out)
    driver = VECTOR_DRIVERS.get(out.suffix.lower())
    if driver is None:
        # Only vector suffixes are allowed here; a raster suffix gets its own reason.
        why = ("vectorize writes polygons, not a raster" if out.suffix.lower() in RASTER_SUFFIXES
               else f"unknown output suffix {out.suffix or '(none)'!r}")
        raise OutputError(f"{why} ({out.name}); use one of {', '.join(VECTOR_DRIVERS)}")
    if driver == "Parquet" and importlib.util.find_spec("pyarrow") is None:
        raise OutputError("writing .parquet needs pyarrow (pip install pyarrow); or use .gpkg/.fgb")
    check_writable(out, overwrite)
    return driver


def check_writable(out: Path, overwrite: bool) -> None:
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputError(f"{out} exists; pass --overwrite to replace it")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"output folder {folder} is not writable")


def qml_style(info: ClassInfo, field: str = "class_id") -> str:
    """A QGIS categorized renderer on ``field`` that fills each class in its colour; light
    classes get a darker outline so that their legend swatch shows (see qgis_style)."""
    return vector_qml(info.names, info.colors, field)


def add_gpkg_default_style(gpkg: Path, layer: str, qml: str, style_name: str = "rsseg classes") -> None:
    """Create QGIS's ``layer_styles`` table (its own schema) and a default style row for ``layer``."""
    con = sqlite3.connect(gpkg)
    try:
        geom_col = con.execute(
            "SELECT column_name FROM gpkg_geometry_columns WHERE table_name = ?", (layer,)
        ).fetchone()[0]
        con.execute(
            "CREATE TABLE IF NOT EXISTS layer_styles (id INTEGER PRIMARY KEY AUTOINCREMENT,"
            " f_table_catalog TEXT(256), f_table_schema TEXT(256), f_table_name TEXT(256),"
            " f_geometry_column TEXT(256), styleName TEXT(30), styleQML TEXT, styleSLD TEXT,"
            " useAsDefault BOOLEAN, description TEXT, owner TEXT(30), ui TEXT(30),"
            " update_time DATETIME DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')))"
        )
        con.execute(
            "INSERT OR IGNORE INTO gpkg_contents (table_name, data_type, identifier) VALUES (?, ?, ?)",
            ("layer_styles", "attributes", "layer_styles"),
        )
        con.execute(
            "INSERT INTO layer_styles (f_table_catalog, f_table_schema, f_table_name, f_geometry_column,"
            " styleName, styleQML, styleSLD, useAsDefault, description, owner, ui, update_time)"
            " VALUES ('', '', ?, ?, ?, ?, '', 1, ?, '', NULL, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
            (layer, geom_col, style_name, qml, "classes in their colours (written by rsseg)"),
        )
        con.commit()
    finally:
        con.close()


def _warn_if_raster_style(qml_path: Path, out: Path) -> None:
    """QGIS reads one ``<name>.qml`` per name: a class raster of the same name loses its style."""
    try:
        text = qml_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return
    if is_raster_qml(text):
        warnings.warn(f"{qml_path.name} held the QGIS style of a class raster named like {out.name}; "
                      f"it now styles {out.name} (give the raster another name, or write .gpkg, "
                      "which keeps its style inside)", stacklevel=3)


def write_vectors(gdf: gpd.GeoDataFrame, out: Path, info: ClassInfo, *, overwrite: bool = False,
                  layer: str | None = None) -> list[Path]:
    """Write polygons to ``out`` (format from its suffix) with a QGIS style; returns files written.

    The data goes to a hidden temporary name first and is renamed when complete.
    """
    out = Path(out)
    driver = check_vector_output(out, overwrite)
    layer = layer or out.stem
    staged = temporary_path(out)
    qml = qml_style(info)
    written = [out]
    try:
        if driver == "Parquet":
            gdf.to_parquet(staged)
        else:
            extra = {"dataset_options": {"VERSION": GPKG_VERSION}} if driver == "GPKG" else {}
            gdf.to_file(staged, driver=driver, layer=layer if driver == "GPKG" else None,
                        engine="pyogrio", **extra)
        if driver == "GPKG":
            add_gpkg_default_style(staged, layer, qml)
        else:
            qml_path = out.with_suffix(".qml")
            _warn_if_raster_style(qml_path, out)
            qml_path.write_text(qml, encoding="utf-8")
            written.append(qml_path)
        os.replace(staged, out)
    except BaseException:
        try:
            staged.unlink()
        except FileNotFoundError:
            pass
        raise
    return written


def vectorize_to_file(
    raster: Path,
    out: Path,
    *,
    classes: ClassInfo | None = None,
    simplify: float | None = None,
    min_area: float = 0.0,
    overwrite: bool = False,
    progress: bool = False,
    block_rows: int | None = None,
) -> tuple[list[Path], int]:
    """``rsseg vectorize``: class raster -> styled vector file. Returns (files, polygon count)."""
    check_vector_output(out, overwrite)
    info = classes or class_info_from_raster(raster)
    gdf = vectorize_raster(raster, classes=info, simplify=simplify, min_area=min_area,
                           block_rows=block_rows, progress=progress)
    return write_vectors(gdf, out, info, overwrite=overwrite), len(gdf)
