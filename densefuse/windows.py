"""Window weights and window positions for sliding-window fusion (DESIGN §3b).

A window of ``n`` voxels gets a 1-D weight vector ``w[i]``, i = 0..n-1, sampled at the voxel centres
``x_i = i + 0.5`` (so ``u_i = x_i / n`` lies in (0, 1)). A 3-D window is weighted by the separable
product ``w(i, j, k) = max(wz[i] * wy[j] * wx[k], floor)``; ``floor = 0`` keeps it separable, which
lets the fusion normaliser be an outer product of three 1-D sums.

Families (every vector is float64 unless a dtype is given, strictly positive inside the window):

- ``bspline(n, order)``: the centred cardinal B-spline of order 0..3 (box, tent, quadratic, cubic)
  stretched so that its support [-(order+1)/2, (order+1)/2] covers the window:
  ``w[i] = beta_order((x_i - n/2) / s)`` with ``s = n / (order + 1)``. Copies shifted by the natural
  stride ``s`` (when it is an integer) sum to exactly 1 wherever ``order + 1`` copies overlap.
- ``spline(n)``: the paper's piecewise-quadratic window (Hashemi et al. 2019),
  ``w(u) = 8u^2`` on [0, 1/4], ``1 - 8(1/2 - u)^2`` on [1/4, 1/2], mirrored about u = 1/2.
  Copies shifted by n/2 (n even) sum to exactly 1 where two overlap.
- ``constant(n)`` and ``gaussian(n, sigma_scale)``: the separable factors of MONAI's
  ``compute_importance_map`` (ones; ``exp(-(x_i - n/2)^2 / (2 sigma^2))`` with ``sigma = sigma_scale * n``).

MONAI clamps its 3-D importance map at ``max(min(map), 1e-3)`` (``monai_floor``), which makes its
weights non-separable near the corners; passing that value as ``floor`` reproduces it exactly.

Positions: ``scan_interval`` and ``window_starts`` reproduce MONAI's ``_get_scan_interval`` and
``dense_patch_slices``; the windows of a volume are the Cartesian grid of the per-axis starts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from densefuse.ops import _validate

WINDOWS = ("constant", "gaussian", "bspline", "spline")
MONAI_MIN_WEIGHT = 1e-3  # compute_importance_map's lower bound for the clamp


MAX_SIZE = 2**31 - 1  # a bound on window sizes and axis lengths (a larger arange would not fit in memory)


def _check_size(n: object, name: str = "n") -> int:
    """A window size or axis length: an integer (Python, NumPy or 0-d tensor; no bool) in [1, 2**31)."""
    size = _validate.as_int(n)
    if size is None or not 1 <= size <= MAX_SIZE:
        raise ValueError(f"{name}: expected an integer in [1, {MAX_SIZE}], got {n!r}")
    return size


def _check_dtype(dtype: object) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating-point torch.dtype, got {dtype!r}")
    return dtype


def _centred(n: int, dtype: torch.dtype, device: torch.device | str | None) -> Tensor:
    """x_i - n/2 = i + 0.5 - n/2 for i in [0, n): voxel centres relative to the window centre."""
    return torch.arange(n, dtype=torch.float64, device=device).add_(0.5 - n / 2).to(dtype)


def cardinal_bspline(t: Tensor, order: int) -> Tensor:
    """The centred cardinal B-spline beta_order(t), order 0..3, support |t| < (order + 1) / 2.

    beta_0 = [|t| < 1/2];  beta_1 = max(1 - |t|, 0);
    beta_2 = 3/4 - t^2 (|t| <= 1/2), (3/2 - |t|)^2 / 2 (|t| < 3/2);
    beta_3 = 2/3 - t^2 + |t|^3 / 2 (|t| <= 1), (2 - |t|)^3 / 6 (|t| < 2).
    Integer shifts sum to one: sum_k beta_order(t - k) = 1 for every t.
    """
    a = t.abs()
    zero = torch.zeros_like(a)
    if order == 0:
        return torch.where(a < 0.5, torch.ones_like(a), zero)
    if order == 1:
        return (1 - a).clamp(min=0)
    if order == 2:
        outer = torch.where(a < 1.5, (1.5 - a) ** 2 / 2, zero)
        return torch.where(a <= 0.5, 0.75 - a**2, outer)
    if order == 3:
        outer = torch.where(a < 2, (2 - a) ** 3 / 6, zero)
        return torch.where(a <= 1, 2 / 3 - a**2 + a**3 / 2, outer)
    raise ValueError(f"order: expected a B-spline order in 0..3, got {order!r}")


def _check_order(order: object, name: str = "order") -> None:
    """Raise, naming the caller's argument ``name``, unless order is a B-spline order 0-3."""
    if isinstance(order, bool) or order not in (0, 1, 2, 3):
        raise ValueError(f"{name}: expected a B-spline order in 0..3, got {order!r}")


