"""Tests of the reasons as data: every rule reachable, no figure typed into a template, and
the reason fixes a new user asked for; the plan's warnings come once, at the user's line."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import re
import warnings
from typing import TYPE_CHECKING, Any

import pytest
import torch
from machines import MACHINES
from packaging.version import Version

import mps_helpers
from mps_helpers import DeviceUnavailableError, ProbeReport, ProbeResult, check_environment
from mps_helpers._facts import PipelineFacts
from mps_helpers._known_problems import KNOWN_PROBLEMS
from mps_helpers._options import validate_options
from mps_helpers._plan import DECISIONS, Plan, _show, make_plan
from mps_helpers._problem_rules import FOLLOWED_PROBLEMS, LAYOUT_PROBLEMS
from mps_helpers._reasons import (
    CONSTANTS,
    EVIDENCE,
    PHRASES,
    RULES,
    SLICING_RAM_THRESHOLD,
    cited_evidence,
    reason,
    template_fields,
    template_text,
)
from mps_helpers._util import GiB

if TYPE_CHECKING:
    from pathlib import Path

    from mps_helpers import Environment

SD15 = PipelineFacts(
    class_name="StableDiffusionPipeline",
    denoiser_class="UNet2DConditionModel",
    supports_attention_slicing=True,
    vae_force_upcast=True,
    weights_dtype=torch.float32,
    default_height=512,
    default_width=512,
)
FACTS = {
    "sd15": SD15,
    "sdxl": dataclasses.replace(SD15, upcasts_vae_itself=True, class_name="SDXL"),
    "sd3": dataclasses.replace(SD15, denoiser_class="SD3", supports_attention_slicing=False),
    "bf16": dataclasses.replace(SD15, weights_dtype=torch.bfloat16),
    "no-upcast": dataclasses.replace(SD15, vae_force_upcast=False),
    "unknown": PipelineFacts(),
    # the transformer and video families (mps_helpers._families)
    "flux": PipelineFacts(
        class_name="FluxPipeline",
        denoiser_class="FluxTransformer2DModel",
        supports_attention_slicing=False,
        vae_force_upcast=False,
        weights_dtype=torch.bfloat16,
        default_height=1024,
        default_width=1024,
        denoiser_kind="transformer",
        attention_heads=24,
        attention_head_dim=128,
        patch_size=1,
        in_channels=64,
        vae_latent_channels=16,
        vae_spatial_compression=8,
    ),
    "wan": PipelineFacts(
        class_name="WanPipeline",
        denoiser_class="WanTransformer3DModel",
        supports_attention_slicing=False,
        vae_force_upcast=False,
        weights_dtype=torch.bfloat16,
        default_height=480,
        default_width=832,
        denoiser_kind="transformer",
        attention_heads=12,
        attention_head_dim=128,
        patch_size=2,
        patch_size_t=1,
        in_channels=16,
        vae_latent_channels=16,
        vae_spatial_compression=8,
        vae_temporal_compression=4,
        takes_frames=True,
        default_num_frames=81,
    ),
}
FACTS["flux-fp8"] = dataclasses.replace(FACTS["flux"], stored_dtypes=("F8_E4M3",))
FACTS["ltx"] = dataclasses.replace(FACTS["wan"], denoiser_class="LTXVideoTransformer3DModel")
FACTS["wan-short"] = dataclasses.replace(FACTS["wan"], default_num_frames=5)
OPTIONS: list[dict[str, Any]] = [
    {},
    {"batch_size": 1},
    {"batch_size": 4},
    {"height": 768, "width": 768},
    {"height": 1536, "width": 1536},
    {"height": 2048, "width": 2048, "batch_size": 4},
    {"nan_guard": False},
    {"attention_slicing": True},
    {"attention_slicing": True, "attention_processor": "diffusers"},
    {"attention_processor": "diffusers"},
    {"device": "cpu", "dtype": "float16"},
    {"device": "cpu", "dtype": "bfloat16"},
    {"vae_tiling": True, "warmup": False},
]


def machines() -> dict[str, Environment]:
    """The fake machines, and variants of them for the rules' rarer branches."""
    out = dict(MACHINES)
    m2 = MACHINES["m2-16gb-macos13-torch2.0"]
    out["m2-ram-unknown"] = m2.replace(total_memory=None)
    out["m2-available-unknown"] = m2.replace(available_memory=None)
    out["m3-available-unknown"] = MACHINES["m3max-64gb-macos14"].replace(available_memory=None)
    out["m2-mps-not-built"] = m2.replace(mps_built=False, mps_available=False)
    out["m2-mps-unusable"] = m2.replace(mps_available=False)
    out["cuda-small-card"] = MACHINES["linux-cuda"].replace(cuda_total_memory=6 * GiB)
    out["cuda-memory-unknown"] = MACHINES["linux-cuda"].replace(cuda_total_memory=None)
    out["rosetta-with-cuda"] = MACHINES["rosetta-m1"].replace(cuda_available=True)
    out["m2-mps-unusable-cuda"] = m2.replace(mps_available=False, cuda_available=True)
    out["cpu-tiny"] = MACHINES["linux-cpu"].replace(available_memory=GiB)
    # inside and past the known problems' ranges (mps_helpers._problem_rules)
    m4 = MACHINES["m4-128gb-macos15-torch-latest"]
    out["m4-torch-2.8"] = m4.replace(torch_version=Version("2.8.0"))
    out["m4-torch-2.14"] = m4.replace(torch_version=Version("2.14.0"))
    out["m3-ultra"] = m4.replace(chip="Apple M3 Ultra")
    return out


