"""Device self-tests: small numeric checks of the operations diffusion pipelines rely on.

mps bugs come and go with torch, macOS and the chip, and many are silent: wrong numbers, no
error. :func:`probe_device` runs each probe of :data:`PROBES` on a device against a float64
reference computed on the CPU from the same (rounded) inputs, and reports ``"pass"``,
``"wrong"`` or ``"error"`` with the size of the error. The probes are sized to take a few
seconds in all; the ones whose bug needs more memory than a probe may take are scaled down,
and :data:`PROBE_INFO` says how.

Results are cached per (device, torch, macOS, chip) in the user's cache directory
(:func:`cache_dir`), so that the plan can follow what the device actually does without
running the probes again: :func:`cached_reports` reads them for a machine.

Nothing here imports torch at module level; the probes import it when they run.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

    import torch

    from mps_helpers._environment import Environment

__all__ = [
    "PROBES",
    "PROBE_INFO",
    "ProbeInfo",
    "ProbeReport",
    "ProbeResult",
    "cache_dir",
    "cached_reports",
    "probe_device",
    "save_report",
]

Status = Literal["pass", "wrong", "error"]

#: Environment variable that overrides the cache directory (tests point it at a temporary one).
CACHE_ENV: Final = "MPS_HELPERS_CACHE_DIR"
#: Version of the cached file's layout; files of another version are ignored.
CACHE_FORMAT: Final = 1
#: The devices a probe can run on.
PROBE_DEVICES: tuple[str, ...] = ("mps", "cuda", "cpu")

#: Largest relative error (``max|got - reference| / max|reference|``) that passes, per dtype.
#: Half-precision rounding gives ~1e-3 on these sizes (bfloat16 ~3e-3), float32 ~1e-6 but
#: 3e-4 where convolutions run in TF32 (CUDA's default; H200, torch 2.11); the bugs the
#: probes look for give errors of order 1, inf or NaN.
TOLERANCE: Final[Mapping[str, float]] = {"float16": 2e-2, "bfloat16": 5e-2, "float32": 5e-3}


@dataclass(frozen=True)
class ProbeInfo:
    """What one probe checks, which known problems it looks for and how it is scaled."""

    #: The probe's name (a key of :data:`PROBE_INFO`).
    name: str
    #: One sentence: the computation and the inputs.
    checks: str
    #: Ids of the known problems it detects (``mps_helpers._known_problems``).
    problems: tuple[str, ...]
    #: How it is scaled down from the size at which the bug appears ("" when it is not).
    scaled: str = ""
    #: "compute" (the pipeline's dtype: float16 on mps and CUDA, float32 on the CPU) or a
    #: fixed dtype name.
    dtype: str = "compute"
    #: Elements of the largest tensor it makes (the size the plan bounds attention below when
    #: a size-bound probe fails).
    elements: int = 0


#: Every probe, in the order they run. The plan's responses are in ``mps_helpers._problem_rules``.
PROBE_INFO: Final[Mapping[str, ProbeInfo]] = {
    info.name: info
    for info in (
        ProbeInfo(
            "sdpa_long",
            "scaled_dot_product_attention over 4,096 queries and keys (1 x 4 heads x 4096 x "
            "4096 = 2**26 score elements, head dim 40 as SD 1.5's largest blocks), 128 query "
            "rows compared.",
            ("sdpa-large-scores",),
            "2**26 score elements instead of the 2**32 past which mps corrupts SDPA: it catches "
            "a long-sequence failure at SD 1.5 sizes, not the 2**32 limit itself.",
            elements=2**26,
        ),
        ProbeInfo(
            "sdpa_noncontiguous",
            "scaled_dot_product_attention with 7 queries, 256 keys, head dim 64, q/k/v made by "
            "view(...).transpose(1, 2) (non-contiguous), as text encoders and BERT-style code "
            "build them.",
            ("sdpa-noncontiguous-query",),
        ),
        ProbeInfo(
            "sdpa_permuted",
            "scaled_dot_product_attention with batch 8, 3 heads, 3 tokens, head dim 64, q/k/v "
            "made by permute(0, 2, 1, 3).",
            ("sdpa-permuted-batch",),
        ),
        ProbeInfo(
            "baddbmm_beta0",
            "baddbmm(input, a, b, beta=0, alpha=1/sqrt(40)) with input filled with NaN (what "
            "an uninitialised torch.empty may hold), as diffusers' sliced attention calls it: "
            "the result must be alpha * a @ b, without NaN.",
            ("baddbmm-beta0-nan",),
        ),
        ProbeInfo(
            "bmm_large",
            "bmm of (64, 512, 40) by a transposed (non-contiguous) (64, 40, 512): a 2**24-element "
            "output, batch items 0, 32 and 63 compared.",
            ("bmm-large-output",),
            "a 2**24-element output instead of the 2**32 past which mps bmm is wrong: it "
            "checks the large batched-output path with a non-contiguous input at 64 MiB "
            "(float32) instead of 16 GiB.",
            elements=2**24,
        ),
        ProbeInfo(
            "conv2d_noncontiguous_weight",
            "conv2d of (2, 32, 16, 16) with the weight w[:, :, 1] sliced out of a (8, 32, 3, 3, "
            "3) tensor (non-contiguous), padding 1.",
            ("conv2d-noncontiguous-weight",),
        ),
        ProbeInfo(
            "conv3d",
            "conv3d of (1, 8, 5, 12, 12) by (8, 8, 3, 3, 3), padding 1, with the input "
            "contiguous (NCDHW) and in channels_last_3d; the larger error counts.",
            ("conv3d-ncdhw-macos26", "conv3d-channels-last"),
        ),
        ProbeInfo(
            "group_norm_half",
            "group_norm of (2, 64, 16, 16) float16 inputs with mean 5 and spread 3 (32 groups, "
            "affine), as UNet and VAE blocks normalise.",
            (),
            dtype="float16",
        ),
        ProbeInfo(
            "upsample_half",
            "interpolate x2 of a (2, 32, 16, 16) float16 input made by permute (non-contiguous), "
            "nearest (diffusers' Upsample2D) and bilinear; the larger error counts.",
            (),
            dtype="float16",
        ),
        ProbeInfo(
            "softmax_half",
            "softmax over rows of 4,096 float16 scores with values up to ~30, where a softmax "
            "that does not subtract the row maximum overflows float16.",
            (),
            dtype="float16",
        ),
    )
}
#: The probes' names, in the order they run.
PROBES: tuple[str, ...] = tuple(PROBE_INFO)


# ---------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class ProbeResult:
    """The outcome of one probe: pass, wrong (with the error size) or error (it raised)."""

    #: The probe's name (one of :data:`PROBES`).
    name: str
    #: "pass", "wrong" (numbers off by more than ``tolerance``, or not finite) or "error".
    status: Status
    #: ``max|got - reference| / max|reference|`` (inf when the result holds NaN or inf); None
    #: when the probe raised.
    error: float | None
    #: The largest ``error`` that passes.
    tolerance: float
    #: The dtype the device computed in ("float16", ...).
    dtype: str
    #: What was computed, with per-case errors where a probe has several cases.
    detail: str = ""
    #: The exception (type and message) when ``status`` is "error".
    message: str | None = None
    #: Elements of the largest tensor the probe made (the size the plan bounds below).
    elements: int = 0
    #: Wall time of the probe, reference included.
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        """True when the status is "pass"."""
        return self.status == "pass"

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (an infinite error is the string "inf")."""
        out = dataclasses.asdict(self)
        if self.error is not None and not math.isfinite(self.error):
            out["error"] = "inf"
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProbeResult:
        """Return the result :meth:`to_dict` wrote."""
        values = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data}
        if values.get("error") == "inf":
            values["error"] = math.inf
        status = values.get("status")
        if status not in ("pass", "wrong", "error"):
            raise ValueError(f"status must be 'pass', 'wrong' or 'error', got {status!r}")
        return cls(**values)

    def line(self) -> str:
        """Return one line for a terminal: status, name, error and tolerance, detail."""
        if self.status == "error":
            size = f"raised {self.message}"
        else:
            size = f"error {_show_error(self.error)} (tolerance {self.tolerance:.0e})"
        return f"[{self.status.upper() if not self.passed else 'pass':>5}] {self.name}: {size}"


