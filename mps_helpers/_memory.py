"""Will it fit? The predicted peak memory of one pipeline call, before anything is loaded.

:func:`estimate_memory` reads what a pipeline is made of (its components' configs and the
number of their weights: from the loaded modules, or from the JSON headers of a saved
directory's safetensors files, never their tensors) and returns a :class:`MemoryEstimate`:
the weights of each component, the working memory of the largest step of each phase of a
call (text encoding, one denoiser step, the VAE decode), and the peak.

Every working-memory term is a count of the tensors alive at the busiest point of a block,
written in the block's own dimensions (channels, heads, tokens, layers, patch size, the VAE's
scale factor), so a new model of a known family needs no new number. The counts were read
from diffusers' and transformers' code and checked against a trace of every allocation of a
forward pass on the meta device; the CUDA figures against ``torch.cuda.max_memory_allocated``
(``docs/explanation/memory.md`` has the table). Attention is where devices differ: a
memory-efficient SDPA kernel (CUDA, the CPU, mps from torch 2.13 for some head dims) never
materialises the ``B x H x L x S`` score matrix, the math path and mps's own SDPA before
2.13 do, and a bounded (chunked) processor materialises at most its chunk.

This module is pure apart from reading a directory's JSON files: it imports neither torch
nor diffusers at module level, and takes the plan duck-typed (any object with the
:class:`~mps_helpers.Plan` fields it reads).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import json
import logging
import math
import os
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from packaging.version import Version

from mps_helpers._environment import auto_device
from mps_helpers._facts import upcasts_vae_itself
from mps_helpers._markers import unprepared_class
from mps_helpers._util import dtype_name
from mps_helpers._util import format_bytes as _format_bytes

if TYPE_CHECKING:
    from mps_helpers._environment import Environment

__all__ = [
    "PHASES",
    "ComponentSpec",
    "MemoryEstimate",
    "ModelSpec",
    "Settings",
    "estimate",
    "estimate_memory",
    "settings_from_plan",
    "spec_of",
    "spec_of_directory",
    "spec_of_pipeline",
]

logger = logging.getLogger(__name__)


#: The phases of one call, in the order they run.
PHASES: tuple[str, ...] = ("text encoding", "denoiser step", "VAE decode")

_ITEMSIZE = {
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}
#: safetensors dtype codes of floating tensors (cast to the plan's dtype when loaded).
_SAFETENSORS_FLOAT = {
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
_SAFETENSORS_OTHER = {"I8": 1, "U8": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "BOOL": 1}
#: A safetensors header larger than this is not one (the format caps it at 100 MB).
_MAX_HEADER = 100 * 2**20

_DENOISER_NAMES = ("unet", "transformer", "prior", "decoder")

#: Score blocks alive at once where attention materialises them: the scores and their
#: softmax (measured: diffusers' sliced attention at 1024 px added two blocks' worth).
SCORE_BLOCKS = 2
#: Head dims for which torch 2.13's mps SDPA has its non-materialising kernels.
MPS_KERNEL_HEAD_DIMS = frozenset({32, 64, 72, 80, 96, 128, 256})
MPS_KERNEL_TORCH = Version("2.13")
#: torch's CPU SDPA has a flash kernel (query and key blocks) from 2.3.
CPU_KERNEL_TORCH = Version("2.3")
#: From torch 2.5 the math path upcasts half-precision inputs to float32 (CUDA, CPU).
MATH_UPCAST_TORCH = Version("2.5")
#: Extra bytes a convolution's workspace takes on CUDA, as a share of the bytes of its input
#: and output (cuDNN's layout transforms); zero elsewhere. Measured on an H200
#: (docs/explanation/memory.md).
CONV_WORKSPACE: Mapping[str, float] = types.MappingProxyType({"cuda": 1.0, "mps": 1.0, "cpu": 0.0})


# ---------------------------------------------------------------------------------------
# What a pipeline is made of


@dataclass(frozen=True)
class ComponentSpec:
    """One model of a pipeline: its architecture config and how many weights it holds."""

    #: The pipeline's name for it ("unet", "text_encoder_2", "vae").
    name: str
    #: Its class name ("UNet2DConditionModel", "T5EncoderModel").
    class_name: str
    #: "denoiser", "text_encoder", "vae" or "other".
    role: str
    #: Its architecture config (``config.json``), read-only.
    config: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=False)
    #: Floating-point elements of its parameters and buffers (cast to the plan's dtype).
    elements: int = 0
    #: Bytes of its other tensors (integer buffers, quantized weights), kept as they are.
    fixed_bytes: int = 0
    #: The dtype its floating tensors have now (loaded) or as stored (files), or None.
    dtype: str | None = None
    #: The device its weights are on now ("mps", "cuda", "cpu"), or None when not loaded.
    device: str | None = None
    #: Where the weight count comes from: "loaded", "safetensors header", "file size".
    source: str = "loaded"

    def __post_init__(self) -> None:
        object.__setattr__(self, "config", types.MappingProxyType(dict(self.config)))

    def weight_bytes(self, dtype: str | None) -> int:
        """Return its weights' bytes with its floating tensors in ``dtype`` (None: as they are)."""
        name = dtype or self.dtype or "float32"
        return self.elements * _ITEMSIZE.get(name, 4) + self.fixed_bytes


@dataclass(frozen=True)
class ModelSpec:
    """A pipeline's components and the facts of its class that its memory depends on."""

    pipeline_class: str | None
    components: tuple[ComponentSpec, ...]
    #: Pixels per latent position along each side (2 ** (VAE blocks - 1)).
    vae_scale_factor: int = 8
    #: Frames per latent frame of a video VAE (1 for images).
    temporal_scale_factor: int = 1
    #: How the pipeline runs classifier-free guidance: "batch" (the batch doubled in one
    #: denoiser call), "sequential" (two calls) or "none" (guidance-distilled).
    guidance: str = "batch"
    #: Tokens each text encoder reads per prompt, by component name.
    text_lengths: Mapping[str, int] = field(default_factory=dict, hash=False, compare=False)
    #: The pipeline's own call upcasts a ``force_upcast`` VAE to float32 for decoding (SDXL).
    upcasts_vae: bool = False
    #: The saved directory the spec was read from, or None.
    directory: str | None = None
    #: The frames a video pipeline's call makes by default (None for images).
    default_frames: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "text_lengths", types.MappingProxyType(dict(self.text_lengths)))

    def component(self, role: str) -> ComponentSpec | None:
        """Return the first component with ``role``, or None."""
        return next((c for c in self.components if c.role == role), None)

    def by_role(self, role: str) -> tuple[ComponentSpec, ...]:
        """Return every component with ``role``."""
        return tuple(c for c in self.components if c.role == role)


