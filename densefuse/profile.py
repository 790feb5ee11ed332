"""Memory profiling of training steps and the patch/batch planner.

What is measured: one training step (forward, loss, backward, Adam step) of a whole FCDenseNet3d (the
paper's F-beta loss, beta = 1.5, on a uint8 label map with 1 % lesion voxels) or of one DenseBlock3d
(the loss sum(output * a fixed random tensor), so the block gets a full output gradient and its input
needs one, as inside a network), at a batch size, a cubic patch size, a dense-block implementation
and a dtype: "fp32", or "bf16" (the forward under torch.autocast(dtype=torch.bfloat16); a block's
input is then bf16 too, as the output of an autocast convolution would be).

Peak memory (bytes) is the memory a step holds at its worst moment: parameters, gradients, Adam
state, the batch, activations, workspaces.

- CUDA: torch.cuda.max_memory_allocated() over the timed steps (torch.cuda.reset_peak_memory_stats()
  after the warm-up steps) minus torch.cuda.memory_allocated() before the network is built, in this
  process, with torch.backends.cudnn.benchmark on for every contender. The CUDA context and the
  caching allocator's unused reserve are not counted (keep headroom for them).
- CPU: in a fresh child Python process, the bytes of the tensors that live across steps
  (parameters, gradients, Adam state, the batch) plus the growth of the resident set during the timed
  steps above its level after the warm-up steps (VmHWM, reset through /proc/self/clear_refs, minus
  VmRSS; without procfs, the child's lifetime peak). The child runs with glibc's mmap threshold
  fixed at 1 MiB (MALLOC_MMAP_THRESHOLD_, unless set already), so freed tensors leave the resident
  set and its peak follows the peak of live tensor memory; with glibc's adaptive threshold up to
  32 MiB of freed blocks stay resident and the peak depends on the allocation history. Thread pools
  and oneDNN caches, made during the warm-up, are not counted. Small CPU convolutions (few channels,
  small patches) run ATen's slow_conv3d, whose im2col buffers make memory jump where it switches to
  oneDNN: fit on sizes in one regime.

Time is the median wall-clock time of ``reps`` steps after ``warmup`` steps (CUDA synchronised).

The planner fits, per (implementation, dtype), peak = a + b * batch * patch^3 by least squares to
measured points (measured on the spot or loaded from a profile JSON) and returns the largest batch
for a patch, or the largest patch for a batch, whose predicted peak fits a budget.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import hashlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

import densefuse
from densefuse.nn.dense import IMPLEMENTATIONS, DenseBlock3d
from densefuse.nn.fcdensenet import FCDenseNet3d
from densefuse.nn.losses import FBetaLoss
from densefuse.ops import _validate

DTYPES = ("fp32", "bf16")
TARGETS = ("model", "block")
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_SIZE_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_MMAP_THRESHOLD = str(2**20)


def parse_size(text: str, name: str = "memory") -> int:
    """Bytes in ``text``: a number with an optional unit, e.g. "24GiB", "8GB", "512MiB", "1.5 GiB",
    "1000000" (bytes). KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB powers of 1024; any case.

    Raises ValueError naming ``name`` unless the text is a size of at least one byte.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*", str(text), re.IGNORECASE)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(
            f"{name}: expected a size like 24GiB, 8GB or 512MiB (units B, KB, MB, GB, TB, KiB, MiB, GiB, "
            f"TiB), got {text!r}"
        )
    size = float(match.group(1)) * _SIZE_UNITS[unit]
    if not math.isfinite(size) or size < 1:
        raise ValueError(f"{name}: expected a positive size, got {text!r}")
    return int(size)


