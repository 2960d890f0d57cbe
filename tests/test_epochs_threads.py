"""What a loader fastvote hands out does with an epoch and with the caller's thread
settings (issue 21, items 2 and 4): every kept sample each epoch unless drop_last=True,
never an empty epoch, a source smaller than the surrogate recipe's batch trains (with a
warning naming both numbers), and torch's (and numba's) thread counts are left as the
caller set them, on both loader back ends."""
import dataclasses
import sys
import threading

import numpy as np
import pytest
import torch

import fastvote
from fastvote import data as fvdata, models, train

BACKENDS = ["ffcv", "torch"]
PER_CLASS, CLASSES, SIDE = 500, 10, 8


@pytest.fixture(params=BACKENDS)
def backend(monkeypatch, request):
    """FASTVOTE_LOADER set to the parameter ("ffcv" skips without FFCV)."""
    if request.param == "ffcv":
        pytest.importorskip("ffcv", reason="FFCV is not installed")
    monkeypatch.setenv("FASTVOTE_LOADER", request.param)
    monkeypatch.setattr("fastvote.data.loaders._warned", True)  # the torch path's warning has its own test
    return request.param


def random_beton(path, count: int, classes: int):
    rng = np.random.default_rng(count)
    labels = np.repeat(np.arange(classes), count // classes)
    images = rng.integers(0, 256, (len(labels), SIDE, SIDE, 3), dtype=np.uint8)
    dataset = fvdata.ArrayDataset(images, labels, [f"c{j}" for j in range(classes)], "random")
    return str(fvdata.write_beton(dataset, path, progress=False, num_workers=1))


@pytest.fixture(scope="module")
def betons(tmp_path_factory):
    """5,000 random 8 px images in 10 classes of 500 (the issue's numbers), a 50-image
    target, a 60-image source, and an untrained tiny surrogate checkpoint."""
    root = tmp_path_factory.mktemp("epochs")
    source = random_beton(root / "source.beton", PER_CLASS * CLASSES, CLASSES)
    surrogate = models.save_checkpoint(root / "tiny.pt", models.build_model("tiny", CLASSES, image_size=SIDE, seed=0),
                                       resolution=SIDE, mean=[0.5] * 3, std=[0.25] * 3)
    return {"root": root, "source": source, "target": random_beton(root / "target.beton", 50, 5),
            "small": random_beton(root / "small.beton", 60, 3), "surrogate": str(surrogate)}


def samples_of(loader) -> int:
    return sum(len(labels) for _, labels, *_ in loader)


def counts() -> tuple:
    """This thread's torch and numba counts, and torch's in a thread started now."""
    started = []
    thread = threading.Thread(target=lambda: started.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    numba = sys.modules.get("numba")
    return torch.get_num_threads(), numba.get_num_threads() if numba else 1, started[0]


@pytest.fixture
def one_thread_each():
    """torch and numba at one thread (what the README recommends on a shared 2-core
    machine), the caller's counts put back afterwards."""
    numba = sys.modules.get("numba")
    before = torch.get_num_threads(), numba.get_num_threads() if numba else None
    torch.set_num_threads(1)
    if numba:
        numba.set_num_threads(1)
    interop = torch.get_num_interop_threads()
    yield
    assert torch.get_num_interop_threads() == interop
    torch.set_num_threads(before[0])
    if numba:
        numba.set_num_threads(before[1])


def test_epochs_hold_every_kept_sample_and_threads_stay(betons, backend, one_thread_each, tmp_path):
    # prune itself leaves the thread counts alone (ffcv's Loader set them to 2 when built)
    result = fastvote.prune(betons["source"], betons["target"], method="lm", keep=1, surrogate=betons["surrogate"],
                            workdir=tmp_path / "work", progress=False)
    assert len(result.indices) == PER_CLASS
    assert counts() == (1, 1, 1)

    # keep=1: 500 samples with batch 512 is one partial batch, not an empty epoch
    loader = result.loader(batch_size=512)
    assert counts() == (1, 1, 1) and len(loader) == 1
    seen = 0
    for _, labels in loader:
        seen += len(labels)
        assert counts() == (1, 1, 1)  # inside the epoch too, and for threads started now
    assert seen == PER_CLASS and counts() == (1, 1, 1)
    assert samples_of(loader) == PER_CLASS  # and again the next epoch

    # 5,000 kept samples with batch 512: 5,000 (10 batches, the last of 392), not 4,608
    everything = dataclasses.replace(result, indices=torch.arange(PER_CLASS * CLASSES))
    loader = everything.loader(batch_size=512)
    assert len(loader) == 10 and samples_of(loader) == PER_CLASS * CLASSES
    assert counts() == (1, 1, 1)

    # drop_last=True is what the user asks for: the last partial batch goes
    assert samples_of(everything.loader(batch_size=512, drop_last=True)) == 9 * 512
    assert counts() == (1, 1, 1)


def test_public_loaders_default_to_every_sample(betons, backend):
    kept = np.arange(PER_CLASS)
    stats = dict(resolution=SIDE, mean=[0.5] * 3, std=[0.25] * 3)
    assert samples_of(fvdata.train_loader(betons["source"], 512, indices=kept, **stats)) == PER_CLASS
    assert samples_of(fvdata.eval_loader(betons["source"], 512, indices=kept, **stats)) == PER_CLASS
    # drop_last=True that leaves no batch: one clear error naming both numbers, before any compile
    for make in (fvdata.train_loader, fvdata.eval_loader):
        with pytest.raises(ValueError, match=r"batch_size=512 with drop_last=True makes no batch of the 500 "
                                             r"samples.*batch_size <= 500, or drop_last=False"):
            make(betons["source"], 512, indices=kept, drop_last=True, **stats)
    with pytest.raises(ValueError, match=r"batch_size=0: expected an int >= 1"):
        fvdata.train_loader(betons["source"], 0, **stats)


def test_a_source_smaller_than_the_recipes_batch_trains_with_a_warning(betons, one_thread_each, tmp_path):
    # 60 images and the default recipe's batch of 1024: the batch is clamped to the 60, said so
    config = train.TrainConfig(epochs=1)
    assert config.batch_size == 1024
    with pytest.warns(UserWarning, match=r"train_loader: 60 samples an epoch, fewer than the recipe's "
                                         r"batch_size=1024: each epoch is one batch of 60"):
        result = fastvote.prune(betons["small"], betons["target"], method="lm", keep=1, surrogate=None,
                                arch="tiny", train_config=config, image_size=SIDE, workdir=tmp_path / "work",
                                progress=False)
    assert len(result.indices) == 20
    assert counts() == (1, 1, 1)


def test_an_empty_epoch_names_the_batch_and_the_samples():
    images, labels = torch.zeros(60, 3, 4, 4), torch.zeros(60, dtype=torch.int64)
    loader = torch.utils.data.DataLoader(list(zip(images, labels)), batch_size=1024, drop_last=True)
    with pytest.raises(ValueError, match=r"train_loader: makes no batch of its 60 samples \(len 0\) with "
                                         r"batch_size=1024 and drop_last=True.*TrainConfig\(batch_size=\.\.\.\)"):
        train.train_classifier(models.build_model("tiny", 2, image_size=4), loader,
                               train.TrainConfig(epochs=1), device="cpu", progress=False)
