"""The Triton patch-fusion kernels (densefuse.kernels.patch_fuse) against densefuse.reference.

On the CPU they run under TRITON_INTERPRET=1 (tests/conftest.py) with the tile constants shrunk, so
that tiny volumes span many row tiles, x chunks and window chunks: windows hanging over every edge
(and some missing the volume), many windows on the same voxels, every dtype, the gather's bits,
the finaliser on masked channel blocks, window extraction in every padding mode, and the int32
limits. GPU tests (marker ``gpu``) compare the compiled kernels with the reference at the
benchmark's size and at odd sizes, and check offsets past 2**31 elements.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import requires_cuda

from densefuse import reference, windows

kp = pytest.importorskip("densefuse.kernels.patch_fuse")

WINDOW_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
KERNELS = {"scatter": kp.patch_scatter, "gather": kp.patch_gather}


@pytest.fixture
def small_tiles(monkeypatch):
    """Interpreter tiles of 128 elements, x chunks of 8 voxels, windows tested 4 at a time."""
    monkeypatch.setattr(kp, "_INTERPRETER_ELEMS", 128)
    monkeypatch.setattr(kp, "_INTERPRETER_BLOCK_X", 8)
    monkeypatch.setattr(kp, "_MIN_TILE_VOXELS", 8)
    monkeypatch.setattr(kp, "_BLOCK_N", 4)


def weights(rng, roi, dtype, device="cpu"):
    return [
        (torch.rand(r, generator=rng, dtype=torch.float64) + 0.05).to(device=device, dtype=dtype) for r in roi
    ]


def guarded(tensor, fill):
    """A contiguous copy of ``tensor`` inside a buffer with one guard item of ``fill`` on each side:
    (buffer, view). A kernel that touches memory outside the view changes or reads the guards."""
    buffer = torch.full((tensor.shape[0] + 2, *tensor.shape[1:]), fill, dtype=tensor.dtype)
    buffer[1:-1] = tensor
    return buffer, buffer[1:-1]


def edge_starts(size, roi):
    """Per axis: hanging over the low edge (by all but one voxel), flush, inside, flush with or hanging
    over the high edge, one voxel from missing it; a window longer than the axis covers both edges."""
    return [sorted({1 - r, -1, 0, max(s - r, 0) // 2, s - r, s - r + 1, s - 1}) for s, r in zip(size, roi)]


def run_both(kernel, acc, win, starts, w, floor):
    """(acc after the triton kernel, its flags, acc after the reference, its flags)."""
    ours, expected = acc.clone(), acc.clone()
    flags = KERNELS[kernel](ours, win, starts, *w, floor)
    oracle = reference.patch_gather if kernel == "gather" else reference.patch_scatter
    expected_flags = oracle(expected, win, starts, *w, floor)
    return ours, flags, expected, expected_flags


# ------------------------------------------------------------------------------- scatter and gather
@pytest.mark.parametrize("kernel", ["scatter", "gather"])
def test_windows_over_every_edge(small_tiles, kernel, rng):
    """Every edge position on every axis, a NaN outside the volume (never read) and an Inf inside,
    windows that miss the volume or name a batch item out of range, guards around acc and windows:
    values and flags as the reference, nothing touched outside acc."""
    batch, channels, size, roi = 2, 1, (5, 9, 17), (7, 5, 11)  # rz > D: windows cover both z edges
    grid = edge_starts(size, roi)
    corners = [(0, -6, -4, -10), (1, 0, 0, 0)]  # see the NaN and the Inf below
    corners += [(k % batch, *(g[k * p % len(g)] for g, p in zip(grid, (1, 3, 5)))) for k in range(7)]
    misses = [(0, size[0], 0, 0), (1, 0, -roi[1], 0), (0, 0, 0, size[2]), (-1, 0, 0, 0), (batch, 0, 0, 0)]
    starts = torch.tensor(corners + misses)
    win = torch.randn(len(starts), channels, *roi, generator=rng, dtype=torch.float64)
    win[0, :, 0, 0, 0] = float("nan")  # at (-6, -4, -10): outside the volume, never read
    win[1, 0, 1, 1, 1] = float("inf")  # at (1, 1, 1): inside
    _, win = guarded(win, float("nan"))
    acc = torch.randn(batch, channels, *size, generator=rng, dtype=torch.float64)
    acc_buffer, ours = guarded(acc, 7.0)
    w = weights(rng, roi, acc.dtype)
    flags = KERNELS[kernel](ours, win, starts, *w, 0.2)
    expected = acc.clone()
    oracle = reference.patch_gather if kernel == "gather" else reference.patch_scatter
    expected_flags = oracle(expected, win, starts, *w, 0.2)
    assert flags.tolist() == expected_flags.tolist() == [1, len(misses)]
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert (acc_buffer[[0, -1]] == 7.0).all()


@pytest.mark.parametrize("acc_dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("win_dtype", WINDOW_DTYPES, ids=str)
def test_every_dtype(acc_dtype, win_dtype, rng):
    size, roi = (4, 6, 7), (3, 4, 5)
    win = torch.randn(5, 2, *roi, generator=rng).to(win_dtype)
    starts = torch.tensor([[0, -1, 0, 3], [1, 2, 3, -2], [0, 0, 2, 0], [1, 1, -1, 4], [0, 3, 5, 6]])
    w = weights(rng, roi, acc_dtype)
    acc = torch.randn(2, 2, *size, generator=rng, dtype=acc_dtype)
    tol = 1e-12 if acc_dtype == torch.float64 else 1e-6
    for kernel in KERNELS:
        ours, flags, expected, _ = run_both(kernel, acc, win, starts, w, 0.0)
        assert flags.tolist() == [0, 0]
        torch.testing.assert_close(ours, expected, rtol=tol, atol=tol)


def test_many_windows_on_the_same_voxels(small_tiles, rng):
    """24 windows within a voxel of each other: the scatter's atomics add up, and the gather sums
    each voxel in window order, which gives the reference gather's bits, on every run."""
    size, roi, count = (4, 6, 10), (3, 5, 9), 24
    starts = torch.stack(
        [torch.zeros(count, dtype=torch.int64)]
        + [torch.randint(-1, 2, (count,), generator=rng) for _ in roi],
        1,
    )
    win = torch.randn(count, 1, *roi, generator=rng).to(torch.float16)
    w = weights(rng, roi, torch.float32)
    acc = torch.randn(1, 1, *size, generator=rng)
    scattered, _, expected, _ = run_both("scatter", acc, win, starts, w, 0.1)
    torch.testing.assert_close(scattered, expected, rtol=1e-5, atol=1e-5)
    gathered, _, expected, _ = run_both("gather", acc, win, starts, w, 0.1)
    again = acc.clone()
    kp.patch_gather(again, win, starts, *w, 0.1)
    assert torch.equal(gathered, expected) and torch.equal(gathered, again)