def format_size(nbytes: float) -> str:
    """``nbytes`` in B, KiB, MiB, GiB or TiB to three significant digits, e.g. "14.9 GiB" (the next
    unit from 999.5 of one up: "0.999 MiB", never "1.02e+03 KiB")."""
    value, unit = float(nbytes), "B"
    for larger in ("KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 999.5:
            break
        value, unit = value / 1024, larger
    return f"{value:.3g} {unit}"


# ----------------------------------------------------------------------------------- what is measured
_NETWORK_INTEGERS = ("in_channels", "out_channels", "growth_rate", "num_layers", "num_down_blocks")


# Patches are multiples of 2 * 2**n and below 2**31; the default ones (2 * 2**n and twice that) too.
MAX_DOWN_BLOCKS = 28


@dataclass(frozen=True)
class Network:
    """The profiled network: a whole FCDenseNet3d ("model") or one DenseBlock3d ("block").

    For a block, in_channels is the block's input channels; out_channels and num_down_blocks are
    unused. The defaults are the paper's network (4 modalities in, 1 lesion map out).
    """

    target: str = "model"
    in_channels: int = 4
    out_channels: int = 1
    growth_rate: int = 16
    num_layers: int = 5
    num_down_blocks: int = 5
    bottleneck: int | None = 4
    dropout: float = 0.2

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target: expected one of {TARGETS}, got {self.target!r}")
        for name in ("in_channels", "out_channels", "growth_rate", "num_layers"):
            _positive_int(name, getattr(self, name))
        if not _is_int(self.num_down_blocks) or not 0 <= self.num_down_blocks <= MAX_DOWN_BLOCKS:
            raise ValueError(
                f"num_down_blocks: expected an integer in [0, {MAX_DOWN_BLOCKS}] (patches are multiples of "
                f"2 * 2**n, below 2**31), got {self.num_down_blocks!r}"
            )
        if self.bottleneck is not None and (not _is_int(self.bottleneck) or self.bottleneck < 1):
            raise ValueError(f"bottleneck: expected a positive integer or None, got {self.bottleneck!r}")
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not 0 <= self.dropout < 1
        ):
            raise ValueError(f"dropout: expected a probability in [0, 1), got {self.dropout!r}")
        for name in (*_NETWORK_INTEGERS, "bottleneck"):  # Python ints: NumPy's do not go to JSON
            value = getattr(self, name)
            object.__setattr__(self, name, None if value is None else _validate.as_int(value))
        object.__setattr__(self, "dropout", float(self.dropout))

    @property
    def size_multiple(self) -> int:
        """Patch sizes must be multiples of this (the model: 2 * 2^num_down_blocks; a block: 1)."""
        return 2 * 2**self.num_down_blocks if self.target == "model" else 1

    def build(self, implementation: str) -> nn.Module:
        """A freshly initialised FCDenseNet3d or DenseBlock3d running ``implementation``."""
        common = {"bottleneck": self.bottleneck, "dropout": self.dropout, "implementation": implementation}
        if self.target == "block":
            return DenseBlock3d(self.in_channels, self.growth_rate, self.num_layers, **common)
        return FCDenseNet3d(
            self.in_channels,
            self.out_channels,
            growth_rate=self.growth_rate,
            num_down_blocks=self.num_down_blocks,
            layers_per_block=self.num_layers,
            **common,
        )


@dataclass(frozen=True)
class Point:
    """One configuration: implementation, dtype ("fp32" | "bf16"), batch size, cubic patch side (voxels)."""

    implementation: str
    dtype: str
    batch: int
    patch: int

    @property
    def voxels(self) -> int:
        """batch * patch^3, what activation memory is proportional to."""
        return self.batch * self.patch**3


def _is_int(value: object) -> bool:
    """An integer: Python, NumPy or a 0-d integer tensor (not a bool)."""
    return _validate.as_int(value) is not None


def _positive_int(name: str, value: object) -> int:
    """value (an integer of any kind, _is_int) in [1, 2**31) as a Python int (the CLI's range: larger
    ones overflow the plans' floats); otherwise a ValueError naming it."""
    number = _validate.as_int(value)
    if number is None or not 1 <= number < 2**31:
        raise ValueError(f"{name}: expected a positive integer below 2**31, got {value!r}")
    return number


