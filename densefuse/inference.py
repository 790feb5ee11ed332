"""Sliding-window inference with weighted patch fusion (DESIGN §3b).

A volume is tiled by windows of ``roi_size`` on MONAI's grid (densefuse.windows.grid_starts); each
window's prediction is weighted by a separable window max(wz wy wx, floor) and added into an
accumulator by densefuse.ops.patch_scatter, and the accumulator is divided by the summed weights
(patch_finalize). Two entry points:

- ``sliding_window_inference``: MONAI's function, same signature and, for mode "constant" and
  "gaussian", MONAI's result; adds mode "bspline" / "spline" and user-supplied 1-D weights.
- ``SlidingWindowPredictor``: the paper's inference (spline window, 50 % overlap, reflect padding by
  half a window, 180-degree-rotation test-time augmentation, threshold 0.5), with probabilities or
  a uint8 mask as output and a slab-by-slab mode for outputs that do not fit in memory.

Windows that hang over the volume's edge read padded input (``constant``, ``reflect``,
``replicate`` or ``circular``, computed per window: the padded volume is never built) and only
their part inside the volume is accumulated, so the output is never larger than the volume.
"""

from __future__ import annotations

import functools
import itertools
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from densefuse import reference, windows
from densefuse.ops import _validate
from densefuse.ops.patch_fuse import (
    EXTRACT_DTYPES,
    BatchExtract,
    BatchScatter,
    Finalizer,
    check_patch_flags,
)

PAD_MODES = tuple(reference.PAD_MODES)
Position = tuple[int, int, int, int]  # (batch, z, y, x): a window's corner in volume coordinates


# ------------------------------------------------------------------------------------ argument checks
def _reals(value: object) -> object:
    """One number or a sequence of them as Python floats; anything else unchanged (for the check
    that reports it)."""
    items = _validate.values(value)
    if items is None:
        real = _validate.as_real(value)
        return value if real is None else real
    reals = [_validate.as_real(v) for v in items]
    return value if None in reals else tuple(reals)


def _check_roi(
    roi_size: object, size: Sequence[int], none_means_full: bool, name: str = "roi_size"
) -> tuple[int, ...]:
    """roi per axis from one value or a sequence (MONAI: None = the whole axis)."""
    dims = len(size)
    values = _validate.values(roi_size)
    values = [roi_size] * dims if values is None else values
    if len(values) != dims:
        raise ValueError(f"{name}: expected {dims} values for {dims} spatial dims, got {roi_size!r}")
    roi = []
    for value, full in zip(values, size):
        if value is None and none_means_full:
            value = full
        length = _validate.as_int(value)
        if length is None or length <= 0:
            hint = " (None takes the whole axis)" if none_means_full else ""
            raise ValueError(f"{name}: expected positive integers{hint}, got {roi_size!r}")
        roi.append(length)
    return tuple(roi)


