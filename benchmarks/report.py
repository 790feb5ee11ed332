"""Loss benchmark report: every provider of loss_providers.py timed in one process, written as JSON.

    python benchmarks/report.py [--device cpu|cuda] [--out FILE.json] [--sizes 2x1x96x96x96 ...]

Per case (Tversky and focal loss, forward + backward, for each size; C == 1: sigmoid, C > 1: softmax)
and provider: median and p20/p80 time (CUDA: triton.testing.do_bench, which flushes L2 before each
run; CPU: time.perf_counter after warmup), peak extra memory (loss_providers.peak_extra_bytes), the
time of the first call (compilation included), speedups vs MONAI and vs torch.compile of the plain
formula (Tversky), and on CUDA the fraction of the measured copy bandwidth reached: the least bytes a
fused fwd+bwd moves (read logits + labels twice, write the gradient) / time / bandwidth of a large
device-to-device copy_ (read + write bytes). The JSON goes to benchmarks/results/<device>-<date>.json
by default; a Markdown table for the README is printed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import signal
import sys
import time
from pathlib import Path

import loss_providers as lp
import numpy as np
import torch

import densefuse
from densefuse.profile import git_commit, out_problem, write_json

RESULTS = Path(__file__).resolve().parent / "results"
QUANTILES = (50, 20, 80)


def parse_shape(text: str) -> tuple[int, ...]:
    shape = tuple(int(n) for n in text.lower().split("x"))
    if len(shape) != 5 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"--sizes: expected BxCxDxHxW like 2x1x96x96x96, got {text!r}")
    return shape


def cpu_model() -> str:
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        match = None
    return match.group(1).strip() if match else platform.processor() or platform.machine()


def device_info(device: str) -> dict:
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return {"type": "cuda", "name": props.name, "memory_gb": round(props.total_memory / 1e9, 1)}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "type": "cpu",
        "name": cpu_model(),
        "cores": cores,
        "threads": torch.get_num_threads(),
        "load_1min": round(os.getloadavg()[0], 2),  # other work on the machine skews CPU timings
    }


def slug(info: dict) -> str:
    name = info["name"] if info["type"] == "cuda" else f"cpu-{info['name']}-{info['cores']}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60]


def versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        import monai

        monai_version = monai.__version__
    except ImportError:
        monai_version = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "monai": monai_version,
        "densefuse": densefuse.__version__,
        "densefuse_git": git_commit(),  # "<sha>[-dirty]" of the source checkout the numbers come from
        "densefuse_backends": densefuse.available_backends(),
    }


def percentiles(samples: list[float]) -> dict:
    times = np.percentile(samples, QUANTILES).tolist()
    return dict(zip(("median_ms", "p20_ms", "p80_ms"), (round(t, 4) for t in times)))


def time_ms(step: lp.Step, device: str, reps: int) -> dict:
    """Median, p20 and p80 of ``step`` in milliseconds (one step alone)."""
    if device == "cuda":
        from triton.testing import do_bench

        times = do_bench(step, warmup=25, rep=200, quantiles=[q / 100 for q in QUANTILES])
        return dict(zip(("median_ms", "p20_ms", "p80_ms"), (round(t, 4) for t in times)))
    return interleaved_ms({"step": step}, reps)["step"]


def interleaved_ms(steps: dict[str, lp.Step], reps: int) -> dict[str, dict]:
    """CPU timings of several steps taken in turns (rep by rep, rotating the order), so a burst of
    load on a shared machine hits every provider alike and the ratios stay meaningful."""
    names = list(steps)
    for _ in range(max(2, reps // 10)):
        for name in names:
            steps[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            start = time.perf_counter()
            steps[name]()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: percentiles(samples[name]) for name in names}


def copy_bandwidth_gbps(device: str) -> float:
    """Device-to-device copy of 1 GiB: (read + write bytes) / median time."""
    src = torch.empty(2**28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, reps=20)["median_ms"]
    return round(2 * src.nbytes / (ms * 1e-3) / 1e9, 1)


def prepare_provider(name: str, case: lp.Case, inputs: lp.Inputs, device: str) -> tuple[lp.Step, dict]:
    """The provider's step after its first call, and what that call cost (compilation, lazy imports)."""
    step = lp.setup(name, case, inputs)
    start = time.perf_counter()
    lp.synchronized(step, device)()
    first_call_s = time.perf_counter() - start
    peak_mb = round(lp.peak_extra_bytes(step, inputs) / 2**20, 2)
    return step, {"peak_extra_mb": peak_mb, "first_call_s": round(first_call_s, 3)}


def add_ratios(case_result: dict, copy_gbps: float | None) -> None:
    rows = {name: r for name, r in case_result["providers"].items() if "median_ms" in r}
    for anchor, key in (("monai", "speedup_vs_monai"), ("torch.compile", "speedup_vs_compile")):
        if anchor in rows:
            for r in rows.values():
                r[key] = round(rows[anchor]["median_ms"] / r["median_ms"], 3)
    if copy_gbps:
        for r in rows.values():
            gbps = case_result["bytes_moved"] / (r["median_ms"] * 1e-3) / 1e9
            r["bandwidth_gbps"] = round(gbps, 1)
            r["bandwidth_fraction"] = round(gbps / copy_gbps, 3)


