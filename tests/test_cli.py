"""The ``densefuse`` command: profile-memory and plan (argument checks, outputs), with the measurements
replaced by a synthetic memory model except in one real end-to-end profile-memory run."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch

from densefuse import cli, profile

TINY = ["--growth", "4", "--layers", "2", "--down-blocks", "2"]  # patches: multiples of 8
A = {"naive": 2e8, "checkpoint": 1.5e8, "fused": 1e8}  # synthetic peak = A + B * batch * patch^3
B = {"naive": 4000.0, "checkpoint": 2000.0, "fused": 1000.0}


def fake_measure(network, point, device="cpu", warmup=2, reps=3):
    return {
        **vars(point),
        "peak_bytes": int(A[point.implementation] + B[point.implementation] * point.voxels),
        "median_ms": 1.0,
    }


@pytest.fixture
def synthetic(monkeypatch):
    """profile.measure returns the synthetic model above; the calls are recorded."""
    calls = []

    def measure(network, point, *args):
        calls.append((network, point))
        return fake_measure(network, point)

    monkeypatch.setattr(profile, "measure", measure)
    return calls


@pytest.fixture
def profile_json(tmp_path, synthetic):
    out = tmp_path / "prof.json"
    args = ["profile-memory", *TINY, "--patches", "16", "32", "--batches", "1", "2", "--dtypes", "fp32"]
    assert (
        cli.main([*args, "--implementations", "naive", "fused", "--out", str(out), "--no-plot", "--quiet"])
        == 0
    )
    return out


def run_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_profile_memory_json(capsys, profile_json, synthetic):
    doc = json.loads(profile_json.read_text())
    assert doc["network"]["num_down_blocks"] == 2 and doc["network"]["growth_rate"] == 4
    assert doc["device"]["type"] == "cpu" and doc["date"] and doc["versions"]["torch"] == torch.__version__
    assert len(doc["results"]) == 8 == len(synthetic)
    assert {(r["implementation"], r["batch"], r["patch"]) for r in doc["results"]} == {
        (i, b, p) for i in ("naive", "fused") for b in (1, 2) for p in (16, 32)
    }
    table = capsys.readouterr().out
    assert "| fused | fp32 | 2 | 32^3 | 158 MiB | 0.36x |" in table  # (1e8 + 1000 v) / (2e8 + 4000 v)
    assert doc["complete"] is True


def test_interrupted_profile_keeps_its_points(tmp_path, monkeypatch):
    """The JSON is rewritten (atomically) after every point: a sweep killed by a time limit keeps the
    points it measured, marked incomplete, and plan --profile can fit them."""
    done = []

    def measure(network, point, *args):
        if len(done) == 5:
            raise KeyboardInterrupt  # the time limit, after five points
        done.append(point)
        return fake_measure(network, point)

    monkeypatch.setattr(profile, "measure", measure)
    out = tmp_path / "prof.json"
    args = ["profile-memory", *TINY, "--patches", "16", "32", "--batches", "1", "2", "--dtypes", "fp32"]
    code = cli.main([*args, "--implementations", "naive", "fused", "--out", str(out), "--no-plot", "--quiet"])
    assert code == 130  # "densefuse: interrupted", no traceback
    doc = json.loads(out.read_text())
    assert len(doc["results"]) == 5 and doc["complete"] is False
    assert [p.name for p in tmp_path.iterdir()] == ["prof.json"]  # no temporary left behind
    network, rows, _ = profile.load_report(out)
    assert network.num_down_blocks == 2 and rows == doc["results"]


def test_plan_from_profile(profile_json, synthetic, capsys, tmp_path):
    out = tmp_path / "plan.json"
    budget = 2e8 + 4000.0 * 3 * 32**3 + 10  # naive fits batch 3 at 32^3
    argv = ["plan", "--profile", str(profile_json), "--memory", f"{budget:.0f}", "--headroom", "0"]
    capsys.readouterr()
    assert cli.main([*argv, "--patch", "32", "--out", str(out)]) == 0
    plans = {p["implementation"]: p for p in json.loads(out.read_text())["plans"]}
    assert plans["naive"]["batch"] == 3
    assert plans["fused"]["batch"] == int((budget - 1e8) / (1000 * 32**3))
    text, err = capsys.readouterr()
    assert "| naive | fp32 |" in text and "headroom" in text
    assert err == ""  # no word on the pairs the profile does not hold
    assert cli.main([*argv, "--batch", "3", "--out", str(out)]) == 0
    plans = {p["implementation"]: p for p in json.loads(out.read_text())["plans"]}
    assert plans["naive"]["patch"] == 32 and plans["fused"]["patch"] == 48
    argv[-1] = "0.5"  # --headroom: half the memory is the budget
    assert cli.main([*argv, "--patch", "32", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    plans = {p["implementation"]: p for p in doc["plans"]}
    assert doc["budget_bytes"] == pytest.approx(0.5 * budget)
    assert plans["fused"]["batch"] == int((0.5 * budget - 1e8) / (1000 * 32**3))


PLAN_FUSED_BF16 = [
    "plan",
    "--memory",
    "1GiB",
    "--patch",
    "64",
    *TINY,
    "--implementations",
    "fused",
    "--dtypes",
    "bf16",
]


def test_plan_measures_on_the_spot_and_checks(synthetic, capsys):
    assert cli.main([*PLAN_FUSED_BF16, "--check", "--quiet"]) == 0
    fit_points = [(p.batch, p.patch) for _, p in synthetic]
    expected_batch = int((0.9 * 2**30 - 1e8) / (1000 * 64**3))
    assert fit_points == [(2, 8), (3, 8), (4, 8), (expected_batch, 64)]  # default fit points, then the check
    text = capsys.readouterr().out
    assert f"| {expected_batch} | 64^3 |" in text and re.search(r"\| [+-]0\.0% \|$", text, re.MULTILINE)


def test_plan_nothing_fits(synthetic, capsys):
    assert cli.main(["plan", "--memory", "100MB", "--patch", "64", *TINY, "--quiet"]) == 0
    assert "none fits" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["plan", "--memory", "lots", "--patch", "64"], "--memory: expected a size like 24GiB"),
        (["plan", "--memory", "-2GiB", "--patch", "64"], "--memory"),
        (["plan", "--memory", "8GB"], "one of the arguments --patch --batch is required"),
        (["plan", "--memory", "8GB", "--patch", "64", "--batch", "2"], "not allowed with argument"),
        (["plan", "--patch", "64"], "--memory"),
        (["plan", "--memory", "8GB", "--patch", "0"], "--patch: expected a positive integer"),
        (["plan", "--memory", "8GB", "--patch", "96"], "--patch: patch sizes must be multiples of 64"),
        (["plan", "--memory", "8GB", "--patch", "64", "--headroom", "1"], "--headroom: expected a fraction"),
        (["plan", "--memory", "8GB", "--patch", "64", "--device", "tpu"], "--device: expected cpu or cuda"),
        (["plan", "--memory", "8GB", "--patch", "64", "--dtypes", "fp16"], "invalid choice: 'fp16'"),
        (
            ["plan", "--memory", "8GB", "--patch", "64", "--profile", "missing.json"],
            "--profile: missing.json",
        ),
        (["profile-memory", "--patches", "48"], "--patches: patch sizes must be multiples of 64"),
        (["profile-memory", "--down-blocks", "-1"], "--down-blocks: expected an integer in [0, 28]"),
        (["profile-memory", "--down-blocks", "29"], "--down-blocks: expected an integer in [0, 28]"),
        (["plan", "--memory", "1GiB", "--patch", "64", "--down-blocks", "20000"], "--down-blocks: expected"),
        (["profile-memory", "--down-blocks", "two"], "--down-blocks: expected an integer in [0, 28]"),
        (["profile-memory", "--dropout", "1.5"], "--dropout: expected a probability"),
        (["profile-memory", "--target", "layer"], "invalid choice: 'layer'"),
        (["info", "--verbose"], "unrecognized arguments: --verbose"),
    ],
)
def test_bad_arguments(capsys, synthetic, argv, message):  # synthetic: a regression fails, not measures
    assert message in run_error(capsys, argv)


def test_plan_profile_excludes_network_options(profile_json, capsys):
    err = run_error(
        capsys, ["plan", "--profile", str(profile_json), "--memory", "8GB", "--patch", "16", "--growth", "8"]
    )
    assert "leave out --growth" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_cuda_device_without_cuda(capsys):
    assert "no CUDA device here" in run_error(
        capsys, ["plan", "--memory", "8GB", "--patch", "64", "--device", "cuda"]
    )


def test_profile_memory_end_to_end(tmp_path, capsys):
    """One real point (a child process) through the whole command: JSON, Markdown table, PNG."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "memory.json"
    argv = ["profile-memory", "--target", "block", "--in-channels", "8", "--growth", "4", "--layers", "2"]
    argv += [
        "--patches",
        "8",
        "--implementations",
        "fused",
        "--dtypes",
        "fp32",
        "--warmup",
        "1",
        "--reps",
        "1",
    ]
    assert cli.main([*argv, "--out", str(out), "--quiet"]) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["peak_bytes"] > 0 and row["median_ms"] > 0, row
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| fused | fp32 | 2 | 8^3 |" in capsys.readouterr().out  # batch 2 by default


