"""Held-out evaluation by construction, and FedAvg's ``fine_tune`` against its evaluation steps.

Every example carries a unique id in ``x[:, 0]`` (the model reads ``x[:, 1:]`` only), so the
scored query ids and the support ids of an evaluation task can be told apart: for
``fmljax.data.federate`` data through ``fmljax.build(...).evaluate`` and for a
user-registered task through ``experiments/main.py``. Adapted parameters are compared
exactly (the same program on inputs that differ only in held-out examples).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import jax
import jax.flatten_util
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from helpers import tiny_sinusoid_config

import fmljax
from fmljax import train
from fmljax.data import client_batch_sampler, federate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = (14, 22, 31)  # unequal clients
CLASSES = 3


def _arrays(seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """x [n, 3] = (id, 2 features), y [n], index lists of 3 clients of unequal sizes."""
    rng = np.random.default_rng(seed)
    n = sum(SIZES)
    y = rng.integers(0, CLASSES, n)
    feats = rng.normal(size=(n, 2)) + np.eye(CLASSES, 2)[y] * 2.0
    x = np.concatenate([np.arange(n, dtype=np.float64)[:, None] + 1.0, feats], 1)  # ids 1..n
    idx = np.split(rng.permutation(n), np.cumsum(SIZES)[:-1])
    return x.astype(np.float32), y, idx


def _fed():
    x, y, idx = _arrays()
    fed = federate(x, y, idx, seed=0)
    n = len(x) + 1
    is_test = np.zeros(n, np.float32)
    test_ids = np.asarray(fed["test"]["x"][..., 0])[np.asarray(fed["test"]["mask"]) > 0]
    is_test[test_ids.astype(int)] = 1.0
    return fed, jnp.asarray(is_test)


MODEL = fmljax.mlp((2, 8, CLASSES))
APPLY = lambda p, x, **kw: MODEL.apply(p, x[..., 1:], **kw)  # the id is never a feature
LOSS = fmljax.cross_entropy_loss(APPLY)


def _metrics(is_test: jax.Array):
    """Accuracy, the share of scored (real) query examples that are held out, and the
    adapted parameters themselves (a [P] vector per client)."""
    base = fmljax.classification_metrics(APPLY)

    def metrics(params, batch):
        ids = batch["x"][:, 0].astype(jnp.int32)
        real = batch["mask"]
        held = jnp.sum(is_test[ids] * real) / jnp.sum(real)
        flat = jax.flatten_util.ravel_pytree(params)[0]
        return {**base(params, batch), "heldout_frac": held, "adapted": flat}

    return metrics


def _leaks(per_client: dict) -> bool:
    """The leak check: True if any scored query example of any client is not held out."""
    return bool(np.any(np.asarray(per_client["heldout_frac"]) != 1.0))


CFG = fmljax.RoundConfig(clients_per_round=2, tasks_per_client=1, inner_lr=0.3, inner_steps=2)


def test_federate_evaluate_adapts_on_train_scores_heldout_only():
    fed, is_test = _fed()
    sampler = client_batch_sampler(4, 4, data=fed)
    alg = fmljax.build("fedmeta-maml", LOSS, sampler, CFG, metrics_fn=_metrics(is_test))
    state = alg.init(MODEL.init(jax.random.key(0)))
    evaluate = jax.jit(alg.evaluate)
    key = jax.random.key(3)
    got = evaluate(state, key, fed)
    assert not _leaks(got), got["heldout_frac"]

    # the support ids of the evaluation tasks: real 'train' examples, disjoint from the query
    keys = jax.vmap(lambda k: jax.random.split(k, 1)[0])(jax.random.split(key, len(SIZES)))
    support, query = jax.vmap(alg.eval_sample_task)(keys, fed)
    for c in range(len(SIZES)):
        s_ids = np.asarray(support["x"][c, :, 0])[np.asarray(support["mask"][c]) > 0]
        q_ids = np.asarray(query["x"][c, :, 0])[np.asarray(query["mask"][c]) > 0]
        train_ids = np.asarray(fed["train"]["x"][c, :, 0])[np.asarray(fed["train"]["mask"][c]) > 0]
        assert len(s_ids) == 4 and set(s_ids) <= set(train_ids)
        assert set(s_ids).isdisjoint(q_ids) and not np.asarray(is_test)[s_ids.astype(int)].any()
        assert len(q_ids) == SIZES[c] - int(0.75 * SIZES[c])  # the whole held-out split

    # perturbing the held-out examples (features and labels) never changes the adaptation
    rng = np.random.default_rng(1)
    test = dict(fed["test"])
    noise = rng.normal(size=test["x"].shape).astype(np.float32) * 5.0
    noise[..., 0] = 0.0  # keep the ids
    test["x"] = test["x"] + noise
    test["y"] = (test["y"] + 1) % CLASSES
    moved = evaluate(state, key, {**fed, "test": test})
    np.testing.assert_array_equal(np.asarray(moved["adapted"]), np.asarray(got["adapted"]))
    assert not np.allclose(np.asarray(moved["loss"]), np.asarray(got["loss"]), atol=1e-3)
    # ... while perturbing the training examples does (the comparison can fail)
    tr = dict(fed["train"])
    tr["x"] = tr["x"].at[..., 1:].add(0.5)
    other = evaluate(state, key, {**fed, "train": tr})
    assert np.abs(np.asarray(other["adapted"]) - np.asarray(got["adapted"])).max() > 1e-4


def test_scoring_training_data_is_caught():
    """The old behaviour (support and query from 'train') is detected, or refused up front."""
    fed, is_test = _fed()
    sampler = client_batch_sampler(4, 4, data=fed)
    old = fmljax.build(
        "fedmeta-maml",
        LOSS,
        sampler,
        CFG,
        metrics_fn=_metrics(is_test),
        eval_sample_task=sampler.train,  # asked for explicitly: score what training samples
    )
    state = old.init(MODEL.init(jax.random.key(0)))
    got = jax.jit(old.evaluate)(state, jax.random.key(3), fed)
    assert _leaks(got) and float(np.max(got["heldout_frac"])) == 0.0

    plain = fmljax.build("fedmeta-maml", LOSS, sampler.train, CFG)  # no held-out counterpart
    with pytest.raises(ValueError, match=r"held-out examples \(data\['test'\]\).*eval_sample_task"):
        jax.eval_shape(plain.evaluate, state, jax.random.key(3), fed)


def test_fedavg_fine_tune_and_evaluation_steps_agree():
    fed, is_test = _fed()
    sampler = client_batch_sampler(4, 4, data=fed)
    with pytest.raises(ValueError) as err:
        fmljax.build("fedavg", LOSS, sampler, fmljax.RoundConfig(eval_inner_steps=3))
    for part in ("fine_tune=False", "eval_inner_steps=3", "set fine_tune=True", "0/None"):
        assert part in str(err.value), err.value
    with pytest.raises(ValueError, match="eval_more_steps"):
        fmljax.fedavg(LOSS, sampler, fmljax.RoundConfig(eval_more_steps=(4,)))
    with pytest.raises(ValueError, match="fine_tune=True with RoundConfig.eval_inner_steps=0"):
        fmljax.fedavg(LOSS, sampler, fmljax.RoundConfig(eval_inner_steps=0), fine_tune=True)

    params = MODEL.init(jax.random.key(0))
    metrics = fmljax.classification_metrics(APPLY)
    runs = {}
    for label, cfg, ft in (
        ("plain", CFG, False),
        ("tuned", fmljax.RoundConfig(inner_lr=0.3, inner_steps=1, eval_inner_steps=2), True),
        ("default", CFG, True),  # eval_inner_steps=None: inner_steps (2)
    ):
        alg = fmljax.fedavg(LOSS, sampler, cfg, fine_tune=ft, metrics_fn=metrics)
        runs[label] = jax.jit(alg.evaluate)(alg.init(params), jax.random.key(3), fed)
    np.testing.assert_array_equal(runs["plain"]["loss"], runs["plain"]["loss_before"])
    assert np.all(np.asarray(runs["tuned"]["loss"]) < np.asarray(runs["plain"]["loss"]) - 1e-4)
    np.testing.assert_allclose(runs["default"]["loss"], runs["tuned"]["loss"], rtol=1e-6)

    base = dict(algorithm="fedavg", eval_inner_steps=2)
    with pytest.raises(ValueError, match=r"config.fine_tune=False with config.eval_inner_steps=2"):
        train.validate_config(tiny_sinusoid_config(**base))
    train.validate_config(tiny_sinusoid_config(**base, fine_tune=True))
    train.validate_config(tiny_sinusoid_config(algorithm="fedavg", eval_inner_steps=0))


# ---- a user-registered task through experiments/main.py ----------------------------------------


def _user_task(perturb: bool):
    def builder(config: ml_collections.ConfigDict) -> train.TaskSetup:
        fed, is_test = _fed()
        if perturb:
            test = dict(fed["test"])
            test["x"] = test["x"].at[..., 1:].add(3.0)
            test["y"] = (test["y"] + 1) % CLASSES
            fed = {**fed, "test": test}
        base = _metrics(is_test)

        def metrics(params, batch):
            out = base(params, batch)
            out["adapted_sum"] = jnp.sum(out.pop("adapted"))
            return out

        return train.TaskSetup(
            model=MODEL,
            loss_fn=LOSS,
            metrics_fn=metrics,
            sample_task=client_batch_sampler(config.support_size, config.query_size, data=fed),
            train_data={"train": fed["train"], "num_examples": fed["num_examples"]},
            val_data=fed,
            test_data=fed,
            target_metric="accuracy",
        )

    return builder


train.register_task("test-heldout-ids")(_user_task(False))
train.register_task("test-heldout-ids-perturbed")(_user_task(True))


def _main_module():
    name = "fmljax_experiments_main"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, f"{ROOT}/experiments/main.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _user_config(task: str) -> ml_collections.ConfigDict:
    return tiny_sinusoid_config(
        task=task, hidden=(8,), num_clients=3, num_eval_clients=3, support_size=4,
        query_size=4, num_rounds=2, rounds_per_call=2, eval_every=2, checkpoint_every=2,
        inner_lr=0.3, inner_steps=2, local_lr=0.5, server_optimizer="sgd", server_lr=1.0,
    )  # fmt: skip


def test_registered_task_through_the_cli_scores_heldout_only(tmp_path):
    config = _user_config("test-heldout-ids")
    path = tmp_path / "heldout_user_cfg.py"
    path.write_text(
        "import ml_collections\n\n\ndef get_config():\n"
        f"    return ml_collections.ConfigDict({config.to_dict()!r})\n"
    )
    run = tmp_path / "cli"
    argv = ["main.py", f"--config={path}", f"--workdir={run}", "--compilation_cache="]
    assert _main_module().cli(argv) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test"]["heldout_frac"]["mean"] == 1.0  # every scored example held out
    assert summary["test"]["heldout_frac"]["n"] == len(SIZES)
    val = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["heldout_frac"] for r in val if r["split"] == "val"] == [1.0]

    moved = train.train_and_evaluate(
        _user_config("test-heldout-ids-perturbed"), str(tmp_path / "p")
    )
    # the same training and adaptation (held-out examples never enter them), other scores
    assert moved["test"]["adapted_sum"] == summary["test"]["adapted_sum"]
    assert moved["test"]["loss"]["mean"] != summary["test"]["loss"]["mean"]
