"""Datasets in the shapes people hold (issue 13), on real images (sklearn's digits and
its two sample photos): ``sample_of`` on every accepted item shape and every rejected
one; Hugging Face, torchvision and plain-list datasets written with ``write_beton`` and
read back through ``eval_loader`` (raw storage: exact pixels); ImageNet's WordNet-id
folders; ``eval_loader``'s ``crop_ratio`` against a numpy reference."""
import gc
import hashlib
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits, load_sample_images

from fastvote import data
from fastvote.data import sample_of

UNIT = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # the loader then yields pixels / 255
ACCEPTED = re.escape("accepted items: (image, label, ...) tuples or lists, or dicts")


@pytest.fixture
def ffcv():
    yield pytest.importorskip("ffcv", reason="FFCV is not installed: pip install ffcv==1.0.2")
    gc.collect()  # free the loaders now (see tests/test_data.py's fixture of the same name)


# --- real images -----------------------------------------------------------------------

def digits(count, size=32):
    """sklearn's first `count` 8x8 digits (0..16), as uint8 0..255 upscaled to size x size."""
    d = load_digits()
    images = np.round(d.images[:count] * 255 / 16).astype(np.uint8)
    k = size // 8
    return images.repeat(k, 1).repeat(k, 2), d.target[:count].astype(np.int64)


def photos():
    """china.jpg and flower.jpg, uint8 (427, 640, 3)."""
    return load_sample_images().images


def patches(count, size=32):
    """`count` size x size RGB patches from each photo, shrunk 4x (label 0: china, 1: flower)."""
    out = []
    for photo in photos():
        small = np.asarray(Image.fromarray(photo).resize((160, 107), Image.BILINEAR))
        out += [small[(7 * i) % 70:(7 * i) % 70 + size, (29 * i) % 120:(29 * i) % 120 + size]
                for i in range(count)]
    return np.stack(out), np.repeat([0, 1], count)


GRAY, _ = digits(1, 8)
GRAY = GRAY[0][1:7]                       # (6, 8): not square, so a transpose would show
RGB = photos()[0][200:206, 300:308].copy()  # (6, 8, 3)
RGBA = np.dstack([RGB, np.full(RGB.shape[:2], 128, np.uint8)])


def rgb(images):
    return np.repeat(images[..., None], 3, axis=-1) if images.shape[-1] != 3 else images


def mixed(count=3):
    """Digits (grayscale PIL "L") and photo patches (RGB) interleaved: (PIL images,
    expected RGB pixels, labels, names)."""
    gray, gray_labels = digits(10 * count)
    colour, colour_labels = patches(count)
    images = [Image.fromarray(g) for g in gray] + [Image.fromarray(c) for c in colour]
    pixels = np.concatenate([rgb(gray), colour])
    labels = np.concatenate([gray_labels, 10 + colour_labels])
    order = np.random.default_rng(0).permutation(len(images))
    names = [str(d) for d in range(10)] + ["china", "flower"]
    return [images[i] for i in order], pixels[order], labels[order], names


