"""Named machine profiles: snapshots of typical machines, to ask "would it fit there?".

``mps-helpers fit MODEL --machine m2-16gb`` and :func:`machine_profile` plan for one of
these instead of the machine at hand. Each is an :class:`~mps_helpers.Environment` of a
recent software stack (macOS 15, torch 2.13, diffusers 0.42) with the RAM Apple sells; the
available RAM is what such a machine typically has free with a browser open (about 60%).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from packaging.version import Version

if TYPE_CHECKING:
    from mps_helpers._environment import Environment

__all__ = ["MACHINE_PROFILES", "machine_profile"]

GiB = 2**30

_MAC: dict[str, Any] = {
    "system": "Darwin",
    "machine": "arm64",
    "python_machine": "arm64",
    "is_apple_silicon": True,
    "macos_version": Version("15.6"),
    "python_version": Version("3.12.8"),
    "torch_version": Version("2.13.0"),
    "diffusers_version": Version("0.42.1"),
    "mps_built": True,
    "mps_available": True,
    "swap_used": 0,
}
_LINUX: dict[str, Any] = {
    "system": "Linux",
    "machine": "x86_64",
    "python_machine": "x86_64",
    "python_version": Version("3.12.8"),
    "torch_version": Version("2.13.0"),
    "diffusers_version": Version("0.42.1"),
    "swap_used": 0,
}

# name -> (description, fields)
_PROFILES: dict[str, tuple[str, dict[str, Any]]] = {
    "m1-8gb": ("MacBook Air M1, 8 GB", {**_MAC, "chip": "Apple M1", "total_memory": 8 * GiB}),
    "m2-16gb": ("Mac mini M2, 16 GB", {**_MAC, "chip": "Apple M2", "total_memory": 16 * GiB}),
    "m3-pro-18gb": (
        "MacBook Pro M3 Pro, 18 GB",
        {**_MAC, "chip": "Apple M3 Pro", "total_memory": 18 * GiB},
    ),
    "m2-pro-32gb": (
        "Mac mini M2 Pro, 32 GB",
        {**_MAC, "chip": "Apple M2 Pro", "total_memory": 32 * GiB},
    ),
    "m3-max-64gb": (
        "MacBook Pro M3 Max, 64 GB",
        {**_MAC, "chip": "Apple M3 Max", "total_memory": 64 * GiB},
    ),
    "m4-max-128gb": (
        "Mac Studio M4 Max, 128 GB",
        {**_MAC, "chip": "Apple M4 Max", "total_memory": 128 * GiB},
    ),
    "rtx4090-24gb": (
        "Linux PC with an RTX 4090 (24 GB), 64 GB RAM",
        {
            **_LINUX,
            "cuda_available": True,
            "cuda_device_name": "NVIDIA GeForce RTX 4090",
            "cuda_bf16_supported": True,
            "cuda_total_memory": 24 * GiB,
            "total_memory": 64 * GiB,
        },
    ),
    "h100-80gb": (
        "Linux server with an H100 (80 GB)",
        {
            **_LINUX,
            "cuda_available": True,
            "cuda_device_name": "NVIDIA H100 80GB HBM3",
            "cuda_bf16_supported": True,
            "cuda_total_memory": 80 * GiB,
            "total_memory": 256 * GiB,
        },
    ),
    "cpu-32gb": ("Linux PC without a GPU, 32 GB", {**_LINUX, "total_memory": 32 * GiB}),
}

#: The names :func:`machine_profile` knows, smallest Mac first.
MACHINE_PROFILES: tuple[str, ...] = tuple(_PROFILES)


def machine_profile(name: str) -> Environment:
    """Return the snapshot of the named machine profile.

    Raises:
        ValueError: ``name`` is not one of :data:`MACHINE_PROFILES` (the message lists them).
    """
    from mps_helpers._environment import Environment

    entry = _PROFILES.get(name)
    if entry is None:
        valid = ", ".join(MACHINE_PROFILES)
        raise ValueError(f"unknown machine profile {name!r}: expected one of {valid}")
    fields = dict(entry[1])
    fields.setdefault("available_memory", int(fields["total_memory"] * 0.6))
    return Environment(**fields)


def describe(name: str) -> str:
    """Return the one-line description of a machine profile."""
    return _PROFILES[name][0]
