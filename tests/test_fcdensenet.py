"""FCDenseNet3d: the paper's architecture and parameter count, shapes, input checks, and the three
dense-block implementations giving the same network (outputs, gradients, running statistics) with
interchangeable state_dicts. Tiny networks at 16^3 keep it fast on a CPU."""

from __future__ import annotations

import pytest
import torch

from densefuse.nn import FCDenseNet3d

TINY = dict(growth_rate=4, num_down_blocks=2, layers_per_block=2, stem_channels=8, stem_convs=2)
IMPLEMENTATIONS = ("naive", "checkpoint", "fused")


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_paper_defaults():
    net = FCDenseNet3d()
    assert n_params(net) == 3_297_358  # the paper's "about 3.3 M" (4 inputs, 1 output)
    assert net.size_multiple == 64 and net.implementation == "fused"
    assert [b.out_channels for b in net.down_blocks] == [128, 144, 152, 156, 158]
    assert net.bottleneck_block.in_channels == 79 and net.bottleneck_block.out_channels == 159
    assert [b.in_channels for b in net.up_blocks] == [238, 236, 232, 224, 208]
    for block in net.dense_blocks():
        assert (block.growth_rate, block.num_layers) == (16, 5)
        layer = block.layers[0]
        assert layer.conv1.out_channels == 64 and layer.dropout.p == 0.2
        assert layer.norm1.eps == 1.1e-5
    assert [t[0].out_channels for t in net.transitions_up] == [80] * 5
    assert net.stem[0].stride == (2, 2, 2) and net.stem[0].out_channels == 48
    assert net.head[0].in_channels == 80 and net.head[0].out_channels == 48
    assert net.head[-1].out_channels == 1


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_forward_shape(rng, implementation):
    net = FCDenseNet3d(in_channels=2, out_channels=3, implementation=implementation, **TINY)
    x = torch.randn(2, 2, 16, 8, 24, generator=rng)
    y = net(x)
    assert y.shape == (2, 3, 16, 8, 24) and y.dtype == torch.float32
    y.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_bf16_autocast(rng):
    net = FCDenseNet3d(in_channels=1, **TINY)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(torch.randn(2, 1, 16, 16, 16, generator=rng))
    assert y.shape == (2, 1, 16, 16, 16) and y.dtype == torch.bfloat16


def test_input_checks():
    net = FCDenseNet3d(in_channels=4, **TINY)
    with pytest.raises(ValueError, match=r"input: spatial size \(16, 16, 12\) must be a multiple of 8"):
        net(torch.zeros(1, 4, 16, 16, 12))
    with pytest.raises(ValueError, match=r"input: expected a non-empty shape \[B, 4, D, H, W\]"):
        net(torch.zeros(1, 3, 16, 16, 16))
    with pytest.raises(ValueError, match=r"input: expected a non-empty shape .*, got \(0, 4, 16, 16, 16\)"):
        net(torch.zeros(0, 4, 16, 16, 16))
    with pytest.raises(ValueError, match=r"input: expected a non-empty shape .*, got \(1, 4, 0, 16, 16\)"):
        net(torch.zeros(1, 4, 0, 16, 16))
    with pytest.raises(TypeError, match=r"input: expected a torch\.Tensor, got list"):
        net([[1.0]])
    with pytest.raises(ValueError, match=r"input: in training mode the deepest level's batch statistics"):
        net(torch.zeros(1, 4, 8, 8, 8))  # one voxel of one image after the stem and two down blocks
    assert net.eval()(torch.zeros(1, 4, 8, 8, 8)).shape == (1, 1, 8, 8, 8)
    with pytest.raises(ValueError, match="input"):
        net(torch.zeros(4, 16, 16, 16))
    with pytest.raises(TypeError, match="input: expected a float tensor"):
        net(torch.zeros(1, 4, 16, 16, 16, dtype=torch.uint16))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(layers_per_block=[2, 2, 2]), "layers_per_block"),  # 2 down blocks need 5 counts
        (dict(layers_per_block=0), "layers_per_block"),
        (dict(growth_rate=0), "growth_rate"),
        (dict(num_down_blocks=-1), "num_down_blocks"),
        (dict(in_channels=0), "in_channels"),
        (dict(implementation="fast"), "implementation"),
        (dict(head_channels=0), "head_channels"),
        (dict(in_channels=True), "in_channels"),
        (dict(layers_per_block=True), "layers_per_block"),
        (dict(eps=0.0), "eps"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        FCDenseNet3d(**{**TINY, **kwargs})


def test_sizes_may_be_numpy_and_tensor_integers():
    """As MONAI's networks take them; stored as Python ints."""
    import numpy as np

    sizes = dict(in_channels=np.int64(TINY.get("in_channels", 4)), growth_rate=torch.tensor(2))
    net = FCDenseNet3d(**{**TINY, **sizes, "layers_per_block": np.int32(1), "num_down_blocks": np.int64(1)})
    plain = FCDenseNet3d(**{**TINY, "in_channels": int(sizes["in_channels"]), "growth_rate": 2,
                            "layers_per_block": 1, "num_down_blocks": 1})  # fmt: skip
    assert type(net.in_channels) is int and type(net.num_down_blocks) is int and net.size_multiple == 4
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in plain.parameters())


