"""A2Mamba / SegMAN-V2: A2SSM against the plain scan, map re-use, the released-model pieces
(RoPE, shared tables, DLA values, stage-4 bias, head fusion), official-layout checkpoints,
shapes, gradients, parameter counts, training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import rsseg.models.a2mamba as a2m
from rsseg.models.a2mamba import (
    A2MAMBA_SIZES,
    MASS,
    A2Mamba,
    A2MambaSize,
    A2SSM,
    PaperMASS,
    RotaryEmbedding2d,
    apply_rope,
)
from rsseg.models.checkpoints import CheckpointError, adapt_stem
from rsseg.models.neighborhood_attention import adaptive_dilation, self_index
from rsseg.models.registry import count_parameters, create_model, list_models, parameter_count
from rsseg.models.segman_v2 import RELEASED_HEAD_KEYS, DecoderWidths, SegMANV2, load_backbone_weights
from rsseg.models.ssm import selective_scan, selective_scan_states

# A toy size so that training-style tests stay fast on a 2-core CI machine.
TOY_SIZE = A2MambaSize(dims=(16, 16, 32, 32), depths=(1, 1, 1, 1), heads=(2, 2, 2, 2), windows=(5, 3, 3, 3))
TOY_WIDTHS = DecoderWidths(proj=16, dim=16, low=8, refine_heads=2)

# Key names and shapes of the released model's state_dict() for each size, dumped once from the
# authors' released definition (see the fixture's "source"); "shared" maps a key to the key whose
# tensor it aliases (SLA and DLA share one position table).
OFFICIAL = json.loads((Path(__file__).parent / "fixtures" / "a2mamba_official_keys.json").read_text())["sizes"]
SIZES = ("nano", "tiny", "small", "base", "large")


@pytest.mark.parametrize("fusion_heads", [None, 2])
def test_a2ssm_without_maps_is_the_plain_selective_scan(fusion_heads):
    # Independent reference: the SSM library's own scan with C and D (y = C h + D u).
    torch.manual_seed(0)
    ssm = A2SSM(8, fusion_heads=fusion_heads).double()
    y = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    u, delta, a, b, c = ssm.scan_inputs(y)
    expected = selective_scan(u, delta, a, b, c, D=ssm.Ds, delta_bias=ssm.dt_projs_bias, delta_softplus=True)
    torch.testing.assert_close(ssm(y).reshape(2, 8, 30), expected)


def test_state_fusion_mixes_heads_after_the_maps():
    # Released A2SSM: after re-aggregation, head i's states become sum_j W[i, j] S_j + b_i
    # (one weight per head pair, shared by every channel and position of the head).
    torch.manual_seed(1)
    ssm = A2SSM(6, fusion_heads=3).double()
    with torch.no_grad():
        ssm.state_fusion.weight.copy_(torch.randn(3, 3, 1, 1))
        ssm.state_fusion.bias.copy_(torch.randn(3))
    y = torch.randn(1, 6, 4, 5, dtype=torch.float64)
    u, delta, a, b, c = ssm.scan_inputs(y)
    states = selective_scan_states(u, delta, a, b, ssm.dt_projs_bias, True)[:, :, 0]  # (1, 6, 20)
    heads = states.reshape(1, 3, 2, 20)
    weight, bias = ssm.state_fusion.weight[:, :, 0, 0], ssm.state_fusion.bias
    fused = torch.einsum("ij,bjcl->bicl", weight, heads) + bias[None, :, None, None]
    expected = fused.reshape(1, 6, 20) * c + u * ssm.Ds[:, None]
    torch.testing.assert_close(ssm(y, lambda s: s).reshape(1, 6, 20), expected)


def _toy_paper_mass(seed: int = 0) -> PaperMASS:
    torch.manual_seed(seed)
    mass = PaperMASS(dim=8, num_heads=2, kernel_size=3).double()
    with torch.no_grad():  # non-zero position bias so both bias tables matter
        mass.rpb_sla.normal_()
        mass.rpb_dla.normal_()
    return mass


def test_identity_maps_reduce_a2ssm_to_the_scan_and_real_maps_change_it(monkeypatch):
    mass = _toy_paper_mass()
    h, w = 9, 10
    x = torch.randn(1, 8, h, w, dtype=torch.float64)
    y, reaggregate = mass.attend(x)
    plain = mass.ssm(y)
    augmented = mass.ssm(y, reaggregate)
    # the maps really act on the states: compare against the state term C*h alone (D*u is shared)
    u = mass.ssm.scan_inputs(y)[0].reshape_as(y)
    state_term = plain - u * mass.ssm.Ds[:, None, None]
    assert (augmented - plain).norm() > 0.1 * state_term.norm()

    # The same re-aggregation path with one-hot "attend to yourself" maps is the identity.
    k, dil = 3, adaptive_dilation(h, w, 3)
    eye = {
        d: F.one_hot(self_index(h, w, k, d), k * k).double()[None, None] for d in ((1, 1), dil)
    }
    original = a2m.neighbourhood_aggregate

    def identity_maps(attn, v, kernel, dilation):
        return original(eye[tuple(dilation)].expand_as(attn), v, kernel, dilation)

    monkeypatch.setattr(a2m, "neighbourhood_aggregate", identity_maps)
    _, reaggregate_eye = mass.attend(x)
    torch.testing.assert_close(mass.ssm(y, reaggregate_eye), plain)


def test_attention_maps_break_the_scan_causality():
    # A row-major scan's output at the first pixel cannot depend on the last pixel; after the
    # DLA map (whose dilated window spans the whole map) re-aggregates the states, it must.
    mass = _toy_paper_mass(1)
    x = torch.randn(1, 8, 9, 9, dtype=torch.float64)
    y, reaggregate = mass.attend(x)
    y = y.detach().requires_grad_(True)
    for maps, should_depend in ((None, False), (reaggregate, True)):
        out = mass.ssm(y, maps)
        (grad,) = torch.autograd.grad(out[0, :, 0, 0].sum(), y, retain_graph=True)
        far = grad[0, :, -1, -1].abs().max().item()
        assert (far > 0) == should_depend, (maps, far)


def test_global_paper_mass_attention_matches_torch_sdpa():
    # MM-Refine's MASS uses global attention: compare Y with torch's scaled_dot_product_attention.
    torch.manual_seed(4)
    mass = PaperMASS(dim=12, num_heads=4, mode="global").double()
    x = torch.randn(2, 12, 3, 5, dtype=torch.float64)
    y, _ = mass.attend(x)
    q, k, v = (t.reshape(2, 4, 3, 15).transpose(-1, -2) for t in mass.qkv(x).chunk(3, dim=1))
    expected = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(2, 12, 3, 5)
    torch.testing.assert_close(y, expected)


# --- released-model pieces -------------------------------------------------------------------


def test_rope_logits_depend_only_on_the_relative_offset():
    # RoPE's point: <R(p) q, R(p') k> is a function of p - p' (row and column separately).
    torch.manual_seed(2)
    rope = RotaryEmbedding2d(dim=16, num_heads=2).double()  # head dim 8
    h, w = 6, 7
    sin, cos = rope(h, w)
    q, k = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    rq = apply_rope(q.expand(h, w, 8), (sin, cos))
    rk = apply_rope(k.expand(h, w, 8), (sin, cos))
    torch.testing.assert_close(rq.norm(dim=-1), q.norm().expand(h, w))  # a rotation
    same_offset = [(rq[i + 2, j + 1] * rk[i, j]).sum() for i in range(3) for j in range(4)]
    torch.testing.assert_close(torch.stack(same_offset), same_offset[0].expand(12))
    assert not torch.allclose((rq[3, 1] * rk[0, 0]).sum(), (rq[1, 3] * rk[0, 0]).sum())
    # the angles are the loaded buffer: changing it changes the phases
    with torch.no_grad():
        rope.angle.mul_(2)
    assert not torch.allclose(rope(h, w)[0], sin)


def test_sla_and_dla_share_one_table_stored_under_two_keys():
    mass = MASS(dim=16, num_heads=4, kernel_size=3)
    assert mass.rpb[0] is mass.rpb[1]
    keys = [k for k in mass.state_dict() if k.startswith("rpb.")]
    assert keys == ["rpb.0", "rpb.1"]
    table = (4 // 2) * (2 * 3 - 1) ** 2  # (heads / 2) x (2K - 1)^2
    stored = sum(v.numel() for k, v in mass.state_dict().items() if k.startswith("rpb."))
    assert stored == 2 * table  # the checkpoint holds it twice ...
    assert count_parameters(mass) == count_parameters(MASS(16, 4, 3)) and sum(
        p.numel() for n, p in mass.named_parameters() if n.startswith("rpb")
    ) == table  # ... the model trains it once


def test_dla_aggregates_the_sla_output_plus_its_own_values(monkeypatch):
    torch.manual_seed(5)
    mass = MASS(dim=16, num_heads=4, kernel_size=3).double().eval()
    calls = []
    original = a2m.neighbourhood_attention

    def recording(q, k, v, kernel, dilation, rpb):
        out = original(q, k, v, kernel, dilation, rpb)
        calls.append((v, out[0], dilation))
        return out

    monkeypatch.setattr(a2m, "neighbourhood_attention", recording)
    x = torch.randn(1, 16, 8, 9, dtype=torch.float64)
    sin_cos = RotaryEmbedding2d(16, 4).double()(8, 9)
    mass(x, sin_cos)
    (v_sla, y_sla, dil_sla), (v_dla, _, dil_dla) = calls
    v = a2m._heads_last(mass.qkv(x)[:, 32:], 4)
    torch.testing.assert_close(v_sla, v[:, :2])
    torch.testing.assert_close(v_dla, y_sla + v[:, 2:])
    assert dil_sla == (1, 1) and dil_dla == (2, 3)


def test_stage4_global_bias_is_added_and_resized():
    torch.manual_seed(6)
    mass = MASS(dim=16, num_heads=4, kernel_size=3, global_attention=True, global_tokens=9).double()
    assert mass.ssm is None and mass.rpb[2].shape == (1, 4, 9, 9)
    with torch.no_grad():
        mass.rpb[2].normal_()
    torch.testing.assert_close(mass.global_bias(9), mass.rpb[2])
    resized = mass.global_bias(16)
    assert resized.shape == (1, 4, 16, 16)
    expected = F.interpolate(mass.rpb[2], size=(16, 16), mode="bicubic", align_corners=False)
    torch.testing.assert_close(resized, expected)
    # global attention of all heads over Y with that bias, checked against torch's SDPA
    q, k = (torch.randn(1, 4, 3, 3, 4, dtype=torch.float64) for _ in range(2))
    y = torch.randn(1, 4, 3, 3, 4, dtype=torch.float64)
    attn = a2m._global_attention(q, k, mass.global_bias(9))
    out = a2m._global_aggregate(attn, y).reshape(1, 4, 9, 4)
    expected = F.scaled_dot_product_attention(
        q.reshape(1, 4, 9, 4), k.reshape(1, 4, 9, 4), y.reshape(1, 4, 9, 4), attn_mask=mass.rpb[2], scale=1.0
    )
    torch.testing.assert_close(out, expected)


def test_layer_scale_and_res_scale_follow_the_released_sizes():
    small, base = A2MAMBA_SIZES["small"], A2MAMBA_SIZES["base"]
    assert small.res_scale == (False, False, True, True) and not any(small.layer_scale)
    block = a2m.A2MambaBlock(32, 2, 3, res_scale=True, scale_init=0.5)
    assert block.layer_scale1.weight.shape == (32, 1, 1, 1)
    torch.testing.assert_close(block.layer_scale1.weight, torch.full((32, 1, 1, 1), 0.5))
    assert base.scale_init == (1.0, 1.0, 1e-6, 1e-6) and all(base.layer_scale)
    # res-scale scales the shortcut: with both branches and both DW convs zeroed, out = s2(s1(x))
    torch.manual_seed(7)
    with torch.no_grad():
        for conv in (block.token_mixer.proj[1], block.mlp.fc2, block.cpe1, block.cpe2):
            conv.weight.zero_()
            conv.bias.zero_()
        block.layer_scale1.bias.fill_(0.25)
    x = torch.randn(1, 32, 5, 5)
    out = block(x, RotaryEmbedding2d(32, 2)(5, 5))
    torch.testing.assert_close(out, (x * 0.5 + 0.25) * 0.5)


@pytest.mark.parametrize("name", SIZES)
def test_backbone_keys_and_shapes_are_the_released_state_dict(name):
    with torch.device("meta"):
        backbone = A2Mamba(A2MAMBA_SIZES[name])
    own = {k: list(v.shape) for k, v in backbone.state_dict().items()}
    official = {k: v for k, v in OFFICIAL[name]["tensors"].items() if k not in RELEASED_HEAD_KEYS}
    assert own == official
    assert set(OFFICIAL[name]["tensors"]) - set(official) == set(RELEASED_HEAD_KEYS)


# Released classification sizes (README of the released repo, M, with the 1000-class head).
RELEASED_PARAMS = {"nano": 4, "tiny": 15, "small": 31, "base": 51, "large": 95}


@pytest.mark.parametrize("name", SIZES)
def test_backbone_parameters_match_the_released_classification_sizes(name):
    with torch.device("meta"):
        backbone = A2Mamba(A2MAMBA_SIZES[name])
    with_head = count_parameters(backbone) + OFFICIAL[name]["classifier_parameters"]
    assert with_head == OFFICIAL[name]["parameters"]  # exactly the released definition
    assert abs(with_head / 1e6 / RELEASED_PARAMS[name] - 1) < 0.05, with_head


# --- official-layout checkpoints ---------------------------------------------------------------


def _official_state(name: str, seed: int) -> dict[str, torch.Tensor]:
    """Random tensors with exactly the released keys and shapes, classifier head included; the
    aliased table keys hold the same values, as a saved released model has them. Values are
    kept in a range where a forward pass stays finite (positive BN variances)."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    shared = OFFICIAL[name]["shared"]
    for key, shape in OFFICIAL[name]["tensors"].items():
        if key in shared:
            state[key] = state[shared[key]]
        elif key.endswith("num_batches_tracked"):
            state[key] = torch.randint(1, 1000, (), generator=gen)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        else:
            state[key] = 0.1 * torch.randn(shape, generator=gen)
    return state