def failed(*names: str, device: str = "mps", elements: int = 2**24, **result: Any) -> ProbeReport:
    """A report in which the named self-tests failed (wrong numbers unless ``result`` says)."""
    fields: dict[str, Any] = {"status": "wrong", "error": 2.5, "tolerance": 2e-2, **result}
    return ProbeReport(
        device=device,
        torch_version="2.13.0",
        macos_version="15.6",
        chip=None,
        results=tuple(
            ProbeResult(name=name, dtype="float16", elements=elements, **fields) for name in names
        ),
    )


#: Failed self-tests, with the machines and options that reach each of their rules.
PROBED: list[tuple[str, ProbeReport, dict[str, Any]]] = [
    ("m4-128gb-macos15-torch-latest", failed("baddbmm_beta0", "softmax_half", "conv3d"), {}),
    ("m4-torch-2.14", failed("baddbmm_beta0"), {"attention_processor": "diffusers"}),
    ("m4-128gb-macos15-torch-latest", failed("softmax_half"), {"dtype": "float16"}),
    ("m4-128gb-macos15-torch-latest", failed("bmm_large", status="error"), {}),
    (
        "m4-128gb-macos15-torch-latest",
        failed("sdpa_long", error=None),
        {"attention_processor": "diffusers"},
    ),
    ("linux-cpu", failed("sdpa_permuted", "softmax_half", "baddbmm_beta0", device="cpu"), {}),
    ("m4-torch-2.8", failed(), {"attention_slicing": False}),
]


def all_plans() -> list[Plan]:
    plans = []
    for env, facts, options in itertools.product(machines().values(), FACTS.values(), OPTIONS):
        try:
            plans.append(make_plan(facts, env, validate_options(**options)))
        except ValueError:  # bfloat16 asked on an mps that cannot run it
            continue
    return plans


def probed_plans() -> list[Plan]:
    envs = machines()
    return [
        make_plan(SD15, envs[name], validate_options(**options), (report,))
        for name, report, options in PROBED
    ]


PLANS = all_plans()
PROBE_PLANS = probed_plans()

