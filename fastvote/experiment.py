"""The paper's protocol as one recipe: train a surrogate on the source ->
prune with each method at each ratio -> pretrain on every subset (and on the
whole source) -> transfer to the target(s) -> a table, a CSV and plots.

Every knob is a field of ExperimentConfig with a default (the defaults are the
offline demo: haystack -> digits on two CPU cores); a TOML file overrides any
of them. Every data read goes through FFCV. A rerun with the same run folder
skips every finished cell (and resumes an interrupted pretraining).

The paper's other settings are options, each tested small (tests/test_settings.py):
  - pretraining = "moco" (MoCo v2 self-supervised, then linear probe; FM with
    centroids = "kmeans" is label-free) or "adversarial" (PGD, pgd_eps, pgd_steps);
  - ablations ride on a method's name, like its own options, and each becomes a
    row of the table: "lm:reverse=true" (keep the least voted), "lm:k=5",
    "fm:weight=rank", "lm:surrogate_arch=resnet18", "lm:surrogate_epochs=1"
    (an under-trained surrogate);
  - extra_targets (multi-task: several targets vote together, the model transfers
    to each) and target_shots (k-shot training splits);
  - source architectures beyond ResNets (arch = "vit_t_16" / "vit_s_16" /
    "vit_b_16" with optimizer = "adamw", schedule = "cosine", warmup_epochs);
  - source_bias (label noise / class imbalance in part of the source: results.md
    says what voting kept of it);
  - feature_plot: the source class centroids and target features in the
    surrogate's feature space, kept vs pruned classes marked (prune/*/features.png).

Under torchrun the experiment runs distributed unchanged: DDP training with
sharded FFCV loaders, sharded votes, rank 0 writing every file.

    fastvote experiment --config my.toml --out runs/exp
    fastvote demo --out runs/demo
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from fastvote import data as fvdata
from fastvote import distributed, methods, models, train
from fastvote.atomic import check_output_folder, claim, owner, write_json
from fastvote.data.loaders import keep_threads
from fastvote.rng import keeps_rng
from fastvote import surrogate as surrogates
from fastvote.inputs import resolve as resolve_input
from fastvote.prune import PruneResult, prune as prune_source
from fastvote.report import UNPRUNED, write_reports
from fastvote.select import keep_count

# `fastvote experiment` runs every method. The sample-wise ones keep round(N (1 - ratio)) samples:
# on a source of equal classes (haystack: 30 x 500), exactly what LM and FM keep at that ratio.
ALL_METHODS = ("lm", "fm", "random", "random-sample", "moderate", "grand", "el2n", "forgetting", "ccs", "ssp",
               "normsim", "normsim:p=2", "fm+normsim")
# The demo tells the paper's time story within 10 minutes on two CPU cores: the
# pretrained model ("small", 16x the tiny surrogate's parameters, about 5x its
# training time here) is where a pruned source saves, and the surrogate trains
# half the model's epochs, so that at 80% pruning surrogate + prune + pretraining
# stay under half the unpruned pretraining. Its cost is the pretraining cells:
# the two voting methods and the random-class bar at two ratios, two seeds.
DEMO = dict(methods=("lm", "fm", "random"), ratios=(2 / 3, 0.8), arch="small", surrogate_epochs=3)
PRETRAININGS = ("supervised", "moco", "adversarial")
FEATURE_PLOTS = ("pca", "tsne", "none")
# Options the experiment takes off a method's name for itself (ablations of
# the surrogate's recipe): "lm:surrogate_arch=resnet18", "lm:surrogate_epochs=1".
# The voting ablations ("lm:reverse=true,k=3") are the method's own options.
SURROGATE_ABLATIONS = (
    methods.Option("surrogate_arch", str, None, "the surrogate's architecture for this method",
                   choices=models.ARCHS),
    methods.Option("surrogate_epochs", int, None, "the surrogate's training epochs for this method", low=0),
)


@dataclass
class ExperimentConfig:
    """One experiment. Ratios are the fraction REMOVED: of source classes for
    the class-wise methods (lm, fm, random), of source samples for the
    sample-wise baselines."""

    source: str = "haystack"               # registry name or .beton
    target: str = "digits"                 # registry name with train/test splits, or a pair of betons
    target_test: Optional[str] = None      # the test .beton when `target` is a .beton
    extra_targets: Tuple[str, ...] = ()    # multi-task: more registry targets voting with `target`
    target_shots: int = 10                 # k-shot training split of every registry target
    val_shots: int = 3                     # per class, carved from the target's training split
    methods: Tuple[str, ...] = ALL_METHODS  # "name:key=value" passes a method's options and ablations
    ratios: Tuple[float, ...] = (0.5, 2 / 3, 0.8)
    unpruned: bool = True                  # also pretrain on the whole source
    seeds: Tuple[int, ...] = (0, 1)
    image_size: int = 16                   # surrogate and model input side in px
    crop_scale: Tuple[float, float] = (1.0, 1.0)  # RandomResizedCrop area range; (1, 1) = none
    flip: bool = False                     # horizontal flips (off: mirrored digits are other glyphs)
    source_bias: Optional[str] = None      # e.g. "label_noise=0.4,classes=10;11;12" (fastvote.data.BiasSpec)
    # surrogate
    surrogate_arch: str = "tiny"
    surrogate_epochs: int = 6
    surrogate_lr: float = 0.2
    # vote
    k: int = 1
    metric: str = "l2"
    weight: str = "count"
    centroids: str = "class"               # FM: class means, or "kmeans" (label-free)
    # pretraining (the same epochs whatever the subset size: that is the speed-up)
    pretraining: str = "supervised"        # "supervised", "moco" or "adversarial"
    arch: str = "tiny"
    epochs: int = 6
    lr: float = 0.2
    batch_size: int = 256
    optimizer: str = "sgd"                 # "adamw" with schedule "cosine" is the release's ViT recipe
    schedule: str = "triangular"
    warmup_epochs: float = 0.0
    weight_decay: float = 5e-5
    pgd_eps: float = 3 / 255               # adversarial: L-inf radius in pixels
    pgd_steps: int = 3
    moco_lr: float = 0.06
    moco_queue: int = 4096                 # keys in the queue (the paper: 65536 for 1.28M images)
    moco_temperature: float = 0.2
    moco_crop_scale: Tuple[float, float] = (0.2, 1.0)
    # transfer
    modes: Tuple[str, ...] = ("linear",)
    lp_epochs: int = 50
    lp_lr: float = 0.01
    ff_epochs: int = 20
    ff_lr: float = 1e-4
    feature_plot: str = "pca"              # "pca", "tsne" or "none"
    device: Optional[str] = None
    # Torch threads on CPU. Small convolutions gain nothing from a second
    # thread, and on a busy 2-core machine OpenMP barriers made two threads up
    # to 10x slower than one (measured); None keeps torch's choice.
    cpu_threads: Optional[int] = 1

    @classmethod
    def from_toml(cls, path, **overrides) -> "ExperimentConfig":
        with open(path, "rb") as f:
            values = tomllib.load(f)
        return cls.from_dict({**values, **overrides}, origin=str(path))

    @classmethod
    def from_dict(cls, values: dict, origin: str = "settings") -> "ExperimentConfig":
        """A config from plain values (TOML, --set): lists become tuples; unknown names are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"{origin}: unknown setting(s) {unknown}; expected some of {sorted(names)}")
        tuples = {f.name for f in dataclasses.fields(cls) if str(f.type).startswith("Tuple")}
        return cls(**{k: tuple(v) if k in tuples and isinstance(v, list) else v for k, v in values.items()})

    def validate(self, num_classes: int) -> None:
        for m in self.methods:
            self.spec(m)
        for r in self.ratios:
            keep_count(num_classes, ratio=r)
        for mode in self.modes:
            if mode not in train.FINETUNE_MODES:
                raise ValueError(f"modes: {mode!r} is unknown; expected some of {train.FINETUNE_MODES}")
        if not self.seeds:
            raise ValueError("seeds is empty; expected at least one seed")
        if self.pretraining not in PRETRAININGS:
            raise ValueError(f"pretraining={self.pretraining!r}: expected one of {list(PRETRAININGS)}")
        if self.pretraining == "moco" and "full" in self.modes:
            raise ValueError("pretraining='moco' transfers by linear probe (the paper's protocol); "
                             "use modes=['linear']")
        if self.feature_plot not in FEATURE_PLOTS:
            raise ValueError(f"feature_plot={self.feature_plot!r}: expected one of {list(FEATURE_PLOTS)}")
        if self.extra_targets and self.target.endswith(".beton"):
            raise ValueError("extra_targets need registry targets (the k-shot splits are built from the registry)")
        if self.source_bias is not None:
            fvdata.BiasSpec.parse(self.source_bias)
        self.recipe()  # TrainConfig checks the optimizer, schedule and warmup

    def spec(self, method: str, num_targets: int = 1) -> methods.MethodSpec:
        """`method` as fastvote.prune will run it: the config's k, metric,
        weight and centroids apply where the method takes them; the surrogate
        ablations come back in spec.extra."""
        return methods.parse(method, defaults={"k": self.k, "metric": self.metric, "weight": self.weight,
                                               "centroids": self.centroids,
                                               "normalize_targets": num_targets > 1},
                             extra=SURROGATE_ABLATIONS)

    def recipe(self, seed: int = 0) -> train.TrainConfig:
        """The pretraining recipe (supervised and adversarial)."""
        return train.TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, seed=seed,
                                 optimizer=self.optimizer, schedule=self.schedule,
                                 warmup_epochs=self.warmup_epochs, weight_decay=self.weight_decay)


