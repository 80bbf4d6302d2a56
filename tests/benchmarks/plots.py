"""Plot the benchmark results: time per image and peak memory per configuration, auto marked.

Reads the JSON files that the other scripts write (``grid-<device>.json``,
``attention-<device>.json``, the head-to-heads ``confirm-<device>.json`` and
``grid-cpu-h2h.json``) from ``--results`` and writes small PNG files to ``--out``.
matplotlib is a benchmark-only dependency (the ``bench`` extra); the Agg backend needs no
display. Usage::

    python tests/benchmarks/plots.py --results bench-results --out bench-results/plots
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import _common

__all__ = [
    "attention_figure",
    "grid_figure",
    "head_to_head_figure",
    "head_to_head_rows",
    "main",
    "plot_all",
]

log = logging.getLogger("bench.plots")

AUTO = "#d62728"  # the auto plan: red, everywhere
NAMED = "#ff7f0e"  # naive and source-rules cells
OTHER = "#7f7f7f"
BEST = "#2ca02c"
AUTO_NOW = "#9467bd"  # the cell a changed plan now picks
DPI = 80


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid_rows(doc: dict[str, Any], size: int) -> list[dict[str, Any]]:
    rows = [
        r
        for r in doc["records"]
        if r["cell"]["size"] == size and "s_per_image" in r and r.get("finite", True)
    ]
    return sorted(rows, key=lambda r: r["s_per_image"])


def grid_figure(doc: dict[str, Any], size: int, path: Path, *, title: str) -> Path | None:
    """Draw seconds per image and peak memory per configuration at ``size``; return the file."""
    import _grid

    rows = _grid_rows(doc, size)
    if not rows:
        return None
    images = rows[0]["cell"]["images"]
    naive = _grid.naive_cell(size, images).key
    source = _grid.source_cell(size, images).key
    best = _first_manual(rows)
    # A plan changed after a run: the cell that the new plan's setup equals, marked too.
    now = doc.get("auto_after_change", {}).get(str(size))
    labels, colours = [], []
    for r in rows:
        label = r["key"].rsplit(" ", 1)[0]
        if r["key"] == now:
            label = "= AUTO after the plan change: " + label
            colours.append(AUTO_NOW)
        elif r["key"] == naive:
            label += "  [naive]"
        elif r["key"] == source:
            label += "  [source rules]"
        if r["key"] == now:
            pass
        elif r["cell"]["setup"] == "auto":
            before = "AUTO before the change: " if now else "AUTO: "
            label = before + _plan_label(r.get("plan"))
            colours.append(AUTO)
        elif r is best:
            colours.append(BEST)
        elif r["key"] in (naive, source):
            colours.append(NAMED)
        else:
            colours.append(OTHER)
        labels.append(label)
    from matplotlib.patches import Patch

    legend = [
        Patch(color=AUTO, label="auto plan (prepare_pipeline defaults)"),
        Patch(color=BEST, label="fastest hand-set cell"),
        Patch(color=NAMED, label="naive / source rules"),
    ]
    if now:
        legend.insert(1, Patch(color=AUTO_NOW, label="the setup the changed plan picks"))
    return _bars(rows, labels, colours, legend, path, title=title)


def _bars(
    rows: list[dict[str, Any]],
    labels: list[str],
    colours: list[str],
    legend: list[Any],
    path: Path,
    *,
    title: str,
    time_label: str = "seconds per image (lower is better)",
    time_key: str = "s_per_image",
    time_reference: float | None = None,
) -> Path:
    """Draw two bar charts side by side, time and peak memory, one bar per row; save.

    ``time_reference`` draws a vertical line at that time (1.0 for times relative to auto).
    """
    plt = _pyplot()
    height = max(2.5, 0.22 * len(rows) + 1.2)
    fig, (ax_t, ax_m) = plt.subplots(
        1, 2, figsize=(10, height), sharey=True, gridspec_kw={"width_ratios": [1.3, 1]}
    )
    y = list(range(len(rows)))
    ax_t.barh(y, [r[time_key] for r in rows], color=colours)
    if time_reference is not None:
        ax_t.axvline(time_reference, color="black", linewidth=0.6)
    ax_m.barh(y, [r["peak_gib"] for r in rows], color=colours)
    ax_t.set_yticks(y, labels, fontsize=7)
    ax_t.invert_yaxis()
    ax_t.set_xlabel(time_label, fontsize=8)
    ax_m.set_xlabel("peak memory, GiB (lower is better)", fontsize=8)
    for ax in (ax_t, ax_m):
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    for tick, colour in zip(ax_t.get_yticklabels(), colours, strict=True):
        if colour in (AUTO, AUTO_NOW):
            tick.set_color(colour)
            tick.set_fontweight("bold")
    fig.legend(handles=legend, fontsize=7, loc="lower center", ncol=len(legend), frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.5 / height, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def head_to_head_rows(doc: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    """Return a head-to-head run's contenders per image size, fastest relative to auto first.

    Reads both formats: ``grid_cuda.py --parts confirm`` (``contenders``, with the paired
    ``auto_speed_vs``: the median over rounds of a contender's time over auto's) and
    ``grid_cpu.py --head-to-head`` (``medians`` by cell key). Each row gains
    ``time_vs_auto``: the paired figure where there is one, else the ratio of medians.
    """
    if "contenders" in doc:
        items = [dict(c) for c in doc["contenders"] if c.get("s_per_image")]
    else:
        records = {r["key"]: r for r in doc.get("records", [])}
        items = [
            {"key": key, "cell": records[key]["cell"], "plan": records[key].get("plan"), **m}
            for key, m in doc.get("medians", {}).items()
            if key in records
        ]
    by_size: dict[int, list[dict[str, Any]]] = {}
    for item in items:
        by_size.setdefault(item["cell"]["size"], []).append(item)
    result = {}
    for size, rows in sorted(by_size.items()):
        auto = next((r for r in rows if r["cell"]["setup"] == "auto"), None)
        if auto is None:
            continue
        for r in rows:
            paired = r.get("auto_speed_vs")
            r["time_vs_auto"] = paired or r["s_per_image"] / auto["s_per_image"]
        result[size] = sorted(rows, key=lambda r: r["time_vs_auto"])
    return result


def head_to_head_figure(rows: list[dict[str, Any]], path: Path, *, title: str) -> Path | None:
    """Draw a head-to-head's contenders against auto (red); the fastest other in green."""
    if not rows:
        return None
    best = _first_manual(rows)
    labels, colours = [], []
    for r in rows:
        if r["cell"]["setup"] == "auto":
            labels.append("AUTO: " + _plan_label(r.get("plan")))
            colours.append(AUTO)
        else:
            labels.append(r["key"].rsplit(" ", 1)[0])
            colours.append(BEST if r is best else OTHER)
    from matplotlib.patches import Patch

    legend = [
        Patch(color=AUTO, label="auto plan (prepare_pipeline defaults)"),
        Patch(color=BEST, label="fastest hand-set contender"),
    ]
    paired = any("auto_speed_vs" in r for r in rows)
    how = "median of per-round ratios" if paired else "ratio of medians"
    return _bars(
        rows,
        labels,
        colours,
        legend,
        path,
        title=title,
        time_label=f"time per image / auto's ({how}; under 1 is faster)",
        time_key="time_vs_auto",
        time_reference=1.0,
    )