def collect(loader):
    """An epoch's images back to uint8 (N, H, W, 3), and its labels."""
    images, labels = zip(*((images.clone(), labels) for images, labels in loader))
    pixels = (torch.cat(images) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return pixels, torch.cat(labels).numpy()


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- sample_of: every accepted item ---------------------------------------------------

def to_tensor(array):
    from torchvision.transforms.functional import to_tensor
    return to_tensor(array)


ACCEPTED_ITEMS = {  # name: (item, expected image, expected label)
    "tuple PIL RGB": ((Image.fromarray(RGB), 3), RGB, 3),
    "list with extras": ([RGB, 3, "extra", None], RGB, 3),
    "HF dict PIL L": ({"image": Image.fromarray(GRAY), "label": 3}, rgb(GRAY), 3),
    "PIL RGBA": ((Image.fromarray(RGBA), 3), RGB, 3),
    "PIL P": ((Image.fromarray(GRAY).convert("P"), 3), rgb(GRAY), 3),
    "PIL I;16": ((Image.fromarray(GRAY.astype(np.uint16) * 257), 3), rgb(GRAY), 3),
    "PIL 1": ((Image.fromarray(GRAY > 100), 3),
              rgb(np.where(GRAY > 100, 255, 0).astype(np.uint8)), 3),
    "uint8 HxW": ((GRAY, 3), rgb(GRAY), 3),
    "uint8 HxWx1": ((GRAY[..., None], 3), rgb(GRAY), 3),
    "uint8 HxWx3": ((RGB, 3), RGB, 3),
    "uint8 HxWx3 strided": ((RGB[:, ::-1], 3), RGB[:, ::-1], 3),
    "uint8 HxWx4": ((RGBA, 3), RGB, 3),
    "uint8 1xHxW": ((GRAY[None], 3), rgb(GRAY), 3),
    "uint8 3xHxW": ((RGB.transpose(2, 0, 1), 3), RGB, 3),
    "float tensor 3xHxW (ToTensor)": ((to_tensor(RGB), 3), RGB, 3),
    "float tensor 1xHxW (ToTensor)": ((to_tensor(GRAY), 3), rgb(GRAY), 3),
    "float64 array 3xHxW": ((RGB.transpose(2, 0, 1) / 255, 3), RGB, 3),
    "half tensor 3xHxW": ((to_tensor(RGB).half(), 3), RGB, 3),
    "torch uint8 3xHxW (read_image)": ((torch.from_numpy(RGB).permute(2, 0, 1), 3), RGB, 3),
    "torch uint8 1xHxW (HF torch format)": ((torch.from_numpy(GRAY[None]), 3), rgb(GRAY), 3),
    "torch uint8 HxWx3": ((torch.from_numpy(RGB), 3), RGB, 3),
    "torch uint8 HxW": ((torch.from_numpy(GRAY), 3), rgb(GRAY), 3),
    "label numpy int64 (HF numpy format)": ({"image": RGB, "label": np.int64(7)}, RGB, 7),
    "label numpy uint8": ((RGB, np.uint8(200)), RGB, 200),
    "label torch 0-d": ((RGB, torch.tensor(5)), RGB, 5),
    "label torch (1,)": ((RGB, torch.tensor([5], dtype=torch.int32)), RGB, 5),
    "label numpy (1,)": ((RGB, np.array([5])), RGB, 5),
    "label 0": ((RGB, 0), RGB, 0),
}


@pytest.mark.parametrize("name", list(ACCEPTED_ITEMS))
def test_sample_of_accepts(name):
    item, image, label = ACCEPTED_ITEMS[name]
    got_image, got_label = sample_of(item)
    assert got_image.dtype == np.uint8 and got_image.shape == image.shape[:2] + (3,)
    assert got_image.flags.c_contiguous
    np.testing.assert_array_equal(got_image, image)
    assert type(got_label) is int and got_label == label


def test_sample_of_keys():
    image, label = sample_of({"img": Image.fromarray(RGB), "fine_label": 9, "coarse_label": 1},
                             image_key="img", label_key="fine_label")
    np.testing.assert_array_equal(image, RGB)
    assert label == 9


# --- sample_of: every rejected item ---------------------------------------------------

REJECTED = {  # name: (item, error, message start)
    "int": (3, TypeError, r"dataset item of type int is not accepted; "),
    "path string": ("cat.png", TypeError, r"dataset item of type str is not accepted; "),
    "None": (None, TypeError, r"dataset item of type NoneType is not accepted; "),
    "1-tuple": ((RGB,), TypeError, r"dataset item of type tuple is not accepted; "),
    "dict without the keys": ({"img": RGB, "label": 0}, TypeError,
                              r"dataset item of type dict has keys \['img', 'label'\], lacking "
                              r"image_key='image' or label_key='label' \(pass the right ones\); "),
    "HF undecoded image": ({"image": {"bytes": b"\x89PNG", "path": None}, "label": 0}, TypeError,
                           r"dataset item of type dict: image of type dict is not accepted; "),
    "path image": (("cat.png", 0), TypeError,
                   r"dataset item of type tuple: image of type str is not accepted; "),
    "float HxWx3": ((RGB / 255, 0), TypeError, r"dataset item of type tuple: image of type "
                    r"numpy.ndarray float64 \(6, 8, 3\) is not accepted; "),
    "float HxW": ((GRAY.astype(np.float32) / 255, 0), TypeError,
                  r"dataset item of type tuple: image of type numpy.ndarray float32 \(6, 8\)"),
    "uint16 array": ((GRAY.astype(np.uint16), 0), TypeError,
                     r"dataset item of type tuple: image of type numpy.ndarray uint16 \(6, 8\)"),
    "int64 tensor": ((torch.from_numpy(RGB).long(), 0), TypeError, r"dataset item of type "
                     r"tuple: image of type torch.Tensor torch.int64 \(6, 8, 3\)"),
    "uint8 HxWx2": ((RGBA[..., :2], 0), TypeError,
                    r"dataset item of type tuple: image of type numpy.ndarray uint8 \(6, 8, 2\)"),
    "batch of one": ((RGB[None], 0), TypeError, r"dataset item of type tuple: image of type "
                     r"numpy.ndarray uint8 \(1, 6, 8, 3\)"),
    "normalised tensor": (((to_tensor(RGB) - 0.5) / 0.25, 0), ValueError,
                          r"image: a float torch.Tensor torch.float32 \(3, 6, 8\) with values "
                          r"-[\d.]+\.\.[\d.]+; expected 0\.\.1 \(ToTensor's scale\), "
                          r"not clipped here"),
    "0..255 floats": ((RGB.transpose(2, 0, 1).astype(np.float32), 0), ValueError,
                      r"image: a float numpy.ndarray float32 \(3, 6, 8\) with values "
                      r"[\d.]+\.\.[\d.]+; expected 0\.\.1"),
    "NaN": ((np.full((3, 6, 8), np.nan, np.float32), 0), ValueError,
            r"image: a float numpy.ndarray float32 \(3, 6, 8\) with values nan\.\.nan; "
            r"expected 0\.\.1"),
    "PIL F above 255": ((Image.fromarray(GRAY.astype(np.float32) * 4), 0), ValueError,
                        r"image: a PIL 'F' image with values [\d.]+\.\.[\d.]+; expected 0\.\.255"),
    "label float": ((RGB, 1.0), ValueError, r"label 1\.0 \(float\): expected a non-negative "
                    r"integer class id \(int, numpy or torch integer scalar\)$"),
    "label numpy float": ((RGB, np.float32(2)), ValueError, r"label np\.float32\(2\.0\) \(numpy"),
    "label torch float": ((RGB, torch.tensor(2.0)), ValueError, r"label tensor\(2\.\) \(torch"),
    "label bool": ((RGB, True), ValueError, r"label True \(bool\): expected a non-negative"),
    "label negative": ((RGB, -1), ValueError, r"label -1 \(int\): expected a non-negative integer "
                       r"class id .*\(Hugging Face marks unlabelled samples -1\)$"),
    "label 2 elements": ((RGB, np.array([1, 2])), ValueError,
                         r"label array\(\[1, 2\]\) \(numpy.ndarray int64 \(2,\)\): expected"),
    "label torch 2 elements": ((RGB, torch.tensor([1, 2])), ValueError,
                               r"label tensor\(\[1, 2\]\)"),
    "label string": ((RGB, "cat"), ValueError, r"label 'cat' \(str\): expected"),
    "label None": ((RGB, None), ValueError, r"label None \(NoneType\): expected"),
}


@pytest.mark.parametrize("name", list(REJECTED))
def test_sample_of_rejects(name):
    item, error, message = REJECTED[name]
    with pytest.raises(error, match=f"^{message}") as e:
        sample_of(item)
    if error is TypeError:  # what is accepted, listed in full
        assert re.search(ACCEPTED, str(e.value)) and str(e.value).endswith(
            "labels: non-negative integers (int, numpy or torch integer scalars)")
    assert "\n" not in str(e.value)


def test_a_bad_item_fails_the_write_naming_it(ffcv, tmp_path):
    images, labels = digits(150, 8)
    items = [(image, int(label)) for image, label in zip(images, labels)]
    items[120] = (images[120].astype(np.float32), 0)
    for workers in (1, 2):  # also across a reading process
        with pytest.raises(TypeError, match=r"^writing b\.beton failed, nothing was written: "
                                            r"dataset\[120\]: dataset item of type tuple: image "
                                            r"of type numpy.ndarray float32 \(8, 8\)"):
            data.write_beton(items, tmp_path / "b.beton", num_workers=workers, progress=False)
    items[120] = (images[120], -1)
    with pytest.raises(ValueError, match=r"^writing b\.beton failed, nothing was written: "
                                         r"dataset\[120\]: label -1 \(int\)"):
        data.write_beton(items, tmp_path / "b.beton", num_workers=2, progress=False)
    assert list(tmp_path.iterdir()) == []


# --- Hugging Face datasets ------------------------------------------------------------

def hugging_face(images, labels, names, image_key="image", label_key="label"):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({image_key: datasets.Image(),
                                  label_key: datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict({image_key: images, label_key: labels.tolist()},
                                      features=features)


def test_hugging_face_dataset(ffcv, tmp_path):
    images, pixels, labels, names = mixed()
    hf = hugging_face(images, labels, names)
    assert {im.mode for im in images} == {"L", "RGB"}  # grayscale and colour in one dataset
    path = data.write_beton(hf, tmp_path / "hf.beton", num_workers=1, progress=False)
    assert data.read_classes(path) == names and data.read_wnids(path) is None
    got, got_labels = collect(data.eval_loader(path, 8, resolution=32, num_workers=2, **UNIT))
    np.testing.assert_array_equal(got_labels, labels)
    np.testing.assert_array_equal(got, pixels)  # raw storage: exact

    # The same samples in HF's other formats (numpy arrays, torch CHW tensors), under
    # other keys, in another processes' count: the same bytes.
    same = [data.write_beton(hf.with_format("numpy"), tmp_path / "np.beton", progress=False),
            data.write_beton(hf.with_format("torch"), tmp_path / "pt.beton", progress=False),
            data.write_beton(hugging_face(images, labels, names, "img", "fine_label"),
                             tmp_path / "keys.beton", image_key="img", label_key="fine_label",
                             num_workers=2, progress=False)]
    for other in same:
        assert sha256(other) == sha256(path)
        assert sha256(data.classes_path(other)) == sha256(data.classes_path(path))
    assert data.channel_stats(hf) == data.channel_stats(path)


def test_hugging_face_mistakes(ffcv, tmp_path):
    datasets = pytest.importorskip("datasets")
    images, _, labels, names = mixed(1)
    hf = hugging_face(images, labels, names)
    with pytest.raises(TypeError, match=r"^dataset: a DatasetDict with keys \['test', 'train'\]; "
                                        r"expected one map-style dataset, e.g. dataset\['train'\]"):
        data.write_beton(datasets.DatasetDict({"train": hf, "test": hf}), tmp_path / "d.beton")
    with pytest.raises(TypeError, match=r"^writing d\.beton failed, nothing was written: "
                                        r"dataset\[0\]: dataset item of type dict has keys "
                                        r"\['image', 'label'\], lacking image_key='img'"):
        data.write_beton(hf, tmp_path / "d.beton", image_key="img", progress=False)
    unlabelled = datasets.Dataset.from_dict(  # a test split, as Hugging Face ships them
        {"image": images, "label": [-1] * len(images)},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}))
    with pytest.raises(ValueError, match=r"dataset\[0\]: label -1 .*unlabelled samples -1\)$"):
        data.write_beton(unlabelled, tmp_path / "d.beton", progress=False)
    assert list(tmp_path.iterdir()) == []


# --- torchvision and plain datasets ---------------------------------------------------

def image_tree(root, images, labels, names):
    """An ImageFolder tree of PNGs (grayscale stays mode L on disk)."""
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:03d}.png")
    return root


