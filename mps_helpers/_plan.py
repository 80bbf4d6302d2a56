"""The plan: pure decisions about how to run a pipeline on a machine, each with its reason.

:func:`plan_for` reads an :class:`~mps_helpers.Environment` snapshot, what the pipeline is
(its denoiser, its VAE config, its weights' dtype, its default size) and the user's options,
and returns a frozen :class:`Plan`. It does no device work and never changes the pipeline;
:mod:`mps_helpers._apply` carries a plan out.

Every automatic rule below cites its evidence (``/work/shared/EVIDENCE.md`` in the
project, summarised in ``docs/explanation/decisions.md``); the reason strings carry the
figures that decided each case, so ``str(plan)`` explains itself.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from packaging.version import Version

from mps_helpers._families import FAMILY_DECISIONS

if TYPE_CHECKING:
    import torch

    from mps_helpers._environment import Environment

__all__ = [
    "DECISIONS",
    "DEVICES",
    "PROCESSORS",
    "PipelineFacts",
    "Plan",
    "attention_chunk_elements",
    "facts_of",
    "plan_for",
]

logger = logging.getLogger(__name__)

GiB = 2**30

#: The devices a plan can choose.
DEVICES: tuple[str, ...] = ("mps", "cuda", "cpu")
#: The attention processors a plan can install when it slices attention.
PROCESSORS: tuple[str, ...] = ("safe", "diffusers")
#: The plan's decision fields, in display order; ``Plan.reasons`` has one entry for each.
DECISIONS: tuple[str, ...] = (
    "device",
    "dtype",
    "vae_dtype",
    "memory_tight",
    "attention_slicing",
    "attention_processor",
    "attention_chunk_elements",
    "vae_slicing",
    "vae_tiling",
    "warmup",
    "batch_to_loop",
    "nan_guard",
    "oom_retry",
    "memory_watch",
    *FAMILY_DECISIONS,
)
_SWITCHES: tuple[str, ...] = (
    "attention_slicing",
    "vae_slicing",
    "vae_tiling",
    "warmup",
    "batch_to_loop",
    "nan_guard",
    "oom_retry",
    "memory_watch",
)

# --- thresholds, each traceable to EVIDENCE.md -------------------------------------------

#: The source rule (diffusers "optimization/mps"): slice attention below 64 GB of RAM.
SLICING_RAM_THRESHOLD = 64 * GiB
#: ... or for images larger than 512x512 (compared by pixel count).
SLICING_PIXELS_THRESHOLD = 512 * 512
#: Tile the VAE decode for images whose longer side exceeds this, on a memory-tight machine.
TILING_SIDE_THRESHOLD = 1024
#: VAE decode working memory per output pixel in float32: SD-1.5 VAE on CPU, 768 px, batch 1,
#: 2,193 MB over the weights (the larger of the two measured figures per pixel).
DECODE_BYTES_PER_PIXEL_FP32 = 3_800
#: Memory is "tight" off mps when the batch's decode needs more than this share of it.
TIGHT_DECODE_SHARE = 0.25
#: Share of the available memory one attention call's score blocks may use.
ATTENTION_BUDGET_SHARE = 0.25
#: Blocks alive at once per attention chunk: the scores, their softmax, one temporary.
ATTENTION_LIVE_BLOCKS = 3
#: Upper bound on one score block: 2**28 elements, 8x below the 2**31-element mps limit
#: (pytorch #84039, #179352, #197636); SD 1.5 at 512 px with guidance is exactly 2**28.
ATTENTION_CHUNK_CAP = 2**28
#: Lower bound, so that a starved machine still makes blocks of whole key rows (a 4096 px
#: image has 2**18 latent positions).
ATTENTION_CHUNK_FLOOR = 2**20
#: Memory assumed available when the snapshot does not know it (an 8 GB Mac has ~3 GiB).
UNKNOWN_AVAILABLE_MEMORY = 2 * GiB
#: What bfloat16 costs on a CPU without native bfloat16 instructions, measured with them
#: hidden from torch and oneDNN (docs/explanation/decisions.md#dtype).
CPU_BF16_EMULATED = (
    "SD's matmul and 320-channel conv took 2.6x float32's time in bfloat16 with AVX-512, "
    "100-330x with AVX2"
)

#: bfloat16 on mps needs torch 2.3 and macOS 14 (EVIDENCE: "PyTorch mps facts by version").
MPS_BF16_TORCH = Version("2.3")
MPS_BF16_MACOS = Version("14")

_DTYPE_ALIASES: dict[str, str] = {
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
}
_DTYPE_CHOICES = "'auto', torch.float16, torch.bfloat16, torch.float32 or their names " + ", ".join(
    repr(k) for k in _DTYPE_ALIASES
)


# ---------------------------------------------------------------------------------------
# What the plan knows about a pipeline


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
    # Family facts (mps_helpers._families reads them; docs/explanation/dtype-per-family.md).
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


def facts_of(pipe: Any) -> PipelineFacts:
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
    from mps_helpers._families import call_default_size, family_facts

    if height is None or width is None:  # video pipelines: the __call__'s defaults
        height, width = call_default_size(unprepared_class(type(pipe)))

    return PipelineFacts(
        class_name=unprepared_class(type(pipe)).__name__,
        denoiser_class=None if denoiser is None else type(denoiser).__name__,
        supports_attention_slicing=None
        if denoiser is None
        else hasattr(denoiser, "set_attention_slice"),
        vae_force_upcast=force_upcast,
        upcasts_vae_itself=upcasts_vae_itself(unprepared_class(type(pipe))),
        weights_dtype=weights_dtype,
        default_height=height,
        default_width=width,
        **family_facts(pipe),
    )


def unprepared_class(cls: type) -> type:
    """Return the original of a prepared pipeline class (``cls`` itself otherwise)."""
    # The prepared subclass records its original (see mps_helpers._apply); looked up in the
    # class's own namespace so that a user's subclass of a prepared class is not confused.
    original = cls.__dict__.get("_mps_helpers_original")
    return original if isinstance(original, type) else cls


def check_pipeline(pipe: Any) -> None:
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


def denoiser_of(pipe: Any) -> Any:
    """Return the pipeline's denoiser (its ``unet`` or ``transformer``), or None."""
    components: Mapping[str, Any] = pipe.components
    for name in _DENOISER_NAMES:
        module = components.get(name)
        if module is not None and hasattr(module, "parameters"):
            return module
    return None


