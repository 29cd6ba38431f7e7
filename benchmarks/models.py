"""Benchmark registered models against smp U-Net-ResNet18 on the same input, in the same run.

For each model (names on the command line, any registered name) and each input size it reports:
- parameters;
- CPU forward time (eval, no grad, batch 1, median of ``--repeats`` after one warm-up) and its
  ratio to the baseline's;
- peak memory of that forward: growth of the process's peak RSS over its RSS before the forward,
  each (model, size) in a fresh process so earlier runs cannot hide a peak; ratio to the baseline;
- FLOPs from ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per multiply-add; it counts
  convolutions and matrix products only, so BN/activations/softmax/interpolation are left out),
  given also as multiply-adds (= FLOPs / 2, the unit most segmentation papers call "FLOPs"), plus
  an estimate of the selective scans' own arithmetic, which the counter cannot see (elementwise
  ops; the scan is left out of the counted part entirely, see ``count_flops``): per SS2D call 4 traversals x B x D_inner x N x L x 9 FLOPs (exp(dA), dB*u, h = a*h + b,
  y = C.h, i.e. about 9 per state element per step; the D*u skip and gating are negligible).

    python benchmarks/models.py mafmamba                       # 512 and 1024 (minutes on 2 cores)
    python benchmarks/models.py mafmamba mafmamba-tiny --sizes 256 512
    python benchmarks/models.py segret-t --cfg '{"drop_path": 0}'   # cfg goes to every model
    python benchmarks/models.py mafmamba --threads 1                  # on a busy shared machine
    python benchmarks/models.py mafmamba --backends torch fused       # each scan backend, same run

Extend by naming another registered model; nothing here is model-specific except the SS2D hook.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from rsseg.models import count_parameters, create_model  # noqa: E402

BASELINE = "unet-r18"
SCAN_FLOPS_PER_STATE_STEP = 9


def _rss_bytes() -> int:
    """Current resident set size (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def scan_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Estimated FLOPs of the selective scans inside SS2D modules (invisible to FlopCounterMode)."""
    total = 0

    def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        nonlocal total
        b, h, w, _ = inputs[0].shape
        total += 4 * b * module.d_inner * module.d_state * h * w * SCAN_FLOPS_PER_STATE_STEP

    handles = [
        m.register_forward_pre_hook(hook)
        for m in model.modules()
        if type(m).__name__ == "SS2D" and hasattr(m, "d_inner")
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return total


def count_flops(name: str, size: int, cfg: dict) -> dict:
    """FlopCounterMode FLOPs of one batch-1 forward, plus the scan estimate.

    Runs on the meta device (no memory, no time) with SS2D's selective scan replaced by a
    shape-preserving stand-in: the counter would otherwise see a model-dependent part of the torch
    scan's arithmetic (its einsums) and none of its elementwise work. The scan is then estimated
    separately (``scan_flops``). Models that cannot run on meta are counted on the CPU as they are.
    """
    from torch.utils.flop_counter import FlopCounterMode

    import rsseg.models.ssm.ss2d as ss2d

    def scan_stand_in(u: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return u

    original = ss2d.selective_scan
    ss2d.selective_scan = scan_stand_in
    try:
        for device in ("meta", "cpu"):
            try:
                with torch.device(device):
                    model = create_model(name, 6, 3, **cfg).eval()
                    x = torch.randn(1, 3, size, size)
                    counter = FlopCounterMode(display=False)
                    with counter, torch.no_grad():
                        model(x)
                    scans = scan_flops(model, x)
                return {"counted_flops": counter.get_total_flops(), "scan_flops_estimate": scans,
                        "flops_device": device}
            except (NotImplementedError, RuntimeError):
                if device == "cpu":
                    raise
    finally:
        ss2d.selective_scan = original
    raise AssertionError("unreachable")


def measure(name: str, size: int, repeats: int, cfg: dict, flops: bool) -> dict:
    """One (model, size) measurement; meant to run in its own process."""
    torch.manual_seed(0)
    model = create_model(name, 6, 3, **cfg).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))  # warm-up at a small size: allocator, lazy inits
        rss_before = _rss_bytes()
        start = time.perf_counter()
        model(x)
        first = time.perf_counter() - start
        peak = _peak_rss_bytes() - rss_before
        times = [first]
        for _ in range(repeats - 1):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    result = {
        "model": name,
        "size": size,
        "params": count_parameters(model),
        "seconds": statistics.median(times),
        "peak_bytes": max(peak, 0),
    }
    if flops:
        result.update(count_flops(name, size, cfg))
    return result


def run_child(name: str, size: int, repeats: int, cfg: dict, flops: bool, threads: int,
              backend: str | None = None) -> dict:
    env = dict(os.environ, RSSEG_SCAN_BACKEND=backend) if backend else None  # the scan backend
    cmd = [sys.executable, __file__, "--child", name, "--sizes", str(size),
           "--repeats", str(repeats), "--cfg", json.dumps(cfg), "--threads", str(threads)]
    if not flops:
        cmd.append("--no-flops")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{name} at {size}: child failed\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("models", nargs="*", default=["mafmamba"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cfg", default="{}", help="JSON config passed to every benchmarked model")
    parser.add_argument("--no-flops", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--backends", nargs="+", default=[None],
                        help="scan backends (RSSEG_SCAN_BACKEND) to run each model with, e.g. torch fused")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = json.loads(args.cfg)
    if args.child:
        print(json.dumps(measure(args.child, args.sizes[0], args.repeats, cfg, not args.no_flops)))
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 1, 6 classes, CPU")
    header = (f"{'model':<22}{'size':>6}{'params M':>10}{'time s':>9}{'x base':>8}{'peak MiB':>10}"
              f"{'x base':>8}{'GMACs':>9}{'GFLOPs':>9}{'+scan GFLOPs':>14}")
    print(header)
    for size in args.sizes:
        threads = torch.get_num_threads()
        base = run_child(BASELINE, size, args.repeats, {}, not args.no_flops, threads)
        rows = [base] + [
            dict(run_child(m, size, args.repeats, cfg, not args.no_flops, threads, backend),
                 model=m if backend is None else f"{m}[{backend}]")
            for m in args.models for backend in args.backends
        ]
        for r in rows:
            line = (f"{r['model']:<22}{size:>6}{r['params'] / 1e6:>10.2f}{r['seconds']:>9.3f}"
                    f"{r['seconds'] / base['seconds']:>8.2f}{r['peak_bytes'] / 2**20:>10.0f}"
                    f"{r['peak_bytes'] / max(base['peak_bytes'], 1):>8.2f}")
            if "counted_flops" in r:
                line += (f"{r['counted_flops'] / 2e9:>9.2f}{r['counted_flops'] / 1e9:>9.2f}"
                         f"{r['scan_flops_estimate'] / 1e9:>14.2f}")
            print(line, flush=True)


if __name__ == "__main__":
    main()
