"""Device self-tests: clean runs pass, every emulated mps bug is caught and the plan responds."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from _emulations import EMULATIONS, emulate
from machines import MACHINES
from packaging.version import Version

import mps_helpers
from mps_helpers import DeviceUnavailableError, ProbeReport, ProbeResult, plan_for, probe_device
from mps_helpers._known_problems import KNOWN_PROBLEMS, PROBE_RESPONSES
from mps_helpers._plan import DECISIONS
from mps_helpers._problem_rules import probe_adjustments
from mps_helpers._selftest import (
    CACHE_ENV,
    CACHE_FORMAT,
    PROBES,
    cached_reports,
    load_report,
    report_path,
    save_report,
    user_cache_dir,
)

#: A 128 GB Mac at 512 px: no slicing and float16 by default, so every response shows.
BIG_MAC = MACHINES["m4-128gb-macos15-torch-latest"]


@pytest.fixture(scope="module")
def clean_cpu() -> ProbeReport:
    return probe_device("cpu", cache=False)


def as_mps(report: ProbeReport) -> ProbeReport:
    """The same results, filed as an mps report of the 128 GB Mac (the CPU stands in)."""
    return dataclasses.replace(
        report,
        device="mps",
        torch_version=str(BIG_MAC.torch_version),
        macos_version=str(BIG_MAC.macos_version),
        chip=BIG_MAC.chip,
    )


# ---------------------------------------------------------------------------------------
# Clean runs


def test_every_probe_passes_on_the_cpu_quickly(clean_cpu: ProbeReport) -> None:
    assert [r.name for r in clean_cpu.results] == list(PROBES)
    assert clean_cpu.passed, clean_cpu.summary()
    assert clean_cpu.seconds < 10, f"probes took {clean_cpu.seconds:.1f} s"
    for result in clean_cpu.results:
        assert result.error is not None
        assert 0 <= result.error <= result.tolerance
        assert result.dtype == ("float16" if result.name.endswith("_half") else "float32")


def test_float16_run_passes_on_the_cpu_too() -> None:
    report = probe_device("cpu", dtype="float16", probes=["sdpa_permuted", "baddbmm_beta0"])
    assert report.passed, report.summary()
    assert {r.dtype for r in report.results} == {"float16"}


def test_report_names_the_machine(clean_cpu: ProbeReport) -> None:
    env = mps_helpers.detect_environment()
    assert clean_cpu.key == ("cpu", str(env.torch_version), None, None)
    assert "Self-tests on cpu" in clean_cpu.summary()
    assert "10 passed, 0 wrong, 0 raised" in clean_cpu.summary()


@pytest.mark.mac
def test_every_probe_passes_on_a_real_mac() -> None:
    report = probe_device("mps", cache=False)
    assert report.device == "mps"
    assert report.passed, report.summary()
    assert report.seconds < 30


@pytest.mark.cuda
def test_every_probe_passes_on_cuda() -> None:
    report = probe_device("cuda", cache=False)
    assert report.passed, report.summary()


# ---------------------------------------------------------------------------------------
# Emulated bugs: caught by their probe, and the plan responds


@pytest.mark.parametrize("name", list(EMULATIONS))
def test_emulated_bug_is_caught_by_its_probe(name: str) -> None:
    with emulate(name) as emulation:
        report = probe_device("cpu", cache=False)
    result = report.result(emulation.probe)
    assert result is not None
    assert result.status == "wrong", report.summary()
    assert result.error is not None
    assert result.error > 10 * result.tolerance


def test_every_known_problem_with_a_probe_has_an_emulation() -> None:
    emulated = {e.name for e in EMULATIONS.values()}
    for problem in KNOWN_PROBLEMS:
        if problem.probes and problem.id != "black-images-m3ultra-m5":
            assert problem.id in emulated, problem.id
    assert {e.probe for e in EMULATIONS.values()} == set(PROBES)


#: What the plan of the 128 GB Mac (SD 1.5, 512 px) must do when each emulated bug fails.
RESPONSES: dict[str, dict[str, Any]] = {
    "baddbmm-beta0-nan": {"attention_processor": "safe"},
    "sdpa-noncontiguous-query": {"attention_slicing": True},
    "sdpa-permuted-batch": {"attention_slicing": True},
    "sdpa-large-scores": {"attention_slicing": True, "attention_chunk_elements": 2**24},
    "bmm-large-output": {"attention_slicing": True, "attention_chunk_elements": 2**22},
    "conv3d-ncdhw-macos26": {},
    "conv3d-channels-last": {},
    "conv2d-noncontiguous-weight": {},
    "group-norm-half": {"dtype": torch.float32, "nan_guard": False},
    "upsample-half": {"dtype": torch.float32, "nan_guard": False},
    "softmax-half": {"dtype": torch.float32, "nan_guard": False},
}


def test_responses_cover_every_emulation() -> None:
    assert set(RESPONSES) == set(EMULATIONS)


@pytest.mark.parametrize("name", list(EMULATIONS))
def test_plan_responds_to_the_emulated_bug(name: str) -> None:
    with emulate(name) as emulation:
        report = as_mps(probe_device("cpu", cache=False))
    before = plan_for(env=BIG_MAC, height=512, width=512, probes=None)
    after = plan_for(env=BIG_MAC, height=512, width=512, probes=report)
    expected = RESPONSES[name]
    for decision, value in expected.items():
        assert getattr(after, decision) == value, (decision, after.reasons[decision])
    changed = {
        d
        for d in DECISIONS
        if getattr(after, d) != getattr(before, d) or after.reasons[d] != before.reasons[d]
    }
    # Every changed decision that the probe drives names it; a probe without a workaround
    # leaves the decisions alone and names itself in the device reason.
    driven = [d for d in expected if d != "nan_guard"] or ["device"]
    for decision in driven:
        assert emulation.probe in after.reasons[decision], (decision, after.reasons[decision])
        assert decision in changed
    if not expected:
        assert {d: getattr(after, d) for d in DECISIONS} == {
            d: getattr(before, d) for d in DECISIONS
        }
        assert "no automatic workaround" in after.reasons["device"]
    assert dict(after.options) == dict(before.options)


def test_documented_responses_match_the_adjustments(clean_cpu: ProbeReport) -> None:
    for name in PROBES:
        results = tuple(
            dataclasses.replace(r, status="wrong", error=1.0) if r.name == name else r
            for r in clean_cpu.results
        )
        adjustments = probe_adjustments(dataclasses.replace(clean_cpu, results=results))
        assert adjustments, name
        assert all(a.probe == name for a in adjustments)
        decisions = {a.decision for a in adjustments}
        # Probes the doctor says have a workaround change a decision; the others only note.
        assert (decisions != {"device"}) == (PROBE_RESPONSES[name] is not None), name


def test_a_probe_that_raises_is_an_error_result(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)\nmore text")

    monkeypatch.setattr(torch, "bmm", broken)
    report = probe_device("cpu", probes=["bmm_large", "conv3d"], cache=False)
    result = report.result("bmm_large")
    assert result is not None
    assert result.status == "error"
    assert result.error is None
    assert result.message == "RuntimeError: MPS backend out of memory (MPS allocated: 1 GB)"
    assert result.elements == 2**24  # a size probe that raises still bounds the blocks
    assert report.result("conv3d").passed  # type: ignore[union-attr]
    assert "[ERROR] bmm_large: raised RuntimeError" in report.summary()
    adjustments = probe_adjustments(as_mps(report))
    assert {a.decision for a in adjustments} == {"attention_slicing", "attention_chunk_elements"}


# ---------------------------------------------------------------------------------------
# The safe processor is the workaround: check it against the emulated bugs


def _permuted(batch: int, length: int, heads: int, dim: int = 64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(batch * length + heads)
    return torch.randn(batch, length, heads, dim, generator=gen).transpose(1, 2)


def test_safe_processor_blocks_are_contiguous_where_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    from mps_helpers import _attention

    q, k, v = _permuted(4, 64, 2), _permuted(4, 64, 2), _permuted(4, 64, 2)
    right = _attention._chunked_attention(q, k, v, None, scale=0.125, chunk_elements=2**20)
    with emulate("sdpa-permuted-batch"):
        wrong = _attention._chunked_attention(q, k, v, None, scale=0.125, chunk_elements=2**20)
        # On mps (here: the CPU standing in) each block goes to SDPA as contiguous copies.
        monkeypatch.setattr(_attention, "CONTIGUOUS_DEVICES", frozenset({"mps", "cpu"}))
        fixed = _attention._chunked_attention(q, k, v, None, scale=0.125, chunk_elements=2**20)
    assert not torch.allclose(wrong, right, atol=1e-3)
    torch.testing.assert_close(fixed, right)


def test_smaller_blocks_avoid_the_emulated_size_limit() -> None:
    from mps_helpers._attention import _chunked_attention

    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 4, 4096, 40, generator=gen) for _ in range(3))
    right = _chunked_attention(q, k, v, None, scale=40**-0.5, chunk_elements=2**28)
    with emulate("sdpa-large-scores"):
        wrong = _chunked_attention(q, k, v, None, scale=40**-0.5, chunk_elements=2**28)
        bounded = _chunked_attention(q, k, v, None, scale=40**-0.5, chunk_elements=2**24)
    assert not torch.allclose(wrong, right, atol=1e-3)
    torch.testing.assert_close(bounded, right)


# ---------------------------------------------------------------------------------------
# Results and reports


def test_results_are_frozen_and_round_trip(clean_cpu: ProbeReport) -> None:
    result = dataclasses.replace(clean_cpu.results[0], status="wrong", error=math.inf)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.status = "pass"  # type: ignore[misc]
    data = json.loads(json.dumps(result.to_dict()))
    assert data["error"] == "inf"
    assert ProbeResult.from_dict(data) == result
    report = dataclasses.replace(clean_cpu, results=(result, *clean_cpu.results[1:]))
    again = ProbeReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert again == report
    assert again.failed == (result,)
    assert not again.passed


def test_from_dict_rejects_other_formats_and_statuses(clean_cpu: ProbeReport) -> None:
    data = clean_cpu.to_dict()
    with pytest.raises(ValueError, match="format"):
        ProbeReport.from_dict({**data, "format": CACHE_FORMAT + 1})
    with pytest.raises(ValueError, match="status"):
        ProbeResult.from_dict({**data["results"][0], "status": "maybe"})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"device": "gpu"}, "device must be one of 'auto', 'mps', 'cuda', 'cpu'"),
        ({"device": "cpu", "dtype": "int8"}, "dtype must be"),
        ({"device": "cpu", "probes": ["sdpa", "conv3d"]}, "probes must be names from"),
        ({"device": "cpu", "probes": []}, "at least one"),
    ],
)
def test_probe_device_rejects_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        probe_device(**kwargs)


def test_probe_device_rejects_an_unavailable_device() -> None:
    linux = MACHINES["linux-cpu"]
    with pytest.raises(DeviceUnavailableError, match="mps is not usable"):
        probe_device("mps", env=linux, cache=False)
    with pytest.raises(DeviceUnavailableError, match="CUDA is not usable"):
        probe_device("cuda", env=linux, cache=False)
    with pytest.raises(TypeError, match="Environment"):
        probe_device("cpu", env="linux", cache=False)  # type: ignore[arg-type]


def test_auto_device_is_the_plans() -> None:
    report = probe_device(probes=["softmax_half"], env=MACHINES["linux-cpu"], cache=False)
    assert report.device == "cpu"
    assert report.torch_version == "2.13.0+cpu"


# ---------------------------------------------------------------------------------------
# The cache


@pytest.mark.parametrize(
    ("system", "environ", "expected"),
    [
        ("Darwin", {}, "/Users/ada/Library/Caches/mps_helpers"),
        ("Darwin", {"XDG_CACHE_HOME": "/x"}, "/Users/ada/Library/Caches/mps_helpers"),
        ("Linux", {}, "/Users/ada/.cache/mps_helpers"),
        ("Linux", {"XDG_CACHE_HOME": "/var/cache/ada"}, "/var/cache/ada/mps_helpers"),
        ("Linux", {"XDG_CACHE_HOME": "relative"}, "/Users/ada/.cache/mps_helpers"),
        ("Windows", {"LOCALAPPDATA": "/c/Local"}, "/c/Local/mps_helpers/Cache"),
        ("Windows", {}, "/Users/ada/AppData/Local/mps_helpers/Cache"),
        ("Darwin", {CACHE_ENV: "/tmp/mine"}, "/tmp/mine"),
    ],
)
def test_user_cache_dir_follows_the_os(system: str, environ: dict[str, str], expected: str) -> None:
    assert user_cache_dir(system, environ, Path("/Users/ada")).as_posix() == expected


def test_cache_round_trip_is_keyed_by_machine(clean_cpu: ProbeReport, tmp_path: Path) -> None:
    report = as_mps(clean_cpu)
    path = save_report(report, tmp_path)
    assert path == report_path(tmp_path, *report.key)
    assert path is not None
    assert path.parent == tmp_path / "probes"
    assert cached_reports(BIG_MAC, tmp_path) == (report,)
    newer_torch = BIG_MAC.replace(torch_version=Version("2.14.0"))
    updated_macos = BIG_MAC.replace(macos_version=Version("15.7"))
    assert cached_reports(newer_torch, tmp_path) == ()
    assert cached_reports(updated_macos, tmp_path) == ()
    assert not list(tmp_path.rglob("*.tmp"))


def test_broken_cache_files_are_ignored(clean_cpu: ProbeReport, tmp_path: Path) -> None:
    report = as_mps(clean_cpu)
    path = report_path(tmp_path, *report.key)
    path.parent.mkdir(parents=True)
    path.write_text("{not json", encoding="utf-8")
    assert load_report(path) is None
    path.write_text(json.dumps({**report.to_dict(), "format": 99}), encoding="utf-8")
    assert cached_reports(BIG_MAC, tmp_path) == ()
    # A file whose content names another machine does not count for this one.
    other = dataclasses.replace(report, chip="Apple M1")
    path.write_text(json.dumps(other.to_dict()), encoding="utf-8")
    assert cached_reports(BIG_MAC, tmp_path) == ()


def test_an_unwritable_cache_is_not_an_error(clean_cpu: ProbeReport, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("", encoding="utf-8")
    assert save_report(clean_cpu, blocker) is None


def test_probe_device_caches_for_the_plan(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    with emulate("softmax-half"):
        start = time.perf_counter()
        report = probe_device("cpu", probes=["softmax_half"])
        assert time.perf_counter() - start < 10
    env = mps_helpers.detect_environment()
    assert cached_reports(env) == (report,)
    # The CPU plan is float32 already: the failed half-precision probe is noted, not acted on.
    cpu_plan = plan_for(env=env, height=64, width=64, device="cpu")
    assert cpu_plan.dtype == torch.float32
    assert "softmax_half" in cpu_plan.reasons["dtype"]
    assert "softmax_half" not in plan_for(env=env, device="cpu", probes=None).reasons["dtype"]


def test_plan_for_reads_the_cache_only_for_the_same_machine(
    clean_cpu: ProbeReport, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    with emulate("sdpa-permuted-batch"):
        failed = as_mps(probe_device("cpu", probes=["sdpa_permuted"], cache=False))
    save_report(failed)
    assert plan_for(env=BIG_MAC, height=512, width=512).attention_slicing is True
    assert plan_for(env=BIG_MAC, height=512, width=512, probes=None).attention_slicing is False
    other_mac = BIG_MAC.replace(chip="Apple M4 Pro")
    assert plan_for(env=other_mac, height=512, width=512).attention_slicing is False
    with pytest.raises(TypeError, match="probes must be"):
        plan_for(env=BIG_MAC, probes="yes")


def test_prepare_pipeline_follows_cached_results(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from mps_helpers import plan_of, prepare_pipeline
    from mps_helpers.testing import tiny_pipeline

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    with emulate("sdpa-large-scores"):
        probe_device("cpu", probes=["sdpa_long"])
    pipe = prepare_pipeline(tiny_pipeline("sd"), device="cpu")
    plan = plan_of(pipe)
    assert plan is not None
    assert plan.attention_slicing is True
    assert plan.attention_chunk_elements == 2**24
    assert "sdpa_long" in plan.reasons["attention_slicing"]
    processors = {type(p).__name__ for p in pipe.unet.attn_processors.values()}
    assert processors == {"SafeSlicedAttnProcessor"}
