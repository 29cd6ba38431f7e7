"""Mamba's selective scan as a Triton kernel, forward and backward (the ``triton`` scan backend).

Same semantics and shapes as :func:`rsseg.models.ssm.scan.selective_scan` (mamba-ssm's
``selective_scan_fn``): ``u, delta, z`` (b, d, l); ``A`` (d, n); ``B, C`` (b, n, l) or grouped
(b, g, n, l); ``D, delta_bias`` (d,). Inputs may be float32, float16 or bfloat16; everything is
computed in float32, ``y`` is returned in ``u``'s dtype and the last state in float32.

Design (see docs/ssm.md):

- One program per (batch, group, block of ``BLOCK_D`` channels of that group). A block never
  spans two groups, so every program reads one ``B_t, C_t`` row of ``n`` values per step and can
  reduce its gradient contributions to ``dB, dC`` over its channels before one atomic add.
- Forward: a sequential loop over the positions, the (BLOCK_D x n) state in registers, float32.
  When a backward will follow, the state entering every ``CHUNK`` positions is stored
  (checkpoints, b*d*n*ceil(l/CHUNK) floats).
- Backward: chunks from the last to the first. For each chunk the states are recomputed forward
  from its checkpoint into a small per-program scratch buffer (CHUNK x BLOCK_D x n floats), then
  a reverse-time loop runs the adjoint ``g_t = C_t gy_t + exp(dt_{t+1} A) g_{t+1}`` (started from
  the gradient of the last state) and forms every gradient: du, ddelta, dz in place; dB, dC by
  atomic adds of per-program channel sums; dA, dD, ddelta_bias as per-program sums over the
  positions, written per batch and summed over the batch afterwards in torch.

The kernels are wrapped by ``triton.jit`` on first use, not at import: whether Triton compiles for
the GPU or runs its interpreter (``TRITON_INTERPRET=1``, CPU tensors) is read at that moment.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except Exception as exc:  # a CPU-only torch build ships without triton
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]
    _TRITON_ERROR: str | None = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
else:
    _TRITON_ERROR = None

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_STATE = 256  # the (BLOCK_D x n) state must fit in registers
# Positions per backward chunk: the checkpoint spacing and the scratch length. Longer chunks store
# fewer checkpoints but more scratch per program; either is small next to the inputs.
CHUNK = 64
# State elements (BLOCK_D x padded d_state) per program: enough work per step for a few warps,
# few enough that b * d / BLOCK_D programs fill the GPU. Read at each call (tests lower both).
BLOCK_ELEMENTS = 256


def interpreter_enabled() -> bool:
    """Whether Triton runs its CPU interpreter (``TRITON_INTERPRET=1``) instead of compiling."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_unsupported_reason(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, z: Tensor | None = None
) -> str | None:
    """Why the Triton kernel cannot run on these inputs, or None when it can."""
    if triton is None:
        return f"triton cannot be imported ({_TRITON_ERROR})"
    if u.device.type == "cpu":
        if not interpreter_enabled():
            return "the inputs are on cpu and the Triton interpreter is off (set TRITON_INTERPRET=1)"
    elif u.device.type != "cuda":
        return f"the inputs are on {u.device.type}, not on a CUDA device"
    for name, t in (("u", u), ("delta", delta), ("B", B), ("C", C), ("z", z)):
        if t is not None and t.dtype not in _DTYPES:
            return f"the Triton kernel takes float32/float16/bfloat16 {name}, not {t.dtype}"
    if A.is_complex():
        return "complex A is not supported by rsseg's scan"
    if A.shape[1] > MAX_STATE:
        return f"the Triton kernel takes d_state <= {MAX_STATE}, got {A.shape[1]}"
    return None


# --------------------------------------------------------------------------------------------
# Kernels (plain functions; wrapped by triton.jit in _kernels()). Helpers are written inline:
# a jitted kernel can only call other jitted functions, and these are jitted lazily.
# --------------------------------------------------------------------------------------------


