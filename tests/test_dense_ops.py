"""The fused dense-block ops (densefuse.ops.dense_block) on every backend here.

Each op, through its public wrapper, against a plain float64 formula written here (so the torch
backend, densefuse.reference, is checked too), on channel slices of a bigger buffer (the way a
dense block calls them), odd sizes, fp32/fp64 and bf16 GEMM operands; the in-place accumulation
semantics; gradcheck in float64 of the autograd formulas (statistics -> BN-ReLU(-Conv1x1x1) is
batch norm); the shared-statistics correction against per-layer batch norm; opcheck; bad input.
Triton runs under TRITON_INTERPRET=1 without a GPU (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import sm90
import torch
import torch.nn.functional as F
from conftest import cpu_backends, requires_cuda

import densefuse
from densefuse.ops import dense_block as ops

BACKENDS = [b for b in cpu_backends() if b in ("torch", "cpp", "triton")]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.one_thread)


TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=2e-5)}


def channel_slice(rng, batch, channels, voxels, dtype, offset=3, total=None):
    """A [B, C, V] view of channels [offset, offset + C) of a [B, total, V] buffer (non-contiguous)."""
    total = total or channels + offset + 2
    buffer = torch.randn(batch, total, voxels, generator=rng, dtype=torch.float64) * 2 + 0.5
    return buffer.to(dtype)[:, offset : offset + channels]


def bn_params(rng, channels, dtype):
    """(mean, invstd, weight, bias) [C] with a mix of active and inactive ReLU units."""
    mean = torch.randn(channels, generator=rng, dtype=torch.float64) * 0.5
    invstd = torch.rand(channels, generator=rng, dtype=torch.float64) + 0.5
    weight = torch.randn(channels, generator=rng, dtype=torch.float64)
    bias = torch.randn(channels, generator=rng, dtype=torch.float64) * 0.5
    return [t.to(dtype) for t in (mean, invstd, weight, bias)]


def plain_pre(x, mean, invstd, weight, bias):
    """(x - mean) invstd weight + bias in float64."""
    x, mean, invstd, weight, bias = (t.double() for t in (x, mean, invstd, weight, bias))
    return ((x - mean[:, None]) * invstd[:, None]) * weight[:, None] + bias[:, None]


def close(actual, expected, dtype):
    torch.testing.assert_close(actual, expected.to(actual.dtype), **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(2, 5, 37), (1, 3, 1000), (3, 17, 7)], ids=str)
def test_channel_stats(backend, dtype, shape, rng):
    x = channel_slice(rng, *shape, dtype) + 1e3  # offset mean: E[x^2] - E[x]^2 would lose digits
    with densefuse.use_backend(backend):
        mean, var = ops.channel_stats(x.view(*shape[:2], 1, 1, -1))  # [B, C, *spatial] accepted
    expected_var, expected_mean = torch.var_mean(x.double(), dim=(0, 2), correction=0)
    assert mean.dtype == var.dtype == dtype
    close(mean, expected_mean, dtype)
    torch.testing.assert_close(var, expected_var.to(dtype), rtol=1e-4 if dtype == torch.float32 else 1e-9,
                               atol=1e-6)  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_bn_relu_and_backward(backend, dtype, rng):
    batch, channels, voxels = 2, 19, 61
    x = channel_slice(rng, batch, channels, voxels, dtype)
    params = bn_params(rng, channels, dtype)
    grad_y = torch.randn(batch, channels, voxels, generator=rng, dtype=dtype)
    grad_buffer = torch.randn(batch, channels + 4, voxels, generator=rng, dtype=dtype)
    before = grad_buffer.clone()
    with densefuse.use_backend(backend):
        y = ops.bn_relu(x, *params)
        dweight, dbias = ops.bn_relu_backward_(grad_y, x, *params, grad_buffer[:, 2 : 2 + channels])
    pre = plain_pre(x, *params)
    close(y, pre.relu(), dtype)
    g = grad_y.double() * (pre > 0)
    mean, invstd, weight, _ = (t.double() for t in params)
    close(
        grad_buffer[:, 2 : 2 + channels], before[:, 2 : 2 + channels] + g * (weight * invstd)[:, None], dtype
    )
    assert torch.equal(grad_buffer[:, :2], before[:, :2]) and torch.equal(grad_buffer[:, -2:], before[:, -2:])
    close(dbias, g.sum(dim=(0, 2)), dtype)
    close(dweight, (g * (x.double() - mean[:, None]) * invstd[:, None]).sum(dim=(0, 2)), dtype)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="needs the compiled extension")
@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("y_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("step", [1, 2], ids=["unit", "strided"])
@pytest.mark.parametrize("accumulate_in_x_dtype", [False, True], ids=["grad_x-fp32", "grad_x-like-x"])
def test_cpp_elementwise_kernels_match_the_reference(x_dtype, y_dtype, step, accumulate_in_x_dtype, rng):
    """The one-pass C++ kernels against the reference on half-precision buffers and gradients, long
    rows (several reduction blocks plus a tail), voxel strides, and grad_x in fp32 or in x's dtype
    (the fused block's gradient buffer under autocast)."""
    batch, channels, voxels = 2, 5, 2 * 1024 + 37
    x = channel_slice(rng, batch, channels, voxels * step, torch.float32).to(x_dtype)[..., ::step]
    params = bn_params(rng, channels, torch.float32)
    grad_y = torch.randn(batch, channels, voxels * step, generator=rng).to(y_dtype)[..., ::step]
    grad_x = torch.randn(batch, channels + 1, voxels * step, generator=rng)[:, 1:, ::step]
    if accumulate_in_x_dtype:
        grad_x = grad_x.to(x_dtype)
    a, b = torch.randn(2, channels, generator=rng)
    results = {}
    for backend in ("torch", "cpp"):
        gx = grad_x.clone()
        with densefuse.use_backend(backend):
            y = ops.bn_relu(x, *params, out_dtype=y_dtype)
            dweight, dbias = ops.bn_relu_backward_(grad_y, x, *params, gx)
            ops.bn_stats_correction_(gx, x, params[0], a, b)
        results[backend] = y, dweight, dbias, gx
    for actual, expected in zip(results["cpp"], results["torch"]):
        assert actual.dtype == expected.dtype
        scale = expected.abs().max().item()
        torch.testing.assert_close(actual.double(), expected.double(), rtol=1e-2, atol=2e-5 * scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(2, 37, 23, 300), (1, 70, 64, 33), (3, 5, 3, 17)], ids=str)
