"""Generate a list of prompts on every GPU of a machine (or of several) with one script.

The same script runs in one process or under a launcher; ``mps_helpers.generate`` gives each
process its share of the prompts and gathers the images, in prompt order, on the main one::

    python examples/multi_gpu.py                                    # one process, any device
    accelerate launch --num_processes 2 examples/multi_gpu.py       # one process per GPU
    torchrun --nproc_per_node 2 examples/multi_gpu.py               # the same, with torchrun

The default ``--model tiny`` is a tiny random-weight pipeline built offline (a smoke test:
expect noise); ``--model sd15-random`` has Stable Diffusion 1.5's architecture with random
weights (for timing, no download); ``--model stable-diffusion-v1-5/stable-diffusion-v1-5``
(or any model id or folder) makes real images. ``--repeat 3`` times three runs after a
warm-up and prints images per second. Under a launcher it needs the ``distributed`` extra
(accelerate): from a clone, ``python -m pip install ".[distributed]"``.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import mps_helpers

PROMPTS = [
    "a lighthouse on a cliff at dawn, oil painting",
    "a red fox in fresh snow, photograph",
    "a bowl of ramen, studio lighting",
    "an astronaut riding a horse on the moon",
    "a cozy library with tall windows, watercolor",
    "a sailboat in a storm, dramatic clouds",
    "a robot tending a vegetable garden",
    "a city street at night in the rain, neon signs",
]


def load(model: str) -> Any:
    """Return the pipeline: a model id or folder, or one of the offline random-weight ones."""
    if model == "tiny":
        from mps_helpers.testing import tiny_pipeline

        return tiny_pipeline("sd")
    if model == "sd15-random":
        from mps_helpers.testing import sd15_pipeline

        return sd15_pipeline()
    return mps_helpers.load_pipeline(model)


def main() -> None:
    """Parse the options, generate, and save or time the images on the main process."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        default="tiny",
        help="tiny (default, offline), sd15-random, or a model id or folder",
    )
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="how many images")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=None, help="height and width in pixels")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    parser.add_argument("--out", type=Path, default=None, help="folder for the PNG files")
    parser.add_argument("--repeat", type=int, default=0, help="timed runs after a warm-up")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        # Under a launcher, make "cuda" mean this process's GPU before the weights go there
        # (otherwise every process would load onto GPU 0 first).
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    pipe = load(args.model)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    options: dict[str, Any] = {"num_inference_steps": args.steps, "seeds": args.seed}
    if args.size is not None:
        options.update(height=args.size, width=args.size)

    try:
        run(pipe, prompts, options, repeat=args.repeat, out=args.out)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run(pipe: Any, prompts: list[str], options: dict[str, Any], *, repeat: int, out: Any) -> None:
    """Generate (timing ``repeat`` runs after a warm-up), then save on the main process."""
    if repeat:
        # The first call in a process loads kernels (seconds on CUDA): keep it out of the figure.
        mps_helpers.generate(pipe, prompts, **options)
    seconds = []
    for _ in range(max(repeat, 1)):
        start = time.perf_counter()
        result = mps_helpers.generate(pipe, prompts, **options)
        seconds.append(time.perf_counter() - start)
    if result is None:
        return  # another process: the main one has the images
    if repeat:
        processes = int(os.environ.get("WORLD_SIZE", "1"))
        median = statistics.median(seconds)
        print(
            f"{processes} process(es), {len(prompts)} images, "
            f"{options['num_inference_steps']} steps: median {median:.2f} s per run, "
            f"{len(prompts) / median:.2f} images/s (runs: {', '.join(f'{s:.2f}' for s in seconds)})"
        )
    if out is not None or not repeat:
        folder = out or Path("multi-gpu-images")
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(result.images):
            image.save(folder / f"{i:03d}.png")
        print(f"{len(result.images)} images in {folder}/")


if __name__ == "__main__":
    main()
