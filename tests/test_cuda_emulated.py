"""The CUDA fusion kernels (csrc/cuda/patch_fuse.cu) run on the CPU, one emulated thread after another
(tests/cuda_emulation.cpp), against densefuse.reference.

This checks what each thread does (indexing, window placement, the gather's first-window owners,
padding, the finaliser's arithmetic) on machines without a GPU. Concurrency, the sm_90 vector
atomics and speed are left to the GPU tests (test_patch_fuse.py, marker gpu). The module is built
with torch.utils.cpp_extension (~1 minute) where the CUDA headers are installed; elsewhere it skips.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from test_patch_fuse import (
    WINDOW_DTYPES,
    grid_limit_case,
    random_case,
    random_starts,
    tile_edge_case,
    unsorted_grid_case,
    vector_extract_case,
)

from densefuse import reference

ROOT = Path(__file__).resolve().parents[1]
MODES = list(reference.PAD_MODES)


def cuda_include() -> str | None:
    """The CUDA toolkit's include folder (cuda_runtime_api.h, cuda_fp16.h), if installed."""
    nvcc = shutil.which("nvcc")
    roots = [os.environ.get("CUDA_HOME"), "/usr/local/cuda", nvcc and str(Path(nvcc).resolve().parents[1])]
    for root in filter(None, roots):
        if (Path(root) / "include" / "cuda_fp16.h").exists():
            return str(Path(root) / "include")
    return None


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    include = cuda_include()
    if include is None:
        pytest.skip("needs the CUDA headers (cuda_runtime_api.h, cuda_fp16.h)")
    from torch.utils.cpp_extension import load

    return load(
        "densefuse_cuda_emulation",
        [str(ROOT / "tests" / "cuda_emulation.cpp")],
        extra_include_paths=[str(ROOT / "csrc"), include],
        extra_cflags=["-O1", "-std=c++17", "-w"],
        build_directory=str(tmp_path_factory.mktemp("cuda_emulation")),  # torch's cache misses .cu edits
    )


def with_misses(win, starts):
    """Two more windows that are skipped: a batch index outside the volume, a window past its end."""
    extra = torch.tensor([[starts[:, 0].max() + 1, 0, 0, 0], [0, 10**6, 0, 0]])
    return torch.cat([win, win[:2]]), torch.cat([starts, extra])


