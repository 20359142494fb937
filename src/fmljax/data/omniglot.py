"""Omniglot (Lake, Salakhutdinov & Tenenbaum, 2015, "Human-level concept learning through
probabilistic program induction", Science 350(6266)): loading, few-shot splits and federated
clients.

Three ways in, one in-memory form out (:class:`OmniglotData`, ``images`` ``[classes, E, S, S]``
uint8 with ink = 1, classes sorted by global character id, drawings by drawer):

* the compact archive ``omniglot.npz`` (all 32,460 drawings bit-packed at 105x105 with their
  metadata; see the ``README.md`` that comes with it): :func:`load_omniglot_npz`, path given by
  the caller or by the environment variable ``FMLJAX_OMNIGLOT``;
* the official release layout (``images_background/`` and ``images_evaluation/`` folders of
  ``Alphabet/characterNN/XXXX_NN.png``, or the two zip files ``images_background.zip`` and
  ``images_evaluation.zip`` of ``brendenlake/omniglot``): :func:`load_omniglot_folders`;
* TensorFlow Datasets' random-access ``tfds.data_source('omniglot', split=...)`` (works without
  TensorFlow; ``tensorflow_datasets`` is imported only when this path is used):
  :func:`load_omniglot_tfds`.

Resizing follows the MAML reference code (Finn et al., 2017, ``cbfinn/maml``,
``data/omniglot_resized/resize_images.py``): it calls ``resize((28, 28), resample=LANCZOS)``
on the 1-bit PNGs, and Pillow resamples mode-``'1'`` images with NEAREST whatever filter is
asked for, so the images MAML trained on are **binary nearest-neighbour** 28x28 images. We use
exactly that nearest-neighbour rule, vectorised as index arrays (source pixel
``floor((i + 0.5) * 105 / S)`` for output pixel ``i``; equal to Pillow's, tested), and never the
antialiased copy (``images28``) of the archive.

Splits by name (:data:`SPLITS`):

* ``'maml'``: the 1,623 characters listed as MAML lists its folders (alphabets sorted by name,
  then characters), shuffled with Python's ``random.Random(1)`` as MAML's ``random.seed(1);
  random.shuffle(...)``, then 1,100 train, 100 validation and the remaining 423 test;
* ``'background-evaluation'``: the 964 characters of the 30 background alphabets train, the 659
  of the 20 evaluation alphabets test (Lake et al., 2015).

Federated clients (:func:`omniglot_clients`): one client per alphabet (FedMeta, Chen et al.,
2018, "Federated Meta-Learning with Fast Convergence and Efficient Communication"; few
classes and few samples per client) or random disjoint groups of characters, each client's
drawings split 75/25 (by default) into train and held-out test drawings.
"""

from __future__ import annotations

import dataclasses
import io
import os
import random
import re
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from fmljax.data.episodes import canonical_augmentation, rotate_classes

__all__ = [
    "CLIENT_PARTITIONS",
    "ENV_VAR",
    "SPLITS",
    "OmniglotData",
    "augment_splits",
    "load_omniglot",
    "load_omniglot_folders",
    "load_omniglot_npz",
    "load_omniglot_tfds",
    "nearest_indices",
    "omniglot_clients",
    "resize_nearest",
    "split_omniglot",
]

ENV_VAR = "FMLJAX_OMNIGLOT"
SPLITS = ("maml", "background-evaluation")
CLIENT_PARTITIONS = ("alphabet", "random")
SOURCE_SIZE = 105
_MAML_SIZES = (1100, 100)  # train, validation; the rest (423) is test
_NPZ_KEYS = ("images", "alphabet", "character", "character_in_alphabet", "drawer", "split")
_TFDS_SPLITS = {"train": True, "test": False, "small1": True, "small2": True}


