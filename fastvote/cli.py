"""The ``fastvote`` command.

    fastvote data list
    fastvote data write haystack haystack.beton            # a registry dataset (NAME[:SPLIT])
    fastvote data write --image-folder ROOT out.beton      # an ImageFolder tree
    fastvote surrogate train --source haystack --arch tiny --epochs 6 --out surrogate.pt
    fastvote prune --source haystack --target digits --method lm --ratio 0.6 --out runs/lm
    fastvote experiment --config exp.toml --out runs/exp   # surrogate -> prune -> pretrain -> transfer
    fastvote demo --out runs/demo                          # the offline benchmark, end to end

Under torchrun every command that computes (surrogate, prune, experiment) runs
distributed unchanged: torchrun --nproc_per_node 2 -m fastvote.cli prune ...
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional


def _add_surrogate_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("surrogate (trained on the source when --surrogate is not given)")
    g.add_argument("--arch", default="resnet18",
                   help="resnet18|resnet34|resnet50|resnet101|vit_t_16|vit_s_16|vit_b_16|tiny (default: resnet18)")
    g.add_argument("--epochs", type=int, default=16, help="training epochs (default: 16, the release's)")
    g.add_argument("--batch-size", type=int, default=256)
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: TrainConfig's)")
    g.add_argument("--image-size", type=int, default=None, help="surrogate input side in px (default: the source's)")


def _train_config(args):
    from fastvote.train import TrainConfig

    kw = dict(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
    if args.lr is not None:
        kw["lr"] = args.lr
    return TrainConfig(**kw)


def _device(args):
    import torch

    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def cmd_data(args) -> int:
    from fastvote import data

    if args.data_command == "list":
        for name in data.names():
            lacking = data.missing(name)
            print(f"{name:16s} splits {', '.join(data.splits(name)):22s} "
                  f"{'ready' if lacking is None else 'missing: ' + lacking}")
        return 0
    if args.image_folder:
        path = data.write_image_folder(args.image_folder, args.out, max_resolution=args.max_resolution,
                                       jpeg=args.jpeg)
    else:
        name, _, split = args.name.partition(":")
        path = data.write_offline(name, split or "train", args.out, max_resolution=args.max_resolution,
                                  jpeg=args.jpeg)
    print(f"wrote {path} (class names in {data.classes_path(path)})")
    return 0


def cmd_surrogate(args) -> int:
    from fastvote import data, distributed, models, train
    from fastvote.prune import resolve_data, workdir_path

    distributed.init_from_env(args.device)  # under torchrun: DDP training
    with distributed.main_first():
        src = resolve_data(args.source, "source", workdir_path(args.workdir), distributed.is_main())
    resolution = args.image_size or src.image_size
    mean, std = data.channel_stats(src.beton)
    config = _train_config(args)
    model = models.build_model(args.arch, src.num_classes, image_size=resolution)
    loader = data.train_loader(src.beton, config.batch_size, resolution=resolution, mean=mean, std=std,
                               seed=args.seed, flip=not args.no_flip, distributed=distributed.active(),
                               **data.default_crop(resolution))
    history = train.train_classifier(model, loader, config, device=_device(args), progress=distributed.is_main(),
                                     checkpoint_dir=args.out + ".ckpt")
    if distributed.is_main():
        models.save_checkpoint(args.out, model, resolution=resolution, mean=list(mean), std=list(std),
                               class_names=src.class_names)
        print(f"saved the surrogate to {args.out} (final train accuracy {history['train_acc'][-1]:.4f})")
    return 0


def cmd_prune(args) -> int:
    import fastvote
    from fastvote import distributed
    from fastvote.plots import plot_votes

    result = fastvote.prune(
        args.source, args.target if len(args.target) > 1 else args.target[0], method=args.method,
        ratio=args.ratio, keep=args.keep, surrogate=args.surrogate, k=args.k, metric=args.metric,
        weight=args.weight, temperature=args.temperature, reverse=args.reverse, centroids=args.centroids,
        num_clusters=args.num_clusters, normalize_targets=args.normalize_targets, arch=args.arch,
        train_config=_train_config(args), image_size=args.image_size, device=args.device,
        batch_size=args.batch_size, seed=args.seed, workdir=args.workdir, progress=True)
    if not distributed.is_main():  # every rank holds the same result; rank 0 writes it
        return 0
    out = result.save(args.out)
    png = plot_votes(result, out / "votes.png")
    print(summary_table(result))
    print(f"\nkept {len(result.indices)} samples from {len(result.kept_classes)} of {len(result.class_names)} "
          f"classes ({result.manifest['ratio_meaning']}: {result.ratio:.3f}); wrote {out}/indices.npy, classes.json, manifest.json and {png.name}")
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
    return _run_experiment(config, args.out)


def cmd_demo(args) -> int:
    from fastvote.experiment import DEMO_METHODS, ExperimentConfig

    print("[demo] haystack (30 source classes: Fashion-MNIST, MNIST digits, Animal-MNIST) -> sklearn digits "
          "(10-shot); LM, FM and Random keeping 15, 10 and 6 classes, and the unpruned source; "
          "tiny CNNs, linear probe. All data through FFCV.", flush=True)
    return _run_experiment(ExperimentConfig(methods=DEMO_METHODS, device=args.device), args.out)


def _run_experiment(config, out) -> int:
    import time

    from fastvote.experiment import Experiment

    started = time.perf_counter()
    Experiment(config, out).run()
    out = Path(out)
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastvote", description="Target-aware source pruning by voting (DP4TL).")
    p.add_argument("--device", default=None, help="cpu|cuda|cuda:N (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="cache of betons, surrogates, features (default: $FASTVOTE_CACHE/prune)")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="list the offline datasets or write .beton files")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dsub.add_parser("list", help="the registry datasets and whether they are installed")
    w = dsub.add_parser("write", help="write a registry dataset or an ImageFolder tree to a .beton")
    w.add_argument("name", nargs="?", help="registry NAME[:SPLIT] (see `fastvote data list`)")
    w.add_argument("out", help="the .beton to write")
    w.add_argument("--image-folder", help="write this ImageFolder tree instead of a registry dataset")
    w.add_argument("--max-resolution", type=int, default=None)
    w.add_argument("--jpeg", action="store_true", help="store JPEG instead of raw pixels (smaller, lossy)")

    s = sub.add_parser("surrogate", help="train a surrogate on a source")
    ssub = s.add_subparsers(dest="surrogate_command", required=True)
    t = ssub.add_parser("train", help="train a surrogate classifier on the source")
    t.add_argument("--source", required=True, help=".beton, registry NAME[:SPLIT]")
    t.add_argument("--out", required=True, help="checkpoint to write (.pt)")
    t.add_argument("--no-flip", action="store_true", help="no horizontal flips (digits, text)")
    _add_surrogate_options(t)

    r = sub.add_parser("prune", help="vote and keep the source classes the target needs")
    r.add_argument("--source", required=True, help=".beton, registry NAME[:SPLIT], or a folder of precomputed "
                                                   "surrogate outputs (features.npy / logits.npy / labels.npy)")
    r.add_argument("--target", required=True, action="append",
                   help="as --source (no labels needed); repeat for multi-task")
    r.add_argument("--method", default="lm",
                   help="lm|fm|random (class-wise: --ratio removes classes) or random-sample|moderate|grand|el2n|"
                        "forgetting|ccs|ssp (sample-wise: --ratio removes samples); options as NAME:key=value,...")
    keep = r.add_mutually_exclusive_group(required=True)
    keep.add_argument("--ratio", type=float, help="fraction of source classes REMOVED (0 <= r < 1)")
    keep.add_argument("--keep", type=int, help="number of source classes kept")
    r.add_argument("--out", required=True, help="result folder (indices.npy, classes.json, manifest.json, votes.png)")
    r.add_argument("--surrogate", default=None, help="checkpoint to use instead of training one")
    r.add_argument("--k", type=int, default=1, help="votes per target sample (default: 1)")
    r.add_argument("--metric", default="l2", choices=["l2", "cosine"])
    r.add_argument("--weight", default="count", choices=["count", "rank", "soft"])
    r.add_argument("--temperature", type=float, default=1.0)
    r.add_argument("--reverse", action="store_true", help="keep the least-voted classes (ablation)")
    r.add_argument("--centroids", default="class", choices=["class", "kmeans"], help="FM: class means or K-means clusters")
    r.add_argument("--num-clusters", type=int, default=None)
    r.add_argument("--normalize-targets", action="store_true", help="multi-task: each target weighs the same")
    _add_surrogate_options(r)

    e = sub.add_parser("experiment", help="the paper's protocol: surrogate, prune, pretrain, transfer, table")
    e.add_argument("--config", help="TOML file overriding ExperimentConfig's defaults (fastvote/experiment.py)")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting (repeatable; TOML values): --set pretraining=moco "
                        "--set 'methods=[\"fm\",\"random\"]' --set centroids=kmeans --set source_bias=label_noise=0.4")
    e.add_argument("--out", required=True, help="run folder (rerun to resume)")

    m = sub.add_parser("demo", help="the offline benchmark end to end (haystack -> digits), ~10 min on 2 cores")
    m.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "data" and args.data_command == "write" and not (args.name or args.image_folder):
        build_parser().error("data write: give a registry NAME[:SPLIT] or --image-folder ROOT")
    handler = {"data": cmd_data, "surrogate": cmd_surrogate, "prune": cmd_prune,
               "experiment": cmd_experiment, "demo": cmd_demo}[args.command]
    from fastvote import distributed

    try:
        return handler(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, ImportError, IndexError) as exc:
        print(f"fastvote {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
