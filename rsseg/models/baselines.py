"""segmentation-models-pytorch baselines: U-Net, DeepLabV3+ and FPN on ResNet encoders.

smp builds the networks; this file only names them and handles encoder weights the way rsseg
needs: none by default, a local file when given, and a clear error instead of a hang or a
traceback when hub weights are asked for without network access.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import torch
from torch import nn

from rsseg.errors import UsageError
from rsseg.models.registry import register_model

_ARCHITECTURES: dict[str, tuple[type[nn.Module], str]] = {
    "unet": (smp.Unet, "U-Net (Ronneberger et al., MICCAI 2015), smp implementation"),
    "deeplabv3plus": (smp.DeepLabV3Plus, "DeepLabV3+ (Chen et al., ECCV 2018), smp implementation"),
    "fpn": (smp.FPN, "FPN (Kirillov et al., panoptic FPN head), smp implementation"),
}
_ENCODERS = {"r18": "resnet18", "r50": "resnet50"}


def _load_state_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a weights file without unpickling arbitrary objects."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UsageError(f"encoder weights file {path} does not hold a state dict")
    return state


def _adapt_first_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """RGB stem weights for another band count: cycle the RGB filters and rescale their sum.

    The same rule smp applies to its hub weights, so a local file behaves like a download.
    """
    if weight.shape[1] == in_channels:
        return weight
    repeats = [weight[:, i % weight.shape[1]] for i in range(in_channels)]
    return torch.stack(repeats, dim=1) * (weight.shape[1] / in_channels)


def load_encoder_weights(encoder: nn.Module, path: str | Path, in_channels: int) -> None:
    """Load a local ImageNet (or other) encoder checkpoint into an smp encoder, strictly.

    Classifier keys (``fc.*``) that an encoder does not have are dropped; anything else that does
    not match is an error, so a wrong file is never half-loaded silently.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"encoder weights file not found: {path}")
    state = {k.removeprefix("module."): v for k, v in _load_state_file(path).items()}
    own = encoder.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.startswith("fc.")}
    if "conv1.weight" in state:
        state["conv1.weight"] = _adapt_first_conv(state["conv1.weight"], in_channels)
    # Checked here rather than by load_state_dict: smp's encoders override it and drop keys.
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        example = (mismatched + missing + unexpected)[0]
        raise UsageError(
            f"encoder weights file {path} does not fit the encoder ({len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(mismatched)} mis-shaped keys, e.g. {example!r})"
        )
    nn.Module.load_state_dict(encoder, state, strict=True)


def build_smp(
    arch: str,
    encoder: str,
    num_classes: int,
    in_channels: int,
    encoder_weights: str | None = None,
    **smp_kwargs: Any,
) -> nn.Module:
    """An smp network; ``encoder_weights`` is None, a hub name such as "imagenet", or a file path."""
    cls, _ = _ARCHITECTURES[arch]
    # smp's constructors swallow unknown keyword arguments; refuse them so a typo is not ignored.
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    unknown = sorted(set(smp_kwargs) - accepted)
    if unknown:
        raise TypeError(f"unexpected keyword arguments {unknown} for smp.{cls.__name__}")
    is_file = encoder_weights is not None and (
        Path(encoder_weights).suffix in {".pth", ".pt", ".bin", ".safetensors"}
        or Path(encoder_weights).exists()
    )
    hub_weights = None if is_file else encoder_weights
    try:
        model = cls(
            encoder_name=encoder,
            encoder_weights=hub_weights,
            in_channels=in_channels,
            classes=num_classes,
            **smp_kwargs,
        )
    except (OSError, ConnectionError, RuntimeError) as exc:
        if hub_weights is None:
            raise
        raise UsageError(
            f"could not fetch {hub_weights!r} weights for encoder {encoder} ({type(exc).__name__}); "
            f"without network access pass a local file: encoder_weights=/path/to/{encoder}.pth"
        ) from exc
    if is_file:
        load_encoder_weights(model.encoder, encoder_weights, in_channels)
    return model


def _register(arch: str, short: str) -> None:
    encoder = _ENCODERS[short]
    paper = _ARCHITECTURES[arch][1]

    @register_model(
        f"{arch}-{short}",
        paper=paper,
        description=f"{arch} with a {encoder} encoder (segmentation-models-pytorch)",
    )
    def build(
        num_classes: int, in_channels: int, encoder_weights: str | None = None, **smp_kwargs: Any
    ) -> nn.Module:
        return build_smp(arch, encoder, num_classes, in_channels, encoder_weights, **smp_kwargs)


for _arch in _ARCHITECTURES:
    for _short in _ENCODERS:
        _register(_arch, _short)
