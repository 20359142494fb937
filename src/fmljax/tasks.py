"""Task sources of the reproductions, registered with :func:`fmljax.train.register_task`.

Each builder turns an ml_collections config into a :class:`fmljax.train.TaskSetup` (model,
loss, metrics, task sampler, train / validation / test clients); ``config.task`` picks one:

* ``'sinusoid-maml'``: non-federated meta-learning on MAML's sinusoid distribution (Finn,
  Abbeel & Levine, 2017, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks",
  ICML, section 5.1). See *Centralised meta-learning as a federated round* below.
* ``'omniglot'`` with ``config.partition``:

  - ``'episodic'``: MAML's Omniglot N-way K-shot episodes (Finn et al., 2017; Vinyals et al.,
    2016) from the 1,100 / 100 / 423 character split of the reference code, per-task random
    quarter-turn rotations, the strided Conv4 with batch norm on each batch's own statistics;
  - ``'alphabet'``: federated Omniglot, one client per alphabet (FedMeta, Chen, Luo, Dong, Li
    & He, 2018, "Federated Meta-Learning with Fast Convergence and Efficient
    Communication"): the 30 background alphabets train, the 20 evaluation alphabets are new
    clients, each adapting on an episode of 10 support drawings per character and scored on 5
    validation drawings (periodic evaluation) or its 5 held-out test drawings (the summary).

* ``'synthetic'``: Synthetic(alpha, beta) (Li et al., 2020, FedProx) with the pFedMe protocol
  (Dinh, Tran & Nguyen, 2020, "Personalized Federated Learning with Moreau Envelopes",
  NeurIPS): 100 users, multinomial logistic regression, each user scored on its held-out data
  after ``eval_inner_steps`` full-batch steps on its whole training set.
* ``'digits'``: scikit-learn's 8x8 digits split pathologically, 2 classes per client
  (McMahan et al., 2017), an MLP, the same personalised evaluation.

For the labelled sets a fraction ``val_fraction`` of each client's training examples is held
out for validation. Validation rounds also score the test set of the same clients (the
``test_*`` metrics of ``metrics.jsonl``), so the test metric at the round chosen on
validation can be read back without another run; the selection uses validation only.

Centralised meta-learning as a federated round
    With ONE client whose data is the whole meta-training distribution, ``clients_per_round
    = 1``, ``local_steps = 1``, ``local_lr = 1`` and ``tasks_per_client = B`` (the
    meta-batch), a round computes the mean of the B per-task meta-gradients, the client's
    delta is exactly that mean, and the server optimiser (Adam) applies it: this is MAML's
    outer step, line for line (``fedmeta-maml`` = MAML, ``fedmeta-fomaml`` = first-order
    MAML, ``fedmeta-metasgd`` = Meta-SGD). ``fedreptile`` with server SGD of rate epsilon is
    serial-batch Reptile (Nichol, Achiam & Schulman, 2018); ``fedavg`` trained this way (loss
    of the un-adapted model on support and query together) and scored with
    ``fine_tune=True`` is MAML's "pretrained" baseline. ``'sinusoid-maml'`` draws a fresh
    sinusoid for every task of every round (the training client carries no function);
    ``'omniglot'`` episodic passes the 1,100 training characters as that one client.

Evaluation tasks
    The training loop scores each evaluation *client* (mean and 95% CI over clients), so the
    test "clients" of ``'sinusoid-maml'`` are 600 fixed sinusoids and those of episodic
    ``'omniglot'`` are ``num_eval_tasks`` task ids, each drawing one episode from the held-out
    characters (a device constant of the evaluation program): 600 test tasks, one each.
    Every task gives its evaluation sampler as ``TaskSetup.eval_sample_task`` (the rounds
    use ``sample_task`` on the training clients only): the labelled sets adapt on a
    client's whole training set and score its held-out set, federated Omniglot adapts on
    support drawings and scores held-out drawings of the same characters.

Loss reduction and batch norm of the MAML reference code (``cbfinn/maml``)
    Its Omniglot loss is ``softmax_cross_entropy / update_batch_size`` per example and the
    inner gradient is ``tf.gradients`` of that vector, i.e. of its SUM: the inner loss is
    ``N * mean cross-entropy`` (N ways). ``config.loss_reduction = 'per_way_sum'`` (the
    Omniglot configs set it) is that loss (``fmljax.cross_entropy_loss(apply,
    reduction='per_way_sum')``), so that the reference inner rates 0.4 / 0.1 mean what they
    meant there (with a plain mean they would be N times smaller steps); ``'mean'`` (the
    default) is the mean. The outer loss is the mean over tasks of the same quantity; Adam is
    invariant to the constant. Batch norm normalises every batch (support or query, train or
    test) with its own statistics and keeps no running averages, the reference's mode
    (``is_training`` is never False there); the learned offset, no learned scale
    (``center=True, scale=False``). The network-protocol fields of :func:`build_model`
    (``conv_blocks``, ``conv_padding``, ``bn_scale``, ``bn_eps``, ``conv_init``, with
    ``conv_mode``) default to the reference; see :func:`fmljax.conv4`.

Sinusoid metrics after 1 and 10 steps
    ``'sinusoid-maml'`` evaluates with ``eval_inner_steps`` (1) steps as every algorithm
    adapts (Meta-SGD with its learned rates); ``eval_more_steps = (10,)`` in its config adds
    ``mse_10steps``: the same adaptation continued to 10 steps on the same K support points,
    with the algorithm's own rule (``inner_lr`` SGD; Meta-SGD its learned per-parameter
    rates), see :class:`fmljax.RoundConfig`.

Omniglot without the archive
    ``config.omniglot_source = 'procedural'`` builds a small procedural stand-in (random stroke
    prototypes per class, jittered drawings; alphabets of 10 characters) for tests and smoke
    runs; otherwise the archive is read from ``config.omniglot_source`` or
    ``$FMLJAX_OMNIGLOT``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import fmljax
from fmljax.data.episodes import (
    client_batch_sampler,
    episode_task_sampler,
    full_client_task,
    sample_episode,
)
from fmljax.data.partition import pad_clients
from fmljax.data.sinusoid import AMPLITUDE_RANGE, PHASE_RANGE, sinusoid_task_sampler
from fmljax.losses import REDUCTIONS
from fmljax.models import CONV_INITS, PADDINGS, _pads
from fmljax.train import TaskSetup, register_task

__all__ = [
    "OMNIGLOT_PARTITIONS",
    "build_model",
    "carve_validation",
    "param_bytes",
    "procedural_omniglot",
]

OMNIGLOT_PARTITIONS = ("episodic", "alphabet")

Batch = dict[str, jax.Array]


def _need(config: ml_collections.ConfigDict, cond: bool, field: str, allowed: str) -> None:
    if not cond:
        raise ValueError(f"config.{field}={config.get(field)!r} is invalid: must be {allowed}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _dtype(config: ml_collections.ConfigDict):
    return jnp.float64 if config.get("float64", False) else jnp.float32


def build_model(config: ml_collections.ConfigDict) -> fmljax.Model:
    """The model of ``config.task`` (no data is loaded: used to count communicated bytes)."""
    task = config.task
    dtype = _dtype(config)
    if task in ("sinusoid", "sinusoid-maml"):
        return fmljax.mlp((1, *tuple(config.get("hidden", (40, 40))), 1), dtype=dtype)
    if task == "omniglot":
        return fmljax.conv4(
            config.ways,
            filters=config.filters,
            mode=config.get("conv_mode", "strided"),
            blocks=config.get("conv_blocks", 4),
            padding=config.get("conv_padding", "SAME"),
            bn_scale=config.get("bn_scale", False),
            bn_eps=config.get("bn_eps", 1e-3),
            init=config.get("conv_init", "glorot"),
            dtype=dtype,
        )
    if task == "synthetic":
        return fmljax.logistic_regression(60, 10, dtype=dtype)
    if task == "digits":
        return fmljax.mlp((64, *tuple(config.get("hidden", (100,))), 10), dtype=dtype)
    raise ValueError(f"config.task={task!r} has no model here")


# --------------------------------------------------------------------------------------------
# Sinusoid regression, MAML's setting (non-federated meta-learning).


@register_task("sinusoid-maml", fields=("eval_query_size", "num_eval_tasks", "num_val_tasks"))
def _sinusoid_maml(config: ml_collections.ConfigDict) -> TaskSetup:
    k, q = config.support_size, config.query_size
    q_eval = config.get("eval_query_size", q)
    for field, value in (("support_size", k), ("query_size", q), ("eval_query_size", q_eval)):
        _need(config, isinstance(value, int) and value >= 1, field, "an int >= 1")
    dtype = _dtype(config)
    model = build_model(config)
    loss_fn = fmljax.mse_loss(model.apply)
    train_sampler = sinusoid_task_sampler(k, q)
    eval_sampler = sinusoid_task_sampler(k, q_eval)

    def sample_task(key: jax.Array, client: Mapping[str, jax.Array]) -> tuple[Batch, Batch]:
        ka, kp, kt = jax.random.split(key, 3)  # the training client: a fresh sinusoid per task
        fresh = {
            "amplitude": jax.random.uniform(ka, (), dtype, *AMPLITUDE_RANGE),
            "phase": jax.random.uniform(kp, (), dtype, *PHASE_RANGE),
        }
        return train_sampler(kt, fresh)

    def metrics_fn(params: Any, batch: Batch) -> dict[str, jax.Array]:
        return {"mse": loss_fn(params, batch)}

    key = jax.random.key(config.data_seed)
    k_va, k_te = jax.random.split(key)
    n_eval = config.get("num_eval_tasks", 600)
    return TaskSetup(
        model=model,
        loss_fn=loss_fn,
        metrics_fn=metrics_fn,
        sample_task=sample_task,
        eval_sample_task=eval_sampler,  # a fixed evaluation sinusoid: K and Q fresh points
        train_data={"num_examples": jnp.ones((1,), dtype)},
        val_data=fmljax.data.sample_sinusoid_clients(k_va, config.get("num_val_tasks", 100), dtype),
        test_data=fmljax.data.sample_sinusoid_clients(k_te, n_eval, dtype),
        target_metric="mse",
    )


# --------------------------------------------------------------------------------------------
# Omniglot.


def procedural_omniglot(
    num_alphabets: int = 8,
    chars_per_alphabet: int = 10,
    drawings: int = 20,
    image_size: int = 28,
    seed: int = 0,
) -> fmljax.data.omniglot.OmniglotData:
    """A procedural Omniglot stand-in: each character a few random strokes (its prototype),
    each drawing the prototype shifted by up to one pixel with 5% of the ink pixels dropped.

    The first half of the alphabets are "background", the rest "evaluation"."""
    from fmljax.data.omniglot import OmniglotData

    rng = np.random.default_rng(seed)
    n = num_alphabets * chars_per_alphabet
    s = image_size
    images = np.zeros((n, drawings, s, s), np.uint8)
    for c in range(n):
        proto = np.zeros((s + 2, s + 2), np.uint8)
        for _ in range(3):  # three straight strokes
            x0, y0, x1, y1 = rng.integers(3, s - 1, 4)
            t = np.linspace(0, 1, 2 * s)
            proto[
                np.round(y0 + t * (y1 - y0)).astype(int), np.round(x0 + t * (x1 - x0)).astype(int)
            ] = 1
        for d in range(drawings):
            dy, dx = rng.integers(0, 3, 2)
            img = proto[dy : dy + s, dx : dx + s].copy()
            img[rng.random(img.shape) < 0.05] = 0
            images[c, d] = img
    alphabet = np.repeat(np.arange(num_alphabets, dtype=np.int32), chars_per_alphabet)
    return OmniglotData(
        images=images,
        character=np.arange(n, dtype=np.int32),
        alphabet=alphabet,
        character_in_alphabet=np.tile(np.arange(chars_per_alphabet, dtype=np.int32), num_alphabets),
        background=alphabet < num_alphabets // 2,
        rotation=np.zeros(n, np.int32),
        alphabet_names=tuple(f"alphabet{i}" for i in range(num_alphabets)),
    )


def _load_omniglot(config: ml_collections.ConfigDict):
    from fmljax.data.omniglot import load_omniglot

    source = config.get("omniglot_source", None)
    size = config.get("image_size", 28)
    if source == "procedural":
        return procedural_omniglot(image_size=size, seed=config.data_seed)
    return load_omniglot(source, image_size=size)


def _classification_fns(config: ml_collections.ConfigDict, model: fmljax.Model):
    reduction = config.get("loss_reduction", "mean")
    _need(config, reduction in REDUCTIONS, "loss_reduction", f"one of {REDUCTIONS}")
    loss_fn = fmljax.cross_entropy_loss(model.apply, reduction=reduction)
    return loss_fn, fmljax.classification_metrics(model.apply)


def _check_conv_fields(config: ml_collections.ConfigDict) -> None:
    """The network-protocol fields of :func:`build_model`'s Conv4 (before any data is read)."""
    blocks = config.get("conv_blocks", 4)
    _need(config, _is_int(blocks) and 1 <= blocks <= 8, "conv_blocks", "an int in [1, 8]")
    _need(
        config, config.get("conv_padding", "SAME") in PADDINGS, "conv_padding", f"one of {PADDINGS}"
    )
    eps = config.get("bn_eps", 1e-3)
    _need(
        config,
        isinstance(eps, float | int) and not isinstance(eps, bool) and 0 < eps < float("inf"),
        "bn_eps",
        "a finite float > 0",
    )
    _need(config, isinstance(config.get("bn_scale", False), bool), "bn_scale", "True or False")
    _need(
        config, config.get("conv_init", "glorot") in CONV_INITS, "conv_init", f"one of {CONV_INITS}"
    )
    # The image size through the blocks, by the convolution's own padding arithmetic.
    size = image = config.get("image_size", 28)
    pooled = config.get("conv_mode", "strided") == "pooled"
    for _ in range(blocks):
        size = _pads(size, 1 if pooled else 2, 3, config.get("conv_padding", "SAME"))[2]
        size = size // 2 if pooled else size
        _need(
            config,
            size >= 1,
            "conv_blocks",
            f"small enough for {image}x{image} images (a block's output would be empty)",
        )


