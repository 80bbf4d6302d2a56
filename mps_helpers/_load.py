"""Loading a pipeline with the plan: the dtype is decided before ``from_pretrained``.

:func:`load_pipeline` reads what it can of a local directory (see
:func:`mps_helpers._facts.facts_of_directory`), plans, loads in the planned dtype (and the
``fp16`` variant where that is the plan) with the keyword the installed diffusers expects,
then prepares the pipeline with :func:`mps_helpers.prepare_pipeline`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from packaging.version import InvalidVersion, Version

from mps_helpers import _fit
from mps_helpers._apply import prepare_quietly
from mps_helpers._facts import PipelineFacts, facts_of_directory
from mps_helpers._options import option_values, validate_options
from mps_helpers._plan import make_plan, resolve_environment, resolve_probes, warn_ignored
from mps_helpers._util import dtype_name

if TYPE_CHECKING:
    import torch

    from mps_helpers._environment import Environment
    from mps_helpers._util import DeviceChoice, ProcessorChoice, Switch

__all__ = [
    "DTYPE_DICT_SINCE",
    "DTYPE_KEYWORD_SINCE",
    "dtype_keyword",
    "has_variant",
    "installed_diffusers_version",
    "load_pipeline",
]

logger = logging.getLogger(__name__)

#: diffusers accepts ``dtype=`` in ``from_pretrained`` from 0.40 (read from the 0.39 and 0.40
#: wheels); older releases know only ``torch_dtype=``.
DTYPE_KEYWORD_SINCE = Version("0.40")
#: Per-component dtype dicts (``{"default": ..., "vae": ...}``) from diffusers 0.33.
DTYPE_DICT_SINCE = Version("0.33")


def load_pipeline(
    model_or_path: str | os.PathLike[str],
    *,
    env: Environment | None = None,
    height: int | None = None,
    width: int | None = None,
    batch_size: int | None = None,
    device: DeviceChoice = "auto",
    dtype: torch.dtype | str = "auto",
    attention_slicing: Switch = "auto",
    attention_processor: ProcessorChoice = "safe",
    vae_slicing: Switch = "auto",
    vae_tiling: Switch = "auto",
    warmup: Switch = "auto",
    batch_to_loop: Switch = "auto",
    nan_guard: Switch = "auto",
    oom_retry: Switch = "auto",
    memory_watch: Switch = "auto",
    **from_pretrained_kwargs: Any,
) -> Any:
    """Load a pipeline in the planned dtype with ``from_pretrained``, then prepare it; return it.

    The dtype is decided before loading (loading float32 and casting afterwards doubles the
    peak memory, too much for an 8 GB Mac). When the plan is float16, ``variant="fp16"``
    files are preferred and the default files used when the repository has none.
    ``use_safetensors=True`` unless you pass it. The dtype goes to ``from_pretrained`` as
    ``dtype=`` or ``torch_dtype=``, whichever the installed diffusers expects. A local
    directory loads offline.

    Args:
        model_or_path: a Hub repository id or a local directory.
        env, height, ..., memory_watch: the plan options of :func:`prepare_pipeline`;
            ``torch_dtype=`` is accepted as another name for ``dtype``.
        from_pretrained_kwargs: passed on to ``from_pretrained`` (``variant``, ``revision``,
            ``local_files_only``, ...).

    Raises:
        ValueError: an option is not one of its valid values (raised before loading).
    """
    options = option_values(locals())
    kwargs = dict(from_pretrained_kwargs)
    kwargs = _safe_kwargs(kwargs, env)
    options["dtype"] = _dtype_option(dtype, kwargs.pop("torch_dtype", None))
    validated = validate_options(**options)
    machine = resolve_environment(env)

    local = Path(os.fspath(model_or_path))
    facts = facts_of_directory(local) if local.is_dir() else PipelineFacts()
    memory = _directory_memory(local)
    plan = make_plan(
        facts, machine, validated, probes=resolve_probes("cached", machine), memory=memory
    )
    # before loading: a saved directory is estimated from its configs and headers alone
    _fit.warn_if_unfit(memory, plan, machine)

    import torch

    kwargs.setdefault("use_safetensors", True)
    installed = installed_diffusers_version()
    load_dtype: Any = plan.dtype
    if plan.vae_dtype != plan.dtype and installed is not None and installed >= DTYPE_DICT_SINCE:
        load_dtype = {"default": plan.dtype, "vae": plan.vae_dtype}
    kwargs[dtype_keyword(installed)] = load_dtype

    fallback = False
    if "variant" not in kwargs and plan.dtype == torch.float16:
        if not local.is_dir():
            kwargs["variant"] = "fp16"
            fallback = True
        elif has_variant(local, "fp16"):
            kwargs["variant"] = "fp16"
        else:
            logger.info("%s has no fp16 variant files: loading its default files", local)
    logger.info(
        "loading %s with %s",
        model_or_path,
        ", ".join(f"{k}={_show_kwarg(v)}" for k, v in sorted(kwargs.items())),
    )
    pipe = _from_pretrained(model_or_path, kwargs, fallback=fallback)
    # The plan again, now that the pipeline is known (a Hub id's facts were not); only this
    # one is warned about, once.
    # (the fit warning too, unless it was given before loading)
    warn_ignored(prepare_quietly(pipe, machine, validated, warn_unfit=memory is None))
    return pipe


def _directory_memory(directory: Path) -> _fit.MemoryInputs | None:
    """Return the memory inputs of a saved pipeline directory (None: not one)."""
    if not (directory / "model_index.json").is_file():
        return None
    from mps_helpers._budget import read_live_memory
    from mps_helpers._memory import spec_of_directory

    try:
        spec = spec_of_directory(directory)
    except (OSError, ValueError):
        return None
    return _fit.MemoryInputs(spec, read_live_memory())


def _safe_kwargs(kwargs: dict[str, Any], env: Environment | None) -> dict[str, Any]:
    """Drop a ``device_map`` to mps that is unsafe with this torch (issue 14)."""
    from mps_helpers._load_safety import safe_load_kwargs

    return safe_load_kwargs(kwargs, resolve_environment(env))


def _show_kwarg(value: object) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show_kwarg(v)}" for k, v in value.items()) + "}"
    return dtype_name(value)


def _dtype_option(dtype: torch.dtype | str, torch_dtype: object) -> object:
    """Merge ``torch_dtype=`` (a from_pretrained name) into the plan's ``dtype`` option."""
    if torch_dtype is None:
        return dtype
    if isinstance(torch_dtype, dict):
        torch_dtype = torch_dtype.get("default", "auto")
    if isinstance(dtype, str) and dtype == "auto":
        return torch_dtype
    if dtype != torch_dtype:
        raise ValueError(
            f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree: pass only dtype"
        )
    return dtype


