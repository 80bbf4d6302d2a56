"""Family facts: what kind of denoiser and VAE a pipeline has, read from configs.

The denoiser is a UNet (it implements ``set_attention_slice``, or its class says UNet) or a
transformer (its class says Transformer/DiT, or it has ``transformer_blocks``); the media
are video when the VAE compresses time (a temporal compression in its config or attributes)
or the pipeline takes ``num_frames``. :func:`family_facts` reads these fields of
:class:`~mps_helpers._facts.PipelineFacts` from a pipeline's parts,
:func:`family_facts_of_directory` from a saved directory (configs and safetensors headers
only, never the weights). The rules that follow from them are :mod:`mps_helpers._families`'.

Nothing of the package is imported here, so that :mod:`mps_helpers._facts` can call it.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

__all__ = [
    "FLOAT8_STORED",
    "call_default_size",
    "family_facts",
    "family_facts_of_directory",
    "safetensors_dtypes",
]

#: safetensors dtype names of float8 weights.
FLOAT8_STORED: tuple[str, ...] = ("F8_E4M3", "F8_E5M2")


def _config(obj: Any) -> Mapping[str, Any]:
    config = getattr(obj, "config", None)
    if isinstance(config, Mapping):
        return config
    return {}


def _first_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], int):
        return int(value[0])
    return None


def _patch(value: Any) -> tuple[int | None, int | None]:
    """Return (spatial, temporal) patch sizes from an int or a (t, h, w) tuple."""
    if isinstance(value, bool):
        return None, None
    if isinstance(value, int):
        return value, None
    if isinstance(value, (list, tuple)) and len(value) == 3:
        return int(value[1]), int(value[0])
    return None, None


def _temporal(vae_config: Mapping[str, Any], vae: Any = None) -> int | None:
    """Return the VAE's temporal compression from its attributes or config, or None."""
    for name in ("temporal_compression_ratio", "scale_factor_temporal"):
        # Instance attributes only: diffusers warns on config keys read as attributes.
        value = vars(vae).get(name) if vae is not None else None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        value = vae_config.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    for name in ("temperal_downsample", "temporal_downsample"):
        flags = vae_config.get(name)
        if isinstance(flags, (list, tuple)) and flags:
            return int(2 ** sum(1 for flag in flags if flag))
    return None


def _spatial(vae_config: Mapping[str, Any], vae: Any = None) -> int | None:
    for name in ("spatial_compression_ratio", "scale_factor_spatial"):
        # Instance attributes only: diffusers warns on config keys read as attributes.
        value = vars(vae).get(name) if vae is not None else None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        value = vae_config.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    blocks = vae_config.get("block_out_channels")
    if isinstance(blocks, (list, tuple)) and blocks:
        return int(2 ** (len(blocks) - 1))
    return None


def _denoiser_kind(cls: Any, name: str | None, instance: Any = None) -> str | None:
    if cls is not None and hasattr(cls, "set_attention_slice"):
        return "unet"
    text = name or ""
    if "unet" in text.lower():
        return "unet"
    # "DiT" case-sensitively: "UNet2DConditionModel" holds "dit" too.
    if "transformer" in text.lower() or "DiT" in text:
        return "transformer"
    if instance is not None and hasattr(instance, "transformer_blocks"):
        return "transformer"
    return None


@functools.cache
def _default_frames(pipeline_class: type) -> int | None:
    try:
        parameters = inspect.signature(pipeline_class.__call__).parameters
    except (TypeError, ValueError):
        return None
    parameter = parameters.get("num_frames")
    if parameter is None:
        return None
    default = parameter.default
    return default if isinstance(default, int) and not isinstance(default, bool) else None


def call_default_size(pipeline_class: type) -> tuple[int | None, int | None]:
    """Return the int defaults of ``height`` and ``width`` in the pipeline's ``__call__``."""
    try:
        parameters = inspect.signature(pipeline_class.__call__).parameters
    except (TypeError, ValueError):
        return None, None
    sizes = []
    for name in ("height", "width"):
        parameter = parameters.get(name)
        default = None if parameter is None else parameter.default
        plain = isinstance(default, int) and not isinstance(default, bool)
        sizes.append(default if plain else None)
    if None in sizes:
        return None, None
    return sizes[0], sizes[1]


