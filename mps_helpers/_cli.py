"""The command line: ``mps-helpers`` / ``python -m mps_helpers``.

Commands: ``doctor`` (is this machine ready?), ``run`` (an existing script, unchanged, with
every pipeline it loads prepared), ``demo`` (build, prepare, generate, save) and ``fit``
(will a saved model fit here, at this size, and how?).

Only this module prints; every other layer logs or warns. It imports neither torch nor
diffusers at module level: ``run`` must set ``PYTORCH_ENABLE_MPS_FALLBACK`` before torch is
first imported, because torch reads it only then.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import runpy
import sys
import traceback
from typing import TYPE_CHECKING, Any, Final, NoReturn

from mps_helpers._options import OPTIONS
from mps_helpers._version import __version__

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import TracebackType

__all__ = ["build_parser", "main"]

_MARKS = {"ok": "ok", "info": "info", "warning": "WARN", "error": "ERROR"}

FALLBACK_VARIABLE: Final = "PYTORCH_ENABLE_MPS_FALLBACK"

# The options of prepare_pipeline offered on the command line are those of the schema
# (mps_helpers._options) that have a flag; on/off stand for True/False.
# Denoising steps of the tiny demo pipeline: enough to look like a real run, ~1-4 s on a CPU.
TINY_STEPS: Final = 20
# run's own options that take a value (its flags, -h and -v, take none; -m ends the options).
_RUN_VALUED: Final = frozenset(option.flag for option in OPTIONS if option.flag)


class _UsageError(Exception):
    """A usage error found after parsing: reported through the sub-command's parser."""


# ---------------------------------------------------------------------------------------
# doctor


def _cmd_doctor(args: argparse.Namespace) -> int:
    from mps_helpers._checks import check_environment, verdict
    from mps_helpers._environment import detect_environment

    env = detect_environment()
    findings = check_environment(env)
    report = None
    if args.probe is not None:
        report = _run_probes(args.probe, env)
        if report is None:
            return 1
        from mps_helpers._checks import probe_findings

        findings = _by_level((*findings, *probe_findings(report)))
    failed = any(f.level == "error" for f in findings)
    if args.json:
        payload: dict[str, Any] = {
            "environment": env.to_dict(),
            "findings": [f.to_dict() for f in findings],
        }
        if report is not None:
            payload["probes"] = report.to_dict()
        print(json.dumps(payload, indent=2))
        return 1 if failed else 0
    print(env.summary())
    print()
    for f in findings:
        print(f"[{_MARKS[f.level]:>5}] {f.code}: {f.message}")
        if f.fix:
            print(f"        fix: {f.fix}")
    print()
    if report is not None:
        print(report.summary())
        print()
    print(verdict(env, findings))
    return 1 if failed else 0


def _run_probes(device: str, env: Any) -> Any:
    """Run the device self-tests (cached for the plan); None after printing why they cannot."""
    from mps_helpers._errors import DeviceUnavailableError
    from mps_helpers._selftest import probe_device

    try:
        return probe_device(device, env=env)
    except (DeviceUnavailableError, ImportError) as error:
        print(f"mps-helpers doctor: {error}", file=sys.stderr)
        return None


def _by_level(findings: Sequence[Any]) -> tuple[Any, ...]:
    from mps_helpers._checks import LEVELS

    order = {level: i for i, level in enumerate(reversed(LEVELS))}
    return tuple(sorted(findings, key=lambda f: order[f.level]))


# ---------------------------------------------------------------------------------------
# run


def _split_run(tokens: Sequence[str]) -> tuple[list[str], list[str], str | None]:
    """Split ``run``'s arguments into (its options, [target, *target's args], -m or None).

    The first argument that is not an option (or follows ``--``) is the script; ``-m MODULE``
    names a module. Everything after belongs to the script, even if it looks like an option
    of ``run``.
    """
    options: list[str] = []
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if token == "--":
            return options, list(tokens[index + 1 :]), None
        if token == "-m":
            return options, list(tokens[index + 1 :]), "-m"
        if token.startswith("-m") and not token.startswith("--"):
            return options, [token[2:], *tokens[index + 1 :]], "-m"
        if token == "-" or not token.startswith("-"):
            return options, list(tokens[index:]), None
        options.append(token)
        # Only run's own valued options take the next token: an unknown option is reported
        # by argparse, and must not swallow the script's name.
        if token in _RUN_VALUED and index + 1 < len(tokens):
            options.append(tokens[index + 1])
            index += 1
        index += 1
    return options, [], None


