"""Family-aware rules: what kind of denoiser and VAE a pipeline has, and what follows from it.

A pipeline's *family* is read from its facts, not from a list of pipelines: the denoiser is a
UNet (it implements ``set_attention_slice``, or its class says UNet) or a transformer (its
class says Transformer/DiT, or it has ``transformer_blocks``), and the media are video when
the VAE compresses time (a temporal compression in its config or attributes) or the pipeline
takes ``num_frames``. The family names are ``"<denoiser>-<media>"``: ``"unet-image"``,
``"transformer-image"``, ``"transformer-video"``, ...

The rules here are pure functions of (facts, machine, planned dtype and size). Each returns
a :class:`Decision`: the value, the id of the rule that decided (a key of :data:`RULES`), and
the fields its reason template needs; ``decision.reason`` renders it. :func:`family_plan` is
what :func:`mps_helpers._plan.make_plan` calls.

The first part of this module reads the facts these rules need from a pipeline object or a
saved directory (configs and safetensors headers only, never the weights).
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from mps_helpers._environment import Environment
    from mps_helpers._plan import PipelineFacts

__all__ = [
    "FAMILY_DECISIONS",
    "RULES",
    "Decision",
    "Rule",
    "attention_shape",
    "classify",
    "family_facts",
    "family_facts_of_directory",
    "family_plan",
    "safetensors_dtypes",
    "video_decode_bytes",
]

#: The plan fields this module decides (in display order), after the plan's own.
FAMILY_DECISIONS: tuple[str, ...] = (
    "family",
    "attention_bound",
    "attention_upcast_from",
    "float64_rescue",
)

GiB = 2**30

#: bfloat16 SDPA on mps loses precision from about this many keys (pytorch PR #190791).
BF16_ATTENTION_KEYS = 3_000
#: Video decode working memory is estimated as the image rule's (mps_helpers._plan:
#: 3,800 B per pixel in float32, measured) times the frames: the whole clip at once, an upper
#: bound (Wan's VAE decodes a latent frame at a time). InvokeAI budgets 2,900 B per pixel
#: per frame for Wan (``util/vae_working_memory.py``).
#: Memory is tight for a decode needing more than this share of what the device can use
#: (the same share as the image rule in mps_helpers._plan).
TIGHT_DECODE_SHARE = 0.25
#: safetensors dtype names of float8 weights.
FLOAT8_STORED: tuple[str, ...] = ("F8_E4M3", "F8_E5M2")
#: Families where bfloat16 is known to fail on mps, matched on the denoiser class name's
#: start, with the evidence; the fallback is float32 attention (see RULES).
KNOWN_BF16_FAILURES: tuple[tuple[str, str], ...] = (
    (
        "LTX",
        "LTX-Video/LTX-2 give black video in bfloat16 on mps with one-call attention, and "
        "split (chunked) attention fixes it (ComfyUI #15804, #15818)",
    ),
)


@dataclass(frozen=True)
class Rule:
    """One rule: its id, the template of its reason, and the evidence it rests on."""

    id: str
    template: str
    evidence: tuple[str, ...] = ()


@dataclass(frozen=True)
class Decision:
    """A rule's decision: its value, the rule's id, and the fields of its reason."""

    value: Any
    rule: str
    fields: Mapping[str, Any] = field(default_factory=dict)

    @property
    def reason(self) -> str:
        """The reason sentence: the rule's template filled with the fields."""
        return RULES[self.rule].template.format(**self.fields)


