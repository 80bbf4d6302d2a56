"""Generate one image with a prepared pipeline: the shortest useful program.

    python examples/basic.py                   # a tiny offline pipeline: seconds, noise
    python examples/basic.py --model stable-diffusion-v1-5/stable-diffusion-v1-5

The same lines run on an Apple Silicon Mac (mps, float16, memory-bounded attention), on a
CUDA machine (float16) and on a CPU (float32): the plan decides, and prints why.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from mps_helpers import load_pipeline, plan_of, prepare_pipeline


def build(model: str | None) -> Any:
    """Return a prepared pipeline: ``model`` if given, else a tiny offline one."""
    if model is None:
        # Stands in for a real model offline: a real StableDiffusionPipeline, random weights.
        from mps_helpers.testing import tiny_pipeline

        return prepare_pipeline(tiny_pipeline("sd"))
    # Decides the dtype before loading (no float32 copy on an 8 GB Mac), then prepares.
    return load_pipeline(model)


def main(argv: list[str] | None = None) -> int:
    """Generate and save one image; return the exit status."""
    parser = argparse.ArgumentParser(description="Generate one image with a prepared pipeline.")
    parser.add_argument("--model", help="Hub id or local directory (default: tiny, offline)")
    parser.add_argument("--prompt", default="a photo of an astronaut riding a horse on mars")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--output", default="basic.png")
    args = parser.parse_args(argv)

    pipe = build(args.model)
    print(plan_of(pipe))  # every decision, with its reason
    # Noise drawn on the CPU: the same seed gives the same image on mps, CUDA and CPU.
    generator = torch.Generator("cpu").manual_seed(0)
    image = pipe(args.prompt, num_inference_steps=args.steps, generator=generator).images[0]
    image.save(args.output)
    print(f"saved {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
