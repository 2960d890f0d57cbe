"""The surrogate: the small model whose outputs vote. One module for every way
to get one (trained on the source, a checkpoint, a user's nn.Module), one
cache key and seeded construction, used by ``fastvote.prune``,
``fastvote surrogate train`` and the experiment.

:func:`resolve` is cheap: it checks the argument, loads a checkpoint, decides
the preprocessing and the fingerprint that names the surrogate in every cache
key. Only :meth:`Surrogate.model` trains (or reads a cached training).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

import torch

from fastvote import data as fvdata
from fastvote import distributed
from fastvote.atomic import write_json
from fastvote.features import autocast, precision, resolve_amp
from fastvote.inputs import Input, fingerprint_tensors

DEFAULT_ARCH = "resnet18"


@dataclass(frozen=True)
class Recipe:
    """How a surrogate is trained on a source; the weights depend on nothing
    else (with the source and the training's precision on the device), so these
    are the cache key (:meth:`key`).

    The model is built under `seed` and the loader's order follows it
    (config.seed seeds each epoch's randomness)."""

    arch: str
    resolution: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    config: object  # fastvote.train.TrainConfig
    scale: Tuple[float, float] = (1.0, 1.0)
    ratio: Tuple[float, float] = (1.0, 1.0)
    flip: bool = False
    seed: int = 0

    @classmethod
    def default(cls, arch: str, resolution: int, mean, std, config, seed: int) -> "Recipe":
        """prune()'s and the CLI's recipe: the crop fastvote.data.default_crop
        gives this resolution, no flips (digits and text mirror into other glyphs)."""
        crop = fvdata.default_crop(resolution)
        return cls(arch=arch, resolution=int(resolution), mean=tuple(map(float, mean)), std=tuple(map(float, std)),
                   config=config, scale=tuple(crop["scale"]), ratio=tuple(crop["ratio"]), flip=False, seed=seed)

    @property
    def prep(self) -> dict:
        return {"resolution": self.resolution, "mean": list(self.mean), "std": list(self.std)}

    def key(self, source_fingerprint: str, device) -> str:
        """The cache key of the weights this recipe trains on `device`: with
        amp=None a CPU with bf16 units trains in bfloat16, another in float32."""
        what = [source_fingerprint, self.arch, self.prep, repr(self.config), list(self.scale), list(self.ratio),
                self.flip, self.seed, precision(self.config.amp, device)]
        return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]


def default_config(seed: int):
    """The surrogate's training recipe when none is given: TrainConfig's
    defaults (the release's ResNet-18 recipe), seeded."""
    from fastvote.train import TrainConfig

    return TrainConfig(seed=seed)


def _scratch(path: Path, workdir: Path, folder: str, suffix: str = "") -> Path:
    """Where the workdir keeps a checkpoint's lock or resume state: named by
    its resolved path, so nothing but the checkpoint lands beside a user's file."""
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    return workdir / folder / f"{path.name}-{digest}{suffix}"


@contextlib.contextmanager
def _locked(path: Path, workdir: Path):
    """An exclusive lock on the checkpoint `path`, kept in the workdir: two runs
    that need the same surrogate train it once (the second waits, then finds it
    cached)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = _scratch(path, workdir, "locks", ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def train(recipe: Recipe, source: Input, path: Path, *, device, progress: bool = True,
          announce: bool = True, workdir: Optional[Path] = None,
          implicit: bool = False) -> Tuple[Path, dict]:
    """Trains `recipe` on the source beton into the checkpoint `path` (with
    `path`.json: seconds, train accuracy, the recipe's key), or reuses it when
    that json names the same key. Under torchrun: DDP, rank 0 writes.
    `workdir` (default: fastvote.inputs.workdir_path(None)) keeps the
    lock and the resume state of a killed run, not `path`'s folder.
    `implicit`: trained because no surrogate was given (the announcement says
    so and names the alternatives). Returns (path, info)."""
    from fastvote import models, train as fvtrain
    from fastvote.inputs import workdir_path

    key = recipe.key(source.fingerprint, device)
    info_path = path.with_name(path.name + ".json")

    def cached() -> Optional[dict]:
        if path.is_file() and info_path.is_file():
            info = json.loads(info_path.read_text())
            if info.get("key") == key:
                return info
        return None

    workdir = workdir_path(workdir)
    lock = _locked(path, workdir) if distributed.is_main() else contextlib.nullcontext()
    with lock:
        info = distributed.broadcast_object(cached() if distributed.is_main() else None)
        if info is not None:
            return path, dict(info, reused_from_cache=True)
        started = time.perf_counter()
        model = models.build_model(recipe.arch, source.num_classes, image_size=recipe.resolution, seed=recipe.seed)
        # channels-last weights on every device (training_setup does it on CUDA): oneDNN's fast
        # convolutions, a CPU training step 1.1-1.2x fp32 NCHW (benchmarks/RESULTS.md, issue 23)
        model.to(memory_format=torch.channels_last)
        if announce and distributed.is_main():
            seconds = _estimate_seconds(model, recipe, source.num_rows, device)
            print(_announcement(recipe, model, source, device, seconds, implicit), flush=True)
        # The release's recipe drops the last partial batch; a source smaller than one
        # batch trains on all of it as one batch instead (train_classifier warns).
        whole_batches = source.num_rows >= recipe.config.batch_size * distributed.world_size()
        loader = fvdata.train_loader(source.beton, recipe.config.batch_size, resolution=recipe.resolution,
                                     mean=recipe.mean, std=recipe.std, seed=recipe.seed, device=device,
                                     scale=recipe.scale, ratio=recipe.ratio, flip=recipe.flip,
                                     distributed=distributed.active(), drop_last=whole_batches)
        resume = _scratch(path, workdir, "resume", f"-{key}")  # a killed run with this recipe goes on from here
        history = fvtrain.train_classifier(model, loader, recipe.config, device=device, progress=progress,
                                           checkpoint_dir=resume)
        info = {"key": key, "arch": recipe.arch, "epochs": recipe.config.epochs,
                "seconds": time.perf_counter() - started, "train_acc": history["train_acc"][-1]}
        model.to(memory_format=torch.contiguous_format)  # the checkpoint in the usual layout
        if distributed.is_main():
            models.save_checkpoint(path, model, class_names=source.class_names, **recipe.prep)
            write_json(info_path, info)
        distributed.barrier()
        if distributed.is_main():
            shutil.rmtree(resume, ignore_errors=True)  # the checkpoint holds it all now
    return path, dict(info, reused_from_cache=False)


def _estimate_seconds(model: torch.nn.Module, recipe: Recipe, num_rows: int, device) -> float:
    """Training time from one timed step on a random batch (after a warm-up
    step); the weights are left as they were."""
    device = torch.device(device)
    batch = min(recipe.config.batch_size, max(num_rows, 1))
    x = torch.randn(batch, 3, recipe.resolution, recipe.resolution, device=device)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.to(device).train()
    timings = []
    for _ in range(2):
        started = time.perf_counter()
        with autocast(device, resolve_amp(recipe.config.amp, device)):  # as train_classifier steps
            loss = model(x).float().logsumexp(1).mean()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings.append(time.perf_counter() - started)
    model.zero_grad(set_to_none=True)
    model.load_state_dict(state)  # BatchNorm statistics moved: put them back
    steps = -(-num_rows // recipe.config.batch_size) * recipe.config.epochs
    return timings[-1] * steps


def _duration(seconds: float) -> str:
    """'25 s' below a minute, '3 min' above (an estimate: no false precision)."""
    return f"{max(1, round(seconds))} s" if seconds < 59.5 else f"{max(1, round(seconds / 60))} min"


def _announcement(recipe: Recipe, model: torch.nn.Module, source: Input, device, seconds: float,
                  implicit: bool) -> str:
    """What will be trained, for how long; and, only when the wait is a minute
    or more, the faster choices the caller has not already made."""
    config = recipe.config
    params = sum(p.numel() for p in model.parameters())
    default = ", the paper's recipe" if recipe.arch == DEFAULT_ARCH and config == default_config(config.seed) else ""
    what = (f"{recipe.arch} ({params:,} parameters{default}) for {config.epochs} "
            f"epoch{'s' if config.epochs != 1 else ''}, batch {config.batch_size}, on {source.num_rows:,} source "
            f"images at {recipe.resolution} px "
            f"({source.description}), about {_duration(seconds)} on {device} (one step timed, plus the loader's start-up)")
    text = (f"[fastvote] no surrogate given, so training one first: {what}; cached for later runs" if implicit
            else f"[fastvote] training the surrogate: {what}")
    faster = ([] if recipe.arch == "tiny" else ["arch='tiny' (--arch tiny)"]) + \
        ([] if config.epochs <= 1 else ["fewer epochs (train_config=TrainConfig(epochs=...), --epochs)"]) + \
        (["a trained surrogate (surrogate=<checkpoint>, --surrogate)"] if implicit else [])
    if seconds >= 60 and faster:
        text += ". Faster: " + ", or ".join(faster)
    return text


_WEIGHTS: dict = {}  # (resolved path, size, mtime_ns, arch) -> fingerprint: a checkpoint is hashed once a process


def fingerprint_weights(model: torch.nn.Module, path: Optional[Path] = None, stat: Optional[os.stat_result] = None,
                        arch: Optional[str] = None) -> str:
    """Names weights by their content: every state_dict tensor's name, dtype,
    shape and bytes (fastvote.inputs.fingerprint_tensors), never a file's
    bytes — torch.save records the temporary file's name, so a checkpoint
    written twice, or by a run resumed after a kill, differs byte-wise while
    its tensors are equal. `model` loaded from `path` (as `stat` found it
    before the load, with `arch` for a state dict): remembered per (path,
    size, mtime) for the process's next resolve (hashing a 1 GB checkpoint
    takes about 2 s)."""
    if path is None:
        return fingerprint_tensors(dict(model.state_dict()))
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, arch)
    if memo not in _WEIGHTS:
        _WEIGHTS[memo] = fingerprint_tensors(dict(model.state_dict()))
    return _WEIGHTS[memo]


@dataclass
class Surrogate:
    """A surrogate as prune() will use it, decided before anything expensive.

    kind: "trained" (on the source, from `recipe`), "checkpoint" or "module".
    fingerprint: names it in every cache key; a trained one is named by its
        recipe and source (known before training), so precomputed outputs
        recorded with it can be checked up front.
    prep: the preprocessing its inputs get (resolution, mean, std).
    num_classes: its head width (None when unknown).
    """

    kind: str
    fingerprint: str
    prep: dict
    num_classes: Optional[int]
    entry: dict
    recipe: Optional[Recipe] = None  # how a "trained" one is trained
    _load: Optional[Callable[..., torch.nn.Module]] = field(default=None, repr=False)
    _model: Optional[torch.nn.Module] = field(default=None, repr=False)
    _weights: Optional[str] = field(default=None, repr=False)  # a trained one's fingerprint_weights

    def model(self, device, progress: bool = True) -> torch.nn.Module:
        """The model in eval mode on `device` (trained or loaded once)."""
        if self._model is None:
            started = time.perf_counter()
            self._model = self._load(device, progress).to(device).eval()
            self.entry.setdefault("seconds", time.perf_counter() - started)
        return self._model

    def outputs_key(self, precision: str) -> str:
        """Names this surrogate's outputs in the feature cache: its weights'
        content (a trained one's once trained; equal after a resume), its
        preprocessing and the pass's `precision` (fastvote.features.precision)."""
        weights = self.fingerprint
        if self.kind == "trained":
            if self._weights is None:
                from fastvote import models

                model = self._model if self._model is not None else models.load_model(self.entry["path"])
                self._weights = fingerprint_weights(model)
            weights = self._weights
        return hashlib.sha256(json.dumps([weights, self.prep, precision]).encode()).hexdigest()[:24]


def _preprocessing(own: Optional[dict], source: Input, image_size, mean, std, what: str) -> dict:
    """Explicit arguments win, then what the weights record or publish (a
    checkpoint's extras, timm's pretrained_cfg, torchvision's weight
    transforms: resize + centre crop, their interpolation), then the source's size and
    channel statistics (with a warning for weights that did not say: a 224-px
    ImageNet model fed 28-px images with the source's statistics votes noise) and the
    eval loader's defaults for that size (above 64 px torchvision's 256 -> 224 bilinear).
    The whole record keys the outputs cache, so a changed convention recomputes them."""
    own = own or {}
    prep = {"resolution": image_size if image_size is not None else own.get("resolution"),
            "mean": list(mean) if mean is not None else own.get("mean"),
            "std": list(std) if std is not None else own.get("std")}
    guessed = [k for k in ("resolution", "mean") if prep[k] is None]
    if source.beton is None and guessed:
        raise ValueError(f"the source is not images, so the {what}'s preprocessing cannot be read off it and "
                         "the weights do not record it: pass image_size=, mean= and std=")
    if prep["resolution"] is None:
        prep["resolution"] = source.image_size
    if prep["mean"] is None:
        stats = fvdata.channel_stats(source.beton)
        prep["mean"], prep["std"] = list(stats[0]), list(stats[1] if prep["std"] is None else prep["std"])
    elif prep["std"] is None:
        raise ValueError(f"mean={prep['mean']} is given without std=; give both (per-channel, in 0..1 units)")
    if guessed and what != "trained surrogate":
        warnings.warn(f"the {what} records no {' or '.join(guessed)}; using the source's ({prep['resolution']} px, "
                      f"mean {[round(m, 3) for m in prep['mean']]}). If it was trained otherwise (e.g. 224 px, "
                      "ImageNet statistics), pass image_size=, mean=, std=", stacklevel=3)
    _check_prep(prep["resolution"], prep["mean"], prep["std"])  # what the weights or the source gave, too
    # the weights' resize-then-crop, unless the user set the size: the eval loader's centre-crop ratio
    if image_size is None and own.get("resize"):
        prep["crop_ratio"] = prep["resolution"] / own["resize"]
    else:
        prep["crop_ratio"] = fvdata.default_crop_ratio(prep["resolution"])
    prep["interpolation"] = own.get("interpolation") or fvdata.default_interpolation(prep["resolution"])
    return prep


def _check_prep(image_size, mean, std) -> None:
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size={image_size!r} is invalid; expected an integer >= 1 (px)")
    for name, value in (("mean", mean), ("std", std)):
        if value is not None and (len(value) != 3 or (name == "std" and min(value) <= 0)):
            raise ValueError(f"{name}={list(value)} is invalid; expected 3 per-channel values"
                             + (" > 0" if name == "std" else ""))


def check_arguments(surrogate, arch: str, image_size, mean, std) -> None:
    """The checks that need no input: run before any beton is written."""
    if isinstance(surrogate, (str, os.PathLike)):
        if not Path(surrogate).is_file():
            raise FileNotFoundError(f"surrogate={str(surrogate)!r}: no such checkpoint file")
    elif surrogate is not None and not isinstance(surrogate, torch.nn.Module):
        raise TypeError(f"surrogate has type {type(surrogate).__name__}; expected None (train one), a checkpoint "
                        "path or an nn.Module")
    from fastvote import models

    models.check_arch(arch)
    _check_prep(image_size, mean, std)


def resolve(surrogate, source: Input, *, arch: str = DEFAULT_ARCH, train_config=None,
            image_size: Optional[int] = None, mean: Optional[Sequence[float]] = None,
            std: Optional[Sequence[float]] = None, seed: int = 0, workdir: Path, device=None) -> Surrogate:
    """Checks the `surrogate` argument and decides everything but the weights.

    surrogate: None (train `arch` on the source with `train_config`, default
    TrainConfig(seed=seed)); a file (fastvote.models.load_surrogate: a fastvote
    checkpoint, a state dict of `arch` as torchvision/timm ship them —
    .pth/.bin/.safetensors —, TorchScript, a pickled module); or an nn.Module
    (torchvision, timm, or any whose pooled features feed a final nn.Linear;
    otherwise wrap it with fastvote.models.as_classifier(module, features=...)).
    device: where a surrogate to train will train (default: cuda if available),
    which decides its precision and so its cache key."""
    from fastvote import models  # here, not at the top: torchvision's import is seconds a bad argument need not pay
    if isinstance(surrogate, torch.nn.Module):
        model = models.as_classifier(surrogate)  # a Classifier passes through: as_classifier(m, features=...) first
        prep = _preprocessing(models.preprocessing_of(surrogate), source, image_size, mean, std, "module")
        return Surrogate(kind="module", fingerprint=fingerprint_tensors(dict(model.state_dict())), prep=prep,
                         num_classes=model.num_classes, entry={"kind": "module", "class": type(surrogate).__name__},
                         _load=lambda device, progress: model)
    if isinstance(surrogate, (str, os.PathLike)):
        path = Path(surrogate)
        if not path.is_file():
            raise FileNotFoundError(f"surrogate={str(surrogate)!r}: no such checkpoint file")
        stat = path.stat()  # before the load: the fingerprint's memo must not outlive a rewrite during it
        model, info = models.load_surrogate(path, arch=arch)
        own = {k: info[k] for k in ("resolution", "resize", "mean", "std", "interpolation") if k in info}
        own.setdefault("resolution", getattr(model, "image_size", None))
        prep = _preprocessing(own, source, image_size, mean, std, "checkpoint")
        entry = {"kind": "checkpoint", "format": info.get("format"), "path": str(path.resolve())}
        if info.get("format") == "state_dict":
            entry["arch"] = arch
        return Surrogate(kind="checkpoint", fingerprint=fingerprint_weights(model, path, stat, arch), prep=prep,
                         num_classes=model.num_classes, entry=entry, _load=lambda device, progress: model)
    if surrogate is not None:
        raise TypeError(f"surrogate has type {type(surrogate).__name__}; expected None (train one), a checkpoint "
                        "path or an nn.Module")
    if source.beton is None or source.labels is None:
        raise ValueError("surrogate=None trains one on the source, which needs a labelled source dataset (not "
                         "precomputed outputs); pass surrogate=<checkpoint or nn.Module>")
    models.check_arch(arch)
    from fastvote.train import TrainConfig

    config = train_config if train_config is not None else default_config(seed)
    if not isinstance(config, TrainConfig):
        raise TypeError(f"train_config has type {type(config).__name__}; expected fastvote.train.TrainConfig")
    prep = _preprocessing({}, source, image_size, mean, std, "trained surrogate")
    recipe = Recipe.default(arch, prep["resolution"], prep["mean"], prep["std"], config, seed)
    key = recipe.key(source.fingerprint, distributed.resolve_device(device))
    path = workdir / "surrogates" / f"{arch}-{key}.pt"
    entry = {"kind": "trained", "arch": arch, "path": str(path.resolve()), "recipe_key": key, "config": repr(config)}

    def load(device, progress):
        _, info = train(recipe, source, path, device=device, progress=progress, workdir=workdir,
                        implicit=True)
        entry.update(seconds=info["seconds"], reused_from_cache=info["reused_from_cache"])
        # rank 0 reads the file and sends the weights: no shared file system needed
        model = models.load_model(path) if distributed.is_main() else models.build_model(
            arch, source.num_classes, image_size=recipe.resolution)
        return models.load_state_dict_flexible(model, distributed.broadcast_object(
            model.state_dict() if distributed.is_main() else None))

    return Surrogate(kind="trained", fingerprint=f"recipe:{key}", prep=prep, num_classes=source.num_classes,
                     entry=entry, recipe=recipe, _load=load)


__all__ = ["DEFAULT_ARCH", "Recipe", "Surrogate", "check_arguments", "default_config", "fingerprint_weights", "resolve",
           "train"]
