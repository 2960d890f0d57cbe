"""fastvote.data.bias: biased copies of a real source beton (the haystack): the exact
number of flipped labels, per-class keep counts, untouched images and classes,
determinism, atomic writes, spec validation and the text form."""
import json
import os

import numpy as np
import pytest

from fastvote import data
from fastvote.data import BiasSpec, plan_bias, write_biased
from fastvote.data.bias import _BetonRows

pytestmark = pytest.mark.skipif(
    bool(data.missing("haystack")), reason=f"offline data missing; fix: {data.missing('haystack')}")


@pytest.fixture(scope="module")
def haystack():
    return data.get("haystack", "train", size=16, per_class=20, cache=False)  # 30 classes x 20


@pytest.fixture(scope="module")
def source(haystack, tmp_path_factory):
    pytest.importorskip("ffcv", reason="FFCV is not installed: pip install ffcv==1.0.2")
    return data.write_beton(haystack, tmp_path_factory.mktemp("source") / "h.beton",
                            progress=False, num_workers=1)


def check_plan(labels, spec, plan, num_classes=30):
    """The defining properties of a plan, from the labels alone."""
    affected = set(plan.affected.tolist())
    if spec.classes is not None:
        assert affected == set(spec.classes)
    else:
        assert len(affected) == num_classes // 2
    assert (np.diff(plan.positions) > 0).all()
    original = labels[plan.positions]
    for c in range(num_classes):
        n = int((labels == c).sum())
        kept = int((original == c).sum())
        assert kept == (max(1, round(spec.imbalance * n)) if c in affected else n), c
        flipped_c = plan.flipped[original[plan.flipped] == c]
        assert len(flipped_c) == (round(spec.label_noise * kept) if c in affected else 0), c
    changed = np.flatnonzero(plan.labels != original)
    np.testing.assert_array_equal(changed, plan.flipped)  # flipped == changed: never the original
    np.testing.assert_array_equal(plan.original_labels, original[plan.flipped])
    assert ((plan.labels >= 0) & (plan.labels < num_classes)).all()


@pytest.mark.parametrize("spec", [
    BiasSpec(label_noise=0.4, imbalance=0.2, classes=(0, 3, 7, 29)),
    BiasSpec(label_noise=0.35, seed=3),           # a random half, noise only
    BiasSpec(imbalance=0.01, classes=(12,)),      # would round to 0: one sample stays
    BiasSpec(label_noise=1.0, imbalance=0.5),
    BiasSpec(),                                   # the identity
])
def test_plan_properties(haystack, spec):
    plan = plan_bias(haystack.targets, spec, 30)
    check_plan(haystack.targets, spec, plan)
    again = plan_bias(haystack.targets, spec, 30)
    for field in ("positions", "labels", "affected", "flipped", "original_labels"):
        np.testing.assert_array_equal(getattr(plan, field), getattr(again, field))


def test_plan_seeds_and_streams(haystack):
    labels = haystack.targets
    a = plan_bias(labels, BiasSpec(label_noise=0.5, imbalance=0.5, seed=0))
    b = plan_bias(labels, BiasSpec(label_noise=0.5, imbalance=0.5, seed=1))
    assert not np.array_equal(a.affected, b.affected)
    # Each choice has its own stream: changing the noise keeps the classes and the drops.
    c = plan_bias(labels, BiasSpec(label_noise=0.2, imbalance=0.5, seed=0))
    np.testing.assert_array_equal(a.affected, c.affected)
    np.testing.assert_array_equal(a.positions, c.positions)
    # New labels are spread over the other classes, not just the affected ones.
    big = plan_bias(np.repeat(np.arange(30), 200), BiasSpec(label_noise=1.0, classes=(5,)))
    assert set(big.labels[big.flipped].tolist()) == set(range(30)) - {5}


