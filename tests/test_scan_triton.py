"""The Triton selective-scan kernel against the float64 oracle of test_scan, and scan dispatch.

The kernel tests run Triton's interpreter on CPU. ``TRITON_INTERPRET=1`` is process-wide state,
so it is never set in the pytest process (other modules of the same xdist worker would see it):
one subprocess runs every interpreter case (this file as a script) and saves its outputs and
gradients; the tests here compare them with the oracle. ``-m cuda`` tests compare the compiled
kernel with the torch scan on a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # also when run as the interpreter subprocess
    sys.path.insert(0, str(REPO))

from rsseg.errors import UsageError  # noqa: E402
from rsseg.models.ssm import scan as scan_module  # noqa: E402
from rsseg.models.ssm import selective_scan  # noqa: E402
from tests.test_scan import make_inputs, oracle  # noqa: E402

# Interpreter cases, each small (the interpreter takes ~10-50 ms per program and position).
# chunk: backward checkpoint spacing; block: BLOCK_ELEMENTS (16 with n=16 gives one channel per
# program, so several programs add into the same dB/dC rows).
CASES: dict[str, dict] = {
    "n16_grouped_3chunks": dict(b=1, d=4, n=16, length=19, groups=2, chunk=8),
    "n1_BC3d_batch2_masked_rows": dict(b=2, d=6, n=1, length=21, groups=None, chunk=8),
    "n16_one_channel_per_program": dict(b=1, d=4, n=16, length=13, groups=1, block=16),
    "n16_three_blocks_per_group": dict(b=1, d=12, n=16, length=11, groups=2, chunk=5, block=32),
    "large_delta_underflows": dict(b=1, d=4, n=8, length=15, groups=2, chunk=4, delta_scale=1e3, a_scale=10.0),
    "n5_no_z_no_D": dict(b=1, d=4, n=5, length=12, groups=2, drop=("z", "D")),
    "no_bias_no_softplus": dict(b=1, d=4, n=4, length=12, groups=None, drop=("delta_bias",), softplus=False),
    "nothing_optional": dict(b=1, d=2, n=2, length=9, groups=None, drop=("z", "D", "delta_bias"), softplus=False),
    "bf16_n16_grouped": dict(b=1, d=4, n=16, length=16, groups=2, chunk=8, dtype="bfloat16"),
    "fp16_n4": dict(b=1, d=4, n=4, length=10, groups=None, dtype="float16"),
    "bf16_under_cpu_autocast": dict(b=1, d=4, n=4, length=12, groups=2, dtype="bfloat16", autocast=True),
}
LOW_PRECISION = ("u", "delta", "B", "C", "z")  # cast to the case dtype; A, D, delta_bias stay fp32


def _case_inputs(name: str) -> tuple[dict, dict, torch.Tensor, torch.Tensor]:
    """(case, inputs, cotangent of y, cotangent of the last state), deterministic per case."""
    case = CASES[name]
    seed = sum(map(ord, name))
    inp = make_inputs(case["b"], case["d"], case["n"], case["length"], case["groups"], seed=seed,
                      delta_scale=case.get("delta_scale", 1.0))
    inp["A"] = inp["A"] * case.get("a_scale", 1.0)  # with large delta: exp(delta A) underflows to 0
    for k in case.get("drop", ()):
        inp.pop(k)
    if not case.get("softplus", True):
        inp["delta"] = inp["delta"].abs()  # without softplus delta must be >= 0
    dtype = getattr(torch, case.get("dtype", "float32"))
    inp = {k: (v.to(dtype) if k in LOW_PRECISION else v) for k, v in inp.items()}
    gen = torch.Generator().manual_seed(seed + 1)
    gy = torch.randn(case["b"], case["d"], case["length"], generator=gen, dtype=torch.float64)
    glast = torch.randn(case["b"], case["d"], case["n"], generator=gen, dtype=torch.float64)
    return case, inp, gy, glast


def _run_case(name: str) -> dict:
    """In the interpreter subprocess: forward and backward of one case through selective_scan."""
    from rsseg.models.ssm import triton_scan

    case, inp, gy, glast = _case_inputs(name)
    triton_scan.CHUNK = case.get("chunk", 64)
    triton_scan.BLOCK_ELEMENTS = case.get("block", 256)
    leaves = {k: v.clone().requires_grad_() for k, v in inp.items()}
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.get("autocast", False)):
        y, last = selective_scan(
            **leaves, delta_softplus=case.get("softplus", True), return_last_state=True, backend="triton"
        )
    ((y.double() * gy).sum() + (last.double() * glast).sum()).backward()
    return {
        "y": y.detach(), "last": last.detach(), "seconds": time.perf_counter() - start,
        "grads": {k: v.grad for k, v in leaves.items()},
    }


def _interpreter_child(out_path: str) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    torch.set_num_threads(1)
    torch.save({name: _run_case(name) for name in CASES}, out_path)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    """Every case's kernel results, computed once by Triton's interpreter in a subprocess."""
    out = tmp_path_factory.mktemp("triton") / "results.pt"
    env = dict(os.environ, TRITON_INTERPRET="1", RSSEG_SCAN_BACKEND="")
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = torch.load(out)
    print(f"interpreter subprocess: {time.perf_counter() - start:.1f} s; per case (s): "
          + ", ".join(f"{k} {v['seconds']:.1f}" for k, v in results.items()))
    return results


def _tolerances(dtype: torch.dtype) -> tuple[float, float]:
    # float32: the kernel's float32 arithmetic is far inside mamba-ssm's tolerances (rtol 6e-4,
    # atol 2e-3); half precision: mamba-ssm's bfloat16 tolerances (only rounding of in/outputs).
    return (2e-4, 5e-5) if dtype == torch.float32 else (3e-2, 5e-2)


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_kernel_matches_the_oracle(interpreted, name):
    case, inp, gy, glast = _case_inputs(name)
    got = interpreted[name]
    dtype = inp["u"].dtype
    rtol, atol = _tolerances(dtype)
    ref = {k: v.double().requires_grad_() for k, v in inp.items()}
    y_ref, states = oracle(**ref, delta_softplus=case.get("softplus", True))
    assert got["y"].dtype == dtype and got["y"].shape == inp["u"].shape
    assert got["last"].dtype == torch.float32 and got["last"].shape == states.shape[:3]
    assert torch.isfinite(got["y"]).all()
    torch.testing.assert_close(got["y"].double(), y_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(got["last"].double(), states[..., -1], rtol=rtol, atol=atol)
    ((y_ref * gy).sum() + (states[..., -1] * glast).sum()).backward()
    assert set(got["grads"]) == set(inp)  # every input, optional ones included, got a gradient
    for k, grad in got["grads"].items():
        want = ref[k].grad
        assert grad is not None and grad.dtype == inp[k].dtype and grad.shape == inp[k].shape, k
        # Gradients are sums over positions: atol scaled by the gradient's size, as for the kernel;
        # float32 gets the torch scan's x10 for gradients, half precision mamba-ssm's tolerances.
        scale = max(1.0, want.abs().max().item())
        widen = 10 if dtype == torch.float32 else 1
        torch.testing.assert_close(grad.double(), want, rtol=rtol * widen, atol=atol * widen * scale, msg=k)


def test_interpreted_cases_cover_the_required_shapes():
    # Guards the case table: d_state 1 and 16, grouped and 3-dim B/C, each optional input absent
    # and present, several programs per group, several backward chunks, bf16 and fp16.
    ns = {c["n"] for c in CASES.values()}
    assert {1, 16} <= ns
    assert any(c["groups"] is None for c in CASES.values()) and any(c["groups"] for c in CASES.values())
    for k in ("z", "D", "delta_bias"):
        assert any(k in c.get("drop", ()) for c in CASES.values())
    assert any(c["length"] > c.get("chunk", 64) for c in CASES.values())
    assert {c.get("dtype", "float32") for c in CASES.values()} == {"float32", "bfloat16", "float16"}


def _compile_for_gpu() -> None:
    """In a subprocess: compile both kernels (every option on, bf16 data) for sm_90, no GPU needed.

    The interpreter runs the kernels as Python; this catches what only the compiler rejects."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from rsseg.models.ssm import triton_scan

    ints = {"L", "DIM", "G", "DG", "N", "n_dblocks", "n_chunks"}
    data = {"u_ptr", "dt_ptr", "B_ptr", "C_ptr", "z_ptr", "out_ptr", "dout_ptr", "du_ptr", "ddt_ptr", "dz_ptr"}
    flags = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, CHUNK_L=64, BLOCK_D=16, BLOCK_N=16)
    for fn, extra in ((triton_scan._scan_fwd, {"STORE_CKPT": True}), (triton_scan._scan_bwd, {})):
        kernel, constexprs = triton.jit(fn), {**flags, **extra}
        signature = {
            name: "constexpr" if name in constexprs else "i32" if name in ints
            else "*bf16" if name in data else "*fp32"
            for name in kernel.arg_names
        }
        compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))
        print(fn.__name__, "cubin bytes", len(compiled.asm["cubin"]))


