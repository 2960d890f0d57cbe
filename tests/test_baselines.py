"""The target-agnostic baselines (SPEC.md, Baselines): each against a direct,
slow restatement of its definition on small models and data, their edge cases
(ratio 0, classes smaller than their share, ties), and each end to end through
fastvote.prune on real data through FFCV (a 60-a-class haystack -> digits)."""
import json
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastvote
from fastvote import methods
from fastvote.methods import ccs, el2n, forgetting, grand, moderate, ssp
from fastvote.methods.base import keep_top, run_seed, tie_keys
from fastvote.select import keep_count

pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def small_net(seed: int, classes: int = 3) -> nn.Module:
    """Conv + BatchNorm (with non-trivial running statistics) + head, on 3x4x4 images."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, classes))
    net.train()
    with torch.no_grad():
        net(torch.randn(32, 3, 4, 4) * 2 + 1)  # moves the BN running statistics off (0, 1)
    return net.eval()


class FakeView:
    """A source view over in-memory data: features, images, scripted training runs."""

    def __init__(self, labels, features=None, images=None, epochs=4, script=None):
        self.labels = np.asarray(labels, dtype=np.int64)
        self.num_rows = len(self.labels)
        self.num_classes = int(self.labels.max()) + 1
        self.class_names = [str(c) for c in range(self.num_classes)]
        self.features, self.images = features, images
        self.recipe = {"epochs": epochs}
        self.cache_dir, self.fingerprint, self.device = None, {}, torch.device("cpu")
        self.script = script
        self.runs = []

    def array(self, output):
        assert output == "features"
        return self.features

    def samples(self, batch_size=None):
        for start in range(0, self.num_rows, 5):  # uneven batches, rows in stream order
            rows = torch.arange(start, min(start + 5, self.num_rows))
            yield self.images[rows], torch.from_numpy(self.labels)[rows], rows

    def train_run(self, seed, epochs, on_batch=None):
        self.runs.append((seed, epochs))
        if self.script is not None:
            self.script(on_batch)
        return small_net(seed)


# ---------------------------------------------------------------- shared rules

def test_sample_keep_count_and_its_errors():
    assert keep_count(1800, unit="samples", ratio=0.5) == 900
    assert keep_count(1800, unit="samples", ratio=0.0) == 1800
    assert keep_count(10, unit="samples", ratio=0.99) == 1
    assert keep_count(10, unit="samples", keep=4) == 4
    with pytest.raises(ValueError, match=r"ratio=1.0 is invalid.*fraction of source samples removed"):
        keep_count(10, unit="samples", ratio=1.0)
    with pytest.raises(ValueError, match=r"keep=11 is invalid; expected an integer 1 <= keep <= 10"):
        keep_count(10, unit="samples", keep=11)
    with pytest.raises(ValueError, match="exactly one of ratio"):
        keep_count(10, ratio=0.5, keep=3)


def test_ties_are_broken_by_a_seeded_key_not_by_file_order():
    scores = np.zeros(1000)
    a, b = keep_top(scores, 100, seed=0), keep_top(scores, 100, seed=0)
    assert torch.equal(a, b) and len(a) == 100
    assert not torch.equal(a, torch.arange(100))              # not the first rows of the file
    assert not torch.equal(a, keep_top(scores, 100, seed=1))  # the seed decides
    assert np.array_equal(np.sort(tie_keys(50, 3)), np.arange(50))
    # distinct scores: ties play no part
    scores = np.arange(10.0)
    assert keep_top(scores, 3, seed=5).tolist() == [7, 8, 9]
    assert keep_top(scores, 3, seed=5, highest=False).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="NaN"):
        keep_top(np.array([0.0, np.nan]), 1, seed=0)


def test_method_options_ride_on_the_name():
    spec = methods.parse("ccs:score=forgetting,beta=0.25,strata=10")
    assert dict(spec.options) == {"score": "forgetting", "beta": 0.25, "strata": 10, "runs": None, "epoch": None}
    assert spec.given == ("score", "beta", "strata") and not spec.class_wise and spec.unit == "samples"
    assert dict(methods.parse("ssp:keep_hard=false").options) == {"keep_hard": False, "num_clusters": None}
    assert methods.parse("random").class_wise and not methods.parse("random-sample").class_wise
    assert methods.parse("lm:k=2").options["k"] == 2
    with pytest.raises(ValueError, match=r"method='ssp:keep_hard=maybe': option keep_hard='maybe' is not a bool"):
        methods.parse("ssp:keep_hard=maybe")
    with pytest.raises(ValueError, match=r"grand does not use 'beta'; it takes \['epoch', 'runs'\]"):
        methods.parse("grand:beta=0.1")
    with pytest.raises(ValueError, match="malformed"):
        methods.parse("el2n:runs")
    with pytest.raises(ValueError, match="method='nope' is unknown"):
        methods.parse("nope")


# ---------------------------------------------------------------- GraNd

def test_grand_vmap_equals_per_sample_autograd_norms():
    net = small_net(0)
    x = torch.randn(13, 3, 4, 4, generator=gen(1))
    y = torch.randint(0, 3, (13,), generator=gen(2))
    fast = grand.grad_norms(net, x, y)
    chunked = grand.grad_norms(net, x, y, chunk_size=4)
    slow = []
    for i in range(len(x)):  # one sample at a time, eval-mode BN, all parameters
        net.zero_grad()
        F.cross_entropy(net(x[i:i + 1]), y[i:i + 1]).backward()
        slow.append(torch.sqrt(sum(p.grad.pow(2).sum() for p in net.parameters())))
    torch.testing.assert_close(fast, torch.stack(slow), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked, fast)
    assert not net.training


def test_grand_and_el2n_average_over_independent_runs():
    labels = np.arange(12) % 3
    images = torch.randn(12, 3, 4, 4, generator=gen(3))
    view = FakeView(labels, images=images, epochs=20)
    y = torch.from_numpy(labels)
    values, info = grand.scores(view, seed=7, runs=3, progress=False)
    direct = torch.stack([grand.grad_norms(small_net(run_seed(7, r)), images, y) for r in range(3)]).double().mean(0)
    torch.testing.assert_close(values, direct)
    assert [e for _, e in view.runs] == [2, 2, 2] and info["epoch"] == 2  # 10% of 20 epochs
    assert len({s for s, _ in view.runs}) == 3                             # independent seeds

    values, info = el2n.scores(view, seed=7, runs=2, epoch=0, progress=False)
    direct = []
    for r in range(2):
        with torch.no_grad():
            logits = small_net(run_seed(7, r))(images).double()
        probs = logits.exp() / logits.exp().sum(1, keepdim=True)
        onehot = torch.zeros_like(probs)
        onehot[torch.arange(12), y] = 1
        direct.append(((probs - onehot) ** 2).sum(1).sqrt())
    torch.testing.assert_close(values, torch.stack(direct).mean(0), rtol=1e-5, atol=1e-6)
    assert info["epoch"] == 0

    selection = el2n.select(view, [], keep=4, seed=0, runs=2, epoch=0, progress=False)
    assert selection.indices.tolist() == sorted(np.argsort(-values.numpy())[:4].tolist())  # the highest
    with pytest.raises(ValueError, match=r"runs=0 is invalid; expected an integer >= 1"):
        grand.scores(view, runs=0, progress=False)


def test_el2n_formula():
    logits = torch.randn(50, 7, generator=gen(4))
    labels = torch.randint(0, 7, (50,), generator=gen(5))
    direct = [np.linalg.norm(np.exp(l) / np.exp(l).sum() - np.eye(7)[y]) for l, y in
              zip(logits.double().numpy(), labels.numpy())]
    np.testing.assert_allclose(el2n.el2n(logits, labels).numpy(), direct, rtol=1e-5)


# ---------------------------------------------------------------- forgetting

# correctness of 6 samples at each of 4 presentations (one an epoch), and their counts
SEQUENCES = [[0, 1, 0, 1], [1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 1, 0], [1, 0, 0, 0]]
EXPECTED = [1, 2, 4, 0, 1, 1]  # sample 2 is never learned: it counts as the epochs (4), the maximum


def scripted(on_batch):
    """Replays SEQUENCES, each epoch in another order and in two minibatches."""
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    for epoch in range(4):
        order = torch.randperm(6, generator=gen(epoch))
        for rows in order.split(4):
            correct = torch.tensor([SEQUENCES[r][epoch] for r in rows.tolist()], dtype=torch.bool)
            predicted = torch.where(correct, labels[rows], (labels[rows] + 1) % 3)
            on_batch(rows, F.one_hot(predicted, 3).float() * 5, labels[rows])


def test_forgetting_counts_a_hand_traced_sequence():
    view = FakeView([0, 1, 2, 0, 1, 2], epochs=4, script=scripted)
    values, info = forgetting.scores(view, seed=0, progress=False)
    assert values.tolist() == EXPECTED and info["never_learned_score"] == 4
    assert view.runs[0][1] == 4  # the whole recipe
    kept = forgetting.select(view, [], keep=3, seed=0, progress=False).indices.tolist()
    assert {1, 2} < set(kept) and len(set(kept) & {0, 4, 5}) == 1  # the third is a seeded pick among the ties
    assert kept == forgetting.select(view, [], keep=3, seed=0, progress=False).indices.tolist()


def test_forgetting_counter_directly():
    counter = forgetting.ForgettingCounter(3)
    for correct in ([1, 0, 0], [0, 0, 1], [1, 0, 0], [0, 0, 1]):
        counter.update(torch.arange(3), torch.tensor(correct, dtype=torch.bool))
    assert counter.scores(never_learned=9).tolist() == [2, 9, 1]


# ---------------------------------------------------------------- Moderate

def reference_budgets(counts, keep):
    """Largest remainder with exact fractions, ties to the lower class."""
    total = sum(counts)
    quotas = [Fraction(keep * c, total) for c in counts]
    budgets = [q.numerator // q.denominator for q in quotas]
    by_remainder = sorted(range(len(counts)), key=lambda c: (-(quotas[c] - budgets[c]), c))
    for c in by_remainder[:keep - sum(budgets)]:
        budgets[c] += 1
    return budgets


def test_moderate_band_matches_a_sort_based_reference():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), [40, 23, 7, 2, 1])
    rng.shuffle(labels)
    features = rng.normal(size=(len(labels), 6)).astype(np.float32)
    view = FakeView(labels, features=features)
    for keep in (1, 20, 37, 50, 72, 73):
        selection = moderate.select(view, [], keep=keep, seed=0, progress=False)
        expected = []
        for c, m in enumerate(reference_budgets([40, 23, 7, 2, 1], keep)):
            members = np.flatnonzero(labels == c)
            x = features[members].astype(np.float64)
            median = np.array([np.median(x[:, d]) for d in range(6)])
            dist = np.sqrt(((x - median) ** 2).sum(1))
            ranked = members[np.argsort(dist)]           # nearest first
            drop = len(members) - m
            expected += ranked[drop // 2: drop // 2 + m].tolist()  # floor(drop/2) nearest dropped
        assert selection.indices.tolist() == sorted(expected), keep
        assert len(selection.indices) == keep
    np.testing.assert_allclose(selection.scores.numpy()[labels == 2],
                               np.linalg.norm(features[labels == 2] - np.median(features[labels == 2], 0), axis=1),
                               rtol=1e-6)


def test_moderate_budgets_and_classes_smaller_than_their_share():
    assert moderate.class_budgets([5, 3, 2], 5).tolist() == [3, 1, 1]  # remainders tie: lower class
    assert moderate.class_budgets([500, 1, 1], 3).tolist() == [3, 0, 0]
    for counts, keep in (([40, 23, 7, 2, 1], 37), ([1, 1, 1], 2), ([7, 0, 3], 9)):
        assert moderate.class_budgets(counts, keep).tolist() == reference_budgets(counts, keep)
    # a class of one sample and one of two: a share of 0 drops them, a full share keeps them
    labels = np.array([0] * 10 + [1] + [2] * 2)
    features = np.arange(13, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    view = FakeView(labels, features=features)
    assert moderate.select(view, [], keep=13, progress=False).indices.tolist() == list(range(13))  # ratio 0
    # keep 4: shares 40/13, 4/13, 8/13 -> [3, 0, 1]; class 1 (one sample) loses it
    kept = set(moderate.select(view, [], keep=4, progress=False).indices.tolist())
    assert len(kept) == 4 and 10 not in kept and len(kept & {11, 12}) == 1
    # class 0 (rows 0..9, median 4.5), distances sorted .5 .5 1.5 1.5 2.5 2.5 ...: 7 to drop, so the
    # 3 nearest go (4, 5 and one of 3/6), the middle 3 stay (the other of 3/6, then 2 and 7), 4 far ones go
    assert kept & set(range(10)) >= {2, 7} and len(kept & {3, 6}) == 1


# ---------------------------------------------------------------- CCS

def test_ccs_allocation_hand_worked():
    # strata sizes [3, 4, 2], budget 6: the 2 take floor(6/3)=2, the 3 take floor(4/2)=2, the 4 take 2
    assert ccs.allocate([3, 4, 2], 6).tolist() == [2, 2, 2]
    assert ccs.allocate([3, 4, 2], 8).tolist() == [3, 3, 2]
    # what the small stratum cannot use passes on: [1, 10, 10] with 12 -> 1, then floor(11/2)=5, then 6
    assert ccs.allocate([1, 10, 10], 12).tolist() == [1, 5, 6]
    assert ccs.allocate([0, 5, 0, 5], 10).tolist() == [0, 5, 0, 5]  # empty strata take nothing


def test_ccs_sample_hand_worked():
    scores = np.array([0.0, 0.1, 0.2, 0.5, 0.55, 0.6, 0.65, 0.9, 1.0, 5.0])
    # beta=0.1 drops 5.0; [0, 1] in 3 strata: {0, .1, .2} {.5, .55, .6, .65} {.9, 1.0}
    assert ccs.strata_of(scores[:9], 3).tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2]
    rows, info = ccs.ccs_sample(scores, 6, beta=0.1, strata=3, seed=0)
    assert info["strata_sizes"] == [3, 4, 2] and info["strata_budgets"] == [2, 2, 2] and info["hard_dropped"] == 1
    assert 9 not in rows and {7, 8} <= set(rows)
    assert len(set(rows) & {0, 1, 2}) == 2 and len(set(rows) & {3, 4, 5, 6}) == 2
    assert np.array_equal(rows, ccs.ccs_sample(scores, 6, beta=0.1, strata=3, seed=0)[0])  # seeded
    # ratio 0 keeps everything: beta is capped so the budget can be met
    rows, info = ccs.ccs_sample(scores, 10, beta=0.3, strata=50, seed=0)
    assert rows.tolist() == list(range(10)) and info["beta_used"] == 0.0
    # equal scores: one stratum
    rows, info = ccs.ccs_sample(np.ones(20), 5, beta=0.0, strata=50, seed=0)
    assert len(rows) == 5 and info["strata_sizes"][0] == 20
    with pytest.raises(ValueError, match=r"beta=1.5 is out of range; expected 0 <= beta < 1"):
        ccs.ccs_sample(scores, 5, beta=1.5)


def test_ccs_over_forgetting_scores():
    view = FakeView([0, 1, 2, 0, 1, 2], epochs=4, script=scripted)
    selection = ccs.select(view, [], keep=3, score="forgetting", beta=1 / 6, strata=4, seed=0, progress=False)
    assert 2 not in selection.indices.tolist() and len(selection.indices) == 3  # the hardest (never learned) dropped
    assert selection.info["score"] == "forgetting" and selection.info["hard_dropped"] == 1
    with pytest.raises(ValueError, match="score='aum' is unknown"):
        ccs.select(view, [], keep=3, score="aum", progress=False)
    with pytest.raises(ValueError, match="epoch=1 does not apply to score='forgetting'"):
        ccs.select(view, [], keep=3, score="forgetting", epoch=1, progress=False)


# ---------------------------------------------------------------- SSP

def test_ssp_distances_match_a_direct_computation():
    x = torch.randn(40, 5, generator=gen(6))
    c = torch.randn(4, 5, generator=gen(7))
    direct = [1 - max(float(xi @ cj / (xi.norm() * cj.norm())) for cj in c) for xi in x]
    np.testing.assert_allclose(ssp.prototype_distances(x.numpy(), c).numpy(), direct, rtol=1e-5, atol=1e-6)


def test_ssp_keeps_the_hardest_or_the_easiest():
    rng = np.random.default_rng(1)
    centers = np.eye(3, 8) * 10
    labels = np.repeat(np.arange(3), 30)
    features = (centers[labels] + rng.normal(size=(90, 8)) * np.linspace(0.1, 4, 90)[:, None]).astype(np.float32)
    view = FakeView(labels, features=features)
    hard = ssp.select(view, [], keep=20, num_clusters=3, seed=0, progress=False)
    easy = ssp.select(view, [], keep=20, num_clusters=3, keep_hard=False, seed=0, progress=False)
    s = hard.scores.numpy()
    assert hard.indices.tolist() == sorted(np.argsort(-s)[:20].tolist())
    assert easy.indices.tolist() == sorted(np.argsort(s)[:20].tolist())
    assert s[hard.indices].min() >= s[easy.indices].max()
    assert len(ssp.select(view, [], keep=90, num_clusters=3, progress=False).indices) == 90  # ratio 0
    with pytest.raises(ValueError, match="keep_hard='yes' is invalid"):
        ssp.select(view, [], keep=20, keep_hard="yes", progress=False)


def test_random_sample_is_uniform_and_seeded():
    view = FakeView(np.zeros(100, dtype=np.int64))
    a = methods.parse("random-sample").select(view, [], keep=30, seed=3)
    assert torch.equal(a.indices, methods.parse("random-sample").select(view, [], keep=30, seed=3).indices)
    assert len(set(a.indices.tolist())) == 30 and a.kept_classes is None


# ---------------------------------------------------------------- end to end, real data through FFCV

@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A 60-a-class haystack beton (1800 images), the digits target, an untrained
    tiny surrogate (its architecture and preprocessing are what the training
    baselines use) and a 2-epoch recipe."""
    pytest.importorskip("ffcv")
    from fastvote import data as fvdata, models, train

    if fvdata.missing("haystack") or fvdata.missing("digits"):
        pytest.skip(f"offline datasets missing: {fvdata.missing('haystack') or fvdata.missing('digits')}")
    root = tmp_path_factory.mktemp("baselines")
    source = fvdata.write_offline("haystack", "train", root / "haystack.beton", per_class=60, progress=False)
    target = fvdata.write_offline("digits", "train", root / "digits.beton", progress=False)
    mean, std = fvdata.channel_stats(source)
    surrogate = models.save_checkpoint(root / "surrogate.pt", models.build_model("tiny", 30, image_size=16, seed=0),
                                       resolution=16, mean=list(mean), std=list(std))
    config = train.TrainConfig(epochs=2, batch_size=256, lr=0.2)
    return {"root": root, "source": source, "target": target, "surrogate": surrogate, "config": config}


