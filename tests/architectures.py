"""Real-size architecture configs of public models, as their ``config.json`` files give them.

Only the configs: no weights. The memory estimate's tests and the validation benchmark build
models from these on the meta device (shapes only) or on a GPU with random weights. Parameter
counts, checked on the meta device by the tests, are in each entry's ``params``.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator

SD_SCHEDULE: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
}

SD_VAE: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

SDXL_VAE: dict[str, Any] = {
    **SD_VAE,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}

# SD3 and Flux: 16 latent channels, no quant convs.
FLOW_VAE: dict[str, Any] = {
    **SD_VAE,
    "latent_channels": 16,
    "sample_size": 1024,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "force_upcast": True,
}
SD3_VAE: dict[str, Any] = {**FLOW_VAE, "scaling_factor": 1.5305, "shift_factor": 0.0609}
FLUX_VAE: dict[str, Any] = {**FLOW_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159}

CLIP_L: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
CLIP_G: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
T5_XXL: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "feed_forward_proj": "gated-gelu",
    "is_encoder_decoder": True,
}
UMT5_XXL: dict[str, Any] = {**T5_XXL, "vocab_size": 256384}

SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "use_linear_projection": True,
    "norm_num_groups": 32,
}
SD3_MEDIUM: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
}
FLUX_DEV: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}
PIXART_SIGMA: dict[str, Any] = {
    "sample_size": 128,
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 28,
    "cross_attention_dim": 1152,
    "patch_size": 2,
    "norm_type": "ada_norm_single",
    "caption_channels": 4096,
    "use_additional_conditions": False,
    "interpolation_scale": 2,
}
WAN_1_3B: dict[str, Any] = {
    "patch_size": [1, 2, 2],
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
}
WAN_VAE: dict[str, Any] = {
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
}


# ---------------------------------------------------------------------------------------
# Pipelines of these architectures with random weights, built on a device ("meta": shapes only)


def _half(name: str) -> Any:
    import torch

    return torch.bfloat16 if name == "flux" else torch.float16


@contextlib.contextmanager
def _on(device: str) -> Iterator[None]:
    import torch

    with torch.device(device):
        yield


def _clip(config: dict[str, Any], tokenizer: Any, *, projection: bool) -> Any:
    import transformers

    from mps_helpers.testing import _text_config

    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(_text_config(tokenizer, **config))


def _t5(config: dict[str, Any], tokenizer: Any, *, umt5: bool = False) -> Any:
    import transformers

    options = {k: v for k, v in config.items() if k != "is_encoder_decoder"}
    if umt5:
        return transformers.UMT5EncoderModel(
            transformers.UMT5Config(
                **options,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                decoder_start_token_id=tokenizer.pad_token_id,
            )
        )
    return transformers.T5EncoderModel(
        transformers.T5Config(
            **options,
            tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )


def _vae(config: dict[str, Any]) -> Any:
    import diffusers

    return diffusers.AutoencoderKL(**{k: v for k, v in config.items() if k != "_class_name"})


def build(name: str, device: str) -> Any:
    """Return the pipeline ``name`` with random weights, built on ``device`` in its dtype."""
    import diffusers
    import torch

    from mps_helpers.testing import _t5_tokenizer, _tokenizer

    dtype = _half(name)
    clip, clip2, t5 = _tokenizer(), _tokenizer(), _t5_tokenizer()
    # Schedulers and tokenizers stay on the CPU; the models are made on the device.
    with _on(device), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if name == "sd15":
            models = {
                "unet": diffusers.UNet2DConditionModel(**SD15_UNET),
                "vae": _vae(SD_VAE),
                "text_encoder": _clip(CLIP_L, clip, projection=False),
            }
        elif name == "sdxl":
            models = {
                "unet": diffusers.UNet2DConditionModel(**SDXL_UNET),
                "vae": _vae(SDXL_VAE),
                "text_encoder": _clip(CLIP_L, clip, projection=False),
                "text_encoder_2": _clip(CLIP_G, clip2, projection=True),
            }
        elif name == "sd3":
            models = {
                "transformer": diffusers.SD3Transformer2DModel(**SD3_MEDIUM),
                "vae": _vae(SD3_VAE),
                "text_encoder": _clip(CLIP_L, clip, projection=True),
                "text_encoder_2": _clip(CLIP_G, clip2, projection=True),
                "text_encoder_3": _t5(T5_XXL, t5),
            }
        elif name == "flux":
            models = {
                "transformer": diffusers.FluxTransformer2DModel(**FLUX_DEV),
                "vae": _vae(FLUX_VAE),
                "text_encoder": _clip(CLIP_L, clip, projection=False),
                "text_encoder_2": _t5(T5_XXL, t5),
            }
        elif name == "pixart":
            models = {
                "transformer": diffusers.PixArtTransformer2DModel(**PIXART_SIGMA),
                "vae": _vae(SDXL_VAE),
                "text_encoder": _t5(T5_XXL, t5),
            }
        elif name == "wan":
            models = {
                "transformer": diffusers.WanTransformer3DModel(**WAN_1_3B),
                "vae": diffusers.AutoencoderKLWan(**WAN_VAE),
                "text_encoder": _t5(UMT5_XXL, t5, umt5=True),
            }
        else:
            raise ValueError(f"unknown model {name!r}")
    for module in models.values():
        module.to(dtype=dtype).eval().requires_grad_(False)
    if name == "sd15":
        pipe = diffusers.StableDiffusionPipeline(
            **models,
            tokenizer=clip,
            scheduler=diffusers.DDIMScheduler(**SD_SCHEDULE, clip_sample=False),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    elif name == "sdxl":
        pipe = diffusers.StableDiffusionXLPipeline(
            **models,
            tokenizer=clip,
            tokenizer_2=clip2,
            scheduler=diffusers.EulerDiscreteScheduler(**SD_SCHEDULE),
        )
    elif name == "sd3":
        pipe = diffusers.StableDiffusion3Pipeline(
            **models,
            tokenizer=clip,
            tokenizer_2=clip2,
            tokenizer_3=t5,
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        )
    elif name == "flux":
        pipe = diffusers.FluxPipeline(
            **models,
            tokenizer=clip,
            tokenizer_2=t5,
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        )
    elif name == "pixart":
        pipe = diffusers.PixArtSigmaPipeline(
            **models, tokenizer=t5, scheduler=diffusers.DPMSolverMultistepScheduler()
        )
    else:
        pipe = diffusers.WanPipeline(
            **models, tokenizer=t5, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe
