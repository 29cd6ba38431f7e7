"""Use a bundle in plain PyTorch for custom inference: read a window with rasterio, normalise
with the bundle's own numbers, run the network, and get class indices and probabilities.
No rsseg command line involved; only the network and its metadata come from rsseg.

    python examples/04_plain_pytorch.py --model runs/x/best.safetensors scene.tif
    python examples/04_plain_pytorch.py --quick --out /tmp/rsseg-torch
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import rasterio
import torch
from rasterio.windows import Window

import rsseg
from rsseg.data.synthetic import write_scene


def classify_window(model_path: Path, scene: Path, window: Window) -> tuple[np.ndarray, np.ndarray]:
    model, meta = rsseg.load_bundle(model_path)  # an nn.Module in eval mode + its metadata
    with rasterio.open(scene) as src:
        # The bundle says which source bands the model reads, in which order (1-based).
        pixels = src.read(meta.bands, window=window).astype(np.float32)
    mean = torch.tensor(meta.mean).view(1, -1, 1, 1)
    std = torch.tensor(meta.std).view(1, -1, 1, 1)
    x = (torch.from_numpy(pixels)[None] - mean) / std  # normalised in source units
    with torch.inference_mode():
        probabilities = model(x).softmax(dim=1)[0]
    classes = probabilities.argmax(0).numpy().astype(np.uint8)
    names = meta.class_names
    counts = {names[c]: int((classes == c).sum()) for c in np.unique(classes)}
    print(f"window {window}: pixels per class {counts}")
    return classes, probabilities.numpy()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scene", type=Path, nargs="?")
    parser.add_argument("--model", type=Path)
    parser.add_argument("--out", type=Path, default=Path("rsseg-torch"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.out.mkdir(parents=True, exist_ok=True)
        args.scene = write_scene(args.out / "scene.tif", 256, 256, seed=3, tile=256)
        args.model = rsseg.train("cpu-tiny", out=str(args.out / "runs"), name="quick",
                                 data_dir=str(args.out / "data"), synthetic_tile_size=256, epochs=-1,
                                 max_steps=3, progress=False).bundle_path
    elif args.scene is None or args.model is None:
        parser.error("give SCENE and --model (or --quick)")
    classify_window(args.model, args.scene, Window(0, 0, 256, 256))
