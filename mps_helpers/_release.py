"""Releasing the text encoders within a call, on unified memory, when the estimate needs it.

With ``plan.release_text_encoders`` (decided by :mod:`mps_helpers._fit` on mps, where the
encoders' weights share the memory the denoiser and the VAE decode need), each pipeline call
that the prepared call makes goes through :func:`around`:

- before it, text encoders released by an earlier call are loaded again from the
  pipeline's saved directory, unless the call brings its prompts encoded
  (``prompt_embeds`` and, with guidance, ``negative_prompt_embeds``): then they stay
  released;
- once its denoiser first runs (the prompts are encoded; their outputs are the pipeline's
  own tensors and stay), the encoders' parameters are replaced by empty tensors of the same
  dtype on the same device, so that their memory goes back to the allocator. The modules
  stay in the pipeline and still report their device and dtype.

Reloading reads the component's safetensors files and costs a disk read and a copy each call
that needs the encoders (``docs/explanation/memory.md`` has the measured times). A pipeline
that was not loaded from a local directory, or an encoder whose files do not name all its
parameters, is never released (logged once).
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mps_helpers._markers import released_encoders

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    import torch

__all__ = ["around", "release", "released", "reload"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Released:
    files: tuple[Path, ...]
    #: parameter name -> (the parameter, its names in the files, device, dtype)
    params: tuple[tuple[Any, tuple[str, ...]], ...]


def _encoders(pipe: Any) -> dict[str, Any]:
    import torch

    return {
        name: module
        for name, module in pipe.components.items()
        if name.startswith("text_encoder") and isinstance(module, torch.nn.Module)
    }


def source_directory(pipe: Any) -> Path | None:
    """Return the local directory ``pipe`` was loaded from, or None."""
    from mps_helpers._memory import source_directory as directory_of

    name = directory_of(pipe)
    return None if name is None else Path(name)


def released(pipe: Any) -> tuple[str, ...]:
    """Return the names of ``pipe``'s text encoders that are released now."""
    return tuple(released_encoders(pipe))


def _files(folder: Path) -> tuple[Path, ...]:
    from mps_helpers._memory import _weight_files

    return tuple(_weight_files(folder))


def _plan_release(module: Any, files: tuple[Path, ...]) -> _Released | None:
    """Return how to release and reload ``module`` from ``files``, or None if they fall short."""
    from mps_helpers._memory import read_safetensors_header

    keys: set[str] = set()
    for path in files:
        try:
            keys.update(k for k in read_safetensors_header(path) if k != "__metadata__")
        except (OSError, ValueError):
            return None
    names: dict[int, list[str]] = {}
    objects: dict[int, Any] = {}
    for name, value in module.state_dict(keep_vars=True).items():
        if type(value).__name__ == "Parameter":
            names.setdefault(id(value), []).append(name)
            objects[id(value)] = value
    params = []
    for key, aliases in names.items():
        stored = tuple(a for a in aliases if a in keys)
        if not stored:  # a tied or renamed weight the files do not name: keep this encoder
            return None
        params.append((objects[key], stored))
    return _Released(files, tuple(params))


@functools.cache
def _warned(reason: str) -> None:
    logger.info("text encoders are kept: %s", reason)


def release(pipe: Any) -> tuple[str, ...]:
    """Release ``pipe``'s text encoders (those that can be reloaded); return their names."""
    import torch

    directory = source_directory(pipe)
    if directory is None:
        _warned("the pipeline was not loaded from a local directory to reload them from")
        return ()
    done: dict[str, _Released] = released_encoders(pipe)
    names = []
    for name, module in _encoders(pipe).items():
        if name in done:
            continue
        plan = _plan_release(module, _files(directory / name))
        if plan is None:
            _warned(f"{name}'s files in {directory} do not name all its parameters")
            continue
        with torch.no_grad():
            for param, _stored in plan.params:
                param.data = torch.empty(0, dtype=param.dtype, device=param.device)
        done[name] = plan
        names.append(name)
    if names:
        _empty_cache()
        logger.info("released %s after encoding", ", ".join(names))
    return tuple(names)


def reload(pipe: Any) -> float:
    """Load ``pipe``'s released text encoders again from disk; return the seconds it took."""
    done: dict[str, _Released] = released_encoders(pipe)
    if not done:
        return 0.0
    import torch
    from safetensors.torch import load_file

    start = time.perf_counter()
    for name, plan in list(done.items()):
        tensors: dict[str, torch.Tensor] = {}
        for path in plan.files:
            tensors.update(load_file(str(path)))
        with torch.no_grad():
            for param, stored in plan.params:
                param.data = tensors[stored[0]].to(device=param.device, dtype=param.dtype)
        del done[name]
    seconds = time.perf_counter() - start
    logger.info("text encoders reloaded from disk in %.2f s", seconds)
    return seconds


def _empty_cache() -> None:
    import torch

    mps = getattr(torch, "mps", None)
    backend = getattr(getattr(torch, "backends", None), "mps", None)
    if mps is not None and backend is not None and backend.is_available():
        mps.empty_cache()


def needs_encoders(pipe: Any, kwargs: Mapping[str, Any]) -> bool:
    """Return False when a call brings its prompts encoded, so the encoders are not used."""
    if kwargs.get("prompt") is not None or kwargs.get("prompt_embeds") is None:
        return True
    if kwargs.get("negative_prompt_embeds") is not None:
        return False
    from mps_helpers._memory import _call_default, guidance_mode

    cls: type = type(pipe)
    if guidance_mode(cls) == "none":
        return False
    scale = kwargs.get("guidance_scale", _call_default(cls, "guidance_scale"))
    return not (isinstance(scale, (int, float)) and scale <= 1)


def around(pipe: Any, call: Callable[..., Any]) -> Callable[..., Any]:
    """Return ``call`` that reloads what it needs first and releases once denoising starts."""
    from mps_helpers._facts import denoiser_of

    @functools.wraps(call)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if released(pipe) and needs_encoders(pipe, kwargs):
            reload(pipe)
        denoiser = denoiser_of(pipe)
        handle = None
        if denoiser is not None:

            def hook(module: Any, inputs: Any) -> None:
                nonlocal handle
                release(pipe)
                if handle is not None:  # once per call
                    handle.remove()
                    handle = None

            handle = denoiser.register_forward_pre_hook(hook)
        try:
            return call(*args, **kwargs)
        finally:
            if handle is not None:
                handle.remove()

    return wrapped
