"""Shared test set-up: one torch thread, a CPU detected without native bfloat16 (unless a
test asks for the real one), and hardware-bound tests skipped where the hardware is absent."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from mps_helpers import _environment, _probes

# ``tests/machines.py`` and the other helpers here are imported by name by the test modules.
sys.path.insert(0, str(Path(__file__).parent))

from _threads import TEST_THREADS

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

_REAL_CPU_BF16_SUPPORTED = _probes.cpu_bf16_supported


@contextlib.contextmanager
def _cpu_bf16_probe(probe: Callable[[object], bool]) -> Iterator[None]:
    """Detect the CPU's bfloat16 support with ``probe`` inside, fresh on entry and exit."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_probes, "cpu_bf16_supported", probe)
        _environment._detect.cache_clear()
        yield
    _environment._detect.cache_clear()


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> Iterator[None]:
    """Run every test with one torch thread (``_threads.TEST_THREADS`` says why)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="session")
def _empty_cache_directory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Point the library's cache (device self-test results) at an empty directory.

    Plans follow the self-test results cached for the machine; tests must not see the ones
    a real ``mps-helpers doctor --probe`` left in the user's cache. Subprocesses inherit it.
    """
    from mps_helpers._selftest import CACHE_ENV

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(autouse=True, scope="session")
def _cpu_without_native_bfloat16() -> Iterator[None]:
    """Detect this CPU as one without native bfloat16 instructions (see ``real_cpu_dtype``).

    The plan runs the CPU in bfloat16 where the processor computes it natively and in
    float32 elsewhere. Tests that prepare a pipeline on the machine they run on would
    otherwise compare different dtypes on different CI hosts; the bfloat16 CPU plan is
    tested on the fake ``linux-cpu-bf16`` machine and, for real, under ``real_cpu_dtype``.
    Session-scoped, so that module-scoped fixtures see it too.
    """
    with _cpu_bf16_probe(lambda torch_cpu: False):
        yield


@pytest.fixture(autouse=True)
def _real_cpu_dtype(request: pytest.FixtureRequest) -> Iterator[None]:
    """Give tests marked ``real_cpu_dtype`` the CPU's real bfloat16 support."""
    if request.node.get_closest_marker("real_cpu_dtype") is None:
        yield
        return
    with _cpu_bf16_probe(_REAL_CPU_BF16_SUPPORTED):
        yield


def _mps_usable() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.backends.mps.is_available())


def _cuda_usable() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    needs = {
        "mac": (_mps_usable, "needs a real Apple Silicon Mac with a usable mps device"),
        "cuda": (_cuda_usable, "needs a CUDA GPU"),
    }
    for marker, (probe, why) in needs.items():
        marked = [item for item in items if item.get_closest_marker(marker)]
        if marked and not probe():
            for item in marked:
                item.add_marker(pytest.mark.skip(reason=why))
