"""A run's fixed costs: a run imports no heavy optional library that none of its stages uses (scikit-learn is
DFR's, pandas the sweep plots'; each costs seconds on a busy machine), and validating a DFR stage still does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, tempfile
sys.path.insert(0, sys.argv[1])
from conftest import TINY_OVERRIDES, compose_config
from bise_cli.run import pipeline
from bise_cli.run.validate import validate_config
cfg = compose_config(TINY_OVERRIDES + ["stages=[vanilla]", "cache=false"])
with tempfile.TemporaryDirectory() as tmp:
    cfg["output_root"] = tmp
    pipeline.run(cfg, tmp + "/run")
loaded = {name: name in sys.modules for name in ("sklearn", "pandas")}
validate_config(compose_config(TINY_OVERRIDES + ["stages=[vanilla,dfr_train]"]))
print(json.dumps({"run": loaded, "dfr": "sklearn" in sys.modules}))
"""


def test_a_vanilla_run_imports_neither_scikit_learn_nor_pandas():
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(REPO / "tests")], cwd=REPO, env=env, check=True,
                         capture_output=True, text=True, timeout=600)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["run"] == {"sklearn": False, "pandas": False}
    assert result["dfr"]  # a DFR stage's settings are still checked (which needs scikit-learn)
