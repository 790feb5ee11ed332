"""Triton kernels for the fused loss statistics (densefuse.ops.loss_stats, DESIGN §3a).

Four host functions with the signatures and results of the same-named oracles in
densefuse.reference (that module defines the semantics; this one only computes them faster):

    overlap_stats(logits, target, activation, ignore_index)          -> stats [B, C, 3], flags [3]
    overlap_stats_backward(grad_stats, logits, target, ...)          -> dL/dlogits [B, C, V]
    focal_stats(logits, target, activation, gamma, a_pos, a_neg, ii) -> stats [B, C, 2], flags [3]
    focal_stats_backward(grad_stats, logits, target, ...)            -> dL/dlogits [B, C, V]

Inputs: logits [B, C, V] fp16/bf16/fp32/fp64 with any strides (read in place, never copied);
target an integer label map [B, V] (uint8/int8/int16/int32/int64, any strides) or a float target
[B, C, V] (any float dtype, any strides). Everything is computed in the accumulation dtype
(fp32, or fp64 for fp64 logits).

Math (p = activation(x), g = target, valid = label != ignore_index):
    overlap   S_pg = sum_v valid p g,  S_p = sum_v valid p,  S_g = sum_v g
    focal     sigmoid  l = a (1 - p_t)^gamma BCE(x, g), a = g alpha_pos + (1 - g) alpha_neg,
                       BCE = max(x, 0) - x g + log1p(exp(-|x|)),
                       (1 - p_t)^gamma = exp(gamma logsigmoid(-x (2g - 1)))
              softmax  l = -alpha_pos g (1 - p)^gamma log p
    flags     (#labels out of range among the non-ignored voxels, #non-finite logits,
               #non-finite float-target values)
The backward formulas are those of the reference docstrings; each backward recomputes p from the
logits in registers and writes dL/dlogits once.

Layout and determinism. A tile is BLOCK_C x BLOCK_V elements: every channel (BLOCK_C = next power
of two >= C, masked; softmax needs the whole channel axis in registers) times BLOCK_V consecutive
voxels of one batch item. The forward grid is (P, B): program (pid, b) visits tiles pid, pid + P,
... of batch item b, accumulates element-wise register tiles, reduces them once at the end and
stores its partial sums into partials [B, P, C, K]. The host sums the partials over P with torch
(a fixed order, so the forward is bit-for-bit deterministic run to run); the flag counts are
integer atomics (deterministic too). The backward grid is (n_tiles, B), one tile per program, and
writes a contiguous [B, C, V] gradient in the logits' dtype.

Accuracy notes. log1p and expm1 are not Triton primitives (and tl.log of fp32 may be a fast
approximation with an absolute, not relative, error bound near 1), so:
  * log1p(y) for y in [0, 1] uses the series 2 atanh(s), s = y / (2 + y) (no log near 1);
  * the softmax normaliser is 1 + r with r = sum of exp(x_k - max) over the non-maximal channels,
    so log p = (x - max) - log1p(r) and 1 - p = r / (1 + r) at the maximum (no cancellation);
    elsewhere p <= 1/2 and 1 - p is exact enough.
Float constants other than small dyadic ones are avoided (Triton makes Python floats fp32); gamma
is passed as an fp32 (hi, lo) pair so that fp64 inputs get gamma to fp64 precision.

Triton is imported at module import: import this module only where triton is installed.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

__all__ = ["focal_stats", "focal_stats_backward", "overlap_stats", "overlap_stats_backward"]

_INT32_MAX = 2**31 - 1
_MAX_GRID_Y = 65535  # the batch is the second grid axis
# Elements per tile (BLOCK_C * BLOCK_V) and per thread (which sets num_warps): 8 fp32 elements per
# thread. ptxas for sm_90 gives 19-141 registers per thread (tests/test_triton_sm90.py), the most in
# the softmax forward kernels, so 2-4 programs fit on an SM; one bf16 softmax focal case spills 8 B.
# The interpreter (CPU tensors) pays per operation, not per element: it gets larger tiles.
_TILE_ELEMS = {torch.float64: 1024}
_TILE_ELEMS_DEFAULT = 2048
_ELEMS_PER_THREAD = {torch.float64: 4}
_ELEMS_PER_THREAD_DEFAULT = 8
_TILE_ELEMS_INTERPRETER = 16384
_MIN_BLOCK_V = 16
# Forward programs per SM (all batch items together) on CUDA, and per batch item on CPU (interpreter).
_PROGRAMS_PER_SM = 4
_CPU_PROGRAMS = 4


# ============================================================================== device helpers
@triton.jit
def _offsets_2d(offs_c, offs_v, stride_c, stride_v, OFFSETS_64: tl.constexpr):
    """Element offsets [BLOCK_C, BLOCK_V] inside one batch item (int64 when they may not fit int32)."""
    if OFFSETS_64:
        offsets = offs_c.to(tl.int64)[:, None] * stride_c + offs_v.to(tl.int64)[None, :] * stride_v
    else:
        offsets = offs_c[:, None] * stride_c + offs_v[None, :] * stride_v
    return offsets


@triton.jit
def _not_finite(x):
    """NaN/Inf, tested in float32 (float64 values as they are): half-precision values are widened
    first (exactly), as the C++ kernels test them; the interpreter needs it too, where a bfloat16 NaN
    compares equal to itself."""
    if x.dtype != tl.float64:
        x = x.to(tl.float32)
    return (x != x) | (tl.abs(x) == float("inf"))


@triton.jit
def _load_logits(
    logits_ptr, b, offs_c, offs_v, C, V, stride_b, stride_c, stride_v,
    SOFTMAX: tl.constexpr, ACC_DTYPE: tl.constexpr, OFFSETS_64: tl.constexpr,
):  # fmt: skip
    """Logits tile [BLOCK_C, BLOCK_V] in ACC_DTYPE, its in-bounds mask and its non-finite mask.

    Out-of-bounds elements read as 0, except masked channels under softmax, which read as -inf
    (so they take no probability mass while every column keeps a finite maximum).
    """
    c_mask = offs_c < C
    mask = c_mask[:, None] & (offs_v < V)[None, :]
    offsets = _offsets_2d(offs_c, offs_v, stride_c, stride_v, OFFSETS_64)
    x = tl.load(logits_ptr + b.to(tl.int64) * stride_b + offsets, mask=mask, other=0.0).to(ACC_DTYPE)
    bad = mask & _not_finite(x)
    if SOFTMAX:
        x = tl.where(c_mask[:, None], x, float("-inf"))
    return x, mask, bad


@triton.jit
def _load_target(
    target_ptr, b, offs_c, offs_v, C, V, stride_b, stride_c, stride_v, ignore_index,
    IS_LABELS: tl.constexpr, HAS_IGNORE: tl.constexpr, BINARY: tl.constexpr,
    ACC_DTYPE: tl.constexpr, OFFSETS_64: tl.constexpr,
):  # fmt: skip
    """(g [BLOCK_C, BLOCK_V], valid [BLOCK_V], bad_labels [BLOCK_V], bad_targets [BLOCK_C, BLOCK_V]).

    g is zero outside the tile's bounds and on ignored voxels; valid = in bounds and not ignored.
    Labels: g_c = [label == c] (C > 1) or g = [label == 1] (BINARY, C == 1); bad_labels marks valid
    voxels whose label is outside [0, C) (resp. {0, 1}). Float targets: every in-bounds voxel is
    valid and bad_targets marks the non-finite values.
    """
    c_mask = offs_c < C
    v_mask = offs_v < V
    base = target_ptr + b.to(tl.int64) * stride_b
    if IS_LABELS:
        if OFFSETS_64:
            lab = tl.load(base + offs_v.to(tl.int64) * stride_v, mask=v_mask, other=0)
        else:
            lab = tl.load(base + offs_v * stride_v, mask=v_mask, other=0)
        if lab.dtype != tl.int64:
            lab = lab.to(tl.int32)
        valid = v_mask
        if HAS_IGNORE:
            valid = valid & (lab != ignore_index)
        if BINARY:
            cls = offs_c + 1
            bad_labels = valid & ((lab < 0) | (lab > 1))
        else:
            cls = offs_c
            bad_labels = valid & ((lab < 0) | (lab >= C))
        hit = (lab[None, :] == cls[:, None]) & c_mask[:, None] & valid[None, :]
        g = hit.to(ACC_DTYPE)
        bad_targets = tl.zeros(hit.shape, tl.int1)
    else:
        mask = c_mask[:, None] & v_mask[None, :]
        ptrs = base + _offsets_2d(offs_c, offs_v, stride_c, stride_v, OFFSETS_64)
        g = tl.load(ptrs, mask=mask, other=0.0).to(ACC_DTYPE)
        valid = v_mask
        bad_labels = tl.zeros(v_mask.shape, tl.int1)
        bad_targets = mask & _not_finite(g)
    return g, valid, bad_labels, bad_targets


@triton.jit
def _log1p_unit(y, N_TERMS: tl.constexpr):
    """log(1 + y) for y in [0, 1] to full precision: 2 atanh(s) = 2 sum_k s^(2k+1) / (2k+1), s <= 1/3.

    N_TERMS = 7 is enough for fp32, 16 for fp64 (s^2 <= 1/9). Coefficients are formed in y's dtype.
    """
    s = y / (2.0 + y)
    s2 = s * s
    one = tl.full([], 1, y.dtype)
    acc = one / (2 * N_TERMS + 1)
    for k in tl.static_range(N_TERMS - 1, -1, -1):
        acc = acc * s2 + one / (2 * k + 1)
    return 2.0 * s * acc


@triton.jit
def _log1p_pos(y, N_TERMS: tl.constexpr):
    """log(1 + y) for y >= 0: the series on [0, 1], log beyond (where log(1 + y) >= log 2)."""
    return tl.where(y <= 1.0, _log1p_unit(tl.minimum(y, 1.0), N_TERMS), tl.log(1.0 + y))


@triton.jit
def _sigmoid(x):
    """(sigmoid(x), 1 - sigmoid(x), exp(-|x|)), both probabilities without cancellation."""
    e = tl.exp(-tl.abs(x))
    d = 1.0 / (1.0 + e)
    pos = x >= 0
    return tl.where(pos, d, e * d), tl.where(pos, e * d, d), e


@triton.jit
def _softmax(x, N_TERMS: tl.constexpr):
    """Softmax over axis 0 of x [BLOCK_C, BLOCK_V] (masked channels -inf): (p, log p, 1 - p).

    With m the column max and r = sum over the non-maximal channels of exp(x - m) (ties at the
    maximum counted exactly), the normaliser is 1 + r: log p = (x - m) - log1p(r), and at the
    maximum 1 - p = r / (1 + r); elsewhere p <= 1/2, so 1 - p loses nothing.
    """
    m = tl.max(x, axis=0)
    xm = x - m[None, :]
    e = tl.exp(xm)
    total = tl.sum(e, axis=0)
    p = e / total[None, :]
    at_max = xm == 0.0
    ties = tl.sum(at_max.to(x.dtype), axis=0) - 1.0
    r = tl.sum(tl.where(at_max, 0.0, e), axis=0) + ties
    # Masked channels (x = -inf) get log p = 0 rather than -inf: keeps 0 * log p free of NaNs.
    log_p = tl.where(x == float("-inf"), 0.0, xm - _log1p_pos(r, N_TERMS)[None, :])
    t = tl.where(at_max, (r / total)[None, :], 1.0 - p)
    return p, log_p, t


@triton.jit
def _probabilities(x, ACTIVATION: tl.constexpr, N_TERMS: tl.constexpr):
    """(p, p(1 - p)) for activation 0 none, 1 sigmoid, 2 softmax over axis 0 (p(1-p): sigmoid only)."""
    if ACTIVATION == 1:
        p, q, _ = _sigmoid(x)
        dp = p * q
    elif ACTIVATION == 2:
        p, _, _ = _softmax(x, N_TERMS)
        dp = p
    else:
        p = x
        dp = p
    return p, dp


@triton.jit
def _pow_unit(t, gamma):
    """t ** gamma for t in [0, 1] (0 ** 0 == 1, as torch.pow)."""
    pos = t > 0.0
    tp = tl.exp(gamma * tl.log(tl.where(pos, t, 1.0)))
    return tl.where(pos, tp, tl.where(gamma == 0.0, 1.0, 0.0))


@triton.jit
def _sigmoid_focal(x, g, gamma, HARD: tl.constexpr, N_TERMS: tl.constexpr):
    """Unweighted sigmoid focal loss and its x-derivative, element-wise.

    loss = m * bce,  dloss/dx = m * ((sigmoid(x) - g) - gamma * s * sigmoid(s x) * bce), with
    s = 2g - 1, z = -s x, m = exp(gamma * logsigmoid(z)). HARD (0/1 targets): |z| == |x|.
    """
    p, _, ex = _sigmoid(x)
    lx = _log1p_unit(ex, N_TERMS)
    bce = tl.maximum(x, 0.0) - x * g + lx
    s = 2.0 * g - 1.0
    z = -s * x
    if HARD:
        ez = ex
        lz = lx
    else:
        ez = tl.exp(-tl.abs(z))
        lz = _log1p_unit(ez, N_TERMS)
    mod = tl.exp(gamma * (tl.minimum(z, 0.0) - lz))
    dz = 1.0 / (1.0 + ez)
    sig_sx = tl.where(z <= 0.0, dz, ez * dz)  # sigmoid(s x) = sigmoid(-z)
    return mod * bce, mod * ((p - g) - gamma * s * sig_sx * bce)


@triton.jit
def _softmax_focal(x, gamma, N_TERMS: tl.constexpr):
    """Per-channel softmax focal terms: (p, -(1 - p)^gamma log p, h).

    h = d[(1-p)^gamma log p]/dp * p = gamma (1-p)^(gamma-1) p log p - (1-p)^gamma, with the first
    term 0 where 1 - p == 0 (as the reference), so that dL/dx_j = w_j h_j - p_j sum_c w_c h_c.
    """
    p, log_p, t = _softmax(x, N_TERMS)
    t_pow = _pow_unit(t, gamma)
    pos = t > 0.0
    dpow = tl.where(pos, gamma * t_pow / tl.where(pos, t, 1.0) * p * log_p, 0.0)
    return p, -t_pow * log_p, dpow - t_pow


@triton.jit
def _load_class_vector(ptr, offs_c, C, ENABLED: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Per-class vector [BLOCK_C] (alpha), or ones when ENABLED is false."""
    if ENABLED:
        values = tl.load(ptr + offs_c, mask=offs_c < C, other=1.0).to(ACC_DTYPE)
    else:
        values = tl.full([offs_c.shape[0]], 1, ACC_DTYPE)
    return values


