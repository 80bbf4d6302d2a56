"""Tests of the memory estimate (mps_helpers._memory): specs, formulas, the public function."""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any

import architectures as arch
import diffusers
import pytest
import torch
from headers import GARBAGE, save_headers, write_header_file
from meta_trace import traced_peak
from packaging.version import Version

import mps_helpers
from mps_helpers import MemoryEstimate, estimate_memory, plan_for
from mps_helpers._memory import (
    PHASES,
    ComponentSpec,
    Settings,
    _Attention,
    _kl_decode_call,
    _text_step,
    _transformer_step,
    _unet_step,
    _wan_decode,
    estimate,
    guidance_mode,
    read_safetensors_header,
    spec_of_directory,
    spec_of_pipeline,
)
from mps_helpers.testing import tiny_pipeline

if TYPE_CHECKING:
    from pathlib import Path

GiB = 2**30
H = torch.float16
KERNEL = _Attention("cuda", Version("2.11"), 2, None, False)


@pytest.fixture(scope="module")
def meta_pipes() -> dict[str, Any]:
    return {name: arch.build(name, "meta") for name in ("sd15", "sdxl", "flux", "wan")}


@pytest.fixture(scope="module")
def header_dirs(meta_pipes: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("headers")
    return {name: save_headers(pipe, root / name) for name, pipe in meta_pipes.items()}


def _meta(*shape: int, dtype: torch.dtype = H) -> torch.Tensor:
    return torch.empty(*shape, device="meta", dtype=dtype)


def _close(formula: int, traced: int, tolerance: float = 0.05) -> None:
    assert abs(formula / traced - 1) <= tolerance, (formula / 2**20, traced / 2**20)


# ---------------------------------------------------------------------------------------
# Each family's formula against every allocation of a real-size forward on the meta device


@pytest.mark.parametrize(("latent", "batch"), [(32, 2), (48, 4)])
def test_unet_formula_matches_the_trace(meta_pipes: dict, latent: int, batch: int) -> None:
    for name, cross in (("sd15", 768), ("sdxl", 2048)):
        unet = meta_pipes[name].unet
        x, text = _meta(batch, 4, latent, latent), _meta(batch, 77, cross)
        extra: dict[str, Any] = {}
        if name == "sdxl":
            extra["added_cond_kwargs"] = {
                "text_embeds": _meta(batch, 1280),
                "time_ids": _meta(batch, 6),
            }
        traced = traced_peak(
            lambda u=unet, x=x, t=text, e=extra: u(x, 10, t, **e), unet, x, text, extra
        )
        peak = _unet_step(
            unet.config,
            h=latent,
            w=latent,
            batch=batch,
            text=77,
            s=2,
            attention=KERNEL,
            workspace=0,
        )
        _close(peak.bytes, traced)


def test_unet_materialised_attention_matches_the_trace(meta_pipes: dict) -> None:
    # meta's SDPA is the math path, in float32 as CUDA's and the CPU's math path from 2.5
    unet = meta_pipes["sd15"].unet
    x, text = _meta(2, 4, 32, 32), _meta(2, 77, 768)
    traced = traced_peak(lambda: unet(x, 10, text), unet, x, text, kernel=False)
    math = _Attention("cuda", Version("2.11"), 2, None, False, forced=False)
    peak = _unet_step(unet.config, h=32, w=32, batch=2, text=77, s=2, attention=math, workspace=0)
    _close(peak.bytes, traced)
    assert "attention" in peak.where


@pytest.mark.parametrize(
    ("latent", "batch", "slicing", "tiling"),
    [
        (64, 1, False, False),
        (96, 2, False, False),
        (128, 4, True, False),
        (160, 2, False, True),
        (128, 4, True, True),
    ],
)
def test_vae_decode_formula_matches_the_trace(
    meta_pipes: dict, latent: int, batch: int, slicing: bool, tiling: bool
) -> None:
    vae = meta_pipes["sd15"].vae
    vae.use_slicing, vae.use_tiling = slicing, tiling
    try:
        z = _meta(batch, 4, latent, latent)
        traced = traced_peak(lambda: vae.decode(z), vae, z)
    finally:
        vae.use_slicing = vae.use_tiling = False
    settings = Settings(vae_slicing=slicing, vae_tiling=tiling)
    peak = _kl_decode_call(
        vae.config,
        h=latent,
        w=latent,
        batch=batch,
        s=2,
        settings=settings,
        attention=KERNEL,
        workspace=0,
        scale=8,
    )
    _close(peak.bytes, traced)


def test_transformer_formulas_match_the_trace(meta_pipes: dict) -> None:
    with torch.device("meta"):
        sd3 = diffusers.SD3Transformer2DModel(**arch.SD3_MEDIUM).to(H)
        pixart = diffusers.PixArtTransformer2DModel(**arch.PIXART_SIGMA).to(H)
    x, text, pool, t = _meta(2, 16, 64, 64), _meta(2, 333, 4096), _meta(2, 2048), _meta(2)
    traced = traced_peak(lambda: sd3(x, text, pool, t), sd3, x, text, pool, t)
    peak, _ = _transformer_step(
        "sd3", sd3.config, h=64, w=64, frames=1, batch=2, text=333, s=2, attention=KERNEL
    )
    _close(peak.bytes, traced)

    x4, text4 = _meta(2, 4, 64, 64), _meta(2, 300, 4096)
    traced = traced_peak(
        lambda: pixart(
            x4,
            encoder_hidden_states=text4,
            timestep=t,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ),
        pixart,
        x4,
        text4,
        t,
    )
    peak, _ = _transformer_step(
        "dit", pixart.config, h=64, w=64, frames=1, batch=2, text=300, s=2, attention=KERNEL
    )
    _close(peak.bytes, traced)

    flux = meta_pipes["flux"].transformer
    bf = torch.bfloat16
    tokens = 32 * 32
    args = (
        _meta(1, tokens, 64, dtype=bf),
        _meta(1, 512, 4096, dtype=bf),
        _meta(1, 768, dtype=bf),
        _meta(1, dtype=bf),
        _meta(tokens, 3, dtype=torch.float32),
        _meta(512, 3, dtype=torch.float32),
        _meta(1, dtype=bf),
    )
    traced = traced_peak(lambda: flux(*args), flux, args)
    peak, _ = _transformer_step(
        "flux", flux.config, h=64, w=64, frames=1, batch=1, text=512, s=2, attention=KERNEL
    )
    _close(peak.bytes, traced)


def test_video_formulas_match_the_trace(meta_pipes: dict) -> None:
    wan = meta_pipes["wan"]
    x, text, t = _meta(1, 16, 5, 30, 52), _meta(1, 512, 4096), _meta(1)
    traced = traced_peak(lambda: wan.transformer(x, t, text), wan.transformer, x, text, t)
    peak, _ = _transformer_step(
        "dit",
        wan.transformer.config,
        h=30,
        w=52,
        frames=5,
        batch=1,
        text=512,
        s=2,
        attention=KERNEL,
    )
    _close(peak.bytes, traced)
    z = _meta(1, 16, 5, 30, 52)
    traced = traced_peak(lambda: wan.vae.decode(z), wan.vae, z)
    decode = _wan_decode(wan.vae.config, h=30, w=52, frames=5, batch=1, s=2, workspace=0)
    _close(decode.bytes, traced)


@pytest.mark.parametrize("kind", ["clip", "t5"])
def test_text_encoder_formulas_match_the_trace(meta_pipes: dict, kind: str) -> None:
    encoder = (
        meta_pipes["sdxl"].text_encoder_2 if kind == "clip" else meta_pipes["flux"].text_encoder_2
    )
    length = 77 if kind == "clip" else 512
    ids = torch.zeros(2, length, dtype=torch.long, device="meta")
    # T5's position bias goes to SDPA as a float mask, and SDPA then takes the math path
    # (as measured on CUDA): the trace keeps meta's math path for it
    traced = traced_peak(
        lambda: encoder(ids, output_hidden_states=kind == "clip"),
        encoder,
        ids,
        kernel=kind == "clip",
    )
    spec = ComponentSpec(
        name="text_encoder",
        class_name=type(encoder).__name__,
        role="text_encoder",
        config=encoder.config.to_dict(),
    )
    peak = _text_step(spec, batch=2, length=length, s=2, attention=KERNEL)
    _close(peak.bytes, traced, tolerance=0.15)


# ---------------------------------------------------------------------------------------
# Specs


def test_headers_count_the_same_weights_as_the_loaded_modules(
    meta_pipes: dict, header_dirs: dict
) -> None:
    for name in ("sd15", "sdxl", "flux", "wan"):
        loaded = {c.name: c for c in spec_of_pipeline(meta_pipes[name]).components}
        saved = spec_of_directory(header_dirs[name])
        assert {c.name for c in saved.components} == set(loaded)
        for component in saved.components:
            assert component.source == "safetensors header"
            # the files hold the persistent buffers only: within a few thousand elements
            assert component.elements == pytest.approx(loaded[component.name].elements, rel=1e-3)
            assert component.role == loaded[component.name].role
            assert component.dtype == loaded[component.name].dtype
        assert saved.pipeline_class == type(meta_pipes[name]).__name__


def test_the_sizes_the_pipelines_read(header_dirs: dict) -> None:
    sdxl = spec_of_directory(header_dirs["sdxl"])
    assert sdxl.text_lengths == {"text_encoder": 77, "text_encoder_2": 77}
    assert sdxl.upcasts_vae
    assert sdxl.guidance == "batch"
    assert sdxl.vae_scale_factor == 8
    flux = spec_of_directory(header_dirs["flux"])
    assert flux.text_lengths["text_encoder_2"] == 512  # FluxPipeline's max_sequence_length
    assert flux.guidance == "none"
    assert not flux.upcasts_vae
    wan = spec_of_directory(header_dirs["wan"])
    assert wan.guidance == "sequential"
    assert (wan.temporal_scale_factor, wan.vae_scale_factor, wan.default_frames) == (4, 8, 81)


def test_guidance_modes() -> None:
    assert guidance_mode(diffusers.StableDiffusion3Pipeline) == "batch"
    assert guidance_mode(diffusers.PixArtSigmaPipeline) == "batch"
    assert guidance_mode(diffusers.FluxPipeline) == "none"
    assert guidance_mode(diffusers.WanPipeline) == "sequential"


def test_a_header_is_read_and_nothing_after_it(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    write_header_file(path, {"w": ("float16", (4096, 4096)), "step": ("int64", (1,))})
    header = read_safetensors_header(path)
    assert header["w"]["shape"] == [4096, 4096]
    assert path.read_bytes().endswith(GARBAGE)  # no tensor data behind the header at all
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError, match="not a safetensors file"):
        read_safetensors_header(tmp_path / "bad.safetensors")


def test_integer_tensors_keep_their_bytes(tmp_path: Path) -> None:
    (tmp_path / "unet").mkdir()
    write_header_file(
        tmp_path / "unet" / "diffusion_pytorch_model.safetensors",
        {"w": ("float32", (10, 10)), "ids": ("int64", (7,))},
    )
    (tmp_path / "unet" / "config.json").write_text("{}", encoding="utf-8")
    (tmp_path / "model_index.json").write_text(
        json.dumps({"_class_name": "X", "unet": ["diffusers", "UNet2DConditionModel"]}),
        encoding="utf-8",
    )
    spec = spec_of_directory(tmp_path)
    unet = spec.components[0]
    assert (unet.elements, unet.fixed_bytes, unet.dtype) == (100, 56, "float32")
    assert unet.weight_bytes("float16") == 256


def test_a_directory_without_an_index_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"model_index\.json"):
        estimate_memory(tmp_path, height=512, width=512)


