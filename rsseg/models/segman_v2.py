"""SegMAN-V2 (Lou, Fu, Yu: "A2Mamba: Attention-augmented State Space Models for Visual
Recognition", section 3.5, Fig. 4, Tables VII and XIII): the A2Mamba backbone
(:mod:`rsseg.models.a2mamba`) with the SegMAN-V2 decoder.

Decoder (section 3.5):
1. stages 2-4 projected by 1x1 convs, upsampled to 1/8, concatenated and fused by a 1x1 conv: F;
2. three operators on F, concatenated: global average pooling (image context), identity, and
   MM-Refine (progressive downsampling to 1/32 in three branches F1, F2, F3, a MASS block with
   global attention, bilinear upsampling, plus a 5x5 dilated-RepConv local embedding of F);
3. a 1x1 conv ("linear") and bilinear upsampling to 1/4: F_h;
4. low-level enhancement: stage 1 projected to C_l, concatenated with F_h, fused by a 1x1 conv;
5. classifier, upsampled to the input size.
Widths the paper does not give (projection, decoder and low-level channels, MM-Refine heads) are
chosen per size so that the parameter counts with 150 classes match Table VII (see the docs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsseg.models.a2mamba import A2MAMBA_SIZES, A2Mamba, A2MambaSize, PaperA2MambaBlock, init_weights
from rsseg.models.checkpoints import CheckpointError, adapt_stem, load_state_strict, read_state_dict
from rsseg.models.registry import register_model

PAPER = "A2Mamba / SegMAN-V2 (Lou, Fu, Yu 2025)"


@dataclass(frozen=True)
class DecoderWidths:
    """Decoder channels: stage projections, decoder width C, low-level C_l, MM-Refine heads."""

    proj: int
    dim: int
    low: int
    refine_heads: int


def _conv_bn_relu(cin: int, cout: int, kernel: int = 1, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _pad_to_even(x: Tensor) -> Tensor:
    """Zero-pad bottom/right so that pixel_unshuffle(2) applies to odd-sized maps."""
    h, w = x.shape[-2:]
    return F.pad(x, (0, w % 2, 0, h % 2))


class DilatedRepConv(nn.Module):
    """Training-time form of a 5x5 dilated RepConv (UniRepLKNet): a depthwise 5x5 conv and a
    parallel depthwise 3x3 conv with dilation 2 (same 5x5 footprint), each with BN, summed.
    (The branches could be merged into one 5x5 kernel for inference; not done here.)"""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.large = nn.Sequential(nn.Conv2d(dim, dim, 5, padding=2, groups=dim, bias=False), nn.BatchNorm2d(dim))
        self.dilated = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=2, dilation=2, groups=dim, bias=False), nn.BatchNorm2d(dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.large(x) + self.dilated(x)


class MMRefine(nn.Module):
    """MASS-based multi-scale refinement (section 3.5, Table XIII) of F (B, C, H/8, W/8).

    F1 = conv3x3/2(unshuffle(F)); Fi = conv3x3/2(F); F2 = conv3x3/2(Fi); F3 = conv1x1(unshuffle(Fi)),
    all at 1/32; concat -> A2Mamba block with global-attention MASS -> 1x1 conv back to C ->
    bilinear upsampling to 1/8, plus the dilated-RepConv local embedding of F.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.branch1 = _conv_bn_relu(4 * dim, dim, 3, stride=2)
        self.interim = _conv_bn_relu(dim, dim, 3, stride=2)
        self.branch2 = _conv_bn_relu(dim, dim, 3, stride=2)
        self.branch3 = _conv_bn_relu(4 * dim, dim, 1)
        self.context = PaperA2MambaBlock(3 * dim, heads, kernel_size=1, mlp_ratio=2.0, mode="global")
        self.out = _conv_bn_relu(3 * dim, dim, 1)
        self.local = DilatedRepConv(dim)

    def forward(self, f: Tensor) -> Tensor:
        f1 = self.branch1(F.pixel_unshuffle(_pad_to_even(f), 2))
        fi = self.interim(f)
        f2 = self.branch2(fi)
        f3 = self.branch3(F.pixel_unshuffle(_pad_to_even(fi), 2))
        context = self.out(self.context(torch.cat([f1, f2, f3], dim=1)))
        context = F.interpolate(context, size=f.shape[-2:], mode="bilinear", align_corners=False)
        return context + self.local(f)


