"""The paper's protocol as one recipe: train a surrogate on the source ->
prune with each method at each ratio -> pretrain on every subset (and on the
whole source) -> transfer to the target -> a table, a CSV and plots.

Every knob is a field of ExperimentConfig with a default (the defaults are the
offline demo: haystack -> digits on two CPU cores); a TOML file overrides any
of them. Every data read goes through FFCV. A rerun with the same run folder
skips every finished cell (and resumes an interrupted pretraining).

    fastvote experiment --config my.toml --out runs/exp
    fastvote demo --out runs/demo
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import statistics
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from fastvote import data as fvdata
from fastvote import methods, models, train
from fastvote.prune import PruneResult, prune as prune_source, resolve_data
from fastvote.select import keep_count

UNPRUNED = "unpruned"
# `fastvote experiment` runs every method. The demo (10 minutes on two cores)
# runs the two voting methods, the random-class bar, and the cheaper
# target-agnostic baselines (GraNd averaged over 2 runs instead of 10).
ALL_METHODS = ("lm", "fm", "random", "random-sample", "moderate", "grand", "el2n", "forgetting", "ccs", "ssp")
DEMO_METHODS = ("lm", "fm", "random", "random-sample", "moderate", "forgetting", "grand:runs=2")


@dataclass
class ExperimentConfig:
    """One experiment. Ratios are the fraction REMOVED: of source classes for
    the class-wise methods (lm, fm, random), of source samples for the
    sample-wise baselines."""

    source: str = "haystack"               # registry name or .beton
    target: str = "digits"                 # registry name with train/test splits, or a pair of betons
    target_test: Optional[str] = None      # the test .beton when `target` is a .beton
    target_shots: int = 10                 # k-shot target training split (registry targets)
    val_shots: int = 3                     # per class, carved from the target's training split
    methods: Tuple[str, ...] = ALL_METHODS  # "name:key=value" passes a method's options
    ratios: Tuple[float, ...] = (0.5, 2 / 3, 0.8)
    unpruned: bool = True                  # also pretrain on the whole source
    seeds: Tuple[int, ...] = (0, 1)
    image_size: int = 16                   # surrogate and model input side in px
    crop_scale: Tuple[float, float] = (1.0, 1.0)  # RandomResizedCrop area range; (1, 1) = none
    flip: bool = False                     # horizontal flips (off: mirrored digits are other glyphs)
    # surrogate
    surrogate_arch: str = "tiny"
    surrogate_epochs: int = 6
    surrogate_lr: float = 0.2
    # vote
    k: int = 1
    metric: str = "l2"
    weight: str = "count"
    # pretraining (the same epochs whatever the subset size: that is the speed-up)
    arch: str = "tiny"
    epochs: int = 6
    lr: float = 0.2
    batch_size: int = 256
    # transfer
    modes: Tuple[str, ...] = ("linear",)
    lp_epochs: int = 50
    lp_lr: float = 0.01
    ff_epochs: int = 20
    ff_lr: float = 1e-4
    device: Optional[str] = None
    # Torch threads on CPU. Small convolutions gain nothing from a second
    # thread, and on a busy 2-core machine OpenMP barriers made two threads up
    # to 10x slower than one (measured); None keeps torch's choice.
    cpu_threads: Optional[int] = 1

    @classmethod
    def from_toml(cls, path, **overrides) -> "ExperimentConfig":
        with open(path, "rb") as f:
            values = tomllib.load(f)
        values.update(overrides)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"{path}: unknown setting(s) {unknown}; expected some of {sorted(names)}")
        tuples = {f.name for f in dataclasses.fields(cls) if str(f.type).startswith("Tuple")}
        return cls(**{k: tuple(v) if k in tuples else v for k, v in values.items()})

    def validate(self, num_classes: int) -> None:
        for m in self.methods:
            methods.get(m)
        for r in self.ratios:
            keep_count(num_classes, ratio=r)
        for mode in self.modes:
            if mode not in train.FINETUNE_MODES:
                raise ValueError(f"modes: {mode!r} is unknown; expected some of {train.FINETUNE_MODES}")
        if not self.seeds:
            raise ValueError("seeds is empty; expected at least one seed")


@dataclass
class Cell:
    """One pretrained model: a method at a ratio (or the whole source) and a seed."""

    method: str
    ratio: float
    seed: int

    @property
    def key(self) -> str:
        name = self.method.replace(":", "_").replace(",", "_").replace("=", "-")
        return f"{name}-r{self.ratio:.3f}-s{self.seed}"


# --------------------------------------------------------------------------

class Experiment:
    def __init__(self, config: ExperimentConfig, out: os.PathLike, progress: bool = True):
        self.config = config
        self.out = Path(out)
        self.progress = progress
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.work = self.out / "work"
        self._target = None
        (self.out / "cells").mkdir(parents=True, exist_ok=True)

    # ---- data -------------------------------------------------------------
    def prepare(self) -> None:
        """Resolves the source, writes the target betons, carves validation."""
        c = self.config
        self.source = resolve_data(c.source, "source", self.work, self.progress)
        if self.source.labels is None:
            raise ValueError("the experiment pretrains supervised, so the source needs labels")
        self.num_classes = self.source.num_classes
        c.validate(self.num_classes)
        if c.target.endswith(".beton"):
            if not c.target_test:
                raise ValueError("target is a .beton, so target_test= must name the test .beton")
            train_beton, test_beton = Path(c.target), Path(c.target_test)
        else:
            train_beton = self.work / "betons" / f"{c.target}-train-{c.target_shots}shot.beton"
            test_beton = self.work / "betons" / f"{c.target}-test-{c.target_shots}shot.beton"
            for split, path in (("train", train_beton), ("test", test_beton)):
                if not path.is_file():
                    fvdata.write_offline(c.target, split, path, progress=self.progress, shots=c.target_shots)
        self.target_train, self.target_test = train_beton, test_beton
        train_labels = fvdata.read_columns(train_beton)["labels"]
        self.target_classes = int(max(train_labels.max(), fvdata.read_columns(test_beton)["labels"].max())) + 1
        # Validation is carved from the training split; the test split only ever scores the chosen epoch.
        self.val_idx, self.train_idx = fvdata.split_indices(train_labels, c.val_shots, seed=0)
        self.mean, self.std = fvdata.channel_stats(self.source.beton)

    def _threads(self, loader):
        # Building an FFCV loader resets torch's thread count; restore ours.
        if self.device.type == "cpu" and self.config.cpu_threads:
            torch.set_num_threads(self.config.cpu_threads)
        return loader

    def _eval_loader(self, beton, indices=None):
        c = self.config
        return self._threads(fvdata.eval_loader(beton, c.batch_size, resolution=c.image_size, mean=self.mean,
                                                std=self.std, indices=indices, device=self.device))

    def _train_loader(self, indices, seed: int):
        c = self.config
        aspect = (1.0, 1.0) if c.crop_scale == (1.0, 1.0) else (3 / 4, 4 / 3)
        return self._threads(fvdata.train_loader(
            self.source.beton, c.batch_size, resolution=c.image_size, mean=self.mean, std=self.std,
            indices=indices, seed=seed, device=self.device, scale=c.crop_scale, ratio=aspect, flip=c.flip))

    def _target_loaders(self):
        """The target's train / validation / test loaders, built once: every cell
        reads the same target, and each FFCV loader costs a compile."""
        if self._target is None:
            self._target = (self._eval_loader(self.target_train, self.train_idx),
                            self._eval_loader(self.target_train, self.val_idx),
                            self._eval_loader(self.target_test))
        return self._target

    # ---- surrogate --------------------------------------------------------
    def surrogate(self) -> Tuple[Path, float]:
        """Trains (or reuses) the surrogate; returns its checkpoint and training seconds."""
        c = self.config
        path = self.out / "surrogate.pt"
        info = self.out / "surrogate.json"
        if path.is_file() and info.is_file():
            return path, json.loads(info.read_text())["seconds"]
        started = time.perf_counter()
        model = models.build_model(c.surrogate_arch, self.num_classes, image_size=c.image_size, seed=0)
        config = train.TrainConfig(epochs=c.surrogate_epochs, batch_size=c.batch_size, lr=c.surrogate_lr, seed=0)
        history = train.train_classifier(model, self._train_loader(None, seed=0), config, device=self.device,
                                         checkpoint_dir=self.work / "surrogate-ckpt", progress=self.progress)
        seconds = time.perf_counter() - started
        models.save_checkpoint(path, model, resolution=c.image_size, mean=list(self.mean), std=list(self.std))
        _write_json(info, {"seconds": seconds, "train_acc": history["train_acc"][-1], "arch": c.surrogate_arch})
        return path, seconds

    # ---- cells ------------------------------------------------------------
    def prune(self, method: str, ratio: float, seed: int, surrogate: Path) -> Tuple[PruneResult, float]:
        """Prunes (or reloads a saved prune); returns the result and the pruning seconds."""
        c = self.config
        # LM and FM are deterministic given the surrogate: one prune serves every seed.
        seeded = method.partition(":")[0] not in ("lm", "fm")
        name = method.replace(":", "_").replace(",", "_").replace("=", "-")  # a safe folder name
        folder = self.out / "prune" / (f"{name}-r{ratio:.3f}" + (f"-s{seed}" if seeded else ""))
        if (folder / "manifest.json").is_file():
            result = PruneResult.load(folder)
        else:
            # The baselines' early-training runs use the surrogate's recipe.
            recipe = train.TrainConfig(epochs=c.surrogate_epochs, batch_size=c.batch_size, lr=c.surrogate_lr, seed=0)
            result = prune_source(self.source.beton, self.target_train, method=method, ratio=ratio, surrogate=surrogate,
                                  k=c.k, metric=c.metric, weight=c.weight, batch_size=c.batch_size, seed=seed,
                                  train_config=recipe, device=self.device, workdir=self.work, progress=self.progress)
            result.save(folder)
            from fastvote.plots import plot_votes
            plot_votes(result, folder / "votes.png")
        return result, result.manifest["seconds"]["prune"]

    def pretrain(self, indices, seed: int, key: str):
        """Pretrains `arch` from scratch on the source samples at `indices` (all
        when None) for the configured epochs, resumably; returns (model, seconds)."""
        c = self.config
        started = time.perf_counter()
        model = models.build_model(c.arch, self.num_classes, image_size=c.image_size, seed=seed)
        config = train.TrainConfig(epochs=c.epochs, batch_size=c.batch_size, lr=c.lr, seed=seed)
        train.train_classifier(model, self._train_loader(indices, seed), config, device=self.device,
                               checkpoint_dir=self.work / "pretrain" / key, progress=self.progress)
        return model, time.perf_counter() - started

    def _run_cell(self, cell: Cell, surrogate: Path, surrogate_seconds: float) -> List[dict]:
        c = self.config
        done = self.out / "cells" / f"{cell.key}.json"
        if done.is_file():
            return json.loads(done.read_text())
        if cell.method == UNPRUNED:
            indices, kept, prune_seconds, surrogate_seconds = None, list(range(self.num_classes)), 0.0, 0.0
        else:
            result, prune_seconds = self.prune(cell.method, cell.ratio, cell.seed, surrogate)
            indices, kept = result.indices.numpy(), result.kept_classes.tolist()
        model, pretrain_seconds = self.pretrain(indices, cell.seed, cell.key)
        rows = []
        for mode in c.modes:
            epochs, lr = (c.lp_epochs, c.lp_lr) if mode == "linear" else (c.ff_epochs, c.ff_lr)
            target_train, target_val, target_test = self._target_loaders()
            out = train.finetune(model, target_train, target_val, target_test, num_classes=self.target_classes,
                                 mode=mode, epochs=epochs, lr=lr, seed=cell.seed, device=self.device,
                                 progress=self.progress)
            rows.append({
                "method": cell.method, "ratio": round(cell.ratio, 4), "keep": len(kept), "seed": cell.seed,
                "class_wise": cell.method == UNPRUNED or methods.get(cell.method).CLASS_WISE,
                "mode": mode, "test_acc": out["test_acc"], "val_acc": out["val_acc"], "best_epoch": out["best_epoch"],
                "source_samples": len(indices) if indices is not None else self.source.num_rows,
                "surrogate_seconds": surrogate_seconds, "prune_seconds": prune_seconds,
                "pretrain_seconds": pretrain_seconds,
                "kept_classes": " ".join(self.source.class_names[j] if self.source.class_names else str(j) for j in kept),
            })
        _write_json(done, rows)
        return rows

    def cells(self) -> List[Cell]:
        c = self.config
        cells = [Cell(m, r, s) for m in c.methods for r in c.ratios for s in c.seeds]
        if c.unpruned:
            cells += [Cell(UNPRUNED, 0.0, s) for s in c.seeds]
        return cells

    def run(self) -> List[dict]:
        started = time.perf_counter()
        self.prepare()
        _write_json(self.out / "config.json", dataclasses.asdict(self.config))
        surrogate, surrogate_seconds = self.surrogate()
        rows = []
        cells = self.cells()
        for i, cell in enumerate(cells):
            if self.progress:
                print(f"[experiment] cell {i + 1}/{len(cells)}: {cell.key}", flush=True)
            rows += self._run_cell(cell, surrogate, surrogate_seconds)
        write_reports(rows, self.out)
        if self.progress:
            print(f"[experiment] done in {time.perf_counter() - started:.0f} s", flush=True)
        return rows


# --------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------

CSV_FIELDS = ["method", "ratio", "keep", "class_wise", "seed", "mode", "test_acc", "val_acc", "best_epoch", "source_samples",
              "surrogate_seconds", "prune_seconds", "pretrain_seconds", "kept_classes"]


def _write_json(path: Path, obj) -> None:
    _write_text(path, json.dumps(obj, indent=1))


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def summarize(rows: Sequence[dict]) -> Dict[Tuple[str, str, float], List[float]]:
    """(mode, method, ratio) -> test accuracies over seeds."""
    table: Dict[Tuple[str, str, float], List[float]] = {}
    for r in rows:
        table.setdefault((r["mode"], r["method"], float(r["ratio"])), []).append(float(r["test_acc"]))
    return table


def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def results_markdown(rows: Sequence[dict]) -> str:
    """The paper's table shape: methods as rows, ratios as columns, the
    unpruned column; mean +- std over seeds in %; best per column in bold;
    results above unpruned marked with an up arrow."""
    table = summarize(rows)
    out = io.StringIO()
    for mode in sorted({m for m, _, _ in table}):
        ratios = sorted({r for m, meth, r in table if m == mode and meth != UNPRUNED})
        methods_ = [meth for meth in dict.fromkeys(r["method"] for r in rows) if meth != UNPRUNED]
        unpruned = table.get((mode, UNPRUNED, 0.0))
        base = _mean_std(unpruned)[0] if unpruned else None
        # The header's "keep" counts classes; sample-wise methods remove the same
        # fraction of samples instead (results.csv has their sample counts).
        keeps = {float(r["ratio"]): r["keep"] for r in rows if r.get("class_wise", True)}
        out.write(f"\n### Transfer accuracy, {mode} {'probe' if mode == 'linear' else 'finetune'} (%, mean ± std over seeds)\n\n")
        head = ["method"] + [f"ratio {r:.2f}" + (f" (keep {keeps[r]} classes)" if r in keeps else "") for r in ratios] \
            + (["unpruned"] if unpruned else [])
        out.write("| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n")
        best = {r: max((_mean_std(table[(mode, meth, r)])[0] for meth in methods_ if (mode, meth, r) in table),
                       default=None) for r in ratios}
        for meth in methods_:
            cells = [meth.upper() if meth in ("lm", "fm") else meth.capitalize()]
            for r in ratios:
                values = table.get((mode, meth, r))
                if not values:
                    cells.append("-")
                    continue
                mean, std = _mean_std(values)
                text = f"{100 * mean:.1f} ± {100 * std:.1f}"
                if math.isclose(mean, best[r]):
                    text = f"**{text}**"
                if base is not None and mean > base:
                    text += " ↑"
                cells.append(text)
            if unpruned:
                cells.append("")
            out.write("| " + " | ".join(cells) + " |\n")
        if unpruned:
            mean, std = _mean_std(unpruned)
            out.write("| Unpruned | " + " | ".join([""] * len(ratios)) + f" | {100 * mean:.1f} ± {100 * std:.1f} |\n")
        out.write("\nBold: best method per ratio. ↑: above the unpruned source.\n")
    return out.getvalue()


def write_reports(rows: Sequence[dict], out: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r[k] for k in CSV_FIELDS})
    _write_text(out / "results.csv", buf.getvalue())
    _write_text(out / "results.md", "# Results\n" + results_markdown(rows) + "\n" + time_markdown(rows))
    from fastvote.plots import plot_accuracy, plot_time

    plot_accuracy(rows, out / "accuracy_vs_ratio.png")
    plot_time(rows, out / "time_vs_ratio.png")


def time_rows(rows: Sequence[dict]) -> List[dict]:
    """Time to a pretrained model per (method, ratio), mean over seeds and modes."""
    groups: Dict[Tuple[str, float], List[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], float(r["ratio"])), []).append(r)
    out = []
    for (method, ratio), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        parts = {p: statistics.fmean(float(r[f"{p}_seconds"]) for r in rs) for p in ("surrogate", "prune", "pretrain")}
        out.append({"method": method, "ratio": ratio, **parts, "total": sum(parts.values())})
    return out


def time_markdown(rows: Sequence[dict]) -> str:
    lines = ["### Time to a pretrained model (s, mean over seeds)", "",
             "| method | ratio | surrogate | prune | pretrain | total |", "|---|---|---|---|---|---|"]
    for t in time_rows(rows):
        lines.append(f"| {t['method']} | {t['ratio']:.2f} | {t['surrogate']:.1f} | {t['prune']:.1f} | "
                     f"{t['pretrain']:.1f} | {t['total']:.1f} |")
    return "\n".join(lines) + "\n"
