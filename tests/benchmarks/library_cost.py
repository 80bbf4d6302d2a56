"""What mps_helpers itself costs: import, environment detection, the prepared call, the loop.

1. ``import mps_helpers`` over a bare interpreter start-up (fresh processes, interleaved), and
   which heavy modules the import pulls in (it must pull in none);
2. ``detect_environment()`` cold (first call in a fresh process, with torch already imported
   and without) and cached;
3. a prepared call with every feature off against an identical raw pipeline, the two called
   in turn, reported as the median of the per-pair time ratios;
4. the loop adapter (``batch_to_loop=True``, the rest off) against a loop written by hand over
   the same prompts and generators, in turn likewise.

Usage::

    python tests/benchmarks/library_cost.py [--device cpu|cuda|mps] [--quick]

Writes ``bench-results/library-<device>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common

__all__ = ["detect_cost", "import_cost", "loop_cost", "main", "prepared_call_cost", "table"]

log = logging.getLogger("bench.library")

HEAVY = ("torch", "diffusers", "transformers", "numpy", "PIL", "accelerate")

# Every decision of the plan forced off: the prepared call must take its fast path.
ALL_OFF: dict[str, Any] = {
    "attention_slicing": False,
    "vae_slicing": False,
    "vae_tiling": False,
    "warmup": False,
    "batch_to_loop": False,
    "nan_guard": False,
    "oom_retry": False,
    "memory_watch": False,
}


def _python(code: str, *flags: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(_common.REPO)}
    return subprocess.run(
        [sys.executable, *flags, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=_common.REPO,
        env=env,
    )


def _wall(code: str) -> float:
    start = time.perf_counter()
    _python(code)
    return time.perf_counter() - start


def import_cost(repeats: int = 15) -> dict[str, Any]:
    """Return the start-up time with and without ``import mps_helpers`` and what it imports."""
    bare: list[float] = []
    with_import: list[float] = []
    for _ in range(repeats):
        # In turn, so that machine load falls on both alike.
        bare.append(_wall("pass"))
        with_import.append(_wall("import mps_helpers"))
    # -X importtime reports the import's own cumulative microseconds, free of start-up noise.
    cumulative: list[float] = []
    for _ in range(max(3, repeats // 3)):
        stderr = _python("import mps_helpers", "-X", "importtime").stderr
        for line in stderr.splitlines():
            match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|\s+mps_helpers$", line)
            if match:
                cumulative.append(int(match.group(1)) / 1e6)
    probe = _python(
        "import sys, json, mps_helpers; "
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    heavy = json.loads(probe.stdout)
    return {
        "repeats": repeats,
        "bare_start_s": _common.median(bare),
        "with_import_s": _common.median(with_import),
        "import_added_s": _common.median(with_import) - _common.median(bare),
        "importtime_cumulative_s": _common.median(cumulative) if cumulative else None,
        "heavy_modules_imported": heavy,
    }


_DETECT = """
import json, time
t0 = time.perf_counter()
{pre}
import mps_helpers
t1 = time.perf_counter()
mps_helpers.detect_environment()
t2 = time.perf_counter()
for _ in range(1000):
    mps_helpers.detect_environment()
t3 = time.perf_counter()
print(json.dumps({{"cold_s": t2 - t1, "cached_s": (t3 - t2) / 1000}}))
"""


def detect_cost(repeats: int = 3) -> dict[str, Any]:
    """Return ``detect_environment()``'s first-call and cached times, in fresh processes."""
    runs: dict[str, list[dict[str, float]]] = {"torch_imported": [], "torch_not_imported": []}
    for _ in range(repeats):
        for name, pre in (("torch_imported", "import torch"), ("torch_not_imported", "")):
            runs[name].append(json.loads(_python(_DETECT.format(pre=pre)).stdout))
    return {
        "repeats": repeats,
        "cold_s_torch_imported": _common.median([r["cold_s"] for r in runs["torch_imported"]]),
        "cold_s_torch_not_imported": _common.median(
            [r["cold_s"] for r in runs["torch_not_imported"]]
        ),
        "cached_s": _common.median([r["cached_s"] for r in runs["torch_imported"]]),
    }


def _tiny_pair(device: str, **options: Any) -> tuple[Any, Any]:
    """Return (raw, prepared) tiny pipelines with the same weights, both on ``device``."""
    import torch

    from mps_helpers import prepare_pipeline

    raw = _common.build_pipeline("tiny").to(device, torch.float32)
    prepared = _common.build_pipeline("tiny")
    prepare_pipeline(prepared, device=device, dtype="float32", **options)
    return raw, prepared


