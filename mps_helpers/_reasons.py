"""The plan's reasons as data: the thresholds, the evidence and one template per rule.

Every automatic decision of :func:`mps_helpers.plan_for` is made by one *rule*, named by a
stable id (``"attention_slicing.mps-low-ram"``). A rule function in
:mod:`mps_helpers._plan` returns ``(value, rule id, fields)``; the plan turns the id and
its fields into the reason sentence with :func:`reason`, and records the id in
``Plan.rules``. The sentence is formatted here, from three sources:

- the rule's **fields** (what the rule saw: ``{ram:gib}``, ``{width}``, ``{dtype}``);
- the **constants** below (``{slicing_ram:gib}`` is :data:`SLICING_RAM_THRESHOLD`), so a
  threshold is typed once and its reason cannot drift from it;
- the **evidence** registry (``{cuda_fp16.figure}``): each claim, its figures and its
  source (public issue numbers or a docs page), typed once whichever reasons cite it.

Format specs for numbers: ``gib`` (``"8 GiB"``), ``size`` (``"950 MiB"``, ``"1.2 GiB"``),
``pow2`` (``"2**28"``), ``count`` (``"134,217,728"``); ``None`` prints as ``unknown`` and a
torch dtype by its short name. A rule whose template has a ``warning`` is one that ignored
an explicit option: the public entry points warn with that text, once.

To add a rule: add its evidence to :data:`EVIDENCE` (when it cites new figures), its
template to :data:`RULES` under a new id, and return that id from the rule function. The
decisions page of the docs lists the registry (``docs/explanation/decisions.md``), and the
tests check that every id is reachable from some fake machine.
"""

from __future__ import annotations

import string
import types
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from packaging.version import Version

from mps_helpers._known_problems import KNOWN_PROBLEMS, KnownProblem
from mps_helpers._util import GiB, dtype_name, format_bytes, is_dtype

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "ATTENTION_BUDGET_SHARE",
    "ATTENTION_CHUNK_CAP",
    "ATTENTION_CHUNK_FLOOR",
    "ATTENTION_LIVE_BLOCKS",
    "BF16_ATTENTION_KEYS",
    "CONSTANTS",
    "DECODE_BYTES_PER_PIXEL_FP32",
    "EVIDENCE",
    "FAMILY_PHRASES",
    "FAMILY_RULES",
    "FIT_SHARE",
    "MEMORY_CHUNK_STEP",
    "MEMORY_MEASURES",
    "MPS_BF16_MACOS",
    "MPS_BF16_TORCH",
    "MPS_ELEMENT_LIMIT",
    "PHRASES",
    "PROBE_BLOCK_MARGIN",
    "PROBLEM_RULES",
    "RULES",
    "SLICING_PIXELS_THRESHOLD",
    "SLICING_RAM_THRESHOLD",
    "SLICING_SIDE_THRESHOLD",
    "TIGHT_DECODE_SHARE",
    "TILING_SIDE_THRESHOLD",
    "UNKNOWN_AVAILABLE_MEMORY",
    "WARMUP_TORCH_RELEASE",
    "Evidence",
    "Phrase",
    "Rule",
    "cited_evidence",
    "phrase",
    "reason",
    "template_fields",
    "template_text",
    "warning",
]

# ---------------------------------------------------------------------------------------
# Thresholds (the evidence for each is on the decisions page of the docs)

#: The source rule (diffusers "optimization/mps"): slice attention below 64 GiB of RAM. The
#: readiness checks use it too.
SLICING_RAM_THRESHOLD = 64 * GiB
#: ... or for images larger than 512x512 (compared by pixel count).
SLICING_SIDE_THRESHOLD = 512
SLICING_PIXELS_THRESHOLD = SLICING_SIDE_THRESHOLD * SLICING_SIDE_THRESHOLD
#: Tile the VAE decode for images whose longer side exceeds this, on a memory-tight machine.
TILING_SIDE_THRESHOLD = 1024
#: VAE decode working memory per output pixel in float32, from the ``vae_decode_768``
#: measurement (the larger of the two measured figures per pixel).
DECODE_BYTES_PER_PIXEL_FP32 = 3_800
#: Memory is "tight" off mps when the batch's decode needs more than this share of it.
TIGHT_DECODE_SHARE = 0.25
#: Share of the available memory one attention call's score blocks may use.
ATTENTION_BUDGET_SHARE = 0.25
#: Blocks alive at once per attention chunk: the scores, their softmax, one temporary.
ATTENTION_LIVE_BLOCKS = 3
#: Past this many elements in one tensor mps kernels fail loudly or silently.
MPS_ELEMENT_LIMIT = 2**31
#: Upper bound on one score block, 8x below the mps limit; SD 1.5 at 512 px with guidance
#: is exactly 2**28 elements.
ATTENTION_CHUNK_CAP = 2**28
#: Lower bound, so that a starved machine still makes blocks of whole key rows (a 4096 px
#: image has 2**18 latent positions).
ATTENTION_CHUNK_FLOOR = 2**20
#: Memory assumed available when the snapshot does not know it (an 8 GB Mac has ~3 GiB).
UNKNOWN_AVAILABLE_MEMORY = 2 * GiB
#: bfloat16 on mps needs torch 2.3 and macOS 14.
MPS_BF16_TORCH = Version("2.3")
MPS_BF16_MACOS = Version("14")
#: The torch release whose first pass on mps differs from later ones (major, minor).
WARMUP_TORCH_RELEASE = (1, 13)
#: A failed size self-test bounds score blocks at least this many times below the size
#: that failed (a power of two, as the plan's bounds are).
PROBE_BLOCK_MARGIN = 4

