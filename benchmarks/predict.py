"""Benchmarks for ``rsseg predict``: pipeline overhead and memory flatness.

    python benchmarks/predict.py overhead [--size 4096] [--tile 1024] [--overlap 256]
    python benchmarks/predict.py memory [--small 4096] [--large 16384]
    python benchmarks/predict.py mosaic [--grid 4] [--tile-size 4096]

overhead: wall time of ``predict_scene`` on a synthetic scene with smp U-Net-ResNet18 over the
bare forward time of the same windows (same batch shapes, same process, measured right after).
Target: at most 1.08 on CPU.

memory: peak RSS of a child process predicting a small and a large scene (scenes written once,
window by window, into a temporary folder). Target: large / small at most 1.3. The model here
is a cheap per-pixel network by default (``--model unet-r18`` for the real one) so that a
16384 x 16384 scene finishes in minutes; the pipeline's buffers are what is being measured.

mosaic: a scene of grid x grid tiles of tile-size pixels is written once, whole and cut into
tiles. Children predict (a) one tile-size scene, (b) the tiles as one mosaic, (c) the whole
scene. Targets: peak RSS (b) / (a) at most 1.3 (memory flat in the mosaic's size); wall time
(b) / (c) at most 1.1 (the mosaic costs what the same pixels cost as one scene); (b) and (c)
give identical class rasters.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import torch
from torch import nn

from rsseg.inference.predict import InputSpec, PredictOptions, predict_probs, predict_scene
from rsseg.inference.windows import window_grid

CLASSES = ["impervious_surface", "building", "low_vegetation", "tree", "car", "clutter"]
COLORS = [(255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0), (255, 0, 0)]
SPEC = InputSpec(bands=[1, 2, 3], mean=[120.0] * 3, std=[60.0] * 3, class_names=CLASSES,
                 class_colors=COLORS)


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "per-pixel":
        return nn.Sequential(nn.Conv2d(3, 32, 1), nn.ReLU(), nn.Conv2d(32, 6, 1)).eval()
    from rsseg import create_model

    return create_model(name, num_classes=6, in_channels=3).eval()


def write_noise_scene(path: Path, size: int, block: int = 1024) -> Path:
    """A uint8 3-band tiled GeoTIFF of smooth noise, written block by block (flat memory)."""
    profile = dict(driver="GTiff", height=size, width=size, count=3, dtype="uint8", nodata=0,
                   tiled=True, blockxsize=512, blockysize=512, compress="deflate", BIGTIFF="IF_SAFER",
                   crs="EPSG:32632", transform=rasterio.Affine(0.09, 0, 500000, 0, -0.09, 5400000))
    rng = np.random.default_rng(0)
    with rasterio.open(path, "w", **profile) as dst:
        for r in range(0, size, block):
            for c in range(0, size, block):
                h, w = min(block, size - r), min(block, size - c)
                coarse = rng.integers(1, 256, (3, h // 32 + 2, w // 32 + 2)).astype(np.uint8)
                data = np.repeat(np.repeat(coarse, 32, axis=1), 32, axis=2)[:, :h, :w]
                dst.write(data, window=rasterio.windows.Window(c, r, w, h))
    return path


def scene_for(size: int, folder: Path, synthetic: bool) -> Path:
    path = folder / f"scene_{size}.tif"
    if not path.exists():
        if synthetic:
            from rsseg.data.synthetic import write_scene

            write_scene(path, size, size, seed=0, tile=1024)
        else:
            write_noise_scene(path, size)
    return path


def overhead(args: argparse.Namespace) -> None:
    model = make_model(args.model)
    options = PredictOptions(tile=args.tile, overlap=args.overlap, batch_size=args.batch_size,
                             progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        scene = scene_for(args.size, Path(tmp), synthetic=True)
        # Warm up (first-call allocations, thread pools) outside both measurements.
        with torch.inference_mode():
            model(torch.zeros(1, 3, args.tile, args.tile))
        t0 = time.perf_counter()
        predict_scene(scene, model, SPEC, Path(tmp) / "out.tif", None, options)
        wall = time.perf_counter() - t0

        # The same windows, batched the same way (per window row), forward only.
        grid = window_grid(args.size, args.size, args.tile, args.overlap)
        batches = []
        for line in grid:
            for i in range(0, len(line), args.batch_size):
                batches.append(len(line[i : i + args.batch_size]))
        x = torch.randn(args.batch_size, 3, args.tile, args.tile)
        t0 = time.perf_counter()
        with torch.inference_mode():
            for n in batches:
                predict_probs(model, x[:n])
        forward = time.perf_counter() - t0
    print(json.dumps({
        "benchmark": "predict overhead", "model": args.model, "scene": args.size, "tile": args.tile,
        "overlap": args.overlap, "batch_size": args.batch_size, "windows": sum(batches),
        "torch_threads": torch.get_num_threads(), "predict_s": round(wall, 2),
        "bare_forward_s": round(forward, 2), "ratio": round(wall / forward, 3), "target": 1.08,
    }))


def memory_child(args: argparse.Namespace) -> None:
    model = make_model(args.model)
    options = PredictOptions(tile=args.tile, overlap=args.overlap, batch_size=args.batch_size,
                             progress=False)
    out = Path(args.scene).with_name(Path(args.scene).stem + "_classes.tif")
    t0 = time.perf_counter()
    predict_scene(Path(args.scene), model, SPEC, out, None, options)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mib": peak_mib, "seconds": time.perf_counter() - t0}))


def memory(args: argparse.Namespace) -> None:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in (args.small, args.large):
            scene = scene_for(size, Path(tmp), synthetic=args.synthetic)
            cmd = [sys.executable, __file__, "memory-child", "--scene", str(scene), "--model", args.model,
                   "--tile", str(args.tile), "--overlap", str(args.overlap),
                   "--batch-size", str(args.batch_size)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[size] = json.loads(out.strip().splitlines()[-1])
    small, large = results[args.small], results[args.large]
    print(json.dumps({
        "benchmark": "predict memory", "model": args.model, "tile": args.tile, "overlap": args.overlap,
        "batch_size": args.batch_size, f"peak_rss_mib_{args.small}": round(small["peak_rss_mib"], 1),
        f"peak_rss_mib_{args.large}": round(large["peak_rss_mib"], 1),
        "seconds": [round(small["seconds"], 1), round(large["seconds"], 1)],
        "ratio": round(large["peak_rss_mib"] / small["peak_rss_mib"], 3), "target": 1.3,
    }))


def cut_tiles(scene: Path, folder: Path, grid: int, size: int) -> list[Path]:
    """The scene cut into grid x grid GeoTIFF tiles, each with its own transform."""
    tiles = []
    with rasterio.open(scene) as src:
        profile = src.profile
        for i in range(grid):
            for j in range(grid):
                window = rasterio.windows.Window(j * size, i * size, size, size)
                path = folder / f"tile_{i}_{j}.tif"
                profile.update(height=size, width=size, transform=src.window_transform(window))
                with rasterio.open(path, "w", **profile) as dst:
                    for r in range(0, size, 1024):
                        part = rasterio.windows.Window(j * size, i * size + r, size, min(1024, size - r))
                        dst.write(src.read(window=part), window=rasterio.windows.Window(0, r, size, part.height))
                tiles.append(path)
    return tiles


def mosaic_child(args: argparse.Namespace) -> None:
    from rsseg.inference.mosaic import mosaic_scene

    model = make_model(args.model)
    options = PredictOptions(tile=args.tile, overlap=args.overlap, batch_size=args.batch_size,
                             progress=False)
    scenes = args.scenes
    t0 = time.perf_counter()
    if len(scenes) == 1:
        predict_scene(Path(scenes[0]), model, SPEC, Path(args.out), None, options)
    else:
        with mosaic_scene(scenes) as vrt:
            predict_scene(vrt, model, SPEC, Path(args.out), None, options)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mib": peak_mib, "seconds": time.perf_counter() - t0}))


def mosaic(args: argparse.Namespace) -> None:
    def child(scenes: list[Path], out: Path) -> dict:
        cmd = [sys.executable, __file__, "mosaic-child", "--out", str(out), "--model", args.model,
               "--tile", str(args.tile), "--overlap", str(args.overlap),
               "--batch-size", str(args.batch_size), *map(str, scenes)]
        return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True)
                          .stdout.strip().splitlines()[-1])

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        whole = write_noise_scene(folder / "whole.tif", args.grid * args.tile_size)
        tiles_dir = folder / "tiles"
        tiles_dir.mkdir()
        tiles = cut_tiles(whole, tiles_dir, args.grid, args.tile_size)
        small = child([tiles[0]], folder / "small.tif")
        runs = []
        for _ in range(args.repeat):  # alternating, so drift on a shared machine hits both
            runs.append((child(tiles, folder / "mosaic.tif"), child([whole], folder / "whole_classes.tif")))
        with rasterio.open(folder / "mosaic.tif") as a, rasterio.open(folder / "whole_classes.tif") as b:
            identical = all(np.array_equal(a.read(1, window=w), b.read(1, window=w)) for _, w in a.block_windows(1))
    print(json.dumps({
        "benchmark": "predict mosaic", "model": args.model, "grid": args.grid, "tile_size": args.tile_size,
        f"peak_rss_mib_one_{args.tile_size}": round(small["peak_rss_mib"], 1),
        "peak_rss_mib_mosaic": [round(m["peak_rss_mib"], 1) for m, _ in runs],
        "rss_ratio": [round(m["peak_rss_mib"] / small["peak_rss_mib"], 3) for m, _ in runs],
        "rss_target": 1.3,
        "seconds_mosaic": [round(m["seconds"], 1) for m, _ in runs],
        "seconds_one_scene": [round(w["seconds"], 1) for _, w in runs],
        "time_ratio": [round(m["seconds"] / w["seconds"], 3) for m, w in runs], "time_target": 1.1,
        "identical": identical,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    for name in ("overhead", "memory", "memory-child", "mosaic", "mosaic-child"):
        p = sub.add_parser(name)
        p.add_argument("--model", default="unet-r18" if name == "overhead" else "per-pixel")
        p.add_argument("--tile", type=int, default=1024)
        p.add_argument("--overlap", type=int, default=256)
        p.add_argument("--batch-size", type=int, default=4)
        if name == "overhead":
            p.add_argument("--size", type=int, default=4096)
        if name == "memory":
            p.add_argument("--small", type=int, default=4096)
            p.add_argument("--large", type=int, default=16384)
            p.add_argument("--synthetic", action="store_true",
                           help="use rsseg.data.synthetic scenes (slow to write at 16384)")
        if name == "memory-child":
            p.add_argument("--scene", required=True)
        if name == "mosaic":
            p.add_argument("--grid", type=int, default=4, help="tiles per side")
            p.add_argument("--tile-size", type=int, default=4096, help="pixels per tile side")
            p.add_argument("--repeat", type=int, default=1)
        if name == "mosaic-child":
            p.add_argument("--out", required=True)
            p.add_argument("scenes", nargs="+")
    args = parser.parse_args()
    {"overhead": overhead, "memory": memory, "memory-child": memory_child, "mosaic": mosaic,
     "mosaic-child": mosaic_child}[args.what](args)


if __name__ == "__main__":
    main()
