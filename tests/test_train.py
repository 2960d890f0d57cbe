"""Training loops (fastvote.train) on real data: sklearn's digits (1,797 8x8 images,
10 classes) upsampled to 16 px, with the ~25k-parameter tiny CNN."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.data import DataLoader, TensorDataset

from fastvote import data as fvdata, scores, ssl, train as fvtrain
from fastvote.models import build_model, load_model
from fastvote.train import (MODEL_FILE, STATE_FILE, TrainConfig, evaluate, finetune, training_setup,
                            train_classifier)

from conftest import Killed, kill_after

SIDE = 16


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    """Shuffled digits as float [N, 3, 16, 16] (standardised) and int64 [N] labels,
    split 900 train / 300 val / 597 test."""
    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.target))
    images = torch.tensor(data.images[order], dtype=torch.float32).unsqueeze(1) / 16
    images = F.interpolate(images, size=SIDE, mode="bilinear", align_corners=False)
    images = ((images - images.mean()) / images.std()).repeat(1, 3, 1, 1)
    labels = torch.tensor(data.target[order], dtype=torch.int64)
    cuts = {"train": slice(0, 900), "val": slice(900, 1200), "test": slice(1200, None)}
    return {name: TensorDataset(images[cut], labels[cut]) for name, cut in cuts.items()}


def loader(dataset, batch_size=64, shuffle=False, limit=None):
    if limit is not None:
        dataset = TensorDataset(*(t[:limit] for t in dataset.tensors))
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Spy:
    """A loader that logs its name each time an epoch over it starts."""

    def __init__(self, inner, name, log):
        self.inner, self.name, self.log = inner, name, log

    def __len__(self):
        return len(self.inner)

    def __iter__(self):
        self.log.append(self.name)
        return iter(self.inner)


@pytest.fixture(scope="module")
def pretrained(digits):
    """The tiny CNN after 3 epochs on the digits' train split (and its history)."""
    model = build_model("tiny", 10, image_size=SIDE, seed=0)
    config = TrainConfig(epochs=3, batch_size=64, lr=0.4, seed=0)
    history = train_classifier(model, loader(digits["train"], shuffle=True), config,
                               device="cpu", progress=False,
                               val_loader=loader(digits["val"], 256))
    return model, history


# --------------------------------------------------------------------------
# TrainConfig
# --------------------------------------------------------------------------

def test_triangular_schedule_peaks_at_two_sixteenths_by_default():
    config = TrainConfig(epochs=16, lr=0.5)
    assert config.peak_epoch == 2
    assert config.lr_at(0) == 0 and config.lr_at(2) == 0.5 and config.lr_at(16) == 0
    assert config.lr_at(1) == pytest.approx(0.25) and config.lr_at(9) == pytest.approx(0.25)
    assert TrainConfig(epochs=8, lr_peak_epoch=0).lr_at(0) == TrainConfig().lr


def test_progressive_resolution_follows_the_release():
    config = TrainConfig(min_resolution=160, max_resolution=192, start_ramp=11, end_ramp=13)
    assert [config.resolution_at(e) for e in (0, 11, 12, 13, 15)] == [160, 160, 192, 192, 192]
    assert TrainConfig().resolution_at(5) is None