def test_configurable_architecture(rng):
    net = FCDenseNet3d(
        in_channels=1,
        growth_rate=3,
        num_down_blocks=1,
        layers_per_block=[1, 2, 3],
        bottleneck=None,
        stem_channels=6,
        stem_convs=0,
        head_channels=5,
    )
    assert net.size_multiple == 4
    assert [b.num_layers for b in net.dense_blocks()] == [1, 2, 3]
    assert not hasattr(net.down_blocks[0].layers[0], "conv2")  # BN-ReLU-Conv3x3x3 layers
    assert net.transitions_up[0][0].in_channels == 6  # the bottleneck block's 2 * 3 new maps
    assert net.head[0].in_channels == 9 and net.head[0].out_channels == 5
    assert net(torch.randn(2, 1, 4, 8, 12, generator=rng)).shape == (2, 1, 4, 8, 12)


def test_implementation_setter():
    net = FCDenseNet3d(**TINY)
    net.implementation = "checkpoint"
    assert {b.implementation for b in net.dense_blocks()} == {"checkpoint"}
    with pytest.raises(ValueError, match="implementation"):
        net.implementation = "fast"
    assert net.implementation == "checkpoint"
    assert {b.implementation for b in net.dense_blocks()} == {"checkpoint"}


def test_implementations_agree(rng):
    """Same state_dict, dropout off: same logits, parameter gradients and running stats in train mode,
    same logits in eval mode, whichever implementation runs the dense blocks. In float64: in float32
    the comparison depends on the draw (for some initial weights naive's own float32 gradients are 0.5 %
    off float64's, while fused's are within 0.001 %)."""
    torch.manual_seed(0)
    reference = FCDenseNet3d(in_channels=2, dropout=0.0, implementation="naive", **TINY).double()
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    x = torch.randn(2, 2, 16, 16, 16, generator=rng, dtype=torch.float64)
    results = {}
    for implementation in IMPLEMENTATIONS:
        net = FCDenseNet3d(in_channels=2, dropout=0.0, implementation=implementation, **TINY).double()
        net.load_state_dict(state)
        y = net(x)
        y.square().mean().backward()
        grads = {name: p.grad.clone() for name, p in net.named_parameters()}
        net.eval()
        with torch.no_grad():
            y_eval = net(x)
        results[implementation] = (y.detach(), grads, net.state_dict(), y_eval)
    y0, g0, s0, e0 = results["naive"]
    for implementation in ("checkpoint", "fused"):
        y, g, s, e = results[implementation]
        torch.testing.assert_close(y, y0, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(e, e0, rtol=1e-9, atol=1e-12)
        for name in g0:
            torch.testing.assert_close(g[name], g0[name], rtol=1e-9, atol=1e-12, msg=f"grad {name}")
        for name in s0:
            torch.testing.assert_close(s[name], s0[name], rtol=1e-9, atol=1e-12, msg=f"state {name}")


def test_fused_recomputes_transitions_and_head(rng, monkeypatch):
    """Under "fused" the transitions and the head (in depth slabs) keep only their inputs for backward
    and recompute the rest there: with dropout on, the recomputed masks are the forward's, so the
    gradients and running statistics equal those of the same network keeping its activations."""
    import densefuse.nn.fcdensenet as fcd

    x = torch.randn(2, 2, 16, 16, 16, generator=rng)
    state = FCDenseNet3d(in_channels=2, dropout=0.3, **TINY).state_dict()
    hidden = (2, TINY["stem_channels"], 16, 16, 16)  # the head's full-resolution maps

    def train_step():
        net = FCDenseNet3d(in_channels=2, dropout=0.3, **TINY)
        net.load_state_dict(state)
        torch.manual_seed(7)  # the same dropout masks in both runs
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(t.shape) or t, lambda t: t):
            y = net(x)
        y.square().mean().backward()
        return y.detach(), {n: p.grad for n, p in net.named_parameters()}, net.state_dict(), shapes

    y, grads, states, shapes = train_step()
    monkeypatch.setattr(fcd, "_recomputed", fcd._call)  # no recomputation: activations kept
    y0, grads0, states0, shapes0 = train_step()
    assert hidden in shapes0 and hidden not in shapes
    torch.testing.assert_close(y, y0)
    for name in grads0:
        torch.testing.assert_close(grads[name], grads0[name], rtol=1e-4, atol=1e-6, msg=f"grad {name}")
    for name in states0:
        torch.testing.assert_close(states[name], states0[name], msg=f"state {name}")


