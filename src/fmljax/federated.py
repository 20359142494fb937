"""Federated (meta-)learning rounds as pure ``init`` / ``update`` / ``evaluate`` functions.

Algorithms (each a configuration of one round function):

* ``fedavg``: FedAvg (McMahan et al., 2017, "Communication-Efficient Learning of Deep Networks
  from Decentralized Data", AISTATS); with ``fine_tune=True``, FedAvg + local fine-tuning at
  evaluation.
* ``fedmeta-maml``, ``fedmeta-fomaml``, ``fedmeta-metasgd``: FedMeta (Chen, Luo, Dong, Li &
  He, 2018, "Federated Meta-Learning with Fast Convergence and Efficient Communication").
* ``perfedavg-fo``, ``perfedavg-hf``, ``perfedavg-so``: Per-FedAvg (Fallah, Mokhtari &
  Ozdaglar, 2020, NeurIPS) with first-order, Hessian-free (finite-difference Hessian-vector
  product on an independent batch) and exact second-order meta-gradients.
* ``fedreptile``: Reptile as the server step (Jiang, Konecny, Rush & Kannan, 2019, "Improving
  Federated Learning Personalization via Model Agnostic Meta Learning").

One round, ``update(state, key, data) -> (state, metrics)``:

1. sample ``clients_per_round`` (M) of the C clients of ``data`` without replacement;
2. every sampled client runs ``local_steps`` (S) local steps under ``lax.scan``; each step
   draws ``tasks_per_client`` (T) tasks from the client's data, computes a per-task
   (meta-)gradient (mapped over T), averages it and takes an SGD step of rate ``local_lr``;
3. each client's update ``delta = start - end`` is averaged with weights proportional to the
   client's ``num_examples`` (``RoundConfig.weighting='num_examples'``, the default) or
   uniformly (``'uniform'``, Per-FedAvg's Algorithm 1), over the clients that finished the
   round only (see below);
4. the server optimiser (optax) treats the average delta as a gradient: FedAvg's model
   average is ``optax.sgd(1.0)``; FedAdam is ``server_optimizer=optax.adam(lr)``.

Partial participation, simulated inside the compiled round (Bonawitz et al., 2019, "Towards
Federated Learning at Scale: System Design", SysML, report that a few percent of the selected
devices drop out of a round; Li et al., 2020, "Federated Optimization in Heterogeneous
Networks" (FedProx), MLSys, model stragglers as clients that do less local work):

* ``dropout_prob``: each sampled client drops out of the round with this probability; a
  dropped client does not report, and the average is over the clients that finished. A round
  in which every client dropped leaves the parameters and the optimiser state unchanged (the
  round counter still advances: the round took place).
* ``straggler_prob``: each client that did not drop is a straggler with this probability and
  finishes only ``steps ~ U{1, ..., S - 1}`` of its S local steps (the remaining steps of its
  ``lax.scan`` are masked); its partial update is aggregated (FedProx's variable local work).

Non-finite updates: the round computes, per sampled client, whether its loss and update are
finite (``metrics['client_finite']``). If any client that finished is non-finite, or the
server update is, the round is *rejected*: the returned state is the input state, round
counter included, and ``metrics['finite']`` is False; the caller (``fmljax.train``) stops the
run on the host and names the round and the client (``metrics['client_id']``).

Sharding: ``build(..., client_sharding=ClientSharding(multiple, constrain))`` pads the M
sampled clients with masked clients (weight zero, never aggregated) to a multiple of
``multiple`` (the device count of the mesh's client axis) and applies ``constrain`` (a
``with_sharding_constraint`` made by :mod:`fmljax.sharding`) to the per-client arrays, so
that the jitted round partitions the clients' work over the devices; the weighted average is
then one all-reduce. The library itself never names a mesh.

FedAvg's client draws its round data once (T tasks, support and query together) and runs S
full-batch gradient steps on it (McMahan et al.'s B = infinity, E = S); this is what makes
``fedreptile`` with server rate 1, one local meta-step and ``inner_steps = S`` the same update
(Jiang et al.'s observation), which the tests check numerically.

Random keys, a documented contract (the tests rebuild a round with plain Python loops from it)::

    k_sample, k_clients = split(key)
    clients     = choice(k_sample, C, (M,), replace=False)
    client_keys = split(k_clients, M)
    step key    = fold_in(client_key, s)               s = 0 .. S-1
    task keys   = split(step_key, T)
    task        = sample_task(task_key, client_data)  -> (support, query)
    Hessian batch of perfedavg-hf (D'', the same task's data):
                  sample_task.same_task(task_key, fold_in(task_key, 1), client_data).support
                  for samplers that draw a task per call (episodic: new classes and labels),
                  else sample_task(fold_in(task_key, 1), client_data).support (a client's
                  data is its one task: client_batch_sampler, sinusoid clients)
    k_drop, k_straggle, k_steps = split(fold_in(key, 2), 3)   only with dropout / stragglers
                  (split(key) is (fold_in(key, 0), fold_in(key, 1)): stream 2 is unused)
    dropped     = bernoulli(k_drop, dropout_prob, (M,))
    straggler   = bernoulli(k_straggle, straggler_prob, (M,))
    steps       = where(straggler, randint(k_steps, (M,), 1, S), S)
    padded clients (sharding): copies of clients[i mod M] with client_keys[i mod M], masked

``jit`` is applied by the caller (the runner, a benchmark, a test): ``jax.jit(alg.update,
donate_argnums=0)`` compiles the whole round into one program; data of the same shapes and a
new key do not retrace.

Shapes: C clients in ``data``, M sampled per round, S local steps, T tasks per client,
K support and Q query examples per task.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fmljax.mapping import map_over, validate_map_mode
from fmljax.meta import adapt, meta_gradient
from fmljax.samplers import check_heldout_evaluation, evaluation_sampler

Params = Any
Batch = Mapping[str, jax.Array]
LossFn = Callable[[Params, Batch], jax.Array]
MetricsFn = Callable[[Params, Batch], dict[str, jax.Array]]
TaskSampler = Callable[[jax.Array, Any], tuple[Batch, Batch]]

__all__ = [
    "ALGORITHMS",
    "WEIGHTINGS",
    "ClientSharding",
    "FederatedAlgorithm",
    "RoundConfig",
    "ServerState",
    "build",
    "client_weights",
    "fedavg",
    "fedmeta",
    "fedreptile",
    "merge_batches",
    "perfedavg",
    "scan_rounds",
]

# name -> (client rule, meta_gradient method or None)
ALGORITHMS: dict[str, tuple[str, str | None]] = {
    "fedavg": ("fedavg", None),
    "fedmeta-maml": ("meta", "maml"),
    "fedmeta-fomaml": ("meta", "fomaml"),
    "fedmeta-metasgd": ("meta", "meta-sgd"),
    "perfedavg-fo": ("meta", "fomaml"),
    "perfedavg-hf": ("meta", "hf-fd"),
    "perfedavg-so": ("meta", "maml"),
    "fedreptile": ("reptile", "reptile"),
}


@dataclasses.dataclass(frozen=True)
class RoundConfig:
    """Static configuration of a round; every field is validated by :meth:`validate`.

    Attributes:
      clients_per_round: M, clients sampled per round (>= 1, <= C of the data).
      tasks_per_client: T, tasks each client draws per local step (>= 1).
      local_steps: S, local (meta-)steps per client per round (>= 1). Per-FedAvg's tau.
      local_lr: the client's step size (Per-FedAvg's beta; FedMeta's beta with S = 1).
      inner_lr: the inner (adaptation) rate alpha; Meta-SGD's initial per-parameter rate.
      inner_steps: inner SGD steps of the meta-learners (>= 0; >= 1 for meta methods).
      eval_inner_steps: adaptation steps at evaluation; None means ``inner_steps``.
        FedAvg: plain FedAvg (``fine_tune=False``) does not adapt and refuses a value > 0;
        FedAvg + fine-tuning (``fine_tune=True``) adapts with it (None: ``inner_steps``).
      eval_more_steps: further adaptation step counts reported at evaluation, each larger
        than the evaluation steps: ``evaluate`` keeps adapting with the same rule (Meta-SGD
        with its learned per-parameter rates) and adds ``<metric>_<k>steps`` for every ``k``.
      eval_tasks_per_client: tasks per client at evaluation (>= 1).
      client_map, task_map: how clients / tasks are mapped: 'vmap', 'map', 'chunked', 'unroll'.
      client_chunk, task_chunk: chunk sizes for 'chunked'. Measured on a 2-core CPU
        (benchmarks/RESULTS.md): for small models (the 1-40-40-1 MLP) 'vmap' is best (the
        default; a round of 32 clients runs about 2x a Python loop over clients); for Conv4
        'map' over tasks (and clients) is about 1.5x 'vmap', because one task's activations
        stay in cache while ``vmap`` over 32 tasks streams about 0.9 GB of patches and
        gradients through memory (peak 60 MB against 900 MB), so the Omniglot configs set
        ``task_map='map'`` on CPU. Plain lax convolutions under 'vmap' (grouped convolutions)
        are about 25x slower, which ``conv4(impl='auto')`` avoids on CPU.
      remat: rematerialise inner steps (second-order memory flat in ``inner_steps``).
      fd_delta: finite-difference step of Per-FedAvg-HF.
      dropout_prob: probability in [0, 1) that a sampled client drops out of a round (1.0 is
        refused: no client would ever train).
      straggler_prob: probability in [0, 1] that a client that did not drop finishes only
        ``U{1, ..., S - 1}`` local steps (needs ``local_steps >= 2``).
      weighting: how the finished clients' updates are averaged: ``'num_examples'`` (the
        default; FedAvg's ``n_k / n``, from ``data['num_examples']``, ones when absent) or
        ``'uniform'`` (``1 / M'`` over the M' clients that finished: Per-FedAvg's Algorithm
        1, Fallah et al., 2020).
    """

    clients_per_round: int = 10
    tasks_per_client: int = 4
    local_steps: int = 1
    local_lr: float = 1e-3
    inner_lr: float = 1e-2
    inner_steps: int = 1
    eval_inner_steps: int | None = None
    eval_more_steps: tuple[int, ...] = ()
    eval_tasks_per_client: int = 1
    client_map: str = "vmap"
    task_map: str = "vmap"
    client_chunk: int | None = None
    task_chunk: int | None = None
    remat: bool = False
    fd_delta: float = 1e-3
    dropout_prob: float = 0.0
    straggler_prob: float = 0.0
    weighting: str = "num_examples"

    def validate(self, algorithm: str = "") -> None:
        """Raise ValueError naming the field, its value and the allowed range.

        Every field's type is checked before its value is compared, so a string or None
        gets the same message as an out-of-range number. NumPy integers are accepted where
        an int is (bools are not), NumPy floats where a float is.
        """
        where = f"{algorithm}: " if algorithm else ""

        def need(cond: bool, field: str, allowed: str) -> None:
            if not cond:
                raise ValueError(
                    f"{where}RoundConfig.{field}={getattr(self, field)!r} is invalid: "
                    f"must be {allowed}"
                )

        for field, least in (
            ("clients_per_round", 1),
            ("tasks_per_client", 1),
            ("local_steps", 1),
            ("inner_steps", 0),
            ("eval_tasks_per_client", 1),
        ):
            v = getattr(self, field)
            need(_is_int(v) and v >= least, field, f"an int >= {least}")
        need(
            self.eval_inner_steps is None
            or (_is_int(self.eval_inner_steps) and self.eval_inner_steps >= 0),
            "eval_inner_steps",
            "None or an int >= 0",
        )
        more = self.eval_more_steps
        need(
            isinstance(more, tuple | list)
            and all(_is_int(k) and k >= 1 for k in more)
            and len(set(more)) == len(more),
            "eval_more_steps",
            "a tuple of distinct ints >= 1",
        )
        for field in ("local_lr", "inner_lr", "fd_delta"):
            v = getattr(self, field)
            need(_is_finite_real(v) and v > 0, field, "a finite number > 0")
        v = self.dropout_prob
        need(
            _is_real(v) and 0.0 <= v < 1.0,
            "dropout_prob",
            "a float in [0, 1) (at 1.0 every sampled client would drop out of every round "
            "and no client would ever train)",
        )
        v = self.straggler_prob
        need(_is_real(v) and 0.0 <= v <= 1.0, "straggler_prob", "a float in [0, 1]")
        need(
            self.straggler_prob == 0 or self.local_steps >= 2,
            "straggler_prob",
            f"0 when local_steps={self.local_steps} (a straggler finishes 1 .. S - 1 steps)",
        )
        need(isinstance(self.remat, bool | np.bool_), "remat", "True or False")
        need(self.weighting in WEIGHTINGS, "weighting", f"one of {WEIGHTINGS}")
        for field in ("client_chunk", "task_chunk"):
            v = getattr(self, field)
            need(v is None or (_is_int(v) and v >= 1), field, "None or an int >= 1")
        validate_map_mode(f"{where}RoundConfig.client_map", self.client_map, self.client_chunk)
        validate_map_mode(f"{where}RoundConfig.task_map", self.task_map, self.task_chunk)

    def _normalized(self) -> RoundConfig:
        """The same config with NumPy scalars as Python ints / floats / bools (call after
        :meth:`validate`): NumPy scalars are not weakly typed and would change dtypes."""
        ints = ("clients_per_round", "tasks_per_client", "local_steps", "inner_steps")
        ints += ("eval_tasks_per_client",)
        out: dict[str, Any] = {f: int(getattr(self, f)) for f in ints}
        out |= {f: float(getattr(self, f)) for f in _FLOAT_FIELDS}
        for f in ("eval_inner_steps", "client_chunk", "task_chunk"):
            v = getattr(self, f)
            out[f] = None if v is None else int(v)
        out["eval_more_steps"] = tuple(int(k) for k in self.eval_more_steps)
        out["remat"] = bool(self.remat)
        return dataclasses.replace(self, **out)


#: Aggregation weightings of :class:`RoundConfig` (``weighting=``).
WEIGHTINGS = ("num_examples", "uniform")

_FLOAT_FIELDS = ("local_lr", "inner_lr", "fd_delta", "dropout_prob", "straggler_prob")


def _is_int(v: Any) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    """A Python or NumPy int or float, not a bool."""
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)


def _is_finite_real(v: Any) -> bool:
    """A Python or NumPy int or float that is finite as a float (not nan, not +-inf)."""
    try:
        return _is_real(v) and math.isfinite(float(v))
    except OverflowError:  # an int too large for a float
        return False


class ServerState(NamedTuple):
    """The server's state between rounds."""

    params: Params  # the meta-model; for Meta-SGD {'params': theta, 'inner_lr': alpha}
    opt_state: optax.OptState  # the server optimiser's state
    round: jax.Array  # [] int32, rounds completed


