"""The GeoSeg training objective: Soft-CE + Dice, plus 0.4 x Soft-CE on auxiliary outputs.

- Soft-CE: cross-entropy with label smoothing 0.05 (``(1 - eps) * nll + eps / C * sum_c -log p_c``),
  averaged over the *non-ignored* pixels. This is torch's ``cross_entropy(label_smoothing=...)``.
  GeoSeg's (smp's) SoftCrossEntropyLoss divides by all pixels, ignored ones included, so tiles
  with much padding weigh less; we deliberately average over labelled pixels only.
- Dice: GeoSeg's multiclass Dice: softmax probabilities p, one-hot labels t, over all non-ignored
  pixels of the batch, per class ``1 - (2 sum(p t) + s) / (sum p + sum t + s)`` with s = 0.05; a
  class absent from the batch's labels contributes 0; mean over classes. Written here because
  smp 0.6 changed its soft Dice to a Tversky form in which the smoothing term counts twice,
  and a loss should not change with a library's version.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
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


class DiceLoss(nn.Module):
    """Multiclass soft Dice with GeoSeg's smoothing (see module notes)."""

    def __init__(self, smooth: float = 0.05, ignore_index: int = -100, eps: float = 1e-7) -> None:
        super().__init__()
        self.smooth = smooth
        self.ignore_index = ignore_index
        self.eps = eps

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        num_classes = logits.shape[1]
        probs = logits.float().softmax(1)
        valid = (target != self.ignore_index).unsqueeze(1)  # B, 1, H, W
        onehot = F.one_hot(torch.where(valid[:, 0], target, 0), num_classes).permute(0, 3, 1, 2)
        onehot = onehot.to(probs.dtype) * valid
        probs = probs * valid
        dims = (0, 2, 3)
        intersection = (probs * onehot).sum(dims)
        cardinality = probs.sum(dims) + onehot.sum(dims)
        score = (2 * intersection + self.smooth) / (cardinality + self.smooth).clamp_min(self.eps)
        present = onehot.sum(dims) > 0
        return ((1 - score) * present).mean()


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
        self.dice = DiceLoss(dice_smooth, ignore_index)
        self.aux_weight = aux_weight

    def forward(self, outputs: Any, target: torch.Tensor) -> torch.Tensor:
        main, aux = split_outputs(outputs)
        loss = self.soft_ce(main, target) + self.dice(main, target)
        for extra in aux:
            if extra.shape[-2:] != target.shape[-2:]:
                extra = F.interpolate(extra, size=target.shape[-2:], mode="bilinear", align_corners=False)
            loss = loss + self.aux_weight * self.soft_ce(extra, target)
        return loss


def split_outputs(outputs: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(main logits, list of auxiliary logits) from a model's output."""
    if isinstance(outputs, dict):
        aux = outputs.get("aux")
        if aux is None:
            aux = []
        elif isinstance(aux, torch.Tensor):  # a single auxiliary output
            aux = [aux]
        return outputs["out"], list(aux)
    if isinstance(outputs, (tuple, list)):
        return outputs[0], list(outputs[1:])
    return outputs, []
