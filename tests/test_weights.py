"""Initial weights: the catalogue, the store, paper configs naming their weights, a run without
them stopping in one line before any work, and the backbone learning rate that follows."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from rsseg.config import list_configs, load_config
from rsseg.errors import DataError, RssegWarning, UsageError
from rsseg.train.fit import effective_backbone_lr, initial_weights
from rsseg.weights import (
    CATALOGUE,
    WeightsMissingError,
    default_weights,
    find_weights,
    is_paper_model,
    resolve_weights,
    verify_checksum,
    weights_dir,
)

PAPER_FAMILIES = ("mafmamba", "reload-mamba", "segman-v2", "segret")


@pytest.fixture()
def store(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "weights"
    path.mkdir()
    monkeypatch.setenv("RSSEG_WEIGHTS", str(path))
    return path


def test_the_store_is_rsseg_weights_or_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("RSSEG_WEIGHTS", str(tmp_path / "w"))
    assert weights_dir() == tmp_path / "w"
    monkeypatch.delenv("RSSEG_WEIGHTS")
    assert weights_dir() == Path.home() / ".cache" / "rsseg" / "weights"


def test_every_paper_config_names_weights_from_the_catalogue():
    named = {}
    for name in list_configs():
        cfg = load_config(name)
        if is_paper_model(cfg.model) and cfg.dataset != "synthetic":
            assert cfg.pretrained in CATALOGUE, name
            assert cfg.pretrained == default_weights(cfg.model, cfg.model_cfg), name
            named[cfg.model] = cfg.pretrained
    for family in PAPER_FAMILIES:
        assert any(model.startswith(family) for model in named), family


def test_rsseg_weights_lists_all_four_paper_families_with_source_file_and_presence(store):
    from rsseg.cli import main

    (store / "a2mamba_small.pth").write_bytes(b"x")
    r = CliRunner().invoke(main, ["weights"])
    assert r.exit_code == 0, r.output
    for model in ("mafmamba", "reload-mamba", "segman-v2-s", "segman-v2-l", "segret-t", "segret-l"):
        assert model in r.output
    block = r.output.split("a2mamba-s.in1k")[1].split("\n\n")[0]
    assert f"present: {store / 'a2mamba_small.pth'}" in block
    assert "LMMM2025/A2Mamba" in block and "a2mamba_small.pth" in block
    assert "MISSING" in r.output.split("rmt-t.in1k")[1].split("\n\n")[0]
    one = CliRunner().invoke(main, ["weights", "segret-b"])
    assert one.exit_code == 0 and "rmt-b.in1k" in one.output and "a2mamba" not in one.output
    bad = CliRunner().invoke(main, ["weights", "nope"])
    assert bad.exit_code == 2 and bad.output.count("\n") == 1


def test_hugging_face_and_torch_hub_caches_are_found(store, tmp_path, monkeypatch):
    entry = CATALOGUE["resnet18.tv_in1k"]
    assert find_weights(entry) is None
    hub = Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints"
    hub.mkdir(parents=True, exist_ok=True)
    (hub / "resnet18-f37072fd.pth").write_bytes(b"x")
    assert find_weights(entry) == hub / "resnet18-f37072fd.pth"
    (store / "resnet18.tv_in1k.safetensors").write_bytes(b"y")
    assert find_weights(entry) == store / "resnet18.tv_in1k.safetensors"  # the store comes first
    (hub / "resnet18-f37072fd.pth").unlink()


def test_missing_weights_are_one_line_with_file_place_and_source(store):
    with pytest.raises(WeightsMissingError) as err:
        resolve_weights("a2mamba-b.in1k", "segman-v2-b")
    line = str(err.value)
    assert "\n" not in line
    assert "a2mamba_base.pth" in line and str(store) in line and "LMMM2025/A2Mamba" in line
    assert "--no-pretrained" in line
    with pytest.raises(UsageError, match="unknown weights"):
        resolve_weights("imagenet")
    with pytest.raises(WeightsMissingError, match="not found"):
        resolve_weights("/no/such/file.pth")


def test_a_published_checksum_prefix_is_checked(tmp_path):
    entry = CATALOGUE["resnet18.tv_in1k"]
    wrong = tmp_path / "resnet18-f37072fd.pth"
    wrong.write_bytes(b"not the published file")
    with pytest.raises(DataError, match="not the published resnet18.tv_in1k"):
        verify_checksum(entry, wrong)
    # rsseg's own file name carries no published prefix: its digest is recorded, not checked.
    own = tmp_path / "resnet18.tv_in1k.safetensors"
    own.write_bytes(b"abc")
    assert verify_checksum(entry, own) == hashlib.sha256(b"abc").hexdigest()


def test_training_a_paper_config_without_its_weights_stops_before_any_work(store, tmp_path, monkeypatch):
    from rsseg.cli import main

    monkeypatch.setenv("RSSEG_DATA", str(tmp_path / "data"))  # no data either: weights come first
    runs = tmp_path / "runs"
    for config in ("mafmamba-vaihingen", "segman-v2-s-vaihingen", "segret-t-vaihingen"):
        r = CliRunner().invoke(main, ["train", "--config", config, "-o", str(runs)])
        assert r.exit_code == 1, r.output
        line = r.output.strip()
        assert "\n" not in line and line.startswith("rsseg: error: initial weights"), line
        assert not runs.exists()  # nothing was started


def test_no_pretrained_warns_once_and_trains_the_backbone_at_the_heads_rate(store, tmp_path, monkeypatch):
    from rsseg.cli import main

    monkeypatch.setenv("RSSEG_DATA", str(tmp_path / "data"))
    r = CliRunner().invoke(main, ["train", "--config", "mafmamba-vaihingen", "--no-pretrained",
                                  "-o", str(tmp_path / "runs")])
    warnings = [line for line in r.output.splitlines() if line.startswith("rsseg: warning:")]
    assert len(warnings) == 1 and "from scratch" in warnings[0] and "raised" in warnings[0]
    assert "no vaihingen data found" in r.output  # then the run goes on to look for its data
    cfg = load_config("mafmamba-vaihingen")
    assert effective_backbone_lr(cfg, pretrained=True) == pytest.approx(6e-5)
    assert effective_backbone_lr(cfg, pretrained=False) == pytest.approx(6e-4)
    assert effective_backbone_lr(cfg.replace(backbone_lr=1e-5), pretrained=False) == 1e-5


def test_weights_in_the_store_resolve_and_reach_the_bundle_record(store):
    cfg = load_config("mafmamba-vaihingen")
    (store / "resnet18.fb_swsl_ig1b_ft_in1k.safetensors").write_bytes(b"weights")
    found = initial_weights(cfg)
    assert found.path == store / "resnet18.fb_swsl_ig1b_ft_in1k.safetensors"
    assert found.name == "resnet18.fb_swsl_ig1b_ft_in1k"
    assert found.sha256 == hashlib.sha256(b"weights").hexdigest()
    assert initial_weights(cfg.replace(pretrained="")).path is None  # --no-pretrained
    # Table 6 weights need the matching backbone option.
    (store / "swin_tiny_patch4_window7_224.ms_in1k.safetensors").write_bytes(b"w")
    with pytest.raises(UsageError, match="backbone: swin_t"):
        initial_weights(cfg.replace(pretrained="swin_tiny_patch4_window7_224.ms_in1k"))


def test_a_run_starts_from_the_stored_weights(store, tmp_path):
    """unet-r18 from a torchvision-layout ResNet-18 in the store: the encoder starts there."""
    import timm

    from _fake_layouts import make_vaihingen
    from rsseg.bundle import load_bundle
    from rsseg.config import AugmentConfig, TrainConfig
    from rsseg.data.prepare import prepare_dataset
    from rsseg.train.fit import train

    torch.manual_seed(0)
    reference = timm.create_model("resnet18", pretrained=False)  # torchvision key layout
    from safetensors.torch import save_file

    # Under rsseg's own file name (the publisher's name would carry a checksum prefix to match).
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()},
              store / "resnet18.tv_in1k.safetensors")
    make_vaihingen(tmp_path / "raw", size=(128, 128))
    prepared = prepare_dataset("vaihingen", tmp_path / "raw", tmp_path / "prepared", patch=64, progress=False)
    cfg = TrainConfig(dataset="vaihingen", data_dir=str(prepared), patch_size=64, crop_size=64,
                      model="unet-r18", pretrained="resnet18.tv_in1k", epochs=-1, max_steps=1,
                      batch_size=2, lr=0.0, backbone_lr="auto", scheduler="none", workers=0,
                      output_dir=str(tmp_path / "runs"), progress=False,
                      augment=AugmentConfig(scales=(1.0,), mosaic_p=0.0))
    result = train(cfg)
    model, meta = load_bundle(result.bundle_path)
    # lr 0: the encoder's convolutions are still the stored weights after the step.
    torch.testing.assert_close(model.encoder.conv1.weight, reference.conv1.weight)
    torch.testing.assert_close(model.encoder.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert meta.extra["initial_weights"]["name"] == "resnet18.tv_in1k"
    assert "pretrained" not in meta.model_config and "encoder_weights" not in meta.model_config
