"""Which model bundle ``rsseg predict`` / ``rsseg eval`` use when ``--model`` is not given.

The order, first found wins:

1. ``--model`` (the caller passes it as ``given``);
2. ``$RSSEG_MODEL``;
3. the most recently finished run under ``./runs`` (where ``rsseg train`` writes by default):
   the newest ``runs/*/best.safetensors``;
4. the default set with ``rsseg models --set-default BUNDLE`` (kept in
   ``$XDG_CONFIG_HOME/rsseg/default-model``, default ``~/.config/rsseg/default-model``);
5. otherwise one line saying how to get one.

The caller says which one was taken and why, in one line (:attr:`DefaultModel.reason`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rsseg.errors import BundleError, UsageError

MODEL_ENV = "RSSEG_MODEL"
RUNS_DIR = Path("runs")


@dataclass(frozen=True)
class DefaultModel:
    path: Path
    reason: str  # e.g. "the newest finished run under runs/"


def _settings_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "rsseg" / "default-model"


def set_default_model(bundle: str | os.PathLike[str]) -> Path:
    """Remember ``bundle`` (checked to be a readable rsseg bundle) as the default model."""
    from rsseg.bundle import read_bundle_meta

    path = Path(bundle).expanduser().resolve()
    if not path.is_file():
        raise BundleError(f"model bundle not found: {path}")
    read_bundle_meta(path)  # refuses files that are not rsseg bundles, in one line
    settings = _settings_file()
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(str(path) + "\n")
    return path


def _newest_run(runs: Path) -> Path | None:
    bundles = [p for p in runs.glob("*/best.safetensors") if p.is_file()]
    return max(bundles, key=lambda p: p.stat().st_mtime) if bundles else None


def resolve_model(
    given: str | os.PathLike[str] | None,
    runs: Path = RUNS_DIR,
    echo: Callable[[str], None] | None = None,
) -> DefaultModel:
    """The bundle to use and why; one-line error when there is none. When the bundle was not
    given, ``echo`` (if any) is told which one was taken and why, in one line."""
    chosen = _resolve(given, runs)
    if echo is not None and chosen.reason != "--model":
        echo(f"model {chosen.path} ({chosen.reason})")
    return chosen


def _resolve(given: str | os.PathLike[str] | None, runs: Path) -> DefaultModel:
    if given:
        return DefaultModel(Path(given), "--model")
    env = os.environ.get(MODEL_ENV, "").strip()
    if env:
        return DefaultModel(Path(env).expanduser(), f"${MODEL_ENV}")
    newest = _newest_run(Path(runs))
    if newest is not None:
        return DefaultModel(newest, f"the newest finished run under {runs}/")
    settings = _settings_file()
    if settings.is_file() and settings.read_text().strip():
        return DefaultModel(Path(settings.read_text().strip()), "the default set with rsseg models --set-default")
    raise UsageError(
        f"no model given and none found: pass --model BUNDLE, set ${MODEL_ENV}, train one with "
        f"`rsseg train` (it writes {runs}/<run>/best.safetensors), or choose a default with "
        "`rsseg models --set-default BUNDLE`"
    )
