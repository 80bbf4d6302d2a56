"""Tests of the budget (mps_helpers._budget), the memory measures (mps_helpers._fit), the plan's
use of them, the warning before a call that will not fit, and ``mps-helpers fit``."""

from __future__ import annotations

import builtins
import json
import warnings
from pathlib import Path
from typing import Any

import architectures as arch
import pytest
from headers import GARBAGE, save_headers
from machines import MACHINES
from packaging.version import Version

import mps_helpers
from mps_helpers import MemoryFitWarning, _cli, load_pipeline, plan_for, plan_of, prepare_pipeline
from mps_helpers._budget import LiveMemory, memory_budget, recommended_working_set
from mps_helpers._facts import facts_of_directory
from mps_helpers._fit import FIT_SHARE, MemoryInputs, check_fit
from mps_helpers._machines import MACHINE_PROFILES, machine_profile
from mps_helpers._memory import spec_of_directory
from mps_helpers._plan import make_plan, validate_options
from mps_helpers.testing import tiny_pipeline

GiB = 2**30
MEASURES = (
    "attention_slicing",
    "vae_slicing",
    "vae_tiling",
    "batch_to_loop",
    "release_text_encoders",
)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        name: save_headers(arch.build(name, "meta"), root / name)
        for name in ("sd15", "sdxl", "flux")
    }


def _plan(
    directory: Path,
    machine: str,
    size: int,
    batch: int,
    *,
    live: LiveMemory | None = None,
    **options: Any,
) -> Any:
    env = machine_profile(machine)
    validated = validate_options(height=size, width=size, batch_size=batch, **options)
    memory = MemoryInputs(spec_of_directory(directory), live)
    return make_plan(facts_of_directory(directory), env, validated, memory=memory)


# ---------------------------------------------------------------------------------------
# The budget


def test_the_working_set_rule() -> None:
    assert recommended_working_set(8 * GiB) == pytest.approx(5461.33 * 2**20, rel=1e-4)
    assert recommended_working_set(16 * GiB) == pytest.approx(10.667 * GiB, rel=1e-3)
    assert recommended_working_set(32 * GiB) == pytest.approx(21.333 * GiB, rel=1e-3)
    assert recommended_working_set(64 * GiB) == 48 * GiB
    assert recommended_working_set(128 * GiB) == 96 * GiB


def test_mps_budget_from_the_working_set_less_what_is_allocated() -> None:
    env = machine_profile("m2-16gb")
    assert memory_budget(env, "mps").usable == recommended_working_set(16 * GiB)
    live = LiveMemory(mps_recommended=11 * GiB, mps_allocated=3 * GiB)
    budget = memory_budget(env, "mps", live=live)
    assert budget.usable == 8 * GiB
    assert "recommended_max_memory" in budget.source
    assert "less 3.0 GiB allocated" in budget.source
    # the planned pipeline's own weights already there are not "someone else's" memory
    assert memory_budget(env, "mps", live=live, resident=2 * GiB).usable == 10 * GiB


def test_mps_budget_before_torch_2_5_is_the_available_ram() -> None:
    old = MACHINES["m2-16gb-macos13-torch2.0"]
    budget = memory_budget(old, "mps")
    assert budget.usable == old.available_memory == 9 * GiB
    assert "torch 2.0.1 has no recommended working set" in budget.source
    assert memory_budget(old.replace(available_memory=None), "mps").usable is None


def test_cuda_and_cpu_budgets() -> None:
    cuda = MACHINES["linux-cuda"]
    assert memory_budget(cuda, "cuda").usable == int(80 * GiB * 0.9)
    live = memory_budget(cuda, "cuda", live=LiveMemory(cuda_free=70 * GiB), resident=GiB)
    assert live.usable == 71 * GiB
    assert "free memory" in live.source
    cpu = MACHINES["linux-cpu"]
    assert memory_budget(cpu, "cpu").usable == 22 * GiB
    assert "22.0 GiB usable on cpu" in str(memory_budget(cpu, "cpu"))


def test_machine_profiles() -> None:
    assert {"m1-8gb", "m2-16gb", "m3-max-64gb", "m4-max-128gb"} <= set(MACHINE_PROFILES)
    mac = machine_profile("m3-max-64gb")
    assert mac.mps_available
    assert mac.total_memory == 64 * GiB
    assert machine_profile("rtx4090-24gb").cuda_total_memory == 24 * GiB
    with pytest.raises(ValueError, match="m1-8gb, m2-16gb"):
        machine_profile("m9-1tb")


