"""The experiment's report: the rows of finished cells as the paper's tables
(results.md), a CSV (results.csv) and the numbers the plots draw.

A row is one (cell, target, transfer mode): the dict Experiment._run_cell
writes. This module reads rows only, so the plots (fastvote.plots) and the
experiment both build on it and neither imports the other's layer back.
"""
from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from fastvote.atomic import write_text

UNPRUNED = "unpruned"  # the method name of the cells pretrained on the whole source
CSV_FIELDS = ["target", "method", "ratio", "keep", "class_wise", "seed", "pretraining", "mode", "test_acc", "val_acc",
              "best_epoch", "source_samples", "surrogate_seconds", "prune_seconds", "pretrain_seconds", "kept_classes"]
# How the experiment charges the time columns (Experiment._run_cell); results.md
# says it under the time table.
TIME_NOTE = (
    "Surrogate: its training seconds, charged in full to every method that needs a surrogate (it reads "
    "surrogate outputs or trains runs of the surrogate's architecture): the surrogate is trained once and "
    "reused, and each row shows what its method would pay on its own. Random, random-sample and unpruned "
    "use none and show 0. Prune: the seconds the prune this cell used took. LM and FM prune once for all "
    "seeds, and every seed shows that prune's time. Surrogate outputs, baseline scores and training runs "
    "are cached in the run's work folder: the first cell that needs them pays for computing them, later "
    "cells (other ratios, methods sharing a score or the same features) only for reading them, so a "
    "sample-wise baseline's scoring shows at its first ratio only.")


def summarize(rows: Sequence[dict]) -> Dict[Tuple[Tuple[str, str], str, float], List[float]]:
    """((target, mode), method, ratio) -> test accuracies over seeds."""
    table: Dict[Tuple[Tuple[str, str], str, float], List[float]] = {}
    for r in rows:
        panel = (r.get("target", ""), r["mode"])
        table.setdefault((panel, r["method"], float(r["ratio"])), []).append(float(r["test_acc"]))
    return table


# The spellings of fastvote.methods.spec.display_name (this module reads rows only and imports no method).
DISPLAY = {"lm": "LM", "fm": "FM", "normsim": "NormSim"}


def method_label(method: str) -> str:
    """"lm:reverse=true" -> "LM (reverse=true)", "fm+normsim" -> "FM+NormSim": the name a table or legend shows."""
    name, _, options = method.partition(":")
    name = "+".join(DISPLAY.get(part, part.capitalize()) for part in name.split("+"))
    return name + (f" ({options})" if options else "")


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and population std (0 for one value) of a cell's seeds."""
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def results_markdown(rows: Sequence[dict]) -> str:
    """The paper's table shape: methods as rows, ratios as columns, the
    unpruned column; mean +- std over seeds in %; best per column in bold;
    results above unpruned marked with an up arrow."""
    table = summarize(rows)
    out = io.StringIO()
    for mode in sorted({m for m, _, _ in table}):
        target, kind = mode
        ratios = sorted({r for m, meth, r in table if m == mode and meth != UNPRUNED})
        methods_ = [meth for meth in dict.fromkeys(r["method"] for r in rows) if meth != UNPRUNED]
        unpruned = table.get((mode, UNPRUNED, 0.0))
        base = mean_std(unpruned)[0] if unpruned else None
        # The header's "keep" counts classes; sample-wise methods remove the same
        # fraction of samples instead. The kept samples of every method at a
        # ratio follow: one number when all compare at the same sample budget.
        keeps = {float(r["ratio"]): r["keep"] for r in rows if r.get("class_wise", True)}
        samples: Dict[float, set] = {}
        for r in rows:
            if r["method"] != UNPRUNED and "source_samples" in r:
                samples.setdefault(float(r["ratio"]), set()).add(int(r["source_samples"]))
        pretraining = next((r["pretraining"] for r in rows if "pretraining" in r), "supervised")
        out.write(f"\n### Transfer accuracy{' to ' + target if target else ''}, {pretraining} pretraining, "
                  f"{kind} {'probe' if kind == 'linear' else 'finetune'} (%, mean ± std over seeds)\n\n")
        head = ["method"] + [f"ratio {r:.2f}" + _kept(keeps.get(r), samples.get(r)) for r in ratios] \
            + (["unpruned"] if unpruned else [])
        out.write("| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n")
        best = {r: max((mean_std(table[(mode, meth, r)])[0] for meth in methods_ if (mode, meth, r) in table),
                       default=None) for r in ratios}
        for meth in methods_:
            cells = [method_label(meth)]
            for r in ratios:
                values = table.get((mode, meth, r))
                if not values:
                    cells.append("-")
                    continue
                mean, std = mean_std(values)
                text = f"{100 * mean:.1f} ± {100 * std:.1f}"
                if math.isclose(mean, best[r]):
                    text = f"**{text}**"
                if base is not None and mean > base:
                    text += " ↑"
                cells.append(text)
            if unpruned:
                cells.append("")
            out.write("| " + " | ".join(cells) + " |\n")
        if unpruned:
            mean, std = mean_std(unpruned)
            out.write("| Unpruned | " + " | ".join([""] * len(ratios)) + f" | {100 * mean:.1f} ± {100 * std:.1f} |\n")
        out.write("\nBold: best method per ratio. ↑: above the unpruned source.\n")
    return out.getvalue()


