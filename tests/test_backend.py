"""Backend selection: defaults per device, use_backend / DENSEFUSE_BACKEND, clear errors."""

import pytest
import torch
from conftest import cpu_backends

import densefuse
from densefuse import cli
from densefuse.ops import _backend
from densefuse.ops.loss_stats import overlap_stats_op


def test_default_cpu_backend_prefers_the_extension():
    expected = "cpp" if _backend.extension() is not None else "torch"
    assert _backend.select(torch.device("cpu")) == expected


def test_use_backend_nests_and_restores():
    assert _backend.forced_backend() is None
    with densefuse.use_backend("torch"):
        assert _backend.select(torch.device("cpu")) == "torch"
        inner = cpu_backends()[-1]
        with densefuse.use_backend(inner):
            assert _backend.select(torch.device("cpu")) == inner
        assert _backend.forced_backend() == "torch"
    assert _backend.forced_backend() is None


def test_environment_variable_forces_a_backend(monkeypatch):
    monkeypatch.setenv("DENSEFUSE_BACKEND", "torch")
    assert _backend.select(torch.device("cpu")) == "torch"
    monkeypatch.setenv("DENSEFUSE_BACKEND", "warp-drive")
    with pytest.raises(RuntimeError, match="unknown backend 'warp-drive'"):
        _backend.select(torch.device("cpu"))


def test_unknown_backend_is_rejected_at_once():
    with pytest.raises(RuntimeError, match="unknown backend 'tpu'"), densefuse.use_backend("tpu"):
        pass


def test_device_mismatch_is_a_clear_error():
    reason = _backend.unavailable_reason("cuda", "cpu")
    assert reason == "backend 'cuda' runs on cuda tensors, got cpu tensors"
    if "cpp" in cpu_backends():
        with densefuse.use_backend("cpp"), pytest.raises(RuntimeError, match="runs on cpu tensors"):
            _backend.select(torch.device("cuda"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_triton_without_interpreter_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET=1" in _backend.unavailable_reason("triton", "cpu")


@pytest.mark.parametrize("backend", cpu_backends())
def test_every_available_backend_runs(backend):
    logits, labels = torch.randn(1, 2, 8), torch.randint(0, 2, (1, 8))
    with densefuse.use_backend(backend):
        stats, flags = overlap_stats_op(logits, labels, 2, None)
    assert stats.shape == (1, 2, 3) and flags.tolist() == [0, 0, 0]


def test_info_reports_backends(capsys):
    assert cli.main(["info"]) == 0
    report = cli.info()
    assert report["backends"]["cpu"] == cpu_backends()
    assert report["patch_fusion_backend"]["cpu"] == report["default_backend"]["cpu"]
    assert '"default_backend"' in capsys.readouterr().out


def test_backward_runs_on_the_backend_forced_at_forward(monkeypatch):
    """Autograd may run backward on another thread (CUDA): the forced backend travels with the graph."""
    from densefuse.ops import loss_stats

    seen = []
    real = loss_stats._overlap_bwd

    def spy(device):
        seen.append(_backend.select(device))
        return real(device)

    monkeypatch.setattr(loss_stats, "_overlap_bwd", spy)
    logits = torch.randn(1, 2, 8, requires_grad=True)
    with densefuse.use_backend("torch"):
        loss = loss_stats.overlap_stats(logits, torch.randint(0, 2, (1, 8)), "softmax").sum()
    loss.backward()  # outside the block
    assert seen == ["torch"]


def test_available_backends_takes_devices_in_any_form():
    cpu = densefuse.available_backends("cpu")
    assert densefuse.available_backends(torch.device("cpu")) == cpu
    assert densefuse.available_backends("cpu:0") == cpu
    assert densefuse.available_backends(torch.device("cuda", 0)) == densefuse.available_backends("cuda")
    with pytest.raises(ValueError, match="device_type: expected a device such as 'cpu' or 'cuda', got 'gpu'"):
        densefuse.available_backends("gpu")


def test_triton_rejects_other_device_types():
    assert "got mps tensors" in _backend.unavailable_reason("triton", "mps")


def test_registry_falls_back_to_the_reference_only_when_not_forced():
    """An op without a kernel for the default backend runs the reference; forcing that backend raises."""
    present = {"torch": True, "cpp": False, "triton": True}
    registry = _backend.Registry(
        "demo_op",
        {"torch": lambda: "reference", "cpp": lambda: "cpp kernel", "triton": lambda: "triton kernel"},
        has_kernel=present.__getitem__,
    )
    cpu = torch.device("cpu")
    assert registry.has("torch") and not registry.has("cpp") and not registry.has("cuda")
    with _backend.use_backend("torch"):
        assert registry(cpu) == "reference"
    if "cpp" in cpu_backends():
        assert registry(cpu) == "reference"  # the default (cpp) has no kernel for this op
        with _backend.use_backend("cpp"), pytest.raises(RuntimeError, match="demo_op has no 'cpp' kernel"):
            registry(cpu)
    if "triton" in cpu_backends():
        with _backend.use_backend("triton"):
            assert registry(cpu) == "triton kernel"


def test_registry_follows_its_own_order():
    """An op family's order replaces the device default: its first usable backend with a kernel wins."""
    present = {"torch": True, "cpp": True, "triton": True}
    loaders = {name: (lambda name=name: name) for name in present}

    def make_registry() -> _backend.Registry:
        return _backend.Registry(
            "demo_op", loaders, present.__getitem__, order={"cpu": ("triton", "cpp", "torch")}
        )

    registry = make_registry()
    cpu = torch.device("cpu")
    expected = next(b for b in ("triton", "cpp", "torch") if b in cpu_backends())
    assert registry.default("cpu") == registry(cpu) == expected
    present["triton"] = False  # no kernel: the next backend of the order, not the reference
    assert registry.default("cpu") == expected  # a registry finds its default once
    registry = make_registry()
    assert registry.default("cpu") == ("cpp" if "cpp" in cpu_backends() else "torch")
    with _backend.use_backend("torch"):
        assert registry(cpu) == "torch"


def test_patch_fusion_prefers_the_cuda_kernels_on_cuda():
    """Measured on an H100: the C++ fusion kernels beat Triton's (host time); the loss keeps Triton."""
    from densefuse.ops import loss_stats, patch_fuse

    assert patch_fuse.ORDER["cuda"][:2] == ("cuda", "triton")
    assert loss_stats._overlap_fwd.order["cuda"] == _backend.DEFAULT_ORDER["cuda"]
    if torch.cuda.is_available() and "cuda" in patch_fuse.implemented_backends("cuda"):
        assert patch_fuse.default_backend("cuda") == "cuda"
