"""Applying a plan to a pipeline: move/cast, attention, VAE, and the prepared call.

:func:`prepare_pipeline` validates the options, makes the plan (:func:`mps_helpers.plan_for`)
and applies it; :func:`apply_plan` applies an existing plan (the out-of-memory retry gets it
from the prepared call, for a stricter plan); :func:`plan_of` returns the plan applied.
Loading is :mod:`mps_helpers._load`'s.

A prepared pipeline keeps its identity: its class becomes a cached subclass of the original
with the same name, qualname and module, whose ``__call__`` (same signature) goes through
:func:`mps_helpers._call.prepared_call`. ``isinstance`` checks, ``save_pretrained`` (which
writes ``type(pipe).__name__``) and ``DiffusionPipeline.from_pretrained`` keep working.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, SupportsIndex

from mps_helpers import _fit, _markers
from mps_helpers._facts import check_pipeline, denoiser_of, facts_of
from mps_helpers._markers import is_prepared_class, original_class
from mps_helpers._options import Options, option_values, validate_options
from mps_helpers._plan import make_plan, resolve_environment, resolve_probes, warn_ignored
from mps_helpers._quiet import quiet
from mps_helpers._util import module_dtype

if TYPE_CHECKING:
    import torch

    from mps_helpers._environment import Environment
    from mps_helpers._facts import Pipeline, PipelineT
    from mps_helpers._plan import Plan
    from mps_helpers._util import DeviceChoice, ProcessorChoice, Switch

__all__ = [
    "apply_plan",
    "is_prepared_class",
    "original_class",
    "plan_of",
    "prepare_pipeline",
    "prepared_class",
]

logger = logging.getLogger(__name__)

#: Processors that compute plain attention and may be swapped for the safe one.
_PLAIN_PROCESSORS = frozenset(
    {"AttnProcessor", "AttnProcessor2_0", "SlicedAttnProcessor", "SafeSlicedAttnProcessor"}
)


# ---------------------------------------------------------------------------------------
# Public API


def prepare_pipeline(
    pipe: PipelineT,
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
) -> PipelineT:
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
    options = validate_options(**option_values(locals()))
    plan = prepare_quietly(pipe, resolve_environment(env), options, warn_unfit=True)
    warn_ignored(plan)
    return pipe


def prepare_quietly(
    pipe: Any, env: Environment, options: Options, *, warn_unfit: bool = False
) -> Plan:
    """Plan and apply without warning (:func:`load_pipeline` warns once itself); return the plan.

    The plan reads the devices' memory now (the estimate's budget). ``warn_unfit`` gives the
    :class:`~mps_helpers.MemoryFitWarning` of a plan predicted not to fit, before anything
    changes (a strict caller's filter makes it an error); :func:`load_pipeline` gives it
    itself before loading a local directory.
    """
    memory = _fit.memory_inputs(pipe, live=True)
    plan = make_plan(
        facts_of(pipe), env, options, probes=resolve_probes("cached", env), memory=memory
    )
    if warn_unfit:
        _fit.warn_if_unfit(memory, plan, env)
    if plan == plan_of(pipe) and _state_matches(pipe, plan):
        logger.info("%s is already prepared with this plan: nothing to change", _name(pipe))
        return plan
    apply_plan(pipe, plan)
    return plan


def plan_of(pipe: Pipeline) -> Plan | None:
    """Return the plan applied to ``pipe`` by :func:`prepare_pipeline` (None: never prepared).

    Raises:
        TypeError: ``pipe`` is not a diffusers pipeline (the message names its type), as
            :func:`prepare_pipeline` says.
    """
    check_pipeline(pipe)
    return _markers.stored_plan(pipe)


def apply_plan(pipe: PipelineT, plan: Plan) -> PipelineT:
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

        return _call.prepared_call(
            self, functools.partial(original_call, self), args, kwargs, reapply=apply_plan
        )

    def reduce_ex(self: Any, protocol: SupportsIndex) -> Any:
        # pickle looks classes up by module and qualname, which name the original class:
        # rebuild the prepared class from the original instead.
        return (_new_prepared, (original,), self.__dict__.copy())

    namespace = {
        "__call__": call,
        "__reduce_ex__": reduce_ex,
        "__module__": original.__module__,
        "__qualname__": original.__qualname__,
        "__doc__": original.__doc__,
        **_markers.prepared_namespace(original),
    }
    return type(original)(original.__name__, (original,), namespace)


def _new_prepared(original: type) -> Any:
    """Return an empty instance of ``original``'s prepared class (used by pickle)."""
    cls: Any = prepared_class(original)
    return cls.__new__(cls)


def _attach(pipe: Pipeline, plan: Plan) -> None:
    cls = prepared_class(original_class(pipe))
    if type(pipe) is not cls:
        pipe.__class__ = cls
        logger.info("%s: calls now go through the prepared call", _name(pipe))
    _markers.set_plan(pipe, plan)


# ---------------------------------------------------------------------------------------
# Steps of applying


def _name(pipe: Pipeline) -> str:
    return type(pipe).__name__


def _modules(pipe: Pipeline) -> dict[str, Any]:
    import torch

    return {
        name: module
        for name, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
    }


def _module_device(module: torch.nn.Module) -> torch.device | None:
    for param in module.parameters():
        device: torch.device = param.device
        return device
    return None


def _is_quantized(module: object) -> bool:
    return bool(
        getattr(module, "is_quantized", False)
        or getattr(module, "is_loaded_in_8bit", False)
        or getattr(module, "is_loaded_in_4bit", False)
        or getattr(module, "hf_quantizer", None) is not None
    )


def _state_matches(pipe: Pipeline, plan: Plan) -> bool:
    # The VAE's dtype is left out on purpose: the NaN guard may have moved it to float32.
    denoiser = denoiser_of(pipe)
    if denoiser is None:
        return False
    device = _module_device(denoiser)
    return (
        device is not None and device.type == plan.device and module_dtype(denoiser) == plan.dtype
    )


def _rescue_dtypes(pipe: Pipeline, plan: Plan) -> None:
    """Cast float64/float8 weights the device cannot compute, before the move (issue 14)."""
    from mps_helpers._dtype_rescue import cast_uncomputable

    cast_uncomputable(pipe, plan)


def _move_and_cast(pipe: Pipeline, plan: Plan) -> None:
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
        current = module_dtype(module)
        if current is None or current == target:
            continue
        if _is_quantized(module):
            logger.info("%s: %s is quantized; its dtype is left as it is", _name(pipe), name)
            continue
        with quiet("empty-fp32-list"):
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

    def __call__(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: Any = None) -> Any:
        import torch

        target = module_dtype(module)
        if self.record:
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            if first is not None and first.is_floating_point():
                self.state["incoming"] = first.dtype

        def cast(value: object) -> Any:
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

    def __call__(self, module: torch.nn.Module, args: Any, output: object) -> Any:
        import torch

        incoming = self.state.get("incoming")
        if isinstance(output, torch.Tensor) and incoming is not None and output.dtype != incoming:
            return output.to(incoming)
        return None


def _bridge_vae(pipe: Pipeline, plan: Plan) -> None:
    """Install (half-precision plans) or remove the VAE's dtype-bridging hooks."""
    import torch

    vae = pipe.components.get("vae")
    if not isinstance(vae, torch.nn.Module):
        return
    handles = _markers.cast_hooks(vae)
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
        _markers.set_cast_hooks(vae, new)
        logger.info("%s: VAE inputs are cast to the VAE's dtype (%s)", _name(pipe), plan.vae_dtype)
    elif not wanted and handles is not None:
        _remove_bridge(vae)


def _pre_hook(module: torch.nn.Module, hook: _CastInputs) -> Any:
    try:
        return module.register_forward_pre_hook(hook, with_kwargs=True)
    except TypeError:  # torch 1.13: no with_kwargs
        return module.register_forward_pre_hook(hook)


def _remove_bridge(vae: object) -> None:
    for handle in _markers.pop_cast_hooks(vae) or ():
        handle.remove()


def _safe_processor_class() -> Any:
    """Return SafeSlicedAttnProcessor, or None while mps_helpers._attention is absent."""
    if importlib.util.find_spec("mps_helpers._attention") is None:
        return None
    from mps_helpers._attention import SafeSlicedAttnProcessor

    return SafeSlicedAttnProcessor


def _apply_attention(pipe: Pipeline, plan: Plan) -> None:
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
    _markers.set_saved_processors(denoiser, dict(denoiser.attn_processors))
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


def _restore_processors(pipe: Pipeline, denoiser: Any, *, quiet: bool = False) -> None:
    saved = _markers.pop_saved_processors(denoiser)
    if saved is None:
        return
    denoiser.set_attn_processor(dict(saved))
    if not quiet:
        logger.info("%s: attention processors restored (slicing off)", _name(pipe))


def _apply_vae_memory(pipe: Pipeline, plan: Plan) -> None:
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
    def take(cls, pipe: Pipeline) -> _Snapshot:
        snap = cls(cls=type(pipe), plan=_markers.attached_plan(pipe))
        for name, module in _modules(pipe).items():
            snap.placement[name] = (_module_device(module), module_dtype(module))
        vae = pipe.components.get("vae")
        if vae is not None:
            snap.vae_flags = {
                k: getattr(vae, k)
                for k in ("use_slicing", "use_tiling", "use_framewise_decoding")
                if hasattr(vae, k)
            }
            snap.bridged = _markers.cast_hooks(vae) is not None
        denoiser = denoiser_of(pipe)
        if denoiser is not None and hasattr(denoiser, "attn_processors"):
            snap.processors = dict(denoiser.attn_processors)
            snap.saved_processors = _markers.saved_processors(denoiser)
        return snap

    def restore(self, pipe: Pipeline) -> None:
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

    def _restore_class(self, pipe: Pipeline) -> None:
        if type(pipe) is not self.cls:
            pipe.__class__ = self.cls
        if self.plan is None:
            _markers.clear_plan(pipe)
        else:
            _markers.set_plan(pipe, self.plan)

    def _restore_placement(self, pipe: Pipeline) -> None:
        for name, module in _modules(pipe).items():
            device, dtype = self.placement.get(name, (None, None))
            if device is not None and _module_device(module) != device:
                module.to(device=device)
            if dtype is not None and module_dtype(module) != dtype and not _is_quantized(module):
                module.to(dtype=dtype)

    def _restore_vae(self, pipe: Pipeline) -> None:
        vae = pipe.components.get("vae")
        if vae is None:
            return
        for key, value in self.vae_flags.items():
            setattr(vae, key, value)
        if not self.bridged:
            _remove_bridge(vae)

    def _restore_attention(self, pipe: Pipeline) -> None:
        denoiser = denoiser_of(pipe)
        if denoiser is None or self.processors is None:
            return
        denoiser.set_attn_processor(dict(self.processors))
        _markers.set_saved_processors(denoiser, self.saved_processors)
