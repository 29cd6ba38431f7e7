"""Four separately-parameterised directional Mamba scans (Reload-Mamba, section 3.3).

The feature map is read in four traversals (right, left, down, up; see :mod:`scan_orders`), and
each traversal goes through its own Mamba block (Gu & Dao 2023): linear projection to
``expand * dim`` main and gate channels, causal depthwise conv1d + SiLU, input-dependent
(dt, B, C), selective scan with D skip and SiLU(gate), linear projection back to ``dim``. The
four blocks share no parameters; they run as one grouped selective scan for speed, which is
exactly four independent scans. The outputs are put back on the pixel grid, one per direction,
for the caller's directional attention to fuse.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsseg.models.ssm.mamba_init import a_log_init, d_init, dt_proj_init_
from rsseg.models.ssm.scan import selective_scan
from rsseg.models.ssm.scan_orders import DIRECTIONS, from_sequences, to_sequences
from rsseg.models.ssm.ss2d import linear_init_, resolve_dt_rank


class FourDirectionMamba(nn.Module):
    """(B, dim, H, W) -> (B, k, dim, H, W): Mamba outputs for (right, left, down, up), or for the
    subset given as ``directions`` (Reload-Mamba's Table 8), in that order."""

    def __init__(
        self,
        dim: int,
        d_state: int = 16,
        expand: float = 2.0,
        d_conv: int = 4,
        dt_rank: int | str = "auto",
        conv_bias: bool = True,
        directions: tuple[str, ...] = DIRECTIONS,
    ) -> None:
        super().__init__()
        unknown = [d for d in directions if d not in DIRECTIONS]
        if unknown or not directions or len(set(directions)) != len(directions):
            raise ValueError(f"directions must be distinct names from {DIRECTIONS}, got {directions}")
        self.directions = tuple(directions)
        self.index = [DIRECTIONS.index(d) for d in self.directions]
        k = len(self.directions)
        self.dim = dim
        self.d_state = d_state
        self.d_inner = di = int(expand * dim)
        self.dt_rank = r = resolve_dt_rank(dt_rank, dim)
        self.d_conv = d_conv
        n = d_state
        # Stacked per-direction weights, in the order of self.directions.
        self.in_proj_weight = nn.Parameter(torch.empty(k, 2 * di, dim))
        self.conv1d = nn.Conv1d(k * di, k * di, d_conv, groups=k * di, bias=conv_bias)
        self.x_proj_weight = nn.Parameter(torch.empty(k, r + 2 * n, di))
        self.dt_proj_weight = nn.Parameter(torch.empty(k, di, r))
        self.dt_proj_bias = nn.Parameter(torch.empty(k, di))
        self.A_log = a_log_init(n, k * di)
        self.D = d_init(k * di)
        self.out_proj_weight = nn.Parameter(torch.empty(k, dim, di))

        for weight in (self.in_proj_weight, self.x_proj_weight, self.out_proj_weight):
            linear_init_(weight)
        dt_proj_init_(self.dt_proj_weight, self.dt_proj_bias, r)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        k, di, n, r = len(self.index), self.d_inner, self.d_state, self.dt_rank
        length = h * w
        seqs = to_sequences(x)[:, self.index]  # (B, k, dim, L)
        xin, gate = torch.einsum("bkcl,kec->bkel", seqs, self.in_proj_weight).split(di, dim=2)
        # Causal depthwise conv along each traversal: pad on the left only.
        xin = F.silu(self.conv1d(F.pad(xin.reshape(b, k * di, length), (self.d_conv - 1, 0))))
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xin.view(b, k, di, length), self.x_proj_weight)
        dts, bs, cs = torch.split(x_dbl, [r, n, n], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_proj_weight)
        sdt = torch.promote_types(xin.dtype, torch.float32)  # float32 scan, float64 stays float64
        y = selective_scan(
            xin.to(sdt),
            dts.to(sdt).reshape(b, k * di, length),
            -torch.exp(self.A_log.to(sdt)),
            bs.to(sdt).contiguous(),
            cs.to(sdt).contiguous(),
            self.D.to(sdt),
            z=gate.to(sdt).reshape(b, k * di, length),
            delta_bias=self.dt_proj_bias.to(sdt).reshape(-1),
            delta_softplus=True,
        )
        out = torch.einsum("bkdl,kcd->bkcl", y.view(b, k, di, length).to(xin.dtype), self.out_proj_weight)
        if self.index == list(range(len(DIRECTIONS))):
            return from_sequences(out, h, w)
        # Put each traversal back on the pixel grid: fill the four-direction layout, keep ours.
        full = out.new_zeros(b, len(DIRECTIONS), *out.shape[2:])
        full[:, self.index] = out
        return from_sequences(full, h, w)[:, self.index]
