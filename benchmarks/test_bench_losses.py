"""Forward + backward of the Tversky and focal losses: densefuse backends vs MONAI vs plain PyTorch.

Cases and providers: loss_providers.py. One benchmark group per (case, device).
"""

from __future__ import annotations

import loss_providers as lp
import pytest

ROUNDS = {"cpu": 10, "cuda": 100}
WARMUP = {"cpu": 2, "cuda": 10}


def test_loss_fwd_bwd(benchmark, bench_case, inputs, memory_log):
    device, case, provider = bench_case
    if provider == "monai":
        pytest.importorskip("monai")
    step = lp.setup(provider, case, inputs)
    step()  # first call outside the measurements (lazy imports, JIT compilation)
    group = f"{case.name} {device}"
    peak_mb = lp.peak_extra_bytes(step, inputs) / 2**20
    memory_log.append((group, provider, peak_mb))
    benchmark.group = group
    benchmark.extra_info.update(provider=provider, device=device, case=case.name, peak_extra_mb=peak_mb)
    benchmark.pedantic(lp.synchronized(step, device), rounds=ROUNDS[device], warmup_rounds=WARMUP[device])
