"""``rsseg prepare`` and ``rsseg train``: thin click layers over :mod:`rsseg.data.prepare` and
:mod:`rsseg.train.fit` (``rsseg eval`` lives beside predict in :mod:`rsseg.commands.infer`)."""

from __future__ import annotations

from pathlib import Path

import click

from rsseg.data.specs import list_datasets


def _devices(value: str | None) -> int | str | None:
    if value is None:
        return None
    return int(value) if value.isdigit() else value


@click.command()
@click.option("--dataset", type=click.Choice(list_datasets()),
              help="Built-in dataset name (required unless --images is given).")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path),
              help="Folder with the official archives or their extracted folders "
                   "[default: $RSSEG_DATA/<dataset> or ~/.cache/rsseg/data/<dataset>].")
@click.option("--images", multiple=True,
              help="Your own scenes: a glob (quote it), a folder or a file GDAL reads; repeatable.")
@click.option("--labels", multiple=True,
              help="Labels for --images: vector layer(s) (GeoPackage, Shapefile, GeoJSON, FlatGeobuf, "
                   "GeoParquet) or class raster(s); a glob, folder or file; repeatable.")
@click.option("--label-field", help="Attribute of the vector labels holding class names or ids.")
@click.option("--classes", "classes_file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="YAML/JSON list of {name, value, color} [default: the distinct label values, sorted].")
@click.option("--ignore-value", help="Label value meaning 'no label' (its pixels are ignored).")
@click.option("--aoi", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Vector layer: labels count only inside it [default: where the labels are].")
@click.option("--block", type=int, help="Side in pixels of the blocks the validation split draws "
              "(own data) [default: 4 patches].")
@click.option("--name", "dataset_name", help="Dataset name for own data [default: the output folder's name].")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path),
              help="Output folder [default: <data-root>/prepared-<bands>-<patch>; required with --images].")
@click.option("--patch", type=int, help="Patch size in pixels [default: 1024; 512 with --images].")
@click.option("--stride", type=int, help="Training stride [default: patch/2, i.e. 512].")
@click.option("--test-stride", type=int, help="Validation/test stride [default: patch].")
@click.option("--bands", help="Band set, e.g. rgb, irrg or rgbir for Potsdam [default: the dataset's].")
@click.option("--val-fraction", default=0.2, show_default=True,
              help="Share of training tiles (own data: blocks) held out for validation.")
@click.option("--seed", default=0, show_default=True, help="Seed of the validation draw.")
def prepare(dataset, data_root, images, labels, label_field, classes_file, ignore_value, aoi, block,
            dataset_name, out, patch, stride, test_stride, bands, val_fraction, seed) -> None:
    """Cut a dataset's official layout (zips or folders), or your own scenes and labels
    (--images/--labels), into georeferenced patches."""
    from rsseg.data.prepare import default_data_root, prepare_dataset, prepared_folder_name, read_manifest
    from rsseg.data.specs import get_spec
    from rsseg.errors import DataError, UsageError

    if images or labels:
        if dataset or data_root or bands:
            raise UsageError("--images/--labels prepare your own data; leave out --dataset, --data-root, --bands")
        if not (images and labels and out):
            raise UsageError("own data needs --images, --labels and -o/--out")
        from rsseg.data.own import prepare_own

        path = prepare_own(list(images), list(labels), out, label_field=label_field, classes=classes_file,
                           ignore_value=ignore_value, aoi=aoi, patch=patch or 512, stride=stride,
                           test_stride=test_stride, block=block, val_fraction=val_fraction, seed=seed,
                           name=dataset_name)
        manifest = read_manifest(path)
        counts = {s: sum(len(manifest["tiles"][t]["patches"]) for t in manifest["splits"][s])
                  for s in ("train", "val")}
        click.echo(f"prepared {manifest['dataset']} ({len(manifest['classes'])} classes: "
                   f"{', '.join(manifest['classes'])}; {len(manifest['band_names'])} bands) in {path}: "
                   f"train {len(manifest['splits']['train'])} blocks / {counts['train']} patches, "
                   f"val {len(manifest['splits']['val'])} blocks / {counts['val']} patches; "
                   f"train with: rsseg train --data {path}")
        return
    if not dataset:
        raise UsageError("give --dataset NAME (built-in data) or --images/--labels (your own data)")
    patch = patch or 1024
    root = data_root or default_data_root(dataset)
    if data_root is None and not root.is_dir():
        from rsseg.data.layouts import EXPECTED_FILES

        raise DataError(f"no {dataset} data found: put {EXPECTED_FILES[dataset]} in {root} "
                        "(or set RSSEG_DATA to the folder above it, or pass --data-root)")
    band_key = bands or get_spec(dataset).default_bands
    out = out or root / prepared_folder_name(band_key, patch)
    path = prepare_dataset(dataset, root, out, patch=patch, stride=stride, test_stride=test_stride,
                           bands=bands, val_fraction=val_fraction, seed=seed)
    manifest = read_manifest(path)
    counts = {s: sum(len(manifest["tiles"][t]["patches"]) for t in tiles)
              for s, tiles in manifest["splits"].items()}
    parts = ", ".join(f"{s} {len(manifest['splits'][s])} tiles / {counts[s]} patches"
                      for s in ("train", "val", "test"))
    click.echo(f"prepared {dataset} ({manifest['bands']}) in {path}: {parts}")


