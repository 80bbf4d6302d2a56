"""Tiny diffusers pipelines with random weights, built offline, for tests.

``tiny_pipeline("sd")`` returns a real :class:`~diffusers.StableDiffusionPipeline` whose
components hold about two million random weights (8 MB), so that a two-step call at its
default size (64 px) takes about a tenth of a second on a CPU. Downstream projects use these to
exercise their own mps / CUDA / CPU code paths in CI with no downloads::

    from mps_helpers.testing import tiny_pipeline

    pipe = tiny_pipeline("sdxl", seed=0)
    image = pipe("a photo of an astronaut", num_inference_steps=2, output_type="np").images

Pipelines come on the CPU in float32; move them as any pipeline (``pipe.to("mps")``). The
CLIP tokenizers are byte-level ones built from a vocabulary written on the spot (every byte,
as a word piece and as a word end, plus the two CLIP special tokens, no merges), so any text
tokenizes, one token per byte, truncated to 77 tokens as CLIP's is; SD3's T5 tokenizer knows
the printable ASCII characters and maps the rest to ``<unk>``. Every text encoder's
``vocab_size`` matches its tokenizer. Nothing is downloaded, and a saved pipeline loads with
``local_files_only=True``. Tested with transformers 5.24 + diffusers 0.42 and with
transformers 4.57 + diffusers 0.35.

This module needs the ``testing`` extra, which brings transformers (from a clone:
``pip install ".[testing]"``, or ``pip install "transformers>=4.30"``); importing it without
transformers raises ImportError saying so.

.. versionadded:: 0.1
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Checked at import time, cheaply (no import of transformers itself), so that a missing extra
# shows up where the user imports this module rather than deep inside a test.
if importlib.util.find_spec("transformers") is None:
    raise ImportError(
        "mps_helpers.testing needs transformers, which is not installed: "
        'pip install "transformers>=4.30" (the testing extra)',
        name="transformers",
    )

if TYPE_CHECKING:
    import os


__all__ = ["KINDS", "save_tiny_pipeline", "sd15_pipeline", "tiny_pipeline"]

KINDS: tuple[str, ...] = (
    "sd",
    "sd-img2img",
    "sd-inpaint",
    "sdxl",
    "sd3",
    "flux",
    "wan",
    "stable-audio",
)
"""The pipeline families :func:`tiny_pipeline` builds."""

# CLIP's context length; diffusers reads it from the tokenizer's ``model_max_length``.
_MAX_LENGTH = 77

# Stable Diffusion 1.x/2.x/XL training noise schedule, as in the models' scheduler configs.
_SD_SCHEDULE: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
}


def tiny_pipeline(kind: str = "sd", *, seed: int = 0) -> Any:
    """Return a tiny pipeline of family ``kind`` with random weights drawn from ``seed``.

    Args:
        kind: one of :data:`KINDS`: ``"sd"`` (StableDiffusionPipeline), ``"sd-img2img"``
            (StableDiffusionImg2ImgPipeline), ``"sd-inpaint"`` (StableDiffusionInpaintPipeline,
            9-channel UNet), ``"sdxl"`` (StableDiffusionXLPipeline, two text encoders),
            ``"sd3"`` (StableDiffusion3Pipeline: an SD3Transformer2DModel, two CLIP encoders
            with projection and a 2-layer T5 encoder with an ASCII tokenizer), ``"flux"``
            (FluxPipeline: a FluxTransformer2DModel, a CLIP and a T5 encoder), ``"wan"``
            (WanPipeline, text to video: a WanTransformer3DModel, AutoencoderKLWan and a UMT5
            encoder), ``"stable-audio"`` (StableAudioPipeline: a StableAudioDiTModel, an
            AutoencoderOobleck and a T5 encoder; 2-second stereo clips of 8 samples; an
            EDMDPMSolverMultistepScheduler, as Stable Audio's own scheduler needs torchsde).
        seed: the same seed gives the same weights, whatever the caller's random state; the
            caller's global torch random state is left as it was.

    The pipeline is on the CPU in float32, in eval mode, with its progress bar disabled;
    SD-family pipelines have no safety checker. Every image kind's default output size is
    64x64 px (Flux's through the instance's ``default_sample_size``, which a saved and
    reloaded copy does not keep: pass ``height`` and ``width`` to one). Wan's call defaults
    are Wan's own (480x832 px, 81 frames): pass small ones, e.g. ``height=16, width=16,
    num_frames=5``.
    The return type is Any for type checkers (diffusers' lazy module hides its classes from
    them); at run time it is the diffusers pipeline class named above.

    Raises:
        ValueError: ``kind`` is not one of :data:`KINDS`.
    """
    _check_kind(kind)
    import torch

    # fork_rng restores the caller's CPU random state afterwards: building test fixtures
    # must not change what the caller's own torch.manual_seed-based code draws next.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = _BUILDERS[kind]()
    _finish(pipe)
    return pipe


def save_tiny_pipeline(path: str | os.PathLike[str], kind: str = "sd", *, seed: int = 0) -> Path:
    """Write :func:`tiny_pipeline` ``(kind, seed=seed)`` to ``path`` and return it as a Path.

    The directory is written with ``save_pretrained`` in safetensors format, so that
    ``DiffusionPipeline.from_pretrained(path)`` loads it offline.

    Raises:
        ValueError: ``kind`` is not one of :data:`KINDS` (nothing is written).
    """
    _check_kind(kind)
    target = Path(path)
    tiny_pipeline(kind, seed=seed).save_pretrained(target, safe_serialization=True)
    return target


def _finish(pipe: Any) -> None:
    """Put ``pipe`` in the state ``from_pretrained`` leaves a pipeline in, less the noise."""
    import torch

    # Freshly constructed modules are in training mode; loaded ones are in eval mode, and a
    # tiny pipeline must behave like a loaded one (dropout, and a loaded copy's output).
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)


def _diffusers() -> Any:
    """Return the diffusers module, typed as Any."""
    # Any on purpose: diffusers' lazy __init__ shows mypy its dummy placeholder classes (no
    # save_pretrained, untyped constructors) rather than the real ones.
    import diffusers

    return diffusers


def _transformers() -> Any:
    """Return the transformers module, typed as Any (its constructors are untyped too)."""
    import transformers

    return transformers


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        valid = ", ".join(repr(k) for k in KINDS)
        raise ValueError(f"unknown tiny pipeline kind {kind!r}: expected one of {valid}")


# ---------------------------------------------------------------------------------------
# Offline tokenizer


def _byte_vocab() -> dict[str, int]:
    """Return a CLIP vocabulary of every byte, as a word piece and as a word end."""
    # GPT-2/CLIP's byte-to-unicode table: printable bytes map to themselves, the others to
    # code points from 256 up, so that every byte has a visible, unique character.
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars: list[str] = []
    shifted = 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    pieces = [*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"]
    return {piece: index for index, piece in enumerate(pieces)}


def _tokenizer() -> Any:
    """Return a byte-level CLIP tokenizer built from files written to a temporary directory."""
    transformers = _transformers()

    # from_pretrained on a local folder of vocab.json + merges.txt is the one construction
    # that transformers 4 (slow, file-based) and 5 (tokenizers-backed) both accept.
    with tempfile.TemporaryDirectory(prefix="mps_helpers_tokenizer_") as folder:
        root = Path(folder)
        (root / "vocab.json").write_text(json.dumps(_byte_vocab()), encoding="utf-8")
        (root / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        return transformers.CLIPTokenizer.from_pretrained(
            root,
            model_max_length=_MAX_LENGTH,
            pad_token="<|endoftext|>",
            local_files_only=True,
        )


def _t5_tokenizer(max_length: int = 512) -> Any:
    """Return a T5 tokenizer of printable ASCII characters, built without a download.

    Other characters become ``<unk>``, as characters outside T5's SentencePiece model do.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    transformers = _transformers()

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(chr(code), -3.0) for code in range(ord("!"), ord("~") + 1)]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    # As for CLIP: a tokenizer.json in a folder is what both transformers 4 and 5 load.
    with tempfile.TemporaryDirectory(prefix="mps_helpers_tokenizer_") as folder:
        backend.save(str(Path(folder) / "tokenizer.json"))
        return transformers.T5TokenizerFast.from_pretrained(
            folder,
            extra_ids=0,
            model_max_length=max_length,
            eos_token="</s>",
            unk_token="<unk>",
            pad_token="<pad>",
            local_files_only=True,
        )


