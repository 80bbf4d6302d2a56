"""The plan options: one schema that validation, the command line and the docs all read.

Each of the 14 options of :func:`mps_helpers.plan_for` (and of ``prepare_pipeline``,
``load_pipeline``, ``auto_prepare``, the CLI's ``run`` and ``demo``) is one :class:`Option`
in :data:`OPTIONS`: its name, default, kind (which fixes its valid values), help text and
command-line flag. :func:`validate_options` checks values against it before anything is
planned or changed; ``mps_helpers._cli`` builds its flags from it; the docs' options table
is generated from it (``docs/conf.py``), and a test checks that every public signature lists
the options in this order with these defaults.

Adding an option: one :class:`Option` entry here, the keyword in each public signature (the
signature test names any that lack it), and its use in the plan.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from mps_helpers._util import DEVICES, dtype_name, is_dtype

if TYPE_CHECKING:
    from collections.abc import Mapping

    import torch

__all__ = [
    "DEFAULTS",
    "OPTIONS",
    "OPTION_NAMES",
    "PROCESSORS",
    "SIZE_MULTIPLE",
    "SWITCHES",
    "Option",
    "Options",
    "option_values",
    "validate_options",
]

#: The attention processors a plan can install when it slices attention.
PROCESSORS: tuple[str, ...] = ("safe", "diffusers")
#: Image sides must be multiples of this (the VAE's downscaling: diffusers rejects others at
#: call time).
SIZE_MULTIPLE = 8

Kind = Literal["size", "count", "device", "dtype", "processor", "switch"]

_DTYPE_ALIASES: Mapping[str, str] = types.MappingProxyType(
    {
        "float16": "float16",
        "fp16": "float16",
        "half": "float16",
        "bfloat16": "bfloat16",
        "bf16": "bfloat16",
        "float32": "float32",
        "fp32": "float32",
        "float": "float32",
    }
)
_SWITCH_WORDS: Mapping[str, bool] = types.MappingProxyType({"on": True, "off": False})


@dataclass(frozen=True)
class Option:
    """One plan option: name, default, kind of value, help and command-line flag."""

    #: The keyword (``attention_slicing``).
    name: str
    #: Its default value (``"auto"``: the plan decides).
    default: object
    #: What values it takes: ``size`` (None or a positive multiple of 8), ``count`` (None or
    #: a positive integer), ``device``, ``dtype``, ``processor`` or ``switch`` ("auto",
    #: True, False).
    kind: Kind
    #: What it controls, in a few words (the CLI's help and the docs' table).
    help: str
    #: The command-line flag of ``run`` and ``demo`` (None: not on the command line).
    flag: str | None = None

    @property
    def choices(self) -> tuple[str, ...]:
        """Return the strings the option accepts (none for sizes and counts)."""
        if self.kind == "device":
            return ("auto", *DEVICES)
        if self.kind == "processor":
            return PROCESSORS
        if self.kind == "switch":
            return ("auto",)
        if self.kind == "dtype":
            return ("auto", *_DTYPE_ALIASES)
        return ()

    @property
    def valid(self) -> str:
        """Return the valid values as error messages and the docs list them."""
        if self.kind == "size":
            return f"None or a positive integer divisible by {SIZE_MULTIPLE}"
        if self.kind == "count":
            return "None or a positive integer"
        if self.kind == "switch":
            return "'auto', True, False"
        if self.kind == "dtype":
            return (
                "'auto', torch.float16, torch.bfloat16, torch.float32 or their names "
                + ", ".join(repr(k) for k in _DTYPE_ALIASES)
            )
        return ", ".join(repr(c) for c in self.choices)

    @property
    def cli_choices(self) -> tuple[str, ...] | None:
        """Return the values argparse accepts for the flag (None: any, checked later)."""
        if self.kind == "switch":
            return ("auto", *_SWITCH_WORDS)
        if self.kind == "processor":
            return PROCESSORS
        return None

    @property
    def cli_help(self) -> str:
        """Return the flag's help text."""
        if self.kind == "device":
            return f"{self.help}: auto (default), {', '.join(DEVICES[:-1])} or {DEVICES[-1]}"
        if self.kind == "dtype":
            return f"{self.help}: auto (default), float16, bfloat16 or float32"
        return self.help

    def from_cli(self, text: str) -> object:
        """Return the option value a command-line word stands for (``on`` is True)."""
        if self.kind == "switch":
            return _SWITCH_WORDS.get(text, text)
        return text