def test_gather_tile_bounds_miss_no_window(small_tiles, rng):
    """Tiles of 32 rows, some inside one plane of 37 rows: windows through every plane, starting at
    every row from one above the plane on, pass the tile bounding-box tests (the reference's bits)."""
    size, roi = (3, 37, 4), (3, 2, 3)
    starts = torch.tensor([(0, 0, y, y % 5 - 2) for y in range(-1, size[1])])
    win = torch.randn(len(starts), 1, *roi, generator=rng)
    w = weights(rng, roi, torch.float32)
    gathered, flags, expected, _ = run_both("gather", torch.zeros(1, 1, *size), win, starts, w, 0.0)
    assert flags.tolist() == [0, 0] and torch.equal(gathered, expected)


def test_no_windows_is_a_no_op():
    acc = torch.ones(1, 2, 3, 3, 3)
    for kernel in KERNELS.values():
        flags = kernel(
            acc, torch.zeros(0, 2, 2, 2, 2), torch.zeros(0, 4, dtype=torch.int64), *[torch.ones(2)] * 3, 0
        )
        assert flags.tolist() == [0, 0] and torch.equal(acc, torch.ones(1, 2, 3, 3, 3))


# ---------------------------------------------------------------------------------------- finalise
@pytest.mark.parametrize("floor", [0.0, 0.3])
def test_finalize_over_tiles_and_channel_blocks(small_tiles, floor, rng):
    """5 classes (a block of 8 channels, 3 masked), a grid over every edge with uncovered voxels, NaN
    guards around acc: every activation and output as the reference; normalize in place equals
    finalize and writes nothing outside acc."""
    size, roi = (3, 4, 11), (2, 3, 6)
    starts = [torch.tensor(s) for s in ([-1, 1], [-2, 1, 3], [-3, 8])]  # x in [3, 8) uncovered
    w = weights(rng, roi, torch.float64)
    _, acc = guarded(torch.randn(1, 5, *size, generator=rng, dtype=torch.float64), float("nan"))
    for activation, output in [(0, 0), (1, 0), (2, 0), (1, 1), (2, 1)]:
        ours = kp.patch_finalize(acc, *starts, *w, floor, activation, output, 0.4)
        expected = reference.patch_finalize(acc, *starts, *w, floor, activation, output, 0.4)
        assert ours.dtype == expected.dtype and ours.shape == expected.shape
        torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    buffer, inplace = guarded(acc, 7.0)
    kp.patch_normalize(inplace, *starts, *w, floor, 2)
    assert torch.equal(inplace, kp.patch_finalize(acc, *starts, *w, floor, 2, 0, 0.0))
    assert (buffer[[0, -1]] == 7.0).all()


