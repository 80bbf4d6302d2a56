"""The grid on this CPU: each configuration in a fresh process, for its time and peak RSS.

SD-1.5-sized pipeline, 512 px, 2 steps, 2 prompts (the size that finishes in about twenty
minutes on two cores). First a probe times one UNet forward per dtype at the same size: a
dtype whose forward is more than ``--dominated`` times float32's cannot hold the best cell
(the UNet is most of the call), so only its plain cell (SDPA, batch, no VAE slicing) is run,
for its memory, and its other cells are listed as skipped with the probe's figures. Cells run
most-informative first (``auto``, the naive cell, float32), so a run cut short by
``--budget-min`` loses the least; the JSON file is rewritten after every cell.

Usage::

    python tests/benchmarks/grid_cpu.py                      # ~20 min on 2 idle cores
    python tests/benchmarks/grid_cpu.py --quick              # tiny pipeline, seconds
    python tests/benchmarks/grid_cpu.py --head-to-head auto "bf16 sdpa batch vae-off"
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import _common
import _grid

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["main", "probe_dtypes", "run"]

log = logging.getLogger("bench.cpu")


def _probe_child(spec_text: str) -> int:
    import torch
    from diffusers import UNet2DConditionModel

    spec = json.loads(spec_text)
    dtype = getattr(torch, spec["dtype"])
    unet = UNet2DConditionModel.from_pretrained(Path(spec["model"]) / "unet").to(dtype).eval()
    latent = spec["size"] // 8
    # Classifier-free guidance doubles the batch the UNet sees.
    sample = torch.randn(2 * spec["images"], 4, latent, latent, dtype=dtype)
    text = torch.randn(2 * spec["images"], 77, 768, dtype=dtype)
    with torch.no_grad():
        start = time.perf_counter()
        unet(sample, torch.tensor(500), encoder_hidden_states=text)
        seconds = time.perf_counter() - start
    print(json.dumps({"dtype": spec["dtype"], "forward_s": seconds}))
    return 0


def probe_dtypes(
    model: Path, dtypes: list[str], *, size: int, images: int, dominated: float
) -> dict[str, Any]:
    """Time one UNet forward per dtype (fresh processes); return times and the verdicts.

    A dtype is given ``dominated x`` float32's forward time to finish; past that it is killed
    and counted as dominated.
    """
    results: dict[str, Any] = {}
    limit: float | None = None
    for dtype in ["float32", *(d for d in dtypes if d != "float32")]:
        spec = json.dumps({"dtype": dtype, "model": str(model), "size": size, "images": images})
        command = [sys.executable, str(Path(__file__).resolve()), "--probe-child", spec]
        try:
            done = subprocess.run(
                command,
                capture_output=True,
                text=True,
                check=True,
                # Loading the UNet takes a while too: allow a minute for it beyond the limit.
                timeout=None if limit is None else 60 + limit,
            )
            seconds = json.loads(done.stdout.strip().splitlines()[-1])["forward_s"]
        except subprocess.TimeoutExpired:
            seconds = None
        except subprocess.CalledProcessError as exc:
            results[dtype] = {"error": exc.stderr.strip()[-1000:]}
            continue
        if dtype == "float32":
            limit = dominated * seconds
        ratio = (
            None
            if seconds is None
            else seconds / results.get("float32", {}).get("forward_s", seconds)
        )
        results[dtype] = {
            "forward_s": seconds,
            "vs_float32": ratio,
            "dominated": seconds is None or (ratio is not None and ratio > dominated),
        }
        log.info("probe %s: %s", dtype, results[dtype])
    return results


def _cells(
    dtypes: list[str], probe: dict[str, Any], *, size: int, images: int
) -> tuple[list[_grid.Cell], list[dict[str, Any]]]:
    """Return the cells to run, most informative first, and the skipped ones with reasons.

    Order: ``auto`` and the naive cell; the plain and VAE-sliced batch cells of every other
    dtype the probe kept (the likeliest challengers); the rest of float32, then of the other
    dtypes; diffusers' slicing last (on CPU it lost to SDPA on time and memory, EVIDENCE.md).
    """
    naive = _grid.naive_cell(size, images)
    kept = [d for d in dtypes if d == "float32" or not probe.get(d, {}).get("dominated")]
    everything = {d: _grid.grid_cells(dtypes=[d], size=size, images=images) for d in kept}
    challengers = [
        c
        for d in kept
        if d != "float32"
        for c in everything[d]
        if c.attention == "sdpa" and c.prompts == "batch"
    ]
    ordered = [_grid.Cell(setup="auto", size=size, images=images), naive, *challengers]
    for dtype in ["float32", *(d for d in kept if d != "float32")]:
        ordered += [c for c in everything[dtype] if c.attention != "diffusers" and c not in ordered]
    for dtype in kept:
        ordered += [c for c in everything[dtype] if c.attention == "diffusers"]
    cells = ordered
    skipped: list[dict[str, Any]] = []
    for dtype in dtypes:
        if dtype in kept:
            continue
        verdict = probe.get(dtype, {})
        plain = _grid.Cell(dtype=dtype, size=size, images=images)
        forward = verdict.get("forward_s")
        if forward is not None:
            cells.append(plain)
        reason = (
            f"dominated: one UNet forward in {dtype} took "
            + (
                f"{forward:.1f} s, {verdict['vs_float32']:.1f}x float32's"
                if forward is not None
                else "longer than the probe's limit (1.5x float32's + 60 s)"
            )
            + (" (probe); only its plain cell was run" if forward is not None else " (probe)")
        )
        skipped += [
            {"key": c.key, "cell": c.to_dict(), "skipped": reason}
            for c in _grid.grid_cells(dtypes=[dtype], size=size, images=images)
            if c != plain or forward is None
        ]
    return cells, skipped


def _document(**settings: Any) -> dict[str, Any]:
    """Return a new results document: this machine, the settings (with the thread count)."""
    threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or None
    return {
        "machine": _common.machine_info("cpu"),
        "settings": {**settings, "threads": threads},
        "records": [],
    }


def _keeper(doc: dict[str, Any], out: Path) -> Callable[[dict[str, Any]], None]:
    """Return an ``on_record`` that adds each record, with the load average, and saves."""

    def keep(record: dict[str, Any]) -> None:
        record["loadavg"] = os.getloadavg()[0]
        doc["records"].append(record)
        _common.write_json(out, doc)

    return keep


def run(
    *,
    kind: str,
    size: int,
    steps: int,
    images: int,
    dtypes: list[str],
    isolate: bool,
    dominated: float,
    budget_min: float,
    confirm_rounds: int,
    out: Path,
    models: Path,
    reuse_probe: Path | None = None,
) -> dict[str, Any]:
    """Probe, run the cells, summarise; return the document written to ``out``."""
    deadline = time.monotonic() + 60 * budget_min
    model = _common.save_pipeline(kind, models / kind)
    doc = _document(
        kind=kind,
        size=size,
        steps=steps,
        images=images,
        repeats=1,
        warmup_steps=0,
        isolated=isolate,
        dominated_above=dominated,
    )
    if reuse_probe is not None:
        probe = _common.read_json(reuse_probe)["dtype_probe"]
    elif len(dtypes) > 1 and isolate:
        probe = probe_dtypes(model, dtypes, size=size, images=images, dominated=dominated)
    else:
        probe = {}
    doc["dtype_probe"] = probe
    cells, skipped = _cells(dtypes, probe, size=size, images=images)
    doc["skipped"] = skipped
    _common.write_json(out, doc)

    _grid.run_cells(
        cells,
        model=model,
        device="cpu",
        steps=steps,
        warmup_steps=0,
        repeats=1,
        isolate=isolate,
        on_record=_keeper(doc, out),
        deadline=deadline,
    )
    doc["summary"] = _grid.summarize(doc["records"] + skipped, size=size)
    _common.write_json(out, doc)
    best = doc["summary"].get("best")
    auto = _grid.Cell(setup="auto", size=size, images=images)
    if best and confirm_rounds and best != auto.key:
        best_cell = next(_grid.Cell(**r["cell"]) for r in doc["records"] if r["key"] == best)
        rounds: list[dict[str, Any]] = []
        for i in range(confirm_rounds):
            pair = (best_cell, auto) if i % 2 == 0 else (auto, best_cell)
            got = _grid.run_cells(
                pair,
                model=model,
                device="cpu",
                steps=steps,
                warmup_steps=0,
                repeats=1,
                isolate=isolate,
                deadline=deadline,
            )
            by = {r["key"]: r for r in got}
            if all("s_per_image" in r for r in got):
                rounds.append(
                    {
                        "best_s": by[best]["s_per_image"],
                        "auto_s": by[auto.key]["s_per_image"],
                        "best_peak_gib": by[best]["peak_gib"],
                        "auto_peak_gib": by[auto.key]["peak_gib"],
                    }
                )
        if rounds:
            doc["head_to_head"] = {
                "best": best,
                "rounds": rounds,
                "auto_speed_vs_best": _common.median([r["best_s"] / r["auto_s"] for r in rounds]),
                "auto_peak_vs_best": _common.median(
                    [r["auto_peak_gib"] / r["best_peak_gib"] for r in rounds]
                ),
            }
            _common.write_json(out, doc)
    return doc


def head_to_head(
    labels: list[str],
    *,
    kind: str,
    size: int,
    steps: int,
    images: int,
    rounds: int,
    out: Path,
    models: Path,
) -> dict[str, Any]:
    """Run the named cells in alternating order (A B C, then C B A, ...), each in a fresh
    process, and return the records with each cell's medians against the first cell.

    Alternating cancels a drift in the machine's load between early and late cells; the
    fresh process gives each cell its own peak RSS.
    """
    cells = [_grid.Cell.from_label(label, size=size, images=images) for label in labels]
    model = _common.save_pipeline(kind, models / kind)
    doc = _document(
        kind=kind, size=size, steps=steps, images=images, rounds=rounds, order="alternating"
    )

    for i in range(rounds):
        _grid.run_cells(
            cells if i % 2 == 0 else cells[::-1],
            model=model,
            device="cpu",
            steps=steps,
            warmup_steps=0,
            repeats=1,
            isolate=True,
            on_record=_keeper(doc, out),
        )
    medians: dict[str, dict[str, float]] = {}
    for cell in cells:
        got = [r for r in doc["records"] if r["key"] == cell.key and "s_per_image" in r]
        if got:
            medians[cell.key] = {
                key: _common.median([r[key] for r in got if r.get(key) is not None])
                for key in ("s_per_image", "cpu_s_per_image", "peak_gib")
                if any(r.get(key) is not None for r in got)
            }
    first = medians.get(cells[0].key)
    if first:
        for values in medians.values():
            values["speed_vs_first"] = first["s_per_image"] / values["s_per_image"]
            values["peak_vs_first"] = values["peak_gib"] / first["peak_gib"]
    doc["medians"] = medians
    _common.write_json(out, doc)
    return doc


def report(doc: dict[str, Any]) -> str:
    """Return the run's tables and summary as text."""
    size = doc["settings"]["size"]
    parts = [_grid.table(doc["records"] + doc.get("skipped", []), size=size)]
    if doc.get("dtype_probe"):
        rows = [
            [d, v.get("forward_s"), v.get("vs_float32"), v.get("dominated")]
            for d, v in doc["dtype_probe"].items()
        ]
        parts.append(_common.md_table(["dtype", "UNet forward s", "x float32", "dominated"], rows))
    parts.append(json.dumps(doc.get("summary", {}), indent=1))
    if "head_to_head" in doc:
        parts.append(json.dumps(doc["head_to_head"], indent=1))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run, print the report."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny pipeline, in this process")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", default=None, help="default: all (quick: float32)")
    parser.add_argument("--dominated", type=float, default=1.5)
    parser.add_argument("--budget-min", type=float, default=30.0)
    parser.add_argument("--confirm-rounds", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--models", type=Path, default=_common.RESULTS / "models")
    parser.add_argument("--reuse-probe", type=Path, help="a grid JSON whose dtype probe to reuse")
    parser.add_argument(
        "--head-to-head",
        nargs="+",
        metavar="LABEL",
        help="only these cells ('auto', 'bf16 sdpa batch vae-off', ...), in alternating order",
    )
    parser.add_argument("--rounds", type=int, default=2, help="head-to-head rounds")
    parser.add_argument("--probe-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe_child:
        return _probe_child(args.probe_child)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # The plan logs every decision at INFO: the JSON keeps the plan, the console needs less.
    logging.getLogger("mps_helpers").setLevel(logging.WARNING)
    quick = args.quick
    if args.head_to_head:
        doc = head_to_head(
            args.head_to_head,
            kind="tiny" if quick else "sd15",
            size=args.size or (64 if quick else 512),
            steps=args.steps,
            images=args.images,
            rounds=args.rounds,
            out=args.out or _common.RESULTS / "grid-cpu-h2h.json",
            models=args.models,
        )
        print(_grid.table(doc["records"], size=doc["settings"]["size"]))
        print(json.dumps(doc["medians"], indent=1))
        return 0
    doc = run(
        kind="tiny" if quick else "sd15",
        size=args.size or (64 if quick else 512),
        steps=args.steps,
        images=args.images,
        dtypes=args.dtypes or (["float32"] if quick else list(_grid.DTYPES)),
        isolate=not quick,
        dominated=args.dominated,
        budget_min=args.budget_min,
        confirm_rounds=(0 if quick else 2) if args.confirm_rounds is None else args.confirm_rounds,
        out=args.out or _common.RESULTS / ("grid-cpu-quick.json" if quick else "grid-cpu.json"),
        models=args.models,
        reuse_probe=args.reuse_probe,
    )
    print(report(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
