"""Imbalance-aware segmentation losses on the fused densefuse ops, drop-in for monai.losses.

TverskyLoss, FBetaLoss and DiceLoss reduce logits + targets to the three sums per (batch, class)
of densefuse.ops.overlap_stats (S_pg, S_p, S_g) in one pass; FocalLoss uses focal_stats. The
constructors take MONAI's arguments and give MONAI's values on MONAI's input conventions
(input [B, C, *spatial]; target one-hot [B, C, *spatial] or labels [B, 1, *spatial] with
to_onehot_y=True). They go further in three ways:

- integer label maps ([B, *spatial] or [B, 1, *spatial]) are accepted directly, never one-hot
  encoded in memory (when C > 1 they are one-hot over C; when C == 1 they are binary {0, 1});
- sums are accumulated in fp32 whatever the logits' dtype (fp16/bf16 logits are fine);
- TverskyLoss and FBetaLoss take per-class ``weight`` like DiceLoss.

Not supported (a ValueError says so): ``soft_label=True`` (it needs sum |p - g|), DiceLoss
``squared_pred=True``, and ``ignore_index`` with float (one-hot) targets: pass integer labels.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from densefuse import reference
from densefuse.ops import _validate
from densefuse.ops.loss_stats import focal_stats, overlap_stats

_REDUCTIONS = ("none", "mean", "sum")


def _check_reduction(reduction: str) -> str:
    reduction = getattr(reduction, "value", reduction)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected one of {_REDUCTIONS}, got {reduction!r}")
    return reduction


def _focal_alpha(alpha: object) -> float | Sequence[float] | Tensor | None:
    """FocalLoss's alpha: None, one number in [0, 1] (as a float), or one finite weight >= 0 per
    class (a 1-D sequence, array or tensor, kept as given)."""
    if alpha is None:
        return None
    if _validate.holds_complex(alpha):
        raise TypeError(f"alpha: expected real weights, got {alpha!r}")
    try:  # read on the CPU: a tensor on another device (MPS has no float64) is checked as a copy
        values = torch.as_tensor(
            alpha.detach().cpu() if isinstance(alpha, Tensor) else alpha, dtype=torch.float64
        )
    except (TypeError, ValueError, RuntimeError):
        values = None
    if values is not None and values.ndim == 0:
        return _validate.check_number("alpha", alpha, high=1.0)
    if values is None or values.ndim != 1 or not values.numel() or not _finite_non_negative(values):
        raise ValueError(
            f"alpha: expected a number in [0, 1] or one finite weight >= 0 per class, got {alpha!r}"
        )
    return alpha


def _class_weight(weight: Sequence[float] | float | Tensor | None) -> Tensor | None:
    if weight is None:
        return None
    if _validate.holds_complex(weight):
        raise TypeError(f"weight: expected real weights, got {weight!r}")
    try:
        values = torch.as_tensor(weight, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):  # a string, a None inside, a ragged list...
        values = None
    if values is None or values.ndim > 1 or not _finite_non_negative(values):
        shown = weight if values is None else values.tolist()
        raise ValueError(f"weight: expected a finite number >= 0 or a 1-D sequence of them, got {shown!r}")
    return values


def _finite_non_negative(values: Tensor) -> bool:
    return bool(torch.isfinite(values).all() and (values >= 0).all())


def _prepare_target(target: Tensor, logits: Tensor, to_onehot_y: bool) -> Tensor:
    """MONAI conventions -> what the ops take: integer labels, or a float target of the logits' shape."""
    target = _validate.check_constant_target(target)  # before any cast below, which would drop the flag
    channels = logits.shape[1]
    if target.is_floating_point() and target.dim() == logits.dim() and target.shape[1] == 1 and channels > 1:
        if not to_onehot_y:
            raise ValueError(
                f"target: shape {tuple(target.shape)} holds labels but to_onehot_y=False and the input has "
                f"{channels} channels; set to_onehot_y=True or pass integer labels"
            )
        labels = target.long()
        if _validate.value_checks_enabled() and not torch.equal(labels.to(target.dtype), target):
            raise ValueError("target: float labels must hold integer values; pass an integer label map")
        return labels
    if not target.is_floating_point() and target.dim() == logits.dim() and target.shape[1] == channels > 1:
        if tuple(target.shape) != tuple(logits.shape):
            raise ValueError(
                f"target: an integer target with the logits' {channels} channels is read as one-hot and "
                f"must have their shape {tuple(logits.shape)}, got {tuple(target.shape)}"
            )
        return target.to(logits.dtype if logits.dtype != torch.float16 else torch.float32)  # one-hot ints
    return target


