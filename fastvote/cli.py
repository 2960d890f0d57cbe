"""The ``fastvote`` command.

    fastvote data list
    fastvote data write haystack haystack.beton            # a registry dataset (NAME[:SPLIT])
    fastvote data write --image-folder ROOT out.beton      # an ImageFolder tree
    fastvote surrogate train --source haystack --arch tiny --epochs 6 --out surrogate.pt
    fastvote prune --source haystack --target digits --method lm --ratio 0.6 --out runs/lm
    fastvote features digits --source haystack --out runs/digits-outputs   # precomputed outputs to reuse
    fastvote experiment --config exp.toml --out runs/exp   # surrogate -> prune -> pretrain -> transfer
    fastvote demo --out runs/demo                          # the offline benchmark, end to end
    fastvote cluster-prune --source POOL/ --target t.npy --clusters 1000 --keep-clusters voted --out OUT/
    fastvote normsim-prune --source POOL/ --target t.npy --ratio 0.7 --out OUT/   # per-sample NormSim

Under torchrun every command that computes (surrogate, prune, experiment) runs
distributed unchanged: torchrun --nproc_per_node 2 -m fastvote.cli prune ...
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import inspect
import os
import sys
from pathlib import Path
from typing import List, Optional


def _add_surrogate_options(p: argparse.ArgumentParser) -> None:
    """The surrogate's architecture, training recipe and preprocessing; every
    default is the API's (None: TrainConfig's, the checkpoint's or the source's)."""
    from fastvote.surrogate import DEFAULT_ARCH

    g = p.add_argument_group("surrogate (trained on the source when --surrogate is not given)")
    g.add_argument("--arch", default=DEFAULT_ARCH,
                   help="what to train, or what a --surrogate state dict belongs to: fastvote's tiny, resnet18..101, "
                        "vit_t_16/s_16/b_16, any torchvision classification model (efficientnet_b0, convnext_tiny, "
                        f"...) or timm:<name> (default: {DEFAULT_ARCH})")
    g.add_argument("--epochs", type=int, default=None,
                   help="training epochs (default: TrainConfig's, the release's 16)")
    g.add_argument("--train-batch-size", type=int, default=None, help="training batch (default: TrainConfig's)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: TrainConfig's)")
    g.add_argument("--image-size", type=int, default=None,
                   help="surrogate input side in px (default: the checkpoint's, else the source's)")
    g.add_argument("--mean", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                   help="per-channel mean in 0..1 units (default: the checkpoint's, else the source's)")
    g.add_argument("--std", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                   help="per-channel std in 0..1 units (with --mean)")


def _train_config(args):
    """A TrainConfig when a training option was given, else None (the API's default, TrainConfig(seed=seed))."""
    given = {name: value for name, value in (("epochs", args.epochs), ("batch_size", args.train_batch_size),
                                             ("lr", args.lr)) if value is not None}
    if not given:
        return None
    from fastvote.train import TrainConfig  # torchvision comes with it: seconds, so only when needed

    return TrainConfig(seed=args.seed, **given)


def _add_method_options(p: argparse.ArgumentParser) -> None:
    """One flag per option any method declares (fastvote.methods.spec): the
    same names, types, choices and defaults as the API; not given = the method's default."""
    from fastvote.methods import METHODS

    g = p.add_argument_group("method options (also as --method NAME:key=value,...; an option the method "
                             "does not use is an error)")
    seen = set()
    for name, module in METHODS.items():
        for option in module.OPTIONS:
            if option.name in seen:
                continue
            seen.add(option.name)
            flag = option.flag or "--" + option.name.replace("_", "-")
            doc = f"{option.doc} (default: {option.default}; methods: " + ", ".join(
                m for m, mod in METHODS.items() if any(o.name == option.name for o in mod.OPTIONS)) + ")"
            doc = doc.replace("%", "%%")  # argparse formats help strings with %
            if option.type is bool:
                g.add_argument(flag, dest=option.name, action=argparse.BooleanOptionalAction, default=None, help=doc)
            else:
                g.add_argument(flag, dest=option.name, type=option.type, default=None,
                               choices=option.choices or None, help=doc)


def method_options(args) -> dict:
    """The method options given on the command line (None: not given)."""
    from fastvote.methods import METHODS

    names = {o.name for module in METHODS.values() for o in module.OPTIONS}
    return {name: getattr(args, name) for name in sorted(names) if getattr(args, name, None) is not None}


def _device(args):
    from fastvote import distributed

    return distributed.resolve_device(args.device)


def _check_writable(path: Path, what: str) -> None:
    existing = next(p for p in [path, *path.parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{what}={str(path)!r}: {existing} is not a writable folder")


def _check_checkpoint(path: Path) -> None:
    """A surrogate replaces a fastvote checkpoint, never a user's other file."""
    from fastvote import models

    try:
        models.load_checkpoint(path)
    except Exception:  # any unreadable file: not ours to replace
        raise FileExistsError(f"--out={str(path)!r} exists and is not a fastvote checkpoint; choose another path, "
                              "or pass --overwrite to replace it") from None


def _out_folder(args, kind: str) -> Path:
    """The output folder, checked before any compute: writable, and new, empty
    or an earlier `kind` output unless --overwrite (fastvote.atomic's rule)."""
    from fastvote.atomic import check_output_folder

    out = check_output_folder(args.out, kind, overwrite=args.overwrite, what="--out")
    _check_writable(out, "--out")
    return out


def cmd_data(args) -> int:
    from fastvote import data

    if args.data_command == "list":
        for name in data.names():
            lacking = data.missing(name)
            print(f"{name:16s} splits {', '.join(data.splits(name)):22s} "
                  f"{'ready' if lacking is None else 'missing: ' + lacking}")
        return 0
    folder = args.image_folder is not None
    # An ImageFolder is photos: ffcv-imagenet's settings (JPEG, quality 90, long side
    # at most 512). Registry datasets are small images: raw, exact pixels.
    fmt = args.format or ("jpeg" if folder else "raw")
    max_side = args.max_resolution if args.max_resolution is not None else (data.IMAGE_FOLDER_MAX_SIDE if folder else None)
    for flag, value, low, high in (("--max-resolution", max_side, 1, None), ("--jpeg-quality", args.jpeg_quality, 1, 100),
                                   ("--workers", args.workers, 1, None)):
        if value is not None and (value < low or (high is not None and value > high)):
            raise ValueError(f"{flag}={value}: expected an integer >= {low}"
                             + (f" and <= {high}" if high else ""))
    options = dict(max_resolution=max_side, jpeg=fmt == "jpeg", jpeg_quality=args.jpeg_quality,
                   num_workers=args.workers, progress=True, overwrite=args.overwrite)
    if folder:
        path = data.write_image_folder(args.image_folder, args.out, **options)
    else:
        name, _, split = args.name.partition(":")
        path = data.write_beton(data.get(name, split or "train"), args.out, **options)
    names = data.read_classes(path) or []
    shown = ", ".join(map(str, names[:5])) + (", ..." if len(names) > 5 else "")
    print(f"wrote {path}: {data.read_columns(path)['labels'].size} images, {fmt}"
          f"{f' (quality {args.jpeg_quality})' if fmt == 'jpeg' else ''}, long side <= {max_side or 'as given'}, "
          f"{os.path.getsize(path) / 2**20:.1f} MiB; {len(names)} class names in {data.classes_path(path)}"
          f"{f' ({shown})' if names else ''}")
    return 0


def cmd_surrogate(args) -> int:
    from fastvote import distributed, inputs, surrogate

    out = Path(args.out)
    if out.is_dir():
        raise IsADirectoryError(f"--out={args.out!r} is a folder; expected a checkpoint file (.pt)")
    if out.exists() and not args.overwrite:
        _check_checkpoint(out)
    _check_writable(out.parent, "--out")
    device = _device(args)
    with distributed.main_first():
        src = inputs.resolve(args.source, "source", inputs.workdir_path(args.workdir), distributed.is_main())
    sur = surrogate.resolve(None, src, arch=args.arch, train_config=_train_config(args), image_size=args.image_size,
                            mean=args.mean, std=args.std, seed=args.seed, workdir=inputs.workdir_path(args.workdir),
                            device=device)
    recipe = dataclasses.replace(sur.recipe, flip=True) if args.flip else sur.recipe
    path, info = surrogate.train(recipe, src, out, device=device, progress=distributed.is_main(),
                                 workdir=inputs.workdir_path(args.workdir))
    if distributed.is_main():
        print(f"saved the surrogate to {path} (final train accuracy {info['train_acc']:.4f})")
    return 0


def cmd_prune(args) -> int:
    import fastvote
    from fastvote import distributed

    out = _out_folder(args, "prune")
    # Every method's option flags go through its spec: prune() names only the voting options.
    method = fastvote.methods.parse(args.method, method_options(args))
    result = fastvote.prune(
        args.source, args.target if len(args.target) > 1 else args.target[0], method=method,
        ratio=args.ratio, keep=args.keep, surrogate=args.surrogate, arch=args.arch,
        train_config=_train_config(args), image_size=args.image_size, mean=args.mean, std=args.std,
        device=args.device, batch_size=args.batch_size, seed=args.seed, workdir=args.workdir, progress=True)
    if not distributed.is_main():  # every rank holds the same result; rank 0 writes it
        return 0
    result.save(out, overwrite=args.overwrite)
    print(summary_table(result))
    print(f"\nkept {len(result.indices)} samples from {len(result.kept_classes)} of {len(result.class_names)} "
          f"classes (fraction of source {result.unit} removed: {result.ratio:.3f}); wrote {out}/indices.npy, "
          "classes.json, manifest.json and votes.png")
    return 0


def cmd_features(args) -> int:
    import fastvote
    from fastvote import distributed

    out = _out_folder(args, "features")
    fastvote.export_outputs(args.data, out, source=args.source, surrogate=args.surrogate, arch=args.arch,
                            train_config=_train_config(args), image_size=args.image_size, mean=args.mean,
                            std=args.std, device=args.device, batch_size=args.batch_size, seed=args.seed,
                            workdir=args.workdir, progress=True, overwrite=args.overwrite)
    if distributed.is_main():
        print(f"wrote {out}/: features.npy, logits.npy, labels.npy (labelled data), classes.json, surrogate.json; "
              f"pass {out} as --source or --target of `fastvote prune`")
    return 0


def cmd_cluster_prune(args) -> int:
    from fastvote import distributed
    from fastvote.data.shards import cluster_prune

    keep_clusters = args.keep_clusters if args.keep_clusters in (None, "voted") else int(args.keep_clusters)
    result = cluster_prune(args.source, args.target, _out_folder(args, "cluster-prune"), clusters=args.clusters,
                           keep=args.keep, overwrite=args.overwrite,
                           ratio=args.ratio, keep_clusters=keep_clusters, k=args.k, metric=args.metric,
                           iterations=args.iterations, max_rows_per_cluster=args.max_rows_per_cluster or None,
                           seed=args.seed, embeddings_key=args.embeddings_key, ids_key=args.ids_key,
                           device=args.device, progress=True, hierarchical=args.hierarchical)
    if distributed.is_main():
        levels = f", two-level: {result.fit.groups} groups" if result.fit.groups else ""
        print(f"kept {result.kept_rows} of {result.num_rows} source rows from {len(result.kept_clusters)} of "
              f"{args.clusters} clusters (seeding {result.fit.seeding_seconds:.1f} s, {result.fit.passes} passes"
              f"{levels}); "
              f"wrote {result.out}/kept/<shard>.npy (the kept rows' positions), manifest.json, centroids.npy, "
              "votes.npy")
    return 0


def cmd_normsim_prune(args) -> int:
    from fastvote import distributed
    from fastvote.data.score_shards import normsim_prune

    result = normsim_prune(args.source, args.target, _out_folder(args, "normsim-prune"), keep=args.keep,
                           ratio=args.ratio, p=args.p, embeddings_key=args.embeddings_key, ids_key=args.ids_key,
                           device=args.device, progress=True, overwrite=args.overwrite)
    if distributed.is_main():
        seconds = result.manifest["seconds"]
        print(f"kept {result.kept_rows} of {result.num_rows} source rows by NormSim_{args.p} (cut-off "
              f"{result.cutoff:.6g}; scoring {seconds['scoring']:.1f} s, "
              f"{result.num_rows / max(seconds['scoring'], 1e-9):,.0f} rows/s); wrote {result.out}/kept/<shard>.npy "
              "(the kept rows' positions), max/, nearest/, rms/ (the scores), manifest.json")
    return 0


def _settings(pairs: List[str]) -> dict:
    """--set KEY=VALUE pairs; VALUE is read as TOML (1, 0.5, true, ["lm", "fm"]), else as a string."""
    import tomllib

    values = {}
    for pair in pairs:
        key, eq, text = pair.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE (e.g. pretraining=moco, ratios=[0.5,0.8])")
        try:
            values[key.strip()] = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            values[key.strip()] = text
    return values


def cmd_experiment(args) -> int:
    from fastvote.experiment import ExperimentConfig

    overrides = _settings(args.set)
    if args.device is not None:
        overrides["device"] = args.device
    config = (ExperimentConfig.from_toml(args.config, **overrides) if args.config
              else ExperimentConfig.from_dict(overrides, origin="--set"))
    return _run_experiment(config, args)


def cmd_demo(args) -> int:
    from fastvote.experiment import DEMO, ExperimentConfig

    config = ExperimentConfig(**DEMO, device=args.device)
    keeps = " and ".join(str(30 - round(30 * r)) for r in config.ratios)
    print(f"[demo] haystack (30 source classes: Fashion-MNIST, MNIST digits, Animal-MNIST) -> sklearn digits "
          f"(10-shot); {', '.join(m.upper() if len(m) == 2 else m.title() for m in config.methods)} keeping {keeps} "
          f"classes, and the unpruned source; a {config.surrogate_arch} surrogate ({config.surrogate_epochs} epochs), "
          f"a {config.arch} pretrained CNN ({config.epochs} epochs, 16x the surrogate's parameters), linear probe, "
          f"{len(config.seeds)} seeds.", flush=True)
    return _run_experiment(config, args)


def _run_experiment(config, args) -> int:
    import time

    from fastvote.experiment import Experiment

    started = time.perf_counter()
    out = _out_folder(args, "experiment")
    Experiment(config, out, overwrite=args.overwrite).run()
    print((out / "results.md").read_text())
    print(f"[done] {time.perf_counter() - started:.0f} s. Results in {out}/: results.md (the table), results.csv "
          f"(every cell), accuracy_vs_ratio.png, time_vs_ratio.png, prune/*/ (kept classes, votes.png), "
          f"cells/*.json. Rerunning the same command reuses every finished cell.")
    return 0


def summary_table(result, limit: int = 40) -> str:
    """The kept classes, best first, as a plain-text table."""
    rows = [f"{'rank':>4}  {'class':>5}  {'name':24s} {'votes':>10}  {'score':>10}"]
    for rank, c in enumerate(result.kept_classes[:limit].tolist()):
        votes = "-" if result.votes is None else f"{result.votes[c].item():g}"
        rows.append(f"{rank + 1:>4}  {c:>5}  {result.class_names[c][:24]:24s} {votes:>10}  "
                    f"{float(result.scores[c]):>10.4g}")
    if len(result.kept_classes) > limit:
        rows.append(f"  ... and {len(result.kept_classes) - limit} more (classes.json has all)")
    return "\n".join(rows)


def _common(suppress: bool) -> argparse.ArgumentParser:
    """--device, --seed, --workdir: accepted before the subcommand and after it
    (after it they are SUPPRESSed unless given, so the earlier value stands)."""
    p = argparse.ArgumentParser(add_help=False)
    default = (lambda value: argparse.SUPPRESS) if suppress else (lambda value: value)
    p.add_argument("--device", default=default(None), help="cpu|cuda|cuda:N (default: cuda when available)")
    p.add_argument("--seed", type=int, default=default(0), help="seeds the surrogate and the method (default: 0)")
    p.add_argument("--workdir", default=default(None),
                   help="cache of betons, surrogates, features (default: $FASTVOTE_CACHE/prune)")
    return p


OVERWRITE_HELP = ("write into an --out folder that holds other files: fastvote's own files are replaced, the "
                  "folder's other files are kept (without it, such a folder is refused)")


def build_parser() -> argparse.ArgumentParser:
    import fastvote
    from fastvote.data.beton import IMAGE_FOLDER_MAX_SIDE
    from fastvote.prune import prune

    prune_defaults = inspect.signature(prune).parameters  # the API's defaults are the command's

    p = argparse.ArgumentParser(prog="fastvote", description="Target-aware source pruning by voting (DP4TL).",
                                parents=[_common(False)])
    p.add_argument("--version", action="version", version=f"fastvote {fastvote.__version__}")
    common = _common(True)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="list the offline datasets or write .beton files")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dsub.add_parser("list", help="the registry datasets and whether they are installed")
    w = dsub.add_parser("write", help="write a registry dataset or an ImageFolder tree to a .beton")
    w.add_argument("name", nargs="?", help="registry NAME[:SPLIT] (see `fastvote data list`)")
    w.add_argument("out", help="the .beton to write")
    w.add_argument("--image-folder", metavar="ROOT",
                   help="write this ImageFolder tree (ROOT/<class>/<image>) instead of a registry dataset")
    w.add_argument("--format", choices=("jpeg", "raw"), default=None,
                   help="how images are stored (default: jpeg for --image-folder, as ffcv-imagenet; raw, "
                        "bit-exact, for registry datasets)")
    w.add_argument("--max-resolution", type=int, default=None, metavar="PX",
                   help=f"shrink images whose long side is larger (default: {IMAGE_FOLDER_MAX_SIDE} for --image-folder, "
                        "as ffcv-imagenet's ResNet-50 betons; none for registry datasets)")
    w.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality 1-100 (default 90, ffcv-imagenet's)")
    w.add_argument("--overwrite", action="store_true",
                   help="replace an existing file at OUT that is not a beton (a beton there is always replaced)")
    w.add_argument("--workers", type=int, default=None,
                   help="processes reading and encoding images (default: all usable cores; the bytes do not depend on it)")

    s = sub.add_parser("surrogate", help="train a surrogate on a source")
    ssub = s.add_subparsers(dest="surrogate_command", required=True)
    t = ssub.add_parser("train", help="train a surrogate classifier on the source (the recipe prune() uses)",
                        parents=[common])
    t.add_argument("--source", required=True, help=".beton, registry NAME[:SPLIT]")
    t.add_argument("--out", required=True, help="checkpoint to write (.pt)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out file that is not a fastvote checkpoint")
    t.add_argument("--flip", action="store_true", help="random horizontal flips (off by default: digits, text)")
    _add_surrogate_options(t)

    r = sub.add_parser("prune", help="vote and keep the source classes the target needs", parents=[common])
    r.add_argument("--source", required=True, help=".beton, registry NAME[:SPLIT], or a folder of precomputed "
                                                   "surrogate outputs (features.npy / logits.npy / labels.npy)")
    r.add_argument("--target", required=True, action="append",
                   help="as --source (no labels needed); repeat for multi-task")
    r.add_argument("--method", default=prune_defaults["method"].default,
                   help="lm|fm|random (class-wise: --ratio removes classes) or random-sample|moderate|grand|el2n|"
                        "forgetting|ccs|ssp (sample-wise: --ratio removes samples); options as NAME:key=value,...")
    keep = r.add_mutually_exclusive_group(required=True)
    keep.add_argument("--ratio", type=float,
                      help="fraction of source classes (sample-wise: samples) REMOVED, 0 <= r < 1")
    keep.add_argument("--keep", type=int, help="number of source classes (sample-wise: samples) kept")
    r.add_argument("--out", required=True, help="result folder (indices.npy, classes.json, manifest.json, votes.png): "
                                                "new, empty or an earlier prune result, replaced as a whole")
    r.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    r.add_argument("--surrogate", default=None,
                   help="use this instead of training one: a fastvote checkpoint, a state dict of --arch as "
                        "torchvision/timm ship weights (.pth, .bin, .safetensors), a TorchScript file, a "
                        "pickled module")
    r.add_argument("--batch-size", type=int, default=prune_defaults["batch_size"].default,
                   help="images a surrogate pass reads at once (default: %(default)s)")
    _add_method_options(r)
    _add_surrogate_options(r)

    f = sub.add_parser("features", help="export a surrogate's logits and features over a dataset (precomputed "
                                        "outputs prune takes back)", parents=[common])
    f.add_argument("data", help=".beton or registry NAME[:SPLIT] to run the surrogate over")
    f.add_argument("--source", default=None, help="the source the surrogate is trained on (default: DATA)")
    f.add_argument("--out", required=True, help="folder to write: new, empty or an earlier features output, "
                                                "replaced as a whole")
    f.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    f.add_argument("--surrogate", default=None, help="as for prune: a checkpoint, state dict, TorchScript file")
    f.add_argument("--batch-size", type=int, default=prune_defaults["batch_size"].default)
    _add_surrogate_options(f)

    c = sub.add_parser("cluster-prune", help="label-free FM over embedding shards: K-means the source, the target "
                                             "votes for clusters, kept rows written per shard", parents=[common])
    c.add_argument("--source", required=True, help="folder, glob or file of .npy/.npz [rows, D] embedding shards")
    c.add_argument("--target", required=True, help="the target's embeddings: .npy/.npz file, folder or glob")
    c.add_argument("--clusters", type=int, required=True, help="K, the number of k-means clusters")
    c.add_argument("--out", required=True, help="output folder (kept/<shard>.npy, assignments/, manifest.json)")
    c.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    keep = c.add_mutually_exclusive_group(required=True)
    keep.add_argument("--keep-clusters", help="clusters kept whole: an integer, or 'voted' (every cluster nearest "
                                              "to a target row: DataComp's image-based filter)")
    keep.add_argument("--keep", type=int, help="source rows kept (a sample budget)")
    keep.add_argument("--ratio", type=float, help="fraction of source rows REMOVED, 0 <= r < 1")
    c.add_argument("--k", type=int, default=1, help="clusters each target row votes for (default: 1)")
    c.add_argument("--metric", default="l2", choices=("l2", "cosine"))
    c.add_argument("--iterations", type=int, default=20, help="at most this many k-means passes (default: 20)")
    c.add_argument("--max-rows-per-cluster", type=int, default=256,
                   help="passes run over a sample of this many rows a cluster; 0: over every row (default: 256)")
    levels = c.add_mutually_exclusive_group()
    levels.add_argument("--hierarchical", action="store_true", default=None,
                        help="two-level k-means passes: each row against the centroids of its nearest group of "
                             "~sqrt(K) groups (default: from K = 1,000 when a flat pass would be long)")
    levels.add_argument("--flat", dest="hierarchical", action="store_false", default=None,
                        help="flat k-means passes: each row against all K centroids")
    c.add_argument("--embeddings-key", help="the .npz member holding the embeddings (default: the only 2-D float one)")
    c.add_argument("--ids-key", help="the .npz member holding identifiers (default: uid/id/key if present)")

    n = sub.add_parser("normsim-prune", help="NormSim over embedding shards: each source row scored against the "
                                             "target's embeddings, the best kept, written per shard", parents=[common])
    n.add_argument("--source", required=True, help="folder, glob or file of .npy/.npz [rows, D] embedding shards")
    n.add_argument("--target", required=True, help="the target's embeddings: .npy/.npz file, folder or glob")
    n.add_argument("--out", required=True, help="output folder (kept/<shard>.npy, max/, nearest/, rms/, manifest.json)")
    n.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    keep = n.add_mutually_exclusive_group(required=True)
    keep.add_argument("--keep", type=int, help="source rows kept (a sample budget)")
    keep.add_argument("--ratio", type=float, help="fraction of source rows REMOVED, 0 <= r < 1")
    n.add_argument("--pnorm", dest="p", default="inf", choices=("inf", "2"),
                   help="NormSim's p: inf, the best similarity to a target row; 2, the RMS similarity (default: inf)")
    n.add_argument("--embeddings-key", help="the .npz member holding the embeddings (default: the only 2-D float one)")
    n.add_argument("--ids-key", help="the .npz member holding identifiers (default: uid/id/key if present)")

    e = sub.add_parser("experiment", help="the paper's protocol: surrogate, prune, pretrain, transfer, table",
                       parents=[common])
    e.add_argument("--config", help="TOML file overriding ExperimentConfig's defaults (fastvote/experiment.py)")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting (repeatable; TOML values): --set pretraining=moco "
                        "--set 'methods=[\"fm\",\"random\"]' --set centroids=kmeans --set source_bias=label_noise=0.4")
    e.add_argument("--out", required=True, help="run folder (rerun to resume)")
    e.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)

    m = sub.add_parser("demo", help="the offline benchmark end to end (haystack -> digits), ~10 min on 2 cores",
                       parents=[common])
    m.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    m.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    return p


# User mistakes print one line and exit 2; anything else (a bug, CUDA out of
# memory, an assertion) keeps its traceback. ValueError and TypeError are
# fastvote's argument errors; OSErrors about paths the user named are theirs.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
               NotADirectoryError)
USER_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "data" and args.data_command == "write" and bool(args.name) == bool(args.image_folder):
        build_parser().error(f"data write: give a registry NAME[:SPLIT] or --image-folder ROOT, not "
                             f"{'both' if args.name else 'neither'}")
    handler = {"data": cmd_data, "surrogate": cmd_surrogate, "prune": cmd_prune, "features": cmd_features,
               "experiment": cmd_experiment, "demo": cmd_demo, "cluster-prune": cmd_cluster_prune,
               "normsim-prune": cmd_normsim_prune}[args.command]
    from fastvote import distributed
    from fastvote.chunks import Interrupted

    try:
        return handler(args)
    except Interrupted as exc:  # Ctrl-C at a chunk boundary: what was computed is committed
        print(f"fastvote {args.command}: {exc}", file=sys.stderr)
        return 130
    except Exception as exc:
        if isinstance(exc, USER_ERRORS) or (isinstance(exc, OSError) and exc.errno in USER_ERRNOS):
            print(f"fastvote {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
