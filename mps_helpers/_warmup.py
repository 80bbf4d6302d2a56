"""The one-time warmup pass: one throw-away short call before a pipeline's first real call.

On torch 1.13 with mps the first inference pass gives slightly different results from later
ones (diffusers' "optimization/mps" page; docs/explanation/batch-and-warmup.md), so a prepared
pipeline whose plan says ``warmup`` runs a 1-step pass at the first call's size and discards
it (2 or 3 steps where a scheduler refuses 1, as Kandinsky's ``UnCLIPScheduler`` does).

The warmup is done once per pipeline object, device and dtype: re-preparing a pipeline for
the same device and dtype does not warm it up again; moving it to another device or dtype
does, on its next call (new kernels). Concurrent first calls from several threads wait for
one warmup. A failed warmup raises :class:`~mps_helpers.WarmupError` and is not retried
automatically: the pipeline's next call runs normally (call :func:`warmup` to retry). A
pipeline that refuses the warmup's arguments (its own ValueError or TypeError) is not the
warmup's failure: the real call runs without a warmup, so that a mistake in the caller's
arguments comes out as the pipeline's own error, unchanged.

The warmup never changes a result: it draws its noise from its own generator, restores the
global torch random state and every scheduler's state afterwards, shows no progress bar and
calls no user callback.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import threading
import weakref
from typing import TYPE_CHECKING, Any

from mps_helpers._batch import batch_size, bind_call, call_signature, split_batch
from mps_helpers._errors import WarmupError
from mps_helpers._markers import attached_plan, original_class
from mps_helpers._per_prompt import control_nets
from mps_helpers._progress import progress_config, sub_pipelines

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping

    from mps_helpers._facts import Pipeline
    from mps_helpers._plan import Plan

__all__ = ["ensure_warm", "warmup"]

logger = logging.getLogger(__name__)

# The arguments a warmup pass drops: the user's callbacks must not see it, explicit noise
# or schedules would override the 1-step request, and the user's generators must not be
# advanced by it. Combined pipelines take the same for their prior or decoder under a
# prefix (``prior_callback_on_step_end``, ``decoder_timesteps``).
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
_STAGE_PREFIXES = ("prior_", "decoder_")
# The fewest steps a warmup tries, in order, until every scheduler of the pipeline accepts one.
_STEP_CHOICES = (1, 2, 3)

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


def _dropped(name: str) -> bool:
    for prefix in _STAGE_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name in _DROPPED


def _warmup_kwargs(
    pipe: Any, call: Callable[..., Any], kwargs: Mapping[str, Any], steps: int
) -> dict[str, Any]:
    """Return the arguments of the warmup pass for a call with ``kwargs``.

    The first prompt's arguments (so that image, embedding and size inputs stay consistent,
    split as the loop splits them), one image, ``steps`` steps (for every stage of a combined
    pipeline), the user's callbacks, generators and explicit noise removed.
    """
    parameters = call_signature(call).parameters
    bound = bind_call(call, (), kwargs)
    chosen: dict[str, Any] = dict(kwargs)
    if bound is not None:
        prompts = batch_size(kwargs, bound.roles)
        if prompts > 1:
            # A batch that does not split cleanly is the real call's problem, not the
            # warmup's: warm up with the arguments as given.
            with contextlib.suppress(ValueError):
                chosen = split_batch(
                    kwargs,
                    prompts,
                    num_images_per_prompt=bound.num_images_per_prompt,
                    multi_control=control_nets(pipe),
                    roles=bound.roles,
                )[0]
    for name in list(chosen):
        if _dropped(name):
            del chosen[name]
    if (
        "prompt" in parameters
        and chosen.get("prompt") is None
        and (chosen.get("prompt_embeds") is None)
    ):
        chosen["prompt"] = ""
    chosen["num_inference_steps"] = steps
    for name in parameters:
        if name.endswith("_num_inference_steps"):
            chosen[name] = steps
    multiplicity = None if bound is None else bound.roles.multiplicity
    if multiplicity is not None and multiplicity in parameters:
        chosen[multiplicity] = 1
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


def _schedulers(pipe: Any) -> list[Any]:
    """Return the schedulers of ``pipe`` and of its sub-pipelines, each once."""
    found: dict[int, Any] = {}
    for each in (pipe, *sub_pipelines(pipe)):
        components = getattr(each, "components", None)
        if not isinstance(components, dict):
            continue
        for component in components.values():
            if hasattr(component, "set_timesteps") and hasattr(component, "config"):
                found.setdefault(id(component), component)
    return list(found.values())


def _accepts(scheduler: Any, steps: int) -> bool:
    """Return whether a copy of ``scheduler`` sets ``steps`` timesteps without an error."""
    try:
        copy.deepcopy(scheduler).set_timesteps(steps)
    except Exception:  # any refusal means "not this step count"
        return False
    return True


def _warmup_steps(pipe: Any) -> tuple[int, str]:
    """Return the fewest steps every scheduler of ``pipe`` accepts, and why, if not 1.

    A scheduler that refuses every choice alone (one that needs arguments only the pipeline
    gives, such as a flow-matching shift) does not count.
    """
    schedulers = _schedulers(pipe)
    steps, why = _STEP_CHOICES[0], ""
    for scheduler in schedulers:
        fits = [n for n in _STEP_CHOICES if _accepts(scheduler, n)]
        if fits and fits[0] > steps:
            steps = fits[0]
            why = f"{type(scheduler).__name__} refuses fewer"
    return steps, why


def _stand_in(scheduler: Any) -> Any:
    """Return a fresh scheduler for the warmup: diffusers' own class, from the same config.

    The nearest diffusers class of its lineage, so that a step counter patched onto the
    caller's scheduler (or onto a subclass of it) does not count the warmup's steps; a
    deep copy for a scheduler that is no diffusers class at all.
    """
    for cls in type(scheduler).__mro__:
        if cls.__module__.startswith("diffusers.") and hasattr(cls, "from_config"):
            with contextlib.suppress(Exception):
                return cls.from_config(scheduler.config)
            break
    return copy.deepcopy(scheduler)


@contextlib.contextmanager
def _schedulers_kept(pipe: Any) -> Iterator[None]:
    """Run the block with stand-ins for every scheduler, then put the pipeline's own back.

    Schedulers keep per-call state (timesteps, step index, a multistep solver's history, a
    counter of steps): the pipeline's own are never touched by the warmup, so the real call
    starts from the state it would have had without one. Attributes are swapped in the
    instances' dictionaries, so that no pipeline config is rewritten.
    """
    stand_ins = {id(scheduler): _stand_in(scheduler) for scheduler in _schedulers(pipe)}
    swapped: list[tuple[dict[str, Any], str, Any]] = []
    for each in (pipe, *sub_pipelines(pipe)):
        state = vars(each)
        for name, value in list(state.items()):
            if id(value) in stand_ins:
                swapped.append((state, name, value))
                state[name] = stand_ins[id(value)]
    try:
        yield
    finally:
        for state, name, value in swapped:
            state[name] = value


def _run(pipe: Pipeline, call: Callable[..., Any], kwargs: Mapping[str, Any]) -> None:
    """Run one warmup pass of ``call`` for a call with ``kwargs`` and discard its result.

    Raises:
        ValueError, TypeError: the pipeline refused the arguments (its own error, as it is).
        WarmupError: the pass failed otherwise.
    """
    import torch

    steps, why = _warmup_steps(pipe)
    chosen = _warmup_kwargs(pipe, call, kwargs, steps)
    parameters = call_signature(call).parameters
    if "generator" in parameters:
        # Same device as the user's generator, so that the same kernels are used.
        chosen["generator"] = torch.Generator(device=_generator_device(kwargs)).manual_seed(0)
    height, width = chosen.get("height"), chosen.get("width")
    size = f"{height}x{width}" if height and width else "default size"
    passes = f"{steps}-step pass" + (f" ({why})" if why else "")
    logger.info("warming up %s: one %s at %s", type(pipe).__name__, passes, size)
    try:
        with _global_rng_kept(), _schedulers_kept(pipe), progress_config(pipe, disable=True):
            call(**chosen)
    except (ValueError, TypeError):
        raise
    except Exception as exc:
        raise WarmupError(
            f"the one-time warmup pass of {type(pipe).__name__} ({passes} at {size}) failed: "
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
    runs normally) and raises :class:`~mps_helpers.WarmupError`; one whose arguments the
    pipeline refuses (ValueError, TypeError) counts as done too and raises nothing: the real
    call then runs, and raises the pipeline's own error where the caller's arguments are at
    fault.
    """
    key = _key(plan.device, plan.dtype)
    if _is_warm(pipe, key):
        return
    with _lock_for(pipe):
        if _is_warm(pipe, key):
            return
        try:
            _run(pipe, call, kwargs)
        except (ValueError, TypeError) as refused:
            logger.warning(
                "%s refused the warmup pass (%s: %s): this call runs without a warmup",
                type(pipe).__name__,
                type(refused).__name__,
                refused,
            )
        finally:
            _mark_warm(pipe, key)