def test_torchvision_datasets(ffcv, tmp_path):
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import ToTensor

    images, pixels, labels, names = mixed()
    root = image_tree(tmp_path / "tree", images, labels, names)
    folder = ImageFolder(str(root))
    path = data.write_beton(folder, tmp_path / "folder.beton", progress=False)
    assert data.read_classes(path) == folder.classes == sorted(names)
    # ImageFolder's order: by class folder, then file name (our index i)
    order = sorted(range(len(images)), key=lambda i: (names[labels[i]], i))
    got, got_labels = collect(data.eval_loader(path, 8, resolution=32, num_workers=2, **UNIT))
    np.testing.assert_array_equal(got, pixels[order])
    np.testing.assert_array_equal([folder.classes[k] for k in got_labels],
                                  [names[labels[i]] for i in order])

    # ToTensor's float (3, H, W) 0..1 gives back the same pixels, so the same bytes; and
    # so does the CLI's write_image_folder.
    floats = ImageFolder(str(root), transform=ToTensor())
    assert floats[0][0].dtype == torch.float32
    for other in (data.write_beton(floats, tmp_path / "floats.beton", progress=False),
                  data.write_image_folder(root, tmp_path / "cli.beton", progress=False)):
        assert sha256(other) == sha256(path)
        assert data.read_classes(other) == sorted(names)


