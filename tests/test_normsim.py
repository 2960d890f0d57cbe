"""Per-sample target scores as methods: ``normsim`` (p = inf / 2, cap), the cap
rule (fastvote.select.capped_rows) and class-then-sample (``lm+normsim``,
``fm+normsim``), with known answers: target rows drawn near a few source
clusters -> the kept source rows are those clusters' rows; scores against the
float64 oracle; caps exact on small cases."""
import warnings

import numpy as np
import pytest
import torch

import fastvote
from fastvote import cli, methods
from fastvote.inputs import resolve
from fastvote.methods import normsim
from fastvote.select import capped_rows
from fastvote.views import TensorView

pytestmark = pytest.mark.usefixtures("one_thread")

K, PER, D = 8, 200, 32
NEAR = [1, 4, 6]  # the source clusters the target is drawn near


def gen(seed):
    return torch.Generator().manual_seed(seed)


def clusters(seed=0, spread=0.3, target_rows=20):
    """K source clusters of PER rows around random directions, and target rows
    drawn near clusters NEAR: (source outputs, target outputs)."""
    g = gen(seed)
    centers = torch.nn.functional.normalize(torch.randn(K, D, generator=g), dim=1) * 3
    x = (centers[:, None] + spread * torch.randn(K, PER, D, generator=g)).reshape(-1, D)
    t = (centers[NEAR][:, None] + spread * torch.randn(len(NEAR), target_rows, D, generator=g)).reshape(-1, D)
    return {"features": x, "labels": torch.arange(K).repeat_interleave(PER)}, {"features": t}


def recall_precision(indices, labels, wanted):
    kept = np.isin(labels[indices], wanted)
    truth = int(np.isin(labels, wanted).sum())
    return kept.sum() / truth, kept.mean()


# ---------------------------------------------------------------- known answers

@pytest.mark.parametrize("method", ["normsim", "normsim:p=2", "fm+normsim", "lm+normsim", "fm+normsim:pool=1"])
def test_target_near_three_clusters_keeps_exactly_their_rows(method, capsys):
    source, target = clusters()
    if method.startswith("lm"):  # LM reads logits: a head that scores the clusters' directions
        source["logits"] = source["features"] @ source["features"].view(K, PER, D).mean(1).T
        target["logits"] = target["features"] @ source["features"].view(K, PER, D).mean(1).T
    result = fastvote.prune(source, target, method=method, keep=len(NEAR) * PER, progress=False)
    recall, precision = recall_precision(result.indices.numpy(), source["labels"].numpy(), NEAR)
    with capsys.disabled():
        print(f"\n[known answer] {method}: recall {recall:.3f}, precision {precision:.3f}")
    assert result.unit == "samples" and len(result.indices) == len(NEAR) * PER
    assert recall == precision == 1.0
    assert sorted(result.kept_classes.tolist()) == NEAR


def test_noisier_clusters_still_recover_most_rows(capsys):
    source, target = clusters(seed=3, spread=0.5, target_rows=5)
    out = {}
    for method in ("normsim", "normsim:p=2"):
        result = fastvote.prune(source, target, method=method, keep=len(NEAR) * PER, progress=False)
        out[method] = recall_precision(result.indices.numpy(), source["labels"].numpy(), NEAR)
    with capsys.disabled():
        print("\n[known answer, spread 0.5, 5 target rows a cluster] " + ", ".join(
            f"{m}: recall {r:.3f} precision {p:.3f}" for m, (r, p) in out.items()))
    # Overlapping clusters: most rows, not all (keep = their size, so recall = precision).
    assert all(r >= 0.95 for r, _ in out.values())


