"""The contracts of the conformance suite: what every diffusers pipeline keeps, checked on one
pipeline at a time (raw, or prepared by mps_helpers).

They are the properties diffusers' ``PipelineTesterMixin`` checks on each family (batch
against single calls, ``num_*_per_prompt``, dict and tuple outputs, prompts against
precomputed embeddings, ``callback_on_step_end`` and its tensor inputs, guidance callbacks,
interrupting, saving and loading, ``to(dtype)``), written for this suite, plus what the
prepared call must leave intact: every output type merged, repeated calls identical, the
scheduler stepped only by the real call, the pipeline's own errors unchanged. Where a batch
is cheap the contract uses two prompts, so that a prepared pipeline runs its loop.

A contract raises AssertionError when the pipeline breaks it, or whatever the pipeline
raised.
"""

from __future__ import annotations

import dataclasses
import inspect
import tempfile
import traceback
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch

from mps_helpers import _warmup, prepare_pipeline

if TYPE_CHECKING:
    from collections.abc import Callable

    from _families import Family


# ---------------------------------------------------------------------------------------
# Raw and prepared


@dataclasses.dataclass
class Variant:
    """How the pipelines under test are made: ``wrap`` turns a fresh one into one to test."""

    name: str
    wrap: Callable[[Any], Any]
    _shared: dict[str, Any] = dataclasses.field(default_factory=dict)

    def fresh(self, family: Family) -> Any:
        """Return a new pipeline of ``family``, wrapped."""
        return self.wrap(family.build())

    def pipe(self, family: Family) -> Any:
        """Return this variant's shared pipeline of ``family``, not yet warmed up.

        Shared between contracts (building costs more than most contracts); each contract
        starts with the warmup to do again, so that every one runs through a first call.
        """
        pipe = self._shared.get(family.name)
        if pipe is None:
            pipe = self._shared[family.name] = self.fresh(family)
        _warmup._warmed.pop(pipe, None)
        return pipe


def _prepare(pipe: Any) -> Any:
    return prepare_pipeline(
        pipe, device="cpu", batch_to_loop=True, warmup=True, dtype=torch.float32
    )


VARIANTS = {"raw": Variant("raw", lambda pipe: pipe), "prepared": Variant("prepared", _prepare)}


# ---------------------------------------------------------------------------------------
# Helpers


def generators(count: int, start: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(start + i) for i in range(count)]


def to_np(value: Any) -> np.ndarray[Any, Any]:
    """Return an output (tensor, array, PIL image, or nested lists of them) as floats."""
    if isinstance(value, (list, tuple)):
        return np.stack([to_np(item) for item in value])
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().float().numpy()
    if isinstance(value, np.ndarray):
        return value.astype(np.float64)
    return np.asarray(value, dtype=np.float64) / 255.0  # a PIL image


def first(output: Any) -> Any:
    """Return an output's first field (``images``, ``frames``, ``audios``, ...)."""
    return output[0]


def assert_close(got: Any, want: Any, atol: float, what: str) -> None:
    got_np, want_np = to_np(got), to_np(want)
    assert got_np.shape == want_np.shape, f"{what}: shape {got_np.shape} != {want_np.shape}"
    diff = float(np.abs(got_np - want_np).max()) if got_np.size else 0.0
    assert diff <= atol, f"{what}: max difference {diff:.3g} > {atol:.3g}"


def _atol(family: Family, output_type: str) -> float:
    # PIL images are rounded to 1/255: one step of rounding either way
    return max(family.atol, 2.5 / 255) if output_type == "pil" else family.atol


def parameters(cls: type) -> Any:
    return inspect.signature(cls.__call__).parameters


def multiplicity(cls: type) -> str | None:
    return next(
        (
            name
            for name in parameters(cls)
            if name.startswith("num_") and name.endswith("_per_prompt")
        ),
        None,
    )


def has_callbacks(cls: type) -> bool:
    names = parameters(cls)
    return (
        "callback_on_step_end" in names
        and "callback_on_step_end_tensor_inputs" in names
        and hasattr(cls, "_callback_tensor_inputs")
    )


def call(pipe: Any, family: Family, indices: range, **extra: Any) -> Any:
    """Call ``pipe`` on the batch of prompts ``indices``, one generator per image."""
    kwargs = family.batch(indices)
    kwargs.setdefault("output_type", family.output_types[0])
    kwargs.setdefault("generator", generators(len(indices)))
    kwargs.update(extra)
    return pipe(**kwargs)