class FederatedAlgorithm(NamedTuple):
    """``init(params) -> state``; ``update(state, key, data) -> (state, metrics)``;
    ``evaluate(state, key, data) -> per-client metrics [C]``; ``personalize(meta_params,
    support) -> params``; ``eval_sample_task``: the sampler ``evaluate`` draws its (support,
    query) tasks with (see ``build``'s ``eval_sample_task``)."""

    name: str
    config: RoundConfig
    init: Callable[[Params], ServerState]
    update: Callable[[ServerState, jax.Array, Any], tuple[ServerState, dict[str, jax.Array]]]
    evaluate: Callable[[ServerState, jax.Array, Any], dict[str, jax.Array]]
    personalize: Callable[[Params, Batch], Params]
    eval_sample_task: TaskSampler | None = None  # the sampler ``evaluate`` uses


class ClientSharding(NamedTuple):
    """How the round lays out its sampled clients; made by :func:`fmljax.sharding.client_sharding`.

    ``multiple``: the M sampled clients are padded with masked clients to a multiple of it
    (the number of devices along the mesh's client axis). ``constrain``: applied to every
    PyTree whose leading axis is the (padded) client axis, e.g. a
    ``jax.lax.with_sharding_constraint`` that shards that axis over the devices.
    """

    multiple: int
    constrain: Callable[[Any], Any]


