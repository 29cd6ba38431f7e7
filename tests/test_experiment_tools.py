"""Configs as top-level files found by preset name, --set / --print-config / --logger, the
Python API's config resolution, and `rsseg plot`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

import rsseg
from rsseg.config import CONFIG_DIR, apply_overrides, config_from_dict, list_configs, load_config
from rsseg.errors import DataError, UsageError

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str):
    from rsseg.cli import main

    return CliRunner().invoke(main, list(args))


def test_presets_are_the_top_level_config_files():
    top = REPO / "configs"
    assert top.is_dir() and not top.is_symlink()
    files = sorted(p.stem for p in top.glob("*.yaml"))
    assert files == list_configs() and len(files) >= 9
    assert CONFIG_DIR.resolve() == top.resolve()  # the package finds them there
    r = _cli("configs")
    assert r.exit_code == 0
    listed = [line.split()[0] for line in r.output.splitlines()[2:] if line and not line.startswith("files")]
    assert listed == files


def test_set_overrides_nested_fields_and_refuses_unknown_keys():
    cfg = load_config("mafmamba-vaihingen")
    out = apply_overrides(cfg, ["lr=1e-4", "augment.scales=[0.5, 1.0]", "model_cfg.backbone=swin_t",
                                "pretrained=null", "epochs=3"])
    assert out.lr == 1e-4 and out.augment.scales == (0.5, 1.0) and out.epochs == 3
    assert out.model_cfg == {"backbone": "swin_t"} and out.pretrained is None
    assert cfg.lr == 6e-4  # the original is untouched
    for bad, match in (("lr", "key=value"), ("nope=1", "unknown key"), ("augment.nope=1", "unknown key"),
                       ("lr.x=1", "has no sub-keys")):
        with pytest.raises(UsageError, match=match):
            apply_overrides(cfg, [bad])


def test_print_config_is_the_resolved_config_and_trains_nothing(tmp_path):
    runs = tmp_path / "runs"
    r = _cli("train", "--config", "mafmamba-vaihingen", "--set", "augment.mosaic_p=0",
             "--no-pretrained", "--lr", "1e-3", "-o", str(runs), "--print-config")
    assert r.exit_code == 0, r.output
    printed = yaml.safe_load(r.output)
    expected = load_config("mafmamba-vaihingen").replace(lr=1e-3, output_dir=str(runs))
    expected = apply_overrides(expected, ["augment.mosaic_p=0", "pretrained=null"])
    assert config_from_dict(printed) == expected
    assert "# resolved: initial weights none (from scratch)" in r.output
    assert "# resolved: backbone_lr 0.001" in r.output  # from scratch: the head's rate
    assert not runs.exists()
    # --output is still accepted as an alias of -o/--out.
    r2 = _cli("train", "--dataset", "synthetic", "--output", str(runs), "--print-config")
    assert yaml.safe_load(r2.output)["output_dir"] == str(runs)


def test_api_train_config_matches_the_cli(tmp_path):
    cfg = rsseg.train_config("cpu-tiny", max_steps=5, out=str(tmp_path), set_items=["seed=3"])
    assert cfg.max_steps == 5 and cfg.output_dir == str(tmp_path) and cfg.seed == 3
    assert cfg.model == "unet-r18" and cfg.model_cfg  # the preset's model options
    other = rsseg.train_config("cpu-tiny", model="mafmamba-tiny")
    assert other.model_cfg == {}  # another model starts from its own defaults
    with pytest.raises(UsageError, match="exclude each other"):
        rsseg.train_config("cpu-tiny", pretrained="x.pth", no_pretrained=True)


def test_tensorboard_logger_without_the_package_is_one_line(tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")
    r = _cli("train", "--dataset", "synthetic", "--logger", "tensorboard", "-o", str(tmp_path))
    assert r.exit_code == 2 and "rsseg[tensorboard]" in r.output and r.output.count("\n") == 1


def _fake_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    rows = ["epoch,lr/head,step,train_loss_epoch,train_loss_step,val_mIoU"]
    for step in range(10):
        rows.append(f",{1e-3 * (1 - step / 10)},{step},,,")
        rows.append(f"0,,{step},,{2.0 - 0.1 * step},")
    rows.append("0,,9,1.5,,0.61")
    (run / "logs" / "metrics.csv").write_text("\n".join(rows) + "\n")
    cm = np.diag([50, 40, 30]) + 2
    scores = {"classes": ["a", "b", "c"], "confusion_matrix": cm.tolist(), "mIoU": 0.8,
              "convention": "all classes",
              "per_class": {c: {"iou": v} for c, v in zip("abc", (0.9, 0.8, 0.7))}}
    (run / "eval.json").write_text(json.dumps(scores))
    return run


def test_plot_writes_curves_and_the_evaluation(tmp_path):
    from rsseg.plots import read_metrics

    run = _fake_run(tmp_path)
    series = read_metrics(run)
    assert series["val_mIoU"] == [(9, 0.61)]
    assert [v for _, v in series["lr/head"]][:2] == pytest.approx([1e-3, 9e-4])
    r = _cli("plot", str(run))
    assert r.exit_code == 0, r.output
    written = [Path(line) for line in r.output.split()]
    assert [p.name for p in written] == ["training_curves.png", "evaluation.png"]
    for path in written:
        with Image.open(path) as image:
            assert image.size[0] > 600 and image.size[1] > 300
    bad = tmp_path / "empty"
    bad.mkdir()
    with pytest.raises(DataError, match="no logs/metrics.csv"):
        from rsseg.plots import plot_run

        plot_run(bad)