def prune(real, method, ratio, **kw):
    args = dict(surrogate=real["surrogate"], train_config=real["config"], workdir=real["root"] / "work",
                progress=False)
    args.update(kw)
    return fastvote.prune(kw.pop("source", real["source"]), real["target"], method=method, ratio=ratio,
                          **{k: v for k, v in args.items() if k != "source"})


E2E = ["random-sample", "moderate", "ssp", "ssp:keep_hard=false", "el2n:runs=2", "grand:runs=2", "forgetting",
       "ccs:runs=2"]


def test_every_baseline_end_to_end(real, tmp_path):
    labels = fvdata_labels(real["source"])
    for method in E2E:
        result = prune(real, method, 0.5)
        assert len(result.indices) == 900 and len(torch.unique(result.indices)) == 900, method
        assert torch.equal(result.indices, torch.sort(result.indices).values)
        assert result.unit == "samples" and result.manifest["unit"] == "samples"
        assert result.ratio == 0.5 and result.votes is None
        per_class = result.manifest["selection"]["kept_per_class"]
        assert sum(per_class) == 900 and result.kept_classes.tolist() == [c for c, n in enumerate(per_class) if n]
        assert per_class == np.bincount(labels[result.indices.numpy()], minlength=30).tolist()
        if method == "moderate":
            assert per_class == [30] * 30  # the same fraction of every class
        saved = result.save(tmp_path / method.replace(":", "_"))
        assert json.loads((saved / "manifest.json").read_text())["num_kept_samples"] == 900
        # the scores are cached: ratio 0 (keep all) and another ratio read them back
        everything = prune(real, method, 0.0)
        assert len(everything.indices) == 1800
        assert len(prune(real, method, 0.8).indices) == 360
    scores_dir = real["root"] / "work" / "scores"
    cached = {p.name.split("-")[0] for p in scores_dir.glob("*.npy")}
    assert cached == {"moderate", "ssp", "el2n", "grand", "forgetting"}
    # ccs (el2n, 2 runs) reused the el2n scores; grand reused el2n's trained runs
    assert len(list((real["root"] / "work" / "runs").glob("*.pt"))) == 3  # 2 el2n/grand runs + 1 forgetting run
    # keep_hard flips which end SSP keeps
    hard, easy = prune(real, "ssp", 0.5), prune(real, "ssp:keep_hard=false", 0.5)
    assert not set(hard.indices.tolist()) & set(easy.indices.tolist())


