"""Tests of the guards: NaN/black-image repair, out-of-memory retry, memory pressure.

The NaN guard is tested with a real (tiny) VAE that overflows the way SDXL's does: its
decoder's first convolution is scaled by 1e5, so float16 activations pass 65504 and become
inf (then NaN in the GroupNorm after it), while in float32 the GroupNorm, which does not care
about scale, gives finite images. Out of memory is injected with the exact message mps raises.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import os
import pathlib
import warnings
import weakref
from typing import Any

import numpy as np
import pytest
import torch

from mps_helpers import _call, _memory_watch, _nan_guard, _oom_retry, _plan
from mps_helpers._errors import (
    BatchError,
    DeviceOutOfMemoryError,
    MemoryPressureWarning,
    NonFiniteOutputError,
    NonFiniteOutputWarning,
    OutOfMemoryRetryWarning,
)
from mps_helpers._probes import MemoryInfo

# Captured from torch on a 16 GB M1 (the figures vary, the first words do not).
MPS_OOM = (
    "MPS backend out of memory (MPS allocated: 17.65 GB, other allocations: 384.00 KB, max "
    "allowed: 18.13 GB). Tried to allocate 2.00 GB on private pool. Use "
    "PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 to disable upper limit for memory allocations "
    "(may cause system failure)."
)
CUDA_OOM = (
    "CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 79.19 GiB total capacity; "
    "78.50 GiB already allocated; 1.06 MiB free)"
)
MiB = 2**20


@dataclasses.dataclass(frozen=True)
class FakePlan:
    """The Plan fields the guards read, with Plan's ``replace``."""

    device: str = "mps"
    nan_guard: bool = True
    oom_retry: bool = True
    memory_watch: bool = False
    attention_slicing: bool = False
    vae_slicing: bool = False
    vae_tiling: bool = False
    batch_to_loop: bool = False

    def replace(self, **changes: Any) -> FakePlan:
        changes.pop("reasons", None)
        changes.pop("rules", None)
        return dataclasses.replace(self, **changes)


class FakePipeline:
    """Stands in for a pipeline: a ``vae`` attribute and a class name for the messages."""

    def __init__(self, vae: Any = None) -> None:
        self.vae = vae


# ---------------------------------------------------------------------------------------
# NaN guard
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vae_weights() -> dict[str, torch.Tensor]:
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(**_VAE_CONFIG)
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(1e5)
        vae.decoder.conv_in.bias.mul_(1e5)
    return {k: v.to(torch.float16) for k, v in vae.state_dict().items()}


_VAE_CONFIG: dict[str, Any] = {
    "block_out_channels": (8, 16),
    "norm_num_groups": 4,
    "layers_per_block": 1,
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
    "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
    "latent_channels": 4,
}


def _vae(weights: dict[str, torch.Tensor], dtype: torch.dtype = torch.float16) -> Any:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**_VAE_CONFIG).eval()
    vae.load_state_dict(weights)
    return torch.nn.Module.to(vae, dtype)


@pytest.fixture
def overflowing_vae(vae_weights: dict[str, torch.Tensor]) -> Any:
    """A float16 VAE that decodes NaN in float16 and finite images in float32."""
    return _vae(vae_weights)


@pytest.fixture
def latents() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 4, 4, generator=generator).to(torch.float16)


def decode_call(
    pipe: FakePipeline, latents: torch.Tensor, *, output_type: str = "np", return_dict: bool = True
) -> Any:
    """The end of StableDiffusionPipeline.__call__: decode, post-process, wrap."""
    from diffusers.image_processor import VaeImageProcessor

    with torch.no_grad():
        if output_type == "latent":
            image = latents
        else:
            image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        image = VaeImageProcessor(vae_scale_factor=2).postprocess(image, output_type=output_type)
    if not return_dict:
        return (image, None)
    return _output_class()(images=image, nsfw_content_detected=None)


@functools.cache
def _output_class() -> Any:
    """StableDiffusionPipelineOutput's twin (importing the real one imports transformers)."""
    from diffusers.utils import BaseOutput

    @dataclasses.dataclass
    class Output(BaseOutput):  # type: ignore[misc]  # diffusers is untyped here
        images: Any
        nsfw_content_detected: Any

    return Output


