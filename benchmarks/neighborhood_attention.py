"""Neighbourhood attention on CPU: rsseg's gather implementation vs a naive unfold one.

Shape: A2Mamba-T stage 1 for a 512 x 512 input: a 128 x 128 map, 48 channels, 2 heads, so each
of SLA (dilation 1) and DLA (adaptive dilation 11) has 1 head of 24 channels, window 11 x 11.
The naive baseline materialises every query's K*K keys and values with ``F.unfold`` (zero-padded
centred windows, so not natten's border rule: it is a cost baseline, not a reference).

Each case runs in a fresh subprocess; memory is the rise of the process's peak RSS during one
forward + backward (ru_maxrss), time the median of a few forward and backward passes. Figures
are ratios to the baseline measured in the same run, so they are comparable across machines.

    OMP_NUM_THREADS=1 python benchmarks/neighborhood_attention.py [--batch 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

SIZE, HEAD_DIM, KERNEL = 128, 24, 11


def naive_unfold_attention(q, k, v, kernel, dilation):
    """(B, 1, H, W, C) tensors; every window gathered by unfold, softmax, weighted sum."""
    b, n, h, w, c = q.shape
    pad = dilation * (kernel // 2)

    def windows(t):  # (B, C, H, W) -> (B, H*W, K*K, C)
        cols = F.unfold(t.permute(0, 1, 4, 2, 3).reshape(b, n * c, h, w), kernel, dilation=dilation, padding=pad)
        return cols.reshape(b, c, kernel * kernel, h * w).permute(0, 3, 2, 1)

    keys, values = windows(k), windows(v)
    logits = torch.einsum("blc,blkc->blk", q.reshape(b, h * w, c), keys)
    out = torch.einsum("blk,blkc->blc", logits.softmax(-1), values)
    return out.reshape(b, 1, h, w, c)


def rsseg_attention(q, k, v, kernel, dilation):
    from rsseg.models.neighborhood_attention import neighbourhood_attention

    return neighbourhood_attention(q, k, v, kernel, (dilation, dilation))[0]


def run_case(impl: str, dilation: int, batch: int, repeats: int) -> dict:
    fn = {"naive": naive_unfold_attention, "rsseg": rsseg_attention}[impl]
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, 1, SIZE, SIZE, HEAD_DIM, requires_grad=True) for _ in range(3))
    grad = torch.randn(batch, 1, SIZE, SIZE, HEAD_DIM)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn(q, k, v, KERNEL, dilation).backward(grad)  # warm-up, also the memory measurement
    peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    fwd, bwd = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(q, k, v, KERNEL, dilation)
        t1 = time.perf_counter()
        out.backward(grad)
        bwd.append(time.perf_counter() - t1)
        fwd.append(t1 - t0)
    return {"forward_s": statistics.median(fwd), "backward_s": statistics.median(bwd), "peak_mib": peak_mib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--case", nargs=2, metavar=("IMPL", "DILATION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # child process: one measurement, printed as JSON
        print(json.dumps(run_case(args.case[0], int(args.case[1]), args.batch, args.repeats)))
        return

    def measure(impl: str, dilation: int) -> dict:
        options = ["--batch", str(args.batch), "--repeats", str(args.repeats), "--case", impl, str(dilation)]
        cmd = [sys.executable, __file__, *options]
        return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)

    print(f"map {SIZE}x{SIZE}, head dim {HEAD_DIM}, K={KERNEL}, batch {args.batch}, threads {torch.get_num_threads()}")
    for name, dilation in (("SLA", 1), ("DLA", SIZE // KERNEL)):
        base, ours = measure("naive", dilation), measure("rsseg", dilation)
        print(
            f"{name} (dilation {dilation}): naive fwd {base['forward_s']:.3f}s bwd {base['backward_s']:.3f}s "
            f"peak +{base['peak_mib']:.0f} MiB | rsseg fwd {ours['forward_s']:.3f}s bwd {ours['backward_s']:.3f}s "
            f"peak +{ours['peak_mib']:.0f} MiB | ratios rsseg/naive: fwd {ours['forward_s'] / base['forward_s']:.2f} "
            f"bwd {ours['backward_s'] / base['backward_s']:.2f} "
            f"memory {ours['peak_mib'] / max(base['peak_mib'], 1e-9):.2f}"
        )


if __name__ == "__main__":
    main()