# ---------------------------------------------------------------------------------------
# When each measure turns on: fake 8, 16, 32 and 64 GB Macs (macOS 15, torch 2.13)

# (model, size, batch) -> {machine: (tight, fits, measures the estimate turned on)}
# The mps rules of the plan keep attention slicing (under 64 GB, or over 512 px) and the
# loop of prompts on; what the estimate adds is listed.
CASES: dict[tuple[str, int, int], dict[str, tuple[bool, bool, tuple[str, ...]]]] = {
    ("sd15", 512, 1): {
        "m1-8gb": (False, True, ()),
        "m2-16gb": (False, True, ()),
        "m2-pro-32gb": (False, True, ()),
        "m3-max-64gb": (False, True, ()),
    },
    # SD 1.5 at 1024 px: the float32 VAE decode needs 4.4 GiB beside 2 GiB of weights
    ("sd15", 1024, 1): {
        "m1-8gb": (True, True, ("vae_tiling",)),
        "m2-16gb": (False, True, ()),
        "m2-pro-32gb": (False, True, ()),
        "m3-max-64gb": (False, True, ()),
    },
    # SDXL at 1024 px: 6.5 GiB of weights, 4.4 GiB more to decode in float32
    ("sdxl", 1024, 1): {
        "m1-8gb": (True, False, ("release_text_encoders",)),
        "m2-16gb": (True, True, ("release_text_encoders",)),
        "m2-pro-32gb": (False, True, ()),
        "m3-max-64gb": (False, True, ()),
    },
    # Flux: 31 GiB of bfloat16 weights
    ("flux", 1024, 1): {
        "m1-8gb": (True, False, ("release_text_encoders",)),
        "m2-16gb": (True, False, ("release_text_encoders",)),
        "m2-pro-32gb": (True, False, ("release_text_encoders",)),
        "m3-max-64gb": (False, True, ()),
    },
}


@pytest.mark.parametrize("case", list(CASES), ids=lambda c: f"{c[0]}-{c[1]}px-b{c[2]}")
@pytest.mark.parametrize("machine", ["m1-8gb", "m2-16gb", "m2-pro-32gb", "m3-max-64gb"])
def test_when_each_measure_turns_on(dirs: dict, case: tuple, machine: str) -> None:
    name, size, batch = case
    plan = _plan(dirs[name], machine, size, batch)
    tight, fits, turned_on = CASES[case][machine]
    why = plan.reasons["memory_tight"]
    assert plan.memory_tight is tight, why
    assert why.startswith("tight" if tight else "not tight"), why
    assert ("nothing makes it fit" in why) is (not fits), why
    assert "predicted" in why
    assert "GiB usable" in why
    assert "working set" in why
    for measure in turned_on:
        assert getattr(plan, measure), measure
        assert plan.reasons[measure].startswith("on for memory: "), plan.reasons[measure]
    for measure in set(MEASURES) - set(turned_on) - {"attention_slicing", "batch_to_loop"}:
        assert not getattr(plan, measure), (measure, plan.reasons[measure])
    assert plan.batch_to_loop  # the mps rule
    verdict = check_fit(MemoryInputs(spec_of_directory(dirs[name])), plan, machine_profile(machine))
    assert verdict is not None
    assert verdict[0] is fits, verdict[1]


def test_the_reason_carries_the_figures(dirs: dict) -> None:
    plan = _plan(dirs["sdxl"], "m2-16gb", 1024, 1)
    assert plan.reasons["memory_tight"] == (
        "tight: predicted 10.9 GiB peak (VAE decode) of 9.6 GiB usable (90% of 10.7 GiB: "
        "Metal's working set, 2/3 of 16 GB): releasing the text encoders brings it to 9.3 GiB."
    )
    assert plan.rules["memory_tight"] == "memory_tight.estimate-measures"
    assert plan.rules["release_text_encoders"] == "release_text_encoders.estimate-on"
    assert plan.reasons["release_text_encoders"] == (
        "on for memory: releasing the text encoders takes the predicted peak from 10.9 GiB "
        "(VAE decode) to 9.3 GiB (VAE decode), against 9.6 GiB usable; a released text "
        "encoder reloads quickly from the page cache (SD 1.5's CLIP ViT-L/14 in float16: 12 ms)."
    )
    assert plan.reasons["vae_tiling"].startswith("off: not needed")
    # the attention bound stays the mps rule's, with its own reason
    assert plan.attention_slicing
    assert "source rule" in plan.reasons["attention_slicing"]