def single(pipe: Any, family: Family, i: int, **extra: Any) -> Any:
    """Call ``pipe`` on prompt ``i`` alone, with the generator that prompt gets in a batch."""
    kwargs = family.inputs(i)
    kwargs.setdefault("output_type", family.output_types[0])
    kwargs["generator"] = generators(1, start=i)
    kwargs.update(extra)
    return pipe(**kwargs)


# ---------------------------------------------------------------------------------------
# The contracts


def batch_single_identical(variant: Variant, family: Family) -> None:
    """Each image of a batch is the image of its prompt called alone (same generator)."""
    pipe = variant.pipe(family)
    batch = first(call(pipe, family, range(2)))
    assert len(batch) == 2, f"a batch of 2 prompts gave {len(batch)} results"
    for i in range(2):
        alone = first(single(pipe, family, i))
        assert_close(batch[i : i + 1], alone, family.atol, f"prompt {i} of the batch")


def output_types(variant: Variant, family: Family) -> None:
    """Every output type, as a tuple too, holds the batch's results in prompt order."""
    pipe = variant.pipe(family)
    for output_type in family.output_types:
        options = {"output_type": output_type, "return_dict": False}
        batch = call(pipe, family, range(2), **options)
        singles = [single(pipe, family, i, **options) for i in range(2)]
        # a tuple where the pipeline returns one (AudioLDM 2 and Stable Audio return their
        # output class for latents whatever return_dict says)
        assert type(batch) is type(singles[0]), f"{type(batch)} != {type(singles[0])}"
        result = batch[0]
        assert type(result) is type(singles[0][0]), f"{output_type}: {type(result)}"
        for i, alone in enumerate(singles):
            assert_close(result[i : i + 1], alone[0], _atol(family, output_type), output_type)


def num_per_prompt(variant: Variant, family: Family) -> None:
    """``num_*_per_prompt`` images for each of 1 or 2 prompts."""
    pipe = variant.pipe(family)
    name = multiplicity(type(pipe))
    assert name is not None
    for prompts in (1, 2):
        for per_prompt in (1, 2):
            kwargs = family.batch(range(prompts))
            kwargs.update({name: per_prompt, "output_type": family.output_types[0]})
            kwargs["generator"] = torch.Generator().manual_seed(0)
            result = first(pipe(**kwargs))
            assert len(result) == prompts * per_prompt, (
                f"{prompts} prompt(s) x {per_prompt} gave {len(result)}"
            )


def dict_tuple(variant: Variant, family: Family) -> None:
    """``return_dict=False`` returns the same results as the output class."""
    pipe = variant.pipe(family)
    as_dict = call(pipe, family, range(2))
    as_tuple = call(pipe, family, range(2), return_dict=False)
    assert isinstance(as_tuple, tuple)
    assert not isinstance(as_dict, tuple)
    assert_close(as_tuple[0], first(as_dict), family.atol, "tuple against dict")


def embeddings(variant: Variant, family: Family) -> None:
    """Precomputed embeddings of a batch's prompts give the prompts' results."""
    assert family.embed is not None
    pipe = variant.pipe(family)
    from_prompts = first(call(pipe, family, range(2)))
    kwargs = family.batch(range(2))
    with torch.no_grad():
        kwargs.update(family.embed(pipe, kwargs))
    kwargs.update(output_type=family.output_types[0], generator=generators(2))
    from_embeds = first(pipe(**kwargs))
    assert_close(from_embeds, from_prompts, max(family.atol, 1e-4), "embeddings")