def _scan_fwd(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
    out_ptr, last_ptr, ckpt_ptr,
    L, DIM, G, DG, N, n_dblocks, n_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    STORE_CKPT: tl.constexpr, CHUNK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid = tl.program_id(1)
    grp = pid // n_dblocks
    offs_g = (pid % n_dblocks) * BLOCK_D + tl.arange(0, BLOCK_D)  # channel index within the group
    mask_d = offs_g < DG
    ch = grp * DG + offs_g
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    row = (pid_b * DIM + ch).to(tl.int64) * L  # start of each channel's sequence in u, dt, z, out
    bc_row = ((pid_b * G + grp) * N + offs_n).to(tl.int64) * L  # start of each B, C row
    state_off = (pid_b * DIM + ch).to(tl.int64)[:, None] * N + offs_n[None, :]  # into (b, d, n)

    # exp(dt * A) as exp2(dt * A * log2(e)); padded rows/columns have A = 0, so decay 1 and a
    # zero drive: their state stays 0.
    A2 = tl.load(A_ptr + ch[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    A2 = A2 * 1.4426950408889634
    if HAS_D:
        Dv = tl.load(D_ptr + ch, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + ch, mask=mask_d, other=0.0).to(tl.float32)

    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for c in range(0, n_chunks):
        if STORE_CKPT:
            tl.store(ckpt_ptr + state_off * n_chunks + c, h, mask=mask_dn)
        t_end = tl.minimum(c * CHUNK_L + CHUNK_L, L)
        for t in range(c * CHUNK_L, t_end):
            dt = tl.load(dt_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
            if HAS_BIAS:
                dt = dt + bias
            if SOFTPLUS:
                # softplus(x) = log1p(exp(x)) (x <= 20, else x, as mamba-ssm), log1p written as
                # log(w) * e / (w - 1) with w = 1 + e: accurate for tiny e, where log(w) is not.
                e = tl.exp(tl.minimum(dt, 20.0))
                w = 1.0 + e
                sp = tl.where(w == 1.0, e, tl.log(w) * (e / (w - 1.0)))
                dt = tl.where(dt > 20.0, dt, sp)
            uu = tl.load(u_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
            Bt = tl.load(B_ptr + bc_row + t, mask=mask_n, other=0.0).to(tl.float32)
            Ct = tl.load(C_ptr + bc_row + t, mask=mask_n, other=0.0).to(tl.float32)
            decay = tl.exp2(dt[:, None] * A2)
            h = decay * h + (dt * uu)[:, None] * Bt[None, :]
            y = tl.sum(h * Ct[None, :], axis=1)
            if HAS_D:
                y = y + Dv * uu
            if HAS_Z:
                zz = tl.load(z_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
                y = y * (zz / (1.0 + tl.exp(-zz)))
            tl.store(out_ptr + row + t, y.to(out_ptr.dtype.element_ty), mask=mask_d)
    tl.store(last_ptr + state_off, h, mask=mask_dn)


def _scan_bwd(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr,
    dout_ptr, dlast_ptr, ckpt_ptr, scratch_ptr,
    du_ptr, ddt_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr,
    L, DIM, G, DG, N, n_dblocks, n_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    CHUNK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid = tl.program_id(1)
    grp = pid // n_dblocks
    offs_g = (pid % n_dblocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_g < DG
    ch = grp * DG + offs_g
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask_dn = mask_d[:, None] & mask_n[None, :]
    row = (pid_b * DIM + ch).to(tl.int64) * L
    bc_row = ((pid_b * G + grp) * N + offs_n).to(tl.int64) * L
    state_off = (pid_b * DIM + ch).to(tl.int64)[:, None] * N + offs_n[None, :]
    # This program's scratch: CHUNK_L slots of a (BLOCK_D, BLOCK_N) block, unmasked. Slot k holds
    # the state before position chunk_start + k.
    block = tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + offs_n[None, :]
    program = (pid_b * tl.num_programs(1) + pid).to(tl.int64)
    scratch = scratch_ptr + program * (CHUNK_L * BLOCK_D * BLOCK_N) + block

    A = tl.load(A_ptr + ch[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    A2 = A * 1.4426950408889634
    if HAS_D:
        Dv = tl.load(D_ptr + ch, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + ch, mask=mask_d, other=0.0).to(tl.float32)

    # g: dL/dh_t from later positions (already multiplied by their decay), first the last state's.
    g = tl.load(dlast_ptr + state_off, mask=mask_dn, other=0.0).to(tl.float32)
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for c_rev in range(0, n_chunks):
        c = n_chunks - 1 - c_rev
        t_start = c * CHUNK_L
        t_end = tl.minimum(t_start + CHUNK_L, L)
        # 1. Recompute the chunk's states from its checkpoint, keeping each step's entering state.
        h = tl.load(ckpt_ptr + state_off * n_chunks + c, mask=mask_dn, other=0.0)
        for t in range(t_start, t_end):
            tl.store(scratch + (t - t_start) * (BLOCK_D * BLOCK_N), h)
            dt = tl.load(dt_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
            if HAS_BIAS:
                dt = dt + bias
            if SOFTPLUS:
                e = tl.exp(tl.minimum(dt, 20.0))
                w = 1.0 + e
                sp = tl.where(w == 1.0, e, tl.log(w) * (e / (w - 1.0)))
                dt = tl.where(dt > 20.0, dt, sp)
            uu = tl.load(u_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
            Bt = tl.load(B_ptr + bc_row + t, mask=mask_n, other=0.0).to(tl.float32)
            h = tl.exp2(dt[:, None] * A2) * h + (dt * uu)[:, None] * Bt[None, :]
        tl.debug_barrier()  # the scratch writes are visible to every thread of the program
        # 2. Reverse time through the chunk.
        for k in range(0, t_end - t_start):
            t = t_end - 1 - k
            h_prev = tl.load(scratch + (t - t_start) * (BLOCK_D * BLOCK_N))
            dt_raw = tl.load(dt_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
            if HAS_BIAS:
                dt_raw = dt_raw + bias
            dt = dt_raw
            if SOFTPLUS:
                e = tl.exp(tl.minimum(dt_raw, 20.0))
                w = 1.0 + e
                sp = tl.where(w == 1.0, e, tl.log(w) * (e / (w - 1.0)))
                dt = tl.where(dt_raw > 20.0, dt_raw, sp)
            uu = tl.load(u_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
            Bt = tl.load(B_ptr + bc_row + t, mask=mask_n, other=0.0).to(tl.float32)
            Ct = tl.load(C_ptr + bc_row + t, mask=mask_n, other=0.0).to(tl.float32)
            decay = tl.exp2(dt[:, None] * A2)
            h = decay * h_prev + (dt * uu)[:, None] * Bt[None, :]
            gy = tl.load(dout_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
            if HAS_Z:
                # y = (sum_n C h + D u) * silu(z): dz needs the ungated y, recomputed here.
                y = tl.sum(h * Ct[None, :], axis=1)
                if HAS_D:
                    y = y + Dv * uu
                zz = tl.load(z_ptr + row + t, mask=mask_d, other=0.0).to(tl.float32)
                sig = 1.0 / (1.0 + tl.exp(-zz))
                dz = gy * y * sig * (1.0 + zz * (1.0 - sig))
                tl.store(dz_ptr + row + t, dz.to(dz_ptr.dtype.element_ty), mask=mask_d)
                gy = gy * zz * sig
            du = tl.zeros((BLOCK_D,), dtype=tl.float32)
            if HAS_D:
                dD_acc += gy * uu
                du = gy * Dv
            # dC_t = sum over this block's channels of gy h_t (other blocks of the group add theirs).
            tl.atomic_add(dC_ptr + bc_row + t, tl.sum(gy[:, None] * h, axis=0), mask=mask_n)
            g = g + gy[:, None] * Ct[None, :]  # now the full dL/dh_t
            g_drive = tl.sum(g * Bt[None, :], axis=1)  # dL/d(dt * u)
            du += g_drive * dt
            tl.atomic_add(dB_ptr + bc_row + t, tl.sum(g * (dt * uu)[:, None], axis=0), mask=mask_n)
            g_log_decay = g * h_prev * decay  # dL/d(dt * A)
            dA_acc += g_log_decay * dt[:, None]
            ddt = g_drive * uu + tl.sum(g_log_decay * A, axis=1)
            if SOFTPLUS:
                ddt = tl.where(dt_raw > 20.0, ddt, ddt / (1.0 + tl.exp(-dt_raw)))
            if HAS_BIAS:
                dbias_acc += ddt
            tl.store(ddt_ptr + row + t, ddt.to(ddt_ptr.dtype.element_ty), mask=mask_d)
            tl.store(du_ptr + row + t, du.to(du_ptr.dtype.element_ty), mask=mask_d)
            g = g * decay  # carried to position t - 1
        tl.debug_barrier()  # all reads of the scratch are done before the next chunk rewrites it
    tl.store(dA_ptr + state_off, dA_acc, mask=mask_dn)
    if HAS_D:
        tl.store(dD_ptr + pid_b * DIM + ch, dD_acc, mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_ptr + pid_b * DIM + ch, dbias_acc, mask=mask_d)


_KERNELS: dict[bool, tuple[Callable[..., Any], Callable[..., Any]]] = {}


def _kernels() -> tuple[Any, Any]:
    """The jitted (forward, backward) kernels, for the interpreter or the compiler as set now."""
    if triton is None:
        raise RuntimeError(f"triton cannot be imported ({_TRITON_ERROR})")
    mode = interpreter_enabled()
    if mode not in _KERNELS:
        _KERNELS[mode] = (triton.jit(_scan_fwd), triton.jit(_scan_bwd))
    return _KERNELS[mode]


def _blocks(dg: int, n: int) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_N, num_warps): about BLOCK_ELEMENTS state elements per program, within
    one group."""
    block_n = triton.next_power_of_2(n)
    block_d = min(triton.next_power_of_2(dg), max(1, BLOCK_ELEMENTS // block_n))
    num_warps = 4 if block_d * block_n >= 256 else (2 if block_d * block_n >= 64 else 1)
    return block_d, block_n, num_warps


class _TritonScanFn(torch.autograd.Function):
    """(y, last state) of the scan; inputs already contiguous, B and C grouped (b, g, n, l)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
        z: Tensor | None, delta_bias: Tensor | None, softplus: bool, chunk: int,
    ) -> tuple[Tensor, Tensor]:
        fwd, _ = _kernels()
        b, d, length = u.shape
        g, n = B.shape[1], B.shape[2]
        dg = d // g
        block_d, block_n, warps = _blocks(dg, n)
        n_dblocks = triton.cdiv(dg, block_d)
        n_chunks = max(1, math.ceil(length / chunk))
        store = any(ctx.needs_input_grad[:8])
        out = torch.empty_like(u)
        last = torch.empty(b, d, n, device=u.device, dtype=torch.float32)
        ckpt = torch.empty(b, d, n, n_chunks if store else 1, device=u.device, dtype=torch.float32)
        fwd[(b, g * n_dblocks)](
            u, delta, A, B, C, u if D is None else D, u if z is None else z,
            u if delta_bias is None else delta_bias, out, last, ckpt,
            length, d, g, dg, n, n_dblocks, n_chunks,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=softplus, STORE_CKPT=store, CHUNK_L=chunk, BLOCK_D=block_d, BLOCK_N=block_n,
            num_warps=warps,
        )
        if store:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ckpt)
        ctx.cfg = (softplus, chunk, block_d, block_n, warps, n_dblocks, n_chunks)
        return out, last

    @staticmethod
    def backward(ctx: Any, dout: Tensor, dlast: Tensor) -> tuple[Tensor | None, ...]:
        _, bwd = _kernels()
        u, delta, A, B, C, D, z, delta_bias, ckpt = ctx.saved_tensors
        softplus, chunk, block_d, block_n, warps, n_dblocks, n_chunks = ctx.cfg
        b, d, length = u.shape
        g, n = B.shape[1], B.shape[2]
        f32 = dict(device=u.device, dtype=torch.float32)
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dz = torch.empty_like(z) if z is not None else None
        dB, dC = torch.zeros(B.shape, **f32), torch.zeros(C.shape, **f32)  # atomic-add targets
        dA = torch.empty(b, d, n, **f32)
        dD = torch.empty(b, d, **f32) if D is not None else None
        dbias = torch.empty(b, d, **f32) if delta_bias is not None else None
        scratch = torch.empty(b * g * n_dblocks * chunk * block_d * block_n, **f32)
        bwd[(b, g * n_dblocks)](
            u, delta, A, B, C, u if D is None else D, u if z is None else z,
            u if delta_bias is None else delta_bias,
            dout.contiguous(), dlast.contiguous(), ckpt, scratch,
            du, ddelta, du if dz is None else dz, dB, dC, dA,
            du if dD is None else dD, du if dbias is None else dbias,
            length, d, g, (d // g), n, n_dblocks, n_chunks,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=softplus, CHUNK_L=chunk, BLOCK_D=block_d, BLOCK_N=block_n, num_warps=warps,
        )
        return (
            du, ddelta, dA.sum(0).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
            None if dD is None else dD.sum(0).to(D.dtype), dz,
            None if dbias is None else dbias.sum(0).to(delta_bias.dtype), None, None,
        )


def triton_selective_scan(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
    z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
    chunk: int | None = None,
) -> tuple[Tensor, Tensor]:
    """(y in u's dtype, last state (b, d, n) float32) by the Triton kernel; shapes as checked by
    ``scan._check_shapes``. Differentiable in every tensor input, the last state included."""
    grouped = [t.unsqueeze(1) if t.dim() == 3 else t for t in (B, C)]
    return _TritonScanFn.apply(
        u.contiguous(), delta.contiguous(), A.float().contiguous(),
        grouped[0].contiguous(), grouped[1].contiguous(),
        None if D is None else D.float().contiguous(), None if z is None else z.contiguous(),
        None if delta_bias is None else delta_bias.float().contiguous(), bool(delta_softplus),
        int(chunk or CHUNK),
    )