def test_plain_list_of_mixed_forms(ffcv, tmp_path):
    images, pixels, labels, _ = mixed(2)
    forms = [lambda im: im, np.asarray, to_tensor, lambda im: torch.from_numpy(np.array(im)),
             lambda im: np.asarray(im.convert("RGBA"))]
    items = [(forms[i % len(forms)](im), [int, np.int64, torch.tensor][i % 3](label))
             for i, (im, label) in enumerate(zip(images, labels))]
    path = data.write_beton(items, tmp_path / "list.beton", progress=False)
    assert data.read_classes(path) is None  # a list carries no class names
    got, got_labels = collect(data.eval_loader(path, 8, resolution=32, num_workers=2, **UNIT))
    np.testing.assert_array_equal(got, pixels)
    np.testing.assert_array_equal(got_labels, labels)


# --- ImageNet's WordNet ids -----------------------------------------------------------

WNIDS = [f"n{1440764 + 9973 * i:08d}" for i in range(1000)]  # sorted, n + 8 digits


def test_imagenet_wnids_get_readable_names(ffcv, tmp_path, monkeypatch):
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    tiny, _ = patches(500, 4)  # 1000 real 4x4 patches, one a folder
    for wnid, patch in zip(WNIDS, tiny):
        (tmp_path / "train" / wnid).mkdir(parents=True)
        Image.fromarray(patch).save(tmp_path / "train" / wnid / "0.png")
    path = data.write_image_folder(tmp_path / "train", tmp_path / "in.beton", progress=False)
    assert data.read_classes(path) == list(_IMAGENET_CATEGORIES)
    assert data.read_classes(path)[:2] == ["tench", "goldfish"]
    assert data.read_wnids(path) == WNIDS
    np.testing.assert_array_equal(data.read_columns(path)["labels"], np.arange(1000))
    # A biased copy keeps both.
    biased = tmp_path / "biased.beton"
    data.write_biased(path, data.BiasSpec(label_noise=0.5), biased, progress=False)
    assert data.read_classes(biased) == list(_IMAGENET_CATEGORIES)
    assert data.read_wnids(biased) == WNIDS

    # Only exactly 1000 sorted wnids are ImageNet's; anything else is stored as given.
    two = [(tiny[0], 0), (tiny[1], 1)]
    for classes in (WNIDS[:999], WNIDS[::-1], WNIDS[:999] + ["zebra"], WNIDS[:999] + WNIDS[:1]):
        out = data.write_beton(two, tmp_path / "x.beton", classes=classes, progress=False)
        assert data.read_classes(out) == classes and data.read_wnids(out) is None
    # Without torchvision's list, the wnids are the names.
    monkeypatch.setitem(sys.modules, "torchvision.models._meta", None)
    out = data.write_beton(two, tmp_path / "x.beton", classes=WNIDS, progress=False)
    assert data.read_classes(out) == WNIDS and data.read_wnids(out) == WNIDS


