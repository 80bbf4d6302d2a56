"""Fakes shared by the tests of the prepared call and of the warmup."""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any

import torch


def make_plan(**on: Any) -> SimpleNamespace:
    """Return a plan-like object with every feature off except those in ``on``."""
    fields: dict[str, Any] = {
        "device": "cpu",
        "dtype": torch.float32,
        "warmup": False,
        "batch_to_loop": False,
        "nan_guard": False,
        "oom_retry": False,
        "memory_watch": False,
        "memory_tight": False,
    }
    fields.update(on)
    return SimpleNamespace(**fields)


class Spy:
    """The pipeline's own ``__call__``, bound to it, recording (and optionally failing) calls."""

    def __init__(self, pipe: Any, fail_at: int | None = None) -> None:
        self.calls: list[dict[str, Any]] = []
        original = type(pipe).__call__

        @functools.wraps(original)
        def wrapper(inner: Any, *args: Any, **kwargs: Any) -> Any:
            self.calls.append(kwargs)
            if fail_at is not None and len(self.calls) == fail_at + 1:
                raise RuntimeError("injected failure")
            return original(inner, *args, **kwargs)

        self.call = functools.partial(wrapper, pipe)
