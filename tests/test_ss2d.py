"""SS2D, VSSBlock/VSSLayer and FourDirectionMamba against step-by-step float64 references.

The references below walk the pixels in explicitly listed orders and run the float64 sequential
oracle of test_scan per direction, so they share no traversal or batching code with rsseg.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rsseg.models.ssm import SS2D, FourDirectionMamba, VSSBlock, VSSLayer
from tests.test_scan import oracle

DIRECTIONS = ("right", "left", "down", "up")


def traversal(h: int, w: int, direction: str) -> torch.Tensor:
    """Flat pixel indexes (i * w + j) in the order a direction visits them."""
    rows = [i * w + j for i in range(h) for j in range(w)]
    cols = [i * w + j for j in range(w) for i in range(h)]
    order = {"right": rows, "left": rows[::-1], "down": cols, "up": cols[::-1]}[direction]
    return torch.tensor(order)


def s6(seq, x_proj, dt_w, dt_b, A_log, D, dt_rank, d_state, z=None):
    """One Mamba S6 pass over seq (b, di, L) with one direction's parameters, in float64."""
    x_dbl = torch.einsum("bdl,cd->bcl", seq, x_proj)
    dt, B, C = torch.split(x_dbl, [dt_rank, d_state, d_state], dim=1)
    dt = torch.einsum("brl,dr->bdl", dt, dt_w)
    y, _ = oracle(seq, dt, -torch.exp(A_log), B, C, D, z=z, delta_bias=dt_b, delta_softplus=True)
    return y


def ss2d_reference(m: SS2D, x: torch.Tensor) -> torch.Tensor:
    b, h, w, _ = x.shape
    di, n, r = m.d_inner, m.d_state, m.dt_rank
    xin, gate = F.linear(x, m.in_proj.weight, m.in_proj.bias).chunk(2, dim=-1)
    xin = F.silu(m.conv2d(xin.permute(0, 3, 1, 2))).reshape(b, di, h * w)
    total = torch.zeros_like(xin)
    for k, direction in enumerate(DIRECTIONS):
        idx = traversal(h, w, direction)
        ch = slice(k * di, (k + 1) * di)
        y = s6(xin[..., idx], m.x_proj_weight[k], m.dt_projs_weight[k], m.dt_projs_bias[k],
               m.A_logs[ch], m.Ds[ch], r, n)
        total[..., idx] += y
    y = m.out_norm(total.reshape(b, di, h, w).permute(0, 2, 3, 1)) * F.silu(gate)
    return F.linear(y, m.out_proj.weight, m.out_proj.bias)


