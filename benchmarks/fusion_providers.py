"""Contenders for the sliding-window fusion benchmarks, used by test_bench_fusion.py (pytest-benchmark).

One setup function per provider, each returning ``step()``: one sliding-window inference over a
fixed volume, with MONAI's arguments (roi, sw_batch_size, overlap 0.5, mode "gaussian"):

    densefuse-<backend>  densefuse.inference.sliding_window_inference under densefuse.use_backend(<backend>)
    densefuse-<backend>-deterministic   the same under torch.use_deterministic_algorithms(True), which
                         selects the output-stationary gather (case "fusion" only)
    monai                monai.inferers.sliding_window_inference with the same arguments
    monai-weight-map     the same, given its window's importance map (roi_weight_map, made once by
                         MONAI's compute_importance_map), which MONAI otherwise makes on every call
                         (case "fusion" only)

Cases: "fusion" runs an identity predictor (``contiguous_window``: its input, made contiguous), so the
fusion machinery is all that is timed (window extraction, weights, scatter, normalisation), with
sw_batch_size 4 and with MONAI's default 1; "host" does the same on a tiny volume cut into many
small windows (24^3, roi 8: 125 windows in 32 batches), so that the kernels take almost no time and
what is timed is the host's work per call and per batch (Python, dispatch, launches), which bounds
the fusion-only call on a GPU; "model" runs a small 3-D conv net (end to end, the
net included); "argmax" asks for a 16-class label map from a 1x1x1 conv (1 -> 16 classes): densefuse's
SlidingWindowPredictor with output "mask" in slab mode (memory_budget=1: the thinnest slabs, in bands
of roi rows, so windows that meet two bands are predicted twice) against
MONAI's sliding_window_inference followed by argmax (the kernel backends only: the torch reference
is left out). Steps run under torch.inference_mode().

Memory: ``peak_extra_bytes`` is the peak of the bytes allocated during one step above the level
before it, the output included (CUDA: max_memory_allocated; CPU: the allocator events of the
profiler, as loss_providers.peak_extra_bytes). ``memory_bound_bytes`` is what densefuse's fusion
stays within: the output plus one batch of windows (a model's own activations come on top).

    PYTHONPATH=benchmarks python benchmarks/fusion_providers.py [--reps 30] [--kind fusion]
        [--providers densefuse-cpp]

prints medians over ``reps`` rounds with the providers interleaved round by round, and the ratios to
MONAI (what the README quotes).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import loss_providers as lp
import torch
import torch.utils.deterministic
from torch import Tensor

import densefuse
import densefuse.inference
from densefuse.ops import patch_fuse
from densefuse.profile import write_json

Step = Callable[[], object]


@dataclass(frozen=True)
class Case:
    """One benchmark case: a volume [B, C, D, H, W] tiled by windows of ``roi`` at 50 % overlap."""

    kind: str  # "fusion", "host" (identity predictor) | "model" (small 3-D conv net) | "argmax" (16 classes)
    shape: tuple[int, ...]
    roi: int
    sw_batch_size: int = 4
    mode: str = "gaussian"
    overlap: float = 0.5

    @property
    def name(self) -> str:
        return f"{self.kind}-{'x'.join(map(str, self.shape))}-roi{self.roi}-bs{self.sw_batch_size}"

    @property
    def identity(self) -> bool:
        """Whether the predictor is the identity (the fusion alone is timed)."""
        return self.kind in ("fusion", "host")

    @property
    def out_channels(self) -> int:
        return self.shape[1] if self.identity else {"model": MODEL_OUT_CHANNELS, "argmax": CLASSES}[self.kind]


MODEL_OUT_CHANNELS = 2
CLASSES = 16
CASES = {
    "cpu": [
        Case("fusion", (1, 1, 160, 192, 160), 96),
        Case("fusion", (1, 1, 160, 192, 160), 96, sw_batch_size=1),  # MONAI's default sw_batch_size
        Case("host", (1, 1, 24, 24, 24), 8),
        Case("model", (1, 1, 128, 128, 128), 64),
        Case("argmax", (1, 1, 96, 112, 96), 48),
    ],
    "cuda": [
        Case("fusion", (1, 1, 192, 224, 192), 96),
        Case("fusion", (1, 1, 192, 224, 192), 96, sw_batch_size=1),  # MONAI's default sw_batch_size
        Case("host", (1, 1, 24, 24, 24), 8),
        Case("model", (1, 1, 192, 224, 192), 96),
        Case("argmax", (1, 1, 320, 320, 320), 96),  # issue 3's 16-class 320^3 argmax
    ],
}


def small_net(in_channels: int, seed: int = 0) -> torch.nn.Module:
    """Conv3d(C_in, 4, 3) -> ReLU -> Conv3d(4, 2, 1): a real model, cheap enough for a CPU benchmark."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv3d(in_channels, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv3d(4, MODEL_OUT_CHANNELS, 1),
    ).eval()


