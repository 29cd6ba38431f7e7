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
On a GPU without mamba-ssm, ``auto`` uses the Triton kernel of :mod:`.triton_scan` (``triton``).

The torch scan is hand-written because no library offers an exact CPU selective scan. It splits
the sequence into chunks of about sqrt(length), runs the recurrence inside all chunks at once
(a Python loop over positions in a chunk, each step one fused op on every chunk), carries the
chunk-final states across chunks (a loop over chunks), then adds each chunk's entering state
decayed by the running product of the step decays ``exp(delta * A)`` within the chunk. Every
``exp`` is of a number <= 0 and every product of numbers in [0, 1], so nothing overflows, and no
step divides by a cumulative decay. Long sequences are cut into
cache-sized segments, each starting from the previous one's final state. Backward is written by
hand (:class:`_ScanFunction`): it keeps only the inputs and each segment's entering state, and
recomputes one segment at a time, so its memory does not grow with the autograd graph.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from rsseg.errors import UsageError, unknown_name

BACKENDS = ("auto", "torch", "cuda", "triton", "fused")
ENV_VAR = "RSSEG_SCAN_BACKEND"

# Sizes of the torch scan's work units, in elements of one (batch, channel, state, position)
# tensor. A segment's tensors (~4 MB each in float32) stay in the CPU caches, which on the
# project machines makes every elementwise pass several times faster than on tensors spanning the
# whole sequence.
SEGMENT_ELEMENTS = 1 << 20
# On a GPU the cost is kernel launches, not cache misses: far longer segments (~64 MB tensors).
SEGMENT_ELEMENTS_GPU = 1 << 24
MIN_SEGMENT = 128  # shorter segments save little cache and cost many (thread-synchronised) ops

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
    """``torch``, ``cuda`` or ``triton`` for these inputs; asking for a backend where it cannot run
    is a UsageError. ``auto``: on CUDA tensors mamba-ssm's kernel, else the Triton kernel, else the
    torch scan; on CPU tensors the fused numba scan (``fused``, float32/half inputs) where numba
    is importable, else the torch scan."""
    name = requested_backend(backend)
    if name == "torch":
        return "torch"
    if name == "fused" or (name == "auto" and u.device.type == "cpu"):
        if _fused_choice(name, u, A, strict=True) == "fused":
            return "fused"
    if name == "triton":
        triton_reason = triton_unsupported_reason(u, delta, A, B, C, z)
        if triton_reason is not None:
            raise UsageError(f"scan backend 'triton' cannot run: {triton_reason}")
        return "triton"
    reason = kernel_unsupported_reason(u, delta, A, B, C, z)
    if name == "cuda" and reason is not None:
        raise UsageError(f"scan backend 'cuda' cannot run: {reason}")
    if reason is None:
        return "cuda"
    # auto without mamba-ssm: Triton on GPUs only (on CPU its interpreter is for tests, not speed).
    if u.device.type == "cuda" and triton_unsupported_reason(u, delta, A, B, C, z) is None:
        return "triton"
    return "torch"


def triton_unsupported_reason(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, z: Tensor | None = None
) -> str | None:
    """Why the Triton kernel cannot run on these inputs, or None; triton is imported only here."""
    from rsseg.models.ssm import triton_scan

    return triton_scan.triton_unsupported_reason(u, delta, A, B, C, z)


def _fused_choice(name: str, u: Tensor, A: Tensor, strict: bool) -> str | None:
    """``fused`` where the fused CPU scan (:mod:`.cpu_scan`, numba) runs for ``name``, else None.

    ``auto`` takes it for CPU inputs other than float64 (float64 stays on the torch scan, the
    reference). Asking for ``fused`` where it cannot run is a UsageError when ``strict``.
    """
    from rsseg.models.ssm import cpu_scan  # imports numba: on first CPU use only

    reason = cpu_scan.unsupported_reason(u, A)
    if name == "fused":
        if reason is not None and strict:
            raise UsageError(f"scan backend 'fused' cannot run: {reason}")
        return "fused" if reason is None else None
    return "fused" if reason is None and u.dtype != torch.float64 else None


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


# torch.compile never traces into the scan: every backend is a hand-written kernel or an
# autograd.Function with Python loops (numba, mamba-ssm, Triton, the chunked torch scan) that
# inductor cannot improve, and tracing the numba dispatcher crashes dynamo. One graph break per
# call; the model around it still compiles (docs/gpu.md).
_NOT_TRACED = "rsseg's selective scan runs its own kernels"