def _role(name: str) -> str:
    if name in _DENOISER_NAMES:
        return "denoiser"
    if name.startswith("text_encoder"):
        return "text_encoder"
    if name == "vae":
        return "vae"
    return "other"


def _config_dict(module: Any) -> dict[str, Any]:
    config = getattr(module, "config", None)
    if config is None:
        return {}
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):  # transformers' PretrainedConfig
        data = to_dict()
        return dict(data) if isinstance(data, Mapping) else {}
    if isinstance(config, Mapping):  # diffusers' FrozenDict
        return dict(config)
    return {}


def spec_of_pipeline(pipe: Any) -> ModelSpec:
    """Return the :class:`ModelSpec` of a loaded diffusers pipeline (reads, changes nothing)."""
    import torch

    components: list[ComponentSpec] = []
    for name, module in pipe.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        elements = fixed = 0
        dtypes: dict[str, int] = {}
        device = None
        seen: set[int] = set()
        for tensor in (*module.parameters(), *module.buffers()):
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            device = device or tensor.device.type
            if tensor.is_floating_point():
                elements += tensor.numel()
                key = dtype_name(tensor.dtype)
                dtypes[key] = dtypes.get(key, 0) + tensor.numel()
            else:
                fixed += tensor.numel() * tensor.element_size()
        components.append(
            ComponentSpec(
                name=name,
                class_name=type(module).__name__,
                role=_role(name),
                config=_config_dict(module),
                elements=elements,
                fixed_bytes=fixed,
                dtype=max(dtypes, key=dtypes.__getitem__) if dtypes else None,
                device=device,
                source="loaded",
            )
        )
    cls = unprepared_class(type(pipe))
    lengths = {}
    for spec in components:
        if spec.role == "text_encoder":
            tokenizer = pipe.components.get(spec.name.replace("text_encoder", "tokenizer"))
            limit = getattr(tokenizer, "model_max_length", None)
            lengths[spec.name] = _text_length(cls, spec, limit)
    vae = pipe.components.get("vae")
    return ModelSpec(
        pipeline_class=cls.__name__,
        components=tuple(components),
        vae_scale_factor=_scale_factor(_config_dict(vae) if vae is not None else {}),
        temporal_scale_factor=_temporal_factor(_config_dict(vae) if vae is not None else {}),
        guidance=guidance_mode(cls),
        text_lengths=lengths,
        upcasts_vae=upcasts_vae_itself(cls),
        directory=source_directory(pipe),
        default_frames=_default_frames(cls),
    )


def source_directory(pipe: Any) -> str | None:
    """Return the local directory a pipeline was loaded from (its ``model_index.json``'s)."""
    name = getattr(getattr(pipe, "config", None), "_name_or_path", None)
    if not isinstance(name, (str, os.PathLike)) or not os.fspath(name):
        return None
    path = os.fspath(name)
    return path if os.path.isfile(os.path.join(path, "model_index.json")) else None


def spec_of_directory(directory: str | os.PathLike[str]) -> ModelSpec:
    """Return the :class:`ModelSpec` of a saved pipeline directory without loading it.

    Reads ``model_index.json``, each component's ``config.json`` and the JSON header of each
    of its safetensors files (8 bytes of length, then the header): the tensors' shapes and
    dtypes, never their data. A component with only ``.bin`` files is counted by file size.

    Raises:
        FileNotFoundError: ``directory`` has no ``model_index.json``.
    """
    root = Path(os.fspath(directory))
    index = _read_json(root / "model_index.json")
    if index is None:
        raise FileNotFoundError(
            f"{root} is not a saved diffusers pipeline: it has no readable model_index.json"
        )
    pipeline_name = index.get("_class_name")
    components: list[ComponentSpec] = []
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2:
            continue
        class_name = entry[1]
        folder = root / name
        config = _read_json(folder / "config.json")
        if not isinstance(class_name, str) or config is None:
            continue  # a tokenizer, a scheduler, or a component that is not there
        elements, fixed, dtype, source = _count_weights(folder)
        components.append(
            ComponentSpec(
                name=name,
                class_name=class_name,
                role=_role(name),
                config=config,
                elements=elements,
                fixed_bytes=fixed,
                dtype=dtype,
                device=None,
                source=source,
            )
        )
    cls = _diffusers_class(pipeline_name)
    lengths = {}
    for spec in components:
        if spec.role == "text_encoder":
            tokenizer = _read_json(
                root / spec.name.replace("text_encoder", "tokenizer") / "tokenizer_config.json"
            )
            limit = None if tokenizer is None else tokenizer.get("model_max_length")
            lengths[spec.name] = _text_length(cls, spec, limit)
    vae_config = next((c.config for c in components if c.role == "vae"), {})
    return ModelSpec(
        pipeline_class=pipeline_name if isinstance(pipeline_name, str) else None,
        components=tuple(components),
        vae_scale_factor=_scale_factor(vae_config),
        temporal_scale_factor=_temporal_factor(vae_config),
        guidance=guidance_mode(cls) if cls is not None else "batch",
        text_lengths=lengths,
        upcasts_vae=upcasts_vae_itself(cls) if cls is not None else False,
        directory=str(root),
        default_frames=_default_frames(cls),
    )


