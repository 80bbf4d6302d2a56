"""The accelerator benchmark, in one process run: library cost, the grid, attention, first call.

Written for one call on a CUDA machine (an H100 here); on a Mac, ``run_all.py`` runs it with
``--device mps`` and smaller settings. Parts (``--parts``, all by default):

- ``library``: :mod:`library_cost` on this device (tiny pipeline);
- ``grid``: SD-1.5-sized pipeline, 512 px, 20 steps, 4 prompts: every hand-set combination of
  dtype x attention x prompts (batch, loop) x VAE slicing, plus the ``auto`` plan; then
  1024 px single images in float16 with each attention and VAE slicing off/on, plus ``auto``;
  then the best hand-set cell and ``auto`` again, in turn, for a head-to-head ratio;
- ``attention``: an SD-1.5-sized UNet forward, batch 2 (classifier-free guidance), float16,
  at 512, 768 and 1024 px for each attention processor: time and peak memory over the weights;
- ``firstcall``: the first and later calls in fresh processes: the raw pipeline in float16,
  ``auto``, and ``auto`` with ``warmup=True``.

Each part writes its JSON file under ``--out`` as soon as each measurement exists, so a run
cut short keeps what it measured. Usage (on the device machine)::

    python tests/benchmarks/grid_cuda.py --out "$OUT" --budget-s 540
    python tests/benchmarks/grid_cuda.py --device cpu --quick      # the code path, in seconds
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import _common
import _grid
import library_cost

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "attention_part",
    "confirm_summary",
    "firstcall_part",
    "grid_part",
    "library_part",
    "main",
]

log = logging.getLogger("bench.accelerator")

PARTS = ("library", "grid", "confirm", "attention", "firstcall")
PROCESSORS = ("sdpa", "sliced-auto", "sliced-max", "classic", "safe")

# A UNet of SD 1.5's block layout at toy widths, for --quick runs of the attention part.
QUICK_UNET: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}


class Settings:
    """The sizes of one run: full (an H100's) or quick (seconds on a CPU)."""

    def __init__(self, *, quick: bool, device: str) -> None:
        self.quick = quick
        self.device = device
        self.kind = "tiny" if quick else "sd15"
        self.size = 64 if quick else 512
        self.big: int | None = 128 if quick else 1024
        self.steps = 2 if quick else 20
        self.warmup_steps = 1 if quick else 2
        self.repeats = 2 if quick else 3
        self.images = 2 if quick else 4
        self.confirm_rounds = 2 if quick else 5
        self.dtypes: tuple[str, ...] = ("float32", "bfloat16") if quick else _grid.DTYPES
        self.latents = (8, 16) if quick else (64, 96, 128)
        if device == "mps" and not quick:
            # A 16 GB Mac: 10 steps, 2 prompts, one timed run; bf16 needs macOS 14. 1024 px
            # (and its 16 GiB classic-attention forward) only with 32 GB or more.
            self.steps, self.images, self.repeats, self.confirm_rounds = 10, 2, 1, 2
            self.dtypes = ("float32", "float16")
            import psutil

            if psutil.virtual_memory().total < 32 * 2**30:
                self.big = None
                self.latents = (64, 96)
        self.forwards = 2 if quick else 5

    def to_dict(self) -> dict[str, Any]:
        """Return the settings for the JSON record."""
        return dict(vars(self))


def library_part(settings: Settings, out: Path) -> dict[str, Any]:
    """Run :mod:`library_cost` on the device; write ``library-<device>.json``."""
    results = library_cost.run(settings.device, quick=settings.quick)
    _common.write_json(out / f"library-{settings.device}.json", results)
    print(library_cost.table(results), flush=True)
    return results


def _order(cells: list[_grid.Cell], big: list[_grid.Cell]) -> list[_grid.Cell]:
    """Return float16 (the likely winners), ``auto``, the big images, then the other dtypes.

    A run cut short by its time budget then loses the least informative cells.
    """
    rank = {"float16": 0, "float32": 3, "bfloat16": 4}
    first = sorted(cells, key=lambda c: 1 if c.setup == "auto" else rank[c.dtype])
    head = [c for c in first if c.setup == "auto" or rank[c.dtype] < 1]
    return head + big + [c for c in first if c not in head]


def grid_part(settings: Settings, out: Path, model: Path, deadline: float) -> dict[str, Any]:
    """Run the 512 px grid, the 1024 px cells and the head-to-head; write ``grid-<device>.json``."""
    s = settings
    cells = _grid.grid_cells(dtypes=s.dtypes, size=s.size, images=s.images)
    cells.append(_grid.Cell(setup="auto", size=s.size, images=s.images))
    big_dtype = "float16" if "float16" in s.dtypes else s.dtypes[-1]
    big = [
        _grid.Cell(dtype=big_dtype, attention=a, vae_slicing=v, size=s.big, images=1)
        for a in _grid.ATTENTIONS
        for v in (False, True)
        if s.big is not None
    ]
    if s.big is not None:
        big.append(_grid.Cell(setup="auto", size=s.big, images=1))
    sizes = [size for size in (s.size, s.big) if size is not None]
    path = out / f"grid-{s.device}.json"
    doc: dict[str, Any] = {
        "machine": _common.machine_info(s.device),
        "settings": s.to_dict(),
        "records": [],
    }

    def keep(record: dict[str, Any]) -> None:
        doc["records"].append(record)
        _common.write_json(path, doc)

    options = {
        "model": model,
        "device": s.device,
        "steps": s.steps,
        "warmup_steps": s.warmup_steps,
        "repeats": s.repeats,
        "isolate": False,
        "on_record": keep,
        "deadline": deadline,
    }
    _grid.run_cells(_order(cells, big), **options)
    doc["summary"] = {str(size): _grid.summarize(doc["records"], size=size) for size in sizes}
    _common.write_json(path, doc)
    best = doc["summary"][str(s.size)].get("best")
    if best and time.monotonic() < deadline:
        best_cell = next(_grid.Cell(**r["cell"]) for r in doc["records"] if r["key"] == best)
        doc["head_to_head"] = head_to_head(
            best_cell,
            _grid.Cell(setup="auto", size=s.size, images=s.images),
            model=model,
            settings=s,
        )
        _common.write_json(path, doc)
    for size in sizes:
        print(f"\n### {s.device}, {size} px\n", flush=True)
        print(_grid.table(doc["records"], size=size), flush=True)
        print(json.dumps(doc["summary"][str(size)], indent=1), flush=True)
    if "head_to_head" in doc:
        print(json.dumps(doc["head_to_head"], indent=1), flush=True)
    return doc


def head_to_head(
    best: _grid.Cell, auto: _grid.Cell, *, model: Path, settings: Settings
) -> dict[str, Any]:
    """Time the best hand-set cell and ``auto`` in turn; return the median time ratio."""
    s = settings
    pipes = {"best": _common.load_pipeline(model), "auto": _common.load_pipeline(model)}
    _grid._set_up_manual(pipes["best"], best, s.device)
    _grid._set_up_auto(pipes["auto"])
    runs = {
        "best": _grid.make_call(pipes["best"], best),
        "auto": _grid.make_call(pipes["auto"], auto),
    }
    for run in runs.values():
        run(s.warmup_steps)
    times: dict[str, list[float]] = {"best": [], "auto": []}
    for i in range(s.confirm_rounds):
        for name in ("best", "auto") if i % 2 == 0 else ("auto", "best"):
            seconds, _ = _common.timed(lambda name=name: runs[name](s.steps), s.device)
            times[name].append(seconds)
    pipes.clear()
    _common.empty_cache(s.device)
    ratios = [b / a for a, b in zip(times["auto"], times["best"], strict=True)]
    return {
        "best": best.key,
        "rounds": s.confirm_rounds,
        "best_s": times["best"],
        "auto_s": times["auto"],
        "auto_speed_vs_best": _common.median(ratios),
    }


def _allocated(device: str) -> int:
    import torch

    if device == "cuda":
        return int(torch.cuda.memory_allocated())
    if device == "mps":
        return int(torch.mps.current_allocated_memory())
    return 0


def confirm_cells(
    settings: Settings,
    records: list[dict[str, Any]] | None = None,
    extra: Sequence[str] = (),
) -> list[_grid.Cell]:
    """Return the head-to-head's contenders: ``auto`` and the grid's three fastest cells.

    Without grid records (the grid not run here), the usual leaders on CUDA: float16 and
    bfloat16 with SDPA in a batch, with and without VAE slicing, and the safe processor.
    ``extra`` adds cells by label (``fp16 sdpa batch vae-off``) at the main size.
    """
    s = settings
    sizes = [size for size in (s.size, s.big) if size is not None]
    cells: list[_grid.Cell] = []
    for size in sizes:
        images = s.images if size == s.size else 1
        cells.append(_grid.Cell(setup="auto", size=size, images=images))
        ranked = sorted(
            (
                r
                for r in records or []
                if r["cell"]["size"] == size and r["cell"]["setup"] == "manual" and r.get("finite")
            ),
            key=lambda r: r["s_per_image"],
        )
        if ranked:
            cells += [_grid.Cell(**r["cell"]) for r in ranked[: 3 if size == s.size else 1]]
            continue
        dtypes = [d for d in ("float16", "bfloat16") if d in s.dtypes] or list(s.dtypes)
        if size != s.size:
            cells.append(_grid.Cell(dtype=dtypes[0], vae_slicing=True, size=size, images=1))
            continue
        cells += [
            _grid.Cell(dtype=d, attention=a, vae_slicing=v, size=size, images=images)
            for d in dtypes
            for a, v in (("sdpa", True), ("sdpa", False), ("safe", False))
        ]
    for label in extra:
        cell = _grid.Cell.from_label(label, size=s.size, images=s.images)
        if cell not in cells:
            cells.append(cell)
    return cells


def confirm_part(
    settings: Settings,
    out: Path,
    model: Path,
    deadline: float,
    *,
    rounds: int = 8,
    records: list[dict[str, Any]] | None = None,
    extra: Sequence[str] = (),
) -> dict[str, Any]:
    """Time ``auto`` and the leading cells in turn, all loaded at once; write the JSON file.

    The grid measures each cell in a block of its own, so slow drift (clocks, the host's
    load) lands on some cells and not others; here every round runs each contender once, in
    a rotated order, and the figures are medians over rounds. Peak memory per run is the
    pipeline's resident size plus the peak allocated above the start of that run.
    """
    s = settings
    path = out / f"confirm-{s.device}.json"
    doc: dict[str, Any] = {
        "machine": _common.machine_info(s.device),
        "settings": s.to_dict(),
        "rounds": rounds,
        "contenders": [],
    }
    entries: list[dict[str, Any]] = []
    for cell in confirm_cells(s, records, extra):
        before = _allocated(s.device)
        pipe = _common.load_pipeline(model)
        plan = None
        if cell.setup == "auto":
            plan = _grid._set_up_auto(pipe)
        else:
            _grid._set_up_manual(pipe, cell, s.device)
        _common.sync(s.device)
        run = _grid.make_call(pipe, cell)
        run(s.warmup_steps)
        entries.append(
            {
                "cell": cell,
                "pipe": pipe,
                "run": run,
                "resident": _allocated(s.device) - before,
                "plan": plan,
                "seconds": [],
                "peak_gib": [],
            }
        )
    for i in range(rounds):
        if time.monotonic() > deadline:
            break
        shift = i % len(entries)
        for entry in entries[shift:] + entries[:shift]:
            with _common.peak_memory(s.device) as memory:
                seconds, _ = _common.timed(lambda entry=entry: entry["run"](s.steps), s.device)
            entry["seconds"].append(seconds)
            entry["peak_gib"].append(
                memory["peak_gib"] - memory["base_gib"] + entry["resident"] / 2**30
            )
    for entry in entries:
        cell = entry["cell"]
        done = bool(entry["seconds"])
        doc["contenders"].append(
            {
                "key": cell.key,
                "cell": cell.to_dict(),
                "plan": entry["plan"],
                "seconds": entry["seconds"],
                "s_per_image": _common.median(entry["seconds"]) / cell.images if done else None,
                "peak_gib": _common.median(entry["peak_gib"]) if done else None,
            }
        )
    entries.clear()
    _common.empty_cache(s.device)
    doc["summary"] = confirm_summary(doc["contenders"], [s.size, s.big])
    _common.write_json(path, doc)
    rows = [
        [c["key"], c["s_per_image"], c["peak_gib"], c.get("auto_speed_vs"), len(c["seconds"])]
        for c in doc["contenders"]
    ]
    print(_common.md_table(["contender", "s/image", "peak GiB", "auto speed vs", "rounds"], rows))
    print(json.dumps(doc["summary"], indent=1), flush=True)
    return doc


def confirm_summary(
    contenders: list[dict[str, Any]], sizes: Sequence[int | None]
) -> dict[str, Any]:
    """Return, per size, how ``auto`` compares with the hand-set cell it trails most.

    The rounds are paired: each contender ran once per round, so slow spells on a shared
    host land on all of them alike. ``auto_speed_vs`` (added to each hand-set contender) is
    the median over rounds of the contender's time over ``auto``'s in the same round: below
    1 the contender is faster. The ratio of the plain medians is kept alongside.
    """
    summary: dict[str, Any] = {}
    for size in sizes:
        mine = [c for c in contenders if c["cell"]["size"] == size and c["s_per_image"]]
        auto = next((c for c in mine if c["cell"]["setup"] == "auto"), None)
        hand = [c for c in mine if c["cell"]["setup"] != "auto"]
        if auto is None or not hand:
            continue
        for c in hand:
            pairs = zip(c["seconds"], auto["seconds"], strict=False)
            c["auto_speed_vs"] = _common.median([theirs / ours for theirs, ours in pairs])
        best = min(hand, key=lambda c: c["auto_speed_vs"])
        fastest = min(hand, key=lambda c: c["s_per_image"])
        summary[str(size)] = {
            "best": best["key"],
            "auto_plan": _grid._plan_brief(auto["plan"] or {}),
            "auto_speed_vs_best": best["auto_speed_vs"],
            "auto_peak_vs_best": auto["peak_gib"] / best["peak_gib"],
            "fastest_by_median": fastest["key"],
            "auto_speed_vs_fastest_by_medians": fastest["s_per_image"] / auto["s_per_image"],
        }
    return summary


def attention_part(settings: Settings, out: Path, deadline: float) -> dict[str, Any]:
    """Time one UNet forward per attention processor and size; write ``attention-<device>.json``."""
    import torch
    from attention_memory import SD15_UNET, _install
    from diffusers import UNet2DConditionModel

    s = settings
    dtype = torch.float32 if s.device == "cpu" else torch.float16
    path = out / f"attention-{s.device}.json"
    doc: dict[str, Any] = {
        "machine": _common.machine_info(s.device),
        "dtype": str(dtype).removeprefix("torch."),
        "batch": 2,
        "unet": "quick" if s.quick else "sd15",
        "runs": [],
    }
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(QUICK_UNET if s.quick else SD15_UNET))
    unet = unet.to(s.device, dtype).eval()
    timestep = torch.tensor(500, device=s.device)
    text = torch.randn(2, 77, 768, device=s.device, dtype=dtype)
    for latent in s.latents:
        sample = torch.randn(2, 4, latent, latent, device=s.device, dtype=dtype)
        for name in PROCESSORS:
            if time.monotonic() > deadline:
                doc["runs"].append({"processor": name, "latent": latent, "skipped": "time"})
                continue
            _install(unet, name)
            record: dict[str, Any] = {"processor": name, "latent": latent, "px": latent * 8}
            try:
                with torch.no_grad():
                    unet(sample, timestep, encoder_hidden_states=text)
                    _common.empty_cache(s.device)
                    seconds = []
                    with _common.peak_memory(s.device) as memory:
                        for _ in range(s.forwards):
                            elapsed, result = _common.timed(
                                lambda sample=sample: unet(
                                    sample, timestep, encoder_hidden_states=text
                                ),
                                s.device,
                            )
                            seconds.append(elapsed)
                record["seconds"] = _common.median(seconds)
                record["extra_gib"] = memory["peak_gib"] - memory["base_gib"]
                record["finite"] = bool(torch.isfinite(result.sample).all())
                del result
            except Exception as exc:
                record["error"] = repr(exc)[-500:]
            _common.empty_cache(s.device)
            doc["runs"].append(record)
            log.info("attention %s", record)
            _common.write_json(path, doc)
    print(attention_table(doc), flush=True)
    return doc


