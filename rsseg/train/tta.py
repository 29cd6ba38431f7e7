"""Test-time augmentation: average class probabilities over transformed copies of the input.

- ``flip``: identity, horizontal flip, vertical flip (GeoSeg's "lr" TTA);
- ``d4``: the 8 flips/rotations of the square;
- ``ms``: flips x scales {0.5, 0.75, 1, 1.25, 1.5} (MAFMamba: "random flipping and multi-scale").
Scaled inputs are rounded to a multiple of 32 (encoders downsample 32x) and the probabilities
resized back to the input size before averaging.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from rsseg.errors import UsageError
from rsseg.train.losses import split_outputs

TTA_MODES = ("flip", "d4", "ms")
MS_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5)
SIZE_MULTIPLE = 32

Forward = Callable[[torch.Tensor], object]


def _probs(forward: Forward, x: torch.Tensor) -> torch.Tensor:
    logits, _ = split_outputs(forward(x))
    return logits.float().softmax(1)


def _dihedral(k: int, flip: bool) -> tuple[Callable, Callable]:
    def apply(t: torch.Tensor) -> torch.Tensor:
        t = t.flip(-1) if flip else t
        return t.rot90(k, (-2, -1))

    def undo(t: torch.Tensor) -> torch.Tensor:
        t = t.rot90(-k, (-2, -1))
        return t.flip(-1) if flip else t

    return apply, undo


def predict_probs(forward: Forward, x: torch.Tensor, mode: str | None = None) -> torch.Tensor:
    """Class probabilities (B, K, H, W) of normalised input ``x``, averaged over ``mode``'s views."""
    if mode is None or mode == "none":
        return _probs(forward, x)
    if mode not in TTA_MODES:
        raise UsageError(f"unknown TTA {mode!r}; valid TTAs: {', '.join(TTA_MODES)}")
    h, w = x.shape[-2:]
    if mode == "d4":
        views = [_dihedral(k, f) for f in (False, True) for k in range(4)]
        if h != w:  # rotations need a square input
            views = [v for i, v in enumerate(views) if i % 2 == 0]
    else:
        views = [
            (lambda t: t, lambda t: t),
            (lambda t: t.flip(-1), lambda t: t.flip(-1)),
            (lambda t: t.flip(-2), lambda t: t.flip(-2)),
        ]
    scales = MS_SCALES if mode == "ms" else (1.0,)
    total = None
    count = 0
    for scale in scales:
        if scale == 1.0:
            xs = x
        else:
            size = (max(SIZE_MULTIPLE, round(h * scale / SIZE_MULTIPLE) * SIZE_MULTIPLE),
                    max(SIZE_MULTIPLE, round(w * scale / SIZE_MULTIPLE) * SIZE_MULTIPLE))
            xs = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        for apply, undo in views:
            p = undo(_probs(forward, apply(xs)))
            if p.shape[-2:] != (h, w):
                p = F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)
            total = p if total is None else total + p
            count += 1
    return total / count
