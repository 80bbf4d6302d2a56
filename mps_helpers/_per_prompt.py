"""Which arguments of a pipeline call are per prompt, read from the pipeline's own signature.

A looped batch (and the warmup, which runs the first prompt only) must cut every argument
that carries one entry per prompt and give everything else to every prompt unchanged. No
list of names can keep up with diffusers' families (AudioLDM 2's ``generated_prompt_embeds``,
Kandinsky's ``image_embeds``, Stable Audio's ``attention_mask``, Wan's
``num_videos_per_prompt``...), so :func:`roles_of` derives the roles from the ``__call__``
signature, the way diffusers' own parameters are written:

- **text**: annotated ``str | list[str]`` (a list holds one string per prompt; a single
  string applies to all), e.g. ``prompt``, ``negative_prompt_2``, ``transcription``;
- **rows**: annotated as a tensor and named as an embedding or its mask (``*embeds*``,
  ``*embedding*``, ``*_mask``): one row per prompt along the first dimension, e.g.
  ``prompt_embeds``, ``generated_prompt_embeds``, ``attention_mask``, ``image_embeds``;
- **images**: the image inputs of img2img / inpaint / ControlNet pipelines, annotated as
  diffusers' ``PipelineImageInput`` (PIL, NumPy and tensor forms): one per prompt or one
  for all;
- **per image**: ``latents`` and a list ``generator``, one per image (prompts times the
  ``num_*_per_prompt`` parameter, whatever its name: images, videos, waveforms).

Adapter inputs (``ip_adapter_image``, ``ip_adapter_image_embeds``) hold one entry per
adapter, not per prompt, and are never cut. The hand-kept name lists (:data:`PROMPT_KEYS`,
:data:`EMBEDDING_KEYS`, :data:`IMAGE_KEYS`) are the fallback for arguments a signature
does not annotate (those passed through ``**kwargs``), and they alone make a wrong length
an error: a derived argument whose length does not match the batch is given to every prompt
as it is, for the pipeline to judge.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "EMBEDDING_KEYS",
    "FALLBACK",
    "IMAGE_KEYS",
    "PROMPT_KEYS",
    "CallRoles",
    "batch_rows",
    "control_nets",
    "count_prompts",
    "multiplicity_of",
    "roles_of",
    "rows_of",
]

PROMPT_KEYS: tuple[str, ...] = (
    "prompt",
    "prompt_2",
    "prompt_3",
    "negative_prompt",
    "negative_prompt_2",
    "negative_prompt_3",
)
"""Text arguments: a list holds one string per prompt; a single string applies to all."""

EMBEDDING_KEYS: tuple[str, ...] = (
    "prompt_embeds",
    "negative_prompt_embeds",
    "pooled_prompt_embeds",
    "negative_pooled_prompt_embeds",
    "prompt_attention_mask",
    "negative_prompt_attention_mask",
)
"""Precomputed text conditioning: one row per prompt along the first (batch) dimension."""

IMAGE_KEYS: tuple[str, ...] = (
    "image",
    "mask_image",
    "control_image",
    "masked_image_latents",
    "depth_map",
)
"""Image inputs of img2img / inpaint / ControlNet / depth pipelines: one per prompt, or one
for all (a single image, a one-item list, or a batch dimension of 1)."""

_PER_IMAGE = ("latents", "generator")
_MULTIPLICITY = re.compile(r"num_[a-z]+_per_prompt")
_EMBEDDING_NAME = re.compile(r"embed|_mask$|^attention_mask$")


@dataclasses.dataclass(frozen=True)
class CallRoles:
    """The per-prompt arguments of one pipeline call signature, by role.

    Each role is a tuple of parameter names in signature order (the fallback names last).

    Attributes:
        text: string arguments, cut when given as a list.
        rows: tensors (or lists of tensors) with one row per prompt.
        images: image inputs, one per prompt or one for all.
        per_image: ``latents`` and ``generator``: one per image.
        multiplicity: the ``num_*_per_prompt`` parameter, or None if the call has none.
        control: the argument that holds the ControlNet images (``control_image`` where the
            call has one, else ``image``).
    """

    text: tuple[str, ...] = PROMPT_KEYS
    rows: tuple[str, ...] = EMBEDDING_KEYS
    images: tuple[str, ...] = IMAGE_KEYS
    per_image: tuple[str, ...] = _PER_IMAGE
    multiplicity: str | None = "num_images_per_prompt"
    control: tuple[str, ...] = ("image", "control_image")


FALLBACK = CallRoles()
"""The roles of a call whose signature says nothing: the name lists alone."""


def _annotation_text(parameter: inspect.Parameter) -> str:
    annotation = parameter.annotation
    if annotation is inspect.Parameter.empty:
        return ""
    text = annotation if isinstance(annotation, str) else str(annotation)
    return text.lower().replace("typing.", "")


def _is_text(annotation: str) -> bool:
    """Return whether an annotation reads ``str | list[str]`` (in any of Python's spellings)."""
    if not re.search(r"list\[str\]", annotation):
        return False
    rest = re.sub(r"list\[str\]", "", annotation)
    return re.search(r"(?<![\w.])str\b", rest) is not None


def _is_image(annotation: str) -> bool:
    # diffusers' PipelineImageInput: PIL images, NumPy arrays and tensors, or lists of them.
    return "pil.image.image" in annotation and "ndarray" in annotation


def _ordered(derived: list[str], fallback: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys([*derived, *fallback]))


def roles_of(signature: inspect.Signature) -> CallRoles:
    """Return the roles of the parameters of a pipeline call ``signature``.

    Cached per signature object (:func:`mps_helpers._batch.call_signature` returns one
    object per pipeline class), so the derivation runs once per class.

    Derived from the parameters' annotations and names (see the module's docstring), with
    the name lists added for arguments a signature passes through ``**kwargs``.
    """
    known = _roles_cache.get(id(signature))
    if known is not None and known[0] is signature:
        return known[1]
    roles = _derive(signature)
    if len(_roles_cache) >= _CACHE_SIZE:
        _roles_cache.clear()  # signatures made afresh on each call (no partial) must not pile up
    _roles_cache[id(signature)] = (signature, roles)
    return roles


# id -> (signature, roles): signatures hold unhashable defaults (lists), so they cannot be
# dict keys themselves; the stored signature keeps its id from being reused.
_roles_cache: dict[int, tuple[inspect.Signature, CallRoles]] = {}
_CACHE_SIZE = 512


def _derive(signature: inspect.Signature) -> CallRoles:
    text: list[str] = []
    rows: list[str] = []
    images: list[str] = []
    multiplicity = None
    for name, parameter in signature.parameters.items():
        if parameter.kind in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL):
            continue
        if "ip_adapter" in name or name in _PER_IMAGE:
            continue
        annotation = _annotation_text(parameter)
        if multiplicity is None and _MULTIPLICITY.fullmatch(name):
            multiplicity = name
        elif _is_text(annotation):
            text.append(name)
        elif "tensor" in annotation and _EMBEDDING_NAME.search(name):
            rows.append(name)
        elif _is_image(annotation):
            images.append(name)
    names = signature.parameters
    control = ("control_image",) if "control_image" in names else ("image",)
    return CallRoles(
        text=_ordered(text, PROMPT_KEYS),
        rows=_ordered(rows, EMBEDDING_KEYS),
        images=_ordered(images, IMAGE_KEYS),
        multiplicity=multiplicity if multiplicity is not None else FALLBACK.multiplicity,
        control=control,
    )