def guarded(pipe: FakePipeline, latents: torch.Tensor, plan: Any = None, **kwargs: Any) -> Any:
    def call(**kw: Any) -> Any:
        return decode_call(pipe, **kw)

    return _nan_guard.call_with_nan_guard(
        pipe, plan or FakePlan(), call, {"latents": latents, **kwargs}
    )


def float32_reference(weights: dict[str, torch.Tensor], latents: torch.Tensor) -> np.ndarray:
    """What a float32 VAE with the same (float16-rounded) weights decodes, as "np" output."""
    vae = _vae(weights, torch.float32)
    out = decode_call(FakePipeline(vae), latents.float(), output_type="np")
    images: np.ndarray = out.images
    return images


def as_array(images: Any) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        return images.permute(0, 2, 3, 1).float().numpy()
    if isinstance(images, list):  # PIL
        return np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])
    return np.asarray(images)


def test_the_emulated_vae_overflows_in_float16_only(
    overflowing_vae: Any, latents: torch.Tensor, vae_weights: dict[str, torch.Tensor]
) -> None:
    raw = decode_call(FakePipeline(overflowing_vae), latents).images
    assert np.isnan(raw).all()
    assert np.isfinite(float32_reference(vae_weights, latents)).all()


@pytest.mark.parametrize(("output_type", "atol"), [("np", 2e-3), ("pt", 2e-3), ("pil", 1 / 255)])
def test_repairs_half_precision_overflow_with_a_float32_decode(
    overflowing_vae: Any,
    latents: torch.Tensor,
    vae_weights: dict[str, torch.Tensor],
    output_type: str,
    atol: float,
) -> None:
    pipe = FakePipeline(overflowing_vae)
    before = {k: v.clone() for k, v in overflowing_vae.state_dict().items()}
    with pytest.warns(NonFiniteOutputWarning) as record:
        out = guarded(pipe, latents, output_type=output_type)
    assert len(record) == 1
    message = str(record[0].message)
    assert "FakePipeline" in message
    assert "overflows in float16" in message
    assert "float32" in message
    assert record[0].filename == __file__  # points at the caller, not at the library
    images = as_array(out.images)
    assert np.isfinite(images).all()
    reference = float32_reference(vae_weights, latents)
    np.testing.assert_allclose(images, reference, atol=atol, rtol=0)
    # The VAE is back as it was: float16, same weights bit for bit, no wrapper left on it.
    assert overflowing_vae.dtype == torch.float16
    after = overflowing_vae.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert "decode" not in vars(overflowing_vae)


def test_keeps_the_return_dict_false_tuple(
    overflowing_vae: Any, latents: torch.Tensor, vae_weights: dict[str, torch.Tensor]
) -> None:
    with pytest.warns(NonFiniteOutputWarning):
        out = guarded(FakePipeline(overflowing_vae), latents, return_dict=False)
    assert isinstance(out, tuple)
    assert len(out) == 2
    assert out[1] is None
    np.testing.assert_allclose(out[0], float32_reference(vae_weights, latents), atol=2e-3)


def test_warns_once_per_pipeline(overflowing_vae: Any, latents: torch.Tensor) -> None:
    pipe = FakePipeline(overflowing_vae)
    with pytest.warns(NonFiniteOutputWarning):
        guarded(pipe, latents)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # Later calls: repaired again (in float32 straight away), silently.
        assert np.isfinite(guarded(pipe, latents).images).all()
    # Another pipeline sharing that VAE warns for itself.
    with pytest.warns(NonFiniteOutputWarning):
        out = guarded(FakePipeline(overflowing_vae), latents)
    assert np.isfinite(out.images).all()