def _in_turn(first: Any, second: Any, *, pairs: int, device: str, warm: int = 3) -> dict[str, Any]:
    """Time ``first()`` and ``second()`` in turn; return medians and the median pair ratio."""
    for _ in range(warm):
        first()
        second()
    a: list[float] = []
    b: list[float] = []
    for i in range(pairs):
        # Alternate which goes first, so that neither always follows the other.
        order = ((first, a), (second, b)) if i % 2 == 0 else ((second, b), (first, a))
        for fn, sink in order:
            seconds, _ = _common.timed(fn, device)
            sink.append(seconds)
    ratios = [y / x for x, y in zip(a, b, strict=True)]
    return {
        "pairs": pairs,
        "first_median_s": _common.median(a),
        "second_median_s": _common.median(b),
        "median_ratio": _common.median(ratios),
        "ratio_of_medians": _common.median(b) / _common.median(a),
    }


def prepared_call_cost(device: str, *, pairs: int = 40, steps: int = 2) -> dict[str, Any]:
    """Return a prepared call with every feature off against the raw call (tiny pipeline).

    This is the call engineer's ``overhead.py`` measurement (prepared / raw and a raw / raw
    noise floor, ABBA order), pointed at ``device``.
    """
    import overhead

    overhead.ALL_OFF = {**overhead.ALL_OFF, "device": device}
    result: dict[str, Any] = overhead.measure(pairs, 64, steps)
    result["what"] = "tiny SD pipeline, 1 prompt, 64 px"
    return result


def loop_cost(device: str, *, pairs: int = 20, steps: int = 2, prompts: int = 4) -> dict[str, Any]:
    """Return the loop adapter against a hand-written loop over the same prompts."""
    raw, prepared = _tiny_pair(device, **{**ALL_OFF, "batch_to_loop": True})
    texts = list(_common.PROMPTS[:prompts])
    kwargs = {"num_inference_steps": steps, "output_type": "np"}

    def by_hand() -> list[Any]:
        return [
            raw(prompt=text, generator=_common.generators(1, start=i), **kwargs).images
            for i, text in enumerate(texts)
        ]

    def adapter() -> Any:
        return prepared(prompt=texts, generator=_common.generators(prompts), **kwargs).images

    result = _in_turn(by_hand, adapter, pairs=pairs, device=device)
    result.update({"what": f"tiny SD pipeline, {prompts} prompts, 64 px", "steps": steps})
    return result


def run(device: str, *, quick: bool = False) -> dict[str, Any]:
    """Run every part; return the results with the machine record."""
    results: dict[str, Any] = {"machine": _common.machine_info(device)}
    results["import"] = import_cost(5 if quick else 15)
    results["detect_environment"] = detect_cost(1 if quick else 3)
    results["prepared_call"] = prepared_call_cost(device, pairs=10 if quick else 40)
    results["loop_adapter"] = loop_cost(device, pairs=4 if quick else 20)
    return results


def table(results: dict[str, Any]) -> str:
    """Return the results as a Markdown table."""
    imp = results["import"]
    det = results["detect_environment"]
    call = results["prepared_call"]
    loop = results["loop_adapter"]
    ms = 1000.0
    rows = [
        [
            "`import mps_helpers` (added to interpreter start-up)",
            f"{imp['import_added_s'] * ms:.1f} ms",
            f"start-up {imp['bare_start_s'] * ms:.0f} ms; -X importtime "
            + (
                f"{imp['importtime_cumulative_s'] * ms:.1f} ms"
                if imp["importtime_cumulative_s"] is not None
                else "-"
            )
            + "; heavy modules imported: "
            + (", ".join(imp["heavy_modules_imported"]) or "none"),
        ],
        [
            "`detect_environment()` first call, torch already imported",
            f"{det['cold_s_torch_imported'] * ms:.1f} ms",
            "",
        ],
        [
            "`detect_environment()` first call, torch not yet imported",
            f"{det['cold_s_torch_not_imported'] * ms:.1f} ms",
            "includes importing torch",
        ],
        ["`detect_environment()` cached", f"{det['cached_s'] * 1e6:.2f} µs", ""],
        [
            "prepared call, every feature off / raw call",
            f"{call['median_ratio_prepared_over_raw']:.3f}x",
            f"{call['what']}, {call['steps']} steps; raw {call['median_raw_call_s'] * ms:.1f} ms; "
            f"{call['pairs']} pairs; raw / raw noise floor "
            f"{call['median_ratio_raw_over_raw_control']:.3f}x; fast path adds "
            f"{call['fast_path_added_ns']:.0f} ns",
        ],
        [
            "loop adapter / hand-written loop",
            f"{loop['median_ratio']:.3f}x",
            f"{loop['what']}, {loop['steps']} steps; hand loop "
            f"{loop['first_median_s'] * ms:.1f} ms, {loop['pairs']} pairs",
        ],
    ]
    return _common.md_table(["what", "cost", "detail"], rows)


def main(argv: list[str] | None = None) -> int:
    """Measure, write the JSON file, print the table."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda", "mps"), default=None)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (seconds)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # The plan logs every decision at INFO: the JSON keeps the plan, the console needs less.
    logging.getLogger("mps_helpers").setLevel(logging.WARNING)
    device = args.device or _common.detect_device()
    results = run(device, quick=args.quick)
    out = args.out or _common.RESULTS / f"library-{device}.json"
    _common.write_json(out, results)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