_RULES: tuple[Rule, ...] = (
    Rule("family.classified", "{family}: {why}."),
    Rule("family.unknown", "unknown: {why}."),
    Rule(
        "attention.bound.off",
        "None: {device} attention has no element limit to keep under (SDPA's fused kernels "
        "there do not materialise the scores); the limit is an mps one.",
    ),
    Rule(
        "attention.bound.mps",
        "2**{power} elements per score block in every attention call (the safe processor's "
        "bound: a quarter of {memory} over 3 live {dtype} blocks, capped at 2**28); mps "
        "kernels fail past 2**31 (pytorch #84039, #179352, #197636; ComfyUI #14837). "
        "{estimate}",
        ("pytorch #84039", "pytorch #179352", "pytorch #197636", "ComfyUI #14837"),
    ),
    Rule(
        "attention.upcast.off-device",
        "None: the bfloat16 precision loss is in mps' attention kernels.",
    ),
    Rule("attention.upcast.off-dtype", "None: attention runs in {dtype}, not bfloat16."),
    Rule(
        "attention.upcast.short",
        "None: at most {keys:,} keys per call at this size, under the ~3,000 from which "
        "bfloat16 attention loses precision on mps (pytorch PR #190791).",
        ("pytorch PR #190791",),
    ),
    Rule(
        "attention.upcast.long",
        "from {from_keys:,} keys: bfloat16 SDPA on mps loses precision above ~3,000 keys "
        "(pytorch PR #190791, open) and this call has up to {keys} keys; those calls run in "
        "float32 (bounded at float32's size).",
        ("pytorch PR #190791",),
    ),
    Rule(
        "attention.upcast.known-failure",
        "from 1 key (every call): {evidence}; every attention call runs in float32, bounded.",
        ("ComfyUI #15804", "ComfyUI #15818"),
    ),
    Rule(
        "float64.rescue.mps",
        "on: mps has no float64 and model code that asks for it crashes (diffusers #9047 Flux, "
        "#11315 HiDream; LTX-2 RoPE); float64 asked for on mps during a call is made float32 "
        "(cost: ~7 us per torch call, measured on a CPU; ~5 ms per SD-sized denoising step).",
        ("diffusers #9047", "diffusers #11315"),
    ),
    Rule("float64.rescue.off", "off: {device} computes float64."),
    Rule(
        "dtype.float8-stored",
        "the weights are stored as {stored} (float8), which {device} cannot compute (ComfyUI "
        "#6859, #8881; pytorch #148420): they are upcast while loading (exactly: every float8 "
        "value is a bfloat16 and a float16 value), chosen as for bfloat16 weights: {then}",
        ("ComfyUI #6859", "pytorch #148420"),
    ),
    Rule(
        "dtype.known-bf16-failure",
        "{then} {evidence}: the weights stay bfloat16, and attention runs in float32 "
        "(attention_upcast_from).",
        ("ComfyUI #15804", "ComfyUI #15818"),
    ),
    Rule(
        "memory.video",
        "{base} Video: decoding {frames} frames of {width}x{height} ({batch} clip(s)) needs "
        "~{need} at once, {share:.0%} of {memory} ({verdict} the 25% share; the image "
        "estimate of ~3.8 KB per pixel in float32, times the frames: an upper bound).",
    ),
    Rule(
        "vae.video-tiled",
        "on: a 3-D decode of {frames} frames of {width}x{height} on a memory-tight machine: "
        "tiled by pixels (enable_tiling) and by frames (frame-wise decoding where the VAE has "
        "it).",
    ),
    Rule("vae.video-fits", "off: the clip's 3-D decode fits ({need})."),
    Rule(
        "loop.video",
        "mps: batched prompts crash or give noise there (diffusers #363, pytorch #84039), so "
        "prompts run one at a time; for video one prompt is one clip: a clip's frames attend "
        "to each other and are never split (its attention is bounded instead).",
        ("diffusers #363", "pytorch #84039"),
    ),
)
#: Every rule by id: the data behind each reason this module gives.
RULES: Mapping[str, Rule] = {rule.id: rule for rule in _RULES}


# ---------------------------------------------------------------------------------------
# Facts: reading what the rules need


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


