"""The patch-fusion ops (densefuse.ops.patch_fuse) on every backend that has them, against naive loops.

Windows hang over every edge of odd-sized volumes (negative starts included), batch > 1, several
channels, every window dtype, float32/float64 accumulators, with and without a weight floor;
scatter vs the deterministic gather; the normaliser and the finaliser's outputs; window extraction
(every padding mode, strided volumes, windows larger than the volume); bad input; opcheck.
"""

from __future__ import annotations

import contextlib
import itertools

import numpy as np
import pytest
import torch

import densefuse
from densefuse import reference, windows
from densefuse.ops import patch_finalize, patch_scatter
from densefuse.ops import patch_fuse as pf
from densefuse.ops.patch_fuse import patch_extract

BACKENDS = pf.implemented_backends("cpu")
WINDOW_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(params=BACKENDS)
def backend(request):
    with densefuse.use_backend(request.param):
        yield request.param


def random_case(rng, batch=2, channels=3, size=(5, 7, 6), roi=(3, 4, 5), count=9, dtype=torch.float64):
    """Windows [N, C, *roi], starts [N, 4] anywhere a window still overlaps the volume, 1-D weights."""
    win = torch.randn(count, channels, *roi, generator=rng, dtype=torch.float64).to(dtype)
    starts = torch.stack(
        [torch.randint(0, batch, (count,), generator=rng)]
        + [torch.randint(1 - r, s, (count,), generator=rng) for r, s in zip(roi, size)],
        dim=1,
    )
    weights = [torch.rand(r, generator=rng, dtype=torch.float64) + 0.05 for r in roi]
    return win, starts, weights


def naive_scatter(shape, win, starts, weights, floor):
    """Voxel by voxel, in float64: acc[b, :, z+i, y+j, x+k] += max(wz wy wx, floor) * win[n, :, i, j, k]."""
    acc = torch.zeros(shape, dtype=torch.float64)
    wz, wy, wx = weights
    for n, (b, z, y, x) in enumerate(starts.tolist()):
        for i, j, k in itertools.product(*(range(r) for r in win.shape[2:])):
            if 0 <= z + i < shape[2] and 0 <= y + j < shape[3] and 0 <= x + k < shape[4]:
                w = max(float(wz[i] * wy[j] * wx[k]), floor)
                acc[b, :, z + i, y + j, x + k] += w * win[n, :, i, j, k].double()
    return acc


def naive_normalizer(size, grid, weights, floor):
    """Voxel by voxel: the summed weight of the grid windows that cover it."""
    norm = torch.zeros(size, dtype=torch.float64)
    roi = [w.numel() for w in weights]
    for v in itertools.product(*(range(s) for s in size)):
        for corner in itertools.product(*grid):
            offset = [p - c for p, c in zip(v, corner)]
            if all(0 <= o < r for o, r in zip(offset, roi)):
                norm[v] += max(
                    float(weights[0][offset[0]] * weights[1][offset[1]] * weights[2][offset[2]]), floor
                )
    return norm


# ------------------------------------------------------------------------------------------ scatter
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("floor", [0.0, 0.3])
@pytest.mark.parametrize("dtype", WINDOW_DTYPES, ids=str)
def test_scatter_matches_naive_loop(backend, deterministic, floor, dtype, rng):
    win, starts, weights = random_case(rng, dtype=dtype)
    acc = torch.randn(2, 3, 5, 7, 6, generator=rng, dtype=torch.float64)
    expected = acc + naive_scatter(acc.shape, win, starts, weights, floor)
    flags = patch_scatter(acc, win, starts, *weights, floor, deterministic=deterministic)
    assert flags.tolist() == [0, 0]
    torch.testing.assert_close(acc, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(1, 1, (9, 1, 13), (4, 1, 6)), (3, 2, (17, 23, 29), (8, 10, 7))], ids=str)
def test_scatter_float32_accumulator(backend, shape, rng):
    batch, channels, size, roi = shape
    win, starts, weights = random_case(rng, batch, channels, size, roi, count=20, dtype=torch.float32)
    acc = torch.zeros(batch, channels, *size)
    expected = naive_scatter(acc.shape, win, starts, weights, 0.0)
    patch_scatter(acc, win, starts, *weights)
    torch.testing.assert_close(acc, expected.float(), rtol=1e-5, atol=1e-5)


def test_gather_is_reproducible_and_equals_scatter(backend, rng):
    win, starts, weights = random_case(rng, size=(11, 9, 10), count=30, dtype=torch.float32)
    runs = []
    for _ in range(2):
        acc = torch.zeros(2, 3, 11, 9, 10)
        patch_scatter(acc, win, starts, *weights, 0.1, deterministic=True)
        runs.append(acc)
    assert torch.equal(runs[0], runs[1])
    scattered = torch.zeros(2, 3, 11, 9, 10)
    patch_scatter(scattered, win, starts, *weights, 0.1, deterministic=False)
    torch.testing.assert_close(runs[0], scattered, rtol=1e-6, atol=1e-6)


def test_deterministic_mode_picks_the_gather(monkeypatch, rng):
    calls = []
    monkeypatch.setattr(pf, "patch_gather_op", lambda *a: calls.append("gather") or pf.patch_scatter_op(*a))
    win, starts, weights = random_case(rng)
    acc = torch.zeros(2, 3, 5, 7, 6)
    patch_scatter(acc, win, starts, *weights)
    assert calls == []
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        patch_scatter(acc, win, starts, *weights)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert calls == ["gather"]


def test_values_outside_the_volume_are_never_read(backend):
    win = torch.full((1, 1, 4, 4, 4), float("nan"))
    win[:, :, 2:, 2:, 2:] = 1.0  # only this corner lands in the volume
    acc = torch.zeros(1, 1, 3, 3, 3)
    ones = torch.ones(4)
    assert patch_scatter(acc, win, torch.tensor([[0, -2, -2, -2]]), ones, ones, ones).tolist() == [0, 0]
    expected = torch.zeros(1, 1, 3, 3, 3)
    expected[:, :, :2, :2, :2] = 1
    assert torch.equal(acc, expected)


# ----------------------------------------------------------------------------------------- finalise
GRIDS = [  # (size, roi, per-axis starts): regular, MONAI-like, reflect-padded, and a grid with holes
    ((7, 6, 5), (3, 4, 5), ([0, 2, 4], [0, 2], [0])),
    ((6, 5, 7), (4, 4, 4), ([-2, 0, 2, 4], [-2, 1, 3], [-1, 3])),
    ((9, 4, 4), (2, 3, 3), ([0, 5], [0], [1])),  # voxels no window covers
]