@pytest.mark.parametrize("p", ["inf", "2"])
def test_scores_match_the_float64_oracle(p):
    source, target = clusters(seed=1)
    view = TensorView(resolve(source, "source", None, False), 333, K, None)  # uneven batches
    tview = TensorView(resolve(target, "target", None, False), 7, K, None)
    got = normsim.scores(view, [tview, tview], p, progress=False)  # two targets: their rows pooled
    values, _, rms = fastvote.ops.sample_scores_exact(source["features"], torch.cat([target["features"]] * 2), 1)
    expected = values[:, 0] if p == "inf" else rms
    assert got.dtype == torch.float64 and got.shape == (K * PER,)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_p_inf_and_p_2_rank_differently_where_they_should():
    # One target row far from the others: p = inf favours the source rows right
    # next to it, p = 2 the rows near the bulk of the target.
    e = torch.eye(4)
    target = {"features": torch.cat([e[0].repeat(9, 1), e[1][None]])}
    source = {"features": torch.stack([e[1], 0.8 * e[0] + 0.6 * e[2]]), "labels": torch.tensor([0, 1])}
    keep_inf = fastvote.prune(source, target, method="normsim", keep=1, progress=False).indices.tolist()
    keep_two = fastvote.prune(source, target, method="normsim:p=2", keep=1, progress=False).indices.tolist()
    assert keep_inf == [0] and keep_two == [1]


# ---------------------------------------------------------------- caps

def test_capped_rows_small_cases_by_hand():
    order = np.arange(10)  # rows already best first
    groups = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 3])
    rows, facts = capped_rows(order, groups, 5, 2, seed=0)
    assert rows.tolist() == [0, 1, 4, 5, 7]
    assert facts["under_cap"] == 7 and facts["tail_drawn"] == 0 and facts["most_kept_in_a_group"] == 2
    rows, _ = capped_rows(order, groups, 7, 2, seed=0)
    assert rows.tolist() == [0, 1, 4, 5, 7, 8, 9]
    rows, _ = capped_rows(order[::-1], groups, 3, 1, seed=0)  # worst-first order: each group's last row
    assert rows.tolist() == [6, 8, 9]
    rows, _ = capped_rows(order, groups, 6, 4, seed=0)  # a cap no group reaches is no cap
    assert rows.tolist() == list(range(6))
    rows, _ = capped_rows(np.array([9, 2, 3, 0]), groups, 2, 1, seed=0)  # candidates only
    assert rows.tolist() == [2, 9]


def test_capped_rows_tail_follows_metaclip_weights():
    # Budget 8 with cap 2: 7 rows are under the cap, one more is drawn from the
    # surplus rows 2, 3 (group 0: 4 rows, weight 2/4) and 6 (group 1: 3 rows, 2/3).
    order, groups = np.arange(10), np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 3])
    picks = []
    for seed in range(3000):
        rows, facts = capped_rows(order, groups, 8, 2, seed)
        assert facts["tail_drawn"] == 1 and set(rows[:7]) | {0} == set(rows[:7])
        picks.append(int(np.setdiff1d(rows, [0, 1, 4, 5, 7, 8, 9])[0]))
    share = np.bincount(picks, minlength=7)[[2, 3, 6]] / len(picks)
    assert np.allclose(share, [0.3, 0.3, 0.4], atol=0.03)  # 0.5 : 0.5 : 0.667
    assert capped_rows(order, groups, 8, 2, 5)[0].tolist() == capped_rows(order, groups, 8, 2, 5)[0].tolist()


@pytest.mark.parametrize("keep,cap,words", [(0, 1, "keep=0"), (11, 2, "keep=11 .* <= 10"), (3, 0, "cap=0"),
                                             (3, True, "cap=True")])
def test_capped_rows_bad_arguments(keep, cap, words):
    with pytest.raises(ValueError, match=words):
        capped_rows(np.arange(10), np.zeros(10, dtype=np.int64), keep, cap, 0)


def test_normsim_cap_per_class_is_exact():
    source, target = clusters()
    result = fastvote.prune(source, target, method="normsim:cap=120", keep=600, progress=False)
    per_class = np.bincount(source["labels"][result.indices].numpy(), minlength=K)
    assert per_class.max() == 120 and per_class.sum() == 600
    assert (per_class[NEAR] == 120).all()  # the target's clusters fill their caps first
    # ... and within each class the kept rows are its best-scoring ones.
    scores = result.manifest["selection"]
    assert scores["tail_drawn"] == 0 and scores["cap_groups"] == "source classes"