def _plan_options(args: argparse.Namespace) -> dict[str, Any]:
    """Return the prepare_pipeline options given on the command line (the others stay auto)."""
    given: dict[str, Any] = {}
    for option in OPTIONS:
        value = getattr(args, option.name, None) if option.flag else None
        if value is not None:
            given[option.name] = option.from_cli(value)
    return given


def _set_fallback_variable() -> None:
    # torch reads the variable once, when it is imported: set it before anything imports torch.
    # An explicit value of the user's (even "0") is kept. The watermark variables are never set:
    # a wrong one can freeze the machine (docs/explanation/guards.md).
    os.environ.setdefault(FALLBACK_VARIABLE, "1")


def _cmd_run(args: argparse.Namespace) -> int:
    _set_fallback_variable()
    if args.verbose:
        _log_to_stderr()
    if args.module is None and not os.path.exists(args.script):
        raise _UsageError(f"can't open file {args.script!r}: no such file or directory")

    from mps_helpers._auto import auto_prepare
    from mps_helpers._quiet import quiet

    try:
        scope = auto_prepare(**_plan_options(args))
        with quiet("torchvision-fallback"):  # entering imports diffusers' pipelines
            scope.__enter__()
    except (TypeError, ValueError) as error:
        raise _UsageError(str(error)) from None
    except ImportError as error:  # diffusers (or torch) is not installed
        print(f"mps-helpers run: {error}", file=sys.stderr)
        return 1
    saved_argv, saved_path0 = sys.argv[:], sys.path[0] if sys.path else None
    try:
        return _run_target(args.module, args.script, args.args)
    finally:
        scope.__exit__(None, None, None)
        sys.argv[:] = saved_argv
        if saved_path0 is not None:
            sys.path[0] = saved_path0


def _run_target(module: str | None, script: str | None, script_args: list[str]) -> int:
    """Run the target as ``__main__`` the way ``python`` would; return its exit status."""
    # sys.path[0] is what `python SCRIPT` / `python -m MODULE` would have put there.
    if module is not None:
        sys.argv[:] = [module, *script_args]
        sys.path[0] = os.getcwd()
    else:
        assert script is not None
        sys.argv[:] = [script, *script_args]
        sys.path[0] = os.path.dirname(os.path.abspath(script))
    try:
        if module is not None:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(script, run_name="__main__")  # type: ignore[arg-type]  # set: module is None
    except SystemExit as exit_:
        return _exit_status(exit_.code)
    except Exception as error:  # the script's own error: report it as Python would
        sys.stdout.flush()
        frames = _script_frames(error)
        if frames is None and isinstance(error, ImportError):
            # runpy found nothing to run (a directory without __main__.py, no such module):
            # no line of the target ran, so its traceback would show runpy's internals only.
            return _fail(
                "run",
                f"{error}: pass a Python script, a directory or zip file holding a "
                "__main__.py, or -m with an importable module",
            )
        traceback.print_exception(type(error), error, frames)
        return 1
    finally:
        sys.stdout.flush()
    return 0