def attention_table(doc: dict[str, Any]) -> str:
    """Return the attention runs as a Markdown table with ratios to SDPA at each size."""
    base = {r["latent"]: r for r in doc["runs"] if r["processor"] == "sdpa" and "seconds" in r}
    rows = []
    for r in doc["runs"]:
        if "seconds" not in r:
            rows.append([f"{r['latent'] * 8} px", r["processor"], "-", "-", "-", "-"])
            continue
        b = base.get(r["latent"])
        rows.append(
            [
                f"{r['latent'] * 8} px",
                r["processor"],
                f"{r['seconds'] * 1000:.1f}",
                f"{r['seconds'] / b['seconds']:.2f}" if b else "-",
                f"{r['extra_gib']:.2f}",
                "yes" if r["finite"] else "NO",
            ]
        )
    return _common.md_table(
        ["image", "attention", "forward ms", "x SDPA", "peak over weights GiB", "finite"], rows
    )


_FIRSTCALL_MODES = ("raw-fp16", "auto", "auto-warmup")


def _firstcall_child(spec_text: str) -> int:
    start = time.perf_counter()
    spec = json.loads(spec_text)
    import torch

    from mps_helpers import prepare_pipeline

    imported = time.perf_counter()
    pipe = _common.load_pipeline(Path(spec["model"]))
    loaded = time.perf_counter()
    mode = spec["mode"]
    if mode == "raw-fp16":
        pipe.to(spec["device"], torch.float16)
        cell = _grid.Cell(dtype="float16", size=spec["size"], images=spec["images"])
    else:
        prepare_pipeline(pipe, warmup=mode == "auto-warmup")
        cell = _grid.Cell(setup="auto", size=spec["size"], images=spec["images"])
    _common.sync(spec["device"])
    prepared = time.perf_counter()
    run = _grid.make_call(pipe, cell)
    calls = [_common.timed(lambda: run(spec["steps"]), spec["device"])[0] for _ in range(3)]
    print(
        json.dumps(
            {
                "mode": mode,
                "import_s": imported - start,
                "load_s": loaded - imported,
                "to_device_or_prepare_s": prepared - loaded,
                "calls_s": calls,
                "first_call_penalty_s": calls[0] - min(calls[1:]),
                "time_to_first_images_s": prepared - start + calls[0],
            }
        )
    )
    return 0


