"""Measure time and peak memory of one SD-1.5-sized UNet forward per attention processor.

Each run is one forward at batch 2 (classifier-free guidance), float32, ``torch.no_grad()``,
in a fresh subprocess: the model is built with random weights (fixed seed), then a sampler
thread reads the process RSS every ~5 ms during the forward; the figure reported is the peak
RSS over the RSS right before the forward (so the weights are not counted). Contenders are
run interleaved (a rotated order per repeat) so that the load of other processes on a shared
machine spreads over all of them; the summary gives medians and ratios to SDPA.

Usage::

    python tests/benchmarks/attention_memory.py                        # 512 and 768 px
    python tests/benchmarks/attention_memory.py --sizes 64 --repeats 3 \\
        --processors sdpa safe:26 safe:24 --out bench-results/attention-512.json

``--compare 64`` instead checks that ours equals SDPA within 1e-5 on one 512 px forward
(the test suite does it at 32x32 latents).

Processors: ``sdpa`` (diffusers' AttnProcessor2_0, the default), ``sliced-auto`` and
``sliced-max`` (``unet.set_attention_slice``), ``classic`` (AttnProcessor), ``safe`` (ours at
the default chunk size) and ``safe:N`` (ours with ``chunk_elements=2**N``).
Not collected by pytest (``norecursedirs``); it takes many minutes.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("attention_memory")

SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
DEFAULT_PROCESSORS = ("sdpa", "sliced-auto", "sliced-max", "classic", "safe", "safe:24")
# classic at 768 px needs ~11 GB on top of the 3.4 GB of weights (EVIDENCE.md): too much for a
# machine shared with other engineers unless asked for explicitly with --allow-classic-768.
BIG_LATENT = 96


def _install(unet: Any, name: str) -> None:
    """Install the attention processor called ``name`` on ``unet``."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from mps_helpers._attention import SafeSlicedAttnProcessor

    if name == "sdpa":
        unet.set_attn_processor(AttnProcessor2_0())
    elif name == "classic":
        unet.set_attn_processor(AttnProcessor())
    elif name in ("sliced-auto", "sliced-max"):
        unet.set_attention_slice(name.removeprefix("sliced-"))
    elif name == "safe":
        unet.set_attn_processor(SafeSlicedAttnProcessor())
    elif name.startswith("safe:"):
        unet.set_attn_processor(SafeSlicedAttnProcessor(2 ** int(name.removeprefix("safe:"))))
    else:
        raise ValueError(f"unknown processor {name!r}")


def child(processor: str, latent: int, device: str = "cpu") -> dict[str, Any]:
    """Build the UNet, run one forward with ``processor`` and return the measurements.

    On the CPU: float32, the forward is the process's first (as a user's first image is), and
    memory is the peak RSS over the RSS right before it. On CUDA: float16, after one warm-up
    forward of the same shape (the first call loads kernel libraries for seconds), and memory
    is ``torch.cuda.max_memory_allocated`` over the memory allocated before the forward.
    """
    import psutil
    import torch
    from diffusers import UNet2DConditionModel

    dtype = torch.float32 if device == "cpu" else torch.float16
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).eval().to(device, dtype)
    _install(unet, processor)
    sample = torch.randn(2, 4, latent, latent).to(device, dtype)
    text = torch.randn(2, 77, 768).to(device, dtype)
    timestep = torch.tensor(500)

    def forward() -> Any:
        with torch.no_grad():
            return unet(sample, timestep, encoder_hidden_states=text).sample

    if device != "cpu":
        forward()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    gc.collect()

    proc = psutil.Process()
    baseline = proc.memory_info().rss if device == "cpu" else torch.cuda.memory_allocated()
    peak = baseline
    done = threading.Event()

    def sample_rss() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample_rss, daemon=True)
    if device == "cpu":
        sampler.start()
    start = time.perf_counter()
    cpu_start = time.process_time()
    out = forward()
    if device != "cpu":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    # CPU seconds of all threads: less sensitive than wall time to other processes' load.
    cpu_seconds = time.process_time() - cpu_start
    if device == "cpu":
        done.set()
        sampler.join()
        peak = max(peak, proc.memory_info().rss)
    else:
        peak = torch.cuda.max_memory_allocated()
    return {
        "processor": processor,
        "latent": latent,
        "image_px": latent * 8,
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "dtype": str(dtype).removeprefix("torch."),
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "extra_mb": (peak - baseline) / 2**20,
        "baseline_mb": baseline / 2**20,
        "finite": bool(torch.isfinite(out).all()),
        "threads": torch.get_num_threads(),
        "loadavg_after": os.getloadavg()[0],
        "torch": torch.__version__,
        # which version of the processor ran (a long session may span edits)
        "attention_sha": _attention_sha(),
    }


def _attention_sha() -> str:
    """Return the first 12 hex digits of the SHA-256 of mps_helpers/_attention.py."""
    import mps_helpers._attention

    return hashlib.sha256(Path(mps_helpers._attention.__file__).read_bytes()).hexdigest()[:12]


