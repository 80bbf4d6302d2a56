"""Pipeline facts: what the plan needs to know about a pipeline, read without changing it.

:func:`facts_of` reads a pipeline object, :func:`facts_of_directory` a saved pipeline
directory (its JSON configs and the header of its safetensors file, without loading any
weights); both return a frozen :class:`PipelineFacts` whose unknown fields stay None.
:func:`check_pipeline` is the one test of "is this a diffusers pipeline" that every public
entry point runs before it changes anything.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from mps_helpers._family_facts import call_default_size, family_facts, family_facts_of_directory
from mps_helpers._markers import original_class
from mps_helpers._util import MiB

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

    import torch

__all__ = [
    "Pipeline",
    "PipelineFacts",
    "PipelineT",
    "check_pipeline",
    "denoiser_of",
    "facts_of",
    "facts_of_directory",
    "size_from",
    "upcasts_vae_itself",
]


class Pipeline(Protocol):
    """What the library needs of a pipeline's type: a diffusers ``DiffusionPipeline`` has it.

    For type checkers only; at run time :func:`check_pipeline` asks for a real
    ``DiffusionPipeline``.
    """

    @property
    def components(self) -> Mapping[str, Any]:
        """The pipeline's components by name (``unet``, ``vae``, ``text_encoder``, ...)."""
        ...

    def to(self, *args: Any, **kwargs: Any) -> Any:
        """Move (and cast) the pipeline's components, as ``DiffusionPipeline.to`` does."""
        ...


#: A pipeline type kept through a call: ``prepare_pipeline(pipe: P) -> P``.
PipelineT = TypeVar("PipelineT", bound=Pipeline)


@dataclass(frozen=True)
class PipelineFacts:
    """What the plan needs to know about a pipeline, read from the object or its directory.

    Every field may be None ("unknown"): :func:`plan_for` without a pipeline plans from
    the machine alone.
    """

    #: The pipeline class's name ("StableDiffusionPipeline").
    class_name: str | None = None
    #: The denoiser's class name ("UNet2DConditionModel", "SD3Transformer2DModel").
    denoiser_class: str | None = None
    #: The denoiser implements ``set_attention_slice`` (only UNet-based ones do).
    supports_attention_slicing: bool | None = None
    #: The VAE config's ``force_upcast``.
    vae_force_upcast: bool | None = None
    #: The pipeline's own ``__call__`` upcasts a ``force_upcast`` VAE for decoding (SDXL family).
    upcasts_vae_itself: bool = False
    #: The dtype of the denoiser's weights as they are now (or as stored, before loading).
    weights_dtype: torch.dtype | None = None
    #: The pipeline's default output size in pixels.
    default_height: int | None = None
    default_width: int | None = None
    # Family facts (mps_helpers._family_facts reads them, mps_helpers._families' rules use
    # them; docs/explanation/dtype-per-family.md).
    #: "unet" or "transformer" (None: unknown).
    denoiser_kind: str | None = None
    #: The denoiser's attention heads, head size, patch sizes and input channels (config).
    attention_heads: int | None = None
    attention_head_dim: int | None = None
    patch_size: int | None = None
    patch_size_t: int | None = None
    in_channels: int | None = None
    #: The VAE's latent channels, and its spatial and temporal compression (3-D VAEs).
    vae_latent_channels: int | None = None
    vae_spatial_compression: int | None = None
    vae_temporal_compression: int | None = None
    #: The pipeline's ``__call__`` takes ``num_frames``; its default.
    takes_frames: bool = False
    default_num_frames: int | None = None
    #: The safetensors dtype names of the denoiser's stored weights ("BF16", "F8_E4M3").
    stored_dtypes: tuple[str, ...] = ()


def facts_of(pipe: Pipeline) -> PipelineFacts:
    """Return the :class:`PipelineFacts` of a diffusers pipeline object (reads, changes nothing).

    Raises:
        TypeError: ``pipe`` is not a diffusers ``DiffusionPipeline``.
    """
    check_pipeline(pipe)
    import torch

    components: dict[str, Any] = dict(pipe.components)
    denoiser = denoiser_of(pipe)
    vae = components.get("vae")
    weights_dtype = None
    if isinstance(denoiser, torch.nn.Module):
        weights_dtype = next((p.dtype for p in denoiser.parameters()), None)
    force_upcast = None
    if vae is not None and hasattr(vae, "config"):
        force_upcast = bool(getattr(vae.config, "force_upcast", False))
    height, width = _default_size(pipe, denoiser, vae)
    if height is None or width is None:  # video pipelines: the __call__'s defaults
        height, width = call_default_size(original_class(pipe))
    return PipelineFacts(
        class_name=original_class(pipe).__name__,
        denoiser_class=None if denoiser is None else type(denoiser).__name__,
        supports_attention_slicing=None
        if denoiser is None
        else hasattr(denoiser, "set_attention_slice"),
        vae_force_upcast=force_upcast,
        upcasts_vae_itself=upcasts_vae_itself(original_class(pipe)),
        weights_dtype=weights_dtype,
        default_height=height,
        default_width=width,
        **family_facts(denoiser, vae, original_class(pipe)),
    )


def check_pipeline(pipe: object) -> None:
    """Raise TypeError unless ``pipe`` is a diffusers ``DiffusionPipeline``."""
    from diffusers import DiffusionPipeline

    if not isinstance(pipe, DiffusionPipeline):
        kind = type(pipe)
        raise TypeError(
            f"expected a diffusers pipeline (a DiffusionPipeline such as "
            f"StableDiffusionPipeline), got {kind.__module__}.{kind.__qualname__}"
        )


#: Component names that hold the denoiser, most common first.
_DENOISER_NAMES = ("unet", "transformer", "prior", "decoder")


