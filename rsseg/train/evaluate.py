"""``evaluate(bundle, dataset, data_dir, split)``: scores of a model bundle on prepared patches.

Every labelled pixel of the split is counted once (test and validation patches do not overlap;
padding is ignore) into one global confusion matrix; see :mod:`rsseg.train.metrics` for the
conventions, which the result states in ``convention``. The result also carries the protocol
beside the scores (``protocol``): the TTA set (views, scales, interpolation, what is averaged),
the metric convention (which classes the means average) and what the split is in the
benchmark's terms (LoveDA's scored split is its official Val set).

Each patch goes through :func:`window_probs`, the same TTA code and padding that ``rsseg
predict`` applies to a window, so the two give the same probabilities for the same window.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from rsseg.data.prepare import ensure_prepared, read_manifest, split_names_of
from rsseg.data.specs import SPEC_FILE, spec_for
from rsseg.errors import DataError, UsageError
from rsseg.train.metrics import confusion_matrix, convention_text, scores_from_confusion
from rsseg.train.tta import MODEL_SIZE_MULTIPLE, Forward, TTAProtocol, predict_probs, tta_protocol


def window_probs(forward: Forward, x: torch.Tensor, tta: str | TTAProtocol | None,
                 dataset: str | None = None) -> torch.Tensor:
    """Class probabilities of normalised windows ``x`` as ``rsseg predict`` computes them: TTA of
    :mod:`rsseg.train.tta`, windows padded (zeros) so every view suits a stride-32 encoder."""
    return predict_probs(forward, x, tta, dataset, size_multiple=MODEL_SIZE_MULTIPLE)


@dataclass
class EvalResult:
    dataset: str
    split: str
    tta: str | None
    bundle: str
    class_names: list[str]
    confusion: np.ndarray  # rows true, columns predicted
    iou: list[float]
    f1: list[float]
    precision: list[float]
    recall: list[float]
    miou: float
    mf1: float
    oa: float
    mean_classes: list[int]
    convention: str
    patches: int
    pixels: int
    extra: dict[str, Any] = field(default_factory=dict)
    model_name: str | None = None
    split_name: str | None = None  # the benchmark's name of the split, e.g. "official Val"
    tta_protocol: dict[str, Any] = field(default_factory=dict)

    def protocol(self) -> dict[str, Any]:
        """How the scores were obtained, for a reader comparing them with a paper's."""
        return {
            "tta": self.tta_protocol or {"mode": self.tta or "none"},
            "metric": {
                "confusion": "one global confusion matrix over every labelled pixel of the split; "
                             "ignored pixels not counted",
                "mean_classes": [self.class_names[i] for i in self.mean_classes],
                "left_out_of_means": [n for i, n in enumerate(self.class_names)
                                      if i not in self.mean_classes],
                "oa_classes": "all",
                "convention": self.convention,
            },
            "split": {
                "dataset": self.dataset,
                "rsseg_split": self.split,
                "name": self.split_name or self.split,
                "patches": self.patches,
                "pixels": self.pixels,
            },
        }

    def to_dict(self) -> dict[str, Any]:
        def clean(values: list[float]) -> list[float | None]:
            return [None if np.isnan(v) else float(v) for v in values]

        return {
            "dataset": self.dataset,
            "split": self.split,
            "split_name": self.split_name or self.split,
            "tta": self.tta,
            "model": self.model_name,
            "bundle": self.bundle,
            "protocol": self.protocol(),
            "classes": self.class_names,
            "per_class": {
                name: {"iou": iou, "f1": f1, "precision": p, "recall": r}
                for name, iou, f1, p, r in zip(self.class_names, clean(self.iou), clean(self.f1),
                                               clean(self.precision), clean(self.recall))
            },
            "mIoU": self.miou,
            "mF1": self.mf1,
            "OA": self.oa,
            "mean_classes": [self.class_names[i] for i in self.mean_classes],
            "convention": self.convention,
            **({"paper": self.extra["paper"]} if "paper" in self.extra else {}),
            "confusion_matrix": self.confusion.astype(int).tolist(),
            "patches": self.patches,
            "pixels": self.pixels,
        }

    def format_table(self) -> str:
        width = max(len(n) for n in self.class_names) + 2
        name = self.split_name or self.split
        split = name if name == self.split else f"{name} (rsseg split {self.split!r})"
        views = self.tta_protocol.get("views")
        tta = f"{self.tta or 'none'}" + (f" ({views} views)" if views and views > 1 else "")
        lines = [
            f"{self.dataset} {split}, {self.patches} patches, {self.pixels} labelled pixels"
            f", TTA: {tta}",
            f"{'class':<{width}}{'IoU':>8}{'F1':>8}",
        ]
        for i, name in enumerate(self.class_names):
            mark = "" if i in self.mean_classes else "  (not in means)"
            lines.append(f"{name:<{width}}{_pct(self.iou[i]):>8}{_pct(self.f1[i]):>8}{mark}")
        lines.append(f"{'mIoU':<{width}}{_pct(self.miou):>8}")
        lines.append(f"{'mF1':<{width}}{_pct(self.mf1):>8}")
        lines.append(f"{'OA':<{width}}{_pct(self.oa):>8}")
        lines.append(f"convention: {self.convention}")
        return "\n".join(lines)