#: Share of the budget a predicted peak may use (``mps_helpers._fit``): the memory estimate
#: was within 10% of every peak measured on CUDA (evidence ``memory_estimate``), so a tenth
#: is kept in hand.
FIT_SHARE = 0.9
#: The memory estimate lowers the attention bound by this factor while the peak is over.
MEMORY_CHUNK_STEP = 4
#: The memory measures, in the order the estimate tries them (cheapest first), with the
#: names their reasons give them.
MEMORY_MEASURES: Mapping[str, str] = types.MappingProxyType(
    {
        "vae_slicing": "VAE slicing",
        "attention_slicing": "the attention bound",
        "vae_tiling": "VAE tiling",
        "release_text_encoders": "releasing the text encoders",
        "batch_to_loop": "looping the prompts",
    }
)
#: bfloat16 SDPA on mps loses precision from about this many keys (families, issue 14).
BF16_ATTENTION_KEYS = 3_000

#: The constants templates may name, by their template name.
CONSTANTS: Mapping[str, object] = types.MappingProxyType(
    {
        "slicing_ram": SLICING_RAM_THRESHOLD,
        "slicing_side": SLICING_SIDE_THRESHOLD,
        "tiling_side": TILING_SIDE_THRESHOLD,
        "decode_per_pixel": DECODE_BYTES_PER_PIXEL_FP32,
        "tight_share": TIGHT_DECODE_SHARE,
        "attention_share": ATTENTION_BUDGET_SHARE,
        "live_blocks": ATTENTION_LIVE_BLOCKS,
        "mps_limit": MPS_ELEMENT_LIMIT,
        "chunk_cap": ATTENTION_CHUNK_CAP,
        "chunk_margin": MPS_ELEMENT_LIMIT // ATTENTION_CHUNK_CAP,
        "unknown_memory": UNKNOWN_AVAILABLE_MEMORY,
        "mps_bf16_torch": MPS_BF16_TORCH,
        "mps_bf16_macos": MPS_BF16_MACOS,
        "warmup_torch": ".".join(map(str, WARMUP_TORCH_RELEASE)),
        "probe_margin": PROBE_BLOCK_MARGIN,
        "known_problems_page": "docs/explanation/known-problems.md",
        "fit_share": FIT_SHARE,
        "bf16_keys": BF16_ATTENTION_KEYS,
    }
)


# ---------------------------------------------------------------------------------------
# Evidence


@dataclass(frozen=True)
class Evidence:
    """One piece of evidence: what it shows, the figures, and where it comes from."""

    #: What it shows, as a clause a reason can quote.
    claim: str
    #: The measurement or figures behind the claim ("" for a report without figures).
    figure: str
    #: Public issue numbers, a document, or the docs page that holds the measurement.
    source: str


_BENCHMARKS = "docs/explanation/benchmarks.md"
_DTYPE_PAGE = "docs/explanation/decisions.md#dtype"


def _known_problem(problem: KnownProblem) -> Evidence:
    """A known mps problem as evidence: its title, where it applies, its public threads."""
    return Evidence(problem.title, problem.where(), ", ".join(problem.sources))


