"""The seed papers' published scores, for ``rsseg eval --compare-paper``.

Only figures a paper prints for the datasets rsseg prepares are here. MAFMamba (Li, Yang & Fan,
2025; shared/papers/mafmamba.txt, Section 3.3 and Tables 1-3): Vaihingen test tiles mIoU 85.09,
mF1 91.79, OA 93.66; Potsdam test tiles mIoU 86.89, mF1 92.83, OA 91.35; LoveDA test set mIoU
53.46 (the text gives no LoveDA mF1/OA). Its protocol: GeoSeg's (ISPRS means without Clutter,
LoveDA over all 7 classes), "random flipping and multi-scale evaluation" at test time. The other
seed papers (Reload-Mamba, SegMAN-V2/A2Mamba, SegRet) publish no Vaihingen, Potsdam or LoveDA
figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class PaperScore:
    """One published result, in percent; None where the paper does not give the figure."""

    model: str
    dataset: str
    paper: str
    where: str  # table / section of the paper
    split: str  # the images the paper scored
    miou: float | None
    mf1: float | None = None
    oa: float | None = None
    tta: str = ""
    note: str = ""


_MAFMAMBA = "MAFMamba (Li, Yang & Fan, 2025)"
_MAFMAMBA_TTA = "random flipping and multi-scale evaluation (Sec. 3.1)"

PAPER_SCORES: dict[tuple[str, str], PaperScore] = {
    ("mafmamba", "vaihingen"): PaperScore(
        "mafmamba", "vaihingen", _MAFMAMBA, "Table 1 / Sec. 3.3", "17 official test tiles",
        85.09, 91.79, 93.66, _MAFMAMBA_TTA),
    ("mafmamba", "potsdam"): PaperScore(
        "mafmamba", "potsdam", _MAFMAMBA, "Table 2 / Sec. 3.3", "14 official test tiles",
        86.89, 92.83, 91.35, _MAFMAMBA_TTA),
    ("mafmamba", "loveda"): PaperScore(
        "mafmamba", "loveda", _MAFMAMBA, "Table 3 / Sec. 3.3", "LoveDA test set (1796 images)",
        53.46, None, None, _MAFMAMBA_TTA,
        note="the paper scores LoveDA's Test set (challenge server); rsseg eval scores the official "
             "Val set, so the two are not the same images"),
}


def paper_score(model: str | None, dataset: str) -> PaperScore | None:
    """The published figure for ``model`` on ``dataset``, or None if no paper gives one."""
    return PAPER_SCORES.get(((model or "").lower(), dataset.lower()))


def _pct(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def comparison_text(model: str | None, dataset: str, miou: float, mf1: float, oa: float) -> str:
    """A small table: the paper's figure beside ours (ours given as fractions 0..1)."""
    published = paper_score(model, dataset)
    if published is None:
        return f"paper: no published figure for this dataset ({model or 'unknown model'} on {dataset})"
    rows = [
        ("", "mIoU", "mF1", "OA"),
        ("paper", _pct(published.miou), _pct(published.mf1), _pct(published.oa)),
        ("ours", _pct(100 * miou), _pct(100 * mf1), _pct(100 * oa)),
    ]
    lines = [f"{name:<7}{a:>8}{b:>8}{c:>8}" for name, a, b, c in rows]
    lines.append(f"paper: {published.paper}, {published.where}; {published.split}; "
                 f"test-time: {published.tta}")
    if published.note:
        lines.append(f"note: {published.note}")
    return "\n".join(lines)


__all__ = ["PAPER_SCORES", "PaperScore", "comparison_text", "paper_score"]
