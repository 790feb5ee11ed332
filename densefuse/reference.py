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

Patch fusion (sliding-window inference, DESIGN §3b): patch_scatter / patch_gather add weighted
windows into an accumulator, fusion_normalizer is the summed weight per voxel, patch_normalize /
patch_finalize divide by it and apply the activation, threshold or argmax. See that section below.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, TypeVar

import torch
import torch.nn.functional as F

ACTIVATIONS = {"none": 0, "sigmoid": 1, "softmax": 2}


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for every input dtype but float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def probabilities(logits: torch.Tensor, activation: int) -> torch.Tensor:
    """p = logits | sigmoid(logits) | softmax(logits, dim=1), in the accumulation dtype."""
    dtype = accumulate_dtype(logits.dtype)
    x = logits if logits.dtype == dtype else logits.to(dtype)
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


# ------------------------------------------------------------------------------- patch fusion (§3b)
# Windows [N, C, rz, ry, rx] with starts [N, 4] = (batch, z, y, x) are added into an accumulator
# acc [B, C, D, H, W] (float32/float64) with the weight w(i, j, k) = max((wz[i] * wy[j]) * wx[k], floor),
# computed in acc's dtype. A window may hang over the volume's edge (negative starts included): only
# its part inside the volume is read and added. Windows entirely outside, or whose batch index is not
# in [0, B), add nothing and are counted in the flags. The weight vectors arrive in acc's dtype.
FUSE_OUTPUTS = {"probabilities": 0, "mask": 1}


def _clip(start: int, length: int, size: int) -> tuple[int, int, int, int] | None:
    """(lo, hi) inside [0, size) and (a, b) inside the window for [start, start + length), or None."""
    lo, hi = max(start, 0), min(start + length, size)
    return (lo, hi, lo - start, hi - start) if lo < hi else None


def window_weight(wz: torch.Tensor, wy: torch.Tensor, wx: torch.Tensor, floor: float) -> torch.Tensor:
    """max((wz[i] * wy[j]) * wx[k], floor) as [rz, ry, rx] in the vectors' dtype."""
    w = (wz[:, None, None] * wy[None, :, None]) * wx[None, None, :]
    return w.clamp(min=floor) if floor > 0 else w


def _placements(acc: torch.Tensor, windows: torch.Tensor, starts: torch.Tensor):
    """([(n, acc index, window index)] for the windows that overlap the volume, number skipped)."""
    batch, _, *size = acc.shape
    roi = windows.shape[2:]
    placed = []
    for n, (b, *start) in enumerate(starts.tolist()):
        parts = [_clip(s, r, d) for s, r, d in zip(start, roi, size)]
        if 0 <= b < batch and all(p is not None for p in parts):
            out = (b, slice(None), *(slice(p[0], p[1]) for p in parts))
            win = tuple(slice(p[2], p[3]) for p in parts)
            placed.append((n, out, win))
    return placed, len(starts) - len(placed)


def _patch_flags(acc: torch.Tensor, windows: torch.Tensor, placed, skipped: int) -> torch.Tensor:
    """int64 [2]: non-finite window values that land inside the volume, windows skipped."""
    bad = sum(((~torch.isfinite(windows[n][(slice(None), *win)])).sum() for n, _, win in placed), start=0)
    return torch.tensor([int(bad), skipped], dtype=torch.int64, device=acc.device)


def patch_scatter(
    acc: torch.Tensor,
    windows: torch.Tensor,
    starts: torch.Tensor,
    wz: torch.Tensor,
    wy: torch.Tensor,
    wx: torch.Tensor,
    floor: float,
) -> torch.Tensor:
    """acc[b, :, z+i, y+j, x+k] += w(i, j, k) * windows[n, :, i, j, k] for every window n, in order.

    Mutates acc; returns flags int64 [2] (non-finite window values added, windows skipped).
    """
    placed, skipped = _placements(acc, windows, starts)
    weight = window_weight(wz, wy, wx, floor)
    for n, out, win in placed:
        acc[out] += weight[win] * windows[n][(slice(None), *win)].to(acc.dtype)
    return _patch_flags(acc, windows, placed, skipped)