def four_direction_reference(m: FourDirectionMamba, x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    di, n, r, kc = m.d_inner, m.d_state, m.dt_rank, m.d_conv
    flat = x.reshape(b, c, h * w)
    outs = []
    for k, direction in enumerate(DIRECTIONS):
        idx = traversal(h, w, direction)
        ch = slice(k * di, (k + 1) * di)
        xin, gate = torch.einsum("bcl,ec->bel", flat[..., idx], m.in_proj_weight[k]).split(di, dim=1)
        conv_b = None if m.conv1d.bias is None else m.conv1d.bias[ch]
        xin = F.silu(F.conv1d(F.pad(xin, (kc - 1, 0)), m.conv1d.weight[ch], conv_b, groups=di))
        y = s6(xin, m.x_proj_weight[k], m.dt_proj_weight[k], m.dt_proj_bias[k], m.A_log[ch], m.D[ch], r, n, z=gate)
        out = torch.zeros(b, c, h * w, dtype=x.dtype)
        out[..., idx] = torch.einsum("bdl,cd->bcl", y, m.out_proj_weight[k])
        outs.append(out.reshape(b, c, h, w))
    return torch.stack(outs, dim=1)


@pytest.mark.parametrize("h,w", [(1, 1), (1, 7), (5, 3), (4, 4)])
def test_ss2d_matches_the_reference_on_any_size(h, w):
    torch.manual_seed(h * 10 + w)
    m = SS2D(12, d_state=4).double()
    x = torch.randn(2, h, w, 12, dtype=torch.float64)
    out = m(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ss2d_reference(m, x), atol=1e-9, rtol=1e-7)


def _fused_path_only(monkeypatch):
    """Make SS2D's general path (traversal copies + selective_scan) fail, so a test proves it ran
    the fused traversal kernel; the float32 fused path is the CPU default where numba works."""
    from rsseg.models.ssm import cpu_scan, ss2d

    if cpu_scan.unavailable_reason() is not None:
        pytest.skip("numba not usable")
    monkeypatch.delenv("RSSEG_SCAN_BACKEND", raising=False)

    def general_path(*args, **kwargs):
        raise AssertionError("SS2D took the general path")

    monkeypatch.setattr(ss2d, "selective_scan", general_path)


# (d_model, d_state, h, w): d_inner 24 is padded to two 16-lane blocks, 32 fills two exactly;
# 1 x 1, single rows / columns, non-square maps (the column traversals differ from the rows).
FUSED_CASES = [(12, 4, 5, 3), (16, 4, 4, 7), (16, 16, 1, 1), (8, 3, 1, 9), (12, 5, 6, 1)]


@pytest.mark.parametrize("d_model,d_state,h,w", FUSED_CASES)
def test_ss2d_fused_traversal_kernel_matches_the_reference(monkeypatch, d_model, d_state, h, w):
    # float32 SS2D on CPU: the kernel walks the four traversals itself and merges them per pixel;
    # outputs and the gradients of the input and of every parameter against the float64 reference.
    _fused_path_only(monkeypatch)
    torch.manual_seed(d_model + h * w)
    m = SS2D(d_model, d_state=d_state)
    ref = SS2D(d_model, d_state=d_state).double()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, h, w, d_model, requires_grad=True)
    xd = x.detach().double().requires_grad_()
    out, out_ref = m(x), ss2d_reference(ref, xd)
    torch.testing.assert_close(out.double(), out_ref, atol=2e-5, rtol=2e-4)
    weight = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (out.double() * weight).sum().backward()
    (out_ref * weight).sum().backward()
    torch.testing.assert_close(x.grad.double(), xd.grad, atol=2e-4, rtol=2e-3)
    for (name, p), p_ref in zip(m.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.double(), p_ref.grad, atol=2e-4, rtol=2e-3, msg=name)
    with torch.no_grad():  # inference: delta computed inside the kernel, nothing stored
        torch.testing.assert_close(m(x).double(), out_ref, atol=2e-5, rtol=2e-4)


