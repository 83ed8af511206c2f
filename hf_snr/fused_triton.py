"""Fused CUDA kernel (Triton) for the SNRAdamW step: the API of :mod:`hf_snr.fused_cpu` for CUDA tensors.

Same functions (:func:`step`, :func:`moments`, :func:`update`, :func:`gate`), argument names,
per-tensor scalar lists, row layout and math as ``fused_cpu`` (see its module doc; the kernel
follows ``_snr_cpu.c`` operation by operation: explicit fmas where the C code has them, IEEE
division and square root (``div_rn``, ``sqrt_rn``), no other contraction), with these differences:

* **No host synchronisation.** Nothing in a call reads a device value on the host:

  - the statistics (``want_stats=True``) come back as a float64 tensor of shape (5,) **on the
    device** — ``(mask_sum, mask_count, active_count, signal, noise)`` — not as 5 Python floats
    (``fused_cpu``); call ``.tolist()`` when (and only when) you need them on the host;
  - ``found_inf`` (optional, every function but :func:`gate`): a one-element float32 tensor on the
    device (a GradScaler's ``found_inf``, an all-reduced overflow flag). When it is nonzero the
    call is a no-op for every tensor — p, m, v, s, sq untouched — decided inside the kernel (each
    program loads the flag and then has an empty range: no load or store of the tensors); the
    statistics and the row sums of such a call are zeros (the parameters' autograd version
    counters are still bumped: the host does not know);
  - bc1, bc2, bcr, noise_scale and gate_open may be Python numbers or sequences (uploaded through
    pinned memory without waiting), or tensors already on the device (used as they are);
  - the pointer arrays and the work list are built on the host once per set of tensors (cached by
    their data_ptrs and numels) and kept on the device; only the gradients' pointer array is
    uploaded again, when the gradients' addresses change.

* **Reductions are two-stage and deterministic**: every program writes its partial sums (float64)
  to its own slot, then torch's sum (statistics) or a second small kernel (row sums, one program
  per row summing that row's blocks in order) combines them: the same inputs give the same bits.
* **Work layout**: one launch per dtype signature (p/g, s, p0) over a grid of (tensor, range)
  items, each a program walking its range in blocks of ``BLOCK`` = 1024 elements (4 warps): one
  block per item, or up to 64 for groups of more than 16384 blocks (a short work list for large
  models). For the row sums of :func:`moments` the items do not cross rows (a row shorter than a
  block is one program: rows of a few elements leave most lanes idle), for :func:`update` the row
  gate is gathered per element, so blocks span rows. ``num_threads`` is accepted and ignored.
  Full blocks are walked with an all-true mask and, when every address of the launch is 16-byte
  aligned (the host checks: the caching allocator's blocks are, a view at an odd offset need
  not be), with alignment hints, so that they use 16-byte vector loads and stores; the tail of a
  range is masked. The device-side arrays are uploaded on the current stream: a group used from another stream right
  after its first call needs that stream to wait on this one. CUDA graph capture is not supported
  (the uploads and the plan cache live on the host).
* bf16 values are read as fp32 and stored rounded to nearest even with Triton's cast
  (``cvt.rn.bf16.f32``). Under the Triton interpreter (``TRITON_INTERPRET=1``, used by the tests on
  CPU) the cast is done with integer arithmetic instead (the interpreter's fp32 -> bf16 conversion
  rounds ties up and mishandles a carry into the exponent); the two agree on every non-NaN value
  (a NaN is stored as 0x7fc0 by the integer path, as the CPU kernel does, and as the canonical
  NaN by the cast).
* Tensors must be CUDA tensors on one device (CPU tensors when the interpreter is on; it must be
  switched on before triton is first imported in the process).

:func:`available` is False, with :func:`unavailable_reason`, when triton is not installed, when no
CUDA device is visible, or when the kernel fails to compile or run (checked once, on a tiny
problem: the one place where this module waits for the device). Under the interpreter it is True
without a CUDA device.
"""

from __future__ import annotations

import os
import struct
import threading
from array import array
from typing import Sequence

import torch

from . import _fused_common as _common

__all__ = ["available", "unavailable_reason", "step", "moments", "update", "gate", "BLOCK"]

BLOCK = 1024  # elements per block (a program walks one or more blocks)
_ROWSUM_CHUNK = 128  # items a stage-2 program adds per iteration
_TARGET_PROGRAMS = 16384  # a group of more blocks than this gives each program several blocks...
_MAX_ITEM_BLOCKS = 64  # ...at most this many
_NUM_WARPS = 4

_FP32_MAX = _common.FP32_MAX
_describe = _common.describe
_PASS_FULL, _PASS_MOMENTS, _PASS_UPDATE = _common.PASS_FULL, _common.PASS_MOMENTS, _common.PASS_UPDATE
_NSTATS = 5

_F32, _BF16 = torch.float32, torch.bfloat16
_ptr = torch.Tensor.data_ptr
_numel = torch.Tensor.numel
_contig = torch.Tensor.is_contiguous
_dtype = torch.Tensor.dtype.__get__

try:
    _increment_version = torch._C._increment_version  # takes a list (torch >= 2.4)
    _increment_version([])
except (AttributeError, TypeError):  # pragma: no cover - older torch: one tensor at a time
    def _increment_version(ts):
        for t in ts:
            torch.autograd.graph.increment_version(t)


