"""Model registry: the only way the pipeline creates networks.

A model file (one paper each) registers its builders with ``@register_model``. The registry finds
model files by scanning this package, so adding a model never means editing a shared list.

Contract for every registered network:
- ``builder(num_classes: int, in_channels: int, **cfg) -> nn.Module``;
- ``forward(x)`` with ``x`` of shape (B, in_channels, H, W) returns logits (B, num_classes, H, W)
  at input size in eval mode; in training mode it may return a dict ``{"out": logits,
  "aux": [logits, ...], ...}``;
- a model with its own training objective defines
  ``compute_loss(outputs, target: LongTensor[B, H, W], ignore_index: int) -> Tensor``
  and the trainer uses it instead of the default Soft-CE + Dice.
"""

from __future__ import annotations

import importlib
import pkgutil
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from rsseg.errors import UsageError, unknown_name

# Files in rsseg/models that hold shared building blocks, not registered networks.
_NOT_MODEL_MODULES = {"registry", "layers", "checkpoints"}


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about one model name."""

    name: str
    builder: Callable[..., nn.Module]
    paper: str
    description: str = ""
    default_cfg: dict[str, Any] = field(default_factory=dict)
    # Whether the network accepts any number of input bands (all do by default).
    any_in_channels: bool = True


_REGISTRY: dict[str, ModelInfo] = {}
_import_failures: dict[str, str] = {}
_discovered = False


def register_model(
    name: str,
    *,
    paper: str,
    description: str = "",
    default_cfg: dict[str, Any] | None = None,
    any_in_channels: bool = True,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator that registers ``builder(num_classes, in_channels, **cfg)`` under ``name``."""

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY and _REGISTRY[name].builder is not builder:
            raise ValueError(f"model name {name!r} registered twice")
        _REGISTRY[name] = ModelInfo(
            name=name,
            builder=builder,
            paper=paper,
            description=description,
            default_cfg=dict(default_cfg or {}),
            any_in_channels=any_in_channels,
        )
        return builder

    return decorate


def _discover() -> None:
    """Import every model file in rsseg.models once, so their decorators run."""
    global _discovered
    if _discovered:
        return
    import rsseg.models as package

    names = sorted(
        m.name
        for m in pkgutil.iter_modules(package.__path__)
        if not m.ispkg and not m.name.startswith("_") and m.name not in _NOT_MODEL_MODULES
    )
    # Baselines first: they are the reference every paper model is compared against.
    for name in sorted(names, key=lambda n: n != "baselines"):
        try:
            importlib.import_module(f"rsseg.models.{name}")
        except ImportError as exc:
            # One broken model file (e.g. a missing optional dependency) must not take every
            # other model down with it; the failure is reported where a user would look for it.
            _import_failures[name] = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"rsseg: model file {name}.py could not be imported: {exc}", stacklevel=2)
    _discovered = True


def import_failures() -> dict[str, str]:
    """Model files that failed to import during discovery, with the reason."""
    _discover()
    return dict(_import_failures)


def list_models() -> list[str]:
    """Names of all registered models, baselines first, then alphabetical."""
    _discover()
    return list(_REGISTRY)


def model_info(name: str) -> ModelInfo:
    """Registry entry for ``name``; an unknown name is a UsageError listing the valid ones."""
    _discover()
    if name not in _REGISTRY:
        error = unknown_name("model", name, list(_REGISTRY))
        if _import_failures:
            broken = "; ".join(f"{k}.py ({v})" for k, v in _import_failures.items())
            error = UsageError(f"{error} (model files that failed to import: {broken})")
        raise error
    return _REGISTRY[name]


def create_model(name: str, num_classes: int, in_channels: int = 3, **cfg: Any) -> nn.Module:
    """Build the network ``name`` with ``num_classes`` outputs for ``in_channels`` input bands.

    ``cfg`` overrides the model's default configuration; unknown keys are refused by the builder.
    """
    info = model_info(name)
    if num_classes < 1:
        raise UsageError(f"num_classes must be >= 1, got {num_classes}")
    if in_channels < 1:
        raise UsageError(f"in_channels must be >= 1, got {in_channels}")
    merged = {**info.default_cfg, **cfg}
    try:
        return info.builder(num_classes=num_classes, in_channels=in_channels, **merged)
    except TypeError as exc:
        # A misspelt config key surfaces as an unexpected keyword argument.
        raise UsageError(f"model {name!r}: bad configuration {sorted(cfg)}: {exc}") from exc


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not) of a module, counting shared tensors once."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def parameter_count(name: str, num_classes: int = 6, in_channels: int = 3, **cfg: Any) -> int:
    """Parameters of a model without allocating its weights (built on the meta device)."""
    try:
        with torch.device("meta"):
            model = create_model(name, num_classes, in_channels, **cfg)
    except (NotImplementedError, RuntimeError):
        # A builder that needs real tensors at construction time: build it on the CPU.
        model = create_model(name, num_classes, in_channels, **cfg)
    return count_parameters(model)
