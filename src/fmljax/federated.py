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
* ``fedprox``: FedProx (Li et al., 2020, "Federated Optimization in Heterogeneous Networks",
  MLSys): FedAvg's client with the proximal term ``(mu / 2) ||w - w_t||^2``,
  ``build("fedprox", ..., mu=0.01)``; ``mu=0`` (the default) is FedAvg.

Each algorithm is an :class:`fmljax.rounds.AlgorithmSpec` of pure parts (client update,
aggregation, server optimiser, personalisation) made by a builder in
:mod:`fmljax.algorithms` (one file each); :func:`fmljax.rounds.assemble` is the round around
them; :func:`register_algorithm` adds a user's algorithm to :data:`ALGORITHMS`.

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
import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import optax

from fmljax import algorithms as _algs
from fmljax.mapping import validate_map_mode
from fmljax.rounds import (
    AlgorithmSpec,
    ClientSharding,
    FederatedAlgorithm,
    Personalization,
    ServerState,
    assemble,
    client_weights,
    merge_batches,
    scan_rounds,
)
from fmljax.samplers import evaluation_sampler

Params = Any
Batch = Mapping[str, jax.Array]
LossFn = Callable[[Params, Batch], jax.Array]
MetricsFn = Callable[[Params, Batch], dict[str, jax.Array]]
TaskSampler = Callable[[jax.Array, Any], tuple[Batch, Batch]]

__all__ = [
    "ALGORITHMS",
    "WEIGHTINGS",
    "AlgorithmEntry",
    "AlgorithmSpec",
    "ClientSharding",
    "FederatedAlgorithm",
    "Personalization",
    "RoundConfig",
    "ServerState",
    "build",
    "client_weights",
    "fedavg",
    "fedmeta",
    "fedreptile",
    "merge_batches",
    "perfedavg",
    "register_algorithm",
    "scan_rounds",
]


class AlgorithmEntry(tuple):
    """A registered algorithm: the pair ``(family, method)`` (so ``family, method =
    ALGORITHMS[name]`` unpacks as before) with its ``builder`` as an attribute.

    ``family``: 'fedavg' (local SGD on the client's data: FedAvg, FedProx), 'meta' (local
    steps on per-task meta-gradients), 'reptile', or a user's label ('custom' by default);
    ``method``: the :func:`fmljax.meta.meta_gradient` method, or None.
    """

    builder: Callable[..., AlgorithmSpec]

    def __new__(cls, family: str, method: str | None, builder: Callable[..., AlgorithmSpec]):
        entry = super().__new__(cls, (family, method))
        entry.builder = builder
        return entry

    @property
    def family(self) -> str:
        return self[0]

    @property
    def method(self) -> str | None:
        return self[1]


#: name -> :class:`AlgorithmEntry` ``(family, method)`` with ``.builder``; the registry that
#: :func:`build`, :func:`register_algorithm` and ``fmljax.train`` read.
ALGORITHMS: dict[str, AlgorithmEntry] = {
    "fedavg": AlgorithmEntry("fedavg", None, _algs.fedavg.build),
    "fedmeta-maml": AlgorithmEntry("meta", "maml", _algs.fedmeta.builder("fedmeta-maml", "maml")),
    "fedmeta-fomaml": AlgorithmEntry(
        "meta", "fomaml", _algs.fedmeta.builder("fedmeta-fomaml", "fomaml")
    ),
    "fedmeta-metasgd": AlgorithmEntry(
        "meta", "meta-sgd", _algs.fedmeta.builder("fedmeta-metasgd", "meta-sgd")
    ),
    "perfedavg-fo": AlgorithmEntry("meta", "fomaml", _algs.perfedavg.builder_of("fo")),
    "perfedavg-hf": AlgorithmEntry("meta", "hf-fd", _algs.perfedavg.builder_of("hf")),
    "perfedavg-so": AlgorithmEntry("meta", "maml", _algs.perfedavg.builder_of("so")),
    "fedreptile": AlgorithmEntry("reptile", "reptile", _algs.fedreptile.build),
    "fedprox": AlgorithmEntry("fedavg", None, _algs.fedprox.build),
}
_BUILTIN = frozenset(ALGORITHMS)


