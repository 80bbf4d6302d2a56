"""mps_helpers: run Hugging Face diffusers pipelines well on Apple Silicon, CUDA and CPU.

Importing the package does no work and imports neither torch nor diffusers: each public
name is loaded from its module on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from mps_helpers._version import __version__

if TYPE_CHECKING:
    from mps_helpers._apply import plan_of, prepare_pipeline
    from mps_helpers._attention import SafeSlicedAttnProcessor
    from mps_helpers._auto import AutoPrepare, AutoPrepareWarning, auto_prepare
    from mps_helpers._batch import loop_tolerance
    from mps_helpers._checks import Finding, check_environment
    from mps_helpers._distributed import generate
    from mps_helpers._environment import Environment, detect_environment
    from mps_helpers._errors import (
        BatchError,
        DeviceOutOfMemoryError,
        DeviceUnavailableError,
        DistributedGenerationError,
        MemoryFitWarning,
        MemoryPressureWarning,
        NonFiniteOutputError,
        NonFiniteOutputWarning,
        OutOfMemoryRetryWarning,
        WarmupError,
    )
    from mps_helpers._known_problems import KnownProblem, known_problems
    from mps_helpers._load import load_pipeline
    from mps_helpers._memory import MemoryEstimate, estimate_memory
    from mps_helpers._plan import Plan, plan_for
    from mps_helpers._selftest import ProbeReport, ProbeResult, probe_device
    from mps_helpers._warmup import warmup

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "Environment": "mps_helpers._environment",
    "detect_environment": "mps_helpers._environment",
    "Finding": "mps_helpers._checks",
    "check_environment": "mps_helpers._checks",
    "Plan": "mps_helpers._plan",
    "plan_for": "mps_helpers._plan",
    "MemoryEstimate": "mps_helpers._memory",
    "estimate_memory": "mps_helpers._memory",
    "prepare_pipeline": "mps_helpers._apply",
    "plan_of": "mps_helpers._apply",
    "load_pipeline": "mps_helpers._load",
    "warmup": "mps_helpers._warmup",
    "SafeSlicedAttnProcessor": "mps_helpers._attention",
    "auto_prepare": "mps_helpers._auto",
    "AutoPrepare": "mps_helpers._auto",
    "AutoPrepareWarning": "mps_helpers._auto",
    "generate": "mps_helpers._distributed",
    "loop_tolerance": "mps_helpers._batch",
    "BatchError": "mps_helpers._errors",
    "DeviceOutOfMemoryError": "mps_helpers._errors",
    "DeviceUnavailableError": "mps_helpers._errors",
    "DistributedGenerationError": "mps_helpers._errors",
    "MemoryFitWarning": "mps_helpers._errors",
    "MemoryPressureWarning": "mps_helpers._errors",
    "NonFiniteOutputError": "mps_helpers._errors",
    "NonFiniteOutputWarning": "mps_helpers._errors",
    "OutOfMemoryRetryWarning": "mps_helpers._errors",
    "WarmupError": "mps_helpers._errors",
    "KnownProblem": "mps_helpers._known_problems",
    "known_problems": "mps_helpers._known_problems",
    "ProbeReport": "mps_helpers._selftest",
    "ProbeResult": "mps_helpers._selftest",
    "probe_device": "mps_helpers._selftest",
}

__all__ = [
    "AutoPrepare",
    "AutoPrepareWarning",
    "BatchError",
    "DeviceOutOfMemoryError",
    "DeviceUnavailableError",
    "DistributedGenerationError",
    "Environment",
    "Finding",
    "KnownProblem",
    "MemoryEstimate",
    "MemoryFitWarning",
    "MemoryPressureWarning",
    "NonFiniteOutputError",
    "NonFiniteOutputWarning",
    "OutOfMemoryRetryWarning",
    "Plan",
    "ProbeReport",
    "ProbeResult",
    "SafeSlicedAttnProcessor",
    "WarmupError",
    "__version__",
    "auto_prepare",
    "check_environment",
    "detect_environment",
    "estimate_memory",
    "generate",
    "known_problems",
    "load_pipeline",
    "loop_tolerance",
    "plan_for",
    "plan_of",
    "prepare_pipeline",
    "probe_device",
    "warmup",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mps_helpers' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    # Only the public names: the module's own helpers (importlib, _EXPORTS, ...) are not API.
    return sorted(__all__)
