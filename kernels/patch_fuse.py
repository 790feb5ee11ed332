"""Triton kernels for weighted patch fusion (densefuse.ops.patch_fuse, DESIGN §3b).

Four host functions with the signatures and results of the same-named oracles in
densefuse.reference (that module defines the semantics; this one only computes them faster):

    patch_scatter(acc, windows, starts, wz, wy, wx, floor)      -> flags int64 [2]   (fp32/fp64 atomics)
    patch_gather(acc, windows, starts, wz, wy, wx, floor)       -> flags int64 [2]   (deterministic)
    patch_normalize(acc, starts_z, starts_y, starts_x, wz, wy, wx, floor, activation)        -> None
    patch_finalize(acc, starts_z, starts_y, starts_x, wz, wy, wx, floor, activation, output,
                   threshold)                                    -> [B, C | 1, D, H, W]
    patch_extract(out, volume, starts, mode, cval)               -> None  (out written in place)

Inputs: acc [B, C, D, H, W] float32/float64 (contiguous); windows [N, C, rz, ry, rx] fp16/bf16/
fp32/fp64 (contiguous); starts [N, 4] int64 (batch, z, y, x); wz, wy, wx 1-D in acc's dtype;
per-axis grid starts int64 [Gz], [Gy], [Gx]. Everything is computed in acc's dtype.

Math. Window n with starts[n] = (b, z_n, y_n, x_n) adds, at the voxels of the volume it covers,
    acc[b, c, z, y, x] += w(z - z_n, y - y_n, x - x_n) * windows[n, c, z - z_n, y - y_n, x - x_n],
    w(i, j, k) = max((wz[i] wy[j]) wx[k], floor)                (computed in-kernel from the vectors)
Windows whose batch index is outside [0, B) or that miss the volume add nothing and are counted in
flags[1]; flags[0] counts the NaN/Inf window values that land inside the volume (read in the
windows' own dtype). The finaliser divides by the summed weight of the grid windows covering a voxel,
    N(z, y, x) = sum over (a, b, c) in starts_z x starts_y x starts_x covering it of w(z-a, y-b, x-c),
which for floor == 0 is the outer product (Sz(z) Sy(y)) Sx(x) of the axis sums
    S(p) = sum over starts s (in order) with 0 <= p - s < len(w) of w[p - s],
and with a floor the per-window max(...) summed over the covering grid windows in grid order (z, y, x
starts), as the reference does; either way it is rebuilt per tile from the 1-D starts and weights,
never stored as a volume. v = acc / N where N >= the dtype's smallest normal number, else 0 (voxels
no window covers); then act(v) (none, sigmoid, softmax over C) as floats, or a uint8 mask:
argmax_c v for softmax (NaN counts as the largest value, the first of equal values wins: torch's
rule), [act(v) >= threshold] per channel otherwise, 0 where uncovered.

Layouts. A tile is BLOCK_R rows x BLOCK_X columns, x contiguous in memory; a row is a (z, y) pair
r = z H + y of acc (rows are contiguous too: row r starts at r W) or r = i ry + j of a window.
  * scatter: one program per (window, channel, BLOCK_R window rows); it loops over x in chunks that
    start at a multiple of 4 voxels of acc, so that when W % 16 == 0 the compiler can prove 16-byte
    alignment and emits vector atomics (atom.add.v4.f32 on sm_90). The (at most 3 + 3) lanes of a
    chunk just outside the window add 0, which leaves acc unchanged.
  * gather: one program per (b, c, acc tile). It walks the windows in index order, BLOCK_N at a time:
    one vector test says whether any window of the chunk meets the tile's bounding box, and only then
    are that chunk's windows visited one by one; their weighted values are summed into a register
    tile from 0 and the tile is added to acc with one read and one write. No atomics on acc: the same
    bits on every run. Each window value inside the volume is read once, as in the scatter.
  * extract: one program per (window, channel, BLOCK_R window rows), looping over x; each value's
    source index is computed per axis from the padding mode (reference.pad_index) and loaded from
    the volume with its own strides (any layout); padded constant values are cval.
  * normalize / finalize: one program per (b, acc tile) holding every channel [BLOCK_C, BLOCK_R,
    BLOCK_X] (softmax and argmax need the whole channel axis).
Index arithmetic: each program forms an int64 scalar base offset (batch, channel, window and row
terms can exceed 2**31); offsets inside a tile or a window are int32, and the host checks that they
fit (a window of 2**31 voxels, or a few planes of acc spanning 2**31, is a clear error, never a
wrapped offset).

Scalars: Triton passes Python floats as fp32, so floor and threshold travel as three fp32 parts whose
fp64 sum is the double exactly (fp32 kernels use the first part, the float32 rounding torch uses).

Triton is imported at module import: import this module only where triton is installed.
"""

from __future__ import annotations

import functools
import math
import struct

import torch
import triton
import triton.language as tl

from ._common import device_guard
from .loss_stats import _not_finite, _sigmoid

__all__ = ["patch_extract", "patch_finalize", "patch_gather", "patch_normalize", "patch_scatter"]

