"""Launch helpers shared by the Triton kernel modules of this package."""

from __future__ import annotations

import contextlib

import torch


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Makes ``device`` current for a launch (Triton launches on the current GPU, whatever the
    tensors' device); nothing for CPU tensors (the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