@register_task(
    "omniglot",
    fields=(
        "partition",
        "ways",
        "shots",
        "queries",
        "augmentation",
        "omniglot_source",
        "image_size",
        "filters",
        "conv_mode",
        "conv_blocks",
        "conv_padding",
        "bn_eps",
        "bn_scale",
        "conv_init",
        "loss_reduction",
        "num_val_tasks",
        "num_eval_tasks",
        "eval_query_size",
        "val_fraction",
        "batch_size",
    ),
)
def _omniglot(config: ml_collections.ConfigDict) -> TaskSetup:
    from fmljax.data.omniglot import omniglot_clients, split_omniglot

    partition = config.get("partition", "episodic")
    _need(config, partition in OMNIGLOT_PARTITIONS, "partition", f"one of {OMNIGLOT_PARTITIONS}")
    for field in ("ways", "shots", "queries"):
        v = config.get(field)
        _need(config, isinstance(v, int) and v >= 1, field, "an int >= 1")
    _need(config, config.ways >= 2, "ways", "an int >= 2")
    _check_conv_fields(config)
    data = _load_omniglot(config)
    model = build_model(config)
    loss_fn, metrics_fn = _classification_fns(config, model)
    ways, shots, queries = config.ways, config.shots, config.queries
    augmentation = config.get("augmentation", "maml" if partition == "episodic" else "none")

    if partition == "episodic":
        procedural = config.get("omniglot_source", None) == "procedural"
        splits = split_omniglot(data, "maml", sizes=(40, 10) if procedural else None)
        for name in ("train", "val", "test"):
            if splits[name].num_classes < ways:
                raise ValueError(
                    f"config.ways={ways} is invalid: must be <= the {splits[name].num_classes} "
                    f"{name} characters"
                )
        train_images = jnp.asarray(splits["train"].images)[None]  # one client: [1, classes, ...]
        pools = {
            "val": jnp.asarray(splits["val"].images),
            "test": jnp.asarray(splits["test"].images),
        }

        def sample_task(key: jax.Array, client: Mapping[str, Any]):  # the meta-training client
            return sample_episode(
                key,
                client["images"],
                ways=ways,
                shots=shots,
                queries=queries,
                augmentation=augmentation,
            )

        def same_task(key: jax.Array, other_key: jax.Array, client: Mapping[str, Any]):
            return sample_episode(
                key,
                client["images"],
                ways=ways,
                shots=shots,
                queries=queries,
                augmentation=augmentation,
                example_key=other_key,
            )

        sample_task.same_task = same_task  # Per-FedAvg-HF's D'': the same episode's classes

        def eval_task(key: jax.Array, client: Mapping[str, Any]):
            # an evaluation task id: one episode of the held-out characters
            pool = pools["val" if "val_task" in client else "test"]
            key = jax.random.fold_in(
                key, client["val_task" if "val_task" in client else "test_task"]
            )
            return sample_episode(
                key, pool, ways=ways, shots=shots, queries=queries, augmentation=augmentation
            )

        n_val = config.get("num_val_tasks", 100)
        n_test = config.get("num_eval_tasks", 600)
        return TaskSetup(
            model=model,
            loss_fn=loss_fn,
            metrics_fn=metrics_fn,
            sample_task=sample_task,
            eval_sample_task=eval_task,
            train_data={"images": train_images, "num_examples": jnp.ones((1,), jnp.float32)},
            val_data={"val_task": jnp.arange(n_val)},
            test_data={"test_task": jnp.arange(n_test)},
            target_metric="accuracy",
        )

    # One client per alphabet: the 30 background alphabets train; the 20 evaluation alphabets
    # are new clients, each with 10 support drawings per character, 5 validation and 5 test.
    held = omniglot_clients(split_omniglot(data, "background-evaluation")["test"], seed=0)
    train = omniglot_clients(
        split_omniglot(data, "background-evaluation")["train"], seed=config.data_seed
    )
    train_only = {k: v for k, v in train.items() if k != "test_images"}
    e_sup = held["images"].shape[2] - held["test_images"].shape[2]
    if e_sup < shots:
        raise ValueError(f"config.shots={shots} is invalid: must be <= {e_sup}")
    common = {k: held[k] for k in ("num_classes", "num_examples")}
    val_data = {
        **common,
        "images": held["images"][:, :, :e_sup],
        "test_images": held["images"][:, :, e_sup:],
        "heldout_images": held["test_images"],
    }
    test_data = {**common, "images": val_data["images"], "test_images": held["test_images"]}
    train_sampler = episode_task_sampler(
        ways=ways, shots=shots, queries=queries, augmentation=augmentation, data=train_only
    )
    eval_sampler = episode_task_sampler(
        ways=ways, shots=shots, queries=queries, query_key="test_images", data=test_data
    )
    heldout_sampler = episode_task_sampler(
        ways=ways, shots=shots, queries=queries, query_key="heldout_images", data=val_data
    )

    def eval_fed(key: jax.Array, client: Mapping[str, Any]):
        support, query = eval_sampler(key, client)  # support drawings -> held-out drawings
        if "heldout_images" in client:  # the same episode (key, classes, labels, support) ...
            held_query = heldout_sampler(key, client)[1]  # ... scored on the test drawings
            query = {**query, "hx": held_query["x"], "hy": held_query["y"]}
        return support, query

    return TaskSetup(
        model=model,
        loss_fn=loss_fn,
        metrics_fn=_with_heldout(metrics_fn),
        sample_task=train_sampler,
        eval_sample_task=eval_fed,
        train_data=train_only,
        val_data=val_data,
        test_data=test_data,
        target_metric="accuracy",
    )


