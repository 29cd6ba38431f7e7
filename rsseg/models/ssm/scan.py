"""Mamba's selective scan (S6) with two backends: mamba-ssm's CUDA kernel and an exact torch scan.

The recurrence, per batch ``b``, channel ``d`` and state ``n`` (``A <= 0`` in every Mamba model)::

    delta = softplus(delta + delta_bias)            (each step optional)
    h_t   = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t
    y_t   = sum_n C_t * h_t + D * u_t,   then y_t *= silu(z_t) when z is given

Shapes follow mamba-ssm: ``u, delta, z`` (b, d, l); ``A`` (d, n); ``B, C`` (b, n, l) or grouped
(b, g, n, l) where group ``k`` serves channels ``k*d/g .. (k+1)*d/g - 1``; ``D, delta_bias`` (d,).

Backend choice: the ``backend`` argument, else the environment variable ``RSSEG_SCAN_BACKEND``,
else ``auto`` (the CUDA kernel when the tensors are on a GPU and the kernel supports them, the
torch scan otherwise). mamba-ssm is imported lazily on first CUDA use, never at import time.

The torch scan is hand-written because no library offers an exact CPU selective scan. It splits
the sequence into chunks of about sqrt(length), runs the recurrence inside all chunks at once
(a Python loop over positions in a chunk, each step one fused op on every chunk), carries the
chunk-final states across chunks (a loop over chunks), then adds each chunk's entering state
decayed by ``exp(cumsum(delta * A))`` within the chunk. Every ``exp`` is of a number <= 0, so
nothing overflows, and no step divides by a cumulative decay. Long sequences are cut into
segments whose working set fits a fixed memory budget; when gradients are needed, each segment
is checkpointed so backward memory stays proportional to one segment.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from rsseg.errors import UsageError, unknown_name

BACKENDS = ("auto", "torch", "cuda")
ENV_VAR = "RSSEG_SCAN_BACKEND"

# Sizes of the torch scan's work units, in elements of one (batch, channel, state, position)
# tensor. A segment's tensors (~1 MB each in float32) stay in the CPU cache, which on the
# project machines makes every elementwise pass several times faster than on tensors spanning the
# whole sequence. When gradients are needed, consecutive segments are grouped and each group of
# ~64 MB per tensor is checkpointed, so backward memory stays bounded by one group.
SEGMENT_ELEMENTS = 1 << 18
GROUP_ELEMENTS = 1 << 24

# mamba-ssm's kernel: which input dtypes and state sizes it accepts (csrc/selective_scan).
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_KERNEL_MAX_STATE = 256

_kernel: Callable[..., Any] | None = None
_kernel_error: str | None = None


# --------------------------------------------------------------------------------------------
# Backend selection
# --------------------------------------------------------------------------------------------


def _load_kernel() -> Callable[..., Any] | None:
    """mamba-ssm's ``selective_scan_fn``, imported on first use; None (and the reason) if absent."""
    global _kernel, _kernel_error
    if _kernel is None and _kernel_error is None:
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        except Exception as exc:  # ImportError, or an OSError from a CUDA library mismatch
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            _kernel_error = f"mamba-ssm cannot be imported ({first_line})"
        else:
            _kernel = selective_scan_fn
    return _kernel


def requested_backend(backend: str | None = None) -> str:
    """The backend name asked for: ``backend`` if given, else ``$RSSEG_SCAN_BACKEND``, else auto."""
    name = backend if backend is not None else os.environ.get(ENV_VAR, "").strip() or "auto"
    name = name.lower()
    if name not in BACKENDS:
        source = "backend" if backend is not None else ENV_VAR
        raise unknown_name(f"scan backend (from {source})", name, BACKENDS)
    return name


def kernel_unsupported_reason(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, z: Tensor | None = None
) -> str | None:
    """Why mamba-ssm's kernel cannot run on these inputs, or None when it can."""
    if u.device.type != "cuda":
        return f"the inputs are on {u.device.type}, not on a CUDA device"
    if u.dtype not in _KERNEL_DTYPES:
        return f"mamba-ssm's kernel takes float32/float16/bfloat16 inputs, not {u.dtype}"
    for name, t in (("delta", delta), ("B", B), ("C", C), ("z", z)):
        if t is not None and t.dtype != u.dtype:
            return f"mamba-ssm's kernel needs {name} in u's dtype {u.dtype}, got {t.dtype}"
    if A.is_complex():
        return "complex A is not supported by rsseg's scan"
    if A.shape[1] > _KERNEL_MAX_STATE:
        return f"mamba-ssm's kernel takes d_state <= {_KERNEL_MAX_STATE}, got {A.shape[1]}"
    if _load_kernel() is None:
        return f"{_kernel_error}; install it with `pip install rsseg[cuda]` on a CUDA machine"
    return None


