"""Family-aware rules: classification, attention size, dtype, bound, upcast, video decode.

The families' facts are those of the real checkpoints' configs (not tiny ones), written
out here, so that the plans are the ones a Mac user of each family would get. One snapshot
file per family holds ``str(plan)`` on every Mac from the 8 GB M1 to the 128 GB M4.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from _tiny_transformers import tiny_flux, tiny_wan
from machines import MACHINES, MPS_MACHINES

from mps_helpers._facts import PipelineFacts, facts_of
from mps_helpers._families import (
    Decision,
    attention_shape,
    classify,
    family_plan,
    video_decode_bytes,
)
from mps_helpers._plan import (
    _device_memory,
    attention_chunk_elements,
    decode_bytes,
    make_plan,
    validate_options,
)
from mps_helpers._reasons import EVIDENCE, FAMILY_RULES, cited_evidence, template_text

SNAPSHOTS = Path(__file__).parent / "snapshots"
UPDATE = os.environ.get("MPS_HELPERS_UPDATE_SNAPSHOTS") == "1"
M4 = MACHINES["m4-128gb-macos15-torch-latest"]
BF16 = torch.bfloat16

#: The configs of each family's reference checkpoint, as PipelineFacts.
FAMILIES: dict[str, PipelineFacts] = {
    "sd15": PipelineFacts(
        class_name="StableDiffusionPipeline",
        denoiser_class="UNet2DConditionModel",
        supports_attention_slicing=True,
        vae_force_upcast=True,
        weights_dtype=torch.float32,
        default_height=512,
        default_width=512,
        denoiser_kind="unet",
        attention_heads=8,
        in_channels=4,
        vae_latent_channels=4,
        vae_spatial_compression=8,
    ),
    "sd35-large": PipelineFacts(
        class_name="StableDiffusion3Pipeline",
        denoiser_class="SD3Transformer2DModel",
        supports_attention_slicing=False,
        vae_force_upcast=False,
        weights_dtype=BF16,
        default_height=1024,
        default_width=1024,
        denoiser_kind="transformer",
        attention_heads=38,
        attention_head_dim=64,
        patch_size=2,
        in_channels=16,
        vae_latent_channels=16,
        vae_spatial_compression=8,
        stored_dtypes=("BF16",),
    ),
    "flux-dev": PipelineFacts(
        class_name="FluxPipeline",
        denoiser_class="FluxTransformer2DModel",
        supports_attention_slicing=False,
        vae_force_upcast=True,
        weights_dtype=BF16,
        default_height=1024,
        default_width=1024,
        denoiser_kind="transformer",
        attention_heads=24,
        attention_head_dim=128,
        patch_size=1,
        in_channels=64,
        vae_latent_channels=16,
        vae_spatial_compression=8,
        stored_dtypes=("BF16",),
    ),
    "flux-dev-fp8": PipelineFacts(
        class_name="FluxPipeline",
        denoiser_class="FluxTransformer2DModel",
        supports_attention_slicing=False,
        vae_force_upcast=True,
        default_height=1024,
        default_width=1024,
        denoiser_kind="transformer",
        attention_heads=24,
        attention_head_dim=128,
        patch_size=1,
        in_channels=64,
        vae_latent_channels=16,
        vae_spatial_compression=8,
        stored_dtypes=("F8_E4M3",),
    ),
    "wan21-1.3b": PipelineFacts(
        class_name="WanPipeline",
        denoiser_class="WanTransformer3DModel",
        supports_attention_slicing=False,
        vae_force_upcast=False,
        weights_dtype=BF16,
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
    "ltx-video": PipelineFacts(
        class_name="LTXPipeline",
        denoiser_class="LTXVideoTransformer3DModel",
        supports_attention_slicing=False,
        vae_force_upcast=False,
        weights_dtype=BF16,
        default_height=512,
        default_width=704,
        denoiser_kind="transformer",
        attention_heads=32,
        attention_head_dim=64,
        patch_size=1,
        patch_size_t=1,
        in_channels=128,
        vae_latent_channels=128,
        vae_spatial_compression=32,
        vae_temporal_compression=8,
        takes_frames=True,
        default_num_frames=161,
    ),
}

#: The Macs of the snapshots, smallest first.
MACS = [
    "m1-8gb-macos12.6-torch1.13",
    "m2-16gb-macos13-torch2.0",
    "m2-24gb-macos14-torch2.8",
    "m3max-64gb-macos14",
    "m4-128gb-macos15-torch-latest",
]


def plan(name: str, machine: str = "m4-128gb-macos15-torch-latest", **options: Any) -> Any:
    return make_plan(FAMILIES[name], MACHINES[machine], validate_options(**options))


def test_the_snapshot_macs_are_the_mps_machines() -> None:
    assert set(MACS) == set(MPS_MACHINES)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_plan_snapshot(name: str) -> None:
    text = "\n\n".join(f"# {mac}\n{plan(name, mac)}" for mac in MACS) + "\n"
    path = SNAPSHOTS / f"family-{name}.txt"
    if UPDATE:
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"no snapshot {path}: run with MPS_HELPERS_UPDATE_SNAPSHOTS=1"
    assert text == path.read_text(encoding="utf-8"), (
        "str(plan) changed: if deliberate, rerun with MPS_HELPERS_UPDATE_SNAPSHOTS=1"
    )


# ---------------------------------------------------------------------------------------
# Classification


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("sd15", "unet-image"),
        ("sd35-large", "transformer-image"),
        ("flux-dev", "transformer-image"),
        ("wan21-1.3b", "transformer-video"),
        ("ltx-video", "transformer-video"),
    ],
)
def test_classify(name: str, family: str) -> None:
    decision = classify(FAMILIES[name])
    assert decision.value == family
    assert decision.rule == "family.classified"


def test_classify_by_facts_not_by_name() -> None:
    # An unknown denoiser class with transformer facts and a 3-D VAE is a video transformer.
    facts = PipelineFacts(denoiser_class="SomeNewDiT", denoiser_kind="transformer")
    assert classify(facts).value == "transformer-image"
    video = PipelineFacts(denoiser_kind="unet", vae_temporal_compression=4)
    assert classify(video).value == "unet-video"
    frames = PipelineFacts(denoiser_kind="transformer", takes_frames=True)
    assert classify(frames).value == "transformer-video"
    assert classify(PipelineFacts()).value is None
    assert classify(PipelineFacts(supports_attention_slicing=True)).value == "unet-image"


def test_denoiser_kind_from_class_names() -> None:
    from mps_helpers._family_facts import _denoiser_kind

    assert _denoiser_kind(None, "UNet2DConditionModel") == "unet"
    assert _denoiser_kind(None, "HunyuanDiT2DModel") == "transformer"
    assert _denoiser_kind(None, "SanaTransformer2DModel") == "transformer"
    assert _denoiser_kind(None, "ConditionalFlowModel") is None  # "dit" inside a word
    assert _denoiser_kind(None, None) is None


def test_facts_read_from_real_tiny_pipelines() -> None:
    flux, wan = facts_of(tiny_flux()), facts_of(tiny_wan())
    assert (flux.denoiser_kind, flux.attention_heads, flux.in_channels) == ("transformer", 2, 4)
    assert flux.vae_latent_channels == 1
    assert classify(flux).value == "transformer-image"
    assert (wan.vae_temporal_compression, wan.vae_spatial_compression) == (4, 8)
    assert (wan.patch_size, wan.patch_size_t, wan.default_num_frames) == (2, 1, 81)
    assert (wan.default_height, wan.default_width) == (480, 832)  # its __call__'s defaults
    assert classify(wan).value == "transformer-video"


# ---------------------------------------------------------------------------------------
# Attention size, bound and upcast


@pytest.mark.parametrize(
    ("name", "size", "expected"),
    [
        ("flux-dev", (1024, 1024, None), (24, 4096)),  # 2 x 2 latents packed per token
        ("flux-dev", (1536, 1536, None), (24, 9216)),
        ("sd35-large", (1024, 1024, None), (38, 4096)),
        ("wan21-1.3b", (480, 832, 81), (12, 32760)),  # 21 latent frames x 30 x 52
        ("ltx-video", (512, 704, 161), (32, 21 * 16 * 22)),
        ("sd15", (512, 512, None), (8, 4096)),
    ],
)
def test_attention_shape(name: str, size: tuple[Any, ...], expected: tuple[int, int]) -> None:
    assert attention_shape(FAMILIES[name], *size) == expected


def test_attention_shape_unknown_without_size_or_heads() -> None:
    assert attention_shape(FAMILIES["flux-dev"], None, 1024, None) is None
    assert attention_shape(PipelineFacts(vae_spatial_compression=8), 512, 512, None) is None


def test_bound_on_mps_is_the_safe_processors_rule_and_off_elsewhere() -> None:
    on_mac = plan("flux-dev", height=1536, width=1536)
    assert on_mac.attention_bound == attention_chunk_elements(M4, torch.float32)
    assert "24 heads x 9,216 tokens -> 2e+09 score elements" in on_mac.reasons["attention_bound"]
    for machine in ("linux-cuda", "linux-cpu"):
        assert plan("flux-dev", machine).attention_bound is None


def test_bf16_upcast_from_3000_keys_only_when_attention_is_long() -> None:
    long = plan("flux-dev")  # 4,096 tokens at 1024 px
    assert long.dtype == BF16
    assert long.attention_upcast_from == 3000
    assert "pytorch PR #190791" in long.reasons["attention_upcast_from"]
    short = plan("flux-dev", height=512, width=512)  # 1,024 tokens
    assert short.attention_upcast_from is None
    fp16 = plan("flux-dev", dtype="float16")
    assert fp16.attention_upcast_from is None


def test_known_bf16_failure_family_runs_all_attention_in_float32() -> None:
    ltx = plan("ltx-video")
    assert ltx.dtype == BF16
    assert ltx.attention_upcast_from == 1
    assert "ComfyUI #15804" in ltx.reasons["dtype"]
    assert "#15818" in ltx.reasons["attention_upcast_from"]


def test_float8_weights_take_the_bf16_rule() -> None:
    assert plan("flux-dev-fp8").dtype == BF16
    assert plan("flux-dev-fp8", "m2-16gb-macos13-torch2.0").dtype == torch.float16
    assert "F8_E4M3" in plan("flux-dev-fp8").reasons["dtype"]
    assert plan("flux-dev-fp8", dtype="float32").dtype == torch.float32  # asked wins


# ---------------------------------------------------------------------------------------
# Video


def test_video_decode_estimate_is_three_dimensional() -> None:
    one = video_decode_bytes(480, 832, 1, 1, BF16, decode_bytes=decode_bytes)
    assert one == decode_bytes(480, 832, 1, BF16)  # the image estimate for one frame
    assert video_decode_bytes(480, 832, 81, 1, BF16, decode_bytes=decode_bytes) == 81 * one
    assert video_decode_bytes(480, 832, 81, 2, BF16, decode_bytes=decode_bytes) == 162 * one


def test_video_tiles_by_frames_and_pixels_when_tight_and_loops_clips() -> None:
    small = plan("wan21-1.3b", "m2-24gb-macos14-torch2.8")
    assert small.memory_tight
    assert small.vae_tiling
    assert "by frames" in small.reasons["vae_tiling"]
    assert "81 frames of 832x480" in small.reasons["memory_tight"]
    assert small.batch_to_loop
    assert "one prompt is one clip" in small.reasons["batch_to_loop"]
    assert small.num_frames == 81
    assert str(small).splitlines()[0].startswith("Plan: mps, bfloat16, 832x480 px x 81 frames")


def test_video_switches_asked_for_win() -> None:
    asked = plan("wan21-1.3b", "m2-24gb-macos14-torch2.8", vae_tiling=False, batch_to_loop=False)
    assert not asked.vae_tiling
    assert not asked.batch_to_loop


def test_video_off_mps_keeps_batches() -> None:
    assert not plan("wan21-1.3b", "linux-cuda").batch_to_loop


# ---------------------------------------------------------------------------------------
# Rules as data


def test_every_reason_comes_from_a_rule_with_its_fields() -> None:
    for facts in FAMILIES.values():
        for machine in (*MACS, "linux-cuda", "linux-cpu"):
            env = MACHINES[machine]
            device = "mps" if env.mps_available else ("cuda" if env.cuda_available else "cpu")
            result = family_plan(
                facts,
                env,
                device=device,
                dtype=torch.float16,
                height=facts.default_height,
                width=facts.default_width,
                batch=None,
                tight=True,
                switches={},
                available=_device_memory(env, device),
                chunk_elements=lambda dtype, env=env, device=device: attention_chunk_elements(
                    env, dtype, device=device
                ),
                decode_bytes=decode_bytes,
            )
            assert set(result.reasons) == set(result.rules)
            for field, rule in result.rules.items():
                assert rule in FAMILY_RULES, field
                assert FAMILY_RULES[rule].decision == field
                assert result.reasons[field].endswith(".")


@pytest.mark.parametrize(
    ("rule", "numbers"),
    [
        ("attention_bound.mps", ("#84039", "#179352", "#197636", "ComfyUI #14837")),
        ("attention_upcast_from.short", ("PR #190791",)),
        ("attention_upcast_from.long", ("PR #190791",)),
        ("attention_upcast_from.known-failure", ("ComfyUI #15804", "#15818")),
        ("dtype.known-bf16-failure", ("ComfyUI #15804", "#15818")),
        ("float64_rescue.mps", ("diffusers #9047", "#11315")),
        ("dtype.float8-stored", ("ComfyUI #6859", "pytorch #148420")),
        ("batch_to_loop.video", ("diffusers #363", "pytorch #84039")),
    ],
)
def test_rules_that_cite_evidence_name_it_in_their_reason(
    rule: str, numbers: tuple[str, ...]
) -> None:
    # The evidence is the registry's (mps_helpers._reasons.EVIDENCE), cited by the template.
    cited = cited_evidence(rule)
    assert cited, rule
    sources = " ".join(EVIDENCE[name].source for name in cited)
    text = template_text(rule)
    for number in numbers:
        assert number in sources
        assert number in text


def test_decision_renders_its_rule() -> None:
    decision = Decision(None, "attention_upcast_from.off-dtype", {"dtype": torch.float16})
    assert decision.reason == "attention runs in float16, not bfloat16."