def test_a_fixed_vae_is_not_upcast(
    vae_weights: dict[str, torch.Tensor], latents: torch.Tensor
) -> None:
    # A float16 VAE without the overflow: no warning, and it is never cast to float32.
    weights = dict(vae_weights)
    weights["decoder.conv_in.weight"] = weights["decoder.conv_in.weight"] / 1e5
    weights["decoder.conv_in.bias"] = weights["decoder.conv_in.bias"] / 1e5
    vae = _vae(weights)
    casts: list[torch.dtype] = []
    vae.decoder.conv_in.register_forward_pre_hook(lambda m, a: casts.append(a[0].dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = guarded(FakePipeline(vae), latents)
    assert np.isfinite(out.images).all()
    assert casts == [torch.float16]


def test_raises_when_the_float32_decode_is_not_finite_either(
    overflowing_vae: Any, latents: torch.Tensor
) -> None:
    overflowing_vae.decoder.register_forward_hook(lambda m, a, out: out * float("nan"))
    with pytest.raises(NonFiniteOutputError, match="again with the VAE in float32"):
        guarded(FakePipeline(overflowing_vae), latents)
    assert overflowing_vae.dtype == torch.float16
    assert "decode" not in vars(overflowing_vae)


def test_raises_on_non_finite_latents_without_redecoding(
    overflowing_vae: Any, latents: torch.Tensor
) -> None:
    latents = latents.clone()
    latents[0, 0, 0, 0] = float("nan")
    seen: list[torch.dtype] = []
    overflowing_vae.decoder.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    with pytest.raises(NonFiniteOutputError, match="NaN/inf latents: the denoiser overflowed"):
        guarded(FakePipeline(overflowing_vae), latents)
    assert seen == [torch.float16]  # no float32 decode was tried


def test_raises_when_the_vae_already_is_float32(
    vae_weights: dict[str, torch.Tensor], latents: torch.Tensor
) -> None:
    vae = _vae(vae_weights, torch.float32)
    vae.decoder.register_forward_hook(lambda m, a, out: out * float("nan"))
    with pytest.raises(NonFiniteOutputError, match="VAE already in float32"):
        guarded(FakePipeline(vae), latents.float())


def test_a_quantized_vae_is_not_upcast(overflowing_vae: Any, latents: torch.Tensor) -> None:
    overflowing_vae.is_quantized = True  # diffusers' ModelMixin refuses to cast these
    with pytest.raises(NonFiniteOutputError, match="quantized"):
        guarded(FakePipeline(overflowing_vae), latents)
    assert overflowing_vae.dtype == torch.float16


class SlottedVae:
    """A decoder that takes no instance attributes: the wrapper cannot go on it."""

    __slots__ = ()

    def decode(self, z: torch.Tensor, return_dict: bool = False) -> tuple[torch.Tensor]:
        return (z * float("nan"),)


def test_an_unwrappable_vae_gets_the_output_check(latents: torch.Tensor) -> None:
    pipe = FakePipeline(SlottedVae())

    def call(**kw: Any) -> Any:
        return (pipe.vae.decode(kw["latents"])[0], None)

    with pytest.raises(NonFiniteOutputError, match="returned NaN/inf values"):
        _nan_guard.call_with_nan_guard(pipe, FakePlan(), call, {"latents": latents})


def test_nan_guard_off_returns_nan_untouched(overflowing_vae: Any, latents: torch.Tensor) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = guarded(FakePipeline(overflowing_vae), latents, FakePlan(nan_guard=False))
    assert np.isnan(out.images).all()


def test_checks_the_returned_latents_when_nothing_was_decoded(latents: torch.Tensor) -> None:
    pipe = FakePipeline(vae=None)
    out = guarded(pipe, latents, output_type="latent")
    assert torch.equal(out.images, latents)
    bad = latents.clone()
    bad[1, 2, 3, 3] = float("inf")
    with pytest.raises(NonFiniteOutputError, match=r"no pipe\.vae\.decode"):
        guarded(pipe, bad, output_type="latent")


def test_the_decode_wrapper_goes_away_when_the_call_fails(overflowing_vae: Any) -> None:
    pipe = FakePipeline(overflowing_vae)

    def call(**kw: Any) -> Any:
        assert "decode" in vars(overflowing_vae)
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        _nan_guard.call_with_nan_guard(pipe, FakePlan(), call, {})
    assert "decode" not in vars(overflowing_vae)


def test_float32_upcast_restores_mixed_dtypes_exactly(vae_weights: dict[str, torch.Tensor]) -> None:
    vae = _vae(vae_weights, torch.bfloat16)
    torch.nn.Module.to(vae.post_quant_conv, torch.float32)  # parts kept in float32
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    params = list(vae.parameters())
    with _nan_guard._float32(vae):
        assert {p.dtype for p in vae.parameters()} == {torch.float32}
    after = vae.state_dict()
    assert {k: v.dtype for k, v in after.items()} == {k: v.dtype for k, v in before.items()}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(a is b for a, b in zip(params, vae.parameters(), strict=True))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (torch.zeros(2, 3), False),
        (torch.tensor([1.0, float("nan")]), True),
        (torch.tensor([1.0, float("-inf")], dtype=torch.float16), True),
        (torch.tensor([1.0, float("inf")], dtype=torch.bfloat16), True),
        (torch.full((4,), 65504.0, dtype=torch.float16), False),
        (torch.full((4,), 3e38), False),  # the sum overflows; the exact check clears it
        (torch.tensor([1, 2, 3]), False),
        (torch.empty(0), False),
        (np.array([0.5, np.nan], dtype=np.float32), True),
        (np.full(3, 1.7e308), False),
        (np.zeros((2, 2), dtype=np.uint8), False),
        ([np.zeros(2), torch.tensor([float("nan")])], True),
        ((torch.zeros(1),), False),
        (None, False),
        ("text", False),
    ],
)
def test_has_non_finite(value: Any, expected: bool) -> None:
    assert _nan_guard.has_non_finite(value) is expected


