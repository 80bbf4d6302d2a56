"""Third-party log lines that tell the user nothing, and a scope that drops exactly those.

Each entry of :data:`NOISE` is one logger and the full pattern of one message it logs that
has nothing in it for the user; :func:`quiet` drops records that match, on that logger only,
for the duration of a ``with`` block. Everything else those libraries log still shows,
including the same message with content (a non-empty list of float32 modules).
Nothing here imports the libraries: a filter on a logger that has not logged yet costs
nothing.
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["NOISE", "quiet"]

NOISE: Final[dict[str, tuple[str, re.Pattern[str]]]] = {
    # diffusers' ModelMixin.to(dtype) warns that casting may break modules that must stay
    # in float32, and lists them; with an empty list there are none, so nothing can break.
    "empty-fp32-list": (
        "diffusers.models.modeling_utils",
        re.compile(
            r"There are modules in \w+ that should be kept in float32: \[\]\. Casting "
            r"directly with `to\(\)` can lead to inconsistent results; .*"
        ),
    ),
    # transformers picks the PIL image processor when torchvision is absent; the safety
    # checker's feature extractor works the same with it, and nothing asked for torchvision.
    "torchvision-fallback": (
        "transformers.utils.import_utils",
        re.compile(
            r"`(\w+)` requires torchvision \(not installed\); falling back to `\1Pil` for "
            r"backward compatibility\. .*"
        ),
    ),
}
"""Message id -> (logger name, pattern of the whole message)."""


class _Drop(logging.Filter):
    def __init__(self, pattern: re.Pattern[str]) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.fullmatch(record.getMessage()) is None


@contextlib.contextmanager
def quiet(*names: str) -> Iterator[None]:
    """Drop the messages of :data:`NOISE` named by ``names`` while the block runs.

    Raises:
        KeyError: a name is not in :data:`NOISE`.
    """
    installed = []
    for name in names:
        logger_name, pattern = NOISE[name]
        logger, drop = logging.getLogger(logger_name), _Drop(pattern)
        logger.addFilter(drop)
        installed.append((logger, drop))
    try:
        yield
    finally:
        for logger, drop in installed:
            logger.removeFilter(drop)