def test_write_biased(source, haystack, tmp_path):
    spec = BiasSpec(label_noise=0.4, imbalance=0.3, classes=(1, 10, 11, 25))
    out = tmp_path / "biased.beton"
    record = write_biased(source, spec.text(), out, progress=False, num_workers=1)
    assert sorted(os.listdir(tmp_path)) == ["biased.beton", "biased.beton.bias.json",
                                            "biased.beton.classes.json"]
    assert data.read_bias(out) == record == json.loads(json.dumps(record))
    assert data.read_classes(out) == haystack.classes

    images, labels, ids = map(np.stack, zip(*data.iter_samples(out)))
    kept = np.delete(np.arange(len(haystack)), record["dropped_positions"])
    plan = plan_bias(haystack.targets, spec, 30)
    check_plan(haystack.targets, spec, plan)
    np.testing.assert_array_equal(kept, plan.positions)
    np.testing.assert_array_equal(ids, np.arange(len(kept)))  # positions in the copy
    np.testing.assert_array_equal(labels, plan.labels)
    source_images = np.stack([s[0] for s in data.iter_samples(source)])
    np.testing.assert_array_equal(images, source_images[kept])  # pixels untouched

    flipped = record["flipped"]
    assert record["num_flipped"] == len(flipped["positions"]) == 4 * round(0.4 * 6)  # 6 of 20 kept
    np.testing.assert_array_equal(flipped["positions"], plan.flipped)
    np.testing.assert_array_equal(labels[flipped["positions"]], flipped["new_labels"])
    np.testing.assert_array_equal(haystack.targets[kept][flipped["positions"]], flipped["original_labels"])
    assert set(flipped["original_labels"]) <= set(spec.classes)
    assert record["affected_classes"] == [1, 10, 11, 25]
    assert record["counts"]["source"] == [20] * 30
    assert record["counts"]["kept"] == [6 if c in spec.classes else 20 for c in range(30)]
    assert record["counts"]["biased"] == np.bincount(labels, minlength=30).tolist()
    assert record["num_samples"] == {"source": 600, "biased": 600 - 4 * 14}

    # Deterministic: the same spec writes the same samples; another seed does not.
    again = write_biased(source, spec, tmp_path / "again.beton", progress=False, num_workers=1)
    assert {k: v for k, v in again.items() if k != "output"} == {
        k: v for k, v in record.items() if k != "output"}
    images_again, labels_again, _ = map(np.stack, zip(*data.iter_samples(tmp_path / "again.beton")))
    np.testing.assert_array_equal(images_again, images)
    np.testing.assert_array_equal(labels_again, labels)
    other = plan_bias(haystack.targets, BiasSpec(label_noise=0.4, imbalance=0.3,
                                                 classes=spec.classes, seed=1), 30)
    assert not np.array_equal(other.positions, plan.positions)


def test_jpeg_source_is_copied_pixel_exact(haystack, tmp_path):
    pytest.importorskip("ffcv")
    small = haystack.subset(np.arange(0, 600, 5))
    jpeg = data.write_beton(small, tmp_path / "j.beton", jpeg=True, progress=False, num_workers=1)
    write_biased(jpeg, "imbalance=0.5,classes=0-29", tmp_path / "b.beton", progress=False,
                 num_workers=1)
    plan = plan_bias(small.targets, BiasSpec(imbalance=0.5, classes=tuple(range(30))), 30)
    decoded = np.stack([s[0] for s in data.iter_samples(jpeg)])
    copied = np.stack([s[0] for s in data.iter_samples(tmp_path / "b.beton")])
    np.testing.assert_array_equal(copied, decoded[plan.positions])


