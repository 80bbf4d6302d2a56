"""How exact is batch-to-loop? The largest pixel difference between a looped and a batched
call, per dtype, on the tiny SD pipeline on this machine's CPU.

Each case prepares a tiny SD pipeline (weights from ``--seeds``; with ``--kind sd15``, SD
1.5's architecture with random weights) in one dtype, runs three prompts once as a batch
and once as a loop (``batch_to_loop`` off / on), each time with one CPU generator per image
(the form the docs recommend), and records the largest absolute difference between the two
``output_type="np"`` image arrays (pixels in [0, 1]). A second set uses one shared
generator with the pipeline's deterministic scheduler (DDIM, eta=0).

    python tests/benchmarks/loop_exactness.py [--kind tiny|sd15]
        [--dtypes float32 bfloat16 float16] [--seeds 0 1 2] [--sizes 32 64 96]
        [--steps 2 10 20] [--json PATH]

Prints one line per case and, per dtype, the largest difference over all cases; the
tolerances in ``mps_helpers._batch.LOOP_TOLERANCE`` come from these figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import _common  # noqa: F401  (puts the working tree's mps_helpers on sys.path)

PROMPTS = ("a red fox in the snow", "a blue whale under the sea", "a lighthouse at dusk")


def _images(pipe: Any, *, steps: int, size: int, shared: bool) -> Any:
    import torch

    if shared:
        generator: Any = torch.Generator("cpu").manual_seed(1234)
    else:
        generator = [torch.Generator("cpu").manual_seed(1000 + i) for i in range(len(PROMPTS))]
    return pipe(
        list(PROMPTS),
        generator=generator,
        num_inference_steps=steps,
        height=size,
        width=size,
        output_type="np",
    ).images


_last: dict[tuple[str, int, str], Any] = {}


def _pipeline(kind: str, seed: int, dtype: str) -> Any:
    """The pipeline of one case, built once per dtype (a cast to bfloat16 is not undone).

    Only the last one is kept: SD 1.5's architecture takes 4.3 GB in float32.
    """
    from mps_helpers import testing

    key = (kind, seed, dtype)
    if key not in _last:
        _last.clear()
        if kind == "sd15":
            _last[key] = testing.sd15_pipeline(seed)
        else:
            _last[key] = testing.tiny_pipeline("sd", seed=seed)
    return _last[key]


def measure(
    dtype: str, seed: int, size: int, steps: int, *, shared: bool, kind: str = "tiny"
) -> float:
    """Return the largest |loop - batch| pixel difference of one case."""
    import torch

    from mps_helpers import prepare_pipeline

    pipe = _pipeline(kind, seed, dtype)
    options: dict[str, Any] = {"device": "cpu", "dtype": getattr(torch, dtype), "warmup": False}
    batch = _images(
        prepare_pipeline(pipe, batch_to_loop=False, **options),
        steps=steps,
        size=size,
        shared=shared,
    )
    loop = _images(
        prepare_pipeline(pipe, batch_to_loop=True, **options),
        steps=steps,
        size=size,
        shared=shared,
    )
    return float(abs(loop - batch).max())


def main(argv: list[str] | None = None) -> int:
    """Measure every case; print the figures; return 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--sizes", nargs="+", type=int, default=[32, 64, 96])
    parser.add_argument("--steps", nargs="+", type=int, default=[2, 10, 20])
    parser.add_argument(
        "--kind",
        choices=("tiny", "sd15"),
        default="tiny",
        help="tiny SD (default) or SD 1.5's architecture with random weights (4.3 GB)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    rows: list[dict[str, Any]] = []
    for dtype in args.dtypes:
        for shared in (False, True):
            for seed in args.seeds:
                for size in args.sizes:
                    for steps in args.steps:
                        difference = measure(
                            dtype, seed, size, steps, shared=shared, kind=args.kind
                        )
                        row = {
                            "kind": args.kind,
                            "dtype": dtype,
                            "generators": "one shared" if shared else "one per image",
                            "seed": seed,
                            "size": size,
                            "steps": steps,
                            "difference": difference,
                        }
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    print()
    for dtype in args.dtypes:
        for kind in ("one per image", "one shared"):
            worst = max(
                r["difference"] for r in rows if r["dtype"] == dtype and r["generators"] == kind
            )
            print(f"{dtype:<9} {kind:<14} largest difference {worst:.1e}")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
