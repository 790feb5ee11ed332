"""Where one sliding-window fusion call spends its time: torch.profiler tables per provider.

    PYTHONPATH=benchmarks python benchmarks/profile_fusion.py [--providers densefuse-triton,monai]
        [--kind fusion] [--calls 5]

For each provider of fusion_providers.py, after warm-up calls, ``--calls`` calls run under
torch.profiler (CPU and, on a GPU, CUDA activity); the tables sorted by self CPU time and by device
time are printed, with the wall-clock time per call and the device's busy time per call (the sum of
kernel and copy times), then cProfile's table of the Python functions by their own time over the same
number of calls (kernel launchers included). Where device time per call is far below wall time per
call, the host (Python, dispatch, launches, synchronisations) sets the pace, not the kernels.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time

import fusion_providers as fp
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


def _repeat(step, calls: int) -> None:
    for _ in range(calls):
        step()  # each result is dropped before the next call


def profile_provider(name: str, case: fp.Case, device: str, calls: int, rows: int) -> None:
    inputs = fp.make_inputs(case, device)
    step = fp.synchronized(fp.setup(name, case, inputs), device)
    for _ in range(3):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(calls):
            step()
    wall_ms = (time.perf_counter() - start) * 1e3 / calls
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]  # the kernels and copies themselves
    device_us = sum(e.self_device_time_total for e in kernels) / calls
    print(f"\n=== {name} on {case.name}: {wall_ms:.2f} ms per call (wall, profiled), "
          f"device busy {device_us / 1e3:.3f} ms per call")  # fmt: skip
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows))
    if device == "cuda":
        print(events.table(sort_by="self_device_time_total", row_limit=rows))
    python_profile = cProfile.Profile()  # the host's Python, launchers included, per function
    python_profile.runcall(_repeat, step, calls)
    print(f"--- {name}: Python functions by own time over {calls} calls (cProfile)")
    pstats.Stats(python_profile, stream=sys.stdout).sort_stats("tottime").print_stats(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--providers", help="comma-separated providers (default: all of the device's)")
    parser.add_argument("--kind", choices=("fusion", "host", "model", "argmax"), default="fusion")
    parser.add_argument("--calls", type=int, default=5, help="profiled calls per provider")
    parser.add_argument("--rows", type=int, default=25, help="rows per table")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    case = next(c for c in fp.CASES[device] if c.kind == args.kind)
    names = args.providers.split(",") if args.providers else fp.providers(device, case)
    for name in names:
        profile_provider(name, case, device, args.calls, args.rows)


if __name__ == "__main__":
    main()