def patch_gather(
    acc: torch.Tensor,
    windows: torch.Tensor,
    starts: torch.Tensor,
    wz: torch.Tensor,
    wy: torch.Tensor,
    wx: torch.Tensor,
    floor: float,
) -> torch.Tensor:
    """patch_scatter computed output-stationary: the deterministic variant.

    Each voxel of the windows' union box first sums its covering windows' w * value in window order
    (starting from 0), then that sum is added to acc once: acc[v] += sum_n w_n(v) * windows_n(v).
    The result equals patch_scatter up to rounding and is the same bits on every run.
    """
    placed, skipped = _placements(acc, windows, starts)
    if placed:
        weight = window_weight(wz, wy, wx, floor)
        box = [
            slice(min(out[d].start for _, out, _ in placed), max(out[d].stop for _, out, _ in placed))
            for d in range(2, 5)
        ]
        partial = acc.new_zeros((acc.shape[0], acc.shape[1], *(s.stop - s.start for s in box)))
        for n, out, win in placed:
            local = tuple(slice(o.start - b.start, o.stop - b.start) for o, b in zip(out[2:], box))
            values = windows[n][(slice(None), *win)].to(acc.dtype)
            partial[(out[0], slice(None), *local)] += weight[win] * values
        acc[(slice(None), slice(None), *box)] += partial
    return _patch_flags(acc, windows, placed, skipped)


