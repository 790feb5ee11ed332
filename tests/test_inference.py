"""Sliding-window inference: MONAI parity, the paper's predictor, slab mode, determinism, bad input.

MONAI parity: max |ours - MONAI| <= 1e-5 x max |MONAI| for modes "constant" and "gaussian" on random
volumes with a random convolution as predictor (odd sizes, roi not dividing the volume, roi larger
than the volume, 1 and many channels, batch > 1), on every backend that has the fusion ops.
"""

from __future__ import annotations

import copy
import os
import pickle
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import requires_cuda
from monai.inferers import sliding_window_inference as monai_swi

import densefuse
from densefuse import inference, windows
from densefuse.inference import SlidingWindowPredictor, read_window, sliding_window_inference
from densefuse.nn import FCDenseNet3d
from densefuse.ops import patch_fuse

# The Triton kernels run here only under the interpreter (slow: ~1.5 ms per jitted helper call); they
# are compared with the reference op by op in test_patch_fuse*.py, so end to end they get one MONAI
# parity case (test_matches_monai_triton) instead of the whole grid.
BACKENDS = [b for b in patch_fuse.implemented_backends("cpu") if b != "triton"]
requires_triton = pytest.mark.skipif(
    "triton" not in patch_fuse.implemented_backends("cpu"), reason="needs triton (TRITON_INTERPRET=1 on CPU)"
)


@pytest.fixture(params=BACKENDS)
def backend(request):
    with densefuse.use_backend(request.param):
        yield request.param


@pytest.fixture
def scatter_calls(monkeypatch):
    """(accumulator shape, number of windows) of every BatchScatter call the test makes."""
    calls = []
    scatter = patch_fuse.BatchScatter.__call__

    def spy(self, acc, windows, starts):
        calls.append((tuple(acc.shape), windows.shape[0]))
        return scatter(self, acc, windows, starts)

    monkeypatch.setattr(patch_fuse.BatchScatter, "__call__", spy)
    return calls


def random_conv(rng, c_in, c_out, dims=3, dtype=torch.float32):
    conv = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)[dims - 1](c_in, c_out, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=rng) * 0.3)
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=rng))
    return conv.to(dtype)


def assert_monai_close(ours, theirs, rel=1e-5):
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    scale = theirs.abs().max().item()
    assert (ours - theirs).abs().max().item() <= rel * scale


# (batch, c_in, c_out, size, roi, overlap, sw_batch_size)
CASES = [
    (2, 2, 3, (17, 23, 19), (8, 10, 7), 0.25, 3),
    (1, 1, 1, (5, 20, 12), (8, 8, 8), 0.5, 1),  # roi larger than the volume along z
    (2, 1, 4, (9, 6, 11), (12, 4, 20), 0.6, 7),  # ... along z and x
    (1, 3, 2, (10, 12, 9), (None, 5, 4), (0.0, 0.5, 0.75), 4),  # None: the whole axis
]


@pytest.mark.parametrize("mode", ["constant", "gaussian"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_monai(backend, case, mode, rng):
    batch, c_in, c_out, size, roi, overlap, sw = case
    x = torch.randn(batch, c_in, *size, generator=rng)
    net = random_conv(rng, c_in, c_out)
    kwargs = dict(overlap=overlap, mode=mode, sigma_scale=(0.125, 0.3, 0.2))
    with torch.no_grad():
        assert_monai_close(
            sliding_window_inference(x, roi, sw, net, **kwargs), monai_swi(x, roi, sw, net, **kwargs)
        )


@requires_triton
@pytest.mark.parametrize("mode", ["gaussian", "spline"])
def test_matches_monai_triton(mode, rng):
    """One end-to-end case on the Triton backend: MONAI's result (gaussian), the torch backend's (spline)."""
    x = torch.randn(2, 2, 9, 11, 7, generator=rng)
    net = random_conv(rng, 2, 3)
    with torch.no_grad(), densefuse.use_backend("triton"):
        ours = sliding_window_inference(x, (6, 8, 5), 3, net, overlap=0.5, mode=mode)
    with torch.no_grad():
        if mode == "gaussian":
            theirs = monai_swi(x, (6, 8, 5), 3, net, overlap=0.5, mode=mode)
        else:
            with densefuse.use_backend("torch"):
                theirs = sliding_window_inference(x, (6, 8, 5), 3, net, overlap=0.5, mode=mode)
    assert_monai_close(ours, theirs)


@pytest.mark.parametrize("padding_mode", ["constant", "reflect", "replicate", "circular"])
def test_padding_modes_match_monai(backend, padding_mode, rng):
    x = torch.randn(2, 1, 6, 9, 5, generator=rng)
    net = random_conv(rng, 1, 2)
    kwargs = dict(overlap=0.5, mode="gaussian", padding_mode=padding_mode)
    if padding_mode == "constant":  # MONAI passes cval to F.pad, which only the constant mode accepts
        kwargs["cval"] = 2.5
    with torch.no_grad():
        ours = sliding_window_inference(x, (10, 4, 8), 3, net, **kwargs)
        assert_monai_close(ours, monai_swi(x, (10, 4, 8), 3, net, **kwargs))


@pytest.mark.parametrize("dims", [1, 2])
def test_fewer_spatial_dims_match_monai(backend, dims, rng):
    size, roi = [(40,), (19, 23)][dims - 1], [(16,), (8, 30)][dims - 1]
    x = torch.randn(2, 2, *size, generator=rng)
    net = random_conv(rng, 2, 3, dims)
    with torch.no_grad():
        for mode in ("constant", "gaussian"):
            ours = sliding_window_inference(x, roi, 4, net, overlap=0.4, mode=mode)
            assert_monai_close(ours, monai_swi(x, roi, 4, net, overlap=0.4, mode=mode))


def test_float64_and_structured_outputs_match_monai(backend, rng):
    x = torch.randn(2, 1, 11, 7, 9, generator=rng, dtype=torch.float64)
    a, b = random_conv(rng, 1, 2, dtype=torch.float64), random_conv(rng, 1, 3, dtype=torch.float64)
    for predictor in (lambda t: (a(t), b(t)), lambda t: {"seg": a(t), "aux": b(t)}):
        with torch.no_grad():
            ours = sliding_window_inference(x, (6, 5, 4), 2, predictor, 0.5, "gaussian")
            theirs = monai_swi(x, (6, 5, 4), 2, predictor, 0.5, "gaussian")
        pairs = zip(ours.values(), theirs.values()) if isinstance(ours, dict) else zip(ours, theirs)
        if isinstance(ours, dict):
            assert list(ours) == list(theirs)
        for o, t in pairs:
            assert_monai_close(o, t, rel=1e-6)  # MONAI computes its gaussian weights in float32


def test_float64_inputs_are_fused_in_float64(backend, rng):
    """A float64 volume is accumulated in float64: in constant mode the result is MONAI's to the bit
    (a float32 accumulator is ~1e-7 off)."""
    x = torch.randn(1, 2, 11, 7, 9, generator=rng, dtype=torch.float64)

    def predictor(t):
        return 3 * t + 1e-9 * t**2

    ours = sliding_window_inference(x, (6, 5, 4), 2, predictor, 0.5, "constant")
    assert ours.dtype == torch.float64
    assert torch.equal(ours, monai_swi(x, (6, 5, 4), 2, predictor, 0.5, "constant"))


def test_window_coordinates_and_condition_match_monai(backend, rng):
    x = torch.randn(1, 1, 9, 5, 10, generator=rng)
    condition = torch.randn(1, 1, 9, 5, 10, generator=rng)

    def predictor(t, coords, condition):  # depends on where the window is and on the condition
        shift = torch.tensor([float(c[2].start + 10 * c[3].start + 100 * c[4].start) for c in coords])
        return t * condition + shift.view(-1, 1, 1, 1, 1)

    args = (x, (4, 8, 6), 3, predictor, 0.5, "gaussian")
    ours = sliding_window_inference(*args, with_coord=True, condition=condition)
    assert_monai_close(ours, monai_swi(*args, with_coord=True, condition=condition))


@pytest.mark.parametrize("mode", ["bspline", "spline", "gaussian", "constant"])
def test_identity_predictor_returns_the_input(backend, mode, rng):
    """A weighted average of identical values is that value, whatever the window."""
    x = torch.randn(2, 3, 13, 8, 11, generator=rng)
    for order in (0, 1, 2, 3):
        y = sliding_window_inference(x, (6, 8, 4), 5, lambda t: t, 0.5, mode, bspline_order=order)
        torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-6)


def test_a_predictor_returning_its_input_leaves_the_inputs_alone(backend, rng):
    """At sw_batch_size 1 MONAI hands the predictor a view of the inputs and weights its output in
    place, so an identity predictor overwrites the inputs there; densefuse's windows are copies."""
    x = torch.randn(1, 2, 13, 8, 11, generator=rng)
    before = x.clone()
    y = sliding_window_inference(x, (6, 5, 4), 1, lambda t: t, 0.5, "gaussian")
    assert torch.equal(x, before)
    torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-6)


