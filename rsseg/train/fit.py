"""``train(cfg)``: one training run on PyTorch Lightning, ending in a model bundle.

Run folder ``<output_dir>/<run_name>/``: ``config.yaml`` (the resolved config),
``checkpoints/best.ckpt`` (best validation mIoU) and ``checkpoints/last.ckpt``, ``logs/metrics.csv``
(TensorBoard event files in ``tb/`` with ``logger: tensorboard``) and ``best.safetensors``, the bundle that
``rsseg eval`` and ``rsseg predict`` take.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from rsseg.config import TrainConfig
from rsseg.data.prepare import ensure_prepared, read_manifest
from rsseg.data.specs import spec_for, spec_from_dict
from rsseg.errors import DataError, UsageError, warn

# Set by the launching process so that DDP worker processes (which re-run the command) use the
# same run folder instead of picking a fresh one.
_RUN_DIR_ENV = "RSSEG_RUN_DIR"


@dataclass
class TrainResult:
    bundle_path: Path | None  # None on non-zero DDP ranks
    best_val_miou: float | None
    run_dir: Path
    data_dir: Path
    best_checkpoint: Path | None
    last_checkpoint: Path | None
    metrics_csv: Path | None


def _run_dir(cfg: TrainConfig) -> Path:
    if os.environ.get(_RUN_DIR_ENV):
        return Path(os.environ[_RUN_DIR_ENV])
    base = Path(cfg.output_dir).expanduser()
    name = cfg.run_name or f"{cfg.model}-{cfg.dataset}"
    run_dir = base / name
    if cfg.resume:
        return run_dir
    # Never mix a new run's checkpoints into an old run's folder.
    n = 2
    while (run_dir / "checkpoints").exists() or (run_dir / "best.safetensors").exists():
        run_dir = base / f"{name}-{n}"
        n += 1
    return run_dir


def _synthetic_data(cfg: TrainConfig, run_dir: Path) -> Path:
    """Generate the synthetic dataset in the Vaihingen layout and prepare it (once)."""
    from rsseg.data.prepare import prepare_dataset
    from rsseg.data.synthetic import write_vaihingen_layout

    root = Path(cfg.data_dir).expanduser() if cfg.data_dir else run_dir / "data"
    prepared = root / "prepared"
    if (prepared / "manifest.json").is_file():
        return prepared
    raw = root / "raw"
    if not raw.is_dir():
        write_vaihingen_layout(raw, areas=cfg.synthetic_areas, size=cfg.synthetic_tile_size, seed=cfg.seed)
    # Patches larger than the generated tiles would be mostly padding.
    patch = min(cfg.patch_size, cfg.synthetic_tile_size)
    return prepare_dataset("synthetic", raw, prepared, patch=patch,
                           val_fraction=cfg.val_fraction, seed=cfg.seed, progress=cfg.progress)


def resolve_data(cfg: TrainConfig, run_dir: Path) -> Path:
    """The prepared folder this run trains on (generated or prepared on first use)."""
    from rsseg.data.own import is_own_folder

    if is_own_folder(cfg.data_dir):  # prepared from the user's own scenes: used as it is
        return Path(cfg.data_dir).expanduser()
    if cfg.dataset == "synthetic":
        if cfg.data_dir and (Path(cfg.data_dir) / "manifest.json").is_file():
            return Path(cfg.data_dir)
        return _synthetic_data(cfg, run_dir)
    return ensure_prepared(cfg.dataset, cfg.data_dir, bands=cfg.bands, patch=cfg.patch_size,
                           val_fraction=cfg.val_fraction, seed=cfg.seed, progress=cfg.progress)


def select_precision(cfg: TrainConfig) -> str:
    """Lightning's ``precision`` for this run: the config's, else chosen for the hardware.

    On CUDA: "bf16-mixed" where the GPU computes in bfloat16 (Ampere and later). bfloat16 has
    float32's exponent range, so activations cannot overflow and no loss scaling is needed;
    float16 tops out at 65504, and Mamba's projections and gates (Δ before softplus, the scan's
    output cast back to the input dtype) can exceed that. Older GPUs (V100, T4) get "16-mixed":
    there float16 tensor cores are the only fast path, the selective scan itself still runs in
    float32 with autocast off (rsseg.models.ssm.scan), Lightning's GradScaler skips steps with
    inf/NaN gradients and a non-finite loss stops the run (NonFiniteLossError), so a run that
    overflows says so; ``precision: 32-true`` is then the fix. Elsewhere (CPU, MPS): "32-true"
    (bf16 on a CPU only pays with AMX / AVX512-BF16 units; ask for it explicitly there).
    """
    if cfg.precision:
        return cfg.precision
    if torch.cuda.is_available() and cfg.accelerator in ("auto", "gpu", "cuda"):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def compute_device(cfg: TrainConfig) -> str:
    """The device type the run's forward passes run on ("cuda", "cpu", or e.g. "mps"), as
    Lightning resolves ``accelerator`` ("auto" takes CUDA when present)."""
    accelerator = cfg.accelerator.lower()
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    if accelerator == "auto":
        return "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu"
    return accelerator


def default_workers(cfg: TrainConfig) -> int:
    """Data-loader workers per process: the config's, else min(8, CPUs / local processes).

    One worker prepares about 20 augmented 1024 px patches/s (benchmarks/dataloader.py), so 8 keep
    even a fast GPU fed; with DDP the CPUs are shared by the ranks on a machine.
    """
    if cfg.workers is not None:
        return cfg.workers
    local = cfg.devices if isinstance(cfg.devices, int) and cfg.devices > 0 else 1
    return max(1, min(8, (os.cpu_count() or 1) // local))


@dataclass
class InitialWeights:
    """Where a run's backbone starts: a local file (and its catalogue name), or scratch."""

    path: Path | None
    name: str | None  # catalogue name, or None for a plain file / scratch
    sha256: str | None = None

    @property
    def pretrained(self) -> bool:
        return self.path is not None