#: The plan options in signature order.
OPTIONS: tuple[Option, ...] = (
    Option("height", None, "size", "image height in pixels (None: the pipeline's default)"),
    Option("width", None, "size", "image width in pixels (None: the pipeline's default)"),
    Option(
        "batch_size",
        None,
        "count",
        "images decoded per call, prompts x images per prompt (None: unknown)",
    ),
    Option("device", "auto", "device", "the device to run on", "--device"),
    Option("dtype", "auto", "dtype", "the compute dtype of the models", "--dtype"),
    Option(
        "attention_slicing", "auto", "switch", "memory-bounded attention", "--attention-slicing"
    ),
    Option(
        "attention_processor",
        "safe",
        "processor",
        "whose sliced attention: safe (mps_helpers', default) or diffusers",
        "--attention-processor",
    ),
    Option("vae_slicing", "auto", "switch", "decode a batch one image at a time", "--vae-slicing"),
    Option("vae_tiling", "auto", "switch", "decode large images in tiles", "--vae-tiling"),
    Option("warmup", "auto", "switch", "one-step warmup pass before the first call", "--warmup"),
    Option(
        "batch_to_loop", "auto", "switch", "run a batch of prompts as a loop", "--batch-to-loop"
    ),
    Option("nan_guard", "auto", "switch", "re-decode black (NaN) images in float32", "--nan-guard"),
    Option(
        "oom_retry",
        "auto",
        "switch",
        "retry once with a stricter plan on out-of-memory",
        "--oom-retry",
    ),
    Option(
        "memory_watch", "auto", "switch", "warn when the machine starts swapping", "--memory-watch"
    ),
)
#: The option names in signature order.
OPTION_NAMES: tuple[str, ...] = tuple(option.name for option in OPTIONS)
#: Each option's default.
DEFAULTS: Mapping[str, object] = types.MappingProxyType({o.name: o.default for o in OPTIONS})
#: The options that are "auto", True or False, in signature order.
SWITCHES: tuple[str, ...] = tuple(o.name for o in OPTIONS if o.kind == "switch")
_BY_NAME: Mapping[str, Option] = types.MappingProxyType({o.name: o for o in OPTIONS})


@dataclass(frozen=True)
class Options:
    """Validated options: "auto" or an explicit value for each decision."""

    height: int | None
    width: int | None
    batch_size: int | None
    device: str
    #: None: "auto".
    dtype: torch.dtype | None
    attention_processor: str
    #: Each switch: None for "auto", else the explicit value.
    switches: Mapping[str, bool | None]
    #: Every option as given (defaults filled in), for ``Plan.options``.
    given: Mapping[str, object]


def option_values(scope: Mapping[str, object]) -> dict[str, object]:
    """Return the plan options among a function's local names, in schema order.

    A public function with the options as keyword-only parameters forwards them with
    ``validate_options(**option_values(locals()))`` instead of naming all 14 again.
    """
    return {name: scope[name] for name in OPTION_NAMES}


def validate_options(**given: object) -> Options:
    """Check every option and return them validated; raise ValueError listing valid values.

    Options not given take their defaults. Nothing is planned or changed here, so callers
    can validate before touching anything.

    Raises:
        TypeError: a keyword that is not a plan option.
        ValueError: a value that is not one of the option's valid values.
    """
    unknown = sorted(set(given) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(
            f"unexpected option(s) {', '.join(map(repr, unknown))}: valid options are "
            f"{', '.join(OPTION_NAMES)}"
        )
    values = {**DEFAULTS, **given}
    height, width, batch_size = (
        _check_size(_BY_NAME[name], values[name]) for name in ("height", "width", "batch_size")
    )
    device = _check_choice(_BY_NAME["device"], values["device"])
    processor = _check_choice(_BY_NAME["attention_processor"], values["attention_processor"])
    switches: dict[str, bool | None] = {}
    for name in SWITCHES:
        value = values[name]
        if isinstance(value, str) and value == "auto":
            switches[name] = None
        elif value is True or value is False:
            switches[name] = value
        else:
            raise ValueError(f"{name} must be one of {_BY_NAME[name].valid}; got {value!r}")
    return Options(
        height=height,
        width=width,
        batch_size=batch_size,
        device=device,
        dtype=_resolve_dtype(values["dtype"]),
        attention_processor=processor,
        switches=types.MappingProxyType(switches),
        given=types.MappingProxyType(values),
    )


def _check_choice(option: Option, value: object) -> str:
    if not isinstance(value, str) or value not in option.choices:
        raise ValueError(f"{option.name} must be one of {option.valid}; got {value!r}")
    return value


def _check_size(option: Option, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{option.name} must be None or a positive integer, got {value!r}")
    if option.kind == "size" and value % SIZE_MULTIPLE:
        below = value - value % SIZE_MULTIPLE
        nearest = " or ".join(str(n) for n in (below, below + SIZE_MULTIPLE) if n > 0)
        raise ValueError(
            f"{option.name} must be divisible by {SIZE_MULTIPLE} (diffusers' pipelines reject "
            f"other sizes), got {value!r}: use {nearest}"
        )
    return value


def _resolve_dtype(value: object) -> torch.dtype | None:
    if isinstance(value, str):
        if value == "auto":
            return None
        name = _DTYPE_ALIASES.get(value.lower().removeprefix("torch."))
        if name is not None:
            import torch

            resolved: torch.dtype = getattr(torch, name)
            return resolved
    elif is_dtype(value) and dtype_name(value) in ("float16", "bfloat16", "float32"):
        return value
    raise ValueError(f"dtype must be {_BY_NAME['dtype'].valid}; got {value!r}")
