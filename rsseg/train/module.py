"""LightningModule wrapping any registered network for training and validation.

Normalisation ((x - mean) / std, per band, in source units) happens here on the device, with the
same numbers the model bundle records. Optimiser: AdamW with two parameter groups: parameters
whose name starts with ``backbone.`` or ``encoder.`` (the smp convention) get ``backbone_lr``.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch import nn

from rsseg.errors import RssegError, UsageError
from rsseg.train.losses import SegmentationLoss, split_outputs
from rsseg.train.metrics import confusion_matrix, scores_from_confusion

BACKBONE_PREFIXES = ("backbone.", "encoder.")


class NonFiniteLossError(RssegError):
    """Training diverged (NaN or infinite loss)."""


def split_backbone_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(backbone parameters, other parameters), by the name-prefix convention above."""
    backbone, rest = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (backbone if name.startswith(BACKBONE_PREFIXES) else rest).append(param)
    return backbone, rest


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
    ) -> None:
        super().__init__()
        self.model = model
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
        return self.model(self.normalize(image))

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
        backbone, rest = split_backbone_parameters(self.model)
        backbone_lr = cfg["backbone_lr"] if cfg["backbone_lr"] is not None else cfg["lr"]
        groups = [g for g in ({"params": rest, "lr": cfg["lr"]},
                              {"params": backbone, "lr": backbone_lr}) if g["params"]]
        optimizer = torch.optim.AdamW(groups, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        kind = cfg["scheduler"]
        if kind == "none":
            return optimizer
        if kind == "cosine_restarts":
            sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
                optimizer, T_0=cfg["t_0"], T_mult=cfg["t_mult"])
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
        if kind in ("cosine", "poly"):
            total = cfg["total_steps"] if cfg["total_steps"] > 0 else self.trainer.estimated_stepping_batches
            total = max(1, int(total))
            if kind == "cosine":
                sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
            else:
                sched = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=total, power=0.9)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        raise UsageError(f"unknown scheduler {kind!r}; valid: cosine_restarts, cosine, poly, none")