def test_normalizer_with_a_floor_is_the_references_bits(rng):
    """Float32, MONAI's clamp: the per-window weights summed in grid order, as the reference."""
    size, roi = (9, 8, 10), (4, 4, 4)
    starts = [torch.tensor(s) for s in ([0, 2, 4, 5], [0, 2, 4], [0, 3, 6])]
    w = [windows.gaussian(r, dtype=torch.float32) for r in roi]
    acc = torch.rand(1, 1, *size, generator=rng) + 1
    ours = kp.patch_finalize(acc, *starts, *w, windows.monai_floor(w), 0, 0, 0.0)
    assert torch.equal(ours, reference.patch_finalize(acc, *starts, *w, windows.monai_floor(w), 0, 0, 0.0))


def test_argmax_ties_pick_the_first_class():
    acc = torch.zeros(1, 3, 2, 2, 4)
    acc[:, 1:, :, :, 1] = 2.0  # classes 1 and 2 tie
    acc[:, 0, :, :, 2] = -1.0  # classes 1 and 2 tie at 0
    one = torch.ones(2)
    grid = [torch.tensor([0])] * 2 + [torch.tensor([0, 2])]
    labels = kp.patch_finalize(acc, *grid, one, one, one, 0.0, 2, 1, 0.5)
    assert labels[0, 0, 0, 0].tolist() == [0, 1, 1, 0]


NAN_COLUMNS = [  # per x column, the values of the 5 classes (a block of 8 channels, 3 masked)
    [1.0, float("inf"), 0.0, float("nan"), 2.0],  # NaN after an Inf: the NaN
    [float("nan"), 1.0, 2.0, 3.0, 4.0],  # NaN first
    [0.0, 1.0, float("nan"), 3.0, float("nan")],  # two NaNs: the first
    [0.0, 1.0, 2.0, 3.0, float("nan")],  # NaN in the last class
    [float("nan")] * 5,
    [float("-inf"), 3.0, 3.0, float("-inf"), 1.0],  # no NaN: the first tie
]


def test_argmax_mask_with_nan_is_torchs():
    """With value checks off NaN can reach the finaliser: NaN wins, the first NaN (torch.argmax, the
    reference, the cpp kernel); compiled (on a GPU) and interpreted Triton alike."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    acc = torch.tensor(NAN_COLUMNS, device=device).T.reshape(1, 5, 1, 1, len(NAN_COLUMNS))
    one, grid = torch.ones(1, device=device), [torch.tensor([0], device=device)] * 2
    x_grid = torch.arange(len(NAN_COLUMNS), device=device)
    labels = kp.patch_finalize(acc, *grid, x_grid, one, one, one, 0.0, 2, 1, 0.5)
    assert labels.flatten().tolist() == [3, 0, 2, 4, 0, 1] == acc.argmax(dim=1).flatten().tolist()
    assert torch.equal(labels, reference.patch_finalize(acc, *grid, x_grid, one, one, one, 0.0, 2, 1, 0.5))


# ----------------------------------------------------------------------------------------- extract
@pytest.mark.parametrize("mode", range(4), ids=list(reference.PAD_MODES))
@pytest.mark.parametrize("dtype", WINDOW_DTYPES, ids=str)
def test_extract_over_every_edge(small_tiles, mode, dtype, rng):
    """Every edge position per axis (windows longer than z and x), far outside (reflect folds more
    than once), a batch index out of range (cval), a strided volume, guards around out: the
    reference's bits, nothing written outside out."""
    size, roi = (5, 9, 7), (7, 5, 11)
    volume = torch.randn(2, 3, *size[::-1], generator=rng, dtype=torch.float64).to(dtype).transpose(2, 4)
    grid = edge_starts(size, roi)
    corners = [(k % 2, *(g[k * p % len(g)] for g, p in zip(grid, (1, 3, 5)))) for k in range(9)]
    corners += [(1, -20, 13, 25), (2, 0, 0, 0)]
    starts = torch.tensor(corners)
    buffer, out = guarded(torch.empty(len(corners), 3, *roi, dtype=dtype), 7.0)
    kp.patch_extract(out, volume, starts, mode, -1.25)
    expected = torch.empty_like(out)
    reference.patch_extract(expected, volume, starts, mode, -1.25)
    assert torch.equal(out, expected)
    assert (buffer[[0, -1]] == 7.0).all()


