"""A fused CPU selective scan (numba): forward and backward, exact, state kept in local memory.

Same semantics as :func:`rsseg.models.ssm.scan.selective_scan` (see that module's docstring); the
dispatcher there calls :func:`fused_scan` for the ``fused`` backend (and for ``auto`` on CPU with
float32/half inputs). Why fused: the torch scan spends ~90 % of its time in elementwise passes over
(b, d, n, l) tensors (``exp(delta*A)``, ``delta*B*u``, the states); here one loop per
(batch, block of channels) walks the sequence once, with the state, the decay and the drive in
vector registers/L1, so no (b, d, n, l) tensor is ever built.

float32 (and half inputs, computed in float32): the "lane layout" kernels (forward32, backward32,
ss2d_forward32; layout in the comment above them). Each direction (group) reads its positions in
an ``order`` given per direction, so SS2D's four traversals of an (H, W) map are four orders over
the same channels-last tensors, and the kernel adds their outputs per pixel (:meth:`SS2D.scan_fused
<rsseg.models.ssm.ss2d.SS2D.scan_fused>`): no traversal copies, no merge. The plain scan is the
case "identity order, one group per direction". Multiply-adds may be contracted to FMAs (rounded
once); nothing else of fastmath. Sums over a sequence (dA) accumulate in float64; sums over the
channels of a group (dB, dC) use a fixed pairwise tree per 16-lane block and per-block buffers:
results are bitwise the same whatever the thread count.

float64 inputs (asked for with ``backend="fused"``) run the scalar generic kernels (forward_kernel,
backward_kernel): the reference, untuned.

Backward stores nothing per step: forward saves the state entering every ``CHUNK``-position chunk
(n/CHUNK of ``u``'s size); backward walks the chunks from the last, recomputes one chunk's states
and decays, then runs the adjoint ``g_t = C_t gy_t + exp(delta_{t+1} A) g_{t+1}`` backwards through
it. Without gradients SS2D takes :func:`ss2d_forward`: delta is computed per step inside the kernel
from the low-rank dt projection and nothing is stored.

numba compiles the kernels on first use (``cache=True``: once per machine, into ``__pycache__`` or
numba's user cache). Threads: numba's pool runs ``min(torch.get_num_threads(), NUMBA_NUM_THREADS)``
threads, so ``torch.set_num_threads`` (and the CLI's thread options) govern both; :func:`_launch`
gives torch its own thread count back after each kernel (numba's OpenMP pool changes it).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK = 64  # positions per stored state in forward (recompute unit in backward)
LANES = 16  # channels per float32 work block (two AVX2 vectors); _tree16 assumes 16
MAX_STATE = 64  # d_state limit: the per-block state (MAX_STATE x LANES) lives on the kernel's stack
_SCAP = (MAX_STATE + 2) * LANES  # the state block and two spare rows of lanes
_AHEAD = 4  # steps ahead that the kernels prefetch a traversal's next pixels

# exp32's constants (Cephes expf), float32 so that numba keeps the arithmetic in float32.
_LOG2E, _MAGIC = np.float32(1.44269504088896341), np.float32(12582912.0)  # 1.5 * 2^23: rounding
_C1, _C2 = np.float32(0.693359375), np.float32(-2.12194440e-4)
_P0, _P1, _P2 = np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3)
_P3, _P4, _P5 = np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1)
_LO, _HI = np.float32(-87.3), np.float32(88.3)  # 2^m stays a normal float32
_ZERO, _ONE, _TWO = np.float32(0.0), np.float32(1.0), np.float32(2.0)
# 2 atanh(s) = 2 s (1 + s^2/3 + s^4/5 + ...): softplus32's log1p
_Q1, _Q2, _Q3 = np.float32(1 / 3), np.float32(1 / 5), np.float32(1 / 7)
_Q4, _Q5, _Q6 = np.float32(1 / 9), np.float32(1 / 11), np.float32(1 / 13)
# The float32 kernels may fuse a multiply and an add into one FMA (rounded once); nothing else of
# fastmath: no reassociation, no reciprocal tricks, NaN and inf kept.
_FM = {"contract"}

_kernels: tuple[Callable[..., Any], Callable[..., Any]] | None = None
_error: str | None = None

try:  # numba is imported with this module, which scan.py imports on first CPU use only
    import numba
    from llvmlite import ir
    from numba import njit, prange
    from numba.core import cgutils, types
    from numba.extending import intrinsic
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



    # ---- float32: a block of LANES channels of one direction at a time, the lanes vectorised ----
    # Layout (the "lane layout"): K directions (or groups); per direction the channels padded to a
    # multiple of LANES and stored last, positions before them:
    #   u, y: (S, b, P, dp)  with S = K (each direction its own channels) or S = 1 (all directions
    #                        read the same u and add into the same y: SS2D's four traversals);
    #   delta: (K, b, P, dp); AT: (K, n, dp); B, C: (b, P, K, n);
    #   order: (K, P), the position read at step t of direction k (a permutation of 0..P-1).
    # A work item is (slot of S, batch, block of LANES channels); it runs its K/S directions one
    # after the other, so y (and du in backward) is accumulated without races. Local arrays are
    # flat (index k*LANES + c) and exp32 is plain float arithmetic, so LLVM vectorises every
    # per-lane loop (checked in the assembly: ymm FMAs). fastmath is limited to FMA contraction:
    # operations run in the written order, each multiply-add rounded once.

    def _stack_array(dtype: Any) -> Any:
        @intrinsic
        def stack(typingctx, size):  # pragma: no cover
            """An uninitialised 1-D array of ``size`` (a constant) elements on the stack.

            Local work arrays on the stack (an alloca in the function's entry block, once per call)
            instead of numba's heap: LLVM then knows they alias nothing, keeps the per-lane
            accumulators in vector registers and drops the runtime overlap checks (measured ~15-40 %
            on the forward step)."""
            if not isinstance(size, types.IntegerLiteral):
                return None
            count = size.literal_value
            arrty = types.Array(dtype, 1, "C")

            def codegen(context, builder, signature, args):
                ptr = cgutils.alloca_once(builder, context.get_value_type(dtype), size=count)
                ary = context.make_array(arrty)(context, builder)
                itemsize = context.get_constant(types.intp, context.get_abi_sizeof(context.get_value_type(dtype)))
                context.populate_array(ary, data=ptr, shape=[context.get_constant(types.intp, count)],
                                       strides=[itemsize], itemsize=itemsize, meminfo=None)
                return ary._getvalue()

            return arrty(size), codegen

        return stack

    _stack_f32 = _stack_array(types.float32)
    _stack_f64 = _stack_array(types.float64)

    @intrinsic
    def _wide_vectors(typingctx):  # pragma: no cover
        """Let LLVM vectorise the calling function with 512-bit vectors where the CPU has them.

        LLVM's x86 tuning prefers 256-bit vectors even on AVX-512 parts; a LANES = 16 step then
        takes two ymm halves. With the function attribute it is one zmm operation: the forward
        step measured 28 % faster here (Xeon, AVX-512). Without AVX-512 the attribute changes
        nothing; where llvmlite refuses it, the kernel simply keeps 256-bit vectors.
        """
        def codegen(context, builder, signature, args):
            try:  # llvmlite checks attribute names against a list; a string attribute is valid IR
                set.add(builder.function.attributes, '"prefer-vector-width"="512"')
            except Exception:
                pass
            return context.get_dummy_value()

        return types.none(), codegen

    @intrinsic
    def _prefetch(typingctx, arr, idx):  # pragma: no cover
        """Prefetch the cache line of arr.ravel()[idx] (llvm.prefetch: read, keep in all levels)."""
        if not isinstance(arr, types.Array) or not isinstance(idx, types.Integer):
            return None

        def codegen(context, builder, signature, args):
            ary = context.make_array(signature.args[0])(context, builder, value=args[0])
            ptr = builder.gep(ary.data, [args[1]])
            i32 = ir.IntType(32)
            fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
            builder.call(fn, [ptr, i32(0), i32(3), i32(1)])
            return context.get_dummy_value()

        return types.none(arr, idx), codegen

    @intrinsic
    def _axpy16(typingctx, y, yo, a, x, xo):  # pragma: no cover
        """y[yo:yo + 16] += a * x[xo:xo + 16] as one 16-lane vector operation (no bounds checks).

        Written as vector IR because LLVM unrolls so small a lane loop fully and then leaves it
        scalar (measured: 16 scalar FMAs per term of the low-rank dt product)."""
        if not (isinstance(y, types.Array) and isinstance(x, types.Array)):
            return None

        def codegen(context, builder, signature, args):
            yv, yo_, av, xv, xo_ = args
            vty = ir.VectorType(ir.FloatType(), LANES)
            i32 = ir.IntType(32)
            yp = builder.gep(context.make_array(signature.args[0])(context, builder, value=yv).data, [yo_])
            xp = builder.gep(context.make_array(signature.args[3])(context, builder, value=xv).data, [xo_])
            yl = builder.load(builder.bitcast(yp, vty.as_pointer()), align=4)
            xl = builder.load(builder.bitcast(xp, vty.as_pointer()), align=4)
            splat = builder.insert_element(ir.Constant(vty, ir.Undefined), av, i32(0))
            splat = builder.shuffle_vector(splat, ir.Constant(vty, ir.Undefined),
                                           ir.Constant(ir.VectorType(i32, LANES), [0] * LANES))
            out = builder.fadd(yl, builder.fmul(splat, xl, flags=["contract"]), flags=["contract"])
            builder.store(out, builder.bitcast(yp, vty.as_pointer()), align=4)
            return context.get_dummy_value()

        return types.none(y, yo, types.float32, x, xo), codegen

    @intrinsic
    def _pow2(typingctx, m):  # pragma: no cover
        """2**m for an integral float32 m in [-126, 127], built in the exponent bits (vectorisable)."""
        sig = types.float32(types.float32)

        def codegen(context, builder, signature, args):
            i32 = ir.IntType(32)
            mi = builder.fptosi(args[0], i32)
            bits = builder.shl(builder.add(mi, ir.Constant(i32, 127)), ir.Constant(i32, 23))
            return builder.bitcast(bits, ir.FloatType())

        return sig, codegen

    @njit(inline="always", cache=True, fastmath=_FM, error_model="numpy")
    def _exp32_clamped(x):  # pragma: no cover
        """e^x for x in [-87.3, 88.3]: Cephes expf. m = round(x / ln2), r = x - m ln2 (two-part
        ln2), e^r by a degree-7 polynomial, times 2^m. Within 2 ulp of expf."""
        m = x * _LOG2E + _MAGIC - _MAGIC  # round to nearest, exactly
        r = x - m * _C1 - m * _C2
        p = _P0
        p = p * r + _P1
        p = p * r + _P2
        p = p * r + _P3
        p = p * r + _P4
        p = p * r + _P5
        return (p * r * r + r + _ONE) * _pow2(m)

    @njit(inline="always", cache=True, fastmath=_FM, error_model="numpy")
    def _exp32(v):  # pragma: no cover
        """e^v, v clamped to [-87.3, 88.3]: what would underflow to 0 gives ~1e-38 (and nothing
        overflows)."""
        return _exp32_clamped(min(max(v, _LO), _HI))

    @njit(inline="always", cache=True, fastmath=_FM, error_model="numpy")
    def _exp32_nonpos(v):  # pragma: no cover
        """_exp32 for v <= 0 (delta >= 0 times A <= 0; -|x|): one clamp less per element."""
        return _exp32_clamped(max(v, _LO))

    @njit(inline="always", cache=True)
    def _tree16(t):  # pragma: no cover
        """Sum of t[0..15] in a fixed pairwise order."""
        return (((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]))) + (
            ((t[8] + t[9]) + (t[10] + t[11])) + ((t[12] + t[13]) + (t[14] + t[15])))

    # Hot loops read a step's rows through views (uf[o:o + LANES]) indexed by range variables:
    # LLVM then knows every index is >= 0, so numba's negative-index fix-up disappears and the
    # lanes load as one vector (with a pixel index from `order`, plain flat indexing compiled to
    # gathers). Each step prefetches the rows of the step _AHEAD further on: a column traversal
    # jumps W pixels, often a new page, per step (measured: without it the column traversals ran
    # 1.4x the time of the row ones at 128 x 128).

    @njit(parallel=True, fastmath=_FM, error_model="numpy", cache=True, nogil=True)
    def forward32(u, dl, AT, Bp, Cp, order, states_mode, store_hs, chunk, y, last, hs, states):  # pragma: no cover
        # y: (S, b, P, dp) = sum over the item's directions of sum_k C h; last: (K, b, n, dp);
        # hs: (K, b, chunks, n, dp), the state entering every chunk; states: (K, b, n, P, dp).
        S, nb, P, dp = u.shape
        K, n = AT.shape[0], AT.shape[1]
        nblk = dp // LANES
        kper = K // S
        uf, df, yf, Bf, Cf = u.ravel(), dl.ravel(), y.ravel(), Bp.ravel(), Cp.ravel()
        for item in prange(S * nb * nblk):
            _wide_vectors()
            s = item // (nb * nblk)
            bi = (item // nblk) % nb
            c0 = (item % nblk) * LANES
            h = _stack_f32(_SCAP)
            a = np.empty(n * LANES, dtype=np.float32)
            du = _stack_f32(LANES)
            acc = _stack_f32(LANES)
            for k in range(s * kper, (s + 1) * kper):
                first = k == s * kper
                for kk in range(n):
                    for c in range(LANES):
                        a[kk * LANES + c] = AT[k, kk, c0 + c]
                        h[kk * LANES + c] = _ZERO
                for t in range(P):
                    p = order[k, t]
                    q = order[k, min(t + _AHEAD, P - 1)]
                    _prefetch(uf, ((s * nb + bi) * P + q) * dp + c0)
                    _prefetch(df, ((k * nb + bi) * P + q) * dp + c0)
                    _prefetch(yf, ((s * nb + bi) * P + q) * dp + c0)
                    _prefetch(Bf, ((bi * P + q) * K + k) * n)
                    _prefetch(Cf, ((bi * P + q) * K + k) * n)
                    if store_hs and t % chunk == 0:
                        for kk in range(n):
                            for c in range(LANES):
                                hs[k, bi, t // chunk, kk, c0 + c] = h[kk * LANES + c]
                    uo = ((s * nb + bi) * P + p) * dp + c0
                    xo = ((k * nb + bi) * P + p) * dp + c0
                    bo = ((bi * P + p) * K + k) * n
                    ur, xr, yr = uf[uo:uo + LANES], df[xo:xo + LANES], yf[uo:uo + LANES]
                    br, cr = Bf[bo:bo + n], Cf[bo:bo + n]
                    for c in range(LANES):
                        du[c] = xr[c] * ur[c]
                        acc[c] = _ZERO
                    for kk in range(n):
                        bk = br[kk]
                        ck = cr[kk]
                        base = kk * LANES
                        for c in range(LANES):
                            hv = _exp32(xr[c] * a[base + c]) * h[base + c] + du[c] * bk
                            h[base + c] = hv
                            acc[c] += ck * hv
                    if states_mode:
                        for kk in range(n):
                            for c in range(LANES):
                                states[k, bi, kk, p, c0 + c] = h[kk * LANES + c]
                    elif first:
                        for c in range(LANES):
                            yr[c] = acc[c]
                    else:
                        for c in range(LANES):
                            yr[c] += acc[c]
                for kk in range(n):
                    for c in range(LANES):
                        last[k, bi, kk, c0 + c] = h[kk * LANES + c]

    @njit(inline="always", cache=True, fastmath=_FM, error_model="numpy")
    def _softplus32(x):  # pragma: no cover
        """log(1 + e^x) = max(x, 0) + log1p(e^-|x|), vectorisable: with e = e^-|x| in (0, 1],
        log1p(e) = 2 atanh(s), s = e / (2 + e) in (0, 1/3], by its series to s^13 (the rest is
        below 1.5e-8 relative). Within 2.5e-7 relative of log(1 + e^x) (F.softplus: 1.1e-7)."""
        e = _exp32_nonpos(-abs(x))
        s = e / (_TWO + e)
        s2 = s * s
        q = _Q6
        q = q * s2 + _Q5
        q = q * s2 + _Q4
        q = q * s2 + _Q3
        q = q * s2 + _Q2
        q = q * s2 + _Q1
        q = q * s2 + _ONE
        return max(x, _ZERO) + _TWO * s * q

    @njit(parallel=True, fastmath=_FM, error_model="numpy", cache=True, nogil=True)
    def ss2d_forward32(u, xd, WT, bias, AT, order, r, y):  # pragma: no cover
        # SS2D's forward without gradients, from the per-pixel projections: delta is computed per
        # step in the kernel (softplus(bias + dt_low_rank @ W), never stored) and y is the sum of
        # the K traversals (the caller adds the D skip). u, y: (b, P, dp) channels-last; xd:
        # (b, P, K, R), per pixel and direction [dt low rank (r) | B (n) | C (n) | ...]; WT:
        # (K, r, dp); bias: (K, dp); AT: (K, n, dp); order: (K, P).
        nb, P, dp = u.shape
        K, n = AT.shape[0], AT.shape[1]
        R = xd.shape[3]
        nblk = dp // LANES
        uf, yf, xf = u.ravel(), y.ravel(), xd.ravel()
        for item in prange(nb * nblk):
            _wide_vectors()
            bi = item // nblk
            c0 = (item % nblk) * LANES
            # The state block, then delta's lanes and the bias (views at run-time offsets: indexed
            # by constants only, LLVM splits a small array into 16 scalars and spills them).
            h = _stack_f32(_SCAP)
            xw, bw = h[n * LANES:(n + 1) * LANES], h[(n + 1) * LANES:(n + 2) * LANES]
            a = np.empty(n * LANES, dtype=np.float32)
            wl = np.empty(max(r, 1) * LANES, dtype=np.float32)
            du = _stack_f32(LANES)
            acc = _stack_f32(LANES)
            for k in range(K):
                for kk in range(n):
                    for c in range(LANES):
                        a[kk * LANES + c] = AT[k, kk, c0 + c]
                        h[kk * LANES + c] = _ZERO
                for j in range(r):
                    for c in range(LANES):
                        wl[j * LANES + c] = WT[k, j, c0 + c]
                for c in range(LANES):
                    bw[c] = bias[k, c0 + c]
                for t in range(P):
                    p = order[k, t]
                    q = order[k, min(t + _AHEAD, P - 1)]
                    _prefetch(uf, (bi * P + q) * dp + c0)
                    _prefetch(yf, (bi * P + q) * dp + c0)
                    _prefetch(xf, ((bi * P + q) * K + k) * R)
                    _prefetch(xf, ((bi * P + q) * K + k) * R + R - 1)
                    uo = (bi * P + p) * dp + c0
                    xo = ((bi * P + p) * K + k) * R
                    ur, yr = uf[uo:uo + LANES], yf[uo:uo + LANES]
                    dtr, br, cr = xf[xo:xo + r], xf[xo + r:xo + r + n], xf[xo + r + n:xo + r + 2 * n]
                    for c in range(LANES):
                        xw[c] = bw[c]
                    for j in range(r):
                        _axpy16(xw, 0, dtr[j], wl, j * LANES)
                    for c in range(LANES):
                        x = _softplus32(xw[c])
                        xw[c] = x
                        du[c] = x * ur[c]
                        acc[c] = _ZERO
                    for kk in range(n):
                        bk = br[kk]
                        ck = cr[kk]
                        base = kk * LANES
                        for c in range(LANES):
                            hv = _exp32_nonpos(xw[c] * a[base + c]) * h[base + c] + du[c] * bk
                            h[base + c] = hv
                            acc[c] += ck * hv
                    if k == 0:
                        for c in range(LANES):
                            yr[c] = acc[c]
                    else:
                        for c in range(LANES):
                            yr[c] += acc[c]

    @njit(parallel=True, fastmath=_FM, error_model="numpy", cache=True, nogil=True)
    def backward32(u, dl, AT, Bp, Cp, order, states_mode, has_glast, chunk, hs, gy, gstates, glast,
                   du_out, ddl_out, dB_buf, dC_buf, dA_buf):  # pragma: no cover
        # Gradients of y (or of the states) and of the last state with respect to u, delta, A, B,
        # C, in the layout of forward32. du_out: (S, b, P, dp), summed over the item's directions;
        # ddl_out: (K, b, P, dp); dB_buf, dC_buf: (blocks, b, P, K, n), one slice per channel block
        # (summed by the caller); dA_buf: (K, b, n, dp) float64; gstates: (K, b, n, P, dp).
        S, nb, P, dp = u.shape
        K, n = AT.shape[0], AT.shape[1]
        nblk = dp // LANES
        kper = K // S
        n_chunks = (P + chunk - 1) // chunk
        uf, df, gyf, duf, ddf = u.ravel(), dl.ravel(), gy.ravel(), du_out.ravel(), ddl_out.ravel()
        Bf, Cf, dBf, dCf, gsf = Bp.ravel(), Cp.ravel(), dB_buf.ravel(), dC_buf.ravel(), gstates.ravel()
        for item in prange(S * nb * nblk):
            _wide_vectors()
            s = item // (nb * nblk)
            bi = (item // nblk) % nb
            blk = item % nblk
            c0 = blk * LANES
            nl = n * LANES
            hbuf = np.zeros((chunk + 1) * nl, dtype=np.float32)  # entering state, then the chunk's
            dec = np.zeros(chunk * nl, dtype=np.float32)  # exp(delta * A) of the chunk's steps
            a = np.empty(nl, dtype=np.float32)
            g = _stack_f32(_SCAP)  # adjoint dL/dh
            dA_c = _stack_f32(_SCAP)  # per chunk, then added in float64
            dA_acc = _stack_f64(_SCAP)
            go = _stack_f32(LANES)
            xu = _stack_f32(LANES)
            gx = _stack_f32(LANES)
            gdu = _stack_f32(LANES)
            tB = _stack_f32(LANES)
            tC = _stack_f32(LANES)
            for c in range(LANES):
                go[c] = _ZERO  # stays 0 in states mode
            for k in range(s * kper, (s + 1) * kper):
                first = k == s * kper
                for kk in range(n):
                    for c in range(LANES):
                        i = kk * LANES + c
                        a[i] = AT[k, kk, c0 + c]
                        g[i] = glast[k, bi, kk, c0 + c] if has_glast else _ZERO
                        dA_acc[i] = 0.0
                for ci in range(n_chunks - 1, -1, -1):
                    t0 = ci * chunk
                    t1 = min(t0 + chunk, P)
                    for kk in range(n):
                        for c in range(LANES):
                            hbuf[kk * LANES + c] = hs[k, bi, ci, kk, c0 + c]
                    for t in range(t0, t1):  # recompute the chunk's decays and states
                        j = t - t0
                        p = order[k, t]
                        q = order[k, min(t + _AHEAD, P - 1)]
                        _prefetch(uf, ((s * nb + bi) * P + q) * dp + c0)
                        _prefetch(df, ((k * nb + bi) * P + q) * dp + c0)
                        _prefetch(Bf, ((bi * P + q) * K + k) * n)
                        uo = ((s * nb + bi) * P + p) * dp + c0
                        xo = ((k * nb + bi) * P + p) * dp + c0
                        bo = ((bi * P + p) * K + k) * n
                        ur, xr, br = uf[uo:uo + LANES], df[xo:xo + LANES], Bf[bo:bo + n]
                        for c in range(LANES):
                            xu[c] = xr[c] * ur[c]
                        for kk in range(n):
                            bk = br[kk]
                            base = kk * LANES
                            jb = j * nl + base
                            dk, hp, hn = dec[jb:jb + LANES], hbuf[jb:jb + LANES], hbuf[jb + nl:jb + nl + LANES]
                            for c in range(LANES):
                                e = _exp32(xr[c] * a[base + c])
                                dk[c] = e
                                hn[c] = e * hp[c] + xu[c] * bk
                    for i in range(nl):
                        dA_c[i] = _ZERO
                    for t in range(t1 - 1, t0 - 1, -1):  # the adjoint, backwards
                        j = t - t0
                        p = order[k, t]
                        q = order[k, max(t - _AHEAD, 0)]
                        _prefetch(gyf, ((s * nb + bi) * P + q) * dp + c0)
                        _prefetch(duf, ((s * nb + bi) * P + q) * dp + c0)
                        _prefetch(ddf, ((k * nb + bi) * P + q) * dp + c0)
                        _prefetch(Cf, ((bi * P + q) * K + k) * n)
                        uo = ((s * nb + bi) * P + p) * dp + c0
                        xo = ((k * nb + bi) * P + p) * dp + c0
                        bo = ((bi * P + p) * K + k) * n
                        ur, xr, br, cr = uf[uo:uo + LANES], df[xo:xo + LANES], Bf[bo:bo + n], Cf[bo:bo + n]
                        dur, dxr, gyr = duf[uo:uo + LANES], ddf[xo:xo + LANES], gyf[uo:uo + LANES]
                        do = ((blk * nb + bi) * P + p) * K * n + k * n
                        dbr, dcr = dBf[do:do + n], dCf[do:do + n]
                        if not states_mode:
                            for c in range(LANES):
                                go[c] = gyr[c]
                        for c in range(LANES):
                            xu[c] = xr[c] * ur[c]
                            gx[c] = _ZERO
                            gdu[c] = _ZERO
                        for kk in range(n):
                            bk = br[kk]
                            ck = cr[kk]
                            base = kk * LANES
                            jb = j * nl + base
                            dk, hp, hn = dec[jb:jb + LANES], hbuf[jb:jb + LANES], hbuf[jb + nl:jb + nl + LANES]
                            if states_mode:
                                so = (((k * nb + bi) * n + kk) * P + p) * dp + c0
                                for c in range(LANES):
                                    g[base + c] += gsf[so + c]
                            for c in range(LANES):
                                gk = g[base + c] + ck * go[c]
                                tC[c] = go[c] * hn[c]
                                wv = gk * dk[c] * hp[c]  # dL/d(delta A_k)
                                gx[c] += wv * a[base + c]
                                dA_c[base + c] += wv * xr[c]
                                gdu[c] += gk * bk
                                tB[c] = gk * xu[c]
                                g[base + c] = gk * dk[c]
                            dbr[kk] = _tree16(tB)
                            if not states_mode:
                                dcr[kk] = _tree16(tC)
                        for c in range(LANES):
                            dxr[c] = gx[c] + gdu[c] * ur[c]
                        if first:
                            for c in range(LANES):
                                dur[c] = gdu[c] * xr[c]
                        else:
                            for c in range(LANES):
                                dur[c] += gdu[c] * xr[c]
                    for i in range(nl):
                        dA_acc[i] += dA_c[i]
                for kk in range(n):
                    for c in range(LANES):
                        dA_buf[k, bi, kk, c0 + c] = dA_acc[kk * LANES + c]


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


def _launch(kernel: Callable[..., Any], *args: Any) -> None:
    """Run ``kernel`` on torch's thread count, then give torch its count back.

    numba's OpenMP pool sets OpenMP's thread count to its own pool size, and torch reads the same
    (one libgomp): without the reset, ``torch.set_num_threads(1)`` silently became 2 threads after
    the first scan (measured: U-Net's forward then took twice the CPU time, the second thread
    spinning). See docs/cpu_scan.md.
    """
    threads = torch.get_num_threads()
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        kernel(*args)
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _parts(b: int, g: int, dg: int) -> int:
    """Channel slices per (batch, group) in the float64 backward: enough work items for every thread."""
    items = b * g
    want = 2 * numba.get_num_threads()
    return max(1, min(dg, math.ceil(want / items))) if items < want else 1


def _np(t: Tensor | None, like: Tensor, ndim: int) -> Any:
    """Contiguous numpy view of ``t``, or a 1-element placeholder of ``ndim`` dims when absent."""
    if t is None:
        return like.new_zeros((1,) * ndim).numpy()
    return t.detach().contiguous().numpy()


def _a(t: Tensor) -> Any:
    return t.detach().numpy()


class LaneScan(torch.autograd.Function):
    """The float32 recurrence on lane-layout tensors (see the kernels' comment): returns
    (y (S, b, P, dp), last state (K, b, n, dp)), or (states (K, b, n, P, dp), last) when C is None.

    Inputs: ``u`` (S, b, P, dp), ``dl`` = delta after bias/softplus (K, b, P, dp), ``AT`` (K, n, dp),
    ``Bp``, ``Cp`` (b, P, K, n), ``order`` (K, P) int64; all contiguous float32 (order int64), dp a
    multiple of LANES. Forward stores the chunk checkpoints only when a gradient is wanted.
    """

    @staticmethod
    def forward(ctx: Any, u: Tensor, dl: Tensor, AT: Tensor, Bp: Tensor, Cp: Tensor | None,
                order: Tensor) -> tuple[Tensor, Tensor]:
        S, b, P, dp = u.shape
        K, n = AT.shape[0], AT.shape[1]
        states_mode = Cp is None
        store = any(ctx.needs_input_grad[:5])
        hs = u.new_empty((K, b, math.ceil(P / CHUNK), n, dp) if store else (1, 1, 1, 1, 1))
        y = u.new_empty((1, 1, 1, 1) if states_mode else (S, b, P, dp))
        states = u.new_empty((K, b, n, P, dp) if states_mode else (1, 1, 1, 1, 1))
        last = u.new_empty(K, b, n, dp)
        # In states mode C is never used for y; B stands in so that every read is in bounds.
        Cn = _a(Bp if Cp is None else Cp)
        _launch(forward32, _a(u), _a(dl), _a(AT), _a(Bp), Cn, _a(order), states_mode, store, CHUNK,
                _a(y), _a(last), _a(hs), _a(states))
        if store:
            ctx.save_for_backward(u, dl, AT, Bp, Cp, order, hs)
        ctx.states_mode = states_mode
        return (states if states_mode else y), last

    @staticmethod
    def backward(ctx: Any, g_out: Tensor | None, g_last: Tensor | None):  # type: ignore[override]
        u, dl, AT, Bp, Cp, order, hs = ctx.saved_tensors
        states_mode = ctx.states_mode
        S, b, P, dp = u.shape
        K, n = AT.shape[0], AT.shape[1]
        nblk = dp // LANES
        placeholder = u.new_zeros(1, 1, 1, 1, 1)
        if g_out is None:
            g_out = u.new_zeros((K, b, n, P, dp) if states_mode else (S, b, P, dp))
        g_out = g_out.float().contiguous()
        gy, gstates = (u.new_zeros(1, 1, 1, 1), g_out) if states_mode else (g_out, placeholder)
        glast = g_last.float().contiguous() if g_last is not None else u.new_zeros(1, 1, 1, 1)
        du, ddl = torch.empty_like(u), torch.empty_like(dl)
        # Every (block, b, position, direction, state) of the buffers is written once: empty.
        dB_buf = u.new_empty(nblk, b, P, K, n)
        dC_buf = placeholder if states_mode else u.new_empty(nblk, b, P, K, n)
        dA_buf = torch.empty(K, b, n, dp, dtype=torch.float64)
        _launch(backward32, _a(u), _a(dl), _a(AT), _a(Bp), _a(Bp if Cp is None else Cp), _a(order),
                states_mode, g_last is not None, CHUNK, _a(hs), _a(gy), _a(gstates), _a(glast),
                _a(du), _a(ddl), _a(dB_buf), _a(dC_buf), _a(dA_buf))
        dB = dB_buf.sum(0) if nblk > 1 else dB_buf[0]
        dC = None if states_mode else (dC_buf.sum(0) if nblk > 1 else dC_buf[0])
        return du, ddl, dA_buf.sum(1).float(), dB, dC, None


def pad_lanes(t: Tensor) -> Tensor:
    """The last (channel) axis zero-padded to a multiple of LANES (unchanged when it is one)."""
    pad = -t.shape[-1] % LANES
    return F.pad(t, (0, pad)) if pad else t


def lane_scan(u: Tensor, dl: Tensor, AT: Tensor, Bp: Tensor, Cp: Tensor | None,
              order: Tensor) -> tuple[Tensor, Tensor]:
    """:class:`LaneScan` on contiguous, LANES-padded copies of its inputs (under autograd)."""
    def ready(t: Tensor | None) -> Tensor | None:
        return None if t is None else pad_lanes(t).contiguous()

    return LaneScan.apply(ready(u), ready(dl), ready(AT), Bp.contiguous(),
                          None if Cp is None else Cp.contiguous(), order)


def ss2d_forward(u: Tensor, x_dbl: Tensor, dt_weight: Tensor, dt_bias: Tensor, A: Tensor, D: Tensor,
                 order: Tensor, dt_rank: int) -> Tensor:
    """SS2D's four-traversal scan without gradients, in one kernel pass (see ss2d_forward32).

    ``u`` (b, P, di) channels-last, ``x_dbl`` (b, P, K, dt_rank + 2n) the per-pixel x_proj
    output, ``dt_weight`` (K, di, dt_rank), ``dt_bias`` (K, di), ``A`` (K*di, n) <= 0 (SS2D's
    -exp(A_log): the kernel's exp skips the upper clamp), ``D`` (K*di,),
    ``order`` (K, P); all float32. Returns y (b, P, di) = sum over traversals of the scan output
    (softplus'd delta, D skip included), each put back at its pixels.
    """
    b, length, di = u.shape
    k, n = order.shape[0], A.shape[1]
    AT = pad_lanes(A.view(k, di, n).transpose(1, 2)).contiguous()
    WT = pad_lanes(dt_weight.transpose(1, 2)).contiguous()  # (K, r, dp)
    bias = pad_lanes(dt_bias).contiguous()
    up = pad_lanes(u).contiguous()
    y = torch.empty_like(up)
    _launch(ss2d_forward32, _a(up), _a(x_dbl.contiguous()), _a(WT), _a(bias), _a(AT), _a(order), dt_rank, _a(y))
    return y[..., :di].addcmul_(u, D.view(k, di).sum(0))  # the D skip of the K directions at once


@functools.lru_cache(maxsize=64)
def identity_order(k: int, length: int) -> Tensor:
    """Every direction reads the positions in order: the plain (grouped) selective scan."""
    # Cached across calls: built outside inference mode so that a training step may save it
    # for backward after a prediction cached it (an inference tensor cannot be saved).
    with torch.inference_mode(False):
        return torch.arange(length).expand(k, length).contiguous()


def _scan32(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor | None) -> tuple[Tensor, Tensor]:
    """The plain selective scan through the lane kernels: group g is direction g of the layout."""
    b, d, length = u.shape
    g, n = B.shape[1], A.shape[1]
    dg = d // g

    def lanes(t: Tensor) -> Tensor:  # (b, d, l) -> (g, b, l, dg)
        return t.view(b, g, dg, length).permute(1, 0, 3, 2)

    AT = A.view(g, dg, n).transpose(1, 2)  # (g, n, dg)
    Bp = B.permute(0, 3, 1, 2)  # (b, l, g, n): a step reads n contiguous values
    Cp = None if C is None else C.permute(0, 3, 1, 2)
    out, last = lane_scan(lanes(u), lanes(delta), AT, Bp, Cp, identity_order(g, length))
    last = last[..., :dg].permute(1, 0, 3, 2).reshape(b, d, n)  # (g, b, n, dg) -> (b, d, n)
    if C is None:  # (g, b, n, l, dg) -> (b, d, n, l)
        return out[..., :dg].permute(1, 0, 4, 2, 3).reshape(b, d, n, length), last
    return out[..., :dg].permute(1, 0, 3, 2).reshape(b, d, length), last


class _FusedScan64(torch.autograd.Function):
    """float64 inputs: y = sum_n C h (or the states h when C is None) and the last state, in the
    scalar generic kernels (the float64 reference; nothing here is tuned)."""

    @staticmethod
    def forward(ctx: Any, u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor | None) -> tuple[Tensor, Tensor]:
        states_mode = C is None
        b, d, length = u.shape
        n = A.shape[1]
        store = any(ctx.needs_input_grad)
        n_chunks = math.ceil(length / CHUNK)
        Bt = B.transpose(-1, -2).contiguous()  # (b, g, l, n): a step reads n contiguous values
        Ct = None if C is None else C.transpose(-1, -2).contiguous()
        hs = u.new_empty((b, d, n_chunks, n) if store else (1, 1, 1, 1))
        last = u.new_empty(b, d, n)
        y = u.new_empty((1, 1, 1) if states_mode else (b, d, length))
        states = u.new_empty((b, d, n, length) if states_mode else (1, 1, 1, 1))
        _launch(forward_kernel, _a(u), _a(dt), _a(A), Bt.numpy(), _np(Ct, u, 4), _np(None, u, 1),
                _np(None, u, 3), _np(None, u, 1), _flags(False, False, False, False, states_mode, store),
                _consts(u.dtype), CHUNK, y.numpy(), last.numpy(), hs.numpy(), states.numpy())
        if store:
            ctx.save_for_backward(u, dt, A, Bt, Ct, hs)
        ctx.states_mode = states_mode
        return (states if states_mode else y), last

    @staticmethod
    def backward(ctx: Any, g_out: Tensor | None, g_last: Tensor | None):  # type: ignore[override]
        states_mode = ctx.states_mode
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
        _launch(backward_kernel, _a(u), _a(dt), _a(A), _a(Bt), _np(Ct, u, 4), _np(None, u, 1),
                _np(None, u, 3), _np(None, u, 1),
                _flags(False, False, False, False, states_mode, g_last is not None),
                _consts(u.dtype), CHUNK, parts, _a(hs), gy.numpy(), gstates.numpy(),
                glast.numpy(), du.numpy(), ddt.numpy(), u.new_empty(1, 1, 1).numpy(),
                dB_buf.numpy(), dC_buf.numpy(), dA_buf.numpy(), u.new_empty(b, d).numpy(),
                u.new_empty(b, d).numpy())
        dC = None if states_mode else dC_buf.sum(0).transpose(-1, -2)
        return du, ddt, dA_buf.sum(0), dB_buf.sum(0).transpose(-1, -2), dC


def _flags(*flags: bool) -> Any:
    return np.array(flags, dtype=np.bool_)


def _consts(dtype: torch.dtype) -> Any:
    # torch's softplus threshold (20): above it softplus(x) = x, as F.softplus does.
    return torch.tensor([0.0, 1.0, 20.0], dtype=dtype).numpy()


def _fused_core(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor | None) -> tuple[Tensor, Tensor]:
    if u.dtype == torch.float32:
        return _scan32(u, delta, A, B, C)
    return _FusedScan64.apply(u.contiguous(), delta.contiguous(), A.contiguous(), B, C)


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
    if A.shape[-1] > MAX_STATE:
        return f"the fused scan takes d_state <= {MAX_STATE}, got {A.shape[-1]}"
    return unavailable_reason()


__all__ = ["CHUNK", "LANES", "MAX_STATE", "LaneScan", "fused_scan", "identity_order", "lane_scan", "pad_lanes", "ss2d_forward",
           "unavailable_reason", "unsupported_reason"]
