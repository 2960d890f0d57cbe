"""Biased source data: a corrupted or unbalanced copy of a source ``.beton`` (the
paper's "biased source" study: what does voting keep and drop when part of the source
is bad?).

A ``BiasSpec`` names the affected source classes and what happens to them:

- ``imbalance`` (keep fraction, 0 < f <= 1): each affected class keeps a seeded random
  ``max(1, round(f * n_c))`` of its ``n_c`` samples (never fewer than one, so every
  class keeps a centroid and the class ids stay meaningful);
- ``label_noise`` (0 <= p <= 1): then, among the samples an affected class kept,
  exactly ``round(p * n_kept_c)`` seeded random ones get a label drawn uniformly from
  the OTHER ``K - 1`` classes (any class, affected or not; never the original).

Rounding is Python's ``round`` (half to even). Unaffected classes are copied as they are.
Three independent random streams (affected classes, drops, flips) come from
``spec.seed``, so e.g. changing ``label_noise`` alone keeps the same dropped samples.

The text form (CLI flag, TOML string), items in any order, all optional::

    label_noise=0.4,imbalance=0.2,classes=0;3;7-9,seed=1

``classes`` lists class ids separated by ``;``, ``a-b`` meaning a..b inclusive;
left out, a seeded random half (``K // 2``) of the classes is affected.

``write_biased`` copies a beton: images are decoded and written raw, so every kept
sample decodes to exactly the source's pixels; samples keep their file order. In the
copy the ``identifier`` of a sample is its position in the biased beton (0..M-1, what
``write_beton`` stores for a dataset written whole); the record beside it,
``<out>.bias.json`` (``bias_path``), says which source rows were dropped, so source row
of copy row ``i`` is ``np.delete(np.arange(N), record["dropped_positions"])[i]``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..atomic import atomic_path
from .beton import _open, classes_path, read_classes, read_columns, read_wnids, write_beton
from .format import Images

TEXT_KEYS = ("label_noise", "imbalance", "classes", "seed")


@dataclass(frozen=True)
class BiasSpec:
    """What to corrupt in a source (see the module docstring for the exact rules).

    label_noise: fraction of the (kept) samples of every affected class whose label is
        replaced by a uniformly random other class, 0..1.
    imbalance: fraction of every affected class's samples to keep, 0 < f <= 1 (1: none dropped).
    classes: the affected source class ids (distinct, >= 0); None: a seeded random half.
    seed: seeds every random choice (>= 0).
    """

    label_noise: float = 0.0
    imbalance: float = 1.0
    classes: tuple[int, ...] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("label_noise", "imbalance"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise ValueError(f"{name}={value!r}: expected a number")
            object.__setattr__(self, name, float(value))
        if not 0.0 <= self.label_noise <= 1.0:
            raise ValueError(f"label_noise={self.label_noise!r}: expected 0 <= label_noise <= 1 "
                             f"(the fraction of an affected class's labels to flip)")
        if not 0.0 < self.imbalance <= 1.0:
            raise ValueError(f"imbalance={self.imbalance!r}: expected 0 < imbalance <= 1 "
                             f"(the fraction of an affected class's samples to keep)")
        if self.classes is not None:
            classes = tuple(self.classes) if not isinstance(self.classes, (str, bytes)) else None
            if (not classes or any(isinstance(c, bool) or not isinstance(c, (int, np.integer))
                                   or c < 0 for c in classes)):
                raise ValueError(f"classes={self.classes!r}: expected None or a non-empty sequence "
                                 f"of class ids >= 0")
            if len(set(classes)) != len(classes):
                raise ValueError(f"classes={self.classes!r}: expected distinct class ids")
            object.__setattr__(self, "classes", tuple(int(c) for c in classes))
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r}: expected an int >= 0")
        object.__setattr__(self, "seed", int(self.seed))

    @classmethod
    def parse(cls, text: str) -> "BiasSpec":
        """``"label_noise=0.4,imbalance=0.2,classes=0;3;7-9,seed=1"`` -> BiasSpec; items
        optional and in any order, ``""`` is the default (no bias)."""
        values: dict = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, value = (s.strip() for s in item.partition("="))
            if not sep or key not in TEXT_KEYS:
                raise ValueError(f"bias spec {text!r}: item {item!r}: expected key=value with key "
                                 f"one of {list(TEXT_KEYS)}")
            if key in values:
                raise ValueError(f"bias spec {text!r}: {key} is given twice; expected it once")
            try:
                values[key] = (_parse_classes(value) if key == "classes" else
                               int(value) if key == "seed" else float(value))
            except ValueError as e:
                raise ValueError(f"bias spec {text!r}: {key}={value!r}: {e}") from None
        return cls(**values)

    def text(self) -> str:
        """The text form; ``BiasSpec.parse(spec.text()) == spec``."""
        items = [f"label_noise={self.label_noise!r}", f"imbalance={self.imbalance!r}"]
        if self.classes is not None:
            items.append("classes=" + ";".join(map(str, self.classes)))
        return ",".join(items + [f"seed={self.seed}"])

    def __str__(self) -> str:
        return self.text()


def _parse_classes(value: str) -> tuple[int, ...]:
    """``"0;3;7-9"`` -> (0, 3, 7, 8, 9)."""
    classes: list[int] = []
    for part in value.split(";"):
        first, dash, last = part.strip().partition("-")
        try:
            low = int(first)
            high = int(last) if dash else low
        except ValueError:
            raise ValueError(f"expected class ids or inclusive ranges a-b separated by ';', "
                             f"got {part!r}") from None
        if high < low:
            raise ValueError(f"range {part!r}: expected a-b with a <= b")
        classes.extend(range(low, high + 1))
    return tuple(classes)


@dataclass(frozen=True)
class BiasPlan:
    """What a spec does to a source with labels ``labels``.

    positions: sorted int64 source positions of the kept samples (M,); the biased copy's
        row i is source row positions[i].
    labels: int64 (M,) labels of the copy.
    affected: sorted int64 affected class ids.
    flipped: sorted int64 positions IN THE COPY whose label was changed.
    original_labels: int64 their labels before the flip (labels[flipped] are the new ones).
    """

    positions: np.ndarray
    labels: np.ndarray
    affected: np.ndarray
    flipped: np.ndarray
    original_labels: np.ndarray


def plan_bias(labels: Sequence[int], spec: BiasSpec, num_classes: int | None = None) -> BiasPlan:
    """Apply ``spec`` to source labels ``labels`` (N,), of ``num_classes`` classes (default
    ``max(labels) + 1``); deterministic given ``spec.seed``. Touches no file."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.ndim != 1 or len(labels) == 0:
        raise ValueError(f"labels: expected a non-empty 1-D array of class ids, got shape {labels.shape}")
    num_classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels: expected class ids 0 <= y < num_classes={num_classes}, got "
                         f"min {labels.min()} and max {labels.max()}")
    class_rng, drop_rng, flip_rng = map(np.random.default_rng,
                                        np.random.SeedSequence(spec.seed).spawn(3))
    if spec.classes is None:
        if num_classes < 2:
            raise ValueError(f"classes=None picks a random half of the classes, but the source has "
                             f"{num_classes}; pass classes= explicitly")
        affected = np.sort(class_rng.choice(num_classes, num_classes // 2, replace=False))
    else:
        affected = np.array(sorted(spec.classes), dtype=np.int64)
        if affected.max() >= num_classes:
            raise ValueError(f"classes={spec.classes}: expected class ids 0 <= c < {num_classes} "
                             f"(the source's number of classes)")
    if spec.label_noise > 0 and num_classes < 2:
        raise ValueError(f"label_noise={spec.label_noise}: a source with {num_classes} class has "
                         f"no other class to flip a label to")

    keep = np.ones(len(labels), bool)
    for c in affected:
        members = np.flatnonzero(labels == c)
        if len(members):
            count = max(1, round(spec.imbalance * len(members)))
            keep[drop_rng.permutation(members)[count:]] = False
    positions = np.flatnonzero(keep)
    kept_labels = labels[positions]
    new_labels = kept_labels.copy()

    flipped = []
    for c in affected:
        members = np.flatnonzero(kept_labels == c)  # by original label: a sample flips at most once
        count = round(spec.label_noise * len(members))
        picked = np.sort(flip_rng.choice(members, count, replace=False))
        others = flip_rng.integers(0, num_classes - 1, size=count)
        new_labels[picked] = others + (others >= c)  # skip c: uniform over the other K - 1
        flipped.append(picked)
    flipped = np.sort(np.concatenate(flipped))  # affected is never empty
    return BiasPlan(positions=positions, labels=new_labels, affected=affected.astype(np.int64),
                    flipped=flipped.astype(np.int64), original_labels=kept_labels[flipped])


class _BetonRows:
    """``rows[i]`` -> (pixels of source row ``positions[i]``, ``labels[i]``): random access
    to a beton's images for the writer processes. The file is mapped lazily, so each
    process maps its own."""

    def __init__(self, path: Path, positions: np.ndarray, labels: np.ndarray):
        reader, _ = _open(path)
        self.images = Images(reader)
        self.positions = positions
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return np.array(self.images[int(self.positions[index])]), int(self.labels[index])


def bias_path(path: str | os.PathLike) -> Path:
    """The JSON record beside a biased beton: ``<path>.bias.json``."""
    path = Path(path)
    return path.with_name(path.name + ".bias.json")


def read_bias(path: str | os.PathLike) -> dict:
    """The record ``write_biased`` wrote beside the beton at ``path``."""
    return json.loads(bias_path(path).read_text())


def write_biased(source_beton: str | os.PathLike, spec: BiasSpec | str, out_beton: str | os.PathLike,
                 *, num_workers: int | None = None, progress: bool = True) -> dict:
    """Write a biased copy of ``source_beton`` to ``out_beton`` (replaced whole if it exists),
    with its class-name sidecar, and the record ``bias_path(out_beton)``.

    Args:
        source_beton: a beton written by ``fastvote.data.write_beton``.
        spec: a BiasSpec or its text form.
        out_beton: where to write the copy (not the source itself).
        num_workers: writer processes (default: all usable cores).
        progress: show a tqdm bar.

    Returns:
        The record (also in ``<out_beton>.bias.json``): ``spec`` (its fields) and
        ``spec_text``; ``source``, ``output``; ``num_classes``; ``affected_classes``;
        ``counts`` per class, ``source`` (before), ``kept`` (after drops, by original
        label) and ``biased`` (the copy's labels); ``num_samples`` {source, biased};
        ``num_flipped``; ``flipped`` {``positions`` in the copy, ``original_labels``,
        ``new_labels``}; ``dropped_positions`` (source rows left out); ``identifiers``.

    All three files appear whole or not at all: the record is staged first and renamed
    right after ``write_beton`` has renamed the beton and its sidecar.
    """
    spec = BiasSpec.parse(spec) if isinstance(spec, str) else spec
    if not isinstance(spec, BiasSpec):
        raise ValueError(f"spec: expected a BiasSpec or its text form, got {type(spec).__name__}")
    source, out = Path(source_beton), Path(out_beton)
    if out.resolve() == source.resolve():
        raise ValueError(f"out_beton={str(out)!r} is the source itself; expected another path")
    columns = read_columns(source)
    labels = columns["labels"]
    names = read_classes(source) if classes_path(source).is_file() else None
    num_classes = len(names) if names is not None else int(labels.max()) + 1
    plan = plan_bias(labels, spec, num_classes)
    counts = {"source": np.bincount(labels, minlength=num_classes),
              "kept": np.bincount(labels[plan.positions], minlength=num_classes),
              "biased": np.bincount(plan.labels, minlength=num_classes)}
    record = {
        "spec": dataclasses.asdict(spec), "spec_text": spec.text(),
        "source": str(source), "output": str(out), "num_classes": num_classes,
        "affected_classes": plan.affected.tolist(),
        "counts": {k: v.tolist() for k, v in counts.items()},
        "num_samples": {"source": len(labels), "biased": len(plan.positions)},
        "num_flipped": len(plan.flipped),
        "flipped": {"positions": plan.flipped.tolist(),
                    "original_labels": plan.original_labels.tolist(),
                    "new_labels": plan.labels[plan.flipped].tolist()},
        "dropped_positions": np.setdiff1d(np.arange(len(labels)), plan.positions).tolist(),
        "identifiers": "position in this beton; source row of row i = "
                       "np.delete(np.arange(num_samples.source), dropped_positions)[i]",
    }
    if record["spec"]["classes"] is not None:
        record["spec"]["classes"] = list(record["spec"]["classes"])
    # The largest side as max_resolution: page big enough for every raw image, none resized.
    largest = int(max(columns["heights"].max(), columns["widths"].max()))
    with atomic_path(bias_path(out)) as staged:
        staged.write_text(json.dumps(record, indent=1))
        # the source's wnids (ImageNet), where it has them, so that the copy keeps them too
        write_beton(_BetonRows(source, plan.positions, plan.labels), out,
                    classes=names and (read_wnids(source) or names),
                    max_resolution=largest, num_workers=num_workers, progress=progress)
    return record