@pytest.mark.parametrize("floor", [0.0, 0.4])
@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_normalizer_matches_naive_loop(grid, floor, rng):
    size, roi, starts = grid
    weights = [torch.rand(r, generator=rng, dtype=torch.float64) + 0.05 for r in roi]
    ours = reference.fusion_normalizer(size, *(torch.tensor(s) for s in starts), *weights, floor)
    torch.testing.assert_close(ours, naive_normalizer(size, starts, weights, floor), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("floor", [0.0, 0.4])
@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_finalize_divides_by_the_summed_weights(backend, grid, floor, rng):
    size, roi, starts = grid
    weights = [torch.rand(r, generator=rng, dtype=torch.float64) + 0.05 for r in roi]
    corners = [(b, *c) for b in range(2) for c in itertools.product(*starts)]
    win = torch.randn(len(corners), 3, *roi, generator=rng, dtype=torch.float64)
    acc = torch.zeros(2, 3, *size, dtype=torch.float64)
    patch_scatter(acc, win, torch.tensor(corners), *weights, floor)
    norm = naive_normalizer(size, starts, weights, floor)
    covered = norm > 0
    expected = torch.where(covered, acc / torch.where(covered, norm, 1), 0)
    fused = patch_finalize(acc, *starts, *weights, floor)
    torch.testing.assert_close(fused, expected, rtol=1e-12, atol=1e-12)
    for activation, act in [("sigmoid", torch.sigmoid), ("softmax", lambda v: torch.softmax(v, 1))]:
        probs = patch_finalize(acc, *starts, *weights, floor, activation=activation)
        torch.testing.assert_close(probs, torch.where(covered, act(expected), 0), rtol=1e-12, atol=1e-12)
    mask = patch_finalize(acc, *starts, *weights, floor, activation="sigmoid", output="mask", threshold=0.3)
    assert mask.dtype == torch.uint8 and mask.shape == acc.shape
    assert torch.equal(mask, ((torch.sigmoid(expected) >= 0.3) & covered).to(torch.uint8))
    labels = patch_finalize(acc, *starts, *weights, floor, activation="softmax", output="mask")
    assert labels.shape == (2, 1, *size)
    assert torch.equal(labels, (expected.argmax(1, keepdim=True) * covered).to(torch.uint8))
    inplace = acc.clone()
    assert patch_finalize(inplace, *starts, *weights, floor, activation="softmax", inplace=True) is inplace
    assert torch.equal(inplace, patch_finalize(acc, *starts, *weights, floor, activation="softmax"))


def test_finalize_accepts_a_slab_with_shifted_starts(backend, rng):
    """Finalising planes [lo, hi) with the z starts shifted by -lo equals slicing the whole result."""
    size, roi, starts = GRIDS[1]
    weights = [torch.rand(r, generator=rng, dtype=torch.float64) for r in roi]
    acc = torch.randn(1, 2, *size, generator=rng, dtype=torch.float64)
    whole = patch_finalize(acc, *starts, *weights, 0.2)
    part = patch_finalize(acc[:, :, 2:5], [s - 2 for s in starts[0]], *starts[1:], *weights, 0.2)
    assert torch.equal(part, whole[:, :, 2:5])


@pytest.mark.parametrize("floor", [0.0, 0.05])
def test_finalize_with_unsorted_and_repeated_grid_starts(backend, floor, rng):
    acc, grid, weights = unsorted_grid_case(rng)
    expected = reference.patch_finalize(acc, *grid, *weights, floor, 0, 0, 0.5)
    torch.testing.assert_close(patch_finalize(acc, *grid, *weights, floor), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("empty", [0, 2])
@pytest.mark.parametrize("output", ["probabilities", "mask"])
def test_finalize_of_an_empty_grid_is_all_uncovered(backend, empty, output, rng):
    """No window at all along an axis: every voxel is uncovered, 0 in every output, on every backend
    (the Triton launcher refused an empty axis)."""
    acc = torch.randn(2, 3, 4, 5, 6, generator=rng)
    grid = [[0], [0, 2], [1]]
    grid[empty] = []
    fused = patch_finalize(acc, *grid, torch.ones(3), torch.ones(4), torch.ones(5), output=output)
    assert fused.shape == acc.shape and not fused.any()


def test_a_floor_beyond_the_accumulators_dtype_is_refused():
    """A float32 accumulator cannot hold a floor of 1e39: it became inf in the kernels (every weight
    inf, no flag); float64 holds it."""
    acc, win, starts, wz, wy, wx = _case()
    message = r"floor: 1e\+39 overflows the accumulator's dtype torch.float32"
    with pytest.raises(ValueError, match=message):
        patch_scatter(acc, win, starts, wz, wy, wx, 1e39)
    with pytest.raises(ValueError, match=message):
        patch_finalize(acc, [0], [0], [0], wz, wy, wx, 1e39)
    for make in (pf.BatchScatter, pf.Finalizer):
        with pytest.raises(ValueError, match=message):
            make(wz, wy, wx, 1e39, torch.float32, "cpu")
    acc64 = acc.double()
    patch_scatter(acc64, win, starts, wz, wy, wx, 1e39)
    assert torch.isfinite(acc64).all() and acc64.max() >= 1e39


# ---------------------------------------------------------------------------------------- bad input
def _case():
    acc = torch.zeros(2, 3, 5, 7, 6)
    win = torch.ones(4, 3, 3, 4, 5)
    starts = torch.tensor([[0, 0, 0, 0], [1, 2, 3, 1], [0, -2, 5, 4], [1, 4, 6, 5]])
    return acc, win, starts, torch.ones(3), torch.ones(4), torch.ones(5)


BAD_SCATTER = [
    (lambda a, w, s, *v: (a.long(), w, s, *v), TypeError, "acc: expected a float32/float64"),
    (lambda a, w, s, *v: (a[0, 0], w, s, *v), ValueError, r"acc: expected a non-empty \[B, C, D, H, W\]"),
    (lambda a, w, s, *v: (a.transpose(3, 4), w, s, *v), ValueError, "acc: expected a contiguous"),
    (lambda a, w, s, *v: (a, w.int(), s, *v), TypeError, "windows: expected a float16"),
    (lambda a, w, s, *v: (a, w[:, :2], s, *v), ValueError, r"windows: expected shape \[N, 3, rz, ry, rx\]"),
    (
        lambda a, w, s, *v: (a, w[:, :, :0], s, *v[:0], torch.ones(0), *v[1:]),
        ValueError,
        "windows: window size",
    ),
    (lambda a, w, s, *v: (a, w, s.float(), *v), TypeError, "starts: expected an integer tensor"),
    (lambda a, w, s, *v: (a, w, s[:, :2], *v), ValueError, r"starts: expected shape \(4, 4\)"),
    (
        lambda a, w, s, *v: (a, w, s, v[0], torch.ones(3), v[2]),
        ValueError,
        "wy: expected a 1-D vector of length 4",
    ),
    (lambda a, w, s, *v: (a, w, s, v[0].int(), *v[1:]), TypeError, "wz: expected a float weight vector"),
    (
        lambda a, w, s, *v: (a, w, s, torch.tensor([1.0, float("nan"), 1.0]), *v[1:]),
        ValueError,
        "wz: expected finite weights >= 0, found 1 negative or NaN/Inf",
    ),
    (
        lambda a, w, s, *v: (a, w, s, v[0], -v[1], v[2]),
        ValueError,
        "wy: expected finite weights >= 0, found 4 negative",
    ),
    (
        lambda a, w, s, *v: (a, w, s, *v[:2], torch.tensor([1.0, 1e300, 1.0, 1.0, 1.0], dtype=torch.float64)),
        ValueError,  # finite in float64, Inf in acc's float32
        "wx: expected finite weights >= 0, found 1 negative or NaN/Inf in acc's dtype torch.float32",
    ),
    (
        lambda a, w, s, *v: (a, w, s, v[0] * 1e15, v[1] * 1e15, v[2] * 1e15),
        ValueError,  # each vector finite, their product not: every sum would be Inf or NaN
        r"wz, wy, wx: their largest product overflows acc's dtype torch.float32",
    ),
    (lambda a, w, s, *v: (a, w, s, *v, -1.0), ValueError, "floor: expected a finite number >= 0"),
    (lambda a, w, s, *v: (a, w, s, *v, float("nan")), ValueError, "floor: expected a finite number"),
    (lambda a, w, s, *v: (a, w, s + torch.tensor([0, 9, 0, 0]), *v), ValueError, "starts: 4 windows lie"),
    (lambda a, w, s, *v: (a, w, s + torch.tensor([2, 0, 0, 0]), *v), ValueError, "starts: 4 windows lie"),
    (lambda a, w, s, *v: (a, w, s - torch.tensor([0, 0, 0, 10]), *v), ValueError, "starts: 4 windows lie"),
    (lambda a, w, s, *v: (a, w * float("nan"), s, *v), ValueError, "windows: contains 375 NaN/Inf values"),
    (lambda a, w, s, *v: ("acc", w, s, *v), TypeError, "acc: expected a torch.Tensor"),
]


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize(("mutate", "error", "message"), BAD_SCATTER)
def test_bad_scatter_input(backend, deterministic, mutate, error, message):
    with pytest.raises(error, match=message):
        patch_scatter(*mutate(*_case()), deterministic=deterministic)


BAD_FINALIZE = [
    (dict(starts_z=[0.5]), ValueError, "starts_z: expected a 1-D sequence of integer"),
    (dict(starts_y=[0, True]), ValueError, "starts_y: expected a 1-D sequence of integer"),
    (dict(starts_y=[0, np.True_]), ValueError, "starts_y: expected a 1-D sequence of integer"),
    (dict(starts_x=np.array([0, 1], dtype=bool)), ValueError, "starts_x: expected a 1-D sequence of integer"),
    (dict(starts_z=[torch.tensor(True), 1]), ValueError, "starts_z: expected a 1-D sequence of integer"),
    (dict(starts_z=[2**63]), ValueError, "starts_z: expected a 1-D sequence of integer"),
    (dict(starts_x=torch.zeros(2, 2, dtype=torch.int64)), ValueError, "starts_x: expected a 1-D"),
    (dict(wy=torch.ones(2, 2)), ValueError, "wy: expected a 1-D vector of length >= 1"),
    (dict(wz=torch.tensor([0.5, -0.5])), ValueError, "wz: expected finite weights >= 0, found 1 negative"),
    (dict(wx=torch.full((4,), float("inf"))), ValueError, "wx: expected finite weights >= 0, found 4"),
    (dict(activation="relu"), ValueError, "activation: expected one of"),
    (dict(output="labels"), ValueError, "output: expected one of"),
    (dict(threshold=float("inf")), ValueError, "threshold: expected a finite number"),
    (dict(output="mask", inplace=True), ValueError, "inplace: needs output='probabilities'"),
]


def test_finalize_reads_starts_from_iterators(backend, rng):
    acc = torch.rand(1, 2, 8, 7, 6, generator=rng, dtype=torch.float64)
    weights = [torch.rand(4, generator=rng, dtype=torch.float64) + 0.1 for _ in range(3)]
    expected = patch_finalize(acc, [0, 4], [0, 3], [0, 2], *weights, 0.0)
    lazy = patch_finalize(acc, (s for s in [0, 4]), iter([0, 3]), map(int, "02"), *weights, 0.0)
    assert torch.equal(lazy, expected)


@pytest.mark.parametrize(("change", "error", "message"), BAD_FINALIZE)
def test_bad_finalize_input(backend, change, error, message):
    args = dict(acc=torch.zeros(1, 2, 4, 4, 4), starts_z=[0], starts_y=[0], starts_x=[0])
    args.update(wz=torch.ones(4), wy=torch.ones(4), wx=torch.ones(4))
    args.update(change)
    with pytest.raises(error, match=message):
        patch_finalize(**args)


def test_weights_on_the_cpu_are_checked_even_without_value_checks():
    acc, win, starts, wz, wy, wx = _case()
    with pytest.raises(ValueError, match="wz: expected finite weights >= 0"):
        patch_scatter(acc, win, starts, wz * float("nan"), wy, wx, check_values=False)
    assert torch.equal(acc, torch.zeros_like(acc))  # nothing was added


def test_weights_checked_skips_only_the_value_check(backend, rng):
    win, starts, weights = random_case(rng)
    expected, acc = torch.zeros(2, 3, 5, 7, 6), torch.zeros(2, 3, 5, 7, 6)
    patch_scatter(expected, win, starts, *weights)
    patch_scatter(acc, win, starts, *weights, weights_checked=True)
    assert torch.equal(acc, expected)
    with pytest.raises(ValueError, match="wz: expected a 1-D vector of length 3"):
        patch_scatter(acc, win, starts, weights[0][:2], *weights[1:], weights_checked=True)


def test_argmax_mask_needs_at_most_256_classes():
    with pytest.raises(ValueError, match="acc: an argmax mask is uint8, so at most 256 classes, got 300"):
        patch_finalize(
            torch.zeros(1, 300, 1, 1, 1), [0], [0], [0], *[torch.ones(1)] * 3, 0, "softmax", "mask"
        )


@pytest.mark.parametrize("missing", [b for b in densefuse.available_backends("cpu") if b not in BACKENDS])
def test_forcing_a_backend_without_kernels_is_a_clear_error(missing):
    acc, win, starts, *weights = _case()
    with densefuse.use_backend(missing), pytest.raises(RuntimeError, match=f"has no '{missing}' kernel"):
        patch_scatter(acc, win, starts, *weights)
    patch_scatter(acc, win, starts, *weights)  # unforced, the default backend falls back to one that has it


def test_a_single_volume_takes_no_batch_axis(backend, rng):
    """acc [C, D, H, W] and corners (z, y, x): the same sums, normaliser and windows as with B = 1."""
    win, starts, weights = random_case(rng, batch=1, count=6)
    acc = torch.zeros(3, 5, 7, 6, dtype=torch.float64)
    expected = torch.zeros(1, 3, 5, 7, 6, dtype=torch.float64)
    flags = patch_scatter(acc, win, starts[:, 1:], *weights, 0.2)
    assert torch.equal(flags, patch_scatter(expected, win, starts, *weights, 0.2))
    assert torch.equal(acc, expected[0])
    grid = ([0, 2], [0, 3], [1, 2])
    for options in (dict(), dict(activation="softmax", output="mask")):
        fused = patch_finalize(acc, *grid, *weights, 0.2, **options)
        assert torch.equal(fused, patch_finalize(expected, *grid, *weights, 0.2, **options)[0])
    assert patch_finalize(acc, *grid, *weights, 0.2, inplace=True) is acc
    volume = torch.randn(2, 5, 7, 6, generator=rng)
    assert torch.equal(
        patch_extract(volume, starts[:, 1:], (3, 4, 5)), patch_extract(volume[None], starts, (3, 4, 5))
    )


# ------------------------------------------------------------------------------------------ extract
PAD_MODES = list(reference.PAD_MODES)


NUMPY_PAD = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}  # numpy.pad's names


def naive_extract(volume, starts, roi, mode, cval):
    """Window by window from the whole volume padded by torch.nn.functional.pad (constant) or
    numpy.pad (the other modes, in float64: it also pads past an axis's length, reflecting again and
    again), cropped at the start. Independent of densefuse.reference's index arithmetic."""
    out = []
    for b, *start in starts.tolist():
        before = [max(-s, 0) for s in start]
        after = [max(s + r - n, 0) for s, r, n in zip(start, roi, volume.shape[2:])]
        if mode == "constant":
            pad = [p for axis in reversed(range(3)) for p in (before[axis], after[axis])]
            padded = torch.nn.functional.pad(volume[b : b + 1], pad, value=cval)
        else:
            widths = [(0, 0), (0, 0), *zip(before, after)]
            array = np.pad(volume[b : b + 1].double().numpy(), widths, mode=NUMPY_PAD[mode])
            padded = torch.from_numpy(array).to(volume.dtype)
        corner = [s + lo for s, lo in zip(start, before)]
        out.append(padded[(0, slice(None), *(slice(c, c + r) for c, r in zip(corner, roi)))])
    return torch.stack(out)


def random_starts(rng, count, batch, size, roi, reach=3):
    """[count, 4]: windows anywhere from ``reach`` voxels before the volume to ``reach`` past it."""
    columns = [torch.randint(0, batch, (count,), generator=rng)]
    columns += [torch.randint(-r - reach, n + reach, (count,), generator=rng) for r, n in zip(roi, size)]
    return torch.stack(columns, dim=1)


def vector_extract_case(rng, dtype, mode):
    """(volume, starts, expected windows with cval -2.5): a contiguous [2, 3, 6, 10, 24] volume whose
    rows are whole 16-byte vectors for every dtype, roi (3, 4, 8); windows inside along y and x at an
    x divisible by 8 (z padded or not), then unaligned, edge, outside and out-of-batch ones."""
    volume = torch.randn(2, 3, 6, 10, 24, generator=rng, dtype=torch.float64).to(dtype)
    inner = [[0, 0, 0, 0], [1, 2, 6, 16], [0, -1, 3, 8], [1, 3, 5, 0]]
    other = [[1, 4, 2, 3], [0, 1, -2, 8], [1, 0, 7, 16], [0, 2, 1, 20], [0, 5, 0, -8], [2, 0, 0, 0]]
    starts = torch.tensor(inner + other)
    expected = torch.empty(len(starts), 3, 3, 4, 8, dtype=dtype)
    reference.patch_extract(expected, volume, starts, mode, -2.5)
    return volume, starts, expected


def tile_edge_case(rng):
    """(acc [1, 2, 2, 70, 40] float64, grid, weights for roi (2, 5, 6)): windows that meet a 32 x 32
    tile of the CUDA finaliser only in its first or last row or column (y starts 27, 28, 59, 60; x
    starts 27, 31)."""
    grid = [torch.tensor([0]), torch.tensor([0, 27, 28, 40, 59, 60, 65]), torch.tensor([0, 27, 31, 34])]
    weights = [torch.rand(r, generator=rng, dtype=torch.float64) + 0.05 for r in (2, 5, 6)]
    return torch.randn(1, 2, 2, 70, 40, generator=rng, dtype=torch.float64), grid, weights


def grid_limit_case(rng):
    """(acc [1, 1, 70001, 1, 2] float64, grid, weights for roi (3, 1, 2)): 70001 planes of one row,
    more tiles than the CUDA finaliser's grid holds (65535), so blocks take several; a window over
    the last planes is finalised by the second round."""
    grid = [torch.tensor([0, 35000, 69998]), torch.tensor([0]), torch.tensor([0])]
    weights = [torch.rand(r, generator=rng, dtype=torch.float64) + 0.05 for r in (3, 1, 2)]
    return torch.randn(1, 1, 70001, 1, 2, generator=rng, dtype=torch.float64), grid, weights


def unsorted_grid_case(rng):
    """(acc [1, 3, 13, 11, 12] float64, per-axis grid starts out of order and repeated, with up to
    five windows covering a coordinate, weights for roi (5, 6, 5))."""
    grid = [torch.tensor(s) for s in ([5, -1, 2, 2, 9, 0, 1], [3, 0, 5, 3, 4, 1], [6, 1, 4, 0, 8, 2, 3])]
    weights = [torch.rand(r, generator=rng, dtype=torch.float64) + 0.05 for r in (5, 6, 5)]
    return torch.randn(1, 3, 13, 11, 12, generator=rng, dtype=torch.float64), grid, weights


@pytest.mark.parametrize("mode", PAD_MODES)
@pytest.mark.parametrize("dtype", WINDOW_DTYPES, ids=str)
def test_extract_matches_padding(backend, mode, dtype, rng):
    volume = torch.randn(2, 3, 5, 7, 6, generator=rng, dtype=torch.float64).to(dtype)
    roi = (4, 9, 5)  # y: larger than the volume
    starts = random_starts(rng, 17, 2, (5, 7, 6), roi)
    out = patch_extract(volume, starts, roi, mode, 1.7)
    assert out.dtype == dtype and out.shape == (17, 3, *roi)
    assert torch.equal(out, naive_extract(volume, starts, roi, mode, 1.7))
    expected = torch.empty_like(out)
    reference.patch_extract(expected, volume, starts, reference.PAD_MODES[mode], 1.7)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("mode", PAD_MODES)
def test_extract_into_a_buffer_from_a_strided_volume(backend, mode, rng):
    base = torch.randn(3, 9, 13, 8, 11, generator=rng)
    volume = base.permute(1, 0, 2, 4, 3)[:, :, 1:12:2]  # [9, 3, 6, 11, 8], no unit stride along x
    roi = (7, 4, 10)
    starts = random_starts(rng, 11, 9, volume.shape[2:], roi, reach=12)  # also far outside (reflect twice)
    buffer = torch.full((11, 3, *roi), float("nan"))
    out = patch_extract(volume, starts, roi, mode, -2.0, out=buffer)
    assert out is buffer
    assert torch.equal(out, naive_extract(volume, starts, roi, mode, -2.0))
    assert torch.equal(patch_extract(volume[1], starts[:, 1:].new_zeros(0, 4), roi), torch.empty(0, 3, *roi))


def test_extract_of_a_4d_volume_and_a_single_voxel(backend):
    volume = torch.arange(2.0).reshape(2, 1, 1, 1)
    starts = torch.tensor([[0, -1, 0, 2], [0, 0, 0, 0]])
    reflected = patch_extract(volume, starts, (2, 1, 3), "reflect")  # every position reads the voxel
    assert torch.equal(reflected, volume.reshape(1, 2, 1, 1, 1).expand(2, 2, 2, 1, 3))
    constant = patch_extract(volume, starts, (2, 1, 3), "constant", 5)
    assert constant[1, :, 0, 0, 0].tolist() == [0, 1]
    assert constant[0].eq(5).all() and constant[1].sum() == 1 + 5 * 10


_SHARED = torch.zeros(2, 3, 4, 4, 4)  # a volume whose memory out overlaps (a view of it)
BAD_EXTRACT = [
    (dict(volume=_SHARED, out=_SHARED.view(-1)[300:348].view(2, 3, 2, 2, 2)), ValueError, "out: overlaps"),
    (dict(volume=torch.zeros(2, 3, 4, 4, 4, dtype=torch.int32)), TypeError, "volume: expected a float16"),
    (dict(volume=torch.zeros(3, 4, 4)), ValueError, r"volume: expected a non-empty \[B, C, D, H, W\]"),
    (dict(starts=torch.zeros(2, 4)), TypeError, "starts: expected an integer tensor"),
    (dict(starts=torch.zeros(2, 2, dtype=torch.int64)), ValueError, r"starts: expected shape \(2, 4\)"),
    (
        dict(starts=torch.tensor([[0, 0, 0, 0], [2, 0, 0, 0]])),
        ValueError,
        r"starts: batch indices .* \[0, 2\)",
    ),
    (
        dict(starts=torch.tensor([[0, 0, -(2**62) - 1, 0], [1, 0, 0, 0]])),
        ValueError,
        r"starts: window corners must lie within \+-2\*\*62",
    ),
    (dict(roi=(2, 0, 2)), ValueError, "roi: expected three integers >= 1"),
    (dict(roi=(2, 2)), ValueError, "roi: expected three integers >= 1"),
    (dict(roi=(2, True, 2)), ValueError, "roi: expected three integers >= 1"),
    (dict(roi=(2, 2.0, 2)), ValueError, "roi: expected three integers >= 1"),
    (dict(roi="222"), ValueError, "roi: expected three integers >= 1"),
    (dict(cval=np.array([0.0])), TypeError, "cval: expected a number, got ndarray"),
    (dict(mode="wrap"), ValueError, "mode: expected one of"),
    (dict(cval="zero"), TypeError, "cval: expected a number"),
    (
        dict(volume=torch.zeros(2, 3, 4, 4, 4, dtype=torch.float16), cval=1e6),
        ValueError,
        "cval: 1000000.0 overflows the dtype torch.float16 of volume",
    ),
    (dict(starts=torch.zeros(4, dtype=torch.int64)), ValueError, r"starts: expected shape \(N, 4\).* \(4,\)"),
    (dict(out=torch.zeros(2, 3, 2, 2, 2, dtype=torch.float64)), TypeError, "out: expected torch.float32"),
    (
        dict(out=torch.zeros(2, 3, 2, 2, 3)),
        ValueError,
        r"out: expected a contiguous tensor of shape \(2, 3, 2",
    ),
    (
        dict(out=torch.zeros(2, 3, 2, 2, 4)[..., ::2]),
        ValueError,
        r"out: expected a contiguous tensor of shape \(2, 3, 2, 2, 2\), got \(2, 3, 2, 2, 2\), not cont",
    ),
    (dict(out=torch.zeros(2, 3, 2, 2, 2).transpose(3, 4)), ValueError, "out: expected a contiguous"),
    (dict(out=torch.zeros(2, 3, 2, 2, 2, device="meta")), ValueError, "out: expected a tensor on cpu"),
    (
        dict(starts=torch.zeros(2, 4, dtype=torch.int64, device="meta")),
        ValueError,
        "starts: expected a tensor on",
    ),
]


@pytest.mark.parametrize(("change", "error", "message"), BAD_EXTRACT)
def test_bad_extract_input(backend, change, error, message):
    args = dict(volume=torch.zeros(2, 3, 4, 4, 4), starts=torch.zeros(2, 4, dtype=torch.int64), roi=(2, 2, 2))
    args.update(change)
    with pytest.raises(error, match=message):
        patch_extract(**args)


def test_extract_writes_beside_the_volume_in_one_buffer(backend):
    """out may share the volume's storage where their memory does not meet."""
    buffer = torch.arange(384 + 48, dtype=torch.float32)
    volume, out = buffer[:384].view(2, 3, 4, 4, 4), buffer[384:].view(2, 3, 2, 2, 2)
    starts = torch.tensor([[0, 1, 0, 2], [1, 2, 2, 0]])
    expected = patch_extract(volume.clone(), starts, (2, 2, 2))
    assert patch_extract(volume, starts, (2, 2, 2), out=out) is out and torch.equal(out, expected)


def test_extract_reads_numpy_and_tensor_numbers(backend):
    """roi and cval as NumPy numbers, arrays and tensors, as floor and threshold take them."""
    volume, starts = torch.ones(1, 1, 2, 2, 2), torch.tensor([[0, -1, 0, 0]])
    expected = patch_extract(volume, starts, (2, 2, 2), cval=3.0)
    for roi in (np.array([2, 2, 2]), torch.tensor([2, 2, 2]), (np.int64(2), torch.tensor(2), 2)):
        for cval in (np.float32(3), torch.tensor(3.0), np.array(3.0)):
            assert torch.equal(patch_extract(volume, starts, roi, cval=cval), expected)


def test_extract_without_value_checks_reads_cval_for_a_batch_outside(backend):
    out = patch_extract(
        torch.ones(1, 1, 2, 2, 2), torch.tensor([[1, 0, 0, 0]]), (2, 2, 2), cval=3, check_values=False
    )
    assert out.eq(3).all()


# ------------------------------------------------------------- many batches, arguments checked once
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", WINDOW_DTYPES, ids=str)
def test_batch_scatter_is_patch_scatter_batch_by_batch(backend, deterministic, dtype, rng):
    """BatchScatter adds what patch_scatter adds, batch after batch, and sums the flags."""
    shape = (2, 3, 5, 7, 6)
    win, starts, weights = random_case(rng, dtype=dtype, count=10)
    win[3, 1, 0, 0, 0] = float("nan")  # flagged wherever it lands inside the volume
    expected = torch.zeros(shape, dtype=torch.float64)
    flags = torch.zeros(2, dtype=torch.int64)
    for part in (slice(0, 4), slice(4, 10)):
        options = dict(deterministic=deterministic, check_values=False)
        flags += patch_scatter(expected, win[part], starts[part], *weights, 0.1, **options)
    acc = torch.zeros(shape, dtype=torch.float64)
    scatter = pf.BatchScatter(*weights, 0.1, torch.float64, "cpu", deterministic=deterministic)
    for part in (slice(0, 4), slice(4, 10)):
        scatter(acc, win[part], starts[part])
    torch.testing.assert_close(acc, expected, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(scatter.flags(), flags) and scatter.flags().tolist() == flags.tolist()


def test_batch_scatter_without_batches_has_no_flags():
    weights = [torch.ones(3)] * 3
    assert pf.BatchScatter(*weights, 0.0, torch.float32, "cpu").flags().tolist() == [0, 0]


def test_batch_scatter_flags_add_up_over_many_batches(backend):
    """The per-batch flags are folded into a running total every 64 batches; none is lost."""
    weights = [torch.ones(2)] * 3
    scatter = pf.BatchScatter(*weights, 0.0, torch.float32, "cpu")
    acc = torch.zeros(1, 1, 2, 2, 2)
    starts = torch.tensor([[0, 0, 0, 0], [0, 5, 0, 0]])  # the second window misses the volume
    for n in range(150):
        windows = torch.ones(2, 1, 2, 2, 2)
        if n in (3, 100):
            windows[0, 0, 0, 0, 0] = float("nan")
        scatter(acc, windows, starts)
    assert len(scatter._flags) < 64
    assert scatter.flags().tolist() == [2, 150]


def test_batch_scatter_picks_the_gather_in_deterministic_mode(monkeypatch):
    weights = [torch.ones(3)] * 3
    with densefuse.use_backend("torch"):
        assert pf.BatchScatter(*weights, 0.0, torch.float32, "cpu")._kernel is reference.patch_scatter
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
        assert pf.BatchScatter(*weights, 0.0, torch.float32, "cpu")._kernel is reference.patch_gather


BAD_BATCH_SCATTER = [
    (lambda a, w, s: (a.float(), w, s), "acc: expected torch.float64, got torch.float32"),
    (lambda a, w, s: (a.transpose(2, 4), w, s), "acc: expected a contiguous"),
    (lambda a, w, s: (a, w.int(), s), "windows: expected a float16"),
    (lambda a, w, s: (a, w[:, :2], s), r"windows: expected \[N, 3, 3, 4, 5\] on cpu, got \(9, 2"),
    (
        lambda a, w, s: (a, w[..., :2], s),
        r"windows: expected \[N, 3, 3, 4, 5\] on cpu, got \(9, 3, 3, 4, 2\)",
    ),
    (lambda a, w, s: (a, w, s.int()), "starts: expected an int64"),
    (
        lambda a, w, s: (a, w, s[:2]),
        r"starts: expected an int64 \[9, 4\] tensor on cpu, got torch.int64 \(2, 4\)",
    ),
]


@pytest.mark.parametrize(("change", "message"), BAD_BATCH_SCATTER)
def test_bad_batch_scatter_input(change, message, rng):
    win, starts, weights = random_case(rng)
    scatter = pf.BatchScatter(*weights, 0.0, torch.float64, "cpu")
    with pytest.raises((TypeError, ValueError), match=message):
        scatter(*change(torch.zeros(2, 3, 5, 7, 6, dtype=torch.float64), win, starts))


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        (([torch.ones(3)] * 3, 0.0, torch.float16), TypeError, "dtype: expected float32/float64"),
        (([torch.ones(3), torch.tensor([1.0, -1.0]), torch.ones(3)], 0.0, torch.float32), ValueError, "wy:"),
        (([torch.ones(3), torch.ones(2, 2), torch.ones(3)], 0.0, torch.float32), ValueError, "wy:"),
        (([torch.ones(3)] * 3, float("nan"), torch.float32), ValueError, "floor:"),
        (([torch.full((3,), 1e300, dtype=torch.float64)] * 3, 0.0, torch.float32), ValueError, "wz:"),
    ],
    ids=str,
)
def test_bad_batch_scatter_arguments(args, error, message):
    weights, floor, dtype = args
    with pytest.raises(error, match=message):
        pf.BatchScatter(*weights, floor, dtype, "cpu")