def _from_pretrained(model: Any, kwargs: dict[str, Any], *, fallback: bool) -> Any:
    from diffusers import DiffusionPipeline

    load: Any = DiffusionPipeline.from_pretrained
    try:
        return load(model, **kwargs)
    except (OSError, ValueError) as exc:
        message = str(exc).lower()
        if not fallback or ("variant" not in message and ".fp16." not in message):
            raise
        logger.info("%s has no fp16 variant (%s): loading its default files", model, exc)
        kwargs = {k: v for k, v in kwargs.items() if k != "variant"}
        return load(model, **kwargs)


def installed_diffusers_version() -> Version | None:
    """Return the installed diffusers version, or None when unknown."""
    from importlib import metadata

    try:
        return Version(metadata.version("diffusers"))
    except (metadata.PackageNotFoundError, InvalidVersion):
        return None


def dtype_keyword(diffusers_version: Version | None) -> str:
    """Return the ``from_pretrained`` keyword for the dtype: "dtype" from diffusers 0.40.

    Older releases only know ``torch_dtype`` (and so does an unknown version, since every
    release accepts it).
    """
    if diffusers_version is not None and diffusers_version >= DTYPE_KEYWORD_SINCE:
        return "dtype"
    return "torch_dtype"


def has_variant(directory: Path, variant: str) -> bool:
    """Return True when a saved pipeline directory has weight files of ``variant``."""
    marker = f".{variant}."
    for path in directory.rglob("*"):
        name = path.name
        if marker in name and name.endswith((".safetensors", ".bin", ".json")):
            return True
        # sharded variant files: diffusion_pytorch_model.fp16-00001-of-00002.safetensors
        if f".{variant}-" in name and name.endswith((".safetensors", ".bin")):
            return True
    return False
