"""The command line: version, help, listings, and one-line errors with exit code 2."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

import rsseg
from rsseg.cli import main
from rsseg.data.specs import get_spec
from rsseg.models.registry import parameter_count


def _run(*args: str):
    return CliRunner().invoke(main, list(args))


def test_version_and_help() -> None:
    result = _run("--version")
    assert result.exit_code == 0 and rsseg.__version__ in result.output
    result = _run("--help")
    assert result.exit_code == 0
    for command in ("models", "datasets"):
        assert command in result.output


def test_console_script_is_installed() -> None:
    exe = shutil.which("rsseg")
    assert exe is not None
    result = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == f"rsseg, version {rsseg.__version__}"


def test_models_table_fits_100_columns_and_names_details() -> None:
    result = _run("models")
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.output.splitlines()) <= 100
    rows = {line.split()[0]: line for line in result.output.splitlines()[2:] if line.strip()}
    assert f"{parameter_count('fpn-r50') / 1e6:.2f} M" in rows["fpn-r50"]
    assert "resnet18.fb_swsl_ig1b_ft_in1k" in rows["mafmamba"] and "MAFMamba" in rows["mafmamba"]
    detail = _run("models", "unet-r18", "segret-t")
    assert detail.exit_code == 0, detail.output
    blocks = detail.output.split("\nsegret-t\n")
    assert f"{parameter_count('unet-r18') / 1e6:.2f} M" in blocks[0] and "input bands: any" in blocks[0]
    assert "rmt-t.in1k" in blocks[1] and "docs/models/segret.md" in blocks[1]


@pytest.mark.parametrize(
    "args, valid",
    [(("models", "segformer"), "unet-r18"), (("datasets", "isprs"), "vaihingen, potsdam")],
)
def test_unknown_names_are_one_line_errors(args, valid: str) -> None:
    # A real process: the exit code, stderr and absence of a traceback are what a user sees.
    result = subprocess.run(
        [sys.executable, "-m", "rsseg.cli", *args], capture_output=True, text=True
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rsseg: error: unknown")
    assert valid in lines[0] and "Traceback" not in result.stderr


def test_datasets_show_classes_and_colours() -> None:
    result = _run("datasets", "vaihingen", "loveda")
    assert result.exit_code == 0
    for name in ("vaihingen", "loveda"):
        spec = get_spec(name)
        for cls, rgb in zip(spec.classes, spec.colors):
            assert cls in result.output and "#{:02x}{:02x}{:02x}".format(*rgb) in result.output
    assert "leave out: clutter" in result.output


def test_train_model_flag_drops_the_presets_model_options(monkeypatch) -> None:
    import types

    import rsseg.train.fit as fit
    from rsseg.config import load_config

    seen = []
    monkeypatch.setattr(fit, "train", lambda cfg: seen.append(cfg) or types.SimpleNamespace(bundle_path=None))
    assert load_config("cpu-tiny").model_cfg  # the preset carries options for its own model
    result = _run("train", "--config", "cpu-tiny", "--model", "segret-t")
    assert result.exit_code == 0, result.output
    assert seen[0].model == "segret-t" and seen[0].model_cfg == {}
    result = _run("train", "--config", "cpu-tiny")
    assert seen[1].model_cfg == load_config("cpu-tiny").model_cfg


def test_every_option_of_every_command_has_help_text() -> None:
    import click

    from rsseg.cli import main

    ctx = click.Context(main)
    missing = [
        f"{name} {param.opts[0]}"
        for name in main.list_commands(ctx)
        for param in main.get_command(ctx, name).params
        if isinstance(param, click.Option) and not param.help and not param.hidden
    ]
    assert missing == []


def test_channels_last_and_compile_flags_reach_training_and_prediction(monkeypatch) -> None:
    import types

    import rsseg.api as api
    import rsseg.train.fit as fit

    configs = []
    monkeypatch.setattr(fit, "train", lambda cfg: configs.append(cfg) or types.SimpleNamespace(bundle_path=None))
    assert _run("train", "--config", "cpu-tiny", "--channels-last", "--compile").exit_code == 0
    assert _run("train", "--config", "cpu-tiny", "--set", "channels_last=true").exit_code == 0
    assert (configs[0].channels_last, configs[0].compile) == (True, True)
    assert (configs[1].channels_last, configs[1].compile) == (True, False)  # unset flags override nothing

    calls = []
    monkeypatch.setattr(api, "predict", lambda *a, **kw: calls.append(kw) or [])
    assert _run("predict", "s.tif", "-o", "o.tif", "--channels-last", "--compile").exit_code == 0
    assert _run("predict", "s.tif", "-o", "o.tif").exit_code == 0
    assert (calls[0]["channels_last"], calls[0]["compile"]) == (True, True)
    assert (calls[1]["channels_last"], calls[1]["compile"]) == (False, False)
