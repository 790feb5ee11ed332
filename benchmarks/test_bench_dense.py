"""Dense-block training step: naive vs checkpoint vs fused (densefuse.nn.DenseBlock3d), same process.

Cases and providers: dense_providers.py. One benchmark group per (case, device); peak extra memory
is logged for every provider; on the issue's target block each fused provider is checked against
the memory targets (<= 0.25 x naive, <= 0.8 x checkpoint, both measured here), elsewhere against
checkpoint's memory only. Also dropout: torch's against densefuse's hashed dropout_. Times are not
asserted (shared machines).
"""

from __future__ import annotations

import functools

import dense_providers as dp
import pytest
import torch

import densefuse
from densefuse.ops import dense_block

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


# Dropout of a layer's new maps: torch's (nn.Dropout, as naive and checkpoint use it: a random mask per
# call) against densefuse.ops.dense_block.dropout_ (a hash of seed and index, nothing drawn or stored).
DROPOUT_SHAPES = {"cpu": (2, 16, 48, 48, 48), "cuda": (4, 16, 128, 128, 128)}
DROPOUT_MATRIX = [
    (device, provider)
    for device in ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    for provider in ["torch", *(p.replace("fused", "densefuse") for p in dp.providers(device) if "-" in p)]
]


def dropout_step(device: str, provider: str) -> dp.Step:
    x = torch.randn(DROPOUT_SHAPES[device], device=device)
    if provider == "torch":
        return lambda: torch.nn.functional.dropout(x, 0.2, training=True, inplace=True)
    backend = provider.removeprefix("densefuse-")
    seeds = iter(range(2**62))

    def step() -> None:
        with densefuse.use_backend(backend):
            dense_block.dropout_(x, next(seeds), 0.2)

    return step


@pytest.mark.parametrize("dropout_case", DROPOUT_MATRIX, ids=[f"{d}-{p}" for d, p in DROPOUT_MATRIX])
def test_dropout(benchmark, dropout_case, memory_log):
    device, provider = dropout_case
    step = dropout_step(device, provider)
    step()
    peak = dp.peak_extra_bytes(step, device) / 2**20
    group = f"dropout p=0.2 {list(DROPOUT_SHAPES[device])} {device}"
    memory_log.append((group, provider, peak))
    benchmark.group = group
    benchmark.extra_info.update(provider=provider, device=device, peak_extra_mb=peak)
    benchmark.pedantic(dp.synchronized(step, device), rounds=ROUNDS[device] * 3, warmup_rounds=WARMUP[device])
    if provider in ("densefuse-cpp", "densefuse-triton"):  # the kernels (the torch backend is a reference)
        assert peak < 1  # no mask, no random tensor
