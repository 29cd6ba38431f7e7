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
    python benchmarks/models.py mafmamba reload-mamba --sizes 512 --threads 1 --paired --repeats 5
    python benchmarks/models.py mafmamba --sizes 512 --threads 1 --breakdown
    python benchmarks/models.py mafmamba-tiny --sizes 128 --threads 2 --paired --train 8   # demo steps
    python benchmarks/models.py mafmamba mafmamba-tiny --sizes 512 --thread-scaling 1 2

``--paired`` times every model and the baseline in ONE process, alternating them round by round
(time only, no memory or FLOPs): on a shared machine the ratio of two runs made seconds apart is
far steadier than that of two processes minutes apart. It prints each model's best and median
time, the ratio of the best times and the median and best of the per-round ratios.
``--breakdown`` splits one model's forward (best of ``--repeats``, process CPU time) into SS2D's
parts (its selective scan kernel, the projections, norm, conv) and the rest of the network.

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


def paired(names: list[str], size: int, repeats: int, cfg: dict) -> None:
    """Baseline and models in one process, alternated ``repeats`` rounds (see the docstring)."""
    torch.manual_seed(0)
    models = {BASELINE: create_model(BASELINE, 6, 3).eval()}
    models.update({n: create_model(n, 6, 3, **cfg).eval() for n in names})
    x = torch.randn(1, 3, size, size)
    times: dict[str, list[float]] = {n: [] for n in models}
    with torch.no_grad():
        for model in models.values():  # warm-up: allocator, lazy inits, numba's cache load
            model(torch.randn(1, 3, 64, 64))
            model(x)
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - start)
    base = times[BASELINE]
    print(f"{'model':<22}{'size':>6}{'best s':>9}{'median s':>10}{'best/best':>11}{'median ratio':>14}"
          f"{'best ratio':>12}")
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, base)]
        print(f"{name:<22}{size:>6}{min(ts):>9.3f}{statistics.median(ts):>10.3f}{min(ts) / min(base):>11.2f}"
              f"{statistics.median(ratios):>14.2f}{min(ratios):>12.2f}", flush=True)


def paired_training(names: list[str], size: int, batch: int, repeats: int, cfg: dict) -> None:
    """Training steps (forward, soft-CE loss, backward, AdamW) of the baseline and the models in
    one process, alternated round by round: ``rsseg demo``'s step is batch 8 of 128 px crops."""
    torch.manual_seed(0)
    models = {BASELINE: create_model(BASELINE, 6, 3).train()}
    models.update({n: create_model(n, 6, 3, **cfg).train() for n in names})
    optimizers = {n: torch.optim.AdamW(m.parameters(), lr=1e-4) for n, m in models.items()}
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 6, (batch, size, size))

    def step(name: str) -> None:
        optimizers[name].zero_grad(set_to_none=True)
        out = models[name](x)
        out = out[0] if isinstance(out, (tuple, list)) else out  # auxiliary heads: main output
        torch.nn.functional.cross_entropy(out, y, label_smoothing=0.05).backward()
        optimizers[name].step()

    times: dict[str, list[float]] = {n: [] for n in models}
    for name in models:  # warm-up
        step(name)
    for _ in range(repeats):
        for name in models:
            start = time.perf_counter()
            step(name)
            times[name].append(time.perf_counter() - start)
    base = times[BASELINE]
    print(f"training step, batch {batch} x {size} px")
    print(f"{'model':<22}{'best s':>9}{'median s':>10}{'median ratio':>14}{'best ratio':>12}")
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, base)]
        print(f"{name:<22}{min(ts):>9.3f}{statistics.median(ts):>10.3f}{statistics.median(ratios):>14.2f}"
              f"{min(ratios):>12.2f}", flush=True)


def thread_scaling(names: list[str], size: int, repeats: int, cfg: dict, counts: list[int]) -> None:
    """Each model's forward at each intra-op thread count, alternated round by round in this one
    process (torch's and, through it, the fused scan's numba threads: rsseg.models.ssm.cpu_scan)."""
    torch.manual_seed(0)
    models = {n: create_model(n, 6, 3, **cfg).eval() for n in [BASELINE, *names]}
    x = torch.randn(1, 3, size, size)
    times = {(n, c): [] for n in models for c in counts}
    with torch.no_grad():
        for name, model in models.items():
            for count in counts:  # warm-up at every count (numba's pool starts at first use)
                torch.set_num_threads(count)
                model(x)
        for _ in range(repeats):
            for name, model in models.items():
                for count in counts:
                    torch.set_num_threads(count)
                    start = time.perf_counter()
                    model(x)
                    times[name, count].append(time.perf_counter() - start)
    print(f"{'model':<22}{'size':>6}{'threads':>9}{'best s':>9}{'median s':>10}{'speed-up vs 1st':>17}")
    for name in models:
        first = statistics.median(times[name, counts[0]])
        for count in counts:
            ts = times[name, count]
            print(f"{name:<22}{size:>6}{count:>9}{min(ts):>9.3f}{statistics.median(ts):>10.3f}"
                  f"{first / statistics.median(ts):>17.2f}", flush=True)


