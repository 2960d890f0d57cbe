"""Issue 21.6: what training a surrogate says (the estimate in seconds below a
minute; faster choices only where they help), what it leaves beside the
user's checkpoint (nothing: the lock and a killed run's resume state live in
the workdir), and caches keyed by the weights' content, so a surrogate
resumed after a kill shares the feature cache of an uninterrupted one."""
from pathlib import Path

import pytest
import torch

from fastvote import data as fvdata
from fastvote import cli, inputs, models
from fastvote import surrogate as surrogates
from fastvote import train as fvtrain
from fastvote.train import TrainConfig

from conftest import Killed, kill_after

pytest.importorskip("ffcv")
pytestmark = [pytest.mark.skipif(bool(fvdata.missing("haystack")), reason="offline datasets missing"),
              pytest.mark.filterwarnings("ignore:FASTVOTE_LOADER=torch")]
SIZE = 8


@pytest.fixture(scope="module")
def source(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("surrogate-cache")
    # 1,050 images: one batch of the CLI's default 1024 an epoch
    beton = fvdata.write_offline("haystack", "train", root / "haystack.beton", per_class=35, progress=False)
    return inputs.resolve(beton, "source", root / "w", False)


@pytest.fixture(autouse=True)
def _quick_loader(monkeypatch):
    # the torch loader starts in a second where FFCV compiles for twenty; its order is seeded per epoch too
    monkeypatch.setenv("FASTVOTE_LOADER", "torch")


def quick(epochs=2):
    return TrainConfig(epochs=epochs, batch_size=32, lr=0.1, seed=0)


class Stop(Exception):
    """Raised where the loader would be built: the announcement is out by then."""


def stop(*args, **kwargs):
    raise Stop


def announcement(monkeypatch, capsys, source, tmp_path, seconds, **resolve_args) -> str:
    """What prune(surrogate=None) prints before training, with the timed step's
    estimate replaced by `seconds` and nothing trained."""
    monkeypatch.setattr(surrogates, "_estimate_seconds", lambda *a, **k: seconds)
    monkeypatch.setattr(fvdata, "train_loader", stop)
    sur = surrogates.resolve(None, source, image_size=SIZE, workdir=tmp_path, **resolve_args)
    with pytest.raises(Stop):
        sur.model("cpu", progress=False)
    return capsys.readouterr().out


def test_a_short_training_is_announced_in_seconds_and_a_long_one_in_minutes():
    assert [surrogates._duration(s) for s in (0.2, 25, 59.4, 61, 90, 25 * 60)] == \
        ["1 s", "25 s", "59 s", "1 min", "2 min", "25 min"]


def test_the_default_resnet18_is_announced_with_what_is_trained_and_the_faster_choices(monkeypatch, capsys, source,
                                                                                      tmp_path):
    text = announcement(monkeypatch, capsys, source, tmp_path, 25 * 60)
    assert "training one first: resnet18 (" in text and "the paper's recipe) for 16 epochs, batch 1024" in text
    assert f"on {source.num_rows:,} source images at {SIZE} px" in text and "about 25 min on cpu" in text
    assert "arch='tiny'" in text and "fewer epochs" in text and "surrogate=<checkpoint>" in text
    # the same recipe done in 25 s: said in seconds, and no advice to go faster
    text = announcement(monkeypatch, capsys, source, tmp_path, 25)
    assert "about 25 s on cpu" in text and "0 min" not in text and "Faster" not in text


def test_a_slow_tiny_surrogate_is_not_told_to_be_tiny(monkeypatch, capsys, source, tmp_path):
    text = announcement(monkeypatch, capsys, source, tmp_path, 5 * 60, arch="tiny", train_config=quick(epochs=1))
    assert "tiny (" in text and "about 5 min" in text and "the paper's recipe" not in text
    assert "arch='tiny'" not in text and "fewer epochs" not in text and "surrogate=<checkpoint>" in text


def test_surrogate_train_does_not_offer_a_checkpoint_instead(monkeypatch, capsys, source, tmp_path):
    monkeypatch.setattr(surrogates, "_estimate_seconds", lambda *a, **k: 300.0)
    monkeypatch.setattr(fvdata, "train_loader", stop)
    monkeypatch.setenv("FASTVOTE_CACHE", str(tmp_path / "cache"))
    recipe = surrogates.resolve(None, source, arch="tiny", train_config=quick(), image_size=SIZE,
                                workdir=tmp_path / "w").recipe
    with pytest.raises(Stop):  # as `fastvote surrogate train --arch tiny --epochs 2 --out s.pt` calls it
        surrogates.train(recipe, source, tmp_path / "s.pt", device="cpu", progress=False)
    text = capsys.readouterr().out
    assert "training the surrogate: tiny" in text and "first" not in text
    assert "fewer epochs" in text and "arch='tiny'" not in text and "surrogate=<checkpoint>" not in text


def test_a_resumed_surrogate_shares_the_cache_of_an_uninterrupted_one_and_leaves_nothing_beside_it(
        monkeypatch, source, tmp_path):
    monkeypatch.setenv("FASTVOTE_CACHE", str(tmp_path / "cache"))
    out, work = tmp_path / "out", inputs.workdir_path(None)
    out.mkdir()

    def surrogate_train(name):
        return cli.main(["--device", "cpu", "surrogate", "train", "--source", str(source.beton), "--arch", "tiny",
                         "--epochs", "2", "--image-size", str(SIZE), "--out", str(out / name)])

    assert surrogate_train("whole.pt") == 0
    real = fvtrain.train_classifier
    monkeypatch.setattr(fvtrain, "train_classifier", lambda *a, **k: real(*a, on_epoch_end=kill_after(0), **k))
    with pytest.raises(Killed):  # once its first epoch's resume state is written
        surrogate_train("resumed.pt")
    left_by_the_kill = sorted(p.name for p in out.iterdir())
    monkeypatch.setattr(fvtrain, "train_classifier", real)
    assert surrogate_train("resumed.pt") == 0

    whole, resumed = (models.load_model(out / name).state_dict() for name in ("whole.pt", "resumed.pt"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    # equal tensors, so one feature cache: as a checkpoint ...
    a, b = (surrogates.resolve(out / name, source, arch="tiny", workdir=work) for name in ("whole.pt", "resumed.pt"))
    assert a.fingerprint == b.fingerprint and a.outputs_key("float32") == b.outputs_key("float32")
    # ... and as the trained surrogate the file holds
    a, b = (surrogates.Surrogate(kind="trained", fingerprint="recipe:x", prep=a.prep, num_classes=30,
                                 entry={"path": str(out / name)}) for name in ("whole.pt", "resumed.pt"))
    assert a.outputs_key("float32") == b.outputs_key("float32")

    # the user's folder holds the checkpoints and their json: the lock and the resume state are in the cache
    assert left_by_the_kill == ["whole.pt", "whole.pt.json"]
    assert sorted(p.name for p in out.iterdir()) == ["resumed.pt", "resumed.pt.json", "whole.pt", "whole.pt.json"]
    assert sorted(p.name.split("-")[0] for p in (work / "locks").iterdir()) == ["resumed.pt", "whole.pt"]
    assert not list((work / "resume").iterdir())  # a finished run's resume state is gone


def test_a_checkpoint_is_hashed_once_a_process_until_it_changes(monkeypatch, source, tmp_path):
    model = models.build_model("tiny", 30, image_size=SIZE, seed=0)
    path = models.save_checkpoint(tmp_path / "s.pt", model, resolution=SIZE, mean=[0.5] * 3, std=[0.25] * 3)
    hashed = []
    real = surrogates.fingerprint_tensors
    monkeypatch.setattr(surrogates, "fingerprint_tensors", lambda t: hashed.append(1) or real(t))
    first, again = (surrogates.resolve(path, source, workdir=tmp_path).fingerprint for _ in range(2))
    assert first == again == real(dict(model.state_dict())) and len(hashed) == 1
    with torch.no_grad():
        model.head.bias.add_(1)
    models.save_checkpoint(path, model, resolution=SIZE, mean=[0.5] * 3, std=[0.25] * 3)
    assert surrogates.resolve(path, source, workdir=tmp_path).fingerprint != first and len(hashed) == 2
