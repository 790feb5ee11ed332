"""densefuse.nn losses against monai.losses: the drop-in contract of DESIGN §3a, on every backend.

Every case builds fresh random inputs from the ``rng`` fixture (seeded from the test id, see
conftest.py), runs the densefuse module and the MONAI module with the same constructor arguments on
the same inputs, and compares the loss values AND the gradients w.r.t. the input (a random cotangent
for reduction="none", so every output element is checked). Each test runs once per backend that
``densefuse.available_backends("cpu")`` lists (plus the CUDA backends on a CUDA machine).

Deliberate deviations from MONAI, each pinned by a test below:
- integer label maps ([B, *spatial] or [B, 1, *spatial], uint8/int8/int16/int32/int64, and
  uint16/uint32/uint64 through a widened copy) are accepted directly, with or without to_onehot_y;
  they give MONAI's value for to_onehot_y=True (test_integer_label_maps);
- fp16/bf16 logits: densefuse accumulates in fp32 and returns an fp32 loss, so it matches MONAI run
  on the fp32-upcast logits rather than MONAI's own half-precision arithmetic (MONAI's FocalLoss
  itself casts to fp32, its Dice/Tversky do not) (test_half_precision_logits);
- TverskyLoss/FBetaLoss take a per-class ``weight`` (MONAI's TverskyLoss has none): the result is
  MONAI's reduction="none" score times the weights, then reduced (test_tversky_weight_extension);
- FBetaLoss(beta) is MONAI's TverskyLoss(alpha=1/(1+beta^2), beta=beta^2/(1+beta^2)) (test_fbeta);
- not supported, rejected with a ValueError (tests/test_bad_input.py): soft_label=True,
  DiceLoss(squared_pred=True), ignore_index with a float (one-hot) target.
"""

from __future__ import annotations

import functools
import warnings

import monai.losses as ml
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.utils import LossReduction

import densefuse
import densefuse.nn as dn
from densefuse import ops

pytestmark = pytest.mark.filterwarnings(
    "ignore:single channel prediction", "ignore:`include_background=False`, scalar `alpha` ignored"
)

TOL = 1e-5  # fp32: |ours - MONAI| <= TOL * max(1, |loss|), |grad diff| <= TOL * max|grad|
MULTI = (2, 3, 5, 6, 7)  # [B, C, D, H, W]
BINARY = (3, 1, 9, 8, 7)


# ------------------------------------------------------------------------------------------ backends
def _backend_params() -> list:
    params = [pytest.param(("cpu", b), id=f"cpu-{b}") for b in densefuse.available_backends("cpu")]
    if torch.cuda.is_available():
        params += [pytest.param(("cuda", b), id=f"cuda-{b}") for b in densefuse.available_backends("cuda")]
    return params


@functools.cache
def _not_written_yet(device: str, backend: str) -> str | None:
    """Why ``backend`` has no loss kernels yet (its module is missing), or None if it runs."""
    try:
        with densefuse.use_backend(backend):
            x = torch.zeros(1, 1, 2, device=device)
            ops.overlap_stats(x, torch.zeros(1, 2, dtype=torch.uint8, device=device))
    except ModuleNotFoundError as err:  # only a kernel module that does not exist yet; anything else fails
        if (err.name or "").startswith("densefuse.kernels"):
            return f"backend {backend!r}: {err}"
        raise
    return None


@pytest.fixture(params=_backend_params())
def device(request) -> torch.device:
    """Runs the test with densefuse forced onto one backend; yields the device its tensors live on."""
    device_type, backend = request.param
    reason = _not_written_yet(device_type, backend)
    if reason is not None:
        pytest.skip(reason)
    with densefuse.use_backend(backend):
        yield torch.device(device_type)


# -------------------------------------------------------------------------------------------- inputs
def make_input(rng, shape, device, act: str = "sigmoid") -> torch.Tensor:
    """Logits N(0, 2^2), or probabilities in [0, 1) when the loss applies no activation."""
    x = torch.rand(shape, generator=rng) if act == "none" else 2 * torch.randn(shape, generator=rng)
    return x.to(device)


