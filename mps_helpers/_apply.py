"""Applying a plan to a pipeline: move/cast, attention, VAE, and the prepared call.

:func:`prepare_pipeline` validates the options, makes the plan (:func:`mps_helpers.plan_for`)
and applies it; :func:`apply_plan` applies an existing plan (the out-of-memory retry uses it
for a stricter one); :func:`load_pipeline` decides the dtype before loading, then prepares.

A prepared pipeline keeps its identity: its class becomes a cached subclass of the original
with the same name, qualname and module, whose ``__call__`` (same signature) goes through
:func:`mps_helpers._call.prepared_call`. ``isinstance`` checks, ``save_pretrained`` (which
writes ``type(pipe).__name__``) and ``DiffusionPipeline.from_pretrained`` keep working.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from packaging.version import InvalidVersion, Version

from mps_helpers._families import family_facts_of_directory
from mps_helpers._plan import (
    PipelineFacts,
    check_pipeline,
    denoiser_of,
    facts_of,
    make_plan,
    resolve_environment,
    size_from,
    unprepared_class,
    upcasts_vae_itself,
    validate_options,
)

if TYPE_CHECKING:
    import torch

    from mps_helpers._environment import Environment
    from mps_helpers._plan import Plan

__all__ = [
    "apply_plan",
    "load_pipeline",
    "original_class",
    "plan_of",
    "prepare_pipeline",
]

logger = logging.getLogger(__name__)

#: Instance attribute that holds the applied plan (read by the prepared call and the guards).
PLAN_ATTR = "_mps_helpers_plan"
#: Class attribute of a prepared class naming its original.
_ORIGINAL_ATTR = "_mps_helpers_original"
#: Denoiser attribute: the attention processors in place before this library replaced them.
_SAVED_PROCESSORS_ATTR = "_mps_helpers_saved_processors"
#: VAE attribute: the handles of the dtype-bridging hooks.
_CAST_HOOKS_ATTR = "_mps_helpers_cast_hooks"
#: Processors that compute plain attention and may be swapped for the safe one.
_PLAIN_PROCESSORS = frozenset(
    {"AttnProcessor", "AttnProcessor2_0", "SlicedAttnProcessor", "SafeSlicedAttnProcessor"}
)
#: diffusers accepts ``dtype=`` in ``from_pretrained`` from 0.40 (read from the 0.39 and 0.40
#: wheels); older releases know only ``torch_dtype=``.
DTYPE_KEYWORD_SINCE = Version("0.40")
#: Per-component dtype dicts (``{"default": ..., "vae": ...}``) from diffusers 0.33.
DTYPE_DICT_SINCE = Version("0.33")


# ---------------------------------------------------------------------------------------
# Public API


def prepare_pipeline(
    pipe: Any,
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
) -> Any:
    """Apply the plan for this machine to ``pipe`` and return the same object, prepared.

    The options are those of :func:`mps_helpers.plan_for` ("auto" or an explicit value).
    Preparing again with the same options changes nothing; with other options the new plan
    replaces the earlier one. :func:`plan_of` returns the plan applied.

    Example::

        pipe = mps_helpers.prepare_pipeline(pipe)          # decide everything
        pipe = mps_helpers.prepare_pipeline(pipe, device="cpu", attention_slicing=True)

    Raises:
        TypeError: ``pipe`` is not a diffusers pipeline (the message names its type).
        ValueError: an option is not one of its valid values; raised before anything changes.
        mps_helpers.DeviceUnavailableError: an explicit device that cannot be used here.
    """
    check_pipeline(pipe)
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
    plan = make_plan(facts_of(pipe), resolve_environment(env), options)
    if plan == plan_of(pipe) and _state_matches(pipe, plan):
        logger.info("%s is already prepared with this plan: nothing to change", _name(pipe))
        return pipe
    return apply_plan(pipe, plan)


def plan_of(pipe: Any) -> Plan | None:
    """Return the plan applied to ``pipe`` by :func:`prepare_pipeline` (None: never prepared)."""
    state = getattr(pipe, "__dict__", None)
    if not isinstance(state, dict) or not is_prepared_class(type(pipe)):
        return None
    plan: Plan | None = state.get(PLAN_ATTR)
    return plan


def original_class(pipe: Any) -> type:
    """Return the class ``pipe`` had before it was prepared (its class if it never was)."""
    return unprepared_class(type(pipe))


def is_prepared_class(cls: type) -> bool:
    """Return True for a class made by :func:`prepared_class`."""
    return _ORIGINAL_ATTR in cls.__dict__


def apply_plan(pipe: Any, plan: Plan) -> Any:
    """Apply an existing ``plan`` to ``pipe`` and return the same object.

    Moves and casts the components, bridges a float32 VAE, installs or removes attention
    slicing, sets VAE slicing and tiling, and attaches the prepared call. If a step fails,
    the pipeline is put back as it was (best effort) and the error re-raised.

    Raises:
        TypeError: ``pipe`` is not a diffusers pipeline.
    """
    check_pipeline(pipe)
    snapshot = _Snapshot.take(pipe)
    try:
        _rescue_dtypes(pipe, plan)
        _move_and_cast(pipe, plan)
        _bridge_vae(pipe, plan)
        _apply_attention(pipe, plan)
        _apply_vae_memory(pipe, plan)
        _attach(pipe, plan)
    except BaseException:
        logger.warning("applying the plan to %s failed: restoring its earlier state", _name(pipe))
        snapshot.restore(pipe)
        raise
    return pipe


# ---------------------------------------------------------------------------------------
# The prepared class


@functools.cache
def prepared_class(original: type) -> type:
    """Return the prepared subclass of ``original`` (one per class, cached).

    It has the same ``__name__``, ``__qualname__`` and ``__module__`` as ``original``, so
    ``save_pretrained`` records the original class and ``from_pretrained`` loads it; its
    ``__call__`` has the original's signature and runs the prepared call.
    """
    original_call = original.__call__

    @functools.wraps(original_call)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        from mps_helpers import _call

        return _call.prepared_call(self, functools.partial(original_call, self), args, kwargs)

    def reduce_ex(self: Any, protocol: Any) -> Any:
        # pickle looks classes up by module and qualname, which name the original class:
        # rebuild the prepared class from the original instead.
        return (_new_prepared, (original,), self.__dict__.copy())

    namespace = {
        "__call__": call,
        "__reduce_ex__": reduce_ex,
        "__module__": original.__module__,
        "__qualname__": original.__qualname__,
        "__doc__": original.__doc__,
        _ORIGINAL_ATTR: original,
    }
    return type(original)(original.__name__, (original,), namespace)


def _new_prepared(original: type) -> Any:
    """Return an empty instance of ``original``'s prepared class (used by pickle)."""
    cls: Any = prepared_class(original)
    return cls.__new__(cls)


