"""Weighted patch fusion: the ops behind sliding-window inference (DESIGN §3b).

    densefuse::patch_scatter_   acc += w * windows, one launch per batch of windows (atomics)
    densefuse::patch_gather_    the same sum, output-stationary (deterministic)
    densefuse::patch_normalize_ acc = act(acc / N) in place
    densefuse::patch_finalize   act(acc / N) as floats, or a uint8 mask (threshold / argmax)
    densefuse::patch_extract_   out = the windows of a volume at starts, padded outside it (the
                                gather-side twin of patch_scatter: reads the windows to predict)

acc is [B, C, D, H, W] float32/float64; windows [N, C, rz, ry, rx] any float dtype; starts [N, 4]
int64 (batch, z, y, x), windows may hang over the edge; the weight w = max(wz[i] wy[j] wx[k], floor)
is computed in-kernel from three 1-D vectors (densefuse.windows). N is the summed weight of the grid
windows covering a voxel: for floor == 0 the outer product of three 1-D sums. Math and edge cases:
densefuse.reference. These are inference ops: no autograd formula.

Backends: every op has the same plain-tensor signature in densefuse.reference (``torch``), in
densefuse.kernels.patch_fuse (``triton``) and as densefuse_ext::<name> in densefuse._C (``cpp`` and
``cuda``); a backend whose kernel is not written yet is skipped by default and gives a clear
RuntimeError when forced with use_backend().
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import operator
import threading
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from densefuse import reference
from densefuse.ops import _validate
from densefuse.ops._backend import Registry, available_backends, extension_ops

# On CUDA the C++ kernels come first: on an H100 a fusion-only sliding-window call took 0.97 ms with
# them, 2.05 ms with triton's, mostly host time (benchmarks/results/fusion-nvidia-h100-*-lease2-run3.json).
ORDER = {"cuda": ("cuda", "triton", "torch")}
OP_NAMES = ("patch_scatter", "patch_gather", "patch_normalize", "patch_finalize", "patch_extract")
ACC_DTYPES = (torch.float32, torch.float64)
EXTRACT_DTYPES = _validate.FLOAT_DTYPES  # the volume dtypes patch_extract reads


def _kernel_exists(name: str, backend: str) -> bool:
    """Whether ``backend`` has a kernel for op ``name`` (without importing triton)."""
    if backend in ("cpp", "cuda"):  # the extension registers some ops for the CPU dispatch key only
        return name in extension_ops().get("cpu" if backend == "cpp" else "cuda", ())
    if backend == "triton":
        return importlib.util.find_spec("densefuse.kernels.patch_fuse") is not None
    return backend == "torch"


def _loader(name: str, backend: str) -> Callable[[], Callable]:
    if backend == "triton":
        return lambda: getattr(importlib.import_module("densefuse.kernels.patch_fuse"), name)

    def load() -> Callable:
        _register_extension_fake(name)
        return getattr(torch.ops.densefuse_ext, name)

    return load


def _registry(name: str) -> Registry:
    loaders = {backend: _loader(name, backend) for backend in ("cpp", "cuda", "triton")}
    loaders["torch"] = lambda: getattr(reference, name)
    return Registry(name, loaders, has_kernel=lambda backend: _kernel_exists(name, backend), order=ORDER)


_scatter, _gather, _normalize, _finalize, _extract = (_registry(name) for name in OP_NAMES)


def implemented_backends(device_type: str) -> list[str]:
    """The backends available on ``device_type`` that have kernels for every patch-fusion op."""
    return [b for b in available_backends(device_type) if all(_kernel_exists(n, b) for n in OP_NAMES)]


def default_backend(device_type: str) -> str:
    """The backend the patch-fusion ops run on ``device_type`` unless one is forced (ORDER)."""
    return _scatter.default(device_type)


# ------------------------------------------------------------------------------------------ the ops
@torch.library.custom_op("densefuse::patch_scatter_", mutates_args=("acc",))
def patch_scatter_op(
    acc: Tensor, windows: Tensor, starts: Tensor, wz: Tensor, wy: Tensor, wx: Tensor, floor: float
) -> Tensor:
    """acc [B, C, D, H, W] += w * windows [N, C, rz, ry, rx] at starts [N, 4] -> flags int64 [2]."""
    return _scatter(acc.device)(acc, windows, starts, wz, wy, wx, floor)


@torch.library.custom_op("densefuse::patch_gather_", mutates_args=("acc",))
def patch_gather_op(
    acc: Tensor, windows: Tensor, starts: Tensor, wz: Tensor, wy: Tensor, wx: Tensor, floor: float
) -> Tensor:
    """patch_scatter_ computed output-stationary (bit-identical across runs) -> flags int64 [2]."""
    return _gather(acc.device)(acc, windows, starts, wz, wy, wx, floor)


@patch_scatter_op.register_fake
@patch_gather_op.register_fake
def _scatter_fake(acc, windows, starts, wz, wy, wx, floor):
    return acc.new_empty((2,), dtype=torch.int64)


@torch.library.custom_op("densefuse::patch_normalize_", mutates_args=("acc",))
def patch_normalize_op(
    acc: Tensor,
    starts_z: Tensor,
    starts_y: Tensor,
    starts_x: Tensor,
    wz: Tensor,
    wy: Tensor,
    wx: Tensor,
    floor: float,
    activation: int,
) -> None:
    """acc = act(acc / N) in place (0 where no window covers)."""
    _normalize(acc.device)(acc, starts_z, starts_y, starts_x, wz, wy, wx, floor, activation)


@patch_normalize_op.register_fake
def _normalize_fake(acc, starts_z, starts_y, starts_x, wz, wy, wx, floor, activation):
    return None


@torch.library.custom_op("densefuse::patch_finalize", mutates_args=())
def patch_finalize_op(
    acc: Tensor,
    starts_z: Tensor,
    starts_y: Tensor,
    starts_x: Tensor,
    wz: Tensor,
    wy: Tensor,
    wx: Tensor,
    floor: float,
    activation: int,
    output: int,
    threshold: float,
) -> Tensor:
    """act(acc / N) [B, C, ...] in acc's dtype (output 0), or a uint8 mask (output 1)."""
    impl = _finalize(acc.device)
    return impl(acc, starts_z, starts_y, starts_x, wz, wy, wx, floor, activation, output, threshold)


