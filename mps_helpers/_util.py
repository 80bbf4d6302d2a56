"""Small helpers every layer shares: byte sizes, dtype names, versions, devices, caches, warnings.

This is a bottom module: it imports nothing of the package, and neither torch nor diffusers
at import (the functions that need torch find it in :data:`sys.modules` or import it).
"""

from __future__ import annotations

import os
import sys
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Literal, TypeGuard

from packaging.version import InvalidVersion, Version

if TYPE_CHECKING:
    import logging
    from types import FrameType

    import torch

__all__ = [
    "DEVICES",
    "Device",
    "GiB",
    "MiB",
    "dtype_name",
    "empty_device_cache",
    "format_bytes",
    "is_dtype",
    "module_dtype",
    "parse_version",
    "release",
    "warn_at_caller",
    "warn_once",
]

GiB = 2**30
"""Bytes in a gibibyte: memory figures are GiB everywhere (the unit Apple sells RAM in)."""

MiB = 2**20

Device = Literal["mps", "cuda", "cpu"]
"""A device a plan can choose."""

DEVICES: tuple[Device, ...] = ("mps", "cuda", "cpu")
"""The devices a plan can choose, in the order ``device="auto"`` prefers them."""

DeviceChoice = Literal["auto", "mps", "cuda", "cpu"]
"""The ``device`` option: a device, or "auto" to let the plan choose (validated at run time too)."""

ProcessorChoice = Literal["safe", "diffusers"]
"""The ``attention_processor`` option."""

Switch = bool | Literal["auto"]
"""An on/off option: True, False, or "auto" to let the plan decide."""

# Frames of this package are skipped so that warnings point at the user's line.
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep

# owner (a pipeline) -> causes already warned about ("warn once per pipeline and cause").
_WARNED: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()


def format_bytes(count: float | None, *, digits: int = 2) -> str:
    """Return a byte count for people: ``"3.25 GiB"`` from a GiB up, ``"512 MiB"`` below.

    Args:
        count: bytes; None gives ``"unknown"``.
        digits: decimals of the GiB figure (MiB figures have none).

    >>> format_bytes(3.25 * GiB), format_bytes(512 * MiB), format_bytes(8 * GiB, digits=0)
    ('3.25 GiB', '512 MiB', '8 GiB')
    """
    if count is None:
        return "unknown"
    if abs(count) >= GiB:
        return f"{count / GiB:.{digits}f} GiB"
    return f"{count / MiB:.0f} MiB"


def dtype_name(dtype: object) -> str:
    """Return a dtype's name without the ``torch.`` prefix (``"float16"``).

    >>> dtype_name("torch.bfloat16")
    'bfloat16'
    """
    return str(dtype).removeprefix("torch.")


def is_dtype(value: object) -> TypeGuard[torch.dtype]:
    """Return whether ``value`` is a torch dtype, without importing torch.

    >>> is_dtype("float16")
    False
    """
    return type(value).__name__ == "dtype" and type(value).__module__ == "torch"


def parse_version(text: str | None) -> Version | None:
    """Return ``text`` as a :class:`~packaging.version.Version`, None when empty or invalid.

    >>> parse_version("2.5.1+cpu"), parse_version("unknown")
    (<Version('2.5.1+cpu')>, None)
    """
    if not text:
        return None
    try:
        return Version(text)
    except InvalidVersion:
        return None


def release(version: Version | str | None) -> tuple[int, ...]:
    """Return the release numbers of a version (no pre-, post- or local parts); () if unknown.

    Compare the result with a short tuple: ``release(torch_version) >= (2, 3)``.

    >>> release("2.6.0.dev20241112+cpu"), release(None)
    ((2, 6, 0), ())
    """
    if isinstance(version, str):
        version = parse_version(version)
    return () if version is None else version.release


def module_dtype(module: torch.nn.Module) -> torch.dtype | None:
    """Return the dtype of the module's first floating parameter (None when it has none)."""
    for param in module.parameters():
        if param.is_floating_point():
            dtype: torch.dtype = param.dtype
            return dtype
    return None


def empty_device_cache(device: Literal["mps", "cuda"] | None = None) -> None:
    """Return cached device memory to the system: of ``device``, or of each usable one.

    With ``device`` the caller knows the pipeline runs there (a plan on mps), so no
    availability check is made; without it, the mps and CUDA caches are emptied where those
    devices are usable. Does nothing when torch was never imported: nothing was cached then.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return
    mps = getattr(torch, "mps", None)  # torch 1.13 has no torch.mps
    wants_mps = device == "mps" or (device is None and torch.backends.mps.is_available())
    if wants_mps and mps is not None and hasattr(mps, "empty_cache"):
        mps.empty_cache()
    if device == "cuda" or (device is None and torch.cuda.is_available()):
        torch.cuda.empty_cache()


def warn_at_caller(message: str, category: type[Warning]) -> None:
    """Issue a warning attributed to the first caller outside this package."""
    frame: FrameType | None = sys._getframe(1)
    level = 2
    # warnings.warn's stacklevel counts frames; skip the package's own (their number depends
    # on the path through the prepared call: looped or not, warmup or not).
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)


def warn_once(
    owner: object, cause: str, message: str, category: type[Warning], *, log: logging.Logger
) -> None:
    """Warn (at the user's line) the first time ``cause`` happens with ``owner``; log later ones.

    The later times go to ``log`` at INFO, not WARNING: with no logging set up, Python prints
    WARNING records to stderr, which would repeat on every call the warning meant to come once.
    An owner that is not weak-referenceable warns every time.
    """
    try:
        causes = _WARNED.setdefault(owner, set())
    except TypeError:  # not weak-referenceable or unhashable: warn every time
        causes = set()
    if cause in causes:
        log.info("%s", message)
        return
    causes.add(cause)
    warn_at_caller(message, category)
