"""``mps-helpers run``: argument splitting, running as __main__, exit status, environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import TYPE_CHECKING, Any

import pytest

from mps_helpers import _cli
from mps_helpers._options import OPTIONS

if TYPE_CHECKING:
    from pathlib import Path

# Imported at collection, not first inside a capsys test: diffusers' log handler keeps the
# stderr it was created with, and a test's captured stderr is closed after the test.
pytest.importorskip("diffusers")

FALLBACK = "PYTORCH_ENABLE_MPS_FALLBACK"
WATERMARKS = ("PYTORCH_MPS_HIGH_WATERMARK_RATIO", "PYTORCH_MPS_LOW_WATERMARK_RATIO")

# A script that reports how it was run, as one JSON line, then exits as told by its argv.
REPORTER = """
import json, os, sys
print(json.dumps({
    "name": __name__,
    "argv": sys.argv,
    "path0": sys.path[0],
    "fallback": os.environ.get("PYTORCH_ENABLE_MPS_FALLBACK"),
    "watermarks": [v for v in os.environ if "WATERMARK" in v],
}))
if len(sys.argv) > 1 and sys.argv[1] == "exit":
    sys.exit(int(sys.argv[2]) if sys.argv[2].isdigit() else sys.argv[2])
if len(sys.argv) > 1 and sys.argv[1] == "raise":
    def inner():
        raise LookupError("raised by the script")
    inner()
"""


@pytest.fixture
def reporter(tmp_path: Path) -> Path:
    path = tmp_path / "scripts" / "report.py"
    path.parent.mkdir()
    path.write_text(REPORTER, encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # run sets the fallback variable in this process: monkeypatch puts it back afterwards.
    monkeypatch.delenv(FALLBACK, raising=False)
    for name in WATERMARKS:
        monkeypatch.delenv(name, raising=False)


def report_of(out: str) -> dict[str, Any]:
    line = next(line for line in out.splitlines() if line.startswith("{"))
    data: dict[str, Any] = json.loads(line)
    return data


# ---------------------------------------------------------------------------------------
# Splitting run's own options from the script's arguments


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        (["s.py"], ([], ["s.py"], None)),
        (
            ["s.py", "--device", "cpu", "-m", "x"],
            ([], ["s.py", "--device", "cpu", "-m", "x"], None),
        ),
        (["--device", "cpu", "s.py", "a"], (["--device", "cpu"], ["s.py", "a"], None)),
        (["--device=cpu", "-v", "s.py"], (["--device=cpu", "-v"], ["s.py"], None)),
        (
            ["--attention-slicing", "off", "--", "-odd.py"],
            (["--attention-slicing", "off"], ["-odd.py"], None),
        ),
        (["-m", "pkg.mod", "--device", "x"], ([], ["pkg.mod", "--device", "x"], "-m")),
        (["--vae-tiling", "on", "-mpkg", "a"], (["--vae-tiling", "on"], ["pkg", "a"], "-m")),
        (["--help"], (["--help"], [], None)),
        ([], ([], [], None)),
    ],
)
def test_split_run(tokens: list[str], expected: tuple[list[str], list[str], str | None]) -> None:
    assert _cli._split_run(tokens) == expected


# ---------------------------------------------------------------------------------------
# Running a script as __main__ (in this process: fast)


def test_script_runs_as_main_with_its_own_argv(
    reporter: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv_before, path0_before = sys.argv[:], sys.path[0]
    status = _cli.main(["run", "--attention-slicing", "off", str(reporter), "--device", "x"])
    report = report_of(capsys.readouterr().out)
    assert status == 0
    assert report["name"] == "__main__"
    # The script's arguments, even those that look like run's own options, are its own.
    assert report["argv"] == [str(reporter), "--device", "x"]
    assert report["path0"] == str(reporter.parent)  # as `python SCRIPT` sets it
    assert (sys.argv, sys.path[0]) == (argv_before, path0_before)  # put back


@pytest.mark.parametrize(
    ("args", "status", "stderr"),
    [
        (["exit", "0"], 0, ""),
        (["exit", "3"], 3, ""),
        (["exit", "a message"], 1, "a message\n"),
    ],
)
def test_exit_status_is_the_scripts(
    reporter: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    status: int,
    stderr: str,
) -> None:
    assert _cli.main(["run", str(reporter), *args]) == status
    assert capsys.readouterr().err == stderr


def test_an_exception_prints_the_scripts_traceback_and_exits_1(
    reporter: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli.main(["run", str(reporter), "raise"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):\n")
    frames = [line for line in err.splitlines() if line.lstrip().startswith("File ")]
    # It starts in the script, as `python SCRIPT` would show it: no runpy or CLI frames.
    assert str(reporter) in frames[0]
    assert all("runpy" not in f and "_cli.py" not in f for f in frames)
    assert err.rstrip().endswith("LookupError: raised by the script")


@pytest.mark.parametrize("target", ["directory", "-m"])
def test_a_target_python_cannot_start_is_one_line_not_a_runpy_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], target: str
) -> None:
    argv = [str(tmp_path)] if target == "directory" else ["-m", "no_such_module_of_h12c"]
    assert _cli.main(["run", *argv]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    expected = (
        f"can't find '__main__' module in {str(tmp_path)!r}"
        if target == "directory"
        else "No module named no_such_module_of_h12c"
    )
    assert err.startswith(f"mps-helpers run: error: {expected}: ")
    assert "pass a Python script" in err


def test_an_import_error_of_the_script_itself_keeps_its_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = tmp_path / "imports.py"
    script.write_text("import no_such_module_of_h12c\n", encoding="utf-8")
    assert _cli.main(["run", str(script)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):\n")
    assert str(script) in err


def test_module_runs_as_main(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    package = tmp_path / "somepkg"
    package.mkdir()
    (package / "__init__.py").write_text("", encoding="utf-8")
    (package / "tool.py").write_text(REPORTER, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert _cli.main(["run", "-m", "somepkg.tool", "exit", "4"]) == 4
    report = report_of(capsys.readouterr().out)
    assert report["name"] == "__main__"
    assert report["argv"] == [str(package / "tool.py"), "exit", "4"]
    assert report["path0"] == str(tmp_path)


def test_fallback_variable_is_set_before_the_scope_imports_torch(
    reporter: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mps_helpers import _auto

    seen: list[str | None] = []
    real_acquire = _auto._patches.acquire

    def acquire() -> None:  # entering the scope: the first step that imports diffusers/torch
        seen.append(os.environ.get(FALLBACK))
        real_acquire()

    monkeypatch.setattr(_auto._patches, "acquire", acquire)
    assert _cli.main(["run", str(reporter)]) == 0
    assert seen == ["1"]
    report = report_of(capsys.readouterr().out)
    assert report["fallback"] == "1"
    assert report["watermarks"] == []  # never set by the library


def test_a_fallback_value_of_the_users_is_kept(
    reporter: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(FALLBACK, "0")
    assert _cli.main(["run", str(reporter)]) == 0
    assert report_of(capsys.readouterr().out)["fallback"] == "0"


def test_pipelines_the_script_loads_come_out_prepared_with_the_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    testing = pytest.importorskip("mps_helpers.testing")
    model = testing.save_tiny_pipeline(tmp_path / "tiny")
    script = tmp_path / "load.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            from diffusers import DiffusionPipeline
            from mps_helpers import plan_of

            pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
            plan = plan_of(pipe)
            print("PLAN", plan.attention_slicing, plan.vae_tiling)
            """
        ),
        encoding="utf-8",
    )
    argv = ["run", "--attention-slicing", "on", "--vae-tiling", "on", str(script), str(model)]
    assert _cli.main(argv) == 0
    assert "PLAN True True" in capsys.readouterr().out
    from diffusers import DiffusionPipeline

    # The scope ended with the script: diffusers' own loader is back.
    loader = DiffusionPipeline.__dict__["from_pretrained"].__func__
    assert not hasattr(loader, "__mps_helpers_original__")


