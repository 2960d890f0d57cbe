"""Time to a pretrained model by pruning ratio, split into surrogate training,
pruning and pretraining (the shape of the paper's time table: 5.4 h at 0% ->
1.3 h at 80% for ImageNet, RN-18 surrogate, RN-101 model).

The unpruned model needs no surrogate and no pruning; each pruned one pays the
(shared) surrogate, its LM prune, and pretraining on the kept classes for the
same number of epochs. Everything runs through fastvote.experiment, on the
offline benchmark (haystack -> digits) by default.

    python benchmarks/bench_pipeline.py --out runs/bench_pipeline
    python benchmarks/bench_pipeline.py --arch resnet18 --epochs 16 --device cuda --results benchmarks/RESULTS.md
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time

from bench_vote import write_atomic  # the script's own folder is on sys.path
from fastvote.experiment import Experiment, ExperimentConfig

RATIOS = (0.0, 0.2, 0.4, 0.6, 0.8)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/bench_pipeline")
    p.add_argument("--method", default="lm")
    p.add_argument("--arch", default="small", help="the pretrained model (default: small, 16x the surrogate)")
    p.add_argument("--surrogate-arch", default="tiny")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--surrogate-epochs", type=int, default=6)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--device", default=None)
    p.add_argument("--cpu-threads", type=int, default=None, help="torch threads on CPU (default: the experiment's)")
    p.add_argument("--results", help="append the table to this Markdown file")
    args = p.parse_args(argv)

    config = ExperimentConfig(methods=(args.method,), ratios=tuple(r for r in RATIOS if r > 0), seeds=(0,),
                              arch=args.arch, surrogate_arch=args.surrogate_arch, epochs=args.epochs,
                              surrogate_epochs=args.surrogate_epochs, image_size=args.image_size,
                              device=args.device,
                              **({} if args.cpu_threads is None else {"cpu_threads": args.cpu_threads}))
    # A fresh folder each run: cached steps would report no time.
    out = os.path.join(args.out, dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    exp = Experiment(config, out, progress=False)
    exp.prepare()
    surrogate, surrogate_seconds = exp.surrogate()
    rows = []
    for ratio in RATIOS:
        if ratio == 0:
            indices, prune_seconds, paid_surrogate = None, 0.0, 0.0
        else:
            result, prune_seconds = exp.prune(args.method, ratio, 0, surrogate)
            indices, paid_surrogate = result.indices.numpy(), surrogate_seconds
        _, pretrain_seconds = exp.pretrain(indices, 0, f"bench-r{ratio:.2f}")
        total = paid_surrogate + prune_seconds + pretrain_seconds
        rows.append((ratio, paid_surrogate, prune_seconds, pretrain_seconds, total,
                     exp.source.num_rows if indices is None else len(indices)))
        print(f"ratio {ratio:.0%}: surrogate {paid_surrogate:.1f} s, prune {prune_seconds:.2f} s, "
              f"pretrain {pretrain_seconds:.1f} s, total {total:.1f} s", flush=True)

    base = rows[0][4]
    lines = [
        f"### bench_pipeline {dt.date.today().isoformat()} — {platform.processor() or platform.machine()}, "
        f"{exp.device}, source {config.source} ({exp.source.num_rows} images, {exp.num_classes} classes, "
        f"{config.image_size}px), surrogate {config.surrogate_arch} x{config.surrogate_epochs} epochs, "
        f"model {config.arch} x{config.epochs} epochs, method {args.method}",
        "", f"Command: `python benchmarks/bench_pipeline.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
        "| ratio removed | source images | surrogate (s) | prune (s) | pretrain (s) | total (s) | vs unpruned | prune share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for ratio, sur, pru, pre, total, n in rows:
        lines.append(f"| {ratio:.0%} | {n} | {sur:.1f} | {pru:.2f} | {pre:.1f} | {total:.1f} | "
                     f"{(total - base) / base:+.0%} | {pru / total:.1%} |")
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    if args.results:
        write_atomic(args.results, "\n" + table, append=True)
    return 0


if __name__ == "__main__":
    start = time.perf_counter()
    code = main()
    print(f"({time.perf_counter() - start:.0f} s)")
    sys.exit(code)
