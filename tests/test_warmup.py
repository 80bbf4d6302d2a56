"""Tests of the one-time warmup: once per pipeline, invisible to results, RNG and callbacks."""

from __future__ import annotations

import functools
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch
from _call_fakes import Spy
from _call_fakes import make_plan as _make_plan

import mps_helpers
from mps_helpers import _warmup
from mps_helpers._call import prepared_call
from mps_helpers.testing import tiny_pipeline

if TYPE_CHECKING:
    from collections.abc import Iterator

SIZE = {"height": 32, "width": 32, "num_inference_steps": 2}


# Like the prepared call's tests' plans, but with the warmup on.
make_plan = functools.partial(_make_plan, warmup=True)


@pytest.fixture(scope="module")
def shared_sd() -> Any:
    return tiny_pipeline("sd")


@pytest.fixture
def sd(shared_sd: Any) -> Iterator[Any]:
    """The module's tiny SD pipeline, not warmed up, with a warmup plan while the test runs."""
    _warmup._warmed.pop(shared_sd, None)
    shared_sd._mps_helpers_plan = make_plan()
    yield shared_sd
    del shared_sd._mps_helpers_plan
    _warmup._warmed.pop(shared_sd, None)
    shared_sd.set_progress_bar_config(disable=True)


class FakePipe:
    """A hashable stand-in pipeline for tests that need no real model."""

    def __init__(self, plan: Any) -> None:
        self._mps_helpers_plan = plan


def fake_call(  # noqa: PLR0917 - the positional signature of a diffusers pipeline call
    prompt: Any = None,
    height: int | None = None,
    width: int | None = None,
    num_inference_steps: int = 50,
    num_images_per_prompt: int = 1,
    generator: Any = None,
    **kwargs: Any,
) -> Any:
    return {"prompt": prompt, "steps": num_inference_steps}


# ---------------------------------------------------------------------------------------
# Once, at the first call's size


def test_first_call_warms_up_once_at_its_size(sd: Any) -> None:
    spy = Spy(sd)
    seen: list[int] = []

    def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> Any:
        seen.append(step)
        return tensors

    generator = torch.Generator().manual_seed(0)
    options = {"output_type": "np", "callback_on_step_end": on_step_end, **SIZE}
    prepared_call(
        sd, spy.call, (["a red cube", "a blue ball"],), {"generator": generator, **options}
    )
    prepared_call(sd, spy.call, ("again",), options)

    assert [call["num_inference_steps"] for call in spy.calls] == [1, 2, 2]
    warm = spy.calls[0]
    assert (warm["height"], warm["width"]) == (32, 32)
    assert warm["prompt"] == ["a red cube"]  # the first prompt only
    assert warm["num_images_per_prompt"] == 1
    assert warm["generator"] is not generator
    assert "callback_on_step_end" not in warm
    assert seen == [0, 1, 0, 1]  # the user's callback saw the real calls only


def test_warmup_is_once_per_pipeline_across_threads() -> None:
    lock = threading.Lock()
    counts = {"warmup": 0, "real": 0}

    def slow_call(**kwargs: Any) -> Any:
        if kwargs.get("num_inference_steps") == 1:
            time.sleep(0.05)  # a wide window for other threads to arrive
        with lock:
            counts["warmup" if kwargs["num_inference_steps"] == 1 else "real"] += 1
        return fake_call(**kwargs)

    call = functools.wraps(fake_call)(slow_call)
    pipe = FakePipe(make_plan())
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def worker() -> None:
        start.wait()
        try:
            prepared_call(pipe, call, ("a",), {"num_inference_steps": 3})
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert counts == {"warmup": 1, "real": 8}


def test_warmup_runs_again_for_a_new_device_or_dtype_only() -> None:
    steps: list[int] = []

    def call(**kwargs: Any) -> Any:
        steps.append(kwargs["num_inference_steps"])
        return fake_call(**kwargs)

    pipe = FakePipe(make_plan())
    wrapped = functools.wraps(fake_call)(call)
    for plan in (
        make_plan(),
        make_plan(),
        make_plan(dtype=torch.float16),
        make_plan(device="mps", dtype=torch.float16),
        make_plan(),
    ):
        pipe._mps_helpers_plan = plan
        prepared_call(pipe, wrapped, (), {"prompt": "a", "num_inference_steps": 4})
    assert steps == [1, 4, 4, 1, 4, 1, 4, 4]


