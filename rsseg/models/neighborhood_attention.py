"""2D neighbourhood attention (sliding and dilated local attention) in plain PyTorch.

Hand-written because natten >= 0.20 dropped its 2D ``qk``/``av`` calls and CPU kernels, and no
other maintained library implements natten's window rule. Used by A2Mamba (SegMAN-V2) for its
sliding local attention (SLA, dilation 1) and dilated local attention (DLA).

Window rule (natten's, per axis, for length L, kernel K, dilation d, query i):
``g = i mod d``; ``Lg = ceil((L - g) / d)``; ``start = g + d * clamp(i // d - K // 2, 0, Lg - K)``;
the neighbours are ``start + d * k`` for ``k < K``. Every query therefore sees exactly K x K keys,
shifted inwards at the borders instead of padded. natten requires ``L >= K * d``; here a shorter
axis is treated as if padded at its end up to ``K * d`` with keys that are masked out, so a query
attends to the real positions of its (partly virtual) window only. On an axis shorter than K this
is full attention along that axis.

Relative position bias: index ``(neighbour // d - i // d) + K - 1`` per axis, i.e. the offset in
window steps, into a table of shape (heads, 2K-1, 2K-1), as in natten.

Speed and memory: the K x K window offsets are visited one at a time. For a column offset the
keys are gathered once along the width (index tables computed once per (L, K, d) and cached);
each row offset is then a gather of whole rows, which is close to a plain copy. Every temporary
has the size of the input, never K*K times it, and the hand-written backward passes re-gather
instead of saving anything but the inputs.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

@lru_cache(maxsize=256)
def _axis_tables(length: int, kernel: int, dilation: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-axis neighbour table for natten's rule: (index, valid, bias index), each (length, K).

    ``index`` is clamped into ``[0, length)`` where the neighbour is virtual (``valid`` False) so
    that it can always be gathered; such keys are masked out of the softmax.
    """
    with torch.inference_mode(False):  # cached, and saved for backward by training steps
        virtual_length = max(length, kernel * dilation)
        i = torch.arange(length)
        group = i % dilation
        group_length = (virtual_length - group + dilation - 1) // dilation  # ceil
        pos_in_group = i // dilation
        start = torch.minimum(
            torch.clamp(pos_in_group - kernel // 2, min=0), group_length - kernel
        )  # (L,)
        steps = start[:, None] + torch.arange(kernel)[None, :]  # window position in group units
        neighbour = group[:, None] + dilation * steps
        valid = neighbour < length
        index = neighbour.clamp(max=length - 1)
        bias_index = steps - pos_in_group[:, None] + kernel - 1
        return index, valid, bias_index


def neighbourhood_tables(
    height: int, width: int, kernel: int, dilation: tuple[int, int], device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Row and column tables ``(idx_r, valid_r, bias_r, idx_c, valid_c, bias_c)`` on ``device``."""
    return _device_tables(height, width, kernel, tuple(dilation), str(device))


@lru_cache(maxsize=256)
def _device_tables(
    height: int, width: int, kernel: int, dilation: tuple[int, int], device: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    # cached per device so that a GPU forward does not copy the tables every call
    # Built outside inference mode: the cached tables are saved for backward by training steps,
    # which an inference tensor (cached by an earlier prediction) cannot be.
    with torch.inference_mode(False):
        rows = _axis_tables(height, kernel, dilation[0])
        cols = _axis_tables(width, kernel, dilation[1])
        return tuple(t.to(device) for t in (*rows, *cols))  # type: ignore[return-value]


class _NeighbourQK(torch.autograd.Function):
    """logits[b, n, i, j, m] = q[b, n, i, j] . k[b, n, neighbour_m(i, j)] (no scaling, no bias)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, idx_r: Tensor, idx_c: Tensor) -> Tensor:  # type: ignore[override]
        kernel = idx_r.shape[1]
        # offset-major buffers (offset first) keep every per-offset slice contiguous
        out = q.new_empty(kernel * kernel, *q.shape[:-1])
        for kj in range(kernel):
            cols = k.index_select(3, idx_c[:, kj])
            for ki in range(kernel):
                torch.linalg.vecdot(q, cols.index_select(2, idx_r[:, ki]), out=out[ki * kernel + kj])
        ctx.save_for_backward(q, k, idx_r, idx_c)
        return out.movedim(0, -1).contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        q, k, idx_r, idx_c = ctx.saved_tensors
        kernel = idx_r.shape[1]
        grad = grad.movedim(-1, 0).contiguous()
        grad_q = torch.zeros_like(q) if ctx.needs_input_grad[0] else None
        grad_k = torch.zeros_like(k) if ctx.needs_input_grad[1] else None
        for kj in range(kernel):
            cols = k.index_select(3, idx_c[:, kj]) if grad_q is not None else None
            grad_cols = torch.zeros_like(k) if grad_k is not None else None
            for ki in range(kernel):
                g = grad[ki * kernel + kj, ..., None]
                if cols is not None:
                    grad_q.addcmul_(g, cols.index_select(2, idx_r[:, ki]))  # type: ignore[union-attr]
                if grad_cols is not None:
                    grad_cols.index_add_(2, idx_r[:, ki], g * q)
            if grad_k is not None:
                grad_k.index_add_(3, idx_c[:, kj], grad_cols)
        return grad_q, grad_k, None, None


class _NeighbourAV(torch.autograd.Function):
    """out[b, n, i, j] = sum_m attn[b, n, i, j, m] * v[b, n, neighbour_m(i, j)]."""

    @staticmethod
    def forward(ctx, attn: Tensor, v: Tensor, idx_r: Tensor, idx_c: Tensor) -> Tensor:  # type: ignore[override]
        kernel = idx_r.shape[1]
        out = torch.zeros_like(v)
        weights = attn.movedim(-1, 0).contiguous()  # offset-major: contiguous per-offset slices
        for kj in range(kernel):
            cols = v.index_select(3, idx_c[:, kj])
            for ki in range(kernel):
                out.addcmul_(weights[ki * kernel + kj, ..., None], cols.index_select(2, idx_r[:, ki]))
        ctx.save_for_backward(attn, v, idx_r, idx_c)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        attn, v, idx_r, idx_c = ctx.saved_tensors
        kernel = idx_r.shape[1]
        weights = attn.movedim(-1, 0).contiguous()
        grad_attn = weights.new_empty(weights.shape) if ctx.needs_input_grad[0] else None
        grad_v = torch.zeros_like(v) if ctx.needs_input_grad[1] else None
        for kj in range(kernel):
            cols = v.index_select(3, idx_c[:, kj]) if grad_attn is not None else None
            grad_cols = torch.zeros_like(v) if grad_v is not None else None
            for ki in range(kernel):
                m = ki * kernel + kj
                if cols is not None:
                    neighbours = cols.index_select(2, idx_r[:, ki])
                    torch.linalg.vecdot(grad, neighbours, out=grad_attn[m])  # type: ignore[index]
                if grad_cols is not None:
                    grad_cols.index_add_(2, idx_r[:, ki], weights[m, ..., None] * grad)
            if grad_v is not None:
                grad_v.index_add_(3, idx_c[:, kj], grad_cols)
        if grad_attn is not None:
            grad_attn = grad_attn.movedim(0, -1)
        return grad_attn, grad_v, None, None


def adaptive_dilation(
    height: int, width: int, kernel: int, max_dilation: int | None = None
) -> tuple[int, int]:
    """A2Mamba eq. 1: ``r = (int(H / K), int(W / K))``, at least 1 on each axis.

    ``max_dilation``: upper bound per axis; the authors' released model caps ``r`` at ``K``
    (``min(H // K, K)``), which only matters once a side reaches ``K * (K + 1)``.
    """
    rows, cols = max(1, height // kernel), max(1, width // kernel)
    if max_dilation is not None:
        rows, cols = min(rows, max_dilation), min(cols, max_dilation)
    return rows, cols


def _common_dtype(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Both in their promoted dtype: the hand-written backwards write into buffers of one
    input's dtype, which fails under autocast (float32 softmax weights, bfloat16 values)."""
    dtype = torch.promote_types(a.dtype, b.dtype)
    return a.to(dtype), b.to(dtype)


def neighbourhood_attention_map(
    q: Tensor,
    k: Tensor,
    kernel: int,
    dilation: tuple[int, int] = (1, 1),
    rpb: Tensor | None = None,
) -> Tensor:
    """Softmax attention over each query's K x K neighbourhood.

    ``q``, ``k``: (B, heads, H, W, head_dim), ``q`` already scaled. ``rpb``: (heads, 2K-1, 2K-1)
    or None. Returns the attention map (B, heads, H, W, K*K), neighbours in row-major window
    order, zero weight on masked (virtual) neighbours.
    """
    _, _, h, w, _ = q.shape
    idx_r, valid_r, bias_r, idx_c, valid_c, bias_c = neighbourhood_tables(h, w, kernel, dilation, q.device)
    q, k = _common_dtype(q, k)
    logits = _NeighbourQK.apply(q, k, idx_r, idx_c)
    if rpb is not None:
        # bias[n, i, j, ki, kj] = rpb[n, bias_r[i, ki], bias_c[j, kj]]
        bias = rpb[:, bias_r[:, None, :, None], bias_c[None, :, None, :]]
        logits = logits + bias.reshape(1, rpb.shape[0], h, w, kernel * kernel)
    if not (bool(valid_r.all()) and bool(valid_c.all())):
        valid = (valid_r[:, None, :, None] & valid_c[None, :, None, :]).reshape(h, w, kernel * kernel)
        logits = logits.masked_fill(~valid, float("-inf"))
    return torch.softmax(logits, dim=-1)


def neighbourhood_aggregate(attn: Tensor, v: Tensor, kernel: int, dilation: tuple[int, int] = (1, 1)) -> Tensor:
    """Weighted sum of each query's K x K neighbours of ``v`` (B, heads, H, W, C) with ``attn``.

    ``attn`` is (B, heads, H, W, K*K) as returned by :func:`neighbourhood_attention_map`; the same
    map can aggregate any tensor laid out on the same grid (A2Mamba re-uses it on SSM states).
    """
    _, _, h, w, _ = v.shape
    idx_r, _, _, idx_c, _, _ = neighbourhood_tables(h, w, kernel, dilation, v.device)
    attn, v = _common_dtype(attn, v)
    return _NeighbourAV.apply(attn, v, idx_r, idx_c)


def self_index(height: int, width: int, kernel: int, dilation: tuple[int, int]) -> Tensor:
    """Position of each query inside its own window, (H, W) in ``[0, K*K)``: a one-hot map at
    this index makes :func:`neighbourhood_aggregate` the identity (used in tests)."""
    idx_r, _, _ = _axis_tables(height, kernel, dilation[0])
    idx_c, _, _ = _axis_tables(width, kernel, dilation[1])
    pos_r = (idx_r == torch.arange(height)[:, None]).float().argmax(1)
    pos_c = (idx_c == torch.arange(width)[:, None]).float().argmax(1)
    return pos_r[:, None] * kernel + pos_c[None, :]


def neighbourhood_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kernel: int,
    dilation: tuple[int, int] = (1, 1),
    rpb: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Neighbourhood attention; returns ``(output (B, heads, H, W, C), attention map)``."""
    attn = neighbourhood_attention_map(q, k, kernel, dilation, rpb)
    return neighbourhood_aggregate(attn, v, kernel, dilation), attn