def _text_config(tokenizer: Any, **sizes: Any) -> Any:
    """Return a CLIPTextConfig whose vocabulary and special ids are ``tokenizer``'s."""
    transformers = _transformers()

    options: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 37,
        "layer_norm_eps": 1e-05,
        "num_attention_heads": 4,
        "num_hidden_layers": 5,
        "hidden_act": "gelu",
        "projection_dim": 32,
        "max_position_embeddings": _MAX_LENGTH,
    }
    options.update(sizes)
    return transformers.CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **options,
    )


# ---------------------------------------------------------------------------------------
# Builders: configs mirror diffusers' own get_dummy_components, enlarged where needed so that
# every kind defaults to 64 px.


def _sd_unet(in_channels: int = 4, **extra: Any) -> Any:
    diffusers = _diffusers()

    return diffusers.UNet2DConditionModel(
        **extra,
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    )


def _sd_vae() -> Any:
    diffusers = _diffusers()

    # Two blocks: vae_scale_factor 2, so the 32-latent UNet gives 64 px images.
    return diffusers.AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=64,
    )


def _sd_components(*, in_channels: int = 4) -> dict[str, Any]:
    diffusers = _diffusers()
    transformers = _transformers()

    unet = _sd_unet(in_channels)
    vae = _sd_vae()
    tokenizer = _tokenizer()
    text_encoder = transformers.CLIPTextModel(_text_config(tokenizer))
    scheduler = diffusers.DDIMScheduler(**_SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False)
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