def family_facts(pipe: Any) -> dict[str, Any]:
    """Return the family fields of :class:`~mps_helpers._plan.PipelineFacts` for a pipeline.

    Reads the denoiser's and the VAE's configs and attributes; changes nothing.
    """
    from mps_helpers._plan import denoiser_of, unprepared_class

    denoiser = denoiser_of(pipe)
    vae = dict(pipe.components).get("vae")
    return _from_configs(
        _config(denoiser),
        _config(vae),
        vae=vae,
        denoiser_cls=None if denoiser is None else type(denoiser),
        denoiser_name=None if denoiser is None else type(denoiser).__name__,
        denoiser=denoiser,
        pipeline_class=unprepared_class(type(pipe)),
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


# ---------------------------------------------------------------------------------------
# Rules


def classify(facts: PipelineFacts) -> Decision:
    """Return the family decision: ``"<unet|transformer>-<image|video>"``, or None."""
    kind = facts.denoiser_kind
    if kind is None and facts.supports_attention_slicing is not None:
        kind = "unet" if facts.supports_attention_slicing else None
    if kind is None:
        why = (
            "no pipeline given"
            if facts.denoiser_class is None
            else f"{facts.denoiser_class} is neither a UNet nor a transformer by its class"
        )
        return Decision(None, "family.unknown", {"why": why})
    video = facts.vae_temporal_compression is not None or facts.takes_frames
    media = "video" if video else "image"
    if facts.vae_temporal_compression is not None:
        media_why = f"its VAE compresses time {facts.vae_temporal_compression}x (a 3-D VAE)"
    elif facts.takes_frames:
        media_why = "the pipeline takes num_frames"
    else:
        media_why = "a 2-D VAE"
    kind_why = "a UNet (diffusers' slicing applies)" if kind == "unet" else "a transformer denoiser"
    name = facts.denoiser_class or "the denoiser"
    return Decision(
        f"{kind}-{media}",
        "family.classified",
        {"family": f"{kind}-{media}", "why": f"{name} is {kind_why}; {media_why}"},
    )


def attention_shape(
    facts: PipelineFacts, height: int | None, width: int | None, frames: int | None
) -> tuple[int, int] | None:
    """Return (heads, tokens) of the denoiser's largest self-attention, or None if unknown.

    Tokens are latent positions over the patch: (height / VAE scale / patch) x (width / ...)
    x latent frames / temporal patch. A denoiser whose input has k x k times the VAE's latent
    channels packs k x k latents per token (Flux's pipeline packs 2 x 2); the text tokens
    of joint attention are left out (a few hundred).
    """
    scale = facts.vae_spatial_compression
    heads = facts.attention_heads
    if height is None or width is None or not scale or not heads:
        return None
    patch = facts.patch_size or 1
    latent, inputs = facts.vae_latent_channels, facts.in_channels
    if latent and inputs and inputs > latent and inputs % latent == 0:
        pack = inputs // latent
        side = round(pack**0.5)
        if side * side == pack:
            patch *= side
    tokens = max(1, height // scale // patch) * max(1, width // scale // patch)
    temporal = facts.vae_temporal_compression
    if frames is not None and temporal:
        latent_frames = (frames - 1) // temporal + 1
        tokens *= max(1, latent_frames // (facts.patch_size_t or 1))
    return heads, tokens


def _known_bf16_failure(facts: PipelineFacts) -> str | None:
    name = facts.denoiser_class or ""
    for prefix, evidence in KNOWN_BF16_FAILURES:
        if name.startswith(prefix):
            return evidence
    return None


def family_dtype(
    env: Environment,
    device: str,
    facts: PipelineFacts,
    asked: torch.dtype | None,
    decided: tuple[torch.dtype, str],
) -> tuple[torch.dtype, str]:
    """Return the dtype decision, revised for float8-stored weights and known bf16 failures."""
    import dataclasses

    import torch

    from mps_helpers import _plan

    if asked is not None:
        return decided
    stored = [name for name in facts.stored_dtypes if name in FLOAT8_STORED]
    if stored:
        as_bf16 = dataclasses.replace(facts, weights_dtype=torch.bfloat16)
        dtype, then = _plan._dtype(env, device, as_bf16, None)
        decision = Decision(
            dtype,
            "dtype.float8-stored",
            {"stored": ", ".join(stored), "device": device, "then": then},
        )
        return dtype, decision.reason
    dtype, reason = decided
    evidence = _known_bf16_failure(facts)
    if evidence and device == "mps" and dtype == torch.bfloat16:
        decision = Decision(
            dtype, "dtype.known-bf16-failure", {"then": reason, "evidence": evidence}
        )
        return dtype, decision.reason
    return decided


def _gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / GiB:.0f} GiB"


def _size(n: int) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / 2**20:.0f} MiB"


def video_decode_bytes(height: int, width: int, frames: int, batch: int, dtype: torch.dtype) -> int:
    """Return the estimated working memory of decoding ``batch`` clips at once (bytes).

    The image estimate (:func:`mps_helpers._plan.decode_bytes`) times the frames: a whole
    clip decoded at once, an upper bound for VAEs that decode a few frames at a time.
    """
    from mps_helpers import _plan

    return _plan.decode_bytes(height, width, batch, dtype) * frames


def _is_video(family: Decision) -> bool:
    return isinstance(family.value, str) and family.value.endswith("-video")


def family_memory_tight(
    env: Environment,
    device: str,
    facts: PipelineFacts,
    *,
    dtype: torch.dtype,
    height: int | None,
    width: int | None,
    batch: int | None,
    decided: tuple[bool, str],
) -> tuple[bool, str]:
    """Return the memory-tight decision, with the 3-D decode estimate for video families."""
    from mps_helpers import _plan

    frames = facts.default_num_frames
    if not _is_video(classify(facts)) or height is None or width is None or frames is None:
        return decided
    tight, base = decided
    clips = batch or 1
    need = video_decode_bytes(height, width, frames, clips, dtype)
    available = _plan._device_memory(env, device)
    if available is None:
        return True, base
    share = need / available
    verdict = share > TIGHT_DECODE_SHARE
    decision = Decision(
        tight or verdict,
        "memory.video",
        {
            "base": base,
            "frames": frames,
            "width": width,
            "height": height,
            "batch": clips,
            "need": _size(need),
            "share": share,
            "memory": _gib(available),
            "verdict": "over" if verdict else "within",
        },
    )
    return decision.value, decision.reason


@dataclass(frozen=True)
class FamilyPlan:
    """What :func:`family_plan` decides: new plan fields and revised ones, with reasons."""

    #: Plan keyword arguments (``family``, ``attention_bound``, ...; ``vae_tiling`` and
    #: ``batch_to_loop`` when a video rule revises them).
    fields: Mapping[str, Any]
    #: The reason of each field in ``fields``.
    reasons: Mapping[str, str]
    #: The rule id of each field in ``fields``.
    rules: Mapping[str, str]


def family_plan(
    facts: PipelineFacts,
    env: Environment,
    *,
    device: str,
    dtype: torch.dtype,
    height: int | None,
    width: int | None,
    batch: int | None,
    tight: bool,
    switches: Mapping[str, bool | None],
) -> FamilyPlan:
    """Return the family-aware decisions for a plan (pure)."""
    import torch

    from mps_helpers import _plan

    frames = facts.default_num_frames
    family = classify(facts)
    decisions: dict[str, Decision] = {"family": family}
    shape = attention_shape(facts, height, width, frames if _is_video(family) else None)

    # upcast first: it decides the element size the bound is computed for
    if device != "mps":
        upcast = Decision(None, "attention.upcast.off-device")
    elif dtype != torch.bfloat16:
        upcast = Decision(None, "attention.upcast.off-dtype", {"dtype": _plan._dtype_name(dtype)})
    elif (evidence := _known_bf16_failure(facts)) is not None:
        upcast = Decision(1, "attention.upcast.known-failure", {"evidence": evidence})
    elif shape is not None and shape[1] < BF16_ATTENTION_KEYS:
        upcast = Decision(None, "attention.upcast.short", {"keys": shape[1]})
    else:
        keys = "an unknown number of" if shape is None else f"{shape[1]:,}"
        upcast = Decision(
            BF16_ATTENTION_KEYS,
            "attention.upcast.long",
            {"from_keys": BF16_ATTENTION_KEYS, "keys": keys},
        )
    decisions["attention_upcast_from"] = upcast

    if device != "mps":
        decisions["attention_bound"] = Decision(None, "attention.bound.off", {"device": device})
    else:
        compute = torch.float32 if upcast.value is not None else dtype
        bound = _plan.attention_chunk_elements(env, compute, device=device)
        available = _plan._device_memory(env, device)
        memory = (
            "available memory (unknown: 2 GiB assumed)"
            if available is None
            else f"{_gib(available)} available memory"
        )
        decisions["attention_bound"] = Decision(
            bound,
            "attention.bound.mps",
            {
                "power": bound.bit_length() - 1,
                "memory": memory,
                "dtype": _plan._dtype_name(compute),
                "estimate": _estimate(
                    shape=shape,
                    bound=bound,
                    height=height,
                    width=width,
                    frames=frames,
                    family=family,
                ),
            },
        )

    decisions["float64_rescue"] = (
        Decision(True, "float64.rescue.mps")
        if device == "mps"
        else Decision(False, "float64.rescue.off", {"device": device})
    )

    if _is_video(family) and height is not None and width is not None and frames is not None:
        need = video_decode_bytes(height, width, frames, batch or 1, dtype)
        if switches.get("vae_tiling") is None:
            decisions["vae_tiling"] = (
                Decision(
                    True,
                    "vae.video-tiled",
                    {"frames": frames, "width": width, "height": height},
                )
                if tight
                else Decision(False, "vae.video-fits", {"need": _size(need)})
            )
        if switches.get("batch_to_loop") is None and device == "mps":
            decisions["batch_to_loop"] = Decision(True, "loop.video")

    return FamilyPlan(
        fields={name: d.value for name, d in decisions.items()},
        reasons={name: d.reason for name, d in decisions.items()},
        rules={name: d.rule for name, d in decisions.items()},
    )


def _estimate(
    *,
    shape: tuple[int, int] | None,
    bound: int,
    height: int | None,
    width: int | None,
    frames: int | None,
    family: Decision,
) -> str:
    if shape is None:
        return "Calls that fit run the native kernel unchanged."
    heads, tokens = shape
    elements = heads * tokens * tokens
    size = f"{width}x{height}"
    if _is_video(family) and frames is not None:
        size += f" x {frames} frames"
    head = (
        f"At {size}: {heads} heads x {tokens:,} tokens -> {elements:.2g} score elements per image"
    )
    if elements <= bound:
        return f"{head}, within the bound: one native call."
    blocks = -(-elements // bound)
    return f"{head}: split into >= {blocks:,} blocks."