def test_ss2d_fused_paths_agree_with_the_general_path_at_model_width(monkeypatch):
    # d_state 16, 64 channels (4 blocks): the fused training and inference paths against the
    # general path (four traversal copies through selective_scan, torch scan) in float32.
    from rsseg.models.ssm import scan as scan_module

    torch.manual_seed(5)
    m = SS2D(32).eval()
    x = torch.randn(1, 9, 7, 32)
    monkeypatch.setenv(scan_module.ENV_VAR, "torch")
    with torch.no_grad():
        general = m(x)
    _fused_path_only(monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(m(x), general, atol=2e-5, rtol=2e-4)
    torch.testing.assert_close(m(x.requires_grad_()), general, atol=2e-5, rtol=2e-4)


def test_ss2d_output_depends_on_every_pixel():
    torch.manual_seed(0)
    m = SS2D(8, d_state=4)
    x = torch.randn(1, 5, 6, 8, requires_grad=True)
    m(x)[0, 2, 3].sum().backward()
    assert (x.grad.abs().sum(-1) > 0).all()  # four traversals: a global receptive field


def test_ss2d_defaults_and_mamba_initialisation():
    torch.manual_seed(0)
    m = SS2D(40)
    assert (m.d_inner, m.d_state, m.dt_rank) == (80, 16, math.ceil(40 / 16))
    assert m.conv2d.kernel_size == (3, 3) and m.conv2d.groups == 80
    torch.testing.assert_close(torch.exp(m.A_logs), torch.arange(1.0, 17.0).repeat(4 * 80, 1))
    torch.testing.assert_close(m.Ds, torch.ones(4 * 80))
    dt = F.softplus(m.dt_projs_bias)
    assert dt.min() >= 1e-4 * 0.999 and dt.max() <= 0.1 * 1.001
    assert dt.max() / dt.min() > 10  # log-uniform over two decades, not a constant
    bound = m.dt_rank**-0.5
    assert m.dt_projs_weight.abs().max() <= bound
    # Parameter count, from VMamba's layout: in_proj, dw-conv, x_proj, dt_proj, A, D, norm, out_proj.
    d, di, r, n, k = 40, 80, 3, 16, 4
    expected = d * 2 * di + di * 9 + di + k * (r + 2 * n) * di + k * di * r + k * di + k * di * n + k * di + 2 * di + di * d
    assert sum(p.numel() for p in m.parameters()) == expected
    with torch.device("meta"):  # the registry counts parameters on the meta device
        assert sum(p.numel() for p in SS2D(40).parameters()) == expected


def test_vss_block_and_layer_compose_residually():
    torch.manual_seed(1)
    layer = VSSLayer(8, depth=3, d_state=4, drop_path=[0.0, 0.1, 0.2]).double().eval()
    assert len(layer.blocks) == 3
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    expected = x
    for block in layer.blocks:
        assert block.ln_1.eps == 1e-6
        expected = expected + ss2d_reference(block.self_attention, block.ln_1(expected))
    torch.testing.assert_close(layer(x), expected, atol=1e-9, rtol=1e-7)
    block = VSSBlock(8, d_state=4)
    torch.nn.init.zeros_(block.self_attention.out_proj.weight)
    torch.testing.assert_close(block(x.float()), x.float(), rtol=0, atol=0)
    with pytest.raises(ValueError):
        VSSLayer(8, depth=2, drop_path=[0.1])


def test_vss_layer_trains_every_parameter():
    torch.manual_seed(2)
    layer = VSSLayer(8, depth=2, d_state=4)
    layer(torch.randn(1, 4, 6, 8)).square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("h,w", [(1, 5), (3, 4)])
def test_four_direction_mamba_matches_four_separate_mamba_scans(h, w):
    torch.manual_seed(h + w)
    m = FourDirectionMamba(6, d_state=3).double()
    x = torch.randn(2, 6, h, w, dtype=torch.float64)
    out = m(x)
    assert out.shape == (2, 4, 6, h, w)
    torch.testing.assert_close(out, four_direction_reference(m, x), atol=1e-9, rtol=1e-7)


def test_each_direction_sees_only_the_pixels_before_it():
    torch.manual_seed(3)
    h, w = 3, 4
    m = FourDirectionMamba(4, d_state=2)
    for k, direction in enumerate(DIRECTIONS):
        order = traversal(h, w, direction).tolist()
        pos = order.index(1 * w + 2)  # pixel (1, 2)
        x = torch.randn(1, 4, h, w, requires_grad=True)
        m(x)[0, k, :, 1, 2].sum().backward()
        reach = x.grad.abs().sum(1).flatten()
        assert (reach[order[pos + 1:]] == 0).all(), f"{direction} reads pixels after (1, 2)"
        assert (reach[order[max(0, pos - 3):pos + 1]] > 0).all(), f"{direction} misses earlier pixels"


def test_directions_have_separate_parameters():
    torch.manual_seed(4)
    m = FourDirectionMamba(4, d_state=2)
    x = torch.randn(1, 4, 3, 3)
    before = m(x)
    with torch.no_grad():
        m.x_proj_weight[2].add_(0.5)  # the "down" direction only
        m.out_proj_weight[2].mul_(2.0)
    after = m(x)
    for k in range(4):
        changed = not torch.equal(before[:, k], after[:, k])
        assert changed == (k == 2), DIRECTIONS[k]


def test_ss2d_fused_path_is_deterministic_across_thread_counts(monkeypatch):
    # Work items are blocks of channels; the four traversals of a block run in one item, and dB,
    # dC are summed per block in a fixed order: bitwise the same result on 1 and 2 threads (the
    # scan's parameters; torch's own conv / LayerNorm weight gradients may differ in the last bit).
    _fused_path_only(monkeypatch)
    torch.manual_seed(6)
    m = SS2D(32)  # d_inner 64: four channel blocks
    scan_params = (m.x_proj_weight, m.dt_projs_weight, m.dt_projs_bias, m.A_logs, m.Ds)
    x = torch.randn(1, 6, 5, 32)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            m.zero_grad()
            out = m(x)
            out.square().sum().backward()
            with torch.no_grad():
                inference = m(x)
            results.append([out.detach(), inference] + [p.grad.clone() for p in scan_params])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_ss2d_trains_after_a_prediction_cached_its_traversal_orders():
    # traversal_orders is cached per (H, W); one built under inference_mode must not be an
    # inference tensor, or the fused kernel's backward cannot save it.
    torch.manual_seed(0)
    m = SS2D(16, d_state=4)
    x = torch.randn(1, 13, 11, 16)
    with torch.inference_mode():
        m(x)
    out = m(x.requires_grad_())
    out.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