def _f32(x: float) -> float:
    """x rounded to fp32 (as the kernel receives it)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


# -- the kernels (defined at first use: triton is imported lazily, and @triton.jit picks the
#    interpreter or the compiler when it decorates) -------------------------------------------------
_lock = threading.Lock()
_kernels: dict = {}  # interpret flag -> (step kernel, row-sum kernel)
_status: dict = {}  # interpret flag -> reason (None: available)


def _define_kernels():
    # Triton resolves the names a kernel uses (tl, the helpers) in the module's globals, not in this
    # function's scope: they are published there (one mode, compiled or interpreted, at a time).
    import triton
    import triton.language as tl

    g = globals()
    g["triton"], g["tl"] = triton, tl

    @triton.jit
    def _tptr(addr, BF: tl.constexpr, MANUAL: tl.constexpr, ALIGNED: tl.constexpr):
        """The int64 address as a typed pointer (16-byte aligned when ALIGNED: the host checked)."""
        if BF:
            if MANUAL:
                ptr = addr.to(tl.pointer_type(tl.uint16))
            else:
                ptr = addr.to(tl.pointer_type(tl.bfloat16))
        else:
            ptr = addr.to(tl.pointer_type(tl.float32))
        if ALIGNED:
            ptr = tl.multiple_of(ptr, 16)
        return ptr

    @triton.jit
    def _ld(ptr, offs, msk, BF: tl.constexpr, MANUAL: tl.constexpr):
        """Load fp32 or bf16 values (as fp32) at ptr + offs (masked lanes: 0)."""
        if BF and MANUAL:
            h = tl.load(ptr + offs, mask=msk, other=0)
            x = (h.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        else:
            x = tl.load(ptr + offs, mask=msk, other=0.0).to(tl.float32)
        return x

    @triton.jit
    def _st(ptr, offs, msk, x, BF: tl.constexpr, MANUAL: tl.constexpr):
        """Store fp32 x as fp32 or bf16 (nearest even); returns the stored value as fp32."""
        if BF:
            if MANUAL:  # as c10::BFloat16 / the CPU kernel: (u + 0x7fff + lsb) >> 16, NaN -> 0x7fc0
                u = x.to(tl.uint32, bitcast=True)
                r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
                r = tl.where(x != x, 0x7FC0, r)
                tl.store(ptr + offs, r.to(tl.uint16), mask=msk)
                y = (r << 16).to(tl.float32, bitcast=True)
            else:
                h = x.to(tl.bfloat16, fp_downcast_rounding="rtne")
                tl.store(ptr + offs, h, mask=msk)
                y = h.to(tl.float32)
        else:
            tl.store(ptr + offs, x, mask=msk)
            y = x
        return y

    @triton.jit
    def _clamp_min(x, lo):  # x < lo ? lo : x (NaN stays NaN, as the CPU kernel)
        return tl.where(x < lo, lo, x)

    @triton.jit
    def _block(offs, msk, base, pP, pM, pV, pS, pP0, pSQ, pG, q_rows, row_first, row_len,
               bc1, bc2, bcr, ns, opn, beta1, beta2, rho, omb1, omb2, omr, lr, eps, decay_mul, lrwd, alpha,
               softness, c, mb_a, mb_b, acc0, acc1, acc2, acc3, acc4,
               PASS: tl.constexpr, MASK: tl.constexpr, SIGNAL: tl.constexpr, VARIANCE: tl.constexpr,
               DECAY: tl.constexpr, WANT_STATS: tl.constexpr, ROWS: tl.constexpr, LERP_SMALL: tl.constexpr,
               P_BF16: tl.constexpr, S_BF16: tl.constexpr, P0_BF16: tl.constexpr, MANUAL: tl.constexpr,
               NEED_G: tl.constexpr, NEED_MUSIG: tl.constexpr, BLOCK: tl.constexpr):
        """One block: the elements offs (where msk) of one tensor. Returns the updated sums."""
        if NEED_G:
            g = _ld(pG, offs, msk, P_BF16, MANUAL)
        else:
            g = tl.zeros([BLOCK], tl.float32)
        m = tl.load(pM + offs, mask=msk, other=0.0)
        v = tl.load(pV + offs, mask=msk, other=0.0)
        if PASS != 2:
            s_old = _ld(pS, offs, msk, S_BF16, MANUAL)
            if VARIANCE == 0:
                d = g - m  # m: the previous m
                s_new = tl.fma(omr * d, d, s_old * rho)
            else:
                sq = tl.load(pSQ + offs, mask=msk, other=0.0)
                est = _clamp_min(sq * mb_a - (g * g) * mb_b, 0.0)
                s_new = tl.fma(omr, est, s_old * rho)
                tl.store(pSQ + offs, tl.zeros([BLOCK], tl.float32), mask=msk)
            s = _st(pS, offs, msk, s_new, S_BF16, MANUAL)  # sig2 uses the stored (rounded) value
            if LERP_SMALL:  # ATen's lerp: |w| < 0.5 ? fma(w, g - m, m) : fma(w - 1, g - m, g)
                m = tl.fma(omb1, g - m, m)
            else:
                m = tl.fma(omb1 - 1.0, g - m, g)
            v = tl.fma(omb2 * g, g, v * beta2)
            tl.store(pM + offs, m, mask=msk)
            tl.store(pV + offs, v, mask=msk)
        elif NEED_MUSIG:
            s = _ld(pS, offs, msk, S_BF16, MANUAL)
        else:
            s = tl.zeros([BLOCK], tl.float32)
        mh = tl.div_rn(m, bc1)
        if NEED_MUSIG:
            if SIGNAL == 0:
                mu2 = mh * mh
            else:
                mu2 = g * g
            sig2 = tl.div_rn(s, bcr) * ns
            # a huge finite gradient overflows mu2 / sig2 to inf: clamped to fp32's max, as the CPU kernel
            mu2 = tl.where(mu2 > 3.4028234663852886e38, 3.4028234663852886e38, mu2)
            sig2 = tl.where(sig2 > 3.4028234663852886e38, 3.4028234663852886e38, sig2)
        else:
            mu2 = tl.zeros([BLOCK], tl.float32)
            sig2 = tl.zeros([BLOCK], tl.float32)
        if PASS == 1:
            if ROWS:  # the item lies in one row
                acc3 += tl.sum(tl.where(msk, mu2.to(tl.float64), 0.0), axis=0)
                acc4 += tl.sum(tl.where(msk, sig2.to(tl.float64), 0.0), axis=0)
        else:
            # the gate
            if ROWS:  # the row of each element, without a 64-bit division per element
                r0 = base // row_len
                local = offs - r0 * row_len  # in [0, row_len + BLOCK)
                if row_len >= BLOCK:  # the block spans at most two rows
                    r = r0 + (local >= row_len).to(tl.int64)
                else:  # local < 2 BLOCK: 32-bit division
                    r = r0 + (local.to(tl.int32) // row_len.to(tl.int32)).to(tl.int64)
                q = tl.load(q_rows + row_first + r, mask=msk, other=0.0)
            elif MASK == 0:
                q = tl.div_rn(mu2, _clamp_min(mu2 + c * sig2, 1.1754943508222875e-38))
            elif MASK == 1:
                e = _clamp_min(mu2 - alpha * sig2, 0.0)
                q = tl.div_rn(e, _clamp_min(e + softness * sig2, 1.1754943508222875e-38))
            else:
                q = tl.where(mu2 > alpha * sig2, 1.0, 0.0)
            q = tl.where(opn != 0.0, 1.0, q)
            # the update
            den = tl.sqrt_rn(tl.div_rn(v, bc2)) + eps
            upd = q * mh
            p = _ld(pP, offs, msk, P_BF16, MANUAL)
            step_ = tl.div_rn(-lr * upd, den)
            if DECAY == 0:
                p = p * decay_mul + step_
            else:
                p0 = _ld(pP0, offs, msk, P0_BF16, MANUAL)
                p = tl.fma(lrwd, p0 - p, p) + step_
            _st(pP, offs, msk, p, P_BF16, MANUAL)
            if WANT_STATS:
                u = tl.div_rn(q * lr, den)
                seen = msk & (v > 0.0)
                acc0 += tl.sum(tl.where(seen, q, 0.0).to(tl.float64), axis=0)
                acc1 += tl.sum(seen.to(tl.int32), axis=0)  # counts: exact integers
                acc2 += tl.sum((seen & (q > 0.5)).to(tl.int32), axis=0)
                acc3 += tl.sum(tl.where(msk, (u * mu2).to(tl.float64), 0.0), axis=0)
                acc4 += tl.sum(tl.where(msk, (u * sig2).to(tl.float64), 0.0), axis=0)
        return acc0, acc1, acc2, acc3, acc4

    @triton.jit
    def snr_kernel(ptrs, gptrs, items, meta, tsc, q_rows, partials, flag, T,
                   bc1_s, bc2_s, bcr_s, ns_s, open_s,
                   beta1, beta2, rho, omb1, omb2, omr, lr, eps, decay_mul, lrwd, alpha, softness, c, mb_a, mb_b,
                   PASS: tl.constexpr, MASK: tl.constexpr, SIGNAL: tl.constexpr, VARIANCE: tl.constexpr,
                   DECAY: tl.constexpr, WANT_STATS: tl.constexpr, ROWS: tl.constexpr, PER_TENSOR: tl.constexpr,
                   HAS_FLAG: tl.constexpr, LERP_SMALL: tl.constexpr, P_BF16: tl.constexpr, S_BF16: tl.constexpr,
                   P0_BF16: tl.constexpr, MANUAL: tl.constexpr, NEED_G: tl.constexpr, NEED_MUSIG: tl.constexpr,
                   ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
        # ptrs: int64 [6, T] addresses of p, m, v, s, p0, sq; gptrs: int64 [T] of g;
        # items: int64 [programs, 4] = (tensor, first element, end element, row or -1);
        # meta: int64 [T, 2] = (first row of the tensor, row length) (ROWS);
        # tsc: fp32 [T, 5] = (bc1, bc2, bcr, noise_scale, open) when PER_TENSOR, else the *_s scalars;
        # partials: fp64 [programs, 5] statistics or [programs, 2] row sums (mu2, sig2).
        # ALIGNED: every address 16-byte aligned and every item starting at a multiple of 8 elements.
        pid = tl.program_id(0)
        it = items + pid.to(tl.int64) * 4
        k = tl.load(it)
        start = tl.load(it + 1)
        end = tl.load(it + 2)
        if HAS_FLAG:  # found_inf: an empty range, no load or store at all
            f = tl.load(flag)
            end = tl.where(f == 0.0, end, start)
        if PER_TENSOR:
            bc1 = tl.load(tsc + k * 5)
            bc2 = tl.load(tsc + k * 5 + 1)
            bcr = tl.load(tsc + k * 5 + 2)
            ns = tl.load(tsc + k * 5 + 3)
            opn = tl.load(tsc + k * 5 + 4)
        else:
            bc1 = bc1_s
            bc2 = bc2_s
            bcr = bcr_s
            ns = ns_s
            opn = open_s
        pP = _tptr(tl.load(ptrs + k), P_BF16, MANUAL, ALIGNED)
        pM = _tptr(tl.load(ptrs + T + k), False, MANUAL, ALIGNED)
        pV = _tptr(tl.load(ptrs + 2 * T + k), False, MANUAL, ALIGNED)
        pS = _tptr(tl.load(ptrs + 3 * T + k), S_BF16, MANUAL, ALIGNED)
        pP0 = _tptr(tl.load(ptrs + 4 * T + k), P0_BF16, MANUAL, ALIGNED)
        pSQ = _tptr(tl.load(ptrs + 5 * T + k), False, MANUAL, ALIGNED)
        pG = _tptr(tl.load(gptrs + k), P_BF16, MANUAL, ALIGNED)
        if ROWS:
            row_first = tl.load(meta + k * 2)
            row_len = tl.maximum(tl.load(meta + k * 2 + 1), 1)
        else:
            row_first = start
            row_len = start + 1
        acc0 = tl.zeros([BLOCK], tl.float64).sum(axis=0)  # the item's sums, block by block, in order
        acc1 = tl.zeros([BLOCK], tl.int64).sum(axis=0)
        acc2 = acc1
        acc3 = acc0
        acc4 = acc0
        lanes = tl.arange(0, BLOCK).to(tl.int64)
        # full blocks (an all-true mask: vector loads when ALIGNED), then the tail
        full_end = start + (end - start) // BLOCK * BLOCK
        every = tl.full([BLOCK], 1, tl.int1)
        for base in range(start, full_end, BLOCK):
            if ALIGNED:
                offs = tl.max_contiguous(tl.multiple_of(base + lanes, 8), 8)
            else:
                offs = base + lanes
            acc0, acc1, acc2, acc3, acc4 = _block(
                offs, every, base, pP, pM, pV, pS, pP0, pSQ, pG, q_rows, row_first, row_len,
                bc1, bc2, bcr, ns, opn, beta1, beta2, rho, omb1, omb2, omr, lr, eps, decay_mul, lrwd, alpha,
                softness, c, mb_a, mb_b, acc0, acc1, acc2, acc3, acc4,
                PASS, MASK, SIGNAL, VARIANCE, DECAY, WANT_STATS, ROWS, LERP_SMALL, P_BF16, S_BF16, P0_BF16,
                MANUAL, NEED_G, NEED_MUSIG, BLOCK)
        if full_end < end:
            offs = full_end + lanes
            acc0, acc1, acc2, acc3, acc4 = _block(
                offs, offs < end, full_end, pP, pM, pV, pS, pP0, pSQ, pG, q_rows, row_first, row_len,
                bc1, bc2, bcr, ns, opn, beta1, beta2, rho, omb1, omb2, omr, lr, eps, decay_mul, lrwd, alpha,
                softness, c, mb_a, mb_b, acc0, acc1, acc2, acc3, acc4,
                PASS, MASK, SIGNAL, VARIANCE, DECAY, WANT_STATS, ROWS, LERP_SMALL, P_BF16, S_BF16, P0_BF16,
                MANUAL, NEED_G, NEED_MUSIG, BLOCK)
        if PASS == 1:
            if ROWS:
                pp = partials + pid.to(tl.int64) * 2
                tl.store(pp, acc3)
                tl.store(pp + 1, acc4)
        elif WANT_STATS:
            pp = partials + pid.to(tl.int64) * 5
            tl.store(pp, acc0)
            tl.store(pp + 1, acc1.to(tl.float64))
            tl.store(pp + 2, acc2.to(tl.float64))
            tl.store(pp + 3, acc3)
            tl.store(pp + 4, acc4)

    @triton.jit
    def rowsum_kernel(partials, row_items, out, CHUNK: tl.constexpr):
        # out[r] = the sum, in block order, of the partials of row r's blocks [first, first + count)
        r = tl.program_id(0).to(tl.int64)
        first = tl.load(row_items + r * 2)
        count = tl.load(row_items + r * 2 + 1)
        a0 = tl.zeros([CHUNK], tl.float64)
        a1 = tl.zeros([CHUNK], tl.float64)
        for i in range(0, count, CHUNK):
            idx = i + tl.arange(0, CHUNK).to(tl.int64)
            mk = idx < count
            a0 += tl.load(partials + (first + idx) * 2, mask=mk, other=0.0)
            a1 += tl.load(partials + (first + idx) * 2 + 1, mask=mk, other=0.0)
        tl.store(out + r * 2, tl.sum(a0, axis=0))
        tl.store(out + r * 2 + 1, tl.sum(a1, axis=0))

    g.update(_tptr=_tptr, _ld=_ld, _st=_st, _clamp_min=_clamp_min, _block=_block)
    return snr_kernel, rowsum_kernel


def _get_kernels():
    interp = _interpret()
    ks = _kernels.get(interp)
    if ks is None:
        with _lock:
            ks = _kernels.get(interp)
            if ks is None:
                _kernels.clear()  # the helpers in globals() are those of the last definition
                ks = _kernels[interp] = _define_kernels()
    return ks


def _probe():
    """None when the kernel runs here, else why not."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"triton is not installed or fails to import ({type(e).__name__}: {e})"
    interp = _interpret()
    if not interp:
        try:
            has_cuda = torch.cuda.is_available() and torch.cuda.device_count() > 0
        except Exception as e:  # pragma: no cover
            return f"no CUDA device ({type(e).__name__}: {e})"
        if not has_cuda:
            why = "torch was built without CUDA" if torch.version.cuda is None and getattr(
                torch.version, "hip", None) is None else "torch.cuda.is_available() is False"
            return f"no CUDA device ({why})"
    try:
        _get_kernels()
        dev = torch.device("cpu") if interp else torch.device("cuda", torch.cuda.current_device())
        n = 3
        p, g = torch.ones(n, device=dev), torch.full((n,), 0.5, device=dev)
        m, v, s = torch.zeros(n, device=dev), torch.zeros(n, device=dev), torch.zeros(n, device=dev)
        st = _run(_PASS_FULL, [p], [g], [m], [v], [s], lr=0.1, beta1=0.9, beta2=0.99, rho=0.9, eps=1e-8,
                  bc1=0.1, bc2=0.01, bcr=0.1, gate_open=True, want_stats=True, _probing=True)
        if not interp:
            torch.cuda.synchronize(dev)
        _plans.clear()
        if not (torch.isfinite(p).all() and bool(p.lt(1.0).all()) and float(st[1]) == n):
            return f"the Triton kernel gave wrong results on a test problem (p={p.tolist()}, stats={st.tolist()})"
    except Exception as e:
        return f"the Triton kernel failed to compile or run: {type(e).__name__}: {str(e)[:400]}"
    return None


