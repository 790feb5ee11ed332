"""Dense-block training step: naive vs checkpoint vs fused (densefuse.nn.DenseBlock3d), same process.

Cases and providers: dense_providers.py. One benchmark group per (case, device); peak extra memory
is logged for every provider; on the issue's target block each fused provider is checked against
the memory targets (<= 0.25 x naive, <= 0.8 x checkpoint, both measured here), elsewhere against
checkpoint's memory only. Times are not asserted (shared machines).
"""

from __future__ import annotations

import functools

import dense_providers as dp
import pytest
import torch

ROUNDS = {"cpu": 3, "cuda": 20}
WARMUP = {"cpu": 1, "cuda": 3}
MATRIX = [
    (device, case, provider)
    for device in ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    for case in dp.CASES[device]
    for provider in dp.providers(device)
]


@functools.cache
def peak_mb(case: dp.Case, device: str, provider: str) -> float:
    step = dp.setup(provider, case, dp.make_inputs(case, device))
    step()  # first call outside the measurement
    return dp.peak_extra_bytes(step, device) / 2**20


@pytest.mark.parametrize("dense_case", MATRIX, ids=[f"{d}-{c.name}-{p}" for d, c, p in MATRIX])
def test_dense_block_step(benchmark, dense_case, memory_log):
    device, case, provider = dense_case
    step = dp.setup(provider, case, dp.make_inputs(case, device))
    peak = peak_mb(case, device, provider)
    group = f"{case.name} {device}"
    memory_log.append((group, provider, peak))
    benchmark.group = group
    benchmark.extra_info.update(provider=provider, device=device, case=case.name, peak_extra_mb=peak)
    benchmark.pedantic(dp.synchronized(step, device), rounds=ROUNDS[device], warmup_rounds=WARMUP[device])
    if provider.startswith("fused"):
        rows = {name: {"peak_extra_mb": peak_mb(case, device, name)} for name in ("naive", "checkpoint")}
        rows[provider] = {"peak_extra_mb": peak}
        ratio = dp.ratios(rows, provider)
        if case.target:
            assert all(dp.meets_targets(ratio, device).values()), ratio
        assert ratio["memory_vs_checkpoint"] <= dp.TARGETS["memory_vs_checkpoint"], ratio
