"""Tests of the prepared call: fast path, batch-to-loop exactness, callbacks, errors, progress.

Most tests drive :func:`mps_helpers._call.prepared_call` directly with a hand-made plan (any
object with the Plan fields), on real tiny pipelines from :mod:`mps_helpers.testing`, and
compare with the pipeline's own batched call. Equivalence is "max abs difference within
``mps_helpers.loop_tolerance(dtype)``" (1e-4 in float32) on images in [0, 1] (PIL images are
divided by 255), the figures of docs/explanation/batch-and-warmup.md.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch
from _call_fakes import Spy, make_plan

import mps_helpers
from mps_helpers import _call, _nan_guard
from mps_helpers._call import prepared_call
from mps_helpers.testing import tiny_pipeline

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

TOLERANCE = mps_helpers.loop_tolerance("float32")
SIZE = {"height": 32, "width": 32, "num_inference_steps": 2}


def run(pipe: Any, plan: Any, *args: Any, spy: Spy | None = None, **kwargs: Any) -> Any:
    """Call ``pipe`` through the prepared call under ``plan``."""
    pipe._mps_helpers_plan = plan
    try:
        call = spy.call if spy is not None else functools.partial(type(pipe).__call__, pipe)
        return prepared_call(pipe, call, args, kwargs)
    finally:
        del pipe._mps_helpers_plan


def as_array(images: Any) -> np.ndarray:
    """Return images (PIL list, ndarray or tensor) as one float ndarray in the same layout."""
    if isinstance(images, list):
        return np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in images])
    if isinstance(images, torch.Tensor):
        return images.detach().cpu().numpy()
    return np.asarray(images)


def max_diff(a: Any, b: Any) -> float:
    return float(np.abs(as_array(a) - as_array(b)).max())


def generators(count: int, start: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(start + i) for i in range(count)]


@pytest.fixture(scope="module")
def sd() -> Any:
    return tiny_pipeline("sd")


@pytest.fixture(scope="module")
def img2img() -> Any:
    return tiny_pipeline("sd-img2img")


LOOP = make_plan(batch_to_loop=True)
PROMPTS = ["a red cube", "a blue ball"]


# ---------------------------------------------------------------------------------------
# Pass-through


def test_fast_path_is_the_raw_call() -> None:
    seen: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    result = object()

    def call(*args: Any, **kwargs: Any) -> object:
        seen.append((args, kwargs))
        return result

    prompts = ["a", "b"]
    pipe = SimpleNamespace(_mps_helpers_plan=make_plan())
    assert prepared_call(pipe, call, (prompts, 32), {"width": 32}) is result
    assert seen == [((prompts, 32), {"width": 32})]
    assert seen[0][0][0] is prompts


def test_a_pipeline_without_a_plan_gets_the_raw_call() -> None:
    pipe = SimpleNamespace()
    assert prepared_call(pipe, lambda *a, **k: (a, k), ("x",), {"y": 1}) == (("x",), {"y": 1})


@pytest.mark.parametrize("feature", ["nan_guard", "oom_retry", "memory_watch"])
def test_batched_call_passes_through_when_the_plan_does_not_loop(sd: Any, feature: str) -> None:
    spy = Spy(sd)
    out = run(sd, make_plan(**{feature: True}), PROMPTS, spy=spy, output_type="np", **SIZE)
    assert len(spy.calls) == 1
    assert spy.calls[0]["prompt"] == PROMPTS
    assert out.images.shape == (2, 32, 32, 3)


def test_a_single_prompt_is_not_looped(sd: Any) -> None:
    spy = Spy(sd)
    run(sd, LOOP, ["only one"], spy=spy, output_type="latent", **SIZE)
    assert [call["prompt"] for call in spy.calls] == [["only one"]]


# ---------------------------------------------------------------------------------------
# Batch-to-loop: exactness


@pytest.mark.parametrize("per_prompt", [1, 2])
@pytest.mark.parametrize("output_type", ["pil", "np", "pt", "latent"])
def test_loop_equals_batch_with_a_generator_list(
    sd: Any, output_type: str, per_prompt: int
) -> None:
    options = {
        "negative_prompt": ["blurry", "dark"],
        "num_images_per_prompt": per_prompt,
        "output_type": output_type,
        **SIZE,
    }
    batched = sd(PROMPTS, generator=generators(2 * per_prompt), **options)
    spy = Spy(sd)
    looped = run(sd, LOOP, PROMPTS, spy=spy, generator=generators(2 * per_prompt), **options)

    assert [call["prompt"] for call in spy.calls] == [PROMPTS[:1], PROMPTS[1:]]
    assert [call["negative_prompt"] for call in spy.calls] == [["blurry"], ["dark"]]
    assert type(looped) is type(batched)
    assert type(looped.images) is type(batched.images)
    assert looped.nsfw_content_detected is None
    assert len(looped.images) == 2 * per_prompt
    if output_type != "pil":
        assert looped.images.shape == batched.images.shape
    assert max_diff(looped.images, batched.images) <= TOLERANCE


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_loop_is_within_the_dtypes_tolerance(dtype: str) -> None:
    # What loop_tolerance promises, in each dtype a plan chooses (measured far inside it on
    # this CPU: tests/benchmarks/loop_exactness.py).
    pipe = tiny_pipeline("sd").to(getattr(torch, dtype))
    options = {"output_type": "np", **SIZE}
    batched = pipe(PROMPTS, generator=generators(2), **options)
    looped = run(pipe, LOOP, PROMPTS, generator=generators(2), **options)
    assert max_diff(looped.images, batched.images) <= mps_helpers.loop_tolerance(dtype)


def test_loop_tolerance_reads_dtypes_and_names() -> None:
    assert mps_helpers.loop_tolerance(torch.bfloat16) == mps_helpers.loop_tolerance("bfloat16")
    tolerances = [mps_helpers.loop_tolerance(d) for d in ("float32", "float16", "bfloat16")]
    assert tolerances == sorted(tolerances)  # coarser dtypes round more
    with pytest.raises(ValueError, match="dtype must be one of float32, float16, bfloat16"):
        mps_helpers.loop_tolerance(torch.float64)


def test_the_equivalence_check_would_see_wrongly_split_generators(sd: Any) -> None:
    # A control for the tolerance above: handing the prompts each other's generators (what
    # a wrong split would do) is far outside it.
    batched = sd(PROMPTS, generator=generators(2), output_type="np", **SIZE)
    swapped = sd(PROMPTS, generator=generators(2)[::-1], output_type="np", **SIZE)
    assert max_diff(swapped.images, batched.images) > 100 * TOLERANCE


def test_loop_returns_a_tuple_for_return_dict_false(sd: Any) -> None:
    options = {"output_type": "np", "return_dict": False, **SIZE}
    batched = sd(PROMPTS, generator=generators(2), **options)
    looped = run(sd, LOOP, PROMPTS, generator=generators(2), **options)
    assert isinstance(looped, tuple)
    assert len(looped) == 2
    assert looped[1] is None
    assert max_diff(looped[0], batched[0]) <= TOLERANCE


def test_loop_splits_batched_prompt_embeds(sd: Any) -> None:
    with torch.no_grad():
        embeds, negative = sd.encode_prompt(PROMPTS, "cpu", 1, True, ["blurry", "dark"])
    options = {"prompt_embeds": embeds, "negative_prompt_embeds": negative, **SIZE}
    batched = sd(generator=generators(2), output_type="np", **options)
    spy = Spy(sd)
    looped = run(sd, LOOP, spy=spy, generator=generators(2), output_type="np", **options)
    assert len(spy.calls) == 2
    assert torch.equal(spy.calls[1]["prompt_embeds"], embeds[1:])
    assert max_diff(looped.images, batched.images) <= TOLERANCE


def test_loop_with_one_generator_matches_the_batch_under_ddim(sd: Any) -> None:
    assert type(sd.scheduler).__name__ == "DDIMScheduler"
    options = {"output_type": "np", "num_images_per_prompt": 2, **SIZE}
    batched = sd(PROMPTS, generator=torch.Generator().manual_seed(7), **options)
    spy = Spy(sd)
    looped = run(sd, LOOP, PROMPTS, spy=spy, generator=torch.Generator().manual_seed(7), **options)
    # the batch's initial latents were drawn once and handed out two per prompt
    assert [tuple(call["latents"].shape) for call in spy.calls] == [(2, 4, 16, 16)] * 2
    assert max_diff(looped.images, batched.images) <= TOLERANCE


@pytest.fixture
def ancestral(sd: Any) -> Iterator[Any]:
    """The tiny SD pipeline with an ancestral (stochastic) scheduler, Euler a."""
    from diffusers import EulerAncestralDiscreteScheduler

    ddim = sd.scheduler
    sd.scheduler = EulerAncestralDiscreteScheduler.from_config(ddim.config)
    yield sd
    sd.scheduler = ddim


def test_loop_with_a_generator_list_matches_the_batch_under_an_ancestral_scheduler(
    ancestral: Any,
) -> None:
    options = {"output_type": "np", "num_images_per_prompt": 2, **SIZE}
    batched = ancestral(PROMPTS, generator=generators(4), **options)
    looped = run(ancestral, LOOP, PROMPTS, generator=generators(4), **options)
    assert max_diff(looped.images, batched.images) <= TOLERANCE


def test_loop_with_one_generator_differs_under_an_ancestral_scheduler(ancestral: Any) -> None:
    # Documented: the batch draws each step's noise for all prompts at once, the loop per
    # prompt; only the first prompt's images, whose step noise comes first, agree.
    options = {"output_type": "np", **SIZE}
    batched = ancestral(PROMPTS, generator=torch.Generator().manual_seed(2), **options)
    looped = run(ancestral, LOOP, PROMPTS, generator=torch.Generator().manual_seed(2), **options)
    assert max_diff(looped.images[1:], batched.images[1:]) > 10 * TOLERANCE


def test_loop_without_a_generator_matches_the_batch_under_ddim(sd: Any) -> None:
    torch.manual_seed(3)
    batched = sd(PROMPTS, output_type="np", **SIZE)
    torch.manual_seed(3)
    looped = run(sd, LOOP, PROMPTS, output_type="np", **SIZE)
    assert max_diff(looped.images, batched.images) <= TOLERANCE


def test_loop_with_one_generator_matches_the_batch_on_sdxl() -> None:
    # SDXL: Euler scheduler, whose init_noise_sigma scales the given latents too.
    pipe = tiny_pipeline("sdxl")
    options = {"output_type": "np", **SIZE}
    batched = pipe(PROMPTS, generator=torch.Generator().manual_seed(1), **options)
    spy = Spy(pipe)
    looped = run(
        pipe, LOOP, PROMPTS, spy=spy, generator=torch.Generator().manual_seed(1), **options
    )
    assert all(tuple(call["latents"].shape) == (1, 4, 16, 16) for call in spy.calls)
    assert max_diff(looped.images, batched.images) <= TOLERANCE


def _images(count: int) -> list[Any]:
    from PIL import Image

    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(count)
    ]


def test_img2img_loop_splits_per_prompt_images(img2img: Any) -> None:
    options = {"output_type": "np", "strength": 1.0, **SIZE}
    images = _images(2)
    batched = img2img(PROMPTS, image=images, generator=generators(2), **options)
    spy = Spy(img2img)
    looped = run(img2img, LOOP, PROMPTS, spy=spy, image=images, generator=generators(2), **options)
    assert [call["image"] for call in spy.calls] == [images[:1], images[1:]]
    assert max_diff(looped.images, batched.images) <= TOLERANCE


def test_img2img_loop_gives_a_single_image_to_every_prompt(img2img: Any) -> None:
    options = {"output_type": "np", "strength": 1.0, **SIZE}
    (image,) = _images(1)
    batched = img2img(PROMPTS, image=image, generator=generators(2), **options)
    spy = Spy(img2img)
    looped = run(img2img, LOOP, PROMPTS, spy=spy, image=image, generator=generators(2), **options)
    assert all(call["image"] is image for call in spy.calls)
    assert max_diff(looped.images, batched.images) <= TOLERANCE


def test_inpaint_loop_splits_per_prompt_images_and_masks() -> None:
    from PIL import Image

    pipe = tiny_pipeline("sd-inpaint")
    images = _images(2)
    masks = [Image.new("L", (32, 32), 0), Image.new("L", (32, 32), 255)]
    options = {"image": images, "mask_image": masks, "output_type": "np", **SIZE}
    batched = pipe(PROMPTS, generator=generators(2), **options)
    spy = Spy(pipe)
    looped = run(pipe, LOOP, PROMPTS, spy=spy, generator=generators(2), **options)
    assert [call["mask_image"] for call in spy.calls] == [masks[:1], masks[1:]]
    assert max_diff(looped.images, batched.images) <= TOLERANCE


def test_loop_equals_batch_on_a_transformer_pipeline() -> None:
    # SD3: no UNet, so no latents are drawn ahead; a generator list still reproduces the batch.
    pipe = tiny_pipeline("sd3")
    options = {"negative_prompt": ["blurry", "dark"], "output_type": "np", **SIZE}
    batched = pipe(PROMPTS, generator=generators(2), **options)
    spy = Spy(pipe)
    looped = run(pipe, LOOP, PROMPTS, spy=spy, generator=generators(2), **options)
    assert len(spy.calls) == 2
    assert max_diff(looped.images, batched.images) <= TOLERANCE


def test_img2img_loop_threads_one_generator_through_the_prompts(img2img: Any) -> None:
    # img2img's starting latents come from the image: no latents are drawn ahead, and the
    # one generator is handed to each prompt in turn (documented to differ from the batch).
    generator = torch.Generator().manual_seed(0)
    spy = Spy(img2img)
    looped = run(
        img2img,
        LOOP,
        PROMPTS,
        spy=spy,
        image=_images(2),
        generator=generator,
        output_type="np",
        **SIZE,
    )
    assert all(call["generator"] is generator and "latents" not in call for call in spy.calls)
    assert looped.images.shape == (2, 32, 32, 3)


# ---------------------------------------------------------------------------------------
# Callbacks and progress


@pytest.mark.filterwarnings("ignore:Passing `callback.*:FutureWarning")
def test_callbacks_fire_at_every_step_of_every_prompt(sd: Any) -> None:
    steps: list[tuple[int, tuple[int, ...]]] = []
    legacy: list[int] = []

    def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        steps.append((step, tuple(tensors["latents"].shape)))
        return tensors

    run(
        sd,
        LOOP,
        [*PROMPTS, "a green cone"],
        output_type="latent",
        callback_on_step_end=on_step_end,
        callback=lambda step, timestep, latents: legacy.append(step),
        callback_steps=1,
        **SIZE,
    )
    assert steps == [(0, (1, 4, 16, 16)), (1, (1, 4, 16, 16))] * 3
    assert legacy == [0, 1] * 3


def test_one_progress_bar_counts_prompts(sd: Any, capsys: pytest.CaptureFixture[str]) -> None:
    sd.set_progress_bar_config(desc="tiny")
    try:
        run(sd, LOOP, [*PROMPTS, "a green cone"], output_type="latent", **SIZE)
        assert sd._progress_bar_config == {"desc": "tiny"}
    finally:
        sd.set_progress_bar_config(disable=True)
    err = capsys.readouterr().err
    assert "tiny" in err
    assert "3/3" in err
    assert "prompt" in err
    assert "2/2" not in err  # the per-step bars of the iterations were silent


def test_progress_bar_honours_disable(sd: Any, capsys: pytest.CaptureFixture[str]) -> None:
    sd.set_progress_bar_config(disable=True)
    run(sd, LOOP, PROMPTS, output_type="latent", **SIZE)
    assert capsys.readouterr().err == ""
    assert sd._progress_bar_config == {"disable": True}


def test_the_loop_never_calls_the_pipelines_progress_bar(sd: Any) -> None:
    # Kandinsky 2.2's combined pipeline overrides progress_bar (returning None, and turning
    # on model offloading): the prompt bar must not come from it.
    calls: list[dict[str, Any]] = []

    def overridden(iterable: Any = None, total: Any = None) -> None:
        calls.append({"total": total})

    sd.progress_bar = overridden
    try:
        with pytest.raises(TypeError):  # the pipeline's own loop uses it, and fails
            run(sd, LOOP, [*PROMPTS, "a green cone"], output_type="latent", **SIZE)
    finally:
        del sd.progress_bar
    assert calls == [{"total": 2}]  # the first prompt's 2 steps; never the loop's 3 prompts


# ---------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"negative_prompt": ["x", "y", "z"]}, "negative_prompt has 3 items but the batch has 2"),
        ({"generator": generators(3)}, "generator has 3 items but the batch has 4"),
        ({"latents": torch.zeros(2, 4, 16, 16)}, "latents has 2 items but the batch has 4"),
    ],
)
def test_mismatched_lengths_fail_before_any_call(
    sd: Any, kwargs: dict[str, Any], message: str
) -> None:
    spy = Spy(sd)
    plan = make_plan(batch_to_loop=True, warmup=True)
    with pytest.raises(ValueError, match=message):
        run(sd, plan, PROMPTS, spy=spy, num_images_per_prompt=2, **kwargs, **SIZE)
    assert spy.calls == []  # neither the warmup nor a prompt ran


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (([],), {}, "prompt is an empty list: pass at least one prompt"),
        ((), {"prompt": []}, "prompt is an empty list: pass at least one prompt"),
        (("x",), {"num_inference_steps": 0}, "num_inference_steps must be at least 1, got 0"),
        (("x", 32, 32, -1), {}, "num_inference_steps must be at least 1, got -1"),
    ],
)
@pytest.mark.parametrize("plan", [make_plan(), make_plan(batch_to_loop=True, warmup=True)])
def test_arguments_no_pipeline_can_run_fail_before_any_call(
    sd: Any, plan: Any, args: tuple[Any, ...], kwargs: dict[str, Any], message: str
) -> None:
    # Unprepared, diffusers ends in an IndexError (the tokenizer, for []) or a
    # ZeroDivisionError (the scheduler, for 0 steps), after the text encoder has run.
    spy = Spy(sd)
    with pytest.raises(ValueError, match=message):
        run(sd, plan, *args, spy=spy, **kwargs)
    assert spy.calls == []  # neither the warmup nor the pipeline ran


def test_a_prepared_pipeline_rejects_an_empty_prompt_list_and_zero_steps() -> None:
    pipe = mps_helpers.prepare_pipeline(tiny_pipeline("sd"), device="cpu")
    with pytest.raises(ValueError, match="prompt is an empty list"):
        pipe([], **SIZE)
    with pytest.raises(ValueError, match="num_inference_steps must be at least 1, got 0"):
        pipe("a fox", height=32, width=32, num_inference_steps=0)


def test_valid_steps_and_prompts_pass_the_check() -> None:
    # Checked without binding: steps given by name or by position, a one-item list, and
    # a call whose signature takes *args are all left alone.
    def call(
        prompt: Any = None, height: int = 0, width: int = 0, num_inference_steps: int = 1
    ) -> str:
        return "ran"

    pipe = SimpleNamespace(_mps_helpers_plan=make_plan())
    assert prepared_call(pipe, call, (["x"], 32, 32, 1), {}) == "ran"
    assert prepared_call(pipe, lambda *a, **k: "ran", ([],), {}) == "ran"
    assert prepared_call(pipe, call, (), {"prompt": "x", "num_inference_steps": True}) == "ran"


@pytest.mark.parametrize(("prompts", "fail_at"), [(3, 1), (3, 2), (2, 0)])
def test_a_failing_prompt_keeps_the_finished_ones(sd: Any, prompts: int, fail_at: int) -> None:
    spy = Spy(sd, fail_at=fail_at)
    sd.set_progress_bar_config(disable=True, desc="kept")
    with pytest.raises(mps_helpers.BatchError, match=f"prompt {fail_at} of a batch") as info:
        run(sd, LOOP, [f"prompt {i}" for i in range(prompts)], spy=spy, output_type="np", **SIZE)
    error = info.value
    assert error.index == fail_at
    assert isinstance(error.__cause__, RuntimeError)
    assert str(error.__cause__) == "injected failure"
    if fail_at == 0:
        assert error.completed is None
    else:
        assert type(error.completed).__name__ == "StableDiffusionPipelineOutput"
        assert error.completed.images.shape == (fail_at, 32, 32, 3)
    assert sd._progress_bar_config == {"disable": True, "desc": "kept"}
    sd.set_progress_bar_config(disable=True)


# ---------------------------------------------------------------------------------------
# Hooks: guards and mps memory


def _fake_call(**kwargs: Any) -> tuple[list[Any], None]:
    return (list(kwargs["prompt"]), None)


def test_each_prompt_goes_through_the_nan_guard_and_the_whole_through_recovery(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[str] = []

    def recovery(
        pipe: Any, plan: Any, run_all: Callable[..., Any], kwargs: Any, **options: Any
    ) -> Any:
        seen.append("recovery")
        return run_all(kwargs, plan)

    def nan_guard(pipe: Any, plan: Any, call: Callable[..., Any], kwargs: Any) -> Any:
        seen.append(f"nan_guard {kwargs['prompt']}")
        return call(**kwargs)

    monkeypatch.setattr(_call, "call_with_recovery", recovery)
    monkeypatch.setattr(_nan_guard, "call_with_nan_guard", nan_guard)
    pipe = SimpleNamespace(_mps_helpers_plan=make_plan(batch_to_loop=True))
    out = prepared_call(pipe, _fake_call, (), {"prompt": ["a", "b"]})
    assert out == (["a", "b"], None)
    assert seen == ["recovery", "nan_guard ['a']", "nan_guard ['b']"]


@pytest.mark.parametrize(
    ("device", "tight", "expected"), [("mps", True, 2), ("mps", False, 0), ("cpu", True, 0)]
)
def test_mps_cache_is_emptied_between_prompts_when_memory_is_tight(
    monkeypatch: pytest.MonkeyPatch, device: str, tight: bool, expected: int
) -> None:
    emptied: list[int] = []
    monkeypatch.setattr(torch.mps, "empty_cache", lambda: emptied.append(1))
    plan = make_plan(batch_to_loop=True, device=device, memory_tight=tight)
    pipe = SimpleNamespace(_mps_helpers_plan=plan)
    prepared_call(pipe, _fake_call, (), {"prompt": ["a", "b", "c"]})
    assert len(emptied) == expected


def test_the_latent_draw_is_skipped_for_unknown_families() -> None:
    pipe = SimpleNamespace(unet=None)
    assert _call._initial_latents(pipe, {}, 2, None) is None


# ---------------------------------------------------------------------------------------
# End to end, through prepare_pipeline


class UNetCounter:
    """Count the UNet's forward passes (one per denoising step of a call), optionally failing."""

    def __init__(self, pipe: Any, fail_at: int | None = None) -> None:
        self.count = 0
        self.fail_at = fail_at
        self.handle = pipe.unet.register_forward_pre_hook(self._hook)

    def _hook(self, module: Any, args: Any) -> None:
        self.count += 1
        if self.fail_at is not None and self.count == self.fail_at + 1:
            raise RuntimeError("injected UNet failure")