def test_normsim_cap_too_tight_for_the_budget_warns_and_fills_it():
    source, target = clusters()
    with pytest.warns(UserWarning, match="cap=50 allows only 400 of the 600"):
        result = fastvote.prune(source, target, method="normsim:cap=50", keep=600, progress=False)
    assert len(result.indices) == 600 and result.manifest["selection"]["tail_drawn"] == 200


def test_normsim_cap_without_labels_uses_kmeans_clusters():
    source, target = clusters()
    unlabelled = {"features": source["features"]}
    result = fastvote.prune(unlabelled, target, method="normsim:cap=100,num_clusters=8", keep=300, progress=False)
    info = result.manifest["selection"]
    assert info["cap_groups"] == "8 k-means clusters (cosine)" and info["most_kept_in_a_group"] == 100
    # k-means finds the 8 clusters, so the cap spreads the budget over the 3 near ones.
    assert (np.bincount(source["labels"][result.indices].numpy(), minlength=K)[NEAR] == 100).all()
    with pytest.raises(ValueError, match="num_clusters="):
        fastvote.prune(unlabelled, target, method="normsim:cap=100", keep=300, progress=False)


# ---------------------------------------------------------------- options

def test_options_are_declared_and_checked():
    spec = methods.parse("normsim:p=2,cap=5")
    assert dict(spec.options) == {"p": "2", "cap": 5, "num_clusters": None} and not spec.class_wise
    assert methods.parse("normsim", {"p": 2}).options["p"] == "2"  # the number 2 names the choice "2"
    assert spec.label == "NormSim (p=2,cap=5)" and methods.parse("fm+normsim").label == "FM+NormSim"
    assert methods.parse("fm+normsim").options["pool"] == 2.0
    for bad, words in (("normsim:p=1", "p='1' is invalid"), ("normsim:num_clusters=4", "only used with cap="),
                       ("normsim:cap=0", "cap=0 is invalid"), ("fm+normsim:pool=0.5", "pool=0.5 is invalid"),
                       ("lm+normsim:metric=cosine", "does not use 'metric'")):
        with pytest.raises(ValueError, match=words):
            methods.parse(bad)
    with pytest.raises(ValueError, match=r"p=3 is invalid; expected one of \['inf', '2'\]"):
        methods.parse("normsim", {"p": 3})


def test_staged_pool_is_between_class_votes_and_plain_normsim():
    source, target = clusters(seed=2, spread=1.0, target_rows=5)
    keep = 500
    plain = fastvote.prune(source, target, method="normsim", keep=keep, progress=False)
    wide = fastvote.prune(source, target, method="fm+normsim:pool=100", keep=keep, progress=False)
    assert torch.equal(plain.indices, wide.indices)  # every class is a candidate: plain NormSim
    narrow = fastvote.prune(source, target, method="fm+normsim:pool=1", keep=keep, progress=False)
    classes = narrow.manifest["selection"]["stage1_classes"]
    assert np.isin(source["labels"][narrow.indices].numpy(), classes).all()
    assert len(classes) == 3  # 3 x 200 rows is the first class count to reach 500


def test_cli_prune_takes_every_method_option(tmp_path):
    source, target = clusters()
    for role, outputs in (("source", source), ("target", target)):
        (tmp_path / role).mkdir()
        for name, t in outputs.items():
            np.save(tmp_path / role / f"{name}.npy", t.numpy())
    code = cli.main(["--device", "cpu", "--workdir", str(tmp_path / "w"), "prune", "--source", str(tmp_path / "source"),
                     "--target", str(tmp_path / "target"), "--method", "normsim", "--pnorm", "2", "--cap", "150",
                     "--keep", "450", "--out", str(tmp_path / "out")])
    assert code == 0
    kept = np.load(tmp_path / "out" / "indices.npy")
    assert np.bincount(source["labels"][kept].numpy(), minlength=K)[NEAR].tolist() == [150, 150, 150]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(["prune", "--source", str(tmp_path / "source"), "--target", str(tmp_path / "target"),
                         "--method", "lm", "--pnorm", "2", "--keep", "3", "--out", str(tmp_path / "o2")]) == 2