@dataclass
class Cell:
    """One pretrained model: a method at a ratio (or the whole source) and a seed."""

    method: str
    ratio: float
    seed: int

    @property
    def key(self) -> str:
        return f"{_safe(self.method)}-r{self.ratio:.3f}-s{self.seed}"


def _safe(method: str) -> str:
    """A method string as a folder name."""
    return method.replace(":", "_").replace(",", "_").replace("=", "-").replace(";", "+")


@dataclass
class _Target:
    """One transfer target: its betons, k-shot train / validation rows, classes."""

    name: str
    train: Path
    test: Path
    train_idx: np.ndarray
    val_idx: np.ndarray
    num_classes: int
    loaders: Optional[dict] = None  # built once (see Experiment._target_loaders)


# --------------------------------------------------------------------------

class Experiment:
    def __init__(self, config: ExperimentConfig, out: os.PathLike, progress: bool = True, overwrite: bool = False):
        """out: the run folder, new or empty or an earlier run's (rerun to
        resume); a folder holding anything else is refused before any compute
        unless overwrite=True (then the run writes into it, keeping its files)."""
        self.config = config
        self.out = check_output_folder(out, "experiment", overwrite=overwrite)
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        distributed.init_from_env(self.device)  # under torchrun: join the group
        self.device = distributed.local_device(self.device)
        self.progress = progress and distributed.is_main()
        self.work = self.out / "work"
        self._features = None
        if distributed.is_main():
            claim(self.out, "experiment", overwrite=overwrite)
            (self.out / "cells").mkdir(exist_ok=True)

    # ---- data -------------------------------------------------------------
    def prepare(self) -> None:
        """Resolves (and biases) the source, writes the target betons, carves validation."""
        c = self.config
        # Picks the loader back end, importing ffcv (7 s on a 2-core CPU): process start-up,
        # not the first timed phase's (the surrogate's) cost.
        fvdata.backend()
        with distributed.main_first():  # rank 0 writes the betons
            self.source = resolve_input(c.source, "source", self.work, self.progress)
            if self.source.labels is None:
                raise ValueError("the experiment pretrains on a labelled source (its classes are what is pruned)")
            self.bias = None
            if c.source_bias:
                spec = fvdata.BiasSpec.parse(c.source_bias)
                path = self.work / "betons" / f"source-biased-{hashlib.sha256(spec.text().encode()).hexdigest()[:12]}.beton"
                if not path.is_file():
                    fvdata.write_biased(self.source.beton, spec, path, progress=self.progress)
                self.bias = fvdata.read_bias(path)
                self.source = resolve_input(path, "source", self.work, self.progress)
            self.num_classes = self.source.num_classes
            c.validate(self.num_classes)
            self.targets = [self._prepare_target(name, test) for name, test in
                            [(c.target, c.target_test)] + [(t, None) for t in c.extra_targets]]
        self.mean, self.std = fvdata.channel_stats(self.source.beton)

    def _prepare_target(self, name: str, test: Optional[str]) -> _Target:
        c = self.config
        if name.endswith(".beton"):
            if not test:
                raise ValueError("target is a .beton, so target_test= must name the test .beton")
            train_beton, test_beton = Path(name), Path(test)
            labels = fvdata.read_columns(train_beton)["labels"]
            shots_idx = np.arange(len(labels))
        else:
            # A registry target built k-shot (digits) is written so; any other is
            # written whole and its k-shot rows picked here.
            builds_shots = "shots" in fvdata.options(name)
            tag = f"{c.target_shots}shot" if builds_shots else "full"
            train_beton = self.work / "betons" / f"{name}-train-{tag}.beton"
            test_beton = self.work / "betons" / f"{name}-test-{tag}.beton"
            for split, path in (("train", train_beton), ("test", test_beton)):
                if not path.is_file():
                    kw = {"shots": c.target_shots} if builds_shots else {}
                    fvdata.write_offline(name, split, path, progress=self.progress, **kw)
            labels = fvdata.read_columns(train_beton)["labels"]
            shots_idx = np.arange(len(labels)) if builds_shots else np.sort(
                fvdata.split_indices(labels, c.target_shots, seed=0)[0])
        num_classes = int(max(labels.max(), fvdata.read_columns(test_beton)["labels"].max())) + 1
        # Validation is carved from the k-shot training rows; the test split only scores the chosen epoch.
        val, rest = fvdata.split_indices(labels[shots_idx], c.val_shots, seed=0)
        return _Target(name=Path(name).stem if name.endswith(".beton") else name, train=train_beton,
                       test=test_beton, train_idx=shots_idx[rest], val_idx=shots_idx[val], num_classes=num_classes)

    def _eval_loader(self, beton, indices=None, sharded: bool = False):
        c = self.config
        return fvdata.eval_loader(beton, c.batch_size, resolution=c.image_size, mean=self.mean, std=self.std,
                                  indices=indices, device=self.device, distributed=sharded,
                                  crop_ratio=fvdata.default_crop_ratio(c.image_size))

    def _train_loader(self, indices, seed: int, augment: bool = True):
        """The source's training loader over `indices` (all when None), sharded
        under torchrun; augment=False: no crop, no flip (MoCo augments itself).
        drop_last=True, the release's pretraining recipe (a subset smaller than
        one batch is a ValueError naming both numbers)."""
        c = self.config
        scale, flip = (c.crop_scale, c.flip) if augment else ((1.0, 1.0), False)
        aspect = (1.0, 1.0) if scale == (1.0, 1.0) else (3 / 4, 4 / 3)
        return fvdata.train_loader(
            self.source.beton, c.batch_size, resolution=c.image_size, mean=self.mean, std=self.std,
            indices=indices, seed=seed, device=self.device, scale=scale, ratio=aspect, flip=flip,
            distributed=distributed.active(), drop_last=True)

    def _target_loaders(self, target: _Target, mode: str):
        """A target's train / validation / test loaders, built once: every cell
        reads the same target, and each FFCV loader costs a compile. Under
        torchrun a full finetune is DDP over a sharded training loader; the
        linear probe reads every training sample on every rank (cached features)."""
        if target.loaders is None:
            sharded = distributed.active() and "full" in self.config.modes
            target.loaders = {"train": self._eval_loader(target.train, target.train_idx),
                              "val": self._eval_loader(target.train, target.val_idx),
                              "test": self._eval_loader(target.test),
                              "train-sharded": self._eval_loader(target.train, target.train_idx, sharded=True)
                              if sharded else None}
        loaders = target.loaders
        train_loader = loaders["train-sharded"] if mode == "full" and loaders["train-sharded"] else loaders["train"]
        return train_loader, loaders["val"], loaders["test"]

    # ---- surrogate --------------------------------------------------------
    def surrogate(self, arch: Optional[str] = None, epochs: Optional[int] = None) -> Tuple[Path, float]:
        """Trains (or reuses) a surrogate (default: the configured one; an
        ablation may ask for another architecture or fewer epochs) with
        fastvote.surrogate's one recipe and cache key; returns its checkpoint
        and training seconds."""
        c = self.config
        arch, epochs = arch or c.surrogate_arch, c.surrogate_epochs if epochs is None else epochs
        default = (arch, epochs) == (c.surrogate_arch, c.surrogate_epochs)
        name = "surrogate" if default else f"surrogate-{arch}-e{epochs}"
        recipe = surrogates.Recipe(
            arch=arch, resolution=c.image_size, mean=tuple(self.mean), std=tuple(self.std),
            config=train.TrainConfig(epochs=epochs, batch_size=c.batch_size, lr=c.surrogate_lr, seed=0),
            scale=tuple(c.crop_scale), ratio=(1.0, 1.0) if tuple(c.crop_scale) == (1.0, 1.0) else (3 / 4, 4 / 3),
            flip=c.flip, seed=0)
        path, info = surrogates.train(recipe, self.source, self.out / f"{name}.pt", device=self.device,
                                      progress=self.progress, announce=False, workdir=self.work)
        return path, info["seconds"]

    # ---- cells ------------------------------------------------------------
    def prune(self, method: str, ratio: float, seed: int, surrogate: Path) -> Tuple[PruneResult, float]:
        """Prunes (or reloads a saved prune); returns the result and the pruning seconds."""
        c = self.config
        spec = c.spec(method, len(self.targets))
        # LM and FM are deterministic given the surrogate: one prune serves every seed.
        seeded = spec.name not in ("lm", "fm")
        folder = self.out / "prune" / (f"{_safe(method)}-r{ratio:.3f}" + (f"-s{seed}" if seeded else ""))
        if distributed.broadcast_object((folder / "manifest.json").is_file()):
            result = PruneResult.load(folder)
            return result, result.manifest["seconds"]["prune"]
        # The baselines' early-training runs use the surrogate's recipe.
        recipe = train.TrainConfig(epochs=c.surrogate_epochs, batch_size=c.batch_size, lr=c.surrogate_lr, seed=0)
        result = prune_source(self.source.beton, [t.train for t in self.targets], method=spec, ratio=ratio,
                              surrogate=surrogate, batch_size=c.batch_size, seed=seed, train_config=recipe,
                              device=self.device, workdir=self.work, progress=self.progress)
        if distributed.is_main():
            result.save(folder)
            self._plot_features(result, surrogate, folder / "features.png")
        distributed.barrier()
        return result, result.manifest["seconds"]["prune"]

    def _plot_features(self, result: PruneResult, surrogate: Path, path: Path) -> None:
        """Source class centroids and target features in the surrogate's feature
        space, kept vs pruned classes marked (class-wise methods on labels)."""
        c = self.config
        if c.feature_plot == "none" or result.unit == "samples" or result.manifest.get("selection", {}).get(
                "centroids") == "kmeans":
            return
        from fastvote.analysis import feature_space, plot_feature_space
        from fastvote.features import collect

        if self._features is None or self._features[0] != surrogate:
            model = models.load_model(surrogate)
            source = collect(model, self._eval_loader(self.source.beton), device=self.device, want=("features",),
                             progress=False)
            target = collect(model, self._eval_loader(self.targets[0].train, self.targets[0].train_idx),
                             device=self.device, want=("features",), progress=False)
            self._features = (surrogate, source, target)
        _, source, target = self._features
        embedding = feature_space(source["features"], source["labels"], target["features"], result.kept_classes,
                                  method=c.feature_plot, metric=c.metric, num_classes=self.num_classes,
                                  source_points=min(2000, len(source["labels"])), seed=0)
        plot_feature_space(embedding, path, class_names=result.class_names,
                           title=f"{result.method}, ratio {result.ratio:.2f}: surrogate feature space "
                                 f"({c.feature_plot.upper()}), target {self.targets[0].name}")

    def pretrain(self, indices, seed: int, key: str):
        """Pretrains `arch` from scratch on the source samples at `indices` (all
        when None) for the configured epochs, resumably, as `pretraining` says;
        returns (model, seconds)."""
        c = self.config
        started = time.perf_counter()
        model = models.build_model(c.arch, self.num_classes, image_size=c.image_size, seed=seed)
        checkpoint_dir = self.work / "pretrain" / key
        if c.pretraining == "moco":
            from fastvote.ssl import MocoConfig, pretrain_moco

            config = MocoConfig(epochs=c.epochs, batch_size=c.batch_size, lr=c.moco_lr, queue_size=c.moco_queue,
                                temperature=c.moco_temperature, crop_scale=c.moco_crop_scale, flip=c.flip, seed=seed)
            history = pretrain_moco(model, self._train_loader(indices, seed, augment=False), config,
                                    mean=self.mean, std=self.std, device=self.device,
                                    checkpoint_dir=checkpoint_dir, progress=self.progress)
        else:
            perturb = None
            if c.pretraining == "adversarial":
                from fastvote.adversarial import PGD

                perturb = PGD(mean=self.mean, std=self.std, eps=c.pgd_eps, steps=c.pgd_steps)
            history = train.train_classifier(model, self._train_loader(indices, seed), c.recipe(seed),
                                             device=self.device, checkpoint_dir=checkpoint_dir,
                                             progress=self.progress, perturb=perturb)
        # A resumed run's epochs happened earlier: count them from the history.
        return model, max(time.perf_counter() - started, sum(history["seconds"]))

    def _run_cell(self, cell: Cell) -> List[dict]:
        c = self.config
        done = self.out / "cells" / f"{cell.key}.json"
        finished = distributed.broadcast_object(json.loads(done.read_text()) if distributed.is_main()
                                                and done.is_file() else None)
        if finished is not None:
            return finished
        if cell.method == UNPRUNED:
            indices, kept, prune_seconds, surrogate_seconds = None, list(range(self.num_classes)), 0.0, 0.0
            names = self.source.class_names or [str(j) for j in kept]
        else:
            spec = c.spec(cell.method, len(self.targets))
            # Every cell gets a surrogate (the feature plot reads it too), but
            # only methods that need one pay for it. The surrogate is trained
            # once and its full time charged to each such cell: what the method
            # costs on its own. prune_seconds is what this cell's prune took:
            # work cached by an earlier cell (surrogate outputs, baseline
            # scores, training runs) costs only its reading (report.TIME_NOTE).
            surrogate, surrogate_seconds = self.surrogate(spec.extra.get("surrogate_arch"),
                                                          spec.extra.get("surrogate_epochs"))
            surrogate_seconds = surrogate_seconds if spec.uses_surrogate else 0.0
            result, prune_seconds = self.prune(cell.method, cell.ratio, cell.seed, surrogate)
            indices, kept, names = result.indices.numpy(), result.kept_classes.tolist(), result.kept_names
            if result.manifest.get("selection", {}).get("centroids") == "kmeans":
                kept = None  # K-means clusters, not source classes: names say "cluster j"
        model, pretrain_seconds = self.pretrain(indices, cell.seed, cell.key)
        rows = []
        for target in self.targets:
            for mode in c.modes:
                epochs, lr = (c.lp_epochs, c.lp_lr) if mode == "linear" else (c.ff_epochs, c.ff_lr)
                target_train, target_val, target_test = self._target_loaders(target, mode)
                out = train.finetune(model, target_train, target_val, target_test, num_classes=target.num_classes,
                                     mode=mode, epochs=epochs, lr=lr, seed=cell.seed, device=self.device,
                                     progress=self.progress)
                rows.append({
                    "target": target.name, "method": cell.method, "ratio": round(cell.ratio, 4), "keep": len(names),
                    "seed": cell.seed, "pretraining": c.pretraining,
                    "class_wise": cell.method == UNPRUNED or c.spec(cell.method).class_wise,
                    "mode": mode, "test_acc": out["test_acc"], "val_acc": out["val_acc"],
                    "best_epoch": out["best_epoch"],
                    "source_samples": len(indices) if indices is not None else self.source.num_rows,
                    "surrogate_seconds": surrogate_seconds, "prune_seconds": prune_seconds,
                    "pretrain_seconds": pretrain_seconds,
                    "kept_classes": "; ".join(names), "kept_ids": kept,
                })
        if distributed.is_main():
            write_json(done, rows)
        return rows

    def cells(self) -> List[Cell]:
        c = self.config
        cells = [Cell(m, r, s) for m in c.methods for r in c.ratios for s in c.seeds]
        if c.unpruned:
            cells += [Cell(UNPRUNED, 0.0, s) for s in c.seeds]
        return cells

    @keeps_rng
    def run(self) -> List[dict]:
        """Runs (or resumes) every cell and writes the tables and plots. The
        run uses `cpu_threads` torch threads on a CPU and gives the caller's
        thread count and random generators back at the end."""
        with keep_threads():
            if self.device.type == "cpu" and self.config.cpu_threads:
                torch.set_num_threads(self.config.cpu_threads)
            return self._run()

    def _run(self) -> List[dict]:
        started = time.perf_counter()
        self.prepare()
        if distributed.is_main():
            write_json(self.out / "config.json", dataclasses.asdict(self.config))
        rows = []
        cells = self.cells()
        for i, cell in enumerate(cells):
            if self.progress:
                print(f"[experiment] cell {i + 1}/{len(cells)}: {cell.key}", flush=True)
            rows += self._run_cell(cell)
        if distributed.is_main():
            from fastvote.plots import plot_accuracy, plot_time  # matplotlib only when plotting

            write_reports(rows, self.out, bias=self.bias)
            plot_accuracy(rows, self.out / "accuracy_vs_ratio.png")
            plot_time(rows, self.out / "time_vs_ratio.png")
            write_json(self.out / "manifest.json", dict(owner("experiment"), complete=True, cells=len(cells),
                                                        seconds=time.perf_counter() - started))
        distributed.barrier()
        if self.progress:
            print(f"[experiment] done in {time.perf_counter() - started:.0f} s", flush=True)
        return rows
