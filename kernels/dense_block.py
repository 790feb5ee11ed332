"""Triton kernels for the fused dense-block ops (densefuse.ops.dense_block, DESIGN §3c).

Seven host functions with the signatures and results of the same-named oracles in
densefuse.reference (that module defines the semantics; this one computes them on the GPU):

    channel_stats(x)                                   -> (mean [C], biased var [C])
    bn_relu(x, mean, invstd, weight, bias, out_dtype)  -> y [B, C, V]
    bn_relu_backward(grad_y, x, ..., grad_x)           -> (dweight [C], dbias [C]); grad_x += ...
    bn_relu_conv1x1(x, ..., conv_weight, out_dtype)    -> out [B, C_out, V]
    bn_relu_conv1x1_backward(grad_out, x, ..., grad_x) -> (dweight, dbias, dconv_weight); grad_x += ...
    bn_stats_correction(grad_x, x, mean, a, b)         -> None; grad_x -= ...
    dropout(x, seed, p)                                -> None; x contiguous, masked and scaled in place

x is a channel slice of a dense block's buffer, [B, C, V] with any strides (read in place); grad_x
likewise (updated in place). Per channel: scale = weight invstd, shift = bias - mean scale,
pre = x scale + shift (computed on the host, [C]), y = relu(pre), all arithmetic in the accumulation
dtype (fp32; fp64 for fp64 x).

Kernels. Row kernels (stats, BN-ReLU, its backward, the correction) run on grid (V tiles, C, B),
one program per BLOCK_V voxels of one (batch item, channel) row. Reductions are deterministic: each
program stores its partial sums, the host sums them in a fixed order; the batch statistics are
merged with Chan's formula from per-tile (mean, sum of squared deviations), each tile computed
two-pass in registers, so no E[x^2] - E[x]^2 cancellation at any volume size.
The 1x1x1 convolution is a GEMM out[b] = W [C_out, C] @ relu(pre[b]) [C, V] whose operand load
applies the affine + ReLU (the normalised tensor is never stored); its backward is two GEMMs:
dW = sum_b grad_out[b] @ relu(pre[b])^T (split over P programs along B*V, partials summed on the
host) and grad_y = W^T @ grad_out[b], whose epilogue applies the ReLU mask, adds g scale into
grad_x and reduces the dweight/dbias partials. GEMM operands are rounded to the compute dtype
(out_dtype, resp. grad_out's dtype) and accumulated in fp32 with tl.dot (fp32 operands: TF32 when
torch.backends.cudnn.allow_tf32 is set, as cuDNN's convolutions; fp64 x or operands: an exact FMA
loop over small tiles, summed in fp64 for fp64 x).

Triton is imported at module import: import this module only where triton is installed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from densefuse.reference import accumulate_dtype, dropout_key, dropout_threshold

from ._common import device_guard

__all__ = [
    "bn_relu",
    "bn_relu_backward",
    "bn_relu_conv1x1",
    "bn_relu_conv1x1_backward",
    "bn_stats_correction",
    "channel_stats",
]

_BLOCK_V = {"cuda": 1024, "cpu": 4096}  # row kernels; the interpreter pays per program, not per element
_GEMM_BLOCKS = {"cuda": (64, 128, 32), "cpu": (64, 256, 64)}  # (BLOCK_M, BLOCK_N, BLOCK_K)
# fp64 runs an FMA loop whose [BLOCK_M, BLOCK_K, BLOCK_N] product tile lives in registers: 16^3 on the
# GPU (72-112 registers, no spills on sm_90; 64x128x32 spilled ~37 KB per thread). fp64 is for
# checking results, not speed.
_GEMM_BLOCKS_FP64 = {"cuda": (16, 16, 16), "cpu": (64, 256, 64)}
_DW_PROGRAMS = {"cuda": 64, "cpu": 4}  # split of the dW reduction over B*V (x the K, M tiles)


# ============================================================================== device helpers
# Index products: x is a view of a block's buffer with any strides (channels_last_3d gives stride_v =
# C), so offs_v * stride_v can pass 2^31 while every stride fits int32. The row kernels compute every
# product in 64 bits (they are memory-bound); the GEMM kernels do when the host sets INDEX64
# (_gemm_index64), since 64-bit voxel offsets cost them registers (spills on sm_90).
@triton.jit
def _voxel_range(pid, BLOCK: tl.constexpr, INDEX64: tl.constexpr):
    """Voxel indices [BLOCK] of tile ``pid`` (int64 if INDEX64)."""
    if INDEX64:
        pid = pid.to(tl.int64)
    return pid * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def _row_offsets(ptr, b, c, offs_v, stride_b, stride_c, stride_v):
    """Pointers to elements offs_v of row (b, c), 64-bit offsets."""
    return ptr + b.to(tl.int64) * stride_b + c.to(tl.int64) * stride_c + offs_v.to(tl.int64) * stride_v


@triton.jit
def _matrix_ptrs(ptr, offs_r, offs_c, stride_r, stride_c, INDEX64: tl.constexpr):
    """Pointers [R, C] to ptr[r stride_r + c stride_c] (64-bit products if INDEX64)."""
    if INDEX64:
        offs_r, offs_c = offs_r.to(tl.int64), offs_c.to(tl.int64)
    return ptr + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c


@triton.jit
def _tile_ptrs(ptr, b, offs_r, offs_v, stride_b, stride_r, stride_v, INDEX64: tl.constexpr):
    """Pointers [R, V] to rows offs_r (channels) x voxels offs_v of batch item b (channel offsets
    always 64-bit: C * V passes 2^31 in a contiguous buffer)."""
    base = ptr + b.to(tl.int64) * stride_b
    return _matrix_ptrs(base, offs_r.to(tl.int64), offs_v, stride_r, stride_v, INDEX64)


@triton.jit
def _dot(a, b, acc, USE_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc + a @ b: tl.dot, or an exact broadcast-multiply-sum (fp64)."""
    if USE_DOT == 2:  # the interpreter: half-precision tl.dot is wrong there, fp32 of the same operands
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif USE_DOT == 1:
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    else:
        acc += tl.sum(a.to(acc.dtype)[:, :, None] * b.to(acc.dtype)[None, :, :], axis=1)
    return acc


