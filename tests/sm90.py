"""Compiling Triton kernels for sm_90 (H100) without a GPU, for the tests that check what ptxas makes
of them: register and stack use (spills), and int32 index products.

triton ships ptxas and cuobjdump with its NVIDIA backend, so triton.compile(..., target=sm_90) and the
cubin's resource usage need no device. TRITON_INTERPRET (set by conftest) turns @triton.jit functions
into Python, so the compiling runs in a fresh interpreter without it: run_report runs a script there,
with this directory importable (the script imports this module for compile_sm90 and cuda_launches),
and returns the JSON that the script prints last.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple
from unittest import mock

TESTS = pathlib.Path(__file__).resolve().parent
_CUOBJDUMP = ("backends", "nvidia", "bin", "cuobjdump")  # inside the triton package
_TARGET = ("cuda", 90, 32)  # backend, compute capability, warp size


def _cuobjdump() -> pathlib.Path | None:
    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        return None
    return pathlib.Path(spec.origin).parent.joinpath(*_CUOBJDUMP)


def tools_available() -> bool:
    """Whether triton is installed with its NVIDIA backend tools (ptxas and cuobjdump)."""
    path = _cuobjdump()
    return path is not None and path.exists()


def run_report(script: str, *args: str) -> Any:
    """Runs ``python -c script *args`` from the repository root without TRITON_INTERPRET and with this
    directory on PYTHONPATH; asserts that it succeeds and returns the JSON on its last stdout line."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(TESTS), env.get("PYTHONPATH"))))
    command = [sys.executable, "-c", script, *args]
    done = subprocess.run(command, env=env, cwd=TESTS.parent, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def compile_sm90(
    kernel: Any,
    signature: dict[str, str],
    constexprs: dict,
    attrs: dict | None = None,
    options: dict | None = None,
) -> dict[str, int]:
    """Compiles ``kernel`` (a JITFunction: call in the run_report subprocess) for sm_90 and returns the
    number of int32 tensor products in its TTIR (index overflow) and its registers and stack bytes (spills)
    per thread, as cuobjdump reads them from the cubin."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(kernel, signature, constexprs, attrs)
    compiled = triton.compile(source, target=GPUTarget(*_TARGET), options=options)
    products = re.findall(r"arith\.muli [^\n]*: tensor<[0-9x]+xi32>", compiled.asm["ttir"])
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        command = [str(_cuobjdump()), "--dump-resource-usage", f.name]
        usage = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return {
        "int32_products": len(products),
        "regs": int(re.search(r"REG:(\d+)", usage)[1]),
        "stack": int(re.search(r"STACK:(\d+)", usage)[1]),
    }


class Launch(NamedTuple):
    """A kernel launch as JITFunction.run would compile it: the arguments to compile_sm90."""

    kernel: Any
    signature: dict[str, str]
    constexprs: dict
    attrs: dict
    options: dict

    def key(self) -> str:
        """Equal for launches that compile to the same binary."""
        return repr((self.kernel.fn.__qualname__, *self[1:]))


@contextlib.contextmanager
def cuda_launches() -> Iterator[Callable[..., Launch]]:
    """Inside (in the run_report subprocess), host code runs on fake CUDA tensors and its Triton launches
    are recorded, not run: yields ``launch(host_function, *args, **kwargs) -> Launch``, which calls the
    host function and returns the one launch it made.

    Tensors made inside are FakeTensors on "cuda" (shapes, strides and dtypes; no data, no GPU), so
    host functions take their CUDA branches; torch.cuda.device is a no-op. A launch is bound the way
    JITFunction.run binds it for an sm_90 target: Triton's own specialisation of every argument (an
    int scalar is i32 or i64 by its value, 1 a constexpr, a multiple of 16 marked divisible), with
    every tensor taken as 16-byte aligned (as the caching allocator returns them), and the launch
    options (num_warps, ...). This uses the internals of JITFunction.run in triton 3.6
    (create_function_from_signature, JITFunction._pack_args).
    """
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    backend = make_backend(GPUTarget(*_TARGET))
    launched: list[Launch] = []

    def record(kernel: JITFunction, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug  # as JITFunction.run
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(
            backend, kwargs, bound, specialization, options
        )
        launched.append(Launch(kernel, signature, constexprs, attrs, options.__dict__))

    def launch(host_function: Callable[..., Any], *args: Any, **kwargs: Any) -> Launch:
        host_function(*args, **kwargs)
        assert len(launched) == 1, f"{host_function.__name__} made {len(launched)} launches"
        return launched.pop()

    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", "Accessing the data pointer of FakeTensor")  # read as 0: aligned
        stack.enter_context(mock.patch.object(JITFunction, "run", record))
        stack.enter_context(mock.patch.object(torch.cuda, "device", lambda device: contextlib.nullcontext()))
        stack.enter_context(FakeTensorMode())
        yield launch
