"""The Python API end to end on synthetic data: train a small model, predict a scene the model
never saw, and read the polygons with geopandas.

    python examples/01_api_end_to_end.py --out /tmp/rsseg-example      # a few minutes on a CPU
    python examples/01_api_end_to_end.py --quick --out /tmp/rsseg-quick # seconds; checks the path

With your own data, replace the synthetic parts: `rsseg.train("mafmamba-vaihingen")` prepares the
official Vaihingen archives found in $RSSEG_DATA/vaihingen and trains the paper's configuration.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import geopandas as gpd

import rsseg
from rsseg.data.synthetic import write_scene


def main(out: Path, quick: bool) -> gpd.GeoDataFrame:
    out.mkdir(parents=True, exist_ok=True)
    # 1. Train: the cpu-tiny preset generates a synthetic Vaihingen-like dataset (georeferenced
    #    tiles with ISPRS classes), prepares patches with a held-out validation split, trains a
    #    small U-Net and writes a model bundle (weights + classes, bands, normalisation, GSD).
    result = rsseg.train(
        "cpu-tiny",
        out=str(out / "runs"),
        name="example",
        data_dir=str(out / "data"),
        synthetic_tile_size=256 if quick else 512,
        epochs=-1,
        max_steps=3 if quick else 300,
        progress=False,
    )
    print("bundle:", result.bundle_path, "validation mIoU:", result.best_val_miou)

    # 2. Predict a scene the model never saw, straight to a styled GeoPackage (+ the class COG).
    scene = write_scene(out / "scene.tif", 300 if quick else 2048, 400 if quick else 2048, seed=7, tile=512)
    rsseg.predict(scene, out / "landcover.gpkg", model=result.bundle_path, raster=out / "classes.tif",
                  tile=256, overlap=64, overwrite=True)

    # 3. Read the polygons: one row per polygon, class name and area in the scene's CRS.
    polygons = gpd.read_file(out / "landcover.gpkg", layer="landcover")
    area = polygons.groupby("class_name")["area_m2"].sum().sort_values(ascending=False)
    print(f"{len(polygons)} polygons in {polygons.crs}; area per class (m²):")
    print(area.round(1).to_string())
    return polygons


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("rsseg-example"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes: seconds, scores mean nothing")
    args = parser.parse_args()
    main(args.out, args.quick)