# ---------------------------------------------------------------------------------------
# Out-of-memory retry
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (RuntimeError(MPS_OOM), True),
        (RuntimeError(CUDA_OOM), True),  # torch < 1.13 on CUDA
        (torch.cuda.OutOfMemoryError(CUDA_OOM), True),
        (RuntimeError("Expected all tensors to be on the same device"), False),
        (ValueError(MPS_OOM), False),  # only torch raises it, as a RuntimeError
        (MemoryError(), False),
        (KeyboardInterrupt(), False),
    ],
)
def test_is_out_of_memory(exc: BaseException, expected: bool) -> None:
    assert _oom_retry.is_out_of_memory(exc) is expected


def test_find_out_of_memory_looks_through_a_batch_error() -> None:
    oom = RuntimeError(MPS_OOM)
    batch = BatchError("prompt 1 failed", index=1, completed=None)
    batch.__cause__ = oom
    assert _oom_retry.find_out_of_memory(batch) is oom
    assert _oom_retry.find_out_of_memory(ValueError("x")) is None


def test_stricter_plan_turns_on_every_memory_saver() -> None:
    stricter = _plan.stricter_plan(FakePlan())
    assert stricter == FakePlan(
        attention_slicing=True, vae_slicing=True, vae_tiling=True, batch_to_loop=True
    )
    assert _plan.stricter_plan(stricter) is None
    partly = FakePlan(vae_slicing=True, batch_to_loop=True)
    assert _plan.stricter_plan(partly) == stricter


@dataclasses.dataclass(frozen=True)
class NoSlicingPlan(FakePlan):
    attention_slicing_supported: bool = False


def test_stricter_plan_leaves_attention_slicing_off_where_unsupported() -> None:
    stricter = _plan.stricter_plan(NoSlicingPlan())
    assert stricter is not None
    assert not stricter.attention_slicing
    assert stricter.vae_slicing
    assert stricter.batch_to_loop


