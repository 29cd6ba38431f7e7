"""The fused CPU scan (rsseg.models.ssm.cpu_scan) against the float64 oracle of test_scan.py, and
the backend dispatch. numba's cache keeps the compile to the first run on a machine."""

from __future__ import annotations

import pytest
import torch

from rsseg.errors import UsageError
from rsseg.models.ssm import cpu_scan
from rsseg.models.ssm import scan as scan_module
from rsseg.models.ssm import selective_scan, selective_scan_states

from test_scan import make_inputs, oracle

pytestmark = pytest.mark.skipif(cpu_scan.unavailable_reason() is not None, reason="numba not usable")

ATOL, RTOL = 2e-5, 2e-4  # the torch scan's tolerances against the oracle (tests/test_scan.py)


def _check(inp: dict, softplus: bool, dtype_tol: float = 1.0) -> None:
    leaves = {k: v.clone().requires_grad_() for k, v in inp.items()}
    y, last = selective_scan(**leaves, delta_softplus=softplus, return_last_state=True, backend="fused")
    ref = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    y_ref, states_ref = oracle(**ref, delta_softplus=softplus)
    assert y.dtype == inp["u"].dtype and y.shape == inp["u"].shape
    atol, rtol = ATOL * dtype_tol, RTOL * dtype_tol
    torch.testing.assert_close(y.double(), y_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(last.double(), states_ref[..., -1], atol=atol, rtol=rtol)
    # Gradients of every input, through y and through the last state.
    gen = torch.Generator().manual_seed(7)
    wy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    wl = torch.randn(last.shape, generator=gen, dtype=torch.float64)
    ((y.double() * wy).sum() + (last.double() * wl).sum()).backward()
    ((y_ref * wy).sum() + (states_ref[..., -1] * wl).sum()).backward()
    for name in leaves:
        got, want = leaves[name].grad, ref[name].grad
        assert got is not None, f"no gradient for {name}"
        torch.testing.assert_close(got.double(), want, atol=atol * 10, rtol=rtol * 10, msg=f"grad {name}")


# (b, d, n, length, groups): d_state 1 and 16, 3-dim and grouped B/C, channels per group not a
# multiple of the 16-lane block, lengths 1, < chunk, = chunk, and not a multiple of the chunk.
CASES = [
    (1, 4, 1, 1, None),
    (2, 6, 1, 37, None),
    (1, 40, 16, 64, 4),
    (2, 8, 16, 131, 2),
    (1, 34, 5, 200, 1),
]


@pytest.mark.parametrize("b,d,n,length,groups", CASES)
def test_fused_matches_the_oracle_outputs_and_all_gradients(b, d, n, length, groups):
    _check(make_inputs(b, d, n, length, groups, seed=length + n), softplus=True)


@pytest.mark.parametrize("absent", ["D", "z", "delta_bias", "softplus", "all"])
def test_fused_each_optional_input_absent(absent):
    inp = make_inputs(2, 8, 4, 70, 2, seed=5)
    drop = ["D", "z", "delta_bias"] if absent == "all" else [absent]
    for name in drop:
        inp.pop(name, None)
    softplus = absent not in ("softplus", "all")
    if not softplus:
        inp["delta"] = inp["delta"].abs()
    _check(inp, softplus=softplus)


def test_fused_float64_is_float64_exact():
    inp = make_inputs(1, 6, 3, 70, 2, seed=3, dtype=torch.float64)
    _check(inp, softplus=True, dtype_tol=1e-6)


def test_fused_large_delta_is_finite():
    # exp(delta*A) down to far below float32's range: clamped to ~1e-38, never inf or NaN.
    inp = make_inputs(1, 16, 16, 67, 4, seed=13, delta_scale=1e4)
    inp["A"] = inp["A"] * 10
    leaves = {k: v.clone().requires_grad_() for k, v in inp.items()}
    y = selective_scan(**leaves, delta_softplus=True, backend="fused")
    y.square().sum().backward()
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(v.grad).all() for v in leaves.values())
    y_ref, _ = oracle(**inp, delta_softplus=True)
    torch.testing.assert_close(y.double(), y_ref, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("n", [1, 16])
def test_fused_states_match_the_oracle(monkeypatch, n):
    monkeypatch.setenv(scan_module.ENV_VAR, "fused")
    inp = make_inputs(2, 20, n, 75, None, seed=n)
    leaves = {k: inp[k].clone().requires_grad_() for k in ("u", "delta", "A", "B", "delta_bias")}
    h = selective_scan_states(**leaves, delta_softplus=True)
    ref = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    _, h_ref = oracle(**ref, C=None, delta_softplus=True)
    torch.testing.assert_close(h.double(), h_ref, atol=ATOL, rtol=RTOL)
    w = torch.randn(h.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (h.double() * w).sum().backward()
    (h_ref * w).sum().backward()
    for name in leaves:
        torch.testing.assert_close(leaves[name].grad.double(), ref[name].grad, atol=2e-4, rtol=2e-3)


def test_fused_agrees_with_the_torch_scan_without_grad():
    inp = make_inputs(1, 32, 16, 300, 4, seed=2)
    with torch.no_grad():
        y_f = selective_scan(**inp, delta_softplus=True, backend="fused")
        y_t = selective_scan(**inp, delta_softplus=True, backend="torch")
    torch.testing.assert_close(y_f, y_t, atol=ATOL, rtol=RTOL)


def test_fused_bfloat16_inputs_come_back_in_bfloat16():
    inp = make_inputs(1, 8, 4, 33, 2, seed=29, dtype=torch.bfloat16)
    inp = {k: (v.float() if k in ("A", "D", "delta_bias") else v) for k, v in inp.items()}
    y = selective_scan(**inp, delta_softplus=True, backend="fused")
    y_ref = selective_scan(**{k: v.float() for k, v in inp.items()}, delta_softplus=True, backend="torch")
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref, atol=2e-2, rtol=2e-2)


# ---- dispatch ----------------------------------------------------------------------------


def _resolve(inp: dict, backend: str | None = None) -> str:
    return scan_module.resolve_backend(backend, inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], inp["z"])