def run_case(case: lp.Case, device: str, names: list[str], reps: int, copy_gbps: float | None) -> dict:
    inputs = lp.make_inputs(case, device)
    result = {
        "loss": case.loss,
        "shape": list(case.shape),
        "activation": "softmax" if case.softmax else "sigmoid",
        "bytes_moved": inputs.bytes_moved,
        "providers": {},
    }
    steps = {}
    for name in names:
        print(f"{case.name} {name} ...", file=sys.stderr, flush=True)
        try:
            steps[name], result["providers"][name] = prepare_provider(name, case, inputs, device)
            if device == "cuda":
                result["providers"][name].update(time_ms(steps[name], device, reps))
        except Exception as exc:  # one failing provider must not lose the others' numbers
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            result["providers"][name] = {"error": f"{type(exc).__name__}: {message}"}
            steps.pop(name, None)
        inputs.logits.grad = None
    if device == "cpu":
        for name, timing in interleaved_ms(steps, reps).items():
            result["providers"][name].update(timing)
    add_ratios(result, copy_gbps)
    return result


def header(device: str, reps: int, copy_gbps: float | None) -> dict:
    info = device_info(device)
    return {
        "device": info,
        "slug": slug(info),
        "date": datetime.date.today().isoformat(),
        "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
        "versions": versions(),
        "method": {
            "timer": "triton.testing.do_bench, L2 flushed"
            if device == "cuda"
            else f"perf_counter x {reps}, providers interleaved rep by rep",
            "memory": "CUDA: max_memory_allocated - baseline; CPU: peak of profiler allocation events "
            "(c10 CPU allocator) during one fwd+bwd; both include the new gradient",
            "bytes_moved": "2 * (logits + uint8 labels) read + gradient written",
            "copy_bandwidth": "1 GiB tensor copy_, read + write bytes / median time",
            "densefuse_check_values": os.environ.get("DENSEFUSE_CHECK_VALUES", "1"),
        },
        "copy_bandwidth_gbps": copy_gbps,
        "notes": [],
        "cases": {},
    }


def markdown(report: dict) -> str:
    cuda = report["device"]["type"] == "cuda"
    head = ["case", "provider", "median ms (p20–p80)", "peak extra MB", "vs MONAI", "vs torch.compile"]
    head += ["% of copy BW"] if cuda else []
    lines = [
        f"{report['device']['name']}, {report['date']}, torch {report['versions']['torch']}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for case_name, case in report["cases"].items():
        for name, r in case["providers"].items():
            if "error" in r:
                lines.append("| " + " | ".join([case_name, name, "error", *[""] * (len(head) - 3)]) + " |")
                continue
            cells = [
                case_name,
                name,
                f"{r['median_ms']:.3g} ({r['p20_ms']:.3g}–{r['p80_ms']:.3g})",
                f"{r['peak_extra_mb']:.1f}",
                f"{r['speedup_vs_monai']:.2f}x" if "speedup_vs_monai" in r else "",
                f"{r['speedup_vs_compile']:.2f}x" if "speedup_vs_compile" in r else "",
            ]
            if cuda:
                cells.append(f"{100 * r['bandwidth_fraction']:.0f}%" if "bandwidth_fraction" in r else "")
            lines.append("| " + " | ".join(cells) + " |")
    if cuda:
        lines.append(f"\nCopy bandwidth {report['copy_bandwidth_gbps']} GB/s.")
    lines += [f"\nNote: {note}" for note in report["notes"]]
    return "\n".join(lines)


def stop(signum, frame) -> None:
    raise KeyboardInterrupt(signum)


def main(argv: list[str] | None = None) -> int:
    """Runs the report; returns the exit status: 0, or 128 + the signal's number when a SIGINT or
    SIGTERM stopped it (the cases done so far are kept in the JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", choices=("cpu", "cuda"), default=default_device)
    parser.add_argument("--out", type=Path, help="JSON path (default: <out-dir>/<device>-<date>.json)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="folder for the default JSON name")
    parser.add_argument("--sizes", nargs="+", type=parse_shape, help="BxCxDxHxW (default per device)")
    parser.add_argument("--reps", type=int, default=25, help="CPU repetitions per provider")
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    parser.add_argument("--compile-budget-s", type=float, default=60, help="drop torch.compile if slower")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error(f"--reps: expected an integer >= 1, got {args.reps}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    shapes = args.sizes or lp.SHAPES[args.device] + lp.LARGE_SHAPES.get(args.device, [])

    copy_gbps = copy_bandwidth_gbps(args.device) if args.device == "cuda" else None
    report = header(args.device, args.reps, copy_gbps)
    out = args.out or args.out_dir / f"{report['slug']}-{report['date']}.json"
    problem = out_problem(out)  # before anything is measured
    if problem is not None:
        parser.error(f"--out: {problem}")
    status = 0
    cases = lp.cases(shapes)
    compile = not args.no_compile
    signal.signal(signal.SIGTERM, stop)  # stopped by `timeout`: keep the cases done so far
    try:
        for case in cases:
            names = lp.providers(args.device, case, compile=compile)
            result = report["cases"][case.name] = run_case(case, args.device, names, args.reps, copy_gbps)
            for name, r in result["providers"].items():
                if "error" in r:
                    report["notes"].append(f"{case.name} {name}: {r['error']}")
            compile_s = result["providers"].get("torch.compile", {}).get("first_call_s", 0)
            if compile_s > args.compile_budget_s:
                compile = False
                report["notes"].append(f"torch.compile took {compile_s:.0f} s: left out of later cases")
            write_json(out, report)
            if args.device == "cuda":
                torch.cuda.empty_cache()
    except KeyboardInterrupt as exc:
        report["notes"].append(f"stopped after {len(report['cases'])} of {len(cases)} cases")
        write_json(out, report)
        status = 128 + (exc.args[0] if exc.args else signal.SIGINT)
    print(markdown(report))
    print(f"\nwrote {out}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