def merge_batches(a: Batch, b: Batch) -> Batch:
    """Concatenate two batches along the example axis (FedAvg and Reptile train on both)."""
    return jax.tree.map(lambda x, y: jnp.concatenate([x, y], axis=0), dict(a), dict(b))


def client_weights(data: Any, num_clients: int) -> jax.Array:
    """Aggregation weights [C]: ``data['num_examples']`` if present, else ones; in the default
    float dtype (float64 when x64 is enabled), whatever the data's: example counts are exact
    in float32 up to 2**24, so the cast is exact and a float64 run normalises in float64."""
    float_dtype = jnp.result_type(float)  # float64 when x64 is enabled, else float32
    if isinstance(data, Mapping) and "num_examples" in data:
        return jnp.asarray(data["num_examples"]).astype(float_dtype)
    return jnp.ones((num_clients,), float_dtype)


def _mean0(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.mean(x, axis=0), tree)


def _all_finite_per_client(tree: Any) -> jax.Array:
    """[M] bool: every entry of client i's slice of every leaf is finite."""
    leaves = jax.tree.leaves(tree)
    m = leaves[0].shape[0]
    checks = [jnp.all(jnp.isfinite(x.reshape(m, -1)), axis=1) for x in leaves]
    return jnp.all(jnp.stack(checks), axis=0)


