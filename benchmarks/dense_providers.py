"""Contenders for the dense-block benchmarks (DESIGN §3c), used by test_bench_dense.py and the CLI below.

One training step of a densefuse.nn.DenseBlock3d: forward, loss = out.sum(), backward (the block's
input requires grad, as inside a network; the gradients of the previous step are dropped first).
All providers run the same block (same weights), only ``implementation`` differs:

    naive        torch.cat per layer (keeps every concatenation and BN/ReLU output)
    checkpoint   torch.utils.checkpoint per layer (torchvision's memory_efficient DenseNet)
    fused-<b>    the fused block under densefuse.use_backend(<b>), for every backend with dense-block
                 kernels on the device (CPU: torch; not the Triton interpreter)

loss = out.sum() gives an expanded (zero-stride) output gradient, so no provider pays for a full
gradient of the block's output: the fused block's gradient buffer is counted against it, the
others get theirs for free (conservative for fused). cudnn.benchmark is on for every contender.

Memory: ``peak_extra_bytes`` is the peak of the bytes allocated during one step above the level
before it (CUDA: max_memory_allocated; CPU: the allocator events of the profiler, as
loss_providers.peak_extra_bytes), the output, the input gradient and the parameter gradients
included. Targets (the issue): the fused step's peak extra memory <= 0.25 x naive and <= 0.8 x
checkpoint, its time <= 1.05 x naive on a GPU (1.15 x on CPU).

    PYTHONPATH=benchmarks python benchmarks/dense_providers.py [--reps 10] [--threads N] [--out FILE.json]

times the providers interleaved round by round (report.interleaved_ms), prints medians, peak extra
memory and the ratios, and writes them to benchmarks/results/dense-<device>-<date>.json. With
``--model`` it does the same for whole FCDenseNet3d training steps (densefuse.profile.TrainingStep:
forward, F-beta loss, backward, Adam; naive vs checkpoint vs fused, each its own network with the
same weights) and writes model-step-<device>-<date>.json; targets: fused <= 0.245 x naive's memory
(the issue's H100 figures: <= 7 GB vs naive's 28.4 GB in fp32, 0.246x; <= 4 GB vs 16.3 GB in bf16,
0.245x: the stricter ratio is checked) at <= 1.0 x naive's time.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import loss_providers as lp
import report
import torch
from torch import Tensor

import densefuse
from densefuse.nn import DenseBlock3d
from densefuse.nn.dense import IMPLEMENTATIONS
from densefuse.ops import dense_block
from densefuse.profile import Network, Point, TrainingStep, write_json

Step = Callable[[], None]
TARGETS = {"memory_vs_naive": 0.25, "memory_vs_checkpoint": 0.8, "time_vs_naive": {"cuda": 1.05, "cpu": 1.15}}
MODEL_TARGETS = {"memory_vs_naive": 0.245, "time_vs_naive": {"cuda": 1.0, "cpu": 1.0}}


@dataclass(frozen=True)
class Case:
    """A dense block (in_channels, growth k, layers, bottleneck b or None) on x [batch, C_in, size^3]."""

    batch: int
    in_channels: int
    growth_rate: int
    num_layers: int
    bottleneck: int | None
    size: int
    dtype: str = "float32"  # "bfloat16": fp32 block under torch.autocast(bf16)
    target: bool = False  # the target block: TARGETS apply

    @property
    def name(self) -> str:
        kind = "plain" if self.bottleneck is None else f"bottleneck{self.bottleneck}"
        return (
            f"dense-{kind}-L{self.num_layers}-k{self.growth_rate}-c{self.in_channels}-b{self.batch}-"
            f"{self.size}^3-{self.dtype}"
        )


CASES = {
    # The target block (12 plain layers, 48 -> 240 channels, batch 2) at a CPU-sized patch,
    # and the paper's FC-DenseNet block (5 bottleneck layers, 4k = 64).
    "cpu": [Case(2, 48, 16, 12, None, 24, target=True), Case(2, 48, 16, 5, 4, 32)],
    "cuda": [
        Case(2, 48, 16, 12, None, 64, target=True),
        Case(2, 48, 16, 12, None, 64, "bfloat16"),
        Case(2, 48, 16, 5, 4, 128),
    ],
}


@dataclass
class Inputs:
    block: DenseBlock3d
    x: Tensor  # [B, C_in, D, H, W] fp32, requires grad


@functools.lru_cache(maxsize=1)  # the providers of one case run one after the other: keep one case
def make_inputs(case: Case, device: str, seed: int = 0) -> Inputs:
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(seed)
    block = DenseBlock3d(case.in_channels, case.growth_rate, case.num_layers, bottleneck=case.bottleneck)
    x = torch.randn(case.batch, case.in_channels, *(case.size,) * 3, device=device).requires_grad_()
    return Inputs(block.to(device), x)


# ------------------------------------------------------------------------------ one setup per provider
def providers(device_type: str) -> list[str]:
    """naive, checkpoint, and fused on every backend with dense-block kernels on ``device_type``."""
    backends = dense_block.implemented_backends(device_type)
    if device_type == "cpu" and "triton" in backends:  # the interpreter (TRITON_INTERPRET=1) is a test aid
        backends.remove("triton")
    return ["naive", "checkpoint", *(f"fused-{b}" for b in backends)]


def setup(provider: str, case: Case, inputs: Inputs) -> Step:
    """``step()``: one training step of ``case``'s block by ``provider``."""
    implementation, _, backend = provider.partition("-")
    if implementation not in ("naive", "checkpoint", "fused"):
        raise ValueError(f"provider: expected naive, checkpoint or fused-<backend>, got {provider!r}")
    block, x = inputs.block, inputs.x
    autocast = torch.autocast(
        x.device.type, dtype=getattr(torch, case.dtype), enabled=case.dtype != "float32"
    )

    def step() -> None:
        x.grad = None
        block.zero_grad(set_to_none=True)
        block.implementation = implementation
        with densefuse.use_backend(backend) if backend else contextlib.nullcontext(), autocast:
            out = block(x)
        out.sum().backward()

    return step


