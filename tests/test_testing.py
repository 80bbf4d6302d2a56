"""Tests of mps_helpers.testing: tiny offline pipelines."""

from __future__ import annotations

import functools
import importlib
import inspect
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch

from mps_helpers import testing
from mps_helpers.testing import KINDS, save_tiny_pipeline, tiny_pipeline

if TYPE_CHECKING:
    from pathlib import Path

EXPECTED_CLASSES = {
    "sd": "StableDiffusionPipeline",
    "sd-img2img": "StableDiffusionImg2ImgPipeline",
    "sd-inpaint": "StableDiffusionInpaintPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
    "wan": "WanPipeline",
    "stable-audio": "StableAudioPipeline",
}
# (tokenizer, text encoder) attribute pairs of each family
ENCODERS = {
    "sd": [("tokenizer", "text_encoder")],
    "sdxl": [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")],
    "sd3": [
        ("tokenizer", "text_encoder"),
        ("tokenizer_2", "text_encoder_2"),
        ("tokenizer_3", "text_encoder_3"),
    ],
}
ENCODERS["sd-img2img"] = ENCODERS["sd-inpaint"] = ENCODERS["sd"]
ENCODERS["flux"] = [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")]
ENCODERS["wan"] = ENCODERS["stable-audio"] = [("tokenizer", "text_encoder")]
# What one prompt's 2-step call returns (np): images, Wan's frames, Stable Audio's waveform.
OUTPUT_SHAPES = dict.fromkeys(EXPECTED_CLASSES, (1, 64, 64, 3))
OUTPUT_SHAPES["wan"] = (1, 5, 16, 16, 3)
OUTPUT_SHAPES["stable-audio"] = (1, 2, 7)

PROMPT = "a photo of a cat"
LONG_PROMPT = (
    "a photo of an astronaut riding a horse on mars, highly detailed, ünïcödé, 宇宙飛行士, "
    "emoji \N{ROCKET}, tabs\tand\nnewlines, " * 6
)


def call_inputs(kind: str, *, prompt: str = PROMPT) -> dict[str, Any]:
    """Return keyword arguments for a seeded 2-step, 64 px call of a ``kind`` pipeline."""
    from PIL import Image

    inputs: dict[str, Any] = {
        "prompt": prompt,
        "num_inference_steps": 2,
        "output_type": "np",
        "generator": torch.Generator("cpu").manual_seed(0),
    }
    if kind in {"sd-img2img", "sd-inpaint"}:
        gradient = np.linspace(0, 255, 64 * 64 * 3, dtype=np.float64).reshape(64, 64, 3)
        inputs["image"] = Image.fromarray(gradient.astype(np.uint8))
    if kind == "sd-inpaint":
        mask = np.zeros((64, 64), dtype=np.uint8)
        mask[16:48, 16:48] = 255
        inputs["mask_image"] = Image.fromarray(mask)
    if kind == "wan":
        inputs.update(height=16, width=16, num_frames=5)
    return inputs


def run(pipe: Any, kind: str, *, prompt: str = PROMPT) -> np.ndarray[Any, Any]:
    output = pipe(**call_inputs(kind, prompt=prompt))
    field = {"wan": "frames", "stable-audio": "audios"}.get(kind, "images")
    result = getattr(output, field)
    assert isinstance(result, np.ndarray)
    return result


# The CPU here is shared: build each seed-0 pipeline and run its baseline call once per
# session. No test changes these pipelines.
@functools.cache
def shared_pipeline(kind: str) -> Any:
    return tiny_pipeline(kind)


@functools.cache
def baseline(kind: str) -> np.ndarray[Any, Any]:
    return run(shared_pipeline(kind), kind)


def weights(pipe: Any) -> dict[str, torch.Tensor]:
    """Return every module component's state dict, flattened with component prefixes."""
    flat = {}
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            for key, value in component.state_dict().items():
                flat[f"{name}.{key}"] = value
    return flat


def test_kinds_cover_the_issue() -> None:
    assert isinstance(KINDS, tuple)
    assert {"sd", "sd-img2img", "sdxl", "sd3"} <= set(KINDS)
    assert set(KINDS) == set(EXPECTED_CLASSES)
    assert testing.__all__ == ["KINDS", "save_tiny_pipeline", "sd15_pipeline", "tiny_pipeline"]


@pytest.mark.parametrize("kind", KINDS)
def test_kind_builds_and_runs(kind: str) -> None:
    pipe = shared_pipeline(kind)
    assert type(pipe).__name__ == EXPECTED_CLASSES[kind]
    assert pipe.device.type == "cpu"
    assert pipe.dtype == torch.float32
    assert not any(
        module.training
        for module in pipe.components.values()
        if isinstance(module, torch.nn.Module)
    )
    if hasattr(pipe, "safety_checker"):
        assert pipe.safety_checker is None
    images = baseline(kind)
    assert images.shape == OUTPUT_SHAPES[kind]
    assert np.isfinite(images).all()
    if kind != "stable-audio":  # a waveform is not in [0, 1]
        assert images.min() >= 0.0
        assert images.max() <= 1.0
    assert images.std() > 0.01  # random weights still give a non-constant output


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_weights_other_seed_other_weights(kind: str) -> None:
    first, again = weights(shared_pipeline(kind)), weights(tiny_pipeline(kind))
    assert first.keys() == again.keys()
    assert all(torch.equal(first[key], again[key]) for key in first)
    other = weights(tiny_pipeline(kind, seed=1))
    assert first.keys() == other.keys()
    changed = [key for key in first if not torch.equal(first[key], other[key])]
    # Every randomly initialised tensor differs; only constants (norm weights, biases set to
    # zero, position ids) may agree.
    assert len(changed) > len(first) // 3


def test_same_seed_same_image_other_seed_other_image() -> None:
    np.testing.assert_array_equal(run(tiny_pipeline("sd"), "sd"), baseline("sd"))
    assert np.abs(run(tiny_pipeline("sd", seed=1), "sd") - baseline("sd")).max() > 1e-3


def test_building_leaves_the_callers_random_state_alone() -> None:
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    tiny_pipeline("sd-img2img", seed=7)
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize("kind", ["sd", "sdxl", "sd3", "flux", "wan", "stable-audio"])
def test_saved_pipeline_loads_offline_and_matches(kind: str, tmp_path: Path) -> None:
    from diffusers import DiffusionPipeline

    written = save_tiny_pipeline(tmp_path / kind, kind)
    assert written == tmp_path / kind
    assert (written / "model_index.json").is_file()
    assert list(written.rglob("*.safetensors"))
    assert not list(written.rglob("*.bin"))

    loaded = DiffusionPipeline.from_pretrained(written, local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    if kind == "flux":
        loaded.default_sample_size = 32  # an attribute of the instance, not saved
    original = shared_pipeline(kind)
    assert type(loaded) is type(original)
    saved, built = weights(loaded), weights(original)
    assert saved.keys() == built.keys()
    assert all(torch.equal(saved[key], built[key]) for key in built)
    # Same weights, bit for bit, yet CPU kernels may sum in another order for tensors loaded
    # from disk: differences of ~1e-6 observed.
    np.testing.assert_allclose(run(loaded, kind), baseline(kind), rtol=0, atol=1e-5)
    for tokenizer, _ in ENCODERS[kind]:
        before, after = getattr(original, tokenizer), getattr(loaded, tokenizer)
        assert type(after) is type(before)
        assert after(LONG_PROMPT).input_ids == before(LONG_PROMPT).input_ids
        assert after.model_max_length == before.model_max_length


@pytest.mark.parametrize("bad", ["SD", "sd15", "", "flux-dev", "stable_audio"])
def test_unknown_kind_is_rejected_listing_the_kinds(bad: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown tiny pipeline kind") as caught:
        tiny_pipeline(bad)
    message = str(caught.value)
    assert repr(bad) in message
    assert all(repr(kind) in message for kind in KINDS)
    with pytest.raises(ValueError, match="unknown tiny pipeline kind"):
        save_tiny_pipeline(tmp_path / "out", bad)
    assert not (tmp_path / "out").exists()


def test_missing_transformers_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes `import transformers` (and find_spec) fail as if it were
    # absent; monkeypatch puts both entries back afterwards.
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "mps_helpers.testing")
    # The package that is missing, installable from any index (mps_helpers is on none yet).
    match = r'pip install "transformers>=4\.30" \(the testing extra\)'
    with pytest.raises(ImportError, match=match) as caught:
        importlib.import_module("mps_helpers.testing")
    assert caught.value.name == "transformers"


def test_importing_the_package_does_not_import_testing() -> None:
    code = (
        "import sys, mps_helpers; "
        "heavy = {'mps_helpers.testing', 'transformers', 'torch', 'diffusers'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("kind", KINDS)
def test_text_encoders_match_their_tokenizers(kind: str) -> None:
    pipe = shared_pipeline(kind)
    for tokenizer_name, encoder_name in ENCODERS[kind]:
        tokenizer, encoder = getattr(pipe, tokenizer_name), getattr(pipe, encoder_name)
        assert encoder.config.vocab_size == len(tokenizer)
        assert encoder.config.eos_token_id == tokenizer.eos_token_id
        assert encoder.config.pad_token_id == tokenizer.pad_token_id


@pytest.mark.parametrize("kind", ["sd", "sdxl", "sd3"])
def test_long_arbitrary_prompt_truncates_to_77_and_runs(kind: str) -> None:
    pipe = shared_pipeline(kind)
    clip_tokenizers = [pipe.tokenizer, getattr(pipe, "tokenizer_2", None)]
    for tokenizer in filter(None, clip_tokenizers):
        assert tokenizer.model_max_length == 77
        untruncated = tokenizer(LONG_PROMPT).input_ids
        assert len(untruncated) > 77
        ids = tokenizer(LONG_PROMPT, padding="max_length", truncation=True, max_length=77).input_ids
        assert len(ids) == 77
        assert ids[0] == tokenizer.bos_token_id
        assert ids[-1] == tokenizer.eos_token_id
        # byte-level: nothing in the prompt falls back to the unknown token
        assert tokenizer.unk_token_id not in untruncated[1:-1]
        assert tokenizer.decode(untruncated, skip_special_tokens=True).startswith(
            "a photo of an astronaut"
        )
    images = run(pipe, kind, prompt=LONG_PROMPT)
    assert np.isfinite(images).all()
    # the prompt reaches the image: another prompt gives another image
    assert np.abs(images - baseline(kind)).max() > 1e-4


def test_t5_tokenizer_is_ascii_with_unknowns() -> None:
    tokenizer = shared_pipeline("sd3").tokenizer_3
    ids = tokenizer("A cat, 宇宙").input_ids
    assert ids[-1] == tokenizer.eos_token_id
    assert ids.count(tokenizer.unk_token_id) >= 1  # the CJK characters
    assert tokenizer.decode(ids, skip_special_tokens=True).startswith("A cat,")
    assert len(tokenizer(LONG_PROMPT, truncation=True, max_length=256).input_ids) == 256


def test_sd15_configs_have_sd15_sizes() -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = testing._sd15_configs()
    # Built on the meta device: shapes and parameter counts without allocating 4 GB.
    with torch.device("meta"):
        unet = UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    assert sum(p.numel() for p in unet.parameters()) == pytest.approx(859.5e6, rel=1e-3)
    assert sum(p.numel() for p in vae.parameters()) == pytest.approx(83.7e6, rel=1e-3)
    assert sum(p.numel() for p in text_encoder.parameters()) == pytest.approx(123.1e6, rel=1e-3)
    vae_scale = 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
    assert configs["unet"]["sample_size"] * vae_scale == 512
    # fresh dicts each call: a caller's change does not leak into the next call
    configs["unet"]["sample_size"] = 1
    assert testing._sd15_configs()["unet"]["sample_size"] == 64


def test_sd15_pipeline_rejects_a_vocabulary_smaller_than_the_tokenizer() -> None:
    with pytest.raises(ValueError, match="vocab_size=100"):
        testing.sd15_pipeline(vocab_size=100)


def test_sd15_pipeline_is_public_with_a_keyword_only_seed() -> None:
    assert "sd15_pipeline" in testing.__all__
    seed = inspect.signature(testing.sd15_pipeline).parameters["seed"]
    assert seed.kind is inspect.Parameter.KEYWORD_ONLY
    assert seed.default == 0
    with pytest.raises(TypeError):
        testing.sd15_pipeline(0)  # type: ignore[misc]  # positional on purpose: refused


@pytest.mark.slow
def test_sd15_pipeline_builds_with_sd15_unet() -> None:
    pipe = testing.sd15_pipeline(seed=0)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert sum(p.numel() for p in pipe.unet.parameters()) == pytest.approx(859.5e6, rel=1e-3)
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    ids = pipe.tokenizer(LONG_PROMPT, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        hidden = pipe.text_encoder(ids.input_ids).last_hidden_state
    assert hidden.shape == (1, 77, 768)
