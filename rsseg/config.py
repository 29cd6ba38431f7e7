"""Typed training configuration, read from YAML presets in the top-level ``configs/`` folder.

A config file holds the keys of :class:`TrainConfig` (unknown keys are refused, so a typo never
passes silently); ``augment`` is a nested mapping of :class:`AugmentConfig` keys. ``load_config``
takes a file path or the name of a packaged preset (``configs/<name>.yaml``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rsseg.errors import UsageError

# The presets are the repository's top-level configs/ folder; rsseg/configs links to it, so an
# installed package (whose wheel carries copies) and a checkout find them at the same place.
CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class AugmentConfig:
    """Training-time augmentation (GeoSeg / MAFMamba section 3.1), applied to image and label alike."""

    hflip: bool = True
    vflip: bool = True
    rot90: bool = True
    # Random rescale factors; one is drawn per sample (image bilinear, label nearest).
    scales: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5)
    # Smart crop: retry a random crop until no class covers more than ``smart_crop_max_ratio``.
    smart_crop: bool = True
    smart_crop_max_ratio: float = 0.75
    smart_crop_tries: int = 10
    # Probability of building a sample as a mosaic of four patches.
    mosaic_p: float = 0.25
    # Colour jitter (Reload-Mamba section 4.1): strength s of random brightness / contrast /
    # saturation factors drawn in [1 - s, 1 + s], applied with probability color_jitter_p.
    # 0 disables it (GeoSeg's protocol has none).
    color_jitter: float = 0.0
    color_jitter_p: float = 0.5


@dataclass
class TrainConfig:
    """Everything one training run needs; every field has a sensible default."""

    # --- data
    dataset: str = "vaihingen"
    # A prepared folder (output of ``rsseg prepare``). None: the default data place
    # ($RSSEG_DATA/<dataset> or ~/.cache/rsseg/data/<dataset>), prepared on first use.
    data_dir: str | None = None
    # Train straight from scenes (no patch folder): images glob, label file, its class field and
    # an optional classes file, as for ``rsseg prepare --images`` (rsseg.data.scene_sampling).
    images: str | None = None
    labels: str | None = None
    label_field: str | None = None
    classes_file: str | None = None
    # Band set name of the dataset spec (e.g. "rgb", "irrg", "rgbir" for Potsdam); None = default.
    bands: str | None = None
    patch_size: int = 1024  # size of prepared patches
    crop_size: int = 1024  # training crop after augmentation
    val_fraction: float = 0.2  # share of training tiles held out for validation (by tile)
    # --- synthetic data (dataset "synthetic" only)
    synthetic_tile_size: int = 512
    synthetic_areas: list[int] | None = None
    # --- model
    model: str = "unet-r18"
    model_cfg: dict[str, Any] = field(default_factory=dict)
    # Initial weights of the backbone: a name from ``rsseg weights``, a local file, "auto" (the
    # weights the model's paper starts from; none for the smp baselines) or None (from scratch).
    pretrained: str | None = "auto"
    # --- optimisation (GeoSeg defaults)
    epochs: int = 80
    max_steps: int = -1  # > 0 stops after that many optimizer steps
    batch_size: int = 4
    val_batch_size: int = 1
    lr: float = 6e-4
    # Learning rate for parameters whose name starts with "backbone." or "encoder." (smp uses
    # "encoder."). "auto": lr / 10 when the backbone starts from pre-trained weights (GeoSeg's
    # 6e-4 / 6e-5), lr when it trains from scratch; None uses ``lr`` for everything.
    backbone_lr: float | str | None = "auto"
    weight_decay: float = 0.01
    scheduler: str = "cosine_restarts"  # "cosine_restarts" | "cosine" | "poly" | "none"
    # CosineAnnealingWarmRestarts, in epochs: cycles of 20 and 60 end at the 80th epoch
    # (GeoSeg's 15 / 2 end theirs at 105, its own epoch count).
    t_0: int = 20
    t_mult: int = 3
    loss_label_smoothing: float = 0.05
    dice_smooth: float = 0.05
    aux_weight: float = 0.4
    grad_clip: float | None = None
    accumulate_grad_batches: int = 1  # effective batch = batch_size x this x devices
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # --- hardware
    workers: int | None = None  # None: min(8, CPUs / devices)
    devices: int | str = "auto"
    num_nodes: int = 1
    accelerator: str = "auto"
    # None: "bf16-mixed" on CUDA GPUs with bfloat16 (Ampere and later), "16-mixed" on older
    # ones, "32-true" elsewhere (rsseg.train.fit.select_precision).
    precision: str | None = None
    # Channels-last (NHWC) layout for the model's 4-D weights and the input batches: the layout
    # tensor-core convolutions want on GPUs (docs/gpu.md; also 1.14x for U-Net-R18 on one CPU core).
    channels_last: bool = False
    # torch.compile the network (default mode); needs a C++ compiler on the CPU, triton on CUDA.
    compile: bool = False
    # --- run
    seed: int = 0
    output_dir: str = "runs"
    run_name: str | None = None  # None: "<model>-<dataset>"
    val_every: int = 1  # validate every N epochs (and always at the final step)
    # Which weights go into the bundle: "best" (validation mIoU) or "last" (the final step).
    bundle_from: str = "best"
    limit_val_batches: int | float | None = None
    resume: str | None = None  # a checkpoint path, or "last" for the run's last.ckpt
    progress: bool = True
    # Metrics loggers: "csv" (logs/metrics.csv, always written) or "tensorboard" (csv as well,
    # plus TensorBoard event files in tb/; needs the tensorboard package: rsseg[tensorboard]).
    logger: str = "csv"

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed (None values are ignored, so CLI flags can be passed;
        pass ``pretrained=""`` to train from scratch)."""
        kept = {k: v for k, v in changes.items() if v is not None}
        if kept.get("pretrained") == "":
            kept["pretrained"] = None
        unknown = set(kept) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise UsageError(f"unknown training option(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **kept)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(names)
    if unknown:
        raise UsageError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(names)}"
        )
    values = dict(data)
    if cls is TrainConfig and isinstance(values.get("augment"), dict):
        values["augment"] = _build(AugmentConfig, values["augment"], f"{where} augment")
    if cls is AugmentConfig and "scales" in values:
        values["scales"] = tuple(float(s) for s in values["scales"])
    return cls(**values)