def test_window_batches_a_predictor_keeps_are_never_overwritten(rng):
    """The batch of windows is reused for the next step only when nothing holds it any more."""
    x = torch.randn(1, 2, 11, 9, 10, generator=rng)
    kept, views = [], []

    def keeping(t):
        kept.append(t)  # the batch itself
        return t

    def keeping_a_view(t):
        views.append(t[:, :1])  # a view of the batch
        return t.clone()

    for predictor, store in [(keeping, kept), (keeping_a_view, views)]:
        y = sliding_window_inference(x, (6, 5, 4), 2, predictor, 0.5, "gaussian", padding_mode="reflect")
        torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-6)
        windows = [inference.read_window(x[0], p[1:], (6, 5, 4), "reflect") for p in _positions(x, (6, 5, 4))]
        stored = torch.cat(store)
        assert torch.equal(stored, torch.stack(windows)[:, : stored.shape[1]])


@pytest.mark.parametrize("padding_mode", ["constant", "reflect", "replicate", "circular"])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int16], ids=str
)
def test_predictor_sees_the_padded_windows_exactly(backend, padding_mode, dtype, rng):
    """Windows (read by patch_extract for float volumes) are read_window's, bit for bit: a strided
    volume, roi larger than the volume along y, windows over every edge."""
    x = (torch.randn(2, 5, 3, 9, 11, generator=rng) * 50).to(dtype).transpose(1, 2)  # [2, 3, 5, 9, 11]
    seen = []

    def recording(t):
        seen.append(t.clone())
        return t.float()

    sliding_window_inference(x, (4, 12, 5), 3, recording, 0.3, padding_mode=padding_mode, cval=-2.5)
    roi = (4, 12, 5)
    grid = inference.window_grid(x.shape[2:], roi, (0.3,) * 3, (0, 0, 0))
    positions = [(b, z, y, w) for b in range(2) for z in grid[0] for y in grid[1] for w in grid[2]]
    expected = torch.stack([inference.read_window(x[b], p, roi, padding_mode, -2.5) for b, *p in positions])
    assert torch.equal(torch.cat(seen), expected)


@pytest.mark.parametrize("count", ["missing", "failing"])
def test_window_batches_are_not_reused_without_torchs_storage_use_count(monkeypatch, count, rng):
    """torch._C._storage_Use_Count is private: where it is gone (or fails), every batch is new."""
    x = torch.randn(1, 2, 11, 9, 10, generator=rng)
    positions = _positions(x, (6, 5, 4))[:3]
    starts = torch.tensor(positions)
    reader = inference._WindowReader(x, (6, 5, 4), "constant", 0.0)
    first = reader.read(positions, starts).data_ptr()
    assert reader.read(positions, starts).data_ptr() == first  # reused while nothing holds it
    if count == "missing":
        monkeypatch.delattr(torch._C, "_storage_Use_Count", raising=False)
    else:
        monkeypatch.setattr(torch._C, "_storage_Use_Count", lambda: 1, raising=False)  # a new signature
    assert reader.read(positions, starts).data_ptr() != first
    expected = sliding_window_inference(x, (6, 5, 4), 2, lambda t: t * 2, 0.5, "gaussian")
    torch.testing.assert_close(expected, x * 2, rtol=1e-6, atol=1e-6)


def test_window_starts_are_built_once_per_call(monkeypatch, rng):
    """The window corners reach the extraction and the scatter as slices of one tensor per call on
    the right device (one host-to-device copy per call, not one per batch of windows)."""
    seen = {"extract": [], "scatter": []}

    def spy(kind, call, device_of):
        def recorded(self, *args):
            starts = args[-1]
            seen[kind].append((starts.device == device_of(self, *args), starts.untyped_storage().data_ptr()))
            return call(self, *args)

        return recorded

    monkeypatch.setattr(
        patch_fuse.BatchExtract, "__call__",
        spy("extract", patch_fuse.BatchExtract.__call__, lambda self, *args: self.volume.device),
    )  # fmt: skip
    monkeypatch.setattr(
        patch_fuse.BatchScatter, "__call__",
        spy("scatter", patch_fuse.BatchScatter.__call__, lambda self, acc, *args: acc.device),
    )  # fmt: skip
    x = torch.randn(2, 1, 13, 9, 10, generator=rng)
    sliding_window_inference(x, (6, 5, 4), 3, lambda t: t, 0.5)
    SlidingWindowPredictor(lambda t: t, (6, 5, 4), sw_batch_size=3)(x)
    for kind, calls in seen.items():
        assert len(calls) > 4 and all(same_device for same_device, _ in calls), kind
        assert len({storage for _, storage in calls}) == 2, (kind, calls)  # one per inference call


def test_no_tensor_is_formatted_per_call(monkeypatch, rng):
    """Error messages are built only when raised: formatting a tensor reads it (a sync on a GPU)."""

    def refuse(self, *args, **kwargs):
        raise AssertionError("a tensor was formatted during inference")

    x = torch.randn(1, 2, 9, 8, 7, generator=rng)
    monkeypatch.setattr(torch.Tensor, "__repr__", refuse)
    monkeypatch.setattr(torch.Tensor, "__format__", refuse)
    sliding_window_inference(x, 5, 2, lambda t: t, 0.5, "gaussian")
    SlidingWindowPredictor(lambda t: t, 5, sw_batch_size=2, output="mask", memory_budget=1)(x)


def test_results_record_nothing_for_autograd(backend, rng):
    """Like MONAI's result under no_grad: a predictor with parameters leaves no graph behind."""
    x = torch.randn(1, 1, 9, 8, 7, generator=rng, requires_grad=True)
    net = random_conv(rng, 1, 2)
    assert not sliding_window_inference(x, 5, 2, net, 0.5, "gaussian").requires_grad
    assert not sliding_window_inference(x, 5, 2, lambda t: t * 2, 0.5).requires_grad
    with torch.no_grad():  # SlidingWindowPredictor runs under inference_mode anyway
        expected = SlidingWindowPredictor(net, 5, output="probabilities")(x)
    assert not SlidingWindowPredictor(net, 5, output="probabilities")(x).requires_grad
    assert torch.equal(SlidingWindowPredictor(net, 5, output="probabilities")(x), expected)


def test_a_bool_order_is_rejected_after_a_cached_call(rng):
    x = torch.randn(1, 1, 9, 8, 7, generator=rng)
    sliding_window_inference(x, 5, 2, lambda t: t, 0.5, "bspline", bspline_order=1)
    with pytest.raises(ValueError, match="order"):
        sliding_window_inference(x, 5, 2, lambda t: t, 0.5, "bspline", bspline_order=True)


def test_predictor_weights_changed_in_place_are_used(rng):
    """The weights moved to the device are made again when self.weights change in place."""
    x = torch.randn(1, 1, 12, 6, 6, generator=rng)

    def window_means(t):  # each window predicts its own mean: the fusion then depends on the weights
        return t.mean(dim=(2, 3, 4), keepdim=True).expand_as(t).contiguous()

    vectors = [torch.linspace(0.2, 1.0, 6, dtype=torch.float64) for _ in range(3)]
    predictor = SlidingWindowPredictor(window_means, 6, window=vectors, activation="none", output="logits")
    before = predictor(x)
    with torch.no_grad():
        predictor.weights[0].copy_(predictor.weights[0].flip(0))
    changed = [w.clone() for w in predictor.weights]
    expected = SlidingWindowPredictor(window_means, 6, window=changed, activation="none", output="logits")(x)
    after = predictor(x)
    assert not torch.equal(before, expected)
    assert torch.equal(after, expected)


def test_named_window_weights_are_made_once(monkeypatch, rng):
    """A named mode's weights are computed once per setting; user vectors every call (never cached)."""
    inference._named_weights.cache_clear()  # earlier tests may have made these settings' weights
    calls = []
    separable = inference.windows.separable_window
    monkeypatch.setattr(
        inference.windows, "separable_window", lambda *a, **k: calls.append(a) or separable(*a, **k)
    )
    x = torch.randn(1, 1, 9, 8, 7, generator=rng)
    sigma = [0.11, 0.12, 0.13]  # a list: made hashable for the cache
    first = sliding_window_inference(x, 5, 2, lambda t: t * 3, 0.5, "gaussian", sigma_scale=sigma)
    again = sliding_window_inference(x, 5, 2, lambda t: t * 3, 0.5, "gaussian", sigma_scale=sigma)
    assert len(calls) == 1 and torch.equal(first, again)
    vectors = [torch.rand(5, generator=rng, dtype=torch.float64) + 0.1 for _ in range(3)]
    mine = sliding_window_inference(x, 5, 2, lambda t: t * 3, 0.5, vectors)
    vectors[0].fill_(1.0)  # a changed vector is read again
    changed = sliding_window_inference(x, 5, 2, lambda t: t * 3, 0.5, vectors)
    assert len(calls) == 3
    torch.testing.assert_close(mine, x * 3)
    torch.testing.assert_close(changed, x * 3)


def _positions(x, roi):
    grid = inference.window_grid(x.shape[2:], roi, (0.5,) * 3, (0, 0, 0))
    return [(0, z, y, w) for z in grid[0] for y in grid[1] for w in grid[2]]


def test_user_weight_vectors(backend, rng):
    x = torch.randn(1, 1, 12, 10, 9, generator=rng)
    net = random_conv(rng, 1, 2)
    vectors = [torch.rand(n, generator=rng) + 0.1 for n in (5, 4, 6)]
    with torch.no_grad():
        ours = sliding_window_inference(x, (5, 4, 6), 4, net, 0.5, mode=vectors)
        monai_map = vectors[0][:, None, None] * vectors[1][None, :, None] * vectors[2][None, None, :]
        floor = windows.monai_floor(vectors)
        theirs = monai_swi(x, (5, 4, 6), 4, net, 0.5, roi_weight_map=monai_map.clamp(min=floor))
    assert_monai_close(ours, theirs)


