"""Split-aware task samplers: a training sampler that carries its held-out evaluation sampler.

A federated dataset of :func:`fmljax.data.federate` holds every client's training examples
(``client['train']``) and its held-out examples (``client['test']``). Training rounds must
see only the former; a personalised evaluation adapts on the former and scores on the latter.
One sampler function cannot know which of the two a call is for, so a *split-aware* sampler
is a pair (:class:`SplitSampler`):

* calling it, ``sampler(key, client) -> (support, query)``, samples a training task (what
  ``update`` uses);
* ``sampler.evaluation(key, client) -> (support, query)`` samples an evaluation task: the
  support from the client's training examples, the query from its held-out examples (what
  ``evaluate`` uses).

:func:`fmljax.build` takes the evaluation sampler from ``eval_sample_task=`` when given, else
from ``sample_task.evaluation`` (:func:`fmljax.data.client_batch_sampler` returns a
:class:`SplitSampler`). A plain sampler without an evaluation counterpart is used for both,
but ``evaluate`` then refuses data that carries held-out examples (a key of
:data:`HELDOUT_KEYS`), because it would adapt and score on training examples only; pass
``eval_sample_task=sample_task`` to ask for exactly that.

Shapes: C clients, K support and Q query examples per task.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax

Batch = Mapping[str, jax.Array]
TaskSampler = Callable[[jax.Array, Any], tuple[Batch, Batch]]

__all__ = [
    "HELDOUT_KEYS",
    "SplitSampler",
    "check_heldout_evaluation",
    "evaluation_sampler",
    "with_evaluation",
]

# Keys of a client's data that hold its held-out examples: ``'test'`` of
# :func:`fmljax.data.federate`, ``'test_images'`` of :func:`fmljax.data.omniglot_clients`.
HELDOUT_KEYS = ("test", "test_images")


@dataclasses.dataclass(frozen=True)
class SplitSampler:
    """A task sampler with its held-out counterpart.

    Attributes:
      train: ``train(key, client) -> (support, query)``, the training task (both from the
        client's training examples); ``SplitSampler(...)(key, client)`` calls it.
      evaluation: ``evaluation(key, client) -> (support, query)``: support ``[K, ...]`` from
        the client's training examples, query ``[Q, ...]`` from its held-out examples.
    """

    train: TaskSampler
    evaluation: TaskSampler

    def __post_init__(self) -> None:
        for field in ("train", "evaluation"):
            value = getattr(self, field)
            if not callable(value):
                raise ValueError(f"SplitSampler.{field}={value!r} is invalid: must be callable")

    def __call__(self, key: jax.Array, client: Any) -> tuple[Batch, Batch]:
        return self.train(key, client)


def with_evaluation(sample_task: TaskSampler, eval_sample_task: TaskSampler) -> SplitSampler:
    """``sample_task`` for training rounds, ``eval_sample_task`` for evaluation, as one sampler."""
    return SplitSampler(sample_task, eval_sample_task)


def evaluation_sampler(
    sample_task: TaskSampler, eval_sample_task: TaskSampler | None = None
) -> tuple[TaskSampler, bool]:
    """``(the sampler evaluation uses, whether it is a plain sampler to guard)``.

    ``eval_sample_task`` if given (the user's explicit choice, not guarded); else
    ``sample_task.evaluation`` of a split-aware sampler; else ``sample_task`` itself, guarded
    by :func:`check_heldout_evaluation`.
    """
    if eval_sample_task is not None:
        return eval_sample_task, False
    derived = getattr(sample_task, "evaluation", None)
    if derived is not None:
        return derived, False
    return sample_task, True


def check_heldout_evaluation(where: str, sample_task: Any, data: Any) -> None:
    """Refuse to evaluate a plain ``sample_task`` on data that carries held-out examples.

    Raises ValueError naming the held-out key found in ``data`` (a client's or the whole
    federated dataset's top-level keys) and the ways out.
    """
    if not isinstance(data, Mapping):
        return
    found = [k for k in HELDOUT_KEYS if k in data]
    if not found:
        return
    raise ValueError(
        f"{where}: the evaluation data holds held-out examples (data[{found[0]!r}]) but "
        f"sample_task={sample_task!r} has no held-out counterpart, so evaluation would adapt and "
        "score on the clients' training examples only; allowed: a split-aware sampler "
        "(fmljax.data.client_batch_sampler(...) adapts on 'train' and scores on 'test'; "
        "fmljax.samplers.with_evaluation(sample_task, eval_sample_task)), "
        "eval_sample_task=<a sampler that scores held-out examples> (e.g. "
        "fmljax.data.full_client_task), or eval_sample_task=sample_task to score on what "
        "sample_task gives"
    )