def test_bn_relu_conv1x1_and_backward(backend, dtype, shape, rng):
    batch, channels, channels_out, voxels = shape
    x = channel_slice(rng, batch, channels, voxels, dtype)
    params = bn_params(rng, channels, dtype)
    conv_weight = torch.randn(channels_out, channels, 1, 1, 1, generator=rng, dtype=dtype) / channels**0.5
    grad_out = torch.randn(batch, channels_out, voxels, generator=rng, dtype=dtype)
    grad_x = torch.randn(batch, channels, voxels, generator=rng, dtype=dtype)
    before = grad_x.clone()
    with densefuse.use_backend(backend):
        out = ops.bn_relu_conv1x1(x, *params, conv_weight)
        dweight, dbias, dconv = ops.bn_relu_conv1x1_backward_(grad_out, x, *params, conv_weight, grad_x)
    pre = plain_pre(x, *params)
    w = conv_weight.double().flatten(1)
    close(out, w @ pre.relu(), dtype)
    g = (w.T @ grad_out.double()) * (pre > 0)
    mean, invstd, weight, _ = (t.double() for t in params)
    close(grad_x, before + g * (weight * invstd)[:, None], dtype)
    close(dbias, g.sum(dim=(0, 2)), dtype)
    close(dweight, (g * (x.double() - mean[:, None]) * invstd[:, None]).sum(dim=(0, 2)), dtype)
    close(dconv, (grad_out.double() @ pre.relu().transpose(1, 2)).sum(0), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bn_relu_conv1x1_bf16_operands(backend, rng):
    """fp32 x, bf16 compute (autocast): operands rounded to bf16, fp32 accumulation, bf16 result."""
    batch, channels, channels_out, voxels = 2, 40, 16, 130
    x = channel_slice(rng, batch, channels, voxels, torch.float32)
    params = bn_params(rng, channels, torch.float32)
    conv_weight = torch.randn(channels_out, channels, generator=rng) / channels**0.5
    with densefuse.use_backend(backend):
        out = ops.bn_relu_conv1x1(x, *params, conv_weight, out_dtype=torch.bfloat16)
        y = ops.bn_relu(x, *params, out_dtype=torch.bfloat16)
    assert out.dtype == y.dtype == torch.bfloat16
    y_ref = plain_pre(x, *params).relu()
    # One rounding to bf16: relative error <= 2^-8 to nearest, < 2^-7 by truncation (the Triton
    # interpreter's fp32 -> bf16 conversion truncates); the GEMM rounds each operand, then the sum.
    torch.testing.assert_close(y.double(), y_ref, rtol=2**-7, atol=0)
    bound = (conv_weight.double().abs() @ y_ref.abs()) * 2**-6 + (conv_weight.double() @ y_ref).abs() * 2**-7
    assert ((out.double() - conv_weight.double() @ y_ref).abs() <= bound).all()


@pytest.mark.skipif("cpp" not in BACKENDS, reason="needs the compiled extension")
def test_cpp_bf16_gemms_match_the_reference(rng):
    """With bf16 operands the cpp backend runs its GEMMs in bf16 (fp32 accumulation inside, the result
    rounded to bf16): forward and backward within bf16 rounding of the reference, over three channel
    blocks (backward) and three voxel ranges (forward)."""
    batch, channels, channels_out, voxels = 2, 150, 24, 257
    x = channel_slice(rng, batch, channels, voxels, torch.float32)
    params = bn_params(rng, channels, torch.float32)
    conv_weight = torch.randn(channels_out, channels, generator=rng) / channels**0.5
    grad_out = torch.randn(batch, channels_out, voxels, generator=rng).bfloat16()
    results = {}
    for backend in ("torch", "cpp"):
        grad_x = torch.zeros(batch, channels, voxels)
        with densefuse.use_backend(backend):
            out = ops.bn_relu_conv1x1(x, *params, conv_weight, out_dtype=torch.bfloat16)
            grads = ops.bn_relu_conv1x1_backward_(grad_out, x, *params, conv_weight, grad_x)
        results[backend] = (out, *grads, grad_x)
    for name, actual, expected in zip(("out", "dweight", "dbias", "dconv", "grad_x"), *results.values()):
        assert actual.dtype == expected.dtype, name
        scale = expected.abs().max().item()
        torch.testing.assert_close(actual.float(), expected.float(), rtol=2**-6, atol=2**-7 * scale, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bn_relu_conv1x1_float64_input_fp32_operands(backend, rng):
    """fp64 x with fp32 GEMM operands: rounded to fp32, summed in fp64 (the torch backend's semantics)."""
    x = channel_slice(rng, 2, 21, 45, torch.float64)
    params = bn_params(rng, 21, torch.float64)
    conv_weight = torch.randn(5, 21, generator=rng, dtype=torch.float64)
    grad_out = torch.randn(2, 5, 45, generator=rng)
    results = {}
    for name in dict.fromkeys(["torch", backend]):
        grad_x = torch.zeros(2, 21, 45, dtype=torch.float64)
        with densefuse.use_backend(name):
            out = ops.bn_relu_conv1x1(x, *params, conv_weight, out_dtype=torch.float32)
            grads = ops.bn_relu_conv1x1_backward_(grad_out, x, *params, conv_weight, grad_x)
        results[name] = (out, grad_x, *grads)
    assert results[backend][0].dtype == torch.float32 and results[backend][2].dtype == torch.float64
    for actual, expected in zip(results[backend], results["torch"]):
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_stats_correction(backend, dtype, rng):
    batch, channels, voxels = 3, 9, 41
    x = channel_slice(rng, batch, channels, voxels, dtype)
    mean = x.double().mean(dim=(0, 2)).to(dtype)
    a, b = (torch.randn(channels, generator=rng, dtype=dtype) for _ in range(2))
    grad_x = torch.randn(batch, channels, voxels, generator=rng, dtype=dtype)
    expected = grad_x.double() - (
        a.double()[:, None] + (x.double() - mean.double()[:, None]) * b.double()[:, None]
    ) / (batch * voxels)
    with densefuse.use_backend(backend):
        ops.bn_stats_correction_(grad_x, x, mean, a, b)
    close(grad_x, expected, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_statistics_gradient_is_batch_norm(backend, rng):
    """Two layers normalise the same channels with the shared batch statistics (their own gamma/beta):
    accumulate both backwards, fold the stats terms once -> the sum of two batch-norm gradients."""
    batch, channels, voxels, eps = 2, 6, 50, 1e-5
    x = channel_slice(rng, batch, channels, voxels, torch.float64)
    layers = [bn_params(rng, channels, torch.float64)[2:] for _ in range(2)]  # (weight, bias) each
    grads_y = [torch.randn(batch, channels, voxels, generator=rng, dtype=torch.float64) for _ in layers]
    leaf = x.detach().clone().requires_grad_()
    loss = sum(
        (F.relu(F.batch_norm(leaf, None, None, w, b, training=True, eps=eps)) * gy).sum()
        for (w, b), gy in zip(layers, grads_y)
    )
    (expected,) = torch.autograd.grad(loss, leaf)
    with densefuse.use_backend(backend):
        mean, var = ops.channel_stats(x)
        invstd = torch.rsqrt(var + eps)
        grad_x = torch.zeros_like(x)
        a, b = torch.zeros(channels, dtype=torch.float64), torch.zeros(channels, dtype=torch.float64)
        for (weight, bias), grad_y in zip(layers, grads_y):
            dweight, dbias = ops.bn_relu_backward_(grad_y, x, mean, invstd, weight, bias, grad_x)
            a += weight * invstd * dbias
            b += weight * invstd**2 * dweight
        ops.bn_stats_correction_(grad_x, x, mean, a, b)
    close(grad_x, expected, torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_composition_is_batch_norm_relu(backend, rng):
    """channel_stats -> bn_relu(_conv1x1) with autograd == F.batch_norm(training) -> relu (-> conv)."""
    batch, channels, eps = 2, 5, 1e-5
    x = torch.randn(batch, channels, 3, 4, 5, generator=rng, dtype=torch.float64) * 2 + 1
    weight, bias = (
        torch.randn(channels, generator=rng, dtype=torch.float64),
        torch.randn(channels, dtype=torch.float64),
    )
    conv = torch.randn(4, channels, 1, 1, 1, generator=rng, dtype=torch.float64)
    grad = torch.randn(batch, 4, 3, 4, 5, generator=rng, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias, conv)]

    def fused(x, weight, bias, conv):
        mean, var = ops.channel_stats(x)
        return ops.bn_relu_conv1x1(x, mean, torch.rsqrt(var + eps), weight, bias, conv)

    def naive(x, weight, bias, conv):
        return F.conv3d(F.relu(F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)), conv)

    with densefuse.use_backend(backend):
        out = fused(*leaves)
        grads = torch.autograd.grad(out, leaves, grad)
    expected = naive(*leaves)
    expected_grads = torch.autograd.grad(expected, leaves, grad)
    close(out, expected, torch.float64)
    for actual, wanted in zip(grads, expected_grads):
        close(actual, wanted, torch.float64)


@pytest.mark.parametrize("backend", ["torch"])  # triton: checked against the formulas above (slow here)
def test_gradcheck_float64(backend, rng):
    x = torch.randn(2, 3, 2, 2, 3, generator=rng, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, generator=rng, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, generator=rng, dtype=torch.float64, requires_grad=True)
    conv = torch.randn(4, 3, generator=rng, dtype=torch.float64, requires_grad=True)

    def batch_norm_relu(x, weight, bias):
        mean, var = ops.channel_stats(x)
        return ops.bn_relu(x, mean, torch.rsqrt(var + 0.1), weight, bias)

    def batch_norm_relu_conv(x, weight, bias, conv):
        mean, var = ops.channel_stats(x)
        return ops.bn_relu_conv1x1(x, mean, torch.rsqrt(var + 0.1), weight, bias, conv)

    with densefuse.use_backend(backend):
        assert torch.autograd.gradcheck(batch_norm_relu, (x, weight, bias))
        assert torch.autograd.gradcheck(batch_norm_relu_conv, (x, weight, bias, conv), fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, rng):
    x = channel_slice(rng, 2, 5, 24, torch.float32)
    params = bn_params(rng, 5, torch.float32)
    conv = torch.randn(3, 5, generator=rng)
    grad_x = torch.zeros(2, 5, 24)
    with densefuse.use_backend(backend):
        torch.library.opcheck(ops.channel_stats_op, (x,))
        torch.library.opcheck(ops.bn_relu_op, (x, *params, torch.float32))
        torch.library.opcheck(ops.bn_relu_conv1x1_op, (x, *params, conv, torch.float32))
        torch.library.opcheck(ops.bn_relu_backward_op, (torch.randn(2, 5, 24), x, *params, grad_x))
        torch.library.opcheck(
            ops.bn_relu_conv1x1_backward_op, (torch.randn(2, 3, 24), x, *params, conv, grad_x)
        )
        torch.library.opcheck(ops.bn_stats_correction_op, (grad_x, x, params[0], params[2], params[3]))
        torch.library.opcheck(ops.dropout_op, (torch.randn(2, 5, 24), 5, 0.3))


DROPOUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DROPOUT_DTYPES, ids=str)
def test_dropout_is_the_reference_bit_for_bit(backend, dtype, rng):
    """The counter-based mask and the 1 / (1 - p) scale: the same bits on every backend and dtype."""
    x = (torch.randn(3, 5, 7, 11, generator=rng) * 3).to(dtype)
    x[0, 0, 0, :2] = float("nan")
    # The triton 3.6 interpreter truncates fp32 -> bf16 casts (a GPU rounds to nearest): 1 ulp there.
    rtol = 2**-7 if backend == "triton" and dtype == torch.bfloat16 else 0
    random_seed = int(torch.randint(-(2**62), 2**62, (), generator=rng))
    for seed, p in ((random_seed, 0.2), (2**63 - 1, 0.5), (-1, 0.93)):
        expected = x.clone()
        densefuse.reference.dropout(expected, seed, p)
        actual = x.clone()
        with densefuse.use_backend(backend):
            assert ops.dropout_(actual, seed, p) is actual
        assert torch.equal(actual == 0, expected == 0)  # the same mask
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_rate_scale_and_seeds(backend):
    """Kept with probability 1 - p (binomial, 5 sigma), scaled by exactly 1 / (1 - p); a seed gives its
    mask again, another seed another mask; p = 0 changes nothing (NaN kept), p = 1 drops everything."""
    ones = torch.ones(200_003)
    with densefuse.use_backend(backend):
        for p in (0.1, 0.5, 0.8):
            kept = ops.dropout_(ones.clone(), 7, p)
            assert set(kept.unique().tolist()) <= {0.0, torch.tensor(1 / (1 - p)).item()}
            rate = (kept > 0).double().mean().item()
            assert abs(rate - (1 - p)) < 5 * (p * (1 - p) / ones.numel()) ** 0.5, (p, rate)
        first, again, other = (ops.dropout_(ones.clone(), seed, 0.5) for seed in (3, 3, 4))
        assert torch.equal(first, again) and not torch.equal(first, other)
        assert (first[:-1].view(-1, 2) > 0).double().mean(0).sub(0.5).abs().max() < 0.01  # no parity pattern
        nan = torch.full((5,), float("nan"))
        assert ops.dropout_(nan.clone(), 3, 0.0).isnan().all()
        assert torch.equal(ops.dropout_(nan.clone(), 3, 1.0), torch.zeros(5))


def test_dropout_bad_input():
    with pytest.raises(ValueError, match=r"^x: expected a contiguous float tensor"):
        ops.dropout_(torch.ones(4, 6)[:, ::2], 0, 0.5)
    with pytest.raises(ValueError, match=r"^x: expected a contiguous float tensor"):
        ops.dropout_(torch.ones(4, dtype=torch.int32), 0, 0.5)
    with pytest.raises(ValueError, match=r"^p: expected a probability in \[0, 1\], got 1.5"):
        ops.dropout_(torch.ones(4), 0, 1.5)
    with pytest.raises(ValueError, match=r"^seed: expected an int64, got True"):
        ops.dropout_(torch.ones(4), True, 0.5)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DROPOUT_DTYPES, ids=str)
