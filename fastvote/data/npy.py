"""Row-chunked ``.npy`` files: surrogate outputs (features, logits, labels) for
sources whose outputs do not fit in memory.

Reads go through ``pread`` into fresh buffers, not a memory map: the pages of
a mapped file count in the process's resident memory as they are touched, so
a pass over a 20 GB memmap looks like a 20 GB process; here a pass holds one
chunk. Writes append rows to a partial file beside the target (named by
``fastvote.atomic.temp_name``, with the writer's pid) and rename it into place
when every row is there, so a reader never sees a half-written file; a new
writer deletes the partial files of writers that died.

    rows = NpyRows("features.npy")              # [N, D], header only
    for chunk in rows.chunks(range(len(rows)), 65536):
        ...
    with NpyWriter("out.npy", (n, 512), np.float32) as w:
        w.write(block)                           # in row order
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence, Tuple

import numpy as np

from ..atomic import atomic_path, naming, remove_stale

__all__ = ["NpyRows", "NpyWriter"]


class NpyRows:
    """A C-ordered ``.npy`` file read by rows: ``shape``, ``dtype``, ``len``,
    ``read(start, stop)`` and ``chunks(rows, size)``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} does not exist")
        with open(self.path, "rb") as f:
            try:
                version = np.lib.format.read_magic(f)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                               (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if read_header is None:
                    raise ValueError(f"format version {version}; expected 1.0 or 2.0")
                shape, fortran, dtype = read_header(f)
            except ValueError as e:
                raise ValueError(f"{self.path} is not a .npy file ({e})") from None
            self.offset = f.tell()
        if fortran and len(shape) > 1:
            raise ValueError(f"{self.path} is Fortran-ordered; expected C order (rows contiguous)")
        if dtype.hasobject or len(shape) == 0:
            raise ValueError(f"{self.path} holds {dtype} of shape {shape}; expected a numeric array "
                             "with one row per sample")
        self.shape: Tuple[int, ...] = tuple(shape)
        self.dtype = dtype
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        expected = self.offset + self.row_bytes * shape[0]
        if self.path.stat().st_size < expected:
            raise ValueError(f"{self.path} is truncated: {self.path.stat().st_size} bytes, expected "
                             f"{expected} for shape {shape}")

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as a new array."""
        start, stop = max(0, start), min(stop, len(self))
        out = np.empty((max(stop - start, 0), *self.shape[1:]), dtype=self.dtype)
        if len(out):
            with open(self.path, "rb", buffering=0) as f:
                view = memoryview(out.reshape(-1).view(np.uint8))
                got = 0
                while got < len(view):
                    n = os.preadv(f.fileno(), [view[got:]], self.offset + start * self.row_bytes + got)
                    if n == 0:
                        raise OSError(f"{self.path}: unexpected end of file")
                    got += n
        return out

    def chunks(self, rows: range, size: int) -> Iterator[np.ndarray]:
        """Consecutive blocks of at most `size` rows covering `rows`."""
        for start in range(rows.start, rows.stop, size):
            yield self.read(start, min(start + size, rows.stop))

    def load(self) -> np.ndarray:
        """The whole array in memory (for columns that are small, such as labels)."""
        return self.read(0, len(self))


class NpyWriter:
    """Writes a ``.npy`` of known shape row block by row block, then renames it
    into place (on ``close`` after the last row; an exception leaves nothing)."""

    def __init__(self, path: str | os.PathLike, shape: Sequence[int], dtype):
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.rows = 0
        remove_stale(self.path.parent)  # a killed pass's partial files, never a live writer's
        self._commit = atomic_path(self.path, kind="partial")
        self.partial = self._commit.__enter__()
        self._file = open(self.partial, "wb")
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_2_0(self._file, header)

    def write(self, block) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if block.shape[1:] != self.shape[1:] or self.rows + len(block) > self.shape[0]:
            raise ValueError(f"{self.path}: a block of shape {block.shape} does not fit after {self.rows} rows "
                             f"of shape {self.shape}")
        with naming(self.path):  # a full disk names the file
            self._file.write(block.tobytes())
        self.rows += len(block)

    def close(self) -> Path:
        if self.rows != self.shape[0]:
            self.abort()
            raise ValueError(f"{self.path}: {self.rows} rows written, expected {self.shape[0]}; nothing was kept")
        self._file.close()
        self._commit.__exit__(None, None, None)  # fsync, rename into place
        return self.path

    def abort(self) -> None:
        """Drops the partial file (a no-op after a successful close)."""
        self._file.close()
        # Ending atomic_path with an error makes it delete the file, not rename it.
        self._commit.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def __enter__(self) -> "NpyWriter":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()
