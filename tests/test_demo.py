"""``mps-helpers demo``: offline by default, prints the environment and the plan, saves a PNG."""

from __future__ import annotations

import subprocess
import sys
from typing import TYPE_CHECKING

import pytest
from _threads import one_thread_env

from mps_helpers import _cli
from mps_helpers._plan import DECISIONS

if TYPE_CHECKING:
    from pathlib import Path

testing = pytest.importorskip("mps_helpers.testing")
# Imported at collection, not first inside a capsys test: diffusers' log handler keeps the
# stderr it was created with, and a test's captured stderr is closed after the test.
pytest.importorskip("diffusers")
Image = pytest.importorskip("PIL.Image")
np = pytest.importorskip("numpy")


def pixels(path: Path) -> object:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def test_demo_generates_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "out" / "demo.png"
    output.parent.mkdir()
    assert _cli.main(["demo", "--output", str(output), "--steps", "2", "--prompt", "a fox"]) == 0
    out = capsys.readouterr().out
    assert pixels(output).shape == (64, 64, 3)  # type: ignore[attr-defined]  # an array
    # The environment summary, then the plan with a reason for every decision ...
    assert out.index("torch:") < out.index("Plan: ") < out.index("Generating")
    for name in DECISIONS:
        assert f"\n  {name} " in out
    # ... then what was generated, where it went and how long it took.
    assert "Generating one image for 'a fox' (2 steps)" in out
    assert f"Saved a 64x64 image to {output} (2 steps in " in out
    assert "random weights" in out
    assert "expect noise" in out.lower()


def test_default_output_is_in_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert _cli.main(["demo", "--steps", "1"]) == 0
    assert (tmp_path / "mps_helpers_demo.png").is_file()
    assert str(tmp_path / "mps_helpers_demo.png") in capsys.readouterr().out


def test_same_seed_same_image_and_options_reach_the_plan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = testing.save_tiny_pipeline(tmp_path / "tiny")
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    common = ["--steps", "2", "--seed", "3", "--attention-slicing", "on"]
    assert _cli.main(["demo", "--model", str(model), "-o", str(first), *common]) == 0
    out = capsys.readouterr().out
    assert f"Pipeline: StableDiffusionPipeline, {model}" in out
    assert "random weights" not in out
    decided = dict(line.split()[:2] for line in out.splitlines() if line.startswith("  "))
    assert decided["attention_slicing"] == "True"
    assert _cli.main(["demo", "-o", str(second), *common]) == 0
    assert (pixels(first) == pixels(second)).all()  # type: ignore[attr-defined]  # arrays


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--steps", "0"], "expected a positive integer, got '0'"),
        (["demo", "--vae-slicing", "yes"], "invalid choice: 'yes'"),
        (["demo", "--device", "gpu"], "device must be one of"),
        (["demo", "--dtype", "int8"], "dtype must be"),
    ],
)
def test_usage_errors_exit_2_before_any_work(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        _cli.main(argv)
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("usage: mps-helpers demo")
    assert message in captured.err


def test_a_device_this_machine_lacks_is_an_error_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    if torch.backends.mps.is_available():
        pytest.skip("mps is available here")
    assert _cli.main(["demo", "--device", "mps", "-o", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mps-helpers demo: error: device='mps' was asked for but cannot be used")
    assert not (tmp_path / "x.png").exists()


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("mps-helpers demo: error: ")
    return err


@pytest.mark.parametrize("parent", ["missing", "a-file"])
def test_an_output_that_cannot_be_written_is_one_line_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], parent: str
) -> None:
    (tmp_path / "a-file").write_text("", encoding="utf-8")
    output = tmp_path / parent / "x.png"
    assert _cli.main(["demo", "--output", str(output), "--steps", "1"]) == 1
    err = one_line_error(capsys)
    assert f"cannot save the image to {output}" in err
    assert "pass another --output" in err


def test_a_failed_save_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "taken.png"
    output.mkdir()  # a directory where the file should go: the check passes, the save fails
    assert _cli.main(["demo", "--output", str(output), "--steps", "1"]) == 1
    err = one_line_error(capsys)
    assert f"cannot save the image to {output}" in err


@pytest.mark.parametrize("model", ["/nonexistent/model", "./not/here", "~/no-model-here"])
def test_a_model_path_that_does_not_exist_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model: str
) -> None:
    assert _cli.main(["demo", "--model", model, "-o", str(tmp_path / "x.png")]) == 1
    err = one_line_error(capsys)
    assert f"no model at {model!r}" in err
    assert "Hub id" in err


def test_a_directory_that_is_not_a_model_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli.main(["demo", "--model", str(tmp_path), "-o", str(tmp_path / "x.png")]) == 1
    assert "model_index.json" in one_line_error(capsys)


def test_the_readmes_first_command_in_a_fresh_process(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mps_helpers", "demo", "--steps", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
        env=one_thread_env(),
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "mps_helpers_demo.png").is_file()
    assert "Plan: " in done.stdout
    assert "Traceback" not in done.stderr


NOISE = ("that should be kept in float32: []", "requires torchvision (not installed)")


def test_a_real_process_prints_no_third_party_noise(tmp_path: Path) -> None:
    # --dtype bfloat16: the cast that makes diffusers log its empty float32-modules list
    # happens on every CPU, not only on one with native bfloat16.
    command = ["demo", "--output", "tmp.png", "--steps", "1", "--dtype", "bfloat16"]
    done = subprocess.run(
        [sys.executable, "-m", "mps_helpers", *command],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
        env=one_thread_env(),
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "tmp.png").is_file()
    for line in NOISE:
        assert line not in done.stderr


def test_the_noise_filter_lets_real_warnings_through() -> None:
    import logging

    from mps_helpers._quiet import NOISE as PATTERNS
    from mps_helpers._quiet import quiet

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    tail = (
        "Casting directly with `to()` can lead to inconsistent results; set `torch_dtype` "
        "in `from_pretrained()` instead to keep these modules in float32."
    )
    empty = f"There are modules in UNet2DConditionModel that should be kept in float32: []. {tail}"
    real = f"There are modules in T5EncoderModel that should be kept in float32: ['wo']. {tail}"
    logger = logging.getLogger(PATTERNS["empty-fp32-list"][0])
    handler = Keep()
    logger.addHandler(handler)
    try:
        with quiet("empty-fp32-list"):
            logger.warning(empty)
            logger.warning(real)
            logger.warning("any other warning")
        logger.warning(empty)  # the scope has ended
    finally:
        logger.removeHandler(handler)
    assert seen == [real, "any other warning", empty]
