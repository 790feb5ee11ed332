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
variance, running statistics in eval mode). The fused block never calls the layers' modules: where
one has hooks (pruning, spectral_norm, a forward hook) a call runs the naive implementation, with a
warning; so does a call on the meta device (shapes only).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from densefuse.ops import _validate
from densefuse.ops import dense_block as ops
from densefuse.ops._backend import forced_backend, forced_backend_scope
from densefuse.reference import accumulate_dtype

IMPLEMENTATIONS = ("fused", "checkpoint", "naive")


class _Regions(threading.local):
    """Per thread: how many of _recompute_as_forward's functions run eagerly (depth), and how many of
    them as checkpoint's recomputation (recomputing, entered through checkpoint's context_fn)."""

    depth = 0
    recomputing = 0


_regions = _Regions()


class _Recomputing:
    """checkpoint's recomputation context (eager only: torch.compile asserts on a context_fn)."""

    def __enter__(self) -> None:
        _regions.recomputing += 1

    def __exit__(self, *exc: object) -> None:
        _regions.recomputing -= 1


def _checkpoint_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    return contextlib.nullcontext(), _Recomputing()


def _recompute_as_forward(module: nn.Module, fn: Callable[..., Tensor], *inputs: Tensor) -> Tensor:
    """fn(*inputs) keeping only the inputs for backward (torch's checkpoint), where it runs again with
    ``module``'s submodules in the training modes they had in the forward (the module may be switched
    to eval before backward: BatchNorm must recompute with batch statistics) and with BatchNorm's
    running statistics left alone (_norm_relu)."""
    modes = [(m, m.training) for m in module.modules()]

    def run(*args: Tensor) -> Tensor:
        now = [m.training for m, _ in modes]
        for m, mode in modes:
            m.training = mode
        eager = not torch.compiler.is_compiling()  # a traced region keeps no thread state
        if eager:
            _regions.depth += 1
        try:
            return fn(*args)
        finally:
            if eager:
                _regions.depth -= 1
            for (m, _), mode in zip(modes, now):
                m.training = mode

    if torch.compiler.is_compiling():
        return checkpoint(run, *inputs, use_reentrant=False)
    return checkpoint(run, *inputs, use_reentrant=False, context_fn=_checkpoint_contexts)


def _norm_relu(norm: _BatchNorm, x: Tensor) -> Tensor:
    """relu(norm(x)). When a _recompute_as_forward region runs again (torch's checkpoint recomputing
    it: in its recomputation context, which also covers a saved tensor read outside backward; or,
    where torch.compile fell back to eager checkpoint at a graph break and passed no context, inside a
    backward pass), the norm's own forward (SyncBatchNorm synchronises its statistics again) runs on
    copies of its buffers, so that the running statistics are not updated a second time. A compiled
    region recomputes from its traced graph, in which the forward alone updates them; outside these
    regions BatchNorm behaves as PyTorch's."""
    again = not torch.compiler.is_compiling() and (
        _regions.recomputing or (_regions.depth and _in_backward())
    )
    if norm.training and again:
        buffers = {name: buffer.clone() for name, buffer in norm.named_buffers()}
        x = torch.func.functional_call(norm, buffers, (x,))
    else:
        x = norm(x)
    return F.relu(x, inplace=True)


def _in_backward() -> bool:
    """Whether this thread is running an autograd backward pass (where torch's checkpoint recomputes,
    keying its recomputations on the same graph-task id)."""
    return torch._C._current_graph_task_id() != -1


def _check_eps(eps: object) -> float:
    """BatchNorm's eps: a finite number > 0 (with 0 a constant channel divides by zero in the fused
    block, where torch's BatchNorm raises)."""
    return _validate.check_number("eps", eps, open_low=True)


def _check_positive(name: str, value: object) -> int:
    """A positive int (a Python or NumPy integer or a 0-d integer tensor, as MONAI takes them)."""
    number = _validate.as_int(value)
    if number is None or number < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return number


