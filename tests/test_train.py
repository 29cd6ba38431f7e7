"""Training and evaluation on small fake Vaihingen data: learning, bundle, eval vs an independent
confusion matrix, NaN stop, resume, CLI, and a two-process CPU DDP run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from click.testing import CliRunner
from torch import nn

from _fake_layouts import decode_rgb_label, make_vaihingen
from rsseg.config import AugmentConfig, TrainConfig
from rsseg.data.prepare import prepare_dataset, read_manifest
from rsseg.data.specs import get_spec
from rsseg.errors import UsageError
from rsseg.models.registry import register_model
from rsseg.train.fit import train
from rsseg.train.module import NonFiniteLossError

TESTS_DIR = Path(__file__).parent


# A tiny fully convolutional net (no normalisation layers) learns the fake data's colour-coded
# classes in a few dozen steps on a CPU, which a ResNet U-Net does not.
def tiny_fcn(num_classes: int, in_channels: int, width: int = 16) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, num_classes, 1),
    )  # fmt: skip


class _NaNAfter(nn.Module):
    """Its own criterion turns NaN after three training steps."""

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.net = tiny_fcn(num_classes, in_channels, width=4)
        self.calls = 0

    def forward(self, x):
        return self.net(x)

    def compute_loss(self, outputs, target, ignore_index):
        self.calls += 1
        loss = nn.functional.cross_entropy(outputs, target, ignore_index=ignore_index)
        return loss * float("nan") if self.calls > 3 else loss


TEST_MODELS = {"test-tiny-fcn": tiny_fcn, "test-nan-after-3": _NaNAfter}


def register_test_models() -> None:
    for name, builder in TEST_MODELS.items():
        register_model(name, paper="test fixture")(builder)


@pytest.fixture(scope="module", autouse=True)
def _test_models():
    """Registered only while this module runs, so other modules' list_models() never sees them."""
    from rsseg.models import registry

    register_test_models()
    yield
    for name in TEST_MODELS:
        registry._REGISTRY.pop(name, None)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vaihingen")
    make_vaihingen(root / "raw", size=(128, 128))  # train 1 3 5 7 (one held out), test 2 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_dataset("vaihingen", root / "raw", root / "prepared", patch=64, progress=False)