def test_bench_runs_the_report_script(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # _bench hands the arguments over through sys.argv
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--help"])
    assert exit_info.value.code == 0 and "usage: densefuse bench" in capsys.readouterr().out


def test_profile_memory_output_paths(synthetic, capsys, tmp_path, monkeypatch):
    """Checked before anything is measured: a PNG name (it would be overwritten by the figure), a
    folder (also ".", "/" and "") and a name too long for the file system are refused; a missing
    folder is made. With --no-plot there is no figure: a PNG name is just a name."""
    args = ["profile-memory", *TINY, "--patches", "8", "16", "--dtypes", "fp32", "--quiet"]
    assert "is the figure's name" in run_error(capsys, [*args, "--out", str(tmp_path / "memory.png")])
    assert "is a folder" in run_error(capsys, [*args, "--out", str(tmp_path)])
    monkeypatch.chdir(tmp_path)
    for folder in (".", "/", "", ".."):
        assert "is a folder" in run_error(capsys, [*args, "--out", folder])
    assert "longer than the 255 bytes" in run_error(capsys, [*args, "--out", "a" * 252 + ".json"])
    assert not synthetic
    no_plot = [*args, "--no-plot"]
    assert cli.main([*no_plot, "--out", str(tmp_path / "new" / "memory.json")]) == 0
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["memory.json"]
    assert cli.main([*no_plot, "--out", str(tmp_path / "new" / "memory.png")]) == 0
    assert json.loads((tmp_path / "new" / "memory.png").read_text())["complete"]


def test_profile_memory_writes_long_names(synthetic, capsys, tmp_path):
    """A name the file system takes is written, however long: the temporary file beside it has a
    short name of its own."""
    out = tmp_path / ("m" * 245 + ".json")
    args = ["profile-memory", *TINY, "--patches", "8", "--dtypes", "fp32", "--no-plot", "--quiet"]
    assert cli.main([*args, "--out", str(out)]) == 0
    assert json.loads(out.read_text())["complete"] and [p.name for p in tmp_path.iterdir()] == [out.name]


def test_figures_of_different_outputs_do_not_collide(tmp_path):
    """r.json's figure is r.png; a name without .json keeps all of it (run.1 -> run.1.png)."""
    assert profile.figure_path(tmp_path / "r.json") == tmp_path / "r.png"
    assert profile.figure_path(tmp_path / "r.JSON") == tmp_path / "r.png"
    assert profile.figure_path(tmp_path / "run.1") == tmp_path / "run.1.png"
    assert profile.figure_path(tmp_path / "run.2") == tmp_path / "run.2.png"


def test_profile_memory_fails_when_every_point_fails(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(
        profile, "measure", lambda network, point, *a: {**vars(point), "error": "out of memory"}
    )
    args = ["profile-memory", *TINY, "--patches", "8", "--dtypes", "fp32", "--no-plot", "--quiet"]
    assert cli.main([*args, "--out", str(tmp_path / "m.json")]) == 1
    assert "all 3 points failed" in capsys.readouterr().err


@pytest.mark.parametrize(
    "change",
    [
        lambda doc: doc["results"][0].pop("implementation"),
        lambda doc: doc["device"].pop("name"),
        lambda doc: doc.update(results={"a": 1}),
        lambda doc: doc["results"][0].update(peak_bytes=None),
        lambda doc: doc["results"][0].update(peak_bytes=float("nan")),
        lambda doc: doc["results"][0].update(patch="16"),
        lambda doc: doc["network"].update(num_down_blocks="2"),
    ],
    ids=[
        "no-implementation",
        "no-device-name",
        "results-object",
        "peak-null",
        "peak-nan",
        "patch-str",
        "net-str",
    ],
)
def test_plan_refuses_malformed_profiles(profile_json, capsys, tmp_path, change):
    """A JSON that parses but is not what profile-memory writes: a one-line error naming the file."""
    doc = json.loads(profile_json.read_text())
    change(doc)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    err = run_error(capsys, ["plan", "--profile", str(bad), "--memory", "8GB", "--patch", "16"])
    assert f"--profile: {bad}: not a densefuse profile-memory JSON" in err


def test_plan_output_paths(profile_json, capsys, tmp_path):
    argv = ["plan", "--profile", str(profile_json), "--memory", "8GB", "--patch", "16"]
    assert "is the --profile being read" in run_error(capsys, [*argv, "--out", str(profile_json)])
    assert "is a folder" in run_error(capsys, [*argv, "--out", str(tmp_path)])
    assert cli.main([*argv, "--out", str(tmp_path / "plans" / "plan.json")]) == 0
    assert json.loads((tmp_path / "plans" / "plan.json").read_text())["plans"]


def test_plan_check_does_not_run_what_the_machine_cannot_hold(synthetic, monkeypatch, capsys):
    """On the CPU a planned configuration predicted above the machine's memory is not measured (a poor
    fit once had the check's step exhaust the machine): the check names it and the command fails."""
    monkeypatch.setattr(profile, "host_memory_bytes", lambda: 2**29)  # 512 MiB, below the 0.9 GiB plan
    assert cli.main([*PLAN_FUSED_BF16, "--check", "--quiet"]) == 1
    assert len(synthetic) == 3  # the fit points only
    assert "more than this machine's 512 MiB of memory: not run" in capsys.readouterr().err


def test_plan_check_over_budget_fails(synthetic, monkeypatch, capsys):
    """--check measures the plan: a configuration measured over the budget makes the command fail."""

    def over(network, rows, *args):
        return [{**r, "measured_bytes": 2**40, "prediction_error": -0.9} for r in rows]

    monkeypatch.setattr(profile, "check_plan", over)
    assert cli.main([*PLAN_FUSED_BF16, "--check", "--quiet"]) == 1
    assert "measured 1 TiB, over the budget" in capsys.readouterr().err

    def failed(network, rows, *args):
        return [{**r, "check_error": "out of memory"} for r in rows]

    monkeypatch.setattr(profile, "check_plan", failed)
    assert cli.main([*PLAN_FUSED_BF16, "--check", "--quiet"]) == 1
    assert "64^3: out of memory" in capsys.readouterr().err


def test_plan_fits_each_pair_on_its_own(profile_json, capsys, tmp_path):
    """A pair whose points failed is named on stderr; the pairs that fit are still planned."""
    doc = json.loads(profile_json.read_text())
    fused = [row for row in doc["results"] if row["implementation"] == "fused"]
    for row in fused[1:]:  # one fused point left: too few to fit
        row.pop("peak_bytes"), row.pop("median_ms")
        row["error"] = "out of memory"
    bad = tmp_path / "one-pair-failed.json"
    bad.write_text(json.dumps(doc))
    argv = ["plan", "--profile", str(bad), "--memory", "8GB", "--patch", "16", "--dtypes", "fp32"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert "| naive | fp32 |" in out and "| fused |" not in out
    assert "fused fp32: cannot fit a memory model" in err and "out of memory" in err
    assert cli.main([*argv, "--implementations", "fused"]) == 1


def test_plan_checks_the_fit_points_before_measuring(synthetic, capsys):
    err = run_error(capsys, ["plan", "--memory", "1GiB", "--batch", "2", *TINY, "--fit-batches", "2"])
    assert "--fit-batches, --fit-patches: the fit needs two or more values" in err and not synthetic


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_plan_for_device_cuda_from_a_profile_needs_no_cuda_here(profile_json, capsys):
    argv = ["plan", "--profile", str(profile_json), "--memory", "8GB", "--patch", "16", "--device", "cuda"]
    assert cli.main(argv) == 0
    assert "no CUDA device here" in run_error(capsys, [*argv, "--check"])


def test_info_warns_about_a_forced_backend_that_runs_nowhere(monkeypatch, capsys):
    monkeypatch.setenv("DENSEFUSE_BACKEND", "bogus")
    assert cli.main(["info"]) == 0
    assert "the forced backend 'bogus' runs on no device here" in capsys.readouterr().err


def test_bottleneck_none_is_no_bottleneck(synthetic, tmp_path):
    """--bottleneck none gives a network without a bottleneck (it was dropped as "not given": 4)."""
    out = tmp_path / "m.json"
    args = ["profile-memory", *TINY, "--patches", "8", "--dtypes", "fp32", "--no-plot", "--quiet"]
    assert cli.main([*args, "--bottleneck", "none", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["network"]["bottleneck"] is None
    assert {network.bottleneck for network, _ in synthetic} == {None}


def test_plan_with_a_profile_refuses_bottleneck_none(profile_json, capsys):
    err = run_error(
        capsys,
        ["plan", "--profile", str(profile_json), "--memory", "1GB", "--patch", "16", "--bottleneck", "none"],
    )
    assert "leave out --bottleneck" in err


def test_profile_memory_refuses_a_folder_where_the_figure_goes(synthetic, capsys, tmp_path):
    (tmp_path / "m.png").mkdir()
    args = ["profile-memory", *TINY, "--patches", "8", "--dtypes", "fp32", "--quiet"]
    assert f"--out: {tmp_path / 'm.png'} is a folder" in run_error(
        capsys, [*args, "--out", str(tmp_path / "m.json")]
    )
    assert not synthetic


def test_a_write_that_fails_is_an_error_not_a_traceback(synthetic, monkeypatch, capsys, tmp_path):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(profile, "write_json", full)
    args = ["profile-memory", *TINY, "--patches", "8", "--dtypes", "fp32", "--no-plot", "--quiet"]
    assert cli.main([*args, "--out", str(tmp_path / "m.json")]) == 1
    assert "densefuse: [Errno 28] No space left on device" in capsys.readouterr().err


def test_plan_warns_of_a_poor_fit(monkeypatch, capsys, tmp_path):
    """A fit that misses its own points by more than MAX_FIT_RESIDUAL is said to be untrustworthy."""

    def noisy(network, point, *args):
        row = fake_measure(network, point)
        return {**row, "peak_bytes": row["peak_bytes"] * (3 if point.batch == 3 else 1)}

    monkeypatch.setattr(profile, "measure", noisy)
    argv = [
        "plan",
        "--memory",
        "8GB",
        "--patch",
        "32",
        *TINY,
        "--implementations",
        "fused",
        "--dtypes",
        "fp32",
    ]
    assert cli.main([*argv, "--quiet"]) == 0
    assert "densefuse plan: the fit of fused fp32 misses a measured point by" in capsys.readouterr().err


def test_bench_interrupted_exits_with_the_signal(monkeypatch, capsys, tmp_path):
    """An interrupted report keeps its cases and exits 130 (SIGINT) or 143 (SIGTERM), not 0."""
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    sys.path.insert(0, str(cli.Path(cli.__file__).resolve().parent.parent / "benchmarks"))
    import loss_providers

    for raised, status in ((KeyboardInterrupt(), 130), (KeyboardInterrupt(15), 143)):

        def interrupted(*args, _raised=raised, **kwargs):
            raise _raised

        monkeypatch.setattr(loss_providers, "cases", lambda shapes: [object()])
        monkeypatch.setattr(loss_providers, "providers", interrupted)
        out = tmp_path / f"bench-{status}.json"
        assert (
            cli.main(["bench", "--sizes", "1x1x8x8x8", "--reps", "1", "--no-compile", "--out", str(out)])
            == status
        )
        assert "stopped after 0 of 1 cases" in json.loads(out.read_text())["notes"][-1]
    assert "--out: " in run_error(capsys, ["bench", "--sizes", "1x1x8x8x8", "--out", str(tmp_path)])


def test_option_errors_name_the_option_once(capsys):
    """argparse names the option: the message does not repeat it; a number too large for the plan's
    arithmetic is refused, not an OverflowError."""
    err = run_error(capsys, ["plan", "--memory", "0", "--patch", "8"])
    assert "argument --memory: expected a positive size, got '0'" in err
    err = run_error(capsys, ["plan", "--memory", "1GB", "--patch", str(10**103)])
    assert "argument --patch: expected a positive integer below 2**31" in err
