"""Resumable passes: columns of rows written in committed chunks.

A long pass (the surrogate over a source) commits what it has computed every
two seconds (:class:`Pace`) as one ``.npy`` file per column and chunk, ``parts/<column>/
<start>-<stop>.npy`` (rows [start, stop) of the stream), each published
atomically (fastvote.atomic), so a kill loses at most the chunk in flight.
The part files' names are the index of what is covered: no index file is
rewritten by several writers (torchrun ranks commit side by side), and a part
exists only once its bytes are on disk. ``parts/key.json`` records the inputs
the pass was keyed by (input, surrogate and preprocessing fingerprints); parts
of another key are removed before a pass starts. A finished column is copied
into the pass's single ``.npy`` file and its parts removed.

Steps that are not columns (k-means' seeding and each Lloyd pass) publish
their state whole, with the key of their inputs (:func:`save_state`,
:func:`load_state`).

Ctrl-C during a pass (:func:`interruptible`) stops it at the next chunk
boundary with :class:`Interrupted`; a second Ctrl-C stops at once.

This module imports from fastvote only ``atomic`` and ``data.npy`` (storage).
"""
from __future__ import annotations

import bisect
import contextlib
import json
import os
import pickle
import re
import signal
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .atomic import atomic_path, remove_stale, write_json
from .data.npy import NpyRows, NpyWriter

__all__ = ["ChunkedColumns", "Committer", "Interrupted", "Pace", "interruptible", "chunk_seconds", "save_state",
           "load_state", "RESUME_HINT"]

_PART = re.compile(r"^(\d+)-(\d+)\.npy$")
RESUME_HINT = "interrupted; rerun the same command to resume"
CHUNK_BYTES = 256 << 20  # a chunk also ends at this size, so a fast GPU pass holds bounded memory


def chunk_seconds() -> Optional[float]:
    """FASTVOTE_CHUNK_SECONDS: the seconds of work between commits, pinned;
    None when unset (:class:`Pace` then chooses)."""
    text = os.environ.get("FASTVOTE_CHUNK_SECONDS")
    if text is None:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"FASTVOTE_CHUNK_SECONDS={text!r}; expected a positive number of seconds")
    return seconds


class Pace:
    """When a pass commits next: every 2 s of work, the most a kill loses (a
    rerun also pays ~5 s of start-up, so shorter chunks buy little), but never
    so often that commits cost over 2% of the pass (a slow disk or a large
    k-means state commits less often). FASTVOTE_CHUNK_SECONDS pins the interval.

        pace = Pace()
        if pace.due():
            with pace.committing():
                ...
    """

    SECONDS, COST_SHARE = 2.0, 0.02

    def __init__(self):
        self.pinned = chunk_seconds()
        self._since, self._cost = time.monotonic(), 0.0

    def due(self) -> bool:
        interval = self.pinned or max(self.SECONDS, self._cost / self.COST_SHARE)
        return time.monotonic() - self._since >= interval

    @contextlib.contextmanager
    def committing(self) -> Iterator[None]:
        started = time.monotonic()
        yield
        self._since = time.monotonic()
        self._cost = self._since - started


class Interrupted(KeyboardInterrupt):
    """Ctrl-C ended a pass at a chunk boundary; what was committed is kept."""

    def __init__(self, message: str = RESUME_HINT):
        super().__init__(message)


