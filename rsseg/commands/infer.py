"""``rsseg predict``, ``rsseg vectorize`` and ``rsseg eval``: thin click wrappers over rsseg.inference
and rsseg.train.evaluate."""

from __future__ import annotations

from pathlib import Path

import click

from rsseg.data.specs import list_datasets
from rsseg.errors import UsageError

# rsseg.train.tta.TTA_MODES, spelled out so `--help` does not import torch.
_TTA = ("none", "flip", "d4", "ms")
_TTA_HELP = ("Test-time augmentation, GeoSeg's sets: flip = every combination of horizontal and "
             "vertical flip (4 views, GeoSeg 'lr'); d4 = the 8 flips/rotations; ms = GeoSeg's "
             "multi-scale set for the dataset (flips x scales, bicubic). Logits are averaged.")


@click.command("predict")
# Text, not click.Path: a URL or /vsi path is GDAL's to open (Path would collapse "//").
@click.argument("scenes", nargs=-1, required=True)
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path),
              help="Output; its suffix picks the kind: .tif class raster, or .gpkg/.geojson/.fgb/"
                   ".parquet polygons. Several scenes (files, folders, globs) with one output are one "
                   "mosaic: windows cross tile borders and polygons are whole; with {stem} in the "
                   "name, each scene gets its own output instead. "
                   "With --format loveda: the submission zip (its PNGs go in a folder of its name).")
@click.option("--format", "out_format", type=click.Choice(["scene", "loveda"]), default="scene",
              show_default=True,
              help="loveda: SCENES is a LoveDA data root; predict its official Test images into the "
                   "challenge server's submission (one PNG of classes 0..6 per image, same file name, "
                   "zipped without a folder).")
@click.option("--model", "bundle", type=click.Path(path_type=Path),
              help="Model bundle (.safetensors) from `rsseg train` [default: $RSSEG_MODEL, else the "
                   "newest run under ./runs, else `rsseg models --set-default`].")
@click.option("--tile", default=1024, show_default=True, help="Window size in model pixels.")
@click.option("--overlap", default=256, show_default=True, help="Overlap between windows in model pixels.")
@click.option("--batch-size", default=4, show_default=True, help="Windows per forward pass.")
@click.option("--tta", type=click.Choice(_TTA), default="none", show_default=True, help=_TTA_HELP)
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu, cuda, cuda:1.")
@click.option("--channels-last", is_flag=True,
              help="Run the network in channels-last memory layout (faster convolutions on recent "
                   "GPUs and on CPUs; same classes).")
@click.option("--compile", "compile_model", is_flag=True,
              help="torch.compile the network first: the first windows pay the compilation, "
                   "large scenes gain (needs a C++ compiler on the CPU, triton on CUDA).")
@click.option("--raster", type=click.Path(path_type=Path), default=None,
              help="Also keep the class raster (COG) when -o names vectors.")
@click.option("--confidence", type=click.Path(path_type=Path), default=None,
              help="Also write the max softmax probability as a float32 COG.")
@click.option("--resample/--no-resample", default=True, show_default=True,
              help="Run the model at the bundle's training GSD when the scene's differs.")
@click.option("--rescale", default=None, metavar="auto|none|FACTOR",
              help="When a scene's values differ from the training data's (e.g. 16-bit scene, "
                   "8-bit model): auto maps each band's 1st-99th percentiles onto the training "
                   "ones, FACTOR multiplies the values, none runs as is. Default: refuse.")
@click.option("--bands", "band_list", default=None, metavar="N,N,...",
              help="Scene bands (1-based) that feed the model, in the model's order; "
                   "default: the bundle's.")
@click.option("--min-area", default=0.0, show_default=True, help="Drop polygons smaller than this (m²).")
@click.option("--simplify", default=None, type=float,
              help="Simplification tolerance in map units (default: one pixel; 0: none).")
@click.option("--overwrite", is_flag=True, help="Replace outputs that exist.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def predict(scenes, out, out_format, bundle, tile, overlap, batch_size, tta, device, channels_last,
            compile_model, raster, confidence, resample, rescale, band_list, min_area, simplify,
            overwrite, quiet) -> None:
    """Segment SCENES (GeoTIFFs of any size, tiles of a mosaic, folders, globs) into a class raster
    and/or polygons on their own grid."""
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    if out_format == "loveda":
        from rsseg.default_model import resolve_model

        bundle = resolve_model(bundle, echo=lambda s: click.echo(s, err=True)).path
        _loveda_submission(scenes, out, bundle, batch_size, tta, device, raster, confidence,
                           overwrite, quiet)
        return

    from rsseg.api import predict as run_prediction

    run_prediction(list(scenes), out, bundle, raster=raster, confidence=confidence,
                   overwrite=overwrite, simplify=simplify, min_area=min_area, rescale=rescale,
                   bands=_parse_bands(band_list), tile=tile, overlap=overlap, batch_size=batch_size,
                   tta=tta, device=device, resample=resample, progress=not quiet,
                   channels_last=channels_last, compile=compile_model,
                   echo=lambda s: click.echo(s, err=True))


