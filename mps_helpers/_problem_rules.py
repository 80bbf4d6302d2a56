"""Plan rules that follow the known mps problems and the device's self-test results.

:func:`mps_helpers._plan.make_plan` hands its plan to :func:`follow_known_problems`, which

- follows the torch ranges of the known problems (``mps_helpers._known_problems``) on mps: the
  attention processor's reason says whether diffusers' own slicing is safe on this torch
  (baddbmm-beta0-nan), attention slicing turns on where SDPA mishandles permuted or
  non-contiguous inputs (sdpa-noncontiguous-query, sdpa-permuted-batch), and the reasons of
  the decisions that guard against a problem cite it;
- applies the adjustments that failed self-tests call for (:func:`probe_adjustments`, a pure
  mapping from a :class:`~mps_helpers.ProbeReport` to plan changes), each reason naming its
  probe.

These are rules like the plan's own: each returns a rule id of
:data:`mps_helpers._reasons.PROBLEM_RULES` and its fields (the known problems are evidence
there, under their ids). A rule that changes a decision (its value, or the rule behind its
reason) replaces the decision's id in ``Plan.rules``; a note adds a sentence to the reason
and its id to ``Plan.notes``.

Everything here is pure: the reports are read from the cache by the public entry points
(:func:`mps_helpers.plan_for`, :func:`mps_helpers.prepare_pipeline`), never by the rules. An
explicit option always wins; where it keeps a workaround off, the reason says so.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from mps_helpers._known_problems import known_problems
from mps_helpers._reasons import ATTENTION_CHUNK_FLOOR, PROBE_BLOCK_MARGIN, Phrase, phrase, reason

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from mps_helpers._environment import Environment
    from mps_helpers._facts import PipelineFacts
    from mps_helpers._options import Options
    from mps_helpers._plan import Plan
    from mps_helpers._selftest import ProbeReport, ProbeResult

__all__ = [
    "FOLLOWED_PROBLEMS",
    "LAYOUT_PROBLEMS",
    "SIZE_PROBLEMS",
    "Adjustment",
    "follow_known_problems",
    "probe_adjustments",
]

#: Known problems in SDPA's handling of permuted / non-contiguous inputs: on mps the safe
#: processor hands SDPA contiguous blocks, so slicing turns on where they apply.
LAYOUT_PROBLEMS: Final = ("sdpa-noncontiguous-query", "sdpa-permuted-batch")
#: Known problems the attention chunk bound guards against.
SIZE_PROBLEMS: Final = ("sdpa-large-scores", "bmm-large-output")
#: Every known problem a rule here follows (the others are reported by doctor only).
FOLLOWED_PROBLEMS: Final = (
    "baddbmm-beta0-nan",
    *LAYOUT_PROBLEMS,
    *SIZE_PROBLEMS,
    "black-images-m3ultra-m5",
)

_UNUSED: Final = Phrase("unused-slicing-off")
_USED: Final = Phrase("unused-no")


@dataclass(frozen=True)
class Adjustment:
    """One change a failed self-test asks of the plan."""

    #: The probe that failed.
    probe: str
    #: The decision it changes: "attention_processor", "attention_slicing",
    #: "attention_chunk_elements", "dtype", or "device" (a note only: no workaround).
    decision: str
    #: The value it asks for ("safe", True, a block bound, "float32"); None for a note.
    value: Any
    #: Why, naming the probe (a phrase of :data:`mps_helpers._reasons.PHRASES`); it becomes
    #: one of the ``causes`` of the decision's rule.
    why: Phrase

    @property
    def reason(self) -> str:
        """The ``why`` as a sentence part."""
        return phrase(self.why)


def _what(result: ProbeResult, device: str) -> Phrase:
    fields: dict[str, object] = {"name": result.name, "device": device, "dtype": result.dtype}
    if result.status == "error":
        return Phrase(
            "probe-raised", {"name": result.name, "device": device, "message": result.message}
        )
    if result.error is None or result.error == float("inf"):
        return Phrase("probe-nonfinite", fields)
    return Phrase("probe-wrong", {**fields, "error": result.error})


def _block_bound(elements: int) -> int:
    """Return a power of two PROBE_BLOCK_MARGIN times (or more) below ``elements``, at least
    the plan's floor (2**20)."""
    if elements < 1:
        return ATTENTION_CHUNK_FLOOR
    shift = PROBE_BLOCK_MARGIN.bit_length() - 1
    return max(ATTENTION_CHUNK_FLOOR, 1 << max(0, elements.bit_length() - 1 - shift))


