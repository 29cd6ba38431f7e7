"""LightningModule wrapping any registered network for training and validation.

Normalisation ((x - mean) / std, per band, in source units) happens here on the device, with the
same numbers the model bundle records. Optimiser: AdamW with up to four parameter groups (see
:func:`optimizer_groups`): parameters whose name starts with ``backbone.`` or ``encoder.`` (the smp
convention) get ``backbone_lr``; norms, biases, layer scales, position/bias tables and Mamba's
``A_log`` / ``D`` get no weight decay, as the papers' code bases do.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch import nn

from rsseg.accel import compile_model, to_channels_last
from rsseg.errors import RssegError, UsageError
from rsseg.train.losses import SegmentationLoss, split_outputs
from rsseg.train.metrics import confusion_matrix, scores_from_confusion

BACKBONE_PREFIXES = ("backbone.", "encoder.")
# Parameter names (last component) that never get weight decay whatever their shape: Mamba's
# state matrix and skip (mamba-ssm / VMamba mark them ``_no_weight_decay``), and the position /
# relative-bias tables of Swin, natten-style attention and RMT (timm's ``no_weight_decay`` sets).
NO_DECAY_NAMES = ("A_log", "A_logs", "D", "Ds", "relative_position_bias_table", "rpb",
                  "pos_embed", "absolute_pos_embed", "relative_position_table")


class NonFiniteLossError(RssegError):
    """Training diverged (NaN or infinite loss)."""


def _no_decay_names(model: nn.Module) -> set[str]:
    """Names the model itself exempts from weight decay (timm's ``no_weight_decay()`` hook)."""
    hook = getattr(model, "no_weight_decay", None)
    names = set(hook()) if callable(hook) else set()
    for prefix, child in model.named_modules():
        child_hook = getattr(child, "no_weight_decay", None)
        if prefix and callable(child_hook):
            names |= {f"{prefix}.{n}" for n in child_hook()}
    return names


def is_no_decay(name: str, param: nn.Parameter, exempt: set[str] = frozenset()) -> bool:
    """Whether ``param`` is one that weight decay must not shrink.

    One-dimensional tensors (biases, norm scales, layer scales, D) and scalars carry no
    spatial filter to regularise; ``A_log`` and the position tables are learnt constants whose
    decay would bias the model (mamba-ssm, VMamba, timm all exclude them).
    """
    return (
        param.ndim <= 1
        or getattr(param, "_no_weight_decay", False)
        or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES
        or name in exempt
    )


def optimizer_groups(
    model: nn.Module, lr: float, backbone_lr: float, weight_decay: float
) -> list[dict[str, Any]]:
    """AdamW parameter groups: (head | backbone) x (decay | no decay), empty ones left out.

    Each group carries a ``name`` ("head", "head_no_decay", "backbone", "backbone_no_decay") so
    that the learning-rate log and the tests can tell them apart.
    """
    exempt = _no_decay_names(model)
    buckets: dict[str, list[nn.Parameter]] = {
        "head": [], "head_no_decay": [], "backbone": [], "backbone_no_decay": []}  # fmt: skip
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = "backbone" if name.startswith(BACKBONE_PREFIXES) else "head"
        buckets[part + ("_no_decay" if is_no_decay(name, param, exempt) else "")].append(param)
    groups = []
    for key, params in buckets.items():
        if params:
            groups.append({
                "name": key,
                "params": params,
                "lr": backbone_lr if key.startswith("backbone") else lr,
                "weight_decay": 0.0 if key.endswith("no_decay") else weight_decay,
            })  # fmt: skip
    return groups


def restart_cycle_ends(t_0: int, t_mult: int, epochs: int) -> list[int]:
    """Epoch counts at which CosineAnnealingWarmRestarts(T_0, T_mult) finishes a cycle, up to
    ``epochs`` (e.g. 15, 45, 105 for GeoSeg's T_0 15 / T_mult 2)."""
    ends, length, total = [], t_0, 0
    while total + length <= epochs:
        total += length
        ends.append(total)
        length *= t_mult
    return ends


def build_scheduler(
    optimizer: torch.optim.Optimizer, kind: str, *, t_0: int, t_mult: int, total_steps: int
) -> dict[str, Any] | None:
    """The learning-rate schedule as Lightning's ``lr_scheduler`` entry (None for "none").

    ``cosine_restarts`` steps once per epoch (GeoSeg); ``cosine`` and ``poly`` (power 0.9) step
    per optimizer step over ``total_steps``.
    """
    if kind == "none":
        return None
    if kind == "cosine_restarts":
        sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=t_0, T_mult=t_mult)
        return {"scheduler": sched, "interval": "epoch", "name": "lr"}
    if kind in ("cosine", "poly"):
        total = max(1, int(total_steps))
        if kind == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        else:
            sched = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=total, power=0.9)
        return {"scheduler": sched, "interval": "step", "name": "lr"}
    raise UsageError(f"unknown scheduler {kind!r}; valid: cosine_restarts, cosine, poly, none")


