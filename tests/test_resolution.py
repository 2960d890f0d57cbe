"""Issue 14: the real-resolution path end to end. A JPEG ImageFolder of real
photos at 160-200 px -> `fastvote data write --image-folder` -> prune with a
ResNet-18 surrogate at 128 px -> the kept subset's train loader -> pretraining
with progressive resolution (96 -> 128 px), in both loader back ends."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fastvote
from fastvote import data as fvdata
from fastvote import models
from fastvote.train import TrainConfig, train_classifier

PHOTOS = Path("/usr/share/doc/opencv-doc/examples/data")
# Six photos that look nothing alike: each is a source class; the target is new crops of two of them.
CLASSES = ("baboon", "fruits", "apple", "board", "butterfly", "building")
TARGET = ("baboon", "butterfly")


def _crops(photo: Path, count: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    with Image.open(photo) as im:
        im = im.convert("RGB")
        w, h = im.size
        for _ in range(count):
            side = int(min(w, h) * rng.uniform(0.5, 0.9))
            x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            out = int(rng.integers(160, 201))  # sides vary: the loaders crop and resize
            yield im.crop((x, y, x + side, y + side)).resize((out, out))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    missing = [c for c in CLASSES if not (PHOTOS / f"{c}.jpg").is_file()]
    if missing:
        pytest.skip(f"Debian's opencv-doc photos are not installed ({missing} missing in {PHOTOS})")
    root = tmp_path_factory.mktemp("photos")
    for split, names, count, seed in (("source", CLASSES, 8, 0), ("target", TARGET, 4, 1)):
        for c in names:
            (root / split / c).mkdir(parents=True)
            for i, crop in enumerate(_crops(PHOTOS / f"{c}.jpg", count, seed)):
                crop.save(root / split / c / f"{i}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def betons(folders):
    out = {}
    for split in ("source", "target"):
        path = folders / f"{split}.beton"
        done = subprocess.run([sys.executable, "-m", "fastvote.cli", "data", "write", "--image-folder",
                               folders / split, path, "--workers", "2"], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert "jpeg (quality 90)" in done.stdout and "class names" in done.stdout, done.stdout
        out[split] = path
    return out


def test_data_write_stores_the_folder_as_jpeg_with_its_class_names(betons):
    columns = fvdata.read_columns(betons["source"])
    assert len(columns["labels"]) == 48 and columns["heights"].min() >= 160
    assert fvdata.read_classes(betons["source"]) == sorted(CLASSES)
    # JPEG, not raw: 48 images of ~180 px take far less than their raw 4.7 MB (beyond the
    # header's page: the data pages start at a page boundary, and a page is at least 2 MiB)
    raw = int((3 * columns["heights"] * columns["widths"]).sum())
    assert betons["source"].stat().st_size - (2 << 20) < raw / 4
    image, label, _ = next(fvdata.iter_samples(betons["source"]))
    assert image.shape[2] == 3 and image.shape[0] >= 160


def _pretrain(result, resolutions):
    """Two epochs of a ResNet-18 on the kept subset; returns the input side seen in each epoch."""
    config = TrainConfig(epochs=2, batch_size=8, lr=0.05, seed=0, min_resolution=96, max_resolution=128,
                         start_ramp=0, end_ramp=1)
    loader = result.loader(8, train=True, resolution=96, num_workers=2)
    model = models.build_model("resnet18", 6, image_size=128, seed=0)
    seen = []
    model.backbone.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[-1]))
    epochs = []
    train_classifier(model, loader, config, device="cpu", progress=False,
                     on_epoch_end=lambda epoch, history: epochs.append(sorted(set(seen))) or seen.clear())
    assert epochs == [[r] for r in resolutions]


def test_prune_and_pretrain_at_real_resolution(betons, tmp_path):
    result = fastvote.prune(str(betons["source"]), str(betons["target"]), method="fm", keep=2, arch="resnet18",
                            image_size=128, train_config=TrainConfig(epochs=4, batch_size=16, lr=0.05, seed=0),
                            device="cpu", workdir=tmp_path / "w", progress=False)
    # FFCV's crops come from numba's generator, which ffcv does not seed: the surrogate differs
    # from run to run, so only the torch path (seeded crops, below) pins the exact classes.
    assert set(result.kept_names) & set(TARGET) and int(result.votes.sum()) == 8
    prep = result.manifest["preprocessing"]
    assert prep["resolution"] == 128 and prep["crop_ratio"] == 224 / 256  # ImageNet's eval crop above 64 px
    assert len(result.indices) == 16
    # an eval batch of the kept subset: centre crops at the surrogate's side
    images, labels = next(iter(result.loader(16, train=False)))[:2]
    assert images.shape == (16, 3, 128, 128)
    assert set(labels.tolist()) == {sorted(CLASSES).index(c) for c in result.kept_names}  # ImageFolder's labels
    _pretrain(result, [96, 128])  # progressive resolution: the loader's side changes between epochs


def test_progressive_resolution_without_ffcv(betons, tmp_path):
    """The same pretraining through the torch loaders (FFCV hidden in a fresh process)."""
    script = f"""
import sys
class Hide:
    def find_spec(self, name, path=None, target=None):
        if name == "ffcv" or name.startswith("ffcv."):
            raise ImportError("ffcv hidden by the test")
sys.meta_path.insert(0, Hide())
sys.path.insert(0, {str(Path(__file__).parent)!r})
import warnings
warnings.simplefilter("ignore")
import fastvote, test_resolution as t
from fastvote.train import TrainConfig
assert fastvote.data.backend() == "torch"
# float32 training (amp=False): this answer was found in float32, and a surrogate of 12 steps on 48
# images is at its edge: trained in bfloat16 (the default on CPUs with bf16 units) it keeps apple
# instead of baboon (RESULTS.md, issue 23)
result = fastvote.prune({str(betons['source'])!r}, {str(betons['target'])!r}, method="fm", keep=2, arch="resnet18",
                        image_size=128, train_config=TrainConfig(epochs=4, batch_size=16, lr=0.05, seed=0, amp=False),
                        device="cpu", workdir={str(tmp_path / 'w')!r}, progress=False)
assert set(result.kept_names) == set(t.TARGET), result.kept_names
t._pretrain(result, [96, 128])
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
