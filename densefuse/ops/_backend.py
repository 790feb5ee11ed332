"""Backend selection: the one place that decides which implementation runs an op.

Backends (DESIGN §2):
    triton  CUDA tensors; CPU tensors too when TRITON_INTERPRET=1 (how the kernels are tested).
    cuda    CUDA tensors, when densefuse._C was built with CUDA.
    cpp     CPU tensors, when densefuse._C was built.
    torch   any device: densefuse.reference, the readable oracle.

Default per device: cuda -> triton (else cuda, else torch); cpu -> cpp (else torch). An op family may
prefer another order where it was measured faster (patch fusion on CUDA: cuda, then triton).
``use_backend(name)`` (a context manager) or the environment variable DENSEFUSE_BACKEND force one.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import threading
from collections.abc import Callable, Iterator
from types import ModuleType

import torch

BACKENDS = ("torch", "cpp", "cuda", "triton")
_DEVICE_OF = {"cpp": "cpu", "cuda": "cuda"}
_state = threading.local()


@functools.cache
def extension() -> ModuleType | None:
    """densefuse._C if it was built and loads (it registers the densefuse_ext:: ops), else None."""
    try:
        return importlib.import_module("densefuse._C")
    except ImportError:
        return None


@functools.cache
def extension_ops() -> dict[str, frozenset[str]]:
    """The densefuse_ext ops densefuse._C registered per dispatch key ("cpu", "cuda"), from its
    build_info(); empty where the extension is missing (or too old to say)."""
    ext = extension()
    ops = ext.build_info().get("ops", {}) if ext is not None else {}
    return {key: frozenset(names) for key, names in ops.items()}


@functools.cache
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _device_type(device: str | torch.device | None) -> str | None:
    """The type of a device given as a type ("cuda"), a device string ("cuda:0") or a torch.device."""
    if device is None or device in ("cpu", "cuda"):  # the common case, per op call: no parsing
        return device
    try:
        return torch.device(device).type
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device_type: expected a device such as 'cpu' or 'cuda', got {device!r}") from error


def unavailable_reason(backend: str, device_type: str | torch.device | None = None) -> str | None:
    """Why ``backend`` cannot run here (on ``device_type`` if given: a device type, a device string
    or a torch.device), or None if it can."""
    device_type = _device_type(device_type)
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; expected one of {BACKENDS}"
    needed = _DEVICE_OF.get(backend)
    if device_type is not None and needed is not None and device_type != needed:
        return f"backend {backend!r} runs on {needed} tensors, got {device_type} tensors"
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device here"
    if backend == "cpp" and extension() is None:
        return (
            "backend 'cpp' needs the compiled extension densefuse._C (pip install --no-build-isolation -e .)"
        )
    if backend == "cuda":
        ext = extension()
        if ext is None or not ext.build_info()["cuda"]:
            return "backend 'cuda' needs densefuse._C built with CUDA (a CUDA torch and nvcc at build time)"
        if not torch.cuda.is_available():
            return "backend 'cuda' needs a CUDA device"
    if backend == "triton":
        if device_type not in (None, "cpu", "cuda"):
            return f"backend 'triton' runs on cuda (or interpreted cpu) tensors, got {device_type} tensors"
        if not _triton_importable():
            return "backend 'triton' needs the triton package"
        if device_type == "cpu" and not triton_interpreting():
            return "backend 'triton' runs on CPU tensors only under TRITON_INTERPRET=1"
        if device_type is None and not (torch.cuda.is_available() or triton_interpreting()):
            return "backend 'triton' needs a CUDA device (or TRITON_INTERPRET=1 for CPU tensors)"
    return None


def available_backends(device_type: str | torch.device | None = None) -> list[str]:
    """The backends that can run on ``device_type`` ('cpu', 'cuda', 'cuda:0', a torch.device; None: on
    some device here)."""
    device_type = _device_type(device_type)
    return [b for b in BACKENDS if unavailable_reason(b, device_type) is None]


def _check(backend: str, device_type: str | None = None) -> str:
    reason = unavailable_reason(backend, device_type)
    if reason is not None:
        raise RuntimeError(f"densefuse: {reason}")
    return backend


def forced_backend() -> str | None:
    """The backend forced by use_backend() (innermost) or DENSEFUSE_BACKEND, if any."""
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1]
    return os.environ.get("DENSEFUSE_BACKEND") or None


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[str]:
    """Force every densefuse op inside the block to run on ``backend``.

    Raises RuntimeError at once if the backend cannot run on this machine.

        with densefuse.use_backend("torch"):
            loss = criterion(logits, labels)
    """
    _check(backend)
    stack = _state.__dict__.setdefault("stack", [])
    stack.append(backend)
    try:
        yield backend
    finally:
        stack.pop()


def forced_backend_scope(backend: str | None) -> contextlib.AbstractContextManager:
    """use_backend(backend), or nothing when None: re-applies at backward time the backend forced at
    forward time (autograd may run the backward on another thread, whose use_backend() stack is empty)."""
    return use_backend(backend) if backend is not None else contextlib.nullcontext()


DEFAULT_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}


def default_backend(device_type: str) -> str:
    """The first backend of DEFAULT_ORDER[device_type] that can run here (ops without a kernel for it
    fall back as Registry.default says)."""
    ranked = DEFAULT_ORDER.get(device_type, ())
    return next((b for b in ranked if unavailable_reason(b, device_type) is None), "torch")


def select(device: torch.device, default: Callable[[str], str] = default_backend) -> str:
    """The backend that runs an op whose inputs live on ``device``: the forced one (checked), else
    ``default(device.type)``."""
    forced = forced_backend()
    if forced is not None:
        return _check(forced, device.type)
    return default(device.type)


class Registry:
    """Per-op table of backend implementations: ``impls[backend] = fn`` (all share one signature).

    ``loaders`` maps each backend that may have a kernel to a function that imports it (lazily:
    triton is imported only when the triton backend runs); ``has_kernel(backend)`` says whether
    that kernel is really there (e.g. the compiled extension has the op), default: it is. Calling
    the registry with a device picks the forced backend (an error if it has no kernel for this op)
    or the device's default, falling back to the ``torch`` reference where the default has none.
    ``order`` (device type -> backends, best first) replaces DEFAULT_ORDER for this op.
    """

    def __init__(
        self,
        name: str,
        loaders: dict[str, Callable[[], Callable]],
        has_kernel: Callable[[str], bool] | None = None,
        order: dict[str, tuple[str, ...]] | None = None,
    ):
        self.name = name
        self._loaders = loaders
        self._has_kernel = has_kernel
        self.order = {**DEFAULT_ORDER, **(order or {})}

    def has(self, backend: str) -> bool:
        """Whether this op has a ``backend`` kernel (whether or not it can run on this machine)."""
        return backend in self._loaders and (self._has_kernel is None or self._has_kernel(backend))

    @functools.cache  # noqa: B019 - a handful of registries live for the whole process
    def impl(self, backend: str) -> Callable:
        if not self.has(backend):
            hint = "use_backend('torch') runs the reference"
            raise RuntimeError(f"densefuse: op {self.name} has no {backend!r} kernel; {hint}")
        return self._loaders[backend]()

    def default(self, device_type: str) -> str:
        """The backend this op runs on ``device_type`` unless one is forced: the first of its order
        that can run here and has a kernel for it, else the reference. Found once per device type
        (and TRITON_INTERPRET setting): what it depends on is fixed for the process, and ops look it
        up on every call."""
        return self._default(device_type, triton_interpreting())

    @functools.cache  # noqa: B019 - a handful of registries live for the whole process
    def _default(self, device_type: str, interpreting: bool) -> str:
        ranked = self.order.get(device_type, ())
        usable = (b for b in ranked if self.has(b) and unavailable_reason(b, device_type) is None)
        return next(usable, "torch")

    def __call__(self, device: torch.device) -> Callable:
        return self.impl(select(device, self.default))
