"""Tests of the options schema: every public signature, validation, the CLI and the docs read it."""

from __future__ import annotations

import importlib.util
import inspect
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
from machines import MACHINES

import mps_helpers
from mps_helpers import _cli
from mps_helpers._options import (
    DEFAULTS,
    OPTION_NAMES,
    OPTIONS,
    SWITCHES,
    option_values,
    validate_options,
)

if TYPE_CHECKING:
    from collections.abc import Callable

CPU = MACHINES["linux-cpu"]
DOCS = Path(__file__).resolve().parent.parent / "docs"


#: Keyword-only parameters of the public functions that are not plan options (not in the
#: schema, so not CLI flags): the machine, and the self-test reports a plan follows.
NON_OPTIONS: dict[str, set[str]] = {
    "prepare_pipeline": {"env"},
    "load_pipeline": {"env"},
    "plan_for": {"env", "probes"},
}


def signature_drift(
    func: Callable[..., Any], non_options: frozenset[str] = frozenset({"env"})
) -> list[str]:
    """Return how ``func``'s keyword-only plan options differ from the schema (empty: none).

    ``non_options`` are the documented keywords that are not options (``env``, ``probes``).
    """
    params = [
        p
        for p in inspect.signature(func).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in non_options
    ]
    problems: list[str] = []
    names = [p.name for p in params]
    if names != list(OPTION_NAMES):
        missing = [n for n in OPTION_NAMES if n not in names]
        extra = [n for n in names if n not in OPTION_NAMES]
        problems.append(f"names/order {names} (missing {missing}, extra {extra})")
    for p in params:
        if p.name in DEFAULTS and p.default != DEFAULTS[p.name]:
            problems.append(f"{p.name} defaults to {p.default!r}, not {DEFAULTS[p.name]!r}")
    return problems


PUBLIC = {
    "prepare_pipeline": mps_helpers.prepare_pipeline,
    "load_pipeline": mps_helpers.load_pipeline,
    "plan_for": mps_helpers.plan_for,
}


@pytest.mark.parametrize("name", list(PUBLIC))
def test_public_signatures_list_the_schemas_options(name: str) -> None:
    assert signature_drift(PUBLIC[name], frozenset(NON_OPTIONS[name])) == []


@pytest.mark.parametrize("name", list(PUBLIC))
def test_the_non_option_keywords_are_documented_and_not_options(name: str) -> None:
    func = PUBLIC[name]
    keywords = {
        p.name
        for p in inspect.signature(func).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in OPTION_NAMES
    }
    assert keywords == NON_OPTIONS[name]
    # Documented in the function's Args, or in plan_for's (whose options the others share).
    docs = (func.__doc__ or "") + (mps_helpers.plan_for.__doc__ or "")
    for keyword in keywords:
        assert keyword not in DEFAULTS
        assert re.search(rf"^\s+{keyword}\b.*:", docs, re.MULTILINE), keyword


def test_probes_is_not_an_option_of_the_schema_or_the_cli() -> None:
    with pytest.raises(TypeError, match="probes"):
        validate_options(probes=None)
    # plan_for takes it (its reports are results, read from the cache by default).
    assert mps_helpers.plan_for(env=CPU, probes=None).device == "cpu"


def test_the_signature_check_fails_when_a_signature_drifts() -> None:
    def bare(*, env: Any = None, **_: Any) -> None: ...

    # A signature built from the schema passes; each kind of drift is reported.
    params = [inspect.Parameter("env", inspect.Parameter.KEYWORD_ONLY, default=None)]
    params += [
        inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=o.default)
        for o in OPTIONS
    ]

    def with_params(ps: list[inspect.Parameter]) -> Callable[..., Any]:
        def func(**kwargs: Any) -> None: ...

        func.__signature__ = inspect.Signature(ps)  # type: ignore[attr-defined]
        return func

    assert signature_drift(with_params(params)) == []
    wrong_default = [p.replace(default=True) if p.name == "vae_tiling" else p for p in params]
    assert "vae_tiling defaults to True" in " ".join(signature_drift(with_params(wrong_default)))
    missing = [p for p in params if p.name != "memory_watch"]
    assert "missing ['memory_watch']" in " ".join(signature_drift(with_params(missing)))
    swapped = [params[0], params[2], params[1], *params[3:]]
    assert signature_drift(with_params(swapped))
    extra = [*params, inspect.Parameter("colour", inspect.Parameter.KEYWORD_ONLY, default=None)]
    assert "extra ['colour']" in " ".join(signature_drift(with_params(extra)))
    assert signature_drift(bare)


def test_auto_prepare_takes_exactly_the_schemas_options_and_env() -> None:
    scope = mps_helpers.auto_prepare(env=CPU, **DEFAULTS)
    assert dict(scope.options) == {"env": CPU, **DEFAULTS}
    with pytest.raises(TypeError, match="colour") as info:
        mps_helpers.auto_prepare(colour="blue")
    assert f"valid options are env, {', '.join(OPTION_NAMES)}" in str(info.value)