def _default_size(pipe: Any, denoiser: Any, vae: Any) -> tuple[int | None, int | None]:
    sample = getattr(pipe, "default_sample_size", None)
    if sample is None and denoiser is not None:
        sample = getattr(getattr(denoiser, "config", None), "sample_size", None)
    scale = getattr(pipe, "vae_scale_factor", None)
    if scale is None and vae is not None:
        blocks = getattr(getattr(vae, "config", None), "block_out_channels", None)
        scale = 2 ** (len(blocks) - 1) if blocks else None
    return size_from(sample, scale)


def size_from(sample: Any, scale: Any) -> tuple[int | None, int | None]:
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
            source = inspect.getsource(inspect.getmodule(klass))  # type: ignore[arg-type]
        except (OSError, TypeError):
            return hasattr(pipeline_class, "upcast_vae")
        if "config.force_upcast" in source:
            return True
    return False


# ---------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class Plan:
    """How to run one pipeline on one machine: every decision, with its reason.

    Make one with :func:`plan_for`; apply it with :func:`mps_helpers.prepare_pipeline`.
    ``str(plan)`` is a readable table, ``plan.to_dict()`` a JSON-ready dict.
    """

    #: "mps", "cuda" or "cpu".
    device: str
    #: The compute dtype of the pipeline's models.
    dtype: torch.dtype
    #: The VAE's dtype: float32 where its config says ``force_upcast`` and ``dtype`` is fp16.
    vae_dtype: torch.dtype
    #: Slice attention (bound the memory of each attention call).
    attention_slicing: bool
    #: "safe" (mps_helpers' chunked SDPA processor) or "diffusers" (its own slicing).
    attention_processor: str
    #: Bound on the elements of one attention score block (safe processor); None when unused.
    attention_chunk_elements: int | None
    #: Decode the VAE one image at a time.
    vae_slicing: bool
    #: Decode the VAE in tiles.
    vae_tiling: bool
    #: Run a one-step warmup pass before the first real call.
    warmup: bool
    #: Run a batch of prompts as a loop of single-prompt calls.
    batch_to_loop: bool
    #: Check outputs for NaN/inf and repair them.
    nan_guard: bool
    #: Retry an out-of-memory call with a stricter plan.
    oom_retry: bool
    #: Warn when swap grows during a call.
    memory_watch: bool
    #: Image height the plan was made for (None: unknown).
    height: int | None
    #: Image width the plan was made for (None: unknown).
    width: int | None
    #: The machine is short of memory for this work (drives the VAE decisions).
    memory_tight: bool
    #: The options as the user gave them (read-only); :func:`plan_for` ``(**options)`` re-plans.
    options: Mapping[str, object] = field(default_factory=dict, hash=False)
    #: One sentence per decision field (see :data:`DECISIONS`), naming the rule and evidence.
    reasons: Mapping[str, str] = field(default_factory=dict, hash=False)
    #: False when the denoiser cannot slice attention (transformer-based): a stricter plan
    #: then leaves ``attention_slicing`` off.
    attention_slicing_supported: bool = True
    #: The pipeline's family ("transformer-video", ...; mps_helpers._families), or None.
    family: str | None = None
    #: Bound on the score elements of every attention call during a prepared call (SDPA
    #: chunked past it; mps only); None: unbounded.
    attention_bound: int | None = None
    #: Attention calls with at least this many keys run in float32; None: never.
    attention_upcast_from: int | None = None
    #: float64 asked for on the device during a call becomes float32 (mps).
    float64_rescue: bool = False
    #: Video frames the plan was made for (the pipeline's default; None: not video).
    num_frames: int | None = None

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"Plan.device must be one of {DEVICES}, got {self.device!r}")
        if self.attention_processor not in PROCESSORS:
            raise ValueError(
                f"Plan.attention_processor must be one of {PROCESSORS}, "
                f"got {self.attention_processor!r}"
            )
        missing = [name for name in DECISIONS if name not in self.reasons]
        if missing:
            raise ValueError(f"Plan.reasons lacks a reason for {', '.join(missing)}")
        # Read-only views: a plan is shared (plan_of) and must not change under its users.
        object.__setattr__(self, "options", types.MappingProxyType(dict(self.options)))
        object.__setattr__(self, "reasons", types.MappingProxyType(dict(self.reasons)))

    def __reduce__(self) -> tuple[Any, ...]:
        # The read-only mapping views do not pickle: rebuild from plain dicts.
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["options"] = dict(self.options)
        fields["reasons"] = dict(self.reasons)
        return (_plan_from_fields, (fields,))

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict: dtypes by short name ("float16"), mappings as dicts."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Mapping):
                value = {k: _jsonable(v) for k, v in value.items()}
            out[f.name] = _jsonable(value)
        return out

    def replace(self, **changes: Any) -> Plan:
        """Return a copy with some decisions changed (a stricter plan for an OOM retry).

        Pass ``reasons={"field": "why"}`` to explain the changes; a changed decision without
        one gets a generic reason naming its old value. Turning attention slicing on with the
        safe processor and no ``attention_chunk_elements`` uses the processor's default bound.
        """
        given = dict(changes.pop("reasons", {}) or {})
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"Plan has no field {', '.join(unknown)}")
        new = dict(changes)
        slicing = new.get("attention_slicing", self.attention_slicing)
        if slicing and not self.attention_slicing_supported:
            raise ValueError(
                "attention_slicing=True: this plan's denoiser cannot slice attention "
                f"({self.reasons['attention_slicing']})"
            )
        processor = new.get("attention_processor", self.attention_processor)
        if "attention_chunk_elements" not in new:
            if not slicing or processor != "safe":
                new["attention_chunk_elements"] = None
            elif self.attention_chunk_elements is None:
                new["attention_chunk_elements"] = 2**26
        reasons = dict(self.reasons)
        for name, value in new.items():
            if name in DECISIONS and value != getattr(self, name) and name not in given:
                reasons[name] = (
                    f"changed from {_show(getattr(self, name))} to {_show(value)} by "
                    "Plan.replace (a stricter plan)."
                )
        reasons.update(given)
        return dataclasses.replace(self, **new, reasons=reasons)

    def __str__(self) -> str:
        size = "unknown size"
        if self.height is not None and self.width is not None:
            size = f"{self.width}x{self.height} px"
            if self.num_frames is not None:
                size += f" x {self.num_frames} frames"
            if self.options.get("height") is None and self.options.get("width") is None:
                size += " (the pipeline's default)"
        head = f"Plan: {self.device}, {_show(self.dtype)}, {size}"
        width = max(len(name) for name in DECISIONS)
        values = {name: _show(getattr(self, name)) for name in DECISIONS}
        vwidth = max(len(v) for v in values.values())
        lines = [head]
        for name in DECISIONS:
            lines.append(f"  {name:<{width}}  {values[name]:<{vwidth}}  {self.reasons[name]}")
        return "\n".join(lines)


