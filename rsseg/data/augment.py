"""Training augmentations applied identically to image and label (GeoSeg protocol), and colour
jitter, applied to the image only (Reload-Mamba section 4.2).

Written in plain torch on purpose: the known trap of the reference code is results that depend
on an augmentation library's version. All randomness comes from torch's global generator, which
Lightning's ``seed_everything(..., workers=True)`` seeds per data-loader worker.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rsseg.config import AugmentConfig


def _choice(n: int) -> int:
    return int(torch.randint(n, (1,)))


def random_scale(image: torch.Tensor, mask: torch.Tensor, scales: tuple[float, ...]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale by one factor drawn from ``scales``: image bilinear, label nearest."""
    if not scales:
        return image, mask
    factor = scales[_choice(len(scales))]
    if factor == 1.0:
        return image, mask
    h, w = mask.shape
    size = (max(1, round(h * factor)), max(1, round(w * factor)))
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return image, mask


def pad_to(image: torch.Tensor, mask: torch.Tensor, size: int, ignore_index: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad bottom/right to at least ``size`` x ``size``: image with 0, label with ignore."""
    h, w = mask.shape
    ph, pw = max(0, size - h), max(0, size - w)
    if ph or pw:
        image = F.pad(image, (0, pw, 0, ph), value=0.0)
        mask = F.pad(mask, (0, pw, 0, ph), value=ignore_index)
    return image, mask


def random_crop_box(h: int, w: int, ch: int, cw: int) -> tuple[int, int]:
    top = int(torch.randint(h - ch + 1, (1,)))
    left = int(torch.randint(w - cw + 1, (1,)))
    return top, left


def smart_crop(image: torch.Tensor, mask: torch.Tensor, size: int, ignore_index: int,
               max_ratio: float = 0.75, tries: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``size`` crop, redrawn (up to ``tries`` times) while one class covers more than
    ``max_ratio`` of its labelled pixels, so crops of a single class are rarer (GeoSeg SmartCrop)."""
    image, mask = pad_to(image, mask, size, ignore_index)
    h, w = mask.shape
    for _ in range(max(1, tries)):
        top, left = random_crop_box(h, w, size, size)
        crop = mask[top : top + size, left : left + size]
        counts = torch.bincount(crop.flatten(), minlength=ignore_index + 1)[:ignore_index]
        if counts.sum() > 0 and counts.max() / counts.sum() < max_ratio:
            break
    return image[:, top : top + size, left : left + size], crop


def flips_rot90(image: torch.Tensor, mask: torch.Tensor, cfg: AugmentConfig
                ) -> tuple[torch.Tensor, torch.Tensor]:
    if cfg.hflip and torch.rand(()) < 0.5:
        image, mask = image.flip(-1), mask.flip(-1)
    if cfg.vflip and torch.rand(()) < 0.5:
        image, mask = image.flip(-2), mask.flip(-2)
    if cfg.rot90 and mask.shape[0] == mask.shape[1]:
        k = _choice(4)
        if k:
            image, mask = image.rot90(k, (-2, -1)), mask.rot90(k, (-2, -1))
    return image.contiguous(), mask.contiguous()


def mosaic(samples: list[tuple[torch.Tensor, torch.Tensor]], ignore_index: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Four samples -> one of the first one's size: a random centre splits it into quadrants,
    each filled with a random crop of one sample (GeoSeg's mosaic)."""
    h, w = samples[0][1].shape
    cy = int(torch.randint(h // 4, h - h // 4 + 1, (1,)))
    cx = int(torch.randint(w // 4, w - w // 4 + 1, (1,)))
    boxes = [(0, cy, 0, cx), (0, cy, cx, w), (cy, h, 0, cx), (cy, h, cx, w)]
    channels = samples[0][0].shape[0]
    image = torch.zeros(channels, h, w, dtype=samples[0][0].dtype)
    mask = torch.full((h, w), ignore_index, dtype=samples[0][1].dtype)
    for (img, msk), (y0, y1, x0, x1) in zip(samples, boxes):
        ch, cw = y1 - y0, x1 - x0
        if ch == 0 or cw == 0:
            continue
        img, msk = pad_to(img, msk, max(ch, cw), ignore_index)
        top, left = random_crop_box(msk.shape[0], msk.shape[1], ch, cw)
        image[:, y0:y1, x0:x1] = img[:, top : top + ch, left : left + cw]
        mask[y0:y1, x0:x1] = msk[top : top + ch, left : left + cw]
    return image, mask


# ITU-R 601 luma weights (torchvision's rgb_to_grayscale), for three-band images.
_LUMA = (0.299, 0.587, 0.114)


def source_value_range(dtype: torch.dtype, image: torch.Tensor) -> tuple[float, float]:
    """The range an image's values must stay in: its integer type's range (uint8: 0-255), or,
    for float sources, [0, inf) when the image has no negative value and unbounded otherwise."""
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        return float(info.min), float(info.max)
    return (0.0 if bool((image >= 0).all()) else float("-inf")), float("inf")


def color_jitter(image: torch.Tensor, strength: float, p: float = 1.0,
                 value_range: tuple[float, float] = (0.0, 255.0)) -> torch.Tensor:
    """Random brightness, contrast and saturation (in that order), each by a factor drawn
    uniformly in [1 - strength, 1 + strength], all three with probability ``p``; the label is
    never touched. Works in source units and clamps to ``value_range`` after each step.

    - brightness: x * b;
    - contrast: (x - m) * c + m, m the mean grey level (luma of a 3-band image; each band's own
      mean for other band counts, whose bands need not share units);
    - saturation: (x - grey) * s + grey with grey the per-pixel luma; only for 3-band images:
      other band counts have no colour to saturate, so it leaves them unchanged (its factor is
      still drawn, so the random stream does not depend on the band count).

    Returns a float32 image; ``strength`` 0 returns it unchanged and draws nothing.
    """
    if strength <= 0:
        return image
    apply = bool(torch.rand(()) < p)
    factors = 1.0 + strength * (2.0 * torch.rand(3) - 1.0)  # brightness, contrast, saturation
    image = image.float()
    if not apply:
        return image
    low, high = value_range
    brightness, contrast, saturation = factors.tolist()
    three_bands = image.shape[0] == 3
    luma = torch.tensor(_LUMA).view(3, 1, 1) if three_bands else None

    def grey(x: torch.Tensor) -> torch.Tensor:
        return (x * luma).sum(dim=0, keepdim=True)

    image = (image * brightness).clamp(low, high)
    mean = grey(image).mean() if three_bands else image.mean(dim=(1, 2), keepdim=True)
    image = ((image - mean) * contrast + mean).clamp(low, high)
    if three_bands:
        g = grey(image)
        image = ((image - g) * saturation + g).clamp(low, high)
    return image


def _crop(image: torch.Tensor, mask: torch.Tensor, size: int, cfg: AugmentConfig,
          ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    if cfg.smart_crop:
        return smart_crop(image, mask, size, ignore_index, cfg.smart_crop_max_ratio, cfg.smart_crop_tries)
    image, mask = pad_to(image, mask, size, ignore_index)
    top, left = random_crop_box(mask.shape[0], mask.shape[1], size, size)
    return image[:, top : top + size, left : left + size], mask[top : top + size, left : left + size]


def _resize(image: torch.Tensor, mask: torch.Tensor, size: tuple[int, int]
            ) -> tuple[torch.Tensor, torch.Tensor]:
    image = F.interpolate(image.float()[None], size=size, mode="bilinear", align_corners=False)[0]
    mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].to(mask.dtype)
    return image, mask


def train_transform(image: torch.Tensor, mask: torch.Tensor, cfg: AugmentConfig, crop_size: int,
                    ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random scale -> (smart) crop to ``crop_size`` -> flips / rot90 -> colour jitter (image
    only, when ``cfg.color_jitter`` > 0); returns (float32 image, int64 label). Mosaic happens
    before, in the dataset, because it needs other samples.

    Same result as GeoSeg's "rescale the whole patch, then crop", but for an enlarging scale s it
    crops the ``crop_size / s`` window the crop would come from and resizes only that window
    (image bilinear, label nearest): resizing the whole 1024 px patch dominated the loader's time.
    """
    source_dtype = image.dtype  # resizing turns the image to float: keep the source's range
    scales = tuple(cfg.scales) or (1.0,)
    factor = scales[_choice(len(scales))]
    if factor < 1.0:  # shrinking: resize the (smaller) result first, then crop/pad as usual
        h, w = mask.shape
        image, mask = _resize(image, mask, (max(1, round(h * factor)), max(1, round(w * factor))))
        image, mask = _crop(image, mask, crop_size, cfg, ignore_index)
    else:
        window = max(1, round(crop_size / factor))
        image, mask = _crop(image, mask, window, cfg, ignore_index)
        if window != crop_size:
            image, mask = _resize(image, mask, (crop_size, crop_size))
    image, mask = flips_rot90(image, mask, cfg)
    if cfg.color_jitter > 0:
        image = color_jitter(image, cfg.color_jitter, cfg.color_jitter_p,
                             source_value_range(source_dtype, image))
    return image.float().contiguous(), mask.long().contiguous()