def test_kernels_compile_for_a_gpu_target(tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, __file__, "--compile"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "_scan_fwd cubin bytes" in proc.stdout and "_scan_bwd cubin bytes" in proc.stdout


# ---- AMP: the torch scan computes in float32 under autocast ------------------------------------


def test_torch_scan_under_cpu_autocast_is_float32_inside():
    # As in a model under AMP: u, delta, B, C, z come out of bfloat16 projections.
    inp = make_inputs(2, 8, 16, 40, 4, seed=41)
    lin = torch.nn.Linear(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u = lin(inp["u"].transpose(1, 2)).transpose(1, 2)
        assert u.dtype == torch.bfloat16
        low = {k: v.to(torch.bfloat16) for k, v in inp.items() if k in ("delta", "B", "C", "z")}
        y = selective_scan(u, A=inp["A"], D=inp["D"], delta_bias=inp["delta_bias"], **low,
                           delta_softplus=True, backend="torch")
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    # Against the fp32 scan of the same (bfloat16-rounded) inputs: only the output rounding differs.
    y32 = selective_scan(u.float(), A=inp["A"], D=inp["D"], delta_bias=inp["delta_bias"],
                         **{k: v.float() for k, v in low.items()}, delta_softplus=True, backend="torch")
    torch.testing.assert_close(y.float(), y32, rtol=1e-2, atol=1e-2)
    assert (y.float() - y32).abs().max() <= y32.abs().max() * 2 ** -8  # half an ulp of bf16


# ---- Dispatch ----------------------------------------------------------------------------------


def _cuda_like(dtype: torch.dtype = torch.float32) -> types.SimpleNamespace:
    """A stand-in for a CUDA tensor: the backend checks read only its device and dtype."""
    return types.SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype)


def _resolve(backend, u, delta=None):
    inp = make_inputs(1, 4, 2, 6, None, seed=0)
    return scan_module.resolve_backend(backend, u, delta if delta is not None else u, inp["A"], inp["B"], inp["C"])


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(scan_module.ENV_VAR, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_cpu_auto_never_picks_triton_or_cuda(no_env, monkeypatch):
    u = torch.randn(1, 4, 6)
    # The torch scan (or the fused CPU scan where that backend exists), even with the interpreter on.
    assert _resolve(None, u) in ("torch", "fused")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _resolve(None, u) in ("torch", "fused")
    assert _resolve("torch", u) == "torch"


def test_forcing_triton_on_cpu_needs_the_interpreter(no_env, monkeypatch):
    inp = make_inputs(1, 4, 2, 6, None, seed=0)
    monkeypatch.setenv(scan_module.ENV_VAR, "triton")
    with pytest.raises(UsageError) as err:
        selective_scan(**inp)
    msg = str(err.value)
    assert "\n" not in msg and "'triton' cannot run" in msg and "TRITON_INTERPRET=1" in msg
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # only resolved here: running it would interpret
    assert _resolve(None, inp["u"]) == "triton"
    assert _resolve("torch", inp["u"]) == "torch"  # the argument wins over the environment
    monkeypatch.delenv(scan_module.ENV_VAR)
    assert _resolve(None, inp["u"]) != "triton"  # auto: the interpreter is for tests, not speed
    assert _resolve("triton", inp["u"]) == "triton"
    with pytest.raises(UsageError, match="float32/float16/bfloat16"):
        _resolve("triton", inp["u"].double())


def test_cuda_auto_order_mamba_then_triton_then_torch(no_env, monkeypatch):
    from rsseg.models.ssm import triton_scan

    u = _cuda_like()
    monkeypatch.setattr(scan_module, "_load_kernel", lambda: (lambda *a: None))  # mamba-ssm present
    assert _resolve(None, u) == "cuda"
    assert _resolve("triton", u) == "triton"
    monkeypatch.setenv(scan_module.ENV_VAR, "triton")
    assert _resolve(None, u) == "triton"  # the environment forces it over mamba-ssm
    monkeypatch.delenv(scan_module.ENV_VAR)
    monkeypatch.setattr(scan_module, "_load_kernel", lambda: None)  # mamba-ssm absent
    monkeypatch.setattr(scan_module, "_kernel_error", "mamba-ssm cannot be imported (test)")
    assert _resolve(None, u) == "triton"
    # float64 is neither kernel's: the torch scan, and forcing triton says why.
    assert _resolve(None, _cuda_like(torch.float64)) == "torch"
    monkeypatch.setattr(triton_scan, "triton", None)  # triton absent too
    monkeypatch.setattr(triton_scan, "_TRITON_ERROR", "No module named 'triton'")
    assert _resolve(None, u) == "torch"
    with pytest.raises(UsageError, match="triton cannot be imported") as err:
        _resolve("triton", u)
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="'cuda' cannot run"):
        _resolve("cuda", u)


def test_unknown_backend_lists_triton(no_env):
    with pytest.raises(UsageError, match="triton"):
        _resolve("tritonn", torch.randn(1, 4, 6))


def test_import_of_rsseg_does_not_import_triton():
    code = ("import sys, rsseg, rsseg.models.ssm, torch\n"
            "from rsseg.models.ssm import selective_scan\n"
            "u = torch.randn(1, 4, 8); B = torch.randn(1, 2, 8)\n"
            "selective_scan(u, u.abs(), -torch.ones(4, 2), B, B, backend='torch')\n"
            "print('triton' in sys.modules, 'rsseg.models.ssm.triton_scan' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "False"  # the kernel module stays unimported on CPU


# ---- CUDA: the compiled kernel against the torch scan (skipped without a GPU) ---------------------


def _triton_on_gpu() -> bool:
    if not torch.cuda.is_available():
        return False
    from rsseg.models.ssm import triton_scan

    return triton_scan.triton is not None


@pytest.mark.cuda
@pytest.mark.skipif(not _triton_on_gpu(), reason="needs CUDA and triton")
@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float32, 6e-4, 2e-3), (torch.bfloat16, 3e-2, 5e-2)])
@pytest.mark.parametrize(
    "b,d,n,length,groups",
    [(2, 24, 16, 257, 4), (1, 16, 1, 1000, None), (2, 40, 16, 4100, 4), (1, 6, 3, 70, 3)],
)
def test_triton_agrees_with_the_torch_scan_on_cuda(dtype, rtol, atol, b, d, n, length, groups):
    inp = make_inputs(b, d, n, length, groups, seed=43)
    inp = {k: (v.to(dtype) if k in LOW_PRECISION else v).cuda() for k, v in inp.items()}
    results = {}
    for backend in ("torch", "triton"):
        leaves = {k: v.clone().requires_grad_() for k, v in inp.items()}
        y, last = selective_scan(**leaves, delta_softplus=True, return_last_state=True, backend=backend)
        w = torch.linspace(-1, 1, y.numel(), device="cuda").view_as(y)
        ((y.float() * w).sum() + last.float().sum()).backward()
        results[backend] = (y, last, {k: v.grad for k, v in leaves.items()})
    (y_t, last_t, g_t), (y_k, last_k, g_k) = results["torch"], results["triton"]
    assert y_k.dtype == dtype and last_k.dtype == torch.float32
    torch.testing.assert_close(y_k.float(), y_t.float(), rtol=rtol, atol=atol)
    torch.testing.assert_close(last_k.float(), last_t.float(), rtol=rtol, atol=atol)
    for name in g_t:
        scale = max(1.0, g_t[name].float().abs().max().item())
        torch.testing.assert_close(g_k[name].float(), g_t[name].float(), rtol=rtol, atol=atol * scale, msg=name)


