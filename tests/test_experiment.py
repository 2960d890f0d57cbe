"""A tiny experiment end to end through FFCV: every output is written, a rerun
reuses finished cells, and a TOML file overrides the defaults."""
import csv
import json
import time

import pytest

pytest.importorskip("ffcv")

import torch  # noqa: E402
from fastvote.data import missing  # noqa: E402
from fastvote.experiment import ALL_METHODS, Experiment, ExperimentConfig  # noqa: E402
from fastvote.report import TIME_NOTE  # noqa: E402

needs_data = pytest.mark.skipif(bool(missing("haystack") or missing("digits")),
                                reason=f"offline datasets missing: {missing('haystack') or missing('digits')}")

TINY = dict(methods=("lm", "fm", "random", "moderate"), ratios=(0.8,), seeds=(0,), image_size=8, surrogate_epochs=1,
            epochs=1, lp_epochs=3, modes=("linear",), batch_size=512, device="cpu")


@needs_data
def test_tiny_experiment_writes_everything_and_resumes(tmp_path):
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the run uses cpu_threads=1, then gives the caller's count back
    try:
        rows = Experiment(ExperimentConfig(**TINY), out, progress=False).run()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert json.loads((out / "manifest.json").read_text())["complete"] is True
    assert {(r["method"], r["seed"]) for r in rows} == {("lm", 0), ("fm", 0), ("random", 0), ("moderate", 0),
                                                         ("unpruned", 0)}
    for name in ("results.csv", "results.md", "accuracy_vs_ratio.png", "time_vs_ratio.png", "surrogate.pt",
                 "config.json"):
        assert (out / name).is_file(), name
    for method in ("lm", "fm"):
        assert (out / "prune" / f"{method}-r0.800" / "votes.png").is_file()
    assert (out / "prune" / "random-r0.800-s0" / "indices.npy").is_file()
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 5
    for r in table:
        assert 0.0 <= float(r["test_acc"]) <= 1.0
        if r["method"] in ("lm", "fm", "random"):  # class-wise: 80% of 30 classes removed
            assert int(r["keep"]) == 6 and r["class_wise"] == "True"
    by_method = {r["method"]: r for r in table}
    assert int(by_method["unpruned"]["source_samples"]) == 15000
    assert int(by_method["moderate"]["source_samples"]) == 3000  # sample-wise: 80% of samples removed
    markdown = (out / "results.md").read_text()
    assert "| LM |" in markdown and "| Unpruned |" in markdown and "keep 6 classes" in markdown
    # Only methods that need the surrogate pay for its training (all of it).
    trained = json.loads((out / "surrogate.pt.json").read_text())["seconds"]
    assert {r["method"]: r["surrogate_seconds"] for r in rows} == {"lm": trained, "fm": trained, "moderate": trained,
                                                                   "random": 0.0, "unpruned": 0.0}
    assert TIME_NOTE in markdown

    # A rerun finds every cell finished and recomputes nothing.
    cells = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    started = time.perf_counter()
    again = Experiment(ExperimentConfig(**TINY), out, progress=False).run()
    assert time.perf_counter() - started < 30
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()} == cells
    assert json.dumps(again, sort_keys=True) == json.dumps(rows, sort_keys=True)


def test_surrogate_is_charged_to_the_methods_that_need_it():
    config = ExperimentConfig()
    assert [m for m in ALL_METHODS if not config.spec(m).uses_surrogate] == ["random", "random-sample"]
    assert config.spec("grand:runs=2").uses_surrogate and config.spec("lm:reverse=true,k=5").uses_surrogate
    assert not config.spec("random:surrogate_arch=resnet18").uses_surrogate


def test_config_from_toml(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('methods = ["lm"]\nratios = [0.5, 0.9]\nepochs = 2\n')
    config = ExperimentConfig.from_toml(path)
    assert config.methods == ("lm",) and config.ratios == (0.5, 0.9) and config.epochs == 2
    assert config.lp_epochs == ExperimentConfig().lp_epochs  # the rest keeps its default
    path.write_text("epoch = 2\n")
    with pytest.raises(ValueError, match="unknown setting"):
        ExperimentConfig.from_toml(path)
    with pytest.raises(ValueError, match="method='nope'"):
        ExperimentConfig(methods=("nope",)).validate(30)
    with pytest.raises(ValueError, match="ratio=1.0"):
        ExperimentConfig(ratios=(1.0,)).validate(30)
