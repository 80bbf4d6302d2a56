"""The plan follows the known problems' ranges and the failed self-tests; explicit options win."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from machines import MACHINES
from packaging.version import Version

from mps_helpers import Plan, ProbeReport, ProbeResult
from mps_helpers._facts import PipelineFacts
from mps_helpers._options import validate_options
from mps_helpers._plan import DECISIONS, make_plan
from mps_helpers._problem_rules import probe_adjustments

SD15 = PipelineFacts(
    class_name="StableDiffusionPipeline",
    denoiser_class="UNet2DConditionModel",
    supports_attention_slicing=True,
    vae_force_upcast=True,
    weights_dtype=torch.float32,
    default_height=512,
    default_width=512,
)
SD3 = dataclasses.replace(
    SD15, denoiser_class="SD3Transformer2DModel", supports_attention_slicing=False
)
M4 = MACHINES["m4-128gb-macos15-torch-latest"]


def plan(env: Any, facts: PipelineFacts = SD15, probes: Any = (), **options: Any) -> Plan:
    return make_plan(facts, env, validate_options(**options), probes)


def failed(*names: str, device: str = "mps", elements: int = 2**24) -> ProbeReport:
    """A report in which the named probes gave wrong numbers."""
    results = tuple(
        ProbeResult(
            name=name,
            status="wrong",
            error=2.5,
            tolerance=2e-2,
            dtype="float16",
            elements=elements,
        )
        for name in names
    )
    return ProbeReport(
        device=device, torch_version="2.13.0", macos_version="15.6", chip=None, results=results
    )


def decisions(p: Plan) -> dict[str, Any]:
    return {name: getattr(p, name) for name in DECISIONS}


@pytest.mark.parametrize("name", sorted(MACHINES))
def test_ranges_change_no_decision_of_the_fake_machines(name: str) -> None:
    """No fake machine is inside a range whose rule changes a decision: only reasons move."""
    env = MACHINES[name]
    options = validate_options()
    assert decisions(make_plan(SD15, env, options)) == decisions(
        make_plan(SD15, env, options, follow=False)
    )


# ---------------------------------------------------------------------------------------
# baddbmm-beta0-nan: the attention processor's reason follows the range


def test_processor_reason_inside_the_baddbmm_range() -> None:
    inside = plan(M4, height=768, width=768)
    assert inside.rules["attention_processor"] == "attention_processor.safe-known-problem"
    reason = inside.reasons["attention_processor"]
    assert reason.startswith("mps_helpers' chunked SDPA; with torch 2.13.0")
    assert "known problem baddbmm-beta0-nan, torch before 2.14, unconfirmed" in reason


def test_processor_reason_past_the_baddbmm_fix() -> None:
    fixed = M4.replace(torch_version=Version("2.14.0"))
    past = plan(fixed, height=768, width=768)
    assert past.rules["attention_processor"] == "attention_processor.safe-past-fix"
    reason = past.reasons["attention_processor"]
    assert "torch 2.14.0 is past known problem baddbmm-beta0-nan" in reason
    assert "diffusers' own slicing would give correct images too" in reason
    assert plan(fixed, height=768, width=768).attention_processor == "safe"
    theirs = plan(fixed, height=768, width=768, attention_processor="diffusers")
    assert theirs.attention_processor == "diffusers"
    assert "correct with torch 2.14.0" in theirs.reasons["attention_processor"]
    assert theirs.rules["attention_processor"] == "attention_processor.diffusers-past-fix"


def test_asked_for_diffusers_processor_inside_the_range_is_kept_with_a_warning_reason() -> None:
    theirs = plan(M4, height=768, width=768, attention_processor="diffusers")
    assert theirs.attention_processor == "diffusers"
    assert "use attention_processor='safe'" in theirs.reasons["attention_processor"]
    assert theirs.rules["attention_processor"] == "attention_processor.diffusers-known-problem"


def test_a_failed_baddbmm_probe_beats_the_range() -> None:
    """Past the (unconfirmed) fix, a device whose baddbmm still fails keeps saying why."""
    fixed = M4.replace(torch_version=Version("2.14.0"))
    probed = plan(fixed, probes=(failed("baddbmm_beta0"),), height=768, width=768)
    assert probed.rules["attention_processor"] == "attention_processor.safe-probe"
    reason = probed.reasons["attention_processor"]
    assert "self-test baddbmm_beta0 failed on this mps" in reason
    assert "past known problem" not in reason


def test_off_mps_the_processor_reason_is_the_rules() -> None:
    cpu = MACHINES["linux-cpu"]
    rules = make_plan(SD15, cpu, validate_options(), follow=False)
    assert plan(cpu).reasons["attention_processor"] == rules.reasons["attention_processor"]
    assert plan(cpu).rules == rules.rules
    assert plan(cpu).notes == {}
    assert "known problem" not in plan(cpu).reasons["attention_processor"]


# ---------------------------------------------------------------------------------------
# SDPA layout problems: slicing turns on inside the range


@pytest.mark.parametrize(
    ("version", "problem"),
    [("2.8.0", "sdpa-noncontiguous-query"), ("2.10.1", "sdpa-permuted-batch")],
)
def test_sdpa_layout_range_turns_slicing_on(version: str, problem: str) -> None:
    env = M4.replace(torch_version=Version(version))
    assert plan(M4).attention_slicing is False  # 128 GB at 512 px: the source rule says no
    inside = plan(env)
    assert inside.attention_slicing is True
    assert inside.attention_processor == "safe"
    assert inside.attention_chunk_elements == 2**28
    assert inside.rules["attention_slicing"] == "attention_slicing.known-problem"
    reason = inside.reasons["attention_slicing"]
    assert reason.startswith(f"torch {version} on mps is in the range of known problem")
    assert problem in reason
    assert "contiguous blocks" in reason
    assert dict(inside.options) == dict(plan(M4).options)


def test_sdpa_layout_range_keeps_an_explicit_off() -> None:
    env = M4.replace(torch_version=Version("2.10.1"))
    off = plan(env, attention_slicing=False)
    assert off.attention_slicing is False
    assert "kept off as asked" in off.reasons["attention_slicing"]
    assert off.rules["attention_slicing"] == "asked"
    assert off.notes["attention_slicing"] == ("attention_slicing.note-kept-off",)


def test_sdpa_layout_range_on_a_transformer_denoiser_is_a_note() -> None:
    env = M4.replace(torch_version=Version("2.10.1"))
    sd3 = plan(env, SD3)
    assert sd3.attention_slicing is False
    assert "cannot slice attention" in sd3.reasons["attention_slicing"]
    assert sd3.notes["attention_slicing"] == ("attention_slicing.note-cannot-slice",)


def test_sdpa_layout_range_when_slicing_is_on_anyway() -> None:
    env = MACHINES["m2-16gb-macos13-torch2.0"].replace(torch_version=Version("2.10.1"))
    small = plan(env)
    assert small.attention_slicing is True
    assert "slicing is on anyway" in small.reasons["attention_slicing"]
    assert small.reasons["attention_slicing"].startswith("mps with 16 GiB")
    assert small.rules["attention_slicing"] == "attention_slicing.mps-low-ram"
    assert small.notes["attention_slicing"] == ("attention_slicing.note-on-anyway",)


# ---------------------------------------------------------------------------------------
# Failed probes


def test_an_explicit_dtype_is_kept_with_a_note() -> None:
    kept = plan(M4, probes=(failed("softmax_half"),), dtype="float16")
    assert kept.dtype == torch.float16
    assert "kept float16 as asked" in kept.reasons["dtype"]
    assert kept.notes["dtype"] == ("dtype.note-kept-asked",)
    auto = plan(M4, probes=(failed("softmax_half"),))
    assert auto.dtype == torch.float32
    assert auto.rules["dtype"] == "dtype.probe"
    assert "softmax_half" in auto.reasons["dtype"]
    assert auto.vae_dtype == torch.float32
    assert auto.nan_guard is False


def test_size_probes_bound_blocks_below_the_failure() -> None:
    bounded = plan(M4, probes=(failed("sdpa_long", elements=2**26),), height=768, width=768)
    assert bounded.attention_chunk_elements == 2**24
    assert bounded.rules["attention_chunk_elements"] == "attention_chunk_elements.probe-bound"
    assert bounded.rules["attention_slicing"] == "attention_slicing.mps-large-image"
    assert bounded.notes["attention_slicing"] == ("attention_slicing.note-on-anyway",)
    reason = bounded.reasons["attention_chunk_elements"]
    assert reason.startswith("2**24 elements per score block: self-test sdpa_long failed")
    assert "at 2**26 elements" in reason
    both = plan(
        M4,
        probes=(failed("sdpa_long", "bmm_large", elements=2**22),),
        height=768,
        width=768,
    )
    assert both.attention_chunk_elements == 2**20  # never under the plan's floor


def test_size_probe_with_the_diffusers_processor() -> None:
    theirs = plan(M4, probes=(failed("bmm_large"),), attention_processor="diffusers")
    assert theirs.attention_slicing is True
    assert theirs.attention_chunk_elements is None
    assert "no safe processor" in theirs.reasons["attention_chunk_elements"]
    assert "attention_chunk_elements.note-probe-unused" in theirs.notes["attention_chunk_elements"]


def test_layout_probe_off_mps_has_no_workaround() -> None:
    cpu = MACHINES["linux-cpu"]
    p = plan(cpu, probes=(failed("sdpa_permuted", device="cpu"),))
    assert p.attention_slicing is False
    assert "on mps only" in p.reasons["device"]
    assert "sdpa_permuted" in p.reasons["device"]
    assert p.notes["device"] == ("device.note-probes",)


def test_size_probe_on_the_cpu_slices_there() -> None:
    cpu = MACHINES["linux-cpu"]
    p = plan(cpu, probes=(failed("bmm_large", device="cpu"),))
    assert p.attention_slicing is True
    assert p.attention_chunk_elements == 2**22
    assert p.rules["attention_slicing"] == "attention_slicing.probe"
    assert p.rules["attention_chunk_elements"] == "attention_chunk_elements.probe-bound"


def test_a_report_of_another_device_is_ignored() -> None:
    assert decisions(plan(M4, probes=(failed("softmax_half", device="cpu"),))) == decisions(
        plan(M4)
    )


def test_probe_adjustments_is_pure_and_names_each_probe() -> None:
    report = failed("baddbmm_beta0", "conv3d", "softmax_half")
    first = probe_adjustments(report)
    assert first == probe_adjustments(report)
    assert [(a.probe, a.decision, a.value) for a in first] == [
        ("baddbmm_beta0", "attention_processor", "safe"),
        ("conv3d", "device", None),
        ("softmax_half", "dtype", "float32"),
    ]
    assert all(a.probe in a.reason for a in first)
    assert probe_adjustments(dataclasses.replace(report, results=())) == ()


def test_black_images_chip_is_cited_by_the_nan_guard() -> None:
    ultra = M4.replace(chip="Apple M3 Ultra")
    guarded = plan(ultra)
    assert "known problem black-images-m3ultra-m5" in guarded.reasons["nan_guard"]
    assert "checks outputs for them" in guarded.reasons["nan_guard"]
    assert guarded.notes["nan_guard"] == ("nan_guard.note-black-images",)
    off = plan(ultra, nan_guard=False)
    assert "is off, though" in off.reasons["nan_guard"]
    assert off.notes["nan_guard"] == ("nan_guard.note-black-images-off",)
    assert "black-images" not in plan(M4).reasons["nan_guard"]


def test_chunk_reason_cites_the_size_problems_on_mps() -> None:
    cited = plan(M4, height=768, width=768)
    reason = cited.reasons["attention_chunk_elements"]
    assert "known problems sdpa-large-scores (pytorch #179352" in reason
    assert "and bmm-large-output (pytorch #197636)" in reason
    assert cited.notes["attention_chunk_elements"] == (
        "attention_chunk_elements.note-large-products",
    )
    older = plan(MACHINES["m2-16gb-macos13-torch2.0"])  # before bmm-large-output's range
    assert older.notes["attention_chunk_elements"] == (
        "attention_chunk_elements.note-large-scores",
    )
