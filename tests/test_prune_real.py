"""fastvote.prune and the CLI on real data through FFCV: haystack (30 source
classes, 10 of them MNIST digits) -> sklearn digits. The right answer is known
(DATA.md): a target-aware pruner keeps the digit classes."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("ffcv")

import fastvote  # noqa: E402
from fastvote import data as fvdata  # noqa: E402
from fastvote import models, train  # noqa: E402

pytestmark = pytest.mark.skipif(bool(fvdata.missing("haystack") or fvdata.missing("digits")),
                                reason=f"offline datasets missing: {fvdata.missing('haystack') or fvdata.missing('digits')}")

SIZE = 16
DIGITS = set(range(10, 20))  # "D:0".."D:9" in the haystack


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A haystack beton with 300 images a class, the digits target, and a tiny
    surrogate trained for a few epochs (as DATA.md measured)."""
    root = tmp_path_factory.mktemp("real")
    source = fvdata.write_offline("haystack", "train", root / "haystack.beton", per_class=300, progress=False)
    target = fvdata.write_offline("digits", "train", root / "digits.beton", progress=False)
    mean, std = fvdata.channel_stats(source)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs: one thread is faster here than two contending
    model = models.build_model("tiny", 30, image_size=SIZE, seed=0)
    config = train.TrainConfig(epochs=6, batch_size=256, lr=0.2, seed=0)
    loader = fvdata.train_loader(source, 256, resolution=SIZE, mean=mean, std=std, seed=0, flip=False,
                                 scale=(1.0, 1.0), ratio=(1.0, 1.0))
    train.train_classifier(model, loader, config, device="cpu", progress=False)
    surrogate = models.save_checkpoint(root / "surrogate.pt", model, resolution=SIZE, mean=list(mean), std=list(std))
    yield {"root": root, "source": source, "target": target, "surrogate": surrogate}
    torch.set_num_threads(threads)


def run(setup, **kw):
    args = dict(surrogate=setup["surrogate"], workdir=setup["root"] / "work", progress=False, keep=10)
    args.update(kw)
    return fastvote.prune(setup["source"], setup["target"], **args)


def test_lm_keeps_the_digits_and_is_deterministic(setup):
    result = run(setup, method="lm")
    assert len(DIGITS & set(result.kept_classes.tolist())) >= 8, result.kept_names
    again = run(setup, method="lm")
    assert torch.equal(result.indices, again.indices) and torch.equal(result.votes, again.votes)
    assert int(result.votes.sum()) == 100  # 10 shots x 10 digits, one vote each
    labels = fvdata.read_columns(setup["source"])["labels"]
    assert torch.equal(result.indices, torch.from_numpy(np.isin(labels, result.kept_classes.numpy()).nonzero()[0]))


def test_fm_keeps_the_digits(setup):
    result = run(setup, method="fm")
    assert len(DIGITS & set(result.kept_classes.tolist())) >= 7, result.kept_names


def test_reverse_keeps_few_digits(setup):
    result = run(setup, method="lm", reverse=True)
    assert len(DIGITS & set(result.kept_classes.tolist())) <= 2, result.kept_names


def test_label_free_fm_runs_on_cached_features(setup):
    result = run(setup, method="fm", centroids="kmeans", num_clusters=30, keep=10)
    assert len(result.kept_classes) == 10 and result.class_names[0] == "cluster 0"
    cache = list((setup["root"] / "work" / "features").glob("*/features.npy"))  # the source's and the target's
    shapes = {np.load(path, mmap_mode="r").shape for path in cache}
    assert (9000, models.build_model("tiny", 30).feature_dim) in shapes, shapes


def test_subset_loader_yields_exactly_the_kept_samples(setup):
    result = run(setup, method="lm")
    loader = result.loader(batch_size=512, train=False, with_identifier=True)
    seen = torch.cat([ids.clone() for _, _, ids in loader])
    assert torch.equal(torch.sort(seen).values, result.indices)


def test_bad_inputs(setup, tmp_path):
    with pytest.raises(FileNotFoundError):
        run(setup, method="lm", surrogate=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="head has 10 outputs but the source has 30"):
        other = models.save_checkpoint(tmp_path / "ten.pt", models.build_model("tiny", 10, image_size=SIZE),
                                       resolution=SIZE, mean=[0.5] * 3, std=[0.5] * 3)
        run(setup, method="lm", surrogate=other)
    fields_missing = tmp_path / "not.beton"
    fields_missing.write_bytes(b"\0" * 4096)
    with pytest.raises(Exception):
        fastvote.prune(fields_missing, setup["target"], keep=2, surrogate=setup["surrogate"], progress=False)
    with pytest.raises(ValueError, match="num_clusters=20000 exceeds"):
        run(setup, method="fm", centroids="kmeans", num_clusters=20000, keep=3)


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "fastvote.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True)


def test_cli_prune_writes_result_plot_and_table(setup, tmp_path):
    out = tmp_path / "lm"
    done = cli("--workdir", setup["root"] / "work", "prune", "--source", setup["source"], "--target",
               setup["target"], "--method", "lm", "--keep", "10", "--surrogate", setup["surrogate"],
               "--out", out, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert {p.name for p in out.iterdir()} == {"indices.npy", "classes.json", "manifest.json", "votes.png"}
    assert "D:" in done.stdout and "from 10 of 30 classes" in done.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["surrogate"]["kind"] == "checkpoint" and manifest["preprocessing"]["resolution"] == SIZE


def test_cli_errors_leave_no_output(setup, tmp_path):
    out = tmp_path / "bad"
    done = cli("prune", "--source", setup["source"], "--target", setup["target"], "--ratio", "1.5",
               "--surrogate", setup["surrogate"], "--out", out, cwd=tmp_path)
    assert done.returncode == 2 and "ratio=1.5" in done.stderr
    assert not out.exists()
    done = cli("prune", "--source", tmp_path / "nope.beton", "--target", setup["target"], "--keep", "3",
               "--out", out, cwd=tmp_path)
    assert done.returncode == 2 and "does not exist" in done.stderr and not out.exists()


def test_cli_data_write(tmp_path):
    done = cli("data", "write", "sklearn-digits:test", tmp_path / "d.beton", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert fvdata.read_classes(tmp_path / "d.beton") == [str(i) for i in range(10)]
    assert len(fvdata.read_columns(tmp_path / "d.beton")["labels"]) == 359