UNUSABLE_DEVICES = ["bogus", "cpu:x", *([] if torch.cuda.is_available() else ["cuda"])]


@pytest.mark.parametrize("device", UNUSABLE_DEVICES)
@pytest.mark.parametrize("make", [pf.BatchScatter, pf.Finalizer])
def test_batch_objects_name_a_device_they_cannot_use(make, device):
    with pytest.raises(ValueError, match=f"device: cannot allocate on device '{device}' here"):
        make(*[torch.ones(3)] * 3, 0.0, torch.float32, device)


@pytest.mark.parametrize("floor", [0.0, 0.3])
@pytest.mark.parametrize(
    ("activation", "output"),
    [("none", "probabilities"), ("sigmoid", "probabilities"), ("softmax", "probabilities"),
     ("sigmoid", "mask"), ("softmax", "mask")],
)  # fmt: skip
def test_finalizer_is_patch_finalize(backend, floor, activation, output, rng):
    """Finalizer gives patch_finalize's bits, out of place and in place, on accumulators and slabs."""
    size, roi, starts = (7, 6, 8), (3, 4, 5), ([-1, 2, 4], [0, 2], [0, 3])
    weights = [torch.rand(r, generator=rng, dtype=torch.float64) + 0.05 for r in roi]
    acc = torch.randn(2, 3, *size, generator=rng, dtype=torch.float64)
    grid = [torch.tensor(s) for s in starts]
    finalize = pf.Finalizer(*weights, floor, torch.float64, "cpu", activation, output, 0.4)
    options = dict(activation=activation, output=output, threshold=0.4)
    assert torch.equal(finalize(acc, *grid), patch_finalize(acc, *starts, *weights, floor, **options))
    slab = acc[:, :, 2:5]  # planes 2..4: the grid in the slab's coordinates
    shifted = [s - 2 for s in starts[0]]
    expected = patch_finalize(slab, shifted, *starts[1:], *weights, floor, **options)
    assert torch.equal(finalize(slab, grid[0] - 2, *grid[1:]), expected)
    if output == "probabilities":
        inplace = acc.clone()
        assert finalize(inplace, *grid, inplace=True) is inplace
        assert torch.equal(inplace, patch_finalize(acc, *starts, *weights, floor, **options))


