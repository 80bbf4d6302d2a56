"""Readiness checks: read an :class:`Environment` and say what stands in the way of mps.

Every rule cites its source: the diffusers mps guide's requirements, and the minimum macOS
each torch release needs for mps (it rose from 12.3 to 14.0). ``docs/howto/read-doctor.md``
explains each finding; the known mps problems that apply (``mps_helpers._known_problems``)
and a probe report's failed self-tests become findings here too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from packaging.version import Version

from mps_helpers._reasons import EVIDENCE, SLICING_RAM_THRESHOLD
from mps_helpers._util import MiB, format_bytes, release

if TYPE_CHECKING:
    from collections.abc import Sequence

    from mps_helpers._environment import Environment
    from mps_helpers._selftest import ProbeReport

__all__ = [
    "LEVELS",
    "Finding",
    "check_environment",
    "cuda_findings",
    "macos_required_by_torch",
    "probe_findings",
    "problem_findings",
    "verdict",
]

Level = Literal["ok", "info", "warning", "error"]

#: Finding levels, from harmless to blocking.
LEVELS: tuple[Level, ...] = ("ok", "info", "warning", "error")

#: The diffusers mps guide's minimum macOS, and the version it recommends.
GUIDE_MIN_MACOS = Version("12.6")
GUIDE_RECOMMENDED_MACOS = Version("13.0")
#: torch 1.13 is the first release the guide supports on mps; 2.0 is recommended.
MIN_TORCH = Version("1.13")
RECOMMENDED_TORCH = Version("2.0")
#: Swap in use above this is worth a warning (macOS keeps a little swap in use routinely).
SWAP_WARNING_BYTES = 512 * MiB

_ARM64_PYTHON_FIX = (
    "Install an arm64 (native) Python and reinstall torch into it: for example the "
    "python.org universal2 installer, `brew install python` with Homebrew in /opt/homebrew, "
    'or Miniforge\'s arm64 installer. `python -c "import platform; print(platform.machine())"` '
    "must print arm64."
)


@dataclass(frozen=True)
class Finding:
    """One readiness finding: its level, a stable code, what was found and how to fix it."""

    level: Level
    code: str
    message: str
    fix: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        """Return a JSON-ready dict."""
        return {"level": self.level, "code": self.code, "message": self.message, "fix": self.fix}


def macos_required_by_torch(torch_version: Version) -> Version:
    """Return the oldest macOS on which the given torch release can use mps.

    Read from the macOS arm64 wheels' messages and PyTorch sources: 12.3 up to torch 2.4,
    13.0 for 2.5 - 2.8, 14.0 from 2.9.

    >>> str(macos_required_by_torch(Version("2.5.1")))
    '13.0'
    """
    numbers = release(torch_version)
    if numbers >= (2, 9):
        return Version("14.0")
    if numbers >= (2, 5):
        return Version("13.0")
    return Version("12.3")


def check_environment(env: Environment | None = None) -> tuple[Finding, ...]:
    """Return the readiness findings for a machine, the most serious first.

    Args:
        env: the machine to check; None detects this one (:func:`detect_environment`).
    """
    if env is None:
        from mps_helpers._environment import detect_environment

        env = detect_environment()
    findings = _torch_findings(env)
    if env.is_apple_silicon:
        findings += _mac_findings(env)
    else:
        findings += _other_machine_findings(env)
    findings += _memory_findings(env)
    # Known mps problems of this torch / macOS / chip (mps_helpers._known_problems).
    findings += problem_findings(env)
    order = {level: i for i, level in enumerate(reversed(LEVELS))}
    return tuple(sorted(findings, key=lambda f: order[f.level]))


def verdict(env: Environment, findings: Sequence[Finding]) -> str:
    """Return the one-line conclusion of a readiness report: where pipelines will run.

    It names only what ``env`` found usable: mps, else CUDA, else the CPU; "Not ready"
    when a finding is an error.
    """
    if any(f.level == "error" for f in findings):
        return "Not ready: fix the errors above."
    if env.mps_available and not env.is_rosetta:
        return "Ready: diffusers can run on mps."
    if env.cuda_available:
        return f"Ready: mps is not available here; pipelines will run on CUDA ({_cuda_name(env)})."
    return "Ready: neither mps nor CUDA is usable here; pipelines will run on the CPU (slowly)."


def _cuda_name(env: Environment) -> str:
    return env.cuda_device_name or "GPU 0"


def _torch_findings(env: Environment) -> list[Finding]:
    out: list[Finding] = []
    if env.torch_version is None:
        out.append(
            Finding(
                "error",
                "torch-missing",
                "PyTorch is not installed.",
                "pip install torch (on Linux for CPU only: pip install torch "
                "--index-url https://download.pytorch.org/whl/cpu).",
            )
        )
    elif env.torch_version < MIN_TORCH:
        out.append(
            Finding(
                "error",
                "torch-too-old",
                f"PyTorch {env.torch_version} is older than 1.13, the first release the "
                "diffusers mps guide supports.",
                'pip install --upgrade "torch>=2.0"',
            )
        )
    elif env.torch_version < RECOMMENDED_TORCH:
        out.append(
            Finding(
                "warning",
                "torch-old",
                f"PyTorch {env.torch_version} works but 2.0 or newer is recommended; on 1.13 "
                "the first inference pass differs from later ones, so the library runs a "
                "one-time 1-step warmup pass for you.",
                'pip install --upgrade "torch>=2.0"',
            )
        )
    if env.diffusers_version is None:
        out.append(
            Finding(
                "error", "diffusers-missing", "diffusers is not installed.", "pip install diffusers"
            )
        )
    return out


def _mac_findings(env: Environment) -> list[Finding]:
    out: list[Finding] = []
    if env.is_rosetta:
        out.append(
            Finding(
                "error",
                "rosetta",
                f"This Python is an {env.python_machine or 'x86_64'} build running under "
                "Rosetta 2 on an Apple Silicon Mac: mps cannot be used from it and everything "
                "runs slowly on the CPU.",
                _ARM64_PYTHON_FIX,
            )
        )
    macos = env.macos_version
    if macos is not None:
        needed = GUIDE_MIN_MACOS
        source = "the diffusers mps guide"
        if env.torch_version is not None:
            by_torch = macos_required_by_torch(env.torch_version)
            if by_torch > needed:
                needed, source = by_torch, f"PyTorch {env.torch_version} itself"
        if macos < needed:
            out.append(
                Finding(
                    "error",
                    "macos-too-old",
                    f"macOS {macos} is older than {needed}, the minimum {source} needs for mps.",
                    f"Update macOS to {max(needed, GUIDE_RECOMMENDED_MACOS)} or newer "
                    "(System Settings > General > Software Update)"
                    + (
                        ", or install an older PyTorch that supports this macOS."
                        if needed > GUIDE_MIN_MACOS
                        else "."
                    ),
                )
            )
        elif macos < GUIDE_RECOMMENDED_MACOS:
            out.append(
                Finding(
                    "warning",
                    "macos-old",
                    f"macOS {macos} is supported but 13.0 or newer is recommended for mps.",
                    "Update macOS (System Settings > General > Software Update).",
                )
            )
        if macos < Version("14.0"):
            out.append(
                Finding(
                    "info",
                    "no-bfloat16",
                    f"macOS {macos}: bfloat16 on mps needs macOS 14 or newer, so the library "
                    "uses float16 there.",
                    None,
                )
            )
    if env.torch_version is not None and not env.is_rosetta:
        if not env.mps_built:
            out.append(
                Finding(
                    "error",
                    "mps-not-built",
                    f"This PyTorch ({env.torch_version}) was built without mps support.",
                    "Reinstall the macOS arm64 wheel from PyPI: pip install --force-reinstall "
                    "torch (a conda or source build may lack mps).",
                )
            )
        elif not env.mps_available:
            out.append(
                Finding(
                    "error",
                    "mps-unavailable",
                    "PyTorch has mps support, but no mps device is usable in this process.",
                    "Check the macOS version above, and that no virtual machine or remote "
                    'session hides the GPU; then run: python -c "import torch; '
                    'print(torch.backends.mps.is_available())"',
                )
            )
        else:
            out.append(
                Finding(
                    "ok",
                    "mps-ready",
                    f"mps is usable: {env.chip or 'Apple Silicon'}, macOS {macos}, "
                    f"PyTorch {env.torch_version}.",
                )
            )
            if env.mps_fallback_env is None:
                out.append(
                    Finding(
                        "info",
                        "mps-fallback-off",
                        "PYTORCH_ENABLE_MPS_FALLBACK is not set: an operator mps lacks raises "
                        "an error instead of running on the CPU. torch reads it only at import.",
                        "export PYTORCH_ENABLE_MPS_FALLBACK=1 before starting Python, or run "
                        "scripts with `mps-helpers run SCRIPT`, which sets it.",
                    )
                )
    return out


def _other_machine_findings(env: Environment) -> list[Finding]:
    where = "an Intel Mac" if env.is_macos else f"{env.system or 'this system'} on {env.machine}"
    if env.cuda_available:
        fallback = f"CUDA ({_cuda_name(env)})"
        level: Literal["info"] = "info"
    else:
        fallback = f"the CPU (slow: {EVIDENCE['cpu_sd15'].figure})"
        level = "info"
    return [
        Finding(
            level,
            "not-apple-silicon",
            f"Not an Apple Silicon Mac ({where}): mps cannot be used; the library will use "
            f"{fallback}.",
            None,
        )
    ]


def _memory_findings(env: Environment) -> list[Finding]:
    out: list[Finding] = []
    mps_machine = env.is_apple_silicon
    if mps_machine and env.total_memory is not None and env.total_memory < SLICING_RAM_THRESHOLD:
        out.append(
            Finding(
                "info",
                "low-memory",
                f"{format_bytes(env.total_memory, digits=1)} of unified memory, under "
                f"{format_bytes(SLICING_RAM_THRESHOLD, digits=0)}: the library will bound "
                "attention memory (memory-safe attention slicing) on mps.",
                None,
            )
        )
    if env.swap_used is not None and env.swap_used > SWAP_WARNING_BYTES:
        out.append(
            Finding(
                "warning",
                "swap-in-use",
                f"{format_bytes(env.swap_used, digits=1)} of swap is in use: diffusion on "
                "unified memory slows sharply under memory pressure.",
                "Close memory-hungry apps (browsers, other models) before generating, or "
                "generate smaller or fewer images per call.",
            )
        )
    return out


def cuda_findings(env: Environment) -> tuple[Finding, ...]:
    """Return why CUDA cannot be used on ``env`` (empty when it can), with the fix."""
    if env.cuda_available:
        return ()
    version = env.torch_version
    if version is None:
        why = "torch is not installed"
    elif version.local == "cpu":
        why = f"torch {version} is a CPU-only build"
    else:
        why = f"torch {version} reports no CUDA device on this machine"
    return (
        Finding(
            "error",
            "cuda-unavailable",
            f"no CUDA device is usable: {why}.",
            "Run on a machine with an NVIDIA GPU and a CUDA build of torch, or leave "
            "device='auto' to use what this machine has.",
        ),
    )


# ---------------------------------------------------------------------------------------
# Known problems and failed self-tests (mps_helpers._known_problems, mps_helpers._selftest)


def problem_findings(env: Environment) -> list[Finding]:
    """Return one readiness finding per known problem that applies, with its fix."""
    from mps_helpers._known_problems import known_problems

    out = []
    for problem in known_problems(env):
        out.append(
            Finding(
                problem.level,
                f"known-{problem.id}",
                f"Known mps problem: {problem.title} ({problem.where()}; "
                f"{', '.join(problem.sources)}). {problem.library}",
                problem.fix,
            )
        )
    return out


def probe_findings(report: ProbeReport) -> list[Finding]:
    """Return one finding per failed probe: a warning where the plan works around it (saying
    how), an error where nothing automatic helps."""
    from mps_helpers._known_problems import PROBE_RESPONSES
    from mps_helpers._selftest import PROBE_INFO

    out = []
    for result in report.failed:
        info = PROBE_INFO[result.name]
        names = ", ".join(info.problems) if info.problems else "none recorded yet"
        what = (
            f"raised {result.message}"
            if result.status == "error"
            else f"gave wrong numbers (relative error {result.error:.1e}, tolerance "
            f"{result.tolerance:.0e}; {result.detail})"
        )
        response = PROBE_RESPONSES.get(result.name)
        plan = (
            f"The plan on {report.device} responds: {response}."
            if response
            else "No automatic workaround."
        )
        out.append(
            Finding(
                "warning" if response else "error",
                f"probe-{result.name}",
                f"Self-test {result.name} on {report.device} in {result.dtype} {what}. "
                f"Known problems it detects: {names}. {plan}",
                "Check torch and macOS against docs/explanation/known-problems.md; send "
                "`mps-helpers doctor --probe --json` with a bug report.",
            )
        )
    return out
