"""The GeoSeg training objective: Soft-CE + Dice, plus 0.4 x Soft-CE on auxiliary outputs.

- Soft-CE: cross-entropy with label smoothing 0.05 (``(1 - eps) * nll + eps / C * sum_c -log p_c``),
  averaged over the *non-ignored* pixels. This is torch's ``cross_entropy(label_smoothing=...)``.
  GeoSeg's (smp's) SoftCrossEntropyLoss divides by all pixels, ignored ones included, so tiles
  with much padding weigh less; we deliberately average over labelled pixels only.
- Dice: smp's multiclass DiceLoss (softmax, smooth 0.05, aggregated over the batch, ignored pixels
  masked, classes absent from the batch's labels contribute 0 to the class mean), as in GeoSeg.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import DiceLoss
from torch import nn


class SoftCrossEntropy(nn.Module):
    """Label-smoothed cross-entropy averaged over non-ignored pixels."""

    def __init__(self, smoothing: float = 0.05, ignore_index: int = -100) -> None:
        super().__init__()
        self.smoothing = smoothing
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not (target != self.ignore_index).any():
            return logits.sum() * 0.0  # an all-ignore batch: zero loss, graph kept
        return F.cross_entropy(
            logits.float(), target, ignore_index=self.ignore_index, label_smoothing=self.smoothing
        )


class SegmentationLoss(nn.Module):
    """Soft-CE + Dice on the main output, ``aux_weight`` x Soft-CE on each auxiliary output.

    ``outputs`` is a logits tensor or a dict ``{"out": logits, "aux": [logits, ...]}``;
    auxiliary logits at a lower resolution are upsampled (bilinear) to the label size.
    """

    def __init__(self, ignore_index: int, smoothing: float = 0.05, dice_smooth: float = 0.05,
                 aux_weight: float = 0.4) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.soft_ce = SoftCrossEntropy(smoothing, ignore_index)
        self.dice = DiceLoss(mode="multiclass", smooth=dice_smooth, ignore_index=ignore_index)
        self.aux_weight = aux_weight

    def forward(self, outputs: Any, target: torch.Tensor) -> torch.Tensor:
        main, aux = split_outputs(outputs)
        loss = self.soft_ce(main, target) + self.dice(main.float(), target)
        for extra in aux:
            if extra.shape[-2:] != target.shape[-2:]:
                extra = F.interpolate(extra, size=target.shape[-2:], mode="bilinear", align_corners=False)
            loss = loss + self.aux_weight * self.soft_ce(extra, target)
        return loss


def split_outputs(outputs: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(main logits, list of auxiliary logits) from a model's output."""
    if isinstance(outputs, dict):
        aux = outputs.get("aux") or []
        if isinstance(aux, torch.Tensor):
            aux = [aux]
        return outputs["out"], list(aux)
    if isinstance(outputs, (tuple, list)):
        return outputs[0], list(outputs[1:])
    return outputs, []