def test_deterministic_mode_gives_identical_bytes(backend, rng):
    x = torch.randn(2, 1, 15, 13, 14, generator=rng)
    net = random_conv(rng, 1, 3)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with torch.no_grad():
            runs = [sliding_window_inference(x, 8, 4, net, 0.5, "gaussian") for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(previous)
    assert runs[0].numpy().tobytes() == runs[1].numpy().tobytes()


def test_progress_bar(capsys):
    x = torch.rand(1, 1, 6, 6, 6)
    torch.testing.assert_close(sliding_window_inference(x, 4, 2, lambda t: t, progress=True), x)
    assert "100%" in capsys.readouterr().err
    SlidingWindowPredictor(lambda t: t, 4, progress=True)(x)
    assert "100%" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- bad input
def _net(t):
    return t


BAD_CALLS = [
    (dict(roi_size=(4, 0, 4)), ValueError, "roi_size: expected positive integers"),
    (dict(roi_size=-1), ValueError, "roi_size: expected positive integers"),
    (dict(roi_size=(4, 4)), ValueError, "roi_size: expected 3 values for 3 spatial dims"),
    (dict(overlap=1.0), ValueError, r"overlap: expected numbers in \[0, 1\)"),
    (dict(overlap=-0.1), ValueError, r"overlap: expected numbers in \[0, 1\)"),
    (dict(overlap=torch.tensor(1.0)), ValueError, r"overlap: expected numbers in \[0, 1\)"),
    (dict(overlap=torch.tensor(0.5 + 0j)), ValueError, r"overlap: expected numbers in \[0, 1\)"),
    (
        dict(mode="bspline", bspline_order=4),
        ValueError,
        r"bspline_order: expected a B-spline order in 0\.\.3",
    ),
    (
        dict(mode="gaussian", sigma_scale=torch.tensor(-0.1)),
        ValueError,
        "sigma_scale: expected a finite number > 0",
    ),
    (dict(sw_batch_size=0), ValueError, "sw_batch_size: expected an integer >= 1"),
    (dict(sw_batch_size=np.True_), ValueError, "sw_batch_size: expected an integer >= 1"),
    (dict(roi_size=torch.tensor([4])), ValueError, "roi_size: expected 3 values"),
    (dict(mode="hann"), ValueError, "mode: expected one of"),
    (dict(padding_mode="mirror"), ValueError, "padding_mode: expected one of"),
    (
        dict(mode=[torch.full((4,), 1e300, dtype=torch.float64)] * 3),
        ValueError,
        "mode: the 3-D weights overflow torch.float32",
    ),
    (dict(predictor=lambda t: t[:, :, :-1]), ValueError, r"predictor: returned shape \(2, 1, 3, 4, 4\)"),
    (
        dict(predictor=lambda t: t[:1]),
        ValueError,
        r"predictor: returned shape \(1, 1, 4, 4, 4\) for 2 windows",
    ),
    (
        dict(predictor=lambda t: t * float("nan")),
        ValueError,
        "predictor: contains 512 NaN/Inf values; DENSEFUSE_CHECK_VALUES=0 turns this check off",
    ),
    (dict(predictor=lambda t: t.long()), TypeError, "predictor: expected float tensors, got torch.int64"),
    (dict(predictor=lambda t: "mask"), TypeError, "predictor: expected float tensors, got str"),
    (dict(roi_weight_map=torch.ones(4, 4, 4)), ValueError, "roi_weight_map/process_fn: not supported"),
    (dict(inputs=torch.zeros(6, 6)), ValueError, r"inputs: expected a non-empty 3-D or 4-D or 5-D"),
    (dict(inputs="volume"), TypeError, "inputs: expected a torch.Tensor"),
    (dict(sw_device="meta"), ValueError, "sw_device: the meta device holds no values"),
    (
        dict(inputs=torch.ones(1, 1, 6, 6, 6, dtype=torch.complex64)),
        TypeError,
        "inputs: expected a real tensor",
    ),
    (
        dict(condition=torch.ones(1, 1, 6, 6, 5)),
        ValueError,
        r"condition: expected \[>= 1, C, 6, 6, 6\] like inputs",
    ),
    (
        dict(inputs=torch.ones(2, 1, 6, 6, 6), condition=torch.ones(1, 1, 6, 6, 6)),
        ValueError,
        r"condition: expected \[>= 2, C, 6, 6, 6\]",
    ),
    (dict(condition=[1, 2]), TypeError, "condition: expected a torch.Tensor"),
    (dict(buffer_steps="a"), ValueError, "buffer_steps: expected an integer or None"),
    (dict(buffer_steps=1, buffer_dim=5), ValueError, r"buffer_dim: expected a value in \[-3, 3\]"),
    (dict(predictor=lambda t: []), ValueError, "predictor: returned no outputs"),
    (dict(cval="a"), TypeError, "cval: expected a number, got str"),
    (dict(cval=1e39, roi_size=8), ValueError, "cval: 1e\\+39 overflows the dtype torch.float32 of inputs"),
    (
        dict(roi_size=8, cval=1e5, condition=torch.ones(1, 1, 6, 6, 6, dtype=torch.float16)),
        ValueError,
        "cval: 100000.0 overflows the dtype torch.float16 of condition",
    ),
    (
        dict(inputs=torch.ones(1, 1, 6, 6, 6, dtype=torch.uint8), cval=300, roi_size=8),
        ValueError,
        r"cval: expected a number in \[0, 255\] for inputs of dtype torch.uint8, got 300",
    ),
    (dict(roi_size=[4.0, 4, 4]), ValueError, "roi_size: expected positive integers"),
    (dict(overlap="0.5"), ValueError, r"overlap: expected numbers in \[0, 1\)"),
]


@pytest.mark.parametrize(("change", "error", "message"), BAD_CALLS)
def test_bad_input(change, error, message):
    args = dict(inputs=torch.ones(1, 1, 6, 6, 6), roi_size=4, sw_batch_size=2, predictor=_net)
    args.update(change)
    with pytest.raises(error, match=message):
        sliding_window_inference(**args)


@pytest.mark.parametrize("device", ["bogus", *([] if torch.cuda.is_available() else ["cuda"])])
@pytest.mark.parametrize("name", ["device", "sw_device"])
def test_a_device_that_cannot_be_used_is_named(name, device):
    with pytest.raises(ValueError, match=f"{name}: cannot allocate on device '{device}' here"):
        sliding_window_inference(torch.ones(1, 1, 6, 6, 6), 4, 2, _net, **{name: device})


@pytest.mark.parametrize("device", ["bogus", *([] if torch.cuda.is_available() else ["cuda"])])
@pytest.mark.parametrize("name", ["device", "model_device"])
def test_the_predictor_names_a_device_it_cannot_use(name, device):
    with pytest.raises(ValueError, match=f"{name}: cannot allocate on device '{device}' here"):
        SlidingWindowPredictor(_net, 4, **{name: device})


def test_cval_is_checked_only_where_the_padding_reads_it(rng):
    """MONAI passes cval to its padding, which runs only where roi exceeds the volume (and must be 0
    for the other padding modes); a cval that a half-precision volume cannot hold is no error where
    nothing reads it."""
    x = torch.randn(1, 1, 8, 8, generator=rng).half()
    expected = monai_swi(x, (4, 4), 2, lambda w: w * 2, cval=1e5)
    torch.testing.assert_close(sliding_window_inference(x, (4, 4), 2, lambda w: w * 2, cval=1e5), expected)
    reflect = sliding_window_inference(x, (10, 4), 2, lambda w: w * 2, cval=1e5, padding_mode="reflect")
    assert reflect.shape == x.shape and torch.isfinite(reflect).all()
    image = torch.randn(1, 1, 6, 8, 8, generator=rng).half()
    predictor = SlidingWindowPredictor(lambda w: w * 2, (10, 4, 4), cval=1e5, output="logits")
    assert torch.isfinite(predictor(image)).all()  # reflect padding
    with pytest.raises(ValueError, match=r"overflows the dtype torch\.float16 of image"):
        SlidingWindowPredictor(lambda w: w, (10, 4, 4), padding="constant", cval=1e5)(image)


def test_an_argmax_over_more_than_256_classes_fails_after_the_first_batch():
    calls = []

    def model(w):
        calls.append(len(w))
        return w.repeat(1, 300, 1, 1, 1)

    predict = SlidingWindowPredictor(model, 4, activation="softmax", output="mask", sw_batch_size=2)
    with pytest.raises(ValueError, match="model: gives 300 channels, but output='mask' with softmax"):
        predict(torch.randn(1, 1, 12, 12, 12))
    assert calls == [2]


def test_numpy_scalars_are_accepted_as_monai_accepts_them():
    x = torch.randn(1, 1, 9, 8, 7)
    expected = sliding_window_inference(x, (4, 4, 4), 2, _net, 0.5, "gaussian")
    roi, overlap = np.array([4, 4, 4]), np.float32(0.5)
    for roi_size in (
        roi,
        [np.int64(4)] * 3,
        torch.tensor([4, 4, 4]),
        np.int32(4),
        np.array(4),
        torch.tensor(4),
    ):
        for sw_batch_size in (np.int64(2), np.array(2), torch.tensor(2)):
            got = sliding_window_inference(x, roi_size, sw_batch_size, _net, overlap, "gaussian")
            assert torch.equal(got, expected)


def test_dict_keys_must_not_change():
    calls = iter(range(100))

    def predictor(t):
        return {"a": t, "b" if next(calls) == 0 else "z": t}

    with pytest.raises(ValueError, match=r"predictor: returned outputs \['a', 'z'\], earlier \['a', 'b'\]"):
        sliding_window_inference(torch.ones(1, 1, 8, 4, 4), 4, 1, predictor)


def test_the_predictor_runs_in_the_callers_grad_mode():
    """As in MONAI: a predictor may use autograd itself (a saliency map, test-time adaptation)."""

    def saliency(t):
        t = t.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad((t**2).sum(), t)
        return grad

    x = torch.randn(1, 1, 8, 4, 4)
    out = sliding_window_inference(x, 4, 1, saliency)
    torch.testing.assert_close(out, 2 * x)
    assert not out.requires_grad


def test_an_overlap_strides_in_monais_arithmetic(rng):
    """int(10 * (1 - 0.1)) in the overlap's arithmetic, as MONAI computes it: 9 for a NumPy float32
    0.1 (float32), 8 for the same value as a tensor, a NumPy array or a Python float (MONAI reads the
    first two through tolist(): float64). A convolution with zero padding makes the result depend
    on the grid."""
    x = torch.randn(1, 1, 23, 10, 10, generator=rng)
    net = random_conv(rng, 1, 2)
    value = np.float32(0.1)
    results = []
    with torch.no_grad():
        for overlap in (
            value,
            torch.tensor(value),
            np.array(value),
            torch.tensor([value] * 3),
            np.array([value] * 3),
            float(value),
        ):
            results.append(sliding_window_inference(x, (10, 10, 10), 2, net, overlap, "gaussian"))
            assert_monai_close(results[-1], monai_swi(x, (10, 10, 10), 2, net, overlap, "gaussian"))
    assert not torch.allclose(results[0], results[1])  # strides 9 and 8
    assert all(torch.equal(r, results[1]) for r in results[2:])


def test_numbers_given_as_tensors_and_arrays_are_read_as_monai_reads_them(rng):
    """0-d tensors and NumPy arrays (and NumPy scalars) for overlap, sigma_scale and cval; threshold
    and floor for the predictor (values that float32 holds exactly). The roi is wider than the
    volume along x (cval pads), and a convolution with zero padding makes the result depend on the
    grid and the weights. (MONAI's padding takes no array cval.)"""
    x = torch.randn(1, 1, 9, 8, 7, generator=rng)
    net = random_conv(rng, 1, 2)
    args = (x, (4, 4, 8), 2, net)
    kwargs = dict(mode="gaussian", padding_mode="constant")
    with torch.no_grad():
        expected = sliding_window_inference(*args, 0.25, sigma_scale=0.375, cval=1.5, **kwargs)
        for number in (torch.tensor, np.array, np.float64):
            numbers = dict(overlap=number(0.25), sigma_scale=number(0.375), cval=number(1.5))
            got = sliding_window_inference(*args, **numbers, **kwargs)
            assert torch.equal(got, expected), number
            assert_monai_close(got, monai_swi(*args, **{**numbers, "cval": 1.5}, **kwargs))
        assert not torch.allclose(
            sliding_window_inference(*args, 0.25, sigma_scale=0.375, **kwargs), expected
        )
    image = torch.rand(1, 1, 8, 8, 8, generator=rng)
    model = random_conv(rng, 1, 1)
    expected = SlidingWindowPredictor(model, 4, output="mask", threshold=0.625, floor=2**-7)(image)
    for number in (torch.tensor, np.float32):
        predictor = SlidingWindowPredictor(
            model, 4, output="mask", threshold=number(0.625), floor=number(2**-7)
        )
        assert torch.equal(predictor(image), expected), number


def test_nan_and_inf_are_blamed_on_their_source(rng):
    """The inputs, MONAI's condition, a NaN cval that constant padding reads, or the predictor; with
    value checks off they reach the result as in MONAI."""
    x = torch.randn(1, 2, 9, 8, 7, generator=rng)
    net = random_conv(rng, 2, 3)
    with torch.no_grad():
        with pytest.raises(
            ValueError, match=r"predictor: contains \d+ NaN/Inf values; DENSEFUSE_CHECK_VALUES=0"
        ):
            sliding_window_inference(x, 4, 2, lambda t: net(t).log())
        with pytest.raises(
            ValueError,
            match=r"cval: contains NaN/Inf values \(\d+ reached the fusion through the predictor\)",
        ):
            sliding_window_inference(x, (4, 4, 8), 2, net, cval=float("nan"))
        with pytest.raises(ValueError, match=r"predictor: contains \d+ NaN/Inf"):  # no window reads cval
            sliding_window_inference(x, 4, 2, lambda t: net(t).log(), cval=float("nan"))
        condition = torch.zeros_like(x)
        condition[0, 0, 1, 1, 1] = float("nan")
        with pytest.raises(ValueError, match=r"condition: contains NaN/Inf values \(\d+ reached"):
            sliding_window_inference(x, 4, 2, lambda t, condition: net(t + condition), condition=condition)
        x[0, 1, 4, 4, 4] = float("inf")
        with pytest.raises(
            ValueError,
            match=r"inputs: contains NaN/Inf values \(\d+ reached the fusion through the predictor\)",
        ):
            sliding_window_inference(x, 4, 2, net, overlap=0.5)
        with pytest.raises(
            ValueError, match=r"image: contains NaN/Inf values \(\d+ reached the fusion through the model\)"
        ):
            SlidingWindowPredictor(net, 4, padding="constant", activation="softmax")(x)
        with mock.patch.dict(os.environ, DENSEFUSE_CHECK_VALUES="0"):
            ours = sliding_window_inference(x, 4, 2, net, overlap=0.5, mode="gaussian")
        theirs = monai_swi(x, 4, 2, net, overlap=0.5, mode="gaussian")
    assert torch.equal(ours.isnan(), theirs.isnan()) and torch.equal(ours.isinf(), theirs.isinf())
    assert not ours.isfinite().all()
    finite = ours.isfinite()
    assert_monai_close(ours[finite], theirs[finite])


def test_a_condition_may_have_more_batch_entries_and_any_dtype():
    x = torch.randn(1, 1, 8, 4, 4)
    condition = torch.zeros(2, 1, 8, 4, 4, dtype=torch.uint8)
    seen = []

    def predictor(t, condition):
        seen.append(condition.dtype)
        return t

    out = sliding_window_inference(x, 4, 1, predictor, cval=-1024.0, condition=condition)
    assert torch.equal(out, x) and set(seen) == {torch.uint8}


def test_channel_count_must_not_change():
    calls = iter(range(100))
    with pytest.raises(ValueError, match="predictor: returned 2 channels, earlier 1"):
        sliding_window_inference(
            torch.ones(1, 1, 8, 4, 4), 4, 1, lambda t: t.repeat(1, 1 + next(calls) % 2, 1, 1, 1)
        )


@pytest.mark.parametrize("first", [1, 2])
def test_channel_count_must_not_change_between_tta_passes(first):
    """Also within the first batch, before the channels are known (one pass's were broadcast)."""
    calls = iter(range(100))

    def model(t):
        channels = first if next(calls) == 0 else 3 - first
        return torch.zeros(t.shape[0], channels, *t.shape[2:])

    kwargs = dict(tta="flips", padding="constant", activation="none", output="logits")
    predictor = SlidingWindowPredictor(model, 8, **kwargs)
    with pytest.raises(ValueError, match=f"model: returned {3 - first} channels, earlier {first}"):
        predictor(torch.randn(1, 1, 8, 8, 8))  # one window: no later batch to catch it


def test_a_model_that_changes_its_windows_in_place_changes_no_other_pass(rng):
    """The passes of one batch each get their own windows (the identity pass read the others' buffer)."""
    x = torch.randn(1, 1, 9, 9, 9, generator=rng)

    def model(t):
        t.mul_(2)
        return t.clone()

    for tta in ("none", "flips", ((0,), ())):
        fused = SlidingWindowPredictor(model, 8, tta=tta, activation="none", output="logits")(x)
        torch.testing.assert_close(fused, 2 * x)


def test_meta_tensors_hold_no_values_to_predict():
    image = torch.ones(1, 1, 9, 9, 9, device="meta")
    with pytest.raises(ValueError, match="image: a tensor on the meta device holds no values"):
        SlidingWindowPredictor(_net, 4)(image)
    with pytest.raises(ValueError, match="inputs: a tensor on the meta device holds no values"):
        sliding_window_inference(image, 4, 1, lambda t: t)


def test_an_int_cval_beyond_float64_is_refused_before_any_prediction():
    def model(t):
        raise AssertionError("predicted")

    image = torch.ones(1, 1, 5, 9, 9)
    with pytest.raises(ValueError, match=r"cval: 1000+ overflows float64"):
        SlidingWindowPredictor(model, 8, padding="constant", cval=10**400)
    with pytest.raises(ValueError, match=r"cval: 1000+ overflows float64"):
        sliding_window_inference(image, 8, 1, model, cval=10**400)


# ------------------------------------------------------------------------------------- the predictor
def test_read_window_pads_like_torch(rng):
    x = torch.randn(2, 5, 6, 4, generator=rng)
    start, roi = (-3, 2, -1), (9, 7, 6)
    for mode in ("constant", "reflect", "replicate", "circular"):
        value = dict(value=1.5) if mode == "constant" else {}
        padded = torch.nn.functional.pad(x[None], (1, 3, 0, 3, 3, 1), mode=mode, **value)[0]
        ours = read_window(x, start, roi, mode, 1.5)
        assert torch.equal(ours, padded[:, :9, 2:9, :6])
    assert read_window(x, (0, 1, 0), (5, 5, 4)).data_ptr() == x[:, :, 1:].data_ptr()  # inside: a view


@pytest.mark.parametrize("padding", ["reflect", "constant"])
@pytest.mark.parametrize("window", ["spline", "bspline", "gaussian", "constant"])
def test_predictor_with_identity_model_returns_the_input(backend, padding, window, rng):
    x = torch.randn(2, 2, 11, 9, 14, generator=rng)
    predict = SlidingWindowPredictor(lambda t: t, (6, 4, 8), window=window, padding=padding, output="logits")
    torch.testing.assert_close(predict(x), x, rtol=1e-6, atol=1e-6)


def windows_flip_axes():
    """The paper's 4-way TTA as tensor dims: identity and 180-degree rotations in the three planes."""
    return [(), (3, 4), (2, 4), (2, 3)]


def test_predictor_tta_averages_the_flipped_passes(backend, rng):
    x = torch.randn(1, 1, 10, 9, 12, generator=rng)
    net = random_conv(rng, 1, 2)
    kwargs = dict(roi_size=(6, 6, 8), output="logits", sw_batch_size=3)
    ours = SlidingWindowPredictor(net, tta="rotations", **kwargs)(x)
    passes = []
    for axes in windows_flip_axes():

        def flipped(t, axes=axes):
            return net(t.flip(axes)).flip(axes) if axes else net(t)

        passes.append(SlidingWindowPredictor(flipped, **kwargs)(x))
    torch.testing.assert_close(ours, torch.stack(passes).mean(0), rtol=1e-5, atol=1e-5)


def test_predictor_probabilities_and_masks(backend, rng):
    x = torch.randn(2, 1, 9, 10, 11, generator=rng)
    net = random_conv(rng, 1, 3)
    common = dict(roi_size=6, overlap=0.5)
    probs = SlidingWindowPredictor(
        lambda t: torch.sigmoid(net(t)), activation="none", output="logits", **common
    )(x)
    torch.testing.assert_close(SlidingWindowPredictor(net, **common)(x), probs)
    mask = SlidingWindowPredictor(net, output="mask", threshold=0.4, **common)(x)
    assert mask.dtype == torch.uint8 and torch.equal(mask, (probs >= 0.4).to(torch.uint8))
    logits = SlidingWindowPredictor(net, output="logits", **common)(x)
    late = SlidingWindowPredictor(net, soft_voting=False, **common)(x)
    torch.testing.assert_close(late, torch.sigmoid(logits))
    labels = SlidingWindowPredictor(net, activation="softmax", output="mask", **common)(x)
    soft = SlidingWindowPredictor(net, activation="softmax", **common)(x)
    assert labels.shape == (2, 1, 9, 10, 11) and torch.equal(
        labels, soft.argmax(1, keepdim=True).to(torch.uint8)
    )


@pytest.mark.parametrize(("padding", "activation"), [("reflect", "softmax"), ("constant", "sigmoid")])
def test_slab_mode_equals_whole_volume(backend, padding, activation, rng):
    x = torch.randn(2, 1, 21, 9, 10, generator=rng)
    net = random_conv(rng, 1, 3)
    kwargs = dict(roi_size=(6, 8, 8), overlap=0.5, padding=padding, activation=activation, output="mask")
    whole = SlidingWindowPredictor(net, sw_batch_size=4, **kwargs)(x)
    slab = 4 * 2 * 3 * 6 * 9 * 10  # one slab of whole rows
    slabs = SlidingWindowPredictor(net, sw_batch_size=4, memory_budget=slab, **kwargs)(x)
    assert whole.dtype == slabs.dtype == torch.uint8 and torch.equal(whole, slabs)


@pytest.mark.parametrize("output", ["probabilities", "logits"])
def test_float_outputs_ignore_the_budget(scatter_calls, output, rng):
    """A float output is as large as the whole accumulator, which whole-volume mode finalises in
    place: slabs would only add to that, so the budget leaves the mode alone."""
    x = torch.randn(1, 1, 21, 9, 10, generator=rng)
    net = random_conv(rng, 1, 3)
    kwargs = dict(roi_size=(6, 8, 8), output=output)
    whole = SlidingWindowPredictor(net, **kwargs)(x)
    assert torch.equal(SlidingWindowPredictor(net, memory_budget=1, **kwargs)(x), whole)
    assert {shape[2] for shape, _ in scatter_calls} == {21}


@pytest.mark.parametrize("overlap", [0.8, 0.6, 0.3, 0.0])
def test_slab_mode_equals_whole_volume_at_any_stride(backend, overlap, rng):
    """Strides of 1, 2, 4 and 7 of a 7-plane window over 23 planes: the in-place shift in six chunks,
    in one, and none (no shared planes)."""
    x = torch.randn(1, 2, 23, 9, 10, generator=rng)
    net = random_conv(rng, 2, 3)
    kwargs = dict(roi_size=(7, 6, 8), overlap=overlap, padding="constant", activation="softmax")
    kwargs["output"] = "mask"
    whole = SlidingWindowPredictor(net, sw_batch_size=3, **kwargs)(x)
    slab = 4 * 3 * 7 * 9 * 10  # one slab of whole rows (a smaller budget splits rows into bands)
    slabs = SlidingWindowPredictor(net, sw_batch_size=3, memory_budget=slab, **kwargs)(x)
    assert torch.equal(whole, slabs)


@pytest.mark.parametrize(("padding", "activation"), [("reflect", "sigmoid"), ("constant", "softmax")])
def test_slab_mode_with_deep_windows(backend, padding, activation, rng):
    """17-plane windows: the slab is finalised two planes at a time (capacity // 8), with a rest."""
    x = torch.randn(1, 1, 45, 5, 6, generator=rng)
    net = random_conv(rng, 1, 2)
    kwargs = dict(roi_size=(17, 4, 6), overlap=0.5, padding=padding, activation=activation, output="mask")
    whole = SlidingWindowPredictor(net, sw_batch_size=2, **kwargs)(x)
    slabs = SlidingWindowPredictor(net, sw_batch_size=2, memory_budget=4 * 2 * 17 * 5 * 6, **kwargs)(x)
    assert torch.equal(whole, slabs)


def test_slab_mode_keeps_only_a_slab(scatter_calls, rng):
    x = torch.randn(1, 1, 40, 6, 6, generator=rng)
    mask = SlidingWindowPredictor(lambda t: t, (8, 6, 6), sw_batch_size=9, output="mask", memory_budget=1)(x)
    assert torch.equal(mask, (torch.sigmoid(x) >= 0.5).to(torch.uint8))
    depths = [shape[2] for shape, _ in scatter_calls]
    assert max(depths) <= 8 and len(depths) == 11  # windows at z = -4, 0, 4, ..., 36


@pytest.mark.parametrize(
    ("budget", "expected"),
    [
        (4 * 2 * 3 * 20 * 30 * 10, (False, [(0, 30)])),  # the whole volume fits
        (4 * 2 * 3 * 20 * 30 * 10 - 1, (True, [(0, 30)])),  # a slab of whole rows fits
        (4 * 2 * 3 * 6 * 12 * 10, (True, [(0, 12), (12, 24), (24, 30)])),  # bands of 12 rows fit
        (1, (True, [(0, 7), (7, 14), (14, 21), (21, 28), (28, 30)])),  # never thinner than a window
    ],
)
def test_slab_plan(budget, expected):
    assert inference._slab_plan(2, 3, (20, 30, 10), (6, 7, 8), budget) == expected


@pytest.mark.parametrize(("padding", "activation"), [("reflect", "softmax"), ("constant", "sigmoid")])
def test_banded_slabs_equal_whole_volume_and_keep_only_a_band(
    backend, scatter_calls, padding, activation, rng
):
    """A slab too large for the budget is split into bands of rows: every window is predicted once per
    band it meets (here at most two), the accumulator never holds more than a band of a slab, and the
    result is whole-volume mode's: bit for bit with one window per batch (batches of several group
    other windows than in whole-volume mode, and torch's softmax rounds a window's values
    differently in batches of another size), within rounding otherwise."""
    x = torch.randn(2, 1, 13, 23, 9, generator=rng)
    net = random_conv(rng, 1, 3)
    kwargs = dict(roi_size=(5, 6, 4), overlap=0.5, padding=padding, activation=activation, output="mask")
    whole = SlidingWindowPredictor(net, sw_batch_size=1, **kwargs)(x)
    del scatter_calls[:]
    budget = 4 * 2 * 3 * 5 * 9 * 8  # 8 rows of a slab: bands of 8 rows
    banded = SlidingWindowPredictor(net, sw_batch_size=1, memory_budget=budget, **kwargs)(x)
    assert torch.equal(banded, whole)
    shapes = [shape for shape, _ in scatter_calls]
    predicted = sum(count for _, count in scatter_calls)
    in_batches = SlidingWindowPredictor(net, sw_batch_size=5, memory_budget=budget, **kwargs)(x)
    assert (in_batches != whole).float().mean() < 1e-3  # a rounding may tip a voxel at a tie
    assert max(shapes) == (2, 3, 5, 8, 9) and {shape[3] for shape in shapes} == {8, 7}  # 23 = 8 + 8 + 7
    margin = (2, 3, 2) if padding == "reflect" else (0, 0, 0)
    grid = inference.window_grid((13, 23, 9), (5, 6, 4), (0.5,) * 3, margin)
    bands = [(0, 8), (8, 16), (16, 23)]
    meets = sum(y < y1 and y + 6 > y0 for y in grid[1] for y0, y1 in bands)
    assert (
        predicted == 2 * len(grid[0]) * meets * len(grid[2]) > 2 * len(grid[0]) * len(grid[1]) * len(grid[2])
    )


@requires_cuda
@pytest.mark.gpu
def test_model_and_accumulation_devices(rng):
    x = torch.randn(1, 1, 12, 10, 9, generator=rng)
    net = random_conv(rng, 1, 2)
    expected = sliding_window_inference(x, 6, 2, net, 0.5, "gaussian")
    gpu_net = copy.deepcopy(net).cuda()
    ours = sliding_window_inference(x, 6, 2, gpu_net, 0.5, "gaussian", sw_device="cuda", device="cpu")
    assert ours.device.type == "cpu"
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    on_gpu = SlidingWindowPredictor(gpu_net, 6, model_device="cuda", device="cuda")(x)
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), SlidingWindowPredictor(net, 6)(x), rtol=1e-4, atol=1e-4)


