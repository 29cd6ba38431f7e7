"""Class raster -> polygons, streamed block by block, equal to whole-raster polygonization.

``rasterio.features.shapes`` needs the whole array in memory. Here the raster is read in blocks
(full-width strips of rows up to 4096 columns; wider rasters also cut into columns, blocks of
about 16 Mpx), each polygonized by ``shapes`` on its class values. A polygon that reaches no edge
its block shares with another block is a whole region. Regions that continue across a seam
between two blocks are found by the pixels their pieces' edges cover on the seam (same class,
same pixel), joined with a union-find, and merged once no later block can touch them
(``rsseg.inference.seam_merge``: shared seam edges dropped, rings re-linked; small groups by
GEOS's union). Pixel corners are integers in the working coordinates, so the merge is exact and
the result equals whole-raster polygonization vertex for vertex (tests/test_vectorize.py).
:func:`vectorize_to_file` writes each block's finished polygons as they come (one open dataset,
fed an Arrow stream), so memory grows neither with the raster's height nor with its width: a
block of pixels and the regions still open are held, nothing else. Polygons travel as flat
arrays (``Rag``) from ``shapes`` to the WKB written; no shapely geometry is built on the way.

Simplification (default one pixel) is Visvalingam-Whyatt on the shared edge network
(``seam_merge.CoverageSimplifier``): every chain of edges between two polygons is simplified
once, with the first of its two polygons to be finished, and the same vertices leave both, so
neighbours keep meeting without gaps or overlaps, across blocks too. A vertex goes only while
its triangle holds no other vertex, so no edge crosses another and every polygon stays valid.
Edges along nodata and the scene edge are left as they are: the polygons' union stays exactly
the valid pixels. Where a polygon's corner lies on a neighbour's straight side (a T-junction)
the neighbour gets that vertex too, so the output is a noded coverage
(``shapely.coverage_is_valid``). The result depends a little on the blocks (a chain shared with
a region still open keeps one vertex more, see ``CoverageSimplifier``), never its validity.
"""

from __future__ import annotations

import ctypes
import gc
import importlib.util
import json
import math
import os
import sqlite3
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import geopandas as gpd
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pyogrio
import pyproj
import rasterio
import rasterio.features
import rasterio.transform
import shapely
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from tqdm.auto import tqdm

from rsseg.errors import DataError, OutputError, UsageError, warn
from rsseg.inference.georef import output_transform
from rsseg.inference.paths import clashing_input
from rsseg.inference.qgis_style import is_raster_qml, vector_qml
from rsseg.inference.rasterio_out import NODATA_CLASS, read_class_metadata, temporary_path
from rsseg.inference.seam_merge import (
    CoverageSimplifier,
    Rag,
    _keys,
    _runs,
    merge_rag,
    node_positions,
    sorted_unique,
)

VECTOR_DRIVERS = {".gpkg": "GPKG", ".geojson": "GeoJSON", ".fgb": "FlatGeobuf", ".parquet": "Parquet"}
RASTER_SUFFIXES = (".tif", ".tiff")
# GeoPackage 1.2: GDAL >= 3.7 writes 1.4 by default, which QGIS 3.22's GDAL (3.6, Debian 12)
# warns about on every load; 1.2 is read without a warning by every GDAL since 2.2.
GPKG_VERSION = "1.2"
# GDAL's block cache while blocks are read: each block is read once, and the default cache (5 %
# of RAM) would otherwise keep every block read, growing the process with the raster's size.
READ_CACHE_MB = 64
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

    def forget(self, members: Sequence[int]) -> None:
        for m in members:
            self.parent.pop(m, None)


def records_to_polygons(records: list[tuple[dict, float]]) -> tuple[np.ndarray, list[int]]:
    """GeoJSON-like ``(geometry, value)`` pairs from ``rasterio.features.shapes`` -> shapely
    polygons, built in one vectorized call (``shapely.geometry.shape`` per polygon spends most of
    its time creating coordinate objects one by one)."""
    if not records:
        return np.empty(0, dtype=object), []
    xy, ring_sizes, rings_per_polygon = _record_arrays(records)
    offsets = (np.r_[0, np.cumsum(ring_sizes)], np.r_[0, np.cumsum(rings_per_polygon)])
    polygons = shapely.from_ragged_array(shapely.GeometryType.POLYGON, xy, offsets)
    return polygons, [int(v) for _, v in records]