def _cfg(prepared: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        dataset="vaihingen", data_dir=str(prepared), patch_size=64, crop_size=64,
        model="test-tiny-fcn", epochs=6, batch_size=8, lr=1e-2, backbone_lr=1e-2,
        scheduler="none", workers=0, output_dir=str(out), progress=False, seed=0,
        augment=AugmentConfig(scales=(1.0,), mosaic_p=0.0),
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def run(prepared, tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("runs")
    cfg = _cfg(prepared, out, run_name="fcn")
    return cfg, train(cfg)


def test_short_training_lifts_validation_miou_far_above_chance(run):
    _, result = run
    # Chance level for 5 mean classes is about 0.1; the colour-coded classes are learnable.
    assert result.best_val_miou is not None and result.best_val_miou > 0.6
    assert result.best_checkpoint.is_file() and result.last_checkpoint.is_file()
    header = result.metrics_csv.read_text().splitlines()[0]
    assert "val_mIoU" in header and "train_loss_step" in header


def test_bundle_carries_classes_bands_and_normalisation(run, prepared):
    from rsseg.bundle import read_bundle_meta

    _, result = run
    meta = read_bundle_meta(result.bundle_path)
    spec = get_spec("vaihingen")
    assert meta.class_names == list(spec.classes)
    assert meta.class_colors == [list(c) for c in spec.colors]
    assert meta.ignore_index == 6 and meta.bands == [1, 2, 3]
    assert meta.band_names == ["NIR", "R", "G"]
    assert meta.mean == pytest.approx(list(spec.mean)) and meta.std == pytest.approx(list(spec.std))
    assert meta.dataset == "vaihingen" and meta.patch_size == 64 and meta.gsd_m == pytest.approx(0.09)
    assert meta.extra["best_val_miou"] == pytest.approx(result.best_val_miou)


def test_eval_equals_a_confusion_matrix_computed_from_the_source_tiles(run, prepared):
    """Predictions stitched back into each test tile, scored against the eroded source labels."""
    from rsseg.bundle import load_bundle
    from rsseg.train.evaluate import evaluate

    _, result = run
    scores = evaluate(result.bundle_path, "vaihingen", prepared, split="test")
    model, meta = load_bundle(result.bundle_path)
    manifest = read_manifest(prepared)
    mean = torch.tensor(meta.mean).view(1, -1, 1, 1)
    std = torch.tensor(meta.std).view(1, -1, 1, 1)
    cm = np.zeros((6, 6), dtype=np.int64)
    assert manifest["splits"]["test"] == ["2", "4"]
    for tile in manifest["splits"]["test"]:
        entry = manifest["tiles"][tile]
        truth = decode_rgb_label(Path(entry["label"]))
        assert Path(entry["label"]).name.endswith("_noBoundary.tif")
        pred = np.full((truth.shape[0] + 64, truth.shape[1] + 64), -1, dtype=np.int64)
        for patch in entry["patches"]:
            col, row = patch["window"][:2]
            with rasterio.open(prepared / patch["image"]) as src:
                x = torch.from_numpy(src.read().astype(np.float32))[None]
            with torch.no_grad():
                pred[row : row + 64, col : col + 64] = model((x - mean) / std).argmax(1)[0].numpy()
        pred = pred[: truth.shape[0], : truth.shape[1]]
        assert (pred >= 0).all()  # every pixel predicted exactly once
        keep = truth != 6
        cm += np.bincount(truth[keep] * 6 + pred[keep], minlength=36).reshape(6, 6)
    np.testing.assert_array_equal(scores.confusion, cm)
    tp = np.diag(cm)
    iou = tp / (cm.sum(0) + cm.sum(1) - tp)
    assert scores.miou == pytest.approx(np.nanmean(iou[:5]))  # Clutter left out
    assert scores.oa == pytest.approx(tp.sum() / cm.sum())
    assert "without clutter" in scores.format_table()
    assert scores.to_dict()["mean_classes"] == list(get_spec("vaihingen").classes[:5])


def test_resume_continues_from_the_last_checkpoint(run):
    cfg, result = run
    resumed = train(cfg.replace(resume="last", epochs=7))
    assert resumed.run_dir == result.run_dir
    state = torch.load(resumed.last_checkpoint, map_location="cpu", weights_only=True)
    assert state["epoch"] == 6  # one more epoch than the first run's 0..5
    epochs = {line.split(",")[0] for line in resumed.metrics_csv.read_text().splitlines()[1:]}
    assert "6" in epochs


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(prepared, tmp_path):
    cfg = _cfg(prepared, tmp_path, model="test-nan-after-3", epochs=5, run_name="nan")
    with pytest.raises(NonFiniteLossError, match=r"loss became nan .*last\.ckpt"):
        train(cfg)
    last = tmp_path / "nan" / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["epoch"] == 0  # saved after the first (finite) epoch of 3 steps
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


def test_bare_train_without_data_names_the_files_to_put_where(tmp_path, monkeypatch):
    from rsseg.cli import main

    monkeypatch.setenv("RSSEG_DATA", str(tmp_path / "data"))
    res = CliRunner().invoke(main, ["train", "--dataset", "vaihingen", "-o", str(tmp_path / "runs")])
    assert res.exit_code == 1
    line = res.output.strip()
    assert "\n" not in line and line.startswith("rsseg: error: no vaihingen data found")
    assert "ISPRS_semantic_labeling_Vaihingen.zip" in line and str(tmp_path / "data" / "vaihingen") in line


def test_cli_train_prepares_archives_from_the_default_place_then_eval(tmp_path, monkeypatch):
    from rsseg.cli import main

    monkeypatch.setenv("RSSEG_DATA", str(tmp_path / "data"))
    make_vaihingen(tmp_path / "data" / "vaihingen", areas=(1, 3, 2), size=(64, 64), zipped=True)
    runner = CliRunner()
    res = runner.invoke(main, [
        "train", "--dataset", "vaihingen", "--model", "test-tiny-fcn", "--patch-size", "64",
        "--crop-size", "64", "--epochs", "1", "--workers", "0", "--batch-size", "2",
        "-o", str(tmp_path / "runs"),
    ])  # fmt: skip
    assert res.exit_code == 0, res.output
    bundle = tmp_path / "runs" / "test-tiny-fcn-vaihingen" / "best.safetensors"
    assert bundle.is_file()
    assert (tmp_path / "data" / "vaihingen" / "prepared-irrg-64" / "manifest.json").is_file()
    res = runner.invoke(main, ["eval", "--model", str(bundle), "--tta", "flip", "--json", str(tmp_path / "s.json")])
    assert res.exit_code == 0, res.output
    scores = json.loads((tmp_path / "s.json").read_text())
    assert scores["split"] == "test" and scores["tta"] == "flip" and scores["dataset"] == "vaihingen"
    assert sum(map(sum, scores["confusion_matrix"])) == scores["pixels"] > 0
    assert "without clutter" in res.output


DDP_SCRIPT = """
import os, sys, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, {tests!r})
import test_train
test_train.register_test_models()  # in every DDP process
from rsseg.config import AugmentConfig, TrainConfig
from rsseg.train.fit import train
cfg = TrainConfig(dataset="vaihingen", data_dir={data!r}, patch_size=64, crop_size=64,
                  model="test-tiny-fcn", epochs=1, batch_size=4, workers=0, output_dir={out!r},
                  run_name="ddp", devices=2, accelerator="cpu", progress=False,
                  augment=AugmentConfig(scales=(1.0,), mosaic_p=0.0))
result = train(cfg)
import torch.distributed as dist
print("RANK", os.environ.get("LOCAL_RANK", "0"), "WORLD", dist.get_world_size() if dist.is_initialized() else 1,
      "BUNDLE", result.bundle_path, flush=True)
"""


def test_two_process_cpu_ddp_run(prepared, tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(tests=str(TESTS_DIR), data=str(prepared),
                                                        out=str(tmp_path / "runs"))))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = sorted(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("RANK"))
    assert ranks == ["0", "1"]
    assert all(" WORLD 2 " in line for line in proc.stdout.splitlines() if line.startswith("RANK"))
    assert (tmp_path / "runs" / "ddp" / "best.safetensors").is_file()
    assert not (tmp_path / "runs" / "ddp-2").exists()  # both ranks used one run folder


def test_a_crop_too_small_for_batchnorm_is_a_usage_error(prepared, tmp_path):
    # ResNet-18 at 32 px reaches 1 x 1 at its last stage; with one sample BatchNorm cannot train.
    cfg = _cfg(prepared, tmp_path, model="unet-r18", crop_size=32, batch_size=1, max_steps=1,
               epochs=1, run_name="small")
    with pytest.raises(UsageError, match="crop 32 px at batch size 1 is too small for unet-r18"):
        train(cfg)


def _metric_rows(csv_path: Path, column: str) -> list[tuple[int, float]]:
    """(step, value) of every row of a Lightning metrics.csv that has ``column``."""
    import csv

    with open(csv_path) as f:
        return [(int(r["step"]), float(r[column])) for r in csv.DictReader(f) if r.get(column)]


def _steps_per_epoch(prepared: Path, batch_size: int) -> int:
    from rsseg.data.patches import PatchDataset

    n = len(PatchDataset(prepared, "train"))
    return n // batch_size if n >= batch_size else 1


def test_a_run_ending_between_validations_keeps_and_validates_its_final_step(prepared, tmp_path):
    per_epoch = _steps_per_epoch(prepared, 4)
    final = 2 * per_epoch + 1  # one step past the regular validation after epoch 2
    cfg = _cfg(prepared, tmp_path, epochs=-1, max_steps=final, batch_size=4, val_every=2,
               run_name="between")
    result = train(cfg)
    last = torch.load(result.last_checkpoint, map_location="cpu", weights_only=True)
    assert last["global_step"] == final
    vals = _metric_rows(result.metrics_csv, "val_mIoU")
    assert [step for step, _ in vals] == [2 * per_epoch - 1, final - 1]  # Lightning logs step - 1
    # best is chosen over every validation, the final one included.
    best = torch.load(result.best_checkpoint, map_location="cpu", weights_only=True)
    best_score = max(v for _, v in vals)
    assert result.best_val_miou == pytest.approx(best_score)
    assert best["global_step"] == (final if vals[-1][1] >= vals[0][1] else 2 * per_epoch)
    # The bundle holds the best checkpoint's weights.
    from rsseg.bundle import load_bundle

    model, _ = load_bundle(result.bundle_path)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, best["state_dict"]["model." + key])