def _attach(pipe: Any, plan: Plan) -> None:
    cls = prepared_class(original_class(pipe))
    if type(pipe) is not cls:
        pipe.__class__ = cls
        logger.info("%s: calls now go through the prepared call", _name(pipe))
    pipe.__dict__[PLAN_ATTR] = plan


# ---------------------------------------------------------------------------------------
# Steps of applying


def _name(pipe: Any) -> str:
    return type(pipe).__name__


def _modules(pipe: Any) -> dict[str, Any]:
    import torch

    return {
        name: module
        for name, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
    }


def _module_dtype(module: Any) -> torch.dtype | None:
    for param in module.parameters():
        if param.is_floating_point():
            dtype: torch.dtype = param.dtype
            return dtype
    return None


def _module_device(module: Any) -> torch.device | None:
    for param in module.parameters():
        device: torch.device = param.device
        return device
    return None


def _is_quantized(module: Any) -> bool:
    return bool(
        getattr(module, "is_quantized", False)
        or getattr(module, "is_loaded_in_8bit", False)
        or getattr(module, "is_loaded_in_4bit", False)
        or getattr(module, "hf_quantizer", None) is not None
    )


def _state_matches(pipe: Any, plan: Plan) -> bool:
    # The VAE's dtype is left out on purpose: the NaN guard may have moved it to float32.
    denoiser = denoiser_of(pipe)
    if denoiser is None:
        return False
    device = _module_device(denoiser)
    return (
        device is not None and device.type == plan.device and _module_dtype(denoiser) == plan.dtype
    )