def _build_sd() -> Any:
    diffusers = _diffusers()

    return diffusers.StableDiffusionPipeline(**_sd_components())


def _build_sd_img2img() -> Any:
    diffusers = _diffusers()

    return diffusers.StableDiffusionImg2ImgPipeline(**_sd_components())


def _build_sd_inpaint() -> Any:
    diffusers = _diffusers()

    # Inpainting UNets take noisy latents (4) + mask (1) + masked-image latents (4).
    return diffusers.StableDiffusionInpaintPipeline(**_sd_components(in_channels=9))


def _build_sdxl() -> Any:
    diffusers = _diffusers()
    transformers = _transformers()

    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        # six micro-conditioning ids x 8 + the second encoder's 32-wide pooled embedding
        projection_class_embeddings_input_dim=6 * 8 + 32,
        # the two encoders' hidden states are concatenated: 32 + 32
        cross_attention_dim=64,
    )
    vae = _sd_vae()
    tokenizer = _tokenizer()
    tokenizer_2 = _tokenizer()
    text_encoder = transformers.CLIPTextModel(_text_config(tokenizer))
    text_encoder_2 = transformers.CLIPTextModelWithProjection(_text_config(tokenizer_2))
    scheduler = diffusers.EulerDiscreteScheduler(**_SD_SCHEDULE, timestep_spacing="leading")
    return diffusers.StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        scheduler=scheduler,
    )


def _flow_vae(*, channels: tuple[int, int], latent_channels: int) -> Any:
    """Return the 2-block VAE of SD3 and Flux (no quant convs, their shift and scale)."""
    diffusers = _diffusers()

    return diffusers.AutoencoderKL(
        sample_size=64,
        in_channels=3,
        out_channels=3,
        block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def _build_sd3() -> Any:
    diffusers = _diffusers()
    transformers = _transformers()

    transformer = diffusers.SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        # the T5 encoder's width; the two CLIP encoders' hidden states side by side (32 + 32)
        # are zero-padded to it, as SD3's 768 + 1280 are to T5-XXL's 4096
        joint_attention_dim=64,
        # the two encoders' pooled projections side by side (32 + 32)
        pooled_projection_dim=64,
        out_channels=4,
    )
    vae = _flow_vae(channels=(8, 16), latent_channels=4)
    tokenizer = _tokenizer()
    tokenizer_2 = _tokenizer()
    text_encoder = transformers.CLIPTextModelWithProjection(_text_config(tokenizer))
    text_encoder_2 = transformers.CLIPTextModelWithProjection(_text_config(tokenizer_2))
    tokenizer_3 = _t5_tokenizer()
    # T5 v1.1 layout (gated GELU, no tied embeddings) as in SD3's T5-XXL, cut to 2 layers.
    text_encoder_3 = transformers.T5EncoderModel(
        transformers.T5Config(
            vocab_size=len(tokenizer_3),
            d_model=64,
            d_kv=16,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            pad_token_id=tokenizer_3.pad_token_id,
            eos_token_id=tokenizer_3.eos_token_id,
            decoder_start_token_id=tokenizer_3.pad_token_id,
        )
    )
    return diffusers.StableDiffusion3Pipeline(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
    )


