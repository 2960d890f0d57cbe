"""What the CPU pass's layout and precision change on real data (issue 23): the share of
target samples whose vote (k = 1, the default) moves against the float32 NCHW pass, and the
kept classes of LM and FM with amp=False (float32) and amp=True (bfloat16 autocast).

  demo    haystack -> digits as `fastvote demo` runs it: the "small" CNN trained 3 epochs at
          16 px (batch 256, lr 0.2, seed 0); targets: the 10-shot training split (what votes)
          and the test split (more samples for the share); keep 10 and 6
  photos  examples/imagenet_photos.py: EfficientNet-Lite0 (ImageNet weights) over six photos,
          the ImageNet label space as the source; LM, keep 6

Votes: LM, the arg-max logit; FM, the nearest source-class centroid (l2, the default) of
centroids from the same pass. bf16 here is whatever the CPU gives: native with avx512_bf16 or
AMX, oneDNN's emulation without (bf16-rounded operands, fp32 accumulation: the same kind of
numbers).

    python benchmarks/precision_votes.py --threads 2 [--workdir DIR]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODES = ("fp32 NCHW", "fp32 channels_last", "bf16 channels_last")


def outputs(model, loader, mode: str) -> dict:
    """Logits and features of every sample under `mode` (float32 NCHW: the pass before issue 23)."""
    from fastvote.features import collect
    from fastvote.models import as_classifier

    if mode != "fp32 NCHW":
        return collect(model, loader, device="cpu", amp=mode.startswith("bf16"), progress=False)
    net = as_classifier(model).eval()
    parts = {"logits": [], "features": [], "labels": []}
    with torch.inference_mode():
        for images, labels, *_ in loader:
            logits, features = net.forward_both(images)
            parts["logits"].append(logits.float())
            parts["features"].append(features.float())
            parts["labels"].append(labels)
    return {k: torch.cat(v) for k, v in parts.items()}


def fm_votes(target_features, source_features, source_labels, num_classes) -> torch.Tensor:
    centroids = torch.zeros(num_classes, source_features.shape[1], dtype=torch.float64)
    centroids.index_add_(0, source_labels, source_features.double())
    centroids /= torch.bincount(source_labels, minlength=num_classes).clamp(min=1)[:, None]
    return torch.cdist(target_features.double(), centroids).argmin(1)


def changed(votes: dict) -> str:
    ref = votes["fp32 NCHW"]
    return " | ".join(f"{int((votes[m] != ref).sum())}/{len(ref)}" for m in MODES[1:])


def demo(workdir: str) -> None:
    import fastvote
    from fastvote import data as fvdata, models
    from fastvote.train import TrainConfig

    common = dict(source="haystack", arch="small", image_size=16, device="cpu", workdir=workdir, progress=False,
                  train_config=TrainConfig(epochs=3, batch_size=256, lr=0.2, seed=0), seed=0)
    print("\n## demo: haystack -> digits (small CNN, 16 px, 3 epochs)\n")
    kept = {}
    for method in ("lm", "fm"):
        for keep in (10, 6):
            for amp in (False, True):
                result = fastvote.prune(target="digits", method=method, keep=keep, amp=amp, **common)
                kept[method, keep, amp] = sorted(result.kept_classes.tolist())
    manifest = result.manifest
    names = result.class_names
    model = models.load_model(manifest["surrogate"]["path"]).eval()
    prep = {k: manifest["preprocessing"][k] for k in ("resolution", "mean", "std")} \
        if "preprocessing" in manifest else None
    print("| method | keep | kept classes, float32 | bfloat16 | same |\n|---|---|---|---|---|")
    for (method, keep, amp), classes in kept.items():
        if amp:
            fp32 = kept[method, keep, False]
            print(f"| {method} | {keep} | {', '.join(names[c] for c in fp32)} | "
                  f"{'(as float32)' if fp32 == classes else ', '.join(names[c] for c in classes)} | "
                  f"{'yes' if fp32 == classes else 'NO'} |")
    source = fastvote.inputs.resolve("haystack", "source", fastvote.inputs.workdir_path(workdir), False)
    mean, std = (prep["mean"], prep["std"]) if prep else (None, None)
    if mean is None:
        mean, std = fvdata.channel_stats(source.beton)
    loader = lambda beton: fvdata.eval_loader(beton, 256, resolution=16, mean=mean, std=std,  # noqa: E731
                                              crop_ratio=fvdata.default_crop_ratio(16))
    src = {m: outputs(model, loader(source.beton), m) for m in MODES}
    print("\n| target | samples | LM votes changed: fp32 channels_last | bf16 channels_last | "
          "FM votes changed: fp32 channels_last | bf16 channels_last |\n|---|---|---|---|---|---|")
    for split in ("train", "test"):
        target = fastvote.inputs.resolve(f"digits:{split}", "target", fastvote.inputs.workdir_path(workdir), False)
        tgt = {m: outputs(model, loader(target.beton), m) for m in MODES}
        lm = {m: tgt[m]["logits"].argmax(1) for m in MODES}
        fm = {m: fm_votes(tgt[m]["features"], src[m]["features"], src[m]["labels"], len(names)) for m in MODES}
        print(f"| digits:{split} | {len(lm['fp32 NCHW'])} | {changed(lm)} | {changed(fm)} |")


def photos(workdir: str) -> None:
    import fastvote
    from fastvote.models import as_classifier
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
    import imagenet_photos as ex
    import torchvision.transforms as T
    from PIL import Image

    print("\n## photos: EfficientNet-Lite0 over six opencv-doc photos (LM, keep 6)\n")
    model = ex.efficientnet_lite0().eval()
    resize = T.Resize(256)
    photos = [(resize(Image.open(ex.PHOTOS / f"{n}.jpg").convert("RGB")), 0) for n in ex.NAMES]
    kept = {}
    for amp in (False, True):
        result = fastvote.prune({"labels": np.arange(1000), "class_names": "imagenet"}, photos, method="lm", keep=6,
                                surrogate=model, device="cpu", workdir=workdir, amp=amp, progress=False)
        kept[amp] = sorted(result.kept_classes.tolist())
    names = result.class_names
    same = kept[False] == kept[True]
    print(f"kept, float32: {', '.join(names[c] for c in kept[False])}; bfloat16: "
          f"{'the same' if same else ', '.join(names[c] for c in kept[True]) + ' (CHANGED)'}")
    # the same preprocessing prune gave the photos: the weights' resize 256 + centre crop 224, ImageNet statistics
    crop = T.Compose([T.CenterCrop(224), T.ToTensor(),
                      T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    loader = [(torch.stack([crop(im) for im, _ in photos]), torch.zeros(len(photos), dtype=torch.int64))]
    out = {m: outputs(as_classifier(model), loader, m) for m in MODES}
    votes = {m: out[m]["logits"].argmax(1) for m in MODES}
    print(f"LM votes changed against fp32 NCHW: fp32 channels_last {changed({**votes})}".replace(" | ", "; bf16: "))
    print("top-1 per photo (fp32 NCHW / bf16):", ", ".join(
        f"{n}: {names[a]}{'' if a == b else ' / ' + names[b]}"
        for n, a, b in zip(ex.NAMES, votes["fp32 NCHW"].tolist(), votes["bf16 channels_last"].tolist())))


def main(argv=None) -> int:
    from bench_surrogate import cpu_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default=None, help="default: a temporary folder")
    p.add_argument("--cases", default="demo,photos")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{cpu_model()}; {args.threads} threads; torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or tmp
        if "demo" in args.cases:
            demo(workdir)
        if "photos" in args.cases:
            photos(workdir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