def _rescue_dtypes(pipe: Any, plan: Plan) -> None:
    """Cast float64/float8 weights the device cannot compute, before the move (issue 14)."""
    from mps_helpers._dtype_rescue import cast_uncomputable

    cast_uncomputable(pipe, plan)


def _move_and_cast(pipe: Any, plan: Plan) -> None:
    # Device through diffusers (it knows offloading and quantized models), dtype per
    # component: a pipeline-wide cast would take a float32 VAE through float16 and back.
    if any(
        (d := _module_device(m)) is not None and d.type != plan.device
        for m in _modules(pipe).values()
    ):
        pipe.to(plan.device)
        logger.info("%s: moved to %s", _name(pipe), plan.device)
    for name, module in _modules(pipe).items():
        target = plan.vae_dtype if name == "vae" else plan.dtype
        current = _module_dtype(module)
        if current is None or current == target:
            continue
        if _is_quantized(module):
            logger.info("%s: %s is quantized; its dtype is left as it is", _name(pipe), name)
            continue
        module.to(dtype=target)
        logger.info("%s: %s cast from %s to %s", _name(pipe), name, current, target)


class _CastInputs:
    """Forward pre-hook: cast floating tensor inputs to the module's own dtype.

    Bridges a float32 VAE inside a float16 pipeline: Stable Diffusion 1.x/2.x and SD3
    pipelines hand the VAE latents (or images) in the pipeline's dtype and do not cast them.
    ``record`` (the encoder's hook) also remembers the dtype that came in, for :class:`_CastOutput`.
    """

    def __init__(self, state: dict[str, Any], *, record: bool = False) -> None:
        self.state = state
        self.record = record

    def __call__(self, module: Any, args: tuple[Any, ...], kwargs: Any = None) -> Any:
        import torch

        target = _module_dtype(module)
        if self.record:
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            if first is not None and first.is_floating_point():
                self.state["incoming"] = first.dtype

        def cast(value: Any) -> Any:
            if (
                target is not None
                and isinstance(value, torch.Tensor)
                and value.is_floating_point()
                and value.dtype != target
            ):
                return value.to(target)
            return value

        new_args = tuple(cast(a) for a in args)
        if kwargs is None:  # torch without with_kwargs hooks (1.13)
            return new_args
        return new_args, {k: cast(v) for k, v in kwargs.items()}


class _CastOutput:
    """Forward hook: cast the encoder's output back to the dtype the pipeline passed in."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def __call__(self, module: Any, args: Any, output: Any) -> Any:
        import torch

        incoming = self.state.get("incoming")
        if isinstance(output, torch.Tensor) and incoming is not None and output.dtype != incoming:
            return output.to(incoming)
        return None


def _bridge_vae(pipe: Any, plan: Plan) -> None:
    """Install (half-precision plans) or remove the VAE's dtype-bridging hooks."""
    import torch

    vae = pipe.components.get("vae")
    if not isinstance(vae, torch.nn.Module):
        return
    handles = vae.__dict__.get(_CAST_HOOKS_ATTR)
    # Installed for every half-precision plan, not only a float32 VAE: the NaN guard may
    # upcast the VAE later, and the hooks are free when the dtypes already match.
    wanted = plan.dtype != torch.float32
    if wanted and handles is None:
        state: dict[str, Any] = {}
        new: list[Any] = []
        encode_end = None
        for child in ("encoder", "quant_conv", "decoder", "post_quant_conv"):
            module = getattr(vae, child, None)
            if not isinstance(module, torch.nn.Module):
                continue
            new.append(_pre_hook(module, _CastInputs(state, record=child == "encoder")))
            if child in ("encoder", "quant_conv"):
                encode_end = module
        if encode_end is not None:
            new.append(encode_end.register_forward_hook(_CastOutput(state)))
        vae.__dict__[_CAST_HOOKS_ATTR] = new
        logger.info("%s: VAE inputs are cast to the VAE's dtype (%s)", _name(pipe), plan.vae_dtype)
    elif not wanted and handles is not None:
        _remove_bridge(vae)


def _pre_hook(module: Any, hook: _CastInputs) -> Any:
    try:
        return module.register_forward_pre_hook(hook, with_kwargs=True)
    except TypeError:  # torch 1.13: no with_kwargs
        return module.register_forward_pre_hook(hook)


