"""Benchmark: blockwise polygonize + merge over whole-raster ``rasterio.features.shapes``.

    python benchmarks/vectorize.py [--size 8192] [--block-rows N] [--speckle P]

Both sides produce polygons in pixel coordinates from the same class raster (a land-cover-like
map of smooth regions written block by block); the ratio is blockwise time / whole time,
measured in the same run (target: at most 1.5), and the polygon sets are checked to be
identical vertex for vertex (normalized WKB, sorted with the class ids). ``--block-rows`` defaults
to what ``rsseg vectorize`` uses (about 32 Mpx per strip); smaller strips mean more seams to merge.
``--speckle P`` replaces the map by independent pixels, class 1 with probability P: above the
percolation threshold (P > 0.593) one region spans the raster with pinches and holes everywhere,
the hardest case for the seam merge.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import shapely
from scipy import ndimage

from rsseg.inference.vectorize import auto_block_rows, polygonize_pixels, polygonize_whole


def write_class_raster(path: Path, size: int, classes: int = 6, block: int = 2048) -> Path:
    """Smooth random regions (blurred noise, thresholded) like a land-cover map, block by block.

    Each block is blurred with a margin so that regions continue across block edges.
    """
    profile = dict(driver="GTiff", height=size, width=size, count=1, dtype="uint8", nodata=255,
                   tiled=True, blockxsize=512, blockysize=512, compress="deflate",
                   crs="EPSG:32632", transform=rasterio.Affine(0.5, 0, 500000, 0, -0.5, 5400000))
    rng = np.random.default_rng(0)
    noise = rng.random((size // 16 + 2, size // 16 + 2)).astype(np.float32)
    with rasterio.open(path, "w", **profile) as dst:
        for r in range(0, size, block):
            for c in range(0, size, block):
                h, w = min(block, size - r), min(block, size - c)
                coarse = noise[r // 16 : (r + h) // 16 + 2, c // 16 : (c + w) // 16 + 2]
                fine = ndimage.zoom(coarse, 16, order=1)[:h, :w]
                values = (fine * classes * 1.999).astype(np.uint8) % classes
                dst.write(values, 1, window=rasterio.windows.Window(c, r, w, h))
    return path


def write_speckle_raster(path: Path, size: int, p: float) -> Path:
    rng = np.random.default_rng(0)
    classes = (rng.random((size, size)) < p).astype(np.uint8)
    with rasterio.open(path, "w", driver="GTiff", height=size, width=size, count=1, dtype="uint8",
                       nodata=255, tiled=True, compress="deflate", crs="EPSG:32632",
                       transform=rasterio.Affine(0.5, 0, 500000, 0, -0.5, 5400000)) as dst:
        dst.write(classes, 1)
    return path


def _normalized(geoms, ids) -> list[tuple[int, bytes]]:
    return sorted(zip(ids, shapely.to_wkb(shapely.normalize(np.asarray(geoms, dtype=object)))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--block-rows", type=int, default=None)
    parser.add_argument("--speckle", type=float, default=None, metavar="P")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "classes.tif"
        if args.speckle is None:
            write_class_raster(path, args.size)
        else:
            write_speckle_raster(path, args.size, args.speckle)
        t0 = time.perf_counter()
        whole_geoms, whole_ids = polygonize_whole(path)
        whole = time.perf_counter() - t0
        t0 = time.perf_counter()
        block_geoms, block_ids = polygonize_pixels(path, block_rows=args.block_rows)
        blockwise = time.perf_counter() - t0
    identical = _normalized(whole_geoms, whole_ids) == _normalized(block_geoms, block_ids)
    print(json.dumps({
        "benchmark": "vectorize", "size": args.size, "speckle": args.speckle,
        "block_rows": args.block_rows or auto_block_rows(args.size),
        "polygons": len(whole_geoms), "whole_s": round(whole, 2), "blockwise_s": round(blockwise, 2),
        "ratio": round(blockwise / whole, 3), "target": 1.5, "identical": identical,
    }))


if __name__ == "__main__":
    main()