# ------------------------------------------------------------------------------------- index limits
def test_offsets_that_do_not_fit_int32_are_clear_errors():
    """Checked before any launch (meta tensors: nothing is allocated)."""
    meta = dict(device="meta")
    one = torch.ones(1, **meta)
    starts = torch.zeros(1, 4, dtype=torch.int64, **meta)
    plane = torch.empty(1, 1, 2, 2**16, 2**16, **meta)  # a plane of 2**32 voxels
    with pytest.raises(ValueError, match=r"acc: tile offsets .* exceeds the int32 tile offsets"):
        kp.patch_scatter(plane, torch.empty(1, 1, 1, 1, 1, **meta), starts, one, one, one, 0.0)
    huge = torch.empty(1, 1, 2048, 1024, 1024, **meta)  # a window of 2**31 voxels
    roi = [torch.ones(n, **meta) for n in huge.shape[2:]]
    with pytest.raises(ValueError, match="windows: voxels per window"):
        kp.patch_gather(torch.empty(1, 1, 4, 4, 4, **meta), huge, starts, *roi, 0.0)
    wide = torch.empty(1, 1, 1, 1, 2**31 - 1, **meta)
    grid = [torch.zeros(1, dtype=torch.int64, **meta)] * 3
    with pytest.raises(ValueError, match="acc: size W plus the window size"):
        kp.patch_finalize(wide, *grid, one, one, torch.ones(2, **meta), 0.0, 0, 0, 0.5)
    long = torch.empty(1, 1, 1, 1, 2**30 + 1, **meta)  # reflect's period 2 (W - 1) = 2**31
    with pytest.raises(ValueError, match=r"volume: reflect period 2 \(size W - 1\)"):
        kp.patch_extract(torch.empty(1, 1, 1, 1, 4, **meta), long, starts, 1, 0.0)


@pytest.mark.parametrize("kind", ["scatter", "gather", "finalize"])
def test_gpu_tiles_are_powers_of_two_within_budget(kind):
    """The H100 tile choices (channels: the power-of-two channel block of the finaliser)."""
    cuda = torch.device("cuda")
    for (rows, width), channels, dtype in itertools.product(
        [(96 * 96, 96), (192 * 224, 192), (7, 3), (1, 1000)], [1, 8, 64], [torch.float32, torch.float64]
    ):
        block_r, block_x, num_warps = kp._tile(rows, width, cuda, dtype, kind, channels)
        assert block_x >= 4 and block_r >= 1 and 1 <= num_warps <= 8
        assert block_r & (block_r - 1) == 0 and block_x & (block_x - 1) == 0
        assert block_r * block_x * channels <= max(kp._GPU_ELEMS, kp._MIN_TILE_VOXELS * channels)


