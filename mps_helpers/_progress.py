"""Progress bars of the prepared call: silence a pipeline's bars, or show one counting prompts.

A pipeline's per-step bars follow its ``_progress_bar_config`` (what
``set_progress_bar_config`` stores). Combined pipelines (Kandinsky, Wuerstchen, Stable
Cascade) hold sub-pipelines with configs of their own and override ``progress_bar`` for
other purposes (Kandinsky 2.2's returns None and turns on model offloading), so nothing here
ever calls a pipeline's ``progress_bar``: the bars are the library's own tqdm, configured
from the pipeline's config as diffusers configures its own.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["progress_config", "prompt_progress", "sub_pipelines"]

_MISSING = object()


def sub_pipelines(pipe: Any) -> list[Any]:
    """Return the pipelines a combined pipeline holds as attributes (its prior, decoder...)."""
    state = getattr(pipe, "__dict__", {})
    return [
        value
        for value in state.values()
        if value is not pipe
        and hasattr(value, "set_progress_bar_config")
        and hasattr(value, "components")
    ]


def _config_of(pipe: Any) -> dict[str, Any]:
    saved = getattr(pipe, "_progress_bar_config", None)
    return dict(saved) if isinstance(saved, dict) else {}


@contextlib.contextmanager
def progress_config(pipe: Any, **overrides: Any) -> Iterator[dict[str, Any]]:
    """Set ``overrides`` on the progress-bar config of ``pipe`` and its sub-pipelines for the
    block, then restore each.

    Yields the pipeline's own config (as ``set_progress_bar_config`` left it; a combined
    pipeline's is its first sub-pipeline's) so that the caller can honour it. The originals
    are put back even when the block raises.
    """
    pipes = [pipe, *sub_pipelines(pipe)]
    saved = [getattr(each, "_progress_bar_config", _MISSING) for each in pipes]
    configs = [_config_of(each) for each in pipes]
    own = configs[0] if isinstance(saved[0], dict) or len(pipes) == 1 else configs[1]
    for each, config in zip(pipes, configs, strict=True):
        each._progress_bar_config = {**config, **overrides}
    try:
        yield own
    finally:
        for each, before in zip(pipes, saved, strict=True):
            if before is _MISSING:
                with contextlib.suppress(AttributeError):
                    del each._progress_bar_config
            else:
                each._progress_bar_config = before


def _not_rank_zero() -> bool:
    """Return True in a process of a torch.distributed group other than the first."""
    import torch

    distributed = torch.distributed
    return bool(
        distributed.is_available() and distributed.is_initialized() and distributed.get_rank()
    )


@contextlib.contextmanager
def prompt_progress(pipe: Any, prompts: int) -> Iterator[Any]:
    """Yield one progress bar counting prompts; silence the per-step bars meanwhile.

    The bar follows the pipeline's ``set_progress_bar_config`` (``disable=True`` included)
    as the pipeline's own bars do, shown on the first process only by default; the configs
    are restored afterwards.
    """
    from tqdm.auto import tqdm

    with progress_config(pipe, disable=True) as config:
        options = {"unit": "prompt", **config}
        options.setdefault("disable", _not_rank_zero())
        bar = tqdm(total=prompts, **options)
        try:
            yield bar
        finally:
            bar.close()
