"""The ``.beton`` file format of FFCV 1.0.2, read and written with numpy alone.

fastvote's betons are read and written here whether FFCV is installed or not; FFCV's
Loader reads what this module writes, and this module reads what FFCV's DatasetWriter
writes (tests/test_torch_path.py checks both ways).

Layout (all little-endian): a header (version 2, number of fields, page size, number of
samples, where the allocation table starts); one 1041-byte descriptor a field (type id,
name, unused arguments); one metadata row a sample (numpy's aligned struct of the fields'
rows: an image's mode, width, height and data pointer, then int64 label and identifier);
zero padding to the first page boundary; the samples' bytes, each inside one page (a
sample that does not fit in what is left of a page starts the next one); the allocation
table, one (sample, pointer, size) row a stored sample. A page is a power of two bytes,
counted from the start of the file.

Page size: FFCV's writer pads every page to its full size and uses 8 MiB by default, so a
beton of a few small JPEGs still took two or three whole pages (a 60-image beton of 224 px
JPEGs: 25 MB). Here the page is the smallest power of two that holds the largest sample,
at least FFCV's minimum (2 MiB), and the last page ends where its last sample does.
"""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

VERSION = 2
MIN_PAGE_SIZE = 1 << 21  # FFCV's writer refuses smaller pages
MAX_PAGE_SIZE = 1 << 32  # the header stores the page size in 32 bits
MAX_SIDE = (1 << 16) - 1  # an image's width and height are 16-bit
JPG, RAW = 0, 1           # an image's storage mode
INT_FIELD, RGB_FIELD = 1, 2  # FFCV's field type ids
FLOAT_FIELD = 0

HEADER = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"),
                   ("num_samples", "<u8"), ("alloc_table_ptr", "<u8")], align=True)
FIELD = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))],
                 align=True)
ALLOCATION = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
IMAGE = np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8")])
ROW_TYPES = {FLOAT_FIELD: np.dtype("<f8"), INT_FIELD: np.dtype("<i8"), RGB_FIELD: IMAGE}
# fastvote's fields, in file order, and their types
FIELDS = (("image", RGB_FIELD), ("label", INT_FIELD), ("identifier", INT_FIELD))
EXPECTED = "expected a .beton written by fastvote.data.write_beton"


def metadata_type(types) -> np.dtype:
    """One sample's metadata row: the fields' rows as numpy's aligned struct (f0, f1, ...)."""
    return np.dtype([("", ROW_TYPES[t]) for t in types], align=True)


def _cv2():
    try:
        import cv2
    except ImportError:
        return None
    return cv2


def resize(image: np.ndarray, max_resolution: int | None) -> np.ndarray:
    """Shrink ``image`` so that its long side is ``max_resolution`` (FFCV's rule: each side
    times max_resolution / long side, truncated). cv2's INTER_AREA where cv2 is installed
    (FFCV's bytes), else PIL's BOX filter, the same area average up to rounding."""
    height, width = image.shape[:2]
    ratio = max_resolution / max(height, width) if max_resolution else 1
    if ratio >= 1:
        return image
    size = tuple((ratio * np.array([width, height])).astype(int).tolist())
    cv2 = _cv2()
    if cv2 is not None:
        return cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))


