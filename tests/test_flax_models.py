"""Flax models (``fmljax.models.from_linen`` / ``from_nnx``) and the one model contract
(``apply(params, x)``; ``mask_aware`` marks an apply that takes the padding mask).

Flax copies of ``fmljax.conv4`` and ``fmljax.mlp``, loaded with the same weights, give the same
exact second-order MAML meta-gradient (float64) on unpadded and padded batches; only the
trainable parameters enter gradients; a plain ``lambda p, x: ...`` model runs every federated
algorithm on padded clients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from helpers import flat, image_task, regression_task, rel_err, tiny_conv4, tiny_mlp

import fmljax
from fmljax.federated import ALGORITHMS, RoundConfig
from fmljax.models import from_linen, from_nnx, mask_aware, takes_mask

F64 = jnp.float64
NUM_CLASSES = 3
EPS = 1e-3  # fmljax.conv4's batch-norm epsilon (TensorFlow's default, the MAML reference's)
INNER_LR, INNER_STEPS = 0.1, 2

# nnx.BatchNorm keeps float32 running statistics; under float64 its (discarded) update warns.
pytestmark = pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types")


def _bn_mask(mask, ndim: int):
    """A [B] padding mask as the boolean mask Flax's BatchNorm broadcasts to its input."""
    return None if mask is None else mask.reshape((-1,) + (1,) * (ndim - 1)) > 0


# ---- Flax copies of fmljax.conv4 (strided, SAME, BN scale + offset, eps 1e-3) and fmljax.mlp


class LinenConv4(nn.Module):
    """``tiny_conv4()``: 4 blocks of 3x3 stride-2 SAME conv, batch norm, ReLU; mean; dense."""

    filters: int = 2

    @nn.compact
    def __call__(self, x, mask=None):
        h = x
        for _ in range(4):
            h = nn.Conv(self.filters, (3, 3), strides=2, padding="SAME", param_dtype=F64)(h)
            h = nn.BatchNorm(
                use_running_average=False, epsilon=EPS, use_fast_variance=False, param_dtype=F64
            )(h, mask=_bn_mask(mask, h.ndim))
            h = nn.relu(h)
        return nn.Dense(NUM_CLASSES, param_dtype=F64)(jnp.mean(h, axis=(1, 2)))


class NnxConv4(nnx.Module):
    """The same network as :class:`LinenConv4` in nnx."""

    def __init__(self, filters: int = 2, *, rngs: nnx.Rngs):
        cins = (1,) + (filters,) * 3
        self.convs = nnx.List(
            [
                nnx.Conv(c, filters, (3, 3), strides=2, padding="SAME", param_dtype=F64, rngs=rngs)
                for c in cins
            ]
        )
        self.bns = nnx.List(
            [
                nnx.BatchNorm(
                    filters, epsilon=EPS, use_fast_variance=False, param_dtype=F64, rngs=rngs
                )
                for _ in cins
            ]
        )
        self.head = nnx.Linear(filters, NUM_CLASSES, param_dtype=F64, rngs=rngs)

    def __call__(self, x, mask=None):
        h = x
        for conv, bn in zip(self.convs, self.bns, strict=True):
            h = jax.nn.relu(bn(conv(h), mask=_bn_mask(mask, h.ndim)))
        return self.head(jnp.mean(h, axis=(1, 2)))


class LinenMLP(nn.Module):
    """``tiny_mlp()``: 1-6-6-1 tanh."""

    @nn.compact
    def __call__(self, x):
        h = x
        for width in (6, 6):
            h = jnp.tanh(nn.Dense(width, param_dtype=F64)(h))
        return nn.Dense(1, param_dtype=F64)(h)


