"""The ``rsseg`` command line: a thin click layer over the Python API.

Sub-commands live in :mod:`rsseg.commands` and are imported only when used, so ``rsseg --help``
and ``rsseg --version`` answer without loading torch. Every user-facing failure is an
:class:`~rsseg.errors.RssegError`; the group turns it into one ``rsseg: error: ...`` line and the
error's exit code, never a traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import warnings

import click

from rsseg.errors import RssegError

_python_showwarning = warnings.showwarning

# name -> "module:attribute" of a click.Command, in the order the user meets them.
_COMMANDS: dict[str, str] = {
    "demo": "rsseg.commands.demo:demo",
    "models": "rsseg.cli:models",
    "datasets": "rsseg.cli:datasets",
    "configs": "rsseg.cli:configs",
    "prepare": "rsseg.commands.data:prepare",
    "train": "rsseg.commands.data:train",
    "eval": "rsseg.commands.infer:eval_cmd",
    "weights": "rsseg.commands.weights:weights",
    "plot": "rsseg.commands.plot:plot",
    "predict": "rsseg.commands.infer:predict",
    "vectorize": "rsseg.commands.infer:vectorize",
}


class _LazyGroup(click.Group):
    """A group whose commands are imported on first use; RssegError becomes one line + exit code."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name, target in _COMMANDS.items() if self._available(target)]

    @staticmethod
    def _available(target: str) -> bool:
        module = target.split(":")[0]
        return module == __name__ or importlib.util.find_spec(module) is not None

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = _COMMANDS.get(cmd_name)
        if target is None or not self._available(target):
            return None
        module_name, attribute = target.split(":")
        return getattr(importlib.import_module(module_name), attribute)

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        name = args[0] if args else None
        if name is not None and not name.startswith("-") and self.get_command(ctx, name) is None:
            valid = ", ".join(self.list_commands(ctx))
            raise click.UsageError(f"unknown command {name!r}; valid commands: {valid}")
        return super().resolve_command(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RssegError as exc:
            click.echo(f"rsseg: error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("rsseg: interrupted; no output was completed", err=True)
            ctx.exit(130)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """rsseg's own warnings as one ``rsseg: warning:`` line; others as Python shows them."""
    from rsseg.errors import RssegWarning

    if issubclass(category, RssegWarning):
        click.echo(f"rsseg: warning: {message}", err=True)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


def _version() -> str:
    from rsseg import __version__

    return __version__


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=_version(), prog_name="rsseg")
def main() -> None:
    """Semantic segmentation of high-resolution remote-sensing imagery.

    Start with `rsseg demo`: it trains a small model on synthetic georeferenced data and writes a
    styled GeoPackage you can open in QGIS.
    """
    warnings.showwarning = _show_warning


@click.command("models")
@click.option("--classes", "num_classes", default=6, show_default=True,
              help="Number of classes the parameter count is given for.")
@click.option("--bands", "in_channels", default=3, show_default=True,
              help="Number of input bands the parameter count is given for.")
@click.option("--set-default", "default_bundle", metavar="BUNDLE",
              help="Remember BUNDLE as the model `rsseg predict` / `rsseg eval` use without --model.")
@click.argument("names", nargs=-1)
def models(num_classes: int, in_channels: int, default_bundle: str | None, names: tuple[str, ...]) -> None:
    """List the models in one table that fits 100 columns; with NAMES, every detail of each
    (paper, description, options, initial weights, docs)."""
    from pathlib import Path

    from rsseg.models.registry import list_models, model_info, parameter_count
    from rsseg.weights import default_weights

    if default_bundle:
        from rsseg.default_model import set_default_model

        click.echo(f"default model: {set_default_model(default_bundle)}")
        return

    if not names:
        rows = []
        for name in list_models():
            info = model_info(name)
            params = parameter_count(name, num_classes=num_classes, in_channels=in_channels)
            # The paper's short title: "Li, Yang & Fan, MAFMamba: A ..." -> "MAFMamba".
            paper = info.paper.split(":")[0].split("(")[0].strip().split(", ")[-1]
            rows.append((name, f"{params / 1e6:.2f} M", default_weights(name) or "-", paper[:28]))
        header = ("model", f"params ({num_classes} cl.)", "initial weights", "paper")
        click.echo(_table(header, rows))
        click.echo("\nDetails: rsseg models NAME")
        return
    docs = Path(__file__).resolve().parents[1] / "docs" / "models"
    for name in names:
        info = model_info(name)
        params = parameter_count(name, num_classes=num_classes, in_channels=in_channels)
        click.echo(f"{name}")
        click.echo(f"  paper:       {info.paper}")
        if info.description:
            click.echo(f"  description: {info.description}")
        click.echo(f"  parameters:  {params / 1e6:.2f} M ({num_classes} classes, {in_channels} bands)")
        click.echo(f"  input bands: {'any' if info.any_in_channels else in_channels}")
        if info.default_cfg:
            click.echo(f"  options:     {info.default_cfg}")
        click.echo(f"  weights:     {default_weights(name) or 'none by default'} (rsseg weights {name})")
        family = next((d for d in sorted(docs.glob('*.md')) if name.startswith(d.stem)), None)
        if family is not None:
            click.echo(f"  docs:        docs/models/{family.name}")


@click.command("datasets")
@click.argument("names", nargs=-1)
def datasets(names: tuple[str, ...]) -> None:
    """List the datasets (or only NAMES): classes, colours, bands, resolution, ignore index."""
    from rsseg.data.specs import get_spec, list_datasets

    for spec in [get_spec(name) for name in names or list_datasets()]:
        click.echo(f"{spec.name}: {spec.title}")
        bands = ", ".join(
            f"{key}=({'/'.join(b.names)})" + (" default" if key == spec.default_bands else "")
            for key, b in spec.band_sets.items()
        )
        click.echo(f"  bands: {bands}; gsd {spec.gsd_m} m; ignore index {spec.ignore_index}")
        if spec.mean_excludes:
            click.echo(f"  mIoU/mF1 leave out: {', '.join(spec.mean_excludes)} (OA keeps every class)")
        rows = [
            (str(i), name, "#{:02x}{:02x}{:02x}".format(*rgb), "({}, {}, {})".format(*rgb))
            for i, (name, rgb) in enumerate(zip(spec.classes, spec.colors))
        ]
        click.echo(_indent(_table(("id", "class", "colour", "rgb"), rows), "  "))
        click.echo("")


@click.command("configs")
def configs() -> None:
    """List the training presets (`rsseg train --config NAME`): name, model, dataset, summary."""
    from rsseg.config import CONFIG_DIR, list_configs, load_config

    rows = []
    for name in list_configs():
        cfg = load_config(name)
        first = (CONFIG_DIR / f"{name}.yaml").read_text().splitlines()[0]
        summary = first.lstrip("# ").split(". ")[0] if first.startswith("#") else ""
        rows.append((name, cfg.model, cfg.dataset, summary[:60]))
    click.echo(_table(("config", "model", "dataset", "summary"), rows))
    click.echo(f"\nfiles: {CONFIG_DIR.resolve()}")


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def run() -> None:
    """The ``rsseg`` entry point: huge pages for torch's tensors (see :mod:`rsseg.hugepages`),
    which must be asked for before torch is imported, then the command group."""
    from rsseg.hugepages import enable_torch_huge_pages

    enable_torch_huge_pages()
    main()


if __name__ == "__main__":
    run()
