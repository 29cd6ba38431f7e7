"""Segmentation scores from one global confusion matrix (summed over all images, never averaged
per image).

Convention: per class IoU = TP / (TP + FP + FN), F1 = 2 TP / (2 TP + FP + FN); OA = trace / total
over every labelled pixel (ignored pixels are never counted). mIoU and mF1 average the classes
in ``mean_classes`` (ISPRS: all but Clutter; LoveDA: all 7). A class absent from both labels and
predictions has no IoU (NaN) and is left out of the means.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int) -> torch.Tensor:
    """Counts (num_classes, num_classes) int64, rows = true class, columns = predicted class."""
    valid = (target != ignore_index) & (target >= 0) & (target < num_classes)
    index = target[valid].long() * num_classes + pred[valid].long().clamp(0, num_classes - 1)
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


@dataclass
class Scores:
    iou: np.ndarray  # per class
    f1: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    miou: float
    mf1: float
    oa: float
    mean_classes: tuple[int, ...]


def scores_from_confusion(cm: np.ndarray | torch.Tensor, mean_classes: tuple[int, ...] | None = None
                          ) -> Scores:
    """IoU, F1, precision, recall per class and mIoU / mF1 (over ``mean_classes``) and OA."""
    cm = np.asarray(cm.cpu() if isinstance(cm, torch.Tensor) else cm, dtype=np.float64)
    n = cm.shape[0]
    mean_classes = tuple(range(n)) if mean_classes is None else tuple(mean_classes)
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), np.nan)
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
        precision = np.where(tp + fp > 0, tp / (tp + fp), np.nan)
        recall = np.where(tp + fn > 0, tp / (tp + fn), np.nan)
    sel = list(mean_classes)

    def nanmean(values: np.ndarray) -> float:
        kept = values[sel][~np.isnan(values[sel])]
        return float(kept.mean()) if kept.size else float("nan")

    total = cm.sum()
    oa = float(tp.sum() / total) if total > 0 else float("nan")
    return Scores(iou, f1, precision, recall, nanmean(iou), nanmean(f1), oa, mean_classes)


def convention_text(class_names: list[str] | tuple[str, ...], mean_classes: tuple[int, ...]) -> str:
    """One line saying which classes enter the means."""
    left_out = [c for i, c in enumerate(class_names) if i not in mean_classes]
    base = "one global confusion matrix; ignored pixels not counted; OA over all classes"
    if left_out:
        return f"{base}; mIoU and mF1 over {len(mean_classes)} classes, without {', '.join(left_out)} (ISPRS)"
    return f"{base}; mIoU and mF1 over all {len(mean_classes)} classes"
