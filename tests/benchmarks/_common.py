"""Shared helpers of the benchmark scripts: machine record, pipelines, timing, memory, output.

The scripts in this folder are run as programs (``python tests/benchmarks/run_all.py``), so
they import this module as ``_common`` from their own directory; pytest does not collect the
folder (``norecursedirs`` in pyproject.toml).

Memory is measured the way each device allows:

- CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()`` (the
  caching allocator's peak of live tensors, weights included);
- mps: ``torch.mps.driver_allocated_memory()`` sampled every few milliseconds by a thread
  (Metal has no peak counter);
- CPU: the process's resident set size sampled by a thread (psutil); a figure taken in a
  fresh subprocess per configuration, since RSS does not shrink back after a large free.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

__all__ = [
    "PROMPTS",
    "REPO",
    "RESULTS",
    "MemorySampler",
    "build_pipeline",
    "detect_device",
    "empty_cache",
    "fmt",
    "generators",
    "load_pipeline",
    "machine_info",
    "md_table",
    "median",
    "peak_memory",
    "read_json",
    "save_pipeline",
    "sync",
    "timed",
    "write_json",
]

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench-results"

# Distinct prompts, so that a batch is a real batch of different conditionings.
PROMPTS: tuple[str, ...] = (
    "a photograph of an astronaut riding a horse on the moon",
    "a watercolour painting of a lighthouse at dawn",
    "a close-up of a red fox in the snow, 85 mm lens",
    "an isometric drawing of a tiny city on a floating island",
    "a bowl of ramen, studio lighting",
    "a sailing boat in a storm, oil on canvas",
    "a cat reading a newspaper in a cafe",
    "a mountain lake reflecting pine trees",
)

if str(REPO) not in sys.path:
    # The device machine and a bare checkout run the scripts from the repo without installing
    # the package: make ``import mps_helpers`` find the working tree's copy.
    sys.path.insert(0, str(REPO))


# ---------------------------------------------------------------------------------------
# Machine


def detect_device() -> str:
    """Return the device a benchmark run measures here: "mps" on a Mac, else "cuda" or "cpu"."""
    import torch

    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def _cpu_model() -> str:
    if sys.platform == "darwin":
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            return subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as info:
        for line in info:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.strip() or None
    return None


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def machine_info(device: str) -> dict[str, Any]:
    """Return what a published figure needs beside it: machine, versions, date, load."""
    import psutil
    import torch

    import mps_helpers

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "mps_helpers": mps_helpers.__version__,
        "git_commit": _git_commit(),
        "loadavg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    if device == "mps":
        info["macos"] = platform.mac_ver()[0]
    return info


# ---------------------------------------------------------------------------------------
# Pipelines


def build_pipeline(kind: str, *, seed: int = 0) -> Any:
    """Return a fresh pipeline with random weights: ``"tiny"`` or ``"sd15"`` (SD 1.5's shapes)."""
    from mps_helpers import testing

    if kind == "tiny":
        return testing.tiny_pipeline("sd", seed=seed)
    if kind == "sd15":
        return testing.sd15_pipeline(seed=seed)
    raise ValueError(f"unknown pipeline kind {kind!r}: expected 'tiny' or 'sd15'")


def save_pipeline(kind: str, path: Path) -> Path:
    """Write :func:`build_pipeline` ``(kind)`` to ``path`` once (safetensors); return ``path``.

    Loading the saved folder takes seconds where building SD 1.5's random weights takes tens,
    which matters when every configuration runs in a fresh process.
    """
    marker = path / "model_index.json"
    if not marker.exists():
        path.mkdir(parents=True, exist_ok=True)
        build_pipeline(kind).save_pretrained(path, safe_serialization=True)
    return path


def load_pipeline(path: Path) -> Any:
    """Return the pipeline saved at ``path``, as loaded: float32, on the CPU, no options set."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generators(count: int, *, start: int = 0) -> list[Any]:
    """Return ``count`` CPU generators seeded ``start, start + 1, ...`` (one per image)."""
    import torch

    return [torch.Generator("cpu").manual_seed(start + i) for i in range(count)]


# ---------------------------------------------------------------------------------------
# Timing and memory


def sync(device: str) -> None:
    """Wait for the device's queued work, so that a wall-clock time covers it."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def empty_cache(device: str) -> None:
    """Collect garbage and return cached device memory, so the next peak starts clean."""
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    elif device == "mps":
        torch.mps.empty_cache()


def timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    """Return ``(seconds, result)`` of ``fn()``, the device synchronised on both sides."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


class MemorySampler:
    """Sample a memory reading every ``interval`` seconds on a thread; keep the maximum."""

    def __init__(self, read: Callable[[], int], interval: float = 0.005) -> None:
        self._read = read
        self._interval = interval
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.baseline = read()
        self.peak = self.baseline

    def _loop(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self._read())
            time.sleep(self._interval)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self._read())


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


@contextlib.contextmanager
def peak_memory(device: str) -> Iterator[dict[str, float]]:
    """Measure the block's peak memory; fill the yielded dict with ``peak_gib``, ``base_gib``.

    ``base_gib`` is the reading when the block starts (weights included); ``peak_gib`` the
    highest reading inside it. On CPU they are process RSS (meaningful per fresh process).
    """
    import torch

    out: dict[str, float] = {}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield out
        torch.cuda.synchronize()
        out["base_gib"] = base / 2**30
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        return
    read = torch.mps.driver_allocated_memory if device == "mps" else _rss
    with MemorySampler(read) as sampler:
        yield out
    out["base_gib"] = sampler.baseline / 2**30
    out["peak_gib"] = sampler.peak / 2**30


def median(values: Sequence[float]) -> float:
    """Return the median of ``values``."""
    return float(statistics.median(values))


# ---------------------------------------------------------------------------------------
# Output


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` to ``path`` as JSON, atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
    partial.replace(path)


def read_json(path: Path) -> Any:
    """Return the JSON document at ``path``."""
    return json.loads(path.read_text(encoding="utf-8"))


def fmt(value: Any, digits: int = 2) -> str:
    """Return ``value`` for a table cell: floats rounded, None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Return a Markdown table of ``rows`` under ``headers``."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
