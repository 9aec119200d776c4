"""Sweeps through submitit's local executor, the machinery of hydra/launcher=slurm (each job a pickled task run as
its own process, with its job folder and result): records land, a rerun skips finished jobs, and a failing job is
reported without stopping the other."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bise_cli.core.files import read_jsonl

pytest.importorskip("hydra_plugins.hydra_submitit_launcher")


def sweep(tmp_path) -> subprocess.CompletedProcess:
    # rho=1.5 is out of range: that job fails with a one-line error, the rho=0.9 job runs.
    return subprocess.run([sys.executable, "-m", "bise_cli", "run", "-m", "hydra/launcher=local_submitit",
                           "experiment=smoke", "stages=[vanilla]", "threads=1", "bootstrap.n=0", "rho=0.9,1.5",
                           f"output_root={tmp_path / 'out'}"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=400, env={**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_submitit_local_sweep_records_reruns_and_reports_a_failed_job(tmp_path):
    first = sweep(tmp_path)
    jobs = tmp_path / "out" / "sweeps" / "smoke"
    good, bad = jobs / "bootstrap.n=0,experiment=smoke,rho=0.9,stages=_vanilla_", \
        jobs / "bootstrap.n=0,experiment=smoke,rho=1.5,stages=_vanilla_"
    assert first.returncode == 1, first.stderr[-3000:]
    assert f"1 job(s) failed; see status.json in: {bad}" in first.stderr
    assert [r["stage"] for r in read_jsonl(good / "metrics.jsonl")] == ["vanilla"]
    assert json.loads((good / "status.json").read_text())["state"] == "done"
    failed = json.loads((bad / "status.json").read_text())
    assert failed["state"] == "failed" and "rho must be in (0, 1], got 1.5" in failed["error"]
    assert list((jobs / ".submitit").glob("*/*_submitted.pkl"))  # it really went through submitit's job folders
    done = (good / "status.json").read_text()

    second = sweep(tmp_path)  # the finished job is skipped, the failed one fails again and is reported again
    assert second.returncode == 1 and f"1 job(s) failed; see status.json in: {bad}" in second.stderr
    assert "already done, skipping" in (good / "run.log").read_text()
    assert (good / "status.json").read_text() == done
    # The run said what it would cost, in its first lines and in status.json.
    head = (good / "run.log").read_text().splitlines()[:8]
    assert any("estimated wall time of this run on cpu: " in line for line in head), head
    assert json.loads(done)["estimated_seconds"] > 0