def denoiser_of(pipe: Pipeline) -> Any:
    """Return the pipeline's denoiser (its ``unet`` or ``transformer``), or None."""
    components: Mapping[str, Any] = pipe.components
    for name in _DENOISER_NAMES:
        module = components.get(name)
        if module is not None and hasattr(module, "parameters"):
            return module
    return None


def _default_size(pipe: Pipeline, denoiser: object, vae: object) -> tuple[int | None, int | None]:
    sample = getattr(pipe, "default_sample_size", None)
    if sample is None and denoiser is not None:
        sample = getattr(getattr(denoiser, "config", None), "sample_size", None)
    scale = getattr(pipe, "vae_scale_factor", None)
    if scale is None and vae is not None:
        blocks = getattr(getattr(vae, "config", None), "block_out_channels", None)
        scale = 2 ** (len(blocks) - 1) if blocks else None
    return size_from(sample, scale)


def size_from(sample: object, scale: object) -> tuple[int | None, int | None]:
    """Return (height, width) in pixels from a denoiser's ``sample_size`` and the VAE scale."""
    if not isinstance(scale, int) or sample is None:
        return None, None
    if isinstance(sample, int):
        return sample * scale, sample * scale
    if isinstance(sample, (list, tuple)) and len(sample) == 2:
        return int(sample[0]) * scale, int(sample[1]) * scale
    return None, None


@functools.cache
def upcasts_vae_itself(pipeline_class: type) -> bool:
    """Return True when the pipeline class's own ``__call__`` upcasts a force_upcast VAE.

    The SDXL family (and a few others) check ``vae.config.force_upcast`` while decoding and
    upcast an fp16 VAE to float32 themselves. Detected from the source of the pipeline's
    module (cached per class); falls back to the presence of ``upcast_vae``.
    """
    for klass in pipeline_class.__mro__:
        if klass.__module__.startswith("diffusers.pipelines.pipeline_utils") or klass is object:
            continue
        try:
            source = inspect.getsource(inspect.getmodule(klass))  # type: ignore[arg-type]  # None: TypeError below
        except (OSError, TypeError):
            return hasattr(pipeline_class, "upcast_vae")
        if "config.force_upcast" in source:
            return True
    return False


# ---------------------------------------------------------------------------------------
# A saved pipeline directory

_SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def facts_of_directory(directory: Path) -> PipelineFacts:
    """Return what a saved pipeline directory says about the pipeline, without loading it.

    Reads ``model_index.json``, the VAE's and the denoiser's ``config.json`` and the header
    of the denoiser's safetensors file (its stored dtype). Unknown parts stay None.
    """
    index = _read_json(directory / "model_index.json")
    if index is None:
        return PipelineFacts()
    import diffusers

    class_name = index.get("_class_name")
    pipeline_class = getattr(diffusers, class_name, None) if isinstance(class_name, str) else None
    denoiser_name = next(
        (n for n in ("unet", "transformer", "prior", "decoder") if _component_class(index, n)),
        None,
    )
    denoiser_class = _component_class(index, denoiser_name) if denoiser_name else None
    denoiser_type = getattr(diffusers, denoiser_class, None) if denoiser_class else None
    denoiser_config = _read_json(directory / (denoiser_name or "-") / "config.json") or {}
    vae_config = _read_json(directory / "vae" / "config.json")
    force_upcast = None
    if vae_config is not None:
        force_upcast = vae_config.get("force_upcast")
        if force_upcast is None:
            force_upcast = _init_default(
                getattr(diffusers, str(vae_config.get("_class_name")), None)
            )
    scale = None
    if vae_config is not None and isinstance(vae_config.get("block_out_channels"), list):
        scale = 2 ** (len(vae_config["block_out_channels"]) - 1)
    height, width = size_from(denoiser_config.get("sample_size"), scale)
    return PipelineFacts(
        class_name=class_name if isinstance(class_name, str) else None,
        denoiser_class=denoiser_class,
        supports_attention_slicing=None
        if denoiser_type is None
        else hasattr(denoiser_type, "set_attention_slice"),
        vae_force_upcast=None if force_upcast is None else bool(force_upcast),
        upcasts_vae_itself=False
        if not isinstance(pipeline_class, type)
        else upcasts_vae_itself(pipeline_class),
        weights_dtype=_stored_dtype(directory / denoiser_name) if denoiser_name else None,
        default_height=height,
        default_width=width,
        **family_facts_of_directory(
            directory,
            denoiser_name=denoiser_name,
            denoiser_class=denoiser_class,
            pipeline_class=pipeline_class if isinstance(pipeline_class, type) else None,
        ),
    )


def _init_default(cls: Any) -> Any:
    import inspect

    if cls is None:
        return None
    param = inspect.signature(cls.__init__).parameters.get("force_upcast")
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def _component_class(index: dict[str, Any], name: str | None) -> str | None:
    entry = index.get(name) if name else None
    if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str):
        return entry[1]
    return None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _stored_dtype(folder: Path) -> torch.dtype | None:
    """Return the dtype most tensors of a model folder's (non-variant) safetensors file have."""
    files = sorted(p for p in folder.glob("*.safetensors") if p.name.count(".") == 1)
    files = files or sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    try:
        with files[0].open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 0 < size < 100 * MiB:
                return None
            header = json.loads(handle.read(size))
    except (OSError, ValueError):
        return None
    counts = Counter(
        entry.get("dtype")
        for key, entry in header.items()
        if key != "__metadata__" and isinstance(entry, dict)
    )
    if not counts:
        return None
    name = _SAFETENSORS_DTYPES.get(str(counts.most_common(1)[0][0]))
    if name is None:
        return None
    import torch

    dtype: torch.dtype = getattr(torch, name)
    return dtype
