"""The README's API tour runs as written (its Python blocks, in order, in one namespace)."""

from __future__ import annotations

import os
import re

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tour_blocks() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    tour = text.split("## API tour", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", tour, flags=re.S)


def test_the_api_tour_runs():
    blocks = _tour_blocks()
    assert len(blocks) >= 2  # the sinusoid tour and the Flax / own-data one
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    # What the comments promise: finite per-client metrics, held-out scores in [0, 1].
    assert np.isfinite(np.asarray(namespace["per_client"]["loss"])).all()
    acc = np.asarray(namespace["held_out"]["accuracy"])
    assert acc.shape == (3,) and ((acc >= 0) & (acc <= 1)).all()
    assert jax.tree.structure(namespace["grads"]) == jax.tree.structure(namespace["params"])