# ---------------------------------------------------------------------------------------
# Usage errors: exit 2 with a usage line and no traceback


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run"], "required: SCRIPT (or -m MODULE)"),
        (["run", "--device", "cpu"], "required: SCRIPT (or -m MODULE)"),
        (["run", "no/such/script.py"], "can't open file 'no/such/script.py'"),
        (["run", "-m"], "argument -m: expected one argument"),
        (["run", "--attention-slicing", "maybe", "x.py"], "invalid choice: 'maybe'"),
        (["run", "--device", "gpu", "REPORTER"], "device must be one of 'auto', 'mps'"),
        (["run", "--dtype", "float8", "REPORTER"], "dtype must be"),
        (["run", "--bogus", "REPORTER"], "unrecognized arguments"),
    ],
)
def test_usage_errors_exit_2(
    reporter: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    argv = [str(reporter) if a == "REPORTER" else a for a in argv]
    with pytest.raises(SystemExit) as exit_:
        _cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: mps-helpers run")
    assert message in err
    assert "Traceback" not in err


def test_run_help_lists_the_plan_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        _cli.main(["run", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    flags = [option.flag for option in OPTIONS if option.flag]
    assert len(flags) == 11  # every option but the size and batch ones
    for flag in flags:
        assert flag in out


# ---------------------------------------------------------------------------------------
# A real process: python -m mps_helpers run


def test_the_cli_modules_do_not_import_torch() -> None:
    code = (
        "import sys, mps_helpers._cli, mps_helpers._auto, mps_helpers._demo, mps_helpers._apply;"
        "print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "[]"


def test_python_dash_m_run_end_to_end(reporter: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != FALLBACK and "WATERMARK" not in k}
    done = subprocess.run(
        [sys.executable, "-m", "mps_helpers", "run", str(reporter), "exit", "7"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
    )
    assert done.returncode == 7, done.stderr
    report = report_of(done.stdout)
    assert report["argv"] == [str(reporter), "exit", "7"]
    assert report["fallback"] == "1"
    assert report["watermarks"] == []
    assert "Traceback" not in done.stderr
