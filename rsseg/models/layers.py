"""Shared building blocks for the segmentation networks in :mod:`rsseg.models`.

Each block is written from its paper (cited in its docstring). They are hand-written because no
library we depend on ships them as standalone modules (timm has SE/CBAM variants with different
conventions and no coordinate attention with a spatial output; smp's attention blocks are private).
Every block here is channels-first: (B, C, H, W) -> (B, C', H, W) unless its docstring says otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------------------
# Convolution shorthands (UNetFormer / GeoSeg style: conv without bias when a BatchNorm follows).


class ConvBN(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, dilation: int = 1
    ) -> None:
        padding = dilation * (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_ch),
        )


class ConvBNReLU(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d + ReLU."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, dilation: int = 1
    ) -> None:
        super().__init__(*ConvBN(in_ch, out_ch, kernel_size, stride, dilation), nn.ReLU(inplace=True))


class SeparableConvBN(nn.Sequential):
    """Depthwise-separable conv: depthwise k x k, pointwise 1x1, then BatchNorm2d."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, dilation: int = 1) -> None:
        padding = dilation * (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_ch, in_ch, kernel_size, padding=padding, dilation=dilation, groups=in_ch,
                      bias=False),
            nn.Conv2d(in_ch, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        )


class SeparableConvBNReLU(nn.Sequential):
    """Depthwise-separable conv + BatchNorm2d + ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, dilation: int = 1) -> None:
        super().__init__(*SeparableConvBN(in_ch, out_ch, kernel_size, dilation), nn.ReLU(inplace=True))


# --------------------------------------------------------------------------------------------------
# Attention blocks. All return the input recalibrated (same shape) unless noted.


class SqueezeExcitation(nn.Module):
    """Squeeze-and-Excitation (Hu et al., CVPR 2018): GAP -> FC/r -> ReLU -> FC -> sigmoid gate."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class ChannelAttention(nn.Module):
    """CBAM channel attention (Woo et al., ECCV 2018): shared MLP on avg- and max-pooled vectors."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.mlp(F.adaptive_avg_pool2d(x, 1))
        mx = self.mlp(F.adaptive_max_pool2d(x, 1))
        return x * torch.sigmoid(avg + mx)


class SpatialAttention(nn.Module):
    """CBAM spatial attention: k x k conv over the channel-wise mean and max maps."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(pooled))


