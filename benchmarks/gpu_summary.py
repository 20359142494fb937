"""One step of ``benchmarks/gpu_check.sh`` in a line: its figures, or its JSON record.

    python benchmarks/gpu_summary.py NAME LOG WORK
        -> the step's figures for the summary table (tasks/s and speed-ups, or accuracies)
    python benchmarks/gpu_summary.py --json NAME LOG WORK STATUS WALL_S CARD
        -> one JSON line for ``gpu-<card>.jsonl`` (``kind: "gpu_check_step"``)

A throughput step's figures come from the JSON lines ``benchmarks/throughput.py --json``
printed into LOG; an Omniglot step's from its run directory under WORK (the runner's own
``metrics.jsonl`` / ``summary.json``, read with ``experiments/collect.py``).
"""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "experiments"))

from collect import read_progress  # noqa: E402

RUN_DIRS = {  # step name -> the run directory under WORK of its one algorithm
    "omniglot-5w1s-2000": "omniglot_5w1s_2000/fedmeta-maml",
}


def throughput(log: str) -> dict:
    """The one-jit line (the first) of a throughput log, and its speed-ups."""
    with open(log) as f:
        lines = [json.loads(x) for x in f if x.startswith("{")]
    if not lines:
        return {}
    main = lines[0]
    out = {"tasks_per_s": main["tasks_per_s"], "device": main["device"]}
    out |= {k: v for k, v in main.items() if k.startswith("speedup_vs_")}
    return out


def omniglot(work: str, name: str) -> dict:
    run = read_progress(os.path.join(work, RUN_DIRS[name]))
    if not run:
        return {}
    val = [r for r in run["records"] if r.get("split") == "val" and "accuracy" in r]
    out = {"rounds": run["rounds"], "val_accuracy": {r["round"]: r["accuracy"] for r in val}}
    if run["summary"]:
        out["test_accuracy"] = run["summary"]["test"]["accuracy"]
        out["wall_s"] = run["summary"].get("wall_s")
    return out


def figures(name: str, log: str, work: str) -> dict:
    return omniglot(work, name) if name in RUN_DIRS else throughput(log)


def text(fig: dict) -> str:
    parts = []
    if "tasks_per_s" in fig:
        parts.append(f"{fig['tasks_per_s']:.1f} tasks/s")
        parts += [f"{v:.2f}x {k[len('speedup_vs_') :]}" for k, v in fig.items() if "speedup" in k]
    if "rounds" in fig:
        parts.append(f"{fig['rounds']} iterations")
        parts += [f"val {100 * a:.1f}% @{r}" for r, a in fig["val_accuracy"].items()]
    if "test_accuracy" in fig:
        t = fig["test_accuracy"]
        parts.append(f"test {100 * t['mean']:.1f} ± {100 * t['ci95']:.1f}%")
    return ", ".join(parts)


def main(argv: list[str]) -> None:
    if argv and argv[0] == "--json":
        name, log, work, status, wall, card = argv[1:7]
        rec = dict(kind="gpu_check_step", step=name, status=status, wall_s=int(wall), card=card)
        print(json.dumps(rec | figures(name, log, work)))
    else:
        name, log, work = argv[:3]
        print(text(figures(name, log, work)))


if __name__ == "__main__":
    main(sys.argv[1:])