@click.command()
@click.option("--dataset", type=click.Choice(list_datasets()), help="Dataset [default: vaihingen or the config's].")
@click.option("--model", help="Registered model name (rsseg models) [default: the config's, else unet-r18].")
@click.option("--config", "config_path", help="YAML config file or preset name (rsseg configs lists them).")
@click.option("--data", "data_dir", help="Prepared folder or raw data root [default: the default data place].")
@click.option("--images", help="Train straight from your scenes (no patch folder): images, a glob, folder or file.")
@click.option("--labels", help="With --images: the label layer (vector with --label-field) or class rasters.")
@click.option("--label-field", help="With --images: the label layer's field holding the classes.")
@click.option("--classes", "classes_file", help="With --images: YAML/JSON file of classes (name, value, color).")
@click.option("--bands", help="Band set (Potsdam: rgb, irrg, rgbir).")
@click.option("--epochs", type=int, help="Training epochs [default: the config's, 80].")
@click.option("--max-steps", type=int, help="Stop after this many optimizer steps (the final step is validated).")
@click.option("--batch-size", type=int, help="Training batch size per device.")
@click.option("--crop-size", type=int, help="Training crop in pixels, after augmentation.")
@click.option("--patch-size", type=int, help="Patch size to prepare raw data with.")
@click.option("--lr", type=float, help="Learning rate of the head (and of the backbone from scratch).")
@click.option("--backbone-lr", type=float, help="Backbone learning rate [default: lr/10 with pre-trained weights, else lr].")
@click.option("--pretrained", help="Initial backbone weights: a name from `rsseg weights` or a local file [default: the paper's].")
@click.option("--no-pretrained", is_flag=True, help="Train the backbone from scratch (the papers' numbers assume pre-training).")
@click.option("--workers", type=int, help="Data-loader workers per process [default: min(8, CPUs / devices)].")
@click.option("--devices", help="Number of devices (or 'auto'); >1 trains with DDP.")
@click.option("--num-nodes", type=int, help="Machines taking part in DDP training.")
@click.option("--accelerator", help="auto, cpu, gpu ...")
@click.option("--precision", help="32-true, 16-mixed or bf16-mixed [default: bf16-mixed on GPUs "
                                 "that support it, 16-mixed on older GPUs, 32-true on the CPU].")
@click.option("--channels-last", is_flag=True, default=None,
              help="Train in channels-last memory layout (faster convolutions on recent GPUs).")
@click.option("--compile", is_flag=True, default=None,
              help="torch.compile the network: the first steps pay the compilation, long runs "
                   "gain (needs a C++ compiler on the CPU, triton on CUDA).")
@click.option("--seed", type=int, help="Seed of every random draw (data, augmentation, init).")
@click.option("-o", "--out", "--output", "output_dir", help="Folder for runs [default: runs].")
@click.option("--name", "run_name", help="Run name [default: <model>-<dataset>].")
@click.option("--resume", is_flag=True, help="Continue the named run from its last checkpoint.")
@click.option("--resume-from", type=click.Path(dir_okay=False), help="Continue from this checkpoint.")
@click.option("--logger", type=click.Choice(["csv", "tensorboard"]),
              help="Metrics logger: csv (always written) or tensorboard as well (pip install 'rsseg[tensorboard]').")
@click.option("--set", "set_items", multiple=True, metavar="KEY=VALUE",
              help="Override any config field, dotted for nested ones (e.g. --set augment.mosaic_p=0 "
                   "--set model_cfg.backbone=swin_t); repeatable; values are YAML.")
@click.option("--print-config", is_flag=True, help="Print the fully resolved config and exit without training.")
def train(config_path, resume, resume_from, devices, no_pretrained, set_items, print_config, **options) -> None:
    """Train a model with Lightning; writes checkpoints, metrics and a model bundle."""
    from rsseg.api import describe_config, train_config
    from rsseg.train.fit import train as run_training

    cfg = train_config(config_path, set_items=set_items, no_pretrained=no_pretrained, **options,
                       devices=_devices(devices), resume=resume_from or ("last" if resume else None))
    if print_config:
        click.echo(describe_config(cfg), nl=False)
        return
    result = run_training(cfg)
    if result.bundle_path is not None:
        score = "n/a" if result.best_val_miou is None else f"{100 * result.best_val_miou:.2f}"
        click.echo(f"best validation mIoU {score}; bundle {result.bundle_path}; run folder {result.run_dir}")
