"""examples/my_federated_data.py at a tiny size: the table of held-out accuracies it prints."""

import importlib.util
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example():
    path = os.path.join(ROOT, "examples", "my_federated_data.py")
    spec = importlib.util.spec_from_file_location("my_federated_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_prints_a_table_per_client(capsys):
    ex = _example()
    argv = ["--clients", "3", "--rounds", "2", "--min-size", "12", "--max-size", "30"]
    argv += ["--batch", "4", "--hidden", "4", "--per-round", "2", "--eval-steps", "2"]
    table = ex.main(argv)
    cols = ["fedavg (global)", "fedavg+ft", "perfedavg-fo", "fedmeta-maml", "train n", "test n"]
    assert list(table) == cols
    for c in cols[:4]:
        acc = np.asarray(table[c])
        assert acc.shape == (3,) and np.all((acc >= 0) & (acc <= 1)), (c, acc)
    # fine-tuning adapted: FedAvg + fine-tuning is not the global model's score everywhere
    assert not np.array_equal(table["fedavg+ft"], table["fedavg (global)"])
    sizes = np.asarray(table["train n"]) + np.asarray(table["test n"])
    assert len(set(sizes.tolist())) > 1 and sizes.min() >= 12 and sizes.max() <= 30
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[0] == "client" and out[-2].split()[0] == "mean"
    assert [line.split()[0] for line in out[2:5]] == ["0", "1", "2"]


def test_bad_size_flag_is_refused(capsys):
    with pytest.raises(SystemExit) as err:
        _example().main(["--min-size", "8", "--batch", "4"])
    assert err.value.code == 2
    assert "--min-size=8 is too small for --batch=4" in capsys.readouterr().err