@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("win_dtype", WINDOW_DTYPES, ids=str)
@pytest.mark.parametrize("floor", [0.0, 0.1])
def test_gather_is_the_reference_bit_for_bit(emulated, acc_dtype, win_dtype, floor, rng):
    win, starts, weights = random_case(rng, 2, 3, (9, 11, 13), (4, 5, 6), 40, win_dtype)
    win[3, 1, 2, 2, 2] = float("nan")
    win, starts = with_misses(win, starts)
    weights = [w.to(acc_dtype) for w in weights]
    acc = torch.randn(2, 3, 9, 11, 13, generator=rng, dtype=torch.float64).to(acc_dtype)
    expected = acc.clone()
    expected_flags = reference.patch_gather(expected, win, starts, *weights, floor)
    flags = emulated.scatter(acc, win, starts, *weights, floor, True)
    assert flags.tolist() == expected_flags.tolist()
    torch.testing.assert_close(acc, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("width", [64, 66, 67])
@pytest.mark.parametrize("floor", [0.0, 0.1])
def test_scatter_matches_the_reference(emulated, acc_dtype, width, floor, rng):
    win, starts, weights = random_case(rng, 2, 3, (9, 11, width), (4, 5, 33), 30, torch.float16)
    win[0, 0, 0, 0, 0] = float("inf")
    win, starts = with_misses(win, starts)
    weights = [w.to(acc_dtype) for w in weights]
    acc = torch.zeros(2, 3, 9, 11, width, dtype=acc_dtype)
    expected = torch.zeros(2, 3, 9, 11, width, dtype=torch.float64)
    exact = [w.double() for w in weights]
    expected_flags = reference.patch_scatter(expected, win.double(), starts, *exact, floor)
    flags = emulated.scatter(acc, win, starts, *weights, floor, False)
    assert flags.tolist() == expected_flags.tolist()
    torch.testing.assert_close(acc.double(), expected, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", WINDOW_DTYPES, ids=str)
def test_extract_is_the_reference(emulated, mode, dtype, rng):
    volume = torch.randn(2, 3, 5, 7, 6, generator=rng, dtype=torch.float64).to(dtype)
    roi = (4, 9, 5)  # y: larger than the volume
    starts = random_starts(rng, 17, 2, (5, 7, 6), roi, reach=9)
    starts[0, 0] = 7  # a batch index outside the volume: reads cval
    expected = torch.empty(17, 3, *roi, dtype=dtype)
    reference.patch_extract(expected, volume, starts, reference.PAD_MODES[mode], 1.7)
    strided = volume.transpose(2, 4).contiguous().transpose(2, 4)  # x is not the fastest axis
    out = torch.full_like(expected, float("nan"))
    emulated.extract(out, strided, starts, reference.PAD_MODES[mode], 1.7)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", WINDOW_DTYPES, ids=str)
def test_extract_copies_inner_windows_in_whole_vectors(emulated, mode, dtype, rng):
    """Windows inside along y and x at an aligned x are copied 16 bytes at a time; the others pad."""
    volume, starts, expected = vector_extract_case(rng, dtype, reference.PAD_MODES[mode])
    out = torch.full_like(expected, float("nan"))
    emulated.extract(out, volume, starts, reference.PAD_MODES[mode], -2.5)
    assert torch.equal(out, expected)
    shifted = torch.cat([volume[..., :1], volume], dim=-1)[..., 1:]  # the same values, misaligned rows
    out.fill_(float("nan"))
    emulated.extract(out, shifted, starts, reference.PAD_MODES[mode], -2.5)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("floor", [0.0, 0.05])
@pytest.mark.parametrize("activation", [0, 1, 2], ids=["none", "sigmoid", "softmax"])
def test_finalize_matches_the_reference(emulated, acc_dtype, floor, activation, rng):
    """Probabilities (out of place and in place) and masks; x = 0 is covered by no window (0 out), a
    tie goes to the first class and a NaN wins the argmax."""
    size, roi = (9, 10, 11), (4, 5, 6)
    grid = [torch.tensor(s) for s in ([-1, 2, 5, 7], [0, 3, 5], [1, 4, 6])]
    weights = [(torch.rand(r, generator=rng, dtype=torch.float64) + 0.05).to(acc_dtype) for r in roi]
    acc = (torch.randn(2, 4, *size, generator=rng, dtype=torch.float64) * 3).to(acc_dtype)
    acc[0, :, 1, 1, 1] = 0.25
    acc[1, 2, 2, 2, 2] = float("nan")
    for output in (0, 1):
        expected = reference.patch_finalize(acc, *grid, *weights, floor, activation, output, 0.5)
        out = torch.empty_like(expected)
        emulated.finalize(acc, out, *grid, *weights, floor, activation, output, 0.5)
        if output == 1 or activation == 0:  # the same divisions: the same bits
            torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
        else:  # exp rounds differently from torch's
            torch.testing.assert_close(out, expected, rtol=2e-6, atol=1e-7, equal_nan=True)
        if output == 0:
            in_place = acc.clone()
            emulated.finalize(in_place, in_place, *grid, *weights, floor, activation, 0, 0.5)
            torch.testing.assert_close(in_place, out, rtol=0, atol=0, equal_nan=True)


def assert_finalize_is_the_reference(emulated, acc, grid, weights, floor, output=0):
    """The emulated finaliser (activation none) gives reference.patch_finalize's bits; out starts NaN,
    so a voxel left unwritten fails too."""
    expected = reference.patch_finalize(acc, *grid, *weights, floor, 0, output, 0.5)
    out = torch.full_like(expected, float("nan")) if output == 0 else torch.full_like(expected, 255)
    emulated.finalize(acc, out, *grid, *weights, floor, 0, output, 0.5)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    return expected


@pytest.mark.parametrize("floor", [0.0, 0.05])
def test_finalize_with_unsorted_and_repeated_grid_starts(emulated, floor, rng):
    """Grid starts out of order, repeated, and up to five covering a coordinate: every covering
    window, in grid order, and no other."""
    acc, grid, weights = unsorted_grid_case(rng)
    for output in (0, 1):
        assert_finalize_is_the_reference(emulated, acc, grid, weights, floor, output)


@pytest.mark.parametrize("floor", [0.0, 0.05])
def test_finalize_with_many_windows_over_a_column(emulated, floor, rng):
    """Up to 12 windows cover a column x (13 starts along x): the reference's bits."""
    size, roi = (5, 6, 15), (3, 4, 12)
    grid = [torch.tensor([0, 2]), torch.tensor([0, 2]), torch.arange(-1, 4)]
    weights = [torch.rand(r, generator=rng, dtype=torch.float64) + 0.05 for r in roi]
    acc = torch.randn(2, 2, *size, generator=rng, dtype=torch.float64)
    for many in (grid[2], torch.arange(-1, 12)):
        assert_finalize_is_the_reference(emulated, acc, [*grid[:2], many], weights, floor)


@pytest.mark.parametrize("floor", [0.0, 0.05])
def test_finalize_windows_meeting_a_tile_in_one_row_or_column(emulated, floor, rng):
    """The finaliser works on tiles of 32 rows x 32 columns: windows that meet a tile only in its first
    or last row or column must still be found for it."""
    acc, grid, weights = tile_edge_case(rng)
    assert_finalize_is_the_reference(emulated, acc, grid, weights, floor)


@pytest.mark.parametrize("floor", [0.0, 0.05])
def test_finalize_past_the_grid_limit(emulated, floor, rng):
    """grid_limit_case: more tiles than a grid holds, so blocks take several (also a GPU test)."""
    acc, grid, weights = grid_limit_case(rng)
    expected = assert_finalize_is_the_reference(emulated, acc, grid, weights, floor)
    assert expected[0, 0, -1].abs().sum() > 0  # the last planes are covered


def test_windows_over_many_row_bands(emulated, rng):
    """Windows of 1500 rows span several blocks (row bands) per plane."""
    roi, size = (2, 1500, 3), (3, 1600, 4)
    volume = torch.randn(1, 2, *size, generator=rng)
    starts = torch.tensor([[0, 0, 0, 0], [0, 1, 90, 1], [0, -1, 100, -1]])
    expected, reflect = torch.empty(3, 2, *roi), reference.PAD_MODES["reflect"]
    reference.patch_extract(expected, volume, starts, reflect, 0.0)
    windows = torch.empty(3, 2, *roi)
    emulated.extract(windows, volume, starts, reflect, 0.0)
    assert torch.equal(windows, expected)
    weights = [torch.rand(r, generator=rng) + 0.05 for r in roi]
    for gather, oracle in ((False, reference.patch_scatter), (True, reference.patch_gather)):
        acc, ours = torch.zeros(1, 2, *size), torch.zeros(1, 2, *size)
        oracle(acc, expected, starts, *weights, 0.0)
        assert emulated.scatter(ours, windows, starts, *weights, 0.0, gather).tolist() == [0, 0]
        torch.testing.assert_close(ours, acc, rtol=1e-6, atol=1e-6)
