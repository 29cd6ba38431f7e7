"""``rsseg plot RUN``: PNG figures of a training run and of its last evaluation (rsseg.plots)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("plot")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the PNGs [default: RUN/plots].")
@click.option("--eval", "evaluation", type=click.Path(dir_okay=False, path_type=Path),
              help="Evaluation JSON (rsseg eval --json) [default: the newest one in RUN].")
def plot(run_dir: Path, out_dir: Path | None, evaluation: Path | None) -> None:
    """Training curves (loss, validation mIoU, learning rate per parameter group) and the
    evaluation's confusion matrix and per-class IoU, as PNGs."""
    from rsseg.plots import plot_run

    for path in plot_run(run_dir, out_dir, evaluation):
        click.echo(str(path))
