"""`rsseg predict scene.tif -o landcover.gpkg` without --model: which bundle, and why."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import rsseg
from rsseg.bundle import BundleMeta, save_bundle
from rsseg.data.specs import get_spec
from rsseg.default_model import resolve_model
from rsseg.errors import BundleError, UsageError


def _bundle(path: Path) -> Path:
    spec = get_spec("vaihingen")
    meta = BundleMeta(model_name="unet-r18", model_config={"encoder_depth": 3, "decoder_channels": [16, 8, 4]},
                      class_names=list(spec.classes), class_colors=[list(c) for c in spec.colors],
                      ignore_index=spec.ignore_index, bands=[1, 2, 3], band_names=["NIR", "R", "G"],
                      mean=list(spec.mean), std=list(spec.std), patch_size=64, gsd_m=0.09)
    model = rsseg.create_model("unet-r18", 6, 3, encoder_depth=3, decoder_channels=[16, 8, 4])
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_bundle(path, model.eval(), meta)


@pytest.fixture()
def place(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RSSEG_MODEL", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return tmp_path


def test_the_order_is_flag_env_newest_run_set_default(place, monkeypatch):
    with pytest.raises(UsageError) as err:
        resolve_model(None)
    assert "--model" in str(err.value) and "rsseg train" in str(err.value) and "\n" not in str(err.value)

    chosen = _bundle(place / "chosen.safetensors")
    from rsseg.cli import main

    r = CliRunner().invoke(main, ["models", "--set-default", str(chosen)])
    assert r.exit_code == 0, r.output
    found = resolve_model(None)
    assert found.path == chosen.resolve() and "set-default" in found.reason

    old = _bundle(place / "runs" / "a" / "best.safetensors")
    new = _bundle(place / "runs" / "b" / "best.safetensors")
    os.utime(old, (time.time() - 100, time.time() - 100))
    found = resolve_model(None)
    assert found.path == Path("runs/b/best.safetensors") and "newest finished run" in found.reason
    (place / "runs" / "c").mkdir()  # a run that has not finished has no bundle: not taken
    assert resolve_model(None).path == Path("runs/b/best.safetensors")

    monkeypatch.setenv("RSSEG_MODEL", str(old))
    assert resolve_model(None).path == old and resolve_model(None).reason == "$RSSEG_MODEL"
    assert resolve_model("given.safetensors").path == Path("given.safetensors")


def test_set_default_refuses_what_is_not_a_bundle(place):
    junk = place / "junk.safetensors"
    junk.write_bytes(b"junk")
    with pytest.raises(BundleError):
        from rsseg.default_model import set_default_model

        set_default_model(junk)
    assert not (place / "config" / "rsseg" / "default-model").exists()


def test_the_cards_predict_command_runs_as_written(place):
    """`rsseg predict scene.tif -o landcover.gpkg` after a training run: no --model needed."""
    import subprocess
    import sys

    import geopandas as gpd

    from rsseg.data.synthetic import write_scene

    _bundle(place / "runs" / "unet-r18-vaihingen" / "best.safetensors")
    write_scene(place / "scene.tif", 96, 128, seed=1, tile=128)
    result = subprocess.run([sys.executable, "-m", "rsseg.cli", "predict", "scene.tif", "-o", "landcover.gpkg",
                             "-q", "--tile", "64", "--overlap", "16"],
                            capture_output=True, text=True, cwd=place, timeout=300,
                            env={**os.environ, "XDG_CONFIG_HOME": str(place / "config")})
    assert result.returncode == 0, result.stderr
    first = result.stderr.splitlines()[0]
    assert first == "model runs/unet-r18-vaihingen/best.safetensors (the newest finished run under runs/)"
    assert len(gpd.read_file(place / "landcover.gpkg", layer="landcover")) > 0
    # eval takes the same default.
    evaluated = subprocess.run([sys.executable, "-m", "rsseg.cli", "eval", "--dataset", "synthetic"],
                               capture_output=True, text=True, cwd=place, timeout=300)
    assert "model runs/unet-r18-vaihingen/best.safetensors" in evaluated.stderr