def test_checkpoint_network_backward_twice_through_a_retained_graph():
    torch.manual_seed(0)
    net = FCDenseNet3d(in_channels=1, implementation="checkpoint", **TINY)
    loss = net(torch.randn(2, 1, 8, 8, 8)).square().sum()
    loss.backward(retain_graph=True)
    first = net.stem[0].weight.grad.clone()
    loss.backward()
    torch.testing.assert_close(net.stem[0].weight.grad, 2 * first)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_switched_to_eval_before_backward(rng, implementation):
    """model.eval() between forward and backward: the recomputations (checkpoint's dense layers, fused's
    transitions and head) run in the forward's training mode (batch statistics, the same dropout
    masks), so the gradients are those of the same step without the switch."""
    x = torch.randn(2, 2, 16, 16, 16, generator=rng)
    state = FCDenseNet3d(in_channels=2, dropout=0.3, **TINY).state_dict()
    grads = []
    for switch in (False, True):
        net = FCDenseNet3d(in_channels=2, dropout=0.3, implementation=implementation, **TINY)
        net.load_state_dict(state)
        torch.manual_seed(7)  # the same dropout masks
        y = net(x)
        if switch:
            net.eval()
        y.square().mean().backward()
        assert net.training != switch and all(m.training != switch for m in net.modules())
        grads.append({n: p.grad for n, p in net.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=0, atol=0, msg=name)


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_compiled_training_step_matches_eager(rng, implementation):
    """torch.compile (aot_eager) of a training network with dropout on: the same logits, parameter
    gradients and running statistics as the eager step with the same seed (checkpoint's dense layers
    and fused's recomputed transitions and head included)."""
    x = torch.randn(2, 2, 16, 16, 16, generator=rng)
    state = FCDenseNet3d(in_channels=2, dropout=0.3, **TINY).state_dict()
    results = []
    for compiled in (False, True):
        net = FCDenseNet3d(in_channels=2, dropout=0.3, implementation=implementation, **TINY)
        net.load_state_dict(state)
        step = torch.compile(net, backend="aot_eager") if compiled else net
        torch.manual_seed(7)  # the same dropout masks
        y = step(x)
        y.square().mean().backward()
        results.append((y.detach(), {n: p.grad for n, p in net.named_parameters()}, net.state_dict()))
    (y0, grads0, states0), (y, grads, states) = results
    torch.testing.assert_close(y, y0)
    for name in grads0:
        torch.testing.assert_close(grads[name], grads0[name], msg=f"grad {name}")
    for name in states0:
        torch.testing.assert_close(states[name], states0[name], msg=f"state {name}")


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("implementation", ["naive", "checkpoint"])
def test_training_network_compiles_in_one_graph(rng, implementation):
    """fullgraph=True for a training network whose blocks are naive or checkpoint (fused's kernels
    split the graph: its channel plan is read on the host)."""
    net = FCDenseNet3d(in_channels=2, **TINY)
    net.implementation = implementation
    x = torch.randn(2, 2, 16, 16, 16, generator=rng)
    torch.compile(net, backend="aot_eager", fullgraph=True)(x).square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())