_INT32_MAX = 2**31 - 1
# Tiles are BLOCK_R rows x BLOCK_X columns (x contiguous). On the GPU (H100) a tile holds 2048 fp32
# elements (1024 fp64; in the finaliser shared by the channel block), 8 per thread (37-122 registers
# with ptxas for sm_90, tests/test_triton_sm90.py; the finaliser with a weight floor spills 8-24 B in
# some configurations); scatter chunks are 32 wide (a 96-voxel row is 3 chunks,
# no idle lanes), acc tiles 64 (192 = 3 x 64). The interpreter pays per operation, not per element,
# so it gets larger tiles.
_GPU_BLOCK_X = {"scatter": 32, "gather": 64, "finalize": 64}
_GPU_ELEMS = 2048
_ELEMS_PER_THREAD = 8
_INTERPRETER_BLOCK_X = 64
_INTERPRETER_ELEMS = 16384
_MIN_TILE_VOXELS = 16  # voxels per finalize tile however many channels
_BLOCK_N = 32  # windows per intersection test in the gather


# ============================================================================== device helpers
@triton.jit
def _scalar(hi, mid, lo, DTYPE: tl.constexpr):
    """A host float passed as three fp32 parts (see _parts), in DTYPE: exact for float64."""
    if DTYPE == tl.float64:
        value = (tl.cast(hi, tl.float64) + tl.cast(mid, tl.float64)) + tl.cast(lo, tl.float64)
    else:
        value = tl.cast(hi, tl.float32)
    return value


@triton.jit
def _div(a, b):
    """a / b correctly rounded (Triton's fp32 '/' is an approximation; fp64 '/' is exact already)."""
    if a.dtype == tl.float32:
        q = tl.math.div_rn(a, b)
    else:
        q = a / b
    return q


@triton.jit
def _load_starts(starts_ptr, n, mask):
    """(batch, z, y, x) int64 of window(s) n (a scalar or a vector; masked entries read -1)."""
    row = starts_ptr + tl.cast(n, tl.int64) * 4
    b = tl.load(row, mask=mask, other=-1)
    z = tl.load(row + 1, mask=mask, other=-1)
    y = tl.load(row + 2, mask=mask, other=-1)
    x = tl.load(row + 3, mask=mask, other=-1)
    return b, z, y, x


@triton.jit
def _overlaps(start, length, lo, hi):
    """Whether [start, start + length) meets [lo, hi) (element-wise)."""
    return (start < hi) & (start + length > lo)


@triton.jit
def _span(v):
    """[min, max + 1) of a 1-D integer vector, as two scalars."""
    return tl.min(v, axis=0), tl.max(v, axis=0) + 1


@triton.jit
def _placed(b, z, y, x, B, D, H, W, RZ, RY, RX):
    """Whether windows starting at (b, z, y, x) are added: batch in [0, B) and overlapping the volume."""
    inside = _overlaps(z, RZ, 0, D) & _overlaps(y, RY, 0, H) & _overlaps(x, RX, 0, W)
    return (b >= 0) & (b < B) & inside


@triton.jit
def _axis_weight(w_ptr, offs, length):
    """(w[offs], 0 <= offs < length) for window-local indices offs along one axis; 0 outside the window."""
    inside = (offs >= 0) & (offs < length)
    return tl.load(w_ptr + offs, mask=inside, other=0.0), inside


@triton.jit
def _axis_sum(starts_ptr, n_starts, w_ptr, length, pos):
    """S(pos) = sum over the starts s, in order, of w[pos - s] where 0 <= pos - s < length (like pos)."""
    total = tl.zeros(pos.shape, w_ptr.dtype.element_ty)
    for g in range(n_starts):
        w, _ = _axis_weight(w_ptr, pos - tl.load(starts_ptr + g), length)
        total += w
    return total


@triton.jit
def _window_weight(wzy, wx, floor, HAS_FLOOR: tl.constexpr):
    """max((wz[i] wy[j]) wx[k], floor) [R, X] from the row weights wz[i] wy[j] [R] and wx [X]."""
    w = wzy[:, None] * wx[None, :]
    if HAS_FLOOR:
        w = tl.maximum(w, floor)
    return w


@triton.jit
def _any(mask):
    """Whether a 1-D mask has a true entry (a scalar)."""
    return tl.max(mask.to(tl.int32), axis=0) > 0


@triton.jit
def _add_count(flags_ptr, counts):
    """flags_ptr[0] += the sum of an int32 count tile (an int64 atomic, skipped when 0)."""
    total = tl.sum(counts.to(tl.int64))
    tl.atomic_add(flags_ptr, total, mask=total > 0, sem="relaxed")