def _unprepared_call(pipe: Pipeline) -> Callable[..., Any]:
    """Return the pipeline's own ``__call__`` bound to it, bypassing the prepared call."""
    return functools.partial(original_class(pipe).__call__, pipe)


def warmup(pipe: Pipeline, **call_kwargs: Any) -> None:
    """Run the one-time warmup pass on ``pipe`` now, for a call with ``call_kwargs``.

    Runs one throw-away pass of the pipeline with ``num_inference_steps=1`` (or the fewest
    steps its schedulers accept), at the size (``height``, ``width``) and with the inputs
    given in ``call_kwargs`` (the first prompt's, for a batch; ``prompt=""`` when no prompt
    is given), and discards it. Useful to load
    and compile kernels before timing. Works on prepared and plain pipelines; a prepared
    pipeline's first call then does not warm up again on the same device and dtype.

    The pass draws from its own generator and steps stand-in schedulers: the user's
    generators, the pipeline's schedulers and torch's global random state are left as they
    were, and later results are what they would have been without it.

    Example::

        mps_helpers.warmup(pipe, prompt="a photo", height=512, width=512)

    Raises:
        ValueError, TypeError: the pipeline refused the arguments: its own error, unchanged;
            a prepared pipeline's first call will still try its own warmup.
        WarmupError: the pass failed otherwise (its cause is chained); the pipeline stays
            usable, and a prepared pipeline's first call will still try its own warmup.

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
