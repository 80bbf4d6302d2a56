"""Tiny Flux and Wan pipelines with random weights, for the transformer and video tests.

Test helpers only (mps_helpers.testing builds the public tiny pipelines). Configs follow
diffusers' own ``get_dummy_components`` for these pipelines, with the tokenizers of
:mod:`mps_helpers.testing` so that nothing is downloaded. Every pipeline is on the CPU in
float32, in eval mode, with its progress bar off; the caller's random state is kept.

To be unified: issue 13 brings ``mps_helpers.testing.tiny_pipeline("flux")`` and
``tiny_pipeline("wan")``; once main has them, these builders give way to those (the tests'
facts assertions name the head counts and channels of these configs).
"""

from __future__ import annotations

from typing import Any

from mps_helpers import testing

__all__ = ["tiny_flux", "tiny_wan"]


def _t5_encoder(tokenizer: Any, *, umt5: bool = False) -> Any:
    import transformers

    config = transformers.UMT5Config if umt5 else transformers.T5Config
    model = transformers.UMT5EncoderModel if umt5 else transformers.T5EncoderModel
    return model(
        config(
            vocab_size=len(tokenizer),
            d_model=32,
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


def tiny_flux(seed: int = 0) -> Any:
    """Return a FluxPipeline with random weights (a 2-block transformer, 68k parameters)."""
    import diffusers
    import torch
    import transformers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = diffusers.FluxTransformer2DModel(
            patch_size=1,
            in_channels=4,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=[4, 4, 8],
        )
        tokenizer = testing._tokenizer()
        text_encoder = transformers.CLIPTextModel(testing._text_config(tokenizer))
        tokenizer_2 = testing._t5_tokenizer()
        text_encoder_2 = _t5_encoder(tokenizer_2)
        vae = diffusers.AutoencoderKL(
            sample_size=32,
            in_channels=3,
            out_channels=3,
            block_out_channels=(4,),
            layers_per_block=1,
            latent_channels=1,
            norm_num_groups=1,
            use_quant_conv=False,
            use_post_quant_conv=False,
            shift_factor=0.0609,
            scaling_factor=1.5035,
        )
        pipe = diffusers.FluxPipeline(
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            transformer=transformer,
        )
    testing._finish(pipe)
    return pipe


def tiny_wan(seed: int = 0) -> Any:
    """Return a WanPipeline (text to video) with random weights: 2 transformer blocks, a 3-D VAE."""
    import diffusers
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
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
        tokenizer = testing._t5_tokenizer()
        text_encoder = _t5_encoder(tokenizer, umt5=True)
        pipe = diffusers.WanPipeline(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0),
            transformer=transformer,
        )
    testing._finish(pipe)
    return pipe