def resolve_backend(
    backend: str | None, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
    z: Tensor | None = None,
) -> str:
    """``torch`` or ``cuda`` for these inputs; asking for ``cuda`` where it cannot run is a UsageError."""
    name = requested_backend(backend)
    if name == "torch":
        return "torch"
    reason = kernel_unsupported_reason(u, delta, A, B, C, z)
    if name == "cuda" and reason is not None:
        raise UsageError(f"scan backend 'cuda' cannot run: {reason}")
    return "torch" if reason is not None else "cuda"


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan with mamba-ssm's ``selective_scan_fn`` semantics (see the module docstring).

    Returns ``y`` (b, d, l) in ``u``'s dtype, and with ``return_last_state`` also the final hidden
    state (b, d, n) in float32 (float64 for float64 inputs), as mamba-ssm does.
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    if resolve_backend(backend, u, delta, A, B, C, z) == "cuda":
        kernel = _load_kernel()
        assert kernel is not None
        out = kernel(
            u, delta, A.float(), B, C,
            None if D is None else D.float(), z,
            None if delta_bias is None else delta_bias.float(),
            delta_softplus, return_last_state,
        )
        return out
    y, last = _torch_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, want_states=False)
    return (y, last) if return_last_state else y


def selective_scan_states(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """The whole hidden-state sequence ``h`` (b, d, n, l) of the scan, exactly, for any ``n``.

    Always the torch scan (mamba-ssm's kernel does not expose its states); computed in float32
    (float64 for float64 inputs) and returned in ``u``'s dtype.
    """
    _check_shapes(u, delta, A, B, None, None, None, delta_bias)
    h, _ = _torch_scan(u, delta, A, B, None, None, None, delta_bias, delta_softplus, want_states=True)
    return h


# --------------------------------------------------------------------------------------------
# Torch backend
# --------------------------------------------------------------------------------------------


def _check_shapes(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor | None,
    D: Tensor | None, z: Tensor | None, delta_bias: Tensor | None,
) -> None:
    """Shape mistakes are programming errors: a ValueError that names the offending input."""
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, dim, length), got shape {tuple(u.shape)}")
    b, d, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta must match u {tuple(u.shape)}, got {tuple(delta.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must match u {tuple(u.shape)}, got {tuple(z.shape)}")
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"A must be (dim={d}, d_state), got {tuple(A.shape)}")
    n = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t is None:
            continue
        if t.dim() == 3:
            ok = t.shape == (b, n, length)
        elif t.dim() == 4:
            ok = t.shape[0] == b and t.shape[2:] == (n, length) and d % t.shape[1] == 0
        else:
            ok = False
        if not ok:
            raise ValueError(
                f"{name} must be (batch, d_state, length) = {(b, n, length)} or (batch, groups, "
                f"d_state, length) with groups dividing dim={d}, got {tuple(t.shape)}"
            )
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (d,):
            raise ValueError(f"{name} must be ({d},), got {tuple(t.shape)}")


def _grouped(t: Tensor) -> Tensor:
    """(b, n, l) -> (b, 1, n, l); grouped (b, g, n, l) unchanged."""
    return t.unsqueeze(1) if t.dim() == 3 else t


def _torch_scan(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor | None,
    D: Tensor | None, z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool,
    want_states: bool,
) -> tuple[Tensor, Tensor]:
    """Exact scan in float32 (float64 for float64 inputs) with autocast off.

    Returns (y, last_state), or (states, last_state) with ``want_states``.
    """
    cdt = torch.promote_types(u.dtype, torch.float32)
    with torch.autocast(device_type=u.device.type, enabled=False):
        uc = u.to(cdt)
        dt = delta.to(cdt)
        if delta_bias is not None:
            dt = dt + delta_bias.to(cdt)[:, None]
        if delta_softplus:
            dt = F.softplus(dt)
        Ac = A.to(cdt)
        Bc = _grouped(B).to(cdt)
        Cc = None if C is None else _grouped(C).to(cdt)

        b, d, length = uc.shape
        n = Ac.shape[1]
        seg = _even_split(length, max(1, SEGMENT_ELEMENTS // max(1, b * d * n)))
        group = _even_split(length, max(seg, (GROUP_ELEMENTS // max(1, b * d * n)) // seg * seg))
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (u, delta, A, B, C, delta_bias)
        )
        use_checkpoint = needs_grad and group < length

        # torch.split, never slicing: slice backward writes each piece's gradient into a zero
        # tensor of the whole length, which makes backward quadratic in the number of pieces.
        pieces: list[Tensor] = []
        h: Tensor | None = None
        for u_g, dt_g, B_g, C_g in zip(*_split_all((uc, dt, Bc, Cc), group)):
            if use_checkpoint:
                piece, h = checkpoint(_scan_group, u_g, dt_g, Ac, B_g, C_g, h, seg, use_reentrant=False)
            else:
                piece, h = _scan_group(u_g, dt_g, Ac, B_g, C_g, h, seg)
            pieces.append(piece)
        assert h is not None
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)

        if want_states:
            return out.to(u.dtype), h
        if D is not None:
            out = out + D.to(cdt)[:, None] * uc
        if z is not None:
            out = out * F.silu(z.to(cdt))
        return out.to(u.dtype), h


def _even_split(length: int, size: int) -> int:
    """The piece size closest to ``size`` that cuts ``length`` into equal pieces (last one shorter)."""
    size = max(1, min(size, length))
    return math.ceil(length / math.ceil(length / size))


def _split_all(tensors: tuple[Tensor | None, ...], size: int) -> list[list[Tensor | None]]:
    """Each tensor split along its last axis into pieces of ``size`` (None stays None)."""
    count = math.ceil(tensors[0].shape[-1] / size)  # type: ignore[union-attr]
    return [[None] * count if t is None else list(torch.split(t, size, dim=-1)) for t in tensors]


def _scan_group(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor | None, h0: Tensor | None, seg: int
) -> tuple[Tensor, Tensor]:
    """Scan consecutive segments of ``seg`` positions, each starting from the last one's state."""
    pieces = []
    h = h0
    for u_s, delta_s, B_s, C_s in zip(*_split_all((u, delta, B, C), seg)):
        piece, h = _scan_segment(u_s, delta_s, A, B_s, C_s, h)
        pieces.append(piece)
    assert h is not None
    return (pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)), h


def _scan_segment(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor | None, h0: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Scan one segment from state ``h0`` (b, d, n) (zero when None).

    ``u, delta`` (b, d, s) with delta final (bias and softplus applied); ``B, C`` (b, g, n, s).
    Returns (y (b, d, s), or the states (b, d, n, s) when C is None) and the final state.
    """
    b, d, s = u.shape
    g, n = B.shape[1], B.shape[2]
    dg = d // g
    chunk = max(1, round(math.sqrt(s)))
    n_chunks = math.ceil(s / chunk)
    pad = n_chunks * chunk - s
    if pad:
        # delta = 0 past the end: decay 1 and input 0, so the final state is carried unchanged.
        u, delta, B = (F.pad(t, (0, pad)) for t in (u, delta, B))
        C = None if C is None else F.pad(C, (0, pad))

    # Layout (chunk position, b, d, n, chunk index): every step of the loop below reads and
    # writes contiguous slices, and one op advances all chunks at once.
    def position_major(t: Tensor) -> Tensor:  # (..., n_chunks * chunk) -> (chunk, ..., n_chunks)
        t = t.reshape(*t.shape[:-1], n_chunks, chunk)
        return t.permute(t.dim() - 1, *range(t.dim() - 2), t.dim() - 2).contiguous()

    delta_p = position_major(delta)  # (T, b, d, nc)
    du_p = position_major(delta * u)  # (T, b, d, nc)
    B_p = position_major(B)  # (T, b, g, n, nc)
    log_decay = delta_p.unsqueeze(3) * A[:, :, None]  # (T, b, d, n, nc), <= 0 for A <= 0
    decay = torch.exp(log_decay)
    inp = (du_p.view(chunk, b, g, dg, 1, n_chunks) * B_p.unsqueeze(3)).view(chunk, b, d, n, n_chunks)

    # Recurrence inside every chunk at once, each chunk starting from a zero state.
    decay_t, inp_t = decay.unbind(0), inp.unbind(0)
    states = [inp_t[0]]
    for t in range(1, chunk):
        states.append(torch.addcmul(inp_t[t], decay_t[t], states[-1]))
    local = torch.stack(states)  # (T, b, d, n, nc)

    # Carry the true state across chunks: entering(c+1) = decay over chunk c * entering(c) + local end.
    decay_in = torch.exp(torch.cumsum(log_decay, dim=0))  # decay from each chunk's start, <= 1
    chunk_decay, chunk_end = decay_in[-1].unbind(-1), states[-1].unbind(-1)
    h = h0 if h0 is not None else torch.zeros_like(chunk_end[0])
    entering = []
    for c in range(n_chunks):
        entering.append(h)
        h = torch.addcmul(chunk_end[c], chunk_decay[c], h)
    full = torch.addcmul(local, decay_in, torch.stack(entering, dim=-1))  # (T, b, d, n, nc)

    if C is None:  # the states themselves: (T, b, d, n, nc) -> (b, d, n, s)
        states_out = full.permute(1, 2, 3, 4, 0).reshape(b, d, n, n_chunks * chunk)
        return states_out[..., :s], h
    C_p = position_major(C)  # (T, b, g, n, nc)
    y = (full.view(chunk, b, g, dg, n, n_chunks) * C_p.unsqueeze(3)).sum(dim=4)  # (T, b, g, dg, nc)
    y = y.reshape(chunk, b, d, n_chunks).permute(1, 2, 3, 0).reshape(b, d, n_chunks * chunk)
    return y[..., :s], h