@patch_finalize_op.register_fake
def _finalize_fake(acc, starts_z, starts_y, starts_x, wz, wy, wx, floor, activation, output, threshold):
    if output == 0:
        return torch.empty_like(acc, memory_format=torch.contiguous_format)
    channels = 1 if activation == 2 else acc.shape[1]
    return acc.new_empty((acc.shape[0], channels, *acc.shape[2:]), dtype=torch.uint8)


@torch.library.custom_op("densefuse::patch_extract_", mutates_args=("out",))
def patch_extract_op(out: Tensor, volume: Tensor, starts: Tensor, padding: int, cval: float) -> None:
    """out [N, C, rz, ry, rx] = padded(volume [B, C, D, H, W]) windows at starts [N, 4], in place
    (padding: a reference.PAD_MODES code)."""
    _extract(volume.device)(out, volume, starts, padding, cval)


@patch_extract_op.register_fake
def _extract_fake(out, volume, starts, padding, cval):
    return None


_EXTENSION_FAKES = {
    "patch_scatter": _scatter_fake,
    "patch_gather": _scatter_fake,
    "patch_normalize": _normalize_fake,
    "patch_finalize": _finalize_fake,
    "patch_extract": _extract_fake,
}


_FAKES_REGISTERED: set[str] = set()
_FAKES_LOCK = threading.Lock()


def _register_extension_fake(name: str) -> None:
    """The fake kernel of densefuse_ext::<name> (the op's own, above), registered once (two threads may
    load an op at once) when the extension's kernel is first loaded: BatchExtract, BatchScatter and
    Finalizer call the extension's ops directly, and torch.compile(fullgraph=True) traces them with it."""
    with _FAKES_LOCK:
        if name not in _FAKES_REGISTERED:
            torch.library.register_fake(f"densefuse_ext::{name}", _EXTENSION_FAKES[name])
            _FAKES_REGISTERED.add(name)


# --------------------------------------------------------------------------------------- validation
def _check_acc(acc: object) -> Tensor:
    """acc as [B, C, D, H, W]: a [C, D, H, W] accumulator is read as B = 1 (a view: writes reach it)."""
    acc = _validate.check_tensor("acc", acc)
    if acc.dtype not in ACC_DTYPES:
        raise TypeError(f"acc: expected a float32/float64 accumulator, got {acc.dtype}")
    if acc.dim() not in (4, 5) or acc.numel() == 0:
        shape = tuple(acc.shape)
        raise ValueError(
            f"acc: expected a non-empty [B, C, D, H, W] or [C, D, H, W] tensor, got shape {shape}"
        )
    return acc if acc.dim() == 5 else acc[None]


def _check_float(name: str, tensor: Tensor) -> None:
    """Window values (and volumes) come in the four float dtypes the kernels read."""
    if tensor.dtype not in _validate.FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a float16/bfloat16/float32/float64 tensor, got {tensor.dtype}")


def _check_output(output: object) -> int:
    """The finaliser's output code (reference.FUSE_OUTPUTS) for "probabilities" or "mask"."""
    if output not in reference.FUSE_OUTPUTS:
        raise ValueError(f"output: expected one of {tuple(reference.FUSE_OUTPUTS)}, got {output!r}")
    return reference.FUSE_OUTPUTS[output]


