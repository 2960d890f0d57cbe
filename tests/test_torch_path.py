"""fastvote without FFCV: the numpy beton format (both ways compatible with FFCV 1.0.2),
the torch DataLoader loaders (FFCV's order and batches), set_resolution on both
backends, and a whole run in a process where ``import ffcv`` (and cv2) fail."""
import glob
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastvote import data
from fastvote.data import format as beton_format
from fastvote.data import torch_loaders

ROOT = str(Path(__file__).resolve().parents[1])
PHOTOS = sorted(glob.glob("/usr/share/doc/opencv-doc/examples/data/*.jpg"))
needs_photos = pytest.mark.skipif(len(PHOTOS) < 12, reason="apt-get install opencv-doc (setup.sh)")
IMAGENET = dict(mean=data.IMAGENET_MEAN, std=data.IMAGENET_STD)


def ffcv():
    return pytest.importorskip("ffcv", reason="FFCV is not installed: pip install ffcv==1.0.2")


@pytest.fixture
def backend(monkeypatch, request):
    """FASTVOTE_LOADER set to the parameter ("ffcv" skips without FFCV)."""
    if request.param == "ffcv":
        ffcv()
    monkeypatch.setenv("FASTVOTE_LOADER", request.param)
    monkeypatch.setattr("fastvote.data.loaders._warned", True)  # the warning has its own test
    return request.param


