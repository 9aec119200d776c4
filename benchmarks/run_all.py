"""Run every benchmark in sequence (make bench): each prints its own figures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPTS = ["bench_data.py", "bench_head_cache.py", "bench_prune_latency.py", "bench_epochs.py",
           "bench_quickstart.py", "bench_reduced_run.py"]

if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    failed = [s for s in SCRIPTS if subprocess.call([sys.executable, str(here / s), *sys.argv[1:]], cwd=here.parent)]
    sys.exit(1 if failed else 0)
