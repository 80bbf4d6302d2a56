"""Known mps problems as data: which torch, macOS and chip they hit, and what the library does.

Each :class:`KnownProblem` names the affected torch range (and macOS range or chips where
known), the symptom, its public sources, what mps_helpers does about it, what the user can do,
and the self-test probes that detect it (``mps_helpers._selftest``). A range whose ends the
sources do not establish carries ``confirmed=False`` and a note saying what is not known;
``docs/explanation/known-problems.md`` renders this table from the data.

:func:`known_problems` returns the entries that apply to a machine. The readiness checks
(``mps_helpers._checks``: ``problem_findings``, ``probe_findings``) turn them and the failed
self-tests into findings for ``mps-helpers doctor``; the reasons cite each problem as evidence
under its id (``mps_helpers._reasons``); the plan's rules that follow these ranges live in
``mps_helpers._problem_rules``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

from packaging.version import Version

if TYPE_CHECKING:
    from mps_helpers._environment import Environment

__all__ = [
    "KNOWN_PROBLEMS",
    "PROBE_RESPONSES",
    "KnownProblem",
    "VersionRange",
    "get_problem",
    "known_problems",
]


@dataclass(frozen=True)
class VersionRange:
    """Affected releases: from ``first`` (inclusive) up to ``fixed`` (exclusive).

    Either end may be None: no known first release (everything before ``fixed``), or no
    release with a fix yet. Versions compare by release only (``2.13.0+cpu`` is ``2.13.0``,
    a ``2.14.0.dev`` nightly counts as 2.14.0).
    """

    #: First affected release; None: the earliest affected release is not known.
    first: Version | None = None
    #: First release without the problem; None: no release fixes it yet.
    fixed: Version | None = None
    #: Whether the sources establish both ends; False marks a range partly inferred.
    confirmed: bool = True
    #: What the sources say about the ends, and what is not confirmed.
    note: str = ""

    def __contains__(self, version: object) -> bool:
        if not isinstance(version, Version):
            return False
        release = Version(version.base_version)
        if self.first is not None and release < self.first:
            return False
        return self.fixed is None or release < self.fixed

    def __str__(self) -> str:
        if self.first is None and self.fixed is None:
            text = "every release so far"
        elif self.first is None:
            text = f"before {self.fixed}"
        elif self.fixed is None:
            text = f"{self.first} and later (no fix released)"
        else:
            text = f"{self.first} up to {self.fixed} (fixed in {self.fixed})"
        return text if self.confirmed else f"{text}, unconfirmed"


Level = Literal["info", "warning"]


@dataclass(frozen=True)
class KnownProblem:
    """One known mps problem: where it applies, what it does, and what is done about it."""

    #: A stable id ("baddbmm-beta0-nan"); doctor's finding code is ``known-`` + id.
    id: str
    #: A short title.
    title: str
    #: What goes wrong, and how a user sees it.
    symptom: str
    #: Affected torch releases; None: any torch.
    torch: VersionRange | None
    #: Affected macOS releases; None: any macOS.
    macos: VersionRange | None = None
    #: Chips it is reported on (matched as words of the chip's name: "M5" matches
    #: "Apple M5 Pro"); empty: any Apple chip.
    chips: tuple[str, ...] = ()
    #: Public issues and pull requests ("pytorch #187521", "diffusers PR #13308").
    sources: tuple[str, ...] = ()
    #: What mps_helpers does about it.
    library: str = ""
    #: What the user can do.
    fix: str = ""
    #: The self-test probes that detect it.
    probes: tuple[str, ...] = ()
    #: "info" where the library works around it or it rarely reaches pipelines, "warning"
    #: where outputs may be wrong and nothing automatic helps.
    level: Level = "info"

    @property
    def confirmed(self) -> bool:
        """True when every range's ends are established by the sources."""
        return all(r.confirmed for r in (self.torch, self.macos) if r is not None)

    def applies_to(self, env: Environment) -> bool:
        """Return True when the problem can hit mps on this machine.

        Only a native Python on an Apple Silicon Mac with torch installed can use mps; an
        unknown macOS or chip does not match a problem limited to some macOS or chips.
        """
        if not env.is_apple_silicon or env.is_rosetta or env.torch_version is None:
            return False
        if self.torch is not None and env.torch_version not in self.torch:
            return False
        if self.macos is not None and (
            env.macos_version is None or env.macos_version not in self.macos
        ):
            return False
        if self.chips:
            chip = env.chip or ""
            return any(re.search(rf"\b{re.escape(c)}\b", chip) for c in self.chips)
        return True

    def where(self) -> str:
        """Return where it applies, in words: "torch before 2.14, unconfirmed; macOS 15.0 ..."."""
        parts = []
        if self.torch is not None:
            parts.append(f"torch {self.torch}")
        else:
            parts.append("any torch")
        if self.macos is not None:
            parts.append(f"macOS {self.macos}")
        if self.chips:
            parts.append("chips " + ", ".join(self.chips))
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (ranges as {"first", "fixed", "confirmed", "note"})."""

        def rng(r: VersionRange | None) -> dict[str, Any] | None:
            if r is None:
                return None
            return {
                "first": None if r.first is None else str(r.first),
                "fixed": None if r.fixed is None else str(r.fixed),
                "confirmed": r.confirmed,
                "note": r.note,
            }

        return {
            "id": self.id,
            "title": self.title,
            "symptom": self.symptom,
            "torch": rng(self.torch),
            "macos": rng(self.macos),
            "chips": list(self.chips),
            "sources": list(self.sources),
            "library": self.library,
            "fix": self.fix,
            "probes": list(self.probes),
            "level": self.level,
        }


def _v(text: str) -> Version:
    return Version(text)


#: The known mps problems. Each number was checked against its public thread; where a thread
#: does not establish an end of a range, the range says ``confirmed=False`` and why.
KNOWN_PROBLEMS: Final[tuple[KnownProblem, ...]] = (
    KnownProblem(
        id="baddbmm-beta0-nan",
        title="baddbmm does not ignore its input when beta=0",
        symptom=(
            "torch.baddbmm(input, a, b, beta=0) on mps propagates NaN and inf from input, "
            "which the documentation says is ignored. diffusers' sliced attention "
            "(enable_attention_slicing) passes an uninitialised torch.empty there: NaN or "
            "black images, now and then."
        ),
        torch=VersionRange(
            fixed=_v("2.14"),
            confirmed=False,
            note=(
                "The fix (pytorch PR #187522) was merged on 2026-06-17, after the 2.13.0 "
                "release branch, and 2.13.0 still has the bug; that 2.14.0 ships the fix is "
                "not confirmed. The earliest affected release is not known (reports from the "
                "2.1 nightlies in diffusers PR #2643 and from 2.4.1 in InvokeAI #7066)."
            ),
        ),
        sources=(
            "pytorch #187521",
            "pytorch PR #187522",
            "pytorch #194442",
            "diffusers #11229",
            "diffusers #14438",
        ),
        library=(
            "With attention slicing on, installs its own chunked-SDPA processor "
            "(attention_processor='safe', the default), which never calls baddbmm."
        ),
        fix="Keep attention_processor='safe'; or upgrade torch to a release with the fix.",
        probes=("baddbmm_beta0",),
    ),
    KnownProblem(
        id="sdpa-noncontiguous-query",
        title="SDPA ignores a non-contiguous query's strides (torch 2.8)",
        symptom=(
            "scaled_dot_product_attention's fast Metal kernels (query length 8 or less, head "
            "dim 64, 96 or 128) read a non-contiguous query, as view(...).transpose(1, 2) "
            "makes it, with the wrong strides: wrong attention output, no error."
        ),
        torch=VersionRange(
            first=_v("2.8"),
            fixed=_v("2.9"),
            confirmed=False,
            note=(
                "The regression is in 2.8.0 (pytorch #163597); the fix (pytorch PR #163598) "
                "was asked into the 2.9 milestone; that 2.9.0 has it is not confirmed."
            ),
        ),
        sources=("pytorch #163597", "pytorch PR #163598"),
        library=(
            "On mps the safe attention processor hands SDPA contiguous blocks; on torch in "
            "this range the plan turns attention slicing on so that it is used."
        ),
        fix="Upgrade torch to 2.9 or newer.",
        probes=("sdpa_noncontiguous",),
    ),
    KnownProblem(
        id="sdpa-permuted-batch",
        title="SDPA wrong for permuted q/k/v with batch > 1",
        symptom=(
            "scaled_dot_product_attention on q/k/v made by permute(0, 2, 1, 3) with batch > 1 "
            "and head dim 64 or more returns wrong values, even at tiny sizes; .contiguous() "
            "restores them. diffusers' attention builds q/k/v this way, and classifier-free "
            "guidance makes the batch 2."
        ),
        torch=VersionRange(
            first=_v("2.8"),
            fixed=_v("2.12"),
            confirmed=False,
            note=(
                "The fix (pytorch PR #181151, merged 2026-04-23) was cherry-picked for "
                "release/2.12 as critical. The first affected release is not stated: 2.8 is "
                "assumed, the release that brought the Metal SDPA kernels the fix changes."
            ),
        ),
        sources=("pytorch #181133", "pytorch PR #181151"),
        library=(
            "On mps the safe attention processor hands SDPA contiguous blocks; on torch in "
            "this range the plan turns attention slicing on so that it is used."
        ),
        fix="Upgrade torch to 2.12 or newer.",
        probes=("sdpa_permuted",),
    ),
    KnownProblem(
        id="sdpa-large-scores",
        title="SDPA corrupted past 2**32 score elements",
        symptom=(
            "scaled_dot_product_attention output is silently corrupted when batch x heads x "
            "queries x keys exceeds 2**32 (SD 1.5 at 1024 px, Flux and video models); "
            "ComfyUI #14837 sees corruption from about 2**31."
        ),
        torch=VersionRange(
            first=_v("2.0"),
            confirmed=False,
            note=(
                "A fix (pytorch PR #179592, April 2026) exists; which release first has it is "
                "not confirmed, so no release is counted as fixed. 2.0 is the first release "
                "with scaled_dot_product_attention."
            ),
        ),
        sources=("pytorch #179352", "pytorch PR #179592", "pytorch #149261", "ComfyUI #14837"),
        library=(
            "The safe attention processor keeps every score block at or under 2**28 "
            "elements (the plan's attention_chunk_elements)."
        ),
        fix="Keep attention slicing on for large images and videos (the plan's default on mps).",
        probes=("sdpa_long",),
    ),
    KnownProblem(
        id="bmm-large-output",
        title="bmm wrong past 2**32 elements",
        symptom=(
            "bmm returns wrong results, without error, when the output has more than 2**32 "
            "elements and an input is non-contiguous, or when an input has more than 2**32 "
            "elements (the scores @ values product of eager attention)."
        ),
        torch=VersionRange(
            first=_v("2.4"),
            note="Tested on every release from 2.4.1 to 2.14.0 (M2 Ultra); still open.",
        ),
        sources=("pytorch #197636",),
        library=(
            "Attention score blocks stay at or under 2**28 elements (safe processor), far "
            "from the limit."
        ),
        fix="Keep attention slicing on for large images and videos (the plan's default on mps).",
        probes=("bmm_large",),
    ),
    KnownProblem(
        id="conv3d-ncdhw-macos26",
        title="conv3d wrong for contiguous (NCDHW) inputs on macOS 26.2",
        symptom=(
            "Conv3d on the default contiguous (NCDHW) layout returns values unrelated to the "
            "CPU's for most channel counts (video VAEs, 3-D UNets); channels_last_3d inputs "
            "come out right."
        ),
        torch=None,
        macos=VersionRange(
            first=_v("26.2"),
            fixed=_v("26.3"),
            confirmed=False,
            note=(
                "Reported on macOS 26.2 (25C56) and gone after updating to 26.7; the "
                "maintainers' check pointed at 26.3 as good. Earlier 26.x releases and the "
                "torch releases involved are not established."
            ),
        ),
        sources=("pytorch #197114",),
        library="No automatic workaround: doctor reports it and the conv3d probe detects it.",
        fix="Update macOS to 26.3 or newer (System Settings > General > Software Update).",
        probes=("conv3d",),
        level="warning",
    ),
    KnownProblem(
        id="conv3d-channels-last",
        title="conv3d wrong for channels_last_3d inputs (torch 2.5)",
        symptom=(
            "Conv3d on channels_last_3d inputs returns wrong output: LTX-Video renders noise "
            "where torch 2.4.1 rendered it correctly."
        ),
        torch=VersionRange(
            first=_v("2.5"),
            fixed=_v("2.6"),
            confirmed=False,
            note=(
                "The regression came after 2.4.1 (pytorch #141471, seen on 2.5.1); the fix "
                "(pytorch PR #141780) was merged on 2024-12-01, before 2.6, but its presence "
                "in 2.6.0 is not confirmed."
            ),
        ),
        sources=("pytorch #141471", "pytorch PR #141780"),
        library="Never converts models or inputs to channels_last_3d.",
        fix="Upgrade torch to 2.6 or newer (or stay on 2.4.1).",
        probes=("conv3d",),
    ),
    KnownProblem(
        id="conv2d-noncontiguous-weight",
        title="conv2d misreads a non-contiguous weight (macOS 15+)",
        symptom=(
            "F.conv2d reads a non-contiguous weight, such as w[:, :, k] sliced out of a 3-D "
            "kernel, as if it were contiguous: results wrong by orders of magnitude."
        ),
        torch=VersionRange(
            confirmed=False,
            note=(
                "It came with the strided-tensor support for macOS 15 (pytorch PR #128393); "
                "the fix (pytorch PR #192303) was merged on 2026-08-06. Neither the first "
                "affected nor the first fixed release is confirmed."
            ),
        ),
        macos=VersionRange(first=_v("15.0"), note="Strided tensors are used from macOS 15."),
        sources=("pytorch #192212", "pytorch PR #192303"),
        library=(
            "Pipelines' weights stay contiguous (the library never slices or permutes them); "
            "code that slices conv weights itself is affected."
        ),
        fix="Call .contiguous() on sliced conv weights; or upgrade torch once a release has it.",
        probes=("conv2d_noncontiguous_weight",),
    ),
    KnownProblem(
        id="non-blocking-copy",
        title="non_blocking CPU-to-mps copies can corrupt weights",
        symptom=(
            "A non_blocking copy to mps can read its CPU source after that memory is freed: "
            "silently corrupted weights when loading with device_map='mps' (extreme values, "
            "NaN, black images)."
        ),
        torch=VersionRange(
            confirmed=False,
            note=(
                "diffusers PR #14556 says torch before 2.13 is affected; pytorch #189690, "
                "filed after 2.13.0, is still open, so no release is counted as fixed."
            ),
        ),
        sources=(
            "diffusers #13227",
            "diffusers PR #13308",
            "diffusers PR #14556",
            "pytorch #189690",
            "pytorch #139550",
        ),
        library=(
            "Never copies to mps with non_blocking and never loads with device_map: "
            "load_pipeline loads on the CPU, then moves the pipeline with a blocking .to()."
        ),
        fix="Load without device_map='mps' (load, then .to('mps')), as load_pipeline does.",
    ),
    KnownProblem(
        id="black-images-m3ultra-m5",
        title="Black or noise images on M3 Ultra and M5 chips",
        symptom=(
            "SDXL gives black or noise images, with no error, on an M3 Ultra (256 GB) and an "
            "M5, where an M3 Max works; one analysis traces it to several mps bugs at once "
            "(pytorch #163597 among them)."
        ),
        torch=VersionRange(
            confirmed=False,
            note=(
                "An open report (ComfyUI #10681): the M3 Ultra's torch is not given, the M5 ran "
                "2.11.0; the torch and macOS ranges are not established."
            ),
        ),
        chips=("M3 Ultra", "M5"),
        sources=("ComfyUI #10681",),
        library=(
            "The NaN guard decodes a NaN image again in float32; the self-tests show which "
            "operation is wrong on the machine."
        ),
        fix=(
            "Run `mps-helpers doctor --probe --json` and attach its output to a bug report "
            "(docs/explanation/known-problems.md)."
        ),
        probes=("sdpa_noncontiguous", "sdpa_permuted", "conv2d_noncontiguous_weight"),
        level="warning",
    ),
)

_BY_ID: Final = {p.id: p for p in KNOWN_PROBLEMS}


def get_problem(problem_id: str) -> KnownProblem:
    """Return the known problem with this id; KeyError (naming the valid ids) otherwise."""
    try:
        return _BY_ID[problem_id]
    except KeyError:
        raise KeyError(f"no known problem {problem_id!r}; known: {', '.join(_BY_ID)}") from None


def known_problems(env: Environment | None = None) -> tuple[KnownProblem, ...]:
    """Return the known mps problems that apply to a machine (its torch, macOS and chip).

    Args:
        env: the machine; None detects this one (:func:`mps_helpers.detect_environment`).
            Off Apple Silicon, under Rosetta or without torch, nothing applies.
    """
    if env is None:
        from mps_helpers._environment import detect_environment

        env = detect_environment()
    return tuple(p for p in KNOWN_PROBLEMS if p.applies_to(env))


#: What the plan does when a probe fails (the rules are in ``mps_helpers._problem_rules``);
#: None where nothing automatic helps.
PROBE_RESPONSES: Final[dict[str, str | None]] = {
    "sdpa_long": "attention slicing on, with score blocks 4x smaller than the size that failed",
    "sdpa_noncontiguous": "attention slicing on: the safe processor hands SDPA contiguous blocks",
    "sdpa_permuted": "attention slicing on: the safe processor hands SDPA contiguous blocks",
    "baddbmm_beta0": "the safe attention processor, which never calls baddbmm",
    "bmm_large": "attention slicing on, with score blocks 4x smaller than the size that failed",
    "conv2d_noncontiguous_weight": None,
    "conv3d": None,
    "group_norm_half": "float32 instead of float16",
    "upsample_half": "float32 instead of float16",
    "softmax_half": "float32 instead of float16",
}