def _exit_status(code: object) -> int:
    """Return the process exit status ``sys.exit(code)`` gives, printing as Python does."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _script_frames(error: BaseException) -> TracebackType | None:
    """Return ``error``'s traceback from the first frame of the target on (None: no frame).

    The frames of this module and runpy at the head are dropped, so that the traceback
    starts in the script, as ``python SCRIPT`` shows it.
    """
    ours = {os.path.abspath(__file__), os.path.abspath(runpy.__file__ or ""), "<frozen runpy>"}
    tb = error.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if name not in ours and os.path.abspath(name) not in ours:
            break
        tb = tb.tb_next
    return tb


def _log_to_stderr() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("mps-helpers: %(message)s"))
    logger = logging.getLogger("mps_helpers")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


# ---------------------------------------------------------------------------------------
# demo


def _cmd_demo(args: argparse.Namespace) -> int:
    from mps_helpers._options import validate_options

    options = _plan_options(args)
    try:
        validate_options(**options)  # usage errors before any output or work
    except ValueError as error:
        raise _UsageError(str(error)) from None

    from mps_helpers._apply import plan_of
    from mps_helpers._demo import check_output, demo_pipeline, generate_image
    from mps_helpers._environment import detect_environment
    from mps_helpers._errors import DeviceUnavailableError

    try:
        output = check_output(args.output)  # before minutes of work, not after
    except OSError as error:
        return _fail("demo", error)
    print(detect_environment().summary())
    print(flush=True)
    tiny = args.model is None
    try:
        pipe = demo_pipeline(args.model, options)
    except (ImportError, OSError, ValueError, DeviceUnavailableError) as error:
        # A missing extra, a model that cannot be found or downloaded (diffusers raises
        # ValueError for some), a device not here. The options were validated above.
        return _fail("demo", error)
    what = "a tiny pipeline with random weights" if tiny else args.model
    print(f"Pipeline: {type(pipe).__name__}, {what}")
    print(plan_of(pipe))
    print()
    steps = args.steps if args.steps is not None or not tiny else TINY_STEPS
    how = f"{steps} steps" if steps is not None else "the model's default number of steps"
    print(f"Generating one image for {args.prompt!r} ({how}) ...", flush=True)
    try:
        result = generate_image(
            pipe, prompt=args.prompt, steps=steps, seed=args.seed, output=output
        )
    except OSError as error:  # the save, after generating
        return _fail("demo", error)
    print(
        f"Saved a {result.width}x{result.height} image to {result.path} "
        f"({result.steps} steps in {result.seconds:.2f} s)."
    )
    if tiny:
        print(
            "Random weights: expect noise. For a real image pass a model, e.g. "
            "--model stable-diffusion-v1-5/stable-diffusion-v1-5 (downloads ~2 GB)."
        )
    return 0


def _fail(command: str, error: BaseException | str) -> int:
    """Print ``error`` as one line on stderr, the way argparse words errors; return 1."""
    message = " ".join(str(error).split())  # one line, whatever the library's message holds
    print(f"mps-helpers {command}: error: {message}", file=sys.stderr)
    return 1


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


# ---------------------------------------------------------------------------------------
# fit


def _cmd_fit(args: argparse.Namespace) -> int:
    """Print the memory a saved pipeline needs, the budget, and the plan that fits."""
    from mps_helpers._plan import validate_options

    try:
        options = validate_options(
            height=args.height, width=args.width, batch_size=args.batch, **_plan_options(args)
        )
    except ValueError as error:
        raise _UsageError(str(error)) from None
    from mps_helpers._budget import read_live_memory
    from mps_helpers._environment import detect_environment
    from mps_helpers._fit import MemoryInputs, check_fit
    from mps_helpers._machines import describe, machine_profile
    from mps_helpers._memory import estimate, settings_from_plan, spec_of_directory

    try:
        spec = spec_of_directory(args.model)
    except FileNotFoundError as error:
        print(f"mps-helpers fit: {error}", file=sys.stderr)
        return 2
    from mps_helpers._facts import facts_of_directory
    from mps_helpers._plan import make_plan

    if args.machine:
        env, where = machine_profile(args.machine), f"{args.machine} ({describe(args.machine)})"
        live = None
    else:
        env, where, live = detect_environment(), "this machine", read_live_memory()
    inputs = MemoryInputs(spec, live, frames=args.frames)
    from pathlib import Path

    plan = make_plan(facts_of_directory(Path(args.model)), env, options, memory=inputs)
    result = estimate(
        spec,
        settings_from_plan(plan, torch_version=env.torch_version),
        height=args.height,
        width=args.width,
        frames=args.frames if args.frames is not None else spec.default_frames,
        batch_size=args.batch,
    )
    verdict = check_fit(inputs, plan, env)
    fits = verdict is None or verdict[0]
    decisions = (
        "memory_tight",
        "attention_slicing",
        "attention_chunk_elements",
        "vae_slicing",
        "vae_tiling",
        "batch_to_loop",
        "release_text_encoders",
    )
    if args.json:
        payload = {
            "model": str(args.model),
            "machine": where,
            "estimate": result.to_dict(),
            "fits": fits,
            "verdict": None if verdict is None else verdict[1],
            "plan": plan.to_dict(),
        }
        print(json.dumps(payload, indent=2, default=str))
        return 0 if fits else 1
    print(f"Model:   {spec.pipeline_class or 'unknown pipeline'}, {args.model}")
    print(f"Machine: {where}")
    print(result)
    print()
    print(f"Plan on {plan.device}, {str(plan.dtype).removeprefix('torch.')}:")
    width = max(len(name) for name in decisions)
    for name in decisions:
        value = getattr(plan, name)
        shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else value
        print(f"  {name:<{width}}  {shown!s:<10}  {plan.reasons[name]}")
    print()
    if verdict is None:
        print("Budget unknown here: no verdict.")
    else:
        print(("Fits: " if fits else "Does not fit: ") + verdict[1] + ("" if fits else "."))
    return 0 if fits else 1


# ---------------------------------------------------------------------------------------
# parser


def _add_plan_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "plan options", "force a decision of the plan (default: decided for this machine)"
    )
    for option in OPTIONS:
        if option.flag:
            group.add_argument(
                option.flag,
                dest=option.name,
                choices=option.cli_choices,
                default=None,
                help=option.cli_help,
            )


def _build() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    from mps_helpers._demo import DEFAULT_OUTPUT, DEFAULT_PROMPT

    parser = argparse.ArgumentParser(
        prog="mps-helpers",
        description="Run Hugging Face diffusers pipelines well on Apple Silicon, CUDA and CPU.",
    )
    parser.add_argument("--version", action="version", version=f"mps_helpers {__version__}")
    # Not required=True: argparse would then report a missing COMMAND before an unknown
    # option; _parse says both.
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    doctor = sub.add_parser(
        "doctor",
        help="report whether this machine is ready for diffusers on mps, with fixes",
        description="Report the environment, the readiness findings and the known mps "
        "problems of this torch, macOS and chip, with their fixes; with --probe, also the "
        "device self-tests. Exit status 0 when no finding is an error, 1 when one is.",
    )
    doctor.add_argument("--json", action="store_true", help="print machine-readable JSON")
    doctor.add_argument(
        "--probe",
        nargs="?",
        const="auto",
        choices=("auto", "mps", "cuda", "cpu"),
        metavar="DEVICE",
        help="also run the numeric self-tests (a few seconds) on DEVICE: auto (default: the "
        "device the plan would use), mps, cuda or cpu; the results are cached for the plan",
    )
    doctor.set_defaults(handler=_cmd_doctor)

    run = sub.add_parser(
        "run",
        help="run a Python script unchanged, with every pipeline it loads prepared",
        usage="%(prog)s [OPTIONS] (SCRIPT | -m MODULE) [ARGS ...]",
        description="Run SCRIPT (or -m MODULE) as __main__ with ARGS as its sys.argv, with "
        "auto_prepare active for the whole run: every pipeline it creates through "
        "from_pretrained, from_single_file or from_pipe comes out prepared. Sets "
        f"{FALLBACK_VARIABLE}=1 before torch is imported unless already set. Exits with the "
        "script's exit status. Options go before SCRIPT; everything after it is the script's.",
    )
    run.add_argument("-m", dest="module", metavar="MODULE", help="run a module, as python -m")
    run.add_argument("-v", "--verbose", action="store_true", help="log the library's decisions")
    run.add_argument("script", nargs="?", metavar="SCRIPT", help="the script to run")
    run.add_argument("args", nargs="*", metavar="ARGS", help="the script's own arguments")
    _add_plan_options(run)
    run.set_defaults(handler=_cmd_run)

    demo = sub.add_parser(
        "demo",
        help="build, prepare and run a pipeline, then save the image (works offline)",
        description="Build a pipeline (by default a tiny one with random weights, built "
        "offline; --model loads a real one), prepare it, print the environment and the plan "
        "with its reasons, generate one image and save it as PNG.",
    )
    demo.add_argument(
        "--output", "-o", default=DEFAULT_OUTPUT, metavar="PATH", help="%(default)s by default"
    )
    demo.add_argument(
        "--model", metavar="PATH_OR_ID", help="a diffusers model (Hub id or local directory)"
    )
    demo.add_argument("--prompt", default=DEFAULT_PROMPT, help="%(default)r by default")
    demo.add_argument(
        "--steps",
        type=_positive_int,
        metavar="N",
        help=f"denoising steps (default: {TINY_STEPS} for the tiny pipeline, the model's own "
        "otherwise)",
    )
    demo.add_argument("--seed", type=int, default=0, help="noise seed (default %(default)s)")
    _add_plan_options(demo)
    demo.set_defaults(handler=_cmd_demo)

    fit = _fit_parser(sub)
    return parser, {"doctor": doctor, "run": run, "demo": demo, "fit": fit}


def _fit_parser(sub: Any) -> argparse.ArgumentParser:
    from mps_helpers._machines import MACHINE_PROFILES

    fit: argparse.ArgumentParser = sub.add_parser(
        "fit",
        help="will a saved model fit in memory here (or on another machine), and how?",
        description="Predict the memory one call of a saved pipeline needs (weights per "
        "component, working memory per phase, the peak) from its configs and the headers "
        "of its safetensors files, without reading a weight; compare it with the budget of "
        "this machine (or of a named one) and print the plan that fits. Exit status 0 when "
        "it fits, 1 when nothing makes it fit, 2 for usage errors.",
    )
    fit.add_argument("model", metavar="MODEL_DIR", help="a saved diffusers pipeline directory")
    fit.add_argument("--height", type=_positive_int, required=True, help="image height, px")
    fit.add_argument("--width", type=_positive_int, required=True, help="image width, px")
    fit.add_argument("--frames", type=_positive_int, help="frames (video pipelines)")
    fit.add_argument(
        "--batch", type=_positive_int, default=1, help="images per call (default %(default)s)"
    )
    fit.add_argument(
        "--machine",
        choices=MACHINE_PROFILES,
        metavar="NAME",
        help="plan for a named machine instead of this one: " + ", ".join(MACHINE_PROFILES),
    )
    fit.add_argument("--json", action="store_true", help="print machine-readable JSON")
    _add_plan_options(fit)
    fit.set_defaults(handler=_cmd_fit)
    return fit


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``mps-helpers`` command."""
    return _build()[0]