def _check_finalize_acc(acc: Tensor, output: int, activation: int, inplace: bool) -> None:
    """An argmax mask is uint8 (at most 256 classes); in place needs probabilities in a contiguous acc."""
    if output == 1 and activation == 2 and acc.shape[1] > 256:
        raise ValueError(f"acc: an argmax mask is uint8, so at most 256 classes, got {acc.shape[1]}")
    if inplace and (output != 0 or not acc.is_contiguous()):
        raise ValueError("inplace: needs output='probabilities' and a contiguous acc")


def _check_windows(windows: object, acc: Tensor) -> Tensor:
    windows = _validate.check_tensor("windows", windows)
    _check_float("windows", windows)
    if windows.dim() != 5 or windows.shape[1] != acc.shape[1]:
        raise ValueError(
            f"windows: expected shape [N, {acc.shape[1]}, rz, ry, rx] (channels of acc), "
            f"got {tuple(windows.shape)}"
        )
    if min(windows.shape[2:]) < 1:
        raise ValueError(
            f"windows: window size must be >= 1 along every axis, got {tuple(windows.shape[2:])}"
        )
    if windows.device != acc.device:
        raise ValueError(f"windows: expected a tensor on {acc.device} like acc, got {windows.device}")
    return windows.contiguous()


def _check_small_device(name: str, tensor: Tensor, device: torch.device) -> None:
    """Small tensors may come from the CPU; anything on a third device is an error."""
    if tensor.device != device and tensor.device.type != "cpu":
        raise ValueError(f"{name}: expected a tensor on {device} (or the CPU), got {tensor.device}")


