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
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent / "benchmarks"
RUN_ALL = BENCH / "run_all.py"


def _contender(label: str, seconds: list[float], peak: float, size: int = 512) -> dict[str, Any]:
    setup = "auto" if label == "auto" else "manual"
    return {
        "key": f"{label} {size}x4",
        "cell": {"setup": setup, "size": size, "images": 4},
        "plan": None,
        "seconds": seconds,
        "s_per_image": sorted(seconds)[len(seconds) // 2] / 4,
        "peak_gib": peak,
    }


def test_head_to_head_summary_pairs_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    import grid_cuda
    import plots

    # Round 2 was slow for everyone. By plain medians "steady" (1.00 every round) beats
    # auto (1.04, 1.30, 1.04); paired round by round it is 0.96 of auto's time.
    contenders = [
        _contender("auto", [1.04, 1.30, 1.04], 4.0),
        _contender("fp16 sdpa batch vae-off", [1.00, 1.25, 1.00], 4.4),
        _contender("fp16 sdpa batch vae-slice", [1.10, 1.30, 1.10], 2.0),
    ]
    summary = grid_cuda.confirm_summary(contenders, [512, None])
    assert list(summary) == ["512"]
    row = summary["512"]
    assert row["best"] == "fp16 sdpa batch vae-off 512x4"
    assert row["auto_speed_vs_best"] == pytest.approx(1.00 / 1.04)
    assert row["auto_peak_vs_best"] == pytest.approx(4.0 / 4.4)
    assert contenders[2]["auto_speed_vs"] == pytest.approx(1.10 / 1.04)
    rows = plots.head_to_head_rows({"contenders": contenders})[512]
    assert [r["key"] for r in rows] == [
        "fp16 sdpa batch vae-off 512x4",
        "auto 512x4",
        "fp16 sdpa batch vae-slice 512x4",
    ]
    assert [r["time_vs_auto"] for r in rows] == pytest.approx([1.00 / 1.04, 1.0, 1.10 / 1.04])


def test_head_to_head_rows_read_the_cpu_format(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    import plots

    doc = {
        "records": [
            {"key": "auto 512x2", "cell": {"setup": "auto", "size": 512, "images": 2}},
            {"key": "bf16 safe loop vae-slice 512x2", "cell": {"setup": "manual", "size": 512}},
        ],
        "medians": {
            "auto 512x2": {"s_per_image": 36.0, "peak_gib": 3.3},
            "bf16 safe loop vae-slice 512x2": {"s_per_image": 38.0, "peak_gib": 2.9},
        },
    }
    rows = plots.head_to_head_rows(doc)[512]
    assert [r["key"] for r in rows] == ["auto 512x2", "bf16 safe loop vae-slice 512x2"]
    assert rows[1]["time_vs_auto"] == pytest.approx(38.0 / 36.0)
    assert rows[1]["peak_gib"] == 2.9


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
    confirm = json.loads((quick / "confirm-cpu.json").read_text(encoding="utf-8"))
    contenders = {c["key"] for c in confirm["contenders"]}
    assert {"auto 64x2", "fp32 sdpa batch vae-slice 64x2", "auto 128x1"} <= contenders
    assert set(confirm["summary"]) == {"64", "128"}
    assert confirm["summary"]["64"]["best"] in contenders
    plots = sorted(p.name for p in (quick / "plots").glob("*.png"))
    assert plots == [
        "attention-cpu.png",
        "grid-cpu-64.png",
        "h2h-cpu-128.png",
        "h2h-cpu-64.png",
    ]
    assert "| configuration | s/image |" in done.stdout


def test_a_bad_head_to_head_label_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    import grid_cuda

    with pytest.raises(SystemExit) as exit_info:
        grid_cuda.main(["--device", "cpu", "--cells", "fp16 sdpa batch"])
    assert exit_info.value.code == 2
    assert "not a cell label: 'fp16 sdpa batch'" in capsys.readouterr().err
