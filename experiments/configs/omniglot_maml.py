"""MAML on Omniglot: N-way K-shot, second order (MAML) against first order (FOMAML).

The reference code's settings (Finn, Abbeel & Levine, 2017, ``cbfinn/maml``): the 1,100 /
100 / 423 character split, per-task random quarter-turn rotations, 28x28 binary images, the
strided Conv4 (64 filters, batch norm on each batch's own statistics, learned offset, no
running averages: the reference's transductive mode), K support and K query drawings per
class, meta-batch 32 (5-way) / 16 (20-way), inner rate 0.4 (5-way) / 0.1 (20-way), 1 (5-way) /
5 (20-way) inner steps, Adam 1e-3, 60,000 iterations, 10 test-time steps, 600 test tasks with
a 95% confidence interval. The loss is the reference's ``N * mean cross-entropy``
(``loss_reduction='per_way_sum'``, see :mod:`fmljax.tasks`). Meta-training is centralised MAML:
one client holding the training characters, ``tasks_per_client`` = the meta-batch.

Commands (``ARG`` = ``<ways>w<shots>s,<size>``, size ``cpu``, ``long`` or ``full``):

    python experiments/main.py --config=experiments/configs/omniglot_maml.py:5w1s,cpu \
        --workdir=runs/omniglot_maml/5w1s_cpu          # FMLJAX_OMNIGLOT=/path/omniglot.npz

* ``cpu``: 16 filters, meta-batch 8 (5-way) / 4 (20-way), 300 (5-way, 0.5% of 60,000) / 100
  (20w1s, 0.17%) / 50 (20w5s, 0.08%) iterations, 100 / 50 test tasks; inner rates, steps, test
  steps and loss as the reference. A 2-core CPU; wall time and result in
  experiments/RESULTS.md.
* ``long``: the reference protocol unshortened in everything but the iteration count (64
  filters, meta-batch 32 / 16, the reference's inner rates and steps, Adam 1e-3, 600 test
  tasks, 10 test-time steps), with 100 validation tasks every 500 iterations for the
  learning curves: 5w1s 5,000 iterations (seeds 0, 1, 2), 5w5s 2,000, 20w1s 2,000, 20w5s
  1,000 (what fits one working session of the 2-core CPU; a run resumes, so ``num_rounds``
  can be raised later and the same command continues). On the 2-core CPU a 5w1s iteration
  takes about 0.44 s second order with both cores free. The runs behind RESULTS.md section 1
  (5w1s, seed 0, second and first order: 96.6 ± 0.7 vs 72.1 ± 1.8% on 600 test tasks,
  3,256 s and 653 s at nice 5 on the shared 2-core AMD EPYC VM, code 6d9f599)::

      nohup python experiments/main.py --config=experiments/configs/omniglot_maml.py:5w1s,long \
          --config.seeds='(0,)' --workdir=runs/omniglot_maml/5w1s_long > runs/5w1s.log 2>&1 &

  (first order's seeds 1 and 2, 77.1 ± 1.8 and 73.8 ± 1.8%, 999 s and 1,017 s beside test
  jobs, code 40cc510 / ebc83d2; 74.3 ± 2.5 mean ± std over the three seeds; one command per
  seed, so that the runs land in ``seed<S>/<algorithm>/`` where collect.py reads them::

      python experiments/main.py --config=experiments/configs/omniglot_maml.py:5w1s,long \
          --config.algorithm=fedmeta-fomaml --config.seeds='()' --config.seed=1 \
          --workdir=runs/omniglot_maml/5w1s_long/seed1/fedmeta-fomaml

  ), and for another setting ``:<N>w<K>s,long`` with ``--workdir=runs/omniglot_maml/<N>w<K>s_long``.
  Results: experiments/RESULTS.md section 1 (``collect.py``), curves in
  ``experiments/omniglot_<setting>.png``.
* ``full``: the reference settings above (60,000 iterations); sized for a GPU.

Other implementations' networks are config fields (defaults: the MAML reference): the
network of a common PyTorch MAML (3 blocks of 3x3 convolution, batch norm with learned scale
and offset, ReLU, 2x2 max-pool; PyTorch's default initialisation and epsilon) is
``--config.conv_mode=pooled --config.conv_blocks=3 --config.bn_scale=True
--config.bn_eps=1e-5 --config.conv_init=torch``, with its task protocol ``--config.queries=15
--config.inner_steps=5 --config.inner_lr=0.1`` (its loss is a plain mean:
``--config.loss_reduction=mean``).

Results of the ``cpu`` variant (experiments/RESULTS.md section 1; test accuracy with 95% CI,
MAML vs first order, wall time of both, the 2-core CPU, code 96cfea4): 5w1s 53.6 ± 5.3 vs
52.2 ± 5.2 (64 s); 5w5s 80.1 ± 1.9 vs 74.6 ± 2.2 (102 s); 20w1s 20.0 ± 2.4 vs 20.8 ± 2.6
(68 s); 20w5s 33.8 ± 1.6 vs 35.6 ± 1.8 (214 s). Far below the paper's 98.7 / 99.9 / 95.8 /
98.9: 0.08% to 0.5% of the iterations, a quarter of the filters and meta-batch.
* ``test``: the procedural stand-in data (``omniglot_source='procedural'``), a few
  iterations: for the tests only.
"""