def axis_normalizer(size: int, starts: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """S[i] = sum over starts s with 0 <= i - s < len(w) of w[i - s], for i in [0, size)."""
    total = w.new_zeros(size)
    for s in starts.tolist():
        part = _clip(s, w.numel(), size)
        if part is not None:
            total[part[0] : part[1]] += w[part[2] : part[3]]
    return total


def fusion_normalizer(
    size: tuple[int, int, int],
    starts_z: torch.Tensor,
    starts_y: torch.Tensor,
    starts_x: torch.Tensor,
    wz: torch.Tensor,
    wy: torch.Tensor,
    wx: torch.Tensor,
    floor: float,
) -> torch.Tensor:
    """N(z, y, x) [D, H, W] = sum over the grid windows covering (z, y, x) of w(z - a, y - b, x - c).

    The windows are the Cartesian grid starts_z x starts_y x starts_x. With floor == 0 the weight
    is separable and N = Sz (x) Sy (x) Sx, the outer product of three axis_normalizer sums. With a
    floor the weights of all covering windows are summed one window at a time (reference only: the
    kernels loop over the few covering starts per voxel instead of building this map).
    """
    if floor <= 0:
        axes = zip(size, (starts_z, starts_y, starts_x), (wz, wy, wx))
        sums = [axis_normalizer(n, s, w) for n, s, w in axes]
        return (sums[0][:, None, None] * sums[1][None, :, None]) * sums[2][None, None, :]
    total = wz.new_zeros(size)
    weight = window_weight(wz, wy, wx, floor)
    roi = weight.shape
    for a in starts_z.tolist():
        for b in starts_y.tolist():
            for c in starts_x.tolist():
                parts = [_clip(s, r, d) for s, r, d in zip((a, b, c), roi, size)]
                if all(p is not None for p in parts):
                    inside = tuple(slice(p[0], p[1]) for p in parts)
                    total[inside] += weight[tuple(slice(p[2], p[3]) for p in parts)]
    return total


def _fused_values(acc, starts_z, starts_y, starts_x, wz, wy, wx, floor):
    """(acc / N, covered [1, 1, D, H, W]): voxels with N below the dtype's smallest normal number
    (covered by no window, or only by zero weights) count as uncovered and read 0."""
    norm = fusion_normalizer(tuple(acc.shape[2:]), starts_z, starts_y, starts_x, wz, wy, wx, floor)
    covered = (norm >= torch.finfo(acc.dtype).tiny)[None, None]
    safe = torch.where(covered, norm, torch.ones_like(norm))
    return torch.where(covered, acc / safe, torch.zeros_like(acc)), covered


def patch_normalize(
    acc: torch.Tensor,
    starts_z: torch.Tensor,
    starts_y: torch.Tensor,
    starts_x: torch.Tensor,
    wz: torch.Tensor,
    wy: torch.Tensor,
    wx: torch.Tensor,
    floor: float,
    activation: int,
) -> None:
    """In place: acc = act(acc / N) on covered voxels, 0 on uncovered ones (act: ACTIVATIONS code)."""
    acc.copy_(patch_finalize(acc, starts_z, starts_y, starts_x, wz, wy, wx, floor, activation, 0, 0.0))


def patch_finalize(
    acc: torch.Tensor,
    starts_z: torch.Tensor,
    starts_y: torch.Tensor,
    starts_x: torch.Tensor,
    wz: torch.Tensor,
    wy: torch.Tensor,
    wx: torch.Tensor,
    floor: float,
    activation: int,
    output: int,
    threshold: float,
) -> torch.Tensor:
    """The fused prediction from an accumulator [B, C, D, H, W] (acc is not modified).

    v = acc / N (N: fusion_normalizer). output 0 (probabilities): act(v) in acc's dtype, [B, C, ...].
    output 1 (mask), uint8: softmax -> argmax_c v (first maximum), [B, 1, ...]; none/sigmoid ->
    [act(v) >= threshold] per channel, [B, C, ...]. Uncovered voxels are 0 in every output.
    """
    values, covered = _fused_values(acc, starts_z, starts_y, starts_x, wz, wy, wx, floor)
    if output == 0:
        return torch.where(covered, probabilities(values, activation), torch.zeros_like(values))
    if activation == 2:
        mask = values.argmax(dim=1, keepdim=True)
    else:
        mask = probabilities(values, activation) >= threshold
    return (mask * covered).to(torch.uint8)


# Window extraction, the gather-side twin of patch_scatter: windows [N, C, rz, ry, rx] read from a
# volume [B, C, D, H, W] at starts [N, 4] = (batch, z, y, x). Where a window leaves the volume it reads
# the padded volume; the padding (PAD_MODES) is computed per axis, never built: constant -> cval;
# reflect mirrors without repeating the edge (torch's "reflect", continued periodically where the
# window reaches further than one volume length); replicate repeats the edge; circular wraps around.
PAD_MODES = {"constant": 0, "reflect": 1, "replicate": 2, "circular": 3}


def pad_index(start: int, length: int, size: int, mode: int) -> torch.Tensor:
    """int64 [length]: the index in [0, size) that padding ``mode`` reads for positions start ..
    start + length - 1 of one axis; -1 where constant padding (mode 0) reads cval."""
    i = torch.arange(start, start + length)
    if mode == 0:
        return torch.where((i >= 0) & (i < size), i, -1)
    if mode == 2:
        return i.clamp(0, size - 1)
    if mode == 3:
        return i.remainder(size)
    if size == 1:  # reflect
        return torch.zeros_like(i)
    period = 2 * (size - 1)
    i = i.remainder(period)
    return torch.where(i < size, i, period - i)


def patch_extract(
    out: torch.Tensor, volume: torch.Tensor, starts: torch.Tensor, mode: int, cval: float
) -> None:
    """In place: out[n, c, i, j, k] = padded(volume)[b, c, z + i, y + j, x + k] for starts[n] = (b, z, y, x).

    out [N, C, rz, ry, rx] has volume's dtype; a window whose batch index is not in [0, B) reads cval.
    """
    for n, (b, *start) in enumerate(starts.tolist()):
        if not 0 <= b < volume.shape[0]:
            out[n].fill_(cval)
            continue
        index = [
            pad_index(s, r, d, mode).to(volume.device)
            for s, r, d in zip(start, out.shape[2:], volume.shape[2:])
        ]
        window = volume[b]
        for axis, i in enumerate(index):
            window = window.index_select(axis + 1, i.clamp(min=0))
        if mode == 0:
            inside = (index[0] >= 0)[:, None, None] & (index[1] >= 0)[None, :, None] & (index[2] >= 0)
            window = window.masked_fill(~inside, cval)
        out[n].copy_(window)


# ---------------------------------------------------------------- memory-efficient dense blocks (§3c)
# A dense block keeps the concatenation of its input and every layer's new maps in one buffer
# [B, C_total, V]; these ops read a channel prefix or slice of it, x [B, C, V] (a view, any strides,
# any float dtype). Per-channel statistics and BN parameters are [C] in the accumulation dtype (fp32;
# fp64 for fp64 x). With pre = (x - mean) * invstd * weight + bias, a layer's input is relu(pre):
# BN-affine + ReLU with given statistics, i.e. eval-mode batch norm with running variance
# invstd^-2 and eps 0 (how BN's native backward kernel is used below).


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [C], biased variance [C]) of x [B, C, V] over its B*V values per channel.

    Accumulation dtype; numerically stable (BN's two-pass kernel: mean, then the sum of squared
    deviations; never E[x^2] - E[x]^2).
    """
    return torch.batch_norm_update_stats(x.to(accumulate_dtype(x.dtype)), None, None, 0.0)


def _pre(x, mean, invstd, weight, bias):
    """pre = x * scale + shift in the accumulation dtype, scale = weight invstd, shift = bias - mean scale."""
    scale = weight * invstd
    return torch.addcmul((bias - mean * scale)[:, None], x, scale[:, None])


def bn_relu(
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """y = relu((x - mean) * invstd * weight + bias): [B, C, V] in out_dtype."""
    return _pre(x, mean, invstd, weight, bias).relu_().to(out_dtype)


def bn_relu_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    grad_x: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of bn_relu with the statistics held fixed; grad_x [B, C, V] is accumulated in place.

    g = grad_y * [pre > 0]:  grad_x += g * weight * invstd;  returns (dweight, dbias) [C] =
    (sum g * xhat, sum g) over B*V, xhat = (x - mean) * invstd. The batch-statistics terms are
    bn_stats_correction's.
    """
    pre = _pre(x, mean, invstd, weight, bias)
    g = torch.where(pre > 0, grad_y.to(pre.dtype), 0.0)  # NaN pre: 0, as relu'(NaN) is taken to be
    del pre
    return _bn_backward(g, x, mean, invstd, weight, grad_x)


