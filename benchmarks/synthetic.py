"""Benchmark of rsseg's synthetic data: tile speed and flat memory of streamed scenes.

1. Tile speed: CPU seconds to render a 1024 x 1024 tile (target: under 1 s), against a baseline
   measured in the same run: writing that same tile as an uncompressed GeoTIFF with rasterio.
2. Scene memory: peak RSS growth while ``write_scene`` streams a small and a large scene (each
   in a fresh process, 1024-px windows), beyond the peak of rendering one 1024-px window.
   Flat memory: the growth stays small and about the same while the scene area grows by
   (large/small)^2; the baseline for scale is the size of the full-scene uint8 image.

    python benchmarks/synthetic.py            # 1024 tiles, scenes 2048^2 and 6144^2
    python benchmarks/synthetic.py --quick    # scenes 1024^2 and 2048^2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

_SCENE_CHILD = """
import json, resource, sys, tempfile
from pathlib import Path
from rsseg.data import synthetic
synthetic.generate_tile(1024, 0)  # one full window rendered before the baseline
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
size = int(sys.argv[1])
with tempfile.TemporaryDirectory() as d:
    synthetic.write_scene(Path(d) / "s.tif", size, size, seed=1, tile=1024, nodata_border=64,
                          labels_path=Path(d) / "l.tif")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth_mib": (peak - base) / 1024}))
"""


def _cpu(fn) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def tile_speed(repeats: int = 3) -> None:
    import numpy as np
    import rasterio
    from rasterio.transform import Affine

    from rsseg.data import synthetic

    synthetic.generate_tile(64, 0)
    gen, write = [], []
    with tempfile.TemporaryDirectory() as d:
        for seed in range(repeats):
            out: dict = {}
            gen.append(
                _cpu(lambda: out.setdefault("t", synthetic.generate_tile(1024, 1000 + seed)))
            )
            img = out["t"][0]

            def write_tile() -> None:
                profile = dict(
                    driver="GTiff",
                    width=1024,
                    height=1024,
                    count=3,
                    dtype="uint8",
                    crs=synthetic.CRS,
                    transform=Affine.scale(0.09, -0.09),
                )
                with rasterio.open(Path(d) / f"t{seed}.tif", "w", **profile) as dst:
                    dst.write(img)

            write.append(_cpu(write_tile))
            assert np.array_equal(img, synthetic.generate_tile(1024, 1000 + seed)[0])
    g, w = statistics.median(gen), statistics.median(write)
    print(
        f"1024x1024 tile: {g:.3f} s CPU (median of {repeats} seeds, fresh seeds: includes layout)"
    )
    print(
        f"baseline, GeoTIFF write of that tile: {w:.3f} s CPU; ratio generate/write = {g / w:.1f}x"
    )


def scene_memory(sizes: tuple[int, int]) -> None:
    growth = {}
    for size in sizes:
        t = time.time()
        res = subprocess.run(
            [sys.executable, "-c", _SCENE_CHILD, str(size)],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        growth[size] = json.loads(res.stdout.strip().splitlines()[-1])["growth_mib"]
        full = 3 * size * size / 2**20
        print(
            f"scene {size}x{size}: peak RSS growth {growth[size]:.0f} MiB "
            f"(full uint8 image would be {full:.0f} MiB), {time.time() - t:.1f} s wall"
        )
    large = sizes[-1]
    print(
        f"ratio growth / full uint8 image at {large}^2: "
        f"{growth[large] / (3 * large * large / 2**20):.3f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="smaller scenes")
    args = ap.parse_args()
    tile_speed()
    scene_memory((1024, 2048) if args.quick else (2048, 6144))
    print(
        "(this process peak RSS "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB)"
    )


if __name__ == "__main__":
    main()
