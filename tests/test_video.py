"""Video pipelines prepared: one prompt is one clip, and a 3-D VAE tiles by frames too."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from _tiny_transformers import tiny_wan
from machines import MACHINES

from mps_helpers import prepare_pipeline
from mps_helpers._video import set_framewise_decoding

CPU = MACHINES["linux-cpu"]


def run(pipe: Any) -> Any:
    return pipe(
        ["a fox", "a cat"],
        num_videos_per_prompt=2,
        height=32,
        width=32,
        num_frames=5,
        num_inference_steps=2,
        output_type="np",
        generator=[torch.Generator().manual_seed(i) for i in range(4)],
    ).frames


def test_a_looped_video_batch_is_one_clip_per_prompt_video_and_equals_the_batch() -> None:
    pipe = tiny_wan()
    reference = run(pipe)
    prepared = prepare_pipeline(pipe, env=CPU, device="cpu", batch_to_loop=True, nan_guard=False)
    looped = run(prepared)
    assert looped.shape == reference.shape == (4, 5, 32, 32, 3)
    assert abs(looped - reference).max() <= 1e-5


def test_framewise_decoding_where_the_vae_has_the_switch() -> None:
    ltx_like = SimpleNamespace(use_framewise_decoding=False)
    assert set_framewise_decoding(ltx_like, True)
    assert ltx_like.use_framewise_decoding
    assert set_framewise_decoding(ltx_like, False)
    assert not ltx_like.use_framewise_decoding
    assert not set_framewise_decoding(SimpleNamespace(), True)  # Wan: no switch
    assert not set_framewise_decoding(None, True)


def test_a_tiled_video_plan_turns_on_tiling_of_the_3d_vae() -> None:
    pipe = prepare_pipeline(tiny_wan(), env=CPU, device="cpu", vae_tiling=True, nan_guard=False)
    assert pipe.vae.use_tiling
