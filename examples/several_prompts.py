"""Several prompts in one call, safely on mps: the prepared call loops them for you.

    python examples/several_prompts.py                 # tiny offline pipeline
    python examples/several_prompts.py --loop on       # see the loop on any machine
    python examples/several_prompts.py --model stable-diffusion-v1-5/stable-diffusion-v1-5

The source document says batched prompts crash or give noise on mps and to iterate
instead. With a prepared pipeline you keep writing one batched call: on mps the plan turns it
into a loop of single-prompt calls that returns what the batch would have (one image per
prompt, in order, each from its own generator); on CUDA, where looping costs 2.5-4x, and
on the CPU it stays a batch. --check runs both ways and compares them: with one generator
per prompt the two agree to within the dtype's rounding (``loop_tolerance``: 1e-4 in
float32, more in float16 and bfloat16, where kernels that sum in a batch-size-dependent
order round differently; docs/explanation/batch-and-warmup.md has the figures).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from mps_helpers import load_pipeline, loop_tolerance, plan_of, prepare_pipeline

PROMPTS = (
    "a red fox in the snow",
    "a blue whale under the sea",
    "a lighthouse at dusk, oil painting",
)
SWITCH = {"auto": "auto", "on": True, "off": False}


def build(model: str | None, loop: bool | str) -> Any:
    """Return a pipeline prepared with ``batch_to_loop=loop``."""
    if model is None:
        from mps_helpers.testing import tiny_pipeline

        return prepare_pipeline(tiny_pipeline("sd"), batch_to_loop=loop)
    return load_pipeline(model, batch_to_loop=loop)


def generate(pipe: Any, steps: int) -> Any:
    """Return the images for PROMPTS, one generator (seed) per prompt, as numpy arrays."""
    generators = [torch.Generator("cpu").manual_seed(i) for i in range(len(PROMPTS))]
    return pipe(
        list(PROMPTS), generator=generators, num_inference_steps=steps, output_type="np"
    ).images


def main(argv: list[str] | None = None) -> int:
    """Generate one image per prompt in one call; return the exit status."""
    parser = argparse.ArgumentParser(description="Several prompts in one call.")
    parser.add_argument("--model", help="Hub id or local directory (default: tiny, offline)")
    parser.add_argument("--loop", choices=SWITCH, default="auto", help="batch_to_loop")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--check", action="store_true", help="compare loop and batch")
    parser.add_argument("--output", default="prompt_{index}.png")
    args = parser.parse_args(argv)

    pipe = build(args.model, SWITCH[args.loop])
    plan = plan_of(pipe)
    how = "a loop of single-prompt calls" if plan.batch_to_loop else "one batched call"
    print(f"{len(PROMPTS)} prompts on {plan.device} as {how}: {plan.reasons['batch_to_loop']}")
    images = generate(pipe, args.steps)

    from PIL import Image

    for index, array in enumerate(images):
        Image.fromarray((array * 255).round().astype("uint8")).save(args.output.format(index=index))
    print(f"saved {len(images)} images as {args.output.format(index='N')}")

    if args.check:
        # The same pipeline the other way round: loop <-> batch (re-preparing is cheap).
        other = prepare_pipeline(pipe, batch_to_loop=not plan.batch_to_loop)
        difference = abs(generate(other, args.steps) - images).max()
        # Not bit-equal: the allowance is the dtype's rounding (mps_helpers.loop_tolerance).
        tolerance = loop_tolerance(plan.dtype)
        dtype = str(plan.dtype).removeprefix("torch.")
        print(
            f"largest pixel difference between loop and batch: {difference:.1e} "
            f"({dtype} allows {tolerance:.1e})"
        )
        if difference > tolerance:
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