@requires_cuda
@pytest.mark.gpu
def test_cached_layouts_and_weights_are_per_stream(rng):
    """On another CUDA stream the cached corners and weights are made again (a cached tensor belongs to
    the stream that made it), and the results are the same."""
    inference._on_placement.cache_clear()  # not full: a new entry must raise the size
    inference._named_weights.cache_clear()
    x = torch.randn(1, 1, 12, 10, 9, generator=rng).cuda()
    net = random_conv(rng, 1, 2).cuda()
    predictor = SlidingWindowPredictor(net, 6, output="mask", memory_budget=1)
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(True, warn_only=True)  # the gather: the same bits on both streams
    try:
        expected, mask = sliding_window_inference(x, 6, 2, net, 0.5, "gaussian"), predictor(x)
        before = inference._on_placement.cache_info().currsize, inference._named_weights.cache_info().currsize
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            ours, ours_mask = sliding_window_inference(x, 6, 2, net, 0.5, "gaussian"), predictor(x)
            assert predictor._moved[0][1] == side.stream_id
        torch.cuda.current_stream().wait_stream(side)
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
    after = inference._on_placement.cache_info().currsize, inference._named_weights.cache_info().currsize
    assert after[0] > before[0] and after[1] == before[1] + 1
    assert torch.equal(ours, expected) and torch.equal(ours_mask, mask)


