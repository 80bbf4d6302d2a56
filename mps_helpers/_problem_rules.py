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

Everything here is pure: the reports are read from the cache by the public entry points
(:func:`mps_helpers.plan_for`, :func:`mps_helpers.prepare_pipeline`), never by the rules. An
explicit option always wins; where it keeps a workaround off, the reason says so.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from mps_helpers._known_problems import get_problem, known_problems

if TYPE_CHECKING:
    from collections.abc import Sequence

    from mps_helpers._environment import Environment
    from mps_helpers._plan import PipelineFacts, Plan, _Options
    from mps_helpers._selftest import ProbeReport, ProbeResult

__all__ = ["Adjustment", "follow_known_problems", "probe_adjustments"]

#: Known problems in SDPA's handling of permuted / non-contiguous inputs: on mps the safe
#: processor hands SDPA contiguous blocks, so slicing turns on where they apply.
LAYOUT_PROBLEMS: Final = ("sdpa-noncontiguous-query", "sdpa-permuted-batch")
#: Known problems the attention chunk bound guards against.
SIZE_PROBLEMS: Final = ("sdpa-large-scores", "bmm-large-output")
#: Smallest score block a failed size probe may lead to (the plan's own floor, 2**20).
SMALLEST_BLOCK: Final = 2**20
_PAGE: Final = "docs/explanation/known-problems.md"


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
    #: Why, naming the probe; it becomes (part of) the decision's reason.
    reason: str


def _what(result: ProbeResult, device: str) -> str:
    if result.status == "error":
        return f"self-test {result.name} raised on this {device} ({result.message})"
    error = (
        "NaN/inf"
        if result.error is None or result.error == float("inf")
        else (f"relative error {result.error:.1e}")
    )
    return f"self-test {result.name} failed on this {device} in {result.dtype} ({error})"


def _block_bound(elements: int) -> int:
    """Return a power of two 4x (or more) below ``elements``, at least 2**20."""
    if elements < 1:
        return SMALLEST_BLOCK
    return max(SMALLEST_BLOCK, 1 << max(0, elements.bit_length() - 3))


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
        what = _what(result, report.device)
        name = result.name
        if name == "baddbmm_beta0":
            out.append(
                Adjustment(
                    name,
                    "attention_processor",
                    "safe",
                    f"{what}: baddbmm does not ignore its input when beta=0 here, so "
                    "diffusers' sliced attention would give NaN/black images",
                )
            )
        elif name in ("sdpa_noncontiguous", "sdpa_permuted"):
            out.append(
                Adjustment(
                    name,
                    "attention_slicing",
                    True,
                    f"{what}: SDPA mishandles non-contiguous inputs here; the safe processor "
                    "hands it contiguous blocks",
                )
            )
        elif name in ("sdpa_long", "bmm_large"):
            bound = _block_bound(result.elements)
            out.append(
                Adjustment(
                    name,
                    "attention_slicing",
                    True,
                    f"{what}: large attention products go wrong here, so attention is cut "
                    "into bounded blocks",
                )
            )
            out.append(
                Adjustment(
                    name,
                    "attention_chunk_elements",
                    bound,
                    f"{what} at 2**{max(result.elements, 1).bit_length() - 1} elements, so "
                    f"score blocks stay at 2**{bound.bit_length() - 1}, 4x or more below that",
                )
            )
        elif name in ("group_norm_half", "upsample_half", "softmax_half"):
            out.append(
                Adjustment(
                    name,
                    "dtype",
                    "float32",
                    f"{what}: half precision goes wrong here, so the pipeline computes in float32",
                )
            )
        else:
            out.append(
                Adjustment(
                    name,
                    "device",
                    None,
                    f"{what}: no automatic workaround (see `mps-helpers doctor --probe` and "
                    f"{_PAGE})",
                )
            )
    return tuple(out)


