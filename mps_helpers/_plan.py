"""The plan: pure decisions about how to run a pipeline on a machine, each with its reason.

:func:`plan_for` reads an :class:`~mps_helpers.Environment` snapshot, what the pipeline is
(its denoiser, its VAE config, its weights' dtype, its default size) and the user's options,
and returns a frozen :class:`Plan`. It does no device work and never changes the pipeline;
:mod:`mps_helpers._apply` carries a plan out.

Each rule function returns ``(value, rule id, fields)``; the reason sentence is formatted
from the rule's template, the thresholds and the evidence in :mod:`mps_helpers._reasons`
(listed on the docs page ``docs/explanation/decisions.md``), so ``str(plan)`` explains
itself and ``plan.rules`` names the rule behind each decision. Rules never warn: one that
ignores an explicit option says so in ``plan.ignored``, and the public entry points warn.
Pipeline facts are :mod:`mps_helpers._facts`'; the policy of the out-of-memory retry
(:func:`stricter_plan`) is at the end of this module.
"""

from __future__ import annotations

import dataclasses
import logging
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from mps_helpers import _families
from mps_helpers._facts import PipelineFacts, facts_of
from mps_helpers._families import FAMILY_DECISIONS
from mps_helpers._options import (
    PROCESSORS,
    Options,
    option_values,
    validate_options,
)
from mps_helpers._reasons import (
    ATTENTION_BUDGET_SHARE,
    ATTENTION_CHUNK_CAP,
    ATTENTION_CHUNK_FLOOR,
    ATTENTION_LIVE_BLOCKS,
    DECODE_BYTES_PER_PIXEL_FP32,
    MPS_BF16_MACOS,
    MPS_BF16_TORCH,
    SLICING_PIXELS_THRESHOLD,
    SLICING_RAM_THRESHOLD,
    TIGHT_DECODE_SHARE,
    TILING_SIDE_THRESHOLD,
    UNKNOWN_AVAILABLE_MEMORY,
    WARMUP_TORCH_RELEASE,
    Phrase,
    reason,
    warning,
)
from mps_helpers._util import DEVICES, dtype_name, is_dtype, release, warn_at_caller

if TYPE_CHECKING:
    from collections.abc import Sequence

    import torch

    from mps_helpers._environment import Environment
    from mps_helpers._facts import Pipeline
    from mps_helpers._fit import MemoryInputs
    from mps_helpers._selftest import ProbeReport
    from mps_helpers._util import DeviceChoice, ProcessorChoice, Switch

#: What a rule returns: its value, its rule id and the fields its reason template needs.
Decided = tuple[Any, str, dict[str, object]]

__all__ = [
    "ATTENTION_BUDGET_SHARE",
    "ATTENTION_CHUNK_CAP",
    "ATTENTION_CHUNK_FLOOR",
    "ATTENTION_LIVE_BLOCKS",
    "DECISIONS",
    "DECODE_BYTES_PER_PIXEL_FP32",
    "DEVICES",
    "MEMORY_SAVERS",
    "MPS_BF16_MACOS",
    "MPS_BF16_TORCH",
    "PROCESSORS",
    "SLICING_PIXELS_THRESHOLD",
    "SLICING_RAM_THRESHOLD",
    "TIGHT_DECODE_SHARE",
    "TILING_SIDE_THRESHOLD",
    "UNKNOWN_AVAILABLE_MEMORY",
    "Plan",
    "attention_chunk_elements",
    "can_slice_attention",
    "plan_changes",
    "plan_for",
    "stricter_plan",
    "validate_options",
    "warn_ignored",
]

