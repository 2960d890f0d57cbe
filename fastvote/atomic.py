"""Files and folders that appear whole or not at all, and never at the cost of
a user's files.

Every writer in fastvote goes through here: a temporary name beside the
destination (so the rename stays on one file system), fsync, then one rename.
Temporary names carry the writer's pid, so :func:`remove_stale` can delete the
leftovers of a killed process without touching a live writer's files.

The one rule for output folders (:func:`check_output_folder`): fastvote
writes a folder only when it is new, empty, or an earlier fastvote output of
the same kind -- its ``manifest.json`` says ``"written_by": "fastvote"`` and
lists the files fastvote wrote. Anything else is refused before any compute,
unless the caller passes ``overwrite=True``: then fastvote writes its files
INTO the folder. Either way a file fastvote did not write is never removed.
An error while writing names the file or folder.

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
from typing import Iterator, Optional, Union

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
def naming(path: PathLike) -> Iterator[None]:
    """Re-raises an OSError that names no file (a full disk's ``[Errno 28]``
    comes from a write, not an open) with `path` named: the user learns which
    output, cache or beton filled the disk."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc


@contextlib.contextmanager
def atomic_path(path: PathLike, kind: str = "tmp") -> Iterator[Path]:
    """Yields a temporary path beside `path`; on success it is fsynced and
    renamed over `path`, on any error removed."""
    path = Path(path)
    with naming(path):
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


# --------------------------------------------------------------------------
# Output folders: what fastvote may replace
# --------------------------------------------------------------------------

MANIFEST = "manifest.json"


def owner(kind: str) -> dict:
    """The manifest entries that mark a folder as fastvote's `kind` output."""
    return {"written_by": "fastvote", "kind": kind}