def spec_of(pipe_or_directory: Any) -> ModelSpec:
    """Return the :class:`ModelSpec` of a pipeline object or of a saved directory."""
    if isinstance(pipe_or_directory, (str, os.PathLike)):
        return spec_of_directory(pipe_or_directory)
    if isinstance(pipe_or_directory, ModelSpec):
        return pipe_or_directory
    if not hasattr(pipe_or_directory, "components"):
        kind = type(pipe_or_directory)
        raise TypeError(
            "expected a diffusers pipeline, a saved pipeline directory or a ModelSpec, got "
            f"{kind.__module__}.{kind.__qualname__}"
        )
    return spec_of_pipeline(pipe_or_directory)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """Return the JSON header of a safetensors file: its first 8 + N bytes, nothing more.

    Raises:
        ValueError: the file is not a safetensors file.
    """
    with path.open("rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        if not 0 < size <= _MAX_HEADER:
            raise ValueError(f"{path} is not a safetensors file (header length {size})")
        data = handle.read(size)
    header = json.loads(data)
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file (header is not an object)")
    return header


def _weight_files(folder: Path) -> list[Path]:
    """Return one variant's safetensors files of a model folder (the default one first)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return []
    groups: dict[str, list[Path]] = {}
    for path in files:
        stem = path.name.removesuffix(".safetensors")
        # diffusion_pytorch_model[.fp16][-00001-of-00002]
        base = stem.split("-0")[0] if "-of-" in stem else stem
        variant = base.split(".", 1)[1] if "." in base else ""
        groups.setdefault(variant, []).append(path)
    return groups.get("") or groups[sorted(groups)[0]]


def _count_weights(folder: Path) -> tuple[int, int, str | None, str]:
    files = _weight_files(folder)
    if not files:
        binaries = [*folder.glob("*.bin"), *folder.glob("*.pt")]
        size = sum(p.stat().st_size for p in binaries)
        # a pickled checkpoint cannot be counted without loading it: its size, as float32
        return size // 4, 0, "float32", "file size" if binaries else "unknown"
    elements = fixed = 0
    dtypes: dict[str, int] = {}
    for path in files:
        try:
            header = read_safetensors_header(path)
        except (OSError, ValueError):
            continue
        for key, entry in header.items():
            if key == "__metadata__" or not isinstance(entry, dict):
                continue
            count = math.prod(int(n) for n in entry.get("shape", ()))
            code = str(entry.get("dtype"))
            name = _SAFETENSORS_FLOAT.get(code)
            if name is not None:
                elements += count
                dtypes[name] = dtypes.get(name, 0) + count
            else:
                fixed += count * _SAFETENSORS_OTHER.get(code, 1)
    dtype = max(dtypes, key=dtypes.__getitem__) if dtypes else None
    return elements, fixed, dtype, "safetensors header"


def _scale_factor(vae_config: Mapping[str, Any]) -> int:
    blocks = vae_config.get("block_out_channels")
    if isinstance(blocks, (list, tuple)) and blocks:
        return int(2 ** (len(blocks) - 1))
    downsample = vae_config.get("temperal_downsample")
    if isinstance(downsample, (list, tuple)):  # Wan: one spatial halving per level
        return int(2 ** len(downsample))
    return 8


def _temporal_factor(vae_config: Mapping[str, Any]) -> int:
    downsample = vae_config.get("temperal_downsample")
    if isinstance(downsample, (list, tuple)):
        return int(2 ** sum(bool(d) for d in downsample))
    return 1


def _diffusers_class(name: Any) -> type | None:
    if not isinstance(name, str):
        return None
    try:
        import diffusers
    except ImportError:
        return None
    cls = getattr(diffusers, name, None)
    return cls if isinstance(cls, type) else None


@functools.cache
def _call_source(cls: type) -> str:
    for klass in cls.__mro__:
        if klass is object or klass.__module__.startswith("diffusers.pipelines.pipeline_utils"):
            continue
        try:
            return inspect.getsource(klass)
        except (OSError, TypeError):
            return ""
    return ""


@functools.cache
def guidance_mode(pipeline_class: type) -> str:
    """Return how ``pipeline_class`` runs classifier-free guidance: batch, sequential or none.

    Read from its source: pipelines that stack the latents (``torch.cat([latents] * 2)``)
    double the denoiser's batch; those that know ``do_classifier_free_guidance`` but do not
    stack call the denoiser twice (Wan); the others (Flux, guidance-distilled) once.
    """
    source = _call_source(pipeline_class)
    if not source:
        return "batch"
    if "[latents] * 2" in source or "[latents, latents]" in source:
        return "batch"
    if "do_true_cfg" in source:
        return "none"  # Flux: guidance-distilled; "true" CFG only when asked for
    if "do_classifier_free_guidance" in source:
        return "sequential"
    return "none"


def _call_default(pipeline_class: type | None, name: str) -> Any:
    if pipeline_class is None:
        return None
    try:
        parameter = inspect.signature(pipeline_class.__call__).parameters.get(name)
    except (TypeError, ValueError):
        return None
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return None
    return parameter.default


def _default_frames(cls: type | None) -> int | None:
    frames = _call_default(cls, "num_frames")
    return frames if isinstance(frames, int) and not isinstance(frames, bool) else None


def _text_length(cls: type | None, spec: ComponentSpec, tokenizer_limit: Any) -> int:
    """Return the tokens a text encoder reads per prompt in ``cls``'s call."""
    config = spec.config
    positions = config.get("max_position_embeddings")
    if "CLIP" in spec.class_name and isinstance(positions, int):
        return positions
    default = _call_default(cls, "max_sequence_length")
    if isinstance(default, int):
        return default
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit <= 4096:
        return tokenizer_limit
    if isinstance(positions, int) and positions <= 4096:
        return positions
    return 512


# ---------------------------------------------------------------------------------------
# How a call runs: the settings that change its memory


@dataclass(frozen=True)
class Settings:
    """What of a plan the estimate reads (duck-typed from a :class:`~mps_helpers.Plan`)."""

    device: str = "cpu"
    #: Compute dtype of the denoiser and text encoders (a name: "float16").
    dtype: str | None = None
    #: The VAE's dtype (None: like ``dtype``).
    vae_dtype: str | None = None
    attention_slicing: bool = False
    attention_processor: str = "safe"
    attention_chunk_elements: int | None = None
    vae_slicing: bool = False
    vae_tiling: bool = False
    batch_to_loop: bool = False
    #: Text encoders are released after encoding (mps_helpers._release).
    release_text_encoders: bool = False
    #: The installed torch (decides which SDPA kernels exist).
    torch_version: Version | None = None
    #: False forces SDPA's math path (as ``torch.nn.attention.sdpa_kernel(MATH)`` does);
    #: None: the kernels the device and torch have.
    attention_kernel: bool | None = None

    def replace(self, **changes: Any) -> Settings:
        """Return a copy with some settings changed."""
        return dataclasses.replace(self, **changes)


def settings_from_plan(plan: Any, *, torch_version: Version | None = None) -> Settings:
    """Return the :class:`Settings` of a plan (any object with the Plan's fields)."""
    return Settings(
        device=str(plan.device),
        dtype=dtype_name(plan.dtype),
        vae_dtype=dtype_name(getattr(plan, "vae_dtype", plan.dtype)),
        attention_slicing=bool(getattr(plan, "attention_slicing", False)),
        attention_processor=str(getattr(plan, "attention_processor", "safe")),
        attention_chunk_elements=getattr(plan, "attention_chunk_elements", None),
        vae_slicing=bool(getattr(plan, "vae_slicing", False)),
        vae_tiling=bool(getattr(plan, "vae_tiling", False)),
        batch_to_loop=bool(getattr(plan, "batch_to_loop", False)),
        release_text_encoders=bool(getattr(plan, "release_text_encoders", False)),
        torch_version=torch_version,
    )


# ---------------------------------------------------------------------------------------
# Attention


@dataclass(frozen=True)
class _Attention:
    device: str
    torch_version: Version | None
    itemsize: int
    chunk: int | None  # bound on one block (safe processor), None: one block per call
    diffusers_sliced: bool  # diffusers' SlicedAttnProcessor (bmm, always materialises)
    forced: bool | None = None  # Settings.attention_kernel

    def kernel(self, head_dim: int) -> bool:
        """Return True where SDPA computes without materialising the score matrix."""
        if self.forced is not None:
            return self.forced
        release = () if self.torch_version is None else self.torch_version.release
        if self.device == "cuda":
            return head_dim % 8 == 0
        if self.device == "cpu":
            return release >= CPU_KERNEL_TORCH.release or self.torch_version is None
        if self.device == "mps":
            return release >= MPS_KERNEL_TORCH.release and head_dim in MPS_KERNEL_HEAD_DIMS
        return False

    def score_bytes(self) -> int:
        """Return the bytes of one materialised score element."""
        release = () if self.torch_version is None else self.torch_version.release
        upcast = self.device != "mps" and (
            self.torch_version is None or release >= MATH_UPCAST_TORCH.release
        )
        return 4 if upcast and self.itemsize < 4 else self.itemsize

    def scores(
        self, batch_heads: int, q_len: int, k_len: int, head_dim: int, *, sliceable: bool = False
    ) -> int:
        """Return the bytes of score blocks alive at once in one attention call."""
        full = batch_heads * q_len * k_len
        if sliceable and self.diffusers_sliced:
            # diffusers' SlicedAttnProcessor: baddbmm over slices of half the heads.
            return max(1, full // 2) * SCORE_BLOCKS * self.itemsize
        if self.kernel(head_dim):
            return 0
        block = min(full, self.chunk) if self.chunk is not None and sliceable else full
        score = self.score_bytes()
        # the math path's float32 copies of query, key and value (a chunk's share of them)
        upcast = 0
        if score > self.itemsize:
            upcast = 3 * batch_heads * max(q_len, k_len) * head_dim * score * block // full
        return block * SCORE_BLOCKS * score + upcast


# ---------------------------------------------------------------------------------------
# Working memory of each family, in bytes


@dataclass
class _Peak:
    """The largest of several candidate moments, with the name of the largest."""

    bytes: int = 0
    where: str = ""

    def offer(self, value: float, where: str) -> None:
        if value > self.bytes:
            self.bytes = int(value)
            self.where = where


def _int(config: Mapping[str, Any], *names: str, default: int = 0) -> int:
    for name in names:
        value = config.get(name)
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            return value
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], int):
            return int(value[0])
    return default


