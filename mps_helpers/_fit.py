"""Plan so that it fits: the memory measures a call needs, decided from the estimate.

:func:`fit_plan` is pure. It takes what a plan decided without memory measures (the
device, dtypes, the correctness rules' attention slicing and looping), the pipeline's
:class:`~mps_helpers._memory.ModelSpec` and the device's :class:`~mps_helpers._budget.Budget`,
predicts the peak of one call (:func:`mps_helpers._memory.estimate`) and, while it is over
the usable memory, turns on the measures left to "auto", cheapest first, keeping each only
if it lowers the peak:

1. VAE slicing (a batch decoded one image at a time; ~4% time),
2. the attention bound (mps_helpers' chunked attention, where scores materialise), then
   smaller bounds,
3. VAE tiling (+38% decode time at 768 px),
4. releasing the text encoders after encoding (unified memory only: reloaded from disk for
   the next call that needs them),
5. looping a batch one prompt at a time (2.5-4x time on CUDA).

The result carries every figure, and one reason per decision: "predicted 11.8 GiB peak
(VAE decode) of 9.6 GiB usable: VAE slicing and VAE tiling bring it to 6.1 GiB".
:func:`check_fit` answers the same question for a finished plan (for the warning that
:func:`~mps_helpers.prepare_pipeline` and :func:`~mps_helpers.load_pipeline` give).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mps_helpers._budget import Budget, LiveMemory, memory_budget
from mps_helpers._memory import (
    MemoryEstimate,
    ModelSpec,
    Settings,
    estimate,
    format_bytes,
    settings_from_plan,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

    from mps_helpers._environment import Environment

__all__ = ["FIT_SHARE", "MEASURES", "FitDecision", "MemoryInputs", "check_fit", "fit_plan"]

#: Share of the budget a predicted peak may use: the estimate was within 10% of the
#: measured peaks on CUDA (docs/explanation/memory.md), so a tenth is kept in hand.
FIT_SHARE = 0.9
#: The memory measures, in the order they are tried.
MEASURES: tuple[str, ...] = (
    "vae_slicing",
    "attention_slicing",
    "vae_tiling",
    "release_text_encoders",
    "batch_to_loop",
)
_NAMES = {
    "vae_slicing": "VAE slicing",
    "attention_slicing": "the attention bound",
    "vae_tiling": "VAE tiling",
    "release_text_encoders": "releasing the text encoders",
    "batch_to_loop": "looping the prompts",
}
#: The attention bound goes down by this factor while the peak is still over.
_CHUNK_STEP = 4
_CHUNK_FLOOR = 2**20


@dataclass(frozen=True)
class MemoryInputs:
    """What the plan needs to estimate memory: the pipeline's spec and live readings."""

    spec: ModelSpec
    live: LiveMemory | None = None
    #: Frames of a video call (None: the pipeline's default).
    frames: int | None = None


@dataclass(frozen=True)
class FitDecision:
    """The memory measures one call needs on one device, with the figures behind them."""

    budget: Budget
    #: The bytes a predicted peak may use (:data:`FIT_SHARE` of the budget).
    usable: int
    #: The estimate without memory measures, and with the ones turned on.
    before: MemoryEstimate
    after: MemoryEstimate
    #: The settings with the measures turned on.
    settings: Settings
    #: The measures turned on, in the order they were.
    turned_on: tuple[str, ...]
    #: One reason for ``memory_tight`` and for each measure that was left to "auto" and
    #: could act here (the others keep the reason of the rule that decided them).
    reasons: Mapping[str, str] = field(default_factory=dict, hash=False)

    @property
    def tight(self) -> bool:
        """True when the call does not fit without memory measures."""
        return self.before.peak > self.usable

    @property
    def fits(self) -> bool:
        """True when the call fits with the measures turned on."""
        return self.after.peak <= self.usable

    def summary(self) -> str:
        """Return the one-sentence verdict with its figures."""
        return self.reasons["memory_tight"]


def _usable_text(budget: Budget, usable: int) -> str:
    assert budget.usable is not None
    return (
        f"{format_bytes(usable)} usable ({FIT_SHARE:.0%} of {format_bytes(budget.usable)}: "
        f"{budget.source})"
    )


def _peak_text(result: MemoryEstimate) -> str:
    return f"{format_bytes(result.peak)} peak ({result.peak_phase})"