@dataclass
class Inputs:
    volume: Tensor  # [B, C, D, H, W] fp32
    predictor: Callable[[Tensor], Tensor]


def class_net(in_channels: int, seed: int = 0) -> torch.nn.Module:
    """Conv3d(C_in, 16, 1): 16-class logits per voxel, as cheap as a model gets."""
    torch.manual_seed(seed)
    return torch.nn.Conv3d(in_channels, CLASSES, 1).eval()


def contiguous_window(windows: Tensor) -> Tensor:
    """The fusion-only predictor: its input, made contiguous as a model's first layer reads it.

    densefuse and MONAI at sw_batch_size > 1 pass a contiguous batch (returned as is); MONAI at
    sw_batch_size 1 passes a view of the volume, which this copies, as a conv would. An identity
    predictor would let MONAI skip that copy and weight the view in place, overwriting the benchmark's
    volume (MONAI's ``sw_device_buffer[ss] *= w_t``)."""
    return windows.contiguous()


def make_inputs(case: Case, device: str, seed: int = 0) -> Inputs:
    gen = torch.Generator(device).manual_seed(seed)
    volume = torch.randn(case.shape, generator=gen, device=device)
    if case.identity:
        return Inputs(volume, contiguous_window)
    net = small_net if case.kind == "model" else class_net
    return Inputs(volume, net(case.shape[1], seed).to(device))


# ------------------------------------------------------------------------------ one setup per provider
def _sliding_window(function: Callable, case: Case, inputs: Inputs) -> Step:
    def step() -> object:
        with torch.inference_mode():
            return function(
                inputs.volume, case.roi, case.sw_batch_size, inputs.predictor, case.overlap, case.mode
            )

    return step


def _argmax_predictor(case: Case, inputs: Inputs) -> Step:
    predictor = densefuse.inference.SlidingWindowPredictor(
        inputs.predictor, case.roi, overlap=case.overlap, window=case.mode, padding="constant",
        sw_batch_size=case.sw_batch_size, activation="softmax", soft_voting=False, output="mask",
        memory_budget=1,
    )  # fmt: skip
    return lambda: predictor(inputs.volume)


