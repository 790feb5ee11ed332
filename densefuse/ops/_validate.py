"""Input checks and shape normalisation shared by the op modules.

Errors name the argument and what was expected. Checks that read tensor values (label range,
NaN/Inf) come back from the kernels as counts; ``raise_on_flags`` turns them into errors at the cost
of one device sync, unless DENSEFUSE_CHECK_VALUES=0 or the call is being traced by torch.compile.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LABEL_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)  # the kernels read these
# labels the kernels do not read, copied into a signed dtype first (NIfTI label maps are often uint16);
# uint64 values above 2**63 - 1 wrap to negative ones, which the label check reports as out of range
WIDENED_LABELS = {torch.uint16: torch.int32, torch.uint32: torch.int64, torch.uint64: torch.int64}


def check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def check_device(name: str, device: object) -> torch.device:
    """``device`` (a torch.device, string or index) as a torch.device that this process can allocate
    on; otherwise a ValueError naming ``name`` (torch's own errors here are an AssertionError for a
    build without CUDA, a RuntimeError for an unknown name or index). A CUDA device is checked
    against the device count, without starting CUDA (a process may fork workers before it does)."""
    try:
        device = torch.device(device)
        if device.type == "cuda":
            count = torch.cuda.device_count()  # through NVML where it can (is_available() runs cuInit)
            if count == 0 or (device.index or 0) >= count:
                raise RuntimeError(f"this process sees {count} CUDA devices")
        else:
            torch.empty(0, device=device)
    except (AssertionError, RuntimeError, TypeError, NotImplementedError) as error:
        raise ValueError(f"{name}: cannot allocate on device {str(device)!r} here: {error}") from None
    return device


def holds_complex(value: object) -> bool:
    """Whether value holds complex numbers: a complex tensor, NumPy array or scalar, or a Python
    complex, also inside a list or tuple (a cast to real would drop the imaginary parts)."""
    dtype = getattr(value, "dtype", None)
    if dtype is not None:
        return dtype.is_complex if isinstance(dtype, torch.dtype) else getattr(dtype, "kind", "") == "c"
    if isinstance(value, complex):
        return True
    return isinstance(value, (list, tuple)) and any(holds_complex(v) for v in value)


def plain(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor subclass (MONAI's MetaTensor) as a plain tensor with the same data and autograd history
    (an alias): the kernels, and the Triton interpreter, take plain tensors, and every op on a
    MetaTensor goes through its __torch_function__."""
    return tensor if type(tensor) is torch.Tensor else tensor.as_subclass(torch.Tensor)


def check_logits(logits: object) -> torch.Tensor:
    """logits: floating tensor [B, C, *spatial] with at least one spatial dim and no empty dim, as a
    plain tensor (plain)."""
    logits = plain(check_tensor("logits", logits))
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits: expected a float16/bfloat16/float32/float64 tensor, got {logits.dtype}")
    if logits.dim() < 3:
        raise ValueError(f"logits: expected shape [B, C, *spatial], got {tuple(logits.shape)}")
    if logits.numel() == 0:
        raise ValueError(f"logits: empty tensor of shape {tuple(logits.shape)}")
    return logits


def check_same_device(name: str, tensor: torch.Tensor, like: torch.Tensor) -> None:
    if tensor.device != like.device:
        raise ValueError(f"{name}: expected a tensor on {like.device} like logits, got {tensor.device}")


def flatten_spatial(x: torch.Tensor, start: int) -> torch.Tensor:
    """x with dims start.. flattened into one; a view whenever the strides allow, else a copy."""
    return x.flatten(start) if x.dim() > start + 1 else (x if x.dim() == start + 1 else x.unsqueeze(-1))


def check_constant_target(target: object) -> torch.Tensor:
    """A target tensor that does not require grad (targets are constants: MONAI would differentiate it),
    as a plain tensor (plain)."""
    target = plain(check_tensor("target", target))
    if target.is_complex():  # a cast to real would drop the imaginary part with only a warning
        raise TypeError(f"target: expected integer labels or a real float target, got {target.dtype}")
    if target.requires_grad:
        raise ValueError("target: gradients w.r.t. the target are not computed; pass target.detach()")
    return target


def normalize_target(target: object, logits: torch.Tensor, ignore_index: int | None) -> torch.Tensor:
    """A label map as [B, V] (integer) or a dense target as [B, C, V] (float).

    Accepted: integer/bool labels [B, *spatial] or [B, 1, *spatial] (uint16/uint32/uint64 ones as a
    widened copy, WIDENED_LABELS); float targets [B, C, *spatial] (one-hot or soft). Float labels
    [B, 1, ...] with C > 1 are rejected: cast them to an integer dtype.
    """
    target = check_constant_target(target)
    check_same_device("target", target, logits)
    batch, _, *spatial = logits.shape
    if target.dtype == torch.bool:
        target = target.view(torch.uint8)
    if target.is_floating_point():
        if target.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"target: expected a float16/bfloat16/float32/float64 float target, got {target.dtype}"
            )
        if tuple(target.shape) != tuple(logits.shape):
            hint = " (a label map? use an integer dtype)" if target.dim() == logits.dim() else ""
            raise ValueError(
                f"target: a float target must have the logits' shape {tuple(logits.shape)}, "
                f"got {tuple(target.shape)}{hint}"
            )
        if ignore_index is not None:
            raise ValueError(
                "ignore_index: needs integer class labels ([B, 1, *spatial] or [B, *spatial]), got a "
                f"target of the logits' shape {tuple(target.shape)} (one-hot, integer or float, or soft "
                "labels: pass the label map as integers)"
            )
        return flatten_spatial(target, 2)
    if target.dtype in WIDENED_LABELS:
        target = target.to(WIDENED_LABELS[target.dtype])
    if target.dtype not in LABEL_DTYPES:
        raise TypeError(
            "target: expected integer labels (bool, uint8/16/32/64 or int8/16/32/64) or a float target, "
            f"got {target.dtype}"
        )
    shape = tuple(target.shape)
    if shape == (batch, 1, *spatial):
        target = target.squeeze(1)
    elif shape != (batch, *spatial):
        raise ValueError(
            f"target: expected a label map of shape {(batch, *spatial)} or {(batch, 1, *spatial)} "
            f"for logits {tuple(logits.shape)}, got {shape}"
        )
    return flatten_spatial(target, 1)