def _pct(value: float) -> str:
    return "n/a" if value is None or np.isnan(value) else f"{100 * value:.2f}"


def _data_for(meta: Any, dataset: str, data_dir: str | os.PathLike[str] | None) -> Path:
    if data_dir is not None and (Path(data_dir) / SPEC_FILE).is_file():
        return Path(data_dir)  # a folder prepared from the user's own data defines its dataset
    if data_dir is None and meta.dataset == dataset and meta.extra.get("data_dir"):
        recorded = Path(meta.extra["data_dir"])
        if (recorded / "manifest.json").is_file():
            return recorded
    if dataset == "synthetic" and data_dir is None:
        raise DataError("synthetic data is made per run: pass --data RUN_DIR/data/prepared")
    train_cfg = meta.extra.get("train_config") or {}
    return ensure_prepared(dataset, data_dir, bands=meta.extra.get("band_set"),
                           patch=int(train_cfg.get("patch_size", 1024)))


def evaluate(
    bundle_path: str | os.PathLike[str],
    dataset: str | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    split: str = "test",
    tta: str | None = None,
    *,
    batch_size: int = 1,
    device: str = "cpu",
    progress: bool = False,
) -> EvalResult:
    """Score the bundle on ``split`` of the prepared ``dataset`` (default: the bundle's dataset).

    ``split`` is rsseg's prepared split: ``test`` is the scored one (for LoveDA the official Val
    set, since the official Test labels are not public), ``val`` the held-out model-selection one.
    """
    from rsseg.bundle import load_bundle
    from rsseg.data.patches import PatchDataset

    model, meta = load_bundle(bundle_path, device=device)
    dataset = dataset or meta.dataset
    if dataset is None:
        raise UsageError("the bundle names no dataset; pass --dataset")
    root = _data_for(meta, dataset, data_dir)
    spec = spec_for(dataset, root)
    manifest = read_manifest(root)
    if list(manifest["classes"]) != list(meta.class_names):
        raise DataError(
            f"bundle classes {meta.class_names} differ from {dataset}'s {manifest['classes']}"
        )
    if list(manifest["band_indexes"]) != list(meta.bands):
        raise DataError(
            f"bundle reads bands {meta.bands} but {root} holds bands {manifest['band_indexes']} "
            f"({manifest['bands']}); prepare the data with the bundle's band set"
        )
    split_name = split_names_of(manifest).get(split, split)
    protocol = tta_protocol(tta, dataset)  # unknown names fail before any patch is read
    data = PatchDataset(root, split)
    if len(data) == 0:
        raise DataError(f"{root}: the {split} split has no patches")
    mean = torch.tensor(meta.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(meta.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    n = meta.num_classes
    cm = torch.zeros(n, n, dtype=torch.long)
    model.eval()
    loader = DataLoader(data, batch_size=batch_size, num_workers=0)
    with torch.inference_mode():
        for batch in tqdm(loader, desc=f"eval {split}", disable=not progress):
            x = (batch["image"].to(device) - mean) / std
            pred = window_probs(model, x, protocol).argmax(1).cpu()
            cm += confusion_matrix(pred, batch["mask"], n, meta.ignore_index)
    scores = scores_from_confusion(cm, spec.mean_class_indices)
    return EvalResult(
        dataset=dataset,
        split=split,
        tta=tta,
        bundle=str(bundle_path),
        class_names=list(meta.class_names),
        confusion=cm.numpy(),
        iou=scores.iou.tolist(),
        f1=scores.f1.tolist(),
        precision=scores.precision.tolist(),
        recall=scores.recall.tolist(),
        miou=scores.miou,
        mf1=scores.mf1,
        oa=scores.oa,
        mean_classes=list(spec.mean_class_indices),
        convention=convention_text(spec.classes, spec.mean_class_indices),
        patches=len(data),
        pixels=int(cm.sum()),
        model_name=meta.model_name,
        split_name=split_name,
        tta_protocol=protocol.describe(),
    )


def write_json(result: EvalResult, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_dict(), indent=2))
    return path