#: The memory estimate's rules (mps_helpers._fit), each reached on a fake named machine by
#: (model, machine profile, size, batch, GiB that other work holds on mps).
MEMORY_CASES: list[tuple[str, str, int, int, int]] = [
    ("sd15", "m1-8gb", 512, 1, 0),  # fits: every measure off
    ("sd15", "m1-8gb", 512, 4, 0),  # fits, batch: VAE slicing off too
    ("sd15", "m1-8gb", 1024, 1, 0),  # VAE tiling makes it fit
    ("sd15", "m1-8gb", 1024, 4, 0),  # the measures before VAE slicing... not needed
    ("sd15", "m1-8gb", 512, 1, 7),  # nothing makes it fit; the encoders released
    ("sd15", "m2-16gb", 2048, 1, 7),  # a smaller attention bound
    ("sd15", "rtx4090-24gb", 512, 1, 0),  # CUDA: attention bound off, it fits
    ("sd15", "rtx4090-24gb", 512, 4, 0),
    ("sd15", "rtx4090-24gb", 2048, 4, 0),  # VAE slicing on, the rest not needed
    ("flux", "rtx4090-24gb", 512, 4, 0),  # looping the prompts
]


@pytest.fixture(scope="module")
def memory_plans(tmp_path_factory: pytest.TempPathFactory) -> list[Plan]:
    import architectures as arch
    from headers import save_headers

    from mps_helpers._budget import LiveMemory
    from mps_helpers._facts import facts_of_directory
    from mps_helpers._fit import MemoryInputs
    from mps_helpers._machines import machine_profile
    from mps_helpers._memory import spec_of_directory

    root = tmp_path_factory.mktemp("memory-rules")
    dirs = {name: save_headers(arch.build(name, "meta"), root / name) for name in ("sd15", "flux")}
    plans = []
    for name, machine, size, batch, held in MEMORY_CASES:
        live = LiveMemory(mps_allocated=held * GiB) if held else None
        memory = MemoryInputs(spec_of_directory(dirs[name]), live)
        options = validate_options(height=size, width=size, batch_size=batch)
        facts = facts_of_directory(dirs[name])
        plans.append(make_plan(facts, machine_profile(machine), options, memory=memory))
    return plans


def test_every_rule_is_reachable_from_some_fake_machine(memory_plans: list[Plan]) -> None:
    plans = [*PLANS, *PROBE_PLANS, *memory_plans]
    reached = {rule for plan in plans for rule in plan.rules.values()}
    reached |= {note for plan in plans for notes in plan.notes.values() for note in notes}
    # Plan.replace's rules are reached through it (next test), not by the plan's rules.
    assert reached == set(RULES) - {"replaced", "stricter"}


def test_replace_and_the_stricter_plan_have_their_rules() -> None:
    from mps_helpers._plan import stricter_plan

    plan = make_plan(SD15, MACHINES["m3max-64gb-macos14"], validate_options())
    assert plan.replace(vae_tiling=True).rules["vae_tiling"] == "replaced"
    stricter = stricter_plan(plan)
    assert stricter is not None
    assert stricter.rules["vae_slicing"] == "stricter"
    assert stricter.reasons["vae_slicing"] == reason("stricter")
    explained = plan.replace(vae_slicing=True, reasons={"vae_slicing": "out of memory."})
    assert explained.rules["vae_slicing"] == "replaced"


def test_every_decision_of_every_plan_names_a_rule_of_that_decision() -> None:
    for plan in [*PLANS, *PROBE_PLANS]:
        assert set(plan.rules) == set(DECISIONS)
        for name, rule in plan.rules.items():
            assert RULES[rule].decision in ("", name)
            assert ".note-" not in rule
        for name, notes in plan.notes.items():
            assert all(RULES[note].decision == name and ".note-" in note for note in notes)
            for note in notes:  # each note's sentence is in the reason
                start = RULES[note].template.split("{")[0].strip()[:20].lower()
                assert start in plan.reasons[name].lower()


