"""Bad input gets a clear ValueError/TypeError whose message starts with the argument's name (DESIGN §2,
§6), through the public ops (densefuse.ops.overlap_stats / focal_stats) and the nn modules.

Checks that read tensor values (label range, NaN/Inf) are computed by the kernels and come back as
flags, so those tests run on every backend available here; shape/dtype checks happen before dispatch.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

import densefuse
import densefuse.nn as dn
from densefuse import ops
from densefuse.ops._backend import BACKENDS

pytestmark = pytest.mark.filterwarnings("ignore:single channel prediction")

SHAPE = (2, 3, 4, 5, 6)  # [B, C, D, H, W]
LABELS = (2, 1, 4, 5, 6)


# ------------------------------------------------------------------------------------------ backends
@functools.cache
def _not_written_yet(backend: str) -> str | None:
    """Why ``backend`` has no loss kernels yet (its module is missing), or None if it runs."""
    try:
        with densefuse.use_backend(backend):
            ops.overlap_stats(torch.zeros(1, 1, 2), torch.zeros(1, 2, dtype=torch.uint8))
    except ModuleNotFoundError as err:
        if (err.name or "").startswith("densefuse.kernels"):
            return f"backend {backend!r}: {err}"
        raise
    return None


@pytest.fixture(params=densefuse.available_backends("cpu"))
def backend(request) -> str:
    reason = _not_written_yet(request.param)
    if reason is not None:
        pytest.skip(reason)
    with densefuse.use_backend(request.param):
        yield request.param


# --------------------------------------------------------------------------------------------- calls
def _act(x) -> str:
    return "softmax" if isinstance(x, torch.Tensor) and x.dim() > 1 and x.shape[1] > 1 else "sigmoid"


CALLS = {  # name: f(logits, target, ignore_index) through one public entry point
    "overlap_stats": lambda x, t, ii=None: ops.overlap_stats(x, t, _act(x), ignore_index=ii),
    "focal_stats": lambda x, t, ii=None: ops.focal_stats(x, t, _act(x), ignore_index=ii),
    "TverskyLoss": lambda x, t, ii=None: dn.TverskyLoss(sigmoid=True, ignore_index=ii)(x, t),
    "FBetaLoss": lambda x, t, ii=None: dn.FBetaLoss(softmax=True, ignore_index=ii)(x, t),
    "DiceLoss": lambda x, t, ii=None: dn.DiceLoss(softmax=True, ignore_index=ii)(x, t),
    "FocalLoss": lambda x, t, ii=None: dn.FocalLoss(ignore_index=ii)(x, t),
    "FocalLoss_softmax_no_bg": lambda x, t, ii=None: dn.FocalLoss(
        use_softmax=True, include_background=False, ignore_index=ii
    )(x, t),
    # the loss map: the reference's element-wise path, checked as the fused ops check their inputs
    "FocalLoss_none": lambda x, t, ii=None: dn.FocalLoss(ignore_index=ii, reduction="none")(x, t),
    "FocalLoss_softmax_none": lambda x, t, ii=None: dn.FocalLoss(
        use_softmax=True, ignore_index=ii, reduction="none"
    )(x, t),
}
via = pytest.mark.parametrize("call", list(CALLS))


def logits(shape=SHAPE, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)


def labels(shape=LABELS, high=3, dtype=torch.int64) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(1)).to(dtype)


def onehot(shape=SHAPE) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels()[:, 0], shape[1]).movedim(-1, 1).float()


# -------------------------------------------------------------------------------------------- logits
@pytest.mark.parametrize(
    "bad",
    [[[0.0, 1.0]], np.zeros(SHAPE, dtype=np.float32), 1.5, None],
    ids=["list", "numpy", "float", "None"],
)
@via
def test_logits_not_a_tensor(call, bad):
    with pytest.raises(TypeError, match=r"^logits"):
        CALLS[call](bad, labels())


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool, torch.complex64], ids=str)
@via
def test_logits_not_floating(call, dtype):
    with pytest.raises(TypeError, match=r"^logits"):
        CALLS[call](torch.zeros(SHAPE, dtype=dtype), labels())


@pytest.mark.parametrize("shape", [(6,), (2, 3)], ids=["1d", "2d"])
@via
def test_logits_without_spatial_dims(call, shape):
    with pytest.raises(ValueError, match=r"^logits"):
        CALLS[call](torch.zeros(shape), torch.zeros(shape[:1], dtype=torch.int64))


@pytest.mark.parametrize(
    "shape", [(0, 3, 4, 5, 6), (2, 3, 0, 5, 6), (2, 3, 4, 5, 0), (2, 0, 4, 5, 6)],
    ids=["B0", "D0", "W0", "C0"],
)  # fmt: skip
@via
def test_logits_empty(call, shape):
    with pytest.raises(ValueError, match=r"^logits"):
        CALLS[call](torch.zeros(shape), torch.zeros((shape[0], 1, *shape[2:]), dtype=torch.int64))


NON_FINITE = [  # each value, each dtype
    (torch.float32, float("nan")), (torch.float32, float("inf")), (torch.float16, float("-inf")),
    (torch.bfloat16, float("nan")),
]  # fmt: skip


@pytest.mark.parametrize(("dtype", "value"), NON_FINITE, ids=[f"{d}-{v}" for d, v in NON_FINITE])
@via
def test_logits_not_finite(backend, call, dtype, value):
    x = logits(dtype=dtype)
    x[1, 2, 3, 4, 5] = value  # the last voxel of the last tile
    with pytest.raises(ValueError, match=r"^logits"):
        CALLS[call](x, labels())


# -------------------------------------------------------------------------------------------- target
@via
def test_target_not_a_tensor(call):
    with pytest.raises(TypeError, match=r"^target"):
        CALLS[call](logits(), labels().tolist())


@pytest.mark.parametrize(
    "shape",
    [(2, 4, 5, 6, 7), (2, 4, 5, 7), (2, 2, 4, 5, 6), (2, 1, 1, 4, 5, 6), (2, 1, 4, 5), (2, 4, 5, 6, 1)],
    ids=["wrong_spatial", "wrong_spatial_no_channel", "two_channels", "extra_dim", "missing_dim", "trailing"],
)
@via
def test_target_wrong_shape(call, shape):
    with pytest.raises(ValueError, match=r"^target"):
        CALLS[call](logits(), torch.zeros(shape, dtype=torch.int64))


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("form", ["labels_B1", "labels_B", "onehot"])
@via
def test_target_batch_mismatch(call, batch, form):
    shape = {"labels_B1": (batch, 1, 4, 5, 6), "labels_B": (batch, 4, 5, 6), "onehot": (batch, *SHAPE[1:])}[
        form
    ]
    target = torch.zeros(shape, dtype=torch.float32 if form == "onehot" else torch.int64)
    with pytest.raises(ValueError, match=r"^target"):
        CALLS[call](logits(), target)


@pytest.mark.parametrize(
    ("dtype", "shape"),
    [(torch.complex64, LABELS), (torch.complex64, SHAPE), (torch.float8_e4m3fn, SHAPE)],
    ids=["complex_labels", "complex_dense", "float8_dense"],
)
@via
def test_target_unsupported_dtype(call, dtype, shape):
    """A complex target is refused as a label map and as a dense target of the logits' shape (there it
    was cast to real, its imaginary part dropped with only a warning); so is a float8 dense one."""
    with pytest.raises(TypeError, match=r"^target"):
        CALLS[call](logits(), torch.zeros(shape, dtype=dtype))


@via
def test_float_labels_need_to_onehot_y(call):
    """Float labels [B, 1, ...] with C > 1 and to_onehot_y=False (the ops have no to_onehot_y)."""
    with pytest.raises(ValueError, match=r"^target"):
        CALLS[call](logits(), labels().float())


@pytest.mark.parametrize("module", [dn.TverskyLoss, dn.FBetaLoss, dn.DiceLoss, dn.FocalLoss])
@pytest.mark.parametrize("bad", [0.5, float("nan"), float("inf")], ids=["fraction", "nan", "inf"])
def test_float_labels_not_integer(module, bad):
    target = labels().float()
    target[0, 0, 1, 2, 3] = bad
    with pytest.raises(ValueError, match=r"^target"):
        module(to_onehot_y=True)(logits(), target)


@via
def test_target_that_requires_grad(call):
    """Targets are constants: one that requires grad is refused (MONAI would differentiate it)."""
    with pytest.raises(ValueError, match=r"^target: gradients w.r.t. the target are not computed"):
        CALLS[call](logits(), onehot().requires_grad_(True))


@pytest.mark.parametrize("module", [dn.TverskyLoss, dn.FBetaLoss, dn.DiceLoss, dn.FocalLoss])
def test_float_labels_that_require_grad(module):
    """Float labels [B, 1, ...] cast to integers for to_onehot_y are refused too, not cast silently."""
    with pytest.raises(ValueError, match=r"^target: gradients w.r.t. the target are not computed"):
        module(to_onehot_y=True)(logits(), labels().float().requires_grad_(True))


def _label_cases():
    """(logits shape, bad label value, label dtype): labels >= C, 2 when C == 1, negative labels."""
    cases = [
        (SHAPE, 3, torch.int64),
        (SHAPE, 255, torch.uint8),
        (SHAPE, -1, torch.int64),
        (SHAPE, -7, torch.int8),
    ]
    cases += [((2, 1, 4, 5, 6), 2, torch.uint8), ((2, 1, 4, 5, 6), -1, torch.int32)]
    cases += [(SHAPE, 65535, torch.uint16), (SHAPE, 2**63 + 5, torch.uint64)]  # widened; the latter wraps
    return [pytest.param(*c, id=f"C{c[0][1]}-{c[1]}-{c[2]}".replace("torch.", "")) for c in cases]


@pytest.mark.parametrize(("shape", "value", "dtype"), _label_cases())
@pytest.mark.parametrize("call", list(CALLS))
def test_labels_out_of_range(backend, call, shape, value, dtype):
    if call == "FocalLoss_softmax_no_bg" and shape[1] == 1:
        pytest.skip("C = 1: include_background=False is ignored (no bug to show)")
    target = labels((shape[0], 1, *shape[2:]), high=max(shape[1], 2), dtype=dtype)
    target[1, 0, 3, 4, 5] = torch.tensor(value, dtype=dtype)  # the last voxel (a tensor: uint64 > 2**63)
    for t in (target, target[:, 0]):  # [B, 1, ...] and [B, ...]
        with pytest.raises(ValueError, match=r"^target"):
            CALLS[call](logits(shape), t)


@pytest.mark.parametrize(
    ("shape", "ignore_index", "dtype"),
    [
        (SHAPE, 255, torch.uint8),
        (SHAPE, -1, torch.int64),
        (SHAPE, 3, torch.int16),
        ((2, 1, 4, 5, 6), 255, torch.uint8),
    ],
    ids=["C3-255", "C3-neg1", "C3-3", "C1-255"],
)
@via
def test_labels_equal_to_ignore_index_are_fine(backend, call, shape, ignore_index, dtype):
    """Out-of-range labels that equal ignore_index are not errors; everything ignored is not either."""
    target = labels((shape[0], 1, *shape[2:]), high=max(shape[1], 2), dtype=dtype)
    target[:, :, :2] = ignore_index
    out = CALLS[call](logits(shape), target, ignore_index)
    assert torch.isfinite(out).all()
    everything = CALLS[call](logits(shape), torch.full_like(target, ignore_index), ignore_index)
    assert torch.isfinite(everything).all()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "+inf", "-inf"])
@via
def test_float_target_not_finite(backend, call, value):
    target = onehot()
    target[1, 2, 3, 4, 5] = value
    with pytest.raises(ValueError, match=r"^target"):
        CALLS[call](logits(), target)


@via
def test_ignore_index_with_float_target(call):
    """ignore_index needs integer labels (documented deviation: MONAI also masks one-hot targets); the
    error does not call an integer one-hot a float target."""
    expected = r"^ignore_index: needs integer class labels .*got a target of the logits' shape"
    with pytest.raises(ValueError, match=expected):
        CALLS[call](logits(), onehot(), 255)
    if call not in ("overlap_stats", "focal_stats"):  # the modules take integer one-hot targets
        with pytest.raises(ValueError, match=expected):
            CALLS[call](logits(), onehot().long(), 255)


@pytest.mark.parametrize(
    "ignore_index",
    [1.0, "255", True, torch.tensor(1.0), np.float64(1.0), torch.tensor([1])],
    ids=["float", "str", "bool", "float_tensor", "numpy_float", "1d_tensor"],
)
@via
def test_ignore_index_not_an_int(call, ignore_index):
    with pytest.raises(TypeError, match=r"^ignore_index"):
        CALLS[call](logits(), labels(), ignore_index)


@pytest.mark.parametrize("ignore_index", [np.int64(2), np.uint8(2), torch.tensor(2)], ids=str)
@via
def test_ignore_index_numpy_and_tensor_integers(call, ignore_index):
    """A NumPy integer or a 0-d integer tensor is the int it holds (MONAI takes them too)."""
    expected = CALLS[call](logits(), labels(), 2)
    got = CALLS[call](logits(), labels(), ignore_index)
    for a, b in zip(
        got if isinstance(got, tuple) else [got], expected if isinstance(expected, tuple) else [expected]
    ):
        assert torch.equal(a, b)


@pytest.mark.parametrize("ignore_index", [2**63, -(2**63) - 1])
@via
def test_ignore_index_beyond_int64(call, ignore_index):
    """The ops take ignore_index as an int64: a larger int is refused up front, naming it (torch's
    schema parser failed on it at the call)."""
    with pytest.raises(ValueError, match=r"^ignore_index: expected an int64 value"):
        CALLS[call](logits(), labels(), ignore_index)


# ---------------------------------------------------------------------------------- module arguments
OVERLAP_MODULES = [dn.TverskyLoss, dn.FBetaLoss, dn.DiceLoss]
ALL_MODULES = [*OVERLAP_MODULES, dn.FocalLoss]


@pytest.mark.parametrize("reduction", ["avg", "", None, "MEAN"])
@pytest.mark.parametrize("module", ALL_MODULES)
def test_bad_reduction(module, reduction):
    with pytest.raises(ValueError, match=r"^reduction"):
        module(reduction=reduction)


@pytest.mark.parametrize("gamma", [-0.5, -2])
def test_negative_gamma(gamma):
    with pytest.raises(ValueError, match=r"^gamma"):
        dn.FocalLoss(gamma=gamma)
    with pytest.raises(ValueError, match=r"^gamma"):
        ops.focal_stats(logits(), labels(), "softmax", gamma=gamma)


def test_nan_gamma():
    with pytest.raises(ValueError, match=r"^gamma"):
        dn.FocalLoss(gamma=float("nan"))
    for bad in (float("nan"), True, "2"):
        with pytest.raises(ValueError, match=r"^gamma"):
            ops.focal_stats(logits(), labels(), "softmax", gamma=bad)


@pytest.mark.parametrize("module", [dn.DiceLoss, dn.TverskyLoss, dn.FocalLoss])
def test_integer_one_hot_of_another_shape(module):
    """An integer target with C channels is a one-hot: of another shape, the error says so (it spoke of
    a float target and advised an integer dtype)."""
    with pytest.raises(
        ValueError, match=r"^target: an integer target with the logits' 3 channels is read as one-hot"
    ):
        module()(logits(), torch.zeros(2, 3, 4, 5, 1, dtype=torch.int64))


def test_focal_stats_takes_numpy_and_tensor_gamma():
    """The op reads gamma as FocalLoss does: a NumPy number or a 0-d tensor is a number."""
    expected = ops.focal_stats(logits(), labels(), "sigmoid", 2.0)
    for gamma in (np.float32(2.0), torch.tensor(2.0), 2):
        assert torch.equal(ops.focal_stats(logits(), labels(), "sigmoid", gamma), expected)


@pytest.mark.parametrize("alpha", [[1.0, float("nan"), 1.0], [1.0, -5.0, 1.0], [float("inf"), 1.0, 1.0]])
def test_focal_stats_bad_alpha_values(alpha):
    """Per-class alphas on the CPU are checked (NaN, Inf or negative weights gave NaN or negative losses)."""
    for name in ("alpha_pos", "alpha_neg"):
        with pytest.raises(ValueError, match=rf"^{name}: expected finite weights >= 0"):
            ops.focal_stats(logits(), labels(), "sigmoid", 2.0, **{name: torch.tensor(alpha)})


@pytest.mark.parametrize(
    "beta",
    [
        0,
        -1.5,
        float("nan"),
    ],
)
def test_fbeta_nonpositive_beta(beta):
    with pytest.raises(ValueError, match=r"^beta"):
        dn.FBetaLoss(beta=beta)


BAD_NUMBERS = [  # (module, argument, value): strings, NaN, out of range, the wrong shape
    (dn.FocalLoss, "alpha", "0.25"),
    (dn.FocalLoss, "alpha", 1.5),
    (dn.FocalLoss, "alpha", 1.0000001),  # just past the bound (1.0 itself is taken: see below)
    (dn.FocalLoss, "alpha", [[0.1, 0.2]]),
    (dn.FocalLoss, "alpha", [0.2, float("nan")]),
    (dn.FocalLoss, "alpha", [0.2, -0.1]),
    (dn.FocalLoss, "alpha", []),
    (dn.DiceLoss, "weight", [float("nan"), 1.0]),
    (dn.FocalLoss, "gamma", "2"),
    (dn.FBetaLoss, "beta", "1.5"),
    (dn.TverskyLoss, "alpha", -0.1),
    (dn.TverskyLoss, "beta", float("nan")),
    (dn.DiceLoss, "smooth_nr", -1e-5),
    (dn.DiceLoss, "smooth_dr", float("inf")),
    (dn.TverskyLoss, "smooth_dr", torch.tensor([1.0, 2.0])),
]


@pytest.mark.parametrize(("module", "name", "value"), BAD_NUMBERS)
def test_bad_numbers_name_their_argument(module, name, value):
    with pytest.raises(ValueError, match=rf"^{name}: expected a"):
        module(**{name: value})


def test_numbers_on_their_bounds_are_taken():
    assert dn.FocalLoss(alpha=1.0).alpha == 1.0 and dn.FocalLoss(alpha=0.0).alpha == 0.0
    assert dn.TverskyLoss(alpha=0.0, beta=0.0, smooth_nr=0.0).alpha == 0.0


def test_numbers_may_be_numpy_scalars_and_0d_tensors():
    assert dn.FocalLoss(alpha=np.float32(0.25), gamma=torch.tensor(2.0)).gamma == 2.0
    assert dn.FBetaLoss(beta=np.float64(1.5)).f_beta == 1.5
    assert dn.TverskyLoss(alpha=torch.tensor(0.25), smooth_nr=np.array(0.0)).alpha == 0.25


@pytest.mark.parametrize("module", [dn.TverskyLoss, dn.FBetaLoss, dn.DiceLoss])
def test_soft_label_rejected(module):
    with pytest.raises(ValueError, match=r"^soft_label"):
        module(soft_label=True)


def test_squared_pred_rejected():
    with pytest.raises(ValueError, match=r"^squared_pred"):
        dn.DiceLoss(squared_pred=True)


@pytest.mark.parametrize(
    "flags",
    [{"sigmoid": True, "softmax": True}, {"sigmoid": True, "other_act": torch.tanh},
     {"softmax": True, "other_act": torch.tanh}],
    ids=["sigmoid+softmax", "sigmoid+other_act", "softmax+other_act"],
)  # fmt: skip
@pytest.mark.parametrize("module", OVERLAP_MODULES)
def test_several_activations(module, flags):
    with pytest.raises(ValueError, match=r"^sigmoid, softmax, other_act"):
        module(**flags)


@pytest.mark.parametrize("module", OVERLAP_MODULES)
def test_other_act_not_callable(module):
    with pytest.raises(TypeError, match=r"^other_act"):
        module(other_act="tanh")


@pytest.mark.parametrize(
    ("weight", "include_background"),
    [([1.0, 2.0], True), ([1.0, 2.0, 3.0, 4.0], True), ([1.0, 2.0, 3.0], False)],
    ids=["short", "long", "background_counted"],
)
@pytest.mark.parametrize("module", ALL_MODULES)
def test_weight_wrong_length(module, weight, include_background):
    loss = module(weight=weight, include_background=include_background, to_onehot_y=True)
    with pytest.raises(ValueError, match=r"^weight"):
        loss(logits(), labels())


@pytest.mark.parametrize(
    "weight",
    [-1.0, [1.0, -0.5, 1.0], [[1.0, 2.0, 3.0]], "abc", [1.0, None, 2.0], [[1.0], [2.0, 3.0]]],
    ids=["negative", "one_negative", "2d", "str", "none_inside", "ragged"],
)
@pytest.mark.parametrize("module", ALL_MODULES)
def test_weight_bad_values(module, weight):
    with pytest.raises(ValueError, match=r"^weight"):
        module(weight=weight)


@pytest.mark.parametrize(
    "value", [torch.tensor([1 + 5j, 1, 2j]), np.array([0.5 + 3j, 0.5, 0.5]), [1.0, 2j, 1.0], 1j], ids=str
)
@pytest.mark.parametrize("argument", ["weight", "alpha"])
def test_complex_weights_are_refused(argument, value):
    """A cast to real dropped the imaginary parts (with torch's warning for weight, none for alpha)."""
    module = dn.FocalLoss if argument == "alpha" else dn.DiceLoss
    with pytest.raises(TypeError, match=f"^{argument}: expected real weights"):
        module(**{argument: value})


@pytest.mark.parametrize(
    ("alpha", "use_softmax", "include_background"),
    [([0.1, 0.2], False, True), ([0.1, 0.2, 0.3, 0.4], True, True), ([0.1, 0.2, 0.3], True, False),
     ([0.1, 0.2, 0.3], False, False)],
    ids=["sigmoid_short", "softmax_long", "softmax_background_counted", "sigmoid_background_counted"],
)  # fmt: skip
def test_focal_alpha_wrong_length(alpha, use_softmax, include_background):
    loss = dn.FocalLoss(alpha=alpha, use_softmax=use_softmax, include_background=include_background)
    with pytest.raises(ValueError, match=r"^alpha"):
        loss(logits(), labels())


@pytest.mark.parametrize("name", ["alpha_pos", "alpha_neg"])
@pytest.mark.parametrize(
    ("alpha", "error"),
    [(torch.ones(2), ValueError), (torch.ones(1, 3), ValueError), (torch.ones(()), ValueError),
     ([1.0, 1.0, 1.0], TypeError)],
    ids=["short", "2d", "scalar", "list"],
)  # fmt: skip
def test_focal_stats_alpha_shape(name, alpha, error):
    with pytest.raises(error, match=rf"^{name}"):
        ops.focal_stats(logits(), labels(), "sigmoid", **{name: alpha})


@pytest.mark.parametrize(
    ("op", "activation"),
    [
        (ops.overlap_stats, "relu"),
        (ops.overlap_stats, 1),
        (ops.focal_stats, "none"),
        (ops.focal_stats, "tanh"),
    ],
    ids=["overlap-relu", "overlap-int", "focal-none", "focal-tanh"],
)
def test_bad_activation(op, activation):
    with pytest.raises(ValueError, match=r"^activation"):
        op(logits(), labels(), activation)


# ------------------------------------------------------------------------------------------- devices
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("where", ["logits_on_cuda", "target_on_cuda"])
@via
def test_cpu_cuda_mix(call, where):
    x, t = logits(), labels()
    x, t = (x.cuda(), t) if where == "logits_on_cuda" else (x, t.cuda())
    with pytest.raises(ValueError, match=r"^target\b.*\bcuda"):
        CALLS[call](x, t)


@pytest.mark.parametrize("form", ["labels", "onehot"])
@via
def test_target_on_another_device(call, form):
    """Without CUDA: a target on the 'meta' device stands in for a device mix."""
    target = (labels() if form == "labels" else onehot()).to("meta")
    with pytest.raises(ValueError, match=r"^target\b.*\bmeta\b"):  # names the argument and the device
        CALLS[call](logits(), target)


# ------------------------------------------------------------------------------ switches and backends
@via
def test_value_checks_can_be_turned_off(backend, call, monkeypatch):
    """DENSEFUSE_CHECK_VALUES=0: out-of-range labels are not looked for (the documented fast path)."""
    target = labels()
    target[1, 0, 3, 4, 5] = 7
    target[0, 0, 0, 0, 0] = -1
    if call != "FocalLoss_softmax_no_bg":  # never checked there: see test_labels_out_of_range
        with pytest.raises(ValueError, match=r"^target"):  # the same call is an error with the checks on
            CALLS[call](logits(), target)
    monkeypatch.setenv("DENSEFUSE_CHECK_VALUES", "0")
    out = CALLS[call](logits(), target)
    assert torch.isfinite(out).all()  # no garbage either: out-of-range labels read as "no class"


def test_use_unknown_backend():
    with pytest.raises(RuntimeError, match="unknown backend 'nonexistent'"):
        with densefuse.use_backend("nonexistent"):
            pass


@pytest.mark.parametrize("name", [b for b in BACKENDS if b not in densefuse.available_backends()] or ["-"])
def test_use_unavailable_backend(name):
    if name == "-":
        pytest.skip("every backend is available here")
    with pytest.raises(RuntimeError, match=rf"^densefuse: backend '{name}' needs"):
        with densefuse.use_backend(name):
            pass


@pytest.mark.parametrize("name", [b for b in BACKENDS if b not in densefuse.available_backends("cpu")])
def test_backend_for_another_device(name):
    """A backend that exists but cannot take CPU tensors fails at the call, naming the backend."""
    if name in densefuse.available_backends():
        with densefuse.use_backend(name), pytest.raises(RuntimeError, match=f"backend '{name}'"):
            ops.overlap_stats(logits(), labels(), "softmax")
    else:
        with pytest.raises(RuntimeError, match=f"backend '{name}'"):
            with densefuse.use_backend(name):
                pass


@pytest.mark.parametrize("name", ["nonexistent", "TORCH"])
def test_environment_backend(name, monkeypatch):
    """DENSEFUSE_BACKEND naming no backend: the first op call says so."""
    monkeypatch.setenv("DENSEFUSE_BACKEND", name)
    with pytest.raises(RuntimeError, match=f"unknown backend '{name}'"):
        ops.overlap_stats(logits(), labels(), "softmax")
    monkeypatch.setenv("DENSEFUSE_BACKEND", "torch")
    assert ops.overlap_stats(logits(), labels(), "softmax").shape == (2, 3, 3)