def _hooked_module(modules: nn.Module) -> str | None:
    """The name of the first module of ``modules`` (itself included) with forward or backward hooks
    (torch.nn.utils.prune, spectral_norm and weight_norm register them too), or None."""
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    for name, module in modules.named_modules():
        if any(getattr(module, kind, None) for kind in kinds):
            return name
    return None


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
        eps = _check_eps(eps)
        in_channels, growth_rate = self.in_channels, self.growth_rate  # Python ints
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
    autocast dtype and the batch statistics in fp32. Callers that need only the new maps call
    ``block(x, new_only=True)``: [B, L*k, D, H, W] (FC-DenseNet's up path; under "fused" the gradient
    of the input's channels then never exists as a full-width output gradient). Do not modify a
    "fused" output in place (it is the buffer saved for backward: autograd raises). After
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` (DDP), train with "checkpoint" or "naive" ("fused"
    computes batch statistics per process, so it refuses SyncBatchNorm in training mode and serves it
    in eval mode).
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
        in_channels, growth_rate = self.in_channels, self.growth_rate  # Python ints
        self.out_channels = in_channels + self.num_layers * growth_rate
        self.layers = nn.ModuleList(
            DenseLayer3d(in_channels + i * growth_rate, growth_rate, bottleneck, dropout, eps, momentum)
            for i in range(self.num_layers)
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
        self._check_dtype(x)
        if any(_batch_stats(n) for n in self._norms().values()) and x.shape[0] * math.prod(x.shape[2:]) == 1:
            raise ValueError(
                f"x: batch statistics need more than one value per channel in training mode, got shape "
                f"{tuple(x.shape)} (use a larger batch or patch, or eval mode)"
            )
        return x

    def _check_dtype(self, x: Tensor) -> None:
        """Outside autocast (and for float64 x under it, which autocast leaves alone) the convolutions'
        weights must have x's dtype and the norms' parameters x's dtype or, for a half-precision x,
        float32: what nn.Conv3d and nn.BatchNorm3d take, so that every implementation takes the same
        inputs (the fused kernels would compute in x's dtype with the parameters cast to it). Only
        the parameters the layers compute with are read (_layer_params: norm, norm, conv per stage)."""
        if _autocast_dtype(x) is not None:
            return  # autocast picks the dtypes
        low = x.dtype in (torch.float16, torch.bfloat16)
        for layer in self.layers:
            for i, param in enumerate(_layer_params(layer)):
                is_conv = i % 3 == 2
                if param.dtype != x.dtype and (is_conv or not low or param.dtype != torch.float32):
                    raise TypeError(self._dtype_error(x))

    def _dtype_error(self, x: Tensor) -> str:
        """The message for an x whose dtype the layers' parameters do not take."""
        convs = {
            n: p.dtype for n, p in self.named_parameters() if n.endswith(("conv1.weight", "conv2.weight"))
        }
        if len(set(convs.values())) > 1:
            found = ", ".join(f"{n}: {d}" for n, d in convs.items() if d != next(iter(convs.values())))
            first = next(iter(convs))
            return (
                f"x: the block's convolutions have different dtypes ({first}: {convs[first]}, {found}); "
                "cast the block to one dtype"
            )
        conv_dtype = next(iter(convs.values()))
        if conv_dtype != x.dtype:
            return (
                f"x: expected {conv_dtype} like the block's convolutions, got {x.dtype} (cast one to the "
                "other's dtype, or run under torch.autocast)"
            )
        allowed = (x.dtype, torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else (x.dtype,)
        name, param = next(
            (n, p) for n, p in self.named_parameters() if "norm" in n and p.dtype not in allowed
        )
        takes = " or ".join(map(str, allowed))
        return f"x: the block's parameter {name} is {param.dtype}; with a {x.dtype} x a norm takes {takes}"

    def _norms(self) -> dict[str, _BatchNorm]:
        """Every batch norm of the block by name (BatchNorm3d, or SyncBatchNorm after
        nn.SyncBatchNorm.convert_sync_batchnorm)."""
        return {name: m for name, m in self.named_modules() if isinstance(m, _BatchNorm)}

    def forward(self, x: Tensor, new_only: bool = False) -> Tensor:
        """x [B, C_in, D, H, W] -> cat(x, new maps) [B, C_in + L*k, ...], or with ``new_only`` the new
        maps [B, L*k, ...]."""
        x = self._check_input(x)
        implementation = self.implementation if self.implementation != "fused" else self._fused_or(x)
        if implementation == "naive":
            out = self._naive(x)
            return out[:, self.in_channels :] if new_only else out
        if implementation == "checkpoint":
            return self._checkpointed(x, new_only)
        return self._fused(x, new_only)

    def _fused_or(self, x: Tensor) -> str:
        """The implementation that runs this call: "fused", or in its place "naive" on the meta device
        (shapes only: nothing is computed, and no kernel runs), and "naive" where a layer's module has
        hooks (the fused block reads the parameters and never calls the modules, so their hooks would
        not run: pruning's or spectral_norm's would leave a stale weight), with a warning. Not
        "checkpoint": its recomputation runs a hook twice, and spectral_norm's power iteration then
        moves between forward and backward."""
        if x.device.type == "meta":
            return "naive"
        hooked = _hooked_module(self.layers)
        if hooked is None:
            return "fused"
        warnings.warn(
            f"DenseBlock3d: layers.{hooked} has hooks, which implementation='fused' would not run (it "
            "never calls the layers' modules); implementation='naive' runs instead",
            stacklevel=2,
        )
        return "naive"

    def _naive(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = torch.cat([x, layer(x)], dim=1)
        return x

    def _checkpointed(self, x: Tensor, new_only: bool) -> Tensor:
        features = [x]
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters())
        )
        for layer in self.layers:

            def head(*feats: Tensor, layer: DenseLayer3d = layer) -> Tensor:
                return layer.head(torch.cat(feats, dim=1))

            if needs_grad:
                h = _recompute_as_forward(layer, head, *features)
            else:
                h = head(*features)
            features.append(layer.tail(h))
        if not new_only:
            return torch.cat(features, dim=1)
        new = torch.cat(features[1:], dim=1)  # the dtype the whole concatenation would have, as naive's
        return new.to(torch.promote_types(new.dtype, x.dtype))

    @torch.compiler.disable  # densefuse's own kernels, planned on the host: one graph break, not many
    def _fused(self, x: Tensor, new_only: bool) -> Tensor:
        norms = self._norms()
        modes = {_batch_stats(n) for n in norms.values()}
        if len(modes) > 1:
            raise ValueError(
                "implementation='fused' needs every BatchNorm of the block in the same mode (all train or "
                "all eval); use implementation='checkpoint' for a mix"
            )
        synced = [name for name, n in norms.items() if isinstance(n, nn.SyncBatchNorm) and n.training]
        if synced:
            raise ValueError(
                f"DenseBlock3d(in_channels={self.in_channels}, growth_rate={self.growth_rate}, "
                f"num_layers={self.num_layers}): {synced[0]} is a SyncBatchNorm in training mode, whose "
                "statistics are synchronised across processes; implementation='fused' computes them per "
                "process. Use implementation='checkpoint' (or 'naive') to train with SyncBatchNorm; "
                "'fused' serves it in eval mode"
            )
        device = x.device.type
        dtype = _autocast_dtype(x) or x.dtype
        dropout = any(layer.dropout.training and layer.dropout.p > 0 for layer in self.layers)
        seed = int(torch.randint(2**62, (), dtype=torch.int64)) if dropout else 0
        params = [t for layer in self.layers for t in _layer_params(layer)]
        plan = _Plan(self, modes.pop(), dtype, seed, new_only)
        with torch.autocast(device, enabled=False):  # the dtypes are explicit from here on
            return _FusedBlock.apply(x, plan, *params)


# ------------------------------------------------------------------------------------ fused block
def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype torch.autocast computes x's convolutions in, or None where it leaves them alone: off
    for x's device (or unknown to autocast, as "meta"), or x float64."""
    device = x.device.type
    if x.dtype == torch.float64 or not torch.amp.is_autocast_available(device):
        return None
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def _batch_stats(norm: _BatchNorm) -> bool:
    """Whether ``norm`` normalises with batch statistics (PyTorch: training, or no running stats)."""
    return norm.training or norm.running_mean is None


def _layer_params(layer: DenseLayer3d) -> list[Tensor]:
    """norm1.weight, norm1.bias, conv1.weight (+ norm2.weight, norm2.bias, conv2.weight)."""
    norms = [(layer.norm1, layer.conv1)] + ([] if layer.bottleneck is None else [(layer.norm2, layer.conv2)])
    return [t for norm, conv in norms for t in (norm.weight, norm.bias, conv.weight)]


class _Stage(NamedTuple):
    """One BN -> ReLU -> conv stage's parameters, as _FusedBlock received them (never the module's:
    under torch.func.functional_call they differ, and the backward must see the forward's tensors)."""

    weight: Tensor
    bias: Tensor
    conv: Tensor


def _stages(block: DenseBlock3d, params: Sequence[Tensor]) -> list[list[_Stage]]:
    """``params`` (_layer_params of every layer, in order) as each layer's [stage 1(, stage 2)]."""
    triples = iter(_Stage(*params[i : i + 3]) for i in range(0, len(params), 3))
    return [[next(triples) for _ in range(1 if layer.bottleneck is None else 2)] for layer in block.layers]


def _update_running_stats(norm: _BatchNorm, mean: Tensor, var: Tensor, count: int) -> None:
    """PyTorch's update: r = (1 - f) r + f s, f = momentum (None: 1 / batches seen), unbiased var."""
    if norm.running_mean is None:
        return
    norm.num_batches_tracked.add_(1)
    f = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
    norm.running_mean.mul_(1 - f).add_(mean.to(norm.running_mean.dtype), alpha=f)
    norm.running_var.mul_(1 - f).add_((var * (count / (count - 1))).to(norm.running_var.dtype), alpha=f)


class _Plan:
    """What the fused block's autograd.Function needs besides tensors, fixed at forward time: the
    backend forced then (re-applied in backward, which autograd may run on another thread), each
    layer's dropout probability (0: none; the module may be switched to eval before backward) and
    whether the output is the new maps only."""

    def __init__(self, block: DenseBlock3d, batch_stats: bool, dtype: torch.dtype, seed: int, new_only: bool):
        self.block, self.batch_stats, self.dtype, self.seed = block, batch_stats, dtype, seed
        self.new_only = new_only
        self.backend = forced_backend()
        self.dropout = [layer.dropout.p if layer.dropout.training else 0.0 for layer in block.layers]


class _Stats:
    """A BN's statistics as the fused ops take them: mean [C] and invstd = (var + eps)^-1/2, fp32."""

    def __init__(self, mean: Tensor, var: Tensor, eps: float):
        self.mean, self.invstd = mean, torch.rsqrt(var + eps)

    @classmethod
    def running(cls, norm: _BatchNorm, dtype: torch.dtype) -> _Stats:
        """A copy of the running statistics (backward needs them as they were in the forward)."""
        return cls(norm.running_mean.to(dtype, copy=True), norm.running_var.to(dtype), norm.eps)


def _dropout_(index: int, plan: _Plan, t: Tensor) -> Tensor:
    """Layer ``index``'s dropout in place on its new maps or their gradient t [B, k, *S] (contiguous):
    ops.dropout_'s counter-based mask from the step's seed and the layer, so the backward applies the
    forward's mask without storing it."""
    p = plan.dropout[index]
    return ops.dropout_(t, plan.seed + index, p) if p > 0 else t


# Input channels per partial 3x3x3 convolution, per device type (None: the whole prefix at once).
# conv(y, w) = sum over channel blocks c of conv(y[:, c], w[:, c]), so a normalised input exists one
# block at a time. On CPU oneDNN also copies every convolution input and input gradient into its
# blocked layout, so blocks of <= 80 channels keep those copies small too (measured ~6 % slower than
# one block, 1 thread). cuDNN copies nothing: the whole prefix runs at once, and in backward the
# input gradient is allocated only after the normalised input is freed.
CONV_CHANNEL_BLOCK: dict[str, int | None] = {"cpu": 80, "cuda": None}
# Whether backward frees the normalised input before the input gradient is allocated (two
# convolution_backward calls); oneDNN would materialise a stand-in input, so on CPU one call.
FREE_BEFORE_INPUT_GRAD = {"cpu": False, "cuda": True}


def _channel_blocks(channels: int, device: torch.device) -> list[slice]:
    """The fewest blocks of at most CONV_CHANNEL_BLOCK[device] channels, as equal as possible."""
    limit = CONV_CHANNEL_BLOCK.get(device.type) or channels
    bounds = torch.linspace(0, channels, -(-channels // limit) + 1).round().long().tolist()
    return [slice(start, stop) for start, stop in itertools.pairwise(bounds)]


def _block_input(x: Tensor, c: slice, stats: _Stats, stage: _Stage, dtype: torch.dtype, spatial):
    """relu(norm(x[:, c])) with fixed statistics as [B, |c|, *spatial] in ``dtype``."""
    y = ops.bn_relu(x[:, c], stats.mean[c], stats.invstd[c], stage.weight[c], stage.bias[c], out_dtype=dtype)
    return y.view(x.shape[0], -1, *spatial)


def _conv3x3_forward(x: Tensor, stats: _Stats, stage: _Stage, dtype: torch.dtype, spatial) -> Tensor:
    """conv3d(relu(norm(x)), stage.conv, padding=1) for x [B, C, V] with fixed statistics: [B, k, *S].

    Summed over input-channel blocks in the accumulation dtype; the result is in ``dtype``.
    """
    blocks = _channel_blocks(x.shape[1], x.device)
    out = None
    for c in blocks:
        y = _block_input(x, c, stats, stage, dtype, spatial)
        part = F.conv3d(y, stage.conv[:, c].to(dtype), padding=1)
        del y
        if len(blocks) > 1:  # partial sums in the accumulation dtype
            part = part.to(stats.mean.dtype)
        out = part if out is None else out.add_(part)
    return out.to(dtype)


def _conv3x3_backward(
    grad_out: Tensor,
    x: Tensor,
    stats: _Stats,
    stage: _Stage,
    grad_x: Tensor | None,
    dtype: torch.dtype,
    spatial,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of _conv3x3_forward with fixed statistics, block by block: grad_x [B, C, V] +=
    the input gradient (None: a zero tensor in the accumulation dtype, allocated once the first
    block's temporaries are freed); returns the norm's (dweight, dbias), the convolution's weight
    gradient and grad_x."""
    dweight, dbias = torch.empty((2, x.shape[1]), dtype=stats.mean.dtype, device=x.device)
    dconv = torch.empty(stage.conv.shape, dtype=dtype, device=x.device)
    conv_args = (None, [1] * 3, [1] * 3, [1] * 3, False, [0] * 3, 1)
    for c in _channel_blocks(x.shape[1], x.device):
        y = _block_input(x, c, stats, stage, dtype, spatial)
        w = stage.conv[:, c].to(dtype)
        if FREE_BEFORE_INPUT_GRAD.get(x.device.type, True):  # the input gradient needs only y's shape
            dconv[:, c] = torch.ops.aten.convolution_backward(
                grad_out, y, w, *conv_args, (False, True, False)
            )[1]
            shape = y.shape
            del y
            grad_y = F.grad.conv3d_input(shape, w, grad_out, padding=1)
        else:
            grad_y, dconv[:, c] = torch.ops.aten.convolution_backward(
                grad_out, y, w, *conv_args, (True, True, False)
            )[:2]
            del y
        if grad_x is None:
            grad_x = torch.zeros(x.shape, dtype=stats.mean.dtype, device=x.device)
        dweight[c], dbias[c] = ops.bn_relu_backward_(
            grad_y.view(x[:, c].shape), x[:, c], stats.mean[c], stats.invstd[c], stage.weight[c],
            stage.bias[c], grad_x[:, c],
        )  # fmt: skip
    return dweight, dbias, dconv, grad_x


def _bottleneck(prefix: Tensor, stats: _Stats, stage: _Stage, dtype: torch.dtype) -> Tensor:
    """z = conv1(relu(norm1(prefix))) [B, b*k, V] in ``dtype``, the normalised prefix never stored."""
    return ops.bn_relu_conv1x1(
        prefix, stats.mean, stats.invstd, stage.weight, stage.bias, stage.conv, out_dtype=dtype
    )


def _fold(a: Tensor, b: Tensor, stats: _Stats, weight: Tensor, dweight: Tensor, dbias: Tensor):
    """Adds one consumer's batch-statistics terms: a += w invstd dbias, b += w invstd^2 dweight."""
    scale = weight.to(a.dtype) * stats.invstd
    a.add_(scale * dbias)
    b.add_(scale * stats.invstd * dweight)


class _FusedBlock(torch.autograd.Function):
    """x [B, C_in, *S] -> buffer [B, C_out, *S] (plan.new_only: its view [:, C_in:]); params:
    _layer_params of every layer, in order.

    Forward: x is copied into a preallocated buffer once; layer l reads the channel prefix
    [0, n_l) and writes its k channels into [n_l, n_l + k). In batch-statistics mode each channel's
    mean/var is computed once, when it is written, and shared by every later layer's norm1 (each
    layer's running statistics are updated once, here). BN-ReLU(-Conv1x1x1) runs in the dense ops;
    a normalised tensor lives only until the 3x3x3 convolution has read it (one channel block at a
    time). Kept for backward: the buffer, the parameters (the tensors received here: autograd's
    version counters catch an in-place change before backward), the statistics ([C] per BN) and the
    dropout seed.

    Backward, layers in reverse, one gradient buffer G [B, C_out, V] in the buffer's dtype (like the
    naive block's gradients; each addition into it is computed in the accumulation dtype and rounded
    once; a bottleneck's gradient stays in the accumulation dtype until its correction): when
    layer l is reached every consumer of its channels has added g weight invstd into G, so their
    batch-statistics terms are folded once (dense_bn_correction_ with the accumulated a, b); then
    the layer's normalised input is recomputed block by block for the weight gradients, and its
    input gradient accumulated into G[:, :n_l].
    """

    @staticmethod
    def forward(ctx, x: Tensor, plan: _Plan, *params: Tensor) -> Tensor:
        block, batch, dtype = plan.block, plan.batch_stats, plan.dtype
        batch_size, _, *spatial = x.shape
        count = batch_size * math.prod(spatial)
        acc = accumulate_dtype(x.dtype)
        buffer = x.new_empty((batch_size, block.out_channels, *spatial))
        buffer[:, : block.in_channels] = x
        flat = buffer.view(batch_size, block.out_channels, -1)
        mean = var = None
        if batch:
            mean, var = flat.new_empty((2, block.out_channels), dtype=acc)
            c_in = block.in_channels
            mean[:c_in], var[:c_in] = ops.channel_stats(flat[:, :c_in])
        layer_stats = []
        for index, (layer, stages) in enumerate(zip(block.layers, _stages(block, params))):
            n, k = layer.in_channels, layer.growth_rate
            if batch:
                _update_running_stats(layer.norm1, mean[:n], var[:n], count)
                stats1 = _Stats(mean[:n], var[:n], layer.norm1.eps)
            else:
                stats1 = _Stats.running(layer.norm1, acc)
            stats2 = None
            if layer.bottleneck is None:
                out = _conv3x3_forward(flat[:, :n], stats1, stages[0], dtype, spatial)
            else:
                z = _bottleneck(flat[:, :n], stats1, stages[0], dtype)
                if batch:
                    mean2, var2 = ops.channel_stats(z)
                    _update_running_stats(layer.norm2, mean2, var2, count)
                    stats2 = _Stats(mean2, var2, layer.norm2.eps)
                else:
                    stats2 = _Stats.running(layer.norm2, acc)
                out = _conv3x3_forward(z, stats2, stages[1], dtype, spatial)
                del z
            layer_stats.append((stats1, stats2))
            buffer[:, n : n + k] = _dropout_(index, plan, out.contiguous())
            del out
            if batch:
                mean[n : n + k], var[n : n + k] = ops.channel_stats(flat[:, n : n + k])
        ctx.plan, ctx.layer_stats, ctx.mean = plan, layer_stats, mean
        ctx.save_for_backward(buffer, *params)
        return buffer[:, block.in_channels :] if plan.new_only else buffer

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        with forced_backend_scope(ctx.plan.backend):
            return _FusedBlock._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out: Tensor):
        plan, (buffer, *params) = ctx.plan, ctx.saved_tensors
        block, batch, dtype, mean = plan.block, plan.batch_stats, plan.dtype, ctx.mean
        batch_size, channels, *spatial = buffer.shape
        acc = accumulate_dtype(buffer.dtype)
        flat = buffer.view(batch_size, channels, -1)
        if plan.new_only:  # the input channels' gradient starts at zero
            grad = torch.empty_like(flat)
            grad[:, : block.in_channels] = 0
            grad[:, block.in_channels :] = grad_out.reshape(batch_size, -1, flat.shape[2])
        else:
            grad = grad_out.to(flat.dtype, memory_format=torch.contiguous_format, copy=True).view(flat.shape)
        if batch:
            a, b = flat.new_zeros((2, channels), dtype=acc)
        grads: list[Tensor] = []
        stages = _stages(block, params)
        for index in reversed(range(block.num_layers)):
            layer, (stage1, *stage2) = block.layers[index], stages[index]
            n, k = layer.in_channels, layer.growth_rate
            stats1, stats2 = ctx.layer_stats[index]
            if batch:  # every consumer of channels [n, n + k) has contributed: fold their stats terms
                own = slice(n, n + k)
                ops.bn_stats_correction_(grad[:, own], flat[:, own], mean[own], a[own], b[own])
            grad_conv = grad[:, n : n + k].to(dtype, memory_format=torch.contiguous_format, copy=True)
            grad_conv = grad_conv.view(batch_size, k, *spatial)
            _dropout_(index, plan, grad_conv)
            prefix = flat[:, :n]
            if layer.bottleneck is None:
                dweight1, dbias1, dconv1, _ = _conv3x3_backward(
                    grad_conv, prefix, stats1, stage1, grad[:, :n], dtype, spatial
                )
                layer_grads = [dweight1, dbias1, dconv1]
            else:
                z = _bottleneck(prefix, stats1, stage1, dtype)
                dweight2, dbias2, dconv2, grad_z = _conv3x3_backward(
                    grad_conv, z, stats2, stage2[0], None, dtype, spatial
                )
                if batch:  # norm2 has one consumer: fold its stats terms at once
                    a2, b2 = torch.zeros((2, z.shape[1]), dtype=acc, device=z.device)
                    _fold(a2, b2, stats2, stage2[0].weight, dweight2, dbias2)
                    ops.bn_stats_correction_(grad_z, z, stats2.mean, a2, b2)
                del z
                grad_z = grad_z.to(dtype)  # rounded once, after the correction (as batch norm's backward)
                dweight1, dbias1, dconv1 = ops.bn_relu_conv1x1_backward_(
                    grad_z, prefix, stats1.mean, stats1.invstd, stage1.weight, stage1.bias,
                    stage1.conv, grad[:, :n],
                )  # fmt: skip
                del grad_z
                layer_grads = [dweight1, dbias1, dconv1, dweight2, dbias2, dconv2]
            if batch:
                _fold(a[:n], b[:n], stats1, stage1.weight, dweight1, dbias1)
            layer_params = [t for stage in stages[index] for t in stage]
            grads[:0] = [g.to(p.dtype).view(p.shape) for g, p in zip(layer_grads, layer_params)]
        grad_x = None
        if ctx.needs_input_grad[0]:
            c_in = block.in_channels
            if batch:
                ops.bn_stats_correction_(grad[:, :c_in], flat[:, :c_in], mean[:c_in], a[:c_in], b[:c_in])
            grad_x = grad[:, :c_in].reshape(batch_size, c_in, *spatial).contiguous()
        return grad_x, None, *grads
