"""MAFMamba (Li, Yang & Fan): multi-scale adaptive fusion visual Mamba for remote-sensing segmentation.

Module by module, with the paper section each one implements (choices the paper leaves open are
listed with their reasons in ``docs/models/mafmamba.md``):

- ResNet-18 encoder (2.1): timm's ResNet-18, features at strides 4, 8, 16, 32 (64..512 channels).
- AMMB after each stage (2.2): ``MSAF`` fuses all four encoder levels at the stage's size and
  width with pixel-wise weights from coordinate attention, a ``VSSLayer`` adds global context, and
  the stage's own encoder feature is added back.
- MSCAF over stages 1-3 (2.5): efficient cross-attention in both directions for every pair.
- Decoder (2.3, 2.4): GLMamba on the top feature, then for stages 3, 2, 1 an ASF fusion of the MSCAF
  feature with the upsampled decoder feature, followed by GLMamba (stages 3, 2) or UNetFormer's
  Feature Refinement Head (stage 1); UNetFormer's segmentation head; bilinear x4 to input size.

Inputs whose sides are not multiples of 32 are reflect-padded to the next multiple and the logits
are cropped back, so any H x W works. The model has no auxiliary head and no ``compute_loss``: it
trains with rsseg's default Soft-CE + Dice (weights 1:1), which is the paper's loss (2.6).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn

from rsseg.errors import DataError, UsageError, unknown_name
from rsseg.models.layers import (
    CBAM,
    ConvBNReLU,
    EfficientCrossAttention,
    FeatureRefinementHead,
    SegmentationHead,
    SeparableConvBN,
    SeparableConvBNReLU,
    make_attention,
)
from rsseg.models.registry import register_model
from rsseg.models.ssm import VSSLayer

ENCODER_CHANNELS = (64, 128, 256, 512)  # ResNet-18 layer1..layer4
# Table 6's encoder backbones: timm names. The rest of the network takes its widths from the
# backbone's four stages (ResNet-50 256..2048, Swin-T 96..768).
BACKBONES = {
    "resnet18": "resnet18",
    "resnet50": "resnet50",
    "swin_t": "swin_tiny_patch4_window7_224",
}
OUTPUT_STRIDE = 32


def _bilinear_taps(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indexes (i0, i1) and weight of i1 for bilinear resizing without align_corners, as
    F.interpolate computes them (float32 source coordinate, clamped at 0, i1 = i0 + 1 inside)."""
    scale = torch.tensor(n_in / n_out, dtype=torch.float32)
    src = ((torch.arange(n_out, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_min(0)
    i0 = src.long()
    i1 = torch.where(i0 < n_in - 1, i0 + 1, i0)
    return i0, i1, (src - i0).clamp(0, 1)


def _taps_of(x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """x's rows (dim -2) or columns (dim -1) at ``index``: a strided view when the indexes are
    evenly spaced (integer shrink factors, MSAF's case), else a gather."""
    start, step = int(index[0]), int(index[1] - index[0]) if len(index) > 1 else 1
    stop = start + step * len(index)
    if step > 0 and torch.equal(index, torch.arange(start, stop, step)):
        return x[..., start:stop:step, :] if dim == -2 else x[..., start:stop:step]
    return x.index_select(dim, index)


def _bilinear_down(x: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """F.interpolate(x, size, mode="bilinear", align_corners=False) for a shrinking ``size``.

    Bilinear resizing (no antialias) reads two rows and two columns per output pixel; this takes
    only those. On the CPU, F.interpolate first copies a whole NCHW map to channels-last, and
    MSAF shrinks large maps (e.g. 512 x 128 x 128 to 16 x 16 at 512 px): that copy was ~10 % of
    MAFMamba's non-scan forward time. Same weights as F.interpolate (rounding may differ in the
    last bit).
    """
    (r0, r1, wr), (c0, c1, wc) = (_bilinear_taps(n, m) for n, m in zip(x.shape[-2:], size))
    wr, wc = wr.to(x.dtype), wc.to(x.dtype)
    rows = torch.lerp(_taps_of(x, -2, r0), _taps_of(x, -2, r1), wr[:, None])
    return torch.lerp(_taps_of(rows, -1, c0), _taps_of(rows, -1, c1), wc)


def _channels_last_vss(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run a channels-last VSSLayer on a (B, C, H, W) tensor.

    The input is made contiguous channels-last first: the first block's LayerNorm and residual
    add on the permuted view ran at about half speed (same values either way)."""
    return layer(x.permute(0, 2, 3, 1).contiguous()).permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------------------------------
# Encoder side (section 2.2)


class MSAF(nn.Module):
    """Multi-Scale Adaptive Fusion for one encoder stage (section 2.2.1).

    1. Scale unification: finer levels 1x1 conv then bilinear down; the same level 1x1 conv;
       coarser levels a stride-2 3x3 conv then bilinear up (as the paper describes).
    2. Per level a depthwise-separable conv (3x3 depthwise, pointwise straight to
       ``weight_channels``) + BN + ReLU, then a 1x1 conv: the "negligible overhead" weight branch.
    3. The concatenated weight features go through an attention block (coordinate attention in
       the paper; SE / CBAM for Table 5) and a 1x1 conv to one logit per level; softmax over levels
       gives pixel-wise fusion weights.
    4. Weighted sum of the aligned levels, then a 3x3 conv-BN-ReLU.
    """

    def __init__(
        self,
        level: int,
        in_channels: Sequence[int],
        weight_channels: int = 16,
        attention: str = "ca",
    ) -> None:
        super().__init__()
        self.level = level
        out_ch = in_channels[level]
        self.align = nn.ModuleList()
        for j, ch in enumerate(in_channels):
            if j > level:  # coarser: strided conv, upsampled afterwards
                self.align.append(ConvBNReLU(ch, out_ch, 3, stride=2))
            else:  # finer (downsampled afterwards) or the stage's own level
                self.align.append(ConvBNReLU(ch, out_ch, 1))
        self.weight_features = nn.ModuleList(
            nn.Sequential(
                SeparableConvBNReLU(out_ch, weight_channels, 3),
                nn.Conv2d(weight_channels, weight_channels, 1),
            )
            for _ in in_channels
        )
        n_levels = len(in_channels)
        self.attention = make_attention(attention, weight_channels * n_levels)
        self.to_weights = nn.Conv2d(weight_channels * n_levels, n_levels, 1)
        self.fuse = ConvBNReLU(out_ch, out_ch, 3)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        size = features[self.level].shape[-2:]
        aligned = []
        for j, (feat, align) in enumerate(zip(features, self.align)):
            y = align(feat)
            if y.shape[-2] > size[0] and y.shape[-1] > size[1]:  # a finer level, shrunk
                y = _bilinear_down(y, size)
            elif y.shape[-2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            aligned.append(y)
        weight_feats = torch.cat([wf(a) for wf, a in zip(self.weight_features, aligned)], dim=1)
        weights = self.to_weights(self.attention(weight_feats)).softmax(dim=1)  # (B, levels, H, W)
        fused = sum(weights[:, j : j + 1] * a for j, a in enumerate(aligned))
        return self.fuse(fused)


class AMMB(nn.Module):
    """Adaptive Multi-scale Mamba Block: MSAF -> VSSLayer, plus the stage's encoder feature."""

    def __init__(
        self,
        level: int,
        in_channels: Sequence[int],
        depth: int,
        d_state: int,
        drop_path: float,
        attention: str,
        weight_channels: int,
    ) -> None:
        super().__init__()
        self.level = level
        self.msaf = MSAF(level, in_channels, weight_channels, attention)
        self.vss = VSSLayer(in_channels[level], depth, drop_path=drop_path, d_state=d_state)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return _channels_last_vss(self.vss, self.msaf(features)) + features[self.level]


class MSCAF(nn.Module):
    """Multi-Scale Cross-Attention Fusion over encoder stages 1-3 (section 2.5).

    For every ordered pair (i, j), i != j, scale i queries scale j with efficient cross-attention
    (key/value width = C_i / reduction). Each scale is concatenated with its attention results and
    fused back to its own width by a 1x1 conv-BN-ReLU.
    """

    def __init__(self, channels: Sequence[int], reduction: int = 2) -> None:
        super().__init__()
        self.n = len(channels)
        self.attn = nn.ModuleDict()
        for i, ci in enumerate(channels):
            inner = max(ci // reduction, 1)
            for j, cj in enumerate(channels):
                if i != j:
                    self.attn[f"{i}_{j}"] = EfficientCrossAttention(ci, cj, inner, inner)
        self.fuse = nn.ModuleList(
            ConvBNReLU(ci + (self.n - 1) * max(ci // reduction, 1), ci, 1) for ci in channels
        )

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for i, fi in enumerate(features):
            parts = [fi] + [self.attn[f"{i}_{j}"](fi, fj) for j, fj in enumerate(features) if j != i]
            out.append(self.fuse[i](torch.cat(parts, dim=1)))
        return out


# --------------------------------------------------------------------------------------------------
# Decoder side (sections 2.3, 2.4)


class GLMamba(nn.Module):
    """Global-Local Mamba block (section 2.3).

    Local: 1x1 bottleneck expanding to ``expansion`` x C, then a dilated pyramid (3x3, rates
    1, 2, 3, 6, each BN + ReLU), concatenated and fused by a 1x1 conv. Global: VSSLayer.
    Fusion: GAP of the concatenated branches -> two 1x1 convs -> softmax over 2 per-sample weights;
    weighted sum; CBAM-style channel-then-spatial attention; depthwise-separable conv + BN;
    residual from the block input (as UNetFormer's decoder blocks).
    """

    def __init__(
        self,
        channels: int,
        depth: int = 1,
        d_state: int = 16,
        drop_path: float = 0.0,
        expansion: int = 2,
        rates: Sequence[int] = (1, 2, 3, 6),
    ) -> None:
        super().__init__()
        wide = channels * expansion
        self.bottleneck = ConvBNReLU(channels, wide, 1)
        self.pyramid = nn.ModuleList(ConvBNReLU(wide, channels, 3, dilation=r) for r in rates)
        self.local_fuse = nn.Conv2d(channels * len(rates), channels, 1)
        self.global_branch = VSSLayer(channels, depth, drop_path=drop_path, d_state=d_state)
        hidden = max(2 * channels // 16, 4)
        self.branch_weights = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(2 * channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 2, 1),
        )
        self.attention = CBAM(channels)
        self.proj = SeparableConvBN(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = self.bottleneck(x)
        local = self.local_fuse(torch.cat([conv(wide) for conv in self.pyramid], dim=1))
        glob = _channels_last_vss(self.global_branch, x)
        weights = self.branch_weights(torch.cat([local, glob], dim=1)).softmax(dim=1)  # (B, 2, 1, 1)
        fused = weights[:, 0:1] * local + weights[:, 1:2] * glob
        return x + self.proj(self.attention(fused))


class ASF(nn.Module):
    """Adaptive Scale Fusion (section 2.4).

    The skip feature (from MSCAF) is brought to the decoder width by a 1x1 conv; the decoder
    feature is upsampled to the skip's size. From their concatenation a 3x3 conv-BN-ReLU and a 1x1
    conv give two maps, softmax-normalised per pixel, that weight the two; a 3x3 conv-BN-ReLU
    refines the sum. With ``adaptive=False`` (the "w/o ASF" ablation) the two are simply added.
    """

    def __init__(self, skip_channels: int, channels: int, adaptive: bool = True) -> None:
        super().__init__()
        self.skip_proj = ConvBNReLU(skip_channels, channels, 1)
        self.weight_net = (
            nn.Sequential(ConvBNReLU(2 * channels, channels, 3), nn.Conv2d(channels, 2, 1))
            if adaptive
            else None
        )
        self.refine = ConvBNReLU(channels, channels, 3)

    def forward(self, skip: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        high = self.skip_proj(skip)
        low = F.interpolate(low, size=high.shape[-2:], mode="bilinear", align_corners=False)
        if self.weight_net is None:
            return self.refine(low + high)
        w = self.weight_net(torch.cat([low, high], dim=1)).softmax(dim=1)
        return self.refine(w[:, 0:1] * low + w[:, 1:2] * high)


# --------------------------------------------------------------------------------------------------
# The network


def _load_backbone_weights(encoder: nn.Module, pretrained: Any, in_channels: int, kind: str) -> None:
    """Load ImageNet ResNet weights from a local file (torchvision / timm key names), strictly."""
    from rsseg.models.checkpoints import adapt_stem, check_state_fits, read_state_dict

    looks_like_hub_name = isinstance(pretrained, str) and not Path(pretrained).suffix
    if pretrained is True or (looks_like_hub_name and not Path(pretrained).exists()):
        raise UsageError(
            f"MAFMamba never downloads weights; set 'pretrained' to a local {kind} file "
            f"(.pth or .safetensors; `rsseg weights mafmamba` says where to get it), got {pretrained!r}"
        )
    state = read_state_dict(pretrained, what=f"{kind} weights")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # the classifier
    if "conv1.weight" in state:
        state["conv1.weight"] = adapt_stem(state["conv1.weight"], in_channels)
    try:
        check_state_fits(encoder.state_dict(), state, what=f"{pretrained} as {kind} weights")
    except DataError as exc:
        raise DataError(f"{exc} (is it a {kind} state dict?)") from None
    nn.Module.load_state_dict(encoder, state, strict=True)


def _swin_backbone(in_channels: int, pretrained: Any) -> nn.Module:
    """Swin-T features (Table 6), optionally from a local ImageNet file (timm's or Microsoft's
    layout), loaded strictly: timm's own loader is lenient for feature extractors."""
    from timm.models.swin_transformer import checkpoint_filter_fn

    from rsseg.models.checkpoints import adapt_stem, check_state_fits, read_state_dict

    options = dict(in_chans=in_channels, strict_img_size=False)  # any input size: windows pad
    features = timm.create_model(BACKBONES["swin_t"], features_only=True, out_indices=(0, 1, 2, 3),
                                 pretrained=False, **options)
    if not pretrained:
        return features
    full = timm.create_model(BACKBONES["swin_t"], pretrained=False, **options)
    state = checkpoint_filter_fn(read_state_dict(pretrained, what="Swin-T weights"), full)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}  # the classifier
    if "patch_embed.proj.weight" in state:
        state["patch_embed.proj.weight"] = adapt_stem(state["patch_embed.proj.weight"], in_channels)
    own = {k: v for k, v in full.state_dict().items() if not k.startswith("head.")}
    # Index tables and masks are rebuilt from the window size, never taken from a file.
    rebuilt = [k for k in own if k.endswith(("relative_position_index", "attn_mask"))]
    state = {k: v for k, v in state.items() if k not in rebuilt}
    check_state_fits(own, state, what=f"{pretrained} as Swin-T weights", optional=rebuilt)
    nn.Module.load_state_dict(full, state, strict=False)
    renamed = {k.replace("layers.", "layers_", 1): v for k, v in full.state_dict().items()}
    features.load_state_dict({k: renamed[k] for k in features.state_dict()}, strict=True)
    return features


class ProjectedFeatures(nn.Module):
    """A backbone whose four stages are projected (1x1 conv + BN + ReLU) to other widths.

    Used for Table 6's ResNet-50: the paper says Swin-T (71.82 M) is the largest of its three
    encoders, which ResNet-50 at its native widths (256..2048) would not be (269 M); projected to
    ResNet-18's widths it is ~43 M, and its extra cost is the backbone's alone, as the paper's
    "nearly doubles the FLOPs" implies.
    """

    def __init__(self, features: nn.Module, widths: Sequence[int]) -> None:
        super().__init__()
        self.features = features
        self.proj = nn.ModuleList(
            ConvBNReLU(c, w, 1) for c, w in zip(features.feature_info.channels(), widths))
        self.out_channels = tuple(widths)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [p(f) for p, f in zip(self.proj, self.features(x))]


class NHWCToNCHW(nn.Module):
    """Swin's feature maps come channels-last; the rest of MAFMamba is channels-first."""

    def __init__(self, features: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.out_channels = tuple(features.feature_info.channels())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [f.permute(0, 3, 1, 2).contiguous() for f in self.features(x)]


def build_backbone(name: str, in_channels: int, pretrained: Any = None) -> nn.Module:
    """One of Table 6's encoders as a four-stage feature extractor (strides 4, 8, 16, 32)."""
    if name not in BACKBONES:
        raise unknown_name("MAFMamba backbone", name, list(BACKBONES))
    if name == "swin_t":
        return NHWCToNCHW(_swin_backbone(in_channels, pretrained))
    encoder = timm.create_model(BACKBONES[name], features_only=True, out_indices=(1, 2, 3, 4),
                                pretrained=False, in_chans=in_channels)
    if pretrained:
        _load_backbone_weights(encoder, pretrained, in_channels, {"resnet18": "ResNet-18",
                                                                   "resnet50": "ResNet-50"}[name])
    if name == "resnet50":
        return ProjectedFeatures(encoder, ENCODER_CHANNELS)
    encoder.out_channels = tuple(encoder.feature_info.channels())
    return encoder


class MAFMamba(nn.Module):
    """MAFMamba network; see the module docstring. Switches reproduce Tables 4 and 5."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        *,
        pretrained: str | None = None,
        backbone: str = "resnet18",
        encoder_vss_depths: Sequence[int] = (2, 2, 9, 2),
        decoder_channels: int = 64,
        decoder_vss_depth: int = 1,
        d_state: int = 16,
        drop_path: float = 0.1,
        msaf_attention: str = "ca",
        msaf_weight_channels: int = 16,
        mscaf_reduction: int = 2,
        glmamba_expansion: int = 2,
        head_dropout: float = 0.1,
        use_ammb: bool = True,
        use_glmamba: bool = True,
        use_mscaf: bool = True,
        use_asf: bool = True,
    ) -> None:
        super().__init__()
        if msaf_attention not in ("ca", "se", "cbam"):
            raise unknown_name("MSAF attention", msaf_attention, ["ca", "se", "cbam"])
        if len(encoder_vss_depths) != 4:
            raise UsageError(f"encoder_vss_depths needs 4 values, got {list(encoder_vss_depths)}")
        # Kept for the trainer: the backbone is fine-tuned at a reduced learning rate (3.1).
        self.backbone = build_backbone(backbone, in_channels, pretrained)
        ch = self.backbone.out_channels
        self.ammb = (
            nn.ModuleList(
                AMMB(i, ch, encoder_vss_depths[i], d_state, drop_path, msaf_attention,
                     msaf_weight_channels)
                for i in range(4)
            )
            if use_ammb
            else None
        )
        self.mscaf = MSCAF(ch[:3], mscaf_reduction) if use_mscaf else None

        d = decoder_channels

        def decoder_block() -> nn.Module:
            if use_glmamba:
                return GLMamba(d, decoder_vss_depth, d_state, drop_path, glmamba_expansion)
            return ConvBNReLU(d, d, 3)  # "w/o GLMamba": a plain conv stage

        self.top_proj = ConvBNReLU(ch[3], d, 1)
        self.block4 = decoder_block()
        self.asf3 = ASF(ch[2], d, use_asf)
        self.block3 = decoder_block()
        self.asf2 = ASF(ch[1], d, use_asf)
        self.block2 = decoder_block()
        self.asf1 = ASF(ch[0], d, use_asf)
        self.frh = FeatureRefinementHead(d)
        self.head = SegmentationHead(d, num_classes, head_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = _pad_to_multiple(x, OUTPUT_STRIDE)
        feats = self.backbone(x)
        if self.ammb is not None:
            feats = [block(feats) for block in self.ammb]
        skips = self.mscaf(feats[:3]) if self.mscaf is not None else feats[:3]
        y = self.block4(self.top_proj(feats[3]))
        y = self.block3(self.asf3(skips[2], y))
        y = self.block2(self.asf2(skips[1], y))
        y = self.frh(self.asf1(skips[0], y))
        logits = self.head(y)
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., :h, :w]


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad bottom/right to a multiple of ``multiple`` (reflect; replicate when too small)."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


# Presets: "paper" is the published network; "tiny" trains in minutes on a laptop CPU (rsseg demo).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "tiny": {
        "encoder_vss_depths": (1, 1, 1, 1),
        "decoder_channels": 32,
        "d_state": 8,
        "drop_path": 0.0,
    },
}


def _build(num_classes: int, in_channels: int, preset: str = "paper", **cfg: Any) -> MAFMamba:
    if preset not in PRESETS:
        raise unknown_name("MAFMamba preset", preset, list(PRESETS))
    return MAFMamba(num_classes, in_channels, **{**PRESETS[preset], **cfg})


@register_model(
    "mafmamba",
    paper="Li, Yang & Fan, MAFMamba: A Multi-Scale Adaptive Fusion Network for Semantic "
    "Segmentation of High-Resolution Remote Sensing Images (2025)",
    description="ResNet-18 + AMMB (MSAF + VSSLayer) encoder, MSCAF skips, ASF/GLMamba decoder, FRH",
)
def build_mafmamba(num_classes: int, in_channels: int = 3, **cfg: Any) -> MAFMamba:
    """MAFMamba; ``preset="tiny"`` for the CPU demo size, other keys as :class:`MAFMamba`."""
    return _build(num_classes, in_channels, **cfg)


@register_model(
    "mafmamba-tiny",
    paper="Li, Yang & Fan, MAFMamba (2025); reduced depths/widths for CPU demos",
    description="MAFMamba with one VSS block per stage and a 32-wide decoder (trains on a CPU)",
    default_cfg={"preset": "tiny"},
)
def build_mafmamba_tiny(num_classes: int, in_channels: int = 3, **cfg: Any) -> MAFMamba:
    """MAFMamba's ``tiny`` preset under its own name, for ``rsseg demo`` candidates."""
    return _build(num_classes, in_channels, **cfg)
