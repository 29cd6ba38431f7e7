"""LoveDA's official Test set in the challenge server's submission layout.

LoveDA keeps the Test labels; its server scores a zip of predictions. The format, as read in
the LoveDA repository (``Semantic_Segmentation/predict.py``: ``imsave(os.path.join(save_dir,
fname), pred.argmax(1).astype(np.uint8))`` with ``fname`` the image's base name; the loader
reads masks as ``png - 1``) and in the maintainers' answer on its issue #6 (output classes
0..6 at 1024 x 1024; "select all PNGs to compress instead of compressing the folder"):

- one single-band uint8 PNG per Test image, with the image's file name (``4191.png`` ...), the
  Urban and Rural images side by side in one folder;
- values are the class indices 0..6 = background, building, road, water, barren, forest,
  agriculture, i.e. the mask codes 1..7 minus one (rsseg's LoveDA class order), no no-data value;
- the zip holds the PNGs at its root, no folder.

Each Test image is one 1024 x 1024 window, run through the same window TTA as ``rsseg eval``.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from rsseg.data.layouts import find_loveda_test_images
from rsseg.data.specs import get_spec
from rsseg.errors import BundleError, DataError, OutputError
from rsseg.train.evaluate import window_probs
from rsseg.train.tta import tta_protocol


def check_loveda_bundle(meta: Any) -> None:
    """The bundle must predict LoveDA's 7 classes in LoveDA's order from RGB (bands 1, 2, 3)."""
    spec = get_spec("loveda")
    if list(meta.class_names) != list(spec.classes):
        raise BundleError(
            f"a LoveDA submission needs a model of LoveDA's classes {list(spec.classes)}; this "
            f"bundle predicts {list(meta.class_names)}"
        )
    if list(meta.bands) != [1, 2, 3]:
        raise BundleError(f"a LoveDA submission needs an RGB model (bands 1, 2, 3); this bundle "
                          f"reads bands {list(meta.bands)}")


def submission_paths(out: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(zip, folder of PNGs) for ``-o``: ``x.zip`` -> (x.zip, x/); a folder ``x`` -> (x.zip, x/)."""
    out = Path(out)
    if out.suffix.lower() == ".zip":
        return out, out.with_suffix("")
    return out.with_name(out.name + ".zip"), out


def _read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        rgb = np.array(img.convert("RGB"))  # a writable copy for torch.from_numpy
    return rgb.transpose(2, 0, 1)  # (3, H, W)


def write_loveda_submission(
    data_root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    model: nn.Module,
    meta: Any,
    *,
    tta: str = "none",
    device: str = "cpu",
    batch_size: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> Path:
    """Predict every official LoveDA Test image under ``data_root``; write PNGs and the zip.

    Returns the zip's path. Nothing is written before the bundle, the outputs and the Test
    images have been checked.
    """
    check_loveda_bundle(meta)
    protocol = tta_protocol(tta, "loveda")
    zip_path, folder = submission_paths(out)
    for path in (zip_path, folder):
        if path.exists() and not overwrite:
            raise OutputError(f"{path} exists; pass --overwrite to replace it")
    images = find_loveda_test_images(data_root, folder.parent / f".{folder.name}-work")
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.png"):  # an earlier, possibly different, submission
        stale.unlink()
    mean = torch.tensor(meta.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(meta.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    model.eval().to(device)
    written: list[Path] = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(images), batch_size), desc="LoveDA Test", unit="batch",
                          disable=not progress):
            batch = images[start : start + batch_size]
            arrays = [_read_rgb(p) for p in batch]
            if len({a.shape for a in arrays}) > 1:  # all 1024 x 1024 in LoveDA; never pad here
                for path, array in zip(batch, arrays):
                    written.append(_predict_one(model, path, array, mean, std, protocol, folder, device))
                continue
            x = torch.from_numpy(np.stack(arrays)).to(device).float()
            classes = window_probs(model, (x - mean) / std, protocol).argmax(1).cpu().numpy()
            for path, cls in zip(batch, classes):
                written.append(_save_mask(cls, folder / path.name))
    tmp = zip_path.with_name(f".{zip_path.name}.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for png in written:
            zf.write(png, png.name)  # at the archive's root: the server rejects a folder
    tmp.replace(zip_path)
    echo(f"{len(written)} LoveDA Test masks (classes 0..6) -> {folder}/, submission {zip_path}")
    return zip_path


def _predict_one(model: nn.Module, path: Path, array: np.ndarray, mean: torch.Tensor,
                 std: torch.Tensor, protocol: Any, folder: Path, device: str) -> Path:
    x = torch.from_numpy(array[None]).to(device).float()
    cls = window_probs(model, (x - mean) / std, protocol).argmax(1)[0].cpu().numpy()
    return _save_mask(cls, folder / path.name)


def _save_mask(classes: np.ndarray, path: Path) -> Path:
    if classes.max(initial=0) > 6:
        raise DataError(f"class index {int(classes.max())} outside LoveDA's 0..6 for {path.name}")
    Image.fromarray(classes.astype(np.uint8)).save(path)  # 2-D uint8: a single-band PNG
    return path


__all__ = ["check_loveda_bundle", "submission_paths", "write_loveda_submission"]
