"""Reload-Mamba: network shapes, gradients, parameter count, and its training objective's terms
checked against hand-computed values and direct re-computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from rsseg.errors import UsageError
from rsseg.models import count_parameters, create_model, parameter_count
from rsseg.models.reload_mamba import (
    ReloadLevel,
    boundary_mask,
    boundary_weighted_cross_entropy,
    lovasz_softmax,
    multilevel_aux_cross_entropy,
    normalized_class_entropy,
    ohem_cross_entropy,
    prior_boundary_bce,
)

IGNORE = 9
# A 4 x 5 label map with an ignored corner, and its boundary mask worked out by hand: a valid
# pixel is a boundary when its valid 3x3 neighbours (itself included) hold two or more classes.
LABELS = torch.tensor(
    [
        [0, 0, 1, 1, 1],
        [0, 0, 1, 1, 1],
        [0, 0, 0, 9, 9],
        [2, 2, 0, 9, 9],
    ]
)
BOUNDARY = torch.tensor(
    [
        [0, 1, 1, 0, 0],
        [0, 1, 1, 1, 0],  # (1, 4) sees only 1s and ignored pixels: not a boundary
        [1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0],
    ],
    dtype=torch.bool,
)


def manual_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pixel -log softmax(logits)[target] for (1, K, H, W) logits, target clamped to a class."""
    probs = logits.exp() / logits.exp().sum(dim=1, keepdim=True)
    picked = probs.gather(1, target.clamp(max=logits.shape[1] - 1)[:, None])[:, 0]
    return -picked.log()


# ---------------------------------------------------------------------------- label-derived targets


def test_boundary_mask_matches_hand_computed_map() -> None:
    assert torch.equal(boundary_mask(LABELS[None], IGNORE)[0], BOUNDARY)


def test_normalized_entropy_matches_hand_computed_values() -> None:
    probs = torch.tensor([[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3], [1.0 - 2e-9, 1e-9, 1e-9]])
    logits = probs.log().t().reshape(1, 3, 3, 1)  # three pixels, K = 3
    entropy = normalized_class_entropy(logits).flatten()
    # H(0.5, 0.25, 0.25) = 1.5 ln 2, divided by ln 3; uniform -> 1; (almost) one-hot -> 0.
    expected = torch.tensor([1.5 * math.log(2) / math.log(3), 1.0, 0.0])
    assert torch.allclose(entropy, expected, atol=1e-6)
    assert torch.equal(normalized_class_entropy(torch.randn(2, 1, 3, 3)), torch.zeros(2, 1, 3, 3))


# ---------------------------------------------------------------------------- loss terms


def lovasz_direct(probs: np.ndarray, labels: np.ndarray, ignore: int) -> float:
    """Lovasz-Softmax by its definition: for each present class c, the Lovasz extension of the
    Jaccard loss Delta(S) = |S| / |G_c u S| at the errors m = |1[y=c] - p_c|, evaluated as
    sum_k (m_(k) - m_(k+1)) Delta({top-k errors}); then the mean over present classes."""
    keep = labels != ignore
    probs, labels = probs[keep], labels[keep]
    per_class = []
    for c in range(probs.shape[1]):
        truth = set(np.flatnonzero(labels == c).tolist())
        if not truth:
            continue
        errors = np.abs((labels == c).astype(float) - probs[:, c])
        order = np.argsort(-errors, kind="stable")
        sorted_errors = np.append(errors[order], 0.0)
        value = 0.0
        for k in range(1, len(order) + 1):
            top = set(order[:k].tolist())
            value += (sorted_errors[k - 1] - sorted_errors[k]) * len(top) / len(truth | top)
        per_class.append(value)
    return float(np.mean(per_class))


def test_lovasz_matches_direct_computation_and_ignores_void() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 2, 4)
    target = torch.tensor([[[0, 0, 1, IGNORE], [1, 2, IGNORE, 0]]])  # class 3 absent
    probs = logits.double().softmax(1)[0].reshape(4, -1).t().numpy()
    expected = lovasz_direct(probs, target.flatten().numpy(), IGNORE)
    got = lovasz_softmax(logits, target, IGNORE)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # Scores at ignored pixels must not matter.
    changed = logits.clone()
    changed[0, :, 0, 3] = torch.tensor([9.0, -9.0, 3.0, 0.0])
    assert lovasz_softmax(changed, target, IGNORE).item() == pytest.approx(expected, rel=1e-5)


