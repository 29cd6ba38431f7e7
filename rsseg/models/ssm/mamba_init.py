"""Mamba's parameter initialisation, shared by SS2D and the directional Mamba blocks.

Values from the Mamba paper and its reference code (also used by VMamba):
``A = -exp(A_log)`` with ``A_log = log(1..N)`` per channel (S4D-real), ``D = 1``, and the
``dt`` projection's bias set to the inverse softplus of ``dt ~ logUniform(dt_min, dt_max)`` so
that ``softplus(bias)`` starts in that range; its weight uniform in +-dt_rank**-0.5.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def a_log_init(d_state: int, channels: int) -> nn.Parameter:
    """A_log (channels, d_state) = log(1..d_state) for every channel; excluded from weight decay."""
    a = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(channels, 1)
    param = nn.Parameter(torch.log(a))
    param._no_weight_decay = True  # type: ignore[attr-defined]
    return param


def d_init(channels: int) -> nn.Parameter:
    """The skip weight D (channels,) = 1; excluded from weight decay."""
    param = nn.Parameter(torch.ones(channels))
    param._no_weight_decay = True  # type: ignore[attr-defined]
    return param


@torch.no_grad()
def dt_proj_init_(
    weight: torch.Tensor,
    bias: torch.Tensor,
    dt_rank: int,
    dt_min: float = 1e-3,
    dt_max: float = 1e-1,
    dt_init_floor: float = 1e-4,
    dt_scale: float = 1.0,
) -> None:
    """Initialise a dt projection in place: weight (..., channels, dt_rank), bias (..., channels)."""
    if weight.is_meta:  # parameter counting on the meta device: nothing to fill
        return
    std = dt_rank**-0.5 * dt_scale
    weight.uniform_(-std, std)
    dt = torch.exp(
        torch.rand_like(bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    ).clamp(min=dt_init_floor)
    bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
