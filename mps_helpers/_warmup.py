"""The one-time warmup pass: one throw-away 1-step call before a pipeline's first real call.

On torch 1.13 with mps the first inference pass gives slightly different results from later
ones (diffusers' "optimization/mps" page; docs/explanation/batch-and-warmup.md), so a prepared
pipeline whose plan says ``warmup`` runs a 1-step pass at the first call's size and discards it.

The warmup is done once per pipeline object, device and dtype: re-preparing a pipeline for
the same device and dtype does not warm it up again; moving it to another device or dtype
does, on its next call (new kernels). Concurrent first calls from several threads wait for
one warmup. A failed warmup raises :class:`~mps_helpers.WarmupError` and is not retried
automatically: the pipeline's next call runs normally (call :func:`warmup` to retry).

The warmup never changes a result: it draws its noise from its own generator, restores the
global torch random state afterwards, shows no progress bar and calls no user callback.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import weakref
from typing import TYPE_CHECKING, Any

from mps_helpers._batch import batch_size, call_signature, split_batch
from mps_helpers._errors import WarmupError
from mps_helpers._markers import attached_plan, original_class

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping

    from mps_helpers._facts import Pipeline
    from mps_helpers._plan import Plan

__all__ = ["ensure_warm", "progress_config", "warmup"]

logger = logging.getLogger(__name__)

# The arguments a warmup pass drops: the user's callbacks must not see it, explicit noise
# or schedules would override the 1-step request, and the user's generators must not be
# advanced by it.
_DROPPED = (
    "callback_on_step_end",
    "callback_on_step_end_tensor_inputs",
    "callback",
    "callback_steps",
    "latents",
    "timesteps",
    "sigmas",
    "denoising_start",
    "denoising_end",
    "generator",
)

_registry = threading.Lock()
# Held per pipeline object, and weakly, so that a pipeline stays picklable and copyable
# (a lock attribute would make deepcopy fail) and its entries go when it does.
_locks: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
_warmed: weakref.WeakKeyDictionary[Any, frozenset[tuple[str, str]]] = weakref.WeakKeyDictionary()


def _key(device: object, dtype: object) -> tuple[str, str]:
    return (str(getattr(device, "type", device)), str(dtype))


def _lock_for(pipe: Pipeline) -> threading.Lock:
    with _registry:
        lock = _locks.get(pipe)
        if lock is None:
            lock = _locks[pipe] = threading.Lock()
        return lock


def _is_warm(pipe: Pipeline, key: tuple[str, str]) -> bool:
    return key in _warmed.get(pipe, frozenset())


def _mark_warm(pipe: Pipeline, key: tuple[str, str]) -> None:
    with _registry:
        _warmed[pipe] = _warmed.get(pipe, frozenset()) | {key}


@contextlib.contextmanager
def progress_config(pipe: Any, **overrides: Any) -> Iterator[dict[str, Any]]:
    """Set ``overrides`` on the pipeline's progress-bar config for the block, then restore it.

    Yields the pipeline's own config (as ``set_progress_bar_config`` left it) so that the
    caller can honour it. The original is put back even when the block raises.
    """
    missing = object()
    saved = getattr(pipe, "_progress_bar_config", missing)
    base = dict(saved) if isinstance(saved, dict) else {}
    pipe._progress_bar_config = {**base, **overrides}
    try:
        yield base
    finally:
        if saved is missing:
            with contextlib.suppress(AttributeError):
                del pipe._progress_bar_config
        else:
            pipe._progress_bar_config = saved


@contextlib.contextmanager
def _global_rng_kept() -> Iterator[None]:
    """Restore torch's global random states (CPU, and CUDA / mps where in use) afterwards."""
    import torch

    cpu = torch.get_rng_state()
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]  # torch leaves it unannotated
        cuda = torch.cuda.get_rng_state_all()
    mps_module = getattr(torch, "mps", None)
    mps = None
    if mps_module is not None and torch.backends.mps.is_available():
        mps = mps_module.get_rng_state()
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        if mps is not None and mps_module is not None:
            mps_module.set_rng_state(mps)


