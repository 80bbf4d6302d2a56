"""On the real hardware: an Apple Silicon Mac's mps device, a CUDA GPU.

Tests marked ``mac`` or ``cuda`` are collected everywhere and skipped, with the reason,
where that hardware is absent (``conftest.py``); ``pytest`` on a Mac or a CUDA machine runs
them with the rest. Each check is a function of the device, and the same checks also run
here on the CPU, so that their code is exercised on every run and only the device differs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from packaging.version import Version

import mps_helpers
from mps_helpers.testing import tiny_pipeline

GiB = 2**30
PROMPTS = ["a red cube", "a blue ball"]
SIZE = {"height": 32, "width": 32, "num_inference_steps": 2}
#: float32 on the device, the same kernels with the same shapes: no room for more.
TOLERANCE = 1e-4


def _generators(count: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(1000 + i) for i in range(count)]


def check_safe_attention_equals_the_default(device: str) -> None:
    """Chunked (row blocks of one head) safe attention against diffusers' SDPA processor."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    hidden = torch.randn(2, 1024, 64, device=device)
    context = torch.randn(2, 77, 48, device=device)
    for cross_dim, encoder_hidden_states in ((None, None), (48, context)):
        attn = Attention(query_dim=64, cross_attention_dim=cross_dim, heads=2, dim_head=32)
        attn.to(device)
        attn.set_processor(AttnProcessor2_0())
        with torch.no_grad():
            expected = attn(hidden, encoder_hidden_states=encoder_hidden_states)
        # 2**14 elements per block: 16 query rows against 1,024 keys, 64 blocks per head.
        attn.set_processor(mps_helpers.SafeSlicedAttnProcessor(chunk_elements=2**14))
        with torch.no_grad():
            got = attn(hidden, encoder_hidden_states=encoder_hidden_states)
        assert got.device.type == device
        assert bool(torch.isfinite(got).all())
        assert (got - expected).abs().max().item() <= TOLERANCE


def check_prepared_loop_equals_calls_one_by_one(pipe: Any) -> None:
    """A looped batch on the device against the same prompts called one at a time."""
    looped = pipe(PROMPTS, generator=_generators(2), output_type="np", **SIZE).images
    one_by_one = [
        pipe([prompt], generator=[generator], output_type="np", **SIZE).images[0]
        for prompt, generator in zip(PROMPTS, _generators(2), strict=True)
    ]
    assert looped.shape == (2, 32, 32, 3)
    assert np.isfinite(looped).all()
    assert np.abs(looped - np.stack(one_by_one)).max() <= TOLERANCE
    # A control: the two prompts' images differ, so equality above is not vacuous.
    assert np.abs(one_by_one[0] - one_by_one[1]).max() > 100 * TOLERANCE


def check_half_precision_plan_gives_finite_images(pipe: Any, dtype: torch.dtype) -> None:
    """The automatic plan, as a user gets it, produces finite images on the device."""
    assert pipe.unet.dtype == dtype
    images = pipe(PROMPTS, generator=_generators(2), output_type="np", **SIZE).images
    assert images.shape == (2, 32, 32, 3)
    assert np.isfinite(images).all()


#: Every check on every device; the marked ones are skipped where that device is absent.
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("mps", marks=pytest.mark.mac, id="mps"),
    pytest.param("cuda", marks=pytest.mark.cuda, id="cuda"),
]
#: The half-precision dtype each device's plan uses: bfloat16 is asked for on the CPU (the
#: tests see a CPU without native bfloat16, where the plan keeps float32).
HALF = {"cpu": ("bfloat16", torch.bfloat16), "mps": ("auto", torch.float16)}
HALF["cuda"] = HALF["mps"]


@pytest.mark.parametrize("device", DEVICES)
def test_safe_attention_equals_the_default(device: str) -> None:
    check_safe_attention_equals_the_default(device)


@pytest.mark.parametrize("device", DEVICES)
def test_a_looped_batch_equals_the_prompts_one_by_one(device: str) -> None:
    pipe = mps_helpers.prepare_pipeline(
        tiny_pipeline("sd"), device=device, dtype="float32", batch_to_loop=True
    )
    assert pipe.device.type == device
    check_prepared_loop_equals_calls_one_by_one(pipe)


@pytest.mark.parametrize("device", DEVICES)
def test_a_half_precision_plan_gives_finite_images(device: str) -> None:
    asked, dtype = HALF[device]
    pipe = mps_helpers.prepare_pipeline(tiny_pipeline("sd"), device=device, dtype=asked)
    assert pipe.device.type == device
    check_half_precision_plan_gives_finite_images(pipe, dtype)


# The machine itself ---------------------------------------------------------------------------


@pytest.mark.mac
def test_this_mac_is_detected_and_planned_for_mps() -> None:
    env = mps_helpers.detect_environment(refresh=True)
    assert env.system == "Darwin"
    assert env.is_apple_silicon
    assert env.machine == "arm64"
    assert env.python_machine == "arm64"
    assert not env.is_rosetta
    assert env.mps_built
    assert env.mps_available
    assert env.macos_version is not None
    assert env.macos_version >= Version("12.3")  # the first macOS with mps
    assert env.total_memory is not None
    assert env.total_memory > 0
    codes = {finding.code for finding in mps_helpers.check_environment(env)}
    assert not codes & {"not-apple-silicon", "rosetta", "mps-not-built", "mps-unavailable"}
    plan = mps_helpers.plan_for(env=env, height=512, width=512)
    assert plan.device == "mps"
    assert plan.dtype == torch.float16
    # The source rule: attention slicing on mps below 64 GB of RAM (at 512x512).
    assert plan.attention_slicing is (env.total_memory < 64 * GiB)


@pytest.mark.cuda
def test_this_gpu_is_planned_for_cuda_in_float16() -> None:
    env = mps_helpers.detect_environment(refresh=True)
    assert env.cuda_available
    plan = mps_helpers.plan_for(env=env, height=512, width=512, batch_size=4)
    assert plan.device == "cuda"
    assert plan.dtype == torch.float16
    # Slicing and looping cost 1.8-4x on CUDA: never automatic there.
    assert not plan.attention_slicing
    assert not plan.batch_to_loop