class NnxMLP(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [nnx.Linear(a, b, param_dtype=F64, rngs=rngs) for a, b in ((1, 6), (6, 6), (6, 1))]
        )

    def __call__(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            x = jnp.tanh(x) if i < 2 else x
        return x


# ---- fmljax params <-> Flax params (the same weights under the frameworks' names) ----------


def _conv_to_linen(p):
    out = {"Dense_0": {"kernel": p["head"]["w"], "bias": p["head"]["b"]}}
    for i in range(4):
        c = p[f"conv{i}"]
        out[f"Conv_{i}"] = {"kernel": c["w"], "bias": c["b"]}
        out[f"BatchNorm_{i}"] = {"scale": c["scale"], "bias": c["offset"]}
    return out


def _conv_from_linen(t):
    out = {"head": {"w": t["Dense_0"]["kernel"], "b": t["Dense_0"]["bias"]}}
    for i in range(4):
        conv, bn = t[f"Conv_{i}"], t[f"BatchNorm_{i}"]
        out[f"conv{i}"] = {
            "w": conv["kernel"],
            "b": conv["bias"],
            "scale": bn["scale"],
            "offset": bn["bias"],
        }
    return out


def _conv_to_nnx(p):
    linen = _conv_to_linen(p)
    return {
        "convs": {i: linen[f"Conv_{i}"] for i in range(4)},
        "bns": {i: linen[f"BatchNorm_{i}"] for i in range(4)},
        "head": linen["Dense_0"],
    }


def _conv_from_nnx(t):
    linen = {"Dense_0": t["head"]}
    for i in range(4):
        linen[f"Conv_{i}"], linen[f"BatchNorm_{i}"] = t["convs"][i], t["bns"][i]
    return _conv_from_linen(linen)


def _mlp_to_linen(p):
    return {
        f"Dense_{i}": {"kernel": p[f"dense{i}"]["w"], "bias": p[f"dense{i}"]["b"]} for i in range(3)
    }


def _mlp_from_linen(t):
    return {
        f"dense{i}": {"w": t[f"Dense_{i}"]["kernel"], "b": t[f"Dense_{i}"]["bias"]}
        for i in range(3)
    }


def _mlp_to_nnx(p):
    return {"layers": {i: v for i, v in enumerate(_mlp_to_linen(p).values())}}


def _mlp_from_nnx(t):
    return _mlp_from_linen({f"Dense_{i}": t["layers"][i] for i in range(3)})


def _perturbed(params, key, scale=0.3):
    """Non-trivial weights (nonzero biases and offsets, scales off 1) for a stronger check."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef,
        [
            p + scale * jax.random.normal(k, p.shape, p.dtype)
            for p, k in zip(leaves, keys, strict=True)
        ],
    )


def _padded(batch, rows: int, value: float):
    """``batch`` with ``rows`` padding examples (x = value, y = 0) masked out."""
    n = batch["x"].shape[0]
    x_pad = jnp.full((rows,) + batch["x"].shape[1:], value, batch["x"].dtype)
    y_pad = jnp.zeros((rows,) + batch["y"].shape[1:], batch["y"].dtype)
    return {
        "x": jnp.concatenate([batch["x"], x_pad]),
        "y": jnp.concatenate([batch["y"], y_pad]),
        "mask": jnp.concatenate([jnp.ones(n, F64), jnp.zeros(rows, F64)]),
    }


def _compiled(fn, *args):
    """``jax.jit(fn)`` compiled for ``args`` at optimisation level 0: a short compile (the
    values are what is checked here, not speed; the same XLA ops are run)."""
    return jax.jit(fn).lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})


def _compile_once(fn, *args):
    """One program for all checks of a test (see :func:`_compiled`), run on ``args``."""
    return _compiled(fn, *args)(*args)


def _maml(loss, params, support, query, method="maml", inner_lr=INNER_LR):
    return fmljax.meta_gradient(
        loss, params, support, query, inner_lr=inner_lr, inner_steps=INNER_STEPS, method=method
    )


# Exact second-order meta-gradients of the same function, computed by different code (im2col vs
# lax conv, a different order of the batch-norm products): float64 rounding, far below 1e-10.
TOL_SAME = 1e-10


def test_flax_conv4_meta_gradient_equals_fmljax_conv4(x64):
    ref = tiny_conv4(NUM_CLASSES)
    assert takes_mask(ref.apply)
    p = _perturbed(ref.init(jax.random.key(0)), jax.random.key(5))
    support, query = image_task(jax.random.key(1), n=NUM_CLASSES)
    batches = {
        "unpadded": (support, query),
        "padded": (_padded(support, 2, 5.0), _padded(query, 3, -4.0)),
    }
    linen = from_linen(LinenConv4(), support["x"], mask_aware=True)
    linen_blind = from_linen(LinenConv4(), support["x"])  # not mask-aware: pads enter BN stats
    nnx_model = from_nnx(lambda rngs: NnxConv4(rngs=rngs), mask_aware=True)
    assert takes_mask(linen.apply) and takes_mask(nnx_model.apply)
    assert not takes_mask(linen_blind.apply)
    # The adapters' init gives the Flax layout the converters map onto.
    assert jax.tree.structure(linen.init(jax.random.key(0))) == jax.tree.structure(
        _conv_to_linen(p)
    )
    assert jax.tree.structure(nnx_model.init(jax.random.key(0))) == jax.tree.structure(
        _conv_to_nnx(p)
    )

    def everything(p):
        ce = fmljax.cross_entropy_loss
        out = {("unpadded", "fmljax"): _maml(ce(ref.apply), p, support, query)}
        for name, (s, q) in batches.items():
            ql, g = _maml(ce(linen.apply), _conv_to_linen(p), s, q)
            out[name, "linen"] = ql, _conv_from_linen(g)
            ql, g = _maml(ce(nnx_model.apply), _conv_to_nnx(p), s, q)
            out[name, "nnx"] = ql, _conv_from_nnx(g)
        return out

    out = _compile_once(everything, p)
    # Masked padding changes nothing (fmljax.conv4's batch norm excludes it; test_meta checks
    # conv4 itself): the padded task's meta-gradient is the unpadded one's.
    want_loss, want = out["unpadded", "fmljax"]
    for name in batches:
        for fw in ("linen", "nnx"):
            got_loss, got = out[name, fw]
            assert rel_err(flat(got), flat(want)) < TOL_SAME, (name, fw)
            np.testing.assert_allclose(got_loss, want_loss, rtol=TOL_SAME)
    # Without the mask the padding enters the batch statistics: the padded check can fail.
    s_pad = batches["padded"][0]
    n = support["x"].shape[0]
    lp = _conv_to_linen(p)
    blind_logits = linen_blind.apply(lp, s_pad["x"])[:n]
    masked_logits = linen.apply(lp, s_pad["x"], mask=s_pad["mask"])[:n]
    np.testing.assert_allclose(masked_logits, ref.apply(p, support["x"]), rtol=1e-10)
    assert rel_err(blind_logits, masked_logits) > 1e-2


def test_flax_mlp_meta_gradient_equals_fmljax_mlp(x64):
    ref = tiny_mlp()
    assert not takes_mask(ref.apply)
    p = _perturbed(ref.init(jax.random.key(0)), jax.random.key(5))
    support, query = regression_task(jax.random.key(1))
    batches = {
        "unpadded": (support, query),
        "padded": (_padded(support, 2, 3.0), _padded(query, 1, -2.0)),
    }
    linen = from_linen(LinenMLP(), support["x"])
    nnx_module = NnxMLP(rngs=nnx.Rngs(0))
    nnx_model = from_nnx(nnx_module)  # a module (not a factory): init returns its parameters
    np.testing.assert_array_equal(
        flat(nnx_model.init(jax.random.key(9))),
        flat(nnx.to_pure_dict(nnx.state(nnx_module, nnx.Param))),
    )

    def everything(p):
        out = {}
        for name, (s, q) in batches.items():
            out[name, "ref"] = _maml(fmljax.mse_loss(ref.apply), p, s, q)
            ql, g = _maml(fmljax.mse_loss(linen.apply), _mlp_to_linen(p), s, q)
            out[name, "linen"] = ql, _mlp_from_linen(g)
            ql, g = _maml(fmljax.mse_loss(nnx_model.apply), _mlp_to_nnx(p), s, q)
            out[name, "nnx"] = ql, _mlp_from_nnx(g)
        return out

    out = _compile_once(everything, p)
    for name in batches:
        want_loss, want = out[name, "ref"]
        for fw in ("linen", "nnx"):
            got_loss, got = out[name, fw]
            assert rel_err(flat(got), flat(want)) < TOL_SAME, (name, fw)
            np.testing.assert_allclose(got_loss, want_loss, rtol=TOL_SAME)
    assert rel_err(flat(out["padded", "ref"][1]), flat(out["unpadded", "ref"][1])) < TOL_SAME


def test_meta_sgd_rates_have_the_flax_params_structure(x64):
    ref = tiny_mlp()
    p = _perturbed(ref.init(jax.random.key(0)), jax.random.key(5))
    support, query = regression_task(jax.random.key(1))
    linen = from_linen(LinenMLP(), support["x"])
    lp = _mlp_to_linen(p)
    rates = jax.tree.map(lambda a: jnp.full_like(a, 0.05), lp)
    loss = fmljax.mse_loss(linen.apply)

    def both(lp, rates):
        flax_out = _maml(loss, lp, support, query, "meta-sgd", rates)
        ref_out = _maml(
            fmljax.mse_loss(ref.apply), p, support, query, "meta-sgd", _mlp_from_linen(rates)
        )
        return flax_out, ref_out

    (_, (g_p, g_lr)), (_, (r_p, r_lr)) = _compile_once(both, lp, rates)
    assert jax.tree.structure(g_lr) == jax.tree.structure(g_p) == jax.tree.structure(lp)
    assert rel_err(flat(_mlp_from_linen(g_lr)), flat(r_lr)) < TOL_SAME
    assert rel_err(flat(_mlp_from_linen(g_p)), flat(r_p)) < TOL_SAME
    # FedMeta-MetaSGD's server state: rates shaped like the Flax model's params.
    alg = fmljax.build(
        "fedmeta-metasgd", loss, lambda k, c: (support, query), RoundConfig(clients_per_round=1)
    )
    state = alg.init(lp)
    assert jax.tree.structure(state.params["inner_lr"]) == jax.tree.structure(lp)


class LinenBNDropout(nn.Module):
    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        h = nn.Dense(4, param_dtype=F64)(x)
        h = nn.BatchNorm(use_running_average=False, param_dtype=F64)(h)
        h = nn.Dropout(0.5, deterministic=deterministic)(h)
        return nn.Dense(1, param_dtype=F64)(jnp.tanh(h))


class NnxBNDropout(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.dense = nnx.Linear(1, 4, param_dtype=F64, rngs=rngs)
        self.bn = nnx.BatchNorm(4, param_dtype=F64, use_running_average=True, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, deterministic=True, rngs=rngs)
        self.out = nnx.Linear(4, 1, param_dtype=F64, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.dropout(self.bn(self.dense(x)))))


def test_running_stats_and_rng_never_enter_the_meta_gradient(x64):
    support, query = regression_task(jax.random.key(1))
    linen = from_linen(LinenBNDropout(), support["x"], deterministic=True)
    module = NnxBNDropout(rngs=nnx.Rngs(0))  # eval mode: use_running_average=True
    nnx_model = from_nnx(module)
    lp, np_ = linen.init(jax.random.key(0)), nnx_model.init(jax.random.key(0))
    assert set(lp) == {"Dense_0", "Dense_1", "BatchNorm_0"}  # 'params' only, bare
    assert set(np_) == {"dense", "bn", "out"} and set(np_["bn"]) == {"scale", "bias"}

    for model, params in ((linen, lp), (nnx_model, np_)):
        loss = fmljax.mse_loss(model.apply)
        _, g = _compile_once(lambda p, loss=loss: _maml(loss, p, support, query), params)
        assert jax.tree.structure(g) == jax.tree.structure(params)
        assert np.all(np.isfinite(flat(g))) and np.abs(flat(g)).max() > 0
        # apply takes {'params': tree} too, and is pure: the same output whatever ran before.
        y1 = model.apply(params, query["x"])
        model.apply(params, 10.0 * support["x"])
        np.testing.assert_array_equal(model.apply({"params": params}, query["x"]), y1)
        # Batch norm on the batch's own statistics (transductive), not on running averages:
        # a constant added to the first layer's bias shifts every example alike, and the
        # batch mean removes it (running averages (0, 1) would not).
        first = "Dense_0" if model is linen else "dense"
        shifted = {**params, first: {**params[first], "bias": params[first]["bias"] + 3.0}}
        # Only the rounding of (h + 3) - mean(h + 3) differs: float64, well below 1e-9.
        np.testing.assert_allclose(model.apply(shifted, query["x"]), y1, rtol=1e-9, atol=1e-9)
    # The adapter ran its own copy in training mode; the given module is unchanged.
    assert module.bn.use_running_average is True
    np.testing.assert_array_equal(np.asarray(module.bn.mean[...]), 0.0)
    np.testing.assert_array_equal(np.asarray(module.bn.var[...]), 1.0)


def test_vmap_over_tasks_of_nnx_batch_norm_second_order(x64):
    """nnx BatchNorm under vmap of MAML (grad of grad) equals the per-task loop."""
    model = from_nnx(lambda rngs: NnxBNDropout(rngs=rngs))
    loss = fmljax.mse_loss(model.apply)
    params = model.init(jax.random.key(0))
    keys = jax.random.split(jax.random.key(1), 2)
    tasks = jax.vmap(lambda k: fmljax.data.sample_sinusoid_task(k, 5, 5, F64))(keys)

    def both(tasks):
        vmapped = jax.vmap(lambda s, q: _maml(loss, params, s, q))(*tasks)
        looped = [_maml(loss, params, *jax.tree.map(lambda a: a[t], tasks)) for t in range(2)]
        return vmapped, looped

    got, want = _compile_once(both, tasks)
    for t in range(2):
        # vmap and the loop run the same float64 ops batched or not: rounding only.
        assert rel_err(flat(jax.tree.map(lambda a: a[t], got[1])), flat(want[t][1])) < 1e-12
        np.testing.assert_allclose(got[0][t], want[t][0], rtol=1e-12)


# ---- the contract on padded federated clients ----------------------------------------------


def test_mask_aware_marker():
    def apply(p, x, mask=None):
        return x * p if mask is None else x * p * mask[:, None]

    marked = mask_aware(apply)
    assert takes_mask(marked) and not takes_mask(apply) and mask_aware(marked) is marked
    assert marked.__name__ == "apply"
    x = jnp.ones((2, 3))
    np.testing.assert_array_equal(
        marked(2.0, x, mask=jnp.array([1.0, 0.0])), [[2.0] * 3, [0.0] * 3]
    )
    np.testing.assert_array_equal(marked(2.0, x), 2.0 * x)
    assert not takes_mask(fmljax.mlp((1, 2, 1)).apply)
    assert not takes_mask(fmljax.logistic_regression(2, 2).apply)
    with pytest.raises(TypeError, match="not callable"):
        mask_aware(3)


def _padded_clients():
    """Two clients of 9 and 16 examples (3 features, 2 classes): padded, masked train sets."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(25, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    fed = fmljax.data.federate(x, y, [np.arange(9), np.arange(9, 25)], test_fraction=0.25)
    sizes = np.asarray(fed["train"]["mask"]).sum(1)
    assert sizes[0] < sizes[1] == fed["train"]["mask"].shape[1]  # client 0 has padding
    return fed


def test_every_algorithm_runs_a_plain_lambda_model_on_padded_clients():
    fed = _padded_clients()
    sampler = fmljax.data.client_batch_sampler(3, 3, data=fed)
    apply = lambda p, x: x @ p["w"] + p["b"]  # what a user writes: no mask=
    params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    cfg = RoundConfig(clients_per_round=2, tasks_per_client=1, local_steps=1, local_lr=0.1)
    loss = fmljax.cross_entropy_loss(apply)
    for name in ALGORITHMS:
        alg = fmljax.build(name, loss, sampler, cfg)
        state = alg.init(params)
        state, metrics = _compile_once(alg.update, state, jax.random.key(1), fed)
        assert np.isfinite(float(metrics["loss"])), name
        assert bool(metrics["finite"]), name
        assert int(state.round) == 1, name

    # A mask-aware model gets every padded batch's mask ([3] per support / query batch).
    seen = []

    @mask_aware
    def centred(p, x, mask=None):
        seen.append(None if mask is None else mask.shape)
        m = mask[:, None]
        mean = jnp.sum(x * m, 0) / jnp.maximum(jnp.sum(m), 1.0)  # over real examples only
        return (x - mean) @ p["w"] + p["b"]

    alg = fmljax.build("fedmeta-maml", fmljax.cross_entropy_loss(centred), sampler, cfg)
    _, metrics = _compile_once(alg.update, alg.init(params), jax.random.key(1), fed)
    assert np.isfinite(float(metrics["loss"]))
    assert seen and all(s == (3,) for s in seen), seen