def _assert_loaded(backbone: A2Mamba, state: dict[str, torch.Tensor], prefix: str = "") -> None:
    own = backbone.state_dict()
    assert len(own) + len(RELEASED_HEAD_KEYS) == len(state)
    for key, value in own.items():
        assert torch.equal(value, state[prefix + key]), key


@pytest.mark.parametrize("name", SIZES)
def test_official_checkpoints_load_strictly_and_every_tensor_lands(tmp_path, name):
    backbone = A2Mamba(A2MAMBA_SIZES[name]).eval()
    state = _official_state(name, seed=1)
    path = tmp_path / f"a2mamba_{name}.pth"
    torch.save({"model": state}, path)
    load_backbone_weights(backbone, path)
    _assert_loaded(backbone, state)
    path.unlink()

    # mmseg layout: everything under "state_dict" with a "backbone." prefix; other values
    prefixed = {f"backbone.{k}": v for k, v in _official_state(name, seed=2).items()}
    torch.save({"state_dict": prefixed, "meta": {"epoch": 3}}, path)
    load_backbone_weights(backbone, path)
    _assert_loaded(backbone, prefixed, prefix="backbone.")
    path.unlink()

    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 64, 64))
    dims = A2MAMBA_SIZES[name].dims
    assert [tuple(f.shape) for f in features] == [(1, dims[i], 16 >> i, 16 >> i) for i in range(4)]
    assert all(torch.isfinite(f).all() for f in features)