def check_points(network: Network, points: Iterable[Point]) -> list[Point]:
    """``points`` as a list (batch and patch as Python ints); ValueError naming the field for an
    unknown implementation or dtype, a batch below 1, or a patch that is not a positive multiple of
    network.size_multiple (both below 2**31)."""
    points = list(points)
    m = network.size_multiple
    for p in points:
        if p.implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation: expected one of {IMPLEMENTATIONS}, got {p.implementation!r}")
        if p.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {DTYPES}, got {p.dtype!r}")
        _positive_int("batch", p.batch)
        if not _is_int(p.patch) or not 1 <= p.patch < 2**31 or p.patch % m:
            raise ValueError(
                f"patch: expected a positive multiple of {m} (2 x 2^{network.num_down_blocks} for the down "
                f"blocks) below 2**31, got {p.patch}"
            )
    return [
        Point(p.implementation, p.dtype, _validate.as_int(p.batch), _validate.as_int(p.patch)) for p in points
    ]


def grid(
    implementations: Sequence[str], dtypes: Sequence[str], batches: Sequence[int], patches: Sequence[int]
) -> list[Point]:
    """Every combination, patch sizes varying fastest (one curve of the plot after the other)."""
    return [Point(i, d, b, p) for i in implementations for d in dtypes for b in batches for p in patches]


class TrainingStep:
    """``step()``: one training step of ``network`` at ``point`` on a fixed random batch: forward (under
    autocast for bf16), loss (see the module docstring), backward, Adam step (lr 1e-3). The inputs are
    x [batch, in_channels, patch, patch, patch] fp32 (a block's: bf16 for "bf16") and for a model uint8
    labels [batch, patch, patch, patch]; the network is freshly initialised (seed 0) on ``device``."""

    def __init__(self, network: Network, point: Point, device: str | torch.device) -> None:
        device = torch.device(device)
        torch.manual_seed(0)
        self.net = network.build(point.implementation).to(device)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=1e-3)
        self.device = device
        self.bf16 = point.dtype == "bf16"
        gen = torch.Generator(device).manual_seed(0)
        spatial = (point.patch,) * 3
        self.x = torch.randn((point.batch, network.in_channels, *spatial), generator=gen, device=device)
        if network.target == "model":
            classes = network.out_channels
            self.loss_fn = FBetaLoss(beta=1.5, sigmoid=classes == 1, softmax=classes > 1)
            lesion = torch.rand((point.batch, *spatial), generator=gen, device=device) < 0.01
            label = torch.randint(1, max(classes, 2), lesion.shape, generator=gen, device=device)
            self.target = (lesion * label).to(torch.uint8)
        else:
            self.x = self.x.to(torch.bfloat16 if self.bf16 else torch.float32).requires_grad_()
            shape = (point.batch, self.net.out_channels, *spatial)
            self.target = torch.randn(shape, generator=gen, device=device).to(self.x.dtype)
            self.loss_fn = lambda out, probe: (out * probe).sum(dtype=torch.float32)

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.x.grad = None
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.net(self.x)
        self.loss_fn(out, self.target).backward()
        self.optimizer.step()

    def persistent_bytes(self) -> int:
        """Bytes of the tensors that live across steps: parameters, gradients, Adam state, the batch."""
        tensors = [self.x, self.x.grad, self.target, *self.net.parameters(), *self.net.buffers()]
        tensors += [p.grad for p in self.net.parameters()]
        tensors += [t for state in self.optimizer.state.values() for t in state.values()]
        storages = {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in tensors
            if isinstance(t, Tensor)
        }
        return sum(storages.values())


def _proc_status_bytes(field: str) -> int | None:
    """A VmRSS/VmHWM-like field of /proc/self/status in bytes; None without procfs."""
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return None if match is None else 1024 * int(match.group(1))


