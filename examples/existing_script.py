"""A script written for a Mac, straight from the diffusers mps guide, that we do not edit.

Run it unchanged under mps_helpers, on a Mac, a CUDA machine or a CPU:

    mps-helpers run examples/existing_script.py                 # tiny offline model
    mps-helpers run examples/existing_script.py --model stable-diffusion-v1-5/stable-diffusion-v1-5
    mps-helpers run --attention-slicing on examples/existing_script.py   # force a decision

Every pipeline it loads comes out prepared for the machine. Its own ``.to("mps")`` keeps the
planned device where there is no mps (with an AutoPrepareWarning saying so), and its
``enable_attention_slicing()`` keeps the plan's attention, which on mps is the memory-bounded
processor that does not produce black images. Run with plain ``python`` on a machine without
mps, ``.to("mps")`` fails, as the guide's code always has.

``existing_script_decorated.py`` runs the same ``main`` under ``@auto_prepare`` instead.
"""

import argparse

import torch
from diffusers import DiffusionPipeline


def tiny_model() -> str:
    """Save a tiny random-weights model, fp16 variant included, and return its directory."""
    # Only so that this example runs offline; a real script names a model id.
    import tempfile

    from mps_helpers.testing import tiny_pipeline

    pipe = tiny_pipeline("sd")
    # 32 px images by default (16x16 latents): the guide's 50-step calls take seconds on a CPU.
    pipe.unet.register_to_config(sample_size=16)
    folder = tempfile.mkdtemp(prefix="tiny-sd-")
    pipe.save_pretrained(folder, variant="fp16", safe_serialization=True)
    return folder


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--output", default="existing_script.png")
    args = parser.parse_args(argv)
    model = args.model or tiny_model()

    # --- from here on, the diffusers mps guide's code, as written ------------------------
    pipe = DiffusionPipeline.from_pretrained(
        model, torch_dtype=torch.float16, variant="fp16", use_safetensors=True
    ).to("mps")
    pipe.enable_attention_slicing()

    prompt = "a photo of an astronaut riding a horse on mars"
    # First-time "warmup" pass if PyTorch version is 1.13
    _ = pipe(prompt, num_inference_steps=1)

    # Results match those from the CPU device after the warmup pass.
    image = pipe(prompt).images[0]
    # --------------------------------------------------------------------------------------
    image.save(args.output)
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
