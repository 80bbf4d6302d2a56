"""The float64 rescue (call time) and the cast of weights the device cannot compute (apply time).

mps' float64 failure is emulated on the CPU (``_emulation.no_float64``): a float64 tensor
made on the device raises mps' own TypeError.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from _emulation import MPS_FLOAT8, MPS_FLOAT64, no_float8, no_float64
from _tiny_transformers import tiny_flux
from machines import MACHINES

from mps_helpers import plan_for, prepare_pipeline
from mps_helpers._apply import apply_plan
from mps_helpers._dtype_rescue import Float64Rescue, cast_uncomputable, uncomputable_dtypes
from mps_helpers.testing import tiny_pipeline

CPU = MACHINES["linux-cpu"]
F64, F32 = torch.float64, torch.float32

REQUESTS: dict[str, Any] = {
    "factory dtype=": lambda: torch.arange(4, dtype=F64),
    "factory with device": lambda: torch.linspace(0, 1, 5, dtype=F64, device="cpu"),
    "x.double()": lambda: torch.ones(3).double(),
    "x.to(float64)": lambda: torch.ones(3).to(F64),
    "x.to(dtype=float64)": lambda: torch.ones(3).to(dtype=F64),
    "x.type(float64)": lambda: torch.ones(3).type(F64),
    "int to float64": lambda: torch.ones(2, dtype=torch.int64).to(F64),
    "float64 array moved": lambda: torch.from_numpy(np.ones(3)).to("cpu"),
    "tensor(float64 array, device=)": lambda: torch.tensor(np.ones(3), device="cpu"),
}


#: Requests the CPU emulation can see: in it the CPU is the device, so the two arrivals of
#: float64 data from the CPU are no-ops there (on a Mac they are the failing copy to mps).
MADE_ON_DEVICE = [name for name in REQUESTS if "array" not in name]


@pytest.mark.parametrize("name", MADE_ON_DEVICE)
def test_the_emulation_fails_each_request_as_mps_does(name: str) -> None:
    with no_float64(), pytest.raises(TypeError) as info:
        REQUESTS[name]()
    assert str(info.value) == MPS_FLOAT64


@pytest.mark.parametrize("name", list(REQUESTS))
def test_float64_requests_on_the_device_become_float32(name: str) -> None:
    with Float64Rescue("cpu") as rescue, no_float64():
        result = REQUESTS[name]()
    assert result.dtype == F32
    assert rescue.rewrites == 1
    assert torch.equal(result, REQUESTS[name]().to(F32))


@pytest.mark.parametrize("name", list(REQUESTS))
def test_other_devices_keep_their_float64(name: str) -> None:
    with Float64Rescue("mps") as rescue:
        result = REQUESTS[name]()
    assert result.dtype == F64
    assert rescue.rewrites == 0


def test_other_dtypes_and_conversions_pass_untouched() -> None:
    with Float64Rescue("cpu") as rescue:
        half = torch.ones(3, dtype=torch.float16).to(F32)
        ints = torch.arange(3)
        moved = torch.ones(3).to("cpu", F32)
    assert (half.dtype, ints.dtype, moved.dtype) == (F32, torch.int64, F32)
    assert rescue.rewrites == 0


def test_ltx2_rope_in_float64_is_rescued_to_diffusers_own_float32_path() -> None:
    from diffusers.models.transformers.transformer_ltx2 import LTX2AudioVideoRotaryPosEmbed

    rope = LTX2AudioVideoRotaryPosEmbed(dim=32, num_attention_heads=2)  # double_precision
    coords = rope.prepare_video_coords(1, 3, 4, 4, torch.device("cpu"))
    with no_float64(), pytest.raises(TypeError, match="float64"):
        rope(coords)
    with Float64Rescue("cpu") as rescue, no_float64():
        cos, sin = rope(coords)
    single = LTX2AudioVideoRotaryPosEmbed(dim=32, num_attention_heads=2, double_precision=False)
    ref_cos, ref_sin = single(coords)
    assert rescue.rewrites >= 1
    assert torch.equal(cos, ref_cos)
    assert torch.equal(sin, ref_sin)


# ---------------------------------------------------------------------------------------
# Tiny Flux: its RoPE is float64 off mps (maybe_adjust_dtype_for_device)


def run(pipe: Any) -> Any:
    return pipe(
        "a red fox",
        height=32,
        width=32,
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images


@pytest.fixture(scope="module")
def flux() -> tuple[Any, Any]:
    pipe = tiny_flux()
    return pipe, run(pipe)


def test_flux_fails_under_the_float64_emulation(flux: Any) -> None:
    pipe, _ = flux
    with no_float64(), pytest.raises(TypeError) as info:
        run(pipe)
    assert str(info.value) == MPS_FLOAT64


def test_prepared_flux_runs_with_the_rescue_and_equals_the_float64_run(flux: Any) -> None:
    pipe, reference = flux
    plan = plan_for(pipe, env=CPU, device="cpu", nan_guard=False, oom_retry=False)
    prepared = apply_plan(pipe, plan.replace(float64_rescue=True))
    with no_float64():
        out = run(prepared)
    assert np.isfinite(out).all()
    assert abs(out - reference).max() <= 1e-5


def test_mps_plans_turn_the_rescue_on_and_say_why() -> None:
    plan = plan_for(env=MACHINES["m4-128gb-macos15-torch-latest"])
    assert plan.float64_rescue
    assert "diffusers #9047" in plan.reasons["float64_rescue"]
    assert not plan_for(env=CPU).float64_rescue


# ---------------------------------------------------------------------------------------
# Weights the device cannot compute, cast at apply time


def mps_plan(dtype: torch.dtype = torch.float16, vae_dtype: torch.dtype | None = None) -> Any:
    return SimpleNamespace(device="mps", dtype=dtype, vae_dtype=vae_dtype or dtype)


def test_float64_and_float8_weights_are_cast_before_the_move() -> None:
    pipe = tiny_pipeline("sd")
    pipe.unet.conv_in.weight.data = pipe.unet.conv_in.weight.data.to(torch.float8_e4m3fn)
    pipe.unet.register_buffer("table", torch.arange(3, dtype=F64))
    pipe.vae.post_quant_conv.bias.data = pipe.vae.post_quant_conv.bias.data.double()
    done = cast_uncomputable(pipe, mps_plan(torch.bfloat16, F32))
    assert done == {
        "unet": "float64 -> bfloat16, float8_e4m3fn -> bfloat16",
        "vae": "float64 -> float32",
    }
    assert pipe.unet.conv_in.weight.dtype == torch.bfloat16
    assert pipe.unet.table.dtype == torch.bfloat16
    assert pipe.vae.post_quant_conv.bias.dtype == F32
    assert cast_uncomputable(pipe, mps_plan()) == {}


def test_off_mps_only_float8_is_cast() -> None:
    assert torch.float64 not in uncomputable_dtypes("cpu")
    assert torch.float8_e5m2 in uncomputable_dtypes("cuda")
    assert {torch.float64, torch.float8_e4m3fn} <= uncomputable_dtypes("mps")


def test_a_quantized_component_fails_before_anything_changes() -> None:
    pipe = tiny_pipeline("sd")
    pipe.vae.post_quant_conv.bias.data = pipe.vae.post_quant_conv.bias.data.double()
    pipe.unet.conv_in.weight.data = pipe.unet.conv_in.weight.data.to(torch.float8_e4m3fn)
    pipe.unet.is_quantized = True
    with pytest.raises(
        ValueError, match=r"the unet component \(UNet2DConditionModel\) is quantized"
    ):
        cast_uncomputable(pipe, mps_plan())
    assert pipe.vae.post_quant_conv.bias.dtype == F64  # nothing cast


def sd3(pipe: Any) -> Any:
    return pipe(
        "a", num_inference_steps=1, output_type="np", generator=torch.Generator().manual_seed(0)
    ).images


def test_prepare_pipeline_runs_a_pipeline_holding_float8_weights() -> None:
    pipe = tiny_pipeline("sd3")
    # The reference: float8 values held in float32 (parameters and buffers, as .to casts).
    for tensor in [*pipe.transformer.parameters(), *pipe.transformer.buffers()]:
        tensor.data = tensor.data.to(torch.float8_e4m3fn).to(F32)
    reference = sd3(pipe)
    pipe.transformer.to(torch.float8_e4m3fn)
    with no_float8(), pytest.raises(TypeError, match=MPS_FLOAT8[:30]):
        sd3(pipe)
    prepared = prepare_pipeline(pipe, env=CPU, device="cpu", nan_guard=False)
    assert prepared.transformer.dtype == F32
    with no_float8():
        out = sd3(prepared)
    assert np.isfinite(out).all()
    assert abs(out - reference).max() <= 1e-6