# ---------------------------------------------------------------------------------------
# The estimate


def test_the_estimate_of_sdxl_at_1024(header_dirs: dict) -> None:
    spec = spec_of_directory(header_dirs["sdxl"])
    result = estimate(
        spec, Settings(device="cuda", dtype="float16"), height=1024, width=1024, batch_size=4
    )
    assert result.peak_phase == "VAE decode"
    assert result.weights["unet"] == 2_567_463_684 * 2
    # the pipeline upcasts its VAE for the decode: its weights are float32 then
    assert (
        result.resident["VAE decode"] - result.resident["denoiser step"] == (result.weights["vae"])
    )
    assert any("upcasts" in note for note in result.notes)
    assert result.peak == result.phase_total("VAE decode")
    text = str(result)
    for phase in PHASES:
        assert phase in text
    assert "<- peak" in text


def test_measures_lower_their_phase(header_dirs: dict) -> None:
    spec = spec_of_directory(header_dirs["sd15"])
    base = Settings(device="mps", dtype="float16", torch_version=Version("2.5.1"))

    def run(settings: Settings, batch: int = 4) -> MemoryEstimate:
        return estimate(spec, settings, height=1024, width=1024, batch_size=batch)

    plain = run(base)
    assert plain.working["denoiser step"] > 30 * GiB  # 8 x 8 heads x 16384^2 scores, twice
    bounded = run(base.replace(attention_slicing=True, attention_chunk_elements=2**26))
    assert bounded.working["denoiser step"] < plain.working["denoiser step"] / 10
    assert run(base.replace(vae_slicing=True)).working["VAE decode"] < (
        plain.working["VAE decode"] / 3
    )
    assert run(base.replace(vae_tiling=True)).working["VAE decode"] < (
        plain.working["VAE decode"] / 2
    )
    looped = run(base.replace(batch_to_loop=True))
    assert looped.working == run(base, batch=1).working
    released = run(base.replace(release_text_encoders=True))
    assert (
        released.resident["VAE decode"]
        == plain.resident["VAE decode"] - (plain.weights["text_encoder"])
    )
    assert released.resident["text encoding"] == plain.resident["text encoding"]
    # torch 2.13's mps kernels do not help head dim 40 (SD 1.5's first level)
    newer = run(base.replace(torch_version=Version("2.13.0")))
    assert newer.working["denoiser step"] == plain.working["denoiser step"]