def make_labels(rng, shape, device, ignore: int | None = None, frac: float = 0.2) -> torch.Tensor:
    """int64 labels [B, 1, *spatial] for logits of ``shape``: classes [0, C) ({0, 1} when C == 1), with
    about ``frac`` of the voxels set to ``ignore`` if given."""
    lab_shape = (shape[0], 1, *shape[2:])
    lab = torch.randint(0, max(shape[1], 2), lab_shape, generator=rng)
    if ignore is not None:
        lab[torch.rand(lab_shape, generator=rng) < frac] = ignore
    return lab.to(device)


def one_hot(lab: torch.Tensor, classes: int) -> torch.Tensor:
    """Float one-hot [B, C, ...] of labels [B, 1, ...] (the binary mask itself when C == 1)."""
    if classes == 1:
        return (lab == 1).float()
    return F.one_hot(lab[:, 0].long(), classes).movedim(-1, 1).float()


def assert_matches(ours, ref, x, target, *, rng, ref_x=None, ref_target=None, tol=TOL, grad_tol=None):
    """ours(x, target) equals ref(ref_x, ref_target) in value and in the gradient w.r.t. the input."""
    xo = x.detach().clone().requires_grad_(True)
    xr = (x if ref_x is None else ref_x).detach().clone().requires_grad_(True)
    lo = ours(xo, target)
    lr = ref(xr, target if ref_target is None else ref_target)
    assert lo.shape == lr.shape, f"loss shape {tuple(lo.shape)} != MONAI's {tuple(lr.shape)}"
    assert torch.isfinite(lr).all(), "reference loss not finite: the case is ill-posed"
    scale = max(1.0, lr.abs().max().item())
    torch.testing.assert_close(lo.float(), lr.float(), rtol=0, atol=tol * scale)

    cotangent = torch.randn(lr.shape, generator=rng).to(lr)
    (go,) = torch.autograd.grad(lo, xo, cotangent.to(lo))
    (gr,) = torch.autograd.grad(lr, xr, cotangent)
    assert go.shape == x.shape and go.dtype == x.dtype
    assert torch.isfinite(go).all()
    gscale = max(gr.abs().max().item(), torch.finfo(torch.float32).tiny)
    torch.testing.assert_close(go.float(), gr.float(), rtol=0, atol=(grad_tol or tol) * gscale)
    return lo, go


# ------------------------------------------------------------------------------------------- modules
def _fbeta_as_tversky(beta: float = 1.5, **kw):
    b2 = beta**2
    return ml.TverskyLoss(alpha=1 / (1 + b2), beta=b2 / (1 + b2), **kw)


LOSSES = {  # name: (densefuse constructor, MONAI constructor), both taking MONAI's keyword arguments
    "tversky": (
        functools.partial(dn.TverskyLoss, alpha=0.3, beta=0.7),
        functools.partial(ml.TverskyLoss, alpha=0.3, beta=0.7),
    ),
    "fbeta": (functools.partial(dn.FBetaLoss, beta=1.5), _fbeta_as_tversky),
    "dice": (dn.DiceLoss, ml.DiceLoss),
    "jaccard": (functools.partial(dn.DiceLoss, jaccard=True), functools.partial(ml.DiceLoss, jaccard=True)),
    "focal": (dn.FocalLoss, ml.FocalLoss),
}
OVERLAP = ["tversky", "fbeta", "dice", "jaccard"]


def pair(name: str, device, **kw):
    ours, ref = LOSSES[name]
    return ours(**kw).to(device), ref(**kw).to(device)


