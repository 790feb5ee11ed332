"""The fused loss-stats ops on every backend here against densefuse.reference.

Random inputs (seeded per test id), odd sizes, strided layouts, every dtype, label maps and
float targets, ignore_index; forward stats, flags and the backward's dL/dlogits; gradcheck in
float64; torch.library.opcheck; determinism; torch.compile.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import cpu_backends, cuda_backends, requires_cuda

import densefuse
from densefuse import reference
from densefuse.ops import _validate, focal_stats, overlap_stats
from densefuse.ops.loss_stats import (
    focal_stats_backward_op,
    focal_stats_op,
    overlap_stats_backward_op,
    overlap_stats_op,
)

COMPILED = [b for b in cpu_backends() if b != "torch"]
ACT = {"none": 0, "sigmoid": 1, "softmax": 2}
# (batch, classes, spatial): odd sizes that are no multiple of any block, a single voxel, a 2-D image.
SHAPES = [(3, 2, (17, 23, 29)), (2, 1, (5, 7, 9)), (1, 4, (1, 1, 1)), (2, 3, (6, 1, 13)), (2, 5, (11, 13))]
LAYOUTS = ["contiguous", "channels_last", "permuted", "sliced"]
TOL = {  # output-dtype tolerances; sums are fp32 for every input dtype but fp64
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3),
    torch.float16: dict(rtol=2e-3, atol=1e-4),
}


def make_logits(rng, batch, classes, spatial, dtype, layout, scale=3.0):
    """Logits [B, C, *spatial] in the requested memory layout (values identical across layouts)."""
    x = torch.randn(batch, classes, *spatial, generator=rng, dtype=torch.float64) * scale
    x = x.to(dtype)
    if layout == "channels_last" and len(spatial) == 3:
        return x.to(memory_format=torch.channels_last_3d)
    if layout == "permuted":  # stored as [C, B, *spatial] then viewed back: batch/channel strides swapped
        return x.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "sliced":  # every other element along the last axis of a bigger buffer
        big = torch.zeros(batch, classes, *spatial[:-1], 2 * spatial[-1], dtype=dtype)
        big[..., ::2] = x
        return big[..., ::2]
    return x


def make_target(rng, kind, batch, classes, spatial, ignore_index=None, dtype=torch.uint8):
    if kind == "dense":
        return torch.rand(batch, classes, *spatial, generator=rng, dtype=torch.float64).float()
    high = 2 if classes == 1 else classes
    labels = torch.randint(0, high, (batch, *spatial), generator=rng)
    if ignore_index is not None:
        labels[torch.rand(labels.shape, generator=rng) < 0.2] = ignore_index
    labels = labels.to(dtype)
    return labels.unsqueeze(1) if kind == "labels_channel" else labels


def normalized(logits, target, ignore_index=None):
    return _validate.flatten_spatial(logits, 2), _validate.normalize_target(target, logits, ignore_index)


def assert_close(actual, expected, dtype):
    torch.testing.assert_close(actual, expected.to(actual.dtype), **TOL[dtype], equal_nan=False)


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("activation", ["sigmoid", "softmax", "none"])
@pytest.mark.parametrize("kind", ["labels", "labels_channel", "dense"])
def test_overlap_stats_matches_reference(backend, shape, activation, kind, rng):
    batch, classes, spatial = shape
    if activation == "none":
        logits = torch.rand(batch, classes, *spatial, generator=rng)
    else:
        logits = make_logits(rng, batch, classes, spatial, torch.float32, "contiguous")
    target = make_target(rng, kind, batch, classes, spatial)
    x, t = normalized(logits, target)
    expected, expected_flags = reference.overlap_stats(x, t, ACT[activation], None)
    grad_stats = torch.randn(batch, classes, 3, generator=rng)
    expected_grad = reference.overlap_stats_backward(grad_stats, x, t, ACT[activation], None)
    with densefuse.use_backend(backend):
        stats, flags = overlap_stats_op(x, t, ACT[activation], None)
        grad = overlap_stats_backward_op(grad_stats, x, t, ACT[activation], None)
    assert stats.dtype == torch.float32 and stats.shape == (batch, classes, 3)
    assert_close(stats, expected, torch.float32)
    assert flags.tolist() == expected_flags.tolist() == [0, 0, 0]
    assert grad.shape == x.shape and grad.is_contiguous()
    assert_close(grad, expected_grad, torch.float32)


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "label_dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64], ids=str
)
def test_overlap_stats_dtypes_and_layouts(backend, dtype, layout, label_dtype, rng):
    batch, classes, spatial = 2, 3, (7, 9, 11)
    logits = make_logits(rng, batch, classes, spatial, dtype, layout)
    target = make_target(rng, "labels", batch, classes, spatial, ignore_index=-1 if label_dtype != torch.uint8
                         else 255, dtype=label_dtype)  # fmt: skip
    ignore = -1 if label_dtype != torch.uint8 else 255
    x, t = normalized(logits, target, ignore)
    expected, _ = reference.overlap_stats(x, t, 2, ignore)
    grad_stats = torch.randn(batch, classes, 3, generator=rng, dtype=reference.accumulate_dtype(dtype))
    expected_grad = reference.overlap_stats_backward(grad_stats, x, t, 2, ignore)
    with densefuse.use_backend(backend):
        stats, flags = overlap_stats_op(x, t, 2, ignore)
        grad = overlap_stats_backward_op(grad_stats, x, t, 2, ignore)
    assert stats.dtype == reference.accumulate_dtype(dtype)
    assert_close(stats, expected, torch.float32 if dtype != torch.float64 else dtype)
    assert flags.tolist() == [0, 0, 0]
    assert grad.dtype == dtype
    assert_close(grad, expected_grad, dtype)


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("ignore_index", [None, 0, 1, 255])
@pytest.mark.parametrize("classes", [1, 3])
def test_ignore_index_excludes_voxels(backend, ignore_index, classes, rng):
    spatial = (9, 10, 11)
    logits = make_logits(rng, 2, classes, spatial, torch.float32, "contiguous")
    target = make_target(rng, "labels", 2, classes, spatial, ignore_index=ignore_index)
    x, t = normalized(logits, target, ignore_index)
    activation = 1 if classes == 1 else 2
    expected, _ = reference.overlap_stats(x, t, activation, ignore_index)
    with densefuse.use_backend(backend):
        stats, flags = overlap_stats_op(x, t, activation, ignore_index)
    assert_close(stats, expected, torch.float32)
    assert flags.tolist() == [0, 0, 0]
    if ignore_index is not None:  # the ignored voxels really are left out
        keep = (t != ignore_index).float()
        s_p = (reference.probabilities(x, activation) * keep.unsqueeze(1)).sum(-1)
        assert_close(stats[..., 1], s_p, torch.float32)


@pytest.mark.parametrize("backend", ["torch", *COMPILED])
@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("kind", ["labels", "dense"])
@pytest.mark.parametrize("alpha", [False, True])
def test_focal_stats_matches_reference(backend, activation, gamma, kind, alpha, rng):
    batch, classes, spatial = 3, 3, (5, 11, 13)
    logits = make_logits(rng, batch, classes, spatial, torch.float32, "channels_last", scale=4.0)
    ignore = 1 if kind == "labels" else None
    target = make_target(rng, kind, batch, classes, spatial, ignore_index=ignore)
    alpha_pos = torch.rand(classes, generator=rng) if alpha else None
    alpha_neg = torch.rand(classes, generator=rng) if alpha else None
    x, t = normalized(logits, target, ignore)
    args = (ACT[activation], gamma, alpha_pos, alpha_neg, ignore)
    expected, expected_flags = reference.focal_stats(x, t, *args)
    grad_stats = torch.randn(batch, classes, 2, generator=rng)
    expected_grad = reference.focal_stats_backward(grad_stats, x, t, *args)
    with densefuse.use_backend(backend):
        stats, flags = focal_stats_op(x, t, *args)
        grad = focal_stats_backward_op(grad_stats, x, t, *args)
    assert stats.shape == (batch, classes, 2)
    assert_close(stats, expected, torch.float32)
    assert flags.tolist() == expected_flags.tolist() == [0, 0, 0]
    assert_close(grad, expected_grad, torch.float32)


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_focal_stats_dtypes(backend, dtype, activation, rng):
    batch, classes, spatial = 2, 4, (6, 7, 9)
    logits = make_logits(rng, batch, classes, spatial, dtype, "permuted")
    target = make_target(rng, "labels", batch, classes, spatial, dtype=torch.int32)
    x, t = normalized(logits, target)
    args = (ACT[activation], 2.0, None, None, None)
    expected, _ = reference.focal_stats(x, t, *args)
    grad_stats = torch.randn(batch, classes, 2, generator=rng, dtype=reference.accumulate_dtype(dtype))
    expected_grad = reference.focal_stats_backward(grad_stats, x, t, *args)
    with densefuse.use_backend(backend):
        stats, _ = focal_stats_op(x, t, *args)
        grad = focal_stats_backward_op(grad_stats, x, t, *args)
    assert_close(stats, expected, torch.float32 if dtype != torch.float64 else dtype)
    assert grad.dtype == dtype
    assert_close(grad, expected_grad, dtype)


@pytest.mark.parametrize("backend", ["torch", *COMPILED])
@pytest.mark.parametrize("op", ["overlap", "focal"])
def test_flags_count_bad_values(backend, op, rng):
    batch, classes, spatial = 2, 3, (4, 5, 6)
    logits = make_logits(rng, batch, classes, spatial, torch.float32, "contiguous")
    logits[0, 1, 0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    labels = make_target(rng, "labels", batch, classes, spatial, dtype=torch.int16)
    labels[1, 0, 0, :4] = torch.tensor([3, -1, 7, 99], dtype=torch.int16)
    labels[1, 1, 1, :2] = 99  # == ignore_index: not counted
    x, t = normalized(logits, labels, 99)
    with densefuse.use_backend(backend):
        if op == "overlap":
            _, flags = overlap_stats_op(x, t, 2, 99)
        else:
            _, flags = focal_stats_op(x, t, 2, 2.0, None, None, 99)
    assert flags.tolist() == [3, 3, 0]
    dense = make_target(rng, "dense", batch, classes, spatial)
    dense[0, 0, 0, 0, 0] = float("nan")
    x, t = normalized(logits, dense)
    with densefuse.use_backend(backend):
        _, flags = (
            overlap_stats_op(x, t, 1, None)
            if op == "overlap"
            else focal_stats_op(x, t, 1, 2.0, None, None, None)
        )
    assert flags.tolist() == [0, 3, 1]


@pytest.mark.parametrize("backend", [b for b in ["torch", "cpp"] if b in cpu_backends()])
@pytest.mark.parametrize("activation", ["none", "sigmoid", "softmax"])
@pytest.mark.parametrize("kind", ["labels", "dense"])
def test_gradcheck_float64(backend, activation, kind, rng):
    logits = torch.randn(2, 3, 3, 4, 5, generator=rng, dtype=torch.float64)
    if activation == "none":
        logits = logits.sigmoid()
    logits.requires_grad_(True)
    ignore = 2 if kind == "labels" else None
    target = make_target(rng, kind, 2, 3, (3, 4, 5), ignore_index=ignore)
    target = target.double() if kind == "dense" else target
    weights = torch.randn(2, 3, 3, generator=rng, dtype=torch.float64)
    with densefuse.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda z: (overlap_stats(z, target, activation, ignore) * weights).sum(), (logits,)
        )
        if activation != "none":
            alpha = torch.rand(3, generator=rng, dtype=torch.float64)
            assert torch.autograd.gradcheck(
                lambda z: (
                    focal_stats(z, target, activation, 1.5, alpha, 1 - alpha, ignore)[..., 0]
                    * weights[..., 0]
                ).sum(),
                (logits,),
            )


@pytest.mark.parametrize("backend", cpu_backends())
def test_double_backward_is_a_clear_error(backend, rng):
    """First-order gradients only: a first-order backward with create_graph=True works (a gradient
    penalty on other terms, say); a second derivative through the loss raises and names the op."""
    logits = torch.randn(1, 2, 3, 3, 3, generator=rng, dtype=torch.float64, requires_grad=True)
    other = torch.randn(3, generator=rng, dtype=torch.float64, requires_grad=True)
    target = make_target(rng, "labels", 1, 2, (3, 3, 3))
    losses = {
        "overlap_stats": lambda z: overlap_stats(z, target, "softmax").sum(),
        "focal_stats": lambda z: focal_stats(z, target, "softmax", 2.0, None, None).sum(),
    }
    with densefuse.use_backend(backend):
        for name, loss in losses.items():
            (plain,) = torch.autograd.grad(loss(logits), logits)
            total = loss(logits) + other.pow(3).sum()
            grad, grad_other = torch.autograd.grad(total, (logits, other), create_graph=True)
            torch.testing.assert_close(grad, plain)
            (second,) = torch.autograd.grad(grad_other.sum(), other)  # second order in the other term
            torch.testing.assert_close(second, 6 * other.detach())
            with pytest.raises(RuntimeError, match=f"densefuse: {name} .*has first-order gradients only"):
                grad.sum().backward()


@pytest.mark.parametrize("backend", ["torch", *COMPILED])
def test_opcheck(backend, rng):
    logits = torch.randn(2, 3, 40, generator=rng)
    labels = torch.randint(0, 3, (2, 40), generator=rng, dtype=torch.int32)
    alpha = torch.rand(3, generator=rng)
    with densefuse.use_backend(backend):
        torch.library.opcheck(overlap_stats_op, (logits, labels, 2, None))
        torch.library.opcheck(overlap_stats_op, (logits.double(), labels, 1, 0))
        torch.library.opcheck(focal_stats_op, (logits, labels, 1, 2.0, alpha, 1 - alpha, None))
        torch.library.opcheck(focal_stats_op, (logits, labels, 2, 0.5, alpha, None, 1))


@pytest.mark.parametrize("backend", COMPILED)
def test_forward_is_deterministic(backend, rng):
    logits = make_logits(rng, 2, 3, (13, 17, 19), torch.float32, "contiguous")
    target = make_target(rng, "labels", 2, 3, (13, 17, 19))
    x, t = normalized(logits, target)
    with densefuse.use_backend(backend):
        first = overlap_stats_op(x, t, 2, None)[0]
        second = overlap_stats_op(x, t, 2, None)[0]
        focal_first = focal_stats_op(x, t, 2, 2.0, None, None, None)[0]
        focal_second = focal_stats_op(x, t, 2, 2.0, None, None, None)[0]
    assert torch.equal(first, second) and torch.equal(focal_first, focal_second)


@pytest.mark.skipif("cpp" not in cpu_backends(), reason="needs the C++ extension")
@pytest.mark.parametrize(
    ("classes", "activation", "dtype"), [(1, "sigmoid", torch.float32), (3, "softmax", torch.float64)]
)
def test_cpp_losses_are_the_same_on_any_thread_count(classes, activation, dtype, rng):
    """Stats, flags and dL/dlogits for 1, 2 and 3 threads, bit for bit: the fused single-class kernel
    and the blocked one, over enough chunks of voxels to split among the threads."""
    logits = make_logits(rng, 2, classes, (40, 48, 56), dtype, "contiguous")
    target = make_target(rng, "labels", 2, classes, (40, 48, 56))
    weights = torch.randn(2, classes, 3, generator=rng, dtype=dtype)
    results, previous = [], torch.get_num_threads()
    for count in (1, 2, 3):
        torch.set_num_threads(count)
        try:
            x = logits.clone().requires_grad_(True)
            with densefuse.use_backend("cpp"):
                stats = overlap_stats(x, target, activation, None)
                focal = focal_stats(x, target, activation, 2.0, None, None, None)
                ((stats * weights).sum() + focal.sum()).backward()
        finally:
            torch.set_num_threads(previous)
        results.append((stats.detach(), focal.detach(), x.grad))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend, rng):
    from densefuse.nn import FocalLoss, TverskyLoss

    tversky, focal = TverskyLoss(sigmoid=True, alpha=0.3, beta=0.7), FocalLoss(alpha=0.25)

    def loss_fn(logits, labels):
        return tversky(logits, labels) + focal(logits, labels)

    logits = torch.randn(2, 1, 6, 7, 8, generator=rng, requires_grad=True)
    labels = make_target(rng, "labels_channel", 2, 1, (6, 7, 8))
    expected = loss_fn(logits, labels)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    compiled = torch.compile(loss_fn, fullgraph=True, backend=compile_backend)
    value = compiled(logits, labels)
    (grad,) = torch.autograd.grad(value, logits)
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(grad, expected_grad)


def test_torch_compile_monai_float_labels(rng):
    """MONAI's convention (float labels [B, 1, ...], to_onehot_y) compiles without graph breaks."""
    from densefuse.nn import DiceLoss, TverskyLoss

    tversky = TverskyLoss(to_onehot_y=True, softmax=True)
    dice = DiceLoss(softmax=True)  # C == 1 below: MONAI's single-channel warning path

    def loss_fn(logits, labels, single):
        return tversky(logits, labels) + dice(single, (labels > 0).float())

    logits = torch.randn(2, 3, 5, 6, 7, generator=rng)
    labels = make_target(rng, "labels_channel", 2, 3, (5, 6, 7)).float()
    single = torch.randn(2, 1, 5, 6, 7, generator=rng)
    with pytest.warns(UserWarning, match="single channel"):
        expected = loss_fn(logits, labels, single)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(logits, labels, single), expected)


