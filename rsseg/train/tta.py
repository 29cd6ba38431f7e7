"""Test-time augmentation with GeoSeg's meanings; the one TTA that `rsseg eval` and `rsseg predict`
both use.

GeoSeg's test scripts (``vaihingen_test.py``, ``potsdam_test.py``, ``loveda_test.py``) wrap the
model in ttach's ``SegmentationTTAWrapper``, which runs every combination of the composed
transforms, undoes each on the model's raw output (the logits), averages the logits (merge mode
"mean"), and the script applies softmax afterwards. The modes here are those sets:

- ``flip``: GeoSeg's ``--tta lr`` = ``Compose([HorizontalFlip(), VerticalFlip()])``: 4 views
  (identity, left-right, up-down, both).
- ``d4``: the 8 symmetries of the square, ttach's ``aliases.d4_transform()`` =
  ``Compose([HorizontalFlip(), Rotate90([0, 90, 180, 270])])``. (GeoSeg's own ``--tta d4`` is a
  multi-scale set, which is ``ms`` here.)
- ``ms``: GeoSeg's ``--tta d4`` for the dataset, flips x (rotation x) scales with bicubic
  resizing (``align_corners=False``) of the input and of the logits on the way back:
  Vaihingen: HFlip x VFlip x Rotate90([90]) (ttach adds 0) x scales {0.5, 0.75, 1, 1.25, 1.5},
  40 views; Potsdam: HFlip x VFlip x {0.75, 1, 1.25, 1.5}, 16 views; LoveDA: HFlip x
  {0.75, 1, 1.25, 1.5}, 8 views. A dataset without a GeoSeg script (synthetic, none) takes
  Vaihingen's set.

A scaled view has sides ``int(side * scale)`` as in ttach; its logits are resized back to the
exact size they came from. ttach recomputes that size as ``int(scaled / scale)``, which is the
same number for every side that is a multiple of 4 (1024 patches included) and would fail to
merge otherwise; there is no rounding to a model stride. Encoders that need sides divisible by
32 are served by padding the window (zeros = the band means after normalisation) to
:meth:`TTAProtocol.input_multiple` before TTA and cropping after, which leaves 1024 windows
untouched.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F

from rsseg.errors import UsageError
from rsseg.train.losses import split_outputs

TTA_MODES = ("none", "flip", "d4", "ms")
# What most encoders need: five stride-2 stages.
MODEL_SIZE_MULTIPLE = 32

Forward = Callable[[torch.Tensor], object]


@dataclass(frozen=True)
class View:
    """One ttach transform combination, applied in ttach's order: hflip, vflip, rotate, scale."""

    hflip: bool = False
    vflip: bool = False
    angle: int = 0  # degrees, counter-clockwise as torch.rot90 on (H, W)
    scale: float = 1.0


@dataclass(frozen=True)
class TTAProtocol:
    """A TTA set: every combination of its flips, rotations and scales, logits averaged."""

    mode: str
    hflip: bool = False
    vflip: bool = False
    angles: tuple[int, ...] = (0,)
    scales: tuple[float, ...] = (1.0,)
    interpolation: str = "bicubic"
    source: str = "no test-time augmentation"

    def views(self) -> list[View]:
        """The views in the order ttach's Compose yields them (itertools.product of the params)."""
        flips_h = (False, True) if self.hflip else (False,)
        flips_v = (False, True) if self.vflip else (False,)
        return [View(h, v, a, s)
                for h, v, a, s in itertools.product(flips_h, flips_v, self.angles, self.scales)]

    @property
    def num_views(self) -> int:
        return len(self.views())

    def input_multiple(self, model_multiple: int = MODEL_SIZE_MULTIPLE) -> int:
        """Smallest m such that a side divisible by m stays divisible by ``model_multiple`` at
        every scale (128 for GeoSeg's scales and 32) and round-trips exactly through ttach's
        ``int(int(side * s) / s)``."""
        multiple = max(1, model_multiple)
        for scale in self.scales:
            frac = Fraction(scale).limit_denominator(1000)
            # side * p / q divisible by model_multiple  <=>  side divisible by this:
            need = model_multiple * frac.denominator // math.gcd(frac.numerator,
                                                                  model_multiple * frac.denominator)
            multiple = multiple * need // math.gcd(multiple, need)
        return multiple

    def describe(self) -> dict[str, Any]:
        """What a result file records about the TTA next to the scores."""
        transforms = []
        if self.hflip:
            transforms.append("HorizontalFlip")
        if self.vflip:
            transforms.append("VerticalFlip")
        if self.angles != (0,):
            transforms.append(f"Rotate90({list(self.angles)})")
        if self.scales != (1.0,):
            transforms.append(f"Scale({list(self.scales)}, {self.interpolation}, align_corners=False)")
        return {
            "mode": self.mode,
            "views": self.num_views,
            "transforms": transforms,
            "scales": list(self.scales),
            "rotations_deg": list(self.angles),
            "interpolation": self.interpolation if self.scales != (1.0,) else None,
            "merge": "mean of the de-augmented logits, softmax after (ttach SegmentationTTAWrapper)"
            if self.num_views > 1 else "single forward pass, softmax",
            "source": self.source,
        }


