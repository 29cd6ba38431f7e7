"""A fused CPU selective scan (numba): forward and backward, exact, state kept in a local array.

Same semantics as :func:`rsseg.models.ssm.scan.selective_scan` (see that module's docstring); the
dispatcher there calls :func:`fused_scan` for the ``fused`` backend (and for ``auto`` on CPU with
float32/half inputs). Why fused: the torch scan spends ~90 % of its time in elementwise passes over
(b, d, n, l) tensors (``exp(delta*A)``, ``delta*B*u``, the states); here one loop per
(batch, channel) walks the sequence once, with the state, the decay and the drive living in
registers/L1, so no (b, d, n, l) tensor is ever built.

Layout: ``B, C`` are transposed once to (b, g, l, n) so that each step reads n contiguous values.
Arithmetic is in float32 for float32/half inputs (float64 for float64 inputs); per-channel sums
over the whole sequence (dA, dD, d delta_bias) accumulate in float64. ``fastmath`` is off: the
result is the textbook recurrence evaluated in order, bitwise reproducible whatever the thread count.

Backward stores nothing per step: forward saves the state entering every ``CHUNK``-position chunk
(b, d, l/CHUNK, n, i.e. n/CHUNK of ``u``'s size); backward walks the chunks from the last, recomputes
one chunk's states and decays into a (CHUNK+1, n) buffer, then runs the adjoint
``g_t = C_t gy_t + exp(delta_{t+1} A) g_{t+1}`` backwards through it. dB and dC are sums over the
channels of a group, so the parallel work items are (batch, group, part): each writes its own
slice of a (parts, b, g, l, n) buffer, summed afterwards (no races, no atomics).

numba compiles the kernels on first use (``cache=True``: once per machine, into ``__pycache__`` or
numba's user cache). Threads: numba's pool runs ``min(torch.get_num_threads(), NUMBA_NUM_THREADS)``
threads, so ``torch.set_num_threads`` (and the CLI's thread options) govern both.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK = 64  # positions per stored state in forward (recompute unit in backward)
LANES = 16  # channels per float32 work block (two AVX2 vectors); _tree16 assumes 16

# exp32's constants (Cephes expf), float32 so that numba keeps the arithmetic in float32.
_LOG2E, _MAGIC = np.float32(1.44269504088896341), np.float32(12582912.0)  # 1.5 * 2^23: rounding
_C1, _C2 = np.float32(0.693359375), np.float32(-2.12194440e-4)
_P0, _P1, _P2 = np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3)
_P3, _P4, _P5 = np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1)
_LO, _HI = np.float32(-87.3), np.float32(88.3)  # 2^m stays a normal float32
_ZERO, _ONE, _BIAS, _TWO23 = np.float32(0.0), np.float32(1.0), np.float32(127.0), np.float32(8388608.0)

_kernels: tuple[Callable[..., Any], Callable[..., Any]] | None = None
_error: str | None = None

try:  # numba is imported with this module, which scan.py imports on first CPU use only
    import numba
    from numba import njit, prange
except Exception as _exc:  # ImportError, or a numba/llvmlite/numpy version mismatch
    numba = None
    _import_error: str | None = (str(_exc).strip().splitlines() or [type(_exc).__name__])[0]
else:
    _import_error = None

if numba is not None:
    # Kernels are dtype-generic: no float literals (they would promote float32 to float64); the
    # constants come in ``cst`` = [0, 1, 20] in the compute dtype.

    @njit(parallel=True, fastmath=False, cache=True, nogil=True)
    def forward_kernel(u, dt, A, Bt, Ct, D, z, bias, flags, cst, chunk, y, last, hs, states):  # pragma: no cover
        # flags: [has_D, has_z, has_bias, softplus, states_mode, store_hs]
        nb, nd, L = u.shape
        n = A.shape[1]
        ng = Bt.shape[1]
        dg = nd // ng
        has_D, has_z, has_bias, softplus, states_mode, store_hs = (
            flags[0], flags[1], flags[2], flags[3], flags[4], flags[5])
        zero, one, thresh = cst[0], cst[1], cst[2]
        for item in prange(nb * nd):
            bi = item // nd
            di = item % nd
            gi = di // dg
            a = A[di]
            h = np.zeros(n, dtype=A.dtype)
            dv = D[di] if has_D else zero
            bv = bias[di] if has_bias else zero
            for t in range(L):
                if store_hs and t % chunk == 0:
                    c = t // chunk
                    for k in range(n):
                        hs[bi, di, c, k] = h[k]
                x = dt[bi, di, t] + bv
                if softplus:
                    x = x if x > thresh else math.log1p(math.exp(x))
                uv = u[bi, di, t]
                du = x * uv
                acc = zero
                if states_mode:
                    for k in range(n):
                        hk = math.exp(x * a[k]) * h[k] + du * Bt[bi, gi, t, k]
                        h[k] = hk
                        states[bi, di, k, t] = hk
                else:
                    for k in range(n):
                        hk = math.exp(x * a[k]) * h[k] + du * Bt[bi, gi, t, k]
                        h[k] = hk
                        acc += Ct[bi, gi, t, k] * hk
                    out = acc + dv * uv
                    if has_z:
                        zv = z[bi, di, t]
                        out = out * (zv / (one + math.exp(-zv)))
                    y[bi, di, t] = out
            for k in range(n):
                last[bi, di, k] = h[k]

    @njit(parallel=True, fastmath=False, cache=True, nogil=True)
    def backward_kernel(u, dt, A, Bt, Ct, D, z, bias, flags, cst, chunk, parts, hs, gy, gstates, glast,
                        du_out, ddt_out, dz_out, dB_buf, dC_buf, dA_buf, dD_buf, dbias_buf):  # pragma: no cover
        # flags: [has_D, has_z, has_bias, softplus, states_mode, has_glast]
        nb, nd, L = u.shape
        n = A.shape[1]
        ng = Bt.shape[1]
        dg = nd // ng
        per = (dg + parts - 1) // parts
        n_chunks = (L + chunk - 1) // chunk
        has_D, has_z, has_bias, softplus, states_mode, has_glast = (
            flags[0], flags[1], flags[2], flags[3], flags[4], flags[5])
        zero, one, thresh = cst[0], cst[1], cst[2]
        for item in prange(nb * ng * parts):
            bi = item // (ng * parts)
            gi = (item // parts) % ng
            p = item % parts
            c0 = gi * dg + p * per
            c1 = min(c0 + per, (gi + 1) * dg)
            hbuf = np.empty((chunk + 1, n), dtype=A.dtype)  # entering state, then the chunk's states
            dec = np.empty((chunk, n), dtype=A.dtype)  # exp(delta * A) of the chunk's steps
            xs = np.empty(chunk, dtype=A.dtype)  # delta (after bias and softplus)
            sig = np.empty(chunk, dtype=A.dtype)  # d softplus / d its input
            ypre = np.empty(chunk, dtype=A.dtype)  # y before the z gate
            g = np.empty(n, dtype=A.dtype)  # adjoint dL/dh
            dA_acc = np.empty(n, dtype=np.float64)
            for di in range(c0, c1):
                a = A[di]
                dv = D[di] if has_D else zero
                bv = bias[di] if has_bias else zero
                for k in range(n):
                    g[k] = glast[bi, di, k] if has_glast else zero
                    dA_acc[k] = 0.0
                dD_acc = 0.0
                db_acc = 0.0
                for c in range(n_chunks - 1, -1, -1):
                    t0 = c * chunk
                    t1 = min(t0 + chunk, L)
                    # Recompute the chunk from its stored entering state.
                    for k in range(n):
                        hbuf[0, k] = hs[bi, di, c, k]
                    for t in range(t0, t1):
                        j = t - t0
                        x = dt[bi, di, t] + bv
                        s = one
                        if softplus:
                            if x <= thresh:
                                s = one / (one + math.exp(-x))
                                x = math.log1p(math.exp(x))
                        xs[j] = x
                        sig[j] = s
                        uv = u[bi, di, t]
                        du = x * uv
                        acc = zero
                        for k in range(n):
                            e = math.exp(x * a[k])
                            dec[j, k] = e
                            hk = e * hbuf[j, k] + du * Bt[bi, gi, t, k]
                            hbuf[j + 1, k] = hk
                            if not states_mode:
                                acc += Ct[bi, gi, t, k] * hk
                        ypre[j] = acc + dv * uv
                    # Adjoint, backwards through the chunk.
                    for t in range(t1 - 1, t0 - 1, -1):
                        j = t - t0
                        uv = u[bi, di, t]
                        x = xs[j]
                        gu = zero
                        if states_mode:
                            for k in range(n):
                                g[k] += gstates[bi, di, k, t]
                        else:
                            go = gy[bi, di, t]
                            if has_z:
                                zv = z[bi, di, t]
                                sz = one / (one + math.exp(-zv))
                                dz_out[bi, di, t] = go * ypre[j] * sz * (one + zv * (one - sz))
                                go = go * zv * sz
                            if has_D:
                                gu = go * dv
                                dD_acc += go * uv
                            for k in range(n):
                                g[k] += Ct[bi, gi, t, k] * go
                                dC_buf[p, bi, gi, t, k] += go * hbuf[j + 1, k]
                        gx = zero
                        xu = x * uv
                        for k in range(n):
                            gk = g[k]
                            bk = Bt[bi, gi, t, k]
                            w = gk * dec[j, k] * hbuf[j, k]  # dL/d(delta * A_k)
                            gx += w * a[k] + gk * uv * bk
                            dA_acc[k] += w * x
                            gu += gk * x * bk
                            dB_buf[p, bi, gi, t, k] += gk * xu
                            g[k] = gk * dec[j, k]
                        gx = gx * sig[j]
                        du_out[bi, di, t] = gu
                        ddt_out[bi, di, t] = gx
                        db_acc += gx
                for k in range(n):
                    dA_buf[bi, di, k] = dA_acc[k]
                dD_buf[bi, di] = dD_acc
                dbias_buf[bi, di] = db_acc



    # ---- float32: a block of LANES channels of one group at a time, the lanes vectorised ----
    # Per step, the decays exp(delta * A) of the block are computed with exp32 below (vectorisable,
    # unlike a libm call); sums over the lanes (dB, dC) use a fixed pairwise tree (_tree16), so
    # results are the same on every run and thread count.

    @njit(inline="always", cache=True)
    def _exp32_row(v, pbuf, ibuf, fbuf):  # pragma: no cover
        """exp of v[0..LANES) in place, via pbuf (polynomial) and ibuf/fbuf (2^m, one buffer).

        Cephes expf: m = round(v / ln2), r = v - m ln2 (two-part ln2), e^r by a degree-7
        polynomial, times 2^m built in the exponent bits. Within 2 ulp of expf; v is clamped to
        [-87.3, 88.3], so what would underflow to 0 gives ~1e-38 (and nothing overflows).
        """
        for c in range(LANES):
            x = min(max(v[c], _LO), _HI)
            m = x * _LOG2E + _MAGIC - _MAGIC  # round to nearest, exactly (no fastmath)
            r = x - m * _C1 - m * _C2
            p = _P0
            p = p * r + _P1
            p = p * r + _P2
            p = p * r + _P3
            p = p * r + _P4
            p = p * r + _P5
            pbuf[c] = p * r * r + r + _ONE
            ibuf[c] = np.int32((m + _BIAS) * _TWO23)
        for c in range(LANES):
            v[c] = pbuf[c] * fbuf[c]

    @njit(inline="always", cache=True)
    def _tree16(t):  # pragma: no cover
        """Sum of t[0..15] in a fixed pairwise order."""
        return (((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]))) + (
            ((t[8] + t[9]) + (t[10] + t[11])) + ((t[12] + t[13]) + (t[14] + t[15])))

    @njit(parallel=True, fastmath=False, cache=True, nogil=True)
    def forward32(uT, xT, AT, Bt, Ct, states_mode, store_hs, chunk, yT, last, hs, statesT):  # pragma: no cover
        # Channels padded per group to a multiple of LANES (zeros): dp = g * dgp.
        # uT, xT (delta after bias/softplus): (b, l, dp); AT: (n, dp); Bt, Ct: (b, g, l, n)
        # yT: (b, l, dp); last: (b, n, dp); hs: (b, chunks, n, dp); statesT: (b, n, l, dp)
        nb, L, nd = uT.shape
        n = AT.shape[0]
        ng = Bt.shape[1]
        nblk = nd // LANES
        for item in prange(nb * nblk):
            bi = item // nblk
            c0 = (item % nblk) * LANES
            c1 = c0 + LANES
            gi = c0 // (nd // ng)
            h = np.zeros((n, LANES), dtype=np.float32)
            dec = np.empty((n, LANES), dtype=np.float32)
            pbuf = np.empty(LANES, dtype=np.float32)
            ibuf = np.empty(LANES, dtype=np.int32)
            fbuf = ibuf.view(np.float32)
            acc = np.empty(LANES, dtype=np.float32)
            du = np.empty(LANES, dtype=np.float32)
            for t in range(L):
                if store_hs and t % chunk == 0:
                    hs[bi, t // chunk, :, c0:c1] = h
                xr = xT[bi, t, c0:c1]
                ur = uT[bi, t, c0:c1]
                for k in range(n):
                    ar = AT[k, c0:c1]
                    dk = dec[k]
                    for c in range(LANES):
                        dk[c] = xr[c] * ar[c]
                    _exp32_row(dk, pbuf, ibuf, fbuf)
                for c in range(LANES):
                    du[c] = xr[c] * ur[c]
                    acc[c] = _ZERO
                for k in range(n):
                    bk = Bt[bi, gi, t, k]
                    ck = Ct[bi, gi, t, k]
                    hk = h[k]
                    dk = dec[k]
                    for c in range(LANES):
                        hv = dk[c] * hk[c] + du[c] * bk
                        hk[c] = hv
                        acc[c] += ck * hv
                if states_mode:
                    statesT[bi, :, t, c0:c1] = h
                else:
                    yr = yT[bi, t, c0:c1]
                    for c in range(LANES):
                        yr[c] = acc[c]
            last[bi, :, c0:c1] = h

    @njit(parallel=True, fastmath=False, cache=True, nogil=True)
    def backward32(uT, xT, AT, Bt, Ct, states_mode, has_glast, chunk, hs, gyT, gstatesT, glast,
                   duT, dxT, dB_buf, dC_buf, dA_buf):  # pragma: no cover
        # Gradients of y = sum_k C h (or of the states) with respect to u, delta, A, B, C, in the
        # padded layout of forward32. dB_buf, dC_buf: (blocks per group, b, g, l, n), one slice per
        # channel block (summed by the caller); glast: (b, n, dp); dA_buf: (b, n, dp) float64.
        nb, L, nd = uT.shape
        n = AT.shape[0]
        ng = Bt.shape[1]
        nblk = nd // LANES
        bpg = nblk // ng
        n_chunks = (L + chunk - 1) // chunk
        for item in prange(nb * nblk):
            bi = item // nblk
            blk = item % nblk
            c0 = blk * LANES
            c1 = c0 + LANES
            gi = blk // bpg
            slot = blk % bpg
            hbuf = np.zeros((chunk + 1, n, LANES), dtype=np.float32)
            dec = np.zeros((chunk, n, LANES), dtype=np.float32)
            pbuf = np.empty(LANES, dtype=np.float32)
            ibuf = np.empty(LANES, dtype=np.int32)
            fbuf = ibuf.view(np.float32)
            g = np.zeros((n, LANES), dtype=np.float32)
            dA_c = np.zeros((n, LANES), dtype=np.float32)  # per chunk, then added in float64
            dA_acc = np.zeros((n, LANES), dtype=np.float64)
            go = np.zeros(LANES, dtype=np.float32)
            xu = np.zeros(LANES, dtype=np.float32)
            gx = np.zeros(LANES, dtype=np.float32)
            gdu = np.zeros(LANES, dtype=np.float32)
            tB = np.zeros(LANES, dtype=np.float32)
            tC = np.zeros(LANES, dtype=np.float32)
            if has_glast:
                g[:, :] = glast[bi, :, c0:c1]
            for ci in range(n_chunks - 1, -1, -1):
                t0 = ci * chunk
                t1 = min(t0 + chunk, L)
                hbuf[0] = hs[bi, ci, :, c0:c1]
                for t in range(t0, t1):  # recompute the chunk's decays and states
                    j = t - t0
                    xr = xT[bi, t, c0:c1]
                    ur = uT[bi, t, c0:c1]
                    for c in range(LANES):
                        xu[c] = xr[c] * ur[c]
                    for k in range(n):
                        ar = AT[k, c0:c1]
                        dk = dec[j, k]
                        for c in range(LANES):
                            dk[c] = xr[c] * ar[c]
                        _exp32_row(dk, pbuf, ibuf, fbuf)
                        bk = Bt[bi, gi, t, k]
                        hp = hbuf[j, k]
                        hn = hbuf[j + 1, k]
                        for c in range(LANES):
                            hn[c] = dk[c] * hp[c] + xu[c] * bk
                dA_c[:, :] = _ZERO
                for t in range(t1 - 1, t0 - 1, -1):  # the adjoint, backwards
                    j = t - t0
                    xr = xT[bi, t, c0:c1]
                    ur = uT[bi, t, c0:c1]
                    if states_mode:
                        go[:] = _ZERO
                    else:
                        go[:] = gyT[bi, t, c0:c1]
                    for c in range(LANES):
                        xu[c] = xr[c] * ur[c]
                        gx[c] = _ZERO
                        gdu[c] = _ZERO
                    for k in range(n):
                        bk = Bt[bi, gi, t, k]
                        ck = Ct[bi, gi, t, k]
                        ar = AT[k, c0:c1]
                        gk_row = g[k]
                        dk = dec[j, k]
                        hp = hbuf[j, k]
                        hn = hbuf[j + 1, k]
                        dAk = dA_c[k]
                        if states_mode:
                            gs = gstatesT[bi, k, t, c0:c1]
                            for c in range(LANES):
                                gk_row[c] += gs[c]
                        for c in range(LANES):
                            gk = gk_row[c] + ck * go[c]
                            tC[c] = go[c] * hn[c]
                            wv = gk * dk[c] * hp[c]  # dL/d(delta A_k)
                            gx[c] += wv * ar[c]
                            dAk[c] += wv * xr[c]
                            gdu[c] += gk * bk
                            tB[c] = gk * xu[c]
                            gk_row[c] = gk * dk[c]
                        dB_buf[slot, bi, gi, t, k] = _tree16(tB)
                        if not states_mode:
                            dC_buf[slot, bi, gi, t, k] = _tree16(tC)
                    dur = duT[bi, t, c0:c1]
                    dxr = dxT[bi, t, c0:c1]
                    for c in range(LANES):
                        dur[c] = gdu[c] * xr[c]
                        dxr[c] = gx[c] + gdu[c] * ur[c]
                for k in range(n):
                    for c in range(LANES):
                        dA_acc[k, c] += dA_c[k, c]
            dA_buf[bi, :, c0:c1] = dA_acc


def unavailable_reason() -> str | None:
    """Why the fused scan cannot run here (numba missing or failing to compile), or None."""
    _load()
    return _error


def _load() -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    """The (forward, backward) kernels, or None (and ``_error``) where numba is unusable."""
    global _kernels, _error
    if _kernels is None and _error is None:
        if numba is None:
            _error = f"numba cannot be imported ({_import_error}); install it with `pip install numba`"
        else:
            _kernels = (forward_kernel, backward_kernel)
    return _kernels


def _set_threads() -> None:
    # numba's pool follows torch's thread count, so one setting governs both (see docs/cpu_scan.md).
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def _parts(b: int, g: int, dg: int) -> int:
    """Channel slices per (batch, group) in backward: enough work items for every thread."""
    items = b * g
    want = 2 * numba.get_num_threads()
    return max(1, min(dg, math.ceil(want / items))) if items < want else 1


def _np(t: Tensor | None, like: Tensor, ndim: int) -> Any:
    """Contiguous numpy view of ``t``, or a 1-element placeholder of ``ndim`` dims when absent."""
    if t is None:
        return like.new_zeros((1,) * ndim).numpy()
    return t.detach().contiguous().numpy()


class _FusedScan(torch.autograd.Function):
    """y = sum_n C h (before D and z), or the states h when C is None, and the last state.

    ``dt`` is delta after bias and softplus; all inputs in the compute dtype, B/C grouped.
    """

    @staticmethod
    def forward(ctx: Any, u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor | None) -> tuple[Tensor, Tensor]:
        _set_threads()
        states_mode = C is None
        b, d, length = u.shape
        g, n = B.shape[1], A.shape[1]
        store = any(ctx.needs_input_grad)
        last: Tensor
        n_chunks = math.ceil(length / CHUNK)
        Bt = B.transpose(-1, -2).contiguous()  # (b, g, l, n): a step reads n contiguous values
        Ct = None if C is None else C.transpose(-1, -2).contiguous()
        if u.dtype == torch.float32:
            uT, xT, AT = _to_lanes(u, 1, g), _to_lanes(dt, 1, g), _to_lanes(A, 0, g)  # (b, l, dp), (n, dp)
            dp = uT.shape[-1]
            hs = u.new_empty((b, n_chunks, n, dp) if store else (1, 1, 1, 1))
            yT = u.new_empty((1, 1, 1) if states_mode else (b, length, dp))
            statesT = u.new_empty((b, n, length, dp) if states_mode else (1, 1, 1, 1))
            lastT = u.new_empty(b, n, dp)
            forward32(uT.numpy(), xT.numpy(), AT.numpy(), Bt.numpy(), (Bt if Ct is None else Ct).numpy(),
                      states_mode, store, CHUNK, yT.numpy(), lastT.numpy(), hs.numpy(), statesT.numpy())
            out = _from_lanes(statesT if states_mode else yT, 1, g, d // g)
            last = _from_lanes(lastT, 1, g, d // g)
            saved = (uT, xT, AT, Bt, Ct, hs)
        else:  # float64: the scalar generic kernel
            hs = u.new_empty((b, d, n_chunks, n) if store else (1, 1, 1, 1))
            last = u.new_empty(b, d, n)
            y = u.new_empty((1, 1, 1) if states_mode else (b, d, length))
            states = u.new_empty((b, d, n, length) if states_mode else (1, 1, 1, 1))
            forward_kernel(u.numpy(), dt.numpy(), A.numpy(), Bt.numpy(), _np(Ct, u, 4), _np(None, u, 1),
                           _np(None, u, 3), _np(None, u, 1), _flags(False, False, False, False, states_mode, store),
                           _consts(u.dtype), CHUNK, y.numpy(), last.numpy(), hs.numpy(), states.numpy())
            out = states if states_mode else y
            saved = (u, dt, A, Bt, Ct, hs)
        if store:
            ctx.save_for_backward(*saved)
        ctx.states_mode, ctx.d = states_mode, d
        return out.contiguous(), last

    @staticmethod
    def backward(ctx: Any, g_out: Tensor | None, g_last: Tensor | None):  # type: ignore[override]
        _set_threads()
        states_mode = ctx.states_mode
        if ctx.saved_tensors[0].dtype == torch.float32:
            return _backward32(ctx, g_out, g_last)
        u, dt, A, Bt, Ct, hs = ctx.saved_tensors
        b, d, length = u.shape
        g, n = Bt.shape[1], Bt.shape[3]
        parts = _parts(b, g, d // g)
        if g_out is None:
            g_out = u.new_zeros((b, d, n, length) if states_mode else (b, d, length))
        g_out = g_out.to(u.dtype).contiguous()
        du, ddt = torch.empty_like(u), torch.empty_like(u)
        dB_buf = u.new_zeros(parts, b, g, length, n)
        dC_buf = u.new_zeros((parts, b, g, length, n) if not states_mode else (1, 1, 1, 1, 1))
        dA_buf = u.new_empty(b, d, n)
        glast = g_last.to(u.dtype).contiguous() if g_last is not None else u.new_zeros(1, 1, 1)
        gy = u.new_zeros(1, 1, 1) if states_mode else g_out
        gstates = g_out if states_mode else u.new_zeros(1, 1, 1, 1)
        backward_kernel(u.numpy(), dt.numpy(), A.numpy(), Bt.numpy(), _np(Ct, u, 4), _np(None, u, 1),
                        _np(None, u, 3), _np(None, u, 1),
                        _flags(False, False, False, False, states_mode, g_last is not None),
                        _consts(u.dtype), CHUNK, parts, hs.numpy(), gy.numpy(), gstates.numpy(),
                        glast.numpy(), du.numpy(), ddt.numpy(), u.new_empty(1, 1, 1).numpy(),
                        dB_buf.numpy(), dC_buf.numpy(), dA_buf.numpy(), u.new_empty(b, d).numpy(),
                        u.new_empty(b, d).numpy())
        dC = None if states_mode else dC_buf.sum(0).transpose(-1, -2)
        return du, ddt, dA_buf.sum(0), dB_buf.sum(0).transpose(-1, -2), dC


def _backward32(ctx: Any, g_out: Tensor | None, g_last: Tensor | None) -> tuple[Tensor | None, ...]:
    uT, xT, AT, Bt, Ct, hs = ctx.saved_tensors
    states_mode = ctx.states_mode
    b, length, dp = uT.shape
    g, n = Bt.shape[1], Bt.shape[3]
    d = ctx.d
    dg = d // g
    if g_out is None:
        g_out = uT.new_zeros((b, d, n, length) if states_mode else (b, d, length))
    g_lanes = _to_lanes(g_out.float(), 1, g)  # (b, n, l, dp) or (b, l, dp)
    gyT, gsT = (uT.new_zeros(1, 1, 1), g_lanes) if states_mode else (g_lanes, uT.new_zeros(1, 1, 1, 1))
    glast = _to_lanes(g_last.float(), 1, g) if g_last is not None else uT.new_zeros(1, 1, 1)
    duT, dxT = torch.empty_like(uT), torch.empty_like(uT)
    # Every (slot, t, k) of the buffers is written once (no accumulation): empty, not zeros.
    bpg = dp // g // LANES
    dB_buf = uT.new_empty(bpg, b, g, length, n)
    dC_buf = uT.new_empty((bpg, b, g, length, n) if not states_mode else (1, 1, 1, 1, 1))
    dA_buf = torch.empty(b, n, dp, dtype=torch.float64)
    backward32(uT.numpy(), xT.numpy(), AT.numpy(), Bt.numpy(), (Bt if Ct is None else Ct).numpy(),
               states_mode, g_last is not None, CHUNK, hs.numpy(), gyT.numpy(), gsT.numpy(),
               glast.numpy(), duT.numpy(), dxT.numpy(), dB_buf.numpy(), dC_buf.numpy(), dA_buf.numpy())
    dB = (dB_buf.sum(0) if bpg > 1 else dB_buf[0]).transpose(-1, -2)
    dC = None if states_mode else (dC_buf.sum(0) if bpg > 1 else dC_buf[0]).transpose(-1, -2)
    dA = _from_lanes(dA_buf.sum(0).float(), 0, g, dg)
    return _from_lanes(duT, 1, g, dg), _from_lanes(dxT, 1, g, dg), dA, dB, dC


def _to_lanes(t: Tensor, dim: int, g: int) -> Tensor:
    """Channel axis ``dim`` (g groups of dg) moved last and zero-padded per group to a multiple of LANES."""
    x = t.movedim(dim, -1)
    dg = x.shape[-1] // g
    pad = -dg % LANES
    x = x.reshape(*x.shape[:-1], g, dg)
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(*x.shape[:-2], g * (dg + pad)).contiguous()


def _from_lanes(x: Tensor, dim: int, g: int, dg: int) -> Tensor:
    """Inverse of :func:`_to_lanes` (drops the padding, channel axis back at ``dim``)."""
    x = x.reshape(*x.shape[:-1], g, x.shape[-1] // g)[..., :dg]
    return x.reshape(*x.shape[:-2], g * dg).movedim(-1, dim)


def _flags(*flags: bool) -> Any:
    return np.array(flags, dtype=np.bool_)


def _consts(dtype: torch.dtype) -> Any:
    # torch's softplus threshold (20): above it softplus(x) = x, as F.softplus does.
    return torch.tensor([0.0, 1.0, 20.0], dtype=dtype).numpy()


def _fused_core(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor | None) -> tuple[Tensor, Tensor]:
    return _FusedScan.apply(u.contiguous(), delta.contiguous(), A.contiguous(), B, C)


def fused_scan(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor | None, D: Tensor | None = None,
    z: Tensor | None = None, delta_bias: Tensor | None = None, delta_softplus: bool = False,
) -> tuple[Tensor, Tensor]:
    """(y in u's dtype, last state) of the scan, or (states (b, d, n, l), last state) when C is None.

    Shapes are those of ``selective_scan`` (already checked by the caller); CPU tensors only. The
    per-position elementwise parts (delta bias and softplus, D skip, z gate: 1/n of the work) are
    the torch scan's own (:func:`rsseg.models.ssm.scan.scan_elementwise`); the recurrence is one
    fused kernel.
    """
    from rsseg.models.ssm.scan import scan_elementwise

    return scan_elementwise(_fused_core, u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def unsupported_reason(u: Tensor, A: Tensor) -> str | None:
    """Why the fused scan cannot run on these inputs, or None when it can."""
    if u.device.type != "cpu":
        return f"the inputs are on {u.device.type}, not on the CPU"
    if A.is_complex() or not (u.is_floating_point()):
        return f"the fused scan takes real floating-point inputs, not {u.dtype}"
    return unavailable_reason()


__all__ = ["CHUNK", "fused_scan", "unavailable_reason", "unsupported_reason"]
