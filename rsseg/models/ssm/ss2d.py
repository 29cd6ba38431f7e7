"""VMamba's 2D selective scan (SS2D, "v0" form) and the VSSBlock / VSSLayer built on it.

SS2D (Liu et al., VMamba, 2024), as MAFMamba section 2.2.2 describes its VSSLayer: a linear
projection to 2 x ssm_ratio x d_model channels split into a main and a gate branch; the main
branch goes through a depthwise 3x3 conv + SiLU, is read in four traversals (see
:mod:`scan_orders`), each traversal scanned by its own S6 parameters (one grouped selective scan),
the four results summed per pixel, LayerNorm'ed and multiplied by SiLU(gate), then projected back.
VSSBlock adds it as a residual after a LayerNorm; VSSLayer stacks VSSBlocks.
All take and return channels-last maps (B, H, W, C) of any H x W.

On CPU with the fused scan (float32 compute, backend ``auto`` or ``fused``), SS2D skips the four
traversal copies: the projections run per pixel on the channels-last map, and the fused kernel
walks the (H, W) grid in each traversal's order itself and adds the four results per pixel
(:meth:`SS2D.scan_fused`, docs/cpu_scan.md). Same function and parameters as the general path.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn

from rsseg.models.ssm import scan as scan_module
from rsseg.models.ssm.mamba_init import a_log_init, d_init, dt_proj_init_
from rsseg.models.ssm.scan import selective_scan
from rsseg.models.ssm.scan_orders import merge_sequences, to_sequences

NUM_DIRECTIONS = 4


def linear_init_(weight: Tensor) -> None:
    """nn.Linear's default init, for stacked (K, out, in) weights: U(+-1/sqrt(in))."""
    if not weight.is_meta:
        bound = 1.0 / math.sqrt(weight.shape[-1])
        with torch.no_grad():
            weight.uniform_(-bound, bound)


@functools.lru_cache(maxsize=64)
def traversal_orders(height: int, width: int) -> Tensor:
    """(4, H*W) int64: the flat pixel (i * W + j) read at step t of each traversal of
    :mod:`scan_orders` (right, left, down, up)."""
    # Cached across calls: built outside inference mode so that a training step may save it
    # for backward after a prediction cached it (an inference tensor cannot be saved).
    with torch.inference_mode(False):
        rows = torch.arange(height * width)
        cols = rows.view(height, width).t().reshape(-1)  # column-major: step j * H + i reads (i, j)
        return torch.stack([rows, rows.flip(0), cols, cols.flip(0)]).contiguous()


def _fused_lanes_wanted(x: Tensor, A_logs: Tensor) -> bool:
    """Whether SS2D's scan runs in the fused CPU kernel's traversal form: CPU, float32 compute
    (float64 stays on the reference path), backend auto or fused, numba usable."""
    if x.device.type != "cpu" or torch.promote_types(x.dtype, torch.float32) != torch.float32:
        return False
    if scan_module.requested_backend() not in ("auto", "fused"):
        return False
    from rsseg.models.ssm import cpu_scan  # imports numba: on first CPU use only

    return cpu_scan.unsupported_reason(x, A_logs) is None


def resolve_dt_rank(dt_rank: int | str, d_model: int) -> int:
    """Mamba's ``dt_rank="auto"`` is ceil(d_model / 16)."""
    return math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)