def test_no_warmup_when_the_plan_says_so(sd: Any) -> None:
    sd._mps_helpers_plan = make_plan(warmup=False, nan_guard=True)
    spy = Spy(sd)
    prepared_call(sd, spy.call, ("a",), {"output_type": "latent", **SIZE})
    assert [call["num_inference_steps"] for call in spy.calls] == [2]


# ---------------------------------------------------------------------------------------
# Invisible: results, generators, global RNG, progress bars


def test_warmed_output_equals_unwarmed_and_leaves_the_generator_as_it_would(sd: Any) -> None:
    options = {"output_type": "np", **SIZE}
    unwarmed_generator = torch.Generator().manual_seed(5)
    unwarmed = sd("a red cube", generator=unwarmed_generator, **options)
    spy = Spy(sd)
    warmed_generator = torch.Generator().manual_seed(5)
    warmed = prepared_call(
        sd, spy.call, ("a red cube",), {"generator": warmed_generator, **options}
    )
    assert len(spy.calls) == 2  # the warmup happened
    assert np.array_equal(warmed.images, unwarmed.images)
    assert torch.equal(warmed_generator.get_state(), unwarmed_generator.get_state())


def test_warmup_leaves_the_global_rng_alone(sd: Any) -> None:
    before = torch.get_rng_state()
    _warmup.ensure_warm(sd, sd._mps_helpers_plan, Spy(sd).call, {"prompt": "a", **SIZE})
    assert torch.equal(torch.get_rng_state(), before)


def test_warmup_restores_the_global_rng_even_when_the_pipeline_draws_from_it() -> None:
    def greedy(**kwargs: Any) -> Any:
        torch.randn(100)
        return fake_call(**kwargs)

    before = torch.get_rng_state()
    pipe = FakePipe(make_plan())
    _warmup.ensure_warm(pipe, pipe._mps_helpers_plan, functools.wraps(fake_call)(greedy), {})
    assert torch.equal(torch.get_rng_state(), before)


def test_warmup_shows_no_progress_bar(sd: Any, capsys: pytest.CaptureFixture[str]) -> None:
    sd.set_progress_bar_config(desc="visible")
    _warmup.ensure_warm(sd, sd._mps_helpers_plan, Spy(sd).call, {"prompt": "a", **SIZE})
    assert capsys.readouterr().err == ""
    assert sd._progress_bar_config == {"desc": "visible"}


def test_img2img_warmup_works_at_any_strength() -> None:
    from PIL import Image

    pipe = tiny_pipeline("sd-img2img")
    pipe._mps_helpers_plan = make_plan()
    spy = Spy(pipe)
    image = Image.new("RGB", (32, 32), "gray")
    # one step at strength 0.5 would leave no step at all: the warmup runs at strength 1
    options = {"image": image, "strength": 0.5, "height": 32, "width": 32}
    prepared_call(pipe, spy.call, ("a",), {**options, "num_inference_steps": 4})
    assert [(call["num_inference_steps"], call["strength"]) for call in spy.calls] == [
        (1, 1.0),
        (4, 0.5),
    ]


# ---------------------------------------------------------------------------------------
# Failure


def test_a_failed_warmup_says_so_and_the_pipeline_stays_usable(sd: Any) -> None:
    spy = Spy(sd, fail_at=0)
    options = {"output_type": "np", **SIZE}
    before = torch.get_rng_state()
    with pytest.raises(mps_helpers.WarmupError, match="warmup pass") as info:
        prepared_call(
            sd, spy.call, ("a",), {"generator": torch.Generator().manual_seed(1), **options}
        )
    assert str(info.value.__cause__) == "injected failure"
    assert len(spy.calls) == 1  # the real call did not run
    assert torch.equal(torch.get_rng_state(), before)
    assert sd._progress_bar_config == {"disable": True}

    again = prepared_call(
        sd, spy.call, ("a",), {"generator": torch.Generator().manual_seed(1), **options}
    )
    plain = sd("a", generator=torch.Generator().manual_seed(1), **options)
    assert [call["num_inference_steps"] for call in spy.calls] == [1, 2]  # no second warmup
    assert np.array_equal(again.images, plain.images)