def _plan_from_fields(fields: dict[str, Any]) -> Plan:
    """Return a Plan from its fields (used by pickle and copy)."""
    return Plan(**fields)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _is_dtype(value: Any) -> bool:
    return type(value).__name__ == "dtype" and type(value).__module__ == "torch"


def _jsonable(value: Any) -> Any:
    if _is_dtype(value):
        return _dtype_name(value)
    return value


def _show(value: Any) -> str:
    if _is_dtype(value):
        return _dtype_name(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


# ---------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True)
class _Options:
    """Validated options: "auto" or an explicit value for each decision."""

    height: int | None
    width: int | None
    batch_size: int | None
    device: str
    dtype: torch.dtype | None  # None = auto
    attention_processor: str
    switches: Mapping[str, bool | None]  # None = auto
    given: Mapping[str, object]


def validate_options(
    *,
    height: Any = None,
    width: Any = None,
    batch_size: Any = None,
    device: Any = "auto",
    dtype: Any = "auto",
    attention_slicing: Any = "auto",
    attention_processor: Any = "safe",
    vae_slicing: Any = "auto",
    vae_tiling: Any = "auto",
    warmup: Any = "auto",
    batch_to_loop: Any = "auto",
    nan_guard: Any = "auto",
    oom_retry: Any = "auto",
    memory_watch: Any = "auto",
) -> _Options:
    """Check every option and return them validated; raise ValueError listing valid values.

    Nothing is planned or changed here, so callers can validate before touching anything.
    """
    given: dict[str, object] = {
        "height": height,
        "width": width,
        "batch_size": batch_size,
        "device": device,
        "dtype": dtype,
        "attention_slicing": attention_slicing,
        "attention_processor": attention_processor,
        "vae_slicing": vae_slicing,
        "vae_tiling": vae_tiling,
        "warmup": warmup,
        "batch_to_loop": batch_to_loop,
        "nan_guard": nan_guard,
        "oom_retry": oom_retry,
        "memory_watch": memory_watch,
    }
    for name in ("height", "width", "batch_size"):
        value = given[name]
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"{name} must be None or a positive integer, got {value!r}")
    if not isinstance(device, str) or (device != "auto" and device not in DEVICES):
        valid = ", ".join(repr(d) for d in ("auto", *DEVICES))
        raise ValueError(f"device must be one of {valid}; got {device!r}")
    if not isinstance(attention_processor, str) or attention_processor not in PROCESSORS:
        valid = ", ".join(repr(p) for p in PROCESSORS)
        raise ValueError(f"attention_processor must be one of {valid}; got {attention_processor!r}")
    switches: dict[str, bool | None] = {}
    for name in _SWITCHES:
        value = given[name]
        if isinstance(value, str) and value == "auto":
            switches[name] = None
        elif value is True or value is False:
            switches[name] = value
        else:
            raise ValueError(f"{name} must be one of 'auto', True, False; got {value!r}")
    return _Options(
        height=height,
        width=width,
        batch_size=batch_size,
        device=device,
        dtype=_resolve_dtype(dtype),
        attention_processor=attention_processor,
        switches=switches,
        given=given,
    )