def _scaled_sigmoid(t: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(0.5 * t)


ACTIVATIONS = {  # MONAI's activation arguments; "none": the input holds probabilities already
    "sigmoid": {"sigmoid": True},
    "softmax": {"softmax": True},
    "none": {},
    "other_act": {"other_act": _scaled_sigmoid},
}


# ---------------------------------------------------------------------- Tversky / F-beta / Dice grid
# The grids are pairwise rather than full products (each case costs two kernel launches, ~0.1 s under
# the Triton interpreter): every value of every argument, and the pairs that interact, appear.
CLASS_CASES = {  # shape, include_background
    "C3": (MULTI, True),
    "C3_no_background": (MULTI, False),
    "C1": (BINARY, True),
}


@pytest.mark.parametrize("case", list(CLASS_CASES))
@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize("loss", ["tversky", "jaccard"])
def test_overlap_activation(device, rng, loss, act, case):
    """Every activation, C > 1 with and without the background and C = 1, one-hot targets,
    per (batch, class) scores (reduction none)."""
    shape, include_background = CLASS_CASES[case]
    kw = {"include_background": include_background, "reduction": "none", **ACTIVATIONS[act]}
    ours, ref = pair(loss, device, **kw)
    x = make_input(rng, shape, device, act)
    target = one_hot(make_labels(rng, shape, device), shape[1])
    assert_matches(ours, ref, x, target, rng=rng)


@pytest.mark.parametrize("target_kind", ["onehot", "labels"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize(("loss", "batch"), [("tversky", False), ("dice", True)])
def test_overlap_reduction_batch(device, rng, loss, batch, reduction, target_kind):
    """reduction x batch, on one-hot float targets and on float labels [B, 1, ...] with to_onehot_y."""
    labels = make_labels(rng, MULTI, device)
    to_onehot = target_kind == "labels"
    target = labels.float() if to_onehot else one_hot(labels, MULTI[1])
    ours, ref = pair(loss, device, softmax=True, reduction=reduction, batch=batch, to_onehot_y=to_onehot)
    assert_matches(ours, ref, make_input(rng, MULTI, device), target, rng=rng)


@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("ignore_index", [0, 2, 255, -1])
@pytest.mark.parametrize(("loss", "act"), [("tversky", "sigmoid"), ("dice", "softmax")])
def test_overlap_ignore_index(device, rng, loss, act, ignore_index, include_background):
    """ignore_index inside [0, C) (a real class) and outside it (a sentinel: 255, -1)."""
    ours, ref = pair(
        loss, device, include_background=include_background, to_onehot_y=True, ignore_index=ignore_index,
        reduction="none", **ACTIVATIONS[act],
    )  # fmt: skip
    labels = make_labels(rng, MULTI, device, ignore=ignore_index).float()
    assert_matches(ours, ref, make_input(rng, MULTI, device), labels, rng=rng)


@pytest.mark.parametrize(
    ("loss", "smooth_nr", "smooth_dr"),
    [("tversky", 0.0, 1e-6), ("dice", 1.0, 1.0), ("tversky", 0.5, 2.0), ("jaccard", 0.0, 1e-6)],
)
def test_overlap_smoothing(device, rng, loss, smooth_nr, smooth_dr):
    """smooth_nr/smooth_dr, with one class absent from one image so that they matter."""
    ours, ref = pair(loss, device, sigmoid=True, smooth_nr=smooth_nr, smooth_dr=smooth_dr, reduction="none")
    labels = make_labels(rng, MULTI, device)
    labels[0][labels[0] == 2] = 1  # class 2 absent from image 0
    assert_matches(ours, ref, make_input(rng, MULTI, device), one_hot(labels, MULTI[1]), rng=rng)


@pytest.mark.parametrize(("include_background", "batch"), [(True, False), (False, True)])
@pytest.mark.parametrize("weight", ["scalar", "list", "tensor"])
def test_dice_weight(device, rng, weight, include_background, batch):
    """Scalar and per-class weights (of C classes, or C - 1 without the background)."""
    classes = MULTI[1] if include_background else MULTI[1] - 1
    per_class = [0.2, 3.0, 1.0][:classes]
    w = {"scalar": 0.7, "list": per_class, "tensor": torch.tensor(per_class)}[weight]
    kw = {"include_background": include_background, "batch": batch, "weight": w, "reduction": "none"}
    ours, ref = pair("dice", device, softmax=True, to_onehot_y=True, **kw)
    labels = make_labels(rng, MULTI, device).float()
    assert_matches(ours, ref, make_input(rng, MULTI, device), labels, rng=rng)


@pytest.mark.parametrize(
    ("loss", "weight", "reduction"),
    [("tversky", 0.5, "none"), ("tversky", [0.2, 3.0], "mean"), ("fbeta", [0.2, 3.0], "none"),
     ("fbeta", 0.5, "sum")],
)  # fmt: skip
def test_tversky_weight_extension(device, rng, loss, weight, reduction):
    """densefuse extension: per-class weights on the Tversky family = MONAI's scores times the weights."""
    kw = {"include_background": False, "softmax": True}
    ours = LOSSES[loss][0](weight=weight, reduction=reduction, **kw).to(device)
    _, ref_none = pair(loss, device, reduction="none", **kw)
    w = torch.as_tensor(weight, device=device)
    reduce = {"none": lambda s: s, "mean": torch.mean, "sum": torch.sum}[reduction]
    labels = make_labels(rng, MULTI, device)
    assert_matches(ours, lambda x, t: reduce(ref_none(x, t) * w), make_input(rng, MULTI, device), labels,
                   ref_target=one_hot(labels, MULTI[1]), rng=rng)  # fmt: skip


@pytest.mark.parametrize("alpha_beta", [(0.5, 0.5), (0.3, 0.7), (0.7, 0.3), (1.0, 0.0), (0.0, 1.0)])
def test_tversky_alpha_beta(device, rng, alpha_beta):
    alpha, beta = alpha_beta
    ours = dn.TverskyLoss(alpha=alpha, beta=beta, sigmoid=True, reduction="none")
    ref = ml.TverskyLoss(alpha=alpha, beta=beta, sigmoid=True, reduction="none")
    target = one_hot(make_labels(rng, MULTI, device), MULTI[1])
    assert_matches(ours, ref, make_input(rng, MULTI, device), target, rng=rng)


@pytest.mark.parametrize("beta", [None, 0.5, 1.0, 2.0])
def test_fbeta(device, rng, beta):
    """FBetaLoss(beta) == MONAI TverskyLoss(alpha=1/(1+b^2), beta=b^2/(1+b^2)); default beta 1.5."""
    ours = dn.FBetaLoss(softmax=True, reduction="none", **({} if beta is None else {"beta": beta}))
    ref = _fbeta_as_tversky(1.5 if beta is None else beta, softmax=True, reduction="none")
    target = one_hot(make_labels(rng, MULTI, device), MULTI[1])
    assert_matches(ours, ref, make_input(rng, MULTI, device), target, rng=rng)


def test_fbeta_set_after_construction(device, rng):
    """Setting f_beta sets the Tversky weights again; alpha is not an FBetaLoss argument."""
    ours = dn.FBetaLoss(beta=0.5, softmax=True, reduction="none")
    ours.f_beta = 2.0
    target = one_hot(make_labels(rng, MULTI, device), MULTI[1])
    ref = _fbeta_as_tversky(2.0, softmax=True, reduction="none")
    assert_matches(ours, ref, make_input(rng, MULTI, device), target, rng=rng)
    with pytest.raises(ValueError, match="beta: expected a finite number > 0"):
        ours.f_beta = 0.0
    with pytest.raises(TypeError, match="alpha: FBetaLoss sets the Tversky weights from beta"):
        dn.FBetaLoss(alpha=0.3)
    old = dn.FBetaLoss(beta=2.0).__getstate__()  # as pickled when f_beta was a plain attribute
    old["f_beta"] = old.pop("_f_beta")
    restored = dn.FBetaLoss.__new__(dn.FBetaLoss)
    restored.__setstate__(old)
    assert restored.f_beta == 2.0


def test_fbeta_1_is_dice(device, rng):
    """With hard labels F_1 is the Dice score: a check that does not go through the alpha/beta mapping."""
    ours = dn.FBetaLoss(beta=1.0, sigmoid=True, reduction="none")
    ref = ml.DiceLoss(sigmoid=True, reduction="none")
    target = one_hot(make_labels(rng, MULTI, device), MULTI[1])
    assert_matches(ours, lambda x, t: ref(x, t).flatten(1), make_input(rng, MULTI, device), target, rng=rng)


# ---------------------------------------------------------------------------------------------- focal
def _alpha(kind: str, classes: int):
    return {"none": None, "scalar": 0.25, "per_class": [0.1, 0.6, 0.3, 0.8][:classes]}[kind]


@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("use_softmax", [False, True])
@pytest.mark.parametrize(
    ("gamma", "alpha"),
    [(2.0, "none"), (2.0, "scalar"), (2.0, "per_class"), (0.0, "scalar"), (0.5, "per_class")],
)
def test_focal_gamma_alpha(device, rng, gamma, alpha, use_softmax, include_background):
    """gamma 0 / 0.5 / 2 and alpha None / scalar / per-class (C - 1 values without the background)."""
    classes = MULTI[1] - (not include_background)
    ours, ref = pair(
        "focal", device, gamma=gamma, alpha=_alpha(alpha, classes), use_softmax=use_softmax,
        include_background=include_background, to_onehot_y=True,
    )  # fmt: skip
    labels = make_labels(rng, MULTI, device).float()
    assert_matches(ours, ref, make_input(rng, MULTI, device), labels, rng=rng)


@pytest.mark.parametrize("use_softmax", [False, True])
@pytest.mark.parametrize(
    ("reduction", "weight"),
    [("none", [0.2, 3.0, 1.0]), ("mean", None), ("mean", 2.5), ("sum", [0.2, 3.0, 1.0]), ("sum", None)],
)
def test_focal_reduction_weight(device, rng, reduction, weight, use_softmax):
    """reduction x class weight (None, scalar, per-class) on one-hot float targets."""
    ours, ref = pair("focal", device, reduction=reduction, weight=weight, use_softmax=use_softmax, gamma=1.5)
    target = one_hot(make_labels(rng, MULTI, device), MULTI[1])
    assert_matches(ours, ref, make_input(rng, MULTI, device), target, rng=rng)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("use_softmax", [False, True])
@pytest.mark.parametrize(
    ("ignore_index", "include_background"), [(0, False), (255, True), (255, False), (-1, True)]
)
def test_focal_ignore_index(device, rng, ignore_index, include_background, use_softmax, reduction):
    """ignore_index (a class, or a sentinel) x reduction: "mean" divides by the valid voxels (MONAI 1.6)."""
    ours, ref = pair(
        "focal", device, ignore_index=ignore_index, include_background=include_background,
        use_softmax=use_softmax, reduction=reduction, to_onehot_y=True, alpha=0.25,
    )  # fmt: skip
    labels = make_labels(rng, MULTI, device, ignore=ignore_index).float()
    assert_matches(ours, ref, make_input(rng, MULTI, device), labels, rng=rng)


@pytest.mark.parametrize("shape", [MULTI, BINARY], ids=["C3", "C1"])
@pytest.mark.parametrize(
    "alpha",
    [0.25, 1, pytest.param(torch.tensor(0.25), id="tensor_0d"), pytest.param(np.float32(0.25), id="np_f32")],
)
def test_focal_scalar_alpha_types(device, rng, alpha, shape):
    """MONAI treats any 0-d alpha (float, int, 0-d tensor, numpy scalar) as the scalar alpha."""
    ours, ref = pair("focal", device, alpha=alpha)
    target = one_hot(make_labels(rng, shape, device), shape[1])
    assert_matches(ours, ref, make_input(rng, shape, device), target, rng=rng)


# --------------------------------------------------------------------------------- input conventions
LABEL_LOSSES = {  # loss name, MONAI-style keyword arguments
    "tversky": ("tversky", {"softmax": True, "batch": True}),
    "dice": ("dice", {"sigmoid": True, "include_background": False}),
    "focal_sigmoid": ("focal", {"alpha": 0.25}),
    "focal_softmax": ("focal", {"use_softmax": True, "include_background": False}),
}


LABEL_MAPS = [  # (dtype, with the channel dim): every dtype, both forms
    (torch.uint8, True), (torch.uint8, False), (torch.int8, False), (torch.int16, True),
    (torch.int32, False), (torch.int64, True), (torch.int64, False),
    (torch.uint16, True), (torch.uint32, False), (torch.uint64, True),  # widened (NIfTI's uint16 labels)
]  # fmt: skip


LABEL_MAP_CASES = [  # each dtype and form on both kernels (overlap, focal), and once on the others
    *((loss, dtype, dim) for loss in ("tversky", "focal_sigmoid") for dtype, dim in LABEL_MAPS),
    ("dice", torch.uint8, True), ("dice", torch.int64, False),
    ("focal_softmax", torch.uint8, False), ("focal_softmax", torch.int32, True),
]  # fmt: skip


@pytest.mark.parametrize(
    ("loss", "dtype", "channel_dim"), LABEL_MAP_CASES, ids=[f"{n}-{d}-{c}" for n, d, c in LABEL_MAP_CASES]
)
def test_integer_label_maps(device, rng, loss, dtype, channel_dim):
    """Deviation (extension): integer label maps go in directly, never one-hot encoded in memory.
    [B, 1, ...] labels keep MONAI's to_onehot_y=True; [B, ...] labels need no flag at all."""
    name, kw = LABEL_LOSSES[loss]
    ours, _ = pair(name, device, to_onehot_y=channel_dim, **kw)
    _, ref = pair(name, device, to_onehot_y=True, **kw)
    labels = make_labels(rng, MULTI, device)
    target = labels.to(dtype) if channel_dim else labels[:, 0].to(dtype)
    assert_matches(ours, ref, make_input(rng, MULTI, device), target, ref_target=labels.float(), rng=rng)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("loss", list(LABEL_LOSSES))
def test_half_precision_logits(device, rng, loss, dtype):
    """Deviation: half-precision logits are accumulated in fp32 and give an fp32 loss, equal to MONAI's
    on the fp32-upcast logits (MONAI's FocalLoss upcasts too; its Dice/Tversky compute in half). The
    gradient comes back in the logits' dtype, so it is compared to half-precision rounding."""
    name, kw = LABEL_LOSSES[loss]
    ours, ref = pair(name, device, to_onehot_y=True, **kw)
    x = make_input(rng, MULTI, device).to(dtype)
    labels = make_labels(rng, MULTI, device)
    grad_tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    kw = {"ref_x": x.float(), "ref_target": labels.float(), "tol": 1e-4, "grad_tol": grad_tol, "rng": rng}
    lo, _ = assert_matches(ours, ref, x, labels, **kw)
    assert lo.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("loss", OVERLAP)
def test_autocast(device, rng, loss, dtype):
    """MONAI's mixed-precision recipe computes the loss inside torch.autocast: the loss and its
    gradient are those computed outside it. Sums over a 48^3 patch pass float16's 65504, so a loss
    whose fp32 sums autocast rounded to half would be NaN (float16) or off by ~1e-4 (bfloat16)."""
    ours, _ = pair(loss, device, sigmoid=True)
    x = (make_input(rng, (1, 1, 48, 48, 48), device) + 3).requires_grad_(True)
    target = make_labels(rng, (1, 1, 48, 48, 48), device)
    expected = ours(x, target)
    (expected_grad,) = torch.autograd.grad(expected, x)
    with torch.autocast(device.type, dtype=dtype):
        value = ours(x, target)
    (grad,) = torch.autograd.grad(value, x)
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-12)


def _strided(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``x`` in a non-contiguous layout."""
    if layout == "channels_last_3d":
        return x.contiguous(memory_format=torch.channels_last_3d)
    if layout == "permuted":  # stored as [B, W, H, D, C]
        return x.permute(0, 4, 3, 2, 1).contiguous().permute(0, 4, 3, 2, 1)
    wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
    wide[..., ::2] = x
    return wide[..., ::2]  # sliced: stride 2 along W


@pytest.mark.parametrize(
    ("loss", "layout"),
    [*((loss, layout) for loss in ("tversky", "focal_sigmoid") for layout in ("channels_last_3d", "permuted",
     "sliced")), ("dice", "permuted"), ("focal_softmax", "sliced")],
)  # fmt: skip
def test_non_contiguous(device, rng, loss, layout):
    """Non-contiguous logits and targets give the contiguous result (and MONAI's)."""
    name, kw = LABEL_LOSSES[loss]
    ours, ref = pair(name, device, to_onehot_y=True, **kw)
    x, labels = make_input(rng, MULTI, device), make_labels(rng, MULTI, device)
    xs = _strided(x, layout)
    # a [B, 1, ...] tensor in channels_last_3d is still contiguous: slice the labels instead
    ls = _strided(labels.to(torch.uint8), "sliced" if layout == "channels_last_3d" else layout)
    assert not xs.is_contiguous() and not ls.is_contiguous()
    contiguous = pair(name, device, to_onehot_y=True, **kw)[0]
    assert_matches(ours, contiguous, xs, ls, ref_x=x, ref_target=labels.to(torch.uint8), tol=TOL / 4, rng=rng)
    assert_matches(ours, ref, xs, ls, ref_x=x, ref_target=labels.float(), rng=rng)


BINARY_LOSSES = {
    "fbeta": ("fbeta", {"sigmoid": True, "batch": True}),
    "tversky": ("tversky", {"sigmoid": True}),
    "dice": ("dice", {"sigmoid": True, "batch": True}),
    "focal": ("focal", {"alpha": 0.75}),
}


@pytest.mark.parametrize("ignore_index", [None, 255])
@pytest.mark.parametrize("loss", list(BINARY_LOSSES))
def test_binary_lesion_uint8_mask(device, rng, loss, ignore_index):
    """The main use case: C = 1, sigmoid, a uint8 lesion mask with ~0.5 % foreground (MONAI gets the
    same mask as float). With ignore_index=255, some voxels are marked 255 (unlabelled)."""
    name, kw = BINARY_LOSSES[loss]
    shape = BINARY
    ours, ref = pair(name, device, ignore_index=ignore_index, **kw)
    mask = (torch.rand(shape, generator=rng) < 0.005).to(torch.uint8)
    mask[0, 0, 5, 4, 3] = 1  # at least one lesion voxel
    if ignore_index is not None:
        mask[:, :, :2] = ignore_index
    x = (2 * torch.randn(shape, generator=rng) - 4).to(device)  # a lesion detector is mostly "no"
    assert_matches(ours, ref, x, mask.to(device), ref_target=mask.float().to(device), rng=rng)


EMPTY_CASES = {  # shape, target labels [B, 1, ...] fill value, extra MONAI arguments
    "C1_empty_mask": (BINARY, 0, {"sigmoid": True}),
    "C3_background_only": (MULTI, 0, {"softmax": True}),
    "C3_background_only_excluded": (MULTI, 0, {"softmax": True, "include_background": False}),
    "C3_all_ignored": (MULTI, 255, {"softmax": True, "ignore_index": 255}),
}


@pytest.mark.parametrize("case", list(EMPTY_CASES))
@pytest.mark.parametrize("loss", ["tversky", "dice", "focal"])
def test_empty_foreground(device, rng, loss, case):
    """All-zero (or all-ignored) labels: a finite loss and finite gradients, equal to MONAI's."""
    shape, fill, kw = EMPTY_CASES[case]
    if loss == "focal":
        kw = {k: v for k, v in kw.items() if k not in ("sigmoid", "softmax")} | {
            "use_softmax": "softmax" in kw
        }
    reduction = "sum" if loss == "focal" else "none"  # focal "none" is element-wise, not the fused path
    ours, ref = pair(loss, device, to_onehot_y=shape[1] > 1, reduction=reduction, **kw)
    labels = torch.full((shape[0], 1, *shape[2:]), fill, dtype=torch.uint8, device=device)
    x = make_input(rng, shape, device)
    lo, go = assert_matches(ours, ref, x, labels, ref_target=labels.float(), rng=rng)
    assert torch.isfinite(lo).all() and torch.isfinite(go).all()


@pytest.mark.parametrize(
    ("loss", "case"), [("tversky", "C3_softmax"), ("dice", "C1_sigmoid"), ("focal", "C3_softmax"),
                       ("focal", "C1_sigmoid")]
)  # fmt: skip
def test_2d_inputs(device, rng, loss, case):
    """[B, C, H, W] inputs."""
    shape = (2, 3, 9, 8) if case == "C3_softmax" else (3, 1, 9, 8)
    act = {"use_softmax": True} if loss == "focal" else {"softmax": True}
    kw = act if shape[1] > 1 else ({} if loss == "focal" else {"sigmoid": True})
    ours, ref = pair(loss, device, to_onehot_y=shape[1] > 1, **kw)
    labels = make_labels(rng, shape, device)
    assert_matches(ours, ref, make_input(rng, shape, device), labels, ref_target=labels.float(), rng=rng)


SINGLE_CHANNEL_FLAGS = [
    pytest.param(loss, flag, id=f"{loss}-{flag}")
    for loss in ("tversky", "dice", "focal")
    for flag in ("softmax", "to_onehot_y", "include_background")
    if not (loss == "focal" and flag == "softmax")  # MONAI's FocalLoss has use_softmax, no C == 1 warning
]


@pytest.mark.parametrize(("loss", "flag"), SINGLE_CHANNEL_FLAGS)
def test_single_channel_warnings(device, rng, loss, flag):
    """C = 1 with a flag that needs C > 1: MONAI's warning, and MONAI's value."""
    kw = {flag: flag != "include_background"}
    ours, ref = pair(loss, device, **kw)
    x, mask = make_input(rng, BINARY, device), make_labels(rng, BINARY, device).float()
    caught = {}
    for name, module in (("ours", ours), ("monai", ref)):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            value = module(x, mask)
        caught[name] = (value, sorted({str(w.message) for w in record if w.category is UserWarning}))
    assert len(caught["monai"][1]) == 1
    assert caught["ours"][1] == caught["monai"][1]
    torch.testing.assert_close(caught["ours"][0], caught["monai"][0], rtol=0, atol=TOL)


@pytest.mark.parametrize("loss", ["tversky", "dice", "focal"])
def test_monai_reduction_enum(device, rng, loss):
    """MONAI's LossReduction enum is accepted like its string value."""
    ours, ref = pair(loss, device, reduction=LossReduction.SUM)
    target = one_hot(make_labels(rng, MULTI, device), MULTI[1])
    assert_matches(ours, ref, make_input(rng, MULTI, device, "none"), target, rng=rng)


@pytest.mark.parametrize("include_background", [True, False])
@pytest.mark.parametrize("loss", ["tversky", "dice", "focal"])
def test_metatensor_targets(device, rng, loss, include_background):
    """Labels as MONAI's data pipeline hands them over (MetaTensor): MONAI's value and gradient. With
    softmax and include_background=False FocalLoss made a scratch tensor through MetaTensor.new_empty,
    which takes no bare int size."""
    from monai.data import MetaTensor

    act = {"use_softmax": True} if loss == "focal" else {"softmax": True}
    ours, ref = pair(loss, device, to_onehot_y=True, include_background=include_background, **act)
    target = MetaTensor(make_labels(rng, MULTI, device))
    assert_matches(ours, ref, make_input(rng, MULTI, device), target, rng=rng)


@pytest.mark.parametrize("loss", ["tversky", "focal"])
def test_metatensor_logits(device, rng, loss):
    """A model's MetaTensor output: MONAI's value, and the gradient reaches the MetaTensor."""
    from monai.data import MetaTensor

    ours, ref = pair(loss, device, to_onehot_y=True)
    target = make_labels(rng, MULTI, device)
    x = make_input(rng, MULTI, device)
    xo = MetaTensor(x.clone()).requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    lo, lr = ours(xo, target), ref(xr, target)
    torch.testing.assert_close(lo.float(), lr.float(), rtol=0, atol=TOL * max(1.0, lr.abs().item()))
    lo.backward()
    lr.backward()
    torch.testing.assert_close(
        xo.grad.as_subclass(torch.Tensor), xr.grad, rtol=0, atol=TOL * xr.grad.abs().max().item()
    )
