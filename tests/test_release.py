"""Tests of releasing the text encoders within a call (mps_helpers._release)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file

from mps_helpers import plan_of, prepare_pipeline
from mps_helpers._apply import apply_plan
from mps_helpers._release import needs_encoders, release, released, reload
from mps_helpers.testing import save_tiny_pipeline, tiny_pipeline

if TYPE_CHECKING:
    from pathlib import Path

PROMPT = "a lighthouse at dawn"


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sd")


def _load(path: Path, *, release_encoders: bool) -> Any:
    pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    prepare_pipeline(pipe, device="cpu", nan_guard=False)
    plan = plan_of(pipe)
    assert plan is not None
    apply_plan(pipe, plan.replace(release_text_encoders=release_encoders))
    return pipe


def _run(pipe: Any, **kwargs: Any) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    out = pipe(num_inference_steps=2, output_type="np", generator=generator, **kwargs)
    return np.asarray(out.images)


def _encoder_elements(pipe: Any) -> int:
    return sum(p.numel() for p in pipe.text_encoder.parameters())


def test_released_after_encoding_and_reloaded_for_the_next_call(saved: Path) -> None:
    reference = _run(_load(saved, release_encoders=False), prompt=PROMPT)
    pipe = _load(saved, release_encoders=True)
    full = _encoder_elements(pipe)
    assert full > 0
    first = _run(pipe, prompt=PROMPT)
    assert released(pipe) == ("text_encoder",)
    assert _encoder_elements(pipe) == 0  # the weights' memory went back
    assert pipe.text_encoder.dtype == torch.float32  # the module still reports its dtype
    assert pipe.device.type == "cpu"
    second = _run(pipe, prompt=PROMPT)  # reloaded from disk, then released again
    assert released(pipe) == ("text_encoder",)
    np.testing.assert_allclose(first, reference, atol=1e-6)
    np.testing.assert_allclose(second, reference, atol=1e-6)
    assert reload(pipe) >= 0.0
    assert _encoder_elements(pipe) == full
    assert released(pipe) == ()


def test_precomputed_prompts_keep_the_encoders_released(saved: Path) -> None:
    pipe = _load(saved, release_encoders=True)
    embeds, negative = pipe.encode_prompt(PROMPT, "cpu", 1, True)
    reference = _run(pipe, prompt_embeds=embeds, negative_prompt_embeds=negative)
    assert released(pipe) == ("text_encoder",)
    again = _run(pipe, prompt_embeds=embeds, negative_prompt_embeds=negative)
    assert released(pipe) == ("text_encoder",)
    assert _encoder_elements(pipe) == 0  # not reloaded: the call did not need them
    np.testing.assert_allclose(again, reference, atol=1e-6)


def test_needs_encoders() -> None:
    pipe = tiny_pipeline("sd")
    embeds = torch.zeros(1, 77, 32)
    assert needs_encoders(pipe, {"prompt": PROMPT})
    assert needs_encoders(pipe, {"prompt_embeds": embeds})  # guidance: the negative too
    assert not needs_encoders(pipe, {"prompt_embeds": embeds, "negative_prompt_embeds": embeds})
    assert not needs_encoders(pipe, {"prompt_embeds": embeds, "guidance_scale": 1.0})


def test_a_pipeline_built_in_memory_is_never_released(caplog: pytest.LogCaptureFixture) -> None:
    pipe = tiny_pipeline("sd")
    with caplog.at_level(logging.INFO, logger="mps_helpers._release"):
        assert release(pipe) == ()
    assert _encoder_elements(pipe) > 0


def test_an_encoder_whose_files_miss_a_parameter_is_kept(tmp_path: Path) -> None:
    path = save_tiny_pipeline(tmp_path / "sd")
    files = sorted((path / "text_encoder").glob("*.safetensors"))
    assert len(files) == 1
    from safetensors.torch import load_file

    tensors = load_file(str(files[0]))
    tensors.pop(next(k for k in tensors if k.endswith("final_layer_norm.weight")))
    save_file(tensors, str(files[0]))
    pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True)
    assert release(pipe) == ()
    assert _encoder_elements(pipe) > 0
