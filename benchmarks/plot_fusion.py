"""Chart of a sliding-window fusion benchmark (a json of fusion_providers.py): speed and memory per
provider and case, both as ratios to MONAI measured in the same run.

    python benchmarks/plot_fusion.py benchmarks/results/fusion-<device>-<date>.json [--out chart.png]

Left: MONAI's median time / the provider's (right of 1: faster than MONAI). Right: the provider's
peak extra memory / MONAI's (left of 1: less). One group of bars per case; the reference backend
(densefuse-torch) is left out unless --all is given.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def ratios(results: dict, everything: bool = False) -> tuple[list[str], list[str], dict[str, list[float]]]:
    """(case names, providers, {"speed": [...], "memory": [...]} per provider in case order; NaN where a
    case lacks the provider)."""
    cases = [case["name"] for case in results["cases"]]
    providers: list[str] = []
    for case in results["cases"]:
        for name in case["providers"]:
            if name not in providers and name != "monai" and (everything or name != "densefuse-torch"):
                providers.append(name)
    table = {}
    for name in providers:
        rows = [case["providers"].get(name) for case in results["cases"]]
        table[name] = {
            "speed": [row["speedup_vs_monai"] if row else float("nan") for row in rows],
            "memory": [row["peak_vs_monai"] if row else float("nan") for row in rows],
        }
    return cases, providers, table


def plot(path: Path, out: Path, everything: bool = False) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads(path.read_text())
    cases, providers, table = ratios(results, everything)
    fig, axes = plt.subplots(
        1, 2, figsize=(12, 1.2 + 0.35 * len(cases) * len(providers)), constrained_layout=True
    )
    height = 0.8 / len(providers)
    for ax, key, label in zip(
        axes, ("speed", "memory"), ("MONAI's time / ours", "our peak extra memory / MONAI's")
    ):
        for k, name in enumerate(providers):
            positions = [c + k * height for c in range(len(cases))]
            ax.barh(positions, table[name][key], height, label=name)
        ax.axvline(1.0, color="0.3", linewidth=1)
        ax.set_yticks([c + 0.4 - height / 2 for c in range(len(cases))], cases)
        ax.invert_yaxis()
        ax.set(xlabel=label)
    axes[0].legend(fontsize=8, loc="lower right")
    device = results["device"]["name"]
    fig.suptitle(f"sliding-window fusion vs MONAI, {device}, {results['date']} ({results['reps']} rounds)")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="a fusion_providers.py json")
    parser.add_argument("--out", type=Path, help="PNG file (default: the json's name with .png)")
    parser.add_argument("--all", action="store_true", help="also the reference backend (densefuse-torch)")
    args = parser.parse_args(argv)
    print(f"wrote {plot(args.json, args.out or args.json.with_suffix('.png'), args.all)}")


if __name__ == "__main__":
    main()
