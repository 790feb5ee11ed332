"""FCDenseNet3d training step: naive vs checkpoint vs fused dense blocks, same process.

One step = forward (autocast for bf16), the paper's F-beta loss on a uint8 label map, backward, Adam
step: densefuse.profile.TrainingStep, the step `densefuse profile-memory` measures. Every contender
runs the same network (same seed, same weights), only FCDenseNet3d.implementation differs;
cudnn.benchmark is on for every one. One benchmark group per (case, device); the peak extra memory
of a step (bytes allocated above the level before it: CUDA max_memory_allocated, CPU the profiler's
allocator events, see loss_providers.peak_extra_bytes) is logged and printed at the end.

    PYTHONPATH=. python -m pytest benchmarks/test_bench_model.py -q --benchmark-enable --benchmark-only
"""

from __future__ import annotations

import functools

import loss_providers as lp
import pytest
import torch
from dense_providers import ModelCase, training_step

from densefuse.nn.dense import IMPLEMENTATIONS

ROUNDS = {"cpu": 3, "cuda": 20}
WARMUP = {"cpu": 1, "cuda": 3}
CASES = {
    "cpu": [ModelCase(3, 2, 32)],  # batch 2: at batch 1 these small convolutions take ATen's slow_conv3d
    "cuda": [ModelCase(5, 4, 128), ModelCase(5, 4, 128, "bf16")],  # DESIGN §6's anchors
}
MATRIX = [
    (device, case, implementation)
    for device in ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    for case in CASES[device]
    for implementation in IMPLEMENTATIONS
]


@functools.cache
def peak_extra_mb(case: ModelCase, device: str, implementation: str) -> float:
    """Peak bytes allocated during one step above the level before it, in MiB (after two warm-up steps)."""
    step = training_step(case, device, implementation)
    step()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return lp.cpu_peak_extra_bytes(step) / 2**20


@pytest.mark.parametrize("model_case", MATRIX, ids=[f"{d}-{c.name}-{i}" for d, c, i in MATRIX])
def test_model_training_step(benchmark, model_case, memory_log):
    device, case, implementation = model_case
    peak = peak_extra_mb(case, device, implementation)
    step = training_step(case, device, implementation)
    group = f"{case.name} {device}"
    memory_log.append((group, implementation, peak))
    benchmark.group = group
    benchmark.extra_info.update(provider=implementation, device=device, case=case.name, peak_extra_mb=peak)
    benchmark.pedantic(lp.synchronized(step, device), rounds=ROUNDS[device], warmup_rounds=WARMUP[device])
    if implementation == "fused":  # the point of the fused blocks: less memory than either anchor
        assert peak < peak_extra_mb(case, device, "checkpoint") < peak_extra_mb(case, device, "naive")
