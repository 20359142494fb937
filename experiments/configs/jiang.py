"""Jiang, Konecny, Rush & Kannan, 2019, "Improving Federated Learning Personalization via
Model Agnostic Meta Learning": FedAvg is Reptile, then Reptile fine-tuning personalises.

Two stages (``ARG`` = ``<stage>,<size>``), on Synthetic(0.5, 0.5) (pFedMe protocol, see
``federated.py``):

1. ``identity``: FedAvg with k = 5 full-batch local steps of rate a on the client's round data,
   and FedReptile with k = 5 inner steps of rate a on the same data and server rate 1, from the
   same initial model and seed. The two are the same update (the client's delta is
   ``theta - adapt(theta)`` in both), so every round's ``update_norm`` in ``metrics.jsonl`` and
   the final summaries agree to float rounding; ``experiments/collect.py`` prints the largest
   difference.

       python experiments/main.py --config=experiments/configs/jiang.py:identity,cpu \
           --workdir=runs/jiang/cpu/identity

2. ``finetune``: both runs start from the identity stage's FedAvg checkpoint (``init_from``)
   and go on for ``finetune_rounds`` more rounds: ``fedavg`` as before, ``fedreptile`` as
   Reptile fine-tuning (10 inner steps, server rate 0.5), the personalisation step of Jiang et
   al.; both are scored after the same ``eval_inner_steps`` steps on each user's training
   data. The gain is ``accuracy - accuracy_before`` (personalised minus global model) and the
   difference between the two runs.

       python experiments/main.py --config=experiments/configs/jiang.py:finetune,cpu \
           --workdir=runs/jiang/cpu/finetune

``cpu``: 150 + 100 rounds, users capped at 400 examples; ``full``: 800 + 200 rounds, uncapped
(not run here). Hardware: the 2-core CPU; wall time 20 s + 14 s (code 4bf6a47).
Result (RESULTS.md section 4): identical update norms in all 150 rounds and identical
summaries (difference 0.0); after fine-tuning, personalised accuracy 82.5% for both, the
personalisation gain +12.3 points (FedAvg) against +13.9 (Reptile fine-tuning, whose global
model is worse).
"""

import ml_collections


def get_config(arg: str = "identity,cpu") -> ml_collections.ConfigDict:
    stage, size = (arg.split(",") + ["cpu"])[:2]
    if stage not in ("identity", "finetune"):
        raise ValueError(f"stage={stage!r} is not one of ('identity', 'finetune')")
    if size not in ("cpu", "full", "test"):
        raise ValueError(f"size={size!r} is not one of ('cpu', 'full', 'test')")
    c = ml_collections.ConfigDict()
    c.task = "synthetic"
    c.runlocal = size
    c.stage = stage
    c.algorithm = "fedavg,fedreptile"
    c.seed = 0
    c.data_seed = 0
    c.alpha, c.beta = 0.5, 0.5
    c.num_clients = 100
    c.variant = "pfedme"
    c.max_examples = None if size == "full" else 400
    c.val_fraction = 0.2
    c.batch_size = 20
    c.clients_per_round = 10
    c.tasks_per_client = 1
    c.inner_lr = 0.05
    c.eval_inner_steps = 1
    c.eval_tasks_per_client = 1
    c.server_optimizer = "sgd"
    c.server_lr = 1.0
    c.target_accuracy = 0.8
    k, a = 5, 0.05
    c.overrides = ml_collections.ConfigDict(
        {
            "fedavg": dict(local_steps=k, local_lr=a, inner_steps=k, fine_tune=True),
            "fedreptile": dict(local_steps=1, local_lr=1.0, inner_steps=k, inner_lr=a),
        }
    )
    base = {"cpu": 150, "full": 800, "test": 4}[size]
    c.finetune_rounds = {"cpu": 100, "full": 200, "test": 2}[size]
    c.num_rounds = base
    c.rounds_per_call = {"cpu": 25, "full": 50, "test": 2}[size]
    if stage == "finetune":
        c.num_rounds = base + c.finetune_rounds
        c.init_from = f"runs/jiang/{size}/identity/fedavg"
        c.overrides.fedreptile = dict(
            local_steps=1, local_lr=1.0, inner_steps=10, inner_lr=a, server_lr=0.5
        )
    c.eval_every = c.rounds_per_call
    c.checkpoint_every = c.rounds_per_call
    c.keep_checkpoints = 2
    return c