def _parse(argv: list[str]) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    parser, commands = _build()
    if not argv or argv[0] != "run":
        args, unknown = parser.parse_known_args(argv)
        if args.command is None:
            given = f"unrecognized arguments: {' '.join(unknown)}; " if unknown else ""
            parser.error(f"{given}a COMMAND is required: {_or(list(commands))}")
        command = commands[args.command]
        if unknown:  # reported with the usage of the command they were given to
            command.error(f"unrecognized arguments: {' '.join(unknown)}")
        return args, command
    run = commands["run"]
    options, target, module_flag = _split_run(argv[1:])
    args, unknown = parser.parse_known_args(["run", *options])
    if unknown:
        run.error(f"unrecognized arguments: {' '.join(unknown)}")
    if module_flag is not None:
        if not target or not target[0]:
            run.error("argument -m: expected one argument")
        args.module, args.script, args.args = target[0], None, target[1:]
    elif target:
        args.module, args.script, args.args = None, target[0], target[1:]
    else:
        run.error("the following arguments are required: SCRIPT (or -m MODULE)")
    return args, run


def _or(names: list[str]) -> str:
    return f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else "".join(names)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit status (2 for usage errors).

    ``run`` returns the script's own exit status.
    """
    args, command = _parse(list(sys.argv[1:] if argv is None else argv))
    try:
        status: int = args.handler(args)
    except _UsageError as error:
        _usage_error(command, str(error))
    return status


def _usage_error(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    parser.error(message)