def test_ohem_keeps_the_hardest_valid_pixels() -> None:
    torch.manual_seed(1)
    logits = torch.randn(1, 3, 4, 5, dtype=torch.float64)
    target = LABELS[None].clamp(max=2).masked_fill(LABELS[None] == IGNORE, IGNORE)
    per_pixel = manual_cross_entropy(logits, target)[target != IGNORE]  # 16 valid pixels
    hardest = per_pixel.sort(descending=True).values
    assert ohem_cross_entropy(logits, target, IGNORE, 0.25).item() == pytest.approx(
        hardest[:4].mean().item()
    )
    assert ohem_cross_entropy(logits, target, IGNORE, 0.3).item() == pytest.approx(
        hardest[:5].mean().item()  # ceil(0.3 * 16) = 5
    )
    assert ohem_cross_entropy(logits, target, IGNORE, 1.0).item() == pytest.approx(
        per_pixel.mean().item()
    )


def test_boundary_weighted_cross_entropy_matches_manual_weights() -> None:
    torch.manual_seed(2)
    logits = torch.randn(1, 3, 4, 5, dtype=torch.float64)
    target = LABELS[None].clamp(max=2).masked_fill(LABELS[None] == IGNORE, IGNORE)
    valid = target[0] != IGNORE
    ce = manual_cross_entropy(logits, target)[0]
    weights = (1.0 + 4.0 * BOUNDARY.double()) * valid
    expected = (weights * ce.where(valid, 0.0)).sum() / weights.sum()
    got = boundary_weighted_cross_entropy(logits, target, IGNORE, boundary_gain=4.0)
    assert got.item() == pytest.approx(expected.item())


def test_prior_loss_uses_max_pooled_boundaries_on_valid_cells() -> None:
    labels = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0], [9, 9, 1, 1], [9, 9, 1, 1]])[None]
    # Hand-worked: boundary pixels (1,1) (1,2) (1,3) (2,2) (2,3); 2x2 max-pooling gives target 1 in
    # the top-left, top-right and bottom-right cells; the bottom-left cell is all ignored.
    logits = torch.tensor([[[[0.5, -1.0], [3.0, 2.0]]]], dtype=torch.float64)
    expected = np.mean([math.log1p(math.exp(-x)) for x in (0.5, -1.0, 2.0)])  # -log sigmoid
    assert prior_boundary_bce([logits], labels, IGNORE).item() == pytest.approx(expected)


def test_aux_loss_uses_nearest_downsampled_labels() -> None:
    torch.manual_seed(3)
    target = torch.tensor([[0, 1, 2, 2], [1, 1, 2, 2], [9, 0, 1, 1], [0, 0, 1, 1]])[None]
    small = target[:, ::2, ::2]  # nearest at half size: [[0, 2], [9, 1]]
    logits = torch.randn(1, 3, 2, 2, dtype=torch.float64)
    ce = manual_cross_entropy(logits, small)[small != IGNORE]
    assert multilevel_aux_cross_entropy([logits, logits], target, IGNORE).item() == pytest.approx(
        ce.mean().item()
    )


# ---------------------------------------------------------------------------- the network


