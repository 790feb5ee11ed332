"""Pure-PyTorch oracles for every densefuse op: readable, float64-capable, any device.

They define what the kernels compute, serve as the ``torch`` backend, and are what the tests
compare every other backend with. Inputs arrive normalised by densefuse.ops:

    logits  [B, C, V]  float16/bfloat16/float32/float64, any strides (V = D*H*W, flattened).
    target  [B, V]     integer label map (uint8/int8/int16/int32/int64), or
            [B, C, V]  dense float target (soft labels allowed).
    activation         0 none (logits are already probabilities), 1 sigmoid, 2 softmax over C.

Label maps are one-hot over C classes when C > 1 (g_c = [label == c], valid labels [0, C)), and
binary when C == 1 (g = [label == 1], valid labels {0, 1}). Voxels whose label equals
``ignore_index`` are excluded from every sum (and get zero gradient).

Every stats op also returns ``flags`` (int64 [3]): the number of out-of-range labels among the
voxels not ignored, of non-finite logits, and of non-finite dense target values. The op layer
turns non-zero flags into errors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = {"none": 0, "sigmoid": 1, "softmax": 2}


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for every input dtype but float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def probabilities(logits: torch.Tensor, activation: int) -> torch.Tensor:
    """p = logits | sigmoid(logits) | softmax(logits, dim=1), in the accumulation dtype."""
    x = logits.to(accumulate_dtype(logits.dtype))
    if activation == 1:
        return torch.sigmoid(x)
    if activation == 2:
        return torch.softmax(x, dim=1)
    return x


def target_and_mask(
    target: torch.Tensor, num_classes: int, ignore_index: int | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(g [B, C, V] in ``dtype``, valid [B, 1, V] bool) from a label map or a dense target."""
    if target.is_floating_point():
        return target.to(dtype), torch.ones_like(target[:, :1], dtype=torch.bool)
    labels = target.long().unsqueeze(1)  # [B, 1, V]
    valid = torch.ones_like(labels, dtype=torch.bool) if ignore_index is None else labels != ignore_index
    offset = 1 if num_classes == 1 else 0
    classes = torch.arange(num_classes, device=target.device).view(1, -1, 1) + offset
    g = ((labels == classes) & valid).to(dtype)
    return g, valid


def input_flags(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None, num_classes: int | None = None
) -> torch.Tensor:
    """int64 [3]: out-of-range labels (not ignored), non-finite logits, non-finite dense targets.

    num_classes defaults to logits.shape[1].
    """
    num_classes = logits.shape[1] if num_classes is None else num_classes
    zero = torch.zeros((), dtype=torch.int64, device=logits.device)
    bad_targets = zero
    if target.is_floating_point():
        bad_targets = (~torch.isfinite(target)).sum()
        bad_labels = zero
    else:
        labels = target.long()
        upper = 2 if num_classes == 1 else num_classes
        bad = (labels < 0) | (labels >= upper)
        if ignore_index is not None:
            bad &= labels != ignore_index
        bad_labels = bad.sum()
    bad_logits = (~torch.isfinite(logits)).sum()
    return torch.stack([bad_labels, bad_logits, bad_targets])


