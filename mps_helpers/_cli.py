"""The command line: ``mps-helpers`` / ``python -m mps_helpers``.

Only this module prints; every other layer logs or warns.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from mps_helpers._version import __version__

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["main"]

_MARKS = {"ok": "ok", "info": "info", "warning": "WARN", "error": "ERROR"}


def _cmd_doctor(args: argparse.Namespace) -> int:
    from mps_helpers._checks import check_environment
    from mps_helpers._environment import detect_environment

    env = detect_environment()
    findings = check_environment(env)
    failed = any(f.level == "error" for f in findings)
    if args.json:
        payload = {
            "environment": env.to_dict(),
            "findings": [f.to_dict() for f in findings],
        }
        print(json.dumps(payload, indent=2))
        return 1 if failed else 0
    print(env.summary())
    print()
    for f in findings:
        print(f"[{_MARKS[f.level]:>5}] {f.code}: {f.message}")
        if f.fix:
            print(f"        fix: {f.fix}")
    print()
    if failed:
        print("Not ready: fix the errors above.")
    elif env.is_apple_silicon:
        print("Ready: diffusers can run on mps.")
    else:
        print("Ready: mps is not available here; pipelines will run on CUDA or the CPU.")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``mps-helpers`` command."""
    parser = argparse.ArgumentParser(
        prog="mps-helpers",
        description="Run Hugging Face diffusers pipelines well on Apple Silicon, CUDA and CPU.",
    )
    parser.add_argument("--version", action="version", version=f"mps_helpers {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    doctor = sub.add_parser(
        "doctor",
        help="report whether this machine is ready for diffusers on mps, with fixes",
        description="Report the environment and readiness findings with their fixes. "
        "Exit status 0 when no finding is an error, 1 when one is.",
    )
    doctor.add_argument("--json", action="store_true", help="print machine-readable JSON")
    doctor.set_defaults(handler=_cmd_doctor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit status (2 for usage errors)."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    status: int = args.handler(args)
    return status
