"""Tests of the plan: every "auto" rule over every fake machine, options, Plan itself."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from machines import MACHINES, MPS_MACHINES
from packaging.version import Version

import mps_helpers
from mps_helpers import DeviceUnavailableError, Environment, Plan, plan_for
from mps_helpers._facts import PipelineFacts
from mps_helpers._plan import (
    ATTENTION_CHUNK_CAP,
    ATTENTION_CHUNK_FLOOR,
    DECISIONS,
    attention_chunk_elements,
    make_plan,
    validate_options,
)

GiB = 2**30
SNAPSHOTS = Path(__file__).parent / "snapshots"
#: Set MPS_HELPERS_UPDATE_SNAPSHOTS=1 to rewrite the stored str(plan) snapshots.
UPDATE_SNAPSHOTS = os.environ.get("MPS_HELPERS_UPDATE_SNAPSHOTS") == "1"

#: An SD 1.5-like pipeline, as facts (no weights needed for the rules).
SD15 = PipelineFacts(
    class_name="StableDiffusionPipeline",
    denoiser_class="UNet2DConditionModel",
    supports_attention_slicing=True,
    vae_force_upcast=True,
    upcasts_vae_itself=False,
    weights_dtype=torch.float32,
    default_height=512,
    default_width=512,
)
SDXL = dataclasses.replace(
    SD15,
    class_name="StableDiffusionXLPipeline",
    upcasts_vae_itself=True,
    default_height=1024,
    default_width=1024,
)
SD3 = dataclasses.replace(
    SD15,
    class_name="StableDiffusion3Pipeline",
    denoiser_class="SD3Transformer2DModel",
    supports_attention_slicing=False,
    default_height=1024,
    default_width=1024,
)
BF16_MODEL = dataclasses.replace(SD15, weights_dtype=torch.bfloat16)

ALL = pytest.mark.parametrize("name", list(MACHINES))


def plan(name: str, facts: PipelineFacts = SD15, **options: Any) -> Plan:
    """Return the plan for a fake machine and pipeline facts (the pure core of plan_for)."""
    return make_plan(facts, MACHINES[name], validate_options(**options))


def expected_device(env: Environment) -> str:
    if env.mps_available and not env.is_rosetta:
        return "mps"
    return "cuda" if env.cuda_available else "cpu"


# ---------------------------------------------------------------------------------------
# Rules over every machine


@ALL
def test_device_rule(name: str) -> None:
    env = MACHINES[name]
    result = plan(name)
    assert result.device == expected_device(env)
    if env.is_rosetta:
        assert "Rosetta" in result.reasons["device"]
        assert result.rules["device"] == "device.rosetta"
    assert name not in MPS_MACHINES or result.device == "mps"


@ALL
def test_dtype_rule(name: str) -> None:
    env = MACHINES[name]
    result = plan(name)
    if result.device == "cpu":
        # bfloat16 only where the CPU computes it natively (benchmarks: 1.76x, 0.54x memory).
        assert result.dtype == (torch.bfloat16 if env.cpu_bf16_supported else torch.float32)
        assert ("natively" if env.cpu_bf16_supported else "emulated") in result.reasons["dtype"]
        bf16 = env.cpu_bf16_supported
        assert result.rules["dtype"] == ("dtype.cpu-bfloat16" if bf16 else "dtype.cpu-float32")
    else:
        assert result.dtype == torch.float16


@ALL
def test_dtype_rule_for_bfloat16_weights(name: str) -> None:
    env = MACHINES[name]
    result = plan(name, BF16_MODEL)
    if result.device == "mps":
        supported = env.torch_version >= Version("2.3") and env.macos_version >= Version("14")
        assert result.dtype == (torch.bfloat16 if supported else torch.float16)
        assert ("macOS 14" in result.reasons["dtype"]) or result.dtype == torch.bfloat16
    elif result.device == "cuda":
        assert result.dtype == (torch.bfloat16 if env.cuda_bf16_supported else torch.float16)
    else:
        assert result.dtype == (torch.bfloat16 if env.cpu_bf16_supported else torch.float32)


def test_cpu_bfloat16_needs_native_instructions_and_yields_to_an_explicit_dtype() -> None:
    native = plan("linux-cpu-bf16")
    assert (native.dtype, native.vae_dtype) == (torch.bfloat16, torch.bfloat16)
    assert "1.76x" in native.reasons["dtype"]
    # bfloat16 cannot overflow where float32 would not, but the guard stays as for any half
    # precision (it also catches NaN from elsewhere); it is cheap on the output.
    assert native.nan_guard
    explicit = plan("linux-cpu-bf16", dtype="float32")
    assert explicit.dtype == torch.float32
    assert explicit.reasons["dtype"].startswith("asked for")
    assert not explicit.nan_guard
    emulated = plan("linux-cpu", dtype="bfloat16")
    assert emulated.dtype == torch.bfloat16
    assert "no native bfloat16" in emulated.reasons["dtype"]
    assert "no native" not in plan("linux-cpu-bf16", dtype="bfloat16").reasons["dtype"]
    assert "1,300x" in plan("linux-cpu-bf16", dtype="float16").reasons["dtype"]


def test_bfloat16_on_mps_follows_torch_and_macos() -> None:
    m3 = MACHINES["m3max-64gb-macos14"]
    assert plan("m3max-64gb-macos14", BF16_MODEL).dtype == torch.bfloat16
    older_macos = m3.replace(macos_version=Version("13.6"))
    assert make_plan(BF16_MODEL, older_macos, validate_options()).dtype == torch.float16
    older_torch = m3.replace(torch_version=Version("2.2.2"))
    assert make_plan(BF16_MODEL, older_torch, validate_options()).dtype == torch.float16


@ALL
def test_vae_dtype_rule(name: str) -> None:
    result = plan(name)
    if result.dtype == torch.float16 and result.device == "cuda":
        # On CUDA the NaN guard backs a float16 VAE (benchmarks: +55% peak for float32).
        assert result.nan_guard
        assert result.vae_dtype == torch.float16
        assert "force_upcast" in result.reasons["vae_dtype"]
        assert plan(name, nan_guard=False).vae_dtype == torch.float32
    elif result.dtype == torch.float16:
        assert result.vae_dtype == torch.float32
        assert "force_upcast" in result.reasons["vae_dtype"]
    else:
        assert result.vae_dtype == result.dtype
    # SDXL-family pipelines upcast their VAE themselves: it stays in the compute dtype.
    assert plan(name, SDXL).vae_dtype == plan(name, SDXL).dtype
    no_upcast = dataclasses.replace(SD15, vae_force_upcast=False)
    assert plan(name, no_upcast).vae_dtype == plan(name, no_upcast).dtype


@ALL
@pytest.mark.parametrize("size", [512, 768])
def test_attention_slicing_rule(name: str, size: int) -> None:
    env = MACHINES[name]
    result = plan(name, height=size, width=size)
    if result.device == "mps":
        assert env.total_memory is not None
        expected = env.total_memory < 64 * GiB or size * size > 512 * 512
    else:
        expected = False
    assert result.attention_slicing is expected
    assert (result.attention_chunk_elements is not None) is expected
    assert result.attention_slicing_supported


@ALL
def test_transformer_pipelines_never_slice_attention(name: str) -> None:
    result = plan(name, SD3, height=1024, width=1024)
    assert result.attention_slicing is False
    assert "SD3Transformer2DModel" in result.reasons["attention_slicing"]
    assert "silently does nothing" in result.reasons["attention_slicing"]
    assert result.rules["attention_slicing"] == "attention_slicing.unsupported"
    assert result.attention_chunk_elements is None
    assert result.attention_slicing_supported is False


def test_asking_to_slice_a_transformer_is_recorded_and_stays_off() -> None:
    # The plan itself is pure: it records what it ignored and does not warn.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = plan("linux-cpu", SD3, attention_slicing=True)
    assert result.attention_slicing is False
    assert result.rules["attention_slicing"] == "attention_slicing.ignored-unsupported"
    assert result.reasons["attention_slicing"].startswith("asked for, but ignored")
    assert "SD3Transformer2DModel" in result.ignored["attention_slicing"]
    assert result.to_dict()["ignored"] == dict(result.ignored)
    assert not plan("linux-cpu", SD3).ignored


def test_plan_for_warns_once_at_the_callers_line(pipes: dict[str, Any]) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = plan_for(pipes["sd3"], env=MACHINES["linux-cpu"], attention_slicing=True)
    assert [str(w.message) for w in caught] == [result.ignored["attention_slicing"]]
    assert caught[0].category is UserWarning
    assert caught[0].filename == __file__


@ALL
@pytest.mark.parametrize("batch", [None, 1, 4])
def test_vae_slicing_rule(name: str, batch: int | None) -> None:
    result = plan(name, batch_size=batch)
    # Sliced decode costs time (~4% on the H100), so only memory pressure turns it on.
    assert result.vae_slicing is (result.memory_tight and batch != 1)


@ALL
@pytest.mark.parametrize("size", [1024, 1536])
def test_vae_tiling_rule(name: str, size: int) -> None:
    result = plan(name, height=size, width=size)
    assert result.vae_tiling is (result.memory_tight and size > 1024)


@ALL
def test_memory_tight_rule(name: str) -> None:
    env = MACHINES[name]
    result = plan(name)
    if result.device == "mps" and env.total_memory is not None and env.total_memory < 64 * GiB:
        assert result.memory_tight
    if result.device != "mps":
        # 512x512, batch 1: a small share of any of these machines' memory.
        assert not result.memory_tight


def test_vae_slicing_on_cuda_follows_the_cards_memory() -> None:
    big = make_plan(SD15, MACHINES["linux-cuda"], validate_options(batch_size=4))
    assert not big.memory_tight
    assert not big.vae_slicing
    assert "~4% time" in big.reasons["vae_slicing"]
    small_card = MACHINES["linux-cuda"].replace(cuda_total_memory=6 * GiB)
    small = make_plan(SD15, small_card, validate_options(batch_size=4))
    assert small.memory_tight
    assert small.vae_slicing
    assert "4 images per call on a memory-tight machine" in small.reasons["vae_slicing"]


def test_memory_tight_off_mps_when_the_batch_is_big_for_the_memory() -> None:
    small = MACHINES["linux-cpu"].replace(available_memory=2 * GiB)
    result = make_plan(SD15, small, validate_options(batch_size=4))
    assert result.memory_tight
    assert result.vae_slicing
    assert "over the 25% share" in result.reasons["memory_tight"]
    assert result.rules["memory_tight"] == "memory_tight.decode-share"
    large = make_plan(SD15, small, validate_options(batch_size=4, height=2048, width=2048))
    assert large.vae_tiling


@ALL
def test_warmup_rule(name: str) -> None:
    env = MACHINES[name]
    result = plan(name)
    assert result.warmup is (result.device == "mps" and env.torch_version.release[:2] == (1, 13))


@ALL
def test_batch_to_loop_rule(name: str) -> None:
    result = plan(name)
    assert result.batch_to_loop is (result.device == "mps")


@ALL
def test_guard_rules(name: str) -> None:
    result = plan(name)
    assert result.nan_guard is (result.dtype != torch.float32)
    assert result.oom_retry is (result.device in ("mps", "cuda"))
    assert result.memory_watch is (result.device == "mps")


@ALL
def test_every_decision_has_a_reason_and_explicit_values_win(name: str) -> None:
    result = plan(name)
    assert set(DECISIONS) <= set(result.reasons)
    assert all(reason.strip() for reason in result.reasons.values())
    switches = {
        key: not getattr(result, key)
        for key in (
            "vae_slicing",
            "vae_tiling",
            "warmup",
            "batch_to_loop",
            "nan_guard",
            "oom_retry",
            "memory_watch",
            "attention_slicing",
        )
    }
    flipped = plan(name, device="cpu", dtype="bfloat16", **switches)
    for key, value in switches.items():
        assert getattr(flipped, key) is value
        assert flipped.reasons[key].startswith("asked for")
        assert flipped.rules[key] == "asked"
    assert flipped.device == "cpu"
    assert flipped.dtype == torch.bfloat16


def test_reasons_carry_the_evidence() -> None:
    m1 = plan("m1-8gb-macos12.6-torch1.13")
    assert "8 GiB" in m1.reasons["attention_slicing"]
    assert "64 GiB" in m1.reasons["attention_slicing"]
    assert "#363" in m1.reasons["batch_to_loop"]
    assert "1.13" in m1.reasons["warmup"]
    cuda = plan("linux-cuda")
    assert "1.8-2.7x" in cuda.reasons["attention_slicing"]
    assert m1.rules["attention_slicing"] == "attention_slicing.mps-low-ram"
    assert m1.rules["warmup"] == "warmup.torch-1.13"
    assert cuda.rules["attention_slicing"] == "attention_slicing.cuda"
    big = plan("m4-128gb-macos15-torch-latest", height=768, width=768)
    assert "768x768 is larger than 512x512" in big.reasons["attention_slicing"]
    assert big.rules["attention_slicing"] == "attention_slicing.mps-large-image"


# ---------------------------------------------------------------------------------------
# attention_chunk_elements


@ALL
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_attention_chunk_elements_bounds(name: str, dtype: torch.dtype) -> None:
    env = MACHINES[name]
    for device in ("mps", "cuda", "cpu"):
        chunk = attention_chunk_elements(env, dtype, device=device)
        assert ATTENTION_CHUNK_FLOOR <= chunk <= ATTENTION_CHUNK_CAP < 2**31
        assert chunk & (chunk - 1) == 0  # a power of two


def test_attention_chunk_elements_follows_memory_and_dtype() -> None:
    env = MACHINES["m1-8gb-macos12.6-torch1.13"]  # 3 GiB available
    fp16 = attention_chunk_elements(env, torch.float16)
    fp32 = attention_chunk_elements(env, torch.float32)
    assert fp16 == 2**27  # 3 GiB / 4 / (2 bytes x 3 blocks) = 2**27
    assert fp32 == 2**26
    tiny = env.replace(available_memory=256 * 2**20)
    assert attention_chunk_elements(tiny, torch.float16) == 2**23
    starved = env.replace(available_memory=1)
    assert attention_chunk_elements(starved, torch.float16) == ATTENTION_CHUNK_FLOOR
    unknown = env.replace(available_memory=None)
    assert attention_chunk_elements(unknown, torch.float16) == 2**26  # 2 GiB assumed
    huge = env.replace(available_memory=1024 * GiB)
    assert attention_chunk_elements(huge, torch.float16) == ATTENTION_CHUNK_CAP
    cuda = MACHINES["linux-cuda"]
    assert attention_chunk_elements(cuda, torch.float16, device="cuda") == ATTENTION_CHUNK_CAP


def test_chunk_elements_only_for_the_safe_processor() -> None:
    safe = plan("m2-16gb-macos13-torch2.0")
    assert safe.attention_chunk_elements == 2**28
    assert "2**28" in safe.reasons["attention_chunk_elements"]
    theirs = plan("m2-16gb-macos13-torch2.0", attention_processor="diffusers")
    assert theirs.attention_slicing
    assert theirs.attention_chunk_elements is None


# ---------------------------------------------------------------------------------------
# Options


BAD_OPTIONS = [
    ("device", "gpu", "'auto', 'mps', 'cuda', 'cpu'"),
    ("device", None, "'auto', 'mps', 'cuda', 'cpu'"),
    ("dtype", "float64", "torch.float16"),
    ("dtype", torch.int8, "'bfloat16'"),
    ("dtype", None, "'auto'"),
    ("attention_processor", "auto", "'safe', 'diffusers'"),
    ("attention_slicing", "yes", "'auto', True, False"),
    ("vae_slicing", 1, "'auto', True, False"),
    ("vae_tiling", None, "'auto', True, False"),
    ("warmup", "on", "'auto', True, False"),
    ("batch_to_loop", 0, "'auto', True, False"),
    ("nan_guard", "true", "'auto', True, False"),
    ("oom_retry", "off", "'auto', True, False"),
    ("memory_watch", 2, "'auto', True, False"),
    ("height", 0, "positive integer"),
    ("width", 512.0, "positive integer"),
    ("batch_size", True, "positive integer"),
]


@pytest.mark.parametrize(("option", "value", "listed"), BAD_OPTIONS)
def test_bad_options_raise_value_error_listing_valid_values(
    option: str, value: Any, listed: str
) -> None:
    with pytest.raises(ValueError, match=option) as info:
        plan_for(env=MACHINES["linux-cpu"], **{option: value})
    assert listed in str(info.value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("fp16", torch.float16),
        ("half", torch.float16),
        ("torch.float16", torch.float16),
        ("BF16", torch.bfloat16),
        ("float32", torch.float32),
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_dtype_names(value: Any, expected: torch.dtype) -> None:
    assert plan_for(env=MACHINES["linux-cpu"], dtype=value).dtype == expected


def test_bfloat16_asked_on_an_mps_that_cannot_raises() -> None:
    with pytest.raises(ValueError, match="macOS 14"):
        plan("m2-16gb-macos13-torch2.0", dtype=torch.bfloat16)


@pytest.mark.parametrize("name", ["linux-cpu", "linux-cuda", "intel-mac", "rosetta-m1", "windows"])
def test_asking_for_mps_where_it_is_unusable_raises_with_findings(name: str) -> None:
    with pytest.raises(DeviceUnavailableError, match="device='mps'") as info:
        plan_for(env=MACHINES[name], device="mps")
    findings = info.value.findings
    assert findings
    codes = {f.code for f in findings}
    if name == "rosetta-m1":
        assert "rosetta" in codes
        assert all(f.level == "error" for f in findings)
    if name in ("linux-cpu", "intel-mac", "windows"):
        assert "not-apple-silicon" in codes


def test_asking_for_mps_on_this_machine_raises_unless_it_has_mps() -> None:
    env = mps_helpers.detect_environment()
    if env.mps_available:
        assert plan_for(device="mps").device == "mps"
    else:
        with pytest.raises(DeviceUnavailableError) as info:
            plan_for(device="mps")
        assert info.value.findings


def test_asking_for_cuda_without_it_raises() -> None:
    with pytest.raises(DeviceUnavailableError, match="device='cuda'") as info:
        plan_for(env=MACHINES["m2-16gb-macos13-torch2.0"], device="cuda")
    assert "no CUDA device is usable" in str(info.value)


def test_env_none_means_this_machine() -> None:
    here = mps_helpers.detect_environment()
    assert plan_for() == plan_for(env=here)


def test_env_must_be_an_environment() -> None:
    with pytest.raises(TypeError, match="Environment"):
        plan_for(env={"system": "Darwin"})  # type: ignore[arg-type]  # wrong on purpose


def test_options_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        plan_for(None, MACHINES["linux-cpu"])  # type: ignore[misc]  # positional on purpose


# ---------------------------------------------------------------------------------------
# The Plan object


def test_plan_is_frozen_and_its_mappings_read_only() -> None:
    result = plan("m1-8gb-macos12.6-torch1.13")
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.device = "cpu"  # type: ignore[misc]  # frozen on purpose
    with pytest.raises(TypeError):
        result.reasons["device"] = "x"  # type: ignore[index]  # read-only on purpose
    with pytest.raises(TypeError):
        result.options["device"] = "x"  # type: ignore[index]  # read-only on purpose
    assert hash(result) == hash(plan("m1-8gb-macos12.6-torch1.13"))


def test_plan_to_dict_is_json_ready() -> None:
    result = plan("m1-8gb-macos12.6-torch1.13", dtype=torch.float16)
    data = result.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["dtype"] == "float16"
    assert data["vae_dtype"] == "float32"
    assert data["options"]["dtype"] == "float16"
    assert set(data["reasons"]) >= set(DECISIONS)
    assert set(data["rules"]) == set(DECISIONS)
    assert data["ignored"] == {}


def test_plan_pickles_and_copies() -> None:
    result = plan("m2-16gb-macos13-torch2.0")
    assert pickle.loads(pickle.dumps(result)) == result
    assert copy.deepcopy(result) == result
    assert copy.copy(result) == result


def test_plan_replace_for_a_stricter_plan() -> None:
    result = plan("m3max-64gb-macos14")
    assert not result.attention_slicing
    stricter = result.replace(attention_slicing=True, vae_tiling=True)
    assert stricter.attention_slicing
    assert stricter.attention_chunk_elements == 2**26
    assert "Plan.replace" in stricter.reasons["vae_tiling"]
    assert stricter.rules["vae_tiling"] == "replaced"
    assert stricter.rules["device"] == result.rules["device"]
    assert stricter.reasons["device"] == result.reasons["device"]
    explained = result.replace(vae_slicing=True, reasons={"vae_slicing": "out of memory."})
    assert explained.reasons["vae_slicing"] == "out of memory."
    assert stricter.replace(attention_slicing=False).attention_chunk_elements is None
    with pytest.raises(TypeError, match="no field"):
        result.replace(colour="blue")
    with pytest.raises(ValueError, match="cannot slice"):
        plan("m3max-64gb-macos14", SD3).replace(attention_slicing=True)


def test_plan_requires_a_reason_for_every_decision() -> None:
    result = plan("linux-cpu")
    reasons = dict(result.reasons)
    del reasons["warmup"]
    with pytest.raises(ValueError, match="warmup"):
        dataclasses.replace(result, reasons=reasons)


def test_plan_str_is_a_table_of_decisions() -> None:
    text = str(plan("m1-8gb-macos12.6-torch1.13"))
    lines = text.splitlines()
    assert lines[0] == "Plan: mps, float16, 512x512 px (the pipeline's default)"
    assert len(lines) == 1 + len(DECISIONS)
    for name, line in zip(DECISIONS, lines[1:], strict=True):
        assert line.split()[0] == name


SNAPSHOT_CASES = {
    "m1-8gb-macos12.6-torch1.13": {},
    "m3max-64gb-macos14": {"height": 768, "width": 768, "batch_size": 2},
    "rosetta-m1": {},
    "linux-cuda": {"batch_size": 4},
    "linux-cpu-bf16": {"batch_size": 2},
}


@pytest.mark.parametrize("name", list(SNAPSHOT_CASES))
def test_plan_str_snapshot(name: str) -> None:
    text = str(plan(name, **SNAPSHOT_CASES[name])) + "\n"
    path = SNAPSHOTS / f"plan-{name}.txt"
    if UPDATE_SNAPSHOTS:
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"no snapshot {path}: run with MPS_HELPERS_UPDATE_SNAPSHOTS=1"
    assert text == path.read_text(encoding="utf-8"), (
        "str(plan) changed: if deliberate, rerun with MPS_HELPERS_UPDATE_SNAPSHOTS=1"
    )


# ---------------------------------------------------------------------------------------
# plan_for with real tiny pipelines


@pytest.fixture(scope="module")
def pipes() -> dict[str, Any]:
    from mps_helpers.testing import tiny_pipeline

    return {kind: tiny_pipeline(kind) for kind in ("sd", "sdxl", "sd3")}


def test_plan_for_reads_the_pipeline(pipes: dict[str, Any]) -> None:
    m1 = MACHINES["m1-8gb-macos12.6-torch1.13"]
    sd = plan_for(pipes["sd"], env=m1)
    assert (sd.height, sd.width) == (64, 64)  # the tiny pipeline's default size
    assert sd.attention_slicing
    assert sd.vae_dtype == torch.float32  # AutoencoderKL's force_upcast
    xl = plan_for(pipes["sdxl"], env=m1)
    assert xl.vae_dtype == torch.float16
    assert "StableDiffusionXLPipeline" in xl.reasons["vae_dtype"]
    sd3 = plan_for(pipes["sd3"], env=m1, height=128, width=96)
    assert (sd3.height, sd3.width) == (128, 96)
    assert not sd3.attention_slicing
    assert "SD3Transformer2DModel" in sd3.reasons["attention_slicing"]
    bf16 = plan_for(pipes["sd3"].to(torch.bfloat16), env=MACHINES["m3max-64gb-macos14"])
    pipes["sd3"].to(torch.float32)
    assert bf16.dtype == torch.bfloat16


def test_plan_for_changes_nothing(pipes: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    pipe = pipes["sd"]
    before = {k: (v.data_ptr(), v.dtype, v.device) for k, v in pipe.unet.state_dict().items()}
    processors = dict(pipe.unet.attn_processors)

    def no_device_work(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("plan_for moved or cast a module")

    monkeypatch.setattr(torch.nn.Module, "to", no_device_work)
    plan_for(pipe, env=MACHINES["m1-8gb-macos12.6-torch1.13"], attention_slicing=True)
    monkeypatch.undo()
    after = {k: (v.data_ptr(), v.dtype, v.device) for k, v in pipe.unet.state_dict().items()}
    assert after == before
    assert dict(pipe.unet.attn_processors) == processors
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert mps_helpers.plan_of(pipe) is None


def test_plan_for_rejects_what_is_not_a_pipeline(pipes: dict[str, Any]) -> None:
    with pytest.raises(TypeError, match="UNet2DConditionModel"):
        plan_for(pipes["sd"].unet, env=MACHINES["linux-cpu"])
