"""Plot runs: the validation metric against rounds and against wall time, one PNG.

    python experiments/plot.py DIR [DIR ...] [--out=plot.png] [--metric=accuracy]

Every ``metrics.jsonl`` under each DIR (a run, or an experiment holding several runs) is one
curve, labelled by its path below DIR. The metric defaults to ``accuracy`` when the runs
logged it, else ``mse``, else ``loss``; validation records (``split == 'val'``) are plotted
when there are any, else the training records.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

__all__ = ["find_runs", "load_curve", "main", "plot_curves", "plot_runs"]


def find_runs(root: str) -> list[str]:
    """Directories under ``root`` (itself included) that hold a ``metrics.jsonl``."""
    found = []
    for dirpath, _, files in os.walk(root):
        if "metrics.jsonl" in files:
            found.append(dirpath)
    return sorted(found)


def load_curve(run_dir: str, metric: str | None = None) -> tuple[str, list[dict]]:
    """``(metric, records)``: the records of one run that carry the metric, by round."""
    records = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # the line a running (or killed) run is writing
                break
    val = [r for r in records if r.get("split") == "val"]
    pool = val or records
    if metric is None:
        metric = next((m for m in ("accuracy", "mse", "loss") if any(m in r for r in pool)), None)
        if metric is None:
            raise ValueError(f"{run_dir}: no accuracy, mse or loss in metrics.jsonl")
    return metric, sorted((r for r in pool if metric in r), key=lambda r: r["round"])


def plot_runs(
    dirs: Sequence[str], out: str, metric: str | None = None, title: str | None = None
) -> str:
    """Draw every run under ``dirs``; returns the PNG path."""
    runs = [(d, r) for d in dirs for r in find_runs(d)]
    if not runs:
        raise ValueError(f"no metrics.jsonl under {list(dirs)}")
    curves, shown = [], metric
    for root, run in runs:
        name, curve = load_curve(run, metric)
        shown = shown or name
        label = os.path.relpath(run, os.path.dirname(os.path.abspath(root).rstrip("/")))
        curves.append((label, curve))
    return plot_curves(curves, out, shown, title)


def plot_curves(
    curves: Sequence[tuple[str, Sequence[dict]]], out: str, metric: str, title: str | None = None
) -> str:
    """One curve per ``(label, records)`` (records with ``round``, ``wall_s`` and ``metric``),
    against rounds (left) and wall time (right); returns the PNG path."""
    fig, (ax_r, ax_t) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, curve in curves:
        ax_r.plot([r["round"] for r in curve], [r[metric] for r in curve], marker=".", label=label)
        ax_t.plot([r["wall_s"] for r in curve], [r[metric] for r in curve], marker=".", label=label)
    for ax, xlabel in ((ax_r, "round"), (ax_t, "wall time (s)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        if metric in ("mse", "loss"):
            ax.set_yscale("log")
    ax_t.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", help="run or experiment directories")
    parser.add_argument("--out", default="plot.png", help="the PNG to write")
    parser.add_argument("--metric", default=None, help="metric name (default: automatic)")
    args = parser.parse_args(argv)
    print(plot_runs(args.dirs, args.out, args.metric))


if __name__ == "__main__":
    main()
