"""Fused dense-block ops: batch statistics, BN-affine + ReLU (+ 1x1x1 conv) and their backward (§3c).

A dense block keeps every feature map in one buffer [B, C_total, V]; each op reads a channel slice or
prefix of it as x [B, C, V] (a view, any strides, never copied). With the layer's statistics (mean,
invstd) and BN parameters (weight, bias), pre = (x - mean) * invstd * weight + bias and y = relu(pre):

    densefuse::dense_channel_stats            x -> (mean [C], biased var [C])                 (autograd)
    densefuse::dense_bn_relu                  -> y [B, C, V] in out_dtype                      (autograd)
    densefuse::dense_bn_relu_backward_        grad_y -> grad_x += ..., (dweight, dbias)
    densefuse::dense_bn_relu_conv1x1          -> conv_weight [C_out, C] @ y, y never stored    (autograd)
    densefuse::dense_bn_relu_conv1x1_backward_ grad_out -> grad_x += ..., (dweight, dbias, dconv_weight)
    densefuse::dense_bn_correction_           grad_x -= (a + (x - mean) * b) / M
    densefuse::dense_dropout_                 x = x / (1 - p) where hash(seed, i) >= floor(p 2^32), else 0

The backward ops hold the statistics fixed and accumulate into a shared gradient buffer; when the
statistics are batch statistics shared by several layers, dense_bn_correction_ folds their gradient
terms once per channel after every consumer has contributed (densefuse.nn.DenseBlock3d does this).
Used alone, dense_channel_stats -> dense_bn_relu(_conv1x1) is differentiable end to end: the
autograd formulas give the gradients w.r.t. the statistics too, so the composition is batch norm.

Statistics, BN parameters and the returned parameter gradients are in the accumulation dtype (fp32;
fp64 for fp64 x); grad_x may have any float dtype (each update is computed in the accumulation dtype
and rounded once, so a bf16 gradient buffer accumulates like autograd's bf16 gradients).

Semantics: densefuse.reference (the ``torch`` backend); ``triton``: densefuse.kernels.dense_block
(CUDA); ``cpp`` (CPU): one-pass C++ kernels for BN-ReLU, its backward and the correction
(csrc/cpu/dense_block.cpp), the reference's GEMMs around them for the 1x1x1 convolution (in bf16 for
bf16 operands: reference.BnReluKernels.bf16_gemm), and ATen's batch-norm statistics. There are no
cuda (C++) kernels: forcing that backend raises RuntimeError.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

import torch
from torch import Tensor

from densefuse import reference
from densefuse.ops import _validate
from densefuse.ops._backend import (
    Registry,
    available_backends,
    extension_ops,
    forced_backend,
    forced_backend_scope,
)

OP_NAMES = (
    "channel_stats",
    "bn_relu",
    "bn_relu_backward",
    "bn_relu_conv1x1",
    "bn_relu_conv1x1_backward",
    "bn_stats_correction",
    "dropout",
)


# The cpp backend's own kernels (densefuse._C, CPU), by op name.
_CPP_KERNELS = {
    "bn_relu": "dense_bn_relu",
    "bn_relu_backward": "dense_bn_relu_backward_",
    "bn_stats_correction": "dense_bn_correction_",
    "dropout": "dense_dropout_",
}


def _triton_loader(name: str) -> Callable[[], Callable]:
    return lambda: getattr(importlib.import_module("densefuse.kernels.dense_block"), name)


def _cpp_loader(name: str) -> Callable[[], Callable]:
    """The C++ kernel, or for the other ops the reference composed with the C++ kernels."""
    if name in _CPP_KERNELS:
        return lambda: getattr(torch.ops.densefuse_ext, _CPP_KERNELS[name])
    if name == "channel_stats":
        return lambda: reference.channel_stats  # ATen's batch_norm_update_stats: one C++ pass already

    def load() -> Callable:
        ext = torch.ops.densefuse_ext
        kernels = reference.BnReluKernels(ext.dense_bn_relu, ext.dense_bn_relu_backward_, bf16_gemm=True)
        return functools.partial(getattr(reference, name), kernels=kernels)

    return load


def _cpp_available() -> bool:
    return set(_CPP_KERNELS.values()) <= extension_ops().get("cpu", frozenset())


def _registry(name: str) -> Registry:
    loaders = {
        "torch": lambda: getattr(reference, name),
        "cpp": _cpp_loader(name),
        "triton": _triton_loader(name),
    }
    return Registry(name, loaders, has_kernel=lambda backend: backend != "cpp" or _cpp_available())


_REGISTRIES = {name: _registry(name) for name in OP_NAMES}


def implemented_backends(device_type: str) -> list[str]:
    """The backends available on ``device_type`` that have kernels for every dense-block op."""
    return [b for b in available_backends(device_type) if all(r.has(b) for r in _REGISTRIES.values())]


def _impl(name: str, device: torch.device) -> Callable:
    """The forced backend's kernel (an error if it has none), else the default's, else the reference."""
    return _REGISTRIES[name](device)


def _param_like(x: Tensor) -> Tensor:
    return x.new_empty((x.shape[1],), dtype=reference.accumulate_dtype(x.dtype))


# --------------------------------------------------------------------------------------- statistics
@torch.library.custom_op("densefuse::dense_channel_stats", mutates_args=())
def channel_stats_op(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [B, C, V] -> (mean [C], biased var [C]), accumulation dtype, numerically stable."""
    return _impl("channel_stats", x.device)(x)


