"""Predicted against measured peak memory of real-size pipelines with random weights.

Each cell builds (once per model) a pipeline of a public model's architecture with random
weights directly on the GPU (``tests/architectures.py`` holds the configs), prepares it with
:func:`mps_helpers.prepare_pipeline` (the NaN guard off: random weights may overflow in half
precision, and a guarded re-decode would measure the guard, not the pipeline), runs one call
of two denoising steps and records:

- the peak of the whole call, ``torch.cuda.max_memory_allocated()`` (weights included), and
  ``max_memory_reserved()`` (what the caching allocator held);
- the peak of each phase (text encoding, each denoiser forward, the VAE decode), the counter
  reset at each phase's start;
- the weights of each component, and the plan's decisions;
- where the installed mps_helpers has it, :func:`mps_helpers.estimate_memory`'s prediction
  for the same pipeline, size, batch and plan.

On the CPU (``--tiny``) the pipelines are :func:`mps_helpers.testing.tiny_pipeline`'s and the
peak is the largest sum of live torch CPU allocations, read from the profiler's memory
events (``torch.profiler`` with ``profile_memory=True``).

Usage::

    python tests/benchmarks/memory_validation.py --out bench-results/memory-cuda.json
    python tests/benchmarks/memory_validation.py --models sd15 flux --sizes 512 --batches 1
    python tests/benchmarks/memory_validation.py --tiny --out bench-results/memory-cpu.json
    python tests/benchmarks/memory_validation.py --table bench-results/memory-cuda.json \\
        --plot docs/_static/memory/predicted-vs-measured.png

Not collected by pytest (``norecursedirs``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for path in (str(REPO), str(REPO / "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)

from architectures import build  # noqa: E402  (tests/architectures.py, after the path is set)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

log = logging.getLogger("memory_validation")

GiB = 2**30
PROMPT = "a photograph of an astronaut riding a horse on the moon"
STEPS = 2

# (model, height, width, frames, batch, variant): variant "plain" is the plan as prepared;
# the others force one measure so that its term of the estimate is checked too.
_IMAGE_MODELS = ("sd15", "sdxl", "sd3", "flux")
_VARIANTS: dict[str, tuple[tuple[int, int, str], ...]] = {
    "sd15": (
        (1024, 4, "vae_slicing"),
        (1024, 4, "vae_tiling"),
        (512, 1, "math"),
        (512, 4, "math"),
        (1024, 1, "math+safe"),
    ),
    "sdxl": ((1024, 4, "vae_slicing"), (1024, 4, "vae_tiling"), (512, 1, "math")),
    "sd3": ((512, 1, "math"),),
    "flux": ((512, 1, "math"),),
}
_VIDEO_CELLS = ((480, 832, 17, 1), (480, 832, 33, 1))
_PIXART_CELLS = ((1024, 1), (1024, 4))


def tiny(name: str) -> Any:
    """Return mps_helpers.testing's tiny pipeline ``name`` (CPU, float32)."""
    from mps_helpers.testing import tiny_pipeline

    pipe = tiny_pipeline(name)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------
# Measuring