def test_placement_names_the_device_and_stream():
    assert inference._placement(torch.device("cpu")) == (torch.device("cpu"), 0)
    if torch.cuda.is_available():
        device, stream = inference._placement(torch.device("cuda"))
        assert device.index == torch.cuda.current_device() and stream == torch.cuda.current_stream().stream_id


@requires_cuda
@pytest.mark.gpu
def test_condition_on_another_device_than_the_inputs(rng):
    """MONAI's condition keyword is windowed where it lives: a CPU condition beside CUDA inputs."""
    x, condition = torch.randn(2, 1, 1, 11, 9, 10, generator=rng).unbind(0)

    def predictor(t, condition):
        return t * 2 + condition.to(t.device)

    expected = sliding_window_inference(x, 6, 2, predictor, 0.5, "gaussian", condition=condition)
    ours = sliding_window_inference(x.cuda(), 6, 2, predictor, 0.5, "gaussian", condition=condition)
    torch.testing.assert_close(ours.cpu(), expected, rtol=1e-5, atol=1e-5)


def test_predictor_made_or_fed_in_inference_mode(rng):
    """A predictor made inside torch.inference_mode() (whose weights would have no version counter)
    and weights assigned there work in and out of it."""
    x = torch.randn(1, 1, 9, 8, 7, generator=rng)
    net = random_conv(rng, 1, 2)
    expected = SlidingWindowPredictor(net, 5)(x)
    with torch.inference_mode():
        predictor = SlidingWindowPredictor(net, 5)
        assert torch.equal(predictor(x), expected)
    assert torch.equal(predictor(x), expected)
    with torch.inference_mode():
        predictor.weights = [w.clone() for w in predictor.weights]  # inference tensors
        assert torch.equal(predictor(x), expected)
        predictor.weights[0][:2] *= 50  # a change no version counter records: still noticed
        changed = predictor(x)
        assert not torch.allclose(changed, expected)
    assert torch.equal(predictor(x), changed)