def config_from_dict(data: dict[str, Any], where: str = "config") -> TrainConfig:
    """A TrainConfig from a plain mapping (as read from YAML)."""
    return _build(TrainConfig, data, where)


def apply_overrides(cfg: TrainConfig, items: list[str] | tuple[str, ...]) -> TrainConfig:
    """``cfg`` with dotted ``key=value`` overrides applied (``--set``), e.g. ``lr=1e-4``,
    ``augment.scales=[0.5,1.0]``, ``model_cfg.backbone=swin_t``. Values are read as YAML, so
    numbers, lists, ``null`` and ``true`` work; unknown keys are refused as in config files."""
    data = cfg.to_dict()
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set expects key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as text; a user means a number
            for number in (int, float):
                try:
                    value = number(value)
                    break
                except ValueError:
                    pass
        parts = key.strip().split(".")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None and part == "model_cfg":
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UsageError(f"--set {item!r}: {'.'.join(parts[: i + 1])} has no sub-keys")
            node = child
        node[parts[-1]] = value
    return config_from_dict(data, where="--set")


def list_configs() -> list[str]:
    """Names of the packaged presets."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_config(path_or_name: str | os.PathLike[str]) -> TrainConfig:
    """Read a YAML config file, or a packaged preset by name (``mafmamba-vaihingen``)."""
    path = Path(path_or_name)
    if not path.is_file():
        preset = CONFIG_DIR / f"{path_or_name}.yaml"
        if not preset.is_file():
            raise UsageError(
                f"config {str(path_or_name)!r} is neither a file nor a preset; "
                f"presets: {', '.join(list_configs())}"
            )
        path = preset
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"config {path}: not valid YAML ({exc.__class__.__name__})") from exc
    if not isinstance(data, dict):
        raise UsageError(f"config {path}: expected a mapping of option: value")
    return config_from_dict(data, where=f"config {path}")
