"""Every example runs offline on the tiny pipeline and produces what it says it does."""

from __future__ import annotations

import runpy
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
from _threads import one_thread_env

import mps_helpers
from mps_helpers import _cli
from mps_helpers._auto import AutoPrepareWarning

pytest.importorskip("mps_helpers.testing")
Image = pytest.importorskip("PIL.Image")
# Imported at collection, not first inside a capsys test: diffusers' log handler keeps the
# stderr it was created with, and a test's captured stderr is closed after the test.
pytest.importorskip("diffusers")


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example(name: str) -> dict[str, Any]:
    """Return the namespace of an example, loaded without running it as __main__."""
    return runpy.run_path(str(EXAMPLES / name), run_name=f"example_{name[:-3]}")


def image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        size: tuple[int, int] = image.size
    return size


def assert_slicing_call_kept_the_plan(caught: list[warnings.WarningMessage]) -> None:
    ours = [w for w in caught if issubclass(w.category, AutoPrepareWarning)]
    assert any("enable_attention_slicing() ignored" in str(w.message) for w in ours)
    assert all(w.filename.endswith("existing_script.py") for w in ours)  # points at the script


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # examples write their images to the current directory


def test_every_example_of_the_issue_is_tested_here() -> None:
    # Other examples (multi-GPU, ...) are tested by their own test modules.
    mine = {
        "basic.py",
        "low_memory.py",
        "several_prompts.py",
        "existing_script.py",
        "existing_script_decorated.py",
        "downstream_test.py",
    }
    assert mine <= {p.name for p in EXAMPLES.glob("*.py")}


def test_basic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert example("basic.py")["main"](["--steps", "2"]) == 0
    assert image_size(tmp_path / "basic.png") == (64, 64)
    out = capsys.readouterr().out
    assert out.startswith("Plan: ")
    assert "saved basic.png" in out


def test_low_memory_explains_both_plans(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert example("low_memory.py")["main"](["--steps", "2", "--force"]) == 0
    assert image_size(tmp_path / "low_memory_0.png") == (64, 64)
    assert (tmp_path / "low_memory_1.png").is_file()
    out = capsys.readouterr().out
    mac, here = out.split("\n\n", 1)
    assert mac.startswith("On an 8 GB M1 Mac: mps, float16")
    assert "attention_slicing         True" in mac
    assert "Here (levers forced on)" in here
    for lever in ("attention_slicing", "vae_slicing", "vae_tiling"):
        assert f"{lever:<25} True       asked for" in here


@pytest.mark.parametrize(
    "cpu",
    [
        "float32",
        # The plan's own dtype for this CPU: bfloat16 where it computes it natively.
        pytest.param("real", marks=pytest.mark.real_cpu_dtype),
    ],
)
def test_several_prompts_loop_equals_batch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cpu: str
) -> None:
    main = example("several_prompts.py")["main"]
    assert main(["--steps", "2", "--loop", "on", "--check"]) == 0
    assert sorted(p.name for p in tmp_path.glob("prompt_*.png")) == [
        "prompt_0.png",
        "prompt_1.png",
        "prompt_2.png",
    ]
    out = capsys.readouterr().out
    assert "3 prompts on " in out
    assert "as a loop of single-prompt calls" in out
    assert "largest pixel difference between loop and batch" in out
    dtype = "float32" if cpu == "float32" else str(mps_helpers.plan_for().dtype)[6:]
    assert f"({dtype} allows {mps_helpers.loop_tolerance(dtype):.1e})" in out


def test_existing_script_runs_unchanged_under_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # In this process: `mps-helpers run` itself is tested in a real process elsewhere.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status = _cli.main(["run", str(EXAMPLES / "existing_script.py")])
    assert status == 0
    assert_slicing_call_kept_the_plan(caught)
    assert image_size(tmp_path / "existing_script.png") == (32, 32)
    assert "saved existing_script.png" in capsys.readouterr().out


def test_existing_script_under_the_decorator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "path", sys.path[:])  # the example adds examples/ to it
    monkeypatch.delitem(sys.modules, "existing_script", raising=False)
    main = example("existing_script_decorated.py")["main"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["--output", "decorated.png"]) == 0
    assert_slicing_call_kept_the_plan(caught)
    assert image_size(tmp_path / "decorated.png") == (32, 32)


def test_downstream_tests_pass_under_pytest(tmp_path: Path) -> None:
    # A subprocess: that is how the downstream project runs them (its own pytest session).
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(EXAMPLES / "downstream_test.py"),
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(EXAMPLES.parent),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=tmp_path,
        env=one_thread_env(),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "6 passed" in done.stdout


def test_multi_gpu_runs_offline_without_a_model_argument(tmp_path: Path) -> None:
    # A subprocess, offline: with no --model the example must not reach for the Hub.
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "multi_gpu.py"), "--steps", "2", "--prompts", "2"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=tmp_path,
        env={**one_thread_env(), "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in (tmp_path / "multi-gpu-images").iterdir()) == [
        "000.png",
        "001.png",
    ]