#: Evidence by id; templates cite it as ``{id.claim}``, ``{id.figure}``, ``{id.source}``.
#: Each known mps problem (``mps_helpers._known_problems``) is evidence under its own id
#: (``{baddbmm-beta0-nan.figure}`` is "torch before 2.14, unconfirmed"), so the reasons that
#: follow a problem cite its range and issue numbers from the one table that holds them.
EVIDENCE: Mapping[str, Evidence] = types.MappingProxyType(
    {
        **{problem.id: _known_problem(problem) for problem in KNOWN_PROBLEMS},
        "peers_fp16": Evidence(
            "ComfyUI, InvokeAI and A1111 also run fp16 there",
            "",
            "ComfyUI, InvokeAI and AUTOMATIC1111 sources",
        ),
        "cuda_fp16": Evidence(
            "2.6x faster than float32 with half the peak memory",
            "H100, SD 1.5, batch 4: 1.04 vs 2.65 s, 4.44 vs 8.80 GiB",
            _BENCHMARKS,
        ),
        "cpu_sd15": Evidence(
            "SD 1.5 ran 1.76x faster than in float32 at 0.54x the peak memory",
            "2-core AMD EPYC, 512 px, 2 steps: 36.1 s per image in bfloat16, 63.7 s in "
            "float32; 3.25 vs 5.95 GiB",
            _BENCHMARKS,
        ),
        "cpu_bf16_emulated": Evidence(
            "bfloat16 without native instructions is emulated and slow",
            "SD's matmul and 320-channel conv took 2.6x float32's time in bfloat16 with "
            "AVX-512, 100-330x with AVX2",
            _DTYPE_PAGE,
        ),
        "cpu_fp16_emulated": Evidence(
            "float16 is emulated on the CPU",
            "a float16 conv measured 1,300x slower than float32",
            _DTYPE_PAGE,
        ),
        "fp16_vae_overflow": Evidence(
            "fp16 VAE decodes overflow to NaN/black", "", "A1111 #12923, InvokeAI #4083"
        ),
        "cuda_fp32_vae": Evidence(
            "a float32 VAE up front cost 55% more peak memory",
            "H100, SD 1.5, batch 4: 6.15 vs 3.97 GiB",
            _BENCHMARKS,
        ),
        "vae_decode_768": Evidence(
            "the VAE decode's working memory grows with the pixels decoded",
            "SD 1.5's VAE on the CPU at 768 px: 2,193 MB over its weights, 1,035 MB tiled, "
            "+38% time",
            "docs/explanation/decisions.md#memory-tight",
        ),
        "mps_score_matrix": Evidence(
            "full score matrices materialise on mps",
            "2.7e8 elements per call for SD 1.5 at 512 px",
            "docs/explanation/attention.md",
        ),
        "mps_element_limit": Evidence(
            "mps kernels fail loudly or silently past their element limit",
            "",
            "pytorch #84039, #179352",
        ),
        "cuda_slicing": Evidence(
            "slicing cost 1.8-2.7x time and saved no memory against SDPA",
            "H100, SD 1.5",
            _BENCHMARKS,
        ),
        "cpu_slicing": Evidence(
            "SDPA beat diffusers' slicing on time and memory",
            "SD 1.5 UNet at 512 px: 17-20 s vs 25-28 s per forward",
            _BENCHMARKS,
        ),
        "mps_sliced_nan": Evidence(
            "diffusers' sliced attention gives NaN/black images on mps",
            "",
            "diffusers #11229, #14438; pytorch #187521",
        ),
        "vae_slicing_cost": Evidence(
            "sliced decode cut peak memory 35% for ~4% time",
            "H100, SD 1.5, batch 4, paired runs",
            _BENCHMARKS,
        ),
        "warmup_113": Evidence(
            "the first pass differs from later ones, and the source document's workaround "
            "is a one-step warmup pass",
            "",
            "diffusers documentation, optimization/mps",
        ),
        "warmup_resolved": Evidence(
            "diffusers dropped its warmup, 'Resolved in PyTorch 2'", "", "diffusers PR #2771"
        ),
        "mps_batch": Evidence(
            "batched prompts crash or give noise there", "", "diffusers #363, pytorch #84039"
        ),
        "cuda_loop": Evidence(
            "looping prompts cost 2.5-4x", "H100: 2.63 vs 1.04 s for 4", _BENCHMARKS
        ),
        "half_nan": Evidence(
            "can give NaN/black images", "", "ComfyUI #3521, #4799; SDXL's VAE: A1111 #12923"
        ),
        "memory_estimate": Evidence(
            "the memory estimate was within 10% of every measured peak",
            "H200, torch's peak allocation per call, SD 1.5 to Flux and Wan",
            "docs/explanation/memory.md",
        ),
        "encoder_reload": Evidence(
            "a released text encoder reloads quickly from the page cache",
            "SD 1.5's CLIP ViT-L/14 in float16: 12 ms",
            "docs/explanation/memory.md#releasing-the-text-encoders",
        ),
        "mps_swap": Evidence(
            "unified memory swaps long before torch's limit (1.7x the working set, above "
            "physical RAM)",
            "",
            "diffusers #548",
        ),
        # the families' rules (mps_helpers._families; issue 14)
        "mps_large_attention": Evidence(
            "mps kernels fail past 2**31 elements, which transformer attention reaches",
            "",
            "pytorch #84039, #179352, #197636; ComfyUI #14837",
        ),
        "mps_bf16_long_attention": Evidence(
            "bfloat16 SDPA on mps loses precision above ~3,000 keys",
            "",
            "pytorch PR #190791, open",
        ),
        "ltx_bf16_black": Evidence(
            "LTX-Video/LTX-2 give black video in bfloat16 on mps with one-call attention, and "
            "split (chunked) attention fixes it",
            "",
            "ComfyUI #15804, #15818",
        ),
        "mps_float64": Evidence(
            "mps has no float64 and model code that asks for it crashes",
            "",
            "diffusers #9047 Flux, #11315 HiDream; LTX-2 RoPE",
        ),
        "float64_rescue_cost": Evidence(
            "the rescue costs little",
            "~7 us per torch call, measured on a CPU; ~5 ms per SD-sized denoising step",
            _BENCHMARKS,
        ),
        "mps_float8": Evidence(
            "mps cannot compute float8", "", "ComfyUI #6859, #8881; pytorch #148420"
        ),
        "video_decode": Evidence(
            "the image estimate times the frames: an upper bound",
            "",
            "docs/explanation/video-decode.md",
        ),
    }
)


# ---------------------------------------------------------------------------------------
# Rules


@dataclass(frozen=True)
class Rule:
    """One rule's reason template (and, for a rule that ignores an option, its warning)."""

    #: The plan field it decides ("" for a rule any decision can use, like "asked").
    decision: str
    #: The reason sentence, a :meth:`str.format` template (see the module docstring).
    template: str
    #: The warning the public entry points give when this rule ignored an explicit option.
    warning: str | None = None


