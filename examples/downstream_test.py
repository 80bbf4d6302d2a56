"""How another project tests its own diffusion code with mps_helpers' tiny pipelines.

    python -m pytest examples/downstream_test.py
    MPS_HELPERS_EXAMPLE_MODEL=stable-diffusion-v1-5/stable-diffusion-v1-5 \
        python -m pytest examples/downstream_test.py       # the same tests on a real model

``tiny_pipeline(kind)`` returns a real diffusers pipeline (StableDiffusionPipeline,
StableDiffusionXLPipeline, ...) with a few hundred kilobytes of random weights, built offline:
your code's mps / CUDA / CPU paths run in CI in seconds with no downloads. ``plan_for`` with
an :class:`~mps_helpers.Environment` of another machine tells what the library will do there,
so a Linux CI can check the Mac behaviour your project relies on.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from packaging.version import Version

from mps_helpers import Environment, load_pipeline, plan_for, prepare_pipeline
from mps_helpers.testing import tiny_pipeline

MODEL = os.environ.get("MPS_HELPERS_EXAMPLE_MODEL")
STEPS = 2


# --- the downstream project's own code (normally imported from the project) ------------


def make_thumbnails(pipe: Any, prompts: list[str], *, seed: int = 0) -> list[Any]:
    """Return one image per prompt, reproducibly: prompt ``i`` uses seed ``seed + i``."""
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(prompts))]
    return list(pipe(prompts, generator=generators, num_inference_steps=STEPS).images)


# --- its tests ---------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def pipe(request: pytest.FixtureRequest) -> Any:
    """A prepared pipeline: the real model if one is named, else a tiny one of each kind."""
    if MODEL is not None:
        if request.param != "sd":
            pytest.skip("one real model is enough")
        return load_pipeline(MODEL)
    return prepare_pipeline(tiny_pipeline(request.param))


def test_one_image_per_prompt(pipe: Any) -> None:
    images = make_thumbnails(pipe, ["a red fox", "a blue whale"])
    assert len(images) == 2
    assert images[0].size == images[1].size


def test_the_same_seed_gives_the_same_images(pipe: Any) -> None:
    first = make_thumbnails(pipe, ["a red fox"], seed=5)[0]
    again = make_thumbnails(pipe, ["a red fox"], seed=5)[0]
    assert first.tobytes() == again.tobytes()


def test_looping_returns_what_the_batch_returns() -> None:
    # On mps the library runs a batch as a loop; this project's results must not change.
    # float32 for an exact comparison: in half precision (bfloat16 is the plan on CPUs that
    # compute it natively) a batch of 3 and three batches of 1 round differently.
    looped = prepare_pipeline(tiny_pipeline("sd"), batch_to_loop=True, dtype="float32")
    batched = prepare_pipeline(tiny_pipeline("sd"), batch_to_loop=False, dtype="float32")
    prompts = ["a red fox", "a blue whale", "a lighthouse"]
    pairs = zip(make_thumbnails(looped, prompts), make_thumbnails(batched, prompts), strict=True)
    for a, b in pairs:
        difference = max(abs(x - y) for x, y in zip(a.tobytes(), b.tobytes(), strict=True))
        assert difference <= 1  # one 8-bit step of rounding


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
    total_memory=8 * 2**30,
    available_memory=3 * 2**30,
)


def test_what_an_8gb_mac_would_do_with_our_pipeline() -> None:
    # No Mac needed: the plan is a pure function of a machine snapshot and the pipeline.
    plan = plan_for(tiny_pipeline("sd"), env=EIGHT_GB_MAC)
    assert plan.device == "mps"
    assert plan.dtype == torch.float16
    assert plan.attention_slicing  # under 64 GB, as the diffusers mps guide says
    assert plan.attention_processor == "safe"  # never diffusers' NaN-prone sliced one
    assert plan.batch_to_loop  # batched prompts are unreliable on mps