def firstcall_part(settings: Settings, out: Path, model: Path, deadline: float) -> dict[str, Any]:
    """Run each first-call mode in a fresh process; write ``firstcall-<device>.json``."""
    s = settings
    path = out / f"firstcall-{s.device}.json"
    doc: dict[str, Any] = {
        "machine": _common.machine_info(s.device),
        "size": s.size,
        "images": s.images,
        "steps": s.steps,
        "runs": [],
    }
    for mode in _FIRSTCALL_MODES:
        if time.monotonic() > deadline:
            doc["runs"].append({"mode": mode, "skipped": "time"})
            continue
        spec = {
            "mode": mode,
            "model": str(model),
            "device": s.device,
            "size": s.size,
            "images": s.images,
            "steps": s.steps,
        }
        done = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--firstcall-child", json.dumps(spec)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode == 0:
            record = json.loads(done.stdout.strip().splitlines()[-1])
        else:
            record = {"mode": mode, "error": done.stderr.strip()[-2000:]}
        log.info("first call %s", record)
        doc["runs"].append(record)
        _common.write_json(path, doc)
    print(firstcall_table(doc), flush=True)
    return doc


def firstcall_table(doc: dict[str, Any]) -> str:
    """Return the first-call runs as a Markdown table."""
    rows = []
    for r in doc["runs"]:
        if "calls_s" not in r:
            rows.append([r["mode"], "-", "-", "-", "-", r.get("skipped") or "error"])
            continue
        rows.append(
            [
                r["mode"],
                f"{r['to_device_or_prepare_s']:.2f}",
                f"{r['calls_s'][0]:.2f}",
                f"{min(r['calls_s'][1:]):.2f}",
                f"{r['first_call_penalty_s']:.2f}",
                f"{r['time_to_first_images_s']:.1f}",
            ]
        )
    return _common.md_table(
        [
            "mode",
            "to device / prepare s",
            "first call s",
            "later call s",
            "penalty s",
            "to first images s",
        ],
        rows,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the chosen parts within the time budget."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "mps", "cpu"), default=None)
    parser.add_argument("--quick", action="store_true", help="tiny pipeline, seconds")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--out", type=Path, default=_common.RESULTS)
    parser.add_argument("--models", type=Path, default=None, help="where to save the pipeline")
    parser.add_argument("--budget-s", type=float, default=3600.0, help="stop starting new work")
    parser.add_argument("--grid-budget-s", type=float, default=None, help="for the grid part")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per grid cell")
    parser.add_argument("--rounds", type=int, default=8, help="rounds of the head-to-head")
    parser.add_argument(
        "--cells",
        nargs="+",
        default=[],
        metavar="LABEL",
        help="more head-to-head contenders, e.g. 'fp16 sdpa batch vae-off'",
    )
    parser.add_argument("--firstcall-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.firstcall_child:
        return _firstcall_child(args.firstcall_child)
    for label in args.cells:
        try:
            _grid.Cell.from_label(label, size=1, images=1)
        except ValueError as error:
            parser.error(str(error))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # The plan logs every decision at INFO: the JSON keeps the plan, the console needs less.
    logging.getLogger("mps_helpers").setLevel(logging.WARNING)
    deadline = time.monotonic() + args.budget_s
    device = args.device or _common.detect_device()
    settings = Settings(quick=args.quick, device=device)
    if args.repeats:
        settings.repeats = args.repeats
    grid_deadline = min(deadline, time.monotonic() + (args.grid_budget_s or args.budget_s))
    args.out.mkdir(parents=True, exist_ok=True)
    models = args.models or _common.RESULTS / "models"
    model = None
    if {"grid", "confirm", "firstcall"} & set(args.parts):
        model = _common.save_pipeline(settings.kind, models / settings.kind)
    # The grid first: it carries the headline ratios; the library cost last (it is measured
    # on the CPU too, and needs about a minute and a half).
    records = None
    if "grid" in args.parts and model is not None:
        records = grid_part(settings, args.out, model, grid_deadline)["records"]
    elif (args.out / f"grid-{device}.json").exists():
        records = _common.read_json(args.out / f"grid-{device}.json")["records"]
    if "confirm" in args.parts and model is not None:
        confirm_part(
            settings,
            args.out,
            model,
            deadline,
            rounds=args.rounds,
            records=records,
            extra=args.cells,
        )
    if "attention" in args.parts:
        attention_part(settings, args.out, deadline)
    if "firstcall" in args.parts and model is not None:
        firstcall_part(settings, args.out, model, deadline)
    if "library" in args.parts:
        if time.monotonic() + 90 < deadline:
            library_part(settings, args.out)
        else:
            log.warning("library part skipped: less than 90 s of the time budget left")
    return 0


if __name__ == "__main__":
    sys.exit(main())
