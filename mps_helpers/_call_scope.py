"""What surrounds every prepared call: the attention bound and the float64 rescue.

:func:`call_scope` returns the context a prepared call runs in, from its plan's
``attention_bound``, ``attention_upcast_from`` and ``float64_rescue``; None when the plan
asks for none of them (CUDA and CPU plans), so that the call costs nothing more there.
"""

from __future__ import annotations

import contextlib
from typing import Any

__all__ = ["call_scope"]


def call_scope(plan: Any) -> contextlib.AbstractContextManager[Any] | None:
    """Return the context manager a call under ``plan`` runs in, or None when it needs none.

    ``plan`` is a :class:`~mps_helpers.Plan` or any object with its fields; missing fields
    count as off.
    """
    bound = getattr(plan, "attention_bound", None)
    upcast = getattr(plan, "attention_upcast_from", None)
    rescue = bool(getattr(plan, "float64_rescue", False))
    if bound is None and upcast is None and not rescue:
        return None
    device = getattr(plan, "device", None)
    stack = contextlib.ExitStack()
    if bound is not None or upcast is not None:
        from mps_helpers._attention import MAX_CHUNK_ELEMENTS
        from mps_helpers._bounded import bounded_attention

        stack.enter_context(
            bounded_attention(
                MAX_CHUNK_ELEMENTS if bound is None else bound, device=device, upcast_from=upcast
            )
        )
    if rescue and device is not None:
        from mps_helpers._dtype_rescue import Float64Rescue, rescue_available

        if rescue_available():
            stack.enter_context(Float64Rescue(device))
    return stack
