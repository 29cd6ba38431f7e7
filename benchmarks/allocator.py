"""Does the memory allocator matter for rsseg on a CPU? Fresh processes, alternating.

    python benchmarks/allocator.py [--rounds 3] [--workloads predict train scan]

Each workload runs in a fresh child process under each allocator setting, the settings taking
turns round by round (so drift on a shared machine hits all of them), and reports wall time,
minor page faults and peak RSS per run, then each setting's median time as a ratio to glibc's
default. Settings:

- ``glibc``: the default allocator, as users run.
- ``glibc-thp``: ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``: glibc asks for transparent huge pages
  on its mmap'd chunks (the large tensors), 2 MiB pages instead of 4 KiB (glibc >= 2.35).
- ``torch-thp``: ``THP_MEM_ALLOC_ENABLE=1``: torch's own CPU allocator asks the kernel for
  transparent huge pages (``madvise``) on tensors of 2 MiB and more; read once, at torch's first
  allocation, so a program can set it before importing torch (what ``rsseg`` does).
- ``glibc-mallopt``: the 32 MiB mmap threshold (glibc's maximum) and no trimming, as
  ``mallopt`` at program start would set them.
- ``jemalloc``: ``LD_PRELOAD`` libjemalloc with ``MALLOC_CONF`` keeping freed pages
  (``dirty_decay_ms:-1,muzzy_decay_ms:-1``), skipped where the library is absent.
- ``tcmalloc``: ``LD_PRELOAD`` libtcmalloc_minimal, skipped where absent.

Why: large tensors (over glibc's 32 MiB mmap ceiling) are mmap'd and unmapped on every
allocation, and every page of them is faulted in again on first touch; the demo run showed
4.9 M minor page faults.

Workloads (each about 10-30 s on a 2-core machine): ``predict``: U-Net-R18 over a 2048^2 scene
(1024 windows, overlap 256, batch 4); ``train``: 4 U-Net-R18 training steps (batch 4, 512 px,
AdamW); ``scan``: the fused selective scan forward+backward at MAFMamba's 1024-px stage-2 shape.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib")


def find_library(name: str) -> str | None:
    for folder in LIB_DIRS:
        path = Path(folder) / name
        if path.exists():
            return str(path)
    return None


def settings() -> dict[str, dict[str, str] | None]:
    jemalloc = find_library("libjemalloc.so.2")
    tcmalloc = find_library("libtcmalloc_minimal.so.4")
    return {
        "glibc": {},
        "glibc-thp": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
        "torch-thp": {"THP_MEM_ALLOC_ENABLE": "1"},
        # What mallopt at CLI start can do: the largest mmap threshold glibc allows (32 MiB) and
        # no trimming, so freed chunks under 32 MiB stay in the heap and are reused unfaulted.
        "glibc-mallopt": {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 40)},
        "jemalloc": {"LD_PRELOAD": jemalloc, "MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}
        if jemalloc else None,
        "tcmalloc": {"LD_PRELOAD": tcmalloc} if tcmalloc else None,
    }


# ----------------------------------------------------------------------------- child workloads


def work_predict(folder: Path) -> None:
    import torch

    from rsseg import create_model
    from rsseg.inference.predict import InputSpec, PredictOptions, predict_scene

    sys.path.insert(0, str(Path(__file__).parent))
    from predict import write_noise_scene

    scene = folder / "scene_2048.tif"
    if not scene.exists():
        write_noise_scene(scene, 2048)
    torch.manual_seed(0)
    model = create_model("unet-r18", num_classes=6, in_channels=3).eval()
    spec = InputSpec(bands=[1, 2, 3], mean=[120.0] * 3, std=[60.0] * 3,
                     class_names=[f"c{i}" for i in range(6)], class_colors=[(i, i, i) for i in range(6)])
    predict_scene(scene, model, spec, folder / f"out_{os.getpid()}.tif", None,
                  PredictOptions(tile=1024, overlap=256, batch_size=4, progress=False))


def work_train(folder: Path) -> None:
    import torch

    from rsseg import create_model

    torch.manual_seed(0)
    model = create_model("unet-r18", num_classes=6, in_channels=3).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(4, 3, 512, 512)
    y = torch.randint(0, 6, (4, 512, 512))
    for _ in range(4):
        opt.zero_grad(set_to_none=True)
        out = model(x)
        out = out["out"] if isinstance(out, dict) else out
        torch.nn.functional.cross_entropy(out, y).backward()
        opt.step()


def work_scan(folder: Path) -> None:
    import torch

    from rsseg.models.ssm.scan import selective_scan

    torch.manual_seed(0)
    b, d, n, length = 1, 1024, 16, 4096
    u = torch.randn(b, d, length, requires_grad=True)
    delta = torch.randn(b, d, length, requires_grad=True)
    a = -torch.rand(d, n).add(0.5).requires_grad_()
    bb = torch.randn(b, n, length, requires_grad=True)
    cc = torch.randn(b, n, length, requires_grad=True)
    for _ in range(3):
        y = selective_scan(u, delta, a, bb, cc, delta_softplus=True)
        y.sum().backward()


WORK = {"predict": work_predict, "train": work_train, "scan": work_scan}


def child(workload: str, folder: Path) -> None:
    if workload == "scan":  # compile the numba kernels outside the measurement (cache may be cold)
        work_scan(folder)
    before = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    WORK[workload](folder)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"seconds": seconds, "minor_faults": after.ru_minflt - before.ru_minflt,
                      "user_s": after.ru_utime - before.ru_utime, "sys_s": after.ru_stime - before.ru_stime,
                      "peak_rss_mib": after.ru_maxrss / 1024}))


# ----------------------------------------------------------------------------- driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workloads", nargs="+", default=["predict", "train", "scan"], choices=list(WORK))
    parser.add_argument("--settings", nargs="+", default=None, help="subset of the settings")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, Path(args.folder))
        return
    chosen = {k: v for k, v in settings().items() if args.settings is None or k in args.settings}
    missing = [k for k, v in chosen.items() if v is None]
    chosen = {k: v for k, v in chosen.items() if v is not None}
    results: dict[str, dict[str, list[dict]]] = {w: {s: [] for s in chosen} for w in args.workloads}
    with tempfile.TemporaryDirectory() as tmp:
        for workload in args.workloads:
            if workload == "predict":  # the scene is written once, outside every measurement
                sys.path.insert(0, str(Path(__file__).parent))
                from predict import write_noise_scene

                write_noise_scene(Path(tmp) / "scene_2048.tif", 2048)
            for r in range(args.rounds):
                order = list(chosen) if r % 2 == 0 else list(chosen)[::-1]
                for name in order:
                    env = dict(os.environ, **chosen[name])
                    out = subprocess.run([sys.executable, __file__, "--child", workload, "--folder", tmp],
                                         check=True, capture_output=True, text=True, env=env).stdout
                    results[workload][name].append(json.loads(out.strip().splitlines()[-1]))
    summary = {}
    for workload, by_setting in results.items():
        base = statistics.median(r["seconds"] for r in by_setting["glibc"]) if "glibc" in by_setting else None
        summary[workload] = {
            name: {
                "seconds": [round(r["seconds"], 2) for r in runs],
                "minor_faults": [r["minor_faults"] for r in runs],
                # CPU time splits the page-fault work (system time) from the arithmetic (user time).
                "user_s": [round(r["user_s"], 1) for r in runs],
                "sys_s": [round(r["sys_s"], 1) for r in runs],
                "peak_rss_mib": [round(r["peak_rss_mib"]) for r in runs],
                "median_ratio_to_glibc": round(statistics.median(r["seconds"] for r in runs) / base, 3)
                if base else None,
            }
            for name, runs in by_setting.items()
        }
    print(json.dumps({"benchmark": "allocator", "rounds": args.rounds, "unavailable": missing,
                      "results": summary}, indent=1))


if __name__ == "__main__":
    main()