_stop = threading.Event()


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """While active, the first SIGINT only asks the pass to stop
    (:func:`check` raises at the next chunk boundary); the handler is then
    the default one again, so a second Ctrl-C stops at once. Outside the
    main thread (where Python cannot take signals) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def ask(signum, frame):
        _stop.set()
        signal.signal(signal.SIGINT, previous)

    _stop.clear()
    signal.signal(signal.SIGINT, ask)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _stop.clear()


def check() -> None:
    """Raises Interrupted if Ctrl-C asked the pass to stop."""
    if _stop.is_set():
        _stop.clear()
        raise Interrupted()


def _merge(intervals: List[Tuple[int, int]]) -> List[Tuple[int, int]]:
    merged: List[Tuple[int, int]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _intersect(x: List[Tuple[int, int]], y: List[Tuple[int, int]]) -> List[Tuple[int, int]]:
    out, i, j = [], 0, 0
    while i < len(x) and j < len(y):
        a, b = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        if a < b:
            out.append((a, b))
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return out


class ChunkedColumns:
    """The committed chunks of a pass's columns under ``folder/parts``.

        parts = ChunkedColumns(cache, key={"source": fp, "surrogate": sfp})
        parts.covered(["features", "logits"], range(0, n))   # [(start, stop), ...]
        parts.commit(start, {"features": f, "logits": l})    # rows [start, start + len(f))
        parts.read("features", start, stop)
        parts.publish("features", cache / "features.npy", range(0, n))
    """

    def __init__(self, folder: str | os.PathLike, key: dict, shared: bool = False):
        """shared: other processes (torchrun ranks, each its own rows) commit
        here at the same time; then removing one's parts leaves the folders
        and key.json (removing a folder another rank has just made, to write
        into, failed its commit, and parts without their key.json could be
        taken for another input's)."""
        self.root = Path(folder) / "parts"
        self.shared = shared
        self._listed: Dict[str, List[Tuple[int, int, Path]]] = {}
        self.key = json.loads(json.dumps(key, default=str))
        keyfile = self.root / "key.json"
        try:
            found = json.loads(keyfile.read_text())
        except (OSError, ValueError):
            found = None
        if found != self.key:
            if found is not None:  # parts of other inputs: never resumable here
                self._remove(lambda a, b: True)
            write_json(keyfile, self.key)
        for column in self._columns():
            remove_stale(column)  # chunks that killed writers left half-written

    def _columns(self) -> List[Path]:
        return [d for d in self.root.iterdir() if d.is_dir()] if self.root.is_dir() else []

    def _parts(self, column: str, fresh: bool = False) -> List[Tuple[int, int, Path]]:
        """The column's committed parts, sorted: listed once, then kept up to
        date by commit (fresh=True lists again, for parts other ranks wrote)."""
        if fresh or column not in self._listed:
            folder, found = self.root / column, []
            if folder.is_dir():
                for path in folder.iterdir():
                    match = _PART.match(path.name)
                    if match:
                        found.append((int(match.group(1)), int(match.group(2)), path))
            self._listed[column] = sorted(found)
        return self._listed[column]

    def covered(self, columns: Sequence[str], rows: range) -> List[Tuple[int, int]]:
        """The intervals of `rows` that every column has committed."""
        result = [(rows.start, rows.stop)]
        for column in columns:
            result = _intersect(result, _merge([(a, b) for a, b, _ in self._parts(column)]))
        return result

    def commit(self, start: int, arrays: Dict[str, np.ndarray], stop: Optional[int] = None) -> None:
        """Publishes rows [start, stop) of each column (one atomic file each);
        stop defaults to start + len(block). A column whose rows vary in size
        (the beton writer's encoded images) gives stop and is read back by
        :meth:`blocks`."""
        for column, block in arrays.items():
            end = start + len(block) if stop is None else stop
            listed = self._parts(column)
            path = self.root / column / f"{start}-{end}.npy"
            with atomic_path(path, kind="partial") as tmp:
                np.save(tmp, np.ascontiguousarray(block))
            bisect.insort(listed, (start, end, path))

    def read(self, column: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a column from its parts (they must be covered)."""
        blocks, at = [], start
        parts = self._parts(column)
        while at < stop:
            part = self._part_at(parts, at)
            if part is None:  # committed after the listing (another rank's)?
                parts = self._parts(column, fresh=True)
                part = self._part_at(parts, at)
            if part is None:
                raise FileNotFoundError(f"{self.root / column}: row {at} is not in any committed chunk")
            a, b, path = part
            end = min(b, stop)
            blocks.append(NpyRows(path).read(at - a, end - a))
            at = end
        return np.concatenate(blocks) if len(blocks) != 1 else blocks[0]

    @staticmethod
    def _part_at(parts: List[Tuple[int, int, Path]], row: int) -> Optional[Tuple[int, int, Path]]:
        """The part holding `row`: the last one starting at or before it, as a
        rule (parts overlap only after a resume with another world size)."""
        i = bisect.bisect_right(parts, (row, float("inf")))
        return next((parts[j] for j in range(i - 1, -1, -1) if row < parts[j][1]), None)

    def blocks(self, column: str, start: int) -> Iterator[Tuple[int, int, np.ndarray]]:
        """(start, stop, the part's array) of the parts that follow each other
        from row `start` on, as committed."""
        parts = {a: (b, p) for a, b, p in self._parts(column)}
        while start in parts:
            stop, path = parts[start]
            yield start, stop, np.load(path)
            start = stop

    def publish(self, column: str, path: str | os.PathLike, rows: range, block_rows: int = 65536) -> Path:
        """Copies rows `rows` of a column into one .npy at `path` (atomically)."""
        first = self.read(column, rows.start, min(rows.start + 1, rows.stop))
        with NpyWriter(path, (len(rows), *first.shape[1:]), first.dtype) as writer:
            for start in range(rows.start, rows.stop, block_rows):
                writer.write(self.read(column, start, min(start + block_rows, rows.stop)))
        return Path(path)

    def remove(self, rows: range) -> None:
        """Deletes the parts inside `rows` (the folders too once nothing is
        left, unless shared)."""
        self._remove(lambda a, b: rows.start <= a and b <= rows.stop, tidy=not self.shared)

    def _remove(self, inside, tidy: bool = True) -> None:
        for column in self._columns():
            for a, b, path in self._parts(column.name, fresh=True):
                if inside(a, b):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
            if tidy:
                with contextlib.suppress(OSError):
                    column.rmdir()  # only when empty
        self._listed.clear()
        if tidy and not self._columns():
            with contextlib.suppress(FileNotFoundError):
                (self.root / "key.json").unlink()
            remove_stale(self.root)
            with contextlib.suppress(OSError):
                self.root.rmdir()


class Committer:
    """Collects a pass's computed blocks from row `start` and commits them as
    one chunk when its :class:`Pace` says so (or at CHUNK_BYTES), at block
    boundaries."""

    def __init__(self, parts: ChunkedColumns, start: int):
        self.parts, self.start = parts, start
        self.pace = Pace()
        self._blocks: Dict[str, list] = {}
        self._bytes = self._rows = 0

    def add(self, arrays: Dict[str, np.ndarray], rows: Optional[int] = None) -> None:
        """Blocks of the next `rows` rows (default: the first block's length)."""
        for column, block in arrays.items():
            self._blocks.setdefault(column, []).append(block)
            self._bytes += block.nbytes
        self._rows += len(next(iter(arrays.values()))) if rows is None else rows
        if self.pace.due() or self._bytes >= CHUNK_BYTES:
            self.flush()

    def flush(self) -> None:
        """Commits what was collected; then honours a pending Ctrl-C."""
        with self.pace.committing():
            if self._blocks:
                arrays = {c: np.concatenate(b) for c, b in self._blocks.items()}
                self.parts.commit(self.start, arrays, self.start + self._rows)
                self.start += self._rows
            self._blocks, self._bytes, self._rows = {}, 0, 0
        check()


# ---------------------------------------------------------------- step checkpoints

def save_state(path: str | os.PathLike, key: dict, state: dict) -> None:
    """Publishes a step's state (tensors, arrays, numbers) with the key of the
    inputs it belongs to, atomically: a kill leaves the previous one."""
    with atomic_path(path, kind="partial") as tmp, open(tmp, "wb") as f:
        pickle.dump({"key": json.loads(json.dumps(key, default=str)), "state": state}, f, protocol=5)


def load_state(path: str | os.PathLike, key: dict) -> Optional[dict]:
    """The state save_state wrote at `path` for the same key, else None."""
    remove_stale(Path(path).parent)  # a killed save's half-written file
    try:
        with open(path, "rb") as f:
            saved = pickle.load(f)  # (fastvote's own work area: written by save_state only)
    except (OSError, EOFError, pickle.UnpicklingError):
        return None
    return saved["state"] if saved.get("key") == json.loads(json.dumps(key, default=str)) else None
