"""Loaders at ImageNet resolution: FFCV (fastvote.data) against torchvision's
ImageFolder + DataLoader, same images, same workers, same batch, side by side
in one run.

Three workloads per loader, each in a fresh process (so the first batch pays
what a user's first batch pays: imports, worker start-up, FFCV's numba
compilation):
  load      the loader alone (decode + crop + resize + normalise)
  features  + surrogate feature extraction (eval-mode ResNet-18, no grad):
            what `fastvote prune` does over a source
  train     + a ResNet-18 training step on RandomResizedCrop + flip batches:
            what pretraining on the kept subset does

Eval pipelines: short side resized so a 224 centre crop is 224/256 of it
(ImageNet's "resize 256, crop 224"); train: RandomResizedCrop(224, scale
0.08-1) + flip. Images: JPEG photos (Debian's opencv-doc examples and
scikit-learn's sample images), cut into random crops with the long side 500
px (ImageNet's typical size), stored as JPEG quality 90 in an ImageFolder;
the FFCV beton is written from that folder by `fastvote data write
--image-folder` (JPEG 90, long side <= 512).

    python benchmarks/bench_loaders.py                      # CPU: ffcv, torchvision
    python benchmarks/bench_loaders.py --device cuda --loaders torchvision,fastvote-torch --arch resnet50
    python benchmarks/bench_loaders.py --results benchmarks/RESULTS.md
"""
from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
PHOTOS = "/usr/share/doc/opencv-doc/examples/data/*.jpg"
LOADERS = ("ffcv", "torchvision", "fastvote-torch")  # fastvote-torch: fastvote's loaders without FFCV
WORKLOADS = ("load", "features", "train")
RESOLUTION = 224
CROP_RATIO = 224 / 256


def _photos() -> tuple:
    """(images, kind): real photos (RGB PIL images at least 240 px a side), or,
    where none are installed (the GPU machine: no opencv-doc, no scikit-learn),
    smooth random images, which the table's header then says."""
    from PIL import Image

    images = []
    try:
        from sklearn.datasets import load_sample_images
        images = [Image.fromarray(a) for a in load_sample_images().images]
    except ImportError:
        pass
    for f in sorted(glob.glob(PHOTOS)):
        with Image.open(f) as im:
            if min(im.size) >= 240:
                images.append(im.convert("RGB"))
    if len(images) >= 10:
        return images, "photos"
    print(f"bench_loaders: {len(images)} photos found (opencv-doc, scikit-learn); using smooth random images",
          file=sys.stderr)
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((640, 480), Image.BICUBIC)
            for _ in range(20)], "synthetic"


def make_folder(root: str, count: int, seed: int = 0) -> str:
    """`count` JPEGs in 10 class folders (written once; a finished folder is reused)."""
    done = os.path.join(root, ".complete")
    if os.path.exists(done):
        return root
    photos, kind = _photos()
    rng = np.random.default_rng(seed)
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = photo.size
        side = rng.uniform(0.4, 1.0)
        cw, ch = int(w * side), int(h * side * rng.uniform(0.75, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = photo.crop((x, y, x + cw, y + ch))
        scale = 500 / max(crop.size)
        crop = crop.resize((max(1, round(crop.size[0] * scale)), max(1, round(crop.size[1] * scale))))
        folder = os.path.join(root, f"class{i % 10}")
        os.makedirs(folder, exist_ok=True)
        crop.save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)
    with open(done, "w") as f:
        f.write(kind)
    return root


def make_beton(folder: str, path: str, workers: int) -> str:
    if not os.path.exists(path):
        subprocess.run([sys.executable, "-m", "fastvote.cli", "data", "write", "--image-folder", folder, path,
                        "--workers", str(workers)], check=True)
    return path


# ---------------------------------------------------------------- one measurement (a fresh process)

def _torchvision_loader(folder: str, train: bool, batch: int, workers: int, device):
    import torch
    from torchvision import datasets, transforms

    from fastvote.data import IMAGENET_MEAN, IMAGENET_STD

    crop = ([transforms.RandomResizedCrop(RESOLUTION), transforms.RandomHorizontalFlip()] if train else
            [transforms.Resize(round(RESOLUTION / CROP_RATIO)), transforms.CenterCrop(RESOLUTION)])
    dataset = datasets.ImageFolder(folder, transforms.Compose(
        [*crop, transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]))
    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=train, drop_last=train,
                                       num_workers=workers, pin_memory=device.type == "cuda",
                                       persistent_workers=False)


def _fastvote_loader(beton: str, train: bool, batch: int, workers: int, device):
    from fastvote import data

    common = dict(resolution=RESOLUTION, mean=data.IMAGENET_MEAN, std=data.IMAGENET_STD, device=device,
                  num_workers=workers)
    if train:
        return data.train_loader(beton, batch, **common)
    return data.eval_loader(beton, batch, crop_ratio=CROP_RATIO, **common)