def _resolve_dtype(value: Any) -> torch.dtype | None:
    if isinstance(value, str):
        if value == "auto":
            return None
        name = _DTYPE_ALIASES.get(value.lower().removeprefix("torch."))
        if name is not None:
            import torch

            resolved: torch.dtype = getattr(torch, name)
            return resolved
    elif _is_dtype(value):
        name = _dtype_name(value)
        if name in ("float16", "bfloat16", "float32"):
            return value  # type: ignore[no-any-return]
    raise ValueError(f"dtype must be {_DTYPE_CHOICES}; got {value!r}")


# ---------------------------------------------------------------------------------------
# The rules


def plan_for(
    pipe: Any = None,
    *,
    env: Environment | None = None,
    height: int | None = None,
    width: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    dtype: Any = "auto",
    attention_slicing: bool | str = "auto",
    attention_processor: str = "safe",
    vae_slicing: bool | str = "auto",
    vae_tiling: bool | str = "auto",
    warmup: bool | str = "auto",
    batch_to_loop: bool | str = "auto",
    nan_guard: bool | str = "auto",
    oom_retry: bool | str = "auto",
    memory_watch: bool | str = "auto",
) -> Plan:
    """Return the :class:`Plan` for running ``pipe`` on a machine; pure, changes nothing.

    Each option is "auto" (the library decides, see ``docs/explanation/decisions.md``) or an
    explicit value that wins.

    Args:
        pipe: a diffusers pipeline whose components inform the plan (denoiser family, VAE
            ``force_upcast``, weights' dtype, default size), or None to plan from the machine.
        env: the machine; None detects this one (:func:`mps_helpers.detect_environment`).
        height, width: the image size; None uses the pipeline's default size.
        batch_size: images decoded per call (prompts x images per prompt); None if unknown.
        device: "auto", "mps", "cuda" or "cpu".
        dtype: "auto", a torch floating dtype (float16, bfloat16, float32) or its name.
        attention_processor: "safe" (mps_helpers' chunked SDPA, default) or "diffusers".
        attention_slicing: "auto", True or False; so are ``vae_slicing``, ``vae_tiling``,
            ``warmup``, ``batch_to_loop``, ``nan_guard``, ``oom_retry`` and ``memory_watch``.

    Raises:
        TypeError: ``pipe`` is not a diffusers pipeline, or ``env`` not an Environment.
        ValueError: an option is not one of its valid values (the message lists them).
        mps_helpers.DeviceUnavailableError: an explicit device that cannot be used here; its
            ``findings`` say why.
    """
    options = validate_options(
        height=height,
        width=width,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        attention_slicing=attention_slicing,
        attention_processor=attention_processor,
        vae_slicing=vae_slicing,
        vae_tiling=vae_tiling,
        warmup=warmup,
        batch_to_loop=batch_to_loop,
        nan_guard=nan_guard,
        oom_retry=oom_retry,
        memory_watch=memory_watch,
    )
    facts = PipelineFacts() if pipe is None else facts_of(pipe)
    return make_plan(facts, resolve_environment(env), options)


def resolve_environment(env: Environment | None) -> Environment:
    """Return ``env``, or this machine's snapshot when None; TypeError for anything else."""
    from mps_helpers._environment import Environment, detect_environment

    if env is None:
        return detect_environment()
    if not isinstance(env, Environment):
        raise TypeError(f"env must be an mps_helpers.Environment or None, got {type(env)!r}")
    return env