class CudaPhases:
    """Peak allocated memory per phase of one call, the counter reset at each phase's start."""

    def __init__(self) -> None:
        self.peaks: dict[str, int] = {}
        self.overall = 0
        self._phase = "other"

    def _switch(self, phase: str) -> None:
        import torch

        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        self.peaks[self._phase] = max(self.peaks.get(self._phase, 0), peak)
        self.overall = max(self.overall, peak)
        torch.cuda.reset_peak_memory_stats()
        self._phase = phase

    def wrap(self, phase: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            outer = self._phase
            self._switch(phase)
            try:
                return fn(*args, **kwargs)
            finally:
                self._switch(outer)

        return wrapped

    def finish(self) -> None:
        self._switch("other")


@contextlib.contextmanager
def _instrumented(pipe: Any, phases: CudaPhases) -> Iterator[None]:
    """Route the pipeline's phases through ``phases`` (instance attributes, removed after)."""
    from mps_helpers._plan import denoiser_of

    denoiser = denoiser_of(pipe)
    saved: list[tuple[Any, str]] = []
    targets = ((pipe, "encode_prompt", "text"), (pipe.vae, "decode", "decode"))
    for obj, attr, phase in targets:
        obj.__dict__[attr] = phases.wrap(phase, getattr(obj, attr))
        saved.append((obj, attr))
    original_forward = denoiser.forward
    denoiser.forward = phases.wrap("denoise", original_forward)
    try:
        yield
    finally:
        for obj, attr in saved:
            obj.__dict__.pop(attr, None)
        denoiser.__dict__.pop("forward", None)


def _weights(pipe: Any) -> dict[str, int]:
    import torch

    out: dict[str, int] = {}
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            tensors = [*module.parameters(), *module.buffers()]
            out[name] = sum(t.numel() * t.element_size() for t in tensors)
    return out


def _call_kwargs(pipe: Any, height: int, width: int, frames: int | None, batch: int) -> dict:
    kwargs: dict[str, Any] = {
        "prompt": [PROMPT] * batch,
        "height": height,
        "width": width,
        "num_inference_steps": STEPS,
        "output_type": "np",
    }
    if frames is not None:
        kwargs["num_frames"] = frames
    if type(pipe).__name__.startswith("PixArt"):
        kwargs["use_resolution_binning"] = False
    return kwargs


def _predict(  # noqa: PLR0917 - the cell's fields, in the order of its tuple
    pipe: Any, height: int, width: int, frames: int | None, batch: int, plan: Any, variant: str
) -> dict[str, Any] | None:
    """Return the estimate of one cell for the loaded pipeline and its plan, or None."""
    try:
        from mps_helpers._environment import detect_environment
        from mps_helpers._memory import estimate, settings_from_plan, spec_of_pipeline
    except ImportError:  # an mps_helpers without the estimate
        return None
    try:
        settings = settings_from_plan(plan, torch_version=detect_environment().torch_version)
        if "math" in variant:  # the cell forces SDPA's math path
            settings = settings.replace(attention_kernel=False)
        result = estimate(
            spec_of_pipeline(pipe),
            settings,
            height=height,
            width=width,
            frames=frames,
            batch_size=batch,
        )
    except Exception:  # a prediction that fails is reported, the measurement kept
        return {"error": traceback.format_exc(limit=3)}
    return result.to_dict()


def measure_cuda(  # noqa: PLR0917 - the cell's fields, in the order of its tuple
    pipe: Any, name: str, height: int, width: int, frames: int | None, batch: int, variant: str
) -> dict[str, Any]:
    """Return the measured (and, where available, predicted) memory of one call."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from mps_helpers import plan_for
    from mps_helpers._apply import apply_plan

    options: dict[str, Any] = {"height": height, "width": width, "batch_size": batch}
    for measure in ("vae_slicing", "vae_tiling"):
        if variant == measure:
            options[measure] = True
    # The plan as prepared, but without the NaN guard: random weights may overflow in half
    # precision, and a guarded re-decode would measure the guard. Its VAE dtype is the
    # guarded plan's, so the cell measures what a user's call does when nothing overflows.
    plan = plan_for(pipe, **options).replace(nan_guard=False)
    if "safe" in variant:
        plan = plan.replace(attention_slicing=True, attention_chunk_elements=2**26)
    apply_plan(pipe, plan)
    prediction = _predict(pipe, height, width, frames, batch, plan, variant)

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    phases = CudaPhases()
    backend = sdpa_kernel([SDPBackend.MATH]) if "math" in variant else contextlib.nullcontext()
    start = time.perf_counter()
    with backend, _instrumented(pipe, phases):
        output = pipe(**_call_kwargs(pipe, height, width, frames, batch))
    phases.finish()
    seconds = time.perf_counter() - start
    images = getattr(output, "images", None)
    if images is None:
        images = getattr(output, "frames", None)
    finite = None
    if images is not None:
        import numpy as np

        finite = bool(np.isfinite(np.asarray(images, dtype=np.float32)).all())
    record = {
        "model": name,
        "height": height,
        "width": width,
        "frames": frames,
        "batch": batch,
        "variant": variant,
        "dtype": str(plan.dtype).removeprefix("torch."),
        "vae_dtype": str(plan.vae_dtype).removeprefix("torch."),
        "plan": {k: plan.to_dict()[k] for k in ("attention_slicing", "vae_slicing", "vae_tiling")},
        "weights": _weights(pipe),
        "base_allocated": base,
        "measured_peak": phases.overall,
        "max_reserved": torch.cuda.max_memory_reserved(),
        "phase_peaks": phases.peaks,
        "seconds": round(seconds, 2),
        "finite": finite,
        "torch": torch.__version__.split("+")[0],
        "predicted": prediction,
    }
    del output
    return record


def _cpu_peak(fn: Callable[[], Any]) -> int:
    """Return the largest sum of live torch CPU allocations while ``fn`` runs (bytes)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type().name == "CPU"
    )
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


