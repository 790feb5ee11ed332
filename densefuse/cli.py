"""The ``densefuse`` command.

densefuse info                     versions, compiled backends, what runs on which device
densefuse bench [report args...]   the benchmark report (benchmarks/report.py, source checkout)
densefuse profile-memory [...]     peak memory and step time of training steps over patch/batch sizes,
                                   implementations and dtypes -> JSON + PNG
densefuse plan --memory 24GiB (--patch 128 | --batch 2)
                                   the largest batch (or patch) that fits, from a fitted memory model
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

import densefuse
from densefuse.ops import _backend, patch_fuse


def info() -> dict:
    """What this installation can run: versions, the extension's build, backends per device."""
    ext = _backend.extension()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    build = ext.build_info() if ext is not None else None
    if build is not None:  # the registered ops, one line per dispatch key: the JSON stays readable
        build["ops"] = {key: ", ".join(names) for key, names in build.get("ops", {}).items()}
    return {
        "densefuse": densefuse.__version__,
        "torch": torch.__version__,
        "triton": triton_version,
        "extension": build,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "backends": {d: _backend.available_backends(d) for d in devices},
        "default_backend": {d: _backend.default_backend(d) for d in devices},
        "patch_fusion_backend": {d: patch_fuse.default_backend(d) for d in devices},
        "forced_backend": _backend.forced_backend(),
    }


