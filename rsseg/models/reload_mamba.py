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
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import LovaszLoss
from torch import nn

from rsseg.errors import UsageError
from rsseg.models.layers import ConvBNReLU, SeparableConvBNReLU
from rsseg.models.registry import register_model
from rsseg.models.ssm import FourDirectionMamba

# ConvNeXt-Tiny stage widths (Eq. 1) and the decoder widths that follow them (Eqs. 2-4).
ENCODER_CHANNELS = (96, 192, 384, 768)
# Reduced per-level widths of the Reload modules at (D3, D2, D1): Section 3.5 and Table 14.
LEVEL_WIDTHS = (192, 128, 96)
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
    """One level of the hierarchical Reload-Mamba module (Sections 3.3-3.4).

    Input: decoder feature D (B, in_channels, h, w). Returns the restored feature F_r
    (B, width, h, w), the pre-reload auxiliary logits (B, K, h, w) and the prior logits
    (B, 1, h, w).
    """

    def __init__(
        self,
        in_channels: int,
        width: int,
        num_classes: int,
        d_state: int = 16,
        low_priority: float = 0.3,
        max_reload: float = 0.7,
    ) -> None:
        super().__init__()
        self.low_priority = low_priority
        self.max_reload = max_reload
        # Level-dependent width (Section 3.5): a 3x3 conv block takes the decoder feature D_l to
        # this level's width (it also refines D_l at the finest level, where widths agree).
        self.project = ConvBNReLU(in_channels, width, 3)
        # Eq. (7): P = sigmoid(phi(F)); phi = two 3x3 conv blocks (a boundary detector needs some
        # context) and a 1x1 conv to one channel.
        self.prior = nn.Sequential(
            ConvBNReLU(width, width, 3), ConvBNReLU(width, width, 3), nn.Conv2d(width, 1, 1)
        )
        # Eqs. (11)-(12): four separately parameterised Mamba blocks (right, left, down, up), each a
        # pre-norm residual block around its mixer as in Gu & Dao (2023).
        self.scan_norm = nn.LayerNorm(width)
        self.scans = FourDirectionMamba(width, d_state=d_state)
        # Eqs. (13)-(14): pixel-wise directional attention: one 3x3 conv over the concatenated
        # directional outputs gives a logit per direction, pixel and channel; softmax over the
        # four directions.
        self.direction_attention = nn.Conv2d(4 * width, 4 * width, 3, padding=1)
        # Eq. (15): lightweight pre-reload auxiliary head on the directional fusion output.
        self.aux_head = nn.Sequential(ConvBNReLU(width, width, 3), nn.Conv2d(width, num_classes, 1))
        # Eq. (17): the gate's convolutional detector over [F, F - F_ctx, U].
        self.gate = nn.Sequential(
            ConvBNReLU(2 * width + 1, width, 3), nn.Conv2d(width, width, 3, padding=1)
        )

    def forward(self, decoded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feature = self.project(decoded)
        prior_logits = self.prior(feature)
        prior = torch.sigmoid(prior_logits)
        # Eq. (10): keep detail-sensitive responses, retain a fraction alpha of the rest.
        detail = feature * (prior + self.low_priority * (1.0 - prior))

        normed = self.scan_norm(detail.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        directions = detail.unsqueeze(1) + self.scans(normed)  # (B, 4, C, h, w), residual blocks
        b, n, c, h, w = directions.shape
        logits = self.direction_attention(directions.reshape(b, n * c, h, w)).reshape(b, n, c, h, w)
        context = (logits.softmax(dim=1) * directions).sum(dim=1)  # F_ctx

        aux_logits = self.aux_head(context)
        uncertainty = normalized_class_entropy(aux_logits)
        change = feature - context  # propagation-induced change: what the scans moved away from F
        gate = torch.sigmoid(self.gate(torch.cat([feature, change, uncertainty], dim=1)))
        # Eq. (18): restoration bounded by max_reload and focused where the prior is high.
        reload = self.max_reload * gate * prior
        # Eq. (19): reload the original response where R is large, keep the context elsewhere.
        restored = context + reload * change
        return restored, aux_logits, prior_logits


class EdgeGuidedHead(nn.Module):
    """Section 3.7, Eqs. (22)-(27): [Up(Z), E] -> detail fusion -> noise gate -> class logits."""

    def __init__(
        self, in_channels: int, edge_channels: int, channels: int, num_classes: int
    ) -> None:
        super().__init__()
        # Eq. (24): pointwise mix, depthwise 3x3 for local detail, pointwise again.
        self.detail_fusion = nn.Sequential(
            ConvBNReLU(in_channels + edge_channels, channels, 1),
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

    def forward(self, fused: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(fused, size=edges.shape[-2:], mode="bilinear", align_corners=False)
        detail = self.detail_fusion(torch.cat([up, edges], dim=1))
        clean = detail * torch.sigmoid(self.noise_gate(detail))
        return self.classifier(clean)


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
    """Eq. (34): mean over levels of CE against the label map nearest-downsampled to each head."""
    terms = []
    for logits in aux_logits:
        small = F.interpolate(target[:, None].float(), size=logits.shape[-2:], mode="nearest")
        small = small[:, 0].long()
        if bool((small != ignore_index).any()):
            terms.append(F.cross_entropy(logits, small, ignore_index=ignore_index))
        else:
            terms.append(logits.sum() * 0.0)
    return torch.stack(terms).mean()


def prior_boundary_bce(
    prior_logits: list[torch.Tensor], target: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """Eqs. (8)-(9): mean over levels of BCE between each prior and the max-pooled boundary mask.

    A level pixel is valid when its window holds at least one valid label pixel.
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
    return torch.stack(terms).mean()


# --------------------------------------------------------------------------------------------------
# The network.


class ReloadMamba(nn.Module):
    """Reload-Mamba (Fig. 3). Eval: logits (B, K, H, W). Training: a dict with what the loss needs:
    ``out`` (final logits), ``aux`` (pre-reload logits at D3, D2, D1 resolution) and ``prior``
    (boundary-prior logits at the same resolutions).
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
        ohem_keep_ratio: float = 0.25,
        lovasz_weight: float = 0.5,
        boundary_weight: float = 0.5,
        boundary_gain: float = 4.0,
        aux_weight: float = 0.4,
        prior_weight: float = 0.2,
    ) -> None:
        super().__init__()
        if len(widths) != 3:
            raise UsageError(
                f"reload-mamba: widths needs three values (D3, D2, D1), got {list(widths)}"
            )
        if not 0.0 < ohem_keep_ratio <= 1.0:
            raise UsageError(
                f"reload-mamba: ohem_keep_ratio must be in (0, 1], got {ohem_keep_ratio}"
            )
        self.num_classes = num_classes
        self.loss_weights = {
            "lovasz": lovasz_weight,
            "boundary": boundary_weight,
            "aux": aux_weight,
            "prior": prior_weight,
        }
        self.ohem_keep_ratio = ohem_keep_ratio
        self.boundary_gain = boundary_gain

        self.encoder = _convnext_tiny(in_channels, pretrained)
        self.decoder = UNetDecoder(ENCODER_CHANNELS)
        decoder_channels = ENCODER_CHANNELS[-2::-1]  # D3, D2, D1: 384, 192, 96
        self.levels = nn.ModuleList(
            ReloadLevel(c, w, num_classes, d_state, low_priority, max_reload)
            for c, w in zip(decoder_channels, widths)
        )
        # Eqs. (20)-(21): depthwise-separable fusion of Up(Z_{l+1}) with the restored level l.
        self.fusions = nn.ModuleList(
            SeparableConvBNReLU(coarse + fine, fine, 3)
            for coarse, fine in zip(widths[:-1], widths[1:])
        )
        self.edge_prior = SobelEdgePrior(in_channels, edge_channels)
        self.head = EdgeGuidedHead(widths[-1], edge_channels, head_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, Any]:
        if min(x.shape[-2:]) < MIN_INPUT_SIZE:
            raise UsageError(
                f"reload-mamba needs inputs of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} pixels, "
                f"got {x.shape[-2]}x{x.shape[-1]}"
            )
        decoded = self.decoder(self.encoder(x))
        restored, aux, priors = [], [], []
        for level, feature in zip(self.levels, decoded):
            r, a, p = level(feature)
            restored.append(r)
            aux.append(a)
            priors.append(p)
        fused = restored[0]  # Z3 = F_r3
        for fusion, finer in zip(self.fusions, restored[1:]):
            up = F.interpolate(fused, size=finer.shape[-2:], mode="bilinear", align_corners=False)
            fused = fusion(torch.cat([up, finer], dim=1))
        logits = self.head(fused, self.edge_prior(x))
        if not self.training:
            return logits
        return {"out": logits, "aux": aux, "prior": priors}

    def compute_loss(
        self, outputs: torch.Tensor | dict[str, Any], target: torch.Tensor, ignore_index: int
    ) -> torch.Tensor:
        """Eq. (28): L = OHEM + w_lov Lovasz + w_bd boundary CE + w_aux aux CE + w_prior prior BCE.

        Given eval-mode outputs (logits only), the terms that need aux/prior maps are left out.
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
        if priors:
            loss = loss + w["prior"] * prior_boundary_bce(priors, target, ignore_index)
        return loss

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters in the groups of the paper's Section 4.5 breakdown (a partition)."""
        reload_core, aux_and_fusion = [], list(self.fusions.parameters())
        for level in self.levels:
            aux_and_fusion += list(level.aux_head.parameters())
            reload_core += [p for n, p in level.named_parameters() if not n.startswith("aux_head.")]
        return {
            "encoder": list(self.encoder.parameters()),
            "decoder": list(self.decoder.parameters()),
            "mamba_blocks_and_gates": reload_core,
            "aux_heads_and_fusion": aux_and_fusion,
            "edge_prior_and_head": [*self.edge_prior.parameters(), *self.head.parameters()],
        }


def _convnext_tiny(in_channels: int, weights_file: str | None) -> nn.Module:
    """ConvNeXt-Tiny feature extractor (timm), optionally from a local ImageNet weights file.

    Nothing is ever downloaded: without a file the encoder starts from timm's random init.
    """
    if weights_file is None:
        return timm.create_model(
            "convnext_tiny", features_only=True, pretrained=False, in_chans=in_channels
        )
    path = Path(weights_file).expanduser()
    if not path.is_file():
        raise UsageError(f"reload-mamba: encoder weights file not found: {path}")
    # timm reads the local file (safetensors, or a torch file with weights_only=True), drops the
    # classifier and adapts the stem to in_channels bands.
    try:
        return timm.create_model(
            "convnext_tiny",
            features_only=True,
            pretrained=True,
            in_chans=in_channels,
            pretrained_cfg_overlay={"file": str(path)},
        )
    except (RuntimeError, KeyError, ValueError, OSError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(
            f"reload-mamba: {path} does not hold ConvNeXt-Tiny weights ({first_line})"
        ) from exc


@register_model(
    "reload-mamba",
    paper="Chan et al., Reload-Mamba: Hierarchical Anti-Dilution State-Space Modeling (2026)",
    description="ConvNeXt-T U-decoder, 3-level four-direction Mamba, uncertainty-aware Reload Gate",
)
def reload_mamba(num_classes: int, in_channels: int = 3, **cfg: Any) -> nn.Module:
    """Build Reload-Mamba; ``cfg`` takes the keyword arguments of :class:`ReloadMamba`."""
    return ReloadMamba(num_classes=num_classes, in_channels=in_channels, **cfg)
