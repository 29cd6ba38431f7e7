"""Reload-Mamba: hierarchical anti-dilution state-space segmentation, with its training objective.

Paper: S.-W. Chan, H.-J. Pan, J.-S. Chiang, "Reload-Mamba: Hierarchical Anti-Dilution State-Space
Modeling for Multi-Class Semantic Segmentation" (text: shared/papers/reload-mamba.txt). Section
and equation numbers below are the paper's. The extracted text lost most equations and several
values; every choice made where the paper is silent is listed in docs/models/reload-mamba.md.

Data flow (Fig. 3): ConvNeXt-Tiny encoder -> U-shaped decoder giving D3 (1/16), D2 (1/8),
D1 (1/4) -> at each level a ReloadLevel (boundary-supervised prior, detail-aware feature, four
directional Mamba scans fused by pixel-wise directional attention, pre-reload auxiliary head and
its class entropy, bounded Reload Gate) -> top-down fusion of the restored levels -> upsampling,
concatenation with the Sobel edge prior, detail fusion, noise gate, segmentation head.
"""

from __future__ import annotations

import math
import re
from typing import Any

import timm
import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import LovaszLoss
from torch import nn

from rsseg.errors import UsageError
from timm.models.convnext import checkpoint_filter_fn as convnext_checkpoint_filter

from rsseg.models.checkpoints import (
    CheckpointError,
    adapt_stem,
    check_state_fits,
    load_state_strict,
    read_state_dict,
)
from rsseg.models.layers import ConvBNReLU, SeparableConvBNReLU
from rsseg.models.registry import register_model
from rsseg.models.ssm import DIRECTIONS, FourDirectionMamba

# ConvNeXt-Tiny stage widths (Eq. 1) and the decoder widths that follow them (Eqs. 2-4).
ENCODER_CHANNELS = (96, 192, 384, 768)
# Reduced per-level widths of the Mamba scans at (D3, D2, D1): Section 3.5 and Table 14.
LEVEL_WIDTHS = (192, 128, 96)
# Hidden width of each auxiliary head, as a share of its level's decoder width, and width of the
# head's refinement at 1/4 resolution: sized to the paper's Section 4.5 groups (1.5 M, 2.5 M).
AUX_HIDDEN_RATIO = 0.75
HEAD_NECK_CHANNELS = 464
# Total downsampling of the encoder: inputs must be at least this large on each side.
MIN_INPUT_SIZE = 32


# --------------------------------------------------------------------------------------------------
# Label-derived targets shared by the network's supervision (Sections 3.3 and 3.8).


