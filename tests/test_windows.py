"""Window weights and window positions (densefuse.windows) against their math and against MONAI."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from monai.data.utils import compute_importance_map, dense_patch_slices
from monai.inferers.utils import _get_scan_interval

from densefuse import windows
from densefuse.ops import _validate


def shifted_sum(w: torch.Tensor, stride: int, copies: int) -> torch.Tensor:
    """sum_k w(x - k * stride) for k < copies, over the covered extent."""
    total = torch.zeros(w.numel() + stride * (copies - 1), dtype=w.dtype)
    for k in range(copies):
        total[k * stride : k * stride + w.numel()] += w
    return total


@pytest.mark.parametrize("order", [0, 1, 2, 3])
@pytest.mark.parametrize("stride", [1, 3, 8])
def test_bspline_partition_of_unity_at_natural_stride(order, stride):
    n = stride * (order + 1)  # the natural stride is n / (order + 1)
    total = shifted_sum(windows.bspline(n, order), stride, copies=order + 4)
    interior = total[n - stride : -(n - stride)] if n > stride else total  # where order + 1 copies overlap
    torch.testing.assert_close(interior, torch.ones_like(interior), rtol=0, atol=1e-14)


@pytest.mark.parametrize("n", [2, 8, 10, 96])
def test_spline_partition_of_unity_at_half_window(n):
    total = shifted_sum(windows.spline(n), n // 2, copies=5)
    torch.testing.assert_close(
        total[n // 2 : -(n // 2)], torch.ones(4 * (n // 2), dtype=torch.float64), rtol=0, atol=1e-14
    )


def test_spline_matches_the_papers_formula():
    n = 16
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    expected = torch.where(
        u <= 0.25,
        8 * u**2,
        torch.where(
            u <= 0.5, 1 - 8 * (0.5 - u) ** 2, torch.where(u <= 0.75, 1 - 8 * (u - 0.5) ** 2, 8 * (1 - u) ** 2)
        ),
    )
    torch.testing.assert_close(windows.spline(n), expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("order", [0, 1, 2, 3])
@pytest.mark.parametrize("n", [1, 5, 12])
def test_bspline_is_symmetric_positive_and_peaks_at_the_centre(order, n):
    w = windows.bspline(n, order)
    assert w.shape == (n,) and w.dtype == torch.float64
    assert (w > 0).all()
    torch.testing.assert_close(w, w.flip(0), rtol=0, atol=1e-15)
    assert w.max() <= 1 and w[n // 2] == w.max()


def test_bspline_closed_forms():
    t = torch.tensor([0.0, 0.25, 0.5, 1.0, 1.5, 2.0])
    torch.testing.assert_close(windows.cardinal_bspline(t, 1), torch.tensor([1, 0.75, 0.5, 0, 0, 0.0]))
    torch.testing.assert_close(windows.cardinal_bspline(t, 2), torch.tensor([0.75, 0.6875, 0.5, 0.125, 0, 0]))
    expected = torch.tensor([2 / 3, 2 / 3 - 1 / 16 + 1 / 128, 23 / 48, 1 / 6, 1 / 48, 0])
    torch.testing.assert_close(windows.cardinal_bspline(t, 3), expected)


@pytest.mark.parametrize("size", [(7, 8, 9), (1, 4, 16), (96, 96, 96)])
@pytest.mark.parametrize("sigma_scale", [0.125, (0.3, 0.5, 1.0)])
def test_gaussian_and_floor_reproduce_monais_importance_map(size, sigma_scale):
    vectors = windows.separable_window("gaussian", size, sigma_scale=sigma_scale)
    floor = windows.monai_floor(vectors)
    ours = (vectors[0][:, None, None] * vectors[1][None, :, None] * vectors[2][None, None, :]).clamp(
        min=floor
    )
    theirs = compute_importance_map(size, mode="gaussian", sigma_scale=sigma_scale, dtype=torch.float64)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)


def test_constant_window_and_floor():
    vectors = windows.separable_window("constant", (3, 4, 5))
    assert all(torch.equal(w, torch.ones(n, dtype=torch.float64)) for w, n in zip(vectors, (3, 4, 5)))
    assert windows.monai_floor(vectors) == 1.0
    ours = torch.einsum("i,j,k->ijk", *vectors).clamp(min=windows.monai_floor(vectors))
    theirs = compute_importance_map((3, 4, 5), mode="constant", dtype=torch.float64)
    assert torch.equal(ours, theirs)


def test_user_vectors_are_checked():
    w = windows.separable_window([[1, 2], torch.ones(3), (0.0, 1.0, 0.5, 0.0)], (2, 3, 4))
    assert [v.tolist() for v in w] == [[1.0, 2.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.5, 0.0]]
    with pytest.raises(ValueError, match=r"mode\[1\]: expected a 1-D weight vector of length 3"):
        windows.separable_window([torch.ones(2), torch.ones(4), torch.ones(4)], (2, 3, 4))
    with pytest.raises(ValueError, match=r"mode\[0\]: expected finite weights >= 0"):
        windows.separable_window([torch.tensor([1.0, float("nan")]), torch.ones(3), torch.ones(4)], (2, 3, 4))
    with pytest.raises(ValueError, match=r"mode\[2\]: expected finite weights >= 0, not all zero"):
        windows.separable_window([torch.ones(2), torch.ones(3), torch.zeros(4)], (2, 3, 4))
    with pytest.raises(ValueError, match=r"mode\[1\]: expected finite weights >= 0"):
        windows.separable_window([torch.ones(2), torch.tensor([1.0, -1.0, 1.0]), torch.ones(4)], (2, 3, 4))
    with pytest.raises(ValueError, match="mode: expected 3 1-D weight vectors"):
        windows.separable_window([torch.ones(2)], (2, 3, 4))


def test_bad_window_arguments():
    with pytest.raises(ValueError, match=r"order: expected a B-spline order in 0\.\.3"):
        windows.bspline(8, 4)
    with pytest.raises(ValueError, match=r"n: expected an integer in \[1, 2147483647\], got 0"):
        windows.spline(0)
    with pytest.raises(ValueError, match="n: expected an integer"):
        windows.bspline(10**30)
    with pytest.raises(TypeError, match=r"dtype: expected a floating-point torch\.dtype, got torch\.int64"):
        windows.spline(5, dtype=torch.int64)
    with pytest.raises(TypeError, match=r"dtype: expected a floating-point torch\.dtype, got 'float32'"):
        windows.gaussian(5, dtype="float32")
    for bad in (10**400, True, math.nan):
        with pytest.raises(ValueError, match="sigma_scale: expected a finite number > 0"):
            windows.gaussian(8, bad)
    with pytest.raises(TypeError, match=r"mode\[0\]: expected a 1-D sequence of 3 real weights, got 'sp"):
        windows.separable_window(("spline",) * 3, (3, 3, 3))
    with pytest.raises(TypeError, match="w: expected a 1-D sequence of 3 real weights"):
        windows.check_vector("w", [None] * 3, 3)
    with pytest.raises(TypeError, match=r"w: expected real weights, got torch\.complex64 values"):
        windows.check_vector("w", torch.tensor([1j, 1, 1]), 3)
    with pytest.raises(TypeError, match="w: expected real weights, got complex128 values"):
        windows.check_vector("w", np.array([1j, 1, 1]), 3)
    with pytest.raises(ValueError, match="image_size, roi_size, overlap: expected one value per axis each"):
        windows.scan_interval((10, 10, 10), (4, 4), (0.5,))
    for overlap in (-1.0, 1.0, math.nan):
        with pytest.raises(ValueError, match=r"overlap: expected numbers in \[0, 1\)"):
            windows.grid_starts((10,), (4,), (overlap,))
    for dtype in (torch.float32, None):  # an int beyond float64, not an OverflowError or inf
        with pytest.raises(ValueError, match=r"cval: 1000.* overflows float64"):
            _validate.check_cval(10**400, dtype)
    with pytest.raises(ValueError, match="interval: expected an integer"):
        windows.window_starts(10, 4, 0)
    with pytest.raises(ValueError, match="sigma_scale: expected a finite number > 0"):
        windows.gaussian(8, 0.0)
    with pytest.raises(ValueError, match="mode: expected one of"):
        windows.axis_window("hann", 8)
    with pytest.raises(ValueError, match="sigma_scale: expected one value or 3"):
        windows.separable_window("gaussian", (4, 4, 4), sigma_scale=(0.1, 0.2))


def test_window_arguments_of_every_numeric_kind():
    """NumPy and 0-d tensor sizes and sigma_scales are read as numbers; a tiny sigma gives 1 at the
    centre and 0 elsewhere (not 0/0), a huge one ones; a list of Python floats keeps float64."""
    assert torch.equal(windows.bspline(np.int64(4)), windows.bspline(4))
    assert torch.equal(windows.bspline(torch.tensor(4)), windows.bspline(4))
    assert torch.equal(windows.gaussian(4, np.float32(0.25)), windows.gaussian(4, float(np.float32(0.25))))
    assert torch.equal(windows.gaussian(4, torch.tensor(0.25)), windows.gaussian(4, 0.25))
    assert windows.gaussian(3, 1e-170).tolist() == [0.0, 1.0, 0.0]
    assert windows.gaussian(5, 1e300).tolist() == [1.0] * 5
    assert windows.check_vector("w", [0.1, 1e-50, 1e39], 3).tolist() == [0.1, 1e-50, 1e39]
    # the caller's items stride as MONAI's arithmetic on them does (float32 overlaps, NumPy rois)
    for roi, overlap in (
        ((10,), np.array([0.1], np.float32)),
        ((10,), torch.tensor([0.1])),
        ((np.int64(10),), (np.float32(0.1),)),
    ):
        assert windows.scan_interval((37,), roi, overlap) == _get_scan_interval((37,), roi, 1, overlap)


def test_grid_starts_match_monai(rng):
    for _ in range(200):
        dims = int(torch.randint(1, 4, (1,), generator=rng))
        roi = torch.randint(1, 12, (dims,), generator=rng).tolist()
        image = [r + int(torch.randint(0, 30, (1,), generator=rng)) for r in roi]
        overlap = [round(float(torch.rand(1, generator=rng)) * 0.95, 3) for _ in range(dims)]
        interval = _get_scan_interval(image, roi, dims, overlap)
        assert windows.scan_interval(image, roi, overlap) == interval
        expected = sorted({tuple(s.start for s in sl) for sl in dense_patch_slices(image, roi, interval)})
        ours = windows.grid_starts(image, roi, overlap)
        assert sorted(itertools.product(*ours)) == expected
        assert list(itertools.product(*ours)) == [
            tuple(s.start for s in sl) for sl in dense_patch_slices(image, roi, interval)
        ]  # and in MONAI's order
