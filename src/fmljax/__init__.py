"""fmljax: federated meta-learning in JAX.

Exact second-order MAML, first-order and Hessian-free MAML, Reptile, Meta-SGD and prototypical
networks as pure functions of PyTrees (:mod:`fmljax.meta`), and FedAvg, FedMeta, Per-FedAvg and
FedReptile as one-jit rounds (:mod:`fmljax.federated`).
"""

from fmljax import (
    algorithms,
    convs,
    data,
    federated,
    losses,
    mapping,
    meta,
    models,
    rounds,
    samplers,
    sharding,
)
from fmljax.convs import batched_convs
from fmljax.federated import (
    ALGORITHMS,
    ClientSharding,
    FederatedAlgorithm,
    RoundConfig,
    ServerState,
    build,
    fedavg,
    fedmeta,
    fedreptile,
    perfedavg,
    register_algorithm,
    scan_rounds,
)
from fmljax.losses import classification_metrics, cross_entropy_loss, mse_loss, regression_metrics
from fmljax.meta import (
    METHODS,
    adapt,
    meta_gradient,
    prototypical_logits,
    prototypical_loss,
    prototypical_metrics,
)
from fmljax.models import (
    Model,
    conv4,
    conv_impl_of,
    from_linen,
    from_nnx,
    logistic_regression,
    mask_aware,
    mlp,
    takes_mask,
)
from fmljax.samplers import SplitSampler, with_evaluation

__version__ = "0.1.0"

__all__ = [
    "ALGORITHMS",
    "METHODS",
    "ClientSharding",
    "FederatedAlgorithm",
    "Model",
    "RoundConfig",
    "ServerState",
    "SplitSampler",
    "adapt",
    "algorithms",
    "batched_convs",
    "build",
    "classification_metrics",
    "conv4",
    "conv_impl_of",
    "cross_entropy_loss",
    "data",
    "fedavg",
    "federated",
    "fedmeta",
    "fedreptile",
    "from_linen",
    "from_nnx",
    "logistic_regression",
    "losses",
    "mapping",
    "mask_aware",
    "meta",
    "meta_gradient",
    "mlp",
    "models",
    "mse_loss",
    "perfedavg",
    "prototypical_logits",
    "prototypical_loss",
    "prototypical_metrics",
    "register_algorithm",
    "regression_metrics",
    "rounds",
    "samplers",
    "scan_rounds",
    "sharding",
    "takes_mask",
    "with_evaluation",
]
