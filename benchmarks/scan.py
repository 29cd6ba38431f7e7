"""Benchmark of rsseg's selective scan: the chunked torch scan against two sequential loops.

Baselines, measured in the same run on the same inputs:
- ``unbind loop``: the plain recurrence, one step per position, steps taken with ``unbind``;
- ``index loop``: the same recurrence reading ``x[:, :, i]`` per step, as mamba-ssm's reference
  ``selective_scan_ref`` does. Its backward is quadratic in the length (each step's slice
  gradient is a zero tensor of the whole sequence): at L 2048 (b1 x 384 x N16) fwd+bwd already
  takes about 3 minutes on one core, 16x its time at L 1024, so at the full lengths it would run
  for hours. It is timed once at a shorter length (``--index-length`` overrides), against the
  chunked scan at that length, and its full-length time is bounded from below by scaling the
  measured time linearly (every step at full length costs at least as much as at the shorter
  one); the ratio of that bound to the chunked scan's full-length time is a lower bound of the
  full-length ratio.
Reports the best wall time (of --repeat runs) of forward (no grad) and forward+backward, the ratios, the largest
difference of outputs and of every gradient against the unbind loop, and peak memory (CPU: the
growth of the process's peak RSS over the call, each measurement in a fresh process; CUDA: the allocator peak).
With ``--device cuda`` and mamba-ssm importable it also checks the torch scan against the kernel.
With ``--device cuda`` it also times the scan backends (torch, triton, and cuda where mamba-ssm is
importable) per case, fwd and fwd+bwd, and checks the Triton kernel against the torch scan
(outputs, last state and every gradient) within mamba-ssm's tolerances; ``--backends-only`` runs
just that (a few seconds: the loop baselines are for CPU).
Then SS2D forward on a 256 x 256 x 64 map, batch 1 (target: under 4 GB peak on CPU).

    python benchmarks/scan.py                 # full run on CPU (about 25 minutes, 17 of them the index loop)
    python benchmarks/scan.py --quick         # small shapes, a smoke run
    python benchmarks/scan.py --device cuda   # on a GPU machine, plus the kernel agreement check
    python benchmarks/scan.py --fused-stages --threads 1   # fused (numba) vs torch scan only, at
                                              # MAFMamba's SS2D stage shapes at 512 and 1024 px, then
                                              # whole SS2D modules at those shapes (general path with
                                              # the torch scan vs the fused traversal kernel)
    python benchmarks/scan.py --device cuda --backends-only   # backend times + Triton check only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from rsseg.models.ssm import scan as scan_module  # noqa: E402
from rsseg.models.ssm import SS2D, selective_scan  # noqa: E402

# (batch, K*D channels, d_state, length, index-loop length)
CASES = [(1, 384, 16, 4096, 2048), (2, 768, 1, 16384, 8192)]
QUICK_CASES = [(1, 64, 16, 1024, 256), (2, 96, 1, 2048, 256)]


def make_inputs(b: int, d: int, n: int, length: int, device: str, seed: int = 0) -> dict:
    """Inputs shaped like one SS2D call (4 groups), with Mamba-like value ranges."""
    g = torch.Generator().manual_seed(seed)
    groups = 4 if d % 4 == 0 else 1

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(device)

    return {
        "u": rand(b, d, length),
        "delta": rand(b, d, length, scale=0.5),
        "A": -torch.exp(rand(d, n, scale=0.5)),
        "B": rand(b, groups, n, length),
        "C": rand(b, groups, n, length),
        "D": rand(d),
        "z": rand(b, d, length),
        "delta_bias": rand(d, scale=0.5) - 4.0,
    }


def chunked(inp: dict) -> torch.Tensor:
    return selective_scan(**inp, delta_softplus=True, backend="torch")


def _prepare(inp: dict) -> tuple:
    u, A, D, z = inp["u"], inp["A"], inp["D"], inp["z"]
    d = u.shape[1]
    delta = F.softplus(inp["delta"] + inp["delta_bias"][:, None])
    B = inp["B"].repeat_interleave(d // inp["B"].shape[1], dim=1)  # (b, d, n, l)
    C = inp["C"].repeat_interleave(d // inp["C"].shape[1], dim=1)
    decay = torch.exp(delta.unsqueeze(2) * A[:, :, None])  # (b, d, n, l)
    drive = (delta * u).unsqueeze(2) * B
    return decay, drive, C, u, D, z


def _finish(ys: list, u: torch.Tensor, D: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return (torch.stack(ys, dim=-1) + D[:, None] * u) * F.silu(z)


def unbind_loop(inp: dict) -> torch.Tensor:
    decay, drive, C, u, D, z = _prepare(inp)
    h = torch.zeros_like(drive[..., 0])
    ys = []
    for a_t, x_t, c_t in zip(decay.unbind(-1), drive.unbind(-1), C.unbind(-1)):
        h = torch.addcmul(x_t, a_t, h)
        ys.append((h * c_t).sum(-1))
    return _finish(ys, u, D, z)


def index_loop(inp: dict) -> torch.Tensor:
    decay, drive, C, u, D, z = _prepare(inp)
    h = torch.zeros_like(drive[..., 0])
    ys = []
    for i in range(u.shape[-1]):
        h = decay[:, :, :, i] * h + drive[:, :, :, i]
        ys.append(torch.einsum("bdn,bdn->bd", h, C[:, :, :, i]))
    return _finish(ys, u, D, z)


IMPLS: dict[str, Callable[[dict], torch.Tensor]] = {
    "chunked": chunked, "unbind loop": unbind_loop, "index loop": index_loop,
}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_once(fn: Callable, inp: dict, backward: bool, device: str) -> float:
    leaves = {k: v.detach().requires_grad_(backward) for k, v in inp.items()}
    _sync(device)
    start = time.perf_counter()
    with torch.set_grad_enabled(backward):
        y = fn(leaves)
        if backward:
            y.backward(torch.ones_like(y))
    _sync(device)
    return time.perf_counter() - start


def timed(fn: Callable, inp: dict, backward: bool, device: str, repeat: int) -> float:
    # The minimum: on a shared machine, other processes only ever add time.
    return min(run_once(fn, inp, backward, device) for _ in range(repeat))


def grads(fn: Callable, inp: dict) -> tuple[torch.Tensor, dict]:
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inp.items()}
    y = fn(leaves)
    weight = torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)  # a non-uniform cotangent
    (y * weight).sum().backward()
    return y.detach(), {k: v.grad for k, v in leaves.items()}


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def peak_memory(impl: str, case: tuple, length: int, backward: bool, device: str) -> tuple[float, float]:
    """(seconds, peak MiB) of one call; on CPU measured in a fresh process (peak RSS growth)."""
    if device == "cuda":
        b, d, n = case[:3]
        inp = make_inputs(b, d, n, length, device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        seconds = run_once(IMPLS[impl], inp, backward, device)
        return seconds, (torch.cuda.max_memory_allocated() - base) / 2**20
    spec = json.dumps({"impl": impl, "case": list(case[:3]), "length": length, "backward": backward,
                       "threads": torch.get_num_threads()})
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", spec], capture_output=True, text=True, check=True
    )
    seconds, mib = out.stdout.strip().splitlines()[-1].split()
    return float(seconds), float(mib)


def _reset_peak_rss() -> float:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); returns that RSS in MiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _proc_status_mib("VmRSS")


def _proc_status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(spec: str) -> None:
    """In a fresh process: seconds and peak RSS growth (MiB) of one call, after the inputs exist."""
    cfg = json.loads(spec)
    torch.set_num_threads(cfg.get("threads", torch.get_num_threads()))
    if cfg["impl"] == "ss2d":
        import os

        if cfg.get("backend"):
            os.environ[scan_module.ENV_VAR] = cfg["backend"]
        torch.manual_seed(0)
        train = cfg.get("backward", False)
        model = SS2D(cfg["channels"]).train(train)
        x = torch.randn(1, cfg["size"], cfg["size"], cfg["channels"])
        if cfg.get("backend") == "fused":  # numba's kernels loaded (or compiled) outside the measurement
            with torch.no_grad():
                SS2D(cfg["channels"])(torch.randn(1, 8, 8, cfg["channels"]))
            if train:
                SS2D(cfg["channels"])(torch.randn(1, 8, 8, cfg["channels"])).sum().backward()
        base = _reset_peak_rss()
        start = time.perf_counter()
        with torch.set_grad_enabled(train):
            y = model(x)
            if train:
                y.square().mean().backward()
        seconds = time.perf_counter() - start
    else:
        b, d, n = cfg["case"]
        inp = make_inputs(b, d, n, cfg["length"], "cpu")
        base = _reset_peak_rss()
        seconds = run_once(IMPLS[cfg["impl"]], inp, cfg["backward"], "cpu")
    print(seconds, _proc_status_mib("VmHWM") - base)


def kernel_agreement(case: tuple) -> None:
    """Torch scan vs mamba-ssm's kernel (outputs and gradients), within mamba-ssm's tolerances."""
    if scan_module._load_kernel() is None:
        print(f"kernel check skipped: {scan_module._kernel_error}")
        return
    b, d, n, length = case[:4]
    for dtype, rtol, atol in ((torch.float32, 6e-4, 2e-3), (torch.bfloat16, 3e-2, 5e-2)):
        inp = make_inputs(b, d, n, length, "cuda")
        inp = {k: (v.to(dtype) if k in ("u", "delta", "B", "C", "z") else v) for k, v in inp.items()}
        results = {}
        for backend in ("torch", "cuda"):
            leaves = {k: v.detach().clone().requires_grad_() for k, v in inp.items()}
            y = selective_scan(**leaves, delta_softplus=True, backend=backend)
            y.float().sum().backward()
            results[backend] = (y.detach(), {k: v.grad for k, v in leaves.items()})
        y_t, g_t = results["torch"]
        y_k, g_k = results["cuda"]
        ok = torch.allclose(y_t.float(), y_k.float(), rtol=rtol, atol=atol)
        worst = max(
            ((g_t[k].float() - g_k[k].float()).abs() - rtol * g_k[k].float().abs()).max().item()
            for k in g_t
        )
        print(
            f"kernel agreement {str(dtype):15s} case {case[:4]}: output within rtol={rtol} "
            f"atol={atol}: {ok}; max |out diff| {(y_t.float() - y_k.float()).abs().max():.2e}; "
            f"gradients' worst excess over rtol*|ref| {worst:.2e} (atol scale {atol})"
        )


def backend_timings(case: tuple, repeat: int, device: str = "cuda") -> list[tuple]:
    """(case, mode, backend, ms) for each scan backend that runs here (CUDA; CPU only under
    TRITON_INTERPRET=1, as a smoke test)."""
    b, d, n, length = case[:4]
    inp = make_inputs(b, d, n, length, device)
    backends = ["torch", "triton"] + (["cuda"] if scan_module._load_kernel() is not None else [])
    rows = []
    for backend in backends:
        def fn(leaves: dict, backend: str = backend) -> torch.Tensor:
            return selective_scan(**leaves, delta_softplus=True, backend=backend)

        for mode, backward in (("fwd", False), ("fwd+bwd", True)):
            run_once(fn, inp, backward, device)  # warm-up (and Triton's compilation)
            t = timed(fn, inp, backward, device, repeat)
            rows.append((f"b{b} KD{d} N{n} L{length}", mode, backend, t * 1e3))
            print(f"  {mode:8s} {backend:7s} b{b} KD{d} N{n} L{length}: {t * 1e3:9.2f} ms", flush=True)
    return rows


def triton_agreement(case: tuple, device: str = "cuda") -> bool:
    """Triton kernel vs torch scan (outputs, last state, every gradient), mamba-ssm's tolerances."""
    b, d, n, length = case[:4]
    ok_all = True
    for dtype, rtol, atol in ((torch.float32, 6e-4, 2e-3), (torch.bfloat16, 3e-2, 5e-2)):
        inp = make_inputs(b, d, n, length, device)
        inp = {k: (v.to(dtype) if k in ("u", "delta", "B", "C", "z") else v) for k, v in inp.items()}
        results = {}
        for backend in ("torch", "triton"):
            leaves = {k: v.detach().clone().requires_grad_() for k, v in inp.items()}
            y, last = selective_scan(**leaves, delta_softplus=True, return_last_state=True, backend=backend)
            weight = torch.linspace(-1, 1, y.numel(), device=device).view_as(y)
            ((y.float() * weight).sum() + last.sum()).backward()
            results[backend] = (y.detach(), last.detach(), {k: v.grad for k, v in leaves.items()})
        (y_t, last_t, g_t), (y_k, last_k, g_k) = results["torch"], results["triton"]
        ok = torch.allclose(y_k.float(), y_t.float(), rtol=rtol, atol=atol)
        ok &= torch.allclose(last_k, last_t, rtol=rtol, atol=atol)
        worst = ""
        for k in g_t:
            scale = max(1.0, g_t[k].float().abs().max().item())
            good = torch.allclose(g_k[k].float(), g_t[k].float(), rtol=rtol, atol=atol * scale)
            ok &= good
            if not good:
                worst += f" {k}: max diff {(g_k[k].float() - g_t[k].float()).abs().max():.2e} (scale {scale:.1e})"
        ok_all &= ok
        print(f"triton agreement {str(dtype):15s} case {case[:4]}: outputs, last state and gradients "
              f"within rtol={rtol} atol={atol}: {ok}; max |out diff| "
              f"{(y_k.float() - y_t.float()).abs().max():.2e}{worst}")
    return ok_all