_GEOSEG_MS = {
    "vaihingen": TTAProtocol(
        "ms", hflip=True, vflip=True, angles=(0, 90), scales=(0.5, 0.75, 1.0, 1.25, 1.5),
        source="GeoSeg vaihingen_test.py --tta d4: ttach Compose([HorizontalFlip(), VerticalFlip(), "
               "Rotate90([90]), Scale([0.5, 0.75, 1.0, 1.25, 1.5], 'bicubic')])",
    ),
    "potsdam": TTAProtocol(
        "ms", hflip=True, vflip=True, scales=(0.75, 1.0, 1.25, 1.5),
        source="GeoSeg potsdam_test.py --tta d4: ttach Compose([HorizontalFlip(), VerticalFlip(), "
               "Scale([0.75, 1.0, 1.25, 1.5], 'bicubic')])",
    ),
    "loveda": TTAProtocol(
        "ms", hflip=True, scales=(0.75, 1.0, 1.25, 1.5),
        source="GeoSeg loveda_test.py --tta d4: ttach Compose([HorizontalFlip(), "
               "Scale([0.75, 1.0, 1.25, 1.5], 'bicubic')])",
    ),
}


def tta_protocol(mode: str | None, dataset: str | None = None) -> TTAProtocol:
    """The TTA set of ``mode`` (``ms`` depends on the dataset's GeoSeg test script)."""
    if mode is None or mode == "none":
        return TTAProtocol("none")
    if mode == "flip":
        return TTAProtocol("flip", hflip=True, vflip=True,
                           source="GeoSeg *_test.py --tta lr: ttach Compose([HorizontalFlip(), "
                                  "VerticalFlip()])")
    if mode == "d4":
        return TTAProtocol("d4", hflip=True, angles=(0, 90, 180, 270),
                           source="ttach aliases.d4_transform(): Compose([HorizontalFlip(), "
                                  "Rotate90([0, 90, 180, 270])])")
    if mode == "ms":
        known = _GEOSEG_MS.get(dataset or "")
        if known is not None:
            return known
        base = _GEOSEG_MS["vaihingen"]
        return TTAProtocol(base.mode, base.hflip, base.vflip, base.angles, base.scales,
                           base.interpolation,
                           f"{base.source} (no GeoSeg script for {dataset or 'this data'}; "
                           "Vaihingen's set)")
    raise UsageError(f"unknown TTA {mode!r}; valid TTAs: {', '.join(TTA_MODES)}")


def _augment(x: torch.Tensor, view: View, interpolation: str) -> torch.Tensor:
    if view.hflip:
        x = x.flip(-1)
    if view.vflip:
        x = x.flip(-2)
    if view.angle:
        x = torch.rot90(x, view.angle // 90, (-2, -1))
    if view.scale != 1:
        h, w = x.shape[-2:]
        x = F.interpolate(x, size=(int(h * view.scale), int(w * view.scale)),
                          mode=interpolation, align_corners=False)
    return x


def _deaugment(y: torch.Tensor, view: View, interpolation: str,
               before_scale: tuple[int, int]) -> torch.Tensor:
    """Undo ``view`` on the logits, last transform first (ttach's de-augmentation order)."""
    if view.scale != 1:
        y = F.interpolate(y, size=before_scale, mode=interpolation, align_corners=False)
    if view.angle:
        y = torch.rot90(y, -(view.angle // 90), (-2, -1))
    if view.vflip:
        y = y.flip(-2)
    if view.hflip:
        y = y.flip(-1)
    return y


def merged_logits(forward: Forward, x: torch.Tensor, protocol: TTAProtocol) -> torch.Tensor:
    """Mean over the protocol's views of the de-augmented logits (float32), as ttach merges."""
    total = None
    for view in protocol.views():
        rotated = (x.shape[-1], x.shape[-2]) if view.angle % 180 else tuple(x.shape[-2:])
        logits, _ = split_outputs(forward(_augment(x, view, protocol.interpolation)))
        logits = _deaugment(logits.float(), view, protocol.interpolation, rotated)
        total = logits if total is None else total + logits
    return total / protocol.num_views


def predict_probs(
    forward: Forward,
    x: torch.Tensor,
    mode: str | TTAProtocol | None = None,
    dataset: str | None = None,
    *,
    size_multiple: int = 1,
) -> torch.Tensor:
    """Class probabilities (B, K, H, W) of normalised input ``x``: softmax of the TTA-merged logits.

    ``size_multiple`` > 1 pads ``x`` at the bottom/right with zeros (the band means) to the
    protocol's :meth:`~TTAProtocol.input_multiple` of it and crops the result, so every scaled
    view suits an encoder with that stride; inputs already of that size are not touched.
    """
    protocol = mode if isinstance(mode, TTAProtocol) else tta_protocol(mode, dataset)
    h, w = x.shape[-2:]
    if size_multiple > 1:
        m = protocol.input_multiple(size_multiple)
        ph, pw = -h % m, -w % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
    return merged_logits(forward, x, protocol)[..., :h, :w].softmax(1)


__all__ = [
    "MODEL_SIZE_MULTIPLE",
    "TTA_MODES",
    "TTAProtocol",
    "View",
    "merged_logits",
    "predict_probs",
    "tta_protocol",
]
