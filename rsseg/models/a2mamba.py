"""A2Mamba backbone (Lou, Fu, Yu: "A2Mamba: Attention-augmented State Space Models for Visual
Recognition", sections 3.2-3.4, Table I). Its segmentation network, SegMAN-V2, is in
:mod:`rsseg.models.segman_v2`; this file registers no model.

Two variants of the backbone, chosen by ``A2Mamba(..., variant=...)``:

- ``"released"`` (default): the behaviour of the authors' released classification model, which
  the paper's text does not fully describe: a 4-conv stem; blocks with a second residual
  depth-wise conv before the FFN and optional layer-scale / res-scale; a MASS with 2D RoPE on
  q/k, a LePE branch on v, BatchNorm in the gate, one relative-position table shared by SLA and
  DLA, DLA aggregating ``SLA output + V2``, a 1x1 "state fusion" across heads after the
  re-aggregation, and the dilation capped at ``K``; stage 4 adds global attention after SLA/DLA
  and has no SSM. Module and parameter names equal the released state dict's, so the official
  ImageNet-1K checkpoints load strictly (:func:`rsseg.models.segman_v2.load_backbone_weights`).
- ``"paper"``: the paper's text alone (:class:`PaperMASS`, :class:`PaperA2MambaBlock`, 2-conv
  stem, SLA/DLA in every stage); no released checkpoint fits it.

Shared pieces: :class:`A2SSM` (3.3: a d_state-1 selective scan whose hidden-state map is
re-aggregated with the SLA/DLA attention maps before it is multiplied by C). The differences
between the two variants are listed in ``docs/models/segman-v2.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, trunc_normal_
from torch import Tensor, nn

from rsseg.models.neighborhood_attention import (
    adaptive_dilation,
    neighbourhood_aggregate,
    neighbourhood_attention,
)
from rsseg.models.ssm import selective_scan_states
from rsseg.models.ssm.mamba_init import a_log_init, d_init, dt_proj_init_

Rope = tuple[Tensor, Tensor]  # (sin, cos), each (H, W, head_dim)
VARIANTS = ("released", "paper")


@dataclass(frozen=True)
class A2MambaSize:
    """One backbone size: Table I plus what only the released code gives (FFN ratios, scales).

    ``layer_scale``: per stage, scale each residual branch by a learnable per-channel affine
    (init ``scale_init``); ``res_scale``: scale the shortcut instead. Both only in ``"released"``.
    """

    dims: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    heads: tuple[int, int, int, int]
    windows: tuple[int, int, int, int] = (11, 9, 7, 7)
    mlp_ratios: tuple[float, float, float, float] = (4, 4, 3, 3)
    layer_scale: tuple[bool, bool, bool, bool] = (False, False, False, False)
    res_scale: tuple[bool, bool, bool, bool] = (False, False, False, False)
    scale_init: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)


_ALL = (True, True, True, True)
A2MAMBA_SIZES: dict[str, A2MambaSize] = {
    "nano": A2MambaSize((32, 64, 128, 192), (2, 2, 8, 2), (2, 2, 4, 8)),
    "tiny": A2MambaSize((48, 96, 256, 448), (2, 2, 10, 2), (2, 4, 8, 16)),
    "small": A2MambaSize(
        (64, 128, 320, 512), (2, 4, 12, 4), (2, 4, 10, 16), res_scale=(False, False, True, True)
    ),
    "base": A2MambaSize(
        (96, 192, 384, 512), (4, 6, 12, 6), (4, 8, 12, 16), mlp_ratios=(4, 4, 3.75, 3.75),
        layer_scale=_ALL, scale_init=(1.0, 1.0, 1e-6, 1e-6),
    ),
    # the released Large; Table I's Large is "large-table1" below (no checkpoint exists for it)
    "large": A2MambaSize(
        (96, 192, 448, 672), (4, 6, 18, 6), (4, 8, 16, 24), mlp_ratios=(4, 4, 4, 4),
        layer_scale=_ALL, scale_init=(1.0, 1.0, 1e-6, 1e-6),
    ),
    "large-table1": A2MambaSize(
        (112, 224, 512, 720), (4, 6, 12, 6), (4, 8, 16, 30), mlp_ratios=(4, 4, 4, 4),
        layer_scale=_ALL, scale_init=(1.0, 1.0, 1e-6, 1e-6),
    ),
}

# Pre-training resolution of the released checkpoints: fixes the size of stage 4's global
# position-bias table, ((224 / 32) ** 2) ** 2 entries per head.
PRETRAIN_SIZE = 224


def _float32_if_half(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Half-precision tensors in float32: the released model leaves autocast for the SSM output
    and the gated projection, for training stability; float32/float64 pass unchanged."""
    return tuple(t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors)


