"""The prepared call: what ``pipe(...)`` does on a pipeline that :func:`prepare_pipeline` set up.

:func:`prepared_call` keeps the pipeline's own signature and return type. With every feature
of the plan off it is the raw call. Otherwise it binds the arguments to their names, warms
the pipeline up once (``plan.warmup``), and runs the call under the guards; with
``plan.batch_to_loop`` a call that carries several prompts runs one prompt at a time and
returns the merged result the batched call would have returned.

Exactness of the loop (docs/explanation/batch-and-warmup.md, "How exact it is"):

- a list of generators reproduces the batched call for every scheduler: each prompt gets its
  own consecutive run of ``num_images_per_prompt`` generators;
- with one generator (or none: torch's global generator), the whole batch's initial latents
  are drawn once, in the batched call's shape, and each prompt gets its slice, so the
  starting noise is the batched call's; deterministic schedulers (DDIM, eta=0) then match
  it, ancestral ones (Euler a, DDPM, ...) do not, since the batched call draws each step's
  noise for the whole batch. Where the initial latents cannot be drawn ahead (img2img and
  inpainting start from the image; pipelines without a UNet) the one generator is threaded
  through the prompts in turn.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from mps_helpers import _memory_watch, _nan_guard, _oom_retry, _release
from mps_helpers._batch import (
    IMAGE_KEYS,
    BoundCall,
    batch_size,
    bind_call,
    check_call,
    merge_outputs,
    split_batch,
)
from mps_helpers._call_scope import call_scope
from mps_helpers._errors import BatchError
from mps_helpers._markers import PLAN_ATTR
from mps_helpers._per_prompt import control_nets
from mps_helpers._progress import prompt_progress
from mps_helpers._util import empty_device_cache
from mps_helpers._warmup import ensure_warm

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    import torch

    from mps_helpers._facts import Pipeline
    from mps_helpers._plan import Plan

    #: What applies a plan to a pipeline (:func:`mps_helpers._apply.apply_plan`): handed
    #: down by the prepared class, so that the call layer never imports the apply layer.
    Reapply = Callable[[Any, Plan], object]

__all__ = ["call_with_recovery", "prepared_call"]

logger = logging.getLogger(__name__)

# prepare_latents(batch_size, num_channels_latents, height, width, dtype, device, generator,
# latents) draws randn_tensor((batch, unet.config.in_channels, h // f, w // f)) in the SD,
# SDXL and ControlNet text-to-image pipelines; the loop draws the same tensor itself.
_STANDARD_PREPARE_LATENTS = (
    "batch_size",
    "num_channels_latents",
    "height",
    "width",
    "dtype",
    "device",
    "generator",
    "latents",
)
_standard_classes: dict[type, bool] = {}


def prepared_call(
    pipe: Pipeline,
    call: Callable[..., Any],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    *,
    reapply: Reapply | None = None,
) -> Any:
    """Return what ``call(*args, **kwargs)`` returns, with the pipeline's plan applied.

    Args:
        pipe: the prepared pipeline; its plan is the one :func:`mps_helpers._markers.attached_plan`
            reads (any object with the :class:`~mps_helpers.Plan` fields will do).
        call: the pipeline's original ``__call__`` bound to ``pipe``.
        args, kwargs: the arguments the user gave.
        reapply: applies a stricter plan to ``pipe`` for the out-of-memory retry (the
            prepared class passes :func:`mps_helpers._apply.apply_plan`); None: no retry.

    Raises:
        ValueError: ``prompt`` is an empty list or ``num_inference_steps`` is below 1 (see
            :func:`~mps_helpers._batch.check_call`), or a looped batch's per-prompt arguments
            have mismatched lengths; raised before the warmup or any pipeline call.
        WarmupError: the one-time warmup pass failed.
        BatchError: one prompt of a looped batch failed; the prompts before it are in its
            ``completed`` attribute. When the first prompt fails with the pipeline's own
            ValueError or TypeError (arguments it refuses), that error is raised as it is.
    """
    check_call(call, args, kwargs)
    plan: Plan | None = getattr(pipe, PLAN_ATTR, None)
    scope = None if plan is None else call_scope(plan)
    if scope is not None:
        # mps: every attention call bounded, float64 requests made float32 (call_scope).
        with scope:
            return _planned_call(pipe, plan, call, args, kwargs, reapply)
    return _planned_call(pipe, plan, call, args, kwargs, reapply)


def _planned_call(  # noqa: PLR0917 (prepared_call's own arguments, passed on)
    pipe: Pipeline,
    plan: Plan | None,
    call: Callable[..., Any],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    reapply: Reapply | None,
) -> Any:
    """The prepared call's body: warmup, loop and guards as ``plan`` asks."""
    # The fast path: one attribute read (the marker, see _markers.attached_plan) and six
    # truth tests over the raw call.
    if plan is None or not (
        plan.warmup
        or plan.batch_to_loop
        or plan.nan_guard
        or plan.oom_retry
        or plan.memory_watch
        or getattr(plan, "release_text_encoders", False)  # a plan from before the field
    ):
        return call(*args, **kwargs)
    if getattr(plan, "release_text_encoders", False):
        # every pipeline call below (warmup, each prompt of a loop, a retry) reloads the
        # encoders it needs and releases them once its denoiser runs
        call = _release.around(pipe, call)
    bound = bind_call(call, args, kwargs)
    if bound is None:
        # The arguments do not bind: let the pipeline raise its own TypeError.
        return call(*args, **kwargs)
    if plan.batch_to_loop:
        prompts = batch_size(bound.kwargs, bound.roles)
        if prompts > 1:
            # Validate every per-prompt length now, before the warmup or any real work.
            _split(pipe, bound, prompts)
    if plan.warmup:
        ensure_warm(pipe, plan, call, bound.kwargs)

    def run_all(run_kwargs: dict[str, Any], run_plan: Plan) -> Any:
        prompts = batch_size(run_kwargs, bound.roles)
        if run_plan.batch_to_loop and prompts > 1:
            return _run_looped(pipe, run_plan, call, run_kwargs, prompts)
        return _nan_guard.call_with_nan_guard(pipe, run_plan, call, run_kwargs)

    return call_with_recovery(pipe, plan, run_all, bound.kwargs, reapply=reapply)


