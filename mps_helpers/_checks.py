"""Readiness checks: read an :class:`Environment` and say what stands in the way of mps.

Every rule cites its source in ``EVIDENCE.md`` terms: the diffusers mps guide's requirements,
and the minimum macOS each torch release needs for mps (it rose from 12.3 to 14.0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from packaging.version import Version

if TYPE_CHECKING:
    from collections.abc import Sequence

    from mps_helpers._environment import Environment

__all__ = ["LEVELS", "Finding", "check_environment", "macos_required_by_torch", "verdict"]

Level = Literal["ok", "info", "warning", "error"]

#: Finding levels, from harmless to blocking.
LEVELS: tuple[Level, ...] = ("ok", "info", "warning", "error")

#: The diffusers mps guide's minimum macOS, and the version it recommends.
GUIDE_MIN_MACOS = Version("12.6")
GUIDE_RECOMMENDED_MACOS = Version("13.0")
#: torch 1.13 is the first release the guide supports on mps; 2.0 is recommended.
MIN_TORCH = Version("1.13")
RECOMMENDED_TORCH = Version("2.0")
#: Below this much RAM the library slices attention on mps (the guide's 64 GB rule).
LOW_MEMORY_BYTES = 64 * 2**30
#: Swap in use above this is worth a warning (macOS keeps a little swap in use routinely).
SWAP_WARNING_BYTES = 512 * 2**20

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
    release = Version(torch_version.base_version)
    if release >= Version("2.9"):
        return Version("14.0")
    if release >= Version("2.5"):
        return Version("13.0")
    return Version("12.3")


def _gb(n: int) -> str:
    return f"{n / 2**30:.1f} GB"


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
        fallback = "the CPU (slow: minutes per image at 512 px)"
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
    if mps_machine and env.total_memory is not None and env.total_memory < LOW_MEMORY_BYTES:
        out.append(
            Finding(
                "info",
                "low-memory",
                f"{_gb(env.total_memory)} of unified memory, under 64 GB: the library will "
                "bound attention memory (memory-safe attention slicing) on mps.",
                None,
            )
        )
    if env.swap_used is not None and env.swap_used > SWAP_WARNING_BYTES:
        out.append(
            Finding(
                "warning",
                "swap-in-use",
                f"{_gb(env.swap_used)} of swap is in use: diffusion on unified memory slows "
                "sharply under memory pressure.",
                "Close memory-hungry apps (browsers, other models) before generating, or "
                "generate smaller or fewer images per call.",
            )
        )
    return out