def _bench(args: list[str]) -> int:
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "report.py"
    if not script.exists():
        print("densefuse bench: needs a source checkout (benchmarks/report.py not found)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(script.parent))  # as `python benchmarks/report.py` would: loss_providers beside it
    spec = importlib.util.spec_from_file_location("densefuse_bench_report", script)
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    sys.argv = ["densefuse bench", *args]  # argparse's prog: its usage and errors name this command
    return report.main(args)


# ------------------------------------------------------------------------------ argument types
def _positive_int(text: str) -> int:
    """A positive integer below 2**31 (a count, a size or a width: larger ones overflow the plans' floats)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value < 2**31:
        raise argparse.ArgumentTypeError(f"expected a positive integer below 2**31, got {text!r}")
    return value


def _down_blocks(text: str) -> int:
    """A number of down blocks n in [0, MAX_DOWN_BLOCKS]: patches are multiples of 2 * 2**n, below 2**31."""
    from densefuse.profile import MAX_DOWN_BLOCKS

    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_DOWN_BLOCKS:
        raise argparse.ArgumentTypeError(
            f"expected an integer in [0, {MAX_DOWN_BLOCKS}] (patches are multiples of 2*2^n, below 2**31), "
            f"got {text!r}"
        )
    return value


def _bottleneck(text: str) -> int:
    """A bottleneck width as a multiple of k, or 0 for "none" (no bottleneck: _network makes it None;
    None itself means the option was not given)."""
    return 0 if text.lower() == "none" else _positive_int(text)


def _size(text: str) -> int:
    from densefuse.profile import parse_size

    try:
        return parse_size(text, "--memory")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--memory: ")) from None  # argparse names it


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}")
    return value


def _add_measure_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by profile-memory and plan: the network, the contenders, the device, repetitions."""
    from densefuse.profile import DTYPES, IMPLEMENTATIONS, TARGETS

    net = parser.add_argument_group(
        "network (default: the paper's FCDenseNet3d, 4 inputs, 1 output; a block: its first dense block)"
    )
    net.add_argument("--target", choices=TARGETS, help="the whole FCDenseNet3d (default) or one DenseBlock3d")
    net.add_argument(
        "--in-channels", type=_positive_int, help="model inputs (4) or block input channels (48)"
    )
    net.add_argument("--out-channels", type=_positive_int, help="model output classes (1)")
    net.add_argument("--growth", type=_positive_int, help="growth rate k (16)")
    net.add_argument("--layers", type=_positive_int, help="dense layers per block (5)")
    net.add_argument(
        "--down-blocks", type=_down_blocks, help="model down blocks (5); patches must be multiples of 2*2^n"
    )
    net.add_argument("--bottleneck", type=_bottleneck, help="1x1x1 width as a multiple of k (4), or none")
    net.add_argument("--dropout", type=float, help="dropout probability (0.2)")
    parser.add_argument(
        "--implementations", nargs="+", choices=IMPLEMENTATIONS, default=list(IMPLEMENTATIONS)
    )
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda[:i] (default: cuda if any)",
    )
    parser.add_argument(
        "--warmup",
        type=_positive_int,
        default=2,
        help="steps before the measured ones (2: the first CPU steps create oneDNN primitives)",
    )
    parser.add_argument("--reps", type=_positive_int, default=3, help="measured steps per point (3)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


# A memory fit that misses one of its own points by more than this is too poor to extrapolate from.
MAX_FIT_RESIDUAL = 0.25

_NETWORK_OPTIONS = {
    "target": "target",
    "in_channels": "in_channels",
    "out_channels": "out_channels",
    "growth": "growth_rate",
    "layers": "num_layers",
    "down_blocks": "num_down_blocks",
    "bottleneck": "bottleneck",
    "dropout": "dropout",
}


def _network(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """The Network the options describe (defaults: the paper's; a block's input: 48 channels)."""
    from densefuse.profile import Network

    given = {
        field: getattr(args, opt) for opt, field in _NETWORK_OPTIONS.items() if getattr(args, opt) is not None
    }
    if given.get("bottleneck") == 0:  # --bottleneck none
        given["bottleneck"] = None
    if given.get("target") == "block":
        given.setdefault("in_channels", 48)
    if not 0 <= given.get("dropout", 0) < 1:
        parser.error(f"--dropout: expected a probability in [0, 1), got {given['dropout']}")
    return Network(**given)


def _check_device(device: str, parser: argparse.ArgumentParser, measured: bool = True) -> None:
    """--device names cpu or cuda[:i]; a CUDA device must be here where something is ``measured``."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        parser.error(f"--device: expected cpu or cuda[:i], got {device!r}")
    if kind not in ("cpu", "cuda"):
        parser.error(f"--device: expected cpu or cuda[:i], got {device!r}")
    if measured and kind == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")


def _check_patches(patches: list[int], multiple: int, option: str, parser: argparse.ArgumentParser) -> None:
    bad = [p for p in patches if p % multiple]
    if bad:
        parser.error(
            f"{option}: patch sizes must be multiples of {multiple} for this network (2 x 2^down-blocks), "
            f"got {bad}"
        )


def _check_out(
    out: Path, parser: argparse.ArgumentParser, *, figure: bool = False, avoid: Path | None = None
) -> None:
    """Refuse an output path that could not be written, before anything is measured (profile.out_problem)."""
    from densefuse.profile import out_problem

    problem = out_problem(out, figure=figure, avoid=avoid)
    if problem is not None:
        parser.error(f"--out: {problem}")


# --------------------------------------------------------------------------------- profile-memory
def _profile_memory(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from densefuse import profile

    network = _network(args, parser)
    _check_device(args.device, parser)
    m = network.size_multiple
    patches = args.patches or [m, 2 * m]
    _check_patches(patches, m, "--patches", parser)
    points = profile.grid(args.implementations, args.dtypes, args.batches, patches)
    doc = profile.report(network, [], args.device, args.warmup, args.reps)  # the commit and load at the start
    out = args.out or Path(f"memory-{doc['slug']}-{doc['date']}.json")
    _check_out(out, parser, figure=not args.no_plot)

    def save(rows: list[dict]) -> None:  # after every point: an interrupted sweep keeps what it measured
        profile.write_json(out, {**doc, "results": rows, "complete": len(rows) == len(points)})

    rows = profile.sweep(
        network, points, args.device, args.warmup, args.reps, progress=not args.quiet, on_row=save
    )
    doc["results"] = rows
    print(_profile_table(rows))
    print(f"\nwrote {out}", file=sys.stderr)
    failed = sum("error" in r for r in rows)
    if failed == len(rows):
        print(f"densefuse profile-memory: all {failed} points failed (the table says why)", file=sys.stderr)
        return 1
    if failed:
        print(f"densefuse profile-memory: {failed} of {len(rows)} points failed", file=sys.stderr)
    if not args.no_plot:
        try:
            profile.plot(doc, profile.figure_path(out))
            print(f"wrote {profile.figure_path(out)}", file=sys.stderr)
        except ImportError:
            print("no plot: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    return 0


def _profile_table(rows: list[dict]) -> str:
    """Markdown table of a sweep, with each point's memory and time relative to naive at the same size."""
    from densefuse.profile import format_size

    naive = {
        (r["dtype"], r["batch"], r["patch"]): r
        for r in rows
        if r["implementation"] == "naive" and "peak_bytes" in r
    }
    lines = [
        "| implementation | dtype | batch | patch | peak memory | vs naive | median step | vs naive |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['implementation']} | {r['dtype']} | {r['batch']} | {r['patch']}^3 |"
        if "error" in r:
            lines.append(f"{head} {r['error']} | | | |")
            continue
        base = naive.get((r["dtype"], r["batch"], r["patch"]))
        mem_ratio = f"{r['peak_bytes'] / base['peak_bytes']:.2f}x" if base else ""
        time_ratio = f"{r['median_ms'] / base['median_ms']:.2f}x" if base else ""
        step = f"{r['median_ms'] / 1e3:.3g} s"
        lines.append(f"{head} {format_size(r['peak_bytes'])} | {mem_ratio} | {step} | {time_ratio} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ plan
def _plan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from densefuse import profile

    _check_device(args.device, parser, measured=args.check or args.profile is None)
    if args.profile is not None:
        given = [f"--{opt.replace('_', '-')}" for opt in _NETWORK_OPTIONS if getattr(args, opt) is not None]
        given += [
            opt for opt in ("--fit-batches", "--fit-patches") if getattr(args, opt[2:].replace("-", "_"))
        ]
        if given:
            parser.error(
                f"--profile: the network and the fit points come from the file; leave out {' '.join(given)}"
            )
        try:
            network, rows, device = profile.load_report(args.profile)
        except ValueError as exc:
            parser.error(f"--profile: {exc}")
        if args.check and device["type"] != torch.device(args.device).type:
            parser.error(
                f"--check: {args.profile} was measured on {device['type']}, --device is {args.device}"
            )
        rows = [r for r in rows if r["implementation"] in args.implementations and r["dtype"] in args.dtypes]
        source = f"{args.profile} ({device['name']})"
    else:
        network = _network(args, parser)
        fit_patches = args.fit_patches or [network.size_multiple]
        _check_patches(fit_patches, network.size_multiple, "--fit-patches", parser)
        fit_batches = args.fit_batches or [2, 3, 4]
        if len({b * p**3 for b in fit_batches for p in fit_patches}) < 2:
            parser.error(
                "--fit-batches, --fit-patches: the fit needs two or more values of batch * patch^3, "
                f"got batches {fit_batches} and patches {fit_patches}"
            )
    if args.patch is not None:
        _check_patches([args.patch], network.size_multiple, "--patch", parser)
    if args.out is not None:
        _check_out(args.out, parser, avoid=args.profile)
    if args.profile is None:
        points = profile.grid(args.implementations, args.dtypes, fit_batches, fit_patches)
        rows = profile.sweep(network, points, args.device, args.warmup, args.reps, progress=not args.quiet)
        source = f"{len(rows)} points measured here on {profile.device_info(args.device)['name']}"
    models = _fit_each(rows)
    if not models:
        return 1
    for (impl, dtype), model in models.items():
        if model.max_rel_residual > MAX_FIT_RESIDUAL:
            print(
                f"densefuse plan: the fit of {impl} {dtype} misses a measured point by "
                f"{model.max_rel_residual:.0%}: its points are too small or too noisy to extrapolate from "
                "(measure larger ones); the plan below is not to be trusted",
                file=sys.stderr,
            )
    budget = args.memory * (1 - args.headroom)
    planned = profile.plan(models, budget, network.size_multiple, patch=args.patch, batch=args.batch)
    if args.check:
        planned = profile.check_plan(network, planned, args.device, args.warmup, args.reps, not args.quiet)
    doc = {
        "measured_on": profile.device_info(args.device) if args.check or args.profile is None else None,
        "date": datetime.date.today().isoformat(),
        "git": profile.git_commit(),
        "memory_bytes": args.memory,
        "headroom": args.headroom,
        "budget_bytes": budget,
        "network": dataclasses.asdict(network),
        "fit_source": source,
        "plans": planned,
    }
    print(_plan_text(doc, batch_planned=args.patch is not None))
    if args.out:
        profile.write_json(args.out, doc)
    failed = [p for p in planned if "check_error" in p or p.get("measured_bytes", 0) > budget]
    for p in failed:
        what = f"{p['implementation']} {p['dtype']} at batch {p['batch']}, {p['patch']}^3"
        if "check_error" in p:
            found = f"{p['check_error']} (the check could not measure it)"
        else:
            size, limit = profile.format_size(p["measured_bytes"]), profile.format_size(budget)
            found = f"measured {size}, over the budget of {limit}"
        print(f"densefuse plan: {what}: {found}", file=sys.stderr)
    return 1 if failed else 0


def _fit_each(rows: list[dict]) -> dict:
    """The memory model of each (implementation, dtype) of ``rows`` that its rows can fit; the others
    are named on stderr with the reason (and their failed points), so that one pair does not sink all."""
    from densefuse import profile

    if not rows:
        print("densefuse plan: no measurement of the implementations and dtypes asked for", file=sys.stderr)
    models = {}
    for impl, dtype in dict.fromkeys((r["implementation"], r["dtype"]) for r in rows):
        group = [r for r in rows if (r["implementation"], r["dtype"]) == (impl, dtype)]
        try:
            models |= profile.fit_memory_models(group)
        except ValueError as exc:
            failed = [f"b{r['batch']} {r['patch']}^3: {r['error']}" for r in group if "error" in r]
            detail = f" (failed points: {'; '.join(failed)})" if failed else ""
            print(
                f"densefuse plan: {impl} {dtype}: cannot fit a memory model: {exc}{detail}", file=sys.stderr
            )
    return models


def _plan_text(doc: dict, batch_planned: bool) -> str:
    from densefuse.profile import format_size

    memory, budget = format_size(doc["memory_bytes"]), format_size(doc["budget_bytes"])
    head = ["implementation", "dtype", "a", "b per voxel", "fit residual", "batch", "patch"]
    head += ["predicted peak", "measured", "error"]
    lines = [
        f"Budget {memory} - {doc['headroom']:.0%} headroom = {budget}; memory model "
        f"peak = a + b * batch * patch^3 fitted to {doc['fit_source']}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in doc["plans"]:
        fits = r["predicted_bytes"] is not None
        batch = (str(r["batch"]) if fits else "none fits") if batch_planned else str(r["batch"])
        patch = f"{r['patch']}^3" if fits or batch_planned else "none fits"
        measured = format_size(r["measured_bytes"]) if "measured_bytes" in r else r.get("check_error", "")
        error = f"{r['prediction_error']:+.1%}" if "prediction_error" in r else ""
        cells = [
            r["implementation"],
            r["dtype"],
            format_size(r["intercept_bytes"]),
            format_size(r["bytes_per_voxel"]),
            f"{r['fit_max_rel_residual']:.1%}",
            batch,
            patch,
            format_size(r["predicted_bytes"]) if fits else "",
            measured,
            error,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ main
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="densefuse", description=__doc__.split("\n")[0].replace("``", ""))
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, compiled backends and devices")
    sub.add_parser(
        "bench", add_help=False, help="the benchmark report (arguments go to benchmarks/report.py)"
    )

    prof = sub.add_parser(
        "profile-memory",
        help="peak memory and step time of training steps -> JSON + PNG",
        description="Peak memory and median time of a training step (forward, loss, backward, Adam step) of "
        "an FCDenseNet3d or a DenseBlock3d, for every patch size x batch size x implementation x dtype. "
        "See densefuse.profile for what is counted.",
    )
    _add_measure_options(prof)
    prof.set_defaults(handler=_profile_memory, subparser=prof)
    prof.add_argument(
        "--patches", nargs="+", type=_positive_int, help="cube sides (default: m and 2m, m the multiple)"
    )
    prof.add_argument(
        "--batches",
        nargs="+",
        type=_positive_int,
        default=[2],
        help="batch sizes (2; batch 1 at the smallest patch leaves one voxel per channel for the deepest BN)",
    )
    prof.add_argument(
        "--out", type=Path, help="JSON path (default: ./memory-<device>-<date>.json; PNG next to it)"
    )
    prof.add_argument("--no-plot", action="store_true", help="no PNG")

    plan = sub.add_parser(
        "plan",
        help="the largest batch (or patch) that fits a memory budget",
        description="Fits peak = a + b * batch * patch^3 per implementation and dtype to a few measured "
        "training steps (measured now, small, or read from a profile-memory JSON) and predicts the largest "
        "batch for --patch, or the largest patch for --batch, that fits --memory minus --headroom.",
    )
    plan.add_argument("--memory", type=_size, required=True, help="the budget, e.g. 24GiB, 8GB, 512MiB")
    want = plan.add_mutually_exclusive_group(required=True)
    want.add_argument("--patch", type=_positive_int, help="cube side: plan the largest batch")
    want.add_argument("--batch", type=_positive_int, help="plan the largest cube side")
    plan.add_argument(
        "--headroom",
        type=_fraction,
        default=0.1,
        help="fraction of --memory kept free for the CUDA context, fragmentation and fit error (0.1)",
    )
    plan.add_argument("--profile", type=Path, help="fit to this profile-memory JSON instead of measuring")
    plan.add_argument(
        "--fit-batches", nargs="+", type=_positive_int, help="batches measured for the fit (2 3 4)"
    )
    plan.add_argument("--fit-patches", nargs="+", type=_positive_int, help="patches measured for the fit (m)")
    plan.add_argument(
        "--check", action="store_true", help="measure each planned configuration and report the error"
    )
    plan.add_argument("--out", type=Path, help="also write the plan as JSON")
    _add_measure_options(plan)
    plan.set_defaults(handler=_plan, subparser=plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command line; a user's interrupt ends it with 130 and a closed pipe (| head) quietly."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("densefuse: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141
    except OSError as exc:  # a write that failed: a full disk, a path that changed meanwhile
        print(f"densefuse: {exc}", file=sys.stderr)
        return 1


def _main(argv: list[str] | None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        return _bench(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command in ("profile-memory", "plan"):
        return args.handler(args, args.subparser)
    report = info()
    print(json.dumps(report, indent=2))
    forced = report["forced_backend"]
    if forced is not None and not any(forced in names for names in report["backends"].values()):
        print(
            f"densefuse: the forced backend {forced!r} runs on no device here: every op will raise",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
