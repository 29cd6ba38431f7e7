"""Reading released checkpoints safely and loading them strictly.

Every paper backbone loads its initial weights through these two functions, so that they all
behave alike:

- :func:`read_state_dict` reads ``.safetensors`` or a torch file without unpickling anything but
  tensors and plain containers (``weights_only=True``). RMT's released files also pickle the
  ``argparse.Namespace`` of their training run; that one class is allow-listed, nothing else.
  The weights may sit at the top level or under ``"model"`` / ``"state_dict"`` (classification and
  mmseg layouts); ``module.`` prefixes (DataParallel) are removed.
- :func:`load_state_strict` refuses a checkpoint with missing, extra or mis-shaped tensors in one
  line naming the first few, so half a checkpoint is never loaded silently.
"""

from __future__ import annotations

import argparse
import pickle
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from rsseg.errors import DataError

# Keys that hold the weights in the released layouts, in the order they are tried.
_NESTED_KEYS = ("model", "state_dict")
# How many offending names one error line shows.
_SHOWN = 3


class CheckpointError(DataError):
    """A weights file cannot be read, or does not fit the network it is loaded into."""


def read_state_dict(path: str | Path, *, what: str = "weights file") -> dict[str, torch.Tensor]:
    """The tensors of a weights file, unwrapped from the usual checkpoint layouts.

    ``what`` names the file in error messages (e.g. ``"A2Mamba-S weights"``).
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise CheckpointError(f"{what} not found: {file}")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: object = load_file(str(file))
        else:
            # RMT's checkpoints carry their argparse.Namespace; allow exactly that class.
            with torch.serialization.safe_globals([argparse.Namespace]):
                state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # reading errors share no base class; every one is a bad file
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if isinstance(exc, pickle.UnpicklingError) and found:
            raise CheckpointError(
                f"{what} {file} pickles a Python object ({found.group(1)}) other than tensors; "
                "rsseg never unpickles those (convert the file to .safetensors, or keep only "
                "its state dict)"
            ) from exc
        if isinstance(exc, pickle.UnpicklingError):
            reason = "not a torch checkpoint (corrupt or truncated?)"
        else:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{what} {file} cannot be read safely: {reason}") from exc
    for key in _NESTED_KEYS:
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"{what} {file} holds no state dict")
    tensors = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{what} {file}: entry {key!r} is not a tensor")
        tensors[str(key).removeprefix("module.")] = value
    return tensors


def _names(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f" (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")


def check_state_fits(
    own: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    *,
    what: str,
    optional: Iterable[str] = (),
) -> None:
    """Raise one CheckpointError line unless ``state`` has exactly ``own``'s keys and shapes.

    ``optional``: keys of ``own`` that a checkpoint may lack (e.g. output norms a classification
    checkpoint has no use for); they keep their initial values.
    """
    optional = set(optional)
    missing = set(own) - set(state) - optional
    extra = set(state) - set(own)
    misshaped = {k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape)}
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({_names(missing)})")
    if extra:
        problems.append(f"{len(extra)} unexpected ({_names(extra)})")
    if misshaped:
        k = sorted(misshaped)[0]
        problems.append(
            f"{len(misshaped)} mis-shaped (e.g. {k}: file {tuple(state[k].shape)} vs "
            f"model {tuple(own[k].shape)})"
        )
    if problems:
        raise CheckpointError(f"{what} does not fit the network: {'; '.join(problems)}")


def load_state_strict(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    what: str,
    optional: Iterable[str] = (),
) -> None:
    """Load ``state`` into ``module`` after :func:`check_state_fits`; every tensor is used."""
    own = module.state_dict()
    check_state_fits(own, state, what=what, optional=optional)
    # nn.Module's own loader: some libraries' modules override load_state_dict and drop keys.
    result = nn.Module.load_state_dict(module, dict(state), strict=False)
    unexpected = set(result.unexpected_keys)
    missing = set(result.missing_keys) - set(optional)
    if unexpected or missing:  # cannot happen after the check; kept as a guard
        raise CheckpointError(f"{what}: keys not loaded: {_names(missing | unexpected)}")


def adapt_stem(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """An RGB stem convolution's weights for ``in_channels`` bands (timm's rule: repeat the RGB
    filters cyclically and rescale so that the response to a constant input is unchanged)."""
    if weight.shape[1] == in_channels:
        return weight
    from timm.models import adapt_input_conv

    return adapt_input_conv(in_channels, weight)