@triton.jit
def _focal_weight(g, alpha_pos, alpha_neg, HAS_ALPHA_POS: tl.constexpr, HAS_ALPHA_NEG: tl.constexpr):
    """Sigmoid focal weight g alpha_pos + (1 - g) alpha_neg per element (alphas [BLOCK_C] or ones)."""
    if HAS_ALPHA_POS or HAS_ALPHA_NEG:
        weight = g * alpha_pos[:, None] + (1.0 - g) * alpha_neg[:, None]
    else:
        weight = tl.full(g.shape, 1, g.dtype)
    return weight


@triton.jit
def _count_flags(n_labels, n_logits, n_targets, bad_labels, bad_logits, bad_targets, IS_LABELS: tl.constexpr):
    """Per-lane counters [BLOCK_V] += this tile's bad labels, non-finite logits and target values.

    The 2-D masks are first summed over the channel axis (thread-local when voxels are the
    contiguous axis), which keeps the counters to one register per voxel lane.
    """
    n_logits += tl.sum(bad_logits.to(tl.int32), axis=0)
    if IS_LABELS:
        n_labels += bad_labels.to(tl.int32)
    else:
        n_targets += tl.sum(bad_targets.to(tl.int32), axis=0)
    return n_labels, n_logits, n_targets


@triton.jit
def _store_flags(flags_ptr, bad_labels, bad_logits, bad_targets):
    """Adds the program's flag counters (int32 [BLOCK_V] each) to flags [3] (int64 atomics)."""
    n_labels = tl.sum(bad_labels.to(tl.int64))
    n_logits = tl.sum(bad_logits.to(tl.int64))
    n_targets = tl.sum(bad_targets.to(tl.int64))
    tl.atomic_add(flags_ptr + 0, n_labels, mask=n_labels > 0)
    tl.atomic_add(flags_ptr + 1, n_logits, mask=n_logits > 0)
    tl.atomic_add(flags_ptr + 2, n_targets, mask=n_targets > 0)