def _with_heldout(metrics_fn):
    """Metrics on the query and, where the query carries a held-out test set (``'hx'``,
    ``'hy'``, optional ``'hmask'``: validation rounds), the same metrics on it as ``test_*``,
    so that ``metrics.jsonl`` holds the test metric of the round chosen on validation."""

    def metrics(params: Any, batch: Batch) -> dict[str, jax.Array]:
        out = metrics_fn(params, {k: batch[k] for k in ("x", "y", "mask") if k in batch})
        if "hx" in batch:
            held = {"x": batch["hx"], "y": batch["hy"]}
            if "hmask" in batch:
                held["mask"] = batch["hmask"]
            out.update({f"test_{k}": v for k, v in metrics_fn(params, held).items()})
        return out

    return metrics


# --------------------------------------------------------------------------------------------
# Labelled federated datasets: Synthetic(alpha, beta) and digits.


def carve_validation(fed: Mapping[str, Any], fraction: float, seed: int = 0) -> dict[str, Any]:
    """Split each client's train examples into train and validation.

    ``fed`` is a padded federated dataset (:func:`fmljax.data.partition.federate` layout).
    Returns ``{'train': {'train': ...,'num_examples'}, 'val': {'train', 'test': val part,
    'heldout': test part}, 'test': {'train', 'test'}}``: the last ``max(1, int(fraction *
    n))`` of a client's ``n`` train examples (already shuffled by the partition) become its
    validation set; the test part is untouched. Training clients see only ``'train'``.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"carve_validation: fraction={fraction!r} must be in (0, 1)")
    del seed
    x, y, mask = (np.asarray(fed["train"][k]) for k in ("x", "y", "mask"))
    tr_x, tr_y, va_x, va_y = [], [], [], []
    for c in range(x.shape[0]):
        n = int(mask[c].sum())
        n_val = max(1, int(fraction * n))
        if n - n_val < 1:
            raise ValueError(f"carve_validation: client {c} has {n} train examples, too few")
        tr_x.append(x[c, : n - n_val])
        tr_y.append(y[c, : n - n_val])
        va_x.append(x[c, n - n_val : n])
        va_y.append(y[c, n - n_val : n])
    train = pad_clients(tr_x, tr_y)
    num = jnp.asarray([len(t) for t in tr_y], jnp.float32)
    return {
        "train": {"train": train, "num_examples": num},
        "val": {
            "train": train,
            "test": pad_clients(va_x, va_y),
            "heldout": dict(fed["test"]),
            "num_examples": num,
        },
        "test": {"train": train, "test": dict(fed["test"]), "num_examples": num},
    }


def _labelled_setup(
    config: ml_collections.ConfigDict, fed: Mapping[str, Any], model: fmljax.Model
) -> TaskSetup:
    parts = carve_validation(fed, config.get("val_fraction", 0.2))
    batch = config.get("batch_size", 20)
    train_sampler = client_batch_sampler(batch, batch, source="train", data=parts["train"])

    def eval_task(key: jax.Array, client: Mapping[str, Any]):
        support, query = full_client_task(key, client)  # whole train set -> held-out set
        if "heldout" in client:  # validation rounds also score the test set (``test_*``)
            h = client["heldout"]
            query = {**query, "hx": h["x"], "hy": h["y"], "hmask": h["mask"]}
        return support, query

    loss_fn = fmljax.cross_entropy_loss(model.apply)
    return TaskSetup(
        model=model,
        loss_fn=loss_fn,
        metrics_fn=_with_heldout(fmljax.classification_metrics(model.apply)),
        sample_task=train_sampler,
        eval_sample_task=eval_task,
        train_data=parts["train"],
        val_data=parts["val"],
        test_data=parts["test"],
        target_metric="accuracy",
    )


@register_task(
    "synthetic", fields=("alpha", "beta", "variant", "max_examples", "val_fraction", "batch_size")
)
def _synthetic(config: ml_collections.ConfigDict) -> TaskSetup:
    from fmljax.data.synthetic import synthetic_federated

    fed = synthetic_federated(
        config.get("alpha", 0.5),
        config.get("beta", 0.5),
        num_clients=config.get("num_clients", 100),
        variant=config.get("variant", "pfedme"),
        seed=config.data_seed,
        max_examples=config.get("max_examples", None),
    )
    return _labelled_setup(config, fed, build_model(config))


@register_task("digits", fields=("partition", "classes_per_client", "val_fraction", "batch_size"))
def _digits(config: ml_collections.ConfigDict) -> TaskSetup:
    from fmljax.data.digits import digits_federated

    fed = digits_federated(
        config.get("num_clients", 50),
        partition=config.get("partition", "pathological"),
        classes_per_client=config.get("classes_per_client", 2),
        seed=config.data_seed,
    )
    return _labelled_setup(config, fed, build_model(config))


def param_bytes(config: ml_collections.ConfigDict) -> int:
    """Bytes of one copy of the communicated meta-model (Meta-SGD: parameters and rates)."""
    model = build_model(config)
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    n = sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in jax.tree.leaves(shapes))
    return 2 * n if config.algorithm == "fedmeta-metasgd" else n