def test_on_a_gpu_slicing_then_looping(dirs: dict) -> None:
    # SDXL, 1024 px, 4 images on a 24 GB card: the float32 decode of 4 images is 16 GiB
    plan = _plan(dirs["sdxl"], "rtx4090-24gb", 1024, 4)
    assert plan.memory_tight
    assert plan.vae_slicing
    assert not plan.batch_to_loop
    assert not plan.release_text_encoders
    assert "VAE slicing brings it to" in plan.reasons["memory_tight"]
    flux = _plan(dirs["flux"], "rtx4090-24gb", 1024, 4)
    assert flux.memory_tight
    assert "nothing makes it fit" in flux.reasons["memory_tight"]
    assert flux.vae_slicing
    assert flux.batch_to_loop
    assert not _plan(dirs["sdxl"], "h100-80gb", 1024, 4).memory_tight


def test_measures_the_user_forced_are_kept(dirs: dict) -> None:
    plan = _plan(dirs["sdxl"], "rtx4090-24gb", 1024, 4, vae_slicing=False)
    assert not plan.vae_slicing
    assert plan.reasons["vae_slicing"] == "asked for (False)."
    assert plan.batch_to_loop  # the next measure takes over
    assert "looping the prompts" in plan.reasons["memory_tight"]
    forced = _plan(dirs["sd15"], "m2-16gb", 512, 1, vae_tiling=True)
    assert forced.vae_tiling
    assert forced.reasons["vae_tiling"] == "asked for (True)."


def test_smaller_attention_bounds_when_the_first_is_not_enough(dirs: dict) -> None:
    # SD 1.5 at 2048 px on a 16 GB Mac where other work holds 7 GiB: the 2**28-element
    # blocks (0.5 GiB each in float16) leave the peak at 4.2 GiB, over 3.3 GiB usable
    held = LiveMemory(mps_allocated=7 * GiB)
    plan = _plan(dirs["sd15"], "m2-16gb", 2048, 1, live=held)
    assert plan.attention_slicing
    assert plan.attention_chunk_elements is not None
    assert plan.attention_chunk_elements < 2**28
    assert "the attention bound 2**" in plan.reasons["memory_tight"]


def test_release_needs_a_directory_to_reload_from(dirs: dict) -> None:
    spec = spec_of_directory(dirs["sdxl"])
    memory = MemoryInputs(type(spec)(**{**spec.__dict__, "directory": None}))
    plan = make_plan(
        facts_of_directory(dirs["sdxl"]),
        machine_profile("m2-16gb"),
        validate_options(height=1024, width=1024),
        memory=memory,
    )
    assert not plan.release_text_encoders
    assert "nothing makes it fit" in plan.reasons["memory_tight"]


def test_no_estimate_without_a_pipeline_or_a_size() -> None:
    env = machine_profile("m2-16gb")
    plan = plan_for(env=env, height=1024, width=1024)
    assert not plan.reasons["memory_tight"].startswith(("tight", "not tight"))
    assert plan.reasons["release_text_encoders"].startswith("off: no memory estimate")
    assert (
        plan_for(tiny_pipeline("sd"), env=env)
        .reasons["memory_tight"]
        .startswith("not tight: predicted")
    )
    cuda = plan_for(env=MACHINES["linux-cuda"], height=64, width=64)
    assert "only on unified memory" in cuda.reasons["release_text_encoders"]


def test_the_fit_share() -> None:
    assert FIT_SHARE == 0.9


# ---------------------------------------------------------------------------------------
# Before the first call: prepare_pipeline and load_pipeline say so


STARVED = MACHINES["linux-cpu"].replace(available_memory=4 * 2**20)


def test_prepare_pipeline_warns_when_it_will_not_fit() -> None:
    pipe = tiny_pipeline("sd")
    with pytest.warns(MemoryFitWarning, match=r"will not fit: 64x64, batch 1: predicted .* of"):
        prepare_pipeline(pipe, env=STARVED)
    assert plan_of(pipe) is not None


def test_strict_mode_refuses_before_anything_changes() -> None:
    pipe = tiny_pipeline("sd")
    cls = type(pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MemoryFitWarning)
        with pytest.raises(MemoryFitWarning, match="will not fit"):
            prepare_pipeline(pipe, env=STARVED)
    assert type(pipe) is cls
    assert plan_of(pipe) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", MemoryFitWarning)
        prepare_pipeline(pipe, env=MACHINES["linux-cpu"])  # fits: no warning


