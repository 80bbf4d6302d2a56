"""The marks a prepared pipeline carries, and the only code that reads or writes them.

Preparing a pipeline leaves four marks, and running one a fifth (all private attributes,
named here once):

- on the pipeline instance, the applied :class:`~mps_helpers.Plan`;
- on its prepared class, the original class it was made from;
- on the denoiser, the attention processors in place before the library replaced them;
- on the VAE, the handles of the hooks that bridge its dtype;
- on the pipeline instance, the text encoders released within a call
  (``mps_helpers._release``) and how to reload them.

Every layer reads and writes them through these accessors; this is a bottom module, which
imports nothing of the package at run time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mps_helpers._plan import Plan

__all__ = [
    "ORIGINAL_ATTR",
    "PLAN_ATTR",
    "attached_plan",
    "cast_hooks",
    "clear_plan",
    "is_prepared_class",
    "original_class",
    "pop_cast_hooks",
    "pop_saved_processors",
    "prepared_namespace",
    "released_encoders",
    "saved_processors",
    "set_cast_hooks",
    "set_plan",
    "set_saved_processors",
    "stored_plan",
    "unprepared_class",
]

#: Instance attribute of a prepared pipeline that holds its applied plan.
PLAN_ATTR = "_mps_helpers_plan"
#: Class attribute of a prepared class naming its original.
ORIGINAL_ATTR = "_mps_helpers_original"
#: Denoiser attribute: the attention processors in place before the library replaced them.
_SAVED_PROCESSORS_ATTR = "_mps_helpers_saved_processors"
#: VAE attribute: the handles of the dtype-bridging hooks.
_CAST_HOOKS_ATTR = "_mps_helpers_cast_hooks"
#: Pipeline attribute: {text encoder name: how to reload it} for those released now.
_RELEASED_ATTR = "_mps_helpers_released"


# ---------------------------------------------------------------------------------------
# The plan on the pipeline


def attached_plan(pipe: object) -> Plan | None:
    """Return the plan attribute of ``pipe`` as it is, or None (no checks: the hot path).

    The prepared call and the warmup read it on every call; any object with the
    :class:`~mps_helpers.Plan` fields counts, which is what their tests rely on.
    """
    plan: Plan | None = getattr(pipe, PLAN_ATTR, None)
    return plan


def stored_plan(pipe: object) -> Plan | None:
    """Return the plan attached to a prepared pipeline (None: never prepared).

    Unlike :func:`attached_plan`, only a plan in the instance dict of an instance of a
    prepared class counts (a copy of the attribute on another object does not).
    """
    state = getattr(pipe, "__dict__", None)
    if not isinstance(state, dict) or not is_prepared_class(type(pipe)):
        return None
    plan: Plan | None = state.get(PLAN_ATTR)
    return plan


def set_plan(pipe: object, plan: Plan) -> None:
    """Attach ``plan`` to ``pipe`` (in its instance dict, where :func:`plan_of` looks)."""
    pipe.__dict__[PLAN_ATTR] = plan


def clear_plan(pipe: object) -> None:
    """Remove the plan attached to ``pipe``, if any."""
    pipe.__dict__.pop(PLAN_ATTR, None)


# ---------------------------------------------------------------------------------------
# The prepared class


def prepared_namespace(original: type) -> dict[str, Any]:
    """Return the class attributes that mark a class as the prepared one of ``original``."""
    return {ORIGINAL_ATTR: original}


def is_prepared_class(cls: type) -> bool:
    """Return True for a prepared class (not for a user's subclass of one)."""
    return ORIGINAL_ATTR in cls.__dict__


def unprepared_class(cls: type) -> type:
    """Return the original of a prepared pipeline class (``cls`` itself otherwise)."""
    # Looked up in the class's own namespace so that a user's subclass of a prepared class
    # is not taken for the prepared class.
    original = cls.__dict__.get(ORIGINAL_ATTR)
    return original if isinstance(original, type) else cls


def original_class(pipe: object) -> type:
    """Return the class ``pipe`` had before it was prepared (its class if it never was)."""
    return unprepared_class(type(pipe))


# ---------------------------------------------------------------------------------------
# Marks on components


def saved_processors(denoiser: object) -> dict[str, Any] | None:
    """Return the attention processors saved before slicing replaced them (None: none)."""
    saved: dict[str, Any] | None = vars(denoiser).get(_SAVED_PROCESSORS_ATTR)
    return saved


def set_saved_processors(denoiser: object, processors: dict[str, Any] | None) -> None:
    """Save the denoiser's processors to restore later; None forgets them."""
    if processors is None:
        vars(denoiser).pop(_SAVED_PROCESSORS_ATTR, None)
    else:
        vars(denoiser)[_SAVED_PROCESSORS_ATTR] = processors


def pop_saved_processors(denoiser: object) -> dict[str, Any] | None:
    """Return the saved processors and forget them (None: none were saved)."""
    saved: dict[str, Any] | None = vars(denoiser).pop(_SAVED_PROCESSORS_ATTR, None)
    return saved


def cast_hooks(vae: object) -> list[Any] | None:
    """Return the handles of the VAE's dtype-bridging hooks (None: not bridged)."""
    handles: list[Any] | None = getattr(vae, "__dict__", {}).get(_CAST_HOOKS_ATTR)
    return handles


def set_cast_hooks(vae: object, handles: list[Any]) -> None:
    """Record the handles of the VAE's dtype-bridging hooks."""
    vars(vae)[_CAST_HOOKS_ATTR] = handles


def pop_cast_hooks(vae: object) -> list[Any] | None:
    """Return the handles of the VAE's bridging hooks and forget them (None: none)."""
    handles: list[Any] | None = vars(vae).pop(_CAST_HOOKS_ATTR, None)
    return handles


def released_encoders(pipe: object) -> dict[str, Any]:
    """Return the pipeline's record of released text encoders (created empty, kept)."""
    record: dict[str, Any] = vars(pipe).setdefault(_RELEASED_ATTR, {})
    return record