@pytest.fixture(scope="module")
def twins() -> tuple[Any, Any]:
    """Two identical tiny SD pipelines: one left raw, one prepared to loop and warm up."""
    raw, prepared = tiny_pipeline("sd"), tiny_pipeline("sd")
    mps_helpers.prepare_pipeline(prepared, device="cpu", batch_to_loop=True, warmup=True)
    return raw, prepared


def test_prepared_pipeline_warms_up_once_then_loops_and_matches_the_batch(
    twins: tuple[Any, Any],
) -> None:
    raw, prepared = twins
    assert isinstance(prepared, type(raw))
    assert type(prepared).__name__ == type(raw).__name__
    counter = UNetCounter(prepared)
    try:
        options = {"negative_prompt": ["blurry", "dark"], "output_type": "np", **SIZE}
        first = prepared(PROMPTS, generator=generators(2), **options)
        assert counter.count == 1 + 2 * 2  # the 1-step warmup, then two prompts of two steps
        counter.count = 0
        # positional arguments bind to their names: prompt, height, width, steps
        second = prepared(PROMPTS, 32, 32, 2, generator=generators(2), output_type="np")
        assert counter.count == 2 * 2  # two prompts of two steps, no warmup
    finally:
        counter.handle.remove()
    batched = raw(PROMPTS, generator=generators(2), **options)
    assert max_diff(first.images, batched.images) <= TOLERANCE
    assert second.images.shape == (2, 32, 32, 3)