@pytest.mark.cuda
@pytest.mark.skipif(not _triton_on_gpu(), reason="needs CUDA and triton")
def test_triton_on_cuda_matches_the_oracle_and_is_auto_without_mamba(monkeypatch):
    monkeypatch.delenv(scan_module.ENV_VAR, raising=False)
    monkeypatch.setattr(scan_module, "_load_kernel", lambda: None)
    monkeypatch.setattr(scan_module, "_kernel_error", "mamba-ssm hidden by the test")
    inp = make_inputs(2, 8, 16, 123, 4, seed=37)
    cuda_inp = {k: v.cuda() for k, v in inp.items()}
    assert scan_module.resolve_backend(None, cuda_inp["u"], cuda_inp["delta"], cuda_inp["A"],
                                       cuda_inp["B"], cuda_inp["C"], cuda_inp["z"]) == "triton"
    y = selective_scan(**cuda_inp, delta_softplus=True)
    y_ref, _ = oracle(**inp, delta_softplus=True)
    torch.testing.assert_close(y.double().cpu(), y_ref, atol=5e-5, rtol=2e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # AMP: bf16 inputs, float32 inside
        y_amp = selective_scan(**{k: (v.bfloat16() if k in LOW_PRECISION else v) for k, v in cuda_inp.items()},
                               delta_softplus=True)
    assert y_amp.dtype == torch.bfloat16 and torch.isfinite(y_amp).all()
    torch.testing.assert_close(y_amp.double().cpu(), y_ref, rtol=3e-2, atol=5e-2)


if __name__ == "__main__":  # the subprocesses of `interpreted` and of the compile test
    if sys.argv[1] == "--compile":
        _compile_for_gpu()
    else:
        _interpreter_child(sys.argv[1])
