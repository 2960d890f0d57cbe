"""fastvote.report: the tables and the CSV from rows (no experiment needed), and
the package's layering: the report sits below the plots, both below the
experiment, which only the CLI imports."""
import ast
import csv
from pathlib import Path

import fastvote
from fastvote import report


def row(method, ratio, seed, acc, class_wise=True, keep=10, surrogate=5.0):
    return dict(target="digits", method=method, ratio=ratio, keep=keep, seed=seed, pretraining="supervised",
                class_wise=class_wise, mode="linear", test_acc=acc, val_acc=acc, best_epoch=1, source_samples=100,
                surrogate_seconds=surrogate, prune_seconds=1.0, pretrain_seconds=10.0 * seed, kept_classes="a; b",
                kept_ids=[0, 1])


ROWS = [row("lm", 0.5, 0, 0.8), row("lm", 0.5, 1, 0.9), row("random", 0.5, 0, 0.6, surrogate=0.0),
        row("grand:runs=2", 0.5, 0, 0.7, class_wise=False, keep=5000), row("unpruned", 0.0, 0, 0.75, keep=30)]


def test_results_markdown():
    assert report.results_markdown(ROWS) == (
        "\n### Transfer accuracy to digits, supervised pretraining, linear probe (%, mean ± std over seeds)\n\n"
        "| method | ratio 0.50 (keep 10 classes, 100 samples) | unpruned |\n|---|---|---|\n"
        "| LM | **85.0 ± 5.0** ↑ |  |\n"
        "| Random | 60.0 ± 0.0 |  |\n"
        "| Grand (runs=2) | 70.0 ± 0.0 |  |\n"
        "| Unpruned |  | 75.0 ± 0.0 |\n"
        "\nBold: best method per ratio. ↑: above the unpruned source.\n")


def test_header_says_when_methods_kept_different_sample_counts():
    rows = ROWS + [dict(row("normsim", 0.5, 0, 0.8, class_wise=False), source_samples=90)]
    assert "| method | ratio 0.50 (keep 10 classes, 90-100 samples) | unpruned |" in report.results_markdown(rows)
    assert report.method_label("fm+normsim:p=2") == "FM+NormSim (p=2)"


def test_time_table_says_how_time_is_charged():
    times = {(t["method"], t["ratio"]): t for t in report.time_rows(ROWS)}
    assert times[("lm", 0.5)] == {"method": "lm", "ratio": 0.5, "surrogate": 5.0, "prune": 1.0, "pretrain": 5.0,
                                  "total": 11.0}
    text = report.time_markdown(ROWS)
    assert "| random | 0.50 | 0.0 | 1.0 | 0.0 | 1.0 |" in text
    assert text.endswith(report.TIME_NOTE + "\n") and "first ratio" in report.TIME_NOTE


def test_write_reports(tmp_path):
    bias = {"affected_classes": [1, 7], "num_classes": 30, "num_flipped": 12, "spec_text": "label_noise=0.4"}
    report.write_reports(ROWS, tmp_path, bias=bias)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "results.md"]  # no temporaries, no plots
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == report.CSV_FIELDS and [r["method"] for r in table] == [r["method"] for r in ROWS]
    markdown = (tmp_path / "results.md").read_text()
    assert markdown.startswith("# Results\n" + report.results_markdown(ROWS) + "\n" + report.time_markdown(ROWS))
    assert "| LM | 0.50 | 2 | 1 | 0.50 | 0.07 |" in markdown  # the biased-source table


def imports(path: Path):
    """The fastvote modules a file imports, at any depth of its code."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in names if n.startswith("fastvote")}


def test_layering():
    package = Path(fastvote.__file__).parent
    graph = {".".join(("fastvote", *p.relative_to(package).with_suffix("").parts)): imports(p)
             for p in package.rglob("*.py")}
    assert {m for m, deps in graph.items() if "fastvote.experiment" in deps} <= {"fastvote.cli"}
    assert graph["fastvote.report"] == {"fastvote.atomic", "fastvote.atomic.write_text"}
    assert not {d for d in graph["fastvote.plots"] if d.startswith(("fastvote.experiment", "fastvote.cli"))}
