"""Family-aware rules: what follows from a pipeline's denoiser and VAE family.

A pipeline's *family* is read from its facts (:mod:`mps_helpers._family_facts` reads them),
not from a list of pipelines; the family names are ``"<denoiser>-<media>"``:
``"unet-image"``, ``"transformer-image"``, ``"transformer-video"``, ...

The rules here are pure functions of (facts, machine, planned dtype and size). Each returns
a :class:`Decision`: the value, the id of the rule that decided (a key of
:data:`mps_helpers._reasons.FAMILY_RULES`, whose templates cite the evidence registry), and
the fields its reason template needs; ``decision.reason`` renders it.
:func:`mps_helpers._plan.make_plan` calls :func:`family_dtype`, :func:`family_memory_tight`
and :func:`family_plan`, and hands them what they need of the plan's own rules (the dtype
rule, the memory the device can use, the attention bound and decode estimate), so that this
module sits beside the plan and never imports it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mps_helpers._family_facts import (
    FLOAT8_STORED,
    call_default_size,
    family_facts,
    family_facts_of_directory,
    safetensors_dtypes,
)
from mps_helpers._reasons import BF16_ATTENTION_KEYS, TIGHT_DECODE_SHARE, Phrase, reason

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    import torch

    from mps_helpers._environment import Environment
    from mps_helpers._facts import PipelineFacts

    #: What a rule returns: its value, its rule id and the fields of its reason.
    Decided = tuple[Any, str, dict[str, object]]
    #: The VAE decode estimate of the plan: (height, width, batch, dtype) -> bytes.
    DecodeBytes = Callable[[int, int, int, "torch.dtype"], int]

__all__ = [
    "BF16_ATTENTION_KEYS",
    "FAMILY_DECISIONS",
    "FLOAT8_STORED",
    "KNOWN_BF16_FAILURES",
    "Decision",
    "FamilyPlan",
    "attention_shape",
    "call_default_size",
    "classify",
    "family_dtype",
    "family_facts",
    "family_facts_of_directory",
    "family_memory_tight",
    "family_plan",
    "safetensors_dtypes",
    "video_decode_bytes",
]

#: The plan fields this module decides (in display order), after the plan's own; the plan's
#: DECISIONS ends with them.
FAMILY_DECISIONS: tuple[str, ...] = (
    "family",
    "attention_bound",
    "attention_upcast_from",
    "float64_rescue",
)

#: Denoiser class name prefixes of the families where bfloat16 is known to fail on mps
#: (evidence ``ltx_bf16_black``); the fallback is float32 attention.
KNOWN_BF16_FAILURES: tuple[str, ...] = ("LTX",)


@dataclass(frozen=True)
class Decision:
    """A rule's decision: its value, the rule's id, and the fields of its reason."""

    value: Any
    rule: str
    fields: Mapping[str, Any] = field(default_factory=dict)

    @property
    def reason(self) -> str:
        """The reason sentence: the rule's template filled with the fields."""
        return reason(self.rule, self.fields)

    @property
    def decided(self) -> Decided:
        """The decision as the plan's rules return theirs: (value, rule id, fields)."""
        return self.value, self.rule, dict(self.fields)


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


def _known_bf16_failure(facts: PipelineFacts) -> bool:
    name = facts.denoiser_class or ""
    return any(name.startswith(prefix) for prefix in KNOWN_BF16_FAILURES)


def family_dtype(
    device: str,
    facts: PipelineFacts,
    asked: torch.dtype | None,
    decided: Decided,
    *,
    dtype_rule: Callable[[PipelineFacts], Decided],
) -> Decided:
    """Return the dtype decision, revised for float8-stored weights and known bf16 failures.

    ``decided`` is the plan's own dtype decision, ``dtype_rule`` the plan's dtype rule for
    other facts (the float8 rule asks it what bfloat16 weights would get).
    """
    import torch

    if asked is not None:
        return decided
    stored = [name for name in facts.stored_dtypes if name in FLOAT8_STORED]
    if stored:
        as_bf16 = dataclasses.replace(facts, weights_dtype=torch.bfloat16)
        dtype, rule, fields = dtype_rule(as_bf16)
        then = reason(rule, fields)
        return Decision(
            dtype,
            "dtype.float8-stored",
            {"stored": ", ".join(stored), "device": device, "then": then},
        ).decided
    dtype, rule, fields = decided
    if _known_bf16_failure(facts) and device == "mps" and dtype == torch.bfloat16:
        return Decision(dtype, "dtype.known-bf16-failure", {"then": reason(rule, fields)}).decided
    return decided


def video_decode_bytes(
    height: int,
    width: int,
    frames: int,
    batch: int,
    dtype: torch.dtype,
    *,
    decode_bytes: DecodeBytes,
) -> int:
    """Return the estimated working memory of decoding ``batch`` clips at once (bytes).

    The image estimate (``decode_bytes``: :func:`mps_helpers._plan.decode_bytes`) times the
    frames: a whole clip decoded at once, an upper bound for VAEs that decode a few frames at
    a time.
    """
    return decode_bytes(height, width, batch, dtype) * frames


def _is_video(family: Decision) -> bool:
    return isinstance(family.value, str) and family.value.endswith("-video")