@pytest.mark.parametrize("kwargs, match", [
    ({"epochs": 0}, "epochs=0"), ({"lr": -1.0}, "lr=-1.0"),
    ({"epochs": 4, "lr_peak_epoch": 5}, "lr_peak_epoch=5"),
    ({"min_resolution": 160}, "min_resolution=160"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


# --------------------------------------------------------------------------
# train_classifier
# --------------------------------------------------------------------------

def test_training_learns_digits(digits, pretrained):
    model, history = pretrained
    accuracy = evaluate(model, loader(digits["test"], 256), "cpu")
    assert accuracy > 0.8, f"test top-1 {accuracy:.3f} after 3 epochs (chance is 0.1)"
    assert history["train_loss"][-1] < history["train_loss"][0]
    assert len(history["val_acc"]) == 3 and history["val_acc"][-1] > 0.8
    assert history["epoch"] == [0, 1, 2]


def test_killed_run_resumes_to_bitwise_identical_weights(digits, tmp_path):
    config = TrainConfig(epochs=3, batch_size=32, lr=0.2, seed=7)
    train = loader(digits["train"], 32, shuffle=True, limit=320)

    whole = build_model("tiny", 10, seed=1)
    whole_history = train_classifier(whole, train, config, device="cpu", progress=False,
                                     checkpoint_dir=tmp_path / "whole")

    resumed = build_model("tiny", 10, seed=1)
    with pytest.raises(Killed):
        train_classifier(resumed, train, config, device="cpu", progress=False,
                         checkpoint_dir=tmp_path / "killed", on_epoch_end=kill_after(0))
    assert (tmp_path / "killed" / STATE_FILE).exists()
    assert not (tmp_path / "killed" / MODEL_FILE).exists()
    torch.manual_seed(999)  # whatever ran in between must not matter
    started = []
    fresh = build_model("tiny", 10, seed=2)  # a new process: other initial weights
    resumed_history = train_classifier(fresh, train, config, device="cpu", progress=False,
                                       checkpoint_dir=tmp_path / "killed",
                                       on_epoch_start=started.append)
    assert started == [1, 2]
    assert same(snapshot(whole), snapshot(fresh))
    assert resumed_history["train_loss"] == whole_history["train_loss"]
    assert same(snapshot(load_model(tmp_path / "killed" / MODEL_FILE)), snapshot(whole))
    assert sorted(p.name for p in (tmp_path / "killed").iterdir()) == [MODEL_FILE, STATE_FILE]


def test_resume_refuses_another_config(digits, tmp_path):
    train = loader(digits["train"], 32, limit=64)
    config = TrainConfig(epochs=2, batch_size=32, lr=0.1)
    with pytest.raises(Killed):
        train_classifier(build_model("tiny", 10), train, config, device="cpu", progress=False,
                         checkpoint_dir=tmp_path, on_epoch_end=kill_after(0))
    with pytest.raises(ValueError, match="lr: 0.1 there, 0.2 now"):
        train_classifier(build_model("tiny", 10), train,
                         TrainConfig(epochs=2, batch_size=32, lr=0.2), device="cpu",
                         progress=False, checkpoint_dir=tmp_path)


def test_train_classifier_rejects_a_mismatched_loader(digits):
    model = build_model("tiny", 10)
    with pytest.raises(ValueError, match="train_loader.batch_size=64 but config.batch_size=32"):
        train_classifier(model, loader(digits["train"], 64), TrainConfig(epochs=1, batch_size=32),
                         device="cpu", progress=False)


@pytest.mark.parametrize("amp,dtype", [(True, torch.bfloat16), (False, torch.float32)])
def test_cpu_training_runs_in_bfloat16_under_amp(digits, tmp_path, amp, dtype):
    # amp=True on the CPU: bfloat16 autocast (emulated where the CPU has no bf16 units),
    # no loss scaling (bfloat16 has float32's range); the weights stay float32; a
    # killed run resumes to the same weights.
    seen = []
    model = build_model("tiny", 10, seed=3)
    model.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    config = TrainConfig(epochs=2, batch_size=32, lr=0.2, seed=3, amp=amp)
    train = loader(digits["train"], 32, shuffle=True, limit=192)
    history = train_classifier(model, train, config, device="cpu", progress=False,
                               checkpoint_dir=tmp_path / "whole")
    assert set(seen) == {dtype} and all(p.dtype == torch.float32 for p in model.parameters())
    assert np.isfinite(history["train_loss"]).all() and history["train_loss"][-1] < history["train_loss"][0]
    assert torch.load(tmp_path / "whole" / STATE_FILE, weights_only=True)["scaler"] is None
    killed = build_model("tiny", 10, seed=3)
    with pytest.raises(Killed):
        train_classifier(killed, train, config, device="cpu", progress=False,
                         checkpoint_dir=tmp_path / "killed", on_epoch_end=kill_after(0))
    resumed = build_model("tiny", 10, seed=4)
    train_classifier(resumed, train, config, device="cpu", progress=False, checkpoint_dir=tmp_path / "killed")
    assert same(snapshot(model), snapshot(resumed))


# --------------------------------------------------------------------------
# finetune
# --------------------------------------------------------------------------

def _finetune_loaders(digits, log, train_batch=32):
    return (Spy(loader(digits["train"], train_batch, shuffle=True, limit=200), "train", log),
            Spy(loader(digits["val"], 128), "val", log),
            Spy(loader(digits["test"], 256), "test", log))


@pytest.mark.parametrize("cache_features", [True, False])
def test_linear_probe_freezes_the_backbone_and_selects_on_validation(digits, pretrained,
                                                                     cache_features):
    model, _ = pretrained
    before = snapshot(model)
    log = []
    result = finetune(model, *_finetune_loaders(digits, log), num_classes=10, mode="linear",
                      epochs=4, lr=0.01, cache_features=cache_features, device="cpu",
                      progress=False)
    assert same(before, snapshot(model))  # weights and BatchNorm statistics untouched
    assert result["model"].backbone is model.backbone and result["model"].head is not model.head
    # the test split is read once, after the epoch was chosen
    assert log.count("test") == 1 and log[-1] == "test"
    assert log.count("train") == (1 if cache_features else 4) and log.count("val") == 1
    val = result["history"]["val_acc"]
    assert result["best_epoch"] == int(np.argmax(val)) and result["val_acc"] == max(val)
    assert result["test_acc"] > 0.8 and (result["mode"], result["epochs"]) == ("linear", 4)


def test_full_finetune_trains_a_copy_and_selects_on_validation(digits, pretrained):
    model, _ = pretrained
    before = snapshot(model)
    log = []
    result = finetune(model, *_finetune_loaders(digits, log), num_classes=10, mode="full",
                      epochs=2, optimizer="sgd", lr=0.05, device="cpu", progress=False)
    assert same(before, snapshot(model))
    assert result["model"].backbone is not model.backbone
    assert not same(snapshot(result["model"].backbone), snapshot(model.backbone))
    assert log == ["train", "val", "train", "val", "test"]
    val = result["history"]["val_acc"]
    assert result["best_epoch"] == int(np.argmax(val)) and result["test_acc"] > 0.5
    assert (result["lr"], result["weight_decay"]) == (0.05, 5e-4)  # SGD's default decay


def test_finetune_uses_the_release_defaults_and_checks_its_arguments(digits, pretrained):
    model, _ = pretrained
    loaders = _finetune_loaders(digits, [])
    result = finetune(model, *loaders, num_classes=10, epochs=1, device="cpu", progress=False)
    assert (result["mode"], result["optimizer"], result["lr"]) == ("linear", "adam", 0.01)
    with pytest.raises(ValueError, match="mode='probe'"):
        finetune(model, *loaders, num_classes=10, mode="probe")
    with pytest.raises(ValueError, match="val_loader=None"):
        finetune(model, loaders[0], None, loaders[2], num_classes=10)


def test_cosine_schedule_with_warmup_and_adamw_groups():
    config = TrainConfig(epochs=10, lr=1e-3, schedule="cosine", warmup_epochs=2, optimizer="adamw",
                         weight_decay=0.05)
    assert config.lr_at(0) == 0 and config.lr_at(1) == pytest.approx(5e-4) and config.lr_at(2) == pytest.approx(1e-3)
    assert config.lr_at(6) == pytest.approx(5e-4) and config.lr_at(10) == pytest.approx(0, abs=1e-15)
    model = build_model("vit_t_16", 3, image_size=16, seed=0)
    optimizer, _, _ = training_setup(model, config, torch.device("cpu"), amp=False)
    assert isinstance(optimizer, torch.optim.AdamW)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert any(n.endswith("class_token") for n in skipped) and any(n.endswith("pos_embedding") for n in skipped)
    assert all(p.ndim >= 2 for p in decay["params"])
    for bad, match in (({"optimizer": "adam"}, "optimizer='adam'"), ({"schedule": "step"}, "schedule='step'"),
                       ({"warmup_epochs": 20}, "warmup_epochs=20")):
        with pytest.raises(ValueError, match=match):
            TrainConfig(epochs=10, **bad)


# --------------------------------------------------------------------------
# One epoch runner: every loop's steps go through train.run_epoch
# --------------------------------------------------------------------------

@pytest.fixture
def through_run_epoch(monkeypatch):
    """``check(loop, epochs, samples)``: runs ``loop()`` with a spy around
    ``train.run_epoch`` and asserts it was called once an epoch, that the spy's
    ``on_step`` (chained before the loop's own) saw every sample once an epoch, and
    that it ran right after each optimizer step torch counted, none taken outside."""
    counted = []  # one entry per optimizer step, by torch's global hook
    handle = register_optimizer_step_post_hook(lambda *_: counted.append(1))
    calls = []
    real = fvtrain.run_epoch

    def spy(*args, on_step=None, **kwargs):
        observed = []

        def observe(inputs, logits, labels):
            observed.append((len(counted), len(labels)))
            if on_step is not None:
                on_step(inputs, logits, labels)

        stats = real(*args, on_step=observe, **kwargs)
        assert stats.steps == len(observed)
        calls.append(observed)
        return stats

    monkeypatch.setattr(fvtrain, "run_epoch", spy)

    def check(loop, epochs, samples):
        calls.clear()
        first = len(counted) + 1
        loop()
        assert len(calls) == epochs
        assert [sum(n for _, n in epoch) for epoch in calls] == [samples] * epochs
        assert [k for epoch in calls for k, _ in epoch] == list(range(first, len(counted) + 1))

    yield check
    handle.remove()


def test_supervised_training_and_finetuning_step_through_run_epoch(digits, through_run_epoch):
    train = loader(digits["train"], 32, shuffle=True, limit=96)
    attacked = []

    def perturb(model, images, labels):  # a per-batch hook: runs before its batch's step
        attacked.append(len(images))
        return images.flip(-1)

    model = build_model("tiny", 10, image_size=SIDE, seed=0)
    through_run_epoch(lambda: train_classifier(model, train, TrainConfig(epochs=2, batch_size=32),
                                               device="cpu", progress=False, perturb=perturb),
                      epochs=2, samples=96)
    assert sum(attacked) == 2 * 96
    loaders = (train, loader(digits["val"], 128), loader(digits["test"], 256))
    through_run_epoch(lambda: finetune(model, *loaders, num_classes=10, mode="full", epochs=1,
                                       device="cpu", progress=False), epochs=1, samples=96)
    through_run_epoch(lambda: finetune(model, *loaders, num_classes=10, epochs=2, device="cpu",
                                       progress=False), epochs=2, samples=96)


def test_moco_steps_through_run_epoch(digits, through_run_epoch):
    images = digits["train"].tensors[0][:32]
    model = build_model("tiny", 10, image_size=SIDE, seed=0)
    config = ssl.MocoConfig(epochs=2, batch_size=8, dim=16, queue_size=24, bn_group_size=4)
    data = DataLoader(TensorDataset(images, torch.zeros(32, dtype=torch.long)), batch_size=8)
    through_run_epoch(lambda: ssl.pretrain_moco(model, data, config, mean=(0.5,) * 3, std=(0.5,) * 3,
                                                device="cpu", progress=False),
                      epochs=2, samples=32)


def test_score_runs_step_through_run_epoch(tmp_path, through_run_epoch):
    pytest.importorskip("ffcv")
    if fvdata.missing("digits"):
        pytest.skip(f"offline dataset missing: {fvdata.missing('digits')}")
    beton = fvdata.write_offline("digits", "train", tmp_path / "digits.beton", progress=False)
    samples = len(fvdata.read_columns(beton)["labels"])
    prep = {"resolution": SIDE, "mean": [0.1] * 3, "std": [0.3] * 3}
    rows = []
    model = build_model("tiny", 10, image_size=SIDE, seed=0)
    through_run_epoch(lambda: scores.train_run(
        model, beton, config=TrainConfig(epochs=2, batch_size=32, lr=0.1), epochs=2, prep=prep, seed=0,
        device="cpu", rows_of=lambda ids: ids, progress=False,
        on_batch=lambda r, logits, labels: rows.extend(r.tolist())), epochs=2, samples=samples)
    assert sorted(rows) == sorted(list(range(samples)) * 2)  # on_batch still sees every sample
