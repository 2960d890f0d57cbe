"""``fastvote.prune``: the drop-in call. Given a source (pretraining) set and
one or more target (downstream) training sets, keep the source classes the
targets vote for, and return their sample indices.

    result = fastvote.prune("haystack", "digits", method="lm", keep=10, arch="tiny")
    result.save("runs/lm")                      # indices.npy, classes.json, manifest.json, votes.png
    loader = result.loader(batch_size=256)      # FFCV, only the kept samples

Inputs: see fastvote.inputs. Every argument and input is checked before
anything expensive (a surrogate's training, a pass over the source); the
layers below do the work: fastvote.methods (the spec and the selection),
fastvote.surrogate, fastvote.views.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

import fastvote
from fastvote import data as fvdata
from fastvote import distributed, inputs, methods
from fastvote import surrogate as surrogates
from fastvote.atomic import atomic_dir, check_output_folder
from fastvote.rng import keeps_rng
from fastvote.select import keep_count, present_classes
from fastvote.views import ModelView, TensorView

OUTPUT_FILES = ("indices.npy", "classes.json", "manifest.json", "votes.png")
PRECOMPUTED_BATCH = 16384  # rows a read of precomputed outputs (32 MB of 512-d float32)
DEFAULT_ARCH = surrogates.DEFAULT_ARCH


# --------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------

@dataclass
class PruneResult:
    """What a prune keeps and why.

    kept_classes: int64 ids of the kept source classes (clusters for label-free
        FM), in rank order (most voted first, or least with reverse=True).
    indices: sorted int64 positions of the kept samples in the source.
    votes: [K] votes per class; scores: [K] the tie-breaking score.
    class_names: names of all K classes (or "cluster j").
    ratio: the fraction of `unit` actually removed.
    unit: what keep and ratio count: "classes" (lm, fm, random) or "samples"
        (the sample-wise baselines).
    manifest: method, arguments, data and surrogate fingerprints, versions, timings.
    """

    method: str
    kept_classes: Tensor
    indices: Tensor
    votes: Optional[Tensor]
    scores: Tensor
    class_names: List[str]
    ratio: float
    unit: str = "classes"
    manifest: dict = field(default_factory=dict)

    @property
    def kept_names(self) -> List[str]:
        return [self.class_names[int(c)] for c in self.kept_classes]

    def save(self, directory: Union[str, os.PathLike], *, overwrite: bool = False) -> Path:
        """Writes indices.npy, classes.json, manifest.json and votes.png into
        `directory`, which appears whole or not at all: the files are staged
        beside it and the folder is renamed in, replacing an earlier prune
        result as a whole. A folder holding anything else is refused
        (FileExistsError), unless overwrite=True: then the four files are
        written into it and its other files are kept (fastvote.atomic).
        Returns the folder (absolute). Under torchrun only rank 0 writes
        (every rank holds the same result)."""
        from fastvote.plots import plot_votes

        directory = check_output_folder(directory, "prune", overwrite=overwrite, what="directory")
        if not distributed.is_main():
            return directory
        with atomic_dir(directory, "prune", overwrite=overwrite, what="directory") as staging:
            np.save(staging / "indices.npy", self.indices.numpy().astype(np.int64))
            rank = {int(c): r for r, c in enumerate(self.kept_classes)}
            classes = {
                "kept": [int(c) for c in self.kept_classes],
                "classes": [
                    {"id": j, "name": name,
                     "votes": None if self.votes is None else self.votes[j].item(),
                     "score": float(self.scores[j]), "kept": j in rank, "rank": rank.get(j)}
                    for j, name in enumerate(self.class_names)],
            }
            (staging / "classes.json").write_text(json.dumps(classes, indent=1))
            manifest = dict(self.manifest, method=self.method, ratio=self.ratio, unit=self.unit,
                            num_kept_classes=len(self.kept_classes), num_kept_samples=len(self.indices))
            (staging / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
            plot_votes(self, staging / "votes.png")
        return directory

    @classmethod
    def load(cls, directory: Union[str, os.PathLike]) -> "PruneResult":
        """Reads back a result that save() wrote into `directory`."""
        directory = Path(directory)
        absent = [n for n in OUTPUT_FILES[:3] if not (directory / n).is_file()]
        if absent:
            raise FileNotFoundError(f"{directory} is not a saved prune result: {absent} missing")
        classes = json.loads((directory / "classes.json").read_text())
        manifest = json.loads((directory / "manifest.json").read_text())
        if "unit" not in manifest:
            raise ValueError(f"{directory} was written by an older fastvote (no 'unit' in manifest.json); prune again")
        rows = classes["classes"]
        votes = None if rows and rows[0]["votes"] is None else torch.tensor(
            [r["votes"] for r in rows], dtype=torch.int64 if all(isinstance(r["votes"], int) for r in rows)
            else torch.float64)
        return cls(method=manifest["method"], kept_classes=torch.tensor(classes["kept"], dtype=torch.int64),
                   indices=torch.from_numpy(np.load(directory / "indices.npy")),
                   votes=votes, scores=torch.tensor([r["score"] for r in rows], dtype=torch.float64),
                   class_names=[r["name"] for r in rows], ratio=manifest["ratio"], unit=manifest["unit"],
                   manifest=manifest)

    def loader(self, batch_size: int = 256, *, train: bool = True, source: Optional[str] = None, **kw):
        """A loader (fastvote.data: FFCV, or torch without it) over the kept samples of the source beton (train
        pipeline by default, eval with train=False). `kw` go to
        fastvote.data.train_loader / eval_loader (resolution, mean, std, drop_last, ...);
        resolution, mean and std default to the surrogate's preprocessing.

        Each epoch (one ``for``) yields every kept sample once, the last batch partial;
        ``drop_last=True`` leaves that batch out (a ``batch_size`` above the kept samples
        is then a ValueError). Building and iterating it leave the caller's torch and
        numba thread counts as they were."""
        beton = source or self.manifest.get("source", {}).get("beton")
        if not beton:
            raise ValueError("this result's source was not a .beton; pass source='path/to/source.beton'")
        prep = self.manifest.get("preprocessing", {})
        for key in ("resolution", "mean", "std") + (() if train else ("crop_ratio", "interpolation")):
            if key not in kw and key in prep:
                kw[key] = prep[key]
        make = fvdata.train_loader if train else fvdata.eval_loader
        return make(beton, batch_size, indices=self.indices.numpy(), **kw)


# --------------------------------------------------------------------------
# Checks that need the resolved inputs (all before anything expensive)
# --------------------------------------------------------------------------

def _is_sample(first: Sequence, image_key: str) -> bool:
    """Whether a list's first element is a dataset item ((image, label) or a dict
    with an image): then the list is ONE dataset, not a list of targets."""
    if not first:
        return False
    item = first[0]
    if isinstance(item, dict):
        return image_key in item
    return (isinstance(item, (tuple, list)) and len(item) >= 2 and not isinstance(item[1], bool)
            and isinstance(item[1], (int, np.integer, Tensor)))


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name}={value!r} is invalid; expected an integer >= {low}")
    return int(value)


def _groups(spec: methods.MethodSpec, src: inputs.Input) -> List[str]:
    """The names of what the method keeps: source classes, or K-means clusters."""
    if spec.name == "fm" and spec.options["centroids"] == "kmeans":
        count = spec.options["num_clusters"] or src.num_classes
        if not count:
            raise ValueError("centroids='kmeans' on an unlabelled source needs num_clusters=")
        if count > src.num_rows:
            raise ValueError(f"num_clusters={count} exceeds the {src.num_rows} source samples "
                             "(one cluster needs one sample)")
        return [f"cluster {j}" for j in range(count)]
    needs_labels = spec.class_wise or "labels" in spec.needs["source"]
    if src.labels is None and spec.options.get("cap") is not None and not spec.options.get("num_clusters"):
        raise ValueError(f"method={spec.text!r}: cap= on an unlabelled source caps per k-means cluster; give "
                         "num_clusters= too (or labels with the source outputs)")
    if src.labels is None:
        if needs_labels:
            raise ValueError(f"method={spec.text!r} needs source labels; give 'labels' with the precomputed source "
                             "outputs, or use method='fm', centroids='kmeans' (label-free)")
        return []
    return src.class_names or [str(j) for j in range(src.num_classes)]


def _absent(spec: methods.MethodSpec, src: inputs.Input, groups: List[str]) -> np.ndarray:
    """The classes of the label space (the class names, the logits' width)
    with no source sample: a partial download or a filtered copy. Class-wise
    methods rank them but cannot keep them; the sample-wise methods that read
    labels refuse them."""
    if src.labels is None or not groups or (spec.name == "fm" and spec.options["centroids"] == "kmeans"):
        return np.zeros(0, dtype=np.int64)
    absent = np.flatnonzero(~present_classes(src.labels, len(groups)))
    if len(absent) and not spec.class_wise and "labels" in spec.needs["source"]:
        raise ValueError(f"{src.description}: source classes {[groups[j] for j in absent[:10]]} have no samples "
                         f"({len(absent)} of {len(groups)}); method={spec.text!r} needs samples in every class "
                         "(lm, fm and random accept classes without samples)")
    return absent


def _check_outputs(spec, src: inputs.Input, tgts: Sequence[inputs.Input], sur, num_groups: int) -> None:
    """Precomputed outputs hold what the method reads, with matching widths,
    from one feature space."""
    reads = [(src, spec.needs["source"])] + [(t, spec.needs["target"]) for t in tgts]
    for data, want in reads:
        if data.outputs is not None and "images" in want:
            raise ValueError(f"{data.description}: method={spec.text!r} trains models on the source images, but the "
                             "source was given as precomputed outputs; pass the source as a .beton, a registry name "
                             "or a Dataset")
        if data.outputs is not None:
            missing = [w for w in want if w in ("logits", "features") and w not in data.outputs]
            if missing:
                raise ValueError(f"{data.description} lacks {missing}, which method={spec.text!r} reads")
    logits = {t.description: t.width("logits") for t, want in reads[1:] if "logits" in want}
    for name, width in logits.items():
        expected = src.num_classes
        what = f"{name} has {width} logits"
        if width is None:
            width = sur.num_classes if sur is not None else None
            what = f"the surrogate's head has {width} outputs"
        if width is not None and expected is not None and width != expected:
            raise ValueError(f"{what} but the source has {expected} classes; LM needs a surrogate trained on this "
                             "source's classes")
    widths = {d.description: d.width("features") for d, want in reads if "features" in want and d.outputs is not None}
    if len(set(widths.values())) > 1:
        raise ValueError(f"the precomputed features have different widths {widths}; expected one feature space")
    computed = [d for d, want in reads if d.outputs is None and any(w in ("logits", "features") for w in want)]
    given = [d for d, want in reads if d.outputs is not None and want]
    if computed and given:
        foreign = [d.description for d in given if d.surrogate != sur.fingerprint]
        if foreign:
            raise ValueError(f"{foreign} are precomputed outputs of an unknown surrogate, while "
                             f"{[d.description for d in computed]} would run the surrogate ({sur.entry['kind']}, "
                             f"fingerprint {sur.fingerprint}): two unrelated feature spaces. Give every input "
                             "precomputed, or none, or record the surrogate ('surrogate': fingerprint)")
    k = spec.options.get("k")
    if k is not None and k > num_groups:
        raise ValueError(f"k={k} is more than the {num_groups} source classes a target sample can vote for")


def _precision(amp: Optional[bool], device) -> str:
    from fastvote.features import precision  # here: fastvote.features imports torchvision (seconds)

    return precision(amp, device)


def open_view(data: inputs.Input, src: inputs.Input, sur, model, *, batch_size: int, device, workdir: Path,
              progress: bool, train_config=None, amp: Optional[bool] = None):
    """What a method reads of `data`: its precomputed outputs, or the
    surrogate's (under `amp`, fastvote.features.autocast_dtype), computed once and
    cached per (input, surrogate weights, preprocessing, precision) under workdir/features, so another ratio or method reads
    them back instead of running the surrogate again."""
    shared = dict(num_classes=src.num_classes, class_names=src.class_names, device=device, workdir=workdir)
    if data.outputs is not None:
        return TensorView(data, PRECOMPUTED_BATCH, **shared)
    if sur is None:  # random, random-sample: rows and labels only
        return ModelView(data, None, {}, batch_size=batch_size, progress=progress, **shared)
    key = sur.outputs_key(_precision(amp, device))
    cache = workdir / "features" / f"{data.fingerprint.split(':')[1][:16]}-{key}"
    return ModelView(data, model, sur.prep, batch_size=batch_size, progress=progress, cache=cache, amp=amp,
                     surrogate_fingerprint=sur.fingerprint, train_config=train_config, **shared)


def _tie_rule(spec: methods.MethodSpec) -> str:
    """The rule that orders classes with equal votes (docs/SELECTION.md)."""
    if spec.name == "lm":
        return "the highest mean softmax probability over the target rows"
    if spec.options.get("metric") == "cosine":
        return "the highest mean cosine similarity of the centroid to the target rows"
    return "the lowest mean squared distance of the centroid to the target rows"


def _warn_absent(src: inputs.Input, groups: List[str], absent: np.ndarray, votes: Optional[Tensor]) -> None:
    names = [groups[j] for j in absent[:5]] + (["..."] if len(absent) > 5 else [])
    text = f"{src.description}: {len(absent)} of {len(groups)} source classes have no samples ({names}) and cannot be kept"
    if votes is not None:
        voted = {groups[j]: votes[j].item() for j in absent if votes[j] > 0}
        if voted:
            shown = dict(list(voted.items())[:5])
            text += (f"; {len(voted)} of them got target votes ({shown}{', ...' if len(voted) > 5 else ''}), so the "
                     "next-ranked classes with samples take their places")
    warnings.warn(text, stacklevel=3)


def _per_class(selection, labels: np.ndarray, num_classes: int):
    """A sample-wise selection seen per class: the classes still present and
    the mean per-sample score of each class."""
    kept_per_class = np.bincount(labels[selection.indices.numpy()], minlength=num_classes)
    sums = np.bincount(labels, weights=selection.scores.double().numpy(), minlength=num_classes)
    scores = torch.from_numpy(sums / np.maximum(np.bincount(labels, minlength=num_classes), 1))
    selection.info = dict(selection.info, kept_per_class=kept_per_class.tolist(),
                          class_scores="mean per-sample score of each class (all its samples)")
    return torch.from_numpy(np.flatnonzero(kept_per_class).astype(np.int64)), scores


# --------------------------------------------------------------------------
# prune()
# --------------------------------------------------------------------------

@keeps_rng
def prune(source, target, method: str = "lm", ratio: Optional[float] = None, *, keep: Optional[int] = None,
          surrogate=None, k: Optional[int] = None, metric: Optional[str] = None, weight: Optional[str] = None,
          temperature: Optional[float] = None, reverse: Optional[bool] = None, centroids: Optional[str] = None,
          num_clusters: Optional[int] = None, normalize_targets: Optional[bool] = None,
          arch: str = DEFAULT_ARCH, train_config=None, image_size: Optional[int] = None,
          mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
          device: Union[str, torch.device, None] = None, batch_size: int = 256, seed: int = 0,
          workdir: Union[str, os.PathLike, None] = None, image_key: str = "image", label_key: str = "label",
          amp: Optional[bool] = None, progress: bool = True) -> PruneResult:
    """Prunes the source for the target(s) by LM or FM voting, or a baseline.

    Args:
        source, target: see fastvote.inputs; `target` may be a list of inputs
            (multi-task: votes are summed; normalize_targets=True weighs each
            target equally). A list whose items are (image, label) pairs or
            dicts with an image is one dataset.
        method: "lm" or "fm", or a baseline (fastvote.methods.METHODS), with
            options as "name:key=value,..." or as the arguments below.
        ratio: the fraction of source classes REMOVED (sample-wise baselines:
            of source SAMPLES), 0 <= ratio < 1; or
        keep: the number of classes (samples) kept. Give exactly one.
        surrogate: None (train `arch` on the source with `train_config`,
            default TrainConfig(seed=seed)), a checkpoint path
            (fastvote.models.save_checkpoint) or an nn.Module.
        arch: the architecture trained when surrogate=None (default the
            paper's ResNet-18; "tiny" trains in seconds on a CPU).
        train_config: the surrogate's training recipe (fastvote.train.TrainConfig)
            when surrogate=None.
        k, weight, reverse, normalize_targets (lm, fm), metric, temperature,
            centroids, num_clusters (fm): the method's options
            (fastvote.methods.parse); an option the method does not use is
            an error. None: the method's default.
        image_size, mean, std: the surrogate's preprocessing (defaults: the
            checkpoint's, else the source's image size and channel statistics).
        device: where the surrogate and the ops run (default: cuda if available).
        batch_size: images a surrogate pass reads at once (its memory, not
            its result).
        seed: seeds the surrogate's construction and training, and the method.
        workdir: cache of betons, surrogates and features (default $FASTVOTE_CACHE/prune).
        image_key, label_key: the columns of a dataset's dict items (Hugging
            Face: {"image": PIL, "label": int}; class names from its ClassLabel).
        amp: autocast for the surrogate's passes (fastvote.features.autocast_dtype):
            None -> float16 on CUDA, bfloat16 on a CPU with bf16 units (avx512_bf16,
            AMX), else float32; False -> float32. Cached outputs are kept per precision.
        progress: progress bars for the long passes (on a terminal only; under
            torchrun on rank 0 only).

    Returns a PruneResult (kept classes, indices, votes, manifest). The
    selection rules (votes, ties, classes without samples) are stated in
    docs/SELECTION.md.
    """
    started = time.perf_counter()
    spec = methods.parse(method, dict(k=k, metric=metric, weight=weight, temperature=temperature, reverse=reverse,
                                      centroids=centroids, num_clusters=num_clusters,
                                      normalize_targets=normalize_targets))
    batch_size, seed = _check_int("batch_size", batch_size, 1), _check_int("seed", seed, 0)
    if ratio is not None or keep is not None:  # the range of keep needs the source; the rest is checked now
        keep_count(None, ratio=ratio, keep=keep, unit=spec.unit)
    device = distributed.resolve_device(device)
    progress = progress and distributed.is_main()  # one set of progress bars
    workdir = inputs.workdir_path(workdir)
    several = isinstance(target, (list, tuple)) and not _is_sample(target[:1], image_key)
    targets_in = list(target) if several else [target]
    if not targets_in:
        raise ValueError("target is an empty list; expected at least one target dataset")
    surrogates.check_arguments(surrogate, arch, image_size, mean, std)  # before writing any beton

    with distributed.main_first():  # rank 0 writes the cached betons, the others then read them
        keys = dict(image_key=image_key, label_key=label_key)
        src = inputs.resolve(source, "source", workdir, progress, **keys)
        tgts = [inputs.resolve(t, f"target {i}" if len(targets_in) > 1 else "target", workdir, progress, **keys)
                for i, t in enumerate(targets_in)]
    for data in [src, *tgts]:
        if data.num_rows < distributed.world_size():  # every rank reads a non-empty shard
            raise ValueError(f"{data.description} has {data.num_rows} samples; expected at least one"
                             + (f" a process ({distributed.world_size()} under torchrun)"
                                if distributed.active() else ""))
    groups = _groups(spec, src)
    absent = _absent(spec, src, groups)
    n_total = len(groups) if spec.class_wise else src.num_rows
    n_keep = keep_count(n_total, ratio=ratio, keep=keep, unit=spec.unit)
    if len(absent):  # keep counts classes that can contribute samples
        present = n_total - len(absent)
        if keep is not None and keep > present:
            raise ValueError(f"keep={keep} exceeds the {present} source classes that have samples ({len(absent)} of "
                             f"the {n_total} classes have none: {[groups[j] for j in absent[:5]]})")
        n_keep = min(n_keep, present)
    needs_model = ((src.outputs is None and bool(spec.needs["source"]))
                   or (bool(spec.needs["target"]) and any(t.outputs is None for t in tgts)))
    sur = surrogates.resolve(surrogate, src, arch=arch, train_config=train_config, image_size=image_size,
                             mean=mean, std=std, seed=seed, workdir=workdir, device=device) if needs_model else None
    # FM has no centroid for a class without samples: it cannot be voted for.
    _check_outputs(spec, src, tgts, sur, len(groups) - (len(absent) if spec.name == "fm" else 0))

    # ---- the expensive part ----------------------------------------------
    t0 = time.perf_counter()
    model = sur.model(device, progress) if sur is not None else None
    surrogate_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    selection = spec.select(open_view(src, src, sur, model, batch_size=batch_size, device=device, workdir=workdir,
                                      progress=progress, train_config=train_config, amp=amp),
                            [open_view(t, src, sur, model, batch_size=batch_size, device=device, workdir=workdir,
                                       progress=progress, amp=amp) for t in tgts],
                            keep=n_keep, seed=seed, device=device, progress=progress)
    prune_seconds = time.perf_counter() - t0
    # Stream rows -> source positions (a beton may hold its samples in any order).
    indices = torch.from_numpy(np.sort(src.identifiers[selection.indices.numpy()]))
    kept_classes, scores = selection.kept_classes, selection.scores
    if not spec.class_wise:
        kept_classes, scores = _per_class(selection, src.labels, len(groups)) if groups else (
            torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.float64))
    if spec.class_wise and selection.votes is not None:
        voted = int((selection.votes > 0).sum())
        if n_keep > 2 * max(voted, 1):
            warnings.warn(f"keep={n_keep}, but only {voted} of {len(groups)} {spec.unit} got any vote: the other "
                          f"{n_keep - voted} kept {spec.unit} were picked by the tie score, {_tie_rule(spec)} "
                          "(docs/SELECTION.md, 'Ties')", stacklevel=2)
    if len(absent):
        _warn_absent(src, groups, absent, selection.votes)

    describe = lambda d: {"description": d.description, "fingerprint": d.fingerprint,  # noqa: E731
                          "beton": str(d.beton) if d.beton else None, "num_samples": d.num_rows}
    manifest = {
        "unit": spec.unit,
        "arguments": {"method": spec.text, "options": dict(spec.options), "ratio": ratio, "keep": keep,
                      "seed": seed, "batch_size": batch_size,
                      **({"arch": arch} if sur is not None and sur.kind == "trained" else {})},
        "source": dict(describe(src), num_classes=len(groups)),
        "targets": [describe(t) for t in tgts],
        "surrogate": None if sur is None else dict(sur.entry, fingerprint=sur.fingerprint,
                                                   precision=_precision(amp, device)),
        "preprocessing": {} if sur is None else sur.prep,
        "selection": selection.info,
        "versions": {"fastvote": fastvote.__version__, "torch": torch.__version__, "numpy": np.__version__,
                     "python": platform.python_version(), "compiled_ops": fastvote.ops.HAS_EXTENSION},
        "device": str(device),
        "seconds": {"surrogate": surrogate_seconds, "prune": prune_seconds, "total": time.perf_counter() - started},
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return PruneResult(method=spec.text, kept_classes=kept_classes, indices=indices, votes=selection.votes,
                       scores=scores, class_names=groups, ratio=1.0 - n_keep / n_total, unit=spec.unit,
                       manifest=manifest)