# ---------------------------------------------------------------------------------------------- GPU
def _grid_case(rng, size, roi, channels, win_dtype, device):
    """MONAI's grid over ``size`` (overlap 0.5, batch 2), random window values, gaussian weights."""
    grid = windows.grid_starts(size, roi, (0.5,) * 3)
    corners = [(b, *c) for b in range(2) for c in itertools.product(*grid)]
    win = torch.randn(len(corners), channels, *roi, generator=rng).to(device=device, dtype=win_dtype)
    return grid, torch.tensor(corners, device=device), win


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("win_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "shape", [((192, 224, 192), (96, 96, 96), 2), ((37, 41, 43), (16, 20, 24), 3)], ids=["bench", "odd"]
)
def test_cuda_matches_reference(shape, acc_dtype, win_dtype, rng):
    size, roi, channels = shape
    grid, starts, win = _grid_case(rng, size, roi, channels, win_dtype, "cuda")
    w = [windows.gaussian(r, dtype=acc_dtype, device="cuda") for r in roi]
    floor = windows.monai_floor(w)
    expected = torch.zeros(2, channels, *size, dtype=torch.float64, device="cuda")
    reference.patch_scatter(expected, win, starts, *[v.double() for v in w], floor)
    tol = 1e-12 if acc_dtype == torch.float64 else 1e-5
    runs = []
    for kernel in ("scatter", "gather", "gather"):
        acc = torch.zeros(2, channels, *size, dtype=acc_dtype, device="cuda")
        assert KERNELS[kernel](acc, win, starts, *w, floor).tolist() == [0, 0]
        torch.testing.assert_close(acc, expected.to(acc_dtype), rtol=tol, atol=tol)
        runs.append(acc)
    assert torch.equal(runs[1], runs[2])
    acc = runs[0]
    axis_starts = [torch.tensor(s, device="cuda") for s in grid]
    for activation, output in [(0, 0), (1, 0), (2, 0), (1, 1), (2, 1)]:
        ours = kp.patch_finalize(acc, *axis_starts, *w, floor, activation, output, 0.5)
        ref = reference.patch_finalize(acc, *axis_starts, *w, floor, activation, output, 0.5)
        if output == 0:
            torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)
        else:  # a value within rounding of the threshold, or a near tie, may flip
            assert (ours != ref).float().mean() < 1e-5
    kp.patch_normalize(acc, *axis_starts, *w, floor, 2)
    torch.testing.assert_close(acc, reference.patch_finalize(runs[1], *axis_starts, *w, floor, 2, 0, 0.0))


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("mode", range(4), ids=list(reference.PAD_MODES))
def test_cuda_extract_matches_reference(mode, rng):
    """The benchmark's grid over a strided bf16 and a float32 volume: the reference's bits."""
    size, roi = (37, 41, 43), (16, 20, 48)  # x: roi larger than the volume
    grid = windows.grid_starts(size, roi, (0.5,) * 3)
    starts = torch.tensor(
        [(b, z - 3, y - 5, x - 2) for b in range(2) for z, y, x in itertools.product(*grid)]
    )
    for dtype in (torch.float32, torch.bfloat16):
        volume = torch.randn(2, 3, *size, generator=rng).to(dtype)
        ours = torch.empty(len(starts), 3, *roi, dtype=dtype, device="cuda")
        kp.patch_extract(
            ours, volume.cuda().transpose(3, 4).contiguous().transpose(3, 4), starts.cuda(), mode, 0.5
        )
        expected = torch.empty(len(starts), 3, *roi, dtype=dtype)
        reference.patch_extract(expected, volume, starts, mode, 0.5)
        assert torch.equal(ours.cpu(), expected)


@requires_cuda
@pytest.mark.gpu
def test_cuda_offsets_past_int32():
    """acc of 2**31 + 2**26 elements: windows in the last channel's last planes land right."""
    size = (1024, 1024, 1088)
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs a GPU with 24 GiB")
    acc = torch.zeros(1, 2, *size, device="cuda")
    assert acc.numel() > 2**31
    roi = (4, 8, 16)
    starts = torch.tensor([[0, size[0] - 3, size[1] - 8, size[2] - 16]], device="cuda")
    win = torch.ones(1, 2, *roi, device="cuda")
    w = [torch.ones(r, device="cuda") for r in roi]
    for kernel in KERNELS.values():
        assert kernel(acc, win, starts, *w, 0.0).tolist() == [0, 0]
    corner = acc[0, 1, -3:, -8:, -16:]
    assert torch.equal(corner, torch.full_like(corner, 2.0))
    assert acc.sum().item() == 2 * 2 * 3 * 8 * 16
    grid = [torch.tensor([s], device="cuda") for s in starts[0, 1:].tolist()]
    mask = kp.patch_finalize(acc, *grid, *w, 0.0, 0, 1, 1.5)
    assert mask[0, 1, -3:, -8:, -16:].all() and mask.sum().item() == 2 * 3 * 8 * 16