def measure_cpu(pipe: Any, name: str, height: int, width: int, batch: int) -> dict[str, Any]:
    """Return the measured (and predicted) working memory of one tiny call on the CPU."""
    from mps_helpers import plan_of, prepare_pipeline

    prepare_pipeline(pipe, device="cpu", height=height, width=width, batch_size=batch)
    plan = plan_of(pipe)
    prediction = _predict(pipe, height, width, None, batch, plan, "plain")
    kwargs = _call_kwargs(pipe, height, width, None, batch)
    weights = _weights(pipe)
    working = _cpu_peak(lambda: pipe(**kwargs))
    return {
        "model": f"tiny-{name}",
        "height": height,
        "width": width,
        "frames": None,
        "batch": batch,
        "variant": "plain",
        "dtype": str(plan.dtype).removeprefix("torch."),
        "weights": weights,
        # the profiler counts what the call allocates: the weights are there before it
        "measured_peak": sum(weights.values()) + working,
        "predicted": prediction,
    }


# ---------------------------------------------------------------------------------------
# Cells, output


def cuda_cells(models: list[str], sizes: list[int], batches: list[int]) -> list[tuple]:
    cells: list[tuple] = []
    for name in models:
        if name == "wan":
            cells += [("wan", h, w, f, b, "plain") for h, w, f, b in _VIDEO_CELLS]
            continue
        if name == "pixart":
            cells += [("pixart", s, s, None, b, "plain") for s, b in _PIXART_CELLS]
            continue
        cells += [(name, s, s, None, b, "plain") for s in sizes for b in batches]
        cells += [(name, s, s, None, b, v) for s, b, v in _VARIANTS.get(name, ())]
    return cells