@pytest.mark.parametrize(
    ("settings", "call", "error", "message"),
    [
        (dict(dtype=torch.float16), None, TypeError, "dtype: expected float32/float64"),
        (dict(weights=[torch.ones(3), torch.tensor([1.0, -1.0]), torch.ones(3)]), None, ValueError, "wy:"),
        (dict(floor=-1.0), None, ValueError, "floor: expected a finite number >= 0"),
        (dict(activation="relu"), None, ValueError, "activation"),
        (dict(output="labels"), None, ValueError, "output: expected one of"),
        (dict(threshold=float("nan")), None, ValueError, "threshold: expected a finite number"),
        (dict(), lambda a: (a.float(),), TypeError, "acc: expected torch.float64, got torch.float32"),
        (dict(), lambda a: (a[0],), ValueError, r"acc: expected a non-empty \[B, C, D, H, W\] tensor on cpu"),
        (dict(), lambda a: (a[:, :, :0],), ValueError, "acc: expected a non-empty"),
        (dict(output="mask"), lambda a: (a, "inplace"), ValueError, "inplace: needs output='probabilities'"),
        (dict(), lambda a: (a.transpose(2, 4), "inplace"), ValueError, "inplace: needs .* a contiguous acc"),
        (
            dict(activation="softmax", output="mask"),
            lambda a: (a.expand(1, 257, *a.shape[2:]),),
            ValueError,
            "at most 256 classes",
        ),
    ],
    ids=str,
)
def test_bad_finalizer_input(settings, call, error, message):
    arguments = dict(weights=[torch.ones(3)] * 3, floor=0.0, dtype=torch.float64)
    arguments.update(settings)
    weights, floor, dtype = arguments.pop("weights"), arguments.pop("floor"), arguments.pop("dtype")
    grid = [torch.tensor([0])] * 3
    with pytest.raises(error, match=message):
        finalize = pf.Finalizer(*weights, floor, dtype, "cpu", **arguments)
        acc, *inplace = call(torch.zeros(1, 1, 3, 3, 3, dtype=torch.float64))
        finalize(acc, *grid, inplace=bool(inplace))