# ---------------------------------------------------------------------------------------
# The explicit warmup


def test_explicit_warmup_front_loads_the_first_calls_warmup(sd: Any) -> None:
    before = torch.get_rng_state()
    mps_helpers.warmup(sd, prompt="a", height=32, width=32)
    assert torch.equal(torch.get_rng_state(), before)
    spy = Spy(sd)
    prepared_call(sd, spy.call, ("a",), {"output_type": "latent", **SIZE})
    assert [call["num_inference_steps"] for call in spy.calls] == [2]


def test_explicit_warmup_works_on_a_plain_pipeline(shared_sd: Any) -> None:
    mps_helpers.warmup(shared_sd, height=32, width=32)  # no prompt: an empty one is used
    _warmup._warmed.pop(shared_sd, None)


def test_a_refused_explicit_warmup_raises_the_pipelines_error_and_the_next_call_warms_up(
    sd: Any,
) -> None:
    with pytest.raises(ValueError, match="divisible by 8") as info:
        mps_helpers.warmup(sd, prompt="a", height=31, width=31)
    assert type(info.value) is ValueError  # the pipeline's own, not wrapped
    spy = Spy(sd)
    prepared_call(sd, spy.call, ("a",), {"output_type": "latent", **SIZE})
    assert [call["num_inference_steps"] for call in spy.calls] == [1, 2]


def test_re_preparing_for_the_same_device_and_dtype_does_not_warm_up_again() -> None:
    pipe = tiny_pipeline("sd")
    steps: list[int] = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: steps.append(1))
    try:
        mps_helpers.prepare_pipeline(pipe, device="cpu", warmup=True, batch_to_loop=False)
        pipe("a", output_type="latent", **SIZE)
        assert len(steps) == 1 + 2  # warmup, then the call
        mps_helpers.prepare_pipeline(pipe, device="cpu", warmup=True, batch_to_loop=True)
        pipe("a", output_type="latent", **SIZE)
        assert len(steps) == 1 + 2 + 2
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------
# The pipeline's own validation errors come out unchanged


def test_a_pipeline_refusing_the_first_calls_arguments_raises_its_own_error(
    sd: Any, caplog: pytest.LogCaptureFixture
) -> None:
    spy = Spy(sd)
    with pytest.raises(ValueError, match="divisible by 8") as info:
        prepared_call(sd, spy.call, ("a",), {"height": 31, "width": 31, "num_inference_steps": 2})
    assert type(info.value) is ValueError
    assert "refused the warmup pass" in caplog.text
    # the warmup counts as done: a good call next runs without one
    prepared_call(sd, spy.call, ("a",), {"output_type": "latent", **SIZE})
    assert [call["num_inference_steps"] for call in spy.calls] == [1, 2, 2]


def test_a_refused_warmup_lets_a_good_real_call_run() -> None:
    def picky(**kwargs: Any) -> Any:
        if kwargs.get("num_inference_steps") == 1:
            raise ValueError("one step is not enough for me")
        return fake_call(**kwargs)

    pipe = FakePipe(make_plan())
    result = prepared_call(pipe, functools.wraps(fake_call)(picky), ("a",), {})
    assert result == {"prompt": "a", "steps": 50}  # the default: fake_call ran unwarmed


def test_a_looped_batch_whose_first_prompt_is_refused_raises_the_pipelines_error(
    sd: Any,
) -> None:
    sd._mps_helpers_plan = make_plan(warmup=False, batch_to_loop=True)
    with pytest.raises(ValueError, match="divisible by 8") as info:
        prepared_call(sd, Spy(sd).call, (["a", "b"],), {"height": 31, "width": 31})
    assert type(info.value) is ValueError


# ---------------------------------------------------------------------------------------
# Steps the scheduler accepts, and the scheduler's state


class _NoSingleStep:
    """A scheduler stand-in that, like UnCLIPScheduler, cannot set one step."""

    config: dict[str, Any] = {}  # noqa: RUF012 - read only

    def set_timesteps(self, num_inference_steps: int, device: Any = None) -> None:
        self.step_ratio = 999 / (num_inference_steps - 1)


