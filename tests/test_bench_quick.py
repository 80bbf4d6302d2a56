"""The benchmark chain end to end, in its quick mode (tiny pipeline, tiny settings).

``python tests/benchmarks/run_all.py --quick`` runs the library cost, the CPU grid (auto
against the hand-set cells) and the attention processors, then plots: this checks that each
step still runs against the current library and writes its JSON and PNG files. Its figures
mean nothing (tiny pipeline, one repeat).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

RUN_ALL = Path(__file__).resolve().parent / "benchmarks" / "run_all.py"


@pytest.mark.slow
def test_run_all_quick_writes_results_and_plots(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    done = subprocess.run(
        [sys.executable, str(RUN_ALL), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    quick = tmp_path / "quick"
    grid = json.loads((quick / "grid-cpu.json").read_text(encoding="utf-8"))
    keys = {r["key"] for r in grid["records"] if "s_per_image" in r}
    assert "auto 64x2" in keys
    assert "fp32 sdpa batch vae-off 64x2" in keys
    assert grid["summary"]["best"] in keys
    assert "auto_speed_vs_best" in grid["summary"]
    library = json.loads((quick / "library-cpu.json").read_text(encoding="utf-8"))
    assert library["import"]["heavy_modules_imported"] == []
    assert (quick / "attention-cpu.json").exists()
    plots = sorted(p.name for p in (quick / "plots").glob("*.png"))
    assert plots == ["attention-cpu.png", "grid-cpu-64.png"]
    assert "| configuration | s/image |" in done.stdout