def _reset_peak_rss() -> None:
    """Reset VmHWM to the current VmRSS (Linux >= 4.0); elsewhere the peak stays the process's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_bytes() -> int:
    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    import resource  # POSIX only: no peak resident set on Windows

    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return scale * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _measure_here(network: Network, point: Point, device: str, warmup: int, reps: int) -> dict:
    """Peak bytes and median step ms of ``point`` in this process (see the module docstring)."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(dev)
    step = TrainingStep(network, point, dev)
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        base = (_proc_status_bytes("VmRSS") or 0) - step.persistent_bytes()
        _reset_peak_rss()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(dev)
        times.append((time.perf_counter() - start) * 1e3)
    peak = (torch.cuda.max_memory_allocated(dev) if cuda else _peak_rss_bytes()) - base
    return {"peak_bytes": int(peak), "median_ms": round(statistics.median(times), 3)}


def _error_text(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


_CHILD = (
    "import json, sys; job = json.loads(sys.stdin.read()); sys.path[:0] = job['path']; "
    "from densefuse.profile import _child_main; _child_main(job)"
)


def _die_with_parent(parent: int) -> None:
    """On Linux, have the kernel kill this child when its parent dies (a scheduler that kills only the
    parent must not leave a measurement holding its memory), and exit if it is gone already."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


def _child_main(job: dict) -> None:
    """The measuring child process: one point; the result as JSON on the last line of stdout."""
    _die_with_parent(job["parent"])
    try:
        result = _measure_here(
            Network(**job["network"]), Point(**job["point"]), "cpu", job["warmup"], job["reps"]
        )
    except Exception as exc:  # reported back: one failing point must not end a sweep
        result = {"error": _error_text(exc)}
    print("\n" + json.dumps(result), flush=True)


def measure(network: Network, point: Point, device: str = "cpu", warmup: int = 2, reps: int = 3) -> dict:
    """Measure one training step of ``network`` at ``point`` on ``device`` ("cpu" or "cuda[:i]").

    Returns the point's fields plus peak_bytes (int, bytes) and median_ms (float, milliseconds), or
    plus error (str) when the step failed (out of memory, the child process killed, an exception).
    CPU points run in a fresh child Python process (this interpreter, this sys.path), CUDA points in
    this process.
    """
    (point,) = check_points(network, [point])
    warmup, reps = _positive_int("warmup", warmup), _positive_int("reps", reps)
    device = str(_validate.check_device("device", device))
    row = dataclasses.asdict(point)
    if torch.device(device).type == "cuda":
        try:
            row.update(_measure_here(network, point, device, warmup, reps))
        except torch.cuda.OutOfMemoryError:
            row["error"] = "out of memory"
        except Exception as exc:  # one failing point must not end a sweep
            row["error"] = _error_text(exc)
        gc.collect()
        torch.cuda.empty_cache()
        return row
    job = {
        "parent": os.getpid(),
        "path": sys.path,
        "network": dataclasses.asdict(network),
        "point": row,
        "warmup": warmup,
        "reps": reps,
    }
    env = {"MALLOC_MMAP_THRESHOLD_": _MMAP_THRESHOLD, **os.environ}
    child = subprocess.run(
        [sys.executable, "-c", _CHILD], input=json.dumps(job), capture_output=True, text=True, env=env
    )
    lines = child.stdout.strip().splitlines()
    if child.returncode == 0 and lines:
        row = {**row, **json.loads(lines[-1])}
    else:  # -9: killed, for memory most likely
        last = (child.stderr.strip().splitlines() or [""])[-1]
        row = {**row, "error": f"child process exited with code {child.returncode} {last}".strip()}
    return row


def sweep(
    network: Network,
    points: Iterable[Point],
    device: str = "cpu",
    warmup: int = 2,
    reps: int = 3,
    progress: bool = True,
    on_row: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """``measure`` every point, one after the other, with a tqdm bar on stderr when ``progress``;
    ``on_row(rows so far)`` after each point (e.g. to save them, so an interrupted sweep keeps them)."""
    from tqdm import tqdm

    points = check_points(network, points)
    rows = []
    bar = tqdm(points, desc="profile-memory", unit="point", disable=not progress)
    for point in bar:
        bar.set_postfix_str(f"{point.implementation} {point.dtype} b{point.batch} {point.patch}^3")
        rows.append(measure(network, point, device, warmup, reps))
        if on_row is not None:
            on_row(rows)
    return rows


# ----------------------------------------------------------------------------------------- the report
def device_info(device: str) -> dict:
    """The device: CUDA name and memory (bytes), or CPU model, cores, torch threads and 1-min load."""
    dev = torch.device(device)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        return {"type": "cuda", "name": props.name, "memory_bytes": props.total_memory}
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        match = None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "type": "cpu",
        "name": match.group(1).strip() if match else platform.processor() or platform.machine(),
        "cores": cores,
        "threads": torch.get_num_threads(),
        "load_1min": round(os.getloadavg()[0], 2),  # other work on the machine skews CPU timings
    }


def device_slug(info: dict) -> str:
    """File-name form of a device_info: "nvidia-h100-80gb-hbm3", "cpu-amd-epyc-2c"."""
    name = info["name"] if info["type"] == "cuda" else f"cpu-{info['name']}-{info['cores']}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60]


def git_commit() -> str | None:
    """The source checkout's commit ("<sha>" or "<sha>-dirty"), None outside a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        dirty = subprocess.run(
            [
                "git",
                "-C",
                str(root),
                "status",
                "--porcelain",
                "--untracked-files=no",
                "densefuse",
                "kernels",
                "csrc",
            ],
            capture_output=True,
            text=True,
        )
    except OSError:  # no git
        return None
    if sha.returncode:
        return None
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def report(network: Network, rows: list[dict], device: str, warmup: int, reps: int) -> dict:
    """The JSON document of a sweep: device, date, versions, network, method, one row per point."""
    info = device_info(device)
    return {
        "device": info,
        "slug": device_slug(info),
        "date": datetime.date.today().isoformat(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "densefuse": densefuse.__version__,
            "git": git_commit(),
            "densefuse_backends": densefuse.available_backends(info["type"]),
        },
        "network": dataclasses.asdict(network),
        "method": {
            "step": "forward (autocast for bf16), loss, backward, Adam step",
            "memory": "CUDA: max_memory_allocated - allocated before building the network, cudnn.benchmark "
            "on; CPU (child process, glibc mmap threshold "
            f"{_MMAP_THRESHOLD} B): persistent tensors + VmHWM during the timed steps - VmRSS after warm-up",
            "time": f"median of {reps} steps after {warmup} warm-up steps",
        },
        "results": rows,
    }


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a hidden file beside ``path``, then renamed over it (a run killed meanwhile
    leaves the previous file, never half of one). The temporary name is short whatever the name's
    length, so any name the file system takes works."""
    path = Path(path)
    digest = hashlib.sha1(path.name.encode(errors="surrogateescape")).hexdigest()[:12]
    tmp = path.with_name(f".densefuse-{digest}-{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | Path, doc: object, indent: int = 2) -> None:
    """``doc`` as indented JSON at ``path``, atomically (write_atomically)."""
    text = json.dumps(doc, indent=indent) + "\n"
    write_atomically(path, lambda tmp: tmp.write_text(text))


def figure_path(out: Path) -> Path:
    """Where the figure of the JSON ``out`` goes: beside it as .png (r.json -> r.png, run.1 -> run.1.png)."""
    return out.with_suffix(".png") if out.suffix.lower() == ".json" else out.with_name(out.name + ".png")


def out_problem(out: Path, *, figure: bool = False, avoid: Path | None = None) -> str | None:
    """Why an output path could not be written (None: it can), found before anything is measured: it
    may not be a folder, nor, for a ``figure`` written beside it (figure_path), the figure's path; its
    name must fit the file system; its folder is made (as for a default name) and must be writable; it
    must not be a PNG where the figure goes beside it, or ``avoid`` (a file being read)."""
    paths = (out, figure_path(out)) if figure and out.name not in ("", ".", "..") else (out,)
    if figure and out.suffix.lower() == ".png":
        return f"{out} is the figure's name; give the JSON's (the figure goes beside it as .png)"
    if avoid is not None and out.resolve() == avoid.resolve():
        return f"{out} is the --profile being read; give another file"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot make its folder: {exc}"
    for path in paths:
        try:
            longest = os.pathconf(path.parent, "PC_NAME_MAX")
        except (OSError, ValueError):  # no such limit to ask for
            longest = None
        if longest is not None and len(os.fsencode(path.name)) > longest:
            return f"the name {path.name!r} is longer than the {longest} bytes its folder takes"
        if path.is_dir():
            return f"{path} is a folder"
    if not os.access(out.parent, os.W_OK):
        return f"{out.parent} is not writable"
    return None


# what reading a file that is not a report raises (JSON and Unicode errors are ValueErrors)
_NOT_A_REPORT = (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError)


def load_report(path: str | Path) -> tuple[Network, list[dict], dict]:
    """(network, rows, device_info) of a JSON written by ``report``; ValueError naming the file if not
    one (its rows are checked too: each a point with a finite positive peak_bytes, or an error)."""
    try:
        doc = json.loads(Path(path).read_text())
        network, rows, device = Network(**doc["network"]), doc["results"], doc["device"]
        if not isinstance(rows, list) or not all(isinstance(device.get(k), str) for k in ("name", "type")):
            raise TypeError("results must be a list and device hold a name and a type")
        for row in rows:
            _check_row(network, row)
    except _NOT_A_REPORT as exc:
        raise ValueError(f"{path}: not a densefuse profile-memory JSON ({_error_text(exc)})") from exc
    return network, rows, device


def _check_row(network: Network, row: object) -> None:
    """A row of a report: a point (check_points) with a finite peak_bytes > 0 and median_ms, or an
    error (a string, and no peak_bytes)."""
    point = Point(*(row[k] for k in ("implementation", "dtype", "batch", "patch")))
    check_points(network, [point])
    if "error" in row:
        if not isinstance(row["error"], str) or "peak_bytes" in row:
            raise ValueError(f"row {row}: an error row holds an error message and no peak_bytes")
        return
    _check_peak(row)
    median = _validate.as_real(row["median_ms"]) if isinstance(row["median_ms"], (int, float)) else None
    if median is None or not math.isfinite(median):
        raise ValueError(f"row {row}: expected a finite median_ms, got {row['median_ms']!r}")


def _check_peak(row: dict) -> None:
    """A measured row's peak_bytes: a finite number >= 1 (a Python int or float, as JSON gives; a byte
    count, and a fit through tinier ones divides by them)."""
    peak = row["peak_bytes"]
    number = _validate.as_real(peak) if isinstance(peak, (int, float)) else None
    if number is None or not (math.isfinite(number) and number >= 1):
        raise ValueError(f"row {row}: expected a finite peak_bytes >= 1, got {peak!r}")


def plot(doc: dict, path: str | Path) -> None:
    """PNG of peak memory (GiB) and median step time (ms) vs patch size: one line per implementation
    and dtype, one column per batch size, written atomically. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["results"] if "peak_bytes" in r]
    batches = sorted({r["batch"] for r in rows}) or [1]
    fig, axes = plt.subplots(2, len(batches), figsize=(max(5.5 * len(batches), 6.5), 7.5), squeeze=False)
    for col, batch in enumerate(batches):
        for color, impl in enumerate(IMPLEMENTATIONS):
            for dtype, style in zip(DTYPES, ("-", "--")):
                line = sorted(
                    (r["patch"], r)
                    for r in rows
                    if (r["batch"], r["implementation"], r["dtype"]) == (batch, impl, dtype)
                )
                if not line:
                    continue
                patches = [patch for patch, _ in line]
                style = {"color": f"C{color}", "linestyle": style, "marker": "o", "label": f"{impl} {dtype}"}
                axes[0, col].plot(patches, [r["peak_bytes"] / 2**30 for _, r in line], **style)
                axes[1, col].plot(patches, [r["median_ms"] / 1e3 for _, r in line], **style)
        axes[0, col].set_title(f"batch {batch}")
        axes[0, col].set_ylabel("peak memory (GiB)")
        axes[1, col].set_ylabel("median step time (s)")
        for ax in axes[:, col]:
            ax.set_xlabel("patch size (voxels per side)")
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    net = doc["network"]
    if net["target"] == "model":
        what = f"FCDenseNet3d ({net['num_down_blocks']} down blocks, k={net['growth_rate']})"
    else:
        what = f"DenseBlock3d ({net['in_channels']} in, {net['num_layers']} layers, k={net['growth_rate']})"
    fig.suptitle(f"{what} training step\n{doc['device']['name']}, {doc['date']}", fontsize=10)
    fig.tight_layout()
    try:
        write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------------- the planner