def _warmup_kwargs(call: Callable[..., Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Return the arguments of the warmup pass for a call with ``kwargs``.

    The first prompt's arguments (so that image, embedding and size inputs stay consistent),
    one image, one step, the user's callbacks, generators and explicit noise removed.
    """
    parameters = call_signature(call).parameters
    prompts = batch_size(kwargs)
    chosen: dict[str, Any] = dict(kwargs)
    if prompts > 1:
        # A batch that does not split cleanly is the real call's problem, not the warmup's:
        # warm up with the arguments as given.
        per_prompt = kwargs.get("num_images_per_prompt") or 1
        with contextlib.suppress(ValueError):
            chosen = split_batch(kwargs, prompts, num_images_per_prompt=per_prompt)[0]
    for name in _DROPPED:
        chosen.pop(name, None)
    if (
        "prompt" in parameters
        and chosen.get("prompt") is None
        and (chosen.get("prompt_embeds") is None)
    ):
        chosen["prompt"] = ""
    chosen["num_inference_steps"] = 1
    if "num_images_per_prompt" in parameters:
        chosen["num_images_per_prompt"] = 1
    if "strength" in parameters:
        # img2img/inpaint run int(steps * strength) steps: with one step, any strength
        # below 1 would leave none and diffusers would refuse the call.
        chosen["strength"] = 1.0
    return chosen


def _generator_device(kwargs: Mapping[str, Any]) -> str:
    generator = kwargs.get("generator")
    if isinstance(generator, list) and generator:
        generator = generator[0]
    device = getattr(generator, "device", None)
    return str(getattr(device, "type", "cpu"))


def _run(pipe: Pipeline, call: Callable[..., Any], kwargs: Mapping[str, Any]) -> None:
    """Run one warmup pass of ``call`` for a call with ``kwargs`` and discard its result."""
    import torch

    chosen = _warmup_kwargs(call, kwargs)
    parameters = call_signature(call).parameters
    if "generator" in parameters:
        # Same device as the user's generator, so that the same kernels are used.
        chosen["generator"] = torch.Generator(device=_generator_device(kwargs)).manual_seed(0)
    height, width = chosen.get("height"), chosen.get("width")
    size = f"{height}x{width}" if height and width else "default size"
    logger.info("warming up %s: one 1-step pass at %s", type(pipe).__name__, size)
    try:
        with _global_rng_kept(), progress_config(pipe, disable=True):
            call(**chosen)
    except Exception as exc:
        raise WarmupError(
            f"the one-time warmup pass of {type(pipe).__name__} (1 step at {size}) failed: "
            f"{type(exc).__name__}: {exc}. The pipeline is unchanged and its next call runs "
            "without a warmup; call mps_helpers.warmup(pipe, ...) to retry, or prepare the "
            "pipeline with warmup=False."
        ) from exc


def ensure_warm(
    pipe: Pipeline, plan: Plan, call: Callable[..., Any], kwargs: Mapping[str, Any]
) -> None:
    """Warm ``pipe`` up with ``call`` unless it already was for ``plan``'s device and dtype.

    Called by the prepared call before its first real call. Threads that make the first
    call at the same time wait for one warmup. A failed warmup counts as done (the next call
    runs normally) and raises :class:`~mps_helpers.WarmupError`.
    """
    key = _key(plan.device, plan.dtype)
    if _is_warm(pipe, key):
        return
    with _lock_for(pipe):
        if _is_warm(pipe, key):
            return
        try:
            _run(pipe, call, kwargs)
        finally:
            _mark_warm(pipe, key)


def _unprepared_call(pipe: Pipeline) -> Callable[..., Any]:
    """Return the pipeline's own ``__call__`` bound to it, bypassing the prepared call."""
    return functools.partial(original_class(pipe).__call__, pipe)


def warmup(pipe: Pipeline, **call_kwargs: Any) -> None:
    """Run the one-time warmup pass on ``pipe`` now, for a call with ``call_kwargs``.

    Runs one throw-away pass of the pipeline with ``num_inference_steps=1``, at the size
    (``height``, ``width``) and with the inputs given in ``call_kwargs`` (the first prompt's,
    for a batch; ``prompt=""`` when no prompt is given), and discards it. Useful to load
    and compile kernels before timing. Works on prepared and plain pipelines; a prepared
    pipeline's first call then does not warm up again on the same device and dtype.

    The pass draws from its own generator: the user's generators and torch's global random
    state are left as they were, and later results are what they would have been without it.

    Example::

        mps_helpers.warmup(pipe, prompt="a photo", height=512, width=512)

    Raises:
        WarmupError: the pass failed (its cause is chained); the pipeline stays usable, and
            a prepared pipeline's first call will still try its own warmup.

    .. versionadded:: 0.1
    """
    import torch

    call = _unprepared_call(pipe)
    plan = attached_plan(pipe)
    if plan is not None:
        key = _key(plan.device, plan.dtype)
    else:
        key = _key(getattr(pipe, "device", "cpu"), getattr(pipe, "dtype", torch.float32))
    with _lock_for(pipe):
        _run(pipe, call, call_kwargs)
        _mark_warm(pipe, key)