@channel_stats_op.register_fake
def _(x):
    return _param_like(x), _param_like(x)


def _channel_stats_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[0])


def _channel_stats_backward(ctx, grad_mean, grad_var):
    """dx = (dmean + 2 (x - mean) dvar) / M, M = B*V."""
    x, mean = ctx.saved_tensors
    count = x.shape[0] * x.shape[2]
    grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean
    grad_var = torch.zeros_like(mean) if grad_var is None else grad_var
    centered = x.to(mean.dtype) - mean[:, None]
    return ((grad_mean[:, None] + 2 * centered * grad_var[:, None]) / count).to(x.dtype)


channel_stats_op.register_autograd(_channel_stats_backward, setup_context=_channel_stats_setup)


# ------------------------------------------------------------------------------------- BN + ReLU
@torch.library.custom_op("densefuse::dense_bn_relu", mutates_args=())
def bn_relu_op(
    x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor, bias: Tensor, out_dtype: torch.dtype
) -> Tensor:
    """y = relu((x - mean) * invstd * weight + bias): [B, C, V] in out_dtype."""
    return _impl("bn_relu", x.device)(x, mean, invstd, weight, bias, out_dtype)


@bn_relu_op.register_fake
def _(x, mean, invstd, weight, bias, out_dtype):
    return torch.empty(x.shape, dtype=out_dtype, device=x.device)


@torch.library.custom_op("densefuse::dense_bn_relu_backward_", mutates_args=("grad_x",))
def bn_relu_backward_op(
    grad_y: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor, bias: Tensor, grad_x: Tensor
) -> tuple[Tensor, Tensor]:
    """grad_x += g * weight * invstd (g = grad_y [pre > 0]) -> (dweight, dbias) [C]."""
    return _impl("bn_relu_backward", x.device)(grad_y, x, mean, invstd, weight, bias, grad_x)


@bn_relu_backward_op.register_fake
def _(grad_y, x, mean, invstd, weight, bias, grad_x):
    return _param_like(x), _param_like(x)


