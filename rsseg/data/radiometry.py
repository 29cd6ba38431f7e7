"""What a model's input values mean: value ranges, band identities and masks, shared by
``rsseg prepare`` (which records them) and ``rsseg predict`` (which checks scenes against them).

Three rules live here so that training and prediction cannot disagree:

- **Masks.** An alpha band is a nodata mask only when the model does not read that band as data
  and its values look like a mask (only 0 and the dtype's full value, e.g. 0/255). Otherwise it
  is data (Potsdam's RGBIR tiles tag the infrared band as alpha) and GDAL's alpha-derived mask
  is not used. Internal masks, nodata values and NaN keep their GDAL meaning.
- **Value ranges.** A scene is sampled cheaply (a grid of windows, never the whole raster) and
  compared band by band with the training data's 1st/99th percentiles.
- **Band identity.** Bands are compared by what their files say they are (colour
  interpretation or a recognised description), never by guessing from values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import rasterio
from rasterio.enums import ColorInterp, MaskFlags
from rasterio.windows import Window

# A band's 99th percentile more than this many times off the training one is another radiometry
# (8-bit vs 12-bit is ~16x, reflectance vs 8-bit ~500x; a dark or bright 8-bit scene stays within).
RANGE_TOLERANCE = 5.0
# Scene sample: a grid of SAMPLE_GRID x SAMPLE_GRID windows of SAMPLE_SIZE pixels (16 small reads,
# also over HTTP), enough for stable percentiles and to tell a 0/255 mask from image data.
SAMPLE_GRID = 4
SAMPLE_SIZE = 256


# ----------------------------------------------------------------------------- sampling


def sample_windows(height: int, width: int, grid: int = SAMPLE_GRID, size: int = SAMPLE_SIZE
                   ) -> list[Window]:
    """Windows spread evenly over a raster (the whole raster when it is small)."""
    h, w = min(size, height), min(size, width)
    rows = sorted({round(i * (height - h) / max(grid - 1, 1)) for i in range(grid)})
    cols = sorted({round(i * (width - w) / max(grid - 1, 1)) for i in range(grid)})
    return [Window(c, r, w, h) for r in rows for c in cols]


# ----------------------------------------------------------------------------- masks


@dataclass(frozen=True)
class AlphaRule:
    """How a raster's alpha band is used. ``note`` is the one warning line when it is data."""

    band: int | None = None  # 1-based index of the band tagged alpha, if any
    is_mask: bool = False
    gdal_masks_with_it: bool = False  # GDAL derives the band masks from it
    note: str | None = None


def decide_alpha(src: rasterio.DatasetReader, read_bands: Sequence[int], name: str) -> AlphaRule:
    """The one rule for alpha bands (prepare and predict both call it); see the module doc."""
    alphas = [i + 1 for i, ci in enumerate(src.colorinterp) if ci == ColorInterp.alpha]
    if not alphas:
        return AlphaRule()
    band = alphas[0]
    gdal_uses = any(MaskFlags.alpha in flags for flags in src.mask_flag_enums)
    if band in read_bands:
        return AlphaRule(band, False, gdal_uses,
                         f"{name}: band {band} is tagged alpha but the model reads it as data; "
                         "it is not used as a nodata mask")
    values = np.unique(np.concatenate(
        [src.read(band, window=w).ravel() for w in sample_windows(src.height, src.width)]))
    full = _full_value(src.dtypes[band - 1])
    odd = values[~np.isin(values, [0, full])]
    if odd.size == 0:
        return AlphaRule(band, True, gdal_uses, None)
    return AlphaRule(band, False, gdal_uses,
                     f"{name}: band {band} is tagged alpha but holds values other than 0 and "
                     f"{full:g} (e.g. {odd[len(odd) // 2]:g}); it is read as data, not as a "
                     "nodata mask")


def _full_value(dtype: str) -> float:
    """The 'opaque' value of an alpha band: 255 for bytes, the type's maximum for other integers."""
    dt = np.dtype(dtype)
    if dt == np.uint8 or dt.kind == "f":
        return 255.0
    return float(np.iinfo(dt).max)


def read_valid(src: rasterio.DatasetReader, window: Window, alpha: AlphaRule) -> np.ndarray:
    """(h, w) bool: pixels with data. GDAL's mask (internal mask, nodata, alpha), except that an
    alpha band judged to be data masks nothing."""
    if alpha.gdal_masks_with_it and not alpha.is_mask:
        return np.ones((int(window.height), int(window.width)), dtype=bool)
    return src.dataset_mask(window=window) > 0


# ----------------------------------------------------------------------------- statistics


