"""The memory budget: what a device can really use for one pipeline call.

:func:`memory_budget` is a pure function of an :class:`~mps_helpers.Environment` snapshot
and, optionally, :class:`LiveMemory` readings taken now (:func:`read_live_memory`, the one
function here that asks torch):

- mps: Metal's recommended working set (``torch.mps.recommended_max_memory()``, torch 2.5+)
  less what is already allocated there; torch before 2.5 has no such figure, and then the
  RAM psutil reports available. Without a live reading the working set follows the rule
  the Macs report: two thirds of RAM up to 32 GB, three quarters above (an 8 GB M1 reports
  5.3 GiB, a 16 GB Mac 10.7 GiB, a 64 GB one 48 GiB).
- CUDA: the card's free memory (``torch.cuda.mem_get_info``, read only where CUDA is already
  initialised), or its total less a tenth for the context when not read.
- CPU: the RAM psutil reports available.

The weights of the pipeline being planned that already sit on the device count as usable
(``resident``): they are part of what is allocated, and the estimate counts them itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from packaging.version import Version

if TYPE_CHECKING:
    from mps_helpers._environment import Environment

__all__ = [
    "Budget",
    "LiveMemory",
    "memory_budget",
    "read_live_memory",
    "recommended_working_set",
]

GiB = 2**30

#: ``torch.mps.recommended_max_memory()`` exists from torch 2.5.
RECOMMENDED_MAX_TORCH = Version("2.5")
#: Share of a CUDA card's total taken as usable when its free memory is not read (the
#: context and the kernels' libraries take the rest; an H200 context took ~0.5 GiB).
CUDA_USABLE_SHARE = 0.9
#: Macs of up to this much RAM report a working set of two thirds of it; larger, three quarters.
WORKING_SET_SMALL_MAC = 32 * GiB


@dataclass(frozen=True)
class LiveMemory:
    """Readings of the devices' memory taken now; None where not read."""

    #: ``torch.mps.recommended_max_memory()``: Metal's recommended working set.
    mps_recommended: int | None = None
    #: ``torch.mps.current_allocated_memory()``: what this process's tensors hold on mps now.
    mps_allocated: int | None = None
    #: ``torch.cuda.mem_get_info()[0]``: free memory of the current CUDA device.
    cuda_free: int | None = None
    #: RAM available now (psutil).
    available: int | None = None


@dataclass(frozen=True)
class Budget:
    """The bytes one call may use on a device, and how that figure was found."""

    device: str
    #: Usable bytes, or None when nothing is known.
    usable: int | None
    #: Where the figure comes from, one phrase ("Metal's recommended working set ...").
    source: str

    def __str__(self) -> str:
        if self.usable is None:
            return f"unknown on {self.device} ({self.source})"
        return f"{self.usable / GiB:.1f} GiB usable on {self.device} ({self.source})"


def recommended_working_set(total_memory: int) -> int:
    """Return the working set Metal recommends on a Mac with ``total_memory`` bytes of RAM.

    Two thirds of RAM up to 32 GB, three quarters above, as the Macs report it
    (``recommendedMaxWorkingSetSize``: 5,461 MB on 8 GB, 21,845 MB on 32 GB, 49,152 MB on
    64 GB, 98,304 MB on 128 GB).
    """
    share = 2 / 3 if total_memory <= WORKING_SET_SMALL_MAC else 3 / 4
    return int(total_memory * share)


def _release(version: Version | None) -> tuple[int, ...]:
    return () if version is None else version.release


def memory_budget(
    env: Environment,
    device: str,
    *,
    live: LiveMemory | None = None,
    resident: int = 0,
) -> Budget:
    """Return the :class:`Budget` of ``device`` on the machine ``env`` describes.

    Args:
        env: the machine snapshot.
        device: "mps", "cuda" or "cpu".
        live: readings taken now (:func:`read_live_memory`); None plans from the snapshot.
        resident: bytes of the planned pipeline's weights already on ``device``.
    """
    live = live or LiveMemory()
    gib = f"{resident / GiB:.1f} GiB of this pipeline's weights already there"
    if device == "mps":
        has_figure = _release(env.torch_version) >= RECOMMENDED_MAX_TORCH.release
        if has_figure and (live.mps_recommended or env.total_memory):
            if live.mps_recommended is not None:
                working_set = live.mps_recommended
                source = "Metal's recommended working set (torch.mps.recommended_max_memory)"
            else:
                assert env.total_memory is not None
                working_set = recommended_working_set(env.total_memory)
                share = "2/3" if env.total_memory <= WORKING_SET_SMALL_MAC else "3/4"
                source = f"Metal's working set, {share} of {env.total_memory / GiB:.0f} GB"
            allocated = live.mps_allocated or 0
            usable = working_set - max(0, allocated - resident)
            if allocated:
                source += f", less {max(0, allocated - resident) / GiB:.1f} GiB allocated"
            return Budget("mps", max(0, usable), source)
        available = live.available if live.available is not None else env.available_memory
        if available is None:
            return Budget("mps", None, "no working-set figure and available RAM unknown")
        why = f"torch {env.torch_version or 'unknown'} has no recommended working set"
        return Budget("mps", available + resident, f"RAM available (psutil), as {why}")
    if device == "cuda":
        if live.cuda_free is not None:
            return Budget(
                "cuda",
                live.cuda_free + resident,
                "the card's free memory" + (f" with {gib}" if resident else ""),
            )
        if env.cuda_total_memory is None:
            return Budget("cuda", None, "the card's memory is unknown")
        usable = int(env.cuda_total_memory * CUDA_USABLE_SHARE)
        return Budget(
            "cuda",
            usable,
            f"{CUDA_USABLE_SHARE:.0%} of the card's {env.cuda_total_memory / GiB:.0f} GiB",
        )
    available = live.available if live.available is not None else env.available_memory
    if available is None:
        return Budget(device, None, "available RAM unknown")
    return Budget(device, available + resident, "RAM available (psutil)")


def read_live_memory() -> LiveMemory:
    """Read the devices' memory now; never raises, never initialises a device.

    mps figures are read where mps is usable; CUDA's free memory only where this process has
    already initialised CUDA (reading it would otherwise create a context on the card).
    Available RAM is left to the snapshot, so that planning twice gives the same plan.
    """
    from mps_helpers import _probes

    mps_recommended = mps_allocated = cuda_free = None
    try:
        import torch
    except Exception:
        torch = None  # type: ignore[assignment]
    if torch is not None:
        mps = getattr(torch, "mps", None)
        backend = getattr(getattr(torch, "backends", None), "mps", None)
        if mps is not None and backend is not None and _probes.safe(backend.is_available, False):
            recommended = getattr(mps, "recommended_max_memory", None)
            if callable(recommended):
                mps_recommended = _probes.safe(lambda: int(recommended()), None)
            allocated = getattr(mps, "current_allocated_memory", None)
            if callable(allocated):
                mps_allocated = _probes.safe(lambda: int(allocated()), None)
        cuda = getattr(torch, "cuda", None)
        if cuda is not None and _probes.safe(cuda.is_initialized, False):
            cuda_free = _probes.safe(lambda: int(cuda.mem_get_info()[0]), None)
    return LiveMemory(
        mps_recommended=mps_recommended,
        mps_allocated=mps_allocated,
        cuda_free=cuda_free,
    )