def make_plan(facts: PipelineFacts, env: Environment, options: _Options) -> Plan:
    """Return the plan for validated ``options`` (the rules; :func:`plan_for` wraps this)."""
    from mps_helpers import _families

    reasons: dict[str, str] = {}
    switches = options.switches

    device, reasons["device"] = _device(env, options.device)
    dtype, reasons["dtype"] = _dtype(env, device, facts, options.dtype)
    dtype, reasons["dtype"] = _families.family_dtype(
        env, device, facts, options.dtype, (dtype, reasons["dtype"])
    )
    guarded = switches["nan_guard"] if switches["nan_guard"] is not None else _half(dtype)
    vae_dtype, reasons["vae_dtype"] = _vae_dtype(dtype, facts, device=device, guarded=guarded)

    height = options.height if options.height is not None else facts.default_height
    width = options.width if options.width is not None else facts.default_width
    tight, reasons["memory_tight"] = _memory_tight(
        env, device, dtype=dtype, height=height, width=width, options=options
    )
    tight, reasons["memory_tight"] = _families.family_memory_tight(
        env,
        device,
        facts,
        dtype=dtype,
        height=height,
        width=width,
        batch=options.batch_size,
        decided=(tight, reasons["memory_tight"]),
    )

    slicing, reasons["attention_slicing"] = _attention_slicing(
        env,
        device,
        facts=facts,
        height=height,
        width=width,
        asked=switches["attention_slicing"],
    )
    processor = options.attention_processor
    reasons["attention_processor"] = _processor_reason(processor, slicing)
    chunk: int | None = None
    if not slicing:
        reasons["attention_chunk_elements"] = "None: attention slicing is off."
    elif processor != "safe":
        reasons["attention_chunk_elements"] = "None: diffusers' own slicing picks its slices."
    else:
        chunk = attention_chunk_elements(env, dtype, device=device)
        reasons["attention_chunk_elements"] = _chunk_reason(env, dtype, device, chunk)

    vae_slicing, reasons["vae_slicing"] = _vae_slicing(
        tight, options, switches["vae_slicing"], device=device
    )
    vae_tiling, reasons["vae_tiling"] = _vae_tiling(tight, height, width, switches["vae_tiling"])
    warmup, reasons["warmup"] = _warmup(env, device, switches["warmup"])
    loop, reasons["batch_to_loop"] = _batch_to_loop(device, switches["batch_to_loop"])
    nan_guard, reasons["nan_guard"] = _nan_guard(dtype, switches["nan_guard"])
    oom_retry, reasons["oom_retry"] = _oom_retry(device, switches["oom_retry"])
    watch, reasons["memory_watch"] = _memory_watch(device, switches["memory_watch"])
    family = _families.family_plan(
        facts,
        env,
        device=device,
        dtype=dtype,
        height=height,
        width=width,
        batch=options.batch_size,
        tight=tight,
        switches=switches,
    )
    reasons.update(family.reasons)
    vae_tiling = family.fields.get("vae_tiling", vae_tiling)
    loop = family.fields.get("batch_to_loop", loop)

    plan = Plan(
        device=device,
        dtype=dtype,
        vae_dtype=vae_dtype,
        attention_slicing=slicing,
        attention_processor=processor,
        attention_chunk_elements=chunk,
        vae_slicing=vae_slicing,
        vae_tiling=vae_tiling,
        warmup=warmup,
        batch_to_loop=loop,
        nan_guard=nan_guard,
        oom_retry=oom_retry,
        memory_watch=watch,
        height=height,
        width=width,
        memory_tight=tight,
        options=options.given,
        reasons=reasons,
        attention_slicing_supported=facts.supports_attention_slicing is not False,
        family=family.fields["family"],
        attention_bound=family.fields["attention_bound"],
        attention_upcast_from=family.fields["attention_upcast_from"],
        float64_rescue=family.fields["float64_rescue"],
        num_frames=facts.default_num_frames,
    )
    for name in DECISIONS:
        logger.info("plan: %s = %s: %s", name, _show(getattr(plan, name)), plan.reasons[name])
    return plan


def _asked(value: Any) -> str:
    return f"asked for ({_show(value)})."


def _gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / GiB:.0f} GiB"


def _size(n: int) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / 2**20:.0f} MiB"


def _release(version: Version | None) -> tuple[int, ...]:
    return () if version is None else version.release


# device ------------------------------------------------------------------------------


def _device(env: Environment, asked: str) -> tuple[str, str]:
    if asked == "mps":
        if not env.mps_available:
            _raise_unavailable(env, "mps")
        return "mps", _asked("mps")
    if asked == "cuda":
        if not env.cuda_available:
            _raise_unavailable(env, "cuda")
        return "cuda", _asked("cuda")
    if asked == "cpu":
        return "cpu", _asked("cpu")

    fallback = (
        ("cuda", f"CUDA is usable ({env.cuda_device_name or 'GPU 0'})")
        if env.cuda_available
        else ("cpu", "neither mps nor CUDA is usable, so the CPU")
    )
    if env.mps_available and not env.is_rosetta:
        return "mps", "mps is usable and Python runs natively (arm64): the source rule's device."
    if env.is_rosetta:
        return fallback[0], (
            f"Python runs translated by Rosetta (an {env.python_machine or 'x86_64'} Python on "
            f"an arm64 Mac), which cannot use mps; {fallback[1]} (install an arm64 Python "
            "to get mps)."
        )
    if env.is_apple_silicon:
        why = "torch was built without mps" if not env.mps_built else "mps is not usable now"
        return fallback[0], f"{why} (see `mps-helpers doctor`); {fallback[1]}."
    return fallback[0], f"not an Apple Silicon Mac; {fallback[1]}."


def _raise_unavailable(env: Environment, device: str) -> None:
    from mps_helpers._errors import DeviceUnavailableError

    findings: tuple[Any, ...] = ()
    try:
        from mps_helpers._checks import check_environment
    except ImportError:  # the readiness checks are optional for planning
        pass
    else:
        every = check_environment(env)
        findings = tuple(f for f in every if f.level == "error") or tuple(
            f for f in every if f.level in ("warning", "info")
        )
    why = "; ".join(f.message for f in findings) or f"torch reports {device} as unavailable"
    raise DeviceUnavailableError(
        f"device={device!r} was asked for but cannot be used on this machine: {why}",
        findings,
    )


# dtype -------------------------------------------------------------------------------