def band_statistics(values: np.ndarray) -> list[dict[str, float]]:
    """Per band (rows of ``values``, valid pixels only): 1st/99th percentile, min, max."""
    stats = []
    for row in values:
        row = row[np.isfinite(row)]
        if row.size == 0:
            stats.append({"p1": 0.0, "p99": 0.0, "min": 0.0, "max": 0.0})
            continue
        p1, p99 = np.percentile(row, [1, 99])
        stats.append({"p1": float(p1), "p99": float(p99), "min": float(row.min()),
                      "max": float(row.max())})
    return stats


def sample_scene(src: rasterio.DatasetReader, bands: Sequence[int], alpha: AlphaRule
                 ) -> np.ndarray:
    """(len(bands), N) float64 values of valid pixels from a grid of windows."""
    parts = []
    for w in sample_windows(src.height, src.width):
        data = src.read(list(bands), window=w).astype(np.float64)
        valid = read_valid(src, w, alpha) & np.isfinite(data).all(axis=0)
        parts.append(data[:, valid])
    return np.concatenate(parts, axis=1) if parts else np.zeros((len(bands), 0))


# ----------------------------------------------------------------------------- band identity

_DESCRIPTION_NAMES = {
    "red": "red", "r": "red", "green": "green", "g": "green", "blue": "blue", "b": "blue",
    "nir": "nir", "ir": "nir", "infrared": "nir", "near infrared": "nir", "near-infrared": "nir",
}
_COLORINTERP_NAMES = {ColorInterp.red: "red", ColorInterp.green: "green", ColorInterp.blue: "blue"}


def band_label(src: rasterio.DatasetReader, band: int) -> str:
    """What the file says band ``band`` is ("red", "nir", ...), or "" when it does not say.

    A recognised description wins over the colour interpretation; alpha, grey and undefined say
    nothing (alpha tags are exactly the unreliable ones, see the module doc)."""
    description = (src.descriptions[band - 1] or "").strip().lower()
    if description in _DESCRIPTION_NAMES:
        return _DESCRIPTION_NAMES[description]
    return _COLORINTERP_NAMES.get(src.colorinterp[band - 1], "")


# ----------------------------------------------------------------------------- comparison


@dataclass(frozen=True)
class Rescale:
    """``x * gain + offset`` per band, applied to source values before normalisation."""

    gain: tuple[float, ...]
    offset: tuple[float, ...]


def parse_rescale(text: str | None) -> str | float:
    """``--rescale``: "check" (default), "auto", "none" or a positive factor."""
    from rsseg.errors import UsageError

    if text is None or text == "check":
        return "check"
    if text in ("auto", "none"):
        return text
    try:
        factor = float(text)
    except ValueError:
        factor = math.nan
    if not (math.isfinite(factor) and factor > 0):
        raise UsageError(f"--rescale must be auto, none or a positive factor, got {text!r}")
    return factor


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def radiometry_mismatch(scene_stats: list[dict[str, float]], scene_dtype: str,
                        train_stats: list[dict[str, float]], train_dtype: str | None,
                        band_names: Sequence[str]) -> str | None:
    """What differs between a scene's sampled values and the training data's, or None."""
    if train_dtype and np.dtype(train_dtype).kind in "iu":
        info = np.iinfo(np.dtype(train_dtype))
        top = max(s["max"] for s in scene_stats)
        low = min(s["min"] for s in scene_stats)
        if top > info.max or low < info.min:
            return (f"its values reach {_fmt(top if top > info.max else low)}, outside the "
                    f"training {train_dtype} range {info.min}..{info.max}")
    for i, (s, t) in enumerate(zip(scene_stats, train_stats)):
        scene_scale = max(abs(s["p99"]), abs(s["p1"]))
        train_scale = max(abs(t["p99"]), abs(t["p1"]))
        if train_scale == 0 or scene_scale == 0:
            continue  # an empty or constant band says nothing about scale
        ratio = scene_scale / train_scale
        if not 1 / RANGE_TOLERANCE <= ratio <= RANGE_TOLERANCE:
            name = band_names[i] if i < len(band_names) and band_names[i] else f"#{i + 1}"
            return (f"band {name} has a 99th percentile of {_fmt(s['p99'])} ({scene_dtype}), the "
                    f"training data {_fmt(t['p99'])} ({train_dtype or 'unknown type'}), "
                    f"{ratio:.3g}x apart")
    return None


def auto_rescale(scene_stats: list[dict[str, float]], train_stats: list[dict[str, float]]
                 ) -> Rescale:
    """Per band, the linear map of the scene's 1st..99th percentiles onto the training ones.

    One map per scene (from its sample), never per window, so windows cannot disagree (no seams).
    """
    gains, offsets = [], []
    for s, t in zip(scene_stats, train_stats):
        span = s["p99"] - s["p1"]
        gain = (t["p99"] - t["p1"]) / span if span > 0 else 1.0
        gains.append(float(gain))
        offsets.append(float(t["p1"] - s["p1"] * gain))
    return Rescale(tuple(gains), tuple(offsets))