def family_memory_tight(
    facts: PipelineFacts,
    *,
    dtype: torch.dtype,
    height: int | None,
    width: int | None,
    batch: int | None,
    decided: Decided,
    available: int | None,
    decode_bytes: DecodeBytes,
) -> Decided:
    """Return the memory-tight decision, with the 3-D decode estimate for video families.

    ``decided`` is the plan's own; ``available`` the memory the device can use (None:
    unknown); ``decode_bytes`` the plan's image decode estimate.
    """
    frames = facts.default_num_frames
    if not _is_video(classify(facts)) or height is None or width is None or frames is None:
        return decided
    tight, rule, fields = decided
    if available is None:
        return True, rule, fields
    clips = batch or 1
    need = video_decode_bytes(height, width, frames, clips, dtype, decode_bytes=decode_bytes)
    share = need / available
    verdict = share > TIGHT_DECODE_SHARE
    return Decision(
        tight or verdict,
        "memory_tight.video",
        {
            "base": reason(rule, fields),
            "frames": frames,
            "width": width,
            "height": height,
            "batch": clips,
            "need": need,
            "share": share,
            "memory": Phrase("memory-seen", {"available": available, "where": "available memory"}),
            "verdict": "over" if verdict else "within",
        },
    ).decided


@dataclass(frozen=True)
class FamilyPlan:
    """What :func:`family_plan` decides: new plan fields and revised ones, with reasons."""

    #: Each decision (``family``, ``attention_bound``, ...; ``vae_tiling`` and
    #: ``batch_to_loop`` when a video rule revises them).
    decisions: Mapping[str, Decision]

    @property
    def fields(self) -> dict[str, Any]:
        """The value of each decision, by plan field."""
        return {name: d.value for name, d in self.decisions.items()}

    @property
    def reasons(self) -> dict[str, str]:
        """The reason of each decision, by plan field."""
        return {name: d.reason for name, d in self.decisions.items()}

    @property
    def rules(self) -> dict[str, str]:
        """The rule id of each decision, by plan field."""
        return {name: d.rule for name, d in self.decisions.items()}


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
    available: int | None,
    chunk_elements: Callable[[torch.dtype], int],
    decode_bytes: DecodeBytes,
) -> FamilyPlan:
    """Return the family-aware decisions for a plan (pure).

    ``available`` is the memory the device can use (None: unknown), ``chunk_elements`` the
    plan's attention bound for a compute dtype on this machine, ``decode_bytes`` its image
    decode estimate.
    """
    import torch

    frames = facts.default_num_frames
    family = classify(facts)
    decisions: dict[str, Decision] = {"family": family}
    shape = attention_shape(facts, height, width, frames if _is_video(family) else None)

    # upcast first: it decides the element size the bound is computed for
    if device != "mps":
        upcast = Decision(None, "attention_upcast_from.off-device")
    elif dtype != torch.bfloat16:
        upcast = Decision(None, "attention_upcast_from.off-dtype", {"dtype": dtype})
    elif _known_bf16_failure(facts):
        upcast = Decision(1, "attention_upcast_from.known-failure")
    elif shape is not None and shape[1] < BF16_ATTENTION_KEYS:
        upcast = Decision(None, "attention_upcast_from.short", {"keys": shape[1]})
    else:
        keys = "an unknown number of" if shape is None else f"{shape[1]:,}"
        upcast = Decision(BF16_ATTENTION_KEYS, "attention_upcast_from.long", {"keys": keys})
    decisions["attention_upcast_from"] = upcast

    if device != "mps":
        decisions["attention_bound"] = Decision(None, "attention_bound.off", {"device": device})
    else:
        compute = torch.float32 if upcast.value is not None else dtype
        bound = chunk_elements(compute)
        where = "available memory"
        seen = (
            Phrase("memory-unknown", {"where": where})
            if available is None
            else Phrase("memory-seen", {"available": available, "where": where})
        )
        decisions["attention_bound"] = Decision(
            bound,
            "attention_bound.mps",
            {
                "exponent": bound,
                "seen": seen,
                "dtype": compute,
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
        Decision(True, "float64_rescue.mps")
        if device == "mps"
        else Decision(False, "float64_rescue.off", {"device": device})
    )

    if _is_video(family) and height is not None and width is not None and frames is not None:
        need = video_decode_bytes(
            height, width, frames, batch or 1, dtype, decode_bytes=decode_bytes
        )
        if switches.get("vae_tiling") is None:
            decisions["vae_tiling"] = (
                Decision(
                    True,
                    "vae_tiling.video-tiled",
                    {"frames": frames, "width": width, "height": height},
                )
                if tight
                else Decision(False, "vae_tiling.video-fits", {"need": need})
            )
        if switches.get("batch_to_loop") is None and device == "mps":
            decisions["batch_to_loop"] = Decision(True, "batch_to_loop.video")

    return FamilyPlan(decisions)


def _estimate(
    *,
    shape: tuple[int, int] | None,
    bound: int,
    height: int | None,
    width: int | None,
    frames: int | None,
    family: Decision,
) -> Phrase:
    if shape is None:
        return Phrase("estimate-unknown")
    heads, tokens = shape
    elements = heads * tokens * tokens
    size = f"{width}x{height}"
    if _is_video(family) and frames is not None:
        size += f" x {frames} frames"
    fields: dict[str, object] = {
        "size": size,
        "heads": heads,
        "tokens": tokens,
        "elements": elements,
    }
    if elements <= bound:
        return Phrase("estimate-within", fields)
    return Phrase("estimate-split", {**fields, "blocks": -(-elements // bound)})