@pytest.mark.parametrize("batch, sw_batch_size", [(1, 4), (1, 1), (2, 4)])
def test_a_call_dispatches_four_ops_per_batch(batch, sw_batch_size, rng):
    """The host's work per batch of windows, counted (on a GPU each dispatched op costs host time):
    two slices of the corners, the extraction and the scatter; a dozen ops more per call."""
    if patch_fuse.default_backend("cpu") != "cpp":
        pytest.skip("counts the kernel backends' loop (the reference runs many ops per call)")
    x = torch.randn(batch, 1, 24, 28, 24, generator=rng)
    sliding_window_inference(x, 12, sw_batch_size, lambda t: t, 0.5, "gaussian")  # caches filled
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        sliding_window_inference(x, 12, sw_batch_size, lambda t: t, 0.5, "gaussian")
    top = [e.name for e in prof.events() if e.cpu_parent is None and "::" in e.name]
    batches = -(-batch * 36 // sw_batch_size)  # 3 x 4 x 3 windows per volume
    assert top.count("densefuse_ext::patch_extract") == top.count("densefuse_ext::patch_scatter") == batches
    assert len(top) <= 4 * batches + 16, sorted(set(top))


def test_window_layouts_made_once_serve_every_mode_and_call(rng):
    """The cached grid and corners: made under inference mode, used outside it (and in slab mode, whose
    shifted corners are copies) with the same results as freshly made ones."""
    x = torch.randn(1, 1, 11, 8, 9, generator=rng)
    net = random_conv(rng, 1, 2)
    predictor = SlidingWindowPredictor(net, 5, sw_batch_size=3, output="mask", memory_budget=1)
    for cache in (inference._on_placement, inference._typed_grid, inference._positions, inference._groups):
        cache.cache_clear()
    with torch.inference_mode():
        first = sliding_window_inference(x, 5, 2, net, 0.5, "gaussian")
    mask = predictor(x)
    made = inference._on_placement.cache_info()
    second = sliding_window_inference(x, 5, 2, net, 0.5, "gaussian")  # outside inference mode
    assert torch.equal(first, second) and torch.equal(predictor(x), mask)
    now = inference._on_placement.cache_info()
    assert now.currsize == made.currsize and now.hits >= made.hits + 2  # nothing made twice


CUDA_BACKENDS = [b for b in patch_fuse.implemented_backends("cuda") if b != "torch"]


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("cuda_backend", CUDA_BACKENDS)
def test_cuda_backends_match_the_reference_end_to_end(cuda_backend, rng):
    """sliding_window_inference against the torch backend, and in deterministic mode (the gather) slab
    mode against whole-volume mode, bit for bit."""
    x = torch.randn(2, 1, 21, 17, 19, generator=rng).cuda()
    net = random_conv(rng, 1, 3).cuda()
    with densefuse.use_backend("torch"):
        expected = sliding_window_inference(x, (8, 7, 9), 3, net, 0.5, "gaussian")
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    with densefuse.use_backend(cuda_backend):
        ours = sliding_window_inference(x, (8, 7, 9), 3, net, 0.5, "gaussian")
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
        kwargs = dict(roi_size=8, activation="softmax", output="mask", sw_batch_size=3)
        try:
            torch.use_deterministic_algorithms(True)
            whole = SlidingWindowPredictor(net, **kwargs)(x)
            slab = 4 * 2 * 3 * 8 * 17 * 19  # whole rows: the same batches as whole-volume mode
            slabs = SlidingWindowPredictor(net, memory_budget=slab, **kwargs)(x)
        finally:
            torch.use_deterministic_algorithms(before, warn_only=warn_only)
    assert whole.dtype == torch.uint8 and torch.equal(slabs, whole)


def test_predictor_constant_padding_matches_monai_gaussian(backend, rng):
    x = torch.randn(2, 1, 13, 7, 10, generator=rng)
    net = random_conv(rng, 1, 2)
    ours = SlidingWindowPredictor(
        net, (6, 8, 4), overlap=0.25, window="gaussian", padding="constant", output="logits", sw_batch_size=5
    )(x)
    with torch.no_grad():
        assert_monai_close(ours, monai_swi(x, (6, 8, 4), 5, net, 0.25, "gaussian"))


BAD_PREDICTOR = [
    (dict(roi_size=(8, 8)), ValueError, "roi_size: expected 3 values"),
    (dict(roi_size=0), ValueError, "roi_size: expected positive integers"),
    (dict(overlap=1), ValueError, r"overlap: expected numbers in \[0, 1\)"),
    (dict(window="hann"), ValueError, "window: expected one of"),
    (dict(window=[torch.ones(8)] * 2), ValueError, "window: expected 3 1-D weight vectors"),
    (dict(window=None), TypeError, r"window: expected a window name \(constant, gaussian, bspline, spline\)"),
    (
        dict(window="gaussian", sigma_scale="x"),
        ValueError,
        "sigma_scale: expected a finite number > 0, got 'x'",
    ),
    (dict(order=5, window="bspline"), ValueError, r"order: expected a B-spline order in 0\.\.3"),
    (dict(padding="circular"), ValueError, "padding: expected one of"),
    (dict(floor=-1.0), ValueError, "floor: expected a finite number >= 0"),
    (dict(tta="rotate"), ValueError, "tta: expected one of"),
    (dict(tta=[(0, 3)]), ValueError, "tta: expected one of"),
    (dict(tta=[0, 1]), ValueError, "tta: expected one of"),
    (dict(tta=[(1.0,)]), ValueError, "tta: expected one of"),
    (dict(tta=[(True,)]), ValueError, "tta: expected one of"),
    (dict(tta=[(np.True_,)]), ValueError, "tta: expected one of"),
    (dict(activation="relu"), ValueError, "activation: expected one of"),
    (dict(output="labels"), ValueError, "output: expected one of"),
    (dict(threshold=float("nan")), ValueError, "threshold: expected a finite number"),
    (dict(threshold=torch.tensor([0.5])), ValueError, "threshold: expected a finite number"),
    (dict(floor=np.float32(-1)), ValueError, "floor: expected a finite number >= 0"),
    (dict(memory_budget=0), ValueError, "memory_budget: expected an integer >= 1"),
    (dict(model="unet"), TypeError, "model: expected a callable"),
    (dict(cval="a"), TypeError, "cval: expected a number, got str"),
]


@pytest.mark.parametrize(("change", "error", "message"), BAD_PREDICTOR)
def test_bad_predictor_arguments(change, error, message):
    args = dict(model=_net, roi_size=8)
    args.update(change)
    with pytest.raises(error, match=message):
        SlidingWindowPredictor(**args)


def test_whole_volume_mode_batches_across_z_groups():
    """Without slabs the batches run on from one z group to the next: ceil(windows / sw_batch_size)
    model calls (32^3 padded by half a window, roi 16 at stride 8: 5 x 25 windows in batches of 8,
    16 calls, not 5 x ceil(25 / 8) = 20)."""
    sizes = []

    def model(t):
        sizes.append(t.shape[0])
        return t

    SlidingWindowPredictor(model, 16, sw_batch_size=8, activation="none")(torch.ones(1, 1, 32, 32, 32))
    assert sizes == [8] * 15 + [5]


def test_slab_mode_probes_the_channels_within_one_z_group():
    """Where slabs may come, the first batch (which tells the model's channels) stays within the first
    z group, as slab mode's batches do: no more than one group is predicted before the plan."""
    sizes = []

    def model(t):
        sizes.append(t.shape[0])
        return t

    x = torch.zeros(1, 1, 9, 11, 10)
    predictor = SlidingWindowPredictor(
        model, 4, sw_batch_size=1000, padding="constant", output="mask", memory_budget=1
    )
    predictor(x)
    grid = inference.window_grid(x.shape[2:], (4, 4, 4), (0.5,) * 3, (0, 0, 0))
    assert sizes[0] == len(grid[1]) * len(grid[2]) < len(grid[0]) * len(grid[1]) * len(grid[2])


def test_predictor_output_is_an_ordinary_tensor():
    """Not an inference tensor: it may be changed in place outside inference mode."""
    out = SlidingWindowPredictor(_net, 4, activation="none", output="probabilities")(
        torch.ones(1, 1, 8, 8, 8)
    )
    assert not out.is_inference()
    out.mul_(2)


def test_bad_read_window_arguments():
    x = torch.ones(1, 4, 4, 4)
    with pytest.raises(ValueError, match="mode: expected one of"):
        read_window(x, (-1, 0, 0), (4, 4, 4), "bogus")
    with pytest.raises(ValueError, match="start, roi: expected 3 values each"):
        read_window(x, (0, 0), (4, 4))
    with pytest.raises(ValueError, match=r"x: expected a \[C, \*spatial\] tensor"):
        read_window(torch.ones(4), (0,), (4,))


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("threshold", "x", "threshold: expected a finite number"),
        ("floor", -1, "floor: expected a finite number >= 0"),
        ("output", "labels", "output: expected one of"),
        ("sw_batch_size", 0, "sw_batch_size: expected an integer >= 1"),
        ("overlap", 1.5, r"overlap: expected numbers in \[0, 1\)"),
        ("tta", "x", "tta: expected one of"),
        ("padding", "zeros", "padding: expected one of"),
        ("memory_budget", -5, "memory_budget: expected an integer >= 1"),
        ("device", "bogus", "device: cannot allocate on device 'bogus'"),
        ("model_device", "meta", "model_device: the meta device holds no values"),
        ("roi", (0, 4, 4), r"roi: expected positive integers, got \(0, 4, 4\)"),
        ("roi", (4, 4), "roi: expected 3 values for 3 spatial dims"),
        ("weights", [torch.ones(4)] * 2, "weights: expected 3 1-D weight vectors"),
        ("weights", [torch.ones(4)] * 4, "weights: expected 3 1-D weight vectors"),
        (
            "weights",
            [torch.ones(4), torch.ones(2, 2), torch.ones(4)],
            r"weights\[1\]: expected a 1-D weight vector",
        ),
        ("weights", [torch.ones(4), torch.ones(4), -torch.ones(4)], r"weights\[2\]: expected finite weights"),
        ("weights", [torch.full((4,), float("nan"))] + [torch.ones(4)] * 2, r"weights\[0\]: expected finite"),
        (
            "weights",
            [torch.ones(4), torch.zeros(4), torch.ones(4)],
            r"weights\[1\]: expected finite .* not all",
        ),
        ("weights", [torch.ones(4), torch.ones(4, device="meta"), torch.ones(4)], r"weights\[1\]: .*meta"),
        ("cval", 10**400, "cval: 1000+ overflows float64"),
        ("floor", 1e39, r"floor: expected a finite number >= 0\.0 and <= 3\.4"),
    ],
)
def test_predictor_settings_changed_later_are_checked(name, value, message):
    """A setting assigned after construction gets the constructor's check (and is stored as checked)."""
    predict = SlidingWindowPredictor(_net, 4)
    with pytest.raises(ValueError, match=message):
        setattr(predict, name, value)
    if name not in ("roi", "weights"):  # constructor arguments roi_size and window
        with pytest.raises(ValueError, match=message):
            SlidingWindowPredictor(_net, 4, **{name: value})
    predict.overlap, predict.sw_batch_size, predict.tta = 0.25, np.int64(3), "flips"
    assert predict.overlap == (0.25, 0.25, 0.25) and predict.sw_batch_size == 3 and len(predict.tta) == 4


