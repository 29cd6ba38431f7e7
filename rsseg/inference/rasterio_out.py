"""Class rasters that open as classes in QGIS: uint8, tiled, compressed, colour table, names, COG.

GDAL's COG driver can only copy a whole dataset, so rows are streamed into a tiled GeoTIFF under
a temporary name, overviews are built with ``mode`` resampling (classes must not be averaged),
and the result is copied to a Cloud-Optimized GeoTIFF that replaces the final path atomically.
Class names and colours travel in the TIFF itself (the palette; JSON dataset tags read back by
``rsseg vectorize``; one band metadata item per class, shown by ``gdalinfo``), so a ``.tif``
copied alone keeps them. Two sidecars serve QGIS: GDAL category names in ``.aux.xml`` (the
GTiff driver keeps category names only there; rasterio has no API for them, so that small XML
file is written by hand), and ``<name>.qml``, a paletted style QGIS loads by itself whose legend
holds only the classes and nodata (a TIFF palette always has 256 entries, and QGIS 3.22 lists
every one of them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence
from xml.sax.saxutils import escape

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.shutil import copy as rio_copy

from rsseg.errors import DataError
from rsseg.inference.qgis_style import raster_qml

NODATA_CLASS = 255
CONFIDENCE_NODATA = -1.0
CLASS_NAMES_TAG = "RSSEG_CLASS_NAMES"
CLASS_COLORS_TAG = "RSSEG_CLASS_COLORS"
BLOCK = 256


def temporary_path(final: Path, label: str = "partial", unique: bool = True) -> Path:
    """A hidden sibling of ``final`` that never looks like a finished output (same suffix).

    ``unique`` adds the process id; torchrun ranks pass False so rank 0 can find their strips.
    """
    final = Path(final)
    tag = f"{label}-{os.getpid()}" if unique else label
    return final.with_name(f".{final.stem}.{tag}{final.suffix}")


def remove_quietly(*paths: Path) -> None:
    for p in paths:
        for q in (p, Path(str(p) + ".aux.xml"), Path(str(p) + ".ovr")):
            try:
                q.unlink()
            except FileNotFoundError:
                pass


def _overview_factors(height: int, width: int, smallest: int = BLOCK) -> list[int]:
    factors = []
    f = 2
    while max(height, width) / f >= smallest / 2 and f <= 1024:
        factors.append(f)
        f *= 2
    return factors


class TiledRasterWriter:
    """Writes rows of a single-band raster into a tiled GeoTIFF, then publishes it as a COG.

    Use ``write_rows`` in any row order, then ``publish(final_path)``; ``discard()`` on failure.
    """

    def __init__(
        self,
        scratch_path: Path,
        *,
        height: int,
        width: int,
        crs,
        transform,
        dtype: str,
        nodata: float,
    ) -> None:
        self.scratch_path = Path(scratch_path)
        self.dtype = dtype
        self.height, self.width = height, width
        profile = dict(
            driver="GTiff",
            height=height,
            width=width,
            count=1,
            dtype=dtype,
            crs=crs,
            transform=transform,
            nodata=nodata,
            tiled=True,
            blockxsize=BLOCK,
            blockysize=BLOCK,
            compress="deflate",
            BIGTIFF="IF_SAFER",
        )
        self._ds = rasterio.open(self.scratch_path, "w", **profile)

    def write_rows(self, row: int, values: np.ndarray, col: int = 0) -> None:
        """Write ``values`` with its top-left pixel at (``row``, ``col``)."""
        h, w = values.shape
        window = rasterio.windows.Window(col, row, w, h)
        self._ds.write(values.astype(self.dtype, copy=False), 1, window=window)

    def close_scratch(self) -> None:
        if not self._ds.closed:
            self._ds.close()

    def publish(
        self,
        final_path: Path,
        *,
        resampling: Resampling,
        colormap: dict[int, tuple[int, int, int, int]] | None = None,
        tags: dict[str, str] | None = None,
        description: str | None = None,
        band_tags: dict[str, str] | None = None,
    ) -> Path:
        """Overviews, colour table and tags on the scratch file, then COG copy and rename."""
        self.close_scratch()
        with rasterio.open(self.scratch_path, "r+") as ds:
            if colormap:
                ds.write_colormap(1, colormap)
            if tags:
                ds.update_tags(**tags)
            if band_tags:
                ds.update_tags(1, **band_tags)
            if description:
                ds.set_band_description(1, description)
            factors = _overview_factors(ds.height, ds.width)
            if factors:
                ds.build_overviews(factors, resampling)
        final_path = Path(final_path)
        staged = temporary_path(final_path, "cog")
        try:
            rio_copy(
                self.scratch_path,
                staged,
                driver="COG",
                compress="deflate",
                blocksize=512,
                overviews="force_use_existing" if _overview_factors(self.height, self.width) else "none",
                bigtiff="if_safer",
            )
            os.replace(staged, final_path)
        finally:
            remove_quietly(staged, self.scratch_path)
        return final_path

    def discard(self) -> None:
        self.close_scratch()
        remove_quietly(self.scratch_path)


def class_colormap(colors: Sequence[Sequence[int]]) -> dict[int, tuple[int, int, int, int]]:
    cmap = {i: (int(c[0]), int(c[1]), int(c[2]), 255) for i, c in enumerate(colors)}
    cmap[NODATA_CLASS] = (0, 0, 0, 0)
    return cmap


def class_tags(class_names: Sequence[str], class_colors: Sequence[Sequence[int]]) -> dict[str, str]:
    return {
        CLASS_NAMES_TAG: json.dumps(list(class_names)),
        CLASS_COLORS_TAG: json.dumps([list(map(int, c[:3])) for c in class_colors]),
    }


def class_band_tags(class_names: Sequence[str], class_colors: Sequence[Sequence[int]]) -> dict[str, str]:
    """Band metadata, one readable item per class (``CLASS_0=water``, ``CLASS_0_COLOR=0,0,255``)."""
    tags = {}
    for i, (name, c) in enumerate(zip(class_names, class_colors)):
        tags[f"CLASS_{i}"] = str(name)
        tags[f"CLASS_{i}_COLOR"] = ",".join(str(int(v)) for v in c[:3])
    tags[f"CLASS_{NODATA_CLASS}"] = "nodata"
    return tags


def qml_path_for(raster_path: Path) -> Path:
    """Where QGIS looks for a file's default style: the same name with ``.qml``."""
    return Path(raster_path).with_suffix(".qml")