@torch.compiler.disable(reason=_NOT_TRACED)
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
    chosen = resolve_backend(backend, u, delta, A, B, C, z)
    if chosen == "triton":
        from rsseg.models.ssm.triton_scan import triton_selective_scan

        y, last = triton_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        return (y, last) if return_last_state else y
    if chosen == "fused":
        from rsseg.models.ssm.cpu_scan import fused_scan

        y, last = fused_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        return (y, last) if return_last_state else y
    if chosen == "cuda":
        kernel = _load_kernel()
        assert kernel is not None
        out = kernel(
            u, delta, A.float(), B, C,
            None if D is None else D.float(), z,
            None if delta_bias is None else delta_bias.float(),
            delta_softplus, return_last_state,
        )
        return out
    y, last = _torch_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return (y, last) if return_last_state else y


@torch.compiler.disable(reason=_NOT_TRACED)
def selective_scan_states(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """The whole hidden-state sequence ``h`` (b, d, n, l) of the scan, exactly, for any ``n``.

    The fused CPU scan where ``auto``/``fused`` can use it, else the torch scan (mamba-ssm's
    kernel does not expose its states); computed in float32 (float64 for float64 inputs) and
    returned in ``u``'s dtype.
    """
    _check_shapes(u, delta, A, B, None, None, None, delta_bias)
    name = requested_backend()
    if name in ("auto", "fused") and u.device.type == "cpu" and _fused_choice(name, u, A, strict=False):
        from rsseg.models.ssm.cpu_scan import fused_scan

        return fused_scan(u, delta, A, B, None, None, None, delta_bias, delta_softplus)[0]
    h, _ = _torch_scan(u, delta, A, B, None, None, None, delta_bias, delta_softplus)
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


def scan_elementwise(
    core: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor | None], tuple[Tensor, Tensor]],
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor | None,
    D: Tensor | None, z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool,
) -> tuple[Tensor, Tensor]:
    """The parts every exact backend shares, around ``core`` (the recurrence): compute in float32
    (float64 for float64 inputs) with autocast off, delta bias + softplus, B and C in the grouped
    layout, then the D skip and the SiLU(z) gate on the output; torch ops under autograd.

    ``core(u, delta, A, B, C)`` returns (y, last state), or (states, last state) when C is None;
    the result comes back in ``u``'s dtype, the last state in the compute dtype.
    """
    cdt = torch.promote_types(u.dtype, torch.float32)
    with torch.autocast(device_type=u.device.type, enabled=False):
        uc = u.to(cdt)
        dt = delta.to(cdt)
        if delta_bias is not None:
            dt = dt + delta_bias.to(cdt)[:, None]
        if delta_softplus:
            dt = F.softplus(dt)
        Cc = None if C is None else _grouped(C).to(cdt)
        out, last = core(uc, dt, A.to(cdt), _grouped(B).to(cdt), Cc)
        if C is not None:
            if D is not None:
                out = out + D.to(cdt)[:, None] * uc
            if z is not None:
                out = out * F.silu(z.to(cdt))
        return out.to(u.dtype), last


def _torch_core(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor | None) -> tuple[Tensor, Tensor]:
    b, d, length = u.shape
    seg = _segment_length(length, b * d * A.shape[1], u.device.type)
    return _ScanFunction.apply(u, delta, A, B, C, seg)