# ===================================================================================== kernels
@triton.jit
def _overlap_stats_fwd_kernel(
    logits_ptr, target_ptr, partial_ptr, flags_ptr,
    C, V, n_tiles, n_programs,
    stride_xb, stride_xc, stride_xv, stride_tb, stride_tc, stride_tv, ignore_index,
    ACTIVATION: tl.constexpr, IS_LABELS: tl.constexpr, HAS_IGNORE: tl.constexpr, BINARY: tl.constexpr,
    ACC_DTYPE: tl.constexpr, N_TERMS: tl.constexpr, OFFSETS_64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """Overlap sums, grid (P, B).

    logits [B, C, V] (strides stride_x*), target [B, V] labels or [B, C, V] float (strides
    stride_t*) -> partial [B, P, C, 3] (S_pg, S_p, S_g of this program's tiles, ACC_DTYPE,
    contiguous); flags int64 [3] += counts.
    """
    pid = tl.program_id(0)
    b = tl.program_id(1)
    offs_c = tl.arange(0, BLOCK_C)
    acc_pg = tl.zeros([BLOCK_C, BLOCK_V], ACC_DTYPE)
    acc_p = tl.zeros([BLOCK_C, BLOCK_V], ACC_DTYPE)
    acc_g = tl.zeros([BLOCK_C, BLOCK_V], ACC_DTYPE)
    n_bad_x = tl.zeros([BLOCK_V], tl.int32)
    n_bad_t = tl.zeros([BLOCK_V], tl.int32)
    n_bad_lab = tl.zeros([BLOCK_V], tl.int32)
    for tile in range(pid, n_tiles, n_programs):
        offs_v = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        x, in_bounds, bad_x = _load_logits(
            logits_ptr, b, offs_c, offs_v, C, V, stride_xb, stride_xc, stride_xv,
            ACTIVATION == 2, ACC_DTYPE, OFFSETS_64,
        )  # fmt: skip
        g, valid, bad_lab, bad_t = _load_target(
            target_ptr, b, offs_c, offs_v, C, V, stride_tb, stride_tc, stride_tv, ignore_index,
            IS_LABELS, HAS_IGNORE, BINARY, ACC_DTYPE, OFFSETS_64,
        )  # fmt: skip
        p, _ = _probabilities(x, ACTIVATION, N_TERMS)
        p = tl.where(in_bounds & valid[None, :], p, 0.0)
        acc_pg += p * g
        acc_p += p
        acc_g += g
        n_bad_lab, n_bad_x, n_bad_t = _count_flags(
            n_bad_lab, n_bad_x, n_bad_t, bad_lab, bad_x, bad_t, IS_LABELS
        )

    c_mask = offs_c < C
    out = partial_ptr + ((b * n_programs + pid) * C + offs_c) * 3
    tl.store(out + 0, tl.sum(acc_pg, axis=1), mask=c_mask)
    tl.store(out + 1, tl.sum(acc_p, axis=1), mask=c_mask)
    tl.store(out + 2, tl.sum(acc_g, axis=1), mask=c_mask)
    _store_flags(flags_ptr, n_bad_lab, n_bad_x, n_bad_t)


@triton.jit
def _overlap_stats_bwd_kernel(
    grad_stats_ptr, logits_ptr, target_ptr, grad_ptr,
    C, V,
    stride_gb, stride_gc, stride_gk,
    stride_xb, stride_xc, stride_xv, stride_tb, stride_tc, stride_tv, ignore_index,
    ACTIVATION: tl.constexpr, IS_LABELS: tl.constexpr, HAS_IGNORE: tl.constexpr, BINARY: tl.constexpr,
    ACC_DTYPE: tl.constexpr, N_TERMS: tl.constexpr, OFFSETS_64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """dL/dlogits, grid (n_tiles, B): grad_stats [B, C, 3] -> grad [B, C, V] contiguous (logits' dtype).

    dL/dp_c = valid (dL/dS_pg,c g_c + dL/dS_p,c), then through the activation.
    """
    tile = tl.program_id(0)
    b = tl.program_id(1)
    offs_c = tl.arange(0, BLOCK_C)
    offs_v = tile * BLOCK_V + tl.arange(0, BLOCK_V)
    c_mask = offs_c < C
    coef = grad_stats_ptr + b.to(tl.int64) * stride_gb + offs_c * stride_gc
    d_pg = tl.load(coef, mask=c_mask, other=0.0).to(ACC_DTYPE)
    d_p = tl.load(coef + stride_gk, mask=c_mask, other=0.0).to(ACC_DTYPE)

    x, in_bounds, _ = _load_logits(
        logits_ptr, b, offs_c, offs_v, C, V, stride_xb, stride_xc, stride_xv,
        ACTIVATION == 2, ACC_DTYPE, OFFSETS_64,
    )  # fmt: skip
    g, valid, _, _ = _load_target(
        target_ptr, b, offs_c, offs_v, C, V, stride_tb, stride_tc, stride_tv, ignore_index,
        IS_LABELS, HAS_IGNORE, BINARY, ACC_DTYPE, OFFSETS_64,
    )  # fmt: skip
    p, dp = _probabilities(x, ACTIVATION, N_TERMS)
    grad_p = tl.where(valid[None, :], d_pg[:, None] * g + d_p[:, None], 0.0)
    if ACTIVATION == 1:
        grad = grad_p * dp
    elif ACTIVATION == 2:
        grad = p * (grad_p - tl.sum(p * grad_p, axis=0)[None, :])
    else:
        grad = grad_p
    out = grad_ptr + b.to(tl.int64) * C * V + _offsets_2d(offs_c, offs_v, V, 1, OFFSETS_64)
    tl.store(out, grad.to(grad_ptr.dtype.element_ty), mask=in_bounds)


@triton.jit
def _focal_stats_fwd_kernel(
    logits_ptr, target_ptr, alpha_pos_ptr, alpha_neg_ptr, partial_ptr, flags_ptr,
    C, V, n_tiles, n_programs, gamma_hi, gamma_lo,
    stride_xb, stride_xc, stride_xv, stride_tb, stride_tc, stride_tv, ignore_index,
    ACTIVATION: tl.constexpr, IS_LABELS: tl.constexpr, HAS_IGNORE: tl.constexpr, BINARY: tl.constexpr,
    HAS_ALPHA_POS: tl.constexpr, HAS_ALPHA_NEG: tl.constexpr,
    ACC_DTYPE: tl.constexpr, N_TERMS: tl.constexpr, OFFSETS_64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """Focal sums, grid (P, B): -> partial [B, P, C, 2] (sum of the loss, valid voxels), flags += counts.

    logits/target as in _overlap_stats_fwd_kernel; alpha_pos/alpha_neg [C] (ACC_DTYPE) when
    enabled; gamma = gamma_hi + gamma_lo (two fp32 halves of a float64).
    """
    pid = tl.program_id(0)
    b = tl.program_id(1)
    offs_c = tl.arange(0, BLOCK_C)
    gamma = tl.cast(gamma_hi, ACC_DTYPE) + tl.cast(gamma_lo, ACC_DTYPE)
    alpha_pos = _load_class_vector(alpha_pos_ptr, offs_c, C, HAS_ALPHA_POS, ACC_DTYPE)
    alpha_neg = _load_class_vector(alpha_neg_ptr, offs_c, C, HAS_ALPHA_NEG, ACC_DTYPE)
    acc_loss = tl.zeros([BLOCK_C, BLOCK_V], ACC_DTYPE)
    n_valid = tl.zeros([BLOCK_V], tl.int32)
    n_bad_x = tl.zeros([BLOCK_V], tl.int32)
    n_bad_t = tl.zeros([BLOCK_V], tl.int32)
    n_bad_lab = tl.zeros([BLOCK_V], tl.int32)
    for tile in range(pid, n_tiles, n_programs):
        offs_v = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        x, in_bounds, bad_x = _load_logits(
            logits_ptr, b, offs_c, offs_v, C, V, stride_xb, stride_xc, stride_xv,
            ACTIVATION == 2, ACC_DTYPE, OFFSETS_64,
        )  # fmt: skip
        g, valid, bad_lab, bad_t = _load_target(
            target_ptr, b, offs_c, offs_v, C, V, stride_tb, stride_tc, stride_tv, ignore_index,
            IS_LABELS, HAS_IGNORE, BINARY, ACC_DTYPE, OFFSETS_64,
        )  # fmt: skip
        if ACTIVATION == 1:
            loss, _ = _sigmoid_focal(x, g, gamma, IS_LABELS, N_TERMS)
            loss = loss * _focal_weight(g, alpha_pos, alpha_neg, HAS_ALPHA_POS, HAS_ALPHA_NEG)
        else:
            _, loss, _ = _softmax_focal(x, gamma, N_TERMS)
            loss = loss * g * alpha_pos[:, None]
        acc_loss += tl.where(in_bounds & valid[None, :], loss, 0.0)
        n_valid += valid.to(tl.int32)
        n_bad_lab, n_bad_x, n_bad_t = _count_flags(
            n_bad_lab, n_bad_x, n_bad_t, bad_lab, bad_x, bad_t, IS_LABELS
        )

    c_mask = offs_c < C
    count = tl.sum(n_valid.to(tl.int64), axis=0).to(ACC_DTYPE)
    out = partial_ptr + ((b * n_programs + pid) * C + offs_c) * 2
    tl.store(out + 0, tl.sum(acc_loss, axis=1), mask=c_mask)
    tl.store(out + 1, tl.zeros([BLOCK_C], ACC_DTYPE) + count, mask=c_mask)
    _store_flags(flags_ptr, n_bad_lab, n_bad_x, n_bad_t)


@triton.jit
def _focal_stats_bwd_kernel(
    grad_stats_ptr, logits_ptr, target_ptr, alpha_pos_ptr, alpha_neg_ptr, grad_ptr,
    C, V, gamma_hi, gamma_lo,
    stride_gb, stride_gc, stride_gk,
    stride_xb, stride_xc, stride_xv, stride_tb, stride_tc, stride_tv, ignore_index,
    ACTIVATION: tl.constexpr, IS_LABELS: tl.constexpr, HAS_IGNORE: tl.constexpr, BINARY: tl.constexpr,
    HAS_ALPHA_POS: tl.constexpr, HAS_ALPHA_NEG: tl.constexpr,
    ACC_DTYPE: tl.constexpr, N_TERMS: tl.constexpr, OFFSETS_64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """dL/dlogits, grid (n_tiles, B): grad_stats [B, C, 2] -> grad [B, C, V] contiguous (logits' dtype).

    Only dL/d(sum of the loss) reaches the logits (the voxel count is constant); stride_gk is
    unused (both backward kernels share one launch path).
    """
    tile = tl.program_id(0)
    b = tl.program_id(1)
    offs_c = tl.arange(0, BLOCK_C)
    offs_v = tile * BLOCK_V + tl.arange(0, BLOCK_V)
    c_mask = offs_c < C
    gamma = tl.cast(gamma_hi, ACC_DTYPE) + tl.cast(gamma_lo, ACC_DTYPE)
    alpha_pos = _load_class_vector(alpha_pos_ptr, offs_c, C, HAS_ALPHA_POS, ACC_DTYPE)
    alpha_neg = _load_class_vector(alpha_neg_ptr, offs_c, C, HAS_ALPHA_NEG, ACC_DTYPE)
    d_loss = tl.load(grad_stats_ptr + b.to(tl.int64) * stride_gb + offs_c * stride_gc, mask=c_mask, other=0.0)
    d_loss = d_loss.to(ACC_DTYPE)

    x, in_bounds, _ = _load_logits(
        logits_ptr, b, offs_c, offs_v, C, V, stride_xb, stride_xc, stride_xv,
        ACTIVATION == 2, ACC_DTYPE, OFFSETS_64,
    )  # fmt: skip
    g, valid, _, _ = _load_target(
        target_ptr, b, offs_c, offs_v, C, V, stride_tb, stride_tc, stride_tv, ignore_index,
        IS_LABELS, HAS_IGNORE, BINARY, ACC_DTYPE, OFFSETS_64,
    )  # fmt: skip
    keep = in_bounds & valid[None, :]
    if ACTIVATION == 1:
        _, dloss = _sigmoid_focal(x, g, gamma, IS_LABELS, N_TERMS)
        weight = _focal_weight(g, alpha_pos, alpha_neg, HAS_ALPHA_POS, HAS_ALPHA_NEG)
        grad = tl.where(keep, d_loss[:, None] * weight * dloss, 0.0)
    else:
        p, _, h = _softmax_focal(x, gamma, N_TERMS)
        wh = tl.where(keep, (d_loss * alpha_pos)[:, None] * g * h, 0.0)
        grad = wh - p * tl.sum(wh, axis=0)[None, :]
    out = grad_ptr + b.to(tl.int64) * C * V + _offsets_2d(offs_c, offs_v, V, 1, OFFSETS_64)
    tl.store(out, grad.to(grad_ptr.dtype.element_ty), mask=in_bounds)


# =============================================================================== host helpers
@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _within_item_extent(t: torch.Tensor) -> int:
    """Largest element offset inside one batch item (dims 1..) of t."""
    return sum((size - 1) * stride for size, stride in zip(t.shape[1:], t.stride()[1:]))


def _check_activation(activation: int, allowed: tuple[int, ...]) -> None:
    if activation not in allowed:
        raise ValueError(f"activation: expected one of {allowed}, got {activation!r}")


class _Launch:
    """Launches the kernels for one (logits, target, ignore_index): strides, block sizes, constexprs."""

    def __init__(self, logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None):
        if logits.dim() != 3:
            raise ValueError(f"logits: expected [B, C, V], got {tuple(logits.shape)}")
        batch, channels, voxels = logits.shape
        if voxels > _INT32_MAX - 2**16:
            raise ValueError(f"logits: at most {_INT32_MAX - 2**16} voxels per item, got {voxels}")
        if batch > _MAX_GRID_Y:
            raise ValueError(f"logits: at most {_MAX_GRID_Y} batch items per call, got {batch}")
        if target.dtype == torch.bool:
            target = target.view(torch.uint8)
        is_labels = not target.is_floating_point()
        if is_labels:
            if tuple(target.shape) != (batch, voxels):
                raise ValueError(
                    f"target: expected labels of shape {(batch, voxels)}, got {tuple(target.shape)}"
                )
            t_strides = (target.stride(0), 0, target.stride(1))
            info = torch.iinfo(target.dtype)
            # An ignore_index that no label of this dtype can hold ignores nothing.
            has_ignore = ignore_index is not None and info.min <= ignore_index <= info.max
        else:
            if target.shape != logits.shape:
                raise ValueError(f"target: expected a float target of shape {tuple(logits.shape)}")
            t_strides = target.stride()
            has_ignore = False
        self.logits, self.target, self.ignore_index = logits, target, ignore_index
        self.batch, self.channels, self.voxels = batch, channels, voxels
        self.acc_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32

        block_c = triton.next_power_of_2(max(channels, 1))
        if logits.device.type == "cuda":
            tile_elems = _TILE_ELEMS.get(logits.dtype, _TILE_ELEMS_DEFAULT)
        else:
            tile_elems = _TILE_ELEMS_INTERPRETER
        block_v = max(_MIN_BLOCK_V, tile_elems // block_c)
        block_v = min(block_v, max(_MIN_BLOCK_V, triton.next_power_of_2(max(voxels, 1))))
        self.n_tiles = triton.cdiv(voxels, block_v)
        per_thread = _ELEMS_PER_THREAD.get(logits.dtype, _ELEMS_PER_THREAD_DEFAULT)
        self.num_warps = min(16, max(4, block_c * block_v // (32 * per_thread)))
        extent = max(_within_item_extent(logits), _within_item_extent(target), channels * voxels)
        self.args = dict(
            logits_ptr=logits,
            target_ptr=target,
            C=channels,
            V=voxels,
            stride_xb=logits.stride(0),
            stride_xc=logits.stride(1),
            stride_xv=logits.stride(2),
            stride_tb=t_strides[0],
            stride_tc=t_strides[1],
            stride_tv=t_strides[2],
            ignore_index=int(ignore_index) if has_ignore else 0,
            IS_LABELS=is_labels,
            HAS_IGNORE=has_ignore,
            BINARY=channels == 1,
            ACC_DTYPE=tl.float64 if self.acc_dtype == torch.float64 else tl.float32,
            N_TERMS=16 if self.acc_dtype == torch.float64 else 7,
            OFFSETS_64=extent > _INT32_MAX,
            BLOCK_C=block_c,
            BLOCK_V=block_v,
            num_warps=self.num_warps,
        )

    def n_programs(self) -> int:
        """Forward programs per batch item (P): a few per SM in all on CUDA, a few on CPU."""
        device = self.logits.device
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            per_item = _PROGRAMS_PER_SM * _num_sms(index) // self.batch
        else:
            per_item = _CPU_PROGRAMS
        return max(1, min(self.n_tiles, per_item))

    def alphas(self, alpha_pos: torch.Tensor | None, alpha_neg: torch.Tensor | None) -> dict:
        """Kernel arguments for the per-class focal weights ([C] tensors or None)."""
        args = {}
        for name, alpha in (("alpha_pos", alpha_pos), ("alpha_neg", alpha_neg)):
            if alpha is not None and (alpha.shape != (self.channels,) or alpha.device != self.logits.device):
                raise ValueError(f"{name}: expected shape ({self.channels},) on {self.logits.device}")
            # Without an alpha the pointer is never read: any tensor will do.
            args[f"{name}_ptr"] = self.logits if alpha is None else alpha.contiguous()
            args[f"HAS_{name.upper()}"] = alpha is not None
        return args

    def forward(self, kernel, k: int, **extra) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs a stats kernel on grid (P, B): (partials summed over P [B, C, k], flags [3])."""
        device = self.logits.device
        if self.logits.numel() == 0:
            stats = torch.zeros((self.batch, self.channels, k), dtype=self.acc_dtype, device=device)
            return stats, self._empty_flags()
        n_programs = self.n_programs()
        partial = torch.empty((self.batch, n_programs, self.channels, k), dtype=self.acc_dtype, device=device)
        flags = torch.zeros(3, dtype=torch.int64, device=device)
        with self._device_guard():
            kernel[(n_programs, self.batch)](
                partial_ptr=partial,
                flags_ptr=flags,
                n_tiles=self.n_tiles,
                n_programs=n_programs,
                **extra,
                **self.args,
            )
        return partial.sum(dim=1), flags

    def backward(self, kernel, grad_stats: torch.Tensor, k: int, **extra) -> torch.Tensor:
        """Runs a gradient kernel on grid (n_tiles, B): dL/dlogits [B, C, V] contiguous, logits' dtype."""
        expected = (self.batch, self.channels, k)
        if tuple(grad_stats.shape) != expected or grad_stats.device != self.logits.device:
            raise ValueError(f"grad_stats: expected shape {expected} on {self.logits.device}")
        grad = torch.empty(self.logits.shape, dtype=self.logits.dtype, device=self.logits.device)
        if grad.numel() == 0:
            return grad
        with self._device_guard():
            kernel[(self.n_tiles, self.batch)](
                grad_stats_ptr=grad_stats,
                grad_ptr=grad,
                stride_gb=grad_stats.stride(0),
                stride_gc=grad_stats.stride(1),
                stride_gk=grad_stats.stride(2),
                **extra,
                **self.args,
            )
        return grad

    def _device_guard(self) -> contextlib.AbstractContextManager:
        """Launches on the logits' GPU whatever the current device is."""
        device = self.logits.device
        return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()

    def _empty_flags(self) -> torch.Tensor:
        """Flags for empty logits: only C == 0 leaves labels to count (all of them are out of range)."""
        flags = torch.zeros(3, dtype=torch.int64, device=self.logits.device)
        if self.args["IS_LABELS"] and self.channels == 0:
            labels = self.target
            flags[0] = (
                labels.numel() if self.ignore_index is None else (labels.long() != self.ignore_index).sum()
            )
        return flags


def _gamma_args(gamma: float) -> dict:
    """gamma as two fp32 numbers whose sum is gamma to ~48 bits (Triton passes floats as fp32)."""
    hi = float(torch.tensor(gamma, dtype=torch.float32))
    return {"gamma_hi": hi, "gamma_lo": float(gamma) - hi}


# ============================================================================== public functions
def overlap_stats(
    logits: torch.Tensor, target: torch.Tensor, activation: int, ignore_index: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """stats [B, C, 3] = (S_pg, S_p, S_g) over the voxels not ignored, and flags int64 [3].

    logits [B, C, V] (any strides, fp16/bf16/fp32/fp64); target [B, V] labels or [B, C, V] float;
    activation 0 none, 1 sigmoid, 2 softmax. Deterministic. See densefuse.reference.overlap_stats.
    """
    _check_activation(activation, (0, 1, 2))
    launch = _Launch(logits, target, ignore_index)
    return launch.forward(_overlap_stats_fwd_kernel, 3, ACTIVATION=activation)


def overlap_stats_backward(
    grad_stats: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    activation: int,
    ignore_index: int | None,
) -> torch.Tensor:
    """dL/dlogits [B, C, V] (contiguous, logits' dtype) given dL/dstats [B, C, 3] (any strides)."""
    _check_activation(activation, (0, 1, 2))
    launch = _Launch(logits, target, ignore_index)
    return launch.backward(_overlap_stats_bwd_kernel, grad_stats, 3, ACTIVATION=activation)


def focal_stats(
    logits: torch.Tensor,
    target: torch.Tensor,
    activation: int,
    gamma: float,
    alpha_pos: torch.Tensor | None,
    alpha_neg: torch.Tensor | None,
    ignore_index: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """stats [B, C, 2] = (sum of the focal loss, number of valid voxels), and flags int64 [3].

    activation 1 sigmoid or 2 softmax; alpha_pos/alpha_neg None or [C] in the accumulation dtype
    (softmax uses alpha_pos only). Deterministic. See densefuse.reference.focal_stats.
    """
    _check_activation(activation, (1, 2))
    launch = _Launch(logits, target, ignore_index)
    return launch.forward(
        _focal_stats_fwd_kernel,
        2,
        ACTIVATION=activation,
        **_gamma_args(gamma),
        **launch.alphas(alpha_pos, alpha_neg),
    )


def focal_stats_backward(
    grad_stats: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    activation: int,
    gamma: float,
    alpha_pos: torch.Tensor | None,
    alpha_neg: torch.Tensor | None,
    ignore_index: int | None,
) -> torch.Tensor:
    """dL/dlogits [B, C, V] (contiguous, logits' dtype) given dL/dstats [B, C, 2] (any strides)."""
    _check_activation(activation, (1, 2))
    launch = _Launch(logits, target, ignore_index)
    return launch.backward(
        _focal_stats_bwd_kernel,
        grad_stats,
        2,
        ACTIVATION=activation,
        **_gamma_args(gamma),
        **launch.alphas(alpha_pos, alpha_neg),
    )