def rows_of(value: Any) -> int | None:
    """Return the length of the first dimension of an array or tensor, else None."""
    shape = getattr(value, "shape", None)
    if shape is None or len(shape) == 0:
        return None
    return int(shape[0])


def batch_rows(value: Any) -> int | None:
    """Return the batch an embedding argument holds: a tensor's rows, a list of tensors'
    items (which the pipeline concatenates), else None."""
    if isinstance(value, list):
        if value and all(rows_of(v) is not None for v in value):
            return len(value)
        return None
    return rows_of(value)


def count_prompts(kwargs: Mapping[str, Any], roles: CallRoles = FALLBACK) -> int:
    """Return how many prompts a call carries.

    A list ``prompt``'s length (or, with no ``prompt``, another text argument's); else, with
    no ``prompt``, the batch dimension of the first embedding given (``prompt_embeds``,
    Kandinsky's ``image_embeds``, ...; a list of tensors counts its items), the positive
    ones before the ``negative_`` ones; else 1.
    """
    prompt = kwargs.get("prompt")
    if isinstance(prompt, list):
        return len(prompt)
    if prompt is not None:
        return 1
    for name in roles.text:
        value = kwargs.get(name)
        if isinstance(value, list) and not name.startswith("negative"):
            return len(value)
    ordered = sorted(roles.rows, key=lambda name: name.startswith("negative"))
    for name in ordered:
        rows = batch_rows(kwargs.get(name))
        if rows is not None:
            return rows
    return 1


def multiplicity_of(
    signature: inspect.Signature, kwargs: Mapping[str, Any], roles: CallRoles
) -> int:
    """Return the ``num_*_per_prompt`` value in effect: given, else the signature's default."""
    name = roles.multiplicity
    if name is None:
        return 1
    value = kwargs.get(name)
    if value is None:
        parameter = signature.parameters.get(name)
        default = None if parameter is None else parameter.default
        value = default if isinstance(default, int) else 1
    return int(value)


def control_nets(pipe: Any) -> int:
    """Return how many ControlNets the pipeline holds together (0 for none or a single one)."""
    controlnet = getattr(pipe, "controlnet", None)
    nets = getattr(controlnet, "nets", None)
    if controlnet is None or nets is None:
        return 0
    return len(nets)