def _remove_bridge(vae: Any) -> None:
    for handle in vae.__dict__.pop(_CAST_HOOKS_ATTR, None) or ():
        handle.remove()


def _safe_processor_class() -> Any:
    """Return SafeSlicedAttnProcessor, or None while mps_helpers._attention is absent."""
    if importlib.util.find_spec("mps_helpers._attention") is None:
        return None
    from mps_helpers._attention import SafeSlicedAttnProcessor

    return SafeSlicedAttnProcessor


def _apply_attention(pipe: Any, plan: Plan) -> None:
    denoiser = denoiser_of(pipe)
    if denoiser is None or not hasattr(denoiser, "set_attention_slice"):
        if plan.attention_slicing:
            logger.info("%s: its denoiser cannot slice attention; left as it is", _name(pipe))
        return
    if not plan.attention_slicing:
        _restore_processors(pipe, denoiser)
        return
    safe = _safe_processor_class() if plan.attention_processor == "safe" else None
    if plan.attention_processor == "safe" and safe is None:
        logger.info("%s: mps_helpers._attention is missing: diffusers' slicing", _name(pipe))
    if not hasattr(denoiser, "set_attn_processor"):  # processors cannot be swapped one by one
        safe = None
    _restore_processors(pipe, denoiser, quiet=True)
    denoiser.__dict__[_SAVED_PROCESSORS_ATTR] = dict(denoiser.attn_processors)
    if safe is None:
        denoiser.set_attention_slice("auto")
        logger.info("%s: diffusers' attention slicing on", _name(pipe))
        return
    processor = safe(chunk_elements=plan.attention_chunk_elements)
    current = denoiser.attn_processors
    mapping = {
        key: processor if type(proc).__name__ in _PLAIN_PROCESSORS else proc
        for key, proc in current.items()
    }
    kept = sum(1 for proc in mapping.values() if proc is not processor)
    # set_attn_processor pops the entries of the dict it is given: hand it a copy.
    denoiser.set_attn_processor(dict(mapping))
    logger.info(
        "%s: %r on %d attention layers%s",
        _name(pipe),
        processor,
        len(mapping) - kept,
        f" ({kept} custom processors kept)" if kept else "",
    )


def _restore_processors(pipe: Any, denoiser: Any, *, quiet: bool = False) -> None:
    saved = denoiser.__dict__.pop(_SAVED_PROCESSORS_ATTR, None)
    if saved is None:
        return
    denoiser.set_attn_processor(dict(saved))
    if not quiet:
        logger.info("%s: attention processors restored (slicing off)", _name(pipe))


def _apply_vae_memory(pipe: Any, plan: Plan) -> None:
    # On the VAE itself: the pipeline-level enable_vae_slicing/tiling are gone after 0.39.
    vae = pipe.components.get("vae")
    if vae is None:
        return
    for flag, wanted in (("slicing", plan.vae_slicing), ("tiling", plan.vae_tiling)):
        method = getattr(vae, f"{'enable' if wanted else 'disable'}_{flag}", None)
        if method is None:
            if wanted:
                logger.info("%s: its VAE has no %s; left as it is", _name(pipe), flag)
            continue
        if bool(getattr(vae, f"use_{flag}", not wanted)) != wanted:
            method()
            logger.info("%s: VAE %s %s", _name(pipe), flag, "on" if wanted else "off")
    from mps_helpers._video import set_framewise_decoding

    # A 3-D VAE tiles by frames too, where it can (video plans).
    set_framewise_decoding(vae, plan.vae_tiling and getattr(plan, "num_frames", None) is not None)


# ---------------------------------------------------------------------------------------
# Undo on failure