def test_no_partial_files_on_error(source, tmp_path, monkeypatch):
    out = tmp_path / "b.beton"
    write_biased(source, "label_noise=0.2", out, progress=False, num_workers=1)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    get = _BetonRows.__getitem__

    def flaky(self, index):
        if index == 50:
            raise OSError("read error at 50")
        return get(self, index)

    monkeypatch.setattr(_BetonRows, "__getitem__", flaky)
    with pytest.raises(RuntimeError, match="read error at 50"):
        write_biased(source, "label_noise=0.5,seed=4", out, progress=False, num_workers=1)
    with pytest.raises(RuntimeError, match="read error at 50"):
        write_biased(source, "label_noise=0.5", tmp_path / "new.beton", progress=False, num_workers=1)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # old copy intact

    with pytest.raises(ValueError, match=r"classes=\(3, 30\): expected class ids 0 <= c < 30"):
        write_biased(source, BiasSpec(classes=(3, 30)), tmp_path / "x.beton", progress=False)
    with pytest.raises(ValueError, match="is the source itself"):
        write_biased(source, BiasSpec(), source, progress=False)
    with pytest.raises(ValueError, match=r"spec: expected a BiasSpec"):
        write_biased(source, {"label_noise": 0.1}, tmp_path / "x.beton", progress=False)
    assert {p.name for p in tmp_path.iterdir()} == set(before)


@pytest.mark.parametrize("kwargs, message", [
    ({"label_noise": 1.5}, r"label_noise=1.5: expected 0 <= label_noise <= 1"),
    ({"label_noise": -0.1}, r"label_noise=-0.1"),
    ({"label_noise": float("nan")}, r"label_noise=nan"),
    ({"label_noise": "0.3"}, r"label_noise='0.3': expected a number"),
    ({"imbalance": 0}, r"imbalance=0.0: expected 0 < imbalance <= 1"),
    ({"imbalance": 1.2}, r"imbalance=1.2"),
    ({"classes": ()}, r"classes=\(\): expected None or a non-empty sequence"),
    ({"classes": (1, -2)}, r"classes=\(1, -2\)"),
    ({"classes": (1, 1)}, r"expected distinct class ids"),
    ({"classes": "0;1"}, r"classes='0;1'"),
    ({"seed": -1}, r"seed=-1: expected an int >= 0"),
    ({"seed": 1.5}, r"seed=1.5"),
])
def test_bad_specs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BiasSpec(**kwargs)


def test_plan_errors():
    with pytest.raises(ValueError, match=r"classes=\(4,\): expected class ids 0 <= c < 3"):
        plan_bias([0, 1, 2], BiasSpec(classes=(4,)))
    with pytest.raises(ValueError, match=r"labels: expected class ids 0 <= y < num_classes=2"):
        plan_bias([0, 1, 2], BiasSpec(), num_classes=2)
    with pytest.raises(ValueError, match="no other class"):
        plan_bias([0, 0], BiasSpec(label_noise=0.5, classes=(0,)))
    with pytest.raises(ValueError, match="pass classes= explicitly"):
        plan_bias([0, 0], BiasSpec())
    with pytest.raises(ValueError, match="labels: expected a non-empty 1-D"):
        plan_bias([], BiasSpec())


def test_parse():
    spec = BiasSpec.parse(" label_noise=0.4, imbalance=0.2 ,classes=0;3;7-9,seed=1")
    assert spec == BiasSpec(label_noise=0.4, imbalance=0.2, classes=(0, 3, 7, 8, 9), seed=1)
    for s in (spec, BiasSpec(), BiasSpec(label_noise=0.1 + 0.2, classes=[5]),
              BiasSpec(imbalance=1 / 3, seed=7)):
        assert BiasSpec.parse(s.text()) == s and str(s) == s.text()
    assert BiasSpec.parse("") == BiasSpec()
    assert BiasSpec.parse("imbalance=1").imbalance == 1.0
    for text, message in [
        ("noise=0.3", r"item 'noise=0.3': expected key=value with key one of"),
        ("label_noise", r"expected key=value"),
        ("seed=1,seed=2", "seed is given twice"),
        ("label_noise=lots", r"label_noise='lots'"),
        ("classes=1;x", r"classes='1;x': expected class ids or inclusive ranges"),
        ("classes=5-2", r"range '5-2': expected a-b with a <= b"),
        ("label_noise=2", r"label_noise=2.0: expected 0 <= label_noise <= 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            BiasSpec.parse(text)