@pytest.mark.parametrize("mode", PAD_MODES)
def test_batch_extract_is_patch_extract(backend, mode, rng):
    volume = torch.randn(2, 3, 9, 11, 10, generator=rng)[..., ::2]  # strided
    roi = (4, 7, 6)
    _, starts, _ = random_case(rng, batch=2, size=volume.shape[2:], roi=roi, count=7)
    extract = pf.BatchExtract(volume, roi, mode, -1.5)
    out = torch.empty(7, 3, *roi)
    assert extract(out, starts) is out
    torch.testing.assert_close(out, patch_extract(volume, starts, roi, mode, -1.5), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (lambda v, o, s: ((v.int(), (2, 2, 2), "constant", 0.0), o, s), TypeError, "volume: expected"),
        (lambda v, o, s: ((v, (2, 0, 2), "constant", 0.0), o, s), ValueError, "roi: expected three"),
        (lambda v, o, s: ((v, (2, 2, 2), "wrap", 0.0), o, s), ValueError, "mode: expected one of"),
        (lambda v, o, s: ((v.half(), (2, 2, 2), "constant", 1e6), o, s), ValueError, "cval: .* overflows"),
        (
            lambda v, o, s: ((v, (2, 2, 2), "constant", 0.0), o.double(), s),
            TypeError,
            "out: expected torch.float32",
        ),
        (lambda v, o, s: ((v, (2, 2, 2), "constant", 0.0), o[:, :, :1], s), ValueError, "out: expected"),
        (
            lambda v, o, s: ((v, (2, 2, 2), "constant", 0.0), v.view(-1)[100:148].view(3, 2, 2, 2, 2), s),
            ValueError,
            "out: overlaps the memory of volume",
        ),
        (lambda v, o, s: ((v, (2, 2, 2), "constant", 0.0), o, s.int()), ValueError, "starts: expected"),
        (
            lambda v, o, s: ((v, (2, 2, 2), "constant", 0.0), o, s[:, :3]),
            ValueError,
            r"starts: .* got torch.int64 \(3, 3\)",
        ),
    ],
    ids=str,
)
def test_bad_batch_extract_input(change, error, message):
    volume, out, starts = torch.randn(1, 2, 5, 5, 5), torch.empty(3, 2, 2, 2, 2), torch.zeros(3, 4).long()
    args, out, starts = change(volume, out, starts)
    with pytest.raises(error, match=message):
        pf.BatchExtract(*args)(out, starts)


# ------------------------------------------------------------------------------------------ opcheck
def test_opcheck(backend, rng):
    win, starts, weights = random_case(rng, dtype=torch.float32)
    weights = [w.float() for w in weights]
    grid = [torch.tensor(s) for s in GRIDS[1][2]]
    grid_weights = [windows.spline(4, torch.float32)] * 3
    acc = torch.zeros(2, 3, 5, 7, 6)
    for op in (pf.patch_scatter_op, pf.patch_gather_op):
        torch.library.opcheck(op, (acc.clone(), win, starts, *weights, 0.1))
    acc = torch.rand(2, 3, 6, 5, 7)
    torch.library.opcheck(pf.patch_normalize_op, (acc.clone(), *grid, *grid_weights, 0.0, 2))
    for activation, output in [(0, 0), (1, 0), (1, 1), (2, 1)]:
        torch.library.opcheck(pf.patch_finalize_op, (acc, *grid, *grid_weights, 0.0, activation, output, 0.5))
    volume = torch.randn(2, 3, 5, 7, 6, generator=rng).transpose(2, 4)
    for mode in range(4):
        torch.library.opcheck(
            pf.patch_extract_op, (torch.empty(9, 3, *win.shape[2:]), volume, starts, mode, 0.5)
        )


