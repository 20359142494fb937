"""N-way K-shot episodes and client batches, sampled with ``jax.random`` inside the jitted round.

An *episode* (Vinyals et al., 2016, "Matching Networks for One Shot Learning"; Finn, Abbeel &
Levine, 2017, "Model-Agnostic Meta-Learning", MAML) picks N distinct classes, gives them the
labels 0..N-1 in a random order, and draws K support and Q query examples of each class, the
support and query examples disjoint. Everything here is ``jax.random`` + gathers with static
shapes, so a sampler ``sample_task(key, client_data) -> (support, query)`` can be ``vmap``-ed over
tasks (T) and clients (C) inside one ``jit``.

Rotation augmentation, by name (:data:`AUGMENTATIONS`):

* ``'none'``: images as stored;
* ``'maml'``: every class of a task is rotated by its own random multiple of 90 degrees
  (MAML's ``data_generator.py``: ``tf.image.rot90(image, k)`` with one ``k`` per class per
  task, counter-clockwise as :func:`numpy.rot90`);
* ``'vinyals'`` (alias ``'reptile'``): a dataset-level expansion, each *training* class x4
  rotations as four new classes (Vinyals et al., 2016; Nichol, Achiam & Schulman, 2018,
  Reptile's ``augment_dataset``), test classes unrotated. See :func:`rotate_classes`; the
  episode sampler itself does nothing for this name.

Shapes use fixed letters: C clients, T tasks, N ways, K support shots per class, Q query
examples per class; ``images`` are ``[classes, examples, H, W]`` or ``[classes, examples, H, W,
ch]`` and come out NHWC float32 (``ch`` = 1 added when absent).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fmljax.samplers import SplitSampler

Batch = dict[str, jax.Array]
TaskSampler = Callable[[jax.Array, Any], tuple[Batch, Batch]]

__all__ = [
    "AUGMENTATIONS",
    "canonical_augmentation",
    "check_episode_config",
    "client_batch_sampler",
    "episode_task_sampler",
    "full_client_task",
    "rotate_classes",
    "sample_episode",
]

AUGMENTATIONS = ("none", "maml", "vinyals")
_ALIASES = {"reptile": "vinyals"}


def canonical_augmentation(augmentation: str) -> str:
    """The canonical name of a rotation augmentation; ValueError for an unknown name."""
    name = _ALIASES.get(augmentation, augmentation)
    if name not in AUGMENTATIONS:
        raise ValueError(
            f"augmentation={augmentation!r} is not known; allowed: "
            f"{', '.join(repr(a) for a in AUGMENTATIONS)} (and 'reptile' = 'vinyals')"
        )
    return name


def rotate_classes(images: np.ndarray) -> np.ndarray:
    """Vinyals' / Reptile's expansion: ``[classes, E, H, W(, ch)]`` -> ``[4 * classes, ...]``.

    Class ``r * classes + c`` is class ``c`` rotated by ``r`` quarter turns counter-clockwise
    (r = 0..3), so the first ``classes`` entries are the originals. Host-side, numpy.
    """
    images = np.asarray(images)
    if images.ndim not in (4, 5) or images.shape[2] != images.shape[3]:
        raise ValueError(
            "rotate_classes: images must be [classes, examples, H, W] or [..., ch] with H == W; "
            f"got shape {images.shape}"
        )
    return np.concatenate([np.rot90(images, r, axes=(2, 3)) for r in range(4)], axis=0)


def _check_images(images: Any, what: str) -> None:
    shape = tuple(images.shape)
    if len(shape) not in (4, 5):
        raise ValueError(
            f"{what} must have shape [classes, examples, H, W] or [classes, examples, H, W, ch]; "
            f"got shape {shape}"
        )


def _rotate_per_class(turns: jax.Array, x: jax.Array) -> jax.Array:
    """Rotate each class ``x[n]`` (``[N, M, H, W, ch]``) by ``turns[n]`` quarter turns."""
    rots = jnp.stack([jnp.rot90(x, r, axes=(2, 3)) for r in range(4)])  # [4, N, M, H, W, ch]
    return rots[turns, jnp.arange(x.shape[0])]


def sample_episode(
    key: jax.Array,
    images: jax.Array,
    *,
    ways: int,
    shots: int,
    queries: int,
    num_classes: jax.Array | int | None = None,
    augmentation: str = "none",
    query_images: jax.Array | None = None,
    example_key: jax.Array | None = None,
) -> tuple[Batch, Batch]:
    """One N-way K-shot episode from ``images`` ``[classes, E, H, W(, ch)]``.

    Args:
      key: PRNG key.
      images: device array ``[classes, E, H, W]`` or ``[classes, E, H, W, ch]`` (any dtype;
        converted to float32, values kept: ink = 1 for Omniglot).
      ways: N, distinct classes per episode.
      shots: K support examples per class.
      queries: Q query examples per class.
      num_classes: only the first ``num_classes`` classes are real (a padded client); may be
        a traced scalar. ``None``: all ``classes``. A client with fewer than N real classes
        would get blank padding classes: rule that out on the host with
        :func:`check_episode_config` (or ``episode_task_sampler(..., data=...)``).
      augmentation: ``'none'``, ``'maml'`` (random quarter turns per class per task) or
        ``'vinyals'``/``'reptile'`` (dataset-level, nothing done here).
      query_images: if given, ``[classes, E', H, W(, ch)]`` aligned with ``images`` class by
        class: the query comes from it (e.g. a client's held-out drawings) and the support
        from ``images``; otherwise support and query are disjoint draws from ``images``.
      example_key: if given, the examples of each class are chosen with it and everything
        else (classes, labels, rotations) with ``key``: ``sample_episode(key, ...,
        example_key=k2)`` is another draw of the *same task* as ``sample_episode(key, ...)``
        (Per-FedAvg-HF's independent batch D''). None: all from ``key``.

    Returns:
      ``(support, query)``: ``{'x': [N*K, H, W, ch] float32, 'y': [N*K] int32}`` and
      ``{'x': [N*Q, H, W, ch], 'y': [N*Q]}``; example ``i`` of the support has label
      ``i // K`` (query: ``i // Q``), the label of a class random per episode.

    Raises:
      ValueError: at trace time (before compiling) for a wrong image rank, ``ways`` above the
        number of classes, or ``shots + queries`` above the examples per class.
    """
    augmentation = canonical_augmentation(augmentation)
    _check_images(images, "sample_episode: images")
    n_cls, n_ex = images.shape[0], images.shape[1]
    if query_images is not None:
        _check_images(query_images, "sample_episode: query_images")
        if query_images.shape[0] != n_cls or query_images.shape[2:] != images.shape[2:]:
            raise ValueError(
                "sample_episode: query_images must match images in classes and image shape; "
                f"got {tuple(query_images.shape)} vs {tuple(images.shape)}"
            )
    _check_counts(
        ways,
        shots,
        queries,
        classes=n_cls,
        examples=n_ex,
        query_examples=None if query_images is None else query_images.shape[1],
        where="sample_episode",
    )
    if augmentation == "maml" and images.shape[2] != images.shape[3]:
        raise ValueError(
            f"sample_episode: augmentation='maml' needs square images; got H, W = "
            f"{images.shape[2]}, {images.shape[3]}"
        )

    # One uniform draw serves every random choice (one threefry call compiles much faster
    # than several): class scores, per-class example orders, quarter turns.
    n_qex = n_ex if query_images is None else query_images.shape[1]
    sizes = [n_cls, ways * n_ex, 0 if query_images is None else ways * n_qex, ways]
    u = jax.random.uniform(key, (sum(sizes),))
    u_cls, u_sup, u_qry, u_rot = jnp.split(u, np.cumsum(sizes)[:-1])
    if example_key is not None:  # the same classes, labels and turns; other examples
        u_ex = jax.random.uniform(example_key, (sizes[1] + sizes[2],))
        u_sup, u_qry = u_ex[: sizes[1]], u_ex[sizes[1] :]
    scores = u_cls
    if num_classes is not None:
        scores = jnp.where(jnp.arange(n_cls) < num_classes, scores, 2.0)
    # The N lowest scores: N distinct real classes in a random order; class classes[n] gets
    # label n, so the label order is a fresh random permutation per episode.
    classes = jnp.argsort(scores)[:ways]

    def gather(src: jax.Array, idx: jax.Array) -> jax.Array:
        x = src[classes[:, None], idx]  # [N, M, H, W(, ch)]
        if x.ndim == 4:
            x = x[..., None]
        return x.astype(jnp.float32)

    order = jnp.argsort(u_sup.reshape(ways, n_ex), axis=-1)  # a random permutation per class
    xs = gather(images, order[:, :shots])
    if query_images is None:
        xq = gather(images, order[:, shots : shots + queries])
    else:
        order_q = jnp.argsort(u_qry.reshape(ways, n_qex), axis=-1)
        xq = gather(query_images, order_q[:, :queries])

    if augmentation == "maml":
        turns = jnp.minimum((u_rot * 4).astype(jnp.int32), 3)  # uniform on {0, 1, 2, 3}
        both = _rotate_per_class(turns, jnp.concatenate([xs, xq], axis=1))
        xs, xq = both[:, :shots], both[:, shots:]

    labels = jnp.arange(ways, dtype=jnp.int32)
    support = {"x": xs.reshape((ways * shots,) + xs.shape[2:]), "y": jnp.repeat(labels, shots)}
    query = {"x": xq.reshape((ways * queries,) + xq.shape[2:]), "y": jnp.repeat(labels, queries)}
    return support, query


def _check_counts(
    ways: int,
    shots: int,
    queries: int,
    *,
    classes: int,
    examples: int,
    query_examples: int | None,
    where: str,
    who: str = "",
) -> None:
    for name, value in (("ways", ways), ("shots", shots), ("queries", queries)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{where}: {name}={value!r} must be an integer >= 1")
    if ways > classes:
        raise ValueError(
            f"{where}: ways={ways} is more than the {classes} classes{who} available; "
            f"allowed: 1 <= ways <= {classes}"
        )
    if query_examples is None:
        if shots + queries > examples:
            raise ValueError(
                f"{where}: shots={shots} + queries={queries} = {shots + queries} is more than "
                f"the {examples} examples per class{who}; allowed: shots + queries <= {examples} "
                "(support and query are disjoint)"
            )
    else:
        if shots > examples:
            raise ValueError(
                f"{where}: shots={shots} is more than the {examples} support examples per "
                f"class{who}; allowed: shots <= {examples}"
            )
        if queries > query_examples:
            raise ValueError(
                f"{where}: queries={queries} is more than the {query_examples} held-out examples "
                f"per class{who}; allowed: queries <= {query_examples}"
            )


def check_episode_config(
    data: Mapping[str, Any],
    *,
    ways: int,
    shots: int,
    queries: int,
    images_key: str = "images",
    query_key: str | None = None,
    federated: bool | None = None,
) -> None:
    """Check on the host that every client (or the single class array) can serve an episode.

    ``data`` is one image set ``{'images': [classes, E, H, W(, ch)]}`` or a federated dataset
    ``{'images': [C, classes, E, H, W(, ch)], 'num_classes': [C], ...}`` (``federated``: which
    of the two; default: federated when ``'num_classes'`` is present). Raises ValueError naming
    the setting, the value, the client and what is allowed.
    """
    if images_key not in data:
        raise ValueError(
            f"episode data has no {images_key!r} array; keys present: {sorted(data)} "
            "(expected an image array [classes, examples, H, W])"
        )
    images = data[images_key]
    if federated is None:
        federated = "num_classes" in data
    shape = tuple(images.shape)
    if (len(shape) - int(federated)) not in (4, 5):
        raise ValueError(
            f"episode data {images_key!r} must have shape "
            f"{'[C, ' if federated else '['}classes, examples, H, W] (or with a channel axis); "
            f"got shape {shape}"
        )
    q_examples = None
    if query_key is not None:
        if query_key not in data:
            raise ValueError(f"episode data has no {query_key!r} array; keys: {sorted(data)}")
        q_examples = int(data[query_key].shape[1 + int(federated)])
    examples = int(shape[1 + int(federated)])
    if not federated:
        _check_counts(
            ways,
            shots,
            queries,
            classes=int(shape[0]),
            examples=examples,
            query_examples=q_examples,
            where="episode sampler",
        )
        return
    counts = np.asarray(data.get("num_classes", np.full(shape[0], shape[1])))
    smallest = int(np.argmin(counts))
    _check_counts(
        ways,
        shots,
        queries,
        classes=int(counts[smallest]),
        examples=examples,
        query_examples=q_examples,
        where="episode sampler",
        who=f" of client {smallest} (the smallest of {shape[0]} clients)",
    )


def episode_task_sampler(
    *,
    ways: int,
    shots: int,
    queries: int,
    augmentation: str = "none",
    images_key: str = "images",
    query_key: str | None = None,
    data: Mapping[str, Any] | None = None,
) -> TaskSampler:
    """A task sampler ``sample_task(key, client_data) -> (support, query)`` of N-way episodes.

    ``client_data`` is ONE client's slice: ``{images_key: [classes, E, H, W(, ch)]}`` with an
    optional ``'num_classes'`` scalar (only the first ``num_classes`` classes are real). With
    ``query_key`` (e.g. ``'test_images'`` of :func:`fmljax.data.omniglot.omniglot_clients`) the
    query comes from that array (the client's held-out examples of the same classes) and the
    support from ``images_key``: that is the personalised evaluation, whose query examples
    never enter a support set or a training step; such a sampler is its own evaluation
    sampler (``sample_task.evaluation is sample_task``, see :mod:`fmljax.samplers`), so
    :func:`fmljax.build` evaluates with it on data holding ``'test_images'``.
    ``augmentation``: see :data:`AUGMENTATIONS`.

    ``data`` (optional): the whole dataset, one image set or federated (leading axis C), checked
    now on the host so that bad settings fail before anything compiles.
    """
    augmentation = canonical_augmentation(augmentation)
    for name, value in (("ways", ways), ("shots", shots), ("queries", queries)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"episode_task_sampler: {name}={value!r} must be an integer >= 1")
    if data is not None:
        check_episode_config(
            data,
            ways=ways,
            shots=shots,
            queries=queries,
            images_key=images_key,
            query_key=query_key,
        )

    def sample_task(key: jax.Array, client_data: Mapping[str, Any]) -> tuple[Batch, Batch]:
        return sample_episode(
            key,
            client_data[images_key],
            ways=ways,
            shots=shots,
            queries=queries,
            num_classes=client_data.get("num_classes"),
            augmentation=augmentation,
            query_images=None if query_key is None else client_data[query_key],
        )

    def same_task(key: jax.Array, other_key: jax.Array, client_data: Mapping[str, Any]):
        """Another draw of the task ``sample_task(key, client_data)`` draws: the same
        classes, labels and rotations, the examples chosen by ``other_key``."""
        return sample_episode(
            key,
            client_data[images_key],
            ways=ways,
            shots=shots,
            queries=queries,
            num_classes=client_data.get("num_classes"),
            augmentation=augmentation,
            query_images=None if query_key is None else client_data[query_key],
            example_key=other_key,
        )

    sample_task.same_task = same_task  # type: ignore[attr-defined]
    if query_key is not None:  # an evaluation sampler: query = held-out drawings
        sample_task.evaluation = sample_task  # type: ignore[attr-defined]
    return sample_task


def client_batch_sampler(
    support_size: int,
    query_size: int,
    *,
    source: str = "train",
    heldout: str = "test",
    eval_support_size: int | None = None,
    eval_query_size: int | None = None,
    data: Mapping[str, Any] | None = None,
) -> SplitSampler:
    """A split-aware task sampler for labelled clients (:class:`fmljax.samplers.SplitSampler`).

    ``client_data[source]`` and ``client_data[heldout]`` are ``{'x': [M, ...], 'y': [M],
    'mask': [M]}`` (one padded client, see :func:`fmljax.data.partition.federate`: ``'train'``
    and ``'test'``).

    * Training, ``sampler(key, client_data)``: the support (``support_size`` = K examples) and
      the query (``query_size`` = Q) are disjoint uniform draws without replacement among the
      real (``mask == 1``) examples of ``client_data[source]``; held-out examples never enter
      them.
    * Evaluation, ``sampler.evaluation(key, client_data)`` (what :func:`fmljax.build`'s
      ``evaluate`` uses by default): the support is a uniform draw of ``eval_support_size``
      (default K) real examples of ``client_data[source]``, the query is the client's whole
      held-out split ``client_data[heldout]`` (padded, masked) or, with ``eval_query_size``,
      a uniform draw of that many of its real examples. No example is in both, and perturbing
      the held-out split never changes the adapted parameters.

    A client with fewer real examples than a draw needs gets padded positions, marked
    ``mask = 0``; pass ``data`` (the federated dataset) to rule that out on the host.

    Returns the sampler; ``'x'``, ``'y'``, ``'mask'`` of lengths K and Q (training) or
    ``eval_support_size`` and ``eval_query_size`` / the padded held-out length (evaluation).
    """
    for name, value in (("support_size", support_size), ("query_size", query_size)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"client_batch_sampler: {name}={value!r} must be an integer >= 1")
    for name, value in (("eval_support_size", eval_support_size),
                        ("eval_query_size", eval_query_size)):  # fmt: skip
        if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
            raise ValueError(
                f"client_batch_sampler: {name}={value!r} is invalid: must be None or an "
                "integer >= 1"
            )
    for name, value in (("source", source), ("heldout", heldout)):
        if not isinstance(value, str):
            raise ValueError(f"client_batch_sampler: {name}={value!r} is invalid: must be a str")
    if source == heldout:
        raise ValueError(
            f"client_batch_sampler: heldout={heldout!r} is invalid: must differ from "
            f"source={source!r} (evaluation would score training examples)"
        )
    k_eval = support_size if eval_support_size is None else eval_support_size
    if data is not None:
        splits = sorted(k for k in data if isinstance(data[k], Mapping))
        if source not in data:
            raise ValueError(
                f"client_batch_sampler: source={source!r} is not in the dataset; allowed: {splits}"
            )
        sizes = np.asarray(data[source]["mask"]).sum(axis=-1)
        smallest = int(np.argmin(sizes))
        need = support_size + query_size
        if sizes[smallest] < need:
            raise ValueError(
                f"client_batch_sampler: support_size={support_size} + query_size={query_size} = "
                f"{need} is more than the {int(sizes[smallest])} {source!r} examples of client "
                f"{smallest} (the smallest); allowed: support_size + query_size <= "
                f"{int(sizes[smallest])}"
            )
        if sizes[smallest] < k_eval:
            raise ValueError(
                f"client_batch_sampler: eval_support_size={k_eval} is more than the "
                f"{int(sizes[smallest])} {source!r} examples of client {smallest} (the "
                f"smallest); allowed: eval_support_size <= {int(sizes[smallest])}"
            )
        if heldout in data and eval_query_size is not None:
            held = np.asarray(data[heldout]["mask"]).sum(axis=-1)
            low = int(np.argmin(held))
            if held[low] < eval_query_size:
                raise ValueError(
                    f"client_batch_sampler: eval_query_size={eval_query_size} is more than the "
                    f"{int(held[low])} {heldout!r} examples of client {low} (the smallest); "
                    f"allowed: eval_query_size <= {int(held[low])}"
                )

    def draw(key: jax.Array, pool: Mapping[str, jax.Array], sizes: tuple[int, ...], what: str):
        mask = pool["mask"]
        m = mask.shape[0]
        if sum(sizes) > m:
            raise ValueError(
                f"client_batch_sampler: {what} = {sum(sizes)} is more than the padded client "
                f"size {m}"
            )
        scores = jnp.where(mask > 0, jax.random.uniform(key, (m,)), 2.0)
        order = jnp.argsort(scores)  # real examples first, in a random order
        cuts = np.cumsum((0, *sizes))
        pairs = zip(cuts[:-1], cuts[1:], strict=True)
        return [{k: v[order[a:b]] for k, v in pool.items()} for a, b in pairs]

    def sample_task(key: jax.Array, client_data: Mapping[str, Any]) -> tuple[Batch, Batch]:
        support, query = draw(
            key, client_data[source], (support_size, query_size), "support_size + query_size"
        )
        return support, query

    def evaluation(key: jax.Array, client_data: Mapping[str, Any]) -> tuple[Batch, Batch]:
        if heldout not in client_data:
            raise ValueError(
                f"client_batch_sampler(...).evaluation: the client has no {heldout!r} split "
                f"(keys: {sorted(client_data)}); allowed: clients with held-out examples (e.g. "
                "fmljax.data.federate), or another heldout= split"
            )
        (support,) = draw(key, client_data[source], (k_eval,), "eval_support_size")
        if eval_query_size is None:
            query = dict(client_data[heldout])
        else:
            k_query = jax.random.fold_in(key, 1)
            (query,) = draw(k_query, client_data[heldout], (eval_query_size,), "eval_query_size")
        return support, query

    return SplitSampler(sample_task, evaluation)


def full_client_task(key: jax.Array, client_data: Mapping[str, Any]) -> tuple[Batch, Batch]:
    """Personalised evaluation task: support = the client's whole (padded, masked) train set,
    query = its whole test set. ``key`` is unused (kept for the sampler signature). An
    evaluation sampler (``full_client_task.evaluation is full_client_task``): as
    ``eval_sample_task`` of :func:`fmljax.build`, or as its ``sample_task`` for evaluation
    only (a training round on it would train on the held-out examples)."""
    del key
    return dict(client_data["train"]), dict(client_data["test"])


# full_client_task is itself an evaluation sampler (support = 'train', query = held-out
# 'test'): as ``sample_task`` of :func:`fmljax.build` it needs no ``eval_sample_task``.
full_client_task.evaluation = full_client_task  # type: ignore[attr-defined]
