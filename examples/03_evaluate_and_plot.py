"""Evaluate a bundle on its dataset's test split and plot the per-class IoU and the confusion
matrix (the same figure as `rsseg plot RUN`).

    python examples/03_evaluate_and_plot.py --model runs/x/best.safetensors --out scores
    python examples/03_evaluate_and_plot.py --quick --out /tmp/rsseg-eval
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import rsseg
from rsseg.plots import plot_evaluation
from rsseg.train.evaluate import write_json


def main(model: Path, out: Path, data_dir: Path | None = None, tta: str | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    # One global confusion matrix over the whole split; ISPRS means leave Clutter out.
    scores = rsseg.evaluate(model, data_dir=data_dir, split="test", tta=tta)
    print(scores.format_table())
    write_json(scores, out / "scores.json")
    figure = plot_evaluation(out / "scores.json", out / "evaluation.png")
    worst = min(json.loads((out / "scores.json").read_text())["per_class"].items(),
                key=lambda kv: kv[1]["iou"] if kv[1]["iou"] is not None else 1.0)
    print(f"figure: {figure}; weakest class: {worst[0]}")
    return figure


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--data", type=Path, help="prepared folder [default: the bundle's]")
    parser.add_argument("--tta", choices=["flip", "d4", "ms"])
    parser.add_argument("--out", type=Path, default=Path("scores"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        trained = rsseg.train("cpu-tiny", out=str(args.out / "runs"), name="quick",
                              data_dir=str(args.out / "data"), synthetic_tile_size=256, epochs=-1,
                              max_steps=3, progress=False)
        args.model, args.data = trained.bundle_path, trained.data_dir
    elif args.model is None:
        parser.error("give --model (or --quick)")
    main(args.model, args.out, args.data, args.tta)
