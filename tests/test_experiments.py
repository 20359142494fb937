"""End to end: the smallest reproduction config through ``fmljax.train.run_experiment``.

Procedural data only (MAML's sinusoids, drawn on the device), a few hundred cheap rounds: checks
the files a run writes (config.json, metrics.jsonl, checkpoints, summary.json), that the
training loss fell, and that collect.py and plot.py read the run back.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

import ml_collections
import pytest

import fmljax.tasks  # noqa: F401  (registers the reproductions' tasks)
from fmljax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    config = _module("experiments/configs/sinusoid_maml.py", "sinusoid_maml").get_config("5,test")
    config.algorithm = "fedmeta-maml"
    config.hidden = (16, 16)
    config.num_rounds = 300
    config.rounds_per_call = 100
    config.eval_every = 100
    config.checkpoint_every = 100
    config.num_val_tasks = 16
    config.num_eval_tasks = 32
    config.eval_query_size = 10
    config.eval_more_steps = (3,)
    config.server_lr = 1e-2  # a few hundred rounds must show progress
    workdir = str(tmp_path_factory.mktemp("sinusoid_maml"))
    summaries = train.run_experiment(config, workdir)
    assert set(summaries) == {"fedmeta-maml"}
    return workdir


def test_files_and_improvement(run_dir):
    with open(os.path.join(run_dir, "config.json")) as f:
        assert json.load(f)["task"] == "sinusoid-maml"
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    train_recs = [r for r in records if r["split"] == "train"]
    val_recs = [r for r in records if r["split"] == "val"]
    assert [r["round"] for r in train_recs] == list(range(1, 301))
    assert [r["round"] for r in val_recs] == [100, 200, 300]
    for r in records:
        assert {"round", "split", "wall_s"} <= set(r) and r["wall_s"] >= 0
    assert all({"loss", "update_norm"} <= set(r) for r in train_recs)
    assert all({"mse", "mse_3steps", "mse_before"} <= set(r) for r in val_recs)
    first = sum(r["loss"] for r in train_recs[:30]) / 30
    last = sum(r["loss"] for r in train_recs[-30:]) / 30
    assert last < 0.8 * first, (first, last)  # meta-training lowered the query loss

    steps = sorted(int(d) for d in os.listdir(os.path.join(run_dir, "checkpoints")) if d.isdigit())
    assert steps and steps[-1] == 300

    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["rounds"] == 300
    for name in ("mse", "mse_3steps", "mse_before"):
        stat = summary["test"][name]
        assert stat["n"] == 32 and math.isfinite(stat["mean"]) and stat["ci95"] > 0
    # One adaptation step on the support points helps the meta-learned initialisation.
    assert summary["test"]["mse"]["mean"] < summary["test"]["mse_before"]["mean"]
    # The final evaluation is the last line of metrics.jsonl too.
    (test_rec,) = [r for r in records if r["split"] == "test"]
    assert records[-1] is test_rec and test_rec["round"] == 300
    for name in ("mse", "mse_3steps", "mse_before"):
        assert test_rec[name] == pytest.approx(summary["test"][name]["mean"], rel=1e-6)
    # Bytes: the 1-16-16-1 MLP in float32, down and up, one client per round.
    model_bytes = 4 * (16 + 16 + 16 * 16 + 16 + 16 + 1)
    assert summary["model_bytes"] == model_bytes
    assert summary["bytes_per_round"] == 2 * 1 * model_bytes
    assert summary["bytes_communicated"] == 300 * 2 * model_bytes


def test_plot_and_collect_read_the_run(run_dir, tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    try:
        plot = _module("experiments/plot.py", "plot")
        collect = _module("experiments/collect.py", "collect")
    finally:
        sys.path.pop(0)
    out = plot.plot_runs([run_dir], str(tmp_path / "p.png"))
    assert os.path.getsize(out) > 1000
    run = collect.read_run(run_dir)
    assert run["summary"]["test"]["mse"]["n"] == 32
    assert collect.fmt(run["summary"]["test"]["mse"]).count("±") == 1
    text = collect.build(str(tmp_path / "no-runs"))  # every section, nothing run yet
    assert "## 1. MAML on Omniglot" in text and "| 5w1s | not run | not run |" in text


def test_bad_config_fails_before_compiling(tmp_path):
    config = _module("experiments/configs/omniglot_maml.py", "omniglot_maml").get_config(
        "5w1s,test"
    )
    config.algorithm = "fedmeta-maml"
    for field, value in [
        ("loss_reduction", "sum"),
        ("conv_blocks", 0),
        ("conv_blocks", 6),  # 28 -> 14 -> 7 -> 4 -> 2 -> 1 -> 1: fine; VALID below is not
        ("conv_padding", "same"),
        ("bn_eps", 0.0),
        ("bn_scale", 1),
        ("conv_init", "kaiming"),
    ][::-1]:
        bad = ml_collections.ConfigDict({**config.to_dict(), field: value})  # any type
        if (field, value) == ("conv_blocks", 6):
            bad.conv_padding = "VALID"
        with pytest.raises(ValueError, match=f"config.{field}="):
            train.run_experiment(bad, str(tmp_path))
    assert not os.listdir(tmp_path)


def test_carve_validation_keeps_every_example_once():
    import numpy as np

    from fmljax.data.partition import federate
    from fmljax.tasks import carve_validation

    x = np.arange(40, dtype=np.float32)[:, None]
    y = np.arange(40) % 4
    fed = federate(x, y, [np.arange(0, 25), np.arange(25, 40)], test_fraction=0.2)
    parts = carve_validation(fed, 0.25)
    real = lambda b: set(np.asarray(b["x"])[np.asarray(b["mask"]) > 0, 0].tolist())
    for c in range(2):
        tr = real(jax_take(parts["train"]["train"], c))
        va = real(jax_take(parts["val"]["test"], c))
        te = real(jax_take(parts["test"]["test"], c))
        assert tr and va and te and not (tr & va) and not (tr & te) and not (va & te)
        assert tr | va == real(jax_take(fed["train"], c))
    assert np.array_equal(
        parts["train"]["num_examples"],
        [len(real(jax_take(parts["train"]["train"], c))) for c in range(2)],
    )


def jax_take(batch, c):
    return {k: v[c] for k, v in batch.items()}


def test_omniglot_validation_rounds_score_the_same_episode_on_test_drawings():
    import jax
    import numpy as np

    config = _module("experiments/configs/federated.py", "federated").get_config("omniglot,test")
    setup = train.TASKS["omniglot"](config)
    client = jax.tree.map(lambda a: a[0], setup.val_data)
    support, query = setup.eval_sample_task(jax.random.key(3), client)
    t_support, t_query = setup.eval_sample_task(
        jax.random.key(3), jax.tree.map(lambda a: a[0], setup.test_data)
    )
    np.testing.assert_array_equal(support["x"], t_support["x"])  # same classes and support
    np.testing.assert_array_equal(query["hx"], t_query["x"])  # scored on the test drawings
    assert not np.array_equal(query["x"], query["hx"])  # validation drawings differ
    metrics = setup.metrics_fn(setup.model.init(jax.random.key(0)), query)
    assert {"accuracy", "loss", "test_accuracy", "test_loss"} <= set(metrics)


CONFIG_ARGS = {
    "sinusoid.py": [None],
    "sinusoid_maml.py": [f"{k},{size}" for k in (5, 10, 20) for size in ("cpu", "full", "test")],
    "omniglot_maml.py": [
        f"{setting},{size}"
        for setting in ("5w1s", "5w5s", "20w1s", "20w5s")
        for size in ("cpu", "long", "full", "test")
    ],
    "federated.py": [
        f"{d},{size}"
        for d in ("synthetic", "digits", "omniglot")
        for size in ("cpu", "full", "test")
    ],
    "jiang.py": [f"{s},{size}" for s in ("identity", "finetune") for size in ("cpu", "full")],
}


@pytest.mark.parametrize(
    "name, arg", [(n, a) for n, args in CONFIG_ARGS.items() for a in args], ids=str
)
def test_every_shipped_config_variant_validates(name, arg):
    """Each config a README or docstring command names passes validation, every algorithm."""
    module = _module(f"experiments/configs/{name}", name[:-3])
    config = module.get_config() if arg is None else module.get_config(arg)
    for alg in str(config.algorithm).split(","):
        train.validate_config(train.algorithm_config(config, alg))


def _fake_run(path, rounds, acc, ci, val, finished=True):
    """The files a run writes, with made-up numbers (for collect.py's arithmetic)."""
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"filters": 64, "tasks_per_client": 32}, f)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for r, a in val:
            f.write(json.dumps({"round": r, "split": "val", "accuracy": a, "wall_s": r / 10}))
            f.write("\n")
        if not finished:
            f.write('{"round": 9')  # a line being written when the run was read
    if finished:
        summary = {
            "rounds": rounds,
            "wall_s": rounds / 10,
            "code_version": "abc1234",
            "test": {"accuracy": {"mean": acc, "ci95": ci, "n": 600}},
        }
        with open(os.path.join(path, "summary.json"), "w") as f:
            json.dump(summary, f)