def test_prepared_pipeline_keeps_finished_prompts_when_one_fails(twins: tuple[Any, Any]) -> None:
    _, prepared = twins
    mps_helpers.warmup(prepared, prompt="a", height=32, width=32)
    counter = UNetCounter(prepared, fail_at=2)  # prompt 0: steps 0-1; prompt 1 fails
    try:
        with pytest.raises(mps_helpers.BatchError) as info:
            prepared([*PROMPTS, "a green cone"], output_type="pil", **SIZE)
    finally:
        counter.handle.remove()
    assert info.value.index == 1
    assert str(info.value.__cause__) == "injected UNet failure"
    assert len(info.value.completed.images) == 1
    assert info.value.completed.images[0].size == (32, 32)


def test_prepared_pipeline_with_everything_off_takes_the_fast_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    raw, prepared = tiny_pipeline("sd"), tiny_pipeline("sd")
    off = dict.fromkeys(
        ("warmup", "batch_to_loop", "nan_guard", "oom_retry", "memory_watch"), False
    )
    mps_helpers.prepare_pipeline(prepared, device="cpu", **off)

    def no_binding(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the fast path must not bind arguments")

    monkeypatch.setattr(_call, "bind_call", no_binding)
    out = prepared(PROMPTS, generator=generators(2), output_type="np", **SIZE)
    expected = raw(PROMPTS, generator=generators(2), output_type="np", **SIZE)
    assert np.array_equal(out.images, expected.images)