def _takes_frames(pipeline_class: type | None) -> bool:
    if pipeline_class is None:
        return False
    try:
        return "num_frames" in inspect.signature(pipeline_class.__call__).parameters
    except (TypeError, ValueError):
        return False


def _from_configs(
    denoiser_config: Mapping[str, Any],
    vae_config: Mapping[str, Any],
    *,
    vae: Any = None,
    denoiser_cls: Any = None,
    denoiser_name: str | None = None,
    denoiser: Any = None,
    pipeline_class: type | None = None,
) -> dict[str, Any]:
    patch, patch_t = _patch(denoiser_config.get("patch_size"))
    if denoiser_config.get("patch_size_t") is not None:
        patch_t = _first_int(denoiser_config.get("patch_size_t"))
    heads = _first_int(denoiser_config.get("num_attention_heads"))
    head_dim = _first_int(denoiser_config.get("attention_head_dim"))
    kind = _denoiser_kind(denoiser_cls, denoiser_name, denoiser)
    if kind == "unet" and heads is None:
        # UNet configs name their head count "attention_head_dim" (SD 1.x: 8 heads).
        heads, head_dim = head_dim, None
    latent = vae_config.get("latent_channels", vae_config.get("z_dim"))
    return {
        "denoiser_kind": kind,
        "attention_heads": heads,
        "attention_head_dim": head_dim,
        "patch_size": patch,
        "patch_size_t": patch_t,
        "in_channels": _first_int(denoiser_config.get("in_channels")),
        "vae_latent_channels": latent if isinstance(latent, int) else None,
        "vae_spatial_compression": _spatial(vae_config, vae),
        "vae_temporal_compression": _temporal(vae_config, vae),
        "takes_frames": _takes_frames(pipeline_class),
        "default_num_frames": None if pipeline_class is None else _default_frames(pipeline_class),
    }


def family_facts(denoiser: Any, vae: Any, pipeline_class: type | None) -> dict[str, Any]:
    """Return the family fields of :class:`~mps_helpers._facts.PipelineFacts` for a pipeline's
    denoiser, VAE and (unprepared) class.

    Reads their configs and attributes; changes nothing.
    """
    return _from_configs(
        _config(denoiser),
        _config(vae),
        vae=vae,
        denoiser_cls=None if denoiser is None else type(denoiser),
        denoiser_name=None if denoiser is None else type(denoiser).__name__,
        denoiser=denoiser,
        pipeline_class=pipeline_class,
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def family_facts_of_directory(
    directory: Path,
    *,
    denoiser_name: str | None,
    denoiser_class: str | None,
    pipeline_class: type | None,
) -> dict[str, Any]:
    """Return the family fields of the facts for a saved pipeline directory.

    Reads the configs and the safetensors headers of the denoiser (never its weights).
    """
    import diffusers

    denoiser_config = _read_json(directory / (denoiser_name or "-") / "config.json")
    vae_config = _read_json(directory / "vae" / "config.json")
    fields = _from_configs(
        denoiser_config,
        vae_config,
        denoiser_cls=getattr(diffusers, denoiser_class, None) if denoiser_class else None,
        denoiser_name=denoiser_class,
        pipeline_class=pipeline_class,
    )
    if denoiser_name:
        fields["stored_dtypes"] = safetensors_dtypes(directory / denoiser_name)
    return fields


#: The most bytes a safetensors header may have (the format's own limit is 100 MB).
_HEADER_LIMIT = 100 * 2**20


def safetensors_dtypes(folder: Path) -> tuple[str, ...]:
    """Return the safetensors dtype names ("F8_E4M3", "BF16", ...) in a model folder, sorted.

    Reads the 8-byte length and the JSON header of each (non-variant) ``*.safetensors``
    file: never the tensors. Unreadable files are skipped.
    """
    files = sorted(p for p in folder.glob("*.safetensors") if p.name.count(".") == 1)
    files = files or sorted(folder.glob("*.safetensors"))
    names: set[str] = set()
    for path in files:
        try:
            with path.open("rb") as handle:
                size = int.from_bytes(handle.read(8), "little")
                if not 0 < size < _HEADER_LIMIT:
                    continue
                header = json.loads(handle.read(size))
        except (OSError, ValueError):
            continue
        if isinstance(header, dict):
            names.update(
                str(entry["dtype"])
                for key, entry in header.items()
                if key != "__metadata__" and isinstance(entry, dict) and "dtype" in entry
            )
    return tuple(sorted(names))