def test_cuda_dropout_is_the_reference_bit_for_bit(dtype, rng):
    x = torch.randn(2, 16, 33, 35, 37, generator=rng).to(dtype)
    expected = x.clone()
    densefuse.reference.dropout(expected, 123456789123, 0.1)
    for backend in ops.implemented_backends("cuda"):
        actual = x.cuda()
        with densefuse.use_backend(backend):
            ops.dropout_(actual, 123456789123, 0.1)
        torch.testing.assert_close(actual.cpu(), expected, rtol=0, atol=0, msg=backend)


def test_bad_input_is_rejected(rng):
    x = torch.randn(2, 4, 10)
    mean, invstd, weight, bias = bn_params(rng, 4, torch.float32)
    with pytest.raises(ValueError, match=r"^weight: expected a float tensor of shape \(4,\)"):
        ops.bn_relu(x, mean, invstd, weight[:3], bias)
    with pytest.raises(ValueError, match=r"^x: expected a non-empty tensor \[B, C, \*spatial\]"):
        ops.channel_stats(torch.randn(4, 10))
    with pytest.raises(TypeError, match=r"^x: expected a floating-point tensor"):
        ops.channel_stats(torch.ones(2, 4, 10, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"^conv_weight: expected \[C_out, 4\]"):
        ops.bn_relu_conv1x1(x, mean, invstd, weight, bias, torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"^grad_y: expected shape \(2, 4, 10\)"):
        ops.bn_relu_backward_(torch.randn(2, 4, 9), x, mean, invstd, weight, bias, torch.zeros(2, 4, 10))
    with pytest.raises(ValueError, match=r"^grad_x: updated in place"):
        grad_x = torch.zeros(2, 4, 3, 4)[..., :3]  # spatial dims not viewable as one
        ops.bn_stats_correction_(grad_x, torch.randn(2, 4, 3, 3), mean, weight, bias)
    with pytest.raises(TypeError, match=r"^out_dtype: expected one of"):
        ops.bn_relu(x, mean, invstd, weight, bias, out_dtype=torch.int32)
    with densefuse.use_backend("torch"), pytest.raises(ValueError, match=r"^mean: expected a tensor on"):
        ops.bn_relu(x, mean.to("meta"), invstd, weight, bias)


def test_triton_grid_limits_are_clear_errors():
    """CUDA grids hold at most 65535 programs along y and z: channels and batch beyond that are
    refused before any launch, naming the argument (checked on meta tensors)."""
    kernels = pytest.importorskip("densefuse.kernels.dense_block")
    one = torch.ones(1, device="meta").expand(4)
    with pytest.raises(ValueError, match=r"^x: batch size B is 70000; .* at most 65535"):
        kernels.channel_stats(torch.empty(70000, 4, 9, device="meta"))
    with pytest.raises(ValueError, match=r"^x: channels C is 65536; "):
        kernels.bn_relu(torch.empty(2, 65536, 9, device="meta"), *[one[:1].expand(65536)] * 4, torch.float32)
    weight = torch.empty(8, 4, device="meta")
    with pytest.raises(ValueError, match=r"^x: batch size B is 65536; "):
        kernels.bn_relu_conv1x1(torch.empty(65536, 4, 9, device="meta"), one, one, one, one, weight,
                                torch.float32)  # fmt: skip
    big_batch = torch.empty(65536, 4, 9, device="meta")
    with pytest.raises(ValueError, match=r"^x: batch size B is 65536; "):
        grad_out = torch.empty(65536, 8, 9, device="meta")
        kernels.bn_relu_conv1x1_backward(grad_out, big_batch, one, one, one, one, weight, big_batch)
    wide = torch.empty(2, 16, 9, device="meta")
    with pytest.raises(ValueError, match=r"^conv_weight: output channels / 64 is 65537; "):
        kernels.bn_relu_conv1x1(wide, *[one[:1].expand(16)] * 4, torch.empty(64 * 65537, 16, device="meta"),
                                torch.float32)  # fmt: skip


def test_backend_without_kernel_is_a_clear_error():
    with pytest.raises(RuntimeError, match="op channel_stats has no 'cuda' kernel; use_backend"):
        ops._REGISTRIES["channel_stats"].impl("cuda")


CUDA_KERNEL_BACKENDS = (
    [b for b in ops.implemented_backends("cuda") if b != "torch"] if torch.cuda.is_available() else []
)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", CUDA_KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_backends_match_torch(backend, dtype, rng, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the Triton GEMMs follow this flag
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # the reference's torch.bmm
    batch, channels, channels_out, voxels = 2, 150, 64, 33 * 35 * 37
    x = channel_slice(rng, batch, channels, voxels, torch.float32).cuda()
    params = [t.cuda() for t in bn_params(rng, channels, torch.float32)]
    conv = (torch.randn(channels_out, channels, generator=rng) / channels**0.5).cuda()
    grad_out = torch.randn(batch, channels_out, voxels, generator=rng).to(dtype).cuda()
    results = {}
    for name in ("torch", backend):
        grad_x = torch.zeros(batch, channels, voxels, device="cuda")
        with densefuse.use_backend(name):
            stats = ops.channel_stats(x)
            out = ops.bn_relu_conv1x1(x, *params, conv, out_dtype=dtype)
            grads = ops.bn_relu_conv1x1_backward_(grad_out, x, *params, conv, grad_x)
        results[name] = (*stats, out.float(), grad_x, *grads)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=2e-4, atol=2e-4)
    for actual, expected in zip(results[backend][:3], results["torch"][:3]):  # continuous in x
        torch.testing.assert_close(actual, expected, **tol)
    # The gradients pass the ReLU mask: the two backends may round the pre-activation of a value
    # within an ulp of 0 to either side (an O(1) difference there), so they are compared in L2.
    for actual, expected in zip(results[backend][3:], results["torch"][3:]):
        error = (actual - expected).double().norm() / expected.double().norm()
        assert error < (2e-2 if dtype == torch.bfloat16 else 1e-4), float(error)


