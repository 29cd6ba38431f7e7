"""``rsseg predict`` and ``rsseg vectorize``: thin click wrappers over rsseg.inference."""

from __future__ import annotations

from pathlib import Path

import click

from rsseg.errors import UsageError

_TTA = ("none", "flip", "d4")


@click.command("predict")
@click.argument("scenes", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path),
              help="Output; its suffix picks the kind: .tif class raster, or .gpkg/.geojson/.fgb/"
                   ".parquet polygons. With several scenes, {stem} is replaced by each scene's name.")
@click.option("--model", "bundle", required=True, type=click.Path(path_type=Path),
              help="Model bundle (.safetensors) from `rsseg train`.")
@click.option("--tile", default=1024, show_default=True, help="Window size in model pixels.")
@click.option("--overlap", default=256, show_default=True, help="Overlap between windows in model pixels.")
@click.option("--batch-size", default=4, show_default=True, help="Windows per forward pass.")
@click.option("--tta", type=click.Choice(_TTA), default="none", show_default=True,
              help="Test-time augmentation: horizontal flip, or all 8 flips/rotations.")
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu, cuda, cuda:1.")
@click.option("--raster", type=click.Path(path_type=Path), default=None,
              help="Also keep the class raster (COG) when -o names vectors.")
@click.option("--confidence", type=click.Path(path_type=Path), default=None,
              help="Also write the max softmax probability as a float32 COG.")
@click.option("--resample/--no-resample", default=True, show_default=True,
              help="Run the model at the bundle's training GSD when the scene's differs.")
@click.option("--min-area", default=0.0, show_default=True, help="Drop polygons smaller than this (m²).")
@click.option("--simplify", default=None, type=float,
              help="Simplification tolerance in map units (default: one pixel; 0: none).")
@click.option("--overwrite", is_flag=True, help="Replace outputs that exist.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def predict(scenes, out, bundle, tile, overlap, batch_size, tta, device, raster, confidence, resample,
            min_area, simplify, overwrite, quiet) -> None:
    """Segment SCENES (GeoTIFFs of any size) into a class raster and/or polygons on their own grid."""
    from rsseg.bundle import load_bundle
    from rsseg.inference.predict import PredictOptions
    from rsseg.inference.run import plan_outputs, predict_scenes

    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    # Cheap checks first: a wrong suffix or an existing output is reported before the model loads.
    plan_outputs(list(scenes), out, raster, confidence, overwrite)
    model, meta = load_bundle(bundle, device=device)
    options = PredictOptions(tile=tile, overlap=overlap, batch_size=batch_size, tta=tta, device=device,
                             resample=resample, progress=not quiet)
    predict_scenes(list(scenes), out, model, meta, options=options, raster=raster,
                   confidence=confidence, overwrite=overwrite, simplify=simplify, min_area=min_area,
                   echo=lambda s: click.echo(s, err=True))


@click.command("vectorize")
@click.argument("raster", type=click.Path(path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path),
              help="Vector output: .gpkg (styled for QGIS), .geojson, .fgb or .parquet (+ .qml).")
@click.option("--classes", "classes_file", type=click.Path(path_type=Path), default=None,
              help="Class names/colours: a model bundle, a JSON file, or lines 'name[,r,g,b]'. "
                   "Default: the raster's own metadata or colour table.")
@click.option("--min-area", default=0.0, show_default=True, help="Drop polygons smaller than this (m²).")
@click.option("--simplify", default=None, type=float,
              help="Simplification tolerance in map units (default: one pixel; 0: none).")
@click.option("--block-rows", default=None, type=int,
              help="Rows polygonized at a time (default: about 32 million pixels per block).")
@click.option("--overwrite", is_flag=True, help="Replace the output if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def vectorize(raster, out, classes_file, min_area, simplify, block_rows, overwrite, quiet) -> None:
    """Turn a uint8 class raster (255 = nodata) into polygons per class with a QGIS style."""
    from rsseg.inference.vectorize import read_classes_file, vectorize_to_file

    if block_rows is not None and block_rows < 1:
        raise UsageError(f"--block-rows must be at least 1, got {block_rows}")
    info = read_classes_file(classes_file) if classes_file is not None else None
    files, n = vectorize_to_file(raster, out, classes=info, simplify=simplify, min_area=min_area,
                                 overwrite=overwrite, progress=not quiet, block_rows=block_rows)
    click.echo(f"{n} polygons -> {', '.join(str(f) for f in files)}", err=True)