def _t5_encoder(tokenizer: Any, *, width: int = 32, umt5: bool = False) -> Any:
    """Return a 2-layer T5 (or UMT5) encoder whose vocabulary is ``tokenizer``'s."""
    transformers = _transformers()

    config_class = transformers.UMT5Config if umt5 else transformers.T5Config
    model_class = transformers.UMT5EncoderModel if umt5 else transformers.T5EncoderModel
    return model_class(
        config_class(
            vocab_size=len(tokenizer),
            d_model=width,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )


def _build_flux() -> Any:
    diffusers = _diffusers()
    transformers = _transformers()

    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1,
        # 2x2 patches of the VAE's 1-channel latents
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # the T5 encoder's width
        pooled_projection_dim=32,  # the CLIP encoder's
        axes_dims_rope=(4, 4, 8),
    )
    vae = _flow_vae(channels=(4, 8), latent_channels=1)
    tokenizer = _tokenizer()
    tokenizer_2 = _t5_tokenizer()
    pipe = diffusers.FluxPipeline(
        transformer=transformer,
        vae=vae,
        text_encoder=transformers.CLIPTextModel(_text_config(tokenizer)),
        tokenizer=tokenizer,
        text_encoder_2=_t5_encoder(tokenizer_2),
        tokenizer_2=tokenizer_2,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
    )
    # Flux's default is 128 latents (1024 px with its VAE); 32 latents here make 64 px.
    pipe.default_sample_size = 32
    return pipe


def _build_wan() -> Any:
    diffusers = _diffusers()

    vae = diffusers.AutoencoderKLWan(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    tokenizer = _t5_tokenizer()
    return diffusers.WanPipeline(
        transformer=transformer,
        vae=vae,
        text_encoder=_t5_encoder(tokenizer, umt5=True),
        tokenizer=tokenizer,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0),
    )


def _build_stable_audio() -> Any:
    diffusers = _diffusers()

    transformer = diffusers.StableAudioDiTModel(
        sample_size=4,
        in_channels=3,
        num_layers=2,
        attention_head_dim=4,
        num_key_value_attention_heads=2,
        out_channels=3,
        cross_attention_dim=4,
        time_proj_dim=8,
        global_states_input_dim=8,  # start and end seconds, 4 each
        cross_attention_input_dim=4,
    )
    with warnings.catch_warnings():
        # diffusers builds this VAE with torch's deprecated weight_norm: not the caller's
        # concern when they only asked for a test pipeline.
        warnings.filterwarnings("ignore", "`torch.nn.utils.weight_norm`", FutureWarning)
        vae = diffusers.AutoencoderOobleck(
            encoder_hidden_size=6,
            downsampling_ratios=[1, 2],
            decoder_channels=3,
            decoder_input_channels=3,
            audio_channels=2,
            channel_multiples=[2, 4],
            sampling_rate=4,
        )
    tokenizer = _t5_tokenizer(max_length=32)
    text_encoder = _t5_encoder(tokenizer)
    projection = diffusers.StableAudioProjectionModel(
        text_encoder_dim=text_encoder.config.d_model,
        conditioning_dim=4,
        min_value=0,
        max_value=32,
    )
    # Stable Audio's own CosineDPMSolverMultistepScheduler draws its noise through torchsde,
    # which diffusers does not install; the same DPM-Solver++ 2M on EDM sigmas needs nothing.
    scheduler = diffusers.EDMDPMSolverMultistepScheduler(
        solver_order=2,
        prediction_type="v_prediction",
        sigma_data=1.0,
        sigma_schedule="exponential",
    )
    return diffusers.StableAudioPipeline(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        projection_model=projection,
        scheduler=scheduler,
    )


