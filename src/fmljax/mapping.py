"""How a per-item function is mapped over a leading axis (tasks T or clients C).

``vmap`` batches the work into one program (fast for dense layers); ``map`` runs the items one
after another in a ``lax.map`` loop (each convolution keeps a shared, ungrouped kernel);
``chunked`` runs ``lax.map`` over chunks of ``chunk_size`` items, each chunk ``vmap``-ed;
``unroll`` writes one copy of the work per item into the program (fast to run, slow to
compile). The choice is static: it fixes the compiled program.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["MAP_MODES", "map_over", "validate_map_mode"]

MAP_MODES = ("vmap", "map", "chunked", "unroll")


def validate_map_mode(field: str, mode: str, chunk_size: int | None) -> None:
    """Raise ValueError naming ``field`` if ``mode`` / ``chunk_size`` is not allowed."""
    if mode not in MAP_MODES:
        raise ValueError(f"{field}={mode!r} is not one of {MAP_MODES}")
    if mode == "chunked" and (chunk_size is None or int(chunk_size) < 1):
        raise ValueError(f"{field}='chunked' needs a chunk size >= 1, got {chunk_size!r}")


def map_over(
    fn: Callable[[Any], Any], xs: Any, mode: str = "vmap", chunk_size: int | None = None
) -> Any:
    """``stack([fn(x) for x in xs])`` along the leading axis of the PyTree ``xs``."""
    validate_map_mode("mode", mode, chunk_size)
    if mode == "vmap":
        return jax.vmap(fn)(xs)
    if mode == "map":
        return jax.lax.map(fn, xs)
    if mode == "chunked":
        n = jax.tree.leaves(xs)[0].shape[0]
        return jax.lax.map(fn, xs, batch_size=min(int(chunk_size), n))
    n = jax.tree.leaves(xs)[0].shape[0]
    outs = [fn(jax.tree.map(lambda a, i=i: a[i], xs)) for i in range(n)]
    return jax.tree.map(lambda *a: jnp.stack(a), *outs)
