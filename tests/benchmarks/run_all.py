"""Run the benchmarks that fit this machine, write JSON and PNG plots, print the tables.

What ``nox -s bench`` runs. It detects the machine:

- a Mac with a usable mps device: library cost, then the grid, first-call and attention
  parts of ``grid_cuda.py`` on mps (smaller settings: 10 steps, 2 prompts, fp32 and fp16);
- a CUDA machine: library cost and every part of ``grid_cuda.py``;
- otherwise the CPU: library cost, ``cpu_dtype.py`` (float32 against bfloat16, with and
  without the CPU's bfloat16 instructions), ``grid_cpu.py`` (each cell in a fresh process)
  and the attention engineer's ``attention_memory.py`` at 512 and 768 px.

Results go to ``bench-results/`` (JSON) and ``bench-results/plots/`` (PNG). ``--quick`` uses
the tiny pipeline with tiny settings (well under two minutes on a CPU): it checks that the
whole chain works, its figures mean nothing. Usage::

    nox -s bench                                    # or: python tests/benchmarks/run_all.py
    python tests/benchmarks/run_all.py --quick
    python tests/benchmarks/run_all.py --skip attention --budget-min 25
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import _common

__all__ = ["main"]

log = logging.getLogger("bench")

SECTIONS = ("library", "dtype", "grid", "attention", "firstcall")


def _quick(out: Path, skip: set[str]) -> None:
    """Run every CPU section with the tiny pipeline and tiny settings into ``out``."""
    import grid_cpu
    import grid_cuda
    import library_cost

    if "library" not in skip:
        results = library_cost.run("cpu", quick=True)
        _common.write_json(out / "library-cpu.json", results)
        print(library_cost.table(results), flush=True)
    if "grid" not in skip:
        grid_cpu.main(
            ["--quick", "--out", str(out / "grid-cpu.json"), "--models", str(out / "models")]
        )
        # The accelerator head-to-head's code path, on the CPU: auto against the quick
        # grid's leaders (read from grid-cpu.json in ``out``) and one named cell.
        grid_cuda.main(
            [
                *("--device", "cpu", "--quick", "--parts", "confirm", "--rounds", "2"),
                *("--out", str(out), "--models", str(out / "models")),
                *("--cells", "fp32 sdpa batch vae-slice"),
            ]
        )
    if "attention" not in skip:
        settings = grid_cuda.Settings(quick=True, device="cpu")
        grid_cuda.attention_part(settings, out, time.monotonic() + 60)


def main(argv: list[str] | None = None) -> int:
    """Detect the machine, run its sections, plot, print."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny pipeline: checks the chain")
    parser.add_argument("--device", choices=("mps", "cuda", "cpu"), default=None)
    parser.add_argument("--skip", nargs="*", choices=SECTIONS, default=[])
    parser.add_argument("--out", type=Path, default=_common.RESULTS)
    parser.add_argument("--budget-min", type=float, default=40.0, help="for the grid part")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's own; --quick uses 1, since two threads "
        "on a loaded two-core machine spin and run 10-25x slower)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # The plan logs every decision at INFO: the JSON keeps the plan, the console needs less.
    logging.getLogger("mps_helpers").setLevel(logging.WARNING)
    threads = args.threads if args.threads is not None else (1 if args.quick else None)
    if threads:
        # Set for this process and inherited by every measurement subprocess.
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)
    device = args.device or _common.detect_device()
    skip = set(args.skip)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    log.info("device %s; results in %s", device, out)
    import plots

    if args.quick:
        # The quick run measures the CPU whatever the machine: it checks the chain only.
        _quick(out / "quick", skip)
        plots.plot_all(out / "quick", out / "quick" / "plots")
        return 0

    import grid_cuda
    import library_cost

    if device in ("cuda", "mps"):
        parts = [p for p in grid_cuda.PARTS if p not in skip]
        grid_cuda.main(
            [
                "--device",
                device,
                "--out",
                str(out),
                "--budget-s",
                str(60 * args.budget_min),
                "--parts",
                *parts,
            ]
        )
        plots.plot_all(out, out / "plots")
        return 0

    if "library" not in skip:
        library_cost.main(["--device", "cpu", "--out", str(out / "library-cpu.json")])
    if "dtype" not in skip:
        import cpu_dtype

        # AVX2's emulated bfloat16 conv takes a minute a run: left to a run by hand.
        cpu_dtype.main(["--out", str(out), "--settings", "as is", "AVX-512 without BF16"])
    if "grid" not in skip:
        import grid_cpu

        grid_cpu.main(["--budget-min", str(args.budget_min), "--out", str(out / "grid-cpu.json")])
    if "attention" not in skip:
        import attention_memory

        attention_memory.main(["--repeats", "1", "--out", str(out / "attention-cpu.json")])
    plots.plot_all(out, out / "plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
