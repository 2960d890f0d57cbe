"""torch.distributed on CPU: two gloo processes started by torchrun (as a
user would) must give exactly the single-process votes, centroids, K-means
clusters and kept indices; DDP pretraining takes the expected steps, writes
one checkpoint and resumes bitwise."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fastvote
from fastvote import data as fvdata
from fastvote import models, train
from fastvote.cluster import kmeans
from fastvote.voting import LMVoter

HERE = Path(__file__).parent
WORKER = HERE / "distributed_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, nproc: int = 2, expect: int = 0, timeout: int = 600) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node nproc ARGS` on a free port, one thread a process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *map(str, args)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != expect:
        raise AssertionError(f"{' '.join(cmd)} exited {done.returncode}, expected {expect}:\n"
                             f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return done


def ranks(out: Path, n: int = 2) -> list:
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(n)]


# ---------------------------------------------------------------- voting, centroids, K-means, prune

@pytest.fixture(scope="module")
def arrays(tmp_path_factory):
    """Random surrogate outputs with awkward sizes (rows not divisible by 2 or by the batch)."""
    root = tmp_path_factory.mktemp("dist")
    g = np.random.default_rng(0)
    centers = g.normal(0, 4, (9, 13)).astype(np.float32)
    labels = g.integers(0, 9, 301)
    arrays = {"source_features": (centers[labels] + g.normal(0, 1, (301, 13))).astype(np.float32),
              "source_labels": labels.astype(np.int64),
              "target_features": (centers[g.integers(0, 3, 97)] + g.normal(0, 1, (97, 13))).astype(np.float32),
              "target_logits": g.integers(-5, 5, (97, 9)).astype(np.float32)}  # integer logits: many ties
    np.savez(root / "data.npz", **arrays)
    (root / "outputs").mkdir()
    for name, a in arrays.items():
        np.save(root / "outputs" / f"{name}.npy", a)
    return root, arrays


def test_two_processes_match_one(arrays, one_thread):
    root, a = arrays
    out = root / "units"
    out.mkdir()
    torchrun(WORKER, "units", out, root / "data.npz")
    r0, r1 = ranks(out)
    assert r0["world_size"] == 2

    voter = LMVoter(9, k=2)
    voter.update(torch.from_numpy(a["target_logits"]))
    features = torch.from_numpy(a["source_features"])
    sums = torch.zeros(9, 13, dtype=torch.float64).index_add_(0, torch.from_numpy(a["source_labels"]), features.double())
    centroids = (sums / torch.bincount(torch.from_numpy(a["source_labels"]))[:, None]).float()
    clusters, assignments = kmeans(lambda: features.split(5), 6, num_rows=301, seed=3, progress=False)
    source = {"features": root / "outputs" / "source_features.npy", "labels": root / "outputs" / "source_labels.npy"}
    target = {"features": root / "outputs" / "target_features.npy", "logits": root / "outputs" / "target_logits.npy"}
    for r in (r0, r1):  # every rank holds the single-process answer
        assert torch.equal(r["votes"], voter.votes) and r["rows"] == 97
        torch.testing.assert_close(r["scores"], voter.scores(), rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(r["centroids"], centroids, rtol=0, atol=1e-6)
        torch.testing.assert_close(r["clusters"], clusters, rtol=0, atol=1e-5)
        assert np.array_equal(r["assignments"].numpy(), assignments)
    for name, method, kw in (("lm", "lm", {}), ("fm", "fm", {}),
                             ("fm-kmeans", "fm", {"centroids": "kmeans", "num_clusters": 6})):
        single = fastvote.prune(source, target, method=method, keep=3, progress=False, **kw)
        for r in (r0, r1):
            assert torch.equal(r[f"{name}.indices"], single.indices), name
            assert torch.equal(r[f"{name}.kept"], single.kept_classes), name
            assert torch.equal(r[f"{name}.votes"], single.votes), name


# ---------------------------------------------------------------- the CLI on real data

try:
    import ffcv  # noqa: F401
    _LACKING = fvdata.missing("haystack") or fvdata.missing("digits")
except ImportError:
    _LACKING = "ffcv is not installed"
real = pytest.mark.skipif(bool(_LACKING), reason=f"real-data runs need ffcv and the offline datasets: {_LACKING}")


@real
def test_cli_prune_under_torchrun_matches_one_process(tmp_path, one_thread):
    """`fastvote prune` unchanged under torchrun: LM (target votes sharded) and
    FM (source centroids sharded too) on haystack -> digits."""
    source = fvdata.write_offline("haystack", "train", tmp_path / "haystack.beton", per_class=60, progress=False)
    target = fvdata.write_offline("digits", "train", tmp_path / "digits.beton", progress=False)
    mean, std = fvdata.channel_stats(source)
    model = models.build_model("tiny", 30, image_size=16, seed=0)
    loader = fvdata.train_loader(source, 128, resolution=16, mean=mean, std=std, seed=0, flip=False,
                                 scale=(1.0, 1.0), ratio=(1.0, 1.0))
    train.train_classifier(model, loader, train.TrainConfig(epochs=2, batch_size=128, lr=0.2), device="cpu",
                           progress=False)
    surrogate = models.save_checkpoint(tmp_path / "surrogate.pt", model, resolution=16, mean=list(mean),
                                       std=list(std))
    for method in ("lm", "fm"):
        args = ["prune", "--source", source, "--target", target, "--method", method, "--keep", "10",
                "--surrogate", surrogate, "--batch-size", "64"]
        one = tmp_path / f"{method}-1"
        subprocess.run([sys.executable, "-m", "fastvote.cli", "--device", "cpu", "--workdir", tmp_path / "w1", *args, "--out", one],
                       check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        two = tmp_path / f"{method}-2"
        torchrun("-m", "fastvote.cli", "--device", "cpu", "--workdir", tmp_path / "w2", *args, "--out", two)
        assert np.array_equal(np.load(one / "indices.npy"), np.load(two / "indices.npy")), method
        classes = [json.loads((d / "classes.json").read_text()) for d in (one, two)]
        assert classes[0]["kept"] == classes[1]["kept"]
        assert [c["votes"] for c in classes[0]["classes"]] == [c["votes"] for c in classes[1]["classes"]]
        assert (two / "votes.png").is_file()
        assert not list(tmp_path.glob(f".{method}-2.*")), "no staging folder left behind"


# ---------------------------------------------------------------- DDP training

@real
def test_ddp_pretraining_steps_checkpoint_and_resume(tmp_path, one_thread):
    beton = fvdata.write_offline("digits", "train", tmp_path / "digits.beton", progress=False)
    n = len(fvdata.read_columns(beton)["labels"])
    full = tmp_path / "full"
    full.mkdir()
    torchrun(WORKER, "train", full, beton, 2)
    r0, r1 = ranks(full)
    # each rank reads ceil(n / 2) samples an epoch (DistributedSampler pads); batches of 16, last dropped
    expected = (n + 1) // 2 // 16
    assert r0["batches"] == expected and r0["history"]["steps"] == [expected, expected]
    assert r1["history"]["steps"] == [expected, expected]
    for key in r0["state"]:  # DDP keeps the replicas equal
        assert torch.equal(r0["state"][key], r1["state"][key]), key
    assert sorted(p.name for p in (full / "ckpt").iterdir()) == [train.MODEL_FILE, train.STATE_FILE]
    # DDP finetuning: each rank a half of the batches, the same finetuned weights and test accuracy on both
    assert r0["finetune_batches"] == r1["finetune_batches"] == -(-((n + 1) // 2) // 16)
    assert r0["finetune_test_acc"] == r1["finetune_test_acc"]
    for key in r0["finetuned"]:
        assert torch.equal(r0["finetuned"][key], r1["finetuned"][key]), key
    saved = models.load_model(full / "ckpt" / train.MODEL_FILE)
    for key, value in models.unwrap_model(saved).state_dict().items():
        assert torch.equal(value, r0["state"][key]), key

    # killed after the first epoch, then resumed: the same weights as the uninterrupted run
    part = tmp_path / "part"
    part.mkdir()
    torchrun(WORKER, "train", part, beton, 2, 0, expect=1)
    assert (part / "ckpt" / train.STATE_FILE).is_file() and not (part / "ckpt" / train.MODEL_FILE).exists()
    torchrun(WORKER, "train", part, beton, 2)
    resumed = ranks(part)
    assert resumed[0]["history"]["steps"] == [expected, expected]
    for key in r0["state"]:
        assert torch.equal(resumed[0]["state"][key], r0["state"][key]), key
        assert torch.equal(resumed[1]["state"][key], r0["state"][key]), key


def test_undistributed_loader_is_refused_under_ddp(monkeypatch):
    """Under torchrun, pretraining on an unsharded loader would do N times the work: a clear error."""
    from fastvote import distributed
    from torch.utils.data import DataLoader, TensorDataset

    monkeypatch.setattr(distributed, "active", lambda: True)
    loader = DataLoader(TensorDataset(torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)), batch_size=2)
    with pytest.raises(ValueError, match="train_loader: under torch.distributed every rank must read its own shard"):
        train._data_parallel(models.build_model("tiny", 2), loader, torch.device("cpu"), "train_loader", require=True)
