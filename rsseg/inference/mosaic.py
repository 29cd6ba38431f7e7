"""Many scenes as one virtual scene: the mosaic's grid as a GDAL VRT.

``rsseg predict t1.tif t2.tif ... -o city.gpkg`` (several scenes, no ``{stem}`` in the output)
predicts the tiles as one scene: windows slide over the mosaic, so a window on a tile border
sees both neighbours, and one class raster and one vector layer come out, with buildings whole
across tile borders. For tiles cut from one scene the result equals predicting that scene.

The mosaic is a VRT (an XML file GDAL reads like any raster), so everything downstream (band
checks, radiometry sampling, masks, windowed reads, a memory-flat GDAL cache) treats it as one
scene and reads only the tiles a window touches. Hand-written because rasterio has no
``BuildVRT`` and GDAL's own Python bindings need a compiler to install; the XML is small.

Rules, stated once:
- one CRS for all tiles (otherwise refused in one line naming two that differ); north-up grids;
  the same band count and data type;
- the grid: the union of the tiles' extents at the finest tile resolution, aligned to the
  tile that reaches furthest up-left; tiles at another resolution are resampled (bilinear);
- overlaps: the first valid pixel wins, in the order the scenes were given (a tile's nodata,
  mask or alpha lets the next tile show through);
- a pixel no tile covers, or only with nodata, is nodata (the mosaic's mask is the union of the
  tiles' masks); where the tiles share a nodata value, the mosaic declares it and holds it there
  (class rasters of per-area jobs, 255, mosaic the same way).
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence
from xml.sax.saxutils import escape

import rasterio

from rsseg.errors import DataError, UsageError
from rsseg.inference.paths import gdal_path, is_local_file, scene_name

# What a folder given as a scene contributes: the rasters GDAL reads that orthophotos come in.
RASTER_PATTERNS = ("*.tif", "*.tiff", "*.TIF", "*.TIFF", "*.vrt", "*.jp2", "*.img")
_GLOB_CHARS = set("*?[")
# Two resolutions or offsets closer than this (in pixels) are the same.
_EPS = 1e-6


def expand_scenes(args: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Scene arguments -> scenes: a folder gives the rasters in it, a glob its matches (both
    sorted by name); anything else (a file, a URL, a /vsi path) is kept as given."""
    scenes: list[str] = []
    for arg in args:
        text = os.fspath(arg)
        if is_local_file(text) and os.path.isdir(text):
            found = sorted({str(p) for pattern in RASTER_PATTERNS for p in Path(text).glob(pattern)})
            if not found:
                raise DataError(f"folder {text} holds no raster ({', '.join(RASTER_PATTERNS[::2])})")
            scenes += found
        elif is_local_file(text) and not os.path.exists(text) and _GLOB_CHARS & set(text):
            found = sorted(glob.glob(text))
            if not found:
                raise DataError(f"no file matches {text}")
            scenes += found
        else:
            scenes.append(text)
    return scenes


@dataclass(frozen=True)
class _Tile:
    scene: str
    width: int
    height: int
    transform: rasterio.Affine
    count: int
    dtypes: tuple[str, ...]
    all_valid: bool  # no nodata, mask or alpha: every pixel is data
    nodata: float | None


@dataclass(frozen=True)
class MosaicGrid:
    """The mosaic's grid and where each tile lands on it (pixel offsets and sizes, may be
    fractional for tiles off the grid)."""

    width: int
    height: int
    transform: rasterio.Affine
    crs: rasterio.crs.CRS | None
    tiles: tuple[_Tile, ...]
    places: tuple[tuple[float, float, float, float], ...]  # (x_off, y_off, x_size, y_size)

    @property
    def covered(self) -> bool:
        """Whether the tiles cover the whole grid with data everywhere (no mask needed)."""
        if not all(t.all_valid for t in self.tiles):
            return False
        area = sum(w * h for _, _, w, h in self.places)
        return not self._overlapping() and abs(area - self.width * self.height) < 0.5

    def _overlapping(self) -> bool:
        boxes = sorted(self.places)
        for i, (x, y, w, h) in enumerate(boxes):
            for x2, y2, w2, h2 in boxes[i + 1:]:
                if x2 >= x + w - _EPS:
                    break
                if y2 < y + h - _EPS and y < y2 + h2 - _EPS:
                    return True
        return False


