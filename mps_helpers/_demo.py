"""The ``demo`` command's work: build and prepare a pipeline, generate one image, save it.

The command line (:mod:`mps_helpers._cli`) prints between the steps; nothing here prints.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping

    from mps_helpers._facts import Pipeline

__all__ = [
    "DEFAULT_OUTPUT",
    "DEFAULT_PROMPT",
    "DemoImage",
    "check_output",
    "demo_pipeline",
    "generate_image",
]

DEFAULT_OUTPUT = "mps_helpers_demo.png"
DEFAULT_PROMPT = "a photo of an astronaut riding a horse on mars"
# A Hub repository id: NAME or ORGANISATION/NAME, each part of letters, digits, "-", "_" and
# ".", neither starting nor ending with "-" or "." (what huggingface_hub accepts). "./x",
# "/x/y" and "~/x" are paths.
_HUB_ID = re.compile(r"(?:\w(?:[\w.-]*\w)?/)?\w(?:[\w.-]*\w)?")


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
        FileNotFoundError: ``model`` is neither an existing path nor a Hub id (checked
            before anything is loaded).
        OSError: the model cannot be loaded (diffusers' message).
        ValueError: an option's value is invalid.
    """
    from mps_helpers._quiet import quiet

    # diffusers' pipelines import CLIPImageProcessor: no torchvision notice for the demo.
    with quiet("torchvision-fallback"):
        return _build(model, options)


def _build(model: str | None, options: Mapping[str, Any]) -> Any:
    from mps_helpers._apply import prepare_pipeline
    from mps_helpers._load import load_pipeline

    if model is not None:
        if not Path(model).expanduser().exists() and not _HUB_ID.fullmatch(model):
            raise FileNotFoundError(
                f"no model at {model!r}: it is neither a directory nor a Hub id "
                "(ORGANISATION/NAME); pass a diffusers model directory or a Hub id such as "
                "stable-diffusion-v1-5/stable-diffusion-v1-5"
            )
        return load_pipeline(model, **options)
    from mps_helpers.testing import tiny_pipeline

    pipe = tiny_pipeline("sd")
    prepared = prepare_pipeline(pipe, **options)
    return pipe if prepared is None else prepared


def check_output(output: str | Path) -> Path:
    """Return ``output`` as an absolute path after checking that its directory exists.

    Raises:
        FileNotFoundError: the directory does not exist.
        NotADirectoryError: the "directory" is a file.
    """
    path = Path(output).expanduser().resolve()
    folder = path.parent
    if not folder.exists():
        raise FileNotFoundError(
            f"cannot save the image to {path}: the directory {folder} does not exist; "
            "create it, or pass another --output"
        )
    if not folder.is_dir():
        raise NotADirectoryError(
            f"cannot save the image to {path}: {folder} is not a directory; pass another --output"
        )
    return path


def generate_image(
    pipe: Any, *, prompt: str, steps: int | None, seed: int, output: str | Path
) -> DemoImage:
    """Generate one image for ``prompt`` with ``pipe``, save it as PNG at ``output``, report it.

    ``steps`` None uses the pipeline's own default. The noise comes from a CPU generator
    seeded with ``seed``: the same on every device.

    Raises:
        OSError: the image could not be saved; the message names the path and the reason.
    """
    import torch

    path = Path(output).expanduser().resolve()
    kwargs: dict[str, Any] = {"generator": torch.Generator("cpu").manual_seed(seed)}
    if steps is not None:
        kwargs["num_inference_steps"] = steps
    start = time.perf_counter()
    image = pipe(prompt, **kwargs).images[0]
    seconds = time.perf_counter() - start
    try:
        image.save(path, format="PNG")
    except OSError as error:
        reason = error.strerror or str(error)
        message = f"cannot save the image to {path}: {reason}; pass another --output"
        raise OSError(message) from error
    used = steps if steps is not None else _default_steps(pipe)
    return DemoImage(path, image.width, image.height, used, seconds)


def _default_steps(pipe: Pipeline) -> int:
    import inspect

    parameter = inspect.signature(type(pipe).__call__).parameters.get("num_inference_steps")
    default = getattr(parameter, "default", None)
    return default if isinstance(default, int) else 0