def _parse_bands(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        bands = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        bands = []
    if not bands or min(bands) < 1:
        raise UsageError(f"--bands takes 1-based band numbers separated by commas, got {text!r}")
    return bands


def _loveda_submission(scenes, out, bundle, batch_size, tta, device, raster, confidence, overwrite,
                       quiet) -> None:
    from rsseg.bundle import load_bundle, read_bundle_meta
    from rsseg.inference.loveda_submission import check_loveda_bundle, write_loveda_submission

    if len(scenes) != 1:
        raise UsageError("--format loveda takes one LoveDA data root (holding Test.zip or Test/)")
    if raster is not None or confidence is not None:
        raise UsageError("--raster and --confidence are for GeoTIFF scenes, not --format loveda")
    check_loveda_bundle(read_bundle_meta(bundle))  # before the weights load
    model, meta = load_bundle(bundle, device=device)
    write_loveda_submission(scenes[0], out, model, meta, tta=tta, device=device,
                            batch_size=batch_size, overwrite=overwrite, progress=not quiet,
                            echo=lambda s: click.echo(s, err=True))


@click.command("vectorize")
@click.argument("rasters", nargs=-1, required=True)
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path),
              help="Vector output: .gpkg (styled for QGIS), .geojson, .fgb or .parquet (+ .qml).")
@click.option("--classes", "classes_file", type=click.Path(path_type=Path), default=None,
              help="Class names/colours: a model bundle, a JSON file, or lines 'name[,r,g,b]'. "
                   "Default: the raster's own metadata or colour table.")
@click.option("--min-area", default=0.0, show_default=True, help="Drop polygons smaller than this (m²).")
@click.option("--simplify", default=None, type=float,
              help="Simplification tolerance in map units (default: one pixel; 0: none).")
@click.option("--block-rows", default=None, type=int,
              help="Polygonize full-width strips of this many rows (default: blocks of about 16 "
                   "million pixels, 4096 x 4096 on rasters wider than 4096).")
@click.option("--overwrite", is_flag=True, help="Replace the output if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def vectorize(rasters, out, classes_file, min_area, simplify, block_rows, overwrite, quiet) -> None:
    """Turn a uint8 class raster (255 = nodata) into polygons per class with a QGIS style.

    Several RASTERS (e.g. the class rasters of per-area jobs) are one mosaic: polygons that cross
    their borders come out whole, exactly as from one raster."""
    from rsseg.api import vectorize as run_vectorize
    from rsseg.inference.paths import remove_stale_partials

    if block_rows is not None and block_rows < 1:
        raise UsageError(f"--block-rows must be at least 1, got {block_rows}")
    remove_stale_partials(out.parent if str(out.parent) else Path("."))  # left by killed runs
    files, n = run_vectorize(list(rasters), out, classes=classes_file, simplify=simplify,
                             min_area=min_area, overwrite=overwrite, progress=not quiet,
                             block_rows=block_rows)
    click.echo(f"{n} polygons -> {', '.join(str(f) for f in files)}", err=True)


@click.command("eval")
@click.option("--model", "bundle", type=click.Path(dir_okay=False, path_type=Path),
              help="Model bundle (.safetensors) written by rsseg train [default: as rsseg predict].")
@click.option("--dataset", type=click.Choice(list_datasets()), help="[default: the bundle's dataset]")
@click.option("--data", "data_dir", help="Prepared folder or raw data root [default: the default data place].")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "val", "test"]),
              help="test: the scored split (LoveDA: the official Val set; its Test labels are not "
                   "public, see predict --format loveda); val: rsseg's held-out model-selection split.")
@click.option("--tta", type=click.Choice(_TTA), default="none", show_default=True, help=_TTA_HELP)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write scores and the protocol (TTA views/scales, metric convention, split) as JSON.")
@click.option("--compare-paper", is_flag=True,
              help="Print the paper's published figure for this model and dataset beside ours.")
@click.option("--batch-size", default=1, show_default=True, help="Patches per forward pass.")
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu, cuda, cuda:1.")
def eval_cmd(bundle, dataset, data_dir, split, tta, json_path, compare_paper, batch_size, device) -> None:
    """Per-class IoU/F1, mIoU, mF1 and OA of a bundle from one global confusion matrix."""
    from rsseg.api import evaluate
    from rsseg.train.evaluate import write_json

    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    result = evaluate(bundle, dataset, data_dir=data_dir, split=split,
                      tta=None if tta == "none" else tta, batch_size=batch_size, device=device,
                      progress=True, echo=lambda s: click.echo(s, err=True))
    click.echo(result.format_table())
    if compare_paper:
        from dataclasses import asdict

        from rsseg.train.paper_scores import comparison_text, paper_score

        click.echo(comparison_text(result.model_name, result.dataset, result.miou, result.mf1,
                                   result.oa))
        published = paper_score(result.model_name, result.dataset)
        result.extra["paper"] = asdict(published) if published else None
    if json_path:
        write_json(result, json_path)
        click.echo(f"scores written to {json_path}")