def encode_jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> JPEG bytes (uint8 1-D). cv2's encoder where installed (as
    FFCV), else PIL's: their bytes differ, which is fine, since a beton's fingerprint keys
    caches by its content."""
    cv2 = _cv2()
    if cv2 is not None:
        ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                                [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
        if not ok:
            raise ValueError(f"cv2 could not JPEG-encode an image of shape {image.shape}")
        return data.reshape(-1)
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="JPEG", quality=int(quality))
    return np.frombuffer(out.getvalue(), dtype=np.uint8)


def decode_jpeg(data: np.ndarray) -> np.ndarray:
    """JPEG bytes -> RGB uint8 (H, W, 3), with cv2 where installed, else PIL."""
    cv2 = _cv2()
    if cv2 is not None:
        return cv2.cvtColor(cv2.imdecode(np.asarray(data), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return np.asarray(Image.open(io.BytesIO(np.asarray(data).tobytes())).convert("RGB"))


def encode(image: np.ndarray, *, jpeg: bool, quality: int,
           max_resolution: int | None) -> tuple[int, int, int, np.ndarray]:
    """RGB uint8 (H, W, 3) -> (mode, height, width, stored bytes) as FFCV's RGBImageField
    stores it: shrunk to ``max_resolution``, then JPEG or raw pixels."""
    image = resize(image, max_resolution)
    height, width = image.shape[:2]
    if max(height, width) > MAX_SIDE:
        raise ValueError(f"an image of {height}x{width} px: a beton stores sides up to "
                         f"{MAX_SIDE} px; pass max_resolution=")
    data = encode_jpeg(image, quality) if jpeg else np.ascontiguousarray(image).reshape(-1)
    return (JPG if jpeg else RAW), height, width, data


def page_size(largest: int) -> int:
    """The smallest power of two that holds ``largest`` bytes, at least MIN_PAGE_SIZE."""
    return max(MIN_PAGE_SIZE, 1 << max(int(largest) - 1, 0).bit_length())


class Writer:
    """Writes fastvote's three fields to ``path`` (already open for it: the caller makes
    the write atomic): ``add`` each sample in file order, then ``finish``.

    The samples' bytes go to a spool file beside ``path`` first, since the page size (and
    so every pointer) depends on the largest one; ``finish`` lays them out in pages.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.spool: BinaryIO = tempfile.TemporaryFile(dir=self.path.parent)
        self.rows: list[tuple[int, int, int, int, int]] = []  # mode, height, width, label, id
        self.sizes: list[int] = []

    def add(self, mode: int, height: int, width: int, data: np.ndarray, label: int,
            identifier: int) -> None:
        if data.nbytes >= MAX_PAGE_SIZE:
            raise ValueError(f"an image of {height}x{width} px is stored in {data.nbytes} "
                             f"bytes, more than a beton's largest page ({MAX_PAGE_SIZE}); pass "
                             f"a smaller max_resolution= or jpeg=True")
        self.spool.write(memoryview(np.ascontiguousarray(data, dtype=np.uint8)))
        self.rows.append((mode, height, width, label, identifier))
        self.sizes.append(int(data.nbytes))

    def finish(self) -> int:
        """Write the file; returns its page size."""
        count = len(self.rows)
        sizes = np.asarray(self.sizes, dtype=np.uint64)
        page = page_size(int(sizes.max()) if count else 0)
        types = [t for _, t in FIELDS]
        fields = np.zeros(len(FIELDS), FIELD)
        for field, (name, type_id) in zip(fields, FIELDS):
            field["type_id"] = type_id
            field["name"][:len(name)] = np.frombuffer(name.encode("ascii"), np.uint8)
        metadata = np.zeros(count, metadata_type(types))
        start = HEADER.itemsize + fields.nbytes + metadata.nbytes
        pointers = _place(sizes, -(-start // page) * page, page)
        if count:
            rows = np.asarray(self.rows, dtype=np.int64)
            image = metadata["f0"]
            image["mode"], image["height"], image["width"] = rows[:, 0], rows[:, 1], rows[:, 2]
            image["data_ptr"] = pointers
            metadata["f0"] = image
            metadata["f1"], metadata["f2"] = rows[:, 3], rows[:, 4]
        table = np.zeros(count, ALLOCATION)
        table["sample_id"], table["ptr"], table["size"] = np.arange(count), pointers, sizes
        end = int(pointers[-1] + sizes[-1]) if count else start
        header = np.zeros(1, HEADER)
        header["version"], header["num_fields"], header["page_size"] = VERSION, len(FIELDS), page
        header["num_samples"], header["alloc_table_ptr"] = count, end
        with open(self.path, "wb") as out:
            out.write(header.tobytes() + fields.tobytes() + metadata.tobytes())
            self.spool.seek(0)
            for pointer, size in zip(pointers.tolist(), sizes.tolist()):
                out.write(b"\0" * (pointer - out.tell()))  # the rest of a page, zeros
                out.write(self.spool.read(size))
            out.write(b"\0" * (end - out.tell()))  # no samples: up to the first page
            out.write(table.tobytes())
        self.spool.close()
        return page

    def close(self) -> None:
        self.spool.close()


def _place(sizes: np.ndarray, first: int, page: int) -> np.ndarray:
    """Each sample's pointer when they are laid out in order from byte ``first`` (a page
    boundary), a sample that does not fit in the rest of its page starting the next."""
    pointers = np.empty(len(sizes), np.uint64)
    at = first
    for i, size in enumerate(sizes.tolist()):
        if at % page + size > page:
            at += page - at % page
        pointers[i] = at
        at += size
    return pointers


class Reader:
    """A beton's header, field names, metadata rows and allocation table (what
    ``ffcv.reader.Reader`` reads, with the same attribute names), checked: a file that is
    not a whole beton of fastvote's fields is a ValueError naming it."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        self.file_name = str(path)
        size = path.stat().st_size
        if size == 0:
            raise ValueError(f"{path} is empty (0 bytes); {EXPECTED}")
        header = np.fromfile(path, dtype=HEADER, count=1)
        if len(header) == 0 or header[0]["version"] != VERSION:
            raise ValueError(f"{path} is not an FFCV .beton (its first bytes are no format "
                             f"{VERSION} beton header); {EXPECTED}")
        self.header = header[0]
        self.num_samples = int(self.header["num_samples"])
        self.page_size = int(self.header["page_size"])
        num_fields = int(self.header["num_fields"])
        table = int(self.header["alloc_table_ptr"])
        fields_end = HEADER.itemsize + num_fields * FIELD.itemsize
        if not fields_end <= table <= size or (size - table) % ALLOCATION.itemsize:
            raise ValueError(f"{path} is truncated or damaged: it has {size} bytes and its "
                             f"header puts the allocation table at byte {table}; {EXPECTED}, "
                             f"whole")
        fields = np.fromfile(path, dtype=FIELD, count=num_fields, offset=HEADER.itemsize)
        self.field_names = [bytes(f["name"]).split(b"\0", 1)[0].decode("ascii", "replace")
                            for f in fields]
        types = fields["type_id"].tolist()
        wanted = [name for name, _ in FIELDS]
        if any(name not in self.field_names for name in wanted) or any(
                t not in ROW_TYPES for t in types) or any(
                types[self.field_names.index(name)] != t for name, t in FIELDS):
            missing = sorted(set(wanted) - set(self.field_names))
            raise ValueError(f"{path} lacks the field(s) {missing or wanted}; expected "
                             f"{wanted} (write it with fastvote.data.write_beton)")
        self.metadata_type = metadata_type(types)
        if fields_end + self.num_samples * self.metadata_type.itemsize > table:
            raise ValueError(f"{path} is truncated or damaged: its metadata runs past its "
                             f"allocation table; {EXPECTED}, whole")
        self.metadata = np.fromfile(path, dtype=self.metadata_type, count=self.num_samples,
                                    offset=fields_end)
        self.alloc_table = np.fromfile(path, dtype=ALLOCATION, offset=table)
        self.columns = {name: self.metadata[f"f{i}"] for i, name in enumerate(self.field_names)}
        pointers = self.columns["image"]["data_ptr"]
        if len(pointers) != self.num_samples or not np.isin(pointers,
                                                            self.alloc_table["ptr"]).all():
            raise ValueError(f"{path} is truncated or damaged: its metadata or allocation "
                             f"table lacks samples; {EXPECTED}, whole")
        sizes = dict(zip(self.alloc_table["ptr"].tolist(), self.alloc_table["size"].tolist()))
        self.sizes = np.array([sizes[p] for p in pointers.tolist()], dtype=np.int64)
        if self.num_samples and int((pointers.astype(np.int64) + self.sizes).max()) > table:
            raise ValueError(f"{path} is truncated or damaged: an image runs past the "
                             f"allocation table; {EXPECTED}, whole")


class Images:
    """Random access to a beton's pixels: ``images[i]`` -> RGB uint8 (H, W, 3) of file
    position ``i``. The file is mapped on first use, so forked processes map their own."""

    def __init__(self, reader: Reader):
        self.path = reader.file_name
        self.rows = reader.columns["image"]
        self.sizes = reader.sizes
        self._data = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> np.ndarray:
        if self._data is None:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        row = self.rows[i]
        start = int(row["data_ptr"])
        stored = self._data[start:start + int(self.sizes[i])]
        if row["mode"] == JPG:
            return decode_jpeg(stored)
        return np.asarray(stored).reshape(int(row["height"]), int(row["width"]), 3)

    def __getstate__(self):
        return {**self.__dict__, "_data": None}