def _torch_scan(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor | None,
    D: Tensor | None, z: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool,
) -> tuple[Tensor, Tensor]:
    """Exact scan in float32 (float64 for float64 inputs) with autocast off.

    Returns (y, last_state), or (states, last_state) when C is None.
    """
    return scan_elementwise(_torch_core, u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def _segment_length(length: int, states_per_position: int, device_type: str = "cpu") -> int:
    """Cache-sized segment length (at least MIN_SEGMENT), cutting ``length`` into equal pieces."""
    budget = SEGMENT_ELEMENTS if device_type == "cpu" else SEGMENT_ELEMENTS_GPU
    size = max(MIN_SEGMENT, budget // max(1, states_per_position))
    size = max(1, min(size, length))
    return math.ceil(length / math.ceil(length / size))


def _split(t: Tensor, size: int) -> tuple[Tensor, ...]:
    # torch.split, never slicing: a slice's backward writes its gradient into a zero tensor of the
    # whole length, which would make backward quadratic in the number of segments.
    return torch.split(t, size, dim=-1)


class _Layout:
    """Position-major layout of one segment: (..., s) -> (T, ..., nc), T * nc >= s.

    Position ``c * T + t`` of the (zero-padded) segment sits at ``[t, ..., c]``: every step of the
    loop over ``t`` reads and writes contiguous slices, and one op advances all chunks at once.
    """

    def __init__(self, length: int) -> None:
        self.length = length
        self.chunk = max(1, round(math.sqrt(length)))
        self.n_chunks = math.ceil(length / self.chunk)
        self.pad = self.n_chunks * self.chunk - length

    def to_pm(self, t: Tensor) -> Tensor:
        if self.pad:  # zeros past the end: delta = 0 there, so the state is carried unchanged
            t = F.pad(t, (0, self.pad))
        t = t.reshape(*t.shape[:-1], self.n_chunks, self.chunk)
        return t.permute(t.dim() - 1, *range(t.dim() - 2), t.dim() - 2).contiguous()

    def from_pm(self, t: Tensor) -> Tensor:
        t = t.permute(*range(1, t.dim()), 0)  # (..., nc, T)
        return t.reshape(*t.shape[:-2], self.n_chunks * self.chunk)[..., : self.length]


def _chunked_states(decay: Tensor, inp: Tensor, h0: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """All states of ``h_t = decay_t * h_{t-1} + inp_t`` in position-major layout.

    ``decay, inp``: (T, b, d, n, nc), ``decay = exp(log_decay)`` with ``log_decay <= 0``, so in
    [0, 1]; ``h0`` (b, d, n) or None (zero).
    Returns the states (T, b, d, n, nc), the state entering each chunk (b, d, n, nc) and the
    final state (b, d, n).
    """
    # 1. The recurrence inside every chunk at once, each chunk from a zero state, and the decay
    #    from each chunk's start as a running product (factors in (0, 1]: no overflow; a loop
    #    because torch's cumsum/cumprod over a leading dimension is several times slower here).
    #    Results go straight into preallocated tensors, so no stacking copy follows.
    local = torch.empty_like(inp)
    decay_in = torch.empty_like(decay)
    local[0], decay_in[0] = inp[0], decay[0]
    for t in range(1, inp.shape[0]):
        torch.addcmul(inp[t], decay[t], local[t - 1], out=local[t])
        torch.mul(decay_in[t - 1], decay[t], out=decay_in[t])
    # 2. Carry true states across chunks: entering(c+1) = decay over chunk c * entering(c) + local end.
    chunk_decay, chunk_end = decay_in[-1].unbind(-1), local[-1].unbind(-1)
    h = h0 if h0 is not None else torch.zeros_like(chunk_end[0])
    entering = []
    for c in range(len(chunk_end)):
        entering.append(h)
        h = torch.addcmul(chunk_end[c], chunk_decay[c], h)
    entering_t = torch.stack(entering, dim=-1)
    # 3. Fix-up: add each chunk's entering state, decayed to every position of the chunk.
    return local.addcmul_(decay_in, entering_t), entering_t, h


def _drive(lay: _Layout, du: Tensor, B: Tensor) -> Tensor:
    """delta * u (b, d, s) times grouped B (b, g, n, s) -> (T, b, d, n, nc) in layout ``lay``."""
    b, d, _ = du.shape
    g, n = B.shape[1], B.shape[2]
    du_p, B_p = lay.to_pm(du), lay.to_pm(B)
    T, nc = lay.chunk, lay.n_chunks
    return (du_p.view(T, b, g, d // g, 1, nc) * B_p.unsqueeze(3)).view(T, b, d, n, nc)


def _contract(states: Tensor, C_p: Tensor) -> Tensor:
    """sum_n C * h: (T, b, d, n, nc) with grouped C (T, b, g, n, nc) -> (T, b, d, nc)."""
    T, b, d, n, nc = states.shape
    g = C_p.shape[2]
    return (states.view(T, b, g, d // g, n, nc) * C_p.unsqueeze(3)).sum(4).view(T, b, d, nc)


def _segment_forward(
    u: Tensor, dt: Tensor, A: Tensor, B: Tensor, h0: Tensor | None
) -> tuple[_Layout, Tensor, Tensor, Tensor, Tensor]:
    """(layout, decay, states, entering states, final state) of one segment."""
    lay = _Layout(u.shape[-1])
    decay = torch.exp(lay.to_pm(dt).unsqueeze(3) * A[:, :, None])  # (T, b, d, n, nc); exp of <= 0
    states, entering, last = _chunked_states(decay, _drive(lay, dt * u, B), h0)
    return lay, decay, states, entering, last


class _ScanFunction(torch.autograd.Function):
    """y = sum_n C h (before D and z), or the states h when C is None, and the last state, with a
    hand-written backward.

    Autograd through the chunked loops would keep every intermediate of the whole sequence; this
    keeps only the inputs and each segment's entering state, and in backward recomputes one
    segment at a time, then runs the adjoint recurrence ``g_t = C_t gy_t + exp(dt_{t+1} A) g_{t+1}``
    backwards in time with the same chunked scan (on the time-reversed segment).
    """

    @staticmethod
    def forward(ctx: Any, u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor | None, seg: int):
        ys, entering = [], []
        h: Tensor | None = None
        C_pieces = _split(C, seg) if C is not None else [None] * math.ceil(u.shape[-1] / seg)
        for u_s, dt_s, B_s, C_s in zip(_split(u, seg), _split(dt, seg), _split(B, seg), C_pieces):
            entering.append(h if h is not None else u.new_zeros(u.shape[0], u.shape[1], A.shape[1]))
            lay, _, states, _, h = _segment_forward(u_s, dt_s, A, B_s, h)
            ys.append(lay.from_pm(states if C_s is None else _contract(states, lay.to_pm(C_s))))
            del states
        ctx.seg = seg
        ctx.save_for_backward(u, dt, A, B, C, torch.stack(entering))
        assert h is not None
        return torch.cat(ys, dim=-1) if len(ys) > 1 else ys[0], h

    @staticmethod
    def backward(ctx: Any, gy: Tensor | None, g_last: Tensor | None):
        u, dt, A, B, C, entering = ctx.saved_tensors
        seg = ctx.seg
        if gy is None:
            gy = torch.zeros_like(u)
        b, d, _ = u.shape
        g, n = B.shape[1], B.shape[2]
        dg = d // g
        states_mode = C is None  # gy is then the gradient of the states, (b, d, n, l)
        carry = g_last  # gradient reaching the state at the end of the current segment
        grads: dict[str, list[Tensor]] = {"u": [], "dt": [], "B": [], "C": []}
        dA = torch.zeros_like(A)
        C_pieces = [None] * math.ceil(u.shape[-1] / seg) if states_mode else _split(C, seg)
        pieces = list(zip(_split(u, seg), _split(dt, seg), _split(B, seg), C_pieces, _split(gy, seg)))
        for i in range(len(pieces) - 1, -1, -1):
            u_s, dt_s, B_s, C_s, gy_s = pieces[i]
            lay, decay, states, chunk_in, _ = _segment_forward(u_s, dt_s, A, B_s, entering[i])
            T, nc = lay.chunk, lay.n_chunks
            # Adjoint g_t = dL/dh_t: in reversed time it is the forward recurrence with decay
            # exp(dt_{t+1} A) and input C_t gy_t, entered from the next segment's gradient.
            # Flipping both layout axes reverses time; the next position's dt is a shift by one.
            rev = [0, -1]
            dt_next = F.pad(dt_s[..., 1:], (0, 1))
            decay_rev = torch.exp(torch.flip(lay.to_pm(dt_next), rev).unsqueeze(3) * A[:, :, None])
            gy_p = lay.to_pm(gy_s)
            if states_mode:
                drive_rev = torch.flip(gy_p, rev)
            else:
                C_p = lay.to_pm(C_s)
                drive_rev = torch.flip(gy_p, rev).view(T, b, g, dg, 1, nc) * torch.flip(C_p, rev).unsqueeze(3)
            adj_rev, _, adj_first = _chunked_states(decay_rev, drive_rev.view(T, b, d, n, nc), carry)
            adj = torch.flip(adj_rev, rev).view(T, b, g, dg, n, nc)
            del adj_rev, drive_rev, decay_rev
            # The state before each position: the chunk's entering state, then the states shifted.
            previous = torch.cat([chunk_in.unsqueeze(0), states[:-1]], dim=0)
            d_log_decay = (adj.view(T, b, d, n, nc) * previous).mul_(decay)
            carry = adj_first * decay[0, ..., 0]  # dL/d(state entering the segment)
            dt_p = lay.to_pm(dt_s)
            du_p = lay.to_pm(dt_s * u_s)
            B_p = lay.to_pm(B_s)
            d_du = (adj * B_p.unsqueeze(3)).sum(4).view(T, b, d, nc)  # d/d(dt * u)
            d_dt = d_du * lay.to_pm(u_s) + (d_log_decay * A[:, :, None]).sum(3)
            dA += (d_log_decay * dt_p.unsqueeze(3)).sum(dim=(0, 1, 4))
            grads["u"].append(lay.from_pm(d_du * dt_p))
            grads["dt"].append(lay.from_pm(d_dt))
            grads["B"].append(lay.from_pm((adj * du_p.view(T, b, g, dg, 1, nc)).sum(3)))
            if not states_mode:
                states_g = states.view(T, b, g, dg, n, nc)
                grads["C"].append(lay.from_pm((states_g * gy_p.view(T, b, g, dg, 1, nc)).sum(3)))
        out = {k: (torch.cat(v[::-1], dim=-1) if len(v) > 1 else v[0]) if v else None for k, v in grads.items()}
        return out["u"], out["dt"], dA, out["B"], out["C"], None
