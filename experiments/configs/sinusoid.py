"""Federated sinusoid regression: second-order against first-order meta-learning.

Each client owns one sinusoid y = A sin(x - phi), A ~ U[0.1, 5], phi ~ U[0, pi] (MAML, Finn et
al. 2017, section 5.1); a round samples 10 of 1,000 clients, each adapts on K = 10 support
points and is scored on 10 query points. 600 held-out clients are evaluated after 10 steps of
rate 0.01 on their own support points only. Needs no data files: tasks are drawn with
jax.random inside the jitted round.

* FedMeta (MAML / FOMAML): the client sends its meta-gradient, the server applies Adam(1e-3).
* Per-FedAvg (SO / FO): 5 local meta-steps of rate beta = 5e-3, server model average. (With
  the earlier beta = 1e-3, 2,000 rounds left Per-FedAvg untrained: MSE ~ 3.4, no difference
  between the orders; beta = 1e-2 made the second-order run unstable.)
* FedAvg + fine-tuning: the baseline, 5 local steps of rate 1e-2, 10 fine-tuning steps.

Command (the README's main job: about 30 s on the 2-core CPU, mostly compilation; 16 s with
the compilation cache of an earlier run):

    python experiments/main.py --config=experiments/configs/sinusoid.py --workdir=runs/sinusoid

Prints a table of personalised test MSE per algorithm (second order vs first order) at the
end; the numbers of the last run are in experiments/RESULTS.md, section 5. Last run (code
ebc83d2, 2-core CPU): MSE after 10 steps over 600 held-out clients, FedMeta-MAML
0.75 ± 0.10 vs FedMeta-FOMAML 1.06 ± 0.12, Per-FedAvg-SO 0.41 ± 0.04 vs Per-FedAvg-FO
0.62 ± 0.07, FedAvg + fine-tuning 0.81 ± 0.18: second order below first order in both pairs,
the 95% intervals apart.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "sinusoid"
    # Second order against first order, FedMeta and Per-FedAvg style, plus FedAvg + fine-tuning.
    c.algorithm = "fedmeta-maml,fedmeta-fomaml,perfedavg-so,perfedavg-fo,fedavg"
    c.seed = 0
    c.data_seed = 0
    c.hidden = (40, 40)
    c.num_clients = 1000
    c.num_eval_clients = 600  # a 95% CI narrow enough to tell the orders apart
    c.support_size = 10
    c.query_size = 10
    # Round.
    c.clients_per_round = 10
    c.tasks_per_client = 1
    c.local_steps = 1
    c.local_lr = 1.0  # with server Adam: the client sends its meta-gradient (FedMeta)
    c.inner_lr = 0.01
    c.inner_steps = 1
    c.eval_inner_steps = 10
    c.eval_tasks_per_client = 1
    c.fine_tune = False
    c.server_optimizer = "adam"
    c.server_lr = 1e-3
    # Per-algorithm fields ('-' written as '_'): Per-FedAvg and FedAvg average models (server
    # SGD with rate 1) after several local steps of rate beta; FedAvg is scored after fine-tuning.
    per_fedavg = dict(local_steps=5, local_lr=5e-3, server_optimizer="sgd", server_lr=1.0)
    c.overrides = ml_collections.ConfigDict(
        {
            "perfedavg_so": per_fedavg,
            "perfedavg_fo": per_fedavg,
            "fedavg": dict(per_fedavg, local_lr=1e-2, fine_tune=True),
        }
    )
    # Loop.
    c.num_rounds = 2000
    c.rounds_per_call = 100
    c.eval_every = 500
    c.checkpoint_every = 500
    c.keep_checkpoints = 2
    # Scale-out and failures (see the README): the client axis spans every visible device.
    c.mesh_shape = (-1,)
    c.mesh_axes = ("clients",)
    c.client_axis = "clients"
    c.distributed = False
    c.debug_nojit = False
    c.dropout_prob = 0.0
    c.straggler_prob = 0.0
    return c