def _single_channel_warning(setting: str) -> None:
    if not torch.compiler.is_compiling():
        warnings.warn(f"single channel prediction, `{setting}` ignored.", stacklevel=3)


class _OverlapLoss(nn.Module):
    """Shared front end of the Tversky family: activation, target conventions, class/batch handling."""

    def __init__(
        self,
        include_background: bool,
        to_onehot_y: bool,
        sigmoid: bool,
        softmax: bool,
        other_act: Callable[[Tensor], Tensor] | None,
        reduction: str,
        smooth_nr: float,
        smooth_dr: float,
        batch: bool,
        weight: Sequence[float] | float | Tensor | None,
        soft_label: bool,
        ignore_index: int | None,
    ) -> None:
        super().__init__()
        if other_act is not None and not callable(other_act):
            raise TypeError(f"other_act: expected a callable, got {type(other_act).__name__}")
        if int(sigmoid) + int(softmax) + int(other_act is not None) > 1:
            raise ValueError("sigmoid, softmax, other_act: at most one may be set")
        if soft_label:
            raise ValueError("soft_label: True is not supported by the fused loss (it needs sum |p - g|)")
        self.include_background = include_background
        self.to_onehot_y = to_onehot_y
        self.sigmoid = sigmoid
        self.softmax = softmax
        self.other_act = other_act
        self.reduction = _check_reduction(reduction)
        self.smooth_nr = _validate.check_number("smooth_nr", smooth_nr)
        self.smooth_dr = _validate.check_number("smooth_dr", smooth_dr)
        self.batch = batch
        self.ignore_index = _validate.check_ignore_index(ignore_index)
        self.register_buffer("class_weight", _class_weight(weight))

    def overlap_sums(self, input: Tensor, target: Tensor) -> Tensor:
        """(S_pg, S_p, S_g) per (batch, class) [B, C', 3] (or [C', 3] with batch=True), fp32/fp64."""
        logits = _validate.check_logits(input)
        channels = logits.shape[1]
        activation = "sigmoid" if self.sigmoid else "none"
        if self.softmax:
            if channels == 1:
                _single_channel_warning("softmax=True")
            else:
                activation = "softmax"
        if self.other_act is not None:
            logits = self.other_act(logits)
        if self.to_onehot_y and channels == 1:
            _single_channel_warning("to_onehot_y=True")
        target = _prepare_target(target, logits, self.to_onehot_y)
        stats = overlap_stats(logits, target, activation, self.ignore_index)
        if not self.include_background:
            if channels == 1:
                _single_channel_warning("include_background=False")
            else:
                stats = stats[:, 1:]
        return stats.sum(0) if self.batch else stats

    def ratio_score(self, stats: Tensor, numerator: Sequence[float], denominator: Sequence[float]) -> Tensor:
        """1 - (stats . numerator + smooth_nr) / (stats . denominator + smooth_dr) over the last axis.

        Every loss of the family is this ratio of two linear forms in (S_pg, S_p, S_g), since
        TP = S_pg, FP = S_p - S_pg and FN = S_g - S_pg: a few autograd nodes on [B, C] tensors
        instead of a dozen. (Written as 1 - num / den, not (den - num) / den, so that the gradient has
        no cancellation when num ~ den.) A broadcast product and a sum, not a matmul: autocast would
        run a matmul in float16, where sums of a large patch overflow (65504) and the loss is NaN.
        """
        rows = [[n, d] for n, d in zip(numerator, denominator)]
        coefficients = stats.new_tensor([*rows, [self.smooth_nr, self.smooth_dr]])  # [4, 2]
        num, den = ((stats[..., None] * coefficients[:3]).sum(-2) + coefficients[3]).unbind(-1)
        return 1.0 - num / den

    def weighted(self, score: Tensor) -> Tensor:
        if self.class_weight is None or score.shape[-1] == 1:
            return score
        weight = self.class_weight.to(score)
        if weight.ndim == 1 and weight.numel() != score.shape[-1]:
            raise ValueError(
                f"weight: expected {score.shape[-1]} values (one per class, background excluded when "
                f"include_background=False), got {weight.numel()}"
            )
        return score * weight

    def reduce(self, score: Tensor) -> Tensor:
        if self.reduction == "mean":
            return score.mean()
        if self.reduction == "sum":
            return score.sum()
        return score