def test_epochs_not_a_multiple_of_the_validation_period_validate_the_last_epoch(prepared, tmp_path):
    per_epoch = _steps_per_epoch(prepared, 4)
    cfg = _cfg(prepared, tmp_path, epochs=3, batch_size=4, val_every=2, run_name="odd")
    result = train(cfg)
    vals = _metric_rows(result.metrics_csv, "val_mIoU")
    assert [step + 1 for step, _ in vals] == [2 * per_epoch, 3 * per_epoch]
    last = torch.load(result.last_checkpoint, map_location="cpu", weights_only=True)
    assert last["global_step"] == 3 * per_epoch


def test_resume_from_a_final_step_between_validations_continues_from_it(prepared, tmp_path):
    per_epoch = _steps_per_epoch(prepared, 4)
    first = per_epoch + 2
    cfg = _cfg(prepared, tmp_path, epochs=-1, max_steps=first, batch_size=4, val_every=1,
               run_name="resume-between")
    train(cfg)
    saved = torch.load(tmp_path / "resume-between" / "checkpoints" / "last.ckpt",
                       map_location="cpu", weights_only=True)
    assert saved["global_step"] == first
    resumed = train(cfg.replace(resume="last", max_steps=first + 3))
    last = torch.load(resumed.last_checkpoint, map_location="cpu", weights_only=True)
    assert last["global_step"] == first + 3  # three more steps from the final one, none redone
    # The resumed run ends between regular validations (6 steps an epoch) and validates there.
    assert len(_metric_rows(resumed.metrics_csv, "val_mIoU")) == 1


def test_the_learning_rate_curve_of_each_group_is_logged(prepared, tmp_path):
    import math

    total = 3 * _steps_per_epoch(prepared, 4)
    cfg = _cfg(prepared, tmp_path, epochs=-1, max_steps=total, batch_size=4, scheduler="cosine",
               lr=1e-2, backbone_lr=1e-3, run_name="lr-curve")
    result = train(cfg)
    header = result.metrics_csv.read_text().splitlines()[0].split(",")
    assert {"lr/head", "lr/head_no_decay"} <= set(header), header  # the fcn has no backbone
    for column in ("lr/head", "lr/head_no_decay"):
        curve = _metric_rows(result.metrics_csv, column)
        assert len(curve) >= 3
        for step, value in curve:  # the logged rate is the schedule's at that step
            assert value == pytest.approx(0.5 * 1e-2 * (1 + math.cos(math.pi * step / total)))