def boundary_mask(target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Eq. (8)/(32): 1 where a valid pixel's 3x3 neighbourhood holds more than one class.

    ``target`` is (B, H, W) integer labels; returns a bool (B, H, W) mask. Ignored pixels are
    never boundaries and do not make their neighbours boundaries (an ignore region is "no label",
    not another class); outside the image counts as no neighbour.
    """
    valid = target != ignore_index
    labels = target.float().unsqueeze(1)
    # Max and min label over the valid 3x3 neighbourhood; they differ iff two classes meet.
    # (Hand-written with max-pooling: no library we depend on computes this mask.)
    outside = torch.tensor(float("-inf"), device=target.device)
    highest = F.max_pool2d(torch.where(valid.unsqueeze(1), labels, outside), 3, 1, 1)
    lowest = -F.max_pool2d(torch.where(valid.unsqueeze(1), -labels, outside), 3, 1, 1)
    return valid & (highest != lowest).squeeze(1)


def normalized_class_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Eq. (16): per-pixel class entropy / log K, in [0, 1]; (B, K, H, W) -> (B, 1, H, W)."""
    num_classes = logits.shape[1]
    if num_classes < 2:  # one class carries no uncertainty (and log 1 = 0)
        return logits.new_zeros(logits.shape[0], 1, *logits.shape[2:])
    log_p = F.log_softmax(logits, dim=1)
    entropy = -(log_p.exp() * log_p).sum(dim=1, keepdim=True)
    return entropy / math.log(num_classes)


# --------------------------------------------------------------------------------------------------
# Network parts.


class SobelEdgePrior(nn.Module):
    """Section 3.2, Eqs. (5)-(6): [I, |G_x * I|, |G_y * I|] per band -> convolutional projection."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        gx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
        kernels = torch.stack([gx, gx.t()]).unsqueeze(1).repeat(in_channels, 1, 1, 1)
        # Fixed operators, not parameters: buffers travel with the weights but are not trained.
        self.register_buffer("sobel", kernels, persistent=False)
        self.in_channels = in_channels
        self.project = nn.Sequential(
            ConvBNReLU(3 * in_channels, out_channels, 3), ConvBNReLU(out_channels, out_channels, 3)
        )

    def gradients(self, image: torch.Tensor) -> torch.Tensor:
        """|G_x|, |G_y| of every band, (B, 2*C, H, W) ordered (band0 x, band0 y, band1 x, ...)."""
        # Replicate padding: zero padding would invent edges along the image border.
        padded = F.pad(image, (1, 1, 1, 1), mode="replicate")
        return F.conv2d(padded, self.sobel.to(image.dtype), groups=self.in_channels).abs()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([image, self.gradients(image)], dim=1))


class UNetDecoder(nn.Module):
    """Section 3.1, Eqs. (2)-(4): D_i = R(Concat(Up(D_{i+1}), E_i)), Up a 2x2 transposed conv.

    Decoder widths follow the encoder (384, 192, 96); R is a 3x3 conv + BN + ReLU.
    """

    def __init__(self, channels: tuple[int, ...] = ENCODER_CHANNELS) -> None:
        super().__init__()
        self.ups = nn.ModuleList()
        self.refines = nn.ModuleList()
        for deep, skip in zip(channels[:0:-1], channels[-2::-1]):  # (768,384) (384,192) (192,96)
            self.ups.append(nn.ConvTranspose2d(deep, skip, kernel_size=2, stride=2))
            self.refines.append(ConvBNReLU(2 * skip, skip, 3))

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Features E1..E4 (fine to coarse) -> decoder levels [D3, D2, D1] (coarse first)."""
        x = features[-1]
        levels = []
        for up, refine, skip in zip(self.ups, self.refines, features[-2::-1]):
            x = up(x)
            if x.shape[-2:] != skip.shape[-2:]:  # odd input sizes: the encoder floored a stage
                x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = refine(torch.cat([x, skip], dim=1))
            levels.append(x)
        return levels


class ReloadLevel(nn.Module):
    """One level of the hierarchical Reload-Mamba module (Sections 3.3-3.5).

    Input: decoder feature D (B, C, h, w), C its decoder width. The prior, the auxiliary head and
    the Reload Gate work on D at width C (Eq. 7 takes phi(D); Eq. 17 takes "the original decoder
    feature"); only the Mamba scans and their directional attention run at the reduced ``width``
    (Section 4.4.10: widths "control the parameter overhead from Mamba blocks"), between a 1x1
    reduction and a 1x1 expansion that exist only when ``width != C``.

    Returns the restored feature F_r (B, C, h, w), the auxiliary logits (B, K, h, w) or None, and
    the prior logits (B, 1, h, w) or None. The switches reproduce the ablations (see ReloadMamba).
    """

    def __init__(
        self,
        channels: int,
        width: int,
        num_classes: int,
        *,
        d_state: int = 16,
        low_priority: float = 0.3,
        max_reload: float = 0.7,
        directions: tuple[str, ...] = DIRECTIONS,
        restore: str = "gate",
        detail_prior: bool = True,
        gate_uncertainty: bool = True,
        gate_change: bool = True,
        gate_prior: bool = True,
        aux_head: str | None = "pre",
    ) -> None:
        super().__init__()
        c = channels
        self.low_priority = low_priority
        self.max_reload = max_reload
        self.restore = restore
        self.aux_placement = aux_head
        self.gate_uncertainty = gate_uncertainty
        self.gate_change = gate_change
        self.gate_prior = gate_prior
        # Eq. (7): P = sigmoid(phi(D)); phi = two 3x3 conv blocks (a boundary detector needs some
        # context) and a 1x1 conv to one channel. Absent: no detail-aware weighting (Eq. 10).
        self.prior = (
            nn.Sequential(ConvBNReLU(c, c, 3), ConvBNReLU(c, c, 3), nn.Conv2d(c, 1, 1))
            if detail_prior
            else None
        )
        self.reduce = nn.Conv2d(c, width, 1) if width != c else nn.Identity()
        # Eqs. (11)-(12): separately parameterised Mamba blocks, one per direction, each a pre-norm
        # residual block around its mixer as in Gu & Dao (2023).
        self.scan_norm = nn.LayerNorm(width)
        # Table 8 varies the scan directions: a subset keeps k/4 of the block's parameters.
        self.scans = FourDirectionMamba(width, d_state=d_state, directions=tuple(directions))
        # Eqs. (13)-(14): pixel-wise directional attention. A conv over the concatenated directional
        # outputs (3x3 to ``width``, then 1x1 to one logit per direction and channel), softmax over
        # the directions. One direction needs no attention.
        n = len(directions)
        self.direction_attention = (
            nn.Sequential(ConvBNReLU(n * width, width, 3), nn.Conv2d(width, n * width, 1))
            if n > 1
            else None
        )
        self.expand = nn.Conv2d(width, c, 1) if width != c else nn.Identity()
        # Eq. (15): the lightweight auxiliary head (3x3 block at 3/4 width, 1x1 to classes).
        hidden = max(1, round(AUX_HIDDEN_RATIO * c))
        self.aux_head = (
            nn.Sequential(ConvBNReLU(c, hidden, 3), nn.Conv2d(hidden, num_classes, 1))
            if aux_head is not None
            else None
        )
        # Eq. (17): the gate's convolutional detector over [F, F - F_ctx, U] (switchable inputs).
        gate_in = c + (c if gate_change else 0) + (1 if gate_uncertainty else 0)
        self.gate = (
            nn.Sequential(ConvBNReLU(gate_in, c, 3), nn.Conv2d(c, c, 3, padding=1))
            if restore == "gate"
            else None
        )

    def context(self, detail: torch.Tensor) -> torch.Tensor:
        """F_ctx: reduce, directional Mamba scans, pixel-wise directional attention, expand."""
        x = self.reduce(detail)
        normed = self.scan_norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        directions = x.unsqueeze(1) + self.scans(normed)  # (B, n, C', h, w), residual blocks
        if self.direction_attention is None:
            return self.expand(directions[:, 0])
        b, n, c, h, w = directions.shape
        logits = self.direction_attention(directions.reshape(b, n * c, h, w)).reshape(b, n, c, h, w)
        return self.expand((logits.softmax(dim=1) * directions).sum(dim=1))

    def forward(
        self, feature: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        prior_logits = prior = None
        detail = feature
        if self.prior is not None:
            prior_logits = self.prior(feature)
            prior = torch.sigmoid(prior_logits)
            # Eq. (10): keep detail-sensitive responses, retain a fraction alpha of the rest.
            detail = feature * (prior + self.low_priority * (1.0 - prior))
        context = self.context(detail)

        aux_logits = uncertainty = None
        if self.aux_placement == "pre":
            aux_logits = self.aux_head(context)
            uncertainty = normalized_class_entropy(aux_logits)
        elif self.aux_placement == "post" and self.gate_uncertainty:
            # Table 13's post-reload head sees F_r, which needs U first. One step of the iterative
            # reading: F_r with R = 0 is F_ctx, so U comes from the same head on F_ctx, with
            # stop-gradient (the paper's "avoided via detach").
            with torch.no_grad():
                uncertainty = normalized_class_entropy(self.aux_head(context))

        if self.restore == "context":  # Table 7 "fused context only"
            restored = context
        elif self.restore == "residual":  # Table 7 "naive residual addition"
            restored = feature + context
        else:
            change = feature - context  # what the scans moved away from F
            inputs = [feature]
            if self.gate_change:
                inputs.append(change)
            if self.gate_uncertainty:
                inputs.append(uncertainty)
            gate = torch.sigmoid(self.gate(torch.cat(inputs, dim=1)))
            # Eq. (18): restoration bounded by max_reload and focused where the prior is high.
            reload = self.max_reload * gate
            if self.gate_prior:
                reload = reload * prior
            # Eq. (19): reload the original response where R is large, keep the context elsewhere.
            restored = context + reload * change
        if self.aux_placement == "post":
            aux_logits = self.aux_head(restored)
        return restored, aux_logits, prior_logits


class EdgeGuidedHead(nn.Module):
    """Section 3.7, Eqs. (22)-(27): refine Z1, Up to input size, [Up(Z), E] -> detail fusion ->
    noise gate -> class logits.

    The refinement (``neck``) holds most of the head's ~2.4 M parameters and runs at Z1's 1/4
    resolution: the paper's ~2.5 M for edge branch + head cannot run at full resolution within
    its 215 GFLOPs (2.5 M x 512^2 pixels = 655 G multiply-adds). ``post_level`` is Table 10's
    "after final upsampling" reference: a Reload level applied to Up(Z).
    """

    def __init__(
        self,
        in_channels: int,
        edge_channels: int,
        neck_channels: int,
        channels: int,
        num_classes: int,
        post_level: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.neck = nn.Sequential(
            ConvBNReLU(in_channels, neck_channels, 3),
            ConvBNReLU(neck_channels, neck_channels, 3),
            ConvBNReLU(neck_channels, channels, 1),
        )
        self.post_level = post_level
        # Eq. (24): pointwise mix, depthwise 3x3 for local detail, pointwise again.
        self.detail_fusion = nn.Sequential(
            ConvBNReLU(channels + edge_channels, channels, 1),
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            ConvBNReLU(channels, channels, 1),
        )
        # Eqs. (25)-(26): a per-pixel, per-channel sigmoid gate suppressing noisy activations.
        self.noise_gate = nn.Conv2d(channels, channels, 1)
        # Eq. (27).
        self.classifier = nn.Sequential(
            ConvBNReLU(channels, channels, 3), nn.Conv2d(channels, num_classes, 1)
        )

    def forward(
        self, fused: torch.Tensor, edges: torch.Tensor | None, size: tuple[int, int]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor | None, torch.Tensor | None] | None]:
        """Logits at ``size``, and the post-upsampling level's (aux, prior) logits if it exists."""
        up = F.interpolate(self.neck(fused), size=size, mode="bilinear", align_corners=False)
        extras = None
        if self.post_level is not None:
            up, aux, prior = self.post_level(up)
            extras = (aux, prior)
        detail = self.detail_fusion(up if edges is None else torch.cat([up, edges], dim=1))
        clean = detail * torch.sigmoid(self.noise_gate(detail))
        return self.classifier(clean), extras


# --------------------------------------------------------------------------------------------------
# Training objective (Section 3.8).


def ohem_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int, keep_ratio: float
) -> torch.Tensor:
    """Eqs. (29)-(30): mean cross-entropy over the ``keep_ratio`` hardest valid pixels."""
    losses = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    losses = losses[target != ignore_index]
    if losses.numel() == 0:
        return logits.sum() * 0.0
    keep = max(1, math.ceil(keep_ratio * losses.numel()))
    return losses.topk(keep, sorted=False).values.mean()


def lovasz_softmax(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Eq. (31): Lovasz-Softmax over the classes present in the batch (smp's implementation)."""
    if not bool((target != ignore_index).any()):
        return logits.sum() * 0.0  # smp returns an empty tensor when every pixel is ignored
    # float32: smp's Jaccard-gradient helper is float32 and torch.dot refuses mixed dtypes.
    lovasz = LovaszLoss("multiclass", per_image=False, ignore_index=ignore_index)
    return lovasz(logits.float(), target)


def boundary_weighted_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int, boundary_gain: float
) -> torch.Tensor:
    """Eqs. (32)-(33): CE weighted 1 + gain on boundary pixels, normalised by the weights."""
    losses = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    valid = target != ignore_index
    if not bool(valid.any()):
        return logits.sum() * 0.0
    weights = 1.0 + boundary_gain * boundary_mask(target, ignore_index).to(losses.dtype)
    weights = weights * valid
    return (weights * losses).sum() / weights.sum()


def multilevel_aux_cross_entropy(
    aux_logits: list[torch.Tensor], target: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """Eq. (34): sum over levels of CE against the label map nearest-downsampled to each head.

    Summed, not averaged: Eq. (34) "aggregates" the three heads' CE as the deep-supervision sum
    (the equation itself is lost in our copy; see docs/models/reload-mamba.md).
    """
    terms = []
    for logits in aux_logits:
        small = F.interpolate(target[:, None].float(), size=logits.shape[-2:], mode="nearest")
        small = small[:, 0].long()
        if bool((small != ignore_index).any()):
            terms.append(F.cross_entropy(logits, small, ignore_index=ignore_index))
        else:
            terms.append(logits.sum() * 0.0)
    return torch.stack(terms).sum()


def prior_boundary_bce(
    prior_logits: list[torch.Tensor], target: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """Eqs. (8)-(9): sum over levels of the BCE between each prior and the max-pooled boundary mask.

    Eq. (8) is a mean over the valid pixels of one level; Eq. (9) "aggregates across levels", a sum
    over l (equation lost in our copy). A level pixel is valid when its window holds at least one
    valid label pixel.
    """
    boundary = boundary_mask(target, ignore_index)[:, None].float()
    valid = (target != ignore_index)[:, None].float()
    terms = []
    for logits in prior_logits:
        size = logits.shape[-2:]
        level_boundary = F.adaptive_max_pool2d(boundary, size)
        level_valid = F.adaptive_max_pool2d(valid, size) > 0
        if bool(level_valid.any()):
            terms.append(
                F.binary_cross_entropy_with_logits(logits[level_valid], level_boundary[level_valid])
            )
        else:
            terms.append(logits.sum() * 0.0)
    return torch.stack(terms).sum()


# --------------------------------------------------------------------------------------------------
# The network.

LEVEL_NAMES = ("D3", "D2", "D1")
RESTORE_MODES = ("gate", "context", "residual")
AUX_PLACEMENTS = ("pre", "post", None)
PLACEMENTS = ("decoder", "post_upsampling")


class ReloadMamba(nn.Module):
    """Reload-Mamba (Fig. 3). Eval: logits (B, K, H, W). Training: a dict with what the loss needs:
    ``out`` (final logits), ``aux`` (auxiliary logits of each reloaded level, coarse first) and
    ``prior`` (boundary-prior logits of the same levels).

    Ablation switches (defaults = the full model; ``ABLATIONS`` names the tables' rows):

    - ``levels``: decoder levels with a Reload module (Tables 6, 10); ``()`` = none (Table 5
      baseline). Levels without one pass their decoder feature into the top-down fusion.
    - ``placement``: ``"post_upsampling"`` = Table 10's reference (one level after Eq. 22's Up).
    - ``directions``: scan directions (Table 8).
    - ``restore``: ``"gate"`` (Eqs. 17-19), ``"context"`` (F_r = F_ctx) or ``"residual"``
      (F_r = F + F_ctx), Table 7's first rows and Table 5's scan-only rows.
    - ``detail_prior`` (Eq. 7/10 present), ``prior_supervision`` (Eq. 9 in the loss; Tables 6, 11),
      ``gate_uncertainty`` (U in Eq. 17; Tables 6, 7), ``gate_change`` (F - F_ctx in Eq. 17),
      ``gate_prior`` (P in Eq. 18), ``max_reload`` 1.0 = "w/o gate scaling" (Table 7).
    - ``aux_head``: ``"pre"`` (Eq. 15), ``"post"`` (Table 13) or None (Table 5 before "+ Aux Head").
    - ``edge_prior``: the Sobel branch (Table 5).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        pretrained: str | None = None,
        widths: tuple[int, int, int] | list[int] = LEVEL_WIDTHS,
        d_state: int = 16,
        low_priority: float = 0.3,
        max_reload: float = 0.7,
        edge_channels: int = 32,
        head_channels: int = 64,
        neck_channels: int = HEAD_NECK_CHANNELS,
        ohem_keep_ratio: float = 0.25,
        lovasz_weight: float = 0.5,
        boundary_weight: float = 0.5,
        boundary_gain: float = 4.0,
        aux_weight: float = 0.4,
        prior_weight: float = 0.2,
        levels: tuple[str, ...] | list[str] = LEVEL_NAMES,
        placement: str = "decoder",
        directions: tuple[str, ...] | list[str] = DIRECTIONS,
        restore: str = "gate",
        detail_prior: bool = True,
        prior_supervision: bool = True,
        gate_uncertainty: bool = True,
        gate_change: bool = True,
        gate_prior: bool = True,
        aux_head: str | None = "pre",
        edge_prior: bool = True,
    ) -> None:
        super().__init__()
        levels, directions = tuple(levels), tuple(directions)
        _check_switches(
            widths, ohem_keep_ratio, levels, placement, directions, restore, detail_prior,
            prior_supervision, gate_uncertainty, gate_prior, aux_head,
        )
        self.num_classes = num_classes
        self.loss_weights = {
            "lovasz": lovasz_weight,
            "boundary": boundary_weight,
            "aux": aux_weight,
            "prior": prior_weight if prior_supervision else 0.0,
        }
        self.ohem_keep_ratio = ohem_keep_ratio
        self.boundary_gain = boundary_gain
        self.prior_supervision = prior_supervision

        self.encoder = _convnext_tiny(in_channels, pretrained)
        self.decoder = UNetDecoder(ENCODER_CHANNELS)
        decoder_channels = ENCODER_CHANNELS[-2::-1]  # D3, D2, D1: 384, 192, 96

        def level(channels: int, width: int) -> ReloadLevel:
            return ReloadLevel(
                channels, width, num_classes, d_state=d_state, low_priority=low_priority,
                max_reload=max_reload, directions=directions, restore=restore,
                detail_prior=detail_prior, gate_uncertainty=gate_uncertainty,
                gate_change=gate_change, gate_prior=gate_prior, aux_head=aux_head,
            )

        self.level_names = levels if placement == "decoder" else ()
        self.levels = nn.ModuleDict(
            {
                name: level(c, w)
                for name, c, w in zip(LEVEL_NAMES, decoder_channels, widths)
                if name in self.level_names
            }
        )
        # Eqs. (20)-(21): depthwise-separable fusion of Up(Z_{l+1}) with level l, from the coarsest
        # reloaded level down to D1 (a level without Reload contributes its decoder feature).
        first = min((LEVEL_NAMES.index(n) for n in self.level_names), default=len(LEVEL_NAMES) - 1)
        self.fusions = nn.ModuleDict(
            {
                LEVEL_NAMES[i]: SeparableConvBNReLU(
                    decoder_channels[i - 1] + decoder_channels[i], decoder_channels[i], 3
                )
                for i in range(first + 1, len(LEVEL_NAMES))
            }
        )
        self.edge_prior = SobelEdgePrior(in_channels, edge_channels) if edge_prior else None
        post_level = (
            level(head_channels, head_channels) if placement == "post_upsampling" else None
        )
        self.head = EdgeGuidedHead(
            decoder_channels[-1], edge_channels if edge_prior else 0, neck_channels,
            head_channels, num_classes, post_level,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, Any]:
        if min(x.shape[-2:]) < MIN_INPUT_SIZE:
            raise UsageError(
                f"reload-mamba needs inputs of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} pixels, "
                f"got {x.shape[-2]}x{x.shape[-1]}"
            )
        decoded = dict(zip(LEVEL_NAMES, self.decoder(self.encoder(x))))
        aux, priors = [], []
        fused = None
        for name in LEVEL_NAMES:
            feature = decoded[name]
            if name in self.levels:
                feature, a, p = self.levels[name](feature)
                aux.append(a)
                priors.append(p)
            if name in self.fusions:
                up = F.interpolate(fused, size=feature.shape[-2:], mode="bilinear", align_corners=False)
                fused = self.fusions[name](torch.cat([up, feature], dim=1))
            elif name in self.levels or name == LEVEL_NAMES[-1]:
                fused = feature  # Z at the coarsest reloaded level (or D1 when nothing is reloaded)
        edges = self.edge_prior(x) if self.edge_prior is not None else None
        logits, extras = self.head(fused, edges, x.shape[-2:])
        if extras is not None:
            aux.append(extras[0])
            priors.append(extras[1])
        if not self.training:
            return logits
        return {
            "out": logits,
            "aux": [a for a in aux if a is not None],
            "prior": [p for p in priors if p is not None],
        }

    def compute_loss(
        self, outputs: torch.Tensor | dict[str, Any], target: torch.Tensor, ignore_index: int
    ) -> torch.Tensor:
        """Eq. (28): L = OHEM + w_lov Lovasz + w_bd boundary CE + w_aux aux CE + w_prior prior BCE,
        the aux and prior terms summed over levels (Eqs. 9, 34).

        Given eval-mode outputs (logits only), the terms that need aux/prior maps are left out;
        without ``prior_supervision`` the prior term is left out (Table 11's implicit prior).
        """
        if isinstance(outputs, torch.Tensor):
            outputs = {"out": outputs}
        # Losses in float32 even under mixed precision (sorting, entropies, log-probabilities).
        logits = outputs["out"].float()
        aux = [a.float() for a in outputs.get("aux") or []]
        priors = [p.float() for p in outputs.get("prior") or []]
        w = self.loss_weights
        loss = ohem_cross_entropy(logits, target, ignore_index, self.ohem_keep_ratio)
        loss = loss + w["lovasz"] * lovasz_softmax(logits, target, ignore_index)
        loss = loss + w["boundary"] * boundary_weighted_cross_entropy(
            logits, target, ignore_index, self.boundary_gain
        )
        if aux:
            loss = loss + w["aux"] * multilevel_aux_cross_entropy(aux, target, ignore_index)
        if priors and self.prior_supervision:
            loss = loss + w["prior"] * prior_boundary_bce(priors, target, ignore_index)
        return loss

    def _reload_levels(self) -> list[ReloadLevel]:
        post = self.head.post_level
        return [*self.levels.values(), *([post] if post is not None else [])]

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters in the groups of the paper's Section 4.5 breakdown (a partition)."""
        reload_core, aux_and_fusion = [], list(self.fusions.parameters())
        for level in self._reload_levels():
            aux_and_fusion += [p for n, p in level.named_parameters() if n.startswith("aux_head.")]
            reload_core += [p for n, p in level.named_parameters() if not n.startswith("aux_head.")]
        in_levels = {id(p) for level in self._reload_levels() for p in level.parameters()}
        edge = list(self.edge_prior.parameters()) if self.edge_prior is not None else []
        return {
            "encoder": list(self.encoder.parameters()),
            "decoder": list(self.decoder.parameters()),
            "mamba_blocks_and_gates": reload_core,
            "aux_heads_and_fusion": aux_and_fusion,
            "edge_prior_and_head": edge + [p for p in self.head.parameters() if id(p) not in in_levels],
        }


def _check_switches(
    widths: Any, ohem_keep_ratio: float, levels: tuple[str, ...], placement: str,
    directions: tuple[str, ...], restore: str, detail_prior: bool, prior_supervision: bool,
    gate_uncertainty: bool, gate_prior: bool, aux_head: str | None,
) -> None:
    """Refuse, in one line, option combinations that do not describe a network."""
    problems = []
    if len(widths) != 3:
        problems.append(f"widths needs three values (D3, D2, D1), got {list(widths)}")
    if not 0.0 < ohem_keep_ratio <= 1.0:
        problems.append(f"ohem_keep_ratio must be in (0, 1], got {ohem_keep_ratio}")
    if not set(levels) <= set(LEVEL_NAMES) or len(set(levels)) != len(levels):
        problems.append(f"levels must be distinct names among {LEVEL_NAMES}, got {list(levels)}")
    if placement not in PLACEMENTS:
        problems.append(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if not directions or not set(directions) <= set(DIRECTIONS) or len(set(directions)) != len(directions):
        problems.append(f"directions must be distinct names among {DIRECTIONS}, got {list(directions)}")
    if restore not in RESTORE_MODES:
        problems.append(f"restore must be one of {RESTORE_MODES}, got {restore!r}")
    if aux_head not in AUX_PLACEMENTS:
        problems.append(f"aux_head must be 'pre', 'post' or null, got {aux_head!r}")
    # Without a Reload level (Table 5's first rows) the level options describe nothing: no check.
    if levels or placement == "post_upsampling":
        if prior_supervision and not detail_prior:
            problems.append("prior_supervision needs detail_prior")
        if restore == "gate" and gate_prior and not detail_prior:
            problems.append("gate_prior needs detail_prior (or set gate_prior false)")
        if restore == "gate" and gate_uncertainty and aux_head is None:
            problems.append("gate_uncertainty needs an aux_head (or set gate_uncertainty false)")
    if problems:
        raise UsageError("reload-mamba: " + "; ".join(problems))


# Table rows as ReloadMamba options (the full model is every table's last row: no options).
_IMPLICIT_SINGLE_LEVEL = {  # Table 5's last row = Table 6's "single-level baseline" (direct port)
    "levels": ["D1"], "prior_supervision": False, "gate_uncertainty": False,
}
_SCAN_ONLY = {  # scans + directional attention at D1, no prior, no gate, no aux head
    "levels": ["D1"], "restore": "context", "detail_prior": False, "prior_supervision": False,
    "gate_uncertainty": False, "gate_prior": False, "aux_head": None,
}
ABLATIONS: dict[str, dict[str, Any]] = {
    "table5/baseline": {"levels": [], "edge_prior": False, "aux_head": None},
    "table5/edge-prior": {"levels": [], "aux_head": None},
    "table5/directional-scan": {**_SCAN_ONLY, "edge_prior": False},
    "table5/scan+edge-prior": dict(_SCAN_ONLY),
    "table5/single-level-gate": {**_IMPLICIT_SINGLE_LEVEL, "aux_head": None},
    "table5/aux-head": dict(_IMPLICIT_SINGLE_LEVEL),
    "table6/single-level-baseline": dict(_IMPLICIT_SINGLE_LEVEL),
    "table6/boundary-prior": {"levels": ["D1"], "gate_uncertainty": False},
    "table6/class-uncertainty-gate": {"levels": ["D1"]},
    "table6/full": {},
    "table7/context-only": {"restore": "context", "detail_prior": False, "prior_supervision": False},
    "table7/residual": {"restore": "residual", "detail_prior": False, "prior_supervision": False},
    "table7/uncertainty-agnostic": {"gate_uncertainty": False},
    "table7/no-prior-modulation": {"gate_prior": False},
    "table7/no-difference-term": {"gate_change": False},
    "table7/no-gate-scaling": {"max_reload": 1.0},
    "table7/full": {},
    "table8/single": {"directions": ["right"]},
    "table8/horizontal": {"directions": ["right", "left"]},
    "table8/vertical": {"directions": ["down", "up"]},
    "table8/two-axis": {"directions": ["right", "down"]},
    "table8/four": {},
    "table10/D3": {"levels": ["D3"]},
    "table10/D2": {"levels": ["D2"]},
    "table10/D1": {"levels": ["D1"]},
    "table10/D2+D1": {"levels": ["D2", "D1"]},
    "table10/D3+D1": {"levels": ["D3", "D1"]},
    "table10/three-level": {},
    "table10/post-upsampling": {"placement": "post_upsampling"},
    "table13/post-reload": {"aux_head": "post"},
    "table13/pre-reload": {},
}


# --------------------------------------------------------------------------------------------------
# Encoder and its ImageNet weights.

# Classifier tensors of an ImageNet checkpoint: the segmentation encoder has no classifier.
_CLASSIFIER_PREFIX = "head."


def _convnext_tiny(in_channels: int, weights_file: str | None) -> nn.Module:
    """ConvNeXt-Tiny feature extractor (timm), optionally from a local ImageNet-1K weights file.

    Nothing is ever downloaded. The file may be timm's layout (``convnext_tiny.fb_in1k``,
    ``model.safetensors``) or the original Facebook release (``convnext_tiny_1k_224_ema.pth``,
    ``{"model": ...}``), which timm's own ConvNeXt filter converts. Every backbone tensor must be
    in the file with its shape, and nothing else but the classifier (``head.*``).
    """
    encoder = timm.create_model(
        "convnext_tiny", features_only=True, pretrained=False, in_chans=in_channels
    )
    if weights_file is None:
        return encoder
    what = f"ConvNeXt-Tiny weights {weights_file}"
    try:
        state = read_state_dict(weights_file, what="ConvNeXt-Tiny weights")
    except CheckpointError as exc:
        raise UsageError(f"reload-mamba: {exc}") from exc
    with torch.device("meta"):  # shapes only: the filter reshapes FB's 2D linear weights
        reference = timm.create_model("convnext_tiny", pretrained=False)
    state = convnext_checkpoint_filter(state, reference)
    backbone = {k: v for k, v in state.items() if not k.startswith(_CLASSIFIER_PREFIX)}
    own_backbone = {
        k: v for k, v in reference.state_dict().items() if not k.startswith(_CLASSIFIER_PREFIX)
    }
    try:
        check_state_fits(own_backbone, backbone, what=what)
        # timm's full-model names -> its features_only names ("stem.0" -> "stem_0", ...).
        features = {re.sub(r"^(stem|stages)\.(\d+)", r"\1_\2", k): v for k, v in backbone.items()}
        features["stem_0.weight"] = adapt_stem(features["stem_0.weight"], in_channels)
        load_state_strict(encoder, features, what=what)
    except CheckpointError as exc:
        raise UsageError(f"reload-mamba: {exc}") from exc
    return encoder


@register_model(
    "reload-mamba",
    paper="Chan et al., Reload-Mamba: Hierarchical Anti-Dilution State-Space Modeling (2026)",
    description="ConvNeXt-T U-decoder, 3-level four-direction Mamba, uncertainty-aware Reload Gate",
)
def reload_mamba(num_classes: int, in_channels: int = 3, **cfg: Any) -> nn.Module:
    """Build Reload-Mamba; ``cfg`` takes the keyword arguments of :class:`ReloadMamba`, or
    ``ablation`` naming a row of :data:`ABLATIONS` (its options, then ``cfg``'s, apply)."""
    ablation = cfg.pop("ablation", None)
    if ablation is not None:
        if ablation not in ABLATIONS:
            raise UsageError(
                f"reload-mamba: unknown ablation {ablation!r}; known: {', '.join(ABLATIONS)}"
            )
        cfg = {**ABLATIONS[ablation], **cfg}
    return ReloadMamba(num_classes=num_classes, in_channels=in_channels, **cfg)