class _Staged:
    """A combined-pipeline stand-in: a prior stage and a decoder stage, each with steps."""

    def __init__(self, plan: Any) -> None:
        self._mps_helpers_plan = plan
        self.prior_scheduler = _NoSingleStep()
        self.seen: list[dict[str, Any]] = []

    @property
    def components(self) -> dict[str, Any]:
        return {"prior_scheduler": self.prior_scheduler}

    def __call__(
        self,
        prompt: Any = None,
        num_inference_steps: int = 10,
        prior_num_inference_steps: int = 25,
        prior_callback_on_step_end: Any = None,
        prior_timesteps: Any = None,
    ) -> Any:
        self.seen.append(
            {
                "steps": num_inference_steps,
                "prior_steps": prior_num_inference_steps,
                "prior_callback": prior_callback_on_step_end,
                "prior_timesteps": prior_timesteps,
            }
        )
        return prompt


def test_the_warmup_takes_the_fewest_steps_every_scheduler_accepts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    pipe = _Staged(make_plan())
    with caplog.at_level(logging.INFO, logger="mps_helpers._warmup"):
        prepared_call(
            pipe,
            functools.partial(_Staged.__call__, pipe),
            ("a",),
            {"prior_callback_on_step_end": print, "prior_timesteps": [999, 500]},
        )
    warm, real = pipe.seen
    assert (warm["steps"], warm["prior_steps"]) == (2, 2)
    assert warm["prior_callback"] is None
    assert warm["prior_timesteps"] is None
    assert real["prior_callback"] is print
    assert "one 2-step pass (_NoSingleStep refuses fewer)" in caplog.text


def test_the_warmup_leaves_the_schedulers_state_as_it_found_it() -> None:
    import diffusers

    class Counting(diffusers.DDIMScheduler):  # type: ignore[misc]
        def set_timesteps(self, *args: Any, **kwargs: Any) -> Any:
            self.history = []  # what a call starts from, as fresh state
            return super().set_timesteps(*args, **kwargs)

        def step(self, model_output: Any, timestep: Any, *args: Any, **kwargs: Any) -> Any:
            self.steps_taken = getattr(self, "steps_taken", 0) + 1
            self.history.append(int(timestep))
            return super().step(model_output, timestep, *args, **kwargs)

    pipe = tiny_pipeline("sd")
    pipe.scheduler = Counting.from_config(pipe.scheduler.config)
    plain = tiny_pipeline("sd")
    plain.scheduler = Counting.from_config(plain.scheduler.config)
    mps_helpers.prepare_pipeline(pipe, device="cpu", warmup=True, batch_to_loop=False)
    before = dict(vars(pipe.scheduler))
    for each in (pipe, plain):
        each("a", output_type="latent", **SIZE)
    assert "steps_taken" not in before
    assert pipe.scheduler.steps_taken == plain.scheduler.steps_taken == 2
    assert pipe.scheduler.history == plain.scheduler.history
    assert torch.equal(pipe.scheduler.timesteps, plain.scheduler.timesteps)


def test_a_step_counter_patched_onto_the_scheduler_class_sees_no_warmup_step() -> None:
    # As diffusers' SDXL mixture-of-denoisers test counts: a subclass whose step is patched.
    import diffusers

    seen: list[int] = []

    class Counted(diffusers.EulerDiscreteScheduler):  # type: ignore[misc]
        pass

    original = Counted.step

    def step(self: Any, model_output: Any, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(int(timestep))
        return original(self, model_output, timestep, *args, **kwargs)

    Counted.step = step
    pipe = tiny_pipeline("sdxl")
    pipe.scheduler = Counted.from_config(pipe.scheduler.config)
    mps_helpers.prepare_pipeline(pipe, device="cpu", warmup=True, batch_to_loop=False)
    pipe("a", output_type="latent", **SIZE)
    assert seen == [int(t) for t in pipe.scheduler.timesteps]
    assert len(seen) == 2
    assert type(pipe.scheduler) is Counted
    assert pipe.config["scheduler"][1] == "Counted"