def register_algorithm(
    name: str,
    builder: Callable[..., AlgorithmSpec],
    *,
    family: str = "custom",
    method: str | None = None,
    overwrite: bool = False,
) -> Callable[..., AlgorithmSpec]:
    """Register a federated algorithm under ``name``; ``fmljax.build(name, ...)`` (and so
    ``fmljax.train`` and ``experiments/main.py``) then runs it like a built-in.

    ``builder(loss_fn, sample_task, config, **options) -> fmljax.rounds.AlgorithmSpec`` is
    called by :func:`build` once per build, with ``config`` the validated RoundConfig (NumPy
    scalars made Python numbers) and ``options`` the keyword arguments of ``build`` that are
    not its own (the algorithm's hyperparameters, e.g. FedProx's ``mu``), plus
    ``fine_tune=True`` and ``adapt_mask=...`` only when given; a keyword the builder does not
    take is a ValueError of ``build`` naming it. Build the parts from
    :mod:`fmljax.rounds` (``local_steps``, ``sgd_personalization``, ``weighted_average``) or
    reuse an algorithm's (e.g. ``fmljax.algorithms.fedavg.local_sgd_client``).

    ``family`` / ``method``: the entry's ``ALGORITHMS[name]`` pair (descriptive).
    ``overwrite``: replace an earlier user registration (built-ins cannot be replaced).
    Returns ``builder``.
    """
    if not isinstance(name, str) or not name.strip() or name != name.strip() or "," in name:
        raise ValueError(
            f"register_algorithm: name={name!r} is invalid: must be a non-empty str without "
            "surrounding spaces or commas"
        )
    if not callable(builder):
        raise ValueError(f"register_algorithm: builder={builder!r} is invalid: must be callable")
    if name in _BUILTIN:
        raise ValueError(f"register_algorithm: name={name!r} is a built-in algorithm")
    if name in ALGORITHMS and not overwrite:
        raise ValueError(
            f"register_algorithm: name={name!r} is already registered; pass overwrite=True"
        )
    ALGORITHMS[name] = AlgorithmEntry(str(family), method, builder)
    return builder


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
    **hyperparameters: Any,
) -> FederatedAlgorithm:
    """Build the federated algorithm ``name`` (a key of :data:`ALGORITHMS`).

    The algorithm's parts come from its registered builder (:func:`register_algorithm`,
    :mod:`fmljax.algorithms`); the round around them from :func:`fmljax.rounds.assemble`.
    ``**hyperparameters`` go to the builder (FedProx: ``mu=0.01``); a keyword the algorithm
    does not take is a ValueError.

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
    if not isinstance(fine_tune, bool | np.bool_):
        raise ValueError(f"{name}: fine_tune={fine_tune!r} is invalid: must be True or False")
    builder = ALGORITHMS[name].builder
    options = dict(hyperparameters)
    if fine_tune:
        options["fine_tune"] = True
    if adapt_mask is not None:
        options["adapt_mask"] = adapt_mask
    _check_options(name, builder, options)
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
    spec = builder(loss_fn, sample_task, config, **options)
    if not isinstance(spec, AlgorithmSpec):
        raise ValueError(
            f"{name}: the registered builder returned {type(spec).__name__}, not a "
            "fmljax.rounds.AlgorithmSpec"
        )
    eval_task, guard_eval = evaluation_sampler(sample_task, eval_sample_task)
    return assemble(
        name,
        spec,
        config,
        loss_fn=loss_fn,
        metrics_fn=metrics_fn,
        server_optimizer=server_optimizer,
        sample_task=sample_task,
        eval_task=eval_task,
        guard_eval=guard_eval,
        client_sharding=client_sharding,
    )


def _check_options(name: str, builder: Callable[..., Any], options: dict[str, Any]) -> None:
    """The keywords ``build`` passes on must be ones ``builder`` takes (before compiling)."""
    try:
        sig = inspect.signature(builder)
    except (TypeError, ValueError):  # no signature to read: the call itself will tell
        return
    params = sig.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    taken = {p.name for p in params if p.kind is not inspect.Parameter.POSITIONAL_ONLY}
    for key in options:
        if key in taken:
            continue
        if key == "fine_tune":
            takers = [n for n, e in ALGORITHMS.items() if _takes(e.builder, "fine_tune")]
            raise ValueError(
                f"{name}: fine_tune=True is only for {' and '.join(map(repr, takers))} "
                "(the others adapt)"
            )
        extra = sorted(taken - {"loss_fn", "sample_task", "config", "fine_tune", "adapt_mask"})
        raise ValueError(
            f"{name}: {key}={options[key]!r} is not an option of this algorithm (its "
            f"hyperparameters: {tuple(extra)})"
            + (
                f"; did you mean {c[0]!r}?"
                if (c := difflib.get_close_matches(key, extra, 1))
                else ""
            )
        )


def _takes(builder: Callable[..., Any], key: str) -> bool:
    try:
        return key in inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return False


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
