"""fastvote.data on bad inputs, built from real data: a file that is not a whole beton
(text, empty, truncated) given to every reader, and an ImageFolder tree with a corrupt
JPEG. Each is a one-line ValueError naming the file and what was expected (the CLI
prints it and exits 2)."""
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastvote import data

pytest.importorskip("ffcv", reason="FFCV is not installed: pip install ffcv==1.0.2")
pytestmark = pytest.mark.skipif(bool(data.missing("sklearn-digits")),
                                reason=f"fix: {data.missing('sklearn-digits')}")

UNIT = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
EXPECTED = r"expected a \.beton written by fastvote\.data\.write_beton"


@pytest.fixture(scope="module")
def digits():
    return data.get("sklearn-digits", "all").subset(np.arange(300))


@pytest.fixture(scope="module")
def good(digits, tmp_path_factory):
    return data.write_beton(digits, tmp_path_factory.mktemp("good") / "d.beton",
                            num_workers=1, progress=False)


def bad_file(kind, good, folder):
    """A file named <kind>.beton: text, empty, the first half of a good beton, or a good
    beton without its last allocation entry (its header, fields and metadata intact)."""
    path = folder / f"{kind}.beton"
    whole = good.read_bytes()
    path.write_bytes({"x": b"image,label\n0.png,3\n" * 40, "empty": b"",
                      "half": whole[:len(whole) // 2], "cut": whole[:-24]}[kind])
    return path


MESSAGES = {  # after the file's path
    "x": rf"is not an FFCV \.beton \(its first bytes are no format 2 beton header\); {EXPECTED}$",
    "empty": rf"is empty \(0 bytes\); {EXPECTED}$",
    "half": rf"is truncated or damaged: it has \d+ bytes and its header puts the allocation "
            rf"table at byte \d+; {EXPECTED}, whole$",
    "cut": rf"is truncated or damaged: its metadata or allocation table lacks samples; "
           rf"{EXPECTED}, whole$",
}
READERS = {
    "read_columns": data.read_columns,
    "eval_loader": lambda p: data.eval_loader(p, 8, resolution=8, num_workers=1, **UNIT),
    "train_loader": lambda p: data.train_loader(p, 8, resolution=8, num_workers=1, **UNIT),
    "channel_stats": data.channel_stats,
}


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("kind", list(MESSAGES))
def test_not_a_whole_beton(good, tmp_path, kind, reader):
    path = bad_file(kind, good, tmp_path)
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))} {MESSAGES[kind]}") as e:
        READERS[reader](path)
    assert "\n" not in str(e.value)


def test_the_good_beton_reads(good):
    # The same readers on the file the bad ones are cut from: no false alarm.
    assert len(data.read_columns(good)["labels"]) == 300
    assert len(data.eval_loader(good, 100, resolution=8, num_workers=1, **UNIT)) == 3


def jpeg_tree(root, digits):
    for i, (image, label) in enumerate(zip(digits.images, digits.targets)):
        folder = root / digits.classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:03d}.jpg", quality=95)
    return root


@pytest.mark.parametrize("num_workers", [1, 2])
@pytest.mark.parametrize("corrupt", ["random bytes", "truncated"])
def test_corrupt_jpeg_in_image_folder(digits, tmp_path, corrupt, num_workers):
    root = jpeg_tree(tmp_path / "tree", digits)
    real = (root / "3" / sorted(os.listdir(root / "3"))[0]).read_bytes()
    bad = root / "7" / "bad.jpg"
    bad.write_bytes(np.random.default_rng(0).bytes(2000) if corrupt == "random bytes"
                    else real[:len(real) // 2])
    reason = r"no format PIL knows" if corrupt == "random bytes" else r"[^)]+"
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match=(
            rf"^writing f\.beton failed, nothing was written: {re.escape(str(bad))} is not a "
            rf"readable image \({reason}\); expected a whole image file PIL can decode "
            rf"\(JPEG, PNG, \.\.\.\)$")):
        data.write_image_folder(root, out / "f.beton", num_workers=num_workers, progress=False)
    assert list(out.iterdir()) == []  # neither the beton nor a temporary file


def test_a_reading_process_that_dies_is_an_error_not_a_hang(digits, tmp_path):
    class Dies(data.ArrayDataset):
        def __getitem__(self, index):
            if index == 250:
                os._exit(9)  # as the OOM killer would
            return super().__getitem__(index)

    with pytest.raises(RuntimeError, match=r"writing d\.beton failed, nothing was written: "
                                           r"A process in the process pool was terminated"):
        data.write_beton(Dies(digits.images, digits.targets, digits.classes),
                         tmp_path / "d.beton", num_workers=2, progress=False)
    assert list(Path(tmp_path).iterdir()) == []
