"""What tests/test_distributed.py runs under torchrun (each rank runs this
file; the results go to OUT/rank<r>.pt for the test to compare with a single
process). Scenarios:

    units OUT DATA.npz   voters, class centroids, K-means, fastvote.prune on .npy outputs
    train OUT BETON EPOCHS [CRASH_AFTER]   DDP pretraining of a tiny model, resumable
"""
import sys
from pathlib import Path

import numpy as np
import torch

import fastvote
from fastvote import distributed


def units(out: Path, data: Path) -> dict:
    from fastvote.cluster import kmeans
    from fastvote.methods.fm import source_centroids
    from fastvote.voting import LMVoter

    arrays = dict(np.load(data))
    rows = distributed.shard(len(arrays["target_logits"]))
    voter = LMVoter(arrays["target_logits"].shape[1], k=2)
    for start in range(rows.start, rows.stop, 7):  # odd batches: any batching gives the same sums
        voter.update(torch.from_numpy(arrays["target_logits"][start:min(start + 7, rows.stop)]))
    voter.all_reduce()
    view = ArrayView(arrays["source_features"], arrays["source_labels"])
    centroids, _ = source_centroids(view, progress=False)
    clusters, assignments = kmeans(lambda: (b["features"] for b in view.batches(("features",), shard=True)), 6,
                                   num_rows=view.num_rows, sharded=True, seed=3, progress=False)
    folder = data.parent / "outputs"
    source = {"features": str(folder / "source_features.npy"), "labels": str(folder / "source_labels.npy")}
    target = {"features": str(folder / "target_features.npy"), "logits": str(folder / "target_logits.npy")}
    results = {name: fastvote.prune(source, target, method=method, keep=3, progress=False, **kw)
               for name, method, kw in (("lm", "lm", {}), ("fm", "fm", {}),
                                        ("fm-kmeans", "fm", {"centroids": "kmeans", "num_clusters": 6}))}
    return {"votes": voter.votes, "scores": voter.scores(), "rows": voter.rows, "centroids": centroids,
            "clusters": clusters, "assignments": torch.from_numpy(assignments),
            **{f"{name}.indices": r.indices for name, r in results.items()},
            **{f"{name}.kept": r.kept_classes for name, r in results.items()},
            **{f"{name}.votes": r.votes for name, r in results.items()}}


class ArrayView:
    """The smallest source view: in-memory features and labels (see fastvote.methods.View)."""

    def __init__(self, features, labels):
        self.features, self.labels = torch.from_numpy(features), labels
        self.num_rows, self.num_classes = len(labels), int(labels.max()) + 1

    def batches(self, want, shard=False):
        rows = distributed.shard(self.num_rows) if shard else range(self.num_rows)
        for start in range(rows.start, rows.stop, 5):
            stop = min(start + 5, rows.stop)
            yield {"features": self.features[start:stop], "labels": torch.from_numpy(self.labels[start:stop])}


def train(out: Path, beton: str, epochs: int, crash_after: int = -1) -> dict:
    from fastvote import data, models
    from fastvote.train import TrainConfig, train_classifier

    distributed.init_from_env("cpu")
    torch.set_num_threads(1)
    mean, std = data.channel_stats(beton)
    # no crop, no flip: the epochs are deterministic, so a resumed run can match bitwise
    loader = data.train_loader(beton, 16, resolution=16, mean=mean, std=std, seed=0, flip=False,
                               scale=(1.0, 1.0), ratio=(1.0, 1.0), distributed=True, num_workers=1, drop_last=True)
    model = models.build_model("tiny", 10, image_size=16, seed=0)

    def crash(epoch, history):
        if epoch == crash_after:
            raise SystemExit(3)

    history = train_classifier(model, loader, TrainConfig(epochs=epochs, batch_size=16, lr=0.1, seed=0),
                               device="cpu", checkpoint_dir=out / "ckpt", progress=False, on_epoch_end=crash)
    # DDP finetuning: a sharded training loader, the whole validation and test split on every rank
    from fastvote.train import finetune

    sharded = data.eval_loader(beton, 16, resolution=16, mean=mean, std=std, distributed=True, num_workers=1)
    whole = data.eval_loader(beton, 64, resolution=16, mean=mean, std=std, num_workers=1)
    tuned = finetune(model, sharded, whole, whole, num_classes=10, mode="full", epochs=1, lr=1e-3, device="cpu",
                     progress=False)
    return {"history": history, "state": models.unwrap_model(model).state_dict(), "batches": len(loader),
            "finetuned": models.unwrap_model(tuned["model"]).state_dict(), "finetune_test_acc": tuned["test_acc"],
            "finetune_batches": len(sharded)}


if __name__ == "__main__":
    scenario, out = sys.argv[1], Path(sys.argv[2])
    distributed.init_from_env("cpu")
    result = units(out, Path(sys.argv[3])) if scenario == "units" else train(
        out, sys.argv[3], int(sys.argv[4]), int(sys.argv[5]) if len(sys.argv) > 5 else -1)
    result["world_size"] = distributed.world_size()
    torch.save(result, out / f"rank{distributed.rank()}.pt")
    distributed.shutdown()