class SegmentationModule(L.LightningModule):
    def __init__(
        self,
        model: nn.Module,
        *,
        num_classes: int,
        ignore_index: int,
        mean: list[float],
        std: list[float],
        mean_classes: tuple[int, ...],
        lr: float = 6e-4,
        backbone_lr: float | None = 6e-5,
        weight_decay: float = 0.01,
        scheduler: str = "cosine_restarts",
        t_0: int = 15,
        t_mult: int = 2,
        total_epochs: int = 80,
        total_steps: int = -1,
        label_smoothing: float = 0.05,
        dice_smooth: float = 0.05,
        aux_weight: float = 0.4,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        # Inputs follow the weights' layout (fit.py converts the model): a mixed layout makes
        # every convolution convert one side first.
        self.channels_last = channels_last
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mean_classes = tuple(mean_classes)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.criterion = SegmentationLoss(ignore_index, label_smoothing, dice_smooth, aux_weight)
        self.optim_cfg = dict(lr=lr, backbone_lr=backbone_lr, weight_decay=weight_decay,
                              scheduler=scheduler, t_0=t_0, t_mult=t_mult,
                              total_epochs=total_epochs, total_steps=total_steps)
        self.register_buffer("val_cm", torch.zeros(num_classes, num_classes, dtype=torch.long), persistent=False)

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        return (image - self.mean) / self.std

    def forward(self, image: torch.Tensor) -> Any:
        x = self.normalize(image)
        if self.channels_last:
            x = to_channels_last(x)
        return self.__dict__.get("_compiled", self.model)(x)

    def compile_network(self, device: torch.device | str) -> None:
        """Run the network through ``torch.compile`` from now on (UsageError if inductor cannot
        build code for ``device``). The compiled wrapper shares the network's parameters and is
        kept outside the registered submodules, so checkpoints keep their ``model.*`` keys."""
        self.__dict__["_compiled"] = compile_model(self.model, device)

    def compute_loss(self, outputs: Any, mask: torch.Tensor) -> torch.Tensor:
        own = getattr(self.model, "compute_loss", None)
        if callable(own):
            return own(outputs, mask, self.ignore_index)
        return self.criterion(outputs, mask)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        outputs = self(batch["image"])
        loss = self.compute_loss(outputs, batch["mask"])
        # Every rank must agree to stop, or DDP would hang in the next all-reduce.
        bad = torch.tensor(0.0 if torch.isfinite(loss.detach()) else 1.0, device=loss.device)
        if self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad, reduce_op="max")
        if bad.item() > 0:
            last = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or "none yet"
            raise NonFiniteLossError(
                f"loss became {loss.item()} at epoch {self.current_epoch}, step {self.global_step}; "
                f"training stopped; last good checkpoint: {last} (lower --lr and use --resume)"
            )
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True,
                 batch_size=batch["mask"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits, _ = split_outputs(self(batch["image"]))
        pred = logits.argmax(1)
        self.val_cm += confusion_matrix(pred, batch["mask"], self.num_classes, self.ignore_index)

    def on_validation_epoch_start(self) -> None:
        self.val_cm.zero_()

    def on_validation_epoch_end(self) -> None:
        cm = self.val_cm.clone()
        if self.trainer.world_size > 1:
            # Summed over ranks. (DistributedSampler may repeat a few samples to even out
            # ranks; acceptable for model selection, ``rsseg eval`` counts every pixel once.)
            cm = self.trainer.strategy.reduce(cm, reduce_op="sum")
        scores = scores_from_confusion(cm, self.mean_classes)
        for name, value in (("val_mIoU", scores.miou), ("val_mF1", scores.mf1), ("val_OA", scores.oa)):
            self.log(name, 0.0 if math.isnan(value) else value, prog_bar=name == "val_mIoU", sync_dist=False)

    def configure_optimizers(self) -> Any:
        cfg = self.optim_cfg
        backbone_lr = cfg["backbone_lr"] if cfg["backbone_lr"] is not None else cfg["lr"]
        groups = optimizer_groups(self.model, cfg["lr"], backbone_lr, cfg["weight_decay"])
        optimizer = torch.optim.AdamW(groups, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        total = cfg["total_steps"]
        if cfg["scheduler"] in ("cosine", "poly") and total <= 0:
            total = self.trainer.estimated_stepping_batches
        sched = build_scheduler(optimizer, cfg["scheduler"], t_0=cfg["t_0"], t_mult=cfg["t_mult"],
                                total_steps=total)
        if sched is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": sched}