@dataclass(frozen=True)
class MemoryModel:
    """peak_bytes = intercept_bytes + bytes_per_voxel * batch * patch^3, for one implementation and dtype.

    points: how many measurements were fitted; max_rel_residual: the largest |fit - measured| /
    measured among them.
    """

    implementation: str
    dtype: str
    intercept_bytes: float
    bytes_per_voxel: float
    points: int
    max_rel_residual: float

    def predict(self, batch: int, patch: int) -> float:
        """Predicted peak bytes of a training step at batch x patch^3."""
        return self.intercept_bytes + self.bytes_per_voxel * batch * patch**3

    def largest_batch(self, budget: float, patch: int) -> int:
        """Largest batch whose predicted peak at patch^3 is <= ``budget`` bytes; 0 when none."""
        patch = _positive_int("patch", patch)
        return max(0, math.floor((budget - self.intercept_bytes) / (self.bytes_per_voxel * patch**3)))

    def largest_patch(self, budget: float, batch: int, multiple: int) -> int:
        """Largest multiple of ``multiple`` whose cube at ``batch`` fits ``budget`` bytes; 0 when none."""
        batch, multiple = _positive_int("batch", batch), _positive_int("multiple", multiple)
        room = (budget - self.intercept_bytes) / (self.bytes_per_voxel * batch)
        patch = math.floor(max(room, 0) ** (1 / 3) / multiple) * multiple
        # The float cube root is a step off at most. The loops are bounded: at a huge budget one step
        # changes no float prediction, and an unbounded loop would never end.
        for _ in range(3):
            if self.predict(batch, patch + multiple) > budget:
                break
            patch += multiple
        for _ in range(3):
            if patch <= 0 or self.predict(batch, patch) <= budget:
                break
            patch -= multiple
        return patch


