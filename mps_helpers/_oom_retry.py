"""The out-of-memory retry (``plan.oom_retry``): one retry with a stricter memory plan.

An out-of-memory error of mps or CUDA (see :func:`is_out_of_memory`) frees the device cache
and retries the call once with :func:`~mps_helpers._plan.stricter_plan`, which the pipeline
keeps; a second failure raises :class:`~mps_helpers.DeviceOutOfMemoryError`. The retry gets
the function that applies the stricter plan from its caller (the prepared call has it from
:mod:`mps_helpers._apply`), so this module knows nothing of how plans are applied.

The library never sets ``PYTORCH_MPS_HIGH_WATERMARK_RATIO``: 0 disables mps' allocation limit
and can freeze the machine, so the out-of-memory message advises against it.
"""

from __future__ import annotations

import gc
import logging
import sys
import traceback
from typing import TYPE_CHECKING, Any

from mps_helpers._errors import DeviceOutOfMemoryError, OutOfMemoryRetryWarning
from mps_helpers._plan import plan_changes, stricter_plan
from mps_helpers._util import empty_device_cache, warn_at_caller

if TYPE_CHECKING:
    from collections.abc import Callable

    from mps_helpers._facts import Pipeline
    from mps_helpers._plan import Plan

__all__ = [
    "OOM_MESSAGES",
    "find_out_of_memory",
    "free_device_memory",
    "is_out_of_memory",
    "run_with_retry",
]

logger = logging.getLogger(__name__)