class SegMANV2Decoder(nn.Module):
    """Section 3.5 decoder: four backbone maps -> logits at 1/4 of the input."""

    def __init__(self, in_dims: tuple[int, int, int, int], widths: DecoderWidths, num_classes: int) -> None:
        super().__init__()
        c = widths.dim
        self.project = nn.ModuleList([nn.Conv2d(d, widths.proj, 1) for d in in_dims[1:]])
        self.fuse = _conv_bn_relu(3 * widths.proj, c)
        # no BN on the 1x1 pooled map: BatchNorm cannot train on one value per channel at batch 1
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c, 1), nn.ReLU(inplace=True))
        self.refine = MMRefine(c, widths.refine_heads)
        self.linear = _conv_bn_relu(3 * c, c)
        self.low = _conv_bn_relu(in_dims[0], widths.low)
        self.low_fuse = _conv_bn_relu(c + widths.low, c)
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = nn.Conv2d(c, num_classes, 1)

    def forward(self, features: list[Tensor]) -> Tensor:
        c1, c2, c3, c4 = features
        size8 = c2.shape[-2:]
        projected = [
            F.interpolate(p(x), size=size8, mode="bilinear", align_corners=False) if i else p(x)
            for i, (p, x) in enumerate(zip(self.project, (c2, c3, c4)))
        ]
        f = self.fuse(torch.cat(projected, dim=1))
        pooled = self.pool(f).expand_as(f)
        f_h = self.linear(torch.cat([pooled, f, self.refine(f)], dim=1))
        f_h = F.interpolate(f_h, size=c1.shape[-2:], mode="bilinear", align_corners=False)
        x = self.low_fuse(torch.cat([f_h, self.low(c1)], dim=1))
        return self.classifier(self.dropout(x))