def _and(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _resident(spec: ModelSpec, device: str) -> int:
    return sum(c.weight_bytes(c.dtype) for c in spec.components if c.device == device)


def _budget(inputs: MemoryInputs, env: Environment, device: str) -> Budget:
    return memory_budget(env, device, live=inputs.live, resident=_resident(inputs.spec, device))


def _frames(spec: ModelSpec, frames: int | None) -> int | None:
    if frames is not None or spec.temporal_scale_factor <= 1:
        return frames
    return spec.default_frames


def fit_plan(
    inputs: MemoryInputs,
    env: Environment,
    base: Settings,
    *,
    height: int,
    width: int,
    batch_size: int,
    auto: frozenset[str] | set[str],
    chunk_elements: int,
    slicing_supported: bool,
    frames: int | None = None,
) -> FitDecision | None:
    """Return the memory measures one call needs, or None when the budget is unknown.

    Args:
        inputs: the pipeline's spec and live readings.
        env: the machine.
        base: the plan's settings before memory measures (its correctness rules included).
        height, width, batch_size, frames: the call's size.
        auto: the measures (:data:`MEASURES`) the user left to "auto".
        chunk_elements: the attention bound the plan would use (its memory share).
        slicing_supported: the denoiser can take the chunked attention processor.
    """
    spec = inputs.spec
    budget = _budget(inputs, env, base.device)
    if budget.usable is None:
        return None
    usable = int(budget.usable * FIT_SHARE)
    frames = _frames(spec, frames if frames is not None else inputs.frames)

    def run(settings: Settings) -> MemoryEstimate:
        return estimate(
            spec, settings, height=height, width=width, frames=frames, batch_size=batch_size
        )

    before = run(base)
    current, result = base, before
    turned_on: list[str] = []
    effect: dict[str, tuple[MemoryEstimate, MemoryEstimate]] = {}
    candidates = _candidates(spec, base, auto, batch_size, slicing_supported)
    # Passes over the measures, cheapest first, until the peak fits or nothing lowers it: a
    # measure that lowered one phase can leave another on top, which an earlier measure (a
    # smaller attention bound) then lowers on the next pass.
    progress = True
    while result.peak > usable and progress:
        progress = False
        for measure in candidates:
            if result.peak <= usable:
                break
            if measure in effect and measure != "attention_slicing":
                continue
            trial = _with(current, measure, chunk_elements)
            if trial is None:
                continue
            trial_result = run(trial)
            if trial_result.peak < result.peak:
                first = effect.get(measure, (result, trial_result))[0]
                effect[measure] = (first, trial_result)
                current, result = trial, trial_result
                if measure not in turned_on:
                    turned_on.append(measure)
                progress = True
    # a measure already on (a tighter attention bound was tried) keeps its rule's reason
    # unless the estimate changed it
    off = [m for m in candidates if not getattr(base, m) or m in effect]
    reasons = _reasons(budget, usable, before, result, current, turned_on, effect, off)
    return FitDecision(
        budget=budget,
        usable=usable,
        before=before,
        after=result,
        settings=current,
        turned_on=tuple(turned_on),
        reasons=reasons,
    )


def _candidates(
    spec: ModelSpec,
    base: Settings,
    auto: frozenset[str] | set[str],
    batch: int,
    slicing_supported: bool,
) -> list[str]:
    out = []
    for measure in MEASURES:
        # an attention bound already on (a correctness rule's) may still be made smaller
        tighter = (
            measure == "attention_slicing"
            and base.attention_slicing
            and base.attention_processor == "safe"
            and (base.attention_chunk_elements or 0) // _CHUNK_STEP >= _CHUNK_FLOOR
        )
        if measure not in auto or (getattr(base, measure) and not tighter):
            continue
        if measure in ("vae_slicing", "batch_to_loop") and batch <= 1:
            continue
        if measure == "attention_slicing" and not slicing_supported:
            continue
        if measure == "release_text_encoders" and (
            base.device != "mps" or spec.directory is None or not spec.by_role("text_encoder")
        ):
            continue
        out.append(measure)
    return out


def _with(settings: Settings, measure: str, chunk: int) -> Settings | None:
    """Return ``settings`` with one more step of ``measure``, or None when it has none left."""
    if measure == "attention_slicing":
        if settings.attention_processor != "safe":
            if settings.attention_slicing:
                return None
            return settings.replace(attention_slicing=True, attention_chunk_elements=None)
        if settings.attention_slicing and settings.attention_chunk_elements:
            bound = settings.attention_chunk_elements // _CHUNK_STEP
            if bound < _CHUNK_FLOOR:
                return None
        else:
            bound = chunk
        return settings.replace(attention_slicing=True, attention_chunk_elements=bound)
    if getattr(settings, measure):
        return None
    return settings.replace(**{measure: True})


def _bound(settings: Settings) -> str:
    chunk = settings.attention_chunk_elements
    return "" if chunk is None else f" 2**{chunk.bit_length() - 1}"


def _reasons(  # noqa: PLR0917 - one private call site, every figure of the verdict
    budget: Budget,
    usable: int,
    before: MemoryEstimate,
    after: MemoryEstimate,
    settings: Settings,
    turned_on: list[str],
    effect: Mapping[str, tuple[MemoryEstimate, MemoryEstimate]],
    candidates: list[str],
) -> dict[str, str]:
    room = _usable_text(budget, usable)
    head = f"predicted {_peak_text(before)} of {room}"
    names = [_NAMES[m] + (_bound(settings) if m == "attention_slicing" else "") for m in turned_on]
    reasons: dict[str, str] = {}
    if before.peak <= usable:
        reasons["memory_tight"] = f"not tight: {head}, without memory measures."
    elif after.peak <= usable:
        reasons["memory_tight"] = (
            f"tight: {head}: {_and(names)} bring{'s' if len(names) == 1 else ''} it to "
            f"{format_bytes(after.peak)}."
        )
    else:
        tried = f" even with {_and(names)}" if names else ""
        reasons["memory_tight"] = (
            f"tight, and nothing makes it fit: {head}, still {_peak_text(after)}{tried}."
        )
    # the measures that could act here; the others keep the reason their own rule gave
    for measure in candidates:
        if measure in effect:
            old, new = effect[measure]
            what = _NAMES[measure] + (_bound(settings) if measure == "attention_slicing" else "")
            reasons[measure] = (
                f"on for memory: {what} takes the predicted peak from "
                f"{format_bytes(old.peak)} ({old.peak_phase}) to {format_bytes(new.peak)} "
                f"({new.peak_phase}), against {format_bytes(usable)} usable."
            )
        elif before.peak <= usable:
            reasons[measure] = (
                f"off: the predicted {_peak_text(before)} fits {format_bytes(usable)} usable."
            )
        elif after.peak <= usable:
            reasons[measure] = (
                f"off: not needed, the measures before it bring the predicted peak to "
                f"{format_bytes(after.peak)} of {format_bytes(usable)} usable."
            )
    return reasons


def settings_of_plan(plan: Any, env: Environment) -> Settings:
    """Return the estimate's settings for a finished plan."""
    return settings_from_plan(plan, torch_version=env.torch_version)


def check_fit(
    inputs: MemoryInputs,
    plan: Any,
    env: Environment,
    *,
    frames: int | None = None,
) -> tuple[bool, str] | None:
    """Return (fits, sentence) for a finished plan, or None when it cannot be told.

    The plan's own height, width and batch size are used (batch 1 when unknown).
    """
    height, width = getattr(plan, "height", None), getattr(plan, "width", None)
    if height is None or width is None:
        return None
    options = getattr(plan, "options", {})
    batch = options.get("batch_size") or 1
    budget = _budget(inputs, env, str(plan.device))
    if budget.usable is None:
        return None
    usable = int(budget.usable * FIT_SHARE)
    result = estimate(
        inputs.spec,
        settings_of_plan(plan, env),
        height=height,
        width=width,
        frames=_frames(inputs.spec, frames if frames is not None else inputs.frames),
        batch_size=int(batch),
    )
    room = _usable_text(budget, usable)
    size = f"{width}x{height}, batch {batch}"
    if result.peak <= usable:
        return True, f"{size}: predicted {_peak_text(result)} of {room}."
    return False, (
        f"{size}: predicted {_peak_text(result)} of {room}; the call will swap or run out of "
        "memory. Make the image or the batch smaller, or free memory"
    )


def warn_if_unfit(
    inputs: MemoryInputs | None, plan: Any, env: Environment, *, stacklevel: int = 3
) -> None:
    """Warn (:class:`~mps_helpers.MemoryFitWarning`) when ``plan`` is predicted not to fit.

    Turn the warning into an error to refuse such a pipeline before it runs::

        warnings.simplefilter("error", mps_helpers.MemoryFitWarning)
    """
    if inputs is None:
        return
    verdict = check_fit(inputs, plan, env)
    if verdict is None or verdict[0]:
        return
    from mps_helpers._errors import MemoryFitWarning

    warnings.warn(f"will not fit: {verdict[1]}.", MemoryFitWarning, stacklevel=stacklevel)
