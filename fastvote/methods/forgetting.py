"""Forgetting events (Toneva et al., ICLR 2019; SPEC.md Baselines), sample-wise.

Definition, as implemented:
- A model of the surrogate's architecture is trained from scratch on the
  source for the whole source recipe (``recipe["epochs"]`` epochs; run r of
  `runs` from base.run_seed(seed, r)). Every sample is presented once an epoch.
- Each time a sample is presented in a training minibatch, its prediction
  from that minibatch's forward pass (train mode, before the optimiser step,
  as the authors record it) is correct (1) or not (0).
- A forgetting event is a presentation where the sample is misclassified
  after it was correctly classified at its previous presentation (1 -> 0).
  The first presentation has no predecessor and is never an event.
- Score = the number of forgetting events. A sample never classified
  correctly at any presentation is "never learned" and scores the number of
  epochs, more than any learned sample can reach (at most floor(P / 2) events
  in P presentations): the authors rank unlearned samples as the most
  forgotten.
- With runs > 1 the score is the mean over runs. The `keep` MOST forgotten are
  kept (ties — many samples are never forgotten — by a seeded random key).
  ratio = the fraction of source SAMPLES removed.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence, Tuple

import torch
from torch import Tensor

from fastvote.methods.base import (RUNS, Selection, TrainableSource, View, cached_scores, check_int, keep_top, run_seed,
                                   sample_selection)

CLASS_WISE = False
NEEDS = {"source": ("images", "labels"), "target": ()}
OPTIONS = (dataclasses.replace(RUNS, default=1),)


class ForgettingCounter:
    """Tracks, per sample, the correctness of its last presentation, whether it
    was ever correct, and its forgetting events."""

    def __init__(self, num_rows: int):
        self.last = torch.zeros(num_rows, dtype=torch.bool)      # correct at the previous presentation
        self.learned = torch.zeros(num_rows, dtype=torch.bool)   # correct at some presentation
        self.events = torch.zeros(num_rows, dtype=torch.int64)
        self.presented = torch.zeros(num_rows, dtype=torch.int64)

    def update(self, rows: Tensor, correct: Tensor) -> None:
        """rows int64 [B] (distinct), correct bool [B] for one minibatch."""
        rows, correct = rows.cpu().long(), correct.cpu().bool()
        self.events[rows] += (self.last[rows] & ~correct).long()
        self.learned[rows] |= correct
        self.last[rows] = correct
        self.presented[rows] += 1

    def scores(self, never_learned: int) -> Tensor:
        """Forgetting events per sample, `never_learned` for samples never correct. int64 [N]."""
        return torch.where(self.learned, self.events, torch.full_like(self.events, never_learned))


def scores(source: TrainableSource, *, seed: int = 0, runs: int = 1, progress: bool = True) -> Tuple[Tensor, dict]:
    """Forgetting scores float64 [N] (cached) and what they are."""
    runs = check_int("runs", runs, 1, "independent training runs to average over")
    epochs = int(source.recipe["epochs"])

    def compute() -> Tensor:
        total = torch.zeros(source.num_rows, dtype=torch.float64)
        for r in range(runs):
            counter = ForgettingCounter(source.num_rows)
            source.train_run(run_seed(seed, r), epochs,
                             on_batch=lambda rows, logits, labels: counter.update(rows, logits.argmax(1) == labels))
            if int(counter.presented.min()) < epochs:
                raise RuntimeError(f"forgetting: some samples were presented {int(counter.presented.min())} "
                                   f"times in {epochs} epochs; expected every sample once an epoch")
            total += counter.scores(never_learned=epochs).double()
        return total / runs

    values, path = cached_scores(source, "forgetting", {"seed": seed, "runs": runs, "recipe": source.recipe},
                                 compute)
    return values, {"score": "forgetting", "runs": runs, "epochs": epochs, "seed": seed, "recipe": source.recipe,
                    "never_learned_score": epochs, "scores_file": str(path) if path else None}


def select(source: TrainableSource, targets: Sequence[View], *, keep: int, seed: int = 0, runs: int = 1,
           device=None, progress: bool = True) -> Selection:
    """Keeps the `keep` most forgotten source SAMPLES (prune's ratio: the
    fraction of samples removed)."""
    values, info = scores(source, seed=seed, runs=runs, progress=progress)
    return sample_selection(keep_top(values.numpy(), keep, seed, highest=True), values,
                            {**info, "keep": "most forgotten"})