def photo_items(count=12, side=None):
    """Real photos of varied sizes as (uint8 RGB, label) items, optionally shrunk."""
    items = []
    for i, path in enumerate(PHOTOS[:count]):
        image = Image.open(path).convert("RGB")
        if side:
            image.thumbnail((side, side), Image.Resampling.BOX)
        items.append((np.asarray(image), i % 3))
    return items


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A raw beton of 12 photos (long side 96) and a JPEG one, written by fastvote."""
    root = tmp_path_factory.mktemp("photos")
    items = photo_items()
    return {"items": items,
            "raw": data.write_beton(items, root / "raw.beton", max_resolution=96,
                                    num_workers=1, progress=False),
            "jpeg": data.write_beton(items, root / "jpeg.beton", max_resolution=96, jpeg=True,
                                     num_workers=1, progress=False)}


def batches(loader):
    return [tuple(t.clone() for t in batch) for batch in loader]


# --- (b) the format, both ways ----------------------------------------------------------

@needs_photos
@pytest.mark.parametrize("jpeg", [False, True])
def test_our_encoding_is_ffcvs(jpeg):
    # With cv2 installed, format.encode stores exactly the bytes of FFCV's RGBImageField.
    ffcv()
    from ffcv.fields import RGBImageField

    field = RGBImageField(write_mode="jpg" if jpeg else "raw", max_resolution=100, jpeg_quality=90)
    for image, _ in photo_items(4):
        stored = []
        row = np.zeros(1, field.metadata_type)
        field.encode(row, image, lambda size: (0, stored.append(np.empty(size, np.uint8))
                                               or stored[-1]))
        mode, height, width, ours = beton_format.encode(image, jpeg=jpeg, quality=90,
                                                        max_resolution=100)
        assert (mode, height, width) == (row["mode"][0], row["height"][0], row["width"][0])
        assert np.array_equal(ours, stored[0])


@needs_photos
@pytest.mark.parametrize("jpeg", [False, True])
def test_ffcv_reads_our_betons(tmp_path, jpeg):
    ffcv()
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.reader import Reader

    # one size (FFCV's SimpleRGBImageDecoder needs it), not square
    items = [(np.asarray(Image.fromarray(image).resize((80, 60))), label)
             for image, label in photo_items(8)]
    path = data.write_beton(items, tmp_path / "b.beton", jpeg=jpeg, num_workers=1,
                            progress=False)
    reader = Reader(str(path))
    assert reader.field_names == ["image", "label", "identifier"]
    assert reader.page_size == beton_format.MIN_PAGE_SIZE  # no sample is larger
    ours = list(data.iter_samples(path))
    for (image, label, identifier), (want, want_label), i in zip(ours, items, range(99)):
        assert (label, identifier) == (want_label, i) and image.shape == want.shape
        if jpeg:
            # JPEG q90 of small detailed photos
            assert np.abs(image.astype(int) - want).mean() < 8
        else:
            assert np.array_equal(image, want)
    loader = Loader(str(path), batch_size=3, num_workers=1, order=OrderOption.SEQUENTIAL,
                    drop_last=False,
                    pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()],
                               "identifier": [IntDecoder()]})
    theirs = [(image.copy(), label.copy(), identifier.copy()) for image, label, identifier in loader]
    images, labels, identifiers = (np.concatenate(column) for column in zip(*theirs))
    assert labels[:, 0].tolist() == [label for _, label, _ in ours]
    assert identifiers[:, 0].tolist() == list(range(8))
    mine = np.stack([image for image, _, _ in ours])
    if jpeg:  # turbojpeg against cv2's libjpeg: the same image, up to IDCT and upsampling
        difference = np.abs(images.astype(int) - mine)
        assert difference.mean() < 1 and difference.max() <= 16
    else:
        assert np.array_equal(images, mine)


@needs_photos
@pytest.mark.parametrize("jpeg", [False, True])
def test_we_read_ffcvs_betons(tmp_path, jpeg):
    ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    items = [(image, label, 100 + i) for i, (image, label) in enumerate(photo_items(8, 80))]
    path = tmp_path / "ffcv.beton"
    fields = {"image": RGBImageField(write_mode="jpg" if jpeg else "raw"), "label": IntField(),
              "identifier": IntField()}
    DatasetWriter(str(path), fields, num_workers=2).from_indexed_dataset(items)
    columns = data.read_columns(path)
    # ffcv's workers may place the samples in any order on disk; the metadata keeps file order
    assert columns["labels"].tolist() == [label for _, label, _ in items]
    assert columns["identifiers"].tolist() == list(range(100, 108))
    for (image, label, identifier), (want, want_label, want_id) in zip(data.iter_samples(path),
                                                                       items):
        assert (label, identifier) == (want_label, want_id)
        if jpeg:
            assert image.shape == want.shape and np.abs(image.astype(int) - want).mean() < 8
        else:
            assert np.array_equal(image, want)


def test_page_size_fits_the_largest_sample(tmp_path):
    assert beton_format.page_size(0) == beton_format.page_size(5) == 1 << 21
    assert beton_format.page_size((1 << 21) + 1) == 1 << 22
    assert beton_format.page_size(1 << 22) == 1 << 22
    # a 1200x1100 raw image is 3.96 MB: a 4 MiB page; the file is not padded past its data
    big = np.random.default_rng(0).integers(0, 256, (1200, 1100, 3), dtype=np.uint8)
    small, tiny = big[:300, :300].copy(), big[:40, :40].copy()
    path = data.write_beton([(small, 0), (big, 1), (tiny, 2)], tmp_path / "b.beton",
                            num_workers=1, progress=False)
    reader = beton_format.Reader(path)
    assert reader.page_size == 1 << 22
    pointers = reader.columns["image"]["data_ptr"].astype(int)
    assert pointers[0] == 1 << 22 and pointers[1] == 2 << 22  # big does not fit after small
    assert pointers[2] == pointers[1] + big.nbytes            # tiny does
    assert os.path.getsize(path) == pointers[2] + tiny.nbytes + 3 * beton_format.ALLOCATION.itemsize
    assert [np.array_equal(a, b) for (a, _, _), b in
            zip(data.iter_samples(path), [small, big, tiny])] == [True] * 3


@needs_photos
def test_without_cv2_pil_resizes_and_codes_as_cv2_up_to_rounding(monkeypatch):
    cv2 = pytest.importorskip("cv2")
    image = photo_items(1)[0][0]
    with_cv2 = (beton_format.resize(image, 100), torch_loaders.resize_to(image[:90, :90], 40),
                torch_loaders.resize_to(image[:30, :30], 40))
    monkeypatch.setattr(beton_format, "_cv2", lambda: None)
    with_pil = (beton_format.resize(image, 100), torch_loaders.resize_to(image[:90, :90], 40),
                torch_loaders.resize_to(image[:30, :30], 40))
    for ours, theirs in zip(with_pil, with_cv2):  # BOX = INTER_AREA shrinking; bilinear growing
        difference = np.abs(ours.astype(int) - theirs)
        assert ours.shape == theirs.shape and difference.mean() < 2.5, difference.mean()
    coded = beton_format.encode(image, jpeg=True, quality=90, max_resolution=None)[3]
    assert bytes(coded[:2]) == b"\xff\xd8"  # a JPEG, PIL's
    decoded = beton_format.decode_jpeg(coded)  # by PIL too
    assert decoded.shape == image.shape and np.abs(decoded.astype(int) - image).mean() < 3


# --- (c) the torch loaders: FFCV's order and batches --------------------------------------

def test_random_crop_is_ffcvs_rule():
    # The same uniform draws give the same crops as FFCV's get_random_crop.
    ffcv()
    from ffcv.fields.rgb_image import get_random_crop

    class Legacy:  # a Generator's uniform() on numpy's global state, as FFCV draws
        uniform = staticmethod(np.random.uniform)

    for seed, (h, w) in enumerate([(50, 80), (80, 50), (13, 300), (300, 13), (64, 64)]):
        for scale, ratio in [((0.08, 1.0), (3 / 4, 4 / 3)), ((1.0, 1.0), (1.0, 1.0)),
                             ((0.9, 1.0), (2.0, 3.0))]:
            np.random.seed(seed)
            theirs = [get_random_crop(h, w, np.array(scale), np.array(ratio)) for _ in range(20)]
            np.random.seed(seed)
            ours = [torch_loaders.random_crop(h, w, scale, ratio, Legacy) for _ in range(20)]
            assert ours == theirs


def order_of(loader):
    return [b[-1].tolist() for b in loader]


@needs_photos
def test_order_and_eval_batches_equal_ffcvs(photos, monkeypatch):
    ffcv()
    monkeypatch.setattr("fastvote.data.loaders._warned", True)
    cases = [dict(order="sequential"), dict(order="random", seed=7),
             dict(order="random", seed=7, indices=[9, 3, 1, 4, 0, 5, 2], drop_last=True),
             dict(order="sequential", indices=[5, 4, 3, 2, 1])]
    for kind in ["raw", "jpeg"]:
        for case in cases:
            loaders = {}
            for name in ["ffcv", "torch"]:
                monkeypatch.setenv("FASTVOTE_LOADER", name)
                # native resolution (long side 96, short sides vary), crop ratio 1
                loaders[name] = data.eval_loader(photos[kind], 3, resolution=72, num_workers=2,
                                                 with_identifier=True, **IMAGENET, **case)
            assert len(loaders["ffcv"]) == len(loaders["torch"]), case
            for epoch in range(2):  # each epoch its own order, the next one
                ffcv_batches, torch_batches = batches(loaders["ffcv"]), batches(loaders["torch"])
                assert [b[2].tolist() for b in ffcv_batches] == [b[2].tolist() for b in torch_batches]
                for (image, label, _), (mine, my_label, _) in zip(ffcv_batches, torch_batches):
                    assert torch.equal(label, my_label) and my_label.dtype == torch.int64
                    assert mine.dtype == torch.float32 and mine.shape == image.shape
                    assert mine.is_contiguous(memory_format=torch.channels_last)
                    if kind == "raw":  # cv2's INTER_AREA on both sides: bit for bit
                        assert torch.equal(image, mine)
                    else:  # turbojpeg against cv2's decoder
                        assert (image - mine).abs().mean() < 0.05
            assert loaders["torch"].next_epoch == loaders["ffcv"].next_epoch == 2


def test_distributed_shards_and_train_order_equal_ffcvs(photos, monkeypatch):
    # torch.distributed as 3 ranks (FFCV and we both ask torch's DistributedSampler).
    ffcv()
    monkeypatch.setattr("fastvote.data.loaders._warned", True)
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a: 3)
    for rank in range(3):
        monkeypatch.setattr(torch.distributed, "get_rank", lambda *a: rank)
        for order in ["random", "sequential"]:
            orders = {}
            for name in ["ffcv", "torch"]:
                monkeypatch.setenv("FASTVOTE_LOADER", name)
                loader = data.train_loader(photos["raw"], 2, resolution=16, num_workers=1,
                                           order=order, seed=5, distributed=True,
                                           with_identifier=True, drop_last=False,
                                           indices=[0, 2, 3, 5, 6, 7, 8, 9, 10, 11], **IMAGENET)
                loader.next_epoch = 3  # as fastvote.train.set_loader_epoch
                orders[name] = order_of(loader)
            assert orders["ffcv"] == orders["torch"] and sum(map(len, orders["torch"])) == 4


def test_torch_train_loader_crops_are_seeded(photos, monkeypatch):
    monkeypatch.setattr("fastvote.data.loaders._warned", True)
    monkeypatch.setenv("FASTVOTE_LOADER", "torch")
    made = [data.train_loader(photos["jpeg"], 4, resolution=24, num_workers=w, seed=1,
                              with_identifier=True, **IMAGENET) for w in (1, 2)]
    one, two = batches(made[0]), batches(made[1])
    assert len(one) == 3 and all(torch.equal(a, b) for x, y in zip(one, two) for a, b in zip(x, y))
    assert one[0][0].shape == (4, 3, 24, 24)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(one, batches(made[0])))  # epoch 1


# --- (d) set_resolution -----------------------------------------------------------------

@needs_photos
@pytest.mark.parametrize("backend", ["ffcv", "torch"], indirect=True)
def test_set_resolution(photos, backend):
    loader = data.train_loader(photos["raw"], 4, resolution=32, num_workers=2, **IMAGENET)
    assert data.backend() == backend
    assert {b[0].shape[-1] for b in loader} == {32}
    data.set_resolution(loader, 48)
    assert [tuple(b[0].shape) for b in loader] == [(4, 3, 48, 48)] * 3
    evaluate = data.eval_loader(photos["jpeg"], 5, resolution=40, num_workers=2, **IMAGENET)
    next(iter(evaluate))
    data.set_resolution(evaluate, 56)
    fresh = data.eval_loader(photos["jpeg"], 5, resolution=56, num_workers=2, **IMAGENET)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches(evaluate), batches(fresh)))
    with pytest.raises(ValueError, match=r"resolution=0: expected an int >= 1"):
        data.set_resolution(loader, 0)
    with pytest.raises(TypeError, match=r"loader: a list; expected one made by"):
        data.set_resolution([], 32)


def test_backend_choice(monkeypatch):
    monkeypatch.setenv("FASTVOTE_LOADER", "torch")
    assert data.backend() == "torch"
    monkeypatch.setenv("FASTVOTE_LOADER", "jax")
    with pytest.raises(ValueError, match=r"FASTVOTE_LOADER='jax': expected one of \['ffcv', "
                                         r"'torch'\] or unset"):
        data.backend()
    monkeypatch.setenv("FASTVOTE_LOADER", "ffcv")
    monkeypatch.setitem(sys.modules, "ffcv", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"pip install ffcv==1\.0\.2"):
        data.backend()
    monkeypatch.delenv("FASTVOTE_LOADER")
    assert data.backend() == "torch"


# --- (a) a whole run where ffcv (and cv2) cannot be imported ------------------------------

HIDDEN_RUN = textwrap.dedent("""
    import importlib.abc, json, sys, warnings

    class Hide(importlib.abc.MetaPathFinder):  # as if ffcv and cv2 were not installed
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("ffcv", "cv2"):
                raise ImportError(f"No module named {name!r} (hidden by the test)")

    sys.meta_path.insert(0, Hide())
    warnings.simplefilter("always")
    import numpy as np, torch
    from PIL import Image
    import fastvote
    from fastvote import data, train

    root, photos = sys.argv[1], sys.argv[2:]
    out = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, path in enumerate(photos):  # an ImageFolder of real photos, 3 classes
            folder = f"{root}/tree/c{i % 3}"
            __import__("os").makedirs(folder, exist_ok=True)
            Image.open(path).convert("RGB").save(f"{folder}/{i}.jpg")
        beton = data.write_image_folder(f"{root}/tree", f"{root}/photos.beton", jpeg=True,
                                        max_resolution=80, num_workers=2, progress=False)
        mean, std = data.channel_stats(beton)
        shapes = []
        for make in (data.train_loader, data.eval_loader):
            loader = make(beton, 4, resolution=48, mean=mean, std=std, num_workers=2)
            images, labels = next(iter(loader))
            shapes.append([list(images.shape), str(images.dtype), str(labels.dtype),
                           images.is_contiguous(memory_format=torch.channels_last), len(loader)])
        out["shapes"] = shapes
        source = data.write_offline("haystack", "train", f"{root}/haystack.beton", per_class=20,
                                    progress=False)
        target = data.write_offline("digits", "train", f"{root}/digits.beton", progress=False)
        result = fastvote.prune(source, target, method="lm", keep=10, arch="tiny", image_size=16,
                                train_config=train.TrainConfig(epochs=2, batch_size=64, lr=0.2),
                                device="cpu", workdir=f"{root}/work", progress=False)
        kept = result.loader(batch_size=100, train=False, with_identifier=True)
        seen = torch.cat([ids for _, _, ids in kept]).sort().values
        out["kept"] = len(result.kept_classes)
        out["subset_ok"] = bool(torch.equal(seen, result.indices.sort().values))
    out["warnings"] = [str(w.message) for w in caught if "torch DataLoaders" in str(w.message)]
    out["backend"] = data.backend()
    out["imported"] = sorted({m.split(".")[0] for m in sys.modules} & {"ffcv", "cv2"})
    print(json.dumps(out))
""")


@needs_photos
@pytest.mark.skipif(bool(data.missing("haystack") or data.missing("digits")),
                    reason="offline datasets missing: fastvote.data.missing('haystack')")
def test_end_to_end_without_ffcv_or_cv2(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "FASTVOTE_LOADER"}
    done = subprocess.run([sys.executable, "-c", HIDDEN_RUN, str(tmp_path), *PHOTOS[:12]],
                          env={**env, "PYTHONPATH": ROOT}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["imported"] == [] and out["backend"] == "torch"
    assert out["shapes"] == [[[4, 3, 48, 48], "torch.float32", "torch.int64", True, 3],
                             [[4, 3, 48, 48], "torch.float32", "torch.int64", True, 3]]
    assert out["kept"] == 10 and out["subset_ok"]
    assert len(out["warnings"]) == 1 and "FFCV is not installed" in out["warnings"][0]
    assert "pip install ffcv==1.0.2" in out["warnings"][0]
