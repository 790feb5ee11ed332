"""densefuse.profile: size parsing, the memory-model fit and planner on synthetic data, and real
measurements (CPU: child processes; CUDA: in process) checked against the fitted model."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import requires_cuda

from densefuse import profile
from densefuse.profile import MemoryModel, Network, Point

GiB = 2**30


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24GiB", 24 * GiB),
        ("8GB", 8 * 10**9),
        ("512MiB", 512 * 2**20),
        ("512 mib", 512 * 2**20),
        ("1.5GiB", int(1.5 * GiB)),
        ("100", 100),
        ("2kB", 2000),
        ("1TiB", 2**40),
    ],
)
def test_parse_size(text, expected):
    assert profile.parse_size(text) == expected


@pytest.mark.parametrize(
    "text", ["", "GiB", "lots", "24 GiBs", "-1GiB", "0", "0.1B", "1e400GB", "24 PiB", "1,5GB"]
)
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="--memory: expected a"):
        profile.parse_size(text, "--memory")


def test_format_size():
    assert profile.format_size(14.94 * GiB) == "14.9 GiB"
    assert profile.format_size(3 * 2**20) == "3 MiB"
    assert profile.format_size(1500) == "1.46 KiB"
    assert profile.format_size(12) == "12 B"
    assert profile.format_size(2**20 - 1) == "1 MiB"  # not "1.02e+03 KiB"
    assert profile.format_size(1023.9) == "1 KiB"
    assert profile.format_size(999) == "999 B"


def synthetic_rows(a: float, b: float, points, noise: float = 0.0, impl="fused", dtype="bf16", seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for batch, patch in points:
        scale = 1 + noise * (2 * torch.rand((), generator=gen).item() - 1)
        peak = int((a + b * batch * patch**3) * scale)
        rows.append(
            {"implementation": impl, "dtype": dtype, "batch": batch, "patch": patch, "peak_bytes": peak}
        )
    return rows


def test_fit_recovers_synthetic_model():
    a, b = 300 * 2**20, 3400.0  # 300 MiB + 3.4 KB per voxel
    rows = synthetic_rows(a, b, [(2, 64), (3, 64), (4, 64), (1, 128)])
    rows += synthetic_rows(2 * a, b / 2, [(2, 64), (4, 64)], impl="naive", dtype="fp32")
    rows.append(
        {"implementation": "fused", "dtype": "bf16", "batch": 8, "patch": 64, "error": "out of memory"}
    )
    models = profile.fit_memory_models(rows)
    assert set(models) == {("fused", "bf16"), ("naive", "fp32")}
    fused = models[("fused", "bf16")]
    assert fused.points == 4 and fused.max_rel_residual < 1e-6
    assert fused.intercept_bytes == pytest.approx(a, rel=1e-6)
    assert fused.bytes_per_voxel == pytest.approx(b, rel=1e-6)
    assert models[("naive", "fp32")].bytes_per_voxel == pytest.approx(b / 2, rel=1e-6)


def test_fit_with_noise_predicts_within_tolerance():
    """2 % measurement noise on small points: the extrapolation 8x further stays within 10 %."""
    a, b = 500e6, 2000.0
    rows = synthetic_rows(a, b, [(1, 64), (2, 64), (3, 64), (4, 64), (2, 96)], noise=0.02, seed=3)
    model = profile.fit_memory_models(rows)[("fused", "bf16")]
    truth = a + b * 4 * 128**3
    assert abs(model.predict(4, 128) - truth) / truth < 0.10
    assert 0 < model.max_rel_residual < 0.05


def test_fit_rejects_underdetermined_and_shrinking():
    with pytest.raises(ValueError, match=r"two or more values of batch \* patch\^3"):
        profile.fit_memory_models(synthetic_rows(1e8, 1e3, [(2, 32), (2, 32)]))
    with pytest.raises(ValueError, match="does not grow"):
        profile.fit_memory_models(synthetic_rows(1e9, -1e3, [(1, 32), (2, 32)]))
    with pytest.raises(ValueError, match="no successful measurement"):
        profile.fit_memory_models(
            [{"implementation": "naive", "dtype": "fp32", "batch": 1, "patch": 8, "error": "x"}]
        )


def test_largest_batch_and_patch():
    model = MemoryModel(
        "naive", "fp32", intercept_bytes=1e9, bytes_per_voxel=1000.0, points=3, max_rel_residual=0
    )
    voxels = 64**3
    assert model.largest_batch(1e9 + 5 * voxels * 1000, 64) == 5  # exactly at the budget: fits
    assert model.largest_batch(1e9 + 5 * voxels * 1000 - 1, 64) == 4
    assert model.largest_batch(0.5e9, 64) == 0  # the intercept alone is over budget
    budget = 1e9 + 2 * 1000 * 128**3
    assert model.largest_patch(budget, batch=2, multiple=32) == 128
    assert model.largest_patch(budget - 1, batch=2, multiple=32) == 96
    assert model.largest_patch(budget, batch=2, multiple=1) == 128
    assert model.largest_patch(1e9 + 1000 * 2 * 31**3, batch=2, multiple=32) == 0


def test_plan_rows():
    models = profile.fit_memory_models(
        synthetic_rows(1e8, 1000.0, [(1, 32), (2, 32)], impl="naive", dtype="fp32")
        + synthetic_rows(1e8, 250.0, [(1, 32), (2, 32)], impl="fused", dtype="fp32")
    )
    budget = 1e8 + 1000.0 * 3 * 64**3 + 1000  # a little slack for the rounding of the synthetic peaks
    by_impl = {r["implementation"]: r for r in profile.plan(models, budget, multiple=16, patch=64)}
    assert by_impl["naive"]["batch"] == 3 and by_impl["fused"]["batch"] == 12
    assert by_impl["naive"]["predicted_bytes"] == pytest.approx(budget, rel=1e-5)
    by_impl = {r["implementation"]: r for r in profile.plan(models, budget, multiple=16, batch=3)}
    assert by_impl["naive"]["patch"] == 64 and by_impl["fused"]["patch"] == 96  # 64 * 4^(1/3) = 101.6
    nothing = profile.plan(models, 5e7, multiple=16, patch=64)
    assert all(r["batch"] == 0 and r["predicted_bytes"] is None for r in nothing)
    with pytest.raises(ValueError, match="exactly one"):
        profile.plan(models, budget, multiple=16, patch=64, batch=2)
    for args, name in [
        ((budget, 16), "batch"),
        ((math.nan, 16), "budget"),
        ((math.inf, 16), "budget"),
        ((budget, 0), "multiple"),
        ((budget, -4), "multiple"),
    ]:
        with pytest.raises(ValueError, match=name):
            profile.plan(models, *args, batch=-1 if name == "batch" else 2)
    huge = {r["implementation"]: r for r in profile.plan(models, 1e70, multiple=16, batch=2)}  # returns
    assert huge["fused"]["patch"] > 10**21


def test_check_points():
    net = Network(num_down_blocks=2)  # patches: multiples of 8
    assert profile.check_points(net, [Point("fused", "fp32", 1, 16)])
    for point, name in [
        (Point("fast", "fp32", 1, 16), "implementation"),
        (Point("fused", "fp16", 1, 16), "dtype"),
        (Point("fused", "fp32", 0, 16), "batch"),
        (Point("fused", "fp32", 1, 12), "patch: expected a positive multiple of 8"),
        (Point("fused", "fp32", 2**31, 16), "batch: expected a positive integer below 2\\*\\*31"),
        (Point("fused", "fp32", 1, 2**31), "patch: expected a positive multiple of 8 .* below 2"),
    ]:
        with pytest.raises(ValueError, match=name):
            profile.check_points(net, [point])
    with pytest.raises(ValueError, match="target"):
        Network(target="layer")
    for point, name in [
        (Point("fused", "fp32", 2.5, 16), "batch"),
        (Point("fused", "fp32", 1, 16.0), "patch"),
    ]:
        with pytest.raises(ValueError, match=name):
            profile.check_points(net, [point])
    for change, name in [
        (dict(growth_rate=0), "growth_rate: expected a positive integer"),
        (dict(num_down_blocks=-1), r"num_down_blocks: expected an integer in \[0, 28\]"),
        (dict(num_down_blocks=20000), r"num_down_blocks: expected an integer in \[0, 28\]"),
        (dict(dropout=2.0), "dropout: expected a probability"),
        (dict(bottleneck=0), "bottleneck: expected a positive integer or None"),
    ]:
        with pytest.raises(ValueError, match=name):
            Network(**change)
    assert profile.grid(["naive", "fused"], ["fp32"], [1, 2], [8, 16])[:3] == [
        Point("naive", "fp32", 1, 8),
        Point("naive", "fp32", 1, 16),
        Point("naive", "fp32", 2, 8),
    ]


# A dense block whose convolutions run oneDNN from 32^3 on (below, ATen's slow_conv3d allocates
# im2col buffers that do not scale with the patch), big enough that memory is mostly activations.
BLOCK = Network(target="block", in_channels=32, growth_rate=8, num_layers=2, dropout=0.0)


def test_cpu_measurement_predicts_an_extra_point():
    """Fit on two small measured points, predict a third: the CPU count follows live tensor memory."""
    rows = [
        profile.measure(BLOCK, Point("naive", "fp32", 1, patch), "cpu", warmup=1, reps=1)
        for patch in (32, 36)
    ]
    assert all(r["peak_bytes"] > 0 and r["median_ms"] > 0 for r in rows), rows
    model = profile.fit_memory_models(rows)[("naive", "fp32")]
    # a naive block at least keeps its output and the four BN/ReLU/conv intermediates of each layer
    assert model.bytes_per_voxel > 4 * (32 + 2 * 8)
    check = profile.measure(BLOCK, Point("naive", "fp32", 1, 40), "cpu", warmup=1, reps=1)
    predicted, measured = model.predict(1, 40), check["peak_bytes"]
    print(f"CPU: predicted {predicted / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB at 40^3")
    assert abs(predicted - measured) / measured < 0.10, (rows, check)


def test_cpu_measurement_reports_failures():
    """A step that raises in the child comes back as an error row, not an exception."""
    net = Network(growth_rate=2, num_layers=1, num_down_blocks=1)  # at 4^3, batch 1: one voxel per channel
    row = profile.measure(net, Point("naive", "fp32", 1, 4), "cpu", warmup=1, reps=1)
    assert "peak_bytes" not in row and "more than one value per channel" in row["error"]
    with pytest.raises(ValueError, match="warmup"):
        profile.measure(net, Point("naive", "fp32", 1, 4), "cpu", warmup=0)


@requires_cuda
@pytest.mark.gpu
def test_cuda_prediction_within_ten_percent():
    """DESIGN §6 / issue 4: on a GPU the planner's prediction is within 10 % of the measured peak."""
    net = Network(num_down_blocks=3)  # the paper's widths, patches multiples of 16
    for impl in ("naive", "checkpoint", "fused"):
        for dtype in ("fp32", "bf16"):
            rows = [profile.measure(net, Point(impl, dtype, b, 64), "cuda", reps=1) for b in (1, 2, 3)]
            model = profile.fit_memory_models(rows)[(impl, dtype)]
            check = profile.measure(net, Point(impl, dtype, 2, 128), "cuda", reps=1)  # 5.3x the largest fit
            error = (model.predict(2, 128) - check["peak_bytes"]) / check["peak_bytes"]
            assert math.isfinite(error) and abs(error) < 0.10, (impl, dtype, rows, check)