def _per_block(value: Any, count: int, default: int) -> list[int]:
    if isinstance(value, (list, tuple)):
        items = [int(v) if isinstance(v, int) else default for v in value]
        return (items + [items[-1] if items else default] * count)[:count]
    if isinstance(value, int) and not isinstance(value, bool):
        return [value] * count
    return [default] * count


def _conv(peak: _Peak, live: float, io: float, *, s: int, workspace: float, where: str) -> None:
    """Offer a moment ``live`` elements alive during a convolution reading+writing ``io``."""
    peak.offer((live + workspace * io) * s, where)


def _resnet(
    peak: _Peak,
    c_in: int,
    c_out: int,
    n: int,
    *,
    held: float,
    batch: int,
    s: int,
    workspace: float,
    where: str,
) -> None:
    """Offer the moments of a ResNet block (c_in -> c_out channels over n positions).

    Its input stays alive to the end (the residual); GroupNorm and SiLU each make a copy
    (3 x c_in at the first SiLU); each convolution reads one tensor and writes another,
    with its workspace beside them.
    """
    moments: list[tuple[int, int]] = [
        (3 * c_in, 0),  # input, norm1, SiLU
        (2 * c_in + c_out, c_in + c_out),  # conv1
        (c_in + 3 * c_out, 0),  # input, conv1 out, norm2, SiLU
        (c_in + 2 * c_out, 2 * c_out),  # conv2
    ]
    if c_in != c_out:
        moments.append((c_in + 2 * c_out, c_in + c_out))  # the 1x1 shortcut conv
    for live, io in moments:
        _conv(
            peak, (held + live * n) * batch, io * n * batch, s=s, workspace=workspace, where=where
        )