def test_load_pipeline_says_so_before_loading(dirs: dict) -> None:
    # the directory's weight files hold headers and garbage: loading them would fail
    with warnings.catch_warnings():
        warnings.simplefilter("error", MemoryFitWarning)
        with pytest.raises(MemoryFitWarning, match=r"1024x1024, batch 1: predicted 3\d\.\d GiB"):
            load_pipeline(dirs["flux"], env=machine_profile("m2-16gb"), height=1024, width=1024)


# ---------------------------------------------------------------------------------------
# mps-helpers fit


def test_fit_prints_the_table_and_the_plan(dirs: dict, capsys: pytest.CaptureFixture) -> None:
    argv = ["fit", str(dirs["sdxl"]), "--height", "1024", "--width", "1024", "--machine", "m2-16gb"]
    assert _cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "Machine: m2-16gb (Mac mini M2, 16 GB)" in out
    for line in (
        "unet               4.8 GiB",
        "text encoding",
        "denoiser step",
        "VAE decode",
        "peak: 9.3 GiB (VAE decode)",
        "Plan on mps, float16:",
    ):
        assert line in out
    assert "release_text_encoders     True" in out
    assert out.rstrip().splitlines()[-1].startswith("Fits: 1024x1024, batch 1: predicted 9.3")


def test_fit_says_when_nothing_fits(dirs: dict, capsys: pytest.CaptureFixture) -> None:
    argv = [
        "fit",
        str(dirs["flux"]),
        "--height",
        "1024",
        "--width",
        "1024",
        "--batch",
        "2",
        "--machine",
        "m1-8gb",
        "--json",
    ]
    assert _cli.main(argv) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] is False
    assert data["estimate"]["batch_size"] == 2
    assert data["estimate"]["weights"]["transformer"] == 11_901_408_320 * 2
    assert data["plan"]["memory_tight"] is True


def test_fit_reads_no_weight(
    dirs: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import safetensors
    import safetensors.torch
    import torch

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a weight loader was called")

    for module, name in (
        (safetensors, "safe_open"),
        (safetensors.torch, "load_file"),
        (safetensors.torch, "load"),
        (torch, "load"),
    ):
        monkeypatch.setattr(module, name, refuse)
    read: list[bytes] = []
    real_open = builtins.open

    class Spy:
        def __init__(self, handle: Any) -> None:
            self.handle = handle

        def read(self, *args: Any) -> Any:
            data = self.handle.read(*args)
            if isinstance(data, bytes):
                read.append(data)
            return data

        def __getattr__(self, name: str) -> Any:
            return getattr(self.handle, name)

        def __enter__(self) -> Spy:
            return self

        def __exit__(self, *exc: object) -> None:
            self.handle.close()

    def spy_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_open(file, mode, *args, **kwargs)
        return Spy(handle) if "b" in mode and str(file).endswith(".safetensors") else handle

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(Path, "open", lambda self, mode="r", *a, **k: spy_open(self, mode))
    argv = [
        "fit",
        str(dirs["sdxl"]),
        "--height",
        "512",
        "--width",
        "512",
        "--machine",
        "m3-max-64gb",
    ]
    assert _cli.main(argv) == 0
    assert read, "no header was read"
    assert not any(GARBAGE in chunk for chunk in read)  # nothing past any header
    assert "Fits:" in capsys.readouterr().out


def test_fit_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert _cli.main(["fit", str(tmp_path), "--height", "512", "--width", "512"]) == 2
    assert "model_index.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        _cli.main(["fit", str(tmp_path), "--height", "512", "--width", "512", "--machine", "x"])
    assert exit_.value.code == 2
    with pytest.raises(SystemExit):
        _cli.main(["fit", str(tmp_path), "--width", "512"])


def test_fit_on_this_machine(dirs: dict, capsys: pytest.CaptureFixture) -> None:
    assert _cli.main(["fit", str(dirs["sd15"]), "--height", "64", "--width", "64"]) == 0
    assert "Machine: this machine" in capsys.readouterr().out


def test_estimate_memory_is_public() -> None:
    assert mps_helpers.estimate_memory.__module__ == "mps_helpers._memory"
    assert Version(mps_helpers.__version__)


def test_live_readings_never_start_a_device() -> None:
    import torch

    from mps_helpers._budget import read_live_memory

    initialised = torch.cuda.is_initialized()
    live = read_live_memory()
    assert torch.cuda.is_initialized() is initialised
    if not torch.backends.mps.is_available():
        assert live.mps_recommended is None
        assert live.mps_allocated is None
    if not initialised:
        assert live.cuda_free is None