def _kept(classes: Optional[int], samples: Optional[set]) -> str:
    """" (keep 10 classes, 5000 samples)": what a ratio's column kept."""
    parts = [f"keep {classes} classes"] if classes is not None else []
    if samples:
        low, high = min(samples), max(samples)
        parts.append(f"{low} samples" if low == high else f"{low}-{high} samples")
    return f" ({', '.join(parts)})" if parts else ""


def bias_markdown(rows: Sequence[dict], bias: dict) -> str:
    """What each class-wise method kept of the biased part of the source."""
    affected = set(bias["affected_classes"])
    lines = [f"\n### Biased source ({bias['spec_text']}): what voting keeps\n",
             f"{len(affected)} of {bias['num_classes']} source classes were biased; {bias['num_flipped']} labels "
             "flipped. Per method and ratio: kept classes, how many of them are biased, and the share of biased "
             "classes among the kept vs in the whole source.\n",
             "| method | ratio | kept classes | biased among kept | share kept | share in source |",
             "|---|---|---|---|---|---|"]
    seen = set()
    for r in rows:
        key = (r["method"], float(r["ratio"]))
        if r["method"] == UNPRUNED or not r.get("class_wise") or r.get("kept_ids") is None or key in seen:
            continue
        seen.add(key)
        kept = set(r["kept_ids"])
        hit = len(kept & affected)
        lines.append(f"| {method_label(r['method'])} | {r['ratio']:.2f} | {len(kept)} | {hit} | "
                     f"{hit / max(len(kept), 1):.2f} | {len(affected) / bias['num_classes']:.2f} |")
    return "\n".join(lines) + "\n"


def time_rows(rows: Sequence[dict]) -> List[dict]:
    """Time to a pretrained model per (method, ratio), mean over seeds and modes."""
    groups: Dict[Tuple[str, float], List[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], float(r["ratio"])), []).append(r)
    out = []
    for (method, ratio), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        parts = {p: statistics.fmean(float(r[f"{p}_seconds"]) for r in rs) for p in ("surrogate", "prune", "pretrain")}
        out.append({"method": method, "ratio": ratio, **parts, "total": sum(parts.values())})
    return out


def time_markdown(rows: Sequence[dict]) -> str:
    lines = ["### Time to a pretrained model (s, mean over seeds)", "",
             "| method | ratio | surrogate | prune | pretrain | total |", "|---|---|---|---|---|---|"]
    for t in time_rows(rows):
        lines.append(f"| {t['method']} | {t['ratio']:.2f} | {t['surrogate']:.1f} | {t['prune']:.1f} | "
                     f"{t['pretrain']:.1f} | {t['total']:.1f} |")
    return "\n".join(lines + ["", TIME_NOTE]) + "\n"


def write_reports(rows: Sequence[dict], out: Path, bias: Optional[dict] = None) -> None:
    """results.csv and results.md in `out` (the plots are fastvote.plots')."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r.get(k, "") for k in CSV_FIELDS})
    write_text(out / "results.csv", buf.getvalue())
    write_text(out / "results.md", "# Results\n" + results_markdown(rows) + "\n" + time_markdown(rows)
               + (bias_markdown(rows, bias) if bias else ""))
