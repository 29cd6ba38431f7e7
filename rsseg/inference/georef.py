"""Where outputs lie on the map: the transform of a raster with no georeferencing, pixel sizes.

Kept apart from :mod:`rsseg.inference.predict` so that vectorizing a class raster does not import
torch (that import alone is about 0.7 GB of resident memory).
"""

from __future__ import annotations

import math

import rasterio

# The transform GDAL reports for a raster without one, and the one QGIS draws it with instead.
GDAL_NO_TRANSFORM = rasterio.Affine.identity()
QGIS_PIXEL_TRANSFORM = rasterio.Affine(1.0, 0.0, 0.0, 0.0, -1.0, 0.0)


def pixel_size(transform: rasterio.Affine) -> tuple[float, float]:
    """A pixel's true width and height in map units: the lengths of the transform's column
    vectors, so rotated and sheared grids measure right (|a|, |e| alone are 0 at 90 degrees)."""
    return math.hypot(transform.a, transform.d), math.hypot(transform.b, transform.e)


def is_georeferenced(src: rasterio.DatasetReader) -> bool:
    """False for a raster with neither a CRS nor a geotransform (GDAL then reports identity)."""
    return src.crs is not None or src.transform != GDAL_NO_TRANSFORM


def output_transform(src: rasterio.DatasetReader) -> rasterio.Affine:
    """The transform outputs are written with: the scene's own, except for a raster with no
    georeferencing at all, which QGIS draws with pixel (col, row) at (col, -row); outputs get
    that transform explicitly so that they (raster and polygons) lie on the scene in QGIS."""
    return src.transform if is_georeferenced(src) else QGIS_PIXEL_TRANSFORM
