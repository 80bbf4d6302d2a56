"""Loading safely: ``device_map`` to mps before torch 2.13, and weights mps cannot compute.

``from_pretrained(..., device_map="mps")`` copied weights to mps with ``non_blocking=True``,
which corrupted them before torch 2.13 (diffusers #13227; PRs #13308, #14556; pytorch
#189690). :func:`safe_load_kwargs` drops such a ``device_map`` with a warning: the pipeline
then loads on the CPU and moves once, complete, when it is prepared. Weights stored in
float8 are upcast while loading by passing the plan's dtype (decided from the safetensors
header, see :func:`mps_helpers._families.safetensors_dtypes`), so they are read once.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from packaging.version import Version

if TYPE_CHECKING:
    from mps_helpers._environment import Environment

__all__ = ["SAFE_DEVICE_MAP_TORCH", "safe_load_kwargs"]

#: The first torch whose mps copies with ``non_blocking=True`` keep weights intact.
SAFE_DEVICE_MAP_TORCH = Version("2.13")


def _targets_mps(device_map: Any) -> bool:
    if isinstance(device_map, str):
        return device_map.split(":")[0] == "mps"
    if isinstance(device_map, dict):
        return any(_targets_mps(value) for value in device_map.values())
    return type(device_map).__name__ == "device" and getattr(device_map, "type", None) == "mps"


def safe_load_kwargs(kwargs: dict[str, Any], env: Environment) -> dict[str, Any]:
    """Return ``from_pretrained`` kwargs without a ``device_map`` that is unsafe on ``env``.

    A ``device_map`` that puts weights on mps with a torch older than 2.13 is removed, with
    a UserWarning naming the torch version and the issue; anything else is kept.
    """
    device_map = kwargs.get("device_map")
    if device_map is None or not _targets_mps(device_map):
        return kwargs
    version = env.torch_version
    if version is not None and version.release >= SAFE_DEVICE_MAP_TORCH.release:
        return kwargs
    warnings.warn(
        f"device_map={device_map!r} ignored: with torch {version or 'of unknown version'} "
        "(before 2.13) loading straight to mps copies weights with non_blocking=True, which "
        "corrupted them (diffusers #13227); the pipeline loads on the CPU and moves to mps "
        "once, when it is prepared",
        UserWarning,
        stacklevel=3,
    )
    return {key: value for key, value in kwargs.items() if key != "device_map"}
