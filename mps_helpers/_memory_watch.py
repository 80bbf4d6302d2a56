"""The memory watch (``plan.memory_watch``): a warning when swap grows during a call.

Swap used is read before and after the call; growth over :data:`SWAP_GROWTH_LIMIT` gives one
:class:`~mps_helpers.MemoryPressureWarning` per pipeline, naming the memory savers that are
still off (``docs/explanation/guards.md``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from mps_helpers import _probes
from mps_helpers._errors import MemoryPressureWarning
from mps_helpers._plan import MEMORY_SAVERS, can_slice_attention
from mps_helpers._util import MiB, format_bytes, warn_once

if TYPE_CHECKING:
    from mps_helpers._facts import Pipeline
    from mps_helpers._plan import Plan

__all__ = ["SWAP_GROWTH_LIMIT", "check_swap", "read_memory"]

logger = logging.getLogger(__name__)

#: Swap growth during one call (bytes) above which the memory watch warns.
SWAP_GROWTH_LIMIT = 256 * MiB


def read_memory() -> _probes.MemoryInfo:
    """Read available RAM and swap used now (psutil; fields None when unknown).

    A seam for tests, which replace it with fake readings.
    """
    return _probes.memory_info()


def check_swap(
    pipe: Pipeline, plan: Plan, before: _probes.MemoryInfo, after: _probes.MemoryInfo
) -> None:
    """Warn (once per pipeline) when swap grew by more than :data:`SWAP_GROWTH_LIMIT`."""
    if before.swap_used is None or after.swap_used is None:
        return
    growth = after.swap_used - before.swap_used
    if growth <= SWAP_GROWTH_LIMIT:
        return
    name = type(pipe).__name__
    available = (
        f"; {format_bytes(after.available)} of RAM available after it"
        if after.available is not None
        else ""
    )
    helps = [
        f"{option}=True"
        for option, _label in MEMORY_SAVERS
        if not getattr(plan, option)
        and (option != "attention_slicing" or can_slice_attention(plan))
    ]
    fix = (
        f"prepare_pipeline(pipe, {', '.join(helps)}), smaller images or fewer images per call"
        if helps
        else "smaller images or fewer images per call (all memory savers are already on)"
    )
    message = (
        f"Swap grew by {format_bytes(growth)} during this call of {name} (from "
        f"{format_bytes(before.swap_used)} to {format_bytes(after.swap_used)}{available}): "
        "the machine ran short of memory and slowed down. What helps: "
        f"{fix}, or closing other apps."
    )
    warn_once(pipe, "swap", message, MemoryPressureWarning, log=logger)
