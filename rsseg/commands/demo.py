"""``rsseg demo``: synthetic data -> short training -> eval table -> styled QGIS outputs."""

from __future__ import annotations

from pathlib import Path

import click

from rsseg.inference.demo import DemoConfig

_DEFAULTS = DemoConfig()  # the help shows the run's real defaults


@click.command("demo")
@click.option("--out", type=click.Path(path_type=Path), default=Path("rsseg-demo"), show_default=True,
              help="Folder for the data, the run, the scene and the QGIS-ready outputs.")
@click.option("--model", default=None, help=f"Registered model to train (default: {_DEFAULTS.model}).")
@click.option("--steps", type=int, default=None, help=f"Training steps (default: {_DEFAULTS.max_steps}).")
@click.option("--quick", is_flag=True, help="A tiny run in seconds that checks the whole path (score meaningless).")
@click.option("--overwrite", is_flag=True, help="Reuse a non-empty --out folder.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def demo(out: Path, model: str | None, steps: int | None, quick: bool, overwrite: bool, quiet: bool) -> None:
    """Train a small model on synthetic georeferenced data and map a held-out scene for QGIS."""
    from rsseg.errors import UsageError
    from rsseg.inference.demo import run_demo

    cfg = DemoConfig.quick(out) if quick else DemoConfig(out=out)
    if model is not None:
        cfg.model = model
    if steps is not None:
        if steps < 1:
            raise UsageError(f"--steps must be at least 1, got {steps}")
        cfg.max_steps = steps
    cfg.overwrite = overwrite
    cfg.progress = not quiet
    run_demo(cfg, echo=click.echo)
