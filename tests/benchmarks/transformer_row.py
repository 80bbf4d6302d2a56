"""Transformer row of the benchmark grid: auto against the best hand-set cell and as loaded.

An SD3-medium-sized pipeline with random weights (the 2B SD3Transformer2DModel of
stabilityai/stable-diffusion-3-medium and its 16-channel VAE at full size; the three text
encoders cut to two layers of the real widths, since they run once per call) on CUDA, or a
tiny SD3/Flux pipeline on the CPU. Contenders, all loaded at once:

- ``as-loaded``: the pipeline as built, float32, moved to the device;
- hand-set cells: float16 and bfloat16 (SDPA, one call; on the CPU float32 is the cell);
- ``auto``: ``mps_helpers.prepare_pipeline(pipe)``.

Memory is not compared: the contenders are resident together (peak memory per contender is
``grid_cuda.py``'s job).

Method as ``grid_cuda.py --parts confirm``: every round runs each contender once, in a
rotated order; the figure is the median over rounds of each contender's time over auto's in
the same round (below 1: the contender is faster). Also times one Flux-sized attention call
(24 heads x 9,216 tokens, 1536 px) natively and inside
:func:`mps_helpers._bounded.bounded_attention` at 2**28 (the mps plan's bound at most) and
2**24, so the cost of the bound is measured where it splits little and where it splits much.

    python tests/benchmarks/transformer_row.py --device cuda --out bench-results
    python tests/benchmarks/transformer_row.py --device cpu --model tiny-flux
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))

import _common

MODELS = ("sd3-medium", "tiny-sd3", "tiny-flux")


def sd3_medium(seed: int, device: str) -> Any:
    """Return an SD3-medium-sized StableDiffusion3Pipeline with random weights on ``device``."""
    import diffusers
    import torch
    import transformers

    from mps_helpers import testing

    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        transformer = diffusers.SD3Transformer2DModel(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            num_layers=24,
            attention_head_dim=64,
            num_attention_heads=24,
            joint_attention_dim=4096,
            caption_projection_dim=1536,
            pooled_projection_dim=2048,
            out_channels=16,
            pos_embed_max_size=192,
        )
        vae = diffusers.AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=16,
            use_quant_conv=False,
            use_post_quant_conv=False,
            shift_factor=0.0609,
            scaling_factor=1.5305,
            sample_size=1024,
        )
        tokenizer, tokenizer_2 = testing._tokenizer(), testing._tokenizer()
        clip_l = testing._text_config(
            tokenizer, hidden_size=768, projection_dim=768, num_hidden_layers=2,
            num_attention_heads=12, intermediate_size=64,
        )  # fmt: skip
        clip_g = testing._text_config(
            tokenizer_2, hidden_size=1280, projection_dim=1280, num_hidden_layers=2,
            num_attention_heads=20, intermediate_size=64,
        )  # fmt: skip
        tokenizer_3 = testing._t5_tokenizer()
        text_encoder_3 = transformers.T5EncoderModel(
            transformers.T5Config(
                vocab_size=len(tokenizer_3), d_model=4096, d_kv=64, d_ff=64, num_layers=2,
                num_heads=4, relative_attention_num_buckets=32, feed_forward_proj="gated-gelu",
                tie_word_embeddings=False, pad_token_id=tokenizer_3.pad_token_id,
                eos_token_id=tokenizer_3.eos_token_id,
                decoder_start_token_id=tokenizer_3.pad_token_id,
            )
        )  # fmt: skip
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=transformer,
            vae=vae,
            text_encoder=transformers.CLIPTextModelWithProjection(clip_l),
            tokenizer=tokenizer,
            text_encoder_2=transformers.CLIPTextModelWithProjection(clip_g),
            tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        )
    testing._finish(pipe)
    return pipe


def build(model: str, device: str, seed: int = 0) -> Any:
    if model == "sd3-medium":
        return sd3_medium(seed, device)
    if model == "tiny-sd3":
        from mps_helpers.testing import tiny_pipeline

        return tiny_pipeline("sd3", seed=seed).to(device)
    from _tiny_transformers import tiny_flux

    return tiny_flux(seed).to(device)


def make_call(pipe: Any, *, size: int, steps: int) -> Any:
    import torch

    def run(n: int = steps) -> Any:
        return pipe(
            "a photo of an astronaut riding a horse on mars",
            height=size,
            width=size,
            num_inference_steps=n,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images

    return run


def contenders(model: str, device: str) -> dict[str, Any]:
    """Return name -> a fresh pipeline set up as that contender (all built alike)."""
    import torch

    from mps_helpers import prepare_pipeline

    cells = {"as-loaded": None, "auto": "auto"}
    if device == "cuda":
        cells |= {"fp16": torch.float16, "bf16": torch.bfloat16}
    else:
        cells |= {"fp32": torch.float32, "bf16": torch.bfloat16}
    pipes: dict[str, Any] = {}
    for name, how in cells.items():
        pipe = build(model, device)
        if how == "auto":
            pipe = prepare_pipeline(pipe)
        elif how is not None:
            pipe.to(device, how)
        pipes[name] = pipe
    return pipes


def attention_micro(device: str, *, repeats: int) -> dict[str, Any]:
    """Time one attention call natively and bounded at 2**28 (no block needed below it)."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    from mps_helpers._bounded import bounded_attention

    shapes = {"cuda": (1, 24, 9216, 128), "cpu": (1, 24, 2304, 128)}
    batch, heads, tokens, dim = shapes.get(device, shapes["cpu"])
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = (torch.randn(batch, heads, tokens, dim, device=device, dtype=dtype) for _ in "qkv")
    out: dict[str, Any] = {"shape": [batch, heads, tokens, dim], "dtype": str(dtype)}
    for bound in (2**28, 2**24):
        times: dict[str, list[float]] = {"native": [], "bounded": []}
        for i in range(repeats + 1):
            for name in ("native", "bounded") if i % 2 else ("bounded", "native"):
                if name == "native":
                    seconds, _ = _common.timed(
                        lambda: F.scaled_dot_product_attention(q, k, v), device
                    )
                else:
                    with bounded_attention(bound):  # what a prepared mps call does
                        seconds, _ = _common.timed(
                            lambda: F.scaled_dot_product_attention(q, k, v), device
                        )
                if i:
                    times[name].append(seconds)
        elements = batch * heads * tokens * tokens
        ratios = [b / n for b, n in zip(times["bounded"], times["native"], strict=True)]
        out[f"2**{bound.bit_length() - 1}"] = {
            "score_elements": elements,
            "blocks": -(-elements // bound),
            "native_ms": _common.median(times["native"]) * 1e3,
            "bounded_ms": _common.median(times["bounded"]) * 1e3,
            "bounded_over_native": _common.median(ratios),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu", "mps"), default=None)
    parser.add_argument("--model", choices=MODELS, default=None)
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=330.0, help="stop starting rounds")
    parser.add_argument("--out", type=Path, default=_common.RESULTS)
    args = parser.parse_args(argv)
    import numpy as np

    start = time.monotonic()
    device = args.device or _common.detect_device()
    model = args.model or ("sd3-medium" if device == "cuda" else "tiny-flux")
    size = args.size or (1024 if model == "sd3-medium" else 64)
    steps = args.steps or (20 if model == "sd3-medium" else 4)

    doc: dict[str, Any] = {
        "machine": _common.machine_info(device),
        "model": model,
        "size": size,
        "steps": steps,
        "attention": attention_micro(device, repeats=5),
    }
    print(json.dumps(doc["attention"], indent=1), flush=True)
    pipes = contenders(model, device)
    runs = {name: make_call(pipe, size=size, steps=steps) for name, pipe in pipes.items()}
    doc["params"] = sum(p.numel() for p in pipes["auto"].transformer.parameters())
    from mps_helpers import plan_of

    plan = plan_of(pipes["auto"])
    doc["auto_plan"] = None if plan is None else plan.to_dict()
    for run in runs.values():
        run(2)  # warm-up
    names = list(runs)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    finite: dict[str, bool] = {}
    for i in range(args.rounds):
        if time.monotonic() - start > args.budget_s:
            break
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            took, images = _common.timed(runs[name], device)
            seconds[name].append(took)
            finite[name] = bool(np.isfinite(images).all())
    rows = []
    for name in names:
        pairs = zip(seconds[name], seconds["auto"], strict=False)
        vs_auto = (
            _common.median([theirs / ours for theirs, ours in pairs]) if seconds[name] else None
        )
        rows.append(
            {
                "contender": name,
                "seconds": seconds[name],
                "s_per_image": _common.median(seconds[name]) if seconds[name] else None,
                "time_vs_auto": vs_auto,
                "finite": finite.get(name),
            }
        )
    doc["contenders"] = rows
    hand = [r for r in rows if r["contender"] not in ("auto", "as-loaded") and r["time_vs_auto"]]
    if hand:
        best = min(hand, key=lambda r: r["time_vs_auto"])
        doc["summary"] = {
            "best": best["contender"],
            "auto_speed_vs_best": best["time_vs_auto"],
            "as_loaded_time_vs_auto": next(
                r["time_vs_auto"] for r in rows if r["contender"] == "as-loaded"
            ),
        }
    table = [
        [r["contender"], r["s_per_image"], r["time_vs_auto"], len(r["seconds"]), r["finite"]]
        for r in rows
    ]
    header = ["contender", "s/image", "time vs auto", "rounds", "finite"]
    print(_common.md_table(header, table), flush=True)
    print(json.dumps(doc.get("summary"), indent=1), flush=True)
    _common.write_json(args.out / f"transformer-row-{device}-{model}.json", doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