def _dtype(
    env: Environment, device: str, facts: PipelineFacts, asked: torch.dtype | None
) -> tuple[torch.dtype, str]:
    import torch

    bf16_weights = facts.weights_dtype == torch.bfloat16
    mps_bf16 = (
        _release(env.torch_version) >= MPS_BF16_TORCH.release
        and _release(env.macos_version) >= MPS_BF16_MACOS.release
    )
    if asked is not None:
        if device == "mps" and asked == torch.bfloat16 and not mps_bf16:
            raise ValueError(
                "dtype=bfloat16 cannot run on mps here: it needs torch 2.3+ and macOS 14+ "
                f"(this machine: torch {env.torch_version}, macOS {env.macos_version}); "
                "use dtype='float16'"
            )
        if device == "cpu" and asked == torch.float16:
            return asked, (
                "asked for (float16); note that float16 is emulated on the CPU (a float16 "
                "conv measured 1,300x slower than float32)."
            )
        if device == "cpu" and asked == torch.bfloat16 and not env.cpu_bf16_supported:
            return asked, (
                "asked for (bfloat16); note that this CPU has no native bfloat16 "
                f"instructions, so it is emulated ({CPU_BF16_EMULATED})."
            )
        return asked, _asked(asked)
    if device == "mps":
        if bf16_weights and mps_bf16:
            return torch.bfloat16, (
                f"the model's own weights are bfloat16 and torch {env.torch_version} on macOS "
                f"{env.macos_version} supports bfloat16 on mps (needs torch 2.3+, macOS 14+)."
            )
        if bf16_weights:
            return torch.float16, (
                "float16 on mps: the model's weights are bfloat16, but bfloat16 on mps needs "
                f"torch 2.3+ and macOS 14+ (here torch {env.torch_version}, macOS "
                f"{env.macos_version})."
            )
        return torch.float16, (
            "float16 on mps, as the source document loads it: half the memory of float32 "
            "(ComfyUI, InvokeAI and A1111 also run fp16 there)."
        )
    if device == "cuda":
        if bf16_weights and env.cuda_bf16_supported:
            return torch.bfloat16, (
                "the model's own weights are bfloat16 and this GPU computes bfloat16 natively."
            )
        return torch.float16, (
            "float16 on CUDA: 2.6x faster than float32 with half the peak memory "
            "(H100, SD 1.5, batch 4: 1.04 vs 2.65 s, 4.44 vs 8.80 GiB)."
        )
    if env.cpu_bf16_supported:
        return torch.bfloat16, (
            "bfloat16 on the CPU: this processor computes bfloat16 natively (AVX512-BF16 or "
            "AMX), and there SD 1.5 ran 1.76x faster than in float32 at 0.54x the peak "
            "memory (2-core AMD EPYC: 36.1 vs 63.7 s/image, 3.25 vs 5.95 GiB; "
            "docs/explanation/benchmarks.md)."
        )
    return torch.float32, (
        "float32 on the CPU: this processor has no native bfloat16 instructions, and "
        f"emulated half precision is slow ({CPU_BF16_EMULATED}; float16 convs 1,300x)."
    )


def _half(dtype: torch.dtype) -> bool:
    import torch

    return dtype != torch.float32


def _vae_dtype(
    dtype: torch.dtype, facts: PipelineFacts, *, device: str, guarded: bool
) -> tuple[torch.dtype, str]:
    import torch

    if dtype != torch.float16:
        return dtype, f"{_dtype_name(dtype)} like the rest: force_upcast guards fp16 only."
    if facts.vae_force_upcast is None:
        return dtype, "float16 like the rest: no VAE config to read (no pipeline given)."
    if not facts.vae_force_upcast:
        return dtype, "float16 like the rest: the VAE config does not ask for force_upcast."
    if facts.upcasts_vae_itself:
        return dtype, (
            f"float16: the VAE config says force_upcast and {facts.class_name} upcasts it to "
            "float32 for each decode itself (a float32 VAE would be cast down to float16 by "
            "that pipeline's mps branch)."
        )
    if device == "cuda" and guarded:
        return dtype, (
            "float16 on CUDA although the VAE config says force_upcast: the NaN guard decodes "
            "again in float32 if a decode overflows and keeps float32 from then on (A1111's "
            "approach), while a float32 VAE up front cost 55% more peak memory (H100, SD 1.5, "
            "batch 4: 6.15 vs 3.97 GiB; docs/explanation/benchmarks.md)."
        )
    return torch.float32, (
        "float32: the VAE config says force_upcast (fp16 VAE decodes overflow to NaN/black: "
        "A1111 #12923, InvokeAI #4083), so it stays float32 while the rest is float16."
    )


# memory ------------------------------------------------------------------------------


def _device_memory(env: Environment, device: str) -> int | None:
    # CUDA: the snapshot knows the card's total only; mps and CPU share system RAM.
    if device == "cuda":
        return env.cuda_total_memory
    return env.available_memory


def decode_bytes(height: int, width: int, batch: int, dtype: torch.dtype) -> int:
    """Return the estimated VAE decode working memory for ``batch`` images (bytes)."""
    import torch

    itemsize = torch.finfo(dtype).bits // 8
    return int(DECODE_BYTES_PER_PIXEL_FP32 * itemsize / 4 * height * width * batch)