def run_cuda(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    records: list[dict[str, Any]] = []
    deadline = time.monotonic() + args.budget
    current: tuple[str, Any] | None = None
    for cell in cuda_cells(args.models, args.sizes, args.batches):
        name, height, width, frames, batch, variant = cell
        if time.monotonic() > deadline:
            records.append({"model": name, "skipped": "time budget", "cell": list(cell)})
            continue
        try:
            if current is None or current[0] != name:
                current = None
                gc.collect()
                torch.cuda.empty_cache()
                started = time.perf_counter()
                current = (name, build(name, "cuda"))
                log.info("built %s in %.1f s", name, time.perf_counter() - started)
            record = measure_cuda(current[1], name, height, width, frames, batch, variant)
        except Exception:
            record = {"model": name, "cell": list(cell), "error": traceback.format_exc(limit=6)}
            torch.cuda.empty_cache()
        log.info("%s", _line(record))
        records.append(record)
        _write(args.out, records)
    return records


def run_tiny(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    torch.set_num_threads(1)
    records = []
    for name in ("sd", "sdxl", "sd3"):
        pipe = tiny(name)
        for size, batch in ((64, 1), (128, 1), (128, 4)):
            record = measure_cpu(pipe, name, size, size, batch)
            log.info("%s", _line(record))
            records.append(record)
    _write(args.out, records)
    return records


def settings_of(record: dict[str, Any]) -> Any:
    """Return the estimate's settings for a measured record (its plan, its SDPA backend)."""
    from packaging.version import Version

    from mps_helpers._memory import Settings

    plan = record.get("plan", {})
    return Settings(
        device="cuda",
        dtype=record["dtype"],
        vae_dtype=record.get("vae_dtype", record["dtype"]),
        attention_slicing=bool(plan.get("attention_slicing")),
        attention_chunk_elements=2**26 if "safe" in record["variant"] else None,
        vae_slicing=bool(plan.get("vae_slicing")),
        vae_tiling=bool(plan.get("vae_tiling")),
        torch_version=Version(record.get("torch", "2.11.0")),
        attention_kernel=False if "math" in record["variant"] else None,
    )


def predict(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add the estimate of each measured record, computed here from the same configs.

    The pipelines are built on the meta device (shapes only), so this runs on any machine:
    the device's measurements and this checkout's estimate meet in one table.
    """
    from mps_helpers._memory import estimate, spec_of_pipeline

    specs: dict[str, Any] = {}
    out = []
    for record in records:
        if "measured_peak" not in record or record["model"].startswith("tiny-"):
            out.append(record)
            continue
        name = record["model"]
        if name not in specs:
            specs[name] = spec_of_pipeline(build(name, "meta"))
        result = estimate(
            specs[name],
            settings_of(record),
            height=record["height"],
            width=record["width"],
            frames=record["frames"],
            batch_size=record["batch"],
        )
        out.append({**record, "predicted": result.to_dict()})
    return out


def _line(record: dict[str, Any]) -> str:
    if "error" in record or "skipped" in record:
        return f"{record.get('model')} {record.get('cell')}: {record.get('error') or 'skipped'}"
    predicted = (record.get("predicted") or {}).get("peak")
    shown = "-" if predicted is None else f"{predicted / GiB:.2f}"
    return (
        f"{record['model']:>8} {record['width']}x{record['height']} f={record['frames']} "
        f"b={record['batch']} {record['variant']:<12} measured {record['measured_peak'] / GiB:6.2f}"
        f" GiB, predicted {shown} GiB; phases "
        + ", ".join(f"{k} {v / GiB:.2f}" for k, v in record.get("phase_peaks", {}).items())
    )


def _write(path: str | None, records: list[dict[str, Any]]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(records, indent=1, default=str), encoding="utf-8")


def _size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def table(records: list[dict[str, Any]]) -> str:
    """Return the Markdown table of predicted against measured peaks."""
    rows = [
        "| model | size | batch | variant | measured | predicted | error | peak phase |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        predicted = r.get("predicted") or {}
        if "measured_peak" not in r or "peak" not in predicted:
            continue
        size = f"{r['width']}x{r['height']}" + (f"x{r['frames']}" if r.get("frames") else "")
        error = predicted["peak"] / r["measured_peak"] - 1
        rows.append(
            f"| {r['model']} | {size} | {r['batch']} | {r['variant']} | "
            f"{_size(r['measured_peak'])} | {_size(predicted['peak'])} | {error:+.1%} | "
            f"{predicted.get('peak_phase', '')} |"
        )
    return "\n".join(rows)


def plot(records: list[dict[str, Any]], path: str) -> None:
    """Save a predicted-against-measured scatter plot (log-log, the 15% band shaded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [
        (r["measured_peak"] / GiB, r["predicted"]["peak"] / GiB, r["model"])
        for r in records
        if "measured_peak" in r and "peak" in (r.get("predicted") or {})
    ]
    if not points:
        raise SystemExit("no record has both a measured and a predicted peak")
    fig, ax = plt.subplots(figsize=(6, 5))
    low = min(min(p[0], p[1]) for p in points) * 0.8
    high = max(max(p[0], p[1]) for p in points) * 1.25
    line = [low, high]
    ax.plot(line, line, color="black", linewidth=0.8, label="predicted = measured")
    ax.fill_between(
        line,
        [x * 0.85 for x in line],
        [x * 1.15 for x in line],
        alpha=0.15,
        color="grey",
        label="within 15%",
    )
    for model in sorted({p[2] for p in points}):
        xs = [p[0] for p in points if p[2] == model]
        ys = [p[1] for p in points if p[2] == model]
        ax.scatter(xs, ys, label=model, s=24)
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    ticks = [t for t in (1, 2, 3, 4, 6, 8, 10, 15, 20, 30, 40, 60, 80) if low <= t <= high]
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(FixedLocator(ticks))
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)
    ax.set_xlabel("measured peak, GiB (torch.cuda.max_memory_allocated)")
    ax.set_ylabel("predicted peak, GiB (estimate_memory)")
    ax.set_title("Peak memory of one call: predicted vs measured")
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=[*_IMAGE_MODELS, "pixart", "wan"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[512, 1024])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for all cells")
    parser.add_argument("--tiny", action="store_true", help="tiny pipelines on the CPU")
    parser.add_argument("--out", help="write the records to this JSON file")
    parser.add_argument("--table", metavar="JSON", help="print the table of a results file")
    parser.add_argument("--plot", metavar="PNG", help="with --table: save the plot here")
    parser.add_argument(
        "--predict", action="store_true", help="with --table: recompute the predictions here"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("mps_helpers").setLevel(logging.WARNING)  # the plans' reasons: not here
    if args.table:
        records = json.loads(Path(args.table).read_text(encoding="utf-8"))
        if args.predict:
            records = predict(records)
        print(table(records))
        if args.plot:
            plot(records, args.plot)
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    records = run_tiny(args) if args.tiny else run_cuda(args)
    print(table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