def initial_weights(cfg: TrainConfig) -> InitialWeights:
    """Resolve ``cfg.pretrained`` to a local file before any work (one line if it is absent)."""
    from rsseg.weights import CATALOGUE, default_weights, resolve_weights, verify_checksum, weights_keyword

    if weights_keyword(cfg.model) in cfg.model_cfg:  # a file given the old way, in model_cfg
        given = cfg.model_cfg[weights_keyword(cfg.model)]
        return InitialWeights(Path(given) if given else None, None)
    choice = cfg.pretrained
    if choice == "auto":
        choice = default_weights(cfg.model, cfg.model_cfg)
    if not choice:
        return InitialWeights(None, None)
    path, entry = resolve_weights(choice, cfg.model)
    if entry is not None and entry.model_cfg:
        current = {"backbone": "resnet18", **cfg.model_cfg}  # MAFMamba's default backbone
        if any(current.get(k) != v for k, v in entry.model_cfg.items()):
            options = ", ".join(f"{k}: {v}" for k, v in entry.model_cfg.items())
            raise UsageError(f"weights {choice} need the model option(s) {options} in model_cfg")
    digest = verify_checksum(entry, path) if entry is not None else None
    return InitialWeights(path, choice if choice in CATALOGUE else None, digest)


def effective_backbone_lr(cfg: TrainConfig, pretrained: bool) -> float:
    """``backbone_lr`` with "auto" resolved: lr / 10 to fine-tune pre-trained weights, lr from scratch."""
    if cfg.backbone_lr == "auto":
        return cfg.lr / 10 if pretrained else cfg.lr
    if cfg.backbone_lr is None:
        return cfg.lr
    try:
        return float(cfg.backbone_lr)
    except (TypeError, ValueError):
        raise UsageError(f"backbone_lr must be a number, 'auto' or null, got {cfg.backbone_lr!r}") from None


