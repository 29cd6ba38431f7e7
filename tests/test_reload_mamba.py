"""Reload-Mamba: network shapes, gradients, parameter count, and its training objective's terms
checked against hand-computed values and direct re-computations."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from rsseg.errors import UsageError
from rsseg.models import count_parameters, create_model, parameter_count
from rsseg.models.reload_mamba import (
    ABLATIONS,
    ReloadLevel,
    boundary_mask,
    boundary_weighted_cross_entropy,
    lovasz_softmax,
    multilevel_aux_cross_entropy,
    normalized_class_entropy,
    ohem_cross_entropy,
    prior_boundary_bce,
)
from rsseg.models.ssm import FourDirectionMamba

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
    # Eq. (9) sums the levels: adding a 1x1 level whose (only) cell is a boundary adds its BCE.
    coarse = torch.tensor([[[[0.3]]]], dtype=torch.float64)
    assert prior_boundary_bce([logits, coarse], labels, IGNORE).item() == pytest.approx(
        expected + math.log1p(math.exp(-0.3))
    )


def test_aux_loss_uses_nearest_downsampled_labels() -> None:
    torch.manual_seed(3)
    target = torch.tensor([[0, 1, 2, 2], [1, 1, 2, 2], [9, 0, 1, 1], [0, 0, 1, 1]])[None]
    small = target[:, ::2, ::2]  # nearest at half size: [[0, 2], [9, 1]]
    logits = torch.randn(1, 3, 2, 2, dtype=torch.float64)
    ce = manual_cross_entropy(logits, small)[small != IGNORE]
    # Eq. (34) sums the levels' CE: two identical heads give twice one head's mean CE.
    assert multilevel_aux_cross_entropy([logits, logits], target, IGNORE).item() == pytest.approx(
        2 * ce.mean().item()
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


# ---------------------------------------------------------------------------- capacity (Section 4.5)

# Section 4.5 breakdown (M parameters, 150 classes) and Table 14's width sweep.
PAPER_GROUPS = {
    "encoder": 28.0,
    "decoder": 5.0,
    "mamba_blocks_and_gates": 14.0,
    "aux_heads_and_fusion": 1.5,
    "edge_prior_and_head": 2.5,
}
PAPER_WIDTH_SWEEP = {(96, 96, 96): 47e6, (192, 128, 96): 51e6, (256, 192, 96): 56e6, (384, 192, 96): 62e6}


def meta_model(**cfg) -> torch.nn.Module:
    with torch.device("meta"):
        return create_model("reload-mamba", num_classes=cfg.pop("num_classes", 150), **cfg)


def group_sizes(net) -> dict[str, int]:
    return {name: sum(p.numel() for p in params) for name, params in net.parameter_groups().items()}


def test_parameter_groups_match_section_4_5_and_partition_the_model() -> None:
    net = meta_model()
    groups = net.parameter_groups()
    ids = [id(p) for params in groups.values() for p in params]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in net.parameters()}
    total = count_parameters(net)
    assert total == parameter_count("reload-mamba", num_classes=150)
    assert abs(total - 51e6) / 51e6 < 0.03
    sizes = group_sizes(net)
    with torch.device("meta"):
        reference_encoder = timm.create_model("convnext_tiny", features_only=True)
    assert sizes["encoder"] == count_parameters(reference_encoder)
    for name, paper in PAPER_GROUPS.items():
        assert abs(sizes[name] / 1e6 - paper) / paper < 0.07, (name, sizes[name])


@pytest.mark.parametrize("widths", list(PAPER_WIDTH_SWEEP))
def test_width_sweep_within_seven_percent_of_table_14(widths) -> None:
    total = parameter_count("reload-mamba", num_classes=150, widths=widths)
    assert abs(total - PAPER_WIDTH_SWEEP[widths]) / PAPER_WIDTH_SWEEP[widths] < 0.07
    # Only the Mamba scans and their attention follow the widths: the head and edge branch stay.
    assert group_sizes(meta_model(widths=widths))["edge_prior_and_head"] == group_sizes(
        meta_model()
    )["edge_prior_and_head"]


# ---------------------------------------------------------------------------- ablation switches

DECODER_WIDTHS = {"D3": 384, "D2": 192, "D1": 96}


def test_every_named_ablation_builds_and_unknown_names_and_bad_combinations_are_refused() -> None:
    for name in ABLATIONS:
        assert count_parameters(meta_model(ablation=name)) > 0, name
    with pytest.raises(UsageError, match="unknown ablation"):
        meta_model(ablation="table99/x")
    with pytest.raises(UsageError, match="gate_uncertainty needs an aux_head"):
        meta_model(aux_head=None)
    with pytest.raises(UsageError, match="directions"):
        meta_model(directions=["right", "diagonal"])
    with pytest.raises(UsageError, match="levels"):
        meta_model(levels=["D4"])


def test_gate_input_switches_remove_exactly_their_input_channels() -> None:
    full = count_parameters(meta_model())
    # U is one input channel of the gate's first 3x3 conv (C outputs) at each level.
    assert full - count_parameters(meta_model(gate_uncertainty=False)) == sum(
        9 * c for c in DECODER_WIDTHS.values()
    )
    # F - F_ctx is C input channels of that conv.
    assert full - count_parameters(meta_model(gate_change=False)) == sum(
        9 * c * c for c in DECODER_WIDTHS.values()
    )
    # Prior modulation, gate scaling, prior supervision and aux placement change no parameter.
    for cfg in ({"gate_prior": False}, {"max_reload": 1.0}, {"prior_supervision": False},
                {"aux_head": "post"}):
        assert count_parameters(meta_model(**cfg)) == full, cfg


def test_restore_modes_and_table_5_rows_have_the_modules_the_tables_imply() -> None:
    context = meta_model(ablation="table7/context-only")
    assert all(level.gate is None and level.prior is None for level in context.levels.values())
    assert all(level.aux_head is not None for level in context.levels.values())
    baseline = meta_model(ablation="table5/baseline")
    assert len(baseline.levels) == 0 and baseline.edge_prior is None and len(baseline.fusions) == 0
    edge = meta_model(ablation="table5/edge-prior")
    assert edge.edge_prior is not None
    assert count_parameters(edge) - count_parameters(baseline) == count_parameters(edge.edge_prior) + (
        32 * 64  # the detail fusion's first 1x1 conv also reads the 32 edge channels
    )
    scan = meta_model(ablation="table5/directional-scan")
    (level,) = scan.levels.values()
    assert list(scan.levels) == ["D1"] and level.gate is None and level.prior is None
    assert level.aux_head is None
    gate = meta_model(ablation="table5/single-level-gate")
    assert gate.levels["D1"].gate is not None and gate.levels["D1"].aux_head is None
    assert not gate.prior_supervision


def test_level_placement_builds_the_fusions_from_the_coarsest_reloaded_level() -> None:
    assert list(meta_model().fusions) == ["D2", "D1"]
    d3 = meta_model(ablation="table10/D3")
    assert list(d3.levels) == ["D3"] and list(d3.fusions) == ["D2", "D1"]
    d1 = meta_model(ablation="table10/D1")
    assert list(d1.levels) == ["D1"] and list(d1.fusions) == []
    d21 = meta_model(ablation="table10/D2+D1")
    assert list(d21.levels) == ["D2", "D1"] and list(d21.fusions) == ["D1"]
    post = meta_model(ablation="table10/post-upsampling")
    assert len(post.levels) == 0 and post.head.post_level is not None
    # The post-upsampling level counts with the Reload modules, not with the head.
    assert group_sizes(post)["edge_prior_and_head"] == group_sizes(meta_model())["edge_prior_and_head"]


def test_direction_switch_keeps_k_of_four_scans_and_drops_attention_for_one() -> None:
    full = meta_model()
    for directions in (["right"], ["down", "up"], ["right", "left", "down"]):
        net = meta_model(directions=directions)
        for name, level in net.levels.items():
            four = count_parameters(full.levels[name].scans)
            assert count_parameters(level.scans) * 4 == four * len(directions)
            assert (level.direction_attention is None) == (len(directions) == 1)


def test_direction_subset_scans_equal_the_same_directions_of_the_four_direction_block() -> None:
    torch.manual_seed(8)
    subset = FourDirectionMamba(6, d_state=4, directions=("left", "up"))
    four = FourDirectionMamba(6, d_state=4)
    idx, di = subset.index, four.d_inner
    rows = torch.cat([torch.arange(i * di, (i + 1) * di) for i in idx])
    with torch.no_grad():
        for name in ("in_proj_weight", "x_proj_weight", "dt_proj_weight", "dt_proj_bias",
                     "out_proj_weight"):
            getattr(four, name)[idx] = getattr(subset, name)
        four.A_log[rows] = subset.A_log
        four.D[rows] = subset.D
        four.conv1d.weight[rows] = subset.conv1d.weight
        four.conv1d.bias[rows] = subset.conv1d.bias
        x = torch.randn(2, 6, 5, 7)
        assert torch.allclose(subset(x), four(x)[:, idx], atol=1e-5)


@pytest.mark.parametrize("name", ["table5/scan+edge-prior", "table7/residual", "table8/two-axis",
                                  "table10/D3+D1", "table10/post-upsampling", "table13/post-reload"])
def test_ablation_variants_train_and_predict(name) -> None:
    torch.manual_seed(9)
    net = create_model("reload-mamba", num_classes=3, ablation=name)
    net.train()
    outputs = net(torch.randn(1, 3, 32, 40))
    assert outputs["out"].shape == (1, 3, 32, 40)
    loss = net.compute_loss(outputs, torch.randint(0, 3, (1, 32, 40)), ignore_index=3)
    assert torch.isfinite(loss)
    loss.backward()
    net.eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 32, 40)).shape == (1, 3, 32, 40)


def test_aux_head_placement_pre_reload_is_independent_of_the_gate_post_reload_is_not() -> None:
    x = torch.randn(1, 8, 6, 5)
    for placement, depends in (("pre", False), ("post", True)):
        torch.manual_seed(10)
        level = ReloadLevel(8, 8, num_classes=3, aux_head=placement).eval()
        with torch.no_grad():
            before = level(x)[1]
            level.gate[-1].bias.add_(3.0)
            after = level(x)[1]
        assert torch.allclose(before, after) != depends, placement


def test_prior_supervision_switch_drops_the_prior_term() -> None:
    torch.manual_seed(11)
    target = torch.randint(0, 3, (1, 16, 16))
    outputs = {"out": torch.randn(1, 3, 16, 16), "aux": [torch.randn(1, 3, 4, 4)],
               "prior": [torch.randn(1, 1, 4, 4)]}
    changed = {**outputs, "prior": [torch.randn(1, 1, 4, 4) * 5]}
    implicit = meta_model(num_classes=3, prior_supervision=False)
    explicit = meta_model(num_classes=3)
    assert implicit.compute_loss(outputs, target, 3).item() == pytest.approx(
        implicit.compute_loss(changed, target, 3).item()
    )
    assert explicit.compute_loss(outputs, target, 3).item() != pytest.approx(
        explicit.compute_loss(changed, target, 3).item()
    )


# ---------------------------------------------------------------------------- encoder weights


def fb_layout(timm_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's ConvNeXt names -> the original Facebook release's (the inverse of timm's
    checkpoint_filter_fn rules: downsample_layers, stages.i.j, dwconv, pwconv, norm, head)."""
    fb = {}
    for key, value in timm_state.items():
        k = key.replace("stem.", "downsample_layers.0.")
        k = re.sub(r"stages\.(\d+)\.downsample\.", r"downsample_layers.\1.", k)
        k = re.sub(r"stages\.(\d+)\.blocks\.(\d+)", r"stages.\1.\2", k)
        k = k.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv")
        k = k.replace("head.norm.", "norm.").replace("head.fc.", "head.")
        fb[k] = value
    return fb


