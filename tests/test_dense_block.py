"""DenseLayer3d / DenseBlock3d: the naive, checkpoint and fused implementations agree.

With the same weights and dropout off: outputs, every parameter gradient, the input gradient and
the running statistics after several training steps, then eval outputs, for bottleneck and plain
layers, odd spatial sizes and batch 1..3 (float64: exact up to rounding; float32: fp32 tolerance).
The fused block also on the Triton backend (interpreter), under autocast, in eval mode with
gradients, with dropout (forward/backward consistency by gradcheck), with small convolution channel
blocks; state_dict interchange; bad input.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import cpu_backends, requires_cuda
from torch.nn.utils import prune, spectral_norm

import densefuse
from densefuse.nn import DenseBlock3d, DenseLayer3d
from densefuse.nn import dense as dense_module

IMPLEMENTATIONS = ("naive", "checkpoint", "fused")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest.one_thread)


CASES = [  # ((batch, in_channels, growth, layers, bottleneck, spatial), BN momentum)
    ((2, 5, 3, 3, 2, (3, 4, 5)), 0.1),
    ((1, 4, 2, 2, None, (3, 5, 4)), None),
    ((3, 6, 4, 2, 4, (1, 3, 5)), None),
    ((2, 3, 3, 3, None, (4, 3, 2)), 0.1),
]


def loss_weights(out: torch.Tensor) -> torch.Tensor:
    """Fixed non-uniform weights: loss = sum(out * weights) gives every output a distinct gradient."""
    return torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out).sin() + 0.3


def train_steps(block: DenseBlock3d, x: torch.Tensor, steps: int = 3):
    """Runs ``steps`` training steps (gradients accumulate); returns what must agree."""
    block.train()
    x = x.detach().clone().requires_grad_()
    for _ in range(steps):
        out = block(x)
        (out * loss_weights(out)).sum().backward()
    grads = {name: p.grad.clone() for name, p in block.named_parameters()}
    buffers = {name: b.clone() for name, b in block.named_buffers()}
    return out.detach(), x.grad, grads, buffers


def assert_all_close(actual, expected, **tol):
    if isinstance(actual, dict):
        assert actual.keys() == expected.keys()
        for key in actual:
            torch.testing.assert_close(actual[key], expected[key], msg=key, **tol)
    else:
        torch.testing.assert_close(actual, expected, **tol)


def scaled_close(actual, expected, rel):
    """|actual - expected| <= rel * max|expected| per tensor (sums of many terms: no elementwise rtol)."""
    if isinstance(actual, dict):
        for key in actual:
            scaled_close(actual[key], expected[key], rel)
        return
    scale = expected.abs().max().clamp(min=1)
    assert (actual - expected).abs().max() <= rel * scale, ((actual - expected).abs().max(), scale)


def make_blocks(case, dtype=torch.float64, momentum=0.1, seed=0):
    batch, c_in, growth, layers, bottleneck, spatial = case
    torch.manual_seed(seed)
    block = DenseBlock3d(c_in, growth, layers, bottleneck=bottleneck, momentum=momentum).to(dtype)
    with torch.no_grad():  # non-trivial affine parameters
        for module in block.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
    x = torch.randn(batch, c_in, *spatial, dtype=dtype) * 1.5 + 0.2
    blocks = {}
    for implementation in IMPLEMENTATIONS:
        blocks[implementation] = copy.deepcopy(block)
        blocks[implementation].implementation = implementation
    return blocks, x


@pytest.mark.parametrize(("case", "momentum"), CASES, ids=str)
def test_implementations_agree_float64(case, momentum, monkeypatch):
    monkeypatch.setattr(dense_module, "CONV_CHANNEL_BLOCK", {"cpu": 4, "cuda": 4})  # several channel blocks
    monkeypatch.setattr(dense_module, "FREE_BEFORE_INPUT_GRAD", {"cpu": momentum is None})  # both paths
    blocks, x = make_blocks(case, momentum=momentum)
    expected = train_steps(blocks["naive"], x)
    for implementation in ("checkpoint", "fused"):
        got = train_steps(blocks[implementation], x)
        for actual, wanted in zip(got, expected):
            assert_all_close(actual, wanted, rtol=1e-9, atol=1e-9)
    blocks_eval = {name: block.eval() for name, block in blocks.items()}
    with torch.no_grad():
        outs = {name: block(x) for name, block in blocks_eval.items()}
    for implementation in ("checkpoint", "fused"):
        torch.testing.assert_close(outs[implementation], outs["naive"], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("bottleneck", [4, None])
def test_implementations_agree_float32(bottleneck):
    case = (2, 7, 4, 3, bottleneck, (5, 7, 6))
    blocks, x = make_blocks(case, dtype=torch.float32)
    expected = train_steps(blocks["naive"], x)
    for implementation in ("checkpoint", "fused"):
        got = train_steps(blocks[implementation], x)
        for actual, wanted in zip(got, expected):
            scaled_close(actual, wanted, 1e-5)
        blocks[implementation].eval()
    blocks["naive"].eval()
    for implementation in ("checkpoint", "fused"):
        scaled_close(blocks[implementation](x), blocks["naive"](x), 1e-5)


@pytest.mark.skipif("triton" not in cpu_backends(), reason="needs triton (interpreter)")
@pytest.mark.parametrize("bottleneck", [2, None])
def test_fused_on_triton_backend(bottleneck):
    blocks, x = make_blocks((2, 4, 3, 2, bottleneck, (3, 4, 5)))
    expected = train_steps(blocks["naive"], x, steps=2)
    with densefuse.use_backend("triton"):
        got = train_steps(blocks["fused"], x, steps=2)
    for actual, wanted in zip(got, expected):
        assert_all_close(actual, wanted, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("bottleneck", [2, None])
def test_eval_mode_with_gradients(bottleneck):
    """Frozen BN (running statistics) while training the convolutions: fused keeps memory low too."""
    blocks, x = make_blocks((2, 5, 3, 3, bottleneck, (4, 5, 3)))
    for block in blocks.values():
        train_steps(block, x, steps=1)  # non-trivial running statistics
        block.zero_grad()
    results = {}
    for name, block in blocks.items():
        block.eval()
        leaf = x.clone().requires_grad_()
        out = block(leaf)
        (out * loss_weights(out)).sum().backward()
        results[name] = (out, leaf.grad, {n: p.grad for n, p in block.named_parameters()})
    for name in ("checkpoint", "fused"):
        for actual, wanted in zip(results[name], results["naive"]):
            assert_all_close(actual, wanted, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("bottleneck", [2, None])
def test_autocast_bf16(bottleneck):
    """Convolutions in bf16, batch statistics in fp32: close to the naive block under autocast."""
    blocks, x = make_blocks((2, 6, 4, 2, bottleneck, (5, 4, 6)), dtype=torch.float32)
    results = {}
    for name in ("naive", "fused"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results[name] = train_steps(blocks[name], x, steps=1)
    out, buffers = results["fused"][0], results["fused"][3]
    assert out.dtype == torch.float32  # x's dtype, as torch.cat of fp32 x and bf16 maps
    for actual, wanted in zip(results["fused"], results["naive"]):
        scaled_close(actual, wanted, 3e-2)
    scaled_close(buffers, results["naive"][3], 1e-2)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_autocast_keeps_the_input_dtype(implementation, rng):
    """Under autocast the block's output has x's dtype with new_only too (naive's: the dtype of the
    whole concatenation), and a float64 x is left alone, as autocast leaves float64 ops."""
    block = DenseBlock3d(4, 2, 2, implementation=implementation)
    x = torch.randn(2, 4, 3, 3, 3, generator=rng)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert block(x, new_only=True).dtype == torch.float32
    block = DenseBlock3d(4, 2, 2, bottleneck=None, implementation=implementation).double()
    x = x.double()
    plain = block(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(block(x), plain)


# The triton 3.6 interpreter truncates fp32 -> bf16 casts (a GPU rounds to nearest even), so under it
# the Triton backend's bf16 results are less accurate than on a GPU: only the other backends here.
@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "triton"])
@pytest.mark.parametrize("bottleneck", [2, None])
def test_bf16_buffer_gradients_as_accurate_as_naive(bottleneck, backend):
    """A bf16 input (as in FCDenseNet3d under autocast): the gradients accumulate in a bf16 buffer, like
    naive's; against the float64 result they are as accurate as naive's (relative L2 error within 1.5x)."""
    blocks, x = make_blocks((2, 6, 4, 3, bottleneck, (5, 4, 6)), dtype=torch.float32)
    x = x.to(torch.bfloat16)
    exact = train_steps(copy.deepcopy(blocks["naive"]).double(), x.double(), steps=1)
    errors = {}
    for name in ("naive", "fused"):
        with torch.autocast("cpu", dtype=torch.bfloat16), densefuse.use_backend(backend):
            out, x_grad, grads, _ = train_steps(blocks[name], x, steps=1)
        assert out.dtype == x_grad.dtype == torch.bfloat16
        got = {"out": out, "x": x_grad, **grads}
        wanted = {"out": exact[0], "x": exact[1], **exact[2]}
        errors[name] = {k: float((got[k].double() - wanted[k]).norm() / wanted[k].norm()) for k in got}
    for key, error in errors["fused"].items():
        assert error <= 1.5 * errors["naive"][key] + 1e-3, (key, error, errors["naive"][key])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("bottleneck", [2, None])
def test_new_only_is_the_new_maps(implementation, bottleneck):
    """block(x, new_only=True) is block(x)[:, in_channels:], with the same gradients."""
    case = (2, 5, 3, 3, bottleneck, (3, 4, 5))
    blocks, x = make_blocks(case)
    twins, _ = make_blocks(case)
    block, twin = blocks[implementation], twins[implementation]
    leaf, twin_leaf = x.clone().requires_grad_(), x.clone().requires_grad_()
    new = block(leaf, new_only=True)
    full = twin(twin_leaf)[:, block.in_channels :]
    assert new.shape == (2, 9, 3, 4, 5)
    torch.testing.assert_close(new, full, rtol=0, atol=0)
    (new * loss_weights(new)).sum().backward()
    (full * loss_weights(full)).sum().backward()
    torch.testing.assert_close(leaf.grad, twin_leaf.grad, rtol=1e-12, atol=1e-12)
    for (name, p), q in zip(block.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12, msg=name)


def test_dropout_forward_backward_consistent():
    """With dropout the fused backward applies the forward's (hashed) mask again: gradcheck with a
    fixed seed."""
    block = DenseBlock3d(2, 2, 2, bottleneck=None, dropout=0.3).double()
    x = torch.randn(2, 2, 2, 3, 2, dtype=torch.double, requires_grad=True)

    def run(x):
        torch.manual_seed(7)
        return block(x)

    assert torch.autograd.gradcheck(run, (x,), fast_mode=True)
    out = run(x)
    new = out[:, 3:]
    assert 0 < (new == 0).double().mean() < 0.7  # some maps dropped, not all
    torch.manual_seed(7)
    assert torch.equal(block(x), out)


def test_fused_dropout_rate_and_scale():
    """The fused block drops each new map value with probability p and scales the kept ones by
    1 / (1 - p): against the same block without dropout (batch statistics: the same maps before it)."""
    block = DenseBlock3d(4, 8, 1, bottleneck=None, dropout=0.3)
    plain = copy.deepcopy(block)
    plain.layers[0].dropout.p = 0.0
    x = torch.randn(2, 4, 16, 16, 16)
    with torch.no_grad():
        new, reference = block(x)[:, 4:], plain(x)[:, 4:]
    dropped = new == 0
    assert abs(dropped.double().mean().item() - 0.3) < 0.01  # 65536 draws: ~5.5 standard deviations
    torch.testing.assert_close(new[~dropped], reference[~dropped] / 0.7)


def test_fused_dropout_of_one_drops_everything():
    """nn.Dropout accepts p = 1 set after construction: every new map is 0, as naive's."""
    block = DenseBlock3d(3, 2, 2, bottleneck=None, dropout=0.5)
    for layer in block.layers:
        layer.dropout.p = 1.0
    out = block(torch.randn(2, 3, 4, 4, 4))
    assert out[:, 3:].abs().max() == 0 and torch.isfinite(out).all()


