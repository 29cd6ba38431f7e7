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
@click.option("--dataset", required=True, type=click.Choice(list_datasets()), help="Dataset name.")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path),
              help="Folder with the official archives or their extracted folders "
                   "[default: $RSSEG_DATA/<dataset> or ~/.cache/rsseg/data/<dataset>].")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path),
              help="Output folder [default: <data-root>/prepared-<bands>-<patch>].")
@click.option("--patch", default=1024, show_default=True, help="Patch size in pixels.")
@click.option("--stride", type=int, help="Training stride [default: patch/2, i.e. 512].")
@click.option("--test-stride", type=int, help="Validation/test stride [default: patch].")
@click.option("--bands", help="Band set, e.g. rgb, irrg or rgbir for Potsdam [default: the dataset's].")
@click.option("--val-fraction", default=0.2, show_default=True,
              help="Share of training tiles held out for validation.")
@click.option("--seed", default=0, show_default=True, help="Seed of the validation draw.")
def prepare(dataset, data_root, out, patch, stride, test_stride, bands, val_fraction, seed) -> None:
    """Cut a dataset's official layout (zips or folders) into georeferenced patches."""
    from rsseg.data.prepare import default_data_root, prepare_dataset, prepared_folder_name, read_manifest
    from rsseg.data.specs import get_spec

    root = data_root or default_data_root(dataset)
    if data_root is None and not root.is_dir():
        from rsseg.data.layouts import EXPECTED_FILES
        from rsseg.errors import DataError

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
@click.option("--config", "config_path", help="YAML config file or preset name (see rsseg/configs).")
@click.option("--data", "data_dir", help="Prepared folder or raw data root [default: the default data place].")
@click.option("--bands", help="Band set (Potsdam: rgb, irrg, rgbir).")
@click.option("--epochs", type=int)
@click.option("--max-steps", type=int)
@click.option("--batch-size", type=int)
@click.option("--crop-size", type=int)
@click.option("--patch-size", type=int, help="Patch size to prepare raw data with.")
@click.option("--lr", type=float)
@click.option("--backbone-lr", type=float, help="Backbone learning rate [default: lr/10 with pre-trained weights, else lr].")
@click.option("--pretrained", help="Initial backbone weights: a name from `rsseg weights` or a local file [default: the paper's].")
@click.option("--no-pretrained", is_flag=True, help="Train the backbone from scratch (the papers' numbers assume pre-training).")
@click.option("--workers", type=int, help="Data-loader workers per process [default: min(8, CPUs / devices)].")
@click.option("--devices", help="Number of devices (or 'auto'); >1 trains with DDP.")
@click.option("--num-nodes", type=int)
@click.option("--accelerator", help="auto, cpu, gpu ...")
@click.option("--precision", help="e.g. 32-true, 16-mixed, bf16-mixed [default: mixed on GPU].")
@click.option("--seed", type=int)
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
