"""The paper's other settings as `fastvote experiment` options, each run end
to end on real data (a small haystack -> digits) with its defining property
checked: ablations, multi-task and few-shot targets, a biased source and the
feature-space plot; MoCo v2 and adversarial pretraining; a ViT source model.
The building blocks have their own tests (test_ssl, test_adversarial,
test_bias, test_analysis, test_models)."""
import csv
import json

import numpy as np
import pytest
import torch

pytest.importorskip("ffcv")

from fastvote import data as fvdata  # noqa: E402
from fastvote.experiment import Experiment, ExperimentConfig  # noqa: E402
from fastvote.prune import PruneResult  # noqa: E402

needs_data = pytest.mark.skipif(bool(fvdata.missing("haystack") or fvdata.missing("digits")
                                     or fvdata.missing("animal-mnist")),
                                reason="offline datasets missing")

SMALL = dict(ratios=(0.8,), seeds=(0,), image_size=8, surrogate_epochs=2, epochs=1, lp_epochs=3, modes=("linear",),
             batch_size=64, device="cpu", unpruned=False)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Haystack with 40 images a class (1200): every setting runs in seconds."""
    return str(fvdata.write_offline("haystack", "train", tmp_path_factory.mktemp("src") / "haystack.beton",
                                    per_class=40, progress=False))


def rows_of(out):
    with open(out / "results.csv") as f:
        return list(csv.DictReader(f))


def prune_folder(out, method):
    folder, = (out / "prune").glob(f"{method}-r0.800*")
    return PruneResult.load(folder)


def test_method_strings_carry_options_and_ablations():
    spec = ExperimentConfig().spec
    assert spec("lm").text == "lm" and not spec("lm").extra
    assert dict(spec("lm:reverse=true,k=5").options, normalize_targets=False) == {
        "k": 5, "weight": "count", "reverse": True, "normalize_targets": False}
    grand = spec("grand:runs=2,surrogate_epochs=1")
    assert grand.options["runs"] == 2 and dict(grand.extra) == {"surrogate_epochs": 1}
    assert spec("random").options == {}  # the config's k/metric/weight apply only where a method takes them
    with pytest.raises(ValueError, match="option k='x' is not an int"):
        spec("lm:k=x")
    with pytest.raises(ValueError, match="surrogate_arch='nope'"):
        ExperimentConfig(methods=("lm:surrogate_arch=nope",)).validate(30)
    with pytest.raises(ValueError, match="pretraining='sim'"):
        ExperimentConfig(pretraining="sim").validate(30)
    with pytest.raises(ValueError, match="TrainConfig.optimizer='adam'"):
        ExperimentConfig(optimizer="adam").validate(30)


@needs_data
def test_ablations_multitask_fewshot_bias_and_feature_plot(source, tmp_path, one_thread):
    out = tmp_path / "run"
    config = ExperimentConfig(
        source=source, methods=("lm", "lm:reverse=true", "lm:k=3,weight=rank", "lm:surrogate_epochs=1"),
        extra_targets=("animal-mnist",), target_shots=5, val_shots=2,
        source_bias="label_noise=0.5,imbalance=0.5,classes=0;1;2;3;4", **SMALL)
    exp = Experiment(config, out, progress=False)
    rows = exp.run()

    # multi-task: both targets vote (each normalised to weigh the same) and each gets a transfer row
    assert {(r["target"], r["method"]) for r in rows} == {(t, m) for t in ("digits", "animal-mnist")
                                                         for m in config.methods}
    lm = prune_folder(out, "lm")
    assert len(lm.manifest["targets"]) == 2 and lm.manifest["arguments"]["options"]["normalize_targets"]
    torch.testing.assert_close(lm.votes.sum(), torch.tensor(2.0, dtype=torch.float64))
    # few-shot: 5 shots a class, 2 of them validation, 3 train, for both targets
    for target in exp.targets:
        labels = fvdata.read_columns(target.train)["labels"]
        assert np.bincount(labels[target.train_idx]).tolist() == [3] * 10, target.name
        assert np.bincount(labels[target.val_idx]).tolist() == [2] * 10, target.name
        assert not set(target.train_idx) & set(target.val_idx)

    # reverse keeps the least voted classes: none of LM's
    reverse = prune_folder(out, "lm_reverse-true")
    assert not set(lm.kept_classes.tolist()) & set(reverse.kept_classes.tolist())
    assert reverse.manifest["arguments"]["options"]["reverse"] is True
    # k = 3 with rank weights: each target row gives 1 + 1/2 + 1/3 before normalising
    topk = prune_folder(out, "lm_k-3_weight-rank")
    assert topk.manifest["arguments"]["options"]["k"] == 3 and topk.manifest["arguments"]["options"]["weight"] == "rank"
    # the under-trained surrogate is its own checkpoint, and its prune used it
    under = prune_folder(out, "lm_surrogate_epochs-1")
    assert (out / "surrogate-tiny-e1.pt").is_file()
    assert under.manifest["surrogate"]["path"].endswith("surrogate-tiny-e1.pt")
    assert lm.manifest["surrogate"]["path"].endswith("surrogate.pt")

    # the biased source: the record, the copy pruned, and the report of what voting kept
    assert exp.bias["affected_classes"] == [0, 1, 2, 3, 4] and exp.bias["num_flipped"] > 0
    assert lm.manifest["source"]["num_samples"] == exp.bias["num_samples"]["biased"] < 1200
    markdown = (out / "results.md").read_text()
    assert "### Biased source (" in markdown and "| LM (reverse=true) | 0.80 |" in markdown
    assert "Transfer accuracy to animal-mnist" in markdown and "Transfer accuracy to digits" in markdown

    # the feature-space plot of each class-wise prune
    for method in ("lm", "lm_reverse-true"):
        png, = (out / "prune").glob(f"{method}-r0.800/features.png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(rows_of(out)) == 8


@needs_data
def test_moco_pretraining_with_label_free_fm(source, tmp_path, one_thread):
    out = tmp_path / "moco"
    config = ExperimentConfig(source=source, methods=("fm",), centroids="kmeans", pretraining="moco",
                              moco_queue=256, **dict(SMALL, unpruned=True))
    rows = Experiment(config, out, progress=False).run()
    assert {r["method"] for r in rows} == {"fm", "unpruned"} and {r["pretraining"] for r in rows} == {"moco"}
    fm = prune_folder(out, "fm")
    assert fm.manifest["selection"]["centroids"] == "kmeans" and fm.class_names[0] == "cluster 0"
    state = torch.load(out / "work" / "pretrain" / "fm-r0.800-s0" / "moco_state.pt", weights_only=False)
    assert state["epoch"] == 1 and state["config"]["queue_size"] == 256
    assert "moco pretraining" in (out / "results.md").read_text()
    assert not (out / "prune" / "fm-r0.800" / "features.png").exists()  # clusters are not classes


@needs_data
def test_adversarial_pretraining(source, tmp_path, one_thread, monkeypatch):
    from fastvote.adversarial import PGD

    calls = []
    attack = PGD.__call__

    def counted(self, model, images, labels):
        adversarial = attack(self, model, images, labels)
        pixels = lambda x: x * torch.tensor(self.std)[:, None, None] + torch.tensor(self.mean)[:, None, None]
        calls.append(float((pixels(adversarial) - pixels(images)).abs().max()))
        return adversarial

    monkeypatch.setattr(PGD, "__call__", counted)
    out = tmp_path / "adv"
    config = ExperimentConfig(source=source, methods=("lm",), pretraining="adversarial", pgd_eps=4 / 255, **SMALL)
    rows = Experiment(config, out, progress=False).run()
    assert rows[0]["pretraining"] == "adversarial" and 0 <= rows[0]["test_acc"] <= 1
    kept = len(prune_folder(out, "lm").indices)
    assert len(calls) == kept // 64  # every training batch was attacked (drop_last)
    assert max(calls) <= 4 / 255 + 1e-5 and max(calls) > 3 / 255  # in the eps-ball, and using it


@needs_data
def test_vit_source_model_with_adamw_cosine(source, tmp_path, one_thread):
    out = tmp_path / "vit"
    config = ExperimentConfig(source=source, methods=("lm",), arch="vit_t_16", optimizer="adamw", schedule="cosine",
                              warmup_epochs=0.5, lr=1e-3, weight_decay=0.05, **SMALL)
    rows = Experiment(config, out, progress=False).run()
    assert 0 <= rows[0]["test_acc"] <= 1
    state = torch.load(out / "work" / "pretrain" / "lm-r0.800-s0" / "train_state.pt", weights_only=False)
    assert state["config"]["optimizer"] == "adamw" and state["config"]["schedule"] == "cosine"
    assert any("class_token" in k for k in state["model"])  # the ViT was pretrained
    saved = json.loads((out / "config.json").read_text())
    assert saved["arch"] == "vit_t_16"