def probe_adjustments(report: ProbeReport) -> tuple[Adjustment, ...]:
    """Return the plan adjustments that the failed probes of ``report`` call for.

    Pure: the same report always gives the same adjustments.

    ================================ ==========================================================
    failed probe                     adjustment
    ================================ ==========================================================
    baddbmm_beta0                    attention_processor "safe" (never calls baddbmm)
    sdpa_noncontiguous,              attention_slicing on (mps: the safe processor hands SDPA
    sdpa_permuted                    contiguous blocks)
    sdpa_long, bmm_large             attention_slicing on, attention_chunk_elements 4x below
                                     the size that failed
    group_norm_half, upsample_half,  dtype float32
    softmax_half
    conv2d_noncontiguous_weight,     none automatic: a note on the device decision
    conv3d
    ================================ ==========================================================
    """
    out: list[Adjustment] = []
    for result in report.failed:
        what = {"what": _what(result, report.device)}
        name = result.name
        if name == "baddbmm_beta0":
            out.append(
                Adjustment(name, "attention_processor", "safe", Phrase("probe-baddbmm", what))
            )
        elif name in ("sdpa_noncontiguous", "sdpa_permuted"):
            out.append(Adjustment(name, "attention_slicing", True, Phrase("probe-layout", what)))
        elif name in ("sdpa_long", "bmm_large"):
            bound = _block_bound(result.elements)
            out.append(Adjustment(name, "attention_slicing", True, Phrase("probe-size", what)))
            sized = {**what, "elements": max(result.elements, 1), "bound": bound}
            out.append(
                Adjustment(
                    name, "attention_chunk_elements", bound, Phrase("probe-size-bound", sized)
                )
            )
        elif name in ("group_norm_half", "upsample_half", "softmax_half"):
            out.append(Adjustment(name, "dtype", "float32", Phrase("probe-half", what)))
        else:
            out.append(Adjustment(name, "device", None, Phrase("probe-none", what)))
    return tuple(out)


@dataclass
class _Followed:
    """What the rules here decided: changed rules and notes, each with its fields."""

    rules: dict[str, tuple[str, dict[str, object]]] = dataclasses.field(default_factory=dict)
    notes: dict[str, list[tuple[str, dict[str, object]]]] = dataclasses.field(default_factory=dict)

    def note(self, decision: str, rule: str, fields: dict[str, object]) -> None:
        self.notes.setdefault(decision, []).append((rule, fields))


