"""Cost of the float64 rescue: a tiny pipeline's call with and without Float64Rescue active.

The rescue is a ``TorchFunctionMode``: every torch call inside it passes through one Python
function. A tiny pipeline is the worst case (its calls are all overhead); the figure per torch
call bounds the cost on a real model, whose calls take milliseconds.

    python tests/benchmarks/rescue_cost.py --kind sd --rounds 7
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import _common


def main(argv: list[str] | None = None) -> int:
    import torch
    from torch.overrides import TorchFunctionMode

    from mps_helpers._dtype_rescue import Float64Rescue
    from mps_helpers.testing import tiny_pipeline

    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--kind", default="sd")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    pipe = tiny_pipeline(args.kind)

    def run() -> None:
        pipe(
            "a", num_inference_steps=4, output_type="np", generator=torch.Generator().manual_seed(0)
        )

    calls = [0]

    class Count(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            calls[0] += 1
            return func(*args, **(kwargs or {}))

    run()
    with Count():
        run()
    plain, rescued = [], []
    for i in range(args.rounds):
        for name in ("plain", "rescued") if i % 2 else ("rescued", "plain"):
            start = time.perf_counter()
            if name == "plain":
                run()
            else:
                with Float64Rescue("mps"):
                    run()
            (plain if name == "plain" else rescued).append(time.perf_counter() - start)
    extra = _common.median([r - p for r, p in zip(rescued, plain, strict=True)])
    print(
        json.dumps(
            {
                "torch_calls_per_call": calls[0],
                "plain_s": _common.median(plain),
                "rescued_s": _common.median(rescued),
                "rescued_over_plain": _common.median(rescued) / _common.median(plain),
                "extra_us_per_torch_call": extra / calls[0] * 1e6,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