@triton.jit
def _count_skipped(flags_ptr, starts_ptr, N, B, D, H, W, RZ, RY, RX, BLOCK_N: tl.constexpr):
    """flags[1] += the number of windows that are not placed (see _placed)."""
    skipped = tl.zeros([BLOCK_N], tl.int32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid = offs_n < N
        b, z, y, x = _load_starts(starts_ptr, offs_n, valid)
        skipped += (valid & ~_placed(b, z, y, x, B, D, H, W, RZ, RY, RX)).to(tl.int32)
    _add_count(flags_ptr + 1, skipped)


@triton.jit
def _normalizer(
    z, y, x, starts_z_ptr, starts_y_ptr, starts_x_ptr, GZ, GY, GX, wz_ptr, wy_ptr, wx_ptr, RZ, RY, RX,
    floor, HAS_FLOOR: tl.constexpr,
):  # fmt: skip
    """N [R, X] at the voxels (z[r], y[r], x) (rows z, y [R], columns x [X]) of the grid of per-axis
    starts [GZ], [GY], [GX].

    No floor: (Sz Sy) Sx from the axis sums. Floor: the clamped 3-D weight of every grid window
    covering the voxel, summed in grid order; windows that miss the tile's bounding box along an axis
    are skipped there (scalar tests; they would add 0).
    """
    if HAS_FLOOR:
        z_lo, z_hi = _span(z)
        y_lo, y_hi = _span(y)
        x_lo, x_hi = _span(x)
        total = tl.zeros([z.shape[0], x.shape[0]], wz_ptr.dtype.element_ty)
        for a in range(GZ):
            start_z = tl.load(starts_z_ptr + a)
            if _overlaps(start_z, RZ, z_lo, z_hi):
                wz, cz = _axis_weight(wz_ptr, z - start_z, RZ)
                for b in range(GY):
                    start_y = tl.load(starts_y_ptr + b)
                    if _overlaps(start_y, RY, y_lo, y_hi):
                        wy, cy = _axis_weight(wy_ptr, y - start_y, RY)
                        rows = cz & cy
                        for c in range(GX):
                            start_x = tl.load(starts_x_ptr + c)
                            if _overlaps(start_x, RX, x_lo, x_hi):
                                wx, cx = _axis_weight(wx_ptr, x - start_x, RX)
                                w = _window_weight(wz * wy, wx, floor, True)
                                total += tl.where(rows[:, None] & cx[None, :], w, 0.0)
    else:
        szy = _axis_sum(starts_z_ptr, GZ, wz_ptr, RZ, z) * _axis_sum(starts_y_ptr, GY, wy_ptr, RY, y)
        total = szy[:, None] * _axis_sum(starts_x_ptr, GX, wx_ptr, RX, x)[None, :]
    return total


@triton.jit
def _activate(v, ACTIVATION: tl.constexpr):
    """act(v) over a tile [BLOCK_C, R, X]: 0 none, 1 sigmoid, 2 softmax over axis 0 (masked channels -inf)."""
    if ACTIVATION == 1:
        p, _, _ = _sigmoid(v)
    elif ACTIVATION == 2:
        e = tl.exp(v - tl.max(v, axis=0)[None, :, :])
        p = e / tl.sum(e, axis=0)[None, :, :]
    else:
        p = v
    return p


@triton.jit
def _argmax_nan_wins(v):
    """argmax over axis 0 of a tile [BLOCK_C, R, X] as torch.argmax: NaN is larger than everything
    and the first of equal values wins. (tl.argmax alone keeps or drops a NaN depending on the
    compiled reduction tree, while the interpreter's np.argmax lets it win, so NaNs are located by
    an integer argmax: the first NaN channel where there is one, else the argmax of v.)"""
    is_nan = (v != v).to(tl.int32)
    any_nan, first_nan = tl.max(is_nan, axis=0, return_indices=True, return_indices_tie_break_left=True)
    return tl.where(any_nan > 0, first_nan, tl.argmax(v, axis=0, tie_break_left=True))


@triton.jit
def _pad_index(p, size, MODE: tl.constexpr):
    """(index in [0, size), valid) that padding MODE (reference.PAD_MODES) reads at positions p of an
    axis of length size: valid is False only for constant padding (MODE 0) outside the axis."""
    inside = (p >= 0) & (p < size)
    if MODE == 1:  # reflect, periodic with period 2 (size - 1) (1 for size 1: every index reads 0)
        period = tl.maximum(2 * (size - 1), 1)
        q = p % period
        q = tl.where(q < 0, q + period, q)  # % truncates when compiled, floors when interpreted
        index = tl.where(q < size, q, period - q)
    elif MODE == 2:
        index = tl.minimum(tl.maximum(p, 0), size - 1)
    elif MODE == 3:
        q = p % size
        index = tl.where(q < 0, q + size, q)
    else:
        index = tl.where(inside, p, 0)
    return index, inside | (MODE != 0)


# ===================================================================================== kernels
@triton.jit
def _window_program(C, tiles_r):
    """(window n, channel c, row tile tr) of this program in a grid of N * C * tiles_r programs."""
    pid = tl.program_id(0)
    tr = pid % tiles_r
    nc = pid // tiles_r
    return nc // C, nc % C, tr


@triton.jit
def _extract_kernel(
    out_ptr, vol_ptr, starts_ptr, cval_ptr, C, B, D, H, W, RZ, RY, RX, s_b, s_c, s_z, s_y, s_x, tiles_r,
    MODE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_X: tl.constexpr,
):  # fmt: skip
    """out = padded(volume) windows, grid (N * C * tiles_r,): program = (window n, channel c,
    BLOCK_R rows r = i RY + j of the window), looping over x; cval_ptr: cval in out's dtype."""
    n, c, tr = _window_program(C, tiles_r)
    sb, sz, sy, sx = _load_starts(starts_ptr, n, True)
    in_batch = (sb >= 0) & (sb < B)
    cval = tl.load(cval_ptr)
    r0 = tr * BLOCK_R
    r = r0 + tl.arange(0, BLOCK_R)
    z, z_ok = _pad_index(sz + r // RY, D, MODE)
    y, y_ok = _pad_index(sy + r % RY, H, MODE)
    rows = (r < RZ * RY) & z_ok & y_ok & in_batch
    vol_rows = (
        vol_ptr
        + tl.where(in_batch, sb, 0) * s_b
        + c.to(tl.int64) * s_c
        + z.to(tl.int64) * s_z
        + y.to(tl.int64) * s_y
    )
    out_base = out_ptr + ((tl.cast(n, tl.int64) * C + c) * RZ * RY + r0) * RX
    out_rows = (r - r0) * RX
    for x0 in range(0, RX, BLOCK_X):
        k = x0 + tl.arange(0, BLOCK_X)
        x, x_ok = _pad_index(sx + k, W, MODE)
        read = rows[:, None] & x_ok[None, :]
        value = tl.load(vol_rows[:, None] + (x.to(tl.int64) * s_x)[None, :], mask=read, other=0.0)
        value = tl.where(read, value, cval)
        keep = (r < RZ * RY)[:, None] & (k < RX)[None, :]
        tl.store(out_base + out_rows[:, None] + k[None, :], value, mask=keep)


@triton.jit
def _scatter_kernel(
    acc_ptr, win_ptr, starts_ptr, wz_ptr, wy_ptr, wx_ptr, flags_ptr, floor_hi, floor_mid, floor_lo,
    C, B, D, H, W, RZ, RY, RX, tiles_r,
    HAS_FLOOR: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_X: tl.constexpr,
):  # fmt: skip
    """acc += w * windows, grid (N * C * tiles_r,): program = (window n, channel c, BLOCK_R rows
    r = i RY + j of the window), looping over x; flags int64 [2] += counts."""
    n, c, tr = _window_program(C, tiles_r)
    sb, sz, sy, sx = _load_starts(starts_ptr, n, True)
    placed = _placed(sb, sz, sy, sx, B, D, H, W, RZ, RY, RX)
    first = (c == 0) & (tr == 0)
    tl.atomic_add(flags_ptr + 1, (~placed).to(tl.int64), mask=first & ~placed, sem="relaxed")
    if placed:  # then the starts lie in (-R, size): int32 from here on
        z_n = sz.to(tl.int32)
        y_n = sy.to(tl.int32)
        x_n = sx.to(tl.int32)
        r0 = tr * BLOCK_R
        r = r0 + tl.arange(0, BLOCK_R)
        wz, in_z = _axis_weight(wz_ptr, r // RY, RZ)
        wy, _ = _axis_weight(wy_ptr, r % RY, RY)
        z = z_n + r // RY
        y = y_n + r % RY
        rows = in_z & (z >= 0) & (z < D) & (y >= 0) & (y < H)
        if _any(rows):
            floor = _scalar(floor_hi, floor_mid, floor_lo, ACC_DTYPE)
            z0 = z_n + r0 // RY  # the plane of the tile's first row
            acc_base = acc_ptr + ((sb * C + c) * D + z0) * H * W
            win_base = win_ptr + ((tl.cast(n, tl.int64) * C + c) * RZ * RY + r0) * RX
            acc_rows = ((z - z0) * H + y) * W
            win_rows = (r - r0) * RX
            wzy = wz * wy
            x_end = tl.minimum(x_n + RX, W)
            x_end4 = ((x_end + 3) // 4) * 4
            n_bad = tl.zeros([BLOCK_R, BLOCK_X], tl.int32)
            for x0 in range((tl.maximum(x_n, 0) // 4) * 4, x_end, BLOCK_X):
                x = tl.multiple_of(x0, 4) + tl.arange(0, BLOCK_X)
                wx, in_x = _axis_weight(wx_ptr, x - x_n, RX)
                keep = rows[:, None] & (in_x & (x < W))[None, :]
                raw = tl.load(win_base + win_rows[:, None] + (x - x_n)[None, :], mask=keep, other=0.0)
                n_bad += (keep & _not_finite(raw)).to(tl.int32)
                value = _window_weight(wzy, wx, floor, HAS_FLOOR) * raw.to(ACC_DTYPE)
                add = rows[:, None] & ((x < x_end4) & (x < W))[None, :]
                tl.atomic_add(acc_base + acc_rows[:, None] + x[None, :], value, mask=add, sem="relaxed")
            _add_count(flags_ptr, n_bad)


@triton.jit
def _gather_kernel(
    acc_ptr, win_ptr, starts_ptr, wz_ptr, wy_ptr, wx_ptr, flags_ptr, floor_hi, floor_mid, floor_lo,
    N, C, B, D, H, W, RZ, RY, RX, tiles_r, tiles_x,
    HAS_FLOOR: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_X: tl.constexpr,
):  # fmt: skip
    """acc += sum over windows (index order) of w * windows, grid (B * C * tiles_r * tiles_x,):
    program = (b, c, tile of BLOCK_R rows r = z H + y x BLOCK_X columns of acc); flags += counts."""
    pid = tl.program_id(0)
    tx = pid % tiles_x
    tr = (pid // tiles_x) % tiles_r
    bc = pid // (tiles_x * tiles_r)
    b = bc // C
    c = bc % C
    r_lo = tr * BLOCK_R
    r = r_lo + tl.arange(0, BLOCK_R)
    z = r // H
    y = r % H
    x = tx * BLOCK_X + tl.arange(0, BLOCK_X)
    inside = (r < D * H)[:, None] & (x < W)[None, :]
    # The tile's bounding box (rows past the end make it larger, never smaller).
    z_lo, z_hi = _span(z)
    y_lo, y_hi = _span(y)
    x_lo, x_hi = _span(x)
    floor = _scalar(floor_hi, floor_mid, floor_lo, ACC_DTYPE)
    partial = tl.zeros([BLOCK_R, BLOCK_X], ACC_DTYPE)
    n_bad = tl.zeros([BLOCK_R, BLOCK_X], tl.int32)
    n_hits = 0
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        sb, sz, sy, sx = _load_starts(starts_ptr, offs_n, offs_n < N)
        chunk = _overlaps(sz, RZ, z_lo, z_hi) & _overlaps(sy, RY, y_lo, y_hi) & _overlaps(sx, RX, x_lo, x_hi)
        if _any((offs_n < N) & (sb == b) & chunk):
            for n in range(n0, tl.minimum(n0 + BLOCK_N, N)):
                wb, wz0, wy0, wx0 = _load_starts(starts_ptr, n, True)
                meets = _overlaps(wz0, RZ, z_lo, z_hi) & _overlaps(wy0, RY, y_lo, y_hi)
                if (wb == b) & meets & _overlaps(wx0, RX, x_lo, x_hi):  # starts within int32 from here
                    lz = z - wz0.to(tl.int32)
                    ly = y - wy0.to(tl.int32)
                    lx = x - wx0.to(tl.int32)
                    wz, in_z = _axis_weight(wz_ptr, lz, RZ)
                    wy, in_y = _axis_weight(wy_ptr, ly, RY)
                    wx, in_x = _axis_weight(wx_ptr, lx, RX)
                    keep = inside & (in_z & in_y)[:, None] & in_x[None, :]
                    win_base = win_ptr + (tl.cast(n, tl.int64) * C + c) * (RZ * RY * RX)
                    offs = ((lz * RY + ly) * RX)[:, None] + lx[None, :]
                    raw = tl.load(win_base + offs, mask=keep, other=0.0)
                    n_bad += (keep & _not_finite(raw)).to(tl.int32)
                    partial += _window_weight(wz * wy, wx, floor, HAS_FLOOR) * raw.to(ACC_DTYPE)
                    n_hits += 1
    if n_hits > 0:
        acc_base = acc_ptr + ((b.to(tl.int64) * C + c) * D * H + r_lo) * W
        offs = ((r - r_lo) * W)[:, None] + x[None, :]
        old = tl.load(acc_base + offs, mask=inside)
        tl.store(acc_base + offs, old + partial, mask=inside)
        _add_count(flags_ptr, n_bad)
    if pid == 0:
        _count_skipped(flags_ptr, starts_ptr, N, B, D, H, W, RZ, RY, RX, BLOCK_N)


@triton.jit
def _finalize_kernel(
    acc_ptr, out_ptr, starts_z_ptr, starts_y_ptr, starts_x_ptr, wz_ptr, wy_ptr, wx_ptr,
    floor_hi, floor_mid, floor_lo, thr_hi, thr_mid, thr_lo,
    C, D, H, W, GZ, GY, GX, RZ, RY, RX, tiles_r, tiles_x,
    HAS_FLOOR: tl.constexpr, ACTIVATION: tl.constexpr, OUTPUT: tl.constexpr, ACC_DTYPE: tl.constexpr,
    TINY: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_X: tl.constexpr,
):  # fmt: skip
    """out = act(acc / N) (OUTPUT 0, acc's dtype, out may be acc) or a uint8 mask (OUTPUT 1), grid
    (B * tiles_r * tiles_x,): program = (b, BLOCK_R rows r = z H + y x BLOCK_X columns) x every channel."""
    pid = tl.program_id(0)
    tx = pid % tiles_x
    tr = (pid // tiles_x) % tiles_r
    b = pid // (tiles_x * tiles_r)
    r0 = tr * BLOCK_R
    r = r0 + tl.arange(0, BLOCK_R)
    x = tx * BLOCK_X + tl.arange(0, BLOCK_X)
    floor = _scalar(floor_hi, floor_mid, floor_lo, ACC_DTYPE)
    norm = _normalizer(
        r // H, r % H, x, starts_z_ptr, starts_y_ptr, starts_x_ptr, GZ, GY, GX, wz_ptr, wy_ptr, wx_ptr,
        RZ, RY, RX, floor, HAS_FLOOR,
    )  # fmt: skip
    covered = (norm >= tl.full([], TINY, ACC_DTYPE))[None, :, :]
    offs_c = tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    inside = ((r < D * H)[:, None] & (x < W)[None, :])[None, :, :]
    mask = c_mask[:, None, None] & inside
    tile = (((r - r0) * W)[:, None] + x[None, :])[None, :, :]
    offs = (b.to(tl.int64) * C * D * H + r0) * W + (offs_c.to(tl.int64) * D * H * W)[:, None, None] + tile
    v = tl.load(acc_ptr + offs, mask=mask, other=0.0)
    v = tl.where(covered, _div(v, tl.where(covered, norm[None, :, :], 1.0)), 0.0)
    if ACTIVATION == 2:
        v = tl.where(c_mask[:, None, None], v, float("-inf"))
    if OUTPUT == 0:
        p = tl.where(covered, _activate(v, ACTIVATION), 0.0)
        tl.store(out_ptr + offs, p, mask=mask)
    elif ACTIVATION == 2:
        label = tl.where(covered, _argmax_nan_wins(v)[None, :, :], 0)
        tl.store(out_ptr + (b.to(tl.int64) * D * H + r0) * W + tile, label.to(tl.uint8), mask=inside)
    else:
        threshold = _scalar(thr_hi, thr_mid, thr_lo, ACC_DTYPE)
        hit = covered & (_activate(v, ACTIVATION) >= threshold)
        tl.store(out_ptr + offs, hit.to(tl.uint8), mask=mask)


# =============================================================================== host helpers
def _fp32(value: float) -> float:
    """value rounded to the nearest float32 (to nearest even; out of range: +-Inf)."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        return value * float("inf")


@functools.lru_cache(maxsize=64)
def _parts(value: float) -> tuple[float, float, float]:
    """value as three fp32 numbers (hi, mid, lo) whose fp64 sum is value exactly (barring fp32
    underflow)."""
    parts = []
    rest = float(value)
    for _ in range(3):
        part = _fp32(rest)
        parts.append(part)
        rest -= part
    return tuple(parts)


def _scalar_args(name: str, value: float) -> dict[str, float]:
    return dict(zip((f"{name}_hi", f"{name}_mid", f"{name}_lo"), _parts(value)))


def _tile(rows: int, width: int, device: torch.device, dtype: torch.dtype, kind: str, channels: int = 1):
    """(BLOCK_R, BLOCK_X, num_warps) for a tile of rows x columns (x at least 4, powers of two).

    GPU: _GPU_ELEMS elements (half for float64) shared by ``channels`` (the finaliser's channel
    block), x at most _GPU_BLOCK_X[kind]; the interpreter: fewer, larger tiles.
    """
    if device.type == "cuda":
        cap, elems = _GPU_BLOCK_X[kind], _GPU_ELEMS // (2 if dtype == torch.float64 else 1)
    else:
        cap, elems = _INTERPRETER_BLOCK_X, _INTERPRETER_ELEMS
    elems = max(_MIN_TILE_VOXELS, elems // channels)
    block_x = max(4, min(triton.next_power_of_2(width), cap, elems))
    block_r = min(triton.next_power_of_2(rows), max(1, elems // block_x))
    num_warps = min(8, max(1, channels * block_r * block_x // (32 * _ELEMS_PER_THREAD)))
    return block_r, block_x, num_warps


def _check_int32(what: str, count: int) -> None:
    if count > _INT32_MAX:
        raise ValueError(
            f"{what}: {count} exceeds the int32 tile offsets of the triton kernels ({_INT32_MAX})"
        )


def _check_extents(size: list[int], roi: list[int]) -> None:
    """Coordinates (plus a window size) and row indices r = z H + y (plus a tile) fit int32."""
    for name, s, r in zip("DHW", size, roi):
        _check_int32(f"acc: size {name} plus the window size", s + r)
    _check_int32("acc: rows D * H", size[0] * size[1] + _INTERPRETER_ELEMS)


def _check_acc(acc: torch.Tensor) -> None:
    if acc.dim() != 5 or acc.dtype not in (torch.float32, torch.float64) or not acc.is_contiguous():
        raise ValueError(
            f"acc: expected a contiguous float32/float64 [B, C, D, H, W] tensor, got {acc.dtype} "
            f"{tuple(acc.shape)}"
        )


def _check_vector(
    name: str,
    t: torch.Tensor,
    dtype: torch.dtype,
    device: torch.device,
    length: int | None,
    empty: bool = False,
):
    """A contiguous 1-D ``dtype`` tensor on ``device`` (of ``length`` if given; empty only if ``empty``)."""
    contiguous_1d = t.dim() == 1 and t.dtype == dtype and t.device == device and t.is_contiguous()
    if not contiguous_1d or (t.numel() == 0 and not empty):
        kind = "" if empty else "non-empty "
        raise ValueError(f"{name}: expected a {kind}contiguous 1-D {dtype} tensor on {device}")
    if length is not None and t.numel() != length:
        raise ValueError(f"{name}: expected length {length}, got {t.numel()}")


def _window_launch(acc, windows, starts, wz, wy, wx, floor) -> dict:
    """Kernel arguments shared by the scatter and the gather (after checking what they rely on)."""
    _check_acc(acc)
    batch, channels, *size = acc.shape
    if windows.dim() != 5 or windows.shape[1] != channels or not windows.is_contiguous():
        raise ValueError(f"windows: expected a contiguous [N, {channels}, rz, ry, rx] tensor")
    if windows.device != acc.device or min(windows.shape[2:]) < 1:
        raise ValueError(f"windows: expected non-empty windows on {acc.device}")
    if tuple(starts.shape) != (windows.shape[0], 4) or starts.dtype != torch.int64:
        raise ValueError(
            f"starts: expected int64 [{windows.shape[0]}, 4], got {starts.dtype} {tuple(starts.shape)}"
        )
    if starts.device != acc.device:
        raise ValueError(f"starts: expected a tensor on {acc.device}")
    roi = windows.shape[2:]
    for name, w, r in zip(("wz", "wy", "wx"), (wz, wy, wx), roi):
        _check_vector(name, w, acc.dtype, acc.device, r)
    _check_extents(size, roi)
    _check_int32("windows: voxels per window", roi[0] * roi[1] * roi[2])
    return dict(
        acc_ptr=acc,
        win_ptr=windows,
        starts_ptr=starts.contiguous(),
        wz_ptr=wz,
        wy_ptr=wy,
        wx_ptr=wx,
        **_scalar_args("floor", floor),
        C=channels,
        B=batch,
        D=size[0],
        H=size[1],
        W=size[2],
        RZ=roi[0],
        RY=roi[1],
        RX=roi[2],
        HAS_FLOOR=floor > 0,
        ACC_DTYPE=tl.float64 if acc.dtype == torch.float64 else tl.float32,
    )


# ============================================================================== public functions
def patch_scatter(
    acc: torch.Tensor,
    windows: torch.Tensor,
    starts: torch.Tensor,
    wz: torch.Tensor,
    wy: torch.Tensor,
    wx: torch.Tensor,
    floor: float,
) -> torch.Tensor:
    """acc [B, C, D, H, W] += w * windows [N, C, rz, ry, rx] at starts [N, 4], in one launch (atomics).

    Mutates acc (contiguous float32/float64); windows any float dtype; starts int64 on acc's device;
    wz, wy, wx [rz], [ry], [rx] in acc's dtype. Returns flags int64 [2] (NaN/Inf window values added,
    windows skipped). Summation order varies between runs. See densefuse.reference.patch_scatter.
    """
    args = _window_launch(acc, windows, starts, wz, wy, wx, floor)
    flags = torch.zeros(2, dtype=torch.int64, device=acc.device)
    count, _, *roi = windows.shape
    if count == 0:
        return flags
    block_r, block_x, num_warps = _tile(roi[0] * roi[1], roi[2], acc.device, acc.dtype, "scatter")
    planes = block_r // roi[1] + 2  # planes of acc a tile's rows can touch, plus one
    _check_int32("acc: tile offsets (planes per tile * H * W)", planes * acc.shape[3] * acc.shape[4])
    tiles_r = triton.cdiv(roi[0] * roi[1], block_r)
    programs = count * acc.shape[1] * tiles_r
    _check_int32("windows: programs (N * C * tiles)", programs)
    with device_guard(acc.device):
        _scatter_kernel[(programs,)](
            flags_ptr=flags,
            tiles_r=tiles_r,
            BLOCK_R=block_r,
            BLOCK_X=block_x,
            num_warps=num_warps,
            **args,
        )
    return flags


def patch_gather(
    acc: torch.Tensor,
    windows: torch.Tensor,
    starts: torch.Tensor,
    wz: torch.Tensor,
    wy: torch.Tensor,
    wx: torch.Tensor,
    floor: float,
) -> torch.Tensor:
    """patch_scatter computed output-stationary: every acc tile sums its windows in index order.

    Same arguments and flags as patch_scatter; no atomics on acc, so the result is the same bits on
    every run. See densefuse.reference.patch_gather.
    """
    args = _window_launch(acc, windows, starts, wz, wy, wx, floor)
    flags = torch.zeros(2, dtype=torch.int64, device=acc.device)
    count = windows.shape[0]
    if count == 0:
        return flags
    batch, channels, depth, height, width = acc.shape
    block_r, block_x, num_warps = _tile(depth * height, width, acc.device, acc.dtype, "gather")
    _check_int32("acc: tile offsets (rows per tile * W)", (block_r + 1) * width)
    tiles_r, tiles_x = triton.cdiv(depth * height, block_r), triton.cdiv(width, block_x)
    programs = batch * channels * tiles_r * tiles_x
    _check_int32("acc: programs (B * C * tiles)", programs)
    with device_guard(acc.device):
        _gather_kernel[(programs,)](
            flags_ptr=flags,
            N=count,
            tiles_r=tiles_r,
            tiles_x=tiles_x,
            BLOCK_N=min(_BLOCK_N, triton.next_power_of_2(count)),
            BLOCK_R=block_r,
            BLOCK_X=block_x,
            num_warps=num_warps,
            **args,
        )
    return flags


def _finalize(acc, out, starts, weights, floor, activation, output, threshold) -> None:
    """Launches _finalize_kernel: acc -> out (out may be acc for output 0)."""
    batch, channels, *size = acc.shape
    for name, s in zip(("starts_z", "starts_y", "starts_x"), starts):
        _check_vector(name, s, torch.int64, acc.device, None, empty=True)
    for name, w in zip(("wz", "wy", "wx"), weights):
        _check_vector(name, w, acc.dtype, acc.device, None)
    if min(s.numel() for s in starts) == 0:  # no window: every voxel is uncovered, 0 in every output
        out.zero_()
        return
    _check_extents(size, [w.numel() for w in weights])
    block_c = triton.next_power_of_2(channels)
    block_r, block_x, num_warps = _tile(
        size[0] * size[1], size[2], acc.device, acc.dtype, "finalize", block_c
    )
    _check_int32("acc: tile offsets (rows per tile * W)", (block_r + 1) * size[2])
    tiles_r, tiles_x = triton.cdiv(size[0] * size[1], block_r), triton.cdiv(size[2], block_x)
    programs = batch * tiles_r * tiles_x
    _check_int32("acc: programs (B * tiles)", programs)
    with device_guard(acc.device):
        _finalize_kernel[(programs,)](
            acc,
            out,
            *starts,
            *weights,
            **_scalar_args("floor", floor),
            **_scalar_args("thr", threshold),
            C=channels,
            D=size[0],
            H=size[1],
            W=size[2],
            GZ=starts[0].numel(),
            GY=starts[1].numel(),
            GX=starts[2].numel(),
            RZ=weights[0].numel(),
            RY=weights[1].numel(),
            RX=weights[2].numel(),
            tiles_r=tiles_r,
            tiles_x=tiles_x,
            HAS_FLOOR=floor > 0,
            ACTIVATION=activation,
            OUTPUT=output,
            ACC_DTYPE=tl.float64 if acc.dtype == torch.float64 else tl.float32,
            TINY=torch.finfo(acc.dtype).tiny,
            BLOCK_C=block_c,
            BLOCK_R=block_r,
            BLOCK_X=block_x,
            num_warps=num_warps,
        )


def _check_codes(activation: int, output: int) -> None:
    if activation not in (0, 1, 2):
        raise ValueError(f"activation: expected 0 (none), 1 (sigmoid) or 2 (softmax), got {activation!r}")
    if output not in (0, 1):
        raise ValueError(f"output: expected 0 (probabilities) or 1 (mask), got {output!r}")


def patch_normalize(
    acc: torch.Tensor,
    starts_z: torch.Tensor,
    starts_y: torch.Tensor,
    starts_x: torch.Tensor,
    wz: torch.Tensor,
    wy: torch.Tensor,
    wx: torch.Tensor,
    floor: float,
    activation: int,
) -> None:
    """In place: acc [B, C, D, H, W] (contiguous float32/float64) = act(acc / N), 0 where uncovered.

    starts_* int64 [G*] (the per-axis grid starts) and wz, wy, wx (acc's dtype) on acc's device;
    activation 0 none, 1 sigmoid, 2 softmax over C. See densefuse.reference.patch_normalize.
    """
    _check_acc(acc)
    _check_codes(activation, 0)
    _finalize(acc, acc, (starts_z, starts_y, starts_x), (wz, wy, wx), floor, activation, 0, 0.0)


def patch_finalize(
    acc: torch.Tensor,
    starts_z: torch.Tensor,
    starts_y: torch.Tensor,
    starts_x: torch.Tensor,
    wz: torch.Tensor,
    wy: torch.Tensor,
    wx: torch.Tensor,
    floor: float,
    activation: int,
    output: int,
    threshold: float,
) -> torch.Tensor:
    """act(acc / N) [B, C, D, H, W] in acc's dtype (output 0), or a uint8 mask (output 1): argmax over
    C [B, 1, ...] for softmax, [act(v) >= threshold] [B, C, ...] otherwise; 0 where uncovered.

    Arguments as patch_normalize (acc any float32/float64 layout; it is not modified). See
    densefuse.reference.patch_finalize.
    """
    acc = acc.contiguous()
    _check_acc(acc)
    _check_codes(activation, output)
    if output == 0:
        out = torch.empty_like(acc)
    else:
        if activation == 2 and acc.shape[1] > 256:
            raise ValueError(f"acc: an argmax mask is uint8, so at most 256 classes, got {acc.shape[1]}")
        channels = 1 if activation == 2 else acc.shape[1]
        out = acc.new_empty((acc.shape[0], channels, *acc.shape[2:]), dtype=torch.uint8)
    _finalize(acc, out, (starts_z, starts_y, starts_x), (wz, wy, wx), floor, activation, output, threshold)
    return out


def _fill_value(cval: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """cval as a one-element tensor, rounded as Tensor.fill_ rounds. Kept (extraction runs per batch)
    per CUDA stream (a kept tensor belongs to the stream that filled it), except while a CUDA graph
    is being captured (a tensor made then is only filled by replays)."""
    stream = 0
    if device.type == "cuda" and torch.cuda.is_available():
        if torch.cuda.is_current_stream_capturing():
            return torch.full((1,), cval, dtype=dtype, device=device)
        stream = torch.cuda.current_stream(device).stream_id
    return _kept_fill_value(cval, math.copysign(1.0, cval), dtype, device, stream)


@functools.lru_cache(maxsize=16)
def _kept_fill_value(
    cval: float, sign: float, dtype: torch.dtype, device: torch.device, stream: int
) -> torch.Tensor:
    """_fill_value's tensor, per value and sign (0.0 and -0.0 are equal keys otherwise) and stream
    (only part of the key)."""
    return torch.full((1,), cval, dtype=dtype, device=device)


def patch_extract(
    out: torch.Tensor, volume: torch.Tensor, starts: torch.Tensor, mode: int, cval: float
) -> None:
    """out [N, C, rz, ry, rx] (contiguous, volume's dtype) = the windows of volume [B, C, D, H, W] (any
    strides, fp16/bf16/fp32/fp64) at starts [N, 4] int64, padded by ``mode`` (reference.PAD_MODES)
    where they leave it; a batch index outside [0, B) reads cval. See densefuse.reference.patch_extract.
    """
    if volume.dim() != 5 or volume.numel() == 0:
        raise ValueError(f"volume: expected a non-empty [B, C, D, H, W] tensor, got {tuple(volume.shape)}")
    count, channels, *roi = out.shape
    if out.dtype != volume.dtype or out.device != volume.device or not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous {volume.dtype} tensor on {volume.device}")
    if out.dim() != 5 or channels != volume.shape[1]:
        raise ValueError(f"out: expected [N, {volume.shape[1]}, rz, ry, rx], got {tuple(out.shape)}")
    if tuple(starts.shape) != (count, 4) or starts.dtype != torch.int64 or starts.device != volume.device:
        raise ValueError(f"starts: expected int64 [{count}, 4] on {volume.device}")
    if mode not in (0, 1, 2, 3):
        raise ValueError(f"mode: expected 0, 1, 2 or 3, got {mode}")
    if out.numel() == 0:
        return
    _check_extents(list(volume.shape[2:]), roi)
    if mode == 1:  # _pad_index's reflect period 2 (size - 1) is an int32 too
        for name, size in zip("DHW", volume.shape[2:]):
            _check_int32(f"volume: reflect period 2 (size {name} - 1)", 2 * (size - 1))
    _check_int32("out: voxels per window", roi[0] * roi[1] * roi[2])
    block_r, block_x, num_warps = _tile(roi[0] * roi[1], roi[2], out.device, out.dtype, "scatter")
    tiles_r = triton.cdiv(roi[0] * roi[1], block_r)
    programs = count * channels * tiles_r
    _check_int32("out: programs (N * C * tiles)", programs)
    value = _fill_value(cval, out.dtype, out.device)
    with device_guard(out.device):
        _extract_kernel[(programs,)](
            out, volume, starts.contiguous(), value,
            C=channels, B=volume.shape[0], D=volume.shape[2], H=volume.shape[3], W=volume.shape[4],
            RZ=roi[0], RY=roi[1], RX=roi[2], s_b=volume.stride(0), s_c=volume.stride(1),
            s_z=volume.stride(2), s_y=volume.stride(3), s_x=volume.stride(4), tiles_r=tiles_r,
            MODE=mode, BLOCK_R=block_r, BLOCK_X=block_x, num_warps=num_warps,
        )  # fmt: skip