class SegMANV2(nn.Module):
    """A2Mamba backbone + SegMAN-V2 decoder; ``forward`` returns logits at the input size.

    ``pretrained``: a local A2Mamba checkpoint file (official release or rsseg layout), loaded
    into the backbone by :func:`load_backbone_weights`. ``backbone_variant``: ``"released"``
    (default, the authors' released model; official checkpoints fit it) or ``"paper"``.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        size: A2MambaSize,
        widths: DecoderWidths,
        drop_path_rate: float = 0.0,
        pretrained: str | Path | None = None,
        backbone_variant: str = "released",
    ) -> None:
        super().__init__()
        self.backbone = A2Mamba(size, in_channels, drop_path_rate, backbone_variant)
        self.decoder = SegMANV2Decoder(size.dims, widths, num_classes)
        self.decoder.apply(init_weights)
        if pretrained:
            load_backbone_weights(self.backbone, pretrained)

    def forward(self, x: Tensor) -> Tensor:
        logits = self.decoder(self.backbone(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


# The released classification head (1x1 conv to 1024, BN, SiLU, pooling, 1x1 conv to 1000
# classes): the only tensors of an official checkpoint that the backbone has no use for.
RELEASED_HEAD_KEYS = (
    "classifier.0.weight",
    "classifier.0.bias",
    "classifier.1.weight",
    "classifier.1.bias",
    "classifier.1.running_mean",
    "classifier.1.running_var",
    "classifier.1.num_batches_tracked",
    "classifier.4.weight",
    "classifier.4.bias",
)
STEM_WEIGHT = "patch_embed.0.weight"


def load_backbone_weights(backbone: A2Mamba, path: str | Path) -> None:
    """Load A2Mamba weights from a local file into ``backbone``, strictly.

    Accepts the official ImageNet-1K checkpoints (``a2mamba_{nano,tiny,small,base,large}.pth``,
    plain or under ``"model"`` / ``"state_dict"``), mmseg-style files with ``backbone.``
    prefixes, and rsseg's own backbone state dicts (``.safetensors`` or torch files, read with
    ``weights_only=True``; nothing is downloaded). The released classification head is dropped;
    every other tensor must match the backbone's keys and shapes exactly, or a one-line
    :class:`~rsseg.models.checkpoints.CheckpointError` is raised. An RGB stem is adapted to
    other band counts.
    """
    what = "A2Mamba weights"
    state = {k.removeprefix("backbone."): v for k, v in read_state_dict(path, what=what).items()}
    state = {k: v for k, v in state.items() if k not in RELEASED_HEAD_KEYS}
    stem = state.get(STEM_WEIGHT)
    in_channels = backbone.patch_embed[0].in_channels
    if stem is not None and stem.dim() == 4 and stem.shape[1] == 3 and in_channels != 3:
        state[STEM_WEIGHT] = adapt_stem(stem, in_channels)
    _check_shared_tensors(backbone, state, what=f"{what} {path}")
    load_state_strict(backbone, state, what=f"{what} {path}")


def _check_shared_tensors(module: nn.Module, state: dict[str, Tensor], *, what: str) -> None:
    """Keys that name one tensor of ``module`` (the shared SLA/DLA position table) must hold
    equal values in the file: loading would otherwise keep one and silently drop the other."""
    first_key: dict[int, str] = {}
    for key, tensor in module.state_dict(keep_vars=True).items():
        original = first_key.setdefault(id(tensor), key)
        if original == key or key not in state or original not in state:
            continue
        if state[key].shape == state[original].shape and not torch.equal(state[key], state[original]):
            raise CheckpointError(
                f"{what}: {key} and {original} differ, but they are one shared table in A2Mamba"
            )


# Decoder widths per size, fitted so that parameters with 150 classes match Table VII (Tiny:
# Table XIII, the decoder roadmap on A2Mamba-T, 18 M) with the released backbone.
_VARIANTS: dict[str, tuple[str, DecoderWidths, float, str]] = {
    "segman-v2-n": ("nano", DecoderWidths(proj=152, dim=152, low=32, refine_heads=8), 0.1, "6.6 M"),
    "segman-v2-t": ("tiny", DecoderWidths(proj=160, dim=160, low=48, refine_heads=8), 0.1, "18 M"),
    "segman-v2-s": ("small", DecoderWidths(proj=136, dim=136, low=48, refine_heads=8), 0.1, "32 M"),
    "segman-v2-b": ("base", DecoderWidths(proj=200, dim=200, low=48, refine_heads=12), 0.1, "56 M"),
    "segman-v2-l": ("large", DecoderWidths(proj=320, dim=320, low=64, refine_heads=12), 0.1, "108 M"),
}


def _make_builder(name: str, size_name: str, widths: DecoderWidths, drop_path: float, paper_params: str):
    def build(
        num_classes: int,
        in_channels: int,
        drop_path_rate: float = drop_path,
        pretrained: str | None = None,
        backbone_variant: str = "released",
    ) -> SegMANV2:
        return SegMANV2(
            num_classes, in_channels, A2MAMBA_SIZES[size_name], widths, drop_path_rate, pretrained, backbone_variant
        )

    build.__name__ = name.replace("-", "_")
    register_model(
        name,
        paper=PAPER,
        description=f"A2Mamba-{size_name[0].upper()} + SegMAN-V2 decoder (paper: {paper_params} params)",
    )(build)
    return build


for _name, (_size, _widths, _dp, _params) in _VARIANTS.items():
    _make_builder(_name, _size, _widths, _dp, _params)