_NO_SLICING = (
    "the {denoiser} denoiser has no attention slicing in diffusers "
    "(enable_attention_slicing() silently does nothing on transformer-based pipelines)"
)
_SLICES = "the source rule slices there ({mps_score_matrix.claim}: {mps_score_matrix.figure})."
_CHUNKED = "mps_helpers' chunked SDPA"
_SAFE = f"{_CHUNKED}; {{mps_sliced_nan.claim}} ({{mps_sliced_nan.source}})"
_OOM_RETRY = ", so a call is retried once with a stricter plan (slicing, tiling, looping)."
_MPS_BF16 = "torch {mps_bf16_torch}+ and macOS {mps_bf16_macos}+"
_PREDICTED = (
    "predicted {peak:size} peak ({phase}) of {usable:size} usable ({fit_share:.0%} of "
    "{budget:size}: {source})"
)
#: The rules of each memory measure (``<measure>.estimate-on`` ...); ``{what}`` names it.
_MEASURE_RULES = {
    "estimate-on": "on for memory: {what} takes the predicted peak from {old:size} "
    "({old_phase}) to {new:size} ({new_phase}), against {usable:size} usable.",
    "estimate-fits": "off: the predicted {peak:size} peak ({phase}) fits {usable:size} usable.",
    "estimate-not-needed": "off: not needed, the measures before it bring the predicted peak "
    "to {after:size} of {usable:size} usable.",
}


def _rules(decision: str, templates: Mapping[str, str]) -> dict[str, Rule]:
    return {f"{decision}.{case}": Rule(decision, text) for case, text in templates.items()}