def test_torch_compile_fullgraph(rng):
    """The ops trace without graph breaks (fake kernels, autograd formulas) and give eager's results."""

    def batch_norm_relu_conv(x, weight, bias, conv):
        mean, var = ops.channel_stats(x)
        return ops.bn_relu_conv1x1(x, mean, torch.rsqrt(var + 1e-5), weight, bias, conv).square().sum()

    shapes = [(2, 5, 3, 4, 5), (5,), (5,), (4, 5)]
    leaves = [torch.randn(shape, generator=rng).requires_grad_() for shape in shapes]
    expected = batch_norm_relu_conv(*leaves)
    compiled = torch.compile(batch_norm_relu_conv, fullgraph=True, backend="aot_eager")
    value = compiled(*leaves)
    torch.testing.assert_close(value, expected)
    for actual, wanted in zip(torch.autograd.grad(value, leaves), torch.autograd.grad(expected, leaves)):
        torch.testing.assert_close(actual, wanted)


# Compiles the Triton kernels for sm_90 without a GPU (tests/sm90.py; a fresh interpreter, without
# TRITON_INTERPRET). Prints JSON per kernel: int32 tensor products in the TTIR (index overflow), registers
# and stack bytes (spills).
SM90_REPORT = r"""
import inspect, json, sys
import torch, triton.language as tl
from densefuse.kernels import dense_block as K
from sm90 import compile_sm90 as compile_signature


def compile_sm90(kernel, pointer, constexprs, types=None):
    names = inspect.signature(kernel.fn).parameters
    signature = {n: "constexpr" if n in constexprs else pointer if n.endswith("_ptr") else "i32"
                 for n in names} | (types or {})
    return compile_signature(kernel, signature, constexprs)


report = {}
row = dict(ACC=tl.float32, BLOCK_V=K._BLOCK_V["cuda"])
for kernel in (K._stats_kernel, K._bn_relu_kernel, K._bn_relu_bwd_kernel, K._correction_kernel):
    report[kernel.fn.__name__] = compile_sm90(kernel, "*fp32", row)
report["_dropout_kernel"] = compile_sm90(K._dropout_kernel, "*bf16", dict(ACC=tl.float32, BLOCK=1024),
                                         dict(n="i64", key="i64", threshold="i64", scale_ptr="*fp32"))
for name in sys.argv[1:]:  # compute dtypes: the default configuration on CUDA
    dtype = getattr(torch, name)
    config = K._gemm_config("cuda", torch.float64 if dtype == torch.float64 else torch.float32, dtype)
    pointer = "*fp64" if dtype == torch.float64 else "*fp32"
    for kernel in (K._conv1x1_kernel, K._conv1x1_dw_kernel, K._conv1x1_dx_kernel):
        for index64 in (False, True):
            key = f"{kernel.fn.__name__} {name}" + (" INDEX64" if index64 else "")
            report[key] = compile_sm90(kernel, pointer, {**config, "INDEX64": index64})
print(json.dumps(report))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sm90.tools_available(), reason="needs triton with its NVIDIA backend tools")
def test_kernels_compile_for_sm90():
    """x may be any strided view (channels_last_3d: stride_v = C), so offs_v * stride_v can pass 2^31
    while every stride fits int32: the row kernels and the GEMMs with INDEX64 compute no index
    product of a tensor in int32. The GEMMs in their CUDA configuration (bf16, TF32, fp64) do not
    spill without INDEX64 (every realistic size); fp64 not even with it (its FMA tiles are small)."""
    report = sm90.run_report(SM90_REPORT, "bfloat16", "float32", "float64")
    assert {name: r for name, r in report.items() if "_conv1x1" not in name or "INDEX64" in name
            if r["int32_products"]} == {}  # fmt: skip
    assert {name: r for name, r in report.items()
            if ("INDEX64" not in name or "float64" in name) and r["stack"]} == {}  # fmt: skip


@pytest.mark.skipif("triton" not in cpu_backends(), reason="needs triton (interpreter)")
def test_gemm_index_width_follows_the_strides():
    """INDEX64 exactly when some index product may pass int32, e.g. a channels_last_3d block buffer
    (stride_v = C_total) with C_total * V >= 2^31; checked on meta tensors."""
    from densefuse.kernels import dense_block as kernels

    config = kernels._gemm_config("cuda", torch.float32, torch.bfloat16)
    weight = torch.empty(64, 48, device="meta")

    def features(channels_total, size):
        buffer = torch.empty(2, channels_total, size, size, size, device="meta")
        return buffer.to(memory_format=torch.channels_last_3d)[:, :48].view(2, 48, -1)

    assert not kernels._gemm_index64(config, 128**3, [features(256, 128)], weight)
    big = features(160, 256)  # 160 * 256^3 > 2^31
    assert big.stride(2) == 160 and kernels._gemm_index64(config, 256**3, [big], weight)
    assert not kernels._gemm_index64(config, 256**3, [big.contiguous()], weight)
    wide_rows = torch.empty(64, 2**26, device="meta")[:, :48]  # weight row stride 2^26
    assert kernels._gemm_index64(config, 100, [big[..., :100]], wide_rows)


@pytest.mark.skipif("triton" not in cpu_backends(), reason="needs triton (interpreter)")
def test_gemm_kernels_with_64_bit_indices(rng, monkeypatch):
    """The INDEX64 variant of the GEMM kernels (forced here on small inputs) gives the same results."""
    from densefuse.kernels import dense_block as kernels

    x = channel_slice(rng, 2, 20, 70, torch.float32)
    params = bn_params(rng, 20, torch.float32)
    conv_weight = torch.randn(9, 20, generator=rng)
    grad_out = torch.randn(2, 9, 70, generator=rng)
    results = []
    for index64 in (False, True):
        monkeypatch.setattr(kernels, "_gemm_index64", lambda *args, index64=index64: index64)
        grad_x = torch.zeros(2, 20, 70)
        with densefuse.use_backend("triton"):
            out = ops.bn_relu_conv1x1(x, *params, conv_weight)
            grads = ops.bn_relu_conv1x1_backward_(grad_out, x, *params, conv_weight, grad_x)
        results.append((out, grad_x, *grads))
    for actual, expected in zip(*results):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_implemented_backends():
    """torch always; cpp where the extension has the dense kernels (make test builds it)."""
    backends = ops.implemented_backends("cpu")
    assert "torch" in backends and "cuda" not in backends
    assert ("cpp" in backends) == ("cpp" in cpu_backends())  # the extension registers all three kernels


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_inputs_agree_with_the_reference(backend, rng):
    """bf16 x through autograd (grad_x in x's dtype), per-channel vectors that are not contiguous,
    and NaN pre-activations (no gradient through them) give the torch backend's results; a grad_x
    whose elements share memory is refused."""
    x = channel_slice(rng, 2, 3, 40, torch.float32).bfloat16()
    params = bn_params(rng, 3, torch.float32)
    params[1] = torch.rand(1, generator=rng).add(0.5).expand(3)  # stride 0
    params[2] = torch.randn(6, generator=rng)[::2]
    results = {}
    for name in dict.fromkeys(("torch", backend)):
        xx = x.detach().requires_grad_()
        with densefuse.use_backend(name):
            ops.bn_relu(xx, *params).float().square().sum().backward()
        results[name] = xx.grad
    assert results[backend].dtype == torch.bfloat16
    # rtol: 2 bf16 ulps (the Triton interpreter truncates to bf16 instead of rounding)
    torch.testing.assert_close(results[backend].float(), results["torch"].float(), rtol=2**-5, atol=1e-2)
    nan_x = torch.tensor([[[float("nan"), 1.0]]])
    one = [torch.zeros(1), torch.ones(1), torch.ones(1), torch.zeros(1)]
    grad_x = torch.zeros(1, 1, 2)
    with densefuse.use_backend(backend):
        _, dbias = ops.bn_relu_backward_(torch.ones(1, 1, 2), nan_x, *one, grad_x)
        assert dbias.item() == 1 and grad_x.tolist() == [[[0.0, 1.0]]]
        shared = torch.zeros(1, 1, 2).expand(1, 3, 2)
        with pytest.raises(ValueError, match="grad_x: updated in place, so its elements must not share"):
            ops.bn_relu_backward_(torch.ones(1, 3, 2), torch.randn(1, 3, 2), *[torch.ones(3)] * 4, shared)