def _all_finite(tree: Any) -> jax.Array:
    checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


def _select(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def _num_clients(data: Any) -> int:
    leaves = jax.tree.leaves(data)
    if not leaves:
        raise ValueError("data: the federated dataset has no arrays")
    return int(leaves[0].shape[0])


def _check_fine_tune(fine_tune: bool, config: Any, prefix: str, ft_name: str, where: str) -> None:
    """FedAvg's ``fine_tune`` and its evaluation steps must say the same thing.

    ``config`` has ``eval_inner_steps``, ``inner_steps`` and ``eval_more_steps`` (a
    RoundConfig); ``prefix`` / ``ft_name`` spell the fields as the caller knows them.
    """
    steps = config.eval_inner_steps
    if not fine_tune:
        if steps is not None and steps > 0:
            raise ValueError(
                f"{where}: {ft_name}=False with {prefix}eval_inner_steps={steps!r} is "
                "contradictory: plain FedAvg does not adapt at evaluation; set "
                "fine_tune=True for FedAvg + fine-tuning, or eval_inner_steps=0/None"
            )
        if tuple(config.eval_more_steps):
            raise ValueError(
                f"{where}: {ft_name}=False with {prefix}eval_more_steps="
                f"{tuple(config.eval_more_steps)!r} is contradictory: plain FedAvg does not "
                "adapt at evaluation; set fine_tune=True for FedAvg + fine-tuning, or "
                "eval_more_steps=()"
            )
        return
    resolved = config.inner_steps if steps is None else steps
    if resolved < 1:
        raise ValueError(
            f"{where}: {ft_name}=True with {prefix}eval_inner_steps={steps!r} and "
            f"{prefix}inner_steps={config.inner_steps!r} is contradictory: fine-tuning adapts "
            "with eval_inner_steps (None: inner_steps) steps, which must be >= 1; set "
            "eval_inner_steps >= 1, or fine_tune=False for plain FedAvg"
        )


def _check_build_args(
    name: Any,
    loss_fn: Any,
    sample_task: Any,
    config: Any,
    server_optimizer: Any,
    metrics_fn: Any,
    eval_sample_task: Any = None,
) -> None:
    """The arguments of :func:`build` other than the config's fields, before anything runs."""
    if not isinstance(name, str) or name not in ALGORITHMS:
        close = difflib.get_close_matches(name, ALGORITHMS, n=1) if isinstance(name, str) else []
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"algorithm={name!r} is not one of {tuple(ALGORITHMS)}{hint}")
    for arg, value in (("loss_fn", loss_fn), ("sample_task", sample_task)):
        if not callable(value):
            raise ValueError(f"{name}: {arg}={value!r} is invalid: must be callable")
    if eval_sample_task is not None and not callable(eval_sample_task):
        raise ValueError(
            f"{name}: eval_sample_task={eval_sample_task!r} is invalid: must be None or callable"
        )
    if metrics_fn is not None and not callable(metrics_fn):
        raise ValueError(f"{name}: metrics_fn={metrics_fn!r} is invalid: must be None or callable")
    if not isinstance(config, RoundConfig):
        raise ValueError(
            f"{name}: config={config!r} is invalid: must be a fmljax.RoundConfig "
            "(e.g. fmljax.RoundConfig(clients_per_round=10))"
        )
    if server_optimizer is not None and not (
        callable(getattr(server_optimizer, "init", None))
        and callable(getattr(server_optimizer, "update", None))
    ):
        raise ValueError(
            f"{name}: server_optimizer={server_optimizer!r} is invalid: must be None or an "
            "optax.GradientTransformation (e.g. optax.sgd(0.1))"
        )