def test_numpy_and_tensor_integers_become_python_ints():
    """Integers of any kind are accepted and stored as Python ints, so rows and networks go to JSON."""
    import dataclasses
    import json

    import numpy as np

    network = Network(target="block", in_channels=np.int64(2), num_layers=torch.tensor(2), growth_rate=2)
    json.dumps(dataclasses.asdict(network))
    (point,) = profile.check_points(network, [Point("naive", "fp32", np.int64(2), torch.tensor(4))])
    assert type(point.batch) is int and type(point.patch) is int
    models = profile.fit_memory_models(synthetic_rows(1e6, 10.0, [(1, 8), (2, 8)]))
    rows = profile.plan(models, np.float32(1e7), np.int64(8), batch=np.int64(2))
    json.dumps(rows)
    assert all(type(row[key]) is int for row in rows for key in ("batch", "patch"))


def test_bad_rows_and_arguments_name_what_is_wrong(tmp_path):
    network = Network(target="block", in_channels=1, num_layers=1, growth_rate=2)
    point = Point("naive", "fp32", 1, 2)
    with pytest.raises(ValueError, match="warmup: expected a positive integer below 2\\*\\*31, got '2'"):
        profile.measure(network, point, warmup="2")
    with pytest.raises(ValueError, match="device: "):
        profile.measure(network, point, device="gpu")
    good = synthetic_rows(1e6, 10.0, [(1, 8), (2, 8)])
    for bad, message in (
        ({**good[0], "peak_bytes": "abc"}, "expected a finite peak_bytes >= 1, got 'abc'"),
        ({**good[0], "peak_bytes": -1e12}, "expected a finite peak_bytes >= 1, got -1000000000000.0"),
        ({"peak_bytes": 5}, "missing implementation, dtype, batch, patch"),
        ({**good[0], "peak_bytes": 10**400}, "expected a finite peak_bytes >= 1, got 1000"),
        ({**good[0], "peak_bytes": 1e-300}, "expected a finite peak_bytes >= 1, got 1e-300"),
        ({**good[0], "batch": 10**400}, "batch: expected a positive integer below 2"),
    ):
        with pytest.raises(ValueError, match=message):
            profile.fit_memory_models([good[1], bad])
    model = next(iter(profile.fit_memory_models(good).values()))
    with pytest.raises(ValueError, match=r"patch: expected a positive integer below 2\*\*31, got 0"):
        model.largest_batch(1e9, 0)
    with pytest.raises(ValueError, match=r"multiple: expected a positive integer below 2\*\*31, got 0"):
        model.largest_patch(1e9, 1, 0)
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 100000)
    with pytest.raises(ValueError, match=r"nested\.json: not a densefuse profile-memory JSON"):
        profile.load_report(nested)
