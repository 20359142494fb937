"""``benchmarks/roofline.py``: XLA's FLOP count of throughput.py's Conv4 task (second order
above first order, the meta-batch step about T x one task), the matmul-peak measurement and its
JSON fields at a tiny size, the fraction-of-peak helper, and the "Physical limit" section and
"% of peak" column that ``benchmarks/sweep.py table`` renders from a (synthetic) roofline line.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the meta-batch step = mean + Adam over T tasks: within this factor of T x one task
BATCH_FACTOR = 1.05


def _module(path: str, name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def roofline():
    return _module("benchmarks/roofline.py", "roofline")


@pytest.fixture(scope="module")
def sweep():
    return _module("benchmarks/sweep.py", "sweep")


@pytest.fixture(scope="module")
def conv4_flops(roofline):
    # A meta-batch of 4, not the workload's 32: the same per-task program, a quicker compile
    # of the batched step (the cross-check holds for any T).
    return roofline.count_flops("omniglot-5w1s", "maml", meta_batch=4)


def test_conv4_task_flops_second_order_above_first_order(conv4_flops):
    c = conv4_flops
    assert c["workload"] == "omniglot-5w1s" and c["method"] == "maml" and c["inner_steps"] == 1
    assert c["model"] == "conv4" and c["inner_lr"] == 0.4 and c["meta_batch"] == 4
    assert c["flops_per_task"] > 0 and c["flops_per_task_first_order"] > 0
    assert c["flops_per_task"] > c["flops_per_task_first_order"]
    assert c["flops_by_method"] == {
        "maml": c["flops_per_task"],
        "fomaml": c["flops_per_task_first_order"],
    }
    # a Conv4 task is GFLOPs of work (a whole-loop body counted once would be far less)
    assert 1e8 < c["flops_per_task"] < 1e11
    assert c["while_loops"] == 0  # every loop's body counted as often as it runs
    assert c["flops_per_task_lowered"] > 0


def test_meta_batch_step_is_about_meta_batch_times_one_task(conv4_flops):
    c = conv4_flops
    want = c["meta_batch"] * c["flops_per_task"]
    assert want / BATCH_FACTOR < c["flops_meta_batch_step"] < want * BATCH_FACTOR
    assert abs(c["batch_over_tasks"] - c["flops_meta_batch_step"] / want) < 1e-12
    assert c["flops_meta_batch_step_per_task"] == pytest.approx(c["flops_meta_batch_step"] / 4)


def test_flops_of_accepts_every_cost_analysis_form(roofline):
    class C:
        def __init__(self, cost):
            self.cost = cost

        def cost_analysis(self):
            if isinstance(self.cost, Exception):
                raise self.cost
            return self.cost

    assert roofline.flops_of(C({"flops": 12.0})) == 12.0
    assert roofline.flops_of(C([{"flops": 7.0, "bytes accessed": 1.0}])) == 7.0
    for nothing in (None, [], {}, {"flops": -1.0}, RuntimeError("no cost analysis")):
        assert roofline.flops_of(C(nothing)) is None


def test_peak_at_a_tiny_size(roofline):
    got = roofline.measure_peak(sizes=(64, 128), repeats=3)
    assert got["peak_gflops"] > 0 and got["peak_size"] in (64, 128)
    assert [p["n"] for p in got["peak"]] == [64, 128]
    for p in got["peak"]:
        assert p["median_s"] > 0 and p["min_s"] <= p["median_s"]
        assert p["gflops"] == pytest.approx(2 * p["n"] ** 3 / p["median_s"] / 1e9)
        assert p["gflops_best"] >= p["gflops"]
        assert p["xla_flops"] == 2 * p["n"] ** 3  # XLA counts a multiply-add as 2, as we do
    assert got["peak_gflops"] == max(p["gflops"] for p in got["peak"])
    with pytest.raises(ValueError):
        roofline.measure_peak(sizes=(64,), repeats=0)


JSON_FIELDS = {
    "kind",
    "device",
    "device_kind",
    "platform",
    "cpu_model",
    "num_cpus",
    "host",
    "jax_version",
    "load_avg_start",
    "load_avg_1m_end",
    "workload",
    "method",
    "inner_steps",
    "conv_impl",
    "meta_batch",
    "flops_per_task",
    "flops_per_task_lowered",
    "flops_per_task_first_order",
    "flops_by_method",
    "flops_meta_batch_step",
    "flops_meta_batch_step_per_task",
    "batch_over_tasks",
    "while_loops",
    "peak_gflops",
    "peak_size",
    "peak",
    "dtype",
    "repeats",
    "ceiling_tasks_per_s",
    "wall_s",
    "tag",
}


def test_main_json_has_the_documented_fields(roofline, conv4_flops, capsys, monkeypatch):
    calls = []  # the Conv4 count of the fixture, not compiled again (tested above)
    monkeypatch.setattr(
        roofline, "count_flops", lambda *a, **k: calls.append((a, k)) or dict(conv4_flops)
    )
    rec = roofline.main(["--sizes=32,64", "--repeats=2", "--json", "--tag=t"])
    assert calls == [(("omniglot-5w1s", "maml"), {"conv_impl": None, "fast_compile": True})]
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line == json.loads(json.dumps(rec))
    assert JSON_FIELDS <= set(line), JSON_FIELDS - set(line)
    assert line["kind"] == "roofline" and line["tag"] == "t" and line["repeats"] == 2
    assert line["device"] == f"{line['platform']}:{line['device_kind']}"
    assert line["flops_per_task"] > line["flops_per_task_first_order"] > 0
    assert line["ceiling_tasks_per_s"] == pytest.approx(
        line["peak_gflops"] * 1e9 / line["flops_per_task"]
    )
    if line["platform"] == "cpu" and os.path.exists("/proc/cpuinfo"):
        assert line["cpu_model"]
    assert line["load_avg_start"] is None or len(line["load_avg_start"]) == 3
    with pytest.raises(SystemExit):
        roofline.main(["--sizes=big"])


def test_fraction_of_peak(roofline):
    # 50 tasks/s x 2 GFLOP/task = 100 GFLOP/s of a 400 GFLOP/s peak
    assert roofline.fraction_of_peak(50.0, 2e9, 400.0) == pytest.approx(0.25)
    assert roofline.fraction_of_peak(0, 2e9, 400.0) == 0
    assert roofline.ceiling_tasks_per_s(2e9, 400.0) == pytest.approx(200.0)
    for bad in ((-1.0, 2e9, 400.0), (1.0, float("nan"), 400.0), (1.0, 2e9, 0.0), (True, 1, 1)):
        with pytest.raises(ValueError):
            roofline.fraction_of_peak(*bad)


def _throughput_line(**kw):
    rec = dict(
        impl="onejit",
        workload="omniglot-5w1s",
        model="conv4",
        method="maml",
        inner_steps=1,
        task_map="map",
        client_map=None,
        conv_impl="im2col",
        steps_per_call=1,
        tasks_per_s=50.0,
        step_ms_median=640.0,
        step_ms_min=600.0,
        step_ms_max=700.0,
        compile_s=10.0,
        timed_steps=10,
        peak_bytes=2**20,
        temp_bytes=2**20,
        device_peak_bytes=None,
        remat=False,
        clients=None,
        local_steps=None,
        tasks_per_client=None,
        device="cpu:cpu",
        num_cpus=2,
        jax_version="0.10.2",
        host="quiet",
        load_avg_1m_start=0.1,
        tag="--workload=omniglot-5w1s --method=maml --inner-steps=1 --task-map=map --steps=10",
    )
    return rec | kw


ROOF = dict(
    kind="roofline",
    device="cpu:cpu",
    device_kind="cpu",
    platform="cpu",
    cpu_model="Some CPU 9000",
    num_cpus=2,
    host="quiet",
    jax_version="0.10.2",
    load_avg_start=[0.05, 0.1, 0.2],
    workload="omniglot-5w1s",
    method="maml",
    inner_steps=1,
    conv_impl="im2col",
    meta_batch=32,
    flops_per_task=2e9,
    flops_per_task_first_order=1e9,
    flops_by_method={"maml": 2e9, "fomaml": 1e9},
    batch_over_tasks=1.0001,
    peak_gflops=400.0,
    peak_size=4096,
    peak=[{"n": 2048, "gflops": 380.0}, {"n": 4096, "gflops": 400.0}],
    ceiling_tasks_per_s=200.0,
    tag=None,
)


def test_results_rendering_with_a_synthetic_roofline_line(sweep, tmp_path):
    out = tmp_path / "cpu.jsonl"
    lines = [
        _throughput_line(),  # 50 tasks/s x 2 GFLOP / 400 GFLOP/s = 25%
        _throughput_line(method="fomaml", tasks_per_s=100.0, tag="fo"),  # 100 x 1 / 400 = 25%
        _throughput_line(workload="sinusoid", model="mlp", tag="sin"),  # no roofline: –
        _throughput_line(device="gpu:H200", tag="gpu"),  # another device: –
    ]
    out.write_text("".join(json.dumps(x) + "\n" for x in lines))

    text = sweep.table(str(out))  # no roofline file yet: the section says so
    assert "### Physical limit" in text and "No roofline record is present" in text
    assert sweep.ROOFLINE_CMD in text and "25.0%" not in text

    (tmp_path / "roofline-quiet.jsonl").write_text(json.dumps(ROOF) + "\n")
    text = sweep.table(str(out))
    assert "No roofline record" not in text
    limit = text.split("### Physical limit")[1].split("### Throughput")[0]
    for want in ("**400.0** (n=4096", "Some CPU 9000", "0.1, 0.1, 0.2", "2.000 (maml)", "1.000"):
        assert want in limit, (want, limit)
    assert "| 200.0 |" in limit  # the ceiling in tasks/s
    rows = [r for r in text.splitlines() if r.startswith("| ") and "`" in r and "onejit" in r]
    pct = {r.split("`")[-2]: r.split(" | ")[8] for r in rows}  # the "% of peak" column
    assert pct == {lines[0]["tag"]: "25.0%", "fo": "25.0%", "sin": "–", "gpu": "–"}
    assert sweep.percent_of_peak(lines[0], [ROOF]) == pytest.approx(25.0)
    # another host of the same device is used when the record's own host has none
    assert sweep.percent_of_peak(lines[0] | {"host": "other"}, [ROOF]) == pytest.approx(25.0)
    assert sweep.percent_of_peak(lines[0] | {"inner_steps": 5}, [ROOF]) is None