def check_ignore_index(ignore_index: object) -> int | None:
    """An integer label to ignore (an int, NumPy integer or 0-d integer tensor, as MONAI takes it),
    as a Python int within int64 (the ops take it as one), or None."""
    if ignore_index is None:
        return None
    value = as_int(ignore_index)
    if value is None:
        raise TypeError(f"ignore_index: expected an int or None, got {ignore_index!r}")
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"ignore_index: expected an int64 value, got {ignore_index!r}")
    return value


def check_activation(activation: str, allowed: tuple[str, ...]) -> int:
    from densefuse.reference import ACTIVATIONS

    if activation not in allowed:
        raise ValueError(f"activation: expected one of {allowed}, got {activation!r}")
    return ACTIVATIONS[activation]


def unwrapped(value: object) -> object:
    """The Python number a 0-d tensor or NumPy array holds (as MONAI reads them: through tolist());
    anything else unchanged (a NumPy scalar keeps its type)."""
    if not isinstance(value, numbers.Number) and getattr(value, "ndim", None) == 0:
        return value.item()
    return value


def as_int(value: object) -> int | None:
    """value as a Python int if it is an integer (int, NumPy integer, 0-d integer tensor or array;
    no bool)."""
    value = unwrapped(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def real_scalar(value: object) -> numbers.Real | None:
    """value if it is a real number (int, float, NumPy scalar: kept in its type; a 0-d tensor or
    array: unwrapped), else None (bool, complex, not a number)."""
    value = unwrapped(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return value


def as_real(value: object) -> float | None:
    """value as a Python float if it is a real number (real_scalar), else None."""
    scalar = real_scalar(value)
    if scalar is None:
        return None
    try:
        return float(scalar)
    except OverflowError:  # an int beyond float's range
        return math.inf if scalar > 0 else -math.inf


def values(value: object) -> list | None:
    """The items of a sequence, or of a 1-D NumPy array or tensor as Python numbers (their tolist(),
    as MONAI reads them); None for a single value."""
    if isinstance(value, (str, bytes)):
        return None
    if getattr(value, "ndim", None) == 1 and hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Sequence):
        return list(value)
    return None


def check_number(
    name: str, value: object, low: float = 0.0, high: float = math.inf, open_low: bool = False
) -> float:
    """value as a finite float with low <= value <= high (low < value with ``open_low``): a Python or
    NumPy number or a 0-d tensor or array; anything else (a string, NaN, out of range) is a
    ValueError that names ``name``."""
    number = as_real(value)
    number = math.nan if number is None else number
    above = low < number if open_low else low <= number
    if not (above and number <= high and -math.inf < number < math.inf):  # NaN fails every comparison
        lower = "" if low == -math.inf else f" {'>' if open_low else '>='} {low}"
        upper = "" if high == math.inf else f" and <= {high}"
        raise ValueError(f"{name}: expected a finite number{lower}{upper}, got {value!r}")
    return number


def value_checks_enabled() -> bool:
    return os.environ.get("DENSEFUSE_CHECK_VALUES", "1") != "0" and not torch.compiler.is_compiling()


def raise_on_flags(flags: torch.Tensor, num_classes: int) -> None:
    """flags int64 [3] = (out-of-range labels, non-finite logits, non-finite target values)."""
    if not value_checks_enabled():
        return
    bad_labels, bad_logits, bad_targets = flags.tolist()
    if bad_labels:
        valid = "{0, 1}" if num_classes == 1 else f"[0, {num_classes})"
        raise ValueError(
            f"target: expected integer labels in {valid} (or ignore_index), found {bad_labels} voxels outside"
        )
    if bad_logits:
        raise ValueError(f"logits: contains {bad_logits} NaN/Inf values")
    if bad_targets:
        raise ValueError(f"target: contains {bad_targets} NaN/Inf values")


def check_cval(cval: object, dtype: torch.dtype | None = None, volume: str = "volume") -> float:
    """cval as a float; given ``dtype``, one that the padding of a ``dtype`` tensor (named ``volume``
    in the message) can hold: within the dtype's range (integer and bool volumes take it converted as
    torch's padding converts it)."""
    value = as_real(cval)
    if value is None:
        raise TypeError(f"cval: expected a number, got {type(cval).__name__}")
    if math.isinf(value) and isinstance(real_scalar(cval), numbers.Integral):  # an int beyond float64:
        raise ValueError(f"cval: {cval!r} overflows float64")  # as a float it is inf, checked as such
    if dtype is None:
        return value
    if dtype.is_floating_point or dtype.is_complex:
        if math.isfinite(value) and abs(value) > torch.finfo(dtype).max:
            raise ValueError(f"cval: {cval!r} overflows the dtype {dtype} of {volume}")
        return value
    low, high = (0, 1) if dtype == torch.bool else (torch.iinfo(dtype).min, torch.iinfo(dtype).max)
    if not low <= value <= high:
        expected = f"a number in [{low}, {high}] for {volume} of dtype {dtype}"
        raise ValueError(f"cval: expected {expected}, got {cval!r}")
    return value