# ------------------------------------------------------------------------------- the cpp backend
# Its scatter is plane-stationary (each (batch, z) plane of acc, or a band of its rows, is written
# by one thread, windows in index order), so scatter and gather are both deterministic.
requires_cpp = pytest.mark.skipif("cpp" not in BACKENDS, reason="needs densefuse._C")


@requires_cpp
def test_extension_ops_trace_under_torch_compile(rng):
    """The batch objects call densefuse_ext's ops directly: those have the densefuse ops' fake
    kernels, so opcheck passes on them and torch.compile(fullgraph=True) traces a fusion step."""
    win, starts, weights = random_case(rng, dtype=torch.float32)
    weights = [w.float() for w in weights]
    with densefuse.use_backend("cpp"):
        extract = pf.BatchExtract(torch.randn(2, 3, 5, 7, 6, generator=rng), win.shape[2:], "reflect")
        scatter = pf.BatchScatter(*weights, 0.0, torch.float32, "cpu")
        finish = pf.Finalizer(*weights, 0.0, torch.float32, "cpu", "sigmoid", "mask")
    ext = torch.ops.densefuse_ext
    torch.library.opcheck(ext.patch_scatter, (torch.zeros(2, 3, 5, 7, 6), win, starts, *weights, 0.1))
    torch.library.opcheck(ext.patch_extract, (torch.empty_like(win), extract.volume, starts, 1, 0.5))
    grid = [torch.tensor([-1, 2])] * 3

    def step(acc: torch.Tensor) -> torch.Tensor:
        windows = extract(torch.empty_like(win), starts)
        scatter(acc, windows * 2, starts)
        return finish(acc, *grid)

    expected = step(torch.zeros(2, 3, 5, 7, 6))
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(torch.zeros(2, 3, 5, 7, 6)), expected)


@contextlib.contextmanager
def threads(count: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@requires_cpp
@pytest.mark.parametrize("mode", PAD_MODES)
def test_cpp_extract_is_the_same_on_any_thread_count(mode, rng):
    """A batch large enough to be split over threads (one per 32768 values copied at most), and a
    small one that runs on the calling thread: the reference's values for 1, 2 and 3 threads."""
    volume = torch.randn(2, 2, 20, 30, 40, generator=rng)
    for roi, count in (((16, 24, 30), 12), ((3, 4, 5), 5)):
        starts = random_starts(rng, count, 2, volume.shape[2:], roi, reach=20)
        expected = naive_extract(volume, starts, roi, mode, 0.5)
        for count_threads in (1, 2, 3):
            with densefuse.use_backend("cpp"), threads(count_threads):
                assert torch.equal(patch_extract(volume, starts, roi, mode, 0.5), expected), count_threads


@requires_cpp
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize(
    ("shape", "roi"), [((2, 2, 24, 30, 36), (10, 24, 30)), ((1, 2, 2, 60, 36), (3, 24, 30))]
)
def test_cpp_scatter_is_the_same_on_any_thread_count(deterministic, shape, roi, rng):
    """Planes crossed by 1 to 16 windows (or two planes cut into bands of rows), split over 1, 2 and 3
    threads at about equal shares of the values added: every item added once, in window order (the
    reference's bits and flags)."""
    acc = torch.randn(*shape, generator=rng, dtype=torch.float64)
    starts = random_starts(rng, 16, shape[0], acc.shape[2:], roi, reach=6)
    windows = torch.randn(16, 2, *roi, generator=rng, dtype=torch.float64)
    weights = [torch.rand(r, generator=rng, dtype=torch.float64) for r in roi]
    reference_op = reference.patch_gather if deterministic else reference.patch_scatter
    op = pf.patch_gather_op if deterministic else pf.patch_scatter_op
    expected = acc.clone()
    expected_flags = reference_op(expected, windows, starts, *weights, 0.1)
    for count in (1, 2, 3):
        out = acc.clone()
        with densefuse.use_backend("cpp"), threads(count):
            flags = op(out, windows, starts, *weights, 0.1)
        assert torch.equal(out, expected), count
        assert flags.tolist() == expected_flags.tolist(), count


@requires_cpp
@pytest.mark.parametrize("mode", PAD_MODES)
def test_cpp_extract_is_exact_for_corners_near_the_int64_limits(mode):
    """start + window index is never formed: the padding index is exact for any int64 corner (the
    public op rejects corners past +-2**62; the kernel itself needs no such bound)."""
    size, roi = (5, 7, 6), (2, 3, 4)
    volume = torch.arange(2 * 5 * 7 * 6, dtype=torch.float32).reshape(2, 1, *size)
    corners = [(1, 2**63 - 1, -(2**63), 3), (0, -(2**63) + 1, 2**63 - 2, 2**63 - 3)]  # start + i overflows
    out = torch.empty(len(corners), 1, *roi)
    code = reference.PAD_MODES[mode]
    torch.ops.densefuse_ext.patch_extract(out, volume, torch.tensor(corners), code, -1.0)
    for n, (b, *start) in enumerate(corners):  # the definitions of reference.pad_index, in exact integers
        index = []
        for s, r, length in zip(start, roi, size):
            positions = [s + i for i in range(r)]
            if mode == "constant":
                index.append([p if 0 <= p < length else -1 for p in positions])
            elif mode == "replicate":
                index.append([min(max(p, 0), length - 1) for p in positions])
            elif mode == "circular":
                index.append([p % length for p in positions])
            else:
                period = 2 * (length - 1)
                index.append([p % period if p % period < length else period - p % period for p in positions])
        for i, j, k in itertools.product(*(range(r) for r in roi)):
            z, y, x = index[0][i], index[1][j], index[2][k]
            expected = -1.0 if min(z, y, x) < 0 else float(volume[b, 0, z, y, x])
            assert float(out[n, 0, i, j, k]) == expected, (mode, n, i, j, k)


WINDOW_AND_ACC_DTYPES = [  # (windows, accumulator): the CPU kernel's row loop for each
    (torch.float64,) * 2,
    (torch.float32,) * 2,
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.float64, torch.float32),
]
SCATTER_CASES = [  # (batch, channels, size, roi, count)
    (1, 2, (1, 37, 29), (1, 5, 7), 60),  # a single plane, many windows per voxel
    (2, 3, (9, 11, 13), (4, 3, 5), 40),
    (1, 1, (4, 3, 300), (2, 2, 130), 12),  # long rows, windows wider than half the volume
    (1, 1, (6, 7, 8), (1, 2, 3), 3000),  # large N
    # enough values for three threads (the kernel takes one per 16384 values added at most):
    (1, 2, (1, 67, 59), (1, 9, 11), 500),  # one plane, split into row bands
    (2, 3, (9, 23, 21), (4, 7, 9), 250),
]


@requires_cpp
@pytest.mark.parametrize("floor", [0.0, 0.2])
@pytest.mark.parametrize("win_dtype, acc_dtype", WINDOW_AND_ACC_DTYPES, ids=str)
@pytest.mark.parametrize("case", SCATTER_CASES, ids=str)
def test_cpp_scatter_and_gather_are_deterministic(case, win_dtype, acc_dtype, floor, rng):
    """The same bits for 1, 2 and 3 threads, and the reference's bits (the same products and sums in
    the same order; zeros compare by value: the reference's gather turns a -0.0 that no window
    covers but its box does into +0.0)."""
    batch, channels, size, roi, count = case
    win, starts, weights = random_case(rng, batch, channels, size, roi, count, win_dtype)
    weights = [w.to(acc_dtype) for w in weights]
    acc = torch.randn(batch, channels, *size, generator=rng, dtype=torch.float64).to(acc_dtype)
    for op, naive in (
        (pf.patch_scatter_op, reference.patch_scatter),
        (pf.patch_gather_op, reference.patch_gather),
    ):
        expected = acc.clone()
        naive(expected, win, starts, *weights, floor)
        runs = []
        for count_threads in (1, 2, 3):
            runs.append(acc.clone())
            with densefuse.use_backend("cpp"), threads(count_threads):
                assert op(runs[-1], win, starts, *weights, floor).tolist() == [0, 0]
        assert all(torch.equal(run, runs[0]) for run in runs[1:]), op
        assert torch.equal(runs[0], expected), op


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", WINDOW_DTYPES, ids=str)
def test_flags_count_nonfinite_values_in_every_dtype(backend, deterministic, dtype):
    """NaN and +-Inf window values inside the volume are counted in every window dtype (under the
    interpreter, Triton once saw no bfloat16 NaN: there a bfloat16 NaN equals itself)."""
    win = torch.ones(2, 1, 3, 3, 3, dtype=dtype)
    win[0, 0, 0, 0, 0], win[0, 0, 1, 1, 1], win[1, 0, 2, 2, 2] = float("nan"), float("inf"), -float("inf")
    starts = torch.tensor([[0, 0, 0, 0], [0, 1, 1, 1]])
    ones = [torch.ones(3)] * 3
    acc = torch.zeros(1, 1, 4, 4, 4)
    flags = patch_scatter(acc, win, starts, *ones, check_values=False, deterministic=deterministic)
    assert flags.tolist() == [3, 0]