def measure(loader_name: str, workload: str, folder: str, beton: str, batch: int, workers: int,
            device_name: str, arch: str) -> dict:
    started = time.perf_counter()
    import torch

    from fastvote import models

    device = torch.device(device_name)
    if loader_name == "fastvote-torch":
        os.environ["FASTVOTE_LOADER"] = "torch"
    train = workload == "train"
    loader = (_torchvision_loader(folder, train, batch, workers, device) if loader_name == "torchvision"
              else _fastvote_loader(beton, train, batch, workers, device))
    model = None
    if workload != "load":
        model = models.build_model(arch, 1000, image_size=RESOLUTION, seed=0).to(device)
        model = model.to(memory_format=torch.channels_last).train(train)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    amp = device.type == "cuda"
    first = None
    images = 0
    for x, y, *_ in loader:
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        if model is not None:
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                if train:
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                else:
                    with torch.no_grad():
                        model.backbone(x)
            if train:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        images += len(y)
        if first is None:
            first = time.perf_counter()
            first_latency = first - started
    if first is None:
        raise SystemExit(f"{loader_name}: no batch")
    steady = time.perf_counter() - first
    return {"loader": loader_name, "workload": workload, "images": images, "first_batch_s": first_latency,
            "images_per_s": (images - batch) / steady if images > batch and steady > 0 else float("nan"),
            "total_s": time.perf_counter() - started}


# ---------------------------------------------------------------- driver

def machine(device_name: str) -> str:
    if device_name.startswith("cuda"):
        import torch
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line)}
    return (f"{fields.get('Model name', '?')} (family {fields.get('CPU family', '?')} model "
            f"{fields.get('Model', '?')}), {os.cpu_count()} cores")


def markdown(rows: list, header: str) -> str:
    lines = [header, "", "| workload | loader | images | first batch (s) | images/s after it |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['workload']} | {r['loader']} | {r['images']} | {r['first_batch_s']:.2f} | "
                     f"{r['images_per_s']:.1f} |")
    for workload in WORKLOADS:
        rates = {r["loader"]: r["images_per_s"] for r in rows if r["workload"] == workload}
        if "torchvision" in rates and len(rates) > 1:
            lines.append("")
            lines.append(f"{workload}: " + ", ".join(
                f"{name} {rate / rates['torchvision']:.2f}x torchvision" for name, rate in rates.items()
                if name != "torchvision"))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(HERE, "out", "loaders"), help="where the images and beton go")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--device", default="cpu")
    p.add_argument("--arch", default="resnet18", help="the model of the features and train workloads")
    p.add_argument("--loaders", default=",".join(LOADERS), help=f"comma-separated, of {LOADERS}")
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--results", help="append the table to this Markdown file")
    p.add_argument("--json", help="also write the rows as JSON here")
    p.add_argument("--one", nargs=2, metavar=("LOADER", "WORKLOAD"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    folder = os.path.join(args.out, f"folder-{args.images}")
    beton = os.path.join(args.out, f"images-{args.images}.beton")
    if args.one:
        print(json.dumps(measure(*args.one, folder, beton, args.batch, args.workers, args.device, args.arch)))
        return 0
    loaders = args.loaders.split(",")
    workloads = args.workloads.split(",")
    for name in loaders + workloads:
        if name not in LOADERS + WORKLOADS:
            raise SystemExit(f"--loaders/--workloads: {name!r} is unknown; expected some of {LOADERS} / {WORKLOADS}")
    make_folder(folder, args.images)
    if set(loaders) - {"torchvision"}:
        make_beton(folder, beton, args.workers)
    rows = []
    for workload in workloads:
        for name in loaders:
            done = subprocess.run([sys.executable, __file__, *(argv or sys.argv[1:]), "--one", name, workload],
                                  capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{name} {workload} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{workload:9s} {name:15s} first batch {rows[-1]['first_batch_s']:6.2f} s, "
                  f"{rows[-1]['images_per_s']:8.1f} images/s", flush=True)
    with open(os.path.join(folder, ".complete")) as f:
        kind = f.read() or "photos"
    header = (f"### Loaders at {RESOLUTION} px, {dt.date.today()}, {machine(args.device)}; {args.images} JPEGs ({kind}), "
              f"batch {args.batch}, {args.workers} workers, model {args.arch} (`python benchmarks/bench_loaders.py "
              f"{' '.join(argv or sys.argv[1:])}`)")
    table = markdown(rows, header)
    print(table)
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(args.json + ".tmp", args.json)
    if args.results:
        from bench_vote import write_atomic  # the script's folder is on sys.path
        write_atomic(args.results, "\n" + table, append=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