def _record_arrays(records: list[tuple[dict, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Closed ring vertices (float64), vertices per ring, rings per polygon of ``shapes`` records."""
    rings_of = [geom["coordinates"] for geom, _ in records]
    rings_per_polygon = np.fromiter(map(len, rings_of), dtype=np.int64, count=len(rings_of))
    rings = list(chain.from_iterable(rings_of))
    ring_sizes = np.fromiter(map(len, rings), dtype=np.int64, count=len(rings))
    n = int(ring_sizes.sum())
    xy = np.fromiter(chain.from_iterable(chain.from_iterable(rings)), dtype=np.float64, count=2 * n)
    return xy.reshape(n, 2), ring_sizes, rings_per_polygon


def _records_to_rag(records: list[tuple[dict, float]]) -> tuple[Rag, np.ndarray]:
    """``shapes`` records -> polygons as flat integer arrays (rings open), and their values."""
    if not records:
        return Rag.empty(), np.zeros(0, dtype=np.int64)
    xy, ring_sizes, rings_per_polygon = _record_arrays(records)
    is_open = np.ones(len(xy), dtype=bool)
    is_open[np.cumsum(ring_sizes) - 1] = False
    values = np.fromiter((v for _, v in records), dtype=np.float64, count=len(records))
    return Rag(xy[is_open].astype(np.int64), ring_sizes - 1, rings_per_polygon), values.astype(np.int64)


def _block_polygons(classes: np.ndarray, transform: rasterio.Affine,
                    chunk: int = 2048) -> tuple[Rag, np.ndarray]:
    """``shapes`` of a block as flat arrays, converted ``chunk`` polygons at a time (as Python
    objects a polygon's vertex costs ~100 bytes, as arrays 16)."""
    records = rasterio.features.shapes(classes, mask=classes != NODATA_CLASS, connectivity=4,
                                       transform=transform)
    parts, values = [], []
    with _no_cyclic_gc():
        while batch := list(islice(records, chunk)):
            rag, vals = _records_to_rag(batch)
            parts.append(rag)
            values.append(vals)
    if not parts:
        return Rag.empty(), np.zeros(0, dtype=np.int64)
    return Rag.concat(parts), np.concatenate(values)


@contextmanager
def _no_cyclic_gc():
    """Python's cyclic garbage collector off: ``shapes`` builds millions of small dicts, lists and
    tuples (no cycles, freed by reference counting), and the collector's passes over them cost
    a third of the block's polygonization."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _release_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc): a block's arrays, freed, leave
    holes that glibc keeps, and without this the process grows block after block."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def _load_malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_malloc_trim = _load_malloc_trim()


# Pixels per block: a block's polygonization and simplification hold about 50 bytes a pixel.
BLOCK_PIXELS = 1 << 24


def auto_block_shape(width: int, pixels: int = BLOCK_PIXELS) -> tuple[int, int]:
    """(rows, columns) of blocks of about ``pixels`` pixels (16 Mpx: a block's polygonization
    and simplification hold about 50 bytes a pixel, in GDAL and here). Rasters up to
    sqrt(pixels) wide go in full-width strips; wider ones are cut into columns too, about
    square, so that a block's working set does not grow with the raster's width."""
    side = math.isqrt(pixels)
    n_cols = -(-max(width, 1) // side)
    cols = -(-max(width, 1) // n_cols)
    return max(256, pixels // cols), cols


# Merge groups with at most this many vertices go to GEOS's union (then the collinear vertices
# where seams were are dropped): up to a few hundred vertices it is faster than the hand-written
# merge (0.1-0.4 ms against 1-1.5 ms a region, mostly fixed cost); beyond, GEOS's overlay grows
# much faster (130 ms against 3 ms above 1,000). Both give GDAL's polygon (tests/test_vectorize.py).
SMALL_MERGE_VERTICES = 256


def _merge_group(parts: list[Rag], seam_rows: Sequence[int], seam_cols: Sequence[int]) -> Rag:
    pieces = Rag.concat(parts)
    if len(pieces.xy) <= SMALL_MERGE_VERTICES:
        merged = shapely.union_all(pieces.to_shapely())
        if merged.geom_type == "Polygon":
            return Rag.from_shapely([shapely.simplify(merged, 0)])  # the seam-end vertices go
    # The exact seam merge is linear in the vertices; GEOS's union is the safety net.
    merged = merge_rag(pieces, seam_rows, seam_cols)
    return Rag.from_shapely([shapely.union_all(pieces.to_shapely())]) if merged is None else merged


def _line_owners(pieces: Rag, ids: np.ndarray, classes: np.ndarray, axis: int, line: int,
                 lo: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Which piece (id, class; -1 for none) lies along a block edge at each pixel of it: the
    row ``y = line`` (``axis`` 1; positions are columns ``lo`` ..) or the column ``x = line``
    (``axis`` 0; positions are rows). Read off the pieces' edges on that line: every such edge
    of a piece that stops at the line borders a pixel of that piece."""
    ids_at = np.full(length, -1, dtype=np.int64)
    cls_at = np.full(length, -1, dtype=np.int64)
    if len(pieces) == 0:
        return ids_at, cls_at
    # Only a shell reaches a block's edge (a hole there would be open to it).
    shells = pieces.shell_rings()
    sizes = pieces.ring_sizes[shells]
    piece, k = _runs(sizes)
    start = pieces.ring_starts()[shells][piece]
    a = pieces.xy[start + k]
    b = pieces.xy[start + (k + 1) % sizes[piece]]
    along = 1 - axis
    edge = (a[:, axis] == line) & (b[:, axis] == line)
    p0 = np.minimum(a[edge, along], b[edge, along]) - lo
    p1 = np.maximum(a[edge, along], b[edge, along]) - lo
    piece = piece[edge]
    run, k = _runs(p1 - p0)
    ids_at[p0[run] + k] = ids[piece][run]
    cls_at[p0[run] + k] = classes[piece][run]
    return ids_at, cls_at


def _join_along(uf: "_UnionFind", ids_a: np.ndarray, cls_a: np.ndarray, ids_b: np.ndarray,
                cls_b: np.ndarray) -> None:
    """Join the pieces on either side of a seam that meet at a pixel edge with the same class."""
    same = (ids_a >= 0) & (ids_b >= 0) & (cls_a == cls_b)
    for a, b in np.unique(np.stack([ids_a[same], ids_b[same]], 1), axis=0).tolist():
        uf.union(a, b)


def _split(rag: Rag) -> list[Rag]:
    """One Rag per polygon, each its own copy (a view would keep the whole block's arrays alive
    as long as any one piece stays open), vertices as int32: the open pieces of regions that
    span many blocks are most of what is held between blocks (:func:`_widen` on use)."""
    ring_end = np.cumsum(rag.ring_counts).tolist()
    vertex_end = np.cumsum(rag.ring_sizes)
    out, r0, v0 = [], 0, 0
    for r1 in ring_end:
        v1 = int(vertex_end[r1 - 1])
        out.append(Rag(rag.xy[v0:v1].astype(np.int32), rag.ring_sizes[r0:r1].copy(), rag.ring_counts[len(out):len(out) + 1].copy()))
        r0, v0 = r1, v1
    return out


def _widen(piece: Rag) -> Rag:
    """A held piece (int32, see :func:`_split`) as the int64 the merge and the simplifier need."""
    return Rag(piece.xy.astype(np.int64), piece.ring_sizes, piece.ring_counts)


@dataclass
class _Batch:
    raw: Rag  # polygons as polygonized (pixel coordinates)
    geoms: Rag  # the same, simplified when asked
    classes: np.ndarray


class _BlockPolygonizer:
    """Polygons of a class raster block by block, each batch as soon as no later block can touch it.

    Blocks go row-major. Each goes through ``rasterio.features.shapes`` on its class values
    (4-connected regions of one class, exactly GDAL's polygonization of the block). A piece that
    reaches no edge of its block shared with another block is a whole region, finished at once.
    Pieces on either side of a seam are matched by the pixels their edges on the seam cover (same
    class, same pixel: one region), joined with a union-find; a group is finished, merged and
    handed out once none of its members reaches the edge of a block still to come (below it, or
    right of it). Only the open groups stay in memory, with a block of pixels at a time: memory
    follows the block's size and the seams' length, not the raster's. With a simplifier, the
    nodes of the pixel-edge network are collected for :class:`CoverageSimplifier` as blocks are read.
    """

    def __init__(self, ds: rasterio.DatasetReader, block_rows: int | None = None,
                 simplifier: CoverageSimplifier | None = None, progress: bool = False,
                 desc: str = "vectorize", block_cols: int | None = None):
        self.ds = ds
        self.height, self.width = ds.height, ds.width
        if block_rows is None and block_cols is None:
            block_rows, block_cols = auto_block_shape(self.width)
        elif block_cols is None:  # rows alone: full-width strips
            block_cols = self.width
        elif block_rows is None:
            block_rows = max(256, BLOCK_PIXELS // block_cols)
        self.block_rows, self.block_cols = max(1, block_rows), max(1, block_cols)
        self.simplifier = simplifier
        self.progress = progress
        self.desc = desc
        self.pieces: dict[int, Rag] = {}  # open pieces by id
        self.piece_class: dict[int, int] = {}
        self.piece_top: dict[int, int] = {}
        self.piece_wait: dict[int, int] = {}  # the last block whose edge it reaches (row-major index)
        self.open_groups: list[int] = []  # every open piece
        self.uf = _UnionFind()
        self.seam_rows: list[int] = []
        self.seam_cols: list[int] = []
        self.next_id = 0
        self.peak_open = 0  # most pieces held at once (tests)

    def __iter__(self) -> Iterator[_Batch]:
        """The groups finished after each block, in pixel coordinates."""
        height, width, rows, cols = self.height, self.width, self.block_rows, self.block_cols
        n_cols = -(-width // cols)
        blocks = [(top, left) for top in range(0, height, rows) for left in range(0, width, cols)]
        # Pieces along the bottom of the block row above (per column) and along the right edge of
        # the block to the left (per row of this block row).
        below_ids = np.full(width, -1, dtype=np.int64)
        below_cls = np.full(width, -1, dtype=np.int64)
        right_ids = right_cls = np.zeros(0, dtype=np.int64)
        self.seam_cols = list(range(cols, width, cols))
        for index, (top, left) in enumerate(tqdm(blocks, desc=self.desc, unit="block",
                                                 disable=not self.progress, leave=False)):
            n, m = min(rows, height - top), min(cols, width - left)
            last_row, last_col = top + n == height, left + m == width
            if left == 0 and top > 0:
                self.seam_rows.append(top)
            haloed = self._read_block(top, left, n, m)
            if self.simplifier is not None:
                self._add_nodes(haloed, top, left, last_row)
            classes = np.ascontiguousarray(haloed[1:, 1:m + 1])
            del haloed
            rag, values = _block_polygons(classes, rasterio.Affine.translation(left, top))
            del classes
            if len(rag):
                starts, shells = rag.ring_starts(), rag.shell_rings()
                lo = np.minimum.reduceat(rag.xy, starts)[shells]
                hi = np.maximum.reduceat(rag.xy, starts)[shells]
                at_top = (lo[:, 1] == top) & (top > 0)
                at_left = (lo[:, 0] == left) & (left > 0)
                at_bottom = (hi[:, 1] == top + n) & (not last_row)
                at_right = (hi[:, 0] == left + m) & (not last_col)
                del lo, hi
            else:
                at_top = at_left = at_bottom = at_right = np.zeros(0, dtype=bool)
            whole = ~(at_top | at_left | at_bottom | at_right)
            out_geoms = [rag if whole.all() else rag.take(whole)]
            out_classes = [values if whole.all() else values[whole]]

            # Pieces that reach a seam are held under new ids, with the last block they wait for.
            held = np.flatnonzero(~whole)
            ids = np.full(len(rag), -1, dtype=np.int64)
            ids[held] = np.arange(self.next_id, self.next_id + len(held))
            self.next_id += len(held)
            wait = np.where(at_bottom, index + n_cols, np.where(at_right, index + 1, index))
            for pid, piece, cls, until in zip(ids[held].tolist(), _split(rag.take(held)),
                                              values[held].tolist(), wait[held].tolist()):
                self.pieces[pid] = piece
                self.piece_class[pid] = cls
                self.piece_top[pid] = top
                self.piece_wait[pid] = until

            def owners(which: np.ndarray, axis: int, line: int, lo: int, length: int):
                return _line_owners(rag.take(which), ids[which], values[which], axis, line, lo, length)

            if top > 0 and at_top.any():
                _join_along(self.uf, *owners(at_top, 1, top, left, m),
                            below_ids[left:left + m], below_cls[left:left + m])
            if left > 0 and at_left.any():
                _join_along(self.uf, *owners(at_left, 0, left, top, n), right_ids, right_cls)
            # For the blocks below and to the right (-1 where no piece reaches the edge).
            below_ids[left:left + m], below_cls[left:left + m] = owners(at_bottom, 1, top + n, left, m)
            right_ids, right_cls = owners(at_right, 0, left + m, top, n)
            del rag

            groups: dict[int, list[int]] = {}
            for pid in self.open_groups + ids[held].tolist():
                groups.setdefault(self.uf.find(pid), []).append(pid)
            self.peak_open = max(self.peak_open, len(self.pieces))
            still_open: list[int] = []
            done_geoms, done_classes, parts = [], [], []
            for members in groups.values():
                if any(self.piece_wait[m] > index for m in members):
                    still_open.extend(members)
                    continue
                parts = [_widen(self.pieces.pop(m)) for m in members]
                done_geoms.append(parts[0] if len(parts) == 1 else
                                  _merge_group(parts, self.seam_rows, self.seam_cols))
                done_classes.append(self.piece_class[members[0]])
                for m in members:
                    del self.piece_class[m], self.piece_top[m], self.piece_wait[m]
                self.uf.forget(members)
            self.open_groups = still_open
            out_geoms.extend(done_geoms)
            out_classes.append(np.asarray(done_classes, dtype=np.int64))
            raw = Rag.concat(out_geoms)
            out_geoms.clear()  # raw holds them now
            done_geoms.clear()
            batch = _Batch(raw, raw, np.concatenate(out_classes))
            if self.simplifier is not None:
                batch.geoms = self.simplifier.simplify(raw, self.open_vertex_keys())
                # Rows still needed: those of open pieces, and this block row's unless it is done.
                tops = list(self.piece_top.values()) + [top + n if last_col else top]
                self.simplifier.forget_above(min(tops))
            yield batch
            # Nothing of this block may outlive it: a suspended generator keeps its locals,
            # which would hold a whole block's polygons through the next block's peak.
            del batch, raw, out_geoms, done_geoms, out_classes, parts
            _release_freed_memory()

    def _read_block(self, top: int, left: int, n: int, m: int) -> np.ndarray:
        """The block's classes with a one-pixel frame: the row above, the columns left and right
        (nodata outside the raster), which the nodes on the block's vertex lines need."""
        haloed = np.full((n + 1, m + 2), NODATA_CLASS, dtype=np.uint8)
        r0, c0, c1 = max(top - 1, 0), max(left - 1, 0), min(left + m + 1, self.width)
        window = rasterio.windows.Window(c0, r0, c1 - c0, top + n - r0)
        haloed[r0 - (top - 1):, c0 - (left - 1):c1 - (left - 1)] = self.ds.read(1, window=window)
        return haloed

    def _add_nodes(self, haloed: np.ndarray, top: int, left: int, last_row: bool) -> None:
        """Nodes of the block's vertex lines: rows top .. top+n-1 (and the raster's bottom line
        after the last block row), columns left+1 .. left+m (and the raster's left line in the
        first block column; the frame's nodata right of the raster gives its right line). So
        every vertex is one block's, and each block has the nodes of its right edge before any
        polygon that ends there is finished."""
        n, m = haloed.shape[0] - 1, haloed.shape[1] - 2
        x_min = left if left == 0 else left + 1
        chunk = max(1, (1 << 22) // max(m, 1))
        lines = n + (1 if last_row else 0)
        for i in range(0, lines, chunk):
            j = min(i + chunk, lines)
            above = haloed[i:j]
            below = haloed[i + 1:j + 1]
            if len(below) < len(above):  # the raster's bottom line: nodata below
                below = np.concatenate([below, np.full((1, m + 2), NODATA_CLASS, dtype=np.uint8)])
            rows, v = node_positions(above, below)
            xs = left - 1 + v  # node_positions frames the columns once more: vertex v is x = left-1+v
            keep = (xs >= x_min) & (xs <= left + m)
            self.simplifier.add_nodes(rows[keep] + top + i, xs[keep])

    def open_vertex_keys(self) -> np.ndarray:
        """Sorted unique keys (``seam_merge._keys``) of every vertex of every open piece."""
        parts = []
        for piece in self.pieces.values():
            parts.append(_keys(piece.xy.astype(np.int64)))
        return sorted_unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


def polygonize_pixels(
    path: Path, block_rows: int | None = None, progress: bool = False, block_cols: int | None = None
) -> tuple[list[shapely.Polygon], list[int]]:
    """Polygons (in pixel coordinates: x = column, y = row) and their class ids, blockwise.

    ``block_rows`` and ``block_cols`` None pick blocks of about 16 Mpx (:func:`auto_block_shape`);
    ``block_rows`` alone, full-width strips of that many rows.
    """
    polygons: list[shapely.Polygon] = []
    class_ids: list[int] = []
    with rasterio.Env(GDAL_CACHEMAX=READ_CACHE_MB), _open_class_raster(path) as ds:
        for batch in _BlockPolygonizer(ds, block_rows, progress=progress,
                                       desc=f"vectorize {Path(path).name}", block_cols=block_cols):
            polygons.extend(batch.raw.to_shapely())
            class_ids.extend(batch.classes.tolist())
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


# ----------------------------------------------------------------------------- batches in map units


class _MapBatches:
    """Batches of finished polygons in the raster's CRS, with class_id, class_name and area_m2.

    Iterating streams the raster once; each batch is one block's finished polygons, simplified
    (``simplify``: tolerance in map units; None: one pixel; 0: none) and filtered by ``min_area``
    (m², on the polygons as polygonized, before simplification).
    """

    def __init__(self, path: Path, info: ClassInfo, *, simplify: float | None = None,
                 min_area: float = 0.0, block_rows: int | None = None, progress: bool = False,
                 block_cols: int | None = None):
        self.path, self.info = Path(path), info
        self.min_area, self.block_rows, self.progress = min_area, block_rows, progress
        self.block_cols = block_cols
        with _open_class_raster(self.path) as ds:
            # A raster with no georeferencing at all is drawn by QGIS at (col, -row): the
            # polygons take that transform too, so they lie on the raster (predict writes it).
            t = output_transform(ds)
            self.crs = ds.crs
            bounds = rasterio.transform.array_bounds(ds.height, ds.width, t)
        self.coeffs = np.array([[t.a, t.b], [t.d, t.e]])
        self.offset = np.array([t.c, t.f])
        self.pixel_area = abs(t.a * t.e - t.b * t.d)
        # Visvalingam-Whyatt removes a vertex whose triangle is under tolerance² (map units);
        # an affine map scales every area alike, so the test runs in pixels: tolerance² / pixel
        # area. The default, one pixel, is 1 px² whatever the pixel's shape.
        tolerance = None if simplify is None else float(simplify)
        self.area_limit = 1.0 if tolerance is None else tolerance * tolerance / self.pixel_area
        self.unit = 1.0
        self.utm = None
        if self.crs is None:
            warn("class raster has no CRS; area_m2 is in squared map units")
        elif self.crs.is_geographic:
            # One projected CRS for the whole raster (batches would otherwise differ).
            self.utm = gpd.GeoSeries([shapely.box(*bounds)], crs=self.crs).estimate_utm_crs()
        else:
            try:
                self.unit = pyproj.CRS.from_user_input(self.crs).axis_info[0].unit_conversion_factor or 1.0
            except (AttributeError, IndexError, pyproj.exceptions.CRSError):
                pass

    @property
    def crs_wkt(self) -> str | None:
        return None if self.crs is None else self.crs.to_wkt()

    def to_map(self, xy: np.ndarray) -> np.ndarray:
        return xy @ self.coeffs.T + self.offset

    def areas_m2(self, rag: Rag, map_xy: np.ndarray) -> np.ndarray:
        """Areas in m² of polygons in pixel coordinates (``rag``) whose map coordinates are ``map_xy``."""
        if self.utm is None:  # exact: integer shoelace times the pixel's area
            return rag.areas() * self.pixel_area * self.unit * self.unit
        if self._to_utm is None:
            self._to_utm = pyproj.Transformer.from_crs(self.crs, self.utm, always_xy=True)
        x, y = self._to_utm.transform(map_xy[:, 0], map_xy[:, 1])
        return rag.areas(np.stack([x, y], 1))

    def __iter__(self) -> Iterator[tuple[np.ndarray, list[str], Rag, np.ndarray]]:
        """(class ids int32, class names, polygons in map coordinates, area_m2) per batch."""
        simplifier = CoverageSimplifier(self.area_limit) if self.area_limit > 0 else None
        names = self.info.names
        self._to_utm = None
        with rasterio.Env(GDAL_CACHEMAX=READ_CACHE_MB), _open_class_raster(self.path) as ds:
            for batch in _BlockPolygonizer(ds, self.block_rows, simplifier=simplifier, progress=self.progress,
                                           desc=f"vectorize {self.path.name}", block_cols=self.block_cols):
                rag, classes, raw = batch.geoms, batch.classes, batch.raw
                del batch  # the polygons as polygonized go once min_area has used them
                if self.min_area > 0 and len(rag):
                    keep = self.areas_m2(raw, self.to_map(raw.xy) if self.utm is not None else raw.xy) >= self.min_area
                    rag, classes = rag.take(keep), classes[keep]
                del raw
                if len(rag) == 0:
                    continue
                map_xy = self.to_map(rag.xy)
                ids = classes.astype(np.int32)
                class_names = [names[c] if c < len(names) else f"class_{c}" for c in ids.tolist()]
                yield ids, class_names, Rag(map_xy, rag.ring_sizes, rag.ring_counts), self.areas_m2(rag, map_xy)
                del rag, classes, map_xy, ids, class_names  # as in _BlockPolygonizer


def _polygon_wkb(rag: Rag) -> pa.Array:
    """Little-endian WKB of each polygon, as an Arrow binary array, without building geometries:
    the closed rings' coordinate bytes with each ring's header (and each polygon's before its
    first ring) inserted in front."""
    closed = np.ascontiguousarray(rag.closed_xy(), dtype="<f8")
    points = rag.ring_sizes + 1
    first_ring = np.zeros(len(points), dtype=bool)
    first_ring[rag.shell_rings()] = True
    header = np.zeros((len(points), 13), dtype=np.uint8)
    header[:, 0] = 1  # little endian
    header[:, 1:5] = np.array([3], dtype="<u4").view(np.uint8)  # Polygon
    header[:, 5:9] = np.repeat(rag.ring_counts, rag.ring_counts).astype("<u4").view(np.uint8).reshape(-1, 4)
    header[:, 9:13] = points.astype("<u4").view(np.uint8).reshape(-1, 4)
    used = np.ones(header.shape, dtype=bool)
    used[~first_ring, :9] = False
    at = np.repeat(16 * (np.cumsum(points) - points), used.sum(1))
    data = np.insert(closed.view(np.uint8).ravel(), at, header[used])
    ring_bytes = 4 + 16 * points
    polygon_bytes = 9 + np.add.reduceat(ring_bytes, rag.shell_rings())
    offsets = np.r_[0, np.cumsum(polygon_bytes)]
    return pa.Array.from_buffers(pa.large_binary(), len(rag),
                                 [None, pa.py_buffer(offsets.astype(np.int64)), pa.py_buffer(data)])


# ----------------------------------------------------------------------------- public API


def vectorize_raster(
    path: Path,
    *,
    classes: ClassInfo | None = None,
    simplify: float | None = None,
    min_area: float = 0.0,
    block_rows: int | None = None,
    progress: bool = False,
    block_cols: int | None = None,
) -> gpd.GeoDataFrame:
    """Polygons of a uint8 class raster with class_id, class_name, area_m2, in the raster's CRS.

    ``simplify`` is a tolerance in map units (None: one pixel; 0: none, the polygons then
    re-rasterize to the raster exactly). ``min_area`` drops polygons under that many m².
    Everything is held in memory: for large rasters :func:`vectorize_to_file` streams instead.
    """
    path = Path(path)
    info = classes or class_info_from_raster(path)
    batches = _MapBatches(path, info, simplify=simplify, min_area=min_area, block_rows=block_rows,
                          progress=progress, block_cols=block_cols)
    ids, names, geoms, areas = [], [], [], []
    for i, n, g, a in batches:
        ids.append(i)
        names.extend(n)
        geoms.append(g)
        areas.append(a)
    gdf = gpd.GeoDataFrame(
        {"class_id": np.concatenate(ids) if ids else np.zeros(0, dtype=np.int32), "class_name": names},
        geometry=list(Rag.concat(geoms).to_shapely()) if geoms else [],
        crs=batches.crs,
    )
    gdf["area_m2"] = np.concatenate(areas) if areas else np.zeros(0)
    return gdf


def class_info_from_raster(path: Path) -> ClassInfo:
    _open_class_raster(path).close()  # a clear DataError for a missing or non-class raster
    names, colors = read_class_metadata(path)
    with rasterio.Env(GDAL_CACHEMAX=READ_CACHE_MB), _open_class_raster(path) as ds:
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


def check_not_inputs(outputs: Sequence[Path], inputs: Sequence[Path]) -> None:
    """Refuse any output that is one of the inputs (symlinks, relative paths, hard links
    resolved), whatever --overwrite says: replacing the scene being read destroys it. Here, not
    in rsseg.inference.run, so that ``rsseg vectorize`` does not import torch."""
    for out in outputs:
        hit = clashing_input(out, inputs)
        if hit is not None:
            same = "" if str(hit) == str(out) else f" (the same file as {hit})"
            raise OutputError(f"output {out} is an input of this run{same}; choose another name")


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


def _publish(out: Path, driver: str, layer: str, info: ClassInfo, write) -> list[Path]:
    """``write(staged)`` writes the data to a hidden temporary name; then the QGIS style goes in
    (GPKG) or beside (``.qml``), and the file is renamed to ``out``. Nothing stays behind on error."""
    staged = temporary_path(out)
    qml = qml_style(info)
    written = [out]
    try:
        write(staged)
        if driver == "GPKG":
            add_gpkg_default_style(staged, layer, qml)
        else:
            qml_path = out.with_suffix(".qml")
            _warn_if_raster_style(qml_path, out)
            qml_path.write_text(qml, encoding="utf-8")
            written.append(qml_path)
        os.replace(staged, out)
    except BaseException:
        for leftover in (staged, *(Path(f"{staged}{tail}") for tail in ("-journal", "-wal", "-shm"))):
            try:
                leftover.unlink()
            except FileNotFoundError:
                pass
        raise
    return written


def write_vectors(gdf: gpd.GeoDataFrame, out: Path, info: ClassInfo, *, overwrite: bool = False,
                  layer: str | None = None) -> list[Path]:
    """Write polygons to ``out`` (format from its suffix) with a QGIS style; returns files written.

    The data goes to a hidden temporary name first and is renamed when complete.
    """
    out = Path(out)
    driver = check_vector_output(out, overwrite)
    layer = layer or out.stem

    def write(staged: Path) -> None:
        if driver == "Parquet":
            gdf.to_parquet(staged)
        else:
            extra = {"dataset_options": {"VERSION": GPKG_VERSION}} if driver == "GPKG" else {}
            gdf.to_file(staged, driver=driver, layer=layer if driver == "GPKG" else None,
                        engine="pyogrio", **extra)

    return _publish(out, driver, layer, info, write)


_SCHEMA = pa.schema([("class_id", pa.int32()), ("class_name", pa.string()), ("area_m2", pa.float64()),
                     ("geometry", pa.large_binary())])


def _record_batches(batches: Iterable[tuple[np.ndarray, list[str], Rag, np.ndarray]],
                    counter: list[int]) -> Iterator[pa.RecordBatch]:
    def record(ids: np.ndarray, names: list[str], geoms: Rag, areas: np.ndarray) -> pa.RecordBatch:
        counter[0] += len(ids)
        return pa.record_batch([pa.array(ids, pa.int32()), pa.array(names, pa.string()),
                                pa.array(areas, pa.float64()), _polygon_wkb(geoms)], schema=_SCHEMA)

    # map: no loop variable keeps a batch's arrays alive while the next one is made.
    yield from map(lambda batch: record(*batch), batches)


def _write_stream(staged: Path, driver: str, layer: str, crs_wkt: str | None,
                  batches: Iterator[pa.RecordBatch]) -> None:
    """Write record batches as they come: GDAL keeps one dataset open (pyogrio.write_arrow reads
    them as an Arrow stream); Parquet goes through pyarrow's writer with GeoParquet metadata."""
    if driver == "Parquet":
        crs = None if crs_wkt is None else pyproj.CRS.from_wkt(crs_wkt).to_json_dict()
        geo = {"version": "1.0.0", "primary_column": "geometry", "creator": {"library": "rsseg"},
               "columns": {"geometry": {"encoding": "WKB", "geometry_types": ["Polygon"], "crs": crs}}}
        order = ["class_id", "class_name", "geometry", "area_m2"]  # as GeoDataFrame.to_parquet wrote
        schema = pa.schema([_SCHEMA.field(name) for name in order], metadata={"geo": json.dumps(geo)})
        with pq.ParquetWriter(staged, schema) as writer:
            for batch in batches:
                writer.write_batch(batch.select(order))
        return
    failure: list[BaseException] = []

    def watched() -> Iterator[pa.RecordBatch]:
        try:
            yield from batches
        except BaseException as err:  # the Arrow stream reports only "Error while accessing batch"
            failure.append(err)
            raise

    extra = {"dataset_options": {"VERSION": GPKG_VERSION}} if driver == "GPKG" else {}
    try:
        pyogrio.write_arrow(pa.RecordBatchReader.from_batches(_SCHEMA, watched()), staged,
                            layer=layer if driver == "GPKG" else None, driver=driver,
                            geometry_name="geometry", geometry_type="Polygon", crs=crs_wkt, **extra)
    except BaseException:
        if failure:
            raise failure[0] from None
        raise


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
    layer: str | None = None,
    block_cols: int | None = None,
) -> tuple[list[Path], int]:
    """``rsseg vectorize``: class raster -> styled vector file. Returns (files, polygon count).

    Streams: each block's finished polygons are written as soon as no later block can touch them,
    so memory does not grow with the raster's size. The file is written under a hidden
    temporary name and renamed when complete (removed on any error).
    """
    out = Path(out)
    driver = check_vector_output(out, overwrite)
    info = classes or class_info_from_raster(raster)
    layer = layer or out.stem
    batches = _MapBatches(raster, info, simplify=simplify, min_area=min_area, block_rows=block_rows,
                          progress=progress, block_cols=block_cols)
    count = [0]
    files = _publish(out, driver, layer, info, lambda staged: _write_stream(
        staged, driver, layer, batches.crs_wkt, _record_batches(batches, count)))
    return files, count[0]