# --- eval_loader's crop_ratio ---------------------------------------------------------

def test_crop_ratio(ffcv, tmp_path):
    import cv2

    photo = np.asarray(Image.fromarray(photos()[1]).resize((96, 64), Image.BILINEAR))  # (64, 96)
    path = data.write_beton([(photo, 0)], tmp_path / "p.beton", progress=False)

    def crop(ratio, resolution):
        pixels, _ = collect(data.eval_loader(path, 1, resolution=resolution, crop_ratio=ratio,
                                             num_workers=1, **UNIT))
        return pixels[0]

    def reference(ratio):  # the centre square of side ratio x the short side
        side = int(ratio * 64)
        top, left = (64 - side) // 2, (96 - side) // 2
        return photo[top:top + side, left:left + side]

    # ImageNet's "resize 256, centre crop 224" at this size: 56 of 64, no resize after.
    np.testing.assert_array_equal(crop(0.875, 56), reference(0.875))
    np.testing.assert_array_equal(crop(1.0, 64), reference(1.0))
    np.testing.assert_array_equal(crop(0.5, 32), photo[16:48, 32:64])
    # With a resize after the crop: cv2's INTER_AREA, as ffcv.
    expected = cv2.resize(reference(0.875), (28, 28), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(crop(0.875, 28), expected)
    assert not np.array_equal(crop(0.875, 28), crop(1.0, 28))

    for bad in (0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match=rf"^crop_ratio={re.escape(repr(bad))}: expected "
                                             rf"0 < crop_ratio <= 1"):
            data.eval_loader(path, 1, resolution=8, crop_ratio=bad, **UNIT)