@dataclasses.dataclass(frozen=True)
class OmniglotData:
    """Omniglot in memory, one row per class (character, or rotated character).

    Attributes:
      images: ``[classes, E, S, S]`` uint8, 1 = ink, 0 = paper (E = 20 drawings for the full
        set, S = 28 by default).
      character: ``[classes]`` int32 global character id (0..1622; TFDS ``label``).
      alphabet: ``[classes]`` int32 index into ``alphabet_names``.
      character_in_alphabet: ``[classes]`` int32, the ``characterNN`` folder number minus 1.
      background: ``[classes]`` bool, True for ``images_background`` (TFDS ``train``).
      rotation: ``[classes]`` int32 quarter turns applied (Vinyals' expansion), else 0.
      alphabet_names: the alphabet folder names, sorted.
    """

    images: np.ndarray
    character: np.ndarray
    alphabet: np.ndarray
    character_in_alphabet: np.ndarray
    background: np.ndarray
    rotation: np.ndarray
    alphabet_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return int(self.images.shape[0])

    @property
    def examples_per_class(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[2])

    def subset(self, idx: Sequence[int] | np.ndarray) -> OmniglotData:
        """The classes ``idx`` (an index array or a boolean mask), in that order."""
        idx = np.asarray(idx)
        return dataclasses.replace(
            self,
            images=self.images[idx],
            character=self.character[idx],
            alphabet=self.alphabet[idx],
            character_in_alphabet=self.character_in_alphabet[idx],
            background=self.background[idx],
            rotation=self.rotation[idx],
        )

    def device_images(self, channel: bool = False) -> jnp.ndarray:
        """``images`` as a device array (uint8; ``[..., 1]`` added when ``channel``)."""
        x = jnp.asarray(self.images)
        return x[..., None] if channel else x


# --------------------------------------------------------------------------------------------
# Resizing


def nearest_indices(size: int, source: int = SOURCE_SIZE) -> np.ndarray:
    """Source row/column of each of ``size`` output pixels under Pillow's NEAREST resize.

    ``floor((i + 0.5) * source / size)``: Pillow samples the source pixel under the centre of
    each output pixel. For 105 -> 28 this is ``[1, 5, 9, 13, ...]``.
    """
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"image_size={size!r} must be an integer >= 1")
    return np.floor((np.arange(size) + 0.5) * source / size).astype(np.intp)


def resize_nearest(ink: np.ndarray, size: int) -> np.ndarray:
    """``[..., 105, 105]`` -> ``[..., size, size]`` nearest-neighbour (MAML's 28x28 rule)."""
    idx = nearest_indices(size, ink.shape[-1])
    return ink[..., idx[:, None], idx[None, :]]


