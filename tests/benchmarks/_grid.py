"""The configuration grid: hand-set cells, the ``auto`` plan, and how to measure and rank them.

A *cell* is one way to run the same job (N prompts, one image each, at one size and step
count). Hand-set cells are what an expert does with diffusers alone: ``pipe.to(device,
dtype)``, an attention processor (SDPA, diffusers' sliced attention via
``pipe.enable_attention_slicing()``, or the library's ``SafeSlicedAttnProcessor`` installed
by hand), ``pipe.vae.enable_slicing()``, and the prompts in one batched call or in a loop
written by hand. None of them goes through mps_helpers' prepared call. The ``auto`` cell is
``prepare_pipeline(pipe)`` with every option left at its default, on the pipeline as loaded
(float32, on the CPU), called once with the whole list of prompts.

Two named cells come from the grid itself: *naive* is the pipeline as loaded, moved to the
device (float32, SDPA, one batch, no VAE slicing); *source rules* is the diffusers mps page
applied blindly (float16, attention slicing, a loop over prompts).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import _common

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

__all__ = [
    "Cell",
    "grid_cells",
    "measure_cell",
    "run_cells",
    "summarize",
    "table",
]

log = logging.getLogger("bench.grid")

DTYPES = ("float32", "float16", "bfloat16")
ATTENTIONS = ("sdpa", "diffusers", "safe")
SHORT_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


@dataclass(frozen=True)
class Cell:
    """One configuration of the grid (hand-set unless ``setup == "auto"``)."""

    setup: str = "manual"  # "manual" | "auto"
    dtype: str = "float32"
    attention: str = "sdpa"  # "sdpa" | "diffusers" | "safe"
    prompts: str = "batch"  # "batch" | "loop"
    vae_slicing: bool = False
    size: int = 512
    images: int = 4

    @property
    def key(self) -> str:
        """Return a unique, readable name: ``fp16 sdpa batch vae-off 512x4`` or ``auto 512x4``."""
        if self.setup == "auto":
            return f"auto {self.size}x{self.images}"
        vae = "vae-slice" if self.vae_slicing else "vae-off"
        return (
            f"{SHORT_DTYPE[self.dtype]} {self.attention} {self.prompts} {vae} "
            f"{self.size}x{self.images}"
        )

    @property
    def label(self) -> str:
        """Return the key without the size (for tables and plots of one size)."""
        return self.key.rsplit(" ", 1)[0]

    def to_dict(self) -> dict[str, Any]:
        """Return the cell's fields."""
        return dataclasses.asdict(self)

    @classmethod
    def from_label(cls, label: str, *, size: int, images: int) -> Cell:
        """Return the cell a label names: ``auto`` or ``bf16 sdpa batch vae-off``."""
        if label == "auto":
            return cls(setup="auto", size=size, images=images)
        dtypes = {short: name for name, short in SHORT_DTYPE.items()}
        parts = label.split()
        if (
            len(parts) != 4
            or parts[0] not in dtypes
            or parts[1] not in ATTENTIONS
            or parts[2] not in ("batch", "loop")
            or parts[3] not in ("vae-off", "vae-slice")
        ):
            raise ValueError(
                f"not a cell label: {label!r}; expected 'auto' or "
                f"'{{{','.join(dtypes)}}} {{{','.join(ATTENTIONS)}}} {{batch,loop}} "
                "{vae-off,vae-slice}'"
            )
        return cls(
            dtype=dtypes[parts[0]],
            attention=parts[1],
            prompts=parts[2],
            vae_slicing=parts[3] == "vae-slice",
            size=size,
            images=images,
        )


def grid_cells(
    *,
    dtypes: Sequence[str] = DTYPES,
    attentions: Sequence[str] = ATTENTIONS,
    size: int = 512,
    images: int = 4,
) -> list[Cell]:
    """Return every hand-set combination of dtype x attention x prompts x VAE slicing."""
    return [
        Cell(dtype=d, attention=a, prompts=p, vae_slicing=v, size=size, images=images)
        for d, a, p, v in itertools.product(dtypes, attentions, ("batch", "loop"), (False, True))
    ]


def naive_cell(size: int, images: int) -> Cell:
    """Return the pipeline-as-loaded cell: float32, SDPA, one batch, no VAE slicing."""
    return Cell(size=size, images=images)


