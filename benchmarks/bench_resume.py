"""Resumable passes (issue 24): a long pass killed at 25%, 50% and 75% of an
uninterrupted run's wall time and resumed each time, against one
uninterrupted run; the outputs compared byte for byte.

    python benchmarks/bench_resume.py cluster-prune --rows 500000 --shards 10 --clusters 500
    python benchmarks/bench_resume.py features --per-class 150 --image-size 32

Each run is a fresh `fastvote` process (start-up included in every wall
time, as a user's rerun pays it). Killed with SIGKILL, as a preemption."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from bench_kmeans import cpu_model, write_pool  # noqa: E402


def timed(cmd, env, kill_after=None) -> tuple:
    """(wall seconds of `cmd`, whether it finished); with kill_after, SIGKILLed after that many seconds."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        proc.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        return time.perf_counter() - started, False
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
    return time.perf_counter() - started, True


def outputs(out: Path, skip=("seeding_seconds", "pass_seconds", "assign_seconds", "vote_and_keep_seconds",
                             "resumed")) -> dict:
    files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    manifest = json.loads(files.pop("manifest.json"))
    return dict(files, manifest={k: v for k, v in manifest.items() if k not in skip})


def killed_three_times(make_cmd, env, whole_s: float) -> dict:
    """Runs killed after 25% of `whole_s` each, three times, then one to completion; a run that
    finishes before its kill (the load fell) ends the series, and `kills` says how many there were."""
    walls, finished = [], False
    while len(walls) < 3 and not finished:
        wall, finished = timed(make_cmd(), env, kill_after=0.25 * whole_s)
        walls.append(wall)
    if not finished:
        walls.append(timed(make_cmd(), env)[0])
    return {"walls_s": walls, "kills": len(walls) - 1, "total_s": sum(walls), "ratio": sum(walls) / whole_s}


def cluster_prune(args) -> dict:
    root = Path(args.dir)
    pool = root / "pool"
    write_pool(pool, args.rows, args.shards, args.dim, args.clusters, 0)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))

    def cmd(out):
        return lambda: [sys.executable, "-m", "fastvote.cli", "cluster-prune", "--device", "cpu", "--source",
                        str(pool), "--target", str(root / "pool-target.npy"), "--out", str(out), "--clusters",
                        str(args.clusters), "--ratio", "0.9", "--iterations", str(args.iterations)]

    whole = timed(cmd(root / "whole")(), env)[0]
    resumed = killed_three_times(cmd(root / "resumed"), env, whole)
    same = outputs(root / "whole") == outputs(root / "resumed")
    manifest = json.loads((root / "resumed" / "manifest.json").read_text())
    return {"rows": args.rows, "shards": args.shards, "dim": args.dim, "clusters": args.clusters,
            "uninterrupted_s": whole, **resumed, "identical_outputs": same, "last_resume": manifest["resumed"]}


def features(args) -> dict:
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    setup = f"""
from pathlib import Path
from fastvote import data as fvdata, models
root = Path({str(root)!r})
if not (root / "s.pt").exists():
    fvdata.write_offline("haystack", "train", root / "h.beton", per_class={args.per_class}, progress=False)
    m = models.build_model("resnet18", 30, image_size={args.image_size}, seed=0)
    models.save_checkpoint(root / "s.pt", m, resolution={args.image_size}, mean=[0.5] * 3, std=[0.25] * 3)
"""
    subprocess.run([sys.executable, "-c", setup], check=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), FASTVOTE_LOADER="torch")

    def cmd(name):
        return lambda: [sys.executable, "-m", "fastvote.cli", "--device", "cpu", "features", str(root / "h.beton"),
                        "--surrogate", str(root / "s.pt"), "--arch", "resnet18", "--out", str(root / name),
                        "--workdir", str(root / f"work-{name}"), "--batch-size", "64"]

    whole = timed(cmd("whole")(), env)[0]
    resumed = killed_three_times(cmd("resumed"), env, whole)
    same = all((root / "whole" / f).read_bytes() == (root / "resumed" / f).read_bytes()
               for f in ("features.npy", "logits.npy", "labels.npy"))
    return {"images": args.per_class * 30, "image_size": args.image_size, "uninterrupted_s": whole, **resumed,
            "identical_outputs": same}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("cluster-prune", "features"))
    p.add_argument("--rows", type=int, default=500_000)
    p.add_argument("--shards", type=int, default=10)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--clusters", type=int, default=500)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--per-class", type=int, default=150)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dir", default="/tmp/bench_resume")
    args = p.parse_args()
    result = {"mode": args.mode, "cpu": cpu_model(), "threads": args.threads,
              **(cluster_prune(args) if args.mode == "cluster-prune" else features(args))}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