def overlap_stats(
    logits: torch.Tensor, target: torch.Tensor, activation: int, ignore_index: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """stats [B, C, 3] = (S_pg, S_p, S_g) summed over the valid voxels, and flags [3].

    S_pg = sum_v p*g (soft true positives), S_p = sum_v p, S_g = sum_v g; FP = S_p - S_pg and
    FN = S_g - S_pg, so Tversky, F-beta and Dice all follow from these three sums.
    """
    p = probabilities(logits, activation)
    g, valid = target_and_mask(target, logits.shape[1], ignore_index, p.dtype)
    pv = p * valid
    stats = torch.stack([(pv * g).sum(-1), pv.sum(-1), g.sum(-1)], dim=-1)
    return stats, input_flags(logits, target, ignore_index)


def activation_backward(p: torch.Tensor, grad_p: torch.Tensor, activation: int) -> torch.Tensor:
    """dL/dlogits from dL/dp: identity | p(1-p) dL/dp | p_c (dL/dp_c - sum_k p_k dL/dp_k)."""
    if activation == 1:
        return grad_p * p * (1 - p)
    if activation == 2:
        return p * (grad_p - (p * grad_p).sum(dim=1, keepdim=True))
    return grad_p


def overlap_stats_backward(
    grad_stats: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    activation: int,
    ignore_index: int | None,
) -> torch.Tensor:
    """dL/dlogits [B, C, V] (contiguous, logits' dtype) given dL/dstats [B, C, 3].

    dL/dp_c = valid * (dL/dS_pg * g_c + dL/dS_p); dL/dS_g does not reach the logits.
    """
    p = probabilities(logits, activation)
    g, valid = target_and_mask(target, logits.shape[1], ignore_index, p.dtype)
    grad = grad_stats.to(p.dtype)
    grad_p = (grad[..., 0:1] * g + grad[..., 1:2]) * valid
    return activation_backward(p, grad_p, activation).to(logits.dtype).contiguous()


def _alpha(alpha: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | float:
    return 1.0 if alpha is None else alpha.to(like).view(1, -1, 1)


def focal_elementwise(
    logits: torch.Tensor,
    target: torch.Tensor,
    activation: int,
    gamma: float,
    alpha_pos: torch.Tensor | None,
    alpha_neg: torch.Tensor | None,
    ignore_index: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Focal loss per element [B, C, V] (zero where ignored) and valid [B, 1, V].

    sigmoid (activation 1): a * (1 - p_t)^gamma * BCE(x, g), with (1 - p_t)^gamma computed as
        exp(gamma * logsigmoid(-x (2g - 1))) and a = g*alpha_pos_c + (1 - g)*alpha_neg_c.
    softmax (activation 2): -alpha_pos_c * g_c * (1 - p_c)^gamma * log p_c.
    """
    x = logits.to(accumulate_dtype(logits.dtype))
    g, valid = target_and_mask(target, logits.shape[1], ignore_index, x.dtype)
    if activation == 1:
        bce = x.clamp(min=0) - x * g + torch.log1p(torch.exp(-x.abs()))
        modulator = torch.exp(gamma * F.logsigmoid(-x * (2 * g - 1)))
        weight = g * _alpha(alpha_pos, x) + (1 - g) * _alpha(alpha_neg, x)
        loss = weight * modulator * bce
    elif activation == 2:
        log_p = torch.log_softmax(x, dim=1)
        loss = -_alpha(alpha_pos, x) * g * (-torch.expm1(log_p)).pow(gamma) * log_p
    else:
        raise ValueError(f"activation: focal loss needs sigmoid (1) or softmax (2), got {activation}")
    return loss * valid, valid


def focal_stats(
    logits: torch.Tensor,
    target: torch.Tensor,
    activation: int,
    gamma: float,
    alpha_pos: torch.Tensor | None,
    alpha_neg: torch.Tensor | None,
    ignore_index: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """stats [B, C, 2] = (sum of the focal loss, number of valid voxels), and flags [3]."""
    loss, valid = focal_elementwise(logits, target, activation, gamma, alpha_pos, alpha_neg, ignore_index)
    count = valid.sum(-1).to(loss.dtype).expand(-1, loss.shape[1])
    stats = torch.stack([loss.sum(-1), count], dim=-1)
    return stats, input_flags(logits, target, ignore_index)


def focal_stats_backward(
    grad_stats: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    activation: int,
    gamma: float,
    alpha_pos: torch.Tensor | None,
    alpha_neg: torch.Tensor | None,
    ignore_index: int | None,
) -> torch.Tensor:
    """dL/dlogits [B, C, V] (contiguous, logits' dtype) given dL/dstats [B, C, 2].

    sigmoid: dl/dx = a * m * ((sigmoid(x) - g) - gamma * s * sigmoid(s x) * BCE), s = 2g - 1,
             m = (1 - p_t)^gamma.
    softmax: with w_c = dL/dS_c * alpha_c * g_c and h_c = gamma t^(gamma-1) p_c log p_c - t^gamma
             (t = 1 - p_c), dL/dx_j = w_j h_j - p_j sum_c w_c h_c.
    """
    x = logits.to(accumulate_dtype(logits.dtype))
    g, valid = target_and_mask(target, logits.shape[1], ignore_index, x.dtype)
    coef = grad_stats[..., 0:1].to(x.dtype) * valid
    if activation == 1:
        s = 2 * g - 1
        bce = x.clamp(min=0) - x * g + torch.log1p(torch.exp(-x.abs()))
        modulator = torch.exp(gamma * F.logsigmoid(-x * s))
        weight = g * _alpha(alpha_pos, x) + (1 - g) * _alpha(alpha_neg, x)
        dx = weight * modulator * ((torch.sigmoid(x) - g) - gamma * s * torch.sigmoid(s * x) * bce)
        grad = coef * dx
    elif activation == 2:
        log_p = torch.log_softmax(x, dim=1)
        p = log_p.exp()
        t = -torch.expm1(log_p)
        t_pow = t.pow(gamma)
        safe_t = torch.where(t > 0, t, torch.ones_like(t))
        dpow = torch.where(t > 0, gamma * t_pow / safe_t * p * log_p, torch.zeros_like(t))
        h = dpow - t_pow
        w = coef * _alpha(alpha_pos, x) * g
        grad = w * h - p * (w * h).sum(dim=1, keepdim=True)
    else:
        raise ValueError(f"activation: focal loss needs sigmoid (1) or softmax (2), got {activation}")
    return grad.to(logits.dtype).contiguous()