def test_predictor_model_roi_and_weights_changed_later(rng):
    """model, roi and weights assigned later are checked on assignment alone (so roi and weights may
    come in either order) and against each other at the call; the result is a fresh predictor's."""
    x = torch.randn(1, 1, 12, 13, 11, generator=rng)
    net = random_conv(rng, 1, 2)
    predict = SlidingWindowPredictor(net, 8, floor=1e-3, activation="none")
    predict(x)
    for bad, error in ((None, "model: expected a callable, got NoneType"), ("x", "weights: expected three")):
        with pytest.raises(TypeError, match=error):
            setattr(predict, "model" if bad is None else "weights", bad)
    with pytest.raises(TypeError):
        predict.weights[0] = torch.ones(8)  # a tuple: assigned whole, so a change is never missed
    predict.roi = (6, 6, 6)
    with pytest.raises(ValueError, match=r"weights\[0\]: expected a 1-D weight vector of length 6"):
        predict(x)  # the weights are still 8 long
    predict.weights = [np.ones(6), [1.0] * 6, windows.gaussian(6)]
    fresh = SlidingWindowPredictor(
        net, 6, floor=1e-3, activation="none", window=[np.ones(6), [1.0] * 6, windows.gaussian(6)]
    )
    assert torch.equal(predict(x), fresh(x))
    predict.weights, predict.roi = windows.separable_window("gaussian", (8, 8, 8)), (8, 8, 8)
    assert torch.equal(
        predict(x), SlidingWindowPredictor(net, 8, floor=1e-3, activation="none", window="gaussian")(x)
    )
    predict.model = FCDenseNet3d(
        1, 2, growth_rate=2, layers_per_block=1, num_down_blocks=4
    )  # size_multiple 16
    with pytest.raises(ValueError, match=r"roi: \(8, 8, 8\) must be a multiple of the model's size_multiple"):
        predict(x)
    for name, target in (("window", "weights"), ("roi_size", "roi"), ("sigma_scale", "weights")):
        with pytest.raises(
            AttributeError, match=f"^{name}: a constructor argument, not a setting; assign {target}"
        ):
            setattr(predict, name, "gaussian")
    with pytest.raises(TypeError, match=r"soft_voting: expected True or False, got 'False'"):
        predict.soft_voting = "False"
    predict.soft_voting, predict.progress = np.bool_(False), 0
    assert predict.soft_voting is False and predict.progress is False
    predict.soft_voting = torch.tensor(True)
    assert predict.soft_voting is True