class CBAM(nn.Sequential):
    """Convolutional Block Attention Module: channel attention, then spatial attention."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7) -> None:
        super().__init__(ChannelAttention(channels, reduction), SpatialAttention(kernel_size))


class CoordinateAttention(nn.Module):
    """Coordinate attention (Hou et al., CVPR 2021).

    Pools along W and along H separately, so the gates keep one spatial axis each; the product of
    the row gate and the column gate is a per-pixel, per-channel weight.
    """

    def __init__(self, channels: int, reduction: int = 32, min_hidden: int = 8) -> None:
        super().__init__()
        hidden = max(min_hidden, channels // reduction)
        self.squeeze = nn.Sequential(
            nn.Conv2d(channels, hidden, 1),
            nn.BatchNorm2d(hidden),
            nn.Hardswish(inplace=True),
        )
        self.gate_h = nn.Conv2d(hidden, channels, 1)
        self.gate_w = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        pooled_h = x.mean(dim=3, keepdim=True)  # (B, C, H, 1)
        pooled_w = x.mean(dim=2, keepdim=True).transpose(2, 3)  # (B, C, W, 1)
        y = self.squeeze(torch.cat([pooled_h, pooled_w], dim=2))
        y_h, y_w = torch.split(y, [h, w], dim=2)
        gate_h = torch.sigmoid(self.gate_h(y_h))  # (B, C, H, 1)
        gate_w = torch.sigmoid(self.gate_w(y_w.transpose(2, 3)))  # (B, C, 1, W)
        return x * gate_h * gate_w


def make_attention(kind: str, channels: int) -> nn.Module:
    """Attention block by name: "ca" (coordinate), "se", "cbam" or "none" (identity)."""
    if kind == "ca":
        return CoordinateAttention(channels)
    if kind == "se":
        return SqueezeExcitation(channels)
    if kind == "cbam":
        return CBAM(channels)
    if kind == "none":
        return nn.Identity()
    from rsseg.errors import unknown_name

    raise unknown_name("attention", kind, ["ca", "se", "cbam", "none"])


class EfficientCrossAttention(nn.Module):
    """Efficient attention (Shen et al., WACV 2021) with queries and keys/values from two maps.

    Keys are softmax-normalised over positions, queries over channels, so the context is a
    (key_ch x value_ch) matrix and the cost is linear in both maps' pixel counts. The two maps may
    differ in size and width. Output: (B, value_ch, H_q, W_q), without re-projection.
    """

    def __init__(self, query_in: int, context_in: int, key_ch: int, value_ch: int) -> None:
        super().__init__()
        self.to_q = nn.Conv2d(query_in, key_ch, 1)
        self.to_k = nn.Conv2d(context_in, key_ch, 1)
        self.to_v = nn.Conv2d(context_in, value_ch, 1)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, _, h, w = query.shape
        q = self.to_q(query).flatten(2).softmax(dim=1)  # (B, dk, Nq): over channels
        k = self.to_k(context).flatten(2).softmax(dim=2)  # (B, dk, Nc): over positions
        v = self.to_v(context).flatten(2)  # (B, dv, Nc)
        summary = torch.bmm(k, v.transpose(1, 2))  # (B, dk, dv): one global summary per key
        out = torch.bmm(summary.transpose(1, 2), q)  # (B, dv, Nq)
        return out.reshape(b, -1, h, w)


# --------------------------------------------------------------------------------------------------
# UNetFormer's decoder pieces (Wang et al., ISPRS J. 2022).


class FeatureRefinementHead(nn.Module):
    """UNetFormer's Feature Refinement Head (FRH).

    Optionally fuses a skip feature ``res`` with the upsampled decoder feature by two learned,
    ReLU-normalised scalar weights (UNetFormer's weighted sum); then a 3x3 conv, a spatial
    (pixel) attention path and a channel attention path added together, a separable conv
    projection and a 1x1 shortcut. Called without ``res`` it only refines ``x`` (same size).
    """

    def __init__(self, channels: int, skip_channels: int | None = None, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps
        if skip_channels is not None:
            self.pre_conv = nn.Conv2d(skip_channels, channels, 1, bias=False)
            self.fuse_weights = nn.Parameter(torch.ones(2))
        else:
            self.pre_conv = None
        self.post_conv = ConvBNReLU(channels, channels, 3)
        self.pixel_attention = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels), nn.Sigmoid()
        )
        # At least 8 hidden units: the gate's input (GAP after BN + ReLU) is nearly the same vector
        # for every image at initialisation, so with UNetFormer's 64 // 16 = 4 units all of them
        # start negative (and stay dead) in about 1 of 16 initialisations.
        hidden = max(channels // 16, 8)
        self.channel_attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, channels, 1),
            nn.Sigmoid(),
        )
        self.shortcut = ConvBN(channels, channels, 1)
        self.proj = SeparableConvBN(channels, channels, 3)
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor, res: torch.Tensor | None = None) -> torch.Tensor:
        if res is not None:
            if self.pre_conv is None:
                raise ValueError("FeatureRefinementHead built without skip_channels got a skip")
            x = F.interpolate(x, size=res.shape[-2:], mode="bilinear", align_corners=False)
            w = F.relu(self.fuse_weights)
            w = w / (w.sum() + self.eps)
            x = w[0] * self.pre_conv(res) + w[1] * x
        x = self.post_conv(x)
        shortcut = self.shortcut(x)
        x = self.pixel_attention(x) * x + self.channel_attention(x) * x
        return self.act(self.proj(x) + shortcut)


class SegmentationHead(nn.Sequential):
    """UNetFormer's head: 3x3 ConvBNReLU, dropout, 1x1 conv to class logits."""

    def __init__(self, channels: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__(
            ConvBNReLU(channels, channels, 3),
            nn.Dropout2d(dropout),
            nn.Conv2d(channels, num_classes, 1),
        )