import ml_collections
from ml_collections import config_dict

SIZES = ("cpu", "long", "full", "test")


def get_config(arg: str = "5w1s,cpu") -> ml_collections.ConfigDict:
    setting, size = (arg.split(",") + ["cpu"])[:2]
    ways, shots = (int(v) for v in setting.rstrip("s").split("w"))
    if size not in SIZES:
        raise ValueError(f"size={size!r} is not one of {SIZES}")
    five = ways <= 5
    c = ml_collections.ConfigDict()
    c.task = "omniglot"
    c.runlocal = size
    c.partition = "episodic"
    # None: $FMLJAX_OMNIGLOT; a placeholder, so that --config.omniglot_source=PATH can be given.
    c.omniglot_source = "procedural" if size == "test" else config_dict.placeholder(str)
    c.image_size = 28
    c.augmentation = "maml"
    c.algorithm = "fedmeta-maml,fedmeta-fomaml"
    c.seed = 0
    c.data_seed = 0
    c.ways = ways
    c.shots = shots
    c.queries = shots
    # The network, the MAML reference's (see fmljax.conv4); other implementations' protocols
    # are these fields (module docstring).
    c.filters = 64
    c.conv_mode = "strided"
    c.conv_blocks = 4
    c.conv_padding = "SAME"
    c.bn_scale = False
    c.bn_eps = 1e-3
    c.conv_init = "glorot"
    c.loss_reduction = "per_way_sum"
    c.num_val_tasks = 100
    c.num_eval_tasks = 600
    c.clients_per_round = 1
    c.tasks_per_client = 32 if five else 16
    c.local_steps = 1
    c.local_lr = 1.0
    c.inner_lr = 0.4 if five else 0.1
    c.inner_steps = 1 if five else 5
    c.eval_inner_steps = 10
    c.eval_tasks_per_client = 1
    c.task_map = "map"  # one task at a time in cache: ~1.5x 'vmap' on CPU (benchmarks/RESULTS.md)
    c.client_map = "vmap"
    c.server_optimizer = "adam"
    c.server_lr = 1e-3
    c.num_rounds = 60_000
    c.rounds_per_call = 100
    c.eval_every = 5000
    c.checkpoint_every = 1000
    c.keep_checkpoints = 2
    if size == "long":  # the reference protocol, fewer iterations (the module docstring)
        c.num_rounds = {(5, 1): 5_000, (5, 5): 2_000, (20, 1): 2_000}.get((ways, shots), 1_000)
        c.eval_every = 500
        c.checkpoint_every = 500
        if (ways, shots) == (5, 1):
            c.seeds = (0, 1, 2)
    if size == "cpu":
        c.filters = 16
        c.tasks_per_client = 8 if five else 4
        c.num_val_tasks = 50
        c.num_eval_tasks = 100
        c.num_rounds = 300 if five else 100
        c.rounds_per_call = 50
        c.eval_every = 100 if five else 50
        c.checkpoint_every = c.eval_every
        if not five:  # 20 ways, 5 second-order inner steps: a few times dearer per iteration
            c.num_val_tasks = 20
            c.num_eval_tasks = 50
            if shots > 1:  # 20w5s: 5x the images of 20w1s per task
                c.num_rounds = 50
                c.rounds_per_call = 25
                c.eval_every = 50
                c.checkpoint_every = 25
    if size == "test":
        c.filters = 4
        c.tasks_per_client = 2
        c.inner_steps = 1
        c.eval_inner_steps = 3
        c.num_val_tasks = 8
        c.num_eval_tasks = 16
        c.num_rounds = 4
        c.rounds_per_call = 2
        c.eval_every = 2
        c.checkpoint_every = 2
    return c
