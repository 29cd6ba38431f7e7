"""The selective scan against a float64 sequential oracle written here, independently of rsseg."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from rsseg.errors import UsageError
from rsseg.models.ssm import scan as scan_module
from rsseg.models.ssm import selective_scan, selective_scan_states


def oracle(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The textbook recurrence in float64, one position at a time. Returns (y, states (b,d,n,l))."""
    u, delta, A = u.double(), delta.double(), A.double()
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = torch.log1p(torch.exp(-delta.abs())) + delta.clamp_min(0)  # stable softplus
    b, d, length = u.shape
    n = A.shape[1]

    def per_channel(M):  # (b, n, l) or (b, g, n, l) -> (b, d, n, l): group k serves a block of d/g
        M = M.double()
        if M.dim() == 3:
            return M[:, None].expand(b, d, n, length)
        return M.repeat_interleave(d // M.shape[1], dim=1)

    Bd = per_channel(B)
    h = torch.zeros(b, d, n, dtype=torch.float64)
    states, ys = [], []
    for t in range(length):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[:, :, None] * Bd[..., t]
        states.append(h)
        if C is not None:
            ys.append((h * per_channel(C)[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1) if C is not None else None
    if y is not None and D is not None:
        y = y + D.double()[:, None] * u
    if y is not None and z is not None:
        y = y * z.double() * torch.sigmoid(z.double())
    return y, torch.stack(states, dim=-1)


def make_inputs(b, d, n, length, groups, seed, dtype=torch.float32, delta_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    B_shape = (b, n, length) if groups is None else (b, groups, n, length)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    return {
        "u": r(b, d, length),
        "delta": r(b, d, length, scale=delta_scale),
        "A": -torch.exp(r(d, n, scale=0.7)),
        "B": r(*B_shape),
        "C": r(*B_shape),
        "D": r(d),
        "z": r(b, d, length),
        "delta_bias": r(d, scale=0.5),
    }


@pytest.fixture(params=[1, 7], ids=["segment1", "segment7"])
def tiny_segments(monkeypatch, request):
    """Force many segments (of 1 or 7 positions), so short inputs exercise every code path."""
    seg = request.param
    monkeypatch.setattr(scan_module, "_segment_length", lambda length, *_: min(length, seg))


def _check_against_oracle(inp, softplus, atol, rtol, grads=True):
    leaves = {k: v.clone().requires_grad_(grads) for k, v in inp.items() if v is not None}
    y, last = selective_scan(**leaves, delta_softplus=softplus, return_last_state=True, backend="torch")
    ref_leaves = {k: v.detach().double().requires_grad_(grads) for k, v in leaves.items()}
    y_ref, states_ref = oracle(**ref_leaves, delta_softplus=softplus)
    assert y.dtype == inp["u"].dtype and y.shape == inp["u"].shape
    torch.testing.assert_close(y.double(), y_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(last.double(), states_ref[..., -1], atol=atol, rtol=rtol)
    if not grads:
        return
    weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    (y.double() * weight).sum().backward()
    (y_ref * weight).sum().backward()
    for name in leaves:
        got, want = leaves[name].grad, ref_leaves[name].grad
        assert got is not None, f"no gradient for {name}"
        torch.testing.assert_close(got.double(), want, atol=atol * 10, rtol=rtol * 10, msg=f"grad {name}")


# Lengths: 1, primes (never a multiple of a chunk), one long enough for several segments.
CASES = [
    # (b, d, n, length, groups)
    (1, 4, 1, 1, None),
    (2, 8, 16, 1, 4),
    (2, 6, 1, 37, None),
    (1, 8, 16, 53, 2),
    (2, 8, 5, 97, 4),
    (1, 4, 16, 211, 1),
]


@pytest.mark.parametrize("b,d,n,length,groups", CASES)
def test_outputs_and_all_gradients_match_the_oracle(b, d, n, length, groups):
    inp = make_inputs(b, d, n, length, groups, seed=length * 7 + n)
    _check_against_oracle(inp, softplus=True, atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("b,d,n,length,groups", CASES[2:])
def test_many_segments_match_the_oracle(tiny_segments, b, d, n, length, groups):
    inp = make_inputs(b, d, n, length, groups, seed=length + 3)
    _check_against_oracle(inp, softplus=True, atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("absent", ["D", "z", "delta_bias", "softplus", "all"])
def test_each_optional_input_absent(absent):
    inp = make_inputs(2, 8, 4, 29, 2, seed=5)
    drop = ["D", "z", "delta_bias"] if absent == "all" else [absent]
    for name in drop:
        inp.pop(name, None)
    softplus = absent not in ("softplus", "all")
    if not softplus:  # without softplus, delta must be positive for a stable scan
        inp["delta"] = inp["delta"].abs()
    _check_against_oracle(inp, softplus=softplus, atol=2e-5, rtol=2e-4)


def test_three_dim_B_C_equal_one_group():
    inp = make_inputs(2, 6, 3, 19, None, seed=11)
    y3 = selective_scan(**inp, delta_softplus=True)
    grouped = dict(inp, B=inp["B"][:, None], C=inp["C"][:, None])
    torch.testing.assert_close(selective_scan(**grouped, delta_softplus=True), y3, rtol=0, atol=0)


def test_large_delta_gives_finite_exact_values(tiny_segments):
    # softplus(delta) up to ~3e4 and A down to -20: exp(delta*A) underflows to 0, never overflows.
    inp = make_inputs(2, 8, 16, 61, 4, seed=13, delta_scale=1e4)
    inp["A"] = inp["A"] * 10
    leaves = {k: v.clone().requires_grad_() for k, v in inp.items()}
    y, last = selective_scan(**leaves, delta_softplus=True, return_last_state=True)
    y.square().sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(last).all()
    for name, leaf in leaves.items():
        assert torch.isfinite(leaf.grad).all(), name
    y_ref, states_ref = oracle(**inp, delta_softplus=True)
    torch.testing.assert_close(y.double(), y_ref, atol=1e-3, rtol=1e-4)


def test_long_decay_chains_have_no_overflow():
    # A long length with tiny delta: cumulative decays stay near 1; the "divide by cumulative
    # decay" formulation would overflow here, the segment-sum one must not.
    inp = make_inputs(1, 4, 2, 400, None, seed=17)
    inp["A"] = torch.full((4, 2), -50.0)
    y = selective_scan(**inp, delta_softplus=True)
    y_ref, _ = oracle(**inp, delta_softplus=True)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), y_ref, atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("n", [1, 16])
def test_states_are_the_exact_hidden_sequence(tiny_segments, n):
    inp = make_inputs(2, 8, n, 47, 2, seed=n)
    leaves = {k: inp[k].clone().requires_grad_() for k in ("u", "delta", "A", "B", "delta_bias")}
    h = selective_scan_states(**leaves, delta_softplus=True)
    ref = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    _, h_ref = oracle(**ref, C=None, delta_softplus=True)
    assert h.shape == (2, 8, n, 47)
    torch.testing.assert_close(h.double(), h_ref, atol=2e-5, rtol=2e-4)
    weight = torch.randn(h.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (h.double() * weight).sum().backward()
    (h_ref * weight).sum().backward()
    for name in leaves:
        torch.testing.assert_close(leaves[name].grad.double(), ref[name].grad, atol=2e-4, rtol=2e-3)


def test_gradcheck_float64(monkeypatch):
    # Segments of 4 positions: a padded last segment and gradients carried across segments.
    monkeypatch.setattr(scan_module, "_segment_length", lambda length, *_: min(length, 4))
    inp = make_inputs(1, 4, 2, 7, 2, seed=23, dtype=torch.float64)
    names = list(inp)

    def fn(*tensors):
        y, last = selective_scan(**dict(zip(names, tensors)), delta_softplus=True, return_last_state=True)
        return y, last

    args = tuple(inp[k].requires_grad_() for k in names)
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5)

    def states(u, delta, A, B):
        return selective_scan_states(u, delta, A, B, delta_softplus=True)

    assert torch.autograd.gradcheck(states, (inp["u"], inp["delta"], inp["A"], inp["B"]), eps=1e-6, atol=1e-5)


def test_bfloat16_inputs_are_scanned_in_float32_and_cast_back():
    inp = make_inputs(1, 8, 4, 33, 2, seed=29, dtype=torch.bfloat16)
    inp = {k: (v.float() if k in ("A", "D", "delta_bias") else v) for k, v in inp.items()}
    y = selective_scan(**inp, delta_softplus=True)
    assert y.dtype == torch.bfloat16
    y_ref, _ = oracle(**inp, delta_softplus=True)
    # Only the final rounding to bfloat16 separates it from the exact float64 result.
    torch.testing.assert_close(y.double(), y_ref.to(torch.bfloat16).double(), atol=1e-2, rtol=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast does not reach inside the scan
        y32 = selective_scan(**{k: v.float() for k, v in inp.items()}, delta_softplus=True)
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), y_ref, atol=2e-5, rtol=2e-4)


def test_shape_mistakes_are_value_errors():
    inp = make_inputs(1, 6, 2, 5, None, seed=0)
    with pytest.raises(ValueError, match="groups dividing"):
        selective_scan(**dict(inp, B=torch.randn(1, 4, 2, 5)))
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(**dict(inp, A=torch.randn(5, 2)))


def test_backend_selection_and_cuda_refusal(monkeypatch):
    inp = make_inputs(1, 4, 2, 6, None, seed=0)
    monkeypatch.setenv("RSSEG_SCAN_BACKEND", "cuda")
    with pytest.raises(UsageError) as err:
        selective_scan(**inp)  # CPU tensors: the kernel cannot run, and the error says why
    assert "cannot run" in str(err.value) and "\n" not in str(err.value)
    assert "cpu" in str(err.value)
    # An explicit argument wins over the environment.
    y = selective_scan(**inp, backend="torch")
    monkeypatch.setenv("RSSEG_SCAN_BACKEND", "torch")
    torch.testing.assert_close(selective_scan(**inp), y, rtol=0, atol=0)
    monkeypatch.setenv("RSSEG_SCAN_BACKEND", "tritonn")
    with pytest.raises(UsageError, match="auto, torch, cuda"):
        selective_scan(**inp)
    monkeypatch.delenv("RSSEG_SCAN_BACKEND")
    # auto on CPU tensors is the fused numba scan where numba imports, else the torch scan; never
    # an attempt to import mamba-ssm.
    import importlib.util

    expected = "fused" if importlib.util.find_spec("numba") is not None else "torch"
    assert scan_module.resolve_backend(None, inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"]) == expected
    double = {k: v.double() for k, v in inp.items() if k in ("u", "delta", "A", "B", "C")}
    assert scan_module.resolve_backend(None, **double) == "torch"  # float64 stays on the reference


def test_import_works_without_mamba_ssm():
    code = (
        "import sys; sys.modules['mamba_ssm'] = None\n"  # any `import mamba_ssm` now fails
        "import rsseg, rsseg.models.ssm as ssm, torch\n"
        "assert 'mamba_ssm' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "u = torch.randn(1, 4, 8); A = -torch.ones(4, 2); B = torch.randn(1, 2, 8)\n"
        "print(ssm.selective_scan(u, u.abs(), A, B, B).shape)\n"
        "try:\n"
        "    ssm.selective_scan(u, u.abs(), A, B, B, backend='cuda')\n"
        "except rsseg.errors.UsageError as e:\n"
        "    print('refused:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([1, 4, 8])" in out.stdout and "refused:" in out.stdout


# ---- CUDA: the torch scan against mamba-ssm's kernel, within mamba-ssm's own tolerances --------

def _kernel_available() -> bool:
    return torch.cuda.is_available() and scan_module._load_kernel() is not None


@pytest.mark.cuda
@pytest.mark.skipif(not _kernel_available(), reason="needs CUDA and mamba-ssm")
@pytest.mark.parametrize(
    "dtype,rtol,atol", [(torch.float32, 6e-4, 2e-3), (torch.bfloat16, 3e-2, 5e-2)]
)
@pytest.mark.parametrize("b,d,n,length,groups", [(2, 24, 16, 257, 4), (1, 16, 1, 1000, None)])
def test_torch_backend_agrees_with_the_kernel(dtype, rtol, atol, b, d, n, length, groups):
    inp = make_inputs(b, d, n, length, groups, seed=31)
    inp = {k: (v.to(dtype) if k in ("u", "delta", "B", "C", "z") else v).cuda() for k, v in inp.items()}
    results = {}
    for backend in ("torch", "cuda"):
        leaves = {k: v.clone().requires_grad_() for k, v in inp.items()}
        y, last = selective_scan(**leaves, delta_softplus=True, return_last_state=True, backend=backend)
        (y.float() * torch.linspace(-1, 1, y.numel(), device="cuda").view_as(y)).sum().backward()
        results[backend] = (y, last, {k: v.grad for k, v in leaves.items()})
    (y_t, last_t, g_t), (y_k, last_k, g_k) = results["torch"], results["cuda"]
    torch.testing.assert_close(y_t.float(), y_k.float(), rtol=rtol, atol=atol)
    torch.testing.assert_close(last_t.float(), last_k.float(), rtol=rtol, atol=atol)
    for name in g_t:  # gradients of sums over many positions: scale atol by the gradient's size
        scale = max(1.0, g_k[name].float().abs().max().item())
        torch.testing.assert_close(g_t[name].float(), g_k[name].float(), rtol=rtol, atol=atol * scale, msg=name)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_backend_on_cuda_matches_the_oracle():
    inp = make_inputs(2, 8, 16, 123, 4, seed=37)
    y = selective_scan(**{k: v.cuda() for k, v in inp.items()}, delta_softplus=True, backend="torch")
    y_ref, _ = oracle(**inp, delta_softplus=True)
    torch.testing.assert_close(y.double().cpu(), y_ref, atol=2e-5, rtol=2e-4)