@requires_cpp
@pytest.mark.parametrize("deterministic", [False, True])
def test_cpp_flags_count_nonfinite_values_under_zero_weights(deterministic, rng):
    """In the vector part of a row: NaN and Inf under a zero weight still count (0 * NaN is NaN), an
    fp64 value that overflows the fp32 accumulator does not."""
    win = torch.randn(1, 1, 1, 1, 37, generator=rng, dtype=torch.float64)
    win[..., 3], win[..., 5], win[..., 7] = float("nan"), float("inf"), 1e300
    wx = torch.ones(37)
    wx[3] = wx[5] = 0
    ones = torch.ones(1)
    with densefuse.use_backend("cpp"):
        flags = patch_scatter(
            torch.zeros(1, 1, 1, 1, 37),
            win,
            torch.zeros(1, 4, dtype=torch.int64),
            ones,
            ones,
            wx,
            check_values=False,
            deterministic=deterministic,
        )
    assert flags.tolist() == [2, 0]


@requires_cpp
def test_cpp_scatter_many_windows_on_one_voxel(rng):
    """200 windows at the same place: every voxel inside gets 200 additions."""
    win = torch.randn(200, 2, 3, 4, 5, generator=rng, dtype=torch.float64)
    starts = torch.tensor([[0, -1, 2, -3]] * 200)
    weights = [torch.rand(r, generator=rng, dtype=torch.float64) + 0.1 for r in (3, 4, 5)]
    expected = torch.zeros(1, 2, 4, 6, 5, dtype=torch.float64)
    reference.patch_scatter(expected, win, starts, *weights, 0.0)
    for deterministic in (False, True):
        acc = torch.zeros(1, 2, 4, 6, 5, dtype=torch.float64)
        with densefuse.use_backend("cpp"):
            patch_scatter(acc, win, starts, *weights, deterministic=deterministic)
        torch.testing.assert_close(acc, expected, rtol=1e-12, atol=1e-12)


@requires_cpp
def test_cpp_flags_count_exactly(rng):
    """Non-finite values are counted in the windows' dtype (an fp64 value that overflows fp32 is not
    one); starts far outside the volume (int64 extremes) are skipped without overflow."""
    win = torch.randn(5, 1, 3, 3, 3, generator=rng, dtype=torch.float64)
    win[0, 0, 0, 0, 0] = float("nan")
    win[0, 0, 1, 1, 1] = float("inf")
    win[1, 0, 2, 2, 2] = 1e300  # finite in fp64, inf once rounded to the fp32 accumulator
    win[2, 0, 0, 0, 0] = float("-inf")  # lands outside the volume: not counted
    big = 2**63 - 1
    starts = torch.tensor([[0, 0, 0, 0], [0, 1, 1, 1], [0, -1, 0, 0], [0, big, 0, 0], [0, 0, -big, 0]])
    ones = torch.ones(3, dtype=torch.float64)
    with densefuse.use_backend("cpp"):
        flags = patch_scatter(torch.zeros(1, 1, 4, 4, 4), win, starts, ones, ones, ones, check_values=False)
    assert flags.tolist() == [2, 2]


@requires_cpp
@pytest.mark.parametrize("dtype, acc_dtype", WINDOW_AND_ACC_DTYPES, ids=str)
def test_cpp_flags_count_exactly_over_long_rows(dtype, acc_dtype, rng):
    """Rows longer than the kernel's vectors (vector part and tail; half windows are widened first):
    non-finite values anywhere are counted once; finite values whose sums pass the largest float
    are not counted."""
    big = torch.finfo(dtype).max / 4
    win = torch.randn(3, 2, 3, 4, 37, generator=rng).to(dtype)
    win[0, 1, 1, 2, 3] = float("nan")  # vector part
    win[0, 1, 2, 3, 36] = float("-inf")  # tail
    win[1, 0, 0, 1, 20] = float("inf")
    win[2] = big  # the sum of its products overflows, every value is finite
    starts = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 2], [0, 0, 1, 0]])
    weights = [torch.ones(r, dtype=acc_dtype) for r in (3, 4, 37)]
    with densefuse.use_backend("cpp"):
        for deterministic in (False, True):
            acc = torch.zeros(1, 2, 4, 5, 40, dtype=acc_dtype)
            flags = patch_scatter(acc, win, starts, *weights, check_values=False, deterministic=deterministic)
            assert flags.tolist() == [3, 0]


@requires_cpp
@pytest.mark.parametrize("floor", [0.0, 0.4])
@pytest.mark.parametrize("grid", GRIDS, ids=str)
def test_cpp_finalize_is_the_reference_bit_for_bit(grid, floor, rng):
    """Values and threshold masks (no transcendental functions involved) equal the reference's bits."""
    size, roi, starts = grid
    weights = [torch.rand(r, generator=rng, dtype=torch.float64) + 0.05 for r in roi]
    grid_t = [torch.tensor(s) for s in starts]
    acc = torch.randn(2, 3, *size, generator=rng, dtype=torch.float64)
    for output in (0, 1):
        expected = reference.patch_finalize(acc, *grid_t, *weights, floor, 0, output, 0.1)
        with densefuse.use_backend("cpp"):
            ours = pf.patch_finalize_op(acc, *grid_t, *weights, floor, 0, output, 0.1)
        assert torch.equal(ours, expected)


@requires_cpp
def test_cpp_finalize_a_large_volume_in_parallel(rng):
    """Many rows split over threads: the same bits for any thread count."""
    size = (23, 41, 37)
    grid = [list(range(-4, s, 5)) for s in size]
    weights = [windows.spline(8, torch.float32)] * 3
    acc = torch.randn(1, 4, *size, generator=rng)
    runs = []
    for count_threads in (1, 2):
        with densefuse.use_backend("cpp"), threads(count_threads):
            runs.append(patch_finalize(acc, *grid, *weights, 0.01, activation="softmax"))
    assert torch.equal(runs[0], runs[1])
    with densefuse.use_backend("torch"):
        torch.testing.assert_close(runs[0], patch_finalize(acc, *grid, *weights, 0.01, activation="softmax"))


@requires_cpp
def test_build_info_lists_the_registered_ops_per_dispatch_key():
    ops = densefuse._C.build_info()["ops"]
    assert set(pf.OP_NAMES) <= set(ops["cpu"])
    assert set(pf.OP_NAMES) <= set(ops.get("cuda", pf.OP_NAMES))  # CUDA builds: every op too
    has_kernel = getattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", None)
    if has_kernel is not None:  # the dispatcher agrees, wherever torch still lets us ask it
        for key, names in ops.items():
            dispatch_key = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}[key]
            assert all(has_kernel(f"densefuse_ext::{name}", dispatch_key) for name in names), key


@requires_cpp
def test_backend_choice_needs_no_private_dispatcher_api(monkeypatch):
    monkeypatch.delattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", raising=False)
    assert "cpp" in pf.implemented_backends("cpu")
    acc, win, starts, *weights = _case()
    with densefuse.use_backend("cpp"):
        assert patch_scatter(acc, win, starts, *weights).tolist() == [0, 0]


EXT_BAD_INPUT = [  # direct torch.ops.densefuse_ext calls still check what the kernels index with
    (lambda a, w, s, *v: (a.int(), w, s, *v), "acc: expected a float32/float64"),
    (lambda a, w, s, *v: (a, w[:, :2], s, *v), r"windows: expected shape \[N, 3, rz, ry, rx\]"),
    (lambda a, w, s, *v: (a, w, s[:, :3], *v), r"starts: expected shape \(4, 4\)"),
    (lambda a, w, s, *v: (a, w, s.float(), *v), "starts: expected an integer tensor"),
    (lambda a, w, s, *v: (a, w, s, v[0], torch.ones(3), v[2]), "wy: expected a 1-D vector of length 4"),
    (lambda a, w, s, *v: (a.transpose(3, 4), w, s, *v), "acc: expected a contiguous tensor"),
]


@requires_cpp
@pytest.mark.parametrize(("mutate", "message"), EXT_BAD_INPUT)
def test_cpp_ops_check_their_arguments(mutate, message):
    for name in ("patch_scatter", "patch_gather"):
        with pytest.raises(RuntimeError, match=message):
            getattr(torch.ops.densefuse_ext, name)(*mutate(*_case()), 0.0)
    acc, grid, weights = torch.zeros(1, 1, 2, 2, 2), [torch.tensor([0])] * 3, _case()[3:]
    with pytest.raises(RuntimeError, match=r"activation: expected 0 \(none\), 1 \(sigmoid\) or 2"):
        torch.ops.densefuse_ext.patch_finalize(acc, *grid, *weights, 0.0, 3, 0, 0.5)
    with pytest.raises(RuntimeError, match="starts_y: expected a 1-D tensor"):
        torch.ops.densefuse_ext.patch_normalize(acc, grid[0], grid[1][None], grid[2], *weights, 0.0, 0)


requires_cuda_ext = pytest.mark.skipif(
    not torch.cuda.is_available() or "cuda" not in densefuse.available_backends("cuda"),
    reason="needs a CUDA device and densefuse._C built with CUDA",
)