#: Every rule by id: ``"<decision>.<case>"``, or a bare id for a rule of any decision.
RULES: Mapping[str, Rule] = types.MappingProxyType(
    {
        "asked": Rule("", "asked for ({value})."),
        "replaced": Rule("", "changed from {old} to {new} by Plan.replace (a stricter plan)."),
        "stricter": Rule(
            "",
            "on after an out-of-memory error: the retry's stricter plan (mps_helpers guards).",
        ),
        **_rules(
            "device",
            {
                "mps": "mps is usable and Python runs natively (arm64): the source rule's device.",
                "rosetta": "Python runs translated by Rosetta (an {python} Python on an arm64 "
                "Mac), which cannot use mps; {fallback} (install an arm64 Python to get mps).",
                "mps-not-built": "torch was built without mps (see `mps-helpers doctor`); "
                "{fallback}.",
                "mps-unusable": "mps is not usable now (see `mps-helpers doctor`); {fallback}.",
                "not-apple-silicon": "not an Apple Silicon Mac; {fallback}.",
            },
        ),
        **_rules(
            "dtype",
            {
                "asked-cpu-float16": "asked for (float16); note that "
                "{cpu_fp16_emulated.claim} ({cpu_fp16_emulated.figure}).",
                "asked-cpu-bfloat16": "asked for (bfloat16); note that this CPU has no native "
                "bfloat16 instructions, so it is emulated ({cpu_bf16_emulated.figure}).",
                "mps-bfloat16-weights": "the model's own weights are bfloat16 and torch "
                "{torch} on macOS {macos} supports bfloat16 on mps (needs "
                f"{_MPS_BF16}).",
                "mps-bfloat16-unsupported": "float16 on mps: the model's weights are bfloat16, "
                f"but bfloat16 on mps needs {_MPS_BF16} (here torch {{torch}}, macOS "
                "{macos}).",
                "mps-float16": "float16 on mps, as the source document loads it: half the "
                "memory of float32 ({peers_fp16.claim}).",
                "cuda-bfloat16-weights": "the model's own weights are bfloat16 and this GPU "
                "computes bfloat16 natively.",
                "cuda-float16": "float16 on CUDA: {cuda_fp16.claim} ({cuda_fp16.figure}).",
                "cpu-bfloat16": "bfloat16 on the CPU: this processor computes bfloat16 "
                "natively (AVX512-BF16 or AMX), and there {cpu_sd15.claim} "
                "({cpu_sd15.figure}; {cpu_sd15.source}).",
                "cpu-float32": "float32 on the CPU: this processor has no native bfloat16 "
                "instructions, and emulated half precision is slow "
                "({cpu_bf16_emulated.figure}; {cpu_fp16_emulated.figure}).",
            },
        ),
        **_rules(
            "vae_dtype",
            {
                "not-float16": "like the rest: force_upcast guards fp16 only.",
                "no-config": "like the rest: no VAE config to read (no pipeline given).",
                "no-force-upcast": "like the rest: the VAE config does not ask for force_upcast.",
                "pipeline-upcasts": "like the rest: the VAE config says force_upcast and "
                "{pipeline} upcasts it to float32 for each decode itself (a float32 VAE would "
                "be cast down to float16 by that pipeline's mps branch).",
                "cuda-guarded": "float16 on CUDA although the VAE config says force_upcast: "
                "the NaN guard decodes again in float32 if a decode overflows and keeps "
                "float32 from then on (A1111's approach), while {cuda_fp32_vae.claim} "
                "({cuda_fp32_vae.figure}; {cuda_fp32_vae.source}).",
                "force-upcast": "the VAE config says force_upcast "
                "({fp16_vae_overflow.claim}: {fp16_vae_overflow.source}), so it stays "
                "float32 while the rest is float16.",
            },
        ),
        **_rules(
            "memory_tight",
            {
                "mps-ram-unknown": "mps with unknown RAM: assumed under the source rule's "
                "{slicing_ram:gib}.",
                "mps-low-ram": "mps with {ram:gib} of unified memory, under the source rule's "
                "{slicing_ram:gib} (memory pressure there means swapping).",
                "mps-size-unknown": "mps with {ram:gib} (>= {slicing_ram:gib}); image size "
                "unknown.",
                "size-unknown": "image size unknown, so no decode estimate: not tight.",
                "memory-unknown": "{where} unknown; the decode needs ~{need:size}.",
                "decode-share": "decoding {batch} image(s) of {width}x{height} needs "
                "~{need:size}, {share:.0%} of {available:gib} {where} ({verdict} the "
                "{tight_share:.0%} share; VAE decode measured at ~{decode_per_pixel:count} "
                "bytes per pixel in float32).",
            },
        ),
        "attention_slicing.unsupported": Rule("attention_slicing", f"off: {_NO_SLICING}."),
        "attention_slicing.ignored-unsupported": Rule(
            "attention_slicing",
            f"asked for, but ignored: {_NO_SLICING}.",
            warning=f"attention_slicing=True ignored: {_NO_SLICING}.",
        ),
        **_rules(
            "attention_slicing",
            {
                "cuda": "never automatic on CUDA: {cuda_slicing.claim} ({cuda_slicing.figure}).",
                "cpu": "never automatic on the CPU: {cpu_slicing.claim} ({cpu_slicing.figure}).",
                "mps-ram-unknown": f"mps with unknown RAM, under {{slicing_ram:gib}}: {_SLICES}",
                "mps-low-ram": f"mps with {{ram:gib}}, under {{slicing_ram:gib}}: {_SLICES}",
                "mps-large-image": "{width}x{height} is larger than "
                "{slicing_side}x{slicing_side}: the source rule slices attention for such "
                "images on mps.",
                "mps-roomy": "mps with {ram:gib} (>= {slicing_ram:gib}) and {size} (not over "
                "{slicing_side}x{slicing_side}): the source rule does not slice.",
            },
        ),
        **_rules(
            "attention_processor",
            {
                "safe": f"{_SAFE}.",
                "safe-unused": f"{_SAFE} (unused: attention slicing is off).",
                "diffusers": "asked for diffusers' own enable_attention_slicing().",
                "diffusers-unused": "asked for diffusers' own enable_attention_slicing() "
                "(unused: attention slicing is off).",
            },
        ),
        **_rules(
            "attention_chunk_elements",
            {
                "slicing-off": "unused: attention slicing is off.",
                "diffusers": "unused: diffusers' own slicing picks its slices.",
                "bound": "{exponent:pow2} elements per score block: {attention_share:.0%} of "
                "{seen} over {live_blocks} live {dtype} blocks, capped at {chunk_cap:pow2} to "
                "stay {chunk_margin}x under mps's {mps_limit:pow2}-element limit "
                "({mps_element_limit.source}).",
            },
        ),
        **_rules(
            "vae_slicing",
            {
                "single-image": "one image per call: there is nothing to slice.",
                "cuda-not-tight": "GPU memory is not tight, so the decode runs as one batch: "
                "on CUDA {vae_slicing_cost.claim} ({vae_slicing_cost.figure}; "
                "{vae_slicing_cost.source}).",
                "not-tight": "memory is not tight, so the decode runs as one batch.",
                "tight-batch-unknown": "memory is tight and the batch size unknown (sliced "
                "decode only acts on batches): {vae_slicing_cost.claim} "
                "({vae_slicing_cost.figure}).",
                "tight": "{batch} images per call on a memory-tight machine: "
                "{vae_slicing_cost.claim} ({vae_slicing_cost.figure}).",
            },
        ),
        **_rules(
            "vae_tiling",
            {
                "size-unknown": "image size unknown: no tiling.",
                "small": "{width}x{height} is not larger than {tiling_side} px: no tiling.",
                "not-tight": "{width}x{height} is larger than {tiling_side} px, but memory is "
                "not tight.",
                "tight": "{width}x{height} is larger than {tiling_side} px on a memory-tight "
                "machine: tiled decode roughly halves the decode's memory "
                "({vae_decode_768.figure}).",
            },
        ),
        **_rules(
            "warmup",
            {
                "not-mps": "off: the first-pass difference is an mps problem.",
                "torch-1.13": "torch {torch} on mps: {warmup_113.claim}.",
                "fixed-torch": "torch {torch} on mps: the first-pass problem was a "
                "{warmup_torch} one ({warmup_resolved.claim}: {warmup_resolved.source}).",
            },
        ),
        **_rules(
            "batch_to_loop",
            {
                "mps": "mps: {mps_batch.claim} ({mps_batch.source}), so prompts run one at a time.",
                "cuda": "off on CUDA: {cuda_loop.claim} ({cuda_loop.figure}).",
                "cpu": "off on the CPU: batches run correctly there.",
            },
        ),
        **_rules(
            "release_text_encoders",
            {
                "no-estimate": "off: no memory estimate (pipeline or image size unknown).",
                "not-mps": "off: only on unified memory (mps), where a released encoder's "
                "memory goes back to the denoiser.",
            },
        ),
        # the memory estimate's rules (mps_helpers._fit): the predicted peak against the
        # budget, and each memory measure it turned on or left off
        **_rules(
            "memory_tight",
            {
                "estimate-fits": f"not tight: {_PREDICTED}, without memory measures.",
                "estimate-measures": f"tight: {_PREDICTED}: {{measures}} {{verb}} it to "
                "{after:size}.",
                "estimate-unfit": f"tight, and nothing makes it fit: {_PREDICTED}, still "
                "{after:size} peak ({after_phase}){tried} (the margin: "
                "{memory_estimate.claim}, {memory_estimate.source}).",
            },
        ),
        **{
            rule_id: rule
            for measure in MEMORY_MEASURES
            for rule_id, rule in _rules(measure, _MEASURE_RULES).items()
        },
        "release_text_encoders.estimate-on": Rule(
            "release_text_encoders",
            _MEASURE_RULES["estimate-on"][:-1] + "; {encoder_reload.claim} "
            "({encoder_reload.figure}).",
        ),
        "attention_chunk_elements.estimate-bound": Rule(
            "attention_chunk_elements",
            "{exponent:pow2} elements per score block: the bound the memory estimate needed.",
        ),
        **_rules(
            "nan_guard",
            {
                "float32": "off in float32: the NaN/black-image failures are half-precision ones.",
                "half": "{dtype} {half_nan.claim} ({half_nan.source}), so outputs are checked.",
            },
        ),
        **_rules(
            "oom_retry",
            {
                "cpu": "off on the CPU: the OS swaps or kills the process rather than raising.",
                "mps": f"mps raises on out-of-memory (there a plain RuntimeError){_OOM_RETRY}",
                "cuda": f"cuda raises on out-of-memory (torch.cuda.OutOfMemoryError){_OOM_RETRY}",
            },
        ),
        **_rules(
            "memory_watch",
            {
                "mps": "mps: {mps_swap.claim}, so swap growth is watched ({mps_swap.source}).",
                "cuda": "off on CUDA: GPU memory never swaps; running out raises instead.",
                "cpu": "off on the CPU: no GPU working set to spill into swap (an explicit "
                "option turns the watch on).",
            },
        ),
    }
)