def _reset() -> None:
    """Forget the kernels, the availability check and the cached plans (tests)."""
    with _lock:
        _kernels.clear()
        _status.clear()
        _plans.clear()


def _load_status():
    interp = _interpret()
    if interp not in _status:
        reason = _probe()
        _status[interp] = reason
    return _status[interp]


def available() -> bool:
    """Whether the Triton kernel runs here (triton importable, a CUDA device, the kernel compiles)."""
    return _load_status() is None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True)."""
    return _load_status()


# -- argument checking (cached per set of state tensors) -------------------------------------------
_plans: dict = {}
_MAX_PLANS = 64


class _Sub:
    """The tensors of one dtype signature (p/g, s, p0): one launch."""
    __slots__ = ("idx", "idx_dev", "ptrs_dev", "meta_dev", "items_lo", "items_hi", "row_lo", "row_hi",
                 "p_bf16", "s_bf16", "p0_bf16", "gkey", "gptrs_dev", "g_aligned", "aligned", "rows_aligned")


class _Plan:
    __slots__ = ("numels", "pdtype", "pdtypes", "has_rows", "rows", "subs", "device", "items_dev", "nitems",
                 "ritems_dev", "nritems", "row_items_dev")


def _device_ok(dev: torch.device) -> bool:
    return dev.type == "cuda" or (dev.type == "cpu" and _interpret())


def _check_list(name, ts, n, dtypes, numels, device=None):
    """Check a list of tensors (on a CUDA device, or the interpreter's CPU; on ``device`` when given)."""
    def problem(t):
        if not _device_ok(t.device):
            return "expected a CUDA tensor"
        if device is not None and t.device != device:
            return f"the parameters on {device}"
        return None

    return _common.check_list("fused_triton", name, ts, n, dtypes, numels, problem)


_to_dev = _common.to_device


def _plan(params, exp_avgs, exp_avg_sqs, exp_vars, anchors, sq_sums, row_lens, ptrs, with_numels):
    """Validate the per-group tensors once per distinct (pointers, rows); cheap afterwards.

    As fused_cpu's: the gradients are checked on every call (:func:`_grads_ok`). The plan also holds
    the device-side pointer arrays, work lists (one (tensor, block) item per program) and row tables.
    """
    key = (ptrs, row_lens if row_lens is None or isinstance(row_lens, str) else tuple(row_lens),
           array("q", map(_numel, params)).tobytes() if with_numels else None)
    plan = _plans.get(key)
    if plan is not None:
        return plan
    numels = list(map(_numel, params))
    n = len(params)
    pd = _check_list("params", params, n, (_F32, _BF16), None)
    dev = params[0].device if n else None
    _check_list("exp_avgs", exp_avgs, n, (_F32,), numels, dev)
    _check_list("exp_avg_sqs", exp_avg_sqs, n, (_F32,), numels, dev)
    sd = _check_list("exp_vars", exp_vars, n, (_F32, _BF16), numels, dev)
    p0d = _check_list("anchors", anchors, n, (_F32, _BF16), numels, dev) if anchors is not None else [None] * n
    if sq_sums is not None:
        _check_list("sq_sums", sq_sums, n, (_F32,), numels, dev)
    for i, p in enumerate(params):
        if p.device != dev:
            raise ValueError(f"fused_triton: params[{i}] is on {p.device}, params[0] on {dev}")
    plan = _Plan()
    plan.device = dev
    (rl, nrows, off), sigs = _common.plan_layout("fused_triton", plan, params, numels, pd, sd, p0d, row_lens)
    # items: (local tensor index, start, end, row); element items (BLOCK chunks of each tensor), and,
    # with rows, row items (chunks of each row) for the row sums of moments(). An item is `span`
    # elements (`span // BLOCK` blocks, one program walking them in order), more than one block
    # only for groups large enough to fill the device anyway: a short work list, built once.
    blocks = sum(-(-x // BLOCK) for x in numels)
    span = BLOCK * max(1, min(_MAX_ITEM_BLOCKS, blocks // _TARGET_PROGRAMS))
    items, ritems = [], []
    row_items = [[0, 0] for _ in range(plan.rows)]
    plan.subs = []
    for (pb, sb, p0b), idx in sigs.items():
        sub = _Sub()
        sub.idx = None if len(idx) == n else idx
        sub.idx_dev = None
        sub.items_lo = len(items) // 4
        for j, i in enumerate(idx):
            for a in range(0, numels[i], span):
                items += (j, a, min(a + span, numels[i]), -1)
        sub.items_hi = len(items) // 4
        sub.row_lo = len(ritems) // 4
        if rl is not None:
            for j, i in enumerate(idx):
                for r in range(nrows[i]):
                    row = off[i] + r
                    row_items[row][0] = len(ritems) // 4
                    lo, hi = r * rl[i], (r + 1) * rl[i]
                    for a in range(lo, hi, span):
                        ritems += (j, a, min(a + span, hi), row)
                    row_items[row][1] = len(ritems) // 4 - row_items[row][0]
            sub.meta_dev = _to_dev([[off[i], rl[i]] for i in idx], torch.int64, dev).reshape(-1, 2)
        else:
            sub.meta_dev = None
        sub.row_hi = len(ritems) // 4
        sub.p_bf16, sub.s_bf16, sub.p0_bf16 = bool(pb), bool(sb), bool(p0b)
        sub.ptrs_dev = _to_dev([0] * (6 * len(idx)) if not idx else
                               [ptrs_i for j in range(6) for ptrs_i in _sub_ptrs(ptrs, n, j, idx)],
                               torch.int64, dev)
        sub.gkey = None
        sub.gptrs_dev = None
        sub.g_aligned = False
        # vector loads: every address 16-byte aligned (the caching allocator's blocks are; a view at an
        # odd offset is not), and the row items (row sums) starting at multiples of 8 elements
        sub.aligned = all(x % 16 == 0 for j in range(6) for x in _sub_ptrs(ptrs, n, j, idx))
        sub.rows_aligned = rl is None or all(rl[i] % 8 == 0 for i in idx)
        plan.subs.append(sub)
    plan.nitems = len(items) // 4
    plan.nritems = len(ritems) // 4
    plan.items_dev = _to_dev(items, torch.int64, dev).reshape(-1, 4) if items else None
    plan.ritems_dev = _to_dev(ritems, torch.int64, dev).reshape(-1, 4) if ritems else None
    plan.row_items_dev = _to_dev(row_items, torch.int64, dev).reshape(-1, 2) if row_items else None
    if len(_plans) >= _MAX_PLANS:
        _plans.clear()
    _plans[key] = plan
    return plan


def _sub_ptrs(ptrs_bytes, n, j, idx):
    """Array j (p, m, v, s, p0, sq) of the packed host pointers, for the tensors idx."""
    a = array("q")
    a.frombytes(ptrs_bytes)
    return [a[j * n + i] for i in idx]


def _on_plan_device(grads, plan) -> bool:
    dev = plan.device
    return all(g.device == dev for g in grads)


def _grads_ok(grads, plan, n):
    return _common.grads_match("fused_triton", grads, plan, n, _on_plan_device)


def _name_bad_grad(grads, plan):
    _check_list("grads", grads, len(grads), [(d,) for d in plan.pdtypes], plan.numels, plan.device)


_SCALAR_NAMES = ("bc1", "bc2", "bcr", "noise_scale", "gate_open")


def _tensor_scalars(vals, n, device):
    """(shared fp32 scalars, None) when all are plain numbers, else (None, device tensor [n, 5])."""
    if not any(isinstance(x, (Sequence, torch.Tensor)) for x in vals):
        return tuple(float(x) for x in vals[:4]) + (1.0 if vals[4] else 0.0,), None
    if any(isinstance(x, torch.Tensor) and x.device == device for x in vals):  # on the device: no copy back
        cols = []
        for name, x in zip(_SCALAR_NAMES, vals):
            if isinstance(x, torch.Tensor):
                if x.numel() not in (1, n):
                    raise ValueError(f"fused_triton: {name} has {x.numel()} values for {n} tensors")
                x = x.to(device=device).reshape(-1)
                x = (x != 0).float() if name == "gate_open" else x.float()
                cols.append(x.expand(n))
            else:
                if isinstance(x, Sequence):
                    x = [float(bool(e)) if name == "gate_open" else float(e) for e in x]
                    if len(x) != n:
                        raise ValueError(f"fused_triton: {name} has {len(x)} values for {n} tensors")
                    cols.append(_to_dev(x, _F32, device))
                else:
                    cols.append(torch.full((n,), float(bool(x)) if name == "gate_open" else float(x),
                                           dtype=_F32, device=device))
        return None, torch.stack(cols, 1).contiguous()
    cols = []
    for name, x in zip(_SCALAR_NAMES, vals):
        if isinstance(x, (Sequence, torch.Tensor)):
            if isinstance(x, torch.Tensor):  # a host tensor (a device one takes the path above)
                x = x.reshape(-1).tolist()
            x = [float(bool(e)) for e in x] if name == "gate_open" else [float(e) for e in x]
            if len(x) != n:
                raise ValueError(f"fused_triton: {name} has {len(x)} values for {n} tensors")
        else:
            x = [float(bool(x)) if name == "gate_open" else float(x)] * n
        cols.append(x)
    return None, _to_dev([list(r) for r in zip(*cols)], _F32, device).reshape(-1, 5)






def _run(pass_, params, grads, exp_avgs, exp_avg_sqs, exp_vars, *, anchors=None, sq_sums=None, row_lens=None,
         q_rows=None, lr=0.0, beta1=0.9, beta2=0.999, rho=0.999, eps=1e-8, weight_decay=0.0, bc1=1.0, bc2=1.0,
         bcr=1.0, alpha=1.0, softness=1.0, c=None, mask="snr", signal="ema", noise_scale=1.0, variance="ema",
         sq_scale=1.0, g2_scale=0.0, gate_open=False, want_stats=False, num_threads=None, found_inf=None,
         _probing=False):
    if not _probing and not available():
        raise RuntimeError(f"fused_triton is unavailable: {unavailable_reason()}")
    kernel, rowsum = _get_kernels()
    call = _common.prepare("fused_triton", "q", pass_, params, grads, exp_avgs, exp_avg_sqs, exp_vars, anchors,
                           sq_sums, row_lens, variance, signal, mask, make_plan=_plan, plans=_plans,
                           grads_ok=_grads_ok, check_list=_check_list, name_bad_grad=_name_bad_grad)
    n, use_p0, plan = call.n, call.use_p0, call.plan
    variance_k, signal_k, mask_k, with_g = call.variance, call.signal, call.mask, call.with_g
    dev = plan.device if plan.device is not None else (  # an empty group
        torch.device("cpu") if _interpret() or not torch.cuda.is_available()
        else torch.device("cuda", torch.cuda.current_device()))
    if found_inf is not None:
        if (not isinstance(found_inf, torch.Tensor) or found_inf.dtype != _F32 or found_inf.numel() != 1
                or found_inf.device != dev):
            raise ValueError(f"fused_triton: found_inf must be a one-element float32 tensor on {dev}, "
                             f"got {_describe(found_inf)}")
    if plan.has_rows and pass_ == _PASS_UPDATE:
        if (not isinstance(q_rows, torch.Tensor) or q_rows.dtype != _F32 or q_rows.device != dev
                or not q_rows.is_contiguous() or q_rows.numel() != plan.rows):
            raise ValueError(f"fused_triton: q_rows must be a contiguous {dev} float32 tensor of {plan.rows} "
                             f"gates (one per row), got {_describe(q_rows)}")
    shared, tsc_all = _tensor_scalars((bc1, bc2, bcr, noise_scale, gate_open), n, dev)

    lr = float(lr)
    alpha, softness = min(float(alpha), _FP32_MAX), min(float(softness), _FP32_MAX)
    c = min(softness * alpha, _FP32_MAX) if c is None else min(float(c), _FP32_MAX)
    omb1 = 1.0 - beta1
    hyper = (float(beta1), float(beta2), float(rho), omb1, 1.0 - beta2, 1.0 - rho, lr, float(eps),
             1.0 - lr * weight_decay, lr * weight_decay, alpha, softness, c, float(sq_scale), float(g2_scale))
    # fp32 as the CPU kernel's struct (triton takes Python floats as fp32 arguments)
    lerp_small = abs(_f32(omb1)) < 0.5
    rows_mode = plan.has_rows
    moments_rows = pass_ == _PASS_MOMENTS and rows_mode
    want = bool(want_stats) and pass_ != _PASS_MOMENTS
    out = None
    partials = None
    if moments_rows:
        out = torch.empty((plan.rows, 2), dtype=torch.float64, device=dev)
        partials = torch.empty((max(plan.nritems, 1), 2), dtype=torch.float64, device=dev)
    elif want:
        partials = torch.zeros((max(plan.nitems, 1), _NSTATS), dtype=torch.float64, device=dev)
    flag = found_inf
    # s, mu2, sig2 are needed for the row sums (moments), for the element gate and for the statistics
    need_musig = rows_mode if pass_ == _PASS_MOMENTS else (want or not rows_mode)
    for sub in plan.subs:
        if moments_rows:
            lo, hi = sub.row_lo, sub.row_hi
            items_t = plan.ritems_dev
        else:
            lo, hi = sub.items_lo, sub.items_hi
            items_t = plan.items_dev
        if hi <= lo:
            continue
        idx = sub.idx
        if with_g:
            gk = array("q", map(_ptr, grads if idx is None else [grads[i] for i in idx])).tobytes()
            if gk != sub.gkey:  # new gradient tensors: a new device array (never rewrite one in flight)
                ga = array("q")
                ga.frombytes(gk)
                sub.gptrs_dev = _to_dev(list(ga), torch.int64, dev)
                sub.g_aligned = all(x % 16 == 0 for x in ga)
                sub.gkey = gk
            gptrs = sub.gptrs_dev
        else:
            gptrs = sub.ptrs_dev  # never read
        if tsc_all is not None:
            if idx is None:
                tsc = tsc_all
            else:
                if sub.idx_dev is None:
                    sub.idx_dev = _to_dev(idx, torch.int64, dev)
                tsc = tsc_all.index_select(0, sub.idx_dev)
            sc = (1.0, 1.0, 1.0, 1.0, 0.0)
        else:
            tsc = sub.ptrs_dev  # never read
            sc = shared
        nsub = len(plan.numels) if idx is None else len(idx)
        aligned = sub.aligned and (sub.g_aligned or not with_g) and (sub.rows_aligned or not moments_rows)
        grid = (hi - lo,)
        kernel[grid](
            sub.ptrs_dev, gptrs, items_t[lo:hi], sub.meta_dev if sub.meta_dev is not None else sub.ptrs_dev,
            tsc, q_rows if (rows_mode and pass_ == _PASS_UPDATE) else sub.ptrs_dev,
            partials[lo:hi] if partials is not None else sub.ptrs_dev,
            flag if flag is not None else sub.ptrs_dev, nsub, *sc, *hyper,
            PASS=pass_, MASK=mask_k, SIGNAL=signal_k, VARIANCE=variance_k, DECAY=int(use_p0),
            WANT_STATS=want, ROWS=rows_mode, PER_TENSOR=tsc_all is not None, HAS_FLAG=flag is not None,
            LERP_SMALL=lerp_small, P_BF16=sub.p_bf16, S_BF16=sub.s_bf16, P0_BF16=sub.p0_bf16,
            MANUAL=_interpret(), NEED_G=with_g, NEED_MUSIG=need_musig, ALIGNED=aligned, BLOCK=BLOCK,
            num_warps=_NUM_WARPS, enable_fp_fusion=False)
    if pass_ == _PASS_MOMENTS:
        if out is not None and plan.rows:
            rowsum[(plan.rows,)](partials, plan.row_items_dev, out, CHUNK=_ROWSUM_CHUNK, num_warps=1)
        return out
    _increment_version(params)
    if not want_stats:
        return None
    stats = partials.sum(0)  # torch's reduction: deterministic, on the device
    stats[4:] *= _f32(alpha)  # noise = alpha * sum(u sig2), alpha as the kernel's fp32
    return stats


# -- public API ----------------------------------------------------------------------------------
def step(params, grads, exp_avgs, exp_avg_sqs, exp_vars, *, lr: float, beta1: float, beta2: float, rho: float,
         eps: float, weight_decay: float, bc1, bc2, bcr, alpha: float = 1.0, softness: float = 1.0,
         c: float | None = None, mask: str = "snr", signal: str = "ema", noise_scale=1.0,
         variance: str = "ema", sq_sums=None, sq_scale: float = 1.0, g2_scale: float = 0.0, anchors=None,
         gate_open=False, want_stats: bool = False, num_threads: int | None = None,
         found_inf: torch.Tensor | None = None):
    """One fused SNRAdamW step over a list of CUDA tensors: as :func:`hf_snr.fused_cpu.step`.

    Differences: returns the 5 statistics as a float64 tensor of shape (5,) on the device (not
    Python floats) when want_stats, else None; found_inf (one-element float32 device tensor):
    nonzero makes the step a no-op, decided on the device; num_threads is ignored.
    """
    return _run(_PASS_FULL, params, grads, exp_avgs, exp_avg_sqs, exp_vars, anchors=anchors, sq_sums=sq_sums,
                lr=lr, beta1=beta1, beta2=beta2, rho=rho, eps=eps, weight_decay=weight_decay, bc1=bc1, bc2=bc2,
                bcr=bcr, alpha=alpha, softness=softness, c=c, mask=mask, signal=signal, noise_scale=noise_scale,
                variance=variance, sq_scale=sq_scale, g2_scale=g2_scale, gate_open=gate_open,
                want_stats=want_stats, num_threads=num_threads, found_inf=found_inf)


def moments(params, grads, exp_avgs, exp_avg_sqs, exp_vars, *, beta1: float, beta2: float, rho: float, bc1, bcr,
            row_lens="tensor", signal: str = "ema", noise_scale=1.0, variance: str = "ema",
            sq_sums=None, sq_scale: float = 1.0, g2_scale: float = 0.0, num_threads: int | None = None,
            found_inf: torch.Tensor | None = None):
    """Pass 1 of a row / whole-tensor gate: as :func:`hf_snr.fused_cpu.moments`.

    Returns the (total rows, 2) float64 sums on the device (None when row_lens is None); with
    found_inf set, nothing is updated and the sums are zeros.
    """
    return _run(_PASS_MOMENTS, params, grads, exp_avgs, exp_avg_sqs, exp_vars, sq_sums=sq_sums, row_lens=row_lens,
                beta1=beta1, beta2=beta2, rho=rho, bc1=bc1, bc2=1.0, bcr=bcr, signal=signal,
                noise_scale=noise_scale, variance=variance, sq_scale=sq_scale, g2_scale=g2_scale,
                num_threads=num_threads, found_inf=found_inf)


def update(params, grads, exp_avgs, exp_avg_sqs, exp_vars, *, lr: float, eps: float, weight_decay: float,
           bc1, bc2, bcr, q_rows: torch.Tensor | None = None, row_lens="tensor", alpha: float = 1.0,
           softness: float = 1.0, c: float | None = None, mask: str = "snr", signal: str = "ema",
           noise_scale=1.0, anchors=None, gate_open=False, want_stats: bool = False,
           num_threads: int | None = None, found_inf: torch.Tensor | None = None):
    """Pass 2: the gated update, as :func:`hf_snr.fused_cpu.update` (q_rows: a float32 device tensor).

    Returns the statistics as a (5,) float64 device tensor when want_stats, else None.
    """
    if q_rows is None or gate_open is True:  # no row gates (element mask, or all open)
        row_lens = None
    return _run(_PASS_UPDATE, params, grads, exp_avgs, exp_avg_sqs, exp_vars, anchors=anchors,
                row_lens=row_lens, q_rows=q_rows, lr=lr, eps=eps,
                weight_decay=weight_decay, bc1=bc1, bc2=bc2, bcr=bcr, alpha=alpha, softness=softness, c=c,
                mask=mask, signal=signal, noise_scale=noise_scale, gate_open=gate_open, want_stats=want_stats,
                num_threads=num_threads, found_inf=found_inf)


def gate(sums: torch.Tensor, *, mask: str = "snr", alpha: float = 1.0, softness: float = 1.0,
         c: float | None = None) -> torch.Tensor:
    """One gate per row from :func:`moments`' (rows, 2) sums, as a float32 tensor on their device.

    As fused_cpu.gate (torch ops, so no synchronisation): the sums rounded to fp32, the mask in fp32.
    """
    return _common.gate("fused_triton", sums, mask, alpha, softness, c)