def test_every_template_formats_from_known_names() -> None:
    for rule_id in RULES:
        text = template_text(rule_id)
        assert "{" not in text
        assert "}" not in text
        assert not template_fields(rule_id) & (set(CONSTANTS) | set(EVIDENCE))
    for phrase_id in PHRASES:
        assert phrase_id in {f"fallback-{d}" for d in ("cuda", "cpu")} | {
            "memory-seen",
            "memory-unknown",
            "unused-slicing-off",
            "unused-no",
            *(f"known-{problem}" for problem in LAYOUT_PROBLEMS),
            *(f"probe-{kind}" for kind in ("wrong", "nonfinite", "raised")),
            *(f"probe-{kind}" for kind in ("baddbmm", "layout", "layout-off-mps", "size")),
            *(f"probe-{kind}" for kind in ("size-bound", "half", "none")),
            *(f"estimate-{kind}" for kind in ("unknown", "within", "split")),
        }


def test_every_piece_of_evidence_is_cited() -> None:
    cited = {e for rule_id in [*RULES, *PHRASES] for e in cited_evidence(rule_id)}
    # Each known problem is evidence; those the plan follows are cited by its reasons, the
    # others (no plan decision helps) by doctor only.
    doctor_only = {p.id for p in KNOWN_PROBLEMS} - set(FOLLOWED_PROBLEMS)
    assert doctor_only == {
        "conv3d-ncdhw-macos26",
        "conv3d-channels-last",
        "conv2d-noncontiguous-weight",
        "non-blocking-copy",
    }
    assert cited == set(EVIDENCE) - doctor_only
    for problem in KNOWN_PROBLEMS:
        assert EVIDENCE[problem.id].source == ", ".join(problem.sources)
        assert EVIDENCE[problem.id].figure == problem.where()
    for item in EVIDENCE.values():
        assert item.claim
        assert item.source


#: Words with digits that are names, not figures.
NAMES_WITH_DIGITS = {
    "float16",
    "float32",
    "bfloat16",
    "fp16",
    "arm64",
    "AVX512-BF16",
    "A1111's",
    "float64",
    "float8",
    "float32's",
    "3-D",
    *(problem.id for problem in KNOWN_PROBLEMS),
}


@pytest.mark.parametrize("rule_id", list(RULES))
def test_templates_type_no_figures(rule_id: str) -> None:
    # A threshold or a measurement in a reason comes from the constants or the evidence:
    # the template itself holds no number (so the two cannot disagree).
    rule = RULES[rule_id]
    for text in (rule.template, rule.warning or ""):
        words = re.sub(r"\{[^}]*\}", " ", text).split()
        figures = [
            w for w in words if re.search(r"\d", w) and w.strip(".,;:()") not in NAMES_WITH_DIGITS
        ]
        assert figures == [], f"{rule_id} types {figures}"


def test_reasons_follow_the_constants() -> None:
    text = reason("memory_tight.mps-low-ram", {"ram": 8 * GiB})
    assert f"under the source rule's {SLICING_RAM_THRESHOLD // GiB} GiB" in text
    assert "8 GiB" in text
    finding = next(
        f
        for f in check_environment(MACHINES["m1-8gb-macos12.6-torch1.13"])
        if f.code == "low-memory"
    )
    assert f"under {SLICING_RAM_THRESHOLD // GiB} GiB" in finding.message


def test_the_evidence_cites_docs_pages_and_issues_not_internal_files() -> None:
    for item in EVIDENCE.values():
        assert "EVIDENCE" not in item.source
        assert "/work/" not in item.source


# ---------------------------------------------------------------------------------------
# The reason fixes a new user asked for


def test_no_reason_repeats_its_value_as_a_label() -> None:
    # `run -v` logs "name = value: reason": a reason starting "safe:" read "safe: safe:".
    for plan in PLANS:
        for name in DECISIONS:
            value = _show(getattr(plan, name)).lower()
            assert not plan.reasons[name].lower().startswith(f"{value}:"), (name, plan.rules)


