"""Colour jitter (Reload-Mamba section 4.2): image only, bounded factors, source range kept,
deterministic under torch's global seed, wired into train_transform."""

from __future__ import annotations

import pytest
import torch

from rsseg.config import AugmentConfig
from rsseg.data.augment import color_jitter, source_value_range, train_transform

LUMA = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)


def drawn_factors(seed: int, strength: float) -> tuple[bool, list[float]]:
    """The apply draw and (brightness, contrast, saturation) color_jitter makes after ``seed``."""
    torch.manual_seed(seed)
    apply = bool(torch.rand(()) < 1.0)
    return apply, (1.0 + strength * (2.0 * torch.rand(3) - 1.0)).tolist()


def test_strength_zero_is_the_identity_and_draws_nothing() -> None:
    image = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    torch.manual_seed(0)
    assert color_jitter(image, 0.0) is image
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(1))  # the random stream is untouched


def test_grey_image_is_scaled_by_the_brightness_factor_within_bounds() -> None:
    # On a uniform grey image contrast (x - mean) and saturation (x - luma) are zero: only the
    # brightness factor acts, so out / in is that factor.
    strength = 0.4
    ratios = []
    for seed in range(200):
        torch.manual_seed(seed)
        out = color_jitter(torch.full((3, 4, 4), 100.0), strength)
        ratio = out / 100.0
        assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio))
        ratios.append(ratio.flatten()[0].item())
        assert ratios[-1] == pytest.approx(drawn_factors(seed, strength)[1][0], rel=1e-6)
    assert min(ratios) >= 1 - strength - 1e-6 and max(ratios) <= 1 + strength + 1e-6
    assert min(ratios) < 0.65 and max(ratios) > 1.35  # both ends of [0.6, 1.4] are reached


def test_three_band_output_matches_the_formula_with_the_drawn_factors() -> None:
    torch.manual_seed(1)
    image = 60 + 100 * torch.rand(3, 5, 6)  # mid-range: no clamping at strength 0.3
    for seed in range(5):
        _, (b, c, s) = drawn_factors(seed, 0.3)
        for factor in (b, c, s):
            assert 0.7 <= factor <= 1.3
        x = image * b
        mean = (x * LUMA).sum(0).mean()
        x = (x - mean) * c + mean
        grey = (x * LUMA).sum(0, keepdim=True)
        expected = (x - grey) * s + grey
        torch.manual_seed(seed)
        assert torch.allclose(color_jitter(image, 0.3), expected, atol=1e-4)


def test_other_band_counts_get_no_saturation_and_per_band_contrast() -> None:
    # Four constant bands of different levels: per-band contrast leaves each constant, and no
    # saturation is applied, so the output is exactly brightness x input.
    image = torch.tensor([20.0, 80.0, 140.0, 200.0]).view(4, 1, 1).expand(4, 3, 3).clone()
    torch.manual_seed(3)
    out = color_jitter(image, 0.2)
    brightness = drawn_factors(3, 0.2)[1][0]
    assert torch.allclose(out, (image * brightness).clamp(0, 255))
    # The same colours as a 3-band image do change hue saturation (check that the test can fail).
    torch.manual_seed(3)
    three = color_jitter(image[:3], 0.2)
    assert not torch.allclose(three, image[:3] * brightness)


def test_values_stay_in_the_source_range() -> None:
    torch.manual_seed(4)
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    low, high = source_value_range(torch.uint8, image)
    assert (low, high) == (0.0, 255.0)
    for seed in range(20):
        torch.manual_seed(seed)
        out = color_jitter(image, 0.9, value_range=(low, high))
        assert out.dtype == torch.float32 and out.min() >= 0 and out.max() <= 255
    assert source_value_range(torch.float32, torch.rand(2, 2))[0] == 0.0
    assert source_value_range(torch.float32, torch.randn(2, 2) - 5)[0] == float("-inf")


def test_probability_zero_never_changes_the_image_and_seeds_reproduce() -> None:
    image = 50 + 100 * torch.rand(3, 6, 6)
    assert torch.equal(color_jitter(image, 0.5, p=0.0), image)
    torch.manual_seed(7)
    first = color_jitter(image, 0.5)
    torch.manual_seed(7)
    assert torch.equal(first, color_jitter(image, 0.5))
    torch.manual_seed(8)
    assert not torch.equal(first, color_jitter(image, 0.5))


def test_train_transform_jitters_the_image_and_never_the_label() -> None:
    torch.manual_seed(5)
    image = torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8)
    mask = torch.randint(0, 6, (48, 48), dtype=torch.uint8)
    base = dict(scales=(0.5, 1.0, 2.0), smart_crop=False, mosaic_p=0.0, rot90=False, vflip=False)
    off = AugmentConfig(**base)
    on = AugmentConfig(**base, color_jitter=0.4, color_jitter_p=1.0)
    never = AugmentConfig(**base, color_jitter=0.4, color_jitter_p=0.0)
    changed = 0
    for seed in range(6):
        torch.manual_seed(seed)
        plain_image, plain_mask = train_transform(image, mask, off, 32, 255)
        torch.manual_seed(seed)
        jit_image, jit_mask = train_transform(image, mask, on, 32, 255)
        torch.manual_seed(seed)
        never_image, never_mask = train_transform(image, mask, never, 32, 255)
        # Jitter comes last: same geometry, label identical; the image stays in uint8 range.
        assert torch.equal(plain_mask, jit_mask) and torch.equal(plain_mask, never_mask)
        assert torch.equal(plain_image, never_image)
        assert jit_image.min() >= 0 and jit_image.max() <= 255
        changed += not torch.allclose(plain_image, jit_image)
    assert changed == 6