def bspline(
    n: int, order: int = 3, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
) -> Tensor:
    """B-spline window [n]: beta_order((x_i - n/2) / s), s = n / (order + 1) (support = the window)."""
    n, dtype = _check_size(n), _check_dtype(dtype)
    _check_order(order)
    t = _centred(n, torch.float64, device) * ((order + 1) / n)
    return cardinal_bspline(t, order).to(dtype)


def spline(n: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> Tensor:
    """The paper's piecewise-quadratic window [n]: with v = min(u, 1 - u), u = (i + 0.5) / n,
    w = 8 v^2 for v <= 1/4 and 1 - 8 (1/2 - v)^2 for 1/4 < v <= 1/2 (peak 1 at the centre)."""
    n, dtype = _check_size(n), _check_dtype(dtype)
    u = (torch.arange(n, dtype=torch.float64, device=device) + 0.5) / n
    v = torch.minimum(u, 1 - u)
    return torch.where(v <= 0.25, 8 * v**2, 1 - 8 * (0.5 - v) ** 2).to(dtype)


def constant(n: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> Tensor:
    """Ones [n]: MONAI's mode="constant" (plain averaging of overlapping windows)."""
    return torch.ones(_check_size(n), dtype=_check_dtype(dtype), device=device)


def gaussian(
    n: int,
    sigma_scale: float = 0.125,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    """MONAI's 1-D gaussian factor [n]: exp(-(i - (n-1)/2)^2 / (2 sigma^2)), sigma = sigma_scale * n,
    computed as exp(-((i - (n-1)/2) / sigma)^2 / 2), so that a tiny sigma gives 1 at the centre voxel
    of an odd window and 0 elsewhere (not 0/0) and a huge one gives ones."""
    n, dtype = _check_size(n), _check_dtype(dtype)
    sigma = _validate.check_number("sigma_scale", sigma_scale, 0, open_low=True) * n
    x = _centred(n, torch.float64, device)
    return torch.exp((x / sigma) ** 2 * -0.5).to(dtype)


def check_vector(name: str, w: object, n: int) -> Tensor:
    """A user-supplied weight vector (a sequence, array or tensor of reals) as float64 [n]: finite,
    >= 0 and not all zero."""
    if _validate.holds_complex(w):  # torch would drop the imaginary parts
        got = f"{w.dtype} values" if hasattr(w, "dtype") else repr(w)
        raise TypeError(f"{name}: expected real weights, got {got}")
    if not isinstance(w, Tensor):
        try:  # float64 straight away: a list of Python floats is not rounded to float32 first
            w = torch.tensor(w, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as error:
            expected = f"a 1-D sequence of {n} real weights"
            raise TypeError(f"{name}: expected {expected}, got {w!r} ({error})") from None
    w = w.detach().to(device="cpu", dtype=torch.float64)
    if w.dim() != 1 or w.numel() != n:
        raise ValueError(f"{name}: expected a 1-D weight vector of length {n}, got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all() or (w < 0).any() or not (w > 0).any():
        raise ValueError(f"{name}: expected finite weights >= 0, not all zero, got {w.tolist()}")
    return w


def axis_window(
    window: str,
    n: int,
    *,
    order: int = 3,
    sigma_scale: float = 0.125,
    dtype: torch.dtype = torch.float64,
    name: str = "mode",
    order_name: str = "order",
) -> Tensor:
    """The 1-D vector [n] of a named family: "constant", "gaussian", "bspline" (order) or "spline".

    ``name`` and ``order_name`` are the caller's arguments for window and order (error messages)."""
    window = getattr(window, "value", window)  # monai.utils.BlendMode members are str enums
    if window == "constant":
        return constant(n, dtype)
    if window == "gaussian":
        return gaussian(n, sigma_scale, dtype)
    if window == "bspline":
        _check_order(order, order_name)
        return bspline(n, order, dtype)
    if window == "spline":
        return spline(n, dtype)
    raise ValueError(f"{name}: expected one of {WINDOWS} or one 1-D weight vector per axis, got {window!r}")


def separable_window(
    window: str | Sequence[object],
    roi_size: Sequence[int],
    *,
    order: int = 3,
    sigma_scale: float | Sequence[float] = 0.125,
    name: str = "mode",
    order_name: str = "order",
) -> tuple[Tensor, ...]:
    """One float64 vector per axis of ``roi_size``: a named family, or the user's vectors (one per axis).

    sigma_scale may be one number or one per axis (MONAI's convention); ``name`` and ``order_name``
    are the caller's arguments for window and order, for error messages.
    """
    dims = len(roi_size)
    if not isinstance(window, str):
        try:
            vectors = list(window)
        except TypeError:
            names = ", ".join(WINDOWS)
            raise TypeError(
                f"{name}: expected a window name ({names}) or {dims} 1-D weight vectors, got {window!r}"
            ) from None
        if len(vectors) != dims:
            raise ValueError(f"{name}: expected {dims} 1-D weight vectors (one per axis), got {len(vectors)}")
        return tuple(check_vector(f"{name}[{i}]", w, n) for i, (w, n) in enumerate(zip(vectors, roi_size)))
    per_axis = _validate.values(sigma_scale)  # a sequence, 1-D array or tensor: one per axis
    scales = tuple(per_axis) if per_axis is not None else (sigma_scale,) * dims
    if len(scales) != dims:
        raise ValueError(f"sigma_scale: expected one value or {dims}, got {len(scales)}")
    return tuple(
        axis_window(window, n, order=order, sigma_scale=s, name=name, order_name=order_name)
        for n, s in zip(roi_size, scales)
    )


def monai_floor(vectors: Sequence[Tensor]) -> float:
    """MONAI's clamp value max(min over the product map, 1e-3) = max(prod_a min(w_a), 1e-3).

    The minimum of a product of non-negative vectors is the product of their minima (rounding is
    monotone, so this also holds in floating point).
    """
    return max(math.prod(float(w.min()) for w in vectors), MONAI_MIN_WEIGHT)


def scan_interval(
    image_size: Sequence[int], roi_size: Sequence[int], overlap: Sequence[float]
) -> tuple[int, ...]:
    """MONAI's stride per axis: roi if roi == image size, else max(int(roi * (1 - overlap)), 1).

    image_size, roi_size: integers >= 1; overlap: numbers in [0, 1); one of each per axis."""
    sizes, rois, overlaps = _check_axes(image_size, roi_size, overlap)
    return tuple(r if r == s else max(int(r * (1 - o)), 1) for s, r, o in zip(sizes, rois, overlaps))


def _check_axes(image_size: object, roi_size: object, overlap: object) -> tuple[tuple, tuple, tuple]:
    """(sizes, rois, overlaps) checked: as many of each, integers >= 1 and overlaps in [0, 1). The
    items are the caller's, unconverted: a float32 overlap (or a NumPy integer roi) strides as MONAI's
    arithmetic on them does."""
    axes = {"image_size": image_size, "roi_size": roi_size, "overlap": overlap}
    lists = {}
    for name, value in axes.items():
        if _validate.values(value) is None:
            raise TypeError(f"{name}: expected one value per axis (a sequence), got {value!r}")
        lists[name] = tuple(value)  # the caller's items (NumPy or 0-d tensor elements included)
    if len({len(v) for v in lists.values()}) != 1:
        lengths = ", ".join(f"{name} {len(v)}" for name, v in lists.items())
        raise ValueError(f"image_size, roi_size, overlap: expected one value per axis each, got {lengths}")
    for name in ("image_size", "roi_size"):
        for v in lists[name]:
            _check_size(v, name)
    for o in lists["overlap"]:
        number = _validate.as_real(o)
        if number is None or not 0.0 <= number < 1.0:  # NaN fails too
            raise ValueError(f"overlap: expected numbers in [0, 1), got {o!r}")
    return lists["image_size"], lists["roi_size"], lists["overlap"]


def window_starts(size: int, roi: int, interval: int) -> list[int]:
    """Window starts along one axis, as MONAI's dense_patch_slices (the last window ends at ``size``).

    Starts are k * interval for k = 0, 1, ... until a window reaches the end; a window that would
    pass the end is moved back so that it ends there. Windows are min(roi, size) long.
    """
    size, interval = _check_size(size, "size"), _check_size(interval, "interval")
    roi = min(_check_size(roi, "roi"), size)
    count = next((k + 1 for k in range(math.ceil(size / interval)) if k * interval + roi >= size), 1)
    return [k * interval - max(k * interval + roi - size, 0) for k in range(count)]


def grid_starts(
    image_size: Sequence[int], roi_size: Sequence[int], overlap: Sequence[float]
) -> tuple[list[int], ...]:
    """Per-axis window starts of MONAI's sliding window over an image of ``image_size`` (>= roi).

    The windows are the Cartesian product of these lists, in MONAI's order (first axis slowest).
    """
    intervals = scan_interval(image_size, roi_size, overlap)
    return tuple(window_starts(s, r, i) for s, r, i in zip(image_size, roi_size, intervals))
