"""Figures of a training run: its curves, and the confusion matrix and per-class IoU of an
evaluation (``rsseg plot RUN``). matplotlib with the Agg backend: no display needed."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from rsseg.errors import DataError


def read_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every logged series of a run (``logs/metrics.csv`` and resumed parts) as (step, value),
    sorted by step; a resumed part's rows follow the first part's."""
    files = sorted(Path(run_dir).glob("logs/**/metrics.csv"))
    if not files:
        raise DataError(f"{run_dir}: no logs/metrics.csv (is it a run folder written by rsseg train?)")
    series: dict[str, list[tuple[int, float]]] = {}
    for path in files:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                step = int(row["step"]) if row.get("step") else None
                for key, value in row.items():
                    if key in ("step", "epoch") or not value or step is None:
                        continue
                    series.setdefault(key, []).append((step, float(value)))
    return {k: sorted(v) for k, v in series.items()}


def _figure(ncols: int, width: float = 4.5, height: float = 3.5):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return plt, fig, axes[0]


def plot_training_curves(run_dir: Path, out: Path) -> Path:
    """Training loss, validation mIoU and the learning rate of every parameter group vs step."""
    series = read_metrics(run_dir)
    plt, fig, (loss_ax, val_ax, lr_ax) = _figure(3)
    for key, label in (("train_loss_step", "train loss (step)"), ("train_loss_epoch", "train loss (epoch)")):
        if key in series:
            steps, values = zip(*series[key])
            loss_ax.plot(steps, values, label=label, lw=1)
    loss_ax.set(title="loss", xlabel="step")
    for key in ("val_mIoU", "val_mF1", "val_OA"):
        if key in series:
            steps, values = zip(*series[key])
            val_ax.plot(steps, [100 * v for v in values], marker="o", label=key.removeprefix("val_"))
    val_ax.set(title="validation (%)", xlabel="step")
    for key in sorted(k for k in series if k.startswith("lr")):
        steps, values = zip(*series[key])
        lr_ax.plot(steps, values, label=key.split("/", 1)[-1])
    lr_ax.set(title="learning rate", xlabel="step")
    for ax in (loss_ax, val_ax, lr_ax):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def read_evaluation(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not an evaluation JSON written by rsseg eval --json ({exc})") from exc
    if "confusion_matrix" not in data or "classes" not in data:
        raise DataError(f"{path}: not an evaluation JSON written by rsseg eval --json")
    return data


def plot_evaluation(evaluation: Path, out: Path) -> Path:
    """Row-normalised confusion matrix (reference rows, predicted columns) and per-class IoU."""
    import numpy as np

    data = read_evaluation(evaluation)
    classes = data["classes"]
    cm = np.asarray(data["confusion_matrix"], dtype=float)
    rows = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    plt, fig, (cm_ax, iou_ax) = _figure(2, width=5.5, height=4.5)
    cm_ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    cm_ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted",
              ylabel="reference", title="confusion (row-normalised)")
    cm_ax.set_xticklabels(classes, rotation=45, ha="right", fontsize=8)
    cm_ax.set_yticklabels(classes, fontsize=8)
    for i in range(len(classes)):
        for j in range(len(classes)):
            cm_ax.text(j, i, f"{rows[i, j]:.2f}", ha="center", va="center", fontsize=7,
                       color="white" if rows[i, j] > 0.5 else "black")
    ious = [data["per_class"][c]["iou"] for c in classes]
    shown = [0.0 if v is None or math.isnan(v) else 100 * v for v in ious]
    iou_ax.barh(range(len(classes)), shown, color="#4c72b0")
    iou_ax.set(yticks=range(len(classes)), xlim=(0, 100), xlabel="IoU (%)",
               title=f"per-class IoU; mIoU {100 * data['mIoU']:.2f} ({data.get('convention', '')})")
    iou_ax.set_yticklabels(classes, fontsize=8)
    iou_ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_run(run_dir: Path, out_dir: Path | None = None, evaluation: Path | None = None) -> list[Path]:
    """``training_curves.png`` and, when an evaluation JSON is given or lies in the run folder
    (the newest ``*.json`` with a confusion matrix), ``evaluation.png``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"run folder not found: {run_dir}")
    out_dir = Path(out_dir) if out_dir else run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [plot_training_curves(run_dir, out_dir / "training_curves.png")]
    if evaluation is None:
        candidates = sorted(run_dir.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        for candidate in candidates:
            try:
                read_evaluation(candidate)
            except DataError:
                continue
            evaluation = candidate
            break
    if evaluation is not None:
        written.append(plot_evaluation(Path(evaluation), out_dir / "evaluation.png"))
    return written