def test_collect_omniglot_section_seeds_difference_and_running_runs(tmp_path):
    collect = _module("experiments/collect.py", "collect")
    root = tmp_path / "runs" / "omniglot_maml"
    val = [(500, 0.80), (1000, 0.90)]
    for seed, (so, fo) in enumerate([(0.95, 0.93), (0.97, 0.94), (0.96, 0.92)]):
        _fake_run(str(root / "5w1s_long" / f"seed{seed}" / "fedmeta-maml"), 1000, so, 0.01, val)
        _fake_run(str(root / "5w1s_long" / f"seed{seed}" / "fedmeta-fomaml"), 1000, fo, 0.02, val)
    _fake_run(str(root / "20w1s_long" / "fedmeta-maml"), 4000, 0.90, 0.01, val)
    _fake_run(str(root / "20w1s_long" / "fedmeta-fomaml"), 0, 0, 0, val[:1], finished=False)
    text = collect.omniglot_section(str(tmp_path / "runs"))
    row = {line.split(" | ")[0][2:]: line.split(" | ") for line in text.splitlines()[2:6]}
    # three seeds: mean ± std over seeds; difference: mean of the per-seed differences, with
    # the task-sampling CI sqrt(3 * (0.01^2 + 0.02^2)) / 3 = 1.29 points
    assert row["5w1s"][1] == "96.0 ± 1.0 std (n=3)" and row["5w1s"][2] == "93.0 ± 1.0 std (n=3)"
    assert row["5w1s"][3] == "+3.0 ± 1.3 (n=3)"
    assert row["5w1s"][7] == "1000 / 60000" and row["5w1s"][8] == "3"
    assert row["20w1s"][1] == "90.0 ± 1.0" and row["20w1s"][2] == "running (500 it.)"
    assert row["20w1s"][3] == "—" and row["20w1s"][6] == "+6.4"
    assert row["5w5s"][1] == "not run"
    assert "| 5w1s | 2 | FO | 92.0 ± 2.0 | 90.0 (1000) | 1000 |" in text
    assert "| 20w1s | 0 | FO | running | 80.0 (500) | 500 | — | — |" in text
    pngs = collect.omniglot_plots(str(tmp_path / "runs"), str(tmp_path))
    assert [os.path.basename(p) for p in pngs] == ["omniglot_5w1s.png", "omniglot_20w1s.png"]
    # --sections: section 1 from the new runs, every other section kept as it was
    old = "# R\n\nintro\n## 1. Omniglot\n\nold table\n## 2. Sinusoid\n\nkept\n"
    new = collect.build(str(tmp_path / "runs"))
    merged = collect.replace_sections(old, new, ["omniglot"])
    assert merged.startswith("# R\n\nintro\n## 1. MAML on Omniglot") and "old table" not in merged
    assert merged.endswith("## 2. Sinusoid\n\nkept\n") and "+3.0 ± 1.3 (n=3)" in merged