def _read_tile(scene: str) -> tuple[_Tile, rasterio.crs.CRS | None]:
    from rsseg.inference.predict import open_scene

    with open_scene(scene) as src:
        flags = src.mask_flag_enums[0] if src.count else []
        all_valid = [f.name for f in flags] == ["all_valid"]
        tile = _Tile(scene, src.width, src.height, src.transform, src.count, tuple(src.dtypes),
                     all_valid, src.nodata)
        if src.crs is None and src.transform == rasterio.Affine.identity():
            raise DataError(f"{scene_name(scene)} has no georeferencing; tiles of a mosaic are "
                            "placed by their transform (predict it alone, or use {stem} in -o)")
        if src.transform.b or src.transform.d:
            raise DataError(f"{scene_name(scene)} is on a rotated grid; a mosaic needs north-up "
                            "tiles (predict it alone with {stem} in -o)")
        return tile, src.crs


def plan_mosaic(scenes: Sequence[str]) -> MosaicGrid:
    """Check the tiles against each other and lay out the mosaic's grid (see the module rules)."""
    if len(scenes) < 2:
        raise UsageError("a mosaic needs at least two scenes")
    tiles, crss = zip(*(_read_tile(s) for s in scenes))
    first = tiles[0]
    for tile, crs in zip(tiles[1:], crss[1:]):
        if crs != crss[0]:
            raise DataError(
                f"{scene_name(first.scene)} is in {_crs_text(crss[0])} but {scene_name(tile.scene)} "
                f"in {_crs_text(crs)}; a mosaic needs one CRS (reproject first, e.g. gdalwarp -t_srs, "
                "or predict them separately with {stem} in -o)"
            )
        if tile.count != first.count or tile.dtypes != first.dtypes:
            raise DataError(
                f"{scene_name(first.scene)} has {first.count} band(s) of {first.dtypes[0]} but "
                f"{scene_name(tile.scene)} {tile.count} of {tile.dtypes[0]}; a mosaic needs the "
                "same bands in every tile"
            )
    res_x = min(t.transform.a for t in tiles)
    res_y = min(-t.transform.e for t in tiles)
    if res_x <= 0 or res_y <= 0:
        raise DataError("a mosaic needs north-up tiles (positive pixel width, negative height)")
    left = min(t.transform.c for t in tiles)
    top = max(t.transform.f for t in tiles)
    # Align the grid to a tile: the tile furthest up-left keeps its exact pixel positions.
    anchor = min(tiles, key=lambda t: ((t.transform.c - left) / res_x + (top - t.transform.f) / res_y))
    left = anchor.transform.c - math.ceil((anchor.transform.c - left) / res_x - _EPS) * res_x
    top = anchor.transform.f + math.ceil((top - anchor.transform.f) / res_y - _EPS) * res_y
    places = []
    right = bottom = 0.0
    for t in tiles:
        x = _snap((t.transform.c - left) / res_x)
        y = _snap((top - t.transform.f) / res_y)
        w = _snap(t.width * t.transform.a / res_x)
        h = _snap(t.height * -t.transform.e / res_y)
        places.append((x, y, w, h))
        right, bottom = max(right, x + w), max(bottom, y + h)
    transform = rasterio.Affine(res_x, 0.0, left, 0.0, -res_y, top)
    return MosaicGrid(math.ceil(right - _EPS), math.ceil(bottom - _EPS), transform, crss[0],
                      tuple(tiles), tuple(places))


def _snap(value: float) -> float:
    """An offset within _EPS of a whole pixel is that pixel (tiles cut from one grid)."""
    return float(round(value)) if abs(value - round(value)) < _EPS else value


def _crs_text(crs: rasterio.crs.CRS | None) -> str:
    if crs is None:
        return "no CRS"
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_string()[:60]


_VRT_TYPES = {"uint8": "Byte", "int8": "Int8", "uint16": "UInt16", "int16": "Int16",
              "uint32": "UInt32", "int32": "Int32", "float32": "Float32", "float64": "Float64",
              "uint64": "UInt64", "int64": "Int64"}


def _num(v: float) -> str:
    if not math.isfinite(v) or v != int(v):
        return repr(float(v))
    return str(int(v))