def _validate(cfg: TrainConfig) -> None:
    from rsseg.models.registry import model_info

    model_info(cfg.model)  # an unknown model fails now, not after preparing the data
    if cfg.logger not in ("csv", "tensorboard"):
        raise UsageError(f"unknown logger {cfg.logger!r}; valid loggers: csv, tensorboard")
    if cfg.logger == "tensorboard":
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
            raise UsageError("--logger tensorboard needs the tensorboard package: pip install 'rsseg[tensorboard]'")
    if cfg.bundle_from not in ("best", "last"):
        raise UsageError(f"bundle_from must be 'best' or 'last', got {cfg.bundle_from!r}")
    if cfg.batch_size < 1 or cfg.crop_size < 16 or cfg.patch_size < 16:
        raise UsageError("batch_size must be >= 1 and crop/patch sizes >= 16")
    if cfg.epochs < 1 and cfg.max_steps <= 0:
        raise UsageError("set epochs >= 1 or max_steps > 0")
    if cfg.scheduler not in ("cosine_restarts", "cosine", "poly", "none"):
        raise UsageError(f"unknown scheduler {cfg.scheduler!r}; valid: cosine_restarts, cosine, poly, none")
    if cfg.scheduler == "cosine_restarts" and cfg.epochs > 0 and cfg.max_steps <= 0:
        from rsseg.train.module import restart_cycle_ends

        ends = restart_cycle_ends(cfg.t_0, cfg.t_mult, cfg.epochs)
        if not ends or ends[-1] != cfg.epochs:
            # Ending mid-cycle leaves the learning rate high at the last epoch (the issue GeoSeg's
            # 105-epoch schedule has when run for 80 epochs).
            warn(
                f"cosine restarts with t_0 {cfg.t_0}, t_mult {cfg.t_mult} end cycles at epochs "
                f"{ends or 'none'}; {cfg.epochs} epochs stop mid-cycle, at a high learning rate"
            )


