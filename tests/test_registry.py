"""Model registry and the segmentation-models-pytorch baselines."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import segmentation_models_pytorch as smp
import torch

import rsseg
from rsseg.errors import UsageError
from rsseg.models.registry import count_parameters, model_info, parameter_count

BASELINES = {
    "unet-r18": (smp.Unet, "resnet18"),
    "unet-r50": (smp.Unet, "resnet50"),
    "deeplabv3plus-r18": (smp.DeepLabV3Plus, "resnet18"),
    "deeplabv3plus-r50": (smp.DeepLabV3Plus, "resnet50"),
    "fpn-r18": (smp.FPN, "resnet18"),
    "fpn-r50": (smp.FPN, "resnet50"),
}


def test_baselines_are_the_first_entries() -> None:
    assert rsseg.list_models()[: len(BASELINES)] == list(BASELINES)


@pytest.mark.parametrize("name", list(BASELINES))
def test_parameter_count_matches_smp(name: str) -> None:
    cls, encoder = BASELINES[name]
    reference = cls(encoder_name=encoder, encoder_weights=None, in_channels=3, classes=6)
    expected = sum(p.numel() for p in reference.parameters())
    assert parameter_count(name, num_classes=6, in_channels=3) == expected
    assert count_parameters(rsseg.create_model(name, 6, 3)) == expected


@pytest.mark.parametrize("name", ["unet-r18", "deeplabv3plus-r18", "fpn-r18"])
def test_forward_gives_logits_at_input_size(name: str) -> None:
    torch.manual_seed(0)
    model = rsseg.create_model(name, num_classes=6, in_channels=3).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 512, 512))
    assert out.shape == (1, 6, 512, 512)
    assert torch.isfinite(out).all()


def test_other_band_counts_change_the_stem() -> None:
    model = rsseg.create_model("unet-r18", num_classes=7, in_channels=4).eval()
    assert model.encoder.conv1.weight.shape[1] == 4
    with torch.no_grad():
        assert model(torch.randn(2, 4, 64, 96)).shape == (2, 7, 64, 96)


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(UsageError) as info:
        rsseg.create_model("unet-r19", 6, 3)
    message = str(info.value)
    assert "unet-r19" in message and "unet-r18" in message and "\n" not in message
    assert info.value.exit_code == 2


def test_bad_config_key_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="bad configuration"):
        rsseg.create_model("unet-r18", 6, 3, not_an_option=1)


def _random_resnet18_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return smp.Unet("resnet18", encoder_weights=None).encoder.state_dict()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_encoder_weights_are_loaded(tmp_path, suffix: str) -> None:
    state = _random_resnet18_state()
    state["fc.weight"] = torch.zeros(1000, 512)  # a classifier the encoder drops
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model = rsseg.create_model("unet-r18", 6, 3, encoder_weights=str(path))
    for key in ("conv1.weight", "layer4.1.bn2.running_var"):
        assert torch.equal(model.encoder.state_dict()[key], state[key])


def test_local_weights_for_four_bands_cycle_rgb_filters(tmp_path) -> None:
    state = _random_resnet18_state()
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    model = rsseg.create_model("unet-r18", 6, 4, encoder_weights=str(path))
    rgb = state["conv1.weight"]
    got = model.encoder.conv1.weight.detach()
    # Band 4 reuses the red filter; every filter is rescaled by 3/4 so activations keep their scale.
    torch.testing.assert_close(got[:, :3], rgb * 0.75)
    torch.testing.assert_close(got[:, 3], rgb[:, 0] * 0.75)


def test_wrong_weights_file_is_refused(tmp_path) -> None:
    path = tmp_path / "resnet50.pth"
    torch.save(smp.Unet("resnet50", encoder_weights=None).encoder.state_dict(), path)
    with pytest.raises(UsageError, match="does not fit the encoder"):
        rsseg.create_model("unet-r18", 6, 3, encoder_weights=str(path))
    with pytest.raises(UsageError, match="not found"):
        rsseg.create_model("unet-r18", 6, 3, encoder_weights=str(tmp_path / "absent.pth"))


def test_hub_weights_offline_give_a_clear_error() -> None:
    code = "import rsseg; rsseg.create_model('unet-r18', 6, 3, encoder_weights='imagenet')"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode != 0
    assert "could not fetch 'imagenet' weights for encoder resnet18" in result.stderr
    assert "encoder_weights=/path/to/resnet18.pth" in result.stderr


def test_model_info_names_the_paper() -> None:
    assert "U-Net" in model_info("unet-r50").paper


def test_every_model_file_imports() -> None:
    from rsseg.models.registry import import_failures

    assert import_failures() == {}
