"""Fused loss statistics: the single-pass reductions behind the Tversky/F-beta/Dice and focal losses.

Two op families, each a forward that reduces logits + targets to O(B*C) numbers in one tiled pass
and a backward that recomputes the activation in registers and writes dL/dlogits in one more pass:

    densefuse::overlap_stats   -> stats [B, C, 3] = (S_pg, S_p, S_g)          (Tversky, F-beta, Dice)
    densefuse::focal_stats     -> stats [B, C, 2] = (sum focal loss, voxels)   (focal)

Both also return int64 flags [3] (out-of-range labels, non-finite logits, non-finite targets) so
value checks cost no extra pass. Shapes, dtypes and label conventions: densefuse.reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from densefuse import reference
from densefuse.ops import _validate
from densefuse.ops._backend import Registry, extension, forced_backend, forced_backend_scope


def _ext_op(name: str):
    def load():
        if extension() is None:
            raise RuntimeError("densefuse: the compiled extension densefuse._C is not available")
        return getattr(torch.ops.densefuse_ext, name)

    return load


def _triton_op(name: str):
    def load():
        from densefuse.kernels import loss_stats

        return getattr(loss_stats, name)

    return load


def _registry(name: str) -> Registry:
    return Registry(
        name,
        {
            "torch": lambda: getattr(reference, name),
            "cpp": _ext_op(name),
            "cuda": _ext_op(name),
            "triton": _triton_op(name),
        },
    )


_overlap_fwd = _registry("overlap_stats")
_overlap_bwd = _registry("overlap_stats_backward")
_focal_fwd = _registry("focal_stats")
_focal_bwd = _registry("focal_stats_backward")


def _stats_like(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    batch, channels = logits.shape[:2]
    stats = logits.new_empty((batch, channels, k), dtype=reference.accumulate_dtype(logits.dtype))
    return stats, logits.new_empty((3,), dtype=torch.int64)


def _no_second_derivative(op: str) -> Callable[..., None]:
    """The autograd formula of ``op``'s backward op: differentiating it again (a second derivative
    through the loss) raises; a first-order backward with create_graph=True is fine."""

    def backward(ctx: object, *grads: Tensor) -> None:
        raise RuntimeError(
            f"densefuse: {op} has first-order gradients only; a second derivative through it "
            "(double backward, gradgradcheck) is not supported"
        )

    return backward


def _no_context(ctx: object, inputs: tuple, output: Tensor) -> None:
    """Nothing to keep: the formula above only raises."""


# --------------------------------------------------------------------------- overlap (Tversky family)
@torch.library.custom_op("densefuse::overlap_stats", mutates_args=())
def overlap_stats_op(
    logits: Tensor, target: Tensor, activation: int, ignore_index: int | None
) -> tuple[Tensor, Tensor]:
    """logits [B, C, V], target [B, V] labels or [B, C, V] float -> (stats [B, C, 3], flags [3])."""
    return _overlap_fwd(logits.device)(logits, target, activation, ignore_index)


@overlap_stats_op.register_fake
def _(logits, target, activation, ignore_index):
    return _stats_like(logits, 3)


@torch.library.custom_op("densefuse::overlap_stats_backward", mutates_args=())
def overlap_stats_backward_op(
    grad_stats: Tensor, logits: Tensor, target: Tensor, activation: int, ignore_index: int | None
) -> Tensor:
    """dL/dstats [B, C, 3] -> dL/dlogits [B, C, V] (contiguous, logits' dtype)."""
    return _overlap_bwd(logits.device)(grad_stats, logits, target, activation, ignore_index)


@overlap_stats_backward_op.register_fake
def _(grad_stats, logits, target, activation, ignore_index):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _overlap_setup(ctx, inputs, output):
    logits, target, ctx.activation, ctx.ignore_index = inputs
    ctx.backend = forced_backend()
    ctx.save_for_backward(logits, target)


def _overlap_backward(ctx, grad_stats, _grad_flags):
    logits, target = ctx.saved_tensors
    with forced_backend_scope(ctx.backend):
        grad = overlap_stats_backward_op(
            grad_stats.contiguous(), logits, target, ctx.activation, ctx.ignore_index
        )
    return grad, None, None, None


overlap_stats_op.register_autograd(_overlap_backward, setup_context=_overlap_setup)
overlap_stats_backward_op.register_autograd(
    _no_second_derivative("overlap_stats (Tversky, F-beta, Dice)"), setup_context=_no_context
)


# --------------------------------------------------------------------------------------------- focal
@torch.library.custom_op("densefuse::focal_stats", mutates_args=())
def focal_stats_op(
    logits: Tensor,
    target: Tensor,
    activation: int,
    gamma: float,
    alpha_pos: Tensor | None,
    alpha_neg: Tensor | None,
    ignore_index: int | None,
) -> tuple[Tensor, Tensor]:
    """logits [B, C, V], target [B, V] or [B, C, V], alphas [C] fp32 -> (stats [B, C, 2], flags [3])."""
    return _focal_fwd(logits.device)(logits, target, activation, gamma, alpha_pos, alpha_neg, ignore_index)


@focal_stats_op.register_fake
def _(logits, target, activation, gamma, alpha_pos, alpha_neg, ignore_index):
    return _stats_like(logits, 2)


@torch.library.custom_op("densefuse::focal_stats_backward", mutates_args=())
def focal_stats_backward_op(
    grad_stats: Tensor,
    logits: Tensor,
    target: Tensor,
    activation: int,
    gamma: float,
    alpha_pos: Tensor | None,
    alpha_neg: Tensor | None,
    ignore_index: int | None,
) -> Tensor:
    """dL/dstats [B, C, 2] -> dL/dlogits [B, C, V] (contiguous, logits' dtype)."""
    impl = _focal_bwd(logits.device)
    return impl(grad_stats, logits, target, activation, gamma, alpha_pos, alpha_neg, ignore_index)


@focal_stats_backward_op.register_fake
def _(grad_stats, logits, target, activation, gamma, alpha_pos, alpha_neg, ignore_index):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _focal_setup(ctx, inputs, output):
    logits, target, ctx.activation, ctx.gamma, alpha_pos, alpha_neg, ctx.ignore_index = inputs
    ctx.backend = forced_backend()
    ctx.save_for_backward(logits, target, alpha_pos, alpha_neg)


def _focal_backward(ctx, grad_stats, _grad_flags):
    logits, target, alpha_pos, alpha_neg = ctx.saved_tensors
    with forced_backend_scope(ctx.backend):
        grad = focal_stats_backward_op(
            grad_stats.contiguous(), logits, target, ctx.activation, ctx.gamma, alpha_pos, alpha_neg,
            ctx.ignore_index,
        )  # fmt: skip
    return grad, None, None, None, None, None, None


focal_stats_op.register_autograd(_focal_backward, setup_context=_focal_setup)
focal_stats_backward_op.register_autograd(
    _no_second_derivative("focal_stats (focal loss)"), setup_context=_no_context
)


# ------------------------------------------------------------------------------------ public wrappers
def overlap_stats(
    logits: Tensor, target: Tensor, activation: str = "sigmoid", ignore_index: int | None = None
) -> Tensor:
    """Soft confusion sums per (batch, class) in one pass: stats [B, C, 3] = (S_pg, S_p, S_g).

    Args:
        logits: [B, C, *spatial] float16/bfloat16/float32/float64, any strides.
        target: integer labels [B, *spatial] or [B, 1, *spatial] (one-hot over C when C > 1, binary
            when C == 1), or a float target [B, C, *spatial] (soft labels allowed).
        activation: "sigmoid", "softmax" (over C) or "none" (logits are probabilities already).
        ignore_index: label whose voxels are left out of every sum (label maps only).

    Returns fp32 sums (fp64 for fp64 logits), differentiable w.r.t. logits: p = act(logits),
    S_pg = sum p*g, S_p = sum p, S_g = sum g over the voxels not ignored.
    """
    logits = _validate.check_logits(logits)
    code = _validate.check_activation(activation, ("none", "sigmoid", "softmax"))
    ignore_index = _validate.check_ignore_index(ignore_index)
    target = _validate.normalize_target(target, logits, ignore_index)
    stats, flags = overlap_stats_op(_validate.flatten_spatial(logits, 2), target, code, ignore_index)
    _validate.raise_on_flags(flags, logits.shape[1])
    return stats


def _check_alpha(name: str, alpha: Tensor | None, logits: Tensor) -> Tensor | None:
    if alpha is None:
        return None
    alpha = _validate.check_tensor(name, alpha)
    if alpha.shape != (logits.shape[1],):
        raise ValueError(
            f"{name}: expected shape ({logits.shape[1]},) (one per class), got {tuple(alpha.shape)}"
        )
    # values checked where that needs no device sync: on the CPU (FocalLoss checks its own alpha once)
    if alpha.device.type == "cpu" and _validate.value_checks_enabled():
        if not bool((torch.isfinite(alpha) & (alpha >= 0)).all()):
            raise ValueError(f"{name}: expected finite weights >= 0, got {alpha.tolist()}")
    return alpha.to(device=logits.device, dtype=reference.accumulate_dtype(logits.dtype)).contiguous()


def focal_stats(
    logits: Tensor,
    target: Tensor,
    activation: str = "sigmoid",
    gamma: float = 2.0,
    alpha_pos: Tensor | None = None,
    alpha_neg: Tensor | None = None,
    ignore_index: int | None = None,
) -> Tensor:
    """Focal loss summed per (batch, class) in one pass: stats [B, C, 2] = (sum loss, valid voxels).

    Element loss (see densefuse.reference.focal_elementwise): sigmoid
    a * (1 - p_t)^gamma * BCE with a = g*alpha_pos_c + (1 - g)*alpha_neg_c, or softmax
    -alpha_pos_c * g_c * (1 - p_c)^gamma * log p_c. Arguments as in overlap_stats; alpha_* are
    per-class [C] tensors (None: 1), finite and >= 0 (checked where they lie on the CPU: a check of
    values on a GPU would cost a sync per call). Differentiable w.r.t. logits (slot 0).
    """
    logits = _validate.check_logits(logits)
    code = _validate.check_activation(activation, ("sigmoid", "softmax"))
    gamma = _validate.check_number("gamma", gamma)
    ignore_index = _validate.check_ignore_index(ignore_index)
    target = _validate.normalize_target(target, logits, ignore_index)
    alpha_pos = _check_alpha("alpha_pos", alpha_pos, logits)
    alpha_neg = _check_alpha("alpha_neg", alpha_neg, logits)
    stats, flags = focal_stats_op(
        _validate.flatten_spatial(logits, 2), target, code, float(gamma), alpha_pos, alpha_neg, ignore_index
    )
    _validate.raise_on_flags(flags, logits.shape[1])
    return stats