def test_auto_on_cpu_picks_fused_for_float32_and_torch_for_float64(monkeypatch):
    monkeypatch.delenv(scan_module.ENV_VAR, raising=False)
    assert _resolve(make_inputs(1, 4, 2, 5, None, seed=0)) == "fused"
    assert _resolve(make_inputs(1, 4, 2, 5, None, seed=0, dtype=torch.float64)) == "torch"


def test_env_torch_still_gives_the_torch_scan(monkeypatch):
    inp = make_inputs(1, 4, 2, 5, None, seed=0)
    monkeypatch.setenv(scan_module.ENV_VAR, "torch")
    assert _resolve(inp) == "torch"
    monkeypatch.setenv(scan_module.ENV_VAR, "fused")
    assert _resolve(inp) == "fused"


def test_fused_unavailable_falls_back_to_torch(monkeypatch):
    monkeypatch.delenv(scan_module.ENV_VAR, raising=False)
    monkeypatch.setattr(cpu_scan, "unavailable_reason", lambda: "numba cannot be imported (test)")
    inp = make_inputs(1, 4, 2, 9, None, seed=0)
    assert _resolve(inp) == "torch"
    with pytest.raises(UsageError, match="'fused' cannot run: numba cannot be imported"):
        _resolve(inp, "fused")
    y = selective_scan(**inp, delta_softplus=True)  # auto still works, through the torch scan
    y_ref, _ = oracle(**inp, delta_softplus=True)
    torch.testing.assert_close(y.double(), y_ref, atol=ATOL, rtol=RTOL)


def test_fused_is_deterministic_across_thread_counts():
    inp = make_inputs(2, 64, 16, 150, 4, seed=4)
    leaves = {k: v.clone().requires_grad_() for k, v in inp.items()}
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            for v in leaves.values():
                v.grad = None
            y = selective_scan(**leaves, delta_softplus=True, backend="fused")
            y.square().sum().backward()
            results.append([y.detach()] + [v.grad.clone() for v in leaves.values()])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_fused_scan_leaves_torchs_thread_count_alone():
    # numba's OpenMP pool sets OpenMP's thread count, which torch shares: without the reset in
    # cpu_scan._launch, a one-thread torch ran two threads after the first scan.
    threads = torch.get_num_threads()
    inp = make_inputs(1, 32, 4, 40, 2, seed=6)
    try:
        for t in (1, 2, 1):
            torch.set_num_threads(t)
            leaves = {k: v.clone().requires_grad_() for k, v in inp.items()}
            selective_scan(**leaves, delta_softplus=True, backend="fused").sum().backward()
            assert torch.get_num_threads() == t
    finally:
        torch.set_num_threads(threads)


def test_fused_refuses_a_state_larger_than_its_stack_block(monkeypatch):
    monkeypatch.delenv(scan_module.ENV_VAR, raising=False)
    inp = make_inputs(1, 4, cpu_scan.MAX_STATE + 1, 5, None, seed=0)
    assert "d_state <= 64" in cpu_scan.unsupported_reason(inp["u"], inp["A"])
    assert _resolve(inp) == "torch"
    with pytest.raises(UsageError, match="d_state"):
        _resolve(inp, "fused")