def test_predictor_weights_from_arrays_are_copies(rng):
    """Weights given as arrays are copied when assigned: the array changed later changes nothing (a
    float64 array was aliased, its change unseen by the cache of moved weights)."""
    x = torch.randn(1, 1, 9, 8, 7, generator=rng)
    predict = SlidingWindowPredictor(random_conv(rng, 1, 1), 6, floor=1e-3, activation="none")
    array = np.ones((3, 6))
    predict.weights = array
    before = predict(x)
    array[0] = np.linspace(0.1, 1.0, 6)
    assert torch.equal(predict(x), before) and torch.equal(
        predict.weights[0], torch.ones(6, dtype=torch.float64)
    )


def test_predictor_pickled_with_a_list_of_weights(rng):
    """A predictor whose state holds a list of weights (pickled before weights were checked on
    assignment) gets them as a tuple when unpickled; subclasses may keep constructor names."""
    predict = SlidingWindowPredictor(_net, 4)
    state = predict.__getstate__()
    state["weights"] = list(state["weights"])
    restored = SlidingWindowPredictor.__new__(SlidingWindowPredictor)
    restored.__setstate__(state)
    assert isinstance(restored.weights, tuple)
    assert pickle.loads(pickle.dumps(restored)).weights[0].equal(predict.weights[0])

    class Named(SlidingWindowPredictor):
        def __init__(self, model, roi_size, window="spline"):
            self.window = window  # its own attribute: allowed in a subclass
            super().__init__(model, roi_size, window=window)

    assert Named(_net, 4, "gaussian").window == "gaussian"


def test_predictor_reuses_its_weights_until_they_change(rng):
    """The weights moved for one call serve the next (the default floor included) until the weights,
    roi, floor or padding change."""
    x = torch.randn(1, 1, 9, 8, 7, generator=rng)
    predict = SlidingWindowPredictor(random_conv(rng, 1, 1), 6)
    predict(x)
    moved = predict._moved
    predict(x)
    assert predict._moved is moved
    predict.floor = 1e-3
    predict(x)
    assert predict._moved is not moved


def test_bad_predictor_calls():
    with pytest.raises(ValueError, match=r"image: expected a non-empty 5-D"):
        SlidingWindowPredictor(_net, 4)(torch.zeros(1, 8, 8, 8))
    with pytest.raises(ValueError, match=r"model: returned shape \(1, 1, 4, 4, 2\)"):
        SlidingWindowPredictor(lambda t: t[..., ::2], 4)(torch.zeros(1, 1, 8, 8, 8))
    with pytest.raises(TypeError, match=r"model: expected float tensors, got torch\.int64"):
        SlidingWindowPredictor(lambda t: t.long(), 4)(torch.zeros(1, 1, 8, 8, 8))
    with pytest.raises(
        ValueError, match=r"cval: expected a number in \[0, 255\] for image of dtype torch\.uint8"
    ):
        SlidingWindowPredictor(_net, 10, padding="constant", cval=-1)(
            torch.zeros(1, 1, 8, 8, 8, dtype=torch.uint8)
        )
    x = torch.ones(1, 1, 4, 4, 4)
    x[0, 0, 1, 2, 3] = 0
    with pytest.raises(ValueError, match="model: contains 1 NaN/Inf values"):
        SlidingWindowPredictor(lambda t: t / t, 4, padding="constant")(x)  # 0 / 0 at one voxel


def test_predictor_refuses_voxels_whose_weights_sum_to_zero(rng):
    """Without a floor, voxels whose covering windows all weigh 0 there have no fused value: an error
    names window, where patch_finalize would read them as 0; a floor gives them one."""
    x = torch.rand(1, 1, 8, 8, 8, generator=rng)
    hollow = [torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=torch.float64)] * 3
    with pytest.raises(ValueError, match="window: the weights of the windows covering some voxels sum to 0"):
        SlidingWindowPredictor(lambda t: t, 4, overlap=0, window=hollow, activation="none")(x)
    tails = dict(window="gaussian", sigma_scale=0.02, activation="none")  # its tails underflow to 0
    with pytest.raises(ValueError, match="window: the weights"):
        SlidingWindowPredictor(lambda t: t, 24, **tails)(torch.rand(1, 1, 48, 48, 48, generator=rng))
    floored = SlidingWindowPredictor(lambda t: t * 0 + 3, 4, overlap=0, window=hollow, floor=1e-3)(x)
    torch.testing.assert_close(floored, torch.sigmoid(torch.full_like(x, 3.0)))


@pytest.mark.parametrize("tta", ["rotations", "flips"])
def test_predictor_tta_with_a_model_that_reuses_its_output(rng, tta):
    """A model that writes every output into one buffer (a static-output model) averages as one that
    makes new tensors: the first pass is not overwritten by the next."""
    x = torch.randn(1, 1, 9, 10, 11, generator=rng)
    net = random_conv(rng, 1, 2)
    buffer = {}

    def static(t):
        out = buffer.setdefault(t.shape, torch.empty(t.shape[0], 2, *t.shape[2:]))
        return out.copy_(net(t))

    kwargs = dict(roi_size=6, tta=tta, output="logits", sw_batch_size=2)
    torch.testing.assert_close(
        SlidingWindowPredictor(static, **kwargs)(x), SlidingWindowPredictor(net, **kwargs)(x)
    )


def test_predictor_floor_and_checks_follow_weights_changed_in_place(rng):
    """With constant padding the default floor (MONAI's) is that of the weights as they are when
    called, and weights changed in place are checked again."""
    x = torch.randn(1, 1, 9, 8, 7, generator=rng)
    net = random_conv(rng, 1, 1)
    vectors = [torch.linspace(0.2, 1.0, 6, dtype=torch.float64) for _ in range(3)]
    kwargs = dict(padding="constant", activation="none", output="logits")
    predictor = SlidingWindowPredictor(net, 6, window=vectors, **kwargs)
    predictor(x)
    with torch.no_grad():
        for w in predictor.weights:
            w.mul_(0.05)  # every product now lies below MONAI's 1e-3: the floor is the minimum, 1e-3
    fresh = SlidingWindowPredictor(net, 6, window=[w.clone() for w in predictor.weights], **kwargs)
    assert torch.equal(predictor(x), fresh(x))
    with torch.no_grad():
        predictor.weights[1][0] = -1.0
    with pytest.raises(ValueError, match=r"weights\[1\]: expected finite weights >= 0"):
        predictor(x)


def test_predictor_model_outputs_and_cval_checked_where_they_matter(rng):
    x = torch.randn(1, 1, 8, 8, 8, generator=rng)
    with pytest.raises(ValueError, match="activation: softmax over the model's single output channel"):
        SlidingWindowPredictor(lambda t: t, 4, activation="softmax", output="mask")(x)
    logits = SlidingWindowPredictor(lambda t: t, 4, activation="softmax", output="logits")(x)
    torch.testing.assert_close(logits, x)  # no activation is applied to logits
    with pytest.raises(ValueError, match=r"model: returned shape \(1, 0, 4, 4, 4\): no channels"):
        SlidingWindowPredictor(lambda t: t[:, :0], 4)(x)
    image = torch.randint(0, 255, (1, 1, 8, 8, 8), generator=rng, dtype=torch.uint8)
    reflected = SlidingWindowPredictor(lambda t: t.float(), 4, cval=-1, activation="none")(image)
    torch.testing.assert_close(reflected, image.float())  # reflect padding never reads cval


def test_predictor_floor_and_padding_set_after_a_call_are_used(rng):
    x = torch.randn(1, 1, 9, 8, 7, generator=rng)
    net = random_conv(rng, 1, 1)
    kwargs = dict(window="gaussian", padding="constant", activation="none", output="logits")
    predictor = SlidingWindowPredictor(net, 6, **kwargs)
    predictor(x)
    predictor.floor = 0.9
    assert torch.equal(predictor(x), SlidingWindowPredictor(net, 6, floor=0.9, **kwargs)(x))
    predictor.floor, predictor.padding = None, "reflect"
    assert torch.equal(predictor(x), SlidingWindowPredictor(net, 6, **{**kwargs, "padding": "reflect"})(x))


def test_predictor_refuses_weights_whose_product_overflows(rng):
    """Each vector is finite in float32, their 3-D product is not: every fused value would be NaN."""
    big = [torch.full((4,), 1e15, dtype=torch.float64)] * 3
    with pytest.raises(ValueError, match=r"window: the 3-D weights overflow torch\.float32"):
        SlidingWindowPredictor(lambda t: t, 4, window=big, activation="none")(torch.rand(1, 1, 8, 8, 8))


def test_roi_size_must_suit_a_model_with_a_size_multiple():
    """FCDenseNet3d takes multiples of its size_multiple: a roi_size that is not one is named as such,
    not as the model's input."""
    net = FCDenseNet3d(in_channels=1, growth_rate=2, num_down_blocks=2, layers_per_block=1, stem_channels=4)
    message = (
        r"roi_size: \(20, 20, 20\) must be a multiple of the model's size_multiple \(8\).*\(24, 24, 24\)"
    )
    with pytest.raises(ValueError, match=message):
        SlidingWindowPredictor(net, 20)
    with pytest.raises(ValueError, match="multiple of the predictor's size_multiple"):
        sliding_window_inference(torch.zeros(1, 1, 30, 30, 30), 20, 2, net)
    assert SlidingWindowPredictor(net, 16).roi == (16, 16, 16)