def _memory_tight(
    env: Environment,
    device: str,
    *,
    dtype: torch.dtype,
    height: int | None,
    width: int | None,
    options: _Options,
) -> tuple[bool, str]:
    if device == "mps":
        if env.total_memory is None:
            return True, "mps with unknown RAM: assumed under the source rule's 64 GB."
        if env.total_memory < SLICING_RAM_THRESHOLD:
            return True, (
                f"mps with {_gib(env.total_memory)} of unified memory, under the source "
                "rule's 64 GB (memory pressure there means swapping)."
            )
    available = _device_memory(env, device)
    if height is None or width is None:
        if device == "mps":
            return False, f"mps with {_gib(env.total_memory)} (>= 64 GB); image size unknown."
        return False, "image size unknown, so no decode estimate: not tight."
    batch = options.batch_size or 1
    need = decode_bytes(height, width, batch, dtype)
    where = "GPU memory" if device == "cuda" else "available memory"
    if available is None:
        return device == "mps", f"{where} unknown; the decode needs ~{_size(need)}."
    share = need / available
    verdict = share > TIGHT_DECODE_SHARE
    return verdict, (
        f"decoding {batch} image(s) of {width}x{height} needs ~{_size(need)}, "
        f"{share:.0%} of {_gib(available)} {where} "
        f"({'over' if verdict else 'within'} the {TIGHT_DECODE_SHARE:.0%} share; "
        "VAE decode measured at ~3.8 KB per pixel in float32)."
    )


def attention_chunk_elements(
    env: Environment,
    dtype: torch.dtype,
    *,
    device: str = "mps",
    share: float = ATTENTION_BUDGET_SHARE,
) -> int:
    """Return the bound on one attention score block's elements for a machine and dtype.

    The safe sliced processor splits (batch x heads, query rows) so that no score block has
    more than this many elements. The bound is::

        floor_pow2(min(2**28, share * available_bytes // (itemsize * 3)))

    clamped below at 2**20: ``share`` (a quarter) of the memory the device can use goes to
    one attention call's blocks, of which three are alive at once (scores, softmax, one
    temporary). The cap of 2**28 keeps every block 8x below the 2**31 elements past which mps
    kernels fail loudly or silently (pytorch #84039, #179352, #149261, #197636). Powers of
    two keep plans stable while available memory drifts a little.

    Args:
        env: the machine; ``available_memory`` (mps, CPU) or ``cuda_total_memory`` (CUDA)
            is the memory seen; unknown memory counts as 2 GiB.
        dtype: the compute dtype (its size per element).
        device: the device the attention runs on.
        share: the fraction of that memory one attention call may use.
    """
    import torch

    itemsize = torch.finfo(dtype).bits // 8
    available = _device_memory(env, device)
    if available is None:
        available = UNKNOWN_AVAILABLE_MEMORY
    elements = int(available * share) // (itemsize * ATTENTION_LIVE_BLOCKS)
    elements = max(ATTENTION_CHUNK_FLOOR, min(ATTENTION_CHUNK_CAP, elements))
    return 1 << (elements.bit_length() - 1)


def _chunk_reason(env: Environment, dtype: torch.dtype, device: str, chunk: int) -> str:
    available = _device_memory(env, device)
    where = "GPU memory" if device == "cuda" else "available memory"
    seen = (
        f"{where} (unknown: 2 GiB assumed)" if available is None else f"{_gib(available)} {where}"
    )
    return (
        f"2**{chunk.bit_length() - 1} elements per score block: a quarter of {seen} "
        f"over 3 live {_dtype_name(dtype)} blocks, capped at 2**28 to stay 8x under mps's "
        "2**31-element limit (pytorch #84039, #179352)."
    )


# attention ---------------------------------------------------------------------------


def _attention_slicing(
    env: Environment,
    device: str,
    *,
    facts: PipelineFacts,
    height: int | None,
    width: int | None,
    asked: bool | None,
) -> tuple[bool, str]:
    if facts.supports_attention_slicing is False:
        why = (
            f"the {facts.denoiser_class} denoiser has no attention slicing in diffusers "
            "(enable_attention_slicing() silently does nothing on transformer-based pipelines)"
        )
        if asked:
            import warnings

            warnings.warn(
                f"attention_slicing=True ignored: {why}.",
                UserWarning,
                stacklevel=4,
            )
            return False, f"asked for, but ignored: {why}."
        return False, f"off: {why}."
    if asked is not None:
        return asked, _asked(asked)
    if device != "mps":
        if device == "cuda":
            return False, (
                "never automatic on CUDA: slicing cost 1.8-2.7x time and saved no memory "
                "against SDPA (H100, SD 1.5)."
            )
        return False, (
            "never automatic on the CPU: SDPA beat diffusers' slicing on time and memory "
            "(SD 1.5 UNet at 512 px: 17-20 s vs 25-28 s per forward)."
        )
    big = height is not None and width is not None and height * width > SLICING_PIXELS_THRESHOLD
    if env.total_memory is None or env.total_memory < SLICING_RAM_THRESHOLD:
        ram = "unknown RAM" if env.total_memory is None else _gib(env.total_memory)
        return True, (
            f"mps with {ram}, under 64 GB: the source rule slices there (full score matrices "
            "materialise on mps: 2.7e8 elements per call for SD 1.5 at 512 px)."
        )
    if big:
        return True, (
            f"{width}x{height} is larger than 512x512: the source rule slices attention for "
            "such images on mps."
        )
    size = "unknown size" if height is None or width is None else f"{width}x{height}"
    return False, (
        f"mps with {_gib(env.total_memory)} (>= 64 GB) and {size} (not over 512x512): the "
        "source rule does not slice."
    )


