"""Pictures the CLI and the experiment save next to their results. Every
figure is written under a temporary name and renamed, so a PNG on disk is
always whole."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

MAX_LABELLED_CLASSES = 80  # beyond this, names on the axis are unreadable


def save_figure(fig, path: Union[str, os.PathLike]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def plot_votes(result, path: Union[str, os.PathLike]) -> Path:
    """Bar chart of the votes per source class, kept classes highlighted and
    class names on the axis. With more than MAX_LABELLED_CLASSES classes only
    the best-ranked ones are drawn (the title says so)."""
    votes = (result.votes if result.votes is not None else result.scores).double()
    kept = {int(c) for c in result.kept_classes}
    ids = list(range(len(votes)))
    subset = ""
    if len(ids) > MAX_LABELLED_CLASSES:
        order = sorted(ids, key=lambda j: (-float(votes[j]), j))
        ids = sorted(order[:MAX_LABELLED_CLASSES])
        subset = f" (the {MAX_LABELLED_CLASSES} most voted of {len(votes)})"
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
