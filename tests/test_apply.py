"""Tests of applying a plan to real tiny pipelines on the CPU.

The mps plans are emulated here with ``device="cpu"`` and explicit switches.
"""

from __future__ import annotations

import inspect
import logging
import pickle
from typing import Any

import pytest
import torch
from machines import MACHINES

import mps_helpers
from mps_helpers import DeviceUnavailableError, plan_of, prepare_pipeline
from mps_helpers._apply import apply_plan, original_class, prepared_class
from mps_helpers.testing import tiny_pipeline

#: An mps-like plan, made runnable on the CPU: float32 keeps CPU calls fast.
MPS_LIKE: dict[str, Any] = {
    "device": "cpu",
    "attention_slicing": True,
    "vae_slicing": True,
    "vae_tiling": False,
    "warmup": False,
    "batch_to_loop": True,
    "nan_guard": True,
    "oom_retry": False,
    "memory_watch": False,
}
#: Every per-call feature off: the prepared call takes its fast path.
PLAIN: dict[str, Any] = {
    "device": "cpu",
    "attention_slicing": False,
    "vae_slicing": False,
    "vae_tiling": False,
    "warmup": False,
    "batch_to_loop": False,
    "nan_guard": False,
    "oom_retry": False,
    "memory_watch": False,
}
CPU = MACHINES["linux-cpu"]


def processor_names(pipe: Any) -> set[str]:
    return {type(p).__name__ for p in pipe.unet.attn_processors.values()}


def parameters(module: Any) -> dict[str, tuple[int, torch.dtype]]:
    return {k: (v.data_ptr(), v.dtype) for k, v in module.state_dict().items()}


@pytest.fixture
def sd() -> Any:
    return tiny_pipeline("sd")


# ---------------------------------------------------------------------------------------
# Identity of the prepared pipeline


def test_prepare_keeps_the_pipeline_s_identity(sd: Any) -> None:
    original = type(sd)
    signature = inspect.signature(sd.__call__)
    unet = sd.unet
    assert prepare_pipeline(sd, env=CPU, **PLAIN) is sd
    assert isinstance(sd, original)
    assert type(sd) is not original
    assert type(sd).__name__ == original.__name__
    assert type(sd).__qualname__ == original.__qualname__
    assert type(sd).__module__ == original.__module__
    assert type(sd).__bases__ == (original,)
    assert inspect.signature(sd.__call__) == signature
    assert sd.unet is unet
    assert sd.components["unet"] is unet
    assert original_class(sd) is original
    assert plan_of(sd) is not None


def test_plan_of_an_unprepared_pipeline_is_none(sd: Any) -> None:
    assert plan_of(sd) is None
    assert original_class(sd) is type(sd)


@pytest.mark.parametrize("value", [42, object(), None, "stable-diffusion-v1-5"])
def test_plan_of_something_else_is_a_type_error_like_prepare_pipeline(value: Any) -> None:
    with pytest.raises(TypeError, match="expected a diffusers pipeline") as planned:
        plan_of(value)
    with pytest.raises(TypeError) as prepared:
        mps_helpers.prepare_pipeline(value)
    assert str(planned.value) == str(prepared.value)


def test_prepare_twice_with_the_same_options_changes_nothing(
    sd: Any, caplog: pytest.LogCaptureFixture
) -> None:
    prepare_pipeline(sd, env=CPU, **MPS_LIKE)
    cls, plan = type(sd), plan_of(sd)
    processors = dict(sd.unet.attn_processors)
    params = parameters(sd.unet)
    with caplog.at_level(logging.INFO, logger="mps_helpers._apply"):
        prepare_pipeline(sd, env=CPU, **MPS_LIKE)
    assert type(sd) is cls
    assert plan_of(sd) is plan
    assert dict(sd.unet.attn_processors) == processors  # the very same processor objects
    assert parameters(sd.unet) == params
    assert "already prepared" in caplog.text
    # never wrapped twice: one prepared class, whose __call__ wraps the original's directly
    assert type(sd).__bases__ == (original_class(sd),)
    assert type(sd).__call__.__wrapped__ is original_class(sd).__call__


def test_the_prepared_class_is_cached_per_original_class(sd: Any) -> None:
    other = tiny_pipeline("sd", seed=1)
    prepare_pipeline(sd, env=CPU, **PLAIN)
    prepare_pipeline(other, env=CPU, **MPS_LIKE)
    assert type(sd) is type(other) is prepared_class(type(sd).__bases__[0])
    assert prepared_class(type(sd).__bases__[0]).__name__ == "StableDiffusionPipeline"