# ===================================================================================== kernels
@triton.jit
def _stats_kernel(
    x_ptr, mean_ptr, m2_ptr, V, stride_b, stride_c, stride_v, n_vt, C,
    ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """Grid (V tiles, C, B): per-tile mean and sum of squared deviations -> partials [B, n_vt, C]."""
    pid_v, c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs = _voxel_range(pid_v, BLOCK_V, True)
    mask = offs < V
    x = tl.load(_row_offsets(x_ptr, b, c, offs, stride_b, stride_c, stride_v), mask=mask, other=0.0).to(ACC)
    count = tl.minimum(V - pid_v.to(tl.int64) * BLOCK_V, BLOCK_V).to(ACC)
    mean = tl.sum(x) / count
    dev = tl.where(mask, x - mean, 0.0)
    out = (b.to(tl.int64) * n_vt + pid_v) * C + c
    tl.store(mean_ptr + out, mean)
    tl.store(m2_ptr + out, tl.sum(dev * dev))


@triton.jit
def _bn_relu_kernel(
    x_ptr, y_ptr, scale_ptr, shift_ptr, V,
    sxb, sxc, sxv, syb, syc, syv,
    ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """Grid (V tiles, C, B): y = relu(x scale_c + shift_c)."""
    pid_v, c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs = _voxel_range(pid_v, BLOCK_V, True)
    mask = offs < V
    x = tl.load(_row_offsets(x_ptr, b, c, offs, sxb, sxc, sxv), mask=mask, other=0.0).to(ACC)
    y = tl.maximum(x * tl.load(scale_ptr + c) + tl.load(shift_ptr + c), 0.0)
    tl.store(_row_offsets(y_ptr, b, c, offs, syb, syc, syv), y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_relu_bwd_kernel(
    gy_ptr, x_ptr, gx_ptr, scale_ptr, shift_ptr, mean_ptr, dw_ptr, db_ptr, V, n_vt, C,
    sgyb, sgyc, sgyv, sxb, sxc, sxv, sgxb, sgxc, sgxv,
    ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """Grid (V tiles, C, B): g = grad_y [pre > 0]; grad_x += g scale; partials [B, n_vt, C] of
    sum g (x - mean) and sum g (the host scales the first by invstd)."""
    pid_v, c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs = _voxel_range(pid_v, BLOCK_V, True)
    mask = offs < V
    x = tl.load(_row_offsets(x_ptr, b, c, offs, sxb, sxc, sxv), mask=mask, other=0.0).to(ACC)
    gy = tl.load(_row_offsets(gy_ptr, b, c, offs, sgyb, sgyc, sgyv), mask=mask, other=0.0).to(ACC)
    scale = tl.load(scale_ptr + c)
    g = tl.where(x * scale + tl.load(shift_ptr + c) > 0.0, gy, 0.0)
    gx_ptrs = _row_offsets(gx_ptr, b, c, offs, sgxb, sgxc, sgxv)
    gx = tl.load(gx_ptrs, mask=mask, other=0.0)
    tl.store(gx_ptrs, (gx.to(ACC) + g * scale).to(gx.dtype), mask=mask)
    out = (b.to(tl.int64) * n_vt + pid_v) * C + c
    tl.store(dw_ptr + out, tl.sum(g * (x - tl.load(mean_ptr + c))))
    tl.store(db_ptr + out, tl.sum(g))


@triton.jit
def _correction_kernel(
    gx_ptr, x_ptr, alpha_ptr, beta_ptr, V, sgxb, sgxc, sgxv, sxb, sxc, sxv,
    ACC: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    """Grid (V tiles, C, B): grad_x -= alpha_c + x beta_c."""
    pid_v, c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs = _voxel_range(pid_v, BLOCK_V, True)
    mask = offs < V
    x = tl.load(_row_offsets(x_ptr, b, c, offs, sxb, sxc, sxv), mask=mask, other=0.0).to(ACC)
    gx_ptrs = _row_offsets(gx_ptr, b, c, offs, sgxb, sgxc, sgxv)
    gx = tl.load(gx_ptrs, mask=mask, other=0.0)
    term = tl.load(alpha_ptr + c) + x * tl.load(beta_ptr + c)
    tl.store(gx_ptrs, (gx.to(ACC) - term).to(gx.dtype), mask=mask)


@triton.jit
def _load_relu_operand(
    x_ptr, b, offs_k, offs_v, K, V, scale_ptr, shift_ptr, sxb, sxc, sxv, ACC: tl.constexpr,
    INDEX64: tl.constexpr,
):  # fmt: skip
    """relu(x scale + shift) tile [BLOCK_K, BLOCK_V] in ACC; zero outside the channel range."""
    k_mask = offs_k < K
    mask = k_mask[:, None] & (offs_v < V)[None, :]
    x_ptrs = _tile_ptrs(x_ptr, b, offs_k, offs_v, sxb, sxc, sxv, INDEX64)
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(ACC)
    scale = tl.load(scale_ptr + offs_k, mask=k_mask, other=0.0)
    shift = tl.load(shift_ptr + offs_k, mask=k_mask, other=0.0)
    return x, tl.maximum(x * scale[:, None] + shift[:, None], 0.0)


@triton.jit
def _conv1x1_kernel(
    x_ptr, w_ptr, out_ptr, scale_ptr, shift_ptr, K, M, V,
    sxb, sxc, sxv, swm, swk, sob, som, sov,
    ACC: tl.constexpr, DOT: tl.constexpr, USE_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INDEX64: tl.constexpr,
):  # fmt: skip
    """Grid (V tiles, M tiles, B): out[b] = W [M, K] @ relu(x[b] scale + shift) [K, V]."""
    pid_v, pid_m, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_v = _voxel_range(pid_v, BLOCK_N, INDEX64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w_mask = (offs_m < M)[:, None] & (offs_k < K)[None, :]
        w = tl.load(_matrix_ptrs(w_ptr, offs_m, offs_k, swm, swk, INDEX64), mask=w_mask, other=0.0)
        _, y = _load_relu_operand(
            x_ptr, b, offs_k, offs_v, K, V, scale_ptr, shift_ptr, sxb, sxc, sxv, ACC, INDEX64
        )
        acc = _dot(w.to(DOT), y.to(DOT), acc, USE_DOT, INPUT_PRECISION)
    mask = (offs_m < M)[:, None] & (offs_v < V)[None, :]
    out_ptrs = _tile_ptrs(out_ptr, b, offs_m, offs_v, sob, som, sov, INDEX64)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv1x1_dw_kernel(
    go_ptr, x_ptr, dw_ptr, scale_ptr, shift_ptr, K, M, V, n_vt, n_tiles, n_programs,
    sgb, sgm, sgv, sxb, sxc, sxv,
    ACC: tl.constexpr, DOT: tl.constexpr, USE_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INDEX64: tl.constexpr,
):  # fmt: skip
    """Grid (K tiles, M tiles, P): partial dW [P, M, K] = sum over the program's (b, V tile)
    pairs t = p, p + P, ... of grad_out[b] [M, V tile] @ relu(pre[b])^T [V tile, K]."""
    pid_k, pid_m, p = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), ACC)
    for t in range(p, n_tiles, n_programs):
        b = t // n_vt
        offs_v = _voxel_range(t % n_vt, BLOCK_N, INDEX64)
        g_mask = (offs_m < M)[:, None] & (offs_v < V)[None, :]
        go_ptrs = _tile_ptrs(go_ptr, b, offs_m, offs_v, sgb, sgm, sgv, INDEX64)
        go = tl.load(go_ptrs, mask=g_mask, other=0.0)
        _, y = _load_relu_operand(
            x_ptr, b, offs_k, offs_v, K, V, scale_ptr, shift_ptr, sxb, sxc, sxv, ACC, INDEX64
        )
        y = tl.where((offs_v < V)[None, :], y, 0.0)
        acc = _dot(go.to(DOT), tl.trans(y.to(DOT)), acc, USE_DOT, INPUT_PRECISION)
    out = _matrix_ptrs(dw_ptr + p.to(tl.int64) * M * K, offs_m, offs_k, K, 1, INDEX64)
    tl.store(out, acc, mask=(offs_m < M)[:, None] & (offs_k < K)[None, :])


@triton.jit
def _conv1x1_dx_kernel(
    go_ptr, w_ptr, x_ptr, gx_ptr, scale_ptr, shift_ptr, mean_ptr, dw_ptr, db_ptr, K, M, V, n_vt,
    sgb, sgm, sgv, swm, swk, sxb, sxc, sxv, sgxb, sgxc, sgxv,
    ACC: tl.constexpr, DOT: tl.constexpr, USE_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INDEX64: tl.constexpr,
):  # fmt: skip
    """Grid (V tiles, K tiles, B): grad_y = W^T @ grad_out[b] [K tile, V tile] in registers, then
    g = grad_y [pre > 0], grad_x += g scale, partials [B, n_vt, K] of sum g (x - mean) and sum g."""
    pid_v, pid_k, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_v = _voxel_range(pid_v, BLOCK_N, INDEX64)
    acc = tl.zeros((BLOCK_K, BLOCK_N), ACC)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        wt_mask = (offs_k < K)[:, None] & (offs_m < M)[None, :]
        wt = tl.load(_matrix_ptrs(w_ptr, offs_k, offs_m, swk, swm, INDEX64), mask=wt_mask, other=0.0)
        g_mask = (offs_m < M)[:, None] & (offs_v < V)[None, :]
        go_ptrs = _tile_ptrs(go_ptr, b, offs_m, offs_v, sgb, sgm, sgv, INDEX64)
        go = tl.load(go_ptrs, mask=g_mask, other=0.0)
        acc = _dot(wt.to(DOT), go.to(DOT), acc, USE_DOT, INPUT_PRECISION)
    x, y = _load_relu_operand(
        x_ptr, b, offs_k, offs_v, K, V, scale_ptr, shift_ptr, sxb, sxc, sxv, ACC, INDEX64
    )
    g = tl.where(y > 0.0, acc, 0.0)  # zero outside the tile's bounds: acc is 0 there
    k_mask = offs_k < K
    mask = k_mask[:, None] & (offs_v < V)[None, :]
    gx_ptrs = _tile_ptrs(gx_ptr, b, offs_k, offs_v, sgxb, sgxc, sgxv, INDEX64)
    gx = tl.load(gx_ptrs, mask=mask, other=0.0)
    scale = tl.load(scale_ptr + offs_k, mask=k_mask, other=0.0)
    tl.store(gx_ptrs, (gx.to(ACC) + g * scale[:, None]).to(gx.dtype), mask=mask)
    mean = tl.load(mean_ptr + offs_k, mask=k_mask, other=0.0)
    out = (b.to(tl.int64) * n_vt + pid_v) * K + offs_k
    tl.store(dw_ptr + out, tl.sum(g * (x - mean[:, None]), axis=1), mask=k_mask)
    tl.store(db_ptr + out, tl.sum(g, axis=1), mask=k_mask)


@triton.jit
def _lowbias32(x):
    """reference._lowbias32 on uint64 values < 2^32 (multiplies reduced mod 2^32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit(do_not_specialize=["key", "threshold"])  # per-step values: no recompiles, no constant 1
def _dropout_kernel(x_ptr, n, key, threshold, scale_ptr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (n / BLOCK,): x[i] = x[i] scale where hash(i) >= threshold, else 0 (reference.dropout);
    scale [1] in ACC."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    index = offs.to(tl.uint64)
    inner = _lowbias32(((index >> 32) + key.to(tl.uint64)) & 0xFFFFFFFF)
    hashed = _lowbias32((index & 0xFFFFFFFF) ^ inner)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    kept = tl.where(hashed >= threshold.to(tl.uint64), x * tl.load(scale_ptr), 0.0)
    tl.store(x_ptr + offs, kept.to(x_ptr.dtype.element_ty), mask=mask)


# ============================================================================== host helpers
_INT32_MAX = 2**31 - 1
_GRID_YZ_MAX = 65535
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
              torch.float64: tl.float64}  # fmt: skip


def _kind(x: Tensor) -> str:
    return "cuda" if x.device.type == "cuda" else "cpu"


def _affine(mean: Tensor, invstd: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """(scale, shift) [C], contiguous: pre = x scale + shift."""
    scale = weight * invstd
    return scale.contiguous(), (bias - mean * scale).contiguous()


def _grid(sizes: tuple[int, int, int], names: tuple[str, str]) -> tuple[int, int, int]:
    """A launch grid, checked: CUDA allows at most 65535 programs along y and z (``names`` says what
    those count; x, up to 2^31 - 1, counts voxel tiles and cannot pass it)."""
    for size, name in zip(sizes[1:], names):
        if size > _GRID_YZ_MAX:
            raise ValueError(
                f"{name} is {size}; the dense kernels launch one program per unit along a CUDA grid "
                f"dimension, at most {_GRID_YZ_MAX}: split it into chunks"
            )
    return sizes


def _row_grid(x: Tensor) -> tuple[tuple[int, int, int], int, int]:
    """(grid, BLOCK_V, number of V tiles) of the row kernels for x [B, C, V]."""
    block_v = min(_BLOCK_V[_kind(x)], triton.next_power_of_2(x.shape[2]))
    n_vt = triton.cdiv(x.shape[2], block_v)
    return _grid((n_vt, x.shape[1], x.shape[0]), ("x: channels C", "x: batch size B")), block_v, n_vt


def _gemm_config(kind: str, acc: torch.dtype, dtype: torch.dtype) -> dict:
    """Compile-time arguments of the GEMM kernels on ``kind`` ("cuda" | "cpu") for accumulation dtype
    ``acc`` and compute dtype ``dtype``."""
    fp64 = torch.float64 in (acc, dtype)
    block_m, block_n, block_k = (_GEMM_BLOCKS_FP64 if fp64 else _GEMM_BLOCKS)[kind]
    # 0: FMA loop (fp64 operands or accumulator; tl.dot accumulates in the operands' type); 1: tl.dot;
    # 2: tl.dot on fp32 copies of the rounded operands (the interpreter's bf16/fp16 tl.dot returns
    # garbage in triton 3.6; the products are exact in fp32 either way).
    use_dot = 0 if fp64 else (2 if kind == "cpu" else 1)
    precision = "tf32" if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 else "ieee"
    return dict(ACC=_TL_DTYPES[acc], DOT=_TL_DTYPES[dtype], USE_DOT=use_dot, INPUT_PRECISION=precision,
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)  # fmt: skip


def _gemm_index64(config: dict, voxels: int, features: Sequence[Tensor], weight: Tensor) -> bool:
    """Whether a GEMM kernel's index products may pass int32 (then INDEX64): offs_v * stride_v of
    each [B, C, V] operand in ``features``, offs_m * stride and offs_k * stride of the weight [M, K],
    offs_m * K of the contiguous dW partials; offsets up to the extent padded by one block."""
    m, k = weight.shape
    spans = [(voxels + config["BLOCK_N"], t.stride(2)) for t in features]
    spans += [(m + config["BLOCK_M"], weight.stride(0)), (k + config["BLOCK_K"], weight.stride(1)),
              (m + config["BLOCK_M"], k)]  # fmt: skip
    return any(n * max(stride, 1) > _INT32_MAX for n, stride in spans)


def _gemm_args(x: Tensor, dtype: torch.dtype, features: Sequence[Tensor], weight: Tensor) -> dict:
    """Compile-time arguments of the GEMM kernels for x [B, C, V], compute dtype ``dtype``, the
    [B, *, V] operands ``features`` (x among them) and the weight [M, K]."""
    config = _gemm_config(_kind(x), accumulate_dtype(x.dtype), dtype)
    return {**config, "INDEX64": _gemm_index64(config, x.shape[2], features, weight)}


# ============================================================================== public functions
def channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """(mean [C], biased var [C]) of x [B, C, V]: per-tile two-pass moments merged by Chan's formula."""
    grid, block_v, n_vt = _row_grid(x)
    acc = accumulate_dtype(x.dtype)
    means = torch.empty((x.shape[0], n_vt, x.shape[1]), dtype=acc, device=x.device)
    m2 = torch.empty_like(means)
    with device_guard(x.device):
        _stats_kernel[grid](x, means, m2, x.shape[2], *x.stride(), n_vt, x.shape[1], ACC=_TL_DTYPES[acc],
                            BLOCK_V=block_v)  # fmt: skip
    starts = torch.arange(n_vt, device=x.device, dtype=acc) * block_v
    counts = (x.shape[2] - starts).clamp(max=block_v)[None, :, None]
    total = counts.sum() * x.shape[0]
    mean = (means * counts).sum(dim=(0, 1)) / total
    var = (m2 + counts * (means - mean).square()).sum(dim=(0, 1)) / total
    return mean, var


def bn_relu(
    x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor, bias: Tensor, out_dtype: torch.dtype
) -> Tensor:
    """y = relu(x scale + shift): [B, C, V] contiguous in out_dtype."""
    scale, shift = _affine(mean, invstd, weight, bias)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    grid, block_v, _ = _row_grid(x)
    with device_guard(x.device):
        _bn_relu_kernel[grid](x, y, scale, shift, x.shape[2], *x.stride(), *y.stride(),
                              ACC=_TL_DTYPES[accumulate_dtype(x.dtype)], BLOCK_V=block_v)  # fmt: skip
    return y


def bn_relu_backward(
    grad_y: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor, bias: Tensor, grad_x: Tensor
) -> tuple[Tensor, Tensor]:
    """grad_x += grad_y [pre > 0] scale in place -> (dweight [C], dbias [C])."""
    scale, shift = _affine(mean, invstd, weight, bias)
    grid, block_v, n_vt = _row_grid(x)
    acc = accumulate_dtype(x.dtype)
    dw = torch.empty((x.shape[0], n_vt, x.shape[1]), dtype=acc, device=x.device)
    db = torch.empty_like(dw)
    with device_guard(x.device):
        _bn_relu_bwd_kernel[grid](
            grad_y, x, grad_x, scale, shift, mean.contiguous(), dw, db, x.shape[2], n_vt, x.shape[1],
            *grad_y.stride(), *x.stride(), *grad_x.stride(), ACC=_TL_DTYPES[acc], BLOCK_V=block_v,
        )  # fmt: skip
    return dw.sum(dim=(0, 1)) * invstd, db.sum(dim=(0, 1))


def bn_stats_correction(grad_x: Tensor, x: Tensor, mean: Tensor, a: Tensor, b: Tensor) -> None:
    """grad_x -= (a + (x - mean) b) / M in place, M = B*V."""
    count = x.shape[0] * x.shape[2]
    alpha, beta = ((a - mean * b) / count).contiguous(), (b / count).contiguous()
    grid, block_v, _ = _row_grid(x)
    with device_guard(x.device):
        _correction_kernel[grid](grad_x, x, alpha, beta, x.shape[2], *grad_x.stride(), *x.stride(),
                                 ACC=_TL_DTYPES[accumulate_dtype(x.dtype)], BLOCK_V=block_v)  # fmt: skip


def bn_relu_conv1x1(
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor,
    bias: Tensor,
    conv_weight: Tensor,
    out_dtype: torch.dtype,
) -> Tensor:
    """out [B, C_out, V] = conv_weight @ relu(pre), contiguous in out_dtype (operands in out_dtype)."""
    scale, shift = _affine(mean, invstd, weight, bias)
    channels_out = conv_weight.shape[0]
    out = torch.empty((x.shape[0], channels_out, x.shape[2]), dtype=out_dtype, device=x.device)
    args = _gemm_args(x, out_dtype, [x, out], conv_weight)
    m_tiles = triton.cdiv(channels_out, args["BLOCK_M"])
    grid = _grid((triton.cdiv(x.shape[2], args["BLOCK_N"]), m_tiles, x.shape[0]),
                 (f"conv_weight: output channels / {args['BLOCK_M']}", "x: batch size B"))  # fmt: skip
    with device_guard(x.device):
        _conv1x1_kernel[grid](
            x, conv_weight, out, scale, shift, x.shape[1], channels_out, x.shape[2],
            *x.stride(), *conv_weight.stride(), *out.stride(), **args,
        )  # fmt: skip
    return out


def bn_relu_conv1x1_backward(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor,
    bias: Tensor,
    conv_weight: Tensor,
    grad_x: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """grad_x += (W^T grad_out) [pre > 0] scale in place -> (dweight, dbias, dconv_weight [C_out, C])."""
    scale, shift = _affine(mean, invstd, weight, bias)
    batch, channels, voxels = x.shape
    channels_out = conv_weight.shape[0]
    acc = accumulate_dtype(x.dtype)
    args = _gemm_args(x, grad_out.dtype, [x, grad_out, grad_x], conv_weight)
    n_vt = triton.cdiv(voxels, args["BLOCK_N"])
    n_programs = max(1, min(_DW_PROGRAMS[_kind(x)], batch * n_vt))
    dconv = torch.empty((n_programs, channels_out, channels), dtype=acc, device=x.device)
    dw = torch.empty((batch, n_vt, channels), dtype=acc, device=x.device)
    db = torch.empty_like(dw)
    k_tiles, m_tiles = triton.cdiv(channels, args["BLOCK_K"]), triton.cdiv(channels_out, args["BLOCK_M"])
    m_name, k_name = f"conv_weight: output channels / {args['BLOCK_M']}", f"x: channels C / {args['BLOCK_K']}"
    dw_grid = _grid((k_tiles, m_tiles, n_programs), (m_name, "dW programs"))
    dx_grid = _grid((n_vt, k_tiles, batch), (k_name, "x: batch size B"))
    with device_guard(x.device):
        _conv1x1_dw_kernel[dw_grid](
            grad_out, x, dconv, scale, shift, channels, channels_out, voxels, n_vt, batch * n_vt, n_programs,
            *grad_out.stride(), *x.stride(), **args,
        )  # fmt: skip
        _conv1x1_dx_kernel[dx_grid](
            grad_out, conv_weight, x, grad_x, scale, shift, mean.contiguous(), dw, db, channels, channels_out,
            voxels, n_vt, *grad_out.stride(), *conv_weight.stride(), *x.stride(), *grad_x.stride(), **args,
        )  # fmt: skip
    return dw.sum(dim=(0, 1)) * invstd, db.sum(dim=(0, 1)), dconv.sum(dim=0)


def dropout(x: Tensor, seed: int, p: float) -> None:
    """In place on a contiguous x: x / (1 - p) where hash(seed, i) >= floor(p 2^32), else 0."""
    acc = accumulate_dtype(x.dtype)
    scale = torch.tensor([1 / (1 - p) if p < 1 else 0.0], dtype=acc, device=x.device)  # rounded to acc
    block = 1024
    with device_guard(x.device):
        _dropout_kernel[(triton.cdiv(x.numel(), block),)](
            x,
            x.numel(),
            dropout_key(seed),
            dropout_threshold(p),
            scale,
            ACC=_TL_DTYPES[acc],
            BLOCK=block,
        )