def _plan_label(plan: dict[str, Any] | None) -> str:
    import _grid

    return str(_grid._plan_brief(plan or {})).replace("vae-slicing ", "vae ")


def _first_manual(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((r for r in rows if r["cell"]["setup"] != "auto"), None)


def _attention_runs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Return (px, processor, seconds, extra GiB) rows from either attention JSON format."""
    if "summary" in doc and doc["summary"] and "seconds_median" in doc["summary"][0]:
        # attention_memory.py (CPU): medians over repeats, extra RSS in MB. Its CPU seconds
        # (process time) are steadier than wall time on a shared machine: preferred.
        return [
            {
                "px": r["image_px"],
                "processor": r["processor"],
                "seconds": r.get("cpu_seconds_median") or r["seconds_median"],
                "extra_gib": r.get("extra_mb_median", r.get("extra_rss_mb_median", 0.0)) / 1024,
            }
            for r in doc["summary"]
        ]
    return [
        {
            "px": r["px"],
            "processor": r["processor"],
            "seconds": r["seconds"],
            "extra_gib": r["extra_gib"],
        }
        for r in doc["runs"]
        if "seconds" in r
    ]


def attention_figure(doc: dict[str, Any], path: Path, *, title: str) -> Path | None:
    """Draw forward time and memory over the weights per processor, grouped by image size."""
    runs = _attention_runs(doc)
    if not runs:
        return None
    plt = _pyplot()
    sizes = sorted({r["px"] for r in runs})
    processors = list(dict.fromkeys(r["processor"] for r in runs))
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 3.2))
    width = 0.8 / len(processors)
    palette = plt.get_cmap("tab10")
    for i, name in enumerate(processors):
        xs, ts, ms = [], [], []
        for j, px in enumerate(sizes):
            mine = [r for r in runs if r["px"] == px and r["processor"] == name]
            base = [r for r in runs if r["px"] == px and r["processor"] == "sdpa"]
            if not mine:
                continue
            xs.append(j + (i - (len(processors) - 1) / 2) * width)
            ts.append(mine[0]["seconds"] / base[0]["seconds"] if base else mine[0]["seconds"])
            ms.append(mine[0]["extra_gib"])
        # The library's own processor in the auto colour (its chunk-size variants hatched);
        # the others from tab10 without its red.
        ours = name.startswith("safe")
        colour = AUTO if ours else palette([0, 1, 2, 4, 5, 6, 8, 9][i % 8])
        style = {"color": colour, "alpha": 1.0 if name == "safe" else 0.8}
        if ours and name != "safe":
            style.update(hatch="//", edgecolor="white", alpha=0.55)
        ax_t.bar(xs, ts, width, label=name, **style)
        ax_m.bar(xs, ms, width, label=name, **style)
    for ax in (ax_t, ax_m):
        ax.set_xticks(range(len(sizes)), [f"{px} px" for px in sizes], fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    ax_t.axhline(1.0, color="black", linewidth=0.6)
    ax_t.set_ylabel("forward time / SDPA's", fontsize=8)
    ax_m.set_ylabel("peak memory over weights, GiB", fontsize=8)
    ax_m.set_yscale("log")
    from matplotlib.ticker import ScalarFormatter

    ax_m.yaxis.set_major_formatter(ScalarFormatter())
    ax_m.yaxis.set_minor_formatter(ScalarFormatter())
    ax_m.tick_params(axis="y", which="minor", labelsize=6)
    ax_t.legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _where(machine: dict[str, Any]) -> str:
    device = machine.get("gpu") or machine.get("cpu") or machine.get("device")
    date = (machine.get("date") or "")[:10]
    return ", ".join(str(x) for x in (device, f"torch {machine.get('torch')}", date) if x)


def plot_all(results: Path, out: Path) -> list[Path]:
    """Plot every result file found in ``results``; return the PNG files written."""
    written: list[Path] = []
    for path in sorted(results.glob("grid-*.json")):
        if path.stem.endswith("-h2h"):
            continue
        doc = _common.read_json(path)
        device = path.stem.removeprefix("grid-")
        settings = doc.get("settings", {})
        sizes = sorted({r["cell"]["size"] for r in doc.get("records", [])})
        for size in sizes:
            images = next(r["cell"]["images"] for r in doc["records"] if r["cell"]["size"] == size)
            title = (
                f"{device}: {settings.get('kind', '')} pipeline, {size} px, "
                f"{settings.get('steps')} steps, {images} image(s) per job "
                f"({_where(doc['machine'])})"
            )
            png = grid_figure(doc, size, out / f"grid-{device}-{size}.png", title=title)
            if png:
                written.append(png)
    for path in [*sorted(results.glob("confirm-*.json")), *sorted(results.glob("*-h2h.json"))]:
        doc = _common.read_json(path)
        device = doc.get("machine", {}).get("device", "device")
        settings = doc.get("settings", {})
        for size, rows in head_to_head_rows(doc).items():
            title = (
                f"{device} head-to-head: {settings.get('kind', '')} pipeline, {size} px, "
                f"{settings.get('steps')} steps, {rows[0]['cell']['images']} image(s) per job "
                f"({_where(doc['machine'])})"
            )
            png = head_to_head_figure(rows, out / f"h2h-{device}-{size}.png", title=title)
            if png:
                written.append(png)
    for path in sorted(results.glob("attention-*.json")):
        doc = _common.read_json(path)
        device = path.stem.removeprefix("attention-")
        machine = doc.get("machine") or (doc.get("runs") or [{}])[0]
        unet = "toy UNet (quick run)" if doc.get("unet") == "quick" else "SD-1.5-sized UNet"
        title = (
            f"{device}: {unet} forward, batch 2, {doc.get('dtype', 'float32')} ({_where(machine)})"
        )
        png = attention_figure(doc, out / f"attention-{device}.png", title=title)
        if png:
            written.append(png)
    for png in written:
        log.info("wrote %s (%.0f KB)", png, png.stat().st_size / 1024)
    return written


def main(argv: list[str] | None = None) -> int:
    """Plot what ``--results`` holds into ``--out``."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--results", type=Path, default=_common.RESULTS)
    parser.add_argument("--out", type=Path, default=_common.RESULTS / "plots")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    # The plan logs every decision at INFO: the JSON keeps the plan, the console needs less.
    logging.getLogger("mps_helpers").setLevel(logging.WARNING)
    plot_all(args.results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