def test_other_options_replace_the_earlier_plan(sd: Any) -> None:
    prepare_pipeline(sd, env=CPU, **MPS_LIKE)
    assert processor_names(sd) == {"SafeSlicedAttnProcessor"}
    assert sd.vae.use_slicing
    first = plan_of(sd)
    prepare_pipeline(sd, env=CPU, **{**MPS_LIKE, "vae_slicing": False, "vae_tiling": True})
    assert not sd.vae.use_slicing
    assert sd.vae.use_tiling
    prepare_pipeline(sd, env=CPU, **PLAIN)
    assert processor_names(sd) == {"AttnProcessor2_0"}  # what the UNet had before
    assert not sd.vae.use_tiling
    assert plan_of(sd) != first
    assert not plan_of(sd).attention_slicing


# ---------------------------------------------------------------------------------------
# Attention


def test_safe_processor_gets_the_plan_s_chunk_bound(sd: Any) -> None:
    prepare_pipeline(
        sd,
        env=MACHINES["m1-8gb-macos12.6-torch1.13"].replace(mps_available=False, mps_built=False),
        **MPS_LIKE,
    )
    chunk = plan_of(sd).attention_chunk_elements
    assert chunk == 2**26  # 3 GiB available, float32 on the CPU
    assert {p.chunk_elements for p in sd.unet.attn_processors.values()} == {chunk}


def test_diffusers_processor_and_switching_between_them(sd: Any) -> None:
    prepare_pipeline(sd, env=CPU, **{**MPS_LIKE, "attention_processor": "diffusers"})
    assert processor_names(sd) == {"SlicedAttnProcessor"}
    assert plan_of(sd).attention_chunk_elements is None
    prepare_pipeline(sd, env=CPU, **MPS_LIKE)
    assert processor_names(sd) == {"SafeSlicedAttnProcessor"}
    prepare_pipeline(sd, env=CPU, **PLAIN)
    assert processor_names(sd) == {"AttnProcessor2_0"}


def test_falls_back_to_diffusers_slicing_without_the_safe_processor(
    sd: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mps_helpers import _apply

    monkeypatch.setattr(_apply, "_safe_processor_class", lambda: None)
    prepare_pipeline(sd, env=CPU, **MPS_LIKE)
    assert processor_names(sd) == {"SlicedAttnProcessor"}


def test_custom_processors_are_kept(sd: Any) -> None:
    class Custom:
        def __call__(self, attn: Any, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError

    custom = Custom()
    processors = dict(sd.unet.attn_processors)
    first = next(iter(processors))
    sd.unet.set_attn_processor({**processors, first: custom})
    prepare_pipeline(sd, env=CPU, **MPS_LIKE)
    after = sd.unet.attn_processors
    assert after[first] is custom
    assert {type(p).__name__ for k, p in after.items() if k != first} == {"SafeSlicedAttnProcessor"}
    prepare_pipeline(sd, env=CPU, **PLAIN)
    assert sd.unet.attn_processors[first] is custom


def test_transformer_pipeline_attention_is_left_alone() -> None:
    sd3 = tiny_pipeline("sd3")
    before = {type(p).__name__ for p in sd3.transformer.attn_processors.values()}
    prepare_pipeline(sd3, env=CPU, **{**MPS_LIKE, "attention_slicing": "auto"})
    assert not plan_of(sd3).attention_slicing
    assert {type(p).__name__ for p in sd3.transformer.attn_processors.values()} == before
    apply_plan(sd3, plan_of(sd3))  # a stricter plan may not slice it either: no error


# ---------------------------------------------------------------------------------------
# dtype and the VAE


def test_float16_plan_keeps_a_force_upcast_vae_in_float32(sd: Any) -> None:
    vae_before = {k: v.clone() for k, v in sd.vae.state_dict().items()}
    prepare_pipeline(sd, env=CPU, **{**PLAIN, "dtype": "float16"})
    assert sd.unet.dtype == torch.float16
    assert sd.text_encoder.dtype == torch.float16
    assert sd.vae.dtype == torch.float32
    # cast per component: the VAE never went through float16 and back
    for key, value in sd.vae.state_dict().items():
        assert torch.equal(value, vae_before[key])
    # the bridge: float16 latents and images go through the float32 VAE
    latents = torch.randn(1, 4, 8, 8, dtype=torch.float16)
    assert sd.vae.decode(latents).sample.dtype == torch.float32
    image = torch.rand(1, 3, 16, 16, dtype=torch.float16)
    assert sd.vae.encode(image).latent_dist.sample().dtype == torch.float16
    # back to float32: the bridge comes off
    prepare_pipeline(sd, env=CPU, **PLAIN)
    assert sd.unet.dtype == torch.float32
    assert "_mps_helpers_cast_hooks" not in sd.vae.__dict__
    assert not sd.vae.decoder._forward_pre_hooks


def test_a_float16_pipeline_with_a_float32_vae_runs(sd: Any) -> None:
    prepare_pipeline(sd, env=CPU, **{**PLAIN, "dtype": "float16"})
    out = sd("a cat", num_inference_steps=1, height=16, width=16, output_type="np")
    assert out.images.shape == (1, 16, 16, 3)
    assert (out.images == out.images).all()  # no NaN


def test_sdxl_upcasts_its_own_vae() -> None:
    sdxl = tiny_pipeline("sdxl")
    prepare_pipeline(sdxl, env=CPU, **{**PLAIN, "dtype": "float16"})
    assert sdxl.vae.dtype == torch.float16
    assert "upcasts it to float32" in plan_of(sdxl).reasons["vae_dtype"]


# ---------------------------------------------------------------------------------------
# Errors leave the pipeline as it was


def snapshot(pipe: Any) -> tuple[Any, ...]:
    return (
        type(pipe),
        plan_of(pipe),
        parameters(pipe.unet),
        parameters(pipe.vae),
        dict(pipe.unet.attn_processors),
        pipe.vae.use_slicing,
        pipe.vae.use_tiling,
    )


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("device", "gpu"),
        ("dtype", "int8"),
        ("attention_slicing", "yes"),
        ("attention_processor", "fast"),
        ("vae_slicing", 1),
        ("vae_tiling", None),
        ("warmup", "auto-ish"),
        ("batch_to_loop", 0),
        ("nan_guard", "on"),
        ("oom_retry", []),
        ("memory_watch", "no"),
        ("height", -8),
    ],
)
def test_bad_options_change_nothing(sd: Any, option: str, value: Any) -> None:
    prepare_pipeline(sd, env=CPU, **MPS_LIKE)
    before = snapshot(sd)
    with pytest.raises(ValueError, match=option):
        prepare_pipeline(sd, env=CPU, **{**PLAIN, "dtype": "float16", option: value})
    assert snapshot(sd) == before