def _to_device(name: str, tensor: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    _check_small_device(name, tensor, device)
    if tensor.device != device or tensor.dtype != dtype:
        tensor = tensor.to(device=device, dtype=dtype)
    return tensor.contiguous()


def _check_starts(starts: object, acc: Tensor, count: int) -> Tensor:
    """starts as int64 [count, 4] on acc's device; [count, 3] corners (z, y, x) are read as batch 0."""
    starts = _validate.check_tensor("starts", starts)
    if starts.is_floating_point() or starts.is_complex() or starts.dtype == torch.bool:
        raise TypeError(f"starts: expected an integer tensor, got {starts.dtype}")
    if tuple(starts.shape) == (count, 3):
        starts = torch.cat([starts.new_zeros(count, 1), starts], dim=1)
    if tuple(starts.shape) != (count, 4):
        raise ValueError(
            f"starts: expected shape ({count}, 4) = (batch, z, y, x) per window (or ({count}, 3) = "
            f"(z, y, x) in batch 0), got {tuple(starts.shape)}"
        )
    return _to_device("starts", starts, acc.device, torch.int64)


def _is_bool(value: object) -> bool:
    """A Python, NumPy or torch boolean (NumPy's dtype kind "b")."""
    dtype = getattr(value, "dtype", None)
    return isinstance(value, bool) or dtype == torch.bool or getattr(dtype, "kind", None) == "b"


def _check_axis_starts(name: str, starts: object, acc: Tensor) -> Tensor:
    given = starts

    def error() -> ValueError:  # made only when raised: a tensor's repr reads it (a sync on a GPU)
        return ValueError(f"{name}: expected a 1-D sequence of integer window starts, got {given!r}")

    if not isinstance(starts, Tensor):
        try:
            values = list(starts)  # once: starts may be an iterator
        except TypeError:
            raise error() from None
        if any(_is_bool(s) for s in values):  # operator.index(True) is 1
            raise error()
        try:
            starts = torch.tensor([operator.index(s) for s in values], dtype=torch.int64)
        except (TypeError, OverflowError, RuntimeError, ValueError):  # not integers, or past int64
            raise error() from None
    if starts.dim() != 1 or starts.is_floating_point() or starts.is_complex() or starts.dtype == torch.bool:
        raise error()
    return _to_device(name, starts, acc.device, torch.int64)


def _check_floor(floor: object, dtype: torch.dtype) -> float:
    """floor as a finite float >= 0 that the accumulator's ``dtype`` holds (a larger one became inf in
    the kernels: every weight inf, and no flag said so)."""
    value = _validate.check_number("floor", floor)
    if value > torch.finfo(dtype).max:
        raise ValueError(f"floor: {floor!r} overflows the accumulator's dtype {dtype}")
    return value


def _check_weights(
    vectors: Sequence[object],
    lengths: Sequence[int] | None,
    acc: Tensor,
    check_values: bool = True,
    weights_checked: bool = False,
) -> list[Tensor]:
    """wz, wy, wx as 1-D vectors in acc's dtype on acc's device (lengths checked when given).
    ``acc`` may be any tensor of that dtype and device (it is not read).

    Their values must be finite and >= 0 (a NaN or negative weight would silently zero or corrupt the
    fused output): vectors on the CPU are checked before they move (no device sync); vectors already
    on acc's device cost one sync for the three, and are skipped when ``check_values`` is False. No
    value check when value checks are off (DENSEFUSE_CHECK_VALUES=0, torch.compile) or when the
    caller vouches for them (``weights_checked``: checked once for many calls).
    """
    names = ("wz", "wy", "wx")
    checked = []
    for i, (name, w) in enumerate(zip(names, vectors)):
        w = _validate.check_tensor(name, w)
        if not w.is_floating_point():
            raise TypeError(f"{name}: expected a float weight vector, got {w.dtype}")
        if w.dim() != 1 or w.numel() == 0 or (lengths is not None and w.numel() != lengths[i]):
            expected = "length >= 1" if lengths is None else f"length {lengths[i]} (the window size)"
            raise ValueError(f"{name}: expected a 1-D vector of {expected}, got shape {tuple(w.shape)}")
        _check_small_device(name, w, acc.device)
        checked.append(w if w.dtype == acc.dtype else w.to(acc.dtype))  # may overflow to Inf in acc's dtype
    if _validate.value_checks_enabled() and not weights_checked:
        tested = [(n, w) for n, w in zip(names, checked) if check_values or w.device.type == "cpu"]
        # per vector (values not finite and >= 0, the largest value), as float64: one sync for all
        stats = [
            torch.stack([(~(torch.isfinite(w) & (w >= 0))).sum().double(), w.max().double()])
            for _, w in tested
        ]
        on_device = [s for s in stats if s.device.type != "cpu"]
        synced = iter(torch.stack(on_device).tolist() if on_device else ())
        peaks = []
        for (name, _), stat in zip(tested, stats):
            bad, peak = stat.tolist() if stat.device.type == "cpu" else next(synced)
            if bad:
                raise ValueError(
                    f"{name}: expected finite weights >= 0, found {int(bad)} negative or NaN/Inf in "
                    f"acc's dtype {acc.dtype}"
                )
            peaks.append(peak)
        largest = torch.tensor(peaks, dtype=acc.dtype)  # the largest 3-D weight: rounding is monotone
        if len(peaks) == 3 and not torch.isfinite((largest[0] * largest[1]) * largest[2]):
            raise ValueError(f"wz, wy, wx: their largest product overflows acc's dtype {acc.dtype} ({peaks})")
    return [_to_device(name, w, acc.device, acc.dtype) for name, w in zip(names, checked)]


def check_patch_flags(
    flags: Tensor, what: str = "windows", source: Callable[[], str | None] | None = None
) -> None:
    """Raise for non-zero patch flags (int64 [2]: non-finite values, windows outside the volume).

    ``what`` names the source of the window values in the message; ``source()``, called only when
    there are NaN/Inf values, may name an input further back that holds them (the volume the windows
    were read from, say), which the message then blames. One device sync; skipped when value checks
    are off (DENSEFUSE_CHECK_VALUES=0, torch.compile).
    """
    if not _validate.value_checks_enabled():
        return
    bad_values, skipped = flags.tolist()
    if bad_values:
        origin = None if source is None else source()
        found = f"{what}: contains {bad_values} NaN/Inf values"
        if origin is not None:
            found = f"{origin}: contains NaN/Inf values ({bad_values} reached the fusion through the {what})"
        raise ValueError(f"{found}; DENSEFUSE_CHECK_VALUES=0 turns this check off")
    if skipped:
        raise ValueError(
            f"starts: {skipped} windows lie entirely outside the volume or have a batch index outside acc"
        )


# ------------------------------------------------------------------------------------ public wrappers
def patch_scatter(
    acc: Tensor,
    windows: Tensor,
    starts: Tensor,
    wz: Tensor,
    wy: Tensor,
    wx: Tensor,
    floor: float = 0.0,
    *,
    deterministic: bool | None = None,
    check_values: bool = True,
    weights_checked: bool = False,
) -> Tensor:
    """Add a batch of weighted windows into an accumulator, in place.

    acc[b, :, z+i, y+j, x+k] += max(wz[i] * wy[j] * wx[k], floor) * windows[n, :, i, j, k]
    for each window n with starts[n] = (b, z, y, x); the parts outside the volume are dropped.

    Args:
        acc: [B, C, D, H, W] (or [C, D, H, W]: B = 1) float32/float64, contiguous; modified in place.
        windows: [N, C, rz, ry, rx] float16/bfloat16/float32/float64 on acc's device.
        starts: [N, 4] integer (batch, z, y, x) (or [N, 3]: (z, y, x) in batch 0), on acc's device
            or the CPU; z, y, x may be negative or run past the end as long as each window overlaps
            the volume.
        wz, wy, wx: float 1-D weights of lengths rz, ry, rx (densefuse.windows), finite and >= 0
            (ValueError otherwise).
        floor: lower bound of the 3-D weight (0: separable, MONAI's clamp: windows.monai_floor).
        deterministic: use the output-stationary gather (same bits on every run); default
            torch.are_deterministic_algorithms_enabled(). Its work per voxel grows with the number
            of windows in the call (the CUDA C++ gather tests every window's corner per voxel): it
            is meant for batches of windows (sw_batch_size), not thousands in one call.
        check_values: raise ValueError for NaN/Inf window values (in the volume), windows that
            miss the volume and bad weights; False leaves that to the caller (check_patch_flags),
            saving a sync (weights on the CPU are still checked: that needs no sync). The window
            checks come from the kernel's flags: when they raise, acc already holds the sum (NaN
            included); the weight and argument checks raise before anything is written.
        weights_checked: the caller has checked that wz, wy, wx are finite and >= 0 in acc's dtype
            (once for the many batches of one inference): their values are not checked again.

    Returns flags int64 [2] on acc's device: (NaN/Inf window values added, windows skipped).
    """
    acc = _check_acc(acc)
    if not acc.is_contiguous():
        raise ValueError("acc: expected a contiguous tensor (it is written in place)")
    windows = _check_windows(windows, acc)
    starts = _check_starts(starts, acc, windows.shape[0])
    wz, wy, wx = _check_weights((wz, wy, wx), windows.shape[2:], acc, check_values, weights_checked)
    floor = _check_floor(floor, acc.dtype)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    op = patch_gather_op if deterministic else patch_scatter_op
    flags = op(acc, windows, starts, wz, wy, wx, floor)
    if check_values:
        check_patch_flags(flags)
    return flags


def patch_finalize(
    acc: Tensor,
    starts_z: Sequence[int] | Tensor,
    starts_y: Sequence[int] | Tensor,
    starts_x: Sequence[int] | Tensor,
    wz: Tensor,
    wy: Tensor,
    wx: Tensor,
    floor: float = 0.0,
    activation: str = "none",
    output: str = "probabilities",
    threshold: float = 0.5,
    *,
    inplace: bool = False,
    check_values: bool = True,
) -> Tensor:
    """The fused prediction v = acc / N from an accumulator filled by patch_scatter.

    N(z, y, x) sums max(wz wy wx, floor) over the windows of the grid starts_z x starts_y x starts_x
    (window sizes len(wz), len(wy), len(wx)) that cover the voxel; with floor == 0 it is the outer
    product of three 1-D sums, never a volume-sized map. Voxels no window covers (N below the
    smallest normal float) read 0 in every output.

    Args:
        acc: [B, C, D, H, W] float32/float64 (or [C, D, H, W]: so is the result, [1 or C, D, H, W]).
        starts_z, starts_y, starts_x: the per-axis window starts (densefuse.windows.grid_starts),
            in acc's coordinates (negative when the grid started in a padding).
        wz, wy, wx, floor: the weights given to patch_scatter.
        activation: "none", "sigmoid" or "softmax" (over C), applied to v.
        output: "probabilities": act(v) in acc's dtype [B, C, ...]; "mask": uint8, argmax over C
            [B, 1, ...] for softmax, [act(v) >= threshold] per channel [B, C, ...] otherwise.
        inplace: write act(v) into acc and return it (output "probabilities" only; acc contiguous).
        check_values: raise ValueError for negative or NaN/Inf weights on acc's device (one sync);
            False leaves that to the caller (weights on the CPU are checked anyway: no sync).
    """
    given, acc = acc, _check_acc(acc)
    axes = zip(("starts_z", "starts_y", "starts_x"), (starts_z, starts_y, starts_x))
    starts = [_check_axis_starts(name, s, acc) for name, s in axes]
    wz, wy, wx = _check_weights((wz, wy, wx), None, acc, check_values)
    floor = _check_floor(floor, acc.dtype)
    code = _validate.check_activation(activation, tuple(reference.ACTIVATIONS))
    out = _check_output(output)
    threshold = _validate.check_number("threshold", threshold, -math.inf)
    _check_finalize_acc(acc, out, code, inplace)
    if inplace:
        patch_normalize_op(acc, *starts, wz, wy, wx, floor, code)
        return given
    fused = patch_finalize_op(acc.contiguous(), *starts, wz, wy, wx, floor, code, out, threshold)
    return fused if given.dim() == 5 else fused[0]


# Window corners patch_extract accepts (check_values): start + window index stays far from int64's
# limits in every kernel's index arithmetic (the C++ kernels are exact for any int64 start).
_FARTHEST_START = 2**62


def _check_extract(
    volume: object, roi: Sequence[int], mode: str, cval: object
) -> tuple[Tensor, tuple[int, ...]]:
    """patch_extract's volume (as [B, C, D, H, W]) and roi, after checking them, mode and cval."""
    volume = _validate.check_tensor("volume", volume)
    _check_float("volume", volume)  # the EXTRACT_DTYPES
    if volume.dim() == 4:
        volume = volume[None]
    if volume.dim() != 5 or volume.numel() == 0:
        raise ValueError(
            f"volume: expected a non-empty [B, C, D, H, W] or [C, D, H, W] tensor, got {tuple(volume.shape)}"
        )
    sizes = _integers(roi)
    if sizes is None or len(sizes) != 3 or min(sizes) < 1:
        raise ValueError(f"roi: expected three integers >= 1 (rz, ry, rx), got {roi!r}")
    if mode not in reference.PAD_MODES:
        raise ValueError(f"mode: expected one of {tuple(reference.PAD_MODES)}, got {mode!r}")
    _validate.check_cval(cval, volume.dtype)
    return volume, sizes


def _check_apart(out: Tensor, volume: Tensor) -> None:
    """out must not share memory with volume: the kernels read volume while they write out. Not
    checked while torch.compile traces (its fake tensors have no memory to compare)."""
    if torch.compiler.is_compiling() or out.numel() == 0:
        return
    if out.untyped_storage().data_ptr() != volume.untyped_storage().data_ptr():
        return

    def span(t: Tensor) -> tuple[int, int]:  # the bytes t can touch in its storage
        size = t.element_size()
        last = sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if n > 0)
        return t.storage_offset() * size, (t.storage_offset() + last + 1) * size

    (a0, a1), (b0, b1) = span(out), span(volume)
    if a0 < b1 and b0 < a1:
        raise ValueError("out: overlaps the memory of volume, which the kernel reads while it writes out")