def test_estimate_memory_of_a_pipeline_with_its_plan() -> None:
    pipe = tiny_pipeline("sd")
    cpu = mps_helpers.detect_environment().replace(mps_available=False, cuda_available=False)
    plan = plan_for(pipe, env=cpu, height=128, width=128, batch_size=2)
    result = estimate_memory(pipe, height=128, width=128, batch_size=2, plan=plan, env=cpu)
    assert isinstance(result, MemoryEstimate)
    assert result.device == "cpu"
    assert result.dtype == str(plan.dtype).removeprefix("torch.")
    assert set(result.working) == set(PHASES)
    assert result.peak == max(result.phase_total(p) for p in PHASES)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.peak = 0  # type: ignore[misc]
    with pytest.raises(TypeError):
        result.weights["unet"] = 0  # type: ignore[index]
    data = result.to_dict()
    json.dumps(data)
    assert data["phase_totals"][result.peak_phase] == result.peak
    # without a plan: the weights' own dtype, on the device plan_for would pick
    plain = estimate_memory(pipe, height=128, width=128, env=cpu)
    assert (plain.device, plain.dtype, plain.batch_size) == ("cpu", "float32", 1)


@pytest.mark.parametrize(
    ("option", "value"), [("height", 0), ("width", -8), ("batch_size", 1.5), ("frames", True)]
)
def test_estimate_memory_refuses_bad_sizes(option: str, value: Any) -> None:
    sizes: dict[str, Any] = {"height": 64, "width": 64, option: value}
    with pytest.raises(ValueError, match=option):
        estimate_memory(tiny_pipeline("sd"), **sizes)


def test_estimate_memory_refuses_other_objects() -> None:
    with pytest.raises(TypeError, match="expected a diffusers pipeline"):
        estimate_memory(object(), height=64, width=64)