def source_cell(size: int, images: int) -> Cell:
    """Return the diffusers mps page applied blindly: float16, attention slicing, a loop."""
    return Cell(dtype="float16", attention="diffusers", prompts="loop", size=size, images=images)


# ---------------------------------------------------------------------------------------
# Setting a cell up and measuring it


def _set_up_manual(pipe: Any, cell: Cell, device: str) -> None:
    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0

    from mps_helpers import SafeSlicedAttnProcessor

    pipe.to(device, getattr(torch, cell.dtype))
    # Reset first: the same pipeline object serves every cell of one dtype.
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    if cell.attention == "diffusers":
        pipe.enable_attention_slicing()
    elif cell.attention == "safe":
        pipe.unet.set_attn_processor(SafeSlicedAttnProcessor())
    elif cell.attention != "sdpa":
        raise ValueError(f"unknown attention {cell.attention!r}: expected one of {ATTENTIONS}")
    if cell.vae_slicing:
        pipe.vae.enable_slicing()
    else:
        pipe.vae.disable_slicing()


def _set_up_auto(pipe: Any) -> dict[str, Any]:
    from mps_helpers import plan_of, prepare_pipeline

    prepare_pipeline(pipe)
    return plan_of(pipe).to_dict()  # type: ignore[no-any-return]  # prepared just above


def make_call(pipe: Any, cell: Cell) -> Callable[[int], list[Any]]:
    """Return ``run(steps)`` doing the cell's job on ``pipe``; it returns the output arrays."""
    prompts = [_common.PROMPTS[i % len(_common.PROMPTS)] for i in range(cell.images)]
    common = {"height": cell.size, "width": cell.size, "output_type": "np"}

    def batch(steps: int) -> list[Any]:
        out = pipe(
            prompt=prompts,
            generator=_common.generators(len(prompts)),
            num_inference_steps=steps,
            **common,
        )
        return [out.images]

    def loop(steps: int) -> list[Any]:
        return [
            pipe(
                prompt=prompt,
                generator=_common.generators(1, start=i),
                num_inference_steps=steps,
                **common,
            ).images
            for i, prompt in enumerate(prompts)
        ]

    return loop if cell.setup == "manual" and cell.prompts == "loop" else batch


def measure_cell(
    pipe: Any,
    cell: Cell,
    *,
    device: str,
    steps: int,
    warmup_steps: int,
    repeats: int,
) -> dict[str, Any]:
    """Set ``pipe`` up as ``cell`` says, time ``repeats`` runs, return the record.

    A run with ``warmup_steps`` steps (same shapes) goes first when ``warmup_steps > 0``: it
    loads kernels and fills caches, and is neither timed nor counted in the peak.
    """
    import numpy as np

    start = time.perf_counter()
    record: dict[str, Any] = {"key": cell.key, "cell": cell.to_dict()}
    if cell.setup == "auto":
        record["plan"] = _set_up_auto(pipe)
    else:
        _set_up_manual(pipe, cell, device)
    record["setup_s"] = time.perf_counter() - start
    run = make_call(pipe, cell)
    if warmup_steps > 0:
        record["warmup_s"], _ = _common.timed(lambda: run(warmup_steps), device)
    _common.empty_cache(device)
    seconds: list[float] = []
    outputs: list[Any] = []
    # Process CPU time beside wall time: on a shared CPU it is the steadier of the two.
    cpu_start = time.process_time()
    with _common.peak_memory(device) as memory:
        for _ in range(repeats):
            elapsed, outputs = _common.timed(lambda: run(steps), device)
            seconds.append(elapsed)
    record.update(memory)
    record["cpu_s_per_image"] = (time.process_time() - cpu_start) / repeats / cell.images
    record["seconds"] = seconds
    record["s_per_call"] = _common.median(seconds)
    record["s_per_image"] = record["s_per_call"] / cell.images
    record["finite"] = all(bool(np.isfinite(np.asarray(o)).all()) for o in outputs)
    return record


# ---------------------------------------------------------------------------------------
# Running many cells: in this process (CUDA, mps, quick runs) or one fresh process per cell


def _child_command(cell: Cell, model: Path, device: str, options: dict[str, int]) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        json.dumps({"cell": cell.to_dict(), "model": str(model), "device": device, **options}),
    ]


