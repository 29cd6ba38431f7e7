"""Is the training data loader fast enough? Loader throughput vs one training step, same run.

Makes synthetic tiles in the official Vaihingen layout, prepares them into patches, then measures
1. the training loader as ``rsseg train`` builds it (GeoSeg augmentations: mosaic p 0.25, random
   scale, smart crop, flips, rot90; default worker count min(8, CPUs)): patches per second;
2. one training step (forward + Soft-CE/Dice + backward + AdamW) of a baseline model on a batch
   of the same size, on the chosen device: patches per second.
The ratio loader / step must stay above 1: the loader then keeps the model fed.

    python benchmarks/dataloader.py                      # 512 px crops, unet-r18, CPU
    python benchmarks/dataloader.py --device cuda --crop 1024 --batch 4
    python benchmarks/dataloader.py --quick              # small smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from rsseg.config import AugmentConfig  # noqa: E402
from rsseg.data.patches import PatchDataset  # noqa: E402
from rsseg.data.prepare import prepare_dataset  # noqa: E402
from rsseg.data.specs import get_spec  # noqa: E402
from rsseg.data.synthetic import write_vaihingen_layout  # noqa: E402
from rsseg.models.registry import create_model  # noqa: E402
from rsseg.train.fit import default_workers  # noqa: E402
from rsseg.config import TrainConfig  # noqa: E402
from rsseg.train.losses import SegmentationLoss  # noqa: E402


def loader_rate(data: Path, crop: int, batch: int, workers: int, batches: int) -> float:
    ds = PatchDataset(data, "train", augment=AugmentConfig(), crop_size=crop)
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0, drop_last=True)
    it = iter(loader)
    next(it)  # worker start-up is a one-off cost, not throughput
    start, seen = time.perf_counter(), 0
    while seen < batches:
        try:
            next(it)
        except StopIteration:
            it = iter(loader)
            continue
        seen += 1
    return seen * batch / (time.perf_counter() - start)


def step_rate(model_name: str, crop: int, batch: int, device: str, steps: int) -> float:
    spec = get_spec("vaihingen")
    model = create_model(model_name, spec.num_classes, 3).to(device).train()
    criterion = SegmentationLoss(spec.ignore_index)
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.01)
    x = torch.randn(batch, 3, crop, crop, device=device)
    y = torch.randint(0, spec.num_classes, (batch, crop, crop), device=device)

    def step() -> None:
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = criterion(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--model", default="unet-r18")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=None, help="default: rsseg train's default")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.crop, args.batch = 128, 2
    workers = args.workers if args.workers is not None else default_workers(TrainConfig())
    tile = max(2 * args.crop, 256)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = write_vaihingen_layout(Path(tmp) / "raw", areas=[1, 3, 5, 7, 2], size=tile)
        data = prepare_dataset("synthetic", raw, Path(tmp) / "prepared", patch=tile // 2, progress=False)
        loader = loader_rate(data, args.crop, args.batch, workers, batches=4 if args.quick else 20)
    steps = step_rate(args.model, args.crop, args.batch, args.device, steps=2 if args.quick else 5)
    result = {
        "crop": args.crop, "batch": args.batch, "workers": workers, "device": args.device,
        "model": args.model, "loader_patches_per_s": round(loader, 2),
        "train_step_patches_per_s": round(steps, 2), "loader_over_step": round(loader / steps, 2),
    }  # fmt: skip
    print(json.dumps(result, indent=1))
    verdict = "OK: the loader outpaces training" if loader > steps else "the LOADER is the bottleneck"
    print(f"loader {loader:.1f} patches/s vs training {steps:.1f} patches/s -> ratio {loader / steps:.2f} ({verdict})")


if __name__ == "__main__":
    main()