@dataclass
class _Snapshot:
    """What applying a plan may change, to put back if a step fails."""

    cls: type
    plan: Any
    placement: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    vae_flags: dict[str, Any] = field(default_factory=dict)
    processors: dict[str, Any] | None = None
    saved_processors: Any = None
    bridged: bool = False

    @classmethod
    def take(cls, pipe: Any) -> _Snapshot:
        snap = cls(cls=type(pipe), plan=pipe.__dict__.get(PLAN_ATTR))
        for name, module in _modules(pipe).items():
            snap.placement[name] = (_module_device(module), _module_dtype(module))
        vae = pipe.components.get("vae")
        if vae is not None:
            snap.vae_flags = {
                k: getattr(vae, k)
                for k in ("use_slicing", "use_tiling", "use_framewise_decoding")
                if hasattr(vae, k)
            }
            snap.bridged = _CAST_HOOKS_ATTR in getattr(vae, "__dict__", {})
        denoiser = denoiser_of(pipe)
        if denoiser is not None and hasattr(denoiser, "attn_processors"):
            snap.processors = dict(denoiser.attn_processors)
            snap.saved_processors = denoiser.__dict__.get(_SAVED_PROCESSORS_ATTR)
        return snap

    def restore(self, pipe: Any) -> None:
        """Put ``pipe`` back as it was when the snapshot was taken (best effort)."""
        steps = (
            self._restore_class,
            self._restore_placement,
            self._restore_vae,
            self._restore_attention,
        )
        for step in steps:
            try:
                step(pipe)
            except Exception:  # keep undoing the other steps
                logger.exception("could not undo a step of applying the plan to %s", _name(pipe))

    def _restore_class(self, pipe: Any) -> None:
        if type(pipe) is not self.cls:
            pipe.__class__ = self.cls
        if self.plan is None:
            pipe.__dict__.pop(PLAN_ATTR, None)
        else:
            pipe.__dict__[PLAN_ATTR] = self.plan

    def _restore_placement(self, pipe: Any) -> None:
        for name, module in _modules(pipe).items():
            device, dtype = self.placement.get(name, (None, None))
            if device is not None and _module_device(module) != device:
                module.to(device=device)
            if dtype is not None and _module_dtype(module) != dtype and not _is_quantized(module):
                module.to(dtype=dtype)

    def _restore_vae(self, pipe: Any) -> None:
        vae = pipe.components.get("vae")
        if vae is None:
            return
        for key, value in self.vae_flags.items():
            setattr(vae, key, value)
        if not self.bridged:
            _remove_bridge(vae)

    def _restore_attention(self, pipe: Any) -> None:
        denoiser = denoiser_of(pipe)
        if denoiser is None or self.processors is None:
            return
        denoiser.set_attn_processor(dict(self.processors))
        if self.saved_processors is None:
            denoiser.__dict__.pop(_SAVED_PROCESSORS_ATTR, None)
        else:
            denoiser.__dict__[_SAVED_PROCESSORS_ATTR] = self.saved_processors


# ---------------------------------------------------------------------------------------
# Loading with the plan

_PLAN_OPTION_DEFAULTS: dict[str, Any] = {
    "height": None,
    "width": None,
    "batch_size": None,
    "device": "auto",
    "dtype": "auto",
    "attention_slicing": "auto",
    "attention_processor": "safe",
    "vae_slicing": "auto",
    "vae_tiling": "auto",
    "warmup": "auto",
    "batch_to_loop": "auto",
    "nan_guard": "auto",
    "oom_retry": "auto",
    "memory_watch": "auto",
}


def load_pipeline(
    model_or_path: str | os.PathLike[str],
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
    options: dict[str, Any] = {
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
    kwargs = dict(from_pretrained_kwargs)
    kwargs = _safe_kwargs(kwargs, env)
    options["dtype"] = _dtype_option(options["dtype"], kwargs.pop("torch_dtype", None))
    validated = validate_options(**options)
    machine = resolve_environment(env)

    local = Path(os.fspath(model_or_path))
    facts = facts_of_directory(local) if local.is_dir() else PipelineFacts()
    plan = make_plan(facts, machine, validated)

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
    return prepare_pipeline(pipe, env=machine, **options)


def _safe_kwargs(kwargs: dict[str, Any], env: Environment | None) -> dict[str, Any]:
    """Drop a ``device_map`` to mps that is unsafe with this torch (issue 14)."""
    from mps_helpers._load_safety import safe_load_kwargs

    return safe_load_kwargs(kwargs, resolve_environment(env))


def _show_kwarg(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show_kwarg(v)}" for k, v in value.items()) + "}"
    return str(value).removeprefix("torch.")


def _dtype_option(dtype: Any, torch_dtype: Any) -> Any:
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
            if not 0 < size < 100 * 2**20:
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