def test_the_verbose_log_says_each_value_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="mps_helpers._plan"):
        make_plan(SD15, MACHINES["m1-8gb-macos12.6-torch1.13"], validate_options())
    line = next(r.getMessage() for r in caplog.records if "attention_processor" in r.getMessage())
    assert "safe: safe:" not in line
    assert line.startswith("plan: attention_processor = safe: mps_helpers' chunked SDPA")


def test_the_cpu_is_described_with_the_same_figure_everywhere() -> None:
    figure = EVIDENCE["cpu_sd15"].figure
    finding = next(
        f for f in check_environment(MACHINES["linux-cpu"]) if f.code == "not-apple-silicon"
    )
    assert "minutes" not in finding.message
    assert figure in finding.message
    assert "36.1 s per image" in finding.message
    cpu = make_plan(SD15, MACHINES["linux-cpu-bf16"], validate_options())
    assert figure in cpu.reasons["dtype"]


def test_the_memory_watch_reason_does_not_prescribe_one_spelling() -> None:
    cpu = make_plan(SD15, MACHINES["linux-cpu"], validate_options())
    text = cpu.reasons["memory_watch"]
    assert "True" not in text
    assert "opt in with" not in text


def test_an_explicit_cuda_without_cuda_says_so_without_promising_a_fallback() -> None:
    with pytest.raises(DeviceUnavailableError, match="device='cuda'") as info:
        mps_helpers.plan_for(env=MACHINES["linux-cpu"], device="cuda")
    message = str(info.value)
    assert "CUDA" in message
    assert "CPU-only build" in message  # torch 2.13.0+cpu
    assert "Apple Silicon" not in message
    assert "will use" not in message
    assert "mps" not in message
    assert [f.code for f in info.value.findings] == ["cuda-unavailable"]
    assert info.value.findings[0].fix


def test_demo_with_an_unusable_cuda_reports_cuda(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from mps_helpers import _cli, _environment

    monkeypatch.setattr(_environment, "detect_environment", lambda **kw: MACHINES["linux-cpu"])
    status = _cli.main(["demo", "--device", "cuda", "--output", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert status == 1
    assert "no CUDA device is usable" in err
    assert "Not an Apple Silicon Mac" not in err
    assert "will use the CPU" not in err


# ---------------------------------------------------------------------------------------
# The plan is pure; the entry points warn once, at the user's line


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mps_helpers.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("sd3"), "sd3")


QUIET: dict[str, Any] = {
    "env": MACHINES["linux-cpu"],
    "device": "cpu",
    "batch_to_loop": False,
    "nan_guard": False,
}


def _one_warning(caught: list[warnings.WarningMessage]) -> warnings.WarningMessage:
    ours = [w for w in caught if "attention_slicing=True ignored" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert ours[0].category is UserWarning
    assert "SD3Transformer2DModel" in str(ours[0].message)
    return ours[0]


def test_load_pipeline_warns_once_at_the_users_line(sd3_dir: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = mps_helpers.load_pipeline(sd3_dir, attention_slicing=True, **QUIET)
    assert _one_warning(caught).filename == __file__
    plan = mps_helpers.plan_of(pipe)
    assert plan is not None
    assert plan.rules["attention_slicing"] == "attention_slicing.ignored-unsupported"


def test_prepare_pipeline_warns_once_at_the_users_line() -> None:
    from mps_helpers.testing import tiny_pipeline

    pipe = tiny_pipeline("sd3")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mps_helpers.prepare_pipeline(pipe, attention_slicing=True, **QUIET)
    assert _one_warning(caught).filename == __file__


def test_auto_prepare_warns_once_at_the_users_line(sd3_dir: Path) -> None:
    from diffusers import DiffusionPipeline

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with mps_helpers.auto_prepare(attention_slicing=True, **QUIET):
            pipe = DiffusionPipeline.from_pretrained(sd3_dir)
    assert _one_warning(caught).filename == __file__
    assert mps_helpers.plan_of(pipe) is not None