def compare(latent: int, chunks: list[int | None]) -> dict[str, Any]:
    """Return the largest difference of ours (at each bound) from SDPA on one UNet forward."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    from mps_helpers._attention import SafeSlicedAttnProcessor

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).eval()
    sample = torch.randn(2, 4, latent, latent)
    text = torch.randn(2, 77, 768)
    result: dict[str, Any] = {"latent": latent, "max_abs_diff": {}, "sdpa_calls": {}}
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = 0

    def counting_sdpa(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return sdpa(*args, **kwargs)

    # Counting SDPA calls shows that the chunked path ran (32 attention layers unchunked).
    torch.nn.functional.scaled_dot_product_attention = counting_sdpa
    with torch.no_grad():
        unet.set_attn_processor(AttnProcessor2_0())
        expected = unet(sample, 500, encoder_hidden_states=text).sample
        result["output_abs_max"] = expected.abs().max().item()
        for chunk in chunks:
            unet.set_attn_processor(SafeSlicedAttnProcessor(chunk))
            calls = 0
            actual = unet(sample, 500, encoder_hidden_states=text).sample
            diff = (actual - expected).abs().max().item()
            result["max_abs_diff"][str(chunk)] = diff
            result["sdpa_calls"][str(chunk)] = calls
            log.info(
                "latent %d, chunk_elements %s: %d SDPA calls, max |ours - SDPA| = %.3g",
                latent,
                chunk,
                calls,
                diff,
            )
    torch.nn.functional.scaled_dot_product_attention = sdpa
    return result


def _run_child(processor: str, latent: int, device: str) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter and return its JSON result."""
    load_before = os.getloadavg()[0]
    done = subprocess.run(
        [sys.executable, __file__, "--child", processor, str(latent), "--device", device],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{processor} at {latent}: exit {done.returncode}\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["loadavg_before"] = load_before
    return result


METRICS = ("seconds", "cpu_seconds", "extra_mb")


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return one row per (latent, processor): median, range and ratio to SDPA of each metric."""
    rows = []
    for latent in sorted({r["latent"] for r in runs}):
        at = [r for r in runs if r["latent"] == latent]
        sdpa = [r for r in at if r["processor"] == "sdpa"]
        for name in dict.fromkeys(r["processor"] for r in at):
            mine = [r for r in at if r["processor"] == name]
            row: dict[str, Any] = {
                "image_px": latent * 8,
                "latent": latent,
                "processor": name,
                "n": len(mine),
                "all_finite": all(r["finite"] for r in mine),
            }
            for metric in METRICS:
                values = [r[metric] for r in mine]
                median = statistics.median(values)
                row[f"{metric}_median"] = median
                row[f"{metric}_range"] = [min(values), max(values)]
                row[f"{metric}_vs_sdpa"] = (
                    median / statistics.median(r[metric] for r in sdpa) if sdpa else None
                )
            rows.append(row)
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    """Return the summary as a Markdown table (medians, ranges and ratios to SDPA)."""
    lines = [
        "| image | attention | n | forward s | x SDPA | CPU s | x SDPA | extra MB | x SDPA |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [f"{r['image_px']} px", r["processor"], str(r["n"])]
        for metric, fmt in (("seconds", ".1f"), ("cpu_seconds", ".1f"), ("extra_mb", ",.0f")):
            low, high = r[f"{metric}_range"]
            spread = f" ({low:{fmt}}-{high:{fmt}})" if r["n"] > 1 else ""
            ratio = r[f"{metric}_vs_sdpa"]
            cells.append(f"{r[f'{metric}_median']:{fmt}}{spread}")
            cells.append("-" if ratio is None else f"{ratio:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the interleaved measurements, print the table and write the JSON file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("PROCESSOR", "LATENT"), help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 96], help="latent sizes")
    parser.add_argument("--processors", nargs="+", default=list(DEFAULT_PROCESSORS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--allow-classic-768", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu (float32) or cuda (float16)")
    parser.add_argument(
        "--append", action="store_true", help="add to the runs already in --out (a resumed session)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results/attention.json"))
    parser.add_argument(
        "--compare",
        type=int,
        metavar="LATENT",
        help="instead of timing, check ours against SDPA on one forward at this latent size",
    )
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.device)))
        return 0

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.compare:
        result = compare(args.compare, [None, 2**22, 2**18])
        print(json.dumps(result, indent=1))
        return 0 if max(result["max_abs_diff"].values()) <= 1e-5 else 1
    runs: list[dict[str, Any]] = []
    if args.append and args.out.exists():
        runs = json.loads(args.out.read_text())["runs"]
    first = 1 + max((r["repeat"] for r in runs), default=-1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for repeat in range(first, first + args.repeats):
        for latent in args.sizes:
            names = [
                p
                for p in args.processors
                if not (p == "classic" and latent >= BIG_LATENT and not args.allow_classic_768)
            ]
            shift = repeat % len(names)
            for name in names[shift:] + names[:shift]:
                result = _run_child(name, latent, args.device)
                result["repeat"] = repeat
                runs.append(result)
                log.info(
                    "%s px %-12s %6.1f s (%6.1f CPU s) %8.0f MB extra (load %.1f -> %.1f)",
                    latent * 8,
                    name,
                    result["seconds"],
                    result["cpu_seconds"],
                    result["extra_mb"],
                    result["loadavg_before"],
                    result["loadavg_after"],
                )
                # Written after every run so that an interrupted session keeps what it measured.
                args.out.write_text(
                    json.dumps({"runs": runs, "summary": summarize(runs)}, indent=1)
                )
    rows = summarize(runs)
    args.out.write_text(json.dumps({"runs": runs, "summary": rows}, indent=1))
    print(_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