def _integers(value: object) -> tuple[int, ...] | None:
    """A sequence, 1-D array or 1-D tensor of integers (Python, NumPy or 0-d tensors; not bools) as a
    tuple of ints, else None."""
    items = _validate.values(value)
    ints = None if items is None else [_validate.as_int(v) for v in items]
    return None if ints is None or None in ints else tuple(ints)


def patch_extract(
    volume: Tensor,
    starts: Tensor,
    roi: Sequence[int],
    mode: str = "constant",
    cval: float = 0.0,
    *,
    out: Tensor | None = None,
    check_values: bool = True,
) -> Tensor:
    """Read a batch of windows from a volume: the gather-side twin of patch_scatter.

    out[n, c, i, j, k] = padded(volume)[b, c, z+i, y+j, x+k] for each window n with starts[n] =
    (b, z, y, x); windows may hang over any edge (or be larger than the volume) and read the padding
    there, computed per axis (the padded volume is never built): ``mode`` "constant" (``cval``, cast
    to the volume's dtype as Tensor.fill_ casts it), "reflect" (torch's, no repeated edge, continued
    periodically), "replicate" or "circular" (densefuse.reference.pad_index).

    Args:
        volume: [B, C, D, H, W] (or [C, D, H, W], read as B = 1) float16/bfloat16/float32/float64,
            any strides.
        starts: [N, 4] integer (batch, z, y, x) (or [N, 3]: (z, y, x) in batch 0), on volume's
            device or the CPU.
        roi: the window size (rz, ry, rx), each >= 1.
        out: [N, C, rz, ry, rx] contiguous, volume's dtype and device, written in place (a batch
            buffer reused from call to call); None: a new tensor.
        check_values: raise ValueError for batch indices outside [0, B) and corners beyond +-2**62
            (one sync where starts are on a GPU); False: windows of another batch index read cval.

    Returns out (or the new tensor) [N, C, rz, ry, rx] in volume's dtype: exact copies of the values.
    """
    volume, roi = _check_extract(volume, roi, mode, cval)
    starts = _validate.check_tensor("starts", starts)
    if starts.dim() != 2:
        shape = tuple(starts.shape)
        raise ValueError(
            f"starts: expected shape (N, 4), one (batch, z, y, x) per window (or (N, 3)), got {shape}"
        )
    count = starts.shape[0]
    starts = _check_starts(starts, volume, count)
    shape = (count, volume.shape[1], *roi)
    if out is None:
        out = volume.new_empty(shape)
    else:
        out = _validate.check_tensor("out", out)
        if out.dtype != volume.dtype:
            raise TypeError(f"out: expected {volume.dtype} like volume, got {out.dtype}")
        if out.device != volume.device:
            raise ValueError(f"out: expected a tensor on {volume.device} like volume, got {out.device}")
        if tuple(out.shape) != shape or not out.is_contiguous():
            got = f"{tuple(out.shape)}" + ("" if out.is_contiguous() else ", not contiguous")
            raise ValueError(f"out: expected a contiguous tensor of shape {shape}, got {got}")
        _check_apart(out, volume)
    if check_values and _validate.value_checks_enabled() and count:
        batch, corners = starts[:, 0], starts[:, 1:]
        outside = (batch < 0) | (batch >= volume.shape[0])
        far = (corners < -_FARTHEST_START) | (corners > _FARTHEST_START)
        outside, far = torch.stack([outside.any(), far.any()]).tolist()  # one sync
        if outside:
            raise ValueError(
                f"starts: batch indices must lie in [0, {volume.shape[0]}), got {batch.tolist()}"
            )
        if far:
            raise ValueError(f"starts: window corners must lie within +-2**62, got {corners.tolist()}")
    patch_extract_op(out, volume, starts, reference.PAD_MODES[mode], float(cval))
    return out