def setup_densefuse(backend: str, case: Case, inputs: Inputs, deterministic: bool = False) -> Step:
    if case.kind == "argmax":
        step = _argmax_predictor(case, inputs)
    else:
        step = _sliding_window(densefuse.inference.sliding_window_inference, case, inputs)

    def in_backend() -> object:
        before = torch.are_deterministic_algorithms_enabled()
        warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        fill = torch.utils.deterministic.fill_uninitialized_memory
        torch.use_deterministic_algorithms(deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = False  # time the gather, not NaN fills
        try:
            with densefuse.use_backend(backend):
                return step()
        finally:
            torch.use_deterministic_algorithms(before, warn_only=warn_only)
            torch.utils.deterministic.fill_uninitialized_memory = fill

    return in_backend


def setup_monai(case: Case, inputs: Inputs, weight_map: bool = False) -> Step:
    from monai.inferers import sliding_window_inference

    function = sliding_window_inference
    if weight_map:
        from monai.data.utils import compute_importance_map

        roi = (case.roi,) * (len(case.shape) - 2)
        importance = compute_importance_map(roi, mode=case.mode, device=inputs.volume.device)
        function = functools.partial(sliding_window_inference, roi_weight_map=importance)
    step = _sliding_window(function, case, inputs)
    if case.kind != "argmax":
        return step

    def label_map() -> Tensor:
        with torch.inference_mode():
            return step().argmax(1, keepdim=True)

    return label_map


def providers(device_type: str, case: Case | None = None) -> list[str]:
    """densefuse on every backend with fusion kernels on ``device_type`` (not the Triton interpreter
    on CPU; not the torch reference for case "argmax"), in deterministic mode too for case "fusion",
    and MONAI (for case "fusion" also given its importance map)."""
    backends = patch_fuse.implemented_backends(device_type)
    if device_type == "cpu" and "triton" in backends:  # the interpreter (TRITON_INTERPRET=1) is a test aid
        backends.remove("triton")
    if case is not None and case.kind == "argmax":
        backends = [b for b in backends if b != "torch"]
    names = [f"densefuse-{b}" for b in backends]
    if case is not None and case.kind == "fusion":
        names += [f"densefuse-{b}-deterministic" for b in backends if b != "torch"]
        return [*names, "monai", "monai-weight-map"]
    return [*names, "monai"]


def setup(provider: str, case: Case, inputs: Inputs) -> Step:
    """``step()``: one sliding-window inference of ``case`` by ``provider`` on ``inputs``."""
    if provider.startswith("densefuse-"):
        backend = provider.removeprefix("densefuse-")
        deterministic = backend.endswith("-deterministic")
        return setup_densefuse(backend.removesuffix("-deterministic"), case, inputs, deterministic)
    if provider in ("monai", "monai-weight-map"):
        return setup_monai(case, inputs, weight_map=provider == "monai-weight-map")
    expected = "densefuse-<backend>[-deterministic], monai or monai-weight-map"
    raise ValueError(f"provider: expected one of {expected}, got {provider!r}")


def synchronized(step: Step, device: str) -> Step:
    """``step`` followed by a device synchronisation, for wall-clock timers (``step`` itself on CPU)."""
    return lp.synchronized(step, device)


# -------------------------------------------------------------------------------------------- memory
def peak_extra_bytes(step: Step, device: str) -> int:
    """Peak bytes allocated during one ``step()`` above the level before it, the output included."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return lp.cpu_peak_extra_bytes(step)


def memory_bound_bytes(case: Case) -> int:
    """The output [B, C_out, ...] plus one batch of windows [sw_batch_size, C_in, roi^3], fp32: with the
    identity predictor (cases "fusion" and "host") densefuse's peak extra memory stays within this."""
    batch, channels, *size = case.shape
    return 4 * (batch * case.out_channels * math.prod(size) + case.sw_batch_size * channels * case.roi**3)


# ----------------------------------------------------------------------------------------- the CLI
def main(argv: list[str] | None = None) -> None:
    import report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30, help="interleaved rounds per case")
    kinds = ("fusion", "host", "model", "argmax")
    parser.add_argument("--kind", choices=kinds, help="only this kind of case")
    parser.add_argument("--providers", help="comma-separated subset of the providers (MONAI always runs)")
    parser.add_argument("--out", type=Path, help="JSON file (default: results/fusion-<device>-<date>.json)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    info = report.device_info(device)
    results = {"device": info, "date": datetime.date.today().isoformat(), "versions": report.versions(),
               "reps": args.reps, "threads": torch.get_num_threads(), "cases": []}  # fmt: skip
    for case in CASES[device]:
        if args.kind is not None and case.kind != args.kind:
            continue
        inputs = make_inputs(case, device)
        names = providers(device, case)
        if args.providers is not None:
            names = [n for n in names if n in args.providers.split(",") or n.startswith("monai")]
        steps = {name: synchronized(setup(name, case, inputs), device) for name in names}
        timings = report.interleaved_ms(steps, args.reps)
        monai_ms = timings["monai"]["median_ms"]
        print(f"{case.name} ({device}, {torch.get_num_threads()} threads, {args.reps} interleaved rounds)")
        peaks = {name: peak_extra_bytes(step, device) / 2**20 for name, step in steps.items()}
        rows = {}
        for name, timing in timings.items():
            rows[name] = {**timing, "peak_extra_mb": round(peaks[name], 1),
                          "speedup_vs_monai": round(monai_ms / timing["median_ms"], 3),
                          "peak_vs_monai": round(peaks[name] / peaks["monai"], 3)}  # fmt: skip
            print(
                f"  {name:<16} median {timing['median_ms']:8.2f} ms  (p20 {timing['p20_ms']:.2f}, "
                f"p80 {timing['p80_ms']:.2f})  x{monai_ms / timing['median_ms']:5.2f} vs MONAI  "
                f"peak extra {peaks[name]:7.1f} MB ({peaks[name] / peaks['monai']:.2f}x MONAI's)"
            )
        entry = {"case": asdict(case), "name": case.name, "providers": rows}
        if case.identity:
            entry["memory_bound_mb"] = round(memory_bound_bytes(case) / 2**20, 1)
            print(f"  memory bound (output + one batch): {entry['memory_bound_mb']:.1f} MB")
        results["cases"].append(entry)
    out = args.out or report.RESULTS / f"fusion-{report.slug(info)}-{results['date']}.json"
    write_json(out, results, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