class A2SSM(nn.Module):
    """Attention-augmented SSM (section 3.3, Fig. 3b) on a (B, C, H, W) map, row-major scan.

    ``u = SiLU(DWConv5x5(Y))`` is projected to a low-rank Delta, B and C' (d_state 1); the scan
    gives the hidden-state map S (C x HW); ``reaggregate`` (from MASS: the SLA/DLA maps applied to
    the two channel halves of S) turns S into S'; with ``fusion_heads`` a 1x1 conv then mixes the
    heads of S' (same weights for every channel of a head; released code only); the output is
    ``S' * C' + D * u``. With ``reaggregate=None`` this is exactly a d_state-1 selective scan.
    Parameter names are the released model's.
    """

    def __init__(self, dim: int, d_conv: int = 5, dt_rank: int | None = None, fusion_heads: int | None = None) -> None:
        super().__init__()
        self.dt_rank = dt_rank or math.ceil(dim / 16)
        self.conv2d = nn.Conv2d(dim, dim, d_conv, padding=d_conv // 2, groups=dim)
        # one projection for (dt low-rank, B, C), as in Mamba; d_state = 1
        self.x_proj_weight = nn.Parameter(torch.empty(self.dt_rank + 2, dim))
        nn.init.kaiming_uniform_(self.x_proj_weight, a=math.sqrt(5))  # nn.Linear's default
        self.dt_projs_weight = nn.Parameter(torch.empty(dim, self.dt_rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(dim))
        dt_proj_init_(self.dt_projs_weight, self.dt_projs_bias, self.dt_rank)
        self.A_logs = a_log_init(1, dim)
        self.Ds = d_init(dim)
        self.fusion_heads = fusion_heads
        self.state_fusion = nn.Conv2d(fusion_heads, fusion_heads, 1) if fusion_heads else None

    def scan_inputs(self, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(u, delta, A, B, C)`` in mamba-ssm's layout: u, delta (b, d, l); A (d, 1); B, C (b, 1, l)."""
        b, c, h, w = y.shape
        u = F.silu(self.conv2d(y)).reshape(b, c, h * w)
        x_dbl = torch.einsum("od,bdl->bol", self.x_proj_weight, u)
        dt_low, b_in, c_in = torch.split(x_dbl, [self.dt_rank, 1, 1], dim=1)
        delta = torch.einsum("dr,brl->bdl", self.dt_projs_weight, dt_low)
        return u, delta, -torch.exp(self.A_logs.float()), b_in, c_in

    def forward(self, y: Tensor, reaggregate: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        b, c, h, w = y.shape
        u, delta, a, b_in, c_in = self.scan_inputs(y)
        states = selective_scan_states(
            u, delta, a, b_in, delta_bias=self.dt_projs_bias.float(), delta_softplus=True
        )  # (b, c, 1, l)
        states = states.reshape(b, c, h, w)
        if reaggregate is not None:
            states = reaggregate(states)
            if self.state_fusion is not None:
                heads = self.fusion_heads
                # heads as conv channels, (channel within head, position) as the 2D grid
                fused = self.state_fusion(states.reshape(b, heads, c // heads, h * w))
                states = fused.reshape(b, c, h, w)
        states, c_in, u = _float32_if_half(states, c_in, u)
        out = states.reshape(b, c, h * w) * c_in + u * self.Ds[:, None]
        return out.reshape(b, c, h, w)


def _heads_last(x: Tensor, heads: int) -> Tensor:
    """(B, heads * hd, H, W) -> (B, heads, H, W, hd)."""
    b, c, h, w = x.shape
    return x.reshape(b, heads, c // heads, h, w).permute(0, 1, 3, 4, 2)


def _heads_first(x: Tensor) -> Tensor:
    """(B, heads, H, W, hd) -> (B, heads * hd, H, W)."""
    b, n, h, w, d = x.shape
    return x.permute(0, 1, 4, 2, 3).reshape(b, n * d, h, w)


def _global_attention(q: Tensor, k: Tensor, bias: Tensor | None = None) -> Tensor:
    """Softmax map (B, heads, HW, HW) of full self-attention; q, k (B, heads, H, W, hd)."""
    b, n, h, w, d = q.shape
    logits = q.reshape(b, n, h * w, d) @ k.reshape(b, n, h * w, d).transpose(-1, -2)
    return torch.softmax(logits if bias is None else logits + bias, -1)


def _global_aggregate(attn: Tensor, v: Tensor) -> Tensor:
    b, n, h, w, d = v.shape
    return (attn @ v.reshape(b, n, h * w, d)).reshape(b, n, h, w, d)


class RotaryEmbedding2d(nn.Module):
    """2D RoPE of the released model: per head, the first half of the channel pairs rotates with
    the row index, the second half with the column index, at frequencies
    ``10000 ** -linspace(0, 1, head_dim / 4)``. ``angle`` is a persistent buffer (it is in the
    released checkpoints, and the loaded values are the ones used)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        head_dim = dim // num_heads
        if head_dim % 4:
            raise ValueError(f"2D RoPE needs a head dimension divisible by 4, got {head_dim}")
        frequencies = 1.0 / 10000 ** torch.linspace(0, 1, head_dim // 4)
        self.register_buffer("angle", frequencies.repeat_interleave(2))  # one angle per pair

    def forward(self, height: int, width: int) -> Rope:
        angle = self.angle
        rows = torch.arange(height, device=angle.device, dtype=angle.dtype)[:, None] * angle
        cols = torch.arange(width, device=angle.device, dtype=angle.dtype)[:, None] * angle
        phase = torch.cat(
            [rows[:, None, :].expand(height, width, -1), cols[None, :, :].expand(height, width, -1)], dim=-1
        )
        return phase.sin(), phase.cos()


def apply_rope(x: Tensor, rope: Rope) -> Tensor:
    """Rotate consecutive channel pairs ``(a, b)`` of ``x`` (..., H, W, hd) by the RoPE phases."""
    sin, cos = rope
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos + rotated * sin


class MASS(nn.Module):
    """MASS token mixer as released (B, C, H, W) -> (B, C, H, W); names as in the checkpoints.

    q, k, v from one 1x1 conv; RoPE on q and k; the first half of the heads run SLA, the second
    DLA with dilation ``min(H // K, K)`` per axis on values ``SLA output + V2``; one relative
    position table (``rpb.0`` and ``rpb.1`` are the same parameter) for both. Local mode: the
    concatenated output goes through :class:`A2SSM` with the two maps and head fusion.
    ``global_attention`` (stage 4): no SSM; instead full attention of all heads over the SLA/DLA
    output, with a learned (1, heads, N, N) bias (``rpb.2``, N = tokens at pre-training size,
    resized bicubically to other sizes). Then ``proj(LN(LN(Y') + LePE(v)) * gate(X))`` where
    ``gate`` is conv1x1-BN-SiLU, LePE a 5x5 depth-wise conv and ``proj`` LayerNorm + 1x1 conv.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int = 7,
        global_attention: bool = False,
        global_tokens: int = (PRETRAIN_SIZE // 32) ** 2,
    ) -> None:
        super().__init__()
        if num_heads % 2 or dim % num_heads:
            raise ValueError(f"MASS needs an even number of heads dividing dim, got {num_heads} for {dim}")
        self.dim, self.num_heads, self.kernel_size = dim, num_heads, kernel_size
        self.global_attention = global_attention
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.gate = nn.Sequential(nn.Conv2d(dim, dim, 1), nn.BatchNorm2d(dim), nn.SiLU())
        self.lepe = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.norm = LayerNorm2d(dim)
        self.proj = nn.Sequential(LayerNorm2d(dim), nn.Conv2d(dim, dim, 1))
        self.ssm = None if global_attention else A2SSM(dim, fusion_heads=num_heads)
        size = 2 * kernel_size - 1
        local_table = nn.Parameter(torch.zeros(num_heads // 2, size, size))
        # one table registered twice: SLA and DLA share it, and the checkpoints store it twice
        tables = [local_table, local_table]
        if global_attention:
            tables.append(nn.Parameter(torch.zeros(1, num_heads, global_tokens, global_tokens)))
        self.rpb = nn.ParameterList(tables)

    def global_bias(self, tokens: int) -> Tensor:
        """Stage 4's (1, heads, tokens, tokens) bias, bicubically resized from the stored table."""
        table = self.rpb[2]
        if table.shape[-1] != tokens:
            table = F.interpolate(table, size=(tokens, tokens), mode="bicubic", align_corners=False)
        return table

    def forward(self, x: Tensor, rope: Rope) -> Tensor:
        _, c, h, w = x.shape
        kernel, half = self.kernel_size, self.num_heads // 2
        dilation = adaptive_dilation(h, w, kernel, max_dilation=kernel)
        gate = self.gate(x)
        qkv = self.qkv(x)
        lepe = self.lepe(qkv[:, 2 * c :])
        q, k, v = (_heads_last(t, self.num_heads) for t in qkv.chunk(3, dim=1))
        q = apply_rope(q, rope) * self.scale
        k = apply_rope(k, rope)
        (q1, q2), (k1, k2), (v1, v2) = (t.split(half, dim=1) for t in (q, k, v))
        y1, a1 = neighbourhood_attention(q1, k1, v1, kernel, (1, 1), self.rpb[0])
        y2, a2 = neighbourhood_attention(q2, k2, y1 + v2, kernel, dilation, self.rpb[1])
        y = _heads_first(torch.cat([y1, y2], dim=1))
        if self.ssm is not None:

            def reaggregate(states: Tensor) -> Tensor:
                s1, s2 = _heads_last(states, self.num_heads).split(half, dim=1)
                s1 = neighbourhood_aggregate(a1, s1, kernel, (1, 1))
                s2 = neighbourhood_aggregate(a2, s2, kernel, dilation)
                return _heads_first(torch.cat([s1, s2], dim=1))

            y = self.ssm(y, reaggregate)
        else:
            attn = _global_attention(q, k, self.global_bias(h * w))
            y = _heads_first(_global_aggregate(attn, _heads_last(y, self.num_heads)))
        y, gate = _float32_if_half(self.norm(y) + lepe, gate)
        with torch.autocast(x.device.type, enabled=False):
            return self.proj(y * gate)


class PaperMASS(nn.Module):
    """MASS as the paper's text describes it (section 3.3, eq. 2), (B, C, H, W).

    Half the heads run SLA on the first half of the channels, the other half DLA (dilation
    ``(H // K, W // K)``, no cap) on the second half, each with its own position table. Their
    outputs feed A2SSM (no head fusion), whose hidden states are re-aggregated with the same two
    maps. The result is normalised, gated by ``SiLU(Conv1x1(X))`` and projected.
    ``mode="global"``: both halves use global self-attention (for small maps; no window, no bias),
    as in the SegMAN-V2 decoder's MM-Refine (section 3.5).
    """

    def __init__(self, dim: int, num_heads: int, kernel_size: int = 7, mode: str = "local") -> None:
        super().__init__()
        if num_heads % 2 or dim % num_heads:
            raise ValueError(f"MASS needs an even number of heads dividing dim, got {num_heads} for {dim}")
        if mode not in ("local", "global"):
            raise ValueError(f"MASS mode must be 'local' or 'global', got {mode!r}")
        self.dim, self.num_heads, self.kernel_size, self.mode = dim, num_heads, kernel_size, mode
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.gate = nn.Conv2d(dim, dim, 1)
        if mode == "local":
            size = 2 * kernel_size - 1
            self.rpb_sla = nn.Parameter(torch.zeros(num_heads // 2, size, size))
            self.rpb_dla = nn.Parameter(torch.zeros(num_heads // 2, size, size))
        self.ssm = A2SSM(dim)
        self.norm = LayerNorm2d(dim)
        self.proj = nn.Conv2d(dim, dim, 1)

    def attend(self, x: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """SLA + DLA (or global) on ``x``: returns Y (B, C, H, W) and the map re-use function."""
        _, _, h, w = x.shape
        half = self.num_heads // 2
        q, k, v = (_heads_last(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=1))
        q = q * self.scale
        (q1, q2), (k1, k2), (v1, v2) = (t.split(half, dim=1) for t in (q, k, v))
        if self.mode == "local":
            kernel = self.kernel_size
            dilation = adaptive_dilation(h, w, kernel)
            y1, a1 = neighbourhood_attention(q1, k1, v1, kernel, (1, 1), self.rpb_sla)
            y2, a2 = neighbourhood_attention(q2, k2, v2, kernel, dilation, self.rpb_dla)

            def reaggregate(states: Tensor) -> Tensor:
                s1, s2 = _heads_last(states, self.num_heads).split(half, dim=1)
                s1 = neighbourhood_aggregate(a1, s1, kernel, (1, 1))
                s2 = neighbourhood_aggregate(a2, s2, kernel, dilation)
                return _heads_first(torch.cat([s1, s2], dim=1))

        else:
            a1, a2 = _global_attention(q1, k1), _global_attention(q2, k2)
            y1, y2 = _global_aggregate(a1, v1), _global_aggregate(a2, v2)

            def reaggregate(states: Tensor) -> Tensor:
                s1, s2 = _heads_last(states, self.num_heads).split(half, dim=1)
                return _heads_first(torch.cat([_global_aggregate(a1, s1), _global_aggregate(a2, s2)], 1))

        return _heads_first(torch.cat([y1, y2], dim=1)), reaggregate

    def forward(self, x: Tensor) -> Tensor:
        y, reaggregate = self.attend(x)
        y = self.ssm(y, reaggregate)
        return self.proj(self.norm(y) * F.silu(self.gate(x)))


class ConvFFN(nn.Module):
    """Convolutional FFN: 1x1 up, 3x3 depth-wise, GELU, 1x1 down.

    ``released_order`` (default): GELU first, then a *residual* depth-wise conv,
    ``fc2(a + dwconv(a))`` with ``a = GELU(fc1(x))``, as in the released model; otherwise PVTv2's
    ``fc2(GELU(dwconv(fc1(x))))`` (the paper cites PVTv2's ConvFFN).
    """

    def __init__(self, dim: int, hidden: int, released_order: bool = True) -> None:
        super().__init__()
        self.released_order = released_order
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.fc1(x)
        if self.released_order:
            x = F.gelu(x)
            return self.fc2(x + self.dwconv(x))
        return self.fc2(F.gelu(self.dwconv(x)))


class LayerScale(nn.Module):
    """Per-channel affine ``x * weight + bias`` (released layer-scale; weight stored (C, 1, 1, 1)
    as a depth-wise 1x1 conv kernel, bias (C,))."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim, 1, 1, 1), float(init_value)))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class A2MambaBlock(nn.Module):
    """Released block: ``x += DW3x3(x)``; MASS branch; ``x += DW3x3(x)``; FFN branch.

    With ``layer_scale`` each branch output is scaled (``x + s(f(x))``); with ``res_scale`` the
    shortcut is (``s(x) + f(x)``); neither: plain residuals (and no scale parameters).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        global_attention: bool = False,
        layer_scale: bool = False,
        res_scale: bool = False,
        scale_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.res_scale = res_scale
        self.cpe1 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = LayerNorm2d(dim)
        self.token_mixer = MASS(dim, num_heads, kernel_size, global_attention)
        self.cpe2 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm2 = LayerNorm2d(dim)
        self.mlp = ConvFFN(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        scaled = layer_scale or res_scale
        self.layer_scale1 = LayerScale(dim, scale_init) if scaled else nn.Identity()
        self.layer_scale2 = LayerScale(dim, scale_init) if scaled else nn.Identity()

    def forward(self, x: Tensor, rope: Rope) -> Tensor:
        x = x + self.cpe1(x)
        mixed = self.token_mixer(self.norm1(x), rope)
        if self.res_scale:
            x = self.layer_scale1(x) + self.drop_path(mixed)
        else:
            x = x + self.drop_path(self.layer_scale1(mixed))
        x = x + self.cpe2(x)
        mlp = self.mlp(self.norm2(x))
        if self.res_scale:
            return self.layer_scale2(x) + self.drop_path(mlp)
        return x + self.drop_path(self.layer_scale2(mlp))


class PaperA2MambaBlock(nn.Module):
    """Block as the paper's text describes it (section 3.2): residual 3x3 depth-wise conv,
    pre-norm :class:`PaperMASS`, pre-norm PVTv2-order ConvFFN."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        mode: str = "local",
    ) -> None:
        super().__init__()
        self.pos = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = LayerNorm2d(dim)
        self.mixer = PaperMASS(dim, num_heads, kernel_size, mode)
        self.norm2 = LayerNorm2d(dim)
        self.ffn = ConvFFN(dim, int(dim * mlp_ratio), released_order=False)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.pos(x)
        x = x + self.drop_path(self.mixer(self.norm1(x)))
        return x + self.drop_path(self.ffn(self.norm2(x)))


class A2MambaStage(nn.Module):
    """The blocks of one stage; the released variant computes its RoPE phases once per stage."""

    def __init__(self, blocks: list[nn.Module], rope: RotaryEmbedding2d | None) -> None:
        super().__init__()
        self.rope = rope
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> Tensor:
        if self.rope is None:
            for block in self.blocks:
                x = block(x)
            return x
        phases = self.rope(*x.shape[-2:])
        for block in self.blocks:
            x = block(x, phases)
        return x


def _conv_bn(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout)]


def released_stem(in_channels: int, dim: int) -> nn.Sequential:
    """Four 3x3 conv-BN (strides 2, 1, 2, 1) with GELU between: to 1/4 at ``dim`` channels."""
    half = dim // 2
    return nn.Sequential(
        *_conv_bn(in_channels, half, 2), nn.GELU(), *_conv_bn(half, half, 1), nn.GELU(),
        *_conv_bn(half, dim, 2), nn.GELU(), *_conv_bn(dim, dim, 1),
    )


def paper_stem(in_channels: int, dim: int) -> nn.Sequential:
    """Two stride-2 3x3 conv-BN with GELU between (the paper gives no stem details)."""
    return nn.Sequential(*_conv_bn(in_channels, dim // 2, 2), nn.GELU(), *_conv_bn(dim // 2, dim, 2))


class A2Mamba(nn.Module):
    """Four-stage A2Mamba feature extractor: (B, in_channels, H, W) -> 4 maps at 1/4 ... 1/32.

    ``patch_embed`` is the stem; ``layers`` alternates stages and 3x3/2 conv-BN downsamplings
    (``layers.0`` stage 1, ``layers.1`` its downsampling, ... ``layers.6`` stage 4), the released
    model's layout, so that its state dict keys are the official checkpoints' minus the classifier.
    """

    def __init__(
        self,
        size: A2MambaSize,
        in_channels: int = 3,
        drop_path_rate: float = 0.0,
        variant: str = "released",
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"A2Mamba variant must be one of {VARIANTS}, got {variant!r}")
        dims = size.dims
        self.dims, self.variant = dims, variant
        released = variant == "released"
        self.patch_embed = (released_stem if released else paper_stem)(in_channels, dims[0])
        total = sum(size.depths)
        rates = [drop_path_rate * i / max(1, total - 1) for i in range(total)]  # linear decay rule
        self.layers = nn.ModuleList()
        first = 0
        for i in range(4):
            blocks: list[nn.Module] = []
            for j in range(size.depths[i]):
                args = (dims[i], size.heads[i], size.windows[i], size.mlp_ratios[i], rates[first + j])
                if released:
                    blocks.append(
                        A2MambaBlock(
                            *args, global_attention=i == 3, layer_scale=size.layer_scale[i],
                            res_scale=size.res_scale[i], scale_init=size.scale_init[i],
                        )
                    )
                else:
                    blocks.append(PaperA2MambaBlock(*args))
            first += size.depths[i]
            self.layers.append(A2MambaStage(blocks, RotaryEmbedding2d(dims[i], size.heads[i]) if released else None))
            if i < 3:
                self.layers.append(nn.Sequential(*_conv_bn(dims[i], dims[i + 1], 2)))
        self.apply(init_weights)

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
            if isinstance(layer, A2MambaStage):
                features.append(x)
        return features


def init_weights(module: nn.Module) -> None:
    """Truncated-normal (std 0.02) convs/linears with zero bias, as in the authors' code (the SSM's
    bare x/dt projections, A and D keep their own initialisation)."""
    if isinstance(module, (nn.Conv2d, nn.Linear)) and not module.weight.is_meta:
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