# ------------------------------------------------------------- many batches, arguments checked once
def _no_grad() -> contextlib.AbstractContextManager:
    """torch.no_grad() where grad mode is on; where it is off already, nothing (a tenth of the cost:
    the objects below run once per batch of windows)."""
    return torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext()


def _prepared_weights(
    vectors: Sequence[Tensor], floor: float, dtype: torch.dtype, device: torch.device | str, checked: bool
) -> tuple[list[Tensor], float, torch.device]:
    """(wz, wy, wx checked and moved to ``device`` in ``dtype``, floor checked, the device made concrete)
    for the objects below, which check them once for many calls."""
    if dtype not in ACC_DTYPES:
        raise TypeError(f"dtype: expected float32/float64 for the accumulator, got {dtype}")
    like = torch.empty(0, dtype=dtype, device=_validate.check_device("device", device))
    weights = _check_weights(vectors, None, like, True, checked)
    return weights, _check_floor(floor, dtype), like.device


class BatchExtract:
    """patch_extract for the many batches of windows of one volume (sliding-window inference).

    volume, roi, mode and cval are checked once, and the kernel is resolved once (the backend chosen
    when the object is made, as patch_extract would choose it); each batch is then one kernel call,
    with neither the custom-op dispatch nor a sync (the kernel backends). Batch indices in starts are
    not checked per call: a window whose batch index lies outside [0, B) reads cval. Like the op, it
    records nothing for autograd.
    """

    def __init__(self, volume: Tensor, roi: Sequence[int], mode: str = "constant", cval: float = 0.0):
        self.volume, self.roi = _check_extract(volume, roi, mode, cval)
        self.mode, self.cval = reference.PAD_MODES[mode], float(cval)
        self._kernel = _extract(self.volume.device)

    def __call__(self, out: Tensor, starts: Tensor) -> Tensor:
        """out [N, C, *roi] (contiguous, the volume's dtype and device) = the windows at starts [N, 4]
        (int64 on the volume's device), written in place; returns out."""
        volume = self.volume
        if (
            starts.dtype != torch.int64
            or starts.device != volume.device
            or starts.dim() != 2
            or starts.shape[1] != 4
        ):
            got = f"{starts.dtype} {tuple(starts.shape)} on {starts.device}"
            raise ValueError(f"starts: expected an int64 [N, 4] tensor on {volume.device}, got {got}")
        shape = (starts.shape[0], volume.shape[1], *self.roi)
        if out.dtype != volume.dtype:
            raise TypeError(f"out: expected {volume.dtype} like volume, got {out.dtype}")
        if out.shape != shape or out.device != volume.device or not out.is_contiguous():
            got = f"{tuple(out.shape)} on {out.device}" + ("" if out.is_contiguous() else ", not contiguous")
            raise ValueError(f"out: expected a contiguous {shape} tensor on {volume.device}, got {got}")
        _check_apart(out, volume)
        with _no_grad():
            self._kernel(out, volume, starts.contiguous(), self.mode, self.cval)
        return out


