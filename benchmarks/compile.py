"""torch.compile and channels-last against eager NCHW: inference forwards, in one process.

    python benchmarks/compile.py [--size 512] [--models unet-r18,mafmamba-tiny] [--threads 1]
    python benchmarks/compile.py --device cuda --size 1024 --batch 4 --channels-last --amp bf16

Per model and layout (NCHW; with ``--channels-last`` also NHWC, model and input converted): one
eager call (numba / oneDNN / cuDNN set-up), then the first call of
``rsseg.accel.compile_model(model)``, timed separately: its excess over a steady call is the
compilation time. Then every variant (eager and compiled, per layout) runs ``--repeats`` times,
interleaved so that machine load affects all alike, and the medians are compared with eager
NCHW in the same process: speed-up = eager NCHW time / variant time (above 1: faster). Inputs
are random (batch, 3, size, size) float32 under ``torch.inference_mode``, as ``rsseg predict``
runs; ``--amp bf16|fp16`` runs every variant under autocast. Each row also gives the largest
difference from the eager NCHW output and the graph breaks dynamo made (each selective scan
call is one, by design: see docs/gpu.md). Figures: docs/gpu.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from typing import Any, Callable

import torch
import torch._dynamo
from torch import nn

from rsseg.accel import compile_model, to_channels_last


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def bench_model(name: str, size: int, batch: int, repeats: int, device: torch.device,
                channels_last: bool, amp: str | None) -> list[dict[str, Any]]:
    """Rows for eager and compiled forwards, in NCHW and (with ``channels_last``) NHWC layout,
    each timed in the same interleaved loop; speed-ups are against eager NCHW."""
    import copy

    from rsseg.models.registry import create_model

    torch.manual_seed(0)
    base = create_model(name, num_classes=6, in_channels=3).eval().to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp or "")

    def run(net: nn.Module, inp: torch.Tensor) -> torch.Tensor:
        autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            return net(inp)

    torch._dynamo.reset()  # compile from scratch (inductor's on-disk cache may still help)
    variants: list[dict[str, Any]] = []
    reference = None
    for layout in (["NCHW", "NHWC"] if channels_last else ["NCHW"]):
        model, inp = base, x
        if layout == "NHWC":
            model = copy.deepcopy(base).to(memory_format=torch.channels_last)
            inp = to_channels_last(x)
        warm, out = _timed(lambda: run(model, inp), device)  # numba / oneDNN / cuDNN set-up
        reference = out if reference is None else reference
        variants.append({"layout": layout, "mode": "eager", "net": model, "inp": inp,
                         "first_s": warm, "out": out, "breaks": 0})
        compiled = compile_model(model, device)
        breaks_before = _graph_breaks()
        first, out = _timed(lambda: run(compiled, inp), device)
        variants.append({"layout": layout, "mode": "compiled", "net": compiled, "inp": inp,
                         "first_s": first, "out": out, "breaks": _graph_breaks() - breaks_before})
    times: list[list[float]] = [[] for _ in variants]
    for _ in range(repeats):  # interleaved, so that machine load affects every variant alike
        for k, v in enumerate(variants):
            times[k].append(_timed(lambda: run(v["net"], v["inp"]), device)[0])
    medians = [statistics.median(t) for t in times]
    rows = []
    for k, v in enumerate(variants):
        eager_same_layout = medians[k - 1] if v["mode"] == "compiled" else medians[k]
        rows.append({
            "model": name, "layout": v["layout"], "mode": v["mode"], "amp": amp or "fp32",
            "size": size, "batch": batch, "device": device.type,
            "median_s": round(medians[k], 4),
            "speedup_vs_eager_nchw": round(medians[0] / medians[k], 3),
            # first call minus a steady call: compilation (compiled) or set-up (eager)
            "first_call_extra_s": round(max(0.0, v["first_s"] - eager_same_layout), 1),
            "graph_breaks": v["breaks"],
            "max_abs_diff_vs_eager_nchw": float((v["out"].float() - reference.float()).abs().max()),
        })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="unet-r18,mafmamba-tiny")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch (and numba) CPU threads")
    parser.add_argument("--channels-last", action="store_true", help="also time channels-last variants")
    parser.add_argument("--amp", choices=["bf16", "fp16"], help="run under autocast with this dtype")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows: list[dict[str, Any]] = []
    print(f"torch {torch.__version__}, {device}, {args.threads} thread(s), {args.size} px, batch {args.batch}")
    for name in args.models.split(","):
        for row in bench_model(name, args.size, args.batch, args.repeats, device, args.channels_last, args.amp):
            rows.append(row)
            print(f"{row['model']:<16} {row['layout']} {row['mode']:<8} {row['amp']:<4} "
                  f"{row['median_s']:.3f} s  speed-up vs eager NCHW {row['speedup_vs_eager_nchw']:.2f}  "
                  f"first-call extra {row['first_call_extra_s']:.0f} s  graph breaks {row['graph_breaks']}  "
                  f"max|diff| {row['max_abs_diff_vs_eager_nchw']:.1e}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