def write_raster_style(raster_path: Path, class_names: Sequence[str],
                       class_colors: Sequence[Sequence[int]]) -> Path:
    """``<name>.qml`` beside the raster: a paletted style listing only the classes and nodata."""
    target = qml_path_for(raster_path)
    staged = temporary_path(target, "style")
    try:
        staged.write_text(raster_qml(class_names, class_colors, NODATA_CLASS), encoding="utf-8")
        os.replace(staged, target)
    finally:
        remove_quietly(staged)
    return target


def write_category_names(raster_path: Path, class_names: Sequence[str]) -> Path:
    """GDAL PAM sidecar with the band's category names (what QGIS shows for a paletted band)."""
    names = list(class_names) + [""] * (NODATA_CLASS - len(class_names)) + ["nodata"]
    items = "".join(f"<Category>{escape(n)}</Category>" for n in names)
    xml = (
        "<PAMDataset>\n  <PAMRasterBand band=\"1\">\n"
        f"    <CategoryNames>{items}</CategoryNames>\n"
        "  </PAMRasterBand>\n</PAMDataset>\n"
    )
    sidecar = Path(str(raster_path) + ".aux.xml")
    sidecar.write_text(xml, encoding="utf-8")
    return sidecar


def publish_class_raster(
    writer: TiledRasterWriter,
    final_path: Path,
    class_names: Sequence[str],
    class_colors: Sequence[Sequence[int]],
) -> Path:
    """Finish a class raster: colour table, names, mode overviews, COG layout, QGIS style."""
    if len(class_names) >= NODATA_CLASS:
        raise DataError(f"{len(class_names)} classes do not fit a uint8 class raster (at most 254)")
    out = writer.publish(
        final_path,
        resampling=Resampling.mode,
        colormap=class_colormap(class_colors),
        tags=class_tags(class_names, class_colors),
        description="class",
        band_tags=class_band_tags(class_names, class_colors),
    )
    write_category_names(out, class_names)
    write_raster_style(out, class_names, class_colors)
    return out


def publish_confidence_raster(writer: TiledRasterWriter, final_path: Path) -> Path:
    return writer.publish(final_path, resampling=Resampling.average, description="confidence")


def read_class_metadata(path: Path) -> tuple[list[str] | None, list[tuple[int, int, int]] | None]:
    """Class names and colours recorded in a class raster (ours, or any with a colour table)."""
    with rasterio.open(path) as ds:
        tags = ds.tags()
        names = json.loads(tags[CLASS_NAMES_TAG]) if CLASS_NAMES_TAG in tags else None
        if names is None:  # a tool may keep band metadata and drop the dataset's
            band = ds.tags(1)
            n = 0
            while f"CLASS_{n}" in band and n < NODATA_CLASS:
                n += 1
            names = [band[f"CLASS_{i}"] for i in range(n)] or None
        colors = None
        if CLASS_COLORS_TAG in tags:
            colors = [tuple(c) for c in json.loads(tags[CLASS_COLORS_TAG])]
        else:
            try:
                cmap = ds.colormap(1)
            except ValueError:  # no colour table
                cmap = None
            if cmap:
                top = max((k for k in cmap if k != NODATA_CLASS and cmap[k][3] > 0), default=-1)
                colors = [tuple(cmap[i][:3]) for i in range(top + 1)]
    return names, colors
