"""Run a federated meta-learning experiment from an ml_collections config.

    python experiments/main.py --config=experiments/configs/NAME.py --workdir=DIR \
        [--config.FIELD=VALUE ...]

``config.algorithm`` is one algorithm name or a comma-separated list; with a list, each
algorithm runs in ``DIR/<algorithm>/`` and a comparison table is printed (and written to
``DIR/comparison.md``) at the end. ``config.overrides.<algorithm with '-' as '_'>`` holds
per-algorithm field overrides. The loop itself is :func:`fmljax.train.train_and_evaluate`.
Re-running the same command on the same DIR resumes from the last checkpoints.
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

from fmljax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, checkpoints, summary.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO
    summaries = train.run_experiment(_CONFIG.value, _WORKDIR.value)
    if len(summaries) > 1:
        table = train.comparison_table(summaries)
        print("\n" + table)
        with open(os.path.join(_WORKDIR.value, "comparison.md"), "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    app.run(main)
