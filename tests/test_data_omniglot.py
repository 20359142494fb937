"""Omniglot: three loaders, one in-memory form; MAML resize; splits; clients; bad input.

The real archive tests need ``FMLJAX_OMNIGLOT`` (CI sets it when shared/data/omniglot.npz is
there); everything else runs on a tiny Omniglot built in ``tmp_path`` with Pillow.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from fmljax.data import omniglot as og
from fmljax.data.episodes import episode_task_sampler

REAL = os.environ.get(og.ENV_VAR)
needs_real = pytest.mark.skipif(
    not REAL, reason=f"{og.ENV_VAR} is not set: the real Omniglot archive is not available"
)

# (alphabet, background?, characters); global ids are assigned background first, as in Omniglot
TINY = [("Alpha", True, 2), ("Beta", True, 3), ("Gamma", False, 2)]
DRAWERS = 4


def tiny_records() -> list[dict]:
    """One dict per drawing: alphabet, ids, split and a random 105x105 ink image."""
    rng = np.random.default_rng(0)
    names = sorted(a for a, _, _ in TINY)
    out, char = [], 0
    for alpha, background, n_chars in sorted(TINY, key=lambda t: not t[1]):
        for j in range(n_chars):
            for d in range(DRAWERS):
                ink = rng.random((og.SOURCE_SIZE, og.SOURCE_SIZE)) < 0.3
                out.append(
                    {
                        "alphabet": alpha,
                        "alphabet_id": names.index(alpha),
                        "character": char,
                        "char_in_alphabet": j,
                        "drawer": d,
                        "background": background,
                        "ink": ink,
                    }
                )
            char += 1
    return out


def write_release(root: Path, records: list[dict], zipped: bool = False) -> Path:
    for r in records:
        part = "background" if r["background"] else "evaluation"
        folder = (
            root / f"images_{part}" / r["alphabet"] / f"character{r['char_in_alphabet'] + 1:02d}"
        )
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{r['character'] + 1:04d}_{r['drawer'] + 1:02d}.png"
        Image.fromarray(~r["ink"]).save(folder / name)  # mode '1', True = white paper
    if zipped:
        for part in ("background", "evaluation"):
            folder = root / f"images_{part}"
            with zipfile.ZipFile(root / f"images_{part}.zip", "w") as zf:
                for f in sorted(folder.rglob("*")):
                    zf.write(f, f.relative_to(root).as_posix())
            for f in sorted(folder.rglob("*"), reverse=True):
                f.unlink() if f.is_file() else f.rmdir()
            folder.rmdir()
    return root


def write_npz(path: Path, records: list[dict]) -> Path:
    recs = sorted(records, key=lambda r: (r["character"], r["drawer"]))
    np.savez_compressed(
        path,
        images=np.packbits(np.stack([r["ink"] for r in recs]).astype(np.uint8), axis=-1),
        alphabet=np.array([r["alphabet_id"] for r in recs], np.int8),
        character=np.array([r["character"] for r in recs], np.int16),
        character_in_alphabet=np.array([r["char_in_alphabet"] for r in recs], np.int8),
        drawer=np.array([r["drawer"] for r in recs], np.int8),
        split=np.array(["background" if r["background"] else "evaluation" for r in recs]),
        alphabet_names=np.array(sorted(a for a, _, _ in TINY)),
    )
    return path


def tfds_source_fn(records: list[dict]):
    """An ``as_data_source_fn`` for ``tfds.testing.mock_data``: TFDS-format examples."""

    def as_data_source(self, split, decoders=None, deserialize_method=None, **kwargs):
        rows = [r for r in records if r["background"] == (split == "train")]
        random.Random(split).shuffle(rows)  # a data source's order is its own
        return [
            {
                "image": np.repeat(np.where(r["ink"], 0, 255).astype(np.uint8)[..., None], 3, -1),
                "label": np.int64(r["character"]),
                "alphabet": np.int64(r["alphabet_id"]),
                "alphabet_char_id": np.int64(r["char_in_alphabet"]),
            }
            for r in rows
        ]

    return as_data_source


def check_structure(data: og.OmniglotData, classes: int, drawings: int, size: int = 28) -> None:
    """What every loader must give: [classes, drawings, S, S] binary ink, consistent ids."""
    assert data.images.shape == (classes, drawings, size, size)
    assert data.images.dtype == np.uint8 and set(np.unique(data.images)) <= {0, 1}
    assert np.all(np.diff(data.character) > 0)  # sorted, one row per character
    pairs = set(zip(data.alphabet.tolist(), data.character_in_alphabet.tolist(), strict=True))
    assert len(pairs) == classes
    # an alphabet is wholly background or wholly evaluation
    for a in np.unique(data.alphabet):
        assert len(set(data.background[data.alphabet == a].tolist())) == 1
    assert np.all(data.rotation == 0)


def expected_images(records: list[dict], size: int = 28) -> np.ndarray:
    recs = sorted(records, key=lambda r: (r["character"], r["drawer"]))
    ink = np.stack([og.resize_nearest(r["ink"], size) for r in recs]).astype(np.uint8)
    return ink.reshape((-1, DRAWERS, size, size))


def assert_same(a: og.OmniglotData, b: og.OmniglotData, names: bool = True) -> None:
    for field in ("images", "character", "alphabet", "character_in_alphabet", "background"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    if names:
        assert a.alphabet_names == b.alphabet_names


# ------------------------------------------------------------------------------ resizing


def test_nearest_resize_equals_pillow_mode1_lanczos():
    """MAML resizes mode-'1' PNGs with resize((28, 28), LANCZOS): Pillow uses NEAREST."""
    rng = np.random.default_rng(1)
    for size in (28, 14, 84):
        for _ in range(10):
            ink = rng.random((105, 105)) < 0.5
            ref = 1 - np.asarray(
                Image.fromarray(~ink).resize((size, size), resample=Image.LANCZOS), np.uint8
            )
            np.testing.assert_array_equal(og.resize_nearest(ink, size), ref)
    np.testing.assert_array_equal(og.nearest_indices(28)[:4], [1, 5, 9, 13])


def test_packed_resize_equals_unpacked_resize():
    rng = np.random.default_rng(2)
    ink = (rng.random((6, 105, 105)) < 0.5).astype(np.uint8)
    packed = np.packbits(ink, axis=-1)
    np.testing.assert_array_equal(og._resize_packed(packed, 28), og.resize_nearest(ink, 28))


# ------------------------------------------------------------------------------ loaders


def test_release_layout_folders_and_zips_and_npz_agree(tmp_path):
    records = tiny_records()
    folders = og.load_omniglot(write_release(tmp_path / "f", records))
    check_structure(folders, classes=7, drawings=DRAWERS)
    np.testing.assert_array_equal(folders.images, expected_images(records))
    np.testing.assert_array_equal(folders.character, np.arange(7))
    assert folders.alphabet_names == ("Alpha", "Beta", "Gamma")
    np.testing.assert_array_equal(folders.alphabet, [0, 0, 1, 1, 1, 2, 2])
    np.testing.assert_array_equal(folders.character_in_alphabet, [0, 1, 0, 1, 2, 0, 1])
    np.testing.assert_array_equal(folders.background, [True] * 5 + [False] * 2)
    zips = og.load_omniglot(write_release(tmp_path / "z", records, zipped=True))
    assert_same(folders, zips)
    background = og.load_omniglot(tmp_path / "z" / "images_background.zip")
    assert_same(folders.subset(folders.background), background, names=False)
    npz = og.load_omniglot(write_npz(tmp_path / "tiny.npz", records))
    assert_same(folders, npz)
    full = og.load_omniglot_npz(tmp_path / "tiny.npz", image_size=105)
    assert full.images.shape == (7, DRAWERS, 105, 105)


def test_env_var_gives_the_path(tmp_path, monkeypatch):
    path = write_npz(tmp_path / "tiny.npz", tiny_records())
    monkeypatch.setenv(og.ENV_VAR, str(path))
    assert og.load_omniglot().num_classes == 7


def test_tfds_mock_same_in_memory_form(tmp_path):
    import tensorflow_datasets as tfds

    records = tiny_records()
    reference = og.load_omniglot(write_npz(tmp_path / "tiny.npz", records))
    with tfds.testing.mock_data(as_data_source_fn=tfds_source_fn(records)):
        data = og.load_omniglot("tfds")
    check_structure(data, classes=7, drawings=DRAWERS)
    # TFDS gives no drawer number: drawings come in the data source's order, so compare sets
    assert_same(
        og.OmniglotData(**{**vars(reference), "images": np.sort(reference.images, axis=1)}),
        og.OmniglotData(**{**vars(data), "images": np.sort(data.images, axis=1)}),
        names=False,
    )
    splits = og.split_omniglot(data, "background-evaluation")
    assert (splits["train"].num_classes, splits["test"].num_classes) == (5, 2)


def test_tfds_default_mock_without_tensorflow():
    """TFDS's own random mock, in a process where ``import tensorflow`` fails; the module
    itself does not import tensorflow_datasets until the tfds path is used."""
    code = (
        "import sys, importlib.machinery as m\n"
        "find = m.PathFinder.find_spec  # hide tensorflow as if it were not installed\n"
        "def hidden(name, path=None, target=None):\n"
        "    if name == 'tensorflow' or name.startswith('tensorflow.'):\n"
        "        return None\n"
        "    return find(name, path, target)\n"
        "m.PathFinder.find_spec = staticmethod(hidden)\n"
        "import importlib.util; assert importlib.util.find_spec('tensorflow') is None\n"
        "import fmljax.data.omniglot as og\n"
        "assert 'tensorflow_datasets' not in sys.modules, 'tfds imported eagerly'\n"
        "import numpy as np, tensorflow_datasets as tfds\n"
        "with tfds.testing.mock_data(num_examples=5):\n"
        "    src = tfds.data_source('omniglot', split='train')\n"
        "    ex = [src[i] for i in range(5)]\n"
        "    d = og.load_omniglot_tfds(splits=('train',))\n"
        "labels = sorted(int(e['label']) for e in ex)\n"
        "assert d.character.tolist() == labels, (d.character, labels)\n"
        "assert d.images.shape == (5, 1, 28, 28), d.images.shape\n"
        "first = min(range(5), key=lambda i: int(ex[i]['label']))\n"
        "ink = og.resize_nearest(np.asarray(ex[first]['image'])[..., 0] < 128, 28)\n"
        "assert (d.images[0, 0] == ink).all()\n"
        "assert 'tensorflow' not in sys.modules\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != og.ENV_VAR}
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


# ------------------------------------------------------------------------------ splits


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> og.OmniglotData:
    return og.load_omniglot(write_release(tmp_path_factory.mktemp("tiny"), tiny_records()))


def test_splits_disjoint_and_maml_order(tiny):
    be = og.split_omniglot(tiny, "background-evaluation")
    assert set(be) == {"train", "test"}
    assert be["train"].background.all() and not be["test"].background.any()
    maml = og.split_omniglot(tiny, "maml", sizes=(3, 2))
    assert [maml[k].num_classes for k in ("train", "val", "test")] == [3, 2, 2]
    chars = [set(maml[k].character.tolist()) for k in ("train", "val", "test")]
    assert not (chars[0] & chars[1] or chars[0] & chars[2] or chars[1] & chars[2])
    assert set().union(*chars) == set(range(7))
    # MAML: folders listed (alphabet, character), random.seed(1); random.shuffle(listing)
    listing = [
        (a, c) for a, c in zip(tiny.alphabet.tolist(), tiny.character_in_alphabet, strict=True)
    ]
    listing = sorted(listing)
    random.seed(1)
    random.shuffle(listing)
    got = list(
        zip(maml["train"].alphabet.tolist(), maml["train"].character_in_alphabet, strict=True)
    )
    assert got == listing[:3]


def test_vinyals_expansion_only_train(tiny):
    splits = og.split_omniglot(tiny, "background-evaluation")
    aug = og.augment_splits(splits, "reptile")
    tr = aug["train"]
    assert tr.num_classes == 4 * 5 and aug["test"] is splits["test"]
    np.testing.assert_array_equal(tr.rotation, np.repeat(np.arange(4), 5))
    np.testing.assert_array_equal(tr.images[5 + 2], np.rot90(tr.images[2], 1, axes=(1, 2)))
    assert og.augment_splits(splits, "maml")["train"] is splits["train"]


def test_clients_by_alphabet_and_random(tiny):
    fed = og.omniglot_clients(tiny, by="alphabet", seed=0)
    assert fed["images"].shape == (3, 3, 3, 28, 28)  # 3 alphabets, <= 3 classes, 3 of 4
    assert fed["test_images"].shape == (3, 3, 1, 28, 28)
    np.testing.assert_array_equal(fed["num_classes"], [2, 3, 2])
    np.testing.assert_array_equal(fed["num_examples"], [6.0, 9.0, 6.0])
    np.testing.assert_array_equal(fed["alphabet"], [0, 1, 2])
    chars = np.asarray(fed["character"])
    real = chars[chars >= 0]
    assert sorted(real.tolist()) == list(range(7))  # disjoint, covering
    # held-out drawings are exactly the drawings missing from train, class by class
    for c in range(3):
        for k in range(int(fed["num_classes"][c])):
            g = int(chars[c, k])
            train = {np.asarray(fed["images"][c, k, e]).tobytes() for e in range(3)}
            test = np.asarray(fed["test_images"][c, k, 0]).tobytes()
            every = {tiny.images[g, e].tobytes() for e in range(DRAWERS)}
            assert test not in train and train | {test} == every
        assert np.all(np.asarray(fed["images"][c, int(fed["num_classes"][c]) :]) == 0)
    rnd = og.omniglot_clients(tiny, by="random", num_clients=3, seed=1)
    assert sorted(np.asarray(rnd["num_classes"]).tolist()) == [2, 2, 3]
    rc = np.asarray(rnd["character"])
    assert sorted(rc[rc >= 0].tolist()) == list(range(7))


def test_client_episodes_held_out_query(tiny):
    fed = og.omniglot_clients(tiny, by="alphabet")
    sampler = episode_task_sampler(ways=2, shots=2, queries=1, query_key="test_images", data=fed)
    client = jax.tree.map(lambda a: a[1], fed)
    sup, qry = jax.jit(sampler)(jax.random.key(0), client)
    held = {np.asarray(fed["test_images"][1, k, 0]).tobytes() for k in range(3)}
    train = {np.asarray(fed["images"][1, k, e]).tobytes() for k in range(3) for e in range(3)}
    for x in np.asarray(qry["x"][..., 0]).astype(np.uint8):
        assert x.tobytes() in held
    for x in np.asarray(sup["x"][..., 0]).astype(np.uint8):
        assert x.tobytes() in train


# ------------------------------------------------------------------------------ real archive


@pytest.fixture(scope="module")
def real() -> og.OmniglotData:
    start = time.perf_counter()
    data = og.load_omniglot()  # from $FMLJAX_OMNIGLOT
    elapsed = time.perf_counter() - start
    assert elapsed < 15.0, f"loading the archive took {elapsed:.1f}s"
    return data


@needs_real
def test_real_counts_and_splits(real):
    check_structure(real, classes=1623, drawings=20)
    assert len(real.alphabet_names) == 50
    assert len(np.unique(real.alphabet[real.background])) == 30
    be = og.split_omniglot(real, "background-evaluation")
    assert (be["train"].num_classes, be["test"].num_classes) == (964, 659)
    maml = og.split_omniglot(real, "maml")
    assert [maml[k].num_classes for k in ("train", "val", "test")] == [1100, 100, 423]
    for split in (be, maml):
        sets = [set(v.character.tolist()) for v in split.values()]
        assert sum(len(s) for s in sets) == 1623 and len(set().union(*sets)) == 1623
    fed = og.omniglot_clients(real, by="alphabet")
    counts = np.asarray(fed["num_classes"])
    assert len(counts) == 50 and counts.sum() == 1623 and counts.max() == 55
    assert fed["images"].shape[2:] == (15, 28, 28) and fed["test_images"].shape[2] == 5


@needs_real
def test_real_resize_equals_pillow_on_a_sample(real):
    with np.load(REAL) as archive:
        idx = np.random.default_rng(0).choice(32460, 64, replace=False)
        ink = np.unpackbits(archive["images"][np.sort(idx)], axis=-1, count=105)
        chars, drawers = archive["character"][np.sort(idx)], archive["drawer"][np.sort(idx)]
    for i, c, d in zip(range(len(ink)), chars, drawers, strict=True):
        ref = 1 - np.asarray(
            Image.fromarray((1 - ink[i]).astype(bool)).resize((28, 28), Image.LANCZOS), np.uint8
        )
        row = int(np.searchsorted(real.character, c))
        np.testing.assert_array_equal(real.images[row, d], ref)


@needs_real
def test_real_archive_equals_release_layout_of_the_same_images(real, tmp_path):
    """Write two real alphabets as PNGs in the release layout; the folder loader agrees."""
    with np.load(REAL) as archive:
        names = archive["alphabet_names"]
        keep = np.isin(archive["alphabet"], [0, 45])
        stems = archive["file_stem"][keep]
        meta = {k: archive[k][keep] for k in ("alphabet", "character_in_alphabet", "split")}
        ink = np.unpackbits(archive["images"][keep], axis=-1, count=105).astype(bool)
    for i, stem in enumerate(stems):
        part = str(meta["split"][i])
        char_dir = f"character{int(meta['character_in_alphabet'][i]) + 1:02d}"
        folder = tmp_path / f"images_{part}" / str(names[meta["alphabet"][i]]) / char_dir
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(~ink[i]).save(folder / f"{stem}.png")
    folders = og.load_omniglot(tmp_path)
    sub = real.subset(np.isin(real.alphabet, [0, 45]))
    # the folder loader numbers the alphabets it finds (here 2); compare by name
    assert folders.alphabet_names == (str(names[0]), str(names[45]))
    np.testing.assert_array_equal(
        np.asarray(folders.alphabet_names)[folders.alphabet],
        np.asarray(real.alphabet_names)[sub.alphabet],
    )
    sub = og.OmniglotData(**{**vars(sub), "alphabet": folders.alphabet})
    assert_same(folders, sub, names=False)


# ------------------------------------------------------------------------------ bad input


def test_error_missing_file(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"Omniglot archive not found: '.*nope\.npz'"):
        og.load_omniglot(tmp_path / "nope.npz")
    monkeypatch.delenv(og.ENV_VAR, raising=False)
    with pytest.raises(FileNotFoundError, match=r"no Omniglot source.*FMLJAX_OMNIGLOT"):
        og.load_omniglot()
    with pytest.raises(FileNotFoundError, match=r"no Omniglot images under .*images_background"):
        og.load_omniglot(tmp_path)


def test_error_corrupt_files(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"this is not a zip archive at all")
    with pytest.raises(ValueError, match=r"Omniglot archive '.*bad\.npz' is corrupt"):
        og.load_omniglot(bad)
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match=r"missing arrays \['images', 'alphabet'"):
        og.load_omniglot(tmp_path / "other.npz")
    root = tmp_path / "release"
    (root / "images_background" / "A" / "character01").mkdir(parents=True)
    (root / "images_background" / "A" / "character01" / "0001_01.png").write_bytes(b"\x89PNG..")
    with pytest.raises(ValueError, match=r"Omniglot image .*0001_01\.png is corrupt"):
        og.load_omniglot(root)
    zroot = tmp_path / "zips"
    zroot.mkdir()
    (zroot / "images_evaluation.zip").write_bytes(b"PK not really")
    with pytest.raises(ValueError, match=r"Omniglot zip '.*images_evaluation\.zip' is corrupt"):
        og.load_omniglot(zroot)


def test_error_wrong_image_shape(tmp_path):
    folder = tmp_path / "images_background" / "A" / "character01"
    folder.mkdir(parents=True)
    Image.fromarray(np.ones((28, 28), bool)).save(folder / "0001_01.png")
    with pytest.raises(ValueError, match=r"has size 28x28; expected 105x105"):
        og.load_omniglot(tmp_path)
    records = tiny_records()
    path = write_npz(tmp_path / "t.npz", records)
    with np.load(path) as a:
        arrays = dict(a)
    arrays["images"] = np.unpackbits(arrays["images"], axis=-1, count=105)  # not packed
    np.savez(tmp_path / "unpacked.npz", **arrays)
    with pytest.raises(ValueError, match=r"'images' must be uint8 bit-packed rows of shape"):
        og.load_omniglot(tmp_path / "unpacked.npz")


def test_error_unequal_drawings(tmp_path):
    records = [r for r in tiny_records() if not (r["character"] == 3 and r["drawer"] == 0)]
    with pytest.raises(ValueError, match=r"character 0 has 4 but character 3 has 3"):
        og.load_omniglot(write_npz(tmp_path / "t.npz", records))


def test_error_unknown_split_augmentation_partition(tiny):
    with pytest.raises(ValueError, match=r"split='vinyals' is not known; allowed: 'maml', 'back"):
        og.split_omniglot(tiny, "vinyals")
    with pytest.raises(ValueError, match=r"augmentation='rotate' is not known; allowed: 'none'"):
        og.augment_splits({"train": tiny}, "rotate")
    with pytest.raises(ValueError, match=r"by='drawer' is not a known Omniglot partition"):
        og.omniglot_clients(tiny, by="drawer")
    with pytest.raises(ValueError, match=r"tfds split='validation' is not an Omniglot split"):
        og.load_omniglot_tfds(splits=("validation",))


def test_error_maml_split_too_small(tiny):
    with pytest.raises(ValueError, match=r"split='maml' .* needs at least 1201 characters; this"):
        og.split_omniglot(tiny, "maml")


def test_error_more_ways_or_shots_than_split_or_client_has(tiny):
    test = og.split_omniglot(tiny, "background-evaluation")["test"]
    with pytest.raises(ValueError, match=r"ways=5 is more than the 2 classes"):
        episode_task_sampler(ways=5, shots=1, queries=1, data={"images": test.images})
    fed = og.omniglot_clients(tiny, by="alphabet")
    with pytest.raises(ValueError, match=r"ways=3 is more than the 2 classes of client 0"):
        episode_task_sampler(ways=3, shots=1, queries=1, data=fed)
    with pytest.raises(ValueError, match=r"queries=2 is more than the 1 held-out examples"):
        episode_task_sampler(ways=2, shots=1, queries=2, query_key="test_images", data=fed)
    with pytest.raises(ValueError, match=r"shots=3 \+ queries=1 = 4 is more than the 3 exam"):
        episode_task_sampler(ways=2, shots=3, queries=1, data=fed)