@dataclass(frozen=True)
class ProbeReport:
    """The results of :func:`probe_device` on one device of one machine.

    The machine is identified by the torch version, the macOS version and the chip, the key
    under which the report is cached.
    """

    #: "mps", "cuda" or "cpu".
    device: str
    #: The torch version the probes ran under (None: unknown).
    torch_version: str | None
    #: The macOS version (None off macOS).
    macos_version: str | None
    #: The chip's name ("Apple M1 Pro"), None where unknown.
    chip: str | None
    #: One result per probe run, in :data:`PROBES` order.
    results: tuple[ProbeResult, ...]
    #: Wall time of all the probes.
    seconds: float = 0.0
    #: When the probes ran (ISO 8601, UTC).
    created: str = ""

    @property
    def key(self) -> tuple[str, str | None, str | None, str | None]:
        """(device, torch, macOS, chip): the cache key."""
        return (self.device, self.torch_version, self.macos_version, self.chip)

    @property
    def failed(self) -> tuple[ProbeResult, ...]:
        """The results that did not pass."""
        return tuple(r for r in self.results if not r.passed)

    @property
    def passed(self) -> bool:
        """True when every probe passed."""
        return not self.failed

    def result(self, name: str) -> ProbeResult | None:
        """Return the result of the probe ``name``, or None if it did not run."""
        return next((r for r in self.results if r.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (for ``mps-helpers doctor --probe --json``)."""
        return {
            "format": CACHE_FORMAT,
            "device": self.device,
            "torch_version": self.torch_version,
            "macos_version": self.macos_version,
            "chip": self.chip,
            "seconds": self.seconds,
            "created": self.created,
            "results": [r.to_dict() for r in self.results],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProbeReport:
        """Return the report :meth:`to_dict` wrote; ValueError for another format."""
        if data.get("format") != CACHE_FORMAT:
            raise ValueError(f"probe report format {data.get('format')!r}, not {CACHE_FORMAT}")
        return cls(
            device=str(data["device"]),
            torch_version=data.get("torch_version"),
            macos_version=data.get("macos_version"),
            chip=data.get("chip"),
            results=tuple(ProbeResult.from_dict(r) for r in data["results"]),
            seconds=float(data.get("seconds", 0.0)),
            created=str(data.get("created", "")),
        )

    def summary(self) -> str:
        """Return a few lines: the machine, the counts, one line per probe."""
        where = ", ".join(
            part
            for part in (
                f"torch {self.torch_version or 'unknown'}",
                f"macOS {self.macos_version}" if self.macos_version else "",
                self.chip or "",
            )
            if part
        )
        counts = {s: sum(r.status == s for r in self.results) for s in ("pass", "wrong", "error")}
        head = (
            f"Self-tests on {self.device} ({where}): {counts['pass']} passed, "
            f"{counts['wrong']} wrong, {counts['error']} raised, in {self.seconds:.1f} s."
        )
        return "\n".join([head, *(f"  {r.line()}" for r in self.results)])


def _show_error(error: float | None) -> str:
    if error is None:
        return "none"
    if not math.isfinite(error):
        return "inf (NaN or inf in the result)"
    return f"{error:.1e}"


# ---------------------------------------------------------------------------------------
# The probes: each returns (got, reference, detail, elements); got on the device, reference
# in float64 on the CPU. Inputs are drawn in float64 on the CPU, rounded to the dtype, and the
# reference computed from the rounded values, so the error measures the computation only.


_Outcome = tuple[list[tuple[str, "torch.Tensor", "torch.Tensor"]], str, int]


def _draw(gen: torch.Generator, *shape: int, scale: float = 1.0, shift: float = 0.0) -> Any:
    import torch

    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift


def _on(x: torch.Tensor, device: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (x rounded to dtype on the device, the same rounded values in float64 on CPU)."""
    import torch

    rounded = x.to(dtype)
    return rounded.to(device), rounded.to(torch.float64)


def _reference_attention(q: Any, k: Any, v: Any) -> Any:
    scale = q.shape[-1] ** -0.5
    return ((q @ k.transpose(-1, -2)) * scale).softmax(dim=-1) @ v


def _probe_sdpa_long(device: str, dtype: torch.dtype, gen: torch.Generator) -> _Outcome:
    import torch
    import torch.nn.functional as F  # noqa: N812 (torch's own spelling)

    heads, length, dim = 4, 4096, 40
    q, q64 = _on(_draw(gen, 1, heads, length, dim), device, dtype)
    k, k64 = _on(_draw(gen, 1, heads, length, dim), device, dtype)
    v, v64 = _on(_draw(gen, 1, heads, length, dim), device, dtype)
    out = F.scaled_dot_product_attention(q, k, v)
    rows = torch.linspace(0, length - 1, 128).long()
    got = out[:, :, rows.to(out.device)]
    ref = _reference_attention(q64[:, :, rows], k64, v64)
    return [("", got, ref)], "1 x 4 heads x 4096 x 4096, head dim 40", heads * length * length


def _transposed(
    gen: torch.Generator, device: str, dtype: torch.dtype, *, batch: int, length: int, heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return a (batch, heads, length, 64) view made by transposing (batch, length, heads, 64)."""
    x, x64 = _on(_draw(gen, batch, length, heads, 64), device, dtype)
    return x.transpose(1, 2), x64.transpose(1, 2)


def _probe_sdpa_noncontiguous(device: str, dtype: torch.dtype, gen: torch.Generator) -> _Outcome:
    import torch.nn.functional as F  # noqa: N812

    q, q64 = _transposed(gen, device, dtype, batch=1, length=7, heads=4)
    k, k64 = _transposed(gen, device, dtype, batch=1, length=256, heads=4)
    v, v64 = _transposed(gen, device, dtype, batch=1, length=256, heads=4)
    got = F.scaled_dot_product_attention(q, k, v)
    ref = _reference_attention(q64, k64, v64)
    return [("", got, ref)], "batch 1, 4 heads, 7 queries, 256 keys, head dim 64", 4 * 7 * 256


def _probe_sdpa_permuted(device: str, dtype: torch.dtype, gen: torch.Generator) -> _Outcome:
    import torch.nn.functional as F  # noqa: N812

    q, q64 = _transposed(gen, device, dtype, batch=8, length=3, heads=3)
    k, k64 = _transposed(gen, device, dtype, batch=8, length=3, heads=3)
    v, v64 = _transposed(gen, device, dtype, batch=8, length=3, heads=3)
    got = F.scaled_dot_product_attention(q, k, v)
    ref = _reference_attention(q64, k64, v64)
    return [("", got, ref)], "batch 8, 3 heads, 3 tokens, head dim 64", 8 * 3 * 3 * 3


def _probe_baddbmm_beta0(device: str, dtype: torch.dtype, gen: torch.Generator) -> _Outcome:
    import torch

    a, a64 = _on(_draw(gen, 4, 64, 40), device, dtype)
    b, b64 = _on(_draw(gen, 4, 40, 64), device, dtype)
    poisoned = torch.full((4, 64, 64), math.nan, dtype=dtype, device=device)
    alpha = 40**-0.5
    got = torch.baddbmm(poisoned, a, b, beta=0, alpha=alpha)
    ref = (a64 @ b64) * alpha
    return [("", got, ref)], "(4, 64, 40) @ (4, 40, 64), input all NaN, beta=0", 4 * 64 * 64


def _probe_bmm_large(device: str, dtype: torch.dtype, gen: torch.Generator) -> _Outcome:
    import torch

    batch, rows, dim = 64, 512, 40
    a, a64 = _on(_draw(gen, batch, rows, dim), device, dtype)
    b, b64 = _on(_draw(gen, batch, rows, dim), device, dtype)
    out = torch.bmm(a, b.transpose(1, 2))
    picks = [0, batch // 2, batch - 1]
    got = out[picks]
    ref = a64[picks] @ b64[picks].transpose(1, 2)
    detail = "(64, 512, 40) @ transposed (64, 40, 512) -> 2**24 elements"
    return [("", got, ref)], detail, batch * rows * rows


def _probe_conv2d_noncontiguous_weight(
    device: str, dtype: torch.dtype, gen: torch.Generator
) -> _Outcome:
    import torch.nn.functional as F  # noqa: N812

    x, x64 = _on(_draw(gen, 2, 32, 16, 16), device, dtype)
    w5, w5_64 = _on(_draw(gen, 8, 32, 3, 3, 3, scale=0.1), device, dtype)
    got = F.conv2d(x, w5[:, :, 1], padding=1)
    ref = F.conv2d(x64, w5_64[:, :, 1].contiguous(), padding=1)
    return [("", got, ref)], "(2, 32, 16, 16) * w[:, :, 1] of (8, 32, 3, 3, 3)", 2 * 32 * 16 * 16


def _probe_conv3d(device: str, dtype: torch.dtype, gen: torch.Generator) -> _Outcome:
    import torch
    import torch.nn.functional as F  # noqa: N812

    x, x64 = _on(_draw(gen, 1, 8, 5, 12, 12), device, dtype)
    w, w64 = _on(_draw(gen, 8, 8, 3, 3, 3, scale=0.1), device, dtype)
    ref = F.conv3d(x64, w64, padding=1)
    contiguous = F.conv3d(x, w, padding=1)
    channels_last = F.conv3d(x.contiguous(memory_format=torch.channels_last_3d), w, padding=1)
    cases = [("contiguous (NCDHW)", contiguous, ref), ("channels_last_3d", channels_last, ref)]
    return cases, "(1, 8, 5, 12, 12) * (8, 8, 3, 3, 3)", 8 * 5 * 12 * 12


def _probe_group_norm_half(device: str, dtype: torch.dtype, gen: torch.Generator) -> _Outcome:
    import torch
    import torch.nn.functional as F  # noqa: N812

    half = torch.float16
    x, x64 = _on(_draw(gen, 2, 64, 16, 16, scale=3.0, shift=5.0), device, half)
    w, w64 = _on(_draw(gen, 64, scale=0.2, shift=1.0), device, half)
    b, b64 = _on(_draw(gen, 64, scale=0.2), device, half)
    got = F.group_norm(x, 32, w, b)
    ref = F.group_norm(x64, 32, w64, b64)
    return [("", got, ref)], "(2, 64, 16, 16), 32 groups", 2 * 64 * 16 * 16


def _probe_upsample_half(device: str, dtype: torch.dtype, gen: torch.Generator) -> _Outcome:
    import torch
    import torch.nn.functional as F  # noqa: N812

    x, x64 = _on(_draw(gen, 2, 16, 16, 32), device, torch.float16)
    x, x64 = x.permute(0, 3, 1, 2), x64.permute(0, 3, 1, 2)
    cases = []
    for mode in ("nearest", "bilinear"):
        got = F.interpolate(x, scale_factor=2.0, mode=mode)
        ref = F.interpolate(x64, scale_factor=2.0, mode=mode)
        cases.append((mode, got, ref))
    return cases, "(2, 32, 16, 16) permuted, x2", 2 * 32 * 32 * 32


def _probe_softmax_half(device: str, dtype: torch.dtype, gen: torch.Generator) -> _Outcome:
    import torch

    x, x64 = _on(_draw(gen, 8, 4096, scale=8.0), device, torch.float16)
    got = torch.softmax(x, dim=-1)
    ref = torch.softmax(x64, dim=-1)
    return [("", got, ref)], "(8, 4096), values up to ~30", 8 * 4096


_RUNNERS: Final[Mapping[str, Callable[[str, Any, Any], _Outcome]]] = {
    "sdpa_long": _probe_sdpa_long,
    "sdpa_noncontiguous": _probe_sdpa_noncontiguous,
    "sdpa_permuted": _probe_sdpa_permuted,
    "baddbmm_beta0": _probe_baddbmm_beta0,
    "bmm_large": _probe_bmm_large,
    "conv2d_noncontiguous_weight": _probe_conv2d_noncontiguous_weight,
    "conv3d": _probe_conv3d,
    "group_norm_half": _probe_group_norm_half,
    "upsample_half": _probe_upsample_half,
    "softmax_half": _probe_softmax_half,
}


def relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    """Return ``max|got - reference| / max|reference|`` (inf when ``got`` is not all finite)."""
    import torch

    got64 = got.detach().to("cpu", torch.float64)
    if got64.shape != reference.shape:
        return math.inf
    if not bool(torch.isfinite(got64).all()):
        return math.inf
    scale = float(reference.abs().max())
    return float((got64 - reference).abs().max()) / (scale if scale > 0 else 1.0)


def _run_one(name: str, device: str, dtype: torch.dtype) -> ProbeResult:
    import torch

    info = PROBE_INFO[name]
    ran_in = torch.float16 if info.dtype == "float16" else dtype
    dtype_name = str(ran_in).removeprefix("torch.")
    tolerance = TOLERANCE[dtype_name]
    gen = torch.Generator().manual_seed(PROBES.index(name))
    start = time.perf_counter()
    try:
        cases, detail, elements = _RUNNERS[name](device, dtype, gen)
        errors = [(label, relative_error(got, ref)) for label, got, ref in cases]
    except Exception as exc:  # a probe that raises is a result, not a crash
        return ProbeResult(
            name=name,
            status="error",
            error=None,
            tolerance=tolerance,
            dtype=dtype_name,
            message=f"{type(exc).__name__}: {_first_line(str(exc))}",
            elements=info.elements,
            seconds=time.perf_counter() - start,
        )
    worst = max(error for _label, error in errors)
    if len(errors) > 1:
        detail += "; " + ", ".join(f"{label}: {_show_error(e)}" for label, e in errors)
    return ProbeResult(
        name=name,
        status="pass" if worst <= tolerance else "wrong",
        error=worst,
        tolerance=tolerance,
        dtype=dtype_name,
        detail=detail,
        elements=elements,
        seconds=time.perf_counter() - start,
    )


def _first_line(text: str, limit: int = 300) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------
# The public entry point


_DTYPES: Final[Mapping[str, str]] = {
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
}


def probe_device(
    device: str = "auto",
    *,
    dtype: Any = "auto",
    probes: Iterable[str] | None = None,
    cache: bool = True,
    env: Environment | None = None,
) -> ProbeReport:
    """Run the self-tests on ``device`` and return their :class:`ProbeReport`.

    Each probe of :data:`PROBES` computes a small piece of what diffusion pipelines do
    (attention, batched matmul, convolutions, normalisation, upsampling, softmax) on the
    device and compares it with a float64 reference computed on the CPU from the same inputs.
    A probe passes when its relative error is within the dtype's tolerance; one that raises
    is reported as "error", never raised. All of them take a few seconds.

    Example::

        report = mps_helpers.probe_device("mps")
        print(report.summary())
        [r.name for r in report.failed]

    Args:
        device: "auto" (mps where usable, else CUDA, else the CPU), "mps", "cuda" or "cpu".
        dtype: "auto" (float16 on mps and CUDA, float32 on the CPU: what the plan computes in),
            or float16, bfloat16, float32 (a torch dtype or its name). The ``*_half`` probes
            always run in float16.
        probes: the names of the probes to run (a subset of :data:`PROBES`); None runs all.
        cache: save the report in the user's cache directory (:func:`cache_dir`), where
            :func:`mps_helpers.plan_for` and :func:`mps_helpers.prepare_pipeline` find it.
        env: the machine the report is filed under; None detects this one.

    Raises:
        ValueError: an unknown device, dtype or probe name (the message lists the valid ones).
        mps_helpers.DeviceUnavailableError: the device cannot be used here.

    .. versionadded:: 0.1
    """
    if not isinstance(device, str) or device not in ("auto", *PROBE_DEVICES):
        valid = ", ".join(repr(d) for d in ("auto", *PROBE_DEVICES))
        raise ValueError(f"device must be one of {valid}; got {device!r}")
    names = PROBES if probes is None else tuple(probes)
    unknown = [n for n in names if n not in PROBE_INFO]
    if unknown or not names:
        raise ValueError(
            f"probes must be names from {', '.join(PROBES)}; got {list(names)!r}"
            if unknown
            else "probes must name at least one probe"
        )
    dtype_name = _dtype_name(dtype)

    from mps_helpers._environment import Environment, detect_environment

    if env is not None and not isinstance(env, Environment):
        raise TypeError(f"env must be an mps_helpers.Environment or None, got {type(env)!r}")
    machine = detect_environment() if env is None else env
    import torch

    chosen = _choose_device(device, machine)
    if dtype_name is None:
        dtype_name = "float32" if chosen == "cpu" else "float16"
    compute = getattr(torch, dtype_name)
    start = time.perf_counter()
    results = tuple(_run_one(name, chosen, compute) for name in PROBES if name in names)
    report = ProbeReport(
        device=chosen,
        torch_version=None if machine.torch_version is None else str(machine.torch_version),
        macos_version=None if machine.macos_version is None else str(machine.macos_version),
        chip=machine.chip,
        results=results,
        seconds=time.perf_counter() - start,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    if cache:
        save_report(report)
    return report


def _dtype_name(value: Any) -> str | None:
    if isinstance(value, str):
        if value == "auto":
            return None
        name = _DTYPES.get(value.lower().removeprefix("torch."))
        if name is not None:
            return name
    elif type(value).__name__ == "dtype" and type(value).__module__ == "torch":
        name = str(value).removeprefix("torch.")
        if name in ("float16", "bfloat16", "float32"):
            return name
    raise ValueError(
        "dtype must be 'auto', torch.float16, torch.bfloat16, torch.float32 or one of "
        f"{', '.join(repr(k) for k in _DTYPES)}; got {value!r}"
    )


def _choose_device(device: str, env: Environment) -> str:
    from mps_helpers._errors import DeviceUnavailableError

    if device == "auto":
        if env.mps_available and not env.is_rosetta:
            return "mps"
        return "cuda" if env.cuda_available else "cpu"
    if device == "mps" and not env.mps_available:
        raise DeviceUnavailableError("device='mps' cannot be probed: mps is not usable here")
    if device == "cuda" and not env.cuda_available:
        raise DeviceUnavailableError("device='cuda' cannot be probed: CUDA is not usable here")
    return device


# ---------------------------------------------------------------------------------------
# The cache


def user_cache_dir(system: str, environ: Mapping[str, str], home: Path) -> Path:
    """Return the cache directory the OS conventions give (pure: a test passes everything).

    ``$MPS_HELPERS_CACHE_DIR`` wins; then ``~/Library/Caches/mps_helpers`` on macOS,
    ``%LOCALAPPDATA%\\mps_helpers\\Cache`` on Windows, and ``$XDG_CACHE_HOME/mps_helpers``
    (``~/.cache/mps_helpers`` when unset or relative) elsewhere.

    >>> user_cache_dir("Linux", {}, Path("/home/ada")).as_posix()
    '/home/ada/.cache/mps_helpers'
    """
    override = environ.get(CACHE_ENV)
    if override:
        return Path(override)
    if system == "Darwin":
        return home / "Library" / "Caches" / "mps_helpers"
    if system == "Windows":
        local = environ.get("LOCALAPPDATA")
        base = Path(local) if local else home / "AppData" / "Local"
        return base / "mps_helpers" / "Cache"
    xdg = environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else home / ".cache"
    return base / "mps_helpers"


def cache_dir() -> Path:
    """Return this user's cache directory for mps_helpers (it may not exist yet)."""
    return user_cache_dir(platform.system(), os.environ, Path.home())


def _slug(text: str | None) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text or "unknown").strip("_") or "unknown"


def report_path(
    directory: Path,
    device: str,
    torch_version: str | None,
    macos_version: str | None,
    chip: str | None,
) -> Path:
    """Return the file a report with this key is cached in."""
    name = "-".join(
        (_slug(device), "torch" + _slug(torch_version), "macos" + _slug(macos_version), _slug(chip))
    )
    return directory / "probes" / f"{name}.json"


def save_report(report: ProbeReport, directory: Path | None = None) -> Path | None:
    """Write ``report`` to the cache (atomically) and return its path; None if it cannot.

    A cache that cannot be written (read-only home, full disk) is not an error: the report
    is still returned by :func:`probe_device`, only not remembered.
    """
    path = report_path(directory or cache_dir(), *report.key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(report.to_dict(), indent=2), encoding="utf-8")
        temporary.replace(path)
    except OSError:
        return None
    return path


def load_report(path: Path) -> ProbeReport | None:
    """Return the report cached in ``path``, or None when absent, unreadable or of another
    format."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return ProbeReport.from_dict(data)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cached_reports(env: Environment, directory: Path | None = None) -> tuple[ProbeReport, ...]:
    """Return the cached reports for ``env``'s (torch, macOS, chip), one per device probed.

    Only a report made under the same torch, macOS and chip counts: a new torch or a macOS
    update means probing again (``mps-helpers doctor --probe``).
    """
    where = directory or cache_dir()
    key = (
        None if env.torch_version is None else str(env.torch_version),
        None if env.macos_version is None else str(env.macos_version),
        env.chip,
    )
    found = []
    for device in PROBE_DEVICES:
        report = load_report(report_path(where, device, *key))
        if report is not None and report.key == (device, *key):
            found.append(report)
    return tuple(found)