class Attempts:
    """A ``run_all`` that raises the given errors in turn, then returns "images"."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.plans: list[Any] = []

    def __call__(self, kwargs: dict[str, Any], plan: Any) -> Any:
        self.plans.append(plan)
        if self.errors:
            raise self.errors.pop(0)
        return "images"


class Applied(list[tuple[Any, Any]]):
    """The ``reapply`` the retry gets: records the (pipeline, plan) pairs it applies."""

    def __call__(self, pipe: Any, plan: Any) -> None:
        self.append((pipe, plan))


@pytest.fixture
def applied(monkeypatch: pytest.MonkeyPatch) -> Applied:
    """Record the plans applied to pipelines (and skip the slow full garbage collection)."""
    monkeypatch.setattr(_oom_retry, "free_device_memory", lambda: None)
    return Applied()


def test_free_device_memory_runs_without_a_device() -> None:
    _oom_retry.free_device_memory()  # CPU-only torch: collects garbage, touches no device


def test_retries_once_with_a_stricter_plan(applied: Applied) -> None:
    pipe, plan = FakePipeline(), FakePlan()
    run_all = Attempts(RuntimeError(MPS_OOM))
    with pytest.warns(OutOfMemoryRetryWarning) as record:
        assert _call.call_with_recovery(pipe, plan, run_all, {}, reapply=applied) == "images"
    stricter = plan.replace(
        attention_slicing=True, vae_slicing=True, vae_tiling=True, batch_to_loop=True
    )
    assert run_all.plans == [plan, stricter]
    assert applied == [(pipe, stricter)]  # kept on the pipeline for later calls
    message = str(record[0].message)
    assert "out of memory on mps" in message
    for change in ("attention slicing on", "VAE slicing on", "VAE tiling on", "one at a time"):
        assert change in message
    assert record[0].filename == __file__


def test_recognises_cuda_out_of_memory(applied: Applied) -> None:
    run_all = Attempts(torch.cuda.OutOfMemoryError(CUDA_OOM))
    with pytest.warns(OutOfMemoryRetryWarning, match="on CUDA"):
        assert _call.call_with_recovery(
            FakePipeline(), FakePlan("cuda"), run_all, {}, reapply=applied
        )


def test_retries_a_looped_batch_that_ran_out_of_memory(applied: Applied) -> None:
    def run_all(kwargs: dict[str, Any], plan: Any) -> Any:
        if not plan.vae_slicing:
            try:
                raise RuntimeError(MPS_OOM)
            except RuntimeError as exc:
                raise BatchError("prompt 1 failed", index=1, completed=None) from exc
        return "images"

    with pytest.warns(OutOfMemoryRetryWarning):
        assert (
            _call.call_with_recovery(FakePipeline(), FakePlan(), run_all, {}, reapply=applied)
            == "images"
        )


def test_the_retry_draws_the_same_noise(applied: Applied) -> None:
    draws: list[torch.Tensor] = []

    def run_all(kwargs: dict[str, Any], plan: Any) -> Any:
        draws.append(torch.randn(3, generator=kwargs["generator"][1]))
        if len(draws) == 1:
            raise RuntimeError(MPS_OOM)
        return "images"

    generators = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    with pytest.warns(OutOfMemoryRetryWarning):
        _call.call_with_recovery(
            FakePipeline(), FakePlan(), run_all, {"generator": generators}, reapply=applied
        )
    assert torch.equal(draws[0], draws[1])


def test_frees_the_failed_attempt_before_retrying(
    applied: Applied, monkeypatch: pytest.MonkeyPatch
) -> None:
    refs: list[weakref.ref[torch.Tensor]] = []
    alive_at_retry: list[bool] = []
    freed: list[bool] = []
    monkeypatch.setattr(_oom_retry, "free_device_memory", lambda: freed.append(True))

    def run_all(kwargs: dict[str, Any], plan: Any) -> Any:
        if refs:
            alive_at_retry.append(refs[0]() is not None)
            assert freed == [True]
            return "images"
        activations = torch.zeros(1000)  # stands for what a failed UNet pass holds
        refs.append(weakref.ref(activations))
        raise RuntimeError(MPS_OOM)

    with pytest.warns(OutOfMemoryRetryWarning):
        _call.call_with_recovery(FakePipeline(), FakePlan(), run_all, {}, reapply=applied)
    assert alive_at_retry == [False]


def test_raises_device_out_of_memory_when_the_retry_fails(applied: Applied) -> None:
    second = RuntimeError(MPS_OOM)
    run_all = Attempts(RuntimeError(MPS_OOM), second)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DeviceOutOfMemoryError) as info:
            _call.call_with_recovery(
                FakePipeline(), FakePlan(), run_all, {"height": 768}, reapply=applied
            )
    error = info.value
    assert isinstance(error, RuntimeError)
    assert error.__cause__ is second
    message = str(error)
    assert message.startswith("FakePipeline ran out of memory on mps: MPS backend out of memory")
    assert "retried once with a stricter memory plan" in message
    for advice in ("smaller images", "fewer images per call", "close other apps"):
        assert advice in message
    assert "Don't set PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0" in message
    assert len(run_all.plans) == 2


def test_no_retry_when_every_memory_saver_is_already_on(applied: Applied) -> None:
    plan = FakePlan(attention_slicing=True, vae_slicing=True, vae_tiling=True, batch_to_loop=True)
    first = RuntimeError(MPS_OOM)
    run_all = Attempts(first)
    with pytest.raises(DeviceOutOfMemoryError, match="already on") as info:
        _call.call_with_recovery(
            FakePipeline(), plan, run_all, {"height": 64, "width": 96}, reapply=applied
        )
    assert info.value.__cause__ is first
    assert "at 96x64 px" in str(info.value)
    assert len(run_all.plans) == 1
    assert applied == []


@pytest.mark.parametrize("oom_retry", [True, False])
def test_other_errors_pass_through_unchanged(applied: Applied, oom_retry: bool) -> None:
    error = ValueError("height must be divisible by 8")
    run_all = Attempts(error)
    with pytest.raises(ValueError, match="divisible") as info:
        _call.call_with_recovery(
            FakePipeline(), FakePlan(oom_retry=oom_retry), run_all, {}, reapply=applied
        )
    assert info.value is error
    assert len(run_all.plans) == 1


def test_an_other_error_in_the_retry_passes_through(applied: Applied) -> None:
    error = TypeError("bad")
    run_all = Attempts(RuntimeError(MPS_OOM), error)
    with pytest.raises(TypeError) as info:
        _call.call_with_recovery(FakePipeline(), FakePlan(), run_all, {}, reapply=applied)
    assert info.value is error


def test_without_a_reapply_there_is_no_retry(applied: Applied) -> None:
    # The prepared class always hands apply_plan down; a caller without one gets no retry
    # (it could not apply the stricter plan), and the error is torch's own.
    error = RuntimeError(MPS_OOM)
    run_all = Attempts(error)
    with pytest.raises(RuntimeError) as info:
        _call.call_with_recovery(FakePipeline(), FakePlan(), run_all, {}, reapply=None)
    assert info.value is error
    assert len(run_all.plans) == 1


def test_oom_retry_off_lets_the_original_error_through(applied: Applied) -> None:
    error = RuntimeError(MPS_OOM)
    run_all = Attempts(error)
    with pytest.raises(RuntimeError) as info:
        _call.call_with_recovery(
            FakePipeline(), FakePlan(oom_retry=False), run_all, {}, reapply=applied
        )
    assert info.value is error
    assert not isinstance(info.value, DeviceOutOfMemoryError)
    assert applied == []


# ---------------------------------------------------------------------------------------
# Memory watch
# ---------------------------------------------------------------------------------------


@pytest.fixture
def readings(monkeypatch: pytest.MonkeyPatch) -> list[MemoryInfo]:
    """Fake memory readings, consumed one per read."""
    queue: list[MemoryInfo] = []
    monkeypatch.setattr(_memory_watch, "read_memory", lambda: queue.pop(0))
    return queue


def swap(used_mib: float, available_mib: float | None = 900) -> MemoryInfo:
    available = None if available_mib is None else int(available_mib * MiB)
    return MemoryInfo(total=16 * 2**30, available=available, swap_used=int(used_mib * MiB))


def watched(pipe: Any, plan: Any = None) -> Any:
    plan = plan or FakePlan(memory_watch=True, oom_retry=False)
    return _call.call_with_recovery(pipe, plan, lambda kw, p: "images", {}, reapply=None)


def test_warns_when_swap_grew_by_more_than_256_mib(readings: list[MemoryInfo]) -> None:
    readings += [swap(512), swap(512 + 1700)]
    with pytest.warns(MemoryPressureWarning) as record:
        assert watched(FakePipeline()) == "images"
    message = str(record[0].message)
    assert "Swap grew by 1.66 GiB during this call of FakePipeline" in message
    assert "from 512 MiB to 2.16 GiB; 900 MiB of RAM available after it" in message
    assert (
        "prepare_pipeline(pipe, attention_slicing=True, vae_slicing=True, vae_tiling=True, "
        "batch_to_loop=True)" in message
    )
    assert record[0].filename == __file__
    assert readings == []


def test_suggests_only_the_savers_that_are_off(readings: list[MemoryInfo]) -> None:
    readings += [swap(0), swap(300, None)]
    plan = FakePlan(memory_watch=True, attention_slicing=True, vae_slicing=True)
    with pytest.warns(MemoryPressureWarning) as record:
        watched(FakePipeline(), plan)
    message = str(record[0].message)
    assert "prepare_pipeline(pipe, vae_tiling=True, batch_to_loop=True)" in message
    assert "available" not in message


def test_memory_warning_once_per_pipeline(readings: list[MemoryInfo]) -> None:
    pipe = FakePipeline()
    readings += [swap(0), swap(400), swap(400), swap(900)]
    with pytest.warns(MemoryPressureWarning):
        watched(pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        watched(pipe)
    readings += [swap(0), swap(400)]
    with pytest.warns(MemoryPressureWarning):
        watched(FakePipeline())


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (swap(100), swap(100 + 256)),  # at the limit, not over it
        (swap(2000), swap(10)),  # swap shrank
        (MemoryInfo(), MemoryInfo()),  # psutil missing
        (swap(0), MemoryInfo(total=1, available=1, swap_used=None)),
    ],
)
def test_no_memory_warning(
    readings: list[MemoryInfo], before: MemoryInfo, after: MemoryInfo
) -> None:
    readings += [before, after]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        watched(FakePipeline())
    assert readings == []


def test_memory_watch_off_reads_nothing(readings: list[MemoryInfo]) -> None:
    watched(FakePipeline(), FakePlan(memory_watch=False, oom_retry=False))  # empty queue: no read


def test_read_memory_reads_this_machine() -> None:
    info = _memory_watch.read_memory()
    assert info.available is None or info.available > 0
    assert info.swap_used is None or info.swap_used >= 0


# ---------------------------------------------------------------------------------------
# PYTORCH_MPS_HIGH_WATERMARK_RATIO
# ---------------------------------------------------------------------------------------

WATERMARK = "PYTORCH_MPS_HIGH_WATERMARK_RATIO"
PACKAGE = pathlib.Path(_call.__file__).parent


def _environ_writes(tree: ast.AST) -> list[ast.AST]:
    """Nodes that may set an environment variable named by a string constant."""
    found: list[ast.AST] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            found += [t for t in targets if isinstance(t, ast.Subscript)]
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in {"setdefault", "putenv", "update", "__setitem__", "setenv"}:
                found.append(node)
    return found


def test_the_package_never_sets_the_mps_watermark() -> None:
    sources = sorted(PACKAGE.rglob("*.py"))
    assert len(sources) > 5
    offenders = []
    for path in sources:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in _environ_writes(tree):
            if WATERMARK in ast.unparse(node):
                offenders.append(f"{path.name}:{getattr(node, 'lineno', '?')}")
    assert offenders == []


def test_the_guards_leave_the_environment_alone(applied: Applied) -> None:
    before = dict(os.environ)
    with pytest.raises(DeviceOutOfMemoryError):
        _call.call_with_recovery(
            FakePipeline(),
            FakePlan(),
            Attempts(RuntimeError(MPS_OOM), RuntimeError(MPS_OOM)),
            {},
            reapply=applied,
        )
    assert dict(os.environ) == before


# ---------------------------------------------------------------------------------------
# End to end: real plans, prepared tiny pipelines
# ---------------------------------------------------------------------------------------


def _tiny(kind: str = "sd", *, overflowing: bool = False) -> Any:
    from mps_helpers.testing import tiny_pipeline

    pipe = tiny_pipeline(kind)
    if overflowing:
        # A half-precision VAE (no force_upcast) whose decoder overflows in float16 only.
        pipe.vae.register_to_config(force_upcast=False)
        with torch.no_grad():
            pipe.vae.decoder.conv_in.weight.mul_(1e5)
            pipe.vae.decoder.conv_in.bias.mul_(1e5)
    return pipe


def _prepared(pipe: Any, **options: Any) -> Any:
    from mps_helpers import prepare_pipeline

    return prepare_pipeline(pipe, device="cpu", warmup=False, **options)


SMALL = {"num_inference_steps": 2, "height": 16, "width": 16, "output_type": "np"}


def test_stricter_plan_of_real_plans() -> None:
    from mps_helpers import plan_for

    plan = plan_for(_tiny("sd"), device="cpu", dtype="float16")
    stricter = _plan.stricter_plan(plan)
    assert stricter is not None
    assert (stricter.attention_slicing, stricter.vae_slicing, stricter.vae_tiling) == (
        True,
        True,
        True,
    )
    assert stricter.batch_to_loop
    assert stricter.attention_chunk_elements is not None  # the safe processor gets a bound
    assert "out-of-memory" in stricter.reasons["vae_slicing"]
    assert (stricter.device, stricter.dtype) == (plan.device, plan.dtype)
    # SD3's transformer cannot slice attention: the stricter plan leaves it off.
    sd3 = _plan.stricter_plan(plan_for(_tiny("sd3"), device="cpu", dtype="float16"))
    assert sd3 is not None
    assert not sd3.attention_slicing
    assert sd3.vae_slicing


def test_prepared_call_repairs_an_overflowing_vae() -> None:
    from mps_helpers import plan_of

    pipe = _prepared(_tiny(overflowing=True), dtype="float16")
    plan = plan_of(pipe)
    assert plan is not None
    assert plan.nan_guard  # "auto": on in float16
    assert plan.vae_dtype == torch.float16
    kwargs = {"prompt": ["a cat", "a dog"], **SMALL}
    with pytest.warns(NonFiniteOutputWarning) as record:
        images, nsfw = pipe(**kwargs, return_dict=False)
    assert len(record) == 1
    assert record[0].filename == __file__
    assert images.shape == (2, 16, 16, 3)
    assert np.isfinite(images).all()
    assert nsfw is None
    assert pipe.vae.dtype == torch.float16
    # nan_guard=False: the NaN comes back untouched.
    pipe = _prepared(pipe, dtype="float16", nan_guard=False)
    assert np.isnan(pipe(**kwargs).images).all()


def _fail_first_unet_calls(pipe: Any, failures: int) -> list[int]:
    """Make the UNet raise mps' out-of-memory error on its first ``failures`` calls."""
    calls: list[int] = []

    def hook(module: Any, args: Any) -> None:
        calls.append(1)
        if len(calls) <= failures:
            raise RuntimeError(MPS_OOM)

    pipe.unet.register_forward_pre_hook(hook)
    return calls