def build(
    name: str,
    loss_fn: LossFn,
    sample_task: TaskSampler,
    config: RoundConfig = RoundConfig(),
    *,
    server_optimizer: optax.GradientTransformation | None = None,
    metrics_fn: MetricsFn | None = None,
    fine_tune: bool = False,
    client_sharding: ClientSharding | None = None,
    eval_sample_task: TaskSampler | None = None,
    adapt_mask: Any = None,
) -> FederatedAlgorithm:
    """Build the federated algorithm ``name`` (a key of :data:`ALGORITHMS`).

    Held-out evaluation by construction: ``evaluate`` draws its tasks with
    ``eval_sample_task`` if given; else with ``sample_task.evaluation`` when ``sample_task``
    is split-aware (:class:`fmljax.samplers.SplitSampler`, e.g.
    :func:`fmljax.data.client_batch_sampler`: support from the client's ``'train'`` examples,
    query = its held-out ``'test'`` examples); else with ``sample_task`` itself, and then
    ``evaluate`` raises ValueError (at trace time, before compiling) on data that holds
    held-out examples (a key of :data:`fmljax.samplers.HELDOUT_KEYS`, as ``federate`` data
    does), since it would score training examples. ``eval_sample_task=sample_task`` asks for
    exactly that (e.g. procedural tasks such as sinusoids, whose points are fresh draws).

    Args:
      name: algorithm name.
      loss_fn: ``loss_fn(params, batch) -> scalar`` of the model.
      sample_task: ``sample_task(key, client_data) -> (support, query)``, pure and jittable;
        the training task of ``update``.
      config: the round's static configuration.
      server_optimizer: optax transformation applied to the averaged client delta; default
        ``optax.sgd(1.0)`` (FedAvg's model average).
      metrics_fn: ``metrics_fn(params, batch) -> dict`` used by ``evaluate``; default the loss.
      fine_tune: FedAvg only: adapt at evaluation (FedAvg + fine-tuning) with
        ``config.eval_inner_steps`` steps (None: ``config.inner_steps``; must come to >= 1).
        Plain FedAvg (False) does not adapt: ``eval_inner_steps`` > 0 or ``eval_more_steps``
        with ``fine_tune=False`` is refused (ValueError naming both fields).
      client_sharding: pad the sampled clients to a multiple of ``client_sharding.multiple``
        with masked clients and constrain their layout (see :mod:`fmljax.sharding`); needs
        ``client_map='vmap'`` when the multiple is above 1.
      adapt_mask: the parameters every inner loop and personalisation adapts (ANIL: the
        head, e.g. ``lambda path, leaf: "head" in path``; BOIL: the body; see
        :func:`fmljax.meta.head_mask`): a PyTree of bools shaped like the parameters or a
        function ``(path, leaf) -> bool``; the meta-gradient still reaches every parameter.
        None: all. Not for Meta-SGD's learned rates of frozen parameters (they get zero
        gradients) nor FedAvg's training (it has no inner loop; fine-tuning uses it).
      eval_sample_task: ``eval_sample_task(key, client_data) -> (support, query)``, the
        evaluation task (support ``[K, ...]`` to adapt on, query ``[Q, ...]`` to score); see
        above for None.
    """
    _check_build_args(
        name, loss_fn, sample_task, config, server_optimizer, metrics_fn, eval_sample_task
    )
    config.validate(name)
    rule, method = ALGORITHMS[name]
    if rule in ("meta", "reptile") and config.inner_steps < 1:
        raise ValueError(
            f"{name}: RoundConfig.inner_steps={config.inner_steps} is invalid: must be an int "
            ">= 1 for a meta-learning algorithm"
        )
    if not isinstance(fine_tune, bool | np.bool_):
        raise ValueError(f"{name}: fine_tune={fine_tune!r} is invalid: must be True or False")
    if fine_tune and name != "fedavg":
        raise ValueError(f"{name}: fine_tune=True is only for 'fedavg' (the others adapt)")
    if name == "fedavg":
        _check_fine_tune(bool(fine_tune), config, "RoundConfig.", "fine_tune", name)
    if client_sharding is not None:
        if not isinstance(client_sharding, ClientSharding):
            raise ValueError(
                f"{name}: client_sharding={client_sharding!r} is invalid: must be None or a "
                "ClientSharding (made by fmljax.sharding.client_sharding)"
            )
        mult = client_sharding.multiple
        if not (_is_int(mult) and mult >= 1):
            raise ValueError(
                f"{name}: client_sharding.multiple={mult!r} is invalid: must be an int >= 1"
            )
        if not callable(client_sharding.constrain):
            raise ValueError(
                f"{name}: client_sharding.constrain={client_sharding.constrain!r} is invalid: "
                "must be callable"
            )
        if mult > 1 and config.client_map != "vmap":
            raise ValueError(
                f"{name}: RoundConfig.client_map={config.client_map!r} is invalid with clients "
                f"sharded over {mult} devices: must be 'vmap' (each device maps its own clients)"
            )
        client_sharding = client_sharding._replace(multiple=int(mult))
    config = config._normalized()
    pad_multiple = 1 if client_sharding is None else client_sharding.multiple
    constrain = (lambda t: t) if client_sharding is None else client_sharding.constrain
    server_optimizer = optax.sgd(1.0) if server_optimizer is None else server_optimizer
    metrics_fn = metrics_fn or (lambda p, b: {"loss": loss_fn(p, b)})
    cfg = config
    is_metasgd = method == "meta-sgd"
    if name == "fedavg" and not fine_tune:
        eval_steps = 0  # plain FedAvg: the global model (eval_inner_steps is None or 0)
    elif cfg.eval_inner_steps is not None:
        eval_steps = cfg.eval_inner_steps
    else:
        eval_steps = cfg.inner_steps
    eval_task, guard_eval = evaluation_sampler(sample_task, eval_sample_task)
    more_steps = sorted(int(k) for k in cfg.eval_more_steps)
    if more_steps and more_steps[0] <= eval_steps:
        raise ValueError(
            f"{name}: RoundConfig.eval_more_steps={tuple(cfg.eval_more_steps)!r} is invalid: "
            f"every count must be > the evaluation steps ({eval_steps})"
        )

    same_task = getattr(sample_task, "same_task", None) or getattr(
        getattr(sample_task, "train", None), "same_task", None
    )

    def split_meta(meta_params: Params) -> tuple[Params, Any]:
        if is_metasgd:
            return meta_params["params"], meta_params["inner_lr"]
        return meta_params, cfg.inner_lr

    # ---- per-task (meta-)gradient of one client's local step --------------------------------
    def task_gradient(meta_params: Params, task_key: jax.Array, client: Any):
        support, query = sample_task(task_key, client)
        if rule == "reptile":
            batch = merge_batches(support, query)
            return meta_gradient(
                loss_fn,
                meta_params,
                batch,
                batch,
                inner_lr=cfg.inner_lr,
                inner_steps=cfg.inner_steps,
                method="reptile",
                remat=cfg.remat,
                adapt_mask=adapt_mask,
            )
        params, lr = split_meta(meta_params)
        hessian_batch = None
        if method == "hf-fd":  # D'': an independent batch of the same task
            other = jax.random.fold_in(task_key, 1)
            if same_task is not None:
                hessian_batch = same_task(task_key, other, client)[0]
            else:
                hessian_batch = sample_task(other, client)[0]
        loss, grads = meta_gradient(
            loss_fn,
            params,
            support,
            query,
            inner_lr=lr,
            inner_steps=cfg.inner_steps,
            method=method,
            hessian_batch=hessian_batch,
            fd_delta=cfg.fd_delta,
            remat=cfg.remat,
            adapt_mask=adapt_mask,
        )
        if is_metasgd:
            grads = {"params": grads[0], "inner_lr": grads[1]}
        return loss, grads

    # ---- one client's round -----------------------------------------------------------------
    mask_steps = cfg.straggler_prob > 0  # static: the default round has no step masks

    def masked(s: jax.Array, steps: jax.Array, new: Params, old: Params) -> Params:
        return _select(s < steps, new, old) if mask_steps else new

    def mean_loss(losses: jax.Array, steps: jax.Array) -> jax.Array:
        if not mask_steps:
            return jnp.mean(losses)
        done = jnp.arange(cfg.local_steps) < steps
        return jnp.sum(jnp.where(done, losses, 0)) / steps.astype(losses.dtype)

    def client_update(meta_params: Params, client_key: jax.Array, client: Any, steps: jax.Array):
        """Returns (delta = start - end, mean query loss over the ``steps`` <= S steps done)."""
        if rule == "fedavg":
            task_keys = jax.random.split(jax.random.fold_in(client_key, 0), cfg.tasks_per_client)
            tasks = map_over(
                lambda k: merge_batches(*sample_task(k, client)),
                task_keys,
                cfg.task_map,
                cfg.task_chunk,
            )  # [T, K + Q, ...]
            batch_loss = lambda p: jnp.mean(
                map_over(lambda b: loss_fn(p, b), tasks, cfg.task_map, cfg.task_chunk)
            )

            def sgd_step(p, s):
                loss, g = jax.value_and_grad(batch_loss)(p)
                new = jax.tree.map(lambda a, b: a - cfg.local_lr * b, p, g)
                return masked(s, steps, new, p), loss

            end, losses = jax.lax.scan(sgd_step, meta_params, jnp.arange(cfg.local_steps))
        else:

            def local_step(p, s):
                task_keys = jax.random.split(
                    jax.random.fold_in(client_key, s), cfg.tasks_per_client
                )
                losses, grads = map_over(
                    lambda k: task_gradient(p, k, client), task_keys, cfg.task_map, cfg.task_chunk
                )
                g = _mean0(grads)
                new = jax.tree.map(lambda a, b: a - cfg.local_lr * b, p, g)
                return masked(s, steps, new, p), jnp.mean(losses)

            end, losses = jax.lax.scan(local_step, meta_params, jnp.arange(cfg.local_steps))
        delta = jax.tree.map(jnp.subtract, meta_params, end)
        return delta, mean_loss(losses, steps)

    # ---- the round ----------------------------------------------------------------------------
    def init(params: Params) -> ServerState:
        if is_metasgd:
            meta = {
                "params": params,
                "inner_lr": jax.tree.map(lambda p: jnp.full_like(p, cfg.inner_lr), params),
            }
        else:
            meta = params
        return ServerState(meta, server_optimizer.init(meta), jnp.zeros((), jnp.int32))

    def participation(key: jax.Array, m: int) -> tuple[jax.Array, jax.Array]:
        """([M] bool finished the round, [M] int32 local steps done) of the sampled clients."""
        active = jnp.ones((m,), bool)
        steps = jnp.full((m,), cfg.local_steps, jnp.int32)
        if cfg.dropout_prob > 0 or cfg.straggler_prob > 0:
            k_drop, k_straggle, k_steps = jax.random.split(jax.random.fold_in(key, 2), 3)
            if cfg.dropout_prob > 0:
                active = ~jax.random.bernoulli(k_drop, cfg.dropout_prob, (m,))
            if cfg.straggler_prob > 0:
                straggler = jax.random.bernoulli(k_straggle, cfg.straggler_prob, (m,))
                short = jax.random.randint(k_steps, (m,), 1, cfg.local_steps, jnp.int32)
                steps = jnp.where(straggler, short, steps)
        return active, steps

    def update(state: ServerState, key: jax.Array, data: Any):
        num_clients = _num_clients(data)
        m = cfg.clients_per_round
        if m > num_clients:
            raise ValueError(
                f"{name}: RoundConfig.clients_per_round={m} is invalid: must be <= the number "
                f"of clients in data ({num_clients})"
            )
        k_sample, k_clients = jax.random.split(key)
        chosen = jax.random.choice(k_sample, num_clients, (m,), replace=False)  # [M]
        if cfg.weighting == "uniform":
            weights = jnp.ones((m,), client_weights(data, num_clients).dtype)  # [M]
        else:
            weights = client_weights(data, num_clients)[chosen]  # [M]
        client_keys = jax.random.split(k_clients, m)
        active, steps = participation(key, m)
        ids = chosen.astype(jnp.int32)
        m_pad = -(-m // pad_multiple) * pad_multiple
        if m_pad > m:  # masked copies of real clients: finite work, weight 0, never aggregated
            copy = jnp.arange(m_pad - m) % m
            chosen = jnp.concatenate([chosen, chosen[copy]])
            weights = jnp.concatenate([weights, jnp.zeros((m_pad - m,), weights.dtype)])
            client_keys = jnp.concatenate([client_keys, client_keys[copy]])
            active = jnp.concatenate([active, jnp.zeros((m_pad - m,), bool)])
            steps = jnp.concatenate([steps, steps[copy]])
            ids = jnp.concatenate([ids, jnp.full((m_pad - m,), -1, jnp.int32)])
        clients = jax.tree.map(lambda x: x[chosen], data)
        clients, client_keys, weights, active, steps, ids = constrain(
            (clients, client_keys, weights, active, steps, ids)
        )
        deltas, losses = map_over(
            lambda args: client_update(state.params, *args),
            (client_keys, clients, steps),
            cfg.client_map,
            cfg.client_chunk,
        )  # [M_pad, ...], [M_pad]
        client_finite = _all_finite_per_client(deltas) & jnp.isfinite(losses)
        w = jnp.where(active, weights, 0)
        total = jnp.sum(w)
        anyone = total > 0
        w = w / jnp.where(anyone, total, 1)

        def average(d: jax.Array) -> jax.Array:
            live = jnp.where(active.reshape((-1,) + (1,) * (d.ndim - 1)), d, 0)
            return jnp.tensordot(w.astype(d.dtype), live, axes=1)

        delta = jax.tree.map(average, deltas)
        updates, opt_state = server_optimizer.update(delta, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.all(client_finite | ~active) & _all_finite(params) & _all_finite(opt_state)
        apply = finite & anyone
        new_state = ServerState(
            _select(apply, params, state.params),
            _select(apply, opt_state, state.opt_state),
            jnp.where(finite, state.round + 1, state.round),
        )
        live_losses = jnp.where(active, losses, 0)
        metrics = {
            "loss": jnp.where(anyone, jnp.sum(w * live_losses), jnp.nan),
            "update_norm": optax.tree.norm(delta),
            "clients_finished": jnp.sum(active.astype(jnp.int32)),
            "finite": finite,
            "client_id": ids,  # [M_pad] the sampled clients' indices, -1 for padding
            "client_active": active,  # [M_pad] finished the round (not dropped, not padding)
            "client_finite": client_finite,  # [M_pad] loss and update finite
            "client_steps": steps,  # [M_pad] local steps done
            "client_loss": losses,  # [M_pad]
        }
        return new_state, metrics

    # ---- personalised evaluation --------------------------------------------------------------
    def personalize(meta_params: Params, support: Batch) -> Params:
        """Adapt the meta-model on a client's support data only (``eval_steps`` SGD steps)."""
        params, lr = split_meta(meta_params)
        mask = adapt_mask if eval_steps else None
        return adapt(loss_fn, params, support, inner_lr=lr, inner_steps=eval_steps, adapt_mask=mask)

    def evaluate(state: ServerState, key: jax.Array, data: Any) -> dict[str, jax.Array]:
        """Per-client metrics [C] on query data after adapting on support data only.

        Tasks come from the evaluation sampler (``eval_sample_task``, see :func:`build`):
        for ``federate`` data, support from each client's training examples and query = its
        held-out examples. Keys: each metric of ``metrics_fn`` after adaptation, with suffix
        ``_before`` at the meta-model, and with suffix ``_<k>steps`` after ``k`` adaptation
        steps for every ``k`` in ``eval_more_steps``. Averaged over
        ``eval_tasks_per_client`` tasks per client.
        """
        if guard_eval:
            check_heldout_evaluation(f"{name}: evaluate", sample_task, data)
        num_clients = _num_clients(data)
        keys = jax.random.split(key, num_clients)
        params0, lr = split_meta(state.params)

        def one_client(args):
            ckey, client = args

            def one_task(tkey):
                support, query = eval_task(tkey, client)
                adapted = personalize(state.params, support)
                after = metrics_fn(adapted, query)
                before = metrics_fn(params0, query)
                out = {**after, **{f"{k}_before": v for k, v in before.items()}}
                done = eval_steps
                for k in more_steps:  # keep adapting: metrics after k steps in all
                    adapted = adapt(
                        loss_fn, adapted, support, inner_lr=lr, inner_steps=k - done,
                        adapt_mask=adapt_mask,
                    )  # fmt: skip
                    done = k
                    out.update({f"{m}_{k}steps": v for m, v in metrics_fn(adapted, query).items()})
                return out

            tkeys = jax.random.split(ckey, cfg.eval_tasks_per_client)
            return _mean0(map_over(one_task, tkeys, cfg.task_map, cfg.task_chunk))

        return map_over(one_client, (keys, data), cfg.client_map, cfg.client_chunk)

    return FederatedAlgorithm(name, cfg, init, update, evaluate, personalize, eval_task)


def fedavg(
    loss_fn: LossFn,
    sample_task: TaskSampler,
    config: RoundConfig = RoundConfig(),
    *,
    fine_tune: bool = False,
    **kw,
) -> FederatedAlgorithm:
    """FedAvg (McMahan et al., 2017); ``fine_tune=True`` adapts at evaluation with
    ``config.eval_inner_steps`` (None: ``config.inner_steps``) steps; without it, a config
    with ``eval_inner_steps`` > 0 is refused (plain FedAvg scores the global model)."""
    return build("fedavg", loss_fn, sample_task, config, fine_tune=fine_tune, **kw)


def fedmeta(
    loss_fn: LossFn,
    sample_task: TaskSampler,
    config: RoundConfig = RoundConfig(),
    *,
    method: str = "maml",
    **kw,
) -> FederatedAlgorithm:
    """FedMeta (Chen et al., 2018) with ``method`` in 'maml', 'fomaml', 'metasgd'."""
    return build(f"fedmeta-{method}", loss_fn, sample_task, config, **kw)


def perfedavg(
    loss_fn: LossFn,
    sample_task: TaskSampler,
    config: RoundConfig = RoundConfig(),
    *,
    variant: str = "fo",
    **kw,
) -> FederatedAlgorithm:
    """Per-FedAvg (Fallah et al., 2020) with ``variant`` in 'fo', 'hf', 'so'."""
    return build(f"perfedavg-{variant}", loss_fn, sample_task, config, **kw)


def fedreptile(
    loss_fn: LossFn,
    sample_task: TaskSampler,
    config: RoundConfig = RoundConfig(),
    *,
    server_lr: float = 1.0,
    **kw,
) -> FederatedAlgorithm:
    """Reptile as the server step (Jiang et al., 2019): ``theta <- theta - server_lr * delta``."""
    kw.setdefault("server_optimizer", optax.sgd(server_lr))
    return build("fedreptile", loss_fn, sample_task, config, **kw)


def _blank(shape: jax.ShapeDtypeStruct) -> jax.Array:
    """The metrics of a skipped round: NaN (floats), -1 (ints), False (bools)."""
    if jnp.issubdtype(shape.dtype, jnp.floating):
        return jnp.full(shape.shape, jnp.nan, shape.dtype)
    if jnp.issubdtype(shape.dtype, jnp.bool_):
        return jnp.zeros(shape.shape, bool)
    return jnp.full(shape.shape, -1, shape.dtype)


def scan_rounds(
    update: Callable[[ServerState, jax.Array, Any], tuple[ServerState, dict[str, jax.Array]]],
    num_rounds: int,
) -> Callable[[ServerState, jax.Array, Any], tuple[ServerState, dict[str, jax.Array]]]:
    """``num_rounds`` rounds in one ``lax.scan``: ``(state, key, data) -> (state, metrics [R])``.

    Round ``r`` (counted from ``state.round``) uses the key ``fold_in(key, r)``, the same key a
    loop of single-round calls with ``fold_in(key, state.round)`` uses, so the two agree and a
    resumed run samples the same clients. Several rounds per compiled call keep small models
    from being dominated by dispatch.

    A rejected round (``metrics['finite']`` False: the state and its round counter are kept,
    see :func:`build`) ends the call's work: the remaining steps are skipped (``lax.cond``;
    nothing is computed) and leave the state as it is, so the call returns the input state of
    the failing round, as a loop that stops at the failure would, instead of repeating the
    same deterministic failure with the same key. Every step's metrics carry ``'skipped'``
    (True for the steps after a rejection; their other metrics are NaN, -1 or False).
    """
    if not isinstance(num_rounds, int) or num_rounds < 1:
        raise ValueError(f"scan_rounds: num_rounds={num_rounds!r} must be an int >= 1")

    def run(state: ServerState, key: jax.Array, data: Any):
        def tagged(m: Any, skipped: bool) -> Any:
            return {**m, "skipped": jnp.asarray(skipped)} if isinstance(m, Mapping) else m

        def one(s):
            new, m = update(s, jax.random.fold_in(key, s.round), data)
            return new, tagged(m, False)

        shapes = jax.eval_shape(one, state)[1]

        def skip(s):
            return s, tagged(jax.tree.map(_blank, shapes), True)

        def accepted(m: Any) -> jax.Array:
            ok = m.get("finite", True) if isinstance(m, Mapping) else True
            return jnp.asarray(ok, bool)

        def body(carry, _):
            s, going = carry
            s, m = jax.lax.cond(going, one, skip, s)
            return (s, going & accepted(m)), m

        (state, _), metrics = jax.lax.scan(
            body, (state, jnp.ones((), bool)), None, length=num_rounds
        )
        return state, metrics

    return run
