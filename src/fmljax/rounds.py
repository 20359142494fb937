"""The machinery of a federated round, shared by every algorithm.

A federated algorithm is an :class:`AlgorithmSpec` of small pure parts (optax's
``GradientTransformation`` style; fedjax's ``federated_algorithm.py``):

* ``client_update(server_params, client, key, steps) -> (delta, metrics)``: one client's work
  in a round (its update ``delta = start - end``, a PyTree shaped like ``server_params``, and
  its scalar metrics, at least ``'loss'``);
* ``aggregate(deltas [M, ...], weights [M], active [M]) -> (delta, w [M], anyone [])``: the
  weighted average over the clients that finished (:func:`weighted_average`);
* ``server_optimizer``: an optax ``GradientTransformation`` applied to the averaged delta;
* ``personalization``: how ``evaluate`` adapts the server's model to a client
  (:class:`Personalization`);
* ``init(params) -> server_params``: the server's parameters from the model's (Meta-SGD adds
  its learned rates).

:func:`assemble` turns a spec into a :class:`FederatedAlgorithm`: client sampling, dropout /
stragglers (:func:`participation`), padding for sharding, the client map, aggregation, the
rejection of non-finite rounds, the server step and the evaluation driver. The round and the
random-key contract are documented in :mod:`fmljax.federated`. The algorithms themselves live
one per file in :mod:`fmljax.algorithms`.

Shapes: C clients in the data, M sampled per round (M_pad after padding), S local steps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fmljax.mapping import map_over
from fmljax.meta import adapt
from fmljax.samplers import check_heldout_evaluation

Params = Any
Batch = Mapping[str, jax.Array]
LossFn = Callable[[Params, Batch], jax.Array]
MetricsFn = Callable[[Params, Batch], dict[str, jax.Array]]
TaskSampler = Callable[[jax.Array, Any], tuple[Batch, Batch]]
ClientUpdate = Callable[[Params, Any, jax.Array, jax.Array], tuple[Params, dict[str, jax.Array]]]

__all__ = [
    "AlgorithmSpec",
    "ClientSharding",
    "FederatedAlgorithm",
    "Personalization",
    "ServerState",
    "assemble",
    "client_weights",
    "local_steps",
    "merge_batches",
    "participation",
    "scan_rounds",
    "sgd_personalization",
    "weighted_average",
]


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
    config: Any  # fmljax.RoundConfig
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


class Personalization(NamedTuple):
    """How ``evaluate`` adapts the server's model to one client (pure functions).

    ``steps``: the adaptation steps of an evaluation (0: score the model as it is).
    ``model(server_params) -> params``: the model before adapting (Meta-SGD: without rates).
    ``adapt(server_params, params, support, num_steps) -> params``: ``num_steps`` (a static
    int) more adaptation steps from ``params`` on the support batch ``[K, ...]``; ``evaluate``
    calls it again from its result for each count of ``RoundConfig.eval_more_steps``.
    """

    steps: int
    model: Callable[[Params], Params]
    adapt: Callable[[Params, Params, Batch, int], Params]


def _identity(x: Any) -> Any:
    return x


def weighted_average(
    deltas: Params, weights: jax.Array, active: jax.Array
) -> tuple[Params, jax.Array, jax.Array]:
    """The round's aggregation: ``(delta, w [M], anyone [])``.

    ``deltas``: the clients' updates, leaves ``[M, ...]``; ``weights`` [M]: the unnormalised
    weights (``RoundConfig.weighting``; 0 for padding); ``active`` [M]: finished the round.
    ``w`` is the weights of the active clients normalised to sum 1 (all 0 when none finished,
    ``anyone`` False); ``delta = sum_i w_i * deltas_i`` over the active clients only, so a
    dropped or padded client's update (even a non-finite one) never enters it.
    """
    w = jnp.where(active, weights, 0)
    total = jnp.sum(w)
    anyone = total > 0
    w = w / jnp.where(anyone, total, 1)

    def average(d: jax.Array) -> jax.Array:
        live = jnp.where(active.reshape((-1,) + (1,) * (d.ndim - 1)), d, 0)
        return jnp.tensordot(w.astype(d.dtype), live, axes=1)

    return jax.tree.map(average, deltas), w, anyone


class AlgorithmSpec(NamedTuple):
    """A federated algorithm as its parts (see the module docstring for each signature).

    ``server_optimizer`` None: ``build``'s ``server_optimizer=``, else ``optax.sgd(1.0)``
    (FedAvg's model average); a ``server_optimizer=`` given to ``build`` always wins.
    """

    client_update: ClientUpdate
    personalization: Personalization
    init: Callable[[Params], Params] = _identity
    server_optimizer: optax.GradientTransformation | None = None
    aggregate: Callable[..., tuple[Params, jax.Array, jax.Array]] = weighted_average


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


def local_steps(
    step: Callable[[Params, jax.Array], tuple[Params, jax.Array]],
    start: Params,
    steps: jax.Array,
    config: Any,
) -> tuple[Params, jax.Array]:
    """A client's ``config.local_steps`` (S) local steps under ``lax.scan``.

    ``step(params, s) -> (new params, loss [])`` is local step ``s`` (an int32 scalar,
    0 .. S-1); ``steps`` [] int32 is how many this client does (S, or fewer for a straggler:
    the steps ``s >= steps`` are masked, statically absent when ``straggler_prob`` is 0).
    Returns ``(end params, mean loss over the steps done)``.
    """
    mask_steps = config.straggler_prob > 0

    def body(p, s):
        new, loss = step(p, s)
        return (_select(s < steps, new, p) if mask_steps else new), loss

    end, losses = jax.lax.scan(body, start, jnp.arange(config.local_steps))
    if not mask_steps:
        return end, jnp.mean(losses)
    done = jnp.arange(config.local_steps) < steps
    return end, jnp.sum(jnp.where(done, losses, 0)) / steps.astype(losses.dtype)


def sgd_personalization(
    loss_fn: LossFn,
    steps: int,
    inner_lr: float,
    adapt_mask: Any = None,
    split: Callable[[Params], tuple[Params, Any]] | None = None,
) -> Personalization:
    """Plain SGD adaptation on the support batch (:func:`fmljax.meta.adapt`) with rate
    ``inner_lr``, or with ``split(server_params) -> (params, rates)``'s rates (Meta-SGD)."""
    split = split or (lambda meta: (meta, inner_lr))

    def model(meta: Params) -> Params:
        return split(meta)[0]

    def adapt_more(meta: Params, params: Params, support: Batch, num_steps: int) -> Params:
        lr = split(meta)[1]
        mask = adapt_mask if num_steps else None
        return adapt(loss_fn, params, support, inner_lr=lr, inner_steps=num_steps, adapt_mask=mask)

    return Personalization(int(steps), model, adapt_more)


def participation(key: jax.Array, m: int, config: Any) -> tuple[jax.Array, jax.Array]:
    """([M] bool finished the round, [M] int32 local steps done) of the sampled clients."""
    active = jnp.ones((m,), bool)
    steps = jnp.full((m,), config.local_steps, jnp.int32)
    if config.dropout_prob > 0 or config.straggler_prob > 0:
        k_drop, k_straggle, k_steps = jax.random.split(jax.random.fold_in(key, 2), 3)
        if config.dropout_prob > 0:
            active = ~jax.random.bernoulli(k_drop, config.dropout_prob, (m,))
        if config.straggler_prob > 0:
            straggler = jax.random.bernoulli(k_straggle, config.straggler_prob, (m,))
            short = jax.random.randint(k_steps, (m,), 1, config.local_steps, jnp.int32)
            steps = jnp.where(straggler, short, steps)
    return active, steps


def assemble(
    name: str,
    spec: AlgorithmSpec,
    config: Any,
    *,
    loss_fn: LossFn,
    metrics_fn: MetricsFn | None,
    server_optimizer: optax.GradientTransformation | None,
    sample_task: TaskSampler,
    eval_task: TaskSampler,
    guard_eval: bool,
    client_sharding: ClientSharding | None = None,
) -> FederatedAlgorithm:
    """The :class:`FederatedAlgorithm` of ``spec`` (``config``: a validated, normalised
    RoundConfig). ``server_optimizer`` given here overrides ``spec.server_optimizer``."""
    cfg = config
    pers = spec.personalization
    eval_steps = pers.steps
    more_steps = sorted(int(k) for k in cfg.eval_more_steps)
    if more_steps and more_steps[0] <= eval_steps:
        raise ValueError(
            f"{name}: RoundConfig.eval_more_steps={tuple(cfg.eval_more_steps)!r} is invalid: "
            f"every count must be > the evaluation steps ({eval_steps})"
        )
    if server_optimizer is None:
        server_optimizer = spec.server_optimizer or optax.sgd(1.0)
    metrics_fn = metrics_fn or (lambda p, b: {"loss": loss_fn(p, b)})
    pad_multiple = 1 if client_sharding is None else client_sharding.multiple
    constrain = _identity if client_sharding is None else client_sharding.constrain
    client_update = spec.client_update

    def init(params: Params) -> ServerState:
        meta = spec.init(params)
        return ServerState(meta, server_optimizer.init(meta), jnp.zeros((), jnp.int32))

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
        active, steps = participation(key, m, cfg)
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
        deltas, client_metrics = map_over(
            lambda args: client_update(state.params, args[1], args[0], args[2]),
            (client_keys, clients, steps),
            cfg.client_map,
            cfg.client_chunk,
        )  # [M_pad, ...], {name: [M_pad]}
        client_metrics = dict(client_metrics)
        losses = client_metrics.pop("loss")
        client_finite = _all_finite_per_client(deltas) & jnp.isfinite(losses)
        delta, w, anyone = spec.aggregate(deltas, weights, active)
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
        metrics |= {f"client_{k}": v for k, v in client_metrics.items()}  # [M_pad] extras
        return new_state, metrics

    def personalize(meta_params: Params, support: Batch) -> Params:
        """Adapt the meta-model on a client's support data only (``eval_steps`` steps)."""
        return pers.adapt(meta_params, pers.model(meta_params), support, eval_steps)

    def evaluate(state: ServerState, key: jax.Array, data: Any) -> dict[str, jax.Array]:
        """Per-client metrics [C] on query data after adapting on support data only.

        Tasks come from the evaluation sampler (``eval_sample_task``, see
        :func:`fmljax.build`): for ``federate`` data, support from each client's training
        examples and query = its held-out examples. Keys: each metric of ``metrics_fn`` after
        adaptation, with suffix ``_before`` at the meta-model, and with suffix ``_<k>steps``
        after ``k`` adaptation steps for every ``k`` in ``eval_more_steps``. Averaged over
        ``eval_tasks_per_client`` tasks per client.
        """
        if guard_eval:
            check_heldout_evaluation(f"{name}: evaluate", sample_task, data)
        num_clients = _num_clients(data)
        keys = jax.random.split(key, num_clients)
        params0 = pers.model(state.params)

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
                    adapted = pers.adapt(state.params, adapted, support, k - done)
                    done = k
                    out.update({f"{m}_{k}steps": v for m, v in metrics_fn(adapted, query).items()})
                return out

            tkeys = jax.random.split(ckey, cfg.eval_tasks_per_client)
            return _mean0(map_over(one_task, tkeys, cfg.task_map, cfg.task_chunk))

        return map_over(one_client, (keys, data), cfg.client_map, cfg.client_chunk)

    return FederatedAlgorithm(name, cfg, init, update, evaluate, personalize, eval_task)


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
