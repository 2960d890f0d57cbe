"""Issue 13: the surrogates and sources users already have, on small real
data: a torchvision ResNet (BatchNorm) as surrogate=, a labels-only source,
exported outputs mixed with betons, the feature cache across prunes, what a
user sees (votes over 1000 classes, quiet progress in logs)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision

import fastvote
from fastvote import models
from fastvote import data as fvdata

pytest.importorskip("ffcv")
pytestmark = pytest.mark.skipif(bool(fvdata.missing("haystack") or fvdata.missing("digits")),
                                reason="offline datasets missing")
SIZE = 16


@pytest.fixture(scope="module")
def real(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("users")
    source = fvdata.write_offline("haystack", "train", root / "haystack.beton", per_class=40, progress=False)
    target = fvdata.write_offline("digits", "train", root / "digits.beton", progress=False)
    model = models.build_model("tiny", 30, image_size=SIZE, seed=0)
    ckpt = models.save_checkpoint(root / "s.pt", model, resolution=SIZE, mean=[0.5] * 3, std=[0.25] * 3)
    return {"root": root, "source": source, "target": target, "surrogate": ckpt}


def test_a_torchvision_resnet_with_batchnorm_is_a_surrogate(real, tmp_path):
    net = torchvision.models.resnet18(num_classes=30)
    result = fastvote.prune(real["source"], real["target"], method="fm", keep=3, surrogate=net, image_size=SIZE,
                            mean=[0.5] * 3, std=[0.25] * 3, workdir=tmp_path, progress=False)
    assert len(result.kept_classes) == 3 and result.manifest["surrogate"]["kind"] == "module"
    assert result.manifest["preprocessing"]["resolution"] == SIZE


def test_lm_with_a_labels_only_source_runs_the_surrogate_on_the_target_only(real, tmp_path, monkeypatch):
    labels = fvdata.read_columns(real["source"])["labels"]
    names = fvdata.read_classes(real["source"])
    whole = fastvote.prune(real["source"], real["target"], method="lm", keep=5, surrogate=real["surrogate"],
                           workdir=tmp_path / "a", progress=False)
    from fastvote import features

    passes = []
    original = features.iterate_outputs
    monkeypatch.setattr(features, "iterate_outputs", lambda *a, **k: passes.append(k.get("desc")) or original(*a, **k))
    alone = fastvote.prune({"labels": labels, "class_names": names}, real["target"], method="lm", keep=5,
                           surrogate=real["surrogate"], workdir=tmp_path / "b", progress=False)
    assert torch.equal(alone.indices, whole.indices) and torch.equal(alone.votes, whole.votes)
    assert alone.kept_names == whole.kept_names
    assert len(passes) == 1 and "target" in passes[0]  # the source's images were never read
    folder = tmp_path / "labels"
    folder.mkdir()
    np.save(folder / "labels.npy", labels)
    (folder / "classes.json").write_text(json.dumps(names))
    from_folder = fastvote.prune(folder, real["target"], method="lm", keep=5, surrogate=real["surrogate"],
                                 workdir=tmp_path / "b", progress=False)
    assert torch.equal(from_folder.indices, whole.indices)
    imagenet = fastvote.prune({"labels": np.arange(1000), "class_names": "imagenet"}, {"logits": torch.eye(1000)[[950]]},
                              method="lm", keep=1, progress=False)
    assert imagenet.kept_names == ["orange"]


def test_a_second_prune_reads_the_cached_outputs(real, tmp_path, monkeypatch):
    first = fastvote.prune(real["source"], real["target"], method="fm", keep=4, surrogate=real["surrogate"],
                           workdir=tmp_path, progress=False)
    from fastvote import features

    monkeypatch.setattr(features, "iterate_outputs", lambda *a, **k: pytest.fail("the surrogate ran again"))
    again = fastvote.prune(real["source"], real["target"], method="fm", ratio=0.5, surrogate=real["surrogate"],
                           workdir=tmp_path, progress=False)
    assert torch.equal(again.votes, first.votes)
    fastvote.prune(real["source"], real["target"], method="fm", keep=4, metric="cosine",
                   surrogate=real["surrogate"], workdir=tmp_path, progress=False)


def test_exported_outputs_mix_with_a_beton_of_the_same_surrogate(real, tmp_path):
    out = fastvote.export_outputs(real["target"], tmp_path / "digits-outputs", source=real["source"],
                                  surrogate=real["surrogate"], workdir=tmp_path / "w", progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["classes.json", "features.npy", "labels.npy", "logits.npy",
                                                     "manifest.json", "surrogate.json"]
    assert np.load(out / "logits.npy").shape == (len(fvdata.read_columns(real["target"])["labels"]), 30)
    whole = fastvote.prune(real["source"], real["target"], method="fm", keep=4, surrogate=real["surrogate"],
                           workdir=tmp_path / "w2", progress=False)
    mixed = fastvote.prune(real["source"], out, method="fm", keep=4, surrogate=real["surrogate"],
                           workdir=tmp_path / "w3", progress=False)
    assert torch.equal(mixed.votes, whole.votes) and torch.equal(mixed.indices, whole.indices)
    other = models.save_checkpoint(tmp_path / "other.pt", models.build_model("tiny", 30, image_size=SIZE, seed=1),
                                   resolution=SIZE, mean=[0.5] * 3, std=[0.25] * 3)
    with pytest.raises(ValueError, match="two unrelated feature spaces"):
        fastvote.prune(real["source"], out, method="fm", keep=4, surrogate=other, workdir=tmp_path / "w3",
                       progress=False)


def test_votes_over_1000_classes_are_plotted_most_voted_first(tmp_path, monkeypatch):
    from fastvote import plots

    logits = torch.zeros(5, 1000)
    logits[[0, 1, 2, 3, 4], [950, 950, 948, 1, 3]] = torch.tensor([1.0, 1.0, 3.0, 2.0, 1.0])
    result = fastvote.prune({"labels": np.arange(2000) % 1000, "class_names": "imagenet"}, {"logits": logits},
                            method="lm", keep=3, progress=False)
    assert result.kept_names == ["orange", "Granny Smith", "goldfish"]  # equal votes: the higher mean probability
    drawn = []
    original = plots.save_figure

    def spy(fig, path):
        drawn.extend(t.get_text() for t in fig.axes[0].get_xticklabels())
        return original(fig, path)

    monkeypatch.setattr(plots, "save_figure", spy)
    plots.plot_votes(result, tmp_path / "v.png")
    assert drawn == ["orange", "Granny Smith", "goldfish", "tiger shark"]  # kept in rank order, then voted


def test_progress_bars_stay_out_of_logs(real, tmp_path):
    done = subprocess.run([sys.executable, "-m", "fastvote.cli", "prune", "--source", real["source"], "--target",
                           real["target"], "--keep", "3", "--surrogate", real["surrogate"], "--out", tmp_path / "r",
                           "--workdir", tmp_path / "w"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "%|" not in done.stderr and "\x1b[" not in done.stderr


def test_hugging_face_and_torchvision_datasets_as_prune_inputs(real, tmp_path):
    datasets = pytest.importorskip("datasets")
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [np.kron(im, np.ones((2, 2))).astype(np.uint8) * 15 for im in digits.images[:60]]
    rgb = [np.repeat(im[..., None], 3, axis=2) for im in images]
    mixed = [im if i % 2 else rgb[i] for i, im in enumerate(images)]  # grayscale and RGB in one dataset
    features = datasets.Features({"img": datasets.Image(), "digit": datasets.ClassLabel(names=[str(d) for d in range(10)])})
    hf = datasets.Dataset.from_dict({"img": mixed, "digit": digits.target[:60].tolist()}, features=features)
    as_hf = fastvote.prune(real["source"], hf, method="lm", keep=3, surrogate=real["surrogate"], image_key="img",
                           label_key="digit", workdir=tmp_path, progress=False)
    as_tuples = fastvote.prune(real["source"], [(im, int(y)) for im, y in zip(rgb, digits.target[:60])],
                               method="lm", keep=3, surrogate=real["surrogate"], workdir=tmp_path, progress=False)
    as_tensors = fastvote.prune(real["source"], [(torch.from_numpy(im).permute(2, 0, 1).float() / 255, int(y))
                                                 for im, y in zip(rgb, digits.target[:60])],
                                method="lm", keep=3, surrogate=real["surrogate"], workdir=tmp_path, progress=False)
    assert torch.equal(as_hf.votes, as_tuples.votes) and torch.equal(as_tensors.votes, as_tuples.votes)
    assert int(as_hf.votes.sum()) == 60
    with pytest.raises(TypeError, match="lacking image_key='image'"):
        fastvote.prune(real["source"], hf, method="lm", keep=3, surrogate=real["surrogate"], workdir=tmp_path,
                       progress=False)
    with pytest.raises(TypeError, match="dataset item of type str is not accepted"):
        fastvote.prune(real["source"], [("a", "b")], method="lm", keep=3, surrogate=real["surrogate"],
                       workdir=tmp_path, progress=False)


PHOTO_CLASSES = {"orange", "Granny Smith", "monarch", "baboon", "fox squirrel", "lemon"}


@pytest.fixture(scope="module")
def example():
    pytest.importorskip("efficientnet_lite_pytorch")
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "examples"))
    import imagenet_photos

    if not all((imagenet_photos.PHOTOS / f"{n}.jpg").is_file() for n in imagenet_photos.NAMES):
        pytest.skip("Debian's opencv-doc photos are not installed")
    return imagenet_photos


def test_the_imagenet_photos_example_keeps_each_photos_own_class(example, tmp_path):
    result = example.main(["--out", str(tmp_path / "out"), "--workdir", str(tmp_path / "w")])
    assert set(result.kept_names) == PHOTO_CLASSES
    assert result.manifest["preprocessing"]["resolution"] == 224
    assert result.manifest["preprocessing"]["crop_ratio"] == 224 / 256
    kept = json.loads((tmp_path / "out" / "classes.json").read_text())
    assert {c["name"] for c in kept["classes"] if c["kept"]} == PHOTO_CLASSES
    assert (tmp_path / "out" / "votes.png").stat().st_size > 0


def test_the_cli_prunes_the_imagenet_label_space_with_a_pickled_module(example, tmp_path):
    import torchvision.transforms as T
    from PIL import Image

    model = example.efficientnet_lite0()
    torch.save(model, tmp_path / "lite0.pt")  # a pickled module: load_surrogate reads it (a trusted file)
    resize = T.Resize(256)
    photos = [(resize(Image.open(example.PHOTOS / f"{n}.jpg").convert("RGB")), 0) for n in example.NAMES]
    fvdata.write_beton(photos, tmp_path / "photos.beton", progress=False)
    labels = tmp_path / "imagenet-labels"
    labels.mkdir()
    np.save(labels / "labels.npy", np.arange(1000))
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    (labels / "classes.json").write_text(json.dumps(list(_IMAGENET_CATEGORIES)))
    done = subprocess.run([sys.executable, "-m", "fastvote.cli", "prune", "--source", labels, "--target",
                           tmp_path / "photos.beton", "--keep", "6", "--surrogate", tmp_path / "lite0.pt",
                           "--image-size", "224", "--mean", "0.485", "0.456", "0.406", "--std", "0.229", "0.224",
                           "0.225", "--out", tmp_path / "r", "--workdir", tmp_path / "w", "--device", "cpu"],
                          capture_output=True, text=True, cwd=str(__import__("pathlib").Path(example.__file__).parent))
    assert done.returncode == 0, done.stderr
    assert all(name in done.stdout for name in PHOTO_CLASSES), done.stdout


def test_a_torchvision_weight_file_is_loaded_into_its_arch_with_its_preprocessing(tmp_path):
    net = torchvision.models.resnet18()  # 1000 classes, random weights saved as torchvision names its file
    torch.save(net.state_dict(), tmp_path / "resnet18-f37072fd.pth")
    photos = [(np.full((300, 260, 3), 40 * i, dtype=np.uint8), 0) for i in range(3)]
    result = fastvote.prune({"labels": np.arange(1000), "class_names": "imagenet"}, photos, method="lm", keep=2,
                            surrogate=tmp_path / "resnet18-f37072fd.pth", arch="resnet18", workdir=tmp_path / "w",
                            progress=False)
    prep = result.manifest["preprocessing"]
    assert prep["resolution"] == 224 and prep["crop_ratio"] == 224 / 256 and prep["mean"][0] == 0.485
    assert result.manifest["surrogate"]["format"] == "state_dict"
    with pytest.raises(ValueError, match="arch"):  # a resnet18 file read as resnet50: named, not garbage
        fastvote.prune({"labels": np.arange(1000), "class_names": "imagenet"}, photos, method="lm", keep=2,
                       surrogate=tmp_path / "resnet18-f37072fd.pth", arch="resnet50", workdir=tmp_path / "w",
                       progress=False)