def _unet_step(
    config: Mapping[str, Any],
    *,
    h: int,
    w: int,
    batch: int,
    text: int,
    s: int,
    attention: _Attention,
    workspace: float,
) -> _Peak:
    """Return the peak working memory of one UNet2DConditionModel forward.

    Walks the UNet's blocks in order, keeping the skip connections alive until the up block
    that consumes them has finished (the UNet's forward holds them), and offers each block's
    busiest moment: a ResNet block holds its input, its GroupNorm output and that output's
    SiLU (3 x its input channels); a transformer layer's feed-forward holds GEGLU's projection
    (2 x inner), its GELU and product (inner each) and five hidden-sized tensors (block input,
    norm, residuals); its attention holds nine hidden-sized tensors plus the score blocks.
    """
    channels = [int(c) for c in config.get("block_out_channels", (320, 640, 1280, 1280))]
    levels = len(channels)
    down_types = list(config.get("down_block_types", ()))
    up_types = list(config.get("up_block_types", ()))
    layers = _per_block(config.get("layers_per_block", 2), levels, 2)
    depth = _per_block(config.get("transformer_layers_per_block", 1), levels, 1)
    heads_value = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    heads = _per_block(heads_value, levels, 8)
    peak = _Peak()
    positions = [(h // 2**i) * (w // 2**i) for i in range(levels)]

    def attend(c: int, n: int, level: int, held: float, where: str) -> None:
        # held: elements alive outside the block (skips, the caller's input), per batch item
        inner = 4 * c
        peak.offer((held + 4 * inner * n + 5 * c * n) * batch * s, f"{where} feed-forward")
        head_dim = max(1, c // heads[level])
        scores = max(
            attention.scores(batch * heads[level], n, n, head_dim, sliceable=True),
            attention.scores(batch * heads[level], n, text, head_dim, sliceable=True),
        )
        peak.offer((held + 9 * c * n) * batch * s + scores, f"{where} attention")

    def resnet(c_in: int, c_out: int, n: int, held: float, where: str) -> None:
        _resnet(
            peak,
            c_in,
            c_out,
            n,
            held=held,
            batch=batch,
            s=s,
            workspace=workspace,
            where=f"{where} resnet",
        )

    skips: list[float] = [channels[0] * positions[0]]  # conv_in
    c_prev = channels[0]
    for i, c in enumerate(channels):
        attn = i < len(down_types) and "CrossAttn" in down_types[i]
        n = positions[i]
        for _ in range(layers[i]):
            resnet(c_prev, c, n, sum(skips), f"down block {i}")
            c_prev = c
            for _ in range(depth[i] if attn else 0):
                attend(c, n, i, sum(skips), f"down block {i}")
            skips.append(c * n)
        if i < levels - 1:
            skips.append(c * positions[i + 1])
    last, n = channels[-1], positions[-1]
    mid_type = str(config.get("mid_block_type") or "UNetMidBlock2DCrossAttn")
    resnet(last, last, n, sum(skips), "mid block")
    if "CrossAttn" in mid_type:
        attend(last, n, levels - 1, sum(skips), "mid block")
    resnet(last, last, n, sum(skips), "mid block")
    c_prev = last
    for k, c in enumerate(reversed(channels)):
        level = levels - 1 - k
        attn = k < len(up_types) and "CrossAttn" in up_types[k]
        n = positions[level]
        count = layers[level] + 1
        block_skips = skips[-count:]
        skips = skips[:-count]
        held_outside = sum(skips) + sum(block_skips) + c_prev * n  # the caller holds both
        for j in range(count):
            skip_c = int(block_skips[-1 - j] / n) if n else 0
            resnet(c_prev + skip_c, c, n, held_outside, f"up block {k}")
            c_prev = c
            for _ in range(depth[level] if attn else 0):
                attend(c, n, level, held_outside, f"up block {k}")
        if level > 0:
            big = positions[level - 1]
            live = sum(skips) + c * n + 2 * c * big
            _conv(
                peak,
                live * batch,
                2 * c * big * batch,
                s=s,
                workspace=workspace,
                where=f"up block {k} upsample",
            )
    return peak


def _kl_decode(
    config: Mapping[str, Any],
    *,
    h: int,
    w: int,
    batch: int,
    s: int,
    attention: _Attention,
    workspace: float,
) -> _Peak:
    """Return the peak working memory of AutoencoderKL's decoder on ``batch`` latents.

    Walks the decoder: conv_in, the mid block (ResNet, one-head attention over every latent
    position, ResNet), then each up block's ResNets (3 x input channels alive, as in the UNet)
    and its 2x nearest upsample (the input, the upsampled copy and the conv's output).
    """
    channels = [int(c) for c in config.get("block_out_channels", (128, 256, 512, 512))]
    layers = _int(config, "layers_per_block", default=2)
    latent = _int(config, "latent_channels", default=4)
    peak = _Peak()
    n = h * w
    top = channels[-1]
    _conv(
        peak,
        (latent + top) * n * batch,
        (latent + top) * n * batch,
        s=s,
        workspace=workspace,
        where="conv_in",
    )
    _resnet(
        peak, top, top, n, held=0, batch=batch, s=s, workspace=workspace, where="mid block resnet"
    )
    scores = attention.scores(batch, n, n, top)
    peak.offer(6 * top * n * batch * s + scores, "mid block attention")
    c_prev = top
    for k, c in enumerate(reversed(channels)):
        for _ in range(layers + 1):
            _resnet(
                peak,
                c_prev,
                c,
                n,
                held=0,
                batch=batch,
                s=s,
                workspace=workspace,
                where=f"up block {k}",
            )
            c_prev = c
        if k < len(channels) - 1:
            live = c * n + 2 * c * 4 * n
            _conv(
                peak,
                live * batch,
                2 * c * 4 * n * batch,
                s=s,
                workspace=workspace,
                where=f"up block {k} upsample",
            )
            n *= 4
    live = 3 * c_prev * n + 3 * n
    _conv(peak, live * batch, (c_prev + 3) * n * batch, s=s, workspace=workspace, where="conv_out")
    return peak


def _kl_decode_call(
    config: Mapping[str, Any],
    *,
    h: int,
    w: int,
    batch: int,
    s: int,
    settings: Settings,
    attention: _Attention,
    workspace: float,
    scale: int,
) -> _Peak:
    """Return the decode's peak with the VAE's slicing and tiling as ``settings`` set them."""
    out_px = h * w * scale * scale
    sample = config.get("sample_size", 512)
    tile_px = int(sample[0] if isinstance(sample, (list, tuple)) else sample or 512)
    tile_latent = tile_px // scale
    images = 1 if settings.vae_slicing and batch > 1 else batch
    # Sliced: the images decoded before the last one are kept, then concatenated.
    before = (batch - images) * 3 * out_px * s
    assembled = 2 * batch * 3 * out_px * s if images < batch else 0
    tiled = settings.vae_tiling and (h > tile_latent or w > tile_latent)
    if not tiled:
        peak = _kl_decode(
            config, h=h, w=w, batch=images, s=s, attention=attention, workspace=workspace
        )
    else:
        stride = int(tile_latent * 0.75)
        tiles = [
            (min(tile_latent, h - i), min(tile_latent, w - j))
            for i in range(0, h, stride)
            for j in range(0, w, stride)
        ]
        big = max(tiles, key=lambda t: t[0] * t[1])
        peak = _kl_decode(
            config, h=big[0], w=big[1], batch=images, s=s, attention=attention, workspace=workspace
        )
        # every decoded tile is kept until the blend, then rows and the image are concatenated
        stored = 3 * sum(a * b for a, b in tiles) * scale * scale * images * s
        peak = _Peak(peak.bytes + stored, f"tile {big[0] * scale}x{big[1] * scale}, {peak.where}")
        peak.offer(stored + 2 * 3 * out_px * images * s, "assembling the tiles")
    peak = _Peak(peak.bytes + before, peak.where)
    peak.offer(assembled, "concatenating the decoded images")
    return peak


def _wan_decode(
    config: Mapping[str, Any],
    *,
    h: int,
    w: int,
    frames: int,
    batch: int,
    s: int,
    workspace: float,
) -> _Peak:
    """Return the peak working memory of AutoencoderKLWan's decode of ``frames`` latent frames.

    Wan's decoder runs one latent frame at a time through causal 3-D convolutions that keep
    the last two frames of each one's input (the cache, alive for the whole decode). The
    busiest moment is an RMS norm at the last stage: its input, a float32 copy and the
    normalised float32 result over the frames one latent frame decodes into, beside the
    cache of every convolution; the decoded frames are concatenated as they come.
    """
    base = _int(config, "decoder_base_dim", "base_dim", default=96)
    mult = [int(m) for m in config.get("dim_mult", (1, 2, 4, 4))]
    res = _int(config, "num_res_blocks", default=2)
    temporal = [bool(t) for t in config.get("temperal_downsample", (False, True, True))][::-1]
    z = _int(config, "z_dim", default=16)
    dims = [base * m for m in [mult[-1], *mult[::-1]]]
    cache = 2  # frames each causal convolution keeps
    n = h * w
    cached = z * cache * n + 2 * 2 * dims[0] * cache * n  # conv_in, the mid block's ResNet
    stages = []
    t = 1
    for i, (c_prev, c_out) in enumerate(itertools.pairwise(dims)):
        c_in = c_prev // 2 if i > 0 else c_prev  # Wan 2.1's upsample halves the channels
        for j in range(res + 1):
            cached += ((c_in if j == 0 else c_out) + c_out) * cache * n
        stages.append((c_out, t, n))
        if i < len(mult) - 1:
            if i < len(temporal) and temporal[i]:
                cached += c_out * cache * n  # the temporal upsample's causal conv
                t *= 2
            n *= 4
    c_last = dims[-1]
    cached += c_last * cache * n  # conv_out
    peak = _Peak()
    for c, t_stage, n_stage in stages:
        live = c * t_stage * n_stage
        value = cached * batch * s + live * batch * (3 * s + 2 * 4)
        peak.offer(value + workspace * 2 * live * batch * s, "frame chunk")
    out = 3 * (1 + (frames - 1) * t) * n
    peak.offer(peak.bytes + 2 * out * batch * s, peak.where + ", with the decoded frames")
    return peak


def _transformer_step(
    family: str,
    config: Mapping[str, Any],
    *,
    h: int,
    w: int,
    frames: int,
    batch: int,
    text: int,
    s: int,
    attention: _Attention,
) -> tuple[_Peak, int]:
    """Return the peak of one transformer denoiser forward and its image token count.

    One block's busiest moment, with T image tokens, hidden size D and feed-forward width F:

    - DiT blocks with cross-attention (PixArt, Wan, DiT): the feed-forward's projection and
      its GELU (2 x F) and four D-sized tensors (input, norm, residual, modulation) per token;
    - SD3's joint blocks: the same per image token, plus the joint (image + text) query
      tensor copied to one contiguous block;
    - Flux's single blocks: the MLP's GELU (F) and seven D-sized tensors in the compute dtype,
      and three float32 D-sized tensors of its rotary embedding, over image + text tokens.

    The attention adds its score blocks over all tokens (self) and against the text (cross).
    """
    heads = _int(config, "num_attention_heads", default=16)
    head_dim = _int(config, "attention_head_dim", default=64)
    hidden = heads * head_dim
    patch = config.get("patch_size", 2)
    if isinstance(patch, (list, tuple)):
        pt, ph, pw = (int(p) for p in ([1, *patch] if len(patch) == 2 else patch[-3:]))
    else:
        pt, ph, pw = 1, int(patch or 1), int(patch or 1)
    if family == "flux":
        ph = pw = 2  # the pipeline packs 2x2 latent patches into tokens
    tokens = max(1, frames // pt) * (h // ph) * (w // pw)
    ff = _int(config, "ffn_dim", default=0) or int(
        hidden * float(config.get("mlp_ratio", 4.0) or 4.0)
    )
    peak = _Peak()
    if family == "flux":
        total = tokens + text
        per_token = (ff + 7 * hidden) * s + 3 * hidden * 4
        peak.offer(total * per_token * batch, "single block")
        scores = attention.scores(batch * heads, total, total, head_dim)
        peak.offer(total * 9 * hidden * s * batch + scores, "attention")
        return peak, tokens
    if family == "sd3":
        total = tokens + text
        peak.offer((tokens * (2 * ff + 4 * hidden) + total * hidden) * batch * s, "joint block")
        scores = attention.scores(batch * heads, total, total, head_dim)
        peak.offer(total * 9 * hidden * s * batch + scores, "joint attention")
        return peak, tokens
    peak.offer(tokens * (2 * ff + 4 * hidden) * batch * s, "block feed-forward")
    scores = max(
        attention.scores(batch * heads, tokens, tokens, head_dim),
        attention.scores(batch * heads, tokens, text, head_dim),
    )
    peak.offer(tokens * 9 * hidden * s * batch + scores, "block attention")
    return peak, tokens


#: Transformer denoisers whose blocks the DiT count was checked against.
_KNOWN_DIT = ("PixArt", "Wan", "DiT", "Transformer2DModel")


def _family(class_name: str, config: Mapping[str, Any]) -> str:
    if class_name.startswith("UNet2DCondition"):
        return "unet"
    if "Flux" in class_name:
        return "flux"
    if class_name.startswith("SD3"):
        return "sd3"
    if "num_attention_heads" in config and "attention_head_dim" in config:
        return "dit"
    return "unknown"


def _text_step(
    spec: ComponentSpec, *, batch: int, length: int, s: int, attention: _Attention
) -> _Peak:
    """Return the peak of one text encoder forward on ``batch`` prompts.

    CLIP: the MLP's two F-wide tensors, six D-wide ones and every layer's hidden states
    (the pipelines ask for them), plus SDPA's scores. T5: the gated feed-forward's five
    F-wide tensors and four D-wide ones, the relative position bias kept for every layer,
    and SDPA's scores where they materialise.
    """
    config = spec.config
    hidden = _int(config, "hidden_size", "d_model", default=768)
    ff = _int(config, "intermediate_size", "d_ff", default=4 * hidden)
    layers = _int(config, "num_hidden_layers", "num_layers", default=12)
    heads = _int(config, "num_attention_heads", "num_heads", default=12)
    peak = _Peak()
    tokens = batch * length
    if "T5" in spec.class_name:
        # the relative position bias (heads x L x L) is computed once and kept for all layers
        bias = heads * length * length * s
        peak.offer(tokens * (5 * ff + 4 * hidden) * s + bias, "feed-forward")
        head_dim = _int(config, "d_kv", default=max(1, hidden // heads))
        # T5 adds its position bias as a float mask: measured on CUDA, SDPA then takes the
        # math path (the scores materialise), so it is counted so everywhere
        math_path = dataclasses.replace(attention, forced=False)
        scores = attention.scores(batch * heads, length, length, head_dim) or math_path.scores(
            batch * heads, length, length, head_dim
        )
        peak.offer(tokens * 6 * hidden * s + bias + scores, "attention")
        return peak
    peak.offer(tokens * (2 * ff + (6 + layers + 1) * hidden) * s, "MLP")
    scores = attention.scores(batch * heads, length, length, max(1, hidden // heads))
    peak.offer(tokens * (6 + layers + 1) * hidden * s + scores, "attention")
    return peak


# ---------------------------------------------------------------------------------------
# The estimate


@dataclass(frozen=True)
class MemoryEstimate:
    """The predicted memory of one pipeline call: weights, working memory per phase, peak.

    All figures are bytes. ``peak`` is the largest of the phases' totals (the weights
    resident during the phase plus its working memory); ``str(estimate)`` is a table.

    .. versionadded:: 0.1
    """

    #: Image height and width in pixels, frames (None for images), images per call.
    height: int
    width: int
    frames: int | None
    batch_size: int
    #: The device and compute dtype the estimate is for.
    device: str
    dtype: str
    #: Bytes of each component's weights in the dtype it runs in.
    weights: Mapping[str, int]
    #: Working memory of the largest step of each phase (see :data:`PHASES`).
    working: Mapping[str, int]
    #: Weights resident during each phase.
    resident: Mapping[str, int]
    #: The busiest moment of each phase ("up block 3 feed-forward").
    where: Mapping[str, str]
    #: The largest phase total and the phase where it occurs.
    peak: int
    peak_phase: str
    #: Assumptions and caveats of this estimate, one sentence each.
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("weights", "working", "resident", "where"):
            object.__setattr__(self, name, types.MappingProxyType(dict(getattr(self, name))))

    @property
    def total_weights(self) -> int:
        """Return the bytes of every component's weights together."""
        return sum(self.weights.values())

    def phase_total(self, phase: str) -> int:
        """Return the resident weights plus the working memory of ``phase``."""
        return self.resident[phase] + self.working[phase]

    def fits(self, budget: int) -> bool:
        """Return True when the peak is within ``budget`` bytes."""
        return self.peak <= budget

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (bytes as integers)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = dict(value) if isinstance(value, Mapping) else value
        out["notes"] = list(self.notes)
        out["phase_totals"] = {phase: self.phase_total(phase) for phase in PHASES}
        return out

    def __str__(self) -> str:
        size = f"{self.width}x{self.height}" + (f", {self.frames} frames" if self.frames else "")
        lines = [f"Memory: {size}, batch {self.batch_size}, {self.device}, {self.dtype}"]
        width = max([len(n) for n in self.weights] + [len(p) for p in PHASES] + [7])
        lines.append("  weights")
        for name, value in self.weights.items():
            lines.append(f"    {name:<{width}}  {format_bytes(value):>10}")
        lines.append(f"    {'total':<{width}}  {format_bytes(self.total_weights):>10}")
        lines.append("  working memory (largest step)      resident weights + working = total")
        for phase in PHASES:
            mark = "  <- peak" if phase == self.peak_phase else ""
            lines.append(
                f"    {phase:<{width}}  {format_bytes(self.working[phase]):>10}"
                f"  ({self.where[phase] or '-'}): {format_bytes(self.resident[phase])} + "
                f"{format_bytes(self.working[phase])} = "
                f"{format_bytes(self.phase_total(phase))}{mark}"
            )
        lines.append(f"  peak: {format_bytes(self.peak)} ({self.peak_phase})")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def format_bytes(n: float) -> str:
    """Return ``n`` bytes as the estimate prints them (:func:`mps_helpers._util.format_bytes`,
    one decimal)."""
    return _format_bytes(n, digits=1)


def _itemsize(dtype: str | None) -> int:
    return _ITEMSIZE.get(dtype or "float32", 4)


def estimate(
    spec: ModelSpec,
    settings: Settings,
    *,
    height: int,
    width: int,
    frames: int | None = None,
    batch_size: int = 1,
) -> MemoryEstimate:
    """Return the :class:`MemoryEstimate` of one call of ``spec`` run as ``settings`` say.

    The pure core of :func:`estimate_memory`: no torch, no device, no files.
    """
    notes: list[str] = []
    device = settings.device
    dtype = settings.dtype or _stored_dtype(spec) or "float32"
    vae_dtype = settings.vae_dtype or dtype
    s = _itemsize(dtype)
    workspace = CONV_WORKSPACE.get(device, 0.0)
    chunk = None
    diffusers_sliced = False
    if settings.attention_slicing:
        if settings.attention_processor == "safe":
            chunk = settings.attention_chunk_elements or 2**26
        else:
            diffusers_sliced = True
    attention = _Attention(
        device, settings.torch_version, s, chunk, diffusers_sliced, settings.attention_kernel
    )
    # A looped batch runs one prompt at a time (mps_helpers._call).
    per_call = 1 if settings.batch_to_loop and batch_size > 1 else batch_size

    weights: dict[str, int] = {}
    for c in spec.components:
        weights[c.name] = c.weight_bytes(vae_dtype if c.role == "vae" else dtype)
    working: dict[str, int] = {}
    where: dict[str, str] = {}

    # text encoding: each encoder reads the prompts (and the negative ones, in a second call)
    text_peak = _Peak()
    for c in spec.by_role("text_encoder"):
        length = spec.text_lengths.get(c.name, 77)
        p = _text_step(c, batch=per_call, length=length, s=s, attention=attention)
        text_peak.offer(p.bytes, f"{c.name} {p.where}")
    working["text encoding"], where["text encoding"] = text_peak.bytes, text_peak.where

    # one denoiser step
    scale = spec.vae_scale_factor
    h, w = height // scale, width // scale
    latent_frames = 1
    if frames is not None and spec.temporal_scale_factor > 1:
        latent_frames = (frames - 1) // spec.temporal_scale_factor + 1
    denoiser = spec.component("denoiser")
    doubled = per_call * (2 if spec.guidance == "batch" else 1)
    lengths = [spec.text_lengths.get(c.name, 77) for c in spec.by_role("text_encoder")]
    step = _Peak()
    if denoiser is not None:
        family = _family(denoiser.class_name, denoiser.config)
        if family == "sd3":
            clip = [
                spec.text_lengths.get(c.name, 77)
                for c in spec.by_role("text_encoder")
                if "T5" not in c.class_name
            ]
            t5 = [
                spec.text_lengths.get(c.name, 77)
                for c in spec.by_role("text_encoder")
                if "T5" in c.class_name
            ]
            text = max(clip, default=0) + max(t5, default=0)
        else:
            text = max(lengths, default=77)
        if family == "unet":
            step = _unet_step(
                denoiser.config,
                h=h,
                w=w,
                batch=doubled,
                text=text,
                s=s,
                attention=attention,
                workspace=workspace,
            )
        elif family in ("flux", "sd3", "dit"):
            if family == "dit" and not denoiser.class_name.startswith(_KNOWN_DIT):
                notes.append(
                    f"{denoiser.class_name} is estimated as a DiT block with cross-attention "
                    "(feed-forward and four hidden-sized tensors per token)"
                )
            step, _ = _transformer_step(
                family,
                denoiser.config,
                h=h,
                w=w,
                frames=latent_frames,
                batch=doubled,
                text=text,
                s=s,
                attention=attention,
            )
        else:
            notes.append(
                f"the denoiser {denoiser.class_name} is of no family this estimate knows: its "
                "working memory is not counted"
            )
        channels = _int(denoiser.config, "in_channels", default=4)
        latents = 4 * channels * latent_frames * h * w * doubled * s
        step.offer(step.bytes + latents, step.where)
        if spec.guidance == "sequential":
            notes.append("guidance runs as two denoiser calls per step (the batch is not doubled)")
        elif spec.guidance == "none":
            notes.append("no classifier-free guidance batch (a guidance-distilled model)")
    working["denoiser step"], where["denoiser step"] = step.bytes, step.where

    # the VAE decode
    vae = spec.component("vae")
    decode = _Peak()
    vae_run_dtype = vae_dtype
    if vae is not None:
        force = bool(vae.config.get("force_upcast", vae.class_name == "AutoencoderKL"))
        if spec.upcasts_vae and force and vae_dtype == "float16":
            vae_run_dtype = "float32"
            notes.append(
                f"{spec.pipeline_class} upcasts its force_upcast VAE to float32 for the decode"
            )
        sv = _itemsize(vae_run_dtype)
        vae_attention = dataclasses.replace(
            attention, itemsize=sv, chunk=None, diffusers_sliced=False
        )
        if "temperal_downsample" in vae.config:  # Wan 2.1's causal 3-D VAE and its kin
            decode = _wan_decode(
                vae.config,
                h=h,
                w=w,
                frames=latent_frames,
                batch=1 if settings.vae_slicing else per_call,
                s=sv,
                workspace=workspace,
            )
            if settings.vae_tiling:
                notes.append("Wan's tiled decode is not modelled: estimated untiled")
        elif "block_out_channels" in vae.config:
            decode = _kl_decode_call(
                vae.config,
                h=h,
                w=w,
                batch=per_call,
                s=sv,
                settings=settings,
                attention=vae_attention,
                workspace=workspace,
                scale=scale,
            )
        else:
            notes.append(f"the VAE {vae.class_name} is of no family this estimate knows")
    working["VAE decode"], where["VAE decode"] = decode.bytes, decode.where

    # weights resident in each phase
    released = sum(weights[c.name] for c in spec.by_role("text_encoder"))
    released = released if settings.release_text_encoders else 0
    total = sum(weights.values())
    resident = {
        "text encoding": total,
        "denoiser step": total - released,
        "VAE decode": total - released,
    }
    if vae is not None and vae_run_dtype != vae_dtype:
        resident["VAE decode"] += vae.weight_bytes(vae_run_dtype) - weights[vae.name]
    if settings.release_text_encoders:
        notes.append("the text encoders are released after encoding")
    if settings.batch_to_loop and batch_size > 1:
        notes.append(f"the batch of {batch_size} runs as a loop of single prompts")
    for c in spec.components:
        if c.source == "file size":
            notes.append(f"{c.name}'s weights are counted from its .bin file's size")
    totals = {phase: resident[phase] + working[phase] for phase in PHASES}
    peak_phase = max(PHASES, key=totals.__getitem__)
    return MemoryEstimate(
        height=height,
        width=width,
        frames=frames,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        weights=weights,
        working=working,
        resident=resident,
        where=where,
        peak=totals[peak_phase],
        peak_phase=peak_phase,
        notes=tuple(dict.fromkeys(notes)),
    )


def _stored_dtype(spec: ModelSpec) -> str | None:
    denoiser = spec.component("denoiser")
    return None if denoiser is None else denoiser.dtype


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def estimate_memory(
    pipe_or_directory: Any,
    *,
    height: int,
    width: int,
    frames: int | None = None,
    batch_size: int = 1,
    plan: Any = None,
    env: Environment | None = None,
) -> MemoryEstimate:
    """Return the predicted memory of one call: weights, working memory per phase, peak.

    Nothing is loaded or run: a pipeline object is read (its modules' configs and weight
    counts), a saved directory's JSON files and safetensors headers are read, never a tensor.

    Example::

        est = mps_helpers.estimate_memory("path/to/sdxl", height=1024, width=1024)
        print(est)                      # table: weights, working memory per phase, peak
        est.peak, est.peak_phase        # (bytes, "VAE decode")

    Args:
        pipe_or_directory: a diffusers pipeline, or the directory of a saved one.
        height, width: the image size in pixels.
        frames: frames of a video pipeline (None for images).
        batch_size: images per call (prompts x images per prompt).
        plan: the :class:`~mps_helpers.Plan` the call runs with (device, dtypes, attention
            slicing and its bound, VAE slicing and tiling, looping). None: the weights' own
            dtype, plain SDPA, on the device :func:`~mps_helpers.plan_for` would pick.
        env: the machine (which SDPA kernels its torch has); None detects this one.

    Raises:
        ValueError: a size or the batch is not a positive integer.
        TypeError: ``pipe_or_directory`` is neither a pipeline nor a directory.
        FileNotFoundError: a directory without ``model_index.json``.

    .. versionadded:: 0.1
    """
    _positive("height", height)
    _positive("width", width)
    _positive("batch_size", batch_size)
    if frames is not None:
        _positive("frames", frames)
    spec = spec_of(pipe_or_directory)
    if env is None:
        from mps_helpers._environment import detect_environment

        env = detect_environment()
    if plan is not None:
        settings = settings_from_plan(plan, torch_version=env.torch_version)
    else:
        settings = Settings(device=auto_device(env), torch_version=env.torch_version)
    return estimate(
        spec, settings, height=height, width=width, frames=frames, batch_size=batch_size
    )