_BUILDERS = {
    "sd": _build_sd,
    "sd-img2img": _build_sd_img2img,
    "sd-inpaint": _build_sd_inpaint,
    "sdxl": _build_sdxl,
    "sd3": _build_sd3,
    "flux": _build_flux,
    "wan": _build_wan,
    "stable-audio": _build_stable_audio,
}


# ---------------------------------------------------------------------------------------
# Full-size SD 1.5 architecture, for benchmarks (private: slow to build, 4 GB of float32).


def _sd15_configs() -> dict[str, dict[str, Any]]:
    """Return fresh keyword-argument dicts for SD 1.5's unet, vae, text encoder and scheduler.

    Keys: ``"unet"`` (UNet2DConditionModel), ``"vae"`` (AutoencoderKL), ``"text_encoder"``
    (CLIPTextConfig of CLIP ViT-L/14's text tower), ``"scheduler"`` (DDIMScheduler).
    Parameter counts (checked on the meta device in the tests): UNet 859,520,964, VAE
    83,653,863, text encoder 123,060,480. Each call returns new dicts, free to change.
    """
    return {
        "unet": {
            "sample_size": 64,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": (
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ),
            "up_block_types": (
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ),
            "block_out_channels": (320, 640, 1280, 1280),
            "layers_per_block": 2,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
            "norm_num_groups": 32,
        },
        "vae": {
            "sample_size": 512,
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "block_out_channels": (128, 256, 512, 512),
            "layers_per_block": 2,
            "latent_channels": 4,
            "norm_num_groups": 32,
        },
        "text_encoder": {
            "vocab_size": 49408,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "max_position_embeddings": _MAX_LENGTH,
            "hidden_act": "quick_gelu",
            "projection_dim": 768,
        },
        "scheduler": {**_SD_SCHEDULE, "clip_sample": False, "set_alpha_to_one": False},
    }


def sd15_pipeline(*, seed: int = 0, vocab_size: int | None = None) -> Any:
    """Return a StableDiffusionPipeline of SD 1.5's architecture with random weights.

    For measuring time and memory at full size with no download (the benchmarks use it);
    :func:`tiny_pipeline` is the one for tests. The UNet (859.5M parameters), VAE (83.7M) and
    CLIP ViT-L/14 text encoder have SD 1.5's shapes. The tokenizer is this module's byte-level
    one (514 tokens, one per byte, so a prompt uses more of the 77 positions than with CLIP's
    real BPE), and by default the text encoder's vocabulary is cut to match it: 85.5M parameters
    instead of 123.1M. Pass ``vocab_size=49408`` for the real embedding table and parameter
    count; token ids stay below 514 either way. DDIM scheduler, no safety checker, float32 on
    the CPU, eval mode: about 4.3 GB of memory and some seconds to initialise (18 s on a loaded
    2-core machine). Same seed, same weights; the caller's random state is kept.

    Example::

        from mps_helpers.testing import sd15_pipeline

        pipe = sd15_pipeline(seed=0).to("mps", torch.float16)

    Raises:
        ValueError: ``vocab_size`` is smaller than the tokenizer's vocabulary (checked
            before anything is built).
    """
    import torch

    diffusers = _diffusers()
    transformers = _transformers()

    configs = _sd15_configs()
    tokenizer = _tokenizer()
    text_options = configs["text_encoder"]
    text_options["vocab_size"] = len(tokenizer) if vocab_size is None else vocab_size
    if text_options["vocab_size"] < len(tokenizer):
        raise ValueError(
            f"vocab_size={vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = diffusers.UNet2DConditionModel(**configs["unet"])
        vae = diffusers.AutoencoderKL(**configs["vae"])
        text_encoder = transformers.CLIPTextModel(_text_config(tokenizer, **text_options))
    pipe = diffusers.StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=diffusers.DDIMScheduler(**configs["scheduler"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    _finish(pipe)
    return pipe
