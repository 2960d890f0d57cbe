"""NormSim over embedding shards (fastvote.data.score_shards, `fastvote
normsim-prune`): per-shard scores equal to the op's float64 oracle, an exact
budget with ties kept in position order, the known answer (a target near a few
clusters keeps their rows), the output-folder rule, and two torchrun ranks
writing what one process writes."""
import json

import numpy as np
import pytest
import torch

from fastvote import ops
from fastvote.cli import main as cli_main
from fastvote.data import score_shards
from fastvote.data.score_shards import normsim_prune

K, D = 12, 10
NEAR = (3, 7)


@pytest.fixture
def pool(tmp_path):
    """Four shards (npy float16, npz with uids, a one-row shard) of 12 clusters, and a target near two of them."""
    g = np.random.default_rng(0)
    centres = g.normal(0, 8, (K, D)).astype(np.float32)
    folder = tmp_path / "pool"
    folder.mkdir()
    shards = []
    for i, n in enumerate([250, 1, 180, 333]):
        labels = g.integers(0, K, n)
        x = (centres[labels] + g.normal(0, 1, (n, D))).astype(np.float16)
        shards.append((x, labels))
        if i == 2:
            np.savez(folder / f"s{i}.npz", emb=x, uid=np.array([f"u{i}-{j}" for j in range(n)]))
        else:
            np.save(folder / f"s{i}.npy", x)
    target = (centres[g.choice(NEAR, 40)] + g.normal(0, 1, (40, D))).astype(np.float32)
    np.save(tmp_path / "target.npy", target)
    return folder, tmp_path / "target.npy", shards


def kept(out, name):
    return np.load(out / "kept" / f"{name}.npy")