_BADDBMM = "known problem baddbmm-beta0-nan, {baddbmm-beta0-nan.figure}"
_DIFFUSERS = "asked for diffusers' own enable_attention_slicing()"

#: The rules that follow the known mps problems and the device's failed self-tests
#: (``mps_helpers._problem_rules``). A *changing* rule replaces a decision's rule (the
#: decision's value or reason follows a problem); a *note* (an id with ``.note-``) adds a
#: sentence to the decision's reason and is listed in ``Plan.notes``. ``{causes}`` is a list
#: of phrases (one per known problem or failed self-test), joined by "; "; ``{unused}`` says
#: when attention slicing is off.
PROBLEM_RULES: Mapping[str, Rule] = types.MappingProxyType(
    {
        **_rules(
            "attention_processor",
            {
                "safe-known-problem": f"{_CHUNKED}; with torch {{torch}} "
                f"diffusers' sliced attention gives NaN/black images on mps ({_BADDBMM}; "
                "{mps_sliced_nan.source}){unused}.",
                "safe-probe": f"{_CHUNKED}; {{causes}}{{unused}}.",
                "safe-past-fix": f"{_CHUNKED}, which bounds every score block; "
                f"torch {{torch}} is past {_BADDBMM}, so diffusers' own slicing would give "
                "correct images too, but it only pays against classic attention{unused}.",
                "diffusers-known-problem": f"{_DIFFUSERS}; with torch {{torch}} it gives "
                f"NaN/black images on mps ({_BADDBMM}): use attention_processor='safe'"
                "{unused}.",
                "diffusers-probe": f"{_DIFFUSERS}; {{causes}}: use "
                "attention_processor='safe'{unused}.",
                "diffusers-past-fix": f"{_DIFFUSERS}; correct with torch {{torch}} (past "
                f"{_BADDBMM}){{unused}}.",
                "note-probe": "{causes}.",
            },
        ),
        **_rules(
            "attention_slicing",
            {
                "known-problem": "{causes}.",
                "probe": "{causes}.",
                "note-cannot-slice": "{causes}, but this denoiser cannot slice attention.",
                "note-kept-off": "{causes}; kept off as asked.",
                "note-on-anyway": "{causes}: slicing is on anyway.",
            },
        ),
        **_rules(
            "attention_chunk_elements",
            {
                "probe-bound": "{exponent:pow2} elements per score block: {causes}.",
                "note-probe-unused": "{causes}; unused: no safe processor in this plan.",
                "note-large-products": "guards against known problems sdpa-large-scores "
                "({sdpa-large-scores.source}) and bmm-large-output "
                "({bmm-large-output.source}).",
                "note-large-scores": "guards against known problem sdpa-large-scores "
                "({sdpa-large-scores.source}).",
            },
        ),
        **_rules(
            "dtype",
            {
                "probe": "{causes}.",
                "note-kept-asked": "{causes}; kept float16 as asked.",
                "note-not-float16": "{causes} (this plan is not float16).",
            },
        ),
        **_rules("device", {"note-probes": "{causes}."}),
        **_rules(
            "nan_guard",
            {
                "note-black-images": "black images are reported on {chip} (known problem "
                "black-images-m3ultra-m5, {black-images-m3ultra-m5.source}): the guard "
                "checks outputs for them.",
                "note-black-images-off": "black images are reported on {chip} (known problem "
                "black-images-m3ultra-m5, {black-images-m3ultra-m5.source}): the guard is "
                "off, though.",
            },
        ),
    }
)

# ---------------------------------------------------------------------------------------
# The families' rules (mps_helpers._families; issue 14)

