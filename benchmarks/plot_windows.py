"""Figure of the 1-D fusion windows and of their overlapped sums, from densefuse.windows itself.

    python benchmarks/plot_windows.py [--roi 96] [--out benchmarks/results/windows.png]

Left: each family's weight vector over one window of ``roi`` voxels. Right: the sum of copies at
the paper's stride roi/2 (50 % overlap) along a line of five windows; fusion divides by this sum, so
a flat curve means every voxel of the interior gets the same total weight (partition of unity up to
a constant). The spline and the tent (B-spline order 1) are flat at roi/2; the quadratic and cubic
B-splines are flat at their own natural strides roi/3 and roi/4.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from densefuse import windows

FAMILIES = {
    "constant (MONAI)": lambda n: windows.constant(n),
    "gaussian sigma=0.125 (MONAI)": lambda n: windows.gaussian(n, 0.125),
    "B-spline order 1 (tent)": lambda n: windows.bspline(n, 1),
    "B-spline order 2": lambda n: windows.bspline(n, 2),
    "B-spline order 3 (cubic)": lambda n: windows.bspline(n, 3),
    "spline (Hashemi et al. 2019)": lambda n: windows.spline(n),
}


def overlapped_sum(w: torch.Tensor, stride: int, count: int) -> torch.Tensor:
    """sum_k w[x - k*stride] over ``count`` copies: [stride * (count - 1) + len(w)] float64."""
    total = torch.zeros(stride * (count - 1) + w.numel(), dtype=torch.float64)
    for k in range(count):
        total[k * stride : k * stride + w.numel()] += w
    return total


def plot(roi: int, out: Path, count: int = 5) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    stride = roi // 2
    for label, family in FAMILIES.items():
        w = family(roi)
        left.plot(torch.arange(roi) + 0.5, w, label=label)
        total = overlapped_sum(w, stride, count)
        right.plot(torch.arange(total.numel()) + 0.5, total / total[roi : roi + stride].mean(), label=label)
    left.set(title=f"1-D window weights, roi = {roi}", xlabel="voxel in the window", ylabel="w")
    right.set(
        title=f"{count} copies at stride roi/2 = {stride}: sum / interior mean",
        xlabel="voxel along the line",
        ylabel="summed weight",
        ylim=(0, 2.2),
    )
    right.axvspan(roi - stride, (count - 1) * stride + stride, color="0.93", zorder=0)
    left.legend(fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--roi", type=int, default=96)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "windows.png")
    args = parser.parse_args()
    print(plot(args.roi, args.out))


if __name__ == "__main__":
    main()