def output_kind(folder: PathLike) -> Optional[str]:
    """The kind of fastvote output `folder` holds ("prune", "features",
    "cluster-prune", "experiment"), or None where its manifest is absent,
    unreadable or not fastvote's."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict):
        return None
    if manifest.get("written_by") == "fastvote":
        return str(manifest.get("kind"))
    if isinstance(manifest.get("versions"), dict) and "fastvote" in manifest["versions"]:
        return "prune"  # saved before the marker existed (fastvote 0.1.0)
    return None


def _describe(entries: list) -> str:
    names = [e.name + ("/" if e.is_dir() else "") for e in entries[:3]]
    more = f", ... ({len(entries)} entries)" if len(entries) > 3 else ""
    return ", ".join(names) + more


def _entries(folder: Path) -> list:
    return sorted(e for e in folder.iterdir() if not _TEMP.match(e.name))


def _replaceable(folder: Path, kind: str) -> bool:
    """Empty (but for our temporary files), or an earlier `kind` output."""
    return output_kind(folder) == kind or not _entries(folder)


# What a prune result held before manifests listed their files (fastvote 0.1.0;
# the experiment adds features.png).
_UNLISTED_PRUNE = {"indices.npy", "classes.json", MANIFEST, "votes.png", "features.png"}


def _listed(folder: Path) -> set:
    """The entries the folder's fastvote manifest says fastvote wrote."""
    if output_kind(folder) is None:
        return set()
    try:
        files = json.loads((folder / MANIFEST).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return set()
    return set(files) if isinstance(files, list) else set(_UNLISTED_PRUNE)


def _whole(folder: Path, kind: str) -> bool:
    """Whether the folder may be replaced as a whole: empty, or an earlier
    `kind` output holding nothing fastvote did not write (a user's notes
    beside a result are kept: the result is then merged in instead)."""
    entries = {e.name for e in _entries(folder)}
    return not entries or (output_kind(folder) == kind and entries <= _listed(folder))


def check_output_folder(directory: PathLike, kind: str, *, overwrite: bool = False, what: str = "out") -> Path:
    """Checks, before any compute, that a `kind` output may be written at
    `directory` (the module docstring's rule) and returns it as an absolute
    path with links resolved (so "." and "~/x" have names). Refusals are one
    line naming `what` (the argument), the folder and what it holds."""
    label = f"{what}={str(directory)!r}"
    if str(directory).strip() == "":
        raise ValueError(f"{label} is empty; expected a folder path")
    folder = Path(directory).expanduser().resolve()
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{label} is a file; expected a folder")
    if overwrite or not folder.exists() or _replaceable(folder, kind):
        return folder
    entries = _entries(folder)
    found = output_kind(folder)
    flag = "--overwrite" if what.startswith("--") else "overwrite=True"
    if found is not None:
        raise FileExistsError(f"{label}: {folder} holds a fastvote {found} output, not a {kind} one; choose another "
                              f"folder (or pass {flag} to write into it, keeping what it holds)")
    raise FileExistsError(f"{label}: {folder} holds files fastvote did not write ({_describe(entries)}); expected a "
                          f"new or empty folder or an earlier fastvote {kind} output. Choose another folder, or pass "
                          f"{flag} to write into it (its other files are kept)")


def claim(directory: PathLike, kind: str, *, overwrite: bool = False, what: str = "out") -> Path:
    """For outputs written piece by piece (cluster-prune, experiment runs):
    checks `directory` as check_output_folder does, creates it, and marks it
    as fastvote's (a manifest with complete=False) unless it already is, so a
    rerun after a kill recognises it. Returns the absolute folder."""
    folder = check_output_folder(directory, kind, overwrite=overwrite, what=what)
    with naming(folder):
        folder.mkdir(parents=True, exist_ok=True)
        if output_kind(folder) != kind:
            write_json(folder / MANIFEST, dict(owner(kind), complete=False))
    return folder


def _stamp(staging: Path, kind: str) -> None:
    """Marks a staged output as fastvote's and lists its entries (so a later
    merge knows which of the folder's entries were fastvote's)."""
    path = staging / MANIFEST
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    files = sorted({e.name for e in staging.iterdir()} | {MANIFEST})
    path.write_text(json.dumps({**owner(kind), **manifest, "files": files}, indent=1, default=str))


def _holds_cwd(folder: Path) -> bool:
    cwd = Path.cwd().resolve()
    return folder == cwd or folder in cwd.parents


def _merge(staging: Path, folder: Path) -> None:
    """Moves the staged entries into `folder` one by one (the manifest last:
    it says the output is complete), then removes the entries that the
    folder's earlier fastvote output listed and this one does not write."""
    earlier = _listed(folder)
    staged = sorted(e.name for e in staging.iterdir() if e.name != MANIFEST) + [MANIFEST]
    for name in staged:
        target = folder / name
        if target.is_dir() and not target.is_symlink():
            aside = temp_name(target, "old")
            os.rename(target, aside)
            shutil.rmtree(aside, ignore_errors=True)
        os.replace(staging / name, target)
    for name in earlier - set(staged):
        if "/" in name or name in ("", ".", ".."):
            continue
        stale = folder / name
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()


@contextlib.contextmanager
def atomic_dir(directory: PathLike, kind: str, *, overwrite: bool = False, what: str = "out") -> Iterator[Path]:
    """Yields an empty staging folder beside `directory`; on success its
    entries become the `kind` output at `directory`, with a manifest.json that
    marks it as fastvote's; on any error the staging folder is removed and
    `directory` is left as it was.

    A new or empty folder, or an earlier `kind` output that holds only what
    fastvote wrote, is replaced whole (renamed in; the earlier one moved
    aside, then deleted, so no file of an earlier run survives next to the
    new ones). An earlier output with other files beside it, the working
    folder or one above it, a mount point, or a folder written with
    overwrite=True is merged into entry by entry instead: fastvote's entries
    are replaced (and those of its earlier output that this one lacks are
    removed), every other entry is kept. Anything else is refused
    (check_output_folder). The folder gets the umask's permissions (mkdtemp's
    would be 0700)."""
    folder = check_output_folder(directory, kind, overwrite=overwrite, what=what)
    with naming(folder):
        folder.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(folder.parent)  # staging folders of killed writers
        staging = temp_name(folder)
        staging.mkdir(mode=0o777 & ~_umask())
        old = None
        try:
            yield staging
            _stamp(staging, kind)
            for item in staging.rglob("*"):
                if item.is_file():
                    _fsync(item)
            check_output_folder(folder, kind, overwrite=overwrite, what=what)  # it may have changed meanwhile
            if not folder.exists():
                os.rename(staging, folder)
            elif not overwrite and _whole(folder, kind) and not _holds_cwd(folder) and not os.path.ismount(folder):
                old = temp_name(folder, "old")
                os.rename(folder, old)
                os.rename(staging, folder)
            else:
                _merge(staging, folder)
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