def fit_memory_models(rows: Iterable[dict]) -> dict[tuple[str, str], MemoryModel]:
    """Least-squares fit of peak = a + b * batch * patch^3 per (implementation, dtype) to the rows that
    have a peak_bytes. ValueError when a pair has measurements at fewer than two values of
    batch * patch^3, or memory that does not grow with them."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        if "peak_bytes" in row:
            missing = [k for k in ("implementation", "dtype", "batch", "patch") if k not in row]
            if missing:
                raise ValueError(f"row {row}: missing {', '.join(missing)}")
            _positive_int("batch", row["batch"])
            _positive_int("patch", row["patch"])
            _check_peak(row)
            groups.setdefault((row["implementation"], row["dtype"]), []).append(row)
    if not groups:
        raise ValueError("rows: no successful measurement to fit")
    models = {}
    for (impl, dtype), group in groups.items():
        voxels = np.array([r["batch"] * r["patch"] ** 3 for r in group], dtype=np.float64)
        peaks = np.array([r["peak_bytes"] for r in group], dtype=np.float64)
        if len(np.unique(voxels)) < 2:
            raise ValueError(
                f"{impl} {dtype}: the fit needs measurements at two or more values of batch * patch^3, "
                f"got {len(np.unique(voxels))}"
            )
        design = np.stack([np.ones_like(voxels), voxels], axis=1)
        (a, b), *_ = np.linalg.lstsq(design, peaks, rcond=None)
        if not b > 0:  # NaN included
            raise ValueError(
                f"{impl} {dtype}: the measured memory does not grow with batch * patch^3 (slope {b:.3g} "
                "B/voxel); measure larger, more widely spread points"
            )
        residual = float((np.abs(design @ np.array([a, b]) - peaks) / peaks).max())
        models[(impl, dtype)] = MemoryModel(impl, dtype, float(a), float(b), len(group), residual)
    return models


def plan(
    models: dict[tuple[str, str], MemoryModel],
    budget: float,
    multiple: int,
    patch: int | None = None,
    batch: int | None = None,
) -> list[dict]:
    """Per model: the largest batch at ``patch`` (or the largest patch, a multiple of ``multiple``, at
    ``batch``) whose predicted peak is <= ``budget`` bytes. Give exactly one of patch and batch.

    Rows: implementation, dtype, batch, patch (the planned one 0 when nothing fits), predicted_bytes
    (None when nothing fits), intercept_bytes, bytes_per_voxel, fit_points, fit_max_rel_residual.
    """
    if (patch is None) == (batch is None):
        raise ValueError("patch, batch: give exactly one of them")
    number = _validate.as_real(budget)
    if number is None or not (math.isfinite(number) and number > 0):
        raise ValueError(f"budget: expected a finite number of bytes > 0, got {budget!r}")
    budget, multiple = number, _positive_int("multiple", multiple)  # Python numbers in the rows (JSON)
    patch = None if patch is None else _positive_int("patch", patch)
    batch = None if batch is None else _positive_int("batch", batch)
    rows = []
    for (impl, dtype), model in models.items():
        if patch is not None:
            planned = Point(impl, dtype, model.largest_batch(budget, patch), patch)
        else:
            planned = Point(impl, dtype, batch, model.largest_patch(budget, batch, multiple))
        rows.append(
            {
                **dataclasses.asdict(planned),
                "predicted_bytes": model.predict(planned.batch, planned.patch) if planned.voxels else None,
                "intercept_bytes": model.intercept_bytes,
                "bytes_per_voxel": model.bytes_per_voxel,
                "fit_points": model.points,
                "fit_max_rel_residual": model.max_rel_residual,
            }
        )
    return rows


def host_memory_bytes() -> int | None:
    """The machine's physical memory in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_plan(
    network: Network,
    rows: list[dict],
    device: str = "cpu",
    warmup: int = 2,
    reps: int = 1,
    progress: bool = True,
) -> list[dict]:
    """Measure each planned configuration that fits and add measured_bytes (or check_error) and
    prediction_error = (predicted - measured) / measured to its row (new dicts). On the CPU a
    configuration predicted to need more than the machine's memory is not run (check_error says so):
    a poor fit would otherwise have the step exhaust the machine."""
    ram = host_memory_bytes() if torch.device(device).type == "cpu" else None
    too_big = {id(r) for r in rows if ram is not None and (r["predicted_bytes"] or 0) > ram}
    points = [
        Point(r["implementation"], r["dtype"], r["batch"], r["patch"])
        for r in rows
        if r["predicted_bytes"] and id(r) not in too_big
    ]
    measured = iter(sweep(network, points, device, warmup, reps, progress))
    checked = []
    for given in rows:
        row = dict(given)
        if id(given) in too_big:
            size, limit = format_size(row["predicted_bytes"]), format_size(ram)
            row["check_error"] = f"predicted {size}, more than this machine's {limit} of memory: not run"
        elif row["predicted_bytes"]:
            result = next(measured)
            if "peak_bytes" in result:
                row["measured_bytes"] = result["peak_bytes"]
                row["prediction_error"] = (row["predicted_bytes"] - result["peak_bytes"]) / result[
                    "peak_bytes"
                ]
            else:
                row["check_error"] = result["error"]
        checked.append(row)
    return checked
