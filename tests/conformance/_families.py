"""The pipeline families of the conformance suite: a tiny offline builder and the inputs of
each, learnt from the dummy components of diffusers' own per-family tests (nothing copied).

A :class:`Family` says how to build a fresh pipeline (random weights, seeded, on the CPU in
float32), what one prompt's call looks like (``inputs(i)`` is prompt ``i``'s), how prompts
combine into a batch, and which optional contracts apply (precomputed embeddings, a
pipeline-refused call). Component sizes are the smallest that run: every call here takes tens
of milliseconds on one CPU thread.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mps_helpers import testing

if TYPE_CHECKING:
    from collections.abc import Callable

PROMPTS = ("a red fox in the snow", "a blue whale", "a green cone")


def _both_prompt_and_embeds(pipe: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """Arguments that give a prompt and its embeddings at once: diffusers refuses both."""
    return {"prompt_embeds": torch.zeros(1, 4, 32)}


@dataclasses.dataclass(frozen=True)
class Family:
    """One pipeline family of the suite.

    Attributes:
        name: the suite's name for it.
        pipeline_class: the diffusers class ``build`` returns.
        build: returns a fresh tiny pipeline (the same weights on every call).
        inputs: returns prompt ``i``'s call arguments (no generator, no output_type).
        batched: the arguments that carry one entry per prompt in a batch.
        output_types: the ``output_type`` values the family returns (the first: default).
        embed: returns the precomputed-embedding arguments that replace the prompts of a
            batch's arguments (None: the family takes no embeddings).
        refused: arguments added to a call that the pipeline refuses with ValueError
            (default: a prompt's embeddings besides the prompt; None: no such call).
        atol: the tolerance of "the same result" (batch against single calls).
        output_is_latents: ``output_type="latent"`` returns the denoising loop's latents (not
            so for LCM, which returns its denoised estimate).
        exempt: contracts the raw pipeline itself does not keep, each with the reason (the
            suite reports them; diffusers' own tests for the family skip them too).
        combine: joins the per-prompt values of one batched argument (default: a list, or
            tensors concatenated).
    """

    name: str
    pipeline_class: str
    build: Callable[[], Any]
    inputs: Callable[[int], dict[str, Any]]
    batched: tuple[str, ...] = ("prompt",)
    output_types: tuple[str, ...] = ("np", "pt", "pil", "latent")
    embed: Callable[[Any, dict[str, Any]], dict[str, Any]] | None = None
    refused: Callable[[Any, dict[str, Any]], dict[str, Any]] | None = _both_prompt_and_embeds
    atol: float = 1e-4
    output_is_latents: bool = True
    exempt: dict[str, str] = dataclasses.field(default_factory=dict)
    combine: Callable[[str, list[Any]], Any] | None = None

    def cls(self) -> type:
        """Return the diffusers pipeline class of the family."""
        return getattr(_diffusers(), self.pipeline_class)  # type: ignore[no-any-return]

    def batch(self, indices: range | list[int]) -> dict[str, Any]:
        """Return the call arguments of a batch of the prompts at ``indices``."""
        each = [self.inputs(i) for i in indices]
        batched = dict(each[0])
        for name in self.batched:
            if name in batched:
                values = [item[name] for item in each]
                joined = self.combine(name, values) if self.combine else None
                batched[name] = joined if joined is not None else _join(values)
        return batched


def _join(values: list[Any]) -> Any:
    if isinstance(values[0], torch.Tensor):
        return torch.cat(values)
    return values


# ---------------------------------------------------------------------------------------
# Shared pieces


def _seeded(build: Callable[[], Any]) -> Callable[[], Any]:
    """Return ``build`` run under a fixed seed, with the caller's random state kept, and the
    result in eval mode with its progress bars off (as ``tiny_pipeline`` leaves its own)."""

    @functools.wraps(build)
    def seeded() -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            pipe = build()
        testing._finish(pipe)
        return pipe

    return seeded


def _image(i: int, size: int = 32) -> Any:
    from PIL import Image

    rng = np.random.default_rng(i)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _mask(size: int = 32) -> Any:
    from PIL import Image

    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    return Image.fromarray(mask)


def _text(i: int, **extra: Any) -> dict[str, Any]:
    return {"prompt": PROMPTS[i], "num_inference_steps": 2, **extra}


def _small(i: int) -> dict[str, Any]:
    return _text(i, height=32, width=32)


def _small_t5(i: int) -> dict[str, Any]:
    return _text(i, height=32, width=32, max_sequence_length=16)


def _diffusers() -> Any:
    import diffusers

    return diffusers


def _transformers() -> Any:
    import transformers

    return transformers


def _sd_embed(pipe: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    positive, negative = pipe.encode_prompt(
        inputs.pop("prompt"), "cpu", num_images_per_prompt=1, do_classifier_free_guidance=True
    )
    return {"prompt_embeds": positive, "negative_prompt_embeds": negative}


def _sdxl_embed(pipe: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    names = (
        "prompt_embeds",
        "negative_prompt_embeds",
        "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds",
    )
    encoded = pipe.encode_prompt(
        inputs.pop("prompt"),
        device="cpu",
        num_images_per_prompt=1,
        do_classifier_free_guidance=True,
    )
    return dict(zip(names, encoded, strict=True))


# ---------------------------------------------------------------------------------------
# Stable Diffusion 1.x and its variants


def _sd_img2img_inputs(i: int) -> dict[str, Any]:
    # 3 steps at strength 0.7 run int(3 * 0.7) = 2 of them
    return _text(i, image=_image(i), strength=0.7, num_inference_steps=3)


def _sd_inpaint_inputs(i: int) -> dict[str, Any]:
    return _text(i, image=_image(i), mask_image=_mask(), height=32, width=32)


def _controlnet(diffusers: Any) -> Any:
    return diffusers.ControlNetModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        in_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        cross_attention_dim=32,
        # one downsampling: the control image (32 px) to the latents (16)
        conditioning_embedding_out_channels=(16, 32),
    )


def _build_controlnet(nets: int) -> Any:
    diffusers = _diffusers()
    components = testing._sd_components()
    components.pop("requires_safety_checker")
    controlnets = [_controlnet(diffusers) for _ in range(nets)]
    controlnet = controlnets[0] if nets == 1 else diffusers.MultiControlNetModel(controlnets)
    return diffusers.StableDiffusionControlNetPipeline(
        **components, controlnet=controlnet, requires_safety_checker=False
    )


def _multi_control_combine(name: str, values: list[Any]) -> Any:
    # a nested list, one list of the ControlNets' images per prompt, as diffusers reads it
    return values if name == "image" else None


def _build_lcm() -> Any:
    diffusers = _diffusers()
    components = testing._sd_components()
    components["unet"] = testing._sd_unet(time_cond_proj_dim=32)  # embeds the guidance
    components["scheduler"] = diffusers.LCMScheduler.from_config(components["scheduler"].config)
    components.pop("requires_safety_checker")
    return diffusers.LatentConsistencyModelPipeline(**components, requires_safety_checker=False)


def _lcm_embed(pipe: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    positive, _ = pipe.encode_prompt(
        inputs.pop("prompt"), "cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    return {"prompt_embeds": positive}


def _build_animatediff() -> Any:
    diffusers = _diffusers()
    components = testing._sd_components()
    channels = (8, 8)
    components["unet"] = diffusers.UNet2DConditionModel(
        block_out_channels=channels,
        layers_per_block=2,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=2,
    )
    adapter = diffusers.MotionAdapter(
        block_out_channels=channels,
        motion_layers_per_block=2,
        motion_norm_num_groups=2,
        motion_num_attention_heads=4,
    )
    for name in ("safety_checker", "requires_safety_checker"):
        components.pop(name)
    return diffusers.AnimateDiffPipeline(**components, motion_adapter=adapter, image_encoder=None)


# ---------------------------------------------------------------------------------------
# SDXL img2img, PixArt


def _build_sdxl_img2img() -> Any:
    diffusers = _diffusers()
    return diffusers.StableDiffusionXLImg2ImgPipeline(**testing._build_sdxl().components)


def _build_pixart() -> Any:
    diffusers = _diffusers()
    transformer = diffusers.PixArtTransformer2DModel(
        sample_size=16,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=32,
        in_channels=4,
        cross_attention_dim=24,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    tokenizer = testing._t5_tokenizer()
    return diffusers.PixArtAlphaPipeline(
        transformer=transformer,
        vae=testing._sd_vae(),
        text_encoder=testing._t5_encoder(tokenizer),
        tokenizer=tokenizer,
        scheduler=diffusers.DDIMScheduler(),
    )


_PIXART = {"use_resolution_binning": False, "max_sequence_length": 16, "clean_caption": False}


def _pixart_embed(pipe: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    names = (
        "prompt_embeds",
        "prompt_attention_mask",
        "negative_prompt_embeds",
        "negative_prompt_attention_mask",
    )
    encoded = pipe.encode_prompt(
        inputs.pop("prompt"),
        do_classifier_free_guidance=True,
        device="cpu",
        clean_caption=False,
        max_sequence_length=16,
    )
    # PixArt's negative_prompt defaults to "", which may not come with negative embeddings
    return {**dict(zip(names, encoded, strict=True)), "negative_prompt": None}


# ---------------------------------------------------------------------------------------
# SD3, Flux, Wan, Stable Audio (the builders are mps_helpers.testing's)


def _sd3_embed(pipe: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    names = (
        "prompt_embeds",
        "negative_prompt_embeds",
        "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds",
    )
    encoded = pipe.encode_prompt(
        inputs.pop("prompt"), None, None, device="cpu", max_sequence_length=16
    )
    return dict(zip(names, encoded, strict=True))


def _flux_embed(pipe: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    prompt_embeds, pooled, _ = pipe.encode_prompt(
        inputs.pop("prompt"), None, device="cpu", max_sequence_length=16
    )
    return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}


def _wan_embed(pipe: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    positive, negative = pipe.encode_prompt(
        inputs.pop("prompt"),
        inputs.pop("negative_prompt", None),
        do_classifier_free_guidance=True,
        max_sequence_length=16,
        device="cpu",
    )
    return {"prompt_embeds": positive, "negative_prompt_embeds": negative}


def _stable_audio_embed(pipe: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    tokens = pipe.tokenizer(
        inputs.pop("prompt"),
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        embeds = pipe.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
    return {"prompt_embeds": embeds, "attention_mask": tokens.attention_mask}


# ---------------------------------------------------------------------------------------
# Kandinsky 2.2: prior, decoder, combined


def _kandinsky_prior_components() -> dict[str, Any]:
    diffusers = _diffusers()
    transformers = _transformers()
    prior = diffusers.PriorTransformer(
        num_attention_heads=2, attention_head_dim=12, embedding_dim=32, num_layers=1
    )
    # a zero clip_std would make every embedding 0 (post_process_latents)
    prior.clip_std = torch.nn.Parameter(torch.ones(prior.clip_std.shape))
    tokenizer = testing._tokenizer()
    text_encoder = transformers.CLIPTextModelWithProjection(
        testing._text_config(tokenizer, num_hidden_layers=2)
    )
    image_encoder = transformers.CLIPVisionModelWithProjection(
        transformers.CLIPVisionConfig(
            hidden_size=32,
            image_size=32,
            projection_dim=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_channels=3,
            num_hidden_layers=2,
            patch_size=8,
        )
    )
    image_processor = transformers.CLIPImageProcessor(
        crop_size=32,
        do_center_crop=True,
        do_normalize=True,
        do_resize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        resample=3,
        size=32,
    )
    scheduler = diffusers.UnCLIPScheduler(
        variance_type="fixed_small_log",
        prediction_type="sample",
        num_train_timesteps=1000,
        clip_sample=True,
        clip_sample_range=10.0,
    )
    return {
        "prior": prior,
        "image_encoder": image_encoder,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
        "image_processor": image_processor,
    }


def _kandinsky_decoder_components() -> dict[str, Any]:
    diffusers = _diffusers()
    unet = diffusers.UNet2DConditionModel(
        in_channels=4,
        out_channels=8,  # mean and variance
        addition_embed_type="image",
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=(32, 64),
        layers_per_block=1,
        encoder_hid_dim=32,
        encoder_hid_dim_type="image_proj",
        cross_attention_dim=32,
        attention_head_dim=4,
        resnet_time_scale_shift="scale_shift",
        class_embed_type=None,
    )
    movq = diffusers.VQModel(
        block_out_channels=[32, 64],
        down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
        in_channels=3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        norm_type="spatial",
        num_vq_embeddings=12,
        out_channels=3,
        up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"],
        vq_embed_dim=4,
    )
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
        thresholding=False,
    )
    return {"unet": unet, "scheduler": scheduler, "movq": movq}


def _build_kandinsky_prior() -> Any:
    return _diffusers().KandinskyV22PriorPipeline(**_kandinsky_prior_components())


def _build_kandinsky_decoder() -> Any:
    return _diffusers().KandinskyV22Pipeline(**_kandinsky_decoder_components())


def _build_kandinsky_combined() -> Any:
    prior = {f"prior_{name}": value for name, value in _kandinsky_prior_components().items()}
    return _diffusers().KandinskyV22CombinedPipeline(**_kandinsky_decoder_components(), **prior)


def _image_embeds(i: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(100 + i)
    return {
        "image_embeds": torch.randn(1, 32, generator=generator),
        "negative_image_embeds": torch.randn(1, 32, generator=generator),
        "height": 32,
        "width": 32,
        "num_inference_steps": 2,
    }


def _not_a_prompt(pipe: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    return {"prompt": 5}


# ---------------------------------------------------------------------------------------
# Wuerstchen prior


def _build_wuerstchen_prior() -> Any:
    diffusers = _diffusers()
    transformers = _transformers()
    tokenizer = testing._tokenizer()
    prior = diffusers.pipelines.deprecated.wuerstchen.WuerstchenPrior(
        c_in=2, c=32, c_cond=32, c_r=8, depth=2, nhead=2, dropout=0.0
    )
    return diffusers.WuerstchenPriorPipeline(
        prior=prior,
        text_encoder=transformers.CLIPTextModel(
            testing._text_config(tokenizer, num_hidden_layers=2)
        ),
        tokenizer=tokenizer,
        scheduler=diffusers.DDPMWuerstchenScheduler(),
    )


def _wuerstchen_embed(pipe: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    positive, negative = pipe.encode_prompt(
        "cpu", 1, do_classifier_free_guidance=True, prompt=inputs.pop("prompt")
    )
    return {"prompt_embeds": positive, "negative_prompt_embeds": negative}


# ---------------------------------------------------------------------------------------
# AudioLDM 2


def _roberta_tokenizer() -> Any:
    """Return a byte-level RoBERTa tokenizer (one token per byte) built without a download."""
    import tempfile
    from pathlib import Path

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    transformers = _transformers()
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: index for index, token in enumerate([*specials, *sorted(alphabet), "<mask>"])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    with tempfile.TemporaryDirectory(prefix="conformance_tokenizer_") as folder:
        backend.save(str(Path(folder) / "tokenizer.json"))
        return transformers.RobertaTokenizerFast.from_pretrained(
            folder,
            model_max_length=77,
            bos_token="<s>",
            eos_token="</s>",
            sep_token="</s>",
            cls_token="<s>",
            unk_token="<unk>",
            pad_token="<pad>",
            mask_token="<mask>",
            local_files_only=True,
        )


def _build_audioldm2() -> Any:
    diffusers = _diffusers()
    transformers = _transformers()
    unet = diffusers.AudioLDM2UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=(8, 16),
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=[8, 16],
        in_channels=1,
        out_channels=1,
        norm_num_groups=8,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
    )
    tokenizer = _roberta_tokenizer()
    text_branch = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "hidden_size": 8,
        "intermediate_size": 37,
        "layer_norm_eps": 1e-05,
        "num_attention_heads": 1,
        "num_hidden_layers": 1,
        "vocab_size": len(tokenizer),
        "projection_dim": 8,
    }
    audio_branch = {
        "spec_size": 8,
        "window_size": 4,
        "num_mel_bins": 8,
        "intermediate_size": 37,
        "layer_norm_eps": 1e-05,
        "depths": [1, 1],
        "num_attention_heads": [1, 1],
        "num_hidden_layers": 1,
        "hidden_size": 192,
        "projection_dim": 8,
        "patch_size": 2,
        "patch_stride": 2,
        "patch_embed_input_channels": 4,
    }
    text_encoder = transformers.ClapModel(
        transformers.ClapConfig(
            text_config=text_branch, audio_config=audio_branch, projection_dim=16
        )
    )
    feature_extractor = transformers.ClapFeatureExtractor(
        feature_size=8, sampling_rate=16000, hop_length=7900, fft_window_size=64
    )
    tokenizer_2 = testing._t5_tokenizer(max_length=77)
    text_encoder_2 = testing._t5_encoder(tokenizer_2)
    language_model = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            n_embd=16, n_head=1, n_layer=1, vocab_size=1000, n_ctx=99, n_positions=99
        )
    )
    language_model.config.max_new_tokens = 8
    projection_model = diffusers.AudioLDM2ProjectionModel(
        text_encoder_dim=16, text_encoder_1_dim=32, langauge_model_dim=16
    )
    vocoder = transformers.SpeechT5HifiGan(
        transformers.SpeechT5HifiGanConfig(
            model_in_dim=8,
            sampling_rate=16000,
            upsample_initial_channel=16,
            upsample_rates=[2, 2],
            upsample_kernel_sizes=[4, 4],
            resblock_kernel_sizes=[3, 7],
            resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5]],
            normalize_before=False,
        )
    )
    scheduler = diffusers.DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
    )
    return diffusers.AudioLDM2Pipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        projection_model=projection_model,
        language_model=language_model,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        feature_extractor=feature_extractor,
        unet=unet,
        scheduler=scheduler,
        vocoder=vocoder,
    )


def _audioldm2_embed(pipe: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    prompt_embeds, attention_mask, generated = pipe.encode_prompt(
        inputs.pop("prompt"), "cpu", num_waveforms_per_prompt=1, do_classifier_free_guidance=False
    )
    return {
        "prompt_embeds": prompt_embeds,
        "attention_mask": attention_mask,
        "generated_prompt_embeds": generated,
    }


# ---------------------------------------------------------------------------------------
# The families


def _tiny(kind: str) -> Callable[[], Any]:
    return functools.partial(testing.tiny_pipeline, kind)


FAMILIES: tuple[Family, ...] = (
    Family(
        "sd",
        "StableDiffusionPipeline",
        _tiny("sd"),
        _small,
        embed=_sd_embed,
    ),
    Family(
        "sd-img2img",
        "StableDiffusionImg2ImgPipeline",
        _tiny("sd-img2img"),
        _sd_img2img_inputs,
        batched=("prompt", "image"),
        embed=_sd_embed,
    ),
    Family(
        "sd-inpaint",
        "StableDiffusionInpaintPipeline",
        _tiny("sd-inpaint"),
        _sd_inpaint_inputs,
        batched=("prompt", "image", "mask_image"),
        embed=_sd_embed,
    ),
    Family(
        "sdxl",
        "StableDiffusionXLPipeline",
        _tiny("sdxl"),
        _small,
        embed=_sdxl_embed,
    ),
    Family(
        "sdxl-img2img",
        "StableDiffusionXLImg2ImgPipeline",
        _seeded(_build_sdxl_img2img),
        _sd_img2img_inputs,
        batched=("prompt", "image"),
        embed=_sdxl_embed,
    ),
    Family(
        "controlnet",
        "StableDiffusionControlNetPipeline",
        _seeded(functools.partial(_build_controlnet, 1)),
        lambda i: _text(i, image=_image(i), height=32, width=32),
        batched=("prompt", "image"),
        embed=_sd_embed,
    ),
    Family(
        "multi-controlnet",
        "StableDiffusionControlNetPipeline",
        _seeded(functools.partial(_build_controlnet, 2)),
        lambda i: _text(i, image=[_image(i), _image(10 + i)], height=32, width=32),
        batched=("prompt", "image"),
        embed=_sd_embed,
        combine=_multi_control_combine,
    ),
    Family(
        "sd3",
        "StableDiffusion3Pipeline",
        _tiny("sd3"),
        _small_t5,
        embed=_sd3_embed,
    ),
    Family(
        "flux",
        "FluxPipeline",
        _tiny("flux"),
        _small_t5,
        embed=_flux_embed,
    ),
    Family(
        "pixart",
        "PixArtAlphaPipeline",
        _seeded(_build_pixart),
        lambda i: _text(i, height=32, width=32, **_PIXART),
        embed=_pixart_embed,
    ),
    Family(
        "lcm",
        "LatentConsistencyModelPipeline",
        _seeded(_build_lcm),
        _small,
        embed=_lcm_embed,
        output_is_latents=False,
    ),
    Family(
        "animatediff",
        "AnimateDiffPipeline",
        _seeded(_build_animatediff),
        lambda i: _text(i, height=16, width=16, num_frames=2),
        embed=_sd_embed,
        exempt={
            "num_per_prompt": "AnimateDiffPipeline.__call__ sets num_videos_per_prompt = 1 "
            "itself: one video per prompt whatever the caller asks (diffusers' common test "
            "checks num_images_per_prompt only)",
        },
    ),
    Family(
        "kandinsky22-prior",
        "KandinskyV22PriorPipeline",
        _seeded(_build_kandinsky_prior),
        _text,
        output_types=("pt", "np"),
        refused=_not_a_prompt,
    ),
    Family(
        "kandinsky22-decoder",
        "KandinskyV22Pipeline",
        _seeded(_build_kandinsky_decoder),
        _image_embeds,
        batched=("image_embeds", "negative_image_embeds"),
        refused=None,
    ),
    Family(
        "kandinsky22-combined",
        "KandinskyV22CombinedPipeline",
        _seeded(_build_kandinsky_combined),
        lambda i: _text(i, height=32, width=32, prior_num_inference_steps=2),
        refused=_not_a_prompt,
        atol=1e-3,
    ),
    Family(
        "wuerstchen-prior",
        "WuerstchenPriorPipeline",
        _seeded(_build_wuerstchen_prior),
        lambda i: _text(i, height=128, width=128),
        output_types=("pt", "np"),
        embed=_wuerstchen_embed,
        # its batch and single calls differ by ~0.03 with guidance (diffusers' own test of
        # the prior allowed 0.3)
        atol=0.05,
        exempt={
            "save_load": "from_pretrained cannot find WuerstchenPrior since diffusers moved "
            "Wuerstchen to its deprecated pipelines",
        },
    ),
    Family(
        "audioldm2",
        "AudioLDM2Pipeline",
        _seeded(_build_audioldm2),
        lambda i: _text(i, audio_length_in_s=0.1),
        # no "latent": its GPT-2 reads a batch of prompts of different lengths padded, so
        # that a batch's latents are not its prompts' alone (by ~1, at waveforms of ~1e-5)
        output_types=("np", "pt"),
        embed=_audioldm2_embed,
    ),
    Family(
        "stable-audio",
        "StableAudioPipeline",
        _tiny("stable-audio"),
        _text,
        output_types=("pt", "np", "latent"),
        embed=_stable_audio_embed,
    ),
    Family(
        "wan",
        "WanPipeline",
        _tiny("wan"),
        lambda i: _text(
            i, height=16, width=16, num_frames=5, max_sequence_length=16, negative_prompt="dull"
        ),
        embed=_wan_embed,
    ),
)

BY_NAME = {family.name: family for family in FAMILIES}