def test_prepared_call_retries_out_of_memory_with_the_stricter_plan() -> None:
    from mps_helpers import plan_of

    kwargs = {"prompt": ["a cat", "a dog"], **SMALL}

    def generators() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]

    reference = _prepared(_tiny(), oom_retry=True)(**kwargs, generator=generators()).images
    pipe = _prepared(_tiny(), oom_retry=True)
    plan = plan_of(pipe)
    _fail_first_unet_calls(pipe, 1)
    environ = dict(os.environ)
    with pytest.warns(OutOfMemoryRetryWarning) as record:
        images = pipe(**kwargs, generator=generators()).images
    assert record[0].filename == __file__
    assert dict(os.environ) == environ
    np.testing.assert_allclose(images, reference, atol=1e-4)
    kept = plan_of(pipe)
    assert kept == _plan.stricter_plan(plan)
    assert kept is not None
    assert kept.batch_to_loop
    assert pipe.vae.use_slicing
    assert pipe.vae.use_tiling


def test_prepared_call_gives_up_after_one_retry() -> None:
    pipe = _prepared(_tiny(), oom_retry=True)
    calls = _fail_first_unet_calls(pipe, 10**6)
    environ = dict(os.environ)
    with pytest.raises(DeviceOutOfMemoryError, match="retried once") as info:
        pipe(prompt="a cat", **SMALL)
    cause = info.value.__cause__
    assert cause is not None
    assert _oom_retry.is_out_of_memory(cause)
    assert len(calls) == 2
    assert dict(os.environ) == environ


def test_prepared_call_warns_on_swap_growth(readings: list[MemoryInfo]) -> None:
    pipe = _prepared(_tiny(), memory_watch=True)
    readings += [swap(100), swap(1000)]
    with pytest.warns(MemoryPressureWarning, match="Swap grew by 900 MiB") as record:
        pipe(prompt="a cat", **SMALL)
    assert record[0].filename == __file__