def test_scores_per_shard_match_float64_and_the_budget_is_the_best_rows(pool, tmp_path):
    folder, target, shards = pool
    out = tmp_path / "out"
    result = normsim_prune(folder, target, out, keep=100, device="cpu", progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["kind"] == "normsim-prune" and manifest["kept_rows"] == 100
    assert result.kept_rows == 100 and result.num_rows == 764
    t = torch.from_numpy(np.load(target))
    every = []
    for i, (x, _) in enumerate(shards):
        values, indices, rms = ops.sample_scores_exact(torch.from_numpy(x.astype(np.float32)), t, 1)
        best = np.load(out / "max" / f"s{i}.npy")
        assert best.dtype == np.float32 and np.abs(best - values[:, 0].numpy()).max() < 1e-5
        assert np.abs(np.load(out / "rms" / f"s{i}.npy") - rms.numpy()).max() < 1e-5
        assert (np.load(out / "nearest" / f"s{i}.npy") == indices[:, 0].numpy()).mean() > 0.99  # near-ties aside
        every.append(best)
    scores = np.concatenate(every)
    mask = np.zeros(len(scores), bool)
    starts = np.cumsum([0] + [len(x) for x, _ in shards])
    for i in range(len(shards)):
        mask[starts[i] + kept(out, f"s{i}")] = True
    assert scores[mask].min() >= scores[~mask].max() and result.cutoff == scores[mask].min()
    assert list(np.load(out / "kept" / "s2.ids.npy")) == [f"u2-{j}" for j in kept(out, "s2")]


def test_a_target_near_two_clusters_keeps_exactly_their_rows(pool, tmp_path, capsys):
    folder, target, shards = pool
    labels = np.concatenate([lab for _, lab in shards])
    wanted = int(np.isin(labels, NEAR).sum())
    for p in ("inf", "2"):
        out = tmp_path / f"out-{p}"
        normsim_prune(folder, target, out, keep=wanted, p=p, device="cpu", progress=False)
        hit = sum(int(np.isin(lab[kept(out, f"s{i}")], NEAR).sum()) for i, (_, lab) in enumerate(shards))
        with capsys.disabled():
            print(f"\n[known answer, shards] p={p}: recall {hit / wanted:.3f}, precision {hit / wanted:.3f}")
        assert hit == wanted


def test_ties_at_the_cutoff_go_in_position_order(tmp_path):
    folder = tmp_path / "pool"
    folder.mkdir()
    row = np.ones((1, 4), np.float32)
    for name, n in (("a", 3), ("b", 5)):  # eight identical rows: every score ties
        np.save(folder / f"{name}.npy", np.repeat(row, n, 0))
    np.save(folder / "c.npy", -np.repeat(row, 2, 0))
    np.save(tmp_path / "t.npy", row)
    out = tmp_path / "out"
    normsim_prune(folder, tmp_path / "t.npy", out, keep=5, device="cpu", progress=False)
    assert kept(out, "a").tolist() == [0, 1, 2] and kept(out, "b").tolist() == [0, 1] and kept(out, "c").size == 0
    normsim_prune(folder, tmp_path / "t.npy", out, ratio=0.0, device="cpu", progress=False)  # replaces the output
    assert kept(out, "c").tolist() == [0, 1]


def test_order_keys_follow_the_float_order():
    values = np.array([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-38, 0.25, 0.5000001, 7.0, np.inf], np.float32)
    keys = score_shards._order_keys(values)
    assert (np.diff(keys.astype(np.int64)) > 0).all()
    assert [score_shards._score_of(int(k)) for k in keys] == values.tolist()


@pytest.mark.parametrize("seed", range(4))
def test_cutoff_equals_sorting(tmp_path, seed):
    g = np.random.default_rng(seed)
    # Few distinct values (heavy ties), spread over both halves of the bit range.
    files = []
    for i, n in enumerate((40, 1, 77)):
        path = tmp_path / f"{i}.npy"
        np.save(path, g.choice(np.array([-0.75, -0.1, 0.0, 0.3, 0.30000001, 0.9], np.float32), n))
        files.append(path)
    scores = np.concatenate([np.load(f) for f in files])
    for budget in (1, 17, 60, len(scores)):
        cut, take = score_shards._cutoff(files, budget)
        best = np.sort(scores)[::-1][budget - 1]
        assert score_shards._score_of(cut) == best
        assert take == budget - (scores > best).sum()


def test_bad_arguments_fail_before_any_compute(pool, tmp_path):
    folder, target, _ = pool
    np.save(tmp_path / "wide.npy", np.zeros((3, D + 1), np.float32))
    cases = [(dict(target=tmp_path / "wide.npy", keep=5), "width 11 but the source's 10"),
             (dict(keep=5, p="1"), "p='1' is invalid"),
             (dict(keep=0), "keep=0 is invalid"),
             (dict(keep=5, ratio=0.5), "exactly one of"),
             (dict(ratio=1.0), "ratio=1.0 is invalid")]
    for kw, words in cases:
        kw = {"target": target, **kw}
        with pytest.raises(ValueError, match=words):
            normsim_prune(folder, kw.pop("target"), tmp_path / "never", device="cpu", progress=False, **kw)
        assert not (tmp_path / "never").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="files fastvote did not write"):
        normsim_prune(folder, target, tmp_path / "mine", keep=5, device="cpu", progress=False)


def test_cli_normsim_prune_and_under_torchrun(pool, tmp_path, capsys):
    """One process and two gloo ranks (each its own shards) write the same files."""
    from test_distributed import torchrun

    folder, target, _ = pool
    args = ["normsim-prune", "--source", folder, "--target", target, "--keep", "150", "--pnorm", "2"]
    assert cli_main(["--device", "cpu", *map(str, args), "--out", str(tmp_path / "one")]) == 0
    assert "kept 150 of 764 source rows by NormSim_2" in capsys.readouterr().out
    torchrun("-m", "fastvote.cli", "--device", "cpu", *args, "--out", tmp_path / "two")
    one, two = tmp_path / "one", tmp_path / "two"
    for sub in ("max", "rms", "nearest", "kept"):
        files = sorted(p.name for p in (one / sub).iterdir())
        assert files == sorted(p.name for p in (two / sub).iterdir()) and files, sub
        for f in files:
            assert np.array_equal(np.load(one / sub / f), np.load(two / sub / f)), f"{sub}/{f}"
    manifests = [json.loads((d / "manifest.json").read_text()) for d in (one, two)]
    assert manifests[0]["kept_rows"] == manifests[1]["kept_rows"] == 150 and manifests[1]["ranks"] == 2
    assert cli_main(["normsim-prune", "--source", str(folder), "--target", str(target), "--keep", "0",
                     "--out", str(tmp_path / "bad")]) == 2