logger = logging.getLogger(__name__)

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
    "release_text_encoders",
    "nan_guard",
    "oom_retry",
    "memory_watch",
    *FAMILY_DECISIONS,
)
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
    #: The id of the rule behind each decision (``"attention_slicing.mps-low-ram"``; the
    #: registry is :data:`mps_helpers._reasons.RULES`); ``"asked"`` for an explicit option.
    #: A known problem or failed self-test that changed a decision names its rule here
    #: (``"attention_slicing.known-problem"``, ``"dtype.probe"``).
    rules: Mapping[str, str] = field(default_factory=dict, hash=False)
    #: Explicit options the plan could not follow, each with why (the entry points warn).
    ignored: Mapping[str, str] = field(default_factory=dict, hash=False)
    #: The notes added to a decision's reason, by rule id (``"nan_guard.note-black-images"``):
    #: rules that follow a known problem or a failed self-test without changing the decision.
    notes: Mapping[str, tuple[str, ...]] = field(default_factory=dict, hash=False)
    #: False when the denoiser cannot slice attention (transformer-based): a stricter plan
    #: then leaves ``attention_slicing`` off.
    attention_slicing_supported: bool = True
    #: Release the text encoders' weights once a call has encoded its prompts, reloading them
    #: from disk for the next call that needs them (unified memory, when the estimate says
    #: the peak needs it; see ``docs/explanation/memory.md``).
    release_text_encoders: bool = False
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
        for name in _MAPPINGS:
            object.__setattr__(self, name, types.MappingProxyType(dict(getattr(self, name))))

    def __reduce__(self) -> tuple[Any, ...]:
        # The read-only mapping views do not pickle: rebuild from plain dicts.
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in _MAPPINGS:
            fields[name] = dict(fields[name])
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

        Pass ``rules={"field": "rule id"}`` to name the rule of a change (its reason is then
        that rule's), or ``reasons={"field": "why"}`` to explain it in words; a changed
        decision without either gets the rule ``"replaced"``, whose reason names its old
        value. Turning attention slicing on with the safe processor and no
        ``attention_chunk_elements`` uses the processor's default bound.
        """
        given = dict(changes.pop("reasons", {}) or {})
        given_rules = dict(changes.pop("rules", {}) or {})
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
        reasons, rules, notes = dict(self.reasons), dict(self.rules), dict(self.notes)
        changed = [n for n, v in new.items() if n in DECISIONS and v != getattr(self, n)]
        for name in dict.fromkeys([*changed, *given_rules]):
            rules[name] = given_rules.get(name, "replaced")
            old, value = _show(getattr(self, name)), _show(new.get(name, getattr(self, name)))
            reasons[name] = reason(rules[name], {"old": old, "new": value})
            notes.pop(name, None)  # the new reason replaces the old one and its notes
        reasons.update(given)
        for name in given:
            notes.pop(name, None)
        return dataclasses.replace(self, **new, reasons=reasons, rules=rules, notes=notes)

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


#: The Plan fields that are mappings (read-only views on a plan, plain dicts in a pickle).
_MAPPINGS = ("options", "reasons", "rules", "ignored", "notes")


def _plan_from_fields(fields: dict[str, Any]) -> Plan:
    """Return a Plan from its fields (used by pickle and copy)."""
    return Plan(**fields)


def _jsonable(value: Any) -> Any:
    if is_dtype(value):
        return dtype_name(value)
    return value


def _show(value: Any) -> str:
    if is_dtype(value):
        return dtype_name(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def warn_ignored(plan: Plan) -> None:
    """Warn (UserWarning, at the caller's line) once for each option ``plan`` ignored.

    The public entry points call this once for the plan they return or apply; the rules
    themselves only record what they ignored in ``plan.ignored``.
    """
    for why in plan.ignored.values():
        warn_at_caller(why, UserWarning)


# ---------------------------------------------------------------------------------------
# The rules


def plan_for(
    pipe: Pipeline | None = None,
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
    probes: Literal["cached"] | ProbeReport | Sequence[ProbeReport] | None = "cached",
) -> Plan:
    """Return the :class:`Plan` for running ``pipe`` on a machine; pure, changes nothing.

    Each option is "auto" (the library decides, see ``docs/explanation/decisions.md``) or an
    explicit value that wins. An explicit value the pipeline cannot follow
    (``attention_slicing=True`` on a transformer denoiser) is ignored with a UserWarning and
    recorded in ``plan.ignored``.

    Args:
        pipe: a diffusers pipeline whose components inform the plan (denoiser family, VAE
            ``force_upcast``, weights' dtype, default size), or None to plan from the machine.
        env: the machine; None detects this one (:func:`mps_helpers.detect_environment`).
        height, width: the image size, a multiple of 8; None uses the pipeline's default size.
        batch_size: images decoded per call (prompts x images per prompt); None if unknown.
        device: "auto", "mps", "cuda" or "cpu".
        dtype: "auto", a torch floating dtype (float16, bfloat16, float32) or its name.
        attention_processor: "safe" (mps_helpers' chunked SDPA, default) or "diffusers".
        attention_slicing: "auto", True or False; so are ``vae_slicing``, ``vae_tiling``,
            ``warmup``, ``batch_to_loop``, ``nan_guard``, ``oom_retry`` and ``memory_watch``.
        probes: the device self-test results the plan follows (a failed probe turns on the
            workaround that covers it, see ``docs/explanation/known-problems.md``):
            "cached" (the default) reads those :func:`mps_helpers.probe_device` saved for
            this machine's torch, macOS and chip; None ignores them; or a
            :class:`~mps_helpers.ProbeReport` (or several, one per device).

    Raises:
        TypeError: ``pipe`` is not a diffusers pipeline, or ``env`` not an Environment.
        ValueError: an option is not one of its valid values (the message lists them).
        mps_helpers.DeviceUnavailableError: an explicit device that cannot be used here; its
            ``findings`` say why.
    """
    options = validate_options(**option_values(locals()))
    facts = PipelineFacts() if pipe is None else facts_of(pipe)
    machine = resolve_environment(env)
    plan = make_plan(
        facts,
        machine,
        options,
        probes=resolve_probes(probes, machine),
        memory=memory_inputs(pipe),
    )
    warn_ignored(plan)
    return plan


def resolve_probes(probes: Any, env: Environment) -> tuple[Any, ...]:
    """Return the probe reports a plan follows: ``probes`` given, or the cached ones for
    ``env`` when "cached"; TypeError for anything else."""
    from mps_helpers._selftest import ProbeReport, cached_reports

    if probes is None:
        return ()
    if isinstance(probes, str) and probes == "cached":
        return cached_reports(env)
    if isinstance(probes, ProbeReport):
        return (probes,)
    if isinstance(probes, (tuple, list)) and all(isinstance(p, ProbeReport) for p in probes):
        return tuple(probes)
    raise TypeError(
        "probes must be 'cached', None, a ProbeReport or a sequence of them, got "
        f"{type(probes).__name__}"
    )


def memory_inputs(pipe: Any, *, live: bool = False) -> MemoryInputs | None:
    """Return the memory estimate's inputs for ``pipe`` (:func:`mps_helpers._fit.memory_inputs`)."""
    from mps_helpers._fit import memory_inputs as inputs

    return inputs(pipe, live=live)


def resolve_environment(env: Environment | None) -> Environment:
    """Return ``env``, or this machine's snapshot when None; TypeError for anything else."""
    from mps_helpers._environment import Environment, detect_environment

    if env is None:
        return detect_environment()
    if not isinstance(env, Environment):
        raise TypeError(f"env must be an mps_helpers.Environment or None, got {type(env)!r}")
    return env


def make_plan(
    facts: PipelineFacts,
    env: Environment,
    options: Options,
    probes: Sequence[ProbeReport] = (),
    *,
    follow: bool = True,
    memory: MemoryInputs | None = None,
) -> Plan:
    """Return the plan for validated ``options`` (the rules; :func:`plan_for` wraps this).

    Pure: it neither warns nor logs above INFO; what it ignored is in ``plan.ignored``.
    ``probes`` are the self-test reports to follow (results only: the public entry points
    read the cache); ``follow=False`` leaves out the rules of the known problems and probes
    (``mps_helpers._problem_rules``, which re-plans with it). ``memory``
    (:class:`mps_helpers._fit.MemoryInputs`) lets the memory decisions come from the
    predicted peak against the device's budget (:func:`mps_helpers._fit.fit_plan`).
    """
    decided: dict[str, Decided] = {}
    switches = options.switches

    device = _value(decided, "device", _device(env, options.device))
    dtype = _value(decided, "dtype", _dtype(env, device, facts, options.dtype))
    # families (issue 14): float8-stored weights, known bfloat16 failures
    dtype = _value(decided, "dtype", _family_dtype(env, device, facts, options, decided))
    guarded = switches["nan_guard"] if switches["nan_guard"] is not None else _half(dtype)
    _value(decided, "vae_dtype", _vae_dtype(dtype, facts, device, guarded))

    height = options.height if options.height is not None else facts.default_height
    width = options.width if options.width is not None else facts.default_width
    size = (height, width)
    tight = _value(decided, "memory_tight", _memory_tight(env, device, dtype, size, options))
    # families (issue 14): a video clip's 3-D decode
    tight = _value(
        decided,
        "memory_tight",
        _family_memory_tight(
            env, device, facts, dtype=dtype, size=size, options=options, decided=decided
        ),
    )
    slicing = _value(
        decided,
        "attention_slicing",
        _attention_slicing(env, device, facts, size, switches["attention_slicing"]),
    )
    processor = _value(
        decided, "attention_processor", _processor(options.attention_processor, slicing)
    )
    _value(decided, "attention_chunk_elements", _chunk(env, dtype, device, slicing, processor))
    _value(decided, "vae_slicing", _vae_slicing(tight, options, switches["vae_slicing"], device))
    _value(decided, "vae_tiling", _vae_tiling(tight, size, switches["vae_tiling"]))
    _value(decided, "warmup", _warmup(env, device, switches["warmup"]))
    _value(decided, "batch_to_loop", _batch_to_loop(device, switches["batch_to_loop"]))
    _value(decided, "release_text_encoders", _release_text_encoders(device))
    _fit_memory(decided, memory, env=env, facts=facts, options=options, size=size)
    _value(decided, "nan_guard", _nan_guard(dtype, switches["nan_guard"]))
    _value(decided, "oom_retry", _oom_retry(device, switches["oom_retry"]))
    _value(decided, "memory_watch", _memory_watch(device, switches["memory_watch"]))
    # families (issue 14): family, attention bound and upcast, float64 rescue, video decode
    decided.update(
        _family_plan(
            env,
            device,
            facts,
            dtype=dtype,
            size=size,
            options=options,
            tight=decided["memory_tight"][0],
        )
    )

    ignored = {}
    for name, (_v, rule, fields) in decided.items():
        text = warning(rule, fields)
        if text is not None:
            ignored[name] = text
    plan = Plan(
        **{name: value for name, (value, _rule, _fields) in decided.items()},
        height=height,
        width=width,
        options=options.given,
        reasons={name: reason(rule, fields) for name, (_v, rule, fields) in decided.items()},
        rules={name: rule for name, (_v, rule, _fields) in decided.items()},
        ignored=ignored,
        attention_slicing_supported=facts.supports_attention_slicing is not False,
        num_frames=facts.default_num_frames,
    )
    if not follow:
        return plan
    # Known mps problems and failed self-tests adjust the plan (mps_helpers._problem_rules).
    from mps_helpers._problem_rules import follow_known_problems

    plan = follow_known_problems(
        plan,
        facts,
        env,
        options,
        probes,
        replan=lambda changed: make_plan(facts, env, changed, follow=False, memory=memory),
    )
    for name in DECISIONS:
        logger.info("plan: %s = %s: %s", name, _show(getattr(plan, name)), plan.reasons[name])
    return plan


# families (issue 14): mps_helpers._families' rules, handed what they need of the plan's --


def _family_dtype(
    env: Environment,
    device: str,
    facts: PipelineFacts,
    options: Options,
    decided: dict[str, Decided],
) -> Decided:
    return _families.family_dtype(
        device,
        facts,
        options.dtype,
        decided["dtype"],
        dtype_rule=lambda other: _dtype(env, device, other, None),
    )


def _family_memory_tight(
    env: Environment,
    device: str,
    facts: PipelineFacts,
    *,
    dtype: torch.dtype,
    size: tuple[int | None, int | None],
    options: Options,
    decided: dict[str, Decided],
) -> Decided:
    return _families.family_memory_tight(
        facts,
        dtype=dtype,
        height=size[0],
        width=size[1],
        batch=options.batch_size,
        decided=decided["memory_tight"],
        available=_device_memory(env, device),
        decode_bytes=decode_bytes,
    )


def _family_plan(
    env: Environment,
    device: str,
    facts: PipelineFacts,
    *,
    dtype: torch.dtype,
    size: tuple[int | None, int | None],
    options: Options,
    tight: bool,
) -> dict[str, Decided]:
    family = _families.family_plan(
        facts,
        env,
        device=device,
        dtype=dtype,
        height=size[0],
        width=size[1],
        batch=options.batch_size,
        tight=tight,
        switches=options.switches,
        available=_device_memory(env, device),
        chunk_elements=lambda compute: attention_chunk_elements(env, compute, device=device),
        decode_bytes=decode_bytes,
    )
    return {name: d.decided for name, d in family.decisions.items()}


def _value(decided: dict[str, Decided], name: str, result: Decided) -> Any:
    """Record a rule's result for decision ``name`` and return its value."""
    decided[name] = result
    return result[0]


def _release_text_encoders(device: str) -> Decided:
    # without an estimate; the memory rules (_fit_memory) turn it on when the peak needs it
    rule = "no-estimate" if device == "mps" else "not-mps"
    return False, f"release_text_encoders.{rule}", {}


def _fit_memory(
    decided: dict[str, Decided],
    memory: MemoryInputs | None,
    *,
    env: Environment,
    facts: PipelineFacts,
    options: Options,
    size: tuple[int | None, int | None],
) -> None:
    """Let the memory estimate (mps_helpers._fit) decide the memory measures left to "auto".

    Overrides ``memory_tight`` and the measures' values, and the rules of those the estimate
    could act on (``<decision>.estimate-*``); nothing without an estimate or an image size.
    """
    height, width = size
    if memory is None or height is None or width is None:
        return
    from mps_helpers import _fit
    from mps_helpers._memory import Settings

    switches = options.switches
    device = decided["device"][0]
    dtype = decided["dtype"][0]
    chunk = decided["attention_chunk_elements"][0]
    base = Settings(
        device=device,
        dtype=dtype_name(dtype),
        vae_dtype=dtype_name(decided["vae_dtype"][0]),
        attention_slicing=decided["attention_slicing"][0],
        attention_processor=options.attention_processor,
        attention_chunk_elements=chunk,
        batch_to_loop=decided["batch_to_loop"][0],
        # the VAE measures as the user forced them; "auto" ones are the estimate's to decide
        vae_slicing=switches["vae_slicing"] is True,
        vae_tiling=switches["vae_tiling"] is True,
        torch_version=env.torch_version,
    )
    auto = {name for name in _fit.MEASURES if switches.get(name) is None}
    fit = _fit.fit_plan(
        memory,
        env,
        base,
        height=height,
        width=width,
        batch_size=options.batch_size or 1,
        auto=auto,
        chunk_elements=chunk or attention_chunk_elements(env, dtype, device=device),
        slicing_supported=facts.supports_attention_slicing is not False,
    )
    if fit is None:
        return
    after = fit.settings
    rule, fields = fit.rules["memory_tight"]
    decided["memory_tight"] = (fit.tight, rule, fields)
    for name in _fit.MEASURES:
        old = decided[name]
        rule, fields = fit.rules.get(name, (old[1], old[2]))
        decided[name] = (getattr(after, name), rule, fields)
    if "attention_slicing" in fit.turned_on:
        decided["attention_processor"] = _processor(options.attention_processor, True)
        bound = after.attention_chunk_elements
        decided["attention_chunk_elements"] = (
            (bound, "attention_chunk_elements.estimate-bound", {"exponent": bound})
            if bound
            else (None, "attention_chunk_elements.diffusers", {})
        )
    else:
        old = decided["attention_chunk_elements"]
        decided["attention_chunk_elements"] = (after.attention_chunk_elements, old[1], old[2])


def _asked(value: Any) -> Decided:
    return value, "asked", {"value": _show(value)}


def _half(dtype: torch.dtype) -> bool:
    import torch

    return dtype != torch.float32


def _where(device: str) -> str:
    # CUDA: the snapshot knows the card's total only; mps and CPU share system RAM.
    return "GPU memory" if device == "cuda" else "available memory"


# device ------------------------------------------------------------------------------


def _device(env: Environment, asked: str) -> Decided:
    if asked == "mps" and not env.mps_available:
        _raise_unavailable(env, "mps")
    if asked == "cuda" and not env.cuda_available:
        _raise_unavailable(env, "cuda")
    if asked != "auto":
        return _asked(asked)

    from mps_helpers._environment import auto_device

    chosen = auto_device(env)
    if chosen == "mps":
        return "mps", "device.mps", {}
    fallback = chosen
    fields: dict[str, object] = {
        "fallback": Phrase(f"fallback-{fallback}", {"gpu": env.cuda_device_name or "GPU 0"}),
    }
    if env.is_rosetta:
        fields["python"] = env.python_machine or "x86_64"
        return fallback, "device.rosetta", fields
    if env.is_apple_silicon:
        rule = "device.mps-not-built" if not env.mps_built else "device.mps-unusable"
        return fallback, rule, fields
    return fallback, "device.not-apple-silicon", fields


def _raise_unavailable(env: Environment, device: str) -> None:
    from mps_helpers._checks import check_environment, cuda_findings
    from mps_helpers._errors import DeviceUnavailableError

    if device == "cuda":
        # The readiness checks are about mps: what they say (the CPU fallback included)
        # does not apply to an explicit CUDA that is not there.
        findings = cuda_findings(env)
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


def _mps_bf16(env: Environment) -> bool:
    return (
        release(env.torch_version) >= MPS_BF16_TORCH.release
        and release(env.macos_version) >= MPS_BF16_MACOS.release
    )


def _dtype(
    env: Environment, device: str, facts: PipelineFacts, asked: torch.dtype | None
) -> Decided:
    import torch

    bf16_weights = facts.weights_dtype == torch.bfloat16
    versions: dict[str, object] = {"torch": env.torch_version, "macos": env.macos_version}
    if asked is not None:
        if device == "mps" and asked == torch.bfloat16 and not _mps_bf16(env):
            raise ValueError(
                f"dtype=bfloat16 cannot run on mps here: it needs torch {MPS_BF16_TORCH}+ and "
                f"macOS {MPS_BF16_MACOS}+ (this machine: torch {env.torch_version}, macOS "
                f"{env.macos_version}); use dtype='float16'"
            )
        if device == "cpu" and asked == torch.float16:
            return asked, "dtype.asked-cpu-float16", {}
        if device == "cpu" and asked == torch.bfloat16 and not env.cpu_bf16_supported:
            return asked, "dtype.asked-cpu-bfloat16", {}
        return _asked(asked)
    if device == "mps":
        if bf16_weights and _mps_bf16(env):
            return torch.bfloat16, "dtype.mps-bfloat16-weights", versions
        if bf16_weights:
            return torch.float16, "dtype.mps-bfloat16-unsupported", versions
        return torch.float16, "dtype.mps-float16", {}
    if device == "cuda":
        if bf16_weights and env.cuda_bf16_supported:
            return torch.bfloat16, "dtype.cuda-bfloat16-weights", {}
        return torch.float16, "dtype.cuda-float16", {}
    if env.cpu_bf16_supported:
        return torch.bfloat16, "dtype.cpu-bfloat16", {}
    return torch.float32, "dtype.cpu-float32", {}


def _vae_dtype(dtype: torch.dtype, facts: PipelineFacts, device: str, guarded: bool) -> Decided:
    import torch

    if dtype != torch.float16:
        return dtype, "vae_dtype.not-float16", {}
    if facts.vae_force_upcast is None:
        return dtype, "vae_dtype.no-config", {}
    if not facts.vae_force_upcast:
        return dtype, "vae_dtype.no-force-upcast", {}
    if facts.upcasts_vae_itself:
        return dtype, "vae_dtype.pipeline-upcasts", {"pipeline": facts.class_name}
    if device == "cuda" and guarded:
        return dtype, "vae_dtype.cuda-guarded", {}
    return torch.float32, "vae_dtype.force-upcast", {}


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
    dtype: torch.dtype,
    size: tuple[int | None, int | None],
    options: Options,
) -> Decided:
    height, width = size
    ram = env.total_memory
    if device == "mps":
        if ram is None:
            return True, "memory_tight.mps-ram-unknown", {}
        if ram < SLICING_RAM_THRESHOLD:
            return True, "memory_tight.mps-low-ram", {"ram": ram}
    available = _device_memory(env, device)
    if height is None or width is None:
        if device == "mps":
            return False, "memory_tight.mps-size-unknown", {"ram": ram}
        return False, "memory_tight.size-unknown", {}
    batch = options.batch_size or 1
    need = decode_bytes(height, width, batch, dtype)
    where = _where(device)
    if available is None:
        return device == "mps", "memory_tight.memory-unknown", {"where": where, "need": need}
    share = need / available
    verdict = share > TIGHT_DECODE_SHARE
    return (
        verdict,
        "memory_tight.decode-share",
        {
            "batch": batch,
            "width": width,
            "height": height,
            "need": need,
            "share": share,
            "available": available,
            "where": where,
            "verdict": "over" if verdict else "within",
        },
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


def _chunk(
    env: Environment, dtype: torch.dtype, device: str, slicing: bool, processor: str
) -> Decided:
    if not slicing:
        return None, "attention_chunk_elements.slicing-off", {}
    if processor != "safe":
        return None, "attention_chunk_elements.diffusers", {}
    chunk = attention_chunk_elements(env, dtype, device=device)
    available = _device_memory(env, device)
    where = _where(device)
    seen = (
        Phrase("memory-unknown", {"where": where})
        if available is None
        else Phrase("memory-seen", {"available": available, "where": where})
    )
    return (
        chunk,
        "attention_chunk_elements.bound",
        {"exponent": chunk, "seen": seen, "dtype": dtype},
    )


# attention ---------------------------------------------------------------------------


def _attention_slicing(
    env: Environment,
    device: str,
    facts: PipelineFacts,
    size: tuple[int | None, int | None],
    asked: bool | None,
) -> Decided:
    height, width = size
    if facts.supports_attention_slicing is False:
        fields: dict[str, object] = {"denoiser": facts.denoiser_class}
        if asked:
            return False, "attention_slicing.ignored-unsupported", fields
        return False, "attention_slicing.unsupported", fields
    if asked is not None:
        return _asked(asked)
    if device != "mps":
        return False, f"attention_slicing.{device}", {}
    ram = env.total_memory
    if ram is None:
        return True, "attention_slicing.mps-ram-unknown", {}
    if ram < SLICING_RAM_THRESHOLD:
        return True, "attention_slicing.mps-low-ram", {"ram": ram}
    if height is not None and width is not None and height * width > SLICING_PIXELS_THRESHOLD:
        return True, "attention_slicing.mps-large-image", {"width": width, "height": height}
    shown = "unknown size" if height is None or width is None else f"{width}x{height}"
    return False, "attention_slicing.mps-roomy", {"ram": ram, "size": shown}


def _processor(processor: str, slicing: bool) -> Decided:
    return processor, f"attention_processor.{processor}{'' if slicing else '-unused'}", {}


# VAE ---------------------------------------------------------------------------------


def _vae_slicing(tight: bool, options: Options, asked: bool | None, device: str) -> Decided:
    if asked is not None:
        return _asked(asked)
    batch = options.batch_size
    if batch == 1:
        return False, "vae_slicing.single-image", {}
    if not tight:
        if device == "cuda":
            return False, "vae_slicing.cuda-not-tight", {}
        return False, "vae_slicing.not-tight", {}
    if batch is None:
        return True, "vae_slicing.tight-batch-unknown", {}
    return True, "vae_slicing.tight", {"batch": batch}


def _vae_tiling(tight: bool, size: tuple[int | None, int | None], asked: bool | None) -> Decided:
    if asked is not None:
        return _asked(asked)
    height, width = size
    if height is None or width is None:
        return False, "vae_tiling.size-unknown", {}
    fields: dict[str, object] = {"width": width, "height": height}
    if max(height, width) <= TILING_SIDE_THRESHOLD:
        return False, "vae_tiling.small", fields
    if not tight:
        return False, "vae_tiling.not-tight", fields
    return True, "vae_tiling.tight", fields


# per-call behaviour ------------------------------------------------------------------


def _warmup(env: Environment, device: str, asked: bool | None) -> Decided:
    if asked is not None:
        return _asked(asked)
    if device != "mps":
        return False, "warmup.not-mps", {}
    fields: dict[str, object] = {"torch": env.torch_version}
    if release(env.torch_version)[:2] == WARMUP_TORCH_RELEASE:
        return True, "warmup.torch-1.13", fields
    return False, "warmup.fixed-torch", fields


def _batch_to_loop(device: str, asked: bool | None) -> Decided:
    if asked is not None:
        return _asked(asked)
    return device == "mps", f"batch_to_loop.{device}", {}


def _nan_guard(dtype: torch.dtype, asked: bool | None) -> Decided:
    if asked is not None:
        return _asked(asked)
    if not _half(dtype):
        return False, "nan_guard.float32", {}
    return True, "nan_guard.half", {"dtype": dtype}


def _oom_retry(device: str, asked: bool | None) -> Decided:
    if asked is not None:
        return _asked(asked)
    return device != "cpu", f"oom_retry.{device}", {}


def _memory_watch(device: str, asked: bool | None) -> Decided:
    if asked is not None:
        return _asked(asked)
    return device == "mps", f"memory_watch.{device}", {}


# ---------------------------------------------------------------------------------------
# The stricter plan (the out-of-memory retry's policy)

#: The plan fields :func:`stricter_plan` turns on, with how the messages name them.
MEMORY_SAVERS: tuple[tuple[str, str], ...] = (
    ("attention_slicing", "attention slicing on"),
    ("vae_slicing", "VAE slicing on"),
    ("vae_tiling", "VAE tiling on"),
    ("batch_to_loop", "prompts run one at a time"),
)


def stricter_plan(plan: Plan) -> Plan | None:
    """Return ``plan`` with every memory saver on, or None when all of them already are.

    The savers are attention slicing, VAE slicing, VAE tiling and running prompts one at a
    time (``batch_to_loop``). Attention slicing is left as it is when ``plan`` says the
    denoiser cannot slice its attention (a transformer denoiser with diffusers' processor).
    """
    changes: dict[str, Any] = {}
    for name, _label in MEMORY_SAVERS:
        if getattr(plan, name):
            continue
        if name == "attention_slicing" and not can_slice_attention(plan):
            continue
        changes[name] = True
    if not changes:
        return None
    return plan.replace(**changes, rules=dict.fromkeys(changes, "stricter"))


def can_slice_attention(plan: Plan) -> bool:
    """Return whether attention slicing can work on the plan's denoiser."""
    # The plan records whether slicing can work on this denoiser; older plans that lack the
    # field are assumed to allow it (turning it on is then harmless at worst).
    return bool(getattr(plan, "attention_slicing_supported", True))


def plan_changes(old: Plan, new: Plan) -> list[str]:
    """Return how the messages name the memory savers that ``new`` turns on over ``old``."""
    return [label for name, label in MEMORY_SAVERS if getattr(new, name) and not getattr(old, name)]