@pytest.fixture(scope="module")
def nano_state() -> dict[str, torch.Tensor]:
    return _official_state("nano", seed=2)


def _load_nano(tmp_path: Path, state: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "a2mamba_nano.pth"
    torch.save(state, path)
    load_backbone_weights(A2Mamba(A2MAMBA_SIZES["nano"]), path)


def test_truncated_checkpoint_is_refused(tmp_path, nano_state):
    truncated = dict(nano_state)
    del truncated["layers.4.blocks.3.token_mixer.ssm.Ds"]
    with pytest.raises(CheckpointError, match=r"1 missing \(layers\.4\.blocks\.3\.token_mixer\.ssm\.Ds\)"):
        _load_nano(tmp_path, truncated)


def test_misshaped_checkpoint_is_refused(tmp_path, nano_state):
    misshaped = dict(nano_state, **{"layers.6.blocks.1.token_mixer.rpb.2": torch.zeros(1, 8, 64, 64)})
    with pytest.raises(CheckpointError, match=r"mis-shaped \(e\.g\. layers\.6\.blocks\.1\.token_mixer\.rpb\.2"):
        _load_nano(tmp_path, misshaped)


def test_extra_tensors_and_split_shared_tables_are_refused(tmp_path, nano_state):
    with pytest.raises(CheckpointError, match="1 unexpected"):
        _load_nano(tmp_path, dict(nano_state, **{"decode_head.conv_seg.weight": torch.zeros(2, 2)}))
    split = dict(nano_state)
    split["layers.2.blocks.1.token_mixer.rpb.1"] = split["layers.2.blocks.1.token_mixer.rpb.0"] + 1
    with pytest.raises(CheckpointError, match="one shared table"):
        _load_nano(tmp_path, split)


def test_registered_model_loads_an_official_checkpoint_for_other_band_counts(tmp_path, nano_state):
    path = tmp_path / "a2mamba_nano.pth"
    torch.save({"model": nano_state}, path)
    model = create_model("segman-v2-n", num_classes=6, in_channels=4, pretrained=str(path)).eval()
    stem = model.backbone.state_dict()["patch_embed.0.weight"]
    torch.testing.assert_close(stem, adapt_stem(nano_state["patch_embed.0.weight"], 4))
    torch.testing.assert_close(
        model.backbone.state_dict()["layers.6.blocks.1.mlp.fc2.weight"], nano_state["layers.6.blocks.1.mlp.fc2.weight"]
    )
    with torch.no_grad():
        out = model(torch.randn(1, 4, 40, 56))
    assert out.shape == (1, 6, 40, 56) and torch.isfinite(out).all()


def test_missing_pretrained_file_is_a_data_error(tmp_path):
    from rsseg.errors import DataError

    with pytest.raises(DataError):
        create_model("segman-v2-n", num_classes=2, in_channels=3, pretrained=str(tmp_path / "none.pt"))


def test_pretrained_backbone_round_trip(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = SegMANV2(2, 3, TOY_SIZE, TOY_WIDTHS)
    path = tmp_path / "a2mamba_toy.safetensors"
    # clone(): safetensors refuses the shared position tables' aliased storage
    save_file({k: v.contiguous().clone() for k, v in source.backbone.state_dict().items()}, str(path))
    loaded = SegMANV2(7, 3, TOY_SIZE, TOY_WIDTHS, pretrained=str(path))
    for key, value in source.backbone.state_dict().items():
        torch.testing.assert_close(loaded.backbone.state_dict()[key], value)


# --- whole network -------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(37, 53), (64, 31)])
def test_registered_nano_keeps_odd_input_sizes(hw):
    torch.manual_seed(0)
    model = create_model("segman-v2-n", num_classes=5, in_channels=4).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 4, *hw))
    assert out.shape == (1, 5, *hw)
    assert torch.isfinite(out).all()


