"""Generate on a machine short of memory, with the plan explaining each memory decision.

    python examples/low_memory.py                     # tiny offline pipeline
    python examples/low_memory.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --size 768

The source document's rule is "attention slicing below 64 GB of RAM". The plan applies it on
mps only, with an attention processor that is safe there, and adds the VAE levers when the
decode would not fit. This example first asks what the plan would be on an 8 GB M1 (no Mac
needed: the plan is a pure function of a machine snapshot), then what it is here, then
generates a batch, forcing the memory levers on with --force so that you can see them work
on any machine.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from packaging.version import Version

from mps_helpers import Environment, load_pipeline, plan_for, plan_of, prepare_pipeline

GiB = 2**30

#: An 8 GB M1 MacBook Air on macOS 14 with a current torch, as detect_environment reports it.
EIGHT_GB_MAC = Environment(
    system="Darwin",
    machine="arm64",
    python_machine="arm64",
    is_apple_silicon=True,
    macos_version=Version("14.5"),
    chip="Apple M1",
    torch_version=Version("2.5.1"),
    mps_built=True,
    mps_available=True,
    total_memory=8 * GiB,
    available_memory=3 * GiB,
    swap_used=0,
)

MEMORY_DECISIONS = (
    "memory_tight",
    "attention_slicing",
    "attention_chunk_elements",
    "vae_slicing",
    "vae_tiling",
    "batch_to_loop",
)


def explain(title: str, plan: Any) -> None:
    """Print the memory decisions of ``plan`` with their reasons."""
    print(f"{title}: {plan.device}, {str(plan.dtype).removeprefix('torch.')}")
    for name in MEMORY_DECISIONS:
        print(f"  {name:<25} {getattr(plan, name)!s:<10} {plan.reasons[name]}")


def main(argv: list[str] | None = None) -> int:
    """Explain the plans, generate a batch and save it; return the exit status."""
    parser = argparse.ArgumentParser(description="Low-memory generation, explained.")
    parser.add_argument("--model", help="Hub id or local directory (default: tiny, offline)")
    parser.add_argument("--size", type=int, help="image side in px (default: the model's)")
    parser.add_argument("--batch", type=int, default=2, help="images per call")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--force", action="store_true", help="force the memory levers on")
    parser.add_argument("--output", default="low_memory_{index}.png")
    args = parser.parse_args(argv)
    job = {"height": args.size, "width": args.size, "batch_size": args.batch}
    levers = {"attention_slicing": True, "vae_slicing": True, "vae_tiling": True}
    options = {**job, **(levers if args.force else {})}

    if args.model is None:
        from mps_helpers.testing import tiny_pipeline

        pipe = tiny_pipeline("sd")
        explain("On an 8 GB M1 Mac", plan_for(pipe, env=EIGHT_GB_MAC, **job))
        prepare_pipeline(pipe, **options)
    else:
        # A real model: no need to load it to know what an 8 GB Mac would do with it.
        explain("On an 8 GB M1 Mac", plan_for(env=EIGHT_GB_MAC, **job))
        pipe = load_pipeline(args.model, **options)
    print()
    explain("Here" + (" (levers forced on)" if args.force else ""), plan_of(pipe))

    prompts = [f"a watercolor lighthouse, variation {i}" for i in range(args.batch)]
    generators = [torch.Generator("cpu").manual_seed(i) for i in range(args.batch)]
    size = {} if args.size is None else {"height": args.size, "width": args.size}
    images = pipe(prompts, generator=generators, num_inference_steps=args.steps, **size).images
    for index, image in enumerate(images):
        image.save(args.output.format(index=index))
    print(f"saved {len(images)} images as {args.output.format(index='N')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
