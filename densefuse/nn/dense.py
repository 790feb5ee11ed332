"""Dense layers and blocks of a 3D FC-DenseNet (DESIGN §3c), in three interchangeable implementations.

A dense layer is pre-activation: BN -> ReLU -> Conv (bottleneck: BN -> ReLU -> Conv1x1x1(b*k) ->
BN -> ReLU -> Conv3x3x3(k); plain: BN -> ReLU -> Conv3x3x3(k)) -> Dropout; a block feeds each layer
the concatenation of the block input and every earlier layer's k new maps and returns the whole
concatenation [B, C_in + L*k, D, H, W].

``DenseBlock3d(implementation=...)``:
    "naive"       torch.cat per layer: keeps every concatenation and every BN/ReLU output (memory
                  quadratic in depth), the reference the others must match.
    "checkpoint"  torch.utils.checkpoint of concat + BN + ReLU + first conv per layer (as torchvision's
                  memory_efficient DenseNet): recomputed in backward; running statistics are updated
                  in the forward only.
    "fused"       one preallocated buffer, shared batch statistics and the densefuse::dense_* ops
                  (see densefuse.ops.dense_block): the least memory at about the naive speed.

All three own the same modules (names as MONAI's _DenseLayer: norm1, conv1[, norm2, conv2]), so their
state_dicts are interchangeable, and with dropout off they give the same outputs, gradients and
running statistics (PyTorch's BatchNorm semantics: momentum or cumulative average, unbiased running
variance, running statistics in eval mode).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

IMPLEMENTATIONS = ("fused", "checkpoint", "naive")
_recompute = threading.local()


@contextlib.contextmanager
def _recomputing() -> Iterator[None]:
    """Marks checkpoint recomputation on this thread: BN then leaves the running statistics alone."""
    previous = getattr(_recompute, "active", False)
    _recompute.active = True
    try:
        yield
    finally:
        _recompute.active = previous


def _checkpoint_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    return contextlib.nullcontext(), _recomputing()


def _norm_relu(norm: nn.BatchNorm3d, x: Tensor) -> Tensor:
    """relu(norm(x)); during checkpoint recomputation the running statistics are not updated a second
    time (copies take the update, so that the op saves the same tensors as in the forward)."""
    if norm.training and getattr(_recompute, "active", False):
        mean, var = norm.running_mean, norm.running_var
        mean, var = (None, None) if mean is None else (mean.clone(), var.clone())
        x = F.batch_norm(x, mean, var, norm.weight, norm.bias, True, 0.0, norm.eps)
    else:
        x = norm(x)
    return F.relu(x, inplace=True)


def _check_positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


class DenseLayer3d(nn.Module):
    """One pre-activation dense layer: x [B, C_in, D, H, W] -> k new maps [B, k, D, H, W].

    Args:
        in_channels: C_in.
        growth_rate: k, the number of new maps.
        bottleneck: b: BN-ReLU-Conv1x1x1(b*k)-BN-ReLU-Conv3x3x3(k); None: BN-ReLU-Conv3x3x3(k).
        dropout: probability of zeroing a new map's voxel (nn.Dropout after the last conv).
        eps, momentum: of every BatchNorm3d (momentum None: cumulative average, as in PyTorch).
    """

    def __init__(
        self,
        in_channels: int,
        growth_rate: int,
        bottleneck: int | None = 4,
        dropout: float = 0.0,
        eps: float = 1.1e-5,
        momentum: float | None = 0.1,
    ):
        super().__init__()
        self.in_channels = _check_positive("in_channels", in_channels)
        self.growth_rate = _check_positive("growth_rate", growth_rate)
        self.bottleneck = None if bottleneck is None else _check_positive("bottleneck", bottleneck)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
        self.norm1 = nn.BatchNorm3d(in_channels, eps=eps, momentum=momentum)
        if self.bottleneck is None:
            self.conv1 = nn.Conv3d(in_channels, growth_rate, 3, padding=1, bias=False)
        else:
            width = self.bottleneck * growth_rate
            self.conv1 = nn.Conv3d(in_channels, width, 1, bias=False)
            self.norm2 = nn.BatchNorm3d(width, eps=eps, momentum=momentum)
            self.conv2 = nn.Conv3d(width, growth_rate, 3, padding=1, bias=False)
        self.dropout = nn.Dropout(float(dropout))

    def head(self, x: Tensor) -> Tensor:
        """BN -> ReLU -> first conv: [B, C_in, ...] -> [B, b*k or k, ...]."""
        return self.conv1(_norm_relu(self.norm1, x))

    def tail(self, h: Tensor) -> Tensor:
        """The rest after ``head``: (BN -> ReLU -> Conv3x3x3, bottleneck only) -> Dropout."""
        if self.bottleneck is not None:
            h = self.conv2(_norm_relu(self.norm2, h))
        return self.dropout(h)

    def forward(self, x: Tensor) -> Tensor:
        return self.tail(self.head(x))


class DenseBlock3d(nn.Module):
    """A dense block: x [B, C_in, D, H, W] -> [B, C_in + L*k, D, H, W] = cat(x, new_1, ..., new_L).

    Layer i is ``DenseLayer3d(C_in + i*k, k, bottleneck, dropout, eps, momentum)``; ``implementation``
    ("fused" | "checkpoint" | "naive", settable at any time) changes how, not what, is computed (see
    the module docstring). The output's dtype is x's; under torch.autocast the convolutions run in the
    autocast dtype and the batch statistics in fp32. Callers that need only the new maps slice
    ``out[:, in_channels:]`` (a view).
    """

    def __init__(
        self,
        in_channels: int,
        growth_rate: int,
        num_layers: int,
        bottleneck: int | None = 4,
        dropout: float = 0.0,
        implementation: str = "fused",
        eps: float = 1.1e-5,
        momentum: float | None = 0.1,
    ):
        super().__init__()
        self.in_channels = _check_positive("in_channels", in_channels)
        self.growth_rate = _check_positive("growth_rate", growth_rate)
        self.num_layers = _check_positive("num_layers", num_layers)
        self.out_channels = in_channels + num_layers * growth_rate
        self.layers = nn.ModuleList(
            DenseLayer3d(in_channels + i * growth_rate, growth_rate, bottleneck, dropout, eps, momentum)
            for i in range(num_layers)
        )
        self.implementation = implementation

    @property
    def implementation(self) -> str:
        return self._implementation

    @implementation.setter
    def implementation(self, value: str) -> None:
        if value not in IMPLEMENTATIONS:
            raise ValueError(f"implementation: expected one of {IMPLEMENTATIONS}, got {value!r}")
        self._implementation = value

    def extra_repr(self) -> str:
        return f"implementation={self.implementation!r}"

    def _check_input(self, x: object) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"x: expected shape [B, {self.in_channels}, D, H, W] (in_channels={self.in_channels}), "
                f"got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point tensor, got {x.dtype}")
        if x.numel() == 0:
            raise ValueError(f"x: empty tensor of shape {tuple(x.shape)}")
        if self.training and x.shape[0] * math.prod(x.shape[2:]) == 1:
            raise ValueError(
                f"x: batch statistics need more than one value per channel in training mode, got shape "
                f"{tuple(x.shape)} (use a larger batch or patch, or eval mode)"
            )
        return x

    def forward(self, x: Tensor) -> Tensor:
        x = self._check_input(x)
        if self.implementation == "naive":
            return self._naive(x)
        return self._checkpointed(x)

    def _naive(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = torch.cat([x, layer(x)], dim=1)
        return x

    def _checkpointed(self, x: Tensor) -> Tensor:
        features = [x]
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters())
        )
        for layer in self.layers:

            def head(*feats: Tensor, layer: DenseLayer3d = layer) -> Tensor:
                return layer.head(torch.cat(feats, dim=1))

            if needs_grad:
                h = checkpoint(head, *features, use_reentrant=False, context_fn=_checkpoint_contexts)
            else:
                h = head(*features)
            features.append(layer.tail(h))
        return torch.cat(features, dim=1)