def _check_model_multiple(roi: Sequence[int], model: object, name: str, roi_name: str = "roi_size") -> None:
    """Windows of sizes a model says it takes: one with a size_multiple (FCDenseNet3d) needs roi_size
    multiples of it (its own error would name the window as its input)."""
    multiple = _validate.as_int(getattr(model, "size_multiple", None))
    if multiple and any(r % multiple for r in roi):
        fitted = tuple(-(-r // multiple) * multiple for r in roi)
        raise ValueError(
            f"{roi_name}: {tuple(roi)} must be a multiple of the {name}'s size_multiple ({multiple}) in "
            f"every dimension, e.g. {fitted}"
        )


def _per_axis(name: str, value: object, dims: int) -> tuple:
    values = _validate.values(value)
    values = (value,) * dims if values is None else tuple(values)
    if len(values) != dims:
        raise ValueError(f"{name}: expected one value or {dims}, got {value!r}")
    return values


def _check_overlap(overlap: object, dims: int) -> tuple[numbers.Real, ...]:
    """overlap per axis, each a real number in [0, 1) read as MONAI reads it (_real_scalar: a NumPy
    float32 scalar stays one, and strides in float32 arithmetic as in MONAI; tensors and arrays give
    Python floats)."""
    values = tuple(_validate.real_scalar(o) for o in _per_axis("overlap", overlap, dims))
    if any(o is None or not 0 <= o < 1 for o in values):
        raise ValueError(f"overlap: expected numbers in [0, 1), got {overlap!r}")
    return values


def _check_positive_int(name: str, value: object) -> int:
    number = _validate.as_int(value)
    if number is None or number < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
    return number


def _check_choice(name: str, value: object, allowed: Sequence[str]) -> str:
    value = getattr(value, "value", value)  # MONAI's str enums
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {tuple(allowed)}, got {value!r}")
    return value


def _data_device(name: str, device: object) -> torch.device:
    """A device windows are predicted or fused on: one this process can allocate on that holds data
    (not "meta", whose tensors have no values to copy out)."""
    device = _validate.check_device(name, device)
    if device.type == "meta":
        raise ValueError(f"{name}: the meta device holds no values; a prediction needs a real device")
    return device


def _check_volume(name: str, x: object, dims: Sequence[int]) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.is_complex():
        raise TypeError(f"{name}: expected a real tensor (windows are fused as real values), got {x.dtype}")
    if x.dim() - 2 not in dims or x.numel() == 0:
        expected = " or ".join(f"{d + 2}-D" for d in dims)
        raise ValueError(
            f"{name}: expected a non-empty {expected} [B, C, *spatial] tensor, got {tuple(x.shape)}"
        )
    if x.device.type == "meta":
        raise ValueError(f"{name}: a tensor on the meta device holds no values; a prediction needs real ones")
    return _validate.plain(x)  # a MONAI MetaTensor becomes a plain tensor


# ------------------------------------------------------------------------------------ the window grid
def _grid(size: tuple[int, ...], roi: tuple[int, ...], overlap: tuple[float, ...], margin: tuple[int, ...]):
    """window_grid as tuples, made once per setting. The overlaps' types are part of the key: a
    float32 overlap strides as float32 arithmetic does (MONAI's), its float64 value may not."""
    return _typed_grid(size, roi, tuple((type(o), o) for o in overlap), margin)


@functools.lru_cache(maxsize=64)
def _typed_grid(size: tuple[int, ...], roi: tuple[int, ...], typed_overlap: tuple, margin: tuple[int, ...]):
    overlap = [o for _, o in typed_overlap]
    padded = [max(s + 2 * m, r) for s, m, r in zip(size, margin, roi)]
    starts = windows.grid_starts(padded, roi, overlap)
    return tuple(tuple(a - (p - s) // 2 for a in axis) for axis, p, s in zip(starts, padded, size))


def window_grid(
    size: Sequence[int], roi: Sequence[int], overlap: Sequence[float], margin: Sequence[int]
) -> tuple[list[int], ...]:
    """Per-axis window starts in volume coordinates.

    The volume is (virtually) padded by ``margin`` on each side, and further, as MONAI does, up to
    the roi where it is still smaller (half before, rounded down); MONAI's grid is laid over the
    padded extent and shifted back, so starts are negative where windows begin in the padding.
    """
    return tuple(list(axis) for axis in _grid(*(tuple(v) for v in (size, roi, overlap, margin))))


def read_window(
    x: Tensor, start: Sequence[int], roi: Sequence[int], mode: str = "constant", cval: float = 0.0
) -> Tensor:
    """x[:, start : start + roi] of x [C, *spatial], padded by ``mode`` where it leaves the volume.

    constant fills ``cval``; reflect mirrors without repeating the edge (torch's "reflect",
    extended periodically where the window reaches further than one volume length); replicate
    repeats the edge; circular wraps around. A window inside the volume is a view.
    """
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ValueError(f"x: expected a [C, *spatial] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    mode = _check_choice("mode", mode, PAD_MODES)
    dims = x.dim() - 1
    if len(start) != dims or len(roi) != dims:
        raise ValueError(
            f"start, roi: expected {dims} values each (x is [C, *spatial]), got {start!r}, {roi!r}"
        )
    size = x.shape[1:]
    inside = [slice(max(s, 0), min(s + r, n)) for s, r, n in zip(start, roi, size)]
    if all(s >= 0 and s + r <= n for s, r, n in zip(start, roi, size)):
        return x[(slice(None), *inside)]
    if mode == "constant":
        pad = []
        for s, r, n in reversed(list(zip(start, roi, size))):
            lo, hi = max(s, 0), min(s + r, n)
            pad += [lo - s, s + r - hi] if lo < hi else [r, 0]
        return F.pad(x[(slice(None), *inside)], pad, value=cval)
    for axis, (s, r, n) in enumerate(zip(start, roi, size)):
        x = x.index_select(axis + 1, reference.pad_index(s, r, n, reference.PAD_MODES[mode]).to(x.device))
    return x


def _copy_window(
    dst: Tensor, x: Tensor, start: Sequence[int], roi: Sequence[int], mode: str, cval: float
) -> None:
    """dst [C, *roi] = read_window(x, start, roi, mode, cval), written in place (for the volume
    dtypes patch_extract does not read).

    Inside the volume and with constant padding this is one copy of the part inside (after filling
    dst with cval), with no temporary; the other padding modes gather through read_window.
    """
    size = x.shape[1:]
    inside = [slice(max(s, 0), min(s + r, n)) for s, r, n in zip(start, roi, size)]
    if all(s >= 0 and s + r <= n for s, r, n in zip(start, roi, size)):
        dst.copy_(x[(slice(None), *inside)])
    elif mode == "constant":
        dst.fill_(cval)
        if all(part.start < part.stop for part in inside):
            local = [slice(part.start - s, part.stop - s) for part, s in zip(inside, start)]
            dst[(slice(None), *local)].copy_(x[(slice(None), *inside)])
    else:
        dst.copy_(read_window(x, start, roi, mode, cval))


def _unshared(t: Tensor) -> bool:
    """Whether nothing but ``t`` uses t's memory (no other tensor or view of it is alive).

    Counts the users of the storage (torch._C._storage_Use_Count: the tensors on it, plus its Python
    object held here). That is a private torch API: where it is missing or fails, the answer is False
    (the batch is never reused, which is always safe).
    """
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return False
    try:
        return use_count(t.untyped_storage()._cdata) <= 2
    except Exception:  # a private API that changed: whatever went wrong, do not reuse
        return False


class _WindowReader:
    """Reads batches of windows of x [B, C, *spatial] (3-D) into one tensor [n, C, *roi] (x's dtype).

    Float volumes are read by one patch_extract kernel call per batch (every padding mode; checked
    once, BatchExtract); other dtypes window by window (_copy_window). The batch tensor is reused for
    the next batch when nothing holds it any more (the predictor kept no reference to it or to a view
    of it), which saves allocating, and page-faulting, a batch of windows per step; when something
    does hold it, the next batch gets a new tensor.
    """

    def __init__(self, x: Tensor, roi: Sequence[int], mode: str, cval: float):
        self.x, self.roi, self.mode, self.cval = x, tuple(roi), mode, cval
        self._extract = BatchExtract(x, roi, mode, cval) if x.dtype in EXTRACT_DTYPES else None
        self._buffer: Tensor | None = None

    def read(self, positions: Sequence[Position], starts: Tensor) -> Tensor:
        """The windows at ``positions`` (b, z, y, x), also given as ``starts`` [n, 4] int64 on x's device."""
        count = len(positions)
        if self._buffer is None or self._buffer.shape[0] < count or not _unshared(self._buffer):
            self._buffer = self.x.new_empty((count, self.x.shape[1], *self.roi))
        batch = self._buffer[:count]  # a view even when whole: a reference the predictor keeps counts
        if self._extract is not None:  # starts live on the inputs' device (a condition may be elsewhere)
            return self._extract(batch, _moved(starts, self.x.device))
        for window, (b, *start) in zip(batch, positions):
            _copy_window(window, self.x[b], start, self.roi, self.mode, self.cval)
        return batch


def _moved(t: Tensor, device: torch.device, spatial: tuple[int, ...] | None = None) -> Tensor:
    """t [n, C, ...] reshaped to [n, C, *spatial] (if given) and moved to ``device``, skipping each step
    that would change nothing (each is a dispatched op, and the sliding-window loops run them per
    batch of windows)."""
    if spatial is not None and t.shape[2:] != spatial:
        t = t.reshape(t.shape[0], -1, *spatial)
    return t if t.device == device else t.to(device)


def _flatten(out: object) -> tuple[list | None, list[Tensor]]:
    """MONAI's predictor outputs (a tensor, a sequence or a dict of tensors) as (dict keys, list)."""
    if isinstance(out, Tensor):
        return None, [out]
    if isinstance(out, Mapping):
        keys = sorted(out.keys())
        return keys, [out[k] for k in keys]
    if isinstance(out, Sequence):
        return None, list(out)
    raise TypeError(
        f"predictor: expected a tensor, a sequence or a dict of tensors, got {type(out).__name__}"
    )


def _check_prediction(
    out: object, count: int, roi: Sequence[int], channels: int | None, name: str = "predictor"
) -> Tensor:
    """An output of ``name`` for ``count`` windows: float [count, C, *roi] (C as before, if known)."""
    if not isinstance(out, Tensor) or not out.is_floating_point():
        kind = out.dtype if isinstance(out, Tensor) else type(out).__name__
        raise TypeError(f"{name}: expected float tensors, got {kind}")
    shape = tuple(out.shape)
    if len(shape) != len(roi) + 2 or shape[0] != count or shape[2:] != tuple(roi):
        raise ValueError(
            f"{name}: returned shape {shape} for {count} windows of {tuple(roi)}; expected "
            f"({count}, C, {', '.join(map(str, roi))}) (outputs must keep the window's spatial size)"
        )
    if channels is not None and shape[1] != channels:
        raise ValueError(f"{name}: returned {shape[1]} channels, earlier {channels}")
    if shape[1] == 0:
        raise ValueError(f"{name}: returned shape {shape}: no channels")
    return out


def _nonfinite_source(
    volumes: Mapping[str, Tensor | None], padded: bool, cval: float
) -> Callable[[], str | None]:
    """check_patch_flags' source for windows read from ``volumes`` (by argument name): the first
    volume that holds NaN/Inf, "cval" where it is one and ``padded`` (some window reads the constant
    padding), else None (the predictor made them). Run only on error; one (batch, channel) volume
    at a time, so that it needs little memory."""

    def finite(x: Tensor) -> bool:
        return not x.is_floating_point() or all(bool(torch.isfinite(v).all()) for v in x.flatten(0, 1))

    def source() -> str | None:
        for name, x in volumes.items():
            if x is not None and not finite(x):
                return name
        return "cval" if padded and not math.isfinite(cval) else None

    return source


def _check_coverage(
    size: Sequence[int], grid: Sequence[Sequence[int]], weights: Sequence[Tensor], floor: float
) -> None:
    """Raises where the weights (float32 vectors on the CPU) of the grid windows covering a voxel of
    ``size`` sum to less than float32's smallest normal: patch_finalize would read that voxel as
    uncovered, 0. Only a floor below it allows this (floor 0, with zeros in user vectors, little
    overlap or a gaussian whose tails underflow). Without a floor the sum is (S_z * S_y) * S_x
    (reference.fusion_normalizer), whose least value is that of the per-axis least sums (rounding is
    monotone)."""
    tiny = torch.finfo(torch.float32).tiny
    if floor >= tiny:
        return
    sums = [
        reference.axis_normalizer(n, torch.tensor(starts), w) for n, starts, w in zip(size, grid, weights)
    ]
    least = [float(s.min()) for s in sums]
    if float((sums[0].min() * sums[1].min()) * sums[2].min()) < tiny:
        raise ValueError(
            f"window: the weights of the windows covering some voxels sum to 0 (least sum per axis: "
            f"{least}), so those voxels would have no fused value; use a positive floor, more overlap, "
            "or weights > 0 over more of the window (a gaussian: a larger sigma_scale)"
        )


def _fusion_weights(name: str, vectors: Sequence[Tensor], dtype: torch.dtype, device) -> list[Tensor]:
    """The 1-D window weights in the accumulator's dtype on its device, moved once per call.

    They are finite and >= 0 as densefuse.windows returns them; this also rules out an overflow in
    ``dtype``, of a weight or of the largest 3-D weight (wz, wy, wx: three vectors), while they are
    on the CPU, so the fusion ops need not check them again, per batch (patch_scatter(...,
    weights_checked=True)) or on the device (a sync).
    """
    weights = [w.to(dtype) for w in vectors]
    peaks = [w.abs().max() for w in weights]
    if not all(torch.isfinite(w).all() for w in weights) or not torch.isfinite(
        (peaks[0] * peaks[1]) * peaks[2]
    ):
        largest = [w.abs().max().item() for w in vectors]
        raise ValueError(f"{name}: the 3-D weights overflow {dtype} (largest per axis: {largest})")
    return [w.to(device) for w in weights]


def _make_weights(
    mode: object,
    roi: tuple[int, ...],
    order: object,
    sigma_scale: object,
    lift: int,
    dtype: torch.dtype,
    device,
) -> tuple[Sequence[Tensor], float]:
    """sliding_window_inference's weights: the 1-D vectors lifted to 3-D by leading ones, in ``dtype``
    on ``device`` (_fusion_weights), and MONAI's floor."""
    vectors = windows.separable_window(
        mode, roi, order=order, sigma_scale=sigma_scale, order_name="bspline_order"
    )
    weights = _fusion_weights("mode", [torch.ones(1)] * lift + list(vectors), dtype, device)
    return tuple(weights), windows.monai_floor(vectors)


@functools.lru_cache(maxsize=32)
def _named_weights(
    mode, roi, order, sigma_scale, lift, dtype, device, stream
) -> tuple[Sequence[Tensor], float]:
    """A named mode's weights (_make_weights), made once per setting and placement (_placement; the
    stream is only part of the key): a process fuses many volumes with the same one (they are only
    read)."""
    return _make_weights(mode, roi, order, sigma_scale, lift, dtype, device)


def _mode_weights(
    mode: object, roi: tuple[int, ...], order: object, sigma_scale: object, dtype: torch.dtype, device
) -> tuple[Sequence[Tensor], float]:
    """(weights, floor) for sliding_window_inference: cached for a named mode, else computed."""
    lift = 3 - len(roi)
    if isinstance(sigma_scale, Sequence) and not isinstance(sigma_scale, str):
        sigma_scale = tuple(sigma_scale)
    # exact types: the cache would take True for 1 and skip the check that rejects a bool
    named = isinstance(mode, str) and all(type(a) in (int, float) for a in (order, *_flat(sigma_scale)))
    if named:
        return _named_weights(mode, roi, order, sigma_scale, lift, dtype, *_placement(device))
    return _make_weights(mode, roi, order, sigma_scale, lift, dtype, device)


def _flat(value: object) -> tuple:
    return value if isinstance(value, tuple) else (value,)


def _placement(device: torch.device) -> tuple[torch.device, int]:
    """(``device`` with its index, the id of its current stream; 0 off CUDA): the cache key of tensors
    made for ``device``. "cuda" names the current device now ("cuda:<index>"). Per stream, because a
    cached tensor belongs to the stream that made it: its copy is ordered before that stream's
    kernels only, and once freed its memory goes back to that stream's pool."""
    if device.type != "cuda":
        return device, 0
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device, torch.cuda.current_stream(device).stream_id


def _on_device(device: torch.device, *arrays: tuple) -> tuple[Tensor, ...]:
    """int64 tensors of (nested) integer tuples on ``device``, moved by one copy (views of one buffer).

    Made once per argument (a process fuses many volumes of one size): later calls neither build
    them nor copy them to the device again (a copy from pageable host memory also waits for the
    device). They are only read; they are made outside inference mode, so any mode may use them.
    """
    return _on_placement(*_placement(device), *arrays)


@functools.lru_cache(maxsize=32)
def _on_placement(device: torch.device, stream: int, *arrays: tuple) -> tuple[Tensor, ...]:
    """_on_device's tensors for a placement (_placement; the stream is only part of the key)."""
    with torch.inference_mode(False):
        tensors = [torch.tensor(a, dtype=torch.int64) for a in arrays]
        if device.type == "cpu":
            return tuple(tensors)
        flat = torch.cat([t.flatten() for t in tensors]).to(device)
        views, first = [], 0
        for t in tensors:
            views.append(flat[first : first + t.numel()].view(t.shape))
            first += t.numel()
        return tuple(views)


def _activate(x: Tensor, activation: str) -> Tensor:
    return reference.probabilities(x, reference.ACTIVATIONS[activation])


# --------------------------------------------------------------------------- MONAI's entry point
def sliding_window_inference(
    inputs: Tensor,
    roi_size: Sequence[int | None] | int,
    sw_batch_size: int,
    predictor: Callable[..., Tensor | Sequence[Tensor] | dict[Any, Tensor]],
    overlap: Sequence[float] | float = 0.25,
    mode: str | Sequence[Tensor] = "constant",
    sigma_scale: Sequence[float] | float = 0.125,
    padding_mode: str = "constant",
    cval: float = 0.0,
    sw_device: torch.device | str | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    roi_weight_map: Tensor | None = None,
    process_fn: Callable | None = None,
    buffer_steps: int | None = None,
    buffer_dim: int = -1,
    with_coord: bool = False,
    *args: Any,
    bspline_order: int = 3,
    **kwargs: Any,
) -> Tensor | tuple[Tensor, ...] | dict[Any, Tensor]:
    """Drop-in for ``monai.inferers.sliding_window_inference`` on 1-3 spatial dims.

    inputs [B, C_in, *spatial] is tiled by windows of ``roi_size`` on MONAI's grid (stride
    int(roi * (1 - overlap)), last window flush with the end; where roi exceeds the volume the
    input is padded by ``padding_mode``/``cval``, half before). ``predictor(windows [n, C_in, *roi],
    *args, **kwargs)`` returns [n, C, *roi] (or a tuple / dict of such); the result is, per voxel,
    sum_k w_k p_k / sum_k w_k over the covering windows, [B, C, *spatial] on ``device`` in inputs'
    dtype if it is a float dtype, else float32 (accumulated in float32, float64 for float64 inputs:
    with half-precision inputs or predictions the result differs from MONAI's by MONAI's rounding
    in half precision, and densefuse's is the closer to the exact sum).

    Weights w = max(wz wy wx, floor) with floor = max(min w, 1e-3) as MONAI's importance map:
    mode "constant" (plain average) and "gaussian" (``sigma_scale``) give MONAI's result; densefuse
    adds "bspline" (``bspline_order`` 0-3: densefuse's keyword, so a predictor keyword of that name
    does not reach the predictor), "spline" (the paper's window) and a sequence of 1-D weight
    vectors, one per spatial axis. Windows go to ``sw_device`` for the predictor, the
    output lives on ``device`` (both default to inputs' device). ``with_coord`` passes MONAI's
    window slices (in padded coordinates) as the predictor's second argument; MONAI's ``condition``
    keyword is windowed like the inputs.

    Differences from MONAI: the result is not differentiable (the predictor runs in the caller's
    grad mode, as in MONAI) and is a plain tensor (no MetaTensor metadata); predictor outputs must
    keep the window's spatial size; ``roi_weight_map`` and ``process_fn`` are not supported
    (weights must be separable: pass 1-D vectors as ``mode``); ``buffer_steps``/``buffer_dim`` are
    validated and otherwise change nothing (windows are added straight into the output); roi_size
    <= 0 is an error (use None for the whole axis); a dict-returning predictor must return the same
    keys for every batch; inputs with an empty axis are an error (MONAI returns an empty result);
    NaN/Inf window values (from the inputs, ``condition``, a NaN/Inf ``cval`` or the predictor)
    raise a ValueError that names their source after the last batch, where MONAI passes them on to
    the result (so does densefuse with DENSEFUSE_CHECK_VALUES=0); padding modes other than
    "constant" ignore ``cval`` (MONAI's padding raises for a non-zero one) and may pad by more than
    the volume's length (reflect continues periodically), where MONAI's padding raises.
    """
    inputs = _check_volume("inputs", inputs, (1, 2, 3))
    dims = inputs.dim() - 2
    if roi_weight_map is not None or process_fn is not None:
        raise ValueError(
            "roi_weight_map/process_fn: not supported by densefuse (weights are separable); "
            "pass one 1-D weight vector per axis as mode"
        )
    roi = _check_roi(roi_size, inputs.shape[2:], none_means_full=True)
    _check_model_multiple(roi, predictor, "predictor")
    overlap = _check_overlap(overlap, dims)
    sw_batch_size = _check_positive_int("sw_batch_size", sw_batch_size)
    padding_mode = _check_choice("padding_mode", padding_mode, PAD_MODES)
    if buffer_steps is not None:
        steps_count, dim = _validate.as_int(buffer_steps), _validate.as_int(buffer_dim)
        if steps_count is None:
            raise ValueError(f"buffer_steps: expected an integer or None, got {buffer_steps!r}")
        if steps_count > 0 and (dim is None or not -dims <= dim <= dims):
            raise ValueError(f"buffer_dim: expected a value in [{-dims}, {dims}], got {buffer_dim!r}")
    device = _data_device("device", device) if device is not None else inputs.device
    sw_device = _data_device("sw_device", sw_device) if sw_device is not None else inputs.device
    condition = kwargs.pop("condition", None)
    if condition is not None:
        condition = _check_volume("condition", condition, (dims,))
        if condition.shape[0] < inputs.shape[0] or condition.shape[2:] != inputs.shape[2:]:
            raise ValueError(
                f"condition: expected [>= {inputs.shape[0]}, C, {', '.join(map(str, inputs.shape[2:]))}] "
                f"like inputs, got {tuple(condition.shape)}"
            )
    batch, _, *size = inputs.shape
    padded = padding_mode == "constant" and any(r > n for r, n in zip(roi, size))  # cval is read
    cval = _validate.check_cval(cval)  # a number; checked against a dtype only where it is read:
    if padded:
        _validate.check_cval(cval, inputs.dtype, "inputs")
        if condition is not None:
            _validate.check_cval(cval, condition.dtype, "condition")
    fill = cval if padded else 0.0  # what the window readers pad with (read only where padded)
    # Lift to 3-D with leading singleton axes: the fusion ops are 3-D.
    lift = (1,) * (3 - dims)
    x3 = inputs.reshape(batch, -1, *lift, *size)
    cond3 = None if condition is None else condition.reshape(*condition.shape[:2], *lift, *size)
    starts3 = ((0,),) * (3 - dims) + _grid(tuple(size), roi, overlap, (0,) * dims)
    floating = inputs.is_floating_point()
    acc_dtype = reference.accumulate_dtype(inputs.dtype) if floating else torch.float32
    weights, floor = _mode_weights(mode, roi, bspline_order, _reals(sigma_scale), acc_dtype, device)
    positions = _positions(batch, *starts3)
    # Every window's corner and the grid on the output's device at once: one copy per call.
    starts, *grid = _on_device(device, positions, *starts3)
    # where the windows are read (from the host, not back from the output's device)
    starts_in = starts if inputs.device == device else _on_device(inputs.device, positions)[0]
    run = _WindowPredictor(predictor, x3, cond3, roi, padding_mode, fill, sw_device, with_coord, args, kwargs)
    fusion = _Fusion(batch, size, roi, weights, floor, acc_dtype, device)
    steps = range(0, len(positions), sw_batch_size)
    for first in tqdm(steps) if progress else steps:
        chunk = slice(first, first + sw_batch_size)
        batch_starts = starts[chunk]
        batch_starts_in = batch_starts if starts_in is starts else starts_in[chunk]
        # no reference to the batch outlives the step (_WindowReader)
        fusion.add(run(positions[chunk], batch_starts_in), batch_starts)
    source = _nonfinite_source({"inputs": inputs, "condition": condition}, padded, cval)
    return fusion.result(grid, inputs.dtype if floating else torch.float32, source)


@functools.lru_cache(maxsize=32)
def _positions(batch: int, starts_z: tuple[int, ...], starts_y: tuple[int, ...], starts_x: tuple[int, ...]):
    """MONAI's window order: (b, z, y, x) for every batch index and grid corner, x fastest."""
    return tuple((b, z, y, x) for b in range(batch) for z in starts_z for y in starts_y for x in starts_x)


class _WindowPredictor:
    """MONAI's predictor call on a batch of windows, ``predictor(windows [n, C_in, *roi], ...)``.

    The windows (and MONAI's ``condition`` keyword, windowed the same way) are read from the 3-D-lifted
    volume and moved to ``sw_device``; with ``with_coord`` the second argument is MONAI's list of window
    slices per window, in the coordinates of MONAI's padded volume.
    """

    def __init__(self, predictor, x3, cond3, roi, padding_mode, cval, sw_device, with_coord, args, kwargs):
        self.predictor, self.roi, self.sw_device = predictor, tuple(roi), sw_device
        roi3 = (1,) * (3 - len(roi)) + self.roi
        self.windows = _WindowReader(x3, roi3, padding_mode, cval)
        self.conditions = None if cond3 is None else _WindowReader(cond3, roi3, padding_mode, cval)
        size = x3.shape[5 - len(roi) :]
        self.padded_before = [(max(s, r) - s) // 2 for s, r in zip(size, roi)] if with_coord else None
        self.args, self.kwargs = args, kwargs

    def _read(self, reader: _WindowReader, chunk: Sequence[Position], starts: Tensor) -> Tensor:
        return _moved(reader.read(chunk, starts), self.sw_device, self.roi)

    def __call__(self, chunk: Sequence[Position], starts: Tensor) -> object:
        """The predictor's output for the windows at ``chunk``, also given as ``starts`` [n, 4]
        (int64, on the inputs' device)."""
        kwargs = self.kwargs
        if self.conditions is not None:
            kwargs = {**kwargs, "condition": self._read(self.conditions, chunk, starts)}
        windows_in = self._read(self.windows, chunk, starts)
        if self.padded_before is None:
            return self.predictor(windows_in, *self.args, **kwargs)
        dims = len(self.roi)
        coords = [
            [slice(p[0], p[0] + 1), slice(None)]
            + [slice(s + pb, s + pb + r) for s, pb, r in zip(p[4 - dims :], self.padded_before, self.roi)]
            for p in chunk
        ]
        return self.predictor(windows_in, coords, *self.args, **kwargs)


class _Fusion:
    """The accumulators of sliding_window_inference: one [B, C_k, *size3] per predictor output k, with
    size3 the spatial size lifted to 3-D by leading ones (the fusion ops are 3-D)."""

    def __init__(self, batch, size, roi, weights, floor, dtype, device):
        lift = (1,) * (3 - len(size))
        self.batch, self.size, self.roi = batch, tuple(size), tuple(roi)
        self.size3, self.roi3 = (*lift, *size), (*lift, *roi)
        self.dtype, self.device = dtype, device
        self.scatter = BatchScatter(*weights, floor, dtype, device, weights_checked=True)  # _fusion_weights
        self.finalize = Finalizer(*weights, floor, dtype, device, weights_checked=True)
        self.accs: list[Tensor] = []
        self.keys: list | None = None

    def add(self, out: object, starts: Tensor) -> None:
        """Scatters the predictor's output ``out`` for the windows at ``starts`` [n, 4] (int64, on the
        accumulators' device) into the accumulators."""
        keys, outs = _flatten(out)
        if not outs:
            raise ValueError("predictor: returned no outputs")
        if self.accs and (len(outs) != len(self.accs) or keys != self.keys):
            got, earlier = (keys, self.keys) if keys != self.keys else (len(outs), len(self.accs))
            raise ValueError(f"predictor: returned outputs {got}, earlier {earlier}")
        self.keys = keys
        count = starts.shape[0]
        for i, o in enumerate(outs):
            channels = self.accs[i].shape[1] if i < len(self.accs) else None
            o = _check_prediction(o, count, self.roi, channels)
            if len(self.accs) <= i:
                shape = (self.batch, o.shape[1], *self.size3)
                self.accs.append(torch.zeros(shape, dtype=self.dtype, device=self.device))
            self.scatter(self.accs[i], _moved(o, self.device, self.roi3), starts)

    def result(
        self, grid: Sequence[Tensor], dtype: torch.dtype, source: Callable[[], str | None]
    ) -> Tensor | tuple[Tensor, ...] | dict[Any, Tensor]:
        """The fused outputs [B, C_k, *spatial] in ``dtype``, in the predictor's structure (``grid``:
        the per-axis window starts, 3-D; ``source``: check_patch_flags'). The finalisers are queued
        before the flags are read (on a GPU that read waits for the device), so the device goes on
        while the host waits."""
        results = []
        for acc in self.accs:
            fused = self.finalize(acc, *grid, inplace=True)
            fused = fused.reshape(self.batch, -1, *self.size)
            results.append(fused if fused.dtype == dtype else fused.to(dtype))
        check_patch_flags(self.scatter.flags(), "predictor", source)
        if self.keys is not None:
            return dict(zip(self.keys, results))
        return results[0] if len(results) == 1 else tuple(results)


# ------------------------------------------------------------------------------ the paper's predictor
TTA = {  # spatial axes (0 = z, 1 = y, 2 = x) flipped per pass; a 180-degree rotation flips two axes
    "none": ((),),
    "rotations": ((), (1, 2), (0, 2), (0, 1)),
    "flips": ((), (0,), (1,), (2,)),
    "all": ((), (0,), (1,), (2,), (1, 2), (0, 2), (0, 1), (0, 1, 2)),
}
OUTPUTS = ("logits", "probabilities", "mask")
FLOAT32_MAX = torch.finfo(torch.float32).max  # the predictor accumulates in float32


def _check_model(model: object) -> Callable:
    if not callable(model):
        raise TypeError(f"model: expected a callable, got {type(model).__name__}")
    return model


def _check_flag(name: str) -> Callable[[object], bool]:
    """A bool setting (bool, NumPy bool, or 0 / 1): a string such as 'False' is refused, not read as True."""

    def check(value: object) -> bool:
        flag = _validate.unwrapped(value)  # a NumPy bool, 0-d tensor or array: its Python value
        if isinstance(flag, bool) or _validate.as_int(flag) in (0, 1):
            return bool(flag)
        raise TypeError(f"{name}: expected True or False, got {value!r}")

    return check


def _check_weight_vectors(value: object) -> tuple[Tensor, ...]:
    """SlidingWindowPredictor.weights: three 1-D weight vectors as a tuple (tensors kept as given, so
    that changes in place are seen; sequences and arrays are copied into float64 tensors). Their values
    are checked here (windows.check_vector) and again at each call, with their lengths against the
    roi's, so roi and weights may be assigned in either order."""
    given = value
    if isinstance(value, (str, bytes)):
        value = None
    try:
        vectors = list(value)
    except TypeError:
        raise TypeError(
            f"weights: expected three 1-D weight vectors (densefuse.windows.separable_window makes them), "
            f"got {given!r}"
        ) from None
    if len(vectors) != 3:
        raise ValueError(f"weights: expected 3 1-D weight vectors (one per axis), got {len(vectors)}")
    checked = []
    with torch.inference_mode(False):  # made in inference mode, they would have no version counter
        for i, w in enumerate(vectors):
            if not isinstance(w, Tensor):
                try:
                    w = torch.tensor(w, dtype=torch.float64)  # a copy: an array changed later is not seen
                except (TypeError, ValueError, RuntimeError):
                    raise TypeError(f"weights[{i}]: expected a 1-D weight vector, got {w!r}") from None
            if w.dim() != 1:
                raise ValueError(f"weights[{i}]: expected a 1-D weight vector, got shape {tuple(w.shape)}")
            if w.device.type == "meta":
                raise ValueError(f"weights[{i}]: a tensor on the meta device holds no values")
            windows.check_vector(f"weights[{i}]", w, w.numel())
            checked.append(w)
    return tuple(checked)


def _check_tta(tta: str | Sequence[Sequence[int]]) -> tuple[tuple[int, ...], ...]:
    if isinstance(tta, str):
        return TTA[_check_choice("tta", tta, tuple(TTA))]
    error = ValueError(
        f"tta: expected one of {tuple(TTA)} or tuples of spatial axes in {{0, 1, 2}}, got {tta!r}"
    )
    try:
        passes = tuple(tuple(_validate.as_int(a) for a in axes) for axes in tta)
    except TypeError:  # not a sequence of sequences
        raise error from None
    if not passes or any(len(set(p)) != len(p) or not set(p) <= {0, 1, 2} for p in passes):
        raise error
    return passes


class SlidingWindowPredictor:
    """Whole-volume prediction from a patch model by weighted sliding-window fusion (the paper's way).

    ``predictor(image)`` tiles image [B, C_in, D, H, W] by windows of ``roi_size`` at stride
    int(roi * (1 - overlap)), runs ``model`` on batches of ``sw_batch_size`` windows (on
    ``model_device``), optionally averages test-time augmentations, and fuses the window outputs with
    the weights ``window`` on ``device``: v = sum_k w_k p_k / sum_k w_k.

    Args:
        model: callable, [n, C_in, rz, ry, rx] -> logits [n, C, rz, ry, rx].
        roi_size: window size, one int or three.
        overlap: fraction of a window shared with its neighbour, in [0, 1) (paper: 0.5).
        window: "spline" (paper), "bspline" (``order`` 0-3), "gaussian" (``sigma_scale``),
            "constant", or three 1-D weight vectors.
        padding: "reflect": the volume is mirrored by half a window on every side, so every voxel
            is seen away from a window's edge (paper); "constant": windows stay inside the volume
            (padded by ``cval`` where roi exceeds it), as MONAI does.
        floor: lower bound of the 3-D weight; None: 0 with reflect padding, MONAI's
            max(min weight, 1e-3) with constant padding (border voxels keep a usable weight), of
            the weights as they are at each call. Like MONAI's, 1e-3 is absolute: it suits weights
            that peak near 1. A call raises where the weights covering a voxel sum to 0 (floor 0).
        tta: "none", "rotations" (identity + 180-degree rotations in the three planes: the paper's
            4-way TTA), "flips" (identity + one flip per axis), "all" (the 8 flip combinations), or
            tuples of spatial axes to flip; outputs are flipped back and averaged.
        activation: "sigmoid", "softmax" (over C >= 2 channels) or "none" (the model returns
            probabilities).
        soft_voting: fuse probabilities (the activation is applied per window, as the paper);
            False fuses logits and applies the activation once, after fusion.
        output: "logits" (fused model outputs, float32), "probabilities" (float32) or "mask"
            (uint8: argmax [B, 1, ...] for softmax, [p >= threshold] per channel otherwise).
        model_device, device: where windows are predicted and where the output is accumulated
            (default: the image's device).
        memory_budget: bytes the float accumulator may take, for output "mask" (float outputs are
            as large as the accumulator, which whole-volume mode finalises in place: the least
            memory already). Above it the volume is processed in slabs along z, each finalised as
            soon as no later window touches it, so memory is O(B * C * roi_z * H * W) plus the
            uint8 mask; batches then stay within the windows of one z start (whole-volume mode
            batches straight through). Every voxel gets the same sums in the same order as in the
            whole-volume mode, so the result is the same bits where the scatter adds window by
            window in order (the cpp and torch scatters) and the model and the per-window
            activation give a window the same output in any batch (with sw_batch_size > 1, torch's
            CPU sigmoid and softmax may round a window's values differently in another batch, by
            an ulp). The output-stationary gather that
            torch.use_deterministic_algorithms(True) selects first sums each batch's windows, so
            its bits follow the batching, which slabs change (with sw_batch_size > 1); with atomics
            (the triton and cuda scatters) the two modes differ by rounding, as two runs do. Where
            even a slab exceeds the budget, its rows are split into bands, the fewest that fit but
            at least roi_y rows each, processed one after the other: O(B * C * roi_z * band * W), at
            the price of predicting each window once per band it meets (at most twice). Windows are
            then batched band by band, so the result equals whole-volume mode's bit for bit with
            sw_batch_size=1, and up to the model's (and torch's softmax's) dependence on the batch
            otherwise. A band may still exceed a budget smaller than one window-high band.
        progress: show a tqdm progress bar.
    """

    def __init__(
        self,
        model: Callable[[Tensor], Tensor],
        roi_size: int | Sequence[int],
        *,
        overlap: float | Sequence[float] = 0.5,
        window: str | Sequence[Tensor] = "spline",
        order: int = 3,
        sigma_scale: float | Sequence[float] = 0.125,
        padding: str = "reflect",
        cval: float = 0.0,
        floor: float | None = None,
        sw_batch_size: int = 1,
        tta: str | Sequence[Sequence[int]] = "none",
        activation: str = "sigmoid",
        soft_voting: bool = True,
        output: str = "probabilities",
        threshold: float = 0.5,
        model_device: torch.device | str | None = None,
        device: torch.device | str | None = None,
        memory_budget: int | None = None,
        progress: bool = False,
    ):
        self.model = model
        self.roi = _check_roi(roi_size, (0, 0, 0), none_means_full=False)
        _check_model_multiple(self.roi, model, "model")
        self.overlap = overlap
        with torch.inference_mode(False):  # made in inference mode, they would have no version counter
            self.weights = windows.separable_window(
                window, self.roi, order=order, sigma_scale=_reals(sigma_scale), name="window"
            )
        self.padding, self.cval, self.floor = padding, cval, floor  # checked by __setattr__ (_SETTINGS)
        self.sw_batch_size, self.tta, self.activation = sw_batch_size, tta, activation
        self.soft_voting, self.output, self.threshold = soft_voting, output, threshold
        self.model_device, self.device, self.memory_budget = model_device, device, memory_budget
        self.progress = progress
        self._moved: tuple | None = None  # (the weights, what they were moved for, _weights_on's result)

    # Each setting's check, run on assignment (in __init__ and after it): a value set later is checked
    # as one given to the constructor, and stored as checked. What depends on two settings is checked
    # at each call (the weights' lengths against roi, roi against the model's size_multiple), so they
    # may be changed in either order; cval is checked against an image's dtype where constant padding
    # reads it.
    _SETTINGS: ClassVar[Mapping[str, Callable[[Any], Any]]] = {
        "model": _check_model,
        "roi": lambda v: _check_roi(v, (0, 0, 0), none_means_full=False, name="roi"),
        "weights": _check_weight_vectors,
        "overlap": lambda v: _check_overlap(v, 3),
        "padding": lambda v: _check_choice("padding", v, ("reflect", "constant")),
        "cval": _validate.check_cval,
        "floor": lambda v: None if v is None else _validate.check_number("floor", v, high=FLOAT32_MAX),
        "sw_batch_size": lambda v: _check_positive_int("sw_batch_size", v),
        "tta": _check_tta,
        "activation": lambda v: _check_choice("activation", v, tuple(reference.ACTIVATIONS)),
        "soft_voting": _check_flag("soft_voting"),
        "progress": _check_flag("progress"),
        "output": lambda v: _check_choice("output", v, OUTPUTS),
        "threshold": lambda v: _validate.check_number("threshold", v, -math.inf),
        "model_device": lambda v: None if v is None else _data_device("model_device", v),
        "device": lambda v: None if v is None else _data_device("device", v),
        "memory_budget": lambda v: None if v is None else _check_positive_int("memory_budget", v),
    }

    # Constructor arguments that are not attributes: assigning them would change nothing.
    _MADE_INTO: ClassVar[Mapping[str, str]] = {
        "roi_size": "roi",
        "window": "weights",
        "order": "weights",
        "sigma_scale": "weights",
    }

    def __setattr__(self, name: str, value: object) -> None:
        if name in self._MADE_INTO and type(self) is SlidingWindowPredictor:  # a subclass may keep its own
            raise AttributeError(
                f"{name}: a constructor argument, not a setting; assign {self._MADE_INTO[name]} instead "
                "(densefuse.windows.separable_window makes weights)"
            )
        check = self._SETTINGS.get(name)
        super().__setattr__(name, value if check is None else check(value))

    def _weights_on(self, device: torch.device) -> tuple[list[Tensor], float, list[Tensor]]:
        """(self.weights checked and moved to ``device`` in float32, the floor they give, their float32
        values on the CPU for _check_coverage), made again only when the placement (_placement: the
        device and its current stream), the weights (reassigned, or changed in place), roi, floor or
        padding differ from the last call's. The floor's default follows the weights: 0 with reflect
        padding, MONAI's max(min weight, 1e-3) with constant padding."""
        weights = self.weights  # a tuple, assigned whole (_check_weight_vectors)
        # inference tensors (weights assigned in inference mode) have no version counter: moved again
        versions = tuple(None if w.is_inference() else w._version for w in weights)
        placement, moved = _placement(device), self._moved
        key = (placement, versions, self.roi, self.floor, self.padding)  # the floor follows them too
        if moved is None or moved[0] is not weights or moved[1] != key or None in versions:
            vectors = [
                windows.check_vector(f"weights[{i}]", w, r) for i, (w, r) in enumerate(zip(weights, self.roi))
            ]
            floor = self.floor
            if floor is None:
                floor = 0.0 if self.padding == "reflect" else windows.monai_floor(vectors)
            on_cpu = _fusion_weights("window", vectors, torch.float32, "cpu")
            copies = [w.to(placement[0]) for w in on_cpu]
            self._moved = moved = (weights, key, (copies, floor, on_cpu))
        return moved[2]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_moved": None}  # device copies are not part of the predictor

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if "weights" in state:  # one pickled before weights were checked on assignment may hold a list
            self.weights = state["weights"]

    # ------------------------------------------------------------------------------------ per window
    def _vote_activation(self) -> str:
        """The activation applied to each window's output before fusion."""
        return self.activation if self.soft_voting and self.output != "logits" else "none"

    def _final_activation(self) -> str:
        """The activation patch_finalize applies after fusion (softmax there also means argmax)."""
        if self.output == "logits":
            return "none"
        if not self.soft_voting or (self.output == "mask" and self.activation == "softmax"):
            return self.activation
        return "none"

    def _predict(self, batch: Tensor, channels: int | None) -> Tensor:
        """The model's output on a batch of windows, averaged over the TTA passes, float32 (``channels``:
        the model's, or None before the first batch: then the first pass sets them for the others)."""
        total = None
        for i, axes in enumerate(self.tta):
            dims = [a + 2 for a in axes]
            if dims:
                windows_in = batch.flip(dims)  # a copy
            else:  # a model that changes its input in place must not change the later passes' windows
                windows_in = batch if i == len(self.tta) - 1 else batch.clone()
            raw = self.model(windows_in)
            out = _check_prediction(raw, batch.shape[0], self.roi, channels, "model")
            channels = out.shape[1]
            out = out if out.dtype == torch.float32 else out.float()
            out = _activate(out.flip(dims) if dims else out, self._vote_activation())
            if total is None:  # the next pass may write into the model's output (a static buffer)
                shared = (
                    len(self.tta) > 1 and out.untyped_storage().data_ptr() == raw.untyped_storage().data_ptr()
                )
                total = out.clone() if shared else out
            else:
                total += out
        return total if len(self.tta) == 1 else total.div_(len(self.tta))

    # ----------------------------------------------------------------------------------- per volume
    @torch.no_grad()  # not inference mode: the result may be changed in place afterwards
    def __call__(self, image: Tensor) -> Tensor:
        """Prediction for image [B, C_in, D, H, W]: see the class docstring for the output."""
        image = _check_volume("image", image, (3,))
        _check_model_multiple(self.roi, self.model, "model", "roi")  # either may have been changed
        batch, _, *size = image.shape
        padded = self.padding == "constant" and any(r > n for r, n in zip(self.roi, size))  # cval is read
        if padded:
            _validate.check_cval(self.cval, image.dtype, "image")
        device = self.device or image.device
        model_device = self.model_device or image.device
        margin = [r // 2 for r in self.roi] if self.padding == "reflect" else [0, 0, 0]
        grid = _grid(tuple(size), tuple(self.roi), tuple(self.overlap), tuple(margin))
        weights, floor, on_cpu = self._weights_on(device)
        _check_coverage(size, grid, on_cpu, floor)
        groups = _groups(batch, *grid)
        # Every window's corner ([z group, window, 4]) and the grid on the output's device: one copy.
        starts, *grid_starts = _on_device(device, groups, *grid)
        kind = "mask" if self.output == "mask" else "probabilities"
        finish = Finalizer(
            *weights, floor, torch.float32, device, self._final_activation(), kind, self.threshold,
            weights_checked=True,
        )  # fmt: skip
        starts_in = starts if image.device == device else _on_device(image.device, groups)[0]
        source = _nonfinite_source({"image": image}, padded, self.cval)
        reader = _WindowReader(image, self.roi, self.padding, self.cval if padded else 0.0)
        size_b = self.sw_batch_size
        # The plan needs the model's channels: the first batch tells. It is also the plan's first
        # batch (kept), unless row bands put other windows first (then it is predicted again). Where
        # slabs may come, it stays within the first z group, as their batches do.
        every = _flat_groups(batch, *grid)  # the windows of every z group, in order
        may_slab = self.memory_budget is not None and self.output == "mask"
        probe = groups[0][:size_b] if may_slab else every[:size_b]
        windows_in = _moved(reader.read(probe, starts_in.reshape(-1, 4)[: len(probe)]), model_device)
        first = _moved(self._predict(windows_in, None), device)
        del windows_in
        channels = first.shape[1]
        if channels == 1 and self.activation == "softmax" and self.output != "logits":
            raise ValueError(
                "activation: softmax over the model's single output channel is 1 everywhere (an "
                "all-0 mask); use 'sigmoid' for a one-channel model"
            )
        if channels > 256 and self.output == "mask" and self._final_activation() == "softmax":
            raise ValueError(
                f"model: gives {channels} channels, but output='mask' with softmax is a uint8 argmax, "
                "so at most 256 classes"
            )
        slabs, bands = False, [(0, size[1])]
        if may_slab:
            slabs, bands = _slab_plan(batch, channels, size, self.roi, self.memory_budget)
        if not slabs:  # the whole volume at once: batches run on across z groups
            groups, starts, starts_in = (every,), starts.reshape(1, -1, 4), starts_in.reshape(1, -1, 4)
            members = [tuple(range(len(every)))]
        else:  # per band, the windows of a z group that meet it (the same in every group)
            members = [_band_members(groups[0], rows, self.roi[1]) for rows in bands]
        if members[0][:size_b] != tuple(range(len(probe))):  # the loop's first batch is not the probe
            first = None
        index = [None] if len(bands) == 1 else _on_device(device, *members)
        index_in = index if image.device == device or len(bands) == 1 else _on_device(image.device, *members)
        steps = len(groups) * sum(math.ceil(len(m) / size_b) for m in members)
        bar = tqdm(total=steps) if self.progress else None
        scatter = BatchScatter(*weights, floor, torch.float32, device, weights_checked=True)
        out = None
        for band, (rows, chosen) in enumerate(zip(bands, members)):
            fuse = _SlabFusion(batch, size, grid, grid_starts, scatter, finish, slabs, rows, out)
            for k, group in enumerate(groups):
                group_starts, group_in = starts[k], starts_in[k]
                if index[0] is not None:
                    group_starts, group_in = group_starts[index[band]], group_in[index_in[band]]
                    group = [group[i] for i in chosen]
                local = fuse.local(group_starts)  # the corners in the accumulator's coordinates
                for start in range(0, len(group), size_b):
                    chunk = slice(start, start + size_b)
                    # neither the windows (the reader reuses them) nor the predictions (group_done
                    # needs the memory) are kept past the scatter
                    if first is not None:  # the first batch, predicted above
                        prediction, first = first, None
                    else:
                        windows_in = _moved(reader.read(group[chunk], group_in[chunk]), model_device)
                        prediction = _moved(self._predict(windows_in, channels), device)
                        del windows_in
                    fuse.add(prediction, local[chunk])
                    del prediction
                    if bar is not None:
                        bar.update()
                fuse.group_done(k)
            out = fuse.result(source)
        if bar is not None:
            bar.close()
        return out


def _slab_plan(
    batch: int, channels: int, size: Sequence[int], roi: Sequence[int], budget: int
) -> tuple[bool, list[tuple[int, int]]]:
    """(slab mode, the row bands [y0, y1) the accumulator covers in turn) for a float32 accumulator
    of at most ``budget`` bytes, where possible: the whole volume (no slabs, one band) if it fits;
    else slabs of min(roi_z, D) planes, of whole rows if they fit, else of row bands, the fewest
    that fit but never thinner than a window (so a window crosses at most two bands)."""
    depth, height, width = size
    if 4 * batch * channels * depth * height * width <= budget:
        return False, [(0, height)]
    row = 4 * batch * channels * min(roi[0], depth) * width  # bytes per row of a slab
    rows = max(budget // row, min(roi[1], height))
    return True, [(y, min(y + rows, height)) for y in range(0, height, rows)]


@functools.lru_cache(maxsize=64)
def _band_members(group: tuple, rows: tuple[int, int], roi_y: int) -> tuple[int, ...]:
    """The indices of the windows (b, z, y, x) of ``group`` whose rows [y, y + roi_y) meet ``rows``."""
    y0, y1 = rows
    return tuple(i for i, (_, _, y, _) in enumerate(group) if y < y1 and y + roi_y > y0)


@functools.lru_cache(maxsize=32)
def _flat_groups(batch: int, starts_z: tuple[int, ...], starts_y: tuple[int, ...], starts_x: tuple[int, ...]):
    """The windows of every group of _groups, one group after the other (whole-volume mode)."""
    return tuple(itertools.chain.from_iterable(_groups(batch, starts_z, starts_y, starts_x)))


@functools.lru_cache(maxsize=32)
def _groups(batch: int, starts_z: tuple[int, ...], starts_y: tuple[int, ...], starts_x: tuple[int, ...]):
    """SlidingWindowPredictor's window order: one group per z start (slab mode finalises planes
    group by group), each (b, z, y, x) for every batch index and (y, x) corner, x fastest."""
    return tuple(
        tuple((b, z, y, x) for b in range(batch) for y in starts_y for x in starts_x) for z in starts_z
    )


class _SlabFusion:
    """The accumulator of SlidingWindowPredictor for rows ``rows`` = [y0, y1) of the volume (all rows
    but in banded slab mode): whole-volume, or a slab of planes along z.

    Windows arrive grouped by their z start (in increasing order). In slab mode the accumulator
    holds planes [lo, lo + min(roi_z, D)) only, allocated once; once group k is in, planes below the
    next group's z start are complete (no later window reaches them): they are finalised into the
    output ``out`` (made here if None, shared by the bands), the planes above them move down in
    place, and the freed planes are zeroed.
    """

    def __init__(self, batch, size, grid, grid_starts, scatter, finalizer, slabs, rows, out):
        self.batch, self.size, self.grid = batch, size, grid
        self.grid_starts = grid_starts  # grid as int64 tensors on the accumulator's device
        self.scatter, self.finalizer, self.slabs, self.rows = scatter, finalizer, slabs, rows
        self.acc: Tensor | None = None  # planes [lo, lo + acc.shape[2]) and rows [y0, y1) of the volume
        self.lo = 0
        self.out: Tensor | None = out  # the result, filled slab by slab

    def local(self, starts: Tensor) -> Tensor:
        """Window corners [n, 4] (volume coordinates, on the accumulator's device) in the current
        accumulator's coordinates (z - lo, y - y0), for the windows of the next z group."""
        y0 = self.rows[0]
        if not self.lo and not y0:
            return starts
        shifted = starts.clone()
        shifted[:, 1] -= self.lo
        shifted[:, 2] -= y0
        return shifted

    def add(self, out: Tensor, starts: Tensor) -> None:
        """Scatters ``out`` for the windows at ``starts`` [n, 4] (local(): the accumulator's
        coordinates, on its device)."""
        if self.acc is None:
            depth = self.size[0]
            planes = min(out.shape[2], depth) if self.slabs else depth  # a group's windows span roi_z
            shape = (self.batch, out.shape[1], planes, self.rows[1] - self.rows[0], self.size[2])
            self.acc = torch.zeros(shape, dtype=torch.float32, device=self.scatter.device)
        self.scatter(self.acc, out, starts)

    def _finalize(self, acc: Tensor, inplace: bool = False, lo: int = 0) -> Tensor:
        """The finalised planes [lo, lo + acc.shape[2]) of the accumulator's rows, from their sums."""
        starts_z, starts_y, starts_x = self.grid_starts
        y0 = self.rows[0]
        return self.finalizer(
            acc, starts_z - lo, starts_y - y0 if y0 else starts_y, starts_x, inplace=inplace
        )

    def group_done(self, k: int) -> None:
        if not self.slabs:
            return
        next_start = self.grid[0][k + 1] if k + 1 < len(self.grid[0]) else self.size[0]
        planes = min(next_start, self.size[0]) - self.lo
        if planes <= 0:
            return
        capacity = self.acc.shape[2]
        chunk = max(1, capacity // 8)  # finalised a few planes at a time: their contiguous copy is small
        for first in range(0, planes, chunk):
            count = min(chunk, planes - first)
            part = self._finalize(self.acc[:, :, first : first + count], lo=self.lo + first)
            if self.out is None:
                self.out = part.new_empty((*part.shape[:2], *self.size))
            self.out[:, :, self.lo + first : self.lo + first + count, self.rows[0] : self.rows[1]] = part
        for first in range(0, capacity - planes, planes):  # chunks of `planes`: source and target apart
            count = min(planes, capacity - planes - first)
            self.acc[:, :, first : first + count] = self.acc[:, :, planes + first : planes + first + count]
        self.acc[:, :, max(capacity - planes, 0) :].zero_()
        self.lo += planes

    def result(self, source: Callable[[], str | None]) -> Tensor:
        """The output; the flags are read after the last finaliser is queued (see _Fusion.result)."""
        out = self.out if self.slabs else self._finalize(self.acc, inplace=self.finalizer.output == 0)
        check_patch_flags(self.scatter.flags(), "model", source)
        return out
