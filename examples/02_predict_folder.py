"""Predict every GeoTIFF of a folder with one bundle, then merge the per-scene polygons into one
GeoPackage with a `scene` column.

    python examples/02_predict_folder.py SCENES_DIR --model runs/x/best.safetensors --out results
    python examples/02_predict_folder.py --quick --out /tmp/rsseg-folder   # makes its own scenes and model

All scenes must share a CRS to be merged (tiles of one survey do); for tiles of one scene whose
polygons should be whole across tile borders, use one mosaic instead (a .vrt of the tiles).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import geopandas as gpd
import pandas as pd

import rsseg
from rsseg.data.synthetic import write_scene


def main(scenes_dir: Path, model: Path, out: Path) -> gpd.GeoDataFrame:
    scenes = sorted(scenes_dir.glob("*.tif"))
    if not scenes:
        raise SystemExit(f"no .tif in {scenes_dir}")
    out.mkdir(parents=True, exist_ok=True)
    # One call for all scenes: {stem} names each scene's output; windows stream, so scenes of any
    # size keep memory flat.
    rsseg.predict(scenes, out / "{stem}.gpkg", model=model, overwrite=True)
    parts = []
    for scene in scenes:
        layer = gpd.read_file(out / f"{scene.stem}.gpkg", layer=scene.stem)
        layer["scene"] = scene.stem
        parts.append(layer)
    if len({str(p.crs) for p in parts}) > 1:
        raise SystemExit("scenes have different CRSs; reproject them (to_crs) before merging")
    merged = gpd.GeoDataFrame(pd.concat(parts, ignore_index=True), crs=parts[0].crs)
    merged.to_file(out / "merged.gpkg", layer="landcover", driver="GPKG")
    print(merged.groupby(["scene", "class_name"]).size().unstack(fill_value=0).to_string())
    return merged


def quick_setup(out: Path) -> tuple[Path, Path]:
    """Two small synthetic scenes and a 3-step model, so the example runs anywhere in seconds."""
    folder = out / "scenes"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(2):
        write_scene(folder / f"tile_{i}.tif", 256, 320, seed=10 + i, tile=256)
    trained = rsseg.train("cpu-tiny", out=str(out / "runs"), name="quick", data_dir=str(out / "data"),
                          synthetic_tile_size=256, epochs=-1, max_steps=3, progress=False)
    return folder, trained.bundle_path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenes_dir", type=Path, nargs="?")
    parser.add_argument("--model", type=Path)
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.scenes_dir, args.model = quick_setup(args.out)
    elif args.scenes_dir is None:
        parser.error("give SCENES_DIR (or --quick)")
    main(args.scenes_dir, args.model, args.out)
