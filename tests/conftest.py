"""Test setup: without CUDA, Triton kernels run on CPU tensors under the interpreter.

TRITON_INTERPRET must be set before triton (or densefuse.kernels) is imported, so it is set here,
at collection time, unless a CUDA device is present.
"""

import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import densefuse


def cpu_backends() -> list[str]:
    return densefuse.available_backends("cpu")


def cuda_backends() -> list[str]:
    return densefuse.available_backends("cuda") if torch.cuda.is_available() else []


@pytest.fixture
def rng(request) -> torch.Generator:
    """A generator seeded from the test id: fresh inputs per case, reproducible per case."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP barrier stalls on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_dynamo():
    """Empty Dynamo caches around a torch.compile test: one test process compiles the same modules in
    many tests, past Dynamo's recompile limit (which fullgraph=True turns into an error)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """With DENSEFUSE_FAILURE_LOG set, each failure's traceback is appended to that file as soon as
    it is reported (pytest-xdist's controller too), so a run cut short by a time limit (the GPU
    check) keeps them; pytest itself prints them only at the end."""
    path = os.environ.get("DENSEFUSE_FAILURE_LOG")
    if path and report.failed and "PYTEST_XDIST_WORKER" not in os.environ:  # xdist: the controller writes
        with open(path, "a") as log:
            log.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")
