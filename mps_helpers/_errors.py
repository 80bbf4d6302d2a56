"""Exceptions and warnings the library raises, in one place so every layer can share them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mps_helpers._checks import Finding

__all__ = [
    "BatchError",
    "DeviceOutOfMemoryError",
    "DeviceUnavailableError",
    "DistributedGenerationError",
    "MemoryFitWarning",
    "MemoryPressureWarning",
    "NonFiniteOutputError",
    "NonFiniteOutputWarning",
    "OutOfMemoryRetryWarning",
    "WarmupError",
]


class DeviceUnavailableError(RuntimeError):
    """An explicitly requested device cannot be used on this machine.

    ``findings`` holds the readiness findings (see :func:`mps_helpers.check_environment`)
    that explain why, each with its fix.
    """

    def __init__(self, message: str, findings: tuple[Finding, ...] = ()) -> None:
        super().__init__(message)
        self.findings = findings


class BatchError(Exception):
    """One prompt of a looped batch failed; the prompts finished before it are kept.

    Attributes:
        index: position of the failing prompt in the batch.
        completed: the merged result of the prompts before ``index``, of the same type a
            normal call returns (None when the first prompt failed).
    """

    def __init__(self, message: str, *, index: int, completed: Any) -> None:
        super().__init__(message)
        self.index = index
        self.completed = completed


class DistributedGenerationError(BatchError):
    """Some processes of a distributed :func:`mps_helpers.generate` failed; the rest is kept.

    A :class:`BatchError`, so one ``except BatchError`` handles a looped batch and a
    distributed one alike.

    Attributes:
        index: the first prompt that was not generated.
        failed: every prompt index that was not generated, in order.
        completed: the merged result of the prompts that finished, in prompt order, of the
            same type a normal call returns (None when none finished).
        completed_indices: the prompt index of each prompt in ``completed``, in order.
        errors: the traceback text of each failed process, by process index.
    """

    def __init__(
        self,
        message: str,
        *,
        index: int,
        completed: Any,
        failed: tuple[int, ...],
        completed_indices: tuple[int, ...],
        errors: dict[int, str],
    ) -> None:
        super().__init__(message, index=index, completed=completed)
        self.failed = failed
        self.completed_indices = completed_indices
        self.errors = errors


class WarmupError(RuntimeError):
    """The one-time warmup pass failed (the pipeline itself is left usable)."""


class DeviceOutOfMemoryError(RuntimeError):
    """The device ran out of memory, also after a retry with a stricter memory plan."""


class NonFiniteOutputWarning(RuntimeWarning):
    """The pipeline produced NaN/inf images; the library repaired them (the message says how)."""


class NonFiniteOutputError(RuntimeError):
    """The pipeline produced NaN/inf images and no repair gave finite ones."""


class MemoryPressureWarning(RuntimeWarning):
    """Swap grew during a call: the machine was short of memory and slowed down."""


class OutOfMemoryRetryWarning(RuntimeWarning):
    """The device ran out of memory; a retry with a stricter memory plan worked (and stays)."""


class MemoryFitWarning(RuntimeWarning):
    """A pipeline is predicted not to fit the device's memory at the planned size.

    :func:`~mps_helpers.prepare_pipeline` and :func:`~mps_helpers.load_pipeline` give it
    before the first call (before loading, for a local directory), with the predicted peak,
    the phase where it occurs and the usable memory. Make it an error to refuse such a
    pipeline instead of swapping or being killed::

        warnings.simplefilter("error", mps_helpers.MemoryFitWarning)

    .. versionadded:: 0.1
    """