def mosaic_vrt_xml(grid: MosaicGrid) -> str:
    """The VRT document of a mosaic: one band per tile band, sources listed last-first so that
    the first scene is painted last and wins; a dataset mask band (the union of the tiles'
    masks) unless the tiles cover the grid with data everywhere."""
    with rasterio.open(gdal_path(grid.tiles[0].scene)) as ref:
        colorinterp = [ci.name for ci in ref.colorinterp]
        descriptions = list(ref.descriptions)
    overlap = grid._overlapping()
    mask_needed = not grid.covered
    lines = [f'<VRTDataset rasterXSize="{grid.width}" rasterYSize="{grid.height}">']
    if grid.crs is not None:
        lines.append(f"  <SRS>{escape(grid.crs.to_wkt())}</SRS>")
    t = grid.transform
    lines.append(f"  <GeoTransform>{t.c!r}, {t.a!r}, {t.b!r}, {t.f!r}, {t.d!r}, {t.e!r}</GeoTransform>")
    order = list(zip(grid.tiles, grid.places))[::-1]

    def sources(band: str, kind: str, dtype: str) -> list[str]:
        out = []
        for tile, (x, y, w, h) in order:
            resample = "" if (w, h) == (tile.width, tile.height) else ' resampling="bilinear"'
            if kind == "mask":
                resample = "" if not resample else ' resampling="nearest"'
            element = "SimpleSource" if kind == "simple" else "ComplexSource"
            out += [
                f"    <{element}{resample}>",
                f'      <SourceFilename relativeToVRT="0">{escape(gdal_path(tile.scene))}</SourceFilename>',
                f"      <SourceBand>{band}</SourceBand>",
                f'      <SourceProperties RasterXSize="{tile.width}" RasterYSize="{tile.height}" '
                f'DataType="{dtype}" />',
                f'      <SrcRect xOff="0" yOff="0" xSize="{tile.width}" ySize="{tile.height}" />',
                f'      <DstRect xOff="{_num(x)}" yOff="{_num(y)}" xSize="{_num(w)}" ySize="{_num(h)}" />',
            ]
            if kind == "data":  # a tile's masked pixels let the tiles painted before show
                out.append("      <UseMaskBand>true</UseMaskBand>")
            if kind == "mask":  # 0 (masked) never erases another tile's valid pixels
                out.append("      <NODATA>0</NODATA>")
            out.append(f"    </{element}>")
        return out

    # Where tiles neither overlap nor have masks, plain sources are exact and faster.
    shared = {t.nodata for t in grid.tiles}
    nodata = shared.pop() if len(shared) == 1 else None
    if nodata is not None and math.isnan(nodata):
        nodata = None  # NaN is masked by the tiles' masks; the VRT needs no fill value for it
    data_kind = "data" if overlap and not all(t.all_valid for t in grid.tiles) else "simple"
    for b in range(1, grid.tiles[0].count + 1):
        dtype = _VRT_TYPES.get(grid.tiles[0].dtypes[b - 1])
        if dtype is None:
            raise DataError(f"{scene_name(grid.tiles[0].scene)}: band type "
                            f"{grid.tiles[0].dtypes[b - 1]} cannot be mosaicked")
        lines.append(f'  <VRTRasterBand dataType="{dtype}" band="{b}">')
        if descriptions[b - 1]:
            lines.append(f"    <Description>{escape(descriptions[b - 1])}</Description>")
        if nodata is not None:  # also what the pixels no tile covers hold
            lines.append(f"    <NoDataValue>{_num(nodata)}</NoDataValue>")
        if colorinterp[b - 1] not in ("undefined",):
            lines.append(f"    <ColorInterp>{colorinterp[b - 1].capitalize()}</ColorInterp>")
        lines += sources(str(b), data_kind, dtype)
        lines.append("  </VRTRasterBand>")
    if mask_needed:
        lines += ["  <MaskBand>", '    <VRTRasterBand dataType="Byte">']
        lines += sources("mask,1", "mask", "Byte")
        lines += ["    </VRTRasterBand>", "  </MaskBand>"]
    lines.append("</VRTDataset>")
    return "\n".join(lines) + "\n"


def write_mosaic_vrt(scenes: Sequence[str], path: Path) -> Path:
    """Check the scenes, lay out their mosaic and write it as a VRT at ``path``."""
    grid = plan_mosaic(list(scenes))
    Path(path).write_text(mosaic_vrt_xml(grid), encoding="utf-8")
    return Path(path)


@contextlib.contextmanager
def mosaic_scene(scenes: Sequence[str]) -> Iterator[str]:
    """A VRT of ``scenes`` in a private temporary folder, removed afterwards; the file is named
    so that messages say what it is (``mosaic-of-4-scenes.vrt``)."""
    with tempfile.TemporaryDirectory(prefix="rsseg-mosaic-") as tmp:
        path = Path(tmp) / f"mosaic-of-{len(scenes)}-scenes.vrt"
        write_mosaic_vrt(scenes, path)
        yield str(path)


def wants_mosaic(scenes: Sequence[str], out: Path) -> bool:
    """Several scenes and one output (no ``{stem}`` in it): they are predicted as one mosaic."""
    return len(scenes) > 1 and "{stem}" not in str(out)


__all__ = ["MosaicGrid", "expand_scenes", "mosaic_scene", "mosaic_vrt_xml", "plan_mosaic",
           "wants_mosaic", "write_mosaic_vrt"]