def _quiet_lightning() -> None:
    """Keep Lightning's start-up chatter (accelerator availability, a product tip) and a
    deprecation notice from its own internals out of rsseg's output; warnings still show."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def _final_step_callback():
    """A Lightning callback that makes the run's final training step a validation point.

    Lightning validates only at its regular period (every ``val_every`` epochs); a run that ends
    between two of them (``max_steps``, or a number of epochs that is not a multiple) would keep
    checkpoints and a bundle from the last regular validation and throw the steps after it
    away. Requesting a stop on the final batch makes Lightning run one more validation there
    (it validates whenever a stop is requested), so ``last.ckpt`` is the final step and ``best``
    is chosen over every validation, the final one included.
    """
    from lightning.pytorch.callbacks import Callback

    class StopAtFinalStep(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            steps_done = trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
            last_epoch = trainer.max_epochs is not None and trainer.max_epochs > 0 and (
                trainer.current_epoch >= trainer.max_epochs - 1
                and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
            )
            if steps_done or last_epoch:
                trainer.should_stop = True

    return StopAtFinalStep()


def train(cfg: TrainConfig) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.dataset``; returns where the bundle and logs are."""
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader

    from rsseg.bundle import BundleMeta, save_bundle
    from rsseg.data.patches import PatchDataset
    from rsseg.models.registry import create_model

    _quiet_lightning()
    from rsseg.train.metrics import convention_text
    from rsseg.train.module import SegmentationModule

    _validate(cfg)
    weights = initial_weights(cfg)  # absent weights stop the run here, before any work
    backbone_lr = effective_backbone_lr(cfg, weights.pretrained)
    if not weights.pretrained and cfg.dataset != "synthetic":
        from rsseg.weights import default_weights, is_paper_model

        if is_paper_model(cfg.model) and int(os.environ.get("LOCAL_RANK", "0")) == 0:
            warn(
                f"{cfg.model} trains from scratch: the paper's numbers assume pre-trained "
                f"weights ({default_weights(cfg.model, cfg.model_cfg)}); backbone learning rate "
                f"{backbone_lr:g}"
                + (" (raised to the head's)" if cfg.backbone_lr == "auto" else "")
            )
    # A folder prepared from the user's own data defines its dataset (classes, bands) itself.
    scenes = None
    if cfg.images:  # straight from the user's scenes: windows sampled on the fly with torchgeo
        from rsseg.data.scene_sampling import scene_data

        if not cfg.labels:
            raise UsageError("--images needs --labels FILE (and --label-field NAME for vector labels)")
        scenes = scene_data(cfg.images, cfg.labels, label_field=cfg.label_field, classes=cfg.classes_file,
                            patch=cfg.patch_size, val_fraction=cfg.val_fraction, seed=cfg.seed,
                            augment=cfg.augment, crop_size=cfg.crop_size)
    spec = spec_from_dict(scenes.spec) if scenes else spec_for(cfg.dataset, cfg.data_dir)
    if spec.name != cfg.dataset:
        cfg = cfg.replace(dataset=spec.name)
    run_dir = _run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    os.environ[_RUN_DIR_ENV] = str(run_dir)
    try:
        data_dir = scenes.root if scenes else resolve_data(cfg, run_dir)
        manifest = scenes.manifest if scenes else read_manifest(data_dir)
        L.seed_everything(cfg.seed, workers=True, verbose=False)

        if scenes:
            train_ds, val_ds = scenes.train, scenes.val
        else:
            train_ds = PatchDataset(data_dir, "train", augment=cfg.augment, crop_size=cfg.crop_size)
            val_ds = PatchDataset(data_dir, "val")
        if len(train_ds) == 0:
            raise DataError(f"{data_dir}: no training patches")
        in_channels = len(manifest["band_indexes"])
        from rsseg.weights import weights_keyword

        model_cfg = dict(cfg.model_cfg)
        if weights.path is not None:
            model_cfg[weights_keyword(cfg.model)] = str(weights.path)
        model = create_model(cfg.model, spec.num_classes, in_channels, **model_cfg)
        module = SegmentationModule(
            model,
            num_classes=spec.num_classes,
            ignore_index=spec.ignore_index,
            mean=manifest["mean"],
            std=manifest["std"],
            mean_classes=spec.mean_class_indices,
            lr=cfg.lr,
            backbone_lr=backbone_lr,
            weight_decay=cfg.weight_decay,
            scheduler=cfg.scheduler,
            t_0=cfg.t_0,
            t_mult=cfg.t_mult,
            total_epochs=cfg.epochs,
            total_steps=cfg.max_steps,
            label_smoothing=cfg.loss_label_smoothing,
            dice_smooth=cfg.dice_smooth,
            aux_weight=cfg.aux_weight,
            channels_last=cfg.channels_last,
        )
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)  # 4-D weights only; in place
        if cfg.compile:
            module.compile_network(compute_device(cfg))  # the toolchain is checked here
        workers = default_workers(cfg)
        loader_args = dict(num_workers=workers, persistent_workers=workers > 0,
                           pin_memory=torch.cuda.is_available())
        train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True,
                                  drop_last=len(train_ds) >= cfg.batch_size, **loader_args)
        has_val = len(val_ds) > 0
        val_loader = DataLoader(val_ds, batch_size=cfg.val_batch_size, **loader_args) if has_val else None

        ckpt_dir = run_dir / "checkpoints"
        if has_val:
            checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val_mIoU",
                                         mode="max", save_top_k=1, save_last=True)
        else:
            checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="best", save_top_k=1, save_last=True)
        # A resumed run logs into a fresh sub-folder: Lightning's CSV logger would otherwise
        # delete the first run's metrics.
        log_version = ""
        if cfg.resume:
            n = 1
            while (run_dir / "logs" / f"resumed-{n}").exists():
                n += 1
            log_version = f"resumed-{n}"
        loggers: list = [CSVLogger(save_dir=str(run_dir), name="logs", version=log_version)]
        if cfg.logger == "tensorboard":
            from lightning.pytorch.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tb", version=log_version))

        multi = (isinstance(cfg.devices, int) and cfg.devices > 1) or cfg.num_nodes > 1
        steps_per_epoch = max(1, len(train_loader))
        # The learning-rate curve of every parameter group goes into metrics.csv.
        callbacks = [checkpoint, _final_step_callback(),
                     LearningRateMonitor(logging_interval="step")]
        trainer = L.Trainer(
            accelerator=cfg.accelerator,
            devices=cfg.devices,
            num_nodes=cfg.num_nodes,
            strategy="ddp" if multi else "auto",
            precision=select_precision(cfg),
            max_epochs=cfg.epochs if cfg.epochs > 0 else -1,
            max_steps=cfg.max_steps,
            callbacks=callbacks,
            logger=loggers,
            default_root_dir=str(run_dir),
            enable_model_summary=False,
            enable_progress_bar=cfg.progress,
            log_every_n_steps=min(50, steps_per_epoch),
            # Validation every ``val_every`` epochs, counted in training batches across epochs
            # (check_val_every_n_epoch=None), so that the final-step validation is not limited
            # to epochs that are multiples of val_every.
            check_val_every_n_epoch=None,
            val_check_interval=steps_per_epoch * max(1, cfg.val_every),
            limit_val_batches=cfg.limit_val_batches,
            num_sanity_val_steps=0,
            gradient_clip_val=cfg.grad_clip,
            accumulate_grad_batches=cfg.accumulate_grad_batches,
        )
        if trainer.is_global_zero:
            (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

        resume = None
        if cfg.resume:
            resume = ckpt_dir / "last.ckpt" if cfg.resume == "last" else Path(cfg.resume)
            if not resume.is_file():
                raise DataError(f"cannot resume: checkpoint {resume} does not exist")
        try:
            trainer.fit(module, train_loader, val_loader, ckpt_path=resume, weights_only=True)
        except Exception as exc:
            if cfg.compile:
                from rsseg.accel import compile_error_types, compile_failure

                if isinstance(exc, compile_error_types()):
                    raise compile_failure(exc) from exc
            if not isinstance(exc, ValueError):
                raise
            # BatchNorm in training mode cannot normalise a single value per channel: the crop
            # shrank to 1 x 1 at the model's deepest level with one sample in the batch.
            if "Expected more than 1 value per channel" not in str(exc):
                raise
            raise UsageError(
                f"crop {cfg.crop_size} px at batch size {cfg.batch_size} is too small for {cfg.model}: "
                "its deepest feature map is 1 x 1 and BatchNorm needs more than one value per "
                "channel; use a larger --crop-size or --batch-size"
            ) from exc

        best_path = Path(checkpoint.best_model_path) if checkpoint.best_model_path else None
        last_path = ckpt_dir / "last.ckpt"
        best_score = checkpoint.best_model_score
        best_miou = float(best_score) if (has_val and best_score is not None) else None
        if best_miou is not None and math.isnan(best_miou):
            best_miou = None
        bundle_path = None
        if trainer.is_global_zero:
            use_best = cfg.bundle_from == "best" and best_path and best_path.is_file()
            chosen = best_path if use_best else last_path
            if chosen.is_file():
                state = torch.load(chosen, map_location="cpu", weights_only=True)["state_dict"]
                prefix = "model."
                model.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
            model.eval()
            meta = BundleMeta(
                model_name=cfg.model,
                model_config=dict(cfg.model_cfg),
                class_names=list(spec.classes),
                class_colors=[list(c) for c in spec.colors],
                ignore_index=spec.ignore_index,
                bands=list(manifest["band_indexes"]),
                band_names=list(manifest["band_names"]),
                mean=[float(v) for v in manifest["mean"]],
                std=[float(v) for v in manifest["std"]],
                patch_size=cfg.crop_size,
                gsd_m=manifest.get("gsd_m"),
                # The training data's radiometry from prepare (absent in older manifests: None,
                # then predict skips the checks that need it).
                source_dtype=(manifest.get("radiometry") or {}).get("source_dtype"),
                source_band_count=(manifest.get("radiometry") or {}).get("source_band_count"),
                source_band_labels=(manifest.get("radiometry") or {}).get("source_band_labels"),
                band_stats=(manifest.get("radiometry") or {}).get("band_stats"),
                dataset=cfg.dataset,
                extra={
                    "best_val_miou": best_miou,
                    "val_convention": convention_text(spec.classes, spec.mean_class_indices),
                    "band_set": manifest["bands"],
                    "data_dir": str(Path(data_dir).resolve()),
                    "train_config": cfg.to_dict(),
                    "bundle_from": cfg.bundle_from,
                    "initial_weights": {
                        "name": weights.name,
                        "file": str(weights.path) if weights.path else None,
                        "sha256": weights.sha256,
                    },
                },
            )
            bundle_path = save_bundle(run_dir / "best.safetensors", model, meta)
        metrics_csv = Path(loggers[0].log_dir) / "metrics.csv"
        return TrainResult(
            bundle_path=bundle_path,
            best_val_miou=best_miou,
            run_dir=run_dir,
            data_dir=data_dir,
            best_checkpoint=best_path,
            last_checkpoint=last_path if last_path.is_file() else None,
            metrics_csv=metrics_csv if metrics_csv.is_file() else None,
        )
    finally:
        os.environ.pop(_RUN_DIR_ENV, None)