class BatchScatter:
    """patch_scatter for many batches of windows with the same weights (sliding-window inference).

    The weights and floor are checked once and moved to ``device`` in ``dtype`` (the accumulators'),
    and the kernel is resolved once: the scatter, or the deterministic gather where ``deterministic``
    (default: torch.are_deterministic_algorithms_enabled()). Each batch is then one kernel call, with
    neither the custom-op dispatch nor a sync (the kernel backends); its flags (NaN/Inf values added,
    windows skipped) are kept on the device until flags() sums them. Like the op, it records nothing
    for autograd (windows that require grad are read as values).
    """

    def __init__(
        self,
        wz: Tensor,
        wy: Tensor,
        wx: Tensor,
        floor: float,
        dtype: torch.dtype,
        device: torch.device | str,
        *,
        deterministic: bool | None = None,
        weights_checked: bool = False,
    ):
        prepared = _prepared_weights((wz, wy, wx), floor, dtype, device, weights_checked)
        self.weights, self.floor, self.device = prepared
        self.roi = tuple(w.numel() for w in self.weights)
        self.dtype = dtype
        if deterministic is None:
            deterministic = torch.are_deterministic_algorithms_enabled()
        self._kernel = (_gather if deterministic else _scatter)(self.device)
        self._flags: list[Tensor] = []

    def __call__(self, acc: Tensor, windows: Tensor, starts: Tensor) -> None:
        """acc [B, C, D, H, W] (contiguous, ``dtype`` on ``device``) += w * windows [N, C, *roi] (any
        float dtype, on ``device``) at starts [N, 4] (int64 on ``device``), in place."""
        device = self.device
        if acc.dtype != self.dtype:
            raise TypeError(f"acc: expected {self.dtype}, got {acc.dtype}")
        if acc.device != device or acc.dim() != 5 or not acc.is_contiguous():
            got = f"{tuple(acc.shape)} on {acc.device}" + ("" if acc.is_contiguous() else ", not contiguous")
            raise ValueError(f"acc: expected a contiguous [B, C, D, H, W] tensor on {device}, got {got}")
        _check_float("windows", windows)
        if (
            windows.device != device
            or windows.dim() != 5
            or windows.shape[1] != acc.shape[1]
            or windows.shape[2:] != self.roi
        ):
            expected = f"[N, {acc.shape[1]}, {', '.join(map(str, self.roi))}] on {device}"
            raise ValueError(f"windows: expected {expected}, got {tuple(windows.shape)} on {windows.device}")
        if starts.dtype != torch.int64 or starts.device != device or starts.shape != (windows.shape[0], 4):
            got = f"{starts.dtype} {tuple(starts.shape)} on {starts.device}"
            raise ValueError(
                f"starts: expected an int64 [{windows.shape[0]}, 4] tensor on {device}, got {got}"
            )
        with _no_grad():
            flags = self._kernel(acc, windows.contiguous(), starts.contiguous(), *self.weights, self.floor)
        self._flags.append(flags)
        if len(self._flags) == 64:  # a running total, so that a long inference keeps few small tensors
            self.flags()

    def flags(self) -> Tensor:
        """int64 [2] on ``device``: NaN/Inf window values added and windows skipped, over every batch
        so far (check_patch_flags raises for them)."""
        if not self._flags:
            return torch.zeros(2, dtype=torch.int64, device=self.device)
        self._flags = [torch.stack(self._flags).sum(0)]
        return self._flags[0]