def _stats_grads(dweight: Tensor, dbias: Tensor, invstd: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """(dmean, dinvstd) from a layer's (dweight, dbias): pre depends on mean and invstd too."""
    return -weight * invstd * dbias, weight * dweight / invstd


def _bn_relu_setup(ctx, inputs, output):
    ctx.backend = forced_backend()
    ctx.save_for_backward(*inputs[:5])


def _bn_relu_backward(ctx, grad_y):
    x, mean, invstd, weight, bias = ctx.saved_tensors
    grad_x = torch.zeros_like(x)
    with forced_backend_scope(ctx.backend):
        dweight, dbias = bn_relu_backward_op(grad_y, x, mean, invstd, weight, bias, grad_x)
    return grad_x, *_stats_grads(dweight, dbias, invstd, weight), dweight, dbias, None


bn_relu_op.register_autograd(_bn_relu_backward, setup_context=_bn_relu_setup)


# ----------------------------------------------------------------------- BN + ReLU + 1x1x1 conv
@torch.library.custom_op("densefuse::dense_bn_relu_conv1x1", mutates_args=())
def bn_relu_conv1x1_op(
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor,
    bias: Tensor,
    conv_weight: Tensor,
    out_dtype: torch.dtype,
) -> Tensor:
    """conv_weight [C_out, C] @ relu(pre) -> [B, C_out, V] in out_dtype (GEMM operands in out_dtype)."""
    return _impl("bn_relu_conv1x1", x.device)(x, mean, invstd, weight, bias, conv_weight, out_dtype)


@bn_relu_conv1x1_op.register_fake
def _(x, mean, invstd, weight, bias, conv_weight, out_dtype):
    return torch.empty((x.shape[0], conv_weight.shape[0], x.shape[2]), dtype=out_dtype, device=x.device)


@torch.library.custom_op("densefuse::dense_bn_relu_conv1x1_backward_", mutates_args=("grad_x",))
def bn_relu_conv1x1_backward_op(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor,
    bias: Tensor,
    conv_weight: Tensor,
    grad_x: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """grad_x += (conv_weight^T grad_out) [pre > 0] weight invstd -> (dweight, dbias, dconv_weight)."""
    impl = _impl("bn_relu_conv1x1_backward", x.device)
    return impl(grad_out, x, mean, invstd, weight, bias, conv_weight, grad_x)


@bn_relu_conv1x1_backward_op.register_fake
def _(grad_out, x, mean, invstd, weight, bias, conv_weight, grad_x):
    dconv = conv_weight.new_empty(conv_weight.shape, dtype=reference.accumulate_dtype(x.dtype))
    return _param_like(x), _param_like(x), dconv


def _conv1x1_setup(ctx, inputs, output):
    ctx.backend = forced_backend()
    ctx.save_for_backward(*inputs[:6])


def _conv1x1_backward(ctx, grad_out):
    x, mean, invstd, weight, bias, conv_weight = ctx.saved_tensors
    grad_x = torch.zeros_like(x)
    with forced_backend_scope(ctx.backend):
        dweight, dbias, dconv = bn_relu_conv1x1_backward_op(
            grad_out.contiguous(), x, mean, invstd, weight, bias, conv_weight, grad_x
        )
    dconv = dconv.to(conv_weight.dtype)
    return grad_x, *_stats_grads(dweight, dbias, invstd, weight), dweight, dbias, dconv, None


bn_relu_conv1x1_op.register_autograd(_conv1x1_backward, setup_context=_conv1x1_setup)


# ------------------------------------------------------------------------ batch-statistics terms
@torch.library.custom_op("densefuse::dense_bn_correction_", mutates_args=("grad_x",))
def bn_stats_correction_op(grad_x: Tensor, x: Tensor, mean: Tensor, a: Tensor, b: Tensor) -> None:
    """grad_x -= (a + (x - mean) * b) / M per channel, M = B*V (see reference.bn_stats_correction)."""
    _impl("bn_stats_correction", x.device)(grad_x, x, mean, a, b)


@bn_stats_correction_op.register_fake
def _(grad_x, x, mean, a, b):
    return None


@torch.library.custom_op("densefuse::dense_dropout_", mutates_args=("x",))
def dropout_op(x: Tensor, seed: int, p: float) -> None:
    """x = x / (1 - p) where hash(seed, i) >= floor(p 2^32), else 0 (see reference.dropout)."""
    _impl("dropout", x.device)(x, seed, p)


@dropout_op.register_fake
def _(x, seed, p):
    return None


# ------------------------------------------------------------------------------- public functions
def _features(name: str, x: object, inplace: bool = False) -> Tensor:
    """x [B, C, *spatial] (float, non-empty) as [B, C, V]: a view (required when ``inplace``)."""
    x = _validate.check_tensor(name, x)
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")
    if x.dim() < 3 or x.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty tensor [B, C, *spatial], got {tuple(x.shape)}")
    if not inplace:
        return _validate.flatten_spatial(x, 2)
    if torch._debug_has_internal_overlap(x) == 1:  # 1: some elements share memory (e.g. expanded)
        raise ValueError(f"{name}: updated in place, so its elements must not share memory (expanded?)")
    try:
        return x.view(x.shape[0], x.shape[1], -1)
    except RuntimeError as err:
        raise ValueError(f"{name}: updated in place, so its spatial dims must be viewable as one") from err


def _same_shape(name: str, t: object, x: Tensor, shape: tuple[int, ...], inplace: bool = False) -> Tensor:
    t = _features(name, t, inplace)
    if tuple(t.shape) != shape or t.device != x.device:
        raise ValueError(f"{name}: expected shape {shape} (as [B, C, V]) on {x.device}, got "
                         f"{tuple(t.shape)} on {t.device}")  # fmt: skip
    return t


def _per_channel(x: Tensor, **params: object) -> list[Tensor]:
    """Each parameter as a [C] tensor in x's accumulation dtype, C = x.shape[1]."""
    out = []
    for name, value in params.items():
        value = _validate.check_tensor(name, value)
        if tuple(value.shape) != (x.shape[1],) or not value.is_floating_point():
            raise ValueError(
                f"{name}: expected a float tensor of shape ({x.shape[1]},) (one per channel of x), "
                f"got {value.dtype} {tuple(value.shape)}"
            )
        if value.device != x.device:
            raise ValueError(f"{name}: expected a tensor on {x.device} like x, got {value.device}")
        out.append(value.to(reference.accumulate_dtype(x.dtype)).contiguous())
    return out


def _conv_weight(conv_weight: object, x: Tensor) -> Tensor:
    """[C_out, C] from [C_out, C] or a Conv3d weight [C_out, C, 1, 1, 1]."""
    conv_weight = _validate.check_tensor("conv_weight", conv_weight)
    if conv_weight.dim() > 2 and all(s == 1 for s in conv_weight.shape[2:]):
        conv_weight = conv_weight.flatten(1)
    if conv_weight.dim() != 2 or conv_weight.shape[1] != x.shape[1] or conv_weight.device != x.device:
        raise ValueError(
            f"conv_weight: expected [C_out, {x.shape[1]}] or [C_out, {x.shape[1]}, 1, 1, 1] on {x.device}, "
            f"got {tuple(conv_weight.shape)} on {conv_weight.device}"
        )
    return conv_weight


def _out_dtype(out_dtype: torch.dtype | None, x: Tensor) -> torch.dtype:
    if out_dtype is None:
        return x.dtype
    if out_dtype not in _validate.FLOAT_DTYPES:
        raise TypeError(f"out_dtype: expected one of {_validate.FLOAT_DTYPES}, got {out_dtype}")
    return out_dtype


def channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Batch statistics per channel: x [B, C, *spatial] -> (mean [C], biased variance [C]).

    fp32 for fp16/bf16/fp32 x (fp64 for fp64), numerically stable for any volume; differentiable.
    """
    return channel_stats_op(_features("x", x))


def bn_relu(
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor,
    bias: Tensor,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """relu((x - mean) * invstd * weight + bias) for x [B, C, *spatial], per-channel [C] parameters.

    Result in out_dtype (default x's), x's shape; differentiable w.r.t. x, the statistics and the
    parameters (with mean, invstd from channel_stats this is batch norm + ReLU).
    """
    flat = _features("x", x)
    y = bn_relu_op(flat, *_per_channel(flat, mean=mean, invstd=invstd, weight=weight, bias=bias),
                   _out_dtype(out_dtype, x))  # fmt: skip
    return y.view(x.shape)


def bn_relu_conv1x1(
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor,
    bias: Tensor,
    conv_weight: Tensor,
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    """conv1x1x1(bn_relu(x), conv_weight) without storing bn_relu(x): [B, C_out, *spatial].

    conv_weight [C_out, C] (or [C_out, C, 1, 1, 1]); GEMM operands rounded to out_dtype (default x's),
    products summed in fp32 (fp64 for fp64 x). Differentiable like bn_relu, and w.r.t. conv_weight.
    """
    flat = _features("x", x)
    params = _per_channel(flat, mean=mean, invstd=invstd, weight=weight, bias=bias)
    out = bn_relu_conv1x1_op(flat, *params, _conv_weight(conv_weight, flat), _out_dtype(out_dtype, x))
    return out.view(x.shape[0], -1, *x.shape[2:])


def bn_relu_backward_(
    grad_y: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor, bias: Tensor, grad_x: Tensor
) -> tuple[Tensor, Tensor]:
    """Backward of bn_relu with fixed statistics, accumulated: grad_x += grad_y [pre > 0] weight invstd.

    grad_y, x, grad_x [B, C, *spatial] (grad_x updated in place, e.g. a slice of a block's gradient
    buffer). Returns (dweight, dbias) [C] = (sum g xhat, sum g), g = grad_y [pre > 0].
    """
    flat = _features("x", x)
    shape = tuple(flat.shape)
    return bn_relu_backward_op(
        _same_shape("grad_y", grad_y, flat, shape), flat,
        *_per_channel(flat, mean=mean, invstd=invstd, weight=weight, bias=bias),
        _same_shape("grad_x", grad_x, flat, shape, inplace=True),
    )  # fmt: skip


def bn_relu_conv1x1_backward_(
    grad_out: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor,
    bias: Tensor,
    conv_weight: Tensor,
    grad_x: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of bn_relu_conv1x1 with fixed statistics; grad_x [B, C, *spatial] accumulated in place.

    grad_out [B, C_out, *spatial]. Returns (dweight [C], dbias [C], dconv_weight [C_out, C]) in fp32
    (fp64 for fp64 x); the input gradient conv_weight^T grad_out is never stored.
    """
    flat = _features("x", x)
    conv_weight = _conv_weight(conv_weight, flat)
    out_shape = (flat.shape[0], conv_weight.shape[0], flat.shape[2])
    return bn_relu_conv1x1_backward_op(
        _same_shape("grad_out", grad_out, flat, out_shape), flat,
        *_per_channel(flat, mean=mean, invstd=invstd, weight=weight, bias=bias), conv_weight,
        _same_shape("grad_x", grad_x, flat, tuple(flat.shape), inplace=True),
    )  # fmt: skip


def bn_stats_correction_(grad_x: Tensor, x: Tensor, mean: Tensor, a: Tensor, b: Tensor) -> None:
    """In place: grad_x -= (a + (x - mean) * b) / M per channel of x [B, C, *spatial], M = B*V.

    Folds the batch-statistics terms of BN's input gradient once per channel for every layer l that
    normalised it with the shared batch mean: a = sum_l weight_l invstd_l dbias_l,
    b = sum_l weight_l invstd_l^2 dweight_l.
    """
    flat = _features("x", x)
    grad_x = _same_shape("grad_x", grad_x, flat, tuple(flat.shape), inplace=True)
    bn_stats_correction_op(grad_x, flat, *_per_channel(flat, mean=mean, a=a, b=b))


def dropout_(x: Tensor, seed: int, p: float) -> Tensor:
    """Dropout in place by a counter-based hash: the same mask for the same seed and shape, on every
    backend, with no random tensor and nothing stored. x: contiguous float tensor (the mask follows
    its element order); element i is kept (and scaled by 1 / (1 - p)) iff hash(seed, i) >=
    floor(p 2^32), so it is kept with probability 1 - p. Returns x."""
    x = _validate.check_tensor("x", x)
    if x.dtype not in _validate.FLOAT_DTYPES or not x.is_contiguous():
        raise ValueError(f"x: expected a contiguous float tensor, got {x.dtype} with strides {x.stride()}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**63) <= seed < 2**63:
        raise ValueError(f"seed: expected an int64, got {seed!r}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise ValueError(f"p: expected a probability in [0, 1], got {p!r}")
    if p > 0 and x.numel() > 0:
        dropout_op(x, seed, float(p))
    return x