def _run_isolated(cell: Cell, model: Path, device: str, options: dict[str, int]) -> dict[str, Any]:
    done = subprocess.run(
        _child_command(cell, model, device, options),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"exit {done.returncode}: {done.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _child_main(spec_text: str) -> int:
    spec = json.loads(spec_text)
    cell = Cell(**spec["cell"])
    pipe = _common.load_pipeline(Path(spec["model"]))
    record = measure_cell(
        pipe,
        cell,
        device=spec["device"],
        steps=spec["steps"],
        warmup_steps=spec["warmup_steps"],
        repeats=spec["repeats"],
    )
    print(json.dumps(record, default=str))
    return 0


def run_cells(
    cells: Iterable[Cell],
    *,
    model: Path,
    device: str,
    steps: int,
    warmup_steps: int,
    repeats: int,
    isolate: bool,
    on_record: Callable[[dict[str, Any]], None] = lambda record: None,
    deadline: float | None = None,
) -> list[dict[str, Any]]:
    """Measure each cell on the pipeline saved at ``model``; return one record per cell.

    In-process, the hand-set cells of one dtype share one pipeline (moved to the device
    once); each ``auto`` cell gets a fresh one as loaded. With ``isolate`` every cell runs in
    a fresh process, which is what makes CPU peak RSS comparable. A cell that fails is
    recorded with its error; cells left when ``deadline`` (a ``time.monotonic()`` value)
    passes are recorded as skipped. ``on_record`` sees every record as soon as it exists.
    """
    options = {"steps": steps, "warmup_steps": warmup_steps, "repeats": repeats}
    records: list[dict[str, Any]] = []
    shared: dict[str, Any] = {}  # dtype -> pipeline, in-process only

    for cell in cells:
        if deadline is not None and time.monotonic() > deadline:
            record: dict[str, Any] = {
                "key": cell.key,
                "cell": cell.to_dict(),
                "skipped": "time budget of this run spent",
            }
        else:
            try:
                if isolate:
                    record = _run_isolated(cell, model, device, options)
                else:
                    if cell.setup == "auto":
                        shared.clear()
                        _common.empty_cache(device)
                        pipe = _common.load_pipeline(model)
                    else:
                        if cell.dtype not in shared:
                            # One pipeline on the device at a time: peaks count one model.
                            shared.clear()
                            _common.empty_cache(device)
                            shared[cell.dtype] = _common.load_pipeline(model)
                        pipe = shared[cell.dtype]
                    record = measure_cell(pipe, cell, device=device, **options)
                    del pipe
            except Exception as exc:
                log.warning("%s failed: %s", cell.key, exc)
                record = {"key": cell.key, "cell": cell.to_dict(), "error": repr(exc)[-2000:]}
        records.append(record)
        if "s_per_image" in record:
            log.info(
                "%-34s %8.3f s/image  peak %6.2f GiB%s",
                cell.key,
                record["s_per_image"],
                record["peak_gib"],
                "" if record["finite"] else "  (non-finite output)",
            )
        on_record(record)
    shared.clear()
    _common.empty_cache(device)
    return records


# ---------------------------------------------------------------------------------------
# Ranking


def _ok(record: dict[str, Any]) -> bool:
    return "s_per_image" in record and bool(record.get("finite", False))


def summarize(records: Sequence[dict[str, Any]], *, size: int) -> dict[str, Any]:
    """Return the best cell at ``size``, where ``auto`` lands, and the headline ratios.

    Best = fastest hand-set cell with finite output. Ratios: ``auto_speed_vs_best`` is auto's
    throughput over the best cell's (goal >= 0.95), ``auto_peak_vs_best`` auto's peak memory
    over the best cell's (goal <= 1.10), ``auto_speedup_vs_naive`` and
    ``source_rules_slowdown_vs_auto`` are time ratios (> 1 means auto is faster).
    """
    at = [r for r in records if r["cell"]["size"] == size]
    manual = sorted(
        (r for r in at if r["cell"]["setup"] == "manual" and _ok(r)),
        key=lambda r: r["s_per_image"],
    )
    auto = next((r for r in at if r["cell"]["setup"] == "auto" and _ok(r)), None)
    summary: dict[str, Any] = {"size": size}
    if not manual:
        return summary
    best = manual[0]
    leanest = min(manual, key=lambda r: r["peak_gib"])
    summary["best"] = best["key"]
    summary["best_s_per_image"] = best["s_per_image"]
    summary["best_peak_gib"] = best["peak_gib"]
    summary["leanest"] = leanest["key"]
    summary["leanest_peak_gib"] = leanest["peak_gib"]
    images = best["cell"]["images"]
    by_key = {r["key"]: r for r in at}
    naive = by_key.get(naive_cell(size, images).key)
    source = by_key.get(source_cell(size, images).key)
    if auto is not None:
        summary["auto_s_per_image"] = auto["s_per_image"]
        summary["auto_peak_gib"] = auto["peak_gib"]
        summary["auto_plan"] = _plan_brief(auto.get("plan", {}))
        summary["auto_matches"] = [
            r["key"] for r in manual if _same_setup(r["cell"], auto.get("plan", {}))
        ]
        summary["auto_rank"] = 1 + sum(r["s_per_image"] < auto["s_per_image"] for r in manual)
        summary["auto_speed_vs_best"] = best["s_per_image"] / auto["s_per_image"]
        summary["auto_peak_vs_best"] = auto["peak_gib"] / best["peak_gib"]
        if naive is not None and _ok(naive):
            summary["auto_speedup_vs_naive"] = naive["s_per_image"] / auto["s_per_image"]
        if source is not None and _ok(source):
            summary["source_rules_slowdown_vs_auto"] = source["s_per_image"] / auto["s_per_image"]
    summary["cells_measured"] = len(manual)
    summary["cells_failed_or_skipped"] = [
        r["key"] for r in at if r["cell"]["setup"] == "manual" and not _ok(r)
    ]
    return summary


def _plan_brief(plan: dict[str, Any]) -> str:
    if not plan:
        return "-"
    attention = (
        f"{plan.get('attention_processor')} slicing" if plan.get("attention_slicing") else "sdpa"
    )
    vae = plan.get("vae_dtype")
    upcast = f" ({vae} VAE)" if vae and vae != plan.get("dtype") else ""
    return (
        f"{plan.get('device')} {plan.get('dtype')}{upcast} {attention} "
        f"{'loop' if plan.get('batch_to_loop') else 'batch'} "
        f"vae-slicing {'on' if plan.get('vae_slicing') else 'off'}"
        f"{' vae-tiling' if plan.get('vae_tiling') else ''}"
    )


def _same_setup(cell: dict[str, Any], plan: dict[str, Any]) -> bool:
    if not plan:
        return False
    attention = (
        ("safe" if plan.get("attention_processor") == "safe" else "diffusers")
        if plan.get("attention_slicing")
        else "sdpa"
    )
    return bool(
        cell["dtype"] == plan.get("dtype")
        and cell["attention"] == attention
        and cell["prompts"] == ("loop" if plan.get("batch_to_loop") else "batch")
        and cell["vae_slicing"] == bool(plan.get("vae_slicing"))
    )


def table(records: Sequence[dict[str, Any]], *, size: int | None = None) -> str:
    """Return the records (of one size, if given) as a Markdown table, fastest first."""
    rows = []
    chosen = [r for r in records if size is None or r["cell"]["size"] == size]
    best = min((r["s_per_image"] for r in chosen if _ok(r)), default=None)
    for r in sorted(chosen, key=lambda r: r.get("s_per_image", float("inf"))):
        if "s_per_image" not in r:
            rows.append([r["key"], "-", "-", "-", "-", r.get("skipped") or r.get("error", "")])
            continue
        note = "" if r["finite"] else "non-finite output"
        if r["cell"]["setup"] == "auto":
            note = ("plan: " + _plan_brief(r.get("plan", {})) + " " + note).strip()
        rows.append(
            [
                r["key"],
                r["s_per_image"],
                r["s_per_image"] / best if best else None,
                r["peak_gib"],
                len(r["seconds"]),
                note,
            ]
        )
    return _common.md_table(
        ["configuration", "s/image", "x best", "peak GiB", "runs", "note"], rows
    )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        sys.exit(_child_main(sys.argv[2]))
    sys.exit("usage: _grid.py --child SPEC (run by grid_cpu.py / grid_cuda.py)")
