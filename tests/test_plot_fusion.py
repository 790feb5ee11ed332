"""benchmarks/plot_fusion.py: the ratios it draws come from the json as written, and it writes a PNG."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("plot_fusion", ROOT / "benchmarks" / "plot_fusion.py")
plot_fusion = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plot_fusion)


def row(speed: float, memory: float) -> dict:
    return {"speedup_vs_monai": speed, "peak_vs_monai": memory}


def results() -> dict:
    fusion = {"densefuse-cuda": row(2.5, 0.5), "densefuse-torch": row(0.2, 2.0), "monai": row(1.0, 1.0)}
    argmax = {"densefuse-triton": row(0.8, 0.17), "monai": row(1.0, 1.0)}
    cases = [{"name": "fusion", "providers": fusion}, {"name": "argmax", "providers": argmax}]
    return {"device": {"name": "test device"}, "date": "2026-11-27", "reps": 3, "cases": cases}


def test_ratios_per_provider_and_case():
    cases, providers, table = plot_fusion.ratios(results())
    assert cases == ["fusion", "argmax"] and providers == ["densefuse-cuda", "densefuse-triton"]
    assert table["densefuse-cuda"]["speed"][0] == 2.5 and table["densefuse-triton"]["memory"][1] == 0.17
    assert table["densefuse-cuda"]["speed"][1] != table["densefuse-cuda"]["speed"][1]  # NaN: not run there
    _, everything, _ = plot_fusion.ratios(results(), everything=True)
    assert "densefuse-torch" in everything


def test_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    source = tmp_path / "fusion.json"
    source.write_text(json.dumps(results()))
    plot_fusion.main([str(source)])
    assert (tmp_path / "fusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