def test_the_schema_describes_fourteen_options_each_a_decision_or_a_size() -> None:
    from mps_helpers._plan import DECISIONS

    assert len(OPTION_NAMES) == 14
    assert len(set(OPTION_NAMES)) == 14
    sizes = {o.name for o in OPTIONS if o.kind in ("size", "count")}
    assert sizes == {"height", "width", "batch_size"}
    assert set(OPTION_NAMES) - sizes <= set(DECISIONS)
    assert all(option.help for option in OPTIONS)
    assert set(SWITCHES) == {o.name for o in OPTIONS if o.default == "auto"} - {"device", "dtype"}


def test_option_values_picks_the_options_from_a_functions_locals() -> None:
    scope: dict[str, object] = {"pipe": object(), "env": CPU, **DEFAULTS, "vae_tiling": True}
    picked = option_values(scope)
    assert list(picked) == list(OPTION_NAMES)
    assert picked["vae_tiling"] is True


def test_validate_options_fills_defaults_and_rejects_unknown_names() -> None:
    validated = validate_options(vae_tiling=True, dtype="fp16")
    assert dict(validated.given) == {**DEFAULTS, "vae_tiling": True, "dtype": "fp16"}
    assert validated.dtype == torch.float16
    assert validated.switches["vae_tiling"] is True
    assert validated.switches["vae_slicing"] is None
    with pytest.raises(TypeError, match="'colour'"):
        validate_options(colour="blue")


def test_validate_options_is_re_exported_by_the_plan() -> None:
    from mps_helpers import _plan

    assert _plan.validate_options is validate_options


# ---------------------------------------------------------------------------------------
# Sizes


@pytest.mark.parametrize(
    ("name", "value", "nearest"),
    [("height", 65, "64 or 72"), ("width", 1000, "1000"), ("width", 4, "8"), ("height", 7, "8")],
)
def test_sizes_not_divisible_by_8_are_rejected_naming_the_nearest(
    name: str, value: int, nearest: str
) -> None:
    if value % 8 == 0:
        assert getattr(mps_helpers.plan_for(env=CPU, **{name: value}), name) == value
        return
    with pytest.raises(ValueError, match=f"{name} must be divisible by 8") as info:
        mps_helpers.plan_for(env=CPU, **{name: value})
    assert str(info.value).endswith(f"got {value}: use {nearest}")


def test_a_bad_size_is_rejected_before_the_pipeline_changes() -> None:
    from mps_helpers.testing import tiny_pipeline

    pipe = tiny_pipeline("sd")
    with pytest.raises(ValueError, match="64 or 72"):
        mps_helpers.prepare_pipeline(pipe, env=CPU, height=65)
    assert mps_helpers.plan_of(pipe) is None
    assert type(pipe).__name__ == "StableDiffusionPipeline"


def test_batch_size_needs_no_multiple_of_8() -> None:
    assert mps_helpers.plan_for(env=CPU, batch_size=3).options["batch_size"] == 3


# ---------------------------------------------------------------------------------------
# The command line


def test_the_cli_flags_are_the_schemas() -> None:
    _parser, commands = _cli._build()
    for command in ("run", "demo"):
        actions = {a.dest: a for a in commands[command]._actions}
        for option in OPTIONS:
            if option.flag is None:
                assert option.name not in actions
                continue
            action = actions[option.name]
            assert action.option_strings == [option.flag]
            assert action.help == option.cli_help
            assert action.choices == option.cli_choices
            assert action.default is None


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--memory-watch", "on"], {"memory_watch": True}),
        (["--vae-tiling", "off", "--device", "cpu"], {"vae_tiling": False, "device": "cpu"}),
        (["--attention-slicing", "auto", "--dtype", "bf16"], {"attention_slicing": "auto"}),
        ([], {}),
    ],
)
def test_cli_words_become_option_values(argv: list[str], expected: dict[str, Any]) -> None:
    parser, _commands = _cli._build()
    args = parser.parse_args(["demo", *argv])
    given = _cli._plan_options(args)
    if "--dtype" in argv:
        expected = {**expected, "dtype": "bf16"}
    assert given == expected
    validate_options(**given)


# ---------------------------------------------------------------------------------------
# The docs


def _docs_conf() -> Any:
    spec = importlib.util.spec_from_file_location("mps_helpers_docs_conf", DOCS / "conf.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_docs_options_table_is_generated_from_the_schema() -> None:
    table = _docs_conf().options_table()
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == list(OPTION_NAMES)
    for option, row in zip(OPTIONS, rows, strict=True):
        assert option.help in row
        assert repr(option.default) in row
        assert (option.flag or "") in row
    page = (DOCS / "reference" / "api.md").read_text(encoding="utf-8")
    assert "```{plan-options}" in page