@pytest.mark.parametrize("bottleneck", [2, None])
def test_fused_backward_uses_the_parameters_it_was_given(bottleneck):
    """torch.func.functional_call with other parameters: naive's output and gradients (the backward
    uses the tensors the forward received, not the module's own parameters)."""
    blocks, x = make_blocks((2, 4, 3, 2, bottleneck, (3, 4, 3)))
    params = {n: (p.detach() * 1.5 + 0.1).requires_grad_() for n, p in blocks["naive"].named_parameters()}
    results = {}
    for name in ("naive", "fused"):
        out = torch.func.functional_call(blocks[name], params, (x,))
        grads = torch.autograd.grad((out * loss_weights(out)).sum(), list(params.values()))
        results[name] = (out, *grads)
    for actual, wanted in zip(results["fused"], results["naive"]):
        torch.testing.assert_close(actual, wanted, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("implementation", ["naive", "fused"])
def test_parameter_changed_in_place_before_backward_is_an_error(implementation):
    blocks, x = make_blocks((2, 4, 3, 2, 2, (3, 3, 3)))
    block = blocks[implementation]
    out = block(x)
    with torch.no_grad():
        block.layers[1].norm1.weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_fused_backward_uses_the_forward_dropout_mode():
    """Switching to eval mode between forward and backward does not change the dropout mask used."""
    block = DenseBlock3d(2, 2, 2, bottleneck=None, dropout=0.3).double()
    x = torch.randn(2, 2, 2, 3, 2, dtype=torch.double, requires_grad=True)
    grads = []
    for switch in (False, True):
        block.train()
        torch.manual_seed(7)
        out = block(x)
        if switch:
            block.eval()
        grads.append(torch.autograd.grad((out * loss_weights(out)).sum(), x)[0])
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


def test_sync_batch_norm():
    """After convert_sync_batchnorm: fused refuses training (its statistics would be per process) and
    names the way out; fused eval (running statistics) and checkpoint training match naive."""
    blocks, x = make_blocks((2, 4, 3, 2, 2, (3, 4, 3)))
    blocks = {name: torch.nn.SyncBatchNorm.convert_sync_batchnorm(b) for name, b in blocks.items()}
    with pytest.raises(
        ValueError,
        match=r"^DenseBlock3d\(in_channels=4, growth_rate=3, num_layers=2\): .*"
        r"layers\.0\.norm1 is a SyncBatchNorm in training mode.*implementation='checkpoint'",
    ):
        blocks["fused"](x)
    expected = train_steps(blocks["naive"], x, steps=1)
    for actual, wanted in zip(train_steps(blocks["checkpoint"], x, steps=1), expected):
        assert_all_close(actual, wanted, rtol=1e-9, atol=1e-9)
    blocks["fused"].load_state_dict(blocks["naive"].state_dict())
    blocks["fused"].eval(), blocks["naive"].eval()
    torch.testing.assert_close(blocks["fused"](x), blocks["naive"](x), rtol=1e-9, atol=1e-9)


class _GlobalStatsBatchNorm3d(torch.nn.BatchNorm3d):
    """Stands in for SyncBatchNorm under DDP: its forward is not F.batch_norm of the local input."""

    def forward(self, x):
        return super().forward(x * 1.5 + 0.25)


def test_checkpoint_recomputation_runs_the_norms_own_forward():
    """Checkpoint recomputes each BN with the module's forward (SyncBatchNorm synchronises again),
    not F.batch_norm of the local batch; running statistics are still updated once."""
    blocks, x = make_blocks((2, 4, 3, 2, 2, (3, 4, 3)))
    for block in (blocks["naive"], blocks["checkpoint"]):
        for layer in block.layers:
            state = layer.norm1.state_dict()
            layer.norm1 = _GlobalStatsBatchNorm3d(layer.norm1.num_features).double()
            layer.norm1.load_state_dict(state)
    expected = train_steps(blocks["naive"], x, steps=2)
    for actual, wanted in zip(train_steps(blocks["checkpoint"], x, steps=2), expected):
        assert_all_close(actual, wanted, rtol=1e-9, atol=1e-9)


def test_state_dicts_are_interchangeable():
    blocks, x = make_blocks((2, 4, 3, 2, 2, (3, 3, 3)))
    train_steps(blocks["fused"], x, steps=2)
    state = blocks["fused"].state_dict()
    assert all(state.keys() == b.state_dict().keys() for b in blocks.values())
    assert "layers.1.norm2.running_var" in state and "layers.0.conv2.weight" in state
    naive = DenseBlock3d(4, 3, 2, bottleneck=2, implementation="naive").double()
    naive.load_state_dict(state)
    naive.eval(), blocks["fused"].eval()
    torch.testing.assert_close(naive(x), blocks["fused"](x))


def test_layer_matches_monai_names_and_shapes():
    layer = DenseLayer3d(10, 4, bottleneck=4, dropout=0.2)
    assert [name for name, _ in layer.named_children()] == ["norm1", "conv1", "norm2", "conv2", "dropout"]
    assert layer.conv1.weight.shape == (16, 10, 1, 1, 1) and layer.conv2.weight.shape == (4, 16, 3, 3, 3)
    assert layer.norm1.eps == 1.1e-5
    plain = DenseLayer3d(10, 4, bottleneck=None)
    assert plain.conv1.weight.shape == (4, 10, 3, 3, 3) and not hasattr(plain, "conv2")
    assert plain(torch.randn(2, 10, 3, 4, 5)).shape == (2, 4, 3, 4, 5)
    block = DenseBlock3d(10, 4, 3)
    assert block.out_channels == 22 and [layer.in_channels for layer in block.layers] == [10, 14, 18]


def test_no_grad_and_input_without_grad():
    blocks, x = make_blocks((2, 4, 3, 2, None, (3, 4, 3)))
    with torch.no_grad():  # training mode: the running statistics are updated all the same
        torch.testing.assert_close(blocks["fused"](x), blocks["naive"](x))
    for block in (blocks["naive"], blocks["fused"]):
        block(x).sum().backward()  # x does not require grad; the parameters do
    for name, param in blocks["fused"].named_parameters():
        torch.testing.assert_close(param.grad, blocks["naive"].get_parameter(name).grad)
    assert_all_close(dict(blocks["fused"].named_buffers()), dict(blocks["naive"].named_buffers()))


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_block_on_the_meta_device(implementation, dropout):
    """A block made on the meta device gives shapes (autocast knows no meta device: not asked; the
    fused block runs the naive one there: it had raised "unsupported scalarType")."""
    with torch.device("meta"):
        block = DenseBlock3d(4, 2, 2, dropout=dropout, implementation=implementation)
        x = torch.randn(2, 4, 8, 8, 8)
    assert block(x).shape == (2, 8, 8, 8, 8)
    assert block(x, new_only=True).shape == (2, 4, 8, 8, 8)


HOOKS = {  # what each puts on the first layer's first conv (or norm): all run where the module is called
    "prune": lambda layer: prune.l1_unstructured(layer.conv1, "weight", 0.5),
    "spectral_norm": lambda layer: spectral_norm(layer.conv1),
    "forward_hook": lambda layer: layer.norm1.register_forward_hook(lambda m, i, o: o * 1.5),
}


@pytest.mark.parametrize("hook", list(HOOKS))
def test_fused_block_with_module_hooks_runs_naive(hook):
    """The fused block never calls the layers' modules, so it would skip their hooks (spectral_norm's
    output was 0.87 off, pruning's second backward failed): with hooks it runs the naive
    implementation, with a warning, and trains exactly as naive does."""
    blocks, x = make_blocks(CASES[0][0])
    for block in blocks.values():
        torch.manual_seed(1)  # spectral_norm draws its start vector
        HOOKS[hook](block.layers[0])
    expected = train_steps(blocks["naive"], x, steps=2)
    with pytest.warns(UserWarning, match=r"layers\.0\.(conv1|norm1) has hooks, .*'naive' runs instead"):
        actual = train_steps(blocks["fused"], x, steps=2)
    for a, e in zip(actual, expected):
        assert_all_close(a, e, rtol=0, atol=0)


def test_fused_block_without_hooks_warns_of_nothing(recwarn):
    blocks, x = make_blocks(CASES[0][0])
    handle = blocks["fused"].layers[1].conv2.register_forward_hook(lambda m, i, o: None)
    handle.remove()
    blocks["fused"](x)
    assert not [w for w in recwarn if "has hooks" in str(w.message)]


def test_sizes_may_be_numpy_and_tensor_integers():
    """As MONAI's dense layers take them."""
    import numpy as np

    block = DenseBlock3d(np.int64(4), torch.tensor(2), np.int32(2), bottleneck=np.int64(4))
    sizes = (block.in_channels, block.growth_rate, block.num_layers, block.out_channels)
    convs = [m for m in block.modules() if isinstance(m, torch.nn.Conv3d)]
    assert sizes == (4, 2, 2, 8) and all(type(v) is int for v in sizes)
    assert all(type(c.in_channels) is int and type(c.out_channels) is int for c in convs)
    assert block(torch.randn(1, 4, 3, 3, 3)).shape == (1, 8, 3, 3, 3)


def test_bad_input():
    block = DenseBlock3d(4, 2, 2)
    with pytest.raises(ValueError, match=r"^x: expected shape \[B, 4, D, H, W\] \(in_channels=4\), got"):
        block(torch.randn(2, 5, 3, 3, 3))
    with pytest.raises(ValueError, match=r"^x: expected shape"):
        block(torch.randn(2, 4, 3, 3))
    with pytest.raises(TypeError, match=r"^x: expected a floating-point tensor"):
        block(torch.ones(2, 4, 3, 3, 3, dtype=torch.int64))
    for implementation in IMPLEMENTATIONS:
        block.implementation = implementation
        with pytest.raises(ValueError, match=r"^x: batch statistics need more than one value per channel"):
            block(torch.randn(1, 4, 1, 1, 1))
    block.eval()
    assert block(torch.randn(1, 4, 1, 1, 1)).shape == (1, 8, 1, 1, 1)  # eval mode: fine
    with pytest.raises(ValueError, match=r"^implementation: expected one of"):
        block.implementation = "fast"
    for implementation in IMPLEMENTATIONS:  # all refuse what nn.Conv3d refuses, naming x
        block.implementation = implementation
        with pytest.raises(TypeError, match=r"^x: expected torch\.float32 like the block's convolutions"):
            block(torch.randn(2, 4, 2, 2, 2, dtype=torch.float64))
        with pytest.raises(TypeError, match=r"^x: expected torch\.float64 like the block's convolutions"):
            copy.deepcopy(block).double()(torch.randn(2, 4, 2, 2, 2))
        mixed = copy.deepcopy(block)
        mixed.layers[1].conv1.double()
        with pytest.raises(
            TypeError, match=r"^x: the block's convolutions have different dtypes \(.*layers\.1\.conv1"
        ):
            mixed(torch.randn(2, 4, 2, 2, 2))
        mixed = copy.deepcopy(block)
        mixed.layers[0].norm2.double()
        with pytest.raises(
            TypeError, match=r"^x: the block's parameter layers\.0\.norm2\.weight is torch\.float64"
        ):
            mixed(torch.randn(2, 4, 2, 2, 2))
        half = copy.deepcopy(block).to(torch.bfloat16)
        for norm in half._norms().values():
            norm.float()  # float32 norms with a half-precision x: nn.BatchNorm3d takes them
        assert half(torch.randn(2, 4, 2, 2, 2, dtype=torch.bfloat16)).dtype == torch.bfloat16
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts: any float x
            assert block(torch.randn(2, 4, 2, 2, 2, dtype=torch.bfloat16)).dtype == torch.bfloat16
    block.train()
    block.layers[1].norm1.eval()
    block.implementation = "fused"
    with pytest.raises(ValueError, match=r"needs every BatchNorm of the block in the same mode"):
        block(torch.randn(2, 4, 2, 2, 2))
    with pytest.raises(ValueError, match=r"^growth_rate: expected a positive int"):
        DenseBlock3d(4, 0, 2)
    with pytest.raises(ValueError, match=r"^dropout: expected a probability in \[0, 1\)"):
        DenseLayer3d(4, 2, dropout=1.0)
    for eps in (0.0, -1e-5, float("nan"), "1e-5"):  # fused would divide a constant channel by zero
        with pytest.raises(ValueError, match=r"^eps: expected a finite number > 0"):
            DenseBlock3d(4, 2, 2, eps=eps)
    assert DenseBlock3d(4, 2, 2, eps=torch.tensor(1e-3)).layers[0].norm1.eps == torch.tensor(1e-3).item()


def relative_l2_close(actual, expected, rel):
    """||actual - expected|| <= rel ||expected|| per tensor. For fp32 gradients of larger blocks: two
    implementations that round BN's pre-activation differently disagree on the ReLU mask of the
    few values within an ulp of 0, which changes those voxels' gradients by O(1) and, through the
    3x3x3 convolutions of earlier layers, their neighbours': a max-abs test fails on that, L2 does not
    (measured at 33^3 on CPU: ~1700 of 2M input-gradient values off by > 1e-4 of the largest, L2 3e-4)."""
    if isinstance(actual, dict):
        for key in actual:
            relative_l2_close(actual[key], expected[key], rel)
        return
    error = (actual.double() - expected.double()).norm() / expected.double().norm().clamp(min=1e-30)
    assert error <= rel, (float(error), rel)


def test_large_fp32_block_matches_naive_in_l2(rng):
    """A bottleneck block at 33^3 (V > 2^15: several parallel work items per row of the C++ kernels),
    fp32, fused (default backend) vs naive: every output, gradient and running statistic within
    1e-3 relative L2 (see relative_l2_close for why not max-abs)."""
    blocks, x = make_blocks((2, 24, 8, 4, 4, (33, 33, 33)), dtype=torch.float32)
    results = {name: train_steps(blocks[name], x, steps=1) for name in ("naive", "fused")}
    for actual, wanted in zip(results["fused"], results["naive"]):
        relative_l2_close(actual, wanted, 1e-3)


def _cuda_train(blocks, x, name):
    """train_steps on the GPU (2 steps) -> (results, peak bytes above the level before)."""
    block = blocks[name].cuda()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    results = train_steps(block, x.cuda(), steps=2)
    return results, torch.cuda.max_memory_allocated() - base


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("bottleneck", [4, None])
def test_cuda_fused_matches_naive(bottleneck, monkeypatch):
    """Max-abs agreement at a size where no ReLU mask flips (passed on an H100, 2026-11-27)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 GEMMs on both sides
    blocks, x = make_blocks((2, 24, 8, 4, bottleneck, (17, 19, 21)), dtype=torch.float32)
    results = {name: _cuda_train(blocks, x, name)[0] for name in ("naive", "fused")}
    for actual, wanted in zip(results["fused"], results["naive"]):
        scaled_close(actual, wanted, 1e-4)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("bottleneck", [4, None])
def test_cuda_fused_needs_less_memory(bottleneck, monkeypatch):
    """At 33x35x37 activations, not cuDNN's workspace, set the peaks (at 17x19x21 the plain block
    measured 0.62x naive's on an H100); the results agree in L2 (relative_l2_close)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    blocks, x = make_blocks((2, 24, 8, 4, bottleneck, (33, 35, 37)), dtype=torch.float32)
    (naive, naive_peak), (fused, fused_peak) = (_cuda_train(blocks, x, n) for n in ("naive", "fused"))
    for actual, wanted in zip(fused, naive):
        relative_l2_close(actual, wanted, 1e-3)
    assert fused_peak < 0.6 * naive_peak, (fused_peak, naive_peak)


def test_checkpoint_recomputes_again_for_a_retained_graph(rng):
    """A graph kept with retain_graph is recomputed at each backward (the recomputation context is
    entered again); the gradients add up as naive's and the running statistics move once."""
    block = DenseBlock3d(4, 2, 2, implementation="checkpoint")
    naive = copy.deepcopy(block)
    naive.implementation = "naive"
    x = torch.randn(2, 4, 3, 3, 3, generator=rng)
    grads = []
    for module in (block, naive):
        inputs = x.clone().requires_grad_(True)
        out = module(inputs).square().sum()
        out.backward(retain_graph=True)
        out.backward()
        grads.append(inputs.grad)
    torch.testing.assert_close(grads[0], grads[1])
    torch.testing.assert_close(block.state_dict(), naive.state_dict())


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_compiled_block_trains_as_eager_naive(implementation):
    """torch.compile (aot_eager) gives naive eager's outputs, input and parameter gradients and
    running statistics over three training steps (two fresh copies of one initial block)."""
    results = []
    for compiled in (False, True):
        blocks, x = make_blocks((2, 4, 3, 2, 2, (3, 4, 3)))
        block = blocks[implementation] if compiled else blocks["naive"]
        step = torch.compile(block, backend="aot_eager") if compiled else block
        inputs = x.detach().clone().requires_grad_()
        for _ in range(3):
            out = step(inputs)
            (out * loss_weights(out)).sum().backward()
        grads = {name: p.grad.clone() for name, p in block.named_parameters()}
        state = {name: t.clone() for name, t in block.state_dict().items()}
        results.append((out.detach(), inputs.grad.clone(), grads, state))
    assert results[1][3]["layers.0.norm1.num_batches_tracked"] == 3
    for actual, wanted in zip(results[1], results[0]):
        assert_all_close(actual, wanted, rtol=1e-9, atol=1e-9)


def test_reading_saved_tensors_does_not_move_running_statistics():
    """Reading a checkpoint block's saved tensors outside backward (as torchviz's show_saved does)
    recomputes the layers there; their BatchNorms leave the running statistics alone."""
    blocks, x = make_blocks((2, 4, 3, 2, 2, (3, 4, 3)))
    out = blocks["checkpoint"](x.requires_grad_())
    before = {name: t.clone() for name, t in blocks["checkpoint"].state_dict().items()}
    seen, stack, read = set(), [out.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for attr in (a for a in dir(node) if a.startswith("_saved_")):
            getattr(node, attr)
            read += 1
        stack.extend(next_node for next_node, _ in node.next_functions)
    assert read
    assert_all_close(blocks["checkpoint"].state_dict(), before, rtol=0, atol=0)


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("graph_break", [False, True])
def test_compiled_checkpoint_counts_running_statistics_once(graph_break):
    """Cumulative-average BatchNorm (momentum None: its num_batches_tracked read breaks the graph) and a
    hook that breaks it inside the checkpointed region: torch.compile then runs torch's checkpoint
    eagerly, whose recomputation must leave the running statistics alone. Different batches per step
    and one eager step after the compiled ones, so a double update shows."""
    torch.manual_seed(1)
    xs = [torch.randn(2, 4, 3, 4, 3, dtype=torch.float64) * (i + 1) + i for i in range(4)]
    states = []
    for compiled in (False, True):
        torch.manual_seed(0)
        block = DenseBlock3d(4, 3, 2, bottleneck=2, momentum=None, implementation="checkpoint").double()
        if graph_break:
            block.layers[0].norm1.register_forward_hook(lambda *args: torch._dynamo.graph_break())
        step = torch.compile(block, backend="aot_eager") if compiled else block
        for x in xs[:3]:
            step(x.clone().requires_grad_()).sum().backward()
        block(xs[3].clone().requires_grad_()).sum().backward()
        states.append(block.state_dict())
    assert_all_close(states[1], states[0], rtol=1e-9, atol=1e-9)


@pytest.mark.usefixtures("fresh_dynamo")
def test_compile_leaves_the_fused_block_out_in_one_piece():
    """torch.compile does not trace into the fused block (its kernels are planned on the host, which
    split it into a dozen graphs): at most one graph break for the block."""
    blocks, x = make_blocks((2, 4, 3, 2, 2, (3, 4, 3)))
    explanation = torch._dynamo.explain(blocks["fused"])(x.requires_grad_())
    assert explanation.graph_break_count <= 1, explanation.break_reasons
