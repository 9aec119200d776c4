"""The `bise` command in subprocesses: help, config printing, a run, bad input, a sweep + table, kill/resume.

SIGTERM, Ctrl-C and other faults: test_faults.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bise_cli.core.files import read_jsonl

from conftest import TINY_OVERRIDES, TINY_SETTINGS, run_bise, without_timing


def bise(*args: str, cwd: Path, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    result = run_bise(*args, cwd=cwd, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"bise {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def test_help_and_config(tmp_path):
    assert "run [overrides]" in bise("--help", cwd=tmp_path).stdout
    assert "pruning: bise" in bise("run", "--help", cwd=tmp_path).stdout
    job = bise("run", "dataset=biased_mnist", "rho=0.99", "--cfg", "job", cwd=tmp_path).stdout
    assert "rho: 0.99" in job and "name: biased_mnist" in job and "tau_min: 0.001" in job
    bad = bise("frobnicate", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "error: unknown command 'frobnicate'; allowed: run, audit, data, gates, table, export, version "
        "(see bise --help)")


def test_quickstart_run_with_tiny_settings(tmp_path):
    result = bise("run", "experiment=quickstart", *TINY_SETTINGS, "output_root=out", cwd=tmp_path)
    run_dir = tmp_path / "out" / "runs"
    [folder] = list(run_dir.iterdir())
    assert "experiment=quickstart" in folder.name and len(folder.name) <= 200
    records = read_jsonl(folder / "metrics.jsonl")
    assert [r["stage"] for r in records] == ["vanilla", "bise", "bise_ft", "reweighted_ft", "random", "magnitude",
                                             "dfr_train"]
    assert json.loads((folder / "status.json").read_text())["state"] == "done"
    assert (folder / "config.yaml").is_file() and (folder / "run.log").is_file()
    assert "REDUCED-SCALE DEMO" in result.stdout  # the summary table says it is not the paper's numbers
    assert "bise_ft" in result.stdout


def test_bad_input_gives_one_line_error(tmp_path):
    result = bise("run", *TINY_OVERRIDES, "rho=1.5", "output_root=out", cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    assert "rho must be in (0, 1], got 1.5" in result.stderr + result.stdout


def test_data_command_writes_summary(tmp_path):
    bise("data", "dataset.source=embedded", "rho=0.9", "output_root=out", cwd=tmp_path)
    [folder] = list((tmp_path / "out" / "data").iterdir())
    summary = json.loads((folder / "summary.json").read_text())
    assert set(summary) >= {"train", "search", "val", "test"}
    assert summary["train"]["size"] == 4000 and len(summary["train"]["bias_counts"]) == 10
    assert abs(summary["train"]["aligned_fraction"] - 0.9) < 1e-9
    assert (folder / "samples.png").stat().st_size > 1000


def test_two_seed_sweep_then_table_then_rerun_skips(tmp_path):
    args = ("run", "-m", *TINY_OVERRIDES, "stages=[vanilla,bise]", "seed=0,1", "name=sweep", "output_root=out")
    bise(*args, cwd=tmp_path)
    sweep = tmp_path / "out" / "sweeps" / "sweep"
    runs = sorted(p.name for p in sweep.iterdir() if (p / "metrics.jsonl").is_file())
    assert len(runs) == 2 and all("seed=" in r for r in runs)
    table = bise("table", str(sweep), "--format", "md", cwd=tmp_path).stdout
    assert "vanilla" in table and "bise" in table
    assert (sweep / "table.md").is_file() and (sweep / "table.csv").is_file()
    assert (sweep / "accuracy_vs_sparsity.png").stat().st_size > 2000
    before = [read_jsonl(sweep / r / "metrics.jsonl") for r in runs]
    written = [(sweep / r / "metrics.jsonl").stat().st_mtime_ns for r in runs]
    rerun = bise(*args, cwd=tmp_path)
    assert (rerun.stderr + rerun.stdout).count("already done") >= 2  # one per job
    assert [read_jsonl(sweep / r / "metrics.jsonl") for r in runs] == before
    # Skipped, not recomputed to the same values: the records were not even rewritten.
    assert [(sweep / r / "metrics.jsonl").stat().st_mtime_ns for r in runs] == written


def test_killed_run_resumes_to_the_same_records(tmp_path):
    overrides = [*TINY_OVERRIDES, "stages=[vanilla,bise,random]", "pruning.tau_min=0.001", "output_root=out"]
    reference = tmp_path / "reference"
    reference.mkdir()
    bise("run", *overrides, cwd=reference)
    [expected_dir] = list((reference / "out" / "runs").iterdir())
    expected = read_jsonl(expected_dir / "metrics.jsonl")

    work = tmp_path / "work"
    work.mkdir()
    process = subprocess.Popen([sys.executable, "-m", "bise_cli", "run", *overrides], cwd=work,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def in_bise_search() -> bool:  # the search logs one line when its 10 mask epochs start
        return any("BISE search:" in log.read_text() for log in (work / "out" / "runs").glob("*/run.log"))

    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None and not in_bise_search():
        time.sleep(0.05)  # polling interval
    if not in_bise_search():
        exited = process.poll() is not None
        process.kill()
        process.wait()
        raise AssertionError("the run never reached the BISE search" + (" (it exited)" if exited else " (timeout)"))
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    [run_dir] = list((work / "out" / "runs").iterdir())
    assert json.loads((run_dir / "status.json").read_text())["state"] == "running"
    written = [r["stage"] for r in read_jsonl(run_dir / "metrics.jsonl")]
    assert written == ["vanilla", "bise", "random"][:len(written)] and len(written) < 3

    bise("run", *overrides, cwd=work)
    resumed = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["stage"] for r in resumed] == ["vanilla", "bise", "random"]
    assert without_timing(resumed) == without_timing(expected)



def test_wheel_ships_every_config_file(tmp_path):
    """The config tree lives in the package (bise_cli/conf) and every YAML file of it is in a built wheel."""
    import shutil
    import zipfile

    from bise_cli.cli import CONF_DIR

    root = Path(__file__).resolve().parent.parent
    assert CONF_DIR == root / "bise_cli" / "conf" and (root / "conf").resolve() == CONF_DIR
    source = tmp_path / "src"  # a copy: the build writes build/ and egg-info next to the sources
    shutil.copytree(root / "bise_cli", source / "bise_cli", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    [wheel] = list((tmp_path / "dist").glob("bise-*.whl"))
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".yaml")}
    expected = {f"bise_cli/conf/{p.relative_to(CONF_DIR).as_posix()}" for p in CONF_DIR.rglob("*.yaml")}
    assert expected and shipped == expected


def test_overrides_of_every_type_reach_the_records_as_their_composed_values(tmp_path):
    """Records compare and store composed values, never an override's text: a list typed with spaces, a nested
    list, a dict, null, a quoted string, a number in exponent form, a bool, a group choice, `+key=` and `~key`."""
    result = bise("run", *TINY_OVERRIDES, "stages=[vanilla]", "train.milestones=[1, 1]", "vanilla_checkpoint=null",
                  "note='a b'", "train.lr=1e-1", "pruning=bise", "~dataset.fallback", "dataset.root=elsewhere",
                  "+record_keys={ablation: ce, grid: [[1, 2], [3]], train.milestones: [1,1], rho: 0.9}",
                  "+record_keys.flag=true", "+record_keys.tag='x y'", "+record_keys.code='007'", "output_root=out",
                  cwd=tmp_path)
    assert "a b" in result.stdout + result.stderr
    [folder] = list((tmp_path / "out" / "runs").iterdir())
    [record] = read_jsonl(folder / "metrics.jsonl")
    assert record["train.milestones"] == "[1,1]" and record["grid"] == "[[1,2],[3]]"
    assert record["vanilla_checkpoint"] is None and record["train.lr"] == 0.1 and record["rho"] == 0.9
    assert record["ablation"] == "ce" and record["flag"] is True and record["tag"] == "x y" and record["code"] == "007"
    assert record["experiment"] == "smoke" and record["pruning"] == "bise" and record["pruning.name"] == "bise"
    assert "dataset.fallback" not in record and "dataset.root" not in record


def test_a_record_key_that_contradicts_the_config_fails_before_any_data_or_training(tmp_path):
    result = bise("run", *TINY_OVERRIDES, "stages=[vanilla]",
                  "+record_keys={train.milestones: [1, 2]}", "output_root=out", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: record_keys.train.milestones='[1,2]' contradicts the config value '[1]'")
    [folder] = list((tmp_path / "out" / "runs").iterdir())
    assert not (folder / "metrics.jsonl").exists() and not (folder / "data_summary.json").exists()
    assert not [p for p in (tmp_path / "out" / "cache").rglob("*") if p.is_file()]  # nothing computed, nothing cached
    assert "epoch" not in (folder / "run.log").read_text()
