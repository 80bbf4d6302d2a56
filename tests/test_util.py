"""The shared small helpers in mps_helpers._util (one home each)."""

from __future__ import annotations

import doctest

import pytest
import torch

from mps_helpers import _util
from mps_helpers._util import (
    GiB,
    MiB,
    dtype_name,
    format_bytes,
    module_dtype,
    parse_version,
    release,
)


@pytest.mark.parametrize(
    ("count", "digits", "expected"),
    [
        (None, 2, "unknown"),
        (3.25 * GiB, 2, "3.25 GiB"),
        (3 * GiB, 1, "3.0 GiB"),
        (8 * GiB, 0, "8 GiB"),
        (GiB, 2, "1.00 GiB"),
        (GiB - 1, 2, "1024 MiB"),
        (900 * MiB, 2, "900 MiB"),
        (-2 * GiB, 2, "-2.00 GiB"),
        (0, 2, "0 MiB"),
    ],
)
def test_format_bytes_says_gib_from_a_gib_up(
    count: float | None, digits: int, expected: str
) -> None:
    assert format_bytes(count, digits=digits) == expected


def test_dtype_name_drops_the_torch_prefix() -> None:
    assert dtype_name(torch.float16) == "float16"
    assert dtype_name("bfloat16") == "bfloat16"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2.5.1+cpu", (2, 5, 1)), ("2.6.0.dev20241112", (2, 6, 0)), ("bogus", ()), ("", ())],
)
def test_release_is_the_numbers_only(text: str, expected: tuple[int, ...]) -> None:
    assert release(text) == expected
    assert release(parse_version(text)) == expected


def test_parse_version_is_none_for_empty_or_invalid_text() -> None:
    assert parse_version(None) is None
    assert parse_version("") is None
    assert parse_version("not a version") is None
    assert str(parse_version("14.5")) == "14.5"


def test_module_dtype_is_the_first_floating_parameter() -> None:
    module = torch.nn.Sequential(torch.nn.Embedding(2, 2), torch.nn.Linear(2, 2))
    module[1].half()
    assert module_dtype(module) == torch.float32  # the embedding comes first
    assert module_dtype(torch.nn.ReLU()) is None


def test_empty_device_cache_touches_only_the_device_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    emptied: list[str] = []
    monkeypatch.setattr(torch.mps, "empty_cache", lambda: emptied.append("mps"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append("cuda"))
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _util.empty_device_cache()  # neither device usable: nothing emptied
    assert emptied == []
    _util.empty_device_cache("mps")  # the plan runs on mps: no availability check
    assert emptied == ["mps"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    _util.empty_device_cache()
    assert emptied == ["mps", "cuda"]


def test_the_doctests_hold() -> None:
    failed, tried = doctest.testmod(_util)
    assert tried > 0
    assert failed == 0