def call_with_recovery(
    pipe: Pipeline,
    plan: Plan,
    run_all: Callable[[dict[str, Any], Plan], Any],
    kwargs: dict[str, Any],
    *,
    reapply: Reapply | None,
) -> Any:
    """Return ``run_all(kwargs, plan)``, run under the out-of-memory and memory-pressure guards.

    With ``plan.oom_retry`` (and a ``reapply`` to apply the stricter plan with), an
    out-of-memory error frees the device cache and the call runs once more with
    :func:`~mps_helpers._plan.stricter_plan`, kept for later calls (see
    :func:`mps_helpers._oom_retry.run_with_retry`). With ``plan.memory_watch``, swap growth
    over :data:`~mps_helpers._memory_watch.SWAP_GROWTH_LIMIT` during the call gives one
    :class:`~mps_helpers.MemoryPressureWarning` per pipeline.

    Raises:
        DeviceOutOfMemoryError: out of memory also with the stricter plan, or with no
            stricter plan left to try; ``__cause__`` is torch's last error.
    """
    # Through the module, so that tests can replace the reading with fake ones.
    before = _memory_watch.read_memory() if plan.memory_watch else None
    if plan.oom_retry and reapply is not None:
        result, plan_used = _oom_retry.run_with_retry(pipe, plan, run_all, kwargs, reapply=reapply)
    else:
        result, plan_used = run_all(kwargs, plan), plan
    if before is not None:
        _memory_watch.check_swap(pipe, plan_used, before, _memory_watch.read_memory())
    return result


def _split(pipe: Pipeline, bound: BoundCall, prompts: int) -> list[dict[str, Any]]:
    return split_batch(
        bound.kwargs,
        prompts,
        num_images_per_prompt=bound.num_images_per_prompt,
        multi_control=control_nets(pipe),
        roles=bound.roles,
    )