def test_reload_gate_is_bounded_by_max_reload_and_the_prior() -> None:
    """F_r = F_ctx + R (F - F_ctx) with R = max_reload * G * P (Eqs. 18-19): with max_reload = 0 the
    gate cannot matter; with a prior of zero neither; otherwise it does."""
    torch.manual_seed(7)
    x = torch.randn(1, 8, 6, 5)

    def restored_before_and_after_gate_change(level: ReloadLevel) -> tuple[torch.Tensor, ...]:
        level.eval()
        with torch.no_grad():
            before = level(x)[0]
            level.gate[-1].bias.add_(3.0)  # opens the gate everywhere
            after = level(x)[0]
        return before, after

    closed = ReloadLevel(8, 8, num_classes=3, max_reload=0.0)
    assert torch.equal(*restored_before_and_after_gate_change(closed))
    no_prior = ReloadLevel(8, 8, num_classes=3, max_reload=0.7)
    with torch.no_grad():
        no_prior.prior[-1].bias.fill_(-1e4)  # P = sigmoid(-1e4) = 0
    assert torch.equal(*restored_before_and_after_gate_change(no_prior))
    open_level = ReloadLevel(8, 8, num_classes=3, max_reload=0.7)
    before, after = restored_before_and_after_gate_change(open_level)
    assert not torch.allclose(before, after)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("reload-mamba", num_classes=4, in_channels=4)


def test_training_step_odd_size_shapes_and_every_parameter_gets_a_gradient(model) -> None:
    torch.manual_seed(4)
    model.train()
    model.zero_grad(set_to_none=True)
    x = torch.randn(2, 4, 37, 47)
    target = torch.randint(0, 4, (2, 37, 47))
    target[:, :5] = 4  # an ignored strip (ignore index = num_classes)
    outputs = model(x)
    assert set(outputs) == {"out", "aux", "prior"}
    assert outputs["out"].shape == (2, 4, 37, 47)
    # ConvNeXt floors each stage: 37x47 -> 9x11 (1/4), 4x5 (1/8), 2x2 (1/16); coarse level first.
    sizes = [(2, 2), (4, 5), (9, 11)]
    assert [tuple(a.shape) for a in outputs["aux"]] == [(2, 4, *s) for s in sizes]
    assert [tuple(p.shape) for p in outputs["prior"]] == [(2, 1, *s) for s in sizes]

    loss = model.compute_loss(outputs, target, ignore_index=4)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    missing = [
        name
        for name, p in model.named_parameters()
        if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0
    ]
    assert missing == []


def test_inference_returns_only_final_logits_at_input_size(model) -> None:
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, 4, 33, 50))
    assert isinstance(out, torch.Tensor)
    assert out.shape == (1, 4, 33, 50)
    with pytest.raises(UsageError, match="at least 32x32"):
        model(torch.randn(1, 4, 31, 64))


def test_loss_ignores_scores_at_ignored_pixels(model) -> None:
    torch.manual_seed(5)
    logits = torch.randn(2, 4, 16, 16)
    target = torch.randint(0, 4, (2, 16, 16))
    target[0, 3:9, 2:7] = 4
    changed = logits.clone()
    changed[0, :, 3:9, 2:7] = 50.0 * torch.randn(4, 6, 5)
    base = model.compute_loss(logits, target, ignore_index=4)
    assert model.compute_loss(changed, target, ignore_index=4).item() == pytest.approx(base.item())


def test_parameter_count_near_paper_and_groups_partition_the_model() -> None:
    total = parameter_count("reload-mamba", num_classes=150)
    assert abs(total - 51e6) / 51e6 < 0.07  # paper: ~51 M with 150 classes (Section 4.5)
    with torch.device("meta"):
        net = create_model("reload-mamba", num_classes=150)
        reference_encoder = timm.create_model("convnext_tiny", features_only=True)
    groups = net.parameter_groups()
    ids = [id(p) for params in groups.values() for p in params]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in net.parameters()}
    assert sum(p.numel() for p in groups["encoder"]) == count_parameters(reference_encoder)
    assert count_parameters(net) == total


def test_local_encoder_weights_are_loaded_and_missing_file_refused(tmp_path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(6)
    source = timm.create_model("convnext_tiny", pretrained=False)
    path = tmp_path / "convnext_tiny.safetensors"
    save_file(source.state_dict(), str(path))
    net = create_model("reload-mamba", num_classes=3, pretrained=str(path))
    loaded = net.encoder.stages_3.blocks[2].mlp.fc2.weight
    assert torch.equal(loaded, source.stages[3].blocks[2].mlp.fc2.weight)
    with pytest.raises(UsageError, match="not found"):
        create_model("reload-mamba", num_classes=3, pretrained=str(tmp_path / "nope.pth"))
