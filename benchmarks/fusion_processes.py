"""The fusion-only call in many fresh processes: does its time depend on the process?

    PYTHONPATH=benchmarks python benchmarks/fusion_processes.py [--processes 20] [--rounds 12]

Each process (a fresh interpreter) builds the CPU "fusion" cases of fusion_providers.py (sw_batch_size
4 and 1), runs densefuse (the cpp backend) and MONAI on them interleaved, ``rounds`` rounds, and
reports the medians of the rounds after the first two. A process-level slow mode (the same code and
inputs taking a multiple of the usual time for a whole process, as the CPU scatter did until its
threads stopped taking work from a shared counter) shows as outliers among the processes' medians;
the JSON keeps every process's medians (or its error), and the summary prints their range and the
processes (numbered from 1) whose median exceeds 1.5x the median over processes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from densefuse.profile import write_json

SLOW = 1.5  # a process is called slow when its median exceeds this multiple of the median over processes
CHILD_TIMEOUT_S = 600


def one_process(rounds: int) -> dict[str, float]:
    """Medians (ms) per (provider, case) in this process, interleaved round by round."""
    import fusion_providers as fp

    cases = [case for case in fp.CASES["cpu"] if case.kind == "fusion"]
    steps = {}
    for case in cases:
        inputs = fp.make_inputs(case, "cpu")
        for provider in ("densefuse-cpp", "monai"):
            steps[f"{provider}-bs{case.sw_batch_size}"] = fp.setup(provider, case, inputs)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: round(statistics.median(t[2:]) * 1e3, 2) for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    import report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=20, help="fresh processes, one after another")
    parser.add_argument("--rounds", type=int, default=12, help="interleaved rounds per process (>= 3)")
    parser.add_argument("--out", type=Path, help="JSON (default: results/processes-<device>-<date>.json)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.processes < 1 or args.rounds < 3:
        parser.error("--processes must be >= 1 and --rounds >= 3")
    if args.child:
        print(json.dumps(one_process(args.rounds)))
        return
    runs: list[dict] = []
    for i in range(args.processes):
        child = [sys.executable, __file__, "--child", "--rounds", str(args.rounds)]
        try:  # a failed child is kept as an error: the others' numbers are kept
            done = subprocess.run(child, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            runs.append({"error": f"no result within {CHILD_TIMEOUT_S} s"})
        else:
            if done.returncode:
                tail = done.stderr.splitlines()[-3:]
                runs.append({"error": f"exit code {done.returncode}", "stderr": tail})
            else:
                try:
                    runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
                except (json.JSONDecodeError, IndexError):
                    runs.append({"error": "no JSON line on stdout", "stdout": done.stdout[-200:]})
        print(f"process {i + 1}: " + "  ".join(f"{k} {v}" for k, v in runs[-1].items()), flush=True)
    measured = [(i, run) for i, run in enumerate(runs, 1) if "error" not in run]
    if not measured:
        raise SystemExit("fusion_processes.py: no process measured anything")
    summary = {}
    for name in measured[0][1]:
        values = [run[name] for _, run in measured]
        middle = statistics.median(values)
        slow = [i for i, run in measured if run[name] > SLOW * middle]
        summary[name] = {"median_ms": middle, "min_ms": min(values), "max_ms": max(values),
                         "slow_processes": slow}  # fmt: skip
        print(f"{name}: median over processes {middle:.1f} ms, range {min(values):.1f}-{max(values):.1f}, "
              f"slow (> {SLOW}x): {len(slow)} of {len(values)}")  # fmt: skip
    info = report.device_info("cpu")
    date = datetime.date.today().isoformat()
    results = {"device": info, "date": date, "versions": report.versions(),
               "threads": torch.get_num_threads(), "rounds": args.rounds, "slow_factor": SLOW,
               "processes": runs, "summary": summary}  # fmt: skip
    out = args.out or report.RESULTS / f"processes-{report.slug(info)}-{date}.json"
    write_json(out, results, indent=1)
    print(f"wrote {out}")
    if len(measured) < len(runs):
        raise SystemExit(f"fusion_processes.py: {len(runs) - len(measured)} of {len(runs)} processes failed")


if __name__ == "__main__":
    main()