@pytest.fixture(scope="module")
def imagenet_state() -> dict[str, torch.Tensor]:
    """Random values under timm's own convnext_tiny names and shapes (1000 classes)."""
    torch.manual_seed(12)
    shapes = timm.create_model("convnext_tiny", pretrained=False).state_dict()
    return {k: torch.randn(v.shape) for k, v in shapes.items()}


def assert_encoder_holds(net, state: dict[str, torch.Tensor]) -> None:
    loaded = net.encoder.state_dict()
    backbone = {k: v for k, v in state.items() if not k.startswith("head.")}
    assert len(loaded) == len(backbone)
    for key, value in backbone.items():
        features_key = re.sub(r"^(stem|stages)\.(\d+)", r"\1_\2", key)
        assert torch.equal(loaded[features_key], value), key


def test_timm_layout_weights_land_in_the_encoder(tmp_path, imagenet_state) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file(imagenet_state, str(path))
    net = create_model("reload-mamba", num_classes=3, pretrained=str(path))
    assert_encoder_holds(net, imagenet_state)


def test_facebook_layout_weights_land_in_the_encoder(tmp_path, imagenet_state) -> None:
    fb = fb_layout(imagenet_state)
    assert "downsample_layers.0.0.weight" in fb and "stages.3.2.pwconv2.weight" in fb
    assert "norm.weight" in fb and not any(k.startswith("head.norm") for k in fb)
    path = tmp_path / "convnext_tiny_1k_224_ema.pth"
    torch.save({"model": fb}, path)
    net = create_model("reload-mamba", num_classes=3, pretrained=str(path))
    assert_encoder_holds(net, imagenet_state)


def test_weights_that_do_not_fit_are_refused_in_one_line(tmp_path, imagenet_state) -> None:
    with pytest.raises(UsageError, match="not found"):
        create_model("reload-mamba", num_classes=3, pretrained=str(tmp_path / "nope.pth"))
    truncated = tmp_path / "truncated.pth"
    torch.save({"model": fb_layout(imagenet_state)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    with pytest.raises(UsageError) as refused:
        create_model("reload-mamba", num_classes=3, pretrained=str(truncated))
    assert "\n" not in str(refused.value)
    partial = {k: v for k, v in imagenet_state.items() if ".stages.3." not in f".{k}"}
    path = tmp_path / "partial.pth"
    torch.save(partial, path)
    with pytest.raises(UsageError, match="missing") as refused:
        create_model("reload-mamba", num_classes=3, pretrained=str(path))
    assert "\n" not in str(refused.value)