@pytest.mark.usefixtures("fresh_dynamo")
def test_torch_compile_focal_dynamic_and_softmax_alpha(rng):
    """FocalLoss compiles in one graph with dynamic shapes (gamma traced as a symbolic float) and with
    softmax, include_background=False and a scalar alpha (whose eager warning is not issued while
    tracing); values and gradients as in eager mode."""
    from densefuse.nn import FocalLoss

    labels = make_target(rng, "labels_channel", 2, 3, (5, 6, 7))
    for loss, dynamic in (
        (FocalLoss(to_onehot_y=True, alpha=0.25, gamma=1.5), True),
        (FocalLoss(to_onehot_y=True, use_softmax=True, include_background=False, alpha=0.4), False),
    ):
        logits = torch.randn(2, 3, 5, 6, 7, generator=rng, requires_grad=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the second loss's alpha warning, eager only
            expected = loss(logits, labels)
        (expected_grad,) = torch.autograd.grad(expected, logits)
        compiled = torch.compile(loss, fullgraph=True, dynamic=dynamic, backend="aot_eager")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing is warned inside the graph
            value = compiled(logits, labels)
        (grad,) = torch.autograd.grad(value, logits)
        torch.testing.assert_close(value, expected)
        torch.testing.assert_close(grad, expected_grad)


def test_target_requiring_grad_is_rejected():
    logits, target = torch.randn(1, 2, 4), torch.rand(1, 2, 4, requires_grad=True)
    with pytest.raises(ValueError, match=r"^target: gradients"):
        overlap_stats(logits, target)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", cuda_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_backends_match_reference(backend, dtype, activation, layout, rng):
    batch, classes, spatial = 2, 3 if activation == "softmax" else 1, (37, 41, 43)
    logits = make_logits(rng, batch, classes, spatial, dtype, layout).cuda()
    target = make_target(rng, "labels", batch, classes, spatial, ignore_index=255).cuda()
    x, t = normalized(logits, target, 255)
    code = ACT[activation]
    grad_stats = torch.randn(batch, classes, 3, generator=rng).cuda()
    expected, _ = reference.overlap_stats(x, t, code, 255)
    expected_grad = reference.overlap_stats_backward(grad_stats, x, t, code, 255)
    focal_args = (code, 2.0, None, None, 255)
    expected_focal, _ = reference.focal_stats(x, t, *focal_args)
    expected_focal_grad = reference.focal_stats_backward(grad_stats[..., :2], x, t, *focal_args)
    with densefuse.use_backend(backend):
        stats, flags = overlap_stats_op(x, t, code, 255)
        grad = overlap_stats_backward_op(grad_stats, x, t, code, 255)
        focal, _ = focal_stats_op(x, t, *focal_args)
        focal_grad = focal_stats_backward_op(grad_stats[..., :2].contiguous(), x, t, *focal_args)
    assert flags.tolist() == [0, 0, 0]
    assert_close(stats, expected, torch.float32)
    assert_close(grad, expected_grad, dtype)
    assert_close(focal, expected_focal, torch.float32)
    assert_close(focal_grad, expected_focal_grad, dtype)
