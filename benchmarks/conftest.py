"""pytest-benchmark suite setup: the (device, case, provider) matrix, shared inputs, a memory summary.

    PYTHONPATH=. python -m pytest benchmarks -q --benchmark-enable --benchmark-only

Each case is one benchmark group, so pytest-benchmark prints the providers of a case side by side
with their ratios to the fastest. Peak extra memory (benchmark.extra_info["peak_extra_mb"], see
loss_providers.peak_extra_bytes) is also printed at the end of the run.
"""

from __future__ import annotations

import functools

import loss_providers as lp
import pytest
import torch

_MEMORY = pytest.StashKey[list]()


def devices() -> list[str]:
    return ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "bench_case" not in metafunc.fixturenames:
        return
    matrix = [
        (device, case, provider)
        for device in devices()
        for case in lp.cases(lp.SHAPES[device])
        for provider in lp.providers(device, case)
    ]
    ids = [f"{device}-{case.name}-{provider}" for device, case, provider in matrix]
    metafunc.parametrize("bench_case", matrix, ids=ids)


@functools.lru_cache(maxsize=1)  # the providers of one case run one after the other: keep one case
def shared_inputs(case: lp.Case, device: str) -> lp.Inputs:
    return lp.make_inputs(case, device)


@pytest.fixture
def inputs(bench_case) -> lp.Inputs:
    device, case, _ = bench_case
    return shared_inputs(case, device)


@pytest.fixture
def memory_log(request: pytest.FixtureRequest) -> list:
    return request.config.stash.setdefault(_MEMORY, [])


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    rows = config.stash.get(_MEMORY, [])
    if not rows:
        return
    terminalreporter.section("peak extra memory per fwd+bwd (MB, the gradient included)")
    for group, provider, mb in rows:
        terminalreporter.write_line(f"{group:<36} {provider:<18} {mb:9.1f}")