def follow_known_problems(
    plan: Plan,
    facts: PipelineFacts,
    env: Environment,
    options: Options,
    reports: Sequence[ProbeReport] = (),
    *,
    replan: Callable[[Options], Plan],
) -> Plan:
    """Return ``plan`` following the known problems of ``env`` and the failed probes of the
    report for the plan's device (if ``reports`` has one).

    ``replan`` makes the plan's own rules' plan for changed options (``make_plan`` without
    this step), for the decisions a problem turns on.
    """
    import torch

    on_mps = plan.device == "mps"
    problems = {p.id for p in known_problems(env)} if on_mps else set()
    report = next((r for r in reports if r.device == plan.device), None)
    adjustments = probe_adjustments(report) if report is not None else ()
    torch_fields: dict[str, object] = {"torch": env.torch_version}

    switches = dict(options.switches)
    dtype = options.dtype
    # decision -> the causes (phrases) of a change made here
    forced: dict[str, list[Phrase]] = {}
    slicing_notes: dict[str, list[Phrase]] = {}
    dtype_notes: dict[str, list[Phrase]] = {}
    chunk_causes: list[Phrase] = []
    device_causes: list[Phrase] = []
    processor_causes: list[Phrase] = []
    bound: int | None = None

    def slicing_on(why: Phrase) -> None:
        if not plan.attention_slicing_supported:
            slicing_notes.setdefault("attention_slicing.note-cannot-slice", []).append(why)
        elif switches["attention_slicing"] is False:
            slicing_notes.setdefault("attention_slicing.note-kept-off", []).append(why)
        elif plan.attention_slicing and "attention_slicing" not in forced:
            slicing_notes.setdefault("attention_slicing.note-on-anyway", []).append(why)
        else:
            switches["attention_slicing"] = True
            forced.setdefault("attention_slicing", []).append(why)

    # Known problems by range (mps only).
    for problem_id in LAYOUT_PROBLEMS:
        if problem_id in problems:
            slicing_on(Phrase(f"known-{problem_id}", torch_fields))

    # Failed self-tests.
    for adj in adjustments:
        if adj.decision == "attention_slicing":
            if adj.probe in ("sdpa_noncontiguous", "sdpa_permuted") and not on_mps:
                device_causes.append(Phrase("probe-layout-off-mps", adj.why.fields))
                continue
            slicing_on(adj.why)
        elif adj.decision == "attention_chunk_elements":
            bound = adj.value if bound is None else min(bound, adj.value)
            chunk_causes.append(adj.why)
        elif adj.decision == "dtype":
            if dtype is None and plan.dtype == torch.float16:
                dtype = torch.float32
                forced.setdefault("dtype", []).append(adj.why)
            elif plan.dtype == torch.float16:
                dtype_notes.setdefault("dtype.note-kept-asked", []).append(adj.why)
            else:
                dtype_notes.setdefault("dtype.note-not-float16", []).append(adj.why)
        elif adj.decision == "attention_processor":
            processor_causes.append(adj.why)
        else:
            device_causes.append(adj.why)

    if forced:
        plan = replan(dataclasses.replace(options, switches=switches, dtype=dtype))

    done = _Followed()
    if "attention_slicing" in forced:
        causes = tuple(forced["attention_slicing"])
        kind = "known-problem" if any(c.id.startswith("known-") for c in causes) else "probe"
        done.rules["attention_slicing"] = (f"attention_slicing.{kind}", {"causes": causes})
    if "dtype" in forced:
        done.rules["dtype"] = ("dtype.probe", {"causes": tuple(forced["dtype"])})
    for rule, whys in {**slicing_notes, **dtype_notes}.items():
        done.note(rule.split(".")[0], rule, {"causes": tuple(whys)})
    if device_causes:
        done.note("device", "device.note-probes", {"causes": tuple(device_causes)})

    if bound is not None and plan.attention_chunk_elements is not None:
        smaller = min(plan.attention_chunk_elements, bound)
        plan = plan.replace(attention_chunk_elements=smaller)
        done.rules["attention_chunk_elements"] = (
            "attention_chunk_elements.probe-bound",
            {"exponent": smaller, "causes": tuple(chunk_causes)},
        )
    elif chunk_causes:
        done.note(
            "attention_chunk_elements",
            "attention_chunk_elements.note-probe-unused",
            {"causes": tuple(chunk_causes)},
        )

    if on_mps:
        done.rules["attention_processor"] = _processor_rule(plan, env, problems, processor_causes)
        if plan.attention_chunk_elements is not None:
            if all(p in problems for p in SIZE_PROBLEMS):
                done.note(
                    "attention_chunk_elements", "attention_chunk_elements.note-large-products", {}
                )
            elif "sdpa-large-scores" in problems:
                done.note(
                    "attention_chunk_elements", "attention_chunk_elements.note-large-scores", {}
                )
        if "black-images-m3ultra-m5" in problems:
            rule = "nan_guard.note-black-images" + ("" if plan.nan_guard else "-off")
            done.note("nan_guard", rule, {"chip": env.chip})
    elif processor_causes:
        done.note(
            "attention_processor",
            "attention_processor.note-probe",
            {"causes": tuple(processor_causes)},
        )
    return _with(plan, done)


def _processor_rule(
    plan: Plan, env: Environment, problems: set[str], probe_causes: list[Phrase]
) -> tuple[str, dict[str, object]]:
    """Return the attention processor's rule on mps, following baddbmm-beta0-nan's range."""
    fields: dict[str, object] = {
        "torch": env.torch_version,
        "unused": _USED if plan.attention_slicing else _UNUSED,
    }
    processor = plan.attention_processor
    if probe_causes:
        return f"attention_processor.{processor}-probe", {**fields, "causes": tuple(probe_causes)}
    if "baddbmm-beta0-nan" in problems:
        return f"attention_processor.{processor}-known-problem", fields
    return f"attention_processor.{processor}-past-fix", fields


def _with(plan: Plan, done: _Followed) -> Plan:
    """Return ``plan`` with the rules and notes of ``done`` (their reasons formatted)."""
    if not done.rules and not done.notes:
        return plan
    reasons, rules = dict(plan.reasons), dict(plan.rules)
    notes = {name: list(ids) for name, ids in plan.notes.items()}
    for decision, (rule, fields) in done.rules.items():
        rules[decision] = rule
        reasons[decision] = reason(rule, fields)
    for decision, added in done.notes.items():
        texts = [reason(rule, fields) for rule, fields in added]
        reasons[decision] = _append(reasons[decision], texts)
        notes[decision] = [*notes.get(decision, []), *(rule for rule, _fields in added)]
    return dataclasses.replace(
        plan,
        reasons=reasons,
        rules=rules,
        notes={name: tuple(ids) for name, ids in notes.items()},
    )


def _append(text: str, sentences: Sequence[str]) -> str:
    base = text.rstrip()
    base = base if base.endswith(".") else base + "."
    return base + "".join(f" {t[0].upper()}{t[1:]}" for t in sentences)