class SS2D(nn.Module):
    """2D selective scan over four traversals; (B, H, W, d_model) -> (B, H, W, d_model)."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        ssm_ratio: float = 2.0,
        dt_rank: int | str = "auto",
        d_conv: int = 3,
        dropout: float = 0.0,
        conv_bias: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = int(ssm_ratio * d_model)
        self.dt_rank = resolve_dt_rank(dt_rank, d_model)
        k, di, r, n = NUM_DIRECTIONS, self.d_inner, self.dt_rank, d_state

        self.in_proj = nn.Linear(d_model, 2 * di, bias=bias)
        self.conv2d = nn.Conv2d(di, di, d_conv, padding=(d_conv - 1) // 2, groups=di, bias=conv_bias)
        self.act = nn.SiLU()
        # Per traversal: x -> (dt, B, C), dt -> per-channel step; A and D per (traversal, channel).
        self.x_proj_weight = nn.Parameter(torch.empty(k, r + 2 * n, di))
        self.dt_projs_weight = nn.Parameter(torch.empty(k, di, r))
        self.dt_projs_bias = nn.Parameter(torch.empty(k, di))
        self.A_logs = a_log_init(n, k * di)
        self.Ds = d_init(k * di)
        self.out_norm = nn.LayerNorm(di)
        self.out_proj = nn.Linear(di, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        linear_init_(self.x_proj_weight)
        dt_proj_init_(self.dt_projs_weight, self.dt_projs_bias, r)

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, _ = x.shape
        xin, gate = self.in_proj(x).chunk(2, dim=-1)
        xin = self.act(self.conv2d(xin.permute(0, 3, 1, 2)))  # (B, Di, H, W)
        if _fused_lanes_wanted(xin, self.A_logs):
            y = self.scan_fused(xin.permute(0, 2, 3, 1))  # (B, H, W, Di)
        else:
            y = merge_sequences(self.scan(to_sequences(xin)), h, w).permute(0, 2, 3, 1)
        y = self.out_norm(y) * F.silu(gate)
        return self.dropout(self.out_proj(y))

    # One graph break under torch.compile (dynamo cannot trace the numba kernel), as selective_scan.
    @torch.compiler.disable(reason="rsseg's fused CPU scan runs its own kernels")
    def scan_fused(self, x: Tensor) -> Tensor:
        """(B, H, W, Di) -> (B, H, W, Di): :meth:`scan` and the four-way merge in one kernel pass.

        x_proj is per pixel, so it runs once on the channels-last map for all four traversals;
        the kernel reads u, delta, B, C at each traversal's pixels (``traversal_orders``) and adds
        the four outputs per pixel. The D skip of the four directions is one (sum_k D_k) * u.
        """
        from rsseg.models.ssm.cpu_scan import lane_scan, ss2d_forward

        b, h, w, di = x.shape
        k, n, r, length = NUM_DIRECTIONS, self.d_state, self.dt_rank, h * w
        xl = x.reshape(b, length, di)
        x_dbl = F.linear(xl, self.x_proj_weight.reshape(k * (r + 2 * n), di)).view(b, length, k, r + 2 * n)
        params = (self.x_proj_weight, self.dt_projs_weight, self.dt_projs_bias, self.A_logs, self.Ds)
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *params))
        with torch.autocast(device_type="cpu", enabled=False):  # the scan in float32, as scan()
            f32 = torch.float32
            u = xl.to(f32)
            A = -torch.exp(self.A_logs.to(f32))
            if not grad:  # inference: delta from the low-rank dt inside the kernel, never stored
                y = ss2d_forward(u, x_dbl.to(f32), self.dt_projs_weight.to(f32), self.dt_projs_bias.to(f32),
                                 A, self.Ds.to(f32), traversal_orders(h, w), r)
                return y.reshape(b, h, w, di).to(x.dtype)
        dts = x_dbl[..., :r].permute(2, 0, 1, 3).reshape(k, b * length, r)
        dts = torch.bmm(dts, self.dt_projs_weight.transpose(1, 2))  # (K, B*L, Di)
        with torch.autocast(device_type="cpu", enabled=False):
            delta = F.softplus(dts.to(f32) + self.dt_projs_bias.to(f32)[:, None])
            AT = A.view(k, di, n).transpose(1, 2)  # (K, N, Di)
            y, _ = lane_scan(u[None], delta.view(k, b, length, di), AT, x_dbl[..., r:r + n].to(f32),
                             x_dbl[..., r + n:].to(f32), traversal_orders(h, w))
            y = y[0, ..., :di] + u * self.Ds.to(f32).view(k, di).sum(0)
        return y.view(b, h, w, di).to(x.dtype)

    def scan(self, xs: Tensor) -> Tensor:
        """(B, 4, Di, L) traversal sequences -> (B, 4, Di, L) S6 outputs, one parameter set each."""
        b, k, di, length = xs.shape
        n, r = self.d_state, self.dt_rank
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)
        dts, bs, cs = torch.split(x_dbl, [r, n, n], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)
        # As VMamba: the scan runs on float32 inputs (float64 ones stay float64) under autocast too.
        sdt = torch.promote_types(xs.dtype, torch.float32)
        y = selective_scan(
            xs.to(sdt).reshape(b, k * di, length),
            dts.to(sdt).reshape(b, k * di, length),
            -torch.exp(self.A_logs.to(sdt)),
            bs.to(sdt).contiguous(),
            cs.to(sdt).contiguous(),
            self.Ds.to(sdt),
            delta_bias=self.dt_projs_bias.to(sdt).reshape(-1),
            delta_softplus=True,
        )
        return y.view(b, k, di, length).to(xs.dtype)


class VSSBlock(nn.Module):
    """x + DropPath(SS2D(LayerNorm(x))) on (B, H, W, C) maps (VMamba / MAFMamba section 2.2.2)."""

    def __init__(
        self,
        hidden_dim: int,
        drop_path: float = 0.0,
        d_state: int = 16,
        attn_drop_rate: float = 0.0,
        norm_eps: float = 1e-6,
        **ss2d_kwargs: object,
    ) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden_dim, eps=norm_eps)
        self.self_attention = SS2D(hidden_dim, d_state=d_state, dropout=attn_drop_rate, **ss2d_kwargs)  # type: ignore[arg-type]
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop_path(self.self_attention(self.ln_1(x)))


class VSSLayer(nn.Module):
    """``depth`` VSSBlocks in sequence on (B, H, W, dim); ``drop_path`` a float or one per block."""

    def __init__(
        self,
        dim: int,
        depth: int,
        drop_path: float | list[float] = 0.0,
        d_state: int = 16,
        attn_drop: float = 0.0,
        **ss2d_kwargs: object,
    ) -> None:
        super().__init__()
        rates = list(drop_path) if isinstance(drop_path, (list, tuple)) else [drop_path] * depth
        if len(rates) != depth:
            raise ValueError(f"drop_path has {len(rates)} rates for {depth} blocks")
        self.blocks = nn.ModuleList(
            VSSBlock(dim, drop_path=rate, d_state=d_state, attn_drop_rate=attn_drop, **ss2d_kwargs)
            for rate in rates
        )

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x
