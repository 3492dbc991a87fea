"""PNG plots of the bench (matplotlib, Agg backend: no display needed; a bench-only dependency).

The full bench writes to docs/img/ (next to docs/benchmarks.md, linked from the README); `--quick`
writes beside its own report (bench/out/img/) so a CI run never overwrites the committed plots.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import ROOT, Section

if TYPE_CHECKING:
    from bench.mount import Result

COLORS = {"s3fsimg": "#1f77b4", "rclone": "#ff7f0e", "s3fs": "#2ca02c", "boto3": "#7f7f7f", "local copy": "#9467bd"}


def report_path(args: Any) -> Path:
    """Where `python -m bench` writes its report (the same rule as bench/__main__.py)."""
    if getattr(args, "out", None):
        return Path(args.out)
    return ROOT / "bench" / "out" / "benchmarks-quick.md" if args.quick else ROOT / "docs" / "benchmarks.md"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, sec: Section, args: Any, name: str, caption: str) -> None:
    out = report_path(args)
    img = out.parent / "img"
    img.mkdir(parents=True, exist_ok=True)
    path = img / name
    fig.savefig(path, dpi=110, bbox_inches="tight")
    sec.plots.append((caption, os.path.relpath(path, out.parent)))
    print(f"  plot: {path}", flush=True)


def mount_plots(sec: Section, args: Any, results: dict[int, dict[str, Result]], local: Result, total: int,
                n: int, readers: list[int]) -> None:
    """Throughput by readers (cold) and by pass (cold, disk cache, page cache), for each system."""
    plt = _pyplot()
    latencies = sorted(results)
    systems = ["s3fsimg", "rclone", "s3fs", "boto3"]

    fig, axes = plt.subplots(1, len(latencies), figsize=(5.5 * len(latencies), 4), squeeze=False)
    for ax, latency in zip(axes[0], latencies, strict=False):
        for name in systems:
            res = results[latency].get(name)
            if res is None or res.error or not res.cold:
                continue
            xs = [r for r in readers if r in res.cold]
            ax.plot(xs, [total / 1e6 / res.cold[r] for r in xs], marker="o", label=name, color=COLORS[name])
        ax.set_title(f"cold full read, {latency} ms first-byte latency")
        ax.set_xlabel("parallel readers")
        ax.set_ylabel("MB/s")
        ax.set_xticks(readers)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{n} images, {total / 1e6:.0f} MB, every file hash-checked")
    _save(fig, sec, args, "mount-throughput-by-readers.png", "Cold full-read throughput by parallel readers")
    plt.close(fig)

    passes = ["cold", "pass 2 (disk cache)", "pass 3 (page cache)"]
    fig, axes = plt.subplots(1, len(latencies), figsize=(6 * len(latencies), 4), squeeze=False)
    for ax, latency in zip(axes[0], latencies, strict=False):
        names = [s for s in ("s3fsimg", "rclone", "s3fs") if results[latency].get(s) and not results[latency][s].error]
        bars: dict[str, list[float]] = {}
        for name in names:
            res = results[latency][name]
            cold = res.cold.get(8) or next(iter(res.cold.values()), None)
            bars[name] = [total / 1e6 / t if t else 0.0 for t in (cold, res.pass2, res.pass3)]
        bars["local copy"] = [0.0, total / 1e6 / local.pass2 if local.pass2 else 0.0,
                              total / 1e6 / local.pass3 if local.pass3 else 0.0]
        width = 0.8 / len(bars)
        for i, (name, values) in enumerate(bars.items()):
            xpos = [float(p) + i * width for p in range(len(passes))]
            ax.bar(xpos, values, width, label=name, color=COLORS[name])
        ax.set_xticks([p + width * (len(bars) - 1) / 2 for p in range(len(passes))], passes)
        ax.set_title(f"8 readers by pass, {latency} ms")
        ax.set_ylabel("MB/s")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize="small")
    _save(fig, sec, args, "mount-throughput-by-pass.png", "Throughput by pass (8 readers)")
    plt.close(fig)


def workers_plot(sec: Section, args: Any, per: dict[str, Result], workers: dict[int, Result], total: int,
                 latency: int) -> None:
    """s3fsimg at each `--workers N` beside rclone, s3fs and the baselines: throughput and the mount's CPU
    seconds per GB, for the cold read, pass 2 and pass 3 (8 readers)."""
    from bench.mount import PASS_READERS, cpu_per_gb

    plt = _pyplot()
    workloads = [("cold", f"cold {PASS_READERS}r"), ("pass 2 (disk cache)", "pass 2"),
                 ("pass 3 (page cache)", "pass 3")]
    shades = ["#aec7e8", "#1f77b4", "#0b3d66", "#08223a"]
    series: list[tuple[str, str, Result]] = [(f"s3fsimg --workers {w}", shades[min(i, len(shades) - 1)], res)
                                             for i, (w, res) in enumerate(sorted(workers.items()))]
    series += [(name, COLORS[name], per[name]) for name in ("rclone", "s3fs") if name in per and not per[name].error]
    local = per["s3fsimg"].local if "s3fsimg" in per else None

    def seconds(res: Result, key: str) -> float | None:
        return res.cold.get(PASS_READERS) if key.startswith("cold") else res.pass2 if key == "pass 2" else res.pass3

    fig, (ax_mb, ax_cpu) = plt.subplots(1, 2, figsize=(13.5, 4.4))
    bars = [(label, color, [_mb(total, seconds(res, key)) for _, key in workloads],
             [cpu_per_gb(res, key) or 0.0 for _, key in workloads]) for label, color, res in series]
    baselines = []
    if "boto3" in per:
        baselines.append((f"boto3, {PASS_READERS} threads", COLORS["boto3"],
                          [_mb(total, per["boto3"].cold.get(PASS_READERS)), 0.0, 0.0]))
    if local is not None:
        baselines.append(("local copy", COLORS["local copy"], [0.0, _mb(total, local.pass2), _mb(total, local.pass3)]))
    n_bars = len(bars) + len(baselines)
    width = 0.85 / n_bars
    for i, (label, color, mbs, _) in enumerate([*bars, *((lb, c, v, None) for lb, c, v in baselines)]):
        ax_mb.bar([p + i * width for p in range(len(workloads))], mbs, width, label=label, color=color)
    for i, (label, color, _, cpus) in enumerate(bars):
        ax_cpu.bar([p + i * width for p in range(len(workloads))], cpus, width, label=label, color=color)
    for ax in (ax_mb, ax_cpu):
        ax.set_xticks([p + width * (n_bars - 1) / 2 for p in range(len(workloads))], [w for w, _ in workloads])
        ax.grid(axis="y", alpha=0.3)
    ax_mb.set_ylabel("MB/s")
    ax_mb.set_title(f"{PASS_READERS} readers, {latency} ms: throughput")
    ax_mb.legend(fontsize="small")
    ax_cpu.set_ylabel("CPU seconds per GB served (mount process)")
    ax_cpu.set_title("the mount's CPU per GB")
    ax_cpu.legend(fontsize="small")
    _save(fig, sec, args, "mount-workers.png", "s3fsimg by --workers beside rclone and s3fs (throughput, CPU per GB)")
    plt.close(fig)


def _mb(total: int, seconds: float | None) -> float:
    return total / 1e6 / seconds if seconds else 0.0