def test_collect_omniglot_store_keeps_runs_that_are_not_on_this_machine(tmp_path):
    """Section 1 and its curves come from the runs merged with the stored records: a finished
    run leaves its numbers in the store, and a later machine without the run (or with a
    shorter rerun of it) still shows them; a further run replaces its record."""
    collect = _module("experiments/collect.py", "collect")
    store = str(tmp_path / "results" / "omniglot_long.json")
    first = tmp_path / "first" / "omniglot_maml" / "5w1s_long"
    _fake_run(str(first / "fedmeta-maml"), 5000, 0.96, 0.01, [(500, 0.8), (5000, 0.95)])
    collect.write_store(store, collect.omniglot_records(str(tmp_path / "first"), store))
    text = collect.omniglot_section(str(tmp_path / "first"), store)

    later = tmp_path / "later" / "omniglot_maml"
    _fake_run(str(later / "5w1s_long" / "fedmeta-maml"), 0, 0, 0, [(500, 0.7)], finished=False)
    _fake_run(str(later / "5w5s_long" / "fedmeta-fomaml"), 2000, 0.97, 0.005, [(500, 0.9)])
    merged = collect.omniglot_section(str(tmp_path / "later"), store)
    row = [line for line in text.splitlines() if line.startswith("| 5w1s | 96.0")]
    assert len(row) == 1 and row[0] in merged.splitlines()  # the stored run, not the rerun
    assert "| 5w1s | 0 | SO | 96.0 ± 1.0 | 95.0 (5000) | 5000 | 500 | `abc1234` |" in merged
    assert "| 5w5s | 0 | FO | 97.0 ± 0.5 | 90.0 (500) | 2000 |" in merged
    alone = collect.omniglot_section(str(tmp_path / "later"))  # without the store
    assert "| 5w1s | 0 | SO | running | 70.0 (500) | 500 | — | — |" in alone

    collect.write_store(store, collect.omniglot_records(str(tmp_path / "later"), store))
    with open(store) as f:
        kept = {(r["setting"], r["algorithm"]): r for r in json.load(f)}
    assert kept[("5w1s", "fedmeta-maml")]["rounds"] == 5000 and len(kept) == 2
    assert kept[("5w1s", "fedmeta-maml")]["val"] == [[500, 50.0, 0.8], [5000, 500.0, 0.95]]
    pngs = collect.omniglot_plots(str(tmp_path / "nothing"), str(tmp_path), store)
    assert [os.path.basename(p) for p in pngs] == ["omniglot_5w1s.png", "omniglot_5w5s.png"]
