"""Time releasing and reloading the text encoders (mps_helpers._release) on this machine.

Builds an SD-1.5-sized pipeline with random weights (CLIP ViT-L/14 text encoder with its
real 49,408-token vocabulary: 123.1M parameters), saves it in float16 to a temporary
directory, loads it back, and times :func:`~mps_helpers._release.release` and
:func:`~mps_helpers._release.reload` of its text encoder (median of ``--repeats``), and the
same for the tiny pipeline of :mod:`mps_helpers.testing`.

Usage::

    python tests/benchmarks/release_cost.py --repeats 5

Not collected by pytest (``norecursedirs``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _time(pipe: Any, repeats: int) -> tuple[float, float, int]:
    from mps_helpers._release import release, reload

    releases, reloads = [], []
    size = sum(p.numel() * p.element_size() for p in pipe.text_encoder.parameters())
    for _ in range(repeats):
        start = time.perf_counter()
        release(pipe)
        releases.append(time.perf_counter() - start)
        start = time.perf_counter()
        reload(pipe)
        reloads.append(time.perf_counter() - start)
    return statistics.median(releases), statistics.median(reloads), size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    import torch
    from diffusers import DiffusionPipeline

    from mps_helpers.testing import save_tiny_pipeline, sd15_pipeline

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="mps_helpers_release_") as folder:
        rows = []
        tiny = DiffusionPipeline.from_pretrained(
            save_tiny_pipeline(Path(folder) / "tiny"), local_files_only=True
        )
        rows.append(("tiny SD (float32)", *_time(tiny, args.repeats)))
        big = sd15_pipeline(vocab_size=49408).to(torch.float16)
        big.save_pretrained(Path(folder) / "sd15")
        del big
        big = DiffusionPipeline.from_pretrained(
            Path(folder) / "sd15", local_files_only=True, torch_dtype=torch.float16
        )
        rows.append(("SD 1.5 CLIP-L (float16)", *_time(big, args.repeats)))
    print("| text encoder | weights MB | release s | reload s |")
    print("|---|---|---|---|")
    for name, released, reloaded, size in rows:
        print(f"| {name} | {size / 1e6:.1f} | {released:.4f} | {reloaded:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