def _run_looped(
    pipe: Pipeline, plan: Plan, call: Callable[..., Any], kwargs: dict[str, Any], prompts: int
) -> Any:
    """Run a batch of ``prompts`` prompts one at a time and return the merged result."""
    bound = bind_call(call, (), kwargs)
    if bound is None:  # pragma: no cover - kwargs came from bind_call, so they bind
        return _nan_guard.call_with_nan_guard(pipe, plan, call, kwargs)
    items = _split(pipe, bound, prompts)
    per_prompt = bound.num_images_per_prompt
    generator = kwargs.get("generator")
    if not isinstance(generator, list) and kwargs.get("latents") is None:
        latents = _initial_latents(pipe, kwargs, prompts * per_prompt, generator)
        if latents is not None:
            for i, item in enumerate(items):
                item["latents"] = latents[i * per_prompt : (i + 1) * per_prompt]
    logger.debug("looping %d prompts of %s one at a time", prompts, type(pipe).__name__)
    outputs: list[Any] = []
    with prompt_progress(pipe, prompts) as bar:
        for index, item in enumerate(items):
            if index:
                _free_between(plan)
            try:
                output = _nan_guard.call_with_nan_guard(pipe, plan, call, item)
            except Exception as exc:
                if index == 0 and isinstance(exc, (ValueError, TypeError)):
                    # Nothing is done yet and the pipeline refused the arguments: its own
                    # error, as it is, says more than a BatchError around it.
                    raise
                completed = merge_outputs(outputs) if outputs else None
                raise BatchError(
                    f"prompt {index} of a batch of {prompts} failed "
                    f"({type(exc).__name__}: {exc}); the results of the {index} prompt(s) "
                    "before it are in this error's .completed",
                    index=index,
                    completed=completed,
                ) from exc
            outputs.append(output)
            bar.update(1)
    return merge_outputs(outputs)


def _free_between(plan: Plan) -> None:
    """Return cached mps memory to the system between prompts when the plan is tight on it."""
    if plan.device != "mps" or not plan.memory_tight:
        return
    empty_device_cache("mps")


def _has_standard_prepare_latents(cls: type) -> bool:
    known = _standard_classes.get(cls)
    if known is None:
        import inspect

        method = getattr(cls, "prepare_latents", None)
        names: tuple[str, ...] = ()
        if method is not None:
            names = tuple(inspect.signature(method).parameters)[1:]
        known = _standard_classes[cls] = names == _STANDARD_PREPARE_LATENTS
    return known


def _latents_dtype(pipe: Any) -> torch.dtype:
    """Return the dtype the pipeline draws its initial latents in (its prompt embeddings')."""
    # SDXL converts its embeddings to the second text encoder's dtype, SD to the first's;
    # both fall back to the UNet's.
    if hasattr(pipe, "text_encoder_2"):
        encoder = pipe.text_encoder_2
    else:
        encoder = getattr(pipe, "text_encoder", None)
    dtype: torch.dtype = (encoder if encoder is not None else pipe.unet).dtype
    return dtype


def _initial_latents(
    pipe: Any, kwargs: Mapping[str, Any], images: int, generator: object
) -> torch.Tensor | None:
    """Return the batch's initial latents drawn as its ``prepare_latents`` would, or None.

    None means the family is not one whose draw can be reproduced here (no UNet, another
    ``prepare_latents``, a size that only the image inputs decide): the caller then threads
    the generator through the prompts instead.
    """
    unet = getattr(pipe, "unet", None)
    scale = getattr(pipe, "vae_scale_factor", None)
    if unet is None or not isinstance(scale, int) or not _has_standard_prepare_latents(type(pipe)):
        return None
    height, width = kwargs.get("height"), kwargs.get("width")
    if not height or not width:
        if any(kwargs.get(name) is not None for name in IMAGE_KEYS):
            return None  # ControlNet pipelines take the default size from the image
        sample = unet.config.sample_size
        rows, cols = (sample, sample) if isinstance(sample, int) else (sample[0], sample[1])
        height, width = rows * scale, cols * scale
    from diffusers.utils.torch_utils import randn_tensor

    shape = (images, unet.config.in_channels, int(height) // scale, int(width) // scale)
    latents: torch.Tensor = randn_tensor(
        shape, generator=generator, device=pipe._execution_device, dtype=_latents_dtype(pipe)
    )
    return latents
