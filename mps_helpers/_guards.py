"""Guards around a prepared call: NaN/black-image repair, out-of-memory retry, memory pressure.

(Pass-through placeholders; the guards issue fills these in.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mps_helpers._plan import Plan

__all__: list[str] = []


def call_with_recovery(
    pipe: Any,
    plan: Plan,
    run_all: Callable[[dict[str, Any], Plan], Any],
    kwargs: dict[str, Any],
) -> Any:
    """Run a whole prepared call (``run_all(kwargs, plan)``) under the OOM/pressure guards."""
    return run_all(kwargs, plan)


def call_with_nan_guard(
    pipe: Any, plan: Plan, call: Callable[..., Any], kwargs: dict[str, Any]
) -> Any:
    """Run one underlying pipeline call (``call(**kwargs)``) under the NaN guard."""
    return call(**kwargs)
