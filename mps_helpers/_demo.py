"""The ``demo`` command's work: build and prepare a pipeline, generate one image, save it.

The command line (:mod:`mps_helpers._cli`) prints between the steps; nothing here prints.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping

    from mps_helpers._facts import Pipeline

__all__ = ["DEFAULT_OUTPUT", "DEFAULT_PROMPT", "DemoImage", "demo_pipeline", "generate_image"]

DEFAULT_OUTPUT = "mps_helpers_demo.png"
DEFAULT_PROMPT = "a photo of an astronaut riding a horse on mars"


@dataclass(frozen=True)
class DemoImage:
    """Where :func:`generate_image` saved its image, and what it took."""

    path: Path
    width: int
    height: int
    steps: int
    seconds: float


def demo_pipeline(model: str | None, options: Mapping[str, Any]) -> Any:
    """Return a prepared pipeline: ``model`` loaded by ``load_pipeline``, or a tiny one.

    Without ``model`` the pipeline is :func:`mps_helpers.testing.tiny_pipeline` ``("sd")``:
    random weights built offline, so it works on a fresh machine with no network.

    Raises:
        ImportError: no ``model`` and transformers (the ``testing`` extra) is missing.
        ValueError: an option's value is invalid.
    """
    from mps_helpers._apply import prepare_pipeline
    from mps_helpers._load import load_pipeline

    if model is not None:
        return load_pipeline(model, **options)
    from mps_helpers.testing import tiny_pipeline

    pipe = tiny_pipeline("sd")
    prepared = prepare_pipeline(pipe, **options)
    return pipe if prepared is None else prepared


def generate_image(
    pipe: Any, *, prompt: str, steps: int | None, seed: int, output: str | Path
) -> DemoImage:
    """Generate one image for ``prompt`` with ``pipe``, save it as PNG at ``output``, report it.

    ``steps`` None uses the pipeline's own default. The noise comes from a CPU generator
    seeded with ``seed``: the same on every device.
    """
    import torch

    path = Path(output).expanduser().resolve()
    kwargs: dict[str, Any] = {"generator": torch.Generator("cpu").manual_seed(seed)}
    if steps is not None:
        kwargs["num_inference_steps"] = steps
    start = time.perf_counter()
    image = pipe(prompt, **kwargs).images[0]
    seconds = time.perf_counter() - start
    image.save(path, format="PNG")
    used = steps if steps is not None else _default_steps(pipe)
    return DemoImage(path, image.width, image.height, used, seconds)


def _default_steps(pipe: Pipeline) -> int:
    import inspect

    parameter = inspect.signature(type(pipe).__call__).parameters.get("num_inference_steps")
    default = getattr(parameter, "default", None)
    return default if isinstance(default, int) else 0
