"""The federated algorithms, one short file each; every one is an
:class:`fmljax.rounds.AlgorithmSpec` made by a builder
``builder(loss_fn, sample_task, config, **options) -> AlgorithmSpec`` (see
:func:`fmljax.federated.register_algorithm`).

* :mod:`.fedavg`: FedAvg (McMahan et al., 2017), optionally with fine-tuning;
* :mod:`.fedprox`: FedProx (Li et al., 2020), FedAvg's client with a proximal term;
* :mod:`.fedmeta`: FedMeta with MAML, first-order MAML and Meta-SGD (Chen et al., 2018);
* :mod:`.perfedavg`: Per-FedAvg, first-order, Hessian-free and second order (Fallah et al.,
  2020);
* :mod:`.fedreptile`: Reptile as the server step (Jiang et al., 2019).
"""

from fmljax.algorithms import fedavg, fedmeta, fedprox, fedreptile, perfedavg

__all__ = ["fedavg", "fedmeta", "fedprox", "fedreptile", "perfedavg"]