#: The rules of the transformer and video families (:mod:`mps_helpers._families`): the
#: plan fields ``family``, ``attention_bound``, ``attention_upcast_from`` and
#: ``float64_rescue``, and the family revisions of ``dtype``, ``memory_tight``,
#: ``vae_tiling`` and ``batch_to_loop``. ``{then}`` and ``{base}`` are the reason of the
#: rule they revise.
FAMILY_RULES: Mapping[str, Rule] = types.MappingProxyType(
    {
        **_rules(
            "family",
            {
                "classified": "{why}.",
                "unknown": "unknown: {why}.",
            },
        ),
        **_rules(
            "attention_bound",
            {
                "off": "{device} attention has no element limit to keep under (SDPA's "
                "fused kernels there do not materialise the scores); the limit is an mps one.",
                "mps": "{exponent:pow2} elements per score block in every attention call (the "
                "safe processor's bound: {attention_share:.0%} of {seen} over {live_blocks} "
                "live {dtype} blocks, capped at {chunk_cap:pow2}); "
                "{mps_large_attention.claim} ({mps_large_attention.source}). {estimate}",
            },
        ),
        **_rules(
            "attention_upcast_from",
            {
                "off-device": "the bfloat16 precision loss is in mps' attention kernels.",
                "off-dtype": "attention runs in {dtype}, not bfloat16.",
                "short": "at most {keys:count} keys per call at this size, under the "
                "~{bf16_keys:count} from which bfloat16 attention loses precision on mps "
                "({mps_bf16_long_attention.source}).",
                "long": "from {bf16_keys:count} keys: {mps_bf16_long_attention.claim} "
                "({mps_bf16_long_attention.source}) and this call has up to {keys} keys; "
                "those calls run in float32 (bounded at float32's size).",
                "known-failure": "from one key (every call): {ltx_bf16_black.claim} "
                "({ltx_bf16_black.source}); every attention call runs in float32, bounded.",
            },
        ),
        **_rules(
            "float64_rescue",
            {
                "mps": "on: {mps_float64.claim} ({mps_float64.source}); float64 asked for on "
                "mps during a call is made float32 (cost: {float64_rescue_cost.figure}).",
                "off": "off: {device} computes float64.",
            },
        ),
        **_rules(
            "dtype",
            {
                "float8-stored": "the weights are stored as {stored} (float8), which "
                "{device} cannot compute ({mps_float8.source}): they are upcast "
                "while loading (exactly: every float8 value is a bfloat16 and a float16 "
                "value), chosen as for bfloat16 weights: {then}",
                "known-bf16-failure": "{then} {ltx_bf16_black.claim} "
                "({ltx_bf16_black.source}): the weights stay bfloat16, and attention runs in "
                "float32 (attention_upcast_from).",
            },
        ),
        "memory_tight.video": Rule(
            "memory_tight",
            "{base} Video: decoding {frames} frames of {width}x{height} ({batch} clip(s)) "
            "needs ~{need:size} at once, {share:.0%} of {memory} ({verdict} the "
            "{tight_share:.0%} share; {video_decode.claim}, from ~{decode_per_pixel:count} "
            "bytes per pixel in float32).",
        ),
        **_rules(
            "vae_tiling",
            {
                "video-tiled": "on: a 3-D decode of {frames} frames of {width}x{height} on a "
                "memory-tight machine: tiled by pixels (enable_tiling) and by frames "
                "(frame-wise decoding where the VAE has it).",
                "video-fits": "off: the clip's 3-D decode fits (~{need:size}).",
            },
        ),
        "batch_to_loop.video": Rule(
            "batch_to_loop",
            "mps: {mps_batch.claim} ({mps_batch.source}), so prompts run one at a time; for "
            "video one prompt is one clip: a clip's frames attend to each other and are never "
            "split (its attention is bounded instead).",
        ),
    }
)

RULES = types.MappingProxyType({**RULES, **PROBLEM_RULES, **FAMILY_RULES})


#: Parts of sentences that several rules share, chosen by the rule function: a field whose
#: value is a :class:`Phrase` is formatted from its template here.
PHRASES: Mapping[str, str] = types.MappingProxyType(
    {
        "fallback-cuda": "CUDA is usable ({gpu})",
        "fallback-cpu": "neither mps nor CUDA is usable, so the CPU",
        "memory-seen": "{available:gib} {where}",
        "memory-unknown": "{where} (unknown: {unknown_memory:gib} assumed)",
        "unused-slicing-off": " (unused: attention slicing is off)",
        "unused-no": "",
        # the known problems' torch ranges that turn attention slicing on (mps)
        "known-sdpa-noncontiguous-query": "torch {torch} on mps is in the range of known "
        "problem sdpa-noncontiguous-query ({sdpa-noncontiguous-query.claim}; "
        "{sdpa-noncontiguous-query.figure}; {sdpa-noncontiguous-query.source}), and the safe "
        "processor hands SDPA contiguous blocks",
        "known-sdpa-permuted-batch": "torch {torch} on mps is in the range of known problem "
        "sdpa-permuted-batch ({sdpa-permuted-batch.claim}; {sdpa-permuted-batch.figure}; "
        "{sdpa-permuted-batch.source}), and the safe processor hands SDPA contiguous blocks",
        # a failed self-test (its field "what" in the responses below)
        "probe-wrong": "self-test {name} failed on this {device} in {dtype} (relative error "
        "{error:.1e})",
        "probe-nonfinite": "self-test {name} failed on this {device} in {dtype} (NaN/inf)",
        "probe-raised": "self-test {name} raised on this {device} ({message})",
        # what the plan does about it
        "probe-baddbmm": "{what}: baddbmm does not ignore its input when beta=0 here, so "
        "diffusers' sliced attention would give NaN/black images",
        "probe-layout": "{what}: SDPA mishandles non-contiguous inputs here; the safe "
        "processor hands it contiguous blocks",
        "probe-layout-off-mps": "{what}: SDPA mishandles non-contiguous inputs here; the safe "
        "processor hands it contiguous blocks on mps only, so no automatic workaround here",
        "probe-size": "{what}: large attention products go wrong here, so attention is cut "
        "into bounded blocks",
        "probe-size-bound": "{what} at {elements:pow2} elements, so score blocks stay at "
        "{bound:pow2}, {probe_margin}x or more below that",
        "probe-half": "{what}: half precision goes wrong here, so the pipeline computes in float32",
        "probe-none": "{what}: no automatic workaround (see `mps-helpers doctor --probe` and "
        "{known_problems_page})",
    }
)