def fvdata_labels(beton):
    from fastvote import data as fvdata

    return fvdata.read_columns(beton)["labels"]


def test_training_scores_on_a_partial_reordered_beton(real):
    """A beton holding a part of its source in another order: the rows the
    scores land on are the right samples (GraNd and EL2N at initialisation,
    recomputed directly, one sample at a time)."""
    from fastvote import data as fvdata, models, scores

    subset = np.arange(1799, 0, -7)  # 257 samples, reversed
    part = fvdata.write_offline("haystack", "train", real["root"] / "part.beton", per_class=60, indices=subset,
                                progress=False)
    ids = fvdata.read_columns(part)["identifiers"]
    assert sorted(ids.tolist()) == sorted(subset.tolist())
    for method in ("el2n:runs=1,epoch=0", "grand:runs=1,epoch=0"):
        result = prune(real, method, 0.5, source=part)
        assert set(result.indices.tolist()) <= set(subset.tolist()) and len(result.indices) == 128
        values = np.load(result.manifest["selection"]["scores_file"])
        model = scores.fresh_model(models.load_model(real["surrogate"]), 30, run_seed(0, 0)).eval()
        prep = result.manifest["preprocessing"]
        loader = fvdata.eval_loader(part, 64, resolution=16, mean=prep["mean"], std=prep["std"], with_identifier=True)
        threads = torch.get_num_threads()
        images, labels, identifiers = next(iter(loader))
        torch.set_num_threads(threads)  # ffcv sets its worker count on every pass
        rows = [int(np.flatnonzero(ids == i)[0]) for i in identifiers[:8].tolist()]
        for j, row in enumerate(rows):
            x, y = images[j:j + 1].clone(), labels[j:j + 1]
            if method.startswith("el2n"):
                with torch.no_grad():
                    direct = float(el2n.el2n(model(x), y))
            else:
                model.zero_grad()
                F.cross_entropy(model(x), y).backward()
                direct = float(torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters())))
            assert values[row] == pytest.approx(direct, rel=1e-4), (method, row)


def test_errors_name_the_argument(real):
    with pytest.raises(ValueError, match=r"ratio=1.0 is invalid.*fraction of source samples removed"):
        prune(real, "moderate", 1.0)
    with pytest.raises(ValueError, match=r"keep=5000 is invalid; expected an integer 1 <= keep <= 1800"):
        fastvote.prune(real["source"], real["target"], method="el2n", keep=5000, surrogate=real["surrogate"],
                       workdir=real["root"] / "work", progress=False)
    with pytest.raises(ValueError, match="trains models on the source images, but the source was given as precomputed"):
        fastvote.prune({"features": torch.zeros(4, 2), "labels": torch.arange(4)}, {"features": torch.zeros(1, 2)},
                       method="grand", keep=2, progress=False)
