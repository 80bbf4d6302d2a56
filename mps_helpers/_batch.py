"""Pure helpers of the batch-to-loop adapter: bind a call, count its prompts, split, merge.

Nothing here touches a pipeline or a device. :func:`split_batch` turns the keyword arguments
of one batched pipeline call into one set per prompt, and :func:`merge_outputs` turns the
per-prompt results back into what the batched call would have returned.

Which arguments are per prompt comes from the call's signature
(:func:`mps_helpers._per_prompt.roles_of`, with the name lists :data:`PROMPT_KEYS`,
:data:`EMBEDDING_KEYS`, :data:`IMAGE_KEYS` as the fallback), never from "is a list of the
right length": ``timesteps`` and ``sigmas`` are lists too, and belong to every prompt.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from mps_helpers._per_prompt import (
    EMBEDDING_KEYS,
    FALLBACK,
    IMAGE_KEYS,
    PROMPT_KEYS,
    CallRoles,
    batch_rows,
    count_prompts,
    multiplicity_of,
    roles_of,
    rows_of,
)
from mps_helpers._util import dtype_name

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

__all__ = [
    "EMBEDDING_KEYS",
    "IMAGE_KEYS",
    "LOOP_TOLERANCE",
    "PROMPT_KEYS",
    "BoundCall",
    "batch_size",
    "bind_call",
    "call_roles",
    "call_signature",
    "check_call",
    "loop_tolerance",
    "merge_outputs",
    "merge_values",
    "split_batch",
]

LOOP_TOLERANCE: Mapping[str, float] = MappingProxyType(
    {"float32": 1e-4, "float16": 4e-3, "bfloat16": 3.2e-2}
)
"""How far a looped batch may be from the batched call, per compute dtype: the largest
absolute pixel difference, images in [0, 1], with a list of generators (or one generator
and a deterministic scheduler). Not bit-equal because kernels sum in an order that depends
on the batch size, and each dtype rounds those sums at its own precision; float16 and
bfloat16 allow four steps of their precision at 1 (2**-10 and 2**-7). Measured with
``tests/benchmarks/loop_exactness.py``; docs/explanation/batch-and-warmup.md has the
figures."""


def loop_tolerance(dtype: Any) -> float:
    """Return how far a looped batch may be from the batched call in ``dtype``.

    The figure is the largest absolute pixel difference, images in [0, 1], between a
    prepared pipeline's looped batch (``batch_to_loop``) and the batched call, given a list
    of generators (or one generator and a deterministic scheduler): 1e-4 in float32, 4e-3
    in float16, 3.2e-2 in bfloat16 (four steps of each half-precision dtype at 1). Use it
    to compare the two, as ``examples/several_prompts.py --check`` does::

        >>> from mps_helpers import loop_tolerance
        >>> loop_tolerance("float32")
        0.0001

    Args:
        dtype: a ``torch.dtype`` (``plan_of(pipe).dtype``) or its name.

    Raises:
        ValueError: ``dtype`` is not one of the dtypes a plan chooses.

    .. versionadded:: 0.1
    """
    name = dtype_name(dtype)
    tolerance = LOOP_TOLERANCE.get(name)
    if tolerance is None:
        choices = ", ".join(LOOP_TOLERANCE)
        raise ValueError(f"dtype must be one of {choices} (or torch's), got {dtype!r}")
    return tolerance


# Masks may come as (batch, height, width) tensors: diffusers' mask processor reads a 3-D
# mask as a batch of grayscale masks, while a 3-D image is a single (channels, h, w) image.
_BATCHED_NDIM = {"mask_image": 3}


@dataclasses.dataclass(frozen=True)
class BoundCall:
    """The keyword arguments of one call, with the defaults the split needs.

    Attributes:
        kwargs: every argument the caller gave, by name (positional ones bound to their
            names, the contents of ``**kwargs`` flattened in).
        num_images_per_prompt: the value in effect of the call's ``num_*_per_prompt``
            parameter (images, videos, waveforms; the signature's default when not given).
        roles: which of the call's arguments are per prompt, from its signature.
    """

    kwargs: dict[str, Any]
    num_images_per_prompt: int
    roles: CallRoles = FALLBACK


@functools.cache
def _signature_of(func: Callable[..., Any], skip: int) -> inspect.Signature:
    signature = inspect.signature(func)
    parameters = list(signature.parameters.values())[skip:]
    return signature.replace(parameters=parameters)


def call_signature(call: Callable[..., Any]) -> inspect.Signature:
    """Return the signature of ``call``, cached per underlying function.

    A ``functools.partial(Class.__call__, pipe)`` (the form the prepared call receives) is
    looked up by ``Class.__call__``, so the cost of :func:`inspect.signature` is paid once per
    pipeline class, not once per call.
    """
    if isinstance(call, functools.partial) and not call.keywords:
        return _signature_of(call.func, len(call.args))
    return inspect.signature(call)


def call_roles(call: Callable[..., Any]) -> CallRoles:
    """Return which arguments of ``call`` are per prompt (derived once per pipeline class)."""
    return roles_of(call_signature(call))


def bind_call(
    call: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]
) -> BoundCall | None:
    """Return ``args`` and ``kwargs`` bound to the names of ``call``'s parameters.

    Returns None when the arguments cannot be turned into keywords (they do not bind, or the
    signature takes ``*args``): the caller then makes the call unchanged and lets the
    pipeline report the problem in its own words.
    """
    signature = call_signature(call)
    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError:
        return None
    flat: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            flat.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                return None
        else:
            flat[name] = value
    roles = roles_of(signature)
    per_prompt = multiplicity_of(signature, flat, roles)
    return BoundCall(kwargs=flat, num_images_per_prompt=per_prompt, roles=roles)


@functools.cache
def _positional_of(func: Callable[..., Any], skip: int) -> tuple[str, ...]:
    return _positional_names(_signature_of(func, skip))


def _positional_names(signature: inspect.Signature) -> tuple[str, ...]:
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(name for name, p in signature.parameters.items() if p.kind in kinds)


def check_call(call: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    """Raise ValueError for arguments that no pipeline can run, before any work is done.

    Checks an empty ``prompt`` list and a ``num_inference_steps`` below 1, whether given by
    name or by position; anything else is left to the pipeline. Cheap enough for every
    call: no binding, a cached look-up of the positional parameters' names.

    Raises:
        ValueError: ``prompt`` is an empty list, or ``num_inference_steps`` is an int < 1.
    """
    given: Mapping[str, Any] = kwargs
    # Positional arguments are named only where one could matter: pipe("a fox") costs nothing.
    if len(args) > 1 or (args and isinstance(args[0], list) and not args[0]):
        if isinstance(call, functools.partial) and not call.keywords:
            names = _positional_of(call.func, len(call.args))
        else:
            names = _positional_names(inspect.signature(call))
        # More positional arguments than names: the call takes *args, or they do not bind.
        given = {**dict(zip(names, args, strict=False)), **kwargs}
    prompt = given.get("prompt")
    if isinstance(prompt, list) and not prompt:
        raise ValueError(
            "prompt is an empty list: pass at least one prompt (a string, or a list of strings)"
        )
    steps = given.get("num_inference_steps")
    if isinstance(steps, int) and not isinstance(steps, bool) and steps < 1:
        raise ValueError(f"num_inference_steps must be at least 1, got {steps}")


def batch_size(kwargs: Mapping[str, Any], roles: CallRoles = FALLBACK) -> int:
    """Return how many prompts a call carries (see :func:`._per_prompt.count_prompts`)."""
    return count_prompts(kwargs, roles)


def _mismatch(name: str, got: int, want: int, what: str) -> ValueError:
    return ValueError(f"{name} has {got} items but the batch has {want} {what}: {_fix(name)}")


def _fix(name: str) -> str:
    if name == "generator":
        return "pass one generator per image (prompts x num_images_per_prompt), or a single one"
    if name == "latents":
        return "pass one latent per image (prompts x num_images_per_prompt), or none"
    if name in IMAGE_KEYS:
        return "pass one image per prompt, or a single image for all prompts"
    if name in EMBEDDING_KEYS:
        return "pass one row per prompt"
    return "pass one per prompt, or a single string for all prompts"


def _image_count(name: str, value: object) -> int | None:
    """Return how many images ``value`` holds along its batch, or None for a single image."""
    if isinstance(value, (list, tuple)):
        return len(value)
    shape = getattr(value, "shape", None)
    if shape is not None and len(shape) >= _BATCHED_NDIM.get(name, 4):
        return int(shape[0])
    return None


def _split_image(name: str, value: Any, prompts: int) -> list[Any] | None:
    """Return ``value`` cut into one image per prompt, or None to give it to every prompt."""
    count = _image_count(name, value)
    if count is None or count == 1:
        return None
    if count != prompts:
        raise _mismatch(name, count, prompts, "prompts")
    return [value[i : i + 1] for i in range(prompts)]


def _split_rows(name: str, value: Any, prompts: int) -> list[Any] | None:
    """Return an embedding cut into one row (or one list item) per prompt, or None to share.

    A wrong length is an error for the named embeddings (:data:`EMBEDDING_KEYS`); one the
    signature alone calls an embedding is given to every prompt as it is.
    """
    count = batch_rows(value)
    if count is None or count == prompts:
        return None if count is None else [value[i : i + 1] for i in range(prompts)]
    if name in EMBEDDING_KEYS:
        raise _mismatch(name, count, prompts, "prompts")
    return None


def _split_control(name: str, value: Any, prompts: int, nets: int | None) -> list[Any] | None:
    """Return several ControlNets' images cut per prompt, or None to give them to every prompt.

    As diffusers reads them: a flat list holds one entry per ControlNet (each one image for
    all prompts, or a batch cut along its first dimension); a nested list holds one list of
    the ControlNets' images per prompt (``[[p1_net1, p1_net2], [p2_net1, p2_net2]]``).
    """
    if not isinstance(value, list):
        return _split_image(name, value, prompts)
    if any(isinstance(entry, list) for entry in value):
        if len(value) == 1:
            return None
        if len(value) != prompts:
            raise _mismatch(name, len(value), prompts, "prompts")
        return [value[i : i + 1] for i in range(prompts)]
    if nets is not None and len(value) != nets:
        return None  # not one entry per ControlNet: the pipeline reports it
    per_net = [_split_image(name, entry, prompts) for entry in value]
    if all(parts is None for parts in per_net):
        return None
    return [
        [entry if parts is None else parts[i] for entry, parts in zip(value, per_net, strict=True)]
        for i in range(prompts)
    ]


def split_batch(
    kwargs: Mapping[str, Any],
    prompts: int,
    *,
    num_images_per_prompt: int = 1,
    multi_control: bool | int = False,
    roles: CallRoles = FALLBACK,
) -> list[dict[str, Any]]:
    """Return one keyword-argument dict per prompt, for a batch of ``prompts`` prompts.

    Per-prompt arguments (``roles``, from the call's signature) are cut along with the
    prompts: lists of strings, the batch dimension of embeddings and their masks (a list of
    tensors item by item), and of images (which also accept one image for all prompts), and
    per-image arguments (``latents`` and a list ``generator``), whose length is
    ``prompts * num_images_per_prompt`` and which are cut into consecutive runs of
    ``num_images_per_prompt``. Each slice keeps its container type (a one-item list, a
    one-row tensor). Everything else is given to every prompt unchanged (the same object).

    With ``multi_control`` (the number of ControlNets a pipeline holds together, or True
    when it is not known),
    the ControlNet images (``roles.control``) are read as diffusers reads them for several
    ControlNets: a flat list with one entry per ControlNet, each split on its own, or a
    nested list with one list of the ControlNets' images per prompt.

    Raises:
        ValueError: a per-prompt argument's length is neither the batch's nor, where that
            is allowed, 1; the message names both lengths. Nothing is called before this.
    """
    if prompts < 1:
        raise ValueError(f"a batch needs at least one prompt, got {prompts}")
    per_image = prompts * num_images_per_prompt
    cuts: dict[str, list[Any] | None] = {}
    for name, value in kwargs.items():
        if value is None:
            continue
        if name in roles.per_image:
            if name == "generator" and not isinstance(value, list):
                continue
            rows = len(value) if isinstance(value, list) else rows_of(value)
            if rows is not None:
                if rows != per_image:
                    what = f"images ({prompts} prompts x {num_images_per_prompt} per prompt)"
                    raise _mismatch(name, rows, per_image, what)
                k = num_images_per_prompt
                cuts[name] = [value[i * k : (i + 1) * k] for i in range(prompts)]
        elif name in roles.text:
            if isinstance(value, list):
                if len(value) != prompts:
                    raise _mismatch(name, len(value), prompts, "prompts")
                cuts[name] = [value[i : i + 1] for i in range(prompts)]
        elif name in roles.rows:
            cuts[name] = _split_rows(name, value, prompts)
        elif multi_control and name in roles.control:
            nets = None if multi_control is True else int(multi_control)
            cuts[name] = _split_control(name, value, prompts, nets)
        elif name in roles.images:
            cuts[name] = _split_image(name, value, prompts)
    items = []
    for i in range(prompts):
        item = dict(kwargs)
        for name, parts in cuts.items():
            if parts is not None:
                item[name] = parts[i]
        items.append(item)
    return items


def merge_values(values: Sequence[Any]) -> Any:
    """Return per-prompt values of one output field joined as the batched call has them.

    Lists and tuples are concatenated, arrays and tensors joined along their first
    dimension; all-None stays None; equal scalars stay one scalar, unequal ones become a list.
    """
    first = values[0]
    if all(value is None for value in values):
        return None
    if isinstance(first, list) and all(isinstance(value, list) for value in values):
        return [item for value in values for item in value]
    if isinstance(first, tuple) and all(isinstance(value, tuple) for value in values):
        return tuple(item for value in values for item in value)
    module = type(first).__module__
    if module.startswith("numpy") and getattr(first, "ndim", 0) > 0:
        import numpy as np

        return np.concatenate(list(values), axis=0)
    if module.startswith("torch") and getattr(first, "ndim", 0) > 0:
        import torch

        return torch.cat(list(values), dim=0)
    if all(value == first for value in values[1:]):
        return first
    return list(values)


def merge_outputs(outputs: Sequence[Any]) -> Any:
    """Return the per-prompt results of a looped batch merged into one batched result.

    A pipeline output (a dataclass such as ``StableDiffusionPipelineOutput``) is rebuilt as
    the same class with each field merged by :func:`merge_values`; a tuple
    (``return_dict=False``) stays a tuple of merged entries.

    Raises:
        ValueError: ``outputs`` is empty.
    """
    if not outputs:
        raise ValueError("no outputs to merge")
    first = outputs[0]
    if len(outputs) == 1:
        return first
    if isinstance(first, tuple) and not dataclasses.is_dataclass(first):
        return tuple(merge_values([output[j] for output in outputs]) for j in range(len(first)))
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        fields = {
            field.name: merge_values([getattr(output, field.name) for output in outputs])
            for field in dataclasses.fields(first)
            if field.init
        }
        return type(first)(**fields)
    if isinstance(first, dict):
        merged = {key: merge_values([output[key] for output in outputs]) for key in first}
        return merged if type(first) is dict else type(first)(merged)
    return merge_values(outputs)