def _resize_packed(packed: np.ndarray, size: int) -> np.ndarray:
    """Resize bit-packed rows ``[n, 105, 14]`` (MSB first, 1 = ink) to ``[n, size, size]`` uint8.

    Only the sampled bits are read: a gather of bytes by (row, column // 8) then a shift.
    """
    idx = nearest_indices(size)
    byte = packed[:, idx[:, None], (idx // 8)[None, :]]
    shift = (7 - (idx % 8)).astype(np.uint8)
    return (byte >> shift[None, None, :]) & np.uint8(1)


# --------------------------------------------------------------------------------------------
# Assembly shared by all loaders


def _assemble(
    ink: np.ndarray,
    character: np.ndarray,
    alphabet: np.ndarray,
    character_in_alphabet: np.ndarray,
    background: np.ndarray,
    drawer: np.ndarray | None,
    alphabet_names: Sequence[str],
    source: str,
) -> OmniglotData:
    """Group per-image arrays (``ink`` ``[n, S, S]``) into ``[classes, E, S, S]``."""
    n = len(character)
    if n == 0:
        raise ValueError(f"Omniglot source {source} holds no images")
    character = np.asarray(character, np.int64)
    order = np.lexsort((np.arange(n) if drawer is None else np.asarray(drawer), character))
    chars, counts = np.unique(character[order], return_counts=True)
    if np.any(counts != counts[0]):
        bad = int(np.argmax(counts != counts[0]))
        raise ValueError(
            f"Omniglot source {source}: every character needs the same number of drawings; "
            f"character {int(chars[0])} has {int(counts[0])} but character {int(chars[bad])} has "
            f"{int(counts[bad])}"
        )
    e = int(counts[0])
    per_image = {
        "alphabet": np.asarray(alphabet),
        "character_in_alphabet": np.asarray(character_in_alphabet),
        "background": np.asarray(background, bool),
    }
    per_class = {}
    for name, values in per_image.items():
        grouped = values[order].reshape(len(chars), e)
        if np.any(grouped != grouped[:, :1]):
            c = int(chars[np.argmax(np.any(grouped != grouped[:, :1], axis=1))])
            what = "both background and evaluation" if name == "background" else f"two {name}s"
            raise ValueError(
                f"Omniglot source {source}: character {c} appears in {what}; "
                "a character must belong to one alphabet of one split"
            )
        per_class[name] = grouped[:, 0]
    images = np.ascontiguousarray(ink[order]).reshape((len(chars), e) + ink.shape[1:])
    return OmniglotData(
        images=images.astype(np.uint8),
        character=chars.astype(np.int32),
        alphabet=per_class["alphabet"].astype(np.int32),
        character_in_alphabet=per_class["character_in_alphabet"].astype(np.int32),
        background=per_class["background"],
        rotation=np.zeros(len(chars), np.int32),
        alphabet_names=tuple(str(a) for a in alphabet_names),
    )


# --------------------------------------------------------------------------------------------
# Loaders


def load_omniglot(
    source: str | os.PathLike | None = None,
    *,
    image_size: int = 28,
    tfds_splits: Sequence[str] = ("train", "test"),
    tfds_data_dir: str | None = None,
) -> OmniglotData:
    """Load Omniglot from ``source``: an ``.npz`` archive, a folder with the release layout
    (or its zips), or ``'tfds'``. ``None``: the path in ``$FMLJAX_OMNIGLOT``.

    Raises:
      FileNotFoundError: no source given and ``FMLJAX_OMNIGLOT`` unset, or the path is missing.
      ValueError: a corrupt or malformed file (named in the message).
    """
    if source is None:
        source = os.environ.get(ENV_VAR)
        if not source:
            raise FileNotFoundError(
                f"no Omniglot source: pass a path (the omniglot.npz archive, or a folder with "
                f"images_background/ and images_evaluation/ or their zips) or 'tfds', or set "
                f"the environment variable {ENV_VAR} to the archive's path"
            )
    if str(source) == "tfds":
        return load_omniglot_tfds(splits=tfds_splits, data_dir=tfds_data_dir, image_size=image_size)
    path = Path(source)
    if path.is_dir():
        return load_omniglot_folders(path, image_size=image_size)
    match = re.fullmatch(r"images_(background|evaluation)\.zip", path.name)
    if match and path.is_file():  # one official zip on its own
        return load_omniglot_folders(path.parent, image_size=image_size, parts=(match.group(1),))
    return load_omniglot_npz(path, image_size=image_size)


def load_omniglot_npz(path: str | os.PathLike, *, image_size: int = 28) -> OmniglotData:
    """Load the compact archive (format in its README): bit-packed 105x105 images, metadata.

    All 32,460 images are resized in one vectorised gather from the packed bits (no full
    unpacking), in well under a second.
    """
    nearest_indices(image_size)  # validates image_size
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Omniglot archive not found: {str(path)!r} (set {ENV_VAR} or pass the path of "
            "omniglot.npz)"
        )
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in _NPZ_KEYS if k not in archive.files]
            if missing:
                raise ValueError(
                    f"Omniglot archive {str(path)!r} is not the expected format: missing arrays "
                    f"{missing}; expected {list(_NPZ_KEYS)} (+ 'alphabet_names')"
                )
            arrays = {k: archive[k] for k in _NPZ_KEYS}
            names = archive["alphabet_names"] if "alphabet_names" in archive.files else None
    except ValueError as err:
        if "Omniglot archive" in str(err):
            raise
        raise ValueError(
            f"Omniglot archive {str(path)!r} is corrupt or not an .npz: {err}"
        ) from err
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise ValueError(
            f"Omniglot archive {str(path)!r} is corrupt or not an .npz: {err}"
        ) from err
    packed = arrays["images"]
    n = packed.shape[0] if packed.ndim else 0
    want = (n, SOURCE_SIZE, (SOURCE_SIZE + 7) // 8)
    if packed.shape != want or packed.dtype != np.uint8:
        raise ValueError(
            f"Omniglot archive {str(path)!r}: 'images' must be uint8 bit-packed rows of shape "
            f"(n, {want[1]}, {want[2]}); got {packed.dtype} {packed.shape}"
        )
    for k in _NPZ_KEYS[1:]:
        if arrays[k].shape != (n,):
            raise ValueError(
                f"Omniglot archive {str(path)!r}: {k!r} must have shape ({n},) like 'images'; "
                f"got {arrays[k].shape}"
            )
    if names is None:
        names = [str(i) for i in range(int(arrays["alphabet"].max()) + 1)]
    return _assemble(
        _resize_packed(packed, image_size),
        arrays["character"],
        arrays["alphabet"],
        arrays["character_in_alphabet"],
        arrays["split"] == "background",
        arrays["drawer"],
        names,
        source=repr(str(path)),
    )


_CHAR_RE = re.compile(r"^character(\d+)$")
_FILE_RE = re.compile(r"^(\d+)_(\d+)\.png$")


def _decode_png(data: bytes | Path, where: str, image_size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            if img.size != (SOURCE_SIZE, SOURCE_SIZE):
                raise ValueError(
                    f"Omniglot image {where} has size {img.size[0]}x{img.size[1]}; "
                    f"expected {SOURCE_SIZE}x{SOURCE_SIZE}"
                )
            ink = np.asarray(img.convert("L")) < 128
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"Omniglot image {where} is corrupt: {err}") from err
    return resize_nearest(ink, image_size).astype(np.uint8)


def _release_members(root: Path, part: str) -> Iterator[tuple[tuple[str, ...], Any, str]]:
    """Yield ``(path parts, payload, where)`` of the PNGs of ``images_<part>`` (folder or zip)."""
    folder = root / f"images_{part}"
    archive = root / f"images_{part}.zip"
    if folder.is_dir():
        for png in sorted(folder.glob("*/*/*.png")):
            yield png.relative_to(folder).parts, png, str(png)
    elif archive.is_file():
        try:
            with zipfile.ZipFile(archive) as zf:
                for info in sorted(zf.infolist(), key=lambda i: i.filename):
                    parts = tuple(p for p in info.filename.split("/") if p)
                    if info.is_dir() or not parts[-1].endswith(".png") or "__MACOSX" in parts:
                        continue
                    yield parts[-3:], zf.read(info), f"{archive}:{info.filename}"
        except zipfile.BadZipFile as err:
            raise ValueError(f"Omniglot zip {str(archive)!r} is corrupt: {err}") from err


def load_omniglot_folders(
    root: str | os.PathLike,
    *,
    image_size: int = 28,
    parts: Sequence[str] = ("background", "evaluation"),
) -> OmniglotData:
    """Load the official release layout under ``root``.

    ``root`` holds ``images_background/`` and/or ``images_evaluation/`` (each
    ``Alphabet/characterNN/XXXX_NN.png``: ``XXXX`` the 1-based global character id, ``NN`` the
    drawer) or the zips ``images_background.zip`` / ``images_evaluation.zip``. Every PNG must be
    105x105; it is resized to ``image_size`` by MAML's nearest-neighbour rule. ``parts``: which
    of the two halves to read (those absent are skipped). Alphabet ids index the sorted names
    of the alphabets found (all 50 for the full release, as in the archive and TFDS).
    """
    nearest_indices(image_size)
    for part in parts:
        if part not in ("background", "evaluation"):
            raise ValueError(
                f"parts: {part!r} is not an Omniglot release part; allowed: 'background', "
                "'evaluation'"
            )
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Omniglot folder not found: {str(root)!r}")
    records: list[tuple[str, int, int, int, bool, np.ndarray]] = []
    for part in parts:
        is_background = part == "background"
        for rel, payload, where in _release_members(root, part):
            if len(rel) != 3:
                raise ValueError(
                    f"Omniglot file {where} is not at Alphabet/characterNN/XXXX_NN.png "
                    f"inside images_{part}"
                )
            alpha, char_dir, fname = rel
            m_char, m_file = _CHAR_RE.match(char_dir), _FILE_RE.match(fname)
            if m_char is None or m_file is None:
                raise ValueError(
                    f"Omniglot file {where}: expected Alphabet/characterNN/XXXX_NN.png names "
                    f"(got {char_dir}/{fname})"
                )
            records.append(
                (
                    alpha,
                    int(m_file.group(1)) - 1,
                    int(m_char.group(1)) - 1,
                    int(m_file.group(2)) - 1,
                    is_background,
                    _decode_png(payload, where, image_size),
                )
            )
    if not records:
        raise FileNotFoundError(
            f"no Omniglot images under {str(root)!r}: expected images_background/ or "
            "images_evaluation/ (Alphabet/characterNN/XXXX_NN.png), or images_background.zip / "
            "images_evaluation.zip"
        )
    names = sorted({r[0] for r in records})
    index = {a: i for i, a in enumerate(names)}
    return _assemble(
        np.stack([r[5] for r in records]),
        np.array([r[1] for r in records]),
        np.array([index[r[0]] for r in records]),
        np.array([r[2] for r in records]),
        np.array([r[4] for r in records]),
        np.array([r[3] for r in records]),
        names,
        source=repr(str(root)),
    )


def load_omniglot_tfds(
    *,
    splits: Sequence[str] = ("train", "test"),
    data_dir: str | None = None,
    download: bool = False,
    image_size: int = 28,
) -> OmniglotData:
    """Load ``tfds.data_source('omniglot', split=...)`` (random access, no TensorFlow needed).

    ``splits``: TFDS split names, ``'train'`` (= background), ``'test'`` (= evaluation),
    ``'small1'``, ``'small2'`` (background subsets; don't combine them with ``'train'``). TFDS
    images are RGB 105x105 with black ink; ink = pixel < 128. TFDS ``label`` is the global
    character id and ``alphabet`` the index of the sorted alphabet names, as in the archive.
    ``download=False`` (default) never fetches anything.
    """
    nearest_indices(image_size)
    for split in splits:
        if split not in _TFDS_SPLITS:
            raise ValueError(
                f"tfds split={split!r} is not an Omniglot split; allowed: {list(_TFDS_SPLITS)}"
            )
    import tensorflow_datasets as tfds  # lazy: heavy, and only this path needs it

    images, labels, alphabets, in_alpha, background = [], [], [], [], []
    names: Sequence[str] | None = None
    for split in splits:
        source = tfds.data_source("omniglot", split=split, data_dir=data_dir, download=download)
        if names is None:
            try:
                names = list(source.dataset_info.features["alphabet"].names)
            except (AttributeError, KeyError, TypeError):
                names = None
        for i in range(len(source)):
            ex = source[i]
            img = np.asarray(ex["image"])
            if img.shape[:2] != (SOURCE_SIZE, SOURCE_SIZE) or img.ndim not in (2, 3):
                raise ValueError(
                    f"tfds omniglot split {split!r} example {i}: image shape {img.shape}; "
                    f"expected ({SOURCE_SIZE}, {SOURCE_SIZE}, 3)"
                )
            ink = (img[..., 0] if img.ndim == 3 else img) < 128
            images.append(resize_nearest(ink, image_size).astype(np.uint8))
            labels.append(int(ex["label"]))
            alphabets.append(int(ex["alphabet"]))
            in_alpha.append(int(ex["alphabet_char_id"]))
            background.append(_TFDS_SPLITS[split])
    if not images:
        raise ValueError(f"tfds omniglot splits {list(splits)} hold no examples")
    if names is None or len(names) <= max(alphabets):
        names = [str(i) for i in range(max(alphabets) + 1)]
    return _assemble(
        np.stack(images),
        np.array(labels),
        np.array(alphabets),
        np.array(in_alpha),
        np.array(background),
        None,
        names,
        source=f"tfds omniglot {list(splits)}",
    )


# --------------------------------------------------------------------------------------------
# Splits and augmentation


def split_omniglot(
    data: OmniglotData,
    split: str = "maml",
    *,
    seed: int = 1,
    sizes: tuple[int, int] | None = None,
) -> dict[str, OmniglotData]:
    """Split characters into disjoint meta-train / (validation) / meta-test sets by name.

    ``'maml'`` -> ``{'train', 'val', 'test'}``: characters in MAML's folder order (alphabet
    name, then character number) shuffled by ``random.Random(seed)`` (MAML: seed 1), then
    ``sizes = (train, val)`` = (1100, 100) and the rest (423) test. ``sizes`` may be given
    for a smaller data set. ``'background-evaluation'`` -> ``{'train', 'test'}`` (964/659).
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not known; allowed: {', '.join(map(repr, SPLITS))}")
    if np.any(data.rotation != 0):
        raise ValueError("split_omniglot: split the data before the 'vinyals' rotation expansion")
    if split == "background-evaluation":
        out = {"train": data.subset(data.background), "test": data.subset(~data.background)}
        for name, part in out.items():
            if part.num_classes == 0:
                raise ValueError(
                    f"split='background-evaluation': the {name} part is empty "
                    f"({'no background' if name == 'train' else 'no evaluation'} characters)"
                )
        return out
    n_train, n_val = _MAML_SIZES if sizes is None else sizes
    if n_train < 1 or n_val < 0 or n_train + n_val >= data.num_classes:
        raise ValueError(
            f"split='maml' with sizes (train, val) = ({n_train}, {n_val}) needs at least "
            f"{n_train + n_val + 1} characters; this data has {data.num_classes}; allowed: "
            f"train >= 1, val >= 0, train + val < {data.num_classes}"
        )
    listing = np.lexsort((data.character_in_alphabet, data.alphabet))  # sorted folder order
    perm = list(range(data.num_classes))
    random.Random(seed).shuffle(perm)
    order = listing[np.asarray(perm)]
    return {
        "train": data.subset(order[:n_train]),
        "val": data.subset(order[n_train : n_train + n_val]),
        "test": data.subset(order[n_train + n_val :]),
    }


def augment_splits(
    splits: Mapping[str, OmniglotData], augmentation: str
) -> dict[str, OmniglotData]:
    """Apply the dataset-level part of a rotation augmentation to split data.

    ``'vinyals'`` / ``'reptile'``: the ``'train'`` characters x4 rotations (0, 90, 180, 270
    degrees) as new classes; other splits unrotated. ``'maml'`` and ``'none'``: unchanged (the
    MAML rotation happens per task in :func:`fmljax.data.episodes.sample_episode`).
    """
    augmentation = canonical_augmentation(augmentation)
    out = dict(splits)
    if augmentation == "vinyals":
        if "train" not in out:
            raise ValueError(
                f"augmentation='vinyals' expands the 'train' split; got splits {sorted(out)}"
            )
        tr = out["train"]
        out["train"] = OmniglotData(
            images=rotate_classes(tr.images),
            character=np.tile(tr.character, 4),
            alphabet=np.tile(tr.alphabet, 4),
            character_in_alphabet=np.tile(tr.character_in_alphabet, 4),
            background=np.tile(tr.background, 4),
            rotation=np.repeat(np.arange(4, dtype=np.int32), tr.num_classes),
            alphabet_names=tr.alphabet_names,
        )
    return out


# --------------------------------------------------------------------------------------------
# Federated clients


def _class_groups(
    data: OmniglotData, by: str, num_clients: int | None, rng: np.random.Generator
) -> list[np.ndarray]:
    if by not in CLIENT_PARTITIONS:
        raise ValueError(
            f"by={by!r} is not a known Omniglot partition; allowed: "
            f"{', '.join(map(repr, CLIENT_PARTITIONS))}"
        )
    if by == "alphabet":
        if num_clients is not None:
            raise ValueError(
                f"by='alphabet' makes one client per alphabet; num_clients={num_clients} must "
                "be None"
            )
        return [np.flatnonzero(data.alphabet == a) for a in np.unique(data.alphabet)]
    if num_clients is None or not 1 <= num_clients <= data.num_classes:
        raise ValueError(
            f"by='random' needs num_clients between 1 and the {data.num_classes} classes; "
            f"got num_clients={num_clients}"
        )
    return [np.sort(g) for g in np.array_split(rng.permutation(data.num_classes), num_clients)]


def omniglot_clients(
    data: OmniglotData,
    *,
    by: str = "alphabet",
    num_clients: int | None = None,
    test_fraction: float = 0.25,
    seed: int = 0,
) -> dict[str, Any]:
    """A federated Omniglot dataset: disjoint groups of classes, one group per client.

    ``by='alphabet'``: one client per alphabet present in ``data``; ``by='random'``:
    ``num_clients`` random disjoint groups of characters (sizes differ by at most one). Each
    class's drawings are shuffled (``seed``) and split into ``E_train = int((1 -
    test_fraction) * E)`` train drawings and the rest held out, so a client's test drawings
    never enter its support set or any training step.

    Returns a dict of device arrays, leading axis C (classes padded to ``classes_max``):

    * ``'images'``: ``[C, classes_max, E_train, S, S]`` uint8, ink = 1;
    * ``'test_images'``: ``[C, classes_max, E - E_train, S, S]`` uint8;
    * ``'num_classes'``: ``[C]`` int32, real classes per client (the first ones);
    * ``'character'``: ``[C, classes_max]`` int32 global character id, -1 for padding;
    * ``'alphabet'``: ``[C]`` int32 alphabet id (``by='alphabet'``) or -1;
    * ``'num_examples'``: ``[C]`` float32, ``num_classes * E_train`` (aggregation weight).

    Sample tasks with :func:`fmljax.data.episodes.episode_task_sampler` (``query_key=
    'test_images'`` for the personalised evaluation).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction!r} must be in (0, 1)")
    e = data.examples_per_class
    e_train = int((1.0 - test_fraction) * e)
    if not 1 <= e_train < e:
        raise ValueError(
            f"test_fraction={test_fraction} leaves {e_train} of {e} drawings per class for "
            "training; allowed: at least one train and one test drawing"
        )
    rng = np.random.default_rng(seed)
    groups = _class_groups(data, by, num_clients, rng)
    c, k_max = len(groups), max(len(g) for g in groups)
    size = data.image_size
    train = np.zeros((c, k_max, e_train, size, size), np.uint8)
    test = np.zeros((c, k_max, e - e_train, size, size), np.uint8)
    character = np.full((c, k_max), -1, np.int32)
    for i, g in enumerate(groups):
        perm = np.argsort(rng.random((len(g), e)), axis=1)  # per-class drawing order
        imgs = np.take_along_axis(data.images[g], perm[:, :, None, None], axis=1)
        train[i, : len(g)] = imgs[:, :e_train]
        test[i, : len(g)] = imgs[:, e_train:]
        character[i, : len(g)] = data.character[g]
    num_classes = np.array([len(g) for g in groups], np.int32)
    alphabet = (
        np.array([data.alphabet[g[0]] for g in groups], np.int32)
        if by == "alphabet"
        else np.full(c, -1, np.int32)
    )
    return {
        "images": jnp.asarray(train),
        "test_images": jnp.asarray(test),
        "num_classes": jnp.asarray(num_classes),
        "character": jnp.asarray(character),
        "alphabet": jnp.asarray(alphabet),
        "num_examples": jnp.asarray(num_classes * e_train, jnp.float32),
    }