def follow_known_problems(
    plan: Plan,
    facts: PipelineFacts,
    env: Environment,
    options: _Options,
    reports: Sequence[ProbeReport] = (),
) -> Plan:
    """Return ``plan`` following the known problems of ``env`` and the failed probes of the
    report for the plan's device (if ``reports`` has one)."""
    import torch

    from mps_helpers._plan import make_plan

    on_mps = plan.device == "mps"
    problems = {p.id: p for p in known_problems(env)} if on_mps else {}
    report = next((r for r in reports if r.device == plan.device), None)
    adjustments = probe_adjustments(report) if report is not None else ()

    switches = dict(options.switches)
    dtype = options.dtype
    forced: dict[str, list[str]] = {}  # decision -> reasons of a change made here
    notes: dict[str, list[str]] = {}  # decision -> sentences added to the rule's reason
    bound: int | None = None
    probe_processor: list[str] = []

    def note(decision: str, text: str) -> None:
        notes.setdefault(decision, []).append(text)

    def slicing_on(why: str) -> None:
        if not plan.attention_slicing_supported:
            note("attention_slicing", f"{why}, but this denoiser cannot slice attention")
        elif switches["attention_slicing"] is False:
            note("attention_slicing", f"{why}; kept off as asked")
        elif plan.attention_slicing and "attention_slicing" not in forced:
            note("attention_slicing", f"{why}: slicing is on anyway")
        else:
            switches["attention_slicing"] = True
            forced.setdefault("attention_slicing", []).append(why)

    # Known problems by range (mps only).
    layout = [problems[i] for i in LAYOUT_PROBLEMS if i in problems]
    for problem in layout:
        slicing_on(
            f"torch {env.torch_version} on mps is in the range of known problem {problem.id} "
            f"({problem.title}; torch {problem.torch}; {', '.join(problem.sources)}), and the "
            "safe processor hands SDPA contiguous blocks"
        )

    # Failed self-tests.
    for adj in adjustments:
        if adj.decision == "attention_slicing":
            if adj.probe in ("sdpa_noncontiguous", "sdpa_permuted") and not on_mps:
                note("device", f"{adj.reason} on mps only, so no automatic workaround here")
                continue
            slicing_on(adj.reason)
        elif adj.decision == "attention_chunk_elements":
            bound = adj.value if bound is None else min(bound, adj.value)
            note("attention_chunk_elements", adj.reason)
        elif adj.decision == "dtype":
            if dtype is None and plan.dtype == torch.float16:
                dtype = torch.float32
                forced.setdefault("dtype", []).append(adj.reason)
            elif plan.dtype == torch.float16:
                note("dtype", f"{adj.reason}; kept float16 as asked")
            else:
                note("dtype", f"{adj.reason} (this plan is not float16)")
        elif adj.decision == "attention_processor":
            probe_processor.append(adj.reason)
        else:
            note("device", adj.reason)

    if forced:
        changed = dataclasses.replace(options, switches=switches, dtype=dtype)
        plan = make_plan(facts, env, changed, follow=False)

    if bound is not None and plan.attention_chunk_elements is not None:
        smaller = min(plan.attention_chunk_elements, bound)
        plan = plan.replace(attention_chunk_elements=smaller)
        notes["attention_chunk_elements"].insert(
            0, f"2**{smaller.bit_length() - 1} elements per score block"
        )

    reasons = dict(plan.reasons)
    for decision, whys in forced.items():
        value = "on" if decision == "attention_slicing" else _name(getattr(plan, decision))
        reasons[decision] = f"{value}: " + "; ".join(whys) + "."
    for decision, texts in notes.items():
        added = list(texts)
        if decision == "attention_chunk_elements":
            if plan.attention_chunk_elements is None:
                added.append("unused: no safe processor in this plan")
            elif bound is not None:
                reasons[decision] = added[0] + ": " + "; ".join(added[1:]) + "."
                continue
        reasons[decision] = _append(reasons[decision], added)

    if on_mps:
        reasons["attention_processor"] = _processor_reason(plan, env, problems, probe_processor)
        size = [problems[i] for i in SIZE_PROBLEMS if i in problems]
        if size and plan.attention_chunk_elements is not None:
            ids = " and ".join(f"{p.id} ({p.sources[0]})" for p in size)
            kind = "problem" if len(size) == 1 else "problems"
            reasons["attention_chunk_elements"] = _append(
                reasons["attention_chunk_elements"], [f"guards against known {kind} {ids}"]
            )
        chips = problems.get("black-images-m3ultra-m5")
        if chips is not None:
            state = "checks outputs for them" if plan.nan_guard else "is off, though"
            reasons["nan_guard"] = _append(
                reasons["nan_guard"],
                [
                    f"black images are reported on {env.chip} (known problem {chips.id}, "
                    f"{', '.join(chips.sources)}): the guard {state}"
                ],
            )
    elif probe_processor:
        reasons["attention_processor"] = _append(reasons["attention_processor"], probe_processor)
    return dataclasses.replace(plan, reasons=reasons)


def _processor_reason(
    plan: Plan, env: Environment, problems: dict[str, Any], probe_reasons: list[str]
) -> str:
    """Return the attention processor's reason on mps, following baddbmm-beta0-nan's range."""
    problem = get_problem("baddbmm-beta0-nan")
    where = f"known problem {problem.id}, torch {problem.torch}"
    unused = "" if plan.attention_slicing else " (unused: attention slicing is off)"
    broken = problem.id in problems or bool(probe_reasons)
    if plan.attention_processor == "safe":
        if broken:
            why = (
                f"with torch {env.torch_version} diffusers' sliced attention gives NaN/black "
                f"images on mps ({where}; diffusers #11229, #14438; pytorch #187521)"
            )
            if probe_reasons:
                why = "; ".join(probe_reasons)
            text = f"safe: mps_helpers' chunked SDPA; {why}{unused}."
        else:
            text = (
                "safe: mps_helpers' chunked SDPA, which bounds every score block; torch "
                f"{env.torch_version} is past {where}, so diffusers' own slicing would give "
                f"correct images too, but it only pays against classic attention{unused}."
            )
    elif broken:
        why = (
            "; ".join(probe_reasons)
            if probe_reasons
            else (f"with torch {env.torch_version} it gives NaN/black images on mps ({where})")
        )
        text = (
            f"diffusers: asked for diffusers' own enable_attention_slicing(); {why}: use "
            f"attention_processor='safe'{unused}."
        )
    else:
        text = (
            "diffusers: asked for diffusers' own enable_attention_slicing(); correct with "
            f"torch {env.torch_version} (past {where}){unused}."
        )
    return text


def _append(reason: str, texts: Sequence[str]) -> str:
    base = reason.rstrip()
    base = base if base.endswith(".") else base + "."
    return base + "".join(f" {t[0].upper()}{t[1:]}." for t in texts)


def _name(value: Any) -> str:
    return str(value).removeprefix("torch.")