def synchronized(step: Step, device: str) -> Step:
    return lp.synchronized(step, device)


# ------------------------------------------------------------------------------ the whole network
@dataclass(frozen=True)
class ModelCase:
    """The paper's FCDenseNet3d widths (k = 16, 5 layers per block, 4k bottleneck) with
    ``down_blocks`` down blocks, 4 inputs, 1 output, on a batch x patch^3 batch."""

    down_blocks: int
    batch: int
    patch: int
    dtype: str = "fp32"  # or "bf16": autocast

    @property
    def network(self) -> Network:
        return Network(num_down_blocks=self.down_blocks)

    @property
    def name(self) -> str:
        return f"fcdensenet-d{self.down_blocks}-b{self.batch}-{self.patch}^3-{self.dtype}"


MODEL_CASES = {  # CPU: at 48^3 the fused step's per-op overhead shows (case 2)
    "cpu": [ModelCase(3, 2, 64), ModelCase(3, 2, 64, "bf16"), ModelCase(3, 2, 48, "bf16")],
    "cuda": [ModelCase(5, 4, 128), ModelCase(5, 4, 128, "bf16")],  # DESIGN §6's anchors
}


def training_step(case: ModelCase, device: str, implementation: str) -> TrainingStep:
    """A freshly initialised network (seed 0) running ``implementation``; cudnn.benchmark on."""
    torch.backends.cudnn.benchmark = True
    return TrainingStep(case.network, Point(implementation, case.dtype, case.batch, case.patch), device)


# -------------------------------------------------------------------------------------------- memory
def peak_extra_bytes(step: Step, device: str) -> int:
    """Peak bytes allocated during one ``step()`` above the level before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return lp.cpu_peak_extra_bytes(step)


def ratios(results: dict[str, dict], provider: str) -> dict[str, float]:
    """``provider``'s memory vs naive and checkpoint, and time vs naive (when timed)."""
    out = {
        "memory_vs_naive": results[provider]["peak_extra_mb"] / results["naive"]["peak_extra_mb"],
        "memory_vs_checkpoint": results[provider]["peak_extra_mb"] / results["checkpoint"]["peak_extra_mb"],
    }
    if "median_ms" in results[provider]:
        out["time_vs_naive"] = results[provider]["median_ms"] / results["naive"]["median_ms"]
    return {key: round(value, 3) for key, value in out.items()}


def meets_targets(ratio: dict[str, float], device: str, targets: dict = TARGETS) -> dict[str, bool]:
    limits = {**targets, "time_vs_naive": targets["time_vs_naive"][device]}
    return {key: value <= limits[key] for key, value in ratio.items() if key in limits}


def measure(name: str, steps: dict[str, Step], device: str, reps: int, targets: dict | None) -> dict:
    """Interleaved timings and peak extra memory of every step, printed; ratios for the fused ones."""
    timings = report.interleaved_ms(steps, reps)
    rows = {}
    for provider, step in steps.items():
        peak_mb = round(peak_extra_bytes(step, device) / 2**20, 1)
        rows[provider] = {**timings[provider], "peak_extra_mb": peak_mb}
    print(f"{name} ({device}, {torch.get_num_threads()} threads, {reps} interleaved rounds)")
    for provider, row in rows.items():
        median, peak = row["median_ms"], row["peak_extra_mb"]
        line = f"  {provider:<12} median {median:9.1f} ms  peak extra {peak:8.1f} MB"
        if provider.startswith("fused"):
            row["ratios"] = ratios(rows, provider)
            if targets:
                row["meets_targets"] = meets_targets(row["ratios"], device, targets)
            line += "  " + "  ".join(f"{k} {v:.3f}" for k, v in row["ratios"].items())
        print(line)
    return rows


# ----------------------------------------------------------------------------------------- the CLI
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10, help="interleaved rounds per case")
    parser.add_argument("--case", type=int, action="append", help="only these indices of CASES[device]")
    parser.add_argument("--out", type=Path, help="JSON file (default: results/dense-<device>-<date>.json)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--model", action="store_true", help="FCDenseNet3d training steps (MODEL_CASES)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    info = report.device_info(device)
    targets = MODEL_TARGETS if args.model else TARGETS
    results = {"device": info, "date": datetime.date.today().isoformat(), "versions": report.versions(),
               "reps": args.reps, "targets": targets, "cases": []}  # fmt: skip
    for index, case in enumerate((MODEL_CASES if args.model else CASES)[device]):
        if args.case and index not in args.case:
            continue
        if args.model:
            steps = {i: synchronized(training_step(case, device, i), device) for i in IMPLEMENTATIONS}
            rows = measure(case.name, steps, device, args.reps, targets)
        else:
            inputs = make_inputs(case, device)
            steps = {name: synchronized(setup(name, case, inputs), device) for name in providers(device)}
            rows = measure(case.name, steps, device, args.reps, targets if case.target else None)
        results["cases"].append({"case": asdict(case), "name": case.name, "providers": rows})
    threads = f"-{torch.get_num_threads()}t" if device == "cpu" else ""
    stem = "model-step" if args.model else "dense"
    out = args.out or report.RESULTS / f"{stem}-{report.slug(info)}{threads}-{results['date']}.json"
    write_json(out, results, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