class TverskyLoss(_OverlapLoss):
    """Tversky loss 1 - (TP + s_nr) / (TP + alpha*FP + beta*FN + s_dr) per (batch, class), fused.

    Drop-in for monai.losses.TverskyLoss (same arguments and values). alpha weights false
    positives, beta false negatives. input: [B, C, *spatial] logits (or probabilities) in
    fp16/bf16/fp32/fp64; target: see the module docstring. reduction "none" returns [B, C']
    ([C'] with batch=True). ``weight``: optional per-class weights (a densefuse extension).
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable[[Tensor], Tensor] | None = None,
        alpha: float = 0.5,
        beta: float = 0.5,
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        soft_label: bool = False,
        ignore_index: int | None = None,
        weight: Sequence[float] | float | Tensor | None = None,
    ) -> None:
        super().__init__(
            include_background, to_onehot_y, sigmoid, softmax, other_act, reduction, smooth_nr, smooth_dr,
            batch, weight, soft_label, ignore_index,
        )  # fmt: skip
        self.alpha = _validate.check_number("alpha", alpha)
        self.beta = _validate.check_number("beta", beta)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        # TP + alpha FP + beta FN = (1 - alpha - beta) S_pg + alpha S_p + beta S_g
        denominator = (1.0 - self.alpha - self.beta, self.alpha, self.beta)
        score = self.ratio_score(self.overlap_sums(input, target), (1.0, 0.0, 0.0), denominator)
        return self.reduce(self.weighted(score))


class FBetaLoss(TverskyLoss):
    """F-beta loss 1 - F_beta, the paper's asymmetric similarity loss (Hashemi et al. 2019).

    F_beta = (1 + b^2) TP / ((1 + b^2) TP + b^2 FN + FP), i.e. Tversky with alpha = 1/(1 + b^2)
    on FP and beta = b^2/(1 + b^2) on FN. beta = 1.5 (the paper's best) weighs FN by ~0.69.
    Other arguments as TverskyLoss (not alpha: beta sets both weights). ``f_beta`` holds b; setting
    it sets the Tversky weights ``alpha`` and ``beta`` again.
    """

    def __init__(self, beta: float = 1.5, **kwargs) -> None:
        if "alpha" in kwargs:
            raise TypeError(
                "alpha: FBetaLoss sets the Tversky weights from beta (alpha = 1/(1 + beta^2)); "
                "use TverskyLoss for other weights"
            )
        super().__init__(**kwargs)
        self.f_beta = beta

    @property
    def f_beta(self) -> float:
        return self._f_beta

    def __setstate__(self, state: dict) -> None:
        if "f_beta" in state:  # pickled when f_beta was a plain attribute
            state["_f_beta"] = state.pop("f_beta")
        super().__setstate__(state)

    @f_beta.setter
    def f_beta(self, beta: float) -> None:
        self._f_beta = _validate.check_number("beta", beta, open_low=True)
        b2 = self._f_beta**2
        self.alpha, self.beta = 1.0 / (1.0 + b2), b2 / (1.0 + b2)


class DiceLoss(_OverlapLoss):
    """Dice loss 1 - (2 TP + s_nr) / (S_p + S_g + s_dr) per (batch, class), fused.

    Drop-in for monai.losses.DiceLoss (same arguments and values, incl. jaccard and weight);
    reduction "none" returns [B, C', 1, ...] like MONAI. squared_pred=True is not supported.
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        sigmoid: bool = False,
        softmax: bool = False,
        other_act: Callable[[Tensor], Tensor] | None = None,
        squared_pred: bool = False,
        jaccard: bool = False,
        reduction: str = "mean",
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch: bool = False,
        weight: Sequence[float] | float | Tensor | None = None,
        soft_label: bool = False,
        ignore_index: int | None = None,
    ) -> None:
        if squared_pred:
            raise ValueError("squared_pred: True is not supported by the fused loss")
        super().__init__(
            include_background, to_onehot_y, sigmoid, softmax, other_act, reduction, smooth_nr, smooth_dr,
            batch, weight, soft_label, ignore_index,
        )  # fmt: skip
        self.jaccard = jaccard

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        # 2 TP + FP + FN = S_p + S_g; jaccard: 2 (TP + FP + FN) = 2 (S_p + S_g - S_pg)
        denominator = (-2.0, 2.0, 2.0) if self.jaccard else (0.0, 1.0, 1.0)
        stats = self.overlap_sums(input, target)
        score = self.weighted(self.ratio_score(stats, (2.0, 0.0, 0.0), denominator))
        if self.reduction == "none":
            return score.view(*score.shape[:2], *[1] * (input.dim() - 2))
        return self.reduce(score)


class FocalLoss(nn.Module):
    """Focal loss, fused forward and backward; drop-in for monai.losses.FocalLoss.

    sigmoid (default): a * (1 - p_t)^gamma * BCE(x, g) per element, a = g*alpha + (1 - g)*(1 - alpha)
    for a scalar alpha and a = g*alpha_c + (1 - g) for a per-class sequence (MONAI's convention;
    for soft targets we interpolate linearly where MONAI switches on g == 1). use_softmax:
    -alpha_c g_c (1 - p_c)^gamma log p_c with alpha_c = (1 - alpha, alpha, ...) for a scalar.
    Reductions follow MONAI 1.6: "mean" divides by the number of elements (or of valid voxels
    with ignore_index), "sum" averages over space then sums over batch and classes, "none"
    returns the element-wise loss (computed by the reference path, not fused).
    """

    def __init__(
        self,
        include_background: bool = True,
        to_onehot_y: bool = False,
        gamma: float = 2.0,
        alpha: float | Sequence[float] | None = None,
        weight: Sequence[float] | float | Tensor | None = None,
        reduction: str = "mean",
        use_softmax: bool = False,
        ignore_index: int | None = None,
    ) -> None:
        super().__init__()
        self.include_background = include_background
        self.to_onehot_y = to_onehot_y
        self.gamma = _validate.check_number("gamma", gamma)
        self.alpha = _focal_alpha(alpha)
        self.use_softmax = use_softmax
        self.reduction = _check_reduction(reduction)
        self.ignore_index = _validate.check_ignore_index(ignore_index)
        self.register_buffer("class_weight", _class_weight(weight))

    def _alphas(self, channels: int, like: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Per-class (alpha_pos, alpha_neg) [C'] for the op, from MONAI's scalar/sequence alpha."""
        if self.alpha is None:
            return None, None
        dtype = reference.accumulate_dtype(like.dtype)
        if isinstance(self.alpha, float):
            if self.use_softmax:
                if not self.include_background:
                    if not torch.compiler.is_compiling():  # a warning breaks the graph
                        warnings.warn(
                            "`include_background=False`, scalar `alpha` ignored when using softmax.",
                            stacklevel=3,
                        )
                    return None, None
                pos = torch.tensor([1 - self.alpha] + [self.alpha] * (channels - 1), dtype=dtype)
                return pos.to(like.device), None
            full = torch.full((channels,), self.alpha, dtype=dtype, device=like.device)
            return full, 1 - full
        pos = torch.as_tensor(self.alpha, dtype=dtype, device=like.device).flatten()
        if pos.numel() != channels:
            raise ValueError(f"alpha: expected {channels} values (one per class), got {pos.numel()}")
        return pos, None if self.use_softmax else torch.ones_like(pos)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        logits = _validate.check_logits(input)
        channels = logits.shape[1]
        if self.to_onehot_y and channels == 1:
            _single_channel_warning("to_onehot_y=True")
        target = _prepare_target(target, logits, self.to_onehot_y)
        is_labels = not target.is_floating_point()
        activation = "softmax" if self.use_softmax else "sigmoid"
        ignore_index, count, drop_background = self.ignore_index, None, False
        if not self.include_background and channels == 1:
            _single_channel_warning("include_background=False")
        elif not self.include_background and not self.use_softmax:
            drop_background = True  # element-wise loss: compute every class, drop class 0 after
        elif not self.include_background:  # MONAI drops channel 0 before the softmax
            logits = logits[:, 1:]
            if is_labels:  # labels 0 become "no class": a one-hot target over classes 1..C-1
                labels = _validate.normalize_target(target, input, ignore_index)
                flags = reference.input_flags(labels.new_empty((0,)), labels, ignore_index, channels)
                _validate.raise_on_flags(flags, channels)  # logits are checked by the op below
                valid = labels != ignore_index if ignore_index is not None else None
                count = None if valid is None else valid.sum(-1, dtype=torch.float32)
                target = self._sliced_one_hot(labels, channels, valid).view(logits.shape)
                target = target.to(reference.accumulate_dtype(logits.dtype))
                ignore_index = None
            else:
                target = target[:, 1:]
        alpha_pos, alpha_neg = self._alphas(logits.shape[1] - drop_background, logits)
        if drop_background and alpha_pos is not None:
            alpha_pos, alpha_neg = (torch.cat([a.new_ones(1), a]) for a in (alpha_pos, alpha_neg))
        if self.reduction == "none":
            loss = self._elementwise(logits, target, activation, alpha_pos, alpha_neg, ignore_index)
            return self._weighted(loss[:, 1:] if drop_background else loss)
        stats = focal_stats(logits, target, activation, self.gamma, alpha_pos, alpha_neg, ignore_index)
        loss_sum, valid = stats[:, 1:].unbind(-1) if drop_background else stats.unbind(-1)
        if count is not None:
            valid = count.view(-1, 1).expand_as(loss_sum).to(loss_sum)
        loss_sum = self._weighted(loss_sum)
        voxels = logits[0, 0].numel()
        eps = torch.finfo(torch.float32).eps
        masked = self.ignore_index is not None and is_labels
        if self.reduction == "mean":  # MONAI: divide by the element count, or by the valid voxel count
            total = valid[:, 0].sum().clamp(min=eps) if masked else loss_sum.numel() * voxels
            return loss_sum.sum() / total
        per_voxel = loss_sum / (valid.clamp(min=eps) if masked else voxels)  # "sum": spatial mean first
        return per_voxel.sum()

    @staticmethod
    def _sliced_one_hot(labels: Tensor, channels: int, valid: Tensor | None) -> Tensor:
        """[B, C-1, V] one-hot of labels over classes 1..C-1 (zero where ignored)."""
        classes = torch.arange(1, channels, device=labels.device).view(1, -1, 1)
        g = labels.long().unsqueeze(1) == classes
        return g & valid.unsqueeze(1) if valid is not None else g

    def _weighted(self, loss: Tensor) -> Tensor:
        """loss [B, C, ...] times the class weight (a scalar or one per class)."""
        if self.class_weight is None:
            return loss
        weight = self.class_weight.to(loss)
        if weight.ndim == 1:
            if loss.shape[1] == 1:
                raise ValueError("weight: per-class weights are not supported for single-channel outputs")
            if weight.numel() != loss.shape[1]:
                raise ValueError(
                    f"weight: expected {loss.shape[1]} values (one per class), got {weight.numel()}"
                )
            weight = weight.view(-1, *[1] * (loss.dim() - 2))
        return loss * weight

    def _elementwise(self, logits, target, activation, alpha_pos, alpha_neg, ignore_index) -> Tensor:
        """The loss map [B, C, ...] (reduction "none"), after the input checks the fused ops make."""
        target = _validate.normalize_target(target, logits, ignore_index)
        flat = _validate.flatten_spatial(logits, 2)
        if _validate.value_checks_enabled():
            _validate.raise_on_flags(reference.input_flags(flat, target, ignore_index), logits.shape[1])
        code = reference.ACTIVATIONS[activation]
        loss, _ = reference.focal_elementwise(
            flat, target, code, self.gamma, alpha_pos, alpha_neg, ignore_index
        )
        return loss.view(logits.shape)