class Finalizer:
    """patch_finalize for many accumulators, or many slabs of one, with the same weights and settings.

    The weights (moved to ``device`` in ``dtype``, the accumulators'), floor, activation, output and
    threshold are checked once and the kernels resolved once (the backend chosen when the object is
    made); each call then checks acc's dtype, device and shape and calls the kernel, with neither the
    custom-op dispatch nor a sync. The per-axis starts are int64 1-D tensors on ``device``, not
    checked per call. Records nothing for autograd.
    """

    def __init__(
        self,
        wz: Tensor,
        wy: Tensor,
        wx: Tensor,
        floor: float,
        dtype: torch.dtype,
        device: torch.device | str,
        activation: str = "none",
        output: str = "probabilities",
        threshold: float = 0.5,
        *,
        weights_checked: bool = False,
    ):
        prepared = _prepared_weights((wz, wy, wx), floor, dtype, device, weights_checked)
        self.weights, self.floor, self.device = prepared
        self.activation = _validate.check_activation(activation, tuple(reference.ACTIVATIONS))
        self.output = _check_output(output)
        self.threshold = _validate.check_number("threshold", threshold, -math.inf)
        self.dtype = dtype
        self._normalize, self._finalize = _normalize(self.device), _finalize(self.device)

    def __call__(
        self, acc: Tensor, starts_z: Tensor, starts_y: Tensor, starts_x: Tensor, *, inplace: bool = False
    ) -> Tensor:
        """act(acc / N) as patch_finalize gives it for acc [B, C, D, H, W] (``dtype`` on ``device``) and
        the grid starts_z x starts_y x starts_x in acc's coordinates; ``inplace`` (output
        "probabilities", contiguous acc): written into acc, which is returned."""
        if acc.dtype != self.dtype:
            raise TypeError(f"acc: expected {self.dtype}, got {acc.dtype}")
        if acc.device != self.device or acc.dim() != 5 or acc.numel() == 0:
            got = f"{tuple(acc.shape)} on {acc.device}"
            raise ValueError(f"acc: expected a non-empty [B, C, D, H, W] tensor on {self.device}, got {got}")
        _check_finalize_acc(acc, self.output, self.activation, inplace)
        starts = (starts_z, starts_y, starts_x)
        with _no_grad():
            if inplace:
                self._normalize(acc, *starts, *self.weights, self.floor, self.activation)
                return acc
            settings = (self.floor, self.activation, self.output, self.threshold)
            return self._finalize(acc.contiguous(), *starts, *self.weights, *settings)
