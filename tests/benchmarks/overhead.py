"""The prepared call's overhead with every feature off: median time ratio over the raw call.

Two identical tiny SD pipelines are prepared with the same all-off plan (so that their
components are the same), then called in turn, in alternating order (ABBA), with the same
arguments: pipeline A through its prepared call (``pipe(...)``), pipeline B through its
original class's ``__call__`` (the raw call). The figure is the median of the per-pair
ratios prepared / raw; a raw / raw control on the two pipelines gives the noise floor.

The library's target is a median ratio of at most 1.02.

Usage::

    python tests/benchmarks/overhead.py [--pairs 100] [--threads 1] [--size 32] [--steps 2]

Prints one line per figure and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

FEATURES = ("warmup", "batch_to_loop", "nan_guard", "oom_retry", "memory_watch")

ALL_OFF: dict[str, Any] = {
    "device": "cpu",
    "warmup": False,
    "batch_to_loop": False,
    "nan_guard": False,
    "oom_retry": False,
    "memory_watch": False,
}


def _prepare(pipe: Any) -> Any:
    """Return ``pipe`` prepared with every feature of the plan off."""
    from mps_helpers import prepare_pipeline

    return prepare_pipeline(pipe, **ALL_OFF)


def _raw_call(pipe: Any) -> Any:
    """Return the pipeline's original ``__call__`` bound to it (no prepared call)."""
    from mps_helpers._apply import original_class

    return functools.partial(original_class(pipe).__call__, pipe)


def _timed(call: Any, kwargs: dict[str, Any]) -> float:
    start = time.perf_counter()
    call(**kwargs)
    return time.perf_counter() - start


class _Pipe:
    """A stand-in pipeline whose plan has every feature off."""

    def __init__(self, plan: Any) -> None:
        self._mps_helpers_plan = plan


def fast_path_ns(calls: int = 200_000) -> float:
    """Return what ``prepared_call`` adds to a call that does nothing, in ns (median of 5)."""
    from types import SimpleNamespace

    from mps_helpers._call import prepared_call

    pipe = _Pipe(SimpleNamespace(**dict.fromkeys(FEATURES, False)))

    def method(self: Any, prompt: Any = None, num_inference_steps: int = 50) -> None:
        return None

    # The form the prepared call receives: the class's __call__ bound with functools.partial.
    noop = functools.partial(method, pipe)

    args, kwargs = ("a red cube",), {"num_inference_steps": 2}
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            noop(*args, **kwargs)
        raw = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(calls):
            prepared_call(pipe, noop, args, kwargs)
        prepared = time.perf_counter() - start
        samples.append((prepared - raw) / calls * 1e9)
    return statistics.median(samples)


def measure(pairs: int, size: int, steps: int) -> dict[str, Any]:
    """Return the median prepared/raw and raw/raw ratios over ``pairs`` interleaved pairs."""
    import torch

    from mps_helpers import plan_of
    from mps_helpers.testing import tiny_pipeline

    a = _prepare(tiny_pipeline("sd", seed=0))
    b = _prepare(tiny_pipeline("sd", seed=0))
    plan = plan_of(a)
    if any(getattr(plan, name) for name in FEATURES):
        raise SystemExit(f"the plan is not all-off: {plan}")
    prepared, raw_a, raw_b = a.__call__, _raw_call(a), _raw_call(b)
    kwargs = {
        "prompt": "a red cube",
        "height": size,
        "width": size,
        "num_inference_steps": steps,
        "output_type": "np",
    }
    for call in (prepared, raw_a, raw_b):  # first calls load kernels: leave them out
        call(generator=torch.Generator().manual_seed(0), **kwargs)

    overhead: list[float] = []
    control: list[float] = []
    for i in range(pairs):
        # ABBA: each pair's order alternates, so that drift and cache effects cancel.
        generator = {"generator": torch.Generator().manual_seed(i)}
        if i % 2 == 0:
            t_prepared = _timed(prepared, {**kwargs, **generator})
            t_raw = _timed(raw_b, {**kwargs, **generator})
        else:
            t_raw = _timed(raw_b, {**kwargs, **generator})
            t_prepared = _timed(prepared, {**kwargs, **generator})
        overhead.append(t_prepared / t_raw)
        t_first, t_second = _timed(raw_a, kwargs), _timed(raw_b, kwargs)
        control.append(t_first / t_second)
    return {
        "pairs": pairs,
        "size": size,
        "steps": steps,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "median_ratio_prepared_over_raw": statistics.median(overhead),
        "median_ratio_raw_over_raw_control": statistics.median(control),
        "median_raw_call_s": statistics.median(
            [_timed(raw_b, kwargs) for _ in range(min(pairs, 10))]
        ),
        "fast_path_added_ns": fast_path_ns(),
    }


def main(argv: list[str] | None = None) -> int:
    """Measure and print the overhead; exit status 1 when the median ratio exceeds 1.02."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: leave)")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(args.pairs, args.size, args.steps)
    ratio = result["median_ratio_prepared_over_raw"]
    control = result["median_ratio_raw_over_raw_control"]
    print(f"prepared / raw, median of {args.pairs} pairs: {ratio:.4f}")
    print(f"raw / raw control (noise floor): {control:.4f}")
    print(f"raw call, median: {result['median_raw_call_s'] * 1e3:.1f} ms")
    print(f"fast path, added per call: {result['fast_path_added_ns']:.0f} ns")
    print(json.dumps(result))
    return 0 if result["median_ratio_prepared_over_raw"] <= 1.02 else 1


if __name__ == "__main__":
    sys.exit(main())