def mafmamba_stage_cases(size: int) -> list[tuple[int, int, int, int]]:
    """(batch, K*D channels, d_state, length) of MAFMamba's SS2D calls at ``size`` px: ResNet-18
    widths 64..512 at strides 4..32, d_inner = 2 x width, four traversals, d_state 16."""
    return [(1, 4 * 2 * width, 16, (size // stride) ** 2)
            for width, stride in ((64, 4), (128, 8), (256, 16), (512, 32))]


def fused_vs_torch(sizes: list[int], repeat: int) -> None:
    """Fused CPU scan against the torch scan, fwd and fwd+bwd, same process and inputs."""
    def backend_fn(name: str) -> Callable[[dict], torch.Tensor]:
        return lambda inp: selective_scan(**inp, delta_softplus=True, backend=name)

    print(f"{'size':>5} {'case':22s} {'mode':8s} {'torch ms':>10s} {'fused ms':>10s} {'speed-up':>9s}")
    totals: dict[tuple[int, str], list[float]] = {}
    for size in sizes:
        for b, d, n, length in mafmamba_stage_cases(size):
            inp = make_inputs(b, d, n, length, "cpu")
            for mode, backward in (("fwd", False), ("fwd+bwd", True)):
                times = []
                for name in ("torch", "fused"):
                    run_once(backend_fn(name), inp, backward, "cpu")  # warm-up (and numba's compile)
                    times.append(timed(backend_fn(name), inp, backward, "cpu", repeat))
                tot = totals.setdefault((size, mode), [0.0, 0.0])
                tot[0] += times[0]
                tot[1] += times[1]
                print(f"{size:5d} {f'b{b} KD{d} N{n} L{length}':22s} {mode:8s} {times[0] * 1e3:10.1f} "
                      f"{times[1] * 1e3:10.1f} {times[0] / times[1]:9.2f}", flush=True)
    for (size, mode), (t_torch, t_fused) in totals.items():
        print(f"{size:5d} {'all four stages':22s} {mode:8s} {t_torch * 1e3:10.1f} {t_fused * 1e3:10.1f} "
              f"{t_torch / t_fused:9.2f}")


def ss2d_stages(sizes: list[int], repeat: int) -> None:
    """Whole SS2D modules at MAFMamba's stage shapes: the general path (four traversal copies,
    torch scan, merge) against the fused traversal kernel (auto on CPU), same process and inputs;
    inference (no grad) and a training step (forward + backward)."""
    import os

    print(f"\n{'size':>5} {'SS2D(d_model) on HxW':24s} {'mode':9s} {'torch ms':>10s} {'fused ms':>10s} "
          f"{'speed-up':>9s}")
    saved = os.environ.get(scan_module.ENV_VAR)
    try:
        for size in sizes:
            for width, stride in ((64, 4), (128, 8), (256, 16), (512, 32)):
                side = size // stride
                torch.manual_seed(0)
                model = SS2D(width)
                x = torch.randn(1, side, side, width)
                for mode, train in (("inference", False), ("fwd+bwd", True)):
                    times = []
                    for backend in ("torch", "auto"):
                        os.environ[scan_module.ENV_VAR] = backend

                        def step(_: dict) -> torch.Tensor:
                            leaf = x.detach().requires_grad_(train)
                            with torch.set_grad_enabled(train):
                                y = model(leaf)
                                if train:
                                    y.square().mean().backward()
                            return y

                        step({})  # warm-up
                        times.append(min(run_once(step, {}, False, "cpu") for _ in range(repeat)))
                    print(f"{size:5d} {f'SS2D({width}) {side}x{side}':24s} {mode:9s} {times[0] * 1e3:10.1f} "
                          f"{times[1] * 1e3:10.1f} {times[0] / times[1]:9.2f}", flush=True)
    finally:
        if saved is None:
            os.environ.pop(scan_module.ENV_VAR, None)
        else:
            os.environ[scan_module.ENV_VAR] = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory column")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default); 1 is steadiest on a loaded machine")
    parser.add_argument("--index-length", type=int, default=0,
                        help="length at which the index loop is timed (0: per case, see CASES)")
    parser.add_argument("--backends-only", action="store_true",
                        help="with --device cuda: only the backend timings and the Triton check")
    parser.add_argument("--fused-stages", action="store_true",
                        help="only the fused-vs-torch comparison at MAFMamba's stage shapes")
    parser.add_argument("--stage-sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.fused_stages:
        print(f"torch {torch.__version__}, CPU, threads {torch.get_num_threads()}")
        fused_vs_torch(args.stage_sizes, args.repeat)
        ss2d_stages(args.stage_sizes, args.repeat)
        for backend in ("torch", "fused"):  # a 256^2 SS2D training step's memory, fresh processes
            spec = json.dumps({"impl": "ss2d", "channels": 64, "size": 256, "backward": True,
                               "backend": backend, "threads": torch.get_num_threads()})
            out = subprocess.run([sys.executable, __file__, "--memory-child", spec],
                                 capture_output=True, text=True, check=True)
            seconds, mib = out.stdout.strip().splitlines()[-1].split()
            print(f"SS2D(64) fwd+bwd, batch 1, 256x256, scan backend {backend}: peak RSS growth "
                  f"{float(mib):.0f} MiB, {float(seconds):.2f} s")
        return
    device = args.device
    cases = QUICK_CASES if args.quick else CASES
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    if device == "cuda":
        print("\nScan backends on CUDA (best of --repeat; torch = the chunked scan):")
        backend_rows = [row for case in cases for row in backend_timings(case, args.repeat)]
        agree = all([triton_agreement(case) for case in cases])
        print(f"triton agrees with the torch scan on every case: {agree}")
        print(f"{'case':24s} {'mode':8s} {'backend':8s} {'ms':>10s}")
        for case_name, mode, backend, ms in backend_rows:
            print(f"{case_name:24s} {mode:8s} {backend:8s} {ms:10.2f}")
        if args.backends_only:
            return

    rows = []
    for case in cases:
        b, d, n, length, index_length = case
        index_length = min(args.index_length or index_length, length)
        # Correctness first: the chunked scan against the unbind loop, outputs and all gradients.
        inp = make_inputs(b, d, n, length, device)
        y_c, g_c = grads(chunked, inp)
        y_u, g_u = grads(unbind_loop, inp)
        diffs = [max_rel_diff(y_c, y_u)] + [max_rel_diff(g_c[k], g_u[k]) for k in g_u]
        print(f"case b={b} KD={d} N={n} L={length}: chunked vs unbind loop, max relative diff "
              f"output {diffs[0]:.1e}, gradients {max(diffs[1:]):.1e}")
        del y_c, g_c, y_u, g_u

        for mode, backward in (("fwd", False), ("fwd+bwd", True)):
            base = {}
            for impl, impl_len in (("chunked", length), ("unbind loop", length),
                                   ("chunked", index_length), ("index loop", index_length)):
                if impl == "index loop":
                    # One run (minutes long, so no warm-up), timed with its memory in one process.
                    t, mem = peak_memory(impl, case, impl_len, backward, device)
                else:
                    inp = make_inputs(b, d, n, impl_len, device)
                    run_once(IMPLS[impl], inp, backward, device)  # warm-up
                    t = timed(IMPLS[impl], inp, backward, device, args.repeat)
                    mem = float("nan") if args.no_memory else peak_memory(impl, case, impl_len, backward, device)[1]
                if impl == "chunked":
                    base[impl_len] = t
                ratio = t / base[impl_len]
                rows.append((f"b{b} KD{d} N{n}", mode, impl, impl_len, t, ratio, mem, "measured"))
                print(f"  {mode:8s} {impl:12s} L={impl_len:6d} {t * 1e3:10.1f} ms  x{ratio:7.1f}  {mem:8.0f} MiB",
                      flush=True)
            if index_length < length:
                bound = t * length / index_length  # t: the index loop's time just measured
                rows.append((f"b{b} KD{d} N{n}", mode, "index loop", length, bound, bound / base[length],
                             float("nan"), f">= (x{length // index_length} of L {index_length})"))
                print(f"  {mode:8s} index loop   L={length:6d} >= {bound * 1e3:7.1f} ms  x{bound / base[length]:7.1f}"
                      f" or more (lower bound: the L {index_length} time x{length / index_length:g})", flush=True)

    print("\nSummary (ratio = time / chunked time at the same length; higher = chunked faster;")
    print("'>=' rows are lower bounds of the index loop's full-length time and ratio)")
    print(f"{'case':18s} {'mode':8s} {'impl':12s} {'L':>6s} {'ms':>10s} {'ratio':>8s} {'peak MiB':>9s}  how")
    for case_name, mode, impl, impl_len, t, ratio, mem, how in rows:
        print(f"{case_name:18s} {mode:8s} {impl:12s} {impl_len:6d} {t * 1e3:10.1f} {ratio:8.1f} {mem:9.0f}  {how}")

    size = 64 if args.quick else 256
    if device == "cpu":
        spec = json.dumps({"impl": "ss2d", "channels": 64, "size": size, "threads": torch.get_num_threads()})
        start = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, "--memory-child", spec],
                             capture_output=True, text=True, check=True)
        mem = float(out.stdout.strip().splitlines()[-1].split()[1])
        print(f"\nSS2D(64) forward, batch 1, {size}x{size}, CPU, no grad: peak RSS growth {mem:.0f} MiB "
              f"(target < 4096), {time.perf_counter() - start:.1f} s including process start")
    else:
        torch.manual_seed(0)
        model = SS2D(64).to(device).eval()
        x = torch.randn(1, size, size, 64, device=device)
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
        with torch.no_grad():
            model(x)
        print(f"\nSS2D(64) forward, batch 1, {size}x{size}, CUDA: peak "
              f"{(torch.cuda.max_memory_allocated() - base_mem) / 2**20:.0f} MiB")
        for case in cases:
            kernel_agreement(case)


if __name__ == "__main__":
    main()