#: The families' phrases: the attention bound's estimate at the plan's size.
FAMILY_PHRASES: Mapping[str, str] = types.MappingProxyType(
    {
        "estimate-unknown": "Calls that fit run the native kernel unchanged.",
        "estimate-within": "At {size}: {heads} heads x {tokens:count} tokens -> "
        "{elements:.2g} score elements per image, within the bound: one native call.",
        "estimate-split": "At {size}: {heads} heads x {tokens:count} tokens -> {elements:.2g} "
        "score elements per image: split into >= {blocks:count} blocks.",
    }
)

PHRASES = types.MappingProxyType({**PHRASES, **FAMILY_PHRASES})


class Phrase(NamedTuple):
    """A field value that is itself formatted from a template of :data:`PHRASES`."""

    id: str
    fields: Mapping[str, object] = types.MappingProxyType({})


# ---------------------------------------------------------------------------------------
# Formatting


class _Field(str):
    """A rule field shown by name (:func:`template_text`)."""

    __slots__ = ()


class _Formatter(string.Formatter):
    """str.format with the reasons' specs and their rendering of None and dtypes."""

    def format_field(self, value: Any, format_spec: str) -> str:
        if isinstance(value, _Field):
            return f"<{value}>"
        if value is None:
            return "unknown"
        if isinstance(value, Phrase):
            return phrase(value)
        if isinstance(value, tuple) and value and all(isinstance(v, Phrase) for v in value):
            return "; ".join(phrase(v) for v in value)
        if format_spec == "gib":
            return format_bytes(value, digits=0)
        if format_spec == "size":
            return format_bytes(value, digits=1)
        if format_spec == "pow2":
            return f"2**{int(value).bit_length() - 1}"
        if format_spec == "count":
            return f"{value:,}"
        if is_dtype(value):
            return dtype_name(value)
        return str(super().format_field(value, format_spec))


_FORMATTER = _Formatter()


def _render(template: str, rule_id: str, fields: Mapping[str, object]) -> str:
    shadowed = sorted(set(fields) & (set(CONSTANTS) | set(EVIDENCE)))
    if shadowed:
        raise ValueError(f"rule {rule_id!r}: fields {shadowed} shadow constants or evidence")
    return _FORMATTER.vformat(template, (), {**CONSTANTS, **EVIDENCE, **fields})


def phrase(value: Phrase) -> str:
    """Return a :class:`Phrase` formatted from its template of :data:`PHRASES`."""
    return _render(PHRASES[value.id], value.id, value.fields)


def reason(rule_id: str, fields: Mapping[str, object] | None = None) -> str:
    """Return the reason sentence of rule ``rule_id`` for the fields the rule saw.

    Raises:
        KeyError: no rule has this id, or the template names a field not given.
    """
    return _render(RULES[rule_id].template, rule_id, fields or {})


def warning(rule_id: str, fields: Mapping[str, object] | None = None) -> str | None:
    """Return the warning of rule ``rule_id`` (one that ignored an option), or None."""
    text = RULES[rule_id].warning
    return None if text is None else _render(text, rule_id, fields or {})


def template_fields(rule_id: str) -> frozenset[str]:
    """Return the names of the fields a rule's templates need from the rule function."""
    rule = RULES[rule_id]
    names: set[str] = set()
    for text in (rule.template, rule.warning or ""):
        for _literal, name, _spec, _conversion in _FORMATTER.parse(text):
            if name:
                root = name.split(".", 1)[0].split("[", 1)[0]
                if root not in CONSTANTS and root not in EVIDENCE:
                    names.add(root)
    return frozenset(names)


def cited_evidence(rule_id: str) -> tuple[str, ...]:
    """Return the ids of the evidence a rule's reason (or a phrase) cites, in order."""
    text = RULES[rule_id].template if rule_id in RULES else PHRASES[rule_id]
    cited: list[str] = []
    for _literal, name, _spec, _conversion in _FORMATTER.parse(text):
        root = (name or "").split(".", 1)[0]
        if root in EVIDENCE and root not in cited:
            cited.append(root)
    return tuple(cited)


def template_text(rule_id: str, *, warning: bool = False) -> str:
    """Return a rule's reason (or warning) with constants and evidence filled in, fields as <name>.

    The docs' list of rules shows each rule this way.
    """
    rule = RULES[rule_id]
    text = rule.warning if warning else rule.template
    if text is None:
        raise ValueError(f"rule {rule_id!r} has no warning")
    return _render(text, rule_id, {name: _Field(name) for name in template_fields(rule_id)})