def test_unavailable_device_changes_nothing(sd: Any) -> None:
    before = snapshot(sd)
    with pytest.raises(DeviceUnavailableError) as info:
        prepare_pipeline(sd, env=CPU, device="mps")
    assert info.value.findings
    assert snapshot(sd) == before
    if not mps_helpers.detect_environment().mps_available:
        with pytest.raises(DeviceUnavailableError):
            prepare_pipeline(sd, device="mps")
        assert snapshot(sd) == before


@pytest.mark.parametrize("thing", [object(), "a pipeline", None])
def test_what_is_not_a_pipeline_raises_type_error(thing: Any) -> None:
    with pytest.raises(TypeError, match=type(thing).__qualname__):
        prepare_pipeline(thing)


def test_a_model_is_not_a_pipeline(sd: Any) -> None:
    with pytest.raises(TypeError, match="UNet2DConditionModel"):
        prepare_pipeline(sd.unet)


def test_a_failing_step_restores_the_pipeline(sd: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from mps_helpers import _apply

    before = snapshot(sd)

    def fail(pipe: Any, plan: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(_apply, "_apply_vae_memory", fail)
    with pytest.raises(RuntimeError, match="boom"):
        prepare_pipeline(sd, env=CPU, **{**MPS_LIKE, "dtype": "float16"})
    assert type(sd) is before[0]
    assert plan_of(sd) is None
    assert sd.unet.dtype == torch.float32
    assert processor_names(sd) == {"AttnProcessor2_0"}
    assert "_mps_helpers_cast_hooks" not in sd.vae.__dict__


def test_a_failure_after_preparing_restores_the_earlier_plan(
    sd: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mps_helpers import _apply

    prepare_pipeline(sd, env=CPU, **MPS_LIKE)
    before = snapshot(sd)
    monkeypatch.setattr(_apply, "_attach", lambda pipe, plan: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        prepare_pipeline(sd, env=CPU, **PLAIN)
    assert type(sd) is before[0]
    assert plan_of(sd) is before[1]
    assert processor_names(sd) == {"SafeSlicedAttnProcessor"}
    assert sd.vae.use_slicing


# ---------------------------------------------------------------------------------------
# apply_plan, logging, persistence


def test_apply_plan_applies_a_stricter_plan(sd: Any) -> None:
    prepare_pipeline(sd, env=CPU, **PLAIN)
    stricter = plan_of(sd).replace(attention_slicing=True, vae_tiling=True)
    assert apply_plan(sd, stricter) is sd
    assert plan_of(sd) is stricter
    assert processor_names(sd) == {"SafeSlicedAttnProcessor"}
    assert sd.vae.use_tiling


def test_decisions_and_changes_are_logged(sd: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="mps_helpers"):
        prepare_pipeline(sd, env=CPU, **{**MPS_LIKE, "dtype": "float16"})
    text = caplog.text
    assert "plan: device = cpu: asked for (cpu)." in text
    assert "plan: batch_to_loop = True" in text
    assert "unet cast from torch.float32 to torch.float16" in text
    assert "SafeSlicedAttnProcessor" in text
    assert "VAE slicing on" in text
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name.startswith("mps_"))


def test_save_pretrained_round_trip_loads_the_original_class(sd: Any, tmp_path: Any) -> None:
    from diffusers import DiffusionPipeline

    original = type(sd)
    prepare_pipeline(sd, env=CPU, **MPS_LIKE)
    sd.save_pretrained(tmp_path)
    assert '"_class_name": "StableDiffusionPipeline"' in (tmp_path / "model_index.json").read_text()
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded) is original
    assert plan_of(loaded) is None


def test_a_prepared_pipeline_pickles(sd: Any) -> None:
    prepare_pipeline(sd, env=CPU, **{**MPS_LIKE, "dtype": "float16"})
    copy = pickle.loads(pickle.dumps(sd))
    assert type(copy) is type(sd)
    assert plan_of(copy) == plan_of(sd)
    assert copy.vae.decode(torch.zeros(1, 4, 8, 8, dtype=torch.float16)).sample.dtype == (
        torch.float32
    )


# ---------------------------------------------------------------------------------------
# The prepared call


def test_call_goes_through_the_prepared_call(sd: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from mps_helpers import _call

    seen: list[Any] = []

    def spy(pipe: Any, call: Any, args: Any, kwargs: Any, **options: Any) -> Any:
        seen.append((pipe, call, args, kwargs))
        assert options == {"reapply": apply_plan}  # the retry applies through _apply
        return "result"

    monkeypatch.setattr(_call, "prepared_call", spy)
    prepare_pipeline(sd, env=CPU, **PLAIN)
    assert sd("a cat", num_inference_steps=1) == "result"
    pipe, call, args, kwargs = seen[0]
    assert pipe is sd
    assert args == ("a cat",)
    assert kwargs == {"num_inference_steps": 1}
    assert call.func is original_class(sd).__call__
    assert call.args == (sd,)


def test_a_prepared_call_gives_the_unprepared_result(sd: Any) -> None:
    kwargs: dict[str, Any] = {
        "num_inference_steps": 1,
        "height": 32,
        "width": 32,
        "output_type": "np",
    }
    plain = sd("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    prepare_pipeline(sd, env=CPU, **PLAIN)
    same = sd("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert (same == plain).all()
    prepare_pipeline(sd, env=CPU, **MPS_LIKE)
    prompts = ["a cat", "a dog"]
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    looped = sd(prompts, generator=gens, **kwargs).images
    assert looped.shape == (2, 32, 32, 3)
    assert abs(looped[0] - plain).max() < 1e-3


@pytest.mark.real_cpu_dtype
def test_a_cpu_with_native_bfloat16_runs_the_pipeline_in_bfloat16() -> None:
    # The real machine's detection decides; on a CPU without the instructions it is float32.
    # Either way the auto plan's images match float32's to bfloat16's precision.
    env = mps_helpers.detect_environment(refresh=True)
    reference = tiny_pipeline("sd")
    pipe = prepare_pipeline(tiny_pipeline("sd"))
    expected = torch.bfloat16 if env.cpu_bf16_supported else torch.float32
    assert plan_of(pipe).dtype == expected
    assert {p.dtype for p in pipe.unet.parameters()} == {expected}
    assert {p.dtype for p in pipe.vae.parameters()} == {expected}
    kwargs: dict[str, Any] = {"num_inference_steps": 2, "output_type": "np"}
    got = pipe("a red fox", generator=torch.Generator().manual_seed(0), **kwargs).images
    want = reference("a red fox", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert got.shape == want.shape
    assert abs(got - want).max() < (0.05 if expected == torch.bfloat16 else 1e-5)


def test_the_bfloat16_cpu_plan_runs_on_any_cpu() -> None:
    pipe = prepare_pipeline(tiny_pipeline("sd"), env=MACHINES["linux-cpu-bf16"], warmup=False)
    assert plan_of(pipe).dtype == torch.bfloat16
    assert pipe.unet.dtype == torch.bfloat16
    images = pipe(["a", "b"], num_inference_steps=2, output_type="np").images
    assert images.shape[0] == 2
    assert images.min() >= 0
    assert images.max() <= 1
