"""Pictures the CLI and the experiment save next to their results. Every
figure is written through fastvote.atomic, so a PNG on disk is always whole.
The experiment's charts draw fastvote.report's numbers."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

from fastvote.atomic import atomic_path  # noqa: E402
from fastvote.report import UNPRUNED, mean_std, method_label, summarize, time_rows  # noqa: E402

MAX_LABELLED_CLASSES = 80  # beyond this, names on the axis are unreadable


def save_figure(fig, path: Union[str, os.PathLike]) -> Path:
    try:
        with atomic_path(path) as tmp:  # the temporary name keeps .png: savefig picks the format by it
            fig.savefig(tmp, dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(path)


def plot_votes(result, path: Union[str, os.PathLike]) -> Path:
    """Bar chart of the votes per source class, kept classes highlighted and
    class names on the axis. Beyond MAX_LABELLED_CLASSES classes (ImageNet's
    1000) the bars are the kept classes in rank order, then the other voted ones, at
    most MAX_LABELLED_CLASSES of them: zero-vote filler is not drawn (the title
    says what is shown)."""
    votes = (result.votes if result.votes is not None else result.scores).double()
    kept = {int(c) for c in result.kept_classes}
    ids = list(range(len(votes)))
    subset = ""
    if len(ids) > MAX_LABELLED_CLASSES:
        ranked = [int(c) for c in result.kept_classes]  # the kept ones in rank order, then the other voted ones
        ranked += [j for j in sorted(ids, key=lambda j: (-float(votes[j]), j)) if float(votes[j]) > 0 and j not in kept]
        ids = ranked[:MAX_LABELLED_CLASSES]
        subset = f" (the {len(ids)} most voted of {len(votes)}; zero-vote classes not drawn)"
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(ids) + 2), 4.2))
    colors = ["tab:orange" if j in kept else "tab:gray" for j in ids]
    ax.bar(range(len(ids)), [float(votes[j]) for j in ids], color=colors)
    ax.set_xticks(range(len(ids)))
    ax.set_xticklabels([result.class_names[j] for j in ids], rotation=90, fontsize=8)
    ax.set_ylabel("votes" if result.votes is not None else "score")
    ax.set_title(f"{result.method.upper()} votes per source class{subset}: "
                 f"{len(kept)} kept (orange), ratio removed {result.ratio:.2f}")
    ax.margins(x=0.01)
    return save_figure(fig, path)


def plot_accuracy(rows, path: Union[str, os.PathLike]) -> Path:
    """Transfer accuracy vs pruning ratio, one line per method (mean and std
    over seeds), the unpruned source as a horizontal band; one panel per
    (target, transfer mode)."""
    table = summarize(rows)
    modes = sorted({m for m, _, _ in table})  # (target, mode) panels
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for method in dict.fromkeys(r["method"] for r in rows):
            points = sorted((r, mean_std(v)) for (m, meth, r), v in table.items() if m == mode and meth == method)
            if method == UNPRUNED:
                mean, std = points[0][1]
                ax.axhline(100 * mean, color="black", ls="--", label="unpruned")
                ax.axhspan(100 * (mean - std), 100 * (mean + std), color="black", alpha=0.08)
                continue
            xs = [100 * r for r, _ in points]
            ax.errorbar(xs, [100 * m for _, (m, _) in points], yerr=[100 * s for _, (_, s) in points],
                        marker="o", capsize=3, label=method_label(method))
        ax.set_xlabel("pruning ratio (% of source classes removed)")
        ax.set_ylabel("target test accuracy (%)")
        target, kind = mode
        ax.set_title(f"{kind} transfer" + (f" to {target}" if target else ""))
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, path)


def plot_time(rows, path: Union[str, os.PathLike]) -> Path:
    """Time to a pretrained model vs pruning ratio, stacked surrogate / prune /
    pretrain (the paper's time table as a picture); one bar per ratio, using
    the voting methods' times (the unpruned source at ratio 0)."""
    times = [t for t in time_rows(rows) if t["method"] in ("lm", "fm", UNPRUNED)]
    by_ratio = {}
    for t in times:
        by_ratio.setdefault(t["ratio"], []).append(t)
    ratios = sorted(by_ratio)
    parts = ("surrogate", "prune", "pretrain")
    means = {p: [sum(t[p] for t in by_ratio[r]) / len(by_ratio[r]) for r in ratios] for p in parts}
    fig, ax = plt.subplots(figsize=(6, 4))
    bottom = [0.0] * len(ratios)
    labels = [f"{100 * r:.0f}%" for r in ratios]
    for p, color in zip(parts, ("tab:blue", "tab:orange", "tab:green")):
        ax.bar(labels, means[p], bottom=bottom, label=p, color=color)
        bottom = [b + m for b, m in zip(bottom, means[p])]
    unpruned = [t["total"] for t in times if t["method"] == UNPRUNED]
    for x, total in enumerate(bottom):
        share = f" ({total / unpruned[0]:.2f}x)" if unpruned and unpruned[0] > 0 else ""
        ax.text(x, total, f"{total:.0f} s{share}", ha="center", va="bottom", fontsize=8)
    if unpruned:  # the paper's claim: a pruned source pays for its surrogate and still saves time
        ax.axhline(unpruned[0] / 2, color="gray", linestyle="--", linewidth=1, label="half the unpruned time")
    ax.set_xlabel("pruning ratio (% of source classes removed)")
    ax.set_ylabel("seconds to a pretrained model")
    ax.set_title("time to a pretrained model (LM/FM; 0% = unpruned)")
    ax.legend()
    return save_figure(fig, path)
