"""The ``densefuse`` command.

densefuse info                     versions, compiled backends, what runs on which device
densefuse bench [report args...]   the benchmark report (benchmarks/report.py, source checkout)
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
from pathlib import Path

import torch

import densefuse
from densefuse.ops import _backend


def info() -> dict:
    """What this installation can run: versions, the extension's build, backends per device."""
    ext = _backend.extension()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {
        "densefuse": densefuse.__version__,
        "torch": torch.__version__,
        "triton": triton_version,
        "extension": ext.build_info() if ext is not None else None,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "backends": {d: _backend.available_backends(d) for d in devices},
        "default_backend": {d: _backend.default_backend(d) for d in devices},
        "forced_backend": _backend.forced_backend(),
    }


def _bench(args: list[str]) -> int:
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "report.py"
    if not script.exists():
        print("densefuse bench: needs a source checkout (benchmarks/report.py not found)", file=sys.stderr)
        return 2
    sys.argv = [str(script), *args]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="densefuse", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, compiled backends and devices")
    sub.add_parser(
        "bench", add_help=False, help="the benchmark report (arguments go to benchmarks/report.py)"
    )
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        return _bench(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    print(json.dumps(info(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