def _processor_reason(processor: str, slicing: bool) -> str:
    when = "" if slicing else " (unused: attention slicing is off)"
    if processor == "safe":
        return (
            "safe: mps_helpers' chunked SDPA; diffusers' sliced attention gives NaN/black "
            f"images on mps (diffusers #11229, #14438; pytorch #187521){when}."
        )
    return f"diffusers: asked for diffusers' own enable_attention_slicing(){when}."


# VAE ---------------------------------------------------------------------------------


def _vae_slicing(
    tight: bool, options: _Options, asked: bool | None, *, device: str
) -> tuple[bool, str]:
    if asked is not None:
        return asked, _asked(asked)
    batch = options.batch_size
    if batch == 1:
        return False, "one image per call: there is nothing to slice."
    if not tight:
        if device == "cuda":
            return False, (
                "GPU memory is not tight, so the decode runs as one batch: sliced decode "
                "saved 1.4 GiB but cost ~4% time in paired runs "
                "(H100, SD 1.5, batch 4; docs/explanation/benchmarks.md)."
            )
        return False, "memory is not tight, so the decode runs as one batch."
    if batch is None:
        return True, (
            "memory is tight and the batch size unknown: sliced decode only acts on batches "
            "and cut peak memory 35% for ~4% time (H100, SD 1.5, batch 4)."
        )
    return True, (
        f"{batch} images per call on a memory-tight machine: sliced decode cut peak memory "
        "35% for ~4% time (H100, SD 1.5, batch 4)."
    )


def _vae_tiling(
    tight: bool, height: int | None, width: int | None, asked: bool | None
) -> tuple[bool, str]:
    if asked is not None:
        return asked, _asked(asked)
    if height is None or width is None:
        return False, "image size unknown: no tiling."
    side = max(height, width)
    if side <= TILING_SIDE_THRESHOLD:
        return False, f"{width}x{height} is not larger than 1024 px: no tiling."
    if not tight:
        return False, f"{width}x{height} is larger than 1024 px, but memory is not tight."
    return True, (
        f"{width}x{height} is larger than 1024 px on a memory-tight machine: tiled decode "
        "halved VAE memory at 768 px (CPU: 2,193 to 1,035 MB, +38% time)."
    )


# per-call behaviour ------------------------------------------------------------------


def _warmup(env: Environment, device: str, asked: bool | None) -> tuple[bool, str]:
    if asked is not None:
        return asked, _asked(asked)
    if device != "mps":
        return False, "off: the first-pass difference is an mps problem."
    if _release(env.torch_version)[:2] == (1, 13):
        return True, (
            f"torch {env.torch_version} on mps: the first pass differs from later ones, and "
            "the source document's workaround is a one-step warmup pass."
        )
    return False, (
        f"torch {env.torch_version or 'unknown'} on mps: the first-pass problem was a 1.13 "
        "one (diffusers PR #2771 dropped its warmup, 'Resolved in PyTorch 2')."
    )


def _batch_to_loop(device: str, asked: bool | None) -> tuple[bool, str]:
    if asked is not None:
        return asked, _asked(asked)
    if device == "mps":
        return True, (
            "mps: batched prompts crash or give noise there (diffusers #363, pytorch #84039), "
            "so prompts run one at a time."
        )
    if device == "cuda":
        return False, "off on CUDA: looping prompts cost 2.5-4x (H100: 2.63 vs 1.04 s for 4)."
    return False, "off on the CPU: batches run correctly there."


def _nan_guard(dtype: torch.dtype, asked: bool | None) -> tuple[bool, str]:
    import torch

    if asked is not None:
        return asked, _asked(asked)
    if dtype == torch.float32:
        return False, "off in float32: the NaN/black-image failures are half-precision ones."
    return True, (
        f"{_dtype_name(dtype)} can give NaN/black images (ComfyUI #3521, #4799; SDXL's VAE: "
        "A1111 #12923), so outputs are checked."
    )


def _oom_retry(device: str, asked: bool | None) -> tuple[bool, str]:
    if asked is not None:
        return asked, _asked(asked)
    if device == "cpu":
        return False, "off on the CPU: the OS swaps or kills the process rather than raising."
    kind = "there a plain RuntimeError" if device == "mps" else "torch.cuda.OutOfMemoryError"
    return True, (
        f"{device} raises on out-of-memory ({kind}), so a call is retried once with a "
        "stricter plan (slicing, tiling, looping)."
    )


def _memory_watch(device: str, asked: bool | None) -> tuple[bool, str]:
    if asked is not None:
        return asked, _asked(asked)
    if device == "mps":
        return True, (
            "mps: unified memory swaps long before torch's limit (1.7x the working set, "
            "above physical RAM), so swap growth is watched (diffusers #548)."
        )
    if device == "cuda":
        return False, "off on CUDA: GPU memory never swaps; running out raises instead."
    return False, "off on the CPU: no GPU working set to spill into swap (opt in with True)."