@requires_cuda_ext
@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("width", [64, 66, 67])  # float4, float2 and scalar atomics
def test_cuda_scatter_matches_the_reference(acc_dtype, width, rng):
    win, starts, weights = random_case(rng, 2, 3, (9, 11, width), (4, 5, 33), 40, torch.float16)
    expected = torch.zeros(2, 3, 9, 11, width, dtype=torch.float64)
    reference.patch_scatter(expected, win.double(), starts, *weights, 0.1)
    acc = torch.zeros(2, 3, 9, 11, width, dtype=acc_dtype, device="cuda")
    args = [t.cuda() for t in (win, starts, *[w.to(acc_dtype) for w in weights])]
    flags = torch.ops.densefuse_ext.patch_scatter(acc, *args, 0.1)
    assert flags.tolist() == [0, 0]
    torch.testing.assert_close(acc.cpu().double(), expected, rtol=1e-5, atol=1e-5)


@requires_cuda_ext
@pytest.mark.gpu
def test_cuda_scatter_past_the_grid_limit():
    """N * C * rz = 2**31 + 3 window planes (more blocks than one launch's grid takes): the planes past
    2**31 - 1, the only ones inside acc here, are added too (no 'invalid configuration argument')."""
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs 24 GiB of GPU memory")
    planes = 2**31 + 3
    win = torch.ones(1, 1, planes, 1, 1, dtype=torch.float16, device="cuda")
    wz = torch.ones(planes, device="cuda")
    one = torch.ones(1, device="cuda")
    acc = torch.zeros(1, 1, 4, 1, 1, device="cuda")
    starts = torch.tensor([[0, -(2**31), 0, 0]], device="cuda")  # covers z = 0, 1, 2 with planes >= 2**31
    flags = torch.ops.densefuse_ext.patch_scatter(acc, win, starts, wz, one, one, 0.0)
    assert flags.tolist() == [0, 0] and acc.flatten().tolist() == [1.0, 1.0, 1.0, 0.0]


def on_cuda(*tensors):
    return [t.cuda() for t in tensors]


@requires_cuda_ext
@pytest.mark.gpu
@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("win_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("floor", [0.0, 0.1])
def test_cuda_gather_is_the_reference_bit_for_bit(acc_dtype, win_dtype, floor, rng):
    """Every run gives the reference gather's values, bit for bit (NaN where it has NaN; the reference
    also turns a -0.0 it does not cover into +0.0, so zeros are compared by value) and flags (many
    windows on the same voxels, windows over every edge, a NaN, windows that miss the volume or name
    a batch outside it)."""
    win, starts, weights = random_case(rng, 2, 3, (9, 11, 13), (4, 5, 6), 40, win_dtype)
    win[3, 1, 2, 2, 2] = float("nan")
    starts = torch.cat([starts, torch.tensor([[2, 0, 0, 0], [0, 9, 0, 0]])])  # skipped
    win = torch.cat([win, win[:2]])
    weights = [w.to(acc_dtype) for w in weights]
    start = torch.randn(2, 3, 9, 11, 13, generator=rng, dtype=torch.float64).to(acc_dtype)
    expected = start.clone()
    expected_flags = reference.patch_gather(expected, win, starts, *weights, floor)
    for _ in range(2):
        acc = start.cuda()
        flags = torch.ops.densefuse_ext.patch_gather(acc, *on_cuda(win, starts, *weights), floor)
        assert flags.tolist() == expected_flags.tolist()
        torch.testing.assert_close(acc.cpu(), expected, rtol=0, atol=0, equal_nan=True)


@requires_cuda_ext
@pytest.mark.gpu
@pytest.mark.parametrize("mode", PAD_MODES)
@pytest.mark.parametrize("dtype", WINDOW_DTYPES, ids=str)
def test_cuda_extract_is_the_reference(mode, dtype, rng):
    volume = torch.randn(2, 3, 5, 7, 6, generator=rng, dtype=torch.float64).to(dtype)
    roi = (4, 9, 5)  # y: larger than the volume
    starts = random_starts(rng, 17, 2, (5, 7, 6), roi)
    starts[0, 0] = 7  # a batch index outside the volume: reads cval
    expected = torch.empty(17, 3, *roi, dtype=dtype)
    reference.patch_extract(expected, volume, starts, reference.PAD_MODES[mode], 1.7)
    strided = volume.cuda().transpose(2, 4).contiguous().transpose(2, 4)  # x is not the fastest axis
    out = torch.full_like(expected, float("nan"), device="cuda")
    torch.ops.densefuse_ext.patch_extract(out, strided, starts.cuda(), reference.PAD_MODES[mode], 1.7)
    assert torch.equal(out.cpu(), expected)


@requires_cuda_ext
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", WINDOW_DTYPES, ids=str)
def test_cuda_extract_copies_inner_windows_in_whole_vectors(dtype, rng):
    """Also from a volume whose rows are not 16-byte aligned (the scalar path; a vector load would fault)."""
    reflect = reference.PAD_MODES["reflect"]
    volume, starts, expected = vector_extract_case(rng, dtype, reflect)
    volume = volume.cuda()
    shifted = torch.cat([volume[..., :1], volume], dim=-1)[..., 1:]  # made on the GPU: .cuda() would pack it
    for source in (volume, shifted):
        out = torch.full_like(expected, float("nan"), device="cuda")
        torch.ops.densefuse_ext.patch_extract(out, source, starts.cuda(), reflect, -2.5)
        assert torch.equal(out.cpu(), expected)


@requires_cuda_ext
@pytest.mark.gpu
@pytest.mark.parametrize("floor", [0.0, 0.05])
@pytest.mark.parametrize(
    "case",
    [unsorted_grid_case, tile_edge_case, grid_limit_case],
    ids=["unsorted", "tile-edges", "grid-limit"],
)
def test_cuda_finalize_edge_cases(case, floor, rng):
    """Unsorted and repeated grid starts, windows meeting a tile only at its edge, and more tiles than
    one grid holds: the reference bit for bit."""
    acc, grid, weights = case(rng)
    expected = reference.patch_finalize(acc, *grid, *weights, floor, 0, 0, 0.5)
    on_gpu = [t.cuda() for t in (acc, *grid, *weights)]
    out = torch.ops.densefuse_ext.patch_finalize(*on_gpu, floor, 0, 0, 0.5)
    torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=0)


@requires_cuda_ext
@pytest.mark.gpu
@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("floor", [0.0, 0.05])
@pytest.mark.parametrize("activation", [0, 1, 2], ids=["none", "sigmoid", "softmax"])
def test_cuda_finalize_matches_the_reference(acc_dtype, floor, activation, rng):
    """Probabilities (out of place and in place) and masks; x = 0 is covered by no window (0 out)."""
    size, roi = (9, 10, 11), (4, 5, 6)
    grid = [torch.tensor(s) for s in ([-1, 2, 5, 7], [0, 3, 5], [1, 4, 6])]
    weights = [(torch.rand(r, generator=rng, dtype=torch.float64) + 0.05).to(acc_dtype) for r in roi]
    acc = (torch.randn(2, 4, *size, generator=rng, dtype=torch.float64) * 3).to(acc_dtype)
    acc[0, :, 1, 1, 1] = 0.25  # a tie: the first class wins the argmax
    acc[1, 2, 2, 2, 2] = float("nan")  # the NaN wins the argmax; softmax is NaN over the voxel
    args = on_cuda(acc, *grid, *weights)
    for output in (0, 1):
        expected = reference.patch_finalize(acc, *grid, *weights, floor, activation, output, 0.5)
        out = torch.ops.densefuse_ext.patch_finalize(*args, floor, activation, output, 0.5).cpu()
        if output == 1 or activation == 0:  # the same divisions: the same bits
            torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
        else:  # exp rounds differently from torch's
            torch.testing.assert_close(out, expected, rtol=2e-6, atol=1e-7, equal_nan=True)
    in_place = args[0].clone()
    torch.ops.densefuse_ext.patch_normalize(in_place, *args[1:], floor, activation)
    expected = torch.ops.densefuse_ext.patch_finalize(*args, floor, activation, 0, 0.5)
    torch.testing.assert_close(in_place, expected, rtol=0, atol=0, equal_nan=True)


@requires_cuda_ext
@pytest.mark.gpu
def test_cuda_window_kernels_over_many_row_bands(rng):
    """Windows of 1500 rows span several blocks (row bands) per plane: extraction, scatter and gather
    against the reference."""
    roi, size = (2, 1500, 3), (3, 1600, 4)
    volume = torch.randn(1, 2, *size, generator=rng)
    starts = torch.tensor([[0, 0, 0, 0], [0, 1, 90, 1], [0, -1, 100, -1]])
    expected, reflect = torch.empty(3, 2, *roi), reference.PAD_MODES["reflect"]
    reference.patch_extract(expected, volume, starts, reflect, 0.0)
    windows = torch.empty(3, 2, *roi, device="cuda")
    torch.ops.densefuse_ext.patch_extract(windows, volume.cuda(), starts.cuda(), reflect, 0.0)
    assert torch.equal(windows.cpu(), expected)
    weights = [torch.rand(r, generator=rng) + 0.05 for r in roi]
    for name in ("patch_scatter", "patch_gather"):
        acc = torch.zeros(1, 2, *size)
        getattr(reference, name)(acc, expected, starts, *weights, 0.0)
        ours = torch.zeros(1, 2, *size, device="cuda")
        flags = getattr(torch.ops.densefuse_ext, name)(ours, windows, *on_cuda(starts, *weights), 0.0)
        assert flags.tolist() == [0, 0]
        torch.testing.assert_close(ours.cpu(), acc, rtol=1e-6, atol=1e-6)