def _bn_backward(g, x, mean, invstd, weight, grad_x):
    """grad_x += g * weight * invstd in place -> (sum g * xhat, sum g) (BN's eval-mode reduction).

    The statistics go in as the running and the saved ones: the CPU kernel reads the running ones in
    eval mode, the CUDA kernel the saved ones (it asserts that they are defined)."""
    _, dweight, dbias = torch.ops.aten.native_batch_norm_backward(
        g, x.to(g.dtype), weight, mean, invstd.pow(-2), mean, invstd, False, 0.0, [False, True, True]
    )
    grad_x.addcmul_(g, (weight * invstd)[:, None])
    return dweight, dbias


# bn_relu_conv1x1(_backward): relu(pre) exists for at most this many channels' worth of values at a time
# (backward: input channels per GEMM; forward: voxel ranges of every channel, _voxel_chunks).
DENSE_CHANNEL_BLOCK = 64


class BnReluKernels(NamedTuple):
    """The elementwise steps bn_relu_conv1x1(_backward) run around their GEMMs, with bn_relu's and
    bn_relu_backward's signatures: this module's, or a backend's (the cpp backend's one-pass kernels).

    bf16_gemm: with bf16 GEMM operands the GEMMs run in bf16 (fp32 accumulation inside, as oneDNN
    does, the result rounded once to bf16, as a bf16 convolution); the reference (False) computes
    every product sum in fp32 on the bf16-rounded operands and rounds once.
    """

    bn_relu: Callable[..., torch.Tensor]
    bn_relu_backward: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    bf16_gemm: bool = False

    def gemm_dtype(self, operand_dtype: torch.dtype, acc: torch.dtype) -> torch.dtype:
        """The dtype the GEMMs run in for operands rounded to ``operand_dtype``."""
        return operand_dtype if self.bf16_gemm and operand_dtype == torch.bfloat16 else acc


