"""Sinusoid regression, MAML's setting: MAML, FOMAML, Meta-SGD, Reptile and a pretrained net.

Finn, Abbeel & Levine, 2017 (MAML, section 5.1): y = A sin(x - phi), A ~ U[0.1, 5],
phi ~ U[0, pi], x ~ U[-5, 5]; a 1-40-40-1 ReLU net, K support and K query points per task,
one inner step of rate 0.01, meta-batch 25, Adam 1e-3, 70,000 iterations. Meta-SGD (Li et al.,
2017) learns per-parameter inner rates; Reptile (Nichol et al., 2018) moves towards the
adapted weights (here 5 inner steps of rate 0.01 on the task's 2K points, Adam outer step);
"pretrained" is one net trained on all tasks jointly (FedAvg of one client whose loss is the
un-adapted loss), fine-tuned at test time (``fedavg`` with ``fine_tune``). The meta-training
is exactly the centralised algorithm: one client holding the task distribution, meta-batch =
``tasks_per_client`` (see :mod:`fmljax.tasks`). Scored on 600 fixed test sinusoids after 1
step (``mse``) and 10 steps (``mse_10steps``) on the K support points, each algorithm with its
own rule (SGD of rate 0.01; Meta-SGD its learned per-parameter rates), mean and 95% CI.

Commands (``ARG`` = ``K,size``: K in 5, 10, 20; size ``cpu`` or ``full``):

    python experiments/main.py --config=experiments/configs/sinusoid_maml.py:10,cpu \
        --workdir=runs/sinusoid_maml/k10_cpu

* ``cpu``: 10,000 iterations (1/7 of the paper's 70,000), the other settings the paper's.
  Hardware: the 2-core CPU. Wall time: 79 / 120 / 154 s for the five algorithms at
  K = 5 / 10 / 20 (mostly compilation).
* ``full``: 70,000 iterations, MAML's length; ran on the same CPU in 289 / 397 / 478 s at
  K = 5 / 10 / 20 (code ``c9612bb`` / ``96cfea4`` / ``c9612bb``, the same library). MSE after
  1 step at K = 10: MAML 0.35 ± 0.03, FOMAML 0.55 ± 0.05, Meta-SGD 0.23 ± 0.03, Reptile
  0.40 ± 0.04, pretrained 2.25 ± 0.16 (paper, Meta-SGD Table 1: MAML 0.77 ± 0.11, Meta-SGD
  0.53 ± 0.09); all K in experiments/RESULTS.md section 2.

Results of the ``cpu`` and ``full`` runs (600 test tasks, MSE after 1 and 10 steps, wall
time, code version): experiments/RESULTS.md section 2, beside the paper's (Meta-SGD Table 1: MAML
1.13 / 0.77 / 0.48 and Meta-SGD 0.90 / 0.53 / 0.31 at K = 5 / 10 / 20, one step).
"""

import ml_collections

SIZES = {"cpu": 10_000, "full": 70_000, "test": 20}


def get_config(arg: str = "10,cpu") -> ml_collections.ConfigDict:
    k_str, size = (arg.split(",") + ["cpu"])[:2]
    k = int(k_str)
    if size not in SIZES:
        raise ValueError(f"size={size!r} is not one of {tuple(SIZES)}")
    c = ml_collections.ConfigDict()
    c.task = "sinusoid-maml"
    c.runlocal = size
    c.algorithm = "fedmeta-maml,fedmeta-fomaml,fedmeta-metasgd,fedreptile,fedavg"
    c.seed = 0
    c.data_seed = 0
    c.hidden = (40, 40)
    c.support_size = k
    c.query_size = k
    c.eval_query_size = 100  # query points per test sinusoid
    c.num_val_tasks = 100
    c.num_eval_tasks = 600
    c.eval_more_steps = (10,)  # mse after 1 step and after 10 steps (the same update rule)
    # One client = the task distribution; meta-batch 25 tasks; the client's delta is the mean
    # meta-gradient (local_lr 1), the server's Adam(1e-3) is MAML's meta-optimiser.
    c.clients_per_round = 1
    c.tasks_per_client = 25
    c.local_steps = 1
    c.local_lr = 1.0
    c.inner_lr = 0.01
    c.inner_steps = 1
    c.eval_inner_steps = 1
    c.eval_tasks_per_client = 1
    c.server_optimizer = "adam"
    c.server_lr = 1e-3
    c.fine_tune = False
    c.overrides = ml_collections.ConfigDict(
        {
            # Reptile: pseudo-gradient params - adapt(params) after 5 plain SGD steps of rate
            # 0.01 on the task's 2K points (with 1 step it is joint training), Adam outer
            # step; scored after the same 0.01-rate steps as the others.
            "fedreptile": dict(inner_steps=5, server_optimizer="adam", server_lr=1e-3),
            "fedavg": dict(fine_tune=True),  # the pretrained baseline, fine-tuned at test
        }
    )
    steps = SIZES[size]
    c.num_rounds = steps
    c.rounds_per_call = min(1000, steps)
    c.eval_every = max(c.rounds_per_call, steps // 5 // c.rounds_per_call * c.rounds_per_call)
    c.checkpoint_every = c.eval_every
    c.keep_checkpoints = 2
    return c