def callback_inputs(variant: Variant, family: Family) -> None:
    """``callback_on_step_end`` sees the tensors asked for, and may change the latents."""
    pipe = variant.pipe(family)
    allowed = list(type(pipe)._callback_tensor_inputs)

    def subset(owner: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> Any:
        assert set(tensors) <= set(owner._callback_tensor_inputs), sorted(tensors)
        return tensors

    def every(owner: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> Any:
        assert set(tensors) == set(owner._callback_tensor_inputs), sorted(tensors)
        return tensors

    call(
        pipe,
        family,
        range(2),
        callback_on_step_end=subset,
        callback_on_step_end_tensor_inputs=["latents"],
    )
    call(
        pipe,
        family,
        range(2),
        callback_on_step_end=every,
        callback_on_step_end_tensor_inputs=allowed,
    )
    if "latent" not in family.output_types or not family.output_is_latents:
        return

    def zero_at_the_end(owner: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> Any:
        if step == owner.num_timesteps - 1:
            tensors["latents"] = torch.zeros_like(tensors["latents"])
        return tensors

    result = first(
        call(
            pipe,
            family,
            range(2),
            output_type="latent",
            callback_on_step_end=zero_at_the_end,
            callback_on_step_end_tensor_inputs=allowed,
        )
    )
    assert float(result.abs().sum()) == 0.0, "latents zeroed at the last step are not zero"


def callback_batch(variant: Variant, family: Family) -> None:
    """``callback_on_step_end`` fires once a step, with the whole batch's latents."""
    pipe = variant.pipe(family)
    rows: list[int] = []

    def count(owner: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> Any:
        rows.append(int(tensors["latents"].shape[0]))
        return tensors

    call(pipe, family, range(2), callback_on_step_end=count)
    single_rows: list[int] = []

    def count_single(owner: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> Any:
        single_rows.append(int(tensors["latents"].shape[0]))
        return tensors

    single(pipe, family, 0, callback_on_step_end=count_single)
    assert len(rows) == len(single_rows), f"{len(rows)} calls for {len(single_rows)} steps"
    assert rows == [2 * n for n in single_rows], f"rows {rows} against {single_rows} alone"


def callback_cfg(variant: Variant, family: Family) -> None:
    """A callback that raises the guidance scale each step sees it raised every step."""
    pipe = variant.pipe(family)
    owners: list[Any] = []

    def more_guidance(owner: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> Any:
        owner._guidance_scale += 1.0
        owners.append(owner)
        return tensors

    call(
        pipe,
        family,
        range(2),
        guidance_scale=2.0,
        callback_on_step_end=more_guidance,
        callback_on_step_end_tensor_inputs=list(type(pipe)._callback_tensor_inputs),
    )
    owner = owners[-1]
    assert owner.guidance_scale == 2.0 + owner.num_timesteps, (
        f"guidance {owner.guidance_scale} after {owner.num_timesteps} steps"
    )


def interrupt(variant: Variant, family: Family) -> None:
    """Setting ``_interrupt`` at step 1 returns the latents of step 1."""
    pipe = variant.pipe(family)
    seen: list[torch.Tensor] = []

    def record(owner: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> Any:
        seen.append(tensors["latents"].clone())
        return tensors

    def stop(owner: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> Any:
        if step == 1:
            owner._interrupt = True
        return tensors

    single(
        pipe, family, 0, num_inference_steps=3, output_type="latent", callback_on_step_end=record
    )
    stopped = first(
        single(
            pipe, family, 0, num_inference_steps=3, output_type="latent", callback_on_step_end=stop
        )
    )
    assert_close(stopped, seen[1], 1e-4, "interrupted latents")


def save_load(variant: Variant, family: Family) -> None:
    """A pipeline saved and loaded again gives the same results."""
    pipe = variant.pipe(family)
    before = first(call(pipe, family, range(2)))
    with tempfile.TemporaryDirectory(prefix="conformance_") as folder:
        pipe.save_pretrained(folder, safe_serialization=True)
        loaded = variant.wrap(type(pipe).from_pretrained(folder, local_files_only=True))
    loaded.set_progress_bar_config(disable=True)
    after = first(call(loaded, family, range(2)))
    assert_close(after, before, 5e-4, "loaded against saved")


def to_dtype(variant: Variant, family: Family) -> None:
    """``pipe.to(dtype=torch.float16)`` casts every component."""
    pipe = variant.fresh(family)
    pipe.to(dtype=torch.float16)
    dtypes = {
        name: component.dtype
        for name, component in pipe.components.items()
        if isinstance(component, torch.nn.Module)
    }
    assert all(dtype == torch.float16 for dtype in dtypes.values()), dtypes


def cfg(variant: Variant, family: Family) -> None:
    """Guidance on and off give results of the same shape."""
    pipe = variant.pipe(family)
    off = first(call(pipe, family, range(2), guidance_scale=1.0))
    on = first(call(pipe, family, range(2), guidance_scale=7.5))
    assert to_np(off).shape == to_np(on).shape


def repeat_identical(variant: Variant, family: Family) -> None:
    """The first call (a prepared pipeline's warms up) equals the next, seed for seed."""
    pipe = variant.pipe(family)
    generator = torch.Generator().manual_seed(3)
    once = first(call(pipe, family, range(2), generator=generator))
    generator.manual_seed(3)
    again = first(call(pipe, family, range(2), generator=generator))
    assert_close(again, once, 0.0, "the next call against the first")


def scheduler_steps(variant: Variant, family: Family) -> None:
    """A step counter on the scheduler class counts the call's steps only: the first call
    (with a prepared pipeline's warmup) steps the schedulers as often as the next."""
    pipe = variant.fresh(family)
    counted: list[tuple[str, float]] = []
    for scheduler in _schedulers(pipe):
        _count_steps(pipe, scheduler, counted)
    runs = []
    for _ in range(2):
        counted.clear()
        single(pipe, family, 0)
        runs.append(list(counted))
    assert runs[0], "no scheduler step was counted"
    assert runs[0] == runs[1], f"first call {runs[0]} against the next {runs[1]}"


def _schedulers(pipe: Any) -> list[Any]:
    found: dict[int, Any] = {}
    for value in pipe.components.values():
        if hasattr(value, "set_timesteps") and hasattr(value, "step"):
            found.setdefault(id(value), value)
    return list(found.values())


def _count_steps(pipe: Any, scheduler: Any, counted: list[tuple[str, float]]) -> None:
    """Replace ``scheduler`` everywhere in ``pipe`` by a counting subclass of its class."""
    base = type(scheduler)
    original = base.step

    def step(self: Any, model_output: Any, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        counted.append((base.__name__, float(timestep)))
        return original(self, model_output, timestep, *args, **kwargs)

    counting = type(base.__name__, (base,), {"step": step})
    replacement = counting.from_config(scheduler.config)
    for owner in (pipe, *(v for v in vars(pipe).values() if hasattr(v, "components"))):
        for name, value in list(vars(owner).items()):
            if value is scheduler:
                setattr(owner, name, replacement)


def refused(variant: Variant, family: Family) -> None:
    """Arguments the pipeline refuses give its own ValueError, unchanged, at the first call."""
    assert family.refused is not None
    pipe = variant.pipe(family)
    kwargs = family.inputs(0)
    kwargs.update(family.refused(pipe, kwargs))
    with pytest.raises(ValueError) as info:  # noqa: PT011 - any of the pipeline's messages
        pipe(**kwargs)
    error = info.value
    assert type(error) is ValueError, f"{type(error).__name__}: {error}"
    origin = traceback.extract_tb(error.__traceback__)[-1].filename
    assert "diffusers" in origin, f"raised in {origin}, not by the pipeline"


# ---------------------------------------------------------------------------------------
# Which apply


@dataclasses.dataclass(frozen=True)
class Contract:
    name: str
    check: Callable[[Variant, Family], None]
    applies: Callable[[Family, type], bool] = lambda family, cls: True


def _guided(family: Family, cls: type) -> bool:
    return "guidance_scale" in parameters(cls)


CONTRACTS: tuple[Contract, ...] = (
    Contract("batch_single_identical", batch_single_identical),
    Contract("output_types", output_types),
    Contract("num_per_prompt", num_per_prompt, lambda f, cls: multiplicity(cls) is not None),
    Contract("dict_tuple", dict_tuple),
    Contract("embeddings", embeddings, lambda f, cls: f.embed is not None),
    Contract("callback_inputs", callback_inputs, lambda f, cls: has_callbacks(cls)),
    Contract("callback_batch", callback_batch, lambda f, cls: has_callbacks(cls)),
    Contract(
        "callback_cfg",
        callback_cfg,
        lambda f, cls: has_callbacks(cls) and _guided(f, cls) and hasattr(cls, "guidance_scale"),
    ),
    Contract(
        "interrupt",
        interrupt,
        lambda f, cls: (
            has_callbacks(cls)
            and hasattr(cls, "interrupt")
            and "latent" in f.output_types
            and f.output_is_latents
        ),
    ),
    Contract("save_load", save_load),
    Contract("to_dtype", to_dtype),
    Contract("cfg", cfg, _guided),
    Contract("repeat_identical", repeat_identical),
    Contract("scheduler_steps", scheduler_steps),
    Contract("refused", refused, lambda f, cls: f.refused is not None),
)
