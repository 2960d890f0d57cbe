"""Files and folders that appear whole or not at all.

Every writer in fastvote goes through here: a temporary name beside the
destination (so the rename stays on one file system), fsync, then one rename.
Temporary names carry the writer's pid, so :func:`remove_stale` can delete the
leftovers of a killed process without touching a live writer's files.

This module imports nothing from fastvote (every layer may use it).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]
_TEMP = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.(tmp|partial|old)(\..*)?$")


def temp_name(path: PathLike, kind: str = "tmp") -> Path:
    """``.<name>.<pid>.<random>.<kind><suffix>`` beside `path` (the suffix is
    kept: numpy and matplotlib pick the format from it)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.{kind}{path.suffix}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: PathLike, kind: str = "tmp") -> Iterator[Path]:
    """Yields a temporary path beside `path`; on success it is fsynced and
    renamed over `path`, on any error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path, kind)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_text(path: PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: PathLike, obj, **kw) -> Path:
    return write_text(path, json.dumps(obj, indent=1, **kw))


@contextlib.contextmanager
def atomic_dir(directory: PathLike) -> Iterator[Path]:
    """Yields an empty staging folder beside `directory`; on success it
    replaces `directory` as a whole (an existing one is moved aside and then
    deleted, so no file of an earlier run survives next to the new ones), on
    any error it is removed. The folder gets the umask's permissions
    (mkdtemp's would be 0700)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} exists and is not a folder")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = temp_name(directory)
    staging.mkdir(mode=0o777 & ~_umask())
    old = None
    try:
        yield staging
        for item in staging.rglob("*"):
            if item.is_file():
                _fsync(item)
        if directory.exists():
            old = temp_name(directory, "old")
            os.rename(directory, old)
        os.rename(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(folder: PathLike) -> int:
    """Deletes the temporary files and folders that dead writers left in
    `folder` (see :func:`temp_name`); returns how many."""
    folder = Path(folder)
    removed = 0
    if not folder.is_dir():
        return removed
    for item in folder.iterdir():
        match = _TEMP.match(item.name)
        if match is None or _alive(int(match.group(1))):
            continue
        if item.is_dir():
            shutil.rmtree(item, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                item.unlink()
        removed += 1
    return removed