def _rounded(t: torch.Tensor, dtype: torch.dtype, acc: torch.dtype) -> torch.Tensor:
    """t rounded to ``dtype`` (a GEMM operand dtype), then held in ``acc`` for the arithmetic."""
    return t.to(dtype).to(acc)


def _voxel_chunks(channels: int, voxels: int) -> list[slice]:
    """Voxel ranges over which relu(pre) of ``channels`` channels is at most as large as
    DENSE_CHANNEL_BLOCK channels over every voxel."""
    step = max(1, voxels * DENSE_CHANNEL_BLOCK // max(channels, 1))
    return [slice(v, min(v + step, voxels)) for v in range(0, voxels, step)]


def bn_relu_conv1x1(
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    conv_weight: torch.Tensor,
    out_dtype: torch.dtype,
    kernels: BnReluKernels | None = None,
) -> torch.Tensor:
    """1x1x1 convolution of bn_relu(x): out [B, C_out, V] = conv_weight [C_out, C] @ relu(pre).

    Both GEMM operands are rounded to out_dtype (as a convolution under autocast), the products are
    summed in the accumulation dtype and the result is rounded to out_dtype. Runs one voxel range at
    a time (_voxel_chunks), every input channel at once, so relu(pre) is never stored whole and each
    output value comes from one GEMM. ``kernels``: the elementwise steps (default: this module's
    bn_relu and bn_relu_backward).
    """
    kernels = kernels or BnReluKernels(bn_relu, bn_relu_backward)
    gemm = kernels.gemm_dtype(out_dtype, accumulate_dtype(x.dtype))
    w = _rounded(conv_weight, out_dtype, gemm).expand(x.shape[0], -1, -1)
    out = x.new_empty((x.shape[0], conv_weight.shape[0], x.shape[2]), dtype=gemm)
    for v in _voxel_chunks(x.shape[1], x.shape[2]):
        y = kernels.bn_relu(x[:, :, v], mean, invstd, weight, bias, out_dtype).to(gemm)
        out[:, :, v] = torch.bmm(w, y)
    return out.to(out_dtype)


def bn_relu_conv1x1_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    conv_weight: torch.Tensor,
    grad_x: torch.Tensor,
    kernels: BnReluKernels | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of bn_relu_conv1x1 (statistics held fixed); grad_x [B, C, V] is accumulated in place.

    grad_y = conv_weight^T @ grad_out, then bn_relu_backward; returns (dweight [C], dbias [C],
    dconv_weight [C_out, C] = sum_b grad_out[b] @ relu(pre[b])^T), all in the accumulation dtype.
    GEMM operands are rounded to grad_out's dtype; DENSE_CHANNEL_BLOCK input channels at a time.
    """
    kernels = kernels or BnReluKernels(bn_relu, bn_relu_backward)
    acc = accumulate_dtype(x.dtype)
    dtype = grad_out.dtype
    gemm = kernels.gemm_dtype(dtype, acc)
    grad_out = grad_out.to(gemm)
    dweight, dbias = torch.empty_like(mean), torch.empty_like(mean)
    dconv = conv_weight.new_empty(conv_weight.shape, dtype=acc)
    for c0 in range(0, x.shape[1], DENSE_CHANNEL_BLOCK):
        c = slice(c0, c0 + DENSE_CHANNEL_BLOCK)
        y = kernels.bn_relu(x[:, c], mean[c], invstd[c], weight[c], bias[c], dtype).to(gemm)
        dconv[:, c] = torch.bmm(grad_out, y.transpose(1, 2)).sum(dim=0, dtype=acc)
        del y
        grad_y = torch.bmm(_rounded(conv_weight[:, c], dtype, gemm).T.expand(x.shape[0], -1, -1), grad_out)
        dweight[c], dbias[c] = kernels.bn_relu_backward(
            grad_y, x[:, c], mean[c], invstd[c], weight[c], bias[c], grad_x[:, c]
        )
    return dweight, dbias, dconv


def bn_stats_correction(
    grad_x: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, a: torch.Tensor, b: torch.Tensor
) -> None:
    """In place: grad_x -= (a + (x - mean) * b) / M per channel, M = B*V values of x [B, C, V].

    The batch-statistics terms of BN's input gradient, folded once per channel for all the layers l
    that normalise it with the shared mean: a = sum_l weight_l invstd_l dbias_l,
    b = sum_l weight_l invstd_l^2 dweight_l (invstd_l, dweight_l, dbias_l of layer l).
    """
    count = x.shape[0] * x.shape[2]
    grad_x -= torch.addcmul(((a - mean * b) / count)[:, None], x.to(a.dtype), (b / count)[:, None])


# Dropout of a dense layer's new maps by a counter-based hash: no random tensor and no stored mask, the
# same mask whenever it is applied again (the fused block's backward) and on every backend. Element i
# (row-major index) of x is kept iff h(i) >= floor(p 2^32), h(i) = lowbias32(lo32(i) ^ lowbias32(key +
# hi32(i))) mod 2^32, key = lowbias32(lo32(seed) ^ lowbias32(hi32(seed))); kept values are scaled by
# 1 / (1 - p) in the accumulation dtype. lowbias32: C. Wellons' 32-bit integer hash.
_MASK32 = 0xFFFFFFFF
_U32 = TypeVar("_U32", int, torch.Tensor)  # uint32 values: Python ints or int64 tensors


def _mul32(x: _U32, c: int) -> _U32:
    """x * c mod 2^32 for x, c < 2^32, every product below 2^49 (no int64 overflow)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def _lowbias32(x: _U32) -> _U32:
    """lowbias32 of uint32 values: Python ints or int64 tensors."""
    x = _mul32(x ^ (x >> 16), 0x7FEB352D)
    x = _mul32(x ^ (x >> 15), 0x846CA68B)
    return x ^ (x >> 16)


def dropout_key(seed: int) -> int:
    """The per-call hash key of ``seed`` (any int64)."""
    return _lowbias32((seed & _MASK32) ^ _lowbias32((seed >> 32) & _MASK32))


def dropout_threshold(p: float) -> int:
    """floor(p 2^32): h(i) < threshold drops element i (p = 1: 2^32, every element)."""
    return int(p * 2**32)


def dropout(x: torch.Tensor, seed: int, p: float) -> None:
    """In place on a contiguous x: x[i] = x[i] / (1 - p) where h(i) >= floor(p 2^32), else 0."""
    index = torch.arange(x.numel(), dtype=torch.int64, device=x.device)
    hashed = _lowbias32((index & _MASK32) ^ _lowbias32((dropout_key(seed) + (index >> 32)) & _MASK32))
    keep = (hashed >= dropout_threshold(p)).view(x.shape)
    scale = 1 / (1 - p) if p < 1 else 0.0
    x.copy_(torch.where(keep, x.to(accumulate_dtype(x.dtype)) * scale, 0))