def test_paper_variant_builds_and_runs():
    torch.manual_seed(0)
    model = SegMANV2(3, 3, TOY_SIZE, TOY_WIDTHS, backbone_variant="paper").eval()
    assert not any("rope" in k or "token_mixer" in k for k in model.backbone.state_dict())
    with torch.no_grad():
        out = model(torch.randn(1, 3, 48, 40))
    assert out.shape == (1, 3, 48, 40) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="variant"):
        A2Mamba(TOY_SIZE, variant="table")


@pytest.mark.parametrize("variant", ["released", "paper"])
def test_gradients_reach_every_parameter(variant):
    torch.manual_seed(0)
    model = SegMANV2(3, 3, TOY_SIZE, TOY_WIDTHS, backbone_variant=variant).train()
    out = model(torch.randn(2, 3, 64, 64))
    F.cross_entropy(out, torch.randint(0, 3, (2, 64, 64))).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing


def test_cpu_training_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = SegMANV2(4, 3, TOY_SIZE, TOY_WIDTHS).train()
    # four quadrant classes, visible in the first two bands under noise; top rows ignored
    target = torch.zeros(2, 48, 40, dtype=torch.long)
    target[:, :24, 20:] = 1
    target[:, 24:, :20] = 2
    target[:, 24:, 20:] = 3
    x = 0.5 * torch.randn(2, 3, 48, 40)
    x[:, 0] += (target % 2) * 2.0 - 1
    x[:, 1] += (target // 2) * 2.0 - 1
    target[:, :4] = 255
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), target, ignore_index=255)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


# Table VII, ADE20K (150 classes): parameters in millions; Tiny from Table XIII (the decoder
# roadmap on A2Mamba-T, final row "w Low Level").
PAPER_PARAMS = {"segman-v2-n": 6.6, "segman-v2-t": 18.0, "segman-v2-s": 32.0, "segman-v2-b": 56.0, "segman-v2-l": 108.0}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_parameter_counts_match_the_paper(name):
    assert name in list_models()
    count = parameter_count(name, num_classes=150, in_channels=3) / 1e6
    assert abs(count / PAPER_PARAMS[name] - 1) < 0.05, count


def test_a_training_step_after_a_prediction_of_the_same_shape():
    # Shape-keyed tables (scan orders, neighbourhood indices) are cached across calls; one cached
    # by a prediction under inference_mode must still be savable for a later training backward.
    torch.manual_seed(0)
    model = SegMANV2(3, 3, TOY_SIZE, TOY_WIDTHS)
    x = torch.randn(1, 3, 52, 44)  # a shape no other test uses, so the caches start cold
    with torch.inference_mode():
        model.eval()(x)
    model.train()
    loss = model(x).logsumexp(1).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