#: Message fragments of out-of-memory errors raised as plain RuntimeErrors: mps always does
#: (docs/explanation/guards.md), CUDA did before torch 1.13 added ``torch.cuda.OutOfMemoryError``.
OOM_MESSAGES: tuple[str, ...] = ("MPS backend out of memory", "CUDA out of memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """Return True when ``exc`` is a device out-of-memory error of mps or CUDA.

    Recognises ``torch.OutOfMemoryError`` / ``torch.cuda.OutOfMemoryError`` (whichever the
    installed torch has) and RuntimeErrors whose message contains one of
    :data:`OOM_MESSAGES` (mps raises a plain RuntimeError; so did CUDA before torch 1.13).
    Never imports torch: an exception of torch's can only exist once torch is imported.
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        for owner in (torch, getattr(torch, "cuda", None)):
            cls = getattr(owner, "OutOfMemoryError", None)
            if isinstance(cls, type) and isinstance(exc, cls):
                return True
    if isinstance(exc, RuntimeError):
        message = str(exc)
        return any(fragment in message for fragment in OOM_MESSAGES)
    return False


def find_out_of_memory(exc: BaseException) -> BaseException | None:
    """Return the out-of-memory error that ``exc`` is or was raised from, or None.

    Follows ``__cause__`` (explicit ``raise ... from``), so that an out-of-memory error
    wrapped by a looped batch's :class:`~mps_helpers.BatchError` counts too.
    """
    seen: BaseException | None = exc
    for _ in range(8):  # causes do not loop in practice; stay bounded all the same
        if seen is None:
            return None
        if is_out_of_memory(seen):
            return seen
        seen = seen.__cause__
    return None


def free_device_memory() -> None:
    """Collect garbage and return cached device memory of mps and CUDA to the system."""
    gc.collect()
    empty_device_cache()


def run_with_retry(
    pipe: Pipeline,
    plan: Plan,
    run_all: Callable[[dict[str, Any], Plan], Any],
    kwargs: dict[str, Any],
    *,
    reapply: Callable[[Any, Plan], object],
) -> tuple[Any, Plan]:
    """Return ``(run_all(kwargs, plan), plan)``, retried once on out of memory.

    An out-of-memory error frees the device cache and the call runs once more with
    :func:`~mps_helpers._plan.stricter_plan`, which ``reapply(pipe, stricter)`` applies to the
    pipeline (it is kept for later calls); an :class:`~mps_helpers.OutOfMemoryRetryWarning`
    says what changed. The second element is the plan the result came from. Other errors
    pass through unchanged.

    Raises:
        DeviceOutOfMemoryError: out of memory also with the stricter plan, or with no
            stricter plan left to try; ``__cause__`` is torch's last error.
    """
    states = _generator_states(kwargs.get("generator"))
    try:
        return run_all(kwargs, plan), plan
    except Exception as exc:
        if find_out_of_memory(exc) is None:
            raise
        first = exc
    # Outside the except block, so that the failed attempt's tensors can be freed: the
    # traceback's frames hold them; clearing their locals keeps the traceback printable.
    _release(first)
    name = type(pipe).__name__
    stricter = stricter_plan(plan)
    if stricter is None:
        raise DeviceOutOfMemoryError(_oom_message(name, first, None, kwargs)) from first
    changes = plan_changes(plan, stricter)
    logger.info("%s ran out of memory; retrying with %s", name, ", ".join(changes))
    reapply(pipe, stricter)
    _set_generator_states(states)  # the retry draws the same noise the first try did
    try:
        result = run_all(kwargs, stricter)
    except Exception as exc:
        if find_out_of_memory(exc) is None:
            raise
        second = exc
    else:
        warn_at_caller(
            f"{name} ran out of memory on {_oom_device(first)}; mps_helpers freed the "
            f"device cache and retried once with a stricter memory plan ({', '.join(changes)}), "
            "which worked and stays on for this pipeline's later calls (slower, smaller "
            "peak memory). To start from it, pass these options to prepare_pipeline.",
            OutOfMemoryRetryWarning,
        )
        return result, stricter
    _release(second)
    raise DeviceOutOfMemoryError(_oom_message(name, second, changes, kwargs)) from second


def _release(exc: BaseException) -> None:
    """Free what a failed attempt left allocated: its frames' locals, then the cache."""
    seen: BaseException | None = exc
    while seen is not None:  # a looped batch's BatchError holds the OOM as its cause
        traceback.clear_frames(seen.__traceback__)
        seen = seen.__cause__
    free_device_memory()


def _oom_device(exc: BaseException) -> str:
    message = str(find_out_of_memory(exc) or exc)
    return "mps" if "MPS" in message else "CUDA" if "CUDA" in message else "the device"


def _oom_message(
    name: str,
    exc: BaseException,
    changes: list[str] | None,
    kwargs: dict[str, Any],
) -> str:
    device = _oom_device(exc)
    if changes is None:
        tried = (
            "All of mps_helpers' memory savers were already on (attention slicing where the "
            "denoiser supports it, VAE slicing and tiling, one prompt at a time), so it did "
            "not retry."
        )
    else:
        tried = (
            "mps_helpers freed the device cache and retried once with a stricter memory plan "
            f"({', '.join(changes)}); that ran out of memory too."
        )
    size = ""
    height, width = kwargs.get("height"), kwargs.get("width")
    if isinstance(height, int) and isinstance(width, int):
        size = f" at {width}x{height} px"
    advice = (
        "What you can do: generate smaller images (height=, width=), fewer images per call "
        "(fewer prompts, num_images_per_prompt=1), and close other apps that use memory"
    )
    if device == "mps":
        advice += (
            " (on Apple Silicon the GPU shares the system's RAM). Don't set "
            "PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 as torch's message suggests: without the "
            "limit the whole machine can freeze."
        )
    else:
        advice += " or other processes that hold GPU memory."
    root = find_out_of_memory(exc) or exc
    text = str(root).strip()
    first_line = text.splitlines()[0] if text else type(root).__name__
    return f"{name} ran out of memory on {device}{size}: {first_line}\n{tried}\n{advice}"


def _generator_states(generator: object) -> list[tuple[Any, Any]]:
    """Return (generator, state) pairs for a torch.Generator or a list of them."""
    torch = sys.modules.get("torch")
    if torch is None or generator is None:
        return []
    items = generator if isinstance(generator, (list, tuple)) else [generator]
    return [(g, g.get_state()) for g in items if isinstance(g, torch.Generator)]


def _set_generator_states(states: list[tuple[Any, Any]]) -> None:
    for generator, state in states:
        generator.set_state(state)