def breakdown(name: str, size: int, repeats: int, cfg: dict) -> None:
    """Where one model's forward time goes: SS2D's parts and the rest (best of ``repeats``)."""
    from collections import defaultdict

    import rsseg.models.ssm.ss2d as ss2d

    clock = time.process_time  # CPU time of this process: other tenants' time is not counted
    parts: dict[str, float] = defaultdict(float)

    def timed(fn, key):  # type: ignore[no-untyped-def]
        def run(*args, **kwargs):  # type: ignore[no-untyped-def]
            start = clock()
            out = fn(*args, **kwargs)
            parts[key] += clock() - start
            return out
        return run

    torch.manual_seed(0)
    model = create_model(name, 6, 3, **cfg).eval()
    for m in model.modules():
        if isinstance(m, ss2d.SS2D):
            m.forward = timed(m.forward, "SS2D (all of it)")
            m.scan_fused = timed(m.scan_fused, "  x_proj, dt, scan kernel, D (fused path)")
            m.scan = timed(m.scan, "  x_proj, dt, scan (general path)")
            for sub, key in ((m.in_proj, "in_proj"), (m.conv2d, "depthwise conv"),
                             (m.out_norm, "out_norm"), (m.out_proj, "out_proj")):
                sub.forward = timed(sub.forward, f"  {key}")
    import rsseg.models.ssm.cpu_scan as cpu_scan

    kernels = {"ss2d_forward32": "    scan kernel (inference)", "forward32": "    scan kernel (lane layout)"}
    for attr, key in kernels.items():
        setattr(cpu_scan, attr, timed(getattr(cpu_scan, attr), key))
    x = torch.randn(1, 3, size, size)
    best: dict[str, float] = {}
    with torch.no_grad():
        model(x)
        for _ in range(repeats):
            parts.clear()
            start = clock()
            model(x)
            parts["total"] = clock() - start
            if not best or parts["total"] < best["total"]:
                best = dict(parts)
    best["rest of the network"] = best["total"] - best.get("SS2D (all of it)", 0.0)
    ss2d_keys = [k for k in best if k.startswith("  ") and not k.startswith("    ")]
    order = ["total", "SS2D (all of it)"]
    for key in sorted(ss2d_keys, key=lambda k: -best[k]):
        order.append(key)
        if key.startswith("  x_proj"):
            order += [k for k in kernels.values() if k in best]
    order.append("rest of the network")
    print(f"{name} at {size} px, {torch.get_num_threads()} thread(s), best of {repeats} (CPU time):")
    for key in order:
        print(f"  {key:<44}{best[key] * 1e3:9.1f} ms {100 * best[key] / best['total']:6.1f} %")


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
    parser.add_argument("--paired", action="store_true",
                        help="time models and baseline alternately in this one process (time only)")
    parser.add_argument("--train", type=int, default=None, metavar="BATCH",
                        help="with --paired: time training steps of this batch instead of forwards")
    parser.add_argument("--thread-scaling", type=int, nargs="+", default=None, metavar="N",
                        help="time each model's forward at these thread counts, alternated in one process")
    parser.add_argument("--breakdown", action="store_true",
                        help="split each model's forward into SS2D's parts and the rest")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = json.loads(args.cfg)
    if args.child:
        print(json.dumps(measure(args.child, args.sizes[0], args.repeats, cfg, not args.no_flops)))
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 1, 6 classes, CPU")
    if args.thread_scaling:
        for size in args.sizes:
            thread_scaling(args.models, size, args.repeats, cfg, args.thread_scaling)
        return
    if args.breakdown:
        for size in args.sizes:
            for name in args.models:
                breakdown(name, size, args.repeats, cfg)
        return
    if args.paired:
        for size in args.sizes:
            if args.train:
                paired_training(args.models, size, args.train, args.repeats, cfg)
            else:
                paired(args.models, size, args.repeats, cfg)
        return
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
