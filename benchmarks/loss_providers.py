"""Contenders for the loss benchmarks, shared by test_bench_losses.py (pytest-benchmark) and report.py.

One setup function per provider, each returning ``step()``: one forward + backward of the loss on
fixed inputs, the gradient of the previous step dropped first (no accumulation kernel is timed).

    densefuse-<backend>  densefuse.nn.TverskyLoss / FocalLoss under densefuse.use_backend(<backend>),
                         on the uint8 label map as it comes from the data loader
    monai                monai.losses.TverskyLoss / FocalLoss with the same arguments, on the float
                         target MONAI needs (binary [B, 1, ...] for C = 1, one-hot [B, C, ...] for C > 1),
                         made once outside the timed region (so MONAI's to_onehot_y is not timed)
    torch                the Tversky loss written in plain PyTorch (three sums), on the same float target
    torch.compile        that formula under torch.compile (mode default); report.py only

Memory: ``peak_extra_bytes`` is the peak of the bytes allocated above the level before one step,
the new gradient (a logits-sized tensor, the same for every provider) included. On CUDA that is
torch.cuda.max_memory_allocated. On CPU, the allocation events the profiler records from c10's CPU
allocator (every tensor, from every thread, extension ops included) are summed in time order; frees
of memory allocated before the step are not reported, so the running sum is the extra tensor memory
the step holds, as max_memory_allocated counts it on CUDA. Not seen: plain malloc outside tensors
(kernel scratch of O(threads) size). The process's peak RSS (VmHWM) is no substitute: glibc keeps
freed pages resident for reuse and fragments, so it both under- and over-counts by tens of MB here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

import densefuse
import densefuse.nn

TVERSKY = {"alpha": 0.3, "beta": 0.7}
FOCAL = {"gamma": 2.0, "alpha": 0.25}
FOREGROUND = 0.005  # fraction of foreground voxels (split over classes 1..C-1 when C > 1)
SHAPES = {
    "cpu": [(2, 1, 96, 96, 96), (2, 3, 96, 96, 96)],
    "cuda": [(2, 1, 160, 160, 160), (2, 3, 160, 160, 160)],
}
LARGE_SHAPES = {"cuda": [(2, 1, 320, 320, 320)]}  # report.py only: 65.5M voxels
Step = Callable[[], None]


@dataclass(frozen=True)
class Case:
    """One benchmark case: a loss on logits [B, C, D, H, W] (C == 1: sigmoid, C > 1: softmax over C)."""

    loss: str  # "tversky" | "focal"
    shape: tuple[int, ...]

    @property
    def softmax(self) -> bool:
        return self.shape[1] > 1

    @property
    def name(self) -> str:
        return f"{self.loss}-{'softmax' if self.softmax else 'sigmoid'}-{'x'.join(map(str, self.shape))}"


def cases(shapes: list[tuple[int, ...]]) -> list[Case]:
    return [Case(loss, tuple(shape)) for shape in shapes for loss in ("tversky", "focal")]


@dataclass
class Inputs:
    logits: Tensor  # [B, C, *spatial] fp32, requires grad
    labels: Tensor  # [B, 1, *spatial] uint8
    target: Tensor  # float target for MONAI and the plain formula

    @property
    def bytes_moved(self) -> int:
        """Least traffic of a fused fwd+bwd: read logits + labels twice, write the gradient once."""
        return 2 * (self.logits.nbytes + self.labels.nbytes) + self.logits.nbytes


def make_inputs(case: Case, device: str, seed: int = 0) -> Inputs:
    batch, channels, *spatial = case.shape
    gen = torch.Generator(device).manual_seed(seed)
    logits = torch.randn(case.shape, generator=gen, device=device).requires_grad_()
    u = torch.rand((batch, 1, *spatial), generator=gen, device=device)
    classes = max(channels - 1, 1)  # foreground classes, equally frequent
    label = 1 + (u * (classes / FOREGROUND)).floor().clamp(max=classes - 1)
    labels = ((u < FOREGROUND) * label).to(torch.uint8)
    if channels == 1:
        target = labels.float()
    else:
        target = F.one_hot(labels[:, 0].long(), channels).movedim(-1, 1).float().contiguous()
    return Inputs(logits, labels, target)


def _loss_module(lib, case: Case) -> torch.nn.Module:
    """The same constructor call for densefuse.nn and monai.losses (densefuse is a drop-in)."""
    if case.loss == "tversky":
        return lib.TverskyLoss(sigmoid=not case.softmax, softmax=case.softmax, **TVERSKY)
    return lib.FocalLoss(use_softmax=case.softmax, **FOCAL)


def _fwd_bwd(loss_fn: Callable[[Tensor, Tensor], Tensor], logits: Tensor, target: Tensor) -> Step:
    def step() -> None:
        logits.grad = None
        loss_fn(logits, target).backward()

    return step


def tversky_formula(logits: Tensor, target: Tensor, softmax: bool) -> Tensor:
    """Plain PyTorch Tversky loss, mean over (batch, class): TP = sum p*g, FP = S_p - TP, FN = S_g - TP."""
    p = torch.softmax(logits, dim=1) if softmax else torch.sigmoid(logits)
    dims = tuple(range(2, logits.dim()))
    tp = (p * target).sum(dims)
    fp = p.sum(dims) - tp
    fn = target.sum(dims) - tp
    alpha, beta, smooth = TVERSKY["alpha"], TVERSKY["beta"], 1e-5
    return (1 - (tp + smooth) / (tp + alpha * fp + beta * fn + smooth)).mean()


# ------------------------------------------------------------------------------ one setup per provider
def setup_densefuse(backend: str, case: Case, inputs: Inputs) -> Step:
    step = _fwd_bwd(_loss_module(densefuse.nn, case), inputs.logits, inputs.labels)

    def in_backend() -> None:
        with densefuse.use_backend(backend):
            step()

    return in_backend


def setup_monai(case: Case, inputs: Inputs) -> Step:
    import monai.losses

    return _fwd_bwd(_loss_module(monai.losses, case), inputs.logits, inputs.target)


def setup_torch(case: Case, inputs: Inputs) -> Step:
    return _fwd_bwd(lambda x, t: tversky_formula(x, t, case.softmax), inputs.logits, inputs.target)


def setup_compile(case: Case, inputs: Inputs) -> Step:
    compiled = torch.compile(tversky_formula, dynamic=False)  # mode default, specialised to the shape
    return _fwd_bwd(lambda x, t: compiled(x, t, case.softmax), inputs.logits, inputs.target)


def providers(device_type: str, case: Case, compile: bool = False) -> list[str]:
    """Providers of ``case`` on ``device_type``: every densefuse backend available there (not the Triton
    interpreter on CPU), MONAI, and for the Tversky loss the plain formula (and its torch.compile)."""
    backends = densefuse.available_backends(device_type)
    if device_type == "cpu" and "triton" in backends:  # the interpreter (TRITON_INTERPRET=1) is a test aid
        backends.remove("triton")
    formula = ["torch", *(["torch.compile"] if compile else [])] if case.loss == "tversky" else []
    return [f"densefuse-{b}" for b in backends] + ["monai", *formula]


def setup(provider: str, case: Case, inputs: Inputs) -> Step:
    """``step()``: one forward + backward of ``case`` by ``provider`` on ``inputs``."""
    if provider.startswith("densefuse-"):
        return setup_densefuse(provider.removeprefix("densefuse-"), case, inputs)
    anchors = {"monai": setup_monai, "torch": setup_torch, "torch.compile": setup_compile}
    return anchors[provider](case, inputs)


def synchronized(step: Step, device: str) -> Step:
    """``step`` followed by a device synchronisation, for wall-clock timers (``step`` itself on CPU)."""
    if device != "cuda":
        return step

    def synced() -> None:
        step()
        torch.cuda.synchronize()

    return synced


# -------------------------------------------------------------------------------------------- memory
def peak_extra_bytes(step: Step, inputs: Inputs) -> int:
    """Peak bytes allocated during one ``step()`` above the level before it (see the module docstring)."""
    inputs.logits.grad = None  # freed before the measurement: the step's new gradient counts
    if inputs.logits.is_cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return cpu_peak_extra_bytes(step)


def cpu_peak_extra_bytes(step: Step) -> int:
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()

    def walk(events):
        for event in events:
            yield event
            yield from walk(event.children)

    tree = prof.profiler.kineto_results.experimental_event_tree()
    allocations = sorted(
        (e for e in walk(tree) if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu"),
        key=lambda e: e.start_time_ns,
    )
    live = peak = 0
    for event in allocations:
        live += event.extra_fields.alloc_size  # negative for a free
        peak = max(peak, live)
    return peak
